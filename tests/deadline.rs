//! Deadlines and idle timeouts: read, write, read-full with partial counts, slow-but-steady
//! peers, and deadlines racing the data.

mod util;

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use proactor::{Cmd, Error, Op, Watcher};
use util::*;

/// Timing asserts: strict lower bound, generous upper bound.
fn assert_between(elapsed: Duration, lo: Duration, what: &str) {
    assert!(elapsed >= lo, "{what} fired early: {elapsed:?} < {lo:?}");
    assert!(
        elapsed < lo + Duration::from_secs(5),
        "{what} fired late: {elapsed:?}"
    );
}

#[test]
fn read_deadline_fires_and_conn_stays_usable() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let timeout = Duration::from_millis(200);
    let start = Instant::now();
    let tag = ledger.must(&conn, Cmd::Read(vec![7; 64]).timeout(timeout));
    let c = collect_one(&watcher, TIMEOUT);
    let elapsed = start.elapsed();
    ledger.record(&c);
    assert_eq!((c.tag, c.op, c.n), (tag, Op::Read, 0));
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    assert_between(elapsed, timeout, "read deadline");
    let buf = c.buf.into_vec().expect("buffer back");
    assert_eq!(buf, vec![7; 64], "buffer back untouched");
    wait_stats(&watcher, "deadline counters", |s| {
        s.deadlines_fired == 1 && s.deadlines_armed == 0 && s.reads_in_flight == 0
    });

    // Still usable: a read, a write, and a deadline that does not fire.
    let r = ledger.must(&conn, Cmd::Read(buf).timeout(TIMEOUT));
    client.write_all(b"after").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!(c.tag, r);
    assert!(c.is_ok(), "{}", describe(&c));
    assert_eq!(c.data(), &b"after"[..c.n]);
    ledger.must(&conn, Cmd::Write("still here").timeout(TIMEOUT));
    ledger.record(&collect_one(&watcher, TIMEOUT));
    let mut got = [0; 10];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
    ledger.assert_all_done();
}

#[test]
fn absolute_deadline_is_respected() {
    let (watcher, conn, _client) = watcher_pair();
    let mut ledger = Ledger::new();
    let deadline = Instant::now() + Duration::from_millis(150);
    ledger.must(&conn, Cmd::ReadInternal.deadline(deadline));
    let c = collect_one(&watcher, TIMEOUT);
    let now = Instant::now();
    ledger.record(&c);
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    assert!(now >= deadline, "fired {:?} early", deadline - now);
    assert!(now < deadline + Duration::from_secs(5));
    assert!(c.buf.as_slice().is_empty());
    ledger.assert_all_done();
}

/// A deadline already passed, or a zero timeout, fires though nothing happens on the
/// connection; on an inline watcher within the very step that takes the commands.
#[test]
fn deadline_in_the_past_fires_at_once_on_a_quiet_conn() {
    let (inline, conn, _client) = watcher_pair_with(Watcher::builder().inline(true));
    conn.send(Cmd::Read(vec![0; 8]).deadline(Instant::now()))
        .unwrap();
    conn.send(Cmd::ReadFull(vec![0; 8]).timeout(Duration::ZERO))
        .unwrap();
    let mut got = Vec::new();
    assert_eq!(
        inline.try_wait_io(&mut got).unwrap(),
        2,
        "{}",
        describe_all(&got)
    );
    assert!(got.iter().all(|c| matches!(c.result, Err(Error::Deadline))));

    let (watcher, conn, _client) = watcher_pair();
    let mut ledger = Ledger::new();
    let past = Instant::now();
    ledger.must(&conn, Cmd::Read(vec![0; 8]).deadline(past));
    ledger.must(&conn, Cmd::ReadFull(vec![0; 8]).timeout(Duration::ZERO));
    let cs = collect(&watcher, 2, TIMEOUT);
    ledger.record_all(&cs);
    for c in &cs {
        assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(c));
    }
    ledger.assert_all_done();
}

/// A deadline completes only its own operation: the read queued behind it and a write on the
/// same conn go on.
#[test]
fn deadline_completes_only_its_own_operation() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let first = ledger.must(
        &conn,
        Cmd::Read(vec![0; 8]).timeout(Duration::from_millis(100)),
    );
    let second = ledger.must(&conn, Cmd::ReadFull(vec![0; 3]));
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!(c.tag, first);
    assert!(matches!(c.result, Err(Error::Deadline)));
    wait_stats(&watcher, "the second read still pending", |s| {
        s.reads_in_flight == 1
    });
    client.write_all(b"abc").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.tag, c.data()), (second, &b"abc"[..]));
    ledger.assert_all_done();
}

