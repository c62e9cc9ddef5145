//! Completions routed to bounded channels (`register_with`) on a threaded watcher: a full
//! channel holds back its own completions only (a thread in `wait_io` gets the others at
//! once), and `close` never waits for room.

mod util;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use proactor::flume;
use proactor::{Cmd, Completion, Op, Watcher};
use util::*;

/// A watcher with conn A routed to a `bounded(1)` channel that holds A's first completion
/// and has A's second waiting for room, and conn B on the watcher's own mailbox.
fn full_route() -> (
    Watcher,
    proactor::Conn,
    proactor::Conn,
    flume::Receiver<Completion>,
    [std::net::TcpStream; 2],
) {
    let watcher = Watcher::new().unwrap();
    let (ac, a_srv) = tcp_pair();
    let (bc, b_srv) = tcp_pair();
    let (tx, rx) = flume::bounded(1);
    let a = watcher.register_with(a_srv, tx).unwrap();
    let b = watcher.register(b_srv).unwrap();
    a.send(Cmd::Write("1").tag(1)).unwrap();
    a.send(Cmd::Write("2").tag(2)).unwrap();
    wait_stats(&watcher, "both writes completed", |s| s.completions >= 2);
    assert_eq!(rx.len(), 1, "the route holds one, the other waits for room");
    (watcher, a, b, rx, [ac, bc])
}

#[test]
fn a_full_route_holds_back_only_its_own_completions() {
    let (watcher, _a, b, rx, _peers) = full_route();
    b.send(Cmd::Write("3").tag(3)).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!((c.tag, c.op), (3, Op::Write), "{}", describe(&c));
    // A's completions still arrive, in order, once its actor makes room.
    assert_eq!(rx.recv_timeout(TIMEOUT).unwrap().tag, 1);
    assert_eq!(rx.recv_timeout(TIMEOUT).unwrap().tag, 2);
}

/// The thread that owns a route's receiver closes the watcher while the route is full:
/// `close` returns (the poller does not wait for room), and the waiting completion is
/// still delivered once room is made.
#[test]
fn close_returns_while_a_route_is_full_and_its_completions_still_arrive() {
    let (watcher, a, _b, rx, _peers) = full_route();
    drop(a);
    let (done_tx, done_rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            watcher.close();
            done_tx.send(()).unwrap();
        });
        let closed = done_rx.recv_timeout(Duration::from_secs(5));
        // Make room whatever happened, so a failing run ends instead of hanging.
        let first = rx.recv_timeout(TIMEOUT).unwrap().tag;
        assert!(closed.is_ok(), "close() waited for room in a full route");
        assert_eq!(first, 1);
    });
    assert_eq!(rx.recv_timeout(TIMEOUT).unwrap().tag, 2);
    // And nothing after it: every sender is gone once it is delivered.
    assert!(matches!(
        rx.recv_timeout(TIMEOUT),
        Err(flume::RecvTimeoutError::Disconnected)
    ));
}

/// Issue 16, item 2: a completion waiting for room counts as in flight for its connection
/// until delivered, so what waits for a full route is bounded by `max_ops_per_conn`: a
/// producer that keeps sending is refused with `Full` instead of growing the backlog.
#[test]
fn a_full_route_counts_its_waiting_completions_in_flight() {
    let watcher = Watcher::builder().max_ops_per_conn(4).build().unwrap();
    let (_peer, srv) = tcp_pair();
    let (tx, rx) = flume::bounded(1);
    let a = watcher.register_with(srv, tx).unwrap();
    // The first completion fills the channel.
    a.send(Cmd::Write("x").tag(0)).unwrap();
    wait_until("the channel full", TIMEOUT, || rx.len() == 1);
    // Four more are accepted (the bound); their completions wait for room.
    let mut sent = 1;
    while a.send(Cmd::Write("x").tag(sent)).is_ok() {
        sent += 1;
        assert!(sent <= 5, "never refused");
    }
    wait_stats(&watcher, "the backlog", |s| s.stalled_completions == 4);
    assert_eq!(
        sent, 5,
        "one delivered into the channel, four waiting: the bound"
    );
    assert!(a.send(Cmd::Write("y")).unwrap_err().is_full());
    // Room: every completion arrives, in order, and the connection may send again.
    for tag in 0..5 {
        assert_eq!(rx.recv_timeout(TIMEOUT).unwrap().tag, tag);
    }
    wait_until("the bound freed", TIMEOUT, || {
        a.send(Cmd::Write("z").tag(9)).is_ok()
    });
    assert_eq!(rx.recv_timeout(TIMEOUT).unwrap().tag, 9);
}

/// Issue 16, item 2: while a route is full the poller sleeps until its receiver makes room
/// (it is woken by flume's waker), instead of waking every millisecond to retry.
#[test]
fn a_full_route_does_not_wake_the_poller_until_room_is_made() {
    let (watcher, _a, _b, rx, _peers) = full_route();
    wait_stats(&watcher, "one waiting", |s| s.stalled_completions == 1);
    wait_until("the poller asleep", TIMEOUT, || watcher.is_asleep());
    let before = watcher.stats().wakeups;
    std::thread::sleep(Duration::from_millis(300));
    let idle = watcher.stats().wakeups - before;
    // A 1 ms retry made about 300 here.
    assert!(idle <= 2, "{idle} wake-ups in 300 ms with nothing to do");
    // Taking one makes room: the waiting completion follows without any other event.
    assert_eq!(rx.recv_timeout(TIMEOUT).unwrap().tag, 1);
    assert_eq!(rx.recv_timeout(TIMEOUT).unwrap().tag, 2);
    wait_stats(&watcher, "none waiting", |s| s.stalled_completions == 0);
}

/// Issue 16, item 2: a rendezvous route (capacity 0) delivers every completion, in order,
/// each handed over as the receiver takes it, not one per millisecond tick.
#[test]
fn a_rendezvous_route_delivers_every_completion_in_order() {
    const N: u64 = 300;
    let watcher = Watcher::builder().max_ops_per_conn(1024).build().unwrap();
    let (mut peer, srv) = tcp_pair();
    let (tx, rx) = flume::bounded(0);
    let a = watcher.register_with(srv, tx).unwrap();
    for tag in 0..N {
        a.send(Cmd::Write("r").tag(tag)).unwrap();
    }
    let start = std::time::Instant::now();
    for tag in 0..N {
        let c = rx.recv_timeout(TIMEOUT).unwrap();
        assert_eq!((c.tag, c.op), (tag, Op::Write), "{}", describe(&c));
    }
    let took = start.elapsed();
    // One per 1 ms tick would take 300 ms at least; generous for a loaded machine.
    assert!(
        took < Duration::from_millis(250),
        "{N} completions took {took:?}"
    );
    let mut got = vec![0; N as usize];
    std::io::Read::read_exact(&mut peer, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == b'r'));
}
