//! The poller thread: owns the selector's events, the connection table, the timers and the
//! internal read arena. Nothing here runs on a user thread (an inline watcher's driver runs
//! on the thread inside `wait_io`, one at a time).
//!
//! One round: take the control and command queues (new operations join their connection's
//! FIFO and mark it runnable when it is ready) -> run the runnable connections (bounded work
//! each) -> expire timers -> post the round's completions (and end the round for threads in
//! `wait_io`) -> `select` with a timeout of zero (work left), the nearest deadline, or
//! forever -> mark connections from the events.

use std::collections::{BinaryHeap, HashMap};

use crate::fifo::{Fifo, Slab};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use slotmap::{KeyData, SecondaryMap};

use std::task::{Context, Wake, Waker};

use crate::cmd::Kind;
use crate::conn::Key;
use crate::delivery::{self, Stalled};
use crate::stats::Stats;
use crate::watcher::{Ctl, Route, Shared};
use crate::{sys, Buf, Cmd, Completion, Conn, Error, Op};

/// The waker's event token. Slotmap never hands out index `u32::MAX`, so no key maps to it.
pub(crate) const WAKER_TOKEN: u64 = u64::MAX;

/// Syscalls one connection may make per direction per round: a flooding peer gets its turn,
/// then waits for the next round while the others get theirs.
const BUDGET: u32 = 16;
/// Queued writes gathered into one `sendmsg`.
const MAX_IOV: usize = 64;
/// The arena is refilled when less than this is left (or less than a whole chunk, if smaller).
const MIN_ARENA: usize = 2048;
/// How long a listener waits after a resource error (EMFILE and friends) before accepting again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// The sequence number of a listener's "resume accepting" timer; operations start at 1.
const RESUME: u64 = 0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Read,
    Write,
}

impl Dir {
    /// The FIFO an operation waits in: writes and what must follow or precede them (connect,
    /// shutdown) on the write side; reads and accepts on the read side.
    fn of(kind: &Kind) -> Dir {
        match kind {
            Kind::Write(_) | Kind::Connect | Kind::Shutdown => Dir::Write,
            _ => Dir::Read,
        }
    }
}

/// An accepted operation waiting in its connection's FIFO. The connection's handle is kept
/// once per connection (`ConnState::conn`), the deadline and idle period by its timers.
struct Pending {
    kind: Kind,
    done: usize,
    tag: u64,
    seq: u64,
    /// A deadline or idle timer refers to it (by `seq`).
    timed: bool,
}

/// What the poller keeps per connection. Its size is most of what an idle connection costs
/// (docs/benchmarks.md), hence the parked read and the millisecond progress stamps.
struct ConnState {
    fd: OwnedFd,
    /// Pending operations, in `Driver::ops`.
    reads: Fifo,
    writes: Fifo,
    /// A handle of this connection, held while any operation is pending: completions get
    /// clones, the last one gets this one, so the connection is released (after the user
    /// drops it) only when nothing is pending.
    conn: Option<Conn>,
    /// The tag of the parked read (see `parked`).
    parked_tag: u64,
    /// When bytes last moved in each direction (`Driver::stamp`), for idle timeouts.
    read_progress: u32,
    write_progress: u32,
    /// A plain `ReadInternal` (no timer) that is the connection's only read, kept here
    /// instead of in the slab: an idle connection waiting for input then costs no slab entry.
    /// It runs where it is (`read_parked`), and moves to the read FIFO only when another read
    /// queues behind it (or on a listener, where it fails at once).
    parked: bool,
    readable: bool,
    writable: bool,
    /// A short read does not prove the socket drained: the peer hung up or the socket
    /// errored (no further edge would come to say otherwise), or no read has seen `EAGAIN`
    /// since registration (events that arrived before the poller knew the key were dropped,
    /// a hang-up among them). Cleared by `EAGAIN`, which proves the socket drained with no
    /// end of stream waiting, so any later arrival is a new edge.
    hup: bool,
    /// A read returned 0: every later read completes with `Eof` without a syscall.
    eof: bool,
    /// In the runnable list.
    queued: bool,
    /// A listening socket: only `Accept` can succeed on it, and only `Accept` fails on a
    /// stream (see `ConnState::misdirected`).
    listener: bool,
    /// Accepts failed for lack of descriptors or memory: no read runs until the `RESUME`
    /// timer ends the pause, whatever readiness events say meanwhile.
    paused: bool,
}

impl ConnState {
    fn new(fd: OwnedFd, now: u32) -> ConnState {
        ConnState {
            fd,
            reads: Fifo::EMPTY,
            writes: Fifo::EMPTY,
            conn: None,
            parked_tag: 0,
            read_progress: now,
            write_progress: now,
            parked: false,
            readable: true,
            writable: true,
            // Until a read sees EAGAIN: see the field.
            hup: true,
            eof: false,
            queued: false,
            listener: false,
            paused: false,
        }
    }

    fn queue(&mut self, dir: Dir) -> &mut Fifo {
        match dir {
            Dir::Read => &mut self.reads,
            Dir::Write => &mut self.writes,
        }
    }

    /// `kind` cannot succeed on this socket: an `Accept` on a stream, a read on a listener.
    /// It fails at once with the OS's error (`EINVAL`, `ENOTCONN`), so it runs without
    /// waiting for readiness that may never come.
    fn misdirected(&self, kind: &Kind) -> bool {
        matches!(kind, Kind::Accept) != self.listener
    }

    fn idle(&self) -> bool {
        self.reads.is_empty() && self.writes.is_empty() && !self.parked
    }

    /// The handle for the completion of an operation just taken out of its queue: a clone
    /// while others are pending, else the held one.
    fn handle(&mut self) -> Conn {
        let conn = if self.idle() {
            self.conn.take()
        } else {
            self.conn.clone()
        };
        conn.expect("a connection with an operation pending holds its handle")
    }

    /// Takes the parked read out of its parking place, as the operation it stands for.
    fn take_parked(&mut self) -> Option<Pending> {
        if !self.parked {
            return None;
        }
        self.parked = false;
        Some(Pending {
            kind: Kind::ReadInternal,
            done: 0,
            tag: self.parked_tag,
            seq: 0,
            timed: false,
        })
    }

