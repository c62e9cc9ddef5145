//! The readiness engine: epoll on Linux and Android, kqueue on macOS, iOS and FreeBSD. The
//! poller makes the system calls: edge-triggered readiness marks a connection readable or
//! writable, and its operations run until `EAGAIN` (or their budget), straight into the
//! caller's buffers or the shared arena.

use std::collections::HashMap;
use std::io::{self, IoSlice};

use bytes::Bytes;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use slotmap::KeyData;

use super::dgram::{self, Stop};
use super::{
    is_resource_error, reads, reads_held, write_head, write_parts, Arena, ConnState, Core, Engine,
    Pending, Sink, BUDGET, DGRAM, EOF, HUP, LEFTOVER, LISTENER, MAX_IOV, MIN_ARENA, PARKED,
    PARTIAL, PAUSED, READABLE, TLS, TLS_RD, TLS_WORK, TLS_WR, WRITABLE,
};
use crate::cmd::Kind;
use crate::conn::Key;
use crate::fifo::{Fifo, Slab};
use crate::shared::Shared;
use crate::stats::Stats;
use crate::{sys, Error};

/// The waker's event token. Slotmap never hands out index `u32::MAX`, so no key maps to it.
pub(crate) const WAKER_TOKEN: u64 = u64::MAX;

/// The readiness engine's own state: the event buffer, and the selector (in `Shared`, where
/// `register` adds sockets to it from user threads).
pub(crate) struct Readiness {
    shared: Arc<Shared>,
    events: sys::Events,
}

impl Readiness {
    pub(crate) fn new(shared: Arc<Shared>, events_capacity: usize) -> Readiness {
        Readiness {
            shared,
            events: sys::Events::with_capacity(events_capacity),
        }
    }
}

impl Engine for Readiness {
    fn runnable(&self, st: &ConnState, ops: &Slab<Pending>) -> bool {
        runnable(st, ops)
    }

    #[cfg(feature = "tls")]
    fn run_tls(&mut self, cx: super::tls::Ctx<'_>, session: &mut super::tls::Tls) {
        drive_tls(cx, session);
    }

    fn run(&mut self, core: &mut Core, id: Key) {
        let Core {
            conns,
            ops,
            sink,
            arena,
            leftover,
            ..
        } = core;
        let Some(st) = conns.get_mut(id) else {
            return;
        };
        let mut budget = BUDGET;
        if st.is(DGRAM) {
            if st.is(READABLE) && !reads_held(st, ops) {
                let scratch = &mut core.dgram;
                if dgram::read(st, ops, sink, arena, scratch, &mut budget) == Stop::Drained {
                    st.set(READABLE, false);
                }
            }
            if st.is(WRITABLE) && dgram::write(st, ops, sink) == Stop::Drained {
                st.set(WRITABLE, false);
            }
            return;
        }
        // Bytes the connection kept go to its reads first, in order.
        if st.is(LEFTOVER) && !reads_held(st, ops) {
            let kept = Core::take_leftover(leftover, id, st).expect("LEFTOVER");
            let rest = reads::serve(st, ops, sink, arena.chunk, kept, &mut budget);
            Core::keep_leftover(leftover, id, st, rest, false);
            // What is left waits for more bytes, unless the budget cut the serving short.
            st.set(PARTIAL, st.is(LEFTOVER) && budget > 0);
        }
        // A parked read is the connection's only read (the read FIFO is empty).
        let paused = if st.is(PARKED) && !st.is(LISTENER) {
            // The common case, an idle connection's one read: run it in place.
            if (st.is(READABLE) || st.is(EOF)) && !reads_held(st, ops) && budget > 0 {
                read_parked(st, sink, arena);
            }
            false
        } else {
            // (On a listener a parked read, a `ReadInternal`, fails at once.)
            st.unpark(ops);
            let paused = do_reads(id, st, ops, sink, arena, leftover, &mut budget);
            st.park(ops);
            paused
        };
        do_writes(st, ops, sink);
        if paused {
            core.pause_accepts(id);
        }
    }

