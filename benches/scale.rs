//! Scaling with the number of connections: what a proactor is for. Five measurements, each
//! against the same baselines as `echo.rs` (tokio task per connection, hand-written mio,
//! std thread per connection), with the server and the clients in separate processes:
//!
//! - **burst**: gaio's "8K concurrent echo" from 1K to 16K connections: open N connections,
//!   every one sends 1 KiB and reads it back; the completion time (connects included, as in
//!   gaio's test) is fitted to a line, seconds per 1,000 connections, as gaio's README does.
//!   Hot path: accept and registration of new connections, then one round over N ready
//!   connections (the poller's event batches, the arena, the mailbox batches).
//! - **memory**: the server's resident memory per idle connection at 10K connections, each
//!   accepted and waiting in one pending read (`VmRSS` after minus before, over N): the
//!   per-connection state a proactor promises to keep small (no task, no buffer while idle).
//! - **latency**: p50/p99 per round trip on 1, 100 and 1,000 connections in a closed loop (each
//!   connection always has one request in flight), which criterion cannot give.
//! - **syscalls**: `strace -c -f` on the server process for N echoed 128-byte messages on 1 and
//!   100 connections, minus a run with no messages (setup and teardown cancel out): system
//!   calls per echoed message, the cost the proactor's batching and wake-up avoidance target.
//! - **cpu**: the server's CPU time per echoed message while a client runs ping-pong rounds
//!   as fast as it answers (1 x 128 B, 100 x 128 B, 1,000 x 4 KiB), minus a one-round run:
//!   on loopback the client costs as much as the server, so a better server shows as less CPU
//!   for the same work more than as more throughput.
//! - **stream**: one connection streaming 1 GiB in 64 KiB non-blocking writes while reading
//!   the echo, from an independent single-threaded mio client: throughput, server CPU per MiB,
//!   and how the server moved the bytes (system calls per MiB and bytes per receive under
//!   `perf stat`, a proactor's read completions, wake-ups and arena chunks).
//! - **instructions** (opt-in, needs valgrind): the server's user-space instructions per echoed
//!   message under callgrind (1 and 100 x 128 B), minus a run with none, and the share in the
//!   proactor crate's functions: the bookkeeping a proactor adds, free of timing noise.
//!
//! Each server runs in a child process (this binary re-executed with
//! `PROACTOR_BENCH_ROLE=server`, pinned to CPU 0), the load generator in another
//! (`PROACTOR_BENCH_ROLE=client`, pinned to CPU 1), so each stays under the 20,000 fd limit at
//! 16K connections and the memory figure is the server's alone. This process only
//! orchestrates. Clients close with `SO_LINGER` 0 so 16K-connection runs leave no `TIME_WAIT`.
//!
//! ```text
//! cargo bench --bench scale -- [--quick] [--phases burst,memory,latency,syscalls,cpu,stream,instructions]
//!                              [--servers proactor,proactor-uring-inline,tokio,mio,uring-loop,std]
//!                              [--reps 3] [--out DIR] [--tracer strace|perf]
//! ```
//!
//! `--tracer perf` counts the syscalls phase's system calls with `perf stat` (the syscall
//! tracepoints, counted in the kernel at full speed) instead of `strace -c -f`.
//!
//! Prints Markdown tables and writes `scale.csv`, `scale_raw.csv`, `memory.csv`, `latency.csv`
//! `syscalls.csv` (`syscalls-perf.csv`), `cpu.csv` and `stream.csv` under `target/bench/` (or
//! `--out`). `scripts/bench.sh` runs it.

#[allow(dead_code)]
#[path = "servers/mod.rs"]
mod servers;

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use servers::process::median;
use servers::{client, Kind, Server};

const ROLE: &str = "PROACTOR_BENCH_ROLE";

fn main() {
    match env::var(ROLE).as_deref() {
        Ok("server") => server_main(),
        Ok("client") => client_main(),
        _ => {
            if let Err(e) = orchestrate() {
                eprintln!("scale: {e}");
                std::process::exit(1);
            }
        }
    }
}

