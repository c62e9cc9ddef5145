//! Fault injection with real sockets (issue 6): the peer resets or half-closes in the middle of
//! operations, vanishes under 1,000 queued operations, the socket buffers are tiny, `Free`
//! races completions, eight threads share connections, and the watcher is dropped under
//! 10,000 operations.
//!
//! After each fault: every accepted command has exactly one completion (counted by tag in a
//! `Ledger`), a bystander connection on the same watcher still works, and the process's fd
//! count is back where it started. Every test takes `SERIAL` first, so no other test of this
//! binary opens or closes descriptors while one counts them.

mod reliability_util;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use proactor::bytes::Bytes;
use proactor::{Buf, Cmd, Completion, Conn, Error, Op, SendError, Watcher};
use reliability_util::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the file's lock and the fd count to come back to.
fn begin() -> (MutexGuard<'static, ()>, usize) {
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    (guard, fds_start())
}

fn is_reset(r: &Result<(), Error>) -> bool {
    matches!(r, Err(Error::Io(e)) if e.kind() == ErrorKind::ConnectionReset)
}

fn bytes_ptr(c: &Completion) -> *const u8 {
    match &c.buf {
        Buf::Bytes(b) => b.as_ptr(),
        other => panic!("expected Buf::Bytes, got {other:?}"),
    }
}

/// A round trip on a connection that no fault touched: it must not have noticed anything.
fn check_bystander(w: &Watcher, l: &mut Ledger, conn: &Conn, peer: &mut TcpStream, seed: u64) {
    let msg = pattern(seed, 4096);
    let r = l.must(conn, Cmd::ReadFull(vec![0; msg.len()]));
    peer.write_all(&msg).unwrap();
    l.pump_until(w, TIMEOUT, "the bystander's read", |l| l.is_done(r));
    let c = l.get(r);
    assert!(c.is_ok(), "bystander read: {}", describe(c));
    assert!(c.data() == &msg[..], "bystander read the wrong bytes");
    let wt = l.must(conn, Cmd::Write(msg.clone()));
    let mut back = vec![0; msg.len()];
    peer.read_exact(&mut back).unwrap();
    assert!(back == msg, "bystander peer got the wrong bytes");
    l.pump_until(w, TIMEOUT, "the bystander's write", |l| l.is_done(wt));
    assert!(
        l.get(wt).is_ok(),
        "bystander write: {}",
        describe(l.get(wt))
    );
}

/// Frees the connection under test; its `Free` must complete `Ok`.
fn free_and_check(w: &Watcher, l: &mut Ledger, conn: &Conn) {
    let free = l.must(conn, Cmd::Free);
    l.pump_all(w, TIMEOUT);
    assert!(l.get(free).is_ok(), "free: {}", describe(l.get(free)));
}

/// Waits until the bystander is the watcher's only connection and nothing is in flight.
fn wait_only_bystander(w: &Watcher) {
    wait_stats(w, "only the bystander left", |s| {
        s.connections == 1 && s.reads_in_flight == 0 && s.writes_in_flight == 0
    });
}

/// Reads until end of stream or an error (a reset); returns the bytes and whether it was a
/// clean end of stream.
fn drain_peer(peer: &mut TcpStream) -> (Vec<u8>, bool) {
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match peer.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!("peer saw neither end of stream nor reset within {TIMEOUT:?}")
            }
            Err(_) => return (got, false),
        }
    }
}

#[test]
fn peer_reset_during_large_write() {
    let (_serial, fds) = begin();
    {
        const BIG: usize = 32 << 20;
        const SEEN: usize = 1 << 20;
        let w = Watcher::new().unwrap();
        let pairs = Pairs::new();
        let (mut peer, server) = pairs.pair();
        let (mut bpeer, bserver) = pairs.pair();
        let conn = w.register(server).unwrap();
        let bconn = w.register(bserver).unwrap();
        let mut l = Ledger::new();
        let data = Bytes::from(pattern(1, BIG));

        let read = l.must(&conn, Cmd::ReadInternal);
        let write = l.must(&conn, Cmd::Write(data.clone()));
        // The write is under way (the peer takes its first MiB) and still pending: 31 MiB
        // cannot fit in loopback socket buffers.
        let mut first = vec![0; SEEN];
        peer.read_exact(&mut first).unwrap();
        assert!(first[..] == data[..SEEN], "first MiB corrupted");
        wait_stats(&w, "a stuck write", |s| {
            s.writes_in_flight == 1 && s.reads_in_flight == 1 && s.bytes_written >= SEEN as u64
        });
        assert_eq!(l.pump_ready(&w), 0, "nothing may have completed yet");

        reset(peer);
        l.pump_until(&w, TIMEOUT, "the write and read to end", |l| {
            l.is_done(read) && l.is_done(write)
        });
        let wc = l.get(write);
        let err = wc
            .result
            .as_ref()
            .expect_err("a write to a reset peer cannot succeed");
        assert!(is_peer_gone(err), "write: {}", describe(wc));
        assert!(
            wc.n >= SEEN && wc.n < BIG,
            "n counts the bytes written before the reset: {}",
            describe(wc)
        );
        assert_eq!(
            bytes_ptr(wc),
            data.as_ptr(),
            "the write's buffer comes back"
        );
        let rc = l.get(read);
        assert!(
            rc.is_eof() || is_reset(&rc.result),
            "read: {}",
            describe(rc)
        );
        assert_eq!(rc.n, 0);

        // The dead connection keeps answering: new operations complete with an error.
        let w2 = l.must(&conn, Cmd::Write(&b"late"[..]));
        let r2 = l.must(&conn, Cmd::Read(vec![0; 16]));
        l.pump_until(&w, TIMEOUT, "operations on a reset conn", |l| {
            l.is_done(w2) && l.is_done(r2)
        });
        let c = l.get(w2);
        assert!(
            c.result.as_ref().is_err_and(is_peer_gone),
            "{}",
            describe(c)
        );
        let c = l.get(r2);
        assert!(c.is_eof() || is_reset(&c.result), "{}", describe(c));

        check_bystander(&w, &mut l, &bconn, &mut bpeer, 2);
        free_and_check(&w, &mut l, &conn);
        wait_only_bystander(&w);
        w.close();
    }
    assert_fds_back(fds);
}

