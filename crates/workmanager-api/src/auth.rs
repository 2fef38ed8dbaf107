//! Authentication and authorization for both ports, in one tower layer.
//!
//! Who: a JWT bearer token (`Authorization: Bearer`), an API key
//! (`x-api-key`, configured by its SHA-256), or the TLS client certificate
//! (its subject/SAN mapped to a role). What they may do: [`rule`] is the one
//! table mapping every gRPC method and REST route to its minimum role
//! (`viewer` < `operator` < `admin`, spec 11). With nothing configured the
//! service is open and every caller is `anonymous` with the admin role.
//!
//! Failures answer UNAUTHENTICATED / 401 (with `WWW-Authenticate`) or
//! PERMISSION_DENIED / 403 naming the role needed — never which part of a
//! credential was wrong — and are audited, rate-limited.
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

/// Longest bearer token accepted (bytes); anything longer is refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim().to_ascii_lowercase().as_str() {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// No credentials (health and metrics, when configured open).
    Open,
    Needs(Role),
}

/// gRPC methods of `virtufin.WorkManager` and the role each needs. A test
/// checks every method of the service descriptor is here.
pub const GRPC_METHODS: &[(&str, Role)] = &[
    ("ListWorkers", Role::Viewer),
    ("GetWorker", Role::Viewer),
    ("GetWorkerHistory", Role::Viewer),
    ("GetTag", Role::Viewer),
    ("GetTags", Role::Viewer),
    ("ListEngines", Role::Viewer),
    ("Subscribe", Role::Viewer),
    ("WatchWorkers", Role::Viewer),
    ("StartWorker", Role::Operator),
    ("StopWorker", Role::Operator),
    ("InvokeWorker", Role::Operator),
    ("Publish", Role::Operator),
    ("SetTag", Role::Operator),
    ("SetTags", Role::Operator),
    ("CreateWorker", Role::Admin),
    ("LoadCode", Role::Admin),
    ("LoadCodeFromContent", Role::Admin),
    ("LoadCodeFromUrl", Role::Admin),
    ("DeleteWorker", Role::Admin),
    ("RecoverWorkers", Role::Admin),
];

/// Which endpoints stay open without credentials.
#[derive(Debug, Clone, Copy)]
pub struct OpenEndpoints {
    /// `/health*` and the gRPC health service.
    pub health: bool,
    pub metrics: bool,
}

/// The minimum role for a request, by its HTTP method and path (gRPC calls
/// are `POST /<service>/<method>`). `None`: not a route of this service
/// (the layer then asks for a viewer, so probes learn nothing).
pub fn rule(method: &http::Method, path: &str, open: OpenEndpoints) -> Option<Rule> {
    use http::Method as M;
    use Role::*;
    let needs = |r: Role| Some(Rule::Needs(r));
    let open_if = |yes: bool| Some(if yes { Rule::Open } else { Rule::Needs(Viewer) });
    if let Some(rest) = path.strip_prefix("/virtufin.WorkManager/") {
        return GRPC_METHODS
            .iter()
            .find(|(m, _)| *m == rest)
            .map(|(_, r)| Rule::Needs(*r));
    }
    if path.starts_with("/grpc.health.v1.Health/") {
        return open_if(open.health);
    }
    if path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        return needs(Viewer);
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        (&M::GET, ["health"] | ["health", "live"] | ["health", "ready"]) => open_if(open.health),
        (&M::GET, ["metrics"]) => open_if(open.metrics),
        (&M::GET, ["openapi.json"]) => needs(Viewer),
        (&M::GET, ["v1", "workers"]) => needs(Viewer),
        (&M::GET, ["v1", "workers", _]) => needs(Viewer),
        (&M::GET, ["v1", "workers", _, "history"]) => needs(Viewer),
        (&M::GET, ["v1", "workers", _, "tags"]) => needs(Viewer),
        (&M::GET, ["v1", "workers", _, "tags", _]) => needs(Viewer),
        (&M::GET, ["v1", "engines"]) => needs(Viewer),
        (&M::GET, ["v1", "topics", _, "events"]) => needs(Viewer),
        (&M::POST, ["v1", "workers", _, "start" | "stop" | "invoke"]) => needs(Operator),
        (&M::PUT, ["v1", "workers", _, "tags"]) => needs(Operator),
        (&M::PUT, ["v1", "workers", _, "tags", _]) => needs(Operator),
        (&M::POST, ["v1", "topics", _]) => needs(Operator),
        (&M::POST, ["v1", "workers"]) => needs(Admin),
        (&M::DELETE, ["v1", "workers", _]) => needs(Admin),
        (&M::PUT, ["v1", "workers", _, "code"]) => needs(Admin),
        (&M::POST, ["v1", "recover"]) => needs(Admin),
        // The Dapr sidecar's routes check its own token (dapr.rs).
        (&M::GET, ["dapr", "subscribe"]) | (&M::POST, ["dapr", "events", _]) => Some(Rule::Open),
        _ => None,
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// JWT `sub`, API key name, or certificate subject.
    pub name: String,
    pub role: Role,
}

