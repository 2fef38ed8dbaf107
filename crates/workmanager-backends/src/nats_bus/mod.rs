//! The NATS JetStream bus (`PubSub:Type=nats`): a stream per topic (subject
//! `workmanager.topic.<topic>`), a durable pull consumer per worker and
//! topic (so each worker gets each message once, whichever instance hosts
//! it), read in bursts of stored messages (`reader`), acknowledged once the
//! dispatcher settled it — cumulatively, one ack per burst of settled
//! messages (`acks`) — redelivery after `ack_wait`, a retry as a NAK with a
//! growing delay, and a message delivered more than `max_deliver` times
//! moved to `{topic}-dead`. The client reconnects by itself. Observers use
//! a core-NATS subscription on the same subject.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, watch};
use workmanager_core::bus::{dead_letter_topic, Ack, Acker, Bus, BusError, Delivery, Subscription};
use workmanager_core::CloudEvent;

use crate::readers::{GroupHandle, Readers};

mod acks;
mod reader;

use acks::{spawn_ack_task, NatsAck};
use reader::Reader;

#[derive(Debug, Clone)]
pub struct NatsBusSettings {
    /// Messages kept per topic stream (oldest dropped beyond).
    pub stream_max_messages: i64,
    /// Unacknowledged messages are redelivered after this long.
    pub ack_wait: Duration,
    /// Deliveries of one message before JetStream gives up on it.
    pub max_deliver: i64,
    /// Local queue per group.
    pub capacity: usize,
    /// `Nats:DedupWindowSeconds`: a repeat of an event (source and id)
    /// published to a topic within this long is stored once — JetStream's
    /// `Nats-Msg-Id` de-duplication, the stream's `duplicate_window`. Zero:
    /// off.
    pub dedup_window: Duration,
}

/// How to reach and authenticate to the server.
#[derive(Clone, Default)]
pub struct NatsAuth {
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// `Nats:NKeySeed`: an nkey seed (a secret) to sign the server's nonce.
    pub nkey_seed: Option<String>,
    /// `Nats:CredentialsFile`: a `.creds` file (JWT + nkey seed).
    pub credentials_file: Option<std::path::PathBuf>,
    /// `Nats:CaPath`: CA bundle for the server's certificate (TLS on).
    pub ca: Option<std::path::PathBuf>,
    /// `Nats:ClientCertificatePath` / `Nats:ClientKeyPath`: our
    /// certificate, for servers that verify clients (TLS on).
    pub client_certificate: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: NatsBusSettings,
    streams: tokio::sync::Mutex<HashMap<String, stream::Stream>>,
    readers: Readers,
}

pub fn subject(topic: &str) -> String {
    format!("workmanager.topic.{topic}")
}

/// A JetStream-safe name for a topic's stream or a group's consumer:
/// letters, digits, `-` and `_` kept, anything else hex-escaped.
pub fn safe_name(prefix: &str, s: &str) -> String {
    let mut out = String::from(prefix);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("NATS: {e}"))
}

fn decode(payload: &[u8]) -> Option<CloudEvent> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .map(CloudEvent::from_input)
}

