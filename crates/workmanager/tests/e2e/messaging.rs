//! The message path end to end: publish → worker → routed output, over the
//! embedded bus, observed with real gRPC and HTTP clients.
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use tonic::Streaming;
use workmanager_api::convert::event_from_proto;
use workmanager_api::pb;

use crate::common::*;

type Client =
    workmanager_api::pb::work_manager_client::WorkManagerClient<tonic::transport::Channel>;

fn ce(id: &str, data: Value, extra: Value) -> Value {
    let mut e = json!({"specversion": "1.0", "id": id, "source": "urn:test", "type": "test.in", "data": data});
    if let (Some(m), Some(x)) = (e.as_object_mut(), extra.as_object()) {
        m.extend(x.clone());
    }
    e
}

async fn publish(c: &mut Client, topic: &str, event: Value) {
    let e = workmanager_core::CloudEvent::from_input(event);
    c.publish(pb::PublishRequest {
        topic: topic.into(),
        event: Some(workmanager_api::convert::event_to_proto(&e)),
    })
    .await
    .expect("publish");
}

async fn subscribe(c: &mut Client, topic: &str) -> Streaming<pb::CloudEventMessage> {
    c.subscribe(pb::SubscribeRequest {
        topic: topic.into(),
    })
    .await
    .expect("subscribe")
    .into_inner()
}

/// The next event on a subscription, as JSON (panics after 20 s).
async fn next(s: &mut Streaming<pb::CloudEventMessage>) -> Value {
    let msg = tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("no event within 20 s")
        .expect("stream error")
        .expect("stream ended");
    Value::Object(event_from_proto(msg.event.unwrap()).unwrap().0)
}

/// Publishes events numbered 0..n (their data) in CloudEvents batches of 100.
async fn publish_numbered(svc: &Service, topic: &str, n: i64) {
    let http = reqwest::Client::new();
    for chunk in 0..(n + 99) / 100 {
        let batch: Vec<Value> = (chunk * 100..((chunk + 1) * 100).min(n))
            .map(|i| ce(&format!("e{i}"), json!(i), json!({})))
            .collect();
        let r = http
            .post(svc.url(&format!("/v1/topics/{topic}")))
            .header("content-type", "application/cloudevents-batch+json")
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    }
}

/// Asks a collector worker (which answers a "report" event with what it
/// has seen) for its report.
async fn collector_report(c: &mut Client, collector: &str) -> Value {
    let report = json!({"specversion": "1.0", "id": "r", "source": "t", "type": "report"});
    invoke_event(c, collector, report)
        .await
        .expect("the collector answers")["data"]
        .clone()
}

async fn nothing_on(s: &mut Streaming<pb::CloudEventMessage>, wait_ms: u64) -> bool {
    tokio::time::timeout(Duration::from_millis(wait_ms), s.message())
        .await
        .is_err()
}

#[tokio::test]
async fn outputs_are_routed_stamped_and_correlated() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let code = "def Process(event):\n    d = event['data']\n    out = {'type': 'out.type', 'data': {'n': d['n'], \
                'region': event.get('region')}}\n    if d.get('explicit'):\n        out['publishtopic'] = 'out.explicit'\n    \
                return out\n";
    let mut req = create_req(code, true);
    req.topics = vec!["in".into()];
    req.config = BTreeMap::from([("region".into(), "eu".into())]);
    c.create_worker(req).await.unwrap();

    let mut by_type = subscribe(&mut c, "out.type").await;
    let mut explicit = subscribe(&mut c, "out.explicit").await;
    let mut reply = subscribe(&mut c, "out.reply").await;

    // Rule 3: the output's type; config stamped; correlation id inherited.
    publish(
        &mut c,
        "in",
        ce("1", json!({"n": 1}), json!({"correlationid": "corr-1"})),
    )
    .await;
    let out = next(&mut by_type).await;
    assert_eq!(out["data"], json!({"n": 1, "region": "eu"}));
    assert_eq!(out["correlationid"], "corr-1");
    assert!(out["id"].is_string() && out["time"].is_string() && out["specversion"] == "1.0");
    assert!(out["source"]
        .as_str()
        .unwrap()
        .starts_with("urn:com.virtufin.workmanager:worker:"));

    // No correlation id in, none out; the event's own attribute beats config.
    publish(
        &mut c,
        "in",
        ce("2", json!({"n": 2}), json!({"region": "us"})),
    )
    .await;
    let out = next(&mut by_type).await;
    assert_eq!(out["data"], json!({"n": 2, "region": "us"}));
    assert!(out.get("correlationid").is_none(), "{out}");

    // Rule 2: publishtopic wins over type, and is stripped.
    publish(
        &mut c,
        "in",
        ce("3", json!({"n": 3, "explicit": true}), json!({})),
    )
    .await;
    let out = next(&mut explicit).await;
    assert_eq!(out["data"]["n"], 3);
    assert!(
        out.get("publishtopic").is_none(),
        "publishtopic was not removed: {out}"
    );

    // Rule 1: the input's replytopic wins over both.
    publish(
        &mut c,
        "in",
        ce(
            "4",
            json!({"n": 4, "explicit": true}),
            json!({"replytopic": "out.reply"}),
        ),
    )
    .await;
    let out = next(&mut reply).await;
    assert_eq!(out["data"]["n"], 4);
    assert!(out.get("publishtopic").is_none());
    assert!(nothing_on(&mut by_type, 300).await && nothing_on(&mut explicit, 1).await);
}