    /// Moves the parked read into the (empty) read FIFO, to run or to queue behind.
    fn unpark(&mut self, ops: &mut Slab<Pending>) {
        if let Some(p) = self.take_parked() {
            ops.push_back(&mut self.reads, p);
        }
    }

    /// Parks the read FIFO's only entry if it is a plain internal read.
    fn park(&mut self, ops: &mut Slab<Pending>) {
        let plain = |p: &Pending| matches!(p.kind, Kind::ReadInternal) && !p.timed;
        if self.reads.is_single() && ops.front(&self.reads).is_some_and(plain) {
            let p = ops.pop_front(&mut self.reads).expect("front exists");
            self.parked = true;
            self.parked_tag = p.tag;
        }
    }
}

/// A deadline or idle check for the operation `seq`. Cancellation is lazy: a timer whose
/// operation is gone is skipped when it pops (O(log n)), and the heap is compacted when stale
/// entries outnumber live ones.
///
/// Ordered by time, then by operation (oldest first); equality is the same relation, so two
/// timers of one operation due at the same instant (a deadline and an idle check) are equal.
struct Timer {
    when: Instant,
    seq: u64,
    id: Key,
    dir: Dir,
    /// An idle check, of this period; `None` for a deadline.
    idle: Option<Duration>,
}

impl Ord for Timer {
    // Reversed, so the std max-heap pops the earliest (then the oldest operation) first.
    fn cmp(&self, other: &Timer) -> std::cmp::Ordering {
        other.when.cmp(&self.when).then(other.seq.cmp(&self.seq))
    }
}

impl PartialEq for Timer {
    fn eq(&self, other: &Timer) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Timer {}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Timer) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// What one accept gave: the new socket and the peer's address, or the error.
type AcceptResult = io::Result<(OwnedFd, Option<SocketAddr>)>;

/// A completion and, for a routed connection, the channel it goes to.
type Outgoing = (Completion, Option<flume::Sender<Completion>>);

/// The round's completions and the counters, kept apart from the connection table so both
/// can be borrowed at once.
struct Sink {
    out: Vec<Outgoing>,
    stats: Stats,
    /// Accepts done this round (with the listener's handle): the sockets, registered once
    /// the listener's state is not borrowed, and the errors, completed with them so that
    /// accepts complete in the order they were sent.
    accepted: Vec<(Pending, Conn, AcceptResult)>,
    /// The routes of connections registered with one (rare: `register_with`, pools), kept
    /// until the connection is released so that even commands refused after a `Free` reach
    /// the right mailbox.
    routes: HashMap<Key, Box<Route>>,
    /// An inline watcher with its own mailbox: completions for the mailbox are kept here
    /// for the thread driving the watcher to take (`Driver::take_direct`), with no channel
    /// between (and no stop in `out`).
    direct: Option<Vec<Completion>>,
    /// Completions made this round (in `out` or `direct`), counted by `flush`.
    made: u64,
}

impl Sink {
    /// Completes `p`, an operation of `st` just taken out of its queue.
    fn complete(
        &mut self,
        st: &mut ConnState,
        p: Pending,
        result: Result<(), Error>,
        buf: Option<Buf>,
    ) {
        let conn = st.handle();
        self.finish(p, conn, result, buf);
    }

    fn finish(&mut self, p: Pending, conn: Conn, result: Result<(), Error>, buf: Option<Buf>) {
        match Dir::of(&p.kind) {
            Dir::Write => self.stats.writes_in_flight -= 1,
            Dir::Read => self.stats.reads_in_flight -= 1,
        }
        let op = p.kind.op();
        if p.timed {
            self.stats.deadlines_armed -= 1;
        }
        if matches!(result, Err(Error::Deadline | Error::IdleTimeout)) {
            self.stats.deadlines_fired += 1;
        }
        let buf = buf.unwrap_or_else(|| p.kind.into_buf());
        let (tag, n) = (p.tag, p.done);
        self.push(Completion {
            conn,
            op,
            tag,
            buf,
            n,
            result,
        });
    }

    /// Completes a command that never became pending (unknown connection, closed watcher).
    fn reject(&mut self, conn: Conn, cmd: Cmd, err: Error) {
        let (op, tag) = (cmd.op(), cmd.tag);
        let buf = cmd.into_buf();
        self.push(Completion {
            conn,
            op,
            tag,
            buf,
            n: 0,
            result: Err(err),
        });
    }

    fn post(&mut self, conn: Conn, op: Op, tag: u64, buf: Buf) {
        self.push(Completion {
            conn,
            op,
            tag,
            buf,
            n: 0,
            result: Ok(()),
        });
    }

    #[inline(always)]
    fn push(&mut self, c: Completion) {
        self.made += 1;
        let to = if self.routes.is_empty() {
            None
        } else {
            let route = self.routes.get(&c.conn.inner.id);
            route.and_then(|r| r.mailbox.clone())
        };
        match (&mut self.direct, to) {
            (Some(direct), None) => {
                // Handed to the thread driving the watcher: delivered.
                if delivery::counts(&c) {
                    c.conn.op_done();
                }
                direct.push(c)
            }
            (_, to) => self.out.push((c, to)),
        }
    }
}

/// The internal read buffer: chunks whose spare capacity the kernel reads into, handed out
/// as `Bytes` slices. Never zeroed: `recv` initialises what it reports.
struct Arena {
    buf: BytesMut,
    chunk: usize,
}

impl Arena {
    /// Makes sure a useful amount of space is left, reusing the used-up chunk when no slice
    /// of it is still held. Returns how much one read may take.
    #[inline]
    fn refill(&mut self, stats: &mut Stats) -> usize {
        let want = self.chunk.min(MIN_ARENA);
        if self.spare() < want {
            self.buf.clear();
            if !self.buf.try_reclaim(self.chunk) {
                self.buf = BytesMut::with_capacity(self.chunk);
                stats.chunks_allocated += 1;
            }
        }
        self.spare().min(self.chunk)
    }

    fn spare(&self) -> usize {
        self.buf.capacity() - self.buf.len()
    }

