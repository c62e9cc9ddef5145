//! Issue 16, item 1: `close` while a bounded route's receiver is held by an actor that never
//! reads. One stuck receiver delays nobody else: a thread in `wait_io` on the watcher's own
//! mailbox gets its completion and then `WatcherClosed` at once, another full route whose
//! actor does read gets all its completions, and once the stuck receiver is dropped every
//! descriptor the watcher held is closed. Its own binary with one test, so that the
//! descriptor count is this test's alone.

mod util;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use proactor::flume;
use proactor::{Cmd, Error, Op, Watcher};
use util::*;

#[test]
fn a_stuck_route_receiver_delays_nobody_at_close() {
    let base = fd_count();
    let watcher = Watcher::new().unwrap();
    let (stuck_tx, stuck_rx) = flume::bounded(1);
    let (busy_tx, busy_rx) = flume::bounded(1);
    let (_pa, a_srv) = tcp_pair();
    let (_pb, b_srv) = tcp_pair();
    let (_pc, c_srv) = tcp_pair();
    let stuck = watcher.register_with(a_srv, stuck_tx).unwrap();
    let own = watcher.register(b_srv).unwrap();
    let busy = watcher.register_with(c_srv, busy_tx).unwrap();
    // Both routes full, with completions waiting for room.
    for tag in 0..3 {
        stuck.send(Cmd::Write("a").tag(tag)).unwrap();
        busy.send(Cmd::Write("c").tag(tag)).unwrap();
    }
    wait_stats(&watcher, "both routes stalled", |s| {
        s.stalled_completions == 4
    });
    // Pending at close: their completions say `WatcherClosed`.
    own.send(Cmd::ReadInternal.tag(7)).unwrap();
    busy.send(Cmd::ReadInternal.tag(8)).unwrap();
    wait_stats(&watcher, "reads pending", |s| s.reads_in_flight == 2);

    let (waited_tx, waited_rx) = mpsc::channel();
    thread::scope(|s| {
        // A thread in wait_io on the watcher's own mailbox.
        s.spawn(|| {
            let mut got = Vec::new();
            let mut outcome = Ok(0);
            while outcome.is_ok() {
                outcome = watcher.wait_io(&mut got);
            }
            waited_tx.send((Instant::now(), got, outcome)).unwrap();
        });
        // The healthy actor reads its route to the end.
        let reader = s.spawn(|| busy_rx.iter().map(|c| (c.tag, c.op)).collect::<Vec<_>>());
        wait_until("the waiter blocks", TIMEOUT, || watcher.is_asleep());
        let closed_at = Instant::now();
        watcher.close();
        // A watchdog instead of a hang: the waiter must be back within a second.
        let (back_at, got, outcome) = waited_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("wait_io on the watcher's mailbox never returned after close");
        assert!(matches!(outcome, Err(Error::WatcherClosed)), "{outcome:?}");
        assert!(
            back_at - closed_at < Duration::from_secs(1),
            "wait_io returned {:?} after close",
            back_at - closed_at
        );
        assert_eq!(got.len(), 1, "{}", describe_all(&got));
        assert!(got[0].tag == 7 && matches!(got[0].result, Err(Error::WatcherClosed)));
        drop(got);
        // The other route: everything, in order, then disconnected.
        let seen = reader.join().unwrap();
        assert_eq!(
            seen,
            [
                (0, Op::Write),
                (1, Op::Write),
                (2, Op::Write),
                (8, Op::Read)
            ]
        );
    });
    // The stuck actor still holds its receiver: its completions wait for it.
    drop((stuck, own, busy));
    drop(watcher);
    assert_eq!(stuck_rx.recv_timeout(TIMEOUT).unwrap().tag, 0);
    drop(stuck_rx);
    // Its receiver gone, the rest is dropped and every descriptor closed: the epoll fd, the
    // eventfd and the three sockets (the peers are ours).
    wait_until("the watcher's descriptors closed", TIMEOUT, || {
        fd_count() == base + 3
    });
}
