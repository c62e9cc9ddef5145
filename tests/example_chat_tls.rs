//! The chat-server example over TLS (`--tls-cert`, `--tls-key`; the `tls` feature), run as a
//! process: clients of Python's `ssl` and of rustls chat as over plaintext, join only once
//! their handshake completes, and clients that speak plaintext or stall in the handshake
//! are dropped without disturbing the others. Built without the feature, the flags are
//! refused.
#![cfg(feature = "tls")]

mod example_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use example_util::{connect, example, Server};
use proactor::rustls::pki_types::pem::PemObject;
use proactor::rustls::pki_types::{CertificateDer, ServerName};
use proactor::rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

fn data(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
        .display()
        .to_string()
}

fn tls_chat(extra: &[&str]) -> Server {
    let (cert, key) = (data("server.pem"), data("server.key"));
    let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
    args.extend_from_slice(extra);
    Server::start_with("chat-server", &["tls"], &args)
}

/// A chat client over rustls, reading line by line.
struct TlsClient {
    tls: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

impl TlsClient {
    fn connect(server: &Server) -> TlsClient {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(data("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(Arc::new(config), name).unwrap();
        TlsClient {
            tls: StreamOwned::new(conn, connect(server.addr)),
            buf: Vec::new(),
        }
    }

    fn send(&mut self, text: &str) {
        self.tls.write_all(text.as_bytes()).unwrap();
        self.tls.flush().unwrap();
    }

    /// The next line, without its `\n`.
    fn line(&mut self) -> String {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return String::from_utf8_lossy(&line[..at]).into_owned();
            }
            let mut chunk = [0; 4096];
            match self.tls.read(&mut chunk) {
                Ok(0) => panic!("end of stream, {:?} unread", self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("read: {e}, {:?} unread", self.buf),
            }
        }
    }

    fn expect(&mut self, want: &str) {
        assert_eq!(self.line(), want);
    }
}

/// Reads `s` until the server closes it (an alert may come first); panics if it stays open
/// past the read timeout `connect` set.
fn dropped(mut s: TcpStream) {
    let start = Instant::now();
    let mut buf = [0; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("not dropped after {:?}: {e}", start.elapsed()),
        }
    }
}

#[test]
fn rustls_clients_chat_over_tls_and_bad_clients_are_dropped_unannounced() {
    let mut server = tls_chat(&["--tls-handshake-timeout", "1"]);
    let mut a = TlsClient::connect(&server);
    a.send("/nick alice\n");
    a.expect("* welcome guest1");
    a.expect("* guest1 is now alice");
    // Plaintext, garbage and a stalled handshake: each dropped, never a client.
    let mut plain = connect(server.addr);
    plain.write_all(b"hello\n").unwrap();
    let mut junk = connect(server.addr);
    junk.write_all(&[0xff; 300]).unwrap();
    let stalled = connect(server.addr);
    dropped(plain);
    dropped(junk);
    let start = Instant::now();
    dropped(stalled); // at its handshake's deadline (1 s)
    assert!(start.elapsed() < Duration::from_secs(5));
    // The next client that completes a handshake is the second guest; alice saw nobody else.
    let mut b = TlsClient::connect(&server);
    b.expect("* welcome guest2");
    a.expect("* guest2 joined");
    b.send("hi alice\n");
    a.expect("guest2: hi alice");
    a.send("/who\n");
    a.expect("* online: alice guest2");
    b.send("/quit\n");
    b.expect("* bye");
    a.expect("* guest2 left");
    server.stop_cleanly(libc::SIGTERM);
}

#[test]
fn python_ssl_clients_chat_over_tls() {
    if Command::new("python3")
        .args(["-c", "import ssl"])
        .status()
        .map_or(true, |s| !s.success())
    {
        eprintln!("skipped: python3 with its ssl module is not installed");
        return;
    }
    let mut server = tls_chat(&[]);
    let script = format!(
        r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile={ca:?})
def client():
    raw = socket.create_connection(("127.0.0.1", {port}), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    return s, s.makefile("rb")
def line(f):
    return f.readline().decode().rstrip("\n")
a, fa = client()
assert line(fa) == "* welcome guest1"
b, fb = client()
assert line(fb) == "* welcome guest2"
assert line(fa) == "* guest2 joined"
b.sendall(b"/nick bob\r\nhello from python\n")
assert line(fa) == "* guest2 is now bob"
assert line(fb) == "* guest2 is now bob"
assert line(fa) == "bob: hello from python"
a.sendall(b"/who\n")
assert line(fa) == "* online: bob guest1"
fb.close(); b.close()  # no close_notify: a truncated stream, a client that left all the same
assert line(fa) == "* bob left"
a.sendall(b"/quit\n")
assert line(fa) == "* bye"
print("ok")
"#,
        ca = data("ca.pem"),
        port = server.addr.port(),
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the python clients failed");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    server.stop_cleanly(libc::SIGTERM);
}

#[test]
fn without_the_tls_feature_the_flags_are_refused() {
    let out = Command::new(example("chat-server"))
        .args([
            "--addr",
            "127.0.0.1:0",
            "--tls-cert",
            "a.pem",
            "--tls-key",
            "a.key",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "it must not start listening");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("built without TLS"), "{stderr}");
}

#[test]
fn a_certificate_file_that_cannot_be_read_is_refused() {
    let out = Command::new(example_util::example_with("chat-server", &["tls"]))
        .args([
            "--addr",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent.pem",
            "--tls-key",
            &data("server.key"),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tls-cert /nonexistent.pem"), "{stderr}");
}
