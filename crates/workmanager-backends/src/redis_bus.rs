//! The Redis Streams bus (`PubSub:Type=redis`): one stream per topic, one
//! consumer group per worker, so each worker gets each message once
//! whichever instance hosts it, and a message published while its worker is
//! down waits in the stream (at-least-once, durable as the server is).
//!
//! - Publish: `XADD` with approximate trimming (`Redis:StreamMaxLen`); a
//!   batch goes in one `MULTI`, so it lands whole or not at all.
//! - Consume: a task per group reads with `XREADGROUP` on its own
//!   connection (a blocking read would stall a shared one), hands each
//!   message over, and `XACK`s it once the dispatcher settled it (processed
//!   or dead-lettered). Messages left pending — their consumer died — are
//!   taken over with `XAUTOCLAIM` after `Redis:VisibilityTimeoutSeconds`.
//!   A retry (or a delivery dropped unsettled) is made due for that
//!   takeover sooner: after one second, doubling with its deliveries up to
//!   the timeout, as on NATS.
//!   Each instance is one consumer in every group: what an earlier reader
//!   of this instance left unsettled (its worker was updated or restarted,
//!   or the instance restarted) comes again at once, read from the
//!   consumer's own pending list when the group's next reader here starts.
//! - Duplicates: an event (source and id) already seen by the group within
//!   `Redis:DedupWindowSeconds` is acknowledged and skipped (one transaction per
//!   read, sets per time bucket), so an event published twice — a
//!   publisher's retry, or an output published again after a crash (its id
//!   is derived from the input's) — runs a worker once.
//! - Observers (`watch`): one `XREAD` task per watched topic, from "now".
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use tokio::sync::{broadcast, mpsc, watch};
use workmanager_core::bus::{dead_letter_topic, Ack, Acker, Bus, BusError, Delivery, Subscription};
use workmanager_core::CloudEvent;

use crate::readers::{keep_alive_timer, retry_delay, GroupHandle, Readers};
use crate::redis_conn::Healing;

/// Messages read per `XREADGROUP` (the dispatcher then pipelines them to
/// the worker 64 at a time).
const READ_COUNT: usize = 256;
/// How long one blocking read waits (also how fast a stop is noticed).
const BLOCK: Duration = Duration::from_millis(500);
/// How often a reader looks for retried messages that fell due.
const RETRY_LOOK: Duration = Duration::from_millis(500);
/// Connecting, and each non-blocking call of the reconnecting connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RedisBusSettings {
    /// Approximate `MAXLEN` of each topic stream.
    pub stream_max_len: usize,
    /// Pending messages idle this long are taken over by a live consumer.
    pub visibility_timeout: Duration,
    /// Event ids remembered per group for duplicate suppression (zero: off),
    /// in sets per bucket of this length.
    pub dedup_window: Duration,
    /// Local queue per group (the dispatcher's backlog).
    pub capacity: usize,
    /// This instance's consumer name inside each group.
    pub consumer: String,
    /// `Redis:MaxDeliver`: a message taken over this many times without
    /// being settled (its consumers keep dying on it) goes to
    /// `{topic}-dead` instead of being delivered again. Zero: no bound.
    pub max_deliver: u64,
}

pub struct RedisBus {
    client: redis::Client,
    /// Publishes, acknowledgements, group creation, duplicate checks.
    conn: Healing,
    settings: RedisBusSettings,
    readers: Readers,
}

pub fn stream_key(topic: &str) -> String {
    format!("workmanager:topic:{topic}")
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("Redis: {e}"))
}

impl RedisBus {
    pub async fn connect(url: &str, settings: RedisBusSettings) -> Result<Self, BusError> {
        Self::connect_with(url, settings, None).await
    }

    /// As `connect`, with TLS material for `rediss://`.
    pub async fn connect_with(
        url: &str,
        settings: RedisBusSettings,
        tls: Option<&crate::redis_store::RedisTls>,
    ) -> Result<Self, BusError> {
        let (client, conn) = crate::redis_store::connect(url, CONNECT_TIMEOUT, tls)
            .await
            .map_err(BusError::Unavailable)?;
        Ok(Self {
            client,
            conn,
            settings,
            readers: Readers::default(),
        })
    }
}

fn decode(json: &[u8]) -> Option<CloudEvent> {
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    Some(CloudEvent::from_input(value))
}

/// Replies are walked where they lie instead of being converted into the
/// crate's reply structs, which copy every entry into a map of its own
/// (a twentieth of the service's CPU on the read path).
///
/// The value of field `name` among an entry's fields: a RESP2 flat array
/// `[field, value, ...]` or a RESP3 map.
fn field<'a>(fields: &'a redis::Value, name: &[u8]) -> Option<&'a [u8]> {
    match fields {
        redis::Value::Map(m) => m
            .iter()
            .find(|(f, _)| bytes(f) == Some(name))
            .and_then(|(_, v)| bytes(v)),
        redis::Value::Array(a) => a
            .chunks_exact(2)
            .find(|c| bytes(&c[0]) == Some(name))
            .and_then(|c| bytes(&c[1])),
        _ => None,
    }
}

