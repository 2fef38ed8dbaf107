//! Configuration, layered like .NET configuration: built-in defaults <
//! `appsettings.json` < environment variables < command-line flags.
//!
//! Every source is flattened into one case-insensitive map of `:`-separated
//! keys (JSON objects nest, arrays become `key:0`, `key:1`; env `A__B` is
//! `A:B`; the spec's flat env names are aliases). Typed settings are then read
//! from the map, and any malformed or out-of-range value is an error naming
//! the key, the value, where it came from and what is valid — never a silent
//! fallback to the default.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use workmanager_api::auth::{ApiKey, CertRole, Role};
use workmanager_api::jwt::JwtSettings;
use workmanager_api::tls::TlsFiles;
use workmanager_core::RecoverySettings;
use workmanager_fetch::{HostPattern, NamedCredential};

/// Flat environment names of the spec and the keys they stand for.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("ALLOWED_CODE_SOURCE_HOSTS", "AllowedCodeSourceHosts"),
    ("DOTNET_ENVIRONMENT", "Environment"),
    (
        "VIRTUFIN_REGISTRY_USER",
        "CodeSourceCredentials:virtufin:Username",
    ),
    (
        "VIRTUFIN_REGISTRY_TOKEN",
        "CodeSourceCredentials:virtufin:Token",
    ),
    (
        "VIRTUFIN_REGISTRY_HOSTS",
        "CodeSourceCredentials:virtufin:Hosts",
    ),
    ("PYTHON_EXECUTABLE", "Python:Executable"),
    ("PYTHON_BLOCKED_MODULES", "Python:BlockedModules"),
    ("PYTHON_ALLOWED_PACKAGES", "Python:AllowedPackages"),
    ("WORKER_RETRY_ATTEMPTS", "Worker:RetryAttempts"),
    ("WORKER_RETRY_BASE_DELAY_MS", "Worker:RetryBaseDelayMs"),
    ("WORKER_RECOVERY_ON_START", "Recovery:OnStart"),
    (
        "WORKER_RECOVERY_LEASE_TTL_SECONDS",
        "Recovery:LeaseTtlSeconds",
    ),
    (
        "WORKER_RECOVERY_ACQUIRE_TIMEOUT_SECONDS",
        "Recovery:AcquireTimeoutSeconds",
    ),
    (
        "WORKER_RECOVERY_CONNECTIVITY_TIMEOUT_SECONDS",
        "Recovery:ConnectivityTimeoutSeconds",
    ),
    ("DAPR_HTTP_PORT", "Dapr:HttpPort"),
    ("DAPR_GRPC_PORT", "Dapr:GrpcPort"),
    ("DAPR_API_TOKEN", "Dapr:ApiToken"),
    ("APP_API_TOKEN", "Dapr:AppApiToken"),
    ("DAPR_RETRY_ATTEMPTS", "Resilience:RetryAttempts"),
    ("DAPR_RETRY_BASE_DELAY_MS", "Resilience:RetryBaseDelayMs"),
    (
        "DAPR_CIRCUIT_BREAKER_THRESHOLD",
        "Resilience:CircuitBreakerThreshold",
    ),
    (
        "DAPR_CIRCUIT_BREAKER_DURATION_SECONDS",
        "Resilience:CircuitBreakerDurationSeconds",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    Embedded,
    Redis,
    Nats,
    Dapr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Embedded,
    Redis,
    Dapr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Typed settings. `Resilience:*` apply to the networked store and bus
/// (core resilience.rs).
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind_address: IpAddr,
    pub http_port: u16,
    pub grpc_port: u16,
    /// A `tracing` filter directive ("info", "warn", "off", ...).
    pub log_filter: String,
    pub log_format: LogFormat,
    /// `Environment` (`DOTNET_ENVIRONMENT`): anything but "Development" is
    /// production, where secrets are not read from appsettings.json and an
    /// empty host allow-list is warned about.
    pub production: bool,
    pub allowed_code_source_hosts: Vec<HostPattern>,
    pub allow_private_networks: bool,
    pub fetch_timeout: Duration,
    /// `CodeSource:ExtraRootCertificates`: PEM files trusted for code URLs
    /// besides the built-in roots (their contents).
    pub extra_root_pems: Vec<Vec<u8>>,
    /// `CodeSourceCredentials:<name>:{Username,Token,TokenFile,Hosts}`.
    pub code_source_credentials: HashMap<String, NamedCredential>,
    /// `Tls:CertificatePath`, `Tls:KeyPath`, `Tls:ClientCaPath`.
    pub tls: Option<TlsFiles>,
    /// `Tls:ReloadIntervalSeconds`: how often the TLS files are checked.
    pub tls_reload_interval: Duration,
    /// `Auth:*`.
    pub auth: AuthSettings,
    pub max_code_bytes: usize,
    pub python_executable: String,
    pub python_blocked_modules: Option<Vec<String>>,
    pub python_allowed_packages: Vec<String>,
    pub python_execution_timeout: Duration,
    pub python_sandbox: workmanager_engine_python::SandboxMode,
    pub python_max_result_bytes: usize,
    pub python_memory_limit_bytes: u64,
    pub python_cpu_limit_seconds: u64,
    pub python_log_lines_per_second: u32,
    pub python_ping_interval: Duration,
    pub worker_retry_attempts: u32,
    pub worker_retry_base_delay: Duration,
    pub recovery: RecoverySettings,
    pub resilience_retry_attempts: u32,
    pub resilience_retry_base_delay: Duration,
    pub circuit_breaker_threshold: u32,
    pub circuit_breaker_duration: Duration,
    /// `Resilience:BufferPath`: the file where a networked bus's publishes
    /// wait while its broker is down (default: `outbox.redb` beside
    /// `StateStore:Path`).
    pub buffer_path: PathBuf,
    pub state_store_path: PathBuf,
    /// `StateStore:Type`: embedded (default) or redis.
    pub state_store: StoreKind,
    /// `PubSub:Type`: embedded (default) or redis (Redis Streams).
    pub pubsub: BusKind,
    /// `Nats:Url` and credentials (`Nats:Token`, or `Nats:User` +
    /// `Nats:Password`; secret references welcome).
    pub nats_url: String,
    pub nats_token: Option<String>,
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    /// `Nats:NKeySeed` (a secret), `Nats:CredentialsFile`, `Nats:CaPath`,
    /// `Nats:ClientCertificatePath` + `Nats:ClientKeyPath`.
    pub nats_nkey_seed: Option<String>,
    pub nats_credentials_file: Option<PathBuf>,
    pub nats_ca: Option<PathBuf>,
    pub nats_client_certificate: Option<(PathBuf, PathBuf)>,
    /// `Nats:AckWaitSeconds`: redelivery of unacknowledged messages.
    pub nats_ack_wait: Duration,
    /// `Nats:MaxDeliver`: deliveries of one message at most.
    pub nats_max_deliver: i64,
    /// `Nats:StreamMaxMessages`: messages kept per topic stream.
    pub nats_stream_max_messages: i64,
    /// `Nats:DedupWindowSeconds`: a repeat of an event (source and id)
    /// published to a topic within this long is stored once (0: off).
    pub nats_dedup_window: Duration,
    /// `Redis:StreamMaxLen`: approximate length a topic stream is trimmed to.
    pub redis_stream_max_len: usize,
    /// `Redis:VisibilityTimeoutSeconds`: unacknowledged messages idle this
    /// long are taken over by a live consumer of the group.
    pub redis_visibility_timeout: Duration,
    /// `Redis:DedupWindowSeconds`: how long an event (source and id) is
    /// remembered per worker to drop duplicates (0: off). Each is a set
    /// member of at most 128 bytes (`CloudEvent::dedup_key`) for one to two
    /// windows: at 10,000 messages/s a 60 s window holds up to ~1,200,000.
    pub redis_dedup_window: Duration,
    /// `Redis:MaxDeliver`: deliveries of a message its consumers never
    /// settled before it goes to `{topic}-dead` (0: no bound).
    pub redis_max_deliver: u64,
    /// `Redis:Url` (`redis://[user:password@]host:port[/db]`, `rediss://` for
    /// TLS; the password usually as `secret:env:NAME` around the whole URL).
    pub redis_url: String,
    /// `Redis:CaPath`, `Redis:ClientCertificatePath` + `Redis:ClientKeyPath`:
    /// TLS material for a `rediss://` URL (read at start).
    pub redis_tls: Option<workmanager_backends::RedisTls>,
    /// `Redis:TimeoutMs`: connect and per-call timeout.
    pub redis_timeout: Duration,
    pub instance_id: String,
    /// Dapr mode: the sidecar (`Dapr:HttpPort`, `DAPR_HTTP_PORT`), its API
    /// token (`DAPR_API_TOKEN`), the token it must show us (`APP_API_TOKEN`),
    /// component names (`stateStoreName`, `pubsubName`) and topics declared
    /// beyond those of running workers (`Dapr:Topics`).
    pub dapr: DaprConfig,
    /// `Instance:HeartbeatIntervalSeconds` (10) and `Instance:StaleAfterSeconds`
    /// (60, at least twice the interval): see core ownership.rs.
    pub heartbeat_interval: Duration,
    pub stale_after: Duration,
    /// `Instance:AdvertisedGrpcEndpoint`: where peers forward worker-scoped
    /// requests to this instance. Empty: derived from the bound gRPC address
    /// at start (`BindAddress`, or `HOSTNAME` when bound to all interfaces).
    pub advertised_endpoint: Option<String>,
    /// `Instance:PeerCaPath`: CA bundle that signs the peers' server
    /// certificates when forwarding over TLS (default: `Tls:ClientCaPath`).
    pub peer_ca: Option<PathBuf>,
    /// `Shutdown:DrainTimeoutSeconds`: how long requests in flight may run on
    /// after SIGTERM (and a stopping worker may finish its queued messages).
    pub drain_timeout: Duration,
    /// `Messaging:QueueCapacity`: messages a worker may have waiting.
    pub queue_capacity: usize,
    /// `Messaging:PublishTimeoutMs`: how long a publisher waits for room.
    pub publish_timeout: Duration,
    /// `Messaging:MaxEventBytes`: largest event accepted over HTTP.
    pub max_event_bytes: usize,
}

