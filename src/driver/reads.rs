//! Giving bytes that arrived to the reads pending, for every engine: the caller's buffers, the
//! internal reads' slices, the frames of framed reads. The engines get bytes off the socket
//! (a read of the readiness engine, a receive of io_uring's) and hand them here; bytes no read
//! takes stay with the connection (`Core::leftover`) and are served first by its next read of
//! any kind, in order.

use bytes::{Buf as _, Bytes};

use super::{ConnState, Pending, Sink, PARKED};
use crate::cmd::Kind;
use crate::fifo::Slab;
use crate::framing::Parsed;
use crate::{Buf, Error, Frames};

/// Gives `bytes` (received, not taken yet: an arena slice, or what a connection kept) to the
/// reads pending of `st`, in order, completing at most `budget` of them: an internal read
/// takes a slice of up to `chunk` bytes, a read into a caller's buffer what fits (copied), a
/// read-full what it misses (copied), a framed read its frames (slices). Stops at an accept,
/// at a framed read that needs more bytes, and when the budget is spent. Returns the bytes
/// no read took (empty if they all did).
pub(super) fn serve(
    st: &mut ConnState,
    ops: &mut Slab<Pending>,
    sink: &mut Sink,
    chunk: usize,
    mut bytes: Bytes,
    budget: &mut u32,
) -> Bytes {
    while !bytes.is_empty() && *budget > 0 {
        if st.is(PARKED) {
            // The connection's only read, an internal one.
            let mut p = st.take_parked().expect("parked");
            let part = bytes.split_to(bytes.len().min(chunk));
            p.done = part.len();
            *budget -= 1;
            sink.complete(st, p, Ok(()), Some(Buf::Bytes(part)));
            continue;
        }
        let Some(p) = ops.front_mut(&st.reads) else {
            break;
        };
        // What completes the read at the head: its result and buffer (`None`: not yet).
        let done: Option<(Result<(), Error>, Option<Buf>)> = match &mut p.kind {
            Kind::ReadInternal => {
                let part = bytes.split_to(bytes.len().min(chunk));
                p.done = part.len();
                Some((Ok(()), Some(Buf::Bytes(part))))
            }
            Kind::Read(v) => {
                let n = bytes.len().min(v.len());
                v[..n].copy_from_slice(&bytes[..n]);
                bytes.advance(n);
                p.done = n;
                Some((Ok(()), None))
            }
            Kind::ReadFull(v) => {
                let n = bytes.len().min(v.len() - p.done);
                v[p.done..p.done + n].copy_from_slice(&bytes[..n]);
                bytes.advance(n);
                p.done += n;
                (p.done == v.len()).then_some((Ok(()), None))
            }
            Kind::ReadFrame(framing) => match framing.parse(&bytes) {
                Parsed::Frame { frame, consumed } => {
                    let frame = bytes.slice(frame);
                    bytes.advance(consumed);
                    p.done = frame.len();
                    Some((Ok(()), Some(Buf::Bytes(frame))))
                }
                Parsed::Need(_) => None,
                Parsed::TooLong => {
                    bytes.advance(too_long_drop(framing, &bytes));
                    Some((Err(Error::FrameTooLong), None))
                }
                Parsed::Invalid(why) => {
                    bytes.clear();
                    Some((Err(Error::BadFrame(why)), None))
                }
            },
            Kind::ReadFrames(framing, max) => {
                // Frames as ranges of `bytes`, cut off once at the end: one reference to the
                // shared memory for the lot, however many frames.
                let max = *max as usize;
                let mut frames = Frames::over(bytes.clone(), max.min(bytes.len() / 64 + 1));
                let (mut at, stopped) = framing.parse_many(&bytes, max, |f| frames.push(f));
                let failed = match stopped {
                    // An error after frames: those complete, the error waits for the next
                    // framed read (its bytes are still here).
                    _ if !frames.is_empty() => None,
                    Some(Parsed::TooLong) => {
                        at += too_long_drop(framing, &bytes[at..]);
                        Some(Error::FrameTooLong)
                    }
                    Some(Parsed::Invalid(why)) => {
                        at = bytes.len();
                        Some(Error::BadFrame(why))
                    }
                    _ => None,
                };
                bytes.advance(at);
                match (failed, frames.is_empty()) {
                    (Some(e), _) => Some((Err(e), None)),
                    (None, true) => None,
                    (None, false) => {
                        frames.truncate_data(at);
                        p.done = frames.total_len();
                        Some((Ok(()), Some(Buf::Frames(frames))))
                    }
                }
            }
            // An accept (a listener's), or an operation of the other direction: not for bytes.
            _ => None,
        };
        let Some((result, buf)) = done else {
            break; // the head wants more bytes than there are: it waits for them
        };
        let p = ops.pop_front(&mut st.reads).expect("front exists");
        *budget -= 1;
        sink.complete(st, p, result, buf);
    }
    bytes
}

