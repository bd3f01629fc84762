//! The two reference servers, run as the benchmarks run them (their binaries, a
//! real port, a real WebSocket client): they must do what `benches/compare.sh`
//! measures them doing, or the ratios compare wsproto with a broken peer.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

/// Starts `program` on a free port; returns it (killed on drop) and its address.
async fn start(program: &str) -> (Child, String) {
    let mut child = Command::new(program)
        .args(["--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the server prints its address")
        .unwrap()
        .expect("a line on stderr");
    let addr = line
        .split_once("addr=")
        .map(|(_, addr)| addr.trim().to_owned())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, addr)
}

async fn connect(url: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connected in time")
        .unwrap();
    ws
}

/// The next text or binary message.
async fn next_data(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("connection open")
            .unwrap();
        if message.is_binary() || message.is_text() {
            return message;
        }
    }
}

/// Sends a ping and waits for its pong: once it is back, the server is in
/// the connection's main loop (for `/sub`, subscribed to the channel).
async fn ping(ws: &mut Ws) {
    ws.send(Message::Ping(Bytes::from_static(b"ready")))
        .await
        .unwrap();
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a pong in time")
            .expect("connection open")
            .unwrap();
        if matches!(message, Message::Pong(_)) {
            return;
        }
    }
}

#[tokio::test]
async fn both_references_echo_text_and_binary() {
    for program in [
        env!("CARGO_BIN_EXE_baseline-server"),
        env!("CARGO_BIN_EXE_fastwebsockets-server"),
    ] {
        let (_server, addr) = start(program).await;
        let mut ws = connect(&format!("ws://{addr}/")).await;
        let binary = Message::Binary(Bytes::from(vec![7u8; 4096]));
        ws.send(binary.clone()).await.unwrap();
        assert_eq!(next_data(&mut ws).await, binary, "{program}");
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(
            next_data(&mut ws).await,
            Message::text("hello"),
            "{program}"
        );
        ws.close(None).await.unwrap();
    }
}

/// More messages than one batch (64), so the batched writer's feed-then-flush
/// is exercised, and the unbatched path alongside it.
#[tokio::test]
async fn baseline_subscribers_get_every_message_in_order_batched_or_not() {
    let (_server, addr) = start(env!("CARGO_BIN_EXE_baseline-server")).await;
    let mut subscribers = Vec::new();
    for path in ["sub", "sub", "sub-unbatched"] {
        let mut ws = connect(&format!("ws://{addr}/{path}")).await;
        ping(&mut ws).await;
        subscribers.push(ws);
    }
    let mut publisher = connect(&format!("ws://{addr}/pub")).await;
    const MESSAGES: u32 = 300;
    for seq in 0..MESSAGES {
        publisher
            .feed(Message::Binary(Bytes::from(seq.to_be_bytes().to_vec())))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    for ws in &mut subscribers {
        for seq in 0..MESSAGES {
            let expected = Message::Binary(Bytes::from(seq.to_be_bytes().to_vec()));
            assert_eq!(next_data(ws).await, expected);
        }
    }
}
