//! TLS in the engine-agnostic core (the `tls` feature): the engines move ciphertext, this
//! module runs rustls and completes the connection's reads and writes with plaintext, the
//! same code for every engine.
//!
//! A connection's session starts when its `TlsAccept` or `TlsConnect` reaches the head of
//! the write FIFO (`prepare`: every write before it went out in plaintext); the connection is
//! then marked `TLS`, and its engine no longer runs its operations but:
//!
//! - receives ciphertext while the session asks for it (`TLS_RD`: a handshake, or reads
//!   waiting for plaintext) and hands it to [`Tls::received`] (or says end of stream,
//!   [`Tls::eof`], or an error, [`Tls::fail_io`]);
//! - sends what [`Tls::next_send`] gives while `TLS_WR` says there is some, and reports how
//!   much went out ([`Tls::sent`]);
//! - calls [`process`] when it ran or something came in (`TLS_WORK`): ciphertext into
//!   rustls, plaintext to the reads (`reads::serve`, so every kind of read works as on a
//!   plain stream), the writes' plaintext into rustls, each write completed once the last
//!   byte of its records was sent, and the flags above computed again.
//!
//! Bounds: rustls holds at most one record of ciphertext received and 16 KiB of plaintext
//! (it refuses more; what it refused waits in `inbuf`, at most one receive); plaintext is
//! taken from writes only while less than `OUT_LIMIT` of ciphertext waits to be sent, so a
//! peer that never reads holds the writes in their FIFO (back-pressure), not in memory.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;

use bytes::{Buf as _, BufMut, Bytes, BytesMut};
use rustls::{ClientConnection, Connection, ServerConnection};

use super::{
    reads, write_len, write_parts, Arena, ConnState, Core, Pending, Sink, EOF, LEFTOVER, PARKED,
    PARTIAL, TLS, TLS_PENDING, TLS_RD, TLS_WORK, TLS_WR,
};
use crate::cmd::{Kind, TlsStart};
use crate::conn::Key;
use crate::fifo::Slab;
use crate::tls::TlsInfo;
use crate::{sys, Buf, Error};

/// Ciphertext waiting to be sent, at most (plus one record): writes give no more plaintext
/// to the session until it drains.
const OUT_LIMIT: usize = 64 * 1024;

/// How much one receive of the io_uring engine asks for: a whole record and its header.
#[cfg_attr(not(all(target_os = "linux", feature = "uring")), allow(dead_code))]
pub(super) const RECV_LEN: u32 = 16 * 1024 + 512;

/// Why a session is over: every operation completes with it.
enum Fail {
    Tls(rustls::Error),
    Io(Option<i32>, io::ErrorKind),
    Truncated,
}

impl Fail {
    fn error(&self) -> Error {
        match self {
            Fail::Tls(e) => Error::Tls(e.clone()),
            Fail::Io(Some(raw), _) => Error::Io(io::Error::from_raw_os_error(*raw)),
            Fail::Io(None, kind) => Error::Io(io::Error::from(*kind)),
            Fail::Truncated => Error::TlsTruncated,
        }
    }
}

/// One connection's TLS session.
pub(crate) struct Tls {
    conn: Connection,
    /// The sequence number of the command that started it (it completes the handshake).
    start: u64,
    /// Ciphertext received that rustls did not take yet (its plaintext buffer was full).
    inbuf: Bytes,
    /// Ciphertext made and not handed to the engine yet.
    out: BytesMut,
    /// Ciphertext handed to the engine, the part not sent yet.
    sending: Bytes,
    /// Ciphertext bytes made (moved to `out`) and sent, since the session started.
    made: u64,
    sent: u64,
    /// Write operations (and shutdowns) wholly given to the session, with the ciphertext
    /// offset their last byte ends at: each completes when `sent` reaches it.
    marks: VecDeque<(u64, u64)>,
    /// Every write operation with a sequence number up to this one was wholly given to the
    /// session (they are given in order).
    fed: u64,
    /// Plaintext rustls holds for the reads.
    plain: usize,
    /// The socket said end of stream.
    eof: bool,
    /// The peer's `close_notify` arrived.
    closed: bool,
    failed: Option<Fail>,
    /// A receive or send failed: nothing more goes out (what waits is dropped).
    io_failed: bool,
}

/// The parts of the core a session works on, for one connection.
pub(crate) struct Ctx<'a> {
    pub(super) id: Key,
    pub(super) st: &'a mut ConnState,
    pub(super) ops: &'a mut Slab<Pending>,
    pub(super) sink: &'a mut Sink,
    pub(super) arena: &'a mut Arena,
    pub(super) leftover: &'a mut HashMap<Key, Bytes>,
}

