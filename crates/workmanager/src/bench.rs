//! `workmanager bench`: starts the real service on OS-chosen ports and
//! measures, in one run and the same CPU placement (nothing pinned):
//! InvokeWorker round trips of a no-op Python worker over gRPC next to a bare
//! `python3 -E -s -u` JSON-lines echo child driven directly (the limit),
//! create-to-first-result cold start, and idle memory; and the cost of the
//! Python sandbox, against a second service with `Python:Sandbox=off`.
//! Prints Markdown.
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::transport::Channel;
use workmanager_api::convert::event_to_proto;
use workmanager_api::pb;
use workmanager_api::pb::work_manager_client::WorkManagerClient;
use workmanager_core::CloudEvent;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Round trips measured per scenario.
    #[arg(long, default_value_t = 5000)]
    iterations: usize,
    /// Cold starts measured.
    #[arg(long, default_value_t = 30)]
    cold_starts: usize,
    /// Idle workers for the service-memory measurement.
    #[arg(long, default_value_t = 100)]
    idle_workers: usize,
    /// Python interpreter.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Messages pushed through one worker in the throughput scenarios.
    #[arg(long, default_value_t = 50_000)]
    messages: usize,
    /// Messages for the max_concurrency scaling scenario (1 ms CPU each).
    #[arg(long, default_value_t = 3_000)]
    cpu_messages: usize,
    /// Messages of the RSS soak (0: skip).
    #[arg(long, default_value_t = 0)]
    soak_messages: usize,
    /// A running Redis to compare the Redis Streams bus with the embedded
    /// one (e.g. redis://127.0.0.1:6390); its data is written to.
    #[arg(long)]
    redis_url: Option<String>,
    /// A running NATS server with JetStream (e.g. nats://127.0.0.1:4233) to
    /// compare the JetStream bus with the embedded one.
    #[arg(long)]
    nats_url: Option<String>,
    /// Only the comparison of the buses given by --redis-url / --nats-url.
    #[arg(long)]
    buses_only: bool,
}

const ECHO: &str = "import sys, json\nw = sys.stdout.buffer\nfor line in sys.stdin.buffer:\n    \
                    w.write(json.dumps(json.loads(line)).encode() + b'\\n')\n    w.flush()\n";
const NOOP: &str = "def Process(event):\n    return None\n";
const ECHO_WORKER: &str =
    "def Process(event):\n    return {'type': 'bench.out', 'data': event['data']}\n";

/// ~1 KB of event data.
pub(crate) fn payload() -> serde_json::Value {
    serde_json::json!({"symbol": "EURUSD", "payload": "x".repeat(900)})
}

struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    let mean = v.iter().sum::<Duration>() / v.len().max(1) as u32;
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        mean,
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn ms_signed(seconds: f64) -> String {
    format!("{:+.1} ms", seconds * 1e3)
}

pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// A bare echo child driven directly over its pipes.
pub(crate) struct Bare {
    pub(crate) child: tokio::process::Child,
    pub(crate) stdin: tokio::process::ChildStdin,
    pub(crate) stdout: BufReader<tokio::process::ChildStdout>,
    line: String,
}

impl Bare {
    pub(crate) async fn start(python: &Path) -> Result<Self> {
        let mut child = tokio::process::Command::new(python)
            .args(["-E", "-s", "-u", "-c", ECHO])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the bare Python child")?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
        Ok(Self {
            child,
            stdin,
            stdout,
            line: String::new(),
        })
    }

    async fn round_trip(&mut self, msg: &[u8]) -> Result<()> {
        self.stdin.write_all(msg).await?;
        self.stdin.flush().await?;
        self.line.clear();
        if self.stdout.read_line(&mut self.line).await? == 0 {
            bail!("the bare child exited");
        }
        Ok(())
    }
}

/// One service under test, with its own state directory.
pub(crate) struct Bench {
    child: tokio::process::Child,
    pub(crate) pid: u32,
    pub(crate) http: u16,
    pub(crate) client: WorkManagerClient<Channel>,
    _dir: tempfile::TempDir,
}

impl Bench {
    async fn start(python: &Path, sandbox: &str) -> Result<Bench> {
        Self::start_with(python, sandbox, &[]).await
    }

