//! TLS driven by the poller (the `tls` feature): handshakes as server and client against
//! rustls on a plain thread and against Python's `ssl`, every kind of read and write
//! carrying plaintext, STARTTLS, close_notify and truncation, and the faults (not TLS, a
//! refused certificate, a stalled handshake, a reset mid-record, a peer that never reads).
//! Each runs on the engine `PROACTOR_ENGINE` picks (scripts/test.sh runs both).
#![cfg(feature = "tls")]

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use proactor::bytes::Bytes;
use proactor::rustls::pki_types::pem::PemObject;
use proactor::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use proactor::rustls::{
    self, ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    StreamOwned,
};
use proactor::{Buf, Cmd, Completion, Conn, Error, Framing, Op, Watcher};
use util::*;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
}

fn certs(name: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(data(name))
        .expect("certificate file")
        .map(|c| c.expect("certificate"))
        .collect()
}

/// A server configuration presenting `leaf` (`server` or `untrusted`), offering `alpn`.
fn server_config_of(leaf: &str, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let key = key_of(leaf);
    // (The process's default provider: `ring`, the only one the crate builds rustls with.)
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs(&format!("{leaf}.pem")), key)
        .expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn server_config() -> Arc<ServerConfig> {
    server_config_of("server", &[b"chat/1"])
}

/// The test CA, as a root store.
fn ca_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in certs("ca.pem") {
        roots.add(c).unwrap();
    }
    roots
}

/// The private key of `leaf` (`server` or `untrusted`).
fn key_of(leaf: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(data(&format!("{leaf}.key"))).expect("key")
}

/// A client configuration trusting the test CA, asking for `alpn`.
fn client_config_with(alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder()
        .with_root_certificates(ca_roots())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn client_config() -> Arc<ClientConfig> {
    client_config_with(&[b"chat/1"])
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// A rustls client over the blocking socket `sock` (it handshakes on first use).
fn rustls_client(sock: TcpStream) -> StreamOwned<ClientConnection, TcpStream> {
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(TIMEOUT)).unwrap();
    let conn = ClientConnection::new(client_config(), localhost()).unwrap();
    StreamOwned::new(conn, sock)
}

/// A rustls client on `sock` whose handshake is over.
fn handshaken_client(sock: TcpStream) -> StreamOwned<ClientConnection, TcpStream> {
    let mut tls = rustls_client(sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

/// A watcher and a registered server connection that was sent `TlsAccept`, with the peer's
/// plain socket.
fn tls_server() -> (Watcher, Conn, TcpStream) {
    let (watcher, conn, client) = watcher_pair();
    conn.send(Cmd::TlsAccept(server_config()).tag(1)).unwrap();
    (watcher, conn, client)
}

fn expect_handshake(c: &Completion) -> &proactor::tls::TlsInfo {
    assert_eq!(c.op, Op::Tls, "{}", describe(c));
    assert!(c.result.is_ok(), "handshake failed: {}", describe(c));
    match &c.buf {
        Buf::Tls(info) => info,
        _ => panic!(
            "a handshake's completion carries its TlsInfo: {}",
            describe(c)
        ),
    }
}

fn is_tls_error(r: &Result<(), Error>) -> bool {
    matches!(r, Err(Error::Tls(_)))
}

#[test]
fn handshake_as_server_then_echo_against_rustls() {
    let (watcher, conn, sock) = tls_server();
    eprintln!("engine: {}", watcher.stats().engine_summary());
    let client = thread::spawn(move || {
        let mut tls = rustls_client(sock);
        tls.write_all(b"hello over tls\n").unwrap();
        let mut back = [0; 15];
        tls.read_exact(&mut back).unwrap();
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"chat/1"[..]));
        back
    });
    let c = collect_one(&watcher, TIMEOUT);
    let info = expect_handshake(&c);
    assert_eq!(info.alpn_protocol(), Some(&b"chat/1"[..]));
    assert!(info.peer_certificates().is_empty(), "the client sent none");
    assert_eq!(info.server_name(), Some("localhost"));
    assert!(info.protocol_version().is_some() && info.cipher_suite().is_some());
    conn.send(Cmd::ReadFull(vec![0; 15])).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(c.is_ok(), "{}", describe(&c));
    assert_eq!(c.data(), b"hello over tls\n");
    conn.send(Cmd::Write(c.into_data())).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(c.is_ok() && c.n == 15, "{}", describe(&c));
    assert_eq!(&client.join().unwrap(), b"hello over tls\n");
}

/// A rustls server on a thread: accepts one connection, presents `leaf`, then runs `f`.
fn rustls_server<T: Send + 'static>(
    leaf: &'static str,
    f: impl FnOnce(&mut StreamOwned<ServerConnection, TcpStream>) -> T + Send + 'static,
) -> (std::net::SocketAddr, thread::JoinHandle<Option<T>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        let conn = ServerConnection::new(server_config_of(leaf, &[b"chat/1"])).unwrap();
        let mut tls = StreamOwned::new(conn, sock);
        // (A client that refuses the certificate ends the handshake: nothing to run.)
        while tls.conn.is_handshaking() {
            if tls.conn.complete_io(&mut tls.sock).is_err() {
                return None;
            }
        }
        Some(f(&mut tls))
    });
    (addr, t)
}

