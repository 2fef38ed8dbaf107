//! The lifecycle service: create, start, stop, hot reload, delete, tags,
//! invoke. It owns the in-memory table of workers hosted by this instance and
//! keeps the state store in step with it.
//!
//! Concurrency: each worker has one `op` lock that serialises its mutations
//! (held across store and engine awaits, never across another worker's), and
//! short std locks for its record and engine pointer (never held across an
//! await). The message path (`invoke`) takes no `op` lock: it clones the
//! current engine `Arc` and runs on it, so a hot reload never waits for, nor
//! breaks, in-flight calls.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde_json::Value;

use crate::audit::{self, RequestContext};
use crate::bus::Bus;
use crate::engine::{EngineError, EngineInfo, EngineRegistry, LoadSpec, LoadedWorker};
use crate::error::{CoreError, Result};
use crate::event::CloudEvent;
use crate::fetch::{CodeFetcher, FetchRequest};
use crate::metrics::{Metrics, StatusLabels};
use crate::model::{
    now_rfc3339, sha256_hex, validate_config, validate_tag, validate_tags, validate_topics,
    CodeInput, HistoryEntry, StoredCode, WorkerId, WorkerRecord, WorkerStatus,
};
use crate::recovery::RecoverySettings;
use crate::store::{keys, Precondition, StateStore, Version, WriteOp};

/// Largest `max_concurrency` a worker may ask for.
pub const MAX_CONCURRENCY: u32 = 64;

#[derive(Debug, Clone)]
pub struct ManagerSettings {
    pub instance_id: String,
    /// `CodeSource:MaxBytes`.
    pub max_code_bytes: usize,
    pub recovery: RecoverySettings,
    /// `Worker:RetryAttempts` and `Worker:RetryBaseDelayMs`: a failing
    /// message is retried this often, base·2^(attempt-1) apart, before it is
    /// dead-lettered.
    pub retry_attempts: u32,
    pub retry_base_delay: std::time::Duration,
    /// How long a stopping worker may finish its queued and in-flight messages.
    pub drain_timeout: std::time::Duration,
    /// Heartbeat, staleness and the advertised endpoint (ownership.rs).
    pub cluster: crate::ownership::ClusterSettings,
}

/// A validated-on-use create request.
#[derive(Debug, Clone)]
pub struct CreateWorker {
    pub code: CodeInput,
    pub mime_type: String,
    pub topics: Vec<String>,
    pub config: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub start: bool,
    pub max_concurrency: u32,
}

/// A worker as the API shows it: the record plus live counters.
#[derive(Debug, Clone)]
pub struct WorkerSnapshot {
    pub record: WorkerRecord,
    pub messages_processed: u64,
    pub messages_failed: u64,
}

#[derive(Clone)]
pub struct Manager {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) bus: Arc<dyn Bus>,
    /// Lifecycle events, published in order by one task (see dispatch.rs).
    pub(crate) lifecycle_tx: tokio::sync::mpsc::Sender<CloudEvent>,
    pub(crate) lifecycle_rx: Mutex<Option<tokio::sync::mpsc::Receiver<CloudEvent>>>,
    engines: EngineRegistry,
    fetcher: Arc<dyn CodeFetcher>,
    pub(crate) settings: ManagerSettings,
    pub(crate) metrics: Arc<Metrics>,
    workers: RwLock<HashMap<WorkerId, Arc<Slot>>>,
    /// Serialises this instance's read-modify-write of the worker index; the
    /// CAS on the index version guards against other instances.
    index_lock: tokio::sync::Mutex<()>,
    /// Flips to true once start-up recovery has finished.
    pub(crate) recovery_done: tokio::sync::watch::Sender<bool>,
    pub(crate) recovery_lock: tokio::sync::Mutex<()>,
}

/// One hosted worker.
pub(crate) struct Slot {
    pub(crate) id: WorkerId,
    /// Immutable after create: read on every message without locking.
    config: Arc<BTreeMap<String, String>>,
    pub(crate) mime_type: String,
    pub(crate) topics: Vec<String>,
    pub(crate) max_concurrency: u32,
    /// The consumer task while the worker is online.
    pub(crate) dispatch: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Metric handles resolved at creation: the message path does no lookups.
    pub(crate) topic_counters: HashMap<String, crate::metrics::TopicCounters>,
    engine_counters: crate::metrics::EngineCounters,
    /// Serialises lifecycle operations on this worker.
    pub(crate) op: tokio::sync::Mutex<()>,
    /// The record and its store version (for CAS writes).
    state: Mutex<(WorkerRecord, Version)>,
    /// Current code; `None` while FAILED without a runnable engine.
    engine: RwLock<Option<Arc<dyn LoadedWorker>>>,
    processed: AtomicU64,
    failed: AtomicU64,
}

