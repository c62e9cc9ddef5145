//! `Cmd::Free`: pending operations complete once with `Freed`, the free itself completes,
//! the peer sees end of stream, and every later send is refused with the buffer back.

mod util;

use std::io::Write;
use std::net::Shutdown;

use proactor::{Buf, Cmd, Error, Op, SendError, Watcher};
use util::*;

#[test]
fn free_with_pending_reads_and_writes() {
    const LEN: usize = 64 * 1024 * 1024;
    let (watcher, conn, mut client) = watcher_pair();
    let other = conn.clone();
    let mut ledger = Ledger::new();
    let r1 = ledger.must(&conn, Cmd::Read(vec![0; 100]));
    let r2 = ledger.must(&conn, Cmd::ReadInternal);
    let r3 = ledger.must(&conn, Cmd::ReadFull(vec![0; 10]).timeout(TIMEOUT * 6));
    let w1 = ledger.must(&conn, Cmd::Write(vec![1u8; LEN]));
    let w2 = ledger.must(&conn, Cmd::Write("queued behind"));
    // Really pending: three reads waiting, the big write partly out and stuck.
    wait_stats(&watcher, "pending reads and a stuck write", |s| {
        s.reads_in_flight == 3 && s.writes_in_flight == 2 && s.bytes_written > 0
    });
    let free = ledger.must(&other, Cmd::Free);
    assert!(conn.is_freed() && other.is_freed());

    let cs = collect(&watcher, 6, TIMEOUT);
    ledger.record_all(&cs);
    ledger.assert_all_done();
    assert_eq!(
        cs.last().unwrap().tag,
        free,
        "pending ops complete before the free"
    );
    let mut written = 0;
    for c in &cs {
        if c.tag == free {
            assert_eq!(c.op, Op::Free);
            assert!(c.is_ok(), "{}", describe(c));
            continue;
        }
        assert!(matches!(c.result, Err(Error::Freed)), "{}", describe(c));
        if c.tag == w1 {
            written = c.n;
            assert!(c.n > 0 && c.n < LEN);
            assert_eq!(c.buf.as_slice().len(), LEN);
        } else {
            assert_eq!(c.n, 0, "{}", describe(c));
        }
        if c.tag == r1 {
            assert_eq!(c.buf.as_slice().len(), 100, "read buffer back");
        }
    }
    let _ = (r2, r3, w2);

    // The peer sees exactly the bytes written, then end of stream.
    let got = read_to_eof(&mut client);
    assert_eq!(
        got.len(),
        written,
        "peer saw {} bytes, write reported {written}",
        got.len()
    );
    assert!(got.iter().all(|&b| b == 1));
    wait_stats(&watcher, "conn gone", |s| {
        s.connections == 0 && s.reads_in_flight == 0 && s.writes_in_flight == 0
    });
}

#[test]
fn sends_after_free_are_refused_with_the_buffer() {
    let (watcher, conn, mut client) = watcher_pair();
    let clone = conn.clone();
    let mut ledger = Ledger::new();
    ledger.must(&conn, Cmd::Free);
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!(c.op, Op::Free);
    assert!(c.is_ok());
    assert!(matches!(c.buf, proactor::Buf::None));

    let buf = vec![9u8; 33];
    let ptr = buf.as_ptr();
    match clone.send(Cmd::Read(buf)) {
        Err(SendError::Freed(cmd)) => {
            let v = cmd.into_buf().into_vec().unwrap();
            assert_eq!((v.as_ptr(), v.len()), (ptr, 33));
        }
        other => panic!("expected Freed, got {other:?}"),
    }
    for cmd in [
        Cmd::ReadInternal,
        Cmd::ReadFull(vec![0; 4]),
        Cmd::Write("x"),
        Cmd::Free,
        Cmd::Detach,
    ] {
        let op = cmd.op();
        match conn.send(cmd) {
            Err(SendError::Freed(cmd)) => assert_eq!(cmd.op(), op),
            other => panic!("{op:?}: expected Freed, got {other:?}"),
        }
    }
    assert_eq!(read_to_eof(&mut client), b"");
    assert_quiet(&watcher, std::time::Duration::from_millis(50));
    ledger.assert_all_done();
}

