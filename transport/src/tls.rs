//! TLS 1.3 + QUIC configuration for both ends.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::link::{LinkError, TcpClientConfig, TcpServerConfig};
use crate::pki::{identity_of, CertIdentity};

/// Paths to the PEM files one end needs.
#[derive(Debug, Clone)]
pub struct TlsFiles<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading the private key in {}", path.display()))
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("CA certificate in {} is not usable", ca.display()))?;
    }
    Ok(Arc::new(roots))
}

/// Transport limits both ends share: windows sized so one connection keeps a
/// window of ~1 MiB batches in flight, keep-alives well inside the idle timeout.
fn transport() -> Result<Arc<TransportConfig>> {
    transport_with_streams(256)
}

fn transport_with_streams(max_bidi_streams: u32) -> Result<Arc<TransportConfig>> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(16 << 20));
    t.receive_window(VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    t.max_concurrent_bidi_streams(VarInt::from_u32(max_bidi_streams));
    // Agents open no unidirectional streams.
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(Duration::from_secs(30)).map_err(|e| anyhow!("{e}"))?,
    ));
    Ok(Arc::new(t))
}

/// The exchange's QUIC server config: TLS 1.3 only, client certificates required
/// and verified against the CA, ALPN `ferry/1`, no 0-RTT.
///
/// With `crl` (a PEM file the CA signed, see `pki::crl`), certificates it lists
/// are refused in the handshake (TLS alert `certificate_revoked`).
pub fn server_config(files: &TlsFiles<'_>, crl: Option<&Path>) -> Result<quinn::ServerConfig> {
    server_config_limited(files, crl, 256)
}

/// [`server_config`] allowing each connection at most `max_bidi_streams` open
/// streams at once.
pub fn server_config_limited(
    files: &TlsFiles<'_>,
    crl: Option<&Path>,
    max_bidi_streams: u32,
) -> Result<quinn::ServerConfig> {
    let tls = server_tls(files, crl)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| anyhow!("{e}"))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_with_streams(max_bidi_streams)?);
    Ok(cfg)
}

/// The exchange's TLS config for the TCP transport: the same certificate,
/// client verification, revocation list and ALPN as [`server_config_limited`],
/// `max_streams` streams per connection.
pub fn tcp_server_config(
    files: &TlsFiles<'_>,
    crl: Option<&Path>,
    max_streams: u32,
) -> Result<TcpServerConfig> {
    Ok(TcpServerConfig {
        tls: Arc::new(server_tls(files, crl)?),
        // yamux counts the short-lived keep-alive probes and the close notice
        // too, and ends the whole connection (where QUIC makes the opener wait)
        // when the peer goes past the limit: a little room for them.
        max_streams: max_streams as usize + 4,
    })
}

/// The dashboard's HTTPS config: `cert`/`key` (the exchange's own unless the
/// operator names others), TLS 1.2 and 1.3 for browsers, no client
/// certificates (users log in), ALPN `http/1.1`.
pub fn https_server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .with_context(|| {
            format!(
                "the dashboard certificate {} does not match its key {}",
                cert.display(),
                key.display()
            )
        })?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// TLS 1.3 only, client certificates required and verified against the CA (and
/// the revocation list), ALPN `ferry/1`, no 0-RTT: one config for both transports.
fn server_tls(files: &TlsFiles<'_>, crl: Option<&Path>) -> Result<rustls::ServerConfig> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots(files.ca)?, provider());
    if let Some(path) = crl {
        let list = CertificateRevocationListDer::from_pem_file(path)
            .with_context(|| format!("reading the revocation list {}", path.display()))?;
        builder = builder.with_crls([list]).only_check_end_entity_revocation();
    }
    let verifier = builder
        .build()
        .context("building the client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(files.cert)?, load_key(files.key)?)
        .context("the exchange certificate does not match its key")?;
    tls.alpn_protocols = vec![ferry_protocol::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// The exchange's endpoint config, with a stateless-reset key derived from a
/// secret that survives restarts: after a crash, the restarted exchange's resets
/// are recognised by agents still holding the old connection, so they reconnect at
/// once instead of waiting out the idle timeout.
///
/// The connection ids are validated with a key derived from the same secret:
/// quinn's default generator keys them per process, and a restarted endpoint
/// then drops the old connections' packets as invalid instead of answering
/// with a reset, so agents waited out the 30 s idle timeout after an exchange
/// crash.
pub fn server_endpoint_config(reset_secret: &[u8]) -> quinn::EndpointConfig {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret);
    let tag = ring::hmac::sign(&key, b"ferry connection ids");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut cfg = quinn::EndpointConfig::new(Arc::new(key));
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    cfg
}

/// Reads the reset secret at `path`, creating it (32 random bytes, mode 0600) the
/// first time.
pub fn reset_secret(path: &Path) -> Result<Vec<u8>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read(path) {
        Ok(s) if s.len() >= 32 => return Ok(s),
        Ok(_) => bail!(
            "{} is shorter than 32 bytes; delete it to create a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut secret = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| anyhow!("no randomness for the reset secret"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&secret)?;
    f.sync_all()?;
    Ok(secret)
}

/// The agent's QUIC client config, presenting its certificate.
pub fn client_config(files: &TlsFiles<'_>) -> Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(client_tls(files)?).map_err(|e| anyhow!("{e}"))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport()?);
    Ok(cfg)
}

/// The agent's TLS config for the TCP transport: the same as QUIC's.
pub fn tcp_client_config(files: &TlsFiles<'_>) -> Result<TcpClientConfig> {
    Ok(TcpClientConfig(Arc::new(client_tls(files)?)))
}

fn client_tls(files: &TlsFiles<'_>) -> Result<rustls::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(files.ca)?)
        .with_client_auth_cert(load_certs(files.cert)?, load_key(files.key)?)
        .context("the agent certificate does not match its key")?;
    tls.alpn_protocols = vec![ferry_protocol::ALPN.to_vec()];
    tls.enable_early_data = false;
    Ok(tls)
}

/// Streams an agent's end of a TCP link allows at once (as QUIC's `transport()`).
pub(crate) const MAX_STREAMS: usize = 256;

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &quinn::Connection) -> Result<CertIdentity> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| anyhow!("peer presented no certificate"))?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow!("peer identity is not a certificate chain"))?;
    identity_of_chain(&certs)
}

