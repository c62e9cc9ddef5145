//! Inline watchers: the poller runs on the thread inside `wait_io`; same semantics.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use proactor::{Cmd, Error, Op, Watcher};
use util::*;

fn inline() -> Watcher {
    Watcher::builder().inline(true).build().unwrap()
}

/// Calls `f` (a non-blocking poll) until it reports something, for at most `TIMEOUT`.
fn poll(what: &str, mut f: impl FnMut() -> usize) {
    let deadline = Instant::now() + TIMEOUT;
    while f() == 0 {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::yield_now();
    }
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
            // The writer may close as soon as it has read the last echo, before the last
            // write's completion is taken (with io_uring the kernel completes the send and
            // the peer's close can be reaped in the same batch): end of stream on a read sent
            // after an echo is fine. A read that really lost its bytes fails the writer.
            if c.is_eof() && c.op == Op::Read {
                continue;
            }
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
            // The path under test: the main thread is inside epoll_wait when this arrives.
            wait_until("the driving thread blocks", TIMEOUT, || watcher.is_asleep());
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
    // A game loop: poll between frames, never block.
    poll("try_wait_io never produced the read", || {
        watcher.try_wait_io(&mut got).unwrap()
    });
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
    assert_eq!(watcher.try_wait_io(&mut got).unwrap(), 5);
    assert!(got
        .iter()
        .all(|c| matches!(c.result, Err(Error::WatcherClosed))));
    assert!(matches!(
        watcher.wait_io(&mut got),
        Err(Error::WatcherClosed)
    ));
    assert!(matches!(
        conn.send(Cmd::ReadInternal),
        Err(proactor::SendError::Closed(_))
    ));
}

#[test]
fn close_from_another_thread_wakes_a_blocked_wait() {
    let watcher = inline();
    let (_client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    conn.send(Cmd::ReadInternal.tag(4)).unwrap();
    std::thread::scope(|s| {
        let closer = s.spawn(|| {
            wait_until("the driving thread blocks", TIMEOUT, || watcher.is_asleep());
            watcher.close();
        });
        let c = collect_one(&watcher, TIMEOUT);
        assert_eq!(c.tag, 4);
        assert!(matches!(c.result, Err(Error::WatcherClosed)));
        closer.join().unwrap();
    });
}

/// However a `close` on one thread and a `wait_io` (or `try_wait_io`) on another interleave,
/// the waiting side gets the pending read's `WatcherClosed` completion before any
/// `Err(WatcherClosed)`: `wait_io` in even rounds (it has no timeout, so a watchdog turns a
/// lost wake-up into a failure), `try_wait_io` in odd ones (polled until it comes). The shutdown posts it to the mailbox, which the waiting side looks at
/// once it sees the watcher closed, also when the driver vanished while it waited for the
/// lock. The closer starts after a spin of varying length to vary the interleaving.
#[test]
fn close_racing_a_wait_hands_over_the_pending_completion() {
    for round in 0..300u64 {
        let watcher = inline();
        let (_client, server) = tcp_pair();
        let conn = watcher.register(server).unwrap();
        conn.send(Cmd::ReadInternal.tag(round)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let spin = Instant::now();
                while spin.elapsed() < Duration::from_micros(round % 60) {
                    std::hint::spin_loop();
                }
                watcher.close();
            });
            let mut got = Vec::new();
            let deadline = Instant::now() + TIMEOUT;
            let _dog = watchdog(format!("close race round {round}: wait_io"), TIMEOUT);
            while got.is_empty() {
                // (Reached again only by the odd rounds' `try_wait_io`, which returns at once.)
                assert!(Instant::now() < deadline, "round {round}: no completion");
                let r = if round % 2 == 1 {
                    watcher.try_wait_io(&mut got)
                } else {
                    watcher.wait_io(&mut got)
                };
                if let Err(e) = r {
                    panic!("round {round}: {e:?} before the pending read's completion");
                }
            }
            assert_eq!(got.len(), 1, "round {round}");
            assert_eq!(got[0].tag, round);
            assert!(matches!(got[0].result, Err(Error::WatcherClosed)));
        });
        let mut more = Vec::new();
        assert!(matches!(
            watcher.wait_io(&mut more),
            Err(Error::WatcherClosed)
        ));
        assert!(more.is_empty());
    }
}

#[test]
fn inline_refuses_a_cpu_a_mailbox_or_a_bounded_route() {
    let refused = |r: std::io::Result<Watcher>| {
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    };
    // A shared mailbox, bounded or not: other watchers' completions would wait in it while
    // the driving thread sleeps in this watcher's epoll_wait.
    let bounded = proactor::Mailbox::bounded(4);
    refused(Watcher::builder().inline(true).mailbox(&bounded).build());
    let unbounded = proactor::Mailbox::unbounded();
    refused(Watcher::builder().inline(true).mailbox(&unbounded).build());
    refused(Watcher::builder().inline(true).poller_cpu(0).build());
    // A pool of inline watchers needs a mailbox each.
    let pool = proactor::Pool::builder()
        .watchers(2)
        .watcher_options(Watcher::builder().inline(true));
    assert_eq!(
        pool.build().unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );
    // A bounded route: only the driving thread could make room, and `close` would wait for
    // it. An unbounded one is fine.
    let watcher = inline();
    let (tx, _rx) = proactor::flume::bounded(4);
    let (_client, server) = tcp_pair();
    match watcher.register_with(server, tx).map_err(Error::from) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput),
        other => panic!("{other:?}"),
    }
    assert_eq!(watcher.stats().connections, 0);
    let (tx, _rx) = proactor::flume::unbounded();
    let (_client, server) = tcp_pair();
    watcher.register_with(server, tx).unwrap();
}

