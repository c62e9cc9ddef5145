//! Chat server, the main demo: one thread owns every client's state (a HashMap keyed by ConnId)
//! and handles completions in batches; each message is one `Bytes` shared by all its
//! recipients. A client has one write in flight at a time: the messages queued meanwhile go
//! out together, as one `Cmd::WriteAll` (gathered, no copy), once the batch of completions
//! at hand is handled. Slow consumers are cut off by a backlog limit, idle clients by read
//! idle timeouts; the watcher splits lines (`Cmd::ReadFrames`).
//!
//! With one watcher (the default) the chat thread drives it inline: no thread hand-off
//! between the poller and the chat. With `--watchers N` the sockets are spread over N
//! pollers whose completions all go to the chat thread's one mailbox.
//!
//!     cargo run --release --example chat-server -- --addr 127.0.0.1:7000 --idle-timeout 600
//!     nc 127.0.0.1 7000        then type text, or /nick NAME, /who, /quit
//!
//! Over TLS (the `tls` feature): the poller runs each client's TLS session, and the chat
//! code is the same but for one command, `Cmd::TlsAccept`, sent to each accepted connection; a
//! client joins (welcome, number, announcement) once its handshake completes, and one that
//! does not complete it within `--tls-handshake-timeout` (10 s) is dropped.
//!
//!     cargo run --release --features tls --example chat-server -- \
//!         --tls-cert tests/data/tls/server.pem --tls-key tests/data/tls/server.key
//!     openssl s_client -connect 127.0.0.1:7000 -CAfile tests/data/tls/ca.pem -quiet

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use proactor::bytes::Bytes;
use proactor::flume::Receiver;
use proactor::{
    Cmd, Completion, Conn, ConnId, Engine, Error, Framing, Op, Pool, SendError, Watcher,
};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Longest line accepted, counted before its `\n` (a trailing `\r` included).
const MAX_LINE: usize = 4096;
/// Lines taken by one read, at most: those that arrived together come in one completion.
const LINES_PER_READ: usize = 64;
/// Accepts kept waiting on the listener: a burst of connections is taken in one round. They
/// complete in order, so clients are still numbered in the order they connected.
const ACCEPTS: usize = 64;
/// The most bytes one write takes from a client's queue (at least one message).
const WRITE_CHUNK: usize = 64 * 1024;
/// Writes handed over per turn, at most: then the completions that came meanwhile are taken
/// (a non-blocking poll) before the next ones. A new client's welcome goes first, and lines
/// that arrive while a long flush is under way join the queues still waiting, so the next
/// turns gather them into fewer writes (the join storm: a `joined` line for every client
/// per join).
const FLUSH_BUDGET: usize = 16;
/// How long a farewell (`! line too long`, ...) may take to be written before we close anyway.
const LINGER: Duration = Duration::from_secs(1);
/// Tag of a farewell write: free the connection when it completes.
const LAST: u64 = 1;

struct Options {
    addr: String,
    watchers: usize,
    engine: Option<Engine>,
    idle: Option<Duration>,
    max_backlog: usize,
    /// `--tls-cert` and `--tls-key`.
    tls: Option<(String, String)>,
    tls_handshake: Duration,
}

/// The TLS configuration clients are accepted with (`None`: plaintext).
#[cfg(feature = "tls")]
type Tls = Option<Arc<proactor::rustls::ServerConfig>>;
#[cfg(not(feature = "tls"))]
type Tls = Option<std::convert::Infallible>;

/// The server's TLS configuration from `--tls-cert` and `--tls-key` (PEM files: the
/// certificate chain, the private key).
#[cfg(feature = "tls")]
fn tls_config(opts: &Options) -> Result<Tls, String> {
    use proactor::rustls::pki_types::pem::PemObject;
    use proactor::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some((cert, key)) = &opts.tls else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("--tls-cert {cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key {key}: {e}"))?;
    // (The process's default crypto provider: ring, the one the crate builds rustls with.)
    let config = proactor::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    Ok(Some(Arc::new(config)))
}

#[cfg(not(feature = "tls"))]
fn tls_config(_: &Options) -> Result<Tls, String> {
    Ok(None)
}

/// Where the chat thread takes its completions from.
enum Source {
    /// One watcher, driven by the chat thread itself (`wait_io` runs the poller).
    Inline(Arc<Watcher>),
    /// The shared mailbox of a pool of threaded watchers.
    Mailbox(Receiver<Completion>),
}