    /// One internal read from `fd` into the arena: the result and how much it asked for.
    #[inline]
    fn recv(&mut self, fd: BorrowedFd<'_>, stats: &mut Stats) -> (io::Result<usize>, usize) {
        let max = self.refill(stats);
        (sys::recv_spare(fd, &mut self.buf, max), max)
    }

    /// The `n` bytes the last read got, as the internal read's buffer.
    #[inline]
    fn take(&mut self, n: usize) -> Buf {
        Buf::Bytes(self.buf.split_to(n).freeze())
    }
}

/// Wakes the poller (its eventfd) when a full channel it waits on makes room.
struct RoomWaker(Arc<Shared>);

impl Wake for RoomWaker {
    fn wake(self: Arc<Self>) {
        // A failed write means the eventfd is broken; nothing better to do here.
        let _ = self.0.waker.wake();
    }
}

pub(crate) struct Driver {
    shared: Arc<Shared>,
    /// The inbox's queues as the last take left them (empty, allocation kept): swapped with
    /// the inbox's each round.
    ops_in: Vec<(Conn, Cmd)>,
    ctl_in: Vec<Ctl>,
    mailbox: flume::Sender<Completion>,
    /// Completions that full bounded channels did not take yet: one queue per channel, in
    /// order, so a receiver that stops draining holds back its own completions only.
    backlog: Vec<Stalled>,
    /// Wakes this poller when a stalled channel makes room (`delivery`).
    room: Waker,
    /// An inline step returned without collecting events (its round posted completions).
    skipped_wait: bool,
    conns: SecondaryMap<Key, ConnState>,
    /// Every connection's pending operations.
    ops: Slab<Pending>,
    /// Connections with work they can do now; entries past the round's start are next round's.
    ready: Vec<Key>,
    timers: BinaryHeap<Timer>,
    sink: Sink,
    arena: Arena,
    events: sys::Events,
    seq: u64,
    now: Instant,
    /// The origin of the millisecond stamps (`stamp`).
    epoch: Instant,
}

impl Driver {
    pub(crate) fn new(
        shared: Arc<Shared>,
        mailbox: flume::Sender<Completion>,
        chunk: usize,
        events_capacity: usize,
    ) -> Driver {
        Driver {
            room: Waker::from(Arc::new(RoomWaker(shared.clone()))),
            shared,
            ops_in: Vec::new(),
            ctl_in: Vec::new(),
            mailbox,
            backlog: Vec::new(),
            skipped_wait: false,
            conns: SecondaryMap::new(),
            ops: Slab::new(),
            ready: Vec::new(),
            timers: BinaryHeap::new(),
            sink: Sink {
                out: Vec::new(),
                stats: Stats::default(),
                accepted: Vec::new(),
                routes: HashMap::new(),
                direct: None,
                made: 0,
            },
            arena: Arena {
                buf: BytesMut::new(),
                chunk,
            },
            events: sys::Events::with_capacity(events_capacity),
            seq: 0,
            now: Instant::now(),
            epoch: Instant::now(),
        }
    }

    /// Completions go to `take_direct` instead of the mailbox (an inline watcher with a
    /// mailbox of its own: no one else can be waiting on it).
    pub(crate) fn deliver_direct(&mut self) {
        self.sink.direct = Some(Vec::new());
    }

    /// Moves the completions kept for the driving thread to the end of `out`.
    pub(crate) fn take_direct(&mut self, out: &mut Vec<Completion>) {
        if let Some(direct) = &mut self.sink.direct {
            if out.is_empty() {
                std::mem::swap(out, direct);
            } else {
                out.append(direct);
            }
        }
    }

    /// The poller thread's loop: rounds until the watcher is closed.
    pub(crate) fn run(&mut self) {
        while self.process() {
            let timeout = self.next_timeout();
            self.wait(timeout);
        }
    }

    /// After a panic while driving (a bug of this crate, or user code the poller ran, such
    /// as the `Drop` of a write buffer's owner): the watcher counts as closed, as after
    /// `close`, and every pending operation and queued command is completed with
    /// `WatcherClosed` as far as the half-updated state allows. Should the shutdown panic
    /// too, the commands still queued are completed straight into the mailbox.
    pub(crate) fn abandon(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        if catch_unwind(AssertUnwindSafe(|| self.shutdown())).is_ok() {
            return;
        }
        let queued = {
            let mut inbox = self.shared.inbox();
            inbox.sealed = true;
            std::mem::take(&mut inbox.ops)
        };
        let left = std::mem::take(&mut self.ops_in).into_iter().chain(queued);
        for (conn, cmd) in left {
            let (op, tag) = (cmd.op(), cmd.tag);
            let c = Completion {
                conn,
                op,
                tag,
                buf: cmd.into_buf(),
                n: 0,
                result: Err(Error::WatcherClosed),
            };
            // Never blocks: a full bounded mailbox loses it (the state may be broken).
            let _ = self.mailbox.try_send(c);
        }
    }

