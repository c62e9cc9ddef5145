//! `Cmd::Shutdown` (graceful close) and `Free` getting through a full command queue.

mod util;

use std::io::{Read, Write};
use std::time::Duration;

use proactor::{Cmd, Error, Op, SendError, Watcher};
use util::*;

#[test]
fn shutdown_waits_for_queued_writes_then_sends_eof_and_reads_go_on() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    // 8 MiB cannot fit in the socket buffers: the shutdown must wait behind the writes.
    let payload = Rng::new(7).bytes(8 << 20);
    ledger.must(&conn, Cmd::Write(payload.clone()));
    ledger.must(&conn, Cmd::Write("last line\n"));
    let shut = ledger.must(&conn, Cmd::Shutdown);
    let reader = std::thread::spawn(move || {
        let got = read_to_eof(&mut client);
        // The write side of the peer is still open after our FIN: it can answer.
        client.write_all(b"reply after eof").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        got
    });
    let done = collect(&watcher, 3, TIMEOUT);
    ledger.record_all(&done);
    let ops: Vec<_> = done.iter().map(|c| (c.op, c.result.is_ok())).collect();
    assert_eq!(
        ops,
        vec![(Op::Write, true), (Op::Write, true), (Op::Shutdown, true)],
        "{}",
        describe_all(&done)
    );
    assert_eq!(done[2].tag, shut);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), payload.len() + 10);
    assert!(got[..payload.len()] == payload[..], "payload corrupted");
    assert_eq!(&got[payload.len()..], b"last line\n");
    // Reads still work on our side until the peer closes too.
    let mut reply = Vec::new();
    loop {
        ledger.must(&conn, Cmd::Read(vec![0; 64]));
        let c = collect_one(&watcher, TIMEOUT);
        ledger.record(&c);
        if c.is_eof() {
            break;
        }
        assert!(c.is_ok(), "{}", describe(&c));
        reply.extend_from_slice(c.data());
    }
    assert_eq!(reply, b"reply after eof");
    ledger.must(&conn, Cmd::Free);
    ledger.record(&collect_one(&watcher, TIMEOUT));
    ledger.assert_all_done();
}

#[test]
fn writes_after_shutdown_fail_with_epipe() {
    let (watcher, conn, mut client) = watcher_pair();
    conn.send(Cmd::Shutdown.tag(1)).unwrap();
    conn.send(Cmd::Write("too late").tag(2)).unwrap();
    let done = collect(&watcher, 2, TIMEOUT);
    assert_eq!((done[0].op, done[0].is_ok()), (Op::Shutdown, true));
    match &done[1].result {
        Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EPIPE)),
        other => panic!("expected EPIPE, got {other:?}"),
    }
    let mut buf = [0; 8];
    assert_eq!(
        client.read(&mut buf).unwrap(),
        0,
        "peer sees EOF, nothing else"
    );
}

#[test]
fn free_is_accepted_even_when_the_command_queue_is_full() {
    let options = Watcher::builder()
        .command_capacity(1)
        .max_ops_per_conn(u32::MAX);
    let (watcher, conn, _client) = watcher_pair_with(options);
    let mut ledger = Ledger::new();
    let mut fulls = 0;
    for _ in 0..100_000 {
        match ledger.send(&conn, Cmd::Read(vec![0; 1])) {
            Ok(_) => {}
            Err(SendError::Full(_)) => {
                fulls += 1;
                // Right after a refusal the queue is (most likely) still full: Free must
                // get through anyway.
                ledger.must(&conn, Cmd::Free);
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(fulls, 1, "a queue of one never filled");
    let n = ledger.outstanding();
    let done = collect(&watcher, n, TIMEOUT);
    ledger.record_all(&done);
    ledger.assert_all_done();
    assert!(done.iter().any(|c| c.op == Op::Free && c.is_ok()));
    assert!(done
        .iter()
        .filter(|c| c.op == Op::Read)
        .all(|c| matches!(c.result, Err(Error::Freed))));
}

/// A write cut short by its deadline (the peer reads nothing, the socket buffer is full)
/// leaves a `Shutdown` at the head of the write queue: it needs no buffer space, so it runs
/// at once instead of waiting for a writable edge that a peer that never reads never
/// sends. Both modes. (It used to wait forever: the documented graceful close hung.)
#[test]
fn shutdown_behind_a_write_cut_by_its_deadline_runs_at_once() {
    for inline in [false, true] {
        let (watcher, conn, mut client) = watcher_pair_with(Watcher::builder().inline(inline));
        let big = vec![7u8; 32 << 20];
        conn.send(Cmd::Write(big).timeout(Duration::from_millis(100)).tag(1))
            .unwrap();
        conn.send(Cmd::Shutdown.tag(2)).unwrap();
        // Both in the same round, in order.
        let cs = collect(&watcher, 2, TIMEOUT);
        assert_eq!(
            (cs[0].op, cs[0].tag),
            (Op::Write, 1),
            "{}",
            describe(&cs[0])
        );
        assert!(matches!(cs[0].result, Err(Error::Deadline)));
        let written = cs[0].n;
        assert_eq!((cs[1].op, cs[1].tag), (Op::Shutdown, 2), "inline {inline}");
        assert!(cs[1].is_ok(), "{}", describe(&cs[1]));
        // The peer gets exactly the bytes written, then end of stream.
        assert_eq!(read_to_eof(&mut client).len(), written, "inline {inline}");
    }
}