#[test]
fn handshake_as_client_after_connect_against_rustls() {
    let (addr, server) = rustls_server("server", |tls| {
        let mut line = [0; 5];
        tls.read_exact(&mut line).unwrap();
        tls.write_all(b"pong\n").unwrap();
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        line
    });
    let watcher = Watcher::new().unwrap();
    let conn = watcher.connect(addr).unwrap();
    // Queued behind the connect, and the write and read behind the handshake.
    conn.send(Cmd::TlsConnect(client_config(), localhost()).timeout(TIMEOUT))
        .unwrap();
    conn.send(Cmd::Write("ping\n")).unwrap();
    conn.send(Cmd::ReadFull(vec![0; 5])).unwrap();
    conn.send(Cmd::ReadInternal).unwrap();
    let got = collect(&watcher, 5, TIMEOUT);
    assert_eq!(got[0].op, Op::Connect, "{}", describe_all(&got));
    assert!(got[0].is_ok());
    let info = expect_handshake(&got[1]);
    assert_eq!(info.alpn_protocol(), Some(&b"chat/1"[..]));
    assert_eq!(info.peer_certificates(), &certs("server.pem")[..]);
    let rest: Vec<_> = got[2..].iter().map(|c| (c.op, c.is_ok())).collect();
    assert!(rest.contains(&(Op::Write, true)), "{}", describe_all(&got));
    let read = got.iter().find(|c| c.op == Op::ReadFull).unwrap();
    assert_eq!(read.data(), b"pong\n");
    // The server's close_notify: a clean end of stream.
    let end = got.iter().find(|c| c.op == Op::Read).unwrap();
    assert!(end.is_eof(), "{}", describe(end));
    assert_eq!(&server.join().unwrap().unwrap(), b"ping\n");
}

#[test]
fn every_kind_of_read_and_write_carries_plaintext() {
    let (watcher, conn, sock) = tls_server();
    let client = thread::spawn(move || {
        let mut tls = rustls_client(sock);
        tls.write_all(b"abc").unwrap(); // Read
        tls.flush().unwrap();
        let mut ack = [0; 1];
        tls.read_exact(&mut ack).unwrap();
        tls.write_all(b"0123456789").unwrap(); // ReadFull(10)
        tls.write_all(b"line one\r\nline two\nx\ny\nz\n").unwrap(); // frames
        tls.write_all(&[0, 0, 0, 3, b'l', b'e', b'n']).unwrap(); // length-prefixed
        tls.write_all(b"internal").unwrap();
        tls.flush().unwrap();
        let mut back = vec![0; 3 + 5 + 6];
        tls.read_exact(&mut back).unwrap();
        back
    });
    expect_handshake(&collect_one(&watcher, TIMEOUT));
    conn.send(Cmd::Read(vec![0; 64])).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(c.data(), b"abc", "{}", describe(&c));
    conn.send(Cmd::Write("!")).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
    conn.send(Cmd::ReadFull(vec![0; 10])).unwrap();
    conn.send(Cmd::ReadFrame(Framing::lines(64).strip_cr(true)))
        .unwrap();
    conn.send(Cmd::ReadFrame(Framing::lines(64))).unwrap();
    conn.send(Cmd::ReadFrames(Framing::lines(64), 10)).unwrap();
    conn.send(Cmd::ReadFrame(Framing::length_prefixed(4, 64)))
        .unwrap();
    conn.send(Cmd::ReadFull(vec![0; 8])).unwrap();
    let got = collect(&watcher, 6, TIMEOUT);
    for c in &got {
        assert!(c.is_ok(), "{}", describe_all(&got));
    }
    assert_eq!(got[0].data(), b"0123456789");
    assert_eq!(got[1].data(), b"line one");
    assert_eq!(got[2].data(), b"line two");
    // (One record carried the lines: the batch has every frame, and stops before the
    // length-prefixed bytes, which hold no line end.)
    let frames: Vec<&[u8]> = got[3].buf.frames().iter().collect();
    assert_eq!(frames, [&b"x"[..], b"y", b"z"]);
    assert_eq!(got[4].data(), b"len");
    assert_eq!(got[5].data(), b"internal");
    conn.send(Cmd::Write("one")).unwrap();
    conn.send(Cmd::WriteAll(vec![
        Bytes::from_static(b"two"),
        Bytes::from_static(b"!!"),
    ]))
    .unwrap();
    conn.send(Cmd::Write("threee")).unwrap();
    let got = collect(&watcher, 3, TIMEOUT);
    assert!(got.iter().all(Completion::is_ok), "{}", describe_all(&got));
    assert_eq!(
        got.iter().map(|c| (c.op, c.n)).collect::<Vec<_>>(),
        [(Op::Write, 3), (Op::WriteAll, 5), (Op::Write, 6)]
    );
    assert_eq!(client.join().unwrap(), b"onetwo!!threee");
}

