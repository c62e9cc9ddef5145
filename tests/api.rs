//! Issue 16, items 5 to 7: the API traps. A refused registration hands the socket back;
//! `Completion::into_data` gives exactly the bytes moved, whichever kind of read; mailboxes
//! cannot be assembled from two channels; `try_wait_io` reports a closed watcher; timers
//! that mean nothing are ignored.

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use proactor::{Buf, Cmd, Error, Mailbox, Op, Pool, Watcher};
use util::*;

/// Every way a registration can be refused gives the socket back, open and usable.
#[test]
fn a_refused_registration_hands_the_socket_back() {
    // Not a socket.
    let watcher = Watcher::new().unwrap();
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let e = watcher.register(file).unwrap_err();
    assert!(matches!(e.error(), Error::Io(io) if io.raw_os_error() == Some(libc::ENOTSOCK)));
    let mut file = std::fs::File::from(e.into_socket());
    let mut text = String::new();
    file.read_to_string(&mut text).unwrap();
    assert!(text.contains("Pid:"), "the file still reads");

    // A stream given to `listen`.
    let (mut client, server) = tcp_pair();
    let e = watcher.listen(server).unwrap_err();
    assert!(matches!(e.error(), Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidInput));
    let mut server = TcpStream::from(e.into_socket());
    client.write_all(b"still connected").unwrap();
    let mut buf = [0; 15];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still connected");

    // A bounded route on an inline watcher.
    let inline = Watcher::builder().inline(true).build().unwrap();
    let (tx, _rx) = proactor::flume::bounded(1);
    let e = inline.register_with(server, tx).unwrap_err();
    let (err, fd) = e.into_parts();
    assert!(matches!(err, Error::Io(_)), "{err:?}");
    let mut server = TcpStream::from(fd);
    server.write_all(b"x").unwrap();
    client.read_exact(&mut buf[..1]).unwrap();

    // A closed watcher, through a pool too.
    watcher.close();
    let e = watcher.register(server).unwrap_err();
    assert!(matches!(e.error(), Error::WatcherClosed));
    let server = TcpStream::from(e.into_socket());
    let pool = Pool::builder().watchers(1).build().unwrap();
    pool.close();
    let e = pool.register(server).unwrap_err();
    assert!(matches!(e.error(), Error::WatcherClosed));
    let server = TcpStream::from(e.into_socket());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let e = pool.listen(listener).unwrap_err();
    let listener = TcpListener::from(e.into_socket());
    let _c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    listener.accept().unwrap();

    // Turning the error into a plain `Error` (what `?` does) closes the socket.
    let e: Error = watcher.register(server).unwrap_err().into();
    assert!(matches!(e, Error::WatcherClosed));
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(client.read(&mut buf).unwrap(), 0, "the peer sees the close");
}

/// `into_data` is exactly the bytes read for both kinds of read (the README's echo pattern
/// sent the rest of a caller's `Vec` too), and what a write wrote; the caller's `Vec` comes
/// back whole for reuse through `Buf::into_vec`.
#[test]
fn into_data_is_exactly_the_bytes_moved() {
    let watcher = Watcher::new().unwrap();
    let (mut client, server) = tcp_pair();
    let conn = watcher.register(server).unwrap();
    client.write_all(b"abc").unwrap();
    conn.send(Cmd::Read(vec![7; 16]).tag(1)).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!((c.n, c.data()), (3, &b"abc"[..]));
    let c2_buf = c.buf.into_vec().unwrap();
    assert_eq!(c2_buf.len(), 16, "the Vec comes back whole");
    assert_eq!(&c2_buf[3..], &[7; 13][..]);

    client.write_all(b"defg").unwrap();
    conn.send(Cmd::Read(c2_buf)).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(&c.into_data()[..], b"defg");

    client.write_all(b"hij").unwrap();
    conn.send(Cmd::ReadInternal).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(&c.into_data()[..], b"hij");

    conn.send(Cmd::Write("echo")).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!((c.op, &c.into_data()[..]), (Op::Write, &b"echo"[..]));
    conn.send(Cmd::Free).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(c.into_data().is_empty());
}

