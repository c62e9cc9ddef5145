//! [`Watcher`] and [`WatcherBuilder`]: the user-thread side. The poller loop is in `driver.rs`.

use std::any::Any;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[cfg(all(target_os = "linux", feature = "uring"))]
use crate::driver::Uring;
use crate::driver::{AnyDriver, Core, Driver, Readiness, WAKER_TOKEN};
use crate::shared::{EndRounds, Role, Route, Shared};
use crate::stats::Stats;
use crate::{
    sys, Completion, Conn, Connect, Engine, EngineKind, Error, Mailbox, RegisterError, Unavailable,
};
#[cfg(doc)]
use crate::{Cmd, SendError};

/// Numbers watchers, so `ConnId`s of different watchers never collide.
static NEXT_WATCHER_ID: AtomicU32 = AtomicU32::new(0);

/// Options for a [`Watcher`]. `Watcher::builder().build()` is `Watcher::new()`.
#[derive(Debug, Clone)]
pub struct WatcherBuilder {
    buffer_size: usize,
    command_capacity: usize,
    max_ops_per_conn: u32,
    events_capacity: usize,
    cpu: Option<usize>,
    inline: bool,
    mailbox: Option<(flume::Sender<Completion>, flume::Receiver<Completion>)>,
    engine: Option<Engine>,
    uring_entries: u32,
    uring_buffers: u16,
    uring_buffer_size: u32,
    udp_gso: bool,
}

impl Default for WatcherBuilder {
    fn default() -> WatcherBuilder {
        WatcherBuilder {
            buffer_size: 64 * 1024,
            command_capacity: 65_536,
            max_ops_per_conn: 1024,
            events_capacity: 1024,
            cpu: None,
            inline: false,
            mailbox: None,
            engine: None,
            uring_entries: 1024,
            uring_buffers: 64,
            uring_buffer_size: 64 * 1024,
            udp_gso: true,
        }
    }
}

/// The largest [`WatcherBuilder::buffer_size`].
const MAX_BUFFER_SIZE: usize = 1 << 30;
/// The largest [`WatcherBuilder::events_capacity`].
const MAX_EVENTS: usize = 1 << 16;

/// The engine `build` settled on: the readiness engine (and why not io_uring, if `auto`
/// tried it), or io_uring.
enum Chosen {
    Readiness(Option<Unavailable>),
    #[cfg(all(target_os = "linux", feature = "uring"))]
    Uring,
}

/// Whether io_uring can run the engine in this process (probed once).
#[cfg(all(target_os = "linux", feature = "uring"))]
fn uring_probe() -> Result<(), Unavailable> {
    static PROBE: std::sync::OnceLock<Result<(), Unavailable>> = std::sync::OnceLock::new();
    // On a thread of its own: the kernel may notify the thread that used a ring of task
    // work (for its teardown) after it is gone, which makes a blocking socket call with a
    // timeout on that thread fail with EINTR.
    *PROBE.get_or_init(|| {
        thread::Builder::new()
            .name("proactor-probe".into())
            .spawn(sys::uring::probe)
            .ok()
            .and_then(|t| t.join().ok())
            .unwrap_or(Err(Unavailable::Other { errno: 0 }))
    })
}

impl WatcherBuilder {
    fn engine_for(&self, choice: Engine) -> io::Result<Chosen> {
        #[cfg(all(target_os = "linux", feature = "uring"))]
        let probed = uring_probe();
        #[cfg(not(all(target_os = "linux", feature = "uring")))]
        let probed: Result<(), Unavailable> = Err(Unavailable::NotBuilt);
        Ok(match (choice, probed) {
            (Engine::Readiness, _) => Chosen::Readiness(None),
            #[cfg(all(target_os = "linux", feature = "uring"))]
            (Engine::Auto | Engine::Uring, Ok(())) => Chosen::Uring,
            (Engine::Uring, Err(why)) => return Err(why.into_io_error()),
            // (Elsewhere than Linux the readiness engine is the only one: nothing fell back.)
            (Engine::Auto, Err(why)) => Chosen::Readiness(
                cfg!(any(target_os = "linux", target_os = "android")).then_some(why),
            ),
            #[cfg(not(all(target_os = "linux", feature = "uring")))]
            (Engine::Auto | Engine::Uring, Ok(())) => Chosen::Readiness(None),
        })
    }

    /// `build` on the readiness engine, after `auto` found io_uring unusable for `why`.
    fn build_readiness(mut self, why: Unavailable) -> io::Result<Watcher> {
        self.engine = Some(Engine::Readiness);
        let watcher = self.build()?;
        // (`Shared` is read-only after build: set through a fresh one would be cleaner, but
        // the fallback reason is all that differs.)
        watcher.shared.set_fallback(why);
        Ok(watcher)
    }

    /// Size of each internal read-buffer chunk, the most one
    /// [`Cmd::ReadInternal`](crate::Cmd::ReadInternal) returns (default: 64 KiB; from 1 byte
    /// to 1 GiB, values outside are clamped).
    pub fn buffer_size(mut self, bytes: usize) -> Self {
        // A chunk is one allocation: beyond this it would fail or overflow in the poller.
        self.buffer_size = bytes.clamp(1, MAX_BUFFER_SIZE);
        self
    }

