//! Settings of the Python engine and interpreter resolution.
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::sandbox::SandboxMode;

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
    /// `sys.prefix`, `sys.base_prefix` and the exec prefixes: where the
    /// standard library lives (readable inside the sandbox).
    pub prefixes: Vec<PathBuf>,
}

/// Modules worker code may not import unless configured otherwise
/// (`Python:BlockedModules`): I/O, processes, FFI and networking.
pub const DEFAULT_BLOCKED_MODULES: &[&str] = &[
    "os",
    "posix",
    "nt",
    "subprocess",
    "_posixsubprocess",
    "pty",
    "tty",
    "termios",
    "shutil",
    "tempfile",
    "pathlib",
    "glob",
    "fileinput",
    "io",
    "_io",
    "socket",
    "_socket",
    "select",
    "selectors",
    "ssl",
    "_ssl",
    "http",
    "urllib",
    "ftplib",
    "smtplib",
    "poplib",
    "imaplib",
    "telnetlib",
    "xmlrpc",
    "socketserver",
    "requests",
    "asyncio",
    "multiprocessing",
    "_multiprocessing",
    "concurrent",
    "threading",
    "_thread",
    "ctypes",
    "_ctypes",
    "cffi",
    "mmap",
    "signal",
    "_signal",
    "fcntl",
    "resource",
    "importlib",
    "imp",
    "pickle",
    "_pickle",
    "marshal",
    "shelve",
    "dbm",
    "sqlite3",
    "code",
    "codeop",
    "pdb",
    "webbrowser",
    "sys",
    "gc",
    "inspect",
    "builtins",
    "pwd",
    "grp",
    "_posixshmem",
    "zipimport",
    "runpy",
    "pkgutil",
];

#[derive(Debug, Clone)]
pub struct PythonConfig {
    pub interpreter: Interpreter,
    /// `Python:Sandbox`.
    pub sandbox: SandboxMode,
    /// The binary that runs the sandbox launcher (the service's own); with
    /// `None` children start without the OS layer (engine unit tests).
    pub launcher: Option<PathBuf>,
    /// `Python:BlockedModules`.
    pub blocked_modules: Vec<String>,
    /// `Python:AllowedPackages`: third-party top-level packages workers may import.
    pub allowed_packages: Vec<String>,
    /// `Python:MemoryLimitMb`, as bytes of address space per child.
    pub memory_limit_bytes: u64,
    /// `Python:CpuLimitSeconds`: CPU time per child before it is killed and restarted.
    pub cpu_limit_seconds: u64,
    /// Largest number of open files per child.
    pub open_files: u64,
    /// Worker output (print/stderr) lines logged per second before lines are dropped.
    pub log_lines_per_second: u32,
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
            sandbox: SandboxMode::Standard,
            launcher: None,
            blocked_modules: DEFAULT_BLOCKED_MODULES
                .iter()
                .map(|m| m.to_string())
                .collect(),
            allowed_packages: Vec::new(),
            memory_limit_bytes: 1024 * 1024 * 1024,
            cpu_limit_seconds: 3600,
            open_files: 64,
            log_lines_per_second: 50,
            execution_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(10),
            max_result_bytes: 4 * 1024 * 1024,
            crash_loop_threshold: 5,
            crash_window: Duration::from_secs(60),
        }
    }
}

const PROBE: &str = "import json, os, site, sys\n\
print(json.dumps({'executable': os.path.realpath(sys.executable), \
'version': '%d.%d.%d' % sys.version_info[:3], 'ok': sys.version_info >= (3, 9), \
'site': site.getsitepackages(), \
'prefixes': sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})}))";

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
        prefixes: Vec<String>,
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
        prefixes: probe.prefixes.into_iter().map(PathBuf::from).collect(),
    })
}
