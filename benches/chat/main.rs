//! The chat bench: chat servers side by side under four loads, every delivery checked.
//!
//! Servers (a name and a command line each, see [`server_spec`]; `--server NAME=COMMAND` adds
//! one for a run):
//!
//! - **chat-server**: the project's example, `target/release/examples/chat-server
//!   --max-backlog 67108864` (see [`CHAT_SERVER_BACKLOG`]; build it first: `cargo build
//!   --release --example chat-server`; `scripts/chat-bench.sh` does).
//! - **tokio-batch**, **tokio-naive**: the two tokio servers of [`tokio_chat`], this binary
//!   re-executed with `PROACTOR_BENCH_ROLE=chat-server`. Not run unless named:
//!   **tokio-batch-main**, **tokio-naive-main**, the same with the accept loop on the main
//!   thread (`#[tokio::main]`'s shape) instead of in a task.
//!
//! Any program that takes `--addr 127.0.0.1:0`, prints `listening on HOST:PORT` as its first
//! line and speaks the chat contract's welcome, joined, chat and left lines can be added.
//!
//! Cases (`--quick` shrinks them, same names):
//!
//! - **burst100**, **burst1000**: N clients (100, 1,000) each send K 64-byte lines (200, 10)
//!   as fast as their sockets take them while reading everything: deliveries per second, from
//!   the first send to the last delivery (N x (N - 1) x K deliveries).
//! - **join1000**: 1,000 clients connect one after another, each once the one before has its
//!   welcome: the server's CPU time per `joined` line (499,500 of them).
//! - **trickle**: 100 clients each send a line every 100 ms for 10 s, staggered evenly over
//!   the 100 ms (about 99,000 deliveries per second): server CPU per delivery and the
//!   delivery latency (p50, p99), from the send time written in the line to its arrival, both
//!   on the generator's clock.
//!
//! `--quickack`: the clients set `TCP_QUICKACK` after every read, so they acknowledge at
//! once. No server sets `TCP_NODELAY` (neither the example nor tokio's chat example does), so
//! Nagle's algorithm holds a server's next small write until the last one is acknowledged,
//! and a client's delayed ACK (up to 40 ms on Linux) then shows in the trickle's latency. By
//! default the clients behave as ordinary ones (`nc`, `telnet`) do.
//!
//! Every case starts with the join storm of its clients (setup, not timed except in
//! join1000) and runs on a fresh server process, so the peak RSS (`VmHWM`) read at the end
//! is that case's. The server runs pinned to CPU `PROACTOR_BENCH_SERVER_CPU` (0), this process
//! (the orchestrator and the single-threaded load generator of [`load`]) to
//! `PROACTOR_BENCH_CLIENT_CPU` (1); `PROACTOR_BENCH_PIN=0` turns pinning off. Server CPU
//! time is user + system from `/proc/PID/stat` before and after the measured part (10 ms
//! ticks); "server CPU busy" is that over the wall time. "Other processes on the server's
//! CPU" is that CPU's user + system time in `/proc/stat` minus the server's, over the same
//! span: on a shared machine, the runs where something else took the server's CPU; the same
//! for the generator's CPU. A run in which other processes took more than `--max-others`
//! percent (5) of either CPU is run again, up to `--retries` times (2; 0 with `--quick`);
//! the last try is kept whatever it shows, and `chat_raw.csv` has every try (`kept` 0 or 1).
//!
//! ```text
//! cargo bench --bench chat -- [--cases burst100,burst1000,join1000,trickle]
//!     [--servers chat-server,tokio-batch,tokio-naive] [--reps 3] [--quick] [--quickack]
//!     [--max-others 5] [--retries 2] [--out DIR] [--server NAME=COMMAND]...
//! ```
//!
//! Each rep runs every case on every server (the server order reversed on odd reps), so the
//! servers are compared side by side. Prints Markdown tables (medians of the reps, the range,
//! ratios to tokio-batch) and writes `chat.md`, `chat.csv` (medians) and `chat_raw.csv`
//! (every run) under `target/bench/` (or `--out`). A failed check fails its run, and the
//! bench exits with status 1 once every run is done.

#[allow(dead_code)]
#[path = "../servers/mod.rs"]
mod servers;

use servers::process::{millions, percent, sig3, Busy, Meter, ServerProc, Span};
use servers::runs::{self, default_out, list, Figures, Metric, Plan, Table};

