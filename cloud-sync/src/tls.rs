//! HTTPS: the rustls server configuration (ring provider) built from PEM
//! files, the device identity read from a client certificate, and the
//! accept loop that serves the router over TLS.
//!
//! Owns everything TLS; it decides nothing about authorization (that is
//! [`crate::auth`]'s, from the [`ClientCertificate`] this module attaches to
//! each request). Invariants:
//! - with `tls_client_ca_file` set, a client certificate is optional (a
//!   device may still use its token) but, when presented, must chain to
//!   that CA or the handshake fails;
//! - the device a certificate names is its subject Common Name, exactly one
//!   CN that is a valid device id; anything else yields a certificate that
//!   names no device (401 on every authenticated route);
//! - a connection that has not finished its handshake within
//!   [`HANDSHAKE_TIMEOUT`] is dropped; on shutdown every connection finishes
//!   its request in flight and closes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::store::is_valid_device_id;

/// Longest a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (e.g. out of file descriptors), as
/// `axum::serve` does, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Attached to every request of a connection whose client presented a
/// certificate that chains to `tls_client_ca_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The device the certificate names (its subject CN), or `None` when the
    /// CN is missing, repeated or not a valid device id.
    pub device: Option<String>,
}

/// Why the TLS configuration could not be built. `key` is the config key
/// whose file is at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read PEM file {}: {reason}", path.display())]
    Pem {
        /// Config key naming the file.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the certificate chain or key (e.g. the key does not
    /// match the certificate).
    #[error("certificate and key are not usable together")]
    CertifiedKey(#[source] rustls::Error),
    /// The client CA could not be turned into a verifier.
    #[error("cannot build the client certificate verifier")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
}

impl TlsError {
    /// The config key this error is about.
    #[must_use]
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Pem { key, .. } => key,
            TlsError::CertifiedKey(_) => "tls_key_file",
            TlsError::ClientVerifier(_) => "tls_client_ca_file",
        }
    }
}

fn pem_error(key: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Pem {
        key,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| pem_error(key, path, err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(key, path, err))?;
    if certs.is_empty() {
        return Err(pem_error(key, path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Builds the server configuration: the certificate chain and key, and,
/// with `client_ca_file`, optional client certificates verified against it.
///
/// # Errors
/// [`TlsError`] naming the file at fault.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("tls_cert_file", cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|err| pem_error("tls_key_file", key_file, err))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::CertifiedKey)?;
    let builder = match client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("tls_client_ca_file", path)? {
                roots
                    .add(cert)
                    .map_err(|err| pem_error("tls_client_ca_file", path, err))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(TlsError::ClientVerifier)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::CertifiedKey)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The device a client certificate names: its subject's one Common Name,
/// if that is a valid device id.
#[must_use]
pub fn device_from_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = cert.subject().iter_common_name();
    let name = names.next()?.as_str().ok()?;
    if names.next().is_some() || !is_valid_device_id(name) {
        return None;
    }
    Some(name.to_owned())
}

/// Serves `router` over TLS on `listener` until `shutdown` is cancelled,
/// then lets every connection finish its request in flight.
///
/// # Errors
/// None at present: accept errors are logged and retried; the signature
/// matches the plain-HTTP server's.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(config);
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot accept connection");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        connections.spawn(connection(
            tcp,
            peer,
            acceptor.clone(),
            router.clone(),
            shutdown.clone(),
        ));
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    shutdown: CancellationToken,
) {
    let tls = tokio::select! {
        () = shutdown.cancelled() => return,
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                tracing::debug!(%peer, error = %err, "TLS handshake failed");
                return;
            }
            Err(_elapsed) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
    };
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| ClientCertificate {
            device: device_from_certificate(leaf),
        });
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request = request.map(Body::new);
        if let Some(certificate) = &certificate {
            request.extensions_mut().insert(certificate.clone());
        }
        router.clone().oneshot(request)
    });
    let served =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
    let mut served = std::pin::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
    }
}
