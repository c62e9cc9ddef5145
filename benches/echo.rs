//! Echo throughput and round-trip cost: proactor against the servers a user would otherwise
//! write, side by side in one run, so the ratios come from one machine state.
//!
//! Hot path: the proactor's whole echo cycle as an application drives it: the poller's
//! edge-triggered read into the shared arena, the `Read` completion posted to the mailbox, the
//! `WaitIO` loop taking the batch and submitting `Write(bytes)` (no copy) and the next
//! `ReadInternal`, the command queue and the poller's wake-up, the `sendmsg`, and the write
//! completion. That is the overhead the proactor adds over raw readiness, and the figure its
//! design (batching, no allocation per operation, waking the poller only when it sleeps) has
//! to win back.
//!
//! The same workload goes through these servers (`servers/mod.rs`): (a) proactor, one watcher
//! and the `WaitIO` loop on one thread, threaded (`proactor`) or inline (`proactor-inline`),
//! on the readiness engine, and the same two on the io_uring engine (`proactor-uring`,
//! `proactor-uring-inline`); (b) tokio, multi-thread runtime, a task per connection
//! with a 64 KiB buffer, `read` then `write_all`; (c) a hand-written single-threaded mio
//! edge-triggered server (read until `WouldBlock` into one 64 KiB buffer, write at once, keep
//! only the unwritten rest): the fastest thing possible on epoll, the baseline to meet;
//! (d) `uring-loop`, a hand-written single-threaded io_uring loop (`servers/uring_loop.rs`):
//! the limit on io_uring; (e) a `std::net` thread per connection. The io_uring servers are
//! left out where the kernel does not allow io_uring.
//!
//! One criterion group per case, each with every server:
//! - `stream_64KiB`: one connection, the client keeps the pipe full (`Throughput::Bytes`, one
//!   iteration = 64 KiB echoed): bulk copy cost, no waiting on round trips.
//! - `pingpong_1x128B`: one connection, 128 bytes there and back per iteration: pure latency
//!   of one wake-up chain (`Throughput::Elements` = messages).
//! - `pingpong_100x128B`, `pingpong_1000x4KiB`: the client writes to every connection, then
//!   reads every echo: how well a round of many ready connections is batched.
//! - `burst_8192x1KiB`: gaio's "8K concurrent echo" (every connection sends 1 KiB and reads it
//!   back), with the connections opened once before measuring. `benches/scale.rs` times the
//!   whole burst, connects included, from 1K to 16K connections in a separate process.
//!
//! Pinning: the client (this thread, criterion's) runs on CPU 1 and every server thread on
//! CPU 0, with `sched_setaffinity` (proactor: `poller_cpu` for the poller and the call at the
//! start of the loop thread; tokio: `on_thread_start`, one worker by default; mio and std: the
//! call at the start of each thread). `PROACTOR_BENCH_PIN=0` turns pinning off,
//! `PROACTOR_BENCH_SERVER_CPU` / `PROACTOR_BENCH_CLIENT_CPU` move it. Each server is started
//! on 127.0.0.1:0 for its benchmark and stopped (threads joined, sockets closed) before the
//! next, so one process stays under the 20,000 fd limit.
//!
//! `watchers_1000x4KiB` (issue 7) runs the 1,000-connection round on a pool of 1, 2 and 4
//! inline watchers, one loop thread each, unpinned.
//!
//! `PROACTOR_BENCH_SERVERS=proactor,mio` limits the servers; `PROACTOR_BENCH_QUICK=1` shrinks
//! the 1,000- and 8,192-connection cases for a smoke run. Run with `scripts/bench.sh`, or
//! `cargo bench --bench echo`.

#[allow(dead_code)]
#[path = "servers/mod.rs"]
mod servers;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};

use servers::{client, Kind, Server};

/// Bytes per iteration of the stream case.
const STREAM_CHUNK: usize = 64 * 1024;

fn quick() -> bool {
    std::env::var("PROACTOR_BENCH_QUICK").is_ok_and(|v| v.trim() == "1")
}

fn start(kind: Kind) -> Server {
    Server::start(kind).unwrap_or_else(|e| panic!("{}: start: {e}", kind.name()))
}

