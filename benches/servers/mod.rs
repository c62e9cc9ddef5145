//! The echo servers the benches compare, CPU pinning, and the load generator ([`client`]).
//!
//! Every server listens on `127.0.0.1:0`, echoes every byte back, counts its connections, and
//! stops when dropped: its threads are joined and every socket it holds is closed, so the next
//! benchmark starts from a clean process (and stays under the 20,000 fd limit).
//!
//! - [`Kind::Proactor`]: one [`Watcher`] (poller pinned with `poller_cpu`) and the `WaitIO`
//!   loop on one thread: Accept -> `ReadInternal`; read done -> `Write(bytes)`; write done ->
//!   `ReadInternal`; error or end of stream -> `Free`; one Accept kept outstanding. On the
//!   readiness engine (epoll), set explicitly, whatever `PROACTOR_ENGINE` says.
//! - [`Kind::ProactorInline`]: the same loop on an inline watcher (no poller thread).
//! - [`Kind::ProactorUring`], [`Kind::ProactorUringInline`]: the same two on the io_uring
//!   engine (`Engine::Uring`).
//! - [`Kind::UringLoop`]: a hand-written single-threaded io_uring echo loop on the `io-uring`
//!   crate ([`uring_loop`]): the limit for the io_uring engine, as mio is for epoll.
//! - [`Kind::Tokio`]: the multi-thread runtime, a task per connection, a 64 KiB buffer each,
//!   `read` then `write_all`, as a competent tokio user writes it.
//! - [`Kind::Mio`]: a hand-written single-threaded edge-triggered mio server: read until
//!   `WouldBlock` into one shared 64 KiB buffer, write at once, keep only the unwritten rest per
//!   connection and stop reading that connection until it is written, as mio's docs
//!   prescribe ("Draining readiness"). The near-limit baseline.
//! - [`Kind::MioShort`] (not in the default set): the same server with the rule tokio applies
//!   on top of mio on epoll and kqueue: a read shorter than the buffer ends the drain (unless
//!   the event says the peer closed), so no final read returns only `EAGAIN`.
//! - [`Kind::Std`]: a thread per connection with blocking `std::net` sockets.
//!
//! Pinning: server threads go to CPU `PROACTOR_BENCH_SERVER_CPU` (default 0), the load
//! generator to `PROACTOR_BENCH_CLIENT_CPU` (default 1), with `sched_setaffinity`; set
//! `PROACTOR_BENCH_PIN=0` to turn it off. It is also off when either CPU is not available.

pub mod client;
pub mod process;
pub mod runs;
#[cfg(target_os = "linux")]
pub mod uring_loop;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use proactor::{Cmd, Conn, Engine, Error, Op, Watcher};

/// Size of the per-connection (tokio, std) or shared (mio) read buffer.
pub const BUF: usize = 64 * 1024;

/// The servers under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The `WaitIO` loop on a threaded watcher, readiness engine.
    Proactor,
    /// The same loop on an inline watcher (`WatcherBuilder::inline`): no poller thread.
    ProactorInline,
    /// [`Kind::Proactor`] on the io_uring engine.
    ProactorUring,
    /// [`Kind::ProactorInline`] on the io_uring engine.
    ProactorUringInline,
    Tokio,
    Mio,
    /// The mio server without the final `EAGAIN` read after a short read (opt-in).
    MioShort,
    /// The hand-written io_uring echo loop (Linux 6.1 or later).
    UringLoop,
    Std,
}

