//! Datagram sockets, for every engine: reads and writes move whole datagrams, many per system
//! call (`recvmmsg`, `sendmmsg`). The engines say when to try (epoll's and kqueue's edges; on
//! io_uring a one-shot poll), and these functions make the calls, on the poller thread, like
//! the readiness engine's stream reads.
//!
//! Datagrams are received into a scratch area of `BATCH` slots of 64 KiB (any UDP datagram
//! fits), then copied into the reads' buffers (a `Read`'s `Vec`, the arena for an internal
//! read): one receive fills as many reads as are pending, whatever their kinds, and the copy
//! of a game's or a DNS server's datagrams costs less than the system calls it saves. A
//! `Read` whose buffer is larger than a slot (a Unix datagram can be) is received into
//! directly, alone.

use std::io;
use std::os::fd::AsFd;

use super::{Arena, ConnState, Pending, Sink, GSO};
use crate::cmd::Kind;
use crate::fifo::Slab;
use crate::stats::Stats;
use crate::sys::dgram::{gso_refused, recv_batch, send_batch, Received, BATCH, MAX_DATAGRAMS};
use crate::{Buf, Error, PeerAddr};

/// Bytes per scratch slot: the largest UDP payload (65,507 on IPv4) fits.
const SLOT: usize = 64 * 1024;

/// The scratch area, made on a watcher's first datagram read (the pages the kernel never
/// writes to are never touched, so small datagrams keep little of it resident).
pub(super) struct Scratch {
    slots: Vec<u8>,
    out: Vec<Received>,
}

impl Scratch {
    fn new() -> Box<Scratch> {
        Box::new(Scratch {
            slots: vec![0; SLOT * BATCH],
            out: (0..BATCH).map(|_| Received::default()).collect(),
        })
    }
}

/// What stopped a run of reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The socket has nothing more (reads) or no room (writes): wait for readiness.
    Drained,
    /// No more operations, or the round's budget is spent: readiness is unchanged.
    Done,
}

/// Gives the datagrams waiting in `st`'s socket to its reads, one each, in order, within
/// `budget` completions. (`Read`, `ReadInternal` and the parked read: the other reads are
/// refused when they are sent.)
pub(super) fn read(
    st: &mut ConnState,
    ops: &mut Slab<Pending>,
    sink: &mut Sink,
    arena: &mut Arena,
    scratch: &mut Option<Box<Scratch>>,
    budget: &mut u32,
) -> Stop {
    st.unpark(ops);
    let stop = read_fifo(st, ops, sink, arena, scratch, budget);
    st.park(ops);
    stop
}

fn read_fifo(
    st: &mut ConnState,
    ops: &mut Slab<Pending>,
    sink: &mut Sink,
    arena: &mut Arena,
    scratch: &mut Option<Box<Scratch>>,
    budget: &mut u32,
) -> Stop {
    loop {
        let want = ops
            .iter(&st.reads)
            .take(BATCH)
            .count()
            .min(*budget as usize);
        if want == 0 {
            return Stop::Done;
        }
        // A `Read` larger than a slot: into its own buffer, alone.
        if let Some(Pending {
            kind: Kind::Read(v),
            ..
        }) = ops.front_mut(&st.reads)
        {
            if v.len() > SLOT {
                let mut out = [Received::default()];
                let (got, err) = recv_batch(st.fd.as_fd(), &mut [&mut v[..]], &mut out);
                let [mut r] = out;
                match finish(st, ops, sink, budget, got, err, |p, _| {
                    p.done = r.n;
                    (None, r.truncated.take(), r.from.take())
                }) {
                    Some(stop) => return stop,
                    None => continue,
                }
            }
        }
        let s = scratch.get_or_insert_with(Scratch::new);
        let Scratch { slots, out } = &mut **s;
        let mut bufs: [&mut [u8]; BATCH] = Default::default();
        for (b, slot) in bufs.iter_mut().zip(slots.chunks_mut(SLOT)).take(want) {
            *b = slot;
        }
        let (got, err) = recv_batch(st.fd.as_fd(), &mut bufs[..want], &mut out[..want]);
        let mut i = 0;
        let stop = finish(st, ops, sink, budget, got, err, |p, stats| {
            let r = &mut out[i];
            let data = &slots[i * SLOT..i * SLOT + r.n];
            i += 1;
            let mut truncated = r.truncated.take();
            let buf = match &mut p.kind {
                Kind::Read(v) => {
                    let n = data.len().min(v.len());
                    v[..n].copy_from_slice(&data[..n]);
                    if n < data.len() {
                        // Cut by the caller's buffer rather than the slot.
                        truncated = Some(Some(truncated.flatten().unwrap_or(data.len())));
                    }
                    p.done = n;
                    None
                }
                _ => {
                    p.done = data.len();
                    Some(Buf::Bytes(arena.concat(&[data], stats)))
                }
            };
            (buf, truncated, r.from.take())
        });
        if let Some(stop) = stop {
            return stop;
        }
    }
}

/// What a datagram makes of its read: the buffer (if not the read's own), whether it was
/// cut (and its length, if known), the sender.
type Made = (Option<Buf>, Option<Option<usize>>, Option<PeerAddr>);

