//! The state store contract every backend implements (embedded, Redis, Dapr):
//! get, atomic multi-key commit with per-key compare-and-swap on a version,
//! and prefix listing. Keys are the same on every backend (see [`keys`]).
use async_trait::async_trait;

/// A key's version, incremented by every write. Used for compare-and-swap.
pub type Version = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: Version,
}

/// What a write expects of the key before it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Unconditional.
    None,
    /// The key must not exist.
    Absent,
    /// The key must exist at exactly this version.
    Version(Version),
}

#[derive(Debug, Clone)]
pub enum WriteOp {
    Put {
        key: String,
        value: Vec<u8>,
        pre: Precondition,
    },
    Delete {
        key: String,
        pre: Precondition,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A precondition did not hold; nothing of the commit was applied.
    #[error("concurrent change to {0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Corrupt(String),
}

#[async_trait]
pub trait StateStore: Send + Sync {
    /// Backend name for health and logs ("embedded", "redis", ...).
    fn name(&self) -> &'static str;

    /// Whether other instances can see this store. An unshared store (the
    /// embedded file, locked by one process) means this instance owns every
    /// worker in it.
    fn shared(&self) -> bool;

    async fn ping(&self) -> Result<(), StoreError>;

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Applies every op or none. Returns the new version of each op's key
    /// (`None` for deletes). A failed precondition is `Conflict`.
    async fn commit(&self, ops: Vec<WriteOp>) -> Result<Vec<Option<Version>>, StoreError>;

    /// Keys starting with `prefix`, in order.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// The circuit breaker in front of the store (see resilience.rs); a
    /// store without one is always closed.
    fn circuit(&self) -> crate::resilience::CircuitState {
        crate::resilience::CircuitState::Closed
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        pre: Precondition,
    ) -> Result<Version, StoreError> {
        let v = self
            .commit(vec![WriteOp::Put {
                key: key.to_string(),
                value,
                pre,
            }])
            .await?;
        v.first()
            .copied()
            .flatten()
            .ok_or_else(|| StoreError::Corrupt("commit returned no version for a put".into()))
    }

    async fn delete(&self, key: &str, pre: Precondition) -> Result<(), StoreError> {
        self.commit(vec![WriteOp::Delete {
            key: key.to_string(),
            pre,
        }])
        .await
        .map(|_| ())
    }
}

/// The persistence keys, identical on every backend.
pub mod keys {
    pub const WORKER_INDEX: &str = "workmanager/workers/index";
    pub const RECOVERY_LEADER: &str = "workmanager/recovery/leader";

    pub fn worker(id: &str) -> String {
        format!("workmanager/workers/{id}")
    }

    pub fn instance(id: &str) -> String {
        format!("workmanager/instances/{id}")
    }
}
