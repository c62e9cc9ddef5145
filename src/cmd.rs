//! [`Cmd`]: what a user asks a connection to do.

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::completion::{Buf, Op};
use crate::{Framing, PeerAddr};

/// A command for one connection: read, read-full, write, accept, shutdown, free or detach,
/// with an optional deadline, idle timeout and user tag. (A connect is no command: it is
/// started by [`Watcher::connect`](crate::Watcher::connect).)
///
/// The constructors are named like enum variants so a submission reads as what it does:
///
/// ```no_run
/// # use proactor::{Cmd, Conn};
/// # use std::time::Duration;
/// # #[allow(dead_code)]
/// # fn demo(conn: &Conn) -> Result<(), proactor::SendError> {
/// conn.send(Cmd::Write("hello\n"))?;                        // anything Into<Bytes>
/// conn.send(Cmd::Read(vec![0; 4096]).timeout(Duration::from_secs(5)).tag(7))?;
/// conn.send(Cmd::ReadInternal)?;                             // the watcher's shared arena
/// conn.send(Cmd::ReadFull(vec![0; 16]))?;                    // exactly 16 bytes
/// conn.send(Cmd::Free)?;
/// # Ok(()) }
/// ```
///
/// Every command [`Conn::send`](crate::Conn::send) accepts yields exactly one
/// [`Completion`](crate::Completion), which carries the buffer back.
pub struct Cmd {
    pub(crate) kind: Kind,
    pub(crate) deadline: Option<Instant>,
    pub(crate) idle: Option<Duration>,
    pub(crate) tag: u64,
}

pub(crate) enum Kind {
    Read(Vec<u8>),
    ReadInternal,
    ReadFull(Vec<u8>),
    Write(Bytes),
    /// Buffers written one after the other, and their total length.
    WriteAll(Vec<Bytes>, usize),
    /// A datagram to an address (boxed: rarer than the others, and the address is as large
    /// as the rest of an operation).
    SendTo(Bytes, Box<PeerAddr>),
    ReadFrame(Framing),
    /// Up to this many frames (at least 1).
    ReadFrames(Framing, u32),
    Free,
    Detach,
    Accept,
    Shutdown,
    /// Internal: the first operation of a connection made by `Watcher::connect`.
    Connect,
    /// `TlsAccept` or `TlsConnect` (boxed: rare, and a client's server name is large).
    #[cfg(feature = "tls")]
    TlsStart(Box<TlsStart>),
}

/// Which side of a TLS session a `Kind::TlsStart` starts.
#[cfg(feature = "tls")]
pub(crate) enum TlsStart {
    Accept(std::sync::Arc<rustls::ServerConfig>),
    Connect(
        std::sync::Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    ),
}

const fn plain(kind: Kind) -> Cmd {
    Cmd {
        kind,
        deadline: None,
        idle: None,
        tag: 0,
    }
}

#[allow(non_snake_case, non_upper_case_globals)]
impl Cmd {
    /// Reads at least one byte into `buf[..]` (its length, not its capacity). The completion
    /// gives `buf` back with the bytes in `buf[..n]`; end of stream is [`Error::Eof`] with
    /// `n == 0`.
    ///
    /// [`Error::Eof`]: crate::Error::Eof
    #[inline]
    pub fn Read(buf: Vec<u8>) -> Cmd {
        plain(Kind::Read(buf))
    }

    /// Reads at least one byte into the watcher's internal arena. The completion's buffer is a
    /// [`Buf::Bytes`] of exactly the bytes read: a reference-counted slice that stays valid for
    /// as long as it is held. A connection waiting this way holds no buffer of its own.
    pub const ReadInternal: Cmd = plain(Kind::ReadInternal);

    /// Fills all of `buf[..]`. It completes early on end of stream, deadline, idle timeout,
    /// error, `Free` or `Detach` ([`Error::Freed`](crate::Error::Freed)) or a closed watcher
    /// ([`Error::WatcherClosed`](crate::Error::WatcherClosed)), with the bytes read so far in
    /// `buf[..n]` ([`Completion::n`](crate::Completion::n)).
    #[inline]
    pub fn ReadFull(buf: Vec<u8>) -> Cmd {
        plain(Kind::ReadFull(buf))
    }

