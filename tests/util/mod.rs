//! Shared helpers for the integration tests (on the model of mio's `tests/util`).
//!
//! - `tcp_pair()` / `Pairs`: loopback TCP pairs on `127.0.0.1:0`;
//! - `watcher_pair()`: a watcher, one registered server conn and its client peer;
//! - `collect(&watcher, n, timeout)`: exactly `n` completions, or a panic saying what came;
//! - `Ledger`: gives every command a unique tag and checks each completes exactly once;
//! - `Echo`: a watcher-side echo server over many conns (reads of every kind, writes back);
//! - `Rng` / `Pattern`: a tiny seeded PRNG, no dependency;
//! - `fd_count()`, `wait_until(..)`, `set_linger_zero(..)`;
//! - `watchdog(..)`: fails the run, instead of hanging it, around a wait with no timeout.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[path = "../common/kit.rs"]
mod kit;
#[allow(unused_imports)] // each test crate uses its own subset
pub use kit::{
    describe, describe_all, get_opt, pattern, set_linger, set_linger_zero, set_opt, Pairs, Rng,
};

use proactor::{Buf, Cmd, Completion, Conn, ConnId, Error, Op, SendError, Watcher, WatcherBuilder};

/// The generous upper bound for anything that should take milliseconds.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Aborts the test process, saying `what`, unless dropped within `limit`: for a wait that has
/// no timeout of its own (`wait_io`), so that a completion lost there fails the run instead of
/// hanging it. Dropping it ends its thread at once.
pub fn watchdog(what: String, limit: Duration) -> Watchdog {
    let (done, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("{what}: still waiting after {limit:?}");
            std::process::abort();
        }
    });
    Watchdog {
        done: Some(done),
        thread: Some(thread),
    }
}

/// See [`watchdog`].
pub struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take()); // disconnects: the thread's wait ends
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connected loopback pair: (client, server).
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    Pairs::new().pair()
}

/// A watcher, a registered server-side conn, and the client peer (blocking std socket).
pub fn watcher_pair() -> (Watcher, Conn, TcpStream) {
    watcher_pair_with(Watcher::builder())
}

/// `watcher_pair` on a watcher built with these options.
pub fn watcher_pair_with(options: WatcherBuilder) -> (Watcher, Conn, TcpStream) {
    let watcher = options.build().expect("watcher");
    let (client, server) = tcp_pair();
    let conn = watcher.register(server).expect("register");
    (watcher, conn, client)
}

/// Waits for `n` completions; panics, saying what it got, on a timeout or on more arriving
/// in the same batch as the `n`-th (later extras are the caller's to check).
pub fn collect(watcher: &Watcher, n: usize, timeout: Duration) -> Vec<Completion> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match watcher.wait_io_deadline(&mut got, deadline) {
            Ok(0) => panic!(
                "timed out after {timeout:?} waiting for {n} completions; got {}:\n{}",
                got.len(),
                describe_all(&got)
            ),
            Ok(_) => {}
            Err(e) => panic!(
                "wait_io failed ({e}) waiting for {n} completions; got {}:\n{}",
                got.len(),
                describe_all(&got)
            ),
        }
    }
    assert_eq!(
        got.len(),
        n,
        "expected exactly {n} completions, got:\n{}",
        describe_all(&got)
    );
    got
}

/// Exactly one completion.
pub fn collect_one(watcher: &Watcher, timeout: Duration) -> Completion {
    collect(watcher, 1, timeout).pop().unwrap()
}

/// Asserts nothing more arrives within `quiet` (a negative check, not synchronisation).
pub fn assert_quiet(watcher: &Watcher, quiet: Duration) {
    let mut extra = Vec::new();
    let _ = watcher.wait_io_timeout(&mut extra, quiet);
    assert!(
        extra.is_empty(),
        "unexpected completions:\n{}",
        describe_all(&extra)
    );
}

/// Polls `f` until it returns true; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until the poller has published `pred(stats)` (stats trail by one round).
pub fn wait_stats(watcher: &Watcher, what: &str, pred: impl Fn(&proactor::Stats) -> bool) {
    let start = Instant::now();
    loop {
        let s = watcher.stats();
        if pred(&s) {
            return;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
        - 1 // the directory handle of read_dir itself
}

/// Reads until EOF (or `TIMEOUT`), returning everything.
pub fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    use std::io::Read;
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v)
        .expect("peer read_to_end (timed out?)");
    v
}