    /// Capacity of the command queue into the poller; a full queue makes
    /// [`Conn::send`] return [`SendError::Full`](crate::SendError::Full) (default: 65,536).
    pub fn command_capacity(mut self, n: usize) -> Self {
        self.command_capacity = n.max(1);
        self
    }

    /// Most read, read-full and write operations one connection may have in flight; more
    /// are refused with [`SendError::Full`](crate::SendError::Full) (default: 1,024; at most
    /// 2^31 - 1).
    /// `Free` and `Detach` are always let through.
    pub fn max_ops_per_conn(mut self, n: u32) -> Self {
        // The count shares a word with the handle's "freed" bit.
        self.max_ops_per_conn = n.clamp(1, crate::conn::FREED - 1);
        self
    }

    /// Most readiness events taken per `epoll_wait`/`kevent` call (default: 1,024; from 1
    /// to 65,536, values outside are clamped).
    pub fn events_capacity(mut self, n: usize) -> Self {
        // epoll_wait refuses more than INT_MAX / sizeof(struct epoll_event) with EINVAL.
        self.events_capacity = n.clamp(1, MAX_EVENTS);
        self
    }

    /// Pins the poller thread to this CPU (default: not pinned). [`build`](Self::build) fails
    /// if the kernel refuses it, for example a CPU outside the set the process may run on
    /// (a cgroup cpuset, `taskset`).
    ///
    /// # Platform-specific behavior
    ///
    /// Linux and Android only; elsewhere [`build`](Self::build) fails with
    /// [`io::ErrorKind::Unsupported`].
    pub fn poller_cpu(mut self, cpu: usize) -> Self {
        self.cpu = Some(cpu);
        self
    }

