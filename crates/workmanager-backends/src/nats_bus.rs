//! The NATS JetStream bus (`PubSub:Type=nats`): a stream per topic (subject
//! `workmanager.topic.<topic>`), a durable pull consumer per worker and
//! topic (so each worker gets each message once, whichever instance hosts
//! it), explicit acks after the dispatcher settled a message, redelivery
//! after `ack_wait`, at most `max_deliver` deliveries. The client reconnects
//! by itself. Observers use a core-NATS subscription on the same subject.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, watch};
use workmanager_core::bus::{Ack, Acker, Bus, BusError, Delivery, Subscription};
use workmanager_core::CloudEvent;

use crate::readers::{GroupHandle, Readers};

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

    async fn stream(&self, topic: &str) -> Result<stream::Stream, BusError> {
        let mut streams = self.streams.lock().await;
        if let Some(s) = streams.get(topic) {
            return Ok(s.clone());
        }
        let s = self
            .js
            .get_or_create_stream(stream::Config {
                name: safe_name("wm_", topic),
                subjects: vec![subject(topic)],
                max_messages: self.settings.stream_max_messages,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        streams.insert(topic.to_string(), s.clone());
        Ok(s)
    }
}

/// Settles one message through its subscription's ack task: one task per
/// consumer sends the acknowledgements in order, instead of a task per
/// message. A retry is a negative acknowledgement with a short delay, so
/// the server redelivers soon instead of after `Nats:AckWaitSeconds`.
struct NatsAck {
    msg: std::sync::Mutex<Option<jetstream::Message>>,
    acks: mpsc::UnboundedSender<(jetstream::Message, Ack)>,
}

impl NatsAck {
    fn new(
        msg: jetstream::Message,
        acks: &mpsc::UnboundedSender<(jetstream::Message, Ack)>,
    ) -> Self {
        Self {
            msg: std::sync::Mutex::new(Some(msg)),
            acks: acks.clone(),
        }
    }
}

impl Acker for NatsAck {
    fn ack(&self, outcome: Ack) {
        let taken = self.msg.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(m) = taken {
            let _ = self.acks.send((m, outcome));
        }
    }
}

/// Sends a consumer's acknowledgements until its last message is settled.
async fn ack_task(mut rx: mpsc::UnboundedReceiver<(jetstream::Message, Ack)>) {
    while let Some((m, outcome)) = rx.recv().await {
        let sent = match outcome {
            Ack::Done => m.ack().await,
            Ack::Retry => m.ack_with(jetstream::AckKind::Nak(Some(RETRY_DELAY))).await,
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "JetStream ack failed; the message will be redelivered");
        }
    }
}

/// How soon a message handed back for a retry is delivered again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

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

    async fn publish_slice(&self, topic: &str, events: &[CloudEvent]) -> Result<(), BusError> {
        self.stream(topic).await?;
        let subj = subject(topic);
        let mut acks = Vec::with_capacity(events.len());
        for e in events {
            let payload = serde_json::to_vec(&e.0).map_err(unavailable)?;
            acks.push(
                self.js
                    .publish(subj.clone(), payload.into())
                    .await
                    .map_err(unavailable)?,
            );
        }
        for a in acks {
            a.await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn subscribe(&self, topics: &[String], group: &str) -> Result<Subscription, BusError> {
        let (tx, rx) = mpsc::channel(self.settings.capacity.max(1));
        let (stop_tx, stop_rx) = watch::channel(false);
        for t in topics {
            let stream = self.stream(t).await?;
            let name = safe_name("w_", group);
            let consumer: consumer::PullConsumer = stream
                .get_or_create_consumer(
                    &name,
                    consumer::pull::Config {
                        durable_name: Some(name.clone()),
                        deliver_policy: consumer::DeliverPolicy::New,
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: self.settings.ack_wait,
                        max_deliver: self.settings.max_deliver,
                        ..Default::default()
                    },
                )
                .await
                .map_err(unavailable)?;
            let mut messages = consumer.messages().await.map_err(unavailable)?;
            let (tx, mut stop, topic) = (tx.clone(), stop_rx.clone(), Arc::<str>::from(t.as_str()));
            let (acks, ack_rx) = mpsc::unbounded_channel();
            tokio::spawn(ack_task(ack_rx));
            tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        m = messages.next() => m,
                    };
                    match next {
                        Some(Ok(m)) => {
                            let Some(event) = decode(&m.payload) else {
                                NatsAck::new(m, &acks).ack(Ack::Done);
                                continue;
                            };
                            let d = Delivery {
                                topic: topic.clone(),
                                event,
                                acker: Some(Box::new(NatsAck::new(m, &acks))),
                            };
                            if tx.send(d).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "JetStream consumer error; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        None => return,
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
        }
    }

    async fn bus(n: &NatsServer) -> NatsBus {
        NatsBus::connect(&n.url(), NatsAuth::default(), settings())
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
    async fn an_unacknowledged_message_is_redelivered_to_the_next_consumer() {
        let n = NatsServer::start();
        let first = bus(&n).await;
        let mut s = first.subscribe(&["t".into()], "w1").await.unwrap();
        first.publish("t", suite::ev(9)).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(10), s.receiver.recv())
            .await
            .unwrap()
            .unwrap();
        std::mem::forget(d); // the instance dies before acknowledging
        first.unsubscribe(&["t".into()], "w1").await;
        let second = bus(&n).await;
        let mut s2 = second.subscribe(&["t".into()], "w1").await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(15), s2.receiver.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.event.0["data"], serde_json::json!(9));
        d.ack(Ack::Done);
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
        let d = recv(&mut s.receiver).await;
        assert_eq!(d.event.0["data"], serde_json::json!(5));
        d.ack(Ack::Done);
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
