//! `workmanager serve`: builds the service from configuration and runs it
//! until SIGTERM/SIGINT, then drains and disposes every engine.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use tokio::net::TcpListener;
use workmanager_api::auth::AuthConfig;
use workmanager_api::forward::PeerTls;
use workmanager_api::jwt::JwtVerifier;
use workmanager_api::server::{serve, ServeOptions};
use workmanager_api::tls::TlsState;
use workmanager_backends::{
    DaprBus, DaprClient, DaprSettings, DaprStore, EmbeddedBus, EmbeddedStore, FileOutbox, NatsAuth,
    NatsBus, NatsBusSettings, RedisBus, RedisBusSettings, RedisStore,
};
use workmanager_core::bus::Bus;
use workmanager_core::{
    ClusterSettings, EngineRegistry, Manager, ManagerSettings, Metrics, ResilienceSettings,
    ResilientBus, ResilientStore, StateStore,
};
use workmanager_engine_python::{resolve_interpreter, PythonConfig, PythonEngine, SandboxMode};
use workmanager_fetch::{FetchPolicy, HttpFetcher, SystemResolver};

use crate::config::{BusKind, Settings, StoreKind};

/// Authentication from the `Auth:*` settings.
fn build_auth(settings: &Settings) -> Result<AuthConfig> {
    let a = &settings.auth;
    let jwt = match &a.jwt {
        Some(j) => Some(Arc::new(
            JwtVerifier::new(j).map_err(|e| anyhow!("invalid configuration: {e}"))?,
        )),
        None => None,
    };
    if !a.cert_roles.is_empty()
        && settings
            .tls
            .as_ref()
            .and_then(|t| t.client_ca.as_ref())
            .is_none()
    {
        return Err(anyhow!(
            "invalid configuration: Auth:Certificates maps client certificates to roles, but \
             Tls:ClientCaPath is not set, so no client certificate is ever verified"
        ));
    }
    let cfg = AuthConfig {
        api_keys: a.api_keys.clone(),
        jwt,
        cert_roles: a.cert_roles.clone(),
        open_health: a.open_health,
        open_metrics: a.open_metrics,
    };
    if cfg.enabled() {
        tracing::info!(
            api_keys = a.api_keys.len(),
            jwt = a.jwt.is_some(),
            certificates = a.cert_roles.len(),
            "authentication on: every request needs credentials (health: {}, metrics: {})",
            if a.open_health { "open" } else { "viewer" },
            if a.open_metrics { "open" } else { "viewer" }
        );
    }
    Ok(cfg)
}

/// The URL code fetcher, with start-up warnings for risky settings.
fn build_fetcher(settings: &Settings) -> Result<HttpFetcher> {
    if settings.allowed_code_source_hosts.is_empty() && settings.production {
        tracing::warn!(
            "AllowedCodeSourceHosts is empty: worker code may be loaded from any public host. \
             List the hosts code may come from (e.g. ALLOWED_CODE_SOURCE_HOSTS=code.example.com)."
        );
    }
    if settings.allow_private_networks {
        tracing::warn!(
            "CodeSource:AllowPrivateNetworks is on: worker code may be loaded from private, loopback and \
             link-local addresses (cloud metadata included). For development and tests only."
        );
    }
    for (name, c) in &settings.code_source_credentials {
        if c.hosts.is_empty() {
            tracing::warn!(
                credential = %name,
                "code-source credential has no Hosts (CodeSourceCredentials:{name}:Hosts); it is never sent"
            );
        }
    }
    let policy = FetchPolicy {
        allowed_hosts: settings.allowed_code_source_hosts.clone(),
        allow_private_networks: settings.allow_private_networks,
        max_bytes: settings.max_code_bytes,
        timeout: settings.fetch_timeout,
        extra_roots_pem: settings.extra_root_pems.clone(),
        public_overrides: Vec::new(),
    };
    HttpFetcher::new(
        policy,
        settings.code_source_credentials.clone(),
        Arc::new(SystemResolver),
    )
    .map_err(|e| anyhow!("{e} (CodeSource:ExtraRootCertificates)"))
}