/// The session of connection `id` and what its work needs, if it runs TLS.
pub(super) fn running(core: &mut Core, id: Key) -> Option<(Ctx<'_>, &mut Tls)> {
    let Core {
        conns,
        ops,
        sink,
        arena,
        leftover,
        tls: sessions,
        ..
    } = core;
    let st = conns.get_mut(id).filter(|st| st.is(TLS))?;
    let session = sessions.get_mut(&id)?;
    let cx = Ctx {
        id,
        st,
        ops,
        sink,
        arena,
        leftover,
    };
    Some((cx, session))
}

/// Starts the session of connection `id` (marked `TLS_PENDING`, no session yet) if its
/// `TlsAccept` or `TlsConnect` heads the write FIFO (every write before it is done). Bytes
/// received and kept are its first ciphertext; a configuration rustls refuses completes the
/// command with the error.
pub(super) fn prepare(core: &mut Core, id: Key) {
    let Some(st) = core.conns.get_mut(id) else {
        return;
    };
    debug_assert!(st.is(TLS_PENDING) && !st.is(TLS));
    let Some(p) = core.ops.front(&st.writes) else {
        return;
    };
    let Kind::TlsStart(start) = &p.kind else {
        return;
    };
    let seq = p.seq;
    let made: Result<Connection, rustls::Error> = match &**start {
        TlsStart::Accept(config) => ServerConnection::new(config.clone()).map(Into::into),
        TlsStart::Connect(config, name) => {
            ClientConnection::new(config.clone(), name.clone()).map(Into::into)
        }
    };
    st.set(TLS_PENDING, false);
    let mut conn = match made {
        Ok(conn) => conn,
        Err(e) => {
            let p = core.ops.pop_front(&mut st.writes).expect("front exists");
            // (Another handshake's command may wait behind it.)
            st.set(TLS_PENDING, super::tls_pending(st, &core.ops));
            core.sink.complete(st, p, Err(Error::Tls(e)), None);
            return;
        }
    };
    conn.set_buffer_limit(Some(OUT_LIMIT));
    let inbuf = Core::take_leftover(&mut core.leftover, id, st).unwrap_or_default();
    st.set(PARTIAL, false);
    st.set(TLS, true);
    st.set(TLS_WORK, true);
    let eof = st.is(EOF);
    core.tls.insert(
        id,
        Box::new(Tls {
            conn,
            start: seq,
            inbuf,
            out: BytesMut::new(),
            sending: Bytes::new(),
            made: 0,
            sent: 0,
            marks: VecDeque::new(),
            fed: 0,
            plain: 0,
            eof,
            closed: false,
            failed: None,
            io_failed: false,
        }),
    );
}

impl Tls {
    /// Ciphertext from the socket: given to rustls at once (no copy but rustls's own); what
    /// it does not take yet (its plaintext buffer is full) waits in `inbuf`.
    pub(super) fn received(&mut self, data: &[u8]) {
        if self.failed.is_some() || self.closed {
            return; // nothing more is read after an error or the peer's close_notify
        }
        if self.inbuf.is_empty() {
            let n = self.take(data);
            if n < data.len() && self.failed.is_none() && !self.closed {
                self.inbuf = Bytes::copy_from_slice(&data[n..]);
            }
        } else {
            let mut all = BytesMut::with_capacity(self.inbuf.len() + data.len());
            all.extend_from_slice(&self.inbuf);
            all.extend_from_slice(data);
            self.inbuf = all.freeze();
        }
    }

    /// The socket said end of stream.
    pub(super) fn eof(&mut self) {
        self.eof = true;
    }

    /// A receive or send failed: the session is over.
    pub(super) fn fail_io(&mut self, e: io::Error) {
        if self.failed.is_none() {
            self.failed = Some(Fail::Io(e.raw_os_error(), e.kind()));
        }
        self.io_failed = true;
    }

    /// The ciphertext to send next (empty if none): what a short send left, else all that
    /// waits. The engine reports how much went out with [`Tls::sent`].
    pub(super) fn next_send(&mut self) -> Bytes {
        if self.sending.is_empty() {
            self.sending = self.out.split().freeze();
        }
        self.sending.clone()
    }

