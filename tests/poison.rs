//! Issue 16, item 4: a panic on the thread driving a watcher (here a user `Drop` the poller
//! runs: the owner of a write buffer whose completion it must drop, its route's receiver
//! being gone) closes the watcher, threaded or inline. Pending operations still complete
//! with `WatcherClosed`; an inline watcher never steps the half-updated driver again.

mod util;

use std::panic::{catch_unwind, AssertUnwindSafe};

use proactor::bytes::Bytes;
use proactor::flume;
use proactor::{Cmd, Error, Op, SendError, Watcher};
use util::*;

/// A buffer whose owner panics when the last reference is dropped.
struct Bomb(&'static [u8]);

impl AsRef<[u8]> for Bomb {
    fn as_ref(&self) -> &[u8] {
        self.0
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        panic!("bomb dropped");
    }
}

/// Conn `a` is routed to a channel nobody receives from any more; writing a `Bomb` to it
/// makes the poller drop the completion, and the bomb with it. Conn `b`, on the watcher's
/// mailbox, has a read pending.
fn armed(watcher: &Watcher) -> (proactor::Conn, proactor::Conn, [std::net::TcpStream; 2]) {
    let (pa, a_srv) = tcp_pair();
    let (pb, b_srv) = tcp_pair();
    let (tx, rx) = flume::unbounded();
    drop(rx);
    let a = watcher.register_with(a_srv, tx).unwrap();
    let b = watcher.register(b_srv).unwrap();
    b.send(Cmd::ReadInternal.tag(2)).unwrap();
    a.send(Cmd::Write(Bytes::from_owner(Bomb(b"boom"))).tag(1))
        .unwrap();
    (a, b, [pa, pb])
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[test]
fn a_poller_panic_closes_a_threaded_watcher_and_completes_what_was_pending() {
    let watcher = Watcher::new().unwrap();
    let (_a, b, _peers) = armed(&watcher);
    wait_until("the poller's end", TIMEOUT, || watcher.is_closed());
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!((c.tag, c.op), (2, Op::Read));
    assert!(
        matches!(c.result, Err(Error::WatcherClosed)),
        "{}",
        describe(&c)
    );
    assert!(matches!(
        watcher.wait_io(&mut Vec::new()),
        Err(Error::WatcherClosed)
    ));
    assert!(matches!(
        b.send(Cmd::ReadInternal),
        Err(SendError::Closed(_))
    ));
    // `close` re-raises the poller's panic.
    let p = catch_unwind(AssertUnwindSafe(|| watcher.close())).unwrap_err();
    assert_eq!(panic_message(&*p), "bomb dropped");
    // Re-raised once: a second close, and the drop, find the poller joined.
    watcher.close();
    drop(watcher);
}

#[test]
fn a_panic_while_driving_closes_an_inline_watcher_and_it_is_never_stepped_again() {
    let watcher = Watcher::builder().inline(true).build().unwrap();
    let (_a, b, _peers) = armed(&watcher);
    // The step that drops the bomb panics out of wait_io, on this thread.
    let p = catch_unwind(AssertUnwindSafe(|| {
        let mut got = Vec::new();
        loop {
            watcher.wait_io_timeout(&mut got, TIMEOUT).unwrap();
        }
    }))
    .unwrap_err();
    assert_eq!(panic_message(&*p), "bomb dropped");
    assert!(watcher.is_closed());
    // Later waits do not step the driver again: they hand over what the shutdown completed,
    // then say closed.
    let mut got = Vec::new();
    assert_eq!(watcher.wait_io_timeout(&mut got, TIMEOUT).unwrap(), 1);
    assert_eq!(got[0].tag, 2);
    assert!(matches!(got[0].result, Err(Error::WatcherClosed)));
    assert!(matches!(
        watcher.wait_io(&mut got),
        Err(Error::WatcherClosed)
    ));
    assert!(matches!(
        watcher.try_wait_io(&mut got),
        Err(Error::WatcherClosed)
    ));
    assert!(matches!(b.send(Cmd::Free), Err(SendError::Closed(_))));
    // Already delivered to the driving thread: `close` and drop do not re-raise it.
    watcher.close();
}
