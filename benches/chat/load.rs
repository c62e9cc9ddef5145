//! The chat load generator: one thread, non-blocking mio sockets (edge-triggered), every
//! client in one poll loop. It checks every line a client receives:
//!
//! - the first line is `* welcome guest<N>`, and clients are numbered in the order they
//!   connected;
//! - `* guest<N> joined` lines name only clients that joined later, in the order they joined,
//!   and each client gets exactly one per later client;
//! - a chat line `guest<N>: TEXT` comes from another client (never the receiver itself), its
//!   text is one the sender sent (its length and padding), and its sequence number is the
//!   next one expected from that sender at that receiver: a line missing, duplicated or out of
//!   order stops the run with an error that says which;
//! - no `* ... left` line and no other line arrives;
//! - at the end, every receiver has every other client's lines, each exactly once.
//!
//! Every line a client sends is [`LINE`] bytes: `SSSSSSSS TTTTTTTTTTTTTTTT xxx...x\n`, its
//! sequence number (decimal) and its send time (hex nanoseconds since the generator started,
//! on its monotonic clock), padded with `x`. Every wait is bounded: a run with no progress
//! for [`STALL`] (or past its overall limit) fails with an error.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Bytes of each line a client sends, its `\n` included.
pub const LINE: usize = 64;
/// The text of a line: without its `\n`.
const TEXT: usize = LINE - 1;
/// How long the load may go without receiving a line before the run fails.
pub const STALL: Duration = Duration::from_secs(10);
/// A longer line from the server than this is an error (the contract's lines are short).
const MAX_SERVER_LINE: usize = 64 * 1024;

struct Client {
    s: mio::net::TcpStream,
    /// An unfinished line from the server.
    partial: Vec<u8>,
    /// Bytes to send; `out[out_pos..]` not yet taken by the socket.
    out: Vec<u8>,
    out_pos: usize,
}

/// What has been received, and what is expected next.
struct Check {
    /// Room for this many clients.
    cap: usize,
    /// Per client: its guest number (0 until its welcome).
    guest: Vec<u64>,
    /// Client index by guest number (`u32::MAX`: none).
    by_guest: Vec<u32>,
    /// Per client: `joined` lines received, and the guest number of the last one.
    joined: Vec<u64>,
    last_joined: Vec<u64>,
    joined_total: u64,
    /// `next[r * cap + s]`: the sequence number receiver `r` expects next from sender `s`.
    next: Vec<u32>,
    /// Per sender: lines sent (sequence numbers 0..sent).
    sent: Vec<u32>,
    deliveries: u64,
    /// Delivery latencies in nanoseconds, when recorded.
    latencies: Option<Vec<u64>>,
    /// When the last line arrived.
    last_line: Instant,
}

pub struct Gen {
    addr: SocketAddr,
    poll: mio::Poll,
    events: mio::Events,
    ready: Vec<(usize, bool, bool)>,
    clients: Vec<Client>,
    check: Check,
    rbuf: Vec<u8>,
    epoch: Instant,
    quickack: bool,
}

/// The join phase's figures.
pub struct Joined {
    pub lines: u64,
    pub wall: Duration,
}

