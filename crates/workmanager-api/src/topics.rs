//! CloudEvents over HTTP: `POST /v1/topics/{topic}` in structured mode
//! (`application/cloudevents+json`), batch mode
//! (`application/cloudevents-batch+json`) and binary mode (`ce-*` headers,
//! the body is the data), per the CloudEvents HTTP protocol binding; and
//! `GET /v1/topics/{topic}/events`, the topic as Server-Sent Events.
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::Stream;
use http::{HeaderMap, StatusCode};
use serde_json::{json, Map, Value};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use workmanager_core::CloudEvent;

use crate::error::ApiError;
use crate::http::{ApiResult, AppState};

const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];

/// Checks a structured-mode event and says what is wrong with it.
fn structured(v: Value, cid: &str) -> ApiResult<CloudEvent> {
    let Value::Object(map) = v else {
        return Err(ApiError::bad_request(
            "a CloudEvent must be a JSON object",
            cid,
        ));
    };
    for attr in REQUIRED {
        match map.get(attr) {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => {
                return Err(ApiError::bad_request(
                    format!(
                        "the CloudEvent lacks the required attribute {attr:?} (a non-empty string)"
                    ),
                    cid,
                ))
            }
        }
    }
    if map.get("specversion").and_then(Value::as_str) != Some("1.0") {
        return Err(ApiError::bad_request("specversion must be \"1.0\"", cid));
    }
    Ok(CloudEvent(map))
}

/// Percent-decodes a binary-mode header value (CloudEvents HTTP binding 3.1.3.2).
fn decode_header(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn binary(
    headers: &HeaderMap,
    body: &Bytes,
    content_type: Option<&str>,
    cid: &str,
) -> ApiResult<CloudEvent> {
    let mut map = Map::new();
    for (name, value) in headers {
        if let Some(attr) = name.as_str().strip_prefix("ce-") {
            let value = value.to_str().map_err(|_| {
                ApiError::bad_request(format!("header {name} is not valid text"), cid)
            })?;
            map.insert(attr.to_string(), Value::String(decode_header(value)));
        }
    }
    if map.is_empty() {
        // Not a CloudEvent at all: wrapped as type "unknown" (spec 7.1).
        let data = serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
        return Ok(CloudEvent::from_input(data));
    }
    for attr in REQUIRED {
        if !map.contains_key(attr) {
            return Err(ApiError::bad_request(
                format!("binary-mode CloudEvent lacks the header ce-{attr}"),
                cid,
            ));
        }
    }
    if let Some(ct) = content_type {
        map.insert("datacontenttype".into(), Value::String(ct.to_string()));
    }
    if !body.is_empty() {
        let ct = content_type
            .unwrap_or("application/json")
            .to_ascii_lowercase();
        let data = if ct.contains("json") {
            serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(
                    format!("the body is not the JSON its content type says: {e}"),
                    cid,
                )
            })?
        } else if ct.starts_with("text/") {
            Value::String(String::from_utf8_lossy(body).into_owned())
        } else {
            map.insert(
                "data_base64".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(body)),
            );
            Value::Null
        };
        if !data.is_null() {
            map.insert("data".into(), data);
        }
    }
    structured(Value::Object(map), cid)
}

pub(crate) async fn publish(
    State(s): State<AppState>,
    cid: crate::http::Ctx,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let media = content_type.map(|c| {
        c.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    let parse_json = |body: &Bytes| -> ApiResult<Value> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("malformed CloudEvent JSON: {e}"), &cid.0))
    };
    let events = match media.as_deref() {
        Some("application/cloudevents+json") => vec![structured(parse_json(&body)?, &cid.0)?],
        Some("application/cloudevents-batch+json") => match parse_json(&body)? {
            Value::Array(items) => items
                .into_iter()
                .map(|v| structured(v, &cid.0))
                .collect::<ApiResult<Vec<_>>>()?,
            _ => {
                return Err(ApiError::bad_request(
                    "a CloudEvents batch must be a JSON array",
                    &cid.0,
                ))
            }
        },
        _ => vec![binary(&headers, &body, content_type, &cid.0)?],
    };
    let count = events.len();
    s.manager()
        .publish_many(&topic, events)
        .await
        .map_err(|e| ApiError::from_core(e, &cid.0))?;
    Ok((StatusCode::ACCEPTED, Json(json!({"published": count}))).into_response())
}

pub(crate) async fn events(
    State(s): State<AppState>,
    cid: crate::http::Ctx,
    Path(topic): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let rx = s
        .manager()
        .watch(&topic)
        .map_err(|e| ApiError::from_core(e, &cid.0))?;
    let stream = BroadcastStream::new(rx).filter_map(|item| {
        let e = item.ok()?;
        let id = e.get_str("id").unwrap_or("").to_string();
        let data = serde_json::to_string(&e.0).ok()?;
        Some(Ok(Event::default().event("cloudevent").id(id).data(data)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
