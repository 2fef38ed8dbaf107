//! Dapr mode: state, pub/sub and secrets through the Dapr sidecar's HTTP
//! API (`StateStore:Type=dapr`, `PubSub:Type=dapr`, `secret:dapr:`
//! references), with the
//! `dapr-api-token` header when `DAPR_API_TOKEN` is set.
//!
//! State: each key holds an envelope `{"v": version, "d": base64 value}`;
//! a commit reads every key it touches (value and ETag), checks the
//! preconditions against the envelopes' versions, then writes all ops in one
//! state transaction carrying those ETags (first-write wins). A write that
//! raced with another one fails its ETag check as a whole; the commit then
//! reads again and either finds its preconditions broken (a conflict) or
//! tries once more. A key that does not exist has no ETag to guard it:
//! creations and removals are guarded by the key list instead (the list of
//! every key, which prefix listings come from), read before the keys and
//! written, with its ETag, in the same transaction. Of two creators of one
//! key, the second fails on the key list's ETag and then finds the key.
//! The key list itself is made with the worker index, which the store
//! seeds at connect.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use workmanager_core::bus::{Ack, Acker, Bus, BusError, Delivery, PushIntake, Subscription};
use workmanager_core::store::{keys, Version};
use workmanager_core::{CloudEvent, Precondition, StateStore, StoreError, Versioned, WriteOp};

/// The sorted list of every key this store wrote (for prefix listings).
const KEY_LIST: &str = "workmanager/dapr/keys";
/// Commit attempts when a transaction loses an ETag race that left the
/// preconditions intact.
const COMMIT_ATTEMPTS: usize = 8;

const TOKEN_REFUSED: &str =
    "the Dapr sidecar refused the API token: set DAPR_API_TOKEN to the sidecar's token";

/// Where the sidecar is and how to talk to it.
#[derive(Debug, Clone)]
pub struct DaprSettings {
    /// `http://127.0.0.1:{Dapr:HttpPort}`.
    pub base_url: String,
    /// `DAPR_API_TOKEN`: sent as `dapr-api-token` on every call.
    pub api_token: Option<String>,
    /// Component names: `stateStoreName`, `pubsubName`.
    pub state_store: String,
    pub pubsub: String,
    pub timeout: Duration,
}

/// A small client of the sidecar's HTTP API.
#[derive(Clone)]
pub struct DaprClient {
    http: reqwest::Client,
    settings: DaprSettings,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("Dapr sidecar {what}: {e}"))
}

impl DaprClient {
    pub fn new(settings: DaprSettings) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the Dapr HTTP client: {e}"))?;
        Ok(Self { http, settings })
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.settings.base_url));
        if let Some(t) = &self.settings.api_token {
            r = r.header("dapr-api-token", t);
        }
        r
    }

    /// `GET /v1.0/healthz`: the sidecar is up.
    pub async fn healthz(&self) -> Result<(), String> {
        let r = self
            .request(reqwest::Method::GET, "/v1.0/healthz")
            .send()
            .await
            .map_err(|e| {
                format!(
                    "the Dapr sidecar at {} is not reachable: {e}",
                    self.settings.base_url
                )
            })?;
        match r.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(TOKEN_REFUSED.into()),
            s => Err(format!("the Dapr sidecar answered {s} to its health check")),
        }
    }

    /// `GET /v1.0/secrets/{store}/{name}`, then `key` of the answer (the
    /// name itself when no key is given and the secret has one entry named so).
    pub async fn secret(
        &self,
        store: &str,
        name: &str,
        key: Option<&str>,
    ) -> Result<String, String> {
        let path = format!("/v1.0/secrets/{}/{}", urlencode(store), urlencode(name));
        let r = self
            .request(reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(|e| format!("Dapr secret store {store}: {e}"))?;
        let status = r.status().as_u16();
        if status == 401 || status == 403 {
            return Err(TOKEN_REFUSED.into());
        }
        if status != 200 {
            return Err(format!(
                "Dapr secret store {store} answered {status} for secret {name:?}"
            ));
        }
        let map: BTreeMap<String, String> = r
            .json()
            .await
            .map_err(|e| format!("Dapr secret store {store}: unreadable answer: {e}"))?;
        let wanted = key.unwrap_or(name);
        map.get(wanted)
            .cloned()
            .or_else(|| {
                (map.len() == 1 && key.is_none())
                    .then(|| map.values().next().cloned())
                    .flatten()
            })
            .ok_or_else(|| format!("Dapr secret {name:?} in store {store} has no key {wanted:?}"))
    }
}

