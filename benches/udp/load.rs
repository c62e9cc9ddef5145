//! The UDP load generator: one thread, many client sockets, each keeping a window of
//! datagrams in flight (closed loop: every echo received sends the next datagram), every echo
//! checked.
//!
//! Each client socket is bound to `127.0.0.1:0` and connected to the server, non-blocking,
//! in one edge-triggered epoll set. A readable socket is read with `recvmmsg` (up to
//! [`BATCH`] datagrams a call, until a call returns fewer than it asked for: the queue was
//! empty, and a new datagram is a new edge), and the datagrams it got are replaced with as
//! many new ones in one `sendmmsg`.
//!
//! Every datagram is `size` bytes: a 16-byte header (the socket's index, [`MAGIC`], the
//! sequence number, little-endian) and a body cut from a fixed pseudo-random template at an
//! offset given by the sequence number. An echo must be exactly `size` bytes, carry this
//! socket's index and the magic, a sequence number this socket sent and has not had back
//! yet, and the body that number gives; anything else is an error, counted and reported
//! (the first few in full), and fails the run.
//!
//! Losses: a datagram not back after [`LOSS_TIMEOUT`] counts as lost, and a new one takes
//! its place in the window, so a loss does not stall the loop. One that comes back after all
//! counts as late (and no longer lost). At the end the generator stops sending and waits for
//! every datagram still in flight (at most [`DRAIN`]); what is still out then is lost too.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Datagrams one `recvmmsg` or `sendmmsg` of the generator moves at most.
pub const BATCH: usize = 32;
/// The second word of every datagram's header.
pub const MAGIC: u32 = 0x5544_5042; // "UDPB"
/// Header bytes: socket index (u32), magic (u32), sequence number (u64).
pub const HEADER: usize = 16;
/// A datagram not echoed within this time counts as lost.
pub const LOSS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the generator waits at the end for the datagrams still in flight.
pub const DRAIN: Duration = Duration::from_secs(2);
/// How long the loop may go without receiving anything before the run fails.
pub const STALL: Duration = Duration::from_secs(5);
/// Errors kept in full (the rest are only counted).
const KEEP_ERRORS: usize = 5;
/// Sequence-number offsets into the template (a prime, so neighbours differ).
const OFFSETS: usize = 251;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

struct Client {
    sock: UdpSocket,
    /// The next sequence number to send.
    next_seq: u64,
    /// Datagrams in flight, oldest first: sequence number and (loop) time sent.
    out: VecDeque<(u64, Instant)>,
    /// Datagrams counted as lost that may still come back.
    lost: HashSet<u64>,
    /// Datagrams owed to the window (a send that found no room, or a loss).
    owed: usize,
}

/// Counters of one generator, since it was made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub sent: u64,
    pub echoed: u64,
    /// Datagrams not back within the loss timeout (or by the end of the drain), less the
    /// late ones.
    pub lost: u64,
    /// Datagrams that came back after they were counted as lost.
    pub late: u64,
    /// Echoes that came back ahead of an older datagram of the same socket.
    pub reordered: u64,
    /// Echoes that failed a check.
    pub bad: u64,
    /// Sends that found no room in the socket (`EAGAIN`) and were retried.
    pub send_blocked: u64,
}

pub struct Gen {
    clients: Vec<Client>,
    ep: OwnedFd,
    size: usize,
    window: usize,
    /// The body's source: datagram `seq` carries `template[seq % OFFSETS..][..size - HEADER]`.
    template: Vec<u8>,
    /// Receive buffers (`BATCH` of `size + 1`: a longer echo shows as one).
    rbuf: Vec<u8>,
    /// Send buffers (`BATCH` of `size`).
    sbuf: Vec<u8>,
    /// Clients owing datagrams to their window.
    owing: Vec<usize>,
    pub counts: Counts,
    pub errors: Vec<String>,
    /// Whether echoes are answered with new datagrams (off for the final drain).
    sending: bool,
    now: Instant,
    last_scan: Instant,
    last_rx: Instant,
}

