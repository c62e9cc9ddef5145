//! Framed reads against splitting by hand: the same stream of lines read three ways, side by
//! side in one run, on each engine.
//!
//! - `frames`: `Cmd::ReadFrames(Framing::lines(max), 1024)`, every whole line already there
//!   (up to 1,024, what one 64 KiB internal read holds) in one completion;
//! - `frame`: `Cmd::ReadFrame(Framing::lines(max))`, one line per completion;
//! - `by-hand`: `Cmd::ReadInternal` and a split loop in the application (`memchr`, as the
//!   framing uses), with a per-connection buffer for the line a read cut in two (what the
//!   chat server did before framing).
//!
//! Each pass: `CONNS` connections; a client thread per connection writes its lines (64 B or
//! 4 KiB each, the `\n` included) as fast as the socket takes them, then closes; the
//! application thread counts the lines and their bytes (and checks them) until every
//! connection ended. Figures per pass: lines per second (wall time), and the CPU the server
//! side spent per line (the process's CPU time less the client threads' own). Passes
//! alternate the three readers; the report gives the median of `PASSES` and the ratio to
//! `by-hand` (above 1 = faster, or less CPU).
//!
//!     cargo bench --bench framing            # PROACTOR_BENCH_QUICK=1 for a smoke run
//!
//! `PROACTOR_BENCH_INLINE=1`: the watcher is inline (`WatcherBuilder::inline`), so the
//! application thread runs the poller too and the split costs the same thread either way.
//!
//! Engines: io_uring (where the kernel allows it) and epoll, one after the other.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use proactor::{Buf, Cmd, Completion, Engine, Error, Framing, Op, Watcher};

const CONNS: usize = 4;
const PASSES: usize = 5;
/// Frames per `ReadFrames` at most: as many 64-byte lines as one 64 KiB internal read holds.
const BATCH: usize = 1024;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Reader {
    Frames,
    Frame,
    ByHand,
}

impl Reader {
    fn name(self) -> &'static str {
        match self {
            Reader::Frames => "frames",
            Reader::Frame => "frame",
            Reader::ByHand => "by-hand",
        }
    }
}

/// CPU time of the calling thread (`RUSAGE_THREAD`) or the process (`RUSAGE_SELF`).
fn cpu(who: i32) -> Duration {
    // SAFETY: getrusage fills the struct we hand it; zeroed is a valid `rusage`.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(who, &mut ru), 0);
        ru
    };
    let t = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    t(ru.ru_utime) + t(ru.ru_stime)
}

struct Pass {
    lines_per_s: f64,
    server_ns_per_line: f64,
    /// Lines per read completion (ended connections' `Eof`s not counted).
    lines_per_read: f64,
}

