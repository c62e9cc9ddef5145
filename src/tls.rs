//! TLS on stream connections (the `tls` feature): what a finished handshake tells.
//!
//! The poller runs the TLS session itself (rustls, with the `ring` crypto provider): start it
//! with [`Cmd::TlsAccept`](crate::Cmd::TlsAccept) (as a server) or
//! [`Cmd::TlsConnect`](crate::Cmd::TlsConnect) (as a client) on a registered stream
//! connection, at any point of its stream (STARTTLS: plaintext before, TLS from the command
//! on). Its completion ([`Op::Tls`](crate::Op::Tls)) comes once the handshake is done, with
//! a [`TlsInfo`] in [`Buf::Tls`](crate::Buf::Tls); from then on every read and write command
//! of the connection carries plaintext.
//!
//! [`rustls`] is re-exported, so configurations are built with the same version the poller
//! runs.

use rustls::pki_types::CertificateDer;
use rustls::{Connection, ProtocolVersion, SupportedCipherSuite};

/// What a finished TLS handshake negotiated: the completion of
/// [`Cmd::TlsAccept`](crate::Cmd::TlsAccept) or [`Cmd::TlsConnect`](crate::Cmd::TlsConnect)
/// carries it in [`Buf::Tls`](crate::Buf::Tls) ([`Buf::into_tls`](crate::Buf::into_tls)).
#[derive(Debug, Clone)]
pub struct TlsInfo {
    alpn: Option<Vec<u8>>,
    peer_certificates: Vec<CertificateDer<'static>>,
    version: Option<ProtocolVersion>,
    suite: Option<SupportedCipherSuite>,
    server_name: Option<String>,
}

impl TlsInfo {
    pub(crate) fn of(conn: &Connection) -> TlsInfo {
        let server_name = match conn {
            Connection::Server(s) => s.server_name().map(str::to_owned),
            Connection::Client(_) => None,
        };
        TlsInfo {
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            peer_certificates: conn
                .peer_certificates()
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
            version: conn.protocol_version(),
            suite: conn.negotiated_cipher_suite(),
            server_name,
        }
    }

    /// The application protocol both sides agreed on (ALPN), if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The certificate chain the peer presented, its own certificate first: the server's
    /// (always, for a client), the client's (for a server that asked for one); empty if
    /// none was sent.
    pub fn peer_certificates(&self) -> &[CertificateDer<'static>] {
        &self.peer_certificates
    }

    /// The protocol version negotiated (TLS 1.2 or 1.3).
    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The cipher suite negotiated.
    pub fn cipher_suite(&self) -> Option<SupportedCipherSuite> {
        self.suite
    }

    /// For a server: the name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }
}
