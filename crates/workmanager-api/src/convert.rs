//! Translation between the wire types and the core's types: worker info,
//! code sources, history, and CloudEvents (protobuf format ↔ JSON format).
use base64::Engine as _;
use serde_json::{Map, Value};
use tonic::Status;
use workmanager_core::manager::WorkerSnapshot;
use workmanager_core::model::{HistoryEntry, RawCredential};
use workmanager_core::{CloudEvent, CodeInput, EngineInfo, WorkerStatus};

use crate::pb;
use crate::pb::io::cloudevents::v1 as ce;
use ce::cloud_event::cloud_event_attribute_value::Attr;

pub fn worker_info(s: &WorkerSnapshot) -> pb::WorkerInfo {
    let r = &s.record;
    pb::WorkerInfo {
        id: r.id.to_string(),
        mime_type: r.mime_type.clone(),
        language: r.language.clone(),
        topics: r.topics.clone(),
        created_at: r.created_at.clone(),
        status: status(r.status) as i32,
        config: r.config.clone(),
        tags: r.tags.clone(),
        instance_id: r.instance_id.clone(),
        last_error: r.last_error.clone().unwrap_or_default(),
        messages_processed: s.messages_processed,
        messages_failed: s.messages_failed,
        max_concurrency: r.max_concurrency,
    }
}

pub fn status(s: WorkerStatus) -> pb::WorkerStatus {
    match s {
        WorkerStatus::Stopped => pb::WorkerStatus::Stopped,
        WorkerStatus::Running => pb::WorkerStatus::Running,
        WorkerStatus::Failed => pb::WorkerStatus::Failed,
    }
}

pub fn engine_info(e: EngineInfo) -> pb::EngineInfo {
    pb::EngineInfo {
        mime_type: e.mime_type,
        language: e.language,
        isolation: e.isolation,
    }
}

pub fn history_entry(h: HistoryEntry) -> pb::HistoryEntry {
    pb::HistoryEntry {
        code_source: Some(pb::CodeSource {
            source: h.url.map(pb::code_source::Source::Url),
            credential: h.credential_name.map(|n| pb::SourceCredential {
                scheme: Some(pb::source_credential::Scheme::Named(n)),
            }),
            content_sha256: h.content_sha256,
        }),
        created_at: h.created_at,
    }
}

pub fn code_input(cs: Option<pb::CodeSource>) -> Result<CodeInput, Status> {
    let cs = cs.ok_or_else(|| {
        Status::invalid_argument(
            "code_source is missing; set code_source.content (the code) or code_source.url",
        )
    })?;
    let sha = Some(cs.content_sha256).filter(|s| !s.is_empty());
    let (credential_name, raw_credential) = match cs.credential.and_then(|c| c.scheme) {
        None => (None, None),
        Some(pb::source_credential::Scheme::Named(n)) => (Some(n), None),
        Some(pb::source_credential::Scheme::Basic(b)) => (
            None,
            Some(RawCredential::Basic {
                username: b.username,
                token: b.token,
            }),
        ),
        Some(pb::source_credential::Scheme::Bearer(b)) => {
            (None, Some(RawCredential::Bearer { token: b.token }))
        }
    };
    match cs.source {
        Some(pb::code_source::Source::Content(bytes)) => Ok(CodeInput::Content(bytes)),
        Some(pb::code_source::Source::Url(url)) => Ok(CodeInput::Url {
            url,
            content_sha256: sha,
            credential_name,
            raw_credential,
        }),
        None => Err(Status::invalid_argument(
            "code_source has neither content nor url; set one of them",
        )),
    }
}

fn is_json_content_type(ct: Option<&str>) -> bool {
    match ct {
        None => true,
        Some(ct) => {
            let ct = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            ct == "application/json" || ct == "text/json" || ct.ends_with("+json")
        }
    }
}

