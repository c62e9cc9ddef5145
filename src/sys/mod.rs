//! The OS layer: every `unsafe` block of the crate lives below this module.
//!
//! Each backend (`epoll.rs` for Linux and Android, `kqueue.rs` for macOS, iOS and FreeBSD)
//! exports the same names, picked by one `cfg` ladder, with no trait and no dynamic dispatch:
//!
//! - `Selector`: `new()`, `register(fd, token)` (read and write interest, edge-triggered),
//!   `deregister(fd)`, `select(&mut Events, Option<Duration>)` (EINTR returns no events);
//! - `Events`: `with_capacity(n)`, `iter()` yielding [`Event`] (token, readable, writable);
//! - `Waker`: `new(&Selector, token)`, `wake()` (any thread), `reset()` (poller thread).
//!
//! The socket helpers below are plain POSIX and shared by both backends.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};

#[cfg(any(target_os = "linux", target_os = "android"))]
mod epoll;
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) use epoll::{Events, Selector, Waker};

// kqueue backends: the targets with EVFILT_USER (used by the waker) that CI type-checks.
#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
mod kqueue;
#[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
pub(crate) use kqueue::{Events, Selector, Waker};

#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd"
)))]
compile_error!("proactor supports Linux/Android (epoll) and macOS/iOS/FreeBSD (kqueue) only");

/// One readiness event, already reduced to what the driver needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Event {
    pub(crate) token: u64,
    /// Readable, or hung up / errored: a reader should try and see what the socket says.
    pub(crate) readable: bool,
    /// Writable, or hung up / errored: a writer should try and see what the socket says.
    pub(crate) writable: bool,
    /// Hang-up or error: the peer closed or reset, or the socket failed.
    pub(crate) hup: bool,
}

/// Turns a `-1` return into the thread's `errno`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Checks that `fd` is a stream socket and makes it non-blocking (and, on Apple targets,
/// SIGPIPE-free). Options the user set before (nodelay, buffer sizes, keepalive) are untouched.
pub(crate) fn prepare_stream(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `ty` and `len` are live locals of the sizes getsockopt is told; `raw` is borrowed
    // for this call. A non-socket gives ENOTSOCK, a closed fd EBADF: both returned as they are.
    cvt(unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    if ty != libc::SOCK_STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a stream socket (only SOCK_STREAM sockets can be registered)",
        ));
    }
    let mut on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one c_int through the pointer, which points at a live local.
    cvt(unsafe { libc::ioctl(raw, libc::FIONBIO, &mut on) })?;
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    {
        // Apple has no MSG_NOSIGNAL; SO_NOSIGPIPE on the socket does the same for every send.
        // SAFETY: the option value is a live c_int of the length given.
        cvt(unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_NOSIGPIPE,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

/// `recv(2)` into `buf`, retrying EINTR. `Ok(0)` is end of stream.
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live `&mut [u8]`; the kernel writes at most `buf.len()` bytes to it.
        let r =
            cvt_size(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) });
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
// Apple: SO_NOSIGPIPE was set at registration (see `prepare_stream`).
#[cfg(any(target_os = "macos", target_os = "ios"))]
const SEND_FLAGS: libc::c_int = 0;

/// `sendmsg(2)` of the slices, without SIGPIPE, retrying EINTR.
pub(crate) fn send_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (null name, no control data, no flags).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with `struct iovec` on Unix (std docs), and the kernel
    // only reads through msg_iov.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    loop {
        // SAFETY: `msg` points at `bufs`, which outlives this call.
        let r = cvt_size(unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, SEND_FLAGS) });
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Pins the calling thread to one CPU.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cpu index out of range",
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE (checked above), so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}

/// Pins the calling thread to one CPU (not available on this OS).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn pin_to_cpu(_cpu: usize) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "poller CPU affinity is only supported on Linux",
    ))
}
