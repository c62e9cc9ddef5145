//! Closing (or dropping) the watcher: every pending and queued operation completes with
//! `WatcherClosed` exactly once, sockets close, and later calls are refused cleanly.

mod util;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use proactor::{Cmd, Error, Op, SendError, Watcher};
use util::*;

#[test]
fn close_completes_every_pending_op_exactly_once() {
    const BIG: usize = 64 * 1024 * 1024;
    let watcher = Watcher::new().unwrap();
    let pairs = Pairs::new();
    let mut ledger = Ledger::new();
    let mut clients = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let (client, server) = pairs.pair();
        clients.push(client);
        conns.push(watcher.register(server).unwrap());
    }
    // conn 0: reads of every kind, one with a deadline (a live timer).
    ledger.must(&conns[0], Cmd::Read(vec![0; 10]));
    ledger.must(&conns[0], Cmd::ReadInternal.timeout(TIMEOUT * 6));
    ledger.must(
        &conns[0],
        Cmd::ReadFull(vec![0; 10]).idle_timeout(TIMEOUT * 6),
    );
    // conn 1: a stuck big write and a read.
    let big = ledger.must(&conns[1], Cmd::Write(vec![2u8; BIG]));
    ledger.must(&conns[1], Cmd::Write("behind"));
    ledger.must(&conns[1], Cmd::ReadInternal);
    // conn 2: many reads; conn 3: nothing at all.
    for _ in 0..100 {
        ledger.must(&conns[2], Cmd::Read(vec![0; 1]));
    }
    wait_stats(&watcher, "everything pending", |s| {
        s.reads_in_flight == 104 && s.writes_in_flight == 2 && s.bytes_written > 0
    });
    // And a burst the poller may not even have drained when the close lands.
    for _ in 0..200 {
        ledger.must(&conns[3], Cmd::ReadInternal);
    }
    let sent = ledger.outstanding();
    watcher.close();
    assert!(watcher.is_closed());

    let cs = collect(&watcher, sent, TIMEOUT);
    ledger.record_all(&cs);
    ledger.assert_all_done();
    let mut written = 0;
    for c in &cs {
        assert!(
            matches!(c.result, Err(Error::WatcherClosed)),
            "{}",
            describe(c)
        );
        if c.tag == big {
            written = c.n;
        }
    }
    // The mailbox then reports the close instead of blocking.
    let mut more = Vec::new();
    assert!(matches!(
        watcher.wait_io(&mut more),
        Err(Error::WatcherClosed)
    ));
    assert!(more.is_empty());

    // Every socket was closed: peers see EOF (after whatever was written).
    for (i, client) in clients.iter_mut().enumerate() {
        let got = read_to_eof(client);
        if i == 1 {
            assert_eq!(got.len(), written);
        } else {
            assert!(got.is_empty());
        }
    }
}

