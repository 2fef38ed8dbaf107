//! The CLI binary against a running service.
use std::process::Command;

use serde_json::Value;

use crate::common::*;

fn wm(svc: &Service, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--server")
        .arg(svc.server())
        .args(args)
        .output()
        .expect("run the CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_drives_a_worker_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let file = dir.path().join("worker.py");
    std::fs::write(
        &file,
        "def Process(event):\n    return {'type': 'doubled', 'data': event['data']['x'] * 2}\n",
    )
    .unwrap();

    let (ok, id, err) = wm(
        &svc,
        &[
            "workers",
            "create",
            "--topic",
            "prices",
            "--file",
            file.to_str().unwrap(),
            "--tag",
            "desk=fx",
            "--start",
        ],
    );
    assert!(ok, "{err}");
    let id = id.trim().to_string();

    let (ok, out, _) = wm(&svc, &["workers", "list"]);
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("ID"), "{out}");
    assert!(
        out.contains(&id) && out.contains("RUNNING") && out.contains("desk=fx"),
        "{out}"
    );

    let (ok, out, _) = wm(&svc, &["-o", "json", "workers", "list", "--tag", "desk=fx"]);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["workers"][0]["id"], id.as_str());

    let (ok, out, err) = wm(&svc, &["workers", "invoke", &id, "--data", r#"{"x": 21}"#]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["data"].as_i64()),
        (Some("doubled"), Some(42))
    );

    assert!(wm(&svc, &["tags", "set", &id, "owner=ana", "tier=1"]).0);
    let (ok, out, _) = wm(&svc, &["tags", "get", &id, "owner"]);
    assert!(ok);
    assert_eq!(out.trim(), "ana");

    let (ok, out, _) = wm(&svc, &["workers", "stop", &id]);
    assert!(ok);
    assert!(out.contains("STOPPED"), "{out}");
    let (ok, out, _) = wm(&svc, &["workers", "history", &id]);
    assert!(ok && out.contains("content"), "{out}");
    let (ok, out, _) = wm(&svc, &["engines"]);
    assert!(ok && out.contains("text/x-python"), "{out}");
    assert!(wm(&svc, &["workers", "delete", &id]).0);

    // Errors: non-zero exit and the server's reason on stderr.
    let (ok, _, err) = wm(&svc, &["workers", "get", &id]);
    assert!(!ok);
    assert!(err.contains("NOT_FOUND") && err.contains(&id), "{err}");
    let (ok, _, err) = wm(&svc, &["workers", "invoke", &id, "--data", "{not json"]);
    assert!(!ok && err.contains("--data is not valid JSON"), "{err}");
}

#[tokio::test]
async fn cli_publishes_and_subscribes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut sub = Command::new(BIN)
        .args(["--server", &svc.server(), "subscribe", "cli.topic"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = sub.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // Publish until the subscriber (which connects on its own time) sees one.
    let mut got = None;
    for _ in 0..50 {
        let (ok, _, err) = wm(
            &svc,
            &[
                "publish",
                "cli.topic",
                "--data",
                r#"{"px": 7}"#,
                "--type",
                "cli.test",
            ],
        );
        assert!(ok, "{err}");
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            got = Some(line);
            break;
        }
    }
    let _ = sub.kill();
    let _ = sub.wait();
    let event: Value =
        serde_json::from_str(&got.expect("the subscriber printed no event")).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["data"]["px"].as_i64()),
        (Some("cli.test"), Some(7))
    );
}

#[test]
fn cli_explains_an_unreachable_server() {
    let out = Command::new(BIN)
        .args(["--server", "http://127.0.0.1:1", "workers", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the WorkManager"), "{err}");
}

#[test]
fn serve_refuses_bad_configuration_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--set",
            "Recovery:LeaseTtlSeconds=5",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ])
        .current_dir(dir.path())
        .env("WORKER_RECOVERY_ON_START", "perhaps")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Recovery:LeaseTtlSeconds = \"5\" (from the command line): must be a whole number from 10 to 86400"), "{err}");
    assert!(err.contains("WORKER_RECOVERY_ON_START"), "{err}");
}

// Multi-threaded: the CLI runs as a blocking child process while this
// runtime's test server answers its fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_a_worker_from_a_url_with_its_hash_and_credential() {
    use sha2::{Digest, Sha256};
    use workmanager_fetch::testing::{Reply, TestServer};
    let dir = tempfile::tempdir().unwrap();
    let code = versioned("from-url");
    let served = code.clone();
    let server = TestServer::http("127.0.0.1".parse().unwrap(), move |_: &str| {
        Reply::Body(served.clone().into_bytes())
    })
    .await;
    let svc = Service::start_env(
        dir.path(),
        &[
            "CodeSource:AllowPrivateNetworks=true",
            "CodeSourceCredentials:reg:Hosts=127.0.0.1",
        ],
        &[("CodeSourceCredentials__reg__Token", "tk")],
    );
    svc.wait_ready().await;
    let url = server.url("http", "/w.py");
    let digest = hex::encode(Sha256::digest(code.as_bytes()));
    let (ok, out, err) = wm(
        &svc,
        &[
            "workers",
            "create",
            "--topic",
            "t",
            "--url",
            &url,
            "--sha256",
            &digest,
            "--credential",
            "reg",
            "--start",
        ],
    );
    assert!(ok, "{err}");
    let id = out.trim().to_string();
    let mut c = svc.grpc().await;
    assert_eq!(
        invoke(&mut c, &id, serde_json::json!(1)).await.unwrap()["data"]["version"],
        "from-url"
    );
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some("Bearer tk")
    );
    // A wrong hash: the service's refusal, on stderr, and a failing exit.
    let (ok, _, err) = wm(
        &svc,
        &[
            "workers",
            "create",
            "--topic",
            "t",
            "--url",
            &url,
            "--sha256",
            &"0".repeat(64),
        ],
    );
    assert!(!ok);
    assert!(err.contains("does not match the expected SHA-256"), "{err}");
}