/// Percent-encodes one path segment.
pub(crate) fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: Version,
    d: String,
}

/// One key as read: its envelope and the ETag that guards it.
struct Current {
    envelope: Option<(Version, Vec<u8>)>,
    etag: Option<String>,
}

pub struct DaprStore {
    client: DaprClient,
}

impl DaprStore {
    /// Checks the sidecar answers and seeds the worker index.
    pub async fn connect(client: DaprClient) -> Result<Self, StoreError> {
        client.healthz().await.map_err(StoreError::Unavailable)?;
        let s = Self { client };
        if s.get(keys::WORKER_INDEX).await?.is_none() {
            match s
                .put(keys::WORKER_INDEX, b"[]".to_vec(), Precondition::Absent)
                .await
            {
                Ok(_) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(s)
    }

    fn state_path(&self, key: Option<&str>) -> String {
        let store = urlencode(&self.client.settings.state_store);
        match key {
            Some(k) => format!("/v1.0/state/{store}/{}", urlencode(k)),
            None => format!("/v1.0/state/{store}/transaction"),
        }
    }

    async fn read(&self, key: &str) -> Result<Current, StoreError> {
        let r = self
            .client
            .request(reqwest::Method::GET, &self.state_path(Some(key)))
            .send()
            .await
            .map_err(|e| unavailable("state read", e))?;
        let status = r.status().as_u16();
        let etag = r
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim_matches('"').to_string());
        let body = r.bytes().await.map_err(|e| unavailable("state read", e))?;
        if status == 204 || (status == 200 && body.is_empty()) {
            return Ok(Current {
                envelope: None,
                etag: None,
            });
        }
        if status == 401 || status == 403 {
            return Err(StoreError::Unavailable(TOKEN_REFUSED.into()));
        }
        if status != 200 {
            return Err(unavailable(
                "state read",
                format!("status {status}: {}", String::from_utf8_lossy(&body)),
            ));
        }
        let env: Envelope = serde_json::from_slice(&body).map_err(|e| {
            StoreError::Corrupt(format!("{key} in the Dapr state store is not ours: {e}"))
        })?;
        let value = base64::engine::general_purpose::STANDARD
            .decode(env.d)
            .map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
        Ok(Current {
            envelope: Some((env.v, value)),
            etag,
        })
    }

    /// One attempt: Ok(Some(versions)) applied, Ok(None) lost an ETag race
    /// with the preconditions intact (try again), Err(Conflict) broken.
    async fn try_commit(
        &self,
        ops: &[WriteOp],
    ) -> Result<Option<Vec<Option<Version>>>, StoreError> {
        let mut operations = Vec::new();
        let mut versions = Vec::new();
        let mut created = Vec::new();
        let mut removed = Vec::new();
        // The key list guards every creation and removal: its ETag goes with
        // the transaction. It is read before the keys, so that a key found
        // absent here and created by another writer before this commit makes
        // the key list's ETag stale, and this transaction fail, instead of
        // both creators succeeding. Writes that must find a version need no
        // guard beyond their key's own ETag.
        let guarded = ops.iter().any(|op| match op {
            WriteOp::Put { pre, .. } | WriteOp::Delete { pre, .. } => {
                !matches!(pre, Precondition::Version(_))
            }
        });
        let mut key_list = if guarded {
            Some(self.read(KEY_LIST).await?)
        } else {
            None
        };
        for op in ops {
            let (key, pre) = match op {
                WriteOp::Put { key, pre, .. } | WriteOp::Delete { key, pre } => (key, *pre),
            };
            let cur = self.read(key).await?;
            let version = cur.envelope.as_ref().map(|(v, _)| *v);
            let holds = match pre {
                Precondition::None => true,
                Precondition::Absent => version.is_none(),
                Precondition::Version(v) => version == Some(v),
            };
            if !holds {
                return Err(StoreError::Conflict(key.clone()));
            }
            match op {
                WriteOp::Put { value, .. } => {
                    let next = version.unwrap_or(0) + 1;
                    let env = Envelope {
                        v: next,
                        d: base64::engine::general_purpose::STANDARD.encode(value),
                    };
                    let mut request = serde_json::json!({"key": key, "value": env});
                    if let Some(e) = &cur.etag {
                        request["etag"] = e.clone().into();
                        request["options"] = serde_json::json!({"concurrency": "first-write"});
                    }
                    operations.push(serde_json::json!({"operation": "upsert", "request": request}));
                    versions.push(Some(next));
                    if version.is_none() {
                        created.push(key.clone());
                    }
                }
                WriteOp::Delete { .. } => {
                    versions.push(None);
                    if version.is_some() {
                        let mut request = serde_json::json!({"key": key});
                        if let Some(e) = &cur.etag {
                            request["etag"] = e.clone().into();
                            request["options"] = serde_json::json!({"concurrency": "first-write"});
                        }
                        operations
                            .push(serde_json::json!({"operation": "delete", "request": request}));
                        removed.push(key.clone());
                    }
                }
            }
        }
        if !created.is_empty() || !removed.is_empty() {
            let list = match key_list.take() {
                Some(list) => list,
                None => self.read(KEY_LIST).await?,
            };
            operations.push(Self::key_list_op(list, &created, &removed)?);
        }
        if operations.is_empty() {
            return Ok(Some(versions));
        }
        let r = self
            .client
            .request(reqwest::Method::POST, &self.state_path(None))
            .json(&serde_json::json!({"operations": operations}))
            .send()
            .await
            .map_err(|e| unavailable("state transaction", e))?;
        let status = r.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(Some(versions));
        }
        let body = r.text().await.unwrap_or_default();
        // An ETag mismatch: 409 from current sidecars; older ones say so in
        // a 500's message.
        if status == 409 || body.to_ascii_lowercase().contains("etag") {
            return Ok(None);
        }
        Err(unavailable(
            "state transaction",
            format!("status {status}: {body}"),
        ))
    }

