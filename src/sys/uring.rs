//! The io_uring layer: a ring (the `io-uring` crate's), its ring of provided receive buffers,
//! and the memory the kernel reads or writes while an operation is in flight. Everything an
//! operation refers to is owned here from its submission until its final completion (the
//! one without `IORING_CQE_F_MORE`), so the engine above is safe code: it cannot hand a
//! buffer back, or free one, while the kernel may still use it. Every `unsafe` of the io_uring
//! engine is in this file.
//!
//! What an operation refers to, and who owns it meanwhile:
//! - a receive: the provided-buffer ring (`BufRing`, this struct's), from which the kernel
//!   takes the buffer when bytes arrive; the data is copied out before the buffer goes back
//!   into the ring, at the end of `complete`;
//! - a send: the `Bytes` it sends, moved here from the writes (a `SendSlot`) until the
//!   completion hands them back. Its `msghdr` and iovec array (a `Gather`) are needed only
//!   until the submission returns: the kernel copies them then (`IORING_FEAT_SUBMIT_STABLE`,
//!   Linux 5.5), so they are reused once everything queued has been submitted;
//! - the eventfd read that wakes a sleeping poller: an 8-byte buffer of this struct's;
//! - multishot accept, connect's poll, cancel: no memory.
//!
//! File descriptors are the engine's: it never closes one while an operation on it is in
//! flight (it cancels and waits), since the kernel would go on using the open file and a new
//! socket could take the number. Dropping the ring cancels everything and waits for the
//! final completions (bounded); should they not come, the memory is leaked rather than freed.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use crate::engine::Unavailable;

/// Queued writes gathered into one send.
pub(crate) const MAX_IOV: usize = 64;

/// What a completion is about: the top byte of its user data.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Recv = 1,
    Accept = 2,
    Send = 3,
    Poll = 4,
    Cancel = 5,
    Wake = 6,
    /// A poll for readability (a datagram socket with reads pending).
    PollIn = 7,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Recv,
            2 => Op::Accept,
            3 => Op::Send,
            4 => Op::Poll,
            5 => Op::Cancel,
            6 => Op::Wake,
            7 => Op::PollIn,
            _ => return None,
        })
    }
}

/// User data: the operation in the top byte, 24 bits of its own (a send's slot), and the
/// connection's slot index in the low 32 bits.
fn user_data(op: Op, extra: u32, idx: u32) -> u64 {
    debug_assert!(extra < 1 << 24);
    (op as u64) << 56 | u64::from(extra) << 32 | u64::from(idx)
}

/// One completion, as the engine sees it.
#[derive(Debug)]
pub(crate) struct Cqe<'a> {
    pub(crate) op: Op,
    /// The connection's slot index.
    pub(crate) idx: u32,
    /// The result: bytes, a new descriptor, or `-errno`.
    pub(crate) res: i32,
    /// More completions of this (multishot) operation will follow.
    pub(crate) more: bool,
    /// A receive left more bytes in the socket (`IORING_CQE_F_SOCK_NONEMPTY`).
    pub(crate) nonempty: bool,
    /// The bytes a receive got, in a provided buffer that goes back to the kernel once the
    /// engine's callback returns.
    pub(crate) data: Option<&'a [u8]>,
    /// The socket an accept made (its result, owned).
    pub(crate) accepted: Option<OwnedFd>,
    /// A send's buffers (with their offsets), to be handed back with `SendSlot::drain`.
    pub(crate) sent: Option<&'a mut SendSlot>,
}

/// How the ring is used: by one thread for its whole life (a threaded watcher's poller), or
/// by several in turn (an inline watcher, driven by whichever thread waits).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Setup {
    pub(crate) single_issuer: bool,
    /// Submission queue entries (a power of two; the completion queue has four times more).
    pub(crate) entries: u32,
    /// Provided receive buffers: how many (a power of two, at most 32,768) and their size.
    pub(crate) buffers: u16,
    pub(crate) buffer_size: u32,
}