    /// Reads exactly one frame, cut by `framing` (lines, length-prefixed frames, a decoder of
    /// your own): the completion's buffer is [`Buf::Bytes`] of the frame's bytes (without its
    /// delimiter or header), a slice of the arena where the frame arrived in one read (no
    /// copy), `n` its length.
    ///
    /// Bytes read past the frame stay with the connection and are served first by its next
    /// read of any kind, in order, so a protocol can switch framings mid-stream (lines of
    /// headers, then a body of known length with [`Cmd::ReadFull`]). Deadlines and idle
    /// timeouts apply per frame.
    ///
    /// # Errors (in the completion)
    ///
    /// - [`Error::FrameTooLong`](crate::Error::FrameTooLong) as soon as the bytes that prove
    ///   a frame longer than [`Framing::max`] arrived: the `max + 1` bytes of a line without
    ///   its delimiter, or a length prefix announcing more; they are dropped (with a length
    ///   prefix, the rest of that frame is still in the stream: free the connection, or skip
    ///   it with a read of your own). The connection stays usable.
    /// - [`Error::BadFrame`](crate::Error::BadFrame) when the bytes can never be a frame (a
    ///   negative length, a decoder's `Invalid`, a decoder that panicked); the bytes buffered
    ///   for the frame are dropped.
    /// - [`Error::Eof`](crate::Error::Eof) at end of stream, with the partial frame's bytes
    ///   (if any) in the buffer and `n`.
    ///
    /// Refused on datagram sockets. A peer that trickles one byte at a time cannot make the
    /// poller hold more than the maximum frame length for it.
    #[inline]
    pub fn ReadFrame(framing: Framing) -> Cmd {
        plain(Kind::ReadFrame(framing))
    }

    /// Reads every whole frame already received, at most `max` (at least one: it completes
    /// once one is there), for small frames, where a completion per frame would cost more
    /// than the frame: the completion's buffer is [`Buf::Frames`], `n` their total length.
    /// As [`Cmd::ReadFrame`] otherwise; an error after some frames completes with those
    /// frames, and the next framed read meets the error.
    #[inline]
    pub fn ReadFrames(framing: Framing, max: usize) -> Cmd {
        let max = max.clamp(1, u32::MAX as usize) as u32;
        plain(Kind::ReadFrames(framing, max))
    }

    /// Writes every byte of `buf` (a `Vec<u8>`, `&'static [u8]`, `&'static str`, `String`,
    /// `Bytes`...). Writes queued on one connection go out in order, several per `writev`.
    ///
    /// On a TLS connection (the `tls` feature) the bytes are encrypted on the poller thread
    /// and the write completes once its last record was sent; if a deadline ends it first,
    /// `n` counts the bytes given to the TLS session, which may be more than the peer got.
    pub fn Write(buf: impl Into<Bytes>) -> Cmd {
        plain(Kind::Write(buf.into()))
    }

    /// Writes every byte of every buffer of `bufs`, in order, as one operation with one
    /// completion: for a server that queues messages for a connection while a write is in
    /// flight, then hands over the lot (a chat line shared by many connections stays one
    /// `Bytes`, no copy). The buffers go out gathered, many per `writev`/`sendmsg`. The
    /// completion's buffer is [`Buf::Many`] (the same `Vec`, for its allocation to be
    /// reused), `n` the bytes written, also when it ends early.
    ///
    /// ```no_run
    /// # use proactor::{bytes::Bytes, Cmd, Conn};
    /// # #[allow(dead_code)]
    /// # fn demo(conn: &Conn, queued: &mut Vec<Bytes>) -> Result<(), proactor::SendError> {
    /// conn.send(Cmd::WriteAll(std::mem::take(queued)))?;
    /// # Ok(()) }
    /// ```
    ///
    /// Refused on datagram sockets ([`Error::Unsupported`](crate::Error::Unsupported)): there
    /// each `Write` is one datagram. An empty `bufs` (or only empty buffers) is refused as an
    /// empty write is ([`SendError::EmptyBuffer`](crate::SendError::EmptyBuffer)).
    pub fn WriteAll(bufs: Vec<Bytes>) -> Cmd {
        let len = bufs.iter().map(Bytes::len).sum();
        plain(Kind::WriteAll(bufs, len))
    }