fn bytes(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The streams of an `XREAD`/`XREADGROUP` reply, each with its entries:
/// RESP2 `[[key, entries], ...]`, RESP3 `{key: entries}`; nil: none.
fn reply_streams(reply: &redis::Value) -> Vec<(&[u8], &[redis::Value])> {
    let per_stream: Vec<(&redis::Value, &redis::Value)> = match reply {
        redis::Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        redis::Value::Array(a) => a
            .iter()
            .filter_map(|s| match s {
                redis::Value::Array(kv) if kv.len() == 2 => Some((&kv[0], &kv[1])),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    per_stream
        .into_iter()
        .filter_map(|(k, entries)| match (bytes(k), entries) {
            (Some(k), redis::Value::Array(e)) => Some((k, e.as_slice())),
            _ => None,
        })
        .collect()
}

/// One stream entry, `[id, [field, value, ...]]`: its id and the event in
/// its `e` field (`None`: unreadable, or the entry was deleted).
fn stream_entry(v: &redis::Value) -> Option<(String, Option<CloudEvent>)> {
    let redis::Value::Array(parts) = v else {
        return None;
    };
    let id = String::from_utf8(bytes(parts.first()?)?.to_vec()).ok()?;
    let event = parts
        .get(1)
        .and_then(|fields| field(fields, b"e"))
        .and_then(decode);
    Some((id, event))
}

/// The delivery count in an `XPENDING` reply for one id:
/// `[[id, consumer, idle ms, count]]`.
fn pending_count(reply: &redis::Value) -> Option<u64> {
    let redis::Value::Array(rows) = reply else {
        return None;
    };
    let Some(redis::Value::Array(row)) = rows.first() else {
        return None;
    };
    match row.get(3)? {
        redis::Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// The entries of one stream in a reply, as first deliveries (a takeover
/// learns their counts, `Reader::take_over`).
fn entries_of(stream: &Arc<str>, topic: &Arc<str>, raw: &[redis::Value]) -> Vec<Entry> {
    raw.iter()
        .filter_map(stream_entry)
        .map(|(id, event)| Entry {
            stream: stream.clone(),
            topic: topic.clone(),
            id,
            event,
            deliveries: 1,
        })
        .collect()
}

/// What a group's ack task learns of one message, in the order it happened.
enum Settle {
    /// About to be handed to the dispatcher (sent before, so it precedes
    /// the settlement): kept alive until settled.
    Delivered,
    /// Processed or dead-lettered: `XACK`.
    Done,
    /// To be processed again (a retry, or a delivery dropped unsettled): it
    /// stays pending, made due for a takeover after `retry_delay` of its
    /// deliveries instead of after the whole visibility timeout.
    Retry { deliveries: u64 },
}

/// Settles one message through the group's ack task, which sends many
/// `XACK`s at once. A delivery dropped unsettled (its worker stopped with it
/// still queued) is handed back like a retry.
struct StreamAck {
    acks: mpsc::UnboundedSender<(Settle, Arc<str>, String)>,
    stream: Arc<str>,
    id: std::sync::Mutex<Option<String>>,
    deliveries: u64,
}

impl StreamAck {
    fn settle(&self, how: Settle) {
        let taken = self.id.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(id) = taken {
            let _ = self.acks.send((how, self.stream.clone(), id));
        }
    }
}

impl Acker for StreamAck {
    fn ack(&self, outcome: Ack) {
        self.settle(match outcome {
            Ack::Done => Settle::Done,
            Ack::Retry => Settle::Retry {
                deliveries: self.deliveries,
            },
        });
    }
}

impl Drop for StreamAck {
    fn drop(&mut self) {
        self.settle(Settle::Retry {
            deliveries: self.deliveries,
        });
    }
}

/// Sends acknowledgements in batches until every sender is gone, keeps
/// what the group's worker holds alive, and makes retried messages due.
///
/// - Held (delivered, not settled: waiting in the worker's local queue, or
///   running): every third of the visibility timeout `XCLAIM ... JUSTID`
///   (not counted as a delivery) resets its idle time, so no reader takes
///   it over, this one included, however long a slow worker's backlog
///   waits.
/// - Retried (or dropped unsettled): `XCLAIM ... IDLE` ages it so that it
///   passes the visibility timeout after its retry delay, and
///   `retries_due` tells the group's reader until when to look for such
///   messages more often than every half timeout.
async fn ack_task(
    conn: Healing,
    group: String,
    settings: RedisBusSettings,
    retries_due: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    mut rx: mpsc::UnboundedReceiver<(Settle, Arc<str>, String)>,
) {
    let visibility = settings.visibility_timeout;
    let (keep_alive, mut tick) = keep_alive_timer(visibility);
    let mut held: HashMap<(Arc<str>, String), tokio::time::Instant> = HashMap::new();
    loop {
        let first = tokio::select! {
            s = rx.recv() => match s {
                Some(s) => s,
                None => return,
            },
            _ = tick.tick() => {
                keep_held_alive(&conn, &group, &settings.consumer, &mut held, keep_alive).await;
                continue;
            }
        };
        let mut done: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        let mut pipe = redis::pipe();
        let mut latest_due = None;
        let mut next = Some(first);
        let mut n = 0;
        while let Some((how, stream, id)) = next {
            let key = (stream, id);
            match how {
                Settle::Delivered => {
                    held.insert(key, tokio::time::Instant::now());
                }
                Settle::Done => {
                    held.remove(&key);
                    let (stream, id) = key;
                    done.entry(stream).or_default().push(id);
                }
                Settle::Retry { deliveries } => {
                    held.remove(&key);
                    let (stream, id) = key;
                    let delay = retry_delay(deliveries, visibility);
                    let aged = visibility.saturating_sub(delay);
                    pipe.cmd("XCLAIM")
                        .arg(&*stream)
                        .arg(&group)
                        .arg(&settings.consumer)
                        .arg(0)
                        .arg(&id)
                        .arg("IDLE")
                        .arg(aged.as_millis() as u64)
                        .arg("JUSTID")
                        .ignore();
                    let due = tokio::time::Instant::now() + delay;
                    latest_due = latest_due.max(Some(due));
                }
            }
            n += 1;
            next = if n < 1024 { rx.try_recv().ok() } else { None };
        }
        if done.is_empty() && latest_due.is_none() {
            continue;
        }
        for (stream, ids) in &done {
            pipe.cmd("XACK")
                .arg(&**stream)
                .arg(&group)
                .arg(ids)
                .ignore();
        }
        let sent = conn
            .run("XACK / XCLAIM", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await;
        match sent {
            Ok(()) => {
                if let Some(due) = latest_due {
                    let mut until = retries_due.lock().unwrap_or_else(|p| p.into_inner());
                    *until = (*until).max(Some(due));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, group, "settling messages failed; they come again after Redis:VisibilityTimeoutSeconds")
            }
        }
    }
}

/// Resets the idle time of every held message not kept alive for
/// `keep_alive`. Only one idle that long is claimed (`XCLAIM`'s min idle
/// time), so a message another reader took over meanwhile (this
/// instance's calls failed for longer than the visibility timeout) stays
/// with it.
async fn keep_held_alive(
    conn: &Healing,
    group: &str,
    consumer: &str,
    held: &mut HashMap<(Arc<str>, String), tokio::time::Instant>,
    keep_alive: Duration,
) {
    let now = tokio::time::Instant::now();
    let mut due: HashMap<Arc<str>, Vec<String>> = HashMap::new();
    for ((stream, id), since) in held.iter_mut() {
        if now.duration_since(*since) >= keep_alive {
            *since = now;
            due.entry(stream.clone()).or_default().push(id.clone());
        }
    }
    if due.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for (stream, ids) in &due {
        pipe.cmd("XCLAIM")
            .arg(&**stream)
            .arg(group)
            .arg(consumer)
            .arg((keep_alive / 2).as_millis() as u64)
            .arg(ids)
            .arg("JUSTID")
            .ignore();
    }
    let sent = conn
        .run("XCLAIM", |mut c| async move {
            pipe.query_async::<()>(&mut c).await
        })
        .await;
    if let Err(e) = sent {
        tracing::debug!(error = %e, group, "keeping held messages alive failed");
    }
}

/// One entry read from a stream.
struct Entry {
    stream: Arc<str>,
    topic: Arc<str>,
    id: String,
    event: Option<CloudEvent>,
    /// Deliveries to the group so far, this one included.
    deliveries: u64,
}

struct Reader {
    client: redis::Client,
    conn: MultiplexedConnection,
    control: Healing,
    acks: mpsc::UnboundedSender<(Settle, Arc<str>, String)>,
    /// Until when messages handed back for a retry fall due (`ack_task`).
    retries_due: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    group: String,
    /// (stream key, topic)
    topics: Vec<(Arc<str>, Arc<str>)>,
    settings: RedisBusSettings,
    queue: mpsc::Sender<Delivery>,
    stop: watch::Receiver<bool>,
}

impl Reader {
    async fn run(mut self) {
        // What this instance's consumer of the group still holds comes
        // first, at once: an earlier reader here stopped with messages
        // taken and not settled (its worker was updated, restarted or
        // stopped past its drain timeout, or the instance restarted).
        if !self.take_back_own().await {
            return;
        }
        // The first look comes at once: a reader that starts because its
        // worker was taken over from a dead instance finds that instance's
        // pending messages already past the visibility timeout.
        let mut last_claim: Option<tokio::time::Instant> = None;
        loop {
            if *self.stop.borrow() {
                return;
            }
            if last_claim.is_none_or(|t| t.elapsed() >= self.claim_period()) {
                last_claim = Some(tokio::time::Instant::now());
                if !self.reclaim().await {
                    return;
                }
            }
            let read = self.read_cmd(&vec![">"; self.topics.len()], Some(BLOCK));
            let reply: redis::RedisResult<redis::Value> = read.query_async(&mut self.conn).await;
            match reply {
                Ok(redis::Value::Nil) => {}
                Ok(r) => {
                    let mut entries = Vec::new();
                    for (key, ids) in reply_streams(&r) {
                        let Some(i) = self.topic_of(key) else {
                            continue;
                        };
                        let (stream, topic) = &self.topics[i];
                        entries.extend(entries_of(stream, topic, ids));
                    }
                    // The raw reply (a few hundred KB) is not kept across
                    // the hand-over's waits.
                    drop(r);
                    if !self.deliver(entries, true).await {
                        return;
                    }
                }
                Err(e) => {
                    if *self.stop.borrow() {
                        // Stopped, and perhaps its group removed: a read
                        // that failed meanwhile must not create it again.
                        return;
                    }
                    if e.to_string().contains("NOGROUP") {
                        for (stream, _) in &self.topics {
                            create_group(&self.control, stream, &self.group).await;
                        }
                    } else {
                        tracing::warn!(error = %e, group = %self.group, "XREADGROUP failed; reconnecting");
                        // The reading connection is a plain one (blocking
                        // reads would stall the shared, self-healing one):
                        // after a server restart it must be opened anew.
                        if let Some(c) = reconnect(&self.client).await {
                            self.conn = c;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// How often to look for messages to take over: every half visibility
    /// timeout, and every `RETRY_LOOK` while messages handed back for a
    /// retry fall due.
    fn claim_period(&self) -> Duration {
        let due = *self.retries_due.lock().unwrap_or_else(|p| p.into_inner());
        match due {
            Some(until) if tokio::time::Instant::now() <= until + RETRY_LOOK => RETRY_LOOK,
            _ => self.settings.visibility_timeout / 2,
        }
    }

    /// `XREADGROUP` as this instance's consumer of the group, on every
    /// topic's stream from its id in `from` (`>`: messages never delivered
    /// to the group; an id: this consumer's pending ones after it),
    /// waiting up to `block` for a message.
    fn read_cmd(&self, from: &[impl redis::ToRedisArgs], block: Option<Duration>) -> redis::Cmd {
        let keys: Vec<&str> = self.topics.iter().map(|(s, _)| &**s).collect();
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&self.group)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(READ_COUNT);
        if let Some(block) = block {
            read.arg("BLOCK").arg(block.as_millis() as u64);
        }
        read.arg("STREAMS").arg(&keys).arg(from);
        read
    }

    /// The index in `topics` of the stream a reply names.
    fn topic_of(&self, stream: &[u8]) -> Option<usize> {
        self.topics.iter().position(|(s, _)| s.as_bytes() == stream)
    }

    /// Takes over this group's messages that another (dead) consumer left
    /// pending longer than the visibility timeout. False: consumer gone.
    async fn reclaim(&mut self) -> bool {
        let idle = self.settings.visibility_timeout.as_millis() as usize;
        for i in 0..self.topics.len() {
            let (stream, topic) = self.topics[i].clone();
            let mut claim = redis::cmd("XAUTOCLAIM");
            claim
                .arg(&*stream)
                .arg(&self.group)
                .arg(&self.settings.consumer)
                .arg(idle)
                .arg("0-0")
                .arg("COUNT")
                .arg(READ_COUNT);
            let r: redis::RedisResult<redis::Value> = claim.query_async(&mut self.conn).await;
            // `[next start, [entry, ...], [deleted id, ...]]`
            if let Ok(redis::Value::Array(reply)) = r {
                let claimed = match reply.get(1) {
                    Some(redis::Value::Array(c)) => c.as_slice(),
                    _ => &[],
                };
                let entries = entries_of(&stream, &topic, claimed);
                if !self.take_over(&stream, &topic, entries).await {
                    return false;
                }
            }
        }
        true
    }

    /// Reads this consumer's own pending messages (`XREADGROUP` from id 0:
    /// what an earlier reader with this instance's consumer name took and
    /// did not settle) and hands them over again. Without this they would
    /// wait for the visibility timeout like a dead consumer's. False:
    /// consumer gone.
    async fn take_back_own(&mut self) -> bool {
        let mut from = vec!["0".to_string(); self.topics.len()];
        loop {
            let read = self.read_cmd(&from, None);
            let reply: redis::Value = match read.query_async(&mut self.conn).await {
                Ok(r) => r,
                Err(e) => {
                    // The regular reads deal with a missing group or an
                    // absent server; what is left pending is taken over
                    // after the visibility timeout.
                    tracing::debug!(error = %e, group = %self.group, "reading the consumer's pending messages failed");
                    return true;
                }
            };
            let mut taken = Vec::new();
            for (key, ids) in reply_streams(&reply) {
                let Some(i) = self.topic_of(key) else {
                    continue;
                };
                let (stream, topic) = &self.topics[i];
                let entries = entries_of(stream, topic, ids);
                if let Some(last) = entries.last() {
                    from[i] = last.id.clone();
                    taken.push((stream.clone(), topic.clone(), entries));
                }
            }
            drop(reply);
            if taken.is_empty() {
                return true;
            }
            for (stream, topic, entries) in taken {
                if !self.take_over(&stream, &topic, entries).await {
                    return false;
                }
            }
        }
    }

    /// Hands over messages taken over from an earlier consumer (a dead
    /// one's, or an earlier reader's of this one), with their delivery
    /// counts (for their retry delay), after moving those delivered more
    /// than `Redis:MaxDeliver` times to the dead-letter topic. False:
    /// consumer gone.
    async fn take_over(&mut self, stream: &str, topic: &str, mut entries: Vec<Entry>) -> bool {
        if entries.is_empty() {
            return true;
        }
        let counts = self.delivery_counts(stream, &entries).await;
        let mut worn = Vec::new();
        for (e, count) in entries.iter_mut().zip(counts) {
            // Taken over: delivered twice at least.
            e.deliveries = count.unwrap_or(2);
            if self.settings.max_deliver > 0 && count.is_some_and(|c| c > self.settings.max_deliver)
            {
                worn.push(e.id.clone());
            }
        }
        if !worn.is_empty() {
            entries.retain(|e| !worn.contains(&e.id));
            self.dead_letter(stream, topic, worn).await;
        }
        self.deliver(entries, false).await
    }

    /// How often each of `entries` was delivered to the group (`XPENDING`
    /// of each id, in one round trip); `None` where that is unknown.
    async fn delivery_counts(&self, stream: &str, entries: &[Entry]) -> Vec<Option<u64>> {
        let mut pipe = redis::pipe();
        for e in entries {
            pipe.cmd("XPENDING")
                .arg(stream)
                .arg(&self.group)
                .arg(&e.id)
                .arg(&e.id)
                .arg(1);
        }
        let replies: Result<Vec<redis::Value>, String> = self
            .control
            .run(
                "XPENDING",
                |mut c| async move { pipe.query_async(&mut c).await },
            )
            .await;
        match replies {
            Ok(replies) => replies.iter().map(pending_count).collect(),
            Err(e) => {
                tracing::debug!(error = %e, "XPENDING failed; delivering the taken-over messages again");
                vec![None; entries.len()]
            }
        }
    }

    /// Moves messages delivered too often to `{topic}-dead` (with the
    /// reason), then acknowledges them, in one transaction.
    async fn dead_letter(&self, stream: &str, topic: &str, ids: Vec<String>) {
        let dead_key = stream_key(&dead_letter_topic(topic));
        let stream = stream.to_string();
        let (group, max) = (self.group.clone(), self.settings.max_deliver);
        let ids_for_log = ids.len();
        let result = self
            .control
            .run("dead-letter", |mut c| async move {
                let mut events = Vec::with_capacity(ids.len());
                for id in &ids {
                    let r: redis::Value = c.xrange(&stream, id, id).await?;
                    if let redis::Value::Array(entries) = r {
                        events.extend(entries.iter().filter_map(stream_entry).filter_map(|(_, e)| e));
                    }
                }
                let mut pipe = redis::pipe();
                pipe.atomic();
                for mut event in events {
                    event.mark_dead_letter(
                        format!("delivered more than {max} times (Redis:MaxDeliver) without being settled; its consumers kept stopping on it"),
                        &group,
                    );
                    let body = event.to_json();
                    pipe.cmd("XADD").arg(&dead_key).arg("*").arg("e").arg(body).ignore();
                }
                pipe.cmd("XACK").arg(&stream).arg(&group).arg(&ids).ignore();
                pipe.query_async::<()>(&mut c).await
            })
            .await;
        match result {
            Ok(()) => {
                tracing::warn!(group = %self.group, topic, messages = ids_for_log, "messages delivered too often were dead-lettered")
            }
            Err(e) => {
                tracing::warn!(error = %e, "dead-lettering failed; the messages stay pending")
            }
        }
    }

    /// Drops duplicates among first deliveries (one transaction for the
    /// whole read) and hands the rest over. False when the consumer is gone.
    async fn deliver(&mut self, entries: Vec<Entry>, first_delivery: bool) -> bool {
        let window = self.settings.dedup_window.as_secs();
        let duplicates = if window == 0 || !first_delivery {
            vec![false; entries.len()]
        } else {
            self.duplicates(&entries, window).await
        };
        self.hand_over(entries, duplicates).await
    }

    /// For each entry, whether its event (`CloudEvent::dedup_key`: source
    /// and id) was already delivered to the group within the window, by an
    /// earlier read or earlier in this one. Entries without an id are never
    /// duplicates.
    ///
    /// The duplicate check of one read is one transaction of bulk set
    /// commands, whatever the read's size: the keys of events seen by a group live in
    /// sets per time bucket of the window; the read's ids are looked up in the
    /// previous and the current bucket (`SMISMEMBER`, Redis 6.2 / Valkey 7.2 or
    /// later) and added to the current one, which expires two windows after it
    /// was last written, so an id is remembered for one to two windows. Only
    /// first deliveries (`>` reads) are checked: a message taken over from a
    /// dead consumer is its own first carrier. Per message this costs the
    /// server ~1.4 µs, where the same sets written from a Lua script cost
    /// ~2.5 µs, a hash field per id from Lua ~6.5 µs and a key with its own
    /// expiry more (BENCHMARKS.md).
    async fn duplicates(&mut self, entries: &[Entry], window: u64) -> Vec<bool> {
        let mut out = vec![false; entries.len()];
        let keys: Vec<Option<String>> = entries
            .iter()
            .map(|e| e.event.as_ref().and_then(CloudEvent::dedup_key))
            .collect();
        let mut in_read = std::collections::HashSet::with_capacity(entries.len());
        // (index in `entries`, key) of the first carrier of each event in this read.
        let mut checked = Vec::with_capacity(entries.len());
        for (i, key) in keys.iter().enumerate() {
            let Some(eid) = key.as_deref() else {
                continue;
            };
            if in_read.insert(eid) {
                checked.push((i, eid));
            } else {
                out[i] = true;
            }
        }
        if checked.is_empty() {
            return out;
        }
        // Buckets by this instance's clock: a worker's group is read by one
        // instance at a time, and a clock skew under a window between the
        // old and the new owner still finds an id in one of the two buckets.
        let bucket = seen_bucket(window);
        let (cur, prev) = (
            seen_key(&self.group, bucket),
            seen_key(&self.group, bucket.saturating_sub(1)),
        );
        let ids: Vec<&str> = checked.iter().map(|(_, eid)| *eid).collect();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SMISMEMBER")
            .arg(&prev)
            .arg(&ids)
            .cmd("SMISMEMBER")
            .arg(&cur)
            .arg(&ids)
            .cmd("SADD")
            .arg(&cur)
            .arg(&ids)
            .ignore()
            .cmd("EXPIRE")
            .arg(&cur)
            .arg(2 * window)
            .ignore();
        let seen: Result<Vec<u8>, String> = self
            .control
            .run("duplicate check", |mut c| async move {
                let (before, now): (Vec<u8>, Vec<u8>) = pipe.query_async(&mut c).await?;
                Ok(before.iter().zip(now).map(|(a, b)| a + b).collect())
            })
            .await;
        match seen {
            Ok(seen) => {
                for ((i, _), s) in checked.iter().zip(seen) {
                    out[*i] = s > 0;
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "duplicate check failed; delivering all");
            }
        }
        out
    }

    async fn hand_over(&mut self, entries: Vec<Entry>, duplicates: Vec<bool>) -> bool {
        for (e, duplicate) in entries.into_iter().zip(duplicates) {
            let event = match e.event {
                Some(event) if !duplicate => event,
                skipped => {
                    if skipped.is_none() {
                        tracing::warn!(stream = %e.stream, id = %e.id, "unreadable stream entry acknowledged and skipped");
                    }
                    let _ = self.acks.send((Settle::Done, e.stream, e.id));
                    continue;
                }
            };
            // Before the handover, so it precedes the settlement.
            let _ = self
                .acks
                .send((Settle::Delivered, e.stream.clone(), e.id.clone()));
            let ack = StreamAck {
                acks: self.acks.clone(),
                stream: e.stream,
                id: std::sync::Mutex::new(Some(e.id)),
                deliveries: e.deliveries,
            };
            let sent = self
                .queue
                .send(Delivery {
                    topic: e.topic,
                    event,
                    acker: Some(Box::new(ack)),
                })
                .await;
            if sent.is_err() {
                return false;
            }
        }
        true
    }
}

/// The time bucket (of `window` seconds) that now falls in, by this
/// instance's clock.
fn seen_bucket(window: u64) -> u64 {
    workmanager_core::ownership::now_ms() / 1000 / window.max(1)
}

/// The set of the event keys a group saw during one time bucket.
fn seen_key(group: &str, bucket: u64) -> String {
    format!("workmanager:seen:{group}:{bucket}")
}

/// A fresh plain connection, or `None` while the server is still away.
async fn reconnect(client: &redis::Client) -> Option<MultiplexedConnection> {
    tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .ok()?
        .ok()
}

async fn create_group(conn: &Healing, stream: &str, group: &str) {
    // "$": a new worker starts with new messages; an existing group resumes
    // where it stopped (messages published meanwhile included).
    let r: Result<(), String> = conn
        .run("XGROUP CREATE", |mut c| async move {
            c.xgroup_create_mkstream(stream, group, "$").await
        })
        .await;
    if let Err(e) = r {
        if !e.to_string().contains("BUSYGROUP") {
            tracing::warn!(error = %e, stream, group, "XGROUP CREATE failed");
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn publish(&self, topic: &str, event: CloudEvent) -> Result<(), BusError> {
        self.publish_many(topic, vec![event]).await
    }

    async fn publish_many(&self, topic: &str, events: Vec<CloudEvent>) -> Result<(), BusError> {
        self.publish_slice(topic, &events).await
    }

    async fn publish_slice(&self, topic: &str, events: &[CloudEvent]) -> Result<(), BusError> {
        if events.is_empty() {
            return Ok(());
        }
        let key = stream_key(topic);
        let mut pipe = redis::pipe();
        if events.len() > 1 {
            pipe.atomic();
        }
        // One buffer for every event's JSON: a fresh one per event grew
        // (and copied) three times on the way to ~1 KB.
        let mut json = Vec::with_capacity(2048);
        for e in events {
            json.clear();
            e.write_json(&mut json);
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.settings.stream_max_len)
                .arg("*")
                .arg("e")
                .arg(&json[..])
                .ignore();
        }
        self.conn
            .run("XADD", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await
            .map_err(BusError::Unavailable)
    }

    async fn subscribe(&self, topics: &[String], group: &str) -> Result<Subscription, BusError> {
        let control = self.conn.clone();
        let streams: Vec<(Arc<str>, Arc<str>)> = topics
            .iter()
            .map(|t| (Arc::from(stream_key(t)), Arc::from(t.as_str())))
            .collect();
        for (s, _) in &streams {
            create_group(&control, s, group).await;
        }
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let retries_due = Arc::default();
        tokio::spawn(ack_task(
            self.conn.clone(),
            group.to_string(),
            self.settings.clone(),
            Arc::clone(&retries_due),
            ack_rx,
        ));
        let conn = self
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(self.settings.capacity.max(1));
        let (stop_tx, stop_rx) = watch::channel(false);
        let reader = Reader {
            client: self.client.clone(),
            conn,
            control,
            acks: ack_tx,
            retries_due,
            group: group.to_string(),
            topics: streams,
            settings: self.settings.clone(),
            queue: tx.clone(),
            stop: stop_rx,
        };
        tokio::spawn(reader.run());
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
        // The reader stops; what it already handed over is drained by the
        // dispatcher; anything unacknowledged stays pending in the stream:
        // the group's next reader on this instance reads it at once, one
        // elsewhere after the visibility timeout.
        self.readers.stop_group(group);
    }

    /// `XGROUP DESTROY` on each topic's stream, and the group's remembered
    /// event keys are deleted: the sets of every bucket that may still
    /// exist (one is kept up to two windows after its last write), and of
    /// the next, written by an instance whose clock runs ahead.
    async fn remove_group(&self, topics: &[String], group: &str) {
        let window = self.settings.dedup_window.as_secs();
        if window > 0 {
            let now = seen_bucket(window);
            let sets: Vec<String> = (now.saturating_sub(2)..=now + 1)
                .map(|b| seen_key(group, b))
                .collect();
            let r: Result<(), String> = self
                .conn
                .run("DEL", |mut c| {
                    let sets = sets.clone();
                    async move { c.del(&sets).await }
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, group, "the group's remembered event keys were not deleted; they expire with their window");
            }
        }
        for t in topics {
            let stream = stream_key(t);
            let r: Result<(), String> = self
                .conn
                .run("XGROUP DESTROY", |mut c| {
                    let stream = stream.clone();
                    async move { c.xgroup_destroy(&stream, group).await }
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, stream, group, "XGROUP DESTROY failed; the group stays on the server");
            }
        }
    }

    fn watch(&self, topic: &str) -> broadcast::Receiver<Arc<CloudEvent>> {
        self.readers.watch(topic, |tx| {
            let client = self.client.clone();
            let stream = stream_key(topic);
            tokio::spawn(async move {
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                    return;
                };
                let mut last = "$".to_string();
                while tx.receiver_count() > 0 {
                    let mut read = redis::cmd("XREAD");
                    read.arg("COUNT")
                        .arg(256)
                        .arg("BLOCK")
                        .arg(BLOCK.as_millis() as u64)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(&last);
                    let r: redis::RedisResult<redis::Value> = read.query_async(&mut conn).await;
                    match r {
                        Ok(reply) => {
                            for (_, entries) in reply_streams(&reply) {
                                for (id, event) in entries.iter().filter_map(stream_entry) {
                                    last = id;
                                    if let Some(e) = event {
                                        let _ = tx.send(Arc::new(e));
                                    }
                                }
                            }
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            if let Some(c) = reconnect(&client).await {
                                conn = c;
                            }
                        }
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
    use crate::testing::RedisServer;

    fn settings(consumer: &str) -> RedisBusSettings {
        RedisBusSettings {
            stream_max_len: 100_000,
            visibility_timeout: Duration::from_secs(1),
            dedup_window: Duration::from_secs(60),
            capacity: 1024,
            consumer: consumer.into(),
            max_deliver: 10,
        }
    }

    async fn bus(r: &RedisServer, consumer: &str) -> RedisBus {
        RedisBus::connect(&r.url(), settings(consumer))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn each_group_gets_each_message_once_in_order() {
        let r = RedisServer::start();
        suite::each_group_gets_each_message_once_in_order(&bus(&r, "i1").await).await;
    }

    /// Replies are walked by hand: the RESP3 shapes (maps) read as the
    /// RESP2 ones do.
    #[tokio::test(flavor = "multi_thread")]
    async fn replies_read_the_same_over_resp3() {
        let r = RedisServer::start();
        let url = format!("{}/?protocol=resp3", r.url());
        let b = RedisBus::connect(&url, settings("i1")).await.unwrap();
        suite::each_group_gets_each_message_once_in_order(&b).await;
        suite::watchers_see_published_events(&b).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn watchers_see_published_events() {
        let r = RedisServer::start();
        suite::watchers_see_published_events(&bus(&r, "i1").await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unsubscribe_ends_the_subscription() {
        let r = RedisServer::start();
        suite::unsubscribe_ends_the_subscription(&bus(&r, "i1").await).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_repeat_is_delivered_once_and_another_sources_event_is_kept() {
        let r = RedisServer::start();
        suite::a_repeat_is_delivered_once_and_another_sources_event_is_kept(&bus(&r, "i1").await)
            .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_removed_group_starts_afresh() {
        let r = RedisServer::start();
        suite::a_removed_group_starts_afresh(&bus(&r, "i1").await).await;
    }

    /// With a visibility timeout longer than the suite waits for a
    /// message: what the stopped reader had taken comes to the next reader
    /// of this instance at once, not after the timeout.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_stopped_readers_messages_come_to_the_next_one() {
        let r = RedisServer::start();
        let b = RedisBus::connect(
            &r.url(),
            RedisBusSettings {
                capacity: 1,
                visibility_timeout: Duration::from_secs(60),
                ..settings("i1")
            },
        )
        .await
        .unwrap();
        suite::a_stopped_readers_messages_come_to_the_next_one(&b).await;
    }

    /// Worker "w1" of topic "t" takes a message on an instance (`settings`)
    /// that then dies with it unsettled, after publishing event `publish`
    /// if given; returns the message's data. The instance runs on a
    /// runtime of its own, shut down afterwards, so nothing of it settles
    /// what it held or keeps it alive any more.
    async fn take_one_and_die(
        url: &str,
        settings: RedisBusSettings,
        publish: Option<u64>,
    ) -> serde_json::Value {
        let url = url.to_string();
        tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let taken = rt.block_on(async {
                let b = RedisBus::connect(&url, settings).await.unwrap();
                let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
                if let Some(n) = publish {
                    b.publish("t", suite::ev(n)).await.unwrap();
                }
                let d = recv(&mut s.receiver).await;
                let taken = d.event.0["data"].clone();
                std::mem::forget(d);
                taken
            });
            rt.shutdown_background();
            taken
        })
        .await
        .unwrap()
    }

    async fn recv(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a delivery within 10 s")
            .expect("open")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn messages_wait_in_the_stream_while_their_worker_is_away() {
        let r = RedisServer::start();
        let b = bus(&r, "i1").await;
        let s = b.subscribe(&["t".into()], "w1").await.unwrap();
        b.unsubscribe(&["t".into()], "w1").await;
        drop(s);
        for n in 0..5 {
            b.publish("t", suite::ev(n)).await.unwrap();
        }
        // Another instance hosts the worker now: it gets all five (one the
        // stopping reader had already taken comes back after the visibility
        // timeout, so the order across a handover is not guaranteed).
        let other = bus(&r, "i2").await;
        let mut s = other.subscribe(&["t".into()], "w1").await.unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            let d = recv(&mut s.receiver).await;
            got.push(d.event.0["data"].as_u64().unwrap());
            d.ack(Ack::Done);
        }
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_message_its_consumer_never_acknowledged_is_taken_over() {
        let r = RedisServer::start();
        // The instance dies mid-processing: no ack.
        take_one_and_die(&r.url(), settings("i1"), Some(42)).await;
        let heir = bus(&r, "i2").await;
        let mut s2 = heir.subscribe(&["t".into()], "w1").await.unwrap();
        suite::take(&mut s2.receiver, 42, Ack::Done).await;
    }

    /// A reader that starts after its worker's old consumer died finds the
    /// messages that consumer left, already idle past the visibility
    /// timeout, at once rather than half a timeout later.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_new_reader_takes_over_messages_already_past_the_timeout_at_once() {
        let r = RedisServer::start();
        let slow = |consumer: &str| RedisBusSettings {
            visibility_timeout: Duration::from_secs(8),
            ..settings(consumer)
        };
        take_one_and_die(&r.url(), slow("i1"), Some(42)).await;
        tokio::time::sleep(Duration::from_millis(8_500)).await;
        let heir = RedisBus::connect(&r.url(), slow("i2")).await.unwrap();
        let mut s2 = heir.subscribe(&["t".into()], "w1").await.unwrap();
        // Half a timeout (4 s) is when the next look would come.
        let d = tokio::time::timeout(Duration::from_secs(3), s2.receiver.recv())
            .await
            .expect("taken over at once")
            .expect("open");
        assert_eq!(d.event.0["data"], serde_json::json!(42));
        d.ack(Ack::Done);
    }

    /// With a visibility timeout longer than the suite waits: a retry is
    /// handed back after its delay, not left for the timeout; and nothing
    /// settled comes again.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_retried_message_comes_again_after_its_delay_and_nothing_settled_twice() {
        let r = RedisServer::start();
        let b = RedisBus::connect(
            &r.url(),
            RedisBusSettings {
                visibility_timeout: Duration::from_secs(60),
                ..settings("i1")
            },
        )
        .await
        .unwrap();
        let mut s = suite::a_retried_message_comes_again(&b).await;
        assert!(
            tokio::time::timeout(Duration::from_secs(3), s.receiver.recv())
                .await
                .is_err(),
            "nothing settled is delivered again"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_slow_workers_backlog_is_delivered_once() {
        let r = RedisServer::start();
        let b = RedisBus::connect(
            &r.url(),
            RedisBusSettings {
                capacity: 8,
                ..settings("i1")
            },
        )
        .await
        .unwrap();
        suite::a_slow_workers_backlog_is_delivered_once(&b).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_message_retried_too_often_goes_to_the_dead_letter_topic() {
        let r = RedisServer::start();
        let b = RedisBus::connect(
            &r.url(),
            RedisBusSettings {
                max_deliver: 2,
                visibility_timeout: Duration::from_secs(60),
                ..settings("i1")
            },
        )
        .await
        .unwrap();
        suite::a_message_retried_too_often_goes_to_the_dead_letter_topic(&b, "Redis:MaxDeliver")
            .await;
    }

    /// Message 7 of worker "w1" is taken by a reader of each of the first
    /// two `consumers` in turn, which dies with it unsettled; the reader of
    /// the third finds it delivered twice (`Redis:MaxDeliver` 2) and moves
    /// it to the dead-letter topic instead of delivering it.
    async fn taken_twice_then_dead_lettered(consumers: [&str; 3], visibility_timeout: Duration) {
        let r = RedisServer::start();
        let strict = |consumer: &str| RedisBusSettings {
            max_deliver: 2,
            visibility_timeout,
            ..settings(consumer)
        };
        for (i, name) in consumers[..2].iter().enumerate() {
            let taken = take_one_and_die(&r.url(), strict(name), (i == 0).then_some(7)).await;
            assert_eq!(taken, serde_json::json!(7), "delivery {}", i + 1);
        }
        let b = RedisBus::connect(&r.url(), strict(consumers[2]))
            .await
            .unwrap();
        let mut dead = b.subscribe(&["t-dead".into()], "dlq").await.unwrap();
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        suite::take_dead_letter(&mut dead.receiver, 7, "Redis:MaxDeliver", "w1").await;
        assert!(
            tokio::time::timeout(Duration::from_secs(3), s.receiver.recv())
                .await
                .is_err(),
            "not delivered a third time"
        );
    }

    /// Two instances in turn take the message over and die on it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_message_its_consumers_keep_dying_on_goes_to_the_dead_letter_topic() {
        taken_twice_then_dead_lettered(["i1", "i2", "i3"], Duration::from_secs(1)).await;
    }

    /// An instance that restarts (same consumer name) gets what it had
    /// taken at once, well before the visibility timeout, and each such
    /// delivery counts toward `Redis:MaxDeliver`.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_message_an_instance_keeps_dying_on_comes_back_at_once_then_goes_to_the_dead_letter_topic(
    ) {
        taken_twice_then_dead_lettered(["i1", "i1", "i1"], Duration::from_secs(60)).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn consumers_and_observers_resume_after_a_server_restart() {
        let mut r = RedisServer::start();
        let b = bus(&r, "i1").await;
        suite::consumers_and_observers_resume_after_a_restart(&b, || r.restart()).await;
    }

    /// While Redis is down, publishes wait in the resilience layer's buffer;
    /// one that does not fit is refused whole (its publisher keeps it, told
    /// to retry), and everything accepted arrives, in order, once Redis is
    /// back.
    #[tokio::test(flavor = "multi_thread")]
    async fn publishes_wait_for_redis_in_a_bounded_buffer_that_refuses_what_does_not_fit() {
        use workmanager_core::bus::BusError;
        use workmanager_core::resilience::{ResilienceSettings, ResilientBus, BUFFER_CAPACITY};
        let mut r = RedisServer::start();
        let refused = prometheus_client::metrics::counter::Counter::default();
        let dir = tempfile::tempdir().unwrap();
        let outbox = crate::FileOutbox::open(&dir.path().join("outbox.redb")).unwrap();
        let b = ResilientBus::new(
            Arc::new(bus(&r, "i1").await),
            ResilienceSettings {
                retry_attempts: 0,
                retry_base_delay: Duration::from_millis(10),
                breaker_threshold: 1,
                breaker_duration: Duration::from_secs(1),
                call_timeout: Duration::from_secs(2),
            },
            refused.clone(),
            Arc::new(outbox),
        );
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        r.stop();
        // The first failure opens the breaker: from then on publishes wait.
        b.publish("t", suite::ev(0)).await.unwrap();
        let rest = BUFFER_CAPACITY as u64 - 1;
        b.publish_many("t", (1..=rest).map(suite::ev).collect())
            .await
            .unwrap();
        assert_eq!(b.buffered(), BUFFER_CAPACITY);
        let full = b
            .publish_many("t", vec![suite::ev(9_998), suite::ev(9_999)])
            .await;
        assert!(
            matches!(&full, Err(BusError::Backpressure(m)) if m.contains("retry later")),
            "{full:?}"
        );
        assert_eq!(refused.get(), 2);
        assert_eq!(
            b.buffered(),
            BUFFER_CAPACITY,
            "nothing accepted was dropped"
        );
        r.start_again();
        for want in 0..=rest {
            suite::take(&mut s.receiver, want, Ack::Done).await;
        }
        assert!(
            tokio::time::timeout(Duration::from_secs(1), s.receiver.recv())
                .await
                .is_err(),
            "the refused publish was not sent"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_same_event_id_published_twice_is_delivered_once() {
        let r = RedisServer::start();
        let b = bus(&r, "i1").await;
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        let e = suite::ev(1);
        b.publish("t", e.clone()).await.unwrap();
        b.publish("t", e).await.unwrap();
        b.publish("t", suite::ev(2)).await.unwrap();
        suite::take(&mut s.receiver, 1, Ack::Done).await;
        let second = recv(&mut s.receiver).await;
        assert_eq!(
            second.event.0["data"],
            serde_json::json!(2),
            "the duplicate was skipped"
        );
        second.ack(Ack::Done);
    }

    /// A deleted worker's remembered events go with it: its sets no longer
    /// take the server's memory, and a group made again under its name
    /// treats an event the old one saw as new.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_removed_group_leaves_no_remembered_events_behind() {
        let r = RedisServer::start();
        let b = bus(&r, "i1").await;
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        b.publish("t", suite::ev(1)).await.unwrap();
        suite::take(&mut s.receiver, 1, Ack::Done).await;
        let c = redis::Client::open(r.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let remembered = |mut c: MultiplexedConnection| async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("workmanager:seen:w1:*")
                .query_async(&mut c)
                .await
                .unwrap();
            keys
        };
        assert_eq!(
            remembered(c.clone()).await.len(),
            1,
            "the event is remembered"
        );
        b.unsubscribe(&["t".into()], "w1").await;
        drop(s);
        // A stopped reader's last blocking read ends within 0.5 s.
        tokio::time::sleep(Duration::from_millis(800)).await;
        b.remove_group(&["t".into()], "w1").await;
        assert_eq!(remembered(c.clone()).await, Vec::<String>::new());
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        b.publish("t", suite::ev(1)).await.unwrap();
        suite::take(&mut s.receiver, 1, Ack::Done).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn duplicates_inside_one_read_and_across_reads_are_delivered_once() {
        let r = RedisServer::start();
        let b = bus(&r, "i1").await;
        let mut s = b.subscribe(&["t".into()], "w1").await.unwrap();
        let (a, c) = (suite::ev(1), suite::ev(3));
        // One atomic batch: the reader gets all four in one read.
        b.publish_many("t", vec![a.clone(), a.clone(), suite::ev(2), c.clone()])
            .await
            .unwrap();
        for want in [1, 2, 3] {
            suite::take(&mut s.receiver, want, Ack::Done).await;
        }
        // A later read: both ids are remembered.
        b.publish_many("t", vec![c, a, suite::ev(4)]).await.unwrap();
        let d = recv(&mut s.receiver).await;
        assert_eq!(
            d.event.0["data"],
            serde_json::json!(4),
            "the repeats were skipped"
        );
        d.ack(Ack::Done);
        // Another worker (group) on the topic gets its own copy of each id.
        let mut other = b.subscribe(&["t".into()], "w2").await.unwrap();
        let e = suite::ev(5);
        b.publish_many("t", vec![e.clone(), e]).await.unwrap();
        suite::take(&mut other.receiver, 5, Ack::Done).await;
        assert!(
            tokio::time::timeout(Duration::from_secs(1), other.receiver.recv())
                .await
                .is_err(),
            "once"
        );
        suite::take(&mut s.receiver, 5, Ack::Done).await;
    }
}
