//! The HTTP port: health, metrics, OpenAPI and the `/v1` REST mirror of the
//! gRPC API. REST handlers parse proto3-JSON bodies into the same request
//! messages and call the same `WorkManagerService` methods as gRPC.
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tonic::{Request, Status};
use workmanager_core::{CloudEvent, Manager};

use crate::convert::{event_from_proto, event_into_proto};
use crate::correlation::{CorrelationId, CorrelationLayer, InFlight};
use crate::error::ApiError;
use crate::grpc::WorkManagerService;
use crate::pb;
use crate::pb::work_manager_server::WorkManager;
use workmanager_core::CircuitState;

#[derive(Clone)]
pub struct AppState {
    pub svc: WorkManagerService,
    /// Set once recovery finished and gRPC health says SERVING.
    pub ready: Arc<AtomicBool>,
}

impl AppState {
    pub(crate) fn manager(&self) -> &Manager {
        self.svc.manager()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

pub fn router(
    svc: WorkManagerService,
    opts: &crate::server::ServeOptions,
    inflight: InFlight,
    ready_flag: Arc<AtomicBool>,
) -> Router {
    // Events have their own, smaller body limit: too large is 413.
    let topics = Router::new()
        .route("/v1/topics/{topic}", post(crate::topics::publish))
        .layer(DefaultBodyLimit::max(opts.max_event_bytes))
        .route("/v1/topics/{topic}/events", get(crate::topics::events));
    let state = AppState {
        svc,
        ready: ready_flag,
    };
    // With a push-based bus (Dapr), the sidecar's routes.
    let pushed = match state.manager().bus_intake() {
        Some(intake) => crate::dapr::routes(state.clone(), intake, opts.auth.enabled()),
        None => Router::new(),
    };
    Router::new()
        .merge(topics)
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/workers", post(create_worker).get(list_workers))
        .route("/v1/workers/{id}", get(get_worker).delete(delete_worker))
        .route("/v1/workers/{id}/start", post(start_worker))
        .route("/v1/workers/{id}/stop", post(stop_worker))
        .route("/v1/workers/{id}/invoke", post(invoke_worker))
        .route("/v1/workers/{id}/code", put(load_code))
        .route("/v1/workers/{id}/history", get(history))
        .route("/v1/workers/{id}/tags", get(get_tags).put(set_tags))
        .route("/v1/workers/{id}/tags/{key}", get(get_tag).put(set_tag))
        .route("/v1/recover", post(recover))
        .route("/v1/engines", get(engines))
        .fallback(not_found)
        .with_state(state)
        .merge(pushed)
        .layer(DefaultBodyLimit::max(opts.max_message_bytes))
        .layer(crate::auth::AuthLayer::new(opts.auth.clone()))
        .layer(CorrelationLayer::new(inflight))
}

/// A REST request's correlation id (`.0`) and authenticated caller (`.1`),
/// carried into the gRPC method a handler calls and into its errors.
#[derive(Debug, Clone)]
pub(crate) struct Ctx(pub String, pub Option<crate::auth::Caller>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Ctx(
            parts
                .extensions
                .get::<CorrelationId>()
                .map(|c| c.0.clone())
                .unwrap_or_default(),
            parts.extensions.get::<crate::auth::Caller>().cloned(),
        ))
    }
}

/// Runs a gRPC method for a REST request, carrying the correlation id and caller.
async fn call<Req, Resp, Fut>(
    cid: &Ctx,
    message: Req,
    f: impl FnOnce(Request<Req>) -> Fut,
) -> ApiResult<Json<Resp>>
where
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let mut req = Request::new(message);
    req.extensions_mut().insert(CorrelationId(cid.0.clone()));
    if let Some(caller) = &cid.1 {
        req.extensions_mut().insert(caller.clone());
    }
    f(req)
        .await
        .map(|r| Json(r.into_inner()))
        .map_err(|s| ApiError::from_status(&s, &cid.0))
}

/// Parses a JSON body, or says what is wrong with it.
fn parse<T: DeserializeOwned>(body: &Bytes, cid: &Ctx) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
            &cid.0,
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}"), &cid.0))
}

async fn not_found(cid: Ctx) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "NOT_FOUND",
        message: "no such route; GET /openapi.json lists the API".into(),
        correlation_id: cid.0,
    }
}

// ---- health and metrics ---------------------------------------------------------

