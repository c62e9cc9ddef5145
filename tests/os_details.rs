//! OS details the issue names: descriptors the library creates or accepts are close-on-exec,
//! and EINTR (a signal landing while the poller sits in `epoll_wait`) is retried, not an error.
//! Also two ways a socket could block the poller thread: a lingering close, and a `dup` of
//! it switched back to blocking mode.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proactor::{Cmd, Connect, Error, Op, Watcher};
use util::*;

/// Both tests open and close descriptors; the fd census below must not see the other's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cloexec(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on a descriptor number only reads its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    assert!(flags >= 0, "fcntl(F_GETFD) on {fd}");
    flags & libc::FD_CLOEXEC != 0
}

/// The socket behind a conn, handed back by `Detach`.
fn detach(watcher: &Watcher, conn: &proactor::Conn) -> std::os::fd::OwnedFd {
    conn.send(Cmd::Detach).unwrap();
    let c = collect_one(watcher, TIMEOUT);
    assert_eq!(c.op, Op::Detach);
    c.buf.into_fd().expect("detached fd")
}

#[test]
fn accepted_and_connected_sockets_and_the_pollers_own_fds_are_close_on_exec() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let before = open_fds();
    let watcher = Watcher::new().unwrap();
    // The epoll instance (or the io_uring ring) and the eventfd the watcher just made.
    let mut own = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let fd: RawFd = entry.file_name().to_string_lossy().parse().unwrap();
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let t = target.to_string_lossy().into_owned();
        let is_new = before.get(&fd) != Some(&t);
        let kinds = ["eventpoll", "eventfd", "[io_uring]"];
        if kinds.iter().any(|k| t.contains(k)) && is_new {
            assert!(cloexec(fd), "{t} (fd {fd}) is not close-on-exec");
            own += 1;
        }
    }
    assert!(
        own >= 2,
        "found {own} of the watcher's epoll or io_uring and eventfd descriptors"
    );

    let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    let listener = watcher.listen(std_listener).unwrap();
    listener.send(Cmd::Accept).unwrap();
    let _client = std::net::TcpStream::connect(addr).unwrap();
    let (accepted, _) = collect_one(&watcher, TIMEOUT).buf.into_accepted().unwrap();
    assert!(
        cloexec(detach(&watcher, &accepted).as_raw_fd()),
        "accepted socket"
    );

    let connected = watcher.connect(Connect::new(addr)).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
    assert!(
        cloexec(detach(&watcher, &connected).as_raw_fd()),
        "connected socket"
    );
}

/// The descriptors open now and what each links to. A descriptor is new if its number was
/// not open or linked elsewhere: every epoll instance links to the same text, and the number
/// of the directory handle that lists them is free again right after.
fn open_fds() -> std::collections::HashMap<RawFd, String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_string_lossy().parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            Some((fd, link.to_string_lossy().into_owned()))
        })
        .collect()
}

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn signals_interrupting_the_poller_are_retried() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // A handler without SA_RESTART: epoll_wait returns EINTR each time one lands on the
    // thread inside it. An inline watcher runs the poller on this thread, so we can aim.
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; the handler
    // only touches an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let (watcher, conn, mut client) = watcher_pair_with(Watcher::builder().inline(true));
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let pest = s.spawn(|| {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < TIMEOUT {
                // SAFETY: `me` is the test thread, alive until after this thread is joined.
                unsafe { libc::pthread_kill(me, libc::SIGUSR1) };
                std::thread::sleep(Duration::from_micros(200)); // pacing the signals
            }
        });
        // A deadline far enough out that many signals land while we wait for it.
        let start = Instant::now();
        conn.send(Cmd::ReadInternal.timeout(Duration::from_millis(200)).tag(1))
            .unwrap();
        let c = collect_one(&watcher, TIMEOUT);
        assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
        assert!(start.elapsed() >= Duration::from_millis(200));
        // And an echo under fire.
        for i in 0..50u8 {
            client.write_all(&[i]).unwrap();
            conn.send(Cmd::ReadInternal).unwrap();
            let c = collect_one(&watcher, TIMEOUT);
            assert_eq!(c.data(), [i], "{}", describe(&c));
            conn.send(Cmd::Write(c.buf.into_bytes())).unwrap();
            assert!(collect_one(&watcher, TIMEOUT).is_ok());
            let mut b = [0; 1];
            client.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i);
        }
        stop.store(true, Ordering::Relaxed);
        pest.join().unwrap();
    });
    assert!(
        SIGNALS.load(Ordering::Relaxed) > 50,
        "too few signals landed to mean anything"
    );
}

