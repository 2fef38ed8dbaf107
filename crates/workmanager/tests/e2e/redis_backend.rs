//! The service on a real redis-server (started by the test on a free
//! loopback port): state lives in Redis, not in the instance's files.
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
