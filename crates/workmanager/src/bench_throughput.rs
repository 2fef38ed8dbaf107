//! Throughput scenarios of `workmanager bench`, measured in the same run as
//! the latency figures: messages/s through one Python worker (publish over
//! HTTP in CloudEvents batches → worker → output published, with a gRPC
//! subscriber on the output topic) next to a bare JSON-lines child kept 64
//! messages deep (the limit); service CPU per message; and the gain of
//! `max_concurrency = 2` for a worker that burns ~1 ms of CPU per message.
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use workmanager_api::pb;

use crate::bench::{payload, rss_kib, Bare, Bench};

/// Where the echo worker's outputs go (their type).
const OUTPUT_TOPIC: &str = "tp.out";
const ECHO_WORKER: &str =
    "def Process(event):\n    return {'type': 'tp.out', 'data': event['data']}\n";
const NOOP_WORKER: &str = "def Process(event):\n    return None\n";
const BUSY_WORKER: &str = "import time\ndef Process(event):\n    t = time.perf_counter()\n    \
                           while time.perf_counter() - t < 0.001:\n        pass\n    return None\n";
const DEPTH: usize = 64;
/// Concurrent HTTP publishers in the bus comparison's second setting.
const PUBLISHERS: usize = 4;
const BATCH: usize = 200;
/// Rounds of the limit / through-the-service comparison.
const ROUNDS: usize = 3;
/// Rounds of the bus comparison: single rounds move by ±15 points on a
/// shared two-core machine, so its medians take five.
const BUS_ROUNDS: usize = 5;

fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_ticks(pid, 2).map(|t| t / 100.0)
}

/// CPU seconds of a process and of the children it has waited for: for the
/// broker, whose background work (Redis's append-only-file rewrites) runs
/// in forked children on the same two cores.
fn cpu_seconds_with_children(pid: u32) -> Option<f64> {
    cpu_ticks(pid, 4).map(|t| t / 100.0)
}

/// The sum of the first `fields` of utime, stime, cutime, cstime (fields 14
/// to 17 of /proc/PID/stat), in ticks; USER_HZ is 100 on every Linux this
/// runs on.
fn cpu_ticks(pid: u32, fields: usize) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that ends the command name.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace()
        .skip(11)
        .take(fields)
        .map(|f| f.parse::<f64>().ok())
        .sum()
}

/// The process listening on TCP `port` on this machine (the broker under
/// test), found through the socket's inode; `None` if it is not visible.
pub(crate) fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is "ADDR:PORT" in hex; state 0A is LISTEN.
            let listening = f.get(3) == Some(&"0A");
            let on_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if let (true, true, Some(inode)) = (listening, on_port, f.get(9)) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = proc_dir.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// The broker under test in a bus comparison.
pub(crate) struct Broker {
    /// `redis` or `nats`.
    pub(crate) kind: &'static str,
    pub(crate) url: String,
    /// Its process, for its CPU per message, when visible.
    pub(crate) pid: Option<u32>,
}

impl Broker {
    /// Deletes a finished run's topic (its stream) from the broker, so each
    /// run starts from the same state: left behind, the streams of earlier
    /// runs grow the data set that Redis's append-only-file rewrites copy and
    /// compress in the background, on the same two cores.
    async fn drop_topic(&self, topic: &str) -> Result<()> {
        match self.kind {
            "redis" => {
                let client = redis::Client::open(self.url.as_str())?;
                let mut c = client.get_multiplexed_async_connection().await?;
                let key = workmanager_backends::redis_bus::stream_key(topic);
                redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await?;
            }
            "nats" => {
                let client = async_nats::connect(self.url.as_str()).await?;
                let js = async_nats::jetstream::new(client);
                let name = workmanager_backends::nats_bus::safe_name("wm_", topic);
                // Absent (never published to) is fine.
                let _ = js.delete_stream(name).await;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The processes `pid` started and those they started in turn: a worker's
/// Python child (and whatever it runs), for its CPU per message.
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(child);
                todo.push(child);
            }
        }
    }
    found
}

