//! What user threads and the poller share: the queues into the poller (`Inbox`), the key
//! allocator, the waker, the round counter `wait_io` sleeps on, the stats cells. User-side
//! code (`watcher.rs`, `conn.rs`, `pool.rs`) and the poller (`driver`) both import this
//! module; it imports neither, so the imports run one way.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{
    fence, AtomicBool, AtomicUsize, Ordering::AcqRel, Ordering::Relaxed, Ordering::Release,
    Ordering::SeqCst,
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use slotmap::{Key as _, SlotMap};

use crate::conn::{Key, COUNT, FREED};
use crate::stats::StatCells;
use crate::{
    sys, Cmd, Completion, Conn, Connect, EngineKind, Error, RegisterError, SendError, Unavailable,
};

/// What a registered socket is for: which operations can succeed on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Stream,
    /// A listening stream socket: only `Accept` can succeed on it.
    Listener,
    /// A datagram socket: reads and writes move whole datagrams.
    Datagram,
}

/// Control messages: never refused (only after shutdown), so a drop never leaks a socket.
pub(crate) enum Ctl {
    /// A new socket; `connect` is the pending connect of one made by `Watcher::connect`.
    Register {
        id: Key,
        fd: OwnedFd,
        connect: Option<(Conn, Connect)>,
        /// `None` for the common case: the watcher's mailbox, no pool.
        route: Option<Box<Route>>,
        role: Role,
    },
    Release(Key),
    /// A `Free` or `Detach` that found the command queue full (`Shared::submit`).
    Last(Conn, Cmd),
}

/// The queues into the poller, behind one lock: senders push one message each, the poller
/// takes both queues whole once per round (one lock per round, however many arrived).
#[derive(Default)]
pub(crate) struct Inbox {
    /// Commands, bounded by the builder's `command_capacity`.
    pub(crate) ops: Vec<(Conn, Cmd)>,
    /// Registrations and releases; taken before `ops`, unbounded.
    pub(crate) ctl: Vec<Ctl>,
    /// Set by the poller's shutdown as it takes the last messages: later pushes fail, so
    /// nothing is left in a queue nobody will read.
    pub(crate) sealed: bool,
}

/// Where threads in a threaded watcher's `wait_io` wait: the poller wakes them once per round
/// that posted completions, instead of flume waking a receiver per completion. On a busy
/// core that difference is a context switch per completion (the woken thread preempts the
/// poller after its first post) against one per round.
#[derive(Default)]
pub(crate) struct Rounds {
    /// Threads inside `wait`.
    waiters: AtomicUsize,
    /// Rounds ended while someone waited; bumped under the lock.
    ended: Mutex<u64>,
    cond: Condvar,
}

impl Rounds {
    /// The poller posted this round's completions (or has exited): wake the waiters, if any.
    pub(crate) fn ended(&self) {
        // Pairs with the fence in `wait`: either we see the waiter, or it sees what we posted.
        fence(SeqCst);
        if self.waiters.load(Relaxed) > 0 {
            *self.ended.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            self.cond.notify_all();
        }
    }

