//! The service on real redis-server and nats-server processes (started by
//! the tests on free loopback ports): state in Redis, events in Redis
//! Streams or NATS JetStream.
use serde_json::json;
use workmanager_api::pb;
use workmanager_api::pb::WorkerStatus;
use workmanager_backends::testing::RedisServer;

use crate::common::*;

#[tokio::test]
async fn workers_live_in_redis_and_come_back_on_a_fresh_instance() {
    let redis = RedisServer::start_with(Some("s3cret-pass"));
    let env = [("WM_REDIS_PASSWORD", "s3cret-pass")];
    let url = format!("Redis:Url=redis://127.0.0.1:{}", redis.port);
    let settings = [
        "StateStore:Type=redis",
        url.as_str(),
        "Redis:Password=secret:env:WM_REDIS_PASSWORD",
    ];
    let (running, stopped) = {
        let dir = tempfile::tempdir().unwrap();
        let mut svc = Service::start_env(dir.path(), &settings, &env);
        svc.wait_ready().await;
        let mut c = svc.grpc().await;
        let running = create(&mut c, &versioned("r1"), true).await;
        let stopped = create(&mut c, &versioned("s1"), false).await;
        c.load_code_from_content(pb::LoadCodeFromContentRequest {
            id: running.clone(),
            content: versioned("r2").into_bytes(),
        })
        .await
        .unwrap();
        assert!(svc.terminate().success());
        assert!(
            !svc.logs().contains("s3cret-pass"),
            "the password is never logged"
        );
        (running, stopped)
    };
    // Another directory: nothing local survives, only Redis.
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_env(dir.path(), &settings, &env);
    svc.wait_ready().await;
    let mut c = svc.grpc().await;
    assert_eq!(status(&mut c, &running).await, WorkerStatus::Running);
    assert_eq!(status(&mut c, &stopped).await, WorkerStatus::Stopped);
    assert_eq!(
        invoke(&mut c, &running, json!(1)).await.unwrap()["data"]["version"],
        "r2"
    );
    let h = c
        .get_worker_history(pb::GetWorkerHistoryRequest { id: running })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.entries.len(), 2);
}

#[test]
fn a_wrong_redis_password_stops_start_up_naming_the_setting() {
    let redis = RedisServer::start_with(Some("right"));
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--http-port", "0", "--grpc-port", "0"])
        .args(["--set", "StateStore:Type=redis"])
        .args([
            "--set",
            &format!("Redis:Url=redis://:wrong@127.0.0.1:{}", redis.port),
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("refused the credentials") && text.contains("Redis:Url"),
        "{text}"
    );
    assert!(
        !text.contains(":wrong@"),
        "the password is not echoed: {text}"
    );
}

const ECHO: &str = "def Process(event):\n    return {'type': 'out', 'data': event['data']}\n";

fn redis_settings(redis: &RedisServer) -> Vec<String> {
    vec![
        "StateStore:Type=redis".into(),
        "PubSub:Type=redis".into(),
        format!("Redis:Url={}", redis.url()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn events_flow_through_redis_streams_and_wait_for_a_stopped_service() {
    let redis = RedisServer::start();
    let settings = redis_settings(&redis);
    let bus = test_redis_bus(&redis.url(), "test-publisher").await;
    events_flow_and_wait(&settings, &bus).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_flow_through_nats_jetstream_and_wait_for_a_stopped_service() {
    let nats = workmanager_backends::testing::NatsServer::start();
    let settings = vec![
        "PubSub:Type=nats".to_string(),
        format!("Nats:Url={}", nats.url()),
    ];
    let bus = workmanager_backends::NatsBus::connect(
        &nats.url(),
        workmanager_backends::NatsAuth::default(),
        workmanager_backends::NatsBusSettings {
            stream_max_messages: 100_000,
            ack_wait: std::time::Duration::from_secs(60),
            max_deliver: 5,
            capacity: 16,
            dedup_window: std::time::Duration::from_secs(60),
        },
    )
    .await
    .unwrap();
    events_flow_and_wait(&settings, &bus).await;
}

/// 200 events through a worker on the given bus, all outputs observed; then,
/// with the service stopped, 50 more published straight to the bus are
/// processed exactly once when it starts again.
async fn events_flow_and_wait(settings: &[String], bus: &dyn workmanager_core::bus::Bus) {
    use tokio_stream::StreamExt;
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let mut svc = Service::start(dir.path(), &settings);
        svc.wait_ready().await;
        let mut c = svc.grpc().await;
        let id = create(&mut c, ECHO, true).await;
        let mut out = c
            .subscribe(pb::SubscribeRequest {
                topic: "out".into(),
            })
            .await
            .unwrap()
            .into_inner();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let http = reqwest::Client::new();
        let batch: Vec<serde_json::Value> = (0..200)
            .map(|i| json!({"specversion": "1.0", "id": format!("ev-{i}"), "source": "urn:t", "type": "in", "data": i}))
            .collect();
        let r = http
            .post(svc.url("/v1/topics/in"))
            .header("content-type", "application/cloudevents-batch+json")
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 200 {
            let m = tokio::time::timeout(std::time::Duration::from_secs(20), out.next())
                .await
                .expect("outputs keep coming")
                .unwrap()
                .unwrap();
            let e = workmanager_api::convert::event_from_proto(m.event.unwrap()).unwrap();
            seen.insert(e.0["data"].as_i64().unwrap());
        }
        assert_eq!(seen, (0..200).collect());
        assert!(svc.terminate().success());
        id
    };
    // Published while no instance runs: the events wait in the stream.
    let later: Vec<workmanager_core::CloudEvent> = (1000..1050)
        .map(|i| {
            workmanager_core::CloudEvent::from_input(
                json!({"specversion": "1.0", "id": format!("late-{i}"), "source": "urn:t", "type": "in", "data": i}),
            )
        })
        .collect();
    bus.publish_many("in", later).await.unwrap();
    let svc = Service::start(dir.path(), &settings);
    svc.wait_ready().await;
    let mut c = svc.grpc().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let w = c
            .get_worker(pb::GetWorkerRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if w.messages_processed >= 50 {
            assert_eq!(w.messages_processed, 50, "each waiting event once");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processed {}",
            w.messages_processed
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn state_and_events_over_rediss_with_a_client_certificate() {
    let ca = crate::security::Ca::new("redis CA");
    let certs = tempfile::tempdir().unwrap();
    let server = ca.leaf(&["127.0.0.1", "localhost"], false);
    let client = ca.leaf(&["workmanager"], false);
    let w = |name: &str, text: &str| crate::security::write(certs.path(), name, text);
    let ca_path = w("ca.pem", &ca.pem());
    let redis = RedisServer::start_tls(
        &w("server.pem", &server.cert),
        &w("server.key", &server.key),
        &ca_path,
    );
    let settings = [
        "StateStore:Type=redis".to_string(),
        "PubSub:Type=redis".to_string(),
        format!("Redis:Url={}", redis.url()),
        format!("Redis:CaPath={}", ca_path.display()),
        format!(
            "Redis:ClientCertificatePath={}",
            w("client.pem", &client.cert).display()
        ),
        format!(
            "Redis:ClientKeyPath={}",
            w("client.key", &client.key).display()
        ),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start(dir.path(), &settings);
    svc.wait_ready().await;
    let mut c = svc.grpc().await;
    let id = create(&mut c, ECHO, true).await;
    assert_eq!(status(&mut c, &id).await, WorkerStatus::Running);
    assert_eq!(
        invoke(&mut c, &id, json!(3)).await.unwrap()["data"],
        json!(3)
    );
}