#[test]
fn peer_reset_during_read_full() {
    let (_serial, fds) = begin();
    {
        const WANT: usize = 1 << 20;
        const SENT: usize = 1000;
        let w = Watcher::new().unwrap();
        let pairs = Pairs::new();
        let (mut peer, server) = pairs.pair();
        let (mut bpeer, bserver) = pairs.pair();
        let conn = w.register(server).unwrap();
        let bconn = w.register(bserver).unwrap();
        let mut l = Ledger::new();
        let data = pattern(3, SENT);

        let rf = l.must(&conn, Cmd::ReadFull(vec![0; WANT]));
        let behind = l.must(&conn, Cmd::ReadInternal);
        peer.write_all(&data).unwrap();
        // Really pending: the poller has read the 1,000 bytes into the buffer and waits.
        wait_stats(&w, "a partly filled ReadFull", |s| {
            s.bytes_read == SENT as u64 && s.reads_in_flight == 2
        });
        assert_eq!(l.pump_ready(&w), 0, "nothing may have completed yet");

        reset(peer);
        l.pump_until(&w, TIMEOUT, "both reads to end", |l| {
            l.is_done(rf) && l.is_done(behind)
        });
        let c = l.get(rf);
        // Linux reports the reset (ECONNRESET) to the first recv after it.
        assert!(is_reset(&c.result), "ReadFull: {}", describe(c));
        assert_eq!(c.n, SENT, "n counts the bytes read before the reset");
        let buf = c.buf.as_slice();
        assert_eq!(buf.len(), WANT, "the caller's buffer comes back whole");
        assert!(
            buf[..SENT] == data[..],
            "the bytes before the reset are intact"
        );
        let c = l.get(behind);
        assert!(c.is_eof() || is_reset(&c.result), "{}", describe(c));
        assert_eq!(c.n, 0);
        assert!(
            l.position(rf) < l.position(behind),
            "reads complete in order, also on a reset"
        );

        check_bystander(&w, &mut l, &bconn, &mut bpeer, 4);
        free_and_check(&w, &mut l, &conn);
        w.close();
    }
    assert_fds_back(fds);
}

#[test]
fn peer_half_close_while_writes_queued() {
    let (_serial, fds) = begin();
    {
        const PIECE: usize = 256 * 1024;
        const PIECES: usize = 64; // 16 MiB: far more than the socket buffers hold
        let w = Watcher::new().unwrap();
        let pairs = Pairs::new();
        let (mut peer, server) = pairs.pair();
        let (mut bpeer, bserver) = pairs.pair();
        let conn = w.register(server).unwrap();
        let bconn = w.register(bserver).unwrap();
        let mut l = Ledger::new();
        let data = Bytes::from(pattern(5, PIECE * PIECES));

        let read = l.must(&conn, Cmd::ReadInternal);
        let writes: Vec<u64> = (0..PIECES)
            .map(|i| l.must(&conn, Cmd::Write(data.slice(i * PIECE..(i + 1) * PIECE))))
            .collect();
        wait_stats(&w, "writes stuck behind a full socket buffer", |s| {
            s.writes_in_flight > 0 && s.reads_in_flight == 1 && s.bytes_written > 0
        });

        peer.shutdown(Shutdown::Write).unwrap();
        l.pump_until(&w, TIMEOUT, "end of stream on the read", |l| {
            l.is_done(read)
        });
        let c = l.get(read);
        assert!(c.is_eof() && c.n == 0, "{}", describe(c));
        // The read ended while the writes were still stuck: the directions are independent.
        let s = w.stats();
        assert!(s.writes_in_flight > 0, "writes still queued: {s:?}");
        // A read after end of stream completes at once with Eof.
        let again = l.must(&conn, Cmd::Read(vec![0; 8]));
        l.pump_until(&w, TIMEOUT, "a read after EOF", |l| l.is_done(again));
        assert!(l.get(again).is_eof());

        // The half-closed peer still reads everything, in order.
        let reader = thread::spawn(move || drain_peer(&mut peer));
        l.pump_until(&w, TIMEOUT, "all writes", |l| {
            writes.iter().all(|t| l.is_done(*t))
        });
        for (i, t) in writes.iter().enumerate() {
            let c = l.get(*t);
            assert!(c.is_ok() && c.n == PIECE, "write {i}: {}", describe(c));
            if i > 0 {
                assert!(l.position(writes[i - 1]) < l.position(*t), "FIFO");
            }
        }
        free_and_check(&w, &mut l, &conn);
        let (got, clean) = reader.join().unwrap();
        assert!(clean, "the peer sees end of stream after the free");
        assert_eq!(got.len(), data.len());
        assert!(
            got[..] == data[..],
            "the half-closed peer got every byte in order"
        );

        check_bystander(&w, &mut l, &bconn, &mut bpeer, 6);
        w.close();
    }
    assert_fds_back(fds);
}