#[derive(Clone, Default)]
pub struct DaprConfig {
    pub http_port: u16,
    pub api_token: Option<String>,
    pub app_token: Option<String>,
    pub state_store: String,
    pub pubsub: String,
    pub topics: Vec<String>,
}

impl std::fmt::Debug for DaprConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaprConfig")
            .field("http_port", &self.http_port)
            .field("api_token", &self.api_token.as_ref().map(|_| "***"))
            .field("app_token", &self.app_token.as_ref().map(|_| "***"))
            .field("state_store", &self.state_store)
            .field("pubsub", &self.pubsub)
            .field("topics", &self.topics)
            .finish()
    }
}

/// Authentication settings (`Auth:*`).
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// `Auth:ApiKeys:<name>:Sha256` (hex) and `:Role`.
    pub api_keys: Vec<ApiKey>,
    /// `Auth:Jwt:*`.
    pub jwt: Option<JwtSettings>,
    /// `Auth:Certificates:<label>:Name` (a DNS SAN of the client
    /// certificate) and `:Role`.
    pub cert_roles: Vec<CertRole>,
    /// `Auth:OpenHealth`, `Auth:OpenMetrics` (both true).
    pub open_health: bool,
    pub open_metrics: bool,
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
struct Entry {
    /// The key as written in its source (for messages).
    key: String,
    value: String,
    origin: String,
    /// From a configuration file (where secrets must not be in production).
    from_file: bool,
    /// Resolved from a `secret:` reference: never printed.
    secret: bool,
}

/// The merged, flattened configuration.
#[derive(Debug, Default)]
pub struct Layers {
    map: BTreeMap<String, Entry>,
}

impl Layers {
    fn set(&mut self, key: &str, value: String, origin: String) {
        self.set_from(key, value, origin, false);
    }

    fn set_from(&mut self, key: &str, value: String, origin: String, from_file: bool) {
        let norm = key.to_ascii_lowercase();
        // A scalar replaces an array from a lower layer and vice versa.
        let prefix = format!("{norm}:");
        self.map.retain(|k, _| !k.starts_with(&prefix));
        self.map.insert(
            norm,
            Entry {
                key: key.to_string(),
                value,
                origin,
                from_file,
                secret: false,
            },
        );
    }

