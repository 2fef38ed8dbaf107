//! `workmanager serve`: builds the service from configuration and runs it
//! until SIGTERM/SIGINT, then drains and disposes every engine.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use tokio::net::TcpListener;
use workmanager_api::server::{serve, ServeOptions};
use workmanager_backends::EmbeddedStore;
use workmanager_core::{DisabledFetcher, EngineRegistry, Manager, ManagerSettings, Metrics};
use workmanager_engine_python::{resolve_interpreter, PythonConfig, PythonEngine};

use crate::config::Settings;

pub async fn run(settings: Settings, port_file: Option<PathBuf>) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let engines = build_engines(&settings, &metrics).await?;

    let store = EmbeddedStore::open(&settings.state_store_path).map_err(|e| {
        anyhow!("{e}; set StateStore:Path to a writable file (another workmanager may be using it)")
    })?;
    tracing::info!(path = %settings.state_store_path.display(), "embedded state store opened");

    let manager = Manager::new(
        Arc::new(store),
        engines,
        Arc::new(DisabledFetcher),
        ManagerSettings {
            instance_id: settings.instance_id.clone(),
            max_code_bytes: settings.max_code_bytes,
            recovery: settings.recovery.clone(),
        },
        metrics,
    );

    let http = bind(&settings, settings.http_port, "HttpPort").await?;
    let grpc = bind(&settings, settings.grpc_port, "GrpcPort").await?;
    let http_addr = http.local_addr()?;
    let grpc_addr = grpc.local_addr()?;
    tracing::info!(http = %http_addr, grpc = %grpc_addr, instance_id = %settings.instance_id, "listening");
    if let Some(path) = port_file {
        write_port_file(&path, http_addr, grpc_addr)?;
    }
    if !settings.bind_address.is_loopback() {
        tracing::warn!(
            bind = %settings.bind_address,
            "LISTENING ON A NON-LOOPBACK ADDRESS WITHOUT AUTHENTICATION: anyone who can reach this host can \
             run code here. Bind to 127.0.0.1 or put an authenticating gateway in front."
        );
    }

    manager.spawn_heartbeat();
    let recovering = manager.clone();
    tokio::spawn(async move { recovering.recover_on_start().await });

    let opts = ServeOptions {
        max_message_bytes: settings
            .max_code_bytes
            .saturating_mul(2)
            .saturating_add(1 << 20),
        drain_timeout: settings.drain_timeout,
    };
    serve(manager.clone(), grpc, http, opts, shutdown_signal())
        .await
        .map_err(|e| anyhow!(e))?;
    tracing::info!("stopped taking requests; disposing workers");
    manager.shutdown().await;
    tracing::info!("shutdown complete");
    Ok(())
}

async fn build_engines(settings: &Settings, metrics: &Arc<Metrics>) -> Result<EngineRegistry> {
    let mut engines = EngineRegistry::default();
    match resolve_interpreter(&settings.python_executable).await {
        Ok(interpreter) => {
            tracing::info!(
                interpreter = %interpreter.executable.display(),
                version = %interpreter.version,
                "Python engine ready"
            );
            let mut cfg = PythonConfig::new(interpreter);
            cfg.execution_timeout = settings.python_execution_timeout;
            cfg.ping_interval = settings.python_ping_interval;
            engines
                .register(Arc::new(PythonEngine::new(cfg, metrics.clone())))
                .map_err(|e| anyhow!(e))?;
        }
        Err(e) => {
            tracing::error!(error = %e, "the Python engine is unavailable; text/x-python workers cannot run")
        }
    }
    Ok(engines)
}

async fn bind(settings: &Settings, port: u16, key: &str) -> Result<TcpListener> {
    let addr = SocketAddr::new(settings.bind_address, port);
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} ({key}); is another service using the port?")
    })
}

/// Writes `{"http": port, "grpc": port}` atomically, for scripts and tests
/// that start the service on OS-chosen ports (`--http-port 0`).
fn write_port_file(path: &std::path::Path, http: SocketAddr, grpc: SocketAddr) -> Result<()> {
    let body = serde_json::json!({"http": http.port(), "grpc": grpc.port()}).to_string();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
