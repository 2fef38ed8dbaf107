//! WorkManager core: the worker model, the traits every backend and engine
//! implements, the lifecycle service (`Manager`) and recovery.
//!
//! Invariant: this crate does no I/O of its own. Sockets, files and child
//! processes live behind the `StateStore`, `Engine` and `CodeFetcher` traits,
//! implemented in other crates and chosen by the binary from configuration.

pub mod audit;
pub mod bus;
pub mod dispatch;
pub mod engine;
pub mod error;
pub mod event;
pub mod fetch;
pub mod json;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod ownership;
mod recovery;
pub mod resilience;
pub mod store;

pub use audit::RequestContext;
pub use bus::{Bus, BusError};
pub use engine::{Engine, EngineError, EngineInfo, EngineRegistry, LoadSpec, LoadedWorker};
pub use error::CoreError;
pub use event::CloudEvent;
pub use fetch::{CodeFetcher, DisabledFetcher};
pub use manager::{CreateWorker, Manager, ManagerSettings};
pub use metrics::Metrics;
pub use model::{CodeInput, WorkerId, WorkerRecord, WorkerStatus};
pub use ownership::{ClusterSettings, Route};
pub use recovery::RecoverySettings;
pub use resilience::{CircuitState, ResilienceSettings, ResilientBus, ResilientStore};
pub use store::{Precondition, StateStore, StoreError, Versioned, WriteOp};