impl Kind {
    /// The default set, in the order the benches run them (those this machine cannot run,
    /// io_uring on an older or locked-down kernel, are left out: see [`Kind::available`]).
    pub const ALL: [Kind; 8] = [
        Kind::Proactor,
        Kind::ProactorInline,
        Kind::ProactorUring,
        Kind::ProactorUringInline,
        Kind::Tokio,
        Kind::Mio,
        Kind::UringLoop,
        Kind::Std,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Proactor => "proactor",
            Kind::ProactorInline => "proactor-inline",
            Kind::ProactorUring => "proactor-uring",
            Kind::ProactorUringInline => "proactor-uring-inline",
            Kind::Tokio => "tokio",
            Kind::Mio => "mio",
            Kind::MioShort => "mio-short",
            Kind::UringLoop => "uring-loop",
            Kind::Std => "std",
        }
    }

    /// Whether this machine can run the server: the io_uring ones need a kernel and a
    /// sandbox that allow io_uring (checked once per process).
    pub fn available(self) -> bool {
        match self {
            Kind::ProactorUring | Kind::ProactorUringInline => {
                static OK: OnceLock<bool> = OnceLock::new();
                // (On a thread of its own, which the ring's teardown cannot disturb.)
                *OK.get_or_init(|| {
                    thread::spawn(|| {
                        Watcher::builder()
                            .engine(Engine::Uring)
                            .inline(true)
                            .build()
                            .is_ok()
                    })
                    .join()
                    .unwrap_or(false)
                })
            }
            #[cfg(target_os = "linux")]
            Kind::UringLoop => uring_loop::available(),
            #[cfg(not(target_os = "linux"))]
            Kind::UringLoop => false,
            _ => true,
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        let extra = [Kind::MioShort];
        Kind::ALL
            .into_iter()
            .chain(extra)
            .find(|k| k.name() == s.trim())
    }

    /// `PROACTOR_BENCH_SERVERS=proactor,mio` selects servers (default: [`Kind::ALL`], less
    /// those this machine cannot run, with a note on stderr).
    pub fn selected() -> Vec<Kind> {
        match std::env::var("PROACTOR_BENCH_SERVERS") {
            Ok(list) => Kind::parse_list(&list),
            Err(_) => Kind::ALL
                .into_iter()
                .filter(|k| {
                    let ok = k.available();
                    if !ok {
                        eprintln!("bench: {} left out: io_uring is not usable here", k.name());
                    }
                    ok
                })
                .collect(),
        }
    }

    pub fn parse_list(list: &str) -> Vec<Kind> {
        list.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| Kind::parse(s).unwrap_or_else(|| panic!("unknown server {s:?}")))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// CPU pinning

/// Which CPUs the server threads and the load generator are pinned to (`None`: not pinned).
#[derive(Clone, Copy, Debug)]
pub struct Pins {
    pub server: Option<usize>,
    pub client: Option<usize>,
}

/// Environment variable `name` as a number (`None` when unset or not a number).
pub fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The pinning plan, decided once per process (see the module doc).
pub fn pins() -> Pins {
    static PINS: OnceLock<Pins> = OnceLock::new();
    *PINS.get_or_init(|| {
        let off = Pins {
            server: None,
            client: None,
        };
        if std::env::var("PROACTOR_BENCH_PIN").is_ok_and(|v| v.trim() == "0") {
            return off;
        }
        let server = env_usize("PROACTOR_BENCH_SERVER_CPU").unwrap_or(0);
        let client = env_usize("PROACTOR_BENCH_CLIENT_CPU").unwrap_or(1);
        let allowed = allowed_cpus();
        if !allowed.contains(&server) || !allowed.contains(&client) {
            eprintln!(
                "bench: CPUs {server} (server) and {client} (client) are not both available \
                 (allowed: {allowed:?}); threads are not pinned"
            );
            return off;
        }
        Pins {
            server: Some(server),
            client: Some(client),
        }
    })
}

/// Pins the calling thread to the server CPU, if pinning is on.
pub fn pin_server_thread() {
    if let Some(cpu) = pins().server {
        pin_current_thread(cpu);
    }
}

/// Pins the calling thread to the client CPU, if pinning is on.
pub fn pin_client_thread() {
    if let Some(cpu) = pins().client {
        pin_current_thread(cpu);
    }
}

#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: every index is < CPU_SETSIZE, inside `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

/// Pins the calling thread to `cpu` with `sched_setaffinity` (Linux; a no-op elsewhere).
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpu: usize) {
    assert!(cpu < libc::CPU_SETSIZE as usize, "cpu {cpu} out of range");
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE (asserted above), so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        panic!("sched_setaffinity({cpu}): {}", io::Error::last_os_error());
    }
}

#[cfg(not(target_os = "linux"))]
pub fn pin_current_thread(_cpu: usize) {}

// ---------------------------------------------------------------------------------------------
// Sockets

