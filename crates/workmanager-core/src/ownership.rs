//! Several instances on one shared store: who owns which worker.
//!
//! Every worker record names its owner (`instance_id`); only the owner hosts
//! the worker (engine, consumer task). Each instance writes a heartbeat with
//! its advertised gRPC endpoint to `workmanager/instances/{id}`; an instance
//! whose beat is older than `Instance:StaleAfterSeconds` is presumed gone.
//!
//! - A worker-scoped request that reaches a non-owner is routed
//!   ([`Manager::route`]): forwarded to a live owner (once: a forwarded request
//!   is never forwarded again), or — owner stale, or unreachable as the
//!   forwarder found out — the receiver takes the worker over by
//!   compare-and-swap on its record ([`Manager::adopt`]) and serves it.
//! - A background sweep ([`Manager::spawn_sweep`]) takes over the RUNNING
//!   workers of stale instances (the CAS picks one winner per worker), so an
//!   orphan's messages resume without waiting for a request, and gives up the
//!   workers this instance hosts whose record now names another owner.
//!
//! With an unshared store (the embedded file) this instance owns everything
//! and none of this runs.
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::audit::RequestContext;
use crate::error::{CoreError, Result};
use crate::manager::{Manager, Slot, WorkerSnapshot};
use crate::model::{WorkerId, WorkerRecord, WorkerStatus};
use crate::store::{keys, Precondition, StoreError, Versioned};

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `Instance:HeartbeatIntervalSeconds`: how often the heartbeat is written
    /// (and the sweep runs).
    pub heartbeat_interval: Duration,
    /// `Instance:StaleAfterSeconds`: a heartbeat older than this means the
    /// instance is gone and its workers may be taken over.
    pub stale_after: Duration,
    /// `Instance:AdvertisedGrpcEndpoint`: where peers reach this instance's
    /// gRPC port to forward worker-scoped requests. Empty: not reachable.
    pub advertised_endpoint: String,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            stale_after: Duration::from_secs(60),
            advertised_endpoint: String::new(),
        }
    }
}

/// An instance's heartbeat as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub instance_id: String,
    pub last_seen_ms: u64,
    /// Advertised gRPC endpoint (`http(s)://host:port`).
    #[serde(default)]
    pub endpoint: String,
}

/// Where a worker-scoped request is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Here: this instance hosts the worker (or it does not exist, and the
    /// local call answers NOT_FOUND).
    Local,
    /// At the live owner, to be forwarded once.
    Forward { owner: String, endpoint: String },
}

/// When [`Manager::adopt`] may take a worker over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim<'a> {
    /// Only if it is unowned, ours, or its owner is stale (recovery, sweep,
    /// routing).
    IfStale,
    /// If it still names this owner, which a forwarder could not reach.
    From(&'a str),
}

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn decode(id: &str, v: &Versioned) -> Result<WorkerRecord> {
    serde_json::from_slice(&v.value)
        .map_err(|e| CoreError::Internal(format!("worker record {id} is not valid: {e}")))
}

impl Manager {
    fn cluster(&self) -> &ClusterSettings {
        &self.inner.settings.cluster
    }

    /// An instance's heartbeat, if it is recent enough to presume it alive.
    pub(crate) async fn live_instance(&self, instance_id: &str) -> Option<Heartbeat> {
        let v = self
            .inner
            .store
            .get(&keys::instance(instance_id))
            .await
            .ok()??;
        let beat: Heartbeat = serde_json::from_slice(&v.value).ok()?;
        let age = now_ms().saturating_sub(beat.last_seen_ms);
        (age < self.cluster().stale_after.as_millis() as u64).then_some(beat)
    }

    /// The other live instances and their advertised endpoints (empty
    /// with an unshared store).
    pub async fn live_peers(&self) -> Result<Vec<(String, String)>> {
        if !self.inner.store.shared() {
            return Ok(Vec::new());
        }
        let mut peers = Vec::new();
        for key in self.inner.store.list(&keys::instance("")).await? {
            let id = key.trim_start_matches(&keys::instance(""));
            if id == self.instance_id() {
                continue;
            }
            if let Some(beat) = self.live_instance(id).await {
                if !beat.endpoint.is_empty() {
                    peers.push((beat.instance_id, beat.endpoint));
                }
            }
        }
        Ok(peers)
    }

