//! Settings of the Python engine and interpreter resolution.
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// The interpreter as resolved once at start-up.
#[derive(Debug, Clone)]
pub struct Interpreter {
    /// The real binary (a version-manager shim such as pyenv's costs ~50 ms
    /// per spawn, so it is resolved away through `sys.executable`).
    pub executable: PathBuf,
    pub version: String,
    /// The interpreter's site-packages directories. Children run with `-S`
    /// (the `site` module is not imported, so no `.pth` file executes in a
    /// worker's process and start-up is ~20 ms faster); the bootstrap puts
    /// these directories on `sys.path` so installed packages still import.
    pub site_packages: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct PythonConfig {
    pub interpreter: Interpreter,
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
    pub fn new(interpreter: Interpreter) -> Self {
        Self {
            interpreter,
            execution_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(10),
            max_result_bytes: 4 * 1024 * 1024,
            crash_loop_threshold: 5,
            crash_window: Duration::from_secs(60),
        }
    }
}

const PROBE: &str = "import json, site, sys\n\
print(json.dumps({'executable': sys.executable, 'version': '%d.%d.%d' % sys.version_info[:3], \
'ok': sys.version_info >= (3, 9), 'site': site.getsitepackages()}))";

/// Resolves `configured` (e.g. "python3") to the real interpreter, checks that
/// it is Python 3.9 or newer, and finds its site-packages directories.
pub async fn resolve_interpreter(configured: &str) -> Result<Interpreter, String> {
    let out = tokio::process::Command::new(configured)
        .args(["-E", "-s", "-c", PROBE])
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
    #[derive(serde::Deserialize)]
    struct Probe {
        executable: String,
        version: String,
        ok: bool,
        site: Vec<String>,
    }
    let probe: Probe = serde_json::from_slice(&out.stdout)
        .map_err(|_| format!("the Python interpreter {configured:?} gave an unexpected answer"))?;
    if !probe.ok {
        return Err(format!(
            "Python {} at {} is too old; WorkManager needs Python 3.9 or newer",
            probe.version, probe.executable
        ));
    }
    let executable = if probe.executable.trim().is_empty() {
        PathBuf::from(configured)
    } else {
        PathBuf::from(probe.executable)
    };
    Ok(Interpreter {
        executable,
        version: probe.version,
        site_packages: probe.site.into_iter().map(PathBuf::from).collect(),
    })
}
