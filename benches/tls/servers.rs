//! The TLS echo servers, each run as this bench's binary re-executed with
//! `PROACTOR_BENCH_ROLE=tls-server` and `PROACTOR_BENCH_KIND=NAME`, in a process pinned to
//! one CPU. Each listens on 127.0.0.1 (`bench_servers::bind_listener`: `TCP_NODELAY`, the
//! largest backlog), prints `listening on HOST:PORT`, and for every connection runs a TLS
//! handshake with [`server_config`] (a 10 s deadline) and then echoes every plaintext byte
//! until the peer goes, until it is killed.
//!
//! - `proactor-uring`, `proactor-epoll`: an inline watcher (`WatcherBuilder::inline`: the
//!   poller runs in `wait_io` on the one thread) on io_uring or epoll. Accept ->
//!   `TlsAccept(config)` with a 10 s deadline and a `ReadInternal` behind it (held until the
//!   handshake is done); read done -> `Write(bytes)` (the arena's bytes); write done ->
//!   `ReadInternal`; an error or the end of stream -> `Free`. One `Accept` outstanding
//!   (`PROACTOR_BENCH_ACCEPTS` for more).
//! - `tokio-rustls`: tokio-rustls's `TlsAcceptor` on tokio's default runtime
//!   (`Runtime::new()`, what `#[tokio::main]` builds: one worker thread in a process pinned to
//!   one CPU), an accept loop in a task and a spawned task per connection: the handshake under
//!   `tokio::time::timeout` (10 s), then `read` into a 16 KiB buffer (one TLS record's
//!   plaintext), `write_all` and `flush` of what it read.

use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proactor::rustls::crypto::{ring, CryptoProvider};
use proactor::rustls::pki_types::pem::PemObject;
use proactor::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use proactor::rustls::{
    self, client::Resumption, ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite,
};
use proactor::{Cmd, Engine, Error, Op, Watcher};

/// The servers, by name; the last is the baseline.
pub const ALL: [&str; 3] = ["proactor-uring", "proactor-epoll", "tokio-rustls"];

/// The one cipher suite both sides offer.
pub fn suite() -> SupportedCipherSuite {
    ring::cipher_suite::TLS13_AES_128_GCM_SHA256
}

/// The handshake's deadline, on every server.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The tokio-rustls server's read buffer: one TLS record's plaintext at most.
const TOKIO_BUF: usize = 16 * 1024;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
}

fn certs(name: &str) -> io::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(data(name))
        .map_err(|e| io::Error::other(format!("{name}: {e}")))?
        .map(|c| c.map_err(|e| io::Error::other(format!("{name}: {e}"))))
        .collect()
}

/// `ring`'s provider with one cipher suite ([`suite`]) and one key exchange (X25519), so
/// every handshake of every server negotiates the same.
fn provider() -> Arc<CryptoProvider> {
    // Deprecated since rustls 0.23.48 for want of post-quantum key exchange, which this bench
    // leaves out anyway (X25519 alone); `ring` is the provider the `tls` feature builds.
    #[allow(deprecated)]
    let mut p = ring::default_provider();
    p.cipher_suites = vec![suite()];
    p.kx_groups = vec![ring::kx_group::X25519];
    Arc::new(p)
}

/// The servers' configuration: the test certificate (tests/data/tls, ECDSA P-256), TLS 1.3
/// only, [`provider`], no client authentication, no session tickets (the clients resume
/// nothing: every handshake is a full one).
pub fn server_config() -> io::Result<Arc<ServerConfig>> {
    let key = PrivateKeyDer::from_pem_file(data("server.key"))
        .map_err(|e| io::Error::other(format!("server.key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs("server.pem")?, key)
        .map_err(io::Error::other)?;
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The load generator's configuration: trusts the test CA, TLS 1.3 only, [`provider`], no
/// resumption.
pub fn client_config() -> io::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for c in certs("ca.pem")? {
        roots.add(c).map_err(io::Error::other)?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("a valid name")
}

/// Runs server `kind` until the process is killed (or an error).
pub fn serve(kind: &str) -> io::Result<()> {
    let listener = super::bench_servers::bind_listener()?;
    let config = server_config()?;
    match kind {
        "proactor-uring" => proactor(listener, Engine::Uring, config),
        "proactor-epoll" => proactor(listener, Engine::Readiness, config),
        "tokio-rustls" => tokio_rustls(listener, config),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no TLS server named {kind:?} (servers: {})", ALL.join(",")),
        )),
    }
}

fn accepts() -> usize {
    super::bench_servers::env_usize("PROACTOR_BENCH_ACCEPTS")
        .unwrap_or(1)
        .max(1)
}

fn proactor(listener: TcpListener, engine: Engine, config: Arc<ServerConfig>) -> io::Result<()> {
    let local = listener.local_addr()?;
    let watcher = Watcher::builder().engine(engine).inline(true).build()?;
    let lconn = watcher.listen(listener).map_err(io::Error::other)?;
    for _ in 0..accepts() {
        lconn.send(Cmd::Accept).map_err(io::Error::other)?;
    }
    println!("listening on {local}");
    eprintln!("engine: {}", watcher.stats().engine_summary());
    let mut batch = Vec::with_capacity(1024);
    let mut failed = 0u64;
    loop {
        watcher.wait_io(&mut batch).map_err(io::Error::other)?;
        for c in batch.drain(..) {
            match (c.op, c.result) {
                (Op::Accept, result) => {
                    if result.is_ok() {
                        if let Some((conn, _peer)) = c.buf.into_accepted() {
                            let _ = conn
                                .send(Cmd::TlsAccept(config.clone()).timeout(HANDSHAKE_TIMEOUT));
                            let _ = conn.send(Cmd::ReadInternal);
                        }
                    }
                    // Keep the accept outstanding (also after EMFILE: the watcher pauses).
                    let _ = lconn.send(Cmd::Accept);
                }
                (Op::Tls, Ok(())) => {} // the read behind it is pending
                (Op::Read, Ok(())) => {
                    let _ = c.conn.send(Cmd::Write(c.buf.into_bytes()));
                }
                (Op::Write, Ok(())) => {
                    let _ = c.conn.send(Cmd::ReadInternal);
                }
                (Op::Free, _) => {}
                (_, Err(Error::WatcherClosed)) => return Ok(()),
                (_, Ok(())) => {}
                (op, Err(e)) => {
                    // End of stream, a reset, a failed handshake: close the connection.
                    if op == Op::Tls && !matches!(e, Error::Io(_)) {
                        failed += 1;
                        if failed <= 3 {
                            eprintln!("handshake failed: {e}");
                        }
                    }
                    let _ = c.conn.send(Cmd::Free);
                }
            }
        }
    }
}

fn tokio_rustls(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let serve = async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(tokio_conn(acceptor.clone(), stream));
                }
                // Out of descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    println!("listening on {local}");
    rt.block_on(rt.spawn(serve)).map_err(io::Error::other)
}

async fn tokio_conn(acceptor: tokio_rustls::TlsAcceptor, stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if e.kind() == io::ErrorKind::InvalidData {
                eprintln!("handshake failed: {e}");
            }
            return;
        }
        Err(_) => return,
    };
    let mut buf = vec![0u8; TOKIO_BUF];
    loop {
        let n = match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if tls.write_all(&buf[..n]).await.is_err() || tls.flush().await.is_err() {
            return;
        }
    }
}