#[test]
fn write_deadline_against_a_peer_that_never_reads() {
    const LEN: usize = 64 * 1024 * 1024;
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let data = Rng::new(64).bytes(LEN);
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let tag = ledger.must(&conn, Cmd::Write(data.clone()).timeout(timeout));
    let c = collect_one(&watcher, TIMEOUT);
    let elapsed = start.elapsed();
    ledger.record(&c);
    assert_eq!((c.tag, c.op), (tag, Op::Write));
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    assert_between(elapsed, timeout, "write deadline");
    assert!(c.n > 0 && c.n < LEN, "partial count expected, got {}", c.n);
    assert_eq!(c.buf.as_slice().len(), LEN, "whole buffer back");
    let n = c.n;

    // The stream holds exactly the first n bytes; a later write follows them directly.
    ledger.must(&conn, Cmd::Write("tail"));
    let mut got = vec![0; n + 4];
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.read_exact(&mut got).unwrap();
    assert!(got[..n] == data[..n], "partially written bytes differ");
    assert_eq!(&got[n..], b"tail");
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(c.is_ok());
    ledger.assert_all_done();
}

#[test]
fn read_full_deadline_reports_the_partial_count() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let tag = ledger.must(&conn, Cmd::ReadFull(vec![0; 20]).timeout(timeout));
    client.write_all(b"0123456789").unwrap(); // 10 of 20
    wait_stats(&watcher, "10 bytes read", |s| s.bytes_read == 10);
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_between(start.elapsed(), timeout, "read-full deadline");
    assert_eq!((c.tag, c.op, c.n), (tag, Op::ReadFull, 10));
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    assert_eq!(c.data(), b"0123456789");
    assert_eq!(c.buf.as_slice().len(), 20);

    // Nothing was lost or duplicated: the next read-full gets exactly what follows.
    ledger.must(&conn, Cmd::ReadFull(vec![0; 10]));
    client.write_all(b"abcdefghij").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(c.is_ok());
    assert_eq!(c.data(), b"abcdefghij");
    ledger.assert_all_done();
}

/// A peer that sends one byte every 50 ms for ~1 s never goes 300 ms idle: the read-full
/// must not time out. Then silence: it must.
#[test]
fn idle_timeout_spares_a_slow_steady_reader_then_fires_on_silence() {
    const BYTES: usize = 20;
    const PACE: Duration = Duration::from_millis(50);
    let idle = Duration::from_millis(300);
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let start = Instant::now();
    let tag = ledger.must(&conn, Cmd::ReadFull(vec![0; BYTES]).idle_timeout(idle));
    let peer = thread::spawn(move || {
        for i in 0..BYTES {
            client.write_all(&[b'a' + i as u8]).unwrap();
            thread::sleep(PACE); // the peer's deliberate pacing
        }
        client
    });
    let c = collect_one(&watcher, TIMEOUT);
    let elapsed = start.elapsed();
    let client = peer.join().unwrap();
    ledger.record(&c);
    assert_eq!(c.tag, tag);
    assert!(
        c.is_ok(),
        "idle timeout cut off a live transfer: {}",
        describe(&c)
    );
    assert_eq!(c.data(), b"abcdefghijklmnopqrst");
    assert!(elapsed >= PACE * (BYTES as u32 - 1), "{elapsed:?}");

    let start = Instant::now();
    ledger.must(&conn, Cmd::ReadFull(vec![0; 1]).idle_timeout(idle));
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(
        matches!(c.result, Err(Error::IdleTimeout)),
        "{}",
        describe(&c)
    );
    assert_between(start.elapsed(), idle, "idle timeout");
    assert_eq!(c.n, 0);
    wait_stats(&watcher, "deadline counters", |s| {
        s.deadlines_fired == 1 && s.deadlines_armed == 0
    });
    drop(client);
    ledger.assert_all_done();
}

