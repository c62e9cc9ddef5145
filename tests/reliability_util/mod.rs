//! Helpers shared by the reliability tests (`faults.rs`, `model.rs`, `scale.rs`, `timers.rs`).
//!
//! Kept apart from `tests/util/` on purpose: these tests measure process-wide things (the fd
//! count, RSS) and must not change when the behaviour tests' helpers do.
//!
//! - `Ledger`: gives every command a unique tag, records every completion in mailbox order,
//!   and fails on an unknown tag, a second completion, or a wrong `Op`;
//! - `Pairs`, `Rng`, `pattern`, `describe` (from `tests/common/kit.rs`, shared with `tests/util`);
//! - `sanitized`, `fd_count`, `rss_kib`, `heap_in_use`, `set_linger_zero`, `set_buffer_sizes`, `wait_stats`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

#[path = "../common/kit.rs"]
mod kit;
#[allow(unused_imports)] // each test crate uses its own subset
pub use kit::{describe, describe_all, pattern, raise_fd_limit, set_linger_zero, Pairs, Rng};

use proactor::{Cmd, Completion, Conn, ConnId, Op, SendError, Stats, Watcher};

/// The generous upper bound for anything that should take milliseconds.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Set by `scripts/sanitize.sh`: under AddressSanitizer or valgrind, memory figures mean
/// nothing (ASan's quarantine holds freed memory, valgrind replaces the allocator) and
/// everything runs 2 to 40 times slower, so the tests skip their memory bounds and relax
/// their timing upper bounds. Correctness checks (exactly once, order, bytes, fds) stay.
pub fn sanitized() -> bool {
    std::env::var_os("PROACTOR_SANITIZER").is_some()
}

/// Open file descriptors of this process (`/proc/self/fd`, less the one `read_dir` holds).
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
        .saturating_sub(1)
}

/// Every open descriptor as `fd->target` (the `read_dir` one included).
pub fn fd_list() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|e| e.ok())
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!("{}->{}", e.file_name().to_string_lossy(), target.display())
        })
        .collect()
}

/// The descriptors when the running test took its starting count (`fds_start`), for the
/// message of a failed `assert_fds_back`.
static START_FDS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// `fd_count()` at the start of a test, remembering which descriptors they were.
pub fn fds_start() -> usize {
    let list = fd_list();
    let count = list.len().saturating_sub(1);
    *START_FDS.lock().unwrap_or_else(|p| p.into_inner()) = list;
    count
}

/// Resident set size of this process, in KiB (`VmRSS` from `/proc/self/status`).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Bytes the allocator has handed out and not taken back (glibc `mallinfo2`: `uordblks`, in
/// use in every arena, plus `hblkhd`, in use in mmapped blocks). Unlike RSS it does not
/// count memory the allocator keeps cached after a free, so it shows leaks, not caching.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as u64
}