    /// The upsert of the key list `cur` with `created` added and `removed`
    /// taken out, guarded by the ETag it was read with.
    fn key_list_op(
        cur: Current,
        created: &[String],
        removed: &[String],
    ) -> Result<serde_json::Value, StoreError> {
        let (version, mut list) = match cur.envelope {
            Some((v, bytes)) => (
                v,
                serde_json::from_slice::<Vec<String>>(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("the Dapr key list: {e}")))?,
            ),
            None => (0, Vec::new()),
        };
        list.retain(|k| !removed.contains(k));
        list.extend(created.iter().cloned());
        list.sort();
        list.dedup();
        let bytes = serde_json::to_vec(&list).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let env = Envelope {
            v: version + 1,
            d: base64::engine::general_purpose::STANDARD.encode(bytes),
        };
        let mut request = serde_json::json!({"key": KEY_LIST, "value": env});
        if let Some(e) = cur.etag {
            request["etag"] = e.into();
            request["options"] = serde_json::json!({"concurrency": "first-write"});
        }
        Ok(serde_json::json!({"operation": "upsert", "request": request}))
    }
}

#[async_trait]
impl StateStore for DaprStore {
    fn name(&self) -> &'static str {
        "dapr"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.client.healthz().await.map_err(StoreError::Unavailable)
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self
            .read(key)
            .await?
            .envelope
            .map(|(version, value)| Versioned { value, version }))
    }

    async fn commit(&self, ops: Vec<WriteOp>) -> Result<Vec<Option<Version>>, StoreError> {
        for _ in 0..COMMIT_ATTEMPTS {
            if let Some(versions) = self.try_commit(&ops).await? {
                return Ok(versions);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Err(StoreError::Conflict(
            "the Dapr state store kept losing ETag races; retry".into(),
        ))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let Some((_, bytes)) = self.read(KEY_LIST).await?.envelope else {
            return Ok(Vec::new());
        };
        let list: Vec<String> = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("the Dapr key list: {e}")))?;
        Ok(list.into_iter().filter(|k| k.starts_with(prefix)).collect())
    }
}

// ---- pub/sub ------------------------------------------------------------------

