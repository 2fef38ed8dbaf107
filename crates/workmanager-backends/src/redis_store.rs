//! The Redis/Valkey state store (`StateStore:Type=redis`): the same keys as
//! the embedded store, shared by every instance pointing at the server.
//!
//! Each key is a hash with its version (`v`) and value (`d`). A commit is
//! one Lua script, which Redis runs atomically: it checks every
//! precondition first and writes only if all hold, so a commit applies
//! whole or not at all and concurrent writers are serialised by version
//! (compare-and-swap). A sorted set of all keys (`INDEX`) answers prefix
//! listings without `SCAN`. Every call has a timeout; the connection is
//! opened again after a failure (redis_conn.rs). Durability is the server's: run it with `appendonly yes`
//! (`appendfsync everysec` or `always`) for writes to survive its crash.
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, Script};
use workmanager_core::store::Version;

use crate::redis_conn::Healing;
use workmanager_core::{Precondition, StateStore, StoreError, Versioned, WriteOp};

/// Sorted set (all scores 0, ordered by name) of every stored key.
const INDEX: &str = "workmanager-index:keys";

/// KEYS: the ops' keys, then INDEX. ARGV: per op `kind`, `pre`, `expected`,
/// `value` (kind: P put, D delete; pre: N none, A absent, V version).
/// Returns {"conflict", key} or the new versions (-1 for deletes).
const COMMIT: &str = r#"
local n = #KEYS - 1
local index = KEYS[#KEYS]
for i = 1, n do
  local pre = ARGV[(i - 1) * 4 + 2]
  local cur = redis.call('HGET', KEYS[i], 'v')
  if pre == 'A' and cur then return {'conflict', KEYS[i]} end
  if pre == 'V' and cur ~= ARGV[(i - 1) * 4 + 3] then return {'conflict', KEYS[i]} end
end
local out = {}
for i = 1, n do
  local kind = ARGV[(i - 1) * 4 + 1]
  if kind == 'P' then
    local v = redis.call('HINCRBY', KEYS[i], 'v', 1)
    redis.call('HSET', KEYS[i], 'd', ARGV[(i - 1) * 4 + 4])
    redis.call('ZADD', index, 0, KEYS[i])
    out[i] = v
  else
    redis.call('DEL', KEYS[i])
    redis.call('ZREM', index, KEYS[i])
    out[i] = -1
  end
end
return out
"#;

pub struct RedisStore {
    conn: Healing,
    commit: Script,
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS) and checks the server answers.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        Self::connect_with(url, timeout, None).await
    }

    /// As `connect`, with TLS material for `rediss://`.
    pub async fn connect_with(
        url: &str,
        timeout: Duration,
        tls: Option<&RedisTls>,
    ) -> Result<Self, StoreError> {
        let (_, conn) = connect(url, timeout, tls)
            .await
            .map_err(StoreError::Unavailable)?;
        let s = Self {
            conn,
            commit: Script::new(COMMIT),
        };
        s.ping().await?;
        Ok(s)
    }

    async fn timed<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(redis::aio::MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.conn
            .run(what, f)
            .await
            .map_err(StoreError::Unavailable)
    }
}