    fn wait(&mut self, core: &mut Core, timeout: Option<Duration>) {
        let selector = (self.shared.selector.as_ref()).expect("a readiness watcher's selector");
        if selector.select(&mut self.events, timeout).is_err() {
            // Only EBADF/EFAULT/EINVAL remain, not expected with our own fd and buffer and a
            // timeout the selector caps; do not spin if one happens all the same.
            thread::sleep(Duration::from_millis(1));
        }
        core.after_wait();
        for ev in self.events.iter() {
            if ev.token == WAKER_TOKEN {
                self.shared.waker.reset();
                continue;
            }
            let id = Key::from(KeyData::from_ffi(ev.token));
            // A stale key (freed connection, or one whose slot was reused) finds nothing.
            let Some(st) = core.conns.get_mut(id) else {
                continue;
            };
            if ev.readable {
                st.set(READABLE, true)
            }
            if ev.writable {
                st.set(WRITABLE, true)
            }
            if ev.hup {
                st.set(HUP, true)
            }
            core.mark(id, runnable);
        }
    }
}

/// One internal read from `fd` into the arena: the result and how much it asked for.
#[inline]
fn arena_recv(
    arena: &mut Arena,
    fd: BorrowedFd<'_>,
    stats: &mut Stats,
) -> (io::Result<usize>, usize) {
    let max = arena.refill(stats);
    (sys::recv_spare(fd, &mut arena.buf, max), max)
}

