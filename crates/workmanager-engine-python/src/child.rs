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

const BOOTSTRAP: &str = include_str!("bootstrap.py");
/// Longest stderr line forwarded to the log; the rest is cut.
const MAX_LOG_LINE: u64 = 8 * 1024;

/// A message from the child.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Wire {
    Ready,
    Pong,
    Result {
        #[serde(default)]
        event: Option<Value>,
    },
    Error {
        error_type: String,
        message: String,
        #[serde(default)]
        traceback: String,
    },
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
    /// Starts `python -E -s -S -c <bootstrap> <site-packages...>` in its own
    /// process group with an empty environment (but for the locale) and `/`
    /// as working directory.
    pub(crate) fn spawn(cfg: &PythonConfig, worker_id: &str) -> Result<Self, String> {
        let mut child = tokio::process::Command::new(&cfg.interpreter.executable)
            .args(["-E", "-s", "-S", "-c", BOOTSTRAP])
            .args(&cfg.interpreter.site_packages)
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
            tokio::spawn(forward_stderr(stderr, worker_id.to_string()));
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
        self.stdin
            .write_all(line)
            .await
            .map_err(|_| CallError::Gone)?;
        self.stdin.flush().await.map_err(|_| CallError::Gone)?;
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
        serde_json::from_slice(&self.buf).map_err(|e| CallError::Protocol(e.to_string()))
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
/// Warning log tagged with the worker id.
async fn forward_stderr(stderr: tokio::process::ChildStderr, worker_id: String) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LOG_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                tracing::warn!(target: "worker", worker_id = %worker_id, "{}", text.trim_end());
            }
        }
    }
}
