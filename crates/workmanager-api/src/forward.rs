//! Forwarding a worker-scoped request to the instance that owns the worker.
//!
//! The core decides the route (`Manager::route`); this module carries the
//! request there over gRPC: one cached channel per peer endpoint, TLS with
//! this instance's certificate as client identity when TLS is on, the
//! caller's credential header passed on (the owner authenticates and
//! authorises it again) and the hop guard `x-workmanager-forwarded-by`: a
//! request that carries it is never forwarded again. When the owner cannot be
//! reached at all, the receiver takes the worker over and serves it.
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Response, Status};
use workmanager_core::{Manager, Route};

use crate::auth::Caller;
use crate::error::status;
use crate::grpc::context;
use crate::pb::work_manager_client::WorkManagerClient;

/// The hop guard: set on every forwarded request to the forwarder's id.
pub const FORWARDED_BY: &str = "x-workmanager-forwarded-by";

/// How long connecting to a peer may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound for one forwarded call (InvokeWorker runs user code).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

pub type PeerClient = WorkManagerClient<Channel>;

/// TLS towards peers: the CA that signs their server certificates (else the
/// public web roots) and this instance's own certificate and key, presented
/// as client certificate (it needs the clientAuth usage when peers require
/// client certificates). Files are read when a channel is opened, so rotated
/// files apply to new connections.
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub ca: Option<PathBuf>,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// The request types that name one worker.
pub trait WorkerScoped {
    fn worker_id(&self) -> &str;
}

macro_rules! worker_scoped {
    ($($t:ty),* $(,)?) => {
        $(impl WorkerScoped for $t {
            fn worker_id(&self) -> &str {
                &self.id
            }
        })*
    };
}

worker_scoped!(
    crate::pb::StartWorkerRequest,
    crate::pb::StopWorkerRequest,
    crate::pb::LoadCodeRequest,
    crate::pb::LoadCodeFromContentRequest,
    crate::pb::LoadCodeFromUrlRequest,
    crate::pb::DeleteWorkerRequest,
    crate::pb::GetWorkerHistoryRequest,
    crate::pb::SetTagRequest,
    crate::pb::SetTagsRequest,
    crate::pb::GetTagRequest,
    crate::pb::GetTagsRequest,
    crate::pb::GetWorkerRequest,
    crate::pb::InvokeWorkerRequest,
);

/// What became of a request: answered by the owner, or to be served here.
pub enum Forwarded<Req, Resp> {
    Done(Response<Resp>),
    Here(Request<Req>),
}

