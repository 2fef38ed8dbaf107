//! The REST mirror, health, metrics and OpenAPI over real HTTP.
use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

/// Sends a request and reads the status and JSON body.
async fn send(rb: reqwest::RequestBuilder) -> (StatusCode, Value) {
    body(rb.send().await.unwrap()).await
}

async fn body(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

#[tokio::test]
async fn full_lifecycle_over_rest() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let http = reqwest::Client::new();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);

    let (st, created) = send(http.post(svc.url("/v1/workers")).json(&json!({
        "codeSource": {"content": b64(&versioned("v1"))},
        "mimeType": "text/x-python",
        "topics": ["prices"],
        "config": {"region": "eu"},
        "tags": {"desk": "fx"}
    })))
    .await;
    assert_eq!(st, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();

    let (st, w) = send(http.get(svc.url(&format!("/v1/workers/{id}")))).await;
    assert_eq!(st, 200);
    assert_eq!(w["status"], "WORKER_STATUS_STOPPED");
    assert_eq!(w["mimeType"], "text/x-python");
    assert_eq!(w["config"], json!({"region": "eu"}));

    let (st, r) = send(http.post(svc.url(&format!("/v1/workers/{id}/start")))).await;
    assert_eq!(
        (st, r["worker"]["status"].as_str()),
        (StatusCode::OK, Some("WORKER_STATUS_RUNNING"))
    );

    let invoke_body = json!({"event": {"specversion": "1.0", "id": "e-1", "source": "urn:t", "type": "t",
                                       "correlationid": "c-9", "data": {"px": 1.25}}});
    let (st, out) = send(
        http.post(svc.url(&format!("/v1/workers/{id}/invoke")))
            .json(&invoke_body),
    )
    .await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(
        out["event"]["data"],
        json!({"version": "v1", "in": {"px": 1.25}})
    );
    assert_eq!(out["event"]["correlationid"], "c-9");

    // Not a CloudEvent: wrapped as type "unknown", still processed.
    let (st, out) = send(
        http.post(svc.url(&format!("/v1/workers/{id}/invoke")))
            .json(&json!({"event": {"px": 2}})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(out["event"]["data"]["in"], json!({"px": 2}));

    let (st, _) = send(
        http.put(svc.url(&format!("/v1/workers/{id}/code")))
            .json(&json!({"codeSource": {"content": b64(&versioned("v2"))}})),
    )
    .await;
    assert_eq!(st, 200);
    let (_, out) = send(
        http.post(svc.url(&format!("/v1/workers/{id}/invoke")))
            .json(&invoke_body),
    )
    .await;
    assert_eq!(out["event"]["data"]["version"], "v2");
    let (_, h) = send(http.get(svc.url(&format!("/v1/workers/{id}/history")))).await;
    assert_eq!(h["entries"].as_array().unwrap().len(), 2);

    let (st, _) = send(
        http.put(svc.url(&format!("/v1/workers/{id}/tags")))
            .json(&json!({"tags": {"tier": "1"}})),
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = send(
        http.put(svc.url(&format!("/v1/workers/{id}/tags/owner")))
            .json(&json!({"value": "ana"})),
    )
    .await;
    assert_eq!(st, 200);
    let (_, t) = send(http.get(svc.url(&format!("/v1/workers/{id}/tags")))).await;
    assert_eq!(
        t["tags"],
        json!({"desk": "fx", "owner": "ana", "tier": "1"})
    );
    let (_, t) = send(http.get(svc.url(&format!("/v1/workers/{id}/tags/owner")))).await;
    assert_eq!(t["value"], "ana");
    let (st, e) = send(http.get(svc.url(&format!("/v1/workers/{id}/tags/missing")))).await;
    assert_eq!(
        (st, e["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NOT_FOUND"))
    );

    let (_, l) = send(http.get(svc.url("/v1/workers?tag=desk=fx&tag=owner=ana"))).await;
    assert_eq!(l["workers"].as_array().unwrap().len(), 1);
    let (_, l) = send(http.get(svc.url("/v1/workers?tag=desk=eq"))).await;
    assert_eq!(l["workers"].as_array().unwrap().len(), 0);

    let (_, e) = send(http.get(svc.url("/v1/engines"))).await;
    assert_eq!(e["engines"][0]["mimeType"], "text/x-python");
    let (st, r) = send(http.post(svc.url("/v1/recover"))).await;
    assert_eq!(
        (st, r["recoveredCount"].as_i64()),
        (StatusCode::OK, Some(0)),
        "hosted workers are not recovered twice"
    );

    let (st, r) = send(http.post(svc.url(&format!("/v1/workers/{id}/stop")))).await;
    assert_eq!(
        (st, r["worker"]["status"].as_str()),
        (StatusCode::OK, Some("WORKER_STATUS_STOPPED"))
    );
    let (st, _) = send(http.delete(svc.url(&format!("/v1/workers/{id}")))).await;
    assert_eq!(st, 200);

    // Errors: JSON with code, message and the correlation id we sent.
    let r = http
        .get(svc.url(&format!("/v1/workers/{id}")))
        .header("x-correlation-id", "rest-corr-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-correlation-id"], "rest-corr-1");
    let (st, e) = body(r).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "NOT_FOUND");
    assert_eq!(e["correlationId"], "rest-corr-1");
    assert!(e["message"].as_str().unwrap().contains(&id));
}

#[tokio::test]
async fn malformed_requests_get_clear_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let http = reqwest::Client::new();

    let (st, e) = body(
        http.post(svc.url("/v1/workers"))
            .body("{\"mimeType\": ")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(e["code"], "INVALID_ARGUMENT");
    assert!(
        e["message"].as_str().unwrap().contains("malformed JSON"),
        "{e}"
    );

    let (st, e) = send(
        http.post(svc.url("/v1/workers"))
            .json(&json!({"mimeType": "text/x-python", "topic": ["x"]})),
    )
    .await;
    assert_eq!(
        st,
        StatusCode::BAD_REQUEST,
        "an unknown field is named, not ignored: {e}"
    );
    assert!(e["message"].as_str().unwrap().contains("topic"), "{e}");

    let (st, e) = send(http.post(svc.url("/v1/workers"))
            .json(&json!({"codeSource": {"content": "ZGVmIFByb2Nlc3MoZSk6IHBhc3M="}, "mimeType": "text/x-python", "topics": []}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap().contains("topics"), "{e}");

    let (st, e) = send(http.get(svc.url("/v1/nothing-here"))).await;
    assert_eq!(
        (st, e["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NOT_FOUND"))
    );
    let (st, e) = send(http.get(svc.url("/v1/workers?colour=red"))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    let (st, e) = send(
        http.post(svc.url("/v1/workers/0b6a4d4e-5f5a-4d8e-9d4f-1f0f6a8b9c0d/invoke"))
            .json(&json!({"event": {}})),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
}

#[tokio::test]
async fn health_metrics_and_openapi() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let http = reqwest::Client::new();
    let mut c = svc.grpc().await;
    let id = create(&mut c, &versioned("v1"), true).await;
    invoke(&mut c, &id, json!(1)).await.unwrap();

    let (st, h) = send(http.get(svc.url("/health"))).await;
    assert_eq!(st, 200);
    assert_eq!(h["status"], "Healthy");
    for check in ["recovery", "statestore", "pubsub", "circuit"] {
        assert!(
            h["checks"][check]["status"].is_string(),
            "missing check {check}: {h}"
        );
    }
    let (st, _) = send(http.get(svc.url("/health/live"))).await;
    assert_eq!(st, 200);

    let m = svc.get_text("/metrics").await;
    assert!(
        m.contains("workmanager_workers{status=\"RUNNING\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("workmanager_invocations_total{engine=\"text/x-python\",outcome=\"ok\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("workmanager_invocation_duration_seconds_bucket"),
        "{m}"
    );

    let (st, doc) = send(http.get(svc.url("/openapi.json"))).await;
    assert_eq!(st, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/workers",
        "/v1/workers/{id}/invoke",
        "/v1/workers/{id}/tags/{key}",
        "/v1/recover",
        "/health/ready",
    ] {
        assert!(doc["paths"][path].is_object(), "OpenAPI lacks {path}");
    }
}
