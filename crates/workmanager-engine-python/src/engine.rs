//! The `text/x-python` engine and the supervisor of one worker's children:
//! per-message timeout, health pings, restart with backoff on the next
//! message, and crash-loop detection that makes the worker FAILED.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;
use workmanager_core::{
    CloudEvent, Engine, EngineError, EngineInfo, LoadSpec, LoadedWorker, Metrics,
};

use crate::child::{CallError, ChildProc, LaunchPlan, Wire};
use crate::config::PythonConfig;
use crate::sandbox::{Applied, SandboxMode};
use crate::MIME_TYPE;

/// Answers to pings must come within this time (or the ping interval, if shorter).
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Restart backoff: base · 2^(crashes-1), capped.
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a child gets to exit after `shutdown` before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

pub struct PythonEngine {
    cfg: Arc<PythonConfig>,
    metrics: Arc<Metrics>,
    plan: Arc<LaunchPlan>,
    /// The children's empty, read-only working directory; removed with the engine.
    _workdir: tempfile::TempDir,
    /// What the start-up probe found: the isolation actually applied, and in
    /// strict mode the reason children are refused.
    state: Mutex<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    isolation: String,
    refusal: Option<String>,
}

impl PythonEngine {
    pub fn new(cfg: PythonConfig, metrics: Arc<Metrics>) -> Result<Self, String> {
        let workdir = tempfile::Builder::new()
            .prefix("workmanager-python-")
            .tempdir()
            .map_err(|e| format!("cannot create the Python workers' working directory: {e}"))?;
        set_read_only(workdir.path())?;
        let plan = LaunchPlan::new(&cfg, workdir.path())?;
        let isolation = if cfg.sandbox == SandboxMode::Off || cfg.launcher.is_none() {
            "process".to_string()
        } else {
            "unprobed".to_string()
        };
        Ok(Self {
            cfg: Arc::new(cfg),
            metrics,
            plan: Arc::new(plan),
            _workdir: workdir,
            state: Mutex::new(ProbeState {
                isolation,
                refusal: None,
            }),
        })
    }

    /// Starts one child with trivial code and reads back which sandbox layers
    /// applied. Sets the isolation `ListEngines` reports; in strict mode, a
    /// missing layer makes the engine refuse every worker. Returns the report.
    pub async fn probe(&self) -> Result<Applied, String> {
        let mut child =
            ChildProc::spawn(&self.plan, "sandbox-probe", self.cfg.log_lines_per_second)?;
        let line = b"{\"op\":\"load\",\"code\":\"def Process(event):\\n    return None\\n\"}\n";
        let answer = child
            .request(line, self.cfg.execution_timeout, self.cfg.max_result_bytes)
            .await;
        let applied = match answer {
            Ok(Wire::Ready { sandbox }) => sandbox.unwrap_or_else(Applied::off),
            Ok(other) => return Err(format!("unexpected answer from the probe child: {other:?}")),
            Err(_) => {
                let status = child.exit_description().await;
                let reason = format!(
                    "the sandboxed Python probe exited ({status}); see the preceding 'sandbox:' log lines"
                );
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                state.isolation = "unavailable".into();
                if self.cfg.sandbox == SandboxMode::Strict {
                    state.refusal = Some(format!("Python:Sandbox=strict and {reason}"));
                }
                return Err(reason);
            }
        };
        child.shutdown(SHUTDOWN_GRACE).await;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.isolation = applied.describe();
        let missing = applied.missing();
        if self.cfg.sandbox == SandboxMode::Strict && !missing.is_empty() {
            state.refusal = Some(format!(
                "Python:Sandbox=strict refuses to run Python workers: not applied on this host: {}",
                missing.join(", ")
            ));
        }
        Ok(applied)
    }
}

#[cfg(unix)]
fn set_read_only(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555))
        .map_err(|e| format!("cannot make {} read-only: {e}", dir.display()))
}

#[cfg(not(unix))]
fn set_read_only(_dir: &std::path::Path) -> Result<(), String> {
    Ok(())
}

#[async_trait]
impl Engine for PythonEngine {
    fn info(&self) -> EngineInfo {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        EngineInfo {
            mime_type: MIME_TYPE.into(),
            language: "Python".into(),
            isolation: format!(
                "{} (sandbox {})",
                state.isolation,
                self.cfg.sandbox.as_str()
            ),
        }
    }