#[test]
fn peer_vanishes_with_1000_ops_queued() {
    let (_serial, fds) = begin();
    {
        const EACH: usize = 500;
        const PIECE: usize = 64 * 1024;
        let w = Watcher::new().unwrap();
        let pairs = Pairs::new();
        let (peer, server) = pairs.pair();
        let (mut bpeer, bserver) = pairs.pair();
        let conn = w.register(server).unwrap();
        let bconn = w.register(bserver).unwrap();
        let mut l = Ledger::new();
        let piece = Bytes::from(pattern(7, PIECE));

        let mut reads = Vec::new();
        let mut writes = Vec::new();
        for i in 0..EACH {
            let read = match i % 3 {
                0 => Cmd::Read(vec![0; 4096]),
                1 => Cmd::ReadInternal,
                _ => Cmd::ReadFull(vec![0; 100]),
            };
            reads.push(l.must(&conn, read));
            writes.push(l.must(&conn, Cmd::Write(piece.clone())));
        }
        // Really pending: all 500 reads wait, and the writes the buffers could not take too.
        let s = wait_stats(&w, "1,000 operations queued or done", |s| {
            s.reads_in_flight == EACH as u64
                && s.writes_in_flight > 0
                && s.completions + s.reads_in_flight + s.writes_in_flight == 2 * EACH as u64
        });
        println!(
            "before the reset: {} writes done, {} pending",
            s.completions, s.writes_in_flight
        );

        reset(peer);
        let t = Instant::now();
        l.pump_until(&w, TIMEOUT, "1,000 completions", |l| {
            reads.iter().chain(&writes).all(|t| l.is_done(*t))
        });
        println!("1,000 operations ended {:?} after the reset", t.elapsed());

        for (i, t) in reads.iter().enumerate() {
            let c = l.get(*t);
            assert!(
                c.is_eof() || is_reset(&c.result),
                "read {i}: {}",
                describe(c)
            );
            if i > 0 {
                assert!(l.position(reads[i - 1]) < l.position(*t), "reads FIFO");
            }
        }
        let mut failed = false;
        for (i, t) in writes.iter().enumerate() {
            let c = l.get(*t);
            if i > 0 {
                assert!(l.position(writes[i - 1]) < l.position(*t), "writes FIFO");
            }
            match &c.result {
                Ok(()) => {
                    assert!(!failed, "write {i} succeeded after an earlier one failed");
                    assert_eq!(c.n, PIECE);
                }
                Err(e) => {
                    assert!(is_peer_gone(e), "write {i}: {}", describe(c));
                    if failed {
                        assert_eq!(c.n, 0, "only the head write can be partial");
                    }
                    failed = true;
                }
            }
        }
        assert!(failed, "the writes that did not fit must fail");

        check_bystander(&w, &mut l, &bconn, &mut bpeer, 8);
        free_and_check(&w, &mut l, &conn);
        wait_only_bystander(&w);
        w.close();
    }
    assert_fds_back(fds);
}

/// TCP with small buffers: both ends ask for 32 KiB (Linux doubles it), a quarter of the
/// largest writes, so writes end short and reads find the socket drained all the time. Not
/// smaller: with a receive buffer under the loopback MSS (64 KiB) Linux TCP itself crawls
/// (window updates wait for delayed ACKs and persist-timer probes): a plain epoll reader in
/// Python took 2.3 s for 2 MiB at SO_RCVBUF 16 KiB and over 120 s at 4 KiB.
#[test]
fn eagain_storm_small_tcp_buffers() {
    let (_serial, fds) = begin();
    {
        let pairs = Pairs::new();
        let (peer, server) = pairs.pair();
        set_buffer_sizes(&peer, 32 * 1024);
        set_buffer_sizes(&server, 32 * 1024);
        let peer_r = peer.try_clone().unwrap();
        eagain_storm(
            server,
            peer_r,
            peer,
            |p| p.shutdown(Shutdown::Write).unwrap(),
            &pairs,
        );
    }
    assert_fds_back(fds);
}

/// Unix stream sockets with the smallest buffers Linux allows (it raises 1 KiB to its
/// minimum): a few KiB in flight at a time, and no TCP windowing to slow the test down.
#[test]
fn eagain_storm_tiny_unix_buffers() {
    let (_serial, fds) = begin();
    {
        let pairs = Pairs::new();
        let (peer, server) = std::os::unix::net::UnixStream::pair().unwrap();
        set_buffer_sizes(&peer, 1024);
        set_buffer_sizes(&server, 1024);
        let peer_r = peer.try_clone().unwrap();
        eagain_storm(
            server,
            peer_r,
            peer,
            |p| p.shutdown(Shutdown::Write).unwrap(),
            &pairs,
        );
    }
    assert_fds_back(fds);
}

