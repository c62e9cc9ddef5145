//! Model-based random testing (issue 6): random sequences of register / read / read-internal /
//! read-full / write / free / deadline / idle timeout / close over several connections, on a
//! threaded or an inline watcher (half the cases each), whose peers are plain `std` sockets
//! driven by the test (the peer writes random chunks, reads, and may half-close), checked
//! online against a model of what the library promises:
//!
//! - every accepted command completes exactly once, on its connection, with its `Op`, and
//!   refused commands come back inside the `SendError` (`EmptyBuffer` for a zero-length
//!   read or write buffer, else `Freed` once freed, else `Closed` once closed);
//! - per connection and direction, operations complete in submission order, except those a
//!   timer ends (`Deadline`, `IdleTimeout`), which may leave early but then carry no bytes
//!   unless they were at the head of the queue;
//! - the bytes reads deliver, in submission order, are exactly the bytes the peer sent, and
//!   the bytes the peer receives are exactly `buf[..n]` of each write, in submission order;
//! - `Ok` means all of it (a `ReadFull` full, a write whole, a read >= 1 byte); `Eof` only
//!   after every sent byte was delivered and the peer half-closed; `Deadline` only for a
//!   command with a deadline and never before it; `IdleTimeout` only with an idle timeout;
//!   `Freed` only after a free, `WatcherClosed` only after close;
//! - a free completes after every operation of its connection, and nothing after it;
//! - at the end the stats show nothing in flight, no armed timer and no connection.
//!
//! # Running and reproducing
//!
//! `cargo test --test model` runs 128 cases (about 2 s on a 2-core machine, debug build).
//! More: `PROPTEST_CASES=1000 cargo test --release --test model`.
//!
//! A failure prints the shrunk action list and the seed, and proptest appends the seed to
//! `tests/model.proptest-regressions`; every later run replays the seeds in that file first
//! (commit the file to keep a found bug covered). To replay one run exactly, set
//! `PROPTEST_RNG_SEED=<u64>` (the runner then derives every case from that seed; the default
//! seed is random per run) and, for the same case numbering, the same `PROPTEST_CASES`.
//! Shrinking is capped at `PROPTEST_MAX_SHRINK_ITERS` (default here: 256).
//!
//! The sockets and the poller thread are real, so timing decides how a case runs (which
//! deadline beats which byte): a seed reproduces the same actions, not necessarily the same
//! interleaving. Every interleaving must satisfy the model, so a failure is a bug either way;
//! the printed action list is the best starting point.

mod reliability_util;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use proactor::bytes::Bytes;
use proactor::{Buf, Cmd, Completion, Conn, Error, Op, SendError, Watcher};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use reliability_util::{describe, wait_stats, Pairs, Rng, TIMEOUT};

const MAX_SLOTS: usize = 6;
/// Idle timeouts start when the poller takes the command, never before our `send`
/// (`timers.rs::idle_timeout_never_fires_before_its_duration` pins the old bug): no slack.
const IDLE_SLACK: Duration = Duration::ZERO;

#[derive(Debug, Clone, Copy)]
enum Timer {
    None,
    /// Deadline this many ms after the send (0: already due).
    Deadline(u8),
    /// Idle timeout of this many ms.
    Idle(u8),
}

#[derive(Debug, Clone)]
enum Action {
    Register,
    Read { slot: u8, len: u16, timer: Timer },
    ReadInternal { slot: u8, timer: Timer },
    ReadFull { slot: u8, len: u16, timer: Timer },
    Write { slot: u8, len: u32, timer: Timer },
    Free { slot: u8 },
    PeerWrite { slot: u8, len: u32 },
    PeerRead { slot: u8 },
    PeerShutdown { slot: u8 },
    Pump { ms: u8 },
}

