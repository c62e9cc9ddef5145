//! The load generator: blocking `std::net` clients for ping-pong rounds and bursts, a
//! non-blocking pump for the stream, and a closed-loop mio client for latency percentiles.
//! Every call is bounded: sockets carry [`IO_TIMEOUT`], loops carry a deadline.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::set_linger_zero;

/// The longest any single connect, read or write may block before the run fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what}: deadline passed"))
}

/// One blocking client connection with `TCP_NODELAY` and [`IO_TIMEOUT`] on reads and writes.
///
/// Connections to a loopback address come from 127.0.0.1 to 127.0.0.4 in turn: with a single
/// source address, Linux runs out of the even half of the ephemeral ports (which `connect`
/// tries first) near 14,000 connections, and each later `connect` then searches the port
/// space for milliseconds: a client cost that would swamp the servers' at 16K connections.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = open(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Source addresses used in turn for loopback connections (see [`connect`]).
const SOURCES: u8 = 4;

#[cfg(target_os = "linux")]
fn open(addr: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let SocketAddr::V4(v4) = addr else {
        return TcpStream::connect_timeout(&addr, IO_TIMEOUT);
    };
    if !v4.ip().is_loopback() {
        return TcpStream::connect_timeout(&addr, IO_TIMEOUT);
    }
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let cvt = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    let one: libc::c_int = 1;
    // The port is picked at connect time, per destination, not reserved by bind.
    // SAFETY: live socket; the option value is a c_int of the length passed.
    cvt(unsafe {
        libc::setsockopt(
            raw,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    // `connect` on a blocking socket gives up after SO_SNDTIMEO.
    let tv = libc::timeval {
        tv_sec: IO_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: live socket; the option value is a timeval of the length passed.
    cvt(unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    let src = std::net::Ipv4Addr::new(127, 0, 0, 1 + NEXT.fetch_add(1, Relaxed) % SOURCES);
    let from = sockaddr(src, 0);
    // SAFETY: live socket; `from` is a sockaddr_in of the length passed.
    cvt(unsafe { libc::bind(raw, (&from as *const libc::sockaddr_in).cast(), len) })?;
    let to = sockaddr(*v4.ip(), v4.port());
    // SAFETY: live socket; `to` is a sockaddr_in of the length passed.
    match cvt(unsafe { libc::connect(raw, (&to as *const libc::sockaddr_in).cast(), len) }) {
        Ok(_) => Ok(TcpStream::from(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Err(timed_out("connect")),
        Err(e) => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn open(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, IO_TIMEOUT)
}

/// `n` connections, opened one after another.
pub fn connect_n(addr: SocketAddr, n: usize) -> io::Result<Vec<TcpStream>> {
    (0..n).map(|_| connect(addr)).collect()
}

/// Closes every connection with a reset (see [`set_linger_zero`]).
pub fn close_all(conns: Vec<TcpStream>) {
    for c in &conns {
        set_linger_zero(c);
    }
    drop(conns);
}

/// A message of `len` bytes with a recognisable pattern.
pub fn message(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// One round: write `msg` on every connection, then read every echo (`buf.len() >= msg.len()`).
pub fn round(conns: &mut [TcpStream], msg: &[u8], buf: &mut [u8]) -> io::Result<()> {
    for c in conns.iter_mut() {
        c.write_all(msg)?;
    }
    let buf = &mut buf[..msg.len()];
    for c in conns.iter_mut() {
        c.read_exact(buf)?;
    }
    Ok(())
}

/// A [`round`] that also checks every echo byte for byte (run once before measuring).
pub fn checked_round(conns: &mut [TcpStream], msg: &[u8]) -> io::Result<()> {
    let mut buf = vec![0u8; msg.len()];
    for c in conns.iter_mut() {
        c.write_all(msg)?;
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.read_exact(&mut buf)?;
        if buf != msg {
            let e = format!("connection {i}: the echo differs from what was sent");
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    Ok(())
}

/// Streams `total` bytes through one connection and reads them all back: writes ahead as far
/// as the socket buffers allow while reading the echo, on one thread (`poll(2)` when neither
/// direction can move): one write attempt of at most `chunk`, then one read into `rbuf`, per
/// turn. The connection is switched to non-blocking mode for good. Returns the write and read
/// calls that moved bytes and the `poll` calls.
pub fn stream(
    conn: &mut TcpStream,
    total: u64,
    chunk: &[u8],
    rbuf: &mut [u8],
) -> io::Result<(u64, u64, u64)> {
    conn.set_nonblocking(true)?;
    let deadline = Instant::now() + IO_TIMEOUT.max(Duration::from_millis(total / 50_000));
    let (mut sent, mut got) = (0u64, 0u64);
    let (mut writes, mut reads, mut polls) = (0, 0, 0);
    while got < total {
        let mut moved = false;
        if sent < total {
            let want = (total - sent).min(chunk.len() as u64) as usize;
            match conn.write(&chunk[..want]) {
                Ok(n) => {
                    sent += n as u64;
                    writes += 1;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match conn.read(rbuf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                got += n as u64;
                reads += 1;
                moved = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if !moved {
            if Instant::now() >= deadline {
                return Err(timed_out("stream"));
            }
            let mut events = libc::POLLIN;
            if sent < total {
                events |= libc::POLLOUT;
            }
            let mut pfd = libc::pollfd {
                fd: conn.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: one live pollfd, count 1.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            polls += 1;
        }
    }
    Ok((writes, reads, polls))
}

/// What [`mio_stream`] measured.
pub struct StreamRun {
    /// Bytes echoed back (all of them, unless the time limit ended the run).
    pub bytes: u64,
    pub wall: Duration,
    /// Write and read calls that moved bytes, and the client's `poll` wake-ups.
    pub writes: u64,
    pub reads: u64,
    pub polls: u64,
}

/// The 64 KiB stream as an independent client writes it (issue 17): one thread, mio
/// edge-triggered, one connection; on every wake-up it writes 64 KiB chunks (`chunk`) as
/// fast as the socket takes them, until `WouldBlock` or `total` bytes are out, and reads the
/// echo into `rbuf` until `WouldBlock`. Ends when `total` bytes came back, or at `limit`.
/// The first chunk's echo is checked byte for byte (the rest are counted).
pub fn mio_stream(
    addr: SocketAddr,
    total: u64,
    chunk: &[u8],
    rbuf: &mut [u8],
    limit: Duration,
) -> io::Result<StreamRun> {
    let mut first = connect(addr)?;
    checked_round(std::slice::from_mut(&mut first), chunk)?;
    first.set_nonblocking(true)?;
    let mut s = mio::net::TcpStream::from_std(first);
    let mut poll = mio::Poll::new()?;
    let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
    poll.registry().register(&mut s, mio::Token(0), interest)?;
    let mut events = mio::Events::with_capacity(8);
    let (mut sent, mut got, mut writes, mut reads, mut polls) = (0u64, 0u64, 0, 0, 0);
    let start = Instant::now();
    let deadline = start + limit;
    while got < total {
        // Write while the socket takes it.
        while sent < total {
            let off = (sent % chunk.len() as u64) as usize;
            let want = (chunk.len() - off).min((total - sent) as usize);
            match s.write(&chunk[off..off + want]) {
                Ok(n) => {
                    sent += n as u64;
                    writes += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Read the echo until drained.
        loop {
            match s.read(rbuf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    got += n as u64;
                    reads += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if got >= total {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        poll.poll(&mut events, Some(deadline - now))?;
        polls += 1;
    }
    let wall = start.elapsed();
    set_linger_zero(&s);
    Ok(StreamRun {
        bytes: got,
        wall,
        writes,
        reads,
        polls,
    })
}

/// Per-round-trip latencies, in nanoseconds, of a closed loop: each of `conns` connections
/// always has exactly one `size`-byte request in flight and sends the next as soon as the echo
/// is complete, until it has done `warmup + rounds` round trips (the first `warmup` are not
/// recorded) or `limit` passes. One thread, mio edge-triggered. Returns the recorded latencies,
/// the round trips done in all, and the wall time they took.
pub fn closed_loop_latency(
    addr: SocketAddr,
    conns: usize,
    size: usize,
    warmup: usize,
    rounds: usize,
    limit: Duration,
) -> io::Result<(Vec<u64>, usize, Duration)> {
    struct C {
        s: mio::net::TcpStream,
        sent_at: Instant,
        wrote: usize,
        got: usize,
        done: usize,
    }
    let msg = message(size);
    let mut poll = mio::Poll::new()?;
    let mut cs = Vec::with_capacity(conns);
    for i in 0..conns {
        let std = connect(addr)?;
        std.set_nonblocking(true)?;
        let mut s = mio::net::TcpStream::from_std(std);
        let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
        poll.registry().register(&mut s, mio::Token(i), interest)?;
        cs.push(C {
            s,
            sent_at: Instant::now(),
            wrote: 0,
            got: 0,
            done: 0,
        });
    }
    let total = conns * (warmup + rounds);
    let mut lat = Vec::with_capacity(conns * rounds);
    let mut rbuf = vec![0u8; 64 * 1024];
    let mut events = mio::Events::with_capacity(1024);
    let start = Instant::now();
    let deadline = start + limit;
    let mut finished = 0usize;
    // Sends (the rest of) the current request; `Err` closes the run.
    let push = |c: &mut C| -> io::Result<()> {
        while c.wrote < msg.len() {
            match c.s.write(&msg[c.wrote..]) {
                Ok(n) => c.wrote += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    for c in cs.iter_mut() {
        c.sent_at = Instant::now();
        push(c)?;
    }
    while finished < total {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        poll.poll(&mut events, Some(deadline - now))?;
        for ev in events.iter() {
            let c = &mut cs[ev.token().0];
            push(c)?;
            loop {
                match c.s.read(&mut rbuf) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => c.got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                if c.got >= msg.len() {
                    // The server echoes exactly what it got: more than one message is a bug.
                    if c.got > msg.len() {
                        return Err(io::Error::other("echo longer than the request"));
                    }
                    let now = Instant::now();
                    if c.done >= warmup {
                        lat.push(now.duration_since(c.sent_at).as_nanos() as u64);
                    }
                    c.done += 1;
                    finished += 1;
                    c.got = 0;
                    c.wrote = 0;
                    if c.done < warmup + rounds {
                        c.sent_at = now;
                        push(c)?;
                    }
                }
            }
        }
    }
    let wall = start.elapsed();
    for c in &cs {
        set_linger_zero(&c.s);
    }
    Ok((lat, finished, wall))
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
