//! [`Completion`]: what the poller posts to the mailbox when an operation finishes.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use bytes::Bytes;

use crate::{Conn, Error, Frames, PeerAddr};

/// Which kind of operation a [`Completion`] finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// [`Cmd::Read`](crate::Cmd::Read) or [`Cmd::ReadInternal`](crate::Cmd::ReadInternal).
    Read,
    /// [`Cmd::ReadFull`](crate::Cmd::ReadFull).
    ReadFull,
    /// [`Cmd::ReadFrame`](crate::Cmd::ReadFrame).
    ReadFrame,
    /// [`Cmd::ReadFrames`](crate::Cmd::ReadFrames).
    ReadFrames,
    /// [`Cmd::Write`](crate::Cmd::Write).
    Write,
    /// [`Cmd::SendTo`](crate::Cmd::SendTo).
    SendTo,
    /// [`Cmd::WriteAll`](crate::Cmd::WriteAll).
    WriteAll,
    /// [`Cmd::Free`](crate::Cmd::Free).
    Free,
    /// [`Cmd::Detach`](crate::Cmd::Detach).
    Detach,
    /// [`Cmd::Accept`](crate::Cmd::Accept).
    Accept,
    /// [`Cmd::Shutdown`](crate::Cmd::Shutdown).
    Shutdown,
    /// A connection started by [`Watcher::connect`](crate::Watcher::connect).
    Connect,
    /// A TLS handshake: [`Cmd::TlsAccept`](crate::Cmd::TlsAccept) or
    /// [`Cmd::TlsConnect`](crate::Cmd::TlsConnect).
    #[cfg(feature = "tls")]
    Tls,
}

/// A buffer handed back to its owner, whatever the outcome.
#[derive(Debug, Default)]
#[non_exhaustive]
pub enum Buf {
    /// No buffer: a free, a shutdown, a connect, an accept or detach that failed, or an
    /// internal read that ended before any byte arrived.
    #[default]
    None,
    /// The caller's buffer of a `Read` or `ReadFull`, at its original length.
    Vec(Vec<u8>),
    /// A `Write`'s buffer, exactly the bytes an internal read got (a slice of the arena), or
    /// a frame.
    Bytes(Bytes),
    /// The frames of a [`Cmd::ReadFrames`](crate::Cmd::ReadFrames), in order.
    Frames(Frames),
    /// The buffers of a [`Cmd::WriteAll`](crate::Cmd::WriteAll), in the same `Vec`.
    Many(Vec<Bytes>),
    /// The socket handed back by [`Cmd::Detach`](crate::Cmd::Detach), and the bytes the
    /// watcher had already taken from it that no read consumed (the rest of a frame begun,
    /// say): they come before anything still in the socket. `n` is their length.
    Fd(OwnedFd, Bytes),
    /// A connection from [`Cmd::Accept`](crate::Cmd::Accept), already registered, and its
    /// peer's address (`None` for Unix-domain listeners).
    Accepted(Conn, Option<SocketAddr>),
    /// What a finished TLS handshake negotiated ([`Op::Tls`]).
    #[cfg(feature = "tls")]
    Tls(Box<crate::tls::TlsInfo>),
}

