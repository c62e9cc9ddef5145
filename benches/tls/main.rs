//! The TLS bench (issue 20, item 5): TLS echo servers side by side, proactor's TLS (rustls
//! driven by the poller) against tokio-rustls, with the same certificate, protocol version
//! and cipher suite, every echoed byte checked.
//!
//! Servers ([`servers`]; `--servers` picks): `proactor-uring` and `proactor-epoll` (an inline
//! watcher: accept, `TlsAccept`, then a `ReadInternal` + `Write` echo loop) and
//! `tokio-rustls` (tokio-rustls on tokio's default runtime, a task per connection), the
//! baseline. Each runs in a process of its own, this binary re-executed with
//! `PROACTOR_BENCH_ROLE=tls-server`, pinned to CPU `PROACTOR_BENCH_SERVER_CPU` (0) before it
//! starts, and starts afresh for every run. Both sides use rustls 0.23 with the `ring`
//! provider narrowed to TLS 1.3, `TLS13_AES_128_GCM_SHA256` and X25519; the server presents
//! tests/data/tls/server.pem (ECDSA P-256) and sends no session tickets, the client resumes
//! nothing.
//!
//! Load ([`load`]): this process, pinned to `PROACTOR_BENCH_CLIENT_CPU` (1), one thread of
//! rustls clients over non-blocking mio sockets. The cases, each a run of its own:
//!
//! - **stream**: one connection writes `--stream-mib` (256) MiB of plaintext in 64 KiB
//!   writes, at most 256 KiB not yet echoed, and reads the echo back (after 8 MiB of
//!   warm-up): MB/s (10^6 bytes of plaintext each way per second) and server CPU per MiB.
//! - **echo**: `--conns` (1,000) connections, each echoing `--size` (4 KiB) messages in a
//!   closed loop (each echo received sends the next message): round trips per second, the
//!   p50 and p99 round trip (from the write into rustls to the last byte back, so the
//!   generator's own queueing is in it, for every server alike), server CPU per round trip;
//!   `--warm` (0.5) s of warm-up, `--secs` (3) s measured.
//! - **idle** (measured in the echo run, before its messages): the server's `VmRSS`
//!   (`/proc/PID/status`) after one warm-up connection (handshake, one byte echoed, closed),
//!   then again once the `--conns` connections have each done the handshake and echoed one
//!   byte and wait, idle, the server in a read on each: the growth over the connections, in
//!   bytes per connection.
//! - **handshake**: fresh connections, `--inflight` (32) at a time, each a full handshake
//!   (no resumption), one byte echoed (so the server has finished its side) and a close
//!   (with a reset, no TIME_WAIT): handshakes per second and server CPU per handshake;
//!   `--warm` s of warm-up, `--secs` s measured.
//!
//! On 2 CPUs the load generator saturates its own CPU in most cases, so rates are partly its
//! figures: the server's CPU per unit (user + system from `/proc/PID/stat`, every thread,
//! 10 ms ticks) is the measure to compare. Noise: each CPU's busy time from `/proc/stat`
//! less the server's or the generator's own; a run in which other processes took more than
//! `--max-others` percent (5) of either CPU is run again, up to `--retries` times (2; 0 with
//! `--quick`), and the last try is kept.
//!
//! ```text
//! cargo bench --features tls --bench tls -- [--cases stream,echo,handshake]
//!     [--servers NAME,...] [--reps 3] [--secs 3] [--warm 0.5] [--stream-mib 256]
//!     [--conns 1000] [--size 4096] [--inflight 32] [--max-others 5] [--retries 2]
//!     [--out DIR] [--quick]
//! ```
//!
//! `--quick` (or `PROACTOR_BENCH_QUICK=1`): one rep, 0.3 s runs, a 32 MiB stream, no
//! retries: a smoke run well under a minute. Each rep runs every case on every server, the
//! server order reversed on odd reps. Prints Markdown tables (medians, ratios to
//! tokio-rustls, issue 20's targets and verdicts, the range over the reps) and writes
//! `tls.md`, `tls.csv` (medians) and `tls_raw.csv` (every run) under `target/bench/` (or
//! `--out`). A failed run makes the bench exit with status 1 once every run is done.
//! `scripts/tls-bench.sh` runs it.

