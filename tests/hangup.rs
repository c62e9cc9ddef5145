//! Errors and hang-ups: peer reset with a pending read or write, half-close, end of stream
//! with data before it.

mod util;

use std::io::{Read, Write};
use std::net::Shutdown;

use proactor::{Buf, Cmd, Error, Op};
use util::*;

#[test]
fn peer_reset_with_a_pending_read() {
    let (watcher, conn, client) = watcher_pair();
    let mut ledger = Ledger::new();
    let tag = ledger.must(&conn, Cmd::Read(vec![0; 64]));
    wait_stats(&watcher, "a pending read", |s| s.reads_in_flight == 1);
    set_linger_zero(&client);
    drop(client); // RST
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.tag, c.n), (tag, 0));
    match &c.result {
        Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::ECONNRESET), "{e}"),
        Err(Error::Eof) => {}
        other => panic!("expected a reset or EOF, got {other:?}"),
    }
    assert_eq!(c.buf.as_slice().len(), 64, "buffer back");
    // Later reads finish at once too (the reset was reported; now it is end of stream).
    ledger.must(&conn, Cmd::ReadInternal);
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(c.result.is_err(), "{}", describe(&c));
    ledger.must(&conn, Cmd::Free);
    ledger.record(&collect_one(&watcher, TIMEOUT));
    ledger.assert_all_done();
}

#[test]
fn peer_reset_with_a_pending_write() {
    const LEN: usize = 64 * 1024 * 1024;
    let (watcher, conn, client) = watcher_pair();
    let mut ledger = Ledger::new();
    let tag = ledger.must(&conn, Cmd::Write(vec![3u8; LEN]));
    let behind = ledger.must(&conn, Cmd::Write("behind"));
    wait_stats(&watcher, "a stuck write", |s| {
        s.writes_in_flight == 2 && s.bytes_written > 0
    });
    set_linger_zero(&client);
    drop(client);
    let cs = collect(&watcher, 2, TIMEOUT);
    ledger.record_all(&cs);
    assert_eq!(cs[0].tag, tag);
    assert_eq!(cs[1].tag, behind);
    for c in &cs {
        match &c.result {
            Err(Error::Io(e)) => assert!(
                matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE)),
                "{e}"
            ),
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }
    assert!(cs[0].n > 0 && cs[0].n < LEN, "partial count {}", cs[0].n);
    ledger.assert_all_done();
}

#[test]
fn half_close_gives_eof_and_writes_still_work() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let tag = ledger.must(&conn, Cmd::Read(vec![0; 16]));
    wait_stats(&watcher, "a pending read", |s| s.reads_in_flight == 1);
    client.shutdown(Shutdown::Write).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.tag, c.op, c.n), (tag, Op::Read, 0));
    assert!(c.is_eof(), "{}", describe(&c));
    assert_eq!(c.buf.as_slice().len(), 16);

    // The other direction is still open.
    ledger.must(&conn, Cmd::Write("still talking"));
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(c.is_ok(), "{}", describe(&c));
    let mut got = [0; 13];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still talking");

    // Every later read ends the same way, once each.
    ledger.must(&conn, Cmd::ReadInternal);
    ledger.must(&conn, Cmd::ReadFull(vec![0; 4]));
    let cs = collect(&watcher, 2, TIMEOUT);
    ledger.record_all(&cs);
    for c in &cs {
        assert!(c.is_eof(), "{}", describe(c));
        assert_eq!(c.n, 0);
    }
    assert!(
        matches!(cs[0].buf, Buf::None),
        "an internal read at EOF has no buffer"
    );
    ledger.must(&conn, Cmd::Free);
    ledger.record(&collect_one(&watcher, TIMEOUT));
    assert_eq!(read_to_eof(&mut client), b"");
    ledger.assert_all_done();
}

#[test]
fn read_full_at_eof_reports_the_partial_count() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let tag = ledger.must(&conn, Cmd::ReadFull(vec![0; 10]));
    client.write_all(b"abc").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.tag, c.op, c.n), (tag, Op::ReadFull, 3));
    assert!(c.is_eof(), "{}", describe(&c));
    assert_eq!(c.data(), b"abc");
    ledger.assert_all_done();
}

/// Data followed by FIN in one go: the data comes first, then EOF, nothing lost.
#[test]
fn data_then_close_reads_everything_then_eof() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let msg = Rng::new(8).bytes(200_000);
    client.write_all(&msg).unwrap();
    drop(client);
    let mut got = Vec::new();
    loop {
        ledger.must(&conn, Cmd::ReadInternal);
        let c = collect_one(&watcher, TIMEOUT);
        ledger.record(&c);
        if c.is_eof() {
            assert_eq!(c.n, 0);
            break;
        }
        assert!(c.is_ok(), "{}", describe(&c));
        got.extend_from_slice(c.data());
    }
    assert!(got == msg);
    ledger.assert_all_done();
}