impl NatsBus {
    pub async fn connect(
        url: &str,
        auth: NatsAuth,
        settings: NatsBusSettings,
    ) -> Result<Self, BusError> {
        let mut opts = async_nats::ConnectOptions::new();
        if let Some(t) = auth.token {
            opts = opts.token(t);
        }
        if let (Some(u), Some(p)) = (auth.user, auth.password) {
            opts = opts.user_and_password(u, p);
        }
        if let Some(seed) = auth.nkey_seed {
            opts = opts.nkey(seed);
        }
        if let Some(path) = auth.credentials_file {
            opts = opts.credentials_file(&path).await.map_err(|e| {
                BusError::Unavailable(format!(
                    "cannot read {} (Nats:CredentialsFile): {e}",
                    path.display()
                ))
            })?;
        }
        let mut tls = url.starts_with("tls://");
        if let Some(ca) = auth.ca {
            opts = opts.add_root_certificates(ca);
            tls = true;
        }
        if let Some((cert, key)) = auth.client_certificate {
            opts = opts.add_client_certificate(cert, key);
            tls = true;
        }
        opts = opts.require_tls(tls);
        let client = tokio::time::timeout(Duration::from_secs(10), opts.connect(url))
            .await
            .map_err(|_| BusError::Unavailable(format!("NATS at {url} did not answer (Nats:Url)")))?
            .map_err(|e| {
                BusError::Unavailable(format!(
                    "cannot connect to NATS at {url}: {e} (Nats:Url, Nats:Token / Nats:User / Nats:Password / Nats:NKeySeed / Nats:CredentialsFile, Nats:CaPath / Nats:ClientCertificatePath)"
                ))
            })?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            settings,
            streams: tokio::sync::Mutex::new(HashMap::new()),
            readers: Readers::default(),
        })
    }

    /// Publishes each event with its dedup key as `Nats-Msg-Id`, then waits
    /// for every acknowledgement.
    async fn try_publish(&self, topic: &str, events: &[CloudEvent]) -> Result<(), Failed> {
        self.stream(topic).await.map_err(Failed::Other)?;
        let subj = subject(topic);
        let mut acks = Vec::with_capacity(events.len());
        let dedup = !self.settings.dedup_window.is_zero();
        // Every event's JSON in one buffer, each payload a slice of it: one
        // allocation per batch instead of one (grown three times) per event.
        let mut json = Vec::with_capacity(events.len() * 1024);
        let mut ends = Vec::with_capacity(events.len());
        for e in events {
            e.write_json(&mut json);
            ends.push(json.len());
        }
        let json = bytes::Bytes::from(json);
        let mut start = 0;
        for (e, end) in events.iter().zip(ends) {
            let payload = json.slice(start..end);
            start = end;
            let mut publish = jetstream::context::Publish::build().payload(payload);
            if let Some(key) = e.dedup_key().filter(|_| dedup) {
                publish = publish.message_id(key);
            }
            acks.push(self.js.send_publish(subj.clone(), publish).await?);
        }
        for a in acks {
            a.await?;
        }
        Ok(())
    }

    async fn stream(&self, topic: &str) -> Result<stream::Stream, BusError> {
        let mut streams = self.streams.lock().await;
        if let Some(s) = streams.get(topic) {
            return Ok(s.clone());
        }
        let s = ensure_stream(&self.js, topic, &self.settings).await?;
        streams.insert(topic.to_string(), s.clone());
        Ok(s)
    }
}

/// Why a publish failed: its stream is gone (made again and retried), or
/// anything else.
enum Failed {
    StreamGone(jetstream::context::PublishError),
    Other(BusError),
}

impl From<jetstream::context::PublishError> for Failed {
    fn from(e: jetstream::context::PublishError) -> Self {
        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
            Failed::StreamGone(e)
        } else {
            Failed::Other(unavailable(e))
        }
    }
}

/// The topic's stream, created if missing. A stream whose duplicate window
/// is not `Nats:DedupWindowSeconds` (made by an older version, or before
/// the setting changed) is updated to it.
async fn ensure_stream(
    js: &jetstream::Context,
    topic: &str,
    settings: &NatsBusSettings,
) -> Result<stream::Stream, BusError> {
    let mut config = stream::Config {
        name: safe_name("wm_", topic),
        subjects: vec![subject(topic)],
        max_messages: settings.stream_max_messages,
        ..Default::default()
    };
    if !settings.dedup_window.is_zero() {
        config.duplicate_window = settings.dedup_window;
    }
    let mut s = js.get_or_create_stream(config).await.map_err(unavailable)?;
    let current = s.cached_info().config.clone();
    if !settings.dedup_window.is_zero() && current.duplicate_window != settings.dedup_window {
        js.update_stream(stream::Config {
            duplicate_window: settings.dedup_window,
            ..current
        })
        .await
        .map_err(unavailable)?;
        s = js
            .get_stream(safe_name("wm_", topic))
            .await
            .map_err(unavailable)?;
    }
    Ok(s)
}

