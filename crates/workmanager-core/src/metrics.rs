//! Prometheus metrics. One `Metrics` per service, shared by the core, the
//! engines and the api layer; `/metrics` renders it in the text format.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvocationLabels {
    pub engine: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabels {
    pub engine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub topic: String,
    pub worker: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

#[derive(Clone, Debug)]
pub struct TopicCounters {
    pub received: Counter,
    pub processed: Counter,
    pub failed: Counter,
    pub dead_lettered: Counter,
}

#[derive(Clone, Debug)]
pub struct EngineCounters {
    ok: Counter,
    error: Counter,
    seconds: Histogram,
}

impl EngineCounters {
    pub fn record(&self, ok: bool, seconds: f64) {
        if ok { &self.ok } else { &self.error }.inc();
        self.seconds.observe(seconds);
    }
}

pub struct Metrics {
    registry: Registry,
    /// Workers by status; refreshed by the manager just before rendering.
    pub workers: Family<StatusLabels, Gauge>,
    pub invocations: Family<InvocationLabels, Counter>,
    pub invocation_seconds: Family<EngineLabels, Histogram, fn() -> Histogram>,
    pub engine_restarts: Family<EngineLabels, Counter>,
    pub store_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    /// Messages by topic, worker and outcome (received, processed, failed, dead_lettered).
    pub messages: Family<MessageLabels, Counter>,
    /// Messages waiting for each running worker; refreshed before rendering.
    pub queue_depth: Family<WorkerLabels, Gauge>,
    /// Publishes refused because a consumer's queue stayed full.
    pub backpressure: Family<TopicLabels, Counter>,
    /// Circuit breaker per backend (statestore, pubsub): 0 closed, 1 open,
    /// 2 half-open; refreshed before rendering.
    pub circuit: Family<BackendLabels, Gauge>,
    /// Publishes refused because the buffer that holds them while the bus
    /// is down was full (the publisher was told to retry).
    pub publish_buffer_refused: Counter,
    /// Publishes waiting in that buffer; refreshed before rendering.
    pub publish_buffer_waiting: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("workmanager");
        let workers = Family::<StatusLabels, Gauge>::default();
        registry.register("workers", "Workers by status", workers.clone());
        let invocations = Family::<InvocationLabels, Counter>::default();
        registry.register(
            "invocations",
            "Events run through workers, by engine and outcome",
            invocations.clone(),
        );
        let invocation_seconds =
            Family::<EngineLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "invocation_duration_seconds",
            "Time to run one event through a worker's engine",
            invocation_seconds.clone(),
        );
        let engine_restarts = Family::<EngineLabels, Counter>::default();
        registry.register(
            "engine_restarts",
            "Worker processes restarted after a crash, timeout or missed ping",
            engine_restarts.clone(),
        );
        let store_seconds = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "store_operation_duration_seconds",
            "State store call latency by operation",
            store_seconds.clone(),
        );
        let messages = Family::<MessageLabels, Counter>::default();
        registry.register(
            "messages",
            "Messages by topic, worker and outcome",
            messages.clone(),
        );
        let queue_depth = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Messages waiting for each running worker",
            queue_depth.clone(),
        );
        let backpressure = Family::<TopicLabels, Counter>::default();
        registry.register(
            "backpressure_rejections",
            "Publishes refused because a consumer stayed behind",
            backpressure.clone(),
        );
        let circuit = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "circuit_state",
            "Circuit breaker per backend: 0 closed, 1 open, 2 half-open",
            circuit.clone(),
        );
        let publish_buffer_refused = Counter::default();
        registry.register(
            "publish_buffer_refused",
            "Publishes refused (retry later) because the buffer was full while the bus's circuit was open",
            publish_buffer_refused.clone(),
        );
        let publish_buffer_waiting = Gauge::default();
        registry.register(
            "publish_buffer_waiting",
            "Publishes waiting in the outbox for the bus's broker to answer again",
            publish_buffer_waiting.clone(),
        );
        Self {
            registry,
            circuit,
            publish_buffer_refused,
            publish_buffer_waiting,
            messages,
            queue_depth,
            backpressure,
            workers,
            invocations,
            invocation_seconds,
            engine_restarts,
            store_seconds,
        }
    }

    pub fn record_restart(&self, engine: &str) {
        self.engine_restarts
            .get_or_create(&EngineLabels {
                engine: engine.into(),
            })
            .inc();
    }

    /// One worker's message counters on one topic, resolved once so the
    /// message path does no label lookups.
    pub fn topic_counters(&self, topic: &str, worker: &str) -> TopicCounters {
        let c = |outcome: &str| {
            self.messages
                .get_or_create(&MessageLabels {
                    topic: topic.into(),
                    worker: worker.into(),
                    outcome: outcome.into(),
                })
                .clone()
        };
        TopicCounters {
            received: c("received"),
            processed: c("processed"),
            failed: c("failed"),
            dead_lettered: c("dead_lettered"),
        }
    }

    /// An engine's invocation metrics, resolved once.
    pub fn engine_counters(&self, engine: &str) -> EngineCounters {
        let c = |outcome: &str| {
            self.invocations
                .get_or_create(&InvocationLabels {
                    engine: engine.into(),
                    outcome: outcome.into(),
                })
                .clone()
        };
        EngineCounters {
            ok: c("ok"),
            error: c("error"),
            seconds: self
                .invocation_seconds
                .get_or_create(&EngineLabels {
                    engine: engine.into(),
                })
                .clone(),
        }
    }

    pub fn record_backpressure(&self, topic: &str) {
        self.backpressure
            .get_or_create(&TopicLabels {
                topic: topic.into(),
            })
            .inc();
    }

    pub fn record_store(&self, op: &str, seconds: f64) {
        self.store_seconds
            .get_or_create(&OpLabels { op: op.into() })
            .observe(seconds);
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