/// A burst's or a trickle's figures.
pub struct Delivered {
    pub deliveries: u64,
    /// From the first send to the last delivery.
    pub wall: Duration,
    /// Sorted delivery latencies in nanoseconds (the trickle only).
    pub latencies: Vec<u64>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Gen {
    /// A generator for up to `cap` clients of the server at `addr`; `latencies`: record the
    /// latency of every delivery; `quickack`: set `TCP_QUICKACK` after every read, so the
    /// clients acknowledge at once instead of delaying their ACKs.
    pub fn new(addr: SocketAddr, cap: usize, latencies: bool, quickack: bool) -> io::Result<Gen> {
        Ok(Gen {
            addr,
            poll: mio::Poll::new()?,
            events: mio::Events::with_capacity(1024),
            ready: Vec::with_capacity(1024),
            clients: Vec::with_capacity(cap),
            check: Check {
                cap,
                guest: vec![0; cap],
                by_guest: Vec::new(),
                joined: vec![0; cap],
                last_joined: vec![0; cap],
                joined_total: 0,
                next: vec![0; cap * cap],
                sent: vec![0; cap],
                deliveries: 0,
                latencies: latencies.then(Vec::new),
                last_line: Instant::now(),
            },
            rbuf: vec![0; 64 * 1024],
            epoch: Instant::now(),
            quickack,
        })
    }

    fn ns(&self, t: Instant) -> u64 {
        t.duration_since(self.epoch).as_nanos() as u64
    }

    /// Connects `n` clients one after another, each once the one before has its welcome (the
    /// join storm), then waits for every `joined` line: `n * (n - 1) / 2` of them.
    pub fn join(&mut self, n: usize, limit: Duration) -> Result<Joined, String> {
        assert!(n <= self.check.cap && self.clients.is_empty());
        let start = Instant::now();
        let end = start + limit;
        for i in 0..n {
            let mut s = mio::net::TcpStream::connect(self.addr)
                .map_err(|e| format!("client {i}: connect: {e}"))?;
            s.set_nodelay(true)
                .map_err(|e| format!("client {i}: TCP_NODELAY: {e}"))?;
            let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
            self.poll
                .registry()
                .register(&mut s, mio::Token(i), interest)
                .map_err(|e| format!("client {i}: register: {e}"))?;
            self.clients.push(Client {
                s,
                partial: Vec::new(),
                out: Vec::new(),
                out_pos: 0,
            });
            self.check.last_line = Instant::now();
            self.wait(&format!("client {i}'s welcome"), end, |c| c.guest[i] != 0)?;
            if i > 0 && self.check.guest[i] <= self.check.guest[i - 1] {
                return Err(format!(
                    "client {i} is guest{} but joined after guest{}: not numbered in order",
                    self.check.guest[i],
                    self.check.guest[i - 1]
                ));
            }
        }
        let want = (n * n.saturating_sub(1) / 2) as u64;
        self.wait("the joined lines", end, |c| c.joined_total >= want)?;
        let wall = start.elapsed();
        // Each client was told of every later one, and of no one else.
        for i in 0..n {
            let (got, want) = (self.check.joined[i], (n - 1 - i) as u64);
            if got != want {
                return Err(format!(
                    "{}: {got} joined lines, expected {want}",
                    self.check.who(i)
                ));
            }
        }
        Ok(Joined {
            lines: self.check.joined_total,
            wall,
        })
    }

    /// Queues line `seq` of client `s`, stamped `now`.
    fn queue_line(&mut self, s: usize, seq: u32, now: Instant) {
        let ts = self.ns(now);
        let c = &mut self.clients[s];
        let start = c.out.len();
        // 8 + 1 + 16 + 1 = 26 bytes, then `x` up to TEXT, then `\n`.
        let _ = write!(c.out, "{seq:08} {ts:016x} ");
        c.out.resize(start + TEXT, b'x');
        c.out.push(b'\n');
        debug_assert_eq!(c.out.len() - start, LINE);
        self.check.sent[s] = seq + 1;
    }

    /// Every client sends `k` lines as fast as its socket takes them while every client
    /// reads everything; returns when every line has reached every other client.
    pub fn burst(&mut self, k: usize, limit: Duration) -> Result<Delivered, String> {
        let n = self.clients.len();
        let now = Instant::now();
        for s in 0..n {
            for seq in 0..k {
                self.queue_line(s, seq as u32, now);
            }
        }
        let want = (n * n.saturating_sub(1) * k) as u64;
        let before = self.check.deliveries;
        let start = Instant::now();
        self.check.last_line = start;
        for s in 0..n {
            self.write(s)?;
        }
        let end = start + limit;
        while self.check.deliveries - before < want {
            if Instant::now() >= end {
                return Err(self.stalled("the burst", want, before, "over its time limit"));
            }
            if self.check.last_line.elapsed() > STALL {
                return Err(self.stalled("the burst", want, before, "no line for 10 s"));
            }
            self.step(Duration::from_millis(50))?;
        }
        let wall = start.elapsed();
        self.settle()?;
        self.final_check(k as u32)?;
        Ok(Delivered {
            deliveries: self.check.deliveries - before,
            wall,
            latencies: Vec::new(),
        })
    }

    /// Every client sends one line every `period` for `lines` lines, the clients staggered
    /// evenly over the period (so a line leaves every `period / n`); returns when every line
    /// has reached every other client, with every delivery's latency.
    pub fn trickle(&mut self, period: Duration, lines: usize) -> Result<Delivered, String> {
        let n = self.clients.len();
        let total = n * lines;
        let gap = period / n.max(1) as u32;
        let want = (n * n.saturating_sub(1) * lines) as u64;
        let before = self.check.deliveries;
        if let Some(l) = self.check.latencies.as_mut() {
            l.clear();
            l.reserve(want as usize);
        }
        let start = Instant::now();
        let end = start + period * lines as u32 + Duration::from_secs(60);
        self.check.last_line = start;
        let mut j = 0usize; // sends done; send j is client j % n's line j / n, due at j * gap
        loop {
            let now = Instant::now();
            while j < total && start + gap * j as u32 <= now {
                let s = j % n;
                self.queue_line(s, (j / n) as u32, now);
                self.write(s)?;
                j += 1;
            }
            if j == total && self.check.deliveries - before >= want {
                break;
            }
            if now >= end {
                return Err(self.stalled("the trickle", want, before, "over its time limit"));
            }
            if j == total && self.check.last_line.elapsed() > STALL {
                return Err(self.stalled("the trickle", want, before, "no line for 10 s"));
            }
            let timeout = if j < total {
                (start + gap * j as u32).saturating_duration_since(now)
            } else {
                Duration::from_millis(50)
            };
            self.step(timeout.min(Duration::from_millis(50)))?;
        }
        let wall = start.elapsed();
        self.settle()?;
        self.final_check(lines as u32)?;
        let mut latencies = self.check.latencies.take().unwrap_or_default();
        latencies.sort_unstable();
        Ok(Delivered {
            deliveries: self.check.deliveries - before,
            wall,
            latencies,
        })
    }

    /// Reads for a further 100 ms: a line that arrives after the last expected one (a
    /// duplicate, a line never sent) is an error.
    fn settle(&mut self) -> Result<(), String> {
        let end = Instant::now() + Duration::from_millis(100);
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            self.step(left)?;
        }
        Ok(())
    }