#[test]
fn sends_and_registers_after_close_are_refused() {
    let (watcher, conn, _client) = watcher_pair();
    watcher.close();
    watcher.close(); // idempotent
    assert!(watcher.is_closed());
    let buf = Vec::with_capacity(64);
    let ptr = buf.as_ptr();
    let mut buf = buf;
    buf.resize(8, 0);
    match conn.send(Cmd::Read(buf).tag(3)) {
        Err(SendError::Closed(cmd)) => {
            let v = cmd.into_buf().into_vec().unwrap();
            assert_eq!((v.as_ptr(), v.capacity()), (ptr, 64));
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    for cmd in [Cmd::Write("x"), Cmd::ReadInternal, Cmd::Free, Cmd::Detach] {
        match conn.send(cmd) {
            Err(SendError::Closed(_)) => {}
            other => panic!("expected Closed, got {other:?}"),
        }
    }
    // A refused Free does not mark the conn freed.
    assert!(!conn.is_freed());
    let (_c2, s2) = tcp_pair();
    let refused = watcher.register(s2).unwrap_err();
    assert!(matches!(refused.error(), Error::WatcherClosed));
    let mut out = Vec::new();
    assert!(matches!(
        watcher.wait_io_timeout(&mut out, Duration::from_millis(10)),
        Err(Error::WatcherClosed)
    ));
    assert!(matches!(
        watcher.try_wait_io(&mut out),
        Err(Error::WatcherClosed)
    ));
}

/// Dropping the watcher does what `close` does; the completions still reach a mailbox clone.
#[test]
fn drop_with_ops_in_flight() {
    let (watcher, conn, mut client) = watcher_pair();
    let mailbox = watcher.mailbox();
    let mut ledger = Ledger::new();
    ledger.must(&conn, Cmd::ReadInternal);
    ledger.must(&conn, Cmd::Read(vec![0; 4]).timeout(TIMEOUT * 6));
    ledger.must(&conn, Cmd::Write(vec![5u8; 64 * 1024 * 1024]));
    wait_stats(&watcher, "pending", |s| {
        s.reads_in_flight == 2 && s.writes_in_flight == 1
    });
    drop(watcher);
    let mut n = 0;
    let start = Instant::now();
    loop {
        match mailbox.recv_timeout(TIMEOUT) {
            Ok(c) => {
                ledger.record(&c);
                assert!(
                    matches!(c.result, Err(Error::WatcherClosed)),
                    "{}",
                    describe(&c)
                );
                n += 1;
            }
            Err(proactor::flume::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("{e:?} after {n} completions"),
        }
        assert!(start.elapsed() < TIMEOUT);
    }
    assert_eq!(n, 3);
    ledger.assert_all_done();
    assert!(matches!(
        conn.send(Cmd::ReadInternal),
        Err(SendError::Closed(_))
    ));
    drop(conn);
    let got = read_to_eof(&mut client);
    assert!(got.iter().all(|&b| b == 5));
}

/// A thread blocked in `wait_io` wakes with the closing completions, then gets
/// `WatcherClosed`.
#[test]
fn close_wakes_a_blocked_waiter() {
    let (watcher, conn, _client) = watcher_pair();
    let watcher = Arc::new(watcher);
    conn.send(Cmd::ReadInternal.tag(77)).unwrap();
    wait_stats(&watcher, "pending read", |s| s.reads_in_flight == 1);
    let w = watcher.clone();
    let waiter = thread::spawn(move || {
        let mut got = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match w.wait_io_deadline(&mut got, deadline) {
                Ok(0) => panic!("waiter never woke"),
                Ok(_) => {}
                Err(Error::WatcherClosed) => return got,
                Err(e) => panic!("{e}"),
            }
        }
    });
    watcher.close();
    let got = waiter.join().unwrap();
    assert_eq!(got.len(), 1, "exactly once: {}", describe_all(&got));
    assert_eq!((got[0].tag, got[0].op), (77, Op::Read));
    assert!(matches!(got[0].result, Err(Error::WatcherClosed)));
}

/// Senders hammering the watcher while it closes: every accepted command completes exactly
/// once, every refused one is `Closed`, nothing hangs.
#[test]
fn close_racing_senders() {
    let watcher = Watcher::builder()
        .max_ops_per_conn(u32::MAX)
        .build()
        .unwrap();
    let pairs = Pairs::new();
    let accepted = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let mut clients = Vec::new();
    for t in 0..2u64 {
        let (client, server) = pairs.pair();
        clients.push(client);
        let conn = watcher.register(server).unwrap();
        let (accepted, started) = (accepted.clone(), started.clone());
        threads.push(thread::spawn(move || {
            for i in 0..200_000u64 {
                let tag = t << 32 | i;
                match conn.send(Cmd::Read(vec![0; 1]).tag(tag)) {
                    Ok(()) => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        started.store(true, Ordering::SeqCst);
                    }
                    Err(SendError::Closed(_)) => return,
                    Err(SendError::Full(_)) => thread::yield_now(),
                    Err(e) => panic!("{e:?}"),
                }
            }
            panic!("sender never saw the close");
        }));
    }
    wait_until("senders running", TIMEOUT, || {
        started.load(Ordering::SeqCst) && watcher.stats().reads_in_flight > 500
    });
    watcher.close();
    for t in threads {
        t.join().unwrap();
    }
    let accepted = accepted.load(Ordering::SeqCst);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match watcher.wait_io_deadline(&mut out, deadline) {
            Ok(0) => panic!("timed out with {} of {accepted}", seen.len()),
            Ok(_) => {}
            Err(_) => break,
        }
        for c in out.drain(..) {
            assert!(
                matches!(c.result, Err(Error::WatcherClosed)),
                "{}",
                describe(&c)
            );
            assert!(seen.insert(c.tag), "completed twice: {}", describe(&c));
        }
    }
    assert_eq!(
        seen.len(),
        accepted,
        "every accepted command completes once"
    );
}

/// Two threads close one watcher at once: both return only after the poller has exited
/// (its last completions posted, the mailbox disconnected), as `close` promises. The one
/// that lost the race for the poller's handle used to return at once.
#[test]
fn concurrent_closes_both_wait_for_the_poller() {
    let pairs = Pairs::new();
    for round in 0..20 {
        let watcher = Watcher::new().unwrap();
        let mut peers = Vec::new();
        // Pending reads make the shutdown, and so the window, longer.
        for i in 0..64 {
            let (client, server) = pairs.pair();
            let conn = watcher.register(server).unwrap();
            conn.send(Cmd::ReadInternal.tag(i)).unwrap();
            peers.push(client);
        }
        let mailbox = watcher.mailbox();
        let early = thread::scope(|s| {
            let closers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        watcher.close();
                        !mailbox.is_disconnected()
                    })
                })
                .collect();
            let early: Vec<bool> = closers.into_iter().map(|h| h.join().unwrap()).collect();
            early.contains(&true)
        });
        assert!(
            !early,
            "round {round}: a close() returned before the poller exited"
        );
        assert_eq!(mailbox.len(), 64);
    }
}
