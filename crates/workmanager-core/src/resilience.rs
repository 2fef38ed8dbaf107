//! Retry with exponential backoff and a circuit breaker around a networked
//! bus or state store (`Resilience:*`).
//!
//! The breaker counts calls since it last closed: once at least
//! `Resilience:CircuitBreakerThreshold` calls were made and half or more
//! failed, it opens for `Resilience:CircuitBreakerDurationSeconds`; then
//! calls are let through again (half-open) and the first success closes it.
//! Only "unavailable" failures count: a CAS conflict or backpressure is an
//! answer, not an outage.
//!
//! While the bus's breaker is open, publishes are kept in a buffer and sent
//! in order once it closes; the dispatcher hands inbound messages back for
//! redelivery instead of processing them. The buffer holds at most
//! `BUFFER_CAPACITY` events: a publish that does not fit is refused whole
//! (backpressure: HTTP 503, gRPC UNAVAILABLE), so the publisher keeps it and
//! retries — nothing accepted is ever dropped. The buffer is an `Outbox`:
//! the service keeps it in a local file (`Resilience:BufferPath`), written
//! durably before a publish is accepted, so buffered publishes survive a
//! crash of this instance and go out after its restart.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::bus::{Bus, BusError, Subscription};
use crate::event::CloudEvent;
use crate::store::{StateStore, StoreError, Version, Versioned, WriteOp};

/// Publishes kept while the bus's breaker is open.
pub const BUFFER_CAPACITY: usize = 1000;

/// Where publishes wait while the bus is down, oldest first.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Appends a publish whole, durably before it returns, or not at all.
    async fn push(&self, topic: &str, events: &[CloudEvent]) -> Result<(), String>;
    /// Up to `max` of the oldest entries: (sequence, topic, event).
    async fn front(&self, max: usize) -> Result<Vec<(u64, String, CloudEvent)>, String>;
    /// Removes every entry up to and including sequence `last`.
    async fn remove_through(&self, last: u64) -> Result<(), String>;
    /// Entries waiting.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct ResilienceSettings {
    /// Retries after a failed call (`Resilience:RetryAttempts`).
    pub retry_attempts: u32,
    /// Backoff base: base·2^(attempt-1) (`Resilience:RetryBaseDelayMs`).
    pub retry_base_delay: Duration,
    /// Calls before the breaker may open (`Resilience:CircuitBreakerThreshold`).
    pub breaker_threshold: u32,
    /// How long it stays open (`Resilience:CircuitBreakerDurationSeconds`).
    pub breaker_duration: Duration,
    /// Longest one call may take before it counts as failed (the backend's
    /// own timeout, e.g. `Redis:TimeoutMs`): a client library that waits on
    /// a dead server must not hold a publisher for minutes.
    pub call_timeout: Duration,
}

impl Default for ResilienceSettings {
    fn default() -> Self {
        Self {
            retry_attempts: 3,
            retry_base_delay: Duration::from_millis(200),
            breaker_threshold: 5,
            breaker_duration: Duration::from_secs(30),
            call_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug)]
struct Counts {
    calls: u32,
    failures: u32,
    opened_at: Option<Instant>,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    duration: Duration,
    counts: Mutex<Counts>,
}

impl Breaker {
    pub fn new(threshold: u32, duration: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            duration,
            counts: Mutex::new(Counts {
                calls: 0,
                failures: 0,
                opened_at: None,
            }),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> CircuitState {
        match self.counts().opened_at {
            None => CircuitState::Closed,
            Some(t) if t.elapsed() < self.duration => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    /// Whether a call may go out now (closed or half-open).
    pub fn allows(&self) -> bool {
        self.state() != CircuitState::Open
    }

    pub fn record(&self, ok: bool) {
        let mut c = self.counts();
        if ok {
            if c.opened_at.take().is_some() {
                tracing::info!("circuit closed: the backend answers again");
            }
            if c.calls >= self.threshold.saturating_mul(20) {
                // Forget old history so a long healthy run does not dilute
                // a fresh outage.
                c.calls = 0;
                c.failures = 0;
            }
            c.calls += 1;
            return;
        }
        if c.opened_at.is_some() {
            // A failed trial while half-open: open for another period.
            c.opened_at = Some(Instant::now());
            return;
        }
        c.calls += 1;
        c.failures += 1;
        if c.calls >= self.threshold && c.failures * 2 >= c.calls {
            tracing::warn!(
                calls = c.calls,
                failures = c.failures,
                "circuit opened: the backend is failing"
            );
            c.opened_at = Some(Instant::now());
            c.calls = 0;
            c.failures = 0;
        }
    }
}

fn backoff(settings: &ResilienceSettings, attempt: u32) -> Duration {
    settings
        .retry_base_delay
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
}

/// A bus with retries, a breaker and a publish buffer.
pub struct ResilientBus {
    inner: Arc<dyn Bus>,
    settings: ResilienceSettings,
    breaker: Breaker,
    buffer: Arc<dyn Outbox>,
    /// Serialises buffering and flushing, so buffered events go out once
    /// and in order, and the capacity check holds.
    flushing: tokio::sync::Mutex<()>,
    /// Publishes refused because the buffer was full.
    refused: prometheus_client::metrics::counter::Counter,
}

impl ResilientBus {
    pub fn new(
        inner: Arc<dyn Bus>,
        settings: ResilienceSettings,
        refused: prometheus_client::metrics::counter::Counter,
        buffer: Arc<dyn Outbox>,
    ) -> Arc<Self> {
        let bus = Arc::new(Self {
            inner,
            breaker: Breaker::new(settings.breaker_threshold, settings.breaker_duration),
            settings,
            buffer,
            flushing: tokio::sync::Mutex::new(()),
            refused,
        });
        // Flushes the buffer once the breaker lets calls through again
        // (at start too: what a crashed run left waits in the outbox).
        let weak = Arc::downgrade(&bus);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(bus) = weak.upgrade() else { return };
                if bus.buffered() > 0 && bus.breaker.allows() {
                    let _ = bus.flush().await;
                }
            }
        });
        bus
    }