pub struct Forwarder {
    instance_id: String,
    tls: Option<PeerTls>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Forwarder {
    pub fn new(instance_id: String, tls: Option<PeerTls>) -> Self {
        Self {
            instance_id,
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn endpoint(&self, url: &str) -> Result<Endpoint, String> {
        let mut e = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("the peer endpoint {url:?} is not a valid URI: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true);
        if let (Some(tls), true) = (&self.tls, url.starts_with("https://")) {
            let read = |p: &PathBuf| {
                std::fs::read(p)
                    .map_err(|e| format!("cannot read {} for peer TLS: {e}", p.display()))
            };
            let mut cfg = ClientTlsConfig::new()
                .identity(Identity::from_pem(read(&tls.certificate)?, read(&tls.key)?));
            cfg = match &tls.ca {
                Some(ca) => cfg.ca_certificate(Certificate::from_pem(read(ca)?)),
                None => cfg.with_webpki_roots(),
            };
            e = e
                .tls_config(cfg)
                .map_err(|e| format!("peer TLS configuration: {e}"))?;
        }
        Ok(e)
    }

    /// The cached channel to a peer (connected lazily, reconnecting by itself).
    fn client(&self, url: &str) -> Result<PeerClient, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(url) {
            return Ok(WorkManagerClient::new(c.clone()));
        }
        let channel = self.endpoint(url)?.connect_lazy();
        channels.insert(url.to_string(), channel.clone());
        Ok(WorkManagerClient::new(channel))
    }

    /// Whether the peer's port accepts a TCP connection now. Deliberately
    /// below TLS: a peer that is up but whose certificate we cannot verify
    /// is a configuration error to report, not a dead owner whose workers
    /// may be taken (that would move them back and forth on every request).
    async fn reachable(&self, url: &str) -> bool {
        let Ok(u) = url::Url::parse(url) else {
            return false;
        };
        let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else {
            return false;
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        matches!(
            tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect((host, port))
            )
            .await,
            Ok(Ok(_))
        )
    }

    fn forget(&self, url: &str) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(url);
    }

    /// Routes a worker-scoped request: `Done` with the owner's answer, or
    /// `Here` when this instance serves it (it hosts the worker, the worker
    /// does not exist, or it was just taken over).
    pub async fn route<Req, Resp, F, Fut>(
        &self,
        manager: &Manager,
        req: Request<Req>,
        call: F,
    ) -> Result<Forwarded<Req, Resp>, Status>
    where
        Req: WorkerScoped + Clone,
        F: FnOnce(PeerClient, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let ctx = context(&req);
        let id = req.get_ref().worker_id().to_string();
        let forwarded = req.metadata().contains_key(FORWARDED_BY);
        let (owner, url) = match manager.route(&ctx, &id, forwarded).await.map_err(status)? {
            Route::Local => return Ok(Forwarded::Here(req)),
            Route::Forward { owner, endpoint } => (owner, endpoint),
        };
        let client = self.client(&url).map_err(Status::unavailable)?;
        let out = self.outgoing(&req, &ctx.correlation_id);
        tracing::debug!(worker_id = %id, owner = %owner, endpoint = %url, "forwarding to the owner");
        match call(client, out).await {
            Ok(resp) => Ok(Forwarded::Done(resp)),
            Err(s) if transport_failure(&s) && !self.reachable(&url).await => {
                self.forget(&url);
                manager
                    .take_over_unreachable(&ctx, &id, &owner)
                    .await
                    .map_err(status)?;
                if manager.hosts(&id) {
                    Ok(Forwarded::Here(req))
                } else {
                    Err(Status::unavailable(format!(
                        "worker {id} moved to another instance while its owner {owner} was unreachable; retry"
                    )))
                }
            }
            Err(s) => Err(s),
        }
    }
}

impl Forwarder {
    /// A copy of `req` for a peer: the hop guard, the correlation id and the
    /// caller's credential header.
    fn outgoing<Req: Clone>(&self, req: &Request<Req>, correlation_id: &str) -> Request<Req> {
        let mut out = Request::new(req.get_ref().clone());
        let md = out.metadata_mut();
        if let Ok(v) = AsciiMetadataValue::try_from(self.instance_id.as_str()) {
            md.insert(FORWARDED_BY, v);
        }
        if let Ok(v) = AsciiMetadataValue::try_from(correlation_id) {
            md.insert("x-correlation-id", v);
        }
        if let Some(cred) = req
            .extensions()
            .get::<Caller>()
            .and_then(|c| c.credential.clone())
        {
            // A header value that is not visible ASCII cannot be metadata;
            // the owner then answers UNAUTHENTICATED, as it should.
            if let Ok(v) = MetadataValue::try_from(cred.value.as_bytes()) {
                md.insert(cred.header, v);
            }
        }
        out
    }

    /// Each live peer's own workers (asked with the hop guard, so a peer
    /// lists only what it hosts), for ListWorkers' live counters. A peer
    /// that does not answer is left out: the store's record stands in.
    pub async fn peer_lists(
        &self,
        req: &Request<crate::pb::ListWorkersRequest>,
        correlation_id: &str,
        peers: Vec<(String, String)>,
    ) -> Vec<crate::pb::WorkerInfo> {
        let calls = peers.into_iter().map(|(owner, url)| {
            let out = self.outgoing(req, correlation_id);
            let client = self.client(&url);
            async move {
                let mut c = client.ok()?;
                match c.list_workers(out).await {
                    Ok(r) => Some(r.into_inner().workers),
                    Err(e) => {
                        tracing::debug!(owner = %owner, error = %e, "a peer did not list its workers");
                        None
                    }
                }
            }
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .flatten()
            .collect()
    }
}

/// Codes a dead peer or a broken connection produce (the owner may also
/// answer UNAVAILABLE itself; `reachable` tells the two apart).
fn transport_failure(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}
