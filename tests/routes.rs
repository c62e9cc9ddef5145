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
