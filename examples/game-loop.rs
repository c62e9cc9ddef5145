//! Game loop: a fixed 20 Hz tick. One thread owns the game state and waits on a `flume::Selector`
//! over the mailbox and a tick channel; `move DX DY` lines apply at once, and each tick sends all
//! positions to every player as one shared `Bytes` (skipping one still writing the previous).
//! A bad line is answered with an error line, at most 64 of them in flight per player.
//!
//!
//! With `--udp` the same game runs over one UDP socket: a peer joins by sending the datagram
//! `join`, moves with `move DX DY` datagrams, and gets `welcome N` and then each tick's line
//! as one datagram; a peer silent for 10 s is dropped.
//!
//!     cargo run --release --example game-loop -- --addr 127.0.0.1:7000
//!     nc 127.0.0.1 7000     (gets "welcome 1", then "tick 40 1:0,0" 20 times a second;
//!                            send "move 3 -2")
//!     cargo run --release --example game-loop -- --udp --addr 127.0.0.1:7000
//!     nc -u 127.0.0.1 7000  (send "join", then "move 3 -2")

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use proactor::bytes::Bytes;
use proactor::flume::{self, Receiver, Selector, TrySendError};
use proactor::{
    Cmd, Completion, Conn, ConnId, Engine, Error, Framing, Op, PeerAddr, SendError, Watcher,
};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

const TICK: Duration = Duration::from_millis(50);
/// Positions are kept within -WORLD..=WORLD on both axes.
const WORLD: i32 = 1000;
/// Longest input line; a player sending a longer one is dropped.
const MAX_LINE: usize = 64;
/// Error replies a player may have in flight; bad lines beyond them get none.
const MAX_REPLIES: usize = 64;
/// A write that cannot finish in this long means a stuck player: it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// UDP mode: a peer that sends nothing for this long has left.
const SILENCE: Duration = Duration::from_secs(10);
/// UDP mode: reads kept waiting on the socket.
const UDP_READS: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (addr, engine, udp) = parse_args().unwrap_or_else(|e| {
        eprintln!(
            "game-loop: {e}\nusage: game-loop [--addr HOST:PORT] [--udp] \
             [--engine auto|uring|epoll]"
        );
        std::process::exit(2)
    });
    // Installed before anything else, so SIGINT/SIGTERM always take the clean way out.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let socket: std::os::fd::OwnedFd = if udp {
        let socket = std::net::UdpSocket::bind(&addr)?;
        println!("listening on {}", socket.local_addr()?);
        socket.into()
    } else {
        let listener = proactor::tcp_listener(&addr)?;
        println!("listening on {}", listener.local_addr()?);
        listener.into()
    };
    io::stdout().flush()?;

    let mut options = Watcher::builder();
    if let Some(engine) = engine {
        options = options.engine(engine); // else PROACTOR_ENGINE, else auto
    }
    let watcher = Arc::new(options.build().unwrap_or_else(|e| fail(&e)));
    eprintln!("game-loop: engine {}", watcher.stats().engine_summary());
    let socket = watcher.register(socket)?;
    if udp {
        for _ in 0..UDP_READS {
            socket.send(Cmd::ReadInternal)?;
        }
    } else {
        socket.send(Cmd::Accept)?;
    }
    // The clock. A bounded(1) channel: if the game thread falls behind, ticks are dropped
    // rather than queued up and then run in a burst.
    let (tick_tx, ticks) = flume::bounded(1);
    thread::spawn(move || {
        let mut next = Instant::now();
        loop {
            next += TICK;
            thread::sleep(next.saturating_duration_since(Instant::now()));
            if let Err(TrySendError::Disconnected(())) = tick_tx.try_send(()) {
                return;
            }
        }
    });
    let mailbox = watcher.mailbox();
    let game = thread::spawn(move || {
        if udp {
            UdpGame::new(socket).run(&mailbox, &ticks)
        } else {
            Game::default().run(&mailbox, &ticks)
        }
    });

    signals.forever().next();
    watcher.close(); // ends the mailbox, and so the game loop
    let _ = game.join();
    Ok(())
}

struct Player {
    conn: Conn,
    number: u64,
    x: i32,
    y: i32,
    /// Writes submitted and not yet completed.
    writing: usize,
}

#[derive(Default)]
struct Game {
    players: HashMap<ConnId, Player>,
    joined: u64,
    tick: u64,
}

enum Event {
    Tick,
    Done(Completion),
}

/// What a game does with each event; the TCP and the UDP game share the loop.
trait Play {
    fn tick(&mut self);
    fn complete(&mut self, c: Completion);

