//! The poller: commands, per-connection order, timers and delivery, written once for every
//! engine. Nothing here runs on a user thread (an inline watcher's driver runs on the thread
//! inside `wait_io`, one at a time).
//!
//! One round: take the control and command queues (new operations join their connection's
//! FIFO and mark it runnable when its engine can act on it) -> let the engine run the
//! runnable connections (bounded work each) -> expire timers -> post the round's completions
//! (and end the round for threads in `wait_io`) -> the engine's wait, with a timeout of zero
//! (work left), the nearest deadline, or forever.
//!
//! The engines (`readiness`: epoll or kqueue, the poller makes the system calls; `uring`:
//! io_uring, the kernel does the I/O and posts completions) implement [`Engine`]: what makes
//! a connection runnable, what running it does, how to wait, and whether the kernel still
//! holds something of a connection (its buffers or its fd) that must come back before the
//! connection is retired. `AnyDriver` picks one at run time, with a `match` per entry point.

mod dgram;
mod readiness;
mod reads;
#[cfg(feature = "tls")]
mod tls;
#[cfg(all(target_os = "linux", feature = "uring"))]
mod uring;

pub(crate) use readiness::{Readiness, WAKER_TOKEN};
#[cfg(all(target_os = "linux", feature = "uring"))]
pub(crate) use uring::Uring;

use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use slotmap::SecondaryMap;

use crate::cmd::Kind;
use crate::conn::Key;
use crate::delivery::{self, Stalled};
use crate::fifo::{Fifo, Slab};
use crate::shared::{Ctl, Role, Route, Shared};
use crate::stats::Stats;
use crate::sys;
use crate::{Buf, Cmd, Completion, Conn, Error, Op, PeerAddr};

/// then waits for the next round while the others get theirs.
const BUDGET: u32 = 16;
/// Queued writes gathered into one `sendmsg`.
const MAX_IOV: usize = 256;
/// The arena is refilled when less than this is left (or less than a whole chunk, if smaller).
const MIN_ARENA: usize = 2048;
/// What a connection keeps of bytes no read took is copied out of the arena up to this size.
const SMALL_LEFTOVER: usize = 4096;
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
            Kind::Write(_)
            | Kind::WriteAll(..)
            | Kind::SendTo(..)
            | Kind::Connect
            | Kind::Shutdown => Dir::Write,
            // (TLS starts after the writes before it, as a shutdown does.)
            #[cfg(feature = "tls")]
            Kind::TlsStart(_) => Dir::Write,
            _ => Dir::Read,
        }
    }
}

/// An accepted operation waiting in its connection's FIFO. The connection's handle is kept
/// once per connection (`ConnState::conn`), the deadline and idle period by its timers.
pub(crate) struct Pending {
    kind: Kind,
    done: usize,
    tag: u64,
    seq: u64,
    /// A deadline or idle timer refers to it (by `seq`).
    timed: bool,
    /// A timer ended it while the kernel still held it (an io_uring send in flight): it
    /// completes with this error once the kernel gives it back (`Driver::settle_late`).
    late: Option<Late>,
}

/// Which timer ended an operation the kernel still held.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Late {
    Deadline,
    Idle,
}

impl Late {
    fn error(self) -> Error {
        match self {
            Late::Deadline => Error::Deadline,
            Late::Idle => Error::IdleTimeout,
        }
    }
}

/// A connection's flags (`ConnState::flags`), one bit each. (`u32`: the state's size is
/// the same as with `u16`, which padding rounded up anyway.)
type Flags = u32;

/// A plain `ReadInternal` (no timer) that is the connection's only read, kept in `ConnState`
/// instead of in the slab: an idle connection waiting for input then costs no slab entry. It
/// runs where it is (`read_parked`), and moves to the read FIFO only when another read queues
/// behind it (or on a listener, where it fails at once).
const PARKED: Flags = 1 << 0;
/// Readiness engine: the last event (or a new socket's assumption) says a read may make
/// progress. io_uring engine: bytes, accepted sockets or an error wait in user space for the
/// next read or accept.
const READABLE: Flags = 1 << 1;
/// Readiness engine: a write may make progress.
const WRITABLE: Flags = 1 << 2;
/// Readiness engine: a short read does not prove the socket drained: the peer hung up or the
/// socket errored (no further edge would come to say otherwise), or no read has seen `EAGAIN`
/// since registration (events that arrived before the poller knew the key were dropped, a
/// hang-up among them). Cleared by `EAGAIN`, which proves the socket drained with no end of
/// stream waiting, so any later arrival is a new edge.
const HUP: Flags = 1 << 3;
/// A read returned 0: every later read completes with `Eof` without a syscall.
const EOF: Flags = 1 << 4;
/// In the runnable list.
const QUEUED: Flags = 1 << 5;
/// A listening socket: only `Accept` can succeed on it, and only `Accept` fails on a stream
/// (see `ConnState::misdirected`).
const LISTENER: Flags = 1 << 6;
/// Accepts failed for lack of descriptors or memory: no read runs until the `RESUME` timer
/// ends the pause, whatever readiness events say meanwhile.
const PAUSED: Flags = 1 << 7;
/// io_uring engine: a receive (or the multishot accept, on a listener) is in the kernel.
#[cfg_attr(not(all(target_os = "linux", feature = "uring")), allow(dead_code))]
const ARMED: Flags = 1 << 8;
/// io_uring engine: a send (or a connect's poll) is in the kernel.
#[cfg_attr(not(all(target_os = "linux", feature = "uring")), allow(dead_code))]
const SENDING: Flags = 1 << 9;
/// io_uring engine: a cancel of what the kernel holds was asked for.
#[cfg_attr(not(all(target_os = "linux", feature = "uring")), allow(dead_code))]
const CANCELLING: Flags = 1 << 10;
/// Free, Detach, a release or `close` waits for the kernel to give back what it holds
/// (`Core::closing` says which); every command that reaches it meanwhile is refused.
const CLOSING: Flags = 1 << 11;
/// Bytes received and not taken by a read wait in `Core::leftover`: the next read of any
/// kind is served from them first.
const LEFTOVER: Flags = 1 << 12;
/// What `LEFTOVER` holds is all the read at the head can use until more bytes arrive (a
/// frame's beginning): the leftover alone does not make the connection runnable.
const PARTIAL: Flags = 1 << 13;
/// What `LEFTOVER` holds is a copy of its own (small bytes copied out of the arena), not a
/// slice of the arena: what remains of it after a read is not copied again.
const OWNED: Flags = 1 << 14;
/// A datagram socket: reads and writes move whole datagrams (`driver/dgram.rs`).
const DGRAM: Flags = 1 << 15;
/// A TLS session runs on the connection (`driver/tls.rs`, in `Core::tls`): the engine moves
/// ciphertext, the core completes the reads and writes with plaintext.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
const TLS: Flags = 1 << 16;
/// A `TlsAccept` or `TlsConnect` waits in the write FIFO: reads are held (bytes that arrive
/// are the handshake's, not plaintext for a read) until it starts the session.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
const TLS_PENDING: Flags = 1 << 17;
/// TLS: the session needs ciphertext from the socket (a handshake, or reads waiting).
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
const TLS_RD: Flags = 1 << 18;
/// TLS: ciphertext waits to be sent.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
const TLS_WR: Flags = 1 << 19;
/// TLS: the session has work that needs no I/O (a new command, bytes received, a timer
/// that ended an operation, a budget that ran out).
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
const TLS_WORK: Flags = 1 << 20;
/// A UDP socket whose queued datagrams of one size to one peer go out in GSO sends
/// (`driver/dgram.rs`); cleared when the kernel refuses one.
const GSO: Flags = 1 << 21;

