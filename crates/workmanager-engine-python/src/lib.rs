//! The Python engine (`text/x-python`). Each worker gets one persistent
//! child process per concurrency slot, started at load and kept for the
//! worker's lifetime. See `bootstrap.py` for the child side of the protocol
//! and `child.rs` for the host side.

mod child;
mod config;
mod engine;
pub mod sandbox;

pub use config::{resolve_interpreter, Interpreter, PythonConfig, DEFAULT_BLOCKED_MODULES};
pub use engine::PythonEngine;
pub use sandbox::{Applied, SandboxMode, LAUNCHER_ARG};

/// The MIME type this engine serves.
pub const MIME_TYPE: &str = "text/x-python";
