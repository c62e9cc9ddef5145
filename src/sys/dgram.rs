//! Datagram sockets: batches of `recvmmsg`/`sendmmsg` (a loop of `recvmsg`/`sendmsg` where the
//! OS has no batch call: macOS and iOS), and addresses in and out of `sockaddr_storage`.

use std::ffi::OsStr;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::socket::{from_raw, to_raw, RECV_FLAGS, SEND_FLAGS};
use crate::PeerAddr;

/// Datagrams one system call moves at most.
pub(crate) const BATCH: usize = 32;

/// What a receive learnt of one datagram.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// Bytes put in the buffer.
    pub(crate) n: usize,
    /// The datagram was longer than the buffer; its length, where the OS tells (Linux).
    pub(crate) truncated: Option<Option<usize>>,
    /// The sender (`None` where the OS gave no address).
    pub(crate) from: Option<PeerAddr>,
    /// The length of the sender's raw address.
    from_len: libc::socklen_t,
}

/// Receives up to `bufs.len()` (at most `BATCH`) datagrams, one into each buffer, without
/// waiting. Returns how many arrived (their details in `out`), and the error that stopped
/// the batch short, if one did (`WouldBlock`: no more waiting).
pub(crate) fn recv_batch(
    fd: BorrowedFd<'_>,
    bufs: &mut [&mut [u8]],
    out: &mut [Received],
) -> (usize, Option<io::Error>) {
    let n = bufs.len().min(BATCH).min(out.len());
    // SAFETY: all-zero sockaddr_storage, iovec and msghdr are valid (null pointers, zero
    // lengths) and are filled in below before use.
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: bufs[i].as_mut_ptr().cast(),
            iov_len: bufs[i].len(),
        };
    }
    let (got, err) = recv_headers(fd, &mut names[..n], &mut iovs[..n], out);
    for (i, o) in out.iter_mut().enumerate().take(got) {
        o.from = peer_from_raw(&names[i], o.from_len);
    }
    (got, err)
}

/// The headers of one batch, and the system call.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn recv_headers(
    fd: BorrowedFd<'_>,
    names: &mut [libc::sockaddr_storage],
    iovs: &mut [libc::iovec],
    out: &mut [Received],
) -> (usize, Option<io::Error>) {
    let n = iovs.len();
    // SAFETY: all-zero mmsghdr is valid; each is pointed at its name and iovec below.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for i in 0..n {
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
    }
    // MSG_TRUNC: a datagram's length is its real length, also when the buffer was shorter
    // (Linux; FreeBSD ignores the flag and gives what was copied).
    let flags = RECV_FLAGS | libc::MSG_TRUNC;
    let got = loop {
        // SAFETY: `hdrs[..n]` point at live names, iovecs and buffers (the callers'
        // `&mut [u8]`s, of the lengths the iovecs say), which outlive the call; the kernel
        // writes at most those lengths into them.
        let r = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                n as _,
                flags as _,
                std::ptr::null_mut(),
            )
        };
        match super::cvt(r as libc::c_int) {
            Ok(got) => break got as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (0, Some(e)),
        }
    };
    for i in 0..got {
        let h = &hdrs[i].msg_hdr;
        let len = hdrs[i].msg_len as usize;
        let room = iovs[i].iov_len;
        let cut = h.msg_flags & libc::MSG_TRUNC != 0 || len > room;
        out[i].n = len.min(room);
        out[i].truncated = cut.then_some((len > room).then_some(len));
        out[i].from_len = h.msg_namelen;
    }
    (got, None)
}

/// The headers of one batch, and one `recvmsg` per datagram (no `recvmmsg` on Apple targets).
#[cfg(any(target_os = "macos", target_os = "ios"))]
fn recv_headers(
    fd: BorrowedFd<'_>,
    names: &mut [libc::sockaddr_storage],
    iovs: &mut [libc::iovec],
    out: &mut [Received],
) -> (usize, Option<io::Error>) {
    for i in 0..iovs.len() {
        // SAFETY: all-zero msghdr is valid; it is pointed at the name and iovec below.
        let mut h: libc::msghdr = unsafe { zeroed() };
        h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        // SAFETY: `h` points at a live name, iovec and buffer; the kernel writes at most
        // their lengths.
        let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut h, RECV_FLAGS) };
        match super::cvt_size(r) {
            Ok(len) => {
                out[i].n = len;
                out[i].truncated = (h.msg_flags & libc::MSG_TRUNC != 0).then_some(None);
                out[i].from_len = h.msg_namelen;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (i, Some(e)),
        }
    }
    (iovs.len(), None)
}