    /// Sends `buf` as one datagram to `to`, on a datagram socket that is not connected (a
    /// `UdpSocket`, a `UnixDatagram`): `SendTo(addr, "ping")`. The completion gives the
    /// buffer back, and the address in [`Completion::peer`](crate::Completion::peer).
    ///
    /// Datagrams queued on one socket go out in order, one datagram per command (several
    /// per system call: `sendmmsg`), never merged. An empty `buf` is an empty datagram.
    ///
    /// # Errors (in the completion)
    ///
    /// The system call's, for this datagram alone: `EMSGSIZE` (larger than the socket can
    /// send), `EISCONN` on a connected socket (use [`Cmd::Write`]), `ECONNREFUSED` when an
    /// ICMP error of an earlier datagram came back; [`Error::Unsupported`] on a stream.
    ///
    /// [`Error::Unsupported`]: crate::Error::Unsupported
    pub fn SendTo(to: impl Into<PeerAddr>, buf: impl Into<Bytes>) -> Cmd {
        plain(Kind::SendTo(buf.into(), Box::new(to.into())))
    }

    /// Closes the connection now: pending operations complete with
    /// [`Error::Freed`](crate::Error::Freed), then this command completes, and the peer sees
    /// end of stream (unless another process holds the socket too). But if input the peer
    /// sent is still unread, closing sends a reset instead: the peer gets `ECONNRESET`, and
    /// bytes still on their way to it may be lost. For a graceful close, see
    /// [`Cmd::Shutdown`]. Later sends on any handle of the connection fail with
    /// [`SendError::Freed`](crate::SendError::Freed).
    pub const Free: Cmd = plain(Kind::Free);

    /// Like [`Cmd::Free`] but hands the socket back instead of closing it: the completion's
    /// buffer is [`Buf::Fd`], deregistered and still non-blocking, ready to be registered on
    /// another watcher or sent to another process. Bytes the peer sent and nobody read yet
    /// stay in the socket, except those the watcher had already taken from it (the start of
    /// a frame a [`Cmd::ReadFrame`] waited to complete, say): they come back in the
    /// completion, as [`Buf::Fd`]'s bytes and `n` (see
    /// [`Buf::into_detached`](crate::Buf::into_detached)).
    ///
    /// A TLS connection's session (the `tls` feature) stays behind: the socket comes back
    /// in the middle of a TLS stream nobody can continue, so detach before TLS starts.
    pub const Detach: Cmd = plain(Kind::Detach);

    /// Accepts one connection on a listener registered with
    /// [`Watcher::listen`](crate::Watcher::listen) (or [`register`](crate::Watcher::register)).
    /// The completion's buffer is [`Buf::Accepted`]: the new connection, already registered
    /// (on the same watcher; for [`Pool::listen`](crate::Pool::listen), on the pool's
    /// least-loaded one), and the peer's address. Several accepts may be outstanding; each
    /// completes once, in order.
    /// Sent to a connection that is not listening, it completes with the OS's `EINVAL`.
    pub const Accept: Cmd = plain(Kind::Accept);

