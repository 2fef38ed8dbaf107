//! Persistence and recovery across restarts, clean and `kill -9`.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tonic::Code;
use workmanager_api::pb;
use workmanager_api::pb::WorkerStatus;
use workmanager_backends::EmbeddedStore;
use workmanager_core::model::{StoredCode, WorkerRecord};
use workmanager_core::store::keys;
use workmanager_core::{Precondition, StateStore};

use crate::common::*;

#[tokio::test]
async fn running_and_stopped_workers_come_back_with_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let (running, stopped) = {
        let mut svc = Service::start_ready(dir.path(), &[]).await;
        let mut c = svc.grpc().await;
        let running = create(&mut c, &versioned("run"), true).await;
        let stopped = create(&mut c, &versioned("stop"), false).await;
        c.set_tag(pb::SetTagRequest {
            id: stopped.clone(),
            key: "k".into(),
            value: "v".into(),
        })
        .await
        .unwrap();
        c.load_code_from_content(pb::LoadCodeFromContentRequest {
            id: running.clone(),
            content: versioned("run2").into_bytes(),
        })
        .await
        .unwrap();
        assert!(
            svc.terminate().success(),
            "SIGTERM should end the service cleanly"
        );
        (running, stopped)
    };
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    assert_eq!(status(&mut c, &running).await, WorkerStatus::Running);
    assert_eq!(status(&mut c, &stopped).await, WorkerStatus::Stopped);
    assert_eq!(
        invoke(&mut c, &running, json!(1)).await.unwrap()["data"]["version"],
        "run2"
    );
    let tags = c
        .get_tags(pb::GetTagsRequest {
            id: stopped.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tags;
    assert_eq!(tags["k"], "v");
    let h = c
        .get_worker_history(pb::GetWorkerHistoryRequest {
            id: running.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.entries.len(), 2);
    let info = c
        .get_worker(pb::GetWorkerRequest { id: running })
        .await
        .unwrap()
        .into_inner();
    assert!(
        svc.logs().contains(&info.instance_id),
        "the new instance owns the recovered worker"
    );
}

/// Reads the store file directly (the service must be stopped).
async fn store_view(dir: &std::path::Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let store = EmbeddedStore::open(&dir.join("state.redb")).unwrap();
    let index: Vec<String> = match store.get(keys::WORKER_INDEX).await.unwrap() {
        Some(v) => serde_json::from_slice(&v.value).unwrap(),
        None => Vec::new(),
    };
    let mut records = BTreeSet::new();
    for key in store.list("workmanager/workers/").await.unwrap() {
        if key == keys::WORKER_INDEX {
            continue;
        }
        let v = store.get(&key).await.unwrap().unwrap();
        let r: WorkerRecord =
            serde_json::from_slice(&v.value).expect("every record is complete JSON");
        records.insert(r.id.to_string());
    }
    let index_set: BTreeSet<String> = index.iter().cloned().collect();
    assert_eq!(index.len(), index_set.len(), "duplicate ids in the index");
    (index_set, records)
}

#[tokio::test]
async fn kill_9_during_mutations_leaves_every_worker_whole_or_absent() {
    let dir = tempfile::tempdir().unwrap();
    let mut svc = Service::start_ready(dir.path(), &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..2 {
        let mut c = svc.grpc().await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine: Vec<String> = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = match i % 4 {
                    0 | 1 => c
                        .create_worker(create_req(
                            &versioned(&format!("{t}-{i}")),
                            i.is_multiple_of(2),
                        ))
                        .await
                        .map(|r| {
                            mine.push(r.into_inner().id);
                        }),
                    2 if !mine.is_empty() => c
                        .load_code_from_content(pb::LoadCodeFromContentRequest {
                            id: mine[mine.len() - 1].clone(),
                            content: versioned(&format!("reload-{i}")).into_bytes(),
                        })
                        .await
                        .map(|_| ()),
                    _ if !mine.is_empty() => {
                        let id = mine.remove(0);
                        c.delete_worker(pb::DeleteWorkerRequest { id })
                            .await
                            .map(|_| ())
                    }
                    _ => Ok(()),
                };
                if r.is_err() {
                    return; // the service was killed under us
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    svc.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }

    let (index, records) = store_view(dir.path()).await;
    assert_eq!(index, records, "index and records disagree after kill -9");
    assert!(!index.is_empty(), "the load loop created no workers");

    let mut svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let listed: BTreeSet<String> = c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(
        listed, index,
        "every persisted worker is recovered, and nothing else"
    );
    for id in &listed {
        let w = c
            .get_worker(pb::GetWorkerRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(w.status(), WorkerStatus::Failed, "{id}: {}", w.last_error);
        assert!(
            invoke(&mut c, id, json!(0)).await.is_ok(),
            "{id} is not runnable after recovery"
        );
    }
    svc.terminate();
    let (index2, records2) = store_view(dir.path()).await;
    assert_eq!((index2, records2), (index.clone(), index));
}

#[tokio::test]
async fn one_broken_worker_fails_alone_and_can_be_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let (good, broken) = {
        let mut svc = Service::start_ready(dir.path(), &[]).await;
        let mut c = svc.grpc().await;
        let good = create(&mut c, &versioned("good"), true).await;
        let broken = create(&mut c, &versioned("soon broken"), true).await;
        svc.terminate();
        (good, broken)
    };
    // Corrupt the broken worker's persisted code behind the service's back.
    {
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let key = keys::worker(&broken);
        let v = store.get(&key).await.unwrap().unwrap();
        let mut r: WorkerRecord = serde_json::from_slice(&v.value).unwrap();
        r.code = StoredCode::Content {
            content: std::sync::Arc::from(&b"def Process(event:\n"[..]),
        };
        store
            .put(
                &key,
                serde_json::to_vec(&r).unwrap(),
                Precondition::Version(v.version),
            )
            .await
            .unwrap();
    }
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    assert_eq!(status(&mut c, &good).await, WorkerStatus::Running);
    assert_eq!(
        invoke(&mut c, &good, json!(1)).await.unwrap()["data"]["version"],
        "good"
    );
    let w = c
        .get_worker(pb::GetWorkerRequest { id: broken.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.status(), WorkerStatus::Failed);
    assert!(w.last_error.contains("SyntaxError"), "{}", w.last_error);
    let err = invoke(&mut c, &broken, json!(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Start retries and fails again with the reason; new code fixes it.
    let err = c
        .start_worker(pb::StartWorkerRequest { id: broken.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("SyntaxError"), "{}", err.message());
    c.load_code_from_content(pb::LoadCodeFromContentRequest {
        id: broken.clone(),
        content: versioned("fixed").into_bytes(),
    })
    .await
    .unwrap();
    assert_eq!(status(&mut c, &broken).await, WorkerStatus::Stopped);
    c.start_worker(pb::StartWorkerRequest { id: broken.clone() })
        .await
        .unwrap();
    assert_eq!(
        invoke(&mut c, &broken, json!(1)).await.unwrap()["data"]["version"],
        "fixed"
    );
}

#[tokio::test]
async fn readiness_waits_for_recovery() {
    let dir = tempfile::tempdir().unwrap();
    // Code that takes 2 s to load makes recovery observably slow.
    let slow = "import time\ntime.sleep(2)\ndef Process(event):\n    return {'type': 'out', 'data': 'slow'}\n";
    {
        let mut svc = Service::start_ready(dir.path(), &[]).await;
        let mut c = svc.grpc().await;
        create(&mut c, slow, true).await;
        svc.terminate();
    }
    let svc = Service::start(dir.path(), &[]);
    let r = reqwest::get(svc.url("/health/ready")).await.unwrap();
    assert_eq!(r.status(), 503, "ready before recovery finished");
    let (_, h) = {
        let r = reqwest::get(svc.url("/health")).await.unwrap();
        (r.status(), r.json::<serde_json::Value>().await.unwrap())
    };
    assert_eq!(h["checks"]["recovery"]["status"], "Degraded");
    svc.wait_ready().await;
    let mut c = svc.grpc().await;
    let workers = c
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].status(), WorkerStatus::Running);
}

#[tokio::test]
async fn recovered_running_workers_consume_their_topics_again() {
    let dir = tempfile::tempdir().unwrap();
    let code = "def Process(event):\n    return {'type': 'back.out', 'data': event['data']}\n";
    {
        let mut svc = Service::start_ready(dir.path(), &[]).await;
        let mut c = svc.grpc().await;
        let mut req = create_req(code, true);
        req.topics = vec!["back.in".into()];
        c.create_worker(req).await.unwrap();
        svc.terminate();
    }
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let mut out = c
        .subscribe(pb::SubscribeRequest {
            topic: "back.out".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let e = workmanager_core::CloudEvent::from_input(
        json!({"specversion": "1.0", "id": "r-1", "source": "urn:test", "type": "in", "data": 42}),
    );
    c.publish(pb::PublishRequest {
        topic: "back.in".into(),
        event: Some(workmanager_api::convert::event_to_proto(&e)),
    })
    .await
    .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(20), out.message())
        .await
        .expect("the recovered worker did not answer")
        .unwrap()
        .unwrap();
    let ev = workmanager_api::convert::event_from_proto(msg.event.unwrap()).unwrap();
    assert_eq!(ev.0["data"], json!(42));
}
