//! Errors: [`Error`] in completions and from the watcher, [`SendError`] from [`Conn::send`].
//!
//! [`Conn::send`]: crate::Conn::send

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::Cmd;

/// Why an operation finished without doing all it was asked to.
///
/// Carried by [`Completion::result`](crate::Completion::result); the bytes moved before it
/// happened are in [`Completion::n`](crate::Completion::n). OS errors stay [`io::Error`],
/// unmodified, so `raw_os_error()` and `kind()` work as usual.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer closed its side of the stream (a read of 0 bytes). For `ReadFull`, `n` says
    /// how much of the buffer was filled before.
    #[error("end of stream")]
    Eof,
    /// The operation's deadline passed first.
    #[error("operation deadline exceeded")]
    Deadline,
    /// No byte moved in the operation's direction for its idle timeout.
    #[error("operation idle timeout exceeded")]
    IdleTimeout,
    /// The connection was freed (or detached) before the operation finished.
    #[error("connection was freed")]
    Freed,
    /// The watcher was closed before the operation finished.
    #[error("watcher is closed")]
    WatcherClosed,
    /// A framed read met a frame longer than its [`Framing`](crate::Framing)'s maximum (see
    /// [`Cmd::ReadFrame`](crate::Cmd::ReadFrame) for what happens to its bytes).
    #[error("frame longer than the maximum")]
    FrameTooLong,
    /// A framed read met bytes that can never be a frame: a negative length, or a decoder
    /// that said `Invalid` (its message) or panicked.
    #[error("bad frame: {0}")]
    BadFrame(String),
    /// A datagram was longer than the read's buffer: `n` bytes of it were read, the rest is
    /// lost (datagrams are read whole or cut). `len` is its length, where the OS tells
    /// (Linux does). An internal read's buffer is the watcher's
    /// [`buffer_size`](crate::WatcherBuilder::buffer_size), 64 KiB by default, which holds
    /// any UDP datagram.
    #[error("datagram truncated: {} bytes did not fit", match len { Some(l) => l.to_string(), None => "some".into() })]
    Truncated {
        /// The datagram's whole length, if known.
        len: Option<usize>,
    },
    /// The command cannot work on this kind of socket: `ReadFull`, `ReadFrame`,
    /// `ReadFrames`, `Accept`, `Shutdown` or TLS on a datagram socket, `SendTo` on a stream,
    /// TLS on a listener. Says which, and what to use instead.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The TLS session failed (the `tls` feature): the peer sent something that is not TLS
    /// or broke the protocol, its certificate was refused, it sent a fatal alert, or the
    /// handshake's command ended (its deadline) before the handshake did. Every operation
    /// pending on the connection completes with it, and so do later ones but `Free` and
    /// `Detach`: the session cannot go on.
    #[cfg(feature = "tls")]
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    /// The peer closed the connection without ending its TLS stream with `close_notify` (the
    /// `tls` feature): what was read may have been cut short by an attacker, unlike a TLS
    /// stream's clean end, which is [`Error::Eof`].
    #[cfg(feature = "tls")]
    #[error("TLS stream truncated: the peer closed the connection without close_notify")]
    TlsTruncated,
    /// The system call failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Error {
    /// Whether this is [`Error::Eof`].
    pub fn is_eof(&self) -> bool {
        matches!(self, Error::Eof)
    }

    /// Whether this is [`Error::Deadline`] or [`Error::IdleTimeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Deadline | Error::IdleTimeout)
    }
}

/// A command [`Conn::send`](crate::Conn::send) did not accept. It always gives the command,
/// and so its buffer, back: [`SendError::into_inner`].
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// A bound was hit: the watcher's command queue is full, or this connection already has
    /// the configured maximum of operations in flight. Retry after taking some completions.
    #[error("command queue is full")]
    Full(Cmd),
    /// The watcher is closed.
    #[error("watcher is closed")]
    Closed(Cmd),
    /// The connection was freed or detached (by this handle or a clone).
    #[error("connection was freed")]
    Freed(Cmd),
    /// A write of zero bytes, or a read or read-full into a zero-length buffer.
    #[error("empty buffer")]
    EmptyBuffer(Cmd),
}

impl SendError {
    /// The command that was not accepted.
    pub fn into_inner(self) -> Cmd {
        match self {
            SendError::Full(c) | SendError::Closed(c) | SendError::Freed(c) => c,
            SendError::EmptyBuffer(c) => c,
        }
    }

    /// Whether this is [`SendError::Full`]: the same command may succeed later.
    pub fn is_full(&self) -> bool {
        matches!(self, SendError::Full(_))
    }
}

impl fmt::Debug for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            SendError::Full(_) => "Full",
            SendError::Closed(_) => "Closed",
            SendError::Freed(_) => "Freed",
            SendError::EmptyBuffer(_) => "EmptyBuffer",
        };
        write!(f, "{name}(..)")
    }
}

/// A socket a watcher did not take ([`Watcher::register`](crate::Watcher::register),
/// [`register_with`](crate::Watcher::register_with), [`listen`](crate::Watcher::listen) and
/// the [`Pool`](crate::Pool)'s): why, and the socket itself, handed back open (as
/// [`SendError`] hands a command back), so a caller can retry elsewhere or close it
/// deliberately. Converting it into an [`Error`] (the `?` operator does) closes the socket.
///
/// The socket may have been switched to non-blocking mode before the error was found.
pub struct RegisterError {
    error: Error,
    socket: OwnedFd,
}

impl RegisterError {
    pub(crate) fn new(error: impl Into<Error>, socket: OwnedFd) -> RegisterError {
        RegisterError {
            error: error.into(),
            socket,
        }
    }

    /// Why the socket was not taken.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The socket, handed back open.
    pub fn into_socket(self) -> OwnedFd {
        self.socket
    }

    /// The error and the socket.
    pub fn into_parts(self) -> (Error, OwnedFd) {
        (self.error, self.socket)
    }
}

impl From<RegisterError> for Error {
    /// The error alone: the socket is closed.
    fn from(e: RegisterError) -> Error {
        e.error
    }
}

impl fmt::Display for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl fmt::Debug for RegisterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterError")
            .field("error", &self.error)
            .field("socket", &self.socket.as_raw_fd())
            .finish()
    }
}

impl std::error::Error for RegisterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}
