//! Two tokio chat servers, the baselines of the chat bench. They speak the lines of the chat
//! contract (`/work/shared/CONTRACTS.md`, "chat-server") that the load uses: `* welcome
//! guest<N>` to a new client, `* guest<N> joined` to every other, `guest<N>: TEXT` to every
//! other client for each line, `* guest<N> left` when a client goes; `/quit` closes the
//! connection. Lines end with `\n`, a trailing `\r` is stripped, empty lines are ignored, a
//! line longer than 4,096 bytes drops its client (after `! line too long`). `/nick` and `/who`
//! are not implemented (the load does not use them): like any other command, they get
//! `! unknown command`.
//!
//! Both have the shape of tokio's chat example (`tokio/examples/chat.rs`): a task per client,
//! an unbounded mpsc channel per client, a shared map of the senders (`Arc<Mutex<HashMap>>`),
//! and each message cloned into every recipient's channel (the example sends a `String` per
//! recipient; here a `Vec<u8>`, so bytes that are not UTF-8 are relayed as they are). Each
//! client's task waits for either a queued message or input from its socket, as the
//! example's `select!` does (the branch polled first alternates, as `select!` picks at
//! random, so neither starves the other), and writes on the socket itself:
//!
//! - [`Writer::Naive`] ("tokio-naive"): one `write_all` plus one `flush` per message on the
//!   plain `TcpStream` (no `BufWriter`; the flush is a no-op there): one `write(2)` per
//!   message, as the example's `Framed` sink does (encode, then flush per `send`).
//! - [`Writer::Batch`] ("tokio-batch"): the same, but it takes the message and every message
//!   already queued (`try_recv` until empty) into one buffer, then one `write_all` and one
//!   `flush`: what a competent tokio user writes.
//!
//! As in the example, the accept loop (numbering the clients in the order they connected)
//! spawns the client's task, which puts its sender in the map, announces it to the others
//! and then writes its welcome itself, before it serves its channel. Not as in the example:
//! the map is a `std::sync::Mutex` (never held across an `.await`; tokio's docs prefer it
//! there). The runtime is tokio's default (`Runtime::new()`, what `#[tokio::main]`
//! builds): one worker per CPU the process may use, so one when it is pinned to one CPU.
//!
//! The accept loop runs in a task of its own ([`Accept::Task`]), on the worker with the
//! clients' tasks. The example runs it in `main` itself, which `#[tokio::main]` turns into
//! `block_on` on the main thread ([`Accept::Main`], the servers `tokio-naive-main` and
//! `tokio-batch-main`): then a second thread shares the pinned CPU, every client is handed
//! from it to the worker, and in a join storm the older clients' `joined` lines are mostly
//! written one by one before the next client joins: tokio-batch finds little to batch. Measured here (docs/benchmarks.md): 10 to 11 µs of
//! server CPU per `joined` line for both servers with the loop on the main thread, against
//! about 2 µs (batch) and 5 µs (naive) with it in a task. Nothing else changes: after the
//! joins the accept loop sleeps.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

/// Longest line accepted, counted before its `\n` (a trailing `\r` included).
const MAX_LINE: usize = 4096;
/// Bytes read from a socket at a time (what tokio-util's `Framed` reserves by default).
const READ_BUF: usize = 8 * 1024;
/// Tokio-batch keeps its write buffer between batches up to this capacity.
const KEEP_OUT: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// A `write_all` plus a `flush` per message.
    Naive,
    /// Every queued message gathered into one `write_all` plus one `flush`.
    Batch,
}

/// Where the accept loop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// In a task of its own (`tokio::spawn`), on the worker with the clients' tasks.
    Task,
    /// In `block_on` on the main thread, as `#[tokio::main]` examples have it.
    Main,
}

/// The servers by name: `tokio-naive`, `tokio-batch` (accept loop in a task), and
/// `tokio-naive-main`, `tokio-batch-main` (accept loop on the main thread).
pub fn parse(name: &str) -> Option<(Writer, Accept)> {
    let (writer, accept) = match name.strip_suffix("-main") {
        Some(base) => (base, Accept::Main),
        None => (name, Accept::Task),
    };
    match writer {
        "tokio-naive" => Some((Writer::Naive, accept)),
        "tokio-batch" => Some((Writer::Batch, accept)),
        _ => None,
    }
}

type Tx = UnboundedSender<Vec<u8>>;

/// The clients by number, each with its channel's sender.
#[derive(Default)]
struct Shared {
    peers: HashMap<u64, Tx>,
}

impl Shared {
    /// Queues a copy of `msg` for every client but `except`.
    fn broadcast(&self, except: u64, msg: &[u8]) {
        for (&id, tx) in &self.peers {
            if id != except {
                let _ = tx.send(msg.to_vec());
            }
        }
    }
}

type State = Arc<Mutex<Shared>>;

fn lock(state: &State) -> MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the server on `addr` until the process is killed; prints `listening on HOST:PORT`
/// first, as the chat-server example does.
pub fn main(writer: Writer, accept: Accept, addr: &str) -> io::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let listener = rt.block_on(TcpListener::bind(addr))?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    let serve = accept_loop(listener, writer);
    match accept {
        Accept::Main => rt.block_on(serve),
        Accept::Task => rt
            .block_on(rt.spawn(serve))
            .map_err(|e| io::Error::other(format!("the accept loop panicked: {e}")))?,
    }
}

