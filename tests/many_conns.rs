//! Many connections: 1,000 echoing with mixed buffer kinds, 4,096 at once, and two watchers
//! sharing one small bounded mailbox.

mod util;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use proactor::{flume, Cmd, Conn, Op, Watcher};
use util::*;

/// Registers `n` pairs; a peer thread writes each client's message, half-closes, then reads
/// each echo to EOF and checks every byte; the watcher side echoes with `mode`.
fn echo_many(watcher: &Watcher, n: usize, mode: ReadMode, lens: impl Fn(&mut Rng) -> usize) {
    let pairs = Pairs::new();
    let mut rng = Rng::new(n as u64);
    let mut clients = Vec::with_capacity(n);
    let mut echo = Echo::new(watcher, mode, 2, 0xec40);
    for _ in 0..n {
        let (client, server) = pairs.pair();
        let len = lens(&mut rng);
        let msg = rng.bytes(len);
        clients.push((client, msg));
        echo.add(watcher.register(server).unwrap());
    }
    let total: usize = clients.iter().map(|(_, m)| m.len()).sum();
    let peer = thread::spawn(move || {
        for (client, msg) in &mut clients {
            client.set_write_timeout(Some(TIMEOUT)).unwrap();
            client.write_all(msg).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
        }
        for (i, (client, msg)) in clients.iter_mut().enumerate() {
            let got = read_to_eof(client);
            assert!(
                got == *msg,
                "conn {i}: echo differs ({} vs {} bytes)",
                got.len(),
                msg.len()
            );
        }
    });
    let start = Instant::now();
    echo.run(Duration::from_secs(60));
    peer.join().unwrap();
    assert_eq!(echo.bytes_echoed, total as u64);
    wait_stats(watcher, "all conns freed", |s| {
        s.connections == 0 && s.reads_in_flight == 0 && s.writes_in_flight == 0
    });
    eprintln!(
        "{n} conns, {total} bytes, {} reads, {:?}",
        echo.reads_done,
        start.elapsed()
    );
}

#[test]
fn thousand_conns_mixed_buffers() {
    // A small events array: more ready sockets than one epoll_wait returns.
    let watcher = Watcher::builder()
        .events_capacity(16)
        .buffer_size(4096)
        .build()
        .unwrap();
    echo_many(&watcher, 1000, ReadMode::Mixed, |rng| rng.range(1, 20_000));
}

#[test]
fn concurrent_4096_conns_echo_1_kib() {
    let watcher = Watcher::new().unwrap();
    echo_many(&watcher, 4096, ReadMode::Mixed, |_| 1024);
}

/// Two watchers post into one bounded(4) mailbox: the pollers back up behind it, in order,
/// and every completion arrives exactly once.
#[test]
fn two_watchers_share_a_small_bounded_mailbox() {
    const CONNS: usize = 5;
    const WRITES: usize = 100;
    let mailbox = proactor::Mailbox::bounded(4);
    let rx = mailbox.receiver().clone();
    let watchers: Vec<Watcher> = (0..2)
        .map(|_| Watcher::builder().mailbox(&mailbox).build().unwrap())
        .collect();
    drop(mailbox); // its sender: the channel then disconnects with the last watcher
    let pairs = Pairs::new();
    let mut clients: Vec<TcpStream> = Vec::new();
    let mut conns: Vec<Conn> = Vec::new();
    for w in &watchers {
        for _ in 0..CONNS {
            let (client, server) = pairs.pair();
            clients.push(client);
            conns.push(w.register(server).unwrap());
        }
    }
    // Keyed by index in `conns` (both watchers number their conns from the same keys).
    let mut expected: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut tag = 0;
    for (i, conn) in conns.iter().enumerate() {
        for j in 0..WRITES {
            tag += 1;
            conn.send(Cmd::Write(format!("{i}:{j};")).tag(tag)).unwrap();
            expected.entry(i).or_default().push(tag);
        }
    }
    let mut got: HashMap<usize, Vec<u64>> = HashMap::new();
    let start = Instant::now();
    for _ in 0..CONNS * 2 * WRITES {
        let c = rx
            .recv_deadline(start + TIMEOUT)
            .expect("a completion in time");
        assert!(c.is_ok() && c.op == Op::Write, "{}", describe(&c));
        let i = conns
            .iter()
            .position(|k| *k == c.conn)
            .expect("one of ours");
        got.entry(i).or_default().push(c.tag);
    }
    assert_eq!(got, expected, "per-conn order and exactly-once");
    for (i, client) in clients.iter_mut().enumerate() {
        let want: String = (0..WRITES).map(|j| format!("{i}:{j};")).collect();
        let mut buf = vec![0; want.len()];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(buf, want.as_bytes());
    }
    // Closing both: the shared mailbox disconnects only when the last poller is gone.
    drop(got);
    drop(expected);
    watchers[0].close();
    assert!(matches!(
        rx.recv_timeout(Duration::from_millis(20)),
        Err(proactor::flume::RecvTimeoutError::Timeout)
    ));
    drop(conns);
    drop(watchers);
    assert!(matches!(
        rx.recv_timeout(TIMEOUT),
        Err(flume::RecvTimeoutError::Disconnected)
    ));
}