/// The identity in the leaf of a verified certificate chain (as a TLS session
/// reports it, leaf first).
pub fn identity_of_chain(certs: &[CertificateDer<'static>]) -> Result<CertIdentity> {
    let leaf = certs
        .first()
        .ok_or_else(|| anyhow!("peer presented no certificate"))?;
    identity_of(leaf)
}

/// Identity in a certificate file (the agent checks its own config against it).
pub fn identity_in_file(path: &Path) -> Result<CertIdentity> {
    let certs = load_certs(path)?;
    let leaf = certs
        .first()
        .ok_or_else(|| anyhow!("{} holds no certificate", path.display()))?;
    identity_of(leaf)
}

/// The close reason the exchange gives an agent whose certificate it revoked
/// while it was connected.
pub const REVOKED_REASON: &[u8] = b"the agent's certificate was revoked";

/// Whether a connection failed because the exchange revoked this agent's
/// certificate: refused in the handshake (TLS alert `certificate_revoked`, 44) or
/// closed with [`REVOKED_REASON`]. Over TCP the alert reaches the agent as a
/// rustls error inside an I/O error (TLS 1.3 checks the client's certificate
/// after the client's handshake is done, so it surfaces on the first read), and
/// only its text survives yamux.
pub fn is_revoked(e: &anyhow::Error) -> bool {
    // A `LinkError` added as context is not among the chain's sources.
    if e.downcast_ref::<LinkError>().is_some_and(tcp_revoked) {
        return true;
    }
    e.chain().any(|c| {
        let io_inner = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        let conn = c
            .downcast_ref::<quinn::ConnectionError>()
            .or_else(|| match c.downcast_ref::<LinkError>() {
                Some(LinkError::Quic(e)) => Some(e),
                _ => None,
            })
            .or_else(|| {
                let write = c
                    .downcast_ref::<quinn::WriteError>()
                    .or_else(|| io_inner.and_then(|i| i.downcast_ref::<quinn::WriteError>()));
                match write {
                    Some(quinn::WriteError::ConnectionLost(e)) => Some(e),
                    _ => None,
                }
            });
        let rustls_revoked = |e: &rustls::Error| {
            matches!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked)
            )
        };
        if c.downcast_ref::<rustls::Error>()
            .is_some_and(rustls_revoked)
            || io_inner
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .is_some_and(rustls_revoked)
        {
            return true;
        }
        if c.downcast_ref::<LinkError>().is_some_and(tcp_revoked) {
            return true;
        }
        match conn {
            Some(quinn::ConnectionError::ConnectionClosed(c)) => {
                c.error_code == quinn::TransportErrorCode::crypto(44)
            }
            Some(quinn::ConnectionError::ApplicationClosed(a)) => a.reason == REVOKED_REASON,
            _ => false,
        }
    })
}

/// A TCP link ended by a revocation: the TLS alert (only its text survives
/// yamux) or the exchange's close notice.
fn tcp_revoked(e: &LinkError) -> bool {
    match e {
        LinkError::Tcp(text) => text.contains("CertificateRevoked"),
        LinkError::TcpClosedByPeer { reason, .. } => reason.as_bytes() == REVOKED_REASON,
        _ => false,
    }
}