    /// Shuts down the sending side (`shutdown(SHUT_WR)`) once every write queued before it
    /// has completed (written, or ended early by its deadline, idle timeout or an error): the
    /// peer reads end of stream, and reads on this side go on. After a write that ended early
    /// the peer sees a truncated stream, then end of stream. The graceful close: write the
    /// last bytes, `Shutdown`, read until [`Error::Eof`](crate::Error::Eof), then
    /// [`Cmd::Free`], so unread input does not make the kernel reset the connection.
    ///
    /// On a TLS connection (the `tls` feature) it first sends `close_notify`, the TLS
    /// stream's end, and shuts the sending side once that went out.
    pub const Shutdown: Cmd = plain(Kind::Shutdown);

    /// Starts TLS as the server on this stream connection (the `tls` feature) and completes
    /// once the handshake is done: [`Op::Tls`], its buffer a [`Buf::Tls`] with what was
    /// negotiated (ALPN, the client's certificates if it sent any).
    ///
    /// TLS starts where the command stands in the stream: writes sent before it go out in
    /// plaintext first (it waits for them, as [`Cmd::Shutdown`] does), then the handshake
    /// runs, then every later read and write carries plaintext that the poller decrypts and
    /// encrypts (STARTTLS: plaintext lines, then `TlsAccept`). Bytes the watcher received
    /// before it but no read took are the first bytes of the handshake, and a read still
    /// pending when it starts gets decrypted bytes. Writes sent after it wait for the
    /// handshake.
    ///
    /// A deadline ([`Cmd::timeout`]) bounds the handshake: a peer that stalls it gets
    /// [`Error::Deadline`](crate::Error::Deadline), and the session is over (later reads and
    /// writes complete with [`Error::Tls`](crate::Error::Tls); free the connection). Failures
    /// ([`Error::Tls`](crate::Error::Tls): not TLS, a refused certificate, an alert) complete
    /// it, and every operation pending, with that error. Refused on datagram sockets and
    /// listeners ([`Error::Unsupported`](crate::Error::Unsupported)).
    #[cfg(feature = "tls")]
    pub fn TlsAccept(config: std::sync::Arc<rustls::ServerConfig>) -> Cmd {
        plain(Kind::TlsStart(Box::new(TlsStart::Accept(config))))
    }

    /// Starts TLS as the client of `server_name` on this stream connection (the `tls`
    /// feature): the certificate the server presents must be valid for that name. As
    /// [`Cmd::TlsAccept`] otherwise; the completion's [`Buf::Tls`] has the server's
    /// certificates and the ALPN protocol chosen.
    ///
    /// ```no_run
    /// # use proactor::{Cmd, Conn};
    /// # use proactor::rustls::{pki_types::ServerName, ClientConfig};
    /// # use std::{sync::Arc, time::Duration};
    /// # #[allow(dead_code)]
    /// # fn demo(conn: &Conn, config: Arc<ClientConfig>) -> Result<(), proactor::SendError> {
    /// let name = ServerName::try_from("example.com").unwrap();
    /// conn.send(Cmd::TlsConnect(config, name).timeout(Duration::from_secs(10)))?;
    /// conn.send(Cmd::Write("GET / HTTP/1.0\r\n\r\n"))?; // waits for the handshake
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    pub fn TlsConnect(
        config: std::sync::Arc<rustls::ClientConfig>,
        server_name: rustls::pki_types::ServerName<'static>,
    ) -> Cmd {
        plain(Kind::TlsStart(Box::new(TlsStart::Connect(
            config,
            server_name,
        ))))
    }

    /// Completes the operation with [`Error::Deadline`](crate::Error::Deadline) if it has not
    /// finished by `deadline`. Ignored by `Free` and `Detach`, which complete at once and are
    /// never refused for it, whatever the deadline (one already past included).
    #[inline]
    pub fn deadline(mut self, deadline: Instant) -> Cmd {
        self.deadline = Some(deadline);
        self
    }

    /// [`Cmd::deadline`] at `now + timeout`. A timeout too large to represent means no deadline.
    #[inline]
    pub fn timeout(mut self, timeout: Duration) -> Cmd {
        self.deadline = Instant::now().checked_add(timeout);
        self
    }