    /// Every receiver has exactly `lines` lines from every other client.
    fn final_check(&self, lines: u32) -> Result<(), String> {
        let n = self.clients.len();
        let c = &self.check;
        for r in 0..n {
            for s in 0..n {
                let got = c.next[r * c.cap + s];
                let want = if r == s { 0 } else { lines };
                if got != want {
                    return Err(format!(
                        "{} got {got} lines from {}, expected {want}",
                        c.who(r),
                        c.who(s)
                    ));
                }
            }
        }
        Ok(())
    }

    fn stalled(&self, what: &str, want: u64, before: u64, why: &str) -> String {
        let got = self.check.deliveries - before;
        let n = self.clients.len();
        let c = &self.check;
        // The first receiver short of lines, for the report.
        let short = (0..n).find_map(|r| {
            (0..n).find_map(|s| {
                let (got, sent) = (c.next[r * c.cap + s], c.sent[s]);
                (r != s && got < sent).then(|| {
                    format!(
                        "; e.g. {} has {got} of {}'s {sent} lines",
                        c.who(r),
                        c.who(s)
                    )
                })
            })
        });
        format!(
            "{what}: {why}: {got} of {want} deliveries ({} missing){}",
            want - got.min(want),
            short.unwrap_or_default()
        )
    }

    /// Polls until `done` holds; fails after [`STALL`] without a line, or at `end`.
    fn wait(
        &mut self,
        what: &str,
        end: Instant,
        done: impl Fn(&Check) -> bool,
    ) -> Result<(), String> {
        while !done(&self.check) {
            if self.check.last_line.elapsed() > STALL {
                return Err(format!(
                    "waiting for {what}: nothing received for {STALL:?}"
                ));
            }
            if Instant::now() >= end {
                return Err(format!("waiting for {what}: past the time limit"));
            }
            self.step(Duration::from_millis(50))?;
        }
        Ok(())
    }

