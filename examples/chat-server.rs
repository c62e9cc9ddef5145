//! Chat server, the main demo: one thread owns every client's state (a HashMap keyed by ConnId)
//! and handles completions in batches; each message is one `Bytes` shared by all its recipients'
//! writes, slow consumers are cut off by a backlog limit and idle clients by read deadlines.
//!
//! With `--watchers N` the sockets are spread over N pollers whose completions all go to the
//! chat thread's one mailbox.
//!
//!     cargo run --release --example chat-server -- --addr 127.0.0.1:7000 --idle-timeout 600
//!     nc 127.0.0.1 7000        then type text, or /nick NAME, /who, /quit

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::thread;
use std::time::Duration;

use proactor::bytes::Bytes;
use proactor::{
    Cmd, Completion, Conn, ConnId, Engine, Error, Framing, Op, Pool, SendError, Watcher,
};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Longest line accepted, counted before its `\n` (a trailing `\r` included).
const MAX_LINE: usize = 4096;
/// Lines taken by one read, at most: those that arrived together come in one completion.
const LINES_PER_READ: usize = 64;
/// Writes in flight per client; later messages wait in the client's own queue. (The watcher
/// gathers up to 64 queued writes of a connection into one `writev`.)
const MAX_WRITES: usize = 64;
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
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opts = parse_args().unwrap_or_else(|e| {
        eprintln!("chat-server: {e}");
        eprintln!(
            "usage: chat-server [--addr HOST:PORT] [--watchers N] [--idle-timeout SECS] \
             [--max-backlog BYTES] [--engine auto|uring|epoll]"
        );
        std::process::exit(2)
    });
    // Installed before anything else, so SIGINT/SIGTERM always take the clean way out.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let listener = proactor::tcp_listener(&opts.addr)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    // N pollers (default 1) sharing one mailbox: the chat state stays on one thread.
    let mut options = Watcher::builder();
    if let Some(engine) = opts.engine {
        options = options.engine(engine); // else PROACTOR_ENGINE, else auto
    }
    let pool = Pool::builder()
        .watchers(opts.watchers)
        .watcher_options(options)
        .build()
        .unwrap_or_else(|e| fail(&e));
    eprintln!(
        "chat-server: engine {}",
        pool.watchers()[0].stats().engine_summary()
    );
    // One accept at a time, so clients are numbered in the order they connected.
    pool.listen(listener)?.send(Cmd::Accept)?;
    let mailbox = pool.mailbox().expect("the pool shares one mailbox");
    let chat = thread::spawn(move || Chat::new(&opts).run(mailbox));

    signals.forever().next();
    // Pending operations complete with `WatcherClosed`, the sockets close, the mailbox ends.
    pool.close();
    let _ = chat.join();
    Ok(())
}

struct Client {
    conn: Conn,
    name: String,
    /// Messages waiting for a write slot.
    queue: VecDeque<Bytes>,
    /// Writes submitted and not yet completed (at most MAX_WRITES).
    writing: usize,
    /// Bytes queued and not yet written: `queue` plus the writes in flight.
    backlog: usize,
}

impl Client {
    /// Queues a message; false if that takes the client past `max_backlog`, or a write is refused.
    fn push(&mut self, msg: Bytes, max_backlog: usize) -> bool {
        self.backlog += msg.len();
        if self.backlog > max_backlog {
            return false;
        }
        self.queue.push_back(msg);
        self.pump()
    }

    /// One of our writes completed.
    fn written(&mut self, len: usize) -> bool {
        self.writing -= 1;
        self.backlog -= len;
        self.pump()
    }

    /// Submits queued messages while fewer than MAX_WRITES writes are in flight.
    fn pump(&mut self) -> bool {
        while self.writing < MAX_WRITES {
            let Some(msg) = self.queue.pop_front() else {
                break;
            };
            if submit(&self.conn, Cmd::Write(msg)).is_err() {
                return false;
            }
            self.writing += 1;
        }
        true
    }
}

/// `conn.send`, waiting while the watcher's command queue is momentarily full. (A client has at
/// most MAX_WRITES + 2 operations in flight, far below the per-connection limit, so `Full` can
/// only mean the shared queue, which the poller is draining.)
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
    /// Names of clients that left, announced once the current event is handled.
    left: VecDeque<String>,
}

impl Chat {
    fn new(opts: &Options) -> Chat {
        Chat {
            clients: HashMap::new(),
            guests: 0,
            idle: opts.idle,
            max_backlog: opts.max_backlog,
            left: VecDeque::new(),
        }
    }

    fn run(mut self, mailbox: proactor::flume::Receiver<Completion>) {
        let mut batch = Vec::new();
        // Until the watchers are closed (SIGINT/SIGTERM) and the mailbox drained: a batch is
        // the first completion and every one ready after it.
        while let Ok(first) = mailbox.recv() {
            batch.push(first);
            batch.extend(mailbox.try_iter());
            for c in batch.drain(..) {
                self.complete(c);
                // Announced here rather than where they happen: the announcement can push
                // another slow client past its limit, and that one is then announced in turn.
                while let Some(name) = self.left.pop_front() {
                    self.broadcast(None, format!("* {name} left\n").into());
                }
            }
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
                queue: VecDeque::new(),
                writing: 0,
                backlog: 0,
            },
        );
        self.send_to(id, welcome.into());
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
                    (Ok(()), Some((conn, _peer))) => self.join(conn),
                    // Out of file descriptors and the like: the listener pauses a little.
                    (result, _) => eprintln!("accept: {result:?}"),
                }
                let _ = submit(&c.conn, Cmd::Accept);
            }
            // A write completed; it may also belong to a client that left meanwhile.
            (Op::Write, Ok(())) => {
                let len = c.buf.as_slice().len();
                if let Some(client) = self.clients.get_mut(&id) {
                    if !client.written(len) {
                        self.leave(id, None);
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

    fn send_to(&mut self, id: ConnId, msg: Bytes) {
        let max = self.max_backlog;
        if let Some(c) = self.clients.get_mut(&id) {
            if !c.push(msg, max) {
                self.leave(id, None);
            }
        }
    }

    /// Queues one message for every client but `except`; each write holds a reference to the
    /// same bytes. A client that this takes past the backlog limit is a slow consumer: it goes.
    fn broadcast(&mut self, except: Option<ConnId>, msg: Bytes) {
        let mut slow = Vec::new();
        for (&id, c) in &mut self.clients {
            if Some(id) != except && !c.push(msg.clone(), self.max_backlog) {
                slow.push(id);
            }
        }
        for id in slow {
            self.leave(id, None);
        }
    }

    /// Removes a client, so that it is announced as left exactly once, and closes it: at once,
    /// or when `farewell`, queued behind the writes in flight, is written (or times out).
    /// Completions still to come for it find no client and change nothing.
    fn leave(&mut self, id: ConnId, farewell: Option<&'static str>) {
        let Some(c) = self.clients.remove(&id) else {
            return;
        };
        let lingering = farewell.is_some_and(|text| {
            submit(&c.conn, Cmd::Write(text).timeout(LINGER).tag(LAST)).is_ok()
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
    };
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
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(opts)
}

/// A watcher that cannot be built (an engine asked for and unavailable, say): its reason,
/// which names the cause and the fix, and exit status 1.
fn fail(e: &std::io::Error) -> ! {
    eprintln!("chat-server: {e}");
    std::process::exit(1)
}
