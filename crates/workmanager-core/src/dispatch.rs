//! The message path: a RUNNING worker consumes its own consumer group on
//! every one of its topics; each message is stamped, run through the engine
//! with retries, and its output routed and published; a message that keeps
//! failing goes to `{topic}-dead`. Also the lifecycle events on
//! `workmanager.lifecycle`, published in order by one background task.
use std::sync::Arc;

use std::collections::VecDeque;

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::audit::RequestContext;
use crate::bus::{Ack, BusError, Delivery, Subscription};
use crate::error::CoreError;
use crate::event::CloudEvent;
use crate::manager::{Manager, Slot};
use crate::metrics::TopicCounters;
use prometheus_client::metrics::counter::Counter;

/// Topic of lifecycle events.
pub const LIFECYCLE_TOPIC: &str = "workmanager.lifecycle";
/// Events of this type are for the WorkManager itself and never reach workers.
pub const PROBE_TYPE: &str = "com.virtufin.workmanager.topic-probe";
pub const LIFECYCLE_SOURCE: &str = "urn:com.virtufin.workmanager";
/// Most messages pipelined to a worker in one exchange.
const MAX_BATCH: usize = 64;

/// Where a worker's output goes: the input's `replytopic`, else the output's
/// `publishtopic` (always removed from the output), else the output's type.
pub fn route(input: &CloudEvent, output: &mut CloudEvent) -> Option<String> {
    let publishtopic = match output.0.remove("publishtopic") {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    };
    input
        .get_str("replytopic")
        .filter(|s| !s.is_empty())
        .map(String::from)
        .or(publishtopic)
        .or_else(|| output.get_str("type").map(String::from))
}

/// Batches whose outputs may wait for publishing at once, per worker.
const FLUSH_QUEUE: usize = 2;

type Outbox = Vec<(Option<(String, CloudEvent)>, Delivery)>;

enum FlushJob {
    Outbox(Outbox),
    /// Answered once every outbox before it was published.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// Waits until the flusher published everything handed to it so far.
async fn barrier(flusher: &mpsc::Sender<FlushJob>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if flusher.send(FlushJob::Barrier(tx)).await.is_ok() {
        let _ = rx.await;
    }
}

impl Manager {
    /// Subscribes the worker's group to its topics and starts consuming.
    pub(crate) async fn go_online(&self, slot: &Arc<Slot>) -> crate::error::Result<()> {
        let mut current = slot.dispatch.lock().await;
        if current.is_some() {
            return Ok(());
        }
        let sub = self
            .inner
            .bus
            .subscribe(&slot.topics, slot.id.as_str())
            .await
            .map_err(|e| CoreError::Unavailable(format!("message bus: {e}")))?;
        let this = self.clone();
        let worker = slot.clone();
        *current = Some(tokio::spawn(async move { this.consume(worker, sub).await }));
        Ok(())
    }

    /// Unsubscribes, then lets queued and in-flight messages finish, within
    /// `Shutdown:DrainTimeoutSeconds`; past that the consumer is cancelled.
    pub(crate) async fn go_offline(&self, slot: &Slot) {
        let mut current = slot.dispatch.lock().await;
        let Some(mut task) = current.take() else {
            return;
        };
        self.inner
            .bus
            .unsubscribe(&slot.topics, slot.id.as_str())
            .await;
        if tokio::time::timeout(self.inner.settings.drain_timeout, &mut task)
            .await
            .is_err()
        {
            tracing::warn!(worker_id = %slot.id, "drain timeout reached; unfinished messages are abandoned");
            task.abort();
        }
    }

