//! Bad input and misbehaving workers: each gets a clear error; the service
//! and the other workers keep working.
use std::collections::BTreeMap;

use serde_json::json;
use tonic::Code;
use workmanager_api::pb;
use workmanager_api::pb::WorkerStatus;

use crate::common::*;

#[tokio::test]
async fn invalid_create_requests_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &["CodeSource:MaxBytes=2000"]).await;
    let mut c = svc.grpc().await;
    let good = versioned("ok");

    let cases: Vec<(&str, pb::CreateWorkerRequest, &str)> = vec![
        (
            "empty MIME",
            pb::CreateWorkerRequest {
                mime_type: String::new(),
                ..create_req(&good, false)
            },
            "mime_type is empty",
        ),
        (
            "unknown MIME",
            pb::CreateWorkerRequest {
                mime_type: "text/x-cobol".into(),
                ..create_req(&good, false)
            },
            "no engine for MIME type",
        ),
        (
            "no topics",
            pb::CreateWorkerRequest {
                topics: vec![],
                ..create_req(&good, false)
            },
            "topics is empty",
        ),
        (
            "no code",
            pb::CreateWorkerRequest {
                code_source: None,
                ..create_req(&good, false)
            },
            "code_source is missing",
        ),
        ("empty content", create_req("", false), "content is empty"),
        (
            "oversized content",
            create_req(&format!("{good}#{}", "x".repeat(2000)), false),
            "CodeSource:MaxBytes",
        ),
        (
            "syntax error",
            create_req("def Process(event)\n    return None\n", false),
            "SyntaxError",
        ),
        (
            "no Process",
            create_req("def handle(event):\n    return None\n", false),
            "Process(event)",
        ),
        (
            "error at import",
            create_req("raise RuntimeError('no config')\n", false),
            "RuntimeError: no config",
        ),
        (
            "not UTF-8",
            pb::CreateWorkerRequest {
                code_source: Some(pb::CodeSource {
                    source: Some(pb::code_source::Source::Content(vec![0xff, 0xfe, 0x00])),
                    ..Default::default()
                }),
                ..create_req(&good, false)
            },
            "UTF-8",
        ),
        (
            "bad config key",
            pb::CreateWorkerRequest {
                config: BTreeMap::from([("Bad-Key".into(), "v".into())]),
                ..create_req(&good, false)
            },
            "not a valid CloudEvent attribute name",
        ),
        (
            "too many tags",
            pb::CreateWorkerRequest {
                tags: (0..51).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..create_req(&good, false)
            },
            "at most 50 tags",
        ),
        (
            "long tag key",
            pb::CreateWorkerRequest {
                tags: BTreeMap::from([("k".repeat(129), "v".into())]),
                ..create_req(&good, false)
            },
            "limit is 128",
        ),
        (
            "long tag value",
            pb::CreateWorkerRequest {
                tags: BTreeMap::from([("k".into(), "v".repeat(1025))]),
                ..create_req(&good, false)
            },
            "limit is 1024",
        ),
        (
            "bad topic",
            pb::CreateWorkerRequest {
                topics: vec!["a\u{7}b".into()],
                ..create_req(&good, false)
            },
            "control character",
        ),
        (
            "max_concurrency",
            pb::CreateWorkerRequest {
                max_concurrency: 1000,
                ..create_req(&good, false)
            },
            "max_concurrency",
        ),
    ];
    for (name, req, expected) in cases {
        let err = c.create_worker(req).await.expect_err(name);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{name}: {}",
            err.message()
        );
        assert!(
            err.message().contains(expected),
            "{name}: {:?} lacks {expected:?}",
            err.message()
        );
        assert!(
            !err.message().contains(dir.path().to_str().unwrap()),
            "{name}: server path leaked"
        );
    }
    // Nothing was persisted by the failed creates.
    assert!(c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers
        .is_empty());

    let unknown = "6f1c1d2e-3b4a-4c5d-8e9f-0a1b2c3d4e5f";
    assert_eq!(
        c.get_worker(pb::GetWorkerRequest { id: unknown.into() })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        c.start_worker(pb::StartWorkerRequest {
            id: "not-a-uuid".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    assert_eq!(
        c.stop_worker(pb::StopWorkerRequest { id: String::new() })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Tag updates past the limits are refused and change nothing.
    let id = create(&mut c, &good, false).await;
    let err = c
        .set_tags(pb::SetTagsRequest {
            id: id.clone(),
            tags: (0..51).map(|i| (format!("t{i}"), "v".into())).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(c
        .get_tags(pb::GetTagsRequest { id })
        .await
        .unwrap()
        .into_inner()
        .tags
        .is_empty());
}

#[tokio::test]
async fn misbehaving_workers_get_clear_errors_and_harm_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &["Python:ExecutionTimeoutSeconds=2"]).await;
    let mut c = svc.grpc().await;
    let bystander = create(&mut c, &versioned("bystander"), true).await;
    let bad = create(
        &mut c,
        "def Process(event):\n    k = event['data']\n    if k == 'raise': raise ValueError('negative price')\n    \
         if k == 'list': return [1, 2]\n    if k == 'set': return {'type': 't', 'data': {1}}\n    \
         if k == 'notype': return {'data': 1}\n    if k == 'spin':\n        while True: pass\n    \
         if k == 'exit': raise SystemExit(1)\n    return {'type': 't', 'data': 'fine'}\n",
        true,
    )
    .await;

    let cases = [
        ("raise", Code::Unknown, "ValueError: negative price"),
        ("list", Code::Unknown, "a list"),
        ("set", Code::Unknown, "not JSON-serialisable"),
        ("notype", Code::Unknown, "without a 'type'"),
        ("spin", Code::DeadlineExceeded, "did not finish within 2s"),
        ("exit", Code::Unknown, "restarts on the next message"),
    ];
    for (input, code, expected) in cases {
        let err = invoke(&mut c, &bad, json!(input)).await.expect_err(input);
        assert_eq!(err.code(), code, "{input}: {}", err.message());
        assert!(
            err.message().contains(expected),
            "{input}: {:?} lacks {expected:?}",
            err.message()
        );
        assert_eq!(
            invoke(&mut c, &bad, json!("ok")).await.unwrap()["data"],
            "fine",
            "{input}: worker did not recover"
        );
        assert_eq!(
            invoke(&mut c, &bystander, json!(1)).await.unwrap()["data"]["version"],
            "bystander"
        );
    }
    let info = c
        .get_worker(pb::GetWorkerRequest { id: bad.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.messages_failed, 6);
    assert_eq!(
        info.status(),
        WorkerStatus::Running,
        "failures do not stop a worker"
    );
    let err = c
        .invoke_worker(pb::InvokeWorkerRequest {
            id: bad,
            event: None,
            publish: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_crash_loop_marks_the_worker_failed_and_start_retries_it() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let id = create(
        &mut c,
        "def Process(event):\n    if event['data'] == 'exit': raise SystemExit(0)\n    return {'type': 't', 'data': 'alive'}\n",
        true,
    )
    .await;
    let mut last = None;
    for _ in 0..8 {
        let err = invoke(&mut c, &id, json!("exit")).await.unwrap_err();
        if err.code() == Code::Unavailable || err.code() == Code::FailedPrecondition {
            last = Some(err);
            break;
        }
    }
    let err = last.expect("a crash loop should make the worker unavailable");
    assert!(err.message().contains("FAILED"), "{}", err.message());
    // The FAILED status is recorded (asynchronously) with the reason.
    let mut info = c
        .get_worker(pb::GetWorkerRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..100 {
        if info.status() == WorkerStatus::Failed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        info = c
            .get_worker(pb::GetWorkerRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
    }
    assert_eq!(info.status(), WorkerStatus::Failed);
    assert!(info.last_error.contains("crashed"), "{}", info.last_error);
    c.start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    assert_eq!(
        invoke(&mut c, &id, json!("x")).await.unwrap()["data"],
        "alive"
    );
    let info = c
        .get_worker(pb::GetWorkerRequest { id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.status(), info.last_error.as_str()),
        (WorkerStatus::Running, "")
    );
}