fn var(name: &str) -> String {
    env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

fn var_usize(name: &str, default: usize) -> usize {
    env::var(name).map_or(default, |v| {
        v.parse().unwrap_or_else(|_| panic!("{name}={v:?}"))
    })
}

// ---------------------------------------------------------------------------------------------
// Server child: starts one server, then answers one-line commands on stdin.

fn server_main() {
    // Threads spawned from here inherit the CPU (and the servers pin their own anyway).
    servers::pin_server_thread();
    let kind = Kind::parse(&var("PROACTOR_BENCH_KIND")).expect("PROACTOR_BENCH_KIND");
    let server = Server::start(kind).unwrap_or_else(|e| panic!("{}: start: {e}", kind.name()));
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "ADDR {}", server.addr);
    let _ = out.flush();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let reply = match line.trim() {
            "stat" => format!(
                "STAT {} {} {}",
                server.counters.ready.load(Relaxed),
                server.counters.live.load(Relaxed),
                servers::rss_kib()
            ),
            "cpu" => {
                let (user, sys) = servers::cpu_us();
                format!("CPU {user} {sys}")
            }
            "idle" => {
                let ok = server.wait_idle(Duration::from_secs(30));
                format!("IDLE {}", if ok { "ok" } else { "timeout" })
            }
            "quit" => break,
            other => format!("ERROR unknown command {other:?}"),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
    let stats = server.proactor_stats();
    drop(server);
    if let Some(s) = stats {
        let _ = writeln!(
            out,
            "PSTATS {} {} {} {} {} {}",
            s.wakeups, s.batches, s.completions, s.bytes_read, s.bytes_written, s.chunks_allocated
        );
    }
    let _ = out.flush();
}

// ---------------------------------------------------------------------------------------------
// Client child: one load run, one `RESULT` line.

fn client_main() {
    servers::pin_client_thread();
    let addr: SocketAddr = var("PROACTOR_BENCH_ADDR").parse().expect("address");
    let conns = var_usize("PROACTOR_BENCH_CONNS", 1);
    let size = var_usize("PROACTOR_BENCH_SIZE", 1024);
    let rounds = var_usize("PROACTOR_BENCH_ROUNDS", 1);
    let result = match var("PROACTOR_BENCH_MODE").as_str() {
        "burst" => client_burst(addr, conns, size),
        "idle" => client_idle(addr, conns),
        "pingpong" => client_pingpong(addr, conns, size, rounds),
        "latency" => {
            let warmup = var_usize("PROACTOR_BENCH_WARMUP", rounds / 10);
            let limit = Duration::from_secs(var_usize("PROACTOR_BENCH_LIMIT_S", 30) as u64);
            client_latency(addr, conns, size, warmup, rounds, limit)
        }
        "stream" => {
            let limit = Duration::from_secs(var_usize("PROACTOR_BENCH_LIMIT_S", 60) as u64);
            client_stream(addr, size, rounds as u64 * (1 << 20), limit)
        }
        m => panic!("unknown mode {m:?}"),
    };
    match result {
        Ok(line) => println!("RESULT {line}"),
        Err(e) => {
            println!("ERROR {e}");
            std::process::exit(1);
        }
    }
}

fn client_burst(addr: SocketAddr, n: usize, size: usize) -> io::Result<String> {
    let msg = client::message(size);
    let mut buf = vec![0u8; size];
    let t0 = Instant::now();
    let mut conns = client::connect_n(addr, n)?;
    let t1 = Instant::now();
    client::round(&mut conns, &msg, &mut buf)?;
    let t2 = Instant::now();
    client::close_all(conns);
    let (connect, echo) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
    Ok(format!("{connect:.6} {echo:.6}"))
}

fn client_idle(addr: SocketAddr, n: usize) -> io::Result<String> {
    let conns = client::connect_n(addr, n)?;
    println!("READY");
    io::stdout().flush()?;
    // Hold the connections until the orchestrator says so (or goes away).
    let mut line = String::new();
    let _ = io::stdin().lock().read_line(&mut line);
    client::close_all(conns);
    Ok("done".into())
}

fn client_pingpong(addr: SocketAddr, n: usize, size: usize, rounds: usize) -> io::Result<String> {
    let msg = client::message(size);
    let mut buf = vec![0u8; size];
    let mut conns = client::connect_n(addr, n)?;
    let mut rest = Duration::ZERO;
    if rounds > 0 {
        client::checked_round(&mut conns, &msg)?;
        let t = Instant::now();
        for _ in 1..rounds {
            client::round(&mut conns, &msg, &mut buf)?;
        }
        rest = t.elapsed();
    }
    client::close_all(conns);
    // Messages echoed, and the seconds the rounds after the first (checked) one took.
    Ok(format!("{} {:.6}", n * rounds, rest.as_secs_f64()))
}

/// The independent 64 KiB stream client (`client::mio_stream`): `total` bytes in `chunk`-byte
/// writes. Prints bytes echoed, seconds, writes, reads and the client's poll wake-ups. With
/// `PROACTOR_BENCH_STREAM_CLIENT=echo`, the echo bench's stream client instead
/// (`client::stream`: one write attempt and one read into 256 KiB per turn), for comparison.
fn client_stream(
    addr: SocketAddr,
    chunk: usize,
    total: u64,
    limit: Duration,
) -> io::Result<String> {
    let data = client::message(chunk);
    if env::var("PROACTOR_BENCH_STREAM_CLIENT").is_ok_and(|v| v.trim() == "echo") {
        let mut rbuf = vec![0u8; 256 * 1024];
        let mut conns = client::connect_n(addr, 1)?;
        client::checked_round(&mut conns, &data)?;
        let t = Instant::now();
        let (writes, reads, polls) = client::stream(&mut conns[0], total, &data, &mut rbuf)?;
        let wall = t.elapsed();
        client::close_all(conns);
        return Ok(format!(
            "{total} {:.6} {writes} {reads} {polls}",
            wall.as_secs_f64()
        ));
    }
    let mut rbuf = vec![0u8; 64 * 1024];
    let r = client::mio_stream(addr, total, &data, &mut rbuf, limit)?;
    Ok(format!(
        "{} {:.6} {} {} {}",
        r.bytes,
        r.wall.as_secs_f64(),
        r.writes,
        r.reads,
        r.polls
    ))
}

fn client_latency(
    addr: SocketAddr,
    n: usize,
    size: usize,
    warmup: usize,
    rounds: usize,
    limit: Duration,
) -> io::Result<String> {
    let (mut lat, done, wall) = client::closed_loop_latency(addr, n, size, warmup, rounds, limit)?;
    lat.sort_unstable();
    let us = |q: f64| client::quantile(&lat, q) as f64 / 1e3;
    let rate = done as f64 / wall.as_secs_f64().max(1e-9);
    Ok(format!(
        "{} {:.1} {:.1} {:.1} {:.1} {:.0} {}",
        lat.len(),
        us(0.50),
        us(0.99),
        us(0.999),
        us(1.0),
        rate,
        u8::from(done < n * (warmup + rounds)),
    ))
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A re-executed copy of this binary, its stdin, and its stdout as a channel of lines.
struct Proc {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(what: String, envs: &[(&str, String)], wrap: &[String]) -> io::Result<Proc> {
        let exe = env::current_exe()?;
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.env_remove(ROLE)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            what,
            child,
            stdin,
            lines,
        })
    }

    fn send(&mut self, line: &str) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("stdin closed"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }

    /// The next line starting with `prefix` (the prefix removed); an `ERROR` line, the end of
    /// output or `timeout` is an error.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> io::Result<String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_string());
                    }
                    if line.starts_with("ERROR") {
                        return Err(io::Error::other(format!("{}: {line}", self.what)));
                    }
                    println!("  [{}] {line}", self.what);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let e = format!("{}: no {prefix:?} line within {timeout:?}", self.what);
                    return Err(io::Error::new(io::ErrorKind::TimedOut, e));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let e = format!("{}: exited before a {prefix:?} line", self.what);
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, e));
                }
            }
        }
    }

    /// Closes stdin and waits for the exit (killing the process after `timeout`); returns
    /// the lines it printed meanwhile.
    fn finish(&mut self, timeout: Duration) -> io::Result<(ExitStatus, Vec<String>)> {
        self.stdin = None;
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // The reader thread ends at EOF, shortly after the exit.
                let mut rest = Vec::new();
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    rest.push(l);
                }
                return Ok((status, rest));
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let e = format!("{}: still running after {timeout:?}, killed", self.what);
                return Err(io::Error::new(io::ErrorKind::TimedOut, e));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A proactor server's counters at exit (`Watcher::stats`): wakeups, batches, completions,
/// bytes read, bytes written, arena chunks allocated.
type Pstats = [u64; 6];

struct ServerProc {
    kind: Kind,
    proc: Proc,
    addr: SocketAddr,
}

struct Stat {
    ready: usize,
    live: usize,
    rss_kib: u64,
}

impl ServerProc {
    fn start(kind: Kind, wrap: &[String]) -> io::Result<ServerProc> {
        let envs = [
            (ROLE, "server".to_string()),
            ("PROACTOR_BENCH_KIND", kind.name().to_string()),
        ];
        let mut proc = Proc::spawn(format!("{} server", kind.name()), &envs, wrap)?;
        let addr = proc.expect("ADDR", Duration::from_secs(30))?;
        let addr = addr.parse().map_err(io::Error::other)?;
        Ok(ServerProc { kind, proc, addr })
    }