/// One pass: `lines` lines of `len` bytes on each of CONNS connections.
fn pass(engine: Engine, reader: Reader, len: usize, lines: usize) -> Pass {
    let inline = std::env::var("PROACTOR_BENCH_INLINE").is_ok_and(|v| v.trim() == "1");
    let watcher = Watcher::builder()
        .engine(engine)
        .inline(inline)
        .build()
        .expect("watcher");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut line = vec![b'x'; len - 1];
    line.push(b'\n');
    let text: Vec<u8> = line.repeat(lines);
    let max = len; // room for the line, not more
    let read = |conn: &proactor::Conn| {
        let cmd = match reader {
            Reader::Frames => Cmd::ReadFrames(Framing::lines(max), BATCH),
            Reader::Frame => Cmd::ReadFrame(Framing::lines(max)),
            Reader::ByHand => Cmd::ReadInternal,
        };
        conn.send(cmd).expect("send");
    };
    let mut conns = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..CONNS {
        let client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let conn = watcher.register(server).expect("register");
        read(&conn);
        conns.push(conn);
        clients.push(client);
    }
    // (The copies are made, and their pages touched, before the clock starts.)
    let texts: Vec<Vec<u8>> = (0..CONNS).map(|_| text.clone()).collect();
    let cpu_before = cpu(libc::RUSAGE_SELF);
    let start = Instant::now();
    let writers: Vec<_> = clients
        .into_iter()
        .zip(texts)
        .map(|(mut c, text)| {
            thread::spawn(move || {
                let before = cpu(libc::RUSAGE_THREAD);
                c.write_all(&text).unwrap();
                drop(c);
                cpu(libc::RUSAGE_THREAD) - before
            })
        })
        .collect();

    // The application: count lines and bytes, keep an unfinished line for `by-hand`.
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); CONNS];
    let (mut got_lines, mut got_bytes, mut ended) = (0usize, 0usize, 0usize);
    let index = |c: &Completion| conns.iter().position(|k| k.id() == c.conn.id()).unwrap();
    let mut batch = Vec::with_capacity(256);
    let count = |l: &[u8], got_lines: &mut usize, got_bytes: &mut usize| {
        debug_assert!(l.iter().all(|&b| b == b'x'));
        *got_lines += 1;
        *got_bytes += l.len();
    };
    while ended < CONNS {
        watcher.wait_io(&mut batch).expect("wait_io");
        for c in batch.drain(..) {
            match (&c.result, &c.buf) {
                (Err(Error::Eof), _) => {
                    ended += 1;
                    continue;
                }
                (Err(e), _) => panic!("{e}"),
                (Ok(()), Buf::Frames(frames)) => {
                    for f in frames.iter() {
                        count(f, &mut got_lines, &mut got_bytes);
                    }
                }
                (Ok(()), Buf::Bytes(b)) if c.op == Op::ReadFrame => {
                    count(b, &mut got_lines, &mut got_bytes)
                }
                (Ok(()), Buf::Bytes(b)) => {
                    let mut data: &[u8] = b;
                    let p = &mut partial[index(&c)];
                    while let Some(end) = memchr::memchr(b'\n', data) {
                        if p.is_empty() {
                            count(&data[..end], &mut got_lines, &mut got_bytes);
                        } else {
                            p.extend_from_slice(&data[..end]);
                            assert!(p.len() < max);
                            count(p, &mut got_lines, &mut got_bytes);
                            p.clear();
                        }
                        data = &data[end + 1..];
                    }
                    p.extend_from_slice(data);
                    assert!(p.len() < max, "a line too long");
                }
                (Ok(()), other) => panic!("{other:?}"),
            }
            read(&c.conn);
        }
    }
    let wall = start.elapsed();
    let client_cpu: Duration = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let total_cpu = cpu(libc::RUSAGE_SELF) - cpu_before;
    assert_eq!(got_lines, lines * CONNS, "{reader:?}: lines lost");
    assert_eq!(got_bytes, (len - 1) * lines * CONNS);
    let reads = watcher.stats().completions as usize - CONNS;
    drop(conns);
    watcher.close();
    let server = total_cpu.saturating_sub(client_cpu);
    let n = (lines * CONNS) as f64;
    Pass {
        lines_per_s: n / wall.as_secs_f64(),
        server_ns_per_line: server.as_nanos() as f64 / n,
        lines_per_read: n / reads as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var("PROACTOR_BENCH_QUICK").is_ok_and(|v| v.trim() == "1");
    // (line length, lines per connection): 16 MiB per connection, 1 MiB in a quick run.
    let shift = if quick { 20 } else { 24 };
    // PROACTOR_BENCH_LINES=4096 (say) runs only that line length, for a profile.
    let only_len = std::env::var("PROACTOR_BENCH_LINES").ok();
    let cases: Vec<(usize, usize)> = [64usize, 4096]
        .into_iter()
        .filter(|l| only_len.as_ref().map_or(true, |o| o == &l.to_string()))
        .map(|l| (l, (1usize << shift) / l))
        .collect();
    // PROACTOR_BENCH_READERS=frames,by-hand (say) runs only those, for a profile.
    let only = std::env::var("PROACTOR_BENCH_READERS").unwrap_or_default();
    let readers: Vec<Reader> = [Reader::Frames, Reader::Frame, Reader::ByHand]
        .into_iter()
        .filter(|r| only.is_empty() || only.split(',').any(|o| o == r.name()))
        .collect();
    let passes = if quick { 1 } else { PASSES };
    // PROACTOR_ENGINE=epoll runs only that one.
    let uring_wanted = std::env::var("PROACTOR_ENGINE").map_or(true, |e| e != "epoll");
    let epoll_wanted = std::env::var("PROACTOR_ENGINE").map_or(true, |e| e != "uring");
    let mut engines: Vec<Engine> = if Watcher::builder().engine(Engine::Uring).build().is_ok() {
        vec![Engine::Uring, Engine::Readiness]
    } else {
        println!("(io_uring unavailable here: epoll only)");
        vec![Engine::Readiness]
    };
    engines.retain(|&e| {
        if e == Engine::Uring {
            uring_wanted
        } else {
            epoll_wanted
        }
    });
    println!(
        "framing: {CONNS} connections, {passes} passes, medians; ratio = to by-hand (>1 better)"
    );
    println!(
        "{:<7} {:>6} {:<8} {:>12} {:>7} {:>14} {:>7} {:>10}",
        "engine", "line", "reader", "lines/s", "ratio", "server ns/line", "ratio", "lines/read"
    );
    for &engine in &engines {
        for &(len, lines) in cases.iter() {
            let mut rate = vec![Vec::new(); readers.len()];
            let mut ns = vec![Vec::new(); readers.len()];
            let mut per_read = vec![Vec::new(); readers.len()];
            for p in 0..passes {
                // Alternate the order, so no reader always runs on a warmer machine.
                for k in 0..readers.len() {
                    let i = (k + p) % readers.len();
                    let r = pass(engine, readers[i], len, lines);
                    rate[i].push(r.lines_per_s);
                    ns[i].push(r.server_ns_per_line);
                    per_read[i].push(r.lines_per_read);
                }
            }
            let rate: Vec<f64> = rate.into_iter().map(median).collect();
            let ns: Vec<f64> = ns.into_iter().map(median).collect();
            let per_read: Vec<f64> = per_read.into_iter().map(median).collect();
            let base = readers.len() - 1; // by-hand, when it runs
            for (i, r) in readers.iter().enumerate() {
                println!(
                    "{:<7} {:>6} {:<8} {:>12.0} {:>6.2}x {:>14.1} {:>6.2}x {:>10.1}",
                    if engine == Engine::Uring {
                        "uring"
                    } else {
                        "epoll"
                    },
                    len,
                    r.name(),
                    rate[i],
                    rate[i] / rate[base],
                    ns[i],
                    ns[base] / ns[i],
                    per_read[i],
                );
            }
        }
    }
}
