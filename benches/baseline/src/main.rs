//! `baseline-server`: the hand-written tokio-tungstenite server that wsproto is
//! benchmarked against (`benches/compare.sh`).
//!
//! It is what a competent developer writes in an afternoon with tokio-tungstenite:
//! one task per connection, `accept_hdr_async` with the default `WebSocketConfig`,
//! and one `tokio::sync::broadcast` channel for fan-out. The defaults are kept on
//! purpose: the question the benchmarks answer is what wsproto's opcode dispatch,
//! hub and per-session queues cost (or save) against the obvious approach.
//!
//! The obvious approach includes the one optimisation every broadcast server
//! needs, though: a subscriber's writer feeds everything already queued for it (up
//! to [`BATCH`] messages) and flushes once, instead of one write system call per
//! message. Without it the baseline is several times slower at fan-out and the
//! comparison flatters wsproto (benches/README.md, issue 13).
//!
//! Paths:
//! - `/sub` receives every message published, batched as above.
//! - `/sub-unbatched` the same, flushing after every message (the baseline before
//!   issue 13; kept to show what batching is worth, not used by `compare.sh`).
//! - `/pub` publishes every binary message it sends; nothing is echoed back.
//! - anything else echoes text and binary messages, one flush each (`ws.send`).
//!
//! A subscriber that falls more than the channel's capacity behind skips ahead; the
//! skipped messages are never hidden: each lag is reported on stderr as it happens
//! (`baseline-server lagged skipped=N`) and the total on exit (`lost=N`). The load
//! generator counts them as lost as well.

mod shared;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Messages a `/sub` subscriber may fall behind by before it starts losing them;
/// the usual order of magnitude for a hand-rolled hub.
const BROADCAST_CAPACITY: usize = 1024;

/// Messages a `/sub` writer takes off the channel before it flushes.
const BATCH: usize = 64;

/// Messages skipped by lagging subscribers, over the life of the process.
static LOST: AtomicU64 = AtomicU64::new(0);

#[derive(Parser)]
#[command(
    name = "baseline-server",
    version,
    about = "Plain tokio-tungstenite echo and broadcast server, the benchmark baseline"
)]
struct Cli {
    /// Address to listen on; port 0 picks a free port (the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (publisher, _) = broadcast::channel::<Bytes>(BROADCAST_CAPACITY);
    shared::run("baseline-server", cli.listen, move |stream| {
        let publisher = publisher.clone();
        async move {
            // Errors end only this connection, and they are what a benchmark
            // client vanishing looks like, so they are not reported.
            let _ = serve(stream, publisher).await;
        }
    })
    .await?;
    eprintln!(
        "baseline-server stopped lost={}",
        LOST.load(Ordering::Relaxed)
    );
    Ok(())
}

/// Completes the handshake and runs the connection in the role its path names.
async fn serve(stream: TcpStream, publisher: broadcast::Sender<Bytes>) -> Result<(), WsError> {
    stream.set_nodelay(true)?;
    let mut path = String::new();
    // The callback's signature is tungstenite's, large error type included.
    #[allow(clippy::result_large_err)]
    let record_path = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        path = request.uri().path().to_owned();
        Ok(response)
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, record_path).await?;
    match path.as_str() {
        "/sub" => subscribe(ws, publisher.subscribe(), BATCH).await,
        "/sub-unbatched" => subscribe(ws, publisher.subscribe(), 1).await,
        "/pub" => publish(ws, &publisher).await,
        _ => echo(ws).await,
    }
}

/// Forwards every published message to the client until it goes away, feeding
/// up to `batch` queued messages before each flush.
///
/// The socket is read as well, so pings are answered and a close is noticed while
/// nothing is being published.
async fn subscribe(
    mut ws: WebSocketStream<TcpStream>,
    mut published: broadcast::Receiver<Bytes>,
    batch: usize,
) -> Result<(), WsError> {
    loop {
        tokio::select! {
            message = published.recv() => match message {
                Ok(bytes) => {
                    ws.feed(Message::Binary(bytes)).await?;
                    let mut fed = 1;
                    while fed < batch {
                        match published.try_recv() {
                            Ok(bytes) => {
                                ws.feed(Message::Binary(bytes)).await?;
                                fed += 1;
                            }
                            Err(TryRecvError::Lagged(skipped)) => lagged(skipped),
                            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                        }
                    }
                    ws.flush().await?;
                }
                Err(RecvError::Lagged(skipped)) => lagged(skipped),
                Err(RecvError::Closed) => return Ok(()),
            },
            incoming = ws.next() => match incoming {
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err),
                None => return Ok(()),
            },
        }
    }
}

/// Counts and reports messages a lagging subscriber skipped: a benchmark must see
/// them, never a silently thinner stream.
fn lagged(skipped: u64) {
    LOST.fetch_add(skipped, Ordering::Relaxed);
    eprintln!("baseline-server lagged skipped={skipped}");
}

/// Puts every binary message from the client on the broadcast channel.
async fn publish(
    mut ws: WebSocketStream<TcpStream>,
    publisher: &broadcast::Sender<Bytes>,
) -> Result<(), WsError> {
    while let Some(message) = ws.next().await {
        if let Message::Binary(bytes) = message? {
            // The only error is "no subscribers", and then there is no one to tell.
            let _ = publisher.send(bytes);
        }
    }
    Ok(())
}

/// Sends every text and binary message back; tungstenite answers pings and closes.
async fn echo(mut ws: WebSocketStream<TcpStream>) -> Result<(), WsError> {
    while let Some(message) = ws.next().await {
        let message = message?;
        if message.is_binary() || message.is_text() {
            ws.send(message).await?;
        }
    }
    Ok(())
}
