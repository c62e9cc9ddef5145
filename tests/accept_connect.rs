//! Accept and connect as commands (issue 4): happy paths, refusal, deadlines, the EMFILE
//! policy, freeing and closing with accepts pending, 8,000 outgoing connections, SO_REUSEPORT.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use proactor::{Cmd, Completion, Connect, Error, Op, Watcher};

#[path = "common/limits.rs"]
mod limits;
#[path = "common/sockopt.rs"]
mod sockopt;

const LONG: Duration = Duration::from_secs(10);

/// Waits for exactly `n` completions (or panics, naming what did arrive).
fn take(w: &Watcher, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + LONG;
    let mut got = Vec::new();
    while got.len() < n {
        let k = w
            .wait_io_deadline(&mut got, deadline)
            .expect("watcher open");
        if k == 0 {
            let ops: Vec<_> = got.iter().map(|c| (c.op, c.tag)).collect();
            panic!("timed out: {} of {n} completions: {ops:?}", got.len());
        }
    }
    assert_eq!(got.len(), n, "more completions than expected");
    got
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[test]
fn accept_completes_with_registered_conn_and_peer() {
    let w = Watcher::new().unwrap();
    let std_listener = TcpListener::bind(localhost()).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let listener = w.listen(std_listener).unwrap();
    for tag in 1..=3 {
        listener.send(Cmd::Accept.tag(tag)).unwrap();
    }
    let mut clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut by_peer = HashMap::new();
    let mut tags = Vec::new();
    for c in take(&w, 3) {
        assert_eq!(c.op, Op::Accept);
        assert!(c.is_ok(), "{:?}", c.result);
        assert_eq!(c.conn, listener);
        tags.push(c.tag);
        let (conn, peer) = c.buf.into_accepted().expect("accepted conn");
        by_peer.insert(peer.expect("tcp peer address"), conn);
    }
    assert_eq!(
        tags,
        vec![1, 2, 3],
        "accepts complete in the order submitted"
    );
    // Each accepted conn is live on this watcher and belongs to the client with that address.
    for (i, client) in clients.iter_mut().enumerate() {
        let conn = &by_peer[&client.local_addr().unwrap()];
        conn.send(Cmd::Write(format!("hi {i}"))).unwrap();
        assert!(take(&w, 1)[0].is_ok());
        let mut buf = [0; 4];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, format!("hi {i}").as_bytes());
    }
}

#[test]
fn connect_completes_and_queued_writes_wait_for_it() {
    let w = Watcher::new().unwrap();
    let server = TcpListener::bind(localhost()).unwrap();
    let conn = w
        .connect(Connect::new(server.local_addr().unwrap()).tag(9))
        .unwrap();
    // Sent before the connection is up: it waits behind the connect in the write FIFO.
    conn.send(Cmd::Write("early").tag(10)).unwrap();
    // A read sent as early waits for the connect too, then for data.
    conn.send(Cmd::Read(vec![0; 8]).tag(11)).unwrap();
    let (mut peer, _) = server.accept().unwrap();
    let done = take(&w, 2);
    assert_eq!((done[0].op, done[0].tag), (Op::Connect, 9));
    assert!(done[0].is_ok(), "{:?}", done[0].result);
    assert_eq!((done[1].op, done[1].tag, done[1].n), (Op::Write, 10, 5));
    let mut buf = [0; 5];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"early");
    peer.write_all(b"late").unwrap();
    let read = take(&w, 1).pop().unwrap();
    assert_eq!((read.op, read.tag), (Op::Read, 11));
    assert!(read.is_ok(), "{:?}", read.result);
    assert_eq!(read.data(), b"late");
}

#[test]
fn connect_refused_is_a_clear_error() {
    let w = Watcher::new().unwrap();
    let addr = TcpListener::bind(localhost())
        .unwrap()
        .local_addr()
        .unwrap(); // closed again
    match w.connect(addr) {
        // Linux usually reports the refusal asynchronously...
        Ok(_conn) => {
            let c = &take(&w, 1)[0];
            assert_eq!(c.op, Op::Connect);
            match &c.result {
                Err(Error::Io(e)) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
                other => panic!("expected ECONNREFUSED, got {other:?}"),
            }
        }
        // ...but may refuse on the spot, with no completion.
        Err(Error::Io(e)) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
        Err(e) => panic!("unexpected {e}"),
    }
}

