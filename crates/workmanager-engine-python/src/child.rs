//! Host side of one Python child: spawn, the JSON-lines exchange, and
//! killing its whole process group. A `ChildProc` kills its group when
//! dropped, so no child outlives the worker slot that owns it.
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::config::PythonConfig;
use crate::sandbox::{Applied, LaunchSpec, SandboxMode, LAUNCHER_ARG};

const BOOTSTRAP: &str = include_str!("bootstrap.py");
/// Longest stderr line forwarded to the log; the rest is cut.
const MAX_LOG_LINE: u64 = 8 * 1024;

/// A message from the child.
#[derive(Debug)]
pub(crate) enum Wire {
    Ready {
        /// The sandbox layers that applied to this child.
        sandbox: Option<Applied>,
    },
    Pong,
    /// After a failure in a batch: how many of its events were not run.
    Skipped {
        count: usize,
    },
    Result {
        /// Must echo the request's id: a line with another id was forged by
        /// the worker (or is stale) and desynchronises nothing.
        id: u64,
        event: Option<Value>,
    },
    Error {
        id: Option<u64>,
        error_type: String,
        message: String,
        traceback: String,
    },
}

/// One protocol line as written, every field optional. `Wire` is built from
/// it by hand (a missing `Option` field is `None`): serde's internally tagged enums buffer the whole line
/// (including a 1 KB event) in an intermediate tree first, which cost more
/// than the parse itself on the message path.
#[derive(Deserialize)]
struct Line {
    op: Op,
    id: Option<u64>,
    event: Option<Value>,
    sandbox: Option<Applied>,
    count: Option<usize>,
    error_type: Option<String>,
    message: Option<String>,
    traceback: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Ready,
    Pong,
    Skipped,
    Result,
    Error,
}

impl Wire {
    fn parse(line: &[u8]) -> Result<Wire, String> {
        let l: Line = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        let missing = |field: &str| format!("missing field `{field}`");
        Ok(match l.op {
            Op::Ready => Wire::Ready { sandbox: l.sandbox },
            Op::Pong => Wire::Pong,
            Op::Skipped => Wire::Skipped {
                count: l.count.ok_or_else(|| missing("count"))?,
            },
            Op::Result => Wire::Result {
                id: l.id.ok_or_else(|| missing("id"))?,
                event: l.event,
            },
            Op::Error => Wire::Error {
                id: l.id,
                error_type: l.error_type.ok_or_else(|| missing("error_type"))?,
                message: l.message.ok_or_else(|| missing("message"))?,
                traceback: l.traceback.unwrap_or_default(),
            },
        })
    }
}

#[derive(Debug)]
pub(crate) enum CallError {
    /// The child closed its end (it died) or the pipe broke.
    Gone,
    Timeout,
    /// The answer was longer than the configured maximum.
    TooLarge,
    /// The answer was not a protocol message.
    Protocol(String),
}

pub(crate) struct ChildProc {
    child: Child,
    pgid: Pid,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Reused for every answer to avoid an allocation per message.
    buf: Vec<u8>,
    next_id: u64,
    /// Set once the child has been waited for: its pid may then be reused,
    /// so it must never be signalled again.
    reaped: bool,
}

