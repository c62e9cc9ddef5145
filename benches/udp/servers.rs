//! The UDP echo servers, each run as this bench's binary re-executed with
//! `PROACTOR_BENCH_ROLE=udp-server` and `PROACTOR_BENCH_KIND=NAME`, in a process pinned to
//! one CPU. Each binds one unconnected `UdpSocket` (`--addr`, its `SO_RCVBUF` set to
//! `--rcvbuf` bytes, the same for all), prints `listening on HOST:PORT`, and answers every
//! datagram with the same bytes to its sender until it is killed.
//!
//! - `proactor-uring`, `proactor-epoll`: an inline watcher (`WatcherBuilder::inline`: the
//!   poller runs in `wait_io` on the one thread) on io_uring or epoll. [`READS`]
//!   `Cmd::ReadInternal`s are sent up front and one more per datagram received, so the
//!   poller always has reads to fill (one `recvmmsg` fills up to 32); each datagram is
//!   answered with `Cmd::SendTo(peer, c.into_data())` (the arena's bytes, no copy), which
//!   the poller sends in `sendmmsg` batches. Completions come in batches (`wait_io`).
//!   UDP GSO is on (the default): echoes to one peer queued back to back leave as one send.
//! - `proactor-uring-nogso`, `proactor-epoll-nogso`: the same with
//!   `WatcherBuilder::udp_gso(false)`.
//! - `proactor-uring-threaded`, `proactor-epoll-threaded`: the same loop on a threaded
//!   watcher (the default: a poller thread of its own, which shares the CPU with the loop).
//! - `tokio`: a `tokio::net::UdpSocket` `recv_from` / `send_to` loop with a 64 KiB buffer in
//!   a spawned task on tokio's default runtime (`Runtime::new()`, what `#[tokio::main]`
//!   builds: one worker thread in a process pinned to one CPU). In a task, not in
//!   `block_on` on the main thread: there the loop would run on the main thread and every
//!   wake-up go through the worker, a thread hand-off per datagram.
//! - `std`: a blocking `std::net::UdpSocket` `recv_from` / `send_to` loop on one thread.
//! - `mmsg`: a hand-written loop on one thread, the near-limit reference: a blocking
//!   `recvmmsg` of up to 32 datagrams (`MSG_WAITFORONE`: it waits for the first only), then
//!   one `sendmmsg` of all of them back to their senders. Two system calls per batch.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

use proactor::{Cmd, Engine, Error, Op, Watcher};

/// The servers, by name.
pub const ALL: [&str; 9] = [
    "proactor-uring",
    "proactor-epoll",
    "proactor-uring-nogso",
    "proactor-epoll-nogso",
    "proactor-uring-threaded",
    "proactor-epoll-threaded",
    "tokio",
    "std",
    "mmsg",
];

/// `ReadInternal`s the proactor servers keep outstanding (`PROACTOR_BENCH_UDP_READS`).
pub const READS: usize = 64;
/// The largest UDP payload fits (tokio's, std's and mmsg's buffers).
const BUF: usize = 64 * 1024;
/// Datagrams per `recvmmsg` / `sendmmsg` of the mmsg server (the proactor's batch too).
const MMSG_BATCH: usize = 32;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Binds the server's socket and sets its receive buffer; returns it and says where it
/// listens (the first line the orchestrator reads).
fn bind(addr: &str, rcvbuf: usize) -> io::Result<UdpSocket> {
    let sock = UdpSocket::bind(addr)?;
    let v = rcvbuf.min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: `sock` is a live socket; the value is a c_int of the length passed.
    cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(sock)
}

fn announce(sock: &UdpSocket) -> io::Result<()> {
    // (stdout is line-buffered: the line goes out at its newline.)
    println!("listening on {}", sock.local_addr()?);
    Ok(())
}

/// Runs server `kind` on `addr` until the process is killed (or an error).
pub fn serve(kind: &str, addr: &str, rcvbuf: usize) -> io::Result<()> {
    let sock = bind(addr, rcvbuf)?;
    match kind {
        "proactor-uring" => proactor(sock, Engine::Uring, true, true),
        "proactor-epoll" => proactor(sock, Engine::Readiness, true, true),
        "proactor-uring-nogso" => proactor(sock, Engine::Uring, true, false),
        "proactor-epoll-nogso" => proactor(sock, Engine::Readiness, true, false),
        "proactor-uring-threaded" => proactor(sock, Engine::Uring, false, true),
        "proactor-epoll-threaded" => proactor(sock, Engine::Readiness, false, true),
        "tokio" => tokio_server(sock),
        "std" => std_server(sock),
        "mmsg" => mmsg_server(sock),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no UDP server named {kind:?} (servers: {})", ALL.join(",")),
        )),
    }
}

fn reads() -> usize {
    super::bench_servers::env_usize("PROACTOR_BENCH_UDP_READS")
        .unwrap_or(READS)
        .max(1)
}

