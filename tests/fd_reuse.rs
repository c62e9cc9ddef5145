//! Reuse of an fd number after `Free` (its own binary: the test needs the lowest free fd
//! number to be the one just closed, so nothing else may open fds meanwhile).

mod util;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use proactor::{Cmd, Error, Op, SendError, Watcher};
use util::*;

#[test]
fn stale_handle_never_touches_the_conn_that_reuses_its_fd() {
    let watcher = Watcher::new().unwrap();
    let pairs = Pairs::new();
    let mut ledger = Ledger::new();

    // Conn A, with a read pending when it is freed.
    let (mut client_a, server_a) = pairs.pair();
    let fd_a = server_a.as_raw_fd();
    let a = watcher.register(server_a).unwrap();
    let stale = a.clone();
    let id_a = a.id();
    let ra = ledger.must(&a, Cmd::ReadInternal);
    wait_stats(&watcher, "A's read pending", |s| s.reads_in_flight == 1);
    // B's client end exists before A is freed, so B's accepted socket is the next fd opened.
    let client_b = pairs.connect();
    ledger.must(&a, Cmd::Free);
    let cs = collect(&watcher, 2, TIMEOUT);
    ledger.record_all(&cs);
    assert_eq!(cs[0].tag, ra);
    assert!(matches!(cs[0].result, Err(Error::Freed)));
    assert_eq!(cs[1].op, Op::Free);
    drop(cs);

    // Conn B gets the same fd number (checked before registering).
    let server_b = accept_onto(&pairs, fd_a);
    assert_eq!(server_b.as_raw_fd(), fd_a, "B must reuse A's fd number");
    let b = watcher.register(server_b).unwrap();
    assert_ne!(b.id(), id_a, "a freed key never aliases a new conn");
    let mut client_b = client_b;

    // The stale handle is refused; nothing it does reaches B.
    for cmd in [
        Cmd::Write("from stale A"),
        Cmd::ReadInternal,
        Cmd::Read(vec![0; 8]),
        Cmd::Free,
        Cmd::Detach,
    ] {
        match stale.send(cmd) {
            Err(SendError::Freed(_)) => {}
            other => panic!("stale handle: {other:?}"),
        }
    }
    // Dropping every handle of A (its release goes to the poller) must not close B.
    drop(stale);
    drop(a);

    let rb = ledger.must(&b, Cmd::ReadFull(vec![0; 7]));
    client_b.write_all(b"B bytes").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert_eq!((c.tag, c.data()), (rb, &b"B bytes"[..]));
    assert_eq!(c.conn.id(), b.id());
    drop(c);
    ledger.must(&b, Cmd::Write("to B"));
    ledger.record(&collect_one(&watcher, TIMEOUT));
    let mut got = [0; 4];
    client_b.set_read_timeout(Some(TIMEOUT)).unwrap();
    client_b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"to B", "B received exactly its own bytes");
    // A's peer saw its socket close, and nothing else.
    assert_eq!(read_to_eof(&mut client_a), b"");
    assert_quiet(&watcher, std::time::Duration::from_millis(30));
    wait_stats(&watcher, "only B left", |s| s.connections == 1);
    ledger.assert_all_done();
}

/// Accepts B's server end; it should land on `want`, the lowest free fd number. Should
/// anything have taken that number first, move the socket onto it with dup2 (only if the
/// number is still free), so the test always checks the reuse it is named after.
fn accept_onto(pairs: &Pairs, want: i32) -> std::net::TcpStream {
    let s = pairs.accept();
    if s.as_raw_fd() == want {
        return s;
    }
    eprintln!(
        "accept gave fd {}, not {want}: moving it there",
        s.as_raw_fd()
    );
    // SAFETY: F_GETFD on a number we do not own only asks whether it is open.
    let free = unsafe { libc::fcntl(want, libc::F_GETFD) } == -1;
    assert!(free, "fd {want} was taken by something else");
    // SAFETY: `want` is not open (checked just above, and this binary runs one test), so
    // dup2 closes nothing; on success the new fd is ours alone.
    let r = unsafe { libc::dup2(s.as_raw_fd(), want) };
    assert_eq!(r, want, "dup2: {}", std::io::Error::last_os_error());
    // SAFETY: dup2 returned `want`, a new descriptor owned by nothing else.
    std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(want) })
}