/// The caller of a request, as put in its extensions for handlers and audit.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// The peer's address, when known.
    pub source: Option<SocketAddr>,
    /// The header that authenticated the caller (API key or bearer token),
    /// passed on when the request is forwarded to the worker's owner, which
    /// checks it again. `None` for certificate callers and with auth off.
    pub credential: Option<Credential>,
}

/// A credential header as presented; never printed.
#[derive(Clone)]
pub struct Credential {
    pub header: &'static str,
    pub value: http::HeaderValue,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}: ***)", self.header)
    }
}

impl Credential {
    fn from_headers(headers: &HeaderMap) -> Option<Self> {
        ["x-api-key", "authorization"]
            .into_iter()
            .find_map(|header| {
                headers.get(header).map(|v| Credential {
                    header,
                    value: v.clone(),
                })
            })
    }
}

/// The TLS client certificate's names (subject CN and SANs), put into the
/// request's extensions by the TLS acceptor.
#[derive(Debug, Clone, Default)]
pub struct PeerNames(pub Vec<String>);

/// One configured API key: its name, SHA-256 and role.
#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    pub sha256: [u8; 32],
    pub role: Role,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}, {})", self.name, self.role.as_str())
    }
}

/// A certificate name (CN or SAN, exact) and the role it gets.
#[derive(Debug, Clone)]
pub struct CertRole {
    pub name: String,
    pub role: Role,
}

/// Everything authentication needs.
#[derive(Clone, Default)]
pub struct AuthConfig {
    pub api_keys: Vec<ApiKey>,
    pub jwt: Option<Arc<crate::jwt::JwtVerifier>>,
    pub cert_roles: Vec<CertRole>,
    pub open_health: bool,
    pub open_metrics: bool,
}