    /// Sends `cmd` and returns the `N` numbers of the reply line starting with `prefix`.
    fn ask<const N: usize>(&mut self, cmd: &str, prefix: &str) -> io::Result<[u64; N]> {
        self.proc.send(cmd)?;
        let line = self.proc.expect(prefix, Duration::from_secs(10))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        v.try_into()
            .map_err(|_| io::Error::other(format!("bad {prefix} line {line:?}")))
    }

    fn stat(&mut self) -> io::Result<Stat> {
        let [ready, live, rss_kib] = self.ask("stat", "STAT")?;
        Ok(Stat {
            ready: ready as usize,
            live: live as usize,
            rss_kib,
        })
    }

    /// The server process's CPU time so far, user + system, in microseconds.
    fn cpu_us(&mut self) -> io::Result<u64> {
        let [user, sys] = self.ask("cpu", "CPU")?;
        Ok(user + sys)
    }

    /// Waits until the server has closed every connection (the client closed them).
    fn idle(&mut self) -> io::Result<()> {
        self.proc.send("idle")?;
        match self.proc.expect("IDLE", Duration::from_secs(40))?.as_str() {
            "ok" => Ok(()),
            _ => Err(io::Error::other(format!(
                "{}: connections still open 30 s after the client closed them",
                self.kind.name()
            ))),
        }
    }

    /// [`idle`](Self::idle), or a fresh server if this one could not shed its connections.
    fn settle(mut self) -> io::Result<ServerProc> {
        match self.idle() {
            Ok(()) => Ok(self),
            Err(e) => {
                eprintln!("{e}; restarting it");
                let kind = self.kind;
                drop(self);
                ServerProc::start(kind, &[])
            }
        }
    }

    /// Stops the server; returns the proactor's counters if it printed them.
    fn quit(mut self) -> io::Result<Option<Pstats>> {
        let _ = self.proc.send("quit");
        let (status, lines) = self.proc.finish(Duration::from_secs(30))?;
        if !status.success() {
            return Err(io::Error::other(format!("{}: {status}", self.proc.what)));
        }
        Ok(lines.iter().find_map(|l| {
            let v: Vec<u64> = l
                .strip_prefix("PSTATS")?
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            v.try_into().ok()
        }))
    }
}

/// Runs one client to completion; its `RESULT` line, split into fields.
fn run_client(
    addr: SocketAddr,
    mode: &str,
    conns: usize,
    size: usize,
    rounds: usize,
    timeout: Duration,
) -> io::Result<Vec<String>> {
    let envs = [
        (ROLE, "client".to_string()),
        ("PROACTOR_BENCH_ADDR", addr.to_string()),
        ("PROACTOR_BENCH_MODE", mode.to_string()),
        ("PROACTOR_BENCH_CONNS", conns.to_string()),
        ("PROACTOR_BENCH_SIZE", size.to_string()),
        ("PROACTOR_BENCH_ROUNDS", rounds.to_string()),
        (
            "PROACTOR_BENCH_LIMIT_S",
            timeout.as_secs().saturating_sub(10).to_string(),
        ),
    ];
    let mut p = Proc::spawn(format!("{mode} client x{conns}"), &envs, &[])?;
    let line = p.expect("RESULT", timeout)?;
    p.finish(Duration::from_secs(10))?;
    Ok(line.split_whitespace().map(String::from).collect())
}

// ---------------------------------------------------------------------------------------------
// Orchestration

struct Opts {
    quick: bool,
    phases: Vec<String>,
    servers: Vec<Kind>,
    reps: usize,
    out: PathBuf,
    /// What counts the syscalls phase's system calls: `strace` (the default: `strace -c -f`)
    /// or `perf` (`perf stat` of the syscall tracepoints: counts at full speed).
    tracer: String,
}

const PHASES: [&str; 6] = ["burst", "memory", "latency", "syscalls", "cpu", "stream"];
/// Phases run only when named (slow, or needing a tool a fresh machine lacks).
const OPT_IN: [&str; 1] = ["instructions"];

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        quick: servers::runs::quick_env(),
        phases: PHASES.map(String::from).to_vec(),
        servers: Kind::selected(),
        reps: 0,
        out: servers::runs::default_out(),
        tracer: "strace".into(),
    };
    let mut args = env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--quick" => o.quick = true,
            "--phases" => o.phases = value()?.split(',').map(String::from).collect(),
            "--servers" => o.servers = Kind::parse_list(&value()?),
            "--reps" => o.reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--out" => o.out = PathBuf::from(value()?),
            "--tracer" => o.tracer = value()?,
            _ => {
                return Err(format!(
                    "unknown argument {a:?} (see the doc at the top of scale.rs)"
                ))
            }
        }
    }
    if o.reps == 0 {
        o.reps = if o.quick { 1 } else { 3 };
    }
    if o.tracer != "strace" && o.tracer != "perf" {
        return Err(format!("--tracer {:?}: strace or perf", o.tracer));
    }
    for p in &o.phases {
        if !PHASES.contains(&p.as_str()) && !OPT_IN.contains(&p.as_str()) {
            return Err(format!("unknown phase {p:?}"));
        }
    }
    Ok(o)
}

