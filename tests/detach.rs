//! `Cmd::Detach`: pending operations complete with `Freed`, then the socket comes back as an
//! fd, deregistered and non-blocking, with unread bytes still in it.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};

use proactor::{Buf, Cmd, Error, Op, SendError, Watcher};
use util::*;

fn is_nonblocking(fd: &OwnedFd) -> bool {
    // SAFETY: F_GETFL on a live, borrowed fd; no pointers.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0);
    flags & libc::O_NONBLOCK != 0
}

#[test]
fn pending_ops_complete_freed_before_the_detach() {
    let (watcher, conn, _client) = watcher_pair();
    let mut ledger = Ledger::new();
    let r = ledger.must(&conn, Cmd::Read(vec![0; 8]));
    let rf = ledger.must(&conn, Cmd::ReadFull(vec![0; 8]).timeout(TIMEOUT * 6));
    wait_stats(&watcher, "two pending reads", |s| s.reads_in_flight == 2);
    let d = ledger.must(&conn, Cmd::Detach.tag(0)); // the ledger's tag wins
    assert!(conn.is_freed());
    let cs = collect(&watcher, 3, TIMEOUT);
    ledger.record_all(&cs);
    let order: Vec<u64> = cs.iter().map(|c| c.tag).collect();
    assert_eq!(order, [r, rf, d]);
    for c in &cs[..2] {
        assert!(matches!(c.result, Err(Error::Freed)), "{}", describe(c));
        assert_eq!(c.buf.as_slice().len(), 8);
    }
    assert_eq!(cs[2].op, Op::Detach);
    assert!(cs[2].is_ok());
    assert!(matches!(cs[2].buf, Buf::Fd(..)), "{}", describe(&cs[2]));
    assert!(matches!(
        conn.send(Cmd::ReadInternal),
        Err(SendError::Freed(_))
    ));
    wait_stats(&watcher, "conn gone", |s| {
        s.connections == 0 && s.reads_in_flight == 0 && s.deadlines_armed == 0
    });
    ledger.assert_all_done();
}

/// Detach from watcher 1 with traffic in both directions in flight; register the fd on
/// watcher 2; the stream continues exactly where it was.
#[test]
fn detach_then_register_on_a_second_watcher_with_data_in_flight() {
    const BIG: usize = 16 * 1024 * 1024;
    let w1 = Watcher::new().unwrap();
    let w2 = Watcher::new().unwrap();
    let (mut client, server) = tcp_pair();
    let conn = w1.register(server).unwrap();
    let (mut l1, mut l2) = (Ledger::new(), Ledger::new());

    // Bytes from the peer that nobody on watcher 1 reads...
    client.write_all(b"sent before the detach;").unwrap();
    // ...and a write to the peer, stuck half way because the peer is not reading.
    let big = Rng::new(2).bytes(BIG);
    let w = l1.must(&conn, Cmd::Write(big.clone()));
    wait_stats(&w1, "a stuck write", |s| {
        s.writes_in_flight == 1 && s.bytes_written > 0
    });
    l1.must(&conn, Cmd::Detach);
    let cs = collect(&w1, 2, TIMEOUT);
    l1.record_all(&cs);
    l1.assert_all_done();
    let mut cs = cs.into_iter();
    let wc = cs.next().unwrap();
    assert_eq!(wc.tag, w);
    assert!(matches!(wc.result, Err(Error::Freed)), "{}", describe(&wc));
    let written = wc.n;
    assert!(written > 0 && written < BIG);
    let fd = cs.next().unwrap().buf.into_fd().expect("the detached fd");
    assert!(is_nonblocking(&fd));
    drop(conn);
    wait_stats(&w1, "w1 has no conns", |s| s.connections == 0);

    client.write_all(b" and after it").unwrap();
    let conn2 = w2.register(fd).unwrap();
    let want = b"sent before the detach; and after it";
    l2.must(&conn2, Cmd::ReadFull(vec![0; want.len()]));
    let c = collect_one(&w2, TIMEOUT);
    l2.record(&c);
    assert!(c.is_ok(), "{}", describe(&c));
    assert_eq!(c.data(), want);

    // The other direction: the peer gets the first `written` bytes of the big write, then
    // what watcher 2 writes, nothing in between.
    l2.must(&conn2, Cmd::Write("from w2"));
    let mut got = vec![0; written + 7];
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.read_exact(&mut got).unwrap();
    assert!(got[..written] == big[..written]);
    assert_eq!(&got[written..], b"from w2");
    l2.record(&collect_one(&w2, TIMEOUT));

    // Watcher 1 heard nothing more about the socket.
    assert_quiet(&w1, std::time::Duration::from_millis(30));
    l2.must(&conn2, Cmd::Free);
    l2.record(&collect_one(&w2, TIMEOUT));
    assert_eq!(read_to_eof(&mut client), b"");
    l2.assert_all_done();
}