/// Free after reading and writing on a live conn: the peer gets every byte, then EOF.
#[test]
fn free_after_traffic_flushes_then_closes() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    ledger.must(&conn, Cmd::ReadFull(vec![0; 5]));
    client.write_all(b"hello").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!(c.data(), b"hello");
    ledger.must(&conn, Cmd::Write(c.buf.into_bytes()));
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(c.is_ok());
    ledger.must(&conn, Cmd::Free);
    ledger.record(&collect_one(&watcher, TIMEOUT));
    assert_eq!(read_to_eof(&mut client), b"hello");
    ledger.assert_all_done();
}

/// Commands racing the free from another thread complete exactly once each, whatever the
/// interleaving; refused ones come back as `Freed`.
#[test]
fn commands_racing_a_free_complete_exactly_once() {
    let watcher = Watcher::new().unwrap();
    let pairs = Pairs::new();
    for round in 0..50 {
        let (client, server) = pairs.pair();
        client.shutdown(Shutdown::Write).unwrap(); // reads finish at once with Eof
        let conn = watcher.register(server).unwrap();
        let racer = conn.clone();
        let t = std::thread::spawn(move || {
            let mut accepted = 0u32;
            for i in 0..200 {
                let cmd = if i % 2 == 0 {
                    Cmd::ReadInternal
                } else {
                    Cmd::Write("w")
                };
                match racer.send(cmd) {
                    Ok(()) => accepted += 1,
                    Err(SendError::Freed(_)) => break,
                    Err(e) => panic!("{e:?}"),
                }
            }
            accepted
        });
        if round % 2 == 0 {
            std::thread::yield_now();
        }
        conn.send(Cmd::Free).unwrap();
        let accepted = t.join().unwrap() as usize;
        let cs = collect(&watcher, accepted + 1, TIMEOUT);
        let frees = cs.iter().filter(|c| c.op == Op::Free).count();
        assert_eq!(frees, 1);
        for c in &cs {
            match (c.op, &c.result) {
                (Op::Free, Ok(())) => {}
                (Op::Read, Ok(()) | Err(Error::Eof | Error::Freed)) => {}
                (Op::Write, Ok(()) | Err(Error::Freed | Error::Io(_))) => {}
                _ => panic!("unexpected {}", describe(c)),
            }
        }
        drop(cs);
        drop(client);
    }
    assert_quiet(&watcher, std::time::Duration::from_millis(20));
    wait_stats(&watcher, "all conns gone", |s| s.connections == 0);
}

/// A `Free` or `Detach` that finds the command queue full takes the control queue: it
/// completes first, and the operations still in the command queue complete after it, with
/// `Freed` (the order `Conn::send` documents). On an inline watcher nothing takes the queue
/// until the step, so it is certainly full.
#[test]
fn free_and_detach_through_a_full_queue_complete_before_the_queued_operations() {
    for last in [Cmd::Free, Cmd::Detach] {
        let options = Watcher::builder().inline(true).command_capacity(2);
        let (watcher, conn, _client) = watcher_pair_with(options);
        conn.send(Cmd::Read(vec![0; 4]).tag(1)).unwrap();
        conn.send(Cmd::ReadInternal.tag(2)).unwrap();
        assert!(matches!(
            conn.send(Cmd::Write(&b"x"[..]).tag(3)),
            Err(SendError::Full(_))
        ));
        let op = last.op();
        conn.send(last.tag(4)).unwrap();
        let got = collect(&watcher, 3, TIMEOUT);
        let order: Vec<_> = got.iter().map(|c| (c.op, c.tag)).collect();
        assert_eq!(order, [(op, 4), (Op::Read, 1), (Op::Read, 2)], "{op:?}");
        assert!(got[0].is_ok(), "{}", describe(&got[0]));
        assert_eq!(matches!(got[0].buf, Buf::Fd(..)), op == Op::Detach);
        for c in &got[1..] {
            assert!(matches!(c.result, Err(Error::Freed)), "{}", describe(c));
        }
    }
}