/// Failed reads in a row after which a consumer is opened again.
const REOPEN_AFTER_FAILURES: u32 = 3;

/// Opens a consumer's messages again, after its reads kept failing: the
/// server was away, or the consumer or its stream was deleted. The stream
/// is made again if it is gone. A durable consumer that still exists
/// resumes where it was; one that is gone is made again, from the start of
/// its stream if the stream itself is new (`made`: when the stream the
/// consumer read was made), else with new messages, as at first.
async fn reopen(
    js: &jetstream::Context,
    topic: &str,
    name: &str,
    settings: &NatsBusSettings,
    made: &mut i128,
) -> Result<(consumer::PullConsumer, Reader), BusError> {
    let stream = ensure_stream(js, topic, settings).await?;
    let now = stream.cached_info().created.unix_timestamp_nanos();
    let new_stream = now != *made;
    let consumer = consumer_for(&stream, name, settings, new_stream).await?;
    let messages = Reader::new(consumer.clone());
    if new_stream {
        tracing::warn!(
            topic,
            consumer = name,
            "the topic's stream was made again; consuming it from its start"
        );
    }
    *made = now;
    Ok((consumer, messages))
}

/// The group's durable consumer `name` on `stream`, made if absent: with
/// new messages only, or from the stream's start (`from_start`). A consumer
/// made by an older version with per-message acknowledgements is replaced
/// by one that starts after its acknowledged floor (the messages it had
/// delivered but not acknowledged come again: at-least-once).
async fn consumer_for(
    stream: &stream::Stream,
    name: &str,
    settings: &NatsBusSettings,
    from_start: bool,
) -> Result<consumer::PullConsumer, BusError> {
    let config = consumer::pull::Config {
        durable_name: Some(name.to_string()),
        deliver_policy: if from_start {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::New
        },
        ack_policy: consumer::AckPolicy::All,
        ack_wait: settings.ack_wait,
        // Unbounded at the server: past `Nats:MaxDeliver` the reader moves
        // the message to the dead-letter topic itself.
        max_deliver: -1,
        ..Default::default()
    };
    let existing: consumer::PullConsumer = stream
        .get_or_create_consumer(name, config.clone())
        .await
        .map_err(unavailable)?;
    let info = existing.cached_info();
    if info.config.ack_policy == consumer::AckPolicy::All {
        return Ok(existing);
    }
    let start_sequence = info.ack_floor.stream_sequence + 1;
    tracing::info!(
        consumer = name,
        start_sequence,
        "replacing a JetStream consumer that acknowledged message by message"
    );
    stream.delete_consumer(name).await.map_err(unavailable)?;
    stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence },
            ..config
        })
        .await
        .map_err(unavailable)
}

/// Publishes `event` to `{topic}-dead` with the reason: it was delivered
/// more than `max_deliver` times without being settled.
async fn dead_letter(
    js: &jetstream::Context,
    settings: &NatsBusSettings,
    topic: &str,
    group: &str,
    mut event: CloudEvent,
) -> Result<(), BusError> {
    let dead = dead_letter_topic(topic);
    ensure_stream(js, &dead, settings).await?;
    event.mark_dead_letter(
        format!(
            "delivered more than {} times (Nats:MaxDeliver) without being settled",
            settings.max_deliver
        ),
        group,
    );
    let payload = event.to_json();
    js.publish(subject(&dead), payload.into())
        .await
        .map_err(unavailable)?
        .await
        .map_err(unavailable)?;
    Ok(())
}