/// Waits (bounded) until the fd count is back to `start`; panics with both numbers if not.
/// Closing a watcher is synchronous, so this normally returns on the first look; the wait
/// only covers a `Ctl::Release` still on its way to a live poller.
pub fn assert_fds_back(start: usize) {
    let t = Instant::now();
    loop {
        let now = fd_count();
        if now == start {
            return;
        }
        if t.elapsed() > Duration::from_secs(5) {
            let list = fd_list();
            let at_start = START_FDS.lock().unwrap_or_else(|p| p.into_inner()).clone();
            panic!(
                "fd count {now}, expected {start} (leaked or closed too many): {list:?}; \
                 at the test's start (fds_start): {at_start:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Resets the connection from this end: SO_LINGER 0, then close.
pub fn reset(stream: TcpStream) {
    set_linger_zero(&stream);
    drop(stream);
}

/// SO_SNDBUF and SO_RCVBUF (Linux doubles the value and applies its minimums).
pub fn set_buffer_sizes(fd: &impl AsRawFd, bytes: i32) {
    kit::set_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &bytes);
    kit::set_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes);
}

/// Polls the published stats until `pred` holds (they trail the work by one poller round).
pub fn wait_stats(watcher: &Watcher, what: &str, pred: impl Fn(&Stats) -> bool) -> Stats {
    let start = Instant::now();
    loop {
        let s = watcher.stats();
        if pred(&s) {
            return s;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The expected completion of one accepted command.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub conn: ConnId,
    pub op: Op,
}

/// Every command gets a unique tag; every completion must match exactly one outstanding tag.
/// `log` keeps the completions in the order the mailbox gave them.
pub struct Ledger {
    next: u64,
    pub outstanding: HashMap<u64, Expect>,
    pub index: HashMap<u64, usize>,
    pub log: Vec<Completion>,
    scratch: Vec<Completion>,
}

impl Default for Ledger {
    fn default() -> Ledger {
        Ledger::new()
    }
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger {
            next: 1,
            outstanding: HashMap::new(),
            index: HashMap::new(),
            log: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Sends `cmd` with a fresh tag; the tag is only recorded if `send` accepts it.
    pub fn send(&mut self, conn: &Conn, cmd: Cmd) -> Result<u64, SendError> {
        let tag = self.next;
        self.next += 1;
        self.send_tagged(conn, cmd, tag).map(|()| tag)
    }

    /// Sends `cmd` with the caller's tag (unique across the ledger).
    pub fn send_tagged(&mut self, conn: &Conn, cmd: Cmd, tag: u64) -> Result<(), SendError> {
        let op = cmd.op();
        assert!(
            !self.outstanding.contains_key(&tag) && !self.index.contains_key(&tag),
            "tag {tag} reused"
        );
        // Recorded after `send` accepts it: completions are only taken through this ledger
        // (`&mut self`), so none can be looked up before the insert.
        conn.send(cmd.tag(tag))?;
        self.outstanding.insert(
            tag,
            Expect {
                conn: conn.id(),
                op,
            },
        );
        Ok(())
    }

    /// Sends and panics if refused.
    pub fn must(&mut self, conn: &Conn, cmd: Cmd) -> u64 {
        match self.send(conn, cmd) {
            Ok(tag) => tag,
            Err(e) => panic!("send refused: {e:?}"),
        }
    }

    /// Expects a completion for a tag the caller sent itself (other threads).
    pub fn expect(&mut self, tag: u64, conn: ConnId, op: Op) {
        assert!(self.outstanding.insert(tag, Expect { conn, op }).is_none());
    }

    pub fn record(&mut self, c: Completion) {
        let Some(exp) = self.outstanding.remove(&c.tag) else {
            if self.index.contains_key(&c.tag) {
                panic!("second completion for tag {}: {}", c.tag, describe(&c));
            }
            panic!("completion for a tag never sent: {}", describe(&c));
        };
        assert_eq!(c.op, exp.op, "wrong op for tag {}: {}", c.tag, describe(&c));
        assert_eq!(
            c.conn.id(),
            exp.conn,
            "wrong conn for tag {}: {}",
            c.tag,
            describe(&c)
        );
        self.index.insert(c.tag, self.log.len());
        self.log.push(c);
    }

    /// Takes completions from `watcher` until `done(self)` holds; panics after `timeout`.
    pub fn pump_until(
        &mut self,
        watcher: &Watcher,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Ledger) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            let mut got = std::mem::take(&mut self.scratch);
            match watcher.wait_io_deadline(&mut got, deadline) {
                Ok(0) => panic!(
                    "timed out after {timeout:?} waiting for {what}; {} outstanding, e.g. {:?}",
                    self.outstanding.len(),
                    self.outstanding.iter().take(5).collect::<Vec<_>>()
                ),
                Ok(_) => {}
                Err(e) => panic!("wait_io failed ({e}) waiting for {what}"),
            }
            for c in got.drain(..) {
                self.record(c);
            }
            self.scratch = got;
        }
    }

    /// Takes completions until every tag sent so far has completed.
    pub fn pump_all(&mut self, watcher: &Watcher, timeout: Duration) {
        self.pump_until(watcher, timeout, "every outstanding completion", |l| {
            l.outstanding.is_empty()
        });
    }

    /// Takes whatever is ready now, without blocking.
    pub fn pump_ready(&mut self, watcher: &Watcher) -> usize {
        let mut got = std::mem::take(&mut self.scratch);
        let n = watcher.try_wait_io(&mut got).unwrap();
        for c in got.drain(..) {
            self.record(c);
        }
        self.scratch = got;
        n
    }

    pub fn get(&self, tag: u64) -> &Completion {
        let i = self
            .index
            .get(&tag)
            .unwrap_or_else(|| panic!("tag {tag} not completed"));
        &self.log[*i]
    }

    pub fn is_done(&self, tag: u64) -> bool {
        self.index.contains_key(&tag)
    }

    /// Position of `tag`'s completion in mailbox order.
    pub fn position(&self, tag: u64) -> usize {
        self.index[&tag]
    }
}

/// Kernel error kinds a write may see once the peer is gone.
pub fn is_peer_gone(e: &proactor::Error) -> bool {
    match e {
        proactor::Error::Io(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

/// `p`-th percentile of sorted `v` (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `send`, retrying while the conn's in-flight bound or the command queue is full (the
/// poller drains it as fast as it can); panics if it never drains within `TIMEOUT` of `start`.
pub fn send_retry(conn: &Conn, mut cmd: Cmd, start: Instant) {
    loop {
        match conn.send(cmd) {
            Ok(()) => return,
            Err(SendError::Full(c)) => {
                assert!(start.elapsed() < TIMEOUT, "the command queue never drained");
                cmd = c;
                std::thread::yield_now();
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}