    /// Decides where a worker-scoped request for `id` is served. `forwarded`:
    /// the request already came from a peer, so it is not forwarded again.
    pub async fn route(&self, ctx: &RequestContext, id: &str, forwarded: bool) -> Result<Route> {
        let worker_id = WorkerId::parse(id)?;
        if self.contains(&worker_id) || !self.inner.store.shared() {
            return Ok(Route::Local);
        }
        let Some(stored) = self.inner.store.get(&keys::worker(id)).await? else {
            return Ok(Route::Local);
        };
        let record = decode(id, &stored)?;
        if record.instance_id != self.instance_id() {
            if let Some(beat) = self.live_instance(&record.instance_id).await {
                if forwarded {
                    return Err(CoreError::Unavailable(format!(
                        "worker {id} is hosted by instance {}, not by this one, and the request was \
                         already forwarded once; retry it",
                        record.instance_id
                    )));
                }
                if !beat.endpoint.is_empty() {
                    return Ok(Route::Forward {
                        owner: record.instance_id,
                        endpoint: beat.endpoint,
                    });
                }
                return Err(CoreError::Unavailable(format!(
                    "worker {id} is hosted by instance {}, which advertises no gRPC endpoint \
                     (Instance:AdvertisedGrpcEndpoint); send the request there",
                    record.instance_id
                )));
            }
        }
        self.adopt(ctx, id, Claim::IfStale).await?;
        Ok(Route::Local)
    }

    /// The forwarder could not reach `owner`: take the worker over if the
    /// record still names it, and serve the request here.
    pub async fn take_over_unreachable(
        &self,
        ctx: &RequestContext,
        id: &str,
        owner: &str,
    ) -> Result<()> {
        tracing::warn!(worker_id = %id, owner = %owner, "the owner is unreachable; taking the worker over");
        self.adopt(ctx, id, Claim::From(owner)).await.map(|_| ())
    }

