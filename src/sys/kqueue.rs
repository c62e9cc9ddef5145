//! macOS / iOS / FreeBSD backend: kqueue with EVFILT_READ and EVFILT_WRITE (EV_CLEAR, the
//! kqueue form of edge triggering) and an EVFILT_USER waker.
//!
//! Tokens travel in `udata`, which is pointer-sized: this backend supports 64-bit targets only,
//! where a `u64` token fits. It is type-checked in CI (`cargo check --target`) but has not been
//! run: we have no BSD or macOS machine.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::{cvt, Event};

#[cfg(not(target_pointer_width = "64"))]
compile_error!("the kqueue backend carries 64-bit tokens in udata: 64-bit targets only");

// libc field types that differ across the BSDs get local names, so casts stay out of the logic.
type Filter = i16;
type Flags = u16;
type UData = *mut libc::c_void;

/// The longest single wait, in seconds (see `Selector::select`).
const MAX_WAIT_SECS: u64 = 100_000_000;

/// The ident of our EVFILT_USER event; any value works, it lives in its own namespace.
const WAKER_IDENT: usize = 0;

fn kevent(ident: usize, filter: Filter, flags: Flags, fflags: u32, token: u64) -> libc::kevent {
    // SAFETY: kevent is plain data (integers and a pointer used only as a number): all-zero is
    // valid, and it also clears FreeBSD's `ext` array.
    let mut ev: libc::kevent = unsafe { std::mem::zeroed() };
    ev.ident = ident as _;
    ev.filter = filter as _;
    ev.flags = flags as _;
    ev.fflags = fflags as _;
    ev.udata = token as usize as UData;
    ev
}

pub(crate) struct Selector {
    kq: OwnedFd,
}

