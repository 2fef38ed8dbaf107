//! What the networked buses (Redis Streams, NATS JetStream) keep alike: a
//! reader task per consumer group, with its stop switch and local queue,
//! and a feed per watched topic whose reader runs while it has observers.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use workmanager_core::bus::Delivery;
use workmanager_core::CloudEvent;

/// Observer feed size per topic; slower observers skip ahead.
pub(crate) const WATCH_CAPACITY: usize = 4096;

/// How often the networked buses keep alive the messages a worker holds
/// (a third of their ack wait or visibility timeout, at least 100 ms), and
/// a timer that ticks that often.
pub(crate) fn keep_alive_timer(timeout: Duration) -> (Duration, tokio::time::Interval) {
    let every = (timeout / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    (every, tick)
}

/// How soon a message handed back for a retry is delivered again, at first.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// How soon a message handed back for a retry after its `deliveries`-th
/// delivery is delivered again: one second, doubling with each delivery up
/// to `cap` (the bus's ack wait or visibility timeout), so that a long
/// outage of what the worker needs does not use up the bus's max deliveries
/// in seconds.
pub(crate) fn retry_delay(deliveries: u64, cap: Duration) -> Duration {
    let doublings = deliveries.clamp(1, 16) as u32 - 1;
    (RETRY_DELAY * 2u32.pow(doublings)).min(cap.max(RETRY_DELAY))
}

/// A consumer group's reader: how to stop it, and its local queue (whose
/// fill is the group's queue depth).
pub(crate) struct GroupHandle {
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) queue: mpsc::Sender<Delivery>,
}

#[derive(Default)]
pub(crate) struct Readers {
    groups: Mutex<HashMap<String, GroupHandle>>,
    feeds: Mutex<HashMap<String, broadcast::Sender<Arc<CloudEvent>>>>,
}

impl Readers {
    /// Registers a group's reader; a previous reader of the group stops.
    pub(crate) fn add_group(&self, group: &str, handle: GroupHandle) {
        let old = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.to_string(), handle);
        if let Some(old) = old {
            let _ = old.stop.send(true);
        }
    }

    /// Stops a group's reader; what it handed over is still drained.
    pub(crate) fn stop_group(&self, group: &str) {
        let handle = self
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(group);
        if let Some(h) = handle {
            let _ = h.stop.send(true);
        }
    }

    pub(crate) fn queue_depth(&self, group: &str) -> usize {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(group)
            .map(|h| h.queue.max_capacity() - h.queue.capacity())
            .unwrap_or(0)
    }

    /// A receiver of the topic's feed. `start` is given the sender when the
    /// feed has no reader — none yet, or its observers all left and its
    /// reader stopped — and spawns one that runs while it has receivers.
    pub(crate) fn watch(
        &self,
        topic: &str,
        start: impl FnOnce(broadcast::Sender<Arc<CloudEvent>>),
    ) -> broadcast::Receiver<Arc<CloudEvent>> {
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = feeds.get(topic).filter(|tx| tx.receiver_count() > 0) {
            return tx.subscribe();
        }
        let (tx, rx) = broadcast::channel(WATCH_CAPACITY);
        feeds.insert(topic.to_string(), tx.clone());
        start(tx);
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_up_to_the_cap() {
        let wait = Duration::from_secs(60);
        assert_eq!(retry_delay(1, wait), Duration::from_secs(1));
        assert_eq!(retry_delay(3, wait), Duration::from_secs(4));
        assert_eq!(retry_delay(9, wait), wait);
        assert_eq!(retry_delay(u64::MAX, wait), wait);
    }
}
