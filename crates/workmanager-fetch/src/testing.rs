//! A small HTTP(S)/1.1 server for tests of code fetching (feature
//! `testing`): it records every request it receives — the tests' proof that
//! a refused URL caused no request — and answers by path.
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the server answers one path.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with this body and its Content-Length.
    Body(Vec<u8>),
    /// 302 to this Location.
    Redirect(String),
    /// This status, empty body.
    Status(u16),
    /// Headers, then nothing, for a minute.
    Stall,
    /// 200 with a chunked body that never ends.
    Endless,
    /// 200 declaring this Content-Length, then a few bytes.
    Declared(u64),
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Route = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

pub struct TestServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Body bytes written by `Endless` answers.
    pub streamed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// Plain HTTP on `ip`, an OS-chosen port.
    pub async fn http(ip: IpAddr, route: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Self {
        Self::start(SocketAddr::new(ip, 0), Arc::new(route), None).await
    }

    /// Plain HTTP on a given address and port.
    pub async fn http_at(
        addr: SocketAddr,
        route: impl Fn(&str) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::start(addr, Arc::new(route), None).await
    }

    /// HTTPS with the given server configuration.
    pub async fn https(
        ip: IpAddr,
        tls: Arc<rustls::ServerConfig>,
        route: impl Fn(&str) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        Self::start(SocketAddr::new(ip, 0), Arc::new(route), Some(acceptor)).await
    }

    async fn start(at: SocketAddr, route: Route, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind(at).await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let streamed = Arc::new(AtomicU64::new(0));
        let (s, n) = (seen.clone(), streamed.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (route, s, n, tls) = (route.clone(), s.clone(), n.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve(stream, route, s, n).await;
                            }
                        }
                        None => serve(tcp, route, s, n).await,
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            streamed,
            task,
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// `http://<addr><path>` (or https).
    pub fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    route: Route,
    seen: Arc<Mutex<Vec<Seen>>>,
    streamed: Arc<AtomicU64>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) if head.len() < 64 * 1024 => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if let Ok(mut v) = seen.lock() {
        v.push(Seen {
            path: path.clone(),
            headers,
        });
    }
    let reply = route(&path);
    let _ = match reply {
        Reply::Body(b) => {
            let h = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                b.len()
            );
            write_all(&mut stream, &[h.as_bytes(), &b].concat()).await
        }
        Reply::Redirect(to) => {
            let h = format!(
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            write_all(&mut stream, h.as_bytes()).await
        }
        Reply::Status(code) => {
            let h =
                format!("HTTP/1.1 {code} Status\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            write_all(&mut stream, h.as_bytes()).await
        }
        Reply::Stall => {
            let h = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
            let _ = write_all(&mut stream, h.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
        Reply::Declared(n) => {
            let h = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\nprint(1)\n");
            let _ = write_all(&mut stream, h.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
        Reply::Endless => {
            let h = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
            if write_all(&mut stream, h.as_bytes()).await.is_err() {
                return;
            }
            let chunk = [b'#'; 16 * 1024];
            let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
            framed.extend_from_slice(&chunk);
            framed.extend_from_slice(b"\r\n");
            loop {
                if write_all(&mut stream, &framed).await.is_err() {
                    return;
                }
                streamed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    };
}

async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> std::io::Result<()> {
    s.write_all(b).await?;
    s.flush().await
}

/// A throwaway CA and a server certificate for `localhost` and 127.0.0.1,
/// signed by it: (CA certificate PEM, server configuration).
pub fn test_ca() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "workmanager test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");
    let key = rcgen::KeyPair::generate().expect("server key");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server configuration");
    (ca.pem(), Arc::new(config))
}