/// What the poller keeps per connection. Its size is most of what an idle connection costs
/// (docs/benchmarks.md), hence the parked read, the millisecond progress stamps and the flags
/// packed in one word.
pub(crate) struct ConnState {
    fd: OwnedFd,
    /// Pending operations, in `Driver::ops`.
    reads: Fifo,
    writes: Fifo,
    /// A handle of this connection, held while any operation is pending: completions get
    /// clones, the last one gets this one, so the connection is released (after the user
    /// drops it) only when nothing is pending.
    conn: Option<Conn>,
    /// The tag of the parked read (see `PARKED`).
    parked_tag: u64,
    /// When bytes last moved in each direction (`Driver::stamp`), for idle timeouts.
    read_progress: u32,
    write_progress: u32,
    /// `PARKED`, `READABLE`, ...
    flags: Flags,
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
            // (`HUP` until a read sees EAGAIN: see the flag.)
            flags: READABLE | WRITABLE | HUP,
        }
    }

    #[inline(always)]
    fn is(&self, flag: Flags) -> bool {
        self.flags & flag != 0
    }

    #[inline(always)]
    fn set(&mut self, flag: Flags, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
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
        matches!(kind, Kind::Accept) != self.is(LISTENER)
    }

    fn idle(&self) -> bool {
        self.reads.is_empty() && self.writes.is_empty() && !self.is(PARKED)
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
        if !self.is(PARKED) {
            return None;
        }
        self.set(PARKED, false);
        Some(Pending {
            kind: Kind::ReadInternal,
            done: 0,
            tag: self.parked_tag,
            seq: 0,
            timed: false,
            late: None,
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
            self.set(PARKED, true);
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
    /// Where the operation is in the slab (`seq` tells whether it is still there).
    slot: u32,
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
        self.finish(p, conn, result, buf, None);
    }

    /// Completes `p`, a datagram read of `st` just taken out of its queue, with its sender.
    fn complete_from(
        &mut self,
        st: &mut ConnState,
        p: Pending,
        result: Result<(), Error>,
        buf: Option<Buf>,
        from: Option<PeerAddr>,
    ) {
        let conn = st.handle();
        self.finish(p, conn, result, buf, from);
    }

    fn finish(
        &mut self,
        p: Pending,
        conn: Conn,
        result: Result<(), Error>,
        buf: Option<Buf>,
        peer: Option<PeerAddr>,
    ) {
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
        let (tag, n) = (p.tag, p.done);
        let (own, to) = p.kind.into_parts();
        self.push(Completion {
            conn,
            op,
            tag,
            buf: buf.unwrap_or(own),
            n,
            result,
            peer: peer.or(to),
        });
    }

    /// Completes a command that never became pending (unknown connection, closed watcher).
    fn reject(&mut self, conn: Conn, cmd: Cmd, err: Error) {
        let (op, tag) = (cmd.op(), cmd.tag);
        let (buf, peer) = cmd.kind.into_parts();
        self.push(Completion {
            conn,
            op,
            tag,
            buf,
            n: 0,
            result: Err(err),
            peer,
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
            peer: None,
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

    /// Copies `parts`, one after the other, into the arena (into a buffer of their own if
    /// they are larger than a chunk), as one `Bytes`.
    fn concat(&mut self, parts: &[&[u8]], stats: &mut Stats) -> Bytes {
        let len = parts.iter().map(|p| p.len()).sum();
        if len > self.chunk {
            let mut own = BytesMut::with_capacity(len);
            parts.iter().for_each(|p| own.extend_from_slice(p));
            return own.freeze();
        }
        if self.spare() < len {
            self.buf.clear();
            if !self.buf.try_reclaim(self.chunk) {
                self.buf = BytesMut::with_capacity(self.chunk);
                stats.chunks_allocated += 1;
            }
        }
        parts.iter().for_each(|p| self.buf.extend_from_slice(p));
        self.buf.split_to(len).freeze()
    }

    /// As `refill`, with room for `first` bytes before a useful read.
    #[inline]
    fn refill_for(&mut self, first: usize, stats: &mut Stats) {
        let want = (first + self.chunk.min(MIN_ARENA)).min(self.chunk);
        if self.spare() < want {
            self.buf.clear();
            if !self.buf.try_reclaim(self.chunk) {
                self.buf = BytesMut::with_capacity(self.chunk);
                stats.chunks_allocated += 1;
            }
        }
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

/// The I/O underneath the rounds. Each engine is a child module of this one, so it reaches
/// the connection state directly.
pub(crate) trait Engine {
    /// Called on the thread that will drive the engine, before its first round.
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// A connection was registered.
    fn register(&mut self, _id: Key) {}

    /// Whether `st` has work this engine can start or do now (it joins the runnable list).
    fn runnable(&self, st: &ConnState, ops: &Slab<Pending>) -> bool;

    /// Does what the runnable connection `id` can do now, within its budget.
    fn run(&mut self, core: &mut Core, id: Key);

    /// As `run`, for a connection that runs TLS (`driver/tls.rs`): the engine moves the
    /// session's ciphertext, the session does the rest.
    #[cfg(feature = "tls")]
    fn run_tls(&mut self, cx: tls::Ctx<'_>, session: &mut tls::Tls);

    /// Waits for events or completions, at most `timeout` (`None`: until something comes),
    /// and applies them: marks connections runnable, completes what the kernel finished.
    fn wait(&mut self, core: &mut Core, timeout: Option<Duration>);

    /// Whether the kernel holds something of `st` (a buffer, or its fd in an operation):
    /// the connection may then not be retired (its fd closed or handed back, its slot
    /// reused) before [`Engine::cancel`] got everything back.
    fn busy(&self, _st: &ConnState) -> bool {
        false
    }

    /// Asks the kernel to give back what it holds of connection `id`; the engine calls
    /// `Core::settle` once the last of it came back.
    fn cancel(&mut self, _id: Key, _st: &mut ConnState) {}

    /// A timer ends write `seq` of connection `id`. `true` if the kernel holds it: the
    /// engine then completes it (with the error in its `late`) once the kernel gives it back,
    /// with the bytes done by then.
    fn hold(&mut self, _id: Key, _st: &mut ConnState, _ops: &mut Slab<Pending>, _seq: u64) -> bool {
        false
    }

    /// The last step of a shutdown: waits until the kernel holds nothing more.
    fn drain(&mut self, _core: &mut Core) {}
}

/// How a connection ends (`Driver::retire`), kept while the kernel still holds some of it.
pub(crate) enum Retire {
    /// `Free`: close, then post its completion.
    Free(Conn, u64),
    /// `Detach`: hand the socket back in the completion.
    Detach(Conn, u64),
    /// The last handle was dropped with nothing pending: close.
    Release,
    /// `close`: pending operations complete with `WatcherClosed`, then close.
    Close,
}

/// Everything of the poller but the engine, so that an engine method can take it whole
/// while the engine itself is borrowed.
pub(crate) struct Core {
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
    /// How connections in `closing` state end, once the kernel gave everything back.
    closing: HashMap<Key, Retire>,
    /// Bytes received that no read took (the connection is marked `LEFTOVER`): a frame's
    /// first part, what followed a frame, what the round's budget left.
    leftover: HashMap<Key, Bytes>,
    /// Where datagrams are received (made on the first datagram read).
    dgram: Option<Box<dgram::Scratch>>,
    /// UDP sockets may send in GSO batches ([`WatcherBuilder::udp_gso`](crate::WatcherBuilder::udp_gso)).
    pub(crate) udp_gso: bool,
    /// The TLS sessions (connections marked `TLS`).
    #[cfg(feature = "tls")]
    tls: HashMap<Key, Box<tls::Tls>>,
    /// Every connection's pending operations.
    ops: Slab<Pending>,
    /// Connections with work they can do now; entries past the round's start are next round's.
    ready: Vec<Key>,
    timers: BinaryHeap<Timer>,
    sink: Sink,
    arena: Arena,
    seq: u64,
    now: Instant,
    /// The origin of the millisecond stamps (`stamp`).
    epoch: Instant,
}

/// The poller of one watcher: the engine-agnostic rounds over one engine.
pub(crate) struct Driver<E> {
    core: Core,
    engine: E,
}

/// A driver over whichever engine the watcher was built with. (One per watcher, never
/// moved once built: the size difference between the variants costs nothing.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum AnyDriver {
    Readiness(Driver<Readiness>),
    #[cfg(all(target_os = "linux", feature = "uring"))]
    Uring(Driver<Uring>),
}

macro_rules! each {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            AnyDriver::Readiness($d) => $e,
            #[cfg(all(target_os = "linux", feature = "uring"))]
            AnyDriver::Uring($d) => $e,
        }
    };
}

impl AnyDriver {
    /// See [`Driver::deliver_direct`].
    pub(crate) fn deliver_direct(&mut self) {
        each!(self, d => d.deliver_direct())
    }

    /// See [`Driver::take_direct`].
    pub(crate) fn take_direct(&mut self, out: &mut Vec<Completion>) {
        each!(self, d => d.take_direct(out))
    }

    /// See [`Driver::start`].
    pub(crate) fn start(&mut self) -> io::Result<()> {
        each!(self, d => d.start())
    }

    /// See [`Driver::run`].
    pub(crate) fn run(&mut self) {
        each!(self, d => d.run())
    }

    /// See [`Driver::step`].
    pub(crate) fn step(&mut self, deadline: Option<Instant>) -> bool {
        each!(self, d => d.step(deadline))
    }

    /// See [`Driver::abandon`].
    pub(crate) fn abandon(&mut self) {
        each!(self, d => d.abandon())
    }

    /// See [`Driver::shutdown`].
    pub(crate) fn shutdown(&mut self) {
        each!(self, d => d.shutdown())
    }

    /// The engine-agnostic part (unit tests).
    #[cfg(test)]
    fn core(&mut self) -> &mut Core {
        each!(self, d => &mut d.core)
    }
}

impl Core {
    pub(crate) fn new(
        shared: Arc<Shared>,
        mailbox: flume::Sender<Completion>,
        chunk: usize,
    ) -> Core {
        Core {
            room: Waker::from(Arc::new(RoomWaker(shared.clone()))),
            shared,
            ops_in: Vec::new(),
            ctl_in: Vec::new(),
            mailbox,
            backlog: Vec::new(),
            skipped_wait: false,
            conns: SecondaryMap::new(),
            closing: HashMap::new(),
            // (Sized so that the first connections to keep bytes do not grow it.)
            leftover: HashMap::with_capacity(64),
            dgram: None,
            udp_gso: true,
            #[cfg(feature = "tls")]
            tls: HashMap::new(),
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
            seq: 0,
            now: Instant::now(),
            epoch: Instant::now(),
        }
    }

    /// Puts `id` in the runnable list if `runnable` says it can make progress now and it is
    /// not there yet.
    #[inline]
    fn mark(&mut self, id: Key, runnable: impl Fn(&ConnState, &Slab<Pending>) -> bool) {
        if let Some(st) = self.conns.get_mut(id) {
            if !st.is(QUEUED) && runnable(st, &self.ops) {
                st.set(QUEUED, true);
                self.ready.push(id);
            }
        }
    }

    /// Takes the bytes connection `id` kept (see `LEFTOVER`).
    fn take_leftover(
        leftover: &mut HashMap<Key, Bytes>,
        id: Key,
        st: &mut ConnState,
    ) -> Option<Bytes> {
        if !st.is(LEFTOVER) {
            return None;
        }
        st.set(LEFTOVER, false);
        leftover.remove(&id)
    }

    /// Keeps `rest` (bytes no read took) for connection `id`'s next reads: `received` says
    /// whether they hold bytes just received into the arena, or are what remains of those
    /// the connection kept before. A small rest is copied out of the arena, once, so that an
    /// idle connection pins no arena chunk.
    fn keep_leftover(
        leftover: &mut HashMap<Key, Bytes>,
        id: Key,
        st: &mut ConnState,
        rest: Bytes,
        received: bool,
    ) {
        st.set(PARTIAL, false);
        if received {
            st.set(OWNED, false);
        }
        if rest.is_empty() {
            return;
        }
        let rest = if rest.len() <= SMALL_LEFTOVER && !st.is(OWNED) {
            st.set(OWNED, true);
            Bytes::copy_from_slice(&rest)
        } else {
            rest
        };
        st.set(LEFTOVER, true);
        leftover.insert(id, rest);
    }

    fn remove(&mut self, id: Key) -> Option<ConnState> {
        let st = self.conns.remove(id)?;
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        self.shared.ids().remove(id);
        self.sink.stats.connections -= 1;
        Some(st)
    }

    /// Ends connection `id` now (the kernel holds nothing of it): its pending operations
    /// complete (`Freed`, or `WatcherClosed` at close), then the socket is closed or, for
    /// `Detach`, handed back, and a `Free` or `Detach` completes.
    fn settle(&mut self, id: Key, how: Retire) {
        let Some(mut st) = self.remove(id) else {
            return;
        };
        let err = match how {
            Retire::Close => || Error::WatcherClosed,
            _ => || Error::Freed,
        };
        st.unpark(&mut self.ops);
        for dir in [Dir::Read, Dir::Write] {
            while let Some(p) = self.ops.pop_front(st.queue(dir)) {
                self.sink.complete(&mut st, p, Err(err()), None);
            }
        }
        let unread = Core::take_leftover(&mut self.leftover, id, &mut st).unwrap_or_default();
        #[cfg(feature = "tls")]
        if st.is(TLS) {
            self.tls.remove(&id);
        }
        let fd = st.fd;
        match how {
            Retire::Free(conn, tag) => {
                drop(fd);
                self.sink.post(conn, Op::Free, tag, Buf::None);
            }
            Retire::Detach(conn, tag) => {
                // Best effort: with the fd still open the registration would go on reporting
                // events under a key that no longer exists (ignored).
                if let Some(selector) = &self.shared.selector {
                    let _ = selector.deregister(fd.as_raw_fd());
                }
                let n = unread.len();
                self.sink.push(Completion {
                    conn,
                    op: Op::Detach,
                    tag,
                    buf: Buf::Fd(fd, unread),
                    n,
                    result: Ok(()),
                    peer: None,
                });
            }
            Retire::Close => drop(fd),
            Retire::Release => {
                drop(fd);
                // A route is kept until the last handle is gone, so that even commands
                // refused after a `Free` reach the connection's own mailbox.
                if !self.sink.routes.is_empty() {
                    self.sink.routes.remove(&id);
                }
            }
        }
    }

    /// Completes write-direction operations of `st` as `n` bytes were written: each one
    /// written whole, then the bytes into the next.
    fn advance_writes(st: &mut ConnState, ops: &mut Slab<Pending>, sink: &mut Sink, mut n: usize) {
        while n > 0 {
            let Some(p) = ops.front_mut(&st.writes) else {
                break;
            };
            let left = write_len(p) - p.done;
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
        match target.adopt(fd, None, route, Role::Stream) {
            Ok(conn) => {
                self.sink
                    .finish(p, listener, Ok(()), Some(Buf::Accepted(conn, peer)), None)
            }
            // The accepted socket is closed with the error.
            Err(e) => self.sink.finish(p, listener, Err(e.into()), None, None),
        }
    }

    /// Completes the accepts made this round (kept apart while the listener's state was
    /// borrowed), in the order they were sent.
    fn finish_accepts(&mut self) {
        if self.sink.accepted.is_empty() {
            return;
        }
        let mut accepted = std::mem::take(&mut self.sink.accepted);
        for (p, listener, result) in accepted.drain(..) {
            match result {
                Ok((fd, peer)) => self.adopt_accepted(p, listener, fd, peer),
                Err(e) => self.sink.finish(p, listener, Err(Error::Io(e)), None, None),
            }
        }
        self.sink.accepted = accepted; // keep the allocation
    }

    /// Pauses listener `id`'s accepts for `ACCEPT_PAUSE` after a resource error, timed from
    /// the failure itself: `now` is the round's start, which a preempted poller may have left
    /// long ago (a pause is rare; the clock read is cheap).
    fn pause_accepts(&mut self, id: Key) {
        self.timers.push(Timer {
            when: Instant::now() + ACCEPT_PAUSE,
            seq: RESUME,
            slot: 0,
            id,
            dir: Dir::Read,
            idle: None,
        });
    }

    /// Before an engine blocks: says the poller sleeps (so that senders write the eventfd),
    /// then looks at the queues under their lock; anything there (or a close) makes the wait
    /// a poll. See `Shared::release_and_wake` for the other half of this handshake.
    fn before_wait(&mut self, mut timeout: Option<Duration>) -> Option<Duration> {
        if timeout != Some(Duration::ZERO) {
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
        timeout
    }

    /// After an engine's wait returned.
    fn after_wait(&mut self) {
        self.shared.sleeping.store(false, Ordering::SeqCst);
        self.sink.stats.wakeups += 1;
        self.now = Instant::now();
    }
}

impl<E: Engine> Driver<E> {
    pub(crate) fn new(core: Core, engine: E) -> Driver<E> {
        Driver { core, engine }
    }

    /// Completions go to `take_direct` instead of the mailbox (an inline watcher with a
    /// mailbox of its own: no one else can be waiting on it).
    pub(crate) fn deliver_direct(&mut self) {
        self.core.sink.direct = Some(Vec::new());
    }

    /// Moves the completions kept for the driving thread to the end of `out`.
    pub(crate) fn take_direct(&mut self, out: &mut Vec<Completion>) {
        if let Some(direct) = &mut self.core.sink.direct {
            if out.is_empty() {
                std::mem::swap(out, direct);
            } else {
                out.append(direct);
            }
        }
    }

    /// See [`Engine::start`].
    pub(crate) fn start(&mut self) -> io::Result<()> {
        self.engine.start()
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
        self.core.shared.closed.store(true, Ordering::SeqCst);
        if catch_unwind(AssertUnwindSafe(|| self.shutdown())).is_ok() {
            return;
        }
        let queued = {
            let mut inbox = self.core.shared.inbox();
            inbox.sealed = true;
            std::mem::take(&mut inbox.ops)
        };
        let left = std::mem::take(&mut self.core.ops_in)
            .into_iter()
            .chain(queued);
        for (conn, cmd) in left {
            let (op, tag) = (cmd.op(), cmd.tag);
            let (buf, peer) = cmd.kind.into_parts();
            let c = Completion {
                conn,
                op,
                tag,
                buf,
                n: 0,
                result: Err(Error::WatcherClosed),
                peer,
            };
            // Never blocks: a full bounded mailbox loses it (the state may be broken).
            let _ = self.core.mailbox.try_send(c);
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
        self.core.now = Instant::now();
        if self
            .core
            .timers
            .peek()
            .is_some_and(|t| t.when <= self.core.now)
        {
            self.wait(Some(Duration::ZERO));
            self.core.skipped_wait = false;
        }
        let posted = self.core.sink.stats.completions;
        if !self.process() {
            return false;
        }
        // (An inline watcher has no backlog: its own mailbox is unbounded and it refuses
        // bounded routes.)
        let timeout = if self.core.sink.stats.completions != posted {
            if !self.core.skipped_wait {
                self.core.skipped_wait = true;
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
        self.core.skipped_wait = false;
        self.wait(timeout);
        self.process()
    }

    fn wait(&mut self, timeout: Option<Duration>) {
        let timeout = self.core.before_wait(timeout);
        self.engine.wait(&mut self.core, timeout);
    }

    /// Everything of a round but the wait: commands, I/O, timers, completions. Returns
    /// `false` (after shutting down) if the watcher was closed.
    fn process(&mut self) -> bool {
        self.take_inbox(false);
        self.run_ctl();
        self.run_ops();
        if self.core.shared.closed.load(Ordering::SeqCst) {
            self.shutdown();
            return false;
        }
        self.run_ready();
        if !self.core.timers.is_empty() {
            self.core.now = Instant::now();
            self.expire();
        }
        self.flush();
        true
    }

    /// Swaps the inbox's queues with our empty ones: only what is queued now, so a busy
    /// sender cannot keep the poller from its sockets. `seal` makes it the last take.
    fn take_inbox(&mut self, seal: bool) {
        let core = &mut self.core;
        let mut inbox = core.shared.inbox();
        inbox.sealed |= seal;
        std::mem::swap(&mut inbox.ops, &mut core.ops_in);
        std::mem::swap(&mut inbox.ctl, &mut core.ctl_in);
    }

    fn run_ctl(&mut self) {
        if self.core.ctl_in.is_empty() {
            return;
        }
        let mut ctl = std::mem::take(&mut self.core.ctl_in);
        for msg in ctl.drain(..) {
            match msg {
                Ctl::Register {
                    id,
                    fd,
                    connect,
                    route,
                    role,
                } => {
                    let core = &mut self.core;
                    let mut st = ConnState::new(fd, stamp(core.epoch, core.now));
                    st.set(LISTENER, role == Role::Listener);
                    st.set(DGRAM, role == Role::Datagram);
                    st.set(
                        GSO,
                        role == Role::Datagram
                            && core.udp_gso
                            && sys::dgram::can_gso(st.fd.as_fd()),
                    );
                    core.conns.insert(id, st);
                    core.sink.stats.connections += 1;
                    self.engine.register(id);
                    if let Some(route) = route {
                        core.sink.routes.insert(id, route);
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
                    self.retire(id, Retire::Release);
                }
                // Its registration was taken with it or before (registering comes first).
                Ctl::Last(conn, cmd) => self.submit(conn, cmd),
            }
        }
        self.core.ctl_in = ctl; // keep the allocation
    }

    fn run_ops(&mut self) {
        if self.core.ops_in.is_empty() {
            return;
        }
        // The time the commands are taken starts their idle periods: `now` from before the
        // wait could be earlier than a command was sent, firing its timeout early.
        self.core.now = Instant::now();
        let mut ops = std::mem::take(&mut self.core.ops_in);
        for (conn, cmd) in ops.drain(..) {
            self.submit(conn, cmd);
        }
        self.core.ops_in = ops;
    }

    /// Ends connection `id` (see [`Retire`]): at once, or once the kernel has given back
    /// what it holds of it, the connection refusing every command meanwhile. `false` if there
    /// is no such connection (or it is ending already).
    fn retire(&mut self, id: Key, how: Retire) -> bool {
        let Some(st) = self.core.conns.get_mut(id) else {
            return false;
        };
        if st.is(CLOSING) {
            // (Only `close` can come twice: it then settles as it was going to, with
            // `WatcherClosed` for what is still pending.)
            if let Retire::Close = how {
                if let Some(Retire::Free(..) | Retire::Detach(..)) = self.core.closing.get(&id) {
                    return true;
                }
                self.core.closing.insert(id, how);
                return true;
            }
            return false;
        }
        if self.engine.busy(st) {
            st.set(CLOSING, true);
            self.engine.cancel(id, st);
            self.core.closing.insert(id, how);
            return true;
        }
        self.core.settle(id, how);
        true
    }

    fn submit(&mut self, conn: Conn, cmd: Cmd) {
        let id = conn.inner.id;
        // (`enqueue` refuses the other commands of an unknown connection itself.)
        if !cmd.is_last() {
            return self.enqueue(id, conn, cmd);
        }
        let tag = cmd.tag;
        let how = match cmd.kind {
            Kind::Free => Retire::Free(conn.clone(), tag),
            _ => Retire::Detach(conn.clone(), tag),
        };
        if !self.retire(id, how) {
            self.core.sink.reject(conn, cmd, Error::Freed);
        }
    }

    /// Appends an operation to its connection's FIFO (or parks it), arms its timers, and
    /// marks the connection runnable if that direction can make progress now.
    fn enqueue(&mut self, id: Key, conn: Conn, cmd: Cmd) {
        let core = &mut self.core;
        let st = match core.conns.get_mut(id) {
            Some(st) if !st.is(CLOSING) => st,
            _ => return core.sink.reject(conn, cmd, Error::Freed),
        };
        let Cmd {
            kind,
            deadline,
            mut idle,
            tag,
        } = cmd;
        // An idle timeout means nothing to an accept (no bytes move), nor one too long to
        // represent: both are no idle timeout, without a timer.
        if idle.is_some_and(|d| matches!(kind, Kind::Accept) || core.now.checked_add(d).is_none()) {
            idle = None;
        }
        if let Some(why) = unsupported(st, &kind) {
            let cmd = Cmd {
                kind,
                deadline,
                idle,
                tag,
            };
            return core.sink.reject(conn, cmd, Error::Unsupported(why));
        }
        if st.conn.is_none() {
            st.conn = Some(conn);
        }
        #[cfg(feature = "tls")]
        {
            // A session takes every new command itself; a handshake waiting to start holds
            // the reads.
            st.set(TLS_WORK, st.is(TLS));
            if matches!(kind, Kind::TlsStart(_)) && !st.is(TLS) {
                st.set(TLS_PENDING, true);
            }
        }
        let dir = Dir::of(&kind);
        if dir == Dir::Read {
            // A new read may take bytes the head could not (a `Read` after a frame's
            // beginning): look again.
            st.set(PARTIAL, false);
        }
        let stats = &mut core.sink.stats;
        match dir {
            Dir::Read => stats.reads_in_flight += 1,
            Dir::Write => stats.writes_in_flight += 1,
        }
        let timed = deadline.is_some() || idle.is_some();
        if !timed && matches!(kind, Kind::ReadInternal) && st.reads.is_empty() && !st.is(PARKED) {
            st.set(PARKED, true);
            st.parked_tag = tag;
        } else {
            if dir == Dir::Read {
                st.unpark(&mut core.ops);
            }
            core.seq += 1;
            let seq = core.seq;
            let p = Pending {
                kind,
                done: 0,
                tag,
                seq,
                timed,
                late: None,
            };
            let slot = core.ops.push_back(st.queue(dir), p);
            if timed {
                stats.deadlines_armed += 1;
                let idle_at = idle.and_then(|d| Some((core.now.checked_add(d)?, d)));
                debug_assert_eq!(idle.is_some(), idle_at.is_some());
                let timers = [
                    deadline.map(|at| (at, None)),
                    idle_at.map(|(at, d)| (at, Some(d))),
                ];
                for (when, idle) in timers.into_iter().flatten() {
                    core.timers.push(Timer {
                        when,
                        seq,
                        slot,
                        id,
                        dir,
                        idle,
                    });
                }
            }
        }
        let engine = &self.engine;
        core.mark(id, |st, ops| engine.runnable(st, ops));
    }

    fn run_ready(&mut self) {
        let n = self.core.ready.len();
        if n == 0 {
            return;
        }
        for i in 0..n {
            let id = self.core.ready[i];
            let core = &mut self.core;
            let Some(st) = core.conns.get_mut(id) else {
                continue;
            };
            st.set(QUEUED, false);
            #[cfg(feature = "tls")]
            let (runs_tls, starts_tls) = (st.is(TLS), st.is(TLS_PENDING) && !st.is(TLS));
            let moved = (core.sink.stats.bytes_read, core.sink.stats.bytes_written);
            #[cfg(feature = "tls")]
            if starts_tls {
                tls::prepare(core, id);
            }
            #[cfg(feature = "tls")]
            let session = if runs_tls || starts_tls {
                tls::running(core, id)
            } else {
                None
            };
            #[cfg(feature = "tls")]
            match session {
                Some((cx, session)) => self.engine.run_tls(cx, session),
                None => self.engine.run(core, id),
            }
            #[cfg(not(feature = "tls"))]
            self.engine.run(core, id);
            let Some(st) = core.conns.get_mut(id) else {
                continue;
            };
            // Progress is stamped with the time the bytes moved, read now: the round's start
            // may be long past (a long round, a preempted poller), and a stamp that early
            // would let an idle timeout fire early. One clock read per connection that moved.
            let stats = &core.sink.stats;
            let (read, written) = (stats.bytes_read != moved.0, stats.bytes_written != moved.1);
            if read || written {
                let t = stamp(core.epoch, Instant::now());
                if read {
                    st.read_progress = t;
                }
                if written {
                    st.write_progress = t;
                }
            }
            let engine = &self.engine;
            core.mark(id, |st, ops| engine.runnable(st, ops));
            core.finish_accepts();
        }
        let ready = &mut self.core.ready;
        if ready.len() == n {
            ready.clear();
        } else {
            ready.drain(..n);
        }
    }

    fn expire(&mut self) {
        let core = &mut self.core;
        let now = core.now;
        while core.timers.peek().is_some_and(|t| t.when <= now) {
            let Some(t) = core.timers.pop() else { break };
            let Some(st) = core.conns.get_mut(t.id) else {
                continue;
            };
            if st.is(CLOSING) {
                continue;
            }
            if t.seq == RESUME {
                st.set(PAUSED, false);
                st.set(READABLE, true);
                let engine = &self.engine;
                core.mark(t.id, |st, ops| engine.runnable(st, ops));
                continue;
            }
            // O(1): the timer knows where its operation is, and `seq` says if it still is.
            let Some(p) = core.ops.get(t.slot).filter(|p| p.seq == t.seq) else {
                continue;
            };
            if p.late.is_some() {
                continue; // already ended, waiting for the kernel
            }

            if let Some(idle) = t.idle {
                // The timer fired no earlier than `idle` after the command was taken (or
                // after the progress that last re-armed it); it is over unless bytes moved in
                // this direction within the last `idle`.
                let progress = match t.dir {
                    Dir::Read => st.read_progress,
                    Dir::Write => st.write_progress,
                };
                let since = since_progress(stamp(core.epoch, now).wrapping_sub(1), progress);
                if since < idle {
                    core.timers.push(Timer {
                        when: now + (idle - since),
                        ..t
                    });
                    continue;
                }
            }
            let late = if t.idle.is_some() {
                Late::Idle
            } else {
                Late::Deadline
            };
            if t.dir == Dir::Write && self.engine.hold(t.id, st, &mut core.ops, t.seq) {
                // The kernel holds it: it completes when the kernel gives it back.
                if let Some(p) = core.ops.get_mut(t.slot) {
                    p.late = Some(late);
                }
                continue;
            }
            let Some(p) = core.ops.unlink(st.queue(t.dir), t.slot) else {
                continue;
            };
            #[cfg(feature = "tls")]
            {
                // A session looks at what the timer ended (a handshake's command).
                st.set(TLS_WORK, st.is(TLS));
                if matches!(p.kind, Kind::TlsStart(_)) {
                    st.set(TLS_PENDING, tls_pending(st, &core.ops));
                }
            }
            core.sink.complete(st, p, Err(late.error()), None);
            // What was behind it may run now without a new event (a `Shutdown` after a
            // write cut short by its deadline, against a peer that reads nothing).
            let engine = &self.engine;
            core.mark(t.id, |st, ops| engine.runnable(st, ops));
        }
        // Compact when completed operations' timers dominate the heap.
        let armed = core.sink.stats.deadlines_armed as usize;
        if core.timers.len() > 2 * armed + 1024 {
            let (conns, ops) = (&core.conns, &core.ops);
            core.timers.retain(|t| {
                conns.contains_key(t.id)
                    && (t.seq == RESUME || ops.get(t.slot).is_some_and(|p| p.seq == t.seq))
            });
        }
    }

    fn flush(&mut self) {
        let core = &mut self.core;
        let stats = &mut core.sink.stats;
        if core.sink.made > 0 {
            stats.batches += 1;
            stats.completions += core.sink.made;
            core.sink.made = 0;
        }
        // Whether anything reached a channel: a waiter must then be woken, also when all of
        // it came from the backlog (room was made) and this round completed nothing.
        let mut posted = false;
        // The stalled channels first: what waits there is older.
        if !core.backlog.is_empty() {
            let mut cx = Context::from_waker(&core.room);
            posted |= delivery::pump_all(&mut core.backlog, &mut cx);
        }
        // (Skipped when empty, as an inline watcher's is: a drain costs its set-up.)
        if !core.sink.out.is_empty() {
            let mailbox = &core.mailbox;
            for (c, to) in core.sink.out.drain(..) {
                let to = to.as_ref().unwrap_or(mailbox);
                posted |= delivery::deliver(&mut core.backlog, to, c);
            }
            if !core.backlog.is_empty() {
                // A queue that started this round: its head waits for room with our waker.
                let mut cx = Context::from_waker(&core.room);
                posted |= delivery::pump_all(&mut core.backlog, &mut cx);
            }
        }
        core.sink.stats.stalled_completions = delivery::waiting(&core.backlog) as u64;
        core.sink.stats.timer_entries = core.timers.len() as u64;
        core.shared.stats.publish(&core.sink.stats);
        if posted && core.sink.direct.is_none() {
            core.shared.rounds.ended();
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let core = &self.core;
        if !core.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        core.timers
            .peek()
            .map(|t| t.when.saturating_duration_since(core.now))
    }

    pub(crate) fn shutdown(&mut self) {
        // Nobody may come to take direct completions any more (`Watcher::close`): what is
        // kept goes to the mailbox, ahead of what the shutdown completes.
        if let Some(direct) = self.core.sink.direct.take() {
            for c in direct {
                let _ = self.core.mailbox.send(c); // unbounded (inline), or nobody receives
            }
        }
        // The last take: later pushes fail with `Closed`.
        self.take_inbox(true);
        self.run_ctl();
        // Pending operations first: they were submitted before anything still queued.
        let ids: Vec<Key> = self.core.conns.keys().collect();
        for id in ids {
            self.retire(id, Retire::Close);
        }
        // What the kernel still held comes back, and those connections settle, before the
        // commands still queued complete: they were sent after.
        self.engine.drain(&mut self.core);
        for (conn, cmd) in std::mem::take(&mut self.core.ops_in) {
            self.core.sink.reject(conn, cmd, Error::WatcherClosed);
        }
        self.flush();
        self.drain_backlog();
    }

    /// What still waits for room in bounded channels goes on waiting on a thread of its own
    /// (`delivery::drain`), which ends a round for `wait_io` after each delivery and at the
    /// end, so waiters see the mailbox closed after the last completion.
    fn drain_backlog(&mut self) {
        let shared = self.core.shared.clone();
        delivery::drain(std::mem::take(&mut self.core.backlog), move || {
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

/// Out of descriptors or kernel memory: retrying at once would fail the same way.
fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Calls `f` on the bytes of write `p` still to go, in order (one slice for a `Write`, the
/// rest of each buffer for a `WriteAll`), until it returns `false`.
fn write_parts<'a>(p: &'a Pending, mut f: impl FnMut(&'a [u8]) -> bool) {
    match &p.kind {
        Kind::Write(b) | Kind::SendTo(b, _) => {
            f(&b[p.done..]);
        }
        Kind::WriteAll(bufs, _) => {
            let (first, at) = write_all_position(bufs, p.done);
            for (i, b) in bufs.iter().enumerate().skip(first) {
                let part = if i == first { &b[at..] } else { &b[..] };
                if !part.is_empty() && !f(part) {
                    break;
                }
            }
        }
        _ => {}
    }
}

/// Where a `WriteAll` that wrote `done` bytes goes on: the buffer, and the offset in it.
fn write_all_position(bufs: &[Bytes], mut done: usize) -> (usize, usize) {
    for (i, b) in bufs.iter().enumerate() {
        if done < b.len() {
            return (i, done);
        }
        done -= b.len();
    }
    (bufs.len(), 0)
}

/// Why `kind` cannot run on `st`'s socket, if it cannot: what a datagram socket does not
/// do, `SendTo` on a stream, TLS on a listener.
fn unsupported(st: &ConnState, kind: &Kind) -> Option<&'static str> {
    #[cfg(feature = "tls")]
    if matches!(kind, Kind::TlsStart(_)) {
        if st.is(DGRAM) {
            return Some(
                "TLS on a datagram socket: TLS runs over a stream (DTLS is not supported)",
            );
        }
        if st.is(LISTENER) {
            return Some("TLS on a listener: start it on each accepted connection");
        }
    }
    if !st.is(DGRAM) {
        return matches!(kind, Kind::SendTo(..))
            .then_some("SendTo on a stream socket: use Write (a stream has one peer)");
    }
    Some(match kind {
        Kind::ReadFull(_) => "ReadFull on a datagram socket: a datagram is read whole, by Read",
        Kind::ReadFrame(_) | Kind::ReadFrames(..) => {
            "framed reads on a datagram socket: each datagram is already one message (Read)"
        }
        Kind::Accept => "Accept on a datagram socket: it has no connections to accept",
        Kind::Shutdown => "Shutdown on a datagram socket: it has no stream to end (use Free)",
        Kind::WriteAll(..) => "WriteAll on a datagram socket: each Write is one datagram",
        _ => return None,
    })
}

/// The length of a write's buffer (a datagram's, once sent).
fn write_len(p: &Pending) -> usize {
    match &p.kind {
        Kind::Write(b) | Kind::SendTo(b, _) => b.len(),
        Kind::WriteAll(_, len) => *len,
        _ => 0,
    }
}

/// Whether a handshake's command waits to start on `st`: no session yet, and a `TlsAccept` or
/// `TlsConnect` among its writes (more than one may be queued).
#[cfg(feature = "tls")]
pub(super) fn tls_pending(st: &ConnState, ops: &Slab<Pending>) -> bool {
    !st.is(TLS)
        && ops
            .iter(&st.writes)
            .any(|p| matches!(p.kind, Kind::TlsStart(_)))
}

/// Reads wait during an accept pause, while a `Connect` heads the write FIFO (a read would
/// take a failed connect's error from the socket, and the connect would then never learn
/// it), and while a TLS handshake waits to start (what arrives is the handshake's).
fn reads_held(st: &ConnState, ops: &Slab<Pending>) -> bool {
    st.is(PAUSED) || st.is(TLS_PENDING) || matches!(write_head(st, ops), Some(Kind::Connect))
}

fn write_head<'a>(st: &ConnState, ops: &'a Slab<Pending>) -> Option<&'a Kind> {
    ops.front(&st.writes).map(|p| &p.kind)
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
            slot: 0,
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

        // (The readiness engine: the io_uring engine stamps progress as it reaps completions,
        // after the bytes moved, which `tests/inline.rs` covers for both.)
        let watcher = Watcher::builder()
            .inline(true)
            .engine(crate::Engine::Readiness)
            .build()
            .unwrap();
        // A poller that has run for a minute (its stamps count from its start).
        watcher.with_driver(|d| d.core().epoch = Instant::now() - Duration::from_secs(60));
        let (mut peer, socket) = UnixStream::pair().unwrap();
        let conn = watcher.register(socket).unwrap();
        let idle = Duration::from_secs(60);
        conn.send(Cmd::ReadFull(vec![0; 2]).idle_timeout(idle))
            .unwrap();
        // The read is taken, tried (nothing yet) and waits for readiness.
        watcher.with_driver(|d| assert!(d.step(Some(Instant::now()))));
        peer.write_all(b"x").unwrap();
        watcher.with_driver(|d| {
            #[allow(irrefutable_let_patterns)]
            let super::AnyDriver::Readiness(d) = d
            else {
                panic!("built with the readiness engine");
            };
            d.wait(Some(Duration::ZERO));
            // The round's clock as a long round or a preemption leaves it: long past.
            let moved_at = Instant::now();
            d.core.now = moved_at - Duration::from_secs(5);
            assert!(d.process());
            let st = &d.core.conns[conn.inner.id];
            let lag = st.read_progress.wrapping_sub(stamp(d.core.epoch, moved_at)) as i32;
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