/// Many small and large writes out and reads of every kind in, at once, on a socket whose
/// buffers were made small before `register`: every byte must arrive, in order, both ways.
fn eagain_storm<S, R, W>(server: S, mut peer_r: R, mut peer_w: W, shut: fn(&W), pairs: &Pairs)
where
    S: Into<std::os::fd::OwnedFd>,
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    {
        const OUT: usize = 3 << 20; // server -> peer
        const IN: usize = 2 << 20; // peer -> server
        const WINDOW: usize = 256;
        let w = Watcher::new().unwrap();
        let (mut bpeer, bserver) = pairs.pair();
        let conn = w.register(server).unwrap();
        let bconn = w.register(bserver).unwrap();
        let out = Bytes::from(pattern(9, OUT));
        let inbound = pattern(10, IN);

        // The peer writes in random chunks and reads in small random chunks, on two threads.
        let to_send = inbound.clone();
        let writer = thread::spawn(move || {
            let mut rng = Rng::new(11);
            let mut at = 0;
            while at < to_send.len() {
                let n = rng.range(1, 9000).min(to_send.len() - at);
                peer_w.write_all(&to_send[at..at + n]).unwrap();
                at += n;
            }
            shut(&peer_w);
        });
        let reader = thread::spawn(move || {
            let mut rng = Rng::new(12);
            let mut got = Vec::with_capacity(OUT);
            let mut buf = [0u8; 700];
            loop {
                let want = rng.range(1, buf.len());
                match peer_r.read(&mut buf[..want]) {
                    Ok(0) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("peer read: {e}"),
                }
            }
        });

        let mut l = Ledger::new();
        let mut rng = Rng::new(13);
        let (mut out_at, mut writes, mut reads) = (0, Vec::new(), Vec::new());
        let mut read_eof = false;
        let start = Instant::now();
        while out_at < OUT || !read_eof {
            assert!(
                start.elapsed() < TIMEOUT * 3,
                "the storm took too long: {out_at} of {OUT} bytes submitted, {} of {} writes \
                 and {} of {} reads done, {:?}",
                done_count(&l, &writes),
                writes.len(),
                done_count(&l, &reads),
                reads.len(),
                w.stats()
            );
            // Keep at most WINDOW operations in flight per direction.
            while out_at < OUT && writes.len() - done_count(&l, &writes) < WINDOW {
                let n = match rng.below(20) {
                    0 => rng.range(64 * 1024, 256 * 1024),
                    1..=5 => rng.range(1, 4096),
                    _ => rng.range(1, 64),
                }
                .min(OUT - out_at);
                writes.push(l.must(&conn, Cmd::Write(out.slice(out_at..out_at + n))));
                out_at += n;
            }
            while !read_eof && reads.len() - done_count(&l, &reads) < 16 {
                let cmd = match rng.below(3) {
                    0 => Cmd::Read(vec![0; rng.range(1, 1000)]),
                    1 => Cmd::ReadFull(vec![0; rng.range(1, 5000)]),
                    _ => Cmd::ReadInternal,
                };
                reads.push(l.must(&conn, cmd));
            }
            let before = l.log.len();
            l.pump_until(&w, TIMEOUT, "storm progress", |l| l.log.len() > before);
            if l.log[before..].iter().any(|c| c.is_eof()) {
                read_eof = true;
            }
        }
        l.pump_all(&w, TIMEOUT);

        // Reads: data in submission (= completion) order is exactly the peer's stream.
        let mut got_in = Vec::with_capacity(IN);
        let mut last = 0;
        for t in &reads {
            let c = l.get(*t);
            assert!(l.position(*t) >= last, "reads FIFO");
            last = l.position(*t);
            match &c.result {
                Ok(()) => assert!(c.n > 0),
                Err(Error::Eof) => {}
                _ => panic!("read: {}", describe(c)),
            }
            got_in.extend_from_slice(c.data());
        }
        assert_eq!(got_in.len(), IN);
        assert!(got_in == inbound, "inbound bytes corrupted");
        // Writes: all whole, in order.
        let mut last = 0;
        for t in &writes {
            let c = l.get(*t);
            assert!(c.is_ok(), "write: {}", describe(c));
            assert_eq!(c.n, c.buf.as_slice().len());
            assert!(l.position(*t) >= last, "writes FIFO");
            last = l.position(*t);
        }
        free_and_check(&w, &mut l, &conn);
        writer.join().unwrap();
        let got_out = reader.join().unwrap();
        assert_eq!(got_out.len(), OUT);
        assert!(got_out[..] == out[..], "outbound bytes corrupted");
        let s = w.stats();
        println!(
            "storm: {} writes, {} reads, {} poller wake-ups, {:?}",
            writes.len(),
            reads.len(),
            s.wakeups,
            start.elapsed()
        );
        assert!(
            s.bytes_written >= OUT as u64 && s.bytes_read >= IN as u64,
            "{s:?}"
        );

        check_bystander(&w, &mut l, &bconn, &mut bpeer, 14);
        w.close();
    }
}

fn done_count(l: &Ledger, tags: &[u64]) -> usize {
    tags.iter().filter(|t| l.is_done(**t)).count()
}

/// One connection of the free race: what was sent and what came back.
struct Racer {
    conn: Conn,
    reads: Vec<u64>,
    writes: Vec<(u64, Bytes)>,
    free: Option<u64>,
    free_after: usize,
    completed: usize,
    /// Freed by the freer thread, racing this thread's sends.
    by_thread: bool,
}

