//! Regressions: one named test per bug found.

mod util;

use std::io::Write;
use std::net::Shutdown;

use proactor::{Cmd, Watcher};
use util::*;

/// A peer that sends and half-closes right after `register` could have its edge (data and
/// EPOLLRDHUP together) reported before the poller processed the registration; the event was
/// dropped, the first read's short count was taken for "drained", and the next read waited
/// forever for an edge that had already come and gone.
#[test]
fn hang_up_before_the_poller_knows_the_conn_is_not_lost() {
    let watcher = Watcher::new().unwrap();
    let pairs = Pairs::new();
    let mut ledger = Ledger::new();
    for _ in 0..300 {
        let (mut client, server) = pairs.pair();
        let conn = watcher.register(server).unwrap();
        client.write_all(b"hi").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        ledger.must(&conn, Cmd::Read(vec![0; 64]));
        let c = collect_one(&watcher, TIMEOUT);
        ledger.record(&c);
        assert_eq!(c.data(), b"hi", "{}", describe(&c));
        ledger.must(&conn, Cmd::Read(vec![0; 64]));
        let c = collect_one(&watcher, TIMEOUT);
        ledger.record(&c);
        assert!(c.is_eof(), "{}", describe(&c));
    }
    ledger.assert_all_done();
}
