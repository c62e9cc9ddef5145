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

use bench_servers::process::{millions, percent, sig3, thread_cpu_us, Busy, Meter, ServerProc};
use bench_servers::runs::{self, default_out, list, num, secs, Figures, Metric, Plan, Table};

mod load;
mod servers;

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
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
    runs::conclude("udp", orchestrate());
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
}

impl Figures for Sample {
    fn others(&self) -> (f64, f64) {
        (self.others, self.others_gen)
    }
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
    let mut quick = runs::quick_env();
    let mut sizes = vec![64, 1200];
    let mut server_names: Vec<String> = servers::ALL.map(String::from).to_vec();
    let (mut reps, mut secs, mut warm) = (None, None, None);
    let (mut sockets, mut window, mut rcvbuf) = (128, 4, 4 << 20);
    let mut max_others = 5.0;
    let mut retries = None;
    let mut out = default_out();
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
    runs::known("server", &server_names, &servers::ALL)?;
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

fn metrics() -> Vec<Metric<Sample>> {
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
    let plan = Plan {
        reps: o.reps,
        retries: o.retries,
        max_others: o.max_others,
        pause: Duration::from_millis(100),
        groups: o.sizes.len(),
        servers: o.servers.len(),
        raw_keys: "size,server",
        raw_figures: "echoed,wall_s,server_cpu_s,cpu_ns,per_s,server_busy,gen_busy,others_busy,\
                      others_gen_busy,sent,echoed_total,lost,late,reordered,send_blocked,\
                      rcvbuf_errors,in_errors",
    };
    let runs = plan.run(
        |zi, si| {
            let (size, name) = (o.sizes[zi], &o.servers[si]);
            (format!("{size} B {name}"), format!("{size},{name}"))
        },
        |zi, si| run_one(&o, &o.servers[si], o.sizes[zi]),
        |_, s| {
            let c = s.counts;
            let text = format!(
                "{}/s, {} ns CPU per datagram, server {} busy, generator {}, others {} / {}; \
                 lost {} (RcvbufErrors {}, InErrors {})",
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
            let figures = format!(
                "{},{:.6},{:.3},{:.1},{:.1},{:.4},{:.4},{:.4},{:.4},{},{},{},{},{},{},{},{}",
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
            (text, figures)
        },
    );
    let (md, csv) = report(&o, &runs.got);
    runs.finish("udp", &o.out, &header, &md, csv)
}

/// The Markdown tables (medians with ratios to the baseline, the targets, the range over the
/// reps, the losses) and the medians' CSV.
fn report(o: &Opts, got: &BTreeMap<(usize, usize), Vec<Sample>>) -> (String, String) {
    let names: Vec<&str> = o.servers.iter().map(String::as_str).collect();
    let mut table = Table::new("UDP echo", "size", "size", &names, BASELINE, o.reps);
    // (size, server, metric key) -> median
    let mut meds: BTreeMap<(usize, usize, &str), f64> = BTreeMap::new();
    for (zi, &size) in o.sizes.iter().enumerate() {
        for m in metrics() {
            let row = table.row(zi, &format!("{size} B"), &size.to_string(), &m, got);
            for (si, med) in row.into_iter().enumerate() {
                meds.insert((zi, si, m.key), med);
            }
        }
    }
    let mut targets = String::new();
    if let Some(b) = table.base {
        let _ = write!(
            targets,
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
                    targets,
                    "| {name} | {size} B | {} | {} |",
                    verdict(cpu <= TARGET_CPU, cpu),
                    verdict(rate >= TARGET_RATE, rate)
                );
            }
        }
    }
    let (mut md, csv) = table.finish(&targets);
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