/// Every command gets a unique tag; every completion must match one outstanding tag, with
/// the same op, exactly once.
#[derive(Default)]
pub struct Ledger {
    next: u64,
    outstanding: HashMap<u64, Op>,
    done: HashMap<u64, Op>,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Tags `cmd` with a fresh tag and sends it; on refusal the tag is forgotten.
    pub fn send(&mut self, conn: &Conn, cmd: Cmd) -> Result<u64, SendError> {
        self.next += 1;
        let tag = self.next;
        self.send_tagged(conn, cmd, tag).map(|()| tag)
    }

    /// Like `send`, with the caller's tag (which must not be outstanding or done).
    pub fn send_tagged(&mut self, conn: &Conn, cmd: Cmd, tag: u64) -> Result<(), SendError> {
        assert!(
            !self.outstanding.contains_key(&tag) && !self.done.contains_key(&tag),
            "tag {tag} reused by the test"
        );
        let op = cmd.op();
        conn.send(cmd.tag(tag))?;
        self.outstanding.insert(tag, op);
        Ok(())
    }

    /// `send`, panicking on refusal.
    pub fn must(&mut self, conn: &Conn, cmd: Cmd) -> u64 {
        match self.send(conn, cmd) {
            Ok(tag) => tag,
            Err(e) => panic!("send refused: {e:?}"),
        }
    }

    pub fn record(&mut self, c: &Completion) {
        match self.outstanding.remove(&c.tag) {
            Some(op) => {
                assert_eq!(op, c.op, "completion op mismatch: {}", describe(c));
                self.done.insert(c.tag, op);
            }
            None if self.done.contains_key(&c.tag) => {
                panic!("completed twice: {}", describe(c))
            }
            None => panic!("completion for a tag never sent: {}", describe(c)),
        }
    }

    pub fn record_all(&mut self, cs: &[Completion]) {
        for c in cs {
            self.record(c);
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    pub fn completed(&self) -> usize {
        self.done.len()
    }

    pub fn assert_all_done(&self) {
        assert!(
            self.outstanding.is_empty(),
            "{} commands never completed: {:?}",
            self.outstanding.len(),
            self.outstanding.iter().take(20).collect::<Vec<_>>()
        );
    }
}

/// How the echo server reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// `Cmd::ReadInternal`.
    Internal,
    /// `Cmd::Read` into a caller buffer of random length (1..=16 KiB).
    Caller,
    /// `Cmd::ReadFull` into a caller buffer of random length (1..=64).
    Full,
    /// One of the three at random, per read.
    Mixed,
}

struct EchoConn {
    conn: Conn,
    reads: usize,
    writes: usize,
    eof: bool,
    free_sent: bool,
    echoed: u64,
}

/// A watcher-side echo server: each conn reads (at `depth` reads outstanding), writes back
/// every byte it got, in order, and frees itself after end of stream once its writes are done.
/// Every command goes through the ledger, so every completion is checked exactly-once.
pub struct Echo<'w> {
    pub watcher: &'w Watcher,
    pub ledger: Ledger,
    conns: HashMap<ConnId, EchoConn>,
    rng: Rng,
    mode: ReadMode,
    depth: usize,
    /// Reads are held back while this many writes are in flight (back-pressure).
    max_writes: usize,
    batch: Vec<Completion>,
    pub reads_done: u64,
    pub bytes_echoed: u64,
}

