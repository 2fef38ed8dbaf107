//! A fake Dapr sidecar for tests (feature `testing`).
//!
//! The Dapr sidecar binary cannot be installed on the machines these tests
//! run on, so the Dapr adapters are tested against this small stand-in that
//! follows Dapr's documented HTTP API: it is the only fake in the project.
//! It implements what the adapters use — state get / transaction with ETags
//! (first-write: a stale or missing ETag fails the whole transaction with
//! 409), publish, programmatic subscriptions (it asks the app's
//! `GET /dapr/subscribe` and posts each event to the route, redelivering on
//! `RETRY` or an error), secrets, health — and checks `dapr-api-token`.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;

#[derive(Default)]
struct Inner {
    /// key -> (etag, value)
    state: BTreeMap<String, (u64, Value)>,
    next_etag: u64,
    secrets: BTreeMap<String, BTreeMap<String, String>>,
    /// topic -> events published
    published: HashMap<String, Vec<Value>>,
    /// The app to deliver to: its base URL and subscribed routes by topic.
    app: Option<(String, HashMap<String, String>)>,
    token: Option<String>,
    /// Sent to the app as `dapr-api-token` (Dapr's `APP_API_TOKEN`).
    app_token: Option<String>,
}

#[derive(Clone)]
pub struct FakeDaprSidecar {
    inner: Arc<Mutex<Inner>>,
    pub port: u16,
    http: reqwest::Client,
}

impl FakeDaprSidecar {
    /// Starts on a free loopback port; `token`: required `dapr-api-token`.
    pub async fn start(token: Option<&str>) -> FakeDaprSidecar {
        let inner = Arc::new(Mutex::new(Inner {
            token: token.map(str::to_string),
            ..Inner::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake sidecar");
        let port = listener.local_addr().expect("local address").port();
        let fake = FakeDaprSidecar {
            inner,
            port,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("HTTP client"),
        };
        let app = Router::new()
            // As in Dapr, the health endpoint needs no token.
            .route("/v1.0/healthz", get(|| async { StatusCode::NO_CONTENT }))
            .route("/v1.0/state/{store}/transaction", post(transaction))
            .route("/v1.0/state/{store}/{key}", get(get_state))
            .route("/v1.0/publish/{pubsub}/{topic}", post(publish))
            .route("/v1.0/secrets/{store}/{name}", get(secret))
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token presented to the app on every call (`APP_API_TOKEN`).
    pub fn set_app_token(&self, token: &str) {
        self.lock().app_token = Some(token.to_string());
    }

    fn app_request(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.lock().app_token.clone() {
            Some(t) => r.header("dapr-api-token", t),
            None => r,
        }
    }

    pub fn set_secret(&self, store: &str, name: &str, value: &str) {
        self.lock().secrets.insert(
            format!("{store}/{name}"),
            [(name.to_string(), value.to_string())].into(),
        );
    }

    /// Events published to `topic` so far.
    pub fn published(&self, topic: &str) -> Vec<Value> {
        self.lock()
            .published
            .get(topic)
            .cloned()
            .unwrap_or_default()
    }

    /// Reads the app's subscriptions (as the sidecar does when it starts)
    /// and delivers every later publish to it.
    pub async fn connect_app(&self, app_base: &str) {
        let subs: Vec<Value> = self
            .app_request(self.http.get(format!("{app_base}/dapr/subscribe")))
            .send()
            .await
            .expect("the app answers /dapr/subscribe")
            .json()
            .await
            .expect("subscriptions as JSON");
        let routes = subs
            .iter()
            .filter_map(|s| {
                Some((
                    s.get("topic")?.as_str()?.to_string(),
                    s.get("route")?.as_str()?.to_string(),
                ))
            })
            .collect();
        self.lock().app = Some((app_base.to_string(), routes));
    }

    fn authorised(&self, headers: &HeaderMap) -> bool {
        match &self.lock().token {
            None => true,
            Some(t) => headers
                .get("dapr-api-token")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == t),
        }
    }

    /// Posts one event to the app's route until it answers SUCCESS (or DROP).
    async fn deliver(self, url: String, event: Value) {
        for _ in 0..50 {
            let r = self
                .app_request(self.http.post(&url))
                .header("content-type", "application/cloudevents+json")
                .json(&event)
                .send()
                .await;
            if let Ok(r) = r {
                if r.status().is_success() {
                    let status = r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_string))
                        .unwrap_or_else(|| "SUCCESS".into());
                    if status != "RETRY" {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn refuse() -> Response {
    (StatusCode::UNAUTHORIZED, "invalid dapr-api-token").into_response()
}

async fn get_state(
    State(f): State<FakeDaprSidecar>,
    headers: HeaderMap,
    Path((_store, key)): Path<(String, String)>,
) -> Response {
    if !f.authorised(&headers) {
        return refuse();
    }
    match f.lock().state.get(&key) {
        None => StatusCode::NO_CONTENT.into_response(),
        Some((etag, v)) => ([("etag", etag.to_string())], Json(v.clone())).into_response(),
    }
}

async fn transaction(
    State(f): State<FakeDaprSidecar>,
    headers: HeaderMap,
    Path(_store): Path<String>,
    body: Bytes,
) -> Response {
    if !f.authorised(&headers) {
        return refuse();
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "malformed transaction").into_response();
    };
    let ops = body["operations"].as_array().cloned().unwrap_or_default();
    let mut inner = f.lock();
    // Every ETag first: the transaction applies whole or not at all.
    for op in &ops {
        let req = &op["request"];
        let Some(key) = req["key"].as_str() else {
            return (StatusCode::BAD_REQUEST, "operation without a key").into_response();
        };
        if let Some(etag) = req["etag"].as_str() {
            match inner.state.get(key) {
                Some((current, _)) if current.to_string() == etag => {}
                _ => {
                    return (StatusCode::CONFLICT, "possible etag mismatch").into_response();
                }
            }
        }
    }
    for op in ops {
        let req = &op["request"];
        let key = req["key"].as_str().unwrap_or_default().to_string();
        match op["operation"].as_str() {
            Some("upsert") => {
                inner.next_etag += 1;
                let etag = inner.next_etag;
                inner.state.insert(key, (etag, req["value"].clone()));
            }
            Some("delete") => {
                inner.state.remove(&key);
            }
            _ => return (StatusCode::BAD_REQUEST, "unknown operation").into_response(),
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn publish(
    State(f): State<FakeDaprSidecar>,
    headers: HeaderMap,
    Path((_pubsub, topic)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if !f.authorised(&headers) {
        return refuse();
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "the body is not JSON").into_response();
    };
    let target = {
        let mut inner = f.lock();
        inner
            .published
            .entry(topic.clone())
            .or_default()
            .push(event.clone());
        inner
            .app
            .as_ref()
            .and_then(|(base, routes)| routes.get(&topic).map(|r| format!("{base}{r}")))
    };
    if let Some(url) = target {
        tokio::spawn(f.clone().deliver(url, event));
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn secret(
    State(f): State<FakeDaprSidecar>,
    headers: HeaderMap,
    Path((store, name)): Path<(String, String)>,
) -> Response {
    if !f.authorised(&headers) {
        return refuse();
    }
    match f.lock().secrets.get(&format!("{store}/{name}")) {
        Some(m) => Json(m.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no such secret").into_response(),
    }
}