/// Protobuf CloudEvent → JSON CloudEvent. Attributes become top-level keys;
/// `text_data` is parsed when the content type is JSON (or absent);
/// `binary_data` becomes `data_base64`.
pub fn event_from_proto(e: ce::CloudEvent) -> Result<CloudEvent, Status> {
    let mut m = Map::new();
    for (k, v) in [
        ("specversion", e.spec_version),
        ("id", e.id),
        ("source", e.source),
        ("type", e.r#type),
    ] {
        if !v.is_empty() {
            m.insert(k.into(), Value::String(v));
        }
    }
    for (k, v) in e.attributes {
        let value = match v.attr {
            Some(Attr::CeBoolean(b)) => Value::Bool(b),
            Some(Attr::CeInteger(i)) => Value::from(i),
            Some(Attr::CeString(s)) | Some(Attr::CeUri(s)) | Some(Attr::CeUriRef(s)) => {
                Value::String(s)
            }
            Some(Attr::CeBytes(b)) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            Some(Attr::CeTimestamp(ts)) => {
                Value::String(timestamp_to_rfc3339(ts.seconds, ts.nanos))
            }
            None => continue,
        };
        m.insert(k, value);
    }
    match e.data {
        None => {}
        Some(ce::cloud_event::Data::TextData(text)) => {
            let json = is_json_content_type(m.get("datacontenttype").and_then(Value::as_str));
            let value = if json {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            } else {
                Value::String(text)
            };
            m.insert("data".into(), value);
        }
        Some(ce::cloud_event::Data::BinaryData(b)) => {
            m.insert(
                "data_base64".into(),
                base64::engine::general_purpose::STANDARD.encode(b).into(),
            );
        }
        Some(ce::cloud_event::Data::ProtoData(_)) => return Err(Status::invalid_argument(
            "proto_data events are not supported; send the data as text_data (JSON) or binary_data",
        )),
    }
    Ok(CloudEvent::from_input(Value::Object(m)))
}

/// JSON CloudEvent → protobuf CloudEvent (the inverse of `event_from_proto`).
pub fn event_to_proto(e: &CloudEvent) -> ce::CloudEvent {
    event_into_proto(e.clone())
}

/// As `event_to_proto`, consuming the event: its strings move instead of
/// being copied (the message path's observers own their copy anyway).
pub fn event_into_proto(e: CloudEvent) -> ce::CloudEvent {
    let mut out = ce::CloudEvent::default();
    let text = |v: Value| match v {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let json_data = is_json_content_type(e.get_str("datacontenttype"));
    let needs_content_type = e.0.contains_key("data") && !e.0.contains_key("datacontenttype");
    for (k, v) in e.0 {
        match k.as_str() {
            "id" => out.id = text(v),
            "source" => out.source = text(v),
            "specversion" => out.spec_version = text(v),
            "type" => out.r#type = text(v),
            "data" => {
                let t = match v {
                    Value::String(s) if !json_data => s,
                    // Straight into a buffer (`to_string` goes through
                    // `fmt::Display`, a slower writer).
                    other => serde_json::to_string(&other).unwrap_or_default(),
                };
                out.data = Some(ce::cloud_event::Data::TextData(t));
            }
            "data_base64" => {
                if let Some(b) = v
                    .as_str()
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                {
                    out.data = Some(ce::cloud_event::Data::BinaryData(b));
                }
            }
            _ => {
                let attr = match v {
                    Value::Null => continue,
                    Value::Bool(b) => Attr::CeBoolean(b),
                    Value::Number(n) => match n.as_i64().and_then(|i| i32::try_from(i).ok()) {
                        Some(i) => Attr::CeInteger(i),
                        None => Attr::CeString(n.to_string()),
                    },
                    Value::String(s) if k == "time" => match rfc3339_to_timestamp(&s) {
                        Some(ts) => Attr::CeTimestamp(ts),
                        None => Attr::CeString(s),
                    },
                    Value::String(s) => Attr::CeString(s),
                    other => Attr::CeString(other.to_string()),
                };
                out.attributes.insert(
                    k,
                    ce::cloud_event::CloudEventAttributeValue { attr: Some(attr) },
                );
            }
        }
    }
    if needs_content_type {
        out.attributes.insert(
            "datacontenttype".into(),
            ce::cloud_event::CloudEventAttributeValue {
                attr: Some(Attr::CeString("application/json".into())),
            },
        );
    }
    out
}

fn timestamp_to_rfc3339(seconds: i64, nanos: i32) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| t.replace_nanosecond(nanos.max(0) as u32).ok());
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_default()
}

fn rfc3339_to_timestamp(s: &str) -> Option<pbjson_types::Timestamp> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(pbjson_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_round_trip_between_formats() {
        let j = CloudEvent::from_input(json!({
            "specversion": "1.0", "id": "1", "source": "s", "type": "t",
            "time": "2026-01-02T03:04:05.5Z", "correlationid": "c", "n": 5, "flag": true,
            "datacontenttype": "application/json", "data": {"px": 1.5, "sym": "EUR"}
        }));
        let p = event_to_proto(&j);
        assert!(matches!(p.data, Some(ce::cloud_event::Data::TextData(_))));
        assert!(matches!(
            p.attributes["time"].attr,
            Some(Attr::CeTimestamp(_))
        ));
        let back = event_from_proto(p).unwrap();
        assert_eq!(back.0["data"], json!({"px": 1.5, "sym": "EUR"}));
        assert_eq!(back.get_str("correlationid"), Some("c"));
        assert_eq!(back.0["n"], json!(5));
        assert_eq!(back.0["flag"], json!(true));
        assert_eq!(back.get_str("time"), Some("2026-01-02T03:04:05.5Z"));
    }

    #[test]
    fn binary_and_plain_text_data() {
        let p = ce::CloudEvent {
            id: "1".into(),
            source: "s".into(),
            spec_version: "1.0".into(),
            r#type: "t".into(),
            data: Some(ce::cloud_event::Data::BinaryData(vec![0, 1, 2])),
            ..Default::default()
        };
        let e = event_from_proto(p).unwrap();
        assert_eq!(e.get_str("data_base64"), Some("AAEC"));
        let mut p = event_to_proto(&e);
        assert_eq!(
            p.data,
            Some(ce::cloud_event::Data::BinaryData(vec![0, 1, 2]))
        );
        p.attributes.insert(
            "datacontenttype".into(),
            ce::cloud_event::CloudEventAttributeValue {
                attr: Some(Attr::CeString("text/plain".into())),
            },
        );
        p.data = Some(ce::cloud_event::Data::TextData("{not json".into()));
        assert_eq!(event_from_proto(p).unwrap().0["data"], json!("{not json"));
    }

    #[test]
    fn proto_data_is_refused_with_a_reason() {
        let p = ce::CloudEvent {
            data: Some(ce::cloud_event::Data::ProtoData(Default::default())),
            ..Default::default()
        };
        let err = event_from_proto(p).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