/// CPU seconds of each of `pid`'s descendants so far.
fn descendants_cpu(pid: u32) -> Vec<(u32, f64)> {
    descendants(pid)
        .into_iter()
        .filter_map(|d| Some((d, cpu_seconds(d)?)))
        .collect()
}

/// The machine's idle and total CPU time so far (jiffies, all cores).
fn machine_idle() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    Some((cpu.get(3)? + cpu.get(4)?, cpu.iter().take(8).sum()))
}

/// Messages/s of a bare echo child with `DEPTH` messages in flight.
async fn bare_pipelined(python: &Path, n: usize) -> Result<f64> {
    let mut bare = Bare::start(python).await?;
    let line = {
        let mut l = serde_json::to_vec(
            &json!({"op": "process", "id": 1, "event": {"specversion": "1.0",
            "id": "x", "source": "s", "type": "t", "data": payload()}}),
        )?;
        l.push(b'\n');
        l
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(DEPTH));
    let mut stdin = bare.stdin;
    let writer_permits = permits.clone();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        for _ in 0..n {
            let p = writer_permits.acquire().await?;
            p.forget();
            stdin.write_all(&line).await?;
            stdin.flush().await?;
        }
        Ok::<_, anyhow::Error>(stdin)
    });
    let mut buf = String::new();
    for _ in 0..n {
        buf.clear();
        if bare.stdout.read_line(&mut buf).await? == 0 {
            bail!("the bare child exited");
        }
        permits.add_permits(1);
    }
    let elapsed = started.elapsed();
    drop(writer.await??);
    let _ = bare.child.kill().await;
    Ok(n as f64 / elapsed.as_secs_f64())
}

struct Through {
    rate: f64,
    cpu_us_per_message: f64,
    observed: usize,
    /// When the last publish was accepted, as a share of the whole run
    /// (near 1: the publisher, not the worker, set the pace).
    published_share: f64,
    /// The whole machine's idle CPU share during the run.
    idle: f64,
    /// The broker's CPU per message (NaN: no broker, or not visible).
    broker_us_per_message: f64,
    /// This benchmark process's own CPU per message (publishers, polling).
    bench_us_per_message: f64,
    /// The worker's Python child's CPU per message.
    child_us_per_message: f64,
    /// The whole machine's busy CPU per message (every process, the kernel).
    machine_us_per_message: f64,
    /// Service RSS (KiB) sampled every 500 ms during the run.
    rss: Vec<u64>,
}

/// How a throughput run feeds and watches its worker.
#[derive(Clone, Copy)]
struct Feed {
    max_concurrency: u32,
    /// A gRPC subscriber on the output topic counts what it receives.
    observe: bool,
    /// Concurrent HTTP publishers.
    publishers: usize,
    /// The broker's process, for its CPU per message.
    broker: Option<u32>,
}

/// One sequential publisher, no subscriber, `max_concurrency` 1.
const PLAIN: Feed = Feed {
    max_concurrency: 1,
    observe: false,
    publishers: 1,
    broker: None,
};