/// A refused connect with a read and a write sent right away, as `connect` allows: the
/// connect learns the refusal, and the read and the write complete after it. (The read
/// used to run first, take the socket's error, and leave the connect and the write pending
/// for good.) Both modes, internal and caller-buffer reads.
#[test]
fn a_refused_connect_with_io_queued_completes_everything() {
    for (inline, internal) in [(false, false), (false, true), (true, false), (true, true)] {
        let w = Watcher::builder().inline(inline).build().unwrap();
        let addr = TcpListener::bind(localhost())
            .unwrap()
            .local_addr()
            .unwrap(); // closed again
        let Ok(conn) = w.connect(Connect::new(addr).tag(1)) else {
            continue; // refused on the spot: nothing was queued
        };
        let read = if internal {
            Cmd::ReadInternal
        } else {
            Cmd::Read(vec![0; 16])
        };
        conn.send(read.tag(2)).unwrap();
        conn.send(Cmd::Write("x").tag(3)).unwrap();
        let got = take(&w, 3);
        let seen: Vec<_> = got.iter().map(|c| (c.op, c.tag)).collect();
        let what = format!("inline {inline}, internal {internal}: {seen:?}");
        assert_eq!(seen[0], (Op::Connect, 1), "{what}");
        match &got[0].result {
            Err(Error::Io(e)) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{what}"),
            other => panic!("{what}: expected ECONNREFUSED, got {other:?}"),
        }
        assert!(got[1..].iter().all(|c| c.result.is_err()), "{what}");
        assert_eq!(
            w.stats().reads_in_flight + w.stats().writes_in_flight,
            0,
            "{what}"
        );
    }
}

/// An operation that cannot succeed on its socket fails at once with the OS's error, even
/// when the socket is not readable: an `Accept` on a stream whose reads drained it, a read
/// on a listener whose last accept saw `EAGAIN`. Both used to wait for readiness that a
/// silent peer (or no new client) never brings.
#[test]
fn misdirected_operations_fail_at_once() {
    for inline in [false, true] {
        let w = Watcher::builder().inline(inline).build().unwrap();
        // A stream: a short read clears its readiness, then an Accept.
        let std_listener = TcpListener::bind(localhost()).unwrap();
        let mut peer = TcpStream::connect(std_listener.local_addr().unwrap()).unwrap();
        let stream = w.register(std_listener.accept().unwrap().0).unwrap();
        // The read finds nothing at first (EAGAIN: the socket proved drained; the stats say
        // the poller has tried it), then takes what arrives with a short read, which
        // leaves the stream not readable.
        stream.send(Cmd::Read(vec![0; 64]).tag(1)).unwrap();
        let deadline = Instant::now() + LONG;
        while w.stats().reads_in_flight != 1 {
            assert!(w.try_wait_io(&mut Vec::new()).unwrap() == 0 && Instant::now() < deadline);
            std::thread::yield_now();
        }
        peer.write_all(b"hi").unwrap();
        let c = take(&w, 1).pop().unwrap();
        assert_eq!((c.tag, c.data()), (1, &b"hi"[..]));
        stream.send(Cmd::Accept.tag(2)).unwrap();
        let c = take(&w, 1).pop().unwrap();
        assert_eq!((c.op, c.tag), (Op::Accept, 2), "inline {inline}");
        match &c.result {
            Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("inline {inline}: expected EINVAL, got {other:?}"),
        }
        // A listener: an accept that waits in vain, then a read.
        let listener = w.listen(TcpListener::bind(localhost()).unwrap()).unwrap();
        listener
            .send(Cmd::Accept.timeout(Duration::from_millis(20)).tag(3))
            .unwrap();
        let c = take(&w, 1).pop().unwrap();
        assert!(matches!(c.result, Err(Error::Deadline)), "{:?}", c.result);
        listener.send(Cmd::Read(vec![0; 8]).tag(4)).unwrap();
        let c = take(&w, 1).pop().unwrap();
        assert_eq!((c.op, c.tag), (Op::Read, 4), "inline {inline}");
        match &c.result {
            Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN)),
            other => panic!("inline {inline}: expected ENOTCONN, got {other:?}"),
        }
    }
}

