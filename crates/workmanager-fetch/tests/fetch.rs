//! The fetcher against real local HTTP(S) servers. Loopback plays the
//! public internet: a test names 127.0.0.1 a public address
//! (`public_overrides`), while 127.0.0.2 — a trap server that must never
//! see a request — stays what it is: loopback, refused.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use workmanager_core::fetch::{CodeFetcher, FetchRequest};
use workmanager_core::model::RawCredential;
use workmanager_fetch::testing::{test_ca, Reply, TestServer};
use workmanager_fetch::{FetchPolicy, HostPattern, HttpFetcher, NamedCredential, Resolve};

const CODE: &[u8] = b"def Process(event):\n    return event\n";

fn public() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}
fn trap_ip() -> IpAddr {
    "127.0.0.2".parse().unwrap()
}

fn policy() -> FetchPolicy {
    FetchPolicy {
        allowed_hosts: Vec::new(),
        allow_private_networks: false,
        max_bytes: 1024 * 1024,
        timeout: Duration::from_secs(5),
        extra_roots_pem: Vec::new(),
        public_overrides: vec![public()],
    }
}

/// Answers lookups from a script, one answer per call (the last repeats),
/// and counts them.
struct Scripted {
    answers: Mutex<Vec<Vec<IpAddr>>>,
    calls: AtomicUsize,
}

