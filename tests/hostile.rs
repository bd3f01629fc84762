//! Hostile clients on real sockets. After each, the server still serves a
//! well-behaved client, and its session count returns to zero.

mod common;

use std::time::{Duration, Instant};

use common::{config, contains_close_frame, raw_websocket, TestServer};
use futures_util::{SinkExt, StreamExt};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config as ProptestConfig, TestRunner},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wsproto::{opcode, proto::v1, Config, Frame};

/// A well-behaved client still gets its answers.
async fn still_serving(server: &TestServer) {
    let mut client = server.client().await;
    assert_eq!(
        client
            .call(opcode::ECHO, "still here")
            .await
            .unwrap()
            .payload,
        "still here"
    );
}

/// Reads until the server closes the connection; panics after `limit`.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream, limit: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await
        .expect("the server closed the connection in time");
    received
}

#[tokio::test]
async fn slowloris_connections_are_dropped_after_the_handshake_timeout() {
    let server = TestServer::start(Config {
        handshake_timeout: Duration::from_millis(500),
        ..config()
    })
    .await;
    let started = Instant::now();
    // One sends half an upgrade request and stops; one sends nothing at all.
    let mut partial = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    partial
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websock")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    read_until_closed(&mut partial, Duration::from_secs(5)).await;
    read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert_eq!(server.node.counter_snapshot().closed_handshake_timeout, 2);
    still_serving(&server).await;
    server.wait_for_sessions(0).await;
}

#[tokio::test]
async fn a_frame_declaring_a_huge_payload_is_refused_before_it_is_sent() {
    let server = TestServer::start(config()).await;
    let mut tcp = raw_websocket(server.addr, "/ws").await;
    // FIN + binary, masked, 64-bit length 1 GiB, mask key; then nothing.
    let mut header = vec![0x82, 0xFF];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    tcp.write_all(&header).await.unwrap();
    let received = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(contains_close_frame(&received, 1009), "{received:x?}");
    still_serving(&server).await;
    server.wait_for_sessions(0).await;
}

#[tokio::test]
async fn abrupt_resets_mid_frame_leave_nothing_behind() {
    let server = TestServer::start(config()).await;
    for cut in [1usize, 2, 6, 9] {
        let tcp = raw_websocket(server.addr, "/ws?subscribe=news").await;
        // A masked binary frame of 100 bytes, cut after `cut` bytes.
        let mut frame = vec![0x82, 0x80 | 100, 9, 9, 9, 9];
        frame.extend(std::iter::repeat_n(0u8, 100));
        let mut tcp = tcp;
        tcp.write_all(&frame[..cut]).await.unwrap();
        // Deprecated because dropping then blocks; here an RST is the point.
        #[allow(deprecated)]
        tcp.set_linger(Some(Duration::ZERO)).unwrap();
        drop(tcp); // RST, not FIN
    }
    server.wait_for_sessions(0).await;
    assert_eq!(server.hub.index_sizes(), (0, 0, true));
    still_serving(&server).await;
}

/// Random messages shaped like frames, half of them for real opcodes.
fn hostile_message() -> impl Strategy<Value = Message> {
    let opcode = prop_oneof![
        Just(opcode::ECHO),
        Just(opcode::ADD_FRIEND),
        Just(opcode::GET_INFO),
        Just(opcode::PING),
        (opcode::SUBSCRIBE..=opcode::PRESENCE_EVENT),
        (0u32..200),
        any::<u32>(),
    ];
    let payload = proptest::collection::vec(any::<u8>(), 0..64);
    let frame = (opcode, payload).prop_map(|(op, payload)| {
        let mut bytes = op.to_be_bytes().to_vec();
        bytes.extend(payload);
        Message::Binary(bytes.into())
    });
    prop_oneof![
        6 => frame,
        1 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(|b| Message::Binary(b.into())),
        1 => ".{0,16}".prop_map(|t: String| Message::Text(t.into())),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_frames_get_well_formed_answers_while_others_are_served() {
    const MESSAGES: usize = 10_000;
    // Room for every answer: this test is about what the answers are, not
    // about a client that reads slower than it sends (see slow_consumers).
    let server = TestServer::start(Config {
        send_queue: 2 * MESSAGES,
        send_queue_bytes: 64 << 20,
        ..config()
    })
    .await;
    let mut runner = TestRunner::new(ProptestConfig {
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed),
        ..ProptestConfig::default()
    });
    let strategy = hostile_message();
    let messages: Vec<Message> = (0..MESSAGES)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect();

    let (ws, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .unwrap();
    let (mut sink, mut stream) = ws.split();
    let sender = tokio::spawn(async move {
        for message in messages {
            sink.send(message).await.unwrap();
        }
        sink
    });
    // Every frame the server sends back is a valid frame; ERROR payloads decode.
    let reader = tokio::spawn(async move {
        let mut frames = 0usize;
        while let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_secs(3), stream.next()).await
        {
            if let Message::Binary(data) = message {
                let frame = Frame::decode(data).expect("the server only sends valid frames");
                if frame.opcode == opcode::ERROR {
                    prost::Message::decode(frame.payload.clone())
                        .map(|_: v1::Error| ())
                        .unwrap();
                }
                frames += 1;
            }
        }
        (frames, stream)
    });
    // A well-behaved client is served throughout.
    for _ in 0..20 {
        still_serving(&server).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sink = sender.await.unwrap();
    let (frames, stream) = reader.await.unwrap();
    assert!(
        frames > MESSAGES / 2,
        "only {frames} answers to {MESSAGES} messages"
    );
    drop((sink, stream));
    server.wait_for_sessions(0).await;
    assert_eq!(server.hub.index_sizes(), (0, 0, true));
}
