//! The routes a Dapr sidecar calls when `PubSub:Type=dapr`: it reads the
//! subscriptions (`GET /dapr/subscribe`) and pushes each event
//! (`POST /dapr/events/{topic}`), to which the answer is Dapr's
//! `{"status": "SUCCESS" | "RETRY"}`.
//!
//! The sidecar authenticates with the `dapr-api-token` header carrying
//! `APP_API_TOKEN` (compared in constant time). With authentication on and
//! no app token configured these routes refuse everything: pushing an event
//! is publishing, which needs a credential.
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use workmanager_core::bus::{Ack, PushIntake};
use workmanager_core::CloudEvent;

use crate::http::AppState;

#[derive(Clone)]
struct DaprState {
    app: AppState,
    intake: Arc<dyn PushIntake>,
    auth_on: bool,
}

pub(crate) fn routes(app: AppState, intake: Arc<dyn PushIntake>, auth_on: bool) -> Router {
    Router::new()
        .route("/dapr/subscribe", get(subscribe))
        .route("/dapr/events/{topic}", post(event))
        .with_state(DaprState {
            app,
            intake,
            auth_on,
        })
}

fn allowed(s: &DaprState, headers: &HeaderMap) -> bool {
    match s.intake.app_token() {
        Some(token) => headers
            .get("dapr-api-token")
            .is_some_and(|v| bool::from(v.as_bytes().ct_eq(token.as_bytes()))),
        None => !s.auth_on,
    }
}

fn refused() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "the Dapr routes need the sidecar's dapr-api-token (set APP_API_TOKEN here and in the sidecar)",
    )
        .into_response()
}

async fn subscribe(State(s): State<DaprState>, headers: HeaderMap) -> Response {
    if !allowed(&s, &headers) {
        return refused();
    }
    // Recovered workers' topics are declared too: wait for recovery (bounded).
    let _ = tokio::time::timeout(Duration::from_secs(60), s.app.manager().wait_ready()).await;
    let (pubsub, topics) = s.intake.subscriptions();
    let subs: Vec<Value> = topics
        .iter()
        .map(|t| {
            json!({
                "pubsubname": pubsub,
                "topic": t,
                "route": format!("/dapr/events/{}", crate::dapr::segment(t)),
            })
        })
        .collect();
    Json(subs).into_response()
}

async fn event(
    State(s): State<DaprState>,
    headers: HeaderMap,
    Path(topic): Path<String>,
    body: Bytes,
) -> Response {
    if !allowed(&s, &headers) {
        return refused();
    }
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        // Never deliverable: tell Dapr to drop it rather than retry forever.
        tracing::warn!(topic, "the sidecar pushed a body that is not JSON; dropped");
        return Json(json!({"status": "DROP"})).into_response();
    };
    let status = match s.intake.push(&topic, CloudEvent::from_input(value)).await {
        Ack::Done => "SUCCESS",
        Ack::Retry => "RETRY",
    };
    Json(json!({ "status": status })).into_response()
}

/// A topic as one URL path segment.
pub(crate) fn segment(topic: &str) -> String {
    url::form_urlencoded::byte_serialize(topic.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
