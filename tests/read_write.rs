//! Reads and writes: echo (tiny, mixed buffers, Unix sockets, 100 MiB), ordering, tags,
//! partial writes, internal-buffer slices.

mod util;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use proactor::bytes::Bytes;
use proactor::{Buf, Cmd, Completion, Conn, Op, Watcher};
use util::*;

#[test]
fn thread_safety_of_public_types() {
    fn send<T: Send>() {}
    fn clone<T: Clone>() {}
    assert_send_sync::<Watcher>();
    assert_send_sync::<Conn>();
    clone::<Conn>();
    send::<Completion>();
    send::<Cmd>();
    assert_send_sync::<proactor::Error>();
}

fn tiny_echo(mode: ReadMode) {
    let (watcher, conn, mut client) = watcher_pair();
    let msg = b"hello, proactor! this is a tiny echo".to_vec();
    let mut echo = Echo::new(&watcher, mode, 1, 7);
    echo.add(conn);
    client.write_all(&msg).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    echo.run(TIMEOUT);
    assert_eq!(read_to_eof(&mut client), msg);
    assert_eq!(echo.bytes_echoed, msg.len() as u64);
}

#[test]
fn tiny_echo_internal_buffer() {
    tiny_echo(ReadMode::Internal);
}

#[test]
fn tiny_echo_caller_buffer() {
    tiny_echo(ReadMode::Caller);
}

#[test]
fn tiny_echo_read_full() {
    tiny_echo(ReadMode::Full);
}

#[test]
fn tiny_echo_over_unix_stream() {
    let watcher = Watcher::new().unwrap();
    let (mut client, server) = UnixStream::pair().unwrap();
    let conn = watcher.register(server).unwrap();
    let mut echo = Echo::new(&watcher, ReadMode::Mixed, 2, 11);
    echo.add(conn);
    let msg: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    client.write_all(&msg).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    echo.run(TIMEOUT);
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    assert_eq!(back, msg);
}

const CHUNK: usize = 64 * 1024;

/// 100 MiB through the watcher and back, every byte checked: a peer thread writes a seeded
/// pseudo-random stream while another reads and regenerates it to compare.
#[test]
fn echo_100_mib_byte_exact() {
    const TOTAL: usize = 100 * 1024 * 1024;
    const SEED: u64 = 0x5EED_0100;
    let (watcher, conn, client) = watcher_pair();
    let mut writer = client.try_clone().unwrap();
    let mut reader = client;
    reader.set_read_timeout(Some(TIMEOUT)).unwrap();
    writer.set_write_timeout(Some(TIMEOUT)).unwrap();

    let w = thread::spawn(move || {
        let mut rng = Rng::new(SEED);
        let mut buf = vec![0; CHUNK];
        for _ in 0..TOTAL / CHUNK {
            rng.fill(&mut buf);
            writer.write_all(&buf).expect("peer write");
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let r = thread::spawn(move || {
        let mut rng = Rng::new(SEED);
        let (mut want, mut got) = (vec![0; CHUNK], vec![0; CHUNK]);
        for i in 0..TOTAL / CHUNK {
            rng.fill(&mut want);
            reader.read_exact(&mut got).expect("peer read");
            if got != want {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                panic!("byte {} differs", i * CHUNK + at);
            }
        }
        let mut extra = [0u8; 1];
        assert_eq!(
            reader.read(&mut extra).unwrap(),
            0,
            "bytes after the stream"
        );
    });

    let start = Instant::now();
    let mut echo = Echo::new(&watcher, ReadMode::Mixed, 4, 3);
    echo.add(conn);
    echo.run(Duration::from_secs(60));
    w.join().unwrap();
    r.join().unwrap();
    assert_eq!(echo.bytes_echoed, TOTAL as u64);
    let stats = watcher.stats();
    assert!(stats.bytes_read >= TOTAL as u64, "{stats:?}");
    assert!(stats.bytes_written >= TOTAL as u64, "{stats:?}");
    eprintln!(
        "100 MiB echo in {:?} ({} reads)",
        start.elapsed(),
        echo.reads_done
    );
}

#[test]
fn tags_round_trip_on_every_op() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let tags = [u64::MAX, 0, 1, 0xdead_beef_cafe_f00d];
    ledger
        .send_tagged(&conn, Cmd::Write("abc"), tags[0])
        .unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.op, c.tag), (Op::Write, tags[0]));
    let mut got = [0; 3];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"abc");

    // Written before the reads, so the read takes all three bytes at once.
    client.write_all(b"xyz").unwrap();
    ledger
        .send_tagged(&conn, Cmd::Read(vec![0; 8]), tags[1])
        .unwrap();
    ledger
        .send_tagged(&conn, Cmd::ReadFull(vec![0; 2]), tags[2])
        .unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.op, c.tag, c.data()), (Op::Read, tags[1], &b"xyz"[..]));
    client.write_all(b"pq").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.op, c.tag, c.data()), (Op::ReadFull, tags[2], &b"pq"[..]));

    // The last tag given wins; Free carries it back too.
    ledger
        .send_tagged(&conn, Cmd::Free.tag(5), tags[3])
        .unwrap();
    let free = collect_one(&watcher, TIMEOUT);
    ledger.record(&free);
    assert_eq!((free.op, free.tag), (Op::Free, tags[3]));
    ledger.assert_all_done();
}