#[test]
fn starttls_after_plaintext_lines() {
    let (watcher, conn, sock) = watcher_pair();
    let client = thread::spawn(move || {
        let mut sock = sock;
        sock.write_all(b"HELLO\nSTARTTLS\n").unwrap();
        let mut ok = [0; 3];
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"OK\n");
        let mut tls = rustls_client(sock);
        tls.write_all(b"secret\n").unwrap();
        let mut back = [0; 8];
        tls.read_exact(&mut back).unwrap();
        back
    });
    conn.send(Cmd::ReadFrame(Framing::lines(64))).unwrap();
    conn.send(Cmd::ReadFrame(Framing::lines(64))).unwrap();
    let got = collect(&watcher, 2, TIMEOUT);
    assert_eq!(got[0].data(), b"HELLO");
    assert_eq!(got[1].data(), b"STARTTLS");
    // The plaintext answer, then TLS from the command on; a read sent at once waits for the
    // handshake and gets plaintext.
    conn.send(Cmd::Write("OK\n")).unwrap();
    conn.send(Cmd::TlsAccept(server_config()).timeout(TIMEOUT))
        .unwrap();
    conn.send(Cmd::ReadFrame(Framing::lines(64))).unwrap();
    conn.send(Cmd::Write("welcome\n")).unwrap();
    let got = collect(&watcher, 4, TIMEOUT);
    let ops: Vec<_> = got.iter().map(|c| (c.op, c.is_ok())).collect();
    assert_eq!(ops[0], (Op::Write, true), "{}", describe_all(&got));
    assert!(ops.contains(&(Op::Tls, true)), "{}", describe_all(&got));
    assert!(ops.contains(&(Op::Write, true)), "{}", describe_all(&got));
    let line = got.iter().find(|c| c.op == Op::ReadFrame).unwrap();
    assert_eq!(line.data(), b"secret", "{}", describe(line));
    assert_eq!(&client.join().unwrap(), b"welcome\n");
}

/// STARTTLS behind a plaintext write the peer does not take: the handshake's command ends
/// at its deadline while the write is still in flight (on io_uring, in the kernel's send),
/// and the reads it held run again: the peer's next bytes reach a read.
#[test]
fn a_starttls_deadline_behind_a_stalled_write_lets_the_reads_go_on() {
    const BIG: usize = 32 << 20; // more than the socket buffers hold
    let (watcher, conn, mut sock) = watcher_pair();
    conn.send(Cmd::Write(vec![b'p'; BIG]).tag(1)).unwrap();
    conn.send(
        Cmd::TlsAccept(server_config())
            .timeout(Duration::from_millis(300))
            .tag(2),
    )
    .unwrap();
    conn.send(Cmd::ReadInternal.tag(3)).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(c.tag, 2, "{}", describe(&c));
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    sock.write_all(b"still plaintext").unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(
        (c.tag, c.data()),
        (3, &b"still plaintext"[..]),
        "{}",
        describe(&c)
    );
    conn.send(Cmd::Free).unwrap();
    let got = collect(&watcher, 2, TIMEOUT);
    assert!(got.iter().any(|c| c.tag == 1), "{}", describe_all(&got));
}

/// Two handshake commands queued behind a stalled write: the first ends at its deadline, the
/// second starts once the write went out, and its handshake completes.
#[test]
fn a_second_handshake_command_starts_after_the_first_timed_out() {
    const BIG: usize = 32 << 20;
    let (watcher, conn, sock) = watcher_pair();
    conn.send(Cmd::Write(vec![b'p'; BIG]).tag(1)).unwrap();
    conn.send(
        Cmd::TlsAccept(server_config())
            .timeout(Duration::from_millis(300))
            .tag(2),
    )
    .unwrap();
    conn.send(Cmd::TlsAccept(server_config()).timeout(TIMEOUT).tag(3))
        .unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(c.tag, 2, "{}", describe(&c));
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    // The peer takes the plaintext, then speaks TLS.
    let client = thread::spawn(move || {
        let mut sock = sock;
        let mut plain = vec![0; BIG];
        sock.read_exact(&mut plain).unwrap();
        assert!(plain.iter().all(|&b| b == b'p'));
        let mut tls = rustls_client(sock);
        tls.write_all(b"hi").unwrap();
        tls.flush().unwrap();
        tls
    });
    let got = collect(&watcher, 2, TIMEOUT);
    assert!(
        got.iter().any(|c| c.tag == 1 && c.is_ok()),
        "{}",
        describe_all(&got)
    );
    let hs = got
        .iter()
        .find(|c| c.tag == 3)
        .expect("the second handshake");
    expect_handshake(hs);
    conn.send(Cmd::ReadInternal).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(c.data(), b"hi", "{}", describe(&c));
    drop(client.join().unwrap());
}

/// A pseudo-random stream of `len` bytes from `seed`.
fn stream_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

