//! The UDP echo bench (issue 18): UDP echo servers side by side, many client sockets in
//! flight, 64-byte and 1,200-byte datagrams, every echo checked.
//!
//! Servers ([`servers`]; `--servers` picks): `proactor-uring` and `proactor-epoll` (an
//! inline watcher, many `ReadInternal`s outstanding, `SendTo(peer, data)` per datagram, UDP
//! GSO on), `proactor-uring-nogso` and `proactor-epoll-nogso` (the same, GSO off),
//! `proactor-uring-threaded` and `proactor-epoll-threaded` (the same loop on a threaded
//! watcher), `tokio` (a `recv_from`/`send_to` loop in a task on tokio's default runtime),
//! `std` (a blocking `recv_from`/`send_to` loop) and `mmsg` (a hand-written `recvmmsg` +
//! `sendmmsg` loop, the near-limit reference). Each runs in a process of its own, this
//! binary re-executed with `PROACTOR_BENCH_ROLE=udp-server`, pinned to CPU
//! `PROACTOR_BENCH_SERVER_CPU` (0) before it starts, and starts afresh for every run; every
//! server's socket gets the same receive buffer (`--rcvbuf`, 4 MiB asked: the kernel caps it
//! at `net.core.rmem_max` and doubles it).
//!
//! Load ([`load`]): this process, pinned to `PROACTOR_BENCH_CLIENT_CPU` (1), one thread:
//! `--sockets` (128) client sockets, each connected to the server and keeping `--window` (4)
//! datagrams in flight, closed loop (each echo received sends the next datagram), with
//! `recvmmsg`/`sendmmsg` per socket and one epoll set. Every echo is checked (length, the
//! socket it came back to, sequence number, content); a datagram not back within 1 s counts
//! as lost and is replaced. Each run: the windows are filled, `--warm` seconds (0.5) of
//! warm-up, `--secs` seconds (3) measured, then the generator stops sending and waits for
//! every datagram in flight. Every run is bounded: 5 s without an echo, or an error, fails
//! it.
//!
//! Figures, over the measured seconds: datagrams echoed per second (on loopback the load
//! generator's CPU saturates first, so this is partly its figure), and the server's CPU time
//! per datagram: user + system from `/proc/PID/stat` (10 ms ticks), every thread of the
//! server process, divided by the datagrams echoed: the measure to compare; and the same with
//! the rest of the server CPU's busy time counted as the server's (softirq work its sends
//! left for when it sleeps: with UDP GSO, about 5% of the CPU), the figure the targets are
//! judged on. Losses per run:
//! the generator's count, and the kernel's `Udp` `RcvbufErrors` and `InErrors` from
//! `/proc/net/snmp` (system-wide) over the whole run; a run that lost more datagrams than
//! the kernel dropped (the server lost some the kernel delivered) fails. Noise: as in the
//! chat bench, each CPU's busy time from `/proc/stat` less the server's or the generator's
//! own; a run in which other processes took more than `--max-others` percent (5) of either
//! CPU is run again, up to `--retries` times (2; 0 with `--quick`), and the last try is
//! kept.
//!
//! ```text
//! cargo bench --bench udp -- [--sizes 64,1200] [--servers NAME,...] [--reps 5]
//!     [--secs 3] [--warm 0.5] [--sockets 128] [--window 4] [--rcvbuf 4194304]
//!     [--max-others 5] [--retries 2] [--out DIR] [--quick]
//! ```
//!
//! `--quick` (or `PROACTOR_BENCH_QUICK=1`): one rep of 0.3 s per run, no retries, for a smoke
//! run well under a minute. Each rep runs every size on every server, the server order
//! reversed on odd reps. Prints Markdown tables (medians, ratios to `tokio`, the targets of
//! issue 18, the range over the reps, losses) and writes `udp.md`, `udp.csv` (medians) and
//! `udp_raw.csv` (every run) under `target/bench/` (or `--out`). A failed run makes the
//! bench exit with status 1 once every run is done. `PROACTOR_BENCH_UDP_READS` (64) sets the
//! reads the proactor servers keep outstanding.

