//! Several instances on one real redis-server (state and Redis Streams):
//! forwarding of worker-scoped requests to the owner, the hop guard,
//! ListWorkers across instances, and the take-over of a killed instance's
//! workers with every event accounted for.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use tonic::transport::Channel;
use workmanager_api::pb;
use workmanager_api::pb::work_manager_client::WorkManagerClient;
use workmanager_api::pb::WorkerStatus;
use workmanager_backends::testing::RedisServer;
use workmanager_core::bus::{Ack, Bus};

use crate::common::*;

const ECHO: &str = "def Process(event):\n    return {'type': 'out', 'data': event['data']}\n";

/// One instance of a cluster: its own directory, `HOSTNAME` = `name`, fast
/// heartbeats so staleness shows within seconds.
struct Member {
    svc: Service,
    _dir: tempfile::TempDir,
}

fn cluster_settings(redis: &RedisServer) -> Vec<String> {
    vec![
        "StateStore:Type=redis".into(),
        "PubSub:Type=redis".into(),
        format!("Redis:Url={}", redis.url()),
        "Instance:HeartbeatIntervalSeconds=1".into(),
        "Instance:StaleAfterSeconds=3".into(),
        "Redis:VisibilityTimeoutSeconds=4".into(),
    ]
}

fn member(redis: &RedisServer, name: &str) -> Member {
    let dir = tempfile::tempdir().unwrap();
    let settings = cluster_settings(redis);
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let svc = Service::start_env(dir.path(), &settings, &[("HOSTNAME", name)]);
    Member { svc, _dir: dir }
}

async fn cluster(redis: &RedisServer) -> (Member, Member, Member) {
    let (a, b, c) = (
        member(redis, "inst-a"),
        member(redis, "inst-b"),
        member(redis, "inst-c"),
    );
    for m in [&a, &b, &c] {
        m.svc.wait_ready().await;
    }
    (a, b, c)
}

