//! TLS: the client listener's certificate and key from `[tls]` as a rustls acceptor, and
//! the client side of peer links (`https://` peers verified against `cluster.peer_ca_file`).
//!
//! It owns reading the PEM files and building the server configuration (rustls with the
//! ring provider, TLS 1.2 and 1.3, HTTP/1.1 by ALPN). It must never accept a certificate it
//! cannot use: a bad file is a startup error naming it, never a plaintext fallback.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// Why a certificate, key or CA file cannot be used. Its text names the file; it becomes
/// text only where startup reports it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be opened.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The open error.
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM parser's error.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no PEM private key.
    #[error("{}: no PEM private key in it", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the protocol versions (its provider cannot do TLS 1.2 or 1.3).
    #[error("{0}")]
    Protocols(rustls::Error),
    /// rustls refused the certificate chain with this key.
    #[error("{} with {}: {source}", cert.display(), key.display())]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's error.
        source: rustls::Error,
    },
    /// rustls refused a certificate of the CA file as a root.
    #[error("{}: {source}", path.display())]
    BadRoot {
        /// The CA file.
        path: PathBuf,
        /// rustls's error.
        source: rustls::Error,
    },
}

/// The acceptor for the certificate chain in `cert_file` and the key in `key_file`.
pub(crate) fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    let open = |p: &Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .map_err(|source| TlsError::Read { path: p.to_path_buf(), source })
    };
    let certs = rustls_pemfile::certs(&mut open(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: cert_file.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_file.to_path_buf() });
    }
    let key = rustls_pemfile::private_key(&mut open(key_file)?)
        .map_err(|source| TlsError::Pem { path: key_file.to_path_buf(), source })?
        .ok_or_else(|| TlsError::NoKey { path: key_file.to_path_buf() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::CertKey { cert: cert_file.to_path_buf(), key: key_file.to_path_buf(), source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client configuration that verifies `https://` peers against the certificates in
/// `ca_file` (a CA, or the peers' self-signed certificates).
pub(crate) fn peer_client(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let file = std::fs::File::open(ca_file).map_err(|source| TlsError::Read { path: ca_file.to_path_buf(), source })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
        let cert = cert.map_err(|source| TlsError::Pem { path: ca_file.to_path_buf(), source })?;
        roots.add(cert).map_err(|source| TlsError::BadRoot { path: ca_file.to_path_buf(), source })?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate { path: ca_file.to_path_buf() });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
