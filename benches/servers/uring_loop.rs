//! `uring-loop`: a hand-written single-threaded io_uring echo server, written directly on the
//! `io-uring` crate: the limit the proactor's io_uring engine is measured against (issue 17).
//!
//! - One ring, `SINGLE_ISSUER` + `DEFER_TASKRUN`, made on the loop thread; one
//!   `submit_and_wait(1)` per loop turn, which submits everything the previous turn queued.
//! - A multishot accept on the listener (re-armed when it ends).
//! - A multishot receive per connection from one provided-buffer ring of [`BUFS`] buffers of
//!   [`BUF_SIZE`] bytes (whole buffers, not consumed incrementally). A receive that ends
//!   for lack of buffers (`ENOBUFS`) is re-armed in a later turn, once buffers are back.
//! - No copy: what a receive put in a buffer is sent back from that buffer. Each connection
//!   keeps a queue of (buffer, offset, length) segments; at the end of a turn every
//!   connection with segments queued and no send in flight gets one send gathering all of
//!   them (up to [`MAX_IOV`]): a `Send` for one segment, a `SendMsg` for several. A buffer
//!   goes back to the ring when its last byte was sent.
//! - Closing (end of stream, an error): the receive is cancelled if still armed, and the
//!   socket is closed, its buffers given back, once neither the receive nor a send is in
//!   flight.
//!
//! Stopping: another thread sets a flag and writes an eventfd the ring keeps a read armed
//! on; the loop cancels everything, waits (bounded) until the kernel has posted every final
//! completion, then closes every socket and frees the buffers (leaked instead if the kernel
//! did not give everything back in time).
//!
//! Every `unsafe` block here carries its SAFETY argument: the memory an operation refers to
//! (provided buffers, the eventfd read's target, a send's `msghdr` and iovecs) must stay
//! valid and untouched by us while the kernel may use it.

use std::collections::VecDeque;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering, Ordering::Relaxed};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{bind_listener, pin_server_thread, Counters, Kind, Server};

/// Provided receive buffers: how many, and their size (the loop: 4096 x 16 KiB).
pub const BUFS: u16 = 4096;
pub const BUF_SIZE: u32 = 16 * 1024;
/// Submission queue entries; the completion queue has four times more.
const ENTRIES: u32 = 4096;
/// Segments gathered into one send at most.
const MAX_IOV: usize = 64;
/// The provided-buffer group.
const BGID: u16 = 0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Cancel = 4,
    Wake = 5,
}

/// User data: the operation (top byte), the connection's generation (24 bits) and its slot
/// index (low 32 bits).
fn user_data(op: Op, gen: u32, idx: u32) -> u64 {
    (op as u64) << 56 | u64::from(gen & 0x00FF_FFFF) << 32 | u64::from(idx)
}

fn split(ud: u64) -> (Option<Op>, u32, u32) {
    let op = match (ud >> 56) as u8 {
        1 => Some(Op::Accept),
        2 => Some(Op::Recv),
        3 => Some(Op::Send),
        4 => Some(Op::Cancel),
        5 => Some(Op::Wake),
        _ => None,
    };
    (op, (ud >> 32) as u32 & 0x00FF_FFFF, ud as u32)
}

/// Whether this kernel runs the loop: a ring with `SINGLE_ISSUER` + `DEFER_TASKRUN` (6.1),
/// multishot receive (6.0), provided-buffer rings (5.19). Checked once, by making a ring and
/// reading the kernel's version.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|x| x.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        // (On a thread of its own: the ring is that thread's, as the loop's will be.)
        let ring = thread::spawn(|| {
            IoUring::<squeue::Entry, cqueue::Entry>::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .build(8)
                .is_ok()
        });
        (major, minor) >= (6, 1) && ring.join().unwrap_or(false)
    })
}

