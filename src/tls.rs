//! TLS on the API listener (rustls): certificate and key from PEM files, handshakes off the
//! accept loop so that a slow or silent client never holds up the others.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Longest TLS handshake; a client that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const READY_BACKLOG: usize = 64;

/// Errors setting TLS up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds no certificate or key.
    #[error("cannot read {path}: {reason}")]
    Pem {
        /// File.
        path: String,
        /// Cause.
        reason: String,
    },
    /// rustls refuses the certificate and key.
    #[error("invalid certificate or key: {0}")]
    Config(#[from] rustls::Error),
    /// The client CA bundle is unusable.
    #[error("invalid client CA bundle: {0}")]
    ClientCa(String),
}

fn pem_error(path: &Path, reason: String) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        reason,
    }
}

/// Every certificate of a PEM file; at least one.
fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(file, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(file, "no certificate".to_owned()));
    }
    Ok(certs)
}

/// A rustls server configuration from a PEM certificate chain and a PEM private key, offering the
/// application protocol `alpn` (`http/1.1` for the HTTP API, `h2` for gRPC); with
/// `client_ca_file`, clients must present a certificate that CA bundle signed (mTLS).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    crate::invoke::install_crypto_provider();
    let chain = certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| pem_error(key_file, e.to_string()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca_file {
        None => builder.with_no_client_auth(),
        Some(file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(file)? {
                roots.add(cert).map_err(|e| TlsError::ClientCa(e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// A listener whose connections are TLS streams, for `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp`, until `stop` is cancelled, and handshakes each connection in its own
    /// task with the configuration `config` holds at that moment (reloaded certificates apply to
    /// new connections).
    pub fn new(
        tcp: TcpListener,
        config: watch::Receiver<Arc<rustls::ServerConfig>>,
        stop: CancellationToken,
    ) -> io::Result<Self> {
        let addr = tcp.local_addr()?;
        let (sender, ready) = mpsc::channel(READY_BACKLOG);
        tokio::spawn(async move {
            tokio::select! {
                _ = accept_loop(tcp, config, sender) => {}
                _ = stop.cancelled() => {}
            }
        });
        Ok(TlsListener { ready, addr })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    config: watch::Receiver<Arc<rustls::ServerConfig>>,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "accept failed");
                // Out of file descriptors and the like: give the system a moment.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(Arc::clone(&config.borrow()));
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                // A closed channel means the server stopped: the connection is dropped.
                Ok(Ok(tls)) => drop(ready.send((tls, peer)).await),
                Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop never ends while this listener exists.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
