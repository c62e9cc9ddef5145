//! Outgoing connections ([`Connect`]) and `SO_REUSEPORT` listeners.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use crate::sys;

/// Where to connect, with an optional deadline and tag: the argument of
/// [`Watcher::connect`](crate::Watcher::connect). A bare `SocketAddr` converts into one.
///
/// ```no_run
/// # use proactor::{Connect, Watcher};
/// # use std::time::Duration;
/// # #[allow(dead_code)]
/// # fn demo(watcher: &Watcher) -> Result<(), proactor::Error> {
/// let addr = "127.0.0.1:7000".parse().unwrap();
/// let plain = watcher.connect(addr)?;
/// let with_deadline =
///     watcher.connect(Connect::new(addr).timeout(Duration::from_secs(3)).tag(2))?;
/// # drop((plain, with_deadline));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect {
    pub(crate) addr: SocketAddr,
    pub(crate) deadline: Option<Instant>,
    pub(crate) tag: u64,
}

impl Connect {
    /// Connect to `addr`, with no deadline and tag 0.
    pub fn new(addr: SocketAddr) -> Connect {
        Connect {
            addr,
            deadline: None,
            tag: 0,
        }
    }

    /// Give up at `deadline`: the completion reports [`Error::Deadline`](crate::Error::Deadline).
    pub fn deadline(mut self, deadline: Instant) -> Connect {
        self.deadline = Some(deadline);
        self
    }

    /// [`Connect::deadline`] at `now + timeout` (no deadline if that overflows).
    pub fn timeout(mut self, timeout: Duration) -> Connect {
        self.deadline = Instant::now().checked_add(timeout);
        self
    }

    /// A number returned unchanged in the completion (default 0).
    pub fn tag(mut self, tag: u64) -> Connect {
        self.tag = tag;
        self
    }
}

impl From<SocketAddr> for Connect {
    fn from(addr: SocketAddr) -> Connect {
        Connect::new(addr)
    }
}

/// A TCP listener bound to `addr` with `SO_REUSEADDR` and `SO_REUSEPORT` set
/// (`SO_REUSEPORT_LB` on FreeBSD), listening with a backlog of 1,024.
///
/// Bind one per watcher on the same address and give each to its own
/// [`Watcher::listen`](crate::Watcher::listen): the kernel spreads incoming connections over
/// them, so no single acceptor is a bottleneck (gaio recommends go-reuseport for the same).
///
/// # Errors
///
/// Socket creation, an option, `bind` or `listen` failed (for example `EADDRINUSE` when a
/// socket without `SO_REUSEPORT` holds the port).
///
/// # Platform-specific behavior
///
/// Linux balances by a hash of the connection's addresses; macOS accepts the option but gives
/// new connections to one of the sockets without balancing.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    sys::reuseport_listener(&addr, 1024).map(TcpListener::from)
}