/// Accepts clients for ever, numbering them in the order they connected.
async fn accept_loop(listener: TcpListener, writer: Writer) -> io::Result<()> {
    let state = State::default();
    let mut guests = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors and the like: back off instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        guests += 1;
        tokio::spawn(client(stream, guests, state.clone(), writer));
    }
}

/// What a client's task woke up for.
enum Event {
    /// A message for this client (`None`: its channel is closed, which does not happen while
    /// it is in the map).
    Message(Option<Vec<u8>>),
    /// Bytes read into the read buffer (0: end of stream).
    Input(io::Result<usize>),
}

async fn client(mut stream: TcpStream, id: u64, state: State, writer: Writer) {
    let name = format!("guest{id}");
    // Joins: in the map (so it is sent every later message), announced to the others, then
    // welcomed, before anything from its channel.
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut shared = lock(&state);
        shared.peers.insert(id, tx);
        shared.broadcast(id, format!("* {name} joined\n").as_bytes());
    }
    if write_flush(&mut stream, format!("* welcome {name}\n").as_bytes())
        .await
        .is_ok()
    {
        serve(&mut stream, id, &name, &mut rx, &state, writer).await;
    }
    let mut shared = lock(&state);
    shared.peers.remove(&id);
    shared.broadcast(id, format!("* {name} left\n").as_bytes());
}

/// The client's loop, until it leaves.
async fn serve(
    stream: &mut TcpStream,
    id: u64,
    name: &str,
    rx: &mut UnboundedReceiver<Vec<u8>>,
    state: &State,
    writer: Writer,
) {
    let mut buf = vec![0u8; READ_BUF];
    // An unfinished line (at most MAX_LINE bytes).
    let mut partial: Vec<u8> = Vec::new();
    // Tokio-batch's write buffer, reused.
    let mut out: Vec<u8> = Vec::new();
    let mut messages_first = false;
    loop {
        messages_first = !messages_first;
        let event = poll_fn(|cx| {
            for turn in 0..2 {
                if (turn == 0) == messages_first {
                    if let Poll::Ready(m) = rx.poll_recv(cx) {
                        return Poll::Ready(Event::Message(m));
                    }
                } else {
                    let mut rb = ReadBuf::new(&mut buf);
                    if let Poll::Ready(r) = Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                        return Poll::Ready(Event::Input(r.map(|()| rb.filled().len())));
                    }
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Message(None) => break,
            Event::Message(Some(msg)) => {
                let written = match writer {
                    Writer::Naive => write_flush(stream, &msg).await,
                    Writer::Batch => {
                        out.clear();
                        out.extend_from_slice(&msg);
                        while let Ok(m) = rx.try_recv() {
                            out.extend_from_slice(&m);
                        }
                        let r = write_flush(stream, &out).await;
                        // A burst's batch can be megabytes: not kept for the next one.
                        if out.capacity() > KEEP_OUT {
                            out = Vec::new();
                        }
                        r
                    }
                };
                if written.is_err() {
                    break;
                }
            }
            Event::Input(Ok(0) | Err(_)) => break,
            Event::Input(Ok(n)) => match input(state, id, name, &mut partial, &buf[..n]) {
                Input::More => {}
                Input::Quit => {
                    let _ = write_flush(stream, b"* bye\n").await;
                    break;
                }
                Input::TooLong => {
                    let _ = write_flush(stream, b"! line too long\n").await;
                    break;
                }
            },
        }
    }
}

async fn write_flush(stream: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    stream.write_all(data).await?;
    stream.flush().await
}

enum Input {
    More,
    Quit,
    TooLong,
}

/// Splits what a client sent into lines and handles each; keeps an unfinished line.
fn input(state: &State, id: u64, name: &str, partial: &mut Vec<u8>, mut data: &[u8]) -> Input {
    while let Some(end) = data.iter().position(|&b| b == b'\n') {
        if partial.len() + end > MAX_LINE {
            return Input::TooLong;
        }
        let line = if partial.is_empty() {
            &data[..end]
        } else {
            partial.extend_from_slice(&data[..end]);
            &partial[..]
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match line {
            b"" => {}
            b"/quit" => return Input::Quit,
            // `/nick` and `/who` included: not implemented.
            _ if line.starts_with(b"/") => {
                if let Some(tx) = lock(state).peers.get(&id) {
                    let _ = tx.send(b"! unknown command\n".to_vec());
                }
            }
            text => {
                let mut msg = Vec::with_capacity(name.len() + 3 + text.len());
                msg.extend_from_slice(name.as_bytes());
                msg.extend_from_slice(b": ");
                msg.extend_from_slice(text);
                msg.push(b'\n');
                lock(state).broadcast(id, &msg);
            }
        }
        partial.clear();
        data = &data[end + 1..];
    }
    if partial.len() + data.len() > MAX_LINE {
        return Input::TooLong;
    }
    partial.extend_from_slice(data);
    Input::More
}