    /// The I/O engine (default: what the environment variable `PROACTOR_ENGINE` says, `auto`,
    /// `uring` or `epoll` (`kqueue` on BSD and macOS), else [`Engine::Auto`]: io_uring where
    /// the kernel allows it, else the readiness engine). See [`Engine`].
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = Some(engine);
        self
    }

    /// io_uring engine: submission queue entries (default: 1,024; a power of two from 8 to
    /// 32,768, values outside are rounded and clamped); the completion queue has four times
    /// more. The ring's memory, about 128 bytes per entry (`RLIMIT_MEMLOCK` counts it on
    /// recent kernels), comes on top of the receive buffers.
    pub fn uring_entries(mut self, entries: u32) -> Self {
        self.uring_entries = entries.clamp(8, 1 << 15).next_power_of_two();
        self
    }

    /// io_uring engine: the receive buffers the kernel fills, how many and how large
    /// (default: 64 of 64 KiB, 4 MiB in all; `count` a power of two from 2 to 32,768 and
    /// `size` from 64 bytes to 1 MiB, values outside are rounded and clamped). This is the
    /// engine's fixed memory: an idle connection holds none of it, and what a receive brings
    /// is copied out at once (into the internal read arena, or the caller's buffer), so the
    /// kernel needs room for what arrives between two rounds; less only costs a re-armed
    /// receive, never a lost byte. On Linux 6.12 and later the buffers are consumed
    /// incrementally, so small messages share one; before, each receive takes a whole
    /// buffer, and many small buffers suit many connections better than a few large ones.
    /// The memory is touched, and so counts in the resident size, as the kernel first uses
    /// it.
    pub fn uring_buffers(mut self, count: u16, size: u32) -> Self {
        self.uring_buffers = count.clamp(2, 1 << 15).next_power_of_two();
        self.uring_buffer_size = size.clamp(64, 1 << 20);
        self
    }

    /// UDP sockets: send queued datagrams of one size to one peer as one GSO send that the
    /// kernel cuts into those datagrams (`UDP_SEGMENT`, Linux 4.18 and later, asked of each
    /// socket at registration; default: on). Each write is still its own datagram on the wire
    /// and gets its own completion; one pass down the network stack carries them all, which
    /// costs less than one per datagram where a peer is sent many at once (a stream of
    /// equal-sized game or media packets, an echo of a batch). Where the socket or its route
    /// refuses a GSO send (`SO_NO_CHECK`, a device without checksum offload, a segment that
    /// may be over the route's MTU), that socket goes back to one datagram per message at
    /// once, without losing or failing a write. Errors the socket reports on a send (an ICMP
    /// error) fail the first write of a GSO send, as they would fail that datagram's write
    /// without GSO. Nothing changes on other systems, or for Unix datagram sockets.
    /// [`Stats::datagrams_segmented`] counts the datagrams sent this way.
    ///
    /// [`Stats::datagrams_segmented`]: crate::Stats::datagrams_segmented
    pub fn udp_gso(mut self, on: bool) -> Self {
        self.udp_gso = on;
        self
    }

    /// These options without a mailbox or a CPU: a pool chooses those itself.
    pub(crate) fn without_mailbox_or_cpu(mut self) -> Self {
        self.mailbox = None;
        self.cpu = None;
        self
    }

    /// Runs the poller on the thread that calls [`Watcher::wait_io`] instead of a thread of
    /// its own (default: `false`, a poller thread).
    ///
    /// The API is the same, but there is no hand-off between threads: a dedicated server loop
    /// (`wait_io`, handle the batch, send commands, `wait_io` again) then pays no futex wake,
    /// no eventfd write and no context switch per batch. Completions are produced only while
    /// some thread is inside `wait_io`, `wait_io_timeout`, `wait_io_deadline` or
    /// `try_wait_io` (one at a time: they take turns driving), and they go straight into the
    /// vector of the call that produced them, not through the mailbox channel. So an inline
    /// watcher does not suit `flume::Selector` or `recv_async` on its mailbox, nor a mailbox
    /// shared with other watchers (their completions would wait for this one's next event);
    /// keep the threaded default for those. Commands may still be sent from any thread: they
    /// wake the driving thread.
    ///
    /// On the io_uring engine, each thread that drives an inline watcher submits to its ring,
    /// and the kernel signals those threads (task work for the ring's teardown) shortly after
    /// the watcher is closed: a blocking socket call with a timeout (`SO_RCVTIMEO`,
    /// `SO_SNDTIMEO`) that such a thread is in then fails once with
    /// [`ErrorKind::Interrupted`](std::io::ErrorKind::Interrupted). Retry it (std's
    /// `read_exact` and `write_all` do), or drive the watcher from threads that make no such
    /// calls. A threaded watcher's ring is touched by its poller thread alone, and the thread
    /// that builds a watcher never submits to its ring.
    pub fn inline(mut self, inline: bool) -> Self {
        self.inline = inline;
        self
    }

    /// Posts completions into `mailbox` instead of a new unbounded channel of the watcher's
    /// own, so several watchers can share one (flume is MPMC); [`Watcher::mailbox`] returns
    /// its receiver.
    ///
    /// A [bounded](Mailbox::bounded) one is allowed on a threaded watcher: when it is full,
    /// the poller keeps the completions in order and is woken when a receiver makes room; it
    /// never blocks on the mailbox, never polls it on a timer, and a full channel holds back
    /// its own completions only (not those of routes to other channels). Completions waiting
    /// for room count as in flight for their connections, so
    /// [`max_ops_per_conn`](Self::max_ops_per_conn) bounds them ([`Conn::send`] says
    /// [`Full`](crate::SendError::Full)). What still waits for room at
    /// [`close`](Watcher::close) is delivered by a thread of its own, so `close` does not
    /// wait for a receiver either.
    pub fn mailbox(mut self, mailbox: &Mailbox) -> Self {
        self.mailbox = Some(mailbox.clone().into_parts());
        self
    }

    /// Creates the watcher and starts its poller thread (unless [`inline`](Self::inline)).
    ///
    /// # Errors
    ///
    /// Creating the epoll/kqueue instance, the waker or the thread failed (for example EMFILE),
    /// CPU pinning is not supported here or the kernel refused the CPU (see
    /// [`poller_cpu`](Self::poller_cpu)), or an inline watcher was given a CPU or a mailbox
    /// ([`io::ErrorKind::InvalidInput`]: its completions go to the thread driving it, and a
    /// shared mailbox would leave other watchers' completions waiting while that thread
    /// sleeps in its own `epoll_wait`; for a [`Pool`](crate::Pool) of inline watchers use
    /// [`per_watcher_mailboxes`](crate::PoolBuilder::per_watcher_mailboxes)).
    pub fn build(self) -> io::Result<Watcher> {
        if self.inline && (self.cpu.is_some() || self.mailbox.is_some()) {
            let msg = "an inline watcher takes neither a poller CPU nor a mailbox of its own \
                       (in a pool: per_watcher_mailboxes)";
            return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        }
        let choice = match self.engine {
            Some(engine) => engine,
            None => match std::env::var("PROACTOR_ENGINE") {
                Ok(v) if !v.trim().is_empty() => v.parse().map_err(|e: io::Error| {
                    io::Error::new(e.kind(), format!("PROACTOR_ENGINE: {e}"))
                })?,
                _ => Engine::Auto,
            },
        };
        let mut engine = self.engine_for(choice)?;
        let own_mailbox = self.mailbox.is_none();
        let (mail_tx, mail_rx) = self.mailbox.clone().unwrap_or_else(flume::unbounded);
        let watcher_id = NEXT_WATCHER_ID.fetch_add(1, Relaxed);
        let (selector, waker) = match &engine {
            Chosen::Readiness(_) => {
                let selector = sys::Selector::new()?;
                let waker = sys::Waker::new(&selector, WAKER_TOKEN)?;
                (Some(selector), waker)
            }
            #[cfg(all(target_os = "linux", feature = "uring"))]
            Chosen::Uring => (None, sys::Waker::eventfd()?),
        };
        let (kind, fallback) = match &engine {
            Chosen::Readiness(why) => (EngineKind::READINESS, *why),
            #[cfg(all(target_os = "linux", feature = "uring"))]
            Chosen::Uring => (EngineKind::Uring, None),
        };
        let shared = Arc::new(Shared::new(
            selector,
            waker,
            self.command_capacity,
            self.max_ops_per_conn,
            watcher_id,
            kind,
            fallback,
        ));
        let mut core = Core::new(shared.clone(), mail_tx, self.buffer_size);
        core.udp_gso = self.udp_gso;
        let mut driver = match &mut engine {
            Chosen::Readiness(_) => {
                let engine = Readiness::new(shared.clone(), self.events_capacity);
                AnyDriver::Readiness(Driver::new(core, engine))
            }
            #[cfg(all(target_os = "linux", feature = "uring"))]
            Chosen::Uring => {
                let setup = sys::uring::Setup {
                    single_issuer: !self.inline,
                    entries: self.uring_entries,
                    buffers: self.uring_buffers,
                    buffer_size: self.uring_buffer_size,
                };
                // Made on a short-lived thread, as the probe's ring: the kernel signals every
                // thread that made or submitted to a ring with task work for the ring's
                // teardown, after it is closed, and that signal makes a blocking socket call
                // with a timeout fail with EINTR on that thread. The thread that builds a
                // watcher should not get it; a threaded watcher's poller is then the only
                // thread that touches its ring.
                let made = thread::scope(|s| {
                    thread::Builder::new()
                        .name("proactor-ring".into())
                        .spawn_scoped(s, || Uring::new(&shared, setup))
                        .map(|t| t.join())
                });
                let made = match made {
                    Ok(Ok(made)) => made,
                    Ok(Err(panic)) => std::panic::resume_unwind(panic),
                    Err(e) => return Err(e),
                };
                match made {
                    Ok(engine) => AnyDriver::Uring(Driver::new(core, engine)),
                    // This watcher's ring could not be made (its memory, most likely) where
                    // the probe's could: as if the probe had failed.
                    Err(why) if choice == Engine::Auto => {
                        drop((core, shared));
                        return self.build_readiness(why);
                    }
                    Err(why) => return Err(why.into_io_error()),
                }
            }
        };
        if self.inline {
            driver.deliver_direct();
            return Ok(Watcher {
                shared,
                mailbox: mail_rx,
                thread: Mutex::new(None),
                inline: Some(Mutex::new(Some(driver))),
                own_mailbox,
            });
        }
        let cpu = self.cpu;
        let poller_shared = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name("proactor-poller".into())
            .spawn(move || {
                let pinned = cpu.map_or(Ok(()), sys::pin_to_cpu);
                // The engine starts on the thread that drives it (io_uring: the ring's one
                // submitter).
                let started = pinned.and_then(|()| driver.start());
                let ok = started.is_ok();
                let _ = ready_tx.send(started);
                // Dropped after the driver (and its mailbox sender), panic or not, so waiters
                // wake to see the mailbox closed.
                let _end = EndRounds(poller_shared);
                let ran = ok.then(|| catch_unwind(AssertUnwindSafe(|| driver.run())));
                if let Some(Err(_)) = ran {
                    driver.abandon();
                }
                // Dropped here, before `_end`: a captured variable would outlive this body.
                drop(driver);
                if let Some(Err(panic)) = ran {
                    // Re-raised by `close` (the join).
                    std::panic::resume_unwind(panic);
                }
            })?;
        if let Ok(Err(e)) = ready_rx.recv() {
            let _ = thread.join();
            if kind == EngineKind::Uring && choice == Engine::Auto {
                return self.build_readiness(Unavailable::from_setup(&e));
            }
            return Err(e);
        }
        Ok(Watcher {
            shared,
            mailbox: mail_rx,
            thread: Mutex::new(Some(thread)),
            inline: None,
            own_mailbox,
        })
    }
}