impl Scripted {
    fn new(answers: Vec<Vec<IpAddr>>) -> Arc<Self> {
        Arc::new(Self {
            answers: Mutex::new(answers),
            calls: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl Resolve for Scripted {
    async fn lookup(&self, _host: &str, _port: u16) -> std::io::Result<Vec<IpAddr>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let a = self.answers.lock().unwrap();
        Ok(a[n.min(a.len() - 1)].clone())
    }
}

fn fetcher(policy: FetchPolicy, resolver: Arc<dyn Resolve>) -> HttpFetcher {
    fetcher_with(policy, resolver, HashMap::new())
}

fn fetcher_with(
    policy: FetchPolicy,
    resolver: Arc<dyn Resolve>,
    creds: HashMap<String, NamedCredential>,
) -> HttpFetcher {
    HttpFetcher::new(policy, creds, resolver).unwrap()
}

fn req(url: String) -> FetchRequest {
    FetchRequest {
        url,
        content_sha256: None,
        credential_name: None,
        raw_credential: None,
    }
}

async fn refusal(f: &HttpFetcher, r: FetchRequest) -> String {
    match f.fetch(&r).await {
        Ok(_) => panic!("{} was fetched; it must be refused", r.url),
        Err(e) => e.to_string(),
    }
}

fn code_server_route(path: &str) -> Reply {
    match path {
        "/w.py" => Reply::Body(CODE.to_vec()),
        _ => Reply::Status(404),
    }
}

#[tokio::test]
async fn the_vetted_address_is_the_one_connected_to_no_second_lookup() {
    let good = TestServer::http(public(), code_server_route).await;
    // The trap listens on the same port: a connection to the second answer
    // would land there.
    let trap = TestServer::http_at(
        std::net::SocketAddr::new(trap_ip(), good.addr.port()),
        code_server_route,
    )
    .await;
    // First lookup: the public address; any later one: the trap.
    let dns = Scripted::new(vec![vec![public()], vec![trap_ip()]]);
    let f = fetcher(policy(), dns.clone());
    let body = f
        .fetch(&req(format!("http://code.test:{}/w.py", good.addr.port())))
        .await
        .unwrap();
    assert_eq!(body, CODE);
    assert_eq!(dns.calls.load(Ordering::SeqCst), 1, "exactly one lookup");
    assert_eq!(good.requests().len(), 1);
    assert!(trap.requests().is_empty());
}

#[tokio::test]
async fn a_name_with_one_public_and_one_private_address_is_refused_before_connecting() {
    let good = TestServer::http(public(), code_server_route).await;
    let dns = Scripted::new(vec![vec![public(), trap_ip()]]);
    let f = fetcher(policy(), dns);
    let e = refusal(
        &f,
        req(format!("http://code.test:{}/w.py", good.addr.port())),
    )
    .await;
    assert!(
        e.contains("host code.test resolves to 127.0.0.2, a loopback address")
            && e.contains("must be public"),
        "{e}"
    );
    assert!(good.requests().is_empty(), "no request for a refused URL");
}

#[tokio::test]
async fn private_hosts_are_refused_with_no_request_in_every_spelling() {
    let trap = TestServer::http(trap_ip(), code_server_route).await;
    let port = trap.addr.port();
    let f = fetcher(policy(), Scripted::new(vec![vec![trap_ip()]]));
    for url in [
        format!("http://127.0.0.2:{port}/w.py"),
        format!("http://2130706434:{port}/w.py"),
        format!("http://0177.0.0.2:{port}/w.py"),
        format!("http://0x7f.2:{port}/w.py"),
        format!("http://127.2:{port}/w.py"),
        format!("http://[::ffff:127.0.0.2]:{port}/w.py"),
        format!("http://[::ffff:7f00:2]:{port}/w.py"),
        format!("http://localhost.trap:{port}/w.py"),
        format!("http://code.test@127.0.0.2:{port}/w.py"),
        format!("http://code.test\\@127.0.0.2:{port}/w.py"),
    ] {
        let e = refusal(&f, req(url.clone())).await;
        assert!(
            e.contains("loopback") || e.contains("credentials") || e.contains("backslash"),
            "{url}: {e}"
        );
    }
    // Metadata and private ranges, by name (nothing listens there; the
    // fetcher must not even try).
    for ip in [
        "169.254.169.254",
        "10.0.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "fd00::1",
    ] {
        let f = fetcher(policy(), Scripted::new(vec![vec![ip.parse().unwrap()]]));
        let e = refusal(&f, req("http://metadata.test/latest".into())).await;
        assert!(e.contains(&format!("resolves to {ip}")), "{ip}: {e}");
    }
    assert!(trap.requests().is_empty(), "no request for any refused URL");
}

#[tokio::test]
async fn the_allow_list_applies_to_every_hop() {
    let other = TestServer::http(public(), code_server_route).await;
    let to_other = format!("http://other.test:{}/w.py", other.addr.port());
    let first = TestServer::http(public(), move |_: &str| Reply::Redirect(to_other.clone())).await;
    let mut p = policy();
    p.allowed_hosts = vec![HostPattern::parse("code.test").unwrap()];
    let f = fetcher(p, Scripted::new(vec![vec![public()]]));
    let e = refusal(
        &f,
        req(format!("http://elsewhere.test:{}/w.py", first.addr.port())),
    )
    .await;
    assert!(
        e.contains("elsewhere.test is not in AllowedCodeSourceHosts"),
        "{e}"
    );
    assert!(first.requests().is_empty());
    let e = refusal(
        &f,
        req(format!("http://code.test:{}/w.py", first.addr.port())),
    )
    .await;
    assert!(
        e.contains("redirect refused") && e.contains("other.test is not in AllowedCodeSourceHosts"),
        "{e}"
    );
    assert_eq!(first.requests().len(), 1);
    assert!(
        other.requests().is_empty(),
        "the non-allowed host got no request"
    );
}

#[tokio::test]
async fn a_redirect_to_a_private_address_is_refused() {
    let trap = TestServer::http(trap_ip(), code_server_route).await;
    let to_trap = format!("http://127.0.0.2:{}/w.py", trap.addr.port());
    let first = TestServer::http(public(), move |_: &str| Reply::Redirect(to_trap.clone())).await;
    let f = fetcher(policy(), Scripted::new(vec![vec![public()]]));
    let e = refusal(&f, req(format!("http://code.test:{}/", first.addr.port()))).await;
    assert!(e.contains("127.0.0.2 is a loopback address"), "{e}");
    assert!(trap.requests().is_empty());
}

#[tokio::test]
async fn five_redirects_are_followed_and_the_sixth_is_refused() {
    let server = TestServer::http(public(), |path: &str| {
        let n: u32 = path.trim_start_matches("/r").parse().unwrap_or(0);
        if n == 0 {
            Reply::Body(CODE.to_vec())
        } else {
            Reply::Redirect(format!("/r{}", n - 1))
        }
    })
    .await;
    let f = fetcher(policy(), Scripted::new(vec![vec![public()]]));
    let five = f
        .fetch(&req(format!("http://code.test:{}/r5", server.addr.port())))
        .await
        .unwrap();
    assert_eq!(five, CODE);
    let e = refusal(
        &f,
        req(format!("http://code.test:{}/r6", server.addr.port())),
    )
    .await;
    assert!(e.contains("more than 5 times"), "{e}");
}

#[tokio::test]
async fn bodies_over_the_cap_are_refused_without_reading_them_all() {
    let server = TestServer::http(public(), |path: &str| match path {
        "/declared" => Reply::Declared(10 * 1024 * 1024),
        "/endless" => Reply::Endless,
        _ => Reply::Status(404),
    })
    .await;
    let f = fetcher(policy(), Scripted::new(vec![vec![public()]]));
    let e = refusal(
        &f,
        req(format!("http://code.test:{}/declared", server.addr.port())),
    )
    .await;
    assert!(
        e.contains("larger than CodeSource:MaxBytes (1048576 bytes)"),
        "{e}"
    );
    let e = refusal(
        &f,
        req(format!("http://code.test:{}/endless", server.addr.port())),
    )
    .await;
    assert!(e.contains("larger than CodeSource:MaxBytes"), "{e}");
    // The stream never ends; the fetcher stopped a little past the cap.
    let sent = server.streamed.load(Ordering::Relaxed);
    assert!(sent < 16 * 1024 * 1024, "{sent} bytes were streamed");
}

#[tokio::test]
async fn a_stalling_server_hits_the_total_timeout() {
    let server = TestServer::http(public(), |_: &str| Reply::Stall).await;
    let mut p = policy();
    p.timeout = Duration::from_secs(1);
    let f = fetcher(p, Scripted::new(vec![vec![public()]]));
    let started = Instant::now();
    let e = refusal(
        &f,
        req(format!("http://code.test:{}/w.py", server.addr.port())),
    )
    .await;
    assert!(
        e.contains("longer than CodeSource:FetchTimeoutSeconds (1 s)"),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the timeout fired"
    );
}

#[tokio::test]
async fn the_hash_is_checked_in_hex_and_sri_form() {
    let server = TestServer::http(public(), code_server_route).await;
    let f = fetcher(policy(), Scripted::new(vec![vec![public()]]));
    let url = format!("http://code.test:{}/w.py", server.addr.port());
    let digest = Sha256::digest(CODE);
    use base64::Engine as _;
    for good in [
        hex::encode(digest),
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ),
    ] {
        let mut r = req(url.clone());
        r.content_sha256 = Some(good);
        assert_eq!(f.fetch(&r).await.unwrap(), CODE);
    }
    let mut r = req(url.clone());
    r.content_sha256 = Some(hex::encode(Sha256::digest(b"other code")));
    let e = refusal(&f, r).await;
    assert!(e.contains("does not match the expected SHA-256"), "{e}");
    let mut r = req(url);
    r.content_sha256 = Some("not-a-hash".into());
    let before = server.requests().len();
    let e = refusal(&f, r).await;
    assert!(e.contains("64 hex digits"), "{e}");
    assert_eq!(
        server.requests().len(),
        before,
        "a malformed hash costs no request"
    );
}

#[tokio::test]
async fn credentials_reach_only_their_hosts_and_never_cross_a_redirect() {
    let other = TestServer::http(public(), code_server_route).await;
    let to_other = format!("http://other.test:{}/w.py", other.addr.port());
    let code = TestServer::http(public(), move |path: &str| match path {
        "/w.py" => Reply::Body(CODE.to_vec()),
        _ => Reply::Redirect(to_other.clone()),
    })
    .await;
    let mut creds = HashMap::new();
    creds.insert(
        "Registry".to_string(),
        NamedCredential {
            username: Some("ci".into()),
            token: "s3cret".into(),
            hosts: vec![HostPattern::parse("code.test").unwrap()],
        },
    );
    let f = fetcher_with(policy(), Scripted::new(vec![vec![public()]]), creds);
    let port = code.addr.port();

    // Named, to its host: sent as Basic.
    let mut r = req(format!("http://code.test:{port}/w.py"));
    r.credential_name = Some("registry".into());
    f.fetch(&r).await.unwrap();
    let seen = code.requests();
    let auth = seen[0]
        .header("authorization")
        .unwrap_or_default()
        .to_string();
    assert!(auth.starts_with("Basic "), "{auth}");

    // Redirected to another host: that hop carries no credential.
    let mut r = req(format!("http://code.test:{port}/moved"));
    r.credential_name = Some("registry".into());
    f.fetch(&r).await.unwrap();
    assert_eq!(
        code.requests()[1].header("authorization"),
        Some(auth.as_str())
    );
    assert_eq!(other.requests().len(), 1);
    assert_eq!(other.requests()[0].header("authorization"), None);

    // Named, for a host it is not configured for: refused, nothing sent.
    let mut r = req(format!("http://other.test:{}/w.py", other.addr.port()));
    r.credential_name = Some("registry".into());
    let e = refusal(&f, r).await;
    assert!(e.contains("not for host other.test"), "{e}");
    assert_eq!(other.requests().len(), 1);
    // Unknown names are refused with the configuration key to set.
    let mut r = req(format!("http://code.test:{port}/w.py"));
    r.credential_name = Some("nope".into());
    let e = refusal(&f, r).await;
    assert!(e.contains("CodeSourceCredentials:nope:Token"), "{e}");

    // Per-request bearer: sent to the URL's host, not across the redirect.
    let mut r = req(format!("http://code.test:{port}/moved-again"));
    r.raw_credential = Some(RawCredential::Bearer {
        token: "once".into(),
    });
    f.fetch(&r).await.unwrap();
    let last = code.requests().pop().unwrap();
    assert_eq!(last.header("authorization"), Some("Bearer once"));
    assert_eq!(other.requests()[1].header("authorization"), None);
}

#[tokio::test]
async fn https_with_a_test_ca_as_extra_root() {
    let (ca_pem, tls) = test_ca();
    let server = TestServer::https(public(), tls, code_server_route).await;
    let url = format!("https://localhost:{}/w.py", server.addr.port());
    // Without the CA the certificate is not trusted.
    let f = fetcher(policy(), Scripted::new(vec![vec![public()]]));
    let e = refusal(&f, req(url.clone())).await;
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );
    let mut p = policy();
    p.extra_roots_pem = vec![ca_pem.into_bytes()];
    let f = fetcher(p, Scripted::new(vec![vec![public()]]));
    assert_eq!(f.fetch(&req(url)).await.unwrap(), CODE);
}

#[tokio::test]
async fn allow_private_networks_lets_a_local_server_serve_code() {
    let server = TestServer::http(trap_ip(), code_server_route).await;
    let mut p = policy();
    p.public_overrides.clear();
    p.allow_private_networks = true;
    let f = fetcher(p, Scripted::new(vec![vec![trap_ip()]]));
    let body = f
        .fetch(&req(format!(
            "http://127.0.0.2:{}/w.py",
            server.addr.port()
        )))
        .await
        .unwrap();
    assert_eq!(body, CODE);
    let e = refusal(
        &f,
        req(format!("http://127.0.0.2:{}/missing", server.addr.port())),
    )
    .await;
    assert!(e.contains("404"), "{e}");
}
