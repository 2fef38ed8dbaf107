//! Reading a JetStream pull consumer in bursts of stored messages, and
//! noticing what the consumer delivered elsewhere.
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio::sync::mpsc;
use workmanager_core::bus::BusError;

use super::acks::{inherited, Settle};
use super::unavailable;

/// Reads a pull consumer in bursts: one request asks for up to `FETCH`
/// messages that are already stored (`no_wait`), and the next request
/// follows as soon as it is answered. A stream found drained while messages
/// are flowing is asked again `LINGER` later, so messages arrive in bursts;
/// after a quiet spell one request waits at the server for the next
/// message, which is delivered as soon as it is stored.
///
/// Bursts are what make JetStream cheap: a message delivered alone, the
/// moment it is stored, cost the server ~30 µs and the service ~29 µs of
/// CPU; in bursts ~21 µs each (BENCHMARKS.md).
pub(super) struct Reader {
    consumer: consumer::PullConsumer,
    /// The request being answered, and when it is given up if the server
    /// never ends it (a restarted server forgets its requests): one timer
    /// per request, not per message.
    batch: Option<consumer::pull::Batch>,
    give_up: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Whether the current request waits at the server (the stream was
    /// drained), whether it was sent after `LINGER`, and what it brought.
    waiting: bool,
    lingered: bool,
    got: usize,
    asked_at: tokio::time::Instant,
    /// The consumer was found deleted: every read fails, so the reader
    /// opens it again.
    gone: bool,
    /// The consumer sequence of the last delivery this reader knows of.
    last_delivery: u64,
}

/// Messages asked for by one request.
const FETCH: usize = 256;
/// How long a reader waits before asking a drained stream again while
/// messages are flowing (the most this adds to a message's latency).
const LINGER: Duration = Duration::from_millis(1);
/// How long a request waits at the server for the next message.
const WAIT: Duration = Duration::from_secs(5);

impl Reader {
    pub(super) fn new(consumer: consumer::PullConsumer) -> Reader {
        Reader {
            last_delivery: consumer.cached_info().delivered.consumer_sequence,
            consumer,
            batch: None,
            give_up: Box::pin(tokio::time::sleep(Duration::ZERO)),
            // As if a message had just come: the first request asks for
            // what is stored.
            waiting: true,
            lingered: false,
            got: 1,
            asked_at: tokio::time::Instant::now(),
            gone: false,
        }
    }

    /// The next message of the consumer. Only the reader's stop cancels
    /// this, and drops the reader.
    pub(super) async fn next(&mut self) -> Result<jetstream::Message, BusError> {
        loop {
            if self.gone {
                return Err(BusError::Unavailable(
                    "the JetStream consumer is gone".into(),
                ));
            }
            if let Some(batch) = self.batch.as_mut() {
                let answer = tokio::select! {
                    m = batch.next() => Ok(m),
                    _ = &mut self.give_up => Err(()),
                };
                match answer {
                    Ok(Some(Ok(m))) => {
                        self.got += 1;
                        return Ok(m);
                    }
                    Ok(Some(Err(e))) => {
                        self.batch = None;
                        return Err(unavailable(e));
                    }
                    Ok(None) => {
                        self.batch = None;
                        // A wait that ended with nothing well before its
                        // time: the consumer may have been deleted (with its
                        // stream), which the server does not say.
                        let quiet = self.waiting && self.got == 0;
                        if quiet && self.asked_at.elapsed() < WAIT / 2 {
                            self.check(None).await;
                        }
                    }
                    Err(()) => {
                        // Never answered: the server lost the request (it
                        // restarted), or the consumer is gone. An answer
                        // that comes after all is lost with the request
                        // (see `delivered`).
                        self.batch = None;
                        self.check(None).await;
                    }
                }
            }
            self.ask().await?;
        }
    }

    /// Hands back what the current request still brings, after the reader
    /// stopped: those messages come again at once to the next reader of
    /// the consumer, instead of after their ack wait.
    pub(super) async fn drain(mut self) {
        let Some(mut batch) = self.batch.take() else {
            return;
        };
        let give_up = self.give_up.deadline();
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(give_up, batch.next()).await {
            if let Err(e) = m.ack_with(jetstream::AckKind::Nak(None)).await {
                tracing::debug!(error = %e, "JetStream NAK failed");
            }
        }
    }

    /// Notes the consumer sequence of a message this reader got, before it
    /// is handed over. A jump means the consumer delivered messages in
    /// between elsewhere: to a request this reader gave up, or one a
    /// stopped reader left open at the server. Those messages are handed
    /// to `acks` as inherited first, so that acknowledging this one or a
    /// later one never acknowledges them unprocessed.
    pub(super) async fn delivered(
        &mut self,
        consumer_seq: u64,
        acks: &mpsc::UnboundedSender<Settle>,
    ) {
        if consumer_seq > self.last_delivery.saturating_add(1) {
            for attempt in 1..=3 {
                if self.check(Some(acks)).await {
                    break;
                }
                tracing::warn!(
                    attempt,
                    "JetStream consumer info unavailable after a delivery elsewhere"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        self.last_delivery = self.last_delivery.max(consumer_seq);
    }

    /// Whether the consumer's state could be read; a consumer found deleted
    /// makes the reader fail until it is opened again. The messages it has
    /// delivered and that are not acknowledged are handed to `acks` as
    /// inherited, if given.
    async fn check(&mut self, acks: Option<&mpsc::UnboundedSender<Settle>>) -> bool {
        use jetstream::context::ConsumerInfoErrorKind as Kind;
        match self.consumer.info().await {
            Err(e) => {
                self.gone = matches!(e.kind(), Kind::NotFound | Kind::StreamNotFound);
                false
            }
            Ok(info) => {
                if let Some(acks) = acks {
                    let _ = acks.send(Settle::Inherited(inherited(info)));
                }
                true
            }
        }
    }

    /// Sends the next request: for stored messages while they flow (after
    /// `LINGER` if the last request found none), else one that waits.
    async fn ask(&mut self) -> Result<(), BusError> {
        let (wait, linger) = match (self.waiting, self.got > 0) {
            // A message came, or the stored ones did: ask for more at once.
            (_, true) => (false, false),
            // The wait ended with nothing: wait again.
            (true, false) => (true, false),
            // None were stored: ask once more a little later, then wait.
            (false, false) => (self.lingered, !self.lingered),
        };
        if linger {
            tokio::time::sleep(LINGER).await;
        }
        (self.waiting, self.lingered, self.got) = (wait, linger, 0);
        let batch = if wait {
            let request = self.consumer.batch().max_messages(1).expires(WAIT);
            request.messages().await
        } else {
            self.consumer.fetch().max_messages(FETCH).messages().await
        };
        self.asked_at = tokio::time::Instant::now();
        // A stored-messages request is answered at once.
        let answer_within = if wait { WAIT } else { Duration::ZERO };
        let give_up = self.asked_at + answer_within + Duration::from_secs(2);
        self.give_up.as_mut().reset(give_up);
        self.batch = Some(batch.map_err(unavailable)?);
        Ok(())
    }
}