    /// Adds `appsettings.json` (or another JSON file).
    pub fn add_json_file(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read configuration file {}: {e}", path.display()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "configuration file {} is not valid JSON: {e}",
                path.display()
            )
        })?;
        let origin = format!("{}", path.display());
        let mut flat = Vec::new();
        flatten("", &value, &mut flat);
        for (k, v) in flat {
            self.set_from(&k, v, origin.clone(), true);
        }
        Ok(())
    }

    /// Adds environment variables: aliases first, then `A__B` names.
    pub fn add_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        for (name, value) in &vars {
            if let Some((_, key)) = ENV_ALIASES
                .iter()
                .find(|(alias, _)| alias.eq_ignore_ascii_case(name))
            {
                self.set(key, value.clone(), format!("environment variable {name}"));
            }
        }
        for (name, value) in &vars {
            if ENV_ALIASES
                .iter()
                .any(|(alias, _)| alias.eq_ignore_ascii_case(name))
            {
                continue;
            }
            self.set(
                &name.replace("__", ":"),
                value.clone(),
                format!("environment variable {name}"),
            );
        }
    }

    /// Adds a command-line value.
    pub fn add_flag(&mut self, key: &str, value: String) {
        self.set(key, value, "the command line".into());
    }

    fn get(&self, key: &str) -> Option<&Entry> {
        self.map.get(&key.to_ascii_lowercase())
    }

    /// The distinct names directly below `prefix` (`A:<name>:...`), as first
    /// written.
    fn children(&self, prefix: &str) -> Vec<String> {
        let p = format!("{}:", prefix.to_ascii_lowercase());
        let mut names: Vec<String> = Vec::new();
        for (k, e) in &self.map {
            if let Some(rest) = k.strip_prefix(&p) {
                let n = rest.split(':').next().unwrap_or_default();
                let written = e.key.get(p.len()..p.len() + n.len()).unwrap_or(n);
                if !n.is_empty() && !names.iter().any(|m| m.eq_ignore_ascii_case(n)) {
                    names.push(written.to_string());
                }
            }
        }
        names
    }

    /// A list: a JSON array (`key:0`, `key:1`, ...) or a comma-separated string.
    fn list(&self, key: &str) -> Option<Vec<String>> {
        if let Some(e) = self.get(key) {
            return Some(split_list(&e.value));
        }
        let prefix = format!("{}:", key.to_ascii_lowercase());
        let mut items: Vec<(usize, String)> = self
            .map
            .iter()
            .filter_map(|(k, e)| {
                k.strip_prefix(&prefix)?
                    .parse::<usize>()
                    .ok()
                    .map(|i| (i, e.value.clone()))
            })
            .collect();
        if items.is_empty() {
            return None;
        }
        items.sort();
        Some(
            items
                .into_iter()
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect(),
        )
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
        .collect()
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}:{k}")
        }
    };
    match v {
        Value::Object(m) => m.iter().for_each(|(k, v)| flatten(&join(k), v, out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| flatten(&join(&i.to_string()), v, out)),
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        Value::Null => out.push((prefix.to_string(), String::new())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// Reads typed values, collecting every error so one start-up shows them all.
struct Reader<'a> {
    layers: &'a Layers,
    errors: Vec<String>,
}

impl Reader<'_> {
    fn fail(&mut self, e: &Entry, valid: &str) {
        let value = if e.secret {
            "(a secret)".to_string()
        } else {
            format!("{:?}", e.value)
        };
        self.errors.push(format!(
            "invalid configuration: {} = {value} (from {}): {valid}",
            e.key, e.origin
        ));
    }

    fn string(&mut self, key: &str, default: &str) -> String {
        match self.layers.get(key) {
            Some(e) if e.value.trim().is_empty() => {
                let e = e.clone();
                self.fail(&e, "must not be empty");
                default.to_string()
            }
            Some(e) => e.value.trim().to_string(),
            None => default.to_string(),
        }
    }

    fn role(&mut self, key: &str) -> Option<Role> {
        let e = self.layers.get(key).cloned()?;
        let role = Role::parse(&e.value);
        if role.is_none() {
            self.fail(&e, "must be viewer, operator or admin");
        }
        role
    }

    fn auth(&mut self) -> AuthSettings {
        let mut a = AuthSettings {
            open_health: self.bool("Auth:OpenHealth", true),
            open_metrics: self.bool("Auth:OpenMetrics", true),
            ..Default::default()
        };
        for name in self.layers.children("Auth:ApiKeys") {
            let key = |f: &str| format!("Auth:ApiKeys:{name}:{f}");
            let sha = self.layers.get(&key("Sha256")).cloned();
            let digest = sha.as_ref().and_then(|e| {
                hex::decode(e.value.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
            });
            match (digest, self.role(&key("Role"))) {
                (Some(sha256), Some(role)) => a.api_keys.push(ApiKey {
                    name: name.clone(),
                    sha256,
                    role,
                }),
                (None, _) => self.errors.push(format!(
                    "invalid configuration: {} must be the SHA-256 (64 hex digits) of the key; \
                     e.g. printf %s \"$KEY\" | sha256sum",
                    key("Sha256")
                )),
                (_, None) => self.errors.push(format!(
                    "invalid configuration: {} must be viewer, operator or admin",
                    key("Role")
                )),
            }
        }
        for label in self.layers.children("Auth:Certificates") {
            let key = |f: &str| format!("Auth:Certificates:{label}:{f}");
            let name = self
                .layers
                .get(&key("Name"))
                .map(|e| e.value.trim().to_string());
            match (name, self.role(&key("Role"))) {
                (Some(name), Some(role)) if !name.is_empty() => {
                    a.cert_roles.push(CertRole { name, role })
                }
                _ => self.errors.push(format!(
                    "invalid configuration: {} and {} must both be set",
                    key("Name"),
                    key("Role")
                )),
            }
        }
        if let Some(alg) = self.layers.get("Auth:Jwt:Algorithm").cloned() {
            let text = |r: &mut Self, k: &str| r.layers.get(k).map(|e| e.value.trim().to_string());
            let public_key_pem = self.files("Auth:Jwt:PublicKeyPath").into_iter().next();
            let jwks_json = self.files("Auth:Jwt:JwksPath").into_iter().next();
            a.jwt = Some(JwtSettings {
                algorithm: alg.value.trim().to_string(),
                secret: text(self, "Auth:Jwt:Secret"),
                public_key_pem,
                jwks_json,
                issuer: text(self, "Auth:Jwt:Issuer"),
                audience: text(self, "Auth:Jwt:Audience"),
                role_claim: text(self, "Auth:Jwt:RoleClaim").unwrap_or_else(|| "roles".into()),
                leeway_seconds: self.int("Auth:Jwt:LeewaySeconds", 30, 0, 300),
            });
            if let Some(e) = self.layers.get("Auth:Jwt:Secret").cloned() {
                if e.from_file && !e.secret {
                    self.errors.push(format!(
                        "invalid configuration: Auth:Jwt:Secret is a secret and is not read from {}; \
                         use secret:env:NAME or secret:file:/path",
                        e.origin
                    ));
                }
            }
        }
        a
    }

    /// A host allow-list (`host.example`, `*.example`).
    fn hosts(&mut self, key: &str) -> Vec<HostPattern> {
        let mut out = Vec::new();
        for h in self.layers.list(key).unwrap_or_default() {
            match HostPattern::parse(&h) {
                Ok(p) => out.push(p),
                Err(why) => self
                    .errors
                    .push(format!("invalid configuration: {key}: {why}")),
            }
        }
        out
    }

    /// The contents of the files a list key names.
    fn files(&mut self, key: &str) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for path in self.layers.list(key).unwrap_or_default() {
            match std::fs::read(&path) {
                Ok(b) => out.push(b),
                Err(e) => self.errors.push(format!(
                    "invalid configuration: {key}: cannot read {path}: {e}"
                )),
            }
        }
        out
    }

    /// A secret setting: not read from appsettings.json in production
    /// (use the environment, `secret:env:` or `secret:file:`).
    fn secret_value(&mut self, key: &str, production: bool) -> Option<String> {
        let e = self.layers.get(key)?.clone();
        if e.from_file && !e.secret && production {
            self.errors.push(format!(
                "invalid configuration: {} is a secret and is not read from {} in production; \
                 set it in the environment or as secret:env:NAME / secret:file:/path",
                e.key, e.origin
            ));
            return None;
        }
        Some(e.value.trim().to_string()).filter(|v| !v.is_empty())
    }

    /// Named code-source credentials. A token is a secret: in production it
    /// comes from the environment or a `TokenFile`, never from
    /// appsettings.json.
    fn credentials(&mut self, production: bool) -> HashMap<String, NamedCredential> {
        let mut out = HashMap::new();
        for name in self.layers.children("CodeSourceCredentials") {
            let key = |field: &str| format!("CodeSourceCredentials:{name}:{field}");
            let token = match (
                self.layers.get(&key("Token")).cloned(),
                self.layers.get(&key("TokenFile")).cloned(),
            ) {
                (Some(t), _) if t.from_file && !t.secret && production => {
                    self.errors.push(format!(
                        "invalid configuration: {} is a secret and is not read from {} in production; \
                         set it in the environment (CodeSourceCredentials__{name}__Token) or name a secret \
                         file in {}",
                        t.key,
                        t.origin,
                        key("TokenFile")
                    ));
                    continue;
                }
                (Some(t), _) if !t.value.trim().is_empty() => t.value.trim().to_string(),
                (_, Some(f)) => match std::fs::read_to_string(f.value.trim()) {
                    Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
                    Ok(_) => {
                        self.fail(&f, "the file is empty");
                        continue;
                    }
                    Err(e) => {
                        self.fail(&f, &format!("cannot read the file: {e}"));
                        continue;
                    }
                },
                _ => {
                    self.errors.push(format!(
                        "invalid configuration: credential {name:?} has no {} (or {})",
                        key("Token"),
                        key("TokenFile")
                    ));
                    continue;
                }
            };
            let username = self
                .layers
                .get(&key("Username"))
                .map(|e| e.value.trim().to_string())
                .filter(|u| !u.is_empty());
            let hosts = self.hosts(&key("Hosts"));
            out.insert(
                name.clone(),
                NamedCredential {
                    username,
                    token,
                    hosts,
                },
            );
        }
        out
    }

    fn int(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        let Some(e) = self.layers.get(key).cloned() else {
            return default;
        };
        match e.value.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                self.fail(&e, &format!("must be a whole number from {min} to {max}"));
                default
            }
        }
    }

    fn bool(&mut self, key: &str, default: bool) -> bool {
        let Some(e) = self.layers.get(key).cloned() else {
            return default;
        };
        match e.value.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => {
                self.fail(&e, "must be one of true/false/1/0/yes/no/on/off");
                default
            }
        }
    }

    fn choice<T: Copy>(&mut self, key: &str, default: T, options: &[(&str, T)]) -> T {
        let Some(e) = self.layers.get(key).cloned() else {
            return default;
        };
        match options
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(e.value.trim()))
        {
            Some((_, v)) => *v,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.fail(&e, &format!("must be one of {}", names.join(", ")));
                default
            }
        }
    }
}