/// The bytes a frame too long is dropped with: what proved it (the `max + 1` bytes of a line
/// without its delimiter; a length prefix), or everything buffered (a decoder's frame).
fn too_long_drop(framing: &crate::Framing, bytes: &[u8]) -> usize {
    bytes.len().min(framing.proof_len())
}

/// Whether the read at the head of `st` (or parked) takes bytes only into a caller's buffer
/// (a `Read` or `ReadFull`): then bytes need no copy into the arena first.
#[cfg(all(target_os = "linux", feature = "uring"))]
pub(super) fn head_takes_copies(st: &ConnState, ops: &Slab<Pending>) -> bool {
    !st.is(PARKED)
        && ops
            .front(&st.reads)
            .is_some_and(|p| matches!(p.kind, Kind::Read(_) | Kind::ReadFull(_)))
}

/// Copies `data` into the reads at the head that take copies (`Read`, `ReadFull`), within
/// `budget`; returns how many bytes they took.
#[cfg(all(target_os = "linux", feature = "uring"))]
pub(super) fn copy_into(
    st: &mut ConnState,
    ops: &mut Slab<Pending>,
    sink: &mut Sink,
    data: &[u8],
    budget: &mut u32,
) -> usize {
    let mut taken = 0;
    while taken < data.len() && *budget > 0 && head_takes_copies(st, ops) {
        let rest = &data[taken..];
        let p = ops.front_mut(&st.reads).expect("a read at the head");
        let complete = match &mut p.kind {
            Kind::Read(v) => {
                let n = rest.len().min(v.len());
                v[..n].copy_from_slice(&rest[..n]);
                taken += n;
                p.done = n;
                true
            }
            Kind::ReadFull(v) => {
                let n = rest.len().min(v.len() - p.done);
                v[p.done..p.done + n].copy_from_slice(&rest[..n]);
                taken += n;
                p.done += n;
                p.done == v.len()
            }
            _ => unreachable!("head_takes_copies"),
        };
        if !complete {
            break;
        }
        let p = ops.pop_front(&mut st.reads).expect("front exists");
        *budget -= 1;
        sink.complete(st, p, Ok(()), None);
    }
    taken
}

/// End of stream: every read pending completes with `Eof`; the first framed read gets the
/// bytes of the frame that was cut short (`partial`), if there are any.
pub(super) fn end(
    st: &mut ConnState,
    ops: &mut Slab<Pending>,
    sink: &mut Sink,
    partial: Option<Bytes>,
) {
    end_with(st, ops, sink, partial, || Error::Eof)
}

/// As [`end`], with the error `err` makes (a TLS stream cut short: `TlsTruncated`).
pub(super) fn end_with(
    st: &mut ConnState,
    ops: &mut Slab<Pending>,
    sink: &mut Sink,
    mut partial: Option<Bytes>,
    err: impl Fn() -> Error,
) {
    if let Some(p) = st.take_parked() {
        sink.complete(st, p, Err(err()), None);
    }
    while let Some(mut p) = ops.pop_front(&mut st.reads) {
        let buf = match p.kind {
            Kind::ReadFrame(_) | Kind::ReadFrames(..) => partial.take().map(|b| {
                p.done = b.len();
                Buf::Bytes(b)
            }),
            _ => None,
        };
        sink.complete(st, p, Err(err()), buf);
    }
}