    /// Takes a persisted worker into this instance: claims it by CAS on its
    /// record, loads its code and restores its status. Ok(true): hosted here
    /// with runnable code; Ok(false): not taken (owned elsewhere, or lost the
    /// race) or taken as FAILED.
    pub(crate) async fn adopt(
        &self,
        ctx: &RequestContext,
        id: &str,
        claim: Claim<'_>,
    ) -> Result<bool> {
        let worker_id = WorkerId::parse(id)?;
        if self.contains(&worker_id) {
            return Ok(false);
        }
        let Some(stored) = self.inner.store.get(&keys::worker(id)).await? else {
            return Ok(false);
        };
        let mut record = decode(id, &stored)?;
        let me = self.instance_id();
        let previous = record.instance_id.clone();
        if self.inner.store.shared() && previous != me {
            let claimable = match claim {
                Claim::From(owner) => previous == owner,
                Claim::IfStale => self.live_instance(&previous).await.is_none(),
            };
            if !claimable {
                return Ok(false);
            }
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
                    record.last_error = Some(format!("could not load the code: {e}"));
                    None
                }
            }
        };
        let written = self
            .inner
            .store
            .put(
                &keys::worker(id),
                crate::manager::encode(&record)?,
                Precondition::Version(stored.version),
            )
            .await;
        let version = match written {
            Ok(v) => v,
            Err(e) => {
                if let Some(engine) = engine {
                    engine.shutdown().await;
                }
                return match e {
                    // Another instance (or a concurrent request here) won.
                    StoreError::Conflict(_) => Ok(false),
                    e => Err(e.into()),
                };
            }
        };
        if previous != me && !previous.is_empty() {
            tracing::info!(worker_id = %id, from = %previous, "took the worker over");
        }
        let status = record.status;
        let error = record.last_error.clone();
        let slot = Arc::new(Slot::new(record, version, engine, &self.inner.metrics));
        self.insert(slot.clone());
        self.lifecycle(ctx, &slot, "registered", None);
        match status {
            WorkerStatus::Running => match self.go_online(&slot).await {
                Ok(()) => self.lifecycle(ctx, &slot, "online", None),
                Err(e) => {
                    tracing::warn!(worker_id = %id, error = %e, "adopted worker could not subscribe")
                }
            },
            WorkerStatus::Failed => self.lifecycle(ctx, &slot, "failed", error.as_deref()),
            WorkerStatus::Stopped => {}
        }
        Ok(runnable)
    }

    /// Every worker in the store (the live view for those hosted here),
    /// matching every tag filter, oldest first. With an unshared store this
    /// is `list`.
    pub async fn list_all(&self, filters: &[(String, String)]) -> Result<Vec<WorkerSnapshot>> {
        let mut out = self.list(filters);
        if !self.inner.store.shared() {
            return Ok(out);
        }
        let hosted: std::collections::HashSet<WorkerId> =
            self.slots().iter().map(|s| s.id.clone()).collect();
        for id in self.index_ids().await? {
            let Ok(worker_id) = WorkerId::parse(&id) else {
                continue;
            };
            if hosted.contains(&worker_id) {
                continue;
            }
            let Some(v) = self.inner.store.get(&keys::worker(&id)).await? else {
                continue;
            };
            let record = decode(&id, &v)?;
            if filters
                .iter()
                .all(|(k, val)| record.tags.get(k) == Some(val))
            {
                out.push(WorkerSnapshot {
                    record,
                    messages_processed: 0,
                    messages_failed: 0,
                });
            }
        }
        crate::manager::sort_oldest_first(&mut out);
        Ok(out)
    }

    /// One sweep: give up workers taken over by others, take over the
    /// RUNNING workers of stale instances. Returns how many were taken.
    pub async fn sweep(&self) -> Result<u32> {
        if !self.inner.store.shared() {
            return Ok(0);
        }
        let me = self.instance_id().to_string();
        for slot in self.slots() {
            let Some(v) = self
                .inner
                .store
                .get(&keys::worker(slot.id.as_str()))
                .await?
            else {
                continue;
            };
            let owner = decode(slot.id.as_str(), &v)?.instance_id;
            if owner != me {
                tracing::warn!(worker_id = %slot.id, owner = %owner, "another instance took this worker over; giving it up");
                self.release(&slot).await;
            }
        }
        let ctx = RequestContext::system();
        let mut stale_owners = std::collections::HashMap::<String, bool>::new();
        let mut taken = 0;
        for id in self.index_ids().await? {
            let Ok(worker_id) = WorkerId::parse(&id) else {
                continue;
            };
            if self.contains(&worker_id) {
                continue;
            }
            let Some(v) = self.inner.store.get(&keys::worker(&id)).await? else {
                continue;
            };
            let record = decode(&id, &v)?;
            if record.status != WorkerStatus::Running || record.instance_id == me {
                continue;
            }
            let stale = match stale_owners.get(&record.instance_id) {
                Some(s) => *s,
                None => {
                    let s = self.live_instance(&record.instance_id).await.is_none();
                    stale_owners.insert(record.instance_id.clone(), s);
                    s
                }
            };
            if stale && self.adopt(&ctx, &id, Claim::IfStale).await? {
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Stops hosting a worker without touching its record (its new owner
    /// writes that).
    async fn release(&self, slot: &Arc<Slot>) {
        let _op = slot.op.lock().await;
        self.go_offline(slot).await;
        self.remove(&slot.id);
        if let Some(engine) = slot.set_engine(None) {
            engine.shutdown().await;
        }
    }

    /// Writes this instance's heartbeat (with its advertised endpoint) and,
    /// on a shared store, runs the sweep, every `Instance:HeartbeatIntervalSeconds`
    /// until the manager is dropped. Failures are warnings, never fatal.
    pub fn spawn_heartbeat(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let key = keys::instance(self.instance_id());
        let instance_id = self.instance_id().to_string();
        let interval = self.cluster().heartbeat_interval;
        let endpoint = self.cluster().advertised_endpoint.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let beat = Heartbeat {
                    instance_id: instance_id.clone(),
                    last_seen_ms: now_ms(),
                    endpoint: endpoint.clone(),
                };
                let Ok(value) = serde_json::to_vec(&beat) else {
                    continue;
                };
                if let Err(e) = inner.store.put(&key, value, Precondition::None).await {
                    tracing::warn!(error = %e, "heartbeat write failed");
                }
                let manager = Manager { inner };
                if manager.is_ready() {
                    match manager.sweep().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(taken = n, "took over workers of stale instances"),
                        Err(e) => tracing::warn!(error = %e, "ownership sweep failed"),
                    }
                }
            }
        })
    }
}
