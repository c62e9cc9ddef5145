//! The io_uring engine: the kernel does the I/O and posts completions; the poller submits
//! operations and applies their completions, one `io_uring_enter` per round.
//!
//! - Reads: one receive in flight per connection with reads pending, into the ring's
//!   provided buffers (so an idle connection holds no buffer), asking for no more than the
//!   reads pending can take. Its bytes are copied out at once, into the reads in order (an
//!   internal read into the shared arena, a caller's buffer directly), and the buffer goes
//!   back to the kernel. Bytes the round's budget leaves for later wait in `buffered`: no
//!   byte waits in user space that no read asked for, the rest stays in the kernel's
//!   socket buffer (the back-pressure of epoll's reads). A multishot receive would save
//!   re-arming per message, but reads ahead up to 32 buffers at a time, whatever the reads
//!   pending want: measured in docs/benchmarks.md.
//! - Writes: one send in flight per connection, gathering up to 64 queued writes; the ring
//!   keeps a clone of each buffer until its completion.
//! - Accepts: one multishot accept per listener with accepts pending; sockets accepted
//!   beyond them wait in a queue of at most `ACCEPT_BACKLOG` (the multishot is cancelled when
//!   it is full), never dropped.
//! - Connect: a poll for writability, then `SO_ERROR` as on epoll. Shutdown: the system call
//!   itself, at once (it never blocks).
//! - Ownership: a connection whose operations the kernel still holds (`armed`, `sending`) is
//!   not retired until they come back: `Free`, `Detach`, a release or `close` cancel them and
//!   wait. A timer that ends a write in flight cancels the send and completes the write when
//!   the send's completion says how much was written.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use slotmap::{Key as _, KeyData};

use super::dgram::{self, Stop};
#[cfg(feature = "tls")]
use super::TLS_PENDING;
use super::{
    is_resource_error, reads, reads_held, stamp, write_all_position, write_head, write_parts,
    Arena, ConnState, Core, Engine, Pending, Retire, Sink, ARMED, BUDGET, CANCELLING, CLOSING,
    DGRAM, EOF, LEFTOVER, LISTENER, OWNED, PARKED, PARTIAL, PAUSED, READABLE, SENDING, TLS, TLS_RD,
    TLS_WORK, TLS_WR,
};
use crate::cmd::Kind;
use crate::conn::Key;
use crate::fifo::Slab;
use crate::shared::Shared;
use crate::sys::uring::{Cqe, Op, Ring, SendSlot, Setup, MAX_IOV};
use crate::{sys, Error, Unavailable};

/// Sockets a listener accepts ahead of its `Accept` commands, at most.
const ACCEPT_BACKLOG: usize = 64;

/// The io_uring engine's own state.
pub(crate) struct Uring {
    ring: Ring,
    /// The version of the key in each slot index: a completion's user data carries only the
    /// index (a slot is never reused while the kernel holds something of its connection).
    versions: Vec<u32>,
    /// Sockets accepted ahead of the listener's accepts (the listener is marked `readable`).
    accepted: HashMap<Key, VecDeque<OwnedFd>>,
    /// An error a receive or an accept ended with, for the next read or accept.
    errors: HashMap<Key, io::Error>,
    /// Multishots to cancel once the completions at hand are applied.
    cancels: Vec<(Op, u32)>,
    /// Receives to arm again at once (descriptor, index, length): a receive that stopped
    /// short of what the reads want while more bytes were there.
    rearms: Vec<(std::os::fd::RawFd, u32, u32)>,
    /// Reads each connection may still complete from the completions at hand: the round's
    /// share (`BUDGET`), so that one flooding peer cannot hold a round up.
    fed: HashMap<Key, u32>,
    /// The buffers of the next send, on their way into the ring (kept for its allocation).
    scratch: Vec<(Bytes, usize)>,
}

impl Uring {
    /// The engine, with its ring (see `sys::uring::Ring::new`).
    pub(crate) fn new(shared: &Arc<Shared>, setup: Setup) -> Result<Uring, Unavailable> {
        let ring = Ring::new(setup, shared.waker.raw_fd())?;
        // (Sized up front: the steady state allocates nothing.)
        Ok(Uring {
            ring,
            versions: Vec::new(),
            accepted: HashMap::with_capacity(4),
            errors: HashMap::with_capacity(4),
            cancels: Vec::with_capacity(64),
            rearms: Vec::with_capacity(64),
            fed: HashMap::with_capacity(256),
            scratch: Vec::with_capacity(MAX_IOV),
        })
    }

