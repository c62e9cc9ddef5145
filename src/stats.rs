//! [`Stats`]: counters the poller publishes once per round, read without locking.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::{EngineKind, Unavailable};

macro_rules! stats {
    ($($(#[doc = $doc:literal])* $field:ident,)*) => {
        /// A snapshot of a watcher's counters ([`Watcher::stats`](crate::Watcher::stats)).
        ///
        /// The poller publishes them at the end of each round, so a snapshot may trail the
        /// work by one round, and fields are not read atomically together.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            /// The engine this watcher runs on.
            pub engine: EngineKind,
            /// Why this watcher does not run on io_uring, when it was built with
            /// [`Engine::Auto`](crate::Engine::Auto) (or `PROACTOR_ENGINE=auto`) and fell
            /// back to the readiness engine; `None` otherwise.
            pub uring_unavailable: Option<Unavailable>,
            $($(#[doc = $doc])* pub $field: u64,)*
        }

        #[derive(Default)]
        pub(crate) struct StatCells {
            $($field: AtomicU64,)*
        }

        impl StatCells {
            pub(crate) fn publish(&self, s: &Stats) {
                $(self.$field.store(s.$field, Relaxed);)*
            }

            pub(crate) fn snapshot(&self) -> Stats {
                Stats {
                    engine: EngineKind::default(),
                    uring_unavailable: None,
                    $($field: self.$field.load(Relaxed),)*
                }
            }
        }
    };
}

stats! {
    /// Connections registered and not yet freed, detached or released.
    connections,
    /// Read-direction operations pending: reads, read-fulls and accepts.
    reads_in_flight,
    /// Write-direction operations pending: writes, shutdowns and connects.
    writes_in_flight,
    /// Operations waiting with a deadline or idle timeout.
    deadlines_armed,
    /// Operations completed by their deadline or idle timeout.
    deadlines_fired,
    /// Entries in the timer heap, including those of operations that already completed
    /// (cancelled lazily; the heap is compacted when they outnumber the live ones).
    timer_entries,
    /// Bytes read from sockets.
    bytes_read,
    /// Bytes written to sockets.
    bytes_written,
    /// Times the poller returned from `epoll_wait`, `kevent` or `io_uring_enter`.
    wakeups,
    /// Batches of completions posted (rounds that completed something).
    batches,
    /// Completions posted.
    completions,
    /// Completions waiting for room in full bounded channels (a mailbox or a route made
    /// with [`register_with`](crate::Watcher::register_with)): they count as in flight for
    /// their connections until delivered.
    stalled_completions,
    /// Datagrams sent as segments of UDP GSO sends (several queued datagrams of one size to
    /// one peer in one send: [`WatcherBuilder::udp_gso`](crate::WatcherBuilder::udp_gso)).
    datagrams_segmented,
    /// Internal read-buffer chunks allocated (a used-up chunk is reused when no slice of it
    /// is still held).
    chunks_allocated,
}

impl Stats {
    /// The engine, and why not io_uring where `auto` fell back: `io_uring`, `epoll`, or
    /// `epoll (io_uring unavailable: ...)`. For a log line.
    pub fn engine_summary(&self) -> String {
        match self.uring_unavailable {
            Some(why) => format!("{} (io_uring unavailable: {why})", self.engine),
            None => self.engine.to_string(),
        }
    }

    /// Average completions per posted batch.
    pub fn completions_per_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.completions as f64 / self.batches as f64
        }
    }
}