#[async_trait]
impl Bus for NatsBus {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, topic: &str, event: CloudEvent) -> Result<(), BusError> {
        self.publish_many(topic, vec![event]).await
    }

    /// Sends every event, then waits for every server acknowledgement.
    async fn publish_many(&self, topic: &str, events: Vec<CloudEvent>) -> Result<(), BusError> {
        self.publish_slice(topic, &events).await
    }

    /// A stream deleted behind the service's back (by an operator, or a
    /// cleanup) is made again: the publish that finds it gone forgets the
    /// stream this bus had seen, makes it anew and is sent once more (what
    /// the first attempt stored went with the stream; repeats within the
    /// new one are dropped by their `Nats-Msg-Id`).
    async fn publish_slice(&self, topic: &str, events: &[CloudEvent]) -> Result<(), BusError> {
        match self.try_publish(topic, events).await {
            Err(Failed::StreamGone(_)) => {
                tracing::warn!(topic, "the topic's stream is gone; making it again");
                self.streams.lock().await.remove(topic);
                self.try_publish(topic, events).await
            }
            other => other,
        }
        .map_err(|f| match f {
            Failed::StreamGone(e) => unavailable(e),
            Failed::Other(e) => e,
        })
    }

    async fn subscribe(&self, topics: &[String], group: &str) -> Result<Subscription, BusError> {
        let (tx, rx) = mpsc::channel(self.settings.capacity.max(1));
        let (stop_tx, stop_rx) = watch::channel(false);
        for t in topics {
            let stream = self.stream(t).await?;
            let mut made = stream.cached_info().created.unix_timestamp_nanos();
            let name = safe_name("w_", group);
            let consumer = consumer_for(&stream, &name, &self.settings, false).await?;
            let mut messages = Reader::new(consumer.clone());
            let (tx, mut stop, topic) = (tx.clone(), stop_rx.clone(), Arc::<str>::from(t.as_str()));
            let client = self.client.clone();
            let mut acks = spawn_ack_task(&client, self.settings.ack_wait, &consumer);
            let (js, settings, group) = (self.js.clone(), self.settings.clone(), group.to_string());
            tokio::spawn(async move {
                // Failed reads in a row: past a few, the consumer (or its
                // stream) may be gone, and is opened again.
                let mut failures = 0u32;
                loop {
                    let next = tokio::select! {
                        _ = stop.wait_for(|s| *s) => {
                            tokio::spawn(messages.drain());
                            return;
                        }
                        m = messages.next() => m,
                    };
                    let m = match next {
                        Ok(m) => {
                            failures = 0;
                            m
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "JetStream consumer error; retrying");
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            if failures >= REOPEN_AFTER_FAILURES {
                                match reopen(&js, &topic, &name, &settings, &mut made).await {
                                    Ok((consumer, m)) => {
                                        // The old consumer's deliveries settle
                                        // through the old task.
                                        acks =
                                            spawn_ack_task(&client, settings.ack_wait, &consumer);
                                        messages = m;
                                        failures = 0;
                                    }
                                    Err(e) => {
                                        tracing::debug!(error = %e, "reopening the JetStream consumer failed")
                                    }
                                }
                            }
                            continue;
                        }
                    };
                    let (Some(reply), Ok((seq, delivered, consumer_seq))) = (
                        m.message.reply.clone(),
                        m.info()
                            .map(|i| (i.stream_sequence, i.delivered, i.consumer_sequence)),
                    ) else {
                        // Every message of a pull consumer carries its ack
                        // subject, with its sequence in it; one that does
                        // not cannot be acknowledged and is left alone.
                        tracing::warn!(subject = %m.subject, "JetStream message without delivery information skipped");
                        continue;
                    };
                    messages.delivered(consumer_seq, &acks).await;
                    let event = decode(&m.payload);
                    let ack = NatsAck::handing_over(seq, delivered, reply, &acks);
                    let Some(event) = event else {
                        tracing::warn!(topic = %topic, seq, "unreadable JetStream message acknowledged and skipped");
                        ack.ack(Ack::Done);
                        continue;
                    };
                    if delivered > settings.max_deliver {
                        let moved = dead_letter(&js, &settings, &topic, &group, event).await;
                        match moved {
                            Ok(()) => {
                                tracing::warn!(topic = %topic, group, seq, "a message delivered too often was dead-lettered");
                                ack.ack(Ack::Done);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "dead-lettering failed; the message comes again");
                                ack.ack(Ack::Retry);
                            }
                        }
                        continue;
                    }
                    let d = Delivery {
                        topic: topic.clone(),
                        event,
                        acker: Some(Box::new(ack)),
                    };
                    if tx.send(d).await.is_err() {
                        tokio::spawn(messages.drain());
                        return;
                    }
                }
            });
        }
        self.readers.add_group(
            group,
            GroupHandle {
                stop: stop_tx,
                queue: tx,
            },
        );
        Ok(Subscription { receiver: rx })
    }

    async fn unsubscribe(&self, _topics: &[String], group: &str) {
        self.readers.stop_group(group);
    }

    /// Deletes the group's durable consumer on each topic's stream.
    async fn remove_group(&self, topics: &[String], group: &str) {
        let name = safe_name("w_", group);
        for t in topics {
            let deleted = match self.stream(t).await {
                Ok(stream) => stream
                    .delete_consumer(&name)
                    .await
                    .map(|_| ())
                    .map_err(unavailable),
                Err(e) => Err(e),
            };
            if let Err(e) = deleted {
                tracing::warn!(error = %e, topic = %t, consumer = name, "deleting the JetStream consumer failed; it stays on the server");
            }
        }
    }

    fn watch(&self, topic: &str) -> broadcast::Receiver<Arc<CloudEvent>> {
        self.readers.watch(topic, |tx| {
            let client = self.client.clone();
            let subj = subject(topic);
            tokio::spawn(async move {
                let Ok(mut sub) = client.subscribe(subj).await else {
                    return;
                };
                while let Some(m) = sub.next().await {
                    if tx.receiver_count() == 0 {
                        return;
                    }
                    if let Some(e) = decode(&m.payload) {
                        let _ = tx.send(Arc::new(e));
                    }
                }
            });
        })
    }

    fn queue_depth(&self, group: &str) -> usize {
        self.readers.queue_depth(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus_suite as suite;
    use crate::testing::NatsServer;

    fn settings() -> NatsBusSettings {
        NatsBusSettings {
            stream_max_messages: 100_000,
            ack_wait: Duration::from_secs(1),
            max_deliver: 5,
            capacity: 1024,
            dedup_window: Duration::from_secs(60),
        }
    }

    async fn bus(n: &NatsServer) -> NatsBus {
        bus_with(n, settings()).await
    }

    async fn bus_with(n: &NatsServer, settings: NatsBusSettings) -> NatsBus {
        NatsBus::connect(&n.url(), NatsAuth::default(), settings)
            .await
            .unwrap()
    }

    async fn recv(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a delivery within 20 s")
            .expect("the subscription is open")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn each_group_gets_each_message_once_in_order() {
        let n = NatsServer::start();
        suite::each_group_gets_each_message_once_in_order(&bus(&n).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn watchers_see_published_events() {
        let n = NatsServer::start();
        suite::watchers_see_published_events(&bus(&n).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unsubscribe_ends_the_subscription() {
        let n = NatsServer::start();
        suite::unsubscribe_ends_the_subscription(&bus(&n).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_repeat_is_delivered_once_and_another_sources_event_is_kept() {
        let n = NatsServer::start();
        suite::a_repeat_is_delivered_once_and_another_sources_event_is_kept(&bus(&n).await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_removed_group_starts_afresh() {
        let n = NatsServer::start();
        suite::a_removed_group_starts_afresh(&bus(&n).await).await;
    }

    /// With an ack wait longer than the suite waits for a message: what the
    /// stopped reader had taken is handed back, not left to time out.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_stopped_readers_messages_come_to_the_next_one() {
        let n = NatsServer::start();
        let settings = NatsBusSettings {
            capacity: 1,
            ack_wait: Duration::from_secs(60),
            ..settings()
        };
        let b = bus_with(&n, settings).await;
        suite::a_stopped_readers_messages_come_to_the_next_one(&b).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_unacknowledged_message_is_redelivered_to_the_next_consumer() {
        let n = NatsServer::start();
        let first = bus(&n).await;
        let mut s = first.subscribe(&["t".into()], "w1").await.unwrap();
        first.publish("t", suite::ev(9)).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(10), s.receiver.recv())
            .await
            .unwrap()
            .unwrap();
        // The instance dies before acknowledging: its connection goes,
        // and with it the keep-alive of what it held.
        std::mem::forget(d);
        first.unsubscribe(&["t".into()], "w1").await;
        first.client.drain().await.unwrap();
        let second = bus(&n).await;
        let mut s2 = second.subscribe(&["t".into()], "w1").await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(15), s2.receiver.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.event.0["data"], serde_json::json!(9));
        d.ack(Ack::Done);
    }

    /// The retried message is handed back twice (1 s, then 2 s later):
    /// the messages settled after it wait for it longer than the ack wait,
    /// unacknowledged but kept alive, so they are not delivered again
    /// meanwhile.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_retried_message_comes_again_and_nothing_settled_is_delivered_twice() {
        let n = NatsServer::start();
        let settings = NatsBusSettings {
            ack_wait: Duration::from_secs(2),
            ..settings()
        };
        let b = bus_with(&n, settings.clone()).await;
        let s = suite::a_retried_message_comes_again(&b).await;
        b.unsubscribe(&["t".into()], "w1").await;
        drop(s);
        // Everything was settled: the next consumer of the group, past the
        // ack wait, gets only what is new.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let heir = bus_with(&n, settings).await;
        let mut s = heir.subscribe(&["t".into()], "w1").await.unwrap();
        heir.publish("t", suite::ev(5)).await.unwrap();
        suite::take(&mut s.receiver, 5, Ack::Done).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_slow_workers_backlog_is_delivered_once() {
        let n = NatsServer::start();
        let b = bus_with(
            &n,
            NatsBusSettings {
                capacity: 8,
                ..settings()
            },
        )
        .await;
        suite::a_slow_workers_backlog_is_delivered_once(&b).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_message_retried_too_often_goes_to_the_dead_letter_topic() {
        let n = NatsServer::start();
        let b = bus_with(
            &n,
            NatsBusSettings {
                max_deliver: 2,
                ..settings()
            },
        )
        .await;
        suite::a_message_retried_too_often_goes_to_the_dead_letter_topic(&b, "Nats:MaxDeliver")
            .await;
    }

    /// An output topic whose stream an operator deleted keeps taking
    /// publishes: the stream is made again, and what is published lands.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_stream_deleted_behind_the_service_is_made_again_by_the_next_publish() {
        let n = NatsServer::start();
        let b = bus(&n).await;
        b.publish("t", suite::ev(1)).await.unwrap();
        b.js.delete_stream(safe_name("wm_", "t")).await.unwrap();
        b.publish_many("t", vec![suite::ev(2), suite::ev(3)])
            .await
            .expect("the publish makes the stream again");
        let mut s = b.js.get_stream(safe_name("wm_", "t")).await.unwrap();
        assert_eq!(s.info().await.unwrap().state.messages, 2);
    }

    /// A worker whose input stream an operator deleted goes on consuming
    /// what is published to the topic afterwards.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_consumer_whose_stream_was_deleted_resumes_on_the_new_stream() {
        let n = NatsServer::start();
        let b = bus(&n).await;
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        b.publish("t", suite::ev(1)).await.unwrap();
        suite::take(&mut s.receiver, 1, Ack::Done).await;
        b.js.delete_stream(safe_name("wm_", "t")).await.unwrap();
        b.publish("t", suite::ev(2)).await.unwrap();
        suite::take(&mut s.receiver, 2, Ack::Done).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stream_made_without_the_dedup_window_is_given_it() {
        let n = NatsServer::start();
        let b = bus(&n).await;
        // What an older version made: the server's default window.
        b.js.create_stream(stream::Config {
            name: safe_name("wm_", "t"),
            subjects: vec![subject("t")],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut s = b.stream("t").await.unwrap();
        let info = s.info().await.unwrap();
        assert_eq!(info.config.duplicate_window, Duration::from_secs(60));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_consumer_left_by_an_older_version_resumes_after_its_acknowledged_messages() {
        let n = NatsServer::start();
        let b = bus(&n).await;
        // What an older version made: per-message acknowledgements.
        let stream = b.stream("t").await.unwrap();
        let name = safe_name("w_", "w1");
        let old: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
        for i in 1..=3 {
            b.publish("t", suite::ev(i)).await.unwrap();
        }
        let mut batch = old.fetch().max_messages(3).messages().await.unwrap();
        let m = batch.next().await.unwrap().unwrap();
        m.double_ack().await.unwrap();
        drop(batch);
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        for want in [2, 3] {
            suite::take(&mut s.receiver, want, Ack::Done).await;
        }
        let info = stream.consumer_info(&name).await.unwrap();
        assert_eq!(info.config.ack_policy, consumer::AckPolicy::All);
    }

    /// A message the consumer delivered elsewhere (here to another
    /// client's pull request, which never settles it; in the service, a
    /// request a reader gave up or a stopped reader left open) is not
    /// acknowledged along with the newer messages this reader settles: it
    /// comes again after the ack wait.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_message_delivered_elsewhere_is_not_acknowledged_with_later_ones() {
        let n = NatsServer::start();
        let settings = NatsBusSettings {
            ack_wait: Duration::from_secs(2),
            ..settings()
        };
        let b = bus_with(&n, settings.clone()).await;
        let stream = b.stream("t").await.unwrap();
        let consumer = consumer_for(&stream, &safe_name("w_", "w1"), &settings, false)
            .await
            .unwrap();
        let mut elsewhere = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.publish("t", suite::ev(1)).await.unwrap();
        let taken = tokio::time::timeout(Duration::from_secs(10), elsewhere.next())
            .await
            .expect("the older request gets the first message")
            .unwrap()
            .unwrap();
        let taken = decode(&taken.payload).expect("an event");
        assert_eq!(taken.0["data"], serde_json::json!(1));
        b.publish("t", suite::ev(2)).await.unwrap();
        suite::take(&mut s.receiver, 2, Ack::Done).await;
        suite::take(&mut s.receiver, 1, Ack::Done).await;
    }

    /// Messages done but not acknowledged when their reader stopped (an
    /// earlier one was not settled) come again at once, not after the ack
    /// wait (longer here than the test waits).
    #[tokio::test(flavor = "multi_thread")]
    async fn messages_done_behind_an_unsettled_one_come_again_when_the_reader_stops() {
        let n = NatsServer::start();
        let settings = NatsBusSettings {
            ack_wait: Duration::from_secs(60),
            ..settings()
        };
        let b = bus_with(&n, settings).await;
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        b.publish_many("t", (1..=3).map(suite::ev).collect())
            .await
            .unwrap();
        let unsettled = recv(&mut s.receiver).await;
        assert_eq!(unsettled.event.0["data"], serde_json::json!(1));
        suite::take(&mut s.receiver, 2, Ack::Done).await;
        suite::take(&mut s.receiver, 3, Ack::Done).await;
        b.unsubscribe(&["t".into()], "w1").await;
        drop(unsettled);
        drop(s);
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 3 {
            let d = recv(&mut s.receiver).await;
            seen.extend(d.event.0["data"].as_u64());
            d.ack(Ack::Done);
        }
    }

    /// Messages an earlier reader left unsettled hold the next reader's
    /// acknowledgements only while they may still come again: once they
    /// are gone from the stream (purged here), what the new reader settles
    /// is acknowledged after twice the ack wait, not held for ever.
    #[tokio::test(flavor = "multi_thread")]
    async fn messages_a_stopped_reader_left_that_are_gone_stop_holding_acknowledgements() {
        let n = NatsServer::start();
        let settings = NatsBusSettings {
            capacity: 1,
            ..settings()
        };
        let b = bus_with(&n, settings).await;
        suite::stop_a_reader_with_messages_taken(&b).await;
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        let stream = b.stream("t").await.unwrap();
        stream.purge().await.unwrap();
        b.publish("t", suite::ev(21)).await.unwrap();
        // Some of those the stopped reader handed back may come before the
        // purge did: settled like any other.
        loop {
            let d = recv(&mut s.receiver).await;
            let n = d.event.0["data"].as_u64();
            d.ack(Ack::Done);
            if n == Some(21) {
                break;
            }
        }
        let name = safe_name("w_", "w1");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let info = stream.consumer_info(&name).await.unwrap();
            if info.ack_floor.stream_sequence >= 21 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "21 acknowledged within 15 s; ack floor {}",
                info.ack_floor.stream_sequence
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[test]
    fn names_are_jetstream_safe_and_distinct() {
        assert_eq!(safe_name("wm_", "tp.out"), "wm_tp_2eout");
        assert_ne!(safe_name("wm_", "a.b"), safe_name("wm_", "a_b"));
        assert_eq!(subject("a.b"), "workmanager.topic.a.b");
    }

    /// A throwaway CA and a certificate it signed for `names`, as PEM.
    fn ca_and_leaf(
        ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
        names: &[&str],
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        (p.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn tls_with_client_certificates_connects_only_with_ours() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca_path = write("ca.pem", &ca.pem());
        let (server_cert, server_key) = ca_and_leaf(&ca, &["127.0.0.1", "localhost"]);
        let (client_cert, client_key) = ca_and_leaf(&ca, &["workmanager"]);
        let (sc, sk) = (
            write("server.pem", &server_cert),
            write("server.key", &server_key),
        );
        let (cc, ck) = (
            write("client.pem", &client_cert),
            write("client.key", &client_key),
        );
        let nats = NatsServer::start_with(&[
            "--tls",
            "--tlscert",
            sc.to_str().unwrap(),
            "--tlskey",
            sk.to_str().unwrap(),
            "--tlscacert",
            ca_path.to_str().unwrap(),
            "--tlsverify",
        ]);
        let auth = |client: bool| NatsAuth {
            ca: Some(ca_path.clone()),
            client_certificate: client.then(|| (cc.clone(), ck.clone())),
            ..NatsAuth::default()
        };
        let b = NatsBus::connect(&nats.url(), auth(true), settings())
            .await
            .unwrap();
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        b.publish("t", suite::ev(5)).await.unwrap();
        suite::take(&mut s.receiver, 5, Ack::Done).await;
        assert!(
            NatsBus::connect(&nats.url(), auth(false), settings())
                .await
                .is_err(),
            "a client without a certificate is refused"
        );
        let plain = NatsBus::connect(&nats.url(), NatsAuth::default(), settings()).await;
        assert!(plain.is_err(), "plain text is refused");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn consumers_and_observers_resume_after_a_server_restart() {
        let mut nats = NatsServer::start();
        let b = bus(&nats).await;
        suite::consumers_and_observers_resume_after_a_restart(&b, || nats.restart()).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_nkey_user_connects_and_a_wrong_seed_is_refused() {
        let user = nkeys::KeyPair::new_user();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
                user.public_key()
            ),
        )
        .unwrap();
        let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
        let auth = |seed: String| NatsAuth {
            nkey_seed: Some(seed),
            ..NatsAuth::default()
        };
        let b = NatsBus::connect(&nats.url(), auth(user.seed().unwrap()), settings())
            .await
            .unwrap();
        b.publish("t", suite::ev(1)).await.unwrap();
        let stranger = nkeys::KeyPair::new_user().seed().unwrap();
        assert!(NatsBus::connect(&nats.url(), auth(stranger), settings())
            .await
            .is_err());
        assert!(
            NatsBus::connect(&nats.url(), NatsAuth::default(), settings())
                .await
                .is_err()
        );
    }
}
