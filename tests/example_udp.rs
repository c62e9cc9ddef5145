//! The UDP examples run as processes: `udp-echo` and `game-loop --udp`, with real sockets.

mod example_util;

use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use example_util::{Server, REPLY};

/// A client socket with a read timeout.
fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(REPLY)).unwrap();
    s
}

fn recv(s: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0; 70_000];
    let (n, _) = s
        .recv_from(&mut buf)
        .expect("a datagram within the reply timeout");
    buf.truncate(n);
    buf
}

/// Sends `msg` until its echo comes back (UDP may drop a datagram under load): at most
/// `tries` times, waiting `wait` for each.
fn ping(s: &UdpSocket, to: SocketAddr, msg: &[u8], tries: usize, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0; 2048];
    for _ in 0..tries {
        s.send_to(msg, to).unwrap();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match s.recv_from(&mut buf) {
                Ok((n, _)) if &buf[..n] == msg => return true,
                Ok(_) => continue, // a late echo of an earlier try
                Err(_) => break,
            }
        }
    }
    false
}

#[test]
fn udp_echo_returns_every_datagram_to_its_sender_unchanged() {
    let server = Server::start("udp-echo", &[]);
    let (a, b) = (client(), client());
    let largest = vec![0xA5u8; 65_507];
    for (s, payloads) in [
        (&a, vec![b"hello".to_vec(), Vec::new(), largest.clone()]),
        (&b, vec![b"from b".to_vec(), vec![0, 159, 146, 150, 255]]),
    ] {
        for p in &payloads {
            s.send_to(p, server.addr).unwrap();
            // Each comes back to this sender alone, the same bytes and length.
            assert_eq!(recv(s), *p);
        }
    }
}

#[test]
fn udp_echo_serves_others_while_one_peer_floods_or_vanishes() {
    let server = Server::start("udp-echo", &[]);
    let addr = server.addr;
    // A peer that sends and is gone before the answers come (its port unreachable).
    let gone = client();
    for i in 0..100u32 {
        gone.send_to(&i.to_be_bytes(), addr).unwrap();
    }
    drop(gone);
    // A flood of garbage from one peer that never reads, bounded in count.
    let flood = thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let junk: Vec<u8> = (0..1200u32).map(|i| (i * 7 + 3) as u8).collect();
        for _ in 0..50_000 {
            let _ = s.send_to(&junk, addr);
        }
    });
    // Meanwhile another peer is answered, every time (retrying a datagram the kernel
    // dropped for a full buffer).
    let good = client();
    for i in 0..50u32 {
        let msg = format!("ping {i}");
        assert!(
            ping(&good, addr, msg.as_bytes(), 20, Duration::from_millis(200)),
            "ping {i} never answered during the flood"
        );
    }
    flood.join().unwrap();
    assert!(ping(&good, addr, b"after", 5, REPLY));
}

fn udp_echo_exits_cleanly_on(sig: i32) {
    let mut server = Server::start("udp-echo", &[]);
    let c = client();
    assert!(ping(&c, server.addr, b"up", 5, REPLY));
    server.stop_cleanly(sig);
}

#[test]
fn udp_echo_sigint_exits_0_within_2s() {
    udp_echo_exits_cleanly_on(libc::SIGINT);
}

#[test]
fn udp_echo_sigterm_exits_0_within_2s() {
    udp_echo_exits_cleanly_on(libc::SIGTERM);
}

/// A UDP game client.
struct Player {
    s: UdpSocket,
    server: SocketAddr,
    number: u64,
}

impl Player {
    fn join(server: SocketAddr, join: &[u8]) -> Player {
        let s = client();
        s.send_to(join, server).unwrap();
        let number = loop {
            let d = String::from_utf8(recv(&s)).unwrap();
            // (A tick may come first if an earlier join of this address was answered.)
            if let Some(n) = d.strip_prefix("welcome ") {
                break n.trim_end().parse().unwrap();
            }
        };
        Player { s, server, number }
    }

    fn send(&self, d: &[u8]) {
        self.s.send_to(d, self.server).unwrap();
    }

