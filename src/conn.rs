//! [`Conn`]: the actor handle of one registered socket.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::cmd::Kind;
use crate::watcher::Shared;
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
    /// [`FREED`] once `Free` or `Detach` was accepted (later sends fail on the caller's
    /// thread), plus the read, read-full and write operations accepted and not yet completed.
    pub(crate) state: AtomicU32,
}

/// The `state` bit saying `Free` or `Detach` was accepted; the bits below count operations.
pub(crate) const FREED: u32 = 1 << 31;

impl Conn {
    pub(crate) fn new(id: Key, shared: Arc<Shared>) -> Conn {
        let inner = ConnInner {
            id,
            shared,
            state: AtomicU32::new(0),
        };
        Conn {
            inner: Arc::new(inner),
        }
    }

    /// One operation of this connection completed (or was refused by the poller).
    pub(crate) fn op_done(&self) {
        self.inner.state.fetch_sub(1, Ordering::Relaxed);
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
        self.inner.state.load(Ordering::Acquire) & FREED != 0
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
    pub fn send(&self, cmd: Cmd) -> Result<(), SendError> {
        let inner = &*self.inner;
        if cmd.is_empty_io() {
            return Err(SendError::EmptyBuffer(cmd));
        }
        let last = matches!(cmd.kind, Kind::Free | Kind::Detach);
        if !last {
            // Counted first, so the bound holds however many threads send at once. A Free
            // racing this send is settled under the queue lock (`Shared::submit`).
            let before = inner.state.fetch_add(1, Ordering::AcqRel);
            if before & FREED != 0 {
                self.op_done();
                return Err(SendError::Freed(cmd));
            }
            if before >= inner.shared.max_ops {
                self.op_done();
                return Err(SendError::Full(cmd));
            }
        }
        let r = inner.shared.submit(self, cmd, last);
        if r.is_err() && !last {
            self.op_done();
        }
        r
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
