//! Echo server: the WaitIO batch loop (gaio's model) on N watchers, one loop thread each. A
//! connection reads again only once its echo is written (back-pressure), so a client that sends
//! but never reads cannot grow the server's memory.
//!
//!     cargo run --release --example echo-server -- --addr 127.0.0.1:7000 --watchers 2

use std::io::{self, Write};
use std::sync::Arc;
use std::thread;

use proactor::{Cmd, Engine, Error, Op, Pool, Watcher};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (addr, n, engine) = parse_args().unwrap_or_else(|e| {
        eprintln!(
            "echo-server: {e}\nusage: echo-server [--addr HOST:PORT] [--watchers N] \
             [--engine auto|uring|epoll]"
        );
        std::process::exit(2)
    });
    // Installed before anything else, so SIGINT/SIGTERM always take the clean way out.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let listener = proactor::tcp_listener(&addr)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    // N watchers, one loop thread each. The listener lives on the first watcher; each
    // connection it accepts goes to the watcher with the fewest connections, and that
    // connection's completions to that watcher's own mailbox. The watchers are inline: each
    // loop thread runs its watcher's poller inside `wait_io`, so no thread hand-off per batch.
    let mut options = Watcher::builder().inline(true);
    if let Some(engine) = engine {
        options = options.engine(engine); // else PROACTOR_ENGINE, else auto
    }
    let pool = Arc::new(
        Pool::builder()
            .watchers(n)
            .per_watcher_mailboxes()
            .watcher_options(options)
            .build()
            .unwrap_or_else(|e| fail(&e)),
    );
    eprintln!(
        "echo-server: engine {}",
        pool.watchers()[0].stats().engine_summary()
    );
    let listener = pool.listen(listener)?;
    listener.send(Cmd::Accept)?;
    let loops: Vec<_> = (0..n)
        .map(|i| {
            let pool = pool.clone();
            thread::spawn(move || echo_loop(&pool.watchers()[i]))
        })
        .collect();

    signals.forever().next();
    // Closing completes every pending operation with `WatcherClosed`, closes the sockets and
    // ends the mailboxes, so each loop's `wait_io` returns an error.
    pool.close();
    for l in loops {
        let _ = l.join();
    }
    Ok(())
}

/// One watcher's event loop: wait for a batch of completions, answer each with the next command.
fn echo_loop(watcher: &Watcher) {
    let mut batch = Vec::new();
    while watcher.wait_io(&mut batch).is_ok() {
        for c in batch.drain(..) {
            let conn = c.conn.clone();
            let next = match (c.op, &c.result) {
                // A new connection, already registered (perhaps on another watcher): start
                // reading it, and accept the next one.
                (Op::Accept, Ok(())) => {
                    if let Some((conn, _peer)) = c.buf.into_accepted() {
                        let _ = conn.send(Cmd::ReadInternal);
                    }
                    Cmd::Accept
                }
                // Out of file descriptors and the like: the listener pauses a little by itself.
                (Op::Accept, Err(Error::Io(e))) => {
                    eprintln!("accept: {e}");
                    Cmd::Accept
                }
                // Echo exactly the bytes read: a zero-copy slice of the watcher's arena. No
                // read is pending while it is written: that is the back-pressure.
                (Op::Read, Ok(())) => Cmd::Write(c.into_data()),
                // Echo written: read again. An idle connection holds no buffer meanwhile.
                (Op::Write, Ok(())) => Cmd::ReadInternal,
                // Our own Free, or the watcher closing: nothing left to do.
                (Op::Free, _) | (_, Err(Error::Freed | Error::WatcherClosed)) => continue,
                // End of stream: every byte read was already echoed (we only read after a
                // write completes), so close. Any error (reset, broken pipe) frees only this
                // connection.
                _ => Cmd::Free,
            };
            // Refused (e.g. an overloaded command queue): give up on this connection. If even
            // Free is refused, dropping the last handle closes the socket.
            if conn.send(next).is_err() {
                let _ = conn.send(Cmd::Free);
            }
        }
    }
}

fn parse_args() -> Result<(String, usize, Option<Engine>), String> {
    let (mut addr, mut watchers, mut engine) = ("127.0.0.1:7000".to_string(), 1, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => addr = value,
            "--watchers" => {
                watchers = value
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("--watchers needs a number > 0")?
            }
            "--engine" => engine = Some(value.parse().map_err(|e| format!("--engine: {e}"))?),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok((addr, watchers, engine))
}

/// A watcher that cannot be built (an engine asked for and unavailable, say): its reason,
/// which names the cause and the fix, and exit status 1.
fn fail(e: &std::io::Error) -> ! {
    eprintln!("echo-server: {e}");
    std::process::exit(1)
}