#[allow(dead_code)]
#[path = "../servers/mod.rs"]
mod bench_servers;

use bench_servers::process::{percent, sig3, thread_cpu_us, Busy, Meter, ServerProc, Span};
use bench_servers::runs::{self, default_out, list, num, secs, Figures, Metric, Plan, Table};

mod load;
mod servers;

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const ROLE: &str = "PROACTOR_BENCH_ROLE";
const KIND: &str = "PROACTOR_BENCH_KIND";
/// The server every other is compared with.
const BASELINE: &str = "tokio-rustls";
const CASES: [&str; 3] = ["stream", "echo", "handshake"];

fn main() {
    if env::var(ROLE).as_deref() == Ok("tls-server") {
        let kind = env::var(KIND).unwrap_or_default();
        if let Err(e) = servers::serve(&kind) {
            eprintln!("{kind}: {e}");
            std::process::exit(1);
        }
        return;
    }
    runs::conclude("tls", orchestrate());
}

// ---------------------------------------------------------------------------------------------
// The server process

/// The figures of `span`, before the case's own.
fn sample(span: Span) -> Sample {
    Sample {
        units: 0.0,
        wall_s: span.wall_s,
        server_cpu_s: span.server_cpu_s,
        gen_cpu_s: span.gen_cpu_s,
        others: span.others,
        others_gen: span.others_gen,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        idle_bytes: f64::NAN,
    }
}

/// Now, for the load generator (this thread) and the server; softirqs count as busy time.
fn meter(srv: &ServerProc) -> Result<Meter, String> {
    Meter::now(srv, thread_cpu_us(), Busy::WithIrq)
}

// ---------------------------------------------------------------------------------------------
// One run

/// One run's figures.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Bytes streamed (each way), round trips, or handshakes, in the measured part.
    units: f64,
    wall_s: f64,
    server_cpu_s: f64,
    gen_cpu_s: f64,
    /// The share of the server's CPU, and of the load generator's, that other processes
    /// took over the measured part (NaN when not pinned).
    others: f64,
    others_gen: f64,
    /// The echo case: round-trip quantiles, and the idle connections' memory.
    p50_us: f64,
    p99_us: f64,
    idle_bytes: f64,
}

