//! Bounds and bad input: per-conn op limit, command queue capacity, empty buffers, sockets
//! that cannot be watched. Refusals give the command (and its buffer) back.

mod util;

use std::io::Write;
use std::time::Duration;

use proactor::bytes::Bytes;
use proactor::{Cmd, Error, Op, SendError, Watcher};
use util::*;

#[test]
fn max_ops_per_conn_refuses_with_full_and_gives_the_buffer_back() {
    let (watcher, conn, mut client) = watcher_pair_with(Watcher::builder().max_ops_per_conn(4));
    let mut ledger = Ledger::new();
    ledger.must(&conn, Cmd::Read(vec![0; 1]));
    ledger.must(&conn, Cmd::ReadInternal);
    ledger.must(&conn, Cmd::ReadFull(vec![0; 1]));
    ledger.must(&conn, Cmd::ReadInternal);

    let mut buf = Vec::with_capacity(100);
    buf.resize(10, 1);
    let ptr = buf.as_ptr();
    let err = conn.send(Cmd::Read(buf).tag(9)).unwrap_err();
    assert!(err.is_full(), "{err:?}");
    // Reads and writes share the bound.
    let cmd = err.into_inner();
    assert_eq!(cmd.op(), Op::Read);
    let v = cmd.into_buf().into_vec().unwrap();
    assert_eq!((v.as_ptr(), v.len(), v.capacity()), (ptr, 10, 100));
    let err = conn.send(Cmd::Write("w")).unwrap_err();
    assert!(matches!(err, SendError::Full(_)), "{err:?}");

    // One completion frees one slot.
    client.write_all(b"x").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(c.is_ok());
    ledger.must(&conn, Cmd::Read(v));
    assert!(conn.send(Cmd::ReadInternal).unwrap_err().is_full());

    // Free is never held back by the bound.
    ledger.must(&conn, Cmd::Free);
    let cs = collect(&watcher, 5, TIMEOUT);
    ledger.record_all(&cs);
    assert_eq!(
        cs.iter()
            .filter(|c| matches!(c.result, Err(Error::Freed)))
            .count(),
        4
    );
    assert_eq!(cs[4].op, Op::Free);
    ledger.assert_all_done();
}

#[test]
fn detach_is_never_held_back_by_the_bound() {
    let (watcher, conn, _client) = watcher_pair_with(Watcher::builder().max_ops_per_conn(1));
    let mut ledger = Ledger::new();
    ledger.must(&conn, Cmd::ReadInternal);
    assert!(conn.send(Cmd::ReadInternal).unwrap_err().is_full());
    ledger.must(&conn, Cmd::Detach);
    let cs = collect(&watcher, 2, TIMEOUT);
    ledger.record_all(&cs);
    assert!(cs[1].buf_is_fd());
    ledger.assert_all_done();
}

trait BufIsFd {
    fn buf_is_fd(&self) -> bool;
}

impl BufIsFd for proactor::Completion {
    fn buf_is_fd(&self) -> bool {
        matches!(self.buf, proactor::Buf::Fd(..))
    }
}

/// The bound is settled under the queue lock: threads racing to send on one connection get
/// exactly `max_ops_per_conn` accepted between them, not one more (no read can complete: the
/// peer sends nothing).
#[test]
fn the_bound_holds_when_threads_race_to_send() {
    const MAX: u32 = 8;
    const THREADS: usize = 4;
    let options = Watcher::builder().max_ops_per_conn(MAX);
    let (watcher, conn, _client) = watcher_pair_with(options);
    let start = std::sync::Barrier::new(THREADS);
    let accepted: usize = std::thread::scope(|s| {
        let senders: Vec<_> = (0..THREADS)
            .map(|_| {
                let (conn, start) = (conn.clone(), &start);
                s.spawn(move || {
                    start.wait();
                    (0..100)
                        .filter(|_| match conn.send(Cmd::Read(vec![0; 1])) {
                            Ok(()) => true,
                            Err(SendError::Full(_)) => false,
                            Err(e) => panic!("{e:?}"),
                        })
                        .count()
                })
            })
            .collect();
        senders.into_iter().map(|t| t.join().unwrap()).sum()
    });
    assert_eq!(accepted, MAX as usize);
    conn.send(Cmd::Free).unwrap();
    let cs = collect(&watcher, accepted + 1, TIMEOUT);
    let freed = cs.iter().filter(|c| matches!(c.result, Err(Error::Freed)));
    assert_eq!(freed.count(), accepted);
    assert_eq!(cs[accepted].op, Op::Free);
}

