//! The bus contract as tests, run against every bus (embedded, Redis
//! Streams, NATS JetStream; some only against the networked ones).
use std::time::Duration;

use serde_json::json;
use workmanager_core::bus::{Ack, Bus, Subscription};
use workmanager_core::CloudEvent;

/// Event `n`, with an id no other call returns (the networked buses drop
/// repeated ids).
pub(crate) fn ev(n: u64) -> CloudEvent {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    CloudEvent::from_input(json!({
        "specversion": "1.0", "id": format!("e{n}-{unique}"), "source": "s", "type": "t", "data": n
    }))
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<workmanager_core::bus::Delivery>) -> u64 {
    let d = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a delivery within 10 s")
        .expect("the subscription is open");
    let n = d.event.0["data"].as_u64().unwrap();
    d.ack(Ack::Done);
    n
}

/// Takes the next delivery, checks that it is event `want` (its data), and
/// settles it with `outcome`.
pub(crate) async fn take(
    rx: &mut tokio::sync::mpsc::Receiver<workmanager_core::bus::Delivery>,
    want: u64,
    outcome: Ack,
) {
    let d = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a delivery within 20 s")
        .expect("the subscription is open");
    assert_eq!(d.event.0["data"], json!(want));
    d.ack(outcome);
}

/// For the networked buses: a retried message comes again, after a second
/// and then two (use an ack wait or visibility timeout longer than the
/// suite waits, to show it does not wait for that), and so does a delivery
/// dropped unsettled; messages settled meanwhile are not held up. Returns
/// worker "w1"'s subscription to topic "t", everything on it settled.
pub(crate) async fn a_retried_message_comes_again(bus: &dyn Bus) -> Subscription {
    let mut s = bus.subscribe(&["t".into()], "w1").await.unwrap();
    for i in 1..=3 {
        bus.publish("t", ev(i)).await.unwrap();
    }
    take(&mut s.receiver, 1, Ack::Retry).await;
    for want in [2, 3] {
        take(&mut s.receiver, want, Ack::Done).await;
    }
    take(&mut s.receiver, 1, Ack::Retry).await;
    take(&mut s.receiver, 1, Ack::Done).await;
    // A delivery dropped unsettled (its worker went away) comes back too.
    bus.publish("t", ev(4)).await.unwrap();
    let dropped = tokio::time::timeout(Duration::from_secs(20), s.receiver.recv())
        .await
        .expect("a delivery within 20 s");
    drop(dropped);
    take(&mut s.receiver, 4, Ack::Done).await;
    s
}

/// For the networked buses, with `setting` (their most deliveries of a
/// message) at 2: a message retried twice goes to the dead-letter topic
/// and is not delivered a third time.
pub(crate) async fn a_message_retried_too_often_goes_to_the_dead_letter_topic(
    bus: &dyn Bus,
    setting: &str,
) {
    let mut dead = bus.subscribe(&["t-dead".into()], "dlq").await.unwrap();
    let mut s = bus.subscribe(&["t".into()], "w1").await.unwrap();
    bus.publish("t", ev(7)).await.unwrap();
    for _ in 0..2 {
        take(&mut s.receiver, 7, Ack::Retry).await;
    }
    take_dead_letter(&mut dead.receiver, 7, setting, "w1").await;
    bus.publish("t", ev(8)).await.unwrap();
    // Not delivered a third time: the next delivery is the next message.
    take(&mut s.receiver, 8, Ack::Done).await;
}

/// For the networked buses, with a local queue of 8 and an ack wait or
/// visibility timeout of 1 s: a worker slower than that timeout per
/// backlog (its queue waits 4 s) still gets each message once. What waits
/// in the local queue is kept alive, not delivered again.
pub(crate) async fn a_slow_workers_backlog_is_delivered_once(bus: &dyn Bus) {
    let mut s = bus.subscribe(&["t".into()], "w1").await.unwrap();
    bus.publish_many("t", (1..=10).map(ev).collect())
        .await
        .unwrap();
    for want in 1..=10 {
        let d = tokio::time::timeout(Duration::from_secs(20), s.receiver.recv())
            .await
            .expect("a delivery within 20 s")
            .expect("the subscription is open");
        assert_eq!(
            d.event.0["data"],
            json!(want),
            "each message once, in order"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        d.ack(Ack::Done);
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(3), s.receiver.recv())
            .await
            .is_err(),
        "nothing is delivered twice"
    );
}

/// Takes the next delivery from a dead-letter subscription: event `want`,
/// dead-lettered by `worker` for a reason naming `setting`; settles it.
pub(crate) async fn take_dead_letter(
    rx: &mut tokio::sync::mpsc::Receiver<workmanager_core::bus::Delivery>,
    want: u64,
    setting: &str,
    worker: &str,
) {
    let d = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a dead letter within 20 s")
        .expect("the subscription is open");
    assert_eq!(d.event.0["data"], json!(want));
    let reason = d.event.get_str("deadletterreason").unwrap_or_default();
    assert!(reason.contains(setting), "reason: {reason}");
    assert_eq!(d.event.get_str("deadletterworker"), Some(worker));
    d.ack(Ack::Done);
}

/// For the buses with a duplicate check (Redis Streams, NATS JetStream): an
/// event published again — a publisher's retry, an output published again
/// after a crash — is delivered once; another producer's event that shares
/// its id is another event (CloudEvents: source + id), and is delivered.
pub(crate) async fn a_repeat_is_delivered_once_and_another_sources_event_is_kept(bus: &dyn Bus) {
    let mut s = bus.subscribe(&["t".into()], "w1").await.unwrap();
    let first = ev(1);
    let mut same_id_elsewhere = first.clone();
    same_id_elsewhere
        .0
        .insert("source".into(), json!("another-producer"));
    same_id_elsewhere.0.insert("data".into(), json!(2));
    bus.publish("t", first.clone()).await.unwrap();
    bus.publish("t", first).await.unwrap();
    bus.publish("t", same_id_elsewhere).await.unwrap();
    bus.publish("t", ev(3)).await.unwrap();
    for want in [1, 2, 3] {
        take(&mut s.receiver, want, Ack::Done).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(1), s.receiver.recv())
            .await
            .is_err(),
        "nothing more"
    );
}