impl Gen {
    /// `sockets` client sockets connected to `server`, each to keep `window` datagrams of
    /// `size` bytes in flight. Nothing is sent yet.
    pub fn new(server: SocketAddr, sockets: usize, window: usize, size: usize) -> io::Result<Gen> {
        if size < HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("datagrams of {size} bytes: at least {HEADER} needed"),
            ));
        }
        // SAFETY: epoll_create1 has no memory effects; the fd it returns is owned below.
        let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `ep` is a new descriptor that nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut clients = Vec::with_capacity(sockets);
        for i in 0..sockets {
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            sock.connect(server)?;
            sock.set_nonblocking(true)?;
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: i as u64,
            };
            // SAFETY: both descriptors are live; `ev` is a valid epoll_event.
            cvt(unsafe {
                libc::epoll_ctl(
                    ep.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    sock.as_raw_fd(),
                    &mut ev,
                )
            })?;
            clients.push(Client {
                sock,
                next_seq: 0,
                out: VecDeque::with_capacity(window),
                lost: HashSet::new(),
                owed: 0,
            });
        }
        // xorshift: any fixed bytes that are not all alike will do.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let template = (0..size + OFFSETS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let now = Instant::now();
        Ok(Gen {
            clients,
            ep,
            size,
            window,
            template,
            rbuf: vec![0; BATCH * (size + 1)],
            sbuf: vec![0; BATCH * size],
            owing: Vec::new(),
            counts: Counts::default(),
            errors: Vec::new(),
            sending: true,
            now,
            last_scan: now,
            last_rx: now,
        })
    }

    /// Datagrams in flight now.
    pub fn in_flight(&self) -> usize {
        self.clients.iter().map(|c| c.out.len()).sum()
    }

    fn error(&mut self, e: String) {
        self.counts.bad += 1;
        if self.errors.len() < KEEP_ERRORS {
            self.errors.push(e);
        }
    }

    /// Sends each client's whole window.
    pub fn start(&mut self) -> Result<(), String> {
        self.now = Instant::now();
        self.last_rx = self.now;
        self.sending = true;
        for i in 0..self.clients.len() {
            self.clients[i].owed += self.window;
            self.owing.push(i);
        }
        self.pay_owed()
    }

    /// Runs the closed loop until `until`.
    pub fn run_until(&mut self, until: Instant) -> Result<(), String> {
        while self.now < until {
            self.turn(until)?;
        }
        Ok(())
    }

    /// Stops sending and waits (at most [`DRAIN`]) for every datagram in flight; what is not
    /// back by then counts as lost.
    pub fn drain(&mut self) -> Result<(), String> {
        self.sending = false;
        let end = Instant::now() + DRAIN;
        while self.in_flight() > 0 && self.now < end {
            self.turn(end)?;
        }
        for c in &mut self.clients {
            self.counts.lost += c.out.len() as u64;
            c.out.clear();
        }
        Ok(())
    }

    /// One `epoll_wait` and the sockets it says are readable, the loss scan every 100 ms,
    /// and the datagrams owed.
    fn turn(&mut self, until: Instant) -> Result<(), String> {
        // SAFETY: all-zero epoll_events are valid, and are overwritten by the kernel.
        let mut events: [libc::epoll_event; 256] = unsafe { zeroed() };
        let wait_ms = until
            .saturating_duration_since(self.now)
            .as_millis()
            .clamp(0, 10) as libc::c_int;
        // SAFETY: `events` is a live array of the length passed.
        let n = unsafe {
            libc::epoll_wait(
                self.ep.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                wait_ms,
            )
        };
        self.now = Instant::now();
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(format!("epoll_wait: {e}"));
            }
        }
        for ev in events.iter().take(n.max(0) as usize) {
            let i = ev.u64 as usize;
            self.receive(i)?;
        }
        if self.now.duration_since(self.last_scan) >= Duration::from_millis(100) {
            self.last_scan = self.now;
            self.scan_losses();
            if self.in_flight() > 0 && self.now.duration_since(self.last_rx) > STALL {
                return Err(format!(
                    "nothing received for {} s with {} datagrams in flight",
                    STALL.as_secs(),
                    self.in_flight()
                ));
            }
        }
        self.pay_owed()
    }

    /// Reads everything socket `i` has, checks it, and owes as many new datagrams.
    fn receive(&mut self, i: usize) -> Result<(), String> {
        let slot = self.size + 1;
        loop {
            // SAFETY: all-zero iovec and mmsghdr are valid; they are pointed at the buffers
            // below.
            let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
            let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
            for (k, (iov, h)) in iovs.iter_mut().zip(hdrs.iter_mut()).enumerate() {
                iov.iov_base = self.rbuf[k * slot..].as_mut_ptr().cast();
                iov.iov_len = slot;
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
            }
            let fd = self.clients[i].sock.as_raw_fd();
            // SAFETY: each header points at its own iovec, which points at `slot` bytes of
            // `rbuf`; all outlive the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    // The server is gone (an ICMP port unreachable came back).
                    _ => Err(format!("client socket {i}: recvmmsg: {e}")),
                };
            }
            let got = r as usize;
            self.last_rx = self.now;
            for (k, h) in hdrs.iter().enumerate().take(got) {
                let len = h.msg_len as usize;
                let trunc = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                self.check(i, k * slot, len, trunc);
            }
            if got < BATCH {
                return Ok(());
            }
        }
    }

    /// Checks one echo of socket `i`, `len` bytes at `rbuf[at..]`.
    fn check(&mut self, i: usize, at: usize, len: usize, trunc: bool) {
        let size = self.size;
        if len != size || trunc {
            return self.error(format!(
                "socket {i}: an echo of {len} bytes{} where {size} were sent",
                if trunc { " (or more)" } else { "" }
            ));
        }
        let d = &self.rbuf[at..at + size];
        let idx = u32::from_le_bytes(d[0..4].try_into().expect("4 bytes"));
        let magic = u32::from_le_bytes(d[4..8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(d[8..16].try_into().expect("8 bytes"));
        if idx as usize != i || magic != MAGIC {
            return self.error(format!(
                "socket {i}: an echo with socket index {idx} and magic {magic:#x}: not a \
                 datagram this socket sent"
            ));
        }
        let off = (seq % OFFSETS as u64) as usize;
        if d[HEADER..] != self.template[off..off + size - HEADER] {
            return self.error(format!(
                "socket {i}: the echo of datagram {seq} has a body that is not the one sent"
            ));
        }
        let c = &mut self.clients[i];
        if c.out.front().map(|&(s, _)| s) == Some(seq) {
            c.out.pop_front();
        } else if let Some(pos) = c.out.iter().position(|&(s, _)| s == seq) {
            c.out.remove(pos);
            self.counts.reordered += 1;
        } else if c.lost.remove(&seq) {
            // Counted as lost, then came back: no datagram is owed for it (its replacement
            // went out when it was counted lost).
            self.counts.lost -= 1;
            self.counts.late += 1;
            self.counts.echoed += 1;
            return;
        } else {
            let what = if seq < c.next_seq {
                "a second time"
            } else {
                "but was never sent"
            };
            return self.error(format!("socket {i}: datagram {seq} came back {what}"));
        }
        self.counts.echoed += 1;
        if self.sending {
            if c.owed == 0 {
                self.owing.push(i);
            }
            c.owed += 1;
        }
    }

    /// Counts the datagrams out for longer than the loss timeout as lost, and owes their
    /// replacements.
    fn scan_losses(&mut self) {
        let now = self.now;
        for (i, c) in self.clients.iter_mut().enumerate() {
            while let Some(&(seq, at)) = c.out.front() {
                if now.duration_since(at) < LOSS_TIMEOUT {
                    break;
                }
                c.out.pop_front();
                c.lost.insert(seq);
                self.counts.lost += 1;
                if self.sending {
                    if c.owed == 0 {
                        self.owing.push(i);
                    }
                    c.owed += 1;
                }
            }
        }
    }

    /// Sends what each owing client owes, `sendmmsg` batches; a client whose socket has no
    /// room stays owing until the next turn.
    fn pay_owed(&mut self) -> Result<(), String> {
        let mut still = Vec::new();
        let owing = std::mem::take(&mut self.owing);
        for &i in &owing {
            while self.clients[i].owed > 0 {
                let n = self.clients[i].owed.min(BATCH);
                match self.send(i, n) {
                    Ok(sent) => {
                        self.clients[i].owed -= sent;
                        if sent < n {
                            self.counts.send_blocked += 1;
                            still.push(i);
                            break;
                        }
                    }
                    Err(e) => return Err(format!("client socket {i}: sendmmsg: {e}")),
                }
            }
        }
        self.owing = owing;
        self.owing.clear();
        self.owing.extend(still);
        Ok(())
    }

    /// Sends up to `n` new datagrams on socket `i`: how many went.
    fn send(&mut self, i: usize, n: usize) -> io::Result<usize> {
        let size = self.size;
        let first = self.clients[i].next_seq;
        for k in 0..n {
            let seq = first + k as u64;
            let d = &mut self.sbuf[k * size..(k + 1) * size];
            d[0..4].copy_from_slice(&(i as u32).to_le_bytes());
            d[4..8].copy_from_slice(&MAGIC.to_le_bytes());
            d[8..16].copy_from_slice(&seq.to_le_bytes());
            let off = (seq % OFFSETS as u64) as usize;
            d[HEADER..].copy_from_slice(&self.template[off..off + size - HEADER]);
        }
        // SAFETY: all-zero iovec and mmsghdr are valid; they are pointed at `sbuf` below.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (k, (iov, h)) in iovs.iter_mut().zip(hdrs.iter_mut()).enumerate().take(n) {
            iov.iov_base = self.sbuf[k * size..].as_mut_ptr().cast();
            iov.iov_len = size;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        let fd: RawFd = self.clients[i].sock.as_raw_fd();
        let sent = loop {
            // SAFETY: the first `n` headers point at their iovecs and `size` bytes of `sbuf`
            // each; all outlive the call. The socket is connected: no address.
            let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, 0) };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break 0,
                _ => return Err(e),
            }
        };
        let c = &mut self.clients[i];
        c.next_seq += sent as u64;
        for k in 0..sent {
            c.out.push_back((first + k as u64, self.now));
        }
        self.counts.sent += sent as u64;
        Ok(sent)
    }
}

/// The kernel's UDP counters (`/proc/net/snmp`, the `Udp:` lines), by name.
pub fn udp_snmp() -> Vec<(String, u64)> {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect()
}

/// `name` in a snapshot of [`udp_snmp`] (0 if absent).
pub fn snmp_get(snap: &[(String, u64)], name: &str) -> u64 {
    snap.iter().find(|(n, _)| n == name).map_or(0, |&(_, v)| v)
}

/// The size of `sock`'s receive buffer as the kernel has it (`SO_RCVBUF`: twice what was
/// asked, for its bookkeeping).
#[allow(dead_code)]
pub fn rcvbuf(sock: &impl AsRawFd) -> io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live and of the sizes said.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(v as usize)
}
