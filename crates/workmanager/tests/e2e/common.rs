//! Test harness: starts the real `workmanager` binary on OS-chosen ports
//! with its own data directory, and gives gRPC and HTTP clients for it.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic::transport::Channel;
use workmanager_api::pb;
use workmanager_api::pb::work_manager_client::WorkManagerClient;

pub const BIN: &str = env!("CARGO_BIN_EXE_workmanager");

pub struct Service {
    child: Child,
    pub http: u16,
    pub grpc: u16,
    pub log: PathBuf,
}

impl Service {
    /// Starts the service on `dir` (state file and logs live there) with
    /// extra `--set KEY=VALUE` settings, and waits until it listens.
    pub fn start(dir: &Path, settings: &[&str]) -> Service {
        Service::start_with(dir, settings, false)
    }

    /// As `start`; with `closed_output`, the service's stdout and stderr are
    /// pipes whose reading ends are closed at once (a dead log sink).
    pub fn start_with(dir: &Path, settings: &[&str], closed_output: bool) -> Service {
        Service::start_full(dir, settings, &[], closed_output)
    }

    /// As `start`, with extra environment variables for the service.
    pub fn start_env(dir: &Path, settings: &[&str], env: &[(&str, &str)]) -> Service {
        Service::start_full(dir, settings, env, false)
    }

    fn start_full(
        dir: &Path,
        settings: &[&str],
        env: &[(&str, &str)],
        closed_output: bool,
    ) -> Service {
        let port_file = dir.join(format!("ports-{}.json", uuid::Uuid::new_v4()));
        let log = dir.join(format!("service-{}.log", uuid::Uuid::new_v4()));
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args([
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--log-level",
                "Information",
            ])
            .arg("--state-path")
            .arg(dir.join("state.redb"))
            .arg("--port-file")
            .arg(&port_file)
            .current_dir(dir)
            .env_remove("HOSTNAME")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(Stdio::inherit());
        if closed_output {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        for s in settings {
            cmd.args(["--set", s]);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("start workmanager");
        // Dropping the reading ends closes them: every later write fails.
        drop(child.stdout.take());
        drop(child.stderr.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let v: Value = serde_json::from_str(&text).expect("port file JSON");
                return Service {
                    child,
                    http: v["http"].as_u64().unwrap() as u16,
                    grpc: v["grpc"].as_u64().unwrap() as u16,
                    log,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("workmanager exited at start-up: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "workmanager did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts and waits for readiness (recovery finished).
    pub async fn start_ready(dir: &Path, settings: &[&str]) -> Service {
        let s = Service::start(dir, settings);
        s.wait_ready().await;
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    pub fn server(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// GET on the HTTP port; the body as text.
    pub async fn get_text(&self, path: &str) -> String {
        reqwest::get(self.url(path))
            .await
            .expect("GET")
            .text()
            .await
            .expect("a text body")
    }

    /// GET on the HTTP port; the body as JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        serde_json::from_str(&self.get_text(path).await).expect("a JSON body")
    }

    pub async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(self.url("/health/ready")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "service not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn grpc(&self) -> WorkManagerClient<Channel> {
        let channel = Channel::from_shared(self.server())
            .unwrap()
            .connect()
            .await
            .expect("connect gRPC");
        WorkManagerClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "service did not stop within 30 s of SIGTERM: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The logs once a line satisfies `pred` (logging is asynchronous: a
    /// line may land a moment after the response), or after 10 s as they are.
    pub async fn logs_with(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if logs.lines().any(&pred) || Instant::now() >= deadline {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn content(code: &str) -> Option<pb::CodeSource> {
    Some(pb::CodeSource {
        source: Some(pb::code_source::Source::Content(code.as_bytes().to_vec())),
        ..Default::default()
    })
}

pub fn create_req(code: &str, start: bool) -> pb::CreateWorkerRequest {
    pb::CreateWorkerRequest {
        code_source: content(code),
        mime_type: "text/x-python".into(),
        topics: vec!["in".into()],
        start,
        ..Default::default()
    }
}

pub async fn create(c: &mut WorkManagerClient<Channel>, code: &str, start: bool) -> String {
    c.create_worker(create_req(code, start))
        .await
        .expect("create worker")
        .into_inner()
        .id
}

pub fn event(data: Value) -> pb::io::cloudevents::v1::CloudEvent {
    let e = workmanager_core::CloudEvent::from_input(serde_json::json!({
        "specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": "urn:test",
        "type": "test.in", "datacontenttype": "application/json", "data": data,
    }));
    workmanager_api::convert::event_to_proto(&e)
}

/// Invokes with `data` in a test event; returns the output as JSON (Null when none).
pub async fn invoke(
    c: &mut WorkManagerClient<Channel>,
    id: &str,
    data: Value,
) -> Result<Value, tonic::Status> {
    let r = c
        .invoke_worker(pb::InvokeWorkerRequest {
            id: id.into(),
            event: Some(event(data)),
            publish: false,
        })
        .await?
        .into_inner();
    Ok(output(r))
}

/// Invokes with a whole CloudEvent given as JSON.
pub async fn invoke_event(
    c: &mut WorkManagerClient<Channel>,
    id: &str,
    event: Value,
) -> Result<Value, tonic::Status> {
    let e =
        workmanager_api::convert::event_to_proto(&workmanager_core::CloudEvent::from_input(event));
    let r = c
        .invoke_worker(pb::InvokeWorkerRequest {
            id: id.into(),
            event: Some(e),
            publish: false,
        })
        .await?
        .into_inner();
    Ok(output(r))
}

fn output(r: pb::InvokeWorkerResponse) -> Value {
    match r.event {
        Some(e) => Value::Object(workmanager_api::convert::event_from_proto(e).unwrap().0),
        None => Value::Null,
    }
}

pub async fn status(c: &mut WorkManagerClient<Channel>, id: &str) -> pb::WorkerStatus {
    let w = c
        .get_worker(pb::GetWorkerRequest { id: id.into() })
        .await
        .expect("get worker")
        .into_inner();
    pb::WorkerStatus::try_from(w.status).unwrap()
}

/// A worker that echoes data and reports which code version ran.
pub fn versioned(version: &str) -> String {
    format!("def Process(event):\n    return {{'type': 'out', 'data': {{'version': '{version}', 'in': event['data']}}}}\n")
}

/// The test's own client of a Redis Streams bus (consumer name `consumer`),
/// to publish beside the service or to count what it publishes.
pub async fn test_redis_bus(url: &str, consumer: &str) -> workmanager_backends::RedisBus {
    workmanager_backends::RedisBus::connect(
        url,
        workmanager_backends::RedisBusSettings {
            stream_max_len: 1_000_000,
            visibility_timeout: Duration::from_secs(3),
            dedup_window: Duration::from_secs(600),
            capacity: 4096,
            consumer: consumer.into(),
            max_deliver: 10,
        },
    )
    .await
    .expect("connect the test's Redis bus")
}