/// A listener on 127.0.0.1:0 with `TCP_NODELAY` (Linux copies it to every accepted socket, so
/// the proactor server, which never touches its accepted sockets, gets it too) and the largest
/// backlog the kernel allows (`net.core.somaxconn`), so an 8K-connection burst is not throttled
/// by SYN drops.
pub fn bind_listener() -> io::Result<TcpListener> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let fd = listener.as_raw_fd();
    let one: libc::c_int = 1;
    // SAFETY: `fd` is a live socket owned by `listener`; the option value is a c_int of the
    // length passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // Listening again only changes the backlog; the kernel caps it at somaxconn.
    // SAFETY: `fd` is a live listening socket owned by `listener`.
    if unsafe { libc::listen(fd, 65_535) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

/// Closes `fd`'s connection with a reset instead of a FIN (`SO_LINGER` 0), so a load generator
/// that opens and closes tens of thousands of connections leaves no `TIME_WAIT` entries that
/// would exhaust the ephemeral ports. Servers see `ECONNRESET` or end of stream; both free.
pub fn set_linger_zero(fd: &impl AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is a live socket; the option value is a `linger` of the length passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// CPU time this process has used so far, threads that ended included: (user, system) in
/// microseconds (`getrusage(RUSAGE_SELF)`).
pub fn cpu_us() -> (u64, u64) {
    // SAFETY: rusage is a plain C struct; all-zero is a valid value for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage; RUSAGE_SELF is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0, 0);
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime))
}

/// The resident set size of this process in KiB (`VmRSS` in /proc/self/status), 0 if unknown.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Servers

/// Counters every server keeps.
#[derive(Default, Debug)]
pub struct Counters {
    /// Connections accepted with their first read pending (never decreases).
    pub ready: AtomicUsize,
    /// Connections open now.
    pub live: AtomicUsize,
}

/// A running echo server; dropping it stops it and closes every socket it holds.
pub struct Server {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    watcher: Option<Arc<Watcher>>,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Server {
    pub fn start(kind: Kind) -> io::Result<Server> {
        match kind {
            Kind::Proactor
            | Kind::ProactorInline
            | Kind::ProactorUring
            | Kind::ProactorUringInline => start_proactor(kind),
            Kind::Tokio => start_tokio(),
            Kind::Mio => start_mio(false),
            Kind::MioShort => start_mio(true),
            #[cfg(target_os = "linux")]
            Kind::UringLoop => uring_loop::start(),
            #[cfg(not(target_os = "linux"))]
            Kind::UringLoop => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "uring-loop: Linux only",
            )),
            Kind::Std => start_std(),
        }
    }

    /// The proactor watcher's counters (`None` for the baselines).
    pub fn proactor_stats(&self) -> Option<proactor::Stats> {
        self.watcher.as_ref().map(|w| w.stats())
    }

    /// Waits (at most `timeout`) until the server holds no connection; `true` if it got there.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while self.counters.live.load(Relaxed) != 0 {
            if Instant::now() >= end {
                return false;
            }
            thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

/// How many accepts the proactor server keeps outstanding (`PROACTOR_BENCH_ACCEPTS`, default 1).
fn proactor_accepts() -> usize {
    env_usize("PROACTOR_BENCH_ACCEPTS").unwrap_or(1).max(1)
}

/// The ring's receive buffers for the io_uring kinds: `PROACTOR_BENCH_URING_BUFFERS=COUNTxSIZE`
/// (e.g. `64x65536`, the library's default, used when unset).
fn uring_buffers() -> Option<(u16, u32)> {
    let v = std::env::var("PROACTOR_BENCH_URING_BUFFERS").ok()?;
    let (count, size) = v.trim().split_once('x')?;
    Some((count.parse().ok()?, size.parse().ok()?))
}

