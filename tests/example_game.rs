//! The game-loop example, run as a process: a 20 Hz tick sends every player's position to every
//! player; `move DX DY` lines move the sender.

mod example_util;

use std::io::{self, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use example_util::{connect_tiny_window, reset, Client, Server};

/// A parsed `tick T N:X,Y ...` line.
#[derive(Debug)]
struct Tick {
    n: u64,
    players: Vec<(u64, i32, i32)>,
}

fn parse_tick(line: &str) -> Option<Tick> {
    let mut words = line.strip_prefix("tick ")?.split(' ');
    let n = words.next()?.parse().ok()?;
    let players = words
        .map(|w| {
            let (num, xy) = w.split_once(':').expect("N:X,Y");
            let (x, y) = xy.split_once(',').expect("X,Y");
            (num.parse().unwrap(), x.parse().unwrap(), y.parse().unwrap())
        })
        .collect();
    Some(Tick { n, players })
}

fn welcome(c: &mut Client) -> u64 {
    let line = c.line();
    line.strip_prefix("welcome ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected `welcome N`, got {line:?}"))
}

/// A new client, which must be welcomed as player `n`.
fn player(server: &Server, n: u64) -> Client {
    let mut c = Client::connect(server.addr);
    assert_eq!(welcome(&mut c), n);
    c
}

/// Reads ticks until one satisfies `want` (at most 100 ticks, 5 s).
fn tick_where(c: &mut Client, what: &str, want: impl Fn(&Tick) -> bool) -> Tick {
    let start = Instant::now();
    for _ in 0..100 {
        let line = c.line();
        let tick = parse_tick(&line).unwrap_or_else(|| panic!("not a tick: {line:?}"));
        if want(&tick) {
            return tick;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no tick with {what}"
        );
    }
    panic!("no tick with {what} in 100 ticks");
}

fn position(t: &Tick, player: u64) -> Option<(i32, i32)> {
    t.players.iter().find(|p| p.0 == player).map(|p| (p.1, p.2))
}

/// A player is welcomed as player 1 and then gets a tick with its position 20 times a second:
/// 20 ticks take no less than 0.8 s (the upper bound is generous: it only catches a clock
/// that stalls), numbered upward with few skipped.
#[test]
fn welcome_then_ticks_at_20_hz() {
    let server = Server::start("game-loop", &[]);
    let mut c = player(&server, 1);
    let first = tick_where(&mut c, "player 1", |t| position(t, 1).is_some());
    let start = Instant::now();
    let mut last = first.n;
    for _ in 0..20 {
        let t = parse_tick(&c.line()).expect("a tick");
        assert!(t.n > last, "tick numbers increase");
        assert_eq!(t.players, vec![(1, 0, 0)]);
        last = t.n;
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took <= Duration::from_secs(5),
        "20 ticks took {took:?}, want about 1 s (not faster than 20 Hz)"
    );
    assert!(last - first.n <= 25, "ticks skipped: {} .. {last}", first.n);
}

#[test]
fn moves_are_applied_and_everyone_sees_every_player() {
    let server = Server::start("game-loop", &[]);
    let mut a = player(&server, 1);
    let mut b = player(&server, 2);
    a.send("move 3 -2\n");
    let t = tick_where(&mut a, "1 at 3,-2", |t| position(t, 1) == Some((3, -2)));
    assert_eq!(position(&t, 2), Some((0, 0)));
    tick_where(&mut b, "1 at 3,-2 and 2 at 0,0", |t| {
        t.players == vec![(1, 3, -2), (2, 0, 0)]
    });
    // \r\n, extra spaces, several moves in one packet, a move in two pieces.
    b.send("move -5 7\r\n  move   1 1 \nmo");
    b.send("ve 0 2\n");
    tick_where(&mut a, "2 at -4,10", |t| position(t, 2) == Some((-4, 10)));
    // The world ends at 1000.
    a.send("move 5000 -5000\n");
    tick_where(&mut b, "1 at the corner", |t| {
        position(t, 1) == Some((1000, -1000))
    });
}

#[test]
fn bad_input_gets_an_error_line() {
    let server = Server::start("game-loop", &[]);
    let mut a = Client::connect(server.addr);
    welcome(&mut a);
    for bad in [
        "jump",
        "move 1",
        "move x y",
        "move 1 2 3",
        "move 99999999999 0",
    ] {
        a.send(format!("{bad}\n"));
        let start = Instant::now();
        loop {
            let line = a.line();
            if line.starts_with("error") {
                break;
            }
            assert!(parse_tick(&line).is_some(), "unexpected {line:?}");
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no error for {bad:?}"
            );
        }
    }
    // Empty lines are ignored, and the player is still in the game.
    a.send("\n \r\nmove 1 1\n");
    tick_where(&mut a, "1 at 1,1", |t| position(t, 1) == Some((1, 1)));
}