/// A listener with backlog 0 whose accept queue is already full: Linux drops further SYNs,
/// so a connect to it hangs, retransmitting, until its deadline.
fn blackhole() -> (OwnedFd, SocketAddr, Vec<TcpStream>) {
    let std_listener = TcpListener::bind(localhost()).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let fd = OwnedFd::from(std_listener);
    // SAFETY: a valid listening socket; listen() again just changes the backlog.
    assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 0) }, 0);
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => return (fd, addr, fillers),
        }
    }
    panic!("could not fill the accept queue of a backlog-0 listener");
}

#[test]
fn connect_deadline_on_a_blackholed_listener() {
    let (_listener, addr, _fillers) = blackhole();
    let w = Watcher::new().unwrap();
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let conn = w
        .connect(Connect::new(addr).timeout(timeout).tag(4))
        .unwrap();
    let c = &take(&w, 1)[0];
    let elapsed = start.elapsed();
    assert_eq!((c.op, c.tag), (Op::Connect, 4));
    assert!(matches!(c.result, Err(Error::Deadline)), "{:?}", c.result);
    assert!(elapsed >= timeout, "fired early: {elapsed:?}");
    assert!(
        elapsed < timeout + Duration::from_secs(3),
        "fired late: {elapsed:?}"
    );
    conn.send(Cmd::Free).unwrap();
    assert_eq!(take(&w, 1)[0].op, Op::Free);
}

#[test]
fn free_listener_with_accepts_pending() {
    let w = Watcher::new().unwrap();
    let std_listener = TcpListener::bind(localhost()).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let listener = w.listen(std_listener).unwrap();
    listener.send(Cmd::Accept.tag(1)).unwrap();
    listener.send(Cmd::Accept.tag(2)).unwrap();
    listener.send(Cmd::Free.tag(3)).unwrap();
    let done = take(&w, 3);
    let summary: Vec<_> = done
        .iter()
        .map(|c| (c.op, c.tag, c.result.is_ok()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (Op::Accept, 1, false),
            (Op::Accept, 2, false),
            (Op::Free, 3, true)
        ]
    );
    assert!(done[..2]
        .iter()
        .all(|c| matches!(c.result, Err(Error::Freed))));
    // The listening socket is closed.
    let err = TcpStream::connect(addr).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert!(matches!(
        listener.send(Cmd::Accept),
        Err(proactor::SendError::Freed(_))
    ));
}

#[test]
fn close_watcher_with_accepts_pending() {
    let w = Watcher::new().unwrap();
    let listener = w.listen(TcpListener::bind(localhost()).unwrap()).unwrap();
    for tag in 0..4 {
        listener.send(Cmd::Accept.tag(tag)).unwrap();
    }
    let mailbox = w.mailbox();
    w.close();
    let done: Vec<_> = mailbox.try_iter().collect();
    assert_eq!(done.len(), 4);
    for (i, c) in done.iter().enumerate() {
        assert_eq!((c.op, c.tag), (Op::Accept, i as u64));
        assert!(
            matches!(c.result, Err(Error::WatcherClosed)),
            "{:?}",
            c.result
        );
    }
}

#[test]
fn listen_refuses_a_socket_that_is_not_listening_and_accept_on_a_stream_fails() {
    let w = Watcher::new().unwrap();
    let server = TcpListener::bind(localhost()).unwrap();
    let client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
    match w.listen(client.try_clone().unwrap()).map_err(Error::from) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), ErrorKind::InvalidInput),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let conn = w.register(client).unwrap();
    conn.send(Cmd::Accept.tag(5)).unwrap();
    let c = &take(&w, 1)[0];
    match &c.result {
        Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
        other => panic!("expected EINVAL, got {other:?}"),
    }
}

