//! Recovery: bring every persisted worker this instance should own back to
//! its persisted status, at start-up and on `RecoverWorkers`.
//!
//! Steps: wait for the store (bounded), take the recovery lease (CAS + TTL),
//! load each worker's code and restore its status, release the lease. One
//! worker's failure marks that worker FAILED and does not stop the rest.
//! Also here: the instance heartbeat other instances use to judge ownership.
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::audit::{self, RequestContext};
use crate::error::{CoreError, Result};
use crate::manager::{Manager, Slot};
use crate::model::{WorkerId, WorkerRecord, WorkerStatus};
use crate::store::{keys, Precondition, StoreError};

/// Workers loaded in parallel during recovery.
const RECOVERY_PARALLELISM: usize = 4;
/// How often the heartbeat is written; an instance is presumed gone after
/// three missed beats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct RecoverySettings {
    pub on_start: bool,
    pub lease_ttl: Duration,
    pub acquire_timeout: Duration,
    pub connectivity_timeout: Duration,
}

impl Default for RecoverySettings {
    fn default() -> Self {
        Self {
            on_start: true,
            lease_ttl: Duration::from_secs(300),
            acquire_timeout: Duration::from_secs(30),
            connectivity_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    holder: String,
    expires_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    instance_id: String,
    last_seen_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Manager {
    /// True once start-up recovery has finished (or was disabled).
    pub fn is_ready(&self) -> bool {
        *self.inner.recovery_done.borrow()
    }

    /// Resolves once start-up recovery has finished.
    pub async fn wait_ready(&self) {
        let mut rx = self.inner.recovery_done.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Start-up: recover unless `Recovery:OnStart` is off; then ready.
    pub async fn recover_on_start(&self) {
        if self.inner.settings.recovery.on_start {
            let ctx = RequestContext::system();
            match self.recover(&ctx).await {
                Ok(n) => tracing::info!(recovered = n, "recovery finished"),
                Err(e) => tracing::error!(error = %e, "recovery failed"),
            }
        }
        self.inner.recovery_done.send_replace(true);
    }

    /// Recovers every persisted worker not yet hosted here. Returns how many
    /// were brought back with runnable code.
    pub async fn recover(&self, ctx: &RequestContext) -> Result<u32> {
        let result = self.recover_inner(ctx).await;
        let outcome = match &result {
            Ok(n) => format!("ok: {n} recovered"),
            Err(e) => e.to_string(),
        };
        audit::record(ctx, "RecoverWorkers", "", "", &outcome);
        result
    }

    async fn recover_inner(&self, ctx: &RequestContext) -> Result<u32> {
        let _one_at_a_time = self.inner.recovery_lock.lock().await;
        self.wait_for_store().await?;
        let leased = self.acquire_lease().await?;
        if !leased {
            tracing::warn!(
                "recovery lease held by another instance past Recovery:AcquireTimeoutSeconds; recovering anyway"
            );
        }
        let ids: Vec<String> = match self.inner.store.get(keys::WORKER_INDEX).await? {
            None => Vec::new(),
            Some(v) => serde_json::from_slice(&v.value).map_err(|e| {
                CoreError::Internal(format!("the worker index is not valid JSON: {e}"))
            })?,
        };
        let recovered = futures::stream::iter(ids)
            .map(|id| async move {
                match self.recover_one(ctx, &id).await {
                    Ok(true) => 1u32,
                    Ok(false) => 0,
                    Err(e) => {
                        tracing::warn!(worker_id = %id, error = %e, "could not recover worker");
                        0
                    }
                }
            })
            .buffer_unordered(RECOVERY_PARALLELISM)
            .fold(0u32, |acc, n| async move { acc + n })
            .await;
        if leased {
            self.release_lease().await;
        }
        Ok(recovered)
    }

    async fn wait_for_store(&self) -> Result<()> {
        let deadline =
            tokio::time::Instant::now() + self.inner.settings.recovery.connectivity_timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.inner.store.ping().await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() + delay > deadline => {
                    return Err(CoreError::Unavailable(format!(
                        "state store not reachable within Recovery:ConnectivityTimeoutSeconds: {e}"
                    )))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for the state store");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Takes the lease if it is free, expired or already ours. False when
    /// another instance kept it for the whole acquire timeout.
    async fn acquire_lease(&self) -> Result<bool> {
        let settings = &self.inner.settings.recovery;
        let deadline = tokio::time::Instant::now() + settings.acquire_timeout;
        let me = self.instance_id().to_string();
        loop {
            let current = self.inner.store.get(keys::RECOVERY_LEADER).await?;
            let pre = match &current {
                None => Some(Precondition::Absent),
                Some(v) => match serde_json::from_slice::<Lease>(&v.value) {
                    Ok(l) if l.holder != me && l.expires_at_ms > now_ms() => None,
                    _ => Some(Precondition::Version(v.version)),
                },
            };
            if let Some(pre) = pre {
                let lease = Lease {
                    holder: me.clone(),
                    expires_at_ms: now_ms() + settings.lease_ttl.as_millis() as u64,
                };
                let value =
                    serde_json::to_vec(&lease).map_err(|e| CoreError::Internal(e.to_string()))?;
                match self
                    .inner
                    .store
                    .put(keys::RECOVERY_LEADER, value, pre)
                    .await
                {
                    Ok(_) => return Ok(true),
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn release_lease(&self) {
        let me = self.instance_id();
        if let Ok(Some(v)) = self.inner.store.get(keys::RECOVERY_LEADER).await {
            if serde_json::from_slice::<Lease>(&v.value).is_ok_and(|l| l.holder == me) {
                if let Err(e) = self
                    .inner
                    .store
                    .delete(keys::RECOVERY_LEADER, Precondition::Version(v.version))
                    .await
                {
                    tracing::warn!(error = %e, "could not release the recovery lease; it expires by its TTL");
                }
            }
        }
    }

    /// Whether an instance's heartbeat is recent enough to presume it alive.
    async fn instance_alive(&self, instance_id: &str) -> bool {
        match self.inner.store.get(&keys::instance(instance_id)).await {
            Ok(Some(v)) => serde_json::from_slice::<Heartbeat>(&v.value).is_ok_and(|h| {
                now_ms().saturating_sub(h.last_seen_ms) < 3 * HEARTBEAT_INTERVAL.as_millis() as u64
            }),
            _ => false,
        }
    }

    /// Ok(true): recovered with runnable code. Ok(false): skipped, or
    /// recovered as FAILED.
    async fn recover_one(&self, ctx: &RequestContext, id: &str) -> Result<bool> {
        let worker_id = WorkerId::parse(id)?;
        if self.contains(&worker_id) {
            return Ok(false);
        }
        let Some(stored) = self.inner.store.get(&keys::worker(id)).await? else {
            tracing::warn!(worker_id = %id, "the index names a worker whose record is missing; skipped");
            return Ok(false);
        };
        let mut record: WorkerRecord = serde_json::from_slice(&stored.value)
            .map_err(|e| CoreError::Internal(format!("worker record {id} is not valid: {e}")))?;
        let me = self.instance_id();
        if self.inner.store.shared()
            && record.instance_id != me
            && self.instance_alive(&record.instance_id).await
        {
            return Ok(false);
        }
        record.instance_id = me.to_string();
        let mut runnable = false;
        let engine = if record.status == WorkerStatus::Failed {
            None
        } else {
            match self.load_engine(&record).await {
                Ok(e) => {
                    runnable = true;
                    Some(e)
                }
                Err(e) => {
                    record.status = WorkerStatus::Failed;
                    record.last_error = Some(format!("recovery could not load the code: {e}"));
                    None
                }
            }
        };
        let value = crate::manager::encode(&record)?;
        let version = match self
            .inner
            .store
            .put(
                &keys::worker(id),
                value,
                Precondition::Version(stored.version),
            )
            .await
        {
            Ok(v) => v,
            Err(e) => {
                if let Some(engine) = engine {
                    engine.shutdown().await;
                }
                return Err(e.into());
            }
        };
        let status = record.status;
        let error = record.last_error.clone();
        let slot = Arc::new(Slot::new(record, version, engine, &self.inner.metrics));
        self.insert(slot.clone());
        self.lifecycle(ctx, &slot, "registered", None);
        match status {
            WorkerStatus::Running => match self.go_online(&slot).await {
                Ok(()) => self.lifecycle(ctx, &slot, "online", None),
                Err(e) => {
                    tracing::warn!(worker_id = %id, error = %e, "recovered worker could not subscribe")
                }
            },
            WorkerStatus::Failed => self.lifecycle(ctx, &slot, "failed", error.as_deref()),
            WorkerStatus::Stopped => {}
        }
        Ok(runnable)
    }

    /// Writes this instance's heartbeat every `HEARTBEAT_INTERVAL` until the
    /// manager is dropped. A failed write is a warning, never fatal.
    pub fn spawn_heartbeat(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let key = keys::instance(self.instance_id());
        let instance_id = self.instance_id().to_string();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let beat = Heartbeat {
                    instance_id: instance_id.clone(),
                    last_seen_ms: now_ms(),
                };
                let Ok(value) = serde_json::to_vec(&beat) else {
                    continue;
                };
                if let Err(e) = inner.store.put(&key, value, Precondition::None).await {
                    tracing::warn!(error = %e, "heartbeat write failed");
                }
            }
        })
    }
}
