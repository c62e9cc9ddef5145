//! [`PeerAddr`]: where a datagram came from, or where one goes.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};

/// The address of a datagram socket's peer: the sender of a datagram a read received
/// ([`Completion::peer`](crate::Completion::peer)), or where a
/// [`Cmd::SendTo`](crate::Cmd::SendTo) sends one.
///
/// An IP address converts into one (`SocketAddr`, `SocketAddrV4`, `SocketAddrV6`), and so
/// does a path (`&Path`, `PathBuf`) for Unix datagram sockets.
///
/// ```
/// # use proactor::PeerAddr;
/// let ip: PeerAddr = "127.0.0.1:9000".parse::<std::net::SocketAddr>().unwrap().into();
/// assert_eq!(ip.ip(), Some("127.0.0.1:9000".parse().unwrap()));
/// let unix = PeerAddr::from(std::path::Path::new("/tmp/game.sock"));
/// assert_eq!(unix.ip(), None);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerAddr {
    /// An IPv4 or IPv6 address and port.
    Ip(SocketAddr),
    /// A Unix datagram socket bound to a path in the file system.
    Unix(PathBuf),
    /// A Unix datagram socket bound to a name in Linux's abstract namespace (the name,
    /// without the leading zero byte).
    UnixAbstract(Vec<u8>),
    /// A Unix datagram socket that is not bound to any name: it can send, but cannot be
    /// answered by address.
    UnixUnnamed,
}

impl PeerAddr {
    /// The IP address, if this is one.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            PeerAddr::Ip(a) => Some(*a),
            _ => None,
        }
    }

    /// The path, if this is a Unix socket bound to one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            PeerAddr::Unix(p) => Some(p),
            _ => None,
        }
    }
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Ip(a) => write!(f, "{a}"),
            PeerAddr::Unix(p) => write!(f, "{}", p.display()),
            PeerAddr::UnixAbstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
            PeerAddr::UnixUnnamed => f.write_str("(unnamed)"),
        }
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> PeerAddr {
        PeerAddr::Ip(a)
    }
}

impl From<SocketAddrV4> for PeerAddr {
    fn from(a: SocketAddrV4) -> PeerAddr {
        PeerAddr::Ip(a.into())
    }
}

impl From<SocketAddrV6> for PeerAddr {
    fn from(a: SocketAddrV6) -> PeerAddr {
        PeerAddr::Ip(a.into())
    }
}

impl From<&Path> for PeerAddr {
    fn from(p: &Path) -> PeerAddr {
        PeerAddr::Unix(p.to_path_buf())
    }
}

impl From<PathBuf> for PeerAddr {
    fn from(p: PathBuf) -> PeerAddr {
        PeerAddr::Unix(p)
    }
}
