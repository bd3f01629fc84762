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
}

/// A valid `EnvFilter` directive list, checked while parsing the flags so
/// a bad one is reported like any other bad flag value.
fn parse_log_filter(filter: &str) -> Result<String, String> {
    match EnvFilter::try_new(filter) {
        Ok(_) => Ok(filter.to_owned()),
        Err(err) => Err(err.to_string()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before anything can fail or be announced: a SIGTERM from here on
    // shuts down gracefully.
    let shutdown = wsproto::shutdown_signal();
    let (tls, ws_path) = (cli.config.tls_cert.is_some(), cli.config.ws_path.clone());
    let server = match Server::bind(cli.config, handlers::builtin()).await {
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
