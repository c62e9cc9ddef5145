//! Writes never raise SIGPIPE. Its own binary, because it sets SIGPIPE back to SIG_DFL for
//! the whole process (Rust binaries ignore it by default, which would hide the bug): if the
//! library wrote without MSG_NOSIGNAL, this process would die of the signal.

mod util;

use std::io::ErrorKind;

use proactor::{Cmd, Error};
use util::*;

fn write_until_error(watcher: &proactor::Watcher, conn: &proactor::Conn) -> std::io::Error {
    let mut ledger = Ledger::new();
    let start = std::time::Instant::now();
    for _ in 0..1000 {
        assert!(start.elapsed() < TIMEOUT);
        ledger.must(conn, Cmd::Write(vec![1u8; 64 * 1024]));
        let c = collect_one(watcher, TIMEOUT);
        ledger.record(&c);
        match c.result {
            Ok(()) => continue, // accepted before the peer's RST came back
            Err(Error::Io(e)) => {
                ledger.assert_all_done();
                return e;
            }
            Err(e) => panic!("expected an I/O error, got {e:?}"),
        }
    }
    panic!("writes to a closed peer never failed");
}

#[test]
fn write_to_a_closed_or_reset_peer_does_not_raise_sigpipe() {
    // SAFETY: setting a signal disposition to the default; no handler code is involved.
    let previous = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    assert_ne!(previous, libc::SIG_ERR);
    // SAFETY: as above; this re-reads what we just set.
    assert_eq!(
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) },
        libc::SIG_DFL
    );

    // Peer closed (FIN): the first write may go out, the peer answers RST, then EPIPE.
    let (watcher, conn, client) = watcher_pair();
    drop(client);
    let e = write_until_error(&watcher, &conn);
    assert!(
        matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
        "{e}"
    );

    // Peer reset (RST): EPIPE or ECONNRESET, again without a signal.
    let (watcher, conn, client) = watcher_pair();
    set_linger_zero(&client);
    drop(client);
    let e = write_until_error(&watcher, &conn);
    assert!(
        matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)),
        "{e}"
    );
    // Still alive, and the conn still completes commands.
    let mut ledger = Ledger::new();
    ledger.must(&conn, Cmd::Free);
    let c = collect_one(&watcher, TIMEOUT);
    ledger.record(&c);
    assert!(c.is_ok());
    ledger.assert_all_done();
}