impl AuthConfig {
    /// True when any method is configured; otherwise the service is open.
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || self.jwt.is_some() || !self.cert_roles.is_empty()
    }

    fn open(&self) -> OpenEndpoints {
        OpenEndpoints {
            health: self.open_health,
            metrics: self.open_metrics,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No acceptable credentials.
    Unauthenticated,
    /// Authenticated, but the role is too low.
    Forbidden { needs: Role, has: Role },
}

/// Decides one request: the caller, or why not.
pub fn authenticate(
    cfg: &AuthConfig,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
    peer: Option<&PeerNames>,
) -> Result<Option<Principal>, Refusal> {
    if !cfg.enabled() {
        return Ok(Some(Principal {
            name: "anonymous".into(),
            role: Role::Admin,
        }));
    }
    let rule = rule(method, path, cfg.open()).unwrap_or(Rule::Needs(Role::Viewer));
    let principal = identify(cfg, headers, peer)?;
    match (rule, principal) {
        (Rule::Open, p) => Ok(p),
        (Rule::Needs(_), None) => Err(Refusal::Unauthenticated),
        (Rule::Needs(needs), Some(p)) if p.role < needs => {
            Err(Refusal::Forbidden { needs, has: p.role })
        }
        (Rule::Needs(_), Some(p)) => Ok(Some(p)),
    }
}

/// The caller's identity from its credentials: presented-but-wrong
/// credentials are a refusal even on open endpoints.
fn identify(
    cfg: &AuthConfig,
    headers: &HeaderMap,
    peer: Option<&PeerNames>,
) -> Result<Option<Principal>, Refusal> {
    if let Some(key) = headers.get("x-api-key") {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Every entry is compared, in constant time: no early exit tells an
        // attacker how far a guess got.
        let mut found = None;
        for k in &cfg.api_keys {
            if bool::from(k.sha256.ct_eq(&digest)) {
                found = Some(Principal {
                    name: format!("apikey:{}", k.name),
                    role: k.role,
                });
            }
        }
        return found.map(Some).ok_or(Refusal::Unauthenticated);
    }
    if let Some(auth) = headers.get(http::header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(Refusal::Unauthenticated)?;
        let jwt = cfg.jwt.as_ref().ok_or(Refusal::Unauthenticated)?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::Unauthenticated);
        }
        return jwt
            .verify(token)
            .map(Some)
            .map_err(|_| Refusal::Unauthenticated);
    }
    if let Some(peer) = peer {
        for c in &cfg.cert_roles {
            if peer.0.iter().any(|n| n == &c.name) {
                return Ok(Some(Principal {
                    name: format!("cert:{}", c.name),
                    role: c.role,
                }));
            }
        }
    }
    Ok(None)
}

/// At most `per_second` audit records of refused requests; the rest are
/// counted and reported with the next record written.
pub struct RefusalLog {
    per_second: u64,
    window: Mutex<(Instant, u64)>,
    suppressed: AtomicU64,
}

impl RefusalLog {
    pub fn new(per_second: u64) -> Self {
        Self {
            per_second,
            window: Mutex::new((Instant::now(), 0)),
            suppressed: AtomicU64::new(0),
        }
    }

