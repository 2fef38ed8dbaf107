//! CloudEvents 1.0 in their JSON form, the representation every part of the
//! core and every engine works with. Attributes and extensions are top-level
//! keys; `data` holds parsed JSON when the content type is JSON, a string for
//! other text, and `data_base64` holds binary data.
use serde_json::{Map, Value};

use crate::model::{now_rfc3339, WorkerId};

pub const SPEC_VERSION: &str = "1.0";
pub const UNKNOWN_TYPE: &str = "unknown";
pub const UNKNOWN_SOURCE: &str = "urn:com.virtufin.workmanager:unknown";
/// Namespace of the name-based (v5) UUIDs given to outputs without an id.
const OUTPUT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5b0e_6a1c_93d4_4f2e_b7a8_0c61_d2e9_f374);
/// The longest identity that is its own dedup key (`CloudEvent::dedup_key`).
const DEDUP_KEY_PLAIN_MAX: usize = 128;
/// Namespace of the keys the buses drop duplicates by.
const DEDUP_KEY_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x2f7c_41d8_0b6e_4a93_8e15_c4a0_79d2_b65e);

/// A CloudEvent in JSON structured form.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent(pub Map<String, Value>);

impl CloudEvent {
    /// Accepts a JSON value as an input event. Anything that is not a valid
    /// CloudEvent (missing or non-string `id`, `source`, `type`, `specversion`)
    /// is wrapped as `type="unknown"` with the original value as its data, so
    /// nothing is dropped.
    pub fn from_input(value: Value) -> Self {
        match value {
            Value::Object(map) if is_valid(&map) => CloudEvent(map),
            other => {
                let mut m = Map::new();
                m.insert("specversion".into(), SPEC_VERSION.into());
                m.insert("id".into(), uuid::Uuid::new_v4().to_string().into());
                m.insert("type".into(), UNKNOWN_TYPE.into());
                m.insert("source".into(), UNKNOWN_SOURCE.into());
                m.insert("datacontenttype".into(), "application/json".into());
                m.insert("data".into(), other);
                CloudEvent(m)
            }
        }
    }

    /// Marks the event for its dead-letter topic (`dead_letter_topic`):
    /// why it landed there and which worker gave up on it.
    pub fn mark_dead_letter(&mut self, reason: String, worker: &str) {
        self.0.insert("deadletterreason".into(), reason.into());
        self.0.insert("deadletterworker".into(), worker.into());
    }

    /// What the networked buses recognise a repeat of this event by: its
    /// identity — CloudEvents makes `source` + `id` unique per event, so two
    /// producers' events that share an id are both kept — and, for a dead
    /// letter, the worker that gave up on it (each worker's dead letter of
    /// one event is its own message). Short identities of visible ASCII are
    /// their own key (no hashing on the message path); any other is a
    /// name-based UUID, which has no `:` and so never equals a plain one.
    /// Either is safe as a NATS header value. `None` without an id.
    pub fn dedup_key(&self) -> Option<String> {
        let id = self.get_str("id").filter(|id| !id.is_empty())?;
        let source = self.get_str("source").unwrap_or("");
        // Lengths first: no choice of attributes makes two events' names
        // run together into one.
        let name = format!(
            "{}:{source}{}:{id}{}",
            source.len(),
            id.len(),
            self.get_str("deadletterworker").unwrap_or("")
        );
        if name.len() <= DEDUP_KEY_PLAIN_MAX && name.bytes().all(|b| b.is_ascii_graphic()) {
            return Some(name);
        }
        Some(uuid::Uuid::new_v5(&DEDUP_KEY_NAMESPACE, name.as_bytes()).to_string())
    }

    /// Appends the event's compact JSON to `out` (as `serde_json` writes it).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        crate::json::write_object(out, &self.0);
    }

    /// The event's compact JSON (as `serde_json` writes it).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.write_json(&mut out);
        out
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }

    /// Sets each config entry as an extension attribute unless the event
    /// already has that attribute (the event's own value wins).
    pub fn stamp(&mut self, config: &std::collections::BTreeMap<String, String>) {
        for (k, v) in config {
            if !self.0.contains_key(k) {
                self.0.insert(k.clone(), Value::String(v.clone()));
            }
        }
    }

    /// Completes a worker's output: inherits the input's `correlationid` when
    /// the output has none, and fills `id`, `specversion`, `time` and `source`
    /// when missing.
    pub fn complete_output(&mut self, input: &CloudEvent, worker: &WorkerId) {
        if !self.0.contains_key("correlationid") {
            if let Some(c) = input.0.get("correlationid") {
                self.0.insert("correlationid".into(), c.clone());
            }
        }
        // The output's id follows from the worker and the input's identity
        // (CloudEvents: source + id), so a message processed again after a
        // crash yields an output with the same id, which the bus's
        // duplicate suppression and idempotent consumers drop.
        if !self.0.contains_key("id") {
            let name = format!(
                "{worker}\n{}\n{}",
                input.get_str("source").unwrap_or(""),
                input.get_str("id").unwrap_or("")
            );
            let id = uuid::Uuid::new_v5(&OUTPUT_ID_NAMESPACE, name.as_bytes());
            self.0.insert("id".into(), id.to_string().into());
        }
        self.0
            .entry("specversion")
            .or_insert_with(|| SPEC_VERSION.into());
        self.0.entry("time").or_insert_with(|| now_rfc3339().into());
        self.0
            .entry("source")
            .or_insert_with(|| format!("urn:com.virtufin.workmanager:worker:{worker}").into());
    }
}

