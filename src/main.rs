//! `wsproto-server`: the wsproto library with the built-in handlers.
//!
//! Start-up errors are one line on stderr: a setting to fix (exit code 2,
//! like clap's own usage errors) or a runtime failure such as a port in
//! use (exit code 1). They are expected outcomes, so no backtrace is
//! printed whatever `RUST_BACKTRACE` says.

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wsproto::{handlers, server::ServerError, Config, Server};

/// Exit code of a usage or configuration error.
const USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "wsproto-server",
    version,
    about = "WebSocket server for the wsproto binary opcode protocol"
)]
struct Cli {
    #[command(flatten)]
    config: Config,

    /// Log filter, e.g. `info`, `wsproto=debug` (per-frame logs are at debug).
    #[arg(
        long,
        env = "WSPROTO_LOG",
        default_value = "info",
        value_parser = parse_log_filter,
        help_heading = "Logging"
    )]
    log: String,

    #[command(flatten)]
    runtime: Runtime,
}

/// How the server's threads run its connections.
#[derive(clap::Args)]
#[command(next_help_heading = "Runtime")]
struct Runtime {
    /// Threads serving connections [default: one per CPU this process may use].
    #[arg(long, env = "WSPROTO_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,

    /// How often, in task polls, a thread takes work from the queue all
    /// threads share; lower is fairer to connections under overload
    /// [0: tokio's own, self-tuned interval].
    //
    // Connections woken in one batch past a thread's own queue (256) wait
    // in the shared one while those served first are served again: with
    // tokio's interval, a saturated server's p99 was ~250 ms against ~45 ms
    // with 2 (benches/results/echo-fairness.md).
    #[arg(long, env = "WSPROTO_GLOBAL_QUEUE_INTERVAL", default_value_t = 2)]
    global_queue_interval: u32,
}

impl Runtime {
    fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.enable_all();
        if let Some(threads) = self.worker_threads {
            builder.worker_threads(threads.into());
        }
        if self.global_queue_interval > 0 {
            builder.global_queue_interval(self.global_queue_interval);
        }
        builder.build()
    }
}

/// A valid `EnvFilter` directive list, checked while parsing the flags so
/// a bad one is reported like any other bad flag value.
fn parse_log_filter(filter: &str) -> Result<String, String> {
    match EnvFilter::try_new(filter) {
        Ok(_) => Ok(filter.to_owned()),
        Err(err) => Err(err.to_string()),
    }
}

fn main() -> ExitCode {
    let Cli {
        config,
        log,
        runtime,
    } = Cli::parse();
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, log))
}

async fn serve(config: Config, log: String) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before anything can fail or be announced: a SIGTERM from here on
    // shuts down gracefully.
    let shutdown = wsproto::shutdown_signal();
    let (tls, ws_path) = (config.tls_cert.is_some(), config.ws_path.clone());
    let server = match Server::bind(config, handlers::builtin()).await {
        Ok(server) => server,
        Err(err) => {
            eprintln!("error: {err}");
            return match err {
                ServerError::Config { .. } => ExitCode::from(USAGE),
                ServerError::Bind { .. } => ExitCode::FAILURE,
            };
        }
    };
    let addr = match server.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("error: cannot tell the listening address: {err}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%addr, "wsproto-server listening");
    for also in server.local_addrs().iter().skip(1) {
        tracing::info!(addr = %also, "also listening");
    }
    let (page, websocket) = urls(addr, tls, &ws_path);
    tracing::info!("demo page: {page} · WebSocket endpoint: {websocket}");
    match server.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The demo page's URL and the WebSocket endpoint's, as a browser on this
/// machine reaches them (a wildcard address is reached through loopback).
fn urls(addr: SocketAddr, tls: bool, ws_path: &str) -> (String, String) {
    let host = match addr.ip() {
        ip if ip.is_unspecified() => format!("127.0.0.1:{}", addr.port()),
        _ => addr.to_string(),
    };
    let (http, ws) = match tls {
        true => ("https", "wss"),
        false => ("http", "ws"),
    };
    (
        format!("{http}://{host}/"),
        format!("{ws}://{host}{ws_path}"),
    )
}