    /// `n` bytes of what `next_send` gave went out.
    pub(super) fn sent(&mut self, n: usize) {
        let n = n.min(self.sending.len());
        self.sending.advance(n);
        self.sent += n as u64;
    }

    /// Gives the ciphertext waiting in `inbuf` to rustls. Returns whether any was taken.
    fn feed(&mut self) -> bool {
        if self.inbuf.is_empty() {
            return false;
        }
        let inbuf = std::mem::take(&mut self.inbuf);
        let n = self.take(&inbuf);
        if self.failed.is_none() && !self.closed {
            self.inbuf = inbuf.slice(n..);
        }
        n > 0
    }

    /// Gives `data` to rustls and processes it, until rustls refuses more (its plaintext
    /// buffer is full), an error ends the session, or the peer's `close_notify` arrived
    /// (nothing after it is read). Returns how much of `data` was taken.
    fn take(&mut self, data: &[u8]) -> usize {
        let mut rd = data;
        while !rd.is_empty() && self.failed.is_none() && !self.closed {
            match self.conn.read_tls(&mut rd) {
                Ok(0) => {
                    // (After the peer's close_notify rustls reads nothing more.)
                    self.closed = true;
                    break;
                }
                Ok(_) => {}
                // Its plaintext buffer is full: the rest waits for the reads.
                Err(_) if self.plain > 0 => break,
                // (Anything else would leave the bytes waiting for good.)
                Err(e) => {
                    self.failed = Some(Fail::Tls(rustls::Error::General(e.to_string())));
                    break;
                }
            }
            match self.conn.process_new_packets() {
                Ok(state) => {
                    self.plain = state.plaintext_bytes_to_read();
                    self.closed |= state.peer_has_closed();
                }
                Err(e) => {
                    // rustls queued an alert for the peer: it is sent (best effort).
                    self.failed = Some(Fail::Tls(e));
                    self.drain();
                }
            }
        }
        data.len() - rd.len()
    }

    /// Moves the ciphertext rustls made into `out`.
    fn drain(&mut self) {
        while self.conn.wants_write() {
            let mut w = (&mut self.out).writer();
            match self.conn.write_tls(&mut w) {
                Ok(n) => self.made += n as u64,
                Err(_) => break, // (not expected: a `BytesMut` takes everything)
            }
        }
    }

    fn pending_out(&self) -> usize {
        self.out.len() + self.sending.len()
    }