/// TLS material for `rediss://` beyond the public web roots: the CA that
/// signed the server's certificate (`Redis:CaPath`) and a client
/// certificate for servers that verify clients
/// (`Redis:ClientCertificatePath`, `Redis:ClientKeyPath`), all PEM.
#[derive(Clone, Default)]
pub struct RedisTls {
    pub ca_pem: Option<Vec<u8>>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

/// Opens a client and the shared healing connection to `url`, for the
/// store and the bus alike. The first connection is made here so refused
/// credentials are reported at once, naming the setting to fix and never
/// the password.
pub(crate) async fn connect(
    url: &str,
    timeout: Duration,
    tls: Option<&RedisTls>,
) -> Result<(redis::Client, Healing), String> {
    let client = match tls {
        Some(t) if url.starts_with("rediss://") => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: t.client.as_ref().map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
                root_cert: t.ca_pem.clone(),
            },
        ),
        Some(_) => {
            return Err(
                "Redis:CaPath / Redis:ClientCertificatePath need a rediss:// Redis:Url".into(),
            )
        }
        None => redis::Client::open(url),
    }
    .map_err(|e| format!("Redis:Url is not a usable Redis URL: {e}"))?;
    let first = tokio::time::timeout(timeout, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| format!("Redis at {} did not answer", redact(url)))?
        .map_err(|e| describe(url, &e))?;
    Ok((client.clone(), Healing::new(client, first, timeout)))
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// A connection error, with the setting to fix when it is about
/// credentials.
fn describe(url: &str, e: &redis::RedisError) -> String {
    let text = e.to_string();
    let auth = matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("invalid password");
    if auth {
        format!(
            "Redis at {} refused the credentials: set the user and password in Redis:Url \
             (redis://user:password@host:port; use secret:env:NAME for the password)",
            redact(url)
        )
    } else {
        format!("cannot connect to Redis at {}: {text}", redact(url))
    }
}

