//! `fastwebsockets-server`: an echo server on `fastwebsockets` (hyper 1 upgrade),
//! the second reference `benches/compare.sh` measures wsproto against.
//!
//! fastwebsockets is the fastest Rust WebSocket implementation measured on this
//! project's machine (1.1–1.6× plain tokio-tungstenite on most echo cells), so it
//! bounds from above what wsproto's echo, which also decodes and dispatches every
//! frame through its router, can hope for. Like `baseline-server` it is written the
//! way the crate's documentation suggests, with its defaults: one task per
//! connection, automatic pong and close, fragments collected, one write per frame.
//!
//! Every path echoes text and binary messages; there is no fan-out.

mod shared;

use std::net::SocketAddr;

use clap::Parser;
use fastwebsockets::{upgrade, FragmentCollector, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(
    name = "fastwebsockets-server",
    version,
    about = "fastwebsockets echo server, the second benchmark reference"
)]
struct Cli {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:9002")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    shared::run("fastwebsockets-server", cli.listen, serve).await?;
    eprintln!("fastwebsockets-server stopped");
    Ok(())
}

/// Serves one HTTP/1 connection whose only use is to be upgraded.
async fn serve(stream: TcpStream) {
    if stream.set_nodelay(true).is_err() {
        return;
    }
    let connection = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service_fn(upgrade_request))
        .with_upgrades();
    // A failed connection is what a benchmark client vanishing looks like.
    let _ = connection.await;
}

/// Answers the upgrade and runs the echo on its own task once hyper hands the
/// connection over.
async fn upgrade_request(
    mut request: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, upgraded) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        let _ = echo(upgraded).await;
    });
    Ok(response)
}

/// Sends every text and binary message back; pongs and the closing handshake are
/// fastwebsockets' own.
async fn echo(upgraded: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(upgraded.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}