    /// One step of an inline watcher, on the caller's thread: a round, and if it posted
    /// nothing, a wait for events (at most until `deadline`) and another round. A round that
    /// posted returns at once (its completions are what the caller waits for), but never
    /// twice in a row: the next one collects events without blocking first, or a connection
    /// whose operations complete every round would keep the others' readiness unseen.
    /// Returns `false` once the watcher is closed and shut down.
    ///
    /// The caller may have been away since the last step, so the step starts from the time
    /// now (progress stamps, idle periods), and if a timer fell due meanwhile it first
    /// collects the readiness that arrived meanwhile: data that came before a read's deadline
    /// completes the read, as it would have on a poller thread.
    pub(crate) fn step(&mut self, deadline: Option<Instant>) -> bool {
        self.now = Instant::now();
        if self.timers.peek().is_some_and(|t| t.when <= self.now) {
            self.wait(Some(Duration::ZERO));
            self.skipped_wait = false;
        }
        let posted = self.sink.stats.completions;
        if !self.process() {
            return false;
        }
        // (An inline watcher has no backlog: its own mailbox is unbounded and it refuses
        // bounded routes.)
        let timeout = if self.sink.stats.completions != posted {
            if !self.skipped_wait {
                self.skipped_wait = true;
                return true;
            }
            Some(Duration::ZERO)
        } else {
            let timeout = self.next_timeout();
            match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    Some(timeout.map_or(left, |t| t.min(left)))
                }
                None => timeout,
            }
        };
        self.skipped_wait = false;
        self.wait(timeout);
        self.process()
    }

    /// Everything of a round but the wait: commands, I/O, timers, completions. Returns
    /// `false` (after shutting down) if the watcher was closed.
    fn process(&mut self) -> bool {
        self.take_inbox(false);
        self.run_ctl();
        self.run_ops();
        if self.shared.closed.load(Ordering::SeqCst) {
            self.shutdown();
            return false;
        }
        self.run_ready();
        if !self.timers.is_empty() {
            self.now = Instant::now();
            self.expire();
        }
        self.flush();
        true
    }

    /// Swaps the inbox's queues with our empty ones: only what is queued now, so a busy
    /// sender cannot keep the poller from its sockets. `seal` makes it the last take.
    fn take_inbox(&mut self, seal: bool) {
        let mut inbox = self.shared.inbox();
        inbox.sealed |= seal;
        std::mem::swap(&mut inbox.ops, &mut self.ops_in);
        std::mem::swap(&mut inbox.ctl, &mut self.ctl_in);
    }

    fn run_ctl(&mut self) {
        if self.ctl_in.is_empty() {
            return;
        }
        let mut ctl = std::mem::take(&mut self.ctl_in);
        for msg in ctl.drain(..) {
            match msg {
                Ctl::Register {
                    id,
                    fd,
                    connect,
                    route,
                    listener,
                } => {
                    let mut st = ConnState::new(fd, stamp(self.epoch, self.now));
                    st.listener = listener;
                    self.conns.insert(id, st);
                    self.sink.stats.connections += 1;
                    if let Some(route) = route {
                        self.sink.routes.insert(id, route);
                    }
                    if let Some((conn, to)) = connect {
                        let cmd = Cmd {
                            kind: Kind::Connect,
                            deadline: to.deadline,
                            idle: None,
                            tag: to.tag,
                        };
                        self.enqueue(id, conn, cmd);
                    }
                }
                // No operation can be pending (the state holds a handle then): just close.
                Ctl::Release(id) => {
                    drop(self.remove(id));
                    if !self.sink.routes.is_empty() {
                        self.sink.routes.remove(&id);
                    }
                }
                // Its registration was taken with it or before (registering comes first).
                Ctl::Last(conn, cmd) => self.submit(conn, cmd),
            }
        }
        self.ctl_in = ctl; // keep the allocation
    }

    fn run_ops(&mut self) {
        if self.ops_in.is_empty() {
            return;
        }
        // The time the commands are taken starts their idle periods: `now` from before the
        // wait could be earlier than a command was sent, firing its timeout early.
        self.now = Instant::now();
        let mut ops = std::mem::take(&mut self.ops_in);
        for (conn, cmd) in ops.drain(..) {
            self.submit(conn, cmd);
        }
        self.ops_in = ops;
    }

    fn remove(&mut self, id: Key) -> Option<ConnState> {
        let st = self.conns.remove(id)?;
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        self.shared.ids().remove(id);
        self.sink.stats.connections -= 1;
        Some(st)
    }

    /// Removes a connection, completing its pending operations with `err`.
    fn retire(&mut self, id: Key, err: fn() -> Error) -> Option<OwnedFd> {
        let mut st = self.remove(id)?;
        st.unpark(&mut self.ops);
        for dir in [Dir::Read, Dir::Write] {
            while let Some(p) = self.ops.pop_front(st.queue(dir)) {
                self.sink.complete(&mut st, p, Err(err()), None);
            }
        }
        Some(st.fd)
    }

    fn submit(&mut self, conn: Conn, cmd: Cmd) {
        let id = conn.inner.id;
        // (`enqueue` refuses the other commands of an unknown connection itself.)
        if !cmd.is_last() {
            return self.enqueue(id, conn, cmd);
        }
        let Some(fd) = self.retire(id, || Error::Freed) else {
            return self.sink.reject(conn, cmd, Error::Freed);
        };
        if matches!(cmd.kind, Kind::Free) {
            drop(fd);
            return self.sink.post(conn, Op::Free, cmd.tag, Buf::None);
        }
        // Best effort: with the fd still open the registration would go on reporting events
        // under a key that no longer exists (ignored).
        let _ = self.shared.selector.deregister(fd.as_raw_fd());
        self.sink.post(conn, Op::Detach, cmd.tag, Buf::Fd(fd));
    }

    /// Appends an operation to its connection's FIFO (or parks it), arms its timers, and
    /// marks the connection runnable if that direction can make progress now.
    fn enqueue(&mut self, id: Key, conn: Conn, cmd: Cmd) {
        let Some(st) = self.conns.get_mut(id) else {
            return self.sink.reject(conn, cmd, Error::Freed);
        };
        let Cmd {
            kind,
            deadline,
            mut idle,
            tag,
        } = cmd;
        // An idle timeout means nothing to an accept (no bytes move), nor one too long to
        // represent: both are no idle timeout, without a timer.
        if idle.is_some_and(|d| matches!(kind, Kind::Accept) || self.now.checked_add(d).is_none()) {
            idle = None;
        }
        if st.conn.is_none() {
            st.conn = Some(conn);
        }
        let dir = Dir::of(&kind);
        let stats = &mut self.sink.stats;
        match dir {
            Dir::Read => stats.reads_in_flight += 1,
            Dir::Write => stats.writes_in_flight += 1,
        }
        let timed = deadline.is_some() || idle.is_some();
        if !timed && matches!(kind, Kind::ReadInternal) && st.reads.is_empty() && !st.parked {
            st.parked = true;
            st.parked_tag = tag;
        } else {
            if dir == Dir::Read {
                st.unpark(&mut self.ops);
            }
            self.seq += 1;
            let seq = self.seq;
            if timed {
                stats.deadlines_armed += 1;
                let idle_at = idle.and_then(|d| Some((self.now.checked_add(d)?, d)));
                debug_assert_eq!(idle.is_some(), idle_at.is_some());
                let timers = [
                    deadline.map(|at| (at, None)),
                    idle_at.map(|(at, d)| (at, Some(d))),
                ];
                for (when, idle) in timers.into_iter().flatten() {
                    self.timers.push(Timer {
                        when,
                        seq,
                        id,
                        dir,
                        idle,
                    });
                }
            }
            let p = Pending {
                kind,
                done: 0,
                tag,
                seq,
                timed,
            };
            self.ops.push_back(st.queue(dir), p);
        }
        mark_runnable(&mut self.ready, st, &self.ops, id);
    }

    fn run_ready(&mut self) {
        let n = self.ready.len();
        if n == 0 {
            return;
        }
        for i in 0..n {
            let id = self.ready[i];
            let Some(st) = self.conns.get_mut(id) else {
                continue;
            };
            let moved = (self.sink.stats.bytes_read, self.sink.stats.bytes_written);
            // A parked read is the connection's only read (the read FIFO is empty).
            let paused = if st.parked && !st.listener {
                // The common case, an idle connection's one read: run it in place.
                if (st.readable || st.eof) && !reads_held(st, &self.ops) {
                    read_parked(st, &mut self.sink, &mut self.arena);
                }
                false
            } else {
                // (On a listener a parked read, a `ReadInternal`, fails at once.)
                st.unpark(&mut self.ops);
                let paused = do_reads(st, &mut self.ops, &mut self.sink, &mut self.arena);
                st.park(&mut self.ops);
                paused
            };
            do_writes(st, &mut self.ops, &mut self.sink);
            // Progress is stamped with the time the bytes moved, read now: the round's start
            // may be long past (a long round, a preempted poller), and a stamp that early
            // would let an idle timeout fire early. One clock read per connection that moved.
            let stats = &self.sink.stats;
            let (read, written) = (stats.bytes_read != moved.0, stats.bytes_written != moved.1);
            if read || written {
                let t = stamp(self.epoch, Instant::now());
                if read {
                    st.read_progress = t;
                }
                if written {
                    st.write_progress = t;
                }
            }
            st.queued = runnable(st, &self.ops);
            if st.queued {
                self.ready.push(id);
            }
            if paused {
                // From the failure itself: `now` is the round's start, which a preempted
                // poller may have left long ago (a pause is rare; the clock read is cheap).
                let when = Instant::now() + ACCEPT_PAUSE;
                self.timers.push(Timer {
                    when,
                    seq: RESUME,
                    id,
                    dir: Dir::Read,
                    idle: None,
                });
            }
            if !self.sink.accepted.is_empty() {
                let mut accepted = std::mem::take(&mut self.sink.accepted);
                for (p, listener, result) in accepted.drain(..) {
                    match result {
                        Ok((fd, peer)) => self.adopt_accepted(p, listener, fd, peer),
                        Err(e) => self.sink.finish(p, listener, Err(Error::Io(e)), None),
                    }
                }
                self.sink.accepted = accepted; // keep the allocation
            }
        }
        if self.ready.len() == n {
            self.ready.clear();
        } else {
            self.ready.drain(..n);
        }
    }

    /// Registers an accepted socket (on this watcher, or on the least-loaded watcher of the
    /// listener's pool) and completes its `Accept`. The new connection inherits the
    /// listener's mailbox route.
    fn adopt_accepted(
        &mut self,
        p: Pending,
        listener: Conn,
        fd: OwnedFd,
        peer: Option<SocketAddr>,
    ) {
        let own = self.sink.routes.get(&listener.inner.id);
        let spread = own.and_then(|r| r.spread.clone());
        let route = Route {
            mailbox: own.and_then(|r| r.mailbox.clone()),
            spread: None,
        };
        let target = spread
            .as_ref()
            .map_or(&self.shared, |s| &s.targets[s.pick()]);
        match target.adopt(fd, None, route, false) {
            Ok(conn) => self
                .sink
                .finish(p, listener, Ok(()), Some(Buf::Accepted(conn, peer))),
            // The accepted socket is closed with the error.
            Err(e) => self.sink.finish(p, listener, Err(e.into()), None),
        }
    }

    fn expire(&mut self) {
        let now = self.now;
        while self.timers.peek().is_some_and(|t| t.when <= now) {
            let Some(t) = self.timers.pop() else { break };
            let Some(st) = self.conns.get_mut(t.id) else {
                continue;
            };
            if t.seq == RESUME {
                st.paused = false;
                st.readable = true;
                mark_runnable(&mut self.ready, st, &self.ops, t.id);
                continue;
            }
            let q = st.queue(t.dir);
            if !self.ops.iter(q).any(|p| p.seq == t.seq) {
                continue;
            }
            if let Some(idle) = t.idle {
                // The timer fired no earlier than `idle` after the command was taken (or
                // after the progress that last re-armed it); it is over unless bytes moved in
                // this direction within the last `idle`.
                let progress = match t.dir {
                    Dir::Read => st.read_progress,
                    Dir::Write => st.write_progress,
                };
                let since = since_progress(stamp(self.epoch, now).wrapping_sub(1), progress);
                if since < idle {
                    self.timers.push(Timer {
                        when: now + (idle - since),
                        ..t
                    });
                    continue;
                }
            }
            let q = st.queue(t.dir);
            let Some(p) = self.ops.remove(q, |p| p.seq == t.seq) else {
                continue;
            };
            let err = if t.idle.is_some() {
                Error::IdleTimeout
            } else {
                Error::Deadline
            };
            self.sink.complete(st, p, Err(err), None);
            // What was behind it may run now without a new event (a `Shutdown` after a
            // write cut short by its deadline, against a peer that reads nothing).
            mark_runnable(&mut self.ready, st, &self.ops, t.id);
        }
        // Compact when completed operations' timers dominate the heap.
        let armed = self.sink.stats.deadlines_armed as usize;
        if self.timers.len() > 2 * armed + 1024 {
            let (conns, ops) = (&mut self.conns, &self.ops);
            self.timers.retain(|t| {
                conns.get_mut(t.id).is_some_and(|st| {
                    t.seq == RESUME || ops.iter(st.queue(t.dir)).any(|p| p.seq == t.seq)
                })
            });
        }
    }

    fn flush(&mut self) {
        let stats = &mut self.sink.stats;
        if self.sink.made > 0 {
            stats.batches += 1;
            stats.completions += self.sink.made;
            self.sink.made = 0;
        }
        // Whether anything reached a channel: a waiter must then be woken, also when all of
        // it came from the backlog (room was made) and this round completed nothing.
        let mut posted = false;
        // The stalled channels first: what waits there is older.
        if !self.backlog.is_empty() {
            let mut cx = Context::from_waker(&self.room);
            posted |= delivery::pump_all(&mut self.backlog, &mut cx);
        }
        // (Skipped when empty, as an inline watcher's is: a drain costs its set-up.)
        if !self.sink.out.is_empty() {
            let mailbox = &self.mailbox;
            for (c, to) in self.sink.out.drain(..) {
                let to = to.as_ref().unwrap_or(mailbox);
                posted |= delivery::deliver(&mut self.backlog, to, c);
            }
            if !self.backlog.is_empty() {
                // A queue that started this round: its head waits for room with our waker.
                let mut cx = Context::from_waker(&self.room);
                posted |= delivery::pump_all(&mut self.backlog, &mut cx);
            }
        }
        self.sink.stats.stalled_completions = delivery::waiting(&self.backlog) as u64;
        self.sink.stats.timer_entries = self.timers.len() as u64;
        self.shared.stats.publish(&self.sink.stats);
        if posted && self.sink.direct.is_none() {
            self.shared.rounds.ended();
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        self.timers
            .peek()
            .map(|t| t.when.saturating_duration_since(self.now))
    }

    fn wait(&mut self, mut timeout: Option<Duration>) {
        if timeout != Some(Duration::ZERO) {
            // See `Shared::release_and_wake` for the other half of this handshake.
            self.shared.sleeping.store(true, Ordering::Relaxed);
            let inbox = self.shared.inbox();
            if !inbox.ops.is_empty() || !inbox.ctl.is_empty() || inbox.sealed {
                timeout = Some(Duration::ZERO);
            }
            drop(inbox);
            if self.shared.closed.load(Ordering::SeqCst) {
                timeout = Some(Duration::ZERO);
            }
        }
        if self
            .shared
            .selector
            .select(&mut self.events, timeout)
            .is_err()
        {
            // Only EBADF/EFAULT/EINVAL remain, not expected with our own fd and buffer and a
            // timeout the selector caps; do not spin if one happens all the same.
            thread::sleep(Duration::from_millis(1));
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
        self.sink.stats.wakeups += 1;
        self.now = Instant::now();
        for ev in self.events.iter() {
            if ev.token == WAKER_TOKEN {
                self.shared.waker.reset();
                continue;
            }
            let id = Key::from(KeyData::from_ffi(ev.token));
            // A stale key (freed connection, or one whose slot was reused) finds nothing.
            let Some(st) = self.conns.get_mut(id) else {
                continue;
            };
            st.readable |= ev.readable;
            st.writable |= ev.writable;
            st.hup |= ev.hup;
            mark_runnable(&mut self.ready, st, &self.ops, id);
        }
    }

    pub(crate) fn shutdown(&mut self) {
        // Nobody may come to take direct completions any more (`Watcher::close`): what is
        // kept goes to the mailbox, ahead of what the shutdown completes.
        if let Some(direct) = self.sink.direct.take() {
            for c in direct {
                let _ = self.mailbox.send(c); // unbounded (inline), or nobody receives
            }
        }
        // The last take: later pushes fail with `Closed`.
        self.take_inbox(true);
        self.run_ctl();
        // Pending operations first: they were submitted before anything still queued.
        let ids: Vec<Key> = self.conns.keys().collect();
        for id in ids {
            drop(self.retire(id, || Error::WatcherClosed));
        }
        for (conn, cmd) in std::mem::take(&mut self.ops_in) {
            self.sink.reject(conn, cmd, Error::WatcherClosed);
        }
        self.flush();
        self.drain_backlog();
    }

    /// What still waits for room in bounded channels goes on waiting on a thread of its own
    /// (`delivery::drain`), which ends a round for `wait_io` after each delivery and at the
    /// end, so waiters see the mailbox closed after the last completion.
    fn drain_backlog(&mut self) {
        let shared = self.shared.clone();
        delivery::drain(std::mem::take(&mut self.backlog), move || {
            shared.rounds.ended()
        });
    }
}

/// How long before `now_ms` (a stamp rounded down) the `progress` stamp was. Stamps are
/// rounded up, so the result is never longer than the truth, and one from the same
/// millisecond (a difference of -1) counts as zero. A difference further below zero can only
/// be a stamp more than 24.8 days old whose distance wrapped: it counts as long ago
/// (`Duration::MAX`), or a short idle timeout would be re-armed for another 24.8 days.
fn since_progress(now_ms: u32, progress: u32) -> Duration {
    match now_ms.wrapping_sub(progress) as i32 {
        d if d >= 0 => Duration::from_millis(d as u64),
        -2..=-1 => Duration::ZERO,
        _ => Duration::MAX,
    }
}

/// `t` in milliseconds since `epoch`, rounded up and wrapping every 49.7 days: a progress
/// stamp. Rounding up makes the time since progress come out short, never long, so an idle
/// timeout is re-armed late rather than fired early.
fn stamp(epoch: Instant, t: Instant) -> u32 {
    (t.saturating_duration_since(epoch).as_millis() as u32).wrapping_add(1)
}

/// Runs the read FIFO (a parked read moved into it first, by the caller). Returns `true` if a
/// listener hit a resource limit and must pause.
fn do_reads(
    st: &mut ConnState,
    ops: &mut Slab<Pending>,
    sink: &mut Sink,
    arena: &mut Arena,
) -> bool {
    if reads_held(st, ops) {
        return false;
    }
    let mut budget = BUDGET;
    while let Some(p) = ops.front_mut(&st.reads) {
        if st.eof {
            let p = ops.pop_front(&mut st.reads).expect("front exists");
            sink.complete(st, p, Err(Error::Eof), None);
            continue;
        }
        if (!st.readable && !st.misdirected(&p.kind)) || budget == 0 {
            break;
        }
        budget -= 1;
        let fd = st.fd.as_fd();
        let (res, asked) = match &mut p.kind {
            Kind::Read(buf) => (sys::recv(fd, &mut buf[..]), buf.len()),
            Kind::ReadFull(buf) => (sys::recv(fd, &mut buf[p.done..]), buf.len() - p.done),
            Kind::ReadInternal => arena.recv(fd, &mut sink.stats),
            Kind::Write(_) | Kind::Connect | Kind::Shutdown | Kind::Free | Kind::Detach => {
                unreachable!("only reads and accepts wait in the read FIFO")
            }
            Kind::Accept => {
                let result = sys::accept(fd);
                if matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                    st.readable = false;
                    continue;
                }
                let pause = matches!(&result, Err(e) if is_resource_error(e));
                let p = ops.pop_front(&mut st.reads).expect("front exists");
                let listener = st.handle();
                sink.accepted.push((p, listener, result));
                if pause {
                    // Until the pause ends: a readiness event collected after this failure
                    // (the connection that made the listener readable arrived before it)
                    // must not start a second round of attempts.
                    st.paused = true;
                    st.readable = false;
                    return true;
                }
                continue;
            }
        };
        match read_outcome(st, res, asked, &mut sink.stats) {
            None => {} // drained: `readable` is down, the loop ends
            Some(Ok(n)) => {
                let mut data = None;
                match p.kind {
                    Kind::ReadFull(ref buf) => {
                        p.done += n;
                        if p.done < buf.len() {
                            continue;
                        }
                    }
                    Kind::ReadInternal => {
                        p.done = n;
                        data = Some(arena.take(n));
                    }
                    _ => p.done = n,
                }
                let p = ops.pop_front(&mut st.reads).expect("front exists");
                sink.complete(st, p, Ok(()), data);
            }
            Some(Err(e)) => {
                let p = ops.pop_front(&mut st.reads).expect("front exists");
                sink.complete(st, p, Err(e), None);
            }
        }
    }
    false
}