pub async fn run(settings: Settings, port_file: Option<PathBuf>) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let engines = build_engines(&settings, &metrics).await?;

    let resilience = ResilienceSettings {
        retry_attempts: settings.resilience_retry_attempts,
        retry_base_delay: settings.resilience_retry_base_delay,
        breaker_threshold: settings.circuit_breaker_threshold,
        breaker_duration: settings.circuit_breaker_duration,
        call_timeout: settings.redis_timeout,
    };
    // Networked backends get retries and a circuit breaker (resilience.rs);
    // the embedded ones fail only with the disk.
    let dapr_client = || {
        DaprClient::new(DaprSettings {
            base_url: format!("http://127.0.0.1:{}", settings.dapr.http_port),
            api_token: settings.dapr.api_token.clone(),
            state_store: settings.dapr.state_store.clone(),
            pubsub: settings.dapr.pubsub.clone(),
            timeout: std::time::Duration::from_secs(10),
        })
        .map_err(|e| anyhow!(e))
    };
    let store: Arc<dyn StateStore> = match settings.state_store {
        StoreKind::Dapr => {
            let s = DaprStore::connect(dapr_client()?).await.map_err(|e| {
                anyhow!("{e} (StateStore:Type=dapr, Dapr:HttpPort, stateStoreName)")
            })?;
            tracing::info!(component = %settings.dapr.state_store, "Dapr state store reached through the sidecar");
            Arc::new(ResilientStore::new(Arc::new(s), resilience.clone()))
        }
        StoreKind::Embedded => {
            let s = EmbeddedStore::open(&settings.state_store_path).map_err(|e| {
                anyhow!("{e}; set StateStore:Path to a writable file (another workmanager may be using it)")
            })?;
            tracing::info!(path = %settings.state_store_path.display(), "embedded state store opened");
            Arc::new(s)
        }
        StoreKind::Redis => {
            let s = RedisStore::connect_with(
                &settings.redis_url,
                settings.redis_timeout,
                settings.redis_tls.as_ref(),
            )
            .await
            .map_err(|e| anyhow!("{e} (StateStore:Type=redis, Redis:Url)"))?;
            tracing::info!("Redis state store connected");
            Arc::new(ResilientStore::new(Arc::new(s), resilience.clone()))
        }
    };

    let fetcher = build_fetcher(&settings)?;
    // A networked bus behind retries, a breaker and the outbox file where
    // its publishes wait while the broker is down.
    let resilient = |b: Arc<dyn Bus>, r: ResilienceSettings| -> Result<Arc<dyn Bus>> {
        let outbox = FileOutbox::open(&settings.buffer_path).map_err(|e| {
            anyhow!("{e}; set Resilience:BufferPath to a writable file of this instance's own")
        })?;
        let bus: Arc<dyn Bus> = ResilientBus::new(
            b,
            r,
            metrics.publish_buffer_refused.clone(),
            Arc::new(outbox),
        );
        Ok(bus)
    };
    let bus: Arc<dyn Bus> = match settings.pubsub {
        BusKind::Dapr => {
            let b = DaprBus::connect(
                dapr_client()?,
                settings.dapr.topics.clone(),
                settings.dapr.app_token.clone(),
                settings.queue_capacity,
            )
            .await
            .map_err(|e| anyhow!("{e} (PubSub:Type=dapr, Dapr:HttpPort, pubsubName)"))?;
            tracing::info!(component = %settings.dapr.pubsub, "Dapr pub/sub reached through the sidecar");
            resilient(Arc::new(b), resilience.clone())?
        }
        BusKind::Embedded => Arc::new(EmbeddedBus::new(
            settings.queue_capacity,
            settings.publish_timeout,
        )),
        BusKind::Redis => {
            let b = RedisBus::connect_with(
                &settings.redis_url,
                RedisBusSettings {
                    stream_max_len: settings.redis_stream_max_len,
                    visibility_timeout: settings.redis_visibility_timeout,
                    dedup_window: settings.redis_dedup_window,
                    capacity: settings.queue_capacity,
                    consumer: settings.instance_id.clone(),
                    max_deliver: settings.redis_max_deliver,
                },
                settings.redis_tls.as_ref(),
            )
            .await
            .map_err(|e| anyhow!("{e} (PubSub:Type=redis, Redis:Url)"))?;
            tracing::info!("Redis Streams bus connected");
            resilient(Arc::new(b), resilience.clone())?
        }
        BusKind::Nats => {
            let b = NatsBus::connect(
                &settings.nats_url,
                NatsAuth {
                    token: settings.nats_token.clone(),
                    user: settings.nats_user.clone(),
                    password: settings.nats_password.clone(),
                    nkey_seed: settings.nats_nkey_seed.clone(),
                    credentials_file: settings.nats_credentials_file.clone(),
                    ca: settings.nats_ca.clone(),
                    client_certificate: settings.nats_client_certificate.clone(),
                },
                NatsBusSettings {
                    stream_max_messages: settings.nats_stream_max_messages,
                    ack_wait: settings.nats_ack_wait,
                    max_deliver: settings.nats_max_deliver,
                    capacity: settings.queue_capacity,
                    dedup_window: settings.nats_dedup_window,
                },
            )
            .await
            .map_err(|e| anyhow!("{e} (PubSub:Type=nats)"))?;
            tracing::info!("NATS JetStream bus connected");
            // JetStream answers a publish once stored: allow it a little
            // longer than a Redis call.
            let nats = ResilienceSettings {
                call_timeout: std::time::Duration::from_secs(5),
                ..resilience.clone()
            };
            resilient(Arc::new(b), nats)?
        }
    };
    let http = bind(&settings, settings.http_port, "HttpPort").await?;
    let grpc = bind(&settings, settings.grpc_port, "GrpcPort").await?;
    let http_addr = http.local_addr()?;
    let grpc_addr = grpc.local_addr()?;
    tracing::info!(http = %http_addr, grpc = %grpc_addr, instance_id = %settings.instance_id, "listening");
    if let Some(path) = port_file {
        write_port_file(&path, http_addr, grpc_addr)?;
    }
    let advertised_endpoint = advertised_endpoint(&settings, grpc_addr);
    let manager = Manager::new(
        store,
        bus,
        engines,
        Arc::new(fetcher),
        ManagerSettings {
            instance_id: settings.instance_id.clone(),
            max_code_bytes: settings.max_code_bytes,
            recovery: settings.recovery.clone(),
            retry_attempts: settings.worker_retry_attempts,
            retry_base_delay: settings.worker_retry_base_delay,
            drain_timeout: settings.drain_timeout,
            cluster: ClusterSettings {
                heartbeat_interval: settings.heartbeat_interval,
                stale_after: settings.stale_after,
                advertised_endpoint,
            },
        },
        metrics,
    );
    manager.spawn_lifecycle_publisher();

    let auth = build_auth(&settings)?;
    let tls = match &settings.tls {
        Some(files) => {
            let state = TlsState::load(files.clone()).map_err(|e| anyhow!(e))?;
            state.spawn_reloader(settings.tls_reload_interval);
            tracing::info!(
                mutual = files.client_ca.is_some(),
                "TLS on both ports{}",
                if files.client_ca.is_some() {
                    " (client certificates required)"
                } else {
                    ""
                }
            );
            Some(state)
        }
        None => None,
    };
    if !settings.bind_address.is_loopback() && !auth.enabled() {
        tracing::warn!(
            bind = %settings.bind_address,
            "LISTENING ON A NON-LOOPBACK ADDRESS WITHOUT AUTHENTICATION: anyone who can reach this host can \
             run code here. Bind to 127.0.0.1 or put an authenticating gateway in front."
        );
    }

    let heartbeat = manager.spawn_heartbeat();
    let recovering = manager.clone();
    tokio::spawn(async move { recovering.recover_on_start().await });

    let opts = ServeOptions {
        max_message_bytes: settings
            .max_code_bytes
            .saturating_mul(2)
            .saturating_add(1 << 20),
        drain_timeout: settings.drain_timeout,
        max_event_bytes: settings.max_event_bytes,
        auth: Arc::new(auth),
        tls,
        peer_tls: settings.tls.as_ref().map(|files| PeerTls {
            ca: settings.peer_ca.clone().or_else(|| files.client_ca.clone()),
            certificate: files.certificate.clone(),
            key: files.key.clone(),
        }),
    };
    serve(manager.clone(), grpc, http, opts, shutdown_signal())
        .await
        .map_err(|e| anyhow!(e))?;
    tracing::info!("stopped taking requests; disposing workers");
    heartbeat.abort();
    manager.shutdown().await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Where peers reach this instance's gRPC port: `Instance:AdvertisedGrpcEndpoint`,