/// Same for writes: a peer draining steadily keeps a big write alive past its idle timeout;
/// a peer that stops reading lets it fire, with the partial count.
#[test]
fn idle_timeout_on_writes() {
    const LEN: usize = 16 * 1024 * 1024;
    let idle = Duration::from_millis(300);
    let (watcher, conn, client) = watcher_pair();
    let mut ledger = Ledger::new();
    let data = Rng::new(16).bytes(LEN);

    let start = Instant::now();
    let tag = ledger.must(&conn, Cmd::Write(data.clone()).idle_timeout(idle));
    wait_stats(&watcher, "a partly written write", |s| {
        s.writes_in_flight == 1 && s.bytes_written > 0
    });
    let peer = thread::spawn(move || {
        let mut client = client;
        client.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut got = vec![0; LEN];
        let mut at = 0;
        while at < LEN {
            let end = (at + (1 << 20)).min(LEN);
            client.read_exact(&mut got[at..end]).unwrap();
            at = end;
            thread::sleep(Duration::from_millis(50)); // slow but steady: 1 MiB per 50 ms
        }
        (client, got, at)
    });
    let c = collect_one(&watcher, Duration::from_secs(30));
    let (mut client, got, at) = peer.join().unwrap();
    ledger.record(&c);
    assert_eq!(c.tag, tag);
    assert!(
        c.is_ok(),
        "idle timeout cut off a live write: {}",
        describe(&c)
    );
    assert!(
        start.elapsed() > idle,
        "the transfer should have outlived the idle timeout"
    );
    assert_eq!(at, LEN);
    assert!(got == data, "written bytes differ");

    // Now nobody reads: the write stalls and its idle timeout fires.
    let start = Instant::now();
    ledger.must(&conn, Cmd::Write(data.clone()).idle_timeout(idle));
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(
        matches!(c.result, Err(Error::IdleTimeout)),
        "{}",
        describe(&c)
    );
    assert!(start.elapsed() >= idle);
    assert!(c.n > 0 && c.n < LEN, "partial count expected, got {}", c.n);
    let n = c.n;
    let mut got = vec![0; n];
    client.read_exact(&mut got).unwrap();
    assert!(got[..] == data[..n]);
    ledger.assert_all_done();
}

/// Reads with 0-2 ms deadlines against bytes arriving at random 0-2 ms intervals: whichever
/// wins, every read completes exactly once, and no byte is lost or duplicated.
#[test]
fn deadline_racing_the_data() {
    const BYTES: usize = 300;
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let peer = thread::spawn(move || {
        let mut rng = Rng::new(1234);
        for i in 0..BYTES {
            client.write_all(&[i as u8]).unwrap();
            thread::sleep(Duration::from_micros(rng.below(2000)));
        }
        client
    });
    let mut rng = Rng::new(4321);
    let mut got = Vec::new();
    let (mut fired, mut ok) = (0, 0);
    let start = Instant::now();
    while got.len() < BYTES {
        assert!(start.elapsed() < TIMEOUT, "stuck at {} bytes", got.len());
        let t = Duration::from_micros(rng.below(2000));
        let cmd = match rng.below(3) {
            0 => Cmd::ReadInternal,
            1 => Cmd::Read(vec![0; 4]),
            _ => Cmd::ReadFull(vec![0; 1]),
        };
        ledger.must(&conn, cmd.timeout(t));
        let c = collect_one(&watcher, TIMEOUT);
        ledger.record(&c);
        match c.result {
            Ok(()) => ok += 1,
            Err(Error::Deadline) => fired += 1,
            ref e => panic!("unexpected {e:?}"),
        }
        got.extend_from_slice(c.data());
    }
    let _client = peer.join().unwrap();
    let want: Vec<u8> = (0..BYTES).map(|i| i as u8).collect();
    assert_eq!(got, want);
    assert!(ok > 0, "no read ever succeeded");
    eprintln!("{ok} reads got data, {fired} deadlines fired");
    assert_quiet(&watcher, Duration::from_millis(20));
    ledger.assert_all_done();
}

/// A timeout too far to represent as an `Instant` means no deadline: the operation waits
/// for its data with no timer armed; `wait_io_timeout(Duration::MAX)` waits like `wait_io`.
#[test]
fn a_timeout_of_duration_max_means_no_deadline() {
    let (watcher, conn, mut client) = watcher_pair();
    conn.send(Cmd::Read(vec![0; 4]).timeout(Duration::MAX).tag(1))
        .unwrap();
    wait_stats(&watcher, "the read pending", |s| s.reads_in_flight == 1);
    assert_eq!(watcher.stats().deadlines_armed, 0);
    thread::scope(|s| {
        let writer = s.spawn(|| {
            // The scenario: the poller is blocked with no timer armed when the data lands.
            wait_until("the poller blocks", TIMEOUT, || watcher.is_asleep());
            client.write_all(b"late").unwrap();
        });
        let mut got = Vec::new();
        assert_eq!(watcher.wait_io_timeout(&mut got, Duration::MAX).unwrap(), 1);
        assert!(got[0].is_ok(), "{}", describe(&got[0]));
        assert_eq!((got[0].tag, got[0].data()), (1, &b"late"[..]));
        writer.join().unwrap();
    });
}
