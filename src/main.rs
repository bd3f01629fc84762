//! `wsproto-server`: the wsproto library with the built-in handlers.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wsproto::{handlers, Config, Server};

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
    #[arg(long, env = "WSPROTO_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Before anything can fail or be announced: a SIGTERM from here on
    // shuts down gracefully.
    let shutdown = wsproto::shutdown_signal();
    let listen = cli.config.listen.clone();
    let server = Server::bind(cli.config, handlers::builtin())
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(addr = %server.local_addr()?, "wsproto-server listening");
    server.run(shutdown).await?;
    Ok(())
}