/// One of the four proactor kinds: threaded or inline, readiness or io_uring engine (set
/// explicitly, so a name means the same whatever `PROACTOR_ENGINE` says).
fn start_proactor(kind: Kind) -> io::Result<Server> {
    let (inline, engine) = match kind {
        Kind::Proactor => (false, Engine::Readiness),
        Kind::ProactorInline => (true, Engine::Readiness),
        Kind::ProactorUring => (false, Engine::Uring),
        Kind::ProactorUringInline => (true, Engine::Uring),
        _ => unreachable!("not a proactor kind"),
    };
    let listener = bind_listener()?;
    let addr = listener.local_addr()?;
    let mut builder = Watcher::builder().inline(inline).engine(engine);
    if let (Engine::Uring, Some((count, size))) = (engine, uring_buffers()) {
        builder = builder.uring_buffers(count, size);
    }
    if let (Some(cpu), false) = (pins().server, inline) {
        builder = builder.poller_cpu(cpu); // inline: the pinned loop thread is the poller
    }
    // Built on a thread of its own: the thread that creates an io_uring ring is signalled
    // (task work, TWA_SIGNAL) when the ring is closed, 10 to 50 ms later, and a blocking
    // `connect` of the load generator on that thread then failed with EINTR (see `stop`).
    let watcher = thread::spawn(move || builder.build())
        .join()
        .map_err(|_| io::Error::other("building the watcher panicked"))??;
    let watcher = Arc::new(watcher);
    let lconn = watcher.listen(listener).map_err(io::Error::other)?;
    for _ in 0..proactor_accepts() {
        lconn.send(Cmd::Accept).map_err(io::Error::other)?;
    }
    let counters = Arc::new(Counters::default());
    let (w, k) = (watcher.clone(), counters.clone());
    let handle = thread::Builder::new()
        .name("proactor-echo".into())
        .spawn(move || {
            pin_server_thread();
            proactor_loop(&w, &lconn, &k);
        })?;
    let w = watcher.clone();
    Ok(Server {
        kind,
        addr,
        counters,
        watcher: Some(watcher),
        stop: Some(Box::new(move || {
            // Completes every pending operation with `WatcherClosed`, closes every socket and
            // ends the mailbox, so `wait_io` in the loop fails and the loop returns.
            //
            // On a thread of its own: when no thread is inside `wait_io`, `close` runs an
            // inline watcher's shutdown on the calling thread, which then submits to the
            // ring, and when the ring is closed the kernel's ring-exit work signals every
            // thread that made or submitted to it (task work, TWA_SIGNAL): 10 to 50 ms later
            // this thread, the benches' load generator, saw a blocking `connect` fail with
            // EINTR (docs/benchmarks.md, "Engines side by side").
            let closer = thread::spawn(move || w.close());
            let _ = closer.join();
            let _ = handle.join();
        })),
    })
}

/// A pool of `watchers` inline watchers, one `WaitIO` loop thread each (the echo-server
/// example's shape), for the watcher-scaling group. Not pinned: the point is to use cores.
/// On the readiness engine, as the earlier figures were.
pub fn start_pool(watchers: usize) -> io::Result<Server> {
    let listener = bind_listener()?;
    let addr = listener.local_addr()?;
    let pool = Arc::new(
        proactor::Pool::builder()
            .watchers(watchers)
            .per_watcher_mailboxes()
            .watcher_options(Watcher::builder().inline(true).engine(Engine::Readiness))
            .build()?,
    );
    let lconn = pool.listen(listener).map_err(io::Error::other)?;
    lconn.send(Cmd::Accept).map_err(io::Error::other)?;
    let counters = Arc::new(Counters::default());
    let mut loops = Vec::new();
    for i in 0..watchers {
        let (p, l, k) = (pool.clone(), lconn.clone(), counters.clone());
        loops.push(
            thread::Builder::new()
                .name(format!("proactor-pool-{i}"))
                .spawn(move || proactor_loop(&p.watchers()[i], &l, &k))?,
        );
    }
    Ok(Server {
        kind: Kind::Proactor,
        addr,
        counters,
        watcher: None,
        stop: Some(Box::new(move || {
            pool.close();
            for l in loops {
                let _ = l.join();
            }
        })),
    })
}

/// `PROACTOR_BENCH_PIPELINE=1` (an experiment for the 64 KiB stream, docs/benchmarks.md):
/// the echo loop issues a connection's next `ReadInternal` together with the `Write` of what
/// it read, instead of after the write completed, as long as no earlier write of that
/// connection is still in flight (else when it completes): one read and at most two writes
/// outstanding per connection, so the poller can read the next bytes in the round that sends
/// the last ones.
fn pipeline() -> bool {
    std::env::var("PROACTOR_BENCH_PIPELINE").is_ok_and(|v| v.trim() == "1")
}

