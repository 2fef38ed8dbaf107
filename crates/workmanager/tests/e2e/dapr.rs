//! Dapr mode end to end, against the fake sidecar of
//! `workmanager_backends::dapr_fake` (the Dapr sidecar cannot be installed
//! on these machines; the fake follows Dapr's documented HTTP API and is the
//! only fake in the project): worker state in the sidecar's state store,
//! events published through it and pushed back to the service, the app
//! token taken from the sidecar's secret store, and recovery from Dapr state.
use std::time::{Duration, Instant};

use serde_json::json;
use workmanager_api::pb;
use workmanager_api::pb::WorkerStatus;
use workmanager_backends::dapr_fake::FakeDaprSidecar;

use crate::common::*;

const ECHO: &str = "def Process(event):\n    return {'type': 'out', 'data': event['data']}\n";

#[tokio::test(flavor = "multi_thread")]
async fn workers_run_on_dapr_state_and_pub_sub() {
    let fake = FakeDaprSidecar::start(Some("sidecar-token")).await;
    fake.set_secret("vault", "app-token", "pushes-from-the-sidecar");
    fake.set_app_token("pushes-from-the-sidecar");
    let port = format!("Dapr:HttpPort={}", fake.port);
    let settings = [
        "StateStore:Type=dapr",
        "PubSub:Type=dapr",
        port.as_str(),
        "Dapr:AppApiToken=secret:dapr:vault/app-token",
        "Dapr:Topics=d-in",
    ];
    let env = [("DAPR_API_TOKEN", "sidecar-token")];
    let dir = tempfile::tempdir().unwrap();
    let mut svc = Service::start_env(dir.path(), &settings, &env);
    svc.wait_ready().await;
    fake.connect_app(&svc.url("")).await;

    let mut c = svc.grpc().await;
    let mut req = create_req(ECHO, true);
    req.topics = vec!["d-in".into()];
    let id = c.create_worker(req).await.unwrap().into_inner().id;

    let http = reqwest::Client::new();
    for i in 0..20 {
        let r = http
            .post(svc.url("/v1/topics/d-in"))
            .header("content-type", "application/cloudevents+json")
            .json(&json!({"specversion": "1.0", "id": format!("d-{i}"), "source": "urn:t", "type": "in", "data": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut got: Vec<i64> = fake
            .published("out")
            .iter()
            .filter_map(|e| e["data"].as_i64())
            .collect();
        got.sort();
        got.dedup();
        if got == (0..20).collect::<Vec<_>>() {
            break;
        }
        assert!(Instant::now() < deadline, "outputs through Dapr: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fake.published("d-in").len(),
        20,
        "inputs went through the sidecar"
    );

    // A push without the sidecar's token is refused.
    let r = http
        .post(svc.url("/dapr/events/d-in"))
        .json(&json!({"specversion": "1.0", "id": "forged", "source": "urn:x", "type": "in", "data": 99}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The worker lives in the sidecar's state store: a fresh instance
    // (another directory) brings it back.
    assert!(svc.terminate().success());
    let dir2 = tempfile::tempdir().unwrap();
    let svc = Service::start_env(dir2.path(), &settings, &env);
    svc.wait_ready().await;
    let mut c = svc.grpc().await;
    assert_eq!(status(&mut c, &id).await, WorkerStatus::Running);
    let w = c
        .get_worker(pb::GetWorkerRequest { id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.topics, vec!["d-in".to_string()]);
}

#[test]
fn a_missing_dapr_secret_stops_start_up_naming_the_setting() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = rt.block_on(FakeDaprSidecar::start(None));
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--http-port", "0", "--grpc-port", "0"])
        .args(["--set", &format!("Dapr:HttpPort={}", fake.port)])
        .args(["--set", "Auth:Jwt:Secret=secret:dapr:vault/missing"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Auth:Jwt:Secret") && text.contains("404"),
        "{text}"
    );
}
