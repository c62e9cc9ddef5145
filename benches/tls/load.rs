//! The load generator: rustls clients (`ClientConnection`) over non-blocking mio sockets, one
//! thread, one `Poll`. Connections are opened with a blocking `connect` (immediate on
//! loopback), then made non-blocking. Every loop is bounded: each stops at its deadline, and
//! 5 s without any event, a TLS error, an end of stream or a wrong echoed byte fails the run.
//!
//! Every echoed byte is checked: what is sent is a slice of [`pattern`] (byte `i` is
//! `i % 251`) starting at an offset that depends on the connection and the message, and
//! what comes back is compared with the same slice.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use proactor::rustls::{ClientConfig, ClientConnection};

/// No event for this long fails a run.
const STALL: Duration = Duration::from_secs(5);
/// Plaintext read from rustls at a time.
const SCRATCH: usize = 16 * 1024;
const PERIOD: u64 = 251;

/// Bytes `i % 251`, long enough for a 64 KiB slice from any offset below 251.
pub fn pattern() -> Vec<u8> {
    (0..64 * 1024 + 256).map(|i| (i % PERIOD) as u8).collect()
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// One TLS client connection.
struct Client {
    sock: TcpStream,
    tls: ClientConnection,
}

impl Client {
    fn connect(
        addr: SocketAddr,
        config: &Arc<ClientConfig>,
        poll: &Poll,
        token: Token,
        linger0: bool,
    ) -> io::Result<Client> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        if linger0 {
            // Closed with a reset: thousands of handshakes leave no TIME_WAIT behind.
            super::bench_servers::set_linger_zero(&s);
        }
        s.set_nonblocking(true)?;
        let mut sock = TcpStream::from_std(s);
        poll.registry()
            .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)?;
        let tls = ClientConnection::new(config.clone(), super::servers::server_name())
            .map_err(io::Error::other)?;
        let mut c = Client { sock, tls };
        c.flush()?;
        Ok(c)
    }

    /// Sends what rustls has for the socket, until it would block.
    fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the socket has, until it would block, giving the plaintext to `f`. An end
    /// of stream is an error (no server closes first here).
    fn receive(
        &mut self,
        scratch: &mut [u8],
        mut f: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        loop {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => return Err(err("the server closed the connection")),
                Ok(_) => {
                    self.tls
                        .process_new_packets()
                        .map_err(|e| err(format!("TLS: {e}")))?;
                    loop {
                        match self.tls.reader().read(scratch) {
                            Ok(0) => return Err(err("the server sent close_notify")),
                            Ok(n) => f(&scratch[..n])?,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Waits for events (up to 50 ms); fails after [`STALL`] without any.
fn wait(poll: &mut Poll, events: &mut Events, last: &mut Instant) -> io::Result<()> {
    match poll.poll(events, Some(Duration::from_millis(50))) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
    }
    if !events.is_empty() {
        *last = Instant::now();
    } else if last.elapsed() > STALL {
        return Err(err(format!("no event for {STALL:?}")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (a) One stream

/// One connection streaming plaintext in `chunk`-byte writes while it reads the echo back,
/// with at most `window` bytes sent and not yet echoed.
pub struct Stream {
    poll: Poll,
    events: Events,
    c: Client,
    pat: Vec<u8>,
    scratch: Vec<u8>,
    chunk: usize,
    window: u64,
    /// Plaintext given to rustls, and echoed back (checked).
    pub sent: u64,
    pub echoed: u64,
}

impl Stream {
    pub fn connect(
        addr: SocketAddr,
        config: &Arc<ClientConfig>,
        chunk: usize,
        window: usize,
    ) -> io::Result<Stream> {
        let poll = Poll::new()?;
        let c = Client::connect(addr, config, &poll, Token(0), true)?;
        Ok(Stream {
            poll,
            events: Events::with_capacity(16),
            c,
            pat: pattern(),
            scratch: vec![0; SCRATCH],
            chunk: chunk.min(64 * 1024),
            window: window.max(chunk) as u64,
            sent: 0,
            echoed: 0,
        })
    }

    /// Streams `bytes` more (the handshake first, the first time) and waits for their echo.
    pub fn transfer(&mut self, bytes: u64, limit: Duration) -> io::Result<()> {
        let target = self.sent + bytes;
        let end = Instant::now() + limit;
        let mut last = Instant::now();
        loop {
            // Write while the window allows (rustls holds what the handshake does not let out
            // yet; a full send buffer takes less or nothing).
            while self.sent < target && self.sent - self.echoed < self.window {
                let len = (self.chunk as u64)
                    .min(target - self.sent)
                    .min(self.window - (self.sent - self.echoed))
                    as usize;
                let off = (self.sent % PERIOD) as usize;
                let n = self.c.tls.writer().write(&self.pat[off..off + len])?;
                if n == 0 {
                    break;
                }
                self.sent += n as u64;
            }
            self.c.flush()?;
            if self.echoed == target {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(err(format!(
                    "stream: {} of {} bytes echoed after {limit:?}",
                    self.echoed, target
                )));
            }
            wait(&mut self.poll, &mut self.events, &mut last)?;
            let (pat, echoed, sent) = (&self.pat, &mut self.echoed, self.sent);
            self.c.receive(&mut self.scratch, |d| {
                if *echoed + d.len() as u64 > sent {
                    return Err(err("stream: more bytes echoed than sent"));
                }
                let off = (*echoed % PERIOD) as usize;
                if d != &pat[off..off + d.len()] {
                    return Err(err(format!("stream: wrong bytes echoed at {}", *echoed)));
                }
                *echoed += d.len() as u64;
                Ok(())
            })?;
            self.c.flush()?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Many connections echoing messages, (d) idle connections

struct EchoConn {
    c: Client,
    /// Messages this connection sent.
    seq: u64,
    /// The message in flight: its length (0: none), its offset in the pattern, the bytes
    /// back so far, when it was sent.
    want: usize,
    off: usize,
    got: usize,
    sent_at: Instant,
}

impl EchoConn {
    fn send(&mut self, idx: usize, pat: &[u8], size: usize) -> io::Result<()> {
        self.off = ((idx as u64 * 7 + self.seq) % PERIOD) as usize;
        self.seq += 1;
        self.want = size;
        self.got = 0;
        self.sent_at = Instant::now();
        self.c
            .tls
            .writer()
            .write_all(&pat[self.off..self.off + size])?;
        self.c.flush()
    }
}

/// `n` TLS connections; each sends a message and waits for its echo before it sends the
/// next (a closed loop).
pub struct Echo {
    poll: Poll,
    events: Events,
    conns: Vec<EchoConn>,
    pat: Vec<u8>,
    scratch: Vec<u8>,
    size: usize,
    /// Whether a connection whose echo came back sends the next message.
    sending: bool,
    /// Whether round-trip times are kept.
    pub recording: bool,
    /// Round trips completed (all, and the recorded ones' times in ns).
    pub done: u64,
    pub lat_ns: Vec<u64>,
}

impl Echo {
    /// Opens `n` connections and, on each, runs the handshake and echoes one byte, so the
    /// server has finished every handshake and waits in a read on every connection.
    pub fn connect(
        addr: SocketAddr,
        config: &Arc<ClientConfig>,
        n: usize,
        size: usize,
        limit: Duration,
    ) -> io::Result<Echo> {
        let poll = Poll::new()?;
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let c = Client::connect(addr, config, &poll, Token(i), true)
                .map_err(|e| err(format!("connection {i}: {e}")))?;
            conns.push(EchoConn {
                c,
                seq: 0,
                want: 0,
                off: 0,
                got: 0,
                sent_at: Instant::now(),
            });
        }
        let mut e = Echo {
            poll,
            events: Events::with_capacity(1024),
            conns,
            pat: pattern(),
            scratch: vec![0; SCRATCH],
            size: 1,
            sending: false,
            recording: false,
            done: 0,
            lat_ns: Vec::new(),
        };
        // One byte each (rustls sends it once the handshake is done).
        for i in 0..n {
            e.conns[i].send(i, &e.pat, 1)?;
        }
        e.drain(limit)?;
        e.size = size;
        e.done = 0;
        Ok(e)
    }

    /// Sends a message on every connection, then runs the closed loop until `until`.
    pub fn start(&mut self) -> io::Result<()> {
        self.sending = true;
        for i in 0..self.conns.len() {
            self.conns[i].send(i, &self.pat, self.size)?;
        }
        Ok(())
    }

    pub fn run_until(&mut self, until: Instant) -> io::Result<()> {
        let mut last = Instant::now();
        while Instant::now() < until {
            self.turn(&mut last)?;
        }
        Ok(())
    }

    /// Stops sending and waits for every message in flight.
    pub fn drain(&mut self, limit: Duration) -> io::Result<()> {
        self.sending = false;
        let end = Instant::now() + limit;
        let mut last = Instant::now();
        while self.conns.iter().any(|c| c.want > 0) {
            if Instant::now() > end {
                let left = self.conns.iter().filter(|c| c.want > 0).count();
                return Err(err(format!("{left} echoes missing after {limit:?}")));
            }
            self.turn(&mut last)?;
        }
        Ok(())
    }

    fn turn(&mut self, last: &mut Instant) -> io::Result<()> {
        wait(&mut self.poll, &mut self.events, last)?;
        for ev in self.events.iter() {
            let i = ev.token().0;
            let ec = &mut self.conns[i];
            ec.c.flush()?;
            let (pat, want, off, got) = (&self.pat, ec.want, ec.off, &mut ec.got);
            ec.c.receive(&mut self.scratch, |d| {
                if *got + d.len() > want {
                    return Err(err(format!("connection {i}: more bytes echoed than sent")));
                }
                if d != &pat[off + *got..off + *got + d.len()] {
                    return Err(err(format!("connection {i}: wrong bytes echoed")));
                }
                *got += d.len();
                Ok(())
            })?;
            if ec.want > 0 && ec.got == ec.want {
                ec.want = 0;
                self.done += 1;
                if self.recording {
                    self.lat_ns.push(ec.sent_at.elapsed().as_nanos() as u64);
                }
                if self.sending {
                    ec.send(i, &self.pat, self.size)?;
                }
            }
            ec.c.flush()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// (c) Full handshakes

/// Fresh connections, `inflight` at a time: connect, full handshake (the client config
/// resumes nothing), one byte echoed (so the server has finished its side of the
/// handshake), then closed with a reset.
pub struct Handshakes {
    poll: Poll,
    events: Events,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    slots: Vec<Option<Client>>,
    scratch: Vec<u8>,
    refill: bool,
    pub done: u64,
}

impl Handshakes {
    pub fn new(addr: SocketAddr, config: &Arc<ClientConfig>, inflight: usize) -> io::Result<Self> {
        Ok(Handshakes {
            poll: Poll::new()?,
            events: Events::with_capacity(256),
            addr,
            config: config.clone(),
            slots: (0..inflight.max(1)).map(|_| None).collect(),
            scratch: vec![0; SCRATCH],
            refill: true,
            done: 0,
        })
    }

    fn open(&mut self, i: usize) -> io::Result<()> {
        let mut c = Client::connect(self.addr, &self.config, &self.poll, Token(i), true)?;
        c.tls.writer().write_all(b"h")?;
        self.slots[i] = Some(c);
        Ok(())
    }

    pub fn run_until(&mut self, until: Instant) -> io::Result<()> {
        self.refill = true;
        let mut last = Instant::now();
        while Instant::now() < until {
            self.turn(&mut last)?;
        }
        Ok(())
    }

    /// Opens no more and waits for the handshakes under way.
    pub fn drain(&mut self, limit: Duration) -> io::Result<()> {
        self.refill = false;
        let end = Instant::now() + limit;
        let mut last = Instant::now();
        while self.slots.iter().any(Option::is_some) {
            if Instant::now() > end {
                return Err(err(format!("handshakes unfinished after {limit:?}")));
            }
            self.turn(&mut last)?;
        }
        Ok(())
    }

    fn turn(&mut self, last: &mut Instant) -> io::Result<()> {
        if self.refill {
            for i in 0..self.slots.len() {
                if self.slots[i].is_none() {
                    self.open(i)?;
                }
            }
        }
        wait(&mut self.poll, &mut self.events, last)?;
        let ready: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
        for i in ready {
            let Some(c) = self.slots[i].as_mut() else {
                continue;
            };
            c.flush()?;
            let mut back = false;
            c.receive(&mut self.scratch, |d| {
                if d != b"h" || back {
                    return Err(err("handshake: wrong bytes echoed"));
                }
                back = true;
                Ok(())
            })?;
            c.flush()?;
            if back {
                if c.tls.is_handshaking() {
                    return Err(err("handshake: echo before the handshake's end"));
                }
                let mut c = self.slots[i].take().expect("a slot in use");
                let _ = self.poll.registry().deregister(&mut c.sock);
                self.done += 1;
                if self.refill {
                    self.open(i)?;
                }
            }
        }
        Ok(())
    }
}
