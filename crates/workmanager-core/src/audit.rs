//! Request context and the audit trail.
//!
//! Every state-mutating operation writes one structured record (target
//! `audit`) with the operation, worker id, engine MIME type, correlation id,
//! caller and outcome. Worker code and event data are never part of it.

/// Who asked, and under which correlation id. Built by the api layer for each
/// request and passed down so audit records and logs can be joined.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub correlation_id: String,
    /// Authenticated principal, or "anonymous" while authentication is off.
    pub caller: String,
    /// The client's address, when known.
    pub source: String,
}

impl RequestContext {
    pub fn new(correlation_id: impl Into<String>) -> Self {
        Self {
            correlation_id: correlation_id.into(),
            caller: "anonymous".into(),
            source: String::new(),
        }
    }

    /// Context for work the service starts by itself (recovery at start-up).
    pub fn system() -> Self {
        Self {
            correlation_id: uuid::Uuid::new_v4().to_string(),
            caller: "system".into(),
            source: String::new(),
        }
    }
}

/// Writes one audit record. `outcome` is "ok" or the error's message.
pub fn record(
    ctx: &RequestContext,
    operation: &str,
    worker_id: &str,
    mime_type: &str,
    outcome: &str,
) {
    tracing::info!(
        target: "audit",
        operation,
        worker_id,
        mime_type,
        correlation_id = %ctx.correlation_id,
        caller = %ctx.caller,
        source = %ctx.source,
        outcome,
        "audit"
    );
}