/// A poller thread (epoll or kqueue), its command queue and its completion mailbox.
///
/// Register sockets to get [`Conn`] handles, send them [`Cmd`]s, and take the
/// [`Completion`]s from [`wait_io`](Watcher::wait_io) or the [`mailbox`](Watcher::mailbox)
/// receiver. `Watcher` is `Send + Sync`: share it by reference or in an `Arc`.
///
/// Closing (explicitly or by dropping it) completes every pending operation with
/// [`Error::WatcherClosed`], closes every socket and joins the poller thread.
pub struct Watcher {
    shared: Arc<Shared>,
    mailbox: flume::Receiver<Completion>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The driver of an inline watcher, run by whichever thread waits; `None` once closed.
    inline: Option<Mutex<Option<AnyDriver>>>,
    /// The mailbox is this watcher's alone, so its poller's `Rounds` say when it has mail.
    own_mailbox: bool,
}

impl Watcher {
    /// A watcher with the default options (64 KiB internal buffer chunks).
    ///
    /// # Errors
    ///
    /// See [`WatcherBuilder::build`].
    pub fn new() -> io::Result<Watcher> {
        WatcherBuilder::default().build()
    }

    /// Options for a watcher.
    pub fn builder() -> WatcherBuilder {
        WatcherBuilder::default()
    }