/// Publishes `n` events in batches to a fresh worker and waits until it has
/// processed them all.
async fn through_service(
    b: &mut Bench,
    n: usize,
    code: &str,
    topic: &str,
    feed: Feed,
) -> Result<Through> {
    let Feed {
        max_concurrency,
        observe,
        publishers,
        broker,
    } = feed;
    let req = pb::CreateWorkerRequest {
        code_source: Some(pb::CodeSource {
            source: Some(pb::code_source::Source::Content(code.as_bytes().to_vec())),
            ..Default::default()
        }),
        mime_type: "text/x-python".into(),
        topics: vec![topic.into()],
        start: true,
        max_concurrency,
        ..Default::default()
    };
    let id = b.client.create_worker(req).await?.into_inner().id;
    let observed = Arc::new(AtomicUsize::new(0));
    let watcher = if observe {
        let mut stream = b
            .client
            .subscribe(pb::SubscribeRequest {
                topic: OUTPUT_TOPIC.into(),
            })
            .await?
            .into_inner();
        let seen = observed.clone();
        Some(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }))
    } else {
        None
    };
    let bodies = bodies(n, publishers)?;
    // The worker's child is started with the worker; its start-up is not
    // part of the messages' cost.
    let mut children_before = descendants_cpu(b.pid);
    let wait_for_child = Instant::now() + Duration::from_secs(5);
    while children_before.is_empty() && Instant::now() < wait_for_child {
        tokio::time::sleep(Duration::from_millis(10)).await;
        children_before = descendants_cpu(b.pid);
    }
    let cpu_before = cpu_seconds(b.pid).unwrap_or(0.0);
    let idle_before = machine_idle();
    let broker_before = broker.and_then(cpu_seconds_with_children);
    let bench_before = cpu_seconds(std::process::id());
    let pid = b.pid;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        loop {
            tokio::select! {
                _ = &mut stop_rx => return samples,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            match rss_kib(pid) {
                Some(k) => samples.push(k),
                None => return samples,
            }
        }
    });
    let started = Instant::now();
    publish(b, topic, bodies).await?;
    let publishing = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let w = b
            .client
            .get_worker(pb::GetWorkerRequest { id: id.clone() })
            .await?
            .into_inner();
        if w.messages_processed + w.messages_failed >= n as u64 {
            break;
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "the worker processed {} of {n} messages in 300 s",
                w.messages_processed
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(b.pid).unwrap_or(0.0) - cpu_before;
    // CPU seconds before and after → µs per message (NaN: not visible).
    let per_message = |before: Option<f64>, after: Option<f64>| match (before, after) {
        (Some(a), Some(z)) => (z - a) * 1e6 / n as f64,
        _ => f64::NAN,
    };
    let broker_us_per_message =
        per_message(broker_before, broker.and_then(cpu_seconds_with_children));
    let bench_us_per_message = per_message(bench_before, cpu_seconds(std::process::id()));
    let child_cpu: f64 = descendants_cpu(b.pid)
        .into_iter()
        .map(|(pid, now)| {
            let before = children_before.iter().find(|(p, _)| *p == pid);
            now - before.map_or(0.0, |(_, cpu)| *cpu)
        })
        .sum();
    let child_us_per_message = child_cpu * 1e6 / n as f64;
    // The idle share, and the busy jiffies (USER_HZ 100) of all cores per
    // message.
    let (idle, machine_us_per_message) = match (idle_before, machine_idle()) {
        (Some((i0, t0)), Some((i1, t1))) if t1 > t0 => {
            let (idle, total) = ((i1 - i0) as f64, (t1 - t0) as f64);
            (idle / total, (total - idle) / 100.0 * 1e6 / n as f64)
        }
        _ => (f64::NAN, f64::NAN),
    };
    let _ = stop_tx.send(());
    let rss = sampler.await.unwrap_or_default();
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(w) = watcher {
        w.abort();
    }
    b.client
        .delete_worker(pb::DeleteWorkerRequest { id })
        .await?;
    Ok(Through {
        rate: n as f64 / elapsed.as_secs_f64(),
        published_share: publishing.as_secs_f64() / elapsed.as_secs_f64(),
        idle,
        broker_us_per_message,
        bench_us_per_message,
        child_us_per_message,
        machine_us_per_message,
        cpu_us_per_message: cpu * 1e6 / n as f64,
        observed: observed.load(Ordering::Relaxed),
        rss,
    })
}

