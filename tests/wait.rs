//! The threaded `wait_io` family: the poller wakes waiters once per round (not per
//! completion), so these tests look for what that handshake could get wrong: a lost wake-up,
//! a completion taken twice or never, a timeout that ends early.

mod util;

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use proactor::{Cmd, Error, Op, Watcher};
use util::*;

/// One write at a time, each sent only after the waiter reported the previous completion:
/// the waiter is usually asleep when the round ends, so every iteration exercises the
/// wake-up. A lost one leaves the waiter asleep and the report never comes.
#[test]
fn a_blocked_waiter_is_woken_by_every_round() {
    let (watcher, conn, mut client) = watcher_pair();
    let watcher = Arc::new(watcher);
    const N: u64 = 2000;
    let (report_tx, report_rx) = std::sync::mpsc::channel();
    let w = watcher.clone();
    let waiter = thread::spawn(move || {
        let mut batch = Vec::new();
        loop {
            match w.wait_io(&mut batch) {
                Ok(_) => {
                    for c in batch.drain(..) {
                        assert!(c.is_ok(), "{}", describe(&c));
                        report_tx.send(c.tag).unwrap();
                    }
                }
                Err(Error::WatcherClosed) => return,
                Err(e) => panic!("{e}"),
            }
        }
    });
    let reader = thread::spawn(move || {
        let mut buf = vec![0; N as usize];
        client.read_exact(&mut buf).unwrap();
        buf
    });
    for tag in 0..N {
        conn.send(Cmd::Write(vec![tag as u8]).tag(tag)).unwrap();
        let got = report_rx
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("waiter never woke for write {tag}"));
        assert_eq!(got, tag);
    }
    let bytes = reader.join().unwrap();
    assert!(bytes.iter().enumerate().all(|(i, &b)| b == i as u8));
    watcher.close();
    waiter.join().unwrap();
}

/// Several threads wait on one watcher while completions arrive in bursts: each completion
/// goes to exactly one of them, and none is left in the mailbox.
#[test]
fn several_waiters_share_the_completions_exactly_once() {
    const N: usize = 5000;
    let (watcher, conn, mut client) =
        watcher_pair_with(Watcher::builder().max_ops_per_conn(N as u32));
    let watcher = Arc::new(watcher);
    let taken = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let (w, taken) = (watcher.clone(), taken.clone());
            thread::spawn(move || {
                let (mut batch, mut tags) = (Vec::new(), Vec::new());
                while w.wait_io(&mut batch).is_ok() {
                    for c in batch.drain(..) {
                        assert_eq!((c.op, c.n), (Op::Write, 1), "{}", describe(&c));
                        tags.push(c.tag);
                        taken.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tags
            })
        })
        .collect();
    client.set_read_timeout(Some(TIMEOUT)).unwrap(); // a lost write fails, not hangs
    let reader = thread::spawn(move || {
        let mut buf = vec![0; N];
        client.read_exact(&mut buf).unwrap();
    });
    for burst in 0..N / 50 {
        for i in 0..50 {
            let tag = (burst * 50 + i) as u64;
            conn.send(Cmd::Write(&b"x"[..]).tag(tag)).unwrap();
        }
        thread::yield_now();
    }
    reader.join().unwrap();
    wait_until("every completion taken", TIMEOUT, || {
        taken.load(Ordering::Relaxed) >= N
    });
    watcher.close();
    let mut all: Vec<u64> = waiters
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..N as u64).collect::<Vec<_>>(), "each exactly once");
    assert!(watcher.mailbox().is_empty());
}

/// With nothing to deliver, a timed wait sleeps its whole timeout and returns `Ok(0)`.
#[test]
fn a_timed_wait_with_nothing_to_deliver_lasts_its_timeout() {
    let (watcher, conn, _client) = watcher_pair();
    conn.send(Cmd::ReadInternal).unwrap();
    // Rounds that post nothing: the read waits, a command that only parks it goes through.
    wait_stats(&watcher, "pending read", |s| s.reads_in_flight == 1);
    let mut out = Vec::new();
    for timeout in [Duration::from_millis(20), Duration::from_millis(60)] {
        let start = Instant::now();
        assert_eq!(watcher.wait_io_timeout(&mut out, timeout).unwrap(), 0);
        let took = start.elapsed();
        assert!(took >= timeout, "returned after {took:?} of {timeout:?}");
    }
    assert!(out.is_empty());
}

/// Rounds that post only to another channel (a connection's own route) end while a timed
/// wait on the watcher's mailbox sleeps, and wake it: it must go back to sleep and still
/// last its whole timeout, returning `Ok(0)`.
#[test]
fn rounds_posting_elsewhere_do_not_end_a_timed_wait() {
    let (watcher, _conn, _client) = watcher_pair();
    let (tx, rx) = proactor::flume::unbounded();
    let (_routed_peer, routed_server) = tcp_pair();
    let routed = watcher.register_with(routed_server, tx).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    thread::scope(|s| {
        s.spawn(|| {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < TIMEOUT {
                routed.send(Cmd::Write(&b"x"[..])).unwrap();
                let c = rx.recv_timeout(TIMEOUT).expect("the routed write");
                assert!(c.is_ok(), "{}", describe(&c));
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        });
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        let mut out = Vec::new();
        let before = rounds.load(Ordering::Relaxed);
        let n = watcher.wait_io_timeout(&mut out, timeout).unwrap();
        let during = rounds.load(Ordering::Relaxed) - before;
        let took = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        assert_eq!(n, 0, "{}", describe_all(&out));
        assert!(took >= timeout, "returned after {took:?} of {timeout:?}");
        assert!(during > 0, "no round posted during the wait");
    });
}