#[test]
fn unix_listener_accepts_without_a_peer_address() {
    let dir = std::env::temp_dir().join(format!("proactor-accept-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let std_listener = std::os::unix::net::UnixListener::bind(&dir).unwrap();
    let w = Watcher::new().unwrap();
    let listener = w.listen(std_listener).unwrap();
    listener.send(Cmd::Accept).unwrap();
    let mut client = std::os::unix::net::UnixStream::connect(&dir).unwrap();
    let c = take(&w, 1).pop().unwrap();
    let (conn, peer) = c.buf.into_accepted().unwrap();
    assert_eq!(peer, None);
    conn.send(Cmd::Write("unix")).unwrap();
    assert!(take(&w, 1)[0].is_ok());
    let mut buf = [0; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"unix");
    std::fs::remove_file(&dir).unwrap();
}

#[test]
fn eight_thousand_outgoing_connections_from_one_thread() {
    const N: usize = 8000;
    limits::raise_fd_limit(); // 16,000 descriptors
    let server = proactor::reuseport_listener(localhost()).unwrap();
    let addr = server.local_addr().unwrap();
    // The peer side: a plain thread that accepts and holds every connection.
    let acceptor = std::thread::spawn(move || {
        let mut held = Vec::with_capacity(N);
        while held.len() < N {
            held.push(server.accept().unwrap().0);
        }
        held
    });
    let w = Watcher::new().unwrap();
    let mut conns = Vec::with_capacity(N);
    let mut ok = 0;
    // Waves of 1,000 keep the listen backlog from overflowing (a dropped SYN costs 1 s).
    for wave in 0..N / 1000 {
        for i in 0..1000 {
            let tag = (wave * 1000 + i) as u64;
            conns.push(w.connect(Connect::new(addr).tag(tag)).unwrap());
        }
        for c in take(&w, 1000) {
            assert_eq!(c.op, Op::Connect);
            assert!(c.is_ok(), "connect {} failed: {:?}", c.tag, c.result);
            ok += 1;
        }
    }
    assert_eq!(ok, N);
    assert_eq!(w.stats().connections as usize, N);
    let held = acceptor.join().unwrap();
    assert_eq!(held.len(), N);
    for conn in &conns {
        conn.send(Cmd::Free).unwrap();
    }
    assert!(take(&w, N).iter().all(|c| c.op == Op::Free && c.is_ok()));
}

#[test]
fn reuseport_listeners_share_a_port_and_both_accept() {
    let first = proactor::reuseport_listener(localhost()).unwrap();
    let addr = first.local_addr().unwrap();
    let second = proactor::reuseport_listener(addr).unwrap();
    assert_eq!(second.local_addr().unwrap(), addr);
    let (w1, w2) = (Watcher::new().unwrap(), Watcher::new().unwrap());
    let (l1, l2) = (w1.listen(first).unwrap(), w2.listen(second).unwrap());
    const N: usize = 64;
    for _ in 0..N {
        l1.send(Cmd::Accept).unwrap();
        l2.send(Cmd::Accept).unwrap();
    }
    let clients: Vec<_> = (0..N).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + LONG;
    while a.len() + b.len() < N && Instant::now() < deadline {
        w1.wait_io_timeout(&mut a, Duration::from_millis(20))
            .unwrap();
        w2.wait_io_timeout(&mut b, Duration::from_millis(20))
            .unwrap();
    }
    assert_eq!(a.len() + b.len(), N);
    assert!(a.iter().chain(&b).all(|c| c.op == Op::Accept && c.is_ok()));
    // Linux spreads by a hash of the 4-tuple: 64 connections all on one side is 2^-63.
    assert!(
        !a.is_empty() && !b.is_empty(),
        "split {} / {}",
        a.len(),
        b.len()
    );
    drop(clients);
}

/// Lowers this (child) process's descriptor limit to 64.
fn limit_fds_to_64() {
    let limit = libc::rlimit {
        rlim_cur: 64,
        rlim_max: 64,
    };
    // SAFETY: a valid rlimit; lowering our own soft and hard limit is always allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

/// Takes every descriptor left (duplicates of stdin), so the next accept gets EMFILE.
fn hog_every_fd() -> Vec<OwnedFd> {
    let mut hog = Vec::new();
    loop {
        // SAFETY: plain dup of stdin; the result is owned below.
        let fd = unsafe { libc::dup(0) };
        if fd < 0 {
            return hog;
        }
        // SAFETY: `fd` was just returned by dup and is owned by nothing else.
        hog.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Two accepts in one round, the first taking the last free descriptor and the second
/// failing with EMFILE: they complete in the order they were sent. (A failed accept used
/// to complete at once, ahead of the successful one registered after the round's reads.)
#[test]
fn accepts_complete_in_order_when_one_fails() {
    limits::in_child("accepts_complete_in_order_when_one_fails", || {
        limit_fds_to_64();
        // Inline, so both accepts run in the same round, after both clients connected.
        let w = Watcher::builder().inline(true).build().unwrap();
        let std_listener = TcpListener::bind(localhost()).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = w.listen(std_listener).unwrap();
        let _clients = [
            TcpStream::connect(addr).unwrap(),
            TcpStream::connect(addr).unwrap(),
        ];
        let mut hog = hog_every_fd();
        hog.pop(); // one descriptor left: for the first accept
        listener.send(Cmd::Accept.tag(1)).unwrap();
        listener.send(Cmd::Accept.tag(2)).unwrap();
        let cs = take(&w, 2);
        drop(hog);
        assert_eq!((cs[0].tag, cs[1].tag), (1, 2), "out of order");
        assert!(cs[0].is_ok(), "{:?}", cs[0].result);
        match &cs[1].result {
            Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EMFILE)),
            other => panic!("expected EMFILE, got {other:?}"),
        }
    });
}

/// The readiness event of the connection that made a listener readable can be collected
/// after an accept already failed for lack of descriptors: it must not end the pause.
/// (It did, and started a second chain of attempts: the failures came in pairs, 1 to 3 ms
/// apart, every 100 ms, which `emfile_completes_the_accept_pauses_and_recovers` caught now
/// and then under load.) An inline watcher makes the order certain: the first step tries
/// the accept before it ever polls.
#[test]
fn a_late_readiness_event_does_not_end_an_accept_pause() {
    limits::in_child(
        "a_late_readiness_event_does_not_end_an_accept_pause",
        || {
            limit_fds_to_64();
            let w = Watcher::builder().inline(true).build().unwrap();
            let std_listener = TcpListener::bind(localhost()).unwrap();
            let addr = std_listener.local_addr().unwrap();
            let listener = w.listen(std_listener).unwrap();
            let _client = TcpStream::connect(addr).unwrap(); // its event waits in epoll
            let hog = hog_every_fd();
            listener.send(Cmd::Accept.tag(1)).unwrap();
            let mut got = Vec::new();
            // The pause is timed from the failure, inside this call: the wait below ends
            // before the pause would, however late this thread gets to it.
            let t0 = Instant::now();
            assert_eq!(
                w.try_wait_io(&mut got).unwrap(),
                1,
                "the first step tries the accept"
            );
            match &got[0].result {
                Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EMFILE)),
                other => panic!("expected EMFILE, got {other:?}"),
            }
            // The next step collects the event; the pause (100 ms) must hold.
            listener.send(Cmd::Accept.tag(2)).unwrap();
            got.clear();
            let n = w
                .wait_io_deadline(&mut got, t0 + Duration::from_millis(90))
                .unwrap();
            let seen: Vec<_> = got.iter().map(|c| (c.tag, c.result.is_ok())).collect();
            assert_eq!(n, 0, "an accept ran during the pause: {seen:?}");
            drop(hog);
        },
    );
}

#[test]
fn emfile_completes_the_accept_pauses_and_recovers() {
    limits::in_child("emfile_completes_the_accept_pauses_and_recovers", || {
        limit_fds_to_64();
        let w = Watcher::new().unwrap();
        let std_listener = TcpListener::bind(localhost()).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = w.listen(std_listener).unwrap();
        // The client socket, then use up every descriptor left.
        let client = TcpStream::connect(addr).unwrap();
        let hog = hog_every_fd();
        listener.send(Cmd::Accept.tag(1)).unwrap();
        let c = &take(&w, 1)[0];
        match &c.result {
            Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EMFILE)),
            other => panic!("expected EMFILE, got {other:?}"),
        }
        // A naive user resubmits at once after each failure: the listener's 100 ms pause
        // still keeps the poller from spinning while descriptors stay exhausted.
        let wakeups = w.stats().wakeups;
        let window = Instant::now() + Duration::from_millis(500);
        let mut failures = 0;
        listener.send(Cmd::Accept.tag(2)).unwrap();
        let mut during = Vec::new();
        while w.wait_io_deadline(&mut during, window).unwrap() > 0 {
            for c in during.drain(..) {
                match &c.result {
                    Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EMFILE)),
                    other => panic!("expected EMFILE while exhausted, got {other:?}"),
                }
                failures += 1;
                listener.send(Cmd::Accept.tag(2)).unwrap();
            }
        }
        let spent = w.stats().wakeups - wakeups;
        assert!(
            failures <= 6,
            "{failures} accept failures in 500 ms: not pausing"
        );
        assert!(spent < 50, "poller woke {spent} times in 500 ms: spinning");
        // Free descriptors: the accept still pending succeeds and the client is served.
        drop(hog);
        let c = take(&w, 1).pop().unwrap();
        assert!(c.is_ok(), "{:?}", c.result);
        let (conn, peer) = c.buf.into_accepted().unwrap();
        assert_eq!(peer, Some(client.local_addr().unwrap()));
        conn.send(Cmd::Write("ok")).unwrap();
        assert!(take(&w, 1)[0].is_ok());
        let mut buf = [0; 2];
        (&client).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ok");
    });
}