fn timer() -> impl Strategy<Value = Timer> {
    prop_oneof![
        6 => Just(Timer::None),
        3 => (0u8..25).prop_map(Timer::Deadline),
        1 => (1u8..25).prop_map(Timer::Idle),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    let slot = any::<u8>();
    prop_oneof![
        1 => Just(Action::Register),
        4 => (slot, 0u16..4096, timer())
            .prop_map(|(slot, len, timer)| Action::Read { slot, len, timer }),
        3 => (slot, timer()).prop_map(|(slot, timer)| Action::ReadInternal { slot, timer }),
        3 => (slot, 0u16..20_000, timer())
            .prop_map(|(slot, len, timer)| Action::ReadFull { slot, len, timer }),
        5 => (slot, 0u32..300_000, timer())
            .prop_map(|(slot, len, timer)| Action::Write { slot, len, timer }),
        1 => slot.prop_map(|slot| Action::Free { slot }),
        5 => (slot, 1u32..100_000).prop_map(|(slot, len)| Action::PeerWrite { slot, len }),
        4 => slot.prop_map(|slot| Action::PeerRead { slot }),
        1 => slot.prop_map(|slot| Action::PeerShutdown { slot }),
        3 => (0u8..8).prop_map(|ms| Action::Pump { ms }),
    ]
}

fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 128;
    }
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        c.max_shrink_iters = 256;
    }
    c.failure_persistence = Some(Box::new(FileFailurePersistence::WithSource(
        "proptest-regressions",
    )));
    c
}

