//! The engine contract and the registry that maps MIME types to engines.
//! Adding an engine means implementing [`Engine`] and registering it; the
//! lifecycle and message code do not change.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::event::CloudEvent;
use crate::model::WorkerId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    pub mime_type: String,
    pub language: String,
    /// How worker code is isolated, as actually applied (e.g. "process").
    pub isolation: String,
}

/// Everything an engine needs to load one worker's code.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub worker_id: WorkerId,
    pub code: Arc<[u8]>,
    /// Parallel executions allowed (>= 1).
    pub max_concurrency: u32,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The code cannot be loaded (syntax error, missing entry point, ...).
    #[error("{0}")]
    Load(String),
    /// The worker's code raised while processing.
    #[error("{error_type}: {message}")]
    Processing {
        error_type: String,
        message: String,
        traceback: String,
    },
    #[error("the worker did not finish within {0:?}; its process was killed and restarts on the next message")]
    Timeout(Duration),
    /// The worker's process died; it restarts on the next message.
    #[error("{0}")]
    Crashed(String),
    /// The engine gave up on this worker (crash loop); the worker is FAILED.
    #[error("{0}")]
    Failed(String),
    /// The worker's output is not usable.
    #[error("{0}")]
    BadOutput(String),
    /// The engine itself failed (could not start the interpreter, ...).
    #[error("{0}")]
    Internal(String),
}

#[async_trait]
pub trait Engine: Send + Sync {
    fn info(&self) -> EngineInfo;

    /// Loads code into a fresh instance. Fails with `EngineError::Load` when
    /// the code itself is at fault.
    async fn load(&self, spec: LoadSpec) -> Result<Arc<dyn LoadedWorker>, EngineError>;
}

/// One worker's loaded code. Dropping the last reference disposes it.
#[async_trait]
pub trait LoadedWorker: Send + Sync {
    /// Runs one event. `Ok(None)`: the worker returned nothing.
    async fn process(&self, event: &CloudEvent) -> Result<Option<Value>, EngineError>;

    /// Runs events in order, stopping at the first failure: returns the
    /// results of the events that ran (the last one may be the failure);
    /// the events after it did not run. Engines that can pipeline override it.
    async fn process_batch(
        &self,
        events: &[&CloudEvent],
    ) -> Vec<Result<Option<Value>, EngineError>> {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let r = self.process(e).await;
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        out
    }

    /// Graceful disposal (ask the code to exit, then force).
    async fn shutdown(&self);
}

/// MIME type → engine. Built once at start-up.
#[derive(Default, Clone)]
pub struct EngineRegistry {
    engines: BTreeMap<String, Arc<dyn Engine>>,
}

impl EngineRegistry {
    /// Registers an engine; a duplicate MIME type is a start-up error.
    pub fn register(&mut self, engine: Arc<dyn Engine>) -> Result<(), String> {
        let mime = engine.info().mime_type;
        if self.engines.contains_key(&mime) {
            return Err(format!("two engines registered for MIME type {mime}"));
        }
        self.engines.insert(mime, engine);
        Ok(())
    }

    pub fn get(&self, mime: &str) -> Option<&Arc<dyn Engine>> {
        self.engines.get(mime)
    }

    pub fn infos(&self) -> Vec<EngineInfo> {
        self.engines.values().map(|e| e.info()).collect()
    }

    pub fn mime_types(&self) -> Vec<&str> {
        self.engines.keys().map(String::as_str).collect()
    }
}
