//! The embedded, in-process bus (the default): bounded queues, one per
//! consumer group, fed by every topic the group subscribed to; a broadcast
//! feed per topic for observers. Messages live in memory: at-most-once
//! across a crash (the durable backends give at-least-once).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};
use workmanager_core::bus::{Bus, BusError, Delivery, Subscription};
use workmanager_core::CloudEvent;

/// Observer feed size per topic; slower observers skip ahead.
const WATCH_CAPACITY: usize = 4096;

pub struct EmbeddedBus {
    state: Mutex<State>,
    /// Queue size of each consumer group.
    capacity: usize,
    /// How long a publisher waits for room before `Backpressure`.
    publish_wait: Duration,
}

#[derive(Default)]
struct State {
    /// topic → its subscribed groups.
    topics: HashMap<String, TopicEntry>,
    /// group → its queue (the sender the topics hold copies of).
    groups: HashMap<String, mpsc::Sender<Delivery>>,
    /// topic → observer feed.
    watches: HashMap<String, broadcast::Sender<Arc<CloudEvent>>>,
}

struct TopicEntry {
    /// The topic's name, shared by all its deliveries.
    name: Arc<str>,
    /// (group, its queue), so a publish copies only queue handles.
    groups: Vec<(String, mpsc::Sender<Delivery>)>,
}

impl EmbeddedBus {
    pub fn new(capacity: usize, publish_wait: Duration) -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity: capacity.max(1),
            publish_wait,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn publish(&self, topic: &str, event: CloudEvent) -> Result<(), BusError> {
        let (name, senders, watch) = {
            let state = self.state();
            let (name, senders) = match state.topics.get(topic) {
                Some(t) => (
                    t.name.clone(),
                    t.groups.iter().map(|(_, s)| s.clone()).collect(),
                ),
                None => (Arc::from(topic), Vec::new()),
            };
            (name, senders, state.watches.get(topic).cloned())
        };
        // Reserve room in every group first: all of them get it, or none.
        let mut permits = Vec::with_capacity(senders.len());
        let deadline = tokio::time::Instant::now() + self.publish_wait;
        for sender in &senders {
            match tokio::time::timeout_at(deadline, sender.reserve()).await {
                Ok(Ok(permit)) => permits.push(permit),
                Ok(Err(_)) => {} // the group left meanwhile
                Err(_) => {
                    return Err(BusError::Backpressure(format!(
                        "a consumer of topic {topic:?} is {} messages behind; retry shortly",
                        self.capacity
                    )))
                }
            }
        }
        // Each recipient needs its own copy; the last one takes the original.
        let watch = watch.filter(|w| w.receiver_count() > 0);
        let mut event = Some(event);
        let last = permits.len().saturating_sub(1);
        for (i, permit) in permits.into_iter().enumerate() {
            let copy = if i == last && watch.is_none() {
                event.take()
            } else {
                event.clone()
            };
            if let Some(e) = copy {
                permit.send(Delivery {
                    topic: name.clone(),
                    event: e,
                    acker: None,
                });
            }
        }
        if let (Some(w), Some(e)) = (watch, event) {
            let _ = w.send(Arc::new(e));
        }
        Ok(())
    }

    async fn publish_many(&self, topic: &str, events: Vec<CloudEvent>) -> Result<(), BusError> {
        if events.len() <= 1 || events.len() > self.capacity {
            // One event, or more than a queue holds: one by one.
            for e in events {
                self.publish(topic, e).await?;
            }
            return Ok(());
        }
        let (name, senders, watch) = {
            let state = self.state();
            let (name, senders): (Arc<str>, Vec<mpsc::Sender<Delivery>>) =
                match state.topics.get(topic) {
                    Some(t) => (
                        t.name.clone(),
                        t.groups.iter().map(|(_, s)| s.clone()).collect(),
                    ),
                    None => (Arc::from(topic), Vec::new()),
                };
            (name, senders, state.watches.get(topic).cloned())
        };
        // Room for the whole batch in every group, or nothing is published.
        let n = events.len();
        let mut permits = Vec::with_capacity(senders.len());
        let deadline = tokio::time::Instant::now() + self.publish_wait;
        for sender in &senders {
            match tokio::time::timeout_at(deadline, sender.reserve_many(n)).await {
                Ok(Ok(p)) => permits.push(p),
                Ok(Err(_)) => {} // the group left meanwhile
                Err(_) => {
                    return Err(BusError::Backpressure(format!(
                        "a consumer of topic {topic:?} has no room for {n} more messages; retry shortly"
                    )))
                }
            }
        }
        // As in `publish`: copies only for the second and later recipients.
        let watch = watch.filter(|w| w.receiver_count() > 0);
        let last = permits.len().saturating_sub(1);
        for event in events {
            let mut event = Some(event);
            for (i, p) in permits.iter_mut().enumerate() {
                let copy = if i == last && watch.is_none() {
                    event.take()
                } else {
                    event.clone()
                };
                if let (Some(permit), Some(e)) = (p.next(), copy) {
                    permit.send(Delivery {
                        topic: name.clone(),
                        event: e,
                        acker: None,
                    });
                }
            }
            if let (Some(w), Some(e)) = (&watch, event) {
                let _ = w.send(Arc::new(e));
            }
        }
        Ok(())
    }

    async fn subscribe(&self, topics: &[String], group: &str) -> Result<Subscription, BusError> {
        let (tx, rx) = mpsc::channel(self.capacity);
        let mut state = self.state();
        for t in topics {
            let entry = state.topics.entry(t.clone()).or_insert_with(|| TopicEntry {
                name: Arc::from(t.as_str()),
                groups: Vec::new(),
            });
            entry.groups.retain(|(g, _)| g != group);
            entry.groups.push((group.to_string(), tx.clone()));
        }
        state.groups.insert(group.to_string(), tx);
        Ok(Subscription { receiver: rx })
    }