    async fn consume(&self, slot: Arc<Slot>, mut sub: Subscription) {
        let parallel = slot.max_concurrency.max(1) as usize;
        let permits = Arc::new(Semaphore::new(parallel));
        let mut pending: VecDeque<Delivery> = VecDeque::new();
        // Outputs of a batch are published (then its inputs acknowledged) by
        // this worker's flusher while the next batch already runs: on a
        // networked bus the round trip overlaps the worker's processing.
        // One FIFO keeps the order; a barrier drains it before anything
        // else publishes for this worker (a failure, a single message).
        let (flusher, jobs) = mpsc::channel::<FlushJob>(FLUSH_QUEUE);
        let flushing = {
            let (this, worker) = (self.clone(), slot.clone());
            tokio::spawn(async move { this.run_flusher(&worker, jobs).await })
        };
        loop {
            if pending.is_empty() {
                match sub.receiver.recv().await {
                    Some(d) => pending.push_back(d),
                    None => break,
                }
            }
            // Take what is already queued, up to a batch.
            while pending.len() < MAX_BATCH {
                match sub.receiver.try_recv() {
                    Ok(d) => pending.push_back(d),
                    Err(_) => break,
                }
            }
            if self.inner.bus.circuit() == crate::resilience::CircuitState::Open {
                // The bus is failing: outputs could not go out, so the
                // inputs go back for redelivery, unprocessed.
                for d in pending.drain(..) {
                    d.ack(Ack::Retry);
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
            let mut batch = Vec::with_capacity(pending.len());
            for d in pending.drain(..) {
                if d.event.get_str("type") == Some(PROBE_TYPE) {
                    d.ack(Ack::Done);
                } else {
                    batch.push(d);
                }
            }
            if parallel > 1 {
                // Order is relaxed only here: each message takes a free slot.
                for delivery in batch {
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let (this, worker) = (self.clone(), slot.clone());
                    tokio::spawn(async move {
                        this.handle(&worker, delivery).await;
                        drop(permit);
                    });
                }
            } else if batch.len() == 1 {
                if let Some(d) = batch.pop() {
                    barrier(&flusher).await;
                    self.handle(&slot, d).await;
                }
            } else if !batch.is_empty() {
                pending.extend(self.handle_batch(&slot, batch, &flusher).await);
            }
        }
        // Wait for the messages still running in parallel, and for the
        // outputs still being published.
        let _ = permits.acquire_many(parallel as u32).await;
        drop(flusher);
        let _ = flushing.await;
    }

    async fn run_flusher(&self, slot: &Arc<Slot>, mut jobs: mpsc::Receiver<FlushJob>) {
        while let Some(job) = jobs.recv().await {
            match job {
                FlushJob::Outbox(outbox) => self.flush(slot, outbox).await,
                FlushJob::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// A run of queued messages, pipelined to the worker in order. Messages
    /// after a failure did not run: they are returned to go next, after the
    /// failed one was retried or dead-lettered, so order holds.
    ///
    /// Outputs of messages that succeeded at once are published together
    /// (one `publish_many` per run of the same destination, in order), then
    /// their inputs are acknowledged: on a networked bus that is one round
    /// trip for the batch instead of one per message. A failed message
    /// first flushes the outputs before it, so order holds.
    async fn handle_batch(
        &self,
        slot: &Arc<Slot>,
        deliveries: Vec<Delivery>,
        flusher: &mpsc::Sender<FlushJob>,
    ) -> Vec<Delivery> {
        let events: Vec<&CloudEvent> = deliveries.iter().map(|d| &d.event).collect();
        let results = self.invoke_batch(slot, &events).await;
        drop(events);
        let mut rest = deliveries.into_iter();
        let mut outbox: Vec<(Option<(String, CloudEvent)>, Delivery)> = Vec::new();
        for result in results {
            let Some(delivery) = rest.next() else { break };
            match result {
                Ok(output) => {
                    let out = self.settled_ok(slot, &delivery, output, true);
                    outbox.push((out, delivery));
                }
                Err(e) => {
                    self.flush_via(slot, flusher, std::mem::take(&mut outbox))
                        .await;
                    barrier(flusher).await;
                    self.settle(slot, delivery, Err(e)).await;
                }
            }
        }
        self.flush_via(slot, flusher, outbox).await;
        rest.collect()
    }

    /// Hands an outbox to the flusher (or flushes here if it is gone).
    async fn flush_via(&self, slot: &Slot, flusher: &mpsc::Sender<FlushJob>, outbox: Outbox) {
        if outbox.is_empty() {
            return;
        }
        if let Err(mpsc::error::SendError(FlushJob::Outbox(o))) =
            flusher.send(FlushJob::Outbox(outbox)).await
        {
            self.flush(slot, o).await;
        }
    }

    /// Publishes the outputs of settled messages, then acknowledges them:
    /// each run of one destination in one `publish_many`; the inputs of a
    /// run whose publish failed go back for redelivery (their outputs get
    /// the same ids again, so nothing is lost and duplicates are dropped).
    async fn flush(&self, slot: &Slot, outbox: Outbox) {
        let mut run: Vec<CloudEvent> = Vec::new();
        let mut run_topic: Option<String> = None;
        let mut run_inputs: Vec<Delivery> = Vec::with_capacity(outbox.len());
        for (out, delivery) in outbox {
            if let Some((dest, event)) = out {
                if run_topic.as_deref() != Some(dest.as_str()) {
                    self.publish_run(
                        slot,
                        run_topic.take(),
                        std::mem::take(&mut run),
                        std::mem::take(&mut run_inputs),
                    )
                    .await;
                    run_topic = Some(dest);
                }
                run.push(event);
            }
            run_inputs.push(delivery);
        }
        self.publish_run(slot, run_topic, run, run_inputs).await;
    }

    async fn publish_run(
        &self,
        slot: &Slot,
        topic: Option<String>,
        events: Vec<CloudEvent>,
        inputs: Vec<Delivery>,
    ) {
        let outcome = match topic {
            Some(t) if !events.is_empty() => {
                let n = events.len();
                match self.inner.bus.publish_many(&t, events).await {
                    Ok(()) => Ack::Done,
                    Err(e) => {
                        let e = self.bus_error(&t, e);
                        tracing::warn!(worker_id = %slot.id, topic = %t, outputs = n, error = %e,
                            "could not publish a worker's outputs; its inputs go back for redelivery");
                        Ack::Retry
                    }
                }
            }
            _ => Ack::Done,
        };
        for d in inputs {
            d.ack(outcome);
        }
    }

    /// Counts a message that succeeded and routes its output: where to
    /// publish it, if anywhere. `first_try`: count it as received too.
    fn settled_ok(
        &self,
        slot: &Slot,
        delivery: &Delivery,
        output: Option<CloudEvent>,
        first_try: bool,
    ) -> Option<(String, CloudEvent)> {
        if let Some(c) = slot.topic_counters.get(&*delivery.topic) {
            if first_try {
                c.received.inc();
            }
            c.processed.inc();
        }
        let mut out = output?;
        match route(&delivery.event, &mut out) {
            Some(dest) => Some((dest, out)),
            None => {
                tracing::warn!(worker_id = %slot.id, "output has no destination topic; dropped");
                None
            }
        }
    }

    /// One message, start to finish.
    async fn handle(&self, slot: &Arc<Slot>, delivery: Delivery) {
        let first = self.invoke_slot(slot, &delivery.event).await;
        self.settle(slot, delivery, first).await;
    }

    /// Given a message's first result: retries with exponential backoff,
    /// then routes and publishes the output, or dead-letters the input.
    async fn settle(
        &self,
        slot: &Arc<Slot>,
        delivery: Delivery,
        first: crate::error::Result<Option<CloudEvent>>,
    ) {
        // Handles resolved when the worker was created: no label lookups here.
        let counters = slot.topic_counters.get(&*delivery.topic);
        let count = |pick: fn(&TopicCounters) -> &Counter| {
            if let Some(c) = counters {
                pick(c).inc();
            }
        };
        count(|c| &c.received);
        let retries = self.inner.settings.retry_attempts;
        let mut attempt = 0u32;
        let mut outcome = first;
        loop {
            match outcome {
                Ok(output) => {
                    if let Some((dest, out)) = self.settled_ok(slot, &delivery, output, false) {
                        self.publish_or_warn(&dest, out, slot.id.as_str()).await;
                    }
                    break;
                }
                // A worker without runnable code (FAILED, deleted) fails fast.
                Err(e) if attempt < retries && slot.engine().is_some() && retryable(&e) => {
                    attempt += 1;
                    let delay =
                        self.inner.settings.retry_base_delay * 2u32.saturating_pow(attempt - 1);
                    tokio::time::sleep(delay).await;
                    outcome = self.invoke_slot(slot, &delivery.event).await;
                }
                Err(e) => {
                    count(|c| &c.failed);
                    count(|c| &c.dead_lettered);
                    self.dead_letter(slot, &delivery.topic, &delivery.event, &e, attempt + 1)
                        .await;
                    break;
                }
            }
        }
        delivery.ack(Ack::Done);
    }

    async fn publish_or_warn(&self, topic: &str, event: CloudEvent, worker: &str) {
        if let Err(e) = self.inner.bus.publish(topic, event).await {
            let e = self.bus_error(topic, e);
            tracing::warn!(worker_id = %worker, topic, error = %e, "could not publish a worker's output");
        }
    }

    async fn dead_letter(
        &self,
        slot: &Slot,
        topic: &str,
        input: &CloudEvent,
        error: &CoreError,
        attempts: u32,
    ) {
        let mut dead = input.clone();
        dead.mark_dead_letter(error.to_string(), slot.id.as_str());
        dead.0
            .insert("deadletterattempts".into(), Value::from(attempts));
        let dead_topic = crate::bus::dead_letter_topic(topic);
        self.publish_or_warn(&dead_topic, dead, slot.id.as_str())
            .await;
        let ctx = RequestContext::system();
        let kind = error_type(error);
        self.emit_lifecycle(&ctx, slot, "failed", Some((kind, &error.to_string())));
    }

    /// Routes and publishes an output for `InvokeWorker` with `publish=true`.
    pub async fn publish_output(
        &self,
        input: &CloudEvent,
        output: &CloudEvent,
    ) -> crate::error::Result<()> {
        let mut out = output.clone();
        let dest = route(input, &mut out).ok_or_else(|| {
            CoreError::WorkerError("the output names no topic to publish to".into())
        })?;
        self.publish(&dest, out).await
    }

    /// Publishes one event (the Publish RPC).
    pub async fn publish(&self, topic: &str, event: CloudEvent) -> crate::error::Result<()> {
        self.publish_many(topic, vec![event]).await
    }

    /// Publishes events in order (the HTTP topic endpoint; all or none
    /// where the bus can, so a refused batch is retried without duplicates).
    pub async fn publish_many(
        &self,
        topic: &str,
        events: Vec<CloudEvent>,
    ) -> crate::error::Result<()> {
        crate::model::validate_topic(topic)?;
        self.inner
            .bus
            .publish_many(topic, events)
            .await
            .map_err(|e| self.bus_error(topic, e))
    }

    /// Counts backpressure, and turns a bus error into the core's error.
    fn bus_error(&self, topic: &str, e: BusError) -> CoreError {
        if matches!(e, BusError::Backpressure(_)) {
            self.inner.metrics.record_backpressure(topic);
        }
        CoreError::Unavailable(e.to_string())
    }

    /// The bus backend's name, for health and logs.
    pub fn bus_name(&self) -> &'static str {
        self.inner.bus.name()
    }

    /// Where a push-based bus (Dapr) takes pushed events, if it is one.
    pub fn bus_intake(&self) -> Option<Arc<dyn crate::bus::PushIntake>> {
        self.inner.bus.intake()
    }

    /// The bus's circuit breaker (always closed for the embedded bus).
    pub fn bus_circuit(&self) -> crate::resilience::CircuitState {
        self.inner.bus.circuit()
    }

    /// A live feed of a topic (observers: gRPC Subscribe, SSE).
    pub fn watch(
        &self,
        topic: &str,
    ) -> crate::error::Result<tokio::sync::broadcast::Receiver<std::sync::Arc<CloudEvent>>> {
        crate::model::validate_topic(topic)?;
        Ok(self.inner.bus.watch(topic))
    }

    /// Builds a lifecycle event and hands it to the ordered publisher; never
    /// blocks and never fails the caller (seed: fire-and-forget).
    pub(crate) fn emit_lifecycle(
        &self,
        ctx: &RequestContext,
        slot: &Slot,
        kind: &str,
        error: Option<(&str, &str)>,
    ) {
        tracing::info!(
            target: "lifecycle",
            event = kind,
            worker_id = %slot.id,
            mime_type = %slot.mime_type,
            correlation_id = %ctx.correlation_id,
            error = error.map(|e| e.1).unwrap_or(""),
            "worker {kind}"
        );
        let mut data = Map::new();
        data.insert("worker_id".into(), json!(slot.id.as_str()));
        data.insert("replica_id".into(), json!(self.instance_id()));
        data.insert("topics".into(), json!(slot.topics));
        data.insert("mime_type".into(), json!(slot.mime_type));
        if let Some((error_type, message)) = error {
            data.insert("error_type".into(), json!(error_type));
            data.insert("error_message".into(), json!(message));
        }
        let event = CloudEvent::from_input(json!({
            "specversion": "1.0",
            "id": uuid::Uuid::new_v4().to_string(),
            "source": LIFECYCLE_SOURCE,
            "type": format!("com.virtufin.workmanager.lifecycle.{kind}"),
            "time": crate::model::now_rfc3339(),
            "datacontenttype": "application/json",
            "correlationid": ctx.correlation_id,
            "data": Value::Object(data),
        }));
        if self.inner.lifecycle_tx.try_send(event).is_err() {
            tracing::warn!(worker_id = %slot.id, event = kind, "lifecycle event dropped: publisher backlog full");
        }
    }

    /// Publishes lifecycle events in order, until the manager is dropped.
    pub fn spawn_lifecycle_publisher(&self) -> Option<tokio::task::JoinHandle<()>> {
        let mut rx = self
            .inner
            .lifecycle_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let bus = self.inner.bus.clone();
        Some(tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let Err(e) = bus.publish(LIFECYCLE_TOPIC, event).await {
                    tracing::warn!(error = %e, "could not publish a lifecycle event");
                }
            }
        }))
    }

    pub(crate) fn queue_depths(&self) -> Vec<(String, usize)> {
        self.slots()
            .iter()
            .filter(|s| s.status() == crate::model::WorkerStatus::Running)
            .map(|s| (s.id.to_string(), self.inner.bus.queue_depth(s.id.as_str())))
            .collect()
    }
}

fn retryable(e: &CoreError) -> bool {
    matches!(
        e,
        CoreError::WorkerError(_) | CoreError::DeadlineExceeded(_) | CoreError::Unavailable(_)
    )
}

fn error_type(e: &CoreError) -> &'static str {
    match e {
        CoreError::WorkerError(_) => "WorkerError",
        CoreError::DeadlineExceeded(_) => "Timeout",
        CoreError::Unavailable(_) => "Unavailable",
        CoreError::FailedPrecondition(_) => "WorkerFailed",
        CoreError::NotFound(_) => "NotFound",
        CoreError::InvalidArgument(_) => "InvalidArgument",
        CoreError::Internal(_) => "Internal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(v: Value) -> CloudEvent {
        CloudEvent(v.as_object().cloned().unwrap_or_default())
    }

    #[test]
    fn routing_precedence_and_publishtopic_is_stripped() {
        let input = ev(json!({"type": "in", "replytopic": "reply"}));
        let mut out = ev(json!({"type": "by-type", "publishtopic": "explicit"}));
        assert_eq!(route(&input, &mut out).as_deref(), Some("reply"));
        assert!(!out.0.contains_key("publishtopic"));

        let input = ev(json!({"type": "in"}));
        let mut out = ev(json!({"type": "by-type", "publishtopic": "explicit"}));
        assert_eq!(route(&input, &mut out).as_deref(), Some("explicit"));
        assert!(!out.0.contains_key("publishtopic"));

        let mut out = ev(json!({"type": "by-type"}));
        assert_eq!(route(&input, &mut out).as_deref(), Some("by-type"));
    }
}