/// A flood of bad lines from a player who reads the replies only later. Answering each one
/// would back the replies up until the player had more operations in flight than a
/// connection may have (1,024), and its next read would be refused: the player would be
/// dropped. The server caps the replies in flight (at 64), so some bad lines get none and the
/// player stays: checked here as some but not all lines answered, and the player still in.
#[test]
fn a_flood_of_bad_lines_does_not_drop_a_player_who_reads_later() {
    let server = Server::start("game-loop", &[]);
    let mut a = player(&server, 1);
    let mut b = player(&server, 2);
    a.send("x\n".repeat(FLOOD));
    a.send("move 2 3\n");
    // The server handles lines in order: once b sees the move, every error reply to a was
    // sent or refused, and 8 MB of them is more than the socket buffers hold (the kernel
    // grows a send buffer to 4 MiB at most, tcp_wmem).
    let start = Instant::now();
    loop {
        let line = b.line();
        let tick = parse_tick(&line).unwrap_or_else(|| panic!("not a tick: {line:?}"));
        if position(&tick, 1) == Some((2, 3)) {
            break;
        }
        assert!(position(&tick, 1).is_some(), "player 1 was dropped");
        assert!(start.elapsed() < Duration::from_secs(60), "no move seen");
    }
    let (mut errors, start) = (0, Instant::now());
    for _ in 0..FLOOD + 100 {
        let line = a.line();
        if line.starts_with("error") {
            errors += 1;
            continue;
        }
        let tick = parse_tick(&line).unwrap_or_else(|| panic!("unexpected {line:?}"));
        if position(&tick, 1) == Some((2, 3)) {
            assert!((1..FLOOD).contains(&errors), "{errors} error lines");
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no move seen");
    }
    panic!("the move never showed ({errors} error lines)");
}

/// Lines in the flood above.
const FLOOD: usize = 300_000;

#[test]
fn players_that_leave_disappear_and_an_over_long_line_drops_its_sender() {
    let server = Server::start("game-loop", &[]);
    let mut a = Client::connect(server.addr);
    welcome(&mut a);
    let mut b = Client::connect(server.addr);
    welcome(&mut b);
    let c = Client::connect(server.addr);
    let mut c = c;
    welcome(&mut c);
    tick_where(&mut a, "3 players", |t| t.players.len() == 3);
    drop(b);
    tick_where(&mut a, "2 gone", |t| {
        position(t, 2).is_none() && position(t, 3).is_some()
    });
    reset(c.reader.into_inner());
    tick_where(&mut a, "only 1", |t| t.players.len() == 1);
    let mut d = player(&server, 4);
    tick_where(&mut a, "1 and 4", |t| {
        t.players.iter().map(|p| p.0).collect::<Vec<_>>() == [1, 4]
    });
    d.send("x".repeat(65));
    d.expect_closed(1 << 20);
    tick_where(&mut a, "only 1 again", |t| t.players.len() == 1);
}

/// Five players that never read flood bad lines through tiny windows: the error replies fill
/// their sockets until a write to each is stuck. Meanwhile the reading player gets its ticks,
/// at the full rate and none skipped for long (the game thread never waits on a stuck player,
/// nor do the reader's writes wait behind theirs), and each stuck player is dropped when its
/// stuck write times out (2 s): not before, and not never.
#[test]
fn a_player_that_does_not_read_does_not_slow_the_others() {
    let server = Server::start("game-loop", &[]);
    let lazy: Vec<TcpStream> = (0..5).map(|_| connect_tiny_window(server.addr)).collect();
    let mut a = player(&server, 6);
    let first = tick_where(&mut a, "6 players", |t| t.players.len() == 6);
    // Each lazy player floods until the server closes on it and its send fails. (How much
    // it takes to get stuck depends on how the kernel sizes the server's send buffer.)
    let start = Instant::now();
    let flooders: Vec<_> = lazy
        .into_iter()
        .map(|mut s| {
            thread::spawn(move || {
                let flood = format!("{}\n", "x".repeat(59)).repeat(64);
                loop {
                    if let Err(e) = s.write_all(flood.as_bytes()) {
                        return (e, s); // the socket stays open until the test is done
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(30),
                        "still flooding after 30 s"
                    );
                }
            })
        })
        .collect();
    // The reader, until the tick lists only itself: every tick within REPLY.
    let (mut last, mut max_step, mut seen) = (first.n, 0, Vec::new());
    // When each stuck player (1 to 5) was first missing from a tick.
    let mut dropped: [Option<Instant>; 5] = [None; 5];
    loop {
        let line = a.line();
        seen.push(Instant::now());
        let t = parse_tick(&line).unwrap_or_else(|| panic!("not a tick: {line:?}"));
        for (id, at) in (1..).zip(dropped.iter_mut()) {
            if at.is_none() && position(&t, id).is_none() {
                *at = seen.last().copied();
            }
        }
        max_step = max_step.max(t.n - last);
        last = t.n;
        if t.players.iter().map(|p| p.0).eq([6]) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the stuck players are still in after 30 s: {line}"
        );
    }
    // A lower bound for each: the writes that got stuck were all sent after the flood began.
    let gone = Instant::now();
    for (id, at) in (1..).zip(dropped) {
        let after = at.expect("gone from the last tick") - start;
        assert!(
            after >= Duration::from_secs(2),
            "player {id} dropped after {after:?}: before a stuck write could time out"
        );
    }
    // In the last 2 s at least one player was stuck all along, and some 40 ticks came (late
    // reads only crowd more of them in); a game thread that waited on a stuck write until it
    // timed out would have sent next to none.
    let recent = seen
        .iter()
        .filter(|&&t| gone - t < Duration::from_secs(2))
        .count();
    assert!(
        recent >= 20,
        "{recent} ticks in the last 2 s with a player stuck"
    );
    // The reader is skipped a tick only while its own previous one is still being written;
    // its writes queued behind a stuck one would skip it some 40 ticks in a row.
    assert!(max_step <= 10, "{} ticks in a row skipped", max_step - 1);
    for f in flooders {
        let (e, _s) = f.join().unwrap();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "a flood ended with {e}, not with the server closing"
        );
    }
}

fn exits_cleanly_on(sig: i32) {
    let mut server = Server::start("game-loop", &[]);
    let mut a = Client::connect(server.addr);
    let _idle = Client::connect(server.addr);
    welcome(&mut a);
    tick_where(&mut a, "2 players", |t| t.players.len() == 2);
    server.stop_cleanly(sig);
    a.expect_closed(1 << 20);
}

signal_exit_tests!(exits_cleanly_on);