/// What one `recv` of `asked` bytes means for the read that made it, with the connection's
/// flags and counters updated: `Some(Ok(n))` bytes arrived (n > 0), `Some(Err(..))` the read
/// ends (end of stream, an error), `None` the socket is drained and the read waits.
fn read_outcome(
    st: &mut ConnState,
    res: io::Result<usize>,
    asked: usize,
    stats: &mut Stats,
) -> Option<Result<usize, Error>> {
    match res {
        Ok(0) => {
            st.eof = true;
            Some(Err(Error::Eof))
        }
        Ok(n) => {
            stats.bytes_read += n as u64;
            // A short read drained the socket; the next arrival is a new edge. After a
            // hang-up no edge will come, so keep reading until the socket says EOF.
            if n < asked && !st.hup {
                st.readable = false;
            }
            Some(Ok(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            st.readable = false;
            st.hup = false;
            None
        }
        Err(e) => Some(Err(Error::Io(e))),
    }
}

/// Runs a parked read where it is, without the trip through the read FIFO that `do_reads`
/// would take (unpark, run, park again): the read of every idle connection of an echo or
/// chat server, so the common case. The caller checked that it may run (not a listener,
/// readable or at end of stream, reads not held).
fn read_parked(st: &mut ConnState, sink: &mut Sink, arena: &mut Arena) {
    let outcome = if st.eof {
        Some(Err(Error::Eof))
    } else {
        let (res, asked) = arena.recv(st.fd.as_fd(), &mut sink.stats);
        read_outcome(st, res, asked, &mut sink.stats)
    };
    let Some(outcome) = outcome else {
        return; // drained: it stays parked
    };
    let mut p = st.take_parked().expect("the caller saw it parked");
    match outcome {
        Ok(n) => {
            p.done = n;
            sink.complete(st, p, Ok(()), Some(arena.take(n)));
        }
        Err(e) => sink.complete(st, p, Err(e), None),
    }
}

/// Out of descriptors or kernel memory: retrying at once would fail the same way.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn write_buf(p: &Pending) -> &[u8] {
    match &p.kind {
        Kind::Write(b) => &b[p.done..],
        _ => &[],
    }
}

/// Sends the plain writes at the head of `q`: one `send` for a lone write (the common case,
/// without building an iovec array), else up to `MAX_IOV` in one `sendmsg`. Returns the
/// result and how many bytes were asked for.
fn send_writes(fd: BorrowedFd<'_>, ops: &Slab<Pending>, q: &Fifo) -> (io::Result<usize>, usize) {
    let is_write = |p: &Pending| matches!(p.kind, Kind::Write(_));
    let mut writes = ops.iter(q).take_while(|p| is_write(p));
    let first = writes.next().map_or(&[][..], write_buf);
    if !matches!(ops.iter(q).nth(1), Some(p) if is_write(p)) {
        return (sys::send(fd, first), first.len());
    }
    let mut iov = [IoSlice::new(&[]); MAX_IOV];
    iov[0] = IoSlice::new(first);
    let (mut k, mut asked) = (1, first.len());
    for p in writes.take(MAX_IOV - 1) {
        iov[k] = IoSlice::new(write_buf(p));
        asked += iov[k].len();
        k += 1;
    }
    (sys::send_vectored(fd, &iov[..k]), asked)
}

/// Whether `st` can make progress now: reads that are not held and either have readiness
/// or cannot succeed anyway (`ConnState::misdirected`), or writes on a writable socket; a
/// `Shutdown` at the head needs no buffer space, so it runs whether or not the socket is
/// writable.
fn runnable(st: &ConnState, ops: &Slab<Pending>) -> bool {
    let next_read = match ops.front(&st.reads) {
        Some(p) => Some(&p.kind),
        None if st.parked => Some(&Kind::ReadInternal),
        None => None,
    };
    let reads = next_read.is_some_and(|k| st.readable || st.eof || st.misdirected(k))
        && !reads_held(st, ops);
    let head = write_head(st, ops);
    let writes = head.is_some() && (st.writable || matches!(head, Some(Kind::Shutdown)));
    reads || writes
}

/// Puts `st` (connection `id`) in the runnable list if it can make progress now and is not
/// there yet.
#[inline]
fn mark_runnable(ready: &mut Vec<Key>, st: &mut ConnState, ops: &Slab<Pending>, id: Key) {
    if !st.queued && runnable(st, ops) {
        st.queued = true;
        ready.push(id);
    }
}

/// Reads wait during an accept pause, and while a `Connect` heads the write FIFO: a read
/// would take a failed connect's error from the socket, and the connect would then never
/// learn it.
fn reads_held(st: &ConnState, ops: &Slab<Pending>) -> bool {
    st.paused || matches!(write_head(st, ops), Some(Kind::Connect))
}

fn write_head<'a>(st: &ConnState, ops: &'a Slab<Pending>) -> Option<&'a Kind> {
    ops.front(&st.writes).map(|p| &p.kind)
}

