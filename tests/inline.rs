//! Inline watchers: the poller runs on the thread inside `wait_io`; same semantics.

mod util;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use proactor::{Cmd, Error, Op, Watcher};
use util::*;

fn inline() -> Watcher {
    Watcher::builder().inline(true).build().unwrap()
}

#[test]
fn echo_on_many_connections_byte_exact() {
    let watcher = inline();
    let pairs = Pairs::new();
    let mut clients = Vec::new();
    for _ in 0..100 {
        let (client, server) = pairs.pair();
        watcher
            .register(server)
            .unwrap()
            .send(Cmd::ReadInternal)
            .unwrap();
        clients.push(client);
    }
    let writer = std::thread::spawn(move || {
        for round in 0..10u8 {
            for (i, c) in clients.iter_mut().enumerate() {
                let msg = [round, i as u8, 0xAB];
                c.write_all(&msg).unwrap();
                let mut back = [0; 3];
                c.read_exact(&mut back).unwrap();
                assert_eq!(back, msg);
            }
        }
    });
    let (mut batch, mut echoed) = (Vec::new(), 0);
    let deadline = Instant::now() + TIMEOUT;
    while echoed < 100 * 10 * 3 {
        assert!(
            watcher.wait_io_deadline(&mut batch, deadline).unwrap() > 0,
            "timed out"
        );
        for c in batch.drain(..) {
            assert!(c.is_ok(), "{}", describe(&c));
            match c.op {
                Op::Read => c.conn.send(Cmd::Write(c.buf.into_bytes())).unwrap(),
                Op::Write => {
                    echoed += c.n;
                    c.conn.send(Cmd::ReadInternal).unwrap();
                }
                op => panic!("{op:?}"),
            }
        }
    }
    writer.join().unwrap();
    let s = watcher.stats();
    assert_eq!(s.bytes_read, 3000);
    assert_eq!(s.bytes_written, 3000);
}

#[test]
fn deadlines_fire_while_the_caller_waits() {
    let watcher = inline();
    let (_client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    let start = Instant::now();
    conn.send(Cmd::ReadInternal.timeout(Duration::from_millis(150)).tag(9))
        .unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    let elapsed = start.elapsed();
    assert_eq!(c.tag, 9);
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    assert!(elapsed >= Duration::from_millis(150), "early: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "late: {elapsed:?}");
}

#[test]
fn a_command_from_another_thread_wakes_the_driving_thread() {
    let watcher = inline();
    let (mut client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    std::thread::scope(|s| {
        // The main thread blocks in wait_io (inside epoll_wait) with nothing pending; the
        // command from the other thread must wake it, not wait for a timeout.
        let sender = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(50)); // let the main thread block first
            conn.send(Cmd::Write("woken").tag(1)).unwrap();
        });
        let start = Instant::now();
        let c = collect_one(&watcher, TIMEOUT);
        assert_eq!((c.op, c.tag), (Op::Write, 1));
        assert!(start.elapsed() < Duration::from_secs(3));
        sender.join().unwrap();
    });
    let mut buf = [0; 5];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"woken");
}

#[test]
fn try_wait_io_drives_one_round() {
    let watcher = inline();
    let (mut client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    conn.send(Cmd::Read(vec![0; 16]).tag(3)).unwrap();
    client.write_all(b"poll").unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    // A game loop: poll between frames, never block.
    while watcher.try_wait_io(&mut got) == 0 {
        assert!(
            Instant::now() < deadline,
            "try_wait_io never produced the read"
        );
        std::thread::yield_now();
    }
    assert_eq!((got[0].tag, got[0].data()), (3, &b"poll"[..]));
}

#[test]
fn completions_reach_the_driving_call_in_order_and_are_appended() {
    let watcher = inline();
    let (mut client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    let write = |tag: u8| Cmd::Write(vec![tag; 100]).tag(u64::from(tag));
    conn.send(write(0)).unwrap();
    let mut got = collect(&watcher, 1, TIMEOUT);
    // Whatever the caller's vector holds stays in front.
    for tag in 1..5 {
        conn.send(write(tag)).unwrap();
    }
    let deadline = Instant::now() + TIMEOUT;
    while got.len() < 5 {
        let before = got.len();
        let n = watcher.wait_io_deadline(&mut got, deadline).unwrap();
        assert!(n > 0, "timed out: {}", describe_all(&got));
        assert_eq!(got.len(), before + n, "the count is what was appended");
    }
    let tags: Vec<u64> = got.iter().map(|c| c.tag).collect();
    assert_eq!(tags, [0, 1, 2, 3, 4], "{}", describe_all(&got));
    assert!(got.iter().all(|c| c.is_ok() && c.n == 100));
    // They came straight to the driving call: nothing is left behind in the mailbox.
    assert!(watcher.mailbox().is_empty());
    let mut buf = vec![0; 500];
    client.read_exact(&mut buf).unwrap();
    assert!(buf
        .chunks(100)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == i as u8)));
}

#[test]
fn close_completes_pending_work_and_later_waits_fail() {
    let watcher = inline();
    let (_client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    for tag in 0..5 {
        conn.send(Cmd::ReadInternal.tag(tag)).unwrap();
    }
    watcher.close();
    let mut got = Vec::new();
    assert_eq!(watcher.try_wait_io(&mut got), 5);
    assert!(got
        .iter()
        .all(|c| matches!(c.result, Err(Error::WatcherClosed))));
    assert!(matches!(
        watcher.wait_io(&mut got),
        Err(Error::WatcherClosed)
    ));
    assert!(conn.send(Cmd::ReadInternal).is_err());
}

#[test]
fn close_from_another_thread_wakes_a_blocked_wait() {
    let watcher = inline();
    let (_client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    conn.send(Cmd::ReadInternal.tag(4)).unwrap();
    std::thread::scope(|s| {
        let closer = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(50)); // let the main thread block first
            watcher.close();
        });
        let c = collect_one(&watcher, TIMEOUT);
        assert_eq!(c.tag, 4);
        assert!(matches!(c.result, Err(Error::WatcherClosed)));
        closer.join().unwrap();
    });
}

#[test]
fn inline_refuses_a_cpu_or_a_bounded_mailbox() {
    let (tx, rx) = proactor::flume::bounded(4);
    let e = Watcher::builder()
        .inline(true)
        .mailbox(tx, rx)
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let e = Watcher::builder()
        .inline(true)
        .poller_cpu(0)
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
}