/// Dapr pub/sub (`PubSub:Type=dapr`): publishes go to
/// `POST /v1.0/publish/{pubsubName}/{topic}` as structured CloudEvents; the
/// sidecar pushes events back through the service's HTTP port
/// (`GET /dapr/subscribe` declares the topics, `POST /dapr/events/{topic}`
/// takes each event and answers SUCCESS or RETRY once every local worker of
/// the topic settled it).
///
/// Dapr delivers each topic once per app id, not once per worker: the
/// workers of one topic share a delivery, which succeeds only when all of
/// them settled it; a retried delivery skips the workers that already
/// processed that event id. Dapr reads the subscriptions when the sidecar
/// starts: topics of workers created later must be listed in `Dapr:Topics`
/// (or a declarative Subscription routed to `/dapr/events/{topic}`).
pub struct DaprBus {
    client: DaprClient,
    intake: Arc<Intake>,
}

struct Group {
    name: String,
    queue: mpsc::Sender<Delivery>,
    /// Events (`CloudEvent::dedup_key`) this group settled recently: a
    /// redelivery skips them.
    done: Arc<Mutex<Recent>>,
}

#[derive(Default)]
struct Recent {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

const RECENT_IDS: usize = 10_000;

impl Recent {
    fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > RECENT_IDS {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }
}

struct Intake {
    pubsub: String,
    app_token: Option<String>,
    capacity: usize,
    declared: Mutex<BTreeSet<String>>,
    read_by_sidecar: AtomicBool,
    groups: Mutex<HashMap<String, Vec<Group>>>,
    watchers: Mutex<HashMap<String, broadcast::Sender<Arc<CloudEvent>>>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reports one group's outcome for a pushed event.
struct PushAck {
    tx: Mutex<Option<oneshot::Sender<Ack>>>,
    done: Arc<Mutex<Recent>>,
    key: String,
}

impl Acker for PushAck {
    fn ack(&self, outcome: Ack) {
        if outcome == Ack::Done {
            locked(&self.done).insert(self.key.clone());
        }
        if let Some(tx) = locked(&self.tx).take() {
            let _ = tx.send(outcome);
        }
    }
}

impl DaprBus {
    /// `topics`: declared to the sidecar besides those of running workers
    /// (`Dapr:Topics`); `app_token`: what the sidecar must present
    /// (`APP_API_TOKEN`).
    pub async fn connect(
        client: DaprClient,
        topics: Vec<String>,
        app_token: Option<String>,
        capacity: usize,
    ) -> Result<Self, BusError> {
        client.healthz().await.map_err(BusError::Unavailable)?;
        let pubsub = client.settings.pubsub.clone();
        Ok(Self {
            client,
            intake: Arc::new(Intake {
                pubsub,
                app_token,
                capacity: capacity.max(1),
                declared: Mutex::new(topics.into_iter().collect()),
                read_by_sidecar: AtomicBool::new(false),
                groups: Mutex::new(HashMap::new()),
                watchers: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl DaprBus {
    async fn publish_one(&self, topic: &str, event: &CloudEvent) -> Result<(), BusError> {
        let path = format!(
            "/v1.0/publish/{}/{}",
            urlencode(&self.intake.pubsub),
            urlencode(topic)
        );
        let body = event.to_json();
        let r = self
            .client
            .request(reqwest::Method::POST, &path)
            .header("content-type", "application/cloudevents+json")
            .body(body)
            .send()
            .await
            .map_err(|e| BusError::Unavailable(format!("Dapr publish: {e}")))?;
        match r.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(BusError::Unavailable(TOKEN_REFUSED.into())),
            404 => Err(BusError::Unavailable(format!(
                "the Dapr sidecar has no pub/sub component named {:?} (pubsubName)",
                self.intake.pubsub
            ))),
            s => Err(BusError::Unavailable(format!(
                "Dapr publish answered {s}: {}",
                r.text().await.unwrap_or_default()
            ))),
        }
    }
}

#[async_trait]
impl PushIntake for Intake {
    fn subscriptions(&self) -> (String, Vec<String>) {
        self.read_by_sidecar.store(true, Ordering::Relaxed);
        (
            self.pubsub.clone(),
            locked(&self.declared).iter().cloned().collect(),
        )
    }

    fn app_token(&self) -> Option<String> {
        self.app_token.clone()
    }

    async fn push(&self, topic: &str, event: CloudEvent) -> Ack {
        if let Some(w) = locked(&self.watchers).get(topic) {
            let _ = w.send(Arc::new(event.clone()));
        }
        let targets: Vec<(String, mpsc::Sender<Delivery>, Arc<Mutex<Recent>>)> =
            locked(&self.groups)
                .get(topic)
                .map(|gs| {
                    gs.iter()
                        .map(|g| (g.name.clone(), g.queue.clone(), g.done.clone()))
                        .collect()
                })
                .unwrap_or_default();
        if targets.is_empty() {
            tracing::debug!(
                topic,
                "a pushed event has no worker here; the sidecar redelivers it"
            );
            return Ack::Retry;
        }
        // Source and id, as the other buses' duplicate checks: another
        // producer's event with the same id is another event.
        let key = event.dedup_key().unwrap_or_default();
        let topic_arc: Arc<str> = Arc::from(topic);
        let mut waits = Vec::new();
        for (group, queue, done) in targets {
            if locked(&done).ids.contains(&key) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let delivery = Delivery {
                topic: topic_arc.clone(),
                event: event.clone(),
                acker: Some(Box::new(PushAck {
                    tx: Mutex::new(Some(tx)),
                    done,
                    key: key.clone(),
                })),
            };
            if queue.send(delivery).await.is_err() {
                tracing::debug!(group, "the worker stopped meanwhile");
                return Ack::Retry;
            }
            waits.push(rx);
        }
        let mut outcome = Ack::Done;
        for rx in waits {
            if !matches!(rx.await, Ok(Ack::Done)) {
                outcome = Ack::Retry;
            }
        }
        outcome
    }
}

#[async_trait]
impl Bus for DaprBus {
    fn name(&self) -> &'static str {
        "dapr"
    }

    async fn publish(&self, topic: &str, event: CloudEvent) -> Result<(), BusError> {
        self.publish_one(topic, &event).await
    }

    async fn publish_slice(&self, topic: &str, events: &[CloudEvent]) -> Result<(), BusError> {
        // In order: Dapr keeps per-topic order only for sequential publishes.
        for e in events {
            self.publish_one(topic, e).await?;
        }
        Ok(())
    }

    async fn publish_many(&self, topic: &str, events: Vec<CloudEvent>) -> Result<(), BusError> {
        self.publish_slice(topic, &events).await
    }

    async fn subscribe(&self, topics: &[String], group: &str) -> Result<Subscription, BusError> {
        let (tx, rx) = mpsc::channel(self.intake.capacity);
        let done = Arc::new(Mutex::new(Recent::default()));
        {
            let mut declared = locked(&self.intake.declared);
            for t in topics {
                if declared.insert(t.clone()) && self.intake.read_by_sidecar.load(Ordering::Relaxed)
                {
                    tracing::warn!(
                        topic = %t,
                        "the Dapr sidecar read the subscriptions before this topic existed: it delivers \
                         it after its restart, or list the topic in Dapr:Topics"
                    );
                }
            }
        }
        let mut groups = locked(&self.intake.groups);
        for t in topics {
            let list = groups.entry(t.clone()).or_default();
            list.retain(|g| g.name != group);
            list.push(Group {
                name: group.to_string(),
                queue: tx.clone(),
                done: done.clone(),
            });
        }
        Ok(Subscription { receiver: rx })
    }

    async fn unsubscribe(&self, topics: &[String], group: &str) {
        let mut groups = locked(&self.intake.groups);
        for t in topics {
            if let Some(list) = groups.get_mut(t) {
                list.retain(|g| g.name != group);
            }
        }
    }

    fn watch(&self, topic: &str) -> broadcast::Receiver<Arc<CloudEvent>> {
        locked(&self.intake.watchers)
            .entry(topic.to_string())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe()
    }

    fn queue_depth(&self, group: &str) -> usize {
        locked(&self.intake.groups)
            .values()
            .flatten()
            .find(|g| g.name == group)
            .map(|g| self.intake.capacity - g.queue.capacity())
            .unwrap_or(0)
    }

    fn intake(&self) -> Option<Arc<dyn PushIntake>> {
        Some(self.intake.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::dapr_fake::FakeDaprSidecar;
    use crate::store_suite as suite;

    fn client(fake: &FakeDaprSidecar, token: Option<&str>) -> DaprClient {
        DaprClient::new(DaprSettings {
            base_url: fake.url(),
            api_token: token.map(str::to_string),
            state_store: "statestore".into(),
            pubsub: "pubsub".into(),
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    async fn store() -> (FakeDaprSidecar, DaprStore) {
        let fake = FakeDaprSidecar::start(Some("sidecar-token")).await;
        let s = DaprStore::connect(client(&fake, Some("sidecar-token")))
            .await
            .unwrap();
        (fake, s)
    }

    #[tokio::test]
    async fn put_get_versions_and_cas() {
        let (_f, s) = store().await;
        suite::put_get_versions_and_cas(&s).await;
    }

    #[tokio::test]
    async fn commit_is_all_or_nothing() {
        let (_f, s) = store().await;
        suite::commit_is_all_or_nothing(&s).await;
    }

    #[tokio::test]
    async fn list_by_prefix_and_delete() {
        let (_f, s) = store().await;
        suite::list_by_prefix_and_delete(&s).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_cas_has_one_winner() {
        let (_f, s) = store().await;
        suite::concurrent_cas_has_one_winner(Arc::new(s)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_creates_have_one_winner() {
        let (_f, s) = store().await;
        suite::concurrent_creates_have_one_winner(Arc::new(s)).await;
    }

    #[tokio::test]
    async fn a_stale_etag_is_a_conflict_not_an_overwrite() {
        let (fake, s) = store().await;
        let v1 = s
            .put("k", b"one".to_vec(), Precondition::None)
            .await
            .unwrap();
        // Another writer changes the key behind this store's back.
        let other = DaprStore::connect(client(&fake, Some("sidecar-token")))
            .await
            .unwrap();
        other
            .put("k", b"theirs".to_vec(), Precondition::Version(v1))
            .await
            .unwrap();
        assert!(matches!(
            s.put("k", b"mine".to_vec(), Precondition::Version(v1))
                .await,
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.get("k").await.unwrap().unwrap().value, b"theirs");
    }

    #[tokio::test]
    async fn the_api_token_is_required_and_secrets_resolve() {
        let fake = FakeDaprSidecar::start(Some("sidecar-token")).await;
        let refused = DaprStore::connect(client(&fake, Some("wrong"))).await;
        assert!(
            matches!(&refused, Err(StoreError::Unavailable(m)) if m.contains("DAPR_API_TOKEN")),
            "{:?}",
            refused.err()
        );
        fake.set_secret("vault", "redis-password", "s3cret");
        let c = client(&fake, Some("sidecar-token"));
        assert_eq!(
            c.secret("vault", "redis-password", None).await.unwrap(),
            "s3cret"
        );
        let missing = c.secret("vault", "nope", None).await.unwrap_err();
        assert!(missing.contains("404"), "{missing}");
    }

    /// The sidecar redelivers an event when some group asked for a retry: a
    /// group that already settled it skips it. Another producer's event
    /// with the same id is another event, and is delivered.
    #[tokio::test]
    async fn a_redelivery_is_skipped_but_another_sources_event_with_its_id_is_not() {
        let fake = FakeDaprSidecar::start(None).await;
        let bus = DaprBus::connect(client(&fake, None), vec![], None, 16)
            .await
            .unwrap();
        let mut sub = bus.subscribe(&["t".into()], "w1").await.unwrap();
        let intake = bus.intake().unwrap();
        let settled = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 2 {
                let Some(d) = sub.receiver.recv().await else {
                    break;
                };
                got.push(d.event.0["data"].clone());
                d.ack(Ack::Done);
            }
            got
        });
        let e = |source: &str, data: u64| {
            CloudEvent::from_input(serde_json::json!({
                "specversion": "1.0", "id": "same", "source": source, "type": "t", "data": data
            }))
        };
        assert_eq!(intake.push("t", e("urn:a", 1)).await, Ack::Done);
        assert_eq!(intake.push("t", e("urn:a", 1)).await, Ack::Done);
        assert_eq!(intake.push("t", e("urn:b", 2)).await, Ack::Done);
        let got = tokio::time::timeout(Duration::from_secs(5), settled)
            .await
            .expect("both events reach the group")
            .unwrap();
        assert_eq!(got, vec![serde_json::json!(1), serde_json::json!(2)]);
    }
}