    fn key(&self, idx: u32) -> Option<Key> {
        let version = *self.versions.get(idx as usize)?;
        Some(KeyData::from_ffi(u64::from(version) << 32 | u64::from(idx)).into())
    }
}

fn idx_of(id: Key) -> u32 {
    id.data().as_ffi() as u32
}

/// The kind of the read that runs next (the FIFO's head, or the parked read).
fn next_read<'a>(st: &ConnState, ops: &'a Slab<Pending>) -> Option<&'a Kind> {
    match ops.front(&st.reads) {
        Some(p) => Some(&p.kind),
        None if st.is(PARKED) => Some(&Kind::ReadInternal),
        None => None,
    }
}

impl Engine for Uring {
    fn start(&mut self) -> io::Result<()> {
        self.ring.enable()
    }

    fn register(&mut self, id: Key) {
        let ffi = id.data().as_ffi();
        let idx = ffi as u32 as usize;
        if self.versions.len() <= idx {
            self.versions.resize(idx + 1, 0);
        }
        self.versions[idx] = (ffi >> 32) as u32;
    }

    fn runnable(&self, st: &ConnState, ops: &Slab<Pending>) -> bool {
        if st.is(CLOSING) {
            return false;
        }
        runnable(st, ops)
    }

    #[cfg(feature = "tls")]
    fn run_tls(&mut self, cx: super::tls::Ctx<'_>, session: &mut super::tls::Tls) {
        self.drive_tls(cx, session);
    }

    fn run(&mut self, core: &mut Core, id: Key) {
        let Core {
            conns,
            ops,
            sink,
            arena,
            epoch,
            leftover,
            ..
        } = core;
        let Some(st) = conns.get_mut(id) else {
            return;
        };
        let idx = idx_of(id);
        let fd = st.fd.as_raw_fd();
        if st.is(DGRAM) {
            // Readiness, as epoll gives it, from one-shot polls; the poller receives and
            // sends itself, many datagrams per system call (`driver/dgram.rs`).
            let mut budget = BUDGET;
            if !reads_held(st, ops) {
                if st.is(READABLE) {
                    let scratch = &mut core.dgram;
                    if dgram::read(st, ops, sink, arena, scratch, &mut budget) == Stop::Drained {
                        st.set(READABLE, false);
                    }
                }
                if next_read(st, ops).is_some() && !st.is(READABLE) && !st.is(ARMED) {
                    self.ring.poll_in(fd, idx);
                    st.set(ARMED, true);
                }
            }
            if !st.is(SENDING) && dgram::write(st, ops, sink) == Stop::Drained {
                self.ring.poll_out(fd, idx);
                st.set(SENDING, true);
            }
            return;
        }
        let mut pause = false;
        if !reads_held(st, ops) {
            st.unpark(ops);
            let completed = sink.made;
            pause = self.serve_reads(id, st, ops, sink, arena, leftover);
            st.park(ops);
            if sink.made != completed {
                // Bytes read ahead reached reads now: that is progress too (an idle timeout
                // counts from it), as a read of the socket would be on epoll.
                st.read_progress = stamp(*epoch, std::time::Instant::now());
            }
            // Bytes kept that no read can use yet (a frame's beginning) do not stop a receive.
            let waiting = st.is(READABLE) || (st.is(LEFTOVER) && !st.is(PARTIAL));
            if next_read(st, ops).is_some() && !st.is(ARMED) && !st.is(EOF) && !waiting && !pause {
                if matches!(next_read(st, ops), Some(Kind::Accept)) {
                    self.ring.accept_multi(fd, idx);
                } else {
                    self.ring.recv(fd, idx, wanted(st, ops, arena.chunk));
                }
                st.set(ARMED, true);
            }
        }
        while !st.is(SENDING) {
            let Some(head) = ops.front(&st.writes) else {
                break;
            };
            match head.kind {
                Kind::Connect => {
                    self.ring.poll_out(fd, idx);
                    st.set(SENDING, true);
                }
                // The session starts before the next run (`tls::prepare`).
                #[cfg(feature = "tls")]
                Kind::TlsStart(_) => break,
                Kind::Shutdown => {
                    let r = sys::shutdown_write(st.fd.as_fd());
                    let p = ops.pop_front(&mut st.writes).expect("front exists");
                    sink.complete(st, p, r.map_err(Error::Io), None);
                }
                _ => {
                    // The buffers move into the ring for the send's time (the writes keep
                    // empty ones), so that nothing can drop them while the kernel reads them.
                    // A `WriteAll`'s buffers are shared instead (a reference count each): they
                    // stay in its `Vec`, which the completion hands back whole.
                    let scratch = &mut self.scratch;
                    ops.walk_mut(&st.writes, |p| match &mut p.kind {
                        Kind::Write(b) if scratch.len() < MAX_IOV => {
                            scratch.push((std::mem::take(b), p.done));
                            true
                        }
                        Kind::WriteAll(bufs, _) if scratch.len() < MAX_IOV => {
                            let (first, at) = write_all_position(bufs, p.done);
                            for (j, b) in bufs.iter().enumerate().skip(first) {
                                if scratch.len() == MAX_IOV {
                                    return false;
                                }
                                if b.len() > if j == first { at } else { 0 } {
                                    scratch.push((b.clone(), if j == first { at } else { 0 }));
                                }
                            }
                            true
                        }
                        _ => false,
                    });
                    self.ring.send(fd, idx, scratch.drain(..));
                    st.set(SENDING, true);
                }
            }
        }
        if pause {
            st.set(PAUSED, true);
            core.pause_accepts(id);
        }
    }