#[test]
fn free_races_completions() {
    let (_serial, fds) = begin();
    {
        const ROUNDS: usize = 60;
        const CONNS: usize = 4;
        let w = Watcher::new().unwrap();
        let pairs = Pairs::new();
        let (mut bpeer, bserver) = pairs.pair();
        let bconn = w.register(bserver).unwrap();
        let mut l = Ledger::new();
        let mut rng = Rng::new(15);
        let out = Bytes::from(pattern(16, 1 << 20));
        let start = Instant::now();
        let mut frees = 0;

        for round in 0..ROUNDS {
            let mut peers = Vec::new();
            let mut racers = Vec::new();
            for i in 0..CONNS {
                let (peer, server) = pairs.pair();
                peer.set_nonblocking(true).unwrap();
                peers.push((peer, pattern((round * CONNS + i) as u64 + 1000, 256 * 1024)));
                racers.push(Racer {
                    conn: w.register(server).unwrap(),
                    reads: Vec::new(),
                    writes: Vec::new(),
                    free: None,
                    // 0: freed before anything completes; else after some completions.
                    free_after: rng.range(0, 40),
                    completed: 0,
                    by_thread: i % 2 == 1,
                });
            }
            // The peers write their streams and read everything, all the time, until each
            // sees end of stream or a reset: data keeps arriving while the frees land.
            let peer_thread = thread::spawn(move || peer_loop(peers));

            // A second thread frees the odd conns on its own schedule, racing our sends.
            let (to_free_tx, to_free_rx) = std::sync::mpsc::channel::<(Conn, u64)>();
            let freer = thread::spawn(move || {
                let mut sent = Vec::new();
                while let Ok((conn, tag)) = to_free_rx.recv() {
                    for _ in 0..(tag % 500) {
                        std::hint::spin_loop();
                    }
                    match conn.send(Cmd::Free.tag(tag)) {
                        Ok(()) => sent.push(tag),
                        Err(e) => panic!("only this thread frees this conn: {e:?}"),
                    }
                }
                sent
            });
            let mut handed = HashMap::new();

            for (i, r) in racers.iter_mut().enumerate() {
                for k in 0..4 {
                    submit_read(&mut l, r, &mut rng, k);
                    submit_write(&mut l, r, &mut rng, &out);
                }
                if i % 2 == 1 {
                    let tag = 1_000_000_000 + (round * CONNS + i) as u64;
                    l.expect(tag, r.conn.id(), Op::Free);
                    handed.insert(i, tag);
                }
            }
            let mut to_free = Some(to_free_tx);
            let round_start = Instant::now();
            loop {
                // Free the even conns from here once their threshold passes; hand the odd
                // ones to the freer thread.
                for (i, r) in racers.iter_mut().enumerate() {
                    if r.free.is_none() && r.completed >= r.free_after {
                        if let Some(tag) = handed.get(&i) {
                            let tx = to_free.as_ref().unwrap();
                            tx.send((r.conn.clone(), *tag)).unwrap();
                            r.free = Some(*tag);
                        } else {
                            r.free = Some(l.must(&r.conn, Cmd::Free));
                        }
                        frees += 1;
                    }
                }
                if racers.iter().all(|r| r.free.is_some()) {
                    to_free = None; // the freer thread ends once it has sent everything
                }
                if l.outstanding.is_empty() && to_free.is_none() {
                    break;
                }
                assert!(round_start.elapsed() < TIMEOUT, "round {round} hangs");
                let before = l.log.len();
                l.pump_until(&w, TIMEOUT, "free race progress", |l| l.log.len() > before);
                let new: Vec<(Conn, Op)> = l.log[before..]
                    .iter()
                    .map(|c| (c.conn.clone(), c.op))
                    .collect();
                for (conn, op) in new {
                    let Some(r) = racers.iter_mut().find(|r| r.conn == conn) else {
                        continue;
                    };
                    r.completed += 1;
                    // Keep the pipeline full until the free is sent; on the conns the freer
                    // thread frees, keep sending until a send is refused with `Freed`.
                    if op == Op::Free || (r.free.is_some() && !r.by_thread) {
                        continue;
                    }
                    if matches!(op, Op::Read | Op::ReadFull) {
                        submit_read(&mut l, r, &mut rng, r.completed);
                    } else {
                        submit_write(&mut l, r, &mut rng, &out);
                    }
                }
            }
            drop(to_free);
            let freed_by_thread = freer.join().unwrap();
            assert_eq!(freed_by_thread.len(), handed.len());
            let peer_results = peer_thread.join().unwrap();

            for (r, (sent, received, _clean)) in racers.iter().zip(&peer_results) {
                check_racer(&l, r, sent, received);
            }
        }
        println!(
            "{frees} frees raced {} completions in {:?}",
            l.log.len(),
            start.elapsed()
        );
        check_bystander(&w, &mut l, &bconn, &mut bpeer, 17);
        wait_only_bystander(&w);
        w.close();
    }
    assert_fds_back(fds);
}

fn submit_read(l: &mut Ledger, r: &mut Racer, rng: &mut Rng, k: usize) {
    let cmd = match k % 3 {
        0 => Cmd::Read(vec![0; rng.range(1, 8192)]),
        1 => Cmd::ReadInternal,
        _ => Cmd::ReadFull(vec![0; rng.range(1, 8192)]),
    };
    match l.send(&r.conn, cmd) {
        Ok(t) => r.reads.push(t),
        Err(SendError::Freed(_)) => assert!(r.conn.is_freed()),
        Err(e) => panic!("{e:?}"),
    }
}

fn submit_write(l: &mut Ledger, r: &mut Racer, rng: &mut Rng, out: &Bytes) {
    let len = rng.range(1, 64 * 1024);
    let at = rng.range(0, out.len() - len);
    let buf = out.slice(at..at + len);
    match l.send(&r.conn, Cmd::Write(buf.clone())) {
        Ok(t) => r.writes.push((t, buf)),
        Err(SendError::Freed(_)) => assert!(r.conn.is_freed()),
        Err(e) => panic!("{e:?}"),
    }
}