impl Source {
    /// The next batch: the first completion and every one ready after it. `false` once the
    /// watchers are closed and everything was taken.
    fn next(&self, batch: &mut Vec<Completion>) -> bool {
        match self {
            Source::Inline(watcher) => watcher.wait_io(batch).is_ok(),
            Source::Mailbox(mailbox) => match mailbox.recv() {
                Ok(first) => {
                    batch.push(first);
                    batch.extend(mailbox.try_iter());
                    true
                }
                Err(_) => false,
            },
        }
    }

    /// What is ready now, without waiting. `false` once the watchers are closed and
    /// everything was taken.
    fn poll(&self, batch: &mut Vec<Completion>) -> bool {
        match self {
            Source::Inline(watcher) => watcher.try_wait_io(batch).is_ok(),
            Source::Mailbox(mailbox) => {
                batch.extend(mailbox.try_iter());
                !batch.is_empty() || !mailbox.is_disconnected()
            }
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opts = parse_args().unwrap_or_else(|e| {
        eprintln!("chat-server: {e}");
        eprintln!(
            "usage: chat-server [--addr HOST:PORT] [--watchers N] [--idle-timeout SECS] \
             [--max-backlog BYTES] [--engine auto|uring|epoll] \
             [--tls-cert PEM --tls-key PEM [--tls-handshake-timeout SECS]]"
        );
        std::process::exit(2)
    });
    let tls = tls_config(&opts).unwrap_or_else(|e| {
        eprintln!("chat-server: {e}");
        std::process::exit(2)
    });
    // Installed before anything else, so SIGINT/SIGTERM always take the clean way out.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let listener = proactor::tcp_listener(&opts.addr)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    let mut options = Watcher::builder();
    if let Some(engine) = opts.engine {
        options = options.engine(engine); // else PROACTOR_ENGINE, else auto
    }
    let (source, listener, close): (_, _, Box<dyn FnOnce()>) = if opts.watchers == 1 {
        let options = options.inline(true).command_capacity(1 << 20);
        let watcher = Arc::new(options.build().unwrap_or_else(|e| fail(&e)));
        eprintln!("chat-server: engine {}", watcher.stats().engine_summary());
        let listener = watcher.listen(listener)?;
        let w = watcher.clone();
        (
            Source::Inline(watcher),
            listener,
            Box::new(move || w.close()),
        )
    } else {
        // N pollers sharing one mailbox: the chat state stays on one thread.
        let pool = Pool::builder()
            .watchers(opts.watchers)
            .watcher_options(options)
            .build()
            .unwrap_or_else(|e| fail(&e));
        let engine = pool.watchers()[0].stats().engine_summary();
        eprintln!("chat-server: engine {engine}");
        let listener = pool.listen(listener)?;
        let mailbox = pool.mailbox().expect("the pool shares one mailbox");
        (
            Source::Mailbox(mailbox),
            listener,
            Box::new(move || pool.close()),
        )
    };
    for _ in 0..ACCEPTS {
        listener.send(Cmd::Accept)?;
    }
    let chat = thread::spawn(move || Chat::new(&opts, tls).run(&source));

    signals.forever().next();
    // Pending operations complete with `WatcherClosed`, the sockets close, `next` ends.
    close();
    let _ = chat.join();
    Ok(())
}

struct Client {
    conn: Conn,
    name: String,
    /// Messages waiting for the next write.
    queue: Vec<Bytes>,
    /// The `Vec` of the last write, empty, for the queue after next.
    spare: Vec<Bytes>,
    /// A `WriteAll` is in flight (one at a time).
    writing: bool,
    /// Bytes queued and not yet written: `queue` plus the write in flight.
    backlog: usize,
    /// In `Chat::dirty`: its queue goes out when the batch at hand is handled.
    dirty: bool,
}

impl Client {
    /// Hands the queue over to one `WriteAll`: all of it, or, if it is long, its first
    /// WRITE_CHUNK bytes (the backlog is counted down when a write completes, so a client
    /// that reads but lags is not charged for more than one chunk in flight). False if the
    /// command is refused.
    fn write_queued(&mut self) -> bool {
        let mut bytes = 0;
        let k = self
            .queue
            .iter()
            .take_while(|m| {
                let more = bytes < WRITE_CHUNK;
                bytes += m.len();
                more
            })
            .count();
        let mut bufs = std::mem::take(&mut self.spare);
        if k == self.queue.len() {
            std::mem::swap(&mut bufs, &mut self.queue);
        } else {
            bufs.extend(self.queue.drain(..k));
        }
        self.writing = submit(&self.conn, Cmd::WriteAll(bufs)).is_ok();
        self.writing
    }
}

/// Queues `msg` for client `c` (`id`), to go out with the next flush; false if that takes
/// it past `max_backlog` (a slow consumer: it goes).
fn queue(
    c: &mut Client,
    id: ConnId,
    msg: Bytes,
    max_backlog: usize,
    dirty: &mut VecDeque<ConnId>,
) -> bool {
    c.backlog += msg.len();
    if c.backlog > max_backlog {
        return false;
    }
    c.queue.push(msg);
    if !c.dirty {
        c.dirty = true;
        dirty.push_back(id);
    }
    true
}

/// `conn.send`, waiting while the watcher's command queue is momentarily full (a pool's
/// pollers drain it; the inline watcher's queue, 1 Mi commands, holds far more than a
/// batch sends: a client has at most three operations in flight).
fn submit(conn: &Conn, mut cmd: Cmd) -> Result<(), SendError> {
    loop {
        match conn.send(cmd) {
            Err(SendError::Full(c)) => {
                cmd = c;
                thread::yield_now();
            }
            other => return other,
        }
    }
}

struct Chat {
    clients: HashMap<ConnId, Client>,
    guests: u64,
    idle: Option<Duration>,
    max_backlog: usize,
    /// Clients with messages queued since their queue last went out, in the order their
    /// queues go (a client whose write completes joins at the back).
    dirty: VecDeque<ConnId>,
    /// Names of clients that left, announced once the current event is handled.
    left: VecDeque<String>,
    /// Clients are accepted over TLS with this configuration: they join once their
    /// handshake completes, within `tls_handshake`.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    tls: Tls,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    tls_handshake: Duration,
}

impl Chat {
    fn new(opts: &Options, tls: Tls) -> Chat {
        Chat {
            clients: HashMap::new(),
            guests: 0,
            idle: opts.idle,
            max_backlog: opts.max_backlog,
            dirty: VecDeque::new(),
            left: VecDeque::new(),
            tls,
            tls_handshake: opts.tls_handshake,
        }
    }

    /// A connection accepted: a client at once, or once its TLS handshake completes.
    fn accepted(&mut self, conn: Conn) {
        #[cfg(feature = "tls")]
        if let Some(config) = &self.tls {
            let handshake = Cmd::TlsAccept(config.clone()).timeout(self.tls_handshake);
            if submit(&conn, handshake).is_err() {
                let _ = submit(&conn, Cmd::Free);
            }
            return;
        }
        self.join(conn);
    }

    fn run(mut self, source: &Source) {
        let mut batch = Vec::new();
        // Until the watchers are closed (SIGINT/SIGTERM) and everything was taken. While
        // queues still wait to go out, only what is ready is taken.
        loop {
            let open = if self.dirty.is_empty() {
                source.next(&mut batch)
            } else {
                source.poll(&mut batch)
            };
            if !open {
                break;
            }
            for c in batch.drain(..) {
                self.complete(c);
                // Announced here rather than where they happen: the announcement can push
                // another slow client past its limit, and that one is then announced in turn.
                while let Some(name) = self.left.pop_front() {
                    self.broadcast(None, format!("* {name} left\n").into());
                }
            }
            self.flush();
        }
    }

    /// Hands the waiting queues to one `WriteAll` each, in turn, up to FLUSH_BUDGET of them,
    /// for the clients with no write in flight (the others' go when theirs completes).
    fn flush(&mut self) {
        let mut written = 0;
        while written < FLUSH_BUDGET {
            let Some(id) = self.dirty.pop_front() else {
                break;
            };
            let Some(c) = self.clients.get_mut(&id) else {
                continue;
            };
            c.dirty = false;
            if c.writing || c.queue.is_empty() {
                continue;
            }
            written += 1;
            if !c.write_queued() {
                self.leave(id, None);
            }
        }
        // A client that left above is announced (that may cut off another slow one, who is
        // announced in turn); the lines go out with the next turns.
        while let Some(name) = self.left.pop_front() {
            self.broadcast(None, format!("* {name} left\n").into());
        }
    }

    fn join(&mut self, conn: Conn) {
        self.guests += 1;
        let name = format!("guest{}", self.guests);
        let id = conn.id();
        let welcome = format!("* welcome {name}\n");
        let joined = format!("* {name} joined\n");
        self.clients.insert(
            id,
            Client {
                conn,
                name,
                queue: Vec::new(),
                spare: Vec::new(),
                writing: false,
                backlog: 0,
                dirty: false,
            },
        );
        // The welcome goes out first, ahead of the queues already waiting: the client may
        // talk as soon as it has it.
        self.send_to(id, welcome.into());
        if self.dirty.back() == Some(&id) {
            self.dirty.pop_back();
            self.dirty.push_front(id);
        }
        self.broadcast(Some(id), joined.into());
        self.read(id);
    }

    /// The client's next read: the whole lines it sent, up to LINES_PER_READ (the watcher
    /// splits them; an unfinished line waits in the watcher, which refuses it as too long as
    /// soon as MAX_LINE + 1 bytes came without a `\n`). The idle timeout counts bytes *from*
    /// the client, so what it is sent does not keep it alive, and a line sent slowly does.
    /// An idle client holds no buffer.
    fn read(&mut self, id: ConnId) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let cmd = Cmd::ReadFrames(Framing::lines(MAX_LINE), LINES_PER_READ);
        let cmd = match self.idle {
            Some(idle) => cmd.idle_timeout(idle),
            None => cmd,
        };
        if submit(&c.conn, cmd).is_err() {
            self.leave(id, None);
        }
    }

    fn complete(&mut self, c: Completion) {
        let id = c.conn.id();
        match (c.op, &c.result) {
            // A farewell was written (or ran out of time): now close.
            _ if c.tag == LAST => {
                let _ = submit(&c.conn, Cmd::Free);
            }
            // Our own Free, or operations of a client already gone: nothing to do.
            (Op::Free, _) | (_, Err(Error::Freed | Error::WatcherClosed)) => {}
            // A new client, already registered; then accept the next one.
            (Op::Accept, result) => {
                match (result, c.buf.into_accepted()) {
                    (Ok(()), Some((conn, _peer))) => self.accepted(conn),
                    // Out of file descriptors and the like: the listener pauses a little.
                    (result, _) => eprintln!("accept: {result:?}"),
                }
                let _ = submit(&c.conn, Cmd::Accept);
            }
            // A client's queue went out; it may also belong to a client that left meanwhile.
            (Op::WriteAll, Ok(())) => {
                let written = c.n;
                if let Some(client) = self.clients.get_mut(&id) {
                    client.writing = false;
                    client.backlog -= written;
                    if let Some(mut spare) = c.buf.into_many() {
                        spare.clear();
                        client.spare = spare;
                    }
                    if !client.queue.is_empty() && !client.dirty {
                        client.dirty = true;
                        self.dirty.push_back(id);
                    }
                }
            }
            (Op::ReadFrames, Ok(())) => {
                for line in c.buf.frames() {
                    // Any line may make the client leave (/quit).
                    if !self.clients.contains_key(&id) {
                        return;
                    }
                    self.line(id, line);
                }
                self.read(id);
            }
            // A TLS client's handshake completed: now it is a client. One that failed (not
            // TLS, an alert, its deadline) was never one: it goes unannounced.
            #[cfg(feature = "tls")]
            (Op::Tls, result) => match result {
                Ok(()) => self.join(c.conn),
                Err(_) => {
                    let _ = submit(&c.conn, Cmd::Free);
                }
            },
            (Op::ReadFrames, Err(Error::IdleTimeout)) => self.leave(id, Some("! idle timeout\n")),
            (Op::ReadFrames, Err(Error::FrameTooLong)) => self.leave(id, Some("! line too long\n")),
            // End of stream, reset, broken pipe, ...
            _ => self.leave(id, None),
        }
    }

    fn line(&mut self, id: ConnId, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match line {
            b"" => {}
            b"/who" => {
                let mut names: Vec<&str> = self.clients.values().map(|c| c.name.as_str()).collect();
                names.sort_unstable(); // `str` orders by bytes
                let msg = format!("* online: {}\n", names.join(" "));
                self.send_to(id, msg.into());
            }
            b"/quit" => self.leave(id, Some("* bye\n")),
            // A bare `/nick` has no `/nick ` in it: an unknown command, by the contract.
            _ if line.starts_with(b"/nick ") => self.nick(id, &line[6..]),
            _ if line.starts_with(b"/") => {
                self.send_to(id, Bytes::from_static(b"! unknown command\n"))
            }
            text => {
                let Some(c) = self.clients.get(&id) else {
                    return;
                };
                // Bytes are relayed as they are, UTF-8 or not.
                let mut msg = Vec::with_capacity(c.name.len() + 3 + text.len());
                msg.extend_from_slice(c.name.as_bytes());
                msg.extend_from_slice(b": ");
                msg.extend_from_slice(text);
                msg.push(b'\n');
                self.broadcast(Some(id), msg.into());
            }
        }
    }

    fn nick(&mut self, id: ConnId, name: &[u8]) {
        let valid = (1..=32).contains(&name.len())
            && name
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            let msg = "! invalid name: use 1 to 32 of A-Z a-z 0-9 _ -\n";
            return self.send_to(id, Bytes::from_static(msg.as_bytes()));
        }
        let name = String::from_utf8_lossy(name).into_owned(); // ASCII: nothing lost
        if self.clients.values().any(|c| c.name == name) {
            return self.send_to(id, format!("! {name} is in use\n").into());
        }
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let msg = format!("* {} is now {name}\n", c.name);
        c.name = name;
        self.broadcast(None, msg.into());
    }