fn proactor(sock: UdpSocket, engine: Engine, inline: bool, gso: bool) -> io::Result<()> {
    let watcher = Watcher::builder()
        .engine(engine)
        .inline(inline)
        .udp_gso(gso)
        .build()?;
    let local = sock.local_addr()?;
    let conn = watcher
        .register(sock)
        .map_err(|e| io::Error::other(e.to_string()))?;
    for _ in 0..reads() {
        conn.send(Cmd::ReadInternal).map_err(io::Error::other)?;
    }
    println!("listening on {local}");
    let mut batch = Vec::with_capacity(1024);
    let (mut truncated, mut failed) = (0u64, 0u64);
    loop {
        watcher.wait_io(&mut batch).map_err(io::Error::other)?;
        for mut c in batch.drain(..) {
            match (c.op, &c.result) {
                (Op::Read, Ok(())) => {
                    let peer = c.peer.take().expect("a datagram read has a sender");
                    // Another read first, so the poller has as many to fill next time.
                    conn.send(Cmd::ReadInternal).map_err(io::Error::other)?;
                    conn.send(Cmd::SendTo(peer, c.into_data()))
                        .map_err(io::Error::other)?;
                }
                (Op::Read, Err(Error::Truncated { .. })) => {
                    truncated += 1;
                    if truncated == 1 {
                        eprintln!("a datagram was truncated: {:?}", c.result);
                    }
                    conn.send(Cmd::ReadInternal).map_err(io::Error::other)?;
                }
                (_, Ok(())) => {} // a datagram sent
                (op, Err(e)) => {
                    // An ICMP error of an earlier send, say: this datagram's outcome only.
                    failed += 1;
                    if failed == 1 {
                        eprintln!("{op:?} failed: {e}");
                    }
                    if op == Op::Read {
                        conn.send(Cmd::ReadInternal).map_err(io::Error::other)?;
                    }
                }
            }
        }
    }
}

fn tokio_server(sock: UdpSocket) -> io::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let local = sock.local_addr()?;
    sock.set_nonblocking(true)?;
    let sock = {
        let _guard = rt.enter();
        tokio::net::UdpSocket::from_std(sock)?
    };
    let serve = async move {
        let mut buf = vec![0u8; BUF];
        let mut failed = 0u64;
        loop {
            let (n, from) = match sock.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    failed += 1;
                    if failed == 1 {
                        eprintln!("recv_from: {e}");
                    }
                    continue;
                }
            };
            if let Err(e) = sock.send_to(&buf[..n], from).await {
                failed += 1;
                if failed == 1 {
                    eprintln!("send_to: {e}");
                }
            }
        }
    };
    println!("listening on {local}");
    rt.block_on(rt.spawn(serve)).map_err(io::Error::other)
}

fn std_server(sock: UdpSocket) -> io::Result<()> {
    announce(&sock)?;
    let mut buf = vec![0u8; BUF];
    let mut failed = 0u64;
    loop {
        let r = sock
            .recv_from(&mut buf)
            .and_then(|(n, from)| sock.send_to(&buf[..n], from));
        if let Err(e) = r {
            failed += 1;
            if failed == 1 {
                eprintln!("std: {e}");
            }
        }
    }
}

fn mmsg_server(sock: UdpSocket) -> io::Result<()> {
    announce(&sock)?;
    let fd = sock.as_raw_fd();
    let mut bufs = vec![0u8; MMSG_BATCH * BUF];
    // SAFETY: all-zero sockaddr_storage, iovec and mmsghdr are valid; they are filled in
    // below before use.
    let mut names: [libc::sockaddr_storage; MMSG_BATCH] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; MMSG_BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; MMSG_BATCH] = unsafe { zeroed() };
    let mut failed = 0u64;
    loop {
        for i in 0..MMSG_BATCH {
            iovs[i].iov_base = bufs[i * BUF..].as_mut_ptr().cast();
            iovs[i].iov_len = BUF;
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
        }
        // SAFETY: every header points at its own name, iovec and `BUF` bytes of `bufs`, all
        // live for the call. Blocks for the first datagram only (MSG_WAITFORONE).
        let r = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                MMSG_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                failed += 1;
                if failed == 1 {
                    eprintln!("recvmmsg: {e}");
                }
            }
            continue;
        }
        let got = r as usize;
        // The same headers send each datagram back: its length, its sender's address (the
        // name and length the kernel wrote).
        for i in 0..got {
            iovs[i].iov_len = hdrs[i].msg_len as usize;
        }
        let mut done = 0;
        while done < got {
            // SAFETY: as above; the kernel reads `got - done` headers from `done` on.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    hdrs[done..].as_mut_ptr(),
                    (got - done) as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                failed += 1;
                if failed == 1 {
                    eprintln!("sendmmsg: {e}");
                }
                done += 1; // this datagram's error; the next go on
            } else {
                done += r as usize;
            }
        }
    }
}
