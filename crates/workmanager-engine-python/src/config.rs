//! Settings of the Python engine and interpreter resolution.
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct PythonConfig {
    /// The real interpreter (a version-manager shim resolved once at start-up).
    pub executable: PathBuf,
    /// `Python:ExecutionTimeoutSeconds`: per message, and for loading code.
    pub execution_timeout: Duration,
    /// `Python:PingIntervalSeconds`.
    pub ping_interval: Duration,
    /// Largest result line accepted from a child.
    pub max_result_bytes: usize,
    /// Crashes within `crash_window` that make the worker FAILED.
    pub crash_loop_threshold: usize,
    pub crash_window: Duration,
}

impl PythonConfig {
    pub fn new(executable: PathBuf) -> Self {
        Self {
            executable,
            execution_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(10),
            max_result_bytes: 4 * 1024 * 1024,
            crash_loop_threshold: 5,
            crash_window: Duration::from_secs(60),
        }
    }
}

/// Resolves `configured` (e.g. "python3", possibly a pyenv shim that costs
/// ~50 ms per spawn) to the real interpreter via `sys.executable`, and checks
/// that it is Python 3.9 or newer.
pub async fn resolve_interpreter(configured: &str) -> Result<(PathBuf, String), String> {
    let out = tokio::process::Command::new(configured)
        .args([
            "-E",
            "-s",
            "-c",
            "import sys; print(sys.executable); print('%d.%d.%d' % sys.version_info[:3]); \
             print(1 if sys.version_info >= (3, 9) else 0)",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| {
            format!("cannot run the Python interpreter {configured:?} (Python:Executable): {e}")
        })?;
    if !out.status.success() {
        return Err(format!(
            "the Python interpreter {configured:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (Some(path), Some(version), Some(ok)) = (lines.next(), lines.next(), lines.next()) else {
        return Err(format!(
            "the Python interpreter {configured:?} gave an unexpected answer"
        ));
    };
    if ok.trim() != "1" {
        return Err(format!(
            "Python {version} at {path} is too old; WorkManager needs Python 3.9 or newer"
        ));
    }
    let path = if path.trim().is_empty() {
        PathBuf::from(configured)
    } else {
        PathBuf::from(path.trim())
    };
    Ok((path, version.trim().to_string()))
}
