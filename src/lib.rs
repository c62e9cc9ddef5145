//! A proactor-pattern I/O library: submit reads and writes as messages, receive their
//! completions in a mailbox.
//!
//! A [`Watcher`] owns one poller thread, which drives an [`Engine`]: io_uring on Linux where
//! the kernel allows it (the kernel does the I/O and posts completions), else epoll (Linux)
//! or kqueue (macOS, FreeBSD), chosen at run time with the same semantics on each. Each
//! registered socket becomes a [`Conn`], a cheap cloneable handle: no thread, no task per
//! connection. You send it typed commands ([`Cmd::Read`], [`Cmd::ReadInternal`],
//! [`Cmd::ReadFull`], [`Cmd::Write`], [`Cmd::Shutdown`], [`Cmd::Free`], [`Cmd::Detach`],
//! [`Cmd::Accept`] on a listener), each with an optional
//! deadline, idle timeout and tag; the poller does the non-blocking system calls and posts one
//! [`Completion`] per command, with the buffer handed back, into the watcher's mailbox, a
//! [`flume::Receiver`].
//!
//! ```text
//!  user threads ──Cmd──▶ command queue ──(eventfd only if asleep)──▶ poller thread
//!       ▲                                                  epoll_wait / kevent
//!       │                                                  read / sendmsg until EAGAIN
//!       └───────────────── Completion ◀── mailbox (flume) ◀─┘  deadlines
//! ```
//!
//! The mailbox composes: batch waits ([`Watcher::wait_io`], gaio's `WaitIO`), non-blocking
//! polls in a game loop (`try_recv`), `flume::Selector` over it and your own channels, or
//! `recv_async` in async code. The crate itself depends on no async runtime.
//!
//! Beyond one watcher: [`Watcher::listen`] (with a [`tcp_listener`], whose backlog holds a
//! burst of connects) and [`Cmd::Accept`] accept connections and
//! [`Watcher::connect`] makes them, so a server or a 10,000-connection client needs no other
//! thread; a [`Pool`] spreads connections over several watchers (one per core) with one
//! shared mailbox or one each; [`Watcher::register_with`] gives a connection a mailbox of its
//! own. A dedicated server loop can build its watcher
//! [`inline`](WatcherBuilder::inline): no poller thread, `wait_io` runs the poller itself.
//!
//! # Example: echo
//!
//! ```
//! use proactor::{Cmd, Op, Watcher};
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let mut client = TcpStream::connect(listener.local_addr()?)?;
//! let (socket, _) = listener.accept()?;
//!
//! let watcher = Watcher::new()?;
//! let conn = watcher.register(socket)?; // the watcher now owns the socket
//! conn.send(Cmd::ReadInternal)?;        // read into the watcher's shared arena
//! client.write_all(b"hello")?;
//!
//! let (mut batch, mut echoed) = (Vec::new(), 0);
//! while echoed < 5 {
//!     watcher.wait_io(&mut batch)?;
//!     for c in batch.drain(..) {
//!         if let Err(e) = &c.result {
//!             return Err(e.to_string().into()); // Eof, Deadline, Io(..), ...
//!         }
//!         let conn = c.conn.clone();
//!         match c.op {
//!             // Echo exactly the bytes read (a `Bytes` slice, no copy), then read again.
//!             Op::Read => {
//!                 conn.send(Cmd::Write(c.into_data()))?;
//!                 conn.send(Cmd::ReadInternal)?;
//!             }
//!             Op::Write => echoed += c.n,
//!             _ => {}
//!         }
//!     }
//! }
//! let mut back = [0; 5];
//! client.read_exact(&mut back)?;
//! assert_eq!(&back, b"hello");
//! # Ok(()) }
//! ```
//!
//! # Semantics
//!
//! - Every command [`Conn::send`] accepts produces exactly one [`Completion`]: done, end of
//!   stream, deadline, idle timeout, freed, watcher closed, or an I/O error. A refused command
//!   comes back inside the [`SendError`], buffer included.
//! - A read completes once at least one byte arrived; a read-full when its buffer is full; a
//!   write when every byte is written. A deadline or error completes it early, with the bytes
//!   done in [`Completion::n`].
//! - Per connection, reads complete in the order submitted, and so do writes; the two
//!   directions are independent. Two exceptions: an operation ended by its deadline or idle
//!   timeout completes at once, ahead of earlier ones still pending in its direction; and a
//!   `Free` or `Detach` that found the command queue full completes before the operations
//!   still queued, which then complete with [`Error::Freed`] (see [`Conn::send`]).
//! - A deadline completes only its own operation; the connection stays usable.
//! - A [`ConnId`] is generational: a freed connection's key never aliases a new one, even when
//!   the OS reuses the fd number.
//! - Writes never raise `SIGPIPE` (`MSG_NOSIGNAL`; `SO_NOSIGPIPE` on Apple targets).
//! - Internal-buffer reads hand out [`bytes::Bytes`] slices of a shared arena, valid for as
//!   long as you hold them; the arena allocates a new chunk only when one is used up and a
//!   slice of it is still held.
//!
//! # Why not mio/tokio directly?
//!
//! mio gives readiness: you still write the read-until-`WouldBlock` loops, the write queues,
//! the timers and the per-connection state machines. tokio gives a task per connection, with
//! a stack-like future and a buffer each. Here a connection is a table entry on the poller
//! thread plus a handle; an idle one waiting on [`Cmd::ReadInternal`] holds no buffer at all,
//! and your code sees finished work, in batches, on the threads and at the moments it chooses.
//!
//! # TLS
//!
//! With the `tls` cargo feature the poller runs TLS itself (rustls, with the `ring` crypto
//! provider, re-exported as `proactor::rustls`): send `Cmd::TlsAccept(config)` or
//! `Cmd::TlsConnect(config, server_name)` to a stream connection (at any point of its
//! stream: STARTTLS), and every later read and write carries plaintext. See the `tls`
//! module (in the docs built with the feature on, as docs.rs builds them).
//!
//! # Performance characteristics
//!
//! The poller takes every queued command per wake-up, tries each operation at once, gathers
//! up to 64 queued writes of a connection into one `sendmsg`, and posts a round's completions
//! together. It is woken (eventfd / `EVFILT_USER`) only when it sleeps. Steady state allocates
//! nothing per operation with caller buffers. Each connection gets at most 16 syscalls per
//! direction per round, so one flooding peer cannot starve the others.
//!
//! A threaded watcher pays a hand-off between the poller and your thread per round (a futex
//! wake each way; `wait_io` sleeps until the poller's round is over, not per completion); an
//! [inline](WatcherBuilder::inline) watcher does not, and makes 3 syscalls per echoed message
//! on one connection and 2.02 at 100 (read, write, an amortised `epoll_wait`). Against a
//! hand-written single-threaded mio server on the same 2-core machine the inline mode matches
//! one-connection ping-pong and the 8,192-connection burst, is level within the noise on the
//! 1,000-connection round (medians of five passes 0.98x and 1.02x in two sessions, single
//! passes 0.93x-1.20x), and runs at 0.97x of it with 100 busy connections (0.92x of the same
//! loop without its final `EAGAIN` read). Server CPU per message: 0.98x-1.09x of mio's. The
//! threaded default runs at 0.91x-0.93x (100 and 1,000 connections). An idle connection
//! waiting in a read costs about 122 bytes. The figures, the commands and the profile are in
//! `docs/benchmarks.md`.
//!
//! # Platform notes
//!
//! | OS | engine | wake-up | no SIGPIPE |
//! |----|-----------|---------|------------|
//! | Linux 5.19+ (the `uring` feature) | io_uring: receives into provided buffers, multishot accept | eventfd read on the ring | `MSG_NOSIGNAL` |
//! | Linux, Android | epoll, edge-triggered, `EPOLLRDHUP` | eventfd | `MSG_NOSIGNAL` |
//! | macOS, iOS | kqueue, `EV_CLEAR` | `EVFILT_USER` | `SO_NOSIGPIPE` |
//! | FreeBSD | kqueue, `EV_CLEAR` | `EVFILT_USER` | `MSG_NOSIGNAL` |
//!
//! [`Engine::Auto`] (the default) picks io_uring where it works and falls back to epoll where
//! it is missing or forbidden (a seccomp filter such as Docker's default profile, the
//! `kernel.io_uring_disabled` sysctl, an old kernel, a low `RLIMIT_MEMLOCK`), saying why in
//! [`Stats::uring_unavailable`]; `PROACTOR_ENGINE=auto|uring|epoll` sets it for every
//! watcher built without an explicit choice. A thread that drove an
//! [`inline`](WatcherBuilder::inline) io_uring watcher may see `EINTR` from its own blocking
//! system calls with a timeout while its completions are pending (the kernel signals the
//! thread that submitted an operation to complete it); `read_exact` and `write_all` retry it.
//!
//! The kqueue backend is type-checked for FreeBSD and macOS in CI but has not been run on
//! either: the project has no such machine. See `docs/architecture.md`.
#![deny(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(rustdoc::broken_intra_doc_links)]
#![deny(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod addr;
mod cmd;
mod completion;
mod conn;
mod delivery;
mod driver;
mod engine;
mod error;
mod fifo;
mod framing;
mod net;
mod pool;
mod shared;
mod stats;
#[allow(unsafe_code)]
mod sys;
#[cfg(feature = "tls")]
pub mod tls;
mod watcher;

pub use addr::PeerAddr;
pub use bytes;
pub use cmd::Cmd;
pub use completion::{Buf, Completion, Mailbox, Op};
pub use conn::{Conn, ConnId};
pub use engine::{Engine, EngineKind, Unavailable};
pub use error::{Error, RegisterError, SendError};
pub use flume;
pub use framing::{Decoded, Decoder, Frames, FramesIntoIter, FramesIter, Framing};
pub use net::{reuseport_listener, tcp_listener, Connect};
pub use pool::{Pool, PoolBuilder};
#[cfg(feature = "tls")]
pub use rustls;
pub use stats::Stats;
pub use watcher::{Watcher, WatcherBuilder};