fn is_valid(map: &Map<String, Value>) -> bool {
    ["id", "source", "type", "specversion"].iter().all(|k| {
        map.get(*k)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(v: Value) -> CloudEvent {
        CloudEvent::from_input(v)
    }

    #[test]
    fn repeats_share_a_dedup_key_and_distinct_events_do_not() {
        let e = |source: &str, id: &str| {
            ev(json!({"specversion": "1.0", "id": id, "source": source, "type": "t"}))
        };
        let key = |e: &CloudEvent| e.dedup_key().expect("a key");
        assert_eq!(key(&e("urn:a", "1")), key(&e("urn:a", "1")));
        // Another producer's event with the same id is another event.
        assert_ne!(key(&e("urn:a", "1")), key(&e("urn:b", "1")));
        assert_ne!(key(&e("urn:a", "1")), key(&e("urn:a", "2")));
        // Attributes never run together into another event's.
        assert_ne!(key(&e("urn:a\n1", "2")), key(&e("urn:a", "1\n2")));
        // Each worker's dead letter of one event is its own message.
        let dead = |worker: &str| {
            let mut d = e("urn:a", "1");
            d.mark_dead_letter("failed".into(), worker);
            key(&d)
        };
        assert_ne!(dead("w1"), dead("w2"));
        assert_eq!(dead("w1"), dead("w1"));
        assert_ne!(dead("w1"), key(&e("urn:a", "1")));
        // Safe as a header value, whatever the attributes hold: hashed.
        let odd = key(&e("urn:a\r\n", "x\ny"));
        assert!(odd.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
        let long = key(&e("urn:a", &"x".repeat(200)));
        assert!(long.len() == 36 && !long.contains(':'), "{long}");
        assert_ne!(long, key(&e("urn:a", &"x".repeat(201))));
        // A plain key always has a ':', a hashed one never.
        assert!(key(&e("urn:a", "1")).contains(':'));
        let mut no_id = e("urn:a", "1");
        no_id.0.insert("id".into(), "".into());
        assert_eq!(no_id.dedup_key(), None);
    }

    #[test]
    fn an_output_id_follows_from_the_worker_and_the_input() {
        let worker = WorkerId::new();
        let input = ev(json!({"specversion": "1.0", "id": "in-1", "source": "urn:a", "type": "t"}));
        let out = |input: &CloudEvent, worker: &WorkerId| {
            let mut o = CloudEvent(json!({"type": "o", "data": 1}).as_object().unwrap().clone());
            o.complete_output(input, worker);
            o.get_str("id").unwrap().to_string()
        };
        let first = out(&input, &worker);
        assert_eq!(
            first,
            out(&input, &worker),
            "processing again gives the same id"
        );
        let other = ev(json!({"specversion": "1.0", "id": "in-2", "source": "urn:a", "type": "t"}));
        assert_ne!(first, out(&other, &worker));
        let elsewhere =
            ev(json!({"specversion": "1.0", "id": "in-1", "source": "urn:b", "type": "t"}));
        assert_ne!(first, out(&elsewhere, &worker));
        assert_ne!(first, out(&input, &WorkerId::new()));
        let mut own = CloudEvent(
            json!({"id": "mine", "type": "o"})
                .as_object()
                .unwrap()
                .clone(),
        );
        own.complete_output(&input, &worker);
        assert_eq!(own.get_str("id"), Some("mine"), "a worker's own id is kept");
    }

    #[test]
    fn non_cloudevents_are_wrapped_not_dropped() {
        let e = ev(json!({"price": 3}));
        assert_eq!(e.get_str("type"), Some(UNKNOWN_TYPE));
        assert_eq!(e.get_str("source"), Some(UNKNOWN_SOURCE));
        assert_eq!(e.0["data"], json!({"price": 3}));
        let e = ev(json!([1, 2]));
        assert_eq!(e.0["data"], json!([1, 2]));
    }

    #[test]
    fn valid_events_pass_unchanged() {
        let v = json!({"specversion":"1.0","id":"1","source":"s","type":"t","data":{"a":1}});
        assert_eq!(ev(v.clone()).0, v.as_object().unwrap().clone());
    }

    #[test]
    fn stamping_keeps_the_events_own_attributes() {
        let mut e = ev(json!({"specversion":"1.0","id":"1","source":"s","type":"t","region":"eu"}));
        let cfg = [
            ("region".to_string(), "us".to_string()),
            ("desk".to_string(), "fx".to_string()),
        ]
        .into_iter()
        .collect();
        e.stamp(&cfg);
        assert_eq!(e.get_str("region"), Some("eu"));
        assert_eq!(e.get_str("desk"), Some("fx"));
    }

    #[test]
    fn output_is_completed_and_inherits_correlation() {
        let input =
            ev(json!({"specversion":"1.0","id":"1","source":"s","type":"t","correlationid":"c-1"}));
        let id = WorkerId::new();
        let mut out = CloudEvent(json!({"type":"done","data":1}).as_object().unwrap().clone());
        out.complete_output(&input, &id);
        assert_eq!(out.get_str("correlationid"), Some("c-1"));
        assert_eq!(out.get_str("specversion"), Some("1.0"));
        assert_eq!(
            out.get_str("source"),
            Some(format!("urn:com.virtufin.workmanager:worker:{id}").as_str())
        );
        assert!(out.get_str("id").is_some() && out.get_str("time").is_some());

        let mut own = CloudEvent(
            json!({"type":"done","correlationid":"mine"})
                .as_object()
                .unwrap()
                .clone(),
        );
        own.complete_output(&input, &id);
        assert_eq!(own.get_str("correlationid"), Some("mine"));
    }
}