/// The request bodies for `n` events of ~1 KB: CloudEvents batches of
/// `BATCH`, split among `publishers` concurrent clients. They are
/// serialized before a run's clock starts, so that the load generator's own
/// JSON work does not take the two cores from what is measured.
fn bodies(n: usize, publishers: usize) -> Result<Vec<Vec<bytes::Bytes>>> {
    let share = n.div_ceil(publishers.max(1)).max(1);
    (0..n)
        .step_by(share)
        .map(|from| {
            let to = (from + share).min(n);
            (from..to)
                .step_by(BATCH)
                .map(|first| {
                    let batch: Vec<Value> =
                        (first..(first + BATCH).min(to)).map(bench_event).collect();
                    Ok(bytes::Bytes::from(serde_json::to_vec(&batch)?))
                })
                .collect()
        })
        .collect()
}

/// Posts each publisher's `bodies` to `topic` over HTTP, the publishers
/// concurrently, each sending its next batch once the last one was
/// accepted; a 503 (backpressure) is retried.
async fn publish(b: &Bench, topic: &str, bodies: Vec<Vec<bytes::Bytes>>) -> Result<()> {
    let url = Arc::new(format!("http://127.0.0.1:{}/v1/topics/{topic}", b.http));
    let http = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for batches in bodies {
        let (url, http) = (url.clone(), http.clone());
        tasks.spawn(async move {
            for body in batches {
                loop {
                    let r = http
                        .post(url.as_str())
                        .header("content-type", "application/cloudevents-batch+json")
                        .body(body.clone())
                        .send()
                        .await?;
                    if r.status() == 503 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    if !r.status().is_success() {
                        bail!("publish failed: {}", r.text().await.unwrap_or_default());
                    }
                    break;
                }
            }
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

fn bench_event(i: usize) -> Value {
    json!({"specversion": "1.0", "id": i.to_string(), "source": "urn:bench", "type": "tp.in",
           "datacontenttype": "application/json", "data": payload()})
}

pub(crate) async fn run(
    messages: usize,
    cpu_messages: usize,
    soak_messages: usize,
    python: &Path,
    b: &mut Bench,
) -> Result<()> {
    if messages == 0 || cpu_messages == 0 {
        bail!("--messages and --cpu-messages must be at least 1");
    }
    // Three rounds, each measuring the limit and the service back to back:
    // this shared machine's speed drifts between runs, so a ratio is taken
    // within a round and the median round is the headline.
    let rss_before = rss_kib(b.pid);
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let bare = bare_pipelined(python, messages).await?;
        let echo = through_service(
            b,
            messages,
            ECHO_WORKER,
            "tp.in",
            Feed {
                observe: true,
                ..PLAIN
            },
        )
        .await?;
        let unobserved = through_service(b, messages, ECHO_WORKER, "tp.in", PLAIN).await?;
        rounds.push((bare, echo, unobserved));
    }
    let rss_after = rss_kib(b.pid);
    let one = through_service(b, cpu_messages, BUSY_WORKER, "cpu.one", PLAIN).await?;
    let two = through_service(
        b,
        cpu_messages,
        BUSY_WORKER,
        "cpu.two",
        Feed {
            max_concurrency: 2,
            ..PLAIN
        },
    )
    .await?;
    println!("\n### Throughput\n");
    println!("{messages} messages of ~1 KB per run; CloudEvents batches of {BATCH} over HTTP; bare child {DEPTH} deep; {ROUNDS} rounds.\n");
    println!(
        "| round | bare echo child, {DEPTH} in flight (the limit) | through one Python worker, gRPC subscriber on the output | same, no subscriber | service CPU / message, with / without subscriber |"
    );
    println!("|---|---|---|---|---|");
    for (i, (bare, echo, unobserved)) in rounds.iter().enumerate() {
        println!(
            "| {} | {bare:.0}/s | {:.0}/s ({:.0}%; {} seen) | {:.0}/s ({:.0}%) | {:.1} / {:.1} µs |",
            i + 1,
            echo.rate,
            echo.rate / bare * 100.0,
            echo.observed,
            unobserved.rate,
            unobserved.rate / bare * 100.0,
            echo.cpu_us_per_message,
            unobserved.cpu_us_per_message
        );
    }
    let median = |f: &dyn Fn(&(f64, Through, Through)) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "\nMedians: {:.0}% of the limit with the subscriber, {:.0}% without; service CPU per message \
         (the Python children excluded) {:.1} µs with the subscriber, {:.1} µs without.",
        median(&|r| r.1.rate / r.0 * 100.0),
        median(&|r| r.2.rate / r.0 * 100.0),
        median(&|r| r.1.cpu_us_per_message),
        median(&|r| r.2.cpu_us_per_message)
    );
    println!("\n| scenario | messages/s |\n|---|---|");
    println!(
        "| 1 ms-CPU worker, max_concurrency = 1 ({cpu_messages} messages) | {:.0} |",
        one.rate
    );
    println!(
        "| 1 ms-CPU worker, max_concurrency = 2 | {:.0} ({:.2}×) |",
        two.rate,
        two.rate / one.rate
    );
    if let (Some(a), Some(z)) = (rss_before, rss_after) {
        println!(
            "\nService RSS before / after the {ROUNDS} × 2 × {messages}-message runs: {:.1} MB / {:.1} MB.",
            a as f64 / 1024.0,
            z as f64 / 1024.0
        );
    }
    if soak_messages > 0 {
        let soak = through_service(b, soak_messages, ECHO_WORKER, "tp.in", PLAIN).await?;
        // Flatness is judged after the first fifth (allocator and buffers warm up).
        let steady = &soak.rss[soak.rss.len() / 5..];
        if let (Some(lo), Some(hi)) = (steady.iter().min(), steady.iter().max()) {
            let mb = |k: u64| k as f64 / 1024.0;
            println!(
                "\nSoak: {soak_messages} messages at {:.0}/s; service RSS over the last four fifths: \
                 {:.1}–{:.1} MB ({:+.1}% max over min; {} samples), CPU {:.1} µs/message.",
                soak.rate,
                mb(*lo),
                mb(*hi),
                (*hi as f64 / *lo as f64 - 1.0) * 100.0,
                steady.len(),
                soak.cpu_us_per_message
            );
        }
    }
    Ok(())
}

/// Messages/s and service CPU through one worker on the embedded bus and on
/// another bus, in alternating rounds (issue 7's target: ≥ 50%), fed by one
/// sequential HTTP publisher and by `PUBLISHERS` concurrent ones. With one
/// publisher a networked bus's publish round trip can set the pace instead
/// of the worker; the last column shows which side did.
pub(crate) async fn compare_buses(
    messages: usize,
    embedded: &mut Bench,
    other: &mut Bench,
    label: &str,
    broker: &Broker,
) -> Result<()> {
    println!("\n### Embedded bus vs {label}\n");
    println!(
        "{messages} messages of ~1 KB per run, no subscriber; {BUS_ROUNDS} rounds, each alternating the buses. \
         The target's scenario is the no-op worker (returns None); the echo worker also \
         publishes one output per message. Publishers: HTTP clients each sending CloudEvents \
         batches of {BATCH}, the next once the last was accepted. Last column: when the last \
         publish was accepted, as a share of the run (about 98% when the worker set the pace \
         and the publisher waited on backpressure; 100% when the publisher set it).\n"
    );
    println!("| round | worker | publishers | embedded bus | {label} | {label} / embedded | service CPU / message, embedded / {label} | last publish accepted at, embedded / {label} | machine idle, embedded / {label} | {label} server CPU / message | bench (publishers) CPU / message, embedded / {label} | worker's Python child CPU / message, embedded / {label} | whole machine's CPU / message, embedded / {label} |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let scenarios = [
        ("no-op", NOOP_WORKER, 1),
        ("no-op", NOOP_WORKER, PUBLISHERS),
        ("echo", ECHO_WORKER, 1),
        ("echo", ECHO_WORKER, PUBLISHERS),
    ];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    let mut publish_only: Vec<(usize, f64)> = Vec::new();
    let run = std::process::id();
    // Outputs an earlier bench left behind.
    broker.drop_topic(OUTPUT_TOPIC).await?;
    for round in 1..=BUS_ROUNDS {
        // The publishing side alone (no worker on the topic).
        for publishers in [1, PUBLISHERS] {
            let topic = format!("cmp.{run}.publish-only.{round}.{publishers}");
            let bodies = bodies(messages, publishers)?;
            let started = Instant::now();
            publish(other, &topic, bodies).await?;
            publish_only.push((
                publishers,
                messages as f64 / started.elapsed().as_secs_f64(),
            ));
            broker.drop_topic(&topic).await?;
        }
        for (i, (name, code, publishers)) in scenarios.into_iter().enumerate() {
            let feed = Feed {
                publishers,
                ..PLAIN
            };
            // A fresh topic per run: a networked bus's stream starts empty,
            // as on a new deployment, not at its length limit from the
            // runs before (trimming the oldest entry on every publish).
            let topic = format!("cmp.{run}.{round}.{i}");
            let e = through_service(embedded, messages, code, &topic, feed).await?;
            let other_feed = Feed {
                broker: broker.pid,
                ..feed
            };
            let r = through_service(other, messages, code, &topic, other_feed).await?;
            broker.drop_topic(&topic).await?;
            // The echo worker's outputs too: left to grow to the stream's
            // length limit (a GB of Redis data), they made every later
            // run pay for trimming, and for background rewrites of the
            // append-only file that copy and compress the whole data set.
            broker.drop_topic(OUTPUT_TOPIC).await?;
            ratios[i].push(r.rate / e.rate);
            println!(
                "| {round} | {name} | {publishers} | {:.0}/s | {:.0}/s | {:.0}% | {:.1} / {:.1} µs | {:.0}% / {:.0}% | {:.0}% / {:.0}% | {:.1} µs | {:.1} / {:.1} µs | {:.1} / {:.1} µs | {:.1} / {:.1} µs |",
                e.rate,
                r.rate,
                r.rate / e.rate * 100.0,
                e.cpu_us_per_message,
                r.cpu_us_per_message,
                e.published_share * 100.0,
                r.published_share * 100.0,
                e.idle * 100.0,
                r.idle * 100.0,
                r.broker_us_per_message,
                e.bench_us_per_message,
                r.bench_us_per_message,
                e.child_us_per_message,
                r.child_us_per_message,
                e.machine_us_per_message,
                r.machine_us_per_message
            );
        }
    }
    for publishers in [1, PUBLISHERS] {
        println!(
            "\nPublishing alone to {label} (no worker on the topic), {publishers} publisher(s): {}.",
            publish_only
                .iter()
                .filter(|(p, _)| *p == publishers)
                .map(|(_, r)| format!("{r:.0}/s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for ((name, _, publishers), mut r) in scenarios.into_iter().zip(ratios) {
        r.sort_by(f64::total_cmp);
        println!(
            "\nMedian {label} / embedded, {name} worker, {publishers} publisher(s): {:.0}%.",
            r[r.len() / 2] * 100.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parent's pid of `pid` (field 4 of /proc/PID/stat).
    fn parent_of(pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    #[test]
    fn a_process_started_here_and_the_one_it_started_are_both_counted() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let grandchild = |found: &[u32]| {
            found
                .iter()
                .copied()
                .find(|p| parent_of(*p) == Some(child.id()))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut found = descendants(std::process::id());
        while grandchild(&found).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            found = descendants(std::process::id());
        }
        let sleeper = grandchild(&found);
        let cpu = descendants_cpu(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        if let Some(pid) = sleeper {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        assert!(found.contains(&child.id()), "the child itself: {found:?}");
        let sleeper = sleeper.expect("the child's own child is found too");
        assert!(cpu.iter().any(|(p, _)| *p == sleeper), "{cpu:?}");
    }
}