    fn run(mut self, mailbox: &Receiver<Completion>, ticks: &Receiver<()>)
    where
        Self: Sized,
    {
        loop {
            // Fair among the ready ones: a flood of input cannot starve the clock.
            let event = Selector::new()
                .recv(ticks, |r| r.map(|()| Event::Tick))
                .recv(mailbox, |r| r.map(Event::Done))
                .wait();
            match event {
                Ok(Event::Tick) => self.tick(),
                Ok(Event::Done(c)) => self.complete(c),
                // The watcher was closed (SIGINT/SIGTERM).
                Err(_) => return,
            }
        }
    }
}

impl Game {
    fn join(&mut self, conn: Conn) {
        self.joined += 1;
        let id = conn.id();
        let welcome = format!("welcome {}\n", self.joined);
        let player = Player {
            conn,
            number: self.joined,
            x: 0,
            y: 0,
            writing: 0,
        };
        self.players.insert(id, player);
        self.write(id, welcome.into());
        self.read(id);
    }

    /// One input line (the watcher splits them, and refuses one over MAX_LINE).
    fn input(&mut self, id: ConnId, line: &[u8]) {
        if let Some(p) = self.players.get_mut(&id) {
            match parse_move(line) {
                Some((dx, dy)) => {
                    p.x = p.x.saturating_add(dx).clamp(-WORLD, WORLD);
                    p.y = p.y.saturating_add(dy).clamp(-WORLD, WORLD);
                }
                None if line.iter().all(u8::is_ascii_whitespace) => {}
                // At most MAX_REPLIES error lines in flight: a flood of bad lines gets the
                // rest unanswered, so its replies cannot take the room its read needs.
                None if p.writing < MAX_REPLIES => {
                    self.write(id, Bytes::from_static(b"error: expected move DX DY\n"))
                }
                None => {}
            }
        }
    }

    fn read(&mut self, id: ConnId) {
        let Some(p) = self.players.get(&id) else {
            return;
        };
        // The whole lines that arrived, up to 64 at a time.
        let lines = Cmd::ReadFrames(Framing::lines(MAX_LINE), 64);
        if p.conn.send(lines).is_err() {
            self.remove(id);
        }
    }

    fn write(&mut self, id: ConnId, msg: Bytes) {
        let Some(p) = self.players.get_mut(&id) else {
            return;
        };
        match p.conn.send(Cmd::Write(msg).timeout(WRITE_TIMEOUT)) {
            Ok(()) => p.writing += 1,
            // The command queue is full (a burst of commands from this thread; a player's
            // own writes stay far below the per-connection limit: at most MAX_REPLIES
            // replies and one tick): this one message is dropped, the player stays.
            Err(SendError::Full(_)) => {}
            Err(_) => self.remove(id),
        }
    }

    /// The player leaves the game; completions still to come for it find nobody.
    fn remove(&mut self, id: ConnId) {
        if let Some(p) = self.players.remove(&id) {
            let _ = p.conn.send(Cmd::Free);
        }
    }
}

impl Play for Game {
    /// `tick T N:X,Y ...` for every player, ordered by number, once for all.
    fn tick(&mut self) {
        self.tick += 1;
        let mut all: Vec<&Player> = self.players.values().collect();
        all.sort_unstable_by_key(|p| p.number);
        let mut line = format!("tick {}", self.tick);
        for p in all {
            let _ = write!(line, " {}:{},{}", p.number, p.x, p.y);
        }
        line.push('\n');
        let snapshot = Bytes::from(line);
        let mut stuck = Vec::new();
        for (&id, p) in &mut self.players {
            // Still writing an older snapshot: skip this one, the next is newer anyway.
            if p.writing > 0 {
                continue;
            }
            match p
                .conn
                .send(Cmd::Write(snapshot.clone()).timeout(WRITE_TIMEOUT))
            {
                Ok(()) => p.writing += 1,
                Err(_) => stuck.push(id),
            }
        }
        for id in stuck {
            self.remove(id);
        }
    }

    fn complete(&mut self, c: Completion) {
        let id = c.conn.id();
        match (c.op, &c.result) {
            // Our own Free, or operations of a player already gone.
            (Op::Free, _) | (_, Err(Error::Freed | Error::WatcherClosed)) => {}
            // A new player; then accept the next one.
            (Op::Accept, result) => {
                match (result, c.buf.into_accepted()) {
                    (Ok(()), Some((conn, _peer))) => self.join(conn),
                    (result, _) => eprintln!("accept: {result:?}"),
                }
                let _ = c.conn.send(Cmd::Accept);
            }
            (Op::Write, Ok(())) => {
                if let Some(p) = self.players.get_mut(&id) {
                    p.writing -= 1;
                }
            }
            (Op::ReadFrames, Ok(())) => {
                for line in c.buf.frames() {
                    self.input(id, line);
                }
                self.read(id);
            }
            // End of stream, reset, a line over MAX_LINE, or a write stuck for WRITE_TIMEOUT:
            // the player goes.
            _ => self.remove(id),
        }
    }
}