impl Buf {
    /// The bytes held (the whole caller buffer for `Vec`; a detached socket's unread bytes
    /// for `Fd`; empty for `None`, `Accepted` and `Frames`: see [`Buf::frames`]).
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Vec(v) => v,
            Buf::Bytes(b) | Buf::Fd(_, b) => b,
            Buf::None | Buf::Accepted(..) | Buf::Frames(_) | Buf::Many(_) => &[],
            #[cfg(feature = "tls")]
            Buf::Tls(_) => &[],
        }
    }

    /// The frames of a `ReadFrames` (none otherwise).
    #[inline]
    pub fn frames(&self) -> &Frames {
        static NONE: Frames = Frames::NONE;
        match self {
            Buf::Frames(f) => f,
            _ => &NONE,
        }
    }

    /// The buffers of a `WriteAll`, if this is one (clear the `Vec` to reuse it).
    #[inline]
    pub fn into_many(self) -> Option<Vec<Bytes>> {
        match self {
            Buf::Many(v) => Some(v),
            _ => None,
        }
    }

    /// The frames of a `ReadFrames`, if this is one.
    #[inline]
    pub fn into_frames(self) -> Option<Frames> {
        match self {
            Buf::Frames(f) => Some(f),
            _ => None,
        }
    }

    /// The caller's `Vec` back, if this is one.
    #[inline]
    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self {
            Buf::Vec(v) => Some(v),
            _ => None,
        }
    }

    /// The whole buffer as [`Bytes`] (a `Vec` is converted without copying; a detached
    /// socket gives its unread bytes; the others give empty).
    ///
    /// For a read into a caller's `Vec` that is the whole `Vec`, not just the bytes read: use
    /// [`Completion::into_data`] for those.
    #[inline]
    pub fn into_bytes(self) -> Bytes {
        match self {
            Buf::Vec(v) => Bytes::from(v),
            Buf::Bytes(b) | Buf::Fd(_, b) => b,
            Buf::None | Buf::Accepted(..) | Buf::Frames(_) | Buf::Many(_) => Bytes::new(),
            #[cfg(feature = "tls")]
            Buf::Tls(_) => Bytes::new(),
        }
    }

    /// What a finished TLS handshake negotiated, if this is the completion of one.
    #[cfg(feature = "tls")]
    #[inline]
    pub fn into_tls(self) -> Option<Box<crate::tls::TlsInfo>> {
        match self {
            Buf::Tls(info) => Some(info),
            _ => None,
        }
    }

    /// The accepted connection and its peer's address, if this is one.
    #[inline]
    pub fn into_accepted(self) -> Option<(Conn, Option<SocketAddr>)> {
        match self {
            Buf::Accepted(conn, peer) => Some((conn, peer)),
            _ => None,
        }
    }

    /// The detached socket, if this is one, dropping the bytes already taken from it that
    /// no read consumed: use [`Buf::into_detached`] where a read may have begun a frame.
    #[inline]
    pub fn into_fd(self) -> Option<OwnedFd> {
        self.into_detached().map(|(fd, _)| fd)
    }

    /// The detached socket and the bytes already taken from it that no read consumed, which
    /// come before anything still in the socket (empty unless framed reads, or a receive
    /// larger than the reads that asked for it, left some).
    ///
    /// ```no_run
    /// # use proactor::Completion;
    /// # #[allow(dead_code)]
    /// # fn demo(c: Completion) {
    /// if let Some((fd, unread)) = c.buf.into_detached() {
    ///     let mut stream = std::net::TcpStream::from(fd);
    ///     // `unread` first, then whatever `stream` reads.
    /// #   let _ = (&mut stream, unread);
    /// }
    /// # }
    /// ```
    #[inline]
    pub fn into_detached(self) -> Option<(OwnedFd, Bytes)> {
        match self {
            Buf::Fd(fd, unread) => Some((fd, unread)),
            _ => None,
        }
    }
}

/// The one message every accepted command produces when it finishes.
///
/// `n` is how many bytes moved, also when `result` is an error (a deadline or reset halfway
/// through a write, a short `ReadFull` at end of stream). The buffer always comes back.
#[must_use = "a completion carries the buffer and the outcome of an operation"]
#[derive(Debug)]
#[non_exhaustive]
pub struct Completion {
    /// The connection the operation ran on.
    pub conn: Conn,
    /// Which operation finished.
    pub op: Op,
    /// The tag given with [`Cmd::tag`](crate::Cmd::tag), unchanged (0 if none).
    pub tag: u64,
    /// The operation's buffer, handed back.
    pub buf: Buf,
    /// Bytes read or written, also on error.
    pub n: usize,
    /// `Ok(())` if the operation did all it was asked; otherwise why it stopped.
    pub result: Result<(), Error>,
    /// On a datagram socket: who sent the datagram a read received, or where a
    /// [`Cmd::SendTo`](crate::Cmd::SendTo) sent one. `None` for everything else.
    pub peer: Option<PeerAddr>,
}