/// A command queue of one: a burst from one thread outruns the poller and gets `Full`; every
/// accepted command still completes exactly once.
#[test]
fn command_queue_full() {
    let options = Watcher::builder()
        .command_capacity(1)
        .max_ops_per_conn(u32::MAX);
    let (watcher, conn, _client) = watcher_pair_with(options);
    let mut ledger = Ledger::new();
    let mut full = 0;
    for _ in 0..20_000 {
        let mut buf = Vec::with_capacity(2);
        buf.resize(1, 0);
        let ptr = buf.as_ptr();
        match ledger.send(&conn, Cmd::Read(buf)) {
            Ok(_) => {}
            Err(SendError::Full(cmd)) => {
                let back = cmd.into_buf().into_vec().unwrap();
                assert_eq!(back.as_ptr(), ptr, "buffer given back");
                full += 1;
                if full == 100 {
                    break;
                }
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(full > 0, "a queue of one never filled in 20,000 sends");
    let sent = ledger.outstanding();
    // The queue drains: a Free gets through (retrying while full), and completes them all.
    let start = std::time::Instant::now();
    loop {
        match ledger.send(&conn, Cmd::Free) {
            Ok(_) => break,
            Err(SendError::Full(_)) => std::thread::yield_now(),
            Err(e) => panic!("{e:?}"),
        }
        assert!(start.elapsed() < TIMEOUT);
    }
    let cs = collect(&watcher, sent + 1, TIMEOUT);
    ledger.record_all(&cs);
    ledger.assert_all_done();
}

#[test]
fn empty_buffers_are_refused() {
    let (watcher, conn, _client) = watcher_pair();
    let v = Vec::with_capacity(128);
    let ptr = v.as_ptr();
    match conn.send(Cmd::Read(v).tag(1)) {
        Err(SendError::EmptyBuffer(cmd)) => {
            assert_eq!(cmd.op(), Op::Read);
            let v = cmd.into_buf().into_vec().unwrap();
            assert_eq!((v.as_ptr(), v.capacity()), (ptr, 128), "buffer given back");
        }
        other => panic!("empty Read: {other:?}"),
    }
    match conn.send(Cmd::ReadFull(Vec::with_capacity(16))) {
        Err(SendError::EmptyBuffer(cmd)) => assert_eq!(cmd.op(), Op::ReadFull),
        other => panic!("empty ReadFull: {other:?}"),
    }
    for w in [
        Cmd::Write(""),
        Cmd::Write(Vec::new()),
        Cmd::Write(Bytes::new()),
    ] {
        match conn.send(w) {
            Err(SendError::EmptyBuffer(cmd)) => assert_eq!(cmd.op(), Op::Write),
            other => panic!("empty Write: {other:?}"),
        }
    }
    // Refusals do not use up the per-conn bound (default 1,024).
    for _ in 0..2000 {
        assert!(matches!(
            conn.send(Cmd::Write("")),
            Err(SendError::EmptyBuffer(_))
        ));
    }
    let mut ledger = Ledger::new();
    ledger.must(&conn, Cmd::Write("ok"));
    ledger.record(&collect_one(&watcher, TIMEOUT));
    assert_quiet(&watcher, Duration::from_millis(30));
    ledger.assert_all_done();
}

#[test]
fn register_refuses_what_it_cannot_watch() {
    let watcher = Watcher::new().unwrap();
    let file = std::fs::File::open("/proc/self/status").unwrap();
    match watcher.register(file).map_err(Error::from) {
        Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOTSOCK), "{e}"),
        other => panic!("a file: {other:?}"),
    }
    // A sequenced-packet socket: neither a stream nor a datagram socket.
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new descriptors into `fds`, which we then own.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
    assert_eq!(r, 0);
    // SAFETY: both were just created and are owned by nothing else.
    let (a, _b) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    match watcher.register(a).map_err(Error::from) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}"),
        other => panic!("a seqpacket socket: {other:?}"),
    }
    // A datagram socket is watched, but it is no listener.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    match watcher.listen(udp).map_err(Error::from) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}"),
        other => panic!("listen on a datagram socket: {other:?}"),
    }
    // The watcher is unharmed.
    let (_client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    let mut ledger = Ledger::new();
    ledger.must(&conn, Cmd::Write("fine"));
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(c.is_ok());
    ledger.assert_all_done();
    wait_stats(&watcher, "one conn", |s| s.connections == 1);
}

#[test]
fn send_error_debug_does_not_dump_the_buffer() {
    let (_w, conn, _client) = watcher_pair();
    let err = conn.send(Cmd::Write("")).unwrap_err();
    assert_eq!(format!("{err:?}"), "EmptyBuffer(..)");
    assert!(!err.is_full());
}

/// Builder values past what the OS or the allocator can take are clamped, not handed to the
/// poller: `buffer_size(usize::MAX)` made the first internal read panic the poller
/// ("capacity overflow"), and an `events_capacity` past epoll's limit made every
/// `epoll_wait` fail with EINVAL, so no readiness was ever seen.
#[test]
fn out_of_range_builder_values_are_clamped() {
    for inline in [false, true] {
        let options = Watcher::builder()
            .inline(inline)
            .buffer_size(usize::MAX)
            .events_capacity(usize::MAX);
        let (watcher, conn, mut client) = watcher_pair_with(options);
        conn.send(Cmd::ReadInternal.tag(1)).unwrap();
        conn.send(Cmd::Read(vec![0; 8]).tag(2)).unwrap();
        client.write_all(b"hello").unwrap();
        let c = collect_one(&watcher, TIMEOUT);
        assert!(c.is_ok(), "inline {inline}: {}", describe(&c));
        assert_eq!((c.tag, c.data()), (1, &b"hello"[..]));
        client.write_all(b"again").unwrap();
        let c = collect_one(&watcher, TIMEOUT);
        assert_eq!((c.tag, c.data()), (2, &b"again"[..]), "inline {inline}");
    }
}