/// What a freed racer must show: its free came last, reads delivered a prefix of what the
/// peer sent, and the peer received a prefix of what the writes report written.
fn check_racer(l: &Ledger, r: &Racer, sent: &[u8], received: &[u8]) {
    let free = r.free.expect("every racer is freed");
    let fpos = l.position(free);
    assert!(l.get(free).is_ok(), "{}", describe(l.get(free)));
    let mut last = 0;
    let mut inbound = Vec::new();
    for t in &r.reads {
        let c = l.get(*t);
        assert!(l.position(*t) < fpos, "a read completed after the free");
        assert!(l.position(*t) >= last, "reads FIFO");
        last = l.position(*t);
        match &c.result {
            Ok(()) => assert!(c.n > 0),
            Err(Error::Freed) => {}
            _ => panic!("read: {}", describe(c)),
        }
        inbound.extend_from_slice(c.data());
    }
    assert!(
        inbound.len() <= sent.len() && inbound[..] == sent[..inbound.len()],
        "reads delivered bytes the peer never sent in that order"
    );
    let mut outbound = Vec::new();
    let mut last = 0;
    for (t, buf) in &r.writes {
        let c = l.get(*t);
        assert!(l.position(*t) < fpos, "a write completed after the free");
        assert!(l.position(*t) >= last, "writes FIFO");
        last = l.position(*t);
        match &c.result {
            Ok(()) => assert_eq!(c.n, buf.len()),
            Err(Error::Freed) => assert!(c.n <= buf.len()),
            _ => panic!("write: {}", describe(c)),
        }
        outbound.extend_from_slice(&buf[..c.n]);
    }
    // A close with unread data sends RST, which may drop bytes in flight: a prefix, then.
    assert!(
        received.len() <= outbound.len() && received[..] == outbound[..received.len()],
        "the peer got bytes ({}) that are not a prefix of those written ({})",
        received.len(),
        outbound.len()
    );
}