#[test]
fn eight_mib_each_way_byte_exact() {
    const LEN: usize = 8 << 20;
    let (watcher, conn, sock) = tls_server();
    let client = thread::spawn(move || {
        let mut tls = rustls_client(sock);
        // Write it all first (the server reads while it writes back: no deadlock).
        tls.write_all(&stream_bytes(1, LEN)).unwrap();
        let mut back = vec![0; LEN];
        tls.read_exact(&mut back).unwrap();
        back == stream_bytes(2, LEN)
    });
    expect_handshake(&collect_one(&watcher, TIMEOUT));
    // The echo side: 64 writes of 128 KiB (more than the session takes at once), and
    // internal reads until every byte arrived.
    let out = stream_bytes(2, LEN);
    for part in out.chunks(128 << 10) {
        conn.send(Cmd::Write(part.to_vec())).unwrap();
    }
    let mut writes = 0;
    let mut got = Vec::with_capacity(LEN);
    conn.send(Cmd::ReadInternal).unwrap();
    let mut batch = Vec::new();
    while writes < LEN / (128 << 10) || got.len() < LEN {
        batch.clear();
        let n = watcher.wait_io_timeout(&mut batch, TIMEOUT).unwrap();
        assert!(
            n > 0,
            "stalled: {} of {LEN} read, {writes} writes",
            got.len()
        );
        for c in batch.drain(..) {
            assert!(c.is_ok(), "{}", describe(&c));
            match c.op {
                Op::Write => writes += 1,
                Op::Read => {
                    got.extend_from_slice(c.data());
                    if got.len() < LEN {
                        conn.send(Cmd::ReadInternal).unwrap();
                    }
                }
                op => panic!("unexpected {op:?}"),
            }
        }
    }
    assert!(
        got == stream_bytes(1, LEN),
        "the bytes read differ from those sent"
    );
    assert!(client.join().unwrap(), "the bytes the client read differ");
}

#[test]
fn shutdown_sends_close_notify_and_a_clean_end_reads_eof() {
    let (watcher, conn, sock) = tls_server();
    let client = thread::spawn(move || {
        let mut tls = rustls_client(sock);
        let mut all = Vec::new();
        // rustls says `UnexpectedEof` for an end of stream without close_notify.
        tls.read_to_end(&mut all).unwrap();
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        tls.sock.shutdown(Shutdown::Write).unwrap();
        all
    });
    expect_handshake(&collect_one(&watcher, TIMEOUT));
    conn.send(Cmd::Write("last words\n")).unwrap();
    conn.send(Cmd::Shutdown).unwrap();
    conn.send(Cmd::ReadInternal).unwrap();
    let got = collect(&watcher, 3, TIMEOUT);
    assert_eq!(
        got.iter().map(|c| c.op).collect::<Vec<_>>(),
        [Op::Write, Op::Shutdown, Op::Read],
        "{}",
        describe_all(&got)
    );
    assert!(got[0].is_ok() && got[1].is_ok(), "{}", describe_all(&got));
    assert!(got[2].is_eof(), "{}", describe(&got[2]));
    assert_eq!(client.join().unwrap(), b"last words\n");
}

#[test]
fn a_peer_closing_without_close_notify_truncates() {
    let (watcher, conn, sock) = tls_server();
    let client = thread::spawn(move || {
        let mut tls = rustls_client(sock);
        tls.write_all(b"partial").unwrap();
        tls.flush().unwrap();
        // The socket ends with no close_notify.
        tls.sock.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = tls.sock.read_to_end(&mut rest);
    });
    expect_handshake(&collect_one(&watcher, TIMEOUT));
    conn.send(Cmd::ReadFull(vec![0; 100])).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(
        matches!(c.result, Err(Error::TlsTruncated)),
        "{}",
        describe(&c)
    );
    assert_eq!(c.data(), b"partial", "the bytes read before it come back");
    // Later reads too; the connection goes on for writes (the peer still reads).
    conn.send(Cmd::ReadInternal).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(
        matches!(c.result, Err(Error::TlsTruncated)),
        "{}",
        describe(&c)
    );
    conn.send(Cmd::Free).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
    client.join().unwrap();
}

#[test]
fn plaintext_to_a_tls_server_fails_every_pending_operation() {
    let (watcher, conn, mut sock) = tls_server();
    conn.send(Cmd::ReadInternal.tag(2)).unwrap();
    conn.send(Cmd::Write("never").tag(3)).unwrap();
    sock.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let got = collect(&watcher, 3, TIMEOUT);
    for c in &got {
        assert!(is_tls_error(&c.result), "{}", describe_all(&got));
    }
    let msg = got[0].result.as_ref().unwrap_err().to_string();
    assert!(msg.starts_with("TLS: "), "{msg}");
    // The client got an alert (or the end), not a hang; later commands fail the same way.
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut alert = [0; 7];
    let n = sock.read(&mut alert).unwrap();
    assert!(
        n == 0 || alert[0] == 21,
        "an alert record: {:?}",
        &alert[..n]
    );
    conn.send(Cmd::Read(vec![0; 4])).unwrap();
    assert!(is_tls_error(&collect_one(&watcher, TIMEOUT).result));
    conn.send(Cmd::Free).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
}

#[test]
fn garbage_to_a_tls_server_fails_the_handshake() {
    let (watcher, _conn, mut sock) = tls_server();
    let junk: Vec<u8> = (0..3000u32).map(|i| (i * 131 % 251) as u8).collect();
    // (The server may stop reading, and reset the connection, before all of it went.)
    let _ = sock.write_all(&junk);
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(c.op, Op::Tls);
    assert!(is_tls_error(&c.result), "{}", describe(&c));
}