    /// Queues `msg` for client `id` (see `queue`).
    fn send_to(&mut self, id: ConnId, msg: Bytes) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if !queue(c, id, msg, self.max_backlog, &mut self.dirty) {
            self.leave(id, None);
        }
    }

    /// Queues one message for every client but `except`; each holds a reference to the same
    /// bytes.
    fn broadcast(&mut self, except: Option<ConnId>, msg: Bytes) {
        let mut slow = Vec::new();
        for (&id, c) in &mut self.clients {
            if Some(id) != except && !queue(c, id, msg.clone(), self.max_backlog, &mut self.dirty) {
                slow.push(id);
            }
        }
        for id in slow {
            self.leave(id, None);
        }
    }

    /// Removes a client, so that it is announced as left exactly once, and closes it: at once,
    /// or when `farewell`, queued behind the write in flight, is written (or times out).
    /// Messages queued and not yet handed over are dropped. Completions still to come for it
    /// find no client and change nothing.
    fn leave(&mut self, id: ConnId, farewell: Option<&'static str>) {
        let Some(c) = self.clients.remove(&id) else {
            return;
        };
        let mut c = c;
        let lingering = farewell.is_some_and(|text| {
            // What was queued for it goes first (one more write in flight is fine: writes
            // on a connection go out in order).
            let queued = std::mem::take(&mut c.queue);
            (queued.is_empty() || submit(&c.conn, Cmd::WriteAll(queued).timeout(LINGER)).is_ok())
                && submit(&c.conn, Cmd::Write(text).timeout(LINGER).tag(LAST)).is_ok()
        });
        if !lingering {
            let _ = submit(&c.conn, Cmd::Free);
        }
        self.left.push_back(c.name);
    }
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        addr: "127.0.0.1:7000".into(),
        watchers: 1,
        engine: None,
        idle: None,
        max_backlog: 1 << 20,
        tls: None,
        tls_handshake: Duration::from_secs(10),
    };
    let (mut cert, mut key) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--addr" => opts.addr = value,
            "--watchers" => {
                opts.watchers = Some(number()?)
                    .filter(|&n| n > 0)
                    .ok_or("--watchers needs a number > 0")?
                    as usize
            }
            "--idle-timeout" => {
                opts.idle = Some(number()?).filter(|&s| s > 0).map(Duration::from_secs)
            }
            "--max-backlog" => opts.max_backlog = number()? as usize,
            "--engine" => opts.engine = Some(value.parse().map_err(|e| format!("--engine: {e}"))?),
            "--tls-cert" => cert = Some(value),
            "--tls-key" => key = Some(value),
            "--tls-handshake-timeout" => {
                opts.tls_handshake = Some(number()?)
                    .filter(|&s| s > 0)
                    .map(Duration::from_secs)
                    .ok_or("--tls-handshake-timeout needs a number > 0")?
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    opts.tls = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    if opts.tls.is_some() && cfg!(not(feature = "tls")) {
        return Err(
            "--tls-cert/--tls-key: this chat-server was built without TLS \
                    (cargo run --features tls --example chat-server)"
                .into(),
        );
    }
    Ok(opts)
}

/// A watcher that cannot be built (an engine asked for and unavailable, say): its reason,
/// which names the cause and the fix, and exit status 1.
fn fail(e: &std::io::Error) -> ! {
    eprintln!("chat-server: {e}");
    std::process::exit(1)
}
