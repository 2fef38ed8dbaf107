//! Fetching worker code from a URL without becoming an SSRF tool.
//!
//! Every hop of a fetch (the URL, then each redirect, at most
//! [`MAX_REDIRECTS`]) goes through the same checks, in this order:
//! 1. URL rules (`target.rs`): absolute `https`/`http`, no userinfo, no
//!    backslashes; the host as the HTTP client will see it.
//! 2. Host allow-list (`AllowedCodeSourceHosts`; empty allows any host).
//! 3. Resolution, once: if **any** address of the host is not public
//!    (`address.rs`), the fetch is refused before a connection is made.
//! 4. The connection goes to the vetted addresses only: the client gets them
//!    as a fixed resolution and has a resolver that refuses every other
//!    lookup, so a DNS answer that changes between check and use (rebinding)
//!    changes nothing. Proxies from the environment are ignored.
//!
//! The body is streamed under a cap (`CodeSource:MaxBytes`; a larger
//! `Content-Length` is refused before reading), the whole fetch runs under
//! one timeout, and an expected SHA-256 (hex or SRI `sha256-<base64>`) is
//! compared in constant time. Credentials go only to the hosts they are for,
//! and never across a redirect to another origin. Every refusal says which
//! rule refused it.
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use workmanager_core::error::{error_chain, CoreError, Result};
use workmanager_core::fetch::{CodeFetcher, FetchRequest};
use workmanager_core::model::RawCredential;

pub mod address;
pub mod target;

pub use target::HostPattern;
use target::Target;

/// Redirects followed before a fetch is refused.
pub const MAX_REDIRECTS: usize = 5;

/// What a fetch may do.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Empty: any host.
    pub allowed_hosts: Vec<HostPattern>,
    /// Development and tests only: skip the public-address rule.
    pub allow_private_networks: bool,
    pub max_bytes: usize,
    /// For the whole fetch, redirects included.
    pub timeout: Duration,
    /// PEM certificates trusted in addition to the built-in roots.
    pub extra_roots_pem: Vec<Vec<u8>>,
    /// Addresses treated as public although they are not. Not configurable:
    /// it lets tests play a public host with a loopback server while every
    /// other non-public address stays refused.
    pub public_overrides: Vec<IpAddr>,
}

/// A credential configured by name (`CodeSourceCredentials:<name>:...`).
#[derive(Clone)]
pub struct NamedCredential {
    /// With a user name the credential is sent as Basic, without as Bearer.
    pub username: Option<String>,
    pub token: String,
    /// The only hosts it is ever sent to. Empty: it is never sent.
    pub hosts: Vec<HostPattern>,
}

impl fmt::Debug for NamedCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamedCredential")
            .field("username", &self.username)
            .field("token", &"***")
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// Name resolution, injectable so tests can answer differently each time.
#[async_trait]
pub trait Resolve: Send + Sync {
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>>;
}

/// The system resolver.
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
        Ok(tokio::net::lookup_host((host, port))
            .await?
            .map(|a| a.ip())
            .collect())
    }
}

/// The HTTP client's resolver: every lookup fails. Hosts reach the client
/// only with their vetted addresses pinned, so a lookup here would mean a
/// name that was never checked.
struct NoLookups;

impl reqwest::dns::Resolve for NoLookups {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_string();
        Box::pin(async move { Err(format!("refusing an unvetted DNS lookup of {name}").into()) })
    }
}

enum Auth {
    Basic { username: String, token: String },
    Bearer(String),
}

pub struct HttpFetcher {
    policy: FetchPolicy,
    /// Keyed by lower-case name.
    credentials: HashMap<String, NamedCredential>,
    resolver: Arc<dyn Resolve>,
    roots: Vec<reqwest::Certificate>,
}