fn client_against(leaf: &'static str, name: &str) -> Completion {
    let (addr, server) = rustls_server(leaf, |_| ());
    let watcher = Watcher::new().unwrap();
    let conn = watcher.connect(addr).unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    conn.send(Cmd::TlsConnect(client_config(), name)).unwrap();
    conn.send(Cmd::ReadInternal).unwrap();
    let got = collect(&watcher, 3, TIMEOUT);
    assert!(got[0].is_ok(), "{}", describe_all(&got));
    assert!(is_tls_error(&got[2].result), "{}", describe_all(&got));
    assert!(
        server.join().unwrap().is_none(),
        "the server saw the handshake fail"
    );
    got.into_iter().nth(1).unwrap()
}

#[test]
fn a_certificate_from_an_unknown_ca_is_refused() {
    let c = client_against("untrusted", "localhost");
    assert!(
        matches!(
            &c.result,
            Err(Error::Tls(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            )))
        ),
        "{}",
        describe(&c)
    );
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let c = client_against("server", "example.com");
    assert!(
        matches!(
            &c.result,
            Err(Error::Tls(rustls::Error::InvalidCertificate(_)))
        ),
        "{}",
        describe(&c)
    );
}

#[test]
fn a_stalled_handshake_ends_at_its_deadline() {
    let (watcher, conn, mut sock) = watcher_pair();
    conn.send(Cmd::TlsAccept(server_config()).timeout(Duration::from_millis(200)))
        .unwrap();
    conn.send(Cmd::ReadInternal.timeout(TIMEOUT)).unwrap();
    // Half a ClientHello's record header, then nothing (a TLS slowloris).
    sock.write_all(&[22, 3]).unwrap();
    let got = collect(&watcher, 2, TIMEOUT);
    assert_eq!(got[0].op, Op::Tls);
    assert!(
        matches!(got[0].result, Err(Error::Deadline)),
        "{}",
        describe(&got[0])
    );
    // What waited behind it cannot go on: the session is over.
    assert!(is_tls_error(&got[1].result), "{}", describe(&got[1]));
    conn.send(Cmd::Write("x")).unwrap();
    assert!(is_tls_error(&collect_one(&watcher, TIMEOUT).result));
}

#[test]
fn a_reset_mid_record_fails_the_read() {
    let (watcher, conn, sock) = tls_server();
    let client = thread::spawn(move || {
        let mut tls = handshaken_client(sock);
        // One record, of which only half is sent, then a reset.
        tls.conn.writer().write_all(&[7; 1000]).unwrap();
        let mut record = Vec::new();
        tls.conn.write_tls(&mut record).unwrap();
        tls.sock.write_all(&record[..record.len() / 2]).unwrap();
        set_linger_zero(&tls.sock);
    });
    expect_handshake(&collect_one(&watcher, TIMEOUT));
    conn.send(Cmd::ReadInternal).unwrap();
    client.join().unwrap(); // (the socket is reset as it is dropped)
    let c = collect_one(&watcher, TIMEOUT);
    assert!(
        matches!(&c.result, Err(Error::Io(e)) if e.kind() == ErrorKind::ConnectionReset)
            || matches!(c.result, Err(Error::TlsTruncated)),
        "{}",
        describe(&c)
    );
    conn.send(Cmd::Free).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
}

/// A peer that resets while ciphertext waits to be sent: the writes end with the reset, and
/// then the poller rests. Nothing is left to send; a failed send is not tried again round
/// after round.
#[test]
fn a_reset_with_ciphertext_waiting_fails_the_writes_and_the_poller_rests() {
    const WRITES: usize = 16;
    let (watcher, conn, sock) = tls_server();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let client = thread::spawn(move || {
        let tls = handshaken_client(sock);
        // Reads nothing, then resets.
        rx.recv().unwrap();
        set_linger_zero(&tls.sock);
    });
    expect_handshake(&collect_one(&watcher, TIMEOUT));
    // (The handshake's own bytes: the writes' ciphertext comes on top.)
    wait_stats(&watcher, "the handshake's bytes counted", |s| {
        s.bytes_written > 0
    });
    let handshake = watcher.stats().bytes_written;
    // 16 MiB: far more than the socket buffers hold.
    for _ in 0..WRITES {
        conn.send(Cmd::Write(vec![b'w'; 1 << 20])).unwrap();
    }
    // Stuck: the socket full, ciphertext waiting, the poller waiting for room.
    wait_until("the writes to stall", TIMEOUT, || {
        let s = watcher.stats();
        s.bytes_written > handshake && s.writes_in_flight > 0 && watcher.is_asleep()
    });
    tx.send(()).unwrap();
    client.join().unwrap(); // (the socket is reset as it is dropped)
    let got = collect(&watcher, WRITES, TIMEOUT);
    assert!(
        got.iter().any(|c| matches!(&c.result, Err(Error::Io(_)))),
        "{}",
        got.iter().map(describe).collect::<Vec<_>>().join("\n")
    );
    wait_until("the poller to rest", TIMEOUT, || watcher.is_asleep());
    let before = watcher.stats().wakeups;
    thread::sleep(Duration::from_millis(300)); // the window in which a spin would show
    let after = watcher.stats().wakeups;
    assert!(
        after - before <= 2,
        "{} wake-ups in 300 ms after the session failed",
        after - before
    );
    conn.send(Cmd::Free).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
}