    fn timed_out(&self) -> String {
        format!(
            "the {} bus did not answer within {} ms",
            self.inner.name(),
            self.settings.call_timeout.as_millis()
        )
    }

    /// Publishes waiting in the buffer.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Buffers a publish whole, or refuses it whole when it does not fit
    /// (or the outbox cannot be written).
    async fn keep(&self, topic: &str, events: Vec<CloudEvent>) -> Result<(), BusError> {
        let _one = self.flushing.lock().await;
        let waiting = self.buffer.len();
        if waiting + events.len() > BUFFER_CAPACITY {
            self.refused.inc_by(events.len() as u64);
            return Err(BusError::Backpressure(format!(
                "the {} bus is unavailable and {waiting} publishes already wait for it \
                 (at most {BUFFER_CAPACITY}); retry later",
                self.inner.name(),
            )));
        }
        self.buffer.push(topic, &events).await.map_err(|e| {
            self.refused.inc_by(events.len() as u64);
            BusError::Unavailable(format!(
                "the {} bus is unavailable and the publish could not be buffered: {e}",
                self.inner.name()
            ))
        })
    }

    /// Sends buffered events in order, one run of a topic per call. Stops
    /// (keeping the rest) at the first failure.
    async fn flush(&self) -> Result<(), BusError> {
        let _one = self.flushing.lock().await;
        loop {
            let front = self
                .buffer
                .front(256)
                .await
                .map_err(BusError::Unavailable)?;
            let Some((_, topic, _)) = front.first() else {
                return Ok(());
            };
            let topic = topic.clone();
            let run: Vec<(u64, CloudEvent)> = front
                .into_iter()
                .take_while(|(_, t, _)| *t == topic)
                .map(|(seq, _, e)| (seq, e))
                .collect();
            let Some(last) = run.last().map(|(seq, _)| *seq) else {
                return Ok(());
            };
            let events = run.into_iter().map(|(_, e)| e).collect();
            let result = tokio::time::timeout(
                self.settings.call_timeout,
                self.inner.publish_many(&topic, events),
            )
            .await
            .unwrap_or_else(|_| Err(BusError::Unavailable(self.timed_out())));
            self.breaker
                .record(!matches!(result, Err(BusError::Unavailable(_))));
            result?;
            // Sent: a crash before the removal sends them again, and the
            // bus's duplicate check drops the repeats.
            self.buffer
                .remove_through(last)
                .await
                .map_err(BusError::Unavailable)?;
        }
    }
}

#[async_trait]
impl Bus for ResilientBus {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn publish(&self, topic: &str, event: CloudEvent) -> Result<(), BusError> {
        self.publish_many(topic, vec![event]).await
    }

