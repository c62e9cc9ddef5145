//! [`Pool`]: several watchers used as one, to spread connections over every core.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::shared::{Route, Spread};
use crate::sys;
use crate::{Completion, Conn, Mailbox, RegisterError, Watcher, WatcherBuilder};

/// Options for a [`Pool`].
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    watchers: usize,
    shared_mailbox: bool,
    pin: bool,
    options: WatcherBuilder,
}

impl PoolBuilder {
    /// How many watchers, each with its own poller thread (default: one per available CPU).
    pub fn watchers(mut self, n: usize) -> Self {
        self.watchers = n.max(1);
        self
    }

    /// Give every watcher its own mailbox (default: one mailbox shared by all, so any number
    /// of worker threads can take completions from it; flume is MPMC). Per-watcher mailboxes
    /// suit thread affinity: one game shard or one loop thread per watcher, and a pool of
    /// [`inline`](WatcherBuilder::inline) watchers needs them (its `build` refuses a shared
    /// mailbox).
    pub fn per_watcher_mailboxes(mut self) -> Self {
        self.shared_mailbox = false;
        self
    }

    /// Pin watcher `i`'s poller to the `i % n`-th of the `n` CPUs the building thread may run
    /// on (its affinity mask, which `taskset` or a cgroup cpuset narrows; default: not
    /// pinned).
    ///
    /// # Platform-specific behavior
    ///
    /// Linux and Android only; elsewhere [`build`](Self::build) fails.
    pub fn pin_pollers(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    /// Options for each watcher (buffer size, bounds). A mailbox or CPU set there is
    /// replaced by the pool's own choice.
    pub fn watcher_options(mut self, options: WatcherBuilder) -> Self {
        self.options = options;
        self
    }

    /// Creates the watchers and starts their pollers.
    ///
    /// # Errors
    ///
    /// As [`WatcherBuilder::build`]; watchers already started are closed.
    pub fn build(self) -> io::Result<Pool> {
        // The CPUs this thread may run on: under a cpuset, CPU `i` may not be one of them.
        let cpus = if self.pin {
            let cpus = sys::allowed_cpus()?;
            if cpus.is_empty() {
                let msg = "none of the CPUs this thread may run on can be pinned to";
                return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
            }
            Some(cpus)
        } else {
            None
        };
        let shared = self.shared_mailbox.then(Mailbox::unbounded);
        let mut watchers = Vec::with_capacity(self.watchers);
        for i in 0..self.watchers {
            let mut options = self.options.clone().without_mailbox_or_cpu();
            if let Some(mailbox) = &shared {
                options = options.mailbox(mailbox);
            }
            if let Some(cpus) = &cpus {
                options = options.poller_cpu(cpus[i % cpus.len()]);
            }
            watchers.push(options.build()?);
        }
        let spread = Arc::new(Spread::new(
            watchers.iter().map(|w| w.shared().clone()).collect(),
        ));
        let mailbox = shared.map(|m| m.receiver().clone());
        Ok(Pool {
            watchers,
            spread,
            mailbox,
        })
    }
}

/// Several [`Watcher`]s used as one: connections are spread over them, and their completions
/// go to one shared mailbox (default) or to each watcher's own.
///
/// ```
/// use proactor::{Cmd, Op, Pool};
/// use std::net::{TcpListener, TcpStream};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::builder().watchers(2).build()?;
/// let std_listener = TcpListener::bind("127.0.0.1:0")?;
/// let addr = std_listener.local_addr()?;
/// let listener = pool.listen(std_listener)?; // accepted conns go to the least-loaded watcher
/// listener.send(Cmd::Accept)?;
/// let _client = TcpStream::connect(addr)?;
///
/// let mailbox = pool.mailbox().expect("one mailbox shared by every watcher");
/// let c = mailbox.recv()?; // any thread may take from it
/// assert_eq!(c.op, Op::Accept);
/// let (conn, _peer) = c.buf.into_accepted().expect("accepted");
/// conn.send(Cmd::ReadInternal)?;
/// # Ok(()) }
/// ```
pub struct Pool {
    watchers: Vec<Watcher>,
    spread: Arc<Spread>,
    /// The shared mailbox; `None` with per-watcher mailboxes.
    mailbox: Option<flume::Receiver<Completion>>,
}

impl Pool {
    /// A pool with the default options: one watcher per available CPU, one shared mailbox.
    ///
    /// # Errors
    ///
    /// As [`WatcherBuilder::build`].
    pub fn new() -> io::Result<Pool> {
        Pool::builder().build()
    }

    /// Options for a pool.
    pub fn builder() -> PoolBuilder {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        PoolBuilder {
            watchers: cpus,
            shared_mailbox: true,
            pin: false,
            options: WatcherBuilder::default(),
        }
    }

    /// The watchers, in order.
    pub fn watchers(&self) -> &[Watcher] {
        &self.watchers
    }

    /// The shared mailbox, or `None` for a pool built with
    /// [`per_watcher_mailboxes`](PoolBuilder::per_watcher_mailboxes): each watcher's
    /// completions are then in its own [`Watcher::mailbox`], taken with its
    /// [`wait_io`](Watcher::wait_io).
    pub fn mailbox(&self) -> Option<flume::Receiver<Completion>> {
        self.mailbox.clone()
    }

    /// The watcher with the fewest connections (ties round-robin).
    pub fn least_loaded(&self) -> &Watcher {
        &self.watchers[self.spread.pick()]
    }

    /// Registers a stream socket on the least-loaded watcher. See [`Watcher::register`].
    ///
    /// # Errors
    ///
    /// As [`Watcher::register`].
    pub fn register(&self, socket: impl Into<OwnedFd>) -> Result<Conn, RegisterError> {
        self.least_loaded().register(socket)
    }

    /// Registers a listening socket on the first watcher; each connection it accepts is
    /// registered on the least-loaded watcher of the pool. See [`Watcher::listen`].
    ///
    /// For one listener per watcher instead (the kernel balancing), bind several with
    /// [`reuseport_listener`](crate::reuseport_listener) and give each to
    /// [`Watcher::listen`] on its own watcher: accepted connections then stay on the
    /// accepting watcher.
    ///
    /// # Errors
    ///
    /// As [`Watcher::listen`].
    pub fn listen(&self, listener: impl Into<OwnedFd>) -> Result<Conn, RegisterError> {
        let route = Route {
            mailbox: None,
            spread: Some(self.spread.clone()),
        };
        self.watchers[0].listen_routed(listener.into(), route)
    }

    /// Closes every watcher (see [`Watcher::close`]).
    ///
    /// # Panics
    ///
    /// As [`Watcher::close`]: if a poller thread panicked (a bug in this crate), that panic is
    /// re-raised, and the watchers after it are not closed by this call.
    pub fn close(&self) {
        for w in &self.watchers {
            w.close();
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("watchers", &self.watchers.len())
            .finish()
    }
}