#[allow(dead_code)]
#[path = "../servers/mod.rs"]
mod bench_servers;

use bench_servers::process::{median, millions, percent, sig3, Busy, Meter, ServerProc};

mod load;
mod servers;

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const ROLE: &str = "PROACTOR_BENCH_ROLE";
const KIND: &str = "PROACTOR_BENCH_KIND";
const RCVBUF_ENV: &str = "PROACTOR_BENCH_UDP_RCVBUF";
/// The server every other is compared with.
const BASELINE: &str = "tokio";
/// The servers the issue's targets are for.
const TARGETED: [&str; 2] = ["proactor-uring", "proactor-epoll"];
/// Issue 18's targets: server CPU per datagram at most this share of tokio's...
const TARGET_CPU: f64 = 0.75;
/// ...and at least this many times its datagrams per second.
const TARGET_RATE: f64 = 1.3;

fn main() {
    if env::var(ROLE).as_deref() == Ok("udp-server") {
        std::process::exit(server_role());
    }
    match orchestrate() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("udp: {e}");
            std::process::exit(1);
        }
    }
}

/// This binary as a UDP echo server: `PROACTOR_BENCH_KIND=NAME`, `--addr HOST:PORT`.
fn server_role() -> i32 {
    let kind = env::var(KIND).unwrap_or_default();
    let rcvbuf = env::var(RCVBUF_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4 << 20);
    let mut addr = "127.0.0.1:0".to_string();
    let mut args = env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--addr", Some(v)) => addr = v,
            _ => {
                eprintln!("usage: {ROLE}=udp-server {KIND}=NAME udp --addr HOST:PORT");
                return 2;
            }
        }
    }
    match servers::serve(&kind, &addr, rcvbuf) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{kind}: {e}");
            1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server process

/// This thread's CPU time (the load generator's), microseconds.
fn thread_cpu_us() -> u64 {
    // SAFETY: rusage is a plain C struct; all-zero is a valid value for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live rusage; RUSAGE_THREAD is a valid `who` on Linux.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// One run

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Datagrams echoed in the measured seconds.
    echoed: u64,
    wall_s: f64,
    server_cpu_s: f64,
    gen_cpu_s: f64,
    /// The share of the server's CPU, and of the load generator's, that other processes
    /// took over the measured part (NaN when not pinned).
    others: f64,
    others_gen: f64,
    /// The whole run's counts (warm-up and drain included).
    counts: load::Counts,
    rcvbuf_errors: u64,
    in_errors: u64,
}