#[test]
fn reads_complete_in_submission_order() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let tags: Vec<u64> = (0..3)
        .map(|_| ledger.must(&conn, Cmd::ReadFull(vec![0; 4])))
        .collect();
    wait_stats(&watcher, "3 pending reads", |s| s.reads_in_flight == 3);
    client.write_all(b"aaaabbbbcccc").unwrap();
    let cs = collect(&watcher, 3, TIMEOUT);
    ledger.record_all(&cs);
    let order: Vec<u64> = cs.iter().map(|c| c.tag).collect();
    assert_eq!(order, tags);
    let datas: Vec<&[u8]> = cs.iter().map(|c| c.data()).collect();
    assert_eq!(datas, [b"aaaa", b"bbbb", b"cccc"]);
    ledger.assert_all_done();
}

/// A plain internal read waiting alone is kept apart from the queue (the idle-memory
/// layout); reads sent after it, timed or not, must still complete behind it, and a Free
/// must still complete it.
#[test]
fn a_waiting_internal_read_keeps_its_place_and_is_freed() {
    let (watcher, conn, mut client) = watcher_pair();
    conn.send(Cmd::ReadInternal.tag(1)).unwrap();
    wait_stats(&watcher, "1 pending read", |s| s.reads_in_flight == 1);
    conn.send(Cmd::ReadFull(vec![0; 3]).tag(2)).unwrap();
    conn.send(Cmd::ReadInternal.timeout(TIMEOUT).tag(3))
        .unwrap();
    conn.send(Cmd::ReadInternal.tag(4)).unwrap();
    wait_stats(&watcher, "4 pending reads", |s| s.reads_in_flight == 4);
    client.write_all(b"first").unwrap();
    let first = collect_one(&watcher, TIMEOUT);
    assert_eq!((first.tag, first.data()), (1, &b"first"[..]));
    client.write_all(b"abcdefg").unwrap();
    let cs = collect(&watcher, 2, TIMEOUT);
    assert_eq!((cs[0].tag, cs[0].data()), (2, &b"abc"[..]));
    assert_eq!((cs[1].tag, cs[1].data()), (3, &b"defg"[..]));
    // Tag 4 now waits alone again; Free completes it, then itself.
    conn.send(Cmd::Free.tag(5)).unwrap();
    let cs = collect(&watcher, 2, TIMEOUT);
    let got: Vec<(u64, Op)> = cs.iter().map(|c| (c.tag, c.op)).collect();
    assert_eq!(got, [(4, Op::Read), (5, Op::Free)], "{}", describe_all(&cs));
    assert!(matches!(cs[0].result, Err(proactor::Error::Freed)));
    assert_eq!(watcher.stats().reads_in_flight, 0);
}

#[test]
fn many_small_writes_arrive_in_order() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let mut want = Vec::new();
    let mut tags = Vec::new();
    for i in 0..500u32 {
        let msg = format!("<{i}>");
        want.extend_from_slice(msg.as_bytes());
        tags.push(ledger.must(&conn, Cmd::Write(msg)));
    }
    let mut got = vec![0; want.len()];
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, want);
    let cs = collect(&watcher, 500, TIMEOUT);
    ledger.record_all(&cs);
    let order: Vec<u64> = cs.iter().map(|c| c.tag).collect();
    assert_eq!(order, tags, "writes complete in submission order");
    assert!(cs
        .iter()
        .all(|c| c.is_ok() && c.n == c.buf.as_slice().len()));
    ledger.assert_all_done();
}

