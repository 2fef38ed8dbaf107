//! The worker model: ids, status, code sources, the persisted record, and the
//! validation rules for everything a user can put into a worker.
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};

/// Maximum number of tags on a worker, and their key/value lengths (chars).
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_KEY_CHARS: usize = 128;
pub const MAX_TAG_VALUE_CHARS: usize = 1024;
/// Topic names: non-empty, at most this many bytes, no control characters.
pub const MAX_TOPIC_BYTES: usize = 256;

/// A worker id: a UUID v4 assigned by the server.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(String);

impl WorkerId {
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// Parses a user-supplied id. Anything that is not a UUID cannot name a
    /// worker, so it is reported as not found rather than as a format error.
    pub fn parse(s: &str) -> Result<Self> {
        match uuid::Uuid::parse_str(s.trim()) {
            Ok(u) => Ok(Self(u.to_string())),
            Err(_) if s.trim().is_empty() => Err(CoreError::InvalidArgument(
                "the worker id is empty; pass the id returned by CreateWorker".into(),
            )),
            Err(_) => Err(CoreError::NotFound(format!("worker {s:?} not found"))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for WorkerId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkerStatus {
    Stopped,
    Running,
    /// The engine cannot run the worker; `last_error` says why. StartWorker retries.
    Failed,
}

impl WorkerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Stopped => "STOPPED",
            WorkerStatus::Running => "RUNNING",
            WorkerStatus::Failed => "FAILED",
        }
    }
}

/// Code as a request gives it, before it is fetched or validated.
#[derive(Debug, Clone)]
pub enum CodeInput {
    Content(Vec<u8>),
    Url {
        url: String,
        content_sha256: Option<String>,
        /// Name of a configured credential; the only kind that is persisted.
        credential_name: Option<String>,
        /// Raw per-request credential (basic or bearer), used for one fetch.
        raw_credential: Option<RawCredential>,
    },
}

/// A credential given with one request; never persisted, never logged.
#[derive(Clone)]
pub enum RawCredential {
    Basic { username: String, token: String },
    Bearer { token: String },
}

impl fmt::Debug for RawCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawCredential::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            RawCredential::Bearer { .. } => f.write_str("Bearer(***)"),
        }
    }
}

/// Where the current code came from, as persisted (so recovery can reload it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoredCode {
    Content {
        /// Shared, so snapshots of the record for reads never copy the code.
        #[serde(with = "base64_bytes")]
        content: Arc<[u8]>,
    },
    Url {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content_sha256: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential_name: Option<String>,
    },
}

/// One successful code load. Content loads keep the hash and size, not the
/// bytes, so a worker's record does not grow with every hot reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub content_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    pub size_bytes: u64,
    pub created_at: String,
}

/// The persisted worker, stored as JSON at `workmanager/workers/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub mime_type: String,
    pub language: String,
    pub topics: Vec<String>,
    pub config: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub status: WorkerStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: String,
    pub instance_id: String,
    pub max_concurrency: u32,
    pub code: StoredCode,
    pub history: Vec<HistoryEntry>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

pub fn validate_topics(topics: &[String]) -> Result<()> {
    if topics.is_empty() {
        return Err(CoreError::InvalidArgument(
            "topics is empty; give the worker at least one topic to listen on".into(),
        ));
    }
    for t in topics {
        validate_topic(t)?;
    }
    Ok(())
}

pub fn validate_topic(t: &str) -> Result<()> {
    if t.is_empty() {
        return Err(CoreError::InvalidArgument("a topic name is empty".into()));
    }
    if t.len() > MAX_TOPIC_BYTES {
        return Err(CoreError::InvalidArgument(format!(
            "topic {:?}... is {} bytes long; the limit is {MAX_TOPIC_BYTES}",
            t.chars().take(32).collect::<String>(),
            t.len()
        )));
    }
    if t.chars().any(char::is_control) {
        return Err(CoreError::InvalidArgument(format!(
            "topic {t:?} contains a control character"
        )));
    }
    Ok(())
}

/// Config keys become CloudEvent extension attributes, so they must be valid
/// attribute names: lower-case ASCII letters and digits, 1 to 20 characters.
pub fn validate_config(config: &BTreeMap<String, String>) -> Result<()> {
    for key in config.keys() {
        let ok = !key.is_empty()
            && key.len() <= 20
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok {
            return Err(CoreError::InvalidArgument(format!(
                "config key {key:?} is not a valid CloudEvent attribute name: use 1 to 20 \
                 lower-case letters a-z and digits 0-9"
            )));
        }
    }
    Ok(())
}

/// Checks a whole tag map (after a merge) against the limits.
pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(CoreError::InvalidArgument(format!(
            "a worker can have at most {MAX_TAGS} tags; this would give it {}",
            tags.len()
        )));
    }
    for (k, v) in tags {
        validate_tag(k, v)?;
    }
    Ok(())
}

pub fn validate_tag(key: &str, value: &str) -> Result<()> {
    if key.is_empty() {
        return Err(CoreError::InvalidArgument("a tag key is empty".into()));
    }
    let key_chars = key.chars().count();
    if key_chars > MAX_TAG_KEY_CHARS {
        return Err(CoreError::InvalidArgument(format!(
            "tag key is {key_chars} characters long; the limit is {MAX_TAG_KEY_CHARS}"
        )));
    }
    let value_chars = value.chars().count();
    if value_chars > MAX_TAG_VALUE_CHARS {
        return Err(CoreError::InvalidArgument(format!(
            "the value of tag {key:?} is {value_chars} characters long; the limit is {MAX_TAG_VALUE_CHARS}"
        )));
    }
    Ok(())
}

mod base64_bytes {
    use std::sync::Arc;

    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(Arc::from)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_must_be_attribute_names() {
        let mut c = BTreeMap::new();
        c.insert("region1".to_string(), "x".to_string());
        assert!(validate_config(&c).is_ok());
        for bad in ["Region", "a-b", "", "abcdefghijklmnopqrstu"] {
            let mut c = BTreeMap::new();
            c.insert(bad.to_string(), "x".to_string());
            assert!(validate_config(&c).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tag_limits_are_enforced_in_characters() {
        assert!(validate_tag(&"k".repeat(128), &"é".repeat(1024)).is_ok());
        assert!(validate_tag(&"k".repeat(129), "v").is_err());
        assert!(validate_tag("k", &"v".repeat(1025)).is_err());
        let many: BTreeMap<_, _> = (0..51).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_tags(&many).is_err());
    }

    #[test]
    fn topics_are_checked() {
        assert!(validate_topics(&[]).is_err());
        assert!(validate_topics(&["orders".into()]).is_ok());
        assert!(validate_topics(&["a\nb".into()]).is_err());
        assert!(validate_topics(&["x".repeat(257)]).is_err());
    }

    #[test]
    fn ids_that_are_not_uuids_are_not_found() {
        assert!(matches!(
            WorkerId::parse("nope"),
            Err(CoreError::NotFound(_))
        ));
        assert!(matches!(
            WorkerId::parse(""),
            Err(CoreError::InvalidArgument(_))
        ));
        let id = WorkerId::new();
        assert_eq!(WorkerId::parse(id.as_str()).ok(), Some(id));
    }

    #[test]
    fn stored_code_round_trips_as_json() {
        let c = StoredCode::Content {
            content: Arc::from(&b"def Process(e): pass"[..]),
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<StoredCode>(&s).unwrap(), c);
    }
}