    async fn publish_many(&self, topic: &str, events: Vec<CloudEvent>) -> Result<(), BusError> {
        if events.is_empty() {
            return Ok(());
        }
        if self.buffered() > 0 {
            // Order: what waits goes first.
            if !self.breaker.allows() || self.flush().await.is_err() {
                return self.keep(topic, events).await;
            }
        }
        let mut attempt = 0;
        loop {
            if !self.breaker.allows() {
                return self.keep(topic, events).await;
            }
            // Borrowed: a failed attempt leaves the events to retry or buffer.
            let attempt_result = tokio::time::timeout(
                self.settings.call_timeout,
                self.inner.publish_slice(topic, &events),
            )
            .await
            .unwrap_or_else(|_| Err(BusError::Unavailable(self.timed_out())));
            match attempt_result {
                Err(BusError::Unavailable(e)) => {
                    self.breaker.record(false);
                    if attempt >= self.settings.retry_attempts {
                        if !self.breaker.allows() {
                            return self.keep(topic, events).await;
                        }
                        return Err(BusError::Unavailable(e));
                    }
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, topic, "publish failed; retrying");
                    tokio::time::sleep(backoff(&self.settings, attempt)).await;
                }
                other => {
                    self.breaker.record(true);
                    return other;
                }
            }
        }
    }

    async fn subscribe(&self, topics: &[String], group: &str) -> Result<Subscription, BusError> {
        self.inner.subscribe(topics, group).await
    }

    async fn unsubscribe(&self, topics: &[String], group: &str) {
        self.inner.unsubscribe(topics, group).await
    }

    async fn remove_group(&self, topics: &[String], group: &str) {
        self.inner.remove_group(topics, group).await
    }

    fn watch(&self, topic: &str) -> broadcast::Receiver<Arc<CloudEvent>> {
        self.inner.watch(topic)
    }

    fn queue_depth(&self, group: &str) -> usize {
        self.inner.queue_depth(group)
    }

    fn circuit(&self) -> CircuitState {
        self.breaker.state()
    }

    fn buffered(&self) -> usize {
        ResilientBus::buffered(self)
    }

    fn intake(&self) -> Option<Arc<dyn crate::bus::PushIntake>> {
        self.inner.intake()
    }
}

/// A state store with retries and a breaker: while open, calls fail at once
/// with "unavailable" (UNAVAILABLE to clients) instead of waiting on a dead
/// backend.
pub struct ResilientStore {
    inner: Arc<dyn StateStore>,
    settings: ResilienceSettings,
    breaker: Breaker,
}

impl ResilientStore {
    pub fn new(inner: Arc<dyn StateStore>, settings: ResilienceSettings) -> Self {
        Self {
            inner,
            breaker: Breaker::new(settings.breaker_threshold, settings.breaker_duration),
            settings,
        }
    }

    async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 0;
        loop {
            if !self.breaker.allows() {
                return Err(StoreError::Unavailable(format!(
                    "the {} state store is failing; the circuit breaker is open for up to {} s \
                     (Resilience:CircuitBreakerDurationSeconds)",
                    self.inner.name(),
                    self.settings.breaker_duration.as_secs()
                )));
            }
            let result = tokio::time::timeout(self.settings.call_timeout, f())
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(format!(
                        "the {} state store did not answer within {} ms",
                        self.inner.name(),
                        self.settings.call_timeout.as_millis()
                    )))
                });
            match result {
                Err(StoreError::Unavailable(e)) => {
                    self.breaker.record(false);
                    if attempt >= self.settings.retry_attempts {
                        return Err(StoreError::Unavailable(e));
                    }
                    attempt += 1;
                    tokio::time::sleep(backoff(&self.settings, attempt)).await;
                }
                other => {
                    self.breaker.record(true);
                    return other;
                }
            }
        }
    }
}

#[async_trait]
impl StateStore for ResilientStore {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // Health and recovery probe the backend itself, breaker or not.
        let r = self.inner.ping().await;
        if r.is_ok() {
            self.breaker.record(true);
        }
        r
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.call(|| self.inner.get(key)).await
    }

    async fn commit(&self, ops: Vec<WriteOp>) -> Result<Vec<Option<Version>>, StoreError> {
        self.call(|| self.inner.commit(ops.clone())).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.call(|| self.inner.list(prefix)).await
    }

    fn circuit(&self) -> CircuitState {
        self.breaker.state()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_on_half_failures_and_closes_after_a_good_trial() {
        let b = Breaker::new(4, Duration::from_millis(50));
        b.record(true);
        b.record(false);
        b.record(true);
        assert_eq!(
            b.state(),
            CircuitState::Closed,
            "3 calls: below the threshold"
        );
        b.record(false);
        assert_eq!(b.state(), CircuitState::Open, "4 calls, 2 failed");
        assert!(!b.allows());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.record(false);
        assert_eq!(
            b.state(),
            CircuitState::Open,
            "a failed trial opens it again"
        );
        std::thread::sleep(Duration::from_millis(60));
        b.record(true);
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn a_mostly_healthy_backend_keeps_the_breaker_closed() {
        let b = Breaker::new(5, Duration::from_secs(30));
        for i in 0..100 {
            b.record(i % 3 != 0);
        }
        assert_eq!(b.state(), CircuitState::Closed);
    }
}