fn orchestrate() -> io::Result<()> {
    let o = parse_args().map_err(io::Error::other)?;
    fs::create_dir_all(&o.out)?;
    let pins = servers::pins();
    println!(
        "scale: servers {:?}, server CPU {:?}, client CPU {:?}{}; CSV files in {}",
        o.servers.iter().map(|k| k.name()).collect::<Vec<_>>(),
        pins.server,
        pins.client,
        if o.quick { ", quick sizes" } else { "" },
        o.out.display()
    );
    for phase in &o.phases {
        let t = Instant::now();
        match phase.as_str() {
            "burst" => burst(&o)?,
            "memory" => memory(&o)?,
            "latency" => latency(&o)?,
            "syscalls" => syscalls(&o)?,
            "cpu" => cpu(&o)?,
            "stream" => stream(&o)?,
            "instructions" => instructions(&o)?,
            _ => unreachable!(),
        }
        println!("({phase}: {:.1} s)\n", t.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Least-squares line through `(x, y)`: slope, intercept and R².
fn fit(points: &[(f64, f64)]) -> (f64, f64, f64) {
    let pts: Vec<_> = points.iter().filter(|p| p.1.is_finite()).collect();
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let syy: f64 = pts.iter().map(|p| (p.1 - my).powi(2)).sum();
    let slope = sxy / sxx;
    let r2 = if syy == 0.0 {
        1.0
    } else {
        (sxy * sxy) / (sxx * syy)
    };
    (slope, my - slope * mx, r2)
}

fn write_file(o: &Opts, name: &str, text: &str) -> io::Result<()> {
    let path = o.out.join(name);
    fs::write(&path, text)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenDrops`, which includes `ListenOverflows`, in /proc/net/netstat): each one costs its client a SYN
/// retransmission, one second or more, which then dominates a burst's connect time.
fn listen_drops() -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenDrops")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Seconds with 4 decimals, or "fail" for a run that did not finish.
fn secs(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "fail".into()
    }
}

fn burst(o: &Opts) -> io::Result<()> {
    let sizes: &[usize] = if o.quick {
        &[100, 200, 400]
    } else {
        &[1_000, 2_000, 4_000, 8_000, 12_000, 16_000]
    };
    println!("## Burst: N connections, each sends 1 KiB and reads it back (median of {} runs, seconds)\n", o.reps);
    let mut raw = String::from("server,conns,rep,connect_s,echo_s,total_s,listen_drops\n");
    let mut csv = String::from("server,conns,connect_s,echo_s,total_s\n");
    let mut table = String::from("| server |");
    for n in sizes {
        let _ = write!(table, " {n} |");
    }
    table.push_str(" s per 1K conns (fit) | R² | echo only, s per 1K |\n|---|");
    table.push_str(&"---:|".repeat(sizes.len() + 3));
    table.push('\n');
    for &kind in &o.servers {
        let mut srv = ServerProc::start(kind, &[])?;
        let (mut totals, mut echoes) = (Vec::new(), Vec::new());
        let _ = write!(table, "| {} |", kind.name());
        for &n in sizes {
            let (mut c, mut e, mut t) = (Vec::new(), Vec::new(), Vec::new());
            for rep in 0..o.reps {
                let overflows = listen_drops();
                let r = run_client(srv.addr, "burst", n, 1024, 1, Duration::from_secs(180));
                let overflows = listen_drops().saturating_sub(overflows);
                if overflows > 0 {
                    eprintln!(
                        "{} x{n}: {overflows} connections dropped at the listen queue \
                         (SYN retransmits inflate connect time)",
                        kind.name()
                    );
                }
                let (cs, es) = match r.as_deref() {
                    Ok([cs, es]) => (
                        cs.parse().unwrap_or(f64::NAN),
                        es.parse().unwrap_or(f64::NAN),
                    ),
                    Ok(other) => {
                        eprintln!("{} x{n}: unexpected result {other:?}", kind.name());
                        (f64::NAN, f64::NAN)
                    }
                    Err(err) => {
                        eprintln!("{} x{n}: {err}", kind.name());
                        (f64::NAN, f64::NAN)
                    }
                };
                let _ = writeln!(
                    raw,
                    "{},{n},{rep},{cs:.6},{es:.6},{:.6},{overflows}",
                    kind.name(),
                    cs + es
                );
                c.push(cs);
                e.push(es);
                t.push(cs + es);
                srv = srv.settle()?;
            }
            let (mc, me, mt) = (median(&mut c), median(&mut e), median(&mut t));
            let _ = writeln!(csv, "{},{n},{mc:.6},{me:.6},{mt:.6}", kind.name());
            let _ = write!(table, " {} |", secs(mt));
            totals.push((n as f64 / 1000.0, mt));
            echoes.push((n as f64 / 1000.0, me));
        }
        let (slope, _, r2) = fit(&totals);
        let (eslope, _, _) = fit(&echoes);
        let _ = writeln!(table, " {} | {r2:.3} | {} |", secs(slope), secs(eslope));
        if let Err(e) = srv.quit() {
            eprintln!("{}: {e}", kind.name());
        }
    }
    println!("{table}");
    write_file(o, "scale.csv", &csv)?;
    write_file(o, "scale_raw.csv", &raw)
}

fn memory(o: &Opts) -> io::Result<()> {
    let n = if o.quick { 1_000 } else { 10_000 };
    println!(
        "## Memory: server VmRSS per idle connection, {n} connections with one pending read each\n"
    );
    let mut table = String::from(
        "| server | RSS before (KiB) | RSS with conns (KiB) | bytes per connection |\n|---|---:|---:|---:|\n",
    );
    let mut csv = String::from("server,conns,rss_before_kib,rss_after_kib,bytes_per_conn\n");
    for &kind in &o.servers {
        match memory_one(kind, n) {
            Ok((before, after, ready)) => {
                let per = (after as f64 - before as f64) * 1024.0 / ready as f64;
                let note = if ready < n {
                    format!(" (only {ready} of {n} accepted)")
                } else {
                    String::new()
                };
                let _ = writeln!(
                    table,
                    "| {} | {before} | {after} | {per:.0}{note} |",
                    kind.name()
                );
                let _ = writeln!(csv, "{},{ready},{before},{after},{per:.1}", kind.name());
            }
            Err(e) => {
                eprintln!("memory, {}: {e}", kind.name());
                let _ = writeln!(table, "| {} | fail | fail | fail |", kind.name());
            }
        }
    }
    println!("{table}");
    write_file(o, "memory.csv", &csv)
}

/// RSS before and with `n` idle connections, and how many the server took (fewer than `n`
/// if it stopped accepting, e.g. out of threads).
fn memory_one(kind: Kind, n: usize) -> io::Result<(u64, u64, usize)> {
    let mut srv = ServerProc::start(kind, &[])?;
    // Warm up: lazily allocated state (arena chunks, buffers, thread caches) is not
    // per-connection cost.
    run_client(srv.addr, "burst", 64, 1024, 1, Duration::from_secs(60))?;
    srv.idle()?;
    thread::sleep(Duration::from_millis(200));
    let before = srv.stat()?;
    let envs = [
        (ROLE, "client".to_string()),
        ("PROACTOR_BENCH_ADDR", srv.addr.to_string()),
        ("PROACTOR_BENCH_MODE", "idle".to_string()),
        ("PROACTOR_BENCH_CONNS", n.to_string()),
    ];
    let mut idle = Proc::spawn(format!("idle client x{n}"), &envs, &[])?;
    idle.expect("READY", Duration::from_secs(120))?;
    // Until every connection is in, or none came in for 5 s (60 s at most).
    let (start, mut last_change, mut last) = (Instant::now(), Instant::now(), 0);
    let ready = loop {
        let s = srv.stat()?;
        let ready = s.ready - before.ready;
        if ready != last {
            (last, last_change) = (ready, Instant::now());
        }
        if (ready >= n && s.live >= n)
            || last_change.elapsed() > Duration::from_secs(5)
            || start.elapsed() > Duration::from_secs(60)
        {
            break ready;
        }
        thread::sleep(Duration::from_millis(20));
    };
    if ready == 0 {
        return Err(io::Error::other("no connection was accepted"));
    }
    thread::sleep(Duration::from_millis(500)); // let the pending reads settle
    let after = srv.stat()?;
    let _ = idle.send("done");
    idle.expect("RESULT", Duration::from_secs(60))?;
    idle.finish(Duration::from_secs(10))?;
    srv.idle()?;
    srv.quit()?;
    Ok((before.rss_kib, after.rss_kib, ready))
}

fn latency(o: &Opts) -> io::Result<()> {
    // (connections, message size, recorded round trips per connection)
    let cases: &[(usize, usize, usize)] = if o.quick {
        &[(1, 128, 500), (10, 128, 100), (100, 4096, 20)]
    } else {
        &[(1, 128, 20_000), (100, 128, 2_000), (1_000, 4096, 200)]
    };
    println!("## Latency: closed loop, one request in flight per connection (microseconds per round trip)\n");
    let mut table = String::from(
        "| server | conns x size | round trips | p50 µs | p99 µs | p99.9 µs | max µs | round trips/s |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut csv = String::from("server,conns,size,samples,p50_us,p99_us,p999_us,max_us,per_s\n");
    for &kind in &o.servers {
        let mut srv = ServerProc::start(kind, &[])?;
        for &(conns, size, rounds) in cases {
            let r = run_client(
                srv.addr,
                "latency",
                conns,
                size,
                rounds,
                Duration::from_secs(40),
            );
            let r = match r {
                Ok(r) if r.len() == 7 => r,
                other => {
                    eprintln!("latency, {} x{conns}: {other:?}", kind.name());
                    let _ = writeln!(
                        table,
                        "| {} | {conns} x {size} B | fail | | | | | |",
                        kind.name()
                    );
                    srv = srv.settle()?;
                    continue;
                }
            };
            if r[6] == "1" {
                eprintln!(
                    "{} x{conns}: time limit hit before all round trips",
                    kind.name()
                );
            }
            let _ = writeln!(
                table,
                "| {} | {conns} x {size} B | {} | {} | {} | {} | {} | {} |",
                kind.name(),
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5]
            );
            let _ = writeln!(csv, "{},{conns},{size},{}", kind.name(), r[..6].join(","));
            srv = srv.settle()?;
        }
        if let Err(e) = srv.quit() {
            eprintln!("{}: {e}", kind.name());
        }
    }
    println!("{table}");
    write_file(o, "latency.csv", &csv)
}

/// `strace -c` summary: syscall -> (calls, errors).
fn parse_strace(text: &str) -> BTreeMap<String, (u64, u64)> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.len() < 5 || line.starts_with('%') || line.starts_with('-') {
            continue;
        }
        let name = t[t.len() - 1];
        if name == "total" {
            continue;
        }
        // % time, seconds, usecs/call, calls, [errors], syscall
        let calls = t[3].parse().unwrap_or(0);
        let errors = if t.len() >= 6 {
            t[4].parse().unwrap_or(0)
        } else {
            0
        };
        m.insert(name.to_string(), (calls, errors));
    }
    m
}

/// Whether `tool` is installed: `tool version_flag` runs and succeeds.
fn installed(tool: &str, version_flag: &str) -> bool {
    Command::new(tool)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Syscalls not counted per message: the orchestration's sleeps and polls of this harness.
const HARNESS_SYSCALLS: &[&str] = &["clock_nanosleep", "nanosleep"];

/// The columns shown (anything else is summed into "other").
const SHOWN: &[&str] = &[
    "io_uring_enter",
    "epoll_wait",
    "epoll_pwait",
    "recvfrom",
    "read",
    "sendto",
    "sendmsg",
    "writev",
    "write",
    "futex",
];

/// Syscall counts and proactor counters of one server process under `strace -c -f`, serving
/// `rounds` ping-pong rounds of 128 bytes on `conns` connections.
type Traced = (BTreeMap<String, (u64, u64)>, Option<Pstats>);

fn traced_run(o: &Opts, kind: Kind, conns: usize, rounds: usize) -> io::Result<Traced> {
    let file = o
        .out
        .join(format!("{}-{}-{conns}-{rounds}.txt", o.tracer, kind.name()));
    let wrap = if o.tracer == "perf" {
        perf_wrap(&file)
    } else {
        ["strace", "-f", "-c", "-q", "-o"]
            .map(String::from)
            .into_iter()
            .chain([file.display().to_string()])
            .collect::<Vec<_>>()
    };
    let pstats = wrapped_pingpong(kind, &wrap, conns, rounds, Duration::from_secs(300))?;
    let text = fs::read_to_string(&file)?;
    let counts = if o.tracer == "perf" {
        parse_perf(&text)
    } else {
        parse_strace(&text)
    };
    Ok((counts, pstats))
}

/// The system calls `perf stat` counts one by one (every other call is in "other", from the
/// total of `raw_syscalls:sys_enter`).
const PERF_SYSCALLS: &[&str] = &[
    "io_uring_enter",
    "epoll_wait",
    "epoll_pwait",
    "recvfrom",
    "read",
    "sendto",
    "sendmsg",
    "writev",
    "write",
    "futex",
    "clock_nanosleep",
    "nanosleep",
];

/// The command prefix that counts a process's system calls with `perf stat` (the syscall
/// tracepoints, every thread, written to `file` as CSV when it exits). The counting happens
/// in the kernel, so unlike strace it does not slow the calls or change the batching.
fn perf_wrap(file: &Path) -> Vec<String> {
    let mut events = String::from("raw_syscalls:sys_enter,context-switches");
    for s in PERF_SYSCALLS {
        let _ = write!(events, ",syscalls:sys_enter_{s}");
    }
    ["perf", "stat", "-x", ",", "-e", &events, "-o"]
        .map(String::from)
        .into_iter()
        .chain([file.display().to_string(), "--".into()])
        .collect()
}

/// Whether `perf stat` can count syscall tracepoints here (root, or a permissive
/// `perf_event_paranoid`, and tracefs).
fn perf_works() -> bool {
    Command::new("perf")
        .args(["stat", "-e", "syscalls:sys_enter_getpid", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The context switches (every thread's) in `perf_wrap`'s output: how often the server slept
/// or was preempted.
fn perf_context_switches(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(',').collect();
        (f.len() >= 3 && f[2].trim() == "context-switches")
            .then(|| f[0].trim().parse().ok())
            .flatten()
    })
}

/// `perf stat -x,` output: syscall -> (calls, 0), with the calls not counted one by one
/// under "other".
fn parse_perf(text: &str) -> BTreeMap<String, (u64, u64)> {
    let mut m = BTreeMap::new();
    let mut all = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 3 {
            continue;
        }
        let Ok(count) = f[0].trim().parse::<u64>() else {
            continue; // "<not counted>", comments
        };
        let event = f[2].trim();
        if event == "raw_syscalls:sys_enter" {
            all = count;
        } else if let Some(name) = event.strip_prefix("syscalls:sys_enter_") {
            m.insert(name.to_string(), (count, 0));
        }
    }
    let named: u64 = m.values().map(|v| v.0).sum();
    m.insert("other".into(), (all.saturating_sub(named), 0));
    m
}

/// Starts a server under `wrap` (strace, valgrind), runs `rounds` ping-pong rounds of 128
/// bytes on `conns` connections against it and stops it; returns its proactor counters.
fn wrapped_pingpong(
    kind: Kind,
    wrap: &[String],
    conns: usize,
    rounds: usize,
    timeout: Duration,
) -> io::Result<Option<Pstats>> {
    let mut srv = ServerProc::start(kind, wrap)?;
    run_client(srv.addr, "pingpong", conns, 128, rounds, timeout)?;
    srv.idle()?;
    srv.quit()
}

fn syscalls(o: &Opts) -> io::Result<()> {
    if o.tracer == "perf" && !perf_works() {
        println!("## Syscalls: skipped, `perf stat` cannot count syscall tracepoints here\n");
        return Ok(());
    }
    if o.tracer == "strace" && !installed("strace", "-V") {
        println!("## Syscalls: skipped, strace is not installed (apt-get install strace)\n");
        return Ok(());
    }
    let msgs = if o.quick { 2_000 } else { 20_000 };
    let how = if o.tracer == "perf" {
        "perf stat of the syscall tracepoints"
    } else {
        "strace -c -f"
    };
    println!("## Syscalls per echoed 128-byte message (server process, {how}, {msgs} messages minus a run with none)\n");
    let mut table = String::from("| server | conns | total |");
    for s in SHOWN {
        let _ = write!(table, " {s} |");
    }
    table.push_str(" other | proactor wakeups |\n|---|---:|---:|");
    table.push_str(&"---:|".repeat(SHOWN.len() + 2));
    table.push('\n');
    let mut csv = String::from("server,conns,messages,syscall,calls_per_msg,errors_per_msg\n");
    for &kind in &o.servers {
        for conns in [1usize, 100] {
            let rounds = msgs / conns;
            let m = (rounds * conns) as f64;
            let runs = match [rounds, 0].map(|r| traced_run(o, kind, conns, r)) {
                [Ok(run), Ok(base)] => [run, base],
                [a, b] => {
                    let e = a.err().or(b.err()).expect("one failed");
                    eprintln!("syscalls, {} x{conns}: {e}", kind.name());
                    let _ = writeln!(table, "| {} | {conns} | fail |", kind.name());
                    continue;
                }
            };
            let (run, base) = (&runs[0], &runs[1]);
            let names: std::collections::BTreeSet<&String> =
                run.0.keys().chain(base.0.keys()).collect();
            let (mut total, mut other) = (0.0, 0.0);
            let mut per = BTreeMap::new();
            for name in names {
                if HARNESS_SYSCALLS.contains(&name.as_str()) {
                    continue;
                }
                let (c1, e1) = run.0.get(name).copied().unwrap_or_default();
                let (c0, e0) = base.0.get(name).copied().unwrap_or_default();
                let calls = (c1 as f64 - c0 as f64) / m;
                let errors = (e1 as f64 - e0 as f64) / m;
                let _ = writeln!(
                    csv,
                    "{},{conns},{m},{name},{calls:.4},{errors:.4}",
                    kind.name()
                );
                total += calls;
                if !SHOWN.contains(&name.as_str()) {
                    other += calls;
                }
                per.insert(name.clone(), calls);
            }
            let _ = write!(table, "| {} | {conns} | {total:.2} |", kind.name());
            for s in SHOWN {
                let v = per.get(*s).copied().unwrap_or(0.0);
                let _ = write!(table, " {:.2} |", if v.abs() < 0.005 { 0.0 } else { v });
            }
            let wakeups = match (run.1, base.1) {
                (Some(a), Some(b)) => format!("{:.2}", (a[0] as f64 - b[0] as f64) / m),
                _ => "-".into(),
            };
            let _ = writeln!(table, " {other:.2} | {wakeups} |");
        }
    }
    println!("{table}");
    if o.tracer == "perf" {
        println!("(`read`/`write` include the eventfd wake-ups; `futex` is the mailbox and command-queue hand-off between threads. Counted in the kernel at full speed; perf does not count errors.)\n");
        write_file(o, "syscalls-perf.csv", &csv)
    } else {
        println!("(`read`/`write` include the eventfd wake-ups; `futex` is the mailbox and command-queue hand-off between threads; errors, e.g. EAGAIN, are in syscalls.csv. strace slows every call, which changes batching: treat these as counts under load, not timings.)\n");
        write_file(o, "syscalls.csv", &csv)
    }
}

/// User-space instructions of one server process under callgrind serving `rounds` ping-pong
/// rounds of 128 bytes on `conns` connections: (all, in functions of the proactor crate).
fn counted_run(o: &Opts, kind: Kind, conns: usize, rounds: usize) -> io::Result<[u64; 2]> {
    let file = o
        .out
        .join(format!("callgrind-{}-{conns}-{rounds}.out", kind.name()));
    let wrap = vec![
        "valgrind".to_string(),
        "--tool=callgrind".to_string(),
        "--quiet".to_string(),
        format!("--callgrind-out-file={}", file.display()),
    ];
    wrapped_pingpong(kind, &wrap, conns, rounds, Duration::from_secs(600))?;
    let out = Command::new("callgrind_annotate")
        .args(["--inclusive=no", "--threshold=100", "--auto=no"])
        .arg(&file)
        .output()?;
    parse_callgrind(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| io::Error::other(format!("no totals in {}", file.display())))
}

/// `callgrind_annotate` output: the program's total instructions and those of functions
/// whose name has `proactor::` in it (the crate's own code; what it inlines into the
/// server loop is counted with the loop).
fn parse_callgrind(text: &str) -> Option<[u64; 2]> {
    let count = |line: &str| -> Option<u64> {
        let n = line.split_whitespace().next()?;
        n.replace(',', "").parse().ok()
    };
    let total = text
        .lines()
        .find(|l| l.contains("PROGRAM TOTALS"))
        .and_then(count)?;
    // Rows of the function table: "count (share%)  file:function [object]".
    let own = text
        .lines()
        .filter(|l| l.contains("%)"))
        .filter(|l| {
            let function = l.split_once("%)").map_or("", |(_, r)| r.trim());
            let function = function.split_once(':').map_or(function, |(_, f)| f);
            // (Trait impls demangle as `<proactor::..::X as core::..>::f`.)
            function.starts_with("proactor::") || function.starts_with("<proactor::")
        })
        .filter_map(count)
        .sum();
    Some([total, own])
}

/// User-space instructions per echoed message, counted by callgrind: unlike time, a count
/// that does not move with the machine's noise, so a change of a few instructions per
/// message in the bookkeeping shows. The kernel's work (most of a message's cost, see the
/// profile in docs/benchmarks.md) is not in it, and atomic instructions count as one each.
/// Opt-in (`--phases instructions`): valgrind is not on a fresh machine, and it runs each
/// server some 50 times slower.
fn instructions(o: &Opts) -> io::Result<()> {
    if !installed("valgrind", "--version") {
        println!(
            "## Instructions: skipped, valgrind is not installed (apt-get install valgrind)\n"
        );
        return Ok(());
    }
    let msgs = if o.quick { 2_000 } else { 20_000 };
    println!("## User-space instructions per echoed 128-byte message (server process, callgrind, {msgs} messages minus a run with none)\n");
    let mut table = String::from(
        "| server | conns | instructions per message | in proactor's functions |\n|---|---:|---:|---:|\n",
    );
    let mut csv = String::from("server,conns,messages,instructions_per_msg,proactor_per_msg\n");
    for &kind in &o.servers {
        for conns in [1usize, 100] {
            let rounds = msgs / conns;
            let m = (rounds * conns) as f64;
            let [run, base] = [rounds, 0].map(|r| counted_run(o, kind, conns, r));
            let (run, base) = match (run, base) {
                (Ok(run), Ok(base)) => (run, base),
                (a, b) => {
                    let e = a.err().or(b.err()).expect("one failed");
                    eprintln!("instructions, {} x{conns}: {e}", kind.name());
                    let _ = writeln!(table, "| {} | {conns} | fail | fail |", kind.name());
                    continue;
                }
            };
            let per = |i: usize| (run[i] as f64 - base[i] as f64) / m;
            let _ = writeln!(
                table,
                "| {} | {conns} | {:.0} | {:.0} |",
                kind.name(),
                per(0),
                per(1)
            );
            let _ = writeln!(
                csv,
                "{},{conns},{m},{:.1},{:.1}",
                kind.name(),
                per(0),
                per(1)
            );
        }
    }
    println!("{table}");
    println!("(callgrind serialises the server's threads and slows them, which changes batching: at 100 connections more messages share an `epoll_wait`, so the per-round costs weigh less than at full speed.)\n");
    write_file(o, "instructions.csv", &csv)
}

/// Server CPU time per echoed message at saturation: the client runs ping-pong rounds as fast
/// as the server answers them, and the server process's CPU time (user + system, every
/// thread) over the run, minus that of a run of one round (connects, accepts and closes
/// cancel out), is divided by the messages of the other rounds. On loopback the client costs
/// as much as the server, so throughput alone hides how much of its core a server needs.
fn cpu(o: &Opts) -> io::Result<()> {
    // (connections, message size, rounds)
    let cases: &[(usize, usize, usize)] = if o.quick {
        &[(1, 128, 500), (10, 128, 100), (100, 4096, 20)]
    } else {
        &[(1, 128, 10_000), (100, 128, 2_000), (1_000, 4096, 200)]
    };
    println!(
        "## Server CPU per echoed message at saturation (median of {} runs)\n",
        o.reps
    );
    let mut csv = String::from("server,conns,size,messages,per_s,cpu_us_per_msg,cpu_busy\n");
    // (server, case) -> (messages/s, CPU µs per message, CPU busy share), medians.
    let mut rows: Vec<(Kind, usize, [f64; 3])> = Vec::new();
    for &kind in &o.servers {
        let mut srv = ServerProc::start(kind, &[])?;
        for (case, &(conns, size, rounds)) in cases.iter().enumerate() {
            let mut runs: [Vec<f64>; 3] = Default::default();
            for _ in 0..o.reps {
                match cpu_run(&mut srv, conns, size, rounds) {
                    Ok(r) => {
                        for (v, x) in runs.iter_mut().zip(r) {
                            v.push(x);
                        }
                    }
                    Err(e) => {
                        eprintln!("cpu, {} x{conns}: {e}", kind.name());
                        srv = srv.settle()?;
                    }
                }
            }
            if runs[0].is_empty() {
                continue;
            }
            let m = runs.map(|mut v| median(&mut v));
            let _ = writeln!(
                csv,
                "{},{conns},{size},{},{:.0},{:.3},{:.3}",
                kind.name(),
                (rounds - 1) * conns,
                m[0],
                m[1],
                m[2]
            );
            rows.push((kind, case, m));
        }
        if let Err(e) = srv.quit() {
            eprintln!("{}: {e}", kind.name());
        }
    }
    let mut table = String::from(
        "| server | conns x size | messages/s | server CPU µs per message | server CPU busy | CPU per message / mio's | / uring-loop's |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for (case, &(conns, size, _)) in cases.iter().enumerate() {
        let base = |name: &str| {
            rows.iter()
                .find(|r| r.1 == case && r.0.name() == name)
                .map(|r| r.2[1])
        };
        let (mio, uring) = (base("mio"), base("uring-loop"));
        for (kind, _, m) in rows.iter().filter(|r| r.1 == case) {
            let ratio = |b: Option<f64>| b.map_or("-".into(), |b| format!("{:.2}x", m[1] / b));
            let _ = writeln!(
                table,
                "| {} | {conns} x {size} B | {:.0} | {:.2} | {:.0}% | {} | {} |",
                kind.name(),
                m[0],
                m[1],
                m[2] * 100.0,
                ratio(mio),
                ratio(uring)
            );
        }
    }
    println!("{table}");
    println!("(CPU busy: the server's CPU seconds over the run's wall seconds; every server thread is pinned to one CPU, so 100% is that CPU saturated.)\n");
    write_file(o, "cpu.csv", &csv)
}

/// One measurement: messages per second, server CPU µs per message, CPU busy share.
fn cpu_run(srv: &mut ServerProc, conns: usize, size: usize, rounds: usize) -> io::Result<[f64; 3]> {
    let timeout = Duration::from_secs(120);
    let a = srv.cpu_us()?;
    run_client(srv.addr, "pingpong", conns, size, 1, timeout)?;
    srv.idle()?;
    let b = srv.cpu_us()?;
    let r = run_client(srv.addr, "pingpong", conns, size, rounds, timeout)?;
    srv.idle()?;
    let c = srv.cpu_us()?;
    let secs: f64 = r
        .get(1)
        .and_then(|s| s.parse().ok())
        .filter(|&s: &f64| s > 0.0)
        .ok_or_else(|| io::Error::other(format!("bad pingpong result {r:?}")))?;
    let msgs = ((rounds - 1) * conns) as f64;
    let cpu_us = (c - b) as f64 - (b - a) as f64;
    Ok([msgs / secs, cpu_us / msgs, cpu_us / 1e6 / secs])
}

/// The 64 KiB stream as an independent client drives it (issue 17): `client::mio_stream`, one
/// thread writing 64 KiB chunks as fast as the socket takes them while reading the echo, 1 GiB
/// per run (64 MiB with `--quick`), bounded at 60 s. Per server: throughput (median of the
/// runs), server CPU per MiB echoed, and how the server moved the bytes: its system calls
/// per MiB (under `perf stat`, when it can count syscall tracepoints: in the kernel, at full
/// speed), bytes per receive call, and for the proactor servers bytes per read completion,
/// poller wake-ups and arena chunks allocated.
fn stream(o: &Opts) -> io::Result<()> {
    let mib: usize = if o.quick { 64 } else { 1024 };
    let perf = perf_works();
    println!(
        "## Stream: one connection, {mib} MiB in 64 KiB non-blocking writes while reading the echo (single-threaded mio client; median of {} runs){}\n",
        o.reps,
        if perf { "" } else { "; no syscall counts: perf stat cannot count tracepoints here" }
    );
    let mut csv = String::from(
        "server,rep,bytes,secs,mib_per_s,server_cpu_us_per_mib,client_writes,client_reads,client_polls\n",
    );
    let mut sys_csv = String::from("server,syscall,calls_per_mib\n");
    // (server, median MiB/s, median CPU µs per MiB, busy, syscalls per MiB, pstats per run)
    let mut rows = Vec::new();
    for &kind in &o.servers {
        let file = o.out.join(format!("perf-stream-{}.txt", kind.name()));
        let wrap = if perf { perf_wrap(&file) } else { Vec::new() };
        let mut srv = ServerProc::start(kind, &wrap)?;
        let (mut rate, mut cpu, mut busy) = (Vec::new(), Vec::new(), Vec::new());
        let mut polls = Vec::new();
        let mut bytes_total = 0u64;
        for rep in 0..o.reps {
            let a = srv.cpu_us()?;
            let r = run_client(
                srv.addr,
                "stream",
                1,
                64 * 1024,
                mib,
                Duration::from_secs(75),
            );
            srv.idle()?;
            let b = srv.cpu_us()?;
            let r = match r {
                Ok(r) if r.len() == 5 => r,
                other => {
                    eprintln!("stream, {}: {other:?}", kind.name());
                    continue;
                }
            };
            let bytes: u64 = r[0].parse().unwrap_or(0);
            let secs: f64 = r[1].parse().unwrap_or(f64::NAN);
            if bytes < (mib as u64) << 20 {
                eprintln!("stream, {}: time limit hit ({bytes} bytes)", kind.name());
            }
            bytes_total += bytes;
            let m = bytes as f64 / f64::from(1 << 20);
            let cpu_us = (b - a) as f64;
            rate.push(m / secs);
            cpu.push(cpu_us / m);
            busy.push(cpu_us / 1e6 / secs);
            polls.push(r[4].parse::<f64>().unwrap_or(f64::NAN) / m);
            let _ = writeln!(
                csv,
                "{},{rep},{bytes},{secs:.6},{:.1},{:.1},{},{},{}",
                kind.name(),
                m / secs,
                cpu_us / m,
                r[2],
                r[3],
                r[4]
            );
        }
        let pstats = srv.quit()?;
        let m = bytes_total as f64 / f64::from(1 << 20);
        let (calls, switches) = if perf && m > 0.0 {
            let text = fs::read_to_string(&file)?;
            let counts = parse_perf(&text);
            for (name, (c, _)) in &counts {
                let _ = writeln!(sys_csv, "{},{name},{:.2}", kind.name(), *c as f64 / m);
            }
            (Some(counts), perf_context_switches(&text))
        } else {
            (None, None)
        };
        if rate.is_empty() {
            continue;
        }
        rows.push((
            kind,
            [median(&mut rate), median(&mut cpu), median(&mut busy)],
            calls,
            pstats,
            m,
            switches,
            median(&mut polls),
        ));
    }
    let mut table = String::from("| server | MiB/s | / mio | / uring-loop | server CPU µs per MiB | CPU busy | receive calls per MiB | bytes per receive call | sends per MiB | waits per MiB | server context switches per MiB | client polls per MiB | bytes per read completion | wake-ups per MiB | chunks |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let base = |name: &str| rows.iter().find(|r| r.0.name() == name).map(|r| r.1[0]);
    let (mio, uring) = (base("mio"), base("uring-loop"));
    for (kind, [rate, cpu, busy], calls, pstats, m, switches, polls) in &rows {
        let ratio = |b: Option<f64>| b.map_or("-".into(), |b| format!("{:.2}x", rate / b));
        let per = |names: &[&str]| {
            calls.as_ref().map_or("-".into(), |c| {
                let n: u64 = names.iter().map(|x| c.get(*x).map_or(0, |v| v.0)).sum();
                format!("{:.1}", n as f64 / m)
            })
        };
        let recv_calls = calls.as_ref().map(|c| {
            ["recvfrom", "read"]
                .iter()
                .map(|x| c.get(*x).map_or(0, |v| v.0))
                .sum::<u64>()
        });
        let per_recv = match (recv_calls, kind.name().contains("uring")) {
            // (On io_uring the kernel receives; `read` is the eventfd's.)
            (_, true) => "-".into(),
            (Some(n), false) if n > 0 => format!("{:.0}", *m * f64::from(1 << 20) / n as f64),
            _ => "-".into(),
        };
        let (per_read, wakeups, chunks) = match pstats {
            Some(p) => {
                // Echo: every read completion is followed by one write completion.
                let reads = p[2] as f64 / 2.0;
                (
                    format!("{:.0}", p[3] as f64 / reads.max(1.0)),
                    format!("{:.1}", p[0] as f64 / m),
                    p[5].to_string(),
                )
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            table,
            "| {} | {rate:.0} | {} | {} | {cpu:.0} | {:.0}% | {} | {per_recv} | {} | {} | {} | {polls:.1} | {per_read} | {wakeups} | {chunks} |",
            kind.name(),
            ratio(mio),
            ratio(uring),
            busy * 100.0,
            per(&["recvfrom", "read"]),
            per(&["sendto", "sendmsg", "write", "writev"]),
            per(&["epoll_wait", "epoll_pwait", "io_uring_enter"]),
            switches.map_or("-".into(), |c| format!("{:.1}", c as f64 / m)),
        );
    }
    println!("{table}");
    println!("(Server CPU: user + system over the run, including the connect and the first chunk's check. System calls per MiB over every run, setup included; `read` and `write` include eventfd wake-ups. A proactor server's counters are over its whole life, the check rounds included.)\n");
    write_file(o, "stream.csv", &csv)?;
    if perf {
        write_file(o, "stream_syscalls.csv", &sys_csv)?;
    }
    Ok(())
}