/// A player of the UDP mode, known by its address.
struct Peer {
    number: u64,
    x: i32,
    y: i32,
    /// When it last sent a datagram.
    seen: Instant,
}

/// The game over one UDP socket: the same world and tick line, players keyed by address.
struct UdpGame {
    socket: Conn,
    peers: HashMap<PeerAddr, Peer>,
    joined: u64,
    tick: u64,
}

impl UdpGame {
    fn new(socket: Conn) -> UdpGame {
        UdpGame {
            socket,
            peers: HashMap::new(),
            joined: 0,
            tick: 0,
        }
    }

    /// `join` (a trailing newline accepted), or a joined peer's `move DX DY`. Anything else
    /// from a joined peer is answered with an error datagram; from a stranger, ignored.
    fn datagram(&mut self, from: PeerAddr, data: &[u8]) {
        let text = data.strip_suffix(b"\n").unwrap_or(data);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text == b"join" {
            if !self.peers.contains_key(&from) {
                self.joined += 1;
                let peer = Peer {
                    number: self.joined,
                    x: 0,
                    y: 0,
                    seen: Instant::now(),
                };
                self.peers.insert(from.clone(), peer);
            }
            let welcome = format!("welcome {}\n", self.peers[&from].number);
            let _ = self.socket.send(Cmd::SendTo(from, welcome));
            return;
        }
        let Some(p) = self.peers.get_mut(&from) else {
            return; // not joined: ignored
        };
        p.seen = Instant::now();
        match parse_move(text) {
            Some((dx, dy)) => {
                p.x = p.x.saturating_add(dx).clamp(-WORLD, WORLD);
                p.y = p.y.saturating_add(dy).clamp(-WORLD, WORLD);
            }
            None => {
                let reply = Bytes::from_static(b"error: expected move DX DY\n");
                let _ = self.socket.send(Cmd::SendTo(from, reply));
            }
        }
    }
}

impl Play for UdpGame {
    /// Drops the silent, then sends the tick line to every peer, one datagram each.
    fn tick(&mut self) {
        self.tick += 1;
        self.peers.retain(|_, p| p.seen.elapsed() < SILENCE);
        let mut all: Vec<&Peer> = self.peers.values().collect();
        all.sort_unstable_by_key(|p| p.number);
        let mut line = format!("tick {}", self.tick);
        for p in all {
            let _ = write!(line, " {}:{},{}", p.number, p.x, p.y);
        }
        line.push('\n');
        let snapshot = Bytes::from(line);
        for addr in self.peers.keys() {
            // A full command queue skips this peer's tick: the next one is newer anyway.
            let _ = self
                .socket
                .send(Cmd::SendTo(addr.clone(), snapshot.clone()));
        }
    }
    fn complete(&mut self, c: Completion) {
        match (c.op, &c.result) {
            (_, Err(Error::WatcherClosed)) => {}
            // One datagram; the read is replaced whatever it held.
            (Op::Read, result) => {
                if result.is_ok() {
                    if let Some(from) = c.peer.clone() {
                        self.datagram(from, c.data());
                    }
                }
                let _ = self.socket.send(Cmd::ReadInternal);
            }
            // A tick or a welcome that could not go (a vanished peer): its silence drops it.
            _ => {}
        }
    }
}

/// `move DX DY` (integers, any ASCII spacing, a trailing `\r` included).
fn parse_move(line: &[u8]) -> Option<(i32, i32)> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("move"), Some(dx), Some(dy), None) => Some((dx.parse().ok()?, dy.parse().ok()?)),
        _ => None,
    }
}

fn parse_args() -> Result<(String, Option<Engine>, bool), String> {
    let (mut addr, mut engine, mut udp) = ("127.0.0.1:7000".to_string(), None, false);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--udp" {
            udp = true;
            continue;
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => addr = value,
            "--engine" => engine = Some(value.parse().map_err(|e| format!("--engine: {e}"))?),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok((addr, engine, udp))
}

/// A watcher that cannot be built (an engine asked for and unavailable, say): its reason,
/// which names the cause and the fix, and exit status 1.
fn fail(e: &std::io::Error) -> ! {
    eprintln!("game-loop: {e}");
    std::process::exit(1)
}