/// The buffer group of the provided-buffer ring.
const BGID: u16 = 0;
/// `IOU_PBUF_RING_INC` (the crate has no constant for it).
const IOU_PBUF_RING_INC: u16 = 2;

/// Anonymous, private, page-aligned memory, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping of `len` bytes; no file, no fixed address.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Mapping {
    /// No mapping (what a leaked one is replaced with).
    fn empty() -> Mapping {
        Mapping {
            ptr: ptr::null_mut(),
            len: 0,
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr` and `len` are the mapping made in `new`, unmapped only here.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

/// The provided-buffer ring: `count` entries the kernel reads (page-aligned, the tail in
/// the first entry's reserved field), and `count` buffers of `size` bytes. Buffer `bid` lives
/// at `bid * size` for good: an entry only ever names its own buffer.
struct BufRing {
    entries: Mapping,
    bufs: Mapping,
    count: u16,
    size: u32,
    /// Registered for incremental consumption (`IOU_PBUF_RING_INC`, Linux 6.12): a receive
    /// takes only the bytes it needs from the current buffer, the next one goes on where
    /// it stopped, and a buffer comes back once the kernel is done with it (a completion
    /// without `F_BUF_MORE`). Then small messages share a buffer, and a large buffer does
    /// not cost a buffer per message.
    inc: bool,
    /// Incremental consumption: where the next bytes the kernel puts in each buffer start.
    offsets: Vec<u32>,
    /// Our copy of the tail: entries added but not yet published stand between the
    /// published tail and this one.
    tail: u16,
    /// Entries added since the tail was last published.
    unpublished: u16,
}

impl BufRing {
    fn new(count: u16, size: u32) -> io::Result<BufRing> {
        assert!(count.is_power_of_two() && count <= 1 << 15);
        let entries =
            Mapping::new(usize::from(count) * std::mem::size_of::<types::BufRingEntry>())?;
        let bufs = Mapping::new(usize::from(count) * size as usize)?;
        let mut ring = BufRing {
            entries,
            bufs,
            count,
            size,
            inc: false,
            offsets: vec![0; usize::from(count)],
            tail: 0,
            unpublished: 0,
        };
        for bid in 0..count {
            ring.add(bid);
        }
        ring.publish();
        Ok(ring)
    }

    fn base(&self) -> *mut types::BufRingEntry {
        self.entries.ptr.cast()
    }

    /// Puts buffer `bid` back at the (unpublished) tail.
    fn add(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot` < `count`, the number of entries the mapping holds; the kernel only
        // reads entries between its head and the published tail, and this one is past it.
        let entry = unsafe { &mut *self.base().add(slot) };
        // SAFETY: `bid` < `count`, so the buffer lies inside the mapping.
        let addr = unsafe { self.bufs.ptr.add(usize::from(bid) * self.size as usize) };
        entry.set_addr(addr as u64);
        entry.set_len(self.size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.unpublished += 1;
    }

    /// Makes the added entries visible to the kernel (a release store of the tail, as
    /// liburing's `io_uring_buf_ring_advance`).
    fn publish(&mut self) {
        if self.unpublished == 0 {
            return;
        }
        // SAFETY: the tail is the `resv` field of entry 0, inside the mapping, a naturally
        // aligned u16 the kernel reads atomically (`smp_load_acquire`).
        let tail = unsafe { &*(types::BufRingEntry::tail(self.base()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
        self.unpublished = 0;
    }

    /// The `len` bytes a completion says the kernel put in buffer `bid` (at its start, or,
    /// consumed incrementally, where the previous bytes ended), and whether the kernel is
    /// done with the buffer (it then goes back with `add`).
    fn data(&mut self, bid: u16, len: usize, buf_more: bool) -> (&[u8], bool) {
        assert!(bid < self.count);
        let start = if self.inc {
            let off = &mut self.offsets[usize::from(bid)];
            let start = *off as usize;
            *off = if buf_more { *off + len as u32 } else { 0 };
            start
        } else {
            0
        };
        assert!(start + len <= self.size as usize);
        // SAFETY: the bytes lie inside the mapping (checked above); the kernel wrote them
        // before posting the completion, and does not write there again until the buffer is
        // added back to the ring (or, consumed incrementally, only past them), which needs
        // `&mut self`, so not while this borrow lives.
        let data = unsafe {
            std::slice::from_raw_parts(
                self.bufs
                    .ptr
                    .add(usize::from(bid) * self.size as usize + start),
                len,
            )
        };
        (data, !(self.inc && buf_more))
    }
}

/// The buffers of one send in flight (each with the offset its unsent bytes start at),
/// moved here so nothing else can drop them meanwhile. A lone buffer (the common case) takes
/// no allocation.
#[derive(Default, Debug)]
pub(crate) struct SendSlot {
    one: Option<(Bytes, usize)>,
    more: Vec<(Bytes, usize)>,
    busy: bool,
}

impl SendSlot {
    /// Hands the buffers back, in the order they were given.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (Bytes, usize)> + '_ {
        self.one.take().into_iter().chain(self.more.drain(..))
    }

    /// Hands buffer `i` back (the first is 0; each once).
    pub(crate) fn take(&mut self, i: usize) -> Option<Bytes> {
        match i {
            0 => self.one.take().map(|(b, _)| b),
            i => self.more.get_mut(i - 1).map(|(b, _)| std::mem::take(b)),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let one = self.one.iter().map(|(b, off)| &b[*off..]);
        one.chain(self.more.iter().map(|(b, off)| &b[*off..]))
    }
}

/// The `msghdr` and iovec array of a gathered send, until it is submitted.
struct Gather {
    msg: libc::msghdr,
    iov: [libc::iovec; MAX_IOV],
}

/// A ring, with what its operations refer to.
pub(crate) struct Ring {
    // (Dropped in this order: the ring, then the memory its operations used.)
    ring: IoUring,
    bufs: BufRing,
    sends: Vec<SendSlot>,
    free_sends: Vec<u32>,
    /// The send slot of each connection (by slot index) with a send in flight.
    slot_of: Vec<u32>,
    /// Boxed, so an array's address stays put while the vector grows (the `Vec` moves its
    /// elements, not what they point to); the first `gathers_used` are referred to by
    /// entries not submitted yet.
    #[allow(clippy::vec_box)]
    gathers: Vec<Box<Gather>>,
    gathers_used: usize,
    /// The eventfd read's target.
    wake_buf: Box<u64>,
    wake_fd: RawFd,
    wake_armed: bool,
    /// Operations whose final completion has not arrived.
    inflight: usize,
    /// Entries that found the submission queue full and the kernel busy: pushed later.
    overflow: Vec<squeue::Entry>,
    /// Made disabled, for [`Ring::enable`] on the thread that will submit.
    disabled: bool,
}

// SAFETY: the raw pointers in `Ring` (the mappings, the slots' msghdr and iovecs) point into
// memory the `Ring` owns, and are used only through `&mut Ring`, by whichever single thread
// holds it; the kernel's use of that memory does not depend on which thread that is.
unsafe impl Send for Ring {}

/// The opcodes the engine needs (their `CODE`s), for the probe.
pub(crate) const OPCODES: [(u8, &str); 8] = [
    (opcode::Recv::CODE, "recv"),
    (opcode::AcceptMulti::CODE, "accept"),
    (opcode::Send::CODE, "send"),
    (opcode::SendMsg::CODE, "sendmsg"),
    (opcode::PollAdd::CODE, "poll_add"),
    (opcode::Read::CODE, "read"),
    (opcode::AsyncCancel2::CODE, "async_cancel"),
    (opcode::Shutdown::CODE, "shutdown"),
];

impl Ring {
    /// A new ring, disabled if `setup.single_issuer` (the thread that calls [`Ring::enable`]
    /// becomes its only submitter), with its provided buffers registered. `wake_fd` is the
    /// eventfd other threads write to wake a sleeping poller.
    pub(crate) fn new(setup: Setup, wake_fd: RawFd) -> Result<Ring, Unavailable> {
        let (ring, disabled) = build(setup).map_err(|e| Unavailable::from_setup(&e))?;
        let mut probe = Probe::new();
        let probed = ring.submitter().register_probe(&mut probe);
        probed.map_err(|_| Unavailable::MissingOperation("probe"))?;
        if let Some((_, name)) = OPCODES.iter().find(|(code, _)| !probe.is_supported(*code)) {
            return Err(Unavailable::MissingOperation(name));
        }
        let bufs = BufRing::new(setup.buffers, setup.buffer_size)
            .map_err(|e| Unavailable::from_setup(&e))?;
        let (addr, count) = (bufs.entries.ptr as u64, bufs.count);
        let register = |flags| {
            // SAFETY: the entries' mapping is page-aligned, holds `count` entries, and lives
            // in `Ring` after `ring` (dropped after it), so it outlives the registration.
            unsafe {
                ring.submitter()
                    .register_buf_ring_with_flags(addr, count, BGID, flags)
            }
        };
        // Incremental consumption where the kernel has it (6.12), else whole buffers.
        let mut bufs = bufs;
        let registered = match register(IOU_PBUF_RING_INC) {
            Ok(()) => {
                bufs.inc = true;
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => register(0),
            Err(e) => Err(e),
        };
        registered.map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => Unavailable::MissingOperation("provided buffer rings"),
            _ => Unavailable::from_setup(&e),
        })?;
        Ok(Ring {
            ring,
            bufs,
            sends: Vec::new(),
            free_sends: Vec::new(),
            slot_of: Vec::new(),
            gathers: Vec::new(),
            gathers_used: 0,
            wake_buf: Box::new(0),
            wake_fd,
            wake_armed: false,
            inflight: 0,
            overflow: Vec::new(),
            disabled,
        })
    }

    /// Enables a ring made disabled (single issuer): this thread becomes its submitter.
    pub(crate) fn enable(&mut self) -> io::Result<()> {
        if self.disabled {
            self.ring.submitter().register_enable_rings()?;
            self.disabled = false;
        }
        Ok(())
    }

    /// Queues an entry; a full submission queue is submitted first (if the kernel is busy,
    /// the entry waits in `overflow` for the next `submit`).
    fn push(&mut self, entry: squeue::Entry) {
        if !self.overflow.is_empty() {
            self.overflow.push(entry);
            return;
        }
        // SAFETY: every entry built here refers only to memory `Ring` owns until the
        // operation's final completion (see the module's doc), or to none.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            return;
        }
        if self.ring.submit().is_ok() {
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
        }
        self.overflow.push(entry);
    }

    /// Receives at most `len` bytes on `fd` into a provided buffer, once: one completion,
    /// and no bytes read that no read asked for.
    pub(crate) fn recv(&mut self, fd: RawFd, idx: u32, len: u32) {
        let e = opcode::Recv::new(types::Fd(fd), ptr::null_mut(), len)
            .buf_group(BGID)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        self.push(e.user_data(user_data(Op::Recv, 0, idx)));
        self.inflight += 1;
    }

    /// Arms a multishot accept on listener `fd`; accepted sockets are close-on-exec and
    /// non-blocking.
    pub(crate) fn accept_multi(&mut self, fd: RawFd, idx: u32) {
        let e = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build();
        self.push(e.user_data(user_data(Op::Accept, 0, idx)));
        self.inflight += 1;
    }

    /// Polls `fd` for writability once (a connect in progress).
    pub(crate) fn poll_out(&mut self, fd: RawFd, idx: u32) {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32).build();
        self.push(e.user_data(user_data(Op::Poll, 0, idx)));
        self.inflight += 1;
    }

    /// Polls `fd` for readability once (a datagram socket: the poller then receives the
    /// datagrams itself, many per system call).
    pub(crate) fn poll_in(&mut self, fd: RawFd, idx: u32) {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
        self.push(e.user_data(user_data(Op::PollIn, 0, idx)));
        self.inflight += 1;
    }

    /// Sends the `(buffer, offset)` pairs (at most `MAX_IOV`) on `fd` in one operation. The
    /// buffers are kept here until the completion hands them back (`Cqe::sent`), so they
    /// cannot be dropped while the kernel reads them.
    pub(crate) fn send(&mut self, fd: RawFd, idx: u32, bufs: impl Iterator<Item = (Bytes, usize)>) {
        let slot = match self.free_sends.pop() {
            Some(s) => s,
            None => {
                self.sends.push(SendSlot::default());
                (self.sends.len() - 1) as u32
            }
        };
        if self.slot_of.len() <= idx as usize {
            self.slot_of.resize(idx as usize + 1, u32::MAX);
        }
        self.slot_of[idx as usize] = slot;
        let s = &mut self.sends[slot as usize];
        debug_assert!(!s.busy && s.one.is_none() && s.more.is_empty());
        s.busy = true;
        // Moving a `Bytes` moves the handle, not the bytes: the pointers below stay valid.
        let mut bufs = bufs.take(MAX_IOV);
        s.one = bufs.next();
        s.more.extend(bufs);
        let ud = user_data(Op::Send, slot, idx);
        let e = if s.more.is_empty() {
            let one = s.iter().next().unwrap_or_default();
            // (A single write longer than 4 GiB is sent 4 GiB at a time.)
            let len = one.len().min(u32::MAX as usize) as u32;
            opcode::Send::new(types::Fd(fd), one.as_ptr(), len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        } else {
            if self.gathers_used == self.gathers.len() {
                self.gathers.push(Box::new(Gather {
                    // SAFETY: an all-zero msghdr is valid (no name, no control data).
                    msg: unsafe { std::mem::zeroed() },
                    iov: [libc::iovec {
                        iov_base: ptr::null_mut(),
                        iov_len: 0,
                    }; MAX_IOV],
                }));
            }
            let g = &mut self.gathers[self.gathers_used];
            self.gathers_used += 1;
            let mut n = 0;
            for (iov, b) in g.iov.iter_mut().zip(s.iter()) {
                *iov = libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                };
                n += 1;
            }
            g.msg.msg_iov = g.iov.as_mut_ptr();
            g.msg.msg_iovlen = n as _;
            opcode::SendMsg::new(types::Fd(fd), &g.msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        };
        self.push(e.user_data(ud));
        self.inflight += 1;
    }

    /// Cancels connection `idx`'s operation `op` (its multishot receive or accept, its send,
    /// its connect's poll); the operation still posts its final completion. By user data,
    /// which the kernel finds in a hash table, where a cancel by descriptor walks every
    /// operation in flight.
    pub(crate) fn cancel(&mut self, op: Op, idx: u32) {
        let extra = match op {
            Op::Send => match self.slot_of.get(idx as usize) {
                Some(&slot) if slot != u32::MAX => slot,
                _ => return,
            },
            _ => 0,
        };
        let b = types::CancelBuilder::user_data(user_data(op, extra, idx));
        let e = opcode::AsyncCancel2::new(b).build();
        self.push(e.user_data(user_data(Op::Cancel, 0, 0)));
        self.inflight += 1;
    }

    /// Cancels everything in flight (at shutdown).
    pub(crate) fn cancel_all(&mut self) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any().all()).build();
        self.push(e.user_data(user_data(Op::Cancel, 0, 0)));
        self.inflight += 1;
    }

    /// Submits what is queued and waits for at least one completion, at most `timeout`
    /// (`None`: no limit; zero: no wait). The eventfd read is armed first, so that a command
    /// from another thread ends the wait.
    pub(crate) fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.arm_wake();
        self.enter(timeout)
    }

    fn arm_wake(&mut self) {
        if !self.wake_armed {
            let e = opcode::Read::new(
                types::Fd(self.wake_fd),
                (&mut *self.wake_buf as *mut u64).cast(),
                8,
            )
            .build();
            self.push(e.user_data(user_data(Op::Wake, 0, 0)));
            self.inflight += 1;
            self.wake_armed = true;
        }
    }

    fn enter(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.push_overflow();
        let r = self.enter_inner(timeout);
        // Everything queued has been submitted (the kernel copied the gathers' msghdrs and
        // iovecs): they may be reused.
        if self.overflow.is_empty() && self.ring.submission().is_empty() {
            self.gathers_used = 0;
        }
        r
    }

    fn enter_inner(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let r = match timeout {
            Some(t) if t.is_zero() => self.ring.submit().map(drop),
            Some(t) => {
                // Whole milliseconds, rounded up, as epoll's timeout is: timers due within
                // the same millisecond are handled in one round.
                let ms = t.as_nanos().div_ceil(1_000_000).min(u64::MAX as u128) as u64;
                let ts = types::Timespec::from(Duration::from_millis(ms));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args).map(drop)
            }
            None => self.ring.submit_and_wait(1).map(drop),
        };
        match r {
            // ETIME: the wait timed out; EINTR: a signal; EBUSY/EAGAIN: the completion queue
            // (or the kernel's request memory) is full, reaping makes room. All: go on.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    fn push_overflow(&mut self) {
        while !self.overflow.is_empty() {
            let e = self.overflow.remove(0);
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                if self.ring.submit().is_err() {
                    self.overflow.insert(0, e);
                    return;
                }
                // SAFETY: as in `push`.
                if unsafe { self.ring.submission().push(&e) }.is_err() {
                    self.overflow.insert(0, e);
                    return;
                }
            }
        }
    }

    /// Hands every completion that has arrived to `f`, then returns their buffers to the
    /// kernel. The eventfd read and cancels are handled here, not passed on.
    pub(crate) fn complete(&mut self, mut f: impl FnMut(Cqe<'_>)) {
        let Ring {
            ring,
            bufs,
            sends,
            free_sends,
            slot_of,
            wake_armed,
            inflight,
            ..
        } = self;
        for entry in ring.completion() {
            let ud = entry.user_data();
            let (res, flags) = (entry.result(), entry.flags());
            let more = cqueue::more(flags);
            if !more {
                *inflight -= 1;
            }
            let bid = cqueue::buffer_select(flags);
            let buf_more = cqueue::buffer_more(flags);
            let Some(op) = Op::from_u8((ud >> 56) as u8) else {
                continue;
            };
            let idx = ud as u32;
            let extra = (ud >> 32) as u32 & 0x00FF_FFFF;
            match op {
                Op::Wake => *wake_armed = false,
                Op::Cancel => {}
                Op::Send | Op::Recv | Op::Accept | Op::Poll | Op::PollIn => {}
            }
            // Whether the buffer goes back to the kernel once this completion is handled.
            let mut give_back = bid.is_some();
            if !matches!(op, Op::Wake | Op::Cancel) {
                let data = match (bid, res) {
                    (Some(bid), n) if n > 0 => {
                        let (data, done) = bufs.data(bid, n as usize, buf_more);
                        give_back = done;
                        Some(data)
                    }
                    _ => None,
                };
                let accepted = (op == Op::Accept && res >= 0).then(|| {
                    // SAFETY: an accept's result is a new descriptor the kernel made for us
                    // and nobody else owns.
                    unsafe { OwnedFd::from_raw_fd(res) }
                });
                let sent = match op {
                    Op::Send => Some(&mut sends[extra as usize]),
                    _ => None,
                };
                f(Cqe {
                    op,
                    idx,
                    res,
                    more,
                    nonempty: cqueue::sock_nonempty(flags),
                    data,
                    accepted,
                    sent,
                });
                if op == Op::Send {
                    let s = &mut sends[extra as usize];
                    s.drain().for_each(drop); // (whatever the engine did not take back)
                    s.busy = false;
                    free_sends.push(extra);
                    if let Some(slot) = slot_of.get_mut(idx as usize) {
                        *slot = u32::MAX;
                    }
                }
            }
            if let (Some(bid), true) = (bid, give_back) {
                bufs.add(bid);
            }
        }
        bufs.publish();
    }

    /// Cancels everything and reaps (handing completions to `f`) until nothing is in flight,
    /// for at most `limit`. `false` if something is still in flight then.
    pub(crate) fn quiesce(&mut self, limit: Duration, mut f: impl FnMut(Cqe<'_>)) -> bool {
        let deadline = Instant::now() + limit;

        if self.inflight > 0 {
            self.cancel_all();
        }
        while self.inflight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || self
                    .enter(Some(left.min(Duration::from_millis(100))))
                    .is_err()
            {
                return false;
            }
            self.complete(&mut f);
        }
        true
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The eventfd read is in flight for as long as the ring is used: cancel it (and
        // anything else), and wait for the final completions before the memory goes. Should
        // they not come, the memory is leaked rather than freed under the kernel.
        if self.inflight > 0 && !self.quiesce(Duration::from_secs(5), |_| {}) {
            let bufs = std::mem::replace(&mut self.bufs.bufs, Mapping::empty());
            let entries = std::mem::replace(&mut self.bufs.entries, Mapping::empty());
            std::mem::forget((bufs, entries));
            std::mem::forget(std::mem::take(&mut self.sends));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
    }
}

/// Creates the ring. A threaded poller is the ring's single issuer, with deferred task work:
/// completions are run only when it asks for them, never by interrupting another thread.
/// An inline watcher is driven by several threads in turn, and the kernel runs a request's
/// completion work on the thread that submitted it: that thread must be woken for it even
/// while it sleeps elsewhere (on the driver's lock, say, while another thread waits for that
/// completion), so the default signal-based notification is kept (`COOP_TASKRUN` would leave
/// it asleep). Flags a kernel does not know (EINVAL) are dropped.
fn build(setup: Setup) -> io::Result<(IoUring, bool)> {
    let attempts: [&dyn Fn(&mut io_uring::Builder) -> bool; 2] = [
        &|b| {
            if setup.single_issuer {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag()
                    .setup_r_disabled();
            }
            setup.single_issuer
        },
        &|_| false,
    ];
    let mut last = None;
    for attempt in attempts {
        let mut b = IoUring::builder();
        b.setup_cqsize(setup.entries * 4);
        let disabled = attempt(&mut b);
        match b.build(setup.entries) {
            Ok(ring) => return Ok((ring, disabled)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Whether io_uring can run the engine here: a ring can be made, has every operation the
/// engine uses, and a receive into its provided buffers works (tried on a socket pair: the
/// kernel has no other way to say so). Run once per process.
pub(crate) fn probe() -> Result<(), Unavailable> {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    let setup = Setup {
        single_issuer: false,
        entries: 8,
        buffers: 2,
        buffer_size: 64,
    };
    // (No eventfd: the probe never waits on one.)
    let mut ring = Ring::new(setup, -1)?;
    let (a, mut b) =
        std::os::unix::net::UnixStream::pair().map_err(|e| Unavailable::from_setup(&e))?;
    ring.recv(a.as_raw_fd(), 0, 64);
    b.write_all(b"x").map_err(|e| Unavailable::from_setup(&e))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut seen = None;
    while seen.is_none() && Instant::now() < deadline {
        ring.enter(Some(Duration::from_millis(100)))
            .map_err(|e| Unavailable::from_setup(&e))?;
        ring.complete(|c| seen = Some((c.res, c.more, c.data.map(<[u8]>::to_vec))));
    }
    match seen {
        Some((1, false, Some(data))) if data == b"x" => Ok(()),
        _ => Err(Unavailable::NoBufferRing),
    }
}
