//! The client CLI: every subcommand but `serve` and `bench` talks to a
//! running service over gRPC (`--server`). Human tables by default, `-o json`
//! (proto3 JSON) for scripts; errors name the gRPC code and the server's
//! message, and the exit code is 1.
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use tonic::transport::Channel;
use workmanager_api::convert::{event_from_proto, event_to_proto};
use workmanager_api::error::code_name;
use workmanager_api::pb;
use workmanager_api::pb::work_manager_client::WorkManagerClient;
use workmanager_core::error::error_chain;
use workmanager_core::CloudEvent;

/// Largest message the CLI sends or accepts (code uploads).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum WorkersCmd {
    /// Create a worker from a file (or URL) of code.
    Create(CreateArgs),
    /// List workers, optionally only those with all the given tags.
    List {
        /// key=value; repeat for AND.
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
    },
    /// Show one worker.
    Get { id: String },
    /// Start (subscribe and run); retries a FAILED worker.
    Start { id: String },
    /// Stop.
    Stop { id: String },
    /// Delete, from any status.
    Delete { id: String },
    /// Code load history, oldest first.
    History { id: String },
    /// Hot-reload a worker's code.
    Load(LoadArgs),
    /// Run one event through a worker and print its output.
    Invoke {
        id: String,
        /// The event's data, as JSON.
        #[arg(long)]
        data: String,
        /// The event's type.
        #[arg(long = "type", default_value = "com.virtufin.cli.invoke")]
        event_type: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Engine MIME type, e.g. text/x-python.
    #[arg(long, default_value = "text/x-python")]
    mime: String,
    /// Topic to listen on; repeat for several.
    #[arg(long = "topic", required = true)]
    topics: Vec<String>,
    #[command(flatten)]
    code: CodeArgs,
    /// Immutable config, stamped on every input event; repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Tag; repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Start the worker right away.
    #[arg(long)]
    start: bool,
    /// Parallel executions (Python: that many child processes).
    #[arg(long, default_value_t = 0)]
    max_concurrency: u32,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    id: String,
    #[command(flatten)]
    code: CodeArgs,
}

#[derive(Debug, Args)]
pub struct CodeArgs {
    /// File with the worker's code.
    #[arg(long, required_unless_present = "url", conflicts_with = "url")]
    file: Option<PathBuf>,
    /// URL of the worker's code (the service fetches it).
    #[arg(long)]
    url: Option<String>,
    /// Expected SHA-256 of the URL's content (hex or sha256-<base64>).
    #[arg(long, requires = "url")]
    sha256: Option<String>,
    /// Name of a credential configured on the service
    /// (CodeSourceCredentials:<name>) to fetch the URL with.
    #[arg(long, requires = "url")]
    credential: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TagsCmd {
    /// All tags of a worker, or one.
    Get { id: String, key: Option<String> },
    /// Merge tags into a worker's tags.
    Set {
        id: String,
        #[arg(value_name = "KEY=VALUE", required = true)]
        tags: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCmd {
    #[command(subcommand)]
    Workers(WorkersCmd),
    #[command(subcommand)]
    Tags(TagsCmd),
    /// Publish an event on a topic.
    Publish {
        topic: String,
        #[arg(long)]
        data: String,
        #[arg(long = "type", default_value = "com.virtufin.cli.publish")]
        event_type: String,
    },
    /// Print a topic's events as JSON lines until Ctrl-C.
    Subscribe { topic: String },
    /// Recover persisted workers that are not hosted yet.
    Recover,
    /// List the engines by MIME type.
    Engines,
}

/// How the CLI reaches the service: address, TLS and credentials.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// The service's gRPC address, for client commands (https:// for TLS).
    #[arg(
        long,
        global = true,
        env = "WORKMANAGER_SERVER",
        default_value = "http://127.0.0.1:25002"
    )]
    pub server: String,
    /// CA certificate (PEM) that signed the service's certificate.
    #[arg(long, global = true, env = "WORKMANAGER_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for a service that requires mTLS.
    #[arg(long, global = true, env = "WORKMANAGER_CERT", requires = "client_key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM). (Its id differs from its
    /// flag: `tags get ID KEY` has a positional `key`.)
    #[arg(
        long = "key",
        id = "client_key",
        global = true,
        env = "WORKMANAGER_KEY",
        requires = "cert"
    )]
    pub key: Option<PathBuf>,
    /// Bearer token (JWT); prefer the environment variable to the flag.
    #[arg(long, global = true, env = "WORKMANAGER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// API key; prefer the environment variable to the flag.
    #[arg(
        long,
        global = true,
        env = "WORKMANAGER_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
}