/// The `WaitIO` echo loop.
fn proactor_loop(watcher: &Watcher, listener: &Conn, k: &Counters) {
    if pipeline() {
        return proactor_loop_pipelined(watcher, listener, k);
    }
    let mut batch = Vec::with_capacity(1024);
    while watcher.wait_io(&mut batch).is_ok() {
        for c in batch.drain(..) {
            match (c.op, c.result) {
                (Op::Accept, result) => {
                    if result.is_ok() {
                        if let Some((conn, _peer)) = c.buf.into_accepted() {
                            k.live.fetch_add(1, Relaxed);
                            if conn.send(Cmd::ReadInternal).is_ok() {
                                k.ready.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    // Keep the accept outstanding (also after EMFILE: the watcher pauses).
                    let _ = listener.send(Cmd::Accept);
                }
                (Op::Read, Ok(())) => {
                    let _ = c.conn.send(Cmd::Write(c.buf.into_bytes()));
                }
                (Op::Write, Ok(())) => {
                    let _ = c.conn.send(Cmd::ReadInternal);
                }
                (Op::Free, _) => {
                    k.live.fetch_sub(1, Relaxed);
                }
                (_, Err(Error::WatcherClosed)) => {}
                (_, Ok(())) => {} // no other operation is ever submitted
                (_, Err(_)) => {
                    // End of stream, reset, ...: close the connection.
                    let _ = c.conn.send(Cmd::Free);
                }
            }
        }
    }
}

/// [`proactor_loop`] with the next read issued early ([`pipeline`]).
fn proactor_loop_pipelined(watcher: &Watcher, listener: &Conn, k: &Counters) {
    // Per connection: writes in flight, and whether its next read waits for one of them.
    let mut state: HashMap<proactor::ConnId, (u32, bool)> = HashMap::new();
    let mut batch = Vec::with_capacity(1024);
    while watcher.wait_io(&mut batch).is_ok() {
        for c in batch.drain(..) {
            match (c.op, c.result) {
                (Op::Accept, result) => {
                    if result.is_ok() {
                        if let Some((conn, _peer)) = c.buf.into_accepted() {
                            k.live.fetch_add(1, Relaxed);
                            if conn.send(Cmd::ReadInternal).is_ok() {
                                k.ready.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    let _ = listener.send(Cmd::Accept);
                }
                (Op::Read, Ok(())) => {
                    let st = state.entry(c.conn.id()).or_default();
                    let _ = c.conn.send(Cmd::Write(c.buf.into_bytes()));
                    if st.0 == 0 {
                        let _ = c.conn.send(Cmd::ReadInternal);
                    } else {
                        st.1 = true;
                    }
                    st.0 += 1;
                }
                (Op::Write, Ok(())) => {
                    let st = state.entry(c.conn.id()).or_default();
                    st.0 = st.0.saturating_sub(1);
                    if st.1 {
                        st.1 = false;
                        let _ = c.conn.send(Cmd::ReadInternal);
                    }
                }
                (Op::Free, _) => {
                    state.remove(&c.conn.id());
                    k.live.fetch_sub(1, Relaxed);
                }
                (_, Err(Error::WatcherClosed)) => {}
                (_, Ok(())) => {}
                (_, Err(_)) => {
                    let _ = c.conn.send(Cmd::Free);
                }
            }
        }
    }
}

/// tokio worker threads: `PROACTOR_BENCH_TOKIO_WORKERS`, default one per server CPU (1 when
/// pinned, which is what tokio's default picks for a process confined to one CPU).
fn tokio_workers() -> usize {
    env_usize("PROACTOR_BENCH_TOKIO_WORKERS").unwrap_or_else(|| {
        if pins().server.is_some() {
            1
        } else {
            thread::available_parallelism().map_or(1, |n| n.get())
        }
    })
}

fn start_tokio() -> io::Result<Server> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(tokio_workers().max(1))
        .enable_all()
        .on_thread_start(pin_server_thread)
        .thread_name("tokio-echo")
        .build()?;
    let listener = bind_listener()?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    let k = counters.clone();
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    rt.spawn(async move {
        loop {
            match listener.accept().await {
                // (TCP_NODELAY comes from the listener: see `bind_listener`.)
                Ok((stream, _)) => {
                    tokio::spawn(tokio_conn(stream, k.clone()));
                }
                // Out of descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    Ok(Server {
        kind: Kind::Tokio,
        addr,
        counters,
        watcher: None,
        // Dropping the runtime's tasks drops their sockets.
        stop: Some(Box::new(move || {
            rt.shutdown_timeout(Duration::from_secs(5))
        })),
    })
}

async fn tokio_conn(mut stream: tokio::net::TcpStream, k: Arc<Counters>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    struct Live(Arc<Counters>);
    impl Drop for Live {
        fn drop(&mut self) {
            self.0.live.fetch_sub(1, Relaxed);
        }
    }
    k.live.fetch_add(1, Relaxed);
    let _live = Live(k.clone());
    let mut buf = vec![0u8; BUF];
    k.ready.fetch_add(1, Relaxed);
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

const LISTENER: mio::Token = mio::Token(0);
const WAKER: mio::Token = mio::Token(1);
const FIRST_CONN: usize = 2;

/// `short`: a short read ends the drain ([`Kind::MioShort`]).
fn start_mio(short: bool) -> io::Result<Server> {
    let std_listener = bind_listener()?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let mut listener = mio::net::TcpListener::from_std(std_listener);
    let poll = mio::Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, mio::Interest::READABLE)?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let (s, k) = (stop.clone(), counters.clone());
    let handle = thread::Builder::new()
        .name("mio-echo".into())
        .spawn(move || {
            pin_server_thread();
            mio_loop(poll, listener, short, &s, &k)
        })?;
    Ok(Server {
        kind: if short { Kind::MioShort } else { Kind::Mio },
        addr,
        counters,
        watcher: None,
        stop: Some(Box::new(move || {
            stop.store(true, Relaxed);
            let _ = waker.wake();
            let _ = handle.join();
        })),
    })
}

struct MioConn {
    stream: mio::net::TcpStream,
    /// Bytes read but not yet written back; while non-empty the connection is not read.
    unsent: Vec<u8>,
}

/// A minimal slab: connection `i` has token `FIRST_CONN + i`.
struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Slab<T> {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, v: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(v);
                i
            }
            None => {
                self.entries.push(Some(v));
                self.entries.len() - 1
            }
        }
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.entries.get_mut(i).and_then(Option::as_mut)
    }

    fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.entries.get_mut(i).and_then(Option::take);
        if v.is_some() {
            self.free.push(i);
        }
        v
    }
}

fn mio_loop(
    mut poll: mio::Poll,
    listener: mio::net::TcpListener,
    short: bool,
    stop: &AtomicBool,
    k: &Counters,
) {
    let mut events = mio::Events::with_capacity(1024);
    let mut conns: Slab<MioConn> = Slab::new();
    let mut buf = vec![0u8; BUF];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            panic!("mio poll: {e}");
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => loop {
                    match listener.accept() {
                        // (TCP_NODELAY comes from the listener.)
                        Ok((stream, _)) => {
                            let i = conns.insert(MioConn {
                                stream,
                                unsent: Vec::new(),
                            });
                            let c = conns.get_mut(i).expect("just inserted");
                            let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
                            let token = mio::Token(FIRST_CONN + i);
                            if poll
                                .registry()
                                .register(&mut c.stream, token, interest)
                                .is_err()
                            {
                                conns.remove(i);
                                continue;
                            }
                            k.live.fetch_add(1, Relaxed);
                            k.ready.fetch_add(1, Relaxed);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // WouldBlock: drained. Anything else (EMFILE): the next edge retries.
                        Err(_) => break,
                    }
                },
                WAKER => {
                    if stop.load(Relaxed) {
                        return; // drops every connection
                    }
                }
                mio::Token(t) => {
                    let i = t - FIRST_CONN;
                    let Some(c) = conns.get_mut(i) else { continue };
                    // With `short`, a short read may end the drain unless the peer closed or
                    // the socket errored (no further edge would report that).
                    let short = short && !(ev.is_read_closed() || ev.is_error());
                    if !mio_serve(c, &mut buf, short) {
                        if let Some(mut c) = conns.remove(i) {
                            let _ = poll.registry().deregister(&mut c.stream);
                        }
                        k.live.fetch_sub(1, Relaxed);
                    }
                }
            }
        }
    }
}

/// Handles one readiness event of a connection; `false` closes it. `short`: a read shorter
/// than the buffer proves the socket drained (tokio's rule on epoll and kqueue, see its
/// `PollEvented::poll_read`), so the drain stops there instead of reading to `WouldBlock`.
fn mio_serve(c: &mut MioConn, buf: &mut [u8], short: bool) -> bool {
    if !c.unsent.is_empty() {
        match write_some(&mut c.stream, &c.unsent) {
            Ok(n) if n == c.unsent.len() => c.unsent.clear(),
            Ok(n) => {
                c.unsent.drain(..n);
                return true; // still blocked: wait for the next writable edge
            }
            Err(_) => return false,
        }
    }
    loop {
        match c.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => match write_some(&mut c.stream, &buf[..n]) {
                Ok(w) if w == n && short && n < buf.len() => return true,
                Ok(w) if w == n => {}
                Ok(w) => {
                    c.unsent.extend_from_slice(&buf[w..n]);
                    return true; // stop reading until the rest is written
                }
                Err(_) => return false,
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Writes as much of `data` as the socket takes now; `Ok(n)` with `n < len` means `WouldBlock`.
fn write_some(stream: &mut mio::net::TcpStream, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Stack size of the std server's connection threads: its loop needs little, and 10K+ threads
/// with the default 2 MiB would reserve tens of GiB of address space.
const STD_STACK: usize = 128 * 1024;

fn start_std() -> io::Result<Server> {
    let listener = bind_listener()?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    // The descriptor of every open connection, to shut them down when the server stops (a
    // cloned stream would double the descriptors, and 16K connections would pass the limit).
    let open: Open = Arc::default();
    let (s, k, o) = (stop.clone(), counters.clone(), open.clone());
    let accept: JoinHandle<()> =
        thread::Builder::new()
            .name("std-accept".into())
            .spawn(move || {
                pin_server_thread();
                std_accept(listener, &s, &k, &o);
            })?;
    let k = counters.clone();
    Ok(Server {
        kind: Kind::Std,
        addr,
        counters,
        watcher: None,
        stop: Some(Box::new(move || {
            stop.store(true, Relaxed);
            let _ = TcpStream::connect(addr); // wakes the blocking accept
            let _ = accept.join();
            for &fd in open.lock().unwrap_or_else(|p| p.into_inner()).values() {
                // SAFETY: a descriptor stays in `open` only while its thread holds the stream
                // open (removed under this lock before the stream is dropped), so `fd` is the
                // live connection. shutdown(2) wakes the thread's blocking read.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            let end = Instant::now() + Duration::from_secs(10);
            while k.live.load(Relaxed) != 0 && Instant::now() < end {
                thread::sleep(Duration::from_millis(2));
            }
        })),
    })
}

/// Open connections of the std server by id: their descriptors.
type Open = Arc<Mutex<HashMap<u64, std::os::fd::RawFd>>>;

fn std_accept(listener: TcpListener, stop: &AtomicBool, k: &Arc<Counters>, open: &Open) {
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if stop.load(Relaxed) {
            return;
        }
        let Ok(stream) = stream else {
            thread::sleep(Duration::from_millis(10)); // out of descriptors: back off
            continue;
        };
        // (TCP_NODELAY comes from the listener, the CPU affinity from this pinned thread.)
        let id = next_id;
        next_id += 1;
        open.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, stream.as_raw_fd());
        k.live.fetch_add(1, Relaxed);
        let (k2, o2) = (k.clone(), open.clone());
        let spawned = thread::Builder::new().stack_size(STD_STACK).spawn(move || {
            let mut stream = stream;
            std_conn(&mut stream, &k2);
            o2.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            drop(stream); // closed only once it is out of `open`
            k2.live.fetch_sub(1, Relaxed);
        });
        if spawned.is_err() {
            // Out of threads: the connection was closed with the closure. (`stop` shuts the
            // descriptors in `open` down only after this thread has exited, so no race.)
            open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            k.live.fetch_sub(1, Relaxed);
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn std_conn(stream: &mut TcpStream, k: &Counters) {
    let mut buf = vec![0u8; BUF];
    k.ready.fetch_add(1, Relaxed);
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}
