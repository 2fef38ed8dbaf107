//! Acknowledging a JetStream consumer's messages: what the dispatcher
//! settled goes to the consumer's ack task, which acknowledges cumulatively
//! (`AckPolicy::All`) and never past a message that is not done, hands
//! retries back with a growing delay, and keeps waiting ones alive.
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use tokio::sync::mpsc;
use workmanager_core::bus::{Ack, Acker};

use crate::readers::{keep_alive_timer, retry_delay};

/// What a consumer's ack task learns, in the order it happened.
pub(super) enum Settle {
    /// Messages this consumer delivered that the task may not know of
    /// (see `inherited`): nothing is acknowledged past them until they
    /// come again.
    Inherited(std::ops::Range<u64>),
    /// A message is about to be handed to the dispatcher. Sent before the
    /// handover, so it always precedes the message's settlement.
    Delivered {
        seq: u64,
        /// The message's ack subject, to keep it alive while it waits.
        reply: async_nats::Subject,
    },
    /// The dispatcher settled the message with this stream sequence.
    Settled {
        seq: u64,
        delivered: i64,
        /// The message's ack subject.
        reply: async_nats::Subject,
        outcome: Ack,
    },
}

/// Settles one message through its consumer's ack task. A delivery dropped
/// unsettled (its worker stopped with it still queued) is handed back, so
/// the server delivers it again soon.
pub(super) struct NatsAck {
    seq: u64,
    delivered: i64,
    reply: std::sync::Mutex<Option<async_nats::Subject>>,
    tx: mpsc::UnboundedSender<Settle>,
}

impl NatsAck {
    /// Tells the ack task that the message with stream sequence `seq` is
    /// about to be handed to the dispatcher (so this always precedes its
    /// settlement), and returns what settles it.
    pub(super) fn handing_over(
        seq: u64,
        delivered: i64,
        reply: async_nats::Subject,
        tx: &mpsc::UnboundedSender<Settle>,
    ) -> NatsAck {
        let _ = tx.send(Settle::Delivered {
            seq,
            reply: reply.clone(),
        });
        NatsAck {
            seq,
            delivered,
            reply: std::sync::Mutex::new(Some(reply)),
            tx: tx.clone(),
        }
    }

    fn settle(&self, outcome: Ack) {
        let taken = self.reply.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(reply) = taken {
            let _ = self.tx.send(Settle::Settled {
                seq: self.seq,
                delivered: self.delivered,
                reply,
                outcome,
            });
        }
    }
}

impl Acker for NatsAck {
    fn ack(&self, outcome: Ack) {
        self.settle(outcome);
    }
}

impl Drop for NatsAck {
    fn drop(&mut self) {
        self.settle(Ack::Retry);
    }
}

/// Sends a consumer's acknowledgements until every sender is gone.
///
/// Consumers use `AckPolicy::All`: acknowledging a message acknowledges
/// every earlier one, so one ack covers a whole burst of settled messages
/// (per-message acks cost the server about a third of its time per message,
/// BENCHMARKS.md). The task therefore tracks every delivered, unacknowledged
/// stream sequence and acknowledges only up to the first one not yet done:
/// a message handed back for a retry, or still being processed, holds the
/// acknowledgement of everything after it until it is done itself. Messages
/// held that way are kept alive with progress acks (`+WPI`), so the server
/// does not deliver them again after `ack_wait` while they wait. The cost:
/// while one message waits for its retry, the consumer delivers at most the
/// server's `max_ack_pending` messages beyond it (retries only happen while
/// a backend is failing; a worker's own failures are retried and
/// dead-lettered by the dispatcher and settle as done). Messages not yet
/// settled are kept alive the same way while they wait in the worker's
/// local queue or run: a slow worker's backlog must not be delivered again
/// after `ack_wait` (and count toward `Nats:MaxDeliver`) while it waits.
///
/// Messages an earlier reader of the consumer took and left unsettled, or
/// that the consumer delivered elsewhere (`Settle::Inherited`), are open
/// too, so nothing is acknowledged past them before they come again and are
/// done. Those that have not come again after twice the ack wait are no
/// longer pending at the server (another reader settled them, or they were
/// deleted from the stream), and stop holding the others.
async fn ack_task(
    client: async_nats::Client,
    mut rx: mpsc::UnboundedReceiver<Settle>,
    ack_wait: Duration,
) {
    // Delivered, unacknowledged messages by stream sequence: `Some` while
    // this reader holds them (waiting, running, or done), `None` for one
    // handed back or inherited.
    let mut open: std::collections::BTreeMap<u64, Option<Held>> = std::collections::BTreeMap::new();
    // Inherited messages not delivered again yet, and when they stop holding.
    let mut unseen = std::collections::BTreeSet::new();
    let mut given_up = tokio::time::Instant::now();
    let (keep_alive, mut tick) = keep_alive_timer(ack_wait);
    loop {
        let first = tokio::select! {
            s = rx.recv() => match s {
                Some(s) => s,
                None => {
                    // Every delivery is settled or handed back. What is done
                    // but could not be acknowledged (an earlier message was
                    // handed back) would come again after the ack wait: it
                    // comes at once instead, and holds the next reader's
                    // acknowledgements no longer (see `inherited`).
                    for held in open.into_values().flatten() {
                        let nak = jetstream::AckKind::Nak(None);
                        if let Err(e) = client.publish(held.reply, nak.into()).await {
                            tracing::debug!(error = %e, "JetStream NAK failed");
                        }
                    }
                    return;
                }
            },
            _ = tick.tick() => {
                if !unseen.is_empty() && tokio::time::Instant::now() >= given_up {
                    for seq in std::mem::take(&mut unseen) {
                        open.remove(&seq);
                    }
                    ack_settled(&client, &mut open).await;
                }
                keep_held_alive(&client, &mut open, keep_alive).await;
                continue;
            }
        };
        let mut next = Some(first);
        let mut n = 0;
        while let Some(s) = next {
            match s {
                Settle::Inherited(seqs) => {
                    given_up = inherit(&mut open, &mut unseen, seqs, ack_wait);
                }
                Settle::Delivered { seq, reply } => {
                    unseen.remove(&seq);
                    open.insert(
                        seq,
                        Some(Held {
                            reply,
                            since: tokio::time::Instant::now(),
                            done: false,
                        }),
                    );
                }
                Settle::Settled {
                    seq,
                    reply,
                    outcome: Ack::Done,
                    ..
                } => {
                    if let Some(slot) = open.get_mut(&seq) {
                        *slot = Some(Held {
                            reply,
                            since: tokio::time::Instant::now(),
                            done: true,
                        });
                    }
                }
                Settle::Settled {
                    seq,
                    delivered,
                    reply,
                    outcome: Ack::Retry,
                } => {
                    if let Some(slot) = open.get_mut(&seq) {
                        *slot = None;
                    }
                    let nak = jetstream::AckKind::Nak(Some(retry_delay(
                        delivered.max(0) as u64,
                        ack_wait,
                    )));
                    if let Err(e) = client.publish(reply, nak.into()).await {
                        tracing::warn!(error = %e, "JetStream NAK failed; the message comes back after Nats:AckWaitSeconds");
                    }
                }
            }
            n += 1;
            next = if n < 4096 { rx.try_recv().ok() } else { None };
        }
        ack_settled(&client, &mut open).await;
    }
}