    fn record(&self, path: &str, source: Option<SocketAddr>, refusal: &Refusal, cid: &str) {
        let allowed = match self.window.lock() {
            Ok(mut w) => {
                if w.0.elapsed() >= Duration::from_secs(1) {
                    *w = (Instant::now(), 0);
                }
                w.1 += 1;
                w.1 <= self.per_second
            }
            Err(_) => false,
        };
        if !allowed {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        let outcome = match refusal {
            Refusal::Unauthenticated => "unauthenticated".to_string(),
            Refusal::Forbidden { needs, has } => {
                format!(
                    "permission denied: needs {}, has {}",
                    needs.as_str(),
                    has.as_str()
                )
            }
        };
        tracing::warn!(
            target: "audit",
            operation = path,
            correlation_id = cid,
            source = %source.map(|s| s.to_string()).unwrap_or_default(),
            outcome = %outcome,
            suppressed_since_last = suppressed,
            "audit"
        );
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    cfg: Arc<AuthConfig>,
    log: Arc<RefusalLog>,
}

impl AuthLayer {
    pub fn new(cfg: Arc<AuthConfig>) -> Self {
        Self {
            cfg,
            log: Arc::new(RefusalLog::new(20)),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            cfg: self.cfg.clone(),
            log: self.log.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    cfg: Arc<AuthConfig>,
    log: Arc<RefusalLog>,
}

/// What the TLS handshake learnt (gRPC puts it in the extensions as is,
/// axum wrapped in `ConnectInfo`).
fn tls_info<B>(req: &Request<B>) -> Option<&crate::tls::TlsConnectInfo> {
    let ext = req.extensions();
    ext.get::<crate::tls::TlsConnectInfo>().or_else(|| {
        ext.get::<axum::extract::ConnectInfo<crate::tls::TlsConnectInfo>>()
            .map(|c| &c.0)
    })
}

/// The peer address a server put in the request's extensions.
fn source_of<B>(req: &Request<B>) -> Option<SocketAddr> {
    if let Some(c) = req
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
    {
        return c.remote_addr();
    }
    if let Some(c) = tls_info(req) {
        return c.remote;
    }
    req.extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

impl<S, B, RB> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: RefusalBody + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let source = source_of(&req);
        let peer = tls_info(&req).map(|c| c.peer_names.clone());
        let decided = authenticate(
            &self.cfg,
            req.method(),
            req.uri().path(),
            req.headers(),
            peer.as_ref(),
        );
        match decided {
            Ok(principal) => {
                let principal = principal.unwrap_or(Principal {
                    name: "anonymous".into(),
                    role: Role::Viewer,
                });
                let credential = if self.cfg.enabled() {
                    Credential::from_headers(req.headers())
                } else {
                    None
                };
                req.extensions_mut().insert(Caller {
                    principal,
                    source,
                    credential,
                });
                Box::pin(self.inner.call(req))
            }
            Err(refusal) => {
                let cid = req
                    .extensions()
                    .get::<crate::correlation::CorrelationId>()
                    .map(|c| c.0.clone())
                    .unwrap_or_default();
                self.log.record(req.uri().path(), source, &refusal, &cid);
                let grpc = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/grpc"));
                let resp = refusal_response::<RB>(&refusal, grpc, self.cfg.jwt.is_some());
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

fn message(r: &Refusal) -> String {
    match r {
        Refusal::Unauthenticated => "authentication required: send a valid bearer token (Authorization: Bearer ...), an API key (x-api-key) or a client certificate".into(),
        Refusal::Forbidden { needs, has } => format!(
            "this operation needs the {} role; the caller has {}",
            needs.as_str(),
            has.as_str()
        ),
    }
}

/// A response body a refusal can be written into (each server has its own
/// body type).
pub trait RefusalBody: Default {
    fn json(text: String) -> Self;
}

impl RefusalBody for axum::body::Body {
    fn json(text: String) -> Self {
        axum::body::Body::from(text)
    }
}

impl RefusalBody for tonic::body::Body {
    fn json(text: String) -> Self {
        tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(text)))
    }
}

/// The refusal as a gRPC trailers-only response or a JSON HTTP error.
fn refusal_response<RB: RefusalBody>(r: &Refusal, grpc: bool, bearer: bool) -> Response<RB> {
    let msg = message(r);
    let mut resp = if grpc {
        Response::new(RB::default())
    } else {
        let code = match r {
            Refusal::Unauthenticated => "UNAUTHENTICATED",
            Refusal::Forbidden { .. } => "PERMISSION_DENIED",
        };
        Response::new(RB::json(
            serde_json::json!({"code": code, "message": msg}).to_string(),
        ))
    };
    if !grpc {
        *resp.status_mut() = match r {
            Refusal::Unauthenticated => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden { .. } => StatusCode::FORBIDDEN,
        };
    }
    let h = resp.headers_mut();
    if grpc {
        let code = match r {
            Refusal::Unauthenticated => tonic::Code::Unauthenticated,
            Refusal::Forbidden { .. } => tonic::Code::PermissionDenied,
        };
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(code as i32));
        if let Ok(v) = HeaderValue::from_str(&msg) {
            h.insert("grpc-message", v);
        }
    } else {
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if matches!(r, Refusal::Unauthenticated) {
        let scheme = if bearer {
            "Bearer realm=\"workmanager\""
        } else {
            "ApiKey realm=\"workmanager\""
        };
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(scheme),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use prost::Message;

    const OPEN: OpenEndpoints = OpenEndpoints {
        health: true,
        metrics: true,
    };

    fn key_cfg() -> AuthConfig {
        let key = |name: &str, role| ApiKey {
            name: name.into(),
            sha256: Sha256::digest(format!("key-{name}").as_bytes()).into(),
            role,
        };
        AuthConfig {
            api_keys: vec![
                key("v", Role::Viewer),
                key("o", Role::Operator),
                key("a", Role::Admin),
            ],
            open_health: true,
            open_metrics: true,
            ..Default::default()
        }
    }

    fn with_key(k: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_str(k).unwrap());
        h
    }

    #[test]
    fn every_rpc_of_the_service_descriptor_has_a_rule() {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::DESCRIPTOR_SET).unwrap();
        let methods: Vec<String> = set
            .file
            .iter()
            .filter(|f| f.package() == "virtufin")
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == "WorkManager")
            .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
            .collect();
        assert!(methods.len() >= 20, "{methods:?}");
        for m in &methods {
            assert!(
                rule(&Method::POST, &format!("/virtufin.WorkManager/{m}"), OPEN).is_some(),
                "RPC {m} has no authorization rule in GRPC_METHODS"
            );
        }
        assert_eq!(
            methods.len(),
            GRPC_METHODS.len(),
            "a rule for an RPC that does not exist"
        );
    }

    #[test]
    fn every_rest_route_of_the_openapi_document_has_a_rule() {
        let doc = crate::openapi::document();
        let paths = doc["paths"].as_object().unwrap();
        let mut n = 0;
        for (path, ops) in paths {
            let concrete = path
                .replace("{id}", "w1")
                .replace("{key}", "k")
                .replace("{topic}", "t");
            for method in ops.as_object().unwrap().keys() {
                let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                assert!(
                    rule(&m, &concrete, OPEN).is_some(),
                    "{method} {path} has no rule"
                );
                n += 1;
            }
        }
        assert!(n >= 20, "{n} routes");
    }

    #[test]
    fn each_role_can_do_exactly_what_it_allows_on_every_rpc() {
        let cfg = key_cfg();
        for (method, needs) in GRPC_METHODS {
            let path = format!("/virtufin.WorkManager/{method}");
            for (key, role) in [
                ("key-v", Role::Viewer),
                ("key-o", Role::Operator),
                ("key-a", Role::Admin),
            ] {
                let got = authenticate(&cfg, &Method::POST, &path, &with_key(key), None);
                if role >= *needs {
                    assert_eq!(got.unwrap().unwrap().role, role, "{method} as {role:?}");
                } else {
                    assert_eq!(
                        got,
                        Err(Refusal::Forbidden {
                            needs: *needs,
                            has: role
                        }),
                        "{method}"
                    );
                }
            }
            assert_eq!(
                authenticate(&cfg, &Method::POST, &path, &HeaderMap::new(), None),
                Err(Refusal::Unauthenticated)
            );
            assert_eq!(
                authenticate(&cfg, &Method::POST, &path, &with_key("key-x"), None),
                Err(Refusal::Unauthenticated)
            );
        }
    }

    #[test]
    fn every_rest_route_needs_the_same_role_as_its_grpc_twin() {
        // The REST mirror calls the gRPC methods: their roles must not drift.
        let twins = [
            ("POST", "/v1/workers", "CreateWorker"),
            ("GET", "/v1/workers", "ListWorkers"),
            ("GET", "/v1/workers/w1", "GetWorker"),
            ("DELETE", "/v1/workers/w1", "DeleteWorker"),
            ("POST", "/v1/workers/w1/start", "StartWorker"),
            ("POST", "/v1/workers/w1/stop", "StopWorker"),
            ("POST", "/v1/workers/w1/invoke", "InvokeWorker"),
            ("PUT", "/v1/workers/w1/code", "LoadCode"),
            ("GET", "/v1/workers/w1/history", "GetWorkerHistory"),
            ("GET", "/v1/workers/w1/tags", "GetTags"),
            ("PUT", "/v1/workers/w1/tags", "SetTags"),
            ("GET", "/v1/workers/w1/tags/k", "GetTag"),
            ("PUT", "/v1/workers/w1/tags/k", "SetTag"),
            ("POST", "/v1/recover", "RecoverWorkers"),
            ("GET", "/v1/engines", "ListEngines"),
            ("POST", "/v1/topics/t", "Publish"),
            ("GET", "/v1/topics/t/events", "Subscribe"),
        ];
        let doc = crate::openapi::document();
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with("/v1/"))
            .map(|(_, ops)| ops.as_object().unwrap().len())
            .sum();
        assert_eq!(
            documented,
            twins.len(),
            "a /v1 route without a twin in this test"
        );
        let cfg = key_cfg();
        for (method, path, rpc) in twins {
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let grpc = format!("/virtufin.WorkManager/{rpc}");
            assert_eq!(
                rule(&m, path, OPEN),
                rule(&Method::POST, &grpc, OPEN),
                "{method} {path}"
            );
            // And each role gets the same answer on both.
            for key in ["key-v", "key-o", "key-a"] {
                assert_eq!(
                    authenticate(&cfg, &m, path, &with_key(key), None),
                    authenticate(&cfg, &Method::POST, &grpc, &with_key(key), None),
                    "{method} {path} with {key}"
                );
            }
        }
    }

    #[test]
    fn refusal_records_are_rate_limited_and_the_rest_counted() {
        let log = RefusalLog::new(3);
        for _ in 0..10 {
            log.record("/x", None, &Refusal::Unauthenticated, "c");
        }
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn health_and_metrics_are_open_unless_configured_and_bad_keys_are_refused_even_there() {
        let mut cfg = key_cfg();
        let get = Method::GET;
        assert_eq!(
            authenticate(&cfg, &get, "/health/ready", &HeaderMap::new(), None),
            Ok(None)
        );
        assert_eq!(
            authenticate(&cfg, &get, "/metrics", &HeaderMap::new(), None),
            Ok(None)
        );
        assert_eq!(
            authenticate(&cfg, &get, "/health", &with_key("wrong"), None),
            Err(Refusal::Unauthenticated)
        );
        cfg.open_metrics = false;
        assert_eq!(
            authenticate(&cfg, &get, "/metrics", &HeaderMap::new(), None),
            Err(Refusal::Unauthenticated)
        );
        // Unknown routes need a viewer: probes learn nothing.
        assert_eq!(
            authenticate(&cfg, &Method::POST, "/v1/nothing", &HeaderMap::new(), None),
            Err(Refusal::Unauthenticated)
        );
    }

    #[test]
    fn certificate_names_map_to_roles_only_when_listed() {
        let cfg = AuthConfig {
            cert_roles: vec![CertRole {
                name: "ci.client.test".into(),
                role: Role::Operator,
            }],
            ..Default::default()
        };
        let path = "/virtufin.WorkManager/StartWorker";
        let ok = PeerNames(vec!["ci.client.test".into()]);
        let p = authenticate(&cfg, &Method::POST, path, &HeaderMap::new(), Some(&ok)).unwrap();
        assert_eq!(p.unwrap().name, "cert:ci.client.test");
        let other = PeerNames(vec!["other.test".into()]);
        assert_eq!(
            authenticate(&cfg, &Method::POST, path, &HeaderMap::new(), Some(&other)),
            Err(Refusal::Unauthenticated)
        );
    }

    #[test]
    fn with_nothing_configured_everyone_is_anonymous_admin() {
        let cfg = AuthConfig::default();
        let p = authenticate(&cfg, &Method::POST, "/v1/workers", &HeaderMap::new(), None);
        assert_eq!(p.unwrap().unwrap().role, Role::Admin);
    }
}