/// Sends datagrams without waiting, in at most `BATCH` messages: message `i` is the next
/// `segs[i]` datagrams of `msgs`, one datagram if 1, else one send that the kernel cuts into
/// `segs[i]` datagrams (UDP GSO, Linux, where `can_gso`: the caller groups only datagrams to
/// one address, all as long as the first but the last, which may be shorter). Each datagram
/// goes to its address (`None`: the socket's connected peer). Returns how many datagrams
/// went, and the error of the first message if it failed (`WouldBlock`: the send buffer is
/// full). A later message's error is dropped by `sendmmsg`, which then reports the messages
/// before it: the caller sends that message again first, and meets its error then (unless
/// it was a one-off, such as an ICMP error the failed send took).
pub(crate) fn send_batch(
    fd: BorrowedFd<'_>,
    msgs: &[(&[u8], Option<&PeerAddr>)],
    segs: &[u16],
) -> (usize, Option<io::Error>) {
    let m = segs.len().min(BATCH);
    let n = msgs.len().min(MAX_DATAGRAMS);
    // SAFETY: all-zero sockaddr_storage and iovec are valid; filled in below.
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    let mut name_lens = [0 as libc::socklen_t; BATCH];
    let mut iovs: [libc::iovec; MAX_DATAGRAMS] = unsafe { zeroed() };
    for (iov, (buf, _)) in iovs.iter_mut().zip(&msgs[..n]) {
        *iov = libc::iovec {
            // The kernel only reads through a send's iovec.
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
    }
    let mut first = 0;
    for i in 0..m {
        if first + usize::from(segs[i]) > n {
            // (Not a caller's mistake this layer could meet: fewer datagrams than said.)
            return send_headers(fd, &mut names[..i], &name_lens[..i], &mut iovs, &segs[..i]);
        }
        if let Some(to) = msgs[first].1 {
            match peer_to_raw(to) {
                Ok((storage, len)) => (names[i], name_lens[i]) = (storage, len),
                // An address no socket can have: that datagram fails, after those before.
                Err(e) if i == 0 => return (0, Some(e)),
                Err(_) => {
                    return send_headers(
                        fd,
                        &mut names[..i],
                        &name_lens[..i],
                        &mut iovs,
                        &segs[..i],
                    )
                }
            }
        }
        first += usize::from(segs[i]);
    }
    send_headers(fd, &mut names[..m], &name_lens[..m], &mut iovs, &segs[..m])
}

/// Datagrams one `send_batch` takes at most (in `BATCH` messages).
pub(crate) const MAX_DATAGRAMS: usize = 256;

/// `UDP_SEGMENT` (linux/udp.h; kernel ABI since 4.18): the segment size of a GSO send.
#[cfg(target_os = "linux")]
const UDP_SEGMENT: libc::c_int = 103;

/// Room for one control message holding a `u16`, aligned as `cmsghdr` wants.
#[cfg(target_os = "linux")]
type Control = [u64; 4];

/// Whether datagrams of `fd` may go in GSO sends: a UDP socket (`SO_PROTOCOL`; not a Unix
/// or ICMP datagram socket, which would ignore the control message and send the lot as one
/// datagram) on a kernel that knows `UDP_SEGMENT` (asked with `getsockopt`, which fails
/// before Linux 4.18: there, too, a `sendmsg` skips a control message of a level it does not
/// know, and would merge the datagrams).
#[cfg(target_os = "linux")]
pub(crate) fn can_gso(fd: BorrowedFd<'_>) -> bool {
    use super::socket::get_int_opt;
    let raw = fd.as_raw_fd();
    get_int_opt(raw, libc::SOL_SOCKET, libc::SO_PROTOCOL).is_ok_and(|p| p == libc::IPPROTO_UDP)
        && get_int_opt(raw, libc::SOL_UDP, UDP_SEGMENT).is_ok()
}

/// Whether datagrams of `fd` may go in GSO sends: never, but on Linux.
#[cfg(not(target_os = "linux"))]
pub(crate) fn can_gso(_fd: BorrowedFd<'_>) -> bool {
    false
}

/// The largest segment for which a GSO send's `EMSGSIZE` is surely the socket's own error
/// (an ICMP "fragmentation needed" kept for the next send), not the kernel's check that a
/// segment fits the route's MTU: 1,280 bytes, IPv6's smallest MTU, less 48 bytes of IPv6
/// and UDP headers.
const SURE_SEGMENT: usize = 1232;

/// Whether an error of a GSO send of `segment`-byte datagrams says the socket or its route
/// refuses GSO, rather than something the first of those datagrams would have met alone:
/// `EINVAL` (a socket with `SO_NO_CHECK`), `EIO` (a device without checksum offload, an
/// IPsec route), `EMSGSIZE` for a segment that may be over the route's MTU. The ICMP errors
/// a send reports (`ECONNREFUSED`, `EHOSTUNREACH`, `ENOPROTOOPT`, `EMSGSIZE` for a smaller
/// segment...) are the socket's: the first write of the send fails with them, as it would
/// have without GSO.
pub(crate) fn gso_refused(e: &io::Error, segment: usize) -> bool {
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::EIO) => true,
        Some(libc::EMSGSIZE) => segment > SURE_SEGMENT,
        _ => false,
    }
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn send_headers(
    fd: BorrowedFd<'_>,
    names: &mut [libc::sockaddr_storage],
    name_lens: &[libc::socklen_t],
    iovs: &mut [libc::iovec],
    segs: &[u16],
) -> (usize, Option<io::Error>) {
    let m = names.len();
    // SAFETY: all-zero mmsghdr is valid; each is pointed at its name and iovecs below.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    #[cfg(target_os = "linux")]
    let mut controls = [[0u64; 4]; BATCH];
    // (One raw pointer for all the headers: no later borrow of `iovs` invalidates it.)
    let base = iovs.as_mut_ptr();
    let mut first = 0;
    for i in 0..m {
        let h = &mut hdrs[i].msg_hdr;
        if name_lens[i] > 0 {
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = name_lens[i];
        }
        let k = usize::from(segs[i]);
        assert!(first + k <= iovs.len(), "an iovec for each datagram");
        // SAFETY: in bounds (just checked).
        h.msg_iov = unsafe { base.add(first) };
        h.msg_iovlen = k as _;
        #[cfg(target_os = "linux")]
        if k > 1 {
            // SAFETY: as above.
            let size = unsafe { (*base.add(first)).iov_len };
            segment(h, &mut controls[i], size as u16);
        }
        first += k;
    }
    loop {
        // SAFETY: `hdrs[..m]` point at live names, iovecs, control messages and buffers that
        // outlive the call; the kernel only reads them.
        let r =
            unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), m as _, SEND_FLAGS as _) };
        match super::cvt(r as libc::c_int) {
            Ok(sent) => {
                let sent = segs[..sent as usize].iter().map(|&k| usize::from(k)).sum();
                return (sent, None);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (0, Some(e)),
        }
    }
}