    /// Completes the operation with [`Error::IdleTimeout`](crate::Error::IdleTimeout) once no
    /// byte has moved in its direction on this connection for `idle` (counted from when the
    /// watcher took the command): a slow but live transfer is never cut off. It never fires
    /// early, and may fire a few milliseconds late (progress is stamped in whole milliseconds).
    ///
    /// Ignored where it means nothing: by `Free` and `Detach` (they complete at once), by
    /// `Accept` (no bytes move on a listener: use [`deadline`](Cmd::deadline) to bound an
    /// accept), and when `idle` is too long to represent as an `Instant`
    /// (`Duration::MAX`), which is no idle timeout, with no timer armed.
    #[inline]
    pub fn idle_timeout(mut self, idle: Duration) -> Cmd {
        self.idle = Some(idle);
        self
    }

    /// A number of the caller's choosing, returned unchanged in the completion (default 0).
    #[inline]
    pub fn tag(mut self, tag: u64) -> Cmd {
        self.tag = tag;
        self
    }

    /// The kind of operation this command will complete as.
    #[inline]
    pub fn op(&self) -> Op {
        self.kind.op()
    }

    /// The buffer this command carries ([`Buf::None`] for internal reads, accept, shutdown,
    /// free and detach).
    #[inline]
    pub fn into_buf(self) -> Buf {
        self.kind.into_buf()
    }

    /// `Free` or `Detach`: the connection's last command, accepted once and not counted
    /// against the bound on operations in flight.
    #[inline]
    pub(crate) fn is_last(&self) -> bool {
        matches!(self.kind, Kind::Free | Kind::Detach)
    }

    /// `true` for a command that would do nothing on a stream: an empty write, or a read into
    /// an empty buffer. (On a datagram socket both mean something: an empty datagram, a
    /// datagram received and dropped.)
    pub(crate) fn is_empty_io(&self) -> bool {
        match &self.kind {
            Kind::Read(b) | Kind::ReadFull(b) => b.is_empty(),
            Kind::Write(b) => b.is_empty(),
            Kind::WriteAll(_, len) => *len == 0,
            _ => false,
        }
    }
}

impl Kind {
    pub(crate) fn op(&self) -> Op {
        match self {
            Kind::Read(_) | Kind::ReadInternal => Op::Read,
            Kind::ReadFull(_) => Op::ReadFull,
            Kind::ReadFrame(_) => Op::ReadFrame,
            Kind::ReadFrames(..) => Op::ReadFrames,
            Kind::Write(_) => Op::Write,
            Kind::SendTo(..) => Op::SendTo,
            Kind::WriteAll(..) => Op::WriteAll,
            Kind::Free => Op::Free,
            Kind::Detach => Op::Detach,
            Kind::Accept => Op::Accept,
            Kind::Shutdown => Op::Shutdown,
            Kind::Connect => Op::Connect,
            #[cfg(feature = "tls")]
            Kind::TlsStart(_) => Op::Tls,
        }
    }

    pub(crate) fn into_buf(self) -> Buf {
        self.into_parts().0
    }

    /// The buffer, and the address of a `SendTo`.
    pub(crate) fn into_parts(self) -> (Buf, Option<PeerAddr>) {
        match self {
            Kind::Read(b) | Kind::ReadFull(b) => (Buf::Vec(b), None),
            Kind::Write(b) => (Buf::Bytes(b), None),
            Kind::SendTo(b, to) => (Buf::Bytes(b), Some(*to)),
            Kind::WriteAll(bufs, _) => (Buf::Many(bufs), None),
            _ => (Buf::None, None),
        }
    }
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = match &self.kind {
            Kind::Read(b) | Kind::ReadFull(b) => b.len(),
            Kind::Write(b) | Kind::SendTo(b, _) => b.len(),
            Kind::WriteAll(_, len) => *len,
            _ => 0,
        };
        f.debug_struct("Cmd")
            .field("op", &self.op())
            .field("len", &len)
            .field("deadline", &self.deadline)
            .field("idle", &self.idle)
            .field("tag", &self.tag)
            .finish()
    }
}