/// Starts the loop on a thread of its own (pinned to the server CPU).
pub fn start() -> io::Result<Server> {
    let listener = bind_listener()?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    // SAFETY: plain eventfd(2); the descriptor is owned at once below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `efd` is a new descriptor nobody else owns.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let (s, k, w) = (stop.clone(), counters.clone(), wake.clone());
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name("uring-loop".into())
        .spawn(move || {
            pin_server_thread();
            // The ring is made here: with SINGLE_ISSUER, this thread is its only submitter.
            match Loop::new(listener, w.as_raw_fd(), k) {
                Ok(mut l) => {
                    let _ = ready_tx.send(Ok(()));
                    l.run(&s);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = handle.join();
            return Err(e);
        }
        Err(_) => return Err(io::Error::other("uring-loop: the loop thread died")),
    }
    Ok(Server {
        kind: Kind::UringLoop,
        addr,
        counters,
        watcher: None,
        stop: Some(Box::new(move || {
            stop.store(true, Relaxed);
            let one = 1u64;
            // SAFETY: `wake` is a live eventfd; the buffer is the 8 bytes of `one`.
            unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
            let _ = handle.join();
        })),
    })
}

/// Anonymous private memory, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping of `len` bytes at an address the kernel picks.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
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

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped only here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The provided-buffer ring: `BUFS` entries the kernel reads, and the buffers themselves.
/// Buffer `bid` lives at `bid * BUF_SIZE` for good.
struct Bufs {
    entries: Mapping,
    data: Mapping,
    /// Our tail: entries added since the last `publish` lie between the kernel's and it.
    tail: u16,
    dirty: bool,
    /// Buffers the kernel may pick now (added, not yet used by a receive).
    free: usize,
}

impl Bufs {
    fn new() -> io::Result<Bufs> {
        let entries = Mapping::new(usize::from(BUFS) * std::mem::size_of::<types::BufRingEntry>())?;
        let data = Mapping::new(usize::from(BUFS) * BUF_SIZE as usize)?;
        let mut b = Bufs {
            entries,
            data,
            tail: 0,
            dirty: false,
            free: 0,
        };
        for bid in 0..BUFS {
            b.add(bid);
        }
        b.publish();
        Ok(b)
    }

    /// Buffer `bid` goes back to the kernel (visible at the next `publish`).
    fn add(&mut self, bid: u16) {
        assert!(bid < BUFS);
        let slot = usize::from(self.tail & (BUFS - 1));
        // SAFETY: `slot` < BUFS, inside the entries' mapping; the kernel reads only the
        // entries between its head and the published tail, and this one is past that tail.
        let e = unsafe { &mut *self.entries.ptr.cast::<types::BufRingEntry>().add(slot) };
        e.set_addr(self.addr(bid, 0) as u64);
        e.set_len(BUF_SIZE);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.dirty = true;
        self.free += 1;
    }

    fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        // SAFETY: the tail is the reserved field of entry 0, inside the mapping, a naturally
        // aligned u16 the kernel loads with acquire semantics.
        let tail = unsafe {
            &*(types::BufRingEntry::tail(self.entries.ptr.cast::<types::BufRingEntry>())
                as *const AtomicU16)
        };
        tail.store(self.tail, Ordering::Release);
        self.dirty = false;
    }

    fn addr(&self, bid: u16, off: u32) -> *mut u8 {
        debug_assert!(bid < BUFS && off <= BUF_SIZE);
        // SAFETY: bid < BUFS and off <= BUF_SIZE: inside (or one past the end of) the mapping.
        unsafe {
            self.data
                .ptr
                .add(usize::from(bid) * BUF_SIZE as usize + off as usize)
        }
    }
}

/// Received bytes waiting to be sent back: `len` bytes at `off` in buffer `bid`.
#[derive(Clone, Copy)]
struct Seg {
    bid: u16,
    off: u32,
    len: u32,
}

struct Conn {
    fd: OwnedFd,
    gen: u32,
    queue: VecDeque<Seg>,
    /// Segments of `queue` (from its front) in the send in flight.
    sending: usize,
    recv_armed: bool,
    /// The receive ended for lack of buffers: re-armed once some are back.
    starved: bool,
    closing: bool,
}

/// A send's `msghdr` and iovecs, needed only until the submission returns: the kernel
/// copies them when it prepares the request (`IORING_FEAT_SUBMIT_STABLE`).
struct Gather {
    msg: libc::msghdr,
    iov: [libc::iovec; MAX_IOV],
}

struct Loop {
    // (Dropped first: the ring, then the memory its operations used.)
    ring: IoUring,
    bufs: Bufs,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    free_slots: Vec<u32>,
    next_gen: u32,
    /// Operations whose final completion (the one without `IORING_CQE_F_MORE`) is not in.
    inflight: usize,
    /// Connections whose queue grew or whose send completed this turn.
    dirty: Vec<u32>,
    starved: Vec<u32>,
    #[allow(clippy::vec_box)] // boxed so their addresses stay put while the vector grows
    gathers: Vec<Box<Gather>>,
    gathers_used: usize,
    cqes: Vec<(u64, i32, u32)>,
    wake_fd: RawFd,
    wake_buf: Box<u64>,
    accept_armed: bool,
    k: Arc<Counters>,
}

impl Loop {
    fn new(listener: TcpListener, wake_fd: RawFd, k: Arc<Counters>) -> io::Result<Loop> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(ENTRIES * 4)
            .build(ENTRIES)?;
        let bufs = Bufs::new()?;
        // SAFETY: the entries' mapping is page-aligned, holds BUFS entries, and outlives the
        // ring (the ring is dropped first, see `Loop`'s fields and `run`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.entries.ptr as u64,
                BUFS,
                BGID,
                0,
            )?;
        }
        let mut l = Loop {
            ring,
            bufs,
            listener,
            conns: Vec::new(),
            free_slots: Vec::new(),
            next_gen: 0,
            inflight: 0,
            dirty: Vec::with_capacity(1024),
            starved: Vec::new(),
            gathers: Vec::new(),
            gathers_used: 0,
            cqes: Vec::with_capacity(4096),
            wake_fd,
            wake_buf: Box::new(0),
            accept_armed: false,
            k,
        };
        l.arm_accept();
        l.arm_wake();
        Ok(l)
    }

    /// Queues a submission, submitting what is queued first if the queue is full.
    fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: every entry built here refers only to memory that stays valid until its
            // final completion: provided buffers (owned by `bufs`, given back only after
            // the send that reads them completed), the eventfd read's `wake_buf`, a gather
            // (until the submission returns; SUBMIT_STABLE), or nothing.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.inflight += 1;
                return;
            }
            // Full: hand the kernel what is queued. (`submit` copies the gathers' msghdrs.)
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    panic!("uring-loop: io_uring_enter: {e}");
                }
            }
        }
    }

    fn arm_accept(&mut self) {
        let fd = types::Fd(self.listener.as_raw_fd());
        let e = opcode::AcceptMulti::new(fd)
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(user_data(Op::Accept, 0, 0));
        self.push(e);
        self.accept_armed = true;
    }

    fn arm_wake(&mut self) {
        let buf = (&mut *self.wake_buf as *mut u64).cast::<u8>();
        let e = opcode::Read::new(types::Fd(self.wake_fd), buf, 8)
            .build()
            .user_data(user_data(Op::Wake, 0, 0));
        self.push(e);
    }

    fn arm_recv(&mut self, idx: u32) {
        let Some(c) = self.conns[idx as usize].as_mut() else {
            return;
        };
        let e = opcode::RecvMulti::new(types::Fd(c.fd.as_raw_fd()), BGID)
            .build()
            .user_data(user_data(Op::Recv, c.gen, idx));
        c.recv_armed = true;
        c.starved = false;
        self.push(e);
    }

    fn run(&mut self, stop: &AtomicBool) {
        loop {
            self.turn();
            if stop.load(Relaxed) {
                break;
            }
        }
        self.shutdown();
    }

    /// One turn: submit and wait, apply every completion, then start the sends.
    fn turn(&mut self) {
        if self.bufs.free > 0 && !self.starved.is_empty() {
            for idx in std::mem::take(&mut self.starved) {
                if self.conns[idx as usize]
                    .as_ref()
                    .is_some_and(|c| c.starved && !c.closing)
                {
                    self.arm_recv(idx);
                }
            }
        }
        self.bufs.publish();
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            Err(e) => panic!("uring-loop: io_uring_enter: {e}"),
        }
        self.gathers_used = 0; // everything queued was submitted: the kernel copied them
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &cqes {
            self.complete(ud, res, flags);
        }
        cqes.clear();
        self.cqes = cqes;
        let mut dirty = std::mem::take(&mut self.dirty);
        for &idx in &dirty {
            self.send(idx);
        }
        dirty.clear();
        self.dirty = dirty;
    }

    fn conn(&mut self, idx: u32, gen: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut(idx as usize)?
            .as_mut()
            .filter(|c| c.gen & 0x00FF_FFFF == gen)
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        if !more {
            self.inflight -= 1;
        }
        let (Some(op), gen, idx) = split(ud) else {
            return;
        };
        match op {
            Op::Cancel => {}
            Op::Wake => self.arm_wake(),
            Op::Accept => {
                if res >= 0 {
                    // SAFETY: an accept's result is a new descriptor nobody else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(res) };
                    self.adopt(fd);
                } else if matches!(-res, libc::EMFILE | libc::ENFILE | libc::ENOMEM) {
                    thread::sleep(Duration::from_millis(10)); // out of descriptors: back off
                }
                if !more {
                    self.accept_armed = false;
                    self.arm_accept();
                }
            }
            Op::Recv => {
                let bid = cqueue::buffer_select(flags);
                if bid.is_some() {
                    self.bufs.free -= 1;
                }
                let Some(c) = self.conn(idx, gen) else {
                    // (Not expected: a slot is freed only when nothing of it is in flight.)
                    if let Some(bid) = bid {
                        self.bufs.add(bid);
                    }
                    return;
                };
                if !more {
                    c.recv_armed = false;
                }
                let closing = c.closing;
                match (res, bid) {
                    (n, Some(bid)) if n > 0 => {
                        if closing {
                            self.bufs.add(bid);
                        } else {
                            let was_empty = c.queue.is_empty();
                            c.queue.push_back(Seg {
                                bid,
                                off: 0,
                                len: n as u32,
                            });
                            if was_empty {
                                self.dirty.push(idx);
                            }
                            if !more {
                                self.arm_recv(idx); // it ended with bytes: go on
                            }
                        }
                    }
                    (n, _) if n == -libc::ENOBUFS => {
                        if !closing {
                            c.starved = true;
                            self.starved.push(idx);
                        }
                    }
                    // End of stream, a reset, a cancel: close.
                    _ => self.close(idx),
                }
                self.finish_close(idx);
            }
            Op::Send => {
                let Some(c) = self.conn(idx, gen) else {
                    return;
                };
                c.sending = 0;
                if res < 0 {
                    self.close(idx);
                    self.finish_close(idx);
                    return;
                }
                // The segments sent whole go back to the ring; a partial one moves on.
                let mut n = res as u32;
                let mut back = [0u16; MAX_IOV];
                let mut k = 0;
                while n > 0 {
                    let Some(s) = c.queue.front_mut() else { break };
                    if n >= s.len {
                        n -= s.len;
                        back[k] = s.bid;
                        k += 1;
                        c.queue.pop_front();
                    } else {
                        s.off += n;
                        s.len -= n;
                        n = 0;
                    }
                }
                if !c.queue.is_empty() {
                    self.dirty.push(idx);
                }
                for &bid in &back[..k] {
                    self.bufs.add(bid);
                }
                self.finish_close(idx);
            }
        }
    }

    fn adopt(&mut self, fd: OwnedFd) {
        self.next_gen = self.next_gen.wrapping_add(1) & 0x00FF_FFFF;
        let c = Conn {
            fd,
            gen: self.next_gen,
            queue: VecDeque::new(),
            sending: 0,
            recv_armed: false,
            starved: false,
            closing: false,
        };
        let idx = match self.free_slots.pop() {
            Some(i) => {
                self.conns[i as usize] = Some(c);
                i
            }
            None => {
                self.conns.push(Some(c));
                (self.conns.len() - 1) as u32
            }
        };
        self.k.live.fetch_add(1, Relaxed);
        self.arm_recv(idx);
        self.k.ready.fetch_add(1, Relaxed);
    }

    /// Starts closing connection `idx`: its receive is cancelled if armed.
    fn close(&mut self, idx: u32) {
        let Some(c) = self.conns[idx as usize].as_mut() else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        if c.recv_armed {
            let target = user_data(Op::Recv, c.gen, idx);
            let e = opcode::AsyncCancel::new(target)
                .build()
                .user_data(user_data(Op::Cancel, 0, 0));
            self.push(e);
        }
    }

    /// Closes connection `idx` if it is closing and the kernel holds nothing of it.
    fn finish_close(&mut self, idx: u32) {
        let done = self.conns[idx as usize]
            .as_ref()
            .is_some_and(|c| c.closing && !c.recv_armed && c.sending == 0);
        if !done {
            return;
        }
        let c = self.conns[idx as usize].take().expect("checked");
        for s in &c.queue {
            self.bufs.add(s.bid);
        }
        drop(c); // closes the socket
        self.free_slots.push(idx);
        self.k.live.fetch_sub(1, Relaxed);
    }

    /// Sends everything queued on connection `idx` in one operation, unless a send is in
    /// flight (its completion calls this again).
    fn send(&mut self, idx: u32) {
        let Some(c) = self.conns[idx as usize].as_mut() else {
            return;
        };
        if c.closing || c.sending > 0 || c.queue.is_empty() {
            return;
        }
        let n = c.queue.len().min(MAX_IOV);
        c.sending = n;
        let (fd, gen) = (types::Fd(c.fd.as_raw_fd()), c.gen);
        let ud = user_data(Op::Send, gen, idx);
        let e = if n == 1 {
            let s = c.queue[0];
            opcode::Send::new(fd, self.bufs.addr(s.bid, s.off), s.len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        } else {
            if self.gathers_used == self.gathers.len() {
                self.gathers.push(Box::new(Gather {
                    // SAFETY: an all-zero msghdr is valid: no name, no control data.
                    msg: unsafe { std::mem::zeroed() },
                    iov: [libc::iovec {
                        iov_base: ptr::null_mut(),
                        iov_len: 0,
                    }; MAX_IOV],
                }));
            }
            let g = &mut self.gathers[self.gathers_used];
            self.gathers_used += 1;
            for (iov, s) in g.iov.iter_mut().zip(c.queue.iter()) {
                *iov = libc::iovec {
                    iov_base: self.bufs.addr(s.bid, s.off).cast(),
                    iov_len: s.len as usize,
                };
            }
            g.msg.msg_iov = g.iov.as_mut_ptr();
            g.msg.msg_iovlen = n as _;
            opcode::SendMsg::new(fd, &g.msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        };
        self.push(e.user_data(ud));
    }

    /// Cancels everything, reaps until the kernel holds nothing (5 s at most), then drops the
    /// connections; if something is still in flight, the buffers are leaked, not unmapped.
    fn shutdown(&mut self) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any().all())
            .build()
            .user_data(user_data(Op::Cancel, 0, 0));
        self.push(e);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.inflight > 0 && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(100_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.gathers_used = 0;
            let cqes: Vec<_> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (ud, res, flags) in cqes {
                if !cqueue::more(flags) {
                    self.inflight -= 1;
                }
                // Buffers of late receives go nowhere: the ring is going away.
                let _ = (ud, res);
            }
        }
        for c in self.conns.drain(..).flatten() {
            drop(c);
            self.k.live.fetch_sub(1, Relaxed);
        }
        if self.inflight > 0 {
            eprintln!("uring-loop: the kernel still holds operations; its buffers are leaked");
            std::mem::forget(std::mem::replace(
                &mut self.bufs.data,
                Mapping::new(4096).expect("a page"),
            ));
        }
    }
}