/// Opens the inherited `seqs` the task does not know of yet; they hold
/// acknowledgements until they come again, or until the returned instant:
/// by then the server has delivered again every one still pending.
fn inherit(
    open: &mut std::collections::BTreeMap<u64, Option<Held>>,
    unseen: &mut std::collections::BTreeSet<u64>,
    seqs: std::ops::Range<u64>,
    ack_wait: Duration,
) -> tokio::time::Instant {
    for seq in seqs {
        if let std::collections::btree_map::Entry::Vacant(slot) = open.entry(seq) {
            slot.insert(None);
            unseen.insert(seq);
        }
    }
    tokio::time::Instant::now() + ack_wait * 2 + Duration::from_secs(1)
}

/// Acknowledges the settled messages up to the first one not yet done.
async fn ack_settled(
    client: &async_nats::Client,
    open: &mut std::collections::BTreeMap<u64, Option<Held>>,
) {
    let mut last = None;
    while let Some(entry) = open.first_entry() {
        if !entry.get().as_ref().is_some_and(|held| held.done) {
            break;
        }
        last = entry.remove();
    }
    if let Some(held) = last {
        let ack = jetstream::AckKind::Ack;
        if let Err(e) = client.publish(held.reply, ack.into()).await {
            tracing::warn!(error = %e, "JetStream ack failed; those messages will be redelivered");
        }
    }
}

/// The stream sequences an earlier reader of the consumer took and did not
/// acknowledge (`num_ack_pending` of them, all above the ack floor and at
/// most the last delivered one, as acks are cumulative). The server
/// delivers them again after their ack wait; meanwhile, an ack for a newer
/// message would acknowledge them too, unprocessed. At most
/// `MAX_INHERITED` of them are guarded: more would mean messages deleted
/// from the stream under a consumer that lagged that far behind.
pub(super) fn inherited(info: &consumer::Info) -> std::ops::Range<u64> {
    let (floor, last) = (
        info.ack_floor.stream_sequence,
        info.delivered.stream_sequence,
    );
    if info.num_ack_pending == 0 || last <= floor {
        return 0..0;
    }
    (floor + 1).max(last.saturating_sub(MAX_INHERITED - 1))..last.saturating_add(1)
}

/// The most sequences a reader guards for an earlier one (see `inherited`).
const MAX_INHERITED: u64 = 100_000;

/// A message this reader holds: delivered and waiting or running, or done
/// and waiting for an earlier one to be acknowledged with it.
struct Held {
    reply: async_nats::Subject,
    /// Delivered or settled, or last kept alive, at.
    since: tokio::time::Instant,
    done: bool,
}

/// Sends a progress ack for every message held that has waited
/// `keep_alive` since it was delivered, settled or last kept alive.
async fn keep_held_alive(
    client: &async_nats::Client,
    open: &mut std::collections::BTreeMap<u64, Option<Held>>,
    keep_alive: Duration,
) {
    let now = tokio::time::Instant::now();
    for held in open.values_mut().flatten() {
        if now.duration_since(held.since) >= keep_alive {
            held.since = now;
            let progress = jetstream::AckKind::Progress;
            if let Err(e) = client.publish(held.reply.clone(), progress.into()).await {
                tracing::debug!(error = %e, "JetStream progress ack failed");
            }
        }
    }
}

/// The ack task of one opening of `consumer` (see `ack_task`), told first
/// what an earlier reader left unsettled.
pub(super) fn spawn_ack_task(
    client: &async_nats::Client,
    ack_wait: Duration,
    consumer: &consumer::PullConsumer,
) -> mpsc::UnboundedSender<Settle> {
    let (acks, ack_rx) = mpsc::unbounded_channel();
    let _ = acks.send(Settle::Inherited(inherited(consumer.cached_info())));
    tokio::spawn(ack_task(client.clone(), ack_rx, ack_wait));
    acks
}