/// Resolves `secret:env:NAME` and `secret:file:/path` references in place:
/// any value may be one, so passwords and keys live in the environment or
/// in mounted files (Kubernetes secrets), never in appsettings.json. Errors
/// name the key and the reference, never a secret value.
impl Layers {
    fn resolve_secrets(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for e in self.map.values_mut() {
            let Some(reference) = e.value.strip_prefix("secret:") else {
                continue;
            };
            let resolved = resolve_local_secret(reference);
            match resolved {
                Ok(v) => {
                    e.value = v;
                    e.secret = true;
                }
                Err(why) => errors.push(format!(
                    "invalid configuration: {} = {:?} (from {}): {why}",
                    e.key, e.value, e.origin
                )),
            }
        }
        errors
    }
}

/// A `secret:env:NAME` or `secret:file:/path` reference (without the
/// `secret:` prefix), read now.
fn resolve_local_secret(reference: &str) -> Result<String, String> {
    if let Some(name) = reference.strip_prefix("env:") {
        std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
    } else if let Some(path) = reference.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map(|v| v.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|err| format!("cannot read {path}: {err}"))
    } else {
        Err("use secret:env:NAME, secret:file:/path or secret:dapr:<store>/<name>".to_string())
    }
}

/// Resolves `secret:dapr:<store>/<name>[/<key>]` references through the
/// Dapr sidecar's secrets API (the seed's `DaprClient.GetSecretAsync`),
/// before the other references. The sidecar is `Dapr:HttpPort` with
/// `DAPR_API_TOKEN`.
pub async fn resolve_dapr_secrets(layers: &mut Layers) -> Vec<String> {
    let wanted: Vec<String> = layers
        .map
        .iter()
        .filter(|(_, e)| e.value.starts_with("secret:dapr:"))
        .map(|(k, _)| k.clone())
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let port = layers
        .get("Dapr:HttpPort")
        .and_then(|e| e.value.trim().parse::<u16>().ok())
        .unwrap_or(3500);
    // The sidecar's own token may itself be a local reference (not a Dapr one).
    let token = layers
        .get("Dapr:ApiToken")
        .and_then(|e| match e.value.strip_prefix("secret:") {
            Some(reference) => resolve_local_secret(reference).ok(),
            None => Some(e.value.trim().to_string()),
        });
    let client = match workmanager_backends::DaprClient::new(workmanager_backends::DaprSettings {
        base_url: format!("http://127.0.0.1:{port}"),
        api_token: token,
        state_store: String::new(),
        pubsub: String::new(),
        timeout: Duration::from_secs(5),
    }) {
        Ok(c) => c,
        Err(e) => return vec![e],
    };
    let mut errors = Vec::new();
    for key in wanted {
        let Some(e) = layers.map.get_mut(&key) else {
            continue;
        };
        let reference = e.value.trim_start_matches("secret:dapr:").to_string();
        let mut parts = reference.splitn(3, '/');
        let (Some(store), Some(name)) = (parts.next(), parts.next()) else {
            errors.push(format!(
                "invalid configuration: {} = {:?}: use secret:dapr:<secret store>/<secret name>[/<key>]",
                e.key, e.value
            ));
            continue;
        };
        match client.secret(store, name, parts.next()).await {
            Ok(v) => {
                e.value = v;
                e.secret = true;
            }
            Err(why) => errors.push(format!(
                "invalid configuration: {} (from {}): {why}",
                e.key, e.origin
            )),
        }
    }
    errors
}