impl Completion {
    /// The bytes this operation moved: `buf[..n]`.
    #[inline]
    pub fn data(&self) -> &[u8] {
        let s = self.buf.as_slice();
        &s[..self.n.min(s.len())]
    }

    /// The bytes this operation moved, `buf[..n]`, as [`Bytes`], without copying: exactly
    /// what a read got, whichever kind of read it was (for a [`Cmd::Read`](crate::Cmd::Read)
    /// into a `Vec`, its first `n` bytes, not the rest of its length), or what a write wrote
    /// (all of it, unless it ended early). Empty for operations that move no bytes.
    ///
    /// It gives the `Vec` of a read up; to reuse it for the next read, take
    /// [`Buf::into_vec`] (the whole `Vec`, at its original length) instead.
    ///
    /// ```no_run
    /// # use proactor::{Cmd, Completion, Op};
    /// # #[allow(dead_code)]
    /// # fn demo(c: Completion) -> Result<(), proactor::SendError> {
    /// if c.op == Op::Read && c.is_ok() {
    ///     // Echo what was read: no copy for either kind of read.
    ///     c.conn.clone().send(Cmd::Write(c.into_data()))?;
    /// }
    /// # Ok(()) }
    /// ```
    #[inline]
    pub fn into_data(self) -> Bytes {
        let n = self.n;
        match self.buf {
            Buf::Vec(mut v) => {
                v.truncate(n);
                Bytes::from(v)
            }
            Buf::Bytes(mut b) | Buf::Fd(_, mut b) => {
                b.truncate(n);
                b
            }
            Buf::None | Buf::Accepted(..) | Buf::Frames(_) | Buf::Many(_) => Bytes::new(),
            #[cfg(feature = "tls")]
            Buf::Tls(_) => Bytes::new(),
        }
    }

    /// Whether the operation did everything it was asked.
    #[inline]
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }

    /// Whether a read stopped at end of stream.
    #[inline]
    pub fn is_eof(&self) -> bool {
        matches!(self.result, Err(Error::Eof))
    }
}

/// A completion channel that several watchers post into: the one argument of
/// [`WatcherBuilder::mailbox`](crate::WatcherBuilder::mailbox), so that its sender and
/// receiver are always two ends of one channel. Clones share the channel.
///
/// ```
/// use proactor::{Mailbox, Watcher};
///
/// # fn main() -> std::io::Result<()> {
/// let mailbox = Mailbox::unbounded();
/// let a = Watcher::builder().mailbox(&mailbox).build()?;
/// let b = Watcher::builder().mailbox(&mailbox).build()?;
/// // Completions of both arrive here (flume is MPMC: any number of threads may take).
/// let rx = mailbox.receiver().clone();
/// # drop((a, b, rx));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Mailbox {
    tx: flume::Sender<Completion>,
    rx: flume::Receiver<Completion>,
}

impl Mailbox {
    /// An unbounded channel: the poller never waits for room.
    pub fn unbounded() -> Mailbox {
        let (tx, rx) = flume::unbounded();
        Mailbox { tx, rx }
    }

    /// A channel that holds at most `capacity` completions (0: a rendezvous channel, each
    /// completion handed over as a receiver takes it). When it is full the poller keeps
    /// further completions in order, without blocking and without polling, until a receiver
    /// makes room; they count as in flight for their connections meanwhile, so
    /// [`max_ops_per_conn`](crate::WatcherBuilder::max_ops_per_conn) bounds them.
    pub fn bounded(capacity: usize) -> Mailbox {
        let (tx, rx) = flume::bounded(capacity);
        Mailbox { tx, rx }
    }

    /// The receiving end: `recv`, `try_recv`, `flume::Selector`, `recv_async`.
    pub fn receiver(&self) -> &flume::Receiver<Completion> {
        &self.rx
    }

    pub(crate) fn into_parts(self) -> (flume::Sender<Completion>, flume::Receiver<Completion>) {
        (self.tx, self.rx)
    }
}