    /// The plaintext for the reads: `kept` (bytes a read did not take) and all rustls holds,
    /// one after the other, in the arena (or a buffer of their own when larger than a chunk).
    fn pull(&mut self, kept: Option<Bytes>, arena: &mut Arena, sink: &mut Sink) -> Bytes {
        let kept = kept.unwrap_or_default();
        let total = kept.len() + self.plain;
        let large = total > arena.chunk;
        let mut own = BytesMut::new();
        let buf = if large {
            own.reserve(total);
            &mut own
        } else {
            // (As `Arena::concat`: the arena's buffer holds nothing not handed out.)
            arena.refill_for(total, &mut sink.stats);
            &mut arena.buf
        };
        let start = buf.len();
        buf.extend_from_slice(&kept);
        // (`Read`, not `BufRead`, which rustls's reader has only since 0.23.2x.)
        let at = buf.len();
        buf.resize(at + self.plain, 0);
        let mut filled = 0;
        let mut reader = self.conn.reader();
        while at + filled < buf.len() {
            match reader.read(&mut buf[at + filled..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        buf.truncate(at + filled);
        self.plain = 0;
        let got = buf.len() - start;
        if large {
            own.freeze()
        } else {
            debug_assert_eq!(start, 0);
            arena.buf.split_to(got).freeze()
        }
    }
}

/// Whether a read waits on `st` (parked, or in the FIFO).
fn has_read(st: &ConnState) -> bool {
    st.is(PARKED) || !st.reads.is_empty()
}

/// Everything the session can do without I/O, for connection `cx.id`, completing at most
/// `budget` reads: the ciphertext received into rustls, plaintext to the reads, the writes'
/// plaintext into rustls, writes whose records went out completed, the handshake's command
/// completed once it is over, end of stream and errors given to what waits. Then the flags
/// that tell the engine what the session needs (`TLS_RD`, `TLS_WR`, `TLS_WORK`).
pub(super) fn process(cx: &mut Ctx<'_>, tls: &mut Tls, budget: &mut u32) {
    cx.st.set(TLS_WORK, false);
    loop {
        let fed = tls.feed();
        // (Before any read: the handshake's completion comes first.)
        complete_handshake(cx, tls);
        let served = serve_reads(cx, tls, budget);
        if !(fed || served) || *budget == 0 || tls.failed.is_some() {
            break;
        }
    }
    if tls.failed.is_none() {
        if tls.eof && tls.inbuf.is_empty() && tls.conn.is_handshaking() {
            tls.failed = Some(Fail::Truncated);
        } else if tls.conn.is_handshaking() && !starting(cx, tls) {
            // The handshake's command ended (its deadline) before the handshake did.
            tls.failed = Some(Fail::Tls(rustls::Error::General(
                "the handshake's command ended before the handshake completed".into(),
            )));
        }
    }
    if tls.failed.is_none() {
        pump_writes(cx, tls);
        end_reads(cx, tls);
    }
    if let Some(fail) = &tls.failed {
        fail_all(cx, fail);
    }
    tls.drain();
    if tls.io_failed {
        // The socket failed: what waits (writes' records, an alert) can never go out, and
        // trying again would fail again, round after round. (On io_uring a send in flight
        // keeps its own reference to its bytes until its completion.)
        tls.out.clear();
        tls.sending = Bytes::new();
    }
    let st = &mut *cx.st;
    let wants_in = tls.conn.is_handshaking() || has_read(st);
    st.set(
        TLS_RD,
        tls.failed.is_none()
            && !tls.eof
            && !tls.closed
            && tls.inbuf.is_empty()
            && tls.conn.wants_read()
            && wants_in,
    );
    st.set(TLS_WR, tls.pending_out() > 0);
    if *budget == 0 && has_read(st) {
        st.set(TLS_WORK, true);
    }
}

/// Whether the command that started the session is still pending: it heads the writes.
fn starting(cx: &Ctx<'_>, tls: &Tls) -> bool {
    cx.ops
        .front(&cx.st.writes)
        .is_some_and(|p| p.seq == tls.start && matches!(p.kind, Kind::TlsStart(_)))
}

/// Plaintext (what a read left, what rustls holds) to the reads, in order. Returns whether
/// any read completed.
fn serve_reads(cx: &mut Ctx<'_>, tls: &mut Tls, budget: &mut u32) -> bool {
    let before = *budget;
    while *budget > 0 && has_read(cx.st) {
        if cx
            .ops
            .front(&cx.st.reads)
            .is_some_and(|p| matches!(p.kind, Kind::Accept))
        {
            // An accept on a stream: what the system call says.
            let p = cx.ops.pop_front(&mut cx.st.reads).expect("front exists");
            let e = io::Error::from_raw_os_error(libc::EINVAL);
            *budget -= 1;
            cx.sink.complete(cx.st, p, Err(Error::Io(e)), None);
            continue;
        }
        let usable = cx.st.is(LEFTOVER) && !cx.st.is(PARTIAL);
        if tls.plain == 0 && !usable {
            break;
        }
        let kept = Core::take_leftover(cx.leftover, cx.id, cx.st);
        let bytes = tls.pull(kept, cx.arena, cx.sink);
        let round = *budget;
        let rest = reads::serve(cx.st, cx.ops, cx.sink, cx.arena.chunk, bytes, budget);
        Core::keep_leftover(cx.leftover, cx.id, cx.st, rest, true);
        // What is left waits for more plaintext (a frame's beginning), unless the budget
        // cut the serving short.
        cx.st.set(PARTIAL, cx.st.is(LEFTOVER) && *budget > 0);
        if *budget == round {
            break;
        }
    }
    *budget != before
}

/// Reads waiting with no plaintext to come: the peer's `close_notify` arrived (`Eof`, as a
/// plain stream's end), or the socket ended without it (`TlsTruncated`).
fn end_reads(cx: &mut Ctx<'_>, tls: &mut Tls) {
    if !has_read(cx.st) || tls.plain > 0 || !tls.inbuf.is_empty() {
        return;
    }
    if cx.st.is(LEFTOVER) && !cx.st.is(PARTIAL) {
        return; // (the budget ran out: served next time)
    }
    let clean = tls.closed;
    if !clean && !tls.eof {
        return;
    }
    let partial = Core::take_leftover(cx.leftover, cx.id, cx.st);
    cx.st.set(PARTIAL, false);
    if clean {
        reads::end(cx.st, cx.ops, cx.sink, partial);
    } else {
        reads::end_with(cx.st, cx.ops, cx.sink, partial, || Error::TlsTruncated);
    }
}

/// The session is over: every operation pending completes with its error.
fn fail_all(cx: &mut Ctx<'_>, fail: &Fail) {
    let st = &mut *cx.st;
    st.unpark(cx.ops);
    while let Some(p) = cx.ops.pop_front(&mut st.reads) {
        cx.sink.complete(st, p, Err(fail.error()), None);
    }
    while let Some(p) = cx.ops.pop_front(&mut st.writes) {
        cx.sink.complete(st, p, Err(fail.error()), None);
    }
    if let Some(rest) = Core::take_leftover(cx.leftover, cx.id, st) {
        drop(rest);
    }
    st.set(PARTIAL, false);
}

/// The write side: completes what was sent (the handshake's command once the handshake is
/// over and its last flight sent; writes and shutdowns once their last byte went out), then
/// gives the next writes' plaintext to the session while less than `OUT_LIMIT` waits.
fn pump_writes(cx: &mut Ctx<'_>, tls: &mut Tls) {
    complete_sent(cx, tls);
    feed_writes(cx, tls);
}

/// Completes the command that started the session once its handshake is over (its last
/// flight may still wait to be sent: what follows is sent after it, in order).
fn complete_handshake(cx: &mut Ctx<'_>, tls: &mut Tls) {
    if tls.failed.is_some() || tls.conn.is_handshaking() || !starting(cx, tls) {
        return;
    }
    let st = &mut *cx.st;
    let p = cx.ops.pop_front(&mut st.writes).expect("front exists");
    let info = Box::new(TlsInfo::of(&tls.conn));
    cx.sink.complete(st, p, Ok(()), Some(Buf::Tls(info)));
}

fn complete_sent(cx: &mut Ctx<'_>, tls: &mut Tls) {
    let st = &mut *cx.st;
    loop {
        let Some(head) = cx.ops.front(&st.writes) else {
            tls.marks.retain(|&(_, end)| end > tls.sent);
            return;
        };
        if let Kind::TlsStart(_) = head.kind {
            if head.seq == tls.start {
                return; // (`complete_handshake`)
            } else {
                let p = cx.ops.pop_front(&mut st.writes).expect("front exists");
                let e = rustls::Error::General("TLS is already started on this connection".into());
                cx.sink.complete(st, p, Err(Error::Tls(e)), None);
            }
            continue;
        }
        let Some(&(seq, end)) = tls.marks.front() else {
            return;
        };
        if end > tls.sent {
            return;
        }
        tls.marks.pop_front();
        if head.seq != seq {
            continue; // its operation ended before (a timer)
        }
        let p = cx.ops.pop_front(&mut st.writes).expect("front exists");
        let result = match p.kind {
            // Its close_notify went out: now the socket's sending side.
            Kind::Shutdown => sys::shutdown_write(st.fd.as_fd()).map_err(Error::Io),
            _ => Ok(()),
        };
        cx.sink.complete(st, p, result, None);
    }
}

/// Gives the plaintext of the writes not wholly given yet to the session, in order, while
/// less than `OUT_LIMIT` of ciphertext waits; a shutdown queues `close_notify`.
fn feed_writes(cx: &mut Ctx<'_>, tls: &mut Tls) {
    if tls.conn.is_handshaking() {
        return; // (writes wait for the handshake: the command heads them)
    }
    let Tls {
        conn,
        out,
        sending,
        made,
        marks,
        fed,
        ..
    } = tls;
    cx.ops.walk_mut(&cx.st.writes, |p| {
        if p.seq <= *fed {
            return true;
        }
        let room = OUT_LIMIT.saturating_sub(out.len() + sending.len());
        match &p.kind {
            Kind::Shutdown => conn.send_close_notify(),
            Kind::Write(_) | Kind::WriteAll(..) if room > 0 => {
                let (mut n, mut room) = (0, room);
                write_parts(p, |part| {
                    let take = part.len().min(room);
                    let w = conn.writer().write(&part[..take]).unwrap_or(0);
                    n += w;
                    room -= w;
                    w == part.len() && room > 0
                });
                p.done += n;
            }
            // A handshake's command (another session: it fails at the head), or no room.
            _ => return false,
        }
        while conn.wants_write() {
            match conn.write_tls(&mut (&mut *out).writer()) {
                Ok(n) => *made += n as u64,
                Err(_) => break,
            }
        }
        let done = matches!(p.kind, Kind::Shutdown) || p.done == write_len(p);
        if done {
            marks.push_back((p.seq, *made));
            *fed = p.seq;
        }
        done
    });
}