pub fn settings(layers: &Layers) -> Result<Settings, Vec<String>> {
    let mut resolved = Layers {
        map: layers.map.clone(),
    };
    let secret_errors = resolved.resolve_secrets();
    let layers = &resolved;
    let mut r = Reader {
        layers,
        errors: secret_errors,
    };
    let bind_text = r.string("BindAddress", "127.0.0.1");
    let bind_address = match bind_text.parse::<IpAddr>() {
        Ok(a) => a,
        Err(_) => {
            if let Some(e) = layers.get("BindAddress").cloned() {
                r.fail(&e, "must be an IP address such as 127.0.0.1, 0.0.0.0 or ::");
            }
            IpAddr::from([127, 0, 0, 1])
        }
    };
    let http_port = r.int("HttpPort", 25001, 0, 65535) as u16;
    let grpc_port = r.int("GrpcPort", 25002, 0, 65535) as u16;
    let log_filter = r
        .choice(
            "Logging:LogLevel:Default",
            "info",
            &[
                ("Trace", "trace"),
                ("Debug", "debug"),
                ("Information", "info"),
                ("Warning", "warn"),
                ("Error", "error"),
                ("Critical", "error"),
                ("None", "off"),
            ],
        )
        .to_string();
    let log_format = r.choice(
        "Logging:Format",
        LogFormat::Json,
        &[("json", LogFormat::Json), ("text", LogFormat::Text)],
    );
    let environment = r.string("Environment", "Production");
    let production = !environment.eq_ignore_ascii_case("Development");
    let allowed_code_source_hosts = r.hosts("AllowedCodeSourceHosts");
    let extra_root_pems = r.files("CodeSource:ExtraRootCertificates");
    let code_source_credentials = r.credentials(production);
    let tls = match (
        layers.get("Tls:CertificatePath").cloned(),
        layers.get("Tls:KeyPath").cloned(),
    ) {
        (Some(c), Some(k)) => Some(TlsFiles {
            certificate: PathBuf::from(c.value.trim()),
            key: PathBuf::from(k.value.trim()),
            client_ca: layers
                .get("Tls:ClientCaPath")
                .map(|e| PathBuf::from(e.value.trim())),
        }),
        (None, None) => {
            if let Some(e) = layers.get("Tls:ClientCaPath").cloned() {
                r.fail(&e, "needs Tls:CertificatePath and Tls:KeyPath as well");
            }
            None
        }
        (Some(e), None) | (None, Some(e)) => {
            r.fail(
                &e,
                "Tls:CertificatePath and Tls:KeyPath go together; set both",
            );
            None
        }
    };
    let tls_reload_interval = Duration::from_secs(r.int("Tls:ReloadIntervalSeconds", 10, 1, 3600));
    let auth = r.auth();
    let allow_private_networks = r.bool("CodeSource:AllowPrivateNetworks", false);
    let fetch_timeout = Duration::from_secs(r.int("CodeSource:FetchTimeoutSeconds", 30, 1, 600));
    let max_code_bytes = r.int(
        "CodeSource:MaxBytes",
        16 * 1024 * 1024,
        1,
        256 * 1024 * 1024,
    ) as usize;
    let python_executable = r.string("Python:Executable", "python3");
    let python_blocked_modules = layers.list("Python:BlockedModules");
    let python_allowed_packages = layers.list("Python:AllowedPackages").unwrap_or_default();
    let python_execution_timeout =
        Duration::from_secs(r.int("Python:ExecutionTimeoutSeconds", 30, 1, 3600));
    let python_ping_interval =
        Duration::from_secs(r.int("Python:PingIntervalSeconds", 10, 1, 3600));
    let python_sandbox = {
        use workmanager_engine_python::SandboxMode as M;
        r.choice(
            "Python:Sandbox",
            M::Standard,
            &[
                ("strict", M::Strict),
                ("standard", M::Standard),
                ("off", M::Off),
            ],
        )
    };
    let python_max_result_bytes = r.int(
        "Python:MaxResultBytes",
        4 * 1024 * 1024,
        1024,
        256 * 1024 * 1024,
    ) as usize;
    let python_memory_limit_bytes =
        r.int("Python:MemoryLimitMb", 1024, 64, 1024 * 1024) * 1024 * 1024;
    let python_cpu_limit_seconds = r.int("Python:CpuLimitSeconds", 3600, 1, 31_536_000);
    let python_log_lines_per_second = r.int("Python:LogLinesPerSecond", 50, 1, 100_000) as u32;
    let worker_retry_attempts = r.int("Worker:RetryAttempts", 3, 0, 20) as u32;
    let worker_retry_base_delay =
        Duration::from_millis(r.int("Worker:RetryBaseDelayMs", 200, 1, 60_000));
    let recovery = RecoverySettings {
        on_start: r.bool("Recovery:OnStart", true),
        lease_ttl: Duration::from_secs(r.int("Recovery:LeaseTtlSeconds", 300, 10, 86_400)),
        acquire_timeout: Duration::from_secs(r.int("Recovery:AcquireTimeoutSeconds", 30, 1, 600)),
        connectivity_timeout: Duration::from_secs(r.int(
            "Recovery:ConnectivityTimeoutSeconds",
            120,
            1,
            3600,
        )),
    };
    let resilience_retry_attempts = r.int("Resilience:RetryAttempts", 3, 0, 20) as u32;
    let resilience_retry_base_delay =
        Duration::from_millis(r.int("Resilience:RetryBaseDelayMs", 200, 10, 60_000));
    let circuit_breaker_threshold = r.int("Resilience:CircuitBreakerThreshold", 5, 1, 1000) as u32;
    let circuit_breaker_duration =
        Duration::from_secs(r.int("Resilience:CircuitBreakerDurationSeconds", 30, 1, 3600));
    // Only the embedded backends exist in this build; say so instead of
    // pretending to connect somewhere.
    let state_store = r.choice(
        "StateStore:Type",
        StoreKind::Embedded,
        &[
            ("embedded", StoreKind::Embedded),
            ("redis", StoreKind::Redis),
            ("dapr", StoreKind::Dapr),
        ],
    );
    let mut redis_url = r.string("Redis:Url", "redis://127.0.0.1:6379");
    // User and password may come separately (each possibly a secret reference).
    let user = layers.get("Redis:User").map(|e| e.value.trim().to_string());
    let password = layers
        .get("Redis:Password")
        .map(|e| e.value.trim().to_string());
    if user.is_some() || password.is_some() {
        match url::Url::parse(&redis_url) {
            Ok(mut u) => {
                if let Some(user) = &user {
                    let _ = u.set_username(user);
                }
                if let Some(p) = &password {
                    let _ = u.set_password(Some(p));
                }
                redis_url = u.to_string();
            }
            Err(e) => r.errors.push(format!(
                "invalid configuration: Redis:Url is not a URL: {e}"
            )),
        }
    }
    let redis_timeout = Duration::from_millis(r.int("Redis:TimeoutMs", 2000, 50, 60_000));
    let pubsub = r.choice(
        "PubSub:Type",
        BusKind::Embedded,
        &[
            ("embedded", BusKind::Embedded),
            ("redis", BusKind::Redis),
            ("nats", BusKind::Nats),
            ("dapr", BusKind::Dapr),
        ],
    );
    let nats_url = r.string("Nats:Url", "nats://127.0.0.1:4222");
    let nats_token = layers.get("Nats:Token").map(|e| e.value.trim().to_string());
    let nats_user = layers.get("Nats:User").map(|e| e.value.trim().to_string());
    let nats_password = layers
        .get("Nats:Password")
        .map(|e| e.value.trim().to_string());
    let nats_nkey_seed = r.secret_value("Nats:NKeySeed", production);
    let path_of = |key: &str| layers.get(key).map(|e| PathBuf::from(e.value.trim()));
    let nats_credentials_file = path_of("Nats:CredentialsFile");
    let nats_ca = path_of("Nats:CaPath");
    let nats_client_certificate = match (
        layers.get("Nats:ClientCertificatePath").cloned(),
        layers.get("Nats:ClientKeyPath").cloned(),
    ) {
        (Some(c), Some(k)) => Some((PathBuf::from(c.value.trim()), PathBuf::from(k.value.trim()))),
        (None, None) => None,
        (Some(e), None) | (None, Some(e)) => {
            r.fail(
                &e,
                "Nats:ClientCertificatePath and Nats:ClientKeyPath go together; set both",
            );
            None
        }
    };
    let nats_ack_wait = Duration::from_secs(r.int("Nats:AckWaitSeconds", 60, 1, 86_400));
    let nats_max_deliver = r.int("Nats:MaxDeliver", 10, 1, 1000) as i64;
    let nats_stream_max_messages =
        r.int("Nats:StreamMaxMessages", 1_000_000, 1000, 1_000_000_000) as i64;
    let nats_dedup_window = Duration::from_secs(r.int("Nats:DedupWindowSeconds", 600, 0, 604_800));
    let redis_stream_max_len = r.int("Redis:StreamMaxLen", 1_000_000, 1000, 1_000_000_000) as usize;
    let redis_visibility_timeout =
        Duration::from_secs(r.int("Redis:VisibilityTimeoutSeconds", 60, 1, 86_400));
    let redis_dedup_window =
        Duration::from_secs(r.int("Redis:DedupWindowSeconds", 600, 0, 604_800));
    let redis_max_deliver = r.int("Redis:MaxDeliver", 10, 0, 1_000_000);
    let redis_ca = r.files("Redis:CaPath").into_iter().next();
    let redis_client = match (
        r.files("Redis:ClientCertificatePath").into_iter().next(),
        r.files("Redis:ClientKeyPath").into_iter().next(),
    ) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            r.errors.push(
                "invalid configuration: Redis:ClientCertificatePath and Redis:ClientKeyPath go together; set both"
                    .into(),
            );
            None
        }
    };
    let redis_tls =
        (redis_ca.is_some() || redis_client.is_some()).then_some(workmanager_backends::RedisTls {
            ca_pem: redis_ca,
            client: redis_client,
        });
    let state_store_path = PathBuf::from(r.string("StateStore:Path", "./data/state.redb"));
    let beside_state = state_store_path.with_file_name("outbox.redb");
    let buffer_path =
        PathBuf::from(r.string("Resilience:BufferPath", &beside_state.to_string_lossy()));
    let drain_timeout = Duration::from_secs(r.int("Shutdown:DrainTimeoutSeconds", 30, 0, 3600));
    let queue_capacity = r.int("Messaging:QueueCapacity", 1024, 1, 1_000_000) as usize;
    let publish_timeout =
        Duration::from_millis(r.int("Messaging:PublishTimeoutMs", 2000, 0, 60_000));
    let max_event_bytes = r.int(
        "Messaging:MaxEventBytes",
        1024 * 1024,
        1024,
        64 * 1024 * 1024,
    ) as usize;
    let dapr = DaprConfig {
        http_port: r.int("Dapr:HttpPort", 3500, 1, 65535) as u16,
        api_token: r.secret_value("Dapr:ApiToken", production),
        app_token: r.secret_value("Dapr:AppApiToken", production),
        state_store: r.string("stateStoreName", "statestore"),
        pubsub: r.string("pubsubName", "pubsub"),
        topics: layers.list("Dapr:Topics").unwrap_or_default(),
    };
    let _ = r.int("Dapr:GrpcPort", 50001, 1, 65535);
    let heartbeat_interval =
        Duration::from_secs(r.int("Instance:HeartbeatIntervalSeconds", 10, 1, 300));
    let stale_after = Duration::from_secs(r.int("Instance:StaleAfterSeconds", 60, 2, 3600));
    if stale_after < heartbeat_interval * 2 {
        if let Some(e) = layers.get("Instance:StaleAfterSeconds").cloned() {
            r.fail(
                &e,
                "must be at least twice Instance:HeartbeatIntervalSeconds, or a live instance looks gone",
            );
        }
    }
    let advertised_endpoint = match layers.get("Instance:AdvertisedGrpcEndpoint").cloned() {
        Some(e) if !e.value.trim().is_empty() => {
            let v = e.value.trim().trim_end_matches('/').to_string();
            match url::Url::parse(&v) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(v),
                _ => {
                    r.fail(&e, "must be an http:// or https:// URL with a host and port, e.g. https://wm-0.wm:25002");
                    None
                }
            }
        }
        _ => None,
    };
    let peer_ca = layers
        .get("Instance:PeerCaPath")
        .map(|e| PathBuf::from(e.value.trim()));
    let instance_id = match layers.get("HOSTNAME") {
        Some(e) if !e.value.trim().is_empty() => e.value.trim().to_string(),
        _ => uuid::Uuid::new_v4().to_string(),
    };
    if r.errors.is_empty() {
        Ok(Settings {
            bind_address,
            http_port,
            grpc_port,
            log_filter,
            log_format,
            production,
            allowed_code_source_hosts,
            allow_private_networks,
            fetch_timeout,
            extra_root_pems,
            code_source_credentials,
            tls,
            tls_reload_interval,
            auth,
            max_code_bytes,
            python_executable,
            python_blocked_modules,
            python_allowed_packages,
            python_execution_timeout,
            python_sandbox,
            python_max_result_bytes,
            python_memory_limit_bytes,
            python_cpu_limit_seconds,
            python_log_lines_per_second,
            python_ping_interval,
            worker_retry_attempts,
            worker_retry_base_delay,
            recovery,
            resilience_retry_attempts,
            resilience_retry_base_delay,
            circuit_breaker_threshold,
            circuit_breaker_duration,
            state_store_path,
            buffer_path,
            state_store,
            pubsub,
            nats_url,
            nats_token,
            nats_user,
            nats_password,
            nats_nkey_seed,
            nats_credentials_file,
            nats_ca,
            nats_client_certificate,
            nats_ack_wait,
            nats_max_deliver,
            nats_stream_max_messages,
            nats_dedup_window,
            redis_stream_max_len,
            redis_visibility_timeout,
            redis_dedup_window,
            redis_max_deliver,
            redis_url,
            redis_tls,
            redis_timeout,
            instance_id,
            dapr,
            heartbeat_interval,
            stale_after,
            advertised_endpoint,
            peer_ca,
            drain_timeout,
            queue_capacity,
            publish_timeout,
            max_event_bytes,
        })
    } else {
        Err(r.errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_with_no_sources() {
        let s = settings(&Layers::default()).unwrap();
        assert_eq!((s.http_port, s.grpc_port), (25001, 25002));
        assert_eq!(s.bind_address.to_string(), "127.0.0.1");
        assert_eq!(s.max_code_bytes, 16 * 1024 * 1024);
        assert!(s.recovery.on_start);
        assert_eq!(s.log_filter, "info");
    }

    #[test]
    fn later_layers_win_and_keys_are_case_insensitive() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("appsettings.json");
        std::fs::write(
            &file,
            r#"{"HttpPort": 1000, "GrpcPort": 2000, "Logging": {"LogLevel": {"Default": "Warning"}},
                "AllowedCodeSourceHosts": ["a.example", "*.b.example"], "Recovery": {"OnStart": false}}"#,
        )
        .unwrap();
        let mut l = Layers::default();
        l.add_json_file(&file).unwrap();
        l.add_env(env(&[
            ("httpport", "1001"),
            ("Logging__LogLevel__Default", "Debug"),
            ("WORKER_RECOVERY_ON_START", "yes"),
        ]));
        l.add_flag("HttpPort", "1002".into());
        let s = settings(&l).unwrap();
        assert_eq!(s.http_port, 1002);
        assert_eq!(s.grpc_port, 2000);
        assert_eq!(s.log_filter, "debug");
        assert!(s.recovery.on_start);
        assert_eq!(
            s.allowed_code_source_hosts,
            vec![
                HostPattern::Exact("a.example".into()),
                HostPattern::Suffix("b.example".into())
            ]
        );
    }

    #[test]
    fn env_lists_are_comma_separated_and_hierarchical_env_beats_alias() {
        let mut l = Layers::default();
        l.add_env(env(&[
            ("ALLOWED_CODE_SOURCE_HOSTS", "x.example, y.example"),
            ("WORKER_RETRY_ATTEMPTS", "4"),
            ("Worker__RetryAttempts", "5"),
        ]));
        let s = settings(&l).unwrap();
        assert_eq!(
            s.allowed_code_source_hosts,
            vec![
                HostPattern::Exact("x.example".into()),
                HostPattern::Exact("y.example".into())
            ]
        );
        assert_eq!(s.worker_retry_attempts, 5);
    }

    #[test]
    fn bad_values_fail_naming_key_value_origin_and_range() {
        let mut l = Layers::default();
        l.add_env(env(&[
            ("WORKER_RECOVERY_LEASE_TTL_SECONDS", "5"),
            ("Recovery__OnStart", "maybe"),
            ("StateStore__Type", "cassandra"),
        ]));
        l.add_flag("HttpPort", "70000".into());
        let errors = settings(&l).unwrap_err();
        let all = errors.join("\n");
        assert_eq!(errors.len(), 4, "{all}");
        assert!(all.contains("Recovery:LeaseTtlSeconds = \"5\" (from environment variable WORKER_RECOVERY_LEASE_TTL_SECONDS): must be a whole number from 10 to 86400"), "{all}");
        assert!(all.contains("Recovery:OnStart = \"maybe\""), "{all}");
        assert!(
            all.contains("HttpPort = \"70000\" (from the command line)"),
            "{all}"
        );
        assert!(all.contains("must be one of embedded"), "{all}");
    }

    #[test]
    fn credentials_come_from_env_or_secret_files_and_never_from_the_file_in_production() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("appsettings.json");
        let secret = dir.path().join("token");
        std::fs::write(&secret, "from-file\n").unwrap();
        std::fs::write(
            &file,
            format!(
                r#"{{"CodeSourceCredentials": {{
                    "Inline": {{"Token": "leaked", "Hosts": "a.example"}},
                    "Mounted": {{"Username": "ci", "TokenFile": {:?}, "Hosts": ["*.b.example"]}}}}}}"#,
                secret.display()
            ),
        )
        .unwrap();
        let mut l = Layers::default();
        l.add_json_file(&file).unwrap();
        l.add_env(env(&[
            ("VIRTUFIN_REGISTRY_USER", "svc"),
            ("VIRTUFIN_REGISTRY_TOKEN", "from-env"),
            ("VIRTUFIN_REGISTRY_HOSTS", "registry.example"),
        ]));
        let errors = settings(&l).unwrap_err().join("\n");
        assert!(
            errors.contains("CodeSourceCredentials:Inline:Token is a secret and is not read from")
                && errors.contains("CodeSourceCredentials__Inline__Token"),
            "{errors}"
        );
        // The same token from the environment is accepted.
        l.add_env(env(&[("CodeSourceCredentials__Inline__Token", "ok")]));
        let s = settings(&l).unwrap();
        let c = &s.code_source_credentials;
        assert_eq!(c["Inline"].token, "ok");
        assert_eq!(c["Mounted"].token, "from-file");
        assert_eq!(c["Mounted"].username.as_deref(), Some("ci"));
        assert!(c["Mounted"].hosts[0].matches("x.b.example"));
        assert_eq!(
            (
                c["virtufin"].username.as_deref(),
                c["virtufin"].token.as_str()
            ),
            (Some("svc"), "from-env")
        );
        assert!(c["virtufin"].hosts[0].matches("registry.example"));
        // In Development the file may hold it.
        let mut dev = Layers::default();
        dev.add_json_file(&file).unwrap();
        dev.add_env(env(&[("DOTNET_ENVIRONMENT", "Development")]));
        assert_eq!(
            settings(&dev).unwrap().code_source_credentials["Inline"].token,
            "leaked"
        );
    }

    #[test]
    fn a_bad_allow_list_entry_or_missing_root_file_fails_start_up() {
        let mut l = Layers::default();
        l.add_env(env(&[
            (
                "ALLOWED_CODE_SOURCE_HOSTS",
                "ok.example, http://bad.example/",
            ),
            ("CodeSource__ExtraRootCertificates", "/nonexistent/ca.pem"),
        ]));
        let errors = settings(&l).unwrap_err().join("\n");
        assert!(
            errors.contains("AllowedCodeSourceHosts: \"http://bad.example/\" is not a host name"),
            "{errors}"
        );
        assert!(
            errors.contains("CodeSource:ExtraRootCertificates: cannot read /nonexistent/ca.pem"),
            "{errors}"
        );
    }

    #[test]
    fn secret_references_resolve_from_env_and_files_and_never_print_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwt-secret");
        std::fs::write(&file, "from-a-mounted-file-0123456789abcdef\n").unwrap();
        let mut l = Layers::default();
        l.add_env(env(&[
            ("Auth__Jwt__Algorithm", "HS256"),
            (
                "Auth__Jwt__Secret",
                &format!("secret:file:{}", file.display()),
            ),
            ("HttpPort", "secret:env:WM_CONFIG_TEST_UNSET_VARIABLE"),
        ]));
        let errors = settings(&l).unwrap_err().join("\n");
        assert!(
            errors.contains("HttpPort")
                && errors.contains("WM_CONFIG_TEST_UNSET_VARIABLE is not set"),
            "{errors}"
        );
        // A resolved secret that is malformed is reported without its value.
        let secret_port = dir.path().join("port");
        std::fs::write(&secret_port, "not-a-port-sekrit").unwrap();
        let mut l = Layers::default();
        l.add_env(env(&[
            ("Auth__Jwt__Algorithm", "HS256"),
            (
                "Auth__Jwt__Secret",
                &format!("secret:file:{}", file.display()),
            ),
            (
                "HttpPort",
                &format!("secret:file:{}", secret_port.display()),
            ),
        ]));
        let errors = settings(&l).unwrap_err().join("\n");
        assert!(errors.contains("HttpPort = (a secret)"), "{errors}");
        assert!(!errors.contains("sekrit"), "{errors}");
        let mut l = Layers::default();
        l.add_env(env(&[
            ("Auth__Jwt__Algorithm", "HS256"),
            (
                "Auth__Jwt__Secret",
                &format!("secret:file:{}", file.display()),
            ),
        ]));
        let s = settings(&l).unwrap();
        assert_eq!(
            s.auth.jwt.unwrap().secret.as_deref(),
            Some("from-a-mounted-file-0123456789abcdef")
        );
    }

    #[test]
    fn malformed_json_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("appsettings.json");
        std::fs::write(&file, "{ not json").unwrap();
        let err = Layers::default().add_json_file(&file).unwrap_err();
        assert!(err.contains("not valid JSON"), "{err}");
    }
}