/// Adds the caller's credentials to every call.
#[derive(Clone)]
pub struct Credentials(
    Vec<(
        &'static str,
        tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    )>,
);

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        for (k, v) in &self.0 {
            req.metadata_mut().insert(*k, v.clone());
        }
        Ok(req)
    }
}

pub type Client =
    WorkManagerClient<tonic::service::interceptor::InterceptedService<Channel, Credentials>>;

pub async fn run(conn: &ConnArgs, output: Output, cmd: ClientCmd) -> Result<()> {
    let mut c = connect(conn).await?;
    match cmd {
        ClientCmd::Workers(w) => workers(&mut c, output, w).await,
        ClientCmd::Tags(TagsCmd::Get { id, key: Some(key) }) => {
            let r = call(c.get_tag(pb::GetTagRequest { id, key })).await?;
            print(output, &r, || r.value.clone())
        }
        ClientCmd::Tags(TagsCmd::Get { id, key: None }) => {
            let r = call(c.get_tags(pb::GetTagsRequest { id })).await?;
            print(output, &r, || {
                r.tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        ClientCmd::Tags(TagsCmd::Set { id, tags }) => {
            let tags = pairs(&tags, "tag")?;
            let n = tags.len();
            let r = call(c.set_tags(pb::SetTagsRequest {
                id: id.clone(),
                tags,
            }))
            .await?;
            print(output, &r, || format!("set {n} tag(s) on {id}"))
        }
        ClientCmd::Publish {
            topic,
            data,
            event_type,
        } => {
            let event = cli_event(&data, &event_type)?;
            let r = call(c.publish(pb::PublishRequest {
                topic: topic.clone(),
                event: Some(event),
            }))
            .await?;
            print(output, &r, || format!("published to {topic}"))
        }
        ClientCmd::Subscribe { topic } => {
            let mut stream = call(c.subscribe(pb::SubscribeRequest { topic })).await?;
            while let Some(msg) = stream.message().await.map_err(status_error)? {
                if let Some(e) = msg.event {
                    let e = event_from_proto(e).map_err(status_error)?;
                    // A closed stdout (e.g. `| head -1`) ends the subscription quietly.
                    if emit(&serde_json::Value::Object(e.0).to_string()).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        }
        ClientCmd::Recover => {
            let r = call(c.recover_workers(pb::RecoverWorkersRequest {})).await?;
            print(output, &r, || {
                format!("recovered {} worker(s)", r.recovered_count)
            })
        }
        ClientCmd::Engines => {
            let r = call(c.list_engines(pb::ListEnginesRequest {})).await?;
            print(output, &r, || {
                table(
                    &["MIME TYPE", "LANGUAGE", "ISOLATION"],
                    r.engines.iter().map(|e| {
                        vec![e.mime_type.clone(), e.language.clone(), e.isolation.clone()]
                    }),
                )
            })
        }
    }
}

async fn workers(c: &mut Client, output: Output, cmd: WorkersCmd) -> Result<()> {
    match cmd {
        WorkersCmd::Create(a) => {
            let req = pb::CreateWorkerRequest {
                code_source: Some(code_source(&a.code)?),
                mime_type: a.mime,
                topics: a.topics,
                config: pairs(&a.config, "config")?,
                tags: pairs(&a.tags, "tag")?,
                start: a.start,
                max_concurrency: a.max_concurrency,
            };
            let r = call(c.create_worker(req)).await?;
            print(output, &r, || r.id.clone())
        }
        WorkersCmd::List { tags } => {
            let filters = pairs(&tags, "tag")?
                .into_iter()
                .map(|(key, value)| pb::TagFilter { key, value })
                .collect();
            let r = call(c.list_workers(pb::ListWorkersRequest { filters })).await?;
            print(output, &r, || {
                table(
                    &[
                        "ID",
                        "STATUS",
                        "MIME TYPE",
                        "TOPICS",
                        "PROCESSED",
                        "FAILED",
                        "TAGS",
                    ],
                    r.workers.iter().map(|w| {
                        vec![
                            w.id.clone(),
                            status_name(w.status),
                            w.mime_type.clone(),
                            w.topics.join(","),
                            w.messages_processed.to_string(),
                            w.messages_failed.to_string(),
                            w.tags
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(","),
                        ]
                    }),
                )
            })
        }
        WorkersCmd::Get { id } => {
            let w = call(c.get_worker(pb::GetWorkerRequest { id })).await?;
            print(output, &w, || describe(&w))
        }
        WorkersCmd::Start { id } => {
            let r = call(c.start_worker(pb::StartWorkerRequest { id: id.clone() })).await?;
            print(output, &r, || state_line(&id, r.worker.as_ref()))
        }
        WorkersCmd::Stop { id } => {
            let r = call(c.stop_worker(pb::StopWorkerRequest { id: id.clone() })).await?;
            print(output, &r, || state_line(&id, r.worker.as_ref()))
        }
        WorkersCmd::Delete { id } => {
            let r = call(c.delete_worker(pb::DeleteWorkerRequest { id: id.clone() })).await?;
            print(output, &r, || format!("deleted {id}"))
        }
        WorkersCmd::History { id } => {
            let r = call(c.get_worker_history(pb::GetWorkerHistoryRequest { id })).await?;
            print(output, &r, || {
                table(
                    &["LOADED AT", "SHA-256", "SOURCE"],
                    r.entries.iter().map(|h| {
                        let cs = h.code_source.clone().unwrap_or_default();
                        let source = match cs.source {
                            Some(pb::code_source::Source::Url(u)) => u,
                            _ => "content".into(),
                        };
                        vec![h.created_at.clone(), cs.content_sha256, source]
                    }),
                )
            })
        }
        WorkersCmd::Load(a) => {
            let req = pb::LoadCodeRequest {
                id: a.id.clone(),
                code_source: Some(code_source(&a.code)?),
            };
            let r = call(c.load_code(req)).await?;
            print(output, &r, || format!("loaded new code into {}", a.id))
        }
        WorkersCmd::Invoke {
            id,
            data,
            event_type,
        } => {
            let event = cli_event(&data, &event_type)?;
            let r = call(c.invoke_worker(pb::InvokeWorkerRequest {
                id,
                event: Some(event),
                publish: false,
            }))
            .await?;
            match r.event {
                Some(e) => {
                    let e = event_from_proto(e).map_err(status_error)?;
                    emit(&serde_json::to_string_pretty(&serde_json::Value::Object(
                        e.0,
                    ))?)?;
                }
                None if output == Output::Json => emit("{}")?,
                None => emit("(the worker returned nothing)")?,
            }
            Ok(())
        }
    }
}

/// Writes one line to stdout; an error (closed pipe) is returned, not a panic.
fn emit(line: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("cannot write to standard output")
}

async fn connect(conn: &ConnArgs) -> Result<Client> {
    let server = &conn.server;
    let mut endpoint = Channel::from_shared(server.to_string()).map_err(|_| {
        anyhow!("--server {server:?} is not a valid URL; use e.g. http://127.0.0.1:25002")
    })?;
    if server.starts_with("https://") || conn.ca.is_some() || conn.cert.is_some() {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("cannot read the {what} {}", p.display()))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
        if let Some(ca) = &conn.ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(
                ca,
                "CA certificate (--ca)",
            )?));
        }
        if let (Some(cert), Some(key)) = (&conn.cert, &conn.key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert, "client certificate (--cert)")?,
                read(key, "client key (--key)")?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow!("TLS settings are not usable: {e}"))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow!(
            "cannot reach the WorkManager at {server}: {}; is `workmanager serve` running? \
             (set --server; for TLS also --ca, and --cert/--key when it requires client certificates)",
            error_chain(&e)
        )
    })?;
    let mut creds = Vec::new();
    if let Some(t) = &conn.token {
        let v = format!("Bearer {}", t.trim())
            .parse()
            .map_err(|_| anyhow!("--token holds characters a header cannot carry"))?;
        creds.push(("authorization", v));
    }
    if let Some(k) = &conn.api_key {
        let v = k
            .trim()
            .parse()
            .map_err(|_| anyhow!("--api-key holds characters a header cannot carry"))?;
        creds.push(("x-api-key", v));
    }
    Ok(
        WorkManagerClient::with_interceptor(channel, Credentials(creds))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
}