/// The backlog a listening socket was given, capped by the kernel: Linux reports it for a
/// listener as `tcpi_sacked` of `TCP_INFO` (`sk_max_ack_backlog`).
fn listen_backlog(listener: &TcpListener) -> u32 {
    // SAFETY: all-zero is a valid tcp_info (plain integers).
    let zero: libc::tcp_info = unsafe { std::mem::zeroed() };
    sockopt::get_opt(listener, libc::IPPROTO_TCP, libc::TCP_INFO, zero).tcpi_sacked
}

#[test]
fn tcp_listener_listens_with_a_backlog_fit_for_bursts() {
    let somaxconn = limits::somaxconn();
    // The control: std listens with 128, which a burst of connects overflows.
    let std_listener = TcpListener::bind(localhost()).unwrap();
    assert_eq!(listen_backlog(&std_listener), somaxconn.min(128));
    let ours = proactor::tcp_listener("127.0.0.1:0").unwrap();
    assert_eq!(listen_backlog(&ours), somaxconn.min(4096));
    let shared = proactor::reuseport_listener(localhost()).unwrap();
    assert_eq!(listen_backlog(&shared), somaxconn.min(4096));

    // Without SO_REUSEPORT the port is its own; a name resolves as for std.
    let addr = ours.local_addr().unwrap();
    let again = proactor::tcp_listener(addr).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::AddrInUse, "{again}");
    let named = proactor::tcp_listener("localhost:0").unwrap();
    assert!(named.local_addr().unwrap().ip().is_loopback());
    let none: &[SocketAddr] = &[];
    let nowhere = proactor::tcp_listener(none).unwrap_err();
    assert_eq!(nowhere.kind(), ErrorKind::InvalidInput, "{nowhere}");

    // And it serves like any listener.
    let w = Watcher::new().unwrap();
    let l = w.listen(ours).unwrap();
    l.send(Cmd::Accept).unwrap();
    let _client = TcpStream::connect(addr).unwrap();
    let c = take(&w, 1).pop().unwrap();
    assert!(c.op == Op::Accept && c.is_ok(), "{:?}", c.result);
}
