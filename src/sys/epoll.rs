//! Linux backend: edge-triggered epoll, eventfd waker.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::{cvt, Event};

pub(crate) struct Selector {
    ep: OwnedFd,
}

impl Selector {
    pub(crate) fn new() -> io::Result<Selector> {
        // SAFETY: no pointers are passed; on success the fd is new and nobody else owns it.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nothing else.
        Ok(Selector {
            ep: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Registers read and write interest, edge-triggered, with `token` as the event data.
    /// EPOLLRDHUP reports a peer's half-close as an edge even when no data comes with it.
    pub(crate) fn register(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let flags = libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET;
        self.ctl(libc::EPOLL_CTL_ADD, fd, flags as u32, token)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a live epoll_event; the kernel copies it. `fd` is the caller's,
        // borrowed for this call. A regular file gives EPERM, a closed fd EBADF.
        cvt(unsafe { libc::epoll_ctl(self.ep.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    pub(crate) fn deregister(&self, fd: RawFd) -> io::Result<()> {
        // A non-null event pointer keeps kernels before 2.6.9 happy (epoll_ctl(2), BUGS).
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events. `None` waits forever. EINTR returns with no events.
    pub(crate) fn select(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        // Round up to whole milliseconds (as mio does), so a deadline 0.4 ms away does not turn
        // into a zero timeout and a busy loop.
        let ms = match timeout {
            None => -1,
            Some(d) => {
                let ms = d.as_nanos().div_ceil(1_000_000);
                ms.min(libc::c_int::MAX as u128) as libc::c_int
            }
        };
        events.list.clear();
        // SAFETY: the kernel writes at most `capacity` events into the vector's spare capacity.
        let n = unsafe {
            libc::epoll_wait(
                self.ep.as_raw_fd(),
                events.list.as_mut_ptr(),
                events.list.capacity() as libc::c_int,
                ms,
            )
        };
        match cvt(n) {
            Ok(n) => {
                // SAFETY: epoll_wait initialised the first `n` (<= capacity) entries.
                unsafe { events.list.set_len(n as usize) };
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }
}

pub(crate) struct Events {
    list: Vec<libc::epoll_event>,
}

impl Events {
    pub(crate) fn with_capacity(n: usize) -> Events {
        Events {
            list: Vec::with_capacity(n.max(1)),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        self.list.iter().map(|ev| {
            // epoll_event is packed on x86_64: copy the fields out, never borrow them.
            let (bits, token) = (ev.events as libc::c_int, ev.u64);
            let err_hup = libc::EPOLLERR | libc::EPOLLHUP;
            Event {
                token,
                readable: bits & (libc::EPOLLIN | libc::EPOLLPRI | libc::EPOLLRDHUP | err_hup) != 0,
                writable: bits & (libc::EPOLLOUT | err_hup) != 0,
                hup: bits & (libc::EPOLLRDHUP | err_hup) != 0,
            }
        })
    }
}

/// Wakes a sleeping `select` from another thread: an eventfd registered edge-triggered.
pub(crate) struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// An eventfd alone (the io_uring engine reads it with an operation of its ring).
    pub(crate) fn eventfd() -> io::Result<Waker> {
        // SAFETY: no pointers; the returned fd is new and owned by nothing else.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: `fd` was just returned by eventfd.
        Ok(Waker {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The eventfd.
    #[cfg(feature = "uring")]
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub(crate) fn new(selector: &Selector, token: u64) -> io::Result<Waker> {
        let Waker { fd } = Waker::eventfd()?;
        selector.ctl(
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            token,
        )?;
        Ok(Waker { fd })
    }

    pub(crate) fn wake(&self) -> io::Result<()> {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live u64, as eventfd(2) requires.
            let r = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            if r == 8 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                // The counter is about to overflow: the poller has plenty of wake-ups pending.
                io::ErrorKind::WouldBlock => return Ok(()),
                _ => return Err(e),
            }
        }
    }

    /// Resets the counter, so it never saturates. Edge-triggered, so an unread counter would
    /// not keep waking us; reading it is housekeeping.
    pub(crate) fn reset(&self) {
        let mut buf: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64. EAGAIN (counter already 0) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
    }
}