/// Awaits an RPC. On a terminal, a spinner on stderr shows that the CLI is
/// waiting (loading code or recovering can take a while); scripts, pipes and
/// `-o json` output see nothing of it.
async fn call<T>(
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    use std::io::{IsTerminal, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let shown = std::sync::Arc::new(AtomicBool::new(false));
    let flag = shown.clone();
    let spinner = std::io::stderr().is_terminal().then(|| {
        tokio::spawn(async move {
            // Only waits longer than a blink get a spinner.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            for frame in ["|", "/", "-", "\\"].iter().cycle() {
                flag.store(true, Ordering::Relaxed);
                let _ = write!(
                    std::io::stderr(),
                    "\r{frame} waiting for the WorkManager..."
                );
                tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            }
        })
    });
    let result = fut.await;
    if let Some(s) = spinner {
        s.abort();
        if shown.load(Ordering::Relaxed) {
            let _ = write!(std::io::stderr(), "\r{:40}\r", "");
        }
    }
    result
        .map(tonic::Response::into_inner)
        .map_err(status_error)
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}: {}", code_name(s.code()), s.message())
}

fn print<T: Serialize>(output: Output, value: &T, human: impl FnOnce() -> String) -> Result<()> {
    match output {
        Output::Json => emit(&serde_json::to_string_pretty(value)?)?,
        Output::Table => {
            let text = human();
            if !text.is_empty() {
                emit(&text)?;
            }
        }
    }
    Ok(())
}