    pub(crate) async fn start_with(
        python: &Path,
        sandbox: &str,
        extra: &[String],
    ) -> Result<Bench> {
        let dir = tempfile::tempdir()?;
        let port_file = dir.path().join("ports.json");
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .args([
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--log-level",
                "Warning",
            ])
            .arg("--state-path")
            .arg(dir.path().join("state.redb"))
            .arg("--port-file")
            .arg(&port_file)
            .args(["--set", "Recovery:OnStart=false"])
            .args(["--set", &format!("Python:Executable={}", python.display())])
            .args(["--set", &format!("Python:Sandbox={sandbox}")])
            .args(extra.iter().flat_map(|s| ["--set", s.as_str()]))
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the service")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the service exited at once"))?;
        let (grpc, http) = wait_port(&port_file).await?;
        let client = connect(grpc).await?;
        Ok(Bench {
            child,
            pid,
            http,
            client,
            _dir: dir,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

pub async fn run(args: BenchArgs) -> Result<()> {
    if args.iterations == 0 || args.cold_starts == 0 {
        bail!("--iterations and --cold-starts must be at least 1");
    }
    let interpreter = workmanager_engine_python::resolve_interpreter(&args.python)
        .await
        .map_err(|e| anyhow!(e))?;
    let (python, version) = (interpreter.executable, interpreter.version);
    let mut standard = Bench::start(&python, "standard").await?;
    let mut off = Bench::start(&python, "off").await?;
    let mut result = if args.buses_only {
        Ok(())
    } else {
        measure(&args, &python, &version, &mut standard, &mut off.client).await
    };
    if result.is_ok() && !args.buses_only {
        result = crate::bench_throughput::run(
            args.messages,
            args.cpu_messages,
            args.soak_messages,
            &python,
            &mut standard,
        )
        .await;
    }
    let others = [
        ("Redis Streams", "redis", "Redis", &args.redis_url),
        ("NATS JetStream", "nats", "Nats", &args.nats_url),
    ];
    for (label, kind, section, url) in others {
        let (Ok(()), Some(url)) = (&result, url) else {
            continue;
        };
        let extra = [
            format!("PubSub:Type={kind}"),
            format!("{section}:Url={url}"),
        ];
        let mut other = Bench::start_with(&python, "standard", &extra).await?;
        let broker = crate::bench_throughput::Broker {
            kind,
            url: url.clone(),
            pid: url::Url::parse(url)
                .ok()
                .and_then(|u| u.port())
                .and_then(crate::bench_throughput::listener_pid),
        };
        result = crate::bench_throughput::compare_buses(
            args.messages,
            &mut standard,
            &mut other,
            label,
            &broker,
        )
        .await;
        other.stop().await;
    }
    if let (Ok(()), Some(url), false) = (&result, &args.redis_url, args.buses_only) {
        result = forwarding(args.iterations, &python, url).await;
    }
    standard.stop().await;
    off.stop().await;
    result
}

/// Two instances on one Redis: the same worker-scoped RPCs sent to the
/// owner (local) and to the other instance (forwarded once), interleaved in
/// blocks. The difference of the medians is what forwarding adds.
async fn forwarding(iterations: usize, python: &Path, url: &str) -> Result<()> {
    let shared = |name: &str| {
        vec![
            "StateStore:Type=redis".to_string(),
            "PubSub:Type=redis".to_string(),
            format!("Redis:Url={url}"),
            format!("HOSTNAME=bench-{name}-{}", std::process::id()),
        ]
    };
    let mut owner = Bench::start_with(python, "standard", &shared("owner")).await?;
    let mut peer = Bench::start_with(python, "standard", &shared("peer")).await?;
    let id = create(&mut owner.client, NOOP, true).await?;
    let event = CloudEvent::from_input(serde_json::json!({
        "specversion": "1.0", "id": "bench-fwd", "source": "urn:bench", "type": "bench.in",
        "datacontenttype": "application/json", "data": payload(),
    }));
    let invoke_req = pb::InvokeWorkerRequest {
        id: id.clone(),
        event: Some(event_to_proto(&event)),
        publish: false,
    };
    let get_req = pb::GetWorkerRequest { id: id.clone() };
    for _ in 0..200 {
        invoke(&mut owner.client, &invoke_req).await?;
        invoke(&mut peer.client, &invoke_req).await?;
        peer.client.get_worker(get_req.clone()).await?;
    }
    let mut t: [Vec<Duration>; 4] = Default::default();
    let block = 100;
    while t[0].len() < iterations {
        for (i, via_peer) in [(0, false), (1, true)] {
            let c = if via_peer {
                &mut peer.client
            } else {
                &mut owner.client
            };
            for _ in 0..block {
                let s = Instant::now();
                c.get_worker(get_req.clone()).await?;
                t[i].push(s.elapsed());
            }
            for _ in 0..block {
                let s = Instant::now();
                invoke(c, &invoke_req).await?;
                t[i + 2].push(s.elapsed());
            }
        }
    }
    let [get_local, get_fwd, inv_local, inv_fwd] = t.map(stats);
    println!("\n### Forwarded worker-scoped RPCs (two instances on one Redis)\n");
    println!("{iterations} calls per row, interleaved in blocks of {block}.\n");
    println!("| RPC | at the owner p50 | via the other instance p50 | added p50 | p99 owner / forwarded |");
    println!("|---|---|---|---|---|");
    for (name, local, fwd) in [
        ("GetWorker", &get_local, &get_fwd),
        ("InvokeWorker (no-op)", &inv_local, &inv_fwd),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} / {} |",
            us(local.p50),
            us(fwd.p50),
            ms_signed(fwd.p50.as_secs_f64() - local.p50.as_secs_f64()),
            us(local.p99),
            us(fwd.p99),
        );
    }
    owner.stop().await;
    peer.stop().await;
    Ok(())
}