    /// The next tick datagram: (T, [(N, X, Y)]), skipping other datagrams into `other`.
    fn tick(&self, other: &mut Vec<String>) -> (u64, Vec<(u64, i32, i32)>) {
        loop {
            let d = String::from_utf8(recv(&self.s)).unwrap();
            let Some(rest) = d.strip_prefix("tick ") else {
                other.push(d);
                continue;
            };
            assert!(d.ends_with('\n'), "a tick is one line: {d:?}");
            let mut words = rest.trim_end().split(' ');
            let t = words.next().unwrap().parse().unwrap();
            let players = words
                .map(|w| {
                    let (n, xy) = w.split_once(':').unwrap();
                    let (x, y) = xy.split_once(',').unwrap();
                    (n.parse().unwrap(), x.parse().unwrap(), y.parse().unwrap())
                })
                .collect();
            return (t, players);
        }
    }

    /// Ticks until one satisfies `want` (at most 100).
    fn tick_where(&self, what: &str, want: impl Fn(&[(u64, i32, i32)]) -> bool) -> u64 {
        let mut other = Vec::new();
        for _ in 0..100 {
            let (t, players) = self.tick(&mut other);
            if want(&players) {
                return t;
            }
        }
        panic!("no tick with {what}");
    }
}

#[test]
fn udp_game_joins_moves_and_ticks_as_datagrams() {
    let server = Server::start("game-loop", &["--udp"]);
    let a = Player::join(server.addr, b"join");
    // `nc -u` sends the newline: accepted.
    let b = Player::join(server.addr, b"join\n");
    assert_ne!(a.number, b.number);
    a.send(b"move 3 -2");
    b.send(b"move -1 5\n");
    let both =
        |p: &[(u64, i32, i32)]| p.contains(&(a.number, 3, -2)) && p.contains(&(b.number, -1, 5));
    a.tick_where("both moves", both);
    b.tick_where("both moves", both);
    // 20 ticks a second: 10 consecutive ticks take about half a second.
    let mut other = Vec::new();
    let start = Instant::now();
    let (first, _) = a.tick(&mut other);
    let mut last = first;
    for _ in 0..10 {
        let (t, _) = a.tick(&mut other);
        assert!(t > last, "ticks in order");
        last = t;
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "10 ticks in {took:?}"
    );
}

#[test]
fn udp_game_ignores_strangers_and_survives_bad_datagrams() {
    let server = Server::start("game-loop", &["--udp"]);
    let a = Player::join(server.addr, b"join");
    // A stranger's move changes nothing and gets no answer.
    let stranger = client();
    stranger.send_to(b"move 100 100", server.addr).unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0; 64];
    assert!(
        stranger.recv_from(&mut buf).is_err(),
        "a stranger was answered"
    );
    // Garbage, an empty datagram and the largest one from a joined player: answered with
    // an error or ignored, never fatal; the player stays and still moves.
    a.send(&[0xff, 0x00, 0x13]);
    a.send(b"");
    a.send(&vec![b'x'; 65_507]);
    a.send(b"move 1 1");
    a.tick_where("the move after the garbage", |p| {
        p.len() == 1 && p[0] == (a.number, 1, 1)
    });
}

#[test]
fn udp_game_drops_a_peer_silent_for_10_seconds() {
    let server = Server::start("game-loop", &["--udp"]);
    let quiet = Player::join(server.addr, b"join");
    let talker = Player::join(server.addr, b"join");
    talker.tick_where("two players", |p| p.len() == 2);
    // The talker keeps talking (a move of zero) while the other says nothing.
    let start = Instant::now();
    let mut other = Vec::new();
    loop {
        talker.send(b"move 0 0");
        let (_, players) = talker.tick(&mut other);
        if players.iter().all(|p| p.0 != quiet.number) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the silent peer was kept"
        );
    }
    let silent_for = start.elapsed();
    assert!(
        silent_for >= Duration::from_secs(9),
        "dropped after {silent_for:?} of silence"
    );
}

fn udp_game_exits_cleanly_on(sig: i32) {
    let mut server = Server::start("game-loop", &["--udp"]);
    let a = Player::join(server.addr, b"join");
    a.tick_where("one player", |p| p.len() == 1);
    server.stop_cleanly(sig);
}

#[test]
fn udp_game_sigint_exits_0_within_2s() {
    udp_game_exits_cleanly_on(libc::SIGINT);
}

#[test]
fn udp_game_sigterm_exits_0_within_2s() {
    udp_game_exits_cleanly_on(libc::SIGTERM);
}
