//! No fd leaks: dropping the last handle closes the socket, a pending operation keeps it open
//! until its completion is dropped, and after everything is gone the process has exactly the
//! fds it started with. Its own binary with one test: other tests would open fds in parallel.

mod util;

use std::io::{ErrorKind, Read};
use std::time::Duration;

use proactor::{Cmd, Error, Watcher};
use util::*;

fn wait_fds(want: usize, what: &str) {
    wait_until(&format!("{what} (want {want} fds)"), TIMEOUT, || {
        fd_count() == want
    });
}

#[test]
fn sockets_close_when_the_last_handle_goes_and_no_fd_leaks() {
    let start = fd_count();
    let pairs = Pairs::new();
    let watcher = Watcher::new().unwrap();
    let base = fd_count();
    let mut ledger = Ledger::new();

    // 1. No operation: dropping the only handle closes the socket.
    let (mut client, server) = pairs.pair();
    let conn = watcher.register(server).unwrap();
    assert_eq!(fd_count(), base + 2);
    drop(conn);
    assert_eq!(read_to_eof(&mut client), b"", "peer sees EOF");
    wait_fds(base + 1, "server socket closed on drop");
    drop(client);
    assert_eq!(fd_count(), base);

    // 2. A pending operation holds a handle: the socket stays open until its completion is
    //    dropped.
    let (mut client, server) = pairs.pair();
    let conn = watcher.register(server).unwrap();
    ledger.must(
        &conn,
        Cmd::Read(vec![0; 8]).timeout(Duration::from_millis(300)),
    );
    wait_stats(&watcher, "pending read", |s| s.reads_in_flight == 1);
    drop(conn);
    client
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut b = [0; 1];
    let e = client
        .read(&mut b)
        .expect_err("no EOF while the read is pending");
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );
    assert_eq!(fd_count(), base + 2);
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(matches!(c.result, Err(Error::Deadline)));
    assert_eq!(fd_count(), base + 2, "the completion still holds the conn");
    drop(c);
    assert_eq!(read_to_eof(&mut client), b"", "peer sees EOF");
    wait_fds(base + 1, "closed when the completion was dropped");
    drop(client);

    // 3. A mix of endings on one watcher: free, drop, detach (fd dropped), and conns left
    //    open for close() to take care of, one handle outliving the watcher.
    let mut clients = Vec::new();
    let mut keep = Vec::new();
    for i in 0..40 {
        let (client, server) = pairs.pair();
        clients.push(client);
        let conn = watcher.register(server).unwrap();
        match i % 4 {
            0 => drop(ledger.must(&conn, Cmd::Free)),
            1 => drop(conn),
            2 => drop(ledger.must(&conn, Cmd::Detach)),
            _ => {
                ledger.must(&conn, Cmd::ReadInternal);
                keep.push(conn);
            }
        }
    }
    // Free and Detach complete; the Detach fds are dropped with their completions.
    let cs = collect(&watcher, 20, TIMEOUT);
    ledger.record_all(&cs);
    assert!(cs.iter().all(|c| c.is_ok()), "{}", describe_all(&cs));
    drop(cs);
    wait_stats(&watcher, "only kept conns left", |s| s.connections == 10);
    watcher.close();
    let cs = collect(&watcher, 10, TIMEOUT);
    ledger.record_all(&cs);
    ledger.assert_all_done();
    assert!(cs
        .iter()
        .all(|c| matches!(c.result, Err(Error::WatcherClosed))));
    drop(cs);
    for client in &mut clients {
        assert_eq!(read_to_eof(client), b"");
    }
    drop(clients);
    let survivor = keep.pop().unwrap();
    drop(keep);
    drop(watcher);
    drop(survivor);
    drop(pairs);
    assert_eq!(fd_count(), start, "every fd the test opened is closed");
}
