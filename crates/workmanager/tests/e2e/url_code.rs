//! Worker code from URLs, end to end: the real service fetching from real
//! local HTTP servers. The fetcher's rules one by one (redirects, caps,
//! timeouts, credential scoping, HTTPS roots, DNS pinning) are tested
//! against real servers in the workmanager-fetch crate; here: the service's
//! refusals, creation and hot reload from URLs, and recovery re-fetching.
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tonic::Code;
use workmanager_api::pb;
use workmanager_api::pb::WorkerStatus;
use workmanager_fetch::testing::{Reply, TestServer};

use crate::common::*;

fn url_source(url: &str, sha256: &str) -> Option<pb::CodeSource> {
    Some(pb::CodeSource {
        source: Some(pb::code_source::Source::Url(url.to_string())),
        content_sha256: sha256.to_string(),
        ..Default::default()
    })
}

fn url_req(url: &str, sha256: &str) -> pb::CreateWorkerRequest {
    pb::CreateWorkerRequest {
        code_source: url_source(url, sha256),
        mime_type: "text/x-python".into(),
        topics: vec!["in".into()],
        start: true,
        ..Default::default()
    }
}

fn sha(code: &str) -> String {
    hex::encode(Sha256::digest(code.as_bytes()))
}

/// Serves `versioned(<name>)` at `/<name>.py` for every name in `names`.
async fn code_server(names: &'static [&'static str]) -> TestServer {
    TestServer::http("127.0.0.1".parse().unwrap(), move |path: &str| {
        let name = path.trim_start_matches('/').trim_end_matches(".py");
        if names.contains(&name) {
            Reply::Body(versioned(name).into_bytes())
        } else {
            Reply::Status(404)
        }
    })
    .await
}