    fn wait(&mut self, core: &mut Core, timeout: Option<Duration>) {
        if let Err(e) = self.ring.submit_and_wait(timeout) {
            // Not expected (ETIME, EINTR, EBUSY and EAGAIN are taken care of): do not spin.
            debug_assert!(false, "io_uring_enter: {e}");
            std::thread::sleep(Duration::from_millis(1));
        }
        core.after_wait();
        self.reap(core);
    }

    fn busy(&self, st: &ConnState) -> bool {
        st.is(ARMED) || st.is(SENDING)
    }

    fn cancel(&mut self, id: Key, st: &mut ConnState) {
        let idx = idx_of(id);
        if st.is(ARMED) && !st.is(CANCELLING) {
            st.set(CANCELLING, true);
            let op = if st.is(LISTENER) {
                Op::Accept
            } else if st.is(DGRAM) {
                Op::PollIn
            } else {
                Op::Recv
            };
            self.ring.cancel(op, idx);
        }
        if st.is(SENDING) {
            // (A timer may have cancelled it already: a second cancel finds nothing.)
            self.ring.cancel(Op::Send, idx);
            self.ring.cancel(Op::Poll, idx);
        }
    }

    fn hold(&mut self, id: Key, st: &mut ConnState, ops: &mut Slab<Pending>, seq: u64) -> bool {
        // (A TLS send holds the session's ciphertext, never a write's buffer: the write's
        // plaintext was copied into the session.)
        if !st.is(SENDING) || st.is(TLS) {
            return false;
        }
        match write_head(st, ops) {
            // A connect's poll holds no buffer, nor a datagram socket's: the operation ends
            // now, the poll is cancelled.
            _ if st.is(DGRAM) => {
                self.ring.cancel(Op::Poll, idx_of(id));
                false
            }
            Some(Kind::Connect) => {
                self.ring.cancel(Op::Poll, idx_of(id));
                false
            }
            // Only writes are gathered into a send: a shutdown or a handshake's command
            // queued behind it is in none, whatever the kernel holds of the writes ahead.
            _ if !ops
                .iter(&st.writes)
                .find(|p| p.seq == seq)
                .is_some_and(|p| matches!(p.kind, Kind::Write(_) | Kind::WriteAll(..))) =>
            {
                false
            }
            // Any write may be in the send: it ends with the bytes the send's completion
            // reports, which the cancel brings at once.
            _ => {
                self.ring.cancel(Op::Send, idx_of(id));
                true
            }
        }
    }

