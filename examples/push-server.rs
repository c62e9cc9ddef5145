//! Push server: every second the current time goes to every client as one shared `Bytes`, from a
//! loop that waits with `wait_io_deadline` until the next push. Each write has a deadline, so a
//! client that stopped reading cannot pile up work: it misses the deadline and is freed. A
//! client that half-closes (shuts down its sending side) goes on getting pushes.
//!
//!     cargo run --release --example push-server -- --addr 127.0.0.1:7000
//!     options: --interval-ms MS (1000), --write-timeout-ms MS (the interval),
//!              --size BYTES (pad each push to this size)

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proactor::bytes::Bytes;
use proactor::{Cmd, Conn, ConnId, Engine, Error, Op, Watcher};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

struct Options {
    addr: String,
    interval: Duration,
    write_timeout: Option<Duration>,
    size: usize,
    engine: Option<Engine>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opts = parse_args().unwrap_or_else(|e| {
        eprintln!("push-server: {e}");
        eprintln!(
            "usage: push-server [--addr HOST:PORT] [--interval-ms MS] [--write-timeout-ms MS] \
             [--size BYTES] [--engine auto|uring|epoll]"
        );
        std::process::exit(2)
    });
    // Installed before anything else, so SIGINT/SIGTERM always take the clean way out.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let listener = proactor::tcp_listener(&opts.addr)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    let mut options = Watcher::builder();
    if let Some(engine) = opts.engine {
        options = options.engine(engine); // else PROACTOR_ENGINE, else auto
    }
    let watcher = Arc::new(options.build().unwrap_or_else(|e| fail(&e)));
    eprintln!("push-server: engine {}", watcher.stats().engine_summary());
    watcher.listen(listener)?.send(Cmd::Accept)?;
    let w = watcher.clone();
    let pusher = thread::spawn(move || run(&opts, &w));

    signals.forever().next();
    watcher.close(); // ends the mailbox, and so the push loop
    let _ = pusher.join();
    Ok(())
}

fn run(opts: &Options, watcher: &Watcher) {
    let write_timeout = opts.write_timeout.unwrap_or(opts.interval);
    let mut clients: HashMap<ConnId, Conn> = HashMap::new();
    let mut batch = Vec::new();
    let mut next_push = Instant::now() + opts.interval;
    loop {
        if Instant::now() >= next_push {
            // One message for everyone; each write holds a reference to the same bytes.
            let msg = time_message(opts.size);
            for conn in clients.values() {
                let _ = conn.send(Cmd::Write(msg.clone()).timeout(write_timeout));
            }
            while next_push <= Instant::now() {
                next_push += opts.interval;
            }
        }
        // Ok(0) at the deadline; an error once the watcher is closed (SIGINT/SIGTERM).
        if watcher.wait_io_deadline(&mut batch, next_push).is_err() {
            return;
        }
        for c in batch.drain(..) {
            match (c.op, c.result) {
                // A new client; keep a read pending on it, only to notice when it goes away.
                (Op::Accept, result) => {
                    match (result, c.buf.into_accepted()) {
                        (Ok(()), Some((conn, _peer))) => {
                            if conn.send(Cmd::ReadInternal).is_ok() {
                                clients.insert(conn.id(), conn);
                            }
                        }
                        (Err(Error::WatcherClosed), _) => continue,
                        (result, _) => eprintln!("accept: {result:?}"),
                    }
                    let _ = c.conn.send(Cmd::Accept);
                }
                // Whatever clients send is ignored.
                (Op::Read, Ok(())) => {
                    let _ = c.conn.send(Cmd::ReadInternal);
                }
                // The client shut down its sending side (`nc -N`, `shutdown(SHUT_WR)`): it
                // may still read, so the pushes go on; one that closed altogether fails a
                // later write (EPIPE, reset) and is freed then.
                (Op::Read, Err(Error::Eof)) => {}
                // Writes done; our own Free; completions of a client we already freed, or of
                // the watcher closing.
                (_, Ok(())) | (_, Err(Error::Freed | Error::WatcherClosed)) => {}
                // A missed write deadline (a stuck client), a reset or broken pipe (a client
                // that closed), ...: free it. Its other pending operations then complete
                // with `Freed`.
                (op, Err(e)) => {
                    if clients.remove(&c.conn.id()).is_some() {
                        if e.is_timeout() {
                            eprintln!("push-server: freeing a stuck client ({op:?}: {e})");
                        }
                        let _ = c.conn.send(Cmd::Free);
                    }
                }
            }
        }
    }
}

/// `HH:MM:SS.mmm UTC\n`, padded with dots before the newline to at least `size` bytes.
fn time_message(size: usize) -> Bytes {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, ms) = (now.as_secs() % 86_400, now.subsec_millis());
    let mut msg = format!(
        "{:02}:{:02}:{:02}.{ms:03} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    let pad = size.saturating_sub(msg.len() + 1);
    msg.extend(std::iter::repeat('.').take(pad));
    msg.push('\n');
    msg.into()
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        addr: "127.0.0.1:7000".into(),
        interval: Duration::from_secs(1),
        write_timeout: None,
        size: 0,
        engine: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--addr" => opts.addr = value,
            "--interval-ms" => opts.interval = Duration::from_millis(number()?.max(1)),
            "--write-timeout-ms" => opts.write_timeout = Some(Duration::from_millis(number()?)),
            "--size" => opts.size = number()? as usize,
            "--engine" => opts.engine = Some(value.parse().map_err(|e| format!("--engine: {e}"))?),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(opts)
}

/// A watcher that cannot be built (an engine asked for and unavailable, say): its reason,
/// which names the cause and the fix, and exit status 1.
fn fail(e: &std::io::Error) -> ! {
    eprintln!("push-server: {e}");
    std::process::exit(1)
}