    async fn unsubscribe(&self, topics: &[String], group: &str) {
        let mut state = self.state();
        for t in topics {
            if let Some(entry) = state.topics.get_mut(t) {
                entry.groups.retain(|(g, _)| g != group);
            }
        }
        // With every sender gone, the consumer drains what is queued, then ends.
        state.groups.remove(group);
    }

    fn watch(&self, topic: &str) -> broadcast::Receiver<Arc<CloudEvent>> {
        self.state()
            .watches
            .entry(topic.to_string())
            .or_insert_with(|| broadcast::channel(WATCH_CAPACITY).0)
            .subscribe()
    }

    fn queue_depth(&self, group: &str) -> usize {
        self.state()
            .groups
            .get(group)
            .map(|s| s.max_capacity() - s.capacity())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(n: u64) -> CloudEvent {
        CloudEvent::from_input(
            json!({"specversion":"1.0","id": n.to_string(),"source":"s","type":"t","data": n}),
        )
    }

    #[tokio::test]
    async fn each_group_gets_each_message_once_in_order() {
        let bus = EmbeddedBus::new(16, Duration::from_millis(50));
        let mut a = bus.subscribe(&["t".into()], "a").await.unwrap();
        let mut b = bus.subscribe(&["t".into(), "u".into()], "b").await.unwrap();
        for n in 0..5 {
            bus.publish("t", ev(n)).await.unwrap();
        }
        bus.publish("u", ev(99)).await.unwrap();
        for n in 0..5 {
            assert_eq!(a.receiver.recv().await.unwrap().event.0["data"], json!(n));
            assert_eq!(b.receiver.recv().await.unwrap().event.0["data"], json!(n));
        }
        let d = b.receiver.recv().await.unwrap();
        assert_eq!((&*d.topic, d.event.0["data"].clone()), ("u", json!(99)));
        assert!(a.receiver.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_full_group_pushes_back_and_nobody_gets_a_partial_publish() {
        let bus = EmbeddedBus::new(2, Duration::from_millis(50));
        let mut fast = bus.subscribe(&["t".into()], "fast").await.unwrap();
        let _slow = bus.subscribe(&["t".into()], "slow").await.unwrap();
        bus.publish("t", ev(1)).await.unwrap();
        bus.publish("t", ev(2)).await.unwrap();
        assert!(matches!(
            bus.publish("t", ev(3)).await,
            Err(BusError::Backpressure(_))
        ));
        assert_eq!(bus.queue_depth("slow"), 2);
        fast.receiver.recv().await.unwrap();
        fast.receiver.recv().await.unwrap();
        assert!(
            fast.receiver.try_recv().is_err(),
            "the refused message reached a group"
        );
    }

    #[tokio::test]
    async fn a_batch_is_published_whole_or_not_at_all() {
        let bus = EmbeddedBus::new(4, Duration::from_millis(50));
        let mut g = bus.subscribe(&["t".into()], "g").await.unwrap();
        bus.publish_many("t", (0..3).map(ev).collect())
            .await
            .unwrap();
        // Room for one more, not for three: refused whole.
        let r = bus.publish_many("t", (3..6).map(ev).collect()).await;
        assert!(matches!(r, Err(BusError::Backpressure(_))));
        for n in 0..3 {
            assert_eq!(g.receiver.recv().await.unwrap().event.0["data"], json!(n));
        }
        assert!(
            g.receiver.try_recv().is_err(),
            "part of a refused batch was delivered"
        );
        bus.publish_many("t", (3..6).map(ev).collect())
            .await
            .unwrap();
        for n in 3..6 {
            assert_eq!(g.receiver.recv().await.unwrap().event.0["data"], json!(n));
        }
    }

    #[tokio::test]
    async fn contract_each_group_gets_each_message_once_in_order() {
        let bus = EmbeddedBus::new(1024, Duration::from_millis(50));
        crate::bus_suite::each_group_gets_each_message_once_in_order(&bus).await;
    }

    #[tokio::test]
    async fn contract_watchers_see_published_events() {
        let bus = EmbeddedBus::new(8, Duration::from_millis(50));
        crate::bus_suite::watchers_see_published_events(&bus).await;
    }

    #[tokio::test]
    async fn contract_unsubscribe_ends_the_subscription() {
        let bus = EmbeddedBus::new(8, Duration::from_millis(50));
        crate::bus_suite::unsubscribe_ends_the_subscription(&bus).await;
    }

    #[tokio::test]
    async fn contract_a_removed_group_starts_afresh() {
        let bus = EmbeddedBus::new(8, Duration::from_millis(50));
        crate::bus_suite::a_removed_group_starts_afresh(&bus).await;
    }

    #[tokio::test]
    async fn unsubscribe_drains_then_ends_and_watchers_see_everything() {
        let bus = EmbeddedBus::new(8, Duration::from_millis(50));
        let mut w = bus.watch("t");
        let mut s = bus.subscribe(&["t".into()], "g").await.unwrap();
        bus.publish("t", ev(1)).await.unwrap();
        bus.unsubscribe(&["t".into()], "g").await;
        bus.publish("t", ev(2)).await.unwrap();
        assert_eq!(s.receiver.recv().await.unwrap().event.0["data"], json!(1));
        assert!(s.receiver.recv().await.is_none());
        assert_eq!(w.recv().await.unwrap().0["data"], json!(1));
        assert_eq!(w.recv().await.unwrap().0["data"], json!(2));
    }
}