    async fn load(&self, spec: LoadSpec) -> Result<Arc<dyn LoadedWorker>, EngineError> {
        if let Some(refusal) = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refusal
            .clone()
        {
            return Err(EngineError::Internal(refusal));
        }
        let code = std::str::from_utf8(&spec.code)
            .map_err(|e| EngineError::Load(format!("the code is not valid UTF-8: {e}")))?;
        let mut load_line = serde_json::to_vec(&serde_json::json!({"op": "load", "code": code}))
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        load_line.push(b'\n');
        let shared = Arc::new(Shared {
            cfg: self.cfg.clone(),
            plan: self.plan.clone(),
            metrics: self.metrics.clone(),
            worker_id: spec.worker_id.to_string(),
            load_line,
            slots: (0..spec.max_concurrency.max(1))
                .map(|_| tokio::sync::Mutex::new(Slot::default()))
                .collect(),
            next_slot: AtomicUsize::new(0),
            crashes: Mutex::new(VecDeque::new()),
            failed: Mutex::new(None),
        });
        // Start every child now: the first load error is the create's error.
        let children =
            futures::future::join_all(shared.slots.iter().map(|_| shared.start_child())).await;
        for (slot, child) in shared.slots.iter().zip(children) {
            slot.lock().await.child = Some(child?);
        }
        tokio::spawn(ping_loop(Arc::downgrade(&shared)));
        Ok(Arc::new(PythonWorker { shared }))
    }
}

#[derive(Default)]
struct Slot {
    child: Option<ChildProc>,
    /// Crashes since the last successful message: drives the restart backoff.
    consecutive_crashes: u32,
    /// The last request line's buffer, reused: a batch line is ~64 KB, and
    /// growing a fresh one to that size copied it three times over.
    line: Vec<u8>,
}

/// A request-line buffer larger than this is not kept (a batch of large
/// events must not pin its memory in an idle worker).
const MAX_KEPT_LINE: usize = 256 * 1024;

impl Slot {
    fn keep_line(&mut self, line: Vec<u8>) {
        if line.capacity() <= MAX_KEPT_LINE {
            self.line = line;
        }
    }
}

struct Shared {
    cfg: Arc<PythonConfig>,
    plan: Arc<LaunchPlan>,
    metrics: Arc<Metrics>,
    worker_id: String,
    /// The `load` message, serialised once.
    load_line: Vec<u8>,
    /// One child per concurrency slot.
    slots: Vec<tokio::sync::Mutex<Slot>>,
    next_slot: AtomicUsize,
    /// Recent crash times, for crash-loop detection.
    crashes: Mutex<VecDeque<Instant>>,
    /// Set when the engine gives up on this worker.
    failed: Mutex<Option<String>>,
}

impl Shared {
    /// Spawns a child and loads the code into it.
    async fn start_child(&self) -> Result<ChildProc, EngineError> {
        let mut child =
            ChildProc::spawn(&self.plan, &self.worker_id, self.cfg.log_lines_per_second)
                .map_err(EngineError::Internal)?;
        match child
            .request(
                &self.load_line,
                self.cfg.execution_timeout,
                self.cfg.max_result_bytes,
            )
            .await
        {
            Ok(Wire::Ready { .. }) => Ok(child),
            Ok(Wire::Error {
                error_type,
                message,
                traceback,
                ..
            }) => Err(EngineError::Load(describe_load_error(
                &error_type,
                &message,
                &traceback,
            ))),
            Ok(other) => Err(EngineError::Internal(format!(
                "unexpected answer to load: {other:?}"
            ))),
            Err(CallError::Timeout) => Err(EngineError::Load(format!(
                "loading the code took longer than {}s (Python:ExecutionTimeoutSeconds)",
                self.cfg.execution_timeout.as_secs_f64()
            ))),
            Err(_) => {
                let status = child.exit_description().await;
                Err(EngineError::Load(format!(
                    "the Python process exited ({status}) while loading the code"
                )))
            }
        }
    }