impl Sample {
    fn per_s(&self) -> f64 {
        self.units / self.wall_s
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

fn io_err(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn run_one(o: &Opts, case: &str, server: &str) -> Result<Sample, String> {
    let config = servers::client_config().map_err(io_err("client config"))?;
    let exe = env::current_exe().map_err(|e| format!("this binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.env(ROLE, "tls-server").env(KIND, server);
    let mut srv = ServerProc::start(server, cmd)?;
    let s = match case {
        "stream" => {
            let mut st = load::Stream::connect(srv.addr, &config, 64 * 1024, 256 * 1024)
                .map_err(io_err("connect"))?;
            let limit = Duration::from_secs(120);
            st.transfer(8 << 20, limit).map_err(io_err("warm-up"))?;
            let bytes = o.stream_mib << 20;
            let m0 = meter(&srv)?;
            st.transfer(bytes, limit).map_err(io_err("stream"))?;
            let mut s = sample(m0.since(&meter(&srv)?));
            s.units = bytes as f64;
            s
        }
        "echo" => {
            let limit = Duration::from_secs(30);
            // One connection first, so the server's first-use allocations are in the "before".
            load::Echo::connect(srv.addr, &config, 1, o.size, limit)
                .map_err(io_err("warm-up connection"))?;
            thread::sleep(Duration::from_millis(200));
            let rss0 = srv.rss_kib()?;
            let mut e = load::Echo::connect(srv.addr, &config, o.conns, o.size, limit)
                .map_err(io_err("connect"))?;
            thread::sleep(Duration::from_millis(200));
            let rss1 = srv.rss_kib()?;
            e.start().map_err(io_err("echo"))?;
            e.run_until(Instant::now() + secs(o.warm))
                .map_err(io_err("echo warm-up"))?;
            let m0 = meter(&srv)?;
            let d0 = e.done;
            e.recording = true;
            e.run_until(m0.at + secs(o.secs)).map_err(io_err("echo"))?;
            let m1 = meter(&srv)?;
            e.recording = false;
            let d1 = e.done;
            e.drain(Duration::from_secs(10))
                .map_err(io_err("echo drain"))?;
            let mut s = sample(m0.since(&m1));
            s.units = (d1 - d0) as f64;
            let lat = &mut e.lat_ns;
            lat.sort_unstable();
            let q = |q: f64| {
                if lat.is_empty() {
                    f64::NAN
                } else {
                    lat[((lat.len() - 1) as f64 * q).round() as usize] as f64 / 1e3
                }
            };
            s.p50_us = q(0.50);
            s.p99_us = q(0.99);
            s.idle_bytes = (rss1 as f64 - rss0 as f64) * 1024.0 / o.conns as f64;
            s
        }
        "handshake" => {
            let mut h =
                load::Handshakes::new(srv.addr, &config, o.inflight).map_err(io_err("start"))?;
            h.run_until(Instant::now() + secs(o.warm))
                .map_err(io_err("handshake warm-up"))?;
            let m0 = meter(&srv)?;
            let d0 = h.done;
            h.run_until(m0.at + secs(o.secs))
                .map_err(io_err("handshakes"))?;
            let m1 = meter(&srv)?;
            let d1 = h.done;
            h.drain(Duration::from_secs(10))
                .map_err(io_err("handshake drain"))?;
            let mut s = sample(m0.since(&m1));
            s.units = (d1 - d0) as f64;
            s
        }
        _ => return Err(format!("no case {case:?}")),
    };
    srv.alive(server)?;
    if s.units <= 0.0 {
        return Err("nothing done in the measured part".into());
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Orchestration

struct Opts {
    quick: bool,
    cases: Vec<String>,
    servers: Vec<String>,
    reps: usize,
    secs: f64,
    warm: f64,
    stream_mib: u64,
    conns: usize,
    size: usize,
    inflight: usize,
    /// A run in which other processes took more than this share (%) of the server's or the
    /// generator's CPU is run again, up to `retries` times.
    max_others: f64,
    retries: usize,
    out: PathBuf,
}

fn parse_args() -> Result<Opts, String> {
    let mut quick = runs::quick_env();
    let mut cases: Vec<String> = CASES.map(String::from).to_vec();
    let mut server_names: Vec<String> = servers::ALL.map(String::from).to_vec();
    let (mut reps, mut secs, mut warm, mut stream_mib) = (None, None, None, None);
    let (mut conns, mut size, mut inflight) = (1000, 4096, 32);
    let mut max_others = 5.0;
    let mut retries = None;
    let mut out = default_out();
    let mut args = env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--quick" => quick = true,
            "--cases" => cases = list(value()?),
            "--servers" => server_names = list(value()?),
            "--reps" => reps = Some(num(&a, value()?)?),
            "--secs" => secs = Some(num(&a, value()?)?),
            "--warm" => warm = Some(num(&a, value()?)?),
            "--stream-mib" => stream_mib = Some(num(&a, value()?)?),
            "--conns" => conns = num(&a, value()?)?,
            "--size" => size = num(&a, value()?)?,
            "--inflight" => inflight = num(&a, value()?)?,
            "--max-others" => max_others = num(&a, value()?)?,
            "--retries" => retries = Some(num(&a, value()?)?),
            "--out" => out = PathBuf::from(value()?),
            _ => {
                return Err(format!(
                    "unknown argument {a:?} (see the doc at the top of benches/tls/main.rs)"
                ))
            }
        }
    }
    runs::known("server", &server_names, &servers::ALL)?;
    runs::known("case", &cases, &CASES)?;
    if conns == 0 || inflight == 0 || !(1..=64 * 1024).contains(&size) {
        return Err("--conns and --inflight at least 1, --size from 1 to 65,536".into());
    }
    Ok(Opts {
        quick,
        cases,
        servers: server_names,
        reps: reps.unwrap_or(if quick { 1 } else { 3 }).max(1),
        secs: secs.unwrap_or(if quick { 0.3 } else { 3.0 }),
        warm: warm.unwrap_or(if quick { 0.1 } else { 0.5 }),
        stream_mib: stream_mib.unwrap_or(if quick { 32 } else { 256 }).max(1),
        conns,
        size,
        inflight,
        max_others,
        // A smoke run's figures are noise anyway: it is not run again.
        retries: retries.unwrap_or(if quick { 0 } else { 2 }),
        out,
    })
}

/// Which way is better, for a target.
#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

/// A table row of one case, and issue 20's target for it.
struct Row {
    case: &'static str,
    metric: Metric<Sample>,
    /// Issue 20's target, as a ratio to the baseline, and what it says.
    target: Option<(f64, Better, &'static str)>,
}

fn metrics() -> Vec<Row> {
    let m =
        |case, label, key, get: fn(&Sample) -> f64, show: fn(f64) -> String, ratio, target| Row {
            case,
            metric: Metric {
                label,
                key,
                get,
                show,
                ratio,
            },
            target,
        };
    let noise = |case| {
        [
            (
                "server CPU busy",
                "server_busy",
                Sample::busy as fn(&Sample) -> f64,
            ),
            ("load generator CPU busy", "gen_busy", Sample::gen_busy),
            ("other processes on the server's CPU", "others", |s| {
                s.others
            }),
            (
                "other processes on the generator's CPU",
                "others_gen",
                |s| s.others_gen,
            ),
        ]
        .map(|(label, key, get)| m(case, label, key, get, percent, false, None))
    };
    let mut v = vec![
        m(
            "stream",
            "MB/s (64 KiB stream, each way)",
            "mb_s",
            |s| s.per_s() / 1e6,
            sig3,
            true,
            Some((1.0, Better::Higher, "throughput >= 1.0x")),
        ),
        m(
            "stream",
            "server CPU us per MiB",
            "cpu_us_mib",
            |s| s.server_cpu_s * 1e6 / (s.units / (1 << 20) as f64),
            sig3,
            true,
            Some((
                1.0,
                Better::Lower,
                "(the same in server CPU: per MiB <= 1.0x)",
            )),
        ),
    ];
    v.extend(noise("stream"));
    v.extend([
        m(
            "echo",
            "round trips/s (1,000 conns x 4 KiB)",
            "rtt_s",
            Sample::per_s,
            sig3,
            true,
            None,
        ),
        m(
            "echo",
            "p50 round trip, us",
            "p50_us",
            |s| s.p50_us,
            sig3,
            true,
            None,
        ),
        m(
            "echo",
            "p99 round trip, us",
            "p99_us",
            |s| s.p99_us,
            sig3,
            true,
            Some((1.0, Better::Lower, "p99 <= 1.0x")),
        ),
        m(
            "echo",
            "server CPU us per round trip",
            "cpu_us_rt",
            |s| s.server_cpu_s * 1e6 / s.units,
            sig3,
            true,
            Some((1.0, Better::Lower, "(server CPU per round trip <= 1.0x)")),
        ),
        m(
            "echo",
            "idle connection: server RSS growth, bytes",
            "idle_bytes",
            |s| s.idle_bytes,
            |v| format!("{v:.0}"),
            true,
            Some((1.0, Better::Lower, "idle memory <= 1.0x")),
        ),
    ]);
    v.extend(noise("echo"));
    v.extend([
        m(
            "handshake",
            "full handshakes/s",
            "hs_s",
            Sample::per_s,
            sig3,
            true,
            Some((0.95, Better::Higher, "handshakes/s >= 0.95x")),
        ),
        m(
            "handshake",
            "server CPU us per handshake",
            "cpu_us_hs",
            |s| s.server_cpu_s * 1e6 / s.units,
            sig3,
            true,
            Some((
                1.0 / 0.95,
                Better::Lower,
                "(server CPU per handshake <= 1.05x)",
            )),
        ),
    ]);
    v.extend(noise("handshake"));
    v
}

fn orchestrate() -> Result<bool, String> {
    let o = parse_args()?;
    fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    bench_servers::pin_client_thread();
    let pins = bench_servers::pins();
    let mut header = String::new();
    let _ = writeln!(
        header,
        "tls: servers {:?}, cases {:?}, {} rep(s); stream {} MiB in 64 KiB writes; echo {} \
         conns x {} B, {} s (after {} s of warm-up); handshakes {} in flight, {} s; TLS 1.3 \
         {:?}, X25519, ECDSA P-256 certificate; server CPU {:?}, load generator CPU {:?}{}",
        o.servers,
        o.cases,
        o.reps,
        o.stream_mib,
        o.conns,
        o.size,
        o.secs,
        o.warm,
        o.inflight,
        o.secs,
        servers::suite().suite(),
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
        groups: o.cases.len(),
        servers: o.servers.len(),
        raw_keys: "case,server",
        raw_figures: "units,wall_s,server_cpu_s,gen_cpu_s,others,others_gen,p50_us,p99_us,\
                      idle_bytes",
    };
    let runs = plan.run(
        |ci, si| {
            let (case, name) = (&o.cases[ci], &o.servers[si]);
            (format!("{case} {name}"), format!("{case},{name}"))
        },
        |ci, si| run_one(&o, &o.cases[ci], &o.servers[si]),
        |ci, s| {
            let what = match o.cases[ci].as_str() {
                "stream" => format!(
                    "{} MB/s, {} us CPU per MiB",
                    sig3(s.per_s() / 1e6),
                    sig3(s.server_cpu_s * 1e6 / (s.units / (1 << 20) as f64))
                ),
                "echo" => format!(
                    "{} round trips/s, p50 {} us, p99 {} us, {} us CPU per round trip, \
                     idle {:.0} B/conn",
                    sig3(s.per_s()),
                    sig3(s.p50_us),
                    sig3(s.p99_us),
                    sig3(s.server_cpu_s * 1e6 / s.units),
                    s.idle_bytes
                ),
                _ => format!(
                    "{} handshakes/s, {} us CPU per handshake",
                    sig3(s.per_s()),
                    sig3(s.server_cpu_s * 1e6 / s.units)
                ),
            };
            let text = format!(
                "{what}; server {} busy, generator {}, others {} / {}",
                percent(s.busy()),
                percent(s.gen_busy()),
                percent(s.others),
                percent(s.others_gen),
            );
            let figures = format!(
                "{},{:.6},{:.3},{:.3},{:.4},{:.4},{:.1},{:.1},{:.0}",
                s.units,
                s.wall_s,
                s.server_cpu_s,
                s.gen_cpu_s,
                s.others,
                s.others_gen,
                s.p50_us,
                s.p99_us,
                s.idle_bytes,
            );
            (text, figures)
        },
    );
    let (md, csv) = report(&o, &runs.got);
    runs.finish("tls", &o.out, &header, &md, csv)
}

/// The Markdown tables (medians with ratios to the baseline, the targets, the range over the
/// reps) and the medians' CSV.
fn report(o: &Opts, got: &BTreeMap<(usize, usize), Vec<Sample>>) -> (String, String) {
    let names: Vec<&str> = o.servers.iter().map(String::as_str).collect();
    let mut table = Table::new("TLS", "case", "case", &names, BASELINE, o.reps);
    let mut targets = String::new();
    for (ci, case) in o.cases.iter().enumerate() {
        for Row {
            metric: m, target, ..
        } in metrics().into_iter().filter(|r| r.case == case)
        {
            let row = table.row(ci, case, case, &m, got);
            let (Some(b), Some((t, better, what))) = (table.base, target) else {
                continue;
            };
            let _ = write!(targets, "| {what} | {case}: {} |", m.label);
            for &i in &table.others {
                let r = row[i] / row[b];
                let ok = match better {
                    Better::Higher => r >= t,
                    Better::Lower => r <= t,
                };
                if r.is_finite() {
                    let _ = write!(targets, " {r:.2}x {} |", if ok { "met" } else { "missed" });
                } else {
                    targets.push_str(" - |");
                }
            }
            targets.push('\n');
        }
    }
    let mut more = String::new();
    if table.base.is_some() && !targets.is_empty() {
        let _ = write!(
            more,
            "\n### Issue 20's targets (ratios of the medians to {BASELINE}'s; in parentheses \
             the same target read in server CPU per unit, the measure to compare when the \
             load generator saturates its CPU)\n\n| target | metric |{}\n|---|---|{}\n{targets}",
            table
                .others
                .iter()
                .map(|&i| format!(" {} |", names[i]))
                .collect::<String>(),
            "---|".repeat(table.others.len())
        );
    }
    table.finish(&more)
}