/// The peers of one free-race round: each writes its stream as fast as the socket takes it
/// and reads everything, until end of stream or reset. Returns (sent, received, clean EOF).
fn peer_loop(mut peers: Vec<(TcpStream, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>, bool)> {
    let n = peers.len();
    let mut sent = vec![0usize; n];
    let mut received = vec![Vec::new(); n];
    let mut ended: Vec<Option<bool>> = vec![None; n];
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    while ended.iter().any(|e| e.is_none()) {
        assert!(start.elapsed() < TIMEOUT, "a peer never saw its conn close");
        let mut idle = true;
        for (i, (peer, stream)) in peers.iter_mut().enumerate() {
            if ended[i].is_some() {
                continue;
            }
            if sent[i] < stream.len() {
                match peer.write(&stream[sent[i]..(sent[i] + 4096).min(stream.len())]) {
                    Ok(k) => {
                        sent[i] += k;
                        idle = false;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {} // reset or broken pipe: the read below sees it too
                }
            }
            loop {
                match peer.read(&mut buf) {
                    Ok(0) => {
                        ended[i] = Some(true);
                        break;
                    }
                    Ok(k) => {
                        received[i].extend_from_slice(&buf[..k]);
                        idle = false;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        ended[i] = Some(false);
                        break;
                    }
                }
            }
        }
        if idle {
            // Nothing to do until the watcher's side moves: yield rather than spin hard.
            thread::sleep(Duration::from_micros(200));
        }
    }
    peers
        .iter()
        .enumerate()
        .map(|(i, (_, stream))| {
            (
                stream[..sent[i]].to_vec(),
                std::mem::take(&mut received[i]),
                ended[i] == Some(true),
            )
        })
        .collect()
}

#[test]
fn eight_threads_share_conns() {
    let (_serial, fds) = begin();
    {
        const THREADS: usize = 8;
        const PER_THREAD: u32 = 300; // writes per thread per conn
        const CONNS: usize = 2;
        const INBOUND: usize = 64 * 1024;
        let w = Watcher::new().unwrap();
        let pairs = Pairs::new();
        let mut conns = Vec::new();
        let mut readers = Vec::new();
        let mut peer_writers = Vec::new();
        for c in 0..CONNS {
            let (peer, server) = pairs.pair();
            conns.push(w.register(server).unwrap());
            let mut pr = peer.try_clone().unwrap();
            readers.push(thread::spawn(move || drain_peer(&mut pr)));
            peer_writers.push(peer);
            let _ = c;
        }
        let (mut bpeer, bserver) = pairs.pair();
        let bconn = w.register(bserver).unwrap();

        // Tags: thread << 40 | conn << 32 | kind << 31 | seq.
        let tag = |t: usize, c: usize, read: bool, seq: u32| {
            (t as u64) << 40 | (c as u64) << 32 | (read as u64) << 31 | seq as u64
        };
        let accepted = Arc::new(Mutex::new(Vec::<(u64, usize, Op)>::new()));
        let go = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for t in 0..THREADS {
            let conns = conns.clone();
            let accepted = accepted.clone();
            let go = go.clone();
            workers.push(thread::spawn(move || {
                go.fetch_add(1, Ordering::SeqCst);
                while go.load(Ordering::SeqCst) < THREADS {
                    std::hint::spin_loop();
                }
                let mut rng = Rng::new(100 + t as u64);
                let mut mine = Vec::new();
                let start = Instant::now();
                for seq in 0..PER_THREAD {
                    for (c, conn) in conns.iter().enumerate() {
                        let len = rng.range(0, 300);
                        let rec = record(t as u8, seq, len);
                        send_retry(conn, Cmd::Write(rec).tag(tag(t, c, false, seq)), start);
                        mine.push((tag(t, c, false, seq), c, Op::Write));
                        if seq % 4 == 0 {
                            send_retry(conn, Cmd::ReadInternal.tag(tag(t, c, true, seq)), start);
                            mine.push((tag(t, c, true, seq), c, Op::Read));
                        }
                    }
                }
                accepted.lock().unwrap().extend(mine);
            }));
        }
        // The peers send some bytes for the reads to take, then end their stream so the
        // reads left over complete with Eof.
        let inbound: Vec<Vec<u8>> = (0..CONNS)
            .map(|c| pattern(200 + c as u64, INBOUND))
            .collect();
        for (p, data) in peer_writers.iter_mut().zip(&inbound) {
            p.write_all(data).unwrap();
            p.shutdown(Shutdown::Write).unwrap();
        }

        // Take completions while the threads send; count every tag.
        let total = THREADS * PER_THREAD as usize * CONNS * 5 / 4;
        let mut log: Vec<Completion> = Vec::with_capacity(total);
        let start = Instant::now();
        while log.len() < total {
            assert!(
                start.elapsed() < TIMEOUT * 2,
                "{} of {total} completions",
                log.len()
            );
            let _ = w.wait_io_timeout(&mut log, Duration::from_millis(100));
        }
        for h in workers {
            h.join().unwrap();
        }
        let accepted = std::mem::take(&mut *accepted.lock().unwrap());
        assert_eq!(accepted.len(), total);
        let mut extra = Vec::new();
        w.try_wait_io(&mut extra).unwrap();
        assert!(extra.is_empty(), "more completions than commands");

        // Exactly once per tag, on the right conn, with the right op.
        let mut seen = HashMap::new();
        for (i, c) in log.iter().enumerate() {
            assert!(seen.insert(c.tag, i).is_none(), "tag {:#x} twice", c.tag);
        }

        for (t, conn, op) in &accepted {
            let i = seen
                .get(t)
                .unwrap_or_else(|| panic!("tag {t:#x} never completed"));
            assert_eq!(log[*i].op, *op);
            assert_eq!(log[*i].conn, conns[*conn]);
        }
        // Per thread and conn, writes complete in the order that thread sent them.
        let mut last: HashMap<(u64, u64), u64> = HashMap::new();
        for c in log.iter().filter(|c| c.op == Op::Write) {
            assert!(c.is_ok(), "{}", describe(c));
            let key = (c.tag >> 40, (c.tag >> 32) & 0xff);
            let seq = c.tag & 0x7fff_ffff;
            if let Some(prev) = last.insert(key, seq) {
                assert!(
                    seq > prev,
                    "thread {} conn {}: write {seq} after {prev}",
                    key.0,
                    key.1
                );
            }
        }
        // Reads: in mailbox order, the bytes are exactly the peer's stream.
        for (c, data) in conns.iter().zip(&inbound) {
            let got: Vec<u8> = log
                .iter()
                .filter(|x| x.conn == *c && x.op == Op::Read)
                .flat_map(|x| {
                    assert!(x.is_ok() || x.is_eof(), "{}", describe(x));
                    x.data().to_vec()
                })
                .collect();
            assert!(
                got[..] == data[..],
                "reads from 8 threads lost or reordered bytes"
            );
        }
        drop(log);
        for conn in &conns {
            conn.send(Cmd::Free).unwrap();
        }
        // The peers parse what arrived: each thread's records, whole and in sequence.
        for r in readers {
            let (stream, clean) = r.join().unwrap();
            assert!(clean);
            check_records(&stream, THREADS, PER_THREAD);
        }
        let mut frees = Vec::new();
        while frees.len() < CONNS {
            let n = w.wait_io_timeout(&mut frees, TIMEOUT).unwrap();
            assert!(n > 0, "frees never completed");
        }
        assert!(frees.iter().all(|c| c.op == Op::Free && c.is_ok()));
        drop(frees);
        let mut l = Ledger::new();
        check_bystander(&w, &mut l, &bconn, &mut bpeer, 18);
        w.close();
    }
    assert_fds_back(fds);
}

/// `[thread u8][seq u32 LE][len u16 LE][len bytes]`, the payload derived from (thread, seq).
fn record(t: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(7 + len);
    v.push(t);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(len as u16).to_le_bytes());
    v.extend((0..len).map(|i| (i as u32 ^ seq).wrapping_mul(31).wrapping_add(t as u32) as u8));
    v
}

fn check_records(stream: &[u8], threads: usize, per_thread: u32) {
    let mut next = vec![0u32; threads];
    let mut at = 0;
    while at < stream.len() {
        assert!(stream.len() - at >= 7, "torn record header at {at}");
        let t = stream[at] as usize;
        let seq = u32::from_le_bytes(stream[at + 1..at + 5].try_into().unwrap());
        let len = u16::from_le_bytes(stream[at + 5..at + 7].try_into().unwrap()) as usize;
        assert!(t < threads, "garbage thread id {t} at {at}");
        assert_eq!(
            seq, next[t],
            "thread {t}: record {seq} where {} was due",
            next[t]
        );
        let whole = &stream[at..at + 7 + len];
        assert!(
            whole == record(t as u8, seq, len),
            "thread {t} record {seq} corrupted"
        );
        next[t] += 1;
        at += 7 + len;
    }
    assert!(
        next.iter().all(|n| *n == per_thread),
        "records missing: {next:?}"
    );
}

#[test]
fn watcher_dropped_with_10000_ops_in_flight() {
    let (_serial, fds) = begin();
    {
        const CONNS: usize = 20;
        const EACH: usize = 250; // reads and as many writes per conn: 10,000 in all
        const PIECE: usize = 16 * 1024;
        let w = Watcher::new().unwrap();
        let mailbox = w.mailbox();
        let pairs = Pairs::new();
        let mut peers = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..CONNS {
            let (peer, server) = pairs.pair();
            // Small buffers: only the first few writes fit, the rest stay in flight.
            set_buffer_sizes(&peer, 16 * 1024);
            set_buffer_sizes(&server, 16 * 1024);
            peers.push(peer);
            conns.push(w.register(server).unwrap());
        }
        let piece = Bytes::from(pattern(19, PIECE));
        let mut l = Ledger::new();
        // A 1 MiB write first on each conn: it fills the small buffers and stays stuck, so
        // every one of the 10,000 operations behind it is really in flight.
        let filler = Bytes::from(pattern(20, 1 << 20));
        for conn in &conns {
            l.must(conn, Cmd::Write(filler.clone()));
        }
        let mut ops = Vec::with_capacity(2 * CONNS * EACH);
        for conn in &conns {
            for i in 0..EACH {
                let read = if i % 2 == 0 {
                    Cmd::ReadInternal
                } else {
                    Cmd::Read(vec![0; 64])
                };
                ops.push(l.must(conn, read));
                ops.push(l.must(conn, Cmd::Write(piece.clone())));
            }
        }
        let total = (2 * CONNS * EACH) as u64;
        let s = wait_stats(&w, "10,000 operations in flight", |s| {
            s.reads_in_flight == total / 2
                && s.writes_in_flight == total / 2 + CONNS as u64
                && s.bytes_written > 0
        });
        assert_eq!(s.completions, 0, "{s:?}");

        // A thread keeps sending while the watcher goes away: whatever it gets accepted
        // must complete too; after the close it must see `Closed`, never a hang or panic.
        let racing_conns = conns.clone();
        let racer_started = Arc::new(AtomicUsize::new(0));
        let started = racer_started.clone();
        let racer = thread::spawn(move || {
            let mut accepted = Vec::new();
            let start = Instant::now();
            for i in 0u64.. {
                assert!(start.elapsed() < TIMEOUT, "sends never saw the close");
                let conn = &racing_conns[i as usize % CONNS];
                let tag = 1 << 40 | i;
                match conn.send(Cmd::Read(vec![0; 8]).tag(tag)) {
                    Ok(()) => accepted.push((tag, conn.id())),
                    Err(SendError::Full(_)) => thread::yield_now(),
                    Err(SendError::Closed(c)) => {
                        assert_eq!(c.into_buf().as_slice().len(), 8, "buffer given back");
                        return accepted;
                    }
                    Err(e) => panic!("{e:?}"),
                }
                started.store(accepted.len(), Ordering::Relaxed);
            }
            unreachable!()
        });
        wait_until_count(&racer_started, 100);
        let t = Instant::now();
        drop(w);
        let drop_time = t.elapsed();
        let accepted = racer.join().unwrap();
        for (tag, id) in &accepted {
            l.expect(*tag, *id, Op::Read);
        }

        // Every operation completes exactly once; the channel then disconnects.
        let mut closed = 0;
        while let Ok(c) = mailbox.recv_timeout(TIMEOUT) {
            match &c.result {
                Err(Error::WatcherClosed) => {
                    closed += 1;
                    let len = c.buf.as_slice().len();
                    match c.op {
                        Op::Write => assert!(len == PIECE || len == 1 << 20, "buffer back"),
                        _ if c.tag >> 40 == 1 => assert_eq!(len, 8, "buffer handed back"),
                        _ => assert!(len == 0 || len == 64, "buffer handed back"),
                    }
                }
                Ok(()) => panic!("nothing could finish: {}", describe(&c)),
                _ => panic!("{}", describe(&c)),
            }
            l.record(c);
        }
        assert!(
            mailbox.is_disconnected(),
            "the mailbox closes after the last completion"
        );
        assert!(
            l.outstanding.is_empty(),
            "{} never completed",
            l.outstanding.len()
        );
        for t in &ops {
            let c = l.get(*t);
            assert!(
                matches!(c.result, Err(Error::WatcherClosed)) && c.n == 0,
                "{}",
                describe(c)
            );
        }
        println!(
            "watcher dropped in {drop_time:?}: {closed} WatcherClosed, {} racing sends accepted",
            accepted.len()
        );
        assert_eq!(closed, 2 * CONNS * EACH + CONNS + accepted.len());
        // Sends on surviving handles are refused, buffer back.
        match conns[0].send(Cmd::Write(&b"after"[..])) {
            Err(SendError::Closed(c)) => assert_eq!(c.into_buf().as_slice(), b"after"),
            other => panic!("send after drop: {other:?}"),
        }
        drop(l);
        drop(conns);
        // Every server socket is closed: only the peers and the listener are left. (We do not
        // read the peers to their end of stream: the bytes still queued behind a 32 KiB
        // window trickle out at TCP's persist-timer pace, which tests the kernel, not us.)
        assert_fds_back(fds + CONNS + 1);
        drop(peers);
    }
    assert_fds_back(fds);
}

fn wait_until_count(n: &AtomicUsize, at_least: usize) {
    let start = Instant::now();
    while n.load(Ordering::Relaxed) < at_least {
        assert!(
            start.elapsed() < TIMEOUT,
            "the racing sender never got going"
        );
        thread::yield_now();
    }
}