    /// One poll: reads every readable client to `WouldBlock`, writes what waits to every
    /// writable one.
    fn step(&mut self, timeout: Duration) -> Result<(), String> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(format!("poll: {e}")),
        }
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        ready.extend(self.events.iter().map(|e| {
            let r = e.is_readable() || e.is_read_closed() || e.is_error();
            (e.token().0, r, e.is_writable())
        }));
        for &(i, readable, writable) in &ready {
            if readable {
                self.read(i)?;
            }
            if writable {
                self.write(i)?;
            }
        }
        self.ready = ready;
        Ok(())
    }

    /// Writes what client `i` has waiting, as far as its socket takes it.
    fn write(&mut self, i: usize) -> Result<(), String> {
        let c = &mut self.clients[i];
        while c.out_pos < c.out.len() {
            match c.s.write(&c.out[c.out_pos..]) {
                Ok(0) => return Err(format!("{}: write returned 0", self.check.who(i))),
                Ok(n) => c.out_pos += n,
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Still connecting: the writable event comes once connected.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("{}: write: {e}", self.check.who(i))),
            }
        }
        c.out.clear();
        c.out_pos = 0;
        Ok(())
    }

    /// Reads everything client `i` has, checking every complete line.
    fn read(&mut self, i: usize) -> Result<(), String> {
        let Gen {
            clients,
            check,
            rbuf,
            epoch,
            quickack,
            ..
        } = self;
        let c = &mut clients[i];
        loop {
            let n = match c.s.read(rbuf) {
                Ok(0) => {
                    return Err(format!(
                        "{}: the server closed the connection",
                        check.who(i)
                    ))
                }
                Ok(n) => n,
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("{}: read: {e}", check.who(i))),
            };
            if *quickack {
                // Linux leaves quick-ACK mode again by itself: set it after every read.
                let one: libc::c_int = 1;
                // SAFETY: live socket; the option value is a c_int of the length passed.
                unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&c.s),
                        libc::IPPROTO_TCP,
                        libc::TCP_QUICKACK,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
            }
            let now = Instant::now();
            let now_ns = now.duration_since(*epoch).as_nanos() as u64;
            check.last_line = now;
            let mut data = &rbuf[..n];
            if !c.partial.is_empty() {
                match data.iter().position(|&b| b == b'\n') {
                    Some(end) => {
                        c.partial.extend_from_slice(&data[..end]);
                        data = &data[end + 1..];
                        let line = std::mem::take(&mut c.partial);
                        check.line(i, &line, now_ns)?;
                        c.partial = line;
                        c.partial.clear();
                    }
                    None => {
                        c.partial.extend_from_slice(data);
                        data = &[];
                    }
                }
            }
            while let Some(end) = data.iter().position(|&b| b == b'\n') {
                check.line(i, &data[..end], now_ns)?;
                data = &data[end + 1..];
            }
            c.partial.extend_from_slice(data);
            if c.partial.len() > MAX_SERVER_LINE {
                return Err(format!(
                    "{}: a line of more than {MAX_SERVER_LINE} bytes",
                    check.who(i)
                ));
            }
        }
    }

    /// Closes every client with a reset (`SO_LINGER` 0): no `TIME_WAIT` left behind.
    pub fn close(self) {
        for c in &self.clients {
            super::servers::set_linger_zero(&c.s);
        }
    }
}

/// A decimal number of 1 to 19 digits.
fn decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// A hexadecimal number of 1 to 16 digits.
fn hex(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 16 {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| {
        (d as char).to_digit(16).map(|v| n << 4 | u64::from(v))
    })
}

fn show(line: &[u8]) -> String {
    let cut = &line[..line.len().min(120)];
    format!("{:?}", String::from_utf8_lossy(cut))
}