impl Selector {
    pub(crate) fn new() -> io::Result<Selector> {
        // SAFETY: no pointers; the returned fd is new and owned by nothing else.
        let fd = cvt(unsafe { libc::kqueue() })?;
        // SAFETY: `fd` was just returned by kqueue.
        let kq = unsafe { OwnedFd::from_raw_fd(fd) };
        // kqueue fds are not inherited by fork, but exec inheritance needs FD_CLOEXEC.
        // SAFETY: F_SETFD takes an integer argument, no pointers.
        cvt(unsafe { libc::fcntl(kq.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
        Ok(Selector { kq })
    }

    /// Applies `changes` with EV_RECEIPT, so each change reports its own error.
    fn apply(&self, changes: &mut [libc::kevent], ignore: &[i32]) -> io::Result<()> {
        for ev in changes.iter_mut() {
            ev.flags |= libc::EV_RECEIPT as Flags;
        }
        let n = changes.len() as libc::c_int;
        // One pointer for both lists: a second borrow of the slice would invalidate the first.
        let list = changes.as_mut_ptr();
        // SAFETY: the change list and the receipt list are the same live slice of `n` events.
        let r =
            cvt(unsafe { libc::kevent(self.kq.as_raw_fd(), list, n, list, n, std::ptr::null()) });
        match r {
            // FreeBSD's kevent(2): on EINTR the changes were applied (mio's kqueue.rs agrees),
            // and with EV_RECEIPT no event was being waited for; the receipts are then unset.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            r => r?,
        };
        for ev in changes.iter() {
            // With EV_RECEIPT every entry comes back with EV_ERROR set; `data` is 0 on success.
            let err = ev.data as i32;
            if ev.flags & (libc::EV_ERROR as Flags) != 0 && err != 0 && !ignore.contains(&err) {
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        Ok(())
    }

    pub(crate) fn register(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let flags = (libc::EV_ADD | libc::EV_CLEAR) as Flags;
        let mut changes = [
            kevent(fd as usize, libc::EVFILT_READ as Filter, flags, 0, token),
            kevent(fd as usize, libc::EVFILT_WRITE as Filter, flags, 0, token),
        ];
        // macOS reports EPIPE when adding EVFILT_WRITE to a socket whose peer already closed;
        // the registration still happened (mio ignores it too, see its kqueue.rs).
        self.apply(&mut changes, &[libc::EPIPE])
    }

    pub(crate) fn deregister(&self, fd: RawFd) -> io::Result<()> {
        let flags = libc::EV_DELETE as Flags;
        let mut changes = [
            kevent(fd as usize, libc::EVFILT_READ as Filter, flags, 0, 0),
            kevent(fd as usize, libc::EVFILT_WRITE as Filter, flags, 0, 0),
        ];
        // ENOENT: the filter was never added or is already gone; nothing to undo.
        self.apply(&mut changes, &[libc::ENOENT])
    }

    pub(crate) fn select(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        // macOS refuses a timeout over INT32_MAX seconds (older releases over 10^8) with
        // EINVAL before collecting any event, which would leave the poller blind while a far
        // timer is the nearest; waking up after ~3 years instead is harmless (the driver
        // recomputes its timeout). swift-nio caps at the same 10^8 s.
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(MAX_WAIT_SECS) as libc::time_t,
            tv_nsec: d.subsec_nanos() as _,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        events.list.clear();
        // SAFETY: the kernel writes at most `capacity` events into the spare capacity; `ts_ptr`
        // is null or points at a live timespec.
        let n = unsafe {
            libc::kevent(
                self.kq.as_raw_fd(),
                std::ptr::null(),
                0,
                events.list.as_mut_ptr(),
                events.list.capacity() as libc::c_int,
                ts_ptr,
            )
        };
        match cvt(n) {
            Ok(n) => {
                // SAFETY: kevent initialised the first `n` (<= capacity) entries.
                unsafe { events.list.set_len(n as usize) };
                Ok(())
            }
            // EINTR: "a signal was delivered before the timeout expired" (kqueue(2), FreeBSD).
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }
}

pub(crate) struct Events {
    list: Vec<libc::kevent>,
}

// SAFETY: the only pointer in a `kevent` is `udata`, which we use as an integer token and never
// dereference; the rest is plain integers. Moving the buffer to the poller thread shares nothing.
unsafe impl Send for Events {}

impl Events {
    pub(crate) fn with_capacity(n: usize) -> Events {
        Events {
            list: Vec::with_capacity(n.max(1)),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        self.list.iter().map(|ev| {
            let filter = ev.filter as Filter;
            // EV_EOF (peer closed) and EV_ERROR wake both directions: the syscall tells the rest.
            let both = ev.flags & ((libc::EV_EOF | libc::EV_ERROR) as Flags) != 0;
            Event {
                token: ev.udata as usize as u64,
                readable: filter == libc::EVFILT_READ as Filter || both,
                writable: filter == libc::EVFILT_WRITE as Filter || both,
                hup: both,
            }
        })
    }
}

/// Wakes a sleeping `select`: an EVFILT_USER event, cleared by the kernel on delivery.
pub(crate) struct Waker {
    kq: RawFd,
    token: u64,
}

impl Waker {
    pub(crate) fn new(selector: &Selector, token: u64) -> io::Result<Waker> {
        let flags = (libc::EV_ADD | libc::EV_CLEAR) as Flags;
        let mut change = [kevent(
            WAKER_IDENT,
            libc::EVFILT_USER as Filter,
            flags,
            0,
            token,
        )];
        selector.apply(&mut change, &[])?;
        // The waker lives in the same `Shared` as the selector, so the kqueue fd outlives it.
        Ok(Waker {
            kq: selector.kq.as_raw_fd(),
            token,
        })
    }

    pub(crate) fn wake(&self) -> io::Result<()> {
        let mut change = [kevent(
            WAKER_IDENT,
            libc::EVFILT_USER as Filter,
            0,
            libc::NOTE_TRIGGER,
            self.token,
        )];
        // SAFETY: one live change, no event list, no timeout.
        cvt(unsafe {
            libc::kevent(
                self.kq,
                change.as_mut_ptr(),
                1,
                std::ptr::null_mut(),
                0,
                std::ptr::null(),
            )
        })?;
        Ok(())
    }

    /// EV_CLEAR resets the user event when it is delivered: nothing to do.
    pub(crate) fn reset(&self) {}
}