mod load;
mod tokio_chat;

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const ROLE: &str = "PROACTOR_BENCH_ROLE";
const KIND: &str = "PROACTOR_BENCH_KIND";
/// The server every other is compared with.
const BASELINE: &str = "tokio-batch";
const DEFAULT_SERVERS: [&str; 3] = ["chat-server", "tokio-batch", "tokio-naive"];

fn main() {
    if env::var(ROLE).as_deref() == Ok("chat-server") {
        std::process::exit(tokio_role());
    }
    runs::conclude("chat", orchestrate());
}

/// This binary as a tokio chat server: `PROACTOR_BENCH_KIND=tokio-batch|tokio-naive`,
/// `--addr HOST:PORT`.
fn tokio_role() -> i32 {
    let kind = env::var(KIND).unwrap_or_default();
    let Some((writer, accept)) = tokio_chat::parse(&kind) else {
        eprintln!("chat: {KIND}={kind:?} is not a tokio chat server");
        return 2;
    };
    let mut addr = "127.0.0.1:7000".to_string();
    let mut args = env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--addr", Some(v)) => addr = v,
            _ => {
                eprintln!("usage: {ROLE}=chat-server {KIND}={kind} chat --addr HOST:PORT");
                return 2;
            }
        }
    }
    match tokio_chat::main(writer, accept, &addr) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{kind}: {e}");
            1
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers

/// How to start one server: the program, its arguments (before `--addr 127.0.0.1:0`) and
/// environment.
#[derive(Clone, Debug)]
struct ServerSpec {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

/// `target/release/examples`, beside this bench's `target/release/deps`.
fn examples_dir() -> PathBuf {
    let exe = env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("target/release"), Path::to_path_buf)
        .join("examples")
}

/// chat-server's `--max-backlog` here: 64 MiB, where its default is 1 MiB. In burst100 each
/// client is due 99 x 200 lines (1.48 MB) at once; the server reads them in faster than the
/// sockets take them out, so with the default it cuts off clients that are reading as fast
/// as they can. The tokio servers have no limit at all.
const CHAT_SERVER_BACKLOG: usize = 64 << 20;

/// The servers known by name. To add one, add its name to the match (and to
/// `DEFAULT_SERVERS` if every run should have it).
fn server_spec(name: &str) -> Option<ServerSpec> {
    let spec = |program: PathBuf, envs: Vec<(String, String)>| ServerSpec {
        name: name.to_string(),
        program,
        args: Vec::new(),
        envs,
    };
    match name {
        "chat-server" => Some(ServerSpec {
            args: vec!["--max-backlog".into(), CHAT_SERVER_BACKLOG.to_string()],
            ..spec(examples_dir().join("chat-server"), Vec::new())
        }),
        _ if tokio_chat::parse(name).is_some() => Some(spec(
            env::current_exe().ok()?,
            vec![
                (ROLE.to_string(), "chat-server".to_string()),
                (KIND.to_string(), name.to_string()),
            ],
        )),
        _ => None,
    }
}