/// Runs the read FIFO (a parked read moved into it first, by the caller), within what is
/// left of the round's `budget`. Returns `true` if a listener hit a resource limit and must
/// pause.
fn do_reads(
    id: Key,
    st: &mut ConnState,
    ops: &mut Slab<Pending>,
    sink: &mut Sink,
    arena: &mut Arena,
    leftover: &mut HashMap<Key, Bytes>,
    budget: &mut u32,
) -> bool {
    if reads_held(st, ops) {
        return false;
    }
    while let Some(p) = ops.front_mut(&st.reads) {
        if st.is(EOF) {
            let partial = Core::take_leftover(leftover, id, st);
            reads::end(st, ops, sink, partial);
            break;
        }
        if (!st.is(READABLE) && !st.misdirected(&p.kind)) || *budget == 0 {
            break;
        }
        if matches!(p.kind, Kind::ReadFrame(_) | Kind::ReadFrames(..)) {
            // A framed read: into the arena, after the bytes of a frame begun earlier.
            let kept = Core::take_leftover(leftover, id, st);
            let fd = st.fd.as_fd();
            let (res, asked, bytes) = arena_recv_after(arena, fd, kept, &mut sink.stats);
            match read_outcome(st, res, asked, &mut sink.stats) {
                // Drained: what was kept is kept.
                None => Core::keep_leftover(leftover, id, st, bytes, false),
                Some(Ok(_)) => {
                    let before = *budget;
                    let rest = reads::serve(st, ops, sink, arena.chunk, bytes, budget);
                    Core::keep_leftover(leftover, id, st, rest, true);
                    st.set(PARTIAL, st.is(LEFTOVER) && *budget > 0);
                    if *budget == before {
                        // (A syscall's worth of the budget, even when no frame completed:
                        // a peer trickling bytes gets its share, not more.)
                        *budget -= 1;
                    }
                }
                Some(Err(Error::Eof)) => {
                    reads::end(st, ops, sink, (!bytes.is_empty()).then_some(bytes));
                    break;
                }
                Some(Err(e)) => {
                    Core::keep_leftover(leftover, id, st, bytes, false);
                    let p = ops.pop_front(&mut st.reads).expect("front exists");
                    *budget -= 1;
                    sink.complete(st, p, Err(e), None);
                }
            }
            continue;
        }
        *budget -= 1;
        let fd = st.fd.as_fd();
        let (res, asked) = match &mut p.kind {
            Kind::Read(buf) => (sys::recv(fd, &mut buf[..]), buf.len()),
            Kind::ReadFull(buf) => (sys::recv(fd, &mut buf[p.done..]), buf.len() - p.done),
            Kind::ReadInternal => arena_recv(arena, fd, &mut sink.stats),
            Kind::ReadFrame(_)
            | Kind::ReadFrames(..)
            | Kind::Write(_)
            | Kind::WriteAll(..)
            | Kind::SendTo(..)
            | Kind::Connect
            | Kind::Shutdown
            | Kind::Free
            | Kind::Detach => {
                unreachable!("framed reads are handled above; writes wait in the write FIFO")
            }
            #[cfg(feature = "tls")]
            Kind::TlsStart(_) => unreachable!("a TLS start waits in the write FIFO"),
            Kind::Accept => {
                let result = sys::accept(fd);
                if matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                    st.set(READABLE, false);
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
                    st.set(PAUSED, true);
                    st.set(READABLE, false);
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

/// One read from `fd` into the arena, after `kept` (the first bytes of a frame, read
/// earlier), so that the frame is one slice: the result, how much it asked for, and the
/// bytes (`kept` and what arrived; on failure `kept` alone). `kept` is copied (it is small,
/// or the frame is large and its bytes get a buffer of their own).
fn arena_recv_after(
    arena: &mut Arena,
    fd: BorrowedFd<'_>,
    kept: Option<Bytes>,
    stats: &mut Stats,
) -> (io::Result<usize>, usize, Bytes) {
    let kept = kept.unwrap_or_default();
    if kept.len() + MIN_ARENA > arena.chunk {
        // A frame longer than a chunk: a buffer of its own, room for another chunk.
        let mut own = bytes::BytesMut::with_capacity(kept.len() + arena.chunk);
        own.extend_from_slice(&kept);
        let res = sys::recv_spare(fd, &mut own, arena.chunk);
        let bytes = match res {
            Ok(_) => own.freeze(),
            Err(_) => kept,
        };
        return (res, arena.chunk, bytes);
    }
    // (Room for the kept bytes and a useful read after them.)
    arena.refill_for(kept.len(), stats);
    arena.buf.extend_from_slice(&kept);
    let max = arena.spare().min(arena.chunk);
    let res = sys::recv_spare(fd, &mut arena.buf, max);
    let got = *res.as_ref().unwrap_or(&0);
    let bytes = arena.buf.split_to(kept.len() + got).freeze();
    match res {
        Ok(_) => (res, max, bytes),
        Err(_) => (res, max, kept),
    }
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
            st.set(EOF, true);
            Some(Err(Error::Eof))
        }
        Ok(n) => {
            stats.bytes_read += n as u64;
            // A short read drained the socket; the next arrival is a new edge. After a
            // hang-up no edge will come, so keep reading until the socket says EOF.
            if n < asked && !st.is(HUP) {
                st.set(READABLE, false);
            }
            Some(Ok(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            st.set(READABLE, false);
            st.set(HUP, false);
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
    let outcome = if st.is(EOF) {
        Some(Err(Error::Eof))
    } else {
        let (res, asked) = arena_recv(arena, st.fd.as_fd(), &mut sink.stats);
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

/// Sends the plain writes at the head of `q` (`Write`, `WriteAll`): one `send` for a lone
/// buffer (the common case, without building an iovec array), else up to `MAX_IOV` buffers
/// in one `sendmsg`. Returns the result and how many bytes were asked for.
fn send_writes(fd: BorrowedFd<'_>, ops: &Slab<Pending>, q: &Fifo) -> (io::Result<usize>, usize) {
    let is_write = |p: &Pending| matches!(p.kind, Kind::Write(_) | Kind::WriteAll(..));
    let lone = |p: &Pending| matches!(p.kind, Kind::Write(_));
    let mut writes = ops.iter(q).take_while(|p| is_write(p));
    let Some(first) = writes.next() else {
        return (Ok(0), 0);
    };
    if lone(first) && !matches!(ops.iter(q).nth(1), Some(p) if is_write(p)) {
        let mut buf: &[u8] = &[];
        write_parts(first, |b| {
            buf = b;
            false
        });
        return (sys::send(fd, buf), buf.len());
    }
    let mut iov = [IoSlice::new(&[]); MAX_IOV];
    let (mut k, mut asked) = (0, 0);
    for p in std::iter::once(first).chain(writes) {
        write_parts(p, |b| {
            iov[k] = IoSlice::new(b);
            asked += b.len();
            k += 1;
            k < MAX_IOV
        });
        if k == MAX_IOV {
            break;
        }
    }
    (sys::send_vectored(fd, &iov[..k]), asked)
}

/// Whether `st` can make progress now: reads that are not held and either have readiness
/// or cannot succeed anyway (`ConnState::misdirected`), or writes on a writable socket; a
/// `Shutdown` at the head needs no buffer space, so it runs whether or not the socket is
/// writable.
fn runnable(st: &ConnState, ops: &Slab<Pending>) -> bool {
    if st.is(TLS) {
        // The session says what it needs (`driver/tls.rs`).
        return st.is(TLS_WORK)
            || (st.is(TLS_RD) && st.is(READABLE))
            || (st.is(TLS_WR) && st.is(WRITABLE));
    }
    let next_read = match ops.front(&st.reads) {
        Some(p) => Some(&p.kind),
        None if st.is(PARKED) => Some(&Kind::ReadInternal),
        None => None,
    };
    let kept = st.is(LEFTOVER) && !st.is(PARTIAL);
    let reads = next_read
        .is_some_and(|k| st.is(READABLE) || st.is(EOF) || kept || st.misdirected(k))
        && !reads_held(st, ops);
    let head = write_head(st, ops);
    let writes = head.is_some() && (st.is(WRITABLE) || needs_no_space(head));
    reads || writes
}

/// A `Shutdown` at the head needs no buffer space, nor a TLS start (it runs, and starts the
/// session, whether or not the socket is writable).
fn needs_no_space(head: Option<&Kind>) -> bool {
    match head {
        Some(Kind::Shutdown) => true,
        #[cfg(feature = "tls")]
        Some(Kind::TlsStart(_)) => true,
        _ => false,
    }
}

fn shutdown_at_head(st: &ConnState, ops: &Slab<Pending>) -> bool {
    matches!(write_head(st, ops), Some(Kind::Shutdown))
}

fn do_writes(st: &mut ConnState, ops: &mut Slab<Pending>, sink: &mut Sink) {
    let mut budget = BUDGET;
    while budget > 0 && (st.is(WRITABLE) || shutdown_at_head(st, ops)) {
        let Some(head) = ops.front(&st.writes) else {
            break;
        };
        #[cfg(feature = "tls")]
        if matches!(head.kind, Kind::TlsStart(_)) {
            break; // the session starts before the next run (`tls::prepare`)
        }
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
                Ok(false) => st.set(WRITABLE, false),
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
            Ok(n) => {
                sink.stats.bytes_written += n as u64;
                // A short write filled the socket buffer; EPOLLOUT comes when it drains.
                if n < asked {
                    st.set(WRITABLE, false);
                }
                Core::advance_writes(st, ops, sink, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => st.set(WRITABLE, false),
            Err(e) => {
                let p = ops.pop_front(&mut st.writes).expect("front exists");
                sink.complete(st, p, Err(Error::Io(e)), None);
            }
        }
    }
}

/// Runs a TLS connection (`driver/tls.rs`): ciphertext from the socket while the session
/// wants some, ciphertext to the socket while there is some, and the session's work between,
/// within the round's budget.
#[cfg(feature = "tls")]
fn drive_tls(mut cx: super::tls::Ctx<'_>, session: &mut super::tls::Tls) {
    use super::tls;
    let (mut budget, mut sends) = (BUDGET, BUDGET);
    loop {
        tls::process(&mut cx, session, &mut budget);
        let mut moved = false;
        if cx.st.is(TLS_RD) && cx.st.is(READABLE) && budget > 0 {
            budget -= 1;
            let (res, asked) = arena_recv(cx.arena, cx.st.fd.as_fd(), &mut cx.sink.stats);
            moved = !matches!(&res, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            match res {
                Ok(0) => {
                    cx.st.set(EOF, true);
                    session.eof();
                }
                Ok(n) => {
                    cx.sink.stats.bytes_read += n as u64;
                    if n < asked && !cx.st.is(HUP) {
                        cx.st.set(READABLE, false);
                    }
                    let data = cx.arena.buf.split_to(n);
                    session.received(&data);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    cx.st.set(READABLE, false);
                    cx.st.set(HUP, false);
                }
                Err(e) => session.fail_io(e),
            }
        }
        if cx.st.is(TLS_WR) && cx.st.is(WRITABLE) && sends > 0 {
            sends -= 1;
            let data = session.next_send();
            match sys::send(cx.st.fd.as_fd(), &data) {
                Ok(n) => {
                    cx.sink.stats.bytes_written += n as u64;
                    if n < data.len() {
                        cx.st.set(WRITABLE, false);
                    }
                    session.sent(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => cx.st.set(WRITABLE, false),
                Err(e) => session.fail_io(e),
            }
            moved = true;
        }
        if !moved {
            break;
        }
    }
}