#[test]
fn detach_and_register_again_on_the_same_watcher() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let old_id = conn.id();
    let d = ledger.must(&conn, Cmd::Detach);
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.op, c.tag), (Op::Detach, d));
    let fd = c.buf.into_fd().unwrap();
    client.write_all(b"again").unwrap();
    let conn = watcher.register(fd).unwrap();
    assert_ne!(conn.id(), old_id);
    let r = ledger.must(&conn, Cmd::ReadFull(vec![0; 5]));
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.tag, c.data()), (r, &b"again"[..]));
    ledger.assert_all_done();
}

/// A detached fd nobody registers again is closed when dropped: no leak, peer sees EOF.
#[test]
fn dropping_the_detached_fd_closes_the_socket() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    ledger.must(&conn, Cmd::Detach);
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    ledger.assert_all_done();
    let fd = c.buf.into_fd().unwrap();
    // It is a live socket: usable with std directly.
    let mut s = TcpStream::from(fd);
    s.set_nonblocking(false).unwrap();
    s.write_all(b"direct").unwrap();
    let mut got = [0; 6];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"direct");
    drop(s);
    assert_eq!(read_to_eof(&mut client), b"");
}

/// Bytes the watcher took from the socket that no read consumed (the start of a frame a
/// `ReadFrame` waits to complete) come back with the fd, before what is still in the
/// socket: nothing is lost, nothing is read twice.
#[test]
fn detach_hands_back_the_start_of_a_frame_with_the_socket() {
    let (watcher, conn, mut client) = watcher_pair();
    let mut ledger = Ledger::new();
    let r = ledger.must(&conn, Cmd::ReadFrame(proactor::Framing::lines(64)));
    client.write_all(b"half a ").unwrap();
    wait_stats(&watcher, "the half line read", |s| s.bytes_read == 7);
    let d = ledger.must(&conn, Cmd::Detach);
    let cs = collect(&watcher, 2, TIMEOUT);
    ledger.record_all(&cs);
    ledger.assert_all_done();
    assert_eq!((cs[0].tag, cs[1].tag), (r, d));
    assert!(
        matches!(cs[0].result, Err(Error::Freed)),
        "{}",
        describe(&cs[0])
    );
    assert_eq!((cs[1].n, cs[1].data()), (7, &b"half a "[..]));
    let (fd, unread) = cs.into_iter().nth(1).unwrap().buf.into_detached().unwrap();
    assert_eq!(&unread[..], b"half a ");
    client.write_all(b"line\n").unwrap();
    let mut stream = TcpStream::from(fd);
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut rest = [0u8; 5];
    stream.read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"line\n");
}

/// With nothing kept, the detached socket comes back with no bytes.
#[test]
fn detach_without_a_frame_begun_hands_back_no_bytes() {
    let (watcher, conn, _client) = watcher_pair();
    conn.send(Cmd::Detach).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(
        c.is_ok() && c.n == 0 && c.data().is_empty(),
        "{}",
        describe(&c)
    );
    let (_fd, unread) = c.buf.into_detached().unwrap();
    assert!(unread.is_empty());
}
