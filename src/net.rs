//! Outgoing connections ([`Connect`]) and listeners with a backlog fit for bursts.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
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

/// The backlog of the listeners made here. The kernel caps it at its own limit:
/// `net.core.somaxconn` on Linux (4,096 by default since 5.4), `kern.ipc.soacceptqueue` on
/// FreeBSD and `kern.ipc.somaxconn` on macOS (128 by default on both).
const BACKLOG: i32 = 4096;

/// A TCP listener bound to `addr` with `SO_REUSEADDR`, listening with a backlog of 4,096
/// (capped by the kernel's limit). Like `std::net::TcpListener::bind`, it tries each address
/// `addr` resolves to until one binds.
///
/// `std::net::TcpListener::bind` listens with a backlog of 128: a burst of connections that
/// arrives faster than they are accepted overflows that queue, and each connection it drops
/// waits for its client's SYN retransmission, a second or more later. Hand this one to
/// [`Watcher::listen`](crate::Watcher::listen) instead:
///
/// ```no_run
/// # #[allow(dead_code)]
/// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let watcher = proactor::Watcher::new()?;
/// let listener = watcher.listen(proactor::tcp_listener("127.0.0.1:7000")?)?;
/// listener.send(proactor::Cmd::Accept)?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// `addr` resolved to no address, or socket creation, `SO_REUSEADDR`, `bind` or `listen`
/// failed for every address it resolved to (the last error; for example `EADDRINUSE`).
pub fn tcp_listener(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
    let mut last = None;
    for addr in addr.to_socket_addrs()? {
        match sys::listener(&addr, false, BACKLOG) {
            Ok(fd) => return Ok(TcpListener::from(fd)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolved to no address",
        )
    }))
}

/// A TCP listener bound to `addr` with `SO_REUSEADDR` and `SO_REUSEPORT` set
/// (`SO_REUSEPORT_LB` on FreeBSD), listening with a backlog of 4,096 like
/// [`tcp_listener`] (capped by the kernel's limit).
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
    sys::listener(&addr, true, BACKLOG).map(TcpListener::from)
}
