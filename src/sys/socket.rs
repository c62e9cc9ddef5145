//! Plain POSIX socket calls shared by both backends.

use std::io::{self, IoSlice};
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::{cvt, cvt_size};

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int of the length given.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

pub(super) fn get_int_opt(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
) -> io::Result<libc::c_int> {
    get_opt(fd, level, opt, 0)
}

/// The types `getsockopt` may write into: plain C integers and structs for which every bit
/// pattern is a valid value. `get_opt` is safe to call only because nothing else implements
/// this (a `bool` or a `NonZeroU32` would be undefined behaviour for some values the kernel
/// writes).
///
/// # Safety
///
/// Implement only for types valid for every bit pattern of their size.
unsafe trait OptValue: Copy {}

// SAFETY: a C int is valid for every bit pattern.
unsafe impl OptValue for libc::c_int {}
// SAFETY: `linger` is two C ints, valid for every bit pattern.
unsafe impl OptValue for libc::linger {}

/// `getsockopt` of an option whose value is the plain C type `T` (an integer, `linger`),
/// starting from `val`.
fn get_opt<T: OptValue>(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    mut val: T,
) -> io::Result<T> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` and `len` are live locals of the sizes getsockopt is told; the kernel
    // writes at most `len` bytes of the option's plain C value, valid for any bit pattern.
    cvt(unsafe { libc::getsockopt(fd, level, opt, (&mut val as *mut T).cast(), &mut len) })?;
    Ok(val)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    let mut on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one c_int through the pointer, which points at a live local.
    cvt(unsafe { libc::ioctl(fd, libc::FIONBIO, &mut on) })?;
    Ok(())
}

/// Apple has no MSG_NOSIGNAL; SO_NOSIGPIPE on the socket does the same for every send.
#[cfg(any(target_os = "macos", target_os = "ios"))]
fn no_sigpipe(fd: RawFd) -> io::Result<()> {
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_NOSIGPIPE, 1)
}

#[cfg(not(any(target_os = "macos", target_os = "ios")))]
fn no_sigpipe(_fd: RawFd) -> io::Result<()> {
    Ok(()) // MSG_NOSIGNAL on every send instead
}

/// What kind of socket a registered one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketKind {
    Stream,
    Datagram,
}

/// Checks that `fd` is a stream or datagram socket and makes it non-blocking (and, on Apple
/// targets, SIGPIPE-free). Options the user set before (nodelay, buffer sizes, keepalive)
/// are untouched.
pub(crate) fn prepare_socket(fd: BorrowedFd<'_>) -> io::Result<SocketKind> {
    let raw = fd.as_raw_fd();
    // A non-socket gives ENOTSOCK, a closed fd EBADF: both returned as they are.
    match get_int_opt(raw, libc::SOL_SOCKET, libc::SO_TYPE)? {
        libc::SOCK_STREAM => {}
        libc::SOCK_DGRAM => {
            set_nonblocking(raw)?;
            no_sigpipe(raw)?;
            return Ok(SocketKind::Datagram);
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither a stream nor a datagram socket (only SOCK_STREAM and SOCK_DGRAM \
                 sockets can be registered)",
            ))
        }
    }
    // SO_LINGER with a timeout makes close(2) block until the unsent data is acknowledged or
    // the timeout passes (socket(7)), non-blocking or not: on the poller thread that would
    // stall every connection of the watcher. Accepted sockets inherit it from the listener,
    // which comes through here too. A zero timeout (close with a reset) does not block.
    let off = libc::linger {
        l_onoff: 0,
        l_linger: 0,
    };
    let linger = get_opt(raw, libc::SOL_SOCKET, libc::SO_LINGER, off)?;
    if linger.l_onoff != 0 && linger.l_linger != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "SO_LINGER with a timeout would block the poller thread when the socket is closed \
             (turn it off, or use a zero timeout to close with a reset)",
        ));
    }
    set_nonblocking(raw)?;
    no_sigpipe(raw)?;
    Ok(SocketKind::Stream)
}

/// Whether `fd` is a listening socket. macOS has no `SO_ACCEPTCONN` (ENOPROTOOPT): there
/// [`listener_by_peer`] tells.
pub(crate) fn is_listener(fd: BorrowedFd<'_>) -> io::Result<bool> {
    match get_int_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN) {
        Ok(v) => Ok(v != 0),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => listener_by_peer(fd),
        Err(e) => Err(e),
    }
}

/// Without `SO_ACCEPTCONN`: a socket with a peer is a stream; one without is taken for a
/// listener. A wrong answer must not be one the poller spins on: an operation it thinks
/// misdirected runs without waiting for readiness, and on a socket of the other kind `EAGAIN`
/// would send it round again at once. A stream without a peer (never connected) taken for a
/// listener is harmless: reads on it fail at once (`ENOTCONN`), and so does an accept
/// (`EINVAL`).
fn listener_by_peer(fd: BorrowedFd<'_>) -> io::Result<bool> {
    has_peer(fd.as_raw_fd()).map(|peer| !peer)
}

/// `recv(2)` into `buf`, retrying EINTR. `Ok(0)` is end of stream.
pub(crate) fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live `&mut [u8]`; the kernel writes at most `buf.len()` bytes to it.
    retrying(|| unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            RECV_FLAGS,
        )
    })
}

/// Runs a syscall returning a byte count until it is not interrupted (EINTR).
#[inline(always)]
fn retrying(mut call: impl FnMut() -> libc::ssize_t) -> io::Result<usize> {
    loop {
        match cvt_size(call()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// `recv(2)` of at most `max` bytes into the spare capacity of `buf` (past its length),
/// retrying EINTR; the bytes received are appended to `buf`. The spare capacity is never
/// zeroed first: the internal read arena's 64 KiB chunks are reused, and re-zeroing each one
/// showed in the profile as much as the whole driver round (docs/benchmarks.md).
pub(crate) fn recv_spare(
    fd: BorrowedFd<'_>,
    buf: &mut bytes::BytesMut,
    max: usize,
) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = max.min(spare.len());
    let spare = &mut spare[..len];
    // SAFETY: `spare` is live, writable memory of `spare.len()` bytes that `buf` owns; the
    // kernel writes at most that many bytes into it and never reads it.
    let n = retrying(|| unsafe {
        libc::recv(
            fd.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            RECV_FLAGS,
        )
    })?;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity (recv returns
    // how many it wrote, at most `spare.len()`), so `len + n` bytes are initialised.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Every recv and send is non-blocking by its own flag too: the socket's O_NONBLOCK lives in
/// the open file description, which a `dup` of the fd held elsewhere (a forked child, a
/// library) can switch off again, and a blocking call would stall the poller thread.
pub(super) const RECV_FLAGS: libc::c_int = libc::MSG_DONTWAIT;

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
pub(super) const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
// Apple: SO_NOSIGPIPE was set when the socket was registered or created (accepted ones
// inherit it).
#[cfg(any(target_os = "macos", target_os = "ios"))]
pub(super) const SEND_FLAGS: libc::c_int = libc::MSG_DONTWAIT;

/// `send(2)` of one buffer, without SIGPIPE, retrying EINTR. The common case of one queued
/// write: the kernel's `send` takes the buffer as it is, where `sendmsg` first copies and
/// checks a `msghdr` and an iovec array.
pub(crate) fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice; the kernel reads at most `buf.len()` bytes of it.
    retrying(|| unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), SEND_FLAGS) })
}

/// `sendmsg(2)` of the slices, without SIGPIPE, retrying EINTR.
pub(crate) fn send_vectored(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (null name, no control data, no flags).
    let mut msg: libc::msghdr = unsafe { zeroed() };
    // IoSlice is guaranteed ABI-compatible with `struct iovec` on Unix (std docs), and the kernel
    // only reads through msg_iov.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `msg` points at `bufs`, which outlives this call.
    retrying(|| unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, SEND_FLAGS) })
}

/// `shutdown(SHUT_WR)`: the peer reads end of stream once the bytes already sent arrive.
pub(crate) fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: no pointers; `fd` is borrowed for the call.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) })?;
    Ok(())
}

/// A new TCP socket for `addr`'s family: close-on-exec, SIGPIPE-free, and non-blocking if
/// asked.
fn tcp_socket(addr: &SocketAddr, nonblocking: bool) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    #[cfg(not(any(target_os = "macos", target_os = "ios")))]
    let ty =
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    let ty = libc::SOCK_STREAM;
    // SAFETY: no pointers; on success the fd is new.
    let raw = cvt(unsafe { libc::socket(domain, ty, 0) })?;
    // SAFETY: `raw` was just returned by socket() and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    {
        // No SOCK_CLOEXEC/SOCK_NONBLOCK on Apple: set them now, before anyone can fork.
        // SAFETY: F_SETFD takes an integer argument.
        cvt(unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) })?;
        if nonblocking {
            set_nonblocking(raw)?;
        }
    }
    no_sigpipe(fd.as_raw_fd())?;
    Ok(fd)
}

/// Starts a non-blocking connect. `Ok` means in progress (or, rarely, already connected);
/// errors known at once (unreachable, refused on the spot, EMFILE) are returned.
pub(crate) fn start_connect(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let fd = tcp_socket(addr, true)?;
    let (storage, len) = to_raw(addr);
    // SAFETY: `storage` holds a sockaddr of `len` bytes for this family.
    let r = cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    });
    match r {
        Ok(_) => Ok(fd),
        // EINTR: the connection goes on asynchronously, like EINPROGRESS (connect(2), POSIX).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EINTR)) => Ok(fd),
        Err(e) => Err(e),
    }
}

/// After a writable event on a connecting socket: `Ok(true)` connected, `Ok(false)` still in
/// progress (a stale or early event), `Err` the connection failed.
pub(crate) fn connect_finished(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let raw = fd.as_raw_fd();
    let err = get_int_opt(raw, libc::SOL_SOCKET, libc::SO_ERROR)?;
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    has_peer(raw)
}

/// The peer's address (`getpeername`), if it has one that `SocketAddr` can hold.
#[cfg(all(target_os = "linux", feature = "uring"))]
pub(crate) fn peer_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    // SAFETY: all-zero sockaddr_storage is valid; `len` says how much the kernel may write.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is live and `len` is its size.
    let r = cvt(unsafe {
        libc::getpeername(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    });
    r.ok().and_then(|_| from_raw(&storage))
}

/// Whether the socket is connected to a peer (`getpeername`): `Ok(false)` on ENOTCONN.
fn has_peer(raw: RawFd) -> io::Result<bool> {
    // SAFETY: all-zero sockaddr_storage is valid; `len` says how much the kernel may write.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is live and `len` is its size.
    let r = cvt(unsafe {
        libc::getpeername(
            raw,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    });
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `accept4(2)` (plain accept plus fcntl/ioctl on Apple): the new socket is close-on-exec,
/// non-blocking and SIGPIPE-free. EINTR is retried; every other error is returned.
pub(crate) fn accept(fd: BorrowedFd<'_>) -> io::Result<(OwnedFd, Option<SocketAddr>)> {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    loop {
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let addr = (&mut storage as *mut libc::sockaddr_storage).cast();
        // SAFETY: `addr` points at a live sockaddr_storage of `len` bytes.
        #[cfg(not(any(target_os = "macos", target_os = "ios")))]
        let r = unsafe {
            libc::accept4(
                fd.as_raw_fd(),
                addr,
                &mut len,
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        // SAFETY: as above.
        #[cfg(any(target_os = "macos", target_os = "ios"))]
        let r = unsafe { libc::accept(fd.as_raw_fd(), addr, &mut len) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(raw) => {
                // SAFETY: `raw` was just returned by accept and is owned by nothing else.
                let new = unsafe { OwnedFd::from_raw_fd(raw) };
                #[cfg(any(target_os = "macos", target_os = "ios"))]
                {
                    // SAFETY: F_SETFD takes an integer argument.
                    cvt(unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) })?;
                    set_nonblocking(raw)?;
                    // A connection queued before the listener was registered did not
                    // inherit SO_NOSIGPIPE. Its error is ignored: XNU refuses any setsockopt
                    // (EINVAL) on a connection reset while queued, which must not lose the
                    // accept; sends on such a socket fail without a signal anyway.
                    let _ = no_sigpipe(raw);
                }
                return Ok((new, from_raw(&storage)));
            }
        }
    }
}

/// A listening TCP socket with SO_REUSEADDR, and with `reuseport` also SO_REUSEPORT
/// (SO_REUSEPORT_LB on FreeBSD, where plain SO_REUSEPORT does not balance), so several can
/// share one port and the kernel spreads incoming connections over them. Blocking, like any
/// new std listener.
pub(crate) fn listener(addr: &SocketAddr, reuseport: bool, backlog: i32) -> io::Result<OwnedFd> {
    let fd = tcp_socket(addr, false)?;
    let raw = fd.as_raw_fd();
    set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if reuseport {
        #[cfg(target_os = "freebsd")]
        set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT_LB, 1)?;
        #[cfg(not(target_os = "freebsd"))]
        set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    let (storage, len) = to_raw(addr);
    // SAFETY: `storage` holds a sockaddr of `len` bytes for this family.
    cvt(unsafe { libc::bind(raw, (&storage as *const libc::sockaddr_storage).cast(), len) })?;
    // SAFETY: no pointers.
    cvt(unsafe { libc::listen(raw, backlog) })?;
    Ok(fd)
}

pub(super) fn to_raw(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero sockaddr_storage is valid, and large and aligned enough for either
    // sockaddr_in or sockaddr_in6, which are plain integer structs.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: see above: storage is big and aligned enough for a sockaddr_in.
            let sin = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            {
                sin.sin_len = size_of::<libc::sockaddr_in>() as u8;
            }
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: see above: storage is big and aligned enough for a sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            {
                sin6.sin6_len = size_of::<libc::sockaddr_in6>() as u8;
            }
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

pub(super) fn from_raw(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET) into the storage, which
            // is big and aligned enough for it.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for a sockaddr_in6 (family AF_INET6).
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                port,
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        // Unix-domain and other families: no `std::net::SocketAddr` to give.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    use super::{is_listener, listener_by_peer};

    /// The fallback for systems without `SO_ACCEPTCONN` (macOS), run here where the answer
    /// can be checked against the kernel's own.
    #[test]
    fn a_listener_is_told_from_a_stream_with_and_without_so_acceptconn() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        for (fd, listens) in [
            (listener.as_fd(), true),
            (client.as_fd(), false),
            (server.as_fd(), false),
        ] {
            assert_eq!(is_listener(fd).unwrap(), listens);
            assert_eq!(listener_by_peer(fd).unwrap(), listens);
        }
    }
}