#[tokio::test]
async fn refused_urls_say_which_rule_and_cause_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = code_server(&["v1"]).await;
    let port = server.addr.port();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    for (url, rule) in [
        (
            format!("http://127.0.0.1:{port}/v1.py"),
            "host 127.0.0.1 is a loopback address",
        ),
        (
            format!("http://2130706433:{port}/v1.py"),
            "host 127.0.0.1 is a loopback address",
        ),
        (
            format!("http://0x7f.1:{port}/v1.py"),
            "host 127.0.0.1 is a loopback address",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/v1.py"),
            "loopback address (127.0.0.0/8), written as an IPv4-mapped",
        ),
        (
            format!("http://localhost:{port}/v1.py"),
            "host localhost resolves to",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "host 169.254.169.254 is a link-local address",
        ),
        (
            format!("http://example.com@127.0.0.1:{port}/v1.py"),
            "carries credentials",
        ),
        ("file:///etc/passwd".to_string(), "only https and http"),
    ] {
        let e = c.create_worker(url_req(&url, "")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{url}: {e:?}");
        assert!(e.message().contains(rule), "{url}: {}", e.message());
    }
    // The same over REST (400) and for a hot reload of an existing worker.
    let http = reqwest::Client::new();
    let r = http
        .post(svc.url("/v1/workers"))
        .json(
            &json!({"codeSource": {"url": format!("http://127.0.0.1:{port}/v1.py")},
                      "mimeType": "text/x-python", "topics": ["in"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("code sources must be public"),
        "{body}"
    );
    let id = create(&mut c, &versioned("content"), true).await;
    let e = c
        .load_code_from_url(pb::LoadCodeFromUrlRequest {
            id: id.clone(),
            url: format!("http://127.0.0.1:{port}/v1.py"),
            content_sha256: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        invoke(&mut c, &id, json!(1)).await.unwrap()["data"]["version"],
        "content"
    );
    assert!(
        server.requests().is_empty(),
        "a refused URL must cause no request"
    );
    let refusal = |l: &str| {
        l.contains("\"audit\"") && l.contains("LoadCodeFromUrl") && l.contains("must be public")
    };
    let logs = svc.logs_with(refusal).await;
    assert!(
        logs.lines().any(refusal),
        "every refusal leaves an audit record"
    );
}

#[tokio::test]
async fn a_worker_is_created_and_reloaded_from_urls_with_hashes_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = code_server(&["v1", "v2"]).await;
    // A proxy from the environment must be ignored: it would see the request.
    let proxy = TestServer::http("127.0.0.1".parse().unwrap(), |_: &str| Reply::Status(502)).await;
    let proxy_url = format!("http://{}", proxy.addr);
    let svc = Service::start_env(
        dir.path(),
        &[
            "CodeSource:AllowPrivateNetworks=true",
            "AllowedCodeSourceHosts=127.0.0.1",
        ],
        &[
            ("HTTP_PROXY", &proxy_url),
            ("http_proxy", &proxy_url),
            ("ALL_PROXY", &proxy_url),
        ],
    );
    svc.wait_ready().await;
    let mut c = svc.grpc().await;
    let v1 = server.url("http", "/v1.py");

    let e = c
        .create_worker(url_req(&v1, &sha("something else")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("does not match the expected SHA-256"),
        "{}",
        e.message()
    );

    let id = c
        .create_worker(url_req(&v1, &sha(&versioned("v1"))))
        .await
        .unwrap()
        .into_inner()
        .id;
    assert_eq!(status(&mut c, &id).await, WorkerStatus::Running);
    assert_eq!(
        invoke(&mut c, &id, json!(1)).await.unwrap()["data"]["version"],
        "v1"
    );

    // Hot reload from another URL; a wrong hash keeps the running code.
    let v2 = server.url("http", "/v2.py");
    let e = c
        .load_code_from_url(pb::LoadCodeFromUrlRequest {
            id: id.clone(),
            url: v2.clone(),
            content_sha256: sha("nope"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        invoke(&mut c, &id, json!(1)).await.unwrap()["data"]["version"],
        "v1"
    );
    c.load_code_from_url(pb::LoadCodeFromUrlRequest {
        id: id.clone(),
        url: v2.clone(),
        content_sha256: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        invoke(&mut c, &id, json!(1)).await.unwrap()["data"]["version"],
        "v2"
    );

    // History keeps the URLs and hashes.
    let h = c
        .get_worker_history(pb::GetWorkerHistoryRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let urls: Vec<(String, String)> = h
        .entries
        .iter()
        .map(|e| {
            let cs = e.code_source.clone().unwrap_or_default();
            let url = match cs.source {
                Some(pb::code_source::Source::Url(u)) => u,
                _ => String::new(),
            };
            (url, cs.content_sha256)
        })
        .collect();
    assert_eq!(
        urls,
        vec![(v1, sha(&versioned("v1"))), (v2, sha(&versioned("v2")))]
    );
    // Not in the allow-list: refused although private networks are allowed.
    let e = c
        .create_worker(url_req(
            &format!("http://localhost:{}/v1.py", server.addr.port()),
            "",
        ))
        .await
        .unwrap_err();
    assert!(
        e.message()
            .contains("localhost is not in AllowedCodeSourceHosts"),
        "{}",
        e.message()
    );
    assert!(
        proxy.requests().is_empty(),
        "the environment's proxy was not used"
    );
}

#[tokio::test]
async fn restart_refetches_url_workers_and_fails_only_the_one_whose_hash_changed() {
    let dir = tempfile::tempdir().unwrap();
    let changing = Arc::new(Mutex::new(versioned("b1")));
    let served = changing.clone();
    let server = TestServer::http("127.0.0.1".parse().unwrap(), move |path: &str| match path {
        "/a.py" => Reply::Body(versioned("a").into_bytes()),
        "/b.py" => Reply::Body(served.lock().unwrap().clone().into_bytes()),
        _ => Reply::Status(404),
    })
    .await;
    let settings = [
        "CodeSource:AllowPrivateNetworks=true",
        "CodeSourceCredentials:registry:Username=ci",
        "CodeSourceCredentials:registry:Hosts=127.0.0.1",
    ];
    let env = [("CodeSourceCredentials__registry__Token", "t0ken")];
    let (a, b, plain) = {
        let mut svc = Service::start_env(dir.path(), &settings, &env);
        svc.wait_ready().await;
        let mut c = svc.grpc().await;
        let mut with_cred = url_req(&server.url("http", "/a.py"), "");
        if let Some(cs) = with_cred.code_source.as_mut() {
            cs.credential = Some(pb::SourceCredential {
                scheme: Some(pb::source_credential::Scheme::Named("registry".into())),
            });
        }
        let a = c.create_worker(with_cred).await.unwrap().into_inner().id;
        let b = c
            .create_worker(url_req(
                &server.url("http", "/b.py"),
                &sha(&versioned("b1")),
            ))
            .await
            .unwrap()
            .into_inner()
            .id;
        let plain = create(&mut c, &versioned("plain"), true).await;
        assert!(svc.terminate().success());
        (a, b, plain)
    };
    *changing.lock().unwrap() = versioned("b2");
    let svc = Service::start_env(dir.path(), &settings, &env);
    svc.wait_ready().await;
    let mut c = svc.grpc().await;
    assert_eq!(status(&mut c, &a).await, WorkerStatus::Running);
    assert_eq!(
        invoke(&mut c, &a, json!(1)).await.unwrap()["data"]["version"],
        "a"
    );
    assert_eq!(status(&mut c, &plain).await, WorkerStatus::Running);
    let info = c
        .get_worker(pb::GetWorkerRequest { id: b })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.status(), WorkerStatus::Failed);
    assert!(
        info.last_error
            .contains("does not match the expected SHA-256"),
        "{}",
        info.last_error
    );
    // Both fetches of a.py carried the named credential; nothing else did.
    let seen = server.requests();
    let auth: Vec<(String, bool)> = seen
        .iter()
        .map(|r| (r.path.clone(), r.header("authorization").is_some()))
        .collect();
    assert_eq!(
        auth.iter().filter(|(p, has)| p == "/a.py" && *has).count(),
        2,
        "{auth:?}"
    );
    assert!(auth.iter().all(|(p, has)| p == "/a.py" || !has), "{auth:?}");
    // The secret is in no log line.
    assert!(!svc.logs().contains("t0ken"));
}