/// Stops a server once every client connection is closed and the server has noticed.
fn stop(server: Server) {
    if !server.wait_idle(Duration::from_secs(10)) {
        eprintln!("{}: connections still open after 10 s", server.kind.name());
    }
    drop(server);
}

fn stream(c: &mut Criterion) {
    let mut g = c.benchmark_group("stream_64KiB");
    g.throughput(Throughput::Bytes(STREAM_CHUNK as u64));
    let chunk = client::message(STREAM_CHUNK);
    let mut rbuf = vec![0u8; 256 * 1024];
    for kind in Kind::selected() {
        let server = start(kind);
        let mut conns = client::connect_n(server.addr, 1).expect("connect");
        client::checked_round(&mut conns, &chunk).expect("echo check");
        let conn = &mut conns[0];
        g.bench_function(BenchmarkId::new(kind.name(), "64KiB"), |b| {
            b.iter_custom(|iters| {
                let total = iters * STREAM_CHUNK as u64;
                let t = Instant::now();
                client::stream(conn, total, &chunk, &mut rbuf)
                    .unwrap_or_else(|e| panic!("{}: stream: {e}", kind.name()));
                t.elapsed()
            })
        });
        client::close_all(conns);
        stop(server);
    }
    g.finish();
}

/// Every iteration writes `size` bytes on each of `conns` connections, then reads every echo.
fn rounds(c: &mut Criterion, name: &str, conns: usize, size: usize) {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(conns as u64));
    if conns >= 1000 {
        // Iterations of milliseconds: linear sampling (1, 2, 3, ... iterations per sample)
        // would run far past the measurement time.
        g.sampling_mode(SamplingMode::Flat);
    }
    if conns >= 4096 {
        g.sample_size(10); // tens of milliseconds per iteration
    }
    let msg = client::message(size);
    let mut buf = vec![0u8; size];
    for kind in Kind::selected() {
        let server = start(kind);
        let mut cs = client::connect_n(server.addr, conns)
            .unwrap_or_else(|e| panic!("{}: connect {conns}: {e}", kind.name()));
        client::checked_round(&mut cs, &msg)
            .unwrap_or_else(|e| panic!("{}: echo check: {e}", kind.name()));
        g.bench_with_input(BenchmarkId::new(kind.name(), conns), &conns, |b, _| {
            b.iter(|| {
                client::round(&mut cs, &msg, &mut buf)
                    .unwrap_or_else(|e| panic!("{}: round: {e}", kind.name()))
            })
        });
        client::close_all(cs);
        stop(server);
    }
    g.finish();
}

/// Issue 7: the 1,000-connection round served by a pool of 1, 2 and 4 inline watchers (one
/// loop thread each, unpinned), side by side. On a 2-core machine the load generator needs
/// one core, so this shows the cost of extra watchers more than their gain.
fn watchers(c: &mut Criterion, conns: usize) {
    let mut g = c.benchmark_group(format!("watchers_{conns}x4KiB"));
    g.throughput(Throughput::Elements(conns as u64));
    g.sampling_mode(SamplingMode::Flat);
    let msg = client::message(4096);
    let mut buf = vec![0u8; 4096];
    for n in [1, 2, 4] {
        let server = servers::start_pool(n).expect("pool server");
        let mut cs = client::connect_n(server.addr, conns).expect("connect");
        client::checked_round(&mut cs, &msg).expect("echo check");
        g.bench_with_input(BenchmarkId::new("proactor-pool", n), &n, |b, _| {
            b.iter(|| client::round(&mut cs, &msg, &mut buf).expect("round"))
        });
        client::close_all(cs);
        stop(server);
    }
    g.finish();
}

fn main() {
    servers::pin_client_thread();
    let mut c = Criterion::default().configure_from_args();
    let (many, burst) = if quick() { (100, 512) } else { (1000, 8192) };
    stream(&mut c);
    rounds(&mut c, "pingpong_1x128B", 1, 128);
    rounds(&mut c, "pingpong_100x128B", 100, 128);
    rounds(&mut c, &format!("pingpong_{many}x4KiB"), many, 4096);
    rounds(&mut c, &format!("burst_{burst}x1KiB"), burst, 1024);
    watchers(&mut c, many);
    c.final_summary();
}