impl Sample {
    fn per_s(&self) -> f64 {
        self.echoed as f64 / self.wall_s
    }
    fn cpu_ns(&self) -> f64 {
        self.server_cpu_s * 1e9 / self.echoed as f64
    }
    /// The same with the server CPU's other busy time counted as the server's: softirq
    /// work its sends left (with GSO, the loopback delivery of a send's datagrams can finish
    /// while the server sleeps, on the idle task's time), and any other process's.
    fn cpu_all_ns(&self) -> f64 {
        let others = if self.others.is_finite() {
            self.others * self.wall_s
        } else {
            0.0
        };
        (self.server_cpu_s + others) * 1e9 / self.echoed as f64
    }
    fn busy(&self) -> f64 {
        self.server_cpu_s / self.wall_s
    }
    fn gen_busy(&self) -> f64 {
        self.gen_cpu_s / self.wall_s
    }
    /// The larger share of either CPU that other processes took (0 when not pinned).
    fn noise(&self) -> f64 {
        let n = self.others.max(self.others_gen);
        if n.is_finite() {
            n
        } else {
            0.0
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn run_one(o: &Opts, server: &str, size: usize) -> Result<Sample, String> {
    let snmp0 = load::udp_snmp();
    let exe = env::current_exe().map_err(|e| format!("this binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--addr", "127.0.0.1:0"])
        .env(ROLE, "udp-server")
        .env(KIND, server)
        .env(RCVBUF_ENV, o.rcvbuf.to_string());
    let mut srv = ServerProc::start(server, cmd)?;
    let mut gen = load::Gen::new(srv.addr, o.sockets, o.window, size)
        .map_err(|e| format!("load generator: {e}"))?;
    gen.start()?;
    gen.run_until(Instant::now() + secs(o.warm))?;
    // (The load generator's CPU time is this thread's; softirqs count as busy time.)
    let meter = |srv: &ServerProc| Meter::now(srv, thread_cpu_us(), Busy::WithIrq);
    let m0 = meter(&srv)?;
    let e0 = gen.counts.echoed;
    gen.run_until(m0.at + secs(o.secs))?;
    let m1 = meter(&srv)?;
    let e1 = gen.counts.echoed;
    gen.drain()?;
    srv.alive(server)?;
    drop(srv);
    let snmp1 = load::udp_snmp();
    let mut s = Sample {
        echoed: e1 - e0,
        counts: gen.counts,
        ..Sample::default()
    };
    let span = m0.since(&m1);
    s.wall_s = span.wall_s;
    s.server_cpu_s = span.server_cpu_s;
    s.gen_cpu_s = span.gen_cpu_s;
    s.others = span.others;
    s.others_gen = span.others_gen;
    let delta = |name| load::snmp_get(&snmp1, name).saturating_sub(load::snmp_get(&snmp0, name));
    s.rcvbuf_errors = delta("RcvbufErrors");
    s.in_errors = delta("InErrors");
    if s.counts.bad > 0 {
        return Err(format!(
            "{} bad echoes: {}",
            s.counts.bad,
            gen.errors.join("; ")
        ));
    }
    if s.counts.echoed + s.counts.lost != s.counts.sent {
        return Err(format!(
            "the counts do not add up: {} sent, {} echoed, {} lost",
            s.counts.sent, s.counts.echoed, s.counts.lost
        ));
    }
    // (RcvbufErrors is counted in InErrors too.)
    if s.counts.lost > s.in_errors {
        return Err(format!(
            "{} datagrams lost, but the kernel dropped only {} (InErrors; RcvbufErrors {}): \
             the server lost datagrams the kernel delivered",
            s.counts.lost, s.in_errors, s.rcvbuf_errors
        ));
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Orchestration

struct Opts {
    quick: bool,
    sizes: Vec<usize>,
    servers: Vec<String>,
    reps: usize,
    secs: f64,
    warm: f64,
    sockets: usize,
    window: usize,
    rcvbuf: usize,
    /// A run in which other processes took more than this share (%) of the server's or the
    /// generator's CPU is run again, up to `retries` times.
    max_others: f64,
    retries: usize,
    out: PathBuf,
}

fn parse_args() -> Result<Opts, String> {
    let mut quick = env::var("PROACTOR_BENCH_QUICK").is_ok_and(|v| v.trim() == "1");
    let mut sizes = vec![64, 1200];
    let mut server_names: Vec<String> = servers::ALL.map(String::from).to_vec();
    let (mut reps, mut secs, mut warm) = (None, None, None);
    let (mut sockets, mut window, mut rcvbuf) = (128, 4, 4 << 20);
    let mut max_others = 5.0;
    let mut retries = None;
    let mut out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("bench");
    let list = |v: String| -> Vec<String> {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        v.trim().parse().map_err(|e| format!("{flag} {v:?}: {e}"))
    }
    let mut args = env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--quick" => quick = true,
            "--sizes" => {
                sizes = list(value()?)
                    .into_iter()
                    .map(|s| num("--sizes", s))
                    .collect::<Result<_, _>>()?
            }
            "--servers" => server_names = list(value()?),
            "--reps" => reps = Some(num(&a, value()?)?),
            "--secs" => secs = Some(num(&a, value()?)?),
            "--warm" => warm = Some(num(&a, value()?)?),
            "--sockets" => sockets = num(&a, value()?)?,
            "--window" => window = num(&a, value()?)?,
            "--rcvbuf" => rcvbuf = num(&a, value()?)?,
            "--max-others" => max_others = num(&a, value()?)?,
            "--retries" => retries = Some(num(&a, value()?)?),
            "--out" => out = PathBuf::from(value()?),
            _ => {
                return Err(format!(
                    "unknown argument {a:?} (see the doc at the top of benches/udp/main.rs)"
                ))
            }
        }
    }
    for s in &server_names {
        if !servers::ALL.contains(&s.as_str()) {
            return Err(format!(
                "unknown server {s:?} (servers: {})",
                servers::ALL.join(",")
            ));
        }
    }
    if let Some(&s) = sizes
        .iter()
        .find(|&&s| !(load::HEADER..=65_507).contains(&s))
    {
        return Err(format!(
            "--sizes: {s} bytes (from {} to 65,507)",
            load::HEADER
        ));
    }
    if sockets == 0 || window == 0 {
        return Err("--sockets and --window must be at least 1".into());
    }
    Ok(Opts {
        quick,
        sizes,
        servers: server_names,
        reps: reps.unwrap_or(if quick { 1 } else { 5 }).max(1),
        secs: secs.unwrap_or(if quick { 0.3 } else { 3.0 }),
        warm: warm.unwrap_or(if quick { 0.1 } else { 0.5 }),
        sockets,
        window,
        rcvbuf,
        max_others,
        // A smoke run's figures are noise anyway: it is not run again.
        retries: retries.unwrap_or(if quick { 0 } else { 2 }),
        out,
    })
}

/// A table row: a label and how to get the figure from a sample.
struct Metric {
    label: &'static str,
    key: &'static str,
    get: fn(&Sample) -> f64,
    show: fn(f64) -> String,
    /// Whether a ratio to the baseline means something.
    ratio: bool,
}

fn metrics() -> Vec<Metric> {
    vec![
        Metric {
            label: "datagrams/s",
            key: "per_s",
            get: Sample::per_s,
            show: millions,
            ratio: true,
        },
        Metric {
            label: "server CPU ns per datagram",
            key: "cpu_ns",
            get: Sample::cpu_ns,
            show: sig3,
            ratio: true,
        },
        Metric {
            label: "the same, the server CPU's other work included",
            key: "cpu_all_ns",
            get: Sample::cpu_all_ns,
            show: sig3,
            ratio: true,
        },
        Metric {
            label: "server CPU busy",
            key: "server_busy",
            get: Sample::busy,
            show: percent,
            ratio: false,
        },
        Metric {
            label: "load generator CPU busy",
            key: "gen_busy",
            get: Sample::gen_busy,
            show: percent,
            ratio: false,
        },
        Metric {
            label: "other processes on the server's CPU",
            key: "others_busy",
            get: |s| s.others,
            show: percent,
            ratio: false,
        },
        Metric {
            label: "other processes on the generator's CPU",
            key: "others_gen_busy",
            get: |s| s.others_gen,
            show: percent,
            ratio: false,
        },
    ]
}

fn orchestrate() -> Result<bool, String> {
    let o = parse_args()?;
    fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    bench_servers::pin_client_thread();
    let pins = bench_servers::pins();
    let mut header = String::new();
    let _ = writeln!(
        header,
        "udp: servers {:?}, sizes {:?} B, {} rep(s) of {} s (after {} s of warm-up), {} client \
         sockets x {} datagrams in flight, server SO_RCVBUF {} asked, server CPU {:?}, load \
         generator CPU {:?}{}",
        o.servers,
        o.sizes,
        o.reps,
        o.secs,
        o.warm,
        o.sockets,
        o.window,
        o.rcvbuf,
        pins.server,
        pins.client,
        if o.quick { ", quick" } else { "" },
    );
    print!("{header}");
    let started = Instant::now();
    let mut raw = String::from(
        "rep,attempt,size,server,ok,kept,echoed,wall_s,server_cpu_s,cpu_ns,per_s,server_busy,\
         gen_busy,others_busy,others_gen_busy,sent,echoed_total,lost,late,reordered,\
         send_blocked,rcvbuf_errors,in_errors,error\n",
    );
    let (mut retried, mut noisy_kept) = (0, 0);
    // (size, server) -> samples.
    let mut got: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
    let mut failures = Vec::new();
    for rep in 0..o.reps {
        for (zi, &size) in o.sizes.iter().enumerate() {
            let mut order: Vec<usize> = (0..o.servers.len()).collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            for si in order {
                let name = &o.servers[si];
                let label = format!("[rep {}/{}] {size} B {name}", rep + 1, o.reps);
                for attempt in 0..=o.retries {
                    let t = Instant::now();
                    let r = run_one(&o, name, size);
                    let took = t.elapsed().as_secs_f64();
                    let s = match r {
                        Ok(s) => s,
                        Err(e) => {
                            println!("{label}: FAILED ({took:.1} s): {e}");
                            let _ = writeln!(
                                raw,
                                "{rep},{attempt},{size},{name},0,0,,,,,,,,,,,,,,,,,,\"{}\"",
                                e.replace('"', "'")
                            );
                            failures.push(format!("{label}: {e}"));
                            break;
                        }
                    };
                    let noisy = s.noise() * 100.0 > o.max_others;
                    let keep = !noisy || attempt == o.retries;
                    let note = match (noisy, keep) {
                        (false, _) => "",
                        (true, false) => " [noisy: run again]",
                        (true, true) => " [noisy, kept: out of retries]",
                    };
                    let c = s.counts;
                    println!(
                        "{label}: {}/s, {} ns CPU per datagram, server {} busy, generator {}, \
                         others {} / {}; lost {} (RcvbufErrors {}, InErrors {}) ({took:.1} s){note}",
                        millions(s.per_s()),
                        sig3(s.cpu_ns()),
                        percent(s.busy()),
                        percent(s.gen_busy()),
                        percent(s.others),
                        percent(s.others_gen),
                        c.lost,
                        s.rcvbuf_errors,
                        s.in_errors,
                    );
                    let _ = writeln!(
                        raw,
                        "{rep},{attempt},{size},{name},1,{},{},{:.6},{:.3},{:.1},{:.1},{:.4},{:.4},\
                         {:.4},{:.4},{},{},{},{},{},{},{},{},",
                        u8::from(keep),
                        s.echoed,
                        s.wall_s,
                        s.server_cpu_s,
                        s.cpu_ns(),
                        s.per_s(),
                        s.busy(),
                        s.gen_busy(),
                        s.others,
                        s.others_gen,
                        c.sent,
                        c.echoed,
                        c.lost,
                        c.late,
                        c.reordered,
                        c.send_blocked,
                        s.rcvbuf_errors,
                        s.in_errors,
                    );
                    thread::sleep(Duration::from_millis(100));
                    if keep {
                        if noisy {
                            noisy_kept += 1;
                        }
                        got.entry((zi, si)).or_default().push(s);
                        break;
                    }
                    retried += 1;
                }
            }
        }
    }
    let (md, csv) = report(&o, &got);
    println!("\n{md}");
    if !failures.is_empty() {
        println!("FAILED runs:");
        for f in &failures {
            println!("- {f}");
        }
    }
    println!(
        "(all runs: {:.0} s; {retried} run(s) repeated and {noisy_kept} kept with other \
         processes above {}% of the server's or the generator's CPU)",
        started.elapsed().as_secs_f64(),
        o.max_others
    );
    for (name, text) in [
        ("udp.md", format!("{header}\n{md}")),
        ("udp.csv", csv),
        ("udp_raw.csv", raw),
    ] {
        let path = o.out.join(name);
        fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(failures.is_empty())
}

/// The Markdown tables (medians with ratios to the baseline, the targets, the range over the
/// reps, the losses) and the medians' CSV.
fn report(o: &Opts, got: &BTreeMap<(usize, usize), Vec<Sample>>) -> (String, String) {
    let names: Vec<&str> = o.servers.iter().map(String::as_str).collect();
    let base = names.iter().position(|&n| n == BASELINE);
    let others: Vec<usize> = (0..names.len()).filter(|&i| Some(i) != base).collect();
    let mut md = format!(
        "### UDP echo: medians of {} rep(s)\n\n| size | metric |",
        o.reps
    );
    for n in &names {
        let _ = write!(md, " {n} |");
    }
    if base.is_some() {
        for &i in &others {
            let _ = write!(md, " {} / {BASELINE} |", names[i]);
        }
    }
    md.push_str("\n|---|---|");
    md.push_str(&"---:|".repeat(names.len() + if base.is_some() { others.len() } else { 0 }));
    md.push('\n');
    let mut spread = format!(
        "\n### UDP echo: range over the reps (min-max)\n\n| size | metric |{}\n|---|---|{}\n",
        names.iter().map(|n| format!(" {n} |")).collect::<String>(),
        "---:|".repeat(names.len())
    );
    let mut csv = String::from("size,metric,server,median,min,max,runs\n");
    // (size, server, metric key) -> median
    let mut meds: BTreeMap<(usize, usize, &str), f64> = BTreeMap::new();
    for (zi, &size) in o.sizes.iter().enumerate() {
        for m in metrics() {
            let label = format!("| {size} B | {} |", m.label);
            md.push_str(&label);
            spread.push_str(&label);
            let mut row = Vec::new();
            for (si, name) in names.iter().enumerate() {
                let mut v: Vec<f64> = got
                    .get(&(zi, si))
                    .map(|s| s.iter().map(m.get).collect())
                    .unwrap_or_default();
                let med = median(&mut v);
                row.push(med);
                meds.insert((zi, si, m.key), med);
                if v.is_empty() {
                    md.push_str(" fail |");
                    spread.push_str(" fail |");
                    continue;
                }
                let _ = write!(md, " {} |", (m.show)(med));
                let (lo, hi) = (v[0], v[v.len() - 1]);
                let _ = write!(spread, " {}-{} |", (m.show)(lo), (m.show)(hi));
                let _ = writeln!(csv, "{size},{},{name},{med},{lo},{hi},{}", m.key, v.len());
            }
            if let Some(b) = base {
                for &i in &others {
                    let r = row[i] / row[b];
                    if m.ratio && r.is_finite() {
                        let _ = write!(md, " {r:.2}x |");
                    } else {
                        md.push_str(" - |");
                    }
                }
            }
            md.push('\n');
            spread.push('\n');
        }
    }
    if let Some(b) = base {
        let _ = write!(
            md,
            "\n### Issue 18's targets: server CPU per datagram <= {TARGET_CPU}x tokio's, \
             datagrams/s >= {TARGET_RATE}x\n\n| server | size | CPU per datagram (its CPU's other work included) | datagrams/s |\n\
             |---|---|---:|---:|\n"
        );
        for (si, name) in names.iter().enumerate() {
            if !TARGETED.contains(name) && *name != "mmsg" {
                continue;
            }
            for (zi, &size) in o.sizes.iter().enumerate() {
                let r = |key| meds[&(zi, si, key)] / meds[&(zi, b, key)];
                // (CPU with the server CPU's other work counted: the stricter figure.)
                let (cpu, rate) = (r("cpu_all_ns"), r("per_s"));
                let verdict = |ok: bool, v: f64| {
                    if !v.is_finite() {
                        "-".to_string()
                    } else {
                        format!("{v:.2}x {}", if ok { "met" } else { "missed" })
                    }
                };
                let _ = writeln!(
                    md,
                    "| {name} | {size} B | {} | {} |",
                    verdict(cpu <= TARGET_CPU, cpu),
                    verdict(rate >= TARGET_RATE, rate)
                );
            }
        }
    }
    if o.reps > 1 {
        md.push_str(&spread);
    }
    // Losses: totals over the kept runs.
    let _ = write!(
        md,
        "\n### Losses (totals over the kept runs)\n\n| size | server | datagrams sent | lost | \
         late | reordered | RcvbufErrors | InErrors |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for (zi, &size) in o.sizes.iter().enumerate() {
        for (si, name) in names.iter().enumerate() {
            let Some(v) = got.get(&(zi, si)) else {
                continue;
            };
            let sum = |f: fn(&Sample) -> u64| v.iter().map(f).sum::<u64>();
            let _ = writeln!(
                md,
                "| {size} B | {name} | {} | {} | {} | {} | {} | {} |",
                sum(|s| s.counts.sent),
                sum(|s| s.counts.lost),
                sum(|s| s.counts.late),
                sum(|s| s.counts.reordered),
                sum(|s| s.rcvbuf_errors),
                sum(|s| s.in_errors),
            );
        }
    }
    (md, csv)
}