/// `NAME=PROGRAM ARG...` (split at spaces) from `--server`.
fn parse_extra(s: &str) -> Result<ServerSpec, String> {
    let (name, cmd) = s
        .split_once('=')
        .ok_or(format!("--server {s:?}: expected NAME=COMMAND"))?;
    let mut words = cmd.split_whitespace().map(String::from);
    let program = words.next().ok_or(format!("--server {s:?}: no command"))?;
    Ok(ServerSpec {
        name: name.trim().to_string(),
        program: PathBuf::from(program),
        args: words.collect(),
        envs: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Cases

#[derive(Clone, Copy, Debug)]
enum Work {
    /// Each client sends this many lines at once.
    Burst(usize),
    /// The clients' join storm is the case.
    Join,
    /// Each client sends a line every `period` for `secs` seconds.
    Trickle { period: Duration, secs: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    clients: usize,
    work: Work,
}

const CASES: [&str; 4] = ["burst100", "burst1000", "join1000", "trickle"];

fn case(name: &str, quick: bool) -> Option<Case> {
    let period = Duration::from_millis(100);
    let (clients, work) = match (name, quick) {
        ("burst100", false) => (100, Work::Burst(200)),
        ("burst100", true) => (50, Work::Burst(40)),
        ("burst1000", false) => (1_000, Work::Burst(10)),
        ("burst1000", true) => (200, Work::Burst(5)),
        ("join1000", false) => (1_000, Work::Join),
        ("join1000", true) => (200, Work::Join),
        ("trickle", false) => (100, Work::Trickle { period, secs: 10 }),
        ("trickle", true) => (100, Work::Trickle { period, secs: 2 }),
        _ => return None,
    };
    let name = CASES.into_iter().find(|&c| c == name)?;
    Some(Case {
        name,
        clients,
        work,
    })
}

impl Case {
    fn describe(&self) -> String {
        let n = self.clients;
        match self.work {
            Work::Burst(k) => format!(
                "{n} clients x {k} lines at once ({} deliveries)",
                n * (n - 1) * k
            ),
            Work::Join => format!(
                "{n} clients joining one by one ({} joined lines)",
                n * (n - 1) / 2
            ),
            Work::Trickle { period, secs } => format!(
                "{n} clients x a line every {} ms for {secs} s ({} deliveries)",
                period.as_millis(),
                n * (n - 1) * lines_in(period, secs)
            ),
        }
    }
}

fn lines_in(period: Duration, secs: u64) -> usize {
    (Duration::from_secs(secs).as_nanos() / period.as_nanos().max(1)) as usize
}

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Lines counted: deliveries, or `joined` lines in the join storm.
    lines: u64,
    wall_s: f64,
    server_cpu_s: f64,
    gen_cpu_s: f64,
    /// The share of the server's CPU, and of the load generator's, that other processes
    /// took over the measured part (NaN when not pinned).
    others: f64,
    others_gen: f64,
    p50_us: f64,
    p99_us: f64,
    peak_rss_kib: u64,
}

impl Sample {
    fn per_s(&self) -> f64 {
        self.lines as f64 / self.wall_s
    }
    fn cpu_us_per_line(&self) -> f64 {
        self.server_cpu_s * 1e6 / self.lines as f64
    }
    fn busy(&self) -> f64 {
        self.server_cpu_s / self.wall_s
    }
    fn gen_busy(&self) -> f64 {
        self.gen_cpu_s / self.wall_s
    }
    fn others_busy(&self) -> f64 {
        self.others
    }
    fn others_gen_busy(&self) -> f64 {
        self.others_gen
    }
    fn rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }
    /// The CPU figures of `span` (the CPUs' busy time over the span between the two
    /// readings, a little longer than the measured part's wall time: it includes the final
    /// checks).
    fn cpu(&mut self, span: Span) {
        self.server_cpu_s = span.server_cpu_s;
        self.gen_cpu_s = span.gen_cpu_s;
        self.others = span.others;
        self.others_gen = span.others_gen;
    }
}

impl Figures for Sample {
    fn others(&self) -> (f64, f64) {
        (self.others, self.others_gen)
    }
}

fn run_one(spec: &ServerSpec, case: &Case, quickack: bool) -> Result<Sample, String> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .args(["--addr", "127.0.0.1:0"])
        .env_remove(ROLE)
        .envs(spec.envs.iter().map(|(k, v)| (k, v)));
    let mut srv = ServerProc::start(&spec.name, cmd)?;
    let trickle = matches!(case.work, Work::Trickle { .. });
    let mut gen = load::Gen::new(srv.addr, case.clients, trickle, quickack)
        .map_err(|e| format!("load generator: {e}"))?;
    // (The load generator's CPU time is this process's.)
    let meter = |srv: &ServerProc| {
        let (user, sys) = servers::cpu_us();
        Meter::now(srv, user + sys, Busy::Tasks)
    };
    let m0 = meter(&srv)?;
    let joined = gen.join(case.clients, Duration::from_secs(300))?;
    let m1 = meter(&srv)?;
    let mut s = Sample::default();
    match case.work {
        Work::Join => {
            s.lines = joined.lines;
            s.wall_s = joined.wall.as_secs_f64();
            s.cpu(m0.since(&m1));
        }
        Work::Burst(k) => {
            let d = gen.burst(k, Duration::from_secs(300))?;
            s.cpu(m1.since(&meter(&srv)?));
            s.lines = d.deliveries;
            s.wall_s = d.wall.as_secs_f64();
        }
        Work::Trickle { period, secs } => {
            let d = gen.trickle(period, lines_in(period, secs))?;
            s.cpu(m1.since(&meter(&srv)?));
            s.lines = d.deliveries;
            s.wall_s = d.wall.as_secs_f64();
            let q = |q: f64| servers::client::quantile(&d.latencies, q) as f64 / 1e3;
            (s.p50_us, s.p99_us) = (q(0.50), q(0.99));
        }
    }
    s.peak_rss_kib = srv.peak_rss_kib()?;
    srv.alive(&spec.name)?;
    // The server goes first, so its clients' closes cost it nothing measured; the clients
    // close with a reset.
    drop(srv);
    gen.close();
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Orchestration

struct Opts {
    quick: bool,
    quickack: bool,
    /// A run in which other processes took more than this share (%) of the server's or the
    /// generator's CPU is run again, up to `retries` times.
    max_others: f64,
    retries: usize,
    cases: Vec<Case>,
    servers: Vec<ServerSpec>,
    reps: usize,
    out: PathBuf,
}

fn parse_args() -> Result<Opts, String> {
    let mut quick = runs::quick_env();
    let mut quickack = false;
    let mut max_others = 5.0;
    let mut retries = None;
    let mut case_names: Vec<String> = CASES.map(String::from).to_vec();
    let mut server_names: Vec<String> = DEFAULT_SERVERS.map(String::from).to_vec();
    let mut extra = Vec::new();
    let mut reps = 0;
    let mut out = default_out();
    let mut args = env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--quick" => quick = true,
            "--quickack" => quickack = true,
            "--max-others" => {
                max_others = value()?.parse().map_err(|e| format!("--max-others: {e}"))?
            }
            "--retries" => retries = Some(value()?.parse().map_err(|e| format!("--retries: {e}"))?),
            "--cases" => case_names = list(value()?),
            "--servers" => server_names = list(value()?),
            "--server" => extra.push(parse_extra(&value()?)?),
            "--reps" => reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--out" => out = PathBuf::from(value()?),
            _ => {
                return Err(format!(
                    "unknown argument {a:?} (see the doc at the top of benches/chat/main.rs)"
                ))
            }
        }
    }
    let cases = case_names
        .iter()
        .map(|c| case(c, quick).ok_or(format!("unknown case {c:?} (cases: {})", CASES.join(","))))
        .collect::<Result<Vec<_>, _>>()?;
    let mut servers = Vec::new();
    for name in &server_names {
        match server_spec(name) {
            Some(s) => servers.push(s),
            // `--servers` may name a `--server` extra to order it; extras not named run last.
            None if extra.iter().any(|e: &ServerSpec| &e.name == name) => {}
            None => return Err(format!("unknown server {name:?}")),
        }
    }
    for e in extra {
        match servers.iter().position(|s| s.name == e.name) {
            Some(i) => servers[i] = e,
            None => servers.push(e),
        }
    }
    for s in &servers {
        // (A bare name is looked up in PATH when it starts.)
        if s.program.components().count() > 1 && !s.program.exists() {
            let hint = if s.name == "chat-server" {
                " (build it: cargo build --release --example chat-server)"
            } else {
                ""
            };
            return Err(format!(
                "{}: {} not found{hint}",
                s.name,
                s.program.display()
            ));
        }
    }
    // A smoke run's figures are noise anyway: it is not run again.
    let retries = retries.unwrap_or(if quick { 0 } else { 2 });
    if reps == 0 {
        reps = if quick { 1 } else { 3 };
    }
    Ok(Opts {
        quick,
        quickack,
        max_others,
        retries,
        cases,
        servers,
        reps,
        out,
    })
}

