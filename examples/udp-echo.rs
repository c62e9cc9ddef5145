//! UDP echo server: every datagram goes back to its sender, unchanged, from one socket that
//! serves every peer. 64 reads are kept waiting, so a burst of datagrams is received by one
//! `recvmmsg` and the answers leave by one `sendmmsg`; each read that completes is replaced.
//!
//!     cargo run --release --example udp-echo -- --addr 127.0.0.1:7000
//!     nc -u 127.0.0.1 7000        then type lines: each comes back

use std::io::{self, Write};
use std::net::UdpSocket;
use std::thread;

use proactor::{Cmd, Engine, Error, Op, Watcher};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Reads kept waiting on the socket.
const READS: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (addr, engine) = parse_args().unwrap_or_else(|e| {
        eprintln!("udp-echo: {e}\nusage: udp-echo [--addr HOST:PORT] [--engine auto|uring|epoll]");
        std::process::exit(2)
    });
    // Installed before anything else, so SIGINT/SIGTERM always take the clean way out.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let socket = UdpSocket::bind(&addr)?;
    println!("listening on {}", socket.local_addr()?);
    io::stdout().flush()?;

    // An inline watcher: the loop thread runs the poller inside `wait_io`.
    let mut options = Watcher::builder().inline(true);
    if let Some(engine) = engine {
        options = options.engine(engine); // else PROACTOR_ENGINE, else auto
    }
    let watcher = options.build().unwrap_or_else(|e| fail(&e));
    eprintln!("udp-echo: engine {}", watcher.stats().engine_summary());
    let udp = watcher.register(socket)?;
    for _ in 0..READS {
        udp.send(Cmd::ReadInternal)?;
    }
    let watcher = std::sync::Arc::new(watcher);
    let echo = {
        let watcher = watcher.clone();
        thread::spawn(move || echo_loop(&watcher))
    };
    signals.forever().next();
    // Pending reads complete with `WatcherClosed`, the socket closes, `wait_io` fails.
    watcher.close();
    let _ = echo.join();
    Ok(())
}

fn echo_loop(watcher: &Watcher) {
    let mut batch = Vec::new();
    while watcher.wait_io(&mut batch).is_ok() {
        for c in batch.drain(..) {
            match (c.op, &c.result) {
                (_, Err(Error::WatcherClosed)) => return,
                // A datagram: back to its sender (the same bytes, no copy), and the read is
                // replaced. An empty datagram is echoed as one.
                (Op::Read, Ok(())) => {
                    let udp = c.conn.clone();
                    if let Some(from) = c.peer.clone() {
                        // A full command queue drops this answer: UDP may lose datagrams.
                        let _ = udp.send(Cmd::SendTo(from, c.into_data()));
                    }
                    let _ = udp.send(Cmd::ReadInternal);
                }
                // A read that failed (an ICMP error of an earlier answer, say): read on.
                (Op::Read, Err(_)) => {
                    let _ = c.conn.send(Cmd::ReadInternal);
                }
                // An answer that could not go (a vanished peer, a full buffer): dropped.
                _ => {}
            }
        }
    }
}

fn parse_args() -> Result<(String, Option<Engine>), String> {
    let (mut addr, mut engine) = ("127.0.0.1:7000".to_string(), None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => addr = value,
            "--engine" => engine = Some(value.parse().map_err(|e| format!("--engine: {e}"))?),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok((addr, engine))
}

/// A watcher that cannot be built (an engine asked for and unavailable, say): its reason,
/// which names the cause and the fix, and exit status 1.
fn fail(e: &std::io::Error) -> ! {
    eprintln!("udp-echo: {e}");
    std::process::exit(1)
}