impl HttpFetcher {
    pub fn new(
        policy: FetchPolicy,
        credentials: HashMap<String, NamedCredential>,
        resolver: Arc<dyn Resolve>,
    ) -> std::result::Result<Self, String> {
        let mut roots = Vec::new();
        for pem in &policy.extra_roots_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("an extra root certificate is not valid PEM: {e}"))?;
            if certs.is_empty() {
                return Err("an extra root certificate file holds no certificate".into());
            }
            roots.extend(certs);
        }
        let credentials = credentials
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        Ok(Self {
            policy,
            credentials,
            resolver,
            roots,
        })
    }

    /// Resolves the target once and checks every address.
    async fn vet(&self, t: &Target) -> std::result::Result<Vec<SocketAddr>, String> {
        if !target::allowed(&self.policy.allowed_hosts, &t.host) {
            return Err(format!(
                "host {} is not in AllowedCodeSourceHosts; add it there to load code from it",
                t.host
            ));
        }
        let ips = match t.ip {
            Some(ip) => vec![ip],
            None => {
                let ips = self
                    .resolver
                    .lookup(&t.host, t.port)
                    .await
                    .map_err(|e| format!("host {} could not be resolved: {e}", t.host))?;
                if ips.is_empty() {
                    return Err(format!("host {} has no address", t.host));
                }
                ips
            }
        };
        if !self.policy.allow_private_networks {
            for ip in &ips {
                if self.policy.public_overrides.contains(ip) {
                    continue;
                }
                if let Some(why) = address::refusal(*ip) {
                    let which = if t.ip.is_some() {
                        format!("host {} is {why}", t.host)
                    } else {
                        format!("host {} resolves to {ip}, {why}", t.host)
                    };
                    return Err(format!("{which}; code sources must be public"));
                }
            }
        }
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, t.port))
            .collect())
    }

    fn client(
        &self,
        t: &Target,
        addrs: &[SocketAddr],
    ) -> std::result::Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .dns_resolver(Arc::new(NoLookups))
            .use_rustls_tls();
        if t.ip.is_none() {
            b = b.resolve_to_addrs(&t.host, addrs);
        }
        for root in &self.roots {
            b = b.add_root_certificate(root.clone());
        }
        b.build()
            .map_err(|e| format!("the HTTP client could not be set up: {e}"))
    }

    /// The credential for this fetch and the origin it may be sent to.
    fn auth_for(
        &self,
        req: &FetchRequest,
        first: &Target,
    ) -> std::result::Result<Option<Auth>, String> {
        if let Some(raw) = &req.raw_credential {
            return Ok(Some(match raw {
                RawCredential::Basic { username, token } => Auth::Basic {
                    username: username.clone(),
                    token: token.clone(),
                },
                RawCredential::Bearer { token } => Auth::Bearer(token.clone()),
            }));
        }
        let Some(name) = &req.credential_name else {
            return Ok(None);
        };
        let c = self
            .credentials
            .get(&name.to_ascii_lowercase())
            .ok_or_else(|| {
                format!(
                    "no code-source credential named {name:?} is configured \
                 (CodeSourceCredentials:{name}:Token and :Hosts)"
                )
            })?;
        if !c.hosts.iter().any(|h| h.matches(&first.host)) {
            return Err(format!(
                "the credential {name:?} is not for host {}; its hosts are set in \
                 CodeSourceCredentials:{name}:Hosts",
                first.host
            ));
        }
        Ok(Some(match &c.username {
            Some(u) => Auth::Basic {
                username: u.clone(),
                token: c.token.clone(),
            },
            None => Auth::Bearer(c.token.clone()),
        }))
    }

    async fn run(&self, req: &FetchRequest) -> std::result::Result<Vec<u8>, String> {
        let expected = req
            .content_sha256
            .as_deref()
            .map(expected_digest)
            .transpose()?;
        let first = target::parse(&req.url)?;
        let auth = self.auth_for(req, &first)?;
        let mut hop = first.clone();
        for redirects in 0..=MAX_REDIRECTS {
            let addrs = self.vet(&hop).await.map_err(|e| match redirects {
                0 => e,
                _ => format!("redirect refused: {e}"),
            })?;
            let client = self.client(&hop, &addrs)?;
            let mut rb = client.get(hop.url.clone());
            // Same origin only: never to another host, port or scheme.
            let same_origin = hop.url.origin() == first.url.origin();
            match (&auth, same_origin) {
                (Some(Auth::Basic { username, token }), true) => {
                    rb = rb.basic_auth(username, Some(token))
                }
                (Some(Auth::Bearer(token)), true) => rb = rb.bearer_auth(token),
                _ => {}
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| format!("fetching {} failed: {}", hop.url, error_chain(&e)))?;
            let status = resp.status();
            if status.is_redirection() {
                if redirects == MAX_REDIRECTS {
                    return Err(format!(
                        "{} redirects more than {MAX_REDIRECTS} times; code sources may redirect at most {MAX_REDIRECTS} times",
                        req.url
                    ));
                }
                let location = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| format!("{} answered {status} without a Location", hop.url))?;
                if location.contains('\\') {
                    return Err(format!(
                        "{} redirects to {location:?}, which contains a backslash",
                        hop.url
                    ));
                }
                let next = hop.url.join(location).map_err(|e| {
                    format!("{} redirects to an invalid URL {location:?}: {e}", hop.url)
                })?;
                tracing::debug!(from = %hop.url, to = %next, "code source redirect");
                hop = target::from_url(next).map_err(|e| format!("redirect refused: {e}"))?;
                continue;
            }
            if !status.is_success() {
                return Err(format!("{} answered {status}", hop.url));
            }
            let body = self.read_capped(resp, &hop).await?;
            if let Some(want) = expected {
                let got: [u8; 32] = Sha256::digest(&body).into();
                if !bool::from(got.ct_eq(&want)) {
                    return Err(format!(
                        "the code at {} does not match the expected SHA-256 (content_sha256); it is {}",
                        req.url,
                        hex::encode(got)
                    ));
                }
            }
            return Ok(body);
        }
        Err(format!("{} redirects too often", req.url))
    }

    async fn read_capped(
        &self,
        mut resp: reqwest::Response,
        t: &Target,
    ) -> std::result::Result<Vec<u8>, String> {
        let max = self.policy.max_bytes;
        let too_big = || {
            format!(
                "the code at {} is larger than CodeSource:MaxBytes ({max} bytes)",
                t.url
            )
        };
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_big());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading {} failed: {}", t.url, error_chain(&e)))?
        {
            if body.len() + chunk.len() > max {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

#[async_trait]
impl CodeFetcher for HttpFetcher {
    async fn fetch(&self, req: &FetchRequest) -> Result<Vec<u8>> {
        let secs = self.policy.timeout.as_secs();
        match tokio::time::timeout(self.policy.timeout, self.run(req)).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(why)) => Err(CoreError::InvalidArgument(why)),
            Err(_) => Err(CoreError::InvalidArgument(format!(
                "fetching {} took longer than CodeSource:FetchTimeoutSeconds ({secs} s)",
                req.url
            ))),
        }
    }
}

/// Parses `content_sha256`: 64 hex digits, or SRI `sha256-<base64>`.
pub fn expected_digest(s: &str) -> std::result::Result<[u8; 32], String> {
    let bad =
        || format!("content_sha256 {s:?} is not a SHA-256; give 64 hex digits or sha256-<base64>");
    let bytes = match s.strip_prefix("sha256-") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad())?,
        None => hex::decode(s).map_err(|_| bad())?,
    };
    bytes.try_into().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_read_as_hex_or_sri() {
        let hex_form = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let sri = "sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=";
        assert_eq!(
            expected_digest(hex_form).unwrap(),
            expected_digest(sri).unwrap()
        );
        assert_eq!(
            expected_digest(&hex_form.to_uppercase()).unwrap(),
            expected_digest(hex_form).unwrap()
        );
        for bad in [
            "",
            "abc",
            "sha256-",
            "sha256-!!!",
            "sha512-LPJNul+wow4m6Dsqxbninh",
            &hex_form[..62],
        ] {
            let e = expected_digest(bad).unwrap_err();
            assert!(e.contains("64 hex digits"), "{bad}: {e}");
        }
    }
}
#[cfg(feature = "testing")]
pub mod testing;