    /// Takes ownership of a stream socket ([`TcpStream`](std::net::TcpStream),
    /// [`UnixStream`](std::os::unix::net::UnixStream), or any `SOCK_STREAM` socket as an
    /// [`OwnedFd`]), makes it non-blocking and watches it. Options set before (nodelay,
    /// buffer sizes, keepalive) are kept. A listening socket is taken too: the watcher asks
    /// the kernel whether the socket listens, and a listener then works as with
    /// [`listen`](Watcher::listen).
    ///
    /// Datagram sockets too ([`UdpSocket`](std::net::UdpSocket),
    /// [`UnixDatagram`](std::os::unix::net::UnixDatagram), any `SOCK_DGRAM` socket),
    /// connected or not: there every read completes with one datagram and its sender
    /// ([`Completion::peer`](crate::Completion::peer)), a datagram longer than the buffer
    /// with [`Error::Truncated`], every [`Cmd::Write`] sends one datagram to the connected
    /// peer and [`Cmd::SendTo`] one to an address; the commands of streams (`ReadFull`,
    /// framed reads, `Accept`, `Shutdown`) fail with [`Error::Unsupported`].
    ///
    /// ```no_run
    /// # use proactor::{Cmd, Watcher};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let watcher = Watcher::new()?;
    /// let udp = watcher.register(std::net::UdpSocket::bind("127.0.0.1:9000")?)?;
    /// udp.send(Cmd::ReadInternal)?;
    /// let mut batch = Vec::new();
    /// watcher.wait_io(&mut batch)?;
    /// for c in batch.drain(..) {
    ///     // Echo the datagram to whoever sent it.
    ///     let from = c.peer.clone().expect("a datagram's sender");
    ///     udp.send(Cmd::SendTo(from, c.into_data()))?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::WatcherClosed`] after [`close`](Watcher::close); [`Error::Io`] for something
    /// that cannot be watched: not a socket (`ENOTSOCK`), neither a stream nor a datagram
    /// socket ([`io::ErrorKind::InvalidInput`]), a socket with `SO_LINGER` on and a non-zero
    /// timeout (`InvalidInput`: its close would block the poller thread until the peer
    /// acknowledged everything or the timeout passed; a zero timeout, close with a reset, is
    /// fine), or refused by epoll/kqueue. The error hands the socket back, open
    /// ([`RegisterError::into_socket`]). (The check is made here, once:
    /// `SO_LINGER` set later through a duplicate of the descriptor, on this socket or on a
    /// listener whose accepted sockets inherit it, is not seen, and would block the poller
    /// when such a socket is closed. Linux only: the BSDs do not linger on a non-blocking
    /// close.)
    pub fn register(&self, socket: impl Into<OwnedFd>) -> Result<Conn, RegisterError> {
        self.register_routed(socket.into(), Route::default(), false)
    }

    /// Like [`register`](Watcher::register), but this connection's completions go to `mailbox`
    /// instead of the watcher's: an actor that owns a set of connections (a lobby, a match)
    /// gets its own mailbox. A bounded `mailbox` never blocks the poller (see
    /// [`WatcherBuilder::mailbox`]).
    ///
    /// # Errors
    ///
    /// As [`register`](Watcher::register); also a bounded `mailbox` on an
    /// [`inline`](WatcherBuilder::inline) watcher ([`io::ErrorKind::InvalidInput`]): when it
    /// is full, only the thread driving the watcher could make room, and at `close` that
    /// thread would wait for itself. The error hands the socket back.
    pub fn register_with(
        &self,
        socket: impl Into<OwnedFd>,
        mailbox: flume::Sender<Completion>,
    ) -> Result<Conn, RegisterError> {
        let socket = socket.into();
        if self.inline.is_some() && mailbox.capacity().is_some() {
            let msg = "an inline watcher cannot route completions to a bounded mailbox";
            let e = io::Error::new(io::ErrorKind::InvalidInput, msg);
            return Err(RegisterError::new(e, socket));
        }
        let route = Route {
            mailbox: Some(mailbox),
            spread: None,
        };
        self.register_routed(socket, route, false)
    }

    /// Takes ownership of a listening stream socket ([`TcpListener`](std::net::TcpListener),
    /// [`UnixListener`](std::os::unix::net::UnixListener), or an [`OwnedFd`]) and returns its
    /// handle. Send it [`Cmd::Accept`]: each completes with a new, already registered [`Conn`]
    /// on this watcher and the peer's address ([`Buf::Accepted`](crate::Buf::Accepted)).
    ///
    /// # Accept errors
    ///
    /// A failed accept completes that one [`Cmd::Accept`] with the error ([`Error::Io`]), and
    /// the listener stays usable: send another `Accept`. Any error is reported this way:
    /// `ECONNABORTED`, `EPROTO`, `EPERM` from a firewall rule, the network errors accept(2)
    /// lists, and running out of descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`,
    /// `ENOMEM`). After one of those last four the listener also pauses for 100 ms before it
    /// tries again, so a server out of file descriptors neither spins nor stops: pending
    /// accepts wait, and accepting resumes once descriptors are free. An accepted socket that
    /// cannot be registered (refused by epoll/kqueue, or its watcher closed) is closed, and
    /// its `Accept` completes with that error.
    ///
    /// # Errors
    ///
    /// As [`register`](Watcher::register) (accepted sockets inherit `SO_LINGER` from the
    /// listener, so a lingering listener is refused too), and [`io::ErrorKind::InvalidInput`]
    /// if the socket is not listening (on macOS, which has no `SO_ACCEPTCONN`, a socket
    /// without a peer counts as listening: a stream never connected is taken, and its
    /// accepts fail with `EINVAL`).
    ///
    /// Keep the listener non-blocking: reads and writes pass `MSG_DONTWAIT`, so a duplicate
    /// of a stream's descriptor switched back to blocking mode elsewhere cannot stall the
    /// poller, but `accept` has no such flag. A duplicate of the listener's descriptor
    /// switched to blocking (`set_nonblocking(false)` on a `try_clone`, a forked child)
    /// would block the poller thread in `accept` until a connection arrives.
    pub fn listen(&self, listener: impl Into<OwnedFd>) -> Result<Conn, RegisterError> {
        self.listen_routed(listener.into(), Route::default())
    }