/// A mailbox is one channel by construction; a pool with one mailbox each has no shared
/// one to hand out.
#[test]
fn a_pool_with_a_mailbox_per_watcher_has_no_shared_mailbox() {
    let shared = Pool::builder().watchers(2).build().unwrap();
    let rx = shared.mailbox().expect("shared");
    assert!(rx.same_channel(&shared.watchers()[1].mailbox()));
    let apart = Pool::builder()
        .watchers(2)
        .per_watcher_mailboxes()
        .build()
        .unwrap();
    assert!(apart.mailbox().is_none());
    let (m0, m1) = (apart.watchers()[0].mailbox(), apart.watchers()[1].mailbox());
    assert!(!m0.same_channel(&m1));

    let mailbox = Mailbox::bounded(2);
    let w = Watcher::builder().mailbox(&mailbox).build().unwrap();
    assert!(w.mailbox().same_channel(mailbox.receiver()));
}

/// `try_wait_io` says the watcher is closed once its mailbox is drained, threaded or
/// inline, after handing over what the close completed.
#[test]
fn try_wait_io_reports_a_closed_watcher() {
    for inline in [false, true] {
        let watcher = Watcher::builder().inline(inline).build().unwrap();
        let (_client, server) = tcp_pair();
        let conn = watcher.register(server).unwrap();
        conn.send(Cmd::ReadInternal.tag(5)).unwrap();
        assert_eq!(watcher.try_wait_io(&mut Vec::new()).unwrap(), 0);
        watcher.close();
        let mut got = Vec::new();
        wait_until("the closed read", TIMEOUT, || {
            watcher.try_wait_io(&mut got).unwrap();
            !got.is_empty()
        });
        assert!(got[0].tag == 5 && matches!(got[0].result, Err(Error::WatcherClosed)));
        assert!(matches!(
            watcher.try_wait_io(&mut got),
            Err(Error::WatcherClosed)
        ));
    }
}

/// A deadline (even one already past) and an idle timeout on `Free` or `Detach` are
/// ignored: they are accepted and complete as usual.
#[test]
fn free_and_detach_ignore_deadlines_and_idle_timeouts() {
    let watcher = Watcher::new().unwrap();
    let past = Instant::now() - Duration::from_secs(1);
    for last in [Cmd::Free, Cmd::Detach] {
        let (mut client, server) = tcp_pair();
        let conn = watcher.register(server).unwrap();
        let op = last.op();
        conn.send(last.deadline(past).idle_timeout(Duration::ZERO).tag(3))
            .unwrap();
        let c = collect_one(&watcher, TIMEOUT);
        assert_eq!((c.op, c.tag), (op, 3));
        assert!(c.is_ok(), "{}", describe(&c));
        if op == Op::Detach {
            assert!(matches!(c.buf, Buf::Fd(..)));
        } else {
            client.set_read_timeout(Some(TIMEOUT)).unwrap();
            assert_eq!(client.read(&mut [0; 1]).unwrap(), 0);
        }
    }
    assert_eq!(watcher.stats().deadlines_fired, 0);
}

/// An idle timeout on `Accept` is ignored (no bytes move on a listener): the accept waits
/// for its connection, with no timer armed.
#[test]
fn an_idle_timeout_on_accept_is_ignored() {
    let watcher = Watcher::new().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let l = watcher.listen(listener).unwrap();
    l.send(Cmd::Accept.idle_timeout(Duration::from_millis(1)).tag(4))
        .unwrap();
    wait_stats(&watcher, "the accept pending", |s| s.reads_in_flight == 1);
    assert_eq!(watcher.stats().deadlines_armed, 0);
    assert_quiet(&watcher, Duration::from_millis(50));
    let _client = TcpStream::connect(addr).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!((c.op, c.tag), (Op::Accept, 4));
    assert!(c.is_ok(), "{}", describe(&c));
}

/// `idle_timeout(Duration::MAX)` is no idle timeout: nothing armed, and the read completes
/// when its data comes, as a plain read would.
#[test]
fn an_idle_timeout_of_duration_max_is_no_idle_timeout() {
    let (watcher, conn, mut client) = watcher_pair();
    conn.send(Cmd::ReadInternal.idle_timeout(Duration::MAX).tag(6))
        .unwrap();
    wait_stats(&watcher, "the read pending", |s| s.reads_in_flight == 1);
    let s = watcher.stats();
    assert_eq!((s.deadlines_armed, s.timer_entries), (0, 0));
    client.write_all(b"late").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(c.is_ok() && c.tag == 6, "{}", describe(&c));
    assert_eq!(c.data(), b"late");
}
