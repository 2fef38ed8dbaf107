//! TLS and mutual TLS for both ports (rustls, the process's one crypto
//! provider). The certificate, key and client CA files are watched: when one
//! changes, a new server configuration is built and used for every new
//! connection; a broken file keeps the previous configuration (and says so).
//! Handshakes run in their own tasks, so a slow or silent client cannot hold
//! up the accept loop; plain-text clients fail the handshake and are closed.
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::auth::PeerNames;

/// The files of a TLS port.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// What the handshake learnt about a connection, for the request extensions.
#[derive(Debug, Clone, Default)]
pub struct TlsConnectInfo {
    pub remote: Option<SocketAddr>,
    /// DNS names (SAN) of the client certificate, if one was presented.
    pub peer_names: PeerNames,
}

/// The current server configuration, replaced when the files change.
pub struct TlsState {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

fn build(files: &TlsFiles) -> Result<ServerConfig, String> {
    let cert_pem = read(&files.certificate, "TLS certificate (Tls:CertificatePath)")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("Tls:CertificatePath is not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("Tls:CertificatePath holds no certificate".into());
    }
    let key_pem = read(&files.key, "TLS key (Tls:KeyPath)")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("Tls:KeyPath is not a PEM private key: {e}"))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let ca_pem = read(ca, "client CA (Tls:ClientCaPath)")?;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&ca_pem) {
                let c = c.map_err(|e| format!("Tls:ClientCaPath is not PEM certificates: {e}"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("Tls:ClientCaPath holds an unusable certificate: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("Tls:ClientCaPath: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!("Tls:CertificatePath and Tls:KeyPath do not make a usable pair: {e}")
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl TlsState {
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let config = build(&files)?;
        let stamps = stamps(&files);
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
        }))
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Rebuilds the configuration if a file changed; true when it did.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.files);
        let changed = match self.stamps.lock() {
            Ok(mut s) if *s != now => {
                *s = now;
                true
            }
            _ => false,
        };
        if !changed {
            return false;
        }
        match build(&self.files) {
            Ok(c) => {
                if let Ok(mut cur) = self.current.write() {
                    *cur = Arc::new(c);
                }
                tracing::info!(certificate = %self.files.certificate.display(), "TLS files changed; new connections use them");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS files changed but cannot be used; keeping the previous ones");
                false
            }
        }
    }

    /// Watches the files every `every`.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(s) => {
                        s.reload_if_changed();
                    }
                    None => return,
                }
            }
        });
    }
}

fn stamps(f: &TlsFiles) -> Vec<Option<SystemTime>> {
    let mut paths = vec![&f.certificate, &f.key];
    if let Some(ca) = &f.client_ca {
        paths.push(ca);
    }
    paths
        .into_iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// The DNS names of a client certificate.
fn peer_names(certs: Option<&[CertificateDer<'_>]>) -> PeerNames {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return PeerNames::default();
    };
    match webpki::EndEntityCert::try_from(leaf) {
        Ok(cert) => PeerNames(cert.valid_dns_names().map(str::to_string).collect()),
        Err(_) => PeerNames::default(),
    }
}

/// A TLS connection with what the handshake learnt.
pub struct TlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    pub info: TlsConnectInfo,
}

/// Accepts connections on `listener` and hands out the ones whose handshake
/// succeeded. Handshakes are bounded by `handshake_timeout`.
pub fn incoming(
    listener: TcpListener,
    state: Arc<TlsState>,
    handshake_timeout: Duration,
) -> mpsc::Receiver<TlsStream> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(state.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let info = TlsConnectInfo {
                            remote: Some(remote),
                            peer_names: peer_names(tls.get_ref().1.peer_certificates()),
                        };
                        let _ = tx.send(TlsStream { inner: tls, info }).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsStream {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        self.info.clone()
    }
}

/// The HTTP port's listener over TLS connections.
pub struct TlsListener {
    pub rx: mpsc::Receiver<TlsStream>,
    pub local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.recv().await {
                Some(s) => {
                    let addr = s.info.remote.unwrap_or(self.local);
                    return (s, addr);
                }
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for TlsConnectInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.io().info.clone()
    }
}
