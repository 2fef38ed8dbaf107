//! The full lifecycle over gRPC, hot reload semantics, tags and listing.
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use tonic::Code;
use workmanager_api::pb;
use workmanager_api::pb::WorkerStatus;

use crate::common::*;

#[tokio::test]
async fn full_lifecycle_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;

    let code =
        "def Process(event):\n    return {'type': 'out', 'data': {'region': event.get('region'), \
                'desk': event.get('desk'), 'x': event['data']['x'] + 1}}\n";
    let mut req = create_req(code, false);
    req.config = BTreeMap::from([("region".into(), "eu".into()), ("desk".into(), "fx".into())]);
    req.tags = BTreeMap::from([("team".into(), "rates".into())]);
    let mut request = tonic::Request::new(req);
    request
        .metadata_mut()
        .insert("x-correlation-id", "corr-create-1".parse().unwrap());
    let resp = c.create_worker(request).await.unwrap();
    assert_eq!(
        resp.metadata().get("x-correlation-id").unwrap(),
        "corr-create-1"
    );
    let id = resp.into_inner().id;
    assert!(uuid::Uuid::parse_str(&id).is_ok());

    // New workers are STOPPED; start and stop are idempotent.
    let info = c
        .get_worker(pb::GetWorkerRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.status(), WorkerStatus::Stopped);
    assert_eq!(
        (info.mime_type.as_str(), info.language.as_str()),
        ("text/x-python", "Python")
    );
    assert_eq!(info.topics, vec!["in"]);
    assert_eq!(info.config["region"], "eu");
    for _ in 0..2 {
        let r = c
            .start_worker(pb::StartWorkerRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.worker.unwrap().status(), WorkerStatus::Running);
    }

    // Config is stamped on the event; the event's own attribute wins.
    let out = invoke(&mut c, &id, json!({"x": 41})).await.unwrap();
    assert_eq!(out["data"], json!({"region": "eu", "desk": "fx", "x": 42}));
    assert_eq!(out["type"], "out");
    assert_eq!(
        out["source"],
        format!("urn:com.virtufin.workmanager:worker:{id}")
    );
    let mut e = event(json!({"x": 1}));
    e.attributes.insert(
        "region".into(),
        pb::io::cloudevents::v1::cloud_event::CloudEventAttributeValue {
            attr: Some(
                pb::io::cloudevents::v1::cloud_event::cloud_event_attribute_value::Attr::CeString(
                    "us".into(),
                ),
            ),
        },
    );
    e.attributes.insert(
        "correlationid".into(),
        pb::io::cloudevents::v1::cloud_event::CloudEventAttributeValue {
            attr: Some(
                pb::io::cloudevents::v1::cloud_event::cloud_event_attribute_value::Attr::CeString(
                    "trade-7".into(),
                ),
            ),
        },
    );
    let out = c
        .invoke_worker(pb::InvokeWorkerRequest {
            id: id.clone(),
            event: Some(e),
            publish: false,
        })
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    let out = workmanager_api::convert::event_from_proto(out).unwrap();
    assert_eq!(out.0["data"]["region"], "us");
    assert_eq!(out.get_str("correlationid"), Some("trade-7"));

    // Hot reload: new code, history grows, status kept.
    c.load_code_from_content(pb::LoadCodeFromContentRequest {
        id: id.clone(),
        content: versioned("v2").into_bytes(),
    })
    .await
    .unwrap();
    let out = invoke(&mut c, &id, json!(1)).await.unwrap();
    assert_eq!(out["data"]["version"], "v2");
    assert_eq!(status(&mut c, &id).await, WorkerStatus::Running);
    let history = c
        .get_worker_history(pb::GetWorkerHistoryRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.entries.len(), 2);
    assert!(history
        .entries
        .iter()
        .all(|h| h.code_source.as_ref().unwrap().content_sha256.len() == 64));
    assert!(history.entries[0].created_at <= history.entries[1].created_at);

    // Tags: set, merge, get; missing key is NOT_FOUND.
    c.set_tag(pb::SetTagRequest {
        id: id.clone(),
        key: "owner".into(),
        value: "ana".into(),
    })
    .await
    .unwrap();
    c.set_tags(pb::SetTagsRequest {
        id: id.clone(),
        tags: BTreeMap::from([("tier".into(), "1".into())]),
    })
    .await
    .unwrap();
    let tags = c
        .get_tags(pb::GetTagsRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .tags;
    assert_eq!(
        tags,
        BTreeMap::from([
            ("owner".into(), "ana".into()),
            ("team".into(), "rates".into()),
            ("tier".into(), "1".into())
        ])
    );
    let v = c
        .get_tag(pb::GetTagRequest {
            id: id.clone(),
            key: "owner".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    assert_eq!(v, "ana");
    let err = c
        .get_tag(pb::GetTagRequest {
            id: id.clone(),
            key: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Listing with tag filters (AND).
    let other = create(&mut c, &versioned("other"), false).await;
    c.set_tag(pb::SetTagRequest {
        id: other.clone(),
        key: "team".into(),
        value: "rates".into(),
    })
    .await
    .unwrap();
    let list = |filters: &[(&str, &str)]| pb::ListWorkersRequest {
        filters: filters
            .iter()
            .map(|(k, v)| pb::TagFilter {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
    };
    let all = c
        .list_workers(list(&[]))
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(all.len(), 2);
    let team = c
        .list_workers(list(&[("team", "rates")]))
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(team.len(), 2);
    let both = c
        .list_workers(list(&[("team", "rates"), ("owner", "ana")]))
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(
        both.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        vec![id.as_str()]
    );
    assert_eq!(both[0].messages_processed, 3);

    // Stop (idempotent), delete, gone.
    for _ in 0..2 {
        let r = c
            .stop_worker(pb::StopWorkerRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.worker.unwrap().status(), WorkerStatus::Stopped);
    }
    c.delete_worker(pb::DeleteWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    let err = c
        .get_worker(pb::GetWorkerRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .delete_worker(pb::DeleteWorkerRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Delete works from RUNNING too.
    c.start_worker(pb::StartWorkerRequest { id: other.clone() })
        .await
        .unwrap();
    c.delete_worker(pb::DeleteWorkerRequest { id: other.clone() })
        .await
        .unwrap();
    assert!(c
        .list_workers(list(&[]))
        .await
        .unwrap()
        .into_inner()
        .workers
        .is_empty());

    // Audit records carry the correlation id.
    let audited =
        |l: &str| l.contains("\"operation\":\"CreateWorker\"") && l.contains("corr-create-1");
    let logs = svc.logs_with(audited).await;
    assert!(
        logs.lines().any(audited),
        "no audit record with the correlation id"
    );
    assert!(
        !logs.contains("def Process"),
        "worker code leaked into the logs"
    );
}

#[tokio::test]
async fn hot_reload_lets_in_flight_calls_finish_on_the_old_code() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let slow_v1 = "import time\ndef Process(event):\n    time.sleep(1.5)\n    return {'type': 'out', 'data': 'v1'}\n";
    let id = create(&mut c, slow_v1, true).await;

    let mut c2 = svc.grpc().await;
    let id2 = id.clone();
    let in_flight = tokio::spawn(async move { invoke(&mut c2, &id2, json!(0)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.load_code_from_content(pb::LoadCodeFromContentRequest {
        id: id.clone(),
        content: versioned("v2").into_bytes(),
    })
    .await
    .unwrap();
    let new = invoke(&mut c, &id, json!(0)).await.unwrap();
    assert_eq!(
        new["data"]["version"], "v2",
        "calls after the reload use the new code at once"
    );
    let old = in_flight.await.unwrap().unwrap();
    assert_eq!(
        old["data"], "v1",
        "the in-flight call finished on the old code"
    );

    // A failed load leaves the current code running and says why.
    let err = c
        .load_code_from_content(pb::LoadCodeFromContentRequest {
            id: id.clone(),
            content: b"def Process(:\n".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("SyntaxError"), "{}", err.message());
    assert_eq!(
        invoke(&mut c, &id, json!(0)).await.unwrap()["data"]["version"],
        "v2"
    );
    let history = c
        .get_worker_history(pb::GetWorkerHistoryRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.entries.len(), 2, "a failed load is not history");
}

#[tokio::test]
async fn list_engines_names_the_python_engine() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let engines = c
        .list_engines(pb::ListEnginesRequest {})
        .await
        .unwrap()
        .into_inner()
        .engines;
    assert_eq!(engines.len(), 1);
    assert_eq!(
        (engines[0].mime_type.as_str(), engines[0].language.as_str()),
        ("text/x-python", "Python")
    );
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_service() {
    use tonic_reflection::pb::{v1, v1alpha};
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let channel = tonic::transport::Channel::from_shared(svc.server())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = c1
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected v1 answer")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"virtufin.WorkManager".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let mut c0 = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "virtufin.WorkManager".into(),
            ),
        ),
    };
    let mut stream = c0
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        resp.message_response
    else {
        panic!("unexpected v1alpha answer")
    };
    assert!(!files.file_descriptor_proto.is_empty());
}