    fn drain(&mut self, core: &mut Core) {
        let limit = Duration::from_secs(10);
        let mut handled = Vec::new();
        let quiet = self
            .ring
            .quiesce(limit, |cqe| handled.push(Owned::from(cqe)));
        for c in handled {
            self.apply(core, c);
        }
        // Whatever the kernel did not give back in time: retire anyway (the ring leaks the
        // memory it still lends rather than free it).
        let _ = quiet;
        let left: Vec<Key> = core.closing.keys().copied().collect();
        for id in left {
            if let Some(how) = core.closing.remove(&id) {
                core.settle(id, how);
            }
        }
    }
}

#[cfg(feature = "tls")]
impl Uring {
    /// Runs a TLS connection (`driver/tls.rs`): the session's work, then a receive while it
    /// wants ciphertext and a send while it has some (one of each in flight).
    fn drive_tls(&mut self, mut cx: super::tls::Ctx<'_>, session: &mut super::tls::Tls) {
        use super::tls::{self, RECV_LEN};
        let id = cx.id;
        // (An error a receive met before the session started.)
        if let Some(e) = self.errors.remove(&id) {
            session.fail_io(e);
        }
        let mut budget = BUDGET;
        tls::process(&mut cx, session, &mut budget);
        let st = cx.st;
        let (idx, fd) = (idx_of(id), st.fd.as_raw_fd());
        if st.is(TLS_RD) && !st.is(ARMED) && !st.is(EOF) {
            self.ring.recv(fd, idx, RECV_LEN);
            st.set(ARMED, true);
        }
        if st.is(TLS_WR) && !st.is(SENDING) {
            let data = session.next_send();
            self.ring.send(fd, idx, std::iter::once((data, 0)));
            st.set(SENDING, true);
        }
    }
}

/// A completion taken out of the ring (its bytes copied), to apply once the ring is free.
struct Owned {
    op: Op,
    idx: u32,
    res: i32,
    more: bool,
    nonempty: bool,
    data: Option<Vec<u8>>,
    accepted: Option<OwnedFd>,
    sent: Vec<(Bytes, usize)>,
}

impl From<Cqe<'_>> for Owned {
    fn from(c: Cqe<'_>) -> Owned {
        Owned {
            op: c.op,
            idx: c.idx,
            res: c.res,
            more: c.more,
            nonempty: c.nonempty,
            data: c.data.map(<[u8]>::to_vec),
            accepted: c.accepted,
            sent: c.sent.map(|s| s.drain().collect()).unwrap_or_default(),
        }
    }
}

impl Uring {
    /// Applies every completion that has arrived, then asks for the cancels they called for.
    fn reap(&mut self, core: &mut Core) {
        let Uring {
            ring,
            versions,
            accepted,
            errors,
            cancels,
            rearms,
            fed,
            ..
        } = self;
        fed.clear();
        let now = stamp(core.epoch, core.now);
        ring.complete(|cqe| {
            let version = versions.get(cqe.idx as usize).copied();
            let Some(version) = version else {
                return;
            };
            let id: Key = KeyData::from_ffi(u64::from(version) << 32 | u64::from(cqe.idx)).into();
            let mut parts = Parts {
                rearms,
                fed,
                accepted,
                errors,
                cancels,
            };
            let c = Done {
                op: cqe.op,
                res: cqe.res,
                more: cqe.more,
                nonempty: cqe.nonempty,
                data: cqe.data,
                accepted: cqe.accepted,
                sent: cqe.sent.map_or(Sent::None, Sent::Slot),
            };
            parts.apply(core, id, c, now);
        });
        for (op, idx) in self.cancels.drain(..) {
            self.ring.cancel(op, idx);
        }
        for (fd, idx, len) in self.rearms.drain(..) {
            self.ring.recv(fd, idx, len);
        }
    }

    fn apply(&mut self, core: &mut Core, c: Owned) {
        let Some(id) = self.key(c.idx) else {
            return;
        };
        let now = stamp(core.epoch, core.now);
        let mut parts = Parts {
            rearms: &mut self.rearms,
            fed: &mut self.fed,
            accepted: &mut self.accepted,
            errors: &mut self.errors,
            cancels: &mut self.cancels,
        };
        let done = Done {
            op: c.op,
            res: c.res,
            more: c.more,
            nonempty: c.nonempty,
            data: c.data.as_deref(),
            accepted: c.accepted,
            sent: Sent::Owned(c.sent),
        };
        parts.apply(core, id, done, now);
    }