fn code_source(a: &CodeArgs) -> Result<pb::CodeSource> {
    let source = match (&a.file, &a.url) {
        (Some(f), _) => pb::code_source::Source::Content(
            std::fs::read(f)
                .with_context(|| format!("cannot read the code file {}", f.display()))?,
        ),
        (None, Some(u)) => pb::code_source::Source::Url(u.clone()),
        (None, None) => bail!("give the code with --file or --url"),
    };
    Ok(pb::CodeSource {
        source: Some(source),
        credential: a.credential.clone().map(|n| pb::SourceCredential {
            scheme: Some(pb::source_credential::Scheme::Named(n)),
        }),
        content_sha256: a.sha256.clone().unwrap_or_default(),
    })
}

fn pairs(items: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("{what} {s:?} must be written key=value"))
        })
        .collect()
}

fn cli_event(
    data: &str,
    event_type: &str,
) -> Result<workmanager_api::pb::io::cloudevents::v1::CloudEvent> {
    let data: serde_json::Value =
        serde_json::from_str(data).with_context(|| format!("--data is not valid JSON: {data}"))?;
    let event = CloudEvent::from_input(serde_json::json!({
        "specversion": "1.0",
        "id": uuid::Uuid::new_v4().to_string(),
        "source": "urn:com.virtufin.workmanager:cli",
        "type": event_type,
        "datacontenttype": "application/json",
        "data": data,
    }));
    Ok(event_to_proto(&event))
}

fn status_name(status: i32) -> String {
    match pb::WorkerStatus::try_from(status) {
        Ok(pb::WorkerStatus::Running) => "RUNNING",
        Ok(pb::WorkerStatus::Stopped) => "STOPPED",
        Ok(pb::WorkerStatus::Failed) => "FAILED",
        _ => "UNSPECIFIED",
    }
    .into()
}

fn state_line(id: &str, w: Option<&pb::WorkerInfo>) -> String {
    match w {
        Some(w) => format!("worker {id} is {}", status_name(w.status)),
        None => format!("worker {id} updated"),
    }
}

fn describe(w: &pb::WorkerInfo) -> String {
    let map = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut lines = vec![
        format!("id:           {}", w.id),
        format!("status:       {}", status_name(w.status)),
        format!("mime type:    {} ({})", w.mime_type, w.language),
        format!("topics:       {}", w.topics.join(", ")),
        format!("config:       {}", map(&w.config)),
        format!("tags:         {}", map(&w.tags)),
        format!("created at:   {}", w.created_at),
        format!("instance:     {}", w.instance_id),
        format!(
            "processed:    {} ok, {} failed",
            w.messages_processed, w.messages_failed
        ),
    ];
    if !w.last_error.is_empty() {
        lines.push(format!("last error:   {}", w.last_error));
    }
    lines.join("\n")
}

/// A plain left-aligned table.
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, cell) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}
