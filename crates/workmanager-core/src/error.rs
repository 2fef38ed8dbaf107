//! The one error type the core returns. The api crate maps each variant once
//! to a gRPC status and an HTTP status; messages are written for the user and
//! never carry server internals such as file paths.
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The worker (or tag) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is wrong; the message says what to fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is valid but the worker is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A backend (store, bus) or the worker's engine cannot serve right now.
    #[error("{0}")]
    Unavailable(String),
    /// The worker's code failed while handling the request.
    #[error("{0}")]
    WorkerError(String),
    /// The worker did not answer in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug or an unexpected state; logged in full, reported generically.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for CoreError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(key) => CoreError::Unavailable(format!(
                "the state of {key} changed concurrently; retry the request"
            )),
            StoreError::Unavailable(msg) => {
                CoreError::Unavailable(format!("state store unavailable: {msg}"))
            }
            StoreError::Corrupt(msg) => CoreError::Internal(format!("state store data: {msg}")),
        }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// An error with its causes, each once ("connection refused" usually sits a
/// few levels down a client library's error).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