fn refused_as_invalid(r: Result<proactor::Conn, Error>) -> bool {
    matches!(r, Err(Error::Io(e)) if e.kind() == ErrorKind::InvalidInput)
}

/// With SO_LINGER and a timeout, close(2) blocks until the unsent data is acknowledged or the
/// timeout passes (socket(7)); sockets are closed on the poller thread, where that would stall
/// every connection of the watcher, so they are refused (listeners too: accepted sockets
/// inherit the option). A zero timeout, a close with a reset, never blocks and is kept.
#[test]
fn sockets_that_would_linger_on_close_are_refused() {
    let watcher = Watcher::new().unwrap();
    let (_client, server) = tcp_pair();
    set_linger(&server, 2);
    assert!(refused_as_invalid(
        watcher.register(server).map_err(Error::from)
    ));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    set_linger(&listener, 2);
    assert!(refused_as_invalid(
        watcher.listen(listener).map_err(Error::from)
    ));

    // A zero timeout: registered, and Free resets the connection at once.
    let (mut client, server) = tcp_pair();
    set_linger(&server, 0);
    let conn = watcher.register(server).unwrap();
    conn.send(Cmd::Free).unwrap();
    assert_eq!(collect_one(&watcher, TIMEOUT).op, Op::Free);
    let err = client.read(&mut [0u8; 1]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
}

/// O_NONBLOCK belongs to the open file description, which every `dup` of the fd shares: a
/// holder of a duplicate (a forked child, a library) can switch it off again. Each recv and
/// send also says MSG_DONTWAIT, so the poller still never blocks in one.
#[test]
fn a_duplicate_switched_to_blocking_cannot_block_the_poller() {
    let watcher = Watcher::new().unwrap();
    let (mut quiet_peer, quiet) = tcp_pair();
    let dup = quiet.try_clone().unwrap();
    let quiet = watcher.register(quiet).unwrap();
    dup.set_nonblocking(false).unwrap(); // the registered socket is blocking again
    let (mut other_peer, other) = tcp_pair();
    let other = watcher.register(other).unwrap();
    // Nothing to read: a blocking recv would hold the poller thread here.
    quiet.send(Cmd::ReadInternal.tag(1)).unwrap();
    other.send(Cmd::ReadInternal.tag(2)).unwrap();
    other_peer.write_all(b"x").unwrap();
    let mut got = Vec::new();
    let _ = watcher.wait_io_timeout(&mut got, TIMEOUT);
    // Whatever happened, unblock a poller stuck in recv, so that the watcher can close.
    quiet_peer.write_all(b"y").unwrap();
    assert!(
        got.iter().any(|c| c.tag == 2 && c.is_ok()),
        "the other connection's read did not complete: {}",
        util::describe_all(&got)
    );
    let rest = collect(&watcher, 1, TIMEOUT);
    assert_eq!(
        (rest[0].tag, rest[0].n),
        (1, 1),
        "{}",
        util::describe(&rest[0])
    );
}

/// `register` keeps the options set on the socket before (here `TCP_NODELAY` and the
/// receive buffer) and only makes it non-blocking: `Detach` hands back the same socket.
#[test]
fn register_keeps_the_socket_options_set_before() {
    let watcher = Watcher::new().unwrap();
    let (_client, server) = tcp_pair();
    server.set_nodelay(true).unwrap();
    let rcvbuf: libc::c_int = 12_345;
    set_opt(&server, libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf);
    let before = get_opt(&server, libc::SOL_SOCKET, libc::SO_RCVBUF, 0);
    let conn = watcher.register(server).unwrap();
    let fd = detach(&watcher, &conn);
    assert_eq!(get_opt(&fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 0), 1);
    assert_eq!(get_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 0), before);
    // SAFETY: F_GETFL on a live descriptor only reads its flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0 && flags & libc::O_NONBLOCK != 0);
}