/// Worker "w1" on topic "t" takes 1 of 20 messages, and stops while its
/// reader has taken more from the broker than it handed over (on a bus
/// whose local queue holds one message).
pub(crate) async fn stop_a_reader_with_messages_taken(bus: &dyn Bus) {
    let mut s = bus.subscribe(&["t".into()], "w1").await.unwrap();
    bus.publish_many("t", (1..=20).map(ev).collect())
        .await
        .unwrap();
    take(&mut s.receiver, 1, Ack::Done).await;
    // The reader goes on taking messages while the worker is busy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    bus.unsubscribe(&["t".into()], "w1").await;
}

/// A worker stopped while its reader has taken messages from the broker
/// and not yet handed them over (its queue was full) loses none of them:
/// subscribed again, it gets every one, even though it settles newer
/// messages first. Use a bus whose local queue holds one message.
pub(crate) async fn a_stopped_readers_messages_come_to_the_next_one(bus: &dyn Bus) {
    stop_a_reader_with_messages_taken(bus).await;
    let mut s = bus.subscribe(&["t".into()], "w1").await.unwrap();
    bus.publish_many("t", (21..=25).map(ev).collect())
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 24 {
        let d = tokio::time::timeout(Duration::from_secs(20), s.receiver.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "every message within 20 s of the last; missing: {:?}",
                    (2..=25).filter(|n| !seen.contains(n)).collect::<Vec<u64>>()
                )
            })
            .expect("the subscription is open");
        if let Some(n) = d.event.0["data"].as_u64() {
            seen.insert(n);
        }
        d.ack(Ack::Done);
    }
}

pub(crate) async fn each_group_gets_each_message_once_in_order(bus: &dyn Bus) {
    let mut a = bus.subscribe(&["orders".into()], "g-a").await.unwrap();
    let mut b = bus.subscribe(&["orders".into()], "g-b").await.unwrap();
    bus.publish_many("orders", (0..50).map(ev).collect())
        .await
        .unwrap();
    for n in 50..100 {
        bus.publish("orders", ev(n)).await.unwrap();
    }
    for rx in [&mut a.receiver, &mut b.receiver] {
        for n in 0..100 {
            assert_eq!(next(rx).await, n);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "nothing more"
        );
    }
}

pub(crate) async fn watchers_see_published_events(bus: &dyn Bus) {
    let mut w = bus.watch("feed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.publish("feed", ev(7)).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), w.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.0["data"], json!(7));
}

pub(crate) async fn unsubscribe_ends_the_subscription(bus: &dyn Bus) {
    let mut s = bus.subscribe(&["t".into()], "g").await.unwrap();
    bus.publish("t", ev(1)).await.unwrap();
    assert_eq!(next(&mut s.receiver).await, 1);
    bus.unsubscribe(&["t".into()], "g").await;
    let end = tokio::time::timeout(Duration::from_secs(10), s.receiver.recv()).await;
    assert!(
        matches!(end, Ok(None)),
        "the subscription ends after unsubscribe"
    );
}

/// A removed group (its worker was deleted) keeps nothing: subscribed
/// again, it starts with new messages, not with those published meanwhile.
pub(crate) async fn a_removed_group_starts_afresh(bus: &dyn Bus) {
    let mut s = bus.subscribe(&["t".into()], "g").await.unwrap();
    bus.publish("t", ev(1)).await.unwrap();
    assert_eq!(next(&mut s.receiver).await, 1);
    bus.unsubscribe(&["t".into()], "g").await;
    drop(s);
    // A stopped reader's last blocking read ends (Redis: within 0.5 s).
    tokio::time::sleep(Duration::from_millis(800)).await;
    bus.remove_group(&["t".into()], "g").await;
    bus.publish("t", ev(2)).await.unwrap();
    let mut s = bus.subscribe(&["t".into()], "g").await.unwrap();
    bus.publish("t", ev(3)).await.unwrap();
    assert_eq!(
        next(&mut s.receiver).await,
        3,
        "nothing kept for the removed group"
    );
}

/// A consumer and an observer keep working across a restart of the server
/// (`restart` restarts it). At least once: message 1 may come again if its
/// acknowledgement raced the restart; message 2 must come.
pub(crate) async fn consumers_and_observers_resume_after_a_restart(
    b: &dyn Bus,
    restart: impl FnOnce(),
) {
    use std::time::Instant;
    let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
    let mut w = b.watch("t");
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.publish("t", ev(1)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), s.receiver.recv())
        .await
        .expect("delivered")
        .expect("open");
    first.ack(Ack::Done);
    assert!(w.recv().await.is_ok());
    restart();
    // Publishing may fail while the connection heals; then it lands.
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.publish("t", ev(2)).await.is_err() {
        assert!(Instant::now() < deadline, "publishing never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let d = tokio::time::timeout(Duration::from_secs(30), s.receiver.recv())
            .await
            .expect("the consumer resumed")
            .expect("open");
        let n = d.event.0["data"].as_u64();
        d.ack(Ack::Done);
        if n == Some(2) {
            break;
        }
        assert_eq!(n, Some(1), "only a redelivery of 1 may come first");
    }
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), w.recv())
            .await
            .expect("the observer resumed")
            .expect("the feed is open");
        if e.0["data"] == serde_json::json!(2) {
            break;
        }
    }
}
