//! The shared Redis connection of the store and the bus: one multiplexed
//! connection, opened again after any failure.
//!
//! Why not the client library's `ConnectionManager`: its reconnect is
//! triggered from inside a command; a command cancelled by the caller's
//! timeout (every call here has one) never triggers it, and after an outage
//! longer than its retries the manager stayed broken for good (a test in
//! redis_store.rs stops the server for 8 s and fails with it). Here a failed
//! or timed-out call drops the connection and the next call connects anew.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

#[derive(Clone)]
pub(crate) struct Healing {
    client: redis::Client,
    current: Arc<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
    timeout: Duration,
}

impl Healing {
    pub(crate) fn new(
        client: redis::Client,
        first: MultiplexedConnection,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            current: Arc::new(tokio::sync::Mutex::new(Some(first))),
            timeout,
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection())
            .await
            .map_err(|_| {
                format!(
                    "connecting to Redis took longer than {} ms",
                    self.timeout.as_millis()
                )
            })?
            .map_err(|e| format!("cannot connect to Redis: {e}"))?;
        *current = Some(c.clone());
        Ok(c)
    }

    async fn drop_connection(&self) {
        *self.current.lock().await = None;
    }

    /// Runs one call (`what` names it in errors) on the connection, within
    /// the timeout. A broken connection or a timeout drops it; a server's
    /// error reply (a wrong type, a missing group) leaves it be.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.connection().await?;
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error()
                {
                    self.drop_connection().await;
                }
                Err(format!("Redis {what} failed: {e}"))
            }
            Err(_) => {
                self.drop_connection().await;
                Err(format!(
                    "Redis {what} took longer than {} ms",
                    self.timeout.as_millis()
                ))
            }
        }
    }
}