#[tokio::test]
async fn fan_out_keeps_per_worker_order_and_skips_probes() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let code = format!(
            "def Process(event):\n    return {{'type': 'fan.{name}', 'data': event['data']}}\n"
        );
        let mut req = create_req(&code, true);
        req.topics = vec!["fan".into()];
        ids.push(c.create_worker(req).await.unwrap().into_inner().id);
    }
    let mut a = subscribe(&mut c, "fan.a").await;
    let mut b = subscribe(&mut c, "fan.b").await;
    publish(&mut c, "fan", json!({"specversion": "1.0", "id": "p", "source": "s", "type": "com.virtufin.workmanager.topic-probe"}))
        .await;
    publish_numbered(&svc, "fan", 1000).await;
    for sub in [&mut a, &mut b] {
        for n in 0..1000 {
            assert_eq!(next(sub).await["data"], json!(n), "order broken");
        }
    }
    for id in ids {
        let w = c
            .get_worker(pb::GetWorkerRequest { id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            w.messages_processed, 1000,
            "the probe reached a worker, or a message was lost"
        );
    }
}

#[tokio::test]
async fn failures_retry_then_dead_letter_with_a_failed_event() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(
        dir.path(),
        &["Worker:RetryAttempts=2", "Worker:RetryBaseDelayMs=10"],
    )
    .await;
    let mut c = svc.grpc().await;
    let mut req = create_req(
        "def Process(event):\n    raise ValueError('cannot price ' + str(event['data']))\n",
        true,
    );
    req.topics = vec!["orders".into()];
    let id = c.create_worker(req).await.unwrap().into_inner().id;
    let mut dead = subscribe(&mut c, "orders-dead").await;
    let mut watch = c
        .watch_workers(pb::WatchWorkersRequest {
            worker_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    publish(
        &mut c,
        "orders",
        ce("o-1", json!("XYZ"), json!({"correlationid": "c-7"})),
    )
    .await;
    let d = next(&mut dead).await;
    assert_eq!(d["id"], "o-1", "the original event is dead-lettered");
    assert_eq!(d["data"], "XYZ");
    assert_eq!(d["correlationid"], "c-7");
    assert_eq!(d["deadletterworker"], id.as_str());
    assert_eq!(d["deadletterattempts"], 3);
    assert!(
        d["deadletterreason"]
            .as_str()
            .unwrap()
            .contains("ValueError: cannot price XYZ"),
        "{d}"
    );

    let failed = loop {
        let e = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if e.kind == "failed" {
            break Value::Object(event_from_proto(e.event.unwrap()).unwrap().0);
        }
    };
    assert_eq!(failed["type"], "com.virtufin.workmanager.lifecycle.failed");
    assert_eq!(failed["source"], "urn:com.virtufin.workmanager");
    assert_eq!(failed["data"]["worker_id"], id.as_str());
    assert_eq!(failed["data"]["error_type"], "WorkerError");
    assert!(failed["data"]["error_message"]
        .as_str()
        .unwrap()
        .contains("cannot price"));
    let w = c
        .get_worker(pb::GetWorkerRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (w.messages_failed, w.status()),
        (3, pb::WorkerStatus::Running),
        "three attempts, worker still running"
    );
    let metrics = svc.get_text("/metrics").await;
    for outcome in ["received", "failed", "dead_lettered"] {
        let line = format!("workmanager_messages_total{{topic=\"orders\",worker=\"{id}\",outcome=\"{outcome}\"}} 1");
        assert!(metrics.contains(&line), "missing {line}");
    }
    assert!(
        metrics.contains(&format!("workmanager_queue_depth{{worker=\"{id}\"}} 0")),
        "no queue depth gauge"
    );
}

#[tokio::test]
async fn every_transition_emits_a_lifecycle_event() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let mut watch = c
        .watch_workers(pb::WatchWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let id = create(&mut c, &versioned("v1"), false).await;
    c.start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    c.load_code_from_content(pb::LoadCodeFromContentRequest {
        id: id.clone(),
        content: versioned("v2").into_bytes(),
    })
    .await
    .unwrap();
    c.stop_worker(pb::StopWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    c.delete_worker(pb::DeleteWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 7 {
        let e = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(e.worker_id, id);
        let ev = Value::Object(event_from_proto(e.event.unwrap()).unwrap().0);
        assert_eq!(ev["data"]["topics"], json!(["in"]));
        assert_eq!(ev["data"]["mime_type"], "text/x-python");
        assert!(ev["data"]["replica_id"].is_string());
        kinds.push(e.kind);
    }
    assert_eq!(
        kinds,
        [
            "registered",
            "starting",
            "online",
            "codeloaded",
            "stopping",
            "stopped",
            "deleted"
        ]
    );
}

#[tokio::test]
async fn stop_drains_queued_messages_and_bad_events_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &["Messaging:MaxEventBytes=2048"]).await;
    let mut c = svc.grpc().await;
    let slow = "import time\ndef Process(event):\n    time.sleep(0.02)\n    return {'type': 'drained', 'data': event['data']}\n";
    let mut req = create_req(slow, true);
    req.topics = vec!["slow".into()];
    let id = c.create_worker(req).await.unwrap().into_inner().id;
    let mut out = subscribe(&mut c, "drained").await;
    for n in 0..30 {
        publish(&mut c, "slow", ce(&n.to_string(), json!(n), json!({}))).await;
    }
    c.stop_worker(pb::StopWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    for n in 0..30 {
        assert_eq!(
            next(&mut out).await["data"],
            json!(n),
            "a queued message was dropped by StopWorker"
        );
    }
    // Stopped: nothing more is consumed.
    publish(&mut c, "slow", ce("late", json!("late"), json!({}))).await;
    assert!(nothing_on(&mut out, 300).await);

    let http = reqwest::Client::new();
    let r = http
        .post(svc.url("/v1/topics/slow"))
        .header("content-type", "application/cloudevents+json")
        .body("{\"specversion\": \"1.0\", \"id\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("malformed CloudEvent JSON"),
        "{body}"
    );
    let r = http
        .post(svc.url("/v1/topics/slow"))
        .header("content-type", "application/cloudevents+json")
        .json(&json!({"specversion": "1.0", "id": "1", "type": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("source"));
    let r = http
        .post(svc.url("/v1/topics/slow"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "1")
        .header("ce-type", "t")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "binary mode without ce-source");
    let r = http
        .post(svc.url("/v1/topics/slow"))
        .header("content-type", "application/cloudevents+json")
        .json(&ce("big", json!("x".repeat(4096)), json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "oversized event");
}

#[tokio::test]
async fn ten_thousand_events_every_one_accounted_for_once() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(
        dir.path(),
        &["Worker:RetryAttempts=1", "Worker:RetryBaseDelayMs=1"],
    )
    .await;
    let mut c = svc.grpc().await;
    // The worker under test fails every 7th event.
    let mut req = create_req(
        "def Process(event):\n    n = event['data']\n    if n % 7 == 0:\n        raise ValueError('seven')\n    \
         return {'type': 'done', 'data': n}\n",
        true,
    );
    req.topics = vec!["work".into()];
    c.create_worker(req).await.unwrap();
    // A collector hears outputs and dead letters through its own consumer
    // group (reliable, unlike an observer feed) and reports what it saw.
    let collector = "seen = {'done': [], 'work-dead': []}\ndef Process(event):\n    if event['type'] == 'report':\n        \
                     return {'type': 'report-out', 'data': seen}\n    key = 'work-dead' if 'deadletterworker' in event else 'done'\n    \
                     seen[key].append(event['data'])\n    return None\n";
    let mut req = create_req(collector, true);
    req.topics = vec!["done".into(), "work-dead".into()];
    let collector_id = c.create_worker(req).await.unwrap().into_inner().id;

    publish_numbered(&svc, "work", 10_000).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let seen = loop {
        let seen = collector_report(&mut c, &collector_id).await;
        let total =
            seen["done"].as_array().unwrap().len() + seen["work-dead"].as_array().unwrap().len();
        if total >= 10_000 || std::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut done: Vec<i64> = seen["done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let mut dead: Vec<i64> = seen["work-dead"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    done.sort_unstable();
    dead.sort_unstable();
    assert!(dead.iter().all(|n| n % 7 == 0) && done.iter().all(|n| n % 7 != 0));
    let mut all: Vec<i64> = done.iter().chain(dead.iter()).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..10_000).collect::<Vec<i64>>(),
        "an event was lost or delivered twice"
    );
}

#[tokio::test]
async fn a_full_queue_pushes_back_with_a_retry_hint() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(
        dir.path(),
        &[
            "Messaging:QueueCapacity=2",
            "Messaging:PublishTimeoutMs=100",
        ],
    )
    .await;
    let mut c = svc.grpc().await;
    let mut req = create_req(
        "import time\ndef Process(event):\n    time.sleep(1)\n    return None\n",
        true,
    );
    req.topics = vec!["busy".into()];
    c.create_worker(req).await.unwrap();
    let http = reqwest::Client::new();
    let mut refused = None;
    for n in 0..10 {
        let r = http
            .post(svc.url("/v1/topics/busy"))
            .header("content-type", "application/cloudevents+json")
            .json(&ce(&n.to_string(), json!(n), json!({})))
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 202);
    }
    let r = refused.expect("a worker 1 s per message with a queue of 2 never pushed back");
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "UNAVAILABLE");
    assert!(
        body["message"].as_str().unwrap().contains("retry"),
        "{body}"
    );
    let err = c
        .publish(pb::PublishRequest {
            topic: "busy".into(),
            event: Some(workmanager_api::convert::event_to_proto(
                &workmanager_core::CloudEvent::from_input(ce("g", json!(0), json!({}))),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let metrics = svc.get_text("/metrics").await;
    assert!(
        metrics.contains("workmanager_backpressure_rejections_total{topic=\"busy\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn invoke_with_publish_routes_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let id = create(
        &mut c,
        "def Process(event):\n    return {'type': 'invoked.out', 'data': event['data']}\n",
        false,
    )
    .await;
    let mut out = subscribe(&mut c, "invoked.out").await;
    let e = workmanager_core::CloudEvent::from_input(ce("i-1", json!(5), json!({})));
    let r = c
        .invoke_worker(pb::InvokeWorkerRequest {
            id,
            event: Some(workmanager_api::convert::event_to_proto(&e)),
            publish: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.event.is_some(), "the output is returned too");
    assert_eq!(next(&mut out).await["data"], 5);
}

#[tokio::test]
async fn a_worker_that_fails_mid_stream_dead_letters_what_it_had_queued() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &["Worker:RetryAttempts=0"]).await;
    let mut c = svc.grpc().await;
    // Crashes its process on every message: after five crashes the engine
    // gives up and the worker is FAILED.
    let mut req = create_req("def Process(event):\n    raise SystemExit(1)\n", true);
    req.topics = vec!["doomed".into()];
    let id = c.create_worker(req).await.unwrap().into_inner().id;
    let collector = "seen = []\ndef Process(event):\n    if event['type'] == 'report':\n        \
                     return {'type': 'report-out', 'data': seen}\n    seen.append(event['data'])\n    return None\n";
    let mut req = create_req(collector, true);
    req.topics = vec!["doomed-dead".into()];
    let collector_id = c.create_worker(req).await.unwrap().into_inner().id;
    publish_numbered(&svc, "doomed", 8).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let seen = collector_report(&mut c, &collector_id).await;
        if seen.as_array().unwrap().len() >= 8 || std::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut got: Vec<i64> = seen
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(
        got,
        (0..8).collect::<Vec<i64>>(),
        "every queued message is dead-lettered exactly once"
    );
    // The FAILED status is written by a task of its own: wait for it.
    let mut w = c
        .get_worker(pb::GetWorkerRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..200 {
        if w.status() == pb::WorkerStatus::Failed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        w = c
            .get_worker(pb::GetWorkerRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
    }
    assert_eq!(w.status(), pb::WorkerStatus::Failed, "{}", w.last_error);
    assert!(w.last_error.contains("crashed"), "{}", w.last_error);
}