#[test]
fn a_peer_that_never_reads_holds_the_writes_back() {
    const WRITES: usize = 64;
    const LEN: usize = 1 << 20;
    let (watcher, conn, sock) = tls_server();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let client = thread::spawn(move || {
        let mut tls = handshaken_client(sock);
        // Reads nothing until told to.
        rx.recv().unwrap();
        let mut n = 0;
        let mut buf = vec![0; 1 << 16];
        loop {
            match tls.read(&mut buf) {
                Ok(0) => return n,
                Ok(k) => n += k,
                Err(e) => panic!("{e} after {n} bytes"),
            }
        }
    });
    expect_handshake(&collect_one(&watcher, TIMEOUT));
    // 64 MiB: far more than the socket buffers hold. Each write has a deadline; the ones
    // the peer could not take by then end with it: the session did not swallow them.
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    for _ in 0..WRITES {
        conn.send(Cmd::Write(vec![b'w'; LEN]).deadline(deadline))
            .unwrap();
    }
    let got = collect(&watcher, WRITES, TIMEOUT);
    let written: usize = got.iter().filter(|c| c.is_ok()).map(|c| c.n).sum();
    let late = got
        .iter()
        .filter(|c| matches!(c.result, Err(Error::Deadline)))
        .count();
    assert!(
        written < WRITES * LEN / 2 && late > WRITES / 2,
        "{written} bytes completed, {late} writes ended by their deadline"
    );
    let stats = watcher.stats();
    assert_eq!(stats.writes_in_flight, 0, "{stats:?}");
    // The peer then reads what was sent, and a clean end (the stream stayed whole).
    conn.send(Cmd::Shutdown).unwrap();
    tx.send(()).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(c.is_ok(), "{}", describe(&c));
    let read = client.join().unwrap();
    assert!(read >= written, "{read} read, {written} written");
}

#[test]
fn datagram_sockets_and_listeners_refuse_tls() {
    let watcher = Watcher::new().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let conn = watcher.register(udp).unwrap();
    conn.send(Cmd::TlsAccept(server_config())).unwrap();
    conn.send(Cmd::TlsConnect(client_config(), localhost()))
        .unwrap();
    let listener = watcher
        .listen(TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    listener.send(Cmd::TlsAccept(server_config())).unwrap();
    let got = collect(&watcher, 3, TIMEOUT);
    for c in &got {
        assert!(
            matches!(c.result, Err(Error::Unsupported(_))),
            "{}",
            describe(c)
        );
    }
}

#[test]
fn free_during_a_handshake_completes_it_freed() {
    let (watcher, conn, _sock) = tls_server();
    conn.send(Cmd::ReadInternal).unwrap();
    conn.send(Cmd::Free).unwrap();
    let got = collect(&watcher, 3, TIMEOUT);
    assert_eq!(
        got.iter().map(|c| c.op).collect::<Vec<_>>(),
        [Op::Read, Op::Tls, Op::Free],
        "{}",
        describe_all(&got)
    );
    assert!(matches!(got[0].result, Err(Error::Freed)));
    assert!(matches!(got[1].result, Err(Error::Freed)));
}

/// Python's `ssl`, a TLS stack this project did not write, or `None` (with the reason
/// printed) where there is no python3.
fn python() -> Option<Command> {
    match Command::new("python3").arg("-c").arg("import ssl").status() {
        Ok(s) if s.success() => Some(Command::new("python3")),
        _ => {
            eprintln!("skipped: python3 with its ssl module is not installed");
            None
        }
    }
}

#[test]
fn python_ssl_client_against_the_poller_as_server() {
    let Some(mut py) = python() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile={ca:?})
ctx.set_alpn_protocols(["chat/1"])
with socket.create_connection(("127.0.0.1", {port}), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"ping from python\n")
        got = b""
        while not got.endswith(b"\n"):
            more = s.recv(100)
            if not more:
                break  # the end of the stream: the test sees what came, not a spin
            got += more
        print(s.selected_alpn_protocol(), s.version(), got.decode().strip())
        s.unwrap()  # close_notify both ways
"#,
        ca = data("ca.pem").display().to_string(),
    );
    let child = py
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (sock, _) = listener.accept().unwrap();
    let watcher = Watcher::new().unwrap();
    let conn = watcher.register(sock).unwrap();
    conn.send(Cmd::TlsAccept(server_config()).timeout(TIMEOUT))
        .unwrap();
    conn.send(Cmd::ReadFrame(Framing::lines(100))).unwrap();
    let got = collect(&watcher, 2, TIMEOUT);
    assert_eq!(
        expect_handshake(&got[0]).alpn_protocol(),
        Some(&b"chat/1"[..])
    );
    assert_eq!(got[1].data(), b"ping from python", "{}", describe(&got[1]));
    conn.send(Cmd::Write("pong from proactor\n")).unwrap();
    conn.send(Cmd::Shutdown).unwrap();
    conn.send(Cmd::ReadInternal).unwrap();
    let got = collect(&watcher, 3, TIMEOUT);
    assert!(got[0].is_ok() && got[1].is_ok(), "{}", describe_all(&got));
    assert!(
        got[2].is_eof(),
        "python's close_notify: {}",
        describe(&got[2])
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("chat/1 TLSv1.3 pong from proactor"),
        "{stdout}"
    );
}