fn metrics(work: Work) -> Vec<Metric<Sample>> {
    let m = |label, key, get, show| Metric {
        label,
        key,
        get,
        show,
        // (No ratio of the CPU shares that only say how a run went.)
        ratio: !matches!(key, "gen_busy" | "others_busy" | "others_gen_busy"),
    };
    let rate = m(
        "deliveries/s",
        "per_s",
        Sample::per_s as fn(&Sample) -> f64,
        millions as fn(f64) -> String,
    );
    let cpu = m(
        "server CPU µs per delivery",
        "cpu_us_per_line",
        Sample::cpu_us_per_line,
        sig3,
    );
    let busy = m("server CPU busy", "server_busy", Sample::busy, percent);
    let gen = m(
        "load generator CPU busy",
        "gen_busy",
        Sample::gen_busy,
        percent,
    );
    let rss = m("peak RSS, MiB", "peak_rss_mib", Sample::rss_mib, |v| {
        format!("{v:.0}")
    });
    let others = m(
        "other processes on the server's CPU",
        "others_busy",
        Sample::others_busy,
        percent,
    );
    let others_gen = m(
        "other processes on the generator's CPU",
        "others_gen_busy",
        Sample::others_gen_busy,
        percent,
    );
    match work {
        Work::Burst(_) => vec![rate, cpu, busy, gen, others, others_gen, rss],
        Work::Join => vec![
            m(
                "server CPU µs per joined line",
                "cpu_us_per_line",
                Sample::cpu_us_per_line,
                sig3,
            ),
            m("joined lines/s", "per_s", Sample::per_s, millions),
            m("wall time, s", "wall_s", |s| s.wall_s, sig3),
            busy,
            others,
            others_gen,
            rss,
        ],
        Work::Trickle { .. } => vec![
            rate,
            cpu,
            m("p50 delivery latency, µs", "p50_us", |s| s.p50_us, sig3),
            m("p99 delivery latency, µs", "p99_us", |s| s.p99_us, sig3),
            busy,
            others,
            others_gen,
            rss,
        ],
    }
}