    /// Records a crash; returns the FAILED reason when this makes a crash loop.
    fn note_crash(&self, what: &str) -> Option<String> {
        let now = Instant::now();
        let mut crashes = self.crashes.lock().unwrap_or_else(|p| p.into_inner());
        crashes.push_back(now);
        while crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.cfg.crash_window)
        {
            crashes.pop_front();
        }
        if crashes.len() >= self.cfg.crash_loop_threshold {
            let reason = format!(
                "the Python process crashed {} times within {}s (last: {what})",
                crashes.len(),
                self.cfg.crash_window.as_secs()
            );
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
            return Some(reason);
        }
        None
    }

    fn failed(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn pick_slot(&self) -> tokio::sync::MutexGuard<'_, Slot> {
        if self.slots.len() > 1 {
            for s in &self.slots {
                if let Ok(g) = s.try_lock() {
                    return g;
                }
            }
        }
        let i = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        self.slots[i].lock().await
    }

    /// Makes sure the slot has a live child: restarts it (after the backoff
    /// its recent crashes earned) when the last one died.
    async fn ensure_child(&self, slot: &mut Slot) -> Result<(), EngineError> {
        if let Some(reason) = self.failed() {
            return Err(EngineError::Failed(reason));
        }
        if slot.child.is_some() {
            return Ok(());
        }
        if slot.consecutive_crashes > 0 {
            let exp = slot.consecutive_crashes.saturating_sub(1).min(16);
            tokio::time::sleep((BACKOFF_BASE * 2u32.pow(exp)).min(BACKOFF_MAX)).await;
        }
        self.metrics.record_restart(MIME_TYPE);
        match self.start_child().await {
            Ok(c) => {
                slot.child = Some(c);
                Ok(())
            }
            Err(e) => {
                slot.consecutive_crashes += 1;
                if let Some(reason) = self.note_crash(&e.to_string()) {
                    return Err(EngineError::Failed(reason));
                }
                Err(EngineError::Crashed(format!(
                    "the Python process could not restart: {e}"
                )))
            }
        }
    }

    /// Reads the answer to message `id` and turns it into the message's
    /// result. Any answer that breaks the protocol kills the child.
    async fn answer(&self, slot: &mut Slot, id: u64) -> Result<Option<Value>, EngineError> {
        let timeout = self.cfg.execution_timeout;
        let Some(child) = slot.child.as_mut() else {
            return Err(EngineError::Internal("no Python process".into()));
        };
        match child.read_reply(timeout, self.cfg.max_result_bytes).await {
            Ok(Wire::Result { id: got, event }) if got == id => {
                slot.consecutive_crashes = 0;
                Ok(event)
            }
            Ok(Wire::Error {
                id: Some(got),
                error_type,
                message,
                traceback,
            }) if got == id => {
                slot.consecutive_crashes = 0;
                if error_type == "BadResult" {
                    Err(EngineError::BadOutput(message))
                } else {
                    Err(EngineError::Processing {
                        error_type,
                        message,
                        traceback,
                    })
                }
            }
            Ok(_) => {
                // A forged or stale line: the channel cannot be trusted any
                // more, so the child is killed and restarts on the next message.
                slot.child = None;
                Err(EngineError::BadOutput(
                    "the worker wrote to the protocol channel out of turn; its process was restarted".into(),
                ))
            }
            Err(CallError::Timeout) => {
                tracing::warn!(worker_id = %self.worker_id, "message timed out; killing the Python process");
                slot.child = None; // dropping kills the process group
                Err(EngineError::Timeout(timeout))
            }
            Err(CallError::TooLarge) => {
                slot.child = None;
                Err(EngineError::BadOutput(format!(
                    "the result is larger than {} bytes; return less data",
                    self.cfg.max_result_bytes
                )))
            }
            Err(CallError::Protocol(e)) => {
                slot.child = None;
                Err(EngineError::BadOutput(format!(
                    "the worker corrupted the protocol channel ({e}); its process was restarted"
                )))
            }
            Err(CallError::Gone) => Err(self.crashed(slot).await),
        }
    }

    /// The child died mid-message: reap it, count the crash, say what happened.
    async fn crashed(&self, slot: &mut Slot) -> EngineError {
        let status = match slot.child.as_mut() {
            Some(c) => c.exit_description().await,
            None => "unknown status".into(),
        };
        slot.child = None;
        slot.consecutive_crashes += 1;
        tracing::warn!(worker_id = %self.worker_id, %status, "Python process died while processing");
        let what = format!("exited ({status}) while processing an event");
        if let Some(reason) = self.note_crash(&what) {
            return EngineError::Failed(reason);
        }
        EngineError::Crashed(format!(
            "the worker's Python process {what}; it restarts on the next message"
        ))
    }

    async fn send(&self, slot: &mut Slot, line: &[u8]) -> Result<(), EngineError> {
        let Some(child) = slot.child.as_mut() else {
            return Err(EngineError::Internal("no Python process".into()));
        };
        match child.send_line(line).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.crashed(slot).await),
        }
    }

    async fn process(&self, event: &CloudEvent) -> Result<Option<Value>, EngineError> {
        let mut slot = self.pick_slot().await;
        self.ensure_child(&mut slot).await?;
        let id = slot.child.as_mut().map(|c| c.next_id()).unwrap_or_default();
        let mut line = std::mem::take(&mut slot.line);
        write_process_line(&mut line, id, event);
        let sent = self.send(&mut slot, &line).await;
        slot.keep_line(line);
        sent?;
        self.answer(&mut slot, id).await
    }

    /// Pipelines several events to one child in a single write; answers
    /// come back one by one, each under the per-message timeout. The first
    /// failure ends the batch; the events after it are not run.
    async fn process_batch(
        &self,
        events: &[&CloudEvent],
    ) -> Vec<Result<Option<Value>, EngineError>> {
        let mut slot = self.pick_slot().await;
        if let Err(e) = self.ensure_child(&mut slot).await {
            return vec![Err(e)];
        }
        let Some(child) = slot.child.as_mut() else {
            return vec![Err(EngineError::Internal("no Python process".into()))];
        };
        let ids: Vec<u64> = events.iter().map(|_| child.next_id()).collect();
        let mut line = std::mem::take(&mut slot.line);
        write_batch_line(&mut line, &ids, events);
        let sent = self.send(&mut slot, &line).await;
        slot.keep_line(line);
        if let Err(e) = sent {
            return vec![Err(e)];
        }
        let mut results = Vec::with_capacity(events.len());
        for (i, id) in ids.iter().enumerate() {
            let r = self.answer(&mut slot, *id).await;
            let failed = r.is_err();
            results.push(r);
            if failed {
                if i + 1 < ids.len() {
                    self.skip_rest(&mut slot, ids.len() - i - 1).await;
                }
                break;
            }
        }
        results
    }

    /// After a failure inside a batch, a live child says how many events it
    /// skipped; anything else means the channel is out of step: kill it.
    async fn skip_rest(&self, slot: &mut Slot, expected: usize) {
        let Some(child) = slot.child.as_mut() else {
            return;
        };
        match child.read_reply(self.cfg.execution_timeout, 1024).await {
            Ok(Wire::Skipped { count }) if count == expected => {}
            _ => slot.child = None,
        }
    }
}