impl Check {
    /// "guest7 (client 6)", or "client 6" before its welcome.
    fn who(&self, i: usize) -> String {
        match self.guest.get(i) {
            Some(&g) if g != 0 => format!("guest{g} (client {i})"),
            _ => format!("client {i}"),
        }
    }

    /// Checks one line received by client `r` at `now_ns`.
    fn line(&mut self, r: usize, line: &[u8], now_ns: u64) -> Result<(), String> {
        let me = self.guest[r];
        let bad = |why: &str| {
            let who = match me {
                0 => format!("client {r}"),
                g => format!("guest{g} (client {r})"),
            };
            format!("{who} received {}: {why}", show(line))
        };
        if let Some(rest) = line.strip_prefix(b"* ") {
            if let Some(g) = rest.strip_prefix(b"welcome guest") {
                let g = decimal(g)
                    .filter(|&g| g > 0)
                    .ok_or_else(|| bad("bad welcome"))?;
                if self.guest[r] != 0 {
                    return Err(bad("a second welcome"));
                }
                if g as usize >= self.by_guest.len() {
                    if g > 100 * self.cap as u64 + 1000 {
                        return Err(bad("guest number far larger than the clients connected"));
                    }
                    self.by_guest.resize(g as usize + 1, u32::MAX);
                }
                if self.by_guest[g as usize] != u32::MAX {
                    return Err(bad("a guest number already given to another client"));
                }
                self.by_guest[g as usize] = r as u32;
                self.guest[r] = g;
                return Ok(());
            }
            if self.guest[r] == 0 {
                return Err(bad("a line before the welcome"));
            }
            let joined = rest
                .strip_prefix(b"guest")
                .and_then(|x| x.strip_suffix(b" joined"))
                .and_then(decimal);
            if let Some(g) = joined {
                if g <= self.guest[r] || g <= self.last_joined[r] {
                    return Err(bad("not a client that joined after this one, in order"));
                }
                self.last_joined[r] = g;
                self.joined[r] += 1;
                self.joined_total += 1;
                return Ok(());
            }
            if line.ends_with(b" left") {
                return Err(bad("a client left during the run"));
            }
            return Err(bad("unexpected line"));
        }
        if self.guest[r] == 0 {
            return Err(bad("a line before the welcome"));
        }
        // guest<N>: SSSSSSSS TTTTTTTTTTTTTTTT xxx...x
        let Some((g, text)) = line.strip_prefix(b"guest").and_then(|x| {
            let colon = x.iter().position(|&b| b == b':')?;
            Some((decimal(&x[..colon])?, x[colon + 1..].strip_prefix(b" ")?))
        }) else {
            return Err(bad("unexpected line"));
        };
        let s = match self.by_guest.get(g as usize) {
            Some(&s) if s != u32::MAX => s as usize,
            _ => return Err(bad("a line from a guest that is not one of the clients")),
        };
        if s == r {
            return Err(bad("the receiver's own line sent back to it"));
        }
        let sent_text = text.len() == TEXT
            && text[8] == b' '
            && text[25] == b' '
            && text[26..].iter().all(|&b| b == b'x');
        let Some((seq, ts)) = sent_text
            .then(|| decimal(&text[..8]).zip(hex(&text[9..25])))
            .flatten()
        else {
            return Err(bad("not a line any client sent (length or padding)"));
        };
        let at = r * self.cap + s;
        let want = u64::from(self.next[at]);
        if seq != want {
            let what = if seq == want + 1 {
                format!("line {want} missing")
            } else if seq > want {
                format!("lines {want} to {} missing", seq - 1)
            } else {
                "a duplicate or out of order".to_string()
            };
            return Err(format!(
                "{} got {}'s line {seq} where line {want} was next: {what}",
                self.who(r),
                self.who(s)
            ));
        }
        if seq >= u64::from(self.sent[s]) {
            return Err(bad("a line its sender has not sent"));
        }
        self.next[at] += 1;
        self.deliveries += 1;
        if let Some(l) = self.latencies.as_mut() {
            l.push(now_ns.saturating_sub(ts));
        }
        Ok(())
    }
}