/// else the bound address (`HOSTNAME` when bound to all interfaces).
fn advertised_endpoint(settings: &Settings, grpc: std::net::SocketAddr) -> String {
    if let Some(e) = &settings.advertised_endpoint {
        return e.clone();
    }
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let ip = grpc.ip();
    let host = if !ip.is_unspecified() {
        match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        }
    } else if let Ok(h) = std::env::var("HOSTNAME") {
        h
    } else {
        tracing::warn!(
            "bound to all interfaces without HOSTNAME or Instance:AdvertisedGrpcEndpoint: peers              cannot forward requests for this instance's workers"
        );
        return String::new();
    };
    format!("{scheme}://{host}:{}", grpc.port())
}

async fn build_engines(settings: &Settings, metrics: &Arc<Metrics>) -> Result<EngineRegistry> {
    let mut engines = EngineRegistry::default();
    let interpreter = match resolve_interpreter(&settings.python_executable).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "the Python engine is unavailable; text/x-python workers cannot run");
            return Ok(engines);
        }
    };
    tracing::info!(
        interpreter = %interpreter.executable.display(),
        version = %interpreter.version,
        "Python interpreter found"
    );
    let mut cfg = PythonConfig::new(interpreter);
    cfg.execution_timeout = settings.python_execution_timeout;
    cfg.ping_interval = settings.python_ping_interval;
    cfg.sandbox = settings.python_sandbox;
    cfg.launcher = Some(std::env::current_exe().context("cannot find the service's own binary")?);
    if let Some(blocked) = &settings.python_blocked_modules {
        cfg.blocked_modules = blocked.clone();
    }
    cfg.allowed_packages = settings.python_allowed_packages.clone();
    cfg.max_result_bytes = settings.python_max_result_bytes;
    cfg.memory_limit_bytes = settings.python_memory_limit_bytes;
    cfg.cpu_limit_seconds = settings.python_cpu_limit_seconds;
    cfg.log_lines_per_second = settings.python_log_lines_per_second;
    let engine = PythonEngine::new(cfg, metrics.clone()).map_err(|e| anyhow!(e))?;
    match (settings.python_sandbox, engine.probe().await) {
        (SandboxMode::Off, _) => tracing::warn!(
            "Python:Sandbox=off: worker code runs WITHOUT the OS sandbox; use this for development only"
        ),
        (mode, Ok(applied)) if applied.missing().is_empty() => tracing::info!(
            sandbox = mode.as_str(),
            isolation = %applied.describe(),
            "Python sandbox fully applied"
        ),
        (mode, Ok(applied)) => tracing::warn!(
            sandbox = mode.as_str(),
            isolation = %applied.describe(),
            missing = %applied.missing().join(", "),
            "Python sandbox partly applied"
        ),
        (mode, Err(e)) => tracing::error!(sandbox = mode.as_str(), error = %e, "Python sandbox probe failed"),
    }
    engines.register(Arc::new(engine)).map_err(|e| anyhow!(e))?;
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