#[async_trait]
impl StateStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self
            .timed("PING", |mut c| async move {
                redis::cmd("PING").query_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let (v, d): (Option<u64>, Option<Vec<u8>>) = self
            .timed(
                "HMGET",
                |mut c| async move { c.hget(key, &["v", "d"]).await },
            )
            .await?;
        match (v, d) {
            (Some(version), Some(value)) => Ok(Some(Versioned { value, version })),
            (None, None) => Ok(None),
            _ => Err(StoreError::Corrupt(format!(
                "{key} is missing its version or value"
            ))),
        }
    }

    async fn commit(&self, ops: Vec<WriteOp>) -> Result<Vec<Option<Version>>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.commit.prepare_invoke();
        for op in &ops {
            let (kind, key, pre, value): (&str, &str, Precondition, &[u8]) = match op {
                WriteOp::Put { key, value, pre } => ("P", key, *pre, value),
                WriteOp::Delete { key, pre } => ("D", key, *pre, &[]),
            };
            let (p, expected) = match pre {
                Precondition::None => ("N", String::new()),
                Precondition::Absent => ("A", String::new()),
                Precondition::Version(v) => ("V", v.to_string()),
            };
            inv.key(key).arg(kind).arg(p).arg(expected).arg(value);
        }
        inv.key(INDEX);
        let reply: redis::Value = self
            .timed(
                "commit",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        let items = match reply {
            redis::Value::Array(items) => items,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unexpected commit reply {other:?}"
                )))
            }
        };
        if let Some(redis::Value::BulkString(tag)) = items.first() {
            if tag == b"conflict" {
                let key = match items.get(1) {
                    Some(redis::Value::BulkString(k)) => String::from_utf8_lossy(k).into_owned(),
                    _ => String::new(),
                };
                return Err(StoreError::Conflict(key));
            }
        }
        items
            .into_iter()
            .map(|v| match v {
                redis::Value::Int(-1) => Ok(None),
                redis::Value::Int(n) if n > 0 => Ok(Some(n as u64)),
                other => Err(StoreError::Corrupt(format!("unexpected version {other:?}"))),
            })
            .collect()
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let min = format!("[{prefix}");
        // 0xFF never appears in UTF-8: every key with the prefix sorts below.
        let mut max = format!("[{prefix}").into_bytes();
        max.push(0xff);
        let keys: Vec<String> = self
            .timed("ZRANGEBYLEX", |mut c| async move {
                redis::cmd("ZRANGEBYLEX")
                    .arg(INDEX)
                    .arg(min)
                    .arg(max)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store_suite as suite;
    use crate::testing::RedisServer;

    const T: Duration = Duration::from_secs(2);

    async fn store() -> (RedisServer, RedisStore) {
        let server = RedisServer::start();
        let s = RedisStore::connect(&server.url(), T).await.unwrap();
        (server, s)
    }

    #[tokio::test]
    async fn put_get_versions_and_cas() {
        let (_r, s) = store().await;
        suite::put_get_versions_and_cas(&s).await;
    }

    #[tokio::test]
    async fn commit_is_all_or_nothing() {
        let (_r, s) = store().await;
        suite::commit_is_all_or_nothing(&s).await;
    }

    #[tokio::test]
    async fn list_by_prefix_and_delete() {
        let (_r, s) = store().await;
        suite::list_by_prefix_and_delete(&s).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_cas_has_one_winner() {
        let (_r, s) = store().await;
        suite::concurrent_cas_has_one_winner(Arc::new(s)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_creates_have_one_winner() {
        let (_r, s) = store().await;
        suite::concurrent_creates_have_one_winner(Arc::new(s)).await;
    }

    #[tokio::test]
    async fn data_survives_a_server_restart_and_the_connection_comes_back() {
        let (mut r, s) = store().await;
        s.put("k", b"v".to_vec(), Precondition::None).await.unwrap();
        r.restart();
        // The first call after the restart may fail while reconnecting.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let got = loop {
            match s.get("k").await {
                Ok(v) => break v,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "never reconnected: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(got.unwrap().value, b"v");
    }

    #[tokio::test]
    async fn the_connection_comes_back_after_a_long_outage() {
        let (mut r, s) = store().await;
        s.put("k", b"v".to_vec(), Precondition::None).await.unwrap();
        r.stop();
        let down = std::time::Instant::now();
        while down.elapsed() < Duration::from_secs(8) {
            // Callers give up on their own timeout too (the breaker does).
            let r = tokio::time::timeout(Duration::from_millis(500), s.get("k")).await;
            assert!(
                !matches!(r, Ok(Ok(_))),
                "no answer while the server is down"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        r.start_again();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout(Duration::from_millis(500), s.get("k")).await {
                Ok(Ok(v)) => {
                    assert_eq!(v.unwrap().value, b"v");
                    break;
                }
                other => assert!(
                    std::time::Instant::now() < deadline,
                    "still failing 20 s after the restart: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn rediss_with_our_ca_and_client_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "test Redis CA");
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca =
            rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
        let leaf = |names: &[&str]| {
            let key = rcgen::KeyPair::generate().unwrap();
            let p = rcgen::CertificateParams::new(
                names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            (p.signed_by(&key, &ca).unwrap().pem(), key.serialize_pem())
        };
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (sc, sk) = leaf(&["127.0.0.1", "localhost"]);
        let (cc, ck) = leaf(&["workmanager"]);
        let server = RedisServer::start_tls(
            &write("s.pem", &sc),
            &write("s.key", &sk),
            &write("ca.pem", &ca.pem()),
        );
        let tls = RedisTls {
            ca_pem: Some(ca.pem().into_bytes()),
            client: Some((cc.into_bytes(), ck.into_bytes())),
        };
        let s = RedisStore::connect_with(&server.url(), T, Some(&tls))
            .await
            .unwrap();
        s.put("k", b"v".to_vec(), Precondition::None).await.unwrap();
        assert_eq!(s.get("k").await.unwrap().unwrap().value, b"v");
        let no_client_cert = RedisTls {
            client: None,
            ..tls.clone()
        };
        assert!(
            RedisStore::connect_with(&server.url(), T, Some(&no_client_cert))
                .await
                .is_err(),
            "the server requires a client certificate"
        );
        assert!(
            RedisStore::connect(&server.url(), T).await.is_err(),
            "the public roots do not know our CA"
        );
        let plain = server.url().replacen("rediss://", "redis://", 1);
        assert!(
            RedisStore::connect(&plain, T).await.is_err(),
            "plain text is refused"
        );
    }

    #[tokio::test]
    async fn a_wrong_password_is_a_clear_error_naming_the_setting() {
        let r = RedisServer::start_with(Some("right-password"));
        let bad = format!("redis://:wrong-password@127.0.0.1:{}", r.port);
        let e = match RedisStore::connect(&bad, T).await {
            Ok(_) => panic!("a wrong password was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("Redis:Url") && e.contains("refused the credentials"),
            "{e}"
        );
        assert!(
            !e.contains("wrong-password"),
            "the password is not echoed: {e}"
        );
        assert!(RedisStore::connect(&r.url(), T).await.is_ok());
    }
}