fn orchestrate() -> Result<bool, String> {
    let o = parse_args()?;
    fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    servers::pin_client_thread();
    let pins = servers::pins();
    let names: Vec<&str> = o.servers.iter().map(|s| s.name.as_str()).collect();
    let mut header = String::new();
    let _ = writeln!(
        header,
        "chat: servers {names:?}, {} rep(s){}{}, server CPU {:?}, load generator CPU {:?}",
        o.reps,
        if o.quick { ", quick sizes" } else { "" },
        if o.quickack {
            ", clients ACK at once (TCP_QUICKACK)"
        } else {
            ""
        },
        pins.server,
        pins.client,
    );
    for c in &o.cases {
        let _ = writeln!(header, "  {}: {}", c.name, c.describe());
    }
    print!("{header}");
    let plan = Plan {
        reps: o.reps,
        retries: o.retries,
        max_others: o.max_others,
        pause: Duration::from_millis(200),
        groups: o.cases.len(),
        servers: o.servers.len(),
        raw_keys: "case,clients,server",
        raw_figures: "lines,wall_s,server_cpu_s,cpu_us_per_line,per_s,server_busy,gen_busy,\
                      others_busy,others_gen_busy,p50_us,p99_us,peak_rss_kib",
    };
    let runs = plan.run(
        |ci, si| {
            let (case, spec) = (&o.cases[ci], &o.servers[si]);
            (
                format!("{} {}", case.name, spec.name),
                format!("{},{},{}", case.name, case.clients, spec.name),
            )
        },
        |ci, si| run_one(&o.servers[si], &o.cases[ci], o.quickack),
        |ci, s| {
            let line = metrics(o.cases[ci].work)
                .iter()
                .map(|m| format!("{} {}", m.label, (m.show)((m.get)(s))))
                .collect::<Vec<_>>()
                .join(", ");
            let figures = format!(
                "{},{:.6},{:.3},{:.4},{:.1},{:.4},{:.4},{:.4},{:.4},{:.1},{:.1},{}",
                s.lines,
                s.wall_s,
                s.server_cpu_s,
                s.cpu_us_per_line(),
                s.per_s(),
                s.busy(),
                s.gen_busy(),
                s.others_busy(),
                s.others_gen_busy(),
                s.p50_us,
                s.p99_us,
                s.peak_rss_kib
            );
            (line, figures)
        },
    );
    let (md, csv) = report(&o, &runs.got);
    runs.finish("chat", &o.out, &header, &md, csv)
}

/// The Markdown tables (medians with ratios, then the range over the reps) and the medians'
/// CSV.
fn report(o: &Opts, got: &BTreeMap<(usize, usize), Vec<Sample>>) -> (String, String) {
    let names: Vec<&str> = o.servers.iter().map(|s| s.name.as_str()).collect();
    let mut table = Table::new("Chat", "case", "case,clients", &names, BASELINE, o.reps);
    for (ci, case) in o.cases.iter().enumerate() {
        let keys = format!("{},{}", case.name, case.clients);
        for m in metrics(case.work) {
            table.row(ci, case.name, &keys, &m, got);
        }
    }
    table.finish("")
}