async fn wait_port(path: &Path) -> Result<(u16, u16)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            if let (Some(g), Some(h)) = (v["grpc"].as_u64(), v["http"].as_u64()) {
                return Ok((g as u16, h as u16));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the service did not start within 20 s")
}

async fn connect(port: u16) -> Result<WorkManagerClient<Channel>> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    Ok(WorkManagerClient::new(channel))
}

pub(crate) async fn create(
    c: &mut WorkManagerClient<Channel>,
    code: &str,
    start: bool,
) -> Result<String> {
    let req = pb::CreateWorkerRequest {
        code_source: Some(pb::CodeSource {
            source: Some(pb::code_source::Source::Content(code.as_bytes().to_vec())),
            ..Default::default()
        }),
        mime_type: "text/x-python".into(),
        topics: vec!["bench.in".into()],
        start,
        ..Default::default()
    };
    Ok(c.create_worker(req).await?.into_inner().id)
}

async fn invoke(c: &mut WorkManagerClient<Channel>, req: &pb::InvokeWorkerRequest) -> Result<()> {
    c.invoke_worker(req.clone()).await?;
    Ok(())
}

async fn measure(
    args: &BenchArgs,
    python: &Path,
    version: &str,
    standard: &mut Bench,
    off: &mut WorkManagerClient<Channel>,
) -> Result<()> {
    let service_pid = standard.pid;
    let c = &mut standard.client;
    let event = CloudEvent::from_input(serde_json::json!({
        "specversion": "1.0", "id": "bench-1", "source": "urn:bench", "type": "bench.in",
        "datacontenttype": "application/json", "data": payload(),
    }));
    let mut bare_line =
        serde_json::to_vec(&serde_json::json!({"op": "process", "id": 1, "event": event.0}))?;
    bare_line.push(b'\n');

    // Round trips, interleaved in blocks so drift hits every scenario alike.
    let noop = create(c, NOOP, true).await?;
    let echo = create(c, ECHO_WORKER, true).await?;
    let req = |id: &str| pb::InvokeWorkerRequest {
        id: id.into(),
        event: Some(event_to_proto(&event)),
        publish: false,
    };
    let (noop_req, echo_req) = (req(&noop), req(&echo));
    let off_noop = create(off, NOOP, true).await?;
    let off_req = req(&off_noop);
    let mut bare = Bare::start(python).await?;
    for _ in 0..200 {
        bare.round_trip(&bare_line).await?;
        invoke(c, &noop_req).await?;
        invoke(c, &echo_req).await?;
        invoke(off, &off_req).await?;
    }
    let (mut t_bare, mut t_noop, mut t_echo) = (Vec::new(), Vec::new(), Vec::new());
    let mut t_noop_off = Vec::new();
    let block = 100;
    while t_bare.len() < args.iterations {
        for _ in 0..block {
            let t = Instant::now();
            bare.round_trip(&bare_line).await?;
            t_bare.push(t.elapsed());
        }
        for _ in 0..block {
            let t = Instant::now();
            invoke(c, &noop_req).await?;
            t_noop.push(t.elapsed());
        }
        for _ in 0..block {
            let t = Instant::now();
            invoke(c, &echo_req).await?;
            t_echo.push(t.elapsed());
        }
        for _ in 0..block {
            let t = Instant::now();
            invoke(off, &off_req).await?;
            t_noop_off.push(t.elapsed());
        }
    }
    let bare_rss = bare.child.id().and_then(rss_kib);
    drop(bare);

    // Idle child memory: the no-op worker's child, after its traffic.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let worker_children = children(service_pid);
    let worker_rss: Vec<u64> = worker_children.iter().filter_map(|p| rss_kib(*p)).collect();
    let idle_bare = Bare::start(python).await?;
    let mut idle_bare = idle_bare;
    idle_bare.round_trip(&bare_line).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_bare_rss = idle_bare.child.id().and_then(rss_kib);
    drop(idle_bare);
    for id in [&noop, &echo] {
        c.delete_worker(pb::DeleteWorkerRequest { id: id.to_string() })
            .await?;
    }

    // Cold start: create (content, start=true) → first result; bare: spawn → first answer.
    let mut t_cold = Vec::new();
    let mut t_cold_off = Vec::new();
    let mut t_bare_cold = Vec::new();
    for _ in 0..args.cold_starts {
        let t = Instant::now();
        let mut b = Bare::start(python).await?;
        b.round_trip(&bare_line).await?;
        t_bare_cold.push(t.elapsed());
        drop(b);
        let t = Instant::now();
        let id = create(c, ECHO_WORKER, true).await?;
        invoke(c, &req(&id)).await?;
        t_cold.push(t.elapsed());
        c.delete_worker(pb::DeleteWorkerRequest { id }).await?;
        let t = Instant::now();
        let id = create(off, ECHO_WORKER, true).await?;
        invoke(off, &req(&id)).await?;
        t_cold_off.push(t.elapsed());
        off.delete_worker(pb::DeleteWorkerRequest { id }).await?;
    }

    // Service memory with 0 and N idle workers (children not counted).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let svc_rss_0 = rss_kib(service_pid);
    for _ in 0..args.idle_workers {
        create(c, NOOP, true).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let svc_rss_n = rss_kib(service_pid);

    let (b, n, e) = (stats(t_bare), stats(t_noop), stats(t_echo));
    let (cold, bare_cold) = (stats(t_cold), stats(t_bare_cold));
    let (n_off, cold_off) = (stats(t_noop_off), stats(t_cold_off));
    let kib = |v: Option<u64>| {
        v.map(|k| format!("{:.1} MB", k as f64 / 1024.0))
            .unwrap_or_else(|| "n/a".into())
    };
    let child_rss = worker_rss.iter().copied().min();
    println!("### WorkManager benchmark\n");
    println!(
        "Python {version}, {} iterations per round-trip scenario (interleaved in blocks of {block}), \
         {} cold starts, {} idle workers; 1 KB event data; nothing pinned.\n",
        args.iterations, args.cold_starts, args.idle_workers
    );
    println!("| scenario | p50 | p99 | mean |\n|---|---|---|---|");
    println!(
        "| bare `python3 -E -s -u` JSON-lines echo pipe (the limit) | {} | {} | {} |",
        us(b.p50),
        us(b.p99),
        us(b.mean)
    );
    println!(
        "| InvokeWorker (gRPC), no-op worker | {} | {} | {} |",
        us(n.p50),
        us(n.p99),
        us(n.mean)
    );
    println!(
        "| InvokeWorker (gRPC), echo worker (1 KB out) | {} | {} | {} |",
        us(e.p50),
        us(e.p99),
        us(e.mean)
    );
    println!(
        "| InvokeWorker (gRPC), no-op worker, `Python:Sandbox=off` | {} | {} | {} |",
        us(n_off.p50),
        us(n_off.p99),
        us(n_off.mean)
    );
    println!(
        "| bare child spawn → first answer | {} | {} | {} |",
        ms(bare_cold.p50),
        ms(bare_cold.p99),
        ms(bare_cold.mean)
    );
    println!(
        "| CreateWorker (content) → first InvokeWorker result | {} | {} | {} |",
        ms(cold.p50),
        ms(cold.p99),
        ms(cold.mean)
    );
    println!(
        "| CreateWorker → first result, `Python:Sandbox=off` | {} | {} | {} |",
        ms(cold_off.p50),
        ms(cold_off.p99),
        ms(cold_off.mean)
    );
    println!();
    println!(
        "Sandbox (standard vs off, same run): start {} at p50; round trip {:+.1}% at p50.\n",
        ms_signed(cold.p50.as_secs_f64() - cold_off.p50.as_secs_f64()),
        (n.p50.as_secs_f64() / n_off.p50.as_secs_f64() - 1.0) * 100.0
    );
    println!(
        "No-op InvokeWorker p50 − bare pipe p50 = {}; ratio {:.2}×.\n",
        us(n.p50.saturating_sub(b.p50)),
        n.p50.as_secs_f64() / b.p50.as_secs_f64()
    );
    println!("| memory (RSS) | value |\n|---|---|");
    println!("| idle bare child | {} |", kib(idle_bare_rss.or(bare_rss)));
    println!(
        "| idle worker child (smallest of {}) | {} |",
        worker_rss.len(),
        kib(child_rss)
    );
    if let (Some(w), Some(bc)) = (child_rss, idle_bare_rss) {
        println!(
            "| worker child / bare child | {:.2}× |",
            w as f64 / bc as f64
        );
    }
    println!("| service, 0 workers | {} |", kib(svc_rss_0));
    println!(
        "| service, {} idle workers (children not counted) | {} |",
        args.idle_workers,
        kib(svc_rss_n)
    );
    Ok(())
}