impl ChildProc {
    /// Starts a child as the launch plan says (normally the sandbox launcher,
    /// which execs the interpreter), in its own process group, with an empty
    /// environment and all three standard streams piped.
    pub(crate) fn spawn(
        plan: &LaunchPlan,
        worker_id: &str,
        log_lines_per_second: u32,
    ) -> Result<Self, String> {
        let mut child = tokio::process::Command::new(&plan.program)
            .args(&plan.args)
            .env_clear()
            .env("LC_ALL", "C.UTF-8")
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the Python interpreter: {e}"))?;
        let pid = child.id().ok_or("the Python child exited at once")?;
        let stdin = child
            .stdin
            .take()
            .ok_or("no stdin pipe to the Python child")?;
        let stdout = child
            .stdout
            .take()
            .ok_or("no stdout pipe from the Python child")?;
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward_stderr(
                stderr,
                worker_id.to_string(),
                log_lines_per_second,
            ));
        }
        Ok(Self {
            child,
            pgid: Pid::from_raw(pid as i32),
            stdin,
            stdout: BufReader::with_capacity(64 * 1024, stdout),
            buf: Vec::with_capacity(4096),
            next_id: 0,
            reaped: false,
        })
    }

    pub(crate) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends one line (which must end in `\n`) and reads one answer.
    pub(crate) async fn request(
        &mut self,
        line: &[u8],
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Wire, CallError> {
        match tokio::time::timeout(timeout, self.exchange(line, max_bytes)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    async fn exchange(&mut self, line: &[u8], max_bytes: usize) -> Result<Wire, CallError> {
        self.send_line(line).await?;
        self.read_one(max_bytes).await
    }

    /// Writes one or more whole lines.
    pub(crate) async fn send_line(&mut self, line: &[u8]) -> Result<(), CallError> {
        self.stdin
            .write_all(line)
            .await
            .map_err(|_| CallError::Gone)?;
        self.stdin.flush().await.map_err(|_| CallError::Gone)
    }

    /// Reads one answer within `timeout`.
    pub(crate) async fn read_reply(
        &mut self,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Wire, CallError> {
        match tokio::time::timeout(timeout, self.read_one(max_bytes)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    async fn read_one(&mut self, max_bytes: usize) -> Result<Wire, CallError> {
        self.buf.clear();
        let limit = max_bytes as u64 + 1;
        let n = (&mut self.stdout)
            .take(limit)
            .read_until(b'\n', &mut self.buf)
            .await
            .map_err(|_| CallError::Gone)?;
        if n == 0 {
            return Err(CallError::Gone);
        }
        if self.buf.last() != Some(&b'\n') {
            return Err(if n as u64 >= limit {
                CallError::TooLarge
            } else {
                CallError::Gone
            });
        }
        Wire::parse(&self.buf).map_err(CallError::Protocol)
    }

    /// Kills the child's whole process group (it and anything it started).
    pub(crate) fn kill(&mut self) {
        if !self.reaped {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }

    /// After the child is gone: how it ended, for the error message.
    pub(crate) async fn exit_description(&mut self) -> String {
        self.kill();
        match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => {
                self.reaped = true;
                status.to_string()
            }
            _ => "unknown status".to_string(),
        }
    }

    /// Asks the child to exit, then kills its group after `grace`.
    pub(crate) async fn shutdown(mut self, grace: Duration) {
        let _ = self.stdin.write_all(b"{\"op\":\"shutdown\"}\n").await;
        let _ = self.stdin.flush().await;
        if let Ok(Ok(_)) = tokio::time::timeout(grace, self.child.wait()).await {
            // The leader exited; still sweep the group for stragglers.
            let _ = killpg(self.pgid, Signal::SIGKILL);
            self.reaped = true;
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Each stderr line of the child (including the user's `print`) becomes a
/// Warning log tagged with the worker id, up to `per_second` lines a second
/// (bursts of up to ten seconds' worth); beyond that lines are read and
/// dropped, so a flood neither fills the logs nor blocks the child, and the
/// number dropped is logged once the flood eases.
async fn forward_stderr(stderr: tokio::process::ChildStderr, worker_id: String, per_second: u32) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    let rate = f64::from(per_second.max(1));
    let burst = rate * 10.0;
    let mut tokens = burst;
    let mut last = std::time::Instant::now();
    let mut dropped: u64 = 0;
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LOG_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let now = std::time::Instant::now();
                tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(burst);
                last = now;
                if tokens < 1.0 {
                    dropped += 1;
                    continue;
                }
                tokens -= 1.0;
                if dropped > 0 {
                    tracing::warn!(target: "worker", worker_id = %worker_id, dropped, "worker output rate limited; lines dropped");
                    dropped = 0;
                }
                let text = String::from_utf8_lossy(&line);
                tracing::warn!(target: "worker", worker_id = %worker_id, "{}", text.trim_end());
            }
        }
    }
    if dropped > 0 {
        tracing::warn!(target: "worker", worker_id = %worker_id, dropped, "worker output rate limited; lines dropped");
    }
}

/// How to start a child: program and arguments, prepared once per engine.
#[derive(Debug, Clone)]
pub(crate) struct LaunchPlan {
    pub(crate) program: std::path::PathBuf,
    pub(crate) args: Vec<std::ffi::OsString>,
}

impl LaunchPlan {
    /// Through the sandbox launcher unless the sandbox is off (or there is
    /// no launcher binary); then the interpreter directly, with a report
    /// saying no OS layer applied.
    pub(crate) fn new(cfg: &PythonConfig, workdir: &std::path::Path) -> Result<Self, String> {
        let interp = &cfg.interpreter;
        let policy = serde_json::json!({
            "site": interp.site_packages,
            "blocked": cfg.blocked_modules,
            "allowed": cfg.allowed_packages,
        })
        .to_string();
        let python_args: Vec<String> = ["-E", "-s", "-S", "-c", BOOTSTRAP, policy.as_str()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        match (&cfg.launcher, cfg.sandbox) {
            (Some(launcher), mode) if mode != SandboxMode::Off => {
                let mut read_paths: Vec<std::path::PathBuf> = interp.prefixes.clone();
                read_paths.extend(interp.site_packages.iter().cloned());
                read_paths.extend(
                    [
                        "/etc/ld.so.cache",
                        "/etc/localtime",
                        "/usr/share/zoneinfo",
                        "/dev/null",
                        "/dev/urandom",
                    ]
                    .iter()
                    .map(std::path::PathBuf::from),
                );
                let exec_paths = ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"]
                    .iter()
                    .map(std::path::PathBuf::from)
                    .chain(interp.prefixes.iter().map(|p| p.join("lib")))
                    .collect();
                let spec = LaunchSpec {
                    mode,
                    python: interp.executable.clone(),
                    args: python_args,
                    workdir: workdir.to_path_buf(),
                    read_paths,
                    exec_paths,
                    memory_bytes: cfg.memory_limit_bytes,
                    cpu_seconds: cfg.cpu_limit_seconds,
                    open_files: cfg.open_files,
                    parent_pid: std::process::id(),
                };
                let spec = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
                Ok(Self {
                    program: launcher.clone(),
                    args: vec![LAUNCHER_ARG.into(), spec.into()],
                })
            }
            _ => {
                let report = serde_json::to_string(&Applied::off()).map_err(|e| e.to_string())?;
                let mut args: Vec<std::ffi::OsString> =
                    python_args.into_iter().map(Into::into).collect();
                args.push(report.into());
                Ok(Self {
                    program: interp.executable.clone(),
                    args,
                })
            }
        }
    }
}