/// Makes `h` a GSO send of segments of `size` bytes: a `UDP_SEGMENT` control message in
/// `control`.
#[cfg(target_os = "linux")]
fn segment(h: &mut libc::msghdr, control: &mut Control, size: u16) {
    let space = std::mem::size_of::<Control>();
    h.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a length.
    let len = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    assert!(len <= space, "room for a UDP_SEGMENT control message");
    h.msg_controllen = len as _;
    // SAFETY: `h` points at `control`, `space` bytes aligned for `cmsghdr` (u64s) and at least
    // `msg_controllen` long, so CMSG_FIRSTHDR is non-null and the header and its `u16` of
    // data (CMSG_LEN(2) bytes from it) lie inside `control`.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
    }
}

#[cfg(any(target_os = "macos", target_os = "ios"))]
fn send_headers(
    fd: BorrowedFd<'_>,
    names: &mut [libc::sockaddr_storage],
    name_lens: &[libc::socklen_t],
    iovs: &mut [libc::iovec],
    segs: &[u16],
) -> (usize, Option<io::Error>) {
    // (No GSO here: every message is one datagram.)
    debug_assert!(segs.iter().all(|&k| k == 1));
    for i in 0..names.len() {
        // SAFETY: all-zero msghdr is valid; it is pointed at the name and iovec below.
        let mut h: libc::msghdr = unsafe { zeroed() };
        if name_lens[i] > 0 {
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = name_lens[i];
        }
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        // SAFETY: `h` points at a live name, iovec and buffer; the kernel only reads them.
        let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &h, SEND_FLAGS) };
        match super::cvt_size(r) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (i, Some(e)),
        }
    }
    (names.len(), None)
}