async fn info(c: &mut WorkManagerClient<Channel>, id: &str) -> pb::WorkerInfo {
    c.get_worker(pb::GetWorkerRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_reaching_any_instance_are_served_by_the_owner() {
    let redis = RedisServer::start();
    let (a, b, c) = cluster(&redis).await;
    let (mut ga, mut gb, mut gc) = (a.svc.grpc().await, b.svc.grpc().await, c.svc.grpc().await);

    let id = create(&mut ga, &versioned("v1"), true).await;
    // Read through B: the owner's live view, not a copy from the store.
    let w = info(&mut gb, &id).await;
    assert_eq!(
        (w.instance_id.as_str(), w.status()),
        ("inst-a", WorkerStatus::Running)
    );

    // Stop via B, seen by A.
    gb.stop_worker(pb::StopWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    assert_eq!(status(&mut ga, &id).await, WorkerStatus::Stopped);
    // Hot reload and tags via C, start via B, invoke via C.
    gc.load_code_from_content(pb::LoadCodeFromContentRequest {
        id: id.clone(),
        content: versioned("v2").into_bytes(),
    })
    .await
    .unwrap();
    gc.set_tags(pb::SetTagsRequest {
        id: id.clone(),
        tags: [("desk".to_string(), "fx".to_string())].into(),
    })
    .await
    .unwrap();
    gb.start_worker(pb::StartWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    assert_eq!(
        invoke(&mut gc, &id, json!(7)).await.unwrap()["data"]["version"],
        "v2"
    );
    let tags = gb
        .get_tags(pb::GetTagsRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .tags;
    assert_eq!(tags.get("desk").map(String::as_str), Some("fx"));
    let history = gc
        .get_worker_history(pb::GetWorkerHistoryRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.entries.len(), 2);
    // REST on B reaches A too.
    let http = reqwest::Client::new();
    let r: serde_json::Value = http
        .post(b.svc.url(&format!("/v1/workers/{id}/invoke")))
        .json(&json!({"event": {"specversion": "1.0", "id": "x1", "source": "urn:t", "type": "in", "data": 1}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["event"]["data"]["version"], "v2", "{r}");
    // Every instance lists every worker with its owner.
    let other = create(&mut gc, ECHO, false).await;
    for g in [&mut ga, &mut gb, &mut gc] {
        let list = g
            .list_workers(pb::ListWorkersRequest { filters: vec![] })
            .await
            .unwrap()
            .into_inner()
            .workers;
        let owners: BTreeMap<String, String> =
            list.into_iter().map(|w| (w.id, w.instance_id)).collect();
        assert_eq!(owners.get(&id).map(String::as_str), Some("inst-a"));
        assert_eq!(owners.get(&other).map(String::as_str), Some("inst-c"));
    }
    // A fourth instance starting, and RecoverWorkers on B, leave a live
    // owner's workers alone.
    let d = member(&redis, "inst-d");
    d.svc.wait_ready().await;
    let recovered = gb
        .recover_workers(pb::RecoverWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .recovered_count;
    assert_eq!(
        recovered, 0,
        "nothing to recover while every owner is alive"
    );
    let mut gd = d.svc.grpc().await;
    assert_eq!(info(&mut gd, &id).await.instance_id, "inst-a");
    assert_eq!(info(&mut gd, &other).await.instance_id, "inst-c");
    // All of it happened on A: one owner, no copy elsewhere.
    let reload = |l: &str| l.contains("\"LoadCodeFromContent\"");
    assert!(
        a.svc.logs_with(reload).await.lines().any(reload),
        "audited at the owner"
    );

    // The hop guard: a request that says it was forwarded is not forwarded again.
    let mut req = tonic::Request::new(pb::GetWorkerRequest { id: id.clone() });
    req.metadata_mut()
        .insert("x-workmanager-forwarded-by", "inst-x".parse().unwrap());
    let err = gb.get_worker(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("already forwarded"),
        "{}",
        err.message()
    );

    // A worker on A receives what is published through C.
    let mut out = gb
        .subscribe(pb::SubscribeRequest {
            topic: "out".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let echo = create(&mut ga, ECHO, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = http
        .post(c.svc.url("/v1/topics/in"))
        .header("content-type", "application/cloudevents+json")
        .json(&json!({"specversion": "1.0", "id": "via-c", "source": "urn:t", "type": "in", "data": 42}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    use tokio_stream::StreamExt;
    // (The versioned worker listens on "in" too; its output is skipped.)
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), out.next())
            .await
            .expect("the output arrives")
            .unwrap()
            .unwrap();
        let e = workmanager_api::convert::event_from_proto(m.event.unwrap()).unwrap();
        if e.0["data"] == 42 {
            break;
        }
    }
    let w = info(&mut gc, &echo).await;
    assert_eq!(
        (w.instance_id.as_str(), w.messages_processed),
        ("inst-a", 1)
    );
    // ListWorkers anywhere shows the owner's live counters too.
    let listed = gc
        .list_workers(pb::ListWorkersRequest { filters: vec![] })
        .await
        .unwrap()
        .into_inner()
        .workers
        .into_iter()
        .find(|w| w.id == echo)
        .expect("listed");
    assert_eq!(listed.messages_processed, 1);

    // Delete via C: gone everywhere.
    gc.delete_worker(pb::DeleteWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    for g in [&mut ga, &mut gb] {
        let err = g
            .get_worker(pb::GetWorkerRequest { id: id.clone() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_instance_s_workers_are_taken_over_and_every_event_ends_up_once() {
    const EVENTS: usize = 10_000;
    let redis = RedisServer::start();
    let (mut a, b, c) = cluster(&redis).await;
    let mut ga = a.svc.grpc().await;
    let mut gb = b.svc.grpc().await;
    let mut ids = Vec::new();
    for topic in ["k1", "k2"] {
        let mut req = create_req(ECHO, true);
        req.topics = vec![topic.into()];
        ids.push(ga.create_worker(req).await.unwrap().into_inner().id);
    }

    // The test's own consumer groups count outputs and dead letters.
    let bus = test_redis_bus(&redis.url(), "counter").await;
    let mut outputs = bus
        .subscribe(
            &["out".into(), "k1-dead".into(), "k2-dead".into()],
            "test-counter",
        )
        .await
        .unwrap()
        .receiver;
    let publisher = tokio::spawn(async move {
        for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(500) {
            for (topic, parity) in [("k1", 0), ("k2", 1)] {
                let events = chunk
                    .iter()
                    .filter(|i| *i % 2 == parity)
                    .map(|i| {
                        workmanager_core::CloudEvent::from_input(json!({
                            "specversion": "1.0", "id": format!("e-{i}"), "source": "urn:load",
                            "type": "in", "data": i
                        }))
                    })
                    .collect();
                bus.publish_many(topic, events).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bus
    });

    // Output id -> input number; dead letters by input number.
    let mut by_id: BTreeMap<String, i64> = BTreeMap::new();
    let mut dead: BTreeSet<i64> = BTreeSet::new();
    let mut received = 0usize;
    let mut killed_at = None;
    let mut take_over = None;
    let deadline = Instant::now() + Duration::from_secs(240);
    while by_id.len() + dead.len() < EVENTS {
        assert!(
            Instant::now() < deadline,
            "{} outputs and {} dead letters of {EVENTS}",
            by_id.len(),
            dead.len()
        );
        if killed_at.is_none() && by_id.len() >= 1_500 {
            a.svc.kill9();
            killed_at = Some(Instant::now());
            // How long until B or C owns both workers. Watched in the store,
            // not through an RPC: a request for an unreachable owner's
            // worker takes it over itself, and this must prove that the
            // background sweep does so with no request at all.
            let (url, ids) = (redis.url(), ids.clone());
            take_over = Some(tokio::spawn(async move {
                use workmanager_core::StateStore;
                let store = workmanager_backends::RedisStore::connect(&url, Duration::from_secs(2))
                    .await
                    .unwrap();
                let started = Instant::now();
                loop {
                    let mut all = true;
                    for id in &ids {
                        let v = store
                            .get(&workmanager_core::store::keys::worker(id))
                            .await
                            .unwrap()
                            .expect("the record exists");
                        let record: workmanager_core::WorkerRecord =
                            serde_json::from_slice(&v.value).unwrap();
                        all &= record.instance_id != "inst-a"
                            && record.status == workmanager_core::WorkerStatus::Running;
                    }
                    if all || started.elapsed() > Duration::from_secs(120) {
                        return started.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }));
        }
        let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(5), outputs.recv()).await else {
            continue;
        };
        received += 1;
        let n = d.event.0["data"].as_i64().expect("numeric data");
        if d.topic.ends_with("-dead") {
            dead.insert(n);
        } else {
            let id = d.event.get_str("id").unwrap().to_string();
            if let Some(prev) = by_id.insert(id, n) {
                assert_eq!(prev, n, "one id, one input");
            }
        }
        d.ack(Ack::Done);
    }
    killed_at.expect("A was killed under load");
    let bus = publisher.await.unwrap();
    drop(bus);

    // Taken over by B or C, within a minute, and running.
    for id in &ids {
        let w = info(&mut gb, id).await;
        assert!(
            w.instance_id == "inst-b" || w.instance_id == "inst-c",
            "owner {}",
            w.instance_id
        );
        assert_eq!(w.status(), WorkerStatus::Running);
    }
    let took = take_over.expect("polled").await.unwrap();
    assert!(
        took <= Duration::from_secs(60),
        "taken over {took:?} after the kill; the bound is 60 s"
    );
    let took_over = [&b, &c]
        .iter()
        .any(|m| m.svc.logs().contains("took the worker over"));
    assert!(took_over, "the take-over is logged");

    // Every input exactly once: as one output id or as a dead letter.
    let inputs: BTreeSet<i64> = by_id
        .values()
        .copied()
        .chain(dead.iter().copied())
        .collect();
    assert_eq!(inputs.len(), EVENTS, "every event accounted for");
    assert_eq!(by_id.len() + dead.len(), EVENTS, "and none twice");
    assert_eq!(inputs, (0..EVENTS as i64).collect());
    eprintln!(
        "{} outputs, {} dead letters, {} deliveries to the counter; both workers running \
         elsewhere {took:?} after the kill",
        by_id.len(),
        dead.len(),
        received
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_restart_mid_stream_opens_the_breaker_buffers_and_loses_nothing() {
    const EVENTS: i64 = 1_000;
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = cluster_settings(&redis);
    settings.extend([
        "Resilience:RetryAttempts=1".to_string(),
        "Resilience:RetryBaseDelayMs=50".to_string(),
        "Resilience:CircuitBreakerThreshold=3".to_string(),
        "Resilience:CircuitBreakerDurationSeconds=5".to_string(),
    ]);
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let svc = Service::start(dir.path(), &settings);
    svc.wait_ready().await;
    let mut g = svc.grpc().await;
    let mut req = create_req(ECHO, true);
    req.topics = vec!["r-in".into()];
    g.create_worker(req).await.unwrap();

    let counter = test_redis_bus(&redis.url(), "counter").await;
    let mut outputs = counter
        .subscribe(&["out".into()], "test-counter")
        .await
        .unwrap()
        .receiver;
    let events: Vec<_> = (0..EVENTS)
        .map(|i| {
            workmanager_core::CloudEvent::from_input(json!({
                "specversion": "1.0", "id": format!("r-{i}"), "source": "urn:load", "type": "in", "data": i
            }))
        })
        .collect();
    counter.publish_many("r-in", events).await.unwrap();

    let mut seen: BTreeMap<String, i64> = BTreeMap::new();
    let collect = |d: workmanager_core::bus::Delivery, seen: &mut BTreeMap<String, i64>| {
        let n = d.event.0["data"].as_i64().expect("numeric data");
        seen.insert(d.event.get_str("id").unwrap().to_string(), n);
        d.ack(Ack::Done);
    };
    while seen.len() < 200 {
        let d = tokio::time::timeout(Duration::from_secs(20), outputs.recv())
            .await
            .expect("outputs flow")
            .unwrap();
        collect(d, &mut seen);
    }

    // Redis goes away mid-stream.
    redis.stop();
    let http = reqwest::Client::new();
    let mut accepted = Vec::new();
    let mut health_saw_open = false;
    let down = Instant::now();
    let mut i = EVENTS;
    while down.elapsed() < Duration::from_secs(8) {
        let r = http
            .post(svc.url("/v1/topics/r-in"))
            .header("content-type", "application/cloudevents+json")
            .json(&json!({"specversion": "1.0", "id": format!("r-{i}"), "source": "urn:load", "type": "in", "data": i}))
            .send()
            .await
            .unwrap();
        if r.status() == 202 {
            accepted.push(i);
        } else {
            assert_eq!(
                r.status(),
                503,
                "refused as unavailable until the breaker opens"
            );
        }
        i += 1;
        let h: serde_json::Value = svc.get_json("/health").await;
        if h["checks"]["circuit"]["description"]
            .as_str()
            .is_some_and(|d| !d.contains("pubsub closed"))
        {
            health_saw_open = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(health_saw_open, "health reports the open circuit");
    assert!(
        !accepted.is_empty(),
        "publishes are buffered while the breaker is open"
    );
    let metrics = svc.get_text("/metrics").await;
    assert!(
        metrics.contains("workmanager_circuit_state{backend=\"pubsub\"}"),
        "{metrics}"
    );
    redis.start_again();

    // Everything published before the outage, and everything accepted
    // during it, comes out once.
    let expected: BTreeSet<i64> = (0..EVENTS).chain(accepted.iter().copied()).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got: BTreeSet<i64> = seen.values().copied().collect();
        if expected.is_subset(&got) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} outputs after the restart; missing e.g. {:?}; service log:\n{}",
            got.len(),
            expected.len(),
            expected.difference(&got).take(5).collect::<Vec<_>>(),
            svc.logs()
                .lines()
                .filter(|l| !l.contains("\"audit\""))
                .collect::<Vec<_>>()
                .join("\n")
        );
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), outputs.recv()).await {
            collect(d, &mut seen);
        }
    }
    let got: Vec<i64> = seen.values().copied().collect();
    let distinct: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(got.len(), distinct.len(), "one output id per input");
    assert_eq!(distinct, expected, "only what was published or accepted");
}

/// Publishes accepted while the broker is down wait in the instance's
/// outbox file: the instance is killed (-9) before the broker comes back,
/// and its next run sends them.
#[tokio::test(flavor = "multi_thread")]
async fn publishes_buffered_during_an_outage_survive_a_crash_of_the_instance() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = cluster_settings(&redis);
    settings.extend([
        "Resilience:RetryAttempts=0".to_string(),
        "Resilience:CircuitBreakerThreshold=1".to_string(),
        "Resilience:CircuitBreakerDurationSeconds=2".to_string(),
    ]);
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let mut svc = Service::start(dir.path(), &settings);
    svc.wait_ready().await;
    // A consumer group on the topic, made before the outage.
    let reader = test_redis_bus(&redis.url(), "reader").await;
    let mut got = reader
        .subscribe(&["kept".into()], "test-reader")
        .await
        .unwrap()
        .receiver;

    redis.stop();
    let http = reqwest::Client::new();
    let mut accepted = BTreeSet::new();
    for i in 0..40 {
        let r = http
            .post(svc.url("/v1/topics/kept"))
            .header("content-type", "application/cloudevents+json")
            .json(&json!({"specversion": "1.0", "id": format!("k-{i}"), "source": "urn:t", "type": "t", "data": i}))
            .send()
            .await
            .unwrap();
        if r.status() == 202 {
            accepted.insert(i);
        }
    }
    assert!(
        accepted.len() >= 30,
        "buffered once the breaker opened: {accepted:?}"
    );
    let metrics = svc.get_text("/metrics").await;
    assert!(
        metrics.contains(&format!(
            "workmanager_publish_buffer_waiting {}",
            accepted.len()
        )),
        "{metrics}"
    );
    svc.kill9();
    redis.start_again();
    let _svc = Service::start(dir.path(), &settings);
    let mut delivered = BTreeSet::new();
    while delivered.len() < accepted.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), got.recv())
            .await
            .expect("the buffered publishes arrive after the restart")
            .unwrap();
        delivered.insert(d.event.0["data"].as_i64().unwrap());
        d.ack(Ack::Done);
    }
    assert_eq!(delivered, accepted, "each accepted publish, none other");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_uses_mtls_and_passes_the_caller_s_credential_on() {
    use sha2::Digest;
    let redis = RedisServer::start();
    let ca = crate::security::Ca::new("cluster CA");
    let certs = tempfile::tempdir().unwrap();
    let ca_path = crate::security::write(certs.path(), "ca.pem", &ca.pem());
    let key_of = |k: &str| hex::encode(sha2::Sha256::digest(k.as_bytes()));
    let foreign_ca = crate::security::write(
        certs.path(),
        "foreign.pem",
        &crate::security::Ca::new("another CA").pem(),
    );
    let start = |name: &str, peer_ca: Option<&std::path::Path>| {
        let leaf = ca.leaf(&["localhost", "127.0.0.1"], false);
        let cert = crate::security::write(certs.path(), &format!("{name}.pem"), &leaf.cert);
        let key = crate::security::write(certs.path(), &format!("{name}.key"), &leaf.key);
        let mut settings = cluster_settings(&redis);
        settings.extend([
            format!("Tls:CertificatePath={}", cert.display()),
            format!("Tls:KeyPath={}", key.display()),
            format!("Tls:ClientCaPath={}", ca_path.display()),
            format!("Auth:ApiKeys:ops:Sha256={}", key_of("ops-key-0123456789")),
            "Auth:ApiKeys:ops:Role=admin".to_string(),
            format!("Auth:ApiKeys:peek:Sha256={}", key_of("peek-key-0123456789")),
            "Auth:ApiKeys:peek:Role=viewer".to_string(),
        ]);
        if let Some(p) = peer_ca {
            settings.push(format!("Instance:PeerCaPath={}", p.display()));
        }
        let dir = tempfile::tempdir().unwrap();
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        let svc = Service::start_env(dir.path(), &settings, &[("HOSTNAME", name)]);
        (svc, dir)
    };
    let ((a, _da), (b, _db)) = (start("tls-a", None), start("tls-b", None));
    // C trusts another CA for its peers: it cannot verify A.
    let (c, _dc) = start("tls-c", Some(&foreign_ca));
    let client = ca.leaf(&["caller"], false);
    let wait = |port: u16| {
        let (ca, client) = (ca.pem(), &client);
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(mut c) = crate::security::grpc_tls(port, &ca, Some(client)).await {
                    let mut r = tonic::Request::new(pb::ListWorkersRequest::default());
                    r.metadata_mut()
                        .insert("x-api-key", "peek-key-0123456789".parse().unwrap());
                    if c.list_workers(r).await.is_ok() {
                        return c;
                    }
                }
                assert!(Instant::now() < deadline, "TLS instance not ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut ga = wait(a.grpc).await;
    let mut gb = wait(b.grpc).await;
    let mut create = tonic::Request::new(create_req(ECHO, true));
    create
        .metadata_mut()
        .insert("x-api-key", "ops-key-0123456789".parse().unwrap());
    let id = ga.create_worker(create).await.unwrap().into_inner().id;

    // Through B to A, over mTLS, with the caller's key checked again at A.
    let mut get = tonic::Request::new(pb::GetWorkerRequest { id: id.clone() });
    get.metadata_mut()
        .insert("x-api-key", "peek-key-0123456789".parse().unwrap());
    let w = gb.get_worker(get).await.unwrap().into_inner();
    assert_eq!(w.instance_id, "tls-a");
    // A viewer may not stop it: refused at B, never forwarded.
    let mut stop = tonic::Request::new(pb::StopWorkerRequest { id: id.clone() });
    stop.metadata_mut()
        .insert("x-api-key", "peek-key-0123456789".parse().unwrap());
    assert_eq!(
        gb.stop_worker(stop).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    // An admin may: the forwarded request carries the admin's key.
    let mut stop = tonic::Request::new(pb::StopWorkerRequest { id: id.clone() });
    stop.metadata_mut()
        .insert("x-api-key", "ops-key-0123456789".parse().unwrap());
    let w = gb
        .stop_worker(stop)
        .await
        .unwrap()
        .into_inner()
        .worker
        .unwrap();
    assert_eq!(
        (w.instance_id.as_str(), w.status()),
        ("tls-a", WorkerStatus::Stopped)
    );
    let by_caller = |l: &str| l.contains("apikey:ops");
    assert!(
        a.logs_with(by_caller).await.lines().any(by_caller),
        "A audited the forwarded stop under the caller's identity"
    );

    // A peer that is up but cannot be verified is an error to fix, not a
    // dead owner: C reports it and does not take the worker.
    let mut gc = wait(c.grpc).await;
    let mut get = tonic::Request::new(pb::GetWorkerRequest { id: id.clone() });
    get.metadata_mut()
        .insert("x-api-key", "peek-key-0123456789".parse().unwrap());
    let err = gc.get_worker(get).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let mut get = tonic::Request::new(pb::GetWorkerRequest { id: id.clone() });
    get.metadata_mut()
        .insert("x-api-key", "peek-key-0123456789".parse().unwrap());
    assert_eq!(
        ga.get_worker(get).await.unwrap().into_inner().instance_id,
        "tls-a"
    );
}