    /// Serves the read FIFO from what waits in user space (bytes, accepted sockets, an error,
    /// end of stream). Returns `true` if an accept failed for lack of resources (pause).
    fn serve_reads(
        &mut self,
        id: Key,
        st: &mut ConnState,
        ops: &mut Slab<Pending>,
        sink: &mut Sink,
        arena: &mut Arena,
        leftover: &mut HashMap<Key, Bytes>,
    ) -> bool {
        // The round's share, less what the completions at hand already took.
        let mut budget = self.fed.get(&id).copied().unwrap_or(BUDGET);
        let pause = self.serve(id, st, ops, sink, arena, leftover, &mut budget);
        self.fed.insert(id, budget);
        pause
    }

    #[allow(clippy::too_many_arguments)]
    fn serve(
        &mut self,
        id: Key,
        st: &mut ConnState,
        ops: &mut Slab<Pending>,
        sink: &mut Sink,
        arena: &mut Arena,
        leftover: &mut HashMap<Key, Bytes>,
        budget: &mut u32,
    ) -> bool {
        loop {
            let Some(head) = next_read(st, ops) else {
                return false;
            };
            if *budget == 0 {
                return false; // the rest next round
            }
            let accept = matches!(head, Kind::Accept);
            if accept != st.is(LISTENER) {
                // An accept on a stream, a read on a listener: what epoll's system calls say.
                let errno = if accept { libc::EINVAL } else { libc::ENOTCONN };
                st.unpark(ops);
                let p = ops.pop_front(&mut st.reads).expect("front exists");
                let e = io::Error::from_raw_os_error(errno);
                sink.complete(st, p, Err(Error::Io(e)), None);
                continue;
            }
            if accept {
                if let Some(fd) = self.accepted.get_mut(&id).and_then(VecDeque::pop_front) {
                    let p = ops.pop_front(&mut st.reads).expect("front exists");
                    let peer = sys::peer_addr(fd.as_fd());
                    let listener = st.handle();
                    sink.accepted.push((p, listener, Ok((fd, peer))));
                    continue;
                }
                if let Some(e) = self.errors.remove(&id) {
                    let pause = is_resource_error(&e);
                    let p = ops.pop_front(&mut st.reads).expect("front exists");
                    let listener = st.handle();
                    sink.accepted.push((p, listener, Err(e)));
                    if pause {
                        st.set(
                            READABLE,
                            self.accepted.get(&id).is_some_and(|q| !q.is_empty()),
                        );
                        return true;
                    }
                    continue;
                }
                st.set(READABLE, false);
                return false;
            }
            if st.is(ARMED) && st.is(LEFTOVER) {
                return false; // a receive tops the bytes up: the reads wait for it
            }
            if let Some(kept) = Core::take_leftover(leftover, id, st) {
                let before = sink.made;
                let rest = reads::serve(st, ops, sink, arena.chunk, kept, budget);
                Core::keep_leftover(leftover, id, st, rest, false);
                if !st.is(LEFTOVER) || sink.made != before && *budget > 0 {
                    continue;
                }
                // No read can use what is left yet (or the budget is spent): it waits for
                // more bytes, unless none will come: at the end of the stream it goes to the
                // reads as partial bytes; an error goes to the next read.
                st.set(PARTIAL, *budget > 0);
                if *budget == 0 {
                    return false;
                }
                if st.is(EOF) {
                    let partial = Core::take_leftover(leftover, id, st);
                    reads::end(st, ops, sink, partial);
                    return false;
                }
                if !self.errors.contains_key(&id) {
                    return false;
                }
            }
            if let Some(e) = self.errors.remove(&id) {
                st.set(READABLE, false);
                st.unpark(ops);
                let p = ops.pop_front(&mut st.reads).expect("front exists");
                sink.complete(st, p, Err(Error::Io(e)), None);
                continue;
            }
            st.set(READABLE, false);
            if st.is(EOF) {
                let partial = Core::take_leftover(leftover, id, st);
                reads::end(st, ops, sink, partial);
            }
            return false;
        }
    }
}

/// The parts of the engine a completion updates (the ring itself being busy delivering it).
struct Parts<'a> {
    rearms: &'a mut Vec<(std::os::fd::RawFd, u32, u32)>,
    fed: &'a mut HashMap<Key, u32>,
    accepted: &'a mut HashMap<Key, VecDeque<OwnedFd>>,
    errors: &'a mut HashMap<Key, io::Error>,
    cancels: &'a mut Vec<(Op, u32)>,
}

