//! `workmanager`: `serve` runs the service; `bench` measures it; every other
//! subcommand is the client CLI.
mod alloc;
mod bench;
mod bench_throughput;
mod cli;
mod config;
mod logging;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "workmanager",
    version,
    about = "Hosts user functions as workers on pub/sub topics"
)]
struct Cli {
    #[command(flatten)]
    conn: cli::ConnArgs,
    /// Output format of client commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = cli::Output::Table)]
    output: cli::Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    Serve(ServeArgs),
    /// Measure latency, cold start and memory; prints a Markdown report.
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Client(cli::ClientCmd),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// JSON configuration file [default: ./appsettings.json if present].
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_name = "PORT")]
    http_port: Option<String>,
    #[arg(long, value_name = "PORT")]
    grpc_port: Option<String>,
    /// Address to bind both ports to (BindAddress).
    #[arg(long, value_name = "IP")]
    bind: Option<String>,
    /// The embedded state file (StateStore:Path).
    #[arg(long, value_name = "FILE")]
    state_path: Option<String>,
    /// Trace, Debug, Information, Warning, Error (Logging:LogLevel:Default).
    #[arg(long)]
    log_level: Option<String>,
    /// json or text (Logging:Format).
    #[arg(long)]
    log_format: Option<String>,
    /// Any configuration key, e.g. --set Python:ExecutionTimeoutSeconds=5.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Write the bound ports as JSON to this file (useful with port 0).
    #[arg(long, value_name = "FILE")]
    port_file: Option<PathBuf>,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    alloc::tune();
    // The sandbox launcher: a fresh single-threaded process that confines
    // itself and execs the Python interpreter (see the engine's sandbox.rs).
    let mut args = std::env::args_os();
    if args.nth(1).as_deref()
        == Some(std::ffi::OsStr::new(
            workmanager_engine_python::LAUNCHER_ARG,
        ))
    {
        let spec = args
            .next()
            .and_then(|s| s.into_string().ok())
            .unwrap_or_default();
        return workmanager_engine_python::sandbox::launcher_main(&spec);
    }
    // One TLS crypto provider for the whole process (ring; the only one
    // compiled in). Installing can only fail if one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve_main(args)),
        Command::Bench(args) => report(runtime.block_on(bench::run(args))),
        Command::Client(cmd) => report(runtime.block_on(cli::run(&cli.conn, cli.output, cmd))),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes a line to stderr; a closed stderr is ignored rather than a panic.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn serve_main(args: ServeArgs) -> ExitCode {
    let mut layers = config::Layers::default();
    let config_path = match &args.config {
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from("appsettings.json")).filter(|p| p.exists()),
    };
    if let Some(path) = config_path {
        if let Err(e) = layers.add_json_file(&path) {
            say(&format!("error: {e}"));
            return ExitCode::from(2);
        }
    }
    layers.add_env(std::env::vars());
    let flags = [
        ("HttpPort", &args.http_port),
        ("GrpcPort", &args.grpc_port),
        ("BindAddress", &args.bind),
        ("StateStore:Path", &args.state_path),
        ("Logging:LogLevel:Default", &args.log_level),
        ("Logging:Format", &args.log_format),
    ];
    for (key, value) in flags {
        if let Some(v) = value {
            layers.add_flag(key, v.clone());
        }
    }
    for kv in &args.set {
        match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => layers.add_flag(k.trim(), v.to_string()),
            _ => {
                say(&format!("error: --set {kv:?} must be written KEY=VALUE"));
                return ExitCode::from(2);
            }
        }
    }
    let dapr_errors = config::resolve_dapr_secrets(&mut layers).await;
    if !dapr_errors.is_empty() {
        for e in dapr_errors {
            say(&format!("error: {e}"));
        }
        return ExitCode::from(2);
    }
    let settings = match config::settings(&layers) {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                say(&format!("error: {e}"));
            }
            return ExitCode::from(2);
        }
    };
    let _guard = logging::init(&settings.log_filter, settings.log_format);
    match serve::run(settings, args.port_file).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the service stopped with an error");
            say(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