/// The address the kernel wrote (`len` bytes of it), as a `PeerAddr`.
fn peer_from_raw(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<PeerAddr> {
    // No address at all: a Unix socket's unnamed sender (an IP sender always has one).
    if (len as usize) < size_of::<libc::sa_family_t>() {
        return Some(PeerAddr::UnixUnnamed);
    }
    if storage.ss_family as libc::c_int != libc::AF_UNIX {
        return from_raw(storage).map(PeerAddr::Ip);
    }
    // SAFETY: the kernel wrote a sockaddr_un (family AF_UNIX) into the storage, which is big
    // and aligned enough for it.
    let un = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_un>() };
    let offset = path_offset();
    let len = (len as usize).min(size_of::<libc::sockaddr_un>());
    if len <= offset {
        return Some(PeerAddr::UnixUnnamed);
    }
    // SAFETY: `sun_path` is a C char array; reading it as bytes is fine.
    let path: &[u8] =
        unsafe { std::slice::from_raw_parts(un.sun_path.as_ptr().cast(), len - offset) };
    if path[0] == 0 {
        return Some(PeerAddr::UnixAbstract(path[1..].to_vec()));
    }
    let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
    if end == 0 {
        return Some(PeerAddr::UnixUnnamed);
    }
    Some(PeerAddr::Unix(PathBuf::from(OsStr::from_bytes(
        &path[..end],
    ))))
}

/// Where `sun_path` starts in a `sockaddr_un`.
fn path_offset() -> usize {
    // SAFETY: all-zero sockaddr_un is valid; only the field's address is taken.
    let un: libc::sockaddr_un = unsafe { zeroed() };
    (un.sun_path.as_ptr() as usize) - (&un as *const libc::sockaddr_un as usize)
}

/// `to` as a raw address and its length.
fn peer_to_raw(to: &PeerAddr) -> io::Result<(libc::sockaddr_storage, libc::socklen_t)> {
    let bytes: Vec<u8> = match to {
        PeerAddr::Ip(a) => return Ok(to_raw(a)),
        PeerAddr::Unix(p) => p.as_os_str().as_bytes().to_vec(),
        PeerAddr::UnixAbstract(name) => [&[0u8][..], name].concat(),
        PeerAddr::UnixUnnamed => {
            let msg = "an unnamed Unix socket has no address to send to";
            return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        }
    };
    // SAFETY: all-zero sockaddr_storage is valid and big and aligned enough for a
    // sockaddr_un, a plain struct of integers and chars.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    // SAFETY: as just said.
    let un =
        unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_un>() };
    // A path needs its terminating zero byte; an abstract name does not have one.
    let room = un.sun_path.len() - usize::from(bytes.first() != Some(&0));
    if bytes.len() > room || bytes.is_empty() {
        let msg = "Unix socket path too long (or empty) for sockaddr_un";
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    un.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in un.sun_path.iter_mut().zip(&bytes) {
        *d = s as libc::c_char;
    }
    let mut len = path_offset() + bytes.len();
    if bytes[0] != 0 {
        len += 1; // the terminating zero
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        un.sun_len = len as u8;
    }
    Ok((storage, len as libc::socklen_t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_addresses_round_trip() {
        for addr in [
            PeerAddr::Unix("/tmp/x.sock".into()),
            PeerAddr::UnixAbstract(b"game".to_vec()),
            PeerAddr::Ip("[::1]:9".parse().unwrap()),
            PeerAddr::Ip("127.0.0.1:9".parse().unwrap()),
        ] {
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            if matches!(addr, PeerAddr::UnixAbstract(_)) {
                continue;
            }
            let (storage, len) = peer_to_raw(&addr).unwrap();
            assert_eq!(peer_from_raw(&storage, len), Some(addr));
        }
        assert!(peer_to_raw(&PeerAddr::UnixUnnamed).is_err());
        let long = PeerAddr::Unix(PathBuf::from("/".repeat(200)));
        assert!(peer_to_raw(&long).is_err());
    }

    #[test]
    fn a_gso_send_is_refused_for_the_socket_or_the_route_not_for_icmp_errors() {
        let e = io::Error::from_raw_os_error;
        assert!(gso_refused(&e(libc::EINVAL), 100));
        assert!(gso_refused(&e(libc::EIO), 100));
        // EMSGSIZE: the MTU check only for segments that may not fit a route's MTU.
        assert!(!gso_refused(&e(libc::EMSGSIZE), 1232));
        assert!(gso_refused(&e(libc::EMSGSIZE), 1233));
        for icmp in [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ENOPROTOOPT,
            libc::EOPNOTSUPP,
        ] {
            assert!(!gso_refused(&e(icmp), 100), "{icmp}");
        }
        assert!(!gso_refused(&e(libc::EAGAIN), 100));
    }
}