/// Completes the `got` reads at the head with what `each` makes of them (the buffer, if not
/// the read's own; truncation; the sender), then the next with `err` if there is one.
/// Returns `Some` when the reads must stop: the socket drained (`WouldBlock`, or fewer
/// datagrams than asked for), or the budget spent.
fn finish(
    st: &mut ConnState,
    ops: &mut Slab<Pending>,
    sink: &mut Sink,
    budget: &mut u32,
    got: usize,
    err: Option<io::Error>,
    mut each: impl FnMut(&mut Pending, &mut Stats) -> Made,
) -> Option<Stop> {
    let asked = ops
        .iter(&st.reads)
        .take(BATCH)
        .count()
        .min(*budget as usize);
    for _ in 0..got {
        let mut p = ops
            .pop_front(&mut st.reads)
            .expect("a read for each datagram");
        let (buf, truncated, from) = each(&mut p, &mut sink.stats);
        sink.stats.bytes_read += p.done as u64;
        let result = match truncated {
            Some(len) => Err(Error::Truncated { len }),
            None => Ok(()),
        };
        *budget -= 1;
        sink.complete_from(st, p, result, buf, from);
    }
    match err {
        Some(e) if e.kind() == io::ErrorKind::WouldBlock => Some(Stop::Drained),
        Some(e) => {
            // An ICMP error of an earlier send (ECONNREFUSED), or another: this read's
            // outcome; the socket stays usable.
            if let Some(p) = ops.pop_front(&mut st.reads) {
                *budget -= 1;
                sink.complete(st, p, Err(Error::Io(e)), None);
            }
            (*budget == 0).then_some(Stop::Done)
        }
        // Fewer than asked: the socket had no more (a new datagram is a new edge).
        None if got < asked => Some(Stop::Drained),
        None => (*budget == 0).then_some(Stop::Done),
    }
}

/// Segments one GSO send carries at most (`UDP_MAX_SEGMENTS` before Linux 6.11).
const SEGMENTS: u16 = 64;
/// Bytes one GSO send carries at most: well under a UDP datagram's largest payload (65,507
/// bytes over IPv4 without options), so that IP options or IPv6 extension headers never make
/// a send too large as a whole.
const GSO_BYTES: usize = 60_000;

/// Sends the writes at the head of `st`'s write FIFO (`Write`, `SendTo`), one datagram
/// each, many per system call, until none is left or the socket has no room. On a UDP
/// socket marked `GSO`, consecutive datagrams to one peer, all of one size but the last
/// (which may be shorter), go as one message that the kernel cuts into those datagrams
/// (`UDP_SEGMENT`): one pass down the stack instead of one per datagram, and still one
/// datagram, and one completion, per write. If the socket or its route refuses a GSO send
/// (`sys::dgram::gso_refused`), GSO goes off for the socket and the same datagrams go one
/// per message; any other error of a GSO send is the socket's, and fails its first write.
pub(super) fn write(st: &mut ConnState, ops: &mut Slab<Pending>, sink: &mut Sink) -> Stop {
    let mut budget = super::BUDGET;
    while budget > 0 {
        let gso = st.is(GSO);
        let mut msgs: [(&[u8], Option<&PeerAddr>); MAX_DATAGRAMS] = [(&[], None); MAX_DATAGRAMS];
        let mut segs = [0u16; BATCH];
        let (mut n, mut m) = (0, 0);
        // The current message: its first datagram's index and length, its bytes so far.
        let (mut head, mut size, mut bytes) = (0, 0, 0);
        for p in ops.iter(&st.writes) {
            if n == MAX_DATAGRAMS {
                break;
            }
            let msg = match &p.kind {
                Kind::Write(b) => (&b[..], None),
                Kind::SendTo(b, to) => (&b[..], Some(&**to)),
                _ => break, // (nothing else is queued on a datagram socket)
            };
            let len = msg.0.len();
            let joins = gso
                && m > 0
                && segs[m - 1] < SEGMENTS
                && msg.1 == msgs[head].1
                && (1..=size).contains(&len)
                && msgs[n - 1].0.len() == size
                && bytes + len <= GSO_BYTES;
            if joins {
                segs[m - 1] += 1;
                bytes += len;
            } else {
                if m == BATCH {
                    break;
                }
                segs[m] = 1;
                m += 1;
                (head, size, bytes) = (n, len, len);
            }
            msgs[n] = msg;
            n += 1;
        }
        if n == 0 {
            return Stop::Done;
        }
        budget -= 1;
        let (sent, err) = send_batch(st.fd.as_fd(), &msgs[..n], &segs[..m]);
        // The datagrams sent in GSO sends, and how many the message that failed held.
        let (mut at, mut segmented, mut failed_segs, mut failed_size) = (0, 0, 1, 0);
        for &k in &segs[..m] {
            let k = usize::from(k);
            if at == sent {
                (failed_segs, failed_size) = (k, msgs[at].0.len());
                break;
            }
            if k > 1 {
                segmented += k as u64;
            }
            at += k;
        }
        sink.stats.datagrams_segmented += segmented;
        for _ in 0..sent {
            let mut p = ops
                .pop_front(&mut st.writes)
                .expect("a write for each datagram");
            p.done = super::write_len(&p);
            sink.stats.bytes_written += p.done as u64;
            sink.complete(st, p, Ok(()), None);
        }
        match err {
            Some(e) if e.kind() == io::ErrorKind::WouldBlock => return Stop::Drained,
            // A GSO send the socket or its route refuses: GSO off for the socket, the same
            // datagrams again, one per message.
            Some(e) if failed_segs > 1 && gso_refused(&e, failed_size) => st.set(GSO, false),
            // This datagram's error (EMSGSIZE, ECONNREFUSED, EDESTADDRREQ...; of a GSO send,
            // the socket's or the route's, which its first datagram alone would have met):
            // its write fails, the next go on.
            Some(e) => {
                let p = ops
                    .pop_front(&mut st.writes)
                    .expect("the write that failed");
                sink.complete(st, p, Err(Error::Io(e)), None);
            }
            None => {}
        }
    }
    Stop::Done
}
