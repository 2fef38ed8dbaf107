//! The message bus contract every backend implements (embedded, Redis
//! Streams, NATS JetStream, Dapr pub/sub).
//!
//! Two ways to read a topic:
//! - a **consumer group** (`subscribe`): every message of the topic reaches
//!   each group once, and is acknowledged (or not) after processing — one
//!   group per worker, so each worker sees each message once whichever
//!   instance hosts it;
//! - a **watch** (`watch`): a live feed for observers (SSE, gRPC Subscribe),
//!   best effort, never holding up publishers.
use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};

use crate::event::CloudEvent;

/// Where the messages of `topic` go that a worker could not process, or that
/// kept coming back unsettled.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}-dead")
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A consumer fell behind and its queue stayed full: back off and retry.
    #[error("{0}")]
    Backpressure(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Outcome reported for a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Processed (or dead-lettered): never deliver again.
    Done,
    /// Not processed: deliver again later.
    Retry,
}

/// Acknowledgement hook of one delivery; durable backends implement it.
pub trait Acker: Send + Sync {
    fn ack(&self, outcome: Ack);
}

/// One message delivered to a consumer group.
pub struct Delivery {
    /// Shared with every delivery of the topic: no allocation per message.
    pub topic: std::sync::Arc<str>,
    pub event: CloudEvent,
    pub acker: Option<Box<dyn Acker>>,
}

impl Delivery {
    pub fn ack(self, outcome: Ack) {
        if let Some(a) = self.acker {
            a.ack(outcome);
        }
    }
}

/// A consumer group's subscription to one or more topics.
pub struct Subscription {
    pub receiver: mpsc::Receiver<Delivery>,
}

/// A bus whose broker pushes messages to the service over HTTP (Dapr's
/// programmatic subscriptions): the HTTP API declares its subscriptions and
/// hands each pushed event in here.
#[async_trait]
pub trait PushIntake: Send + Sync {
    /// The pub/sub component name and the topics to declare.
    fn subscriptions(&self) -> (String, Vec<String>);

    /// Hands one pushed event to every local consumer group of `topic` and
    /// waits until each settled it: `Done` (tell the broker SUCCESS) or
    /// `Retry` (tell it RETRY: some group could not take it, or none here).
    async fn push(&self, topic: &str, event: CloudEvent) -> Ack;

    /// The token the broker must present on pushes (`APP_API_TOKEN`), if any.
    fn app_token(&self) -> Option<String>;
}

#[async_trait]
pub trait Bus: Send + Sync {
    /// Backend name for health and logs.
    fn name(&self) -> &'static str;

    /// Publishes to every group of the topic, waiting (bounded) for room;
    /// all groups get the message or none does.
    async fn publish(&self, topic: &str, event: CloudEvent) -> Result<(), BusError>;

    /// Publishes several events in order. Backends that can make it all or
    /// nothing do (the embedded bus, when the batch fits a queue), so a
    /// refused batch can be retried whole without duplicates.
    async fn publish_many(&self, topic: &str, events: Vec<CloudEvent>) -> Result<(), BusError> {
        for e in events {
            self.publish(topic, e).await?;
        }
        Ok(())
    }

    /// Publishes borrowed events, in order: a networked bus serialises them
    /// anyway, so a caller that must keep them (to retry or buffer) needs
    /// no copy. The default copies and calls `publish_many`.
    async fn publish_slice(&self, topic: &str, events: &[CloudEvent]) -> Result<(), BusError> {
        self.publish_many(topic, events.to_vec()).await
    }

    /// Joins (or creates) `group` on each topic; messages of all of them
    /// arrive on the one subscription, in publish order per topic.
    async fn subscribe(&self, topics: &[String], group: &str) -> Result<Subscription, BusError>;

    /// Leaves `group` on each topic; nothing more is delivered to it.
    async fn unsubscribe(&self, topics: &[String], group: &str);

    /// The group's worker was deleted: drop what the bus keeps for `group`
    /// on each topic (a networked bus's consumer group or durable consumer,
    /// with its position and pending messages), so deleted workers leave
    /// nothing behind on the broker. Called after `unsubscribe`; a group
    /// subscribed again later starts with new messages. Default: nothing
    /// kept.
    async fn remove_group(&self, topics: &[String], group: &str) {
        let _ = (topics, group);
    }

    /// A live feed of the topic for observers; lagging observers skip.
    /// Events are shared, not copied per observer: a sole observer takes its
    /// event back with `Arc::unwrap_or_clone` without a copy.
    fn watch(&self, topic: &str) -> broadcast::Receiver<std::sync::Arc<CloudEvent>>;

    /// Messages waiting for `group`, across its topics (a gauge).
    fn queue_depth(&self, group: &str) -> usize;

    /// The circuit breaker in front of the bus (see resilience.rs); a bus
    /// without one is always closed.
    fn circuit(&self) -> crate::resilience::CircuitState {
        crate::resilience::CircuitState::Closed
    }

    /// Publishes waiting for the broker in the resilience layer's outbox.
    fn buffered(&self) -> usize {
        0
    }

    /// For push-based buses, where the HTTP API delivers pushed events.
    fn intake(&self) -> Option<std::sync::Arc<dyn PushIntake>> {
        None
    }
}
