//! Recovery: bring every persisted worker this instance should own back to
//! its persisted status, at start-up and on `RecoverWorkers`.
//!
//! Steps: wait for the store (bounded), take the recovery lease (CAS + TTL),
//! load each worker's code and restore its status, release the lease. One
//! worker's failure marks that worker FAILED and does not stop the rest.
//! Which workers "this instance should own" is decided in ownership.rs.
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::audit::{self, RequestContext};
use crate::error::{CoreError, Result};
use crate::manager::Manager;
use crate::ownership::{now_ms, Claim};
use crate::store::{keys, Precondition, StoreError};

/// Workers loaded in parallel during recovery.
const RECOVERY_PARALLELISM: usize = 4;

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
        let ids = self.index_ids().await?;
        let recovered = futures::stream::iter(ids)
            .map(|id| async move {
                match self.adopt(ctx, &id, Claim::IfStale).await {
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
}