impl Slot {
    pub(crate) fn new(
        record: WorkerRecord,
        version: Version,
        engine: Option<Arc<dyn LoadedWorker>>,
        metrics: &Metrics,
    ) -> Self {
        Self {
            id: record.id.clone(),
            config: Arc::new(record.config.clone()),
            mime_type: record.mime_type.clone(),
            topics: record.topics.clone(),
            max_concurrency: record.max_concurrency.max(1),
            dispatch: tokio::sync::Mutex::new(None),
            topic_counters: record
                .topics
                .iter()
                .map(|t| (t.clone(), metrics.topic_counters(t, record.id.as_str())))
                .collect(),
            engine_counters: metrics.engine_counters(&record.mime_type),
            op: tokio::sync::Mutex::new(()),
            state: Mutex::new((record, version)),
            engine: RwLock::new(engine),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    fn record(&self) -> WorkerRecord {
        lock(&self.state).0.clone()
    }

    pub(crate) fn status(&self) -> WorkerStatus {
        lock(&self.state).0.status
    }

    pub(crate) fn engine(&self) -> Option<Arc<dyn LoadedWorker>> {
        self.engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_engine(
        &self,
        e: Option<Arc<dyn LoadedWorker>>,
    ) -> Option<Arc<dyn LoadedWorker>> {
        std::mem::replace(
            &mut *self.engine.write().unwrap_or_else(|p| p.into_inner()),
            e,
        )
    }

    fn snapshot(&self) -> WorkerSnapshot {
        WorkerSnapshot {
            record: self.record(),
            messages_processed: self.processed.load(Ordering::Relaxed),
            messages_failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// Locks a std mutex, recovering from poisoning (the data is plain values
/// that stay consistent; a panic elsewhere must not take the service down).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Manager {
    /// Builds the service. Call `spawn_lifecycle_publisher` and
    /// `spawn_heartbeat` inside the runtime to start its background tasks.
    pub fn new(
        store: Arc<dyn StateStore>,
        bus: Arc<dyn Bus>,
        engines: EngineRegistry,
        fetcher: Arc<dyn CodeFetcher>,
        settings: ManagerSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (lifecycle_tx, lifecycle_rx) = tokio::sync::mpsc::channel(4096);
        Self {
            inner: Arc::new(Inner {
                store,
                bus,
                lifecycle_tx,
                lifecycle_rx: Mutex::new(Some(lifecycle_rx)),
                engines,
                fetcher,
                settings,
                metrics,
                workers: RwLock::new(HashMap::new()),
                index_lock: tokio::sync::Mutex::new(()),
                recovery_done: tokio::sync::watch::Sender::new(false),
                recovery_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.settings.instance_id
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.inner.store
    }

    pub fn engines(&self) -> Vec<EngineInfo> {
        self.inner.engines.infos()
    }

    /// Refreshes the per-status worker gauge and renders all metrics.
    pub fn render_metrics(&self) -> String {
        let mut counts: BTreeMap<&'static str, i64> =
            [("STOPPED", 0), ("RUNNING", 0), ("FAILED", 0)]
                .into_iter()
                .collect();
        for slot in self.slots() {
            *counts.entry(slot.status().as_str()).or_default() += 1;
        }
        for (worker, depth) in self.queue_depths() {
            self.inner
                .metrics
                .queue_depth
                .get_or_create(&crate::metrics::WorkerLabels { worker })
                .set(depth as i64);
        }
        self.inner
            .metrics
            .publish_buffer_waiting
            .set(self.inner.bus.buffered() as i64);
        for (backend, state) in [
            ("statestore", self.inner.store.circuit()),
            ("pubsub", self.inner.bus.circuit()),
        ] {
            self.inner
                .metrics
                .circuit
                .get_or_create(&crate::metrics::BackendLabels {
                    backend: backend.into(),
                })
                .set(match state {
                    crate::resilience::CircuitState::Closed => 0,
                    crate::resilience::CircuitState::Open => 1,
                    crate::resilience::CircuitState::HalfOpen => 2,
                });
        }
        for (status, n) in counts {
            self.inner
                .metrics
                .workers
                .get_or_create(&StatusLabels {
                    status: status.into(),
                })
                .set(n);
        }
        self.inner.metrics.render()
    }

    pub(crate) fn slots(&self) -> Vec<Arc<Slot>> {
        read_map(&self.inner.workers).values().cloned().collect()
    }

    pub(crate) fn contains(&self, id: &WorkerId) -> bool {
        read_map(&self.inner.workers).contains_key(id)
    }

    pub(crate) fn insert(&self, slot: Arc<Slot>) {
        write_map(&self.inner.workers).insert(slot.id.clone(), slot);
    }

    /// Whether this instance hosts the worker (`id` as a user gave it).
    pub fn hosts(&self, id: &str) -> bool {
        WorkerId::parse(id).is_ok_and(|id| self.contains(&id))
    }

    pub(crate) fn remove(&self, id: &WorkerId) {
        write_map(&self.inner.workers).remove(id);
    }

    fn slot(&self, id: &str) -> Result<Arc<Slot>> {
        let id = WorkerId::parse(id)?;
        read_map(&self.inner.workers)
            .get(&id)
            .cloned()
            .ok_or_else(|| CoreError::NotFound(format!("worker {id} not found")))
    }

    // ---- create -------------------------------------------------------------

    pub async fn create(&self, ctx: &RequestContext, req: CreateWorker) -> Result<WorkerSnapshot> {
        let mime = req.mime_type.trim().to_string();
        let result = self.create_inner(ctx, req).await;
        match &result {
            Ok(s) => audit::record(ctx, "CreateWorker", s.record.id.as_str(), &mime, "ok"),
            Err(e) => audit::record(ctx, "CreateWorker", "", &mime, &e.to_string()),
        }
        result
    }

    async fn create_inner(
        &self,
        ctx: &RequestContext,
        req: CreateWorker,
    ) -> Result<WorkerSnapshot> {
        let mime = req.mime_type.trim();
        if mime.is_empty() {
            return Err(CoreError::InvalidArgument(format!(
                "mime_type is empty; use one of: {}",
                self.inner.engines.mime_types().join(", ")
            )));
        }
        let engine = self.inner.engines.get(mime).cloned().ok_or_else(|| {
            CoreError::InvalidArgument(format!(
                "no engine for MIME type {mime:?}; available: {}",
                self.inner.engines.mime_types().join(", ")
            ))
        })?;
        validate_topics(&req.topics)?;
        validate_config(&req.config)?;
        validate_tags(&req.tags)?;
        let max_concurrency = match req.max_concurrency {
            0 => 1,
            n if n > MAX_CONCURRENCY => {
                return Err(CoreError::InvalidArgument(format!(
                    "max_concurrency {n} is too high; use 1 to {MAX_CONCURRENCY}"
                )))
            }
            n => n,
        };
        let (code, stored, history) = self.obtain(req.code).await?;
        let id = WorkerId::new();
        let loaded = engine
            .load(LoadSpec {
                worker_id: id.clone(),
                code,
                max_concurrency,
            })
            .await
            .map_err(load_error)?;
        let info = engine.info();
        let record = WorkerRecord {
            id: id.clone(),
            mime_type: info.mime_type,
            language: info.language,
            topics: req.topics,
            config: req.config,
            tags: req.tags,
            // Starting at create is persisted in the same commit as the
            // record: one durable write instead of two on the cold path.
            status: if req.start {
                WorkerStatus::Running
            } else {
                WorkerStatus::Stopped
            },
            last_error: None,
            created_at: history.created_at.clone(),
            instance_id: self.instance_id().to_string(),
            max_concurrency,
            code: stored,
            history: vec![history],
        };
        let version = match self.persist_new(&record).await {
            Ok(v) => v,
            Err(e) => {
                loaded.shutdown().await;
                return Err(e);
            }
        };
        let slot = Arc::new(Slot::new(
            record,
            version,
            Some(loaded),
            &self.inner.metrics,
        ));
        self.insert(slot.clone());
        self.lifecycle(ctx, &slot, "registered", None);
        if req.start {
            self.lifecycle(ctx, &slot, "starting", None);
            self.go_online(&slot).await?;
            self.lifecycle(ctx, &slot, "online", None);
        }
        Ok(slot.snapshot())
    }

    /// Turns a code input into bytes, what to persist, and a history entry.
    async fn obtain(&self, code: CodeInput) -> Result<(Arc<[u8]>, StoredCode, HistoryEntry)> {
        let max = self.inner.settings.max_code_bytes;
        let (bytes, stored, url, credential_name) = match code {
            CodeInput::Content(bytes) => {
                if bytes.is_empty() {
                    return Err(CoreError::InvalidArgument(
                        "the code content is empty; send the worker's source code".into(),
                    ));
                }
                let bytes: Arc<[u8]> = Arc::from(bytes);
                (
                    bytes.clone(),
                    StoredCode::Content { content: bytes },
                    None,
                    None,
                )
            }
            CodeInput::Url {
                url,
                content_sha256,
                credential_name,
                raw_credential,
            } => {
                let req = FetchRequest {
                    url: url.clone(),
                    content_sha256: content_sha256.clone(),
                    credential_name: credential_name.clone(),
                    raw_credential,
                };
                let bytes: Arc<[u8]> = Arc::from(self.inner.fetcher.fetch(&req).await?);
                let stored = StoredCode::Url {
                    url: url.clone(),
                    content_sha256,
                    credential_name: credential_name.clone(),
                };
                (bytes, stored, Some(url), credential_name)
            }
        };
        if bytes.len() > max {
            return Err(CoreError::InvalidArgument(format!(
                "the code is {} bytes; the limit (CodeSource:MaxBytes) is {max} bytes",
                bytes.len()
            )));
        }
        let history = HistoryEntry {
            url,
            content_sha256: sha256_hex(&bytes),
            credential_name,
            size_bytes: bytes.len() as u64,
            created_at: now_rfc3339(),
        };
        Ok((bytes, stored, history))
    }

    /// Re-obtains a worker's persisted code (restart after FAILED, recovery).
    pub(crate) async fn reobtain(&self, stored: &StoredCode) -> Result<Arc<[u8]>> {
        match stored {
            StoredCode::Content { content } => Ok(content.clone()),
            StoredCode::Url {
                url,
                content_sha256,
                credential_name,
            } => {
                let req = FetchRequest {
                    url: url.clone(),
                    content_sha256: content_sha256.clone(),
                    credential_name: credential_name.clone(),
                    raw_credential: None,
                };
                self.inner.fetcher.fetch(&req).await.map(Arc::from)
            }
        }
    }

    pub(crate) async fn load_engine(&self, record: &WorkerRecord) -> Result<Arc<dyn LoadedWorker>> {
        let engine = self
            .inner
            .engines
            .get(&record.mime_type)
            .cloned()
            .ok_or_else(|| {
                CoreError::FailedPrecondition(format!(
                    "this instance has no engine for MIME type {:?}",
                    record.mime_type
                ))
            })?;
        let code = self.reobtain(&record.code).await?;
        engine
            .load(LoadSpec {
                worker_id: record.id.clone(),
                code,
                max_concurrency: record.max_concurrency.max(1),
            })
            .await
            .map_err(load_error)
    }

    // ---- persistence ----------------------------------------------------------

    /// The ids in the worker index.
    pub(crate) async fn index_ids(&self) -> Result<Vec<String>> {
        Ok(self.read_index().await?.0)
    }

    async fn read_index(&self) -> Result<(Vec<String>, Precondition)> {
        match self.inner.store.get(keys::WORKER_INDEX).await? {
            None => Ok((Vec::new(), Precondition::Absent)),
            Some(v) => {
                let ids: Vec<String> = serde_json::from_slice(&v.value).map_err(|e| {
                    CoreError::Internal(format!("the worker index is not valid JSON: {e}"))
                })?;
                Ok((ids, Precondition::Version(v.version)))
            }
        }
    }

    /// Writes the record and adds it to the index in one atomic commit.
    async fn persist_new(&self, record: &WorkerRecord) -> Result<Version> {
        let value = encode(record)?;
        let _g = self.inner.index_lock.lock().await;
        let (mut ids, pre) = self.read_index().await?;
        ids.push(record.id.to_string());
        let index = serde_json::to_vec(&ids).map_err(|e| CoreError::Internal(e.to_string()))?;
        let started = Instant::now();
        let versions = self
            .inner
            .store
            .commit(vec![
                WriteOp::Put {
                    key: keys::worker(record.id.as_str()),
                    value,
                    pre: Precondition::Absent,
                },
                WriteOp::Put {
                    key: keys::WORKER_INDEX.into(),
                    value: index,
                    pre,
                },
            ])
            .await?;
        self.inner
            .metrics
            .record_store("commit", started.elapsed().as_secs_f64());
        versions
            .first()
            .copied()
            .flatten()
            .ok_or_else(|| CoreError::Internal("store returned no version".into()))
    }

    /// Removes the record and its index entry in one atomic commit.
    pub(crate) async fn persist_delete(&self, id: &WorkerId) -> Result<()> {
        let _g = self.inner.index_lock.lock().await;
        let (mut ids, pre) = self.read_index().await?;
        ids.retain(|i| i != id.as_str());
        let index = serde_json::to_vec(&ids).map_err(|e| CoreError::Internal(e.to_string()))?;
        self.inner
            .store
            .commit(vec![
                WriteOp::Delete {
                    key: keys::worker(id.as_str()),
                    pre: Precondition::None,
                },
                WriteOp::Put {
                    key: keys::WORKER_INDEX.into(),
                    value: index,
                    pre,
                },
            ])
            .await?;
        Ok(())
    }

    /// Applies `change` to the record, writes it with CAS on its version,
    /// and only then makes it visible in memory. On failure nothing changes.
    pub(crate) async fn update<F>(&self, slot: &Slot, change: F) -> Result<WorkerRecord>
    where
        F: FnOnce(&mut WorkerRecord) -> Result<()>,
    {
        let (mut record, version) = lock(&slot.state).clone();
        change(&mut record)?;
        let started = Instant::now();
        let new_version = self
            .inner
            .store
            .put(
                &keys::worker(record.id.as_str()),
                encode(&record)?,
                Precondition::Version(version),
            )
            .await?;
        self.inner
            .metrics
            .record_store("put", started.elapsed().as_secs_f64());
        *lock(&slot.state) = (record.clone(), new_version);
        Ok(record)
    }

    // ---- start / stop ---------------------------------------------------------

    pub async fn start(&self, ctx: &RequestContext, id: &str) -> Result<WorkerSnapshot> {
        let slot = self.audited_slot(ctx, "StartWorker", id)?;
        let _op = slot.op.lock().await;
        let result = self.start_locked(ctx, &slot).await;
        self.audit(ctx, "StartWorker", &slot, &result);
        result.map(|_| slot.snapshot())
    }

    async fn start_locked(&self, ctx: &RequestContext, slot: &Arc<Slot>) -> Result<()> {
        if slot.status() == WorkerStatus::Running && slot.engine().is_some() {
            return Ok(());
        }
        self.lifecycle(ctx, slot, "starting", None);
        if slot.engine().is_none() {
            let record = slot.record();
            match self.load_engine(&record).await {
                Ok(e) => {
                    slot.set_engine(Some(e));
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.mark_failed_locked(ctx, slot, &msg).await;
                    return Err(CoreError::FailedPrecondition(format!(
                        "worker {} could not start: {msg}",
                        slot.id
                    )));
                }
            }
        }
        self.go_online(slot).await?;
        if let Err(e) = self
            .update(slot, |r| {
                r.status = WorkerStatus::Running;
                r.last_error = None;
                Ok(())
            })
            .await
        {
            self.go_offline(slot).await;
            return Err(e);
        }
        self.lifecycle(ctx, slot, "online", None);
        Ok(())
    }

    pub async fn stop(&self, ctx: &RequestContext, id: &str) -> Result<WorkerSnapshot> {
        let slot = self.audited_slot(ctx, "StopWorker", id)?;
        let _op = slot.op.lock().await;
        let result = self.stop_locked(ctx, &slot).await;
        self.audit(ctx, "StopWorker", &slot, &result);
        result.map(|_| slot.snapshot())
    }

    async fn stop_locked(&self, ctx: &RequestContext, slot: &Slot) -> Result<()> {
        if slot.status() == WorkerStatus::Stopped {
            return Ok(());
        }
        self.lifecycle(ctx, slot, "stopping", None);
        self.go_offline(slot).await;
        self.update(slot, |r| {
            r.status = WorkerStatus::Stopped;
            Ok(())
        })
        .await?;
        self.lifecycle(ctx, slot, "stopped", None);
        Ok(())
    }

    // ---- code -------------------------------------------------------------------

    /// Hot reload: the new code is loaded into a fresh engine first; only when
    /// it is ready is it swapped in. Calls already running keep the old
    /// engine (they hold its `Arc`), which is disposed when the last finishes.
    pub async fn load_code(
        &self,
        ctx: &RequestContext,
        operation: &str,
        id: &str,
        code: CodeInput,
    ) -> Result<WorkerSnapshot> {
        let slot = self.audited_slot(ctx, operation, id)?;
        let _op = slot.op.lock().await;
        let result = self.load_code_locked(ctx, &slot, code).await;
        self.audit(ctx, operation, &slot, &result);
        result.map(|_| slot.snapshot())
    }

    async fn load_code_locked(
        &self,
        ctx: &RequestContext,
        slot: &Slot,
        code: CodeInput,
    ) -> Result<()> {
        let (bytes, stored, history) = self.obtain(code).await?;
        let engine = self
            .inner
            .engines
            .get(&slot.mime_type)
            .cloned()
            .ok_or_else(|| {
                CoreError::FailedPrecondition(format!("no engine for MIME type {}", slot.mime_type))
            })?;
        let max_concurrency = lock(&slot.state).0.max_concurrency.max(1);
        let fresh = engine
            .load(LoadSpec {
                worker_id: slot.id.clone(),
                code: bytes,
                max_concurrency,
            })
            .await
            .map_err(load_error)?;
        let persisted = self
            .update(slot, |r| {
                r.code = stored;
                r.history.push(history);
                if r.status == WorkerStatus::Failed {
                    // New code that loads is the fix for a failed worker: it
                    // is runnable again and waits for StartWorker.
                    r.status = WorkerStatus::Stopped;
                    r.last_error = None;
                }
                Ok(())
            })
            .await;
        if let Err(e) = persisted {
            fresh.shutdown().await;
            return Err(e);
        }
        // The old engine is dropped here or when its last in-flight call ends.
        drop(slot.set_engine(Some(fresh)));
        self.lifecycle(ctx, slot, "codeloaded", None);
        Ok(())
    }

    // ---- delete -----------------------------------------------------------------

    pub async fn delete(&self, ctx: &RequestContext, id: &str) -> Result<()> {
        let slot = self.audited_slot(ctx, "DeleteWorker", id)?;
        let _op = slot.op.lock().await;
        let result = self.delete_locked(ctx, &slot).await;
        self.audit(ctx, "DeleteWorker", &slot, &result);
        result
    }

    async fn delete_locked(&self, ctx: &RequestContext, slot: &Slot) -> Result<()> {
        if !self.contains(&slot.id) {
            // A concurrent delete won the race while we waited for the lock.
            return Err(CoreError::NotFound(format!("worker {} not found", slot.id)));
        }
        if slot.status() == WorkerStatus::Running {
            self.lifecycle(ctx, slot, "stopping", None);
            self.go_offline(slot).await;
            self.lifecycle(ctx, slot, "stopped", None);
        }
        self.persist_delete(&slot.id).await?;
        self.inner
            .bus
            .remove_group(&slot.topics, slot.id.as_str())
            .await;
        write_map(&self.inner.workers).remove(&slot.id);
        if let Some(engine) = slot.set_engine(None) {
            engine.shutdown().await;
        }
        self.lifecycle(ctx, slot, "deleted", None);
        Ok(())
    }

    // ---- reads ----------------------------------------------------------------

    pub fn get(&self, id: &str) -> Result<WorkerSnapshot> {
        Ok(self.slot(id)?.snapshot())
    }

    /// Workers matching every `(key, value)` tag filter, oldest first.
    pub fn list(&self, filters: &[(String, String)]) -> Vec<WorkerSnapshot> {
        let mut out: Vec<WorkerSnapshot> = self
            .slots()
            .into_iter()
            .map(|s| s.snapshot())
            .filter(|s| filters.iter().all(|(k, v)| s.record.tags.get(k) == Some(v)))
            .collect();
        sort_oldest_first(&mut out);
        out
    }

    pub fn history(&self, id: &str) -> Result<Vec<HistoryEntry>> {
        Ok(self.slot(id)?.record().history)
    }

    // ---- tags ---------------------------------------------------------------------

    pub async fn set_tags(
        &self,
        ctx: &RequestContext,
        operation: &str,
        id: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>> {
        let slot = self.audited_slot(ctx, operation, id)?;
        let _op = slot.op.lock().await;
        for (k, v) in &tags {
            validate_tag(k, v)?;
        }
        let result = self
            .update(&slot, |r| {
                let mut merged = r.tags.clone();
                merged.extend(tags);
                validate_tags(&merged)?;
                r.tags = merged;
                Ok(())
            })
            .await
            .map(|r| r.tags);
        self.audit(ctx, operation, &slot, &result);
        result
    }

    pub fn get_tags(&self, id: &str) -> Result<BTreeMap<String, String>> {
        Ok(self.slot(id)?.record().tags)
    }

    pub fn get_tag(&self, id: &str, key: &str) -> Result<String> {
        let slot = self.slot(id)?;
        let record = slot.record();
        record
            .tags
            .get(key)
            .cloned()
            .ok_or_else(|| CoreError::NotFound(format!("worker {} has no tag {key:?}", slot.id)))
    }

    // ---- the message path ------------------------------------------------------------

    /// Runs one event through a worker: stamp config, call the engine,
    /// complete the output. Returns `None` when the worker returned nothing.
    pub async fn invoke(&self, id: &str, event: CloudEvent) -> Result<Option<CloudEvent>> {
        let slot = self.slot(id)?;
        self.invoke_slot(&slot, &event).await
    }

    /// The message path's core, shared by `InvokeWorker` and the
    /// dispatcher. The event is copied only when config must be stamped on it.
    pub(crate) async fn invoke_slot(
        &self,
        slot: &Arc<Slot>,
        input: &CloudEvent,
    ) -> Result<Option<CloudEvent>> {
        let slot = slot.clone();
        let engine = match slot.engine() {
            Some(e) => e,
            None => {
                let record = slot.record();
                return Err(CoreError::FailedPrecondition(format!(
                    "worker {} is {}{}; StartWorker retries it",
                    slot.id,
                    record.status.as_str(),
                    record
                        .last_error
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                )));
            }
        };
        let stamped;
        let event = if slot.config.is_empty() {
            input
        } else {
            let mut e = input.clone();
            e.stamp(&slot.config);
            stamped = e;
            &stamped
        };
        let started = Instant::now();
        let result = engine.process(event).await;
        self.account(
            &slot,
            &engine,
            event,
            result,
            started.elapsed().as_secs_f64(),
        )
    }

    /// Runs several events through the worker in one pipelined exchange
    /// (see `LoadedWorker::process_batch`): results for the events that ran,
    /// in order; the first failure ends the batch.
    pub(crate) async fn invoke_batch(
        &self,
        slot: &Arc<Slot>,
        inputs: &[&CloudEvent],
    ) -> Vec<Result<Option<CloudEvent>>> {
        let Some(first) = inputs.first() else {
            return Vec::new();
        };
        let Some(engine) = slot.engine() else {
            // No runnable code: the first event reports why; the rest wait.
            return vec![self.invoke_slot(slot, first).await];
        };
        let stamped: Vec<CloudEvent>;
        let events: Vec<&CloudEvent> = if slot.config.is_empty() {
            inputs.to_vec()
        } else {
            stamped = inputs
                .iter()
                .map(|e| {
                    let mut e = (*e).clone();
                    e.stamp(&slot.config);
                    e
                })
                .collect();
            stamped.iter().collect()
        };
        let started = Instant::now();
        let results = engine.process_batch(&events).await;
        let seconds = started.elapsed().as_secs_f64() / results.len().max(1) as f64;
        results
            .into_iter()
            .zip(events)
            .map(|(r, e)| self.account(slot, &engine, e, r, seconds))
            .collect()
    }

    /// Completes one engine result and counts it.
    fn account(
        &self,
        slot: &Arc<Slot>,
        engine: &Arc<dyn LoadedWorker>,
        event: &CloudEvent,
        result: std::result::Result<Option<Value>, EngineError>,
        seconds: f64,
    ) -> Result<Option<CloudEvent>> {
        let outcome = self.finish(slot, engine, event, result);
        slot.engine_counters.record(outcome.is_ok(), seconds);
        match &outcome {
            Ok(_) => slot.processed.fetch_add(1, Ordering::Relaxed),
            Err(_) => slot.failed.fetch_add(1, Ordering::Relaxed),
        };
        outcome
    }

    fn finish(
        &self,
        slot: &Arc<Slot>,
        engine: &Arc<dyn LoadedWorker>,
        input: &CloudEvent,
        result: std::result::Result<Option<Value>, EngineError>,
    ) -> Result<Option<CloudEvent>> {
        let id = &slot.id;
        match result {
            Ok(None) => Ok(None),
            Ok(Some(Value::Object(map))) => {
                let mut out = CloudEvent(map);
                match out.get_str("type") {
                    Some(t) if !t.is_empty() => {}
                    _ => {
                        return Err(CoreError::WorkerError(format!(
                            "worker {id} returned a result without a 'type'; Process must return a dict \
                             with at least 'type' and 'data', or None"
                        )))
                    }
                }
                out.complete_output(input, id);
                Ok(Some(out))
            }
            Ok(Some(other)) => Err(CoreError::WorkerError(format!(
                "worker {id} returned {}; Process must return a dict or None",
                json_kind(&other)
            ))),
            Err(EngineError::Failed(msg)) => {
                let this = self.clone();
                let slot = slot.clone();
                let failed = engine.clone();
                let reason = msg.clone();
                tokio::spawn(async move {
                    let _op = slot.op.lock().await;
                    // Only if that engine is still current: a hot reload in
                    // the meantime has already replaced the broken code.
                    if slot.engine().is_some_and(|e| Arc::ptr_eq(&e, &failed)) {
                        this.mark_failed_locked(&RequestContext::system(), &slot, &reason)
                            .await;
                    }
                });
                Err(CoreError::Unavailable(format!("worker {id} is FAILED: {msg}")))
            }
            Err(EngineError::Timeout(d)) => Err(CoreError::DeadlineExceeded(format!(
                "worker {id} did not finish within {}s (Python:ExecutionTimeoutSeconds); its process was \
                 killed and restarts on the next message",
                d.as_secs_f64()
            ))),
            Err(EngineError::Internal(msg)) => Err(CoreError::Unavailable(format!("worker {id}: {msg}"))),
            Err(e @ EngineError::Processing { .. }) => {
                let tail = match &e {
                    EngineError::Processing { traceback, .. } => traceback_tail(traceback),
                    _ => String::new(),
                };
                Err(CoreError::WorkerError(format!("worker {id} raised {e}{tail}")))
            }
            Err(e) => Err(CoreError::WorkerError(format!("worker {id}: {e}"))),
        }
    }

    /// Marks a worker FAILED with the reason and releases its engine. Errors
    /// writing the status are logged: the in-memory state still says FAILED.
    pub(crate) async fn mark_failed_locked(&self, ctx: &RequestContext, slot: &Slot, reason: &str) {
        if let Some(engine) = slot.set_engine(None) {
            engine.shutdown().await;
        }
        // The status first: whoever sees the dead letters below also sees FAILED.
        let result = self
            .update(slot, |r| {
                r.status = WorkerStatus::Failed;
                r.last_error = Some(reason.to_string());
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(worker_id = %slot.id, error = %e, "could not persist FAILED status");
            let mut state = lock(&slot.state);
            state.0.status = WorkerStatus::Failed;
            state.0.last_error = Some(reason.to_string());
        }
        // Without code, queued messages fail fast to the dead-letter topic.
        self.go_offline(slot).await;
        self.lifecycle(ctx, slot, "failed", Some(reason));
    }

    // ---- shutdown -----------------------------------------------------------------

    /// Disposes every engine (children are asked to exit, then killed).
    /// Persisted state is kept for the next start.
    pub async fn shutdown(&self) {
        let slots: Vec<Arc<Slot>> = self.slots();
        futures::future::join_all(slots.iter().map(|s| self.go_offline(s))).await;
        write_map(&self.inner.workers).clear();
        let engines: Vec<_> = slots.iter().filter_map(|s| s.set_engine(None)).collect();
        futures::future::join_all(engines.iter().map(|e| e.shutdown())).await;
        // A clean stop gives the workers up at once: with the heartbeat
        // gone, the next instance (or a peer) takes them without waiting
        // for it to go stale. (Stop the heartbeat task first.)
        let key = crate::store::keys::instance(self.instance_id());
        if let Err(e) = self.inner.store.delete(&key, Precondition::None).await {
            tracing::warn!(error = %e, "could not remove this instance's heartbeat; it goes stale by itself");
        }
    }

    // ---- audit and lifecycle ---------------------------------------------------------

    fn audited_slot(&self, ctx: &RequestContext, operation: &str, id: &str) -> Result<Arc<Slot>> {
        self.slot(id)
            .inspect_err(|e| audit::record(ctx, operation, id, "", &e.to_string()))
    }

    fn audit<T>(&self, ctx: &RequestContext, operation: &str, slot: &Slot, result: &Result<T>) {
        let outcome = match result {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        audit::record(ctx, operation, slot.id.as_str(), &slot.mime_type, &outcome);
    }

    /// A worker lifecycle event. Logged as an audit record; publishing it on
    /// `workmanager.lifecycle` belongs to the message bus.
    /// A worker lifecycle event: logged, and published on
    /// `workmanager.lifecycle` (best effort, see dispatch.rs).
    pub(crate) fn lifecycle(
        &self,
        ctx: &RequestContext,
        slot: &Slot,
        kind: &str,
        error: Option<&str>,
    ) {
        self.emit_lifecycle(ctx, slot, kind, error.map(|m| ("WorkerFailed", m)));
    }
}

fn read_map<K, V>(m: &RwLock<HashMap<K, V>>) -> std::sync::RwLockReadGuard<'_, HashMap<K, V>> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write_map<K, V>(m: &RwLock<HashMap<K, V>>) -> std::sync::RwLockWriteGuard<'_, HashMap<K, V>> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

/// Oldest first (ties by id): the order ListWorkers answers in.
pub(crate) fn sort_oldest_first(workers: &mut [WorkerSnapshot]) {
    workers.sort_by(|a, b| {
        (a.record.created_at.as_str(), a.record.id.as_str())
            .cmp(&(b.record.created_at.as_str(), b.record.id.as_str()))
    });
}

pub(crate) fn encode(record: &WorkerRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(record)
        .map_err(|e| CoreError::Internal(format!("encoding a worker record: {e}")))
}

fn load_error(e: EngineError) -> CoreError {
    match e {
        EngineError::Internal(msg) => {
            CoreError::Unavailable(format!("the engine could not start: {msg}"))
        }
        other => CoreError::InvalidArgument(format!("the code failed to load: {other}")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

/// The last lines of a traceback: enough to find the failing line, short
/// enough for an error message.
fn traceback_tail(tb: &str) -> String {
    let lines: Vec<&str> = tb.trim_end().lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(6);
    format!("\n{}", lines[start..].join("\n"))
}