#[test]
fn the_poller_as_client_against_python_ssl_server() {
    let Some(mut py) = python() else { return };
    let script = format!(
        r#"
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({cert:?}, {key:?})
ctx.set_alpn_protocols(["chat/1"])
with socket.create_server(("127.0.0.1", 0)) as srv:
    print(srv.getsockname()[1], flush=True)
    srv.settimeout(10)
    raw, _ = srv.accept()
    with ctx.wrap_socket(raw, server_side=True) as s:
        got = b""
        while not got.endswith(b"\n"):
            more = s.recv(100)
            if not more:
                break  # the end of the stream: the test sees what came, not a spin
            got += more
        s.sendall(got.upper())
        s.unwrap()
"#,
        cert = data("server.pem").display().to_string(),
        key = data("server.key").display().to_string(),
    );
    let mut child = py
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    {
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(child.stdout.as_mut().unwrap());
        out.read_line(&mut port).unwrap();
    }
    let port: u16 = port.trim().parse().expect("the server's port");
    let watcher = Watcher::new().unwrap();
    let conn = watcher
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap();
    conn.send(Cmd::TlsConnect(client_config(), localhost()).timeout(TIMEOUT))
        .unwrap();
    conn.send(Cmd::Write("shout this\n")).unwrap();
    conn.send(Cmd::ReadFrame(Framing::lines(100))).unwrap();
    let got = collect(&watcher, 4, TIMEOUT);
    assert!(got.iter().all(Completion::is_ok), "{}", describe_all(&got));
    let info = expect_handshake(&got[1]);
    assert_eq!(info.alpn_protocol(), Some(&b"chat/1"[..]));
    let line = got.iter().find(|c| c.op == Op::ReadFrame).unwrap();
    assert_eq!(line.data(), b"SHOUT THIS");
    // Python's close_notify, then ours.
    conn.send(Cmd::ReadInternal).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_eof());
    conn.send(Cmd::Shutdown).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_read_deadline_ends_that_read_only_and_the_session_goes_on() {
    let (watcher, conn, sock) = tls_server();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let client = thread::spawn(move || {
        let mut tls = handshaken_client(sock);
        rx.recv().unwrap();
        tls.write_all(b"late but fine\n").unwrap();
        tls.flush().unwrap();
        let mut back = [0; 2];
        tls.read_exact(&mut back).unwrap();
        back
    });
    expect_handshake(&collect_one(&watcher, TIMEOUT));
    conn.send(Cmd::ReadInternal.timeout(Duration::from_millis(100)))
        .unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert!(matches!(c.result, Err(Error::Deadline)), "{}", describe(&c));
    tx.send(()).unwrap();
    conn.send(Cmd::ReadFrame(Framing::lines(64))).unwrap();
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(c.data(), b"late but fine", "{}", describe(&c));
    conn.send(Cmd::Write("ok")).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
    assert_eq!(&client.join().unwrap(), b"ok");
}

/// Lines of every length up to 20 KB, so that they straddle TLS records (16 KiB of
/// plaintext each) and the framed reads keep a frame's beginning across records.
#[test]
fn frames_across_records_arrive_whole_and_in_order() {
    let mut rng = Rng::new(20);
    let lines: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            let len = if i % 10 == 0 {
                20_000
            } else {
                (rng.next_u64() % 3000) as usize
            };
            (0..len).map(|k| b'a' + ((i + k) % 26) as u8).collect()
        })
        .collect();
    let mut stream = Vec::new();
    for l in &lines {
        stream.extend_from_slice(l);
        stream.push(b'\n');
    }
    let (watcher, conn, sock) = tls_server();
    let client = thread::spawn(move || {
        let mut tls = rustls_client(sock);
        // In uneven pieces, each write its own record(s).
        for piece in stream.chunks(7_777) {
            tls.write_all(piece).unwrap();
            tls.flush().unwrap();
        }
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        // (Until the server closes: closing with its session tickets unread would reset
        // the connection, and the server could lose the last lines.)
        tls.sock.shutdown(Shutdown::Write).unwrap();
        let _ = tls.sock.read_to_end(&mut Vec::new());
    });
    expect_handshake(&collect_one(&watcher, TIMEOUT));
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut batch = Vec::new();
    conn.send(Cmd::ReadFrames(Framing::lines(32_000), 16))
        .unwrap();
    loop {
        batch.clear();
        assert!(
            watcher.wait_io_timeout(&mut batch, TIMEOUT).unwrap() > 0,
            "stalled"
        );
        let c = batch.pop().unwrap();
        assert!(batch.is_empty());
        if c.is_eof() {
            assert_eq!(c.n, 0, "{}", describe(&c));
            break;
        }
        assert!(c.is_ok(), "{}", describe(&c));
        got.extend(c.buf.frames().iter().map(<[u8]>::to_vec));
        conn.send(Cmd::ReadFrames(Framing::lines(32_000), 16))
            .unwrap();
    }
    assert_eq!(got.len(), lines.len());
    assert!(got == lines, "the frames differ from the lines sent");
    conn.send(Cmd::Free).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
    client.join().unwrap();
}

