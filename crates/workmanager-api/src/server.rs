//! Runs both ports: gRPC (WorkManager, health, reflection v1 and v1alpha)
//! and HTTP (axum router), until the shutdown signal.
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic_health::ServingStatus;
use workmanager_core::Manager;

use crate::auth::{AuthConfig, AuthLayer};
use crate::correlation::{CorrelationLayer, InFlight};
use crate::grpc::WorkManagerService;
use crate::pb;
use crate::pb::work_manager_server::WorkManagerServer;
use crate::tls::{TlsConnectInfo, TlsListener, TlsState};

#[derive(Clone)]
pub struct ServeOptions {
    /// Largest request accepted on either port (gRPC message or HTTP body).
    pub max_message_bytes: usize,
    /// After the shutdown signal, how long requests in flight may take to
    /// finish before connections are closed anyway.
    pub drain_timeout: Duration,
    /// Largest CloudEvent (or batch) accepted by `POST /v1/topics/{topic}`.
    pub max_event_bytes: usize,
    /// Who may call what (open when nothing is configured).
    pub auth: Arc<AuthConfig>,
    /// TLS (and mTLS) for both ports; plain text when `None`.
    pub tls: Option<Arc<TlsState>>,
    /// Client TLS for forwarding to peers (with TLS on).
    pub peer_tls: Option<crate::forward::PeerTls>,
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub const SERVICE_NAME: &str = "virtufin.WorkManager";

/// Serves until `shutdown` completes, then stops accepting, lets requests in
/// flight finish (bounded by `drain_timeout`) and closes every connection.
pub async fn serve(
    manager: Manager,
    grpc: TcpListener,
    http: TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let inflight = InFlight::default();
    let forwarder = Arc::new(crate::forward::Forwarder::new(
        manager.instance_id().to_string(),
        opts.peer_tls.clone(),
    ));
    let svc = WorkManagerService::new(manager.clone(), forwarder);

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    // Readiness of both ports flips together: gRPC health first, then the
    // flag `/health/ready` reads, so a client that saw one ready sees both.
    let ready = Arc::new(AtomicBool::new(false));
    let (ready_manager, ready_flag) = (manager.clone(), ready.clone());
    tokio::spawn(async move {
        ready_manager.wait_ready().await;
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        reporter
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;
        ready_flag.store(true, Ordering::Release);
    });

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| format!("gRPC reflection: {e}"))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| format!("gRPC reflection: {e}"))?;
    let api = WorkManagerServer::new(svc.clone())
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);

    let mut grpc_stop = stop_rx.clone();
    let routes = tonic::transport::Server::builder()
        .layer(CorrelationLayer::new(inflight.clone()))
        .layer(AuthLayer::new(opts.auth.clone()))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api);
    let grpc_done = async move {
        let _ = grpc_stop.wait_for(|s| *s).await;
    };
    let grpc_server: futures::future::BoxFuture<'static, Result<(), String>> = match &opts.tls {
        Some(tls) => {
            let incoming = tokio_stream::wrappers::ReceiverStream::new(crate::tls::incoming(
                grpc,
                tls.clone(),
                HANDSHAKE_TIMEOUT,
            ))
            .map(Ok::<_, std::io::Error>);
            Box::pin(async move {
                routes
                    .serve_with_incoming_shutdown(incoming, grpc_done)
                    .await
                    .map_err(|e| format!("gRPC server: {e}"))
            })
        }
        None => {
            let incoming = TcpListenerStream::new(grpc).map(|s| {
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            });
            Box::pin(async move {
                routes
                    .serve_with_incoming_shutdown(incoming, grpc_done)
                    .await
                    .map_err(|e| format!("gRPC server: {e}"))
            })
        }
    };

    let router = crate::http::router(svc, &opts, inflight.clone(), ready);
    let mut http_stop = stop_rx.clone();
    let http_done = async move {
        let _ = http_stop.wait_for(|s| *s).await;
    };
    let http_server: futures::future::BoxFuture<'static, Result<(), String>> = match &opts.tls {
        Some(tls) => {
            let local = http.local_addr().map_err(|e| e.to_string())?;
            let listener = TlsListener {
                rx: crate::tls::incoming(http, tls.clone(), HANDSHAKE_TIMEOUT),
                local,
            };
            let app = router.into_make_service_with_connect_info::<TlsConnectInfo>();
            Box::pin(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(http_done)
                    .await
                    .map_err(|e| format!("HTTP server: {e}"))
            })
        }
        None => {
            let listener = http.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
            Box::pin(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(http_done)
                    .await
                    .map_err(|e| format!("HTTP server: {e}"))
            })
        }
    };

    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let mut drain_stop = stop_rx.clone();
    let drained = async move {
        let _ = drain_stop.wait_for(|s| *s).await;
        let deadline = tokio::time::Instant::now() + opts.drain_timeout;
        while inflight.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if inflight.count() > 0 {
            tracing::warn!(
                in_flight = inflight.count(),
                "drain timeout reached; closing connections"
            );
        }
    };
    tokio::select! {
        (g, h) = async { tokio::join!(grpc_server, http_server) } => {
            g?;
            h?;
        }
        // Idle keep-alive connections must not hold the service open: once no
        // request is in flight, the servers are dropped, closing them all.
        () = drained => {}
    }
    Ok(())
}