impl<'w> Echo<'w> {
    pub fn new(watcher: &'w Watcher, mode: ReadMode, depth: usize, seed: u64) -> Echo<'w> {
        Echo {
            watcher,
            ledger: Ledger::new(),
            conns: HashMap::new(),
            rng: Rng::new(seed),
            mode,
            depth: depth.max(1),
            max_writes: 16,
            batch: Vec::new(),
            reads_done: 0,
            bytes_echoed: 0,
        }
    }

    pub fn add(&mut self, conn: Conn) {
        let id = conn.id();
        self.conns.insert(
            id,
            EchoConn {
                conn,
                reads: 0,
                writes: 0,
                eof: false,
                free_sent: false,
                echoed: 0,
            },
        );
        self.top_up(id);
    }

    pub fn live(&self) -> usize {
        self.conns.len()
    }

    fn read_cmd(&mut self) -> Cmd {
        let mode = match self.mode {
            ReadMode::Mixed => match self.rng.below(3) {
                0 => ReadMode::Internal,
                1 => ReadMode::Caller,
                _ => ReadMode::Full,
            },
            m => m,
        };
        match mode {
            ReadMode::Internal => Cmd::ReadInternal,
            ReadMode::Caller => Cmd::Read(vec![0; self.rng.range(1, 16 * 1024)]),
            _ => Cmd::ReadFull(vec![0; self.rng.range(1, 64)]),
        }
    }

    /// Keeps `depth` reads outstanding unless at EOF or held back by writes.
    fn top_up(&mut self, id: ConnId) {
        loop {
            let st = &self.conns[&id];
            if st.eof || st.free_sent || st.reads >= self.depth || st.writes >= self.max_writes {
                break;
            }
            let conn = st.conn.clone();
            let cmd = self.read_cmd();
            self.ledger.must(&conn, cmd);
            self.conns.get_mut(&id).unwrap().reads += 1;
        }
        let st = self.conns.get_mut(&id).unwrap();
        if st.eof && st.reads == 0 && st.writes == 0 && !st.free_sent {
            st.free_sent = true;
            let conn = st.conn.clone();
            self.ledger.must(&conn, Cmd::Free);
        }
    }

    fn handle(&mut self, c: Completion) {
        self.ledger.record(&c);
        let id = c.conn.id();
        let st = self
            .conns
            .get_mut(&id)
            .unwrap_or_else(|| panic!("completion for an unknown conn: {}", describe(&c)));
        match c.op {
            Op::Read | Op::ReadFull => {
                st.reads -= 1;
                self.reads_done += 1;
                match &c.result {
                    Ok(()) => assert!(c.n > 0, "empty successful read: {}", describe(&c)),
                    Err(Error::Eof) => st.eof = true,
                    Err(e) => panic!("read failed ({e}): {}", describe(&c)),
                }
                if c.op == Op::Read && c.is_ok() {
                    assert!(c.n <= c.buf.as_slice().len());
                }
                if c.n > 0 {
                    let n = c.n;
                    let data = match c.buf {
                        Buf::Bytes(b) => {
                            assert_eq!(b.len(), n, "internal read buf must be exactly n bytes");
                            b
                        }
                        Buf::Vec(mut v) => {
                            v.truncate(n);
                            v.into()
                        }
                        other => panic!("read completion without a buffer: {other:?}"),
                    };
                    st.echoed += n as u64;
                    self.bytes_echoed += n as u64;
                    st.writes += 1;
                    let conn = st.conn.clone();
                    self.ledger.must(&conn, Cmd::Write(data));
                }
            }
            Op::Write => {
                st.writes -= 1;
                assert!(c.is_ok(), "write failed: {}", describe(&c));
                assert_eq!(
                    c.n,
                    c.buf.as_slice().len(),
                    "short ok write: {}",
                    describe(&c)
                );
            }
            Op::Free => {
                assert!(c.is_ok(), "free failed: {}", describe(&c));
                assert!(st.free_sent);
                self.conns.remove(&id);
                return;
            }
            op => panic!("unexpected op {op:?}"),
        }
        self.top_up(id);
    }

    /// Handles whatever is ready now (non-blocking); returns how many completions.
    pub fn poll(&mut self) -> usize {
        let mut batch = std::mem::take(&mut self.batch);
        let n = self.watcher.try_wait_io(&mut batch).unwrap();
        for c in batch.drain(..) {
            self.handle(c);
        }
        self.batch = batch;
        n
    }

    /// Waits up to `timeout` for a batch and handles it; returns how many completions.
    pub fn step(&mut self, timeout: Duration) -> usize {
        let mut batch = std::mem::take(&mut self.batch);
        let n = self
            .watcher
            .wait_io_timeout(&mut batch, timeout)
            .expect("wait_io");
        for c in batch.drain(..) {
            self.handle(c);
        }
        self.batch = batch;
        n
    }

    /// Runs until every conn reached EOF, echoed everything and was freed.
    pub fn run(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.conns.is_empty() {
            assert!(
                Instant::now() < deadline,
                "echo did not finish in {timeout:?}: {} conns left, {} commands outstanding",
                self.conns.len(),
                self.ledger.outstanding()
            );
            self.step(Duration::from_millis(100));
        }
        self.ledger.assert_all_done();
    }
}

/// Compile-time: `T: Send + Sync`.
pub fn assert_send_sync<T: Send + Sync>() {}