/// `{"op":"batch","items":[{"id":N,"event":{...}},...]}\n`, into `line`.
fn write_batch_line(line: &mut Vec<u8>, ids: &[u64], events: &[&CloudEvent]) {
    line.clear();
    line.extend_from_slice(b"{\"op\":\"batch\",\"items\":[");
    for (i, (id, event)) in ids.iter().zip(events).enumerate() {
        if i > 0 {
            line.push(b',');
        }
        line.extend_from_slice(b"{\"id\":");
        line.extend_from_slice(id.to_string().as_bytes());
        line.extend_from_slice(b",\"event\":");
        event.write_json(line);
        line.push(b'}');
    }
    line.extend_from_slice(b"]}\n");
}

/// `{"op":"process","id":N,"event":{...}}\n` into `line`, without an
/// intermediate value.
fn write_process_line(line: &mut Vec<u8>, id: u64, event: &CloudEvent) {
    line.clear();
    line.extend_from_slice(b"{\"op\":\"process\",\"id\":");
    line.extend_from_slice(id.to_string().as_bytes());
    line.extend_from_slice(b",\"event\":");
    event.write_json(line);
    line.extend_from_slice(b"}\n");
}

/// The user-facing text of a load error: the traceback's last lines (which
/// end with "Type: message"), or the type and message.
fn describe_load_error(error_type: &str, message: &str, traceback: &str) -> String {
    let lines: Vec<&str> = traceback.trim_end().lines().collect();
    if lines.is_empty() {
        return format!("{error_type}: {message}");
    }
    lines[lines.len().saturating_sub(6)..].join("\n")
}

/// Pings idle children; one that does not answer is killed and restarts on
/// the next message. Ends when the worker is disposed.
async fn ping_loop(shared: Weak<Shared>) {
    let interval = match shared.upgrade() {
        Some(s) => s.cfg.ping_interval,
        None => return,
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        for slot in &shared.slots {
            // A busy slot is being supervised by its message's timeout.
            let Ok(mut slot) = slot.try_lock() else {
                continue;
            };
            let Some(child) = slot.child.as_mut() else {
                continue;
            };
            let timeout = PING_TIMEOUT.min(interval);
            match child.request(b"{\"op\":\"ping\"}\n", timeout, 1024).await {
                Ok(Wire::Pong) => {}
                other => {
                    tracing::warn!(worker_id = %shared.worker_id, answer = ?other.err(), "Python process missed a ping; killing it");
                    slot.child = None;
                    slot.consecutive_crashes += 1;
                    shared.note_crash("missed a health ping");
                }
            }
        }
    }
}

/// One loaded worker. Dropping the last reference kills its children.
struct PythonWorker {
    shared: Arc<Shared>,
}

#[async_trait]
impl LoadedWorker for PythonWorker {
    async fn process(&self, event: &CloudEvent) -> Result<Option<Value>, EngineError> {
        self.shared.process(event).await
    }

    async fn process_batch(
        &self,
        events: &[&CloudEvent],
    ) -> Vec<Result<Option<Value>, EngineError>> {
        self.shared.process_batch(events).await
    }

    async fn shutdown(&self) {
        for slot in &self.shared.slots {
            let child = slot.lock().await.child.take();
            if let Some(child) = child {
                child.shutdown(SHUTDOWN_GRACE).await;
            }
        }
    }
}