    /// Blocks until `ready()` holds, a round ends, or `deadline` passes.
    pub(crate) fn wait(&self, ready: impl Fn() -> bool, deadline: Option<Instant>) {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        self.waiters.fetch_add(1, Relaxed);
        fence(SeqCst);
        let start = *ended;
        if !ready() {
            let more = |n: &mut u64| *n == start;
            ended = match deadline {
                None => self
                    .cond
                    .wait_while(ended, more)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    let r = self.cond.wait_timeout_while(ended, left, more);
                    r.unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
        self.waiters.fetch_sub(1, Relaxed);
        drop(ended);
    }
}

/// When the poller thread exits (after `close`, or a panic, a bug of this crate): the
/// watcher counts as closed and its queues are sealed, so later sends fail with `Closed`
/// instead of queueing commands nothing will complete, and the last round is ended.
pub(crate) struct EndRounds(pub(crate) Arc<Shared>);

impl Drop for EndRounds {
    fn drop(&mut self) {
        self.0.closed.store(true, SeqCst);
        let left = {
            let mut inbox = self.0.inbox();
            inbox.sealed = true;
            (
                std::mem::take(&mut inbox.ops),
                std::mem::take(&mut inbox.ctl),
            )
        };
        drop(left); // outside the lock: a dropped handle may queue its release
        self.0.rounds.ended();
    }
}

/// State shared by the watcher, every `Conn` and the poller thread.
pub(crate) struct Shared {
    inbox: Mutex<Inbox>,
    ops_capacity: usize,
    /// The readiness engine's epoll or kqueue instance, which user threads add sockets to
    /// (`adopt`); `None` for an io_uring watcher.
    pub(crate) selector: Option<sys::Selector>,
    pub(crate) waker: sys::Waker,
    /// The poller is in (or about to enter) `select` with a non-zero timeout.
    pub(crate) sleeping: AtomicBool,
    pub(crate) closed: AtomicBool,
    /// Key allocation. The poller holds the per-connection state in a `SecondaryMap`.
    ids: Mutex<SlotMap<Key, ()>>,
    pub(crate) stats: StatCells,
    pub(crate) max_ops: u32,
    /// This watcher's number in the process, part of every `ConnId`.
    pub(crate) watcher_id: u32,
    pub(crate) rounds: Rounds,
    /// Registered connections, counted at once (the stats trail by a round): the load
    /// measure for spreading connections over a pool.
    pub(crate) live: AtomicUsize,
    /// The engine the poller runs.
    pub(crate) engine: EngineKind,
    /// Why not io_uring (set at build).
    fallback: Mutex<Option<Unavailable>>,
}

/// Where a connection's completions go, and, for a listener, where accepted connections go.
#[derive(Clone, Default)]
pub(crate) struct Route {
    /// Post here instead of the watcher's mailbox.
    pub(crate) mailbox: Option<flume::Sender<Completion>>,
    /// Register accepted connections on the least-loaded of these watchers.
    pub(crate) spread: Option<Arc<Spread>>,
}

impl Route {
    /// Boxed, or `None` when it is the default: only routed connections take an entry in
    /// the poller's route map.
    pub(crate) fn boxed(self) -> Option<Box<Route>> {
        (self.mailbox.is_some() || self.spread.is_some()).then(|| Box::new(self))
    }
}

/// The watchers of a pool, for spreading accepted connections.
pub(crate) struct Spread {
    pub(crate) targets: Vec<Arc<Shared>>,
    next: AtomicUsize,
}

impl Spread {
    pub(crate) fn new(targets: Vec<Arc<Shared>>) -> Spread {
        Spread {
            targets,
            next: AtomicUsize::new(0),
        }
    }

    /// The index of the open watcher with the fewest connections (a closed one has none,
    /// and would refuse them all); ties go round-robin, so a burst of accepts does not pile
    /// onto the first.
    pub(crate) fn pick(&self) -> usize {
        let n = self.targets.len();
        let start = self.next.fetch_add(1, Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&i| {
                let t = &self.targets[i];
                (t.closed.load(Relaxed), t.live.load(Relaxed))
            })
            .unwrap_or(0)
    }
}

impl Shared {
    pub(crate) fn new(
        selector: Option<sys::Selector>,
        waker: sys::Waker,
        ops_capacity: usize,
        max_ops: u32,
        watcher_id: u32,
        engine: EngineKind,
        fallback: Option<Unavailable>,
    ) -> Shared {
        Shared {
            inbox: Mutex::new(Inbox::default()),
            ops_capacity,
            selector,
            waker,
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            ids: Mutex::new(SlotMap::with_key()),
            stats: StatCells::default(),
            max_ops,
            watcher_id,
            live: AtomicUsize::new(0),
            rounds: Rounds::default(),
            engine,
            fallback: Mutex::new(fallback),
        }
    }

    /// Why `auto` did not pick io_uring, if it did not.
    pub(crate) fn fallback(&self) -> Option<Unavailable> {
        *self.fallback.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_fallback(&self, why: Unavailable) {
        *self.fallback.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// The queues. Nothing can panic while the lock is held (and no `Conn` is dropped under
    /// it: that could re-enter), so a poisoned lock is still consistent.
    pub(crate) fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a command for `conn`, or gives it back in the error. The connection's "freed"
    /// bit and its count of operations sent are written only here, under the queue lock, so
    /// whatever a sender was told, the queue agrees: a command accepted before a `Free` is
    /// queued before it, one sent after it is refused, and the bound on operations in flight
    /// holds however many threads send at once. The handle in the queue keeps the connection
    /// registered until the poller takes it.
    pub(crate) fn submit(&self, conn: &Conn, cmd: Cmd) -> Result<(), SendError> {
        let inner = &conn.inner;
        let mut inbox = self.inbox();
        // Only ever written under this lock: what we read is current.
        let sent = inner.sent.load(Relaxed);
        // A freed connection says so before a closed watcher does.
        if sent & FREED != 0 {
            return Err(SendError::Freed(cmd));
        }
        if inbox.sealed || self.closed.load(Relaxed) {
            return Err(SendError::Closed(cmd));
        }
        let full = inbox.ops.len() >= self.ops_capacity;
        if cmd.is_last() {
            // Only one Free/Detach is ever accepted; it does not count against the bound.
            inner.sent.store(sent | FREED, Release);
            if full {
                // Never refused, or a connection with reads pending and no deadline could
                // never be closed: the control queue, which the poller takes first, so
                // operations still queued complete (freed) after this one.
                inbox.ctl.push(Ctl::Last(conn.clone(), cmd));
            } else {
                inbox.ops.push((conn.clone(), cmd));
            }
        } else {
            // `done` may lag behind the poller by a little: then the bound errs on the
            // side of refusing.
            let in_flight = sent.wrapping_sub(inner.done.load(Relaxed)) & COUNT;
            if full || in_flight >= self.max_ops {
                return Err(SendError::Full(cmd));
            }
            inner.sent.store(sent.wrapping_add(1) & COUNT, Relaxed);
            inbox.ops.push((conn.clone(), cmd));
        }
        self.release_and_wake(inbox);
        Ok(())
    }

    /// Queues a control message unless the poller has shut down (it comes back).
    pub(crate) fn control(&self, msg: Ctl) -> Result<(), Ctl> {
        let mut inbox = self.inbox();
        if inbox.sealed {
            drop(inbox);
            return Err(msg);
        }
        inbox.ctl.push(msg);
        self.release_and_wake(inbox);
        Ok(())
    }

    /// The poller sets `sleeping`, then takes the lock to see whether the queues are empty;
    /// a sender pushes and reads `sleeping` under the same lock. Whichever holds the lock
    /// second sees what the other did, so a message never waits for a timeout, and the
    /// eventfd is written only when the poller sleeps (once: the swap).
    fn release_and_wake(&self, inbox: MutexGuard<'_, Inbox>) {
        let sleeping = self.sleeping.load(Relaxed);
        drop(inbox);
        if sleeping && self.sleeping.swap(false, AcqRel) {
            // A failed wake-up write means the eventfd is broken; the poller's own timeout
            // still runs the loop, so there is nothing better to do here.
            let _ = self.waker.wake();
        }
    }

    /// The key allocator. Nothing can panic while it is held, so a poisoned lock is still
    /// consistent and is used as it is.
    pub(crate) fn ids(&self) -> std::sync::MutexGuard<'_, SlotMap<Key, ()>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `fd` a key, adds it to the selector and tells the poller. Called by user threads
    /// and by pollers (accepts spread over a pool land on another watcher).
    pub(crate) fn adopt(
        self: &Arc<Shared>,
        fd: OwnedFd,
        connect: Option<Connect>,
        route: Route,
        role: Role,
    ) -> Result<Conn, RegisterError> {
        let id = self.ids().insert(());
        let forget = |id| {
            self.ids().remove(id);
        };
        // Registered before the poller knows the key: events that arrive first find no state
        // and are dropped, which is harmless because a new connection starts out assumed
        // readable and writable (the first operation tries the syscall).
        if let Some(selector) = &self.selector {
            if let Err(e) = selector.register(fd.as_raw_fd(), id.data().as_ffi()) {
                forget(id);
                return Err(RegisterError::new(e, fd));
            }
        }
        let conn = Conn::new(id, self.clone(), role == Role::Datagram);
        let connect = connect.map(|to| {
            // The connect is an operation in flight like any other (no other thread has
            // the handle yet; the control message's lock publishes the count).
            conn.inner.sent.store(1, Relaxed);
            (conn.clone(), to)
        });
        let route = route.boxed();
        match self.control(Ctl::Register {
            id,
            fd,
            connect,
            route,
            role,
        }) {
            Ok(()) => {
                self.live.fetch_add(1, SeqCst);
                Ok(conn)
            }
            Err(msg) => {
                forget(id);
                let Ctl::Register { fd, .. } = msg else {
                    unreachable!("the message given back is the one sent")
                };
                if let Some(selector) = &self.selector {
                    let _ = selector.deregister(fd.as_raw_fd());
                }
                Err(RegisterError::new(Error::WatcherClosed, fd))
            }
        }
    }

    /// The last handle of `id` was dropped.
    pub(crate) fn release(&self, id: Key) {
        // On a closed watcher the poller closed (or will close) every socket itself.
        let _ = self.control(Ctl::Release(id));
    }
}