/// A completion as `Parts::apply` takes it.
struct Done<'a> {
    op: Op,
    res: i32,
    more: bool,
    nonempty: bool,
    data: Option<&'a [u8]>,
    accepted: Option<OwnedFd>,
    sent: Sent<'a>,
}

/// A send's buffers coming back.
enum Sent<'a> {
    None,
    Slot(&'a mut SendSlot),
    Owned(Vec<(Bytes, usize)>),
}

impl Sent<'_> {
    /// Buffer `i` (each once).
    fn take(&mut self, i: usize) -> Option<Bytes> {
        match self {
            Sent::None => None,
            Sent::Slot(s) => s.take(i),
            Sent::Owned(v) => v.get_mut(i).map(|(b, _)| std::mem::take(b)),
        }
    }
}

impl Parts<'_> {
    fn apply(&mut self, core: &mut Core, id: Key, done: Done<'_>, now: u32) {
        let Done {
            op,
            res,
            more,
            nonempty,
            data,
            accepted,
            sent,
        } = done;
        let Core {
            conns,
            ops,
            sink,
            arena,
            leftover,
            closing,
            #[cfg(feature = "tls")]
                tls: sessions,
            ..
        } = &mut *core;
        let Some(st) = conns.get_mut(id) else {
            return; // (not expected: a slot outlives what the kernel holds of it)
        };
        let idx = idx_of(id);
        match op {
            #[cfg(feature = "tls")]
            Op::Recv | Op::Send if st.is(TLS) && !(op == Op::Recv && st.is(CLOSING)) => {
                let Some(session) = sessions.get_mut(&id) else {
                    return;
                };
                let transient = |e: i32| matches!(e, libc::EAGAIN | libc::EINTR | libc::ECANCELED);
                if op == Op::Recv {
                    if !more {
                        st.set(ARMED, false);
                        st.set(CANCELLING, false);
                    }
                    if let Some(data) = data {
                        sink.stats.bytes_read += data.len() as u64;
                        st.read_progress = now;
                        session.received(data);
                    } else if res == 0 {
                        st.set(EOF, true);
                        session.eof();
                    } else if res < 0 && !transient(-res) && -res != libc::ENOBUFS {
                        session.fail_io(io::Error::from_raw_os_error(-res));
                    }
                } else {
                    st.set(SENDING, false);
                    if res >= 0 {
                        sink.stats.bytes_written += res as u64;
                        if res > 0 {
                            st.write_progress = now;
                        }
                        session.sent(res as usize);
                    } else if !transient(-res) {
                        session.fail_io(io::Error::from_raw_os_error(-res));
                    }
                }
                st.set(TLS_WORK, true);
            }
            Op::Recv => {
                if !more {
                    st.set(ARMED, false);
                }
                if let Some(data) = data {
                    sink.stats.bytes_read += data.len() as u64;
                    st.read_progress = now;
                    if st.is(CLOSING) {
                        // Read before the cancel took effect, for a connection that goes:
                        // nobody will read these, unless the socket is handed back, with
                        // the bytes taken from it.
                        if let Some(Retire::Detach(..)) = closing.get(&id) {
                            let kept = Core::take_leftover(leftover, id, st).unwrap_or_default();
                            let bytes = arena.concat(&[&kept, data], &mut sink.stats);
                            Core::keep_leftover(leftover, id, st, bytes, true);
                        }
                        return self.settle_if_done(core, id);
                    }
                    #[cfg(feature = "tls")]
                    if st.is(TLS_PENDING) {
                        // The first bytes of a handshake about to start: kept for the
                        // session (`tls::prepare`), not served to a read.
                        let kept = Core::take_leftover(leftover, id, st).unwrap_or_default();
                        let bytes = arena.concat(&[&kept, data], &mut sink.stats);
                        Core::keep_leftover(leftover, id, st, bytes, true);
                        if !st.is(ARMED) {
                            st.set(CANCELLING, false);
                        }
                        return core.mark(id, runnable);
                    }
                    let want = wanted(st, ops, arena.chunk) as usize;
                    // (An internal read, or a batch of frames, is topped up; a read into a
                    // caller's buffer takes what came, as a short read of the socket would
                    // give it.)
                    let internal = matches!(
                        next_read(st, ops),
                        Some(Kind::ReadInternal | Kind::ReadFrames(..))
                    );
                    let budget = self.fed.entry(id).or_insert(BUDGET);
                    let kept = Core::take_leftover(leftover, id, st);
                    let mut data = data;
                    if kept.is_none() {
                        // Reads into callers' buffers take their bytes straight from here.
                        let n = reads::copy_into(st, ops, sink, data, budget);
                        data = &data[n..];
                    }
                    let total = kept.as_ref().map_or(0, Bytes::len) + data.len();
                    if total > 0 {
                        // Into the arena (after the bytes kept), for internal reads' slices
                        // and frames, or to wait for the next read.
                        let kept = kept.unwrap_or_default();
                        let bytes = arena.concat(&[&kept, data], &mut sink.stats);
                        if nonempty && total < want && internal && !st.is(ARMED) {
                            // The receive stopped short of what an internal read wants (at
                            // the end of a buffer consumed incrementally, say) though more
                            // bytes are there: take those too before the read sees any, so
                            // that bytes that arrived together are read together, as one
                            // read of the socket would. The read waits for that receive.
                            // (Kept as they are, not copied out of the arena: the receive
                            // is on its way.)
                            st.set(LEFTOVER, true);
                            st.set(PARTIAL, false);
                            st.set(OWNED, false);
                            leftover.insert(id, bytes);
                            let more = (want - total).min(u32::MAX as usize) as u32;
                            self.rearms.push((st.fd.as_raw_fd(), idx, more));
                            st.set(ARMED, true);
                        } else {
                            let rest = reads::serve(st, ops, sink, arena.chunk, bytes, budget);
                            Core::keep_leftover(leftover, id, st, rest, true);
                            // What is left waits for more bytes, unless the budget cut the
                            // serving short.
                            st.set(PARTIAL, st.is(LEFTOVER) && *budget > 0);
                        }
                    }
                } else if res == 0 {
                    st.set(EOF, true);
                } else if res < 0 {
                    let errno = -res;
                    // ENOBUFS (no provided buffer: the bytes wait in the socket; the buffers
                    // are back by the next round), a cancel, a retry: the receive is armed
                    // again while reads are pending. Anything else is the next read's error.
                    if !matches!(
                        errno,
                        libc::ENOBUFS | libc::ECANCELED | libc::EAGAIN | libc::EINTR
                    ) {
                        self.errors
                            .entry(id)
                            .or_insert_with(|| io::Error::from_raw_os_error(errno));
                        st.set(READABLE, true);
                    }
                }
                if !st.is(ARMED) {
                    st.set(CANCELLING, false);
                }
            }
            Op::Accept => {
                if !more {
                    st.set(ARMED, false);
                    st.set(CANCELLING, false);
                }
                if let Some(fd) = accepted {
                    let q = self.accepted.entry(id).or_default();
                    q.push_back(fd);
                    st.set(READABLE, true);
                    if q.len() >= ACCEPT_BACKLOG && st.is(ARMED) && !st.is(CANCELLING) {
                        st.set(CANCELLING, true);
                        self.cancels.push((Op::Accept, idx));
                    }
                } else if res < 0 && !matches!(-res, libc::ECANCELED | libc::EAGAIN | libc::EINTR) {
                    self.errors
                        .entry(id)
                        .or_insert_with(|| io::Error::from_raw_os_error(-res));
                    st.set(READABLE, true);
                }
            }
            Op::Send => {
                st.set(SENDING, false);
                // The buffers come back to their writes, first to last.
                // (A `WriteAll`'s were shared: the ring's references are dropped, counted
                // as the send counted them.)
                let (mut back, mut i) = (sent, 0);
                ops.walk_mut(&st.writes, |p| {
                    if matches!(p.kind, Kind::WriteAll(..)) {
                        let mut k = 0;
                        write_parts(p, |_| {
                            k += 1;
                            i + k < MAX_IOV
                        });
                        for j in i..i + k {
                            drop(back.take(j));
                        }
                        i += k;
                        return i < MAX_IOV;
                    }
                    match (&mut p.kind, back.take(i)) {
                        (Kind::Write(b), Some(sent)) => {
                            *b = sent;
                            i += 1;
                            true
                        }
                        _ => false,
                    }
                });
                match res {
                    n if n >= 0 => {
                        let n = n as usize;
                        sink.stats.bytes_written += n as u64;
                        if n > 0 {
                            st.write_progress = now;
                        }
                        Core::advance_writes(st, ops, sink, n);
                    }
                    e if matches!(-e, libc::EAGAIN | libc::EINTR | libc::ECANCELED) => {}
                    e => {
                        if let Some(p) = ops.pop_front(&mut st.writes) {
                            let err = io::Error::from_raw_os_error(-e);
                            sink.complete(st, p, Err(Error::Io(err)), None);
                        }
                    }
                }
                // Writes a timer ended while the kernel held them complete now, with the
                // bytes written by then.
                while let Some(p) = ops.front(&st.writes) {
                    let Some(late) = p.late else { break };
                    let p = ops.pop_front(&mut st.writes).expect("front exists");
                    sink.complete(st, p, Err(late.error()), None);
                }
            }
            Op::Poll => {
                st.set(SENDING, false);
                if matches!(write_head(st, ops), Some(Kind::Connect)) && res >= 0 {
                    match sys::connect_finished(st.fd.as_fd()) {
                        Ok(false) => {} // a stale wake-up: polled again
                        Ok(true) => {
                            let p = ops.pop_front(&mut st.writes).expect("front exists");
                            sink.complete(st, p, Ok(()), None);
                        }
                        Err(e) => {
                            let p = ops.pop_front(&mut st.writes).expect("front exists");
                            sink.complete(st, p, Err(Error::Io(e)), None);
                        }
                    }
                }
            }
            Op::PollIn => {
                st.set(ARMED, false);
                st.set(CANCELLING, false);
                // Readable, or errored (the receive will say): try.
                st.set(READABLE, true);
            }
            Op::Cancel | Op::Wake => {}
        }
        if st.is(CLOSING) {
            return self.settle_if_done(core, id);
        }
        core.mark(id, runnable);
    }

    /// A closing connection settles once the kernel holds nothing more of it.
    fn settle_if_done(&mut self, core: &mut Core, id: Key) {
        let Some(st) = core.conns.get(id) else {
            return;
        };
        if st.is(ARMED) || st.is(SENDING) {
            return;
        }
        if let Some(how) = core.closing.remove(&id) {
            self.accepted.remove(&id);
            self.errors.remove(&id);
            core.settle(id, how);
        }
    }
}

