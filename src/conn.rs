//! [`Conn`]: the actor handle of one registered socket.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::shared::Shared;
#[cfg(doc)]
use crate::Error;
use crate::{Cmd, SendError};

slotmap::new_key_type! {
    /// A connection's slot in its watcher: generational, so a stale key finds nothing.
    pub(crate) struct Key;
}

/// The identity of a registered connection, unique across every watcher of the process.
///
/// It never aliases a later connection, even when the OS reuses the fd number (the slot key
/// is generational), nor a connection of another watcher (it includes the watcher's
/// number), so one map keyed by `ConnId` can hold the connections of a whole [`Pool`].
///
/// [`Pool`]: crate::Pool
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ConnId {
    watcher: u32,
    key: Key,
}

/// A cheap, cloneable handle to one registered socket: no thread, no task.
///
/// Send it commands with [`Conn::send`]; their completions arrive in the watcher's mailbox.
/// When the last handle is dropped and no operation is pending (the watcher keeps a handle
/// while any is, and every completion holds one), the socket is closed, as [`Cmd::Free`]
/// does at once.
#[derive(Clone)]
pub struct Conn {
    pub(crate) inner: Arc<ConnInner>,
}

/// What every handle of one connection shares: 24 bytes, so with the `Arc` counts the
/// allocation fits glibc's 48-byte size class (part of the idle-connection budget in
/// docs/benchmarks.md). Where its completions go is the poller's business (`ConnState`).
pub(crate) struct ConnInner {
    pub(crate) id: Key,
    pub(crate) shared: Arc<Shared>,
    /// [`FREED`] once `Free` or `Detach` was accepted, plus the operations accepted (all
    /// but those two) counted modulo 2^31. Written only under the watcher's queue lock
    /// (`Shared::submit`), or before the handle is shared (`Shared::adopt`), so senders
    /// need no read-modify-write on it.
    pub(crate) sent: AtomicU32,
    /// The operations completed, modulo 2^31. Written only by the poller (the one thread
    /// driving the watcher), so it too is a plain store. `sent - done` is what is in flight.
    pub(crate) done: AtomicU32,
    /// A datagram socket (`Watcher::register` of a `UdpSocket`, a `UnixDatagram`).
    pub(crate) datagram: bool,
}

/// The bit of `sent` saying `Free` or `Detach` was accepted; the bits below count operations.
pub(crate) const FREED: u32 = 1 << 31;
/// The counting bits of `sent` and `done`.
pub(crate) const COUNT: u32 = FREED - 1;

impl Conn {
    pub(crate) fn new(id: Key, shared: Arc<Shared>, datagram: bool) -> Conn {
        let inner = ConnInner {
            id,
            shared,
            datagram,
            sent: AtomicU32::new(0),
            done: AtomicU32::new(0),
        };
        Conn {
            inner: Arc::new(inner),
        }
    }

    /// One operation of this connection completed (or was refused by the poller). Called
    /// only by the thread driving the connection's watcher (the sole writer of `done`).
    pub(crate) fn op_done(&self) {
        let done = &self.inner.done;
        done.store(
            done.load(Ordering::Relaxed).wrapping_add(1) & COUNT,
            Ordering::Relaxed,
        );
    }

    /// This connection's key.
    pub fn id(&self) -> ConnId {
        ConnId {
            watcher: self.inner.shared.watcher_id,
            key: self.inner.id,
        }
    }

    /// Whether `Free` or `Detach` has been accepted for this connection.
    pub fn is_freed(&self) -> bool {
        self.inner.sent.load(Ordering::Acquire) & FREED != 0
    }

    /// Submits a command. It never blocks: the poller performs it and posts exactly one
    /// [`Completion`](crate::Completion) to the watcher's mailbox.
    ///
    /// # Errors
    ///
    /// The command comes back inside the error, buffer included:
    /// - [`SendError::EmptyBuffer`]: an empty write, or a read into an empty buffer;
    /// - [`SendError::Freed`]: `Free` or `Detach` was already accepted for this connection;
    /// - [`SendError::Full`]: the command queue is full, or this connection has the maximum
    ///   number of operations in flight ([`WatcherBuilder::max_ops_per_conn`]). Never for
    ///   [`Cmd::Free`] and [`Cmd::Detach`]: when the queue is full they take the control
    ///   queue, and operations still queued then complete ([`Error::Freed`]) after them;
    /// - [`SendError::Closed`]: the watcher is closed.
    ///
    /// [`WatcherBuilder::max_ops_per_conn`]: crate::WatcherBuilder::max_ops_per_conn
    #[inline]
    pub fn send(&self, cmd: Cmd) -> Result<(), SendError> {
        if cmd.is_empty_io() && !self.inner.datagram {
            return Err(SendError::EmptyBuffer(cmd));
        }
        self.inner.shared.submit(self, cmd)
    }
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        // The last handle is gone and no operation is pending (the poller holds a handle
        // while one is): close.
        self.shared.release(self.id);
    }
}

impl PartialEq for Conn {
    fn eq(&self, other: &Conn) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Conn {}

impl Hash for Conn {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.inner).hash(state);
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").field("id", &self.id()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::{COUNT, FREED};
    use crate::{Cmd, Op, SendError, Watcher};
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    /// The sent and completed counts wrap at 2^31 without disturbing the bound or the freed
    /// bit: started just below the wrap, the third operation of a bound of two is refused
    /// until one completes, and `Free` is still told apart from the counts after the wrap.
    #[test]
    fn operation_counts_wrap_at_2_pow_31() {
        let watcher = Watcher::builder().max_ops_per_conn(2).build().unwrap();
        let (mut peer, socket) = UnixStream::pair().unwrap();
        let conn = watcher.register(socket).unwrap();
        // Nothing was sent yet, so neither the poller nor a sender writes these now.
        conn.inner.sent.store(COUNT - 1, Relaxed);
        conn.inner.done.store(COUNT - 1, Relaxed);

        conn.send(Cmd::Read(vec![0; 1])).unwrap();
        conn.send(Cmd::Read(vec![0; 1])).unwrap();
        assert_eq!(
            conn.inner.sent.load(Relaxed),
            0,
            "wrapped to 0, not into FREED"
        );
        assert!(!conn.is_freed());
        assert!(conn.send(Cmd::ReadInternal).unwrap_err().is_full());

        peer.write_all(b"x").unwrap();
        let mut batch = Vec::new();
        while batch.is_empty() {
            watcher
                .wait_io_timeout(&mut batch, Duration::from_secs(10))
                .unwrap();
        }
        assert_eq!((batch[0].op, batch[0].n), (Op::Read, 1));
        assert!(batch[0].is_ok());
        assert_eq!(conn.inner.done.load(Relaxed), COUNT);
        conn.send(Cmd::ReadInternal).unwrap();
        assert!(conn.send(Cmd::ReadInternal).unwrap_err().is_full());

        conn.send(Cmd::Free).unwrap();
        assert!(conn.is_freed());
        assert_eq!(conn.inner.sent.load(Relaxed), FREED | 1);
        let err = conn.send(Cmd::Write("x")).unwrap_err();
        assert!(matches!(err, SendError::Freed(_)), "{err:?}");
    }
}