proptest! {
    #![proptest_config(config())]

    /// `close_at`: close the watcher before that action (None: free everything at the end).
    /// `inline`: the poller runs inside `wait_io`/`try_wait_io` on the test's thread.
    #[test]
    fn model(
        actions in prop::collection::vec(action(), 1..60),
        close_at in prop::option::weighted(0.25, any::<prop::sample::Index>()),
        inline in any::<bool>(),
    ) {
        let close_at = close_at.map(|i| i.index(actions.len()));
        run_case(&actions, close_at, inline);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ReadKind {
    Read(usize),
    Internal,
    Full(usize),
}

struct ReadOp {
    kind: ReadKind,
    sent_at: Instant,
    deadline: Option<Instant>,
    idle: Option<Duration>,
    n: Option<usize>,
}

struct WriteOp {
    data: Bytes,
    sent_at: Instant,
    deadline: Option<Instant>,
    idle: Option<Duration>,
    n: Option<usize>,
}

struct Slot {
    conn: Conn,
    peer: TcpStream,
    reads: Vec<ReadOp>,
    writes: Vec<WriteOp>,
    /// Bytes the peer's socket accepted (what reads may deliver), and those still waiting.
    peer_sent: Vec<u8>,
    peer_pending: Vec<u8>,
    peer_rng: Rng,
    peer_shut: bool,
    peer_shut_done: bool,
    peer_recv: Vec<u8>,
    /// Some(true): end of stream; Some(false): reset.
    peer_end: Option<bool>,
    /// A peer write failed: the server end reset the connection (the kernel reports a
    /// reset once, so a later read may then return a plain 0).
    peer_write_failed: bool,
    /// Bytes delivered to reads so far.
    cursor: usize,
    free_tag: Option<u64>,
    free_done: bool,
}

#[derive(Clone, Copy)]
enum Entry {
    Read(usize, usize),
    Write(usize, usize),
    Free(usize),
}

struct Model {
    w: Watcher,
    pairs: Pairs,
    slots: Vec<Slot>,
    tags: HashMap<u64, (Entry, bool)>,
    next_tag: u64,
    closed: bool,
    data_rng: Rng,
    batch: Vec<Completion>,
    trace: Vec<String>,
}

fn run_case(actions: &[Action], close_at: Option<usize>, inline: bool) {
    let w = Watcher::builder().buffer_size(16 * 1024).inline(inline);
    let mut m = Model {
        w: w.build().unwrap(),
        pairs: Pairs::new(),
        slots: Vec::new(),
        tags: HashMap::new(),
        next_tag: 1,
        closed: false,
        data_rng: Rng::new(7),
        batch: Vec::new(),
        trace: Vec::new(),
    };
    m.register();
    m.register();
    for (i, a) in actions.iter().enumerate() {
        if close_at == Some(i) {
            m.close();
        }
        m.step(a);
    }
    if m.closed {
        m.finish_closed();
    } else {
        m.finish_open();
    }
}

impl Model {
    fn fail(&self, msg: String) -> ! {
        let tail: Vec<&String> = self.trace.iter().rev().take(40).collect();
        panic!("model violated: {msg}\nlast events, newest first:\n{tail:#?}");
    }

    fn register(&mut self) {
        if self.slots.len() >= MAX_SLOTS || self.closed {
            return;
        }
        let (peer, server) = self.pairs.pair();
        peer.set_nonblocking(true).unwrap();
        let conn = self.w.register(server).unwrap();
        let seed = 1000 + self.slots.len() as u64;
        self.trace.push(format!(
            "register slot {} = {:?}",
            self.slots.len(),
            conn.id()
        ));
        self.slots.push(Slot {
            conn,
            peer,
            reads: Vec::new(),
            writes: Vec::new(),
            peer_sent: Vec::new(),
            peer_pending: Vec::new(),
            peer_rng: Rng::new(seed),
            peer_shut: false,
            peer_shut_done: false,
            peer_recv: Vec::new(),
            peer_end: None,
            peer_write_failed: false,
            cursor: 0,
            free_tag: None,
            free_done: false,
        });
    }

    fn step(&mut self, a: &Action) {
        self.take_ready();
        let pick = |slot: &u8, n: usize| *slot as usize % n;
        match a {
            Action::Register => self.register(),
            Action::Read { slot, len, timer } => {
                let s = pick(slot, self.slots.len());
                self.read(s, ReadKind::Read(*len as usize), *timer);
            }
            Action::ReadInternal { slot, timer } => {
                let s = pick(slot, self.slots.len());
                self.read(s, ReadKind::Internal, *timer);
            }
            Action::ReadFull { slot, len, timer } => {
                let s = pick(slot, self.slots.len());
                self.read(s, ReadKind::Full(*len as usize), *timer);
            }
            Action::Write { slot, len, timer } => {
                let s = pick(slot, self.slots.len());
                self.write(s, *len as usize, *timer);
            }
            Action::Free { slot } => {
                let s = pick(slot, self.slots.len());
                self.free(s);
            }
            Action::PeerWrite { slot, len } => {
                let s = pick(slot, self.slots.len());
                let sl = &mut self.slots[s];
                if !sl.peer_shut {
                    let mut bytes = vec![0; *len as usize];
                    sl.peer_rng.fill(&mut bytes);
                    sl.peer_pending.extend_from_slice(&bytes);
                }
            }
            Action::PeerRead { slot } => {
                let s = pick(slot, self.slots.len());
                self.peer_read(s);
            }
            Action::PeerShutdown { slot } => {
                let s = pick(slot, self.slots.len());
                self.slots[s].peer_shut = true;
            }
            Action::Pump { ms } => self.pump(Duration::from_millis(*ms as u64)),
        }
        for s in 0..self.slots.len() {
            self.peer_flush(s);
        }
        self.take_ready();
    }

    fn timer_cmd(cmd: Cmd, timer: Timer, now: Instant) -> (Cmd, Option<Instant>, Option<Duration>) {
        match timer {
            Timer::None => (cmd, None, None),
            Timer::Deadline(ms) => {
                let d = now + Duration::from_millis(ms as u64);
                (cmd.deadline(d), Some(d), None)
            }
            Timer::Idle(ms) => {
                let d = Duration::from_millis(ms as u64);
                (cmd.idle_timeout(d), None, Some(d))
            }
        }
    }

    /// Sends `cmd`; checks a refusal is the one the model expects and gives the buffer back.
    /// `empty`: a read or write with a zero-length buffer, refused before anything else.
    fn send(&mut self, s: usize, cmd: Cmd, buf_len: usize, empty: bool) -> Option<u64> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let sl = &self.slots[s];
        match sl.conn.send(cmd.tag(tag)) {
            Ok(()) => {
                if empty {
                    self.fail(format!("slot {s}: an empty buffer was accepted"));
                }
                if self.closed {
                    self.fail(format!("slot {s}: send accepted after close"));
                }
                if sl.free_tag.is_some() {
                    self.fail(format!("slot {s}: send accepted after free"));
                }
                Some(tag)
            }
            Err(e) => {
                let ok = match &e {
                    SendError::EmptyBuffer(_) => empty,
                    // A freed handle says so first, closed watcher or not.
                    SendError::Closed(_) => !empty && self.closed && sl.free_tag.is_none(),
                    SendError::Freed(_) => !empty && sl.free_tag.is_some(),
                    _ => false,
                };
                if !ok {
                    self.fail(format!("slot {s}: unexpected refusal {e:?}"));
                }
                let back = e.into_inner().into_buf();
                if back.as_slice().len() != buf_len {
                    self.fail(format!("slot {s}: refused command lost its buffer"));
                }
                None
            }
        }
    }

    fn read(&mut self, s: usize, kind: ReadKind, timer: Timer) {
        let now = Instant::now();
        let (cmd, len) = match kind {
            ReadKind::Read(n) => (Cmd::Read(vec![0; n]), n),
            ReadKind::Internal => (Cmd::ReadInternal, 0),
            ReadKind::Full(n) => (Cmd::ReadFull(vec![0; n]), n),
        };
        let (cmd, deadline, idle) = Self::timer_cmd(cmd, timer, now);
        let empty = len == 0 && kind != ReadKind::Internal;
        if let Some(tag) = self.send(s, cmd, len, empty) {
            let sl = &mut self.slots[s];
            self.tags
                .insert(tag, (Entry::Read(s, sl.reads.len()), false));
            self.trace.push(format!(
                "slot {s}: read #{} tag {tag} {kind:?} {timer:?}",
                sl.reads.len()
            ));
            sl.reads.push(ReadOp {
                kind,
                sent_at: now,
                deadline,
                idle,
                n: None,
            });
        }
    }

    fn write(&mut self, s: usize, len: usize, timer: Timer) {
        let now = Instant::now();
        let mut data = vec![0; len];
        self.data_rng.fill(&mut data);
        let data = Bytes::from(data);
        let (cmd, deadline, idle) = Self::timer_cmd(Cmd::Write(data.clone()), timer, now);
        if let Some(tag) = self.send(s, cmd, len, len == 0) {
            let sl = &mut self.slots[s];
            self.tags
                .insert(tag, (Entry::Write(s, sl.writes.len()), false));
            self.trace.push(format!(
                "slot {s}: write #{} tag {tag} len {len} {timer:?}",
                sl.writes.len()
            ));
            sl.writes.push(WriteOp {
                data,
                sent_at: now,
                deadline,
                idle,
                n: None,
            });
        }
    }

    fn free(&mut self, s: usize) {
        if let Some(tag) = self.send(s, Cmd::Free, 0, false) {
            self.tags.insert(tag, (Entry::Free(s), false));
            self.trace.push(format!("slot {s}: free tag {tag}"));
            self.slots[s].free_tag = Some(tag);
        }
    }

    fn close(&mut self) {
        self.trace.push("close".into());
        self.w.close();
        self.closed = true;
    }

    fn peer_flush(&mut self, s: usize) {
        let sl = &mut self.slots[s];
        while !sl.peer_pending.is_empty() && sl.peer_end.is_none() {
            match sl.peer.write(&sl.peer_pending) {
                Ok(n) => {
                    sl.peer_sent.extend_from_slice(&sl.peer_pending[..n]);
                    sl.peer_pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // The server end is gone (freed with unread data: reset).
                Err(_) => {
                    sl.peer_pending.clear();
                    sl.peer_write_failed = true;
                    break;
                }
            }
        }
        if sl.peer_shut && !sl.peer_shut_done && sl.peer_pending.is_empty() {
            let _ = sl.peer.shutdown(Shutdown::Write);
            sl.peer_shut_done = true;
            self.trace.push(format!(
                "slot {s}: peer half-closed after {} bytes",
                sl.peer_sent.len()
            ));
        }
    }

    fn peer_read(&mut self, s: usize) {
        let sl = &mut self.slots[s];
        let mut buf = [0u8; 65536];
        while sl.peer_end.is_none() {
            match sl.peer.read(&mut buf) {
                Ok(0) => sl.peer_end = Some(true),
                Ok(n) => sl.peer_recv.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => sl.peer_end = Some(false),
            }
        }
    }

    fn take_ready(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        match self.w.try_wait_io(&mut batch) {
            Ok(_) => {}
            Err(Error::WatcherClosed) if self.closed => {}
            Err(e) => self.fail(format!("try_wait_io: {e:?}")),
        }
        for c in batch.drain(..) {
            self.check(c);
        }
        self.batch = batch;
    }

    /// Waits up to `d` for completions (returns early on the first batch).
    fn pump(&mut self, d: Duration) {
        let mut batch = std::mem::take(&mut self.batch);
        match self.w.wait_io_timeout(&mut batch, d) {
            Ok(_) => {}
            Err(Error::WatcherClosed) if self.closed => {}
            Err(e) => self.fail(format!("wait_io: {e}")),
        }
        for c in batch.drain(..) {
            self.check(c);
        }
        self.batch = batch;
    }

    fn outstanding(&self) -> usize {
        self.tags.values().filter(|(_, done)| !done).count()
    }

    /// The heart of the model: one completion, checked against everything known so far.
    fn check(&mut self, c: Completion) {
        let now = Instant::now();
        self.trace.push(describe(&c));
        let Some(&(entry, done)) = self.tags.get(&c.tag) else {
            self.fail(format!(
                "completion for a tag never accepted: {}",
                describe(&c)
            ));
        };
        if done {
            self.fail(format!("second completion: {}", describe(&c)));
        }
        self.tags.insert(c.tag, (entry, true));
        let s = match entry {
            Entry::Read(s, _) | Entry::Write(s, _) | Entry::Free(s) => s,
        };
        if c.conn.id() != self.slots[s].conn.id() {
            self.fail(format!(
                "slot {s}: completion on the wrong conn: {}",
                describe(&c)
            ));
        }
        if self.slots[s].free_done {
            self.fail(format!(
                "slot {s}: completion after the free: {}",
                describe(&c)
            ));
        }
        // Outcomes every operation shares.
        let (deadline, idle, sent_at) = match entry {
            Entry::Read(_, i) => {
                let r = &self.slots[s].reads[i];
                (r.deadline, r.idle, r.sent_at)
            }
            Entry::Write(_, i) => {
                let w = &self.slots[s].writes[i];
                (w.deadline, w.idle, w.sent_at)
            }
            Entry::Free(_) => (None, None, now),
        };
        let timer_ended = matches!(c.result, Err(Error::Deadline | Error::IdleTimeout));
        match &c.result {
            Err(Error::Deadline) => match deadline {
                Some(d) if now >= d => {}
                Some(d) => self.fail(format!(
                    "deadline fired {:?} early: {}",
                    d - now,
                    describe(&c)
                )),
                None => self.fail(format!("Deadline without a deadline: {}", describe(&c))),
            },
            Err(Error::IdleTimeout) => match idle {
                Some(d) if now + IDLE_SLACK >= sent_at + d => {}
                Some(d) => self.fail(format!(
                    "idle timeout fired {:?} after the send, before its {d:?}: {}",
                    now - sent_at,
                    describe(&c)
                )),
                None => self.fail(format!(
                    "IdleTimeout without an idle timeout: {}",
                    describe(&c)
                )),
            },
            Err(Error::Freed) if self.slots[s].free_tag.is_none() => {
                self.fail(format!("Freed without a free: {}", describe(&c)))
            }
            Err(Error::WatcherClosed) if !self.closed => {
                self.fail(format!("WatcherClosed before close: {}", describe(&c)))
            }
            Err(Error::Io(e)) => self.fail(format!("unexpected I/O error {e}: {}", describe(&c))),
            Err(Error::Eof) if !matches!(entry, Entry::Read(..)) => {
                self.fail(format!("Eof on a non-read: {}", describe(&c)))
            }
            _ => {}
        }
        match entry {
            Entry::Read(_, i) => self.check_read(s, i, &c, timer_ended),
            Entry::Write(_, i) => self.check_write(s, i, &c, timer_ended),
            Entry::Free(_) => {
                // A free still queued when the watcher closes completes with WatcherClosed,
                // like every queued command (checked above: only after close).
                let closed = matches!(c.result, Err(Error::WatcherClosed));
                if c.op != Op::Free || (c.result.is_err() && !closed) {
                    self.fail(format!("free: {}", describe(&c)));
                }
                let sl = &self.slots[s];
                if sl.reads.iter().any(|r| r.n.is_none()) || sl.writes.iter().any(|w| w.n.is_none())
                {
                    self.fail(format!("slot {s}: free completed before its operations"));
                }
                self.slots[s].free_done = true;
            }
        }
    }

    fn check_read(&mut self, s: usize, i: usize, c: &Completion, timer_ended: bool) {
        let sl = &self.slots[s];
        let r = &sl.reads[i];
        let want_op = if matches!(r.kind, ReadKind::Full(_)) {
            Op::ReadFull
        } else {
            Op::Read
        };
        if c.op != want_op {
            self.fail(format!("read {i} completed as {:?}", c.op));
        }
        // FIFO: a read that is not cut short by its timer, or that carries bytes, was at the
        // head of the queue: every earlier read is done.
        if (!timer_ended || c.n > 0) && sl.reads[..i].iter().any(|r| r.n.is_none()) {
            self.fail(format!(
                "slot {s}: read {i} overtook an earlier read: {}",
                describe(c)
            ));
        }
        match (r.kind, &c.buf) {
            (ReadKind::Read(n) | ReadKind::Full(n), Buf::Vec(v)) if v.len() == n => {}
            (ReadKind::Internal, Buf::Bytes(b)) if b.len() == c.n => {}
            (ReadKind::Internal, Buf::None) if c.n == 0 => {}
            _ => self.fail(format!(
                "slot {s}: read {i} buffer not handed back right: {}",
                describe(c)
            )),
        }
        match (&c.result, r.kind) {
            (Ok(()), ReadKind::Full(n)) if c.n == n => {}
            (Ok(()), ReadKind::Read(n)) if c.n >= 1 && c.n <= n => {}
            (Ok(()), ReadKind::Internal) if c.n >= 1 => {}
            (Ok(()), _) => self.fail(format!(
                "slot {s}: Ok read with a wrong count: {}",
                describe(c)
            )),
            (Err(_), ReadKind::Full(n)) if c.n < n => {}
            (Err(_), ReadKind::Read(_) | ReadKind::Internal) if c.n == 0 => {}
            (Err(_), _) => self.fail(format!("slot {s}: failed read with bytes: {}", describe(c))),
        }
        let (from, to) = (sl.cursor, sl.cursor + c.n);
        if to > sl.peer_sent.len() || c.data() != &sl.peer_sent[from..to] {
            self.fail(format!(
                "slot {s}: read {i} delivered bytes {from}..{to} that differ from what the peer sent ({} bytes)",
                sl.peer_sent.len()
            ));
        }
        if c.is_eof() && !(sl.peer_shut_done && to == sl.peer_sent.len()) {
            self.fail(format!(
                "slot {s}: Eof with {} of {} bytes delivered (peer half-closed: {})",
                to,
                sl.peer_sent.len(),
                sl.peer_shut_done
            ));
        }
        let sl = &mut self.slots[s];
        sl.cursor = to;
        sl.reads[i].n = Some(c.n);
    }

    fn check_write(&mut self, s: usize, i: usize, c: &Completion, timer_ended: bool) {
        let sl = &self.slots[s];
        let w = &sl.writes[i];
        if c.op != Op::Write {
            self.fail(format!("write {i} completed as {:?}", c.op));
        }
        if (!timer_ended || c.n > 0) && sl.writes[..i].iter().any(|w| w.n.is_none()) {
            self.fail(format!(
                "slot {s}: write {i} overtook an earlier write: {}",
                describe(c)
            ));
        }
        match &c.buf {
            Buf::Bytes(b) if b.as_ptr() == w.data.as_ptr() && b.len() == w.data.len() => {}
            _ => self.fail(format!(
                "slot {s}: write {i} buffer not handed back: {}",
                describe(c)
            )),
        }
        let ok = match &c.result {
            Ok(()) => c.n == w.data.len(),
            Err(_) => c.n < w.data.len(),
        };
        if !ok {
            self.fail(format!(
                "slot {s}: write {i} with a wrong count: {}",
                describe(c)
            ));
        }
        self.slots[s].writes[i].n = Some(c.n);
    }

    /// What the peer must have received from slot `s`: `buf[..n]` of each write, in order.
    fn written(&self, s: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for w in &self.slots[s].writes {
            v.extend_from_slice(&w.data[..w.n.unwrap_or(0)]);
        }
        v
    }

    /// After the free or close: the peer reads to its end; a clean end of stream must come
    /// after exactly the bytes written, a reset (the server closed with unread input) after a
    /// prefix of them.
    fn check_peer_stream(&mut self, s: usize) {
        let start = Instant::now();
        while self.slots[s].peer_end.is_none() {
            if start.elapsed() > TIMEOUT {
                self.fail(format!("slot {s}: the peer never saw the connection close"));
            }
            self.peer_read(s);
            if self.slots[s].peer_end.is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let want = self.written(s);
        let sl = &self.slots[s];
        let got = &sl.peer_recv;
        let prefix = got.len() <= want.len() && got[..] == want[..got.len()];
        let clean = sl.peer_end == Some(true) && !sl.peer_write_failed;
        if !prefix || (clean && got.len() != want.len()) {
            self.fail(format!(
                "slot {s}: the peer received {} bytes (clean end: {clean}); the writes report {} \
                 (prefix matches: {prefix})",
                got.len(),
                want.len()
            ));
        }
    }

    fn finish_open(&mut self) {
        // Let every write finish: the peers read everything and send what they still owe.
        let start = Instant::now();
        loop {
            let live: Vec<usize> = (0..self.slots.len())
                .filter(|&s| self.slots[s].free_tag.is_none())
                .collect();
            let writes_done = live
                .iter()
                .all(|&s| self.slots[s].writes.iter().all(|w| w.n.is_some()));
            let all_read = live
                .iter()
                .all(|&s| self.slots[s].peer_recv.len() == self.written(s).len());
            let frees_done = self
                .slots
                .iter()
                .all(|s| s.free_tag.is_none() || s.free_done);
            if writes_done && all_read && frees_done {
                break;
            }
            if start.elapsed() > TIMEOUT {
                self.fail(format!(
                    "settling: writes done {writes_done}, peers caught up {all_read}, frees done {frees_done}"
                ));
            }
            for s in 0..self.slots.len() {
                self.peer_flush(s);
                self.peer_read(s);
            }
            self.pump(Duration::from_millis(2));
        }
        for s in 0..self.slots.len() {
            let sl = &self.slots[s];
            if sl.free_tag.is_none() && sl.peer_recv != self.written(s) {
                self.fail(format!(
                    "slot {s}: the peer's bytes differ from what the writes report"
                ));
            }
        }
        // Free what is left: pending reads complete with Freed, then the frees.
        for s in 0..self.slots.len() {
            if self.slots[s].free_tag.is_none() {
                self.free(s);
            }
        }
        let start = Instant::now();
        while self.outstanding() > 0 {
            if start.elapsed() > TIMEOUT {
                self.fail(format!(
                    "{} operations never completed after the frees",
                    self.outstanding()
                ));
            }
            self.pump(Duration::from_millis(50));
        }
        wait_stats(
            &self.w,
            "nothing in flight, no timer armed, no connection",
            |s| {
                s.reads_in_flight == 0
                    && s.writes_in_flight == 0
                    && s.deadlines_armed == 0
                    && s.connections == 0
            },
        );
        for s in 0..self.slots.len() {
            self.check_peer_stream(s);
        }
        self.close();
        let mut rest = Vec::new();
        match self.w.wait_io_timeout(&mut rest, TIMEOUT) {
            Err(Error::WatcherClosed) => {}
            other => self.fail(format!(
                "after close and drain: {other:?}, {} completions",
                rest.len()
            )),
        }
    }

    fn finish_closed(&mut self) {
        // Everything accepted completes (most with WatcherClosed); then the mailbox closes.
        let start = Instant::now();
        loop {
            let mut batch = Vec::new();
            match self.w.wait_io_timeout(&mut batch, TIMEOUT) {
                Ok(0) => self.fail(format!("no completion and no close after {TIMEOUT:?}")),
                Ok(_) => {}
                Err(Error::WatcherClosed) => break,
                Err(e) => self.fail(format!("wait_io after close: {e}")),
            }
            for c in batch {
                self.check(c);
            }
            if start.elapsed() > TIMEOUT {
                self.fail("the mailbox never closed".into());
            }
        }
        if self.outstanding() > 0 {
            self.fail(format!(
                "{} operations never completed after close",
                self.outstanding()
            ));
        }
        let s = self.w.stats();
        if s.reads_in_flight + s.writes_in_flight + s.deadlines_armed + s.connections != 0 {
            self.fail(format!("stats after close: {s:?}"));
        }
        for s in 0..self.slots.len() {
            self.check_peer_stream(s);
        }
    }
}