/// How many bytes the reads pending can take now (a receive asks for no more, so no byte
/// waits in user space that no read asked for): a read into a caller's buffer its length, a
/// read-full what is missing, an internal read a chunk; at most 4 GiB.
fn wanted(st: &ConnState, ops: &Slab<Pending>, chunk: usize) -> u32 {
    let internal = if st.is(PARKED) { chunk } else { 0 };
    let pending = ops.iter(&st.reads).take(MAX_IOV).map(|p| match &p.kind {
        Kind::Read(v) => v.len(),
        Kind::ReadFull(v) => v.len() - p.done,
        _ => chunk,
    });
    let total = pending.fold(internal, usize::saturating_add);
    total.min(u32::MAX as usize) as u32
}

/// What makes a connection runnable on this engine: reads pending that something waits for
/// in user space (`readable`: bytes, accepted sockets or an error), or end of stream, or no
/// receive armed yet, or that cannot succeed on this socket (they fail at once); a write
/// and no send in flight.
fn runnable(st: &ConnState, ops: &Slab<Pending>) -> bool {
    if st.is(CLOSING) {
        return false;
    }
    if st.is(TLS) {
        // The session says what it needs (`driver/tls.rs`).
        return st.is(TLS_WORK)
            || (st.is(TLS_RD) && !st.is(ARMED) && !st.is(EOF))
            || (st.is(TLS_WR) && !st.is(SENDING));
    }
    // (Bytes waiting on a stream while a receive is armed wait for it: it tops them up.)
    let waiting = st.is(READABLE) && (st.is(LISTENER) || !st.is(ARMED));
    let reads = next_read(st, ops).is_some_and(|k| {
        !reads_held(st, ops) && (waiting || st.is(EOF) || !st.is(ARMED) || st.misdirected(k))
    });
    let writes = write_head(st, ops).is_some() && !st.is(SENDING);
    reads || writes
}
