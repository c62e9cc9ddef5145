//! Errors: [`Error`] in completions and from the watcher, [`SendError`] from [`Conn::send`].
//!
//! [`Conn::send`]: crate::Conn::send

use std::fmt;
use std::io;

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