/// Blocks until `n` bytes wait in `s`'s receive queue.
fn until_buffered(s: &TcpStream, n: usize) {
    let mut buf = vec![0; n];
    poll("the data never arrived", || {
        usize::from(s.peek(&mut buf).unwrap() >= n)
    });
}

/// A frame loop polling with a zero timeout (or a deadline already past) still drives the
/// watcher: each call runs one step, as `try_wait_io` does.
#[test]
fn a_zero_timeout_wait_still_runs_a_step() {
    let watcher = inline();
    let (mut client, server) = tcp_pair();
    client.write_all(b"ping").unwrap();
    until_buffered(&server, 4);
    let conn = watcher.register(server).unwrap();
    conn.send(Cmd::Read(vec![0; 16]).tag(3)).unwrap();
    let mut got = Vec::new();
    poll("no step ran in any zero-timeout wait", || {
        watcher.wait_io_timeout(&mut got, Duration::ZERO).unwrap()
    });
    assert_eq!((got[0].tag, got[0].data()), (3, &b"ping"[..]));
    conn.send(Cmd::Read(vec![0; 16]).tag(4)).unwrap();
    client.write_all(b"past").unwrap();
    let past = Instant::now() - Duration::from_millis(1);
    got.clear();
    poll("no step ran with a deadline already past", || {
        watcher.wait_io_deadline(&mut got, past).unwrap()
    });
    assert_eq!((got[0].tag, got[0].data()), (4, &b"past"[..]));
}

/// While one thread drives (blocked in `epoll_wait` with nothing to do), another thread's
/// timed wait returns at its deadline; it used to block on the driver's lock until the
/// first thread woke.
#[test]
fn a_timed_wait_is_not_held_past_its_deadline_by_another_driving_thread() {
    let watcher = inline();
    let (_client, server) = tcp_pair();
    let _conn = watcher.register(server).unwrap();
    std::thread::scope(|s| {
        let driver = s.spawn(|| watcher.wait_io(&mut Vec::new()));
        // The scenario: the other thread is inside epoll_wait, holding the driver.
        wait_until("the driving thread blocks", TIMEOUT, || watcher.is_asleep());
        let (tx, rx) = std::sync::mpsc::channel();
        let w = &watcher;
        let timed = s.spawn(move || {
            let start = Instant::now();
            let r = w.wait_io_timeout(&mut Vec::new(), Duration::from_millis(100));
            tx.send((start.elapsed(), r)).unwrap();
        });
        let got = rx.recv_timeout(Duration::from_secs(2));
        let driving = !driver.is_finished();
        watcher.close(); // frees both threads whatever happened
        timed.join().unwrap();
        assert!(matches!(driver.join().unwrap(), Err(Error::WatcherClosed)));
        let (took, r) = got.expect("the timed wait was held past its deadline");
        assert!(matches!(r, Ok(0)), "{r:?}");
        assert!(took >= Duration::from_millis(100), "early: {took:?}");
        assert!(driving, "the driving thread returned with nothing to do");
    });
}

/// The caller is away (busy with a batch) while data arrives before a read's deadline and
/// the deadline then passes: on return, the data completes the read, as on a poller thread
/// that saw it arrive. The step used to fire the timer before collecting the readiness.
#[test]
fn data_that_arrived_before_the_deadline_wins_after_the_caller_was_away() {
    let watcher = inline();
    let (mut client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    conn.send(
        Cmd::Read(vec![0; 16])
            .timeout(Duration::from_millis(200))
            .tag(1),
    )
    .unwrap();
    // One round: the read finds nothing and waits for readiness.
    assert_eq!(watcher.try_wait_io(&mut Vec::new()).unwrap(), 0);
    client.write_all(b"early").unwrap();
    // The scenario: the caller does other work past the deadline.
    std::thread::sleep(Duration::from_millis(400));
    let c = collect_one(&watcher, TIMEOUT);
    assert!(c.is_ok(), "{}", describe(&c));
    assert_eq!((c.tag, c.data()), (1, &b"early"[..]));
}

/// Bytes that move in a step after the caller was away are stamped with the time they
/// moved: an idle timeout does not fire in the very step whose reads made progress. (The
/// step used to run with the time of the last wait, long past.)
#[test]
fn an_idle_timeout_sees_the_progress_of_a_step_after_the_caller_was_away() {
    let watcher = inline();
    let (mut client, server) = tcp_pair();
    client.write_all(&[1; 100]).unwrap();
    until_buffered(&server, 100);
    let conn = watcher.register(server).unwrap();
    // More one-byte reads than a round's read budget, then one with an idle timeout.
    for tag in 1..=40 {
        conn.send(Cmd::Read(vec![0; 1]).tag(tag)).unwrap();
    }
    conn.send(
        Cmd::Read(vec![0; 1])
            .idle_timeout(Duration::from_millis(100))
            .tag(999),
    )
    .unwrap();
    let mut all = Vec::new();
    watcher.wait_io_timeout(&mut all, TIMEOUT).unwrap();
    assert!(
        all.len() < 40,
        "the budget should leave reads for later steps"
    );
    // The scenario: the caller handles the batch for longer than the idle timeout.
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Instant::now() + TIMEOUT;
    while !all.iter().any(|c| c.tag == 999) {
        assert!(Instant::now() < deadline, "tag 999 never completed");
        watcher.wait_io_timeout(&mut all, TIMEOUT).unwrap();
    }
    let last = all.iter().find(|c| c.tag == 999).unwrap();
    assert!(last.is_ok(), "{}", describe(last));
    let tags: Vec<u64> = all.iter().map(|c| c.tag).collect();
    assert_eq!(tags, (1..=40).chain([999]).collect::<Vec<u64>>());
}