    pub(crate) fn listen_routed(&self, fd: OwnedFd, route: Route) -> Result<Conn, RegisterError> {
        self.register_routed(fd, route, true)
    }

    /// The checks every registration makes, then `adopt`. `listen`: the socket must be a
    /// listener. Either way the poller learns which it is, so that an operation that cannot
    /// succeed on it (an accept on a stream, a read on a listener) fails at once.
    fn register_routed(
        &self,
        fd: OwnedFd,
        route: Route,
        listen: bool,
    ) -> Result<Conn, RegisterError> {
        if self.is_closed() {
            return Err(RegisterError::new(Error::WatcherClosed, fd));
        }
        let checked = sys::prepare_socket(fd.as_fd()).and_then(|kind| match kind {
            sys::SocketKind::Datagram => Ok(Role::Datagram),
            sys::SocketKind::Stream if sys::is_listener(fd.as_fd())? => Ok(Role::Listener),
            sys::SocketKind::Stream => Ok(Role::Stream),
        });
        let role = match checked {
            Ok(role) => role,
            Err(e) => return Err(RegisterError::new(e, fd)),
        };
        if listen && role != Role::Listener {
            let msg = "not a listening socket (call listen() first, or use register)";
            let e = io::Error::new(io::ErrorKind::InvalidInput, msg);
            return Err(RegisterError::new(e, fd));
        }
        self.shared.adopt(fd, None, route, role)
    }

