//! Edge security end to end: real TLS handshakes with certificates made
//! here, real tokens and keys, the real gRPC and HTTP clients.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use workmanager_api::pb;
use workmanager_api::pb::work_manager_client::WorkManagerClient;

use crate::common::*;

/// A CA that can sign server and client certificates, as PEM files.
pub(crate) struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

pub(crate) struct Pem {
    pub(crate) cert: String,
    pub(crate) key: String,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap())
                .unwrap(),
        }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub(crate) fn leaf(&self, names: &[&str], expired: bool) -> Pem {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub(crate) async fn grpc_tls(
    port: u16,
    ca: &str,
    client: Option<&Pem>,
) -> Result<WorkManagerClient<Channel>, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
    }
    let ch = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(WorkManagerClient::new(ch))
}

/// ListWorkers over TLS: Ok, or the failure.
async fn list_tls(port: u16, ca: &str, client: Option<&Pem>) -> Result<(), String> {
    let mut c = grpc_tls(port, ca, client).await?;
    c.list_workers(pb::ListWorkersRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

fn https(ca: &str, client: Option<&Pem>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .resolve("localhost", "127.0.0.1:0".parse().unwrap());
    if let Some(c) = client {
        b = b.identity(
            reqwest::Identity::from_pem(format!("{}{}", c.cert, c.key).as_bytes()).unwrap(),
        );
    }
    b.build().unwrap()
}

#[tokio::test]
async fn mtls_admits_only_clients_with_a_valid_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("workmanager test CA");
    let server = ca.leaf(&["localhost", "127.0.0.1"], false);
    let settings = [
        format!(
            "Tls:CertificatePath={}",
            write(dir.path(), "server.pem", &server.cert).display()
        ),
        format!(
            "Tls:KeyPath={}",
            write(dir.path(), "server.key", &server.key).display()
        ),
        format!(
            "Tls:ClientCaPath={}",
            write(dir.path(), "ca.pem", &ca.pem()).display()
        ),
        "Auth:Certificates:ci:Name=ci.client.test".to_string(),
        "Auth:Certificates:ci:Role=operator".to_string(),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let svc = Service::start(dir.path(), &settings);
    let good = ca.leaf(&["ci.client.test"], false);
    let unmapped = ca.leaf(&["someone.else.test"], false);
    let expired = ca.leaf(&["ci.client.test"], true);
    let foreign = Ca::new("another CA").leaf(&["ci.client.test"], false);

    // Readiness, through the TLS port with the right certificate.
    let deadline = Instant::now() + Duration::from_secs(30);
    while list_tls(svc.grpc, &ca.pem(), Some(&good)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            list_tls(svc.grpc, &ca.pem(), Some(&good)).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (what, client) in [
        ("no certificate", None),
        ("expired", Some(&expired)),
        ("another CA", Some(&foreign)),
    ] {
        assert!(
            list_tls(svc.grpc, &ca.pem(), client).await.is_err(),
            "gRPC with {what} must be refused"
        );
        let r = https(&ca.pem(), client)
            .get(format!("https://localhost:{}/v1/workers", svc.http))
            .send()
            .await;
        assert!(r.is_err(), "HTTPS with {what} must be refused: {r:?}");
    }
    // A verified certificate whose name maps to no role is authenticated by
    // TLS but has no role here: 401.
    let r = https(&ca.pem(), Some(&unmapped))
        .get(format!("https://localhost:{}/v1/workers", svc.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The mapped certificate is an operator: it may list, not create.
    let r = https(&ca.pem(), Some(&good))
        .get(format!("https://localhost:{}/v1/workers", svc.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut c = grpc_tls(svc.grpc, &ca.pem(), Some(&good)).await.unwrap();
    let e = c
        .create_worker(create_req(&versioned("x"), false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("needs the admin role"),
        "{}",
        e.message()
    );
    // Plain text to a TLS port gets nothing.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/health", svc.http))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    let plain_grpc = Channel::from_shared(format!("http://127.0.0.1:{}", svc.grpc))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain_grpc {
        let r = WorkManagerClient::new(ch)
            .list_workers(pb::ListWorkersRequest::default())
            .await;
        assert!(r.is_err(), "plain gRPC must fail");
    }
    let denied = |l: &str| l.contains("permission denied: needs admin, has operator");
    assert!(
        svc.logs_with(denied).await.lines().any(denied),
        "refusals are audited"
    );
}

#[tokio::test]
async fn a_rotated_certificate_is_used_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let old = old_ca.leaf(&["localhost"], false);
    let cert = write(dir.path(), "server.pem", &old.cert);
    let key = write(dir.path(), "server.key", &old.key);
    let settings = [
        format!("Tls:CertificatePath={}", cert.display()),
        format!("Tls:KeyPath={}", key.display()),
        "Tls:ReloadIntervalSeconds=1".to_string(),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let svc = Service::start(dir.path(), &settings);
    let deadline = Instant::now() + Duration::from_secs(30);
    while list_tls(svc.grpc, &old_ca.pem(), None).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the service never answered over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(list_tls(svc.grpc, &new_ca.pem(), None).await.is_err());
    let new = new_ca.leaf(&["localhost"], false);
    // Key first, then certificate: a half-written pair is refused and the
    // old one kept until both match.
    std::fs::write(&key, &new.key).unwrap();
    std::fs::write(&cert, &new.cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while list_tls(svc.grpc, &new_ca.pem(), None).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        list_tls(svc.grpc, &old_ca.pem(), None).await.is_err(),
        "the old certificate is gone"
    );
    let https_ok = https(&new_ca.pem(), None)
        .get(format!("https://localhost:{}/health/live", svc.http))
        .send()
        .await
        .unwrap();
    assert_eq!(https_ok.status(), 200);
}

fn hs256(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn authed<T>(msg: T, header: &str, value: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        tonic::metadata::MetadataKey::from_bytes(header.as_bytes()).unwrap(),
        value.parse().unwrap(),
    );
    r
}

#[tokio::test]
async fn tokens_and_api_keys_decide_what_each_caller_may_do() {
    const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";
    let dir = tempfile::tempdir().unwrap();
    let viewer_key = "viewer-key-123";
    let sha = hex::encode(Sha256::digest(viewer_key.as_bytes()));
    let settings = [
        "Auth:Jwt:Algorithm=HS256".to_string(),
        "Auth:Jwt:Secret=secret:env:WM_TEST_JWT_SECRET".to_string(),
        "Auth:Jwt:Issuer=https://issuer.test".to_string(),
        "Auth:Jwt:Audience=workmanager".to_string(),
        format!("Auth:ApiKeys:dashboard:Sha256={sha}"),
        "Auth:ApiKeys:dashboard:Role=viewer".to_string(),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let svc = Service::start_env(dir.path(), &settings, &[("WM_TEST_JWT_SECRET", SECRET)]);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = |role: &str, exp: i64| {
        let t = hs256(
            SECRET,
            serde_json::json!({"sub": format!("{role}-user"), "iss": "https://issuer.test",
            "aud": "workmanager", "exp": exp, "roles": [role]}),
        );
        format!("Bearer {t}")
    };
    let (admin, operator) = (token("admin", now + 600), token("operator", now + 600));
    let http = reqwest::Client::new();

    // Health stays open; readiness is reachable without credentials.
    svc.wait_ready().await;
    let mut c = svc.grpc().await;

    // No credentials: UNAUTHENTICATED / 401 with a challenge.
    let e = c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let r = http.get(svc.url("/v1/workers")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"workmanager\""
    );

    // Expired, forged, oversized and alg=none tokens: all 401, all alike.
    let forged = format!(
        "Bearer {}",
        hs256(
            "not-the-secret-but-32-bytes-long!!!",
            serde_json::json!({
        "sub": "x", "iss": "https://issuer.test", "aud": "workmanager", "exp": now + 600, "roles": ["admin"]})
        )
    );
    let none = {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        format!(
            "Bearer {}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(br#"{"sub":"x","roles":["admin"]}"#)
        )
    };
    // Over our 8 KiB token limit, under HTTP/2's header limit.
    let huge = format!("Bearer {}", "a".repeat(10 * 1024));
    for bad in [token("admin", now - 600), forged, none, huge] {
        let e = c
            .list_workers(authed(
                pb::ListWorkersRequest::default(),
                "authorization",
                &bad,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::Unauthenticated,
            "{}",
            &bad[..bad.len().min(40)]
        );
    }
    // Viewer (API key): reads, but cannot create.
    c.list_workers(authed(
        pb::ListWorkersRequest::default(),
        "x-api-key",
        viewer_key,
    ))
    .await
    .unwrap();
    let e = c
        .create_worker(authed(
            create_req(&versioned("v"), true),
            "x-api-key",
            viewer_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("needs the admin role")),
        (Code::PermissionDenied, true)
    );
    let r = http
        .post(svc.url("/v1/workers"))
        .header("x-api-key", viewer_key)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Admin creates; operator starts and stops but cannot delete.
    let id = c
        .create_worker(authed(
            create_req(&versioned("v"), false),
            "authorization",
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    c.start_worker(authed(
        pb::StartWorkerRequest { id: id.clone() },
        "authorization",
        &operator,
    ))
    .await
    .unwrap();
    let r = http
        .post(svc.url(&format!("/v1/workers/{id}/stop")))
        .header("authorization", &operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e = c
        .delete_worker(authed(
            pb::DeleteWorkerRequest { id: id.clone() },
            "authorization",
            &operator,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Audit records carry the principal and the source address.
    // The log writer is asynchronous: give the last records a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !svc.logs().contains("DeleteWorker") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = svc.logs();
    assert!(
        logs.lines().any(|l| l.contains("CreateWorker")
            && l.contains("jwt:admin-user")
            && l.contains("127.0.0.1")),
        "audit identity missing"
    );
    assert!(logs
        .lines()
        .any(|l| l.contains("StopWorker") && l.contains("jwt:operator-user")));
    assert!(
        logs.contains("unauthenticated"),
        "failed attempts are audited"
    );
    assert!(
        !logs.contains(SECRET) && !logs.contains(viewer_key),
        "no secret in the logs"
    );
    let r = http.get(svc.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200, "metrics stay open by default");
    // Beyond the header limit the transport refuses it before anyone reads
    // it (on its own connection: HTTP/2 may close the connection for it).
    let giant = format!("Bearer {}", "a".repeat(64 * 1024));
    let mut fresh = svc.grpc().await;
    assert!(fresh
        .list_workers(authed(
            pb::ListWorkersRequest::default(),
            "authorization",
            &giant
        ))
        .await
        .is_err());
}

#[tokio::test]
async fn the_cli_speaks_mtls_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cli CA");
    let server = ca.leaf(&["localhost"], false);
    let client = ca.leaf(&["cli.client.test"], false);
    let key = "cli-admin-key";
    let settings = [
        format!(
            "Tls:CertificatePath={}",
            write(dir.path(), "s.pem", &server.cert).display()
        ),
        format!(
            "Tls:KeyPath={}",
            write(dir.path(), "s.key", &server.key).display()
        ),
        format!(
            "Tls:ClientCaPath={}",
            write(dir.path(), "ca.pem", &ca.pem()).display()
        ),
        format!(
            "Auth:ApiKeys:cli:Sha256={}",
            hex::encode(Sha256::digest(key.as_bytes()))
        ),
        "Auth:ApiKeys:cli:Role=admin".to_string(),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let svc = Service::start(dir.path(), &settings);
    let code = write(dir.path(), "w.py", &versioned("cli"));
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["--server", &format!("https://localhost:{}", svc.grpc)])
            .arg("--ca")
            .arg(dir.path().join("ca.pem"))
            .arg("--cert")
            .arg(write(dir.path(), "c.pem", &client.cert))
            .arg("--key")
            .arg(write(dir.path(), "c.key", &client.key))
            .args(extra)
            .env("WORKMANAGER_API_KEY", key)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let (ok, out, err) = run(&[
            "workers",
            "create",
            "--topic",
            "t",
            "--file",
            code.to_str().unwrap(),
        ]);
        if ok {
            break out.trim().to_string();
        }
        assert!(Instant::now() < deadline, "{err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (ok, out, err) = run(&["workers", "list"]);
    assert!(ok && out.contains(&id), "{out}{err}");
    // Without the key: the service's refusal, said plainly.
    let out = std::process::Command::new(BIN)
        .args(["--server", &format!("https://localhost:{}", svc.grpc)])
        .arg("--ca")
        .arg(dir.path().join("ca.pem"))
        .args(["--cert", dir.path().join("c.pem").to_str().unwrap()])
        .args(["--key", dir.path().join("c.key").to_str().unwrap()])
        .args(["workers", "list"])
        .env_remove("WORKMANAGER_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("authentication required"));
}