/// A read pending on a quiet peer does not hold up writes on the same conn.
#[test]
fn reads_and_writes_are_independent() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let read = ledger.must(&conn, Cmd::Read(vec![0; 16]));
    let write = ledger.must(&conn, Cmd::Write("pong"));
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.tag, c.op, c.n), (write, Op::Write, 4));
    let mut got = [0; 4];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    client.write_all(b"ping").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.tag, c.data()), (read, &b"ping"[..]));
    ledger.assert_all_done();
}

/// One huge write completes through several partial writes, all bytes in order.
#[test]
fn huge_write_completes_in_several_partial_writes() {
    const LEN: usize = 32 * 1024 * 1024;
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let data = Rng::new(99).bytes(LEN);
    let tag = ledger.must(&conn, Cmd::Write(data.clone()));
    // Really pending: the peer reads nothing yet, so only part of it fits the buffers.
    wait_stats(&watcher, "a partly written write", |s| {
        s.writes_in_flight == 1 && s.bytes_written > 0
    });
    assert!(watcher.stats().bytes_written < LEN as u64);
    let mut got = vec![0; LEN];
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.read_exact(&mut got).unwrap();
    assert!(got == data, "huge write corrupted");
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.tag, c.op, c.n), (tag, Op::Write, LEN));
    assert!(c.is_ok(), "{}", describe(&c));
    ledger.assert_all_done();
}

/// A caller buffer comes back at its original length and capacity, with the data in buf[..n].
#[test]
fn caller_buffer_comes_back_whole() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let mut buf = Vec::with_capacity(4096);
    buf.resize(1000, 0xAA);
    let ptr = buf.as_ptr();
    ledger.must(&conn, Cmd::Read(buf));
    client.write_all(b"0123456789").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(c.is_ok());
    assert!((1..=10).contains(&c.n));
    assert_eq!(c.data(), &b"0123456789"[..c.n]);
    let v = c.buf.into_vec().expect("a Vec back");
    assert_eq!((v.len(), v.capacity(), v.as_ptr()), (1000, 4096, ptr));
    assert!(
        v[c.n..].iter().all(|&b| b == 0xAA),
        "bytes past n untouched"
    );
    ledger.assert_all_done();
}

/// Internal-buffer slices stay valid and unchanged while later reads reuse the arena.
#[test]
fn internal_slices_stay_valid() {
    let (watcher, conn, mut client) = watcher_pair_with(Watcher::builder().buffer_size(256));
    let mut ledger = Ledger::new();
    let mut kept: Vec<(Bytes, Vec<u8>)> = Vec::new();
    let mut rng = Rng::new(5);
    for _ in 0..200 {
        let len = rng.range(1, 100);
        let msg = rng.bytes(len);
        ledger.must(&conn, Cmd::ReadInternal);
        client.write_all(&msg).unwrap();
        // A read may take part of the message; read until all of it is in.
        let mut got = Vec::new();
        loop {
            let c = collect_one(&watcher, TIMEOUT);
            ledger.record(&c);
            assert!(c.is_ok(), "{}", describe(&c));
            let Buf::Bytes(b) = c.buf else {
                panic!("internal read without Bytes")
            };
            assert_eq!(b.len(), c.n);
            assert!(b.len() <= 256, "more than one chunk in one read");
            got.extend_from_slice(&b);
            kept.push((b.clone(), b.to_vec()));
            if got.len() == msg.len() {
                break;
            }
            ledger.must(&conn, Cmd::ReadInternal);
        }
        assert_eq!(got, msg);
        drop(kept.drain(..kept.len().saturating_sub(50))); // keep some, release some
    }
    for (b, copy) in &kept {
        assert_eq!(&b[..], &copy[..], "a held slice changed under us");
    }
    ledger.must(&conn, Cmd::Free);
    ledger.record(&collect_one(&watcher, TIMEOUT));
    ledger.assert_all_done();
}