fn shutdown_at_head(st: &ConnState, ops: &Slab<Pending>) -> bool {
    matches!(write_head(st, ops), Some(Kind::Shutdown))
}

fn do_writes(st: &mut ConnState, ops: &mut Slab<Pending>, sink: &mut Sink) {
    let mut budget = BUDGET;
    while budget > 0 && (st.writable || shutdown_at_head(st, ops)) {
        let Some(head) = ops.front(&st.writes) else {
            break;
        };
        budget -= 1;
        let fd = st.fd.as_fd();
        // Operations that are not plain writes run alone, when they reach the head.
        let special = match head.kind {
            // Writable (or errored) after a non-blocking connect: see how it went.
            Kind::Connect => Some(sys::connect_finished(fd)),
            // Every write before it is done: send FIN.
            Kind::Shutdown => Some(sys::shutdown_write(fd).map(|()| true)),
            _ => None,
        };
        if let Some(r) = special {
            match r {
                Ok(false) => st.writable = false,
                Ok(true) => {
                    let p = ops.pop_front(&mut st.writes).expect("front exists");
                    sink.complete(st, p, Ok(()), None);
                }
                Err(e) => {
                    let p = ops.pop_front(&mut st.writes).expect("front exists");
                    sink.complete(st, p, Err(Error::Io(e)), None);
                }
            }
            continue;
        }
        let (sent, asked) = send_writes(fd, ops, &st.writes);
        match sent {
            Ok(mut n) => {
                sink.stats.bytes_written += n as u64;
                // A short write filled the socket buffer; EPOLLOUT comes when it drains.
                if n < asked {
                    st.writable = false;
                }
                while n > 0 {
                    let Some(p) = ops.front_mut(&st.writes) else {
                        break;
                    };
                    let left = write_buf(p).len();
                    if n < left {
                        p.done += n;
                        break;
                    }
                    p.done += left;
                    n -= left;
                    let p = ops.pop_front(&mut st.writes).expect("front exists");
                    sink.complete(st, p, Ok(()), None);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => st.writable = false,
            Err(e) => {
                let p = ops.pop_front(&mut st.writes).expect("front exists");
                sink.complete(st, p, Err(Error::Io(e)), None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{since_progress, stamp, Dir, Timer};
    use crate::conn::Key;
    use std::time::{Duration, Instant};

    /// `Eq` and `Ord` agree (`BinaryHeap` relies on `Ord`; a derived `Eq` over every field
    /// said two timers differ where `Ord` called them equal).
    #[test]
    fn timer_eq_agrees_with_ord() {
        let t0 = Instant::now();
        let timer = |ms, seq, idle: Option<u64>| Timer {
            when: t0 + Duration::from_millis(ms),
            seq,
            id: Key::default(),
            dir: Dir::Read,
            idle: idle.map(Duration::from_millis),
        };
        let all = [
            timer(1, 1, None),
            timer(1, 1, Some(5)),
            timer(1, 2, None),
            timer(2, 1, None),
            timer(2, 1, Some(7)),
        ];
        for a in &all {
            for b in &all {
                assert_eq!(a == b, a.cmp(b) == std::cmp::Ordering::Equal);
                assert_eq!(a.partial_cmp(b), Some(a.cmp(b)));
            }
        }
        // The heap pops the earliest first, then the oldest operation.
        assert!(timer(1, 2, None) > timer(2, 1, None));
        assert!(timer(1, 1, None) > timer(1, 2, None));
    }

    /// Issue 16, item 3: progress is stamped with the time the bytes moved, not the round's
    /// start, which a long round or a preempted poller leaves long past (an idle timeout
    /// could then fire up to that much early).
    #[test]
    fn progress_is_stamped_when_the_bytes_move_not_when_the_round_started() {
        use crate::{Cmd, Watcher};
        use std::io::Write;
        use std::os::unix::net::UnixStream;

        let watcher = Watcher::builder().inline(true).build().unwrap();
        // A poller that has run for a minute (its stamps count from its start).
        watcher.with_driver(|d| d.epoch = Instant::now() - Duration::from_secs(60));
        let (mut peer, socket) = UnixStream::pair().unwrap();
        let conn = watcher.register(socket).unwrap();
        let idle = Duration::from_secs(60);
        conn.send(Cmd::ReadFull(vec![0; 2]).idle_timeout(idle))
            .unwrap();
        // The read is taken, tried (nothing yet) and waits for readiness.
        watcher.with_driver(|d| assert!(d.step(Some(Instant::now()))));
        peer.write_all(b"x").unwrap();
        watcher.with_driver(|d| {
            d.wait(Some(Duration::ZERO));
            // The round's clock as a long round or a preemption leaves it: long past.
            let moved_at = Instant::now();
            d.now = moved_at - Duration::from_secs(5);
            assert!(d.process());
            let st = &d.conns[conn.inner.id];
            let lag = st.read_progress.wrapping_sub(stamp(d.epoch, moved_at)) as i32;
            assert!(
                lag >= 0,
                "progress stamped {} ms before the bytes moved",
                -lag
            );
        });
    }

    #[test]
    fn since_progress_across_the_stamp_range() {
        let ms = Duration::from_millis;
        assert_eq!(since_progress(1_000, 400), ms(600));
        // The same millisecond, stamped rounded up: now.
        assert_eq!(since_progress(1_000, 1_001), Duration::ZERO);
        // Across the u32 wrap (49.7 days after the poller started).
        assert_eq!(since_progress(5, u32::MAX - 4), ms(10));
        // 24.8 days and more without progress: long ago, so a 100 ms idle timeout fires.
        let day = 86_400_000u32;
        assert_eq!(since_progress(20 * day, 1), ms(20 * day as u64 - 1));
        assert_eq!(since_progress(25 * day, 1), Duration::MAX);
    }
}