    /// Runs `f` on an inline watcher's driver (unit tests of the driver).
    #[cfg(test)]
    pub(crate) fn with_driver<R>(&self, f: impl FnOnce(&mut AnyDriver) -> R) -> R {
        let slot = self.inline.as_ref().expect("an inline watcher");
        let mut guard = slot.lock().unwrap();
        f(guard.as_mut().expect("an open watcher"))
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Starts a non-blocking TCP connect and returns the new connection's handle at once.
    /// One completion with [`Op::Connect`](crate::Op::Connect) follows: `Ok` once connected,
    /// or the error (`ECONNREFUSED`, `ETIMEDOUT`, `EHOSTUNREACH`, ... as [`Error::Io`];
    /// [`Error::Deadline`] if the [`Connect`] deadline passed first).
    ///
    /// Reads and writes may be sent right away: they wait for the connection. If it fails,
    /// the `Connect` completion carries the cause, and the operations queued behind it
    /// complete with an error too, but not that one (reading the socket's error clears it):
    /// typically writes with `EPIPE` and reads with [`Error::Eof`]. Free the connection after
    /// a failed connect (or just drop its handles).
    ///
    /// # Errors
    ///
    /// Errors known at once, with no completion: [`Error::WatcherClosed`], and [`Error::Io`]
    /// for socket creation (`EMFILE`) or a connect refused on the spot (`ENETUNREACH`,
    /// `EADDRNOTAVAIL`, sometimes `ECONNREFUSED` on loopback).
    pub fn connect(&self, to: impl Into<Connect>) -> Result<Conn, Error> {
        let to = to.into();
        if self.is_closed() {
            return Err(Error::WatcherClosed);
        }
        let fd = sys::start_connect(&to.addr)?;
        // The socket is ours: on failure it is closed with the error.
        Ok(self
            .shared
            .adopt(fd, Some(to), Route::default(), Role::Stream)?)
    }

    /// The mailbox: a `flume::Receiver` of completions. Clone it freely: use it with
    /// `recv`, `try_recv` in a game loop, `flume::Selector` over other channels, or
    /// `recv_async` in async code.
    ///
    /// An [`inline`](WatcherBuilder::inline) watcher's completions do not pass through the
    /// mailbox until it closes: they go straight to the [`wait_io`](Watcher::wait_io) or
    /// [`try_wait_io`](Watcher::try_wait_io) call that drives it. `mailbox().recv()` on an
    /// inline watcher would wait until the watcher is closed; use `wait_io` there.
    pub fn mailbox(&self) -> flume::Receiver<Completion> {
        self.mailbox.clone()
    }

    /// Blocks until at least one completion is ready, then appends every ready one to `out`
    /// (gaio's `WaitIO`, without allocating once `out` has grown). Returns how many.
    ///
    /// It takes whatever is in the mailbox: on a mailbox shared with other watchers (a
    /// [`Pool`](crate::Pool) with one mailbox, or [`WatcherBuilder::mailbox`]) that includes
    /// their completions too. Completions of a connection given its own mailbox
    /// ([`register_with`](Watcher::register_with)) go there, not here.
    ///
    /// # Errors
    ///
    /// [`Error::WatcherClosed`] once the watcher is closed and its mailbox is drained (only
    /// when the mailbox is the watcher's own: a shared one stays open while others send).
    pub fn wait_io(&self, out: &mut Vec<Completion>) -> Result<usize, Error> {
        if let Some(driver) = &self.inline {
            return self.drive(driver, out, None);
        }
        if self.own_mailbox {
            return self.wait_rounds(out, None);
        }
        let first = self.mailbox.recv().map_err(|_| Error::WatcherClosed)?;
        Ok(self.take_ready(first, out))
    }

    /// Inline mode: run the poller on this thread until a completion is ready or `deadline`.
    /// It always runs at least one step (a deadline already past polls once, as
    /// `try_wait_io` does). While another thread drives, a call with a deadline waits for that
    /// thread to stop driving, at most until its deadline, instead of blocking on the lock
    /// for as long as the other thread sleeps in `epoll_wait`.
    fn drive(
        &self,
        driver: &Mutex<Option<AnyDriver>>,
        out: &mut Vec<Completion>,
        deadline: Option<Instant>,
    ) -> Result<usize, Error> {
        let before = out.len();
        let mut stepped = false;
        loop {
            // An inline watcher's mailbox is its own (`build` refuses a shared one) and is
            // posted to only by the driver's shutdown, which `closed` precedes: while the
            // watcher is open the channel (a lock per look) is left alone.
            if self.is_closed() {
                self.try_take(out);
            }
            if out.len() > before {
                return Ok(out.len() - before);
            }
            let due = deadline.is_some_and(|d| Instant::now() >= d);
            if due && stepped {
                return Ok(0);
            }
            let mut guard = match (deadline, driver.try_lock()) {
                (_, Ok(guard)) => guard,
                (_, Err(TryLockError::Poisoned(p))) => p.into_inner(),
                (None, Err(TryLockError::WouldBlock)) => {
                    driver.lock().unwrap_or_else(|p| p.into_inner())
                }
                (Some(_), Err(TryLockError::WouldBlock)) if due => return Ok(0),
                (Some(d), Err(TryLockError::WouldBlock)) => {
                    // Woken by `release_driver` (or a mailbox post at close).
                    let free = || {
                        !matches!(driver.try_lock(), Err(TryLockError::WouldBlock))
                            || !self.mailbox.is_empty()
                    };
                    self.shared.rounds.wait(free, Some(d));
                    continue;
                }
            };
            // Another thread may have driven while we waited for the lock (its shutdown
            // posts to the mailbox, and the lock makes its `closed` visible here).
            if self.is_closed() && !self.mailbox.is_empty() {
                self.release_driver(guard);
                continue;
            }
            let open = step_inline(&mut guard, deadline, out);
            stepped = true;
            self.release_driver(guard);
            match open {
                Ok(true) => {}
                Ok(false) => return Err(Error::WatcherClosed),
                // The driver panicked: it is shut down and the watcher closed (what it could
                // complete is in the mailbox); the panic goes on to the caller.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    }

    /// Unlocks an inline watcher's driver and wakes the threads waiting for it with a
    /// deadline (`drive`); same handshake as a threaded poller's end of round.
    fn release_driver(&self, guard: MutexGuard<'_, Option<AnyDriver>>) {
        drop(guard);
        self.shared.rounds.ended();
    }

    /// A threaded watcher with its own mailbox: take what is there, else sleep until the
    /// poller ends a round (one wake-up per round, not per completion).
    fn wait_rounds(
        &self,
        out: &mut Vec<Completion>,
        deadline: Option<Instant>,
    ) -> Result<usize, Error> {
        loop {
            // Closed before the take: then everything it posted is already in the channel.
            let closed = self.mailbox.is_disconnected();
            let n = self.try_take(out);
            if n > 0 {
                return Ok(n);
            }
            if closed {
                return Err(Error::WatcherClosed);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(0);
            }
            let ready = || !self.mailbox.is_empty() || self.mailbox.is_disconnected();
            self.shared.rounds.wait(ready, deadline);
        }
    }

    /// Like [`wait_io`](Watcher::wait_io) but gives up at `deadline`, returning `Ok(0)`.
    ///
    /// # Errors
    ///
    /// As [`wait_io`](Watcher::wait_io).
    pub fn wait_io_deadline(
        &self,
        out: &mut Vec<Completion>,
        deadline: Instant,
    ) -> Result<usize, Error> {
        if let Some(driver) = &self.inline {
            return self.drive(driver, out, Some(deadline));
        }
        if self.own_mailbox {
            return self.wait_rounds(out, Some(deadline));
        }
        match self.mailbox.recv_deadline(deadline) {
            Ok(first) => Ok(self.take_ready(first, out)),
            Err(flume::RecvTimeoutError::Timeout) => Ok(0),
            Err(flume::RecvTimeoutError::Disconnected) => Err(Error::WatcherClosed),
        }
    }

    /// Like [`wait_io`](Watcher::wait_io) but gives up after `timeout`, returning `Ok(0)`.
    ///
    /// # Errors
    ///
    /// As [`wait_io`](Watcher::wait_io).
    pub fn wait_io_timeout(
        &self,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize, Error> {
        match Instant::now().checked_add(timeout) {
            Some(deadline) => self.wait_io_deadline(out, deadline),
            None => self.wait_io(out),
        }
    }

    /// Appends every completion ready now to `out` without blocking; returns how many.
    ///
    /// An [`inline`](WatcherBuilder::inline) watcher first runs one non-blocking round of the
    /// poller here (unless another thread is driving it right now).
    ///
    /// # Errors
    ///
    /// As [`wait_io`](Watcher::wait_io): [`Error::WatcherClosed`] once the watcher is closed
    /// and its own mailbox is drained (a mailbox shared with other watchers stays open while
    /// they send).
    ///
    /// # Panics
    ///
    /// If the round run here panicked (see [`wait_io`](Watcher::wait_io)).
    pub fn try_wait_io(&self, out: &mut Vec<Completion>) -> Result<usize, Error> {
        let before = out.len();
        if let Some(driver) = &self.inline {
            let guard = match driver.try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut guard) = guard {
                let stepped = step_inline(&mut guard, Some(Instant::now()), out);
                self.release_driver(guard);
                if let Err(panic) = stepped {
                    std::panic::resume_unwind(panic);
                }
            }
        }
        // Disconnected before the take: then everything the shutdown posted is in it.
        let closed = self.mailbox.is_disconnected();
        self.try_take(out);
        match out.len() - before {
            0 if closed => Err(Error::WatcherClosed),
            n => Ok(n),
        }
    }

    fn try_take(&self, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        out.extend(self.mailbox.try_iter());
        out.len() - before
    }

    fn take_ready(&self, first: Completion, out: &mut Vec<Completion>) -> usize {
        out.push(first);
        1 + self.try_take(out)
    }

    /// A snapshot of the poller's counters.
    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.stats.snapshot();
        stats.engine = self.shared.engine;
        stats.uring_unavailable = self.shared.fallback();
        stats
    }

    /// Whether the thread driving this watcher (its poller thread, or for an
    /// [`inline`](WatcherBuilder::inline) watcher the thread inside `wait_io`) is blocked
    /// waiting for an event, a timer or a command, or about to block: it has nothing to do
    /// until then. A diagnostic: a command sent now wakes it (an eventfd write), which is
    /// what tests of that wake-up path wait for before sending.
    pub fn is_asleep(&self) -> bool {
        self.shared.sleeping.load(SeqCst)
    }

    /// Whether [`close`](Watcher::close) was called.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(SeqCst)
    }

    /// Stops the poller: every pending operation and every command still queued completes
    /// with [`Error::WatcherClosed`], every socket is closed, and the poller thread is joined
    /// (by every thread that calls `close`, when several do at once). Later sends fail with
    /// [`SendError::Closed`](crate::SendError::Closed). Idempotent. Completions still waiting
    /// for room in a full bounded channel are handed to a thread that delivers them as room
    /// is made (or drops them once no receiver is left); a channel whose receiver never reads
    /// holds back only its own, and the mailbox disconnects as soon as it is owed nothing.
    ///
    /// # Panics
    ///
    /// If the poller thread panicked (a bug in this crate), `close` re-raises that panic
    /// ([`std::panic::resume_unwind`]). Dropping the watcher does too: it calls `close`,
    /// unless the thread is already panicking.
    pub fn close(&self) {
        self.shared.closed.store(true, SeqCst);
        let _ = self.shared.waker.wake();
        if let Some(driver) = &self.inline {
            // A thread driving it right now sees `closed` and shuts down; otherwise we do.
            let mut guard = driver.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(mut d) = guard.take() {
                d.shutdown();
            }
            self.release_driver(guard);
        }
        // Held across the join: a second `close` racing this one returns only once the
        // poller has exited too.
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = thread.take() {
            // A panic in the poller is a bug in this crate; surface it here rather than hide it.
            if let Err(panic) = handle.join() {
                drop(thread);
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// One step of the inline driver in `slot` (until `deadline`), its direct completions
/// appended to `out`. A driver that shut down is dropped, and its mailbox sender with it,
/// like a finished poller thread. `Ok(false)` if there was no driver (closed). If the step
/// panicked, the driver is abandoned (`Driver::abandon`: the watcher closed, what it could
/// complete posted to the mailbox) and dropped, and the panic is returned for the caller to
/// re-raise once it has released the driver's lock: an inline watcher never steps a driver
/// a panic left half-updated.
fn step_inline(
    slot: &mut Option<AnyDriver>,
    deadline: Option<Instant>,
    out: &mut Vec<Completion>,
) -> Result<bool, Box<dyn Any + Send>> {
    let Some(d) = slot.as_mut() else {
        return Ok(false);
    };
    match catch_unwind(AssertUnwindSafe(|| d.step(deadline))) {
        Ok(running) => {
            d.take_direct(out);
            if !running {
                *slot = None;
            }
            Ok(true)
        }
        Err(panic) => {
            d.abandon();
            *slot = None;
            Err(panic)
        }
    }
}

/// Closes the watcher ([`Watcher::close`]). If the thread is already panicking, it only marks
/// the watcher closed and wakes the poller, without waiting for it.
///
/// # Panics
///
/// As [`Watcher::close`]: if the poller thread panicked (a bug in this crate), dropping the
/// watcher re-raises that panic (not while the thread is already panicking).
impl Drop for Watcher {
    fn drop(&mut self) {
        if !thread::panicking() {
            self.close();
        } else {
            self.shared.closed.store(true, SeqCst);
            let _ = self.shared.waker.wake();
        }
    }
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}