/// Every way a handshake can fail, on 40 connections at once: each operation completes
/// once, with an error, and once the connections are freed the watcher holds nothing of
/// them (no connection, no operation, no timer armed).
#[test]
fn failed_sessions_leave_nothing_behind() {
    const N: usize = 40;
    let watcher = Watcher::new().unwrap();
    let mut peers = Vec::new();
    let mut conns = Vec::new();
    let pairs = Pairs::new();
    for i in 0..N {
        let (mut client, server) = pairs.pair();
        let conn = watcher.register(server).unwrap();
        conn.send(Cmd::TlsAccept(server_config()).timeout(Duration::from_millis(300)))
            .unwrap();
        conn.send(Cmd::ReadInternal.timeout(TIMEOUT)).unwrap();
        conn.send(Cmd::Write("never").timeout(TIMEOUT)).unwrap();
        match i % 4 {
            0 => client
                .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
                .unwrap(),
            1 => client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap(),
            2 => {}                                        // stalls: the deadline
            _ => client.shutdown(Shutdown::Both).unwrap(), // ends at once: truncated
        }
        peers.push(client);
        conns.push(conn);
    }
    let got = collect(&watcher, 3 * N, TIMEOUT);
    for c in &got {
        assert!(!c.is_ok(), "{}", describe(c));
        assert!(
            matches!(
                c.result,
                Err(Error::Tls(_) | Error::TlsTruncated | Error::Deadline)
            ),
            "{}",
            describe(c)
        );
    }
    for conn in conns {
        conn.send(Cmd::Free).unwrap();
    }
    let got = collect(&watcher, N, TIMEOUT);
    assert!(got.iter().all(Completion::is_ok), "{}", describe_all(&got));
    // (The poller publishes its counters after it hands out the round's completions.)
    wait_stats(&watcher, "nothing left behind", |s| {
        (
            s.connections,
            s.reads_in_flight,
            s.writes_in_flight,
            s.deadlines_armed,
        ) == (0, 0, 0, 0)
    });
}

#[test]
fn a_client_certificate_reaches_the_server() {
    use proactor::rustls::server::WebPkiClientVerifier;
    let verifier = WebPkiClientVerifier::builder(Arc::new(ca_roots()))
        .build()
        .unwrap();
    let server = Arc::new(
        ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs("server.pem"), key_of("server"))
            .unwrap(),
    );
    let client = Arc::new(
        ClientConfig::builder()
            .with_root_certificates(ca_roots())
            .with_client_auth_cert(certs("server.pem"), key_of("server"))
            .unwrap(),
    );
    // With a certificate: the server sees it.
    let (watcher, conn, sock) = watcher_pair();
    conn.send(Cmd::TlsAccept(server.clone())).unwrap();
    let peer = thread::spawn(move || {
        let conn = ClientConnection::new(client, localhost()).unwrap();
        let mut tls = StreamOwned::new(conn, sock);
        tls.write_all(b"x").unwrap();
        tls.flush().unwrap();
        // (Open until the server closes: an early close could reset the connection.)
        let _ = tls.sock.read_to_end(&mut Vec::new());
    });
    let c = collect_one(&watcher, TIMEOUT);
    assert_eq!(
        expect_handshake(&c).peer_certificates(),
        &certs("server.pem")[..]
    );
    conn.send(Cmd::Free).unwrap();
    assert!(collect_one(&watcher, TIMEOUT).is_ok());
    peer.join().unwrap();
    // Without one: the server refuses the handshake.
    let (watcher, conn, sock) = watcher_pair();
    conn.send(Cmd::TlsAccept(server)).unwrap();
    let peer = thread::spawn(move || {
        let mut tls = rustls_client(sock);
        let _ = tls.write_all(b"x").and_then(|()| tls.read(&mut [0; 1]));
    });
    let c = collect_one(&watcher, TIMEOUT);
    assert!(is_tls_error(&c.result), "{}", describe(&c));
    peer.join().unwrap();
}

#[test]
fn closing_the_watcher_mid_handshake_completes_everything() {
    let (watcher, conn, _peer) = tls_server();
    conn.send(Cmd::ReadFull(vec![0; 4])).unwrap();
    conn.send(Cmd::Write("queued behind the handshake"))
        .unwrap();
    // Every command taken by the poller (the read, the handshake and the write behind it)
    // before the close fails what is pending.
    wait_stats(&watcher, "the three commands taken", |s| {
        (s.reads_in_flight, s.writes_in_flight) == (1, 2)
    });
    watcher.close();
    let got = collect(&watcher, 3, TIMEOUT);
    assert_eq!(
        got.iter().map(|c| c.op).collect::<Vec<_>>(),
        [Op::ReadFull, Op::Tls, Op::Write],
        "{}",
        describe_all(&got)
    );
    for c in &got {
        assert!(
            matches!(c.result, Err(Error::WatcherClosed)),
            "{}",
            describe(c)
        );
    }
}