fn check(status: &str, description: impl Into<String>) -> Value {
    json!({"status": status, "description": description.into()})
}

async fn health(State(s): State<AppState>) -> Response {
    let store = s.manager().store();
    let (store_status, store_desc) = match store.ping().await {
        Ok(()) => ("Healthy", format!("{} store reachable", store.name())),
        Err(e) => (
            "Unhealthy",
            format!("{} store unreachable: {e}", store.name()),
        ),
    };
    let recovery = if s.manager().is_ready() {
        check("Healthy", "recovery finished")
    } else {
        check("Degraded", "recovery in progress")
    };
    let circuits = [
        ("statestore", store.circuit()),
        ("pubsub", s.manager().bus_circuit()),
    ];
    let all_closed = circuits.iter().all(|(_, c)| *c == CircuitState::Closed);
    let circuit_desc = circuits
        .iter()
        .map(|(b, c)| format!("{b} {}", c.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let overall = if store_status == "Unhealthy" {
        "Unhealthy"
    } else if !s.manager().is_ready() || !all_closed {
        "Degraded"
    } else {
        "Healthy"
    };
    let body = json!({
        "status": overall,
        "instanceId": s.manager().instance_id(),
        "checks": {
            "recovery": recovery,
            "statestore": check(store_status, store_desc),
            "pubsub": check("Healthy", format!("{} bus", s.manager().bus_name())),
            "circuit": check(if all_closed { "Healthy" } else { "Degraded" }, circuit_desc),
            "sandbox": sandbox_check(s.manager()),
        }
    });
    let code = if overall == "Unhealthy" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// The isolation each engine actually applies (from its start-up probe);
/// Degraded when an engine runs with less than its full sandbox.
fn sandbox_check(manager: &Manager) -> Value {
    let engines = manager.engines();
    let description = engines
        .iter()
        .map(|e| format!("{}: {}", e.mime_type, e.isolation))
        .collect::<Vec<_>>()
        .join("; ");
    let degraded = engines.iter().any(|e| {
        e.isolation.contains("unavailable")
            || e.isolation.contains("partial")
            || e.isolation.contains("sandbox off")
    });
    check(if degraded { "Degraded" } else { "Healthy" }, description)
}

async fn live() -> Json<Value> {
    Json(json!({"status": "Healthy"}))
}

async fn ready(State(s): State<AppState>) -> Response {
    let recovered = s.ready.load(Ordering::Acquire);
    let store_ok = s.manager().store().ping().await.is_ok();
    if recovered && store_ok {
        Json(json!({"status": "Healthy"})).into_response()
    } else {
        let why = if !recovered {
            "recovery in progress"
        } else {
            "state store unreachable"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "Unhealthy", "description": why})),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.manager().render_metrics(),
    )
        .into_response()
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

// ---- workers ------------------------------------------------------------------

async fn create_worker(
    State(s): State<AppState>,
    cid: Ctx,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<pb::CreateWorkerResponse>)> {
    let req: pb::CreateWorkerRequest = parse(&body, &cid)?;
    let created = call(&cid, req, |r| s.svc.create_worker(r)).await?;
    Ok((StatusCode::CREATED, created))
}

async fn list_workers(
    State(s): State<AppState>,
    cid: Ctx,
    Query(query): Query<Vec<(String, String)>>,
) -> ApiResult<Json<pb::ListWorkersResponse>> {
    let mut filters = Vec::new();
    for (name, value) in query {
        if name != "tag" {
            return Err(ApiError::bad_request(
                format!("unknown query parameter {name:?}; filter with ?tag=key=value"),
                &cid.0,
            ));
        }
        let Some((k, v)) = value.split_once('=') else {
            return Err(ApiError::bad_request(
                format!("tag filter {value:?} must be key=value"),
                &cid.0,
            ));
        };
        filters.push(pb::TagFilter {
            key: k.into(),
            value: v.into(),
        });
    }
    call(&cid, pb::ListWorkersRequest { filters }, |r| {
        s.svc.list_workers(r)
    })
    .await
}

async fn get_worker(
    State(s): State<AppState>,
    cid: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<pb::WorkerInfo>> {
    call(&cid, pb::GetWorkerRequest { id }, |r| s.svc.get_worker(r)).await
}

async fn delete_worker(
    State(s): State<AppState>,
    cid: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<pb::DeleteWorkerResponse>> {
    call(&cid, pb::DeleteWorkerRequest { id }, |r| {
        s.svc.delete_worker(r)
    })
    .await
}

async fn start_worker(
    State(s): State<AppState>,
    cid: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<pb::StartWorkerResponse>> {
    call(&cid, pb::StartWorkerRequest { id }, |r| {
        s.svc.start_worker(r)
    })
    .await
}

async fn stop_worker(
    State(s): State<AppState>,
    cid: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<pb::StopWorkerResponse>> {
    call(&cid, pb::StopWorkerRequest { id }, |r| s.svc.stop_worker(r)).await
}

/// Body: `{"codeSource": {"content": "<base64>"} | {"url": "..."}}`.
async fn load_code(
    State(s): State<AppState>,
    cid: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<pb::LoadCodeResponse>> {
    let mut req: pb::LoadCodeRequest = parse(&body, &cid)?;
    req.id = id;
    call(&cid, req, |r| s.svc.load_code(r)).await
}

async fn history(
    State(s): State<AppState>,
    cid: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<pb::GetWorkerHistoryResponse>> {
    call(&cid, pb::GetWorkerHistoryRequest { id }, |r| {
        s.svc.get_worker_history(r)
    })
    .await
}

async fn get_tags(
    State(s): State<AppState>,
    cid: Ctx,
    Path(id): Path<String>,
) -> ApiResult<Json<pb::GetTagsResponse>> {
    call(&cid, pb::GetTagsRequest { id }, |r| s.svc.get_tags(r)).await
}

/// Body: `{"tags": {"k": "v"}}`, merged into the worker's tags.
async fn set_tags(
    State(s): State<AppState>,
    cid: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<pb::SetTagsResponse>> {
    let mut req: pb::SetTagsRequest = parse(&body, &cid)?;
    req.id = id;
    call(&cid, req, |r| s.svc.set_tags(r)).await
}

async fn get_tag(
    State(s): State<AppState>,
    cid: Ctx,
    Path((id, key)): Path<(String, String)>,
) -> ApiResult<Json<pb::GetTagResponse>> {
    call(&cid, pb::GetTagRequest { id, key }, |r| s.svc.get_tag(r)).await
}

/// Body: `{"value": "v"}`.
async fn set_tag(
    State(s): State<AppState>,
    cid: Ctx,
    Path((id, key)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<pb::SetTagResponse>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        value: String,
    }
    let b: Body = parse(&body, &cid)?;
    call(
        &cid,
        pb::SetTagRequest {
            id,
            key,
            value: b.value,
        },
        |r| s.svc.set_tag(r),
    )
    .await
}

async fn recover(
    State(s): State<AppState>,
    cid: Ctx,
) -> ApiResult<Json<pb::RecoverWorkersResponse>> {
    call(&cid, pb::RecoverWorkersRequest {}, |r| {
        s.svc.recover_workers(r)
    })
    .await
}

async fn engines(State(s): State<AppState>, cid: Ctx) -> ApiResult<Json<pb::ListEnginesResponse>> {
    call(&cid, pb::ListEnginesRequest {}, |r| s.svc.list_engines(r)).await
}

/// Body: `{"event": {...CloudEvent JSON...}, "publish": false}`. Answers
/// `{"event": {...}}`, or `{}` when the worker returned nothing.
async fn invoke_worker(
    State(s): State<AppState>,
    cid: Ctx,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        event: Option<Value>,
        #[serde(default)]
        publish: bool,
    }
    let b: Body = parse(&body, &cid)?;
    let event = match b.event {
        Some(v) => CloudEvent::from_input(v),
        None => {
            return Err(ApiError::bad_request(
                "\"event\" is missing; send {\"event\": {...CloudEvent...}}",
                &cid.0,
            ))
        }
    };
    // Through the gRPC method, so a worker hosted by a peer is reached the same way.
    let req = pb::InvokeWorkerRequest {
        id,
        event: Some(event_into_proto(event)),
        publish: b.publish,
    };
    let Json(answer) = call(&cid, req, |r| s.svc.invoke_worker(r)).await?;
    let mut body = BTreeMap::new();
    if let Some(e) = answer.event {
        let e = event_from_proto(e).map_err(|e| ApiError::from_status(&e, &cid.0))?;
        body.insert("event", Value::Object(e.0));
    }
    Ok(Json(json!(body)))
}
