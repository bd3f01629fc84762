//! Connection handling where naive servers break: heartbeats, clients that
//! stop reading, shutdown, and many connections at once.

mod common;

use std::time::{Duration, Instant};

use common::{config, TestServer};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{protocol::CloseFrame, Message};
use wsproto::{opcode, Config, Frame};
use wsproto_client::{Client, ClientError};

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_dropped() {
    let server = TestServer::start(Config {
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(400),
        shutdown_timeout: Duration::from_millis(300),
        ..config()
    })
    .await;

    // A live client reads (and so answers pings) while it waits.
    let mut live = server.client().await;
    // A dead one never reads or answers anything after the handshake.
    let mut dead = common::raw_websocket(server.addr, "/ws").await;
    server.wait_for_sessions(2).await;

    // The live client keeps reading (and so answering pings) while the
    // dead one is cut off.
    let (read, ()) = tokio::join!(
        live.recv_timeout(Duration::from_secs(3)),
        server.wait_for_sessions(1)
    );
    assert!(matches!(read, Err(ClientError::Timeout(_))), "{read:?}");
    assert_eq!(
        live.call(opcode::ECHO, "alive").await.unwrap().payload,
        "alive"
    );

    // What the dead client would have read: pings, then a close with 4000,
    // then the end of the connection.
    let mut received = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut dead, &mut received)
        .await
        .unwrap();
    assert!(
        common::contains_close_frame(&received, 4000),
        "{received:x?}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_does_not_delay_another_client() {
    let server = TestServer::start(Config {
        send_queue: 32,
        // Long, so only the queue bound can save the other client.
        write_timeout: Duration::from_secs(60),
        shutdown_timeout: Duration::from_millis(500),
        ..config()
    })
    .await;

    // The stuck client floods echo requests and never reads a reply.
    let (mut stuck, _) = tokio_tungstenite::connect_async(format!("{}?user=stuck", server.url()))
        .await
        .unwrap();
    let flood = tokio::spawn(async move {
        let frame = Frame::new(opcode::ECHO, vec![0u8; 16 * 1024]).encode();
        for _ in 0..4000 {
            if stuck.send(Message::Binary(frame.clone())).await.is_err() {
                break;
            }
        }
        stuck
    });

    let mut other = server.client().await;
    let started = Instant::now();
    for i in 0..200 {
        let text = format!("round trip {i}");
        assert_eq!(
            other
                .call(opcode::ECHO, text.clone())
                .await
                .unwrap()
                .payload,
            text
        );
    }
    let elapsed = started.elapsed();
    // Far below the stuck client's 60 s write timeout: nothing waited on it.
    assert!(
        elapsed < Duration::from_secs(10),
        "200 round trips took {elapsed:?}"
    );

    // The stuck client is held back by TCP: the server reads none of its
    // requests while their replies are queued, so its queue stays within
    // half its bound (plus the reply being added) instead of overflowing,
    // and its flood cannot get through.
    let id = server
        .hub
        .sessions_of_user("stuck")
        .pop()
        .expect("still open");
    let queue = server.hub.queue_of(&id).expect("still open");
    assert!(queue.len() <= 32 / 2 + 1, "{} queued", queue.len());
    assert!(
        !flood.is_finished(),
        "4,000 requests of 16 KiB were all read"
    );
    // Gone as soon as it hangs up, though nothing of it is being read.
    flood.abort();
    server.wait_for_sessions(1).await;
    assert_eq!(
        other.call(opcode::ECHO, "after").await.unwrap().payload,
        "after"
    );
}

#[tokio::test]
async fn shutdown_sends_close_1001_to_every_client_and_returns() {
    let server = TestServer::start(config()).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.client().await);
    }
    let echo = tokio_tungstenite::connect_async(server.url_of("/echo"))
        .await
        .unwrap()
        .0;
    let addr = server.addr;

    let started = Instant::now();
    let shutdown = tokio::spawn(server.shutdown());
    for client in &mut clients {
        match client.recv_timeout(Duration::from_secs(5)).await {
            Err(ClientError::Closed { code, .. }) => assert_eq!(code, 1001),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    let mut echo = echo;
    let mut close_code = None;
    while let Some(Ok(message)) = echo.next().await {
        if let Message::Close(Some(frame)) = message {
            close_code = Some(u16::from(frame.code));
        }
    }
    assert_eq!(close_code, Some(1001));

    shutdown.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "run returned after {:?}",
        started.elapsed()
    );
    assert!(
        Client::connect(&format!("ws://{addr}/ws")).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn a_thousand_concurrent_connections_each_complete_round_trips() {
    const CONNECTIONS: usize = 1000;
    // All of them connect at once, from one address.
    let server = TestServer::start(Config {
        max_handshakes_per_ip: 1000,
        ..config()
    })
    .await;
    let url = server.url();
    let all_connected = std::sync::Arc::new(tokio::sync::Barrier::new(CONNECTIONS + 1));

    let mut tasks = Vec::new();
    for i in 0..CONNECTIONS {
        let (url, all_connected) = (url.clone(), all_connected.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&url).await?;
            client.welcome().await?;
            all_connected.wait().await;
            for round in 0..3 {
                let text = format!("{i}/{round}");
                let reply = client.call(opcode::ECHO, text.clone()).await?;
                assert_eq!(reply.payload, text);
            }
            client.close(1000).await?;
            Ok::<_, ClientError>(())
        }));
    }
    all_connected.wait().await;
    assert_eq!(server.hub.len(), CONNECTIONS);
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    server.wait_for_sessions(0).await;
}

#[tokio::test]
async fn connections_past_the_cap_are_refused_with_503() {
    let server = TestServer::start(Config {
        max_connections: 2,
        ..config()
    })
    .await;
    let _a = server.client().await;
    let _b = server.client().await;
    match Client::connect(&server.url()).await {
        Err(ClientError::Refused { status, .. }) => assert_eq!(status, 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    drop(_a);
    server.wait_for_sessions(1).await;
    server.client().await;
}

#[tokio::test]
async fn http_endpoints_answer_with_proper_statuses() {
    let server = TestServer::start(config()).await;
    let _client = server.client().await;
    let get = |path: &'static str| common::http_get(server.addr, path);
    let health = get("/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body = health.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        (&json["status"], &json["sessions"]),
        (&"ok".into(), &1.into()),
        "{health}"
    );
    assert_eq!(
        json["limits"]["refused_origin"], 0,
        "every limit is counted: {health}"
    );
    // A plain GET to a WebSocket endpoint is told to upgrade.
    let plain = get("/ws").await;
    assert!(plain.starts_with("HTTP/1.1 426"), "{plain}");
    assert!(
        plain.to_lowercase().contains("sec-websocket-version: 13"),
        "{plain}"
    );
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    let post = common::http_request(server.addr, "POST", "/ws").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(
        post.ends_with("WebSocket handshake must use GET\n"),
        "{post}"
    );
}

#[tokio::test]
async fn the_echo_endpoint_echoes_any_message() {
    let server = TestServer::start(config()).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url_of("/echo"))
        .await
        .unwrap();
    for message in [
        Message::Text("plain text".into()),
        Message::Binary(vec![1, 2].into()),
        Message::Binary(Default::default()),
    ] {
        ws.send(message.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), message);
    }
}

/// The server answers a client's close with the client's code, even while
/// it is busy writing deliveries to that client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_close_is_answered_with_its_code_while_deliveries_flow() {
    // drop-oldest: a client that does not read while it sleeps would
    // otherwise (rightly) be closed as a slow consumer before its close
    // frame is read.
    let server = TestServer::start(Config {
        topic_policies: vec![("busy".parse().unwrap(), "drop-oldest".parse().unwrap())],
        ..config()
    })
    .await;
    // The race it guards against is narrow; try it many times.
    for _ in 0..20 {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("{}?subscribe=busy", server.url()))
                .await
                .unwrap();
        let node = server.node.clone();
        let publisher = tokio::spawn(async move {
            let topic: wsproto::topic::Topic = "busy".parse().unwrap();
            for _ in 0..2000 {
                let publication = wsproto::broker::Publication::new(
                    wsproto::broker::Target::Topic(topic.clone()),
                    None,
                    bytes::Bytes::from_static(b"tick"),
                );
                node.publish(publication).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        ws.close(Some(CloseFrame {
            code: 4321.into(),
            reason: "".into(),
        }))
        .await
        .unwrap();
        // Generous: a loaded machine may take a while to read the
        // deliveries still ahead of the answer. Ending without an answer
        // and timing out are told apart.
        let mut read = 0;
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(message) = ws.next().await {
                match message {
                    Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                    Ok(_) => read += 1,
                    Err(err) => panic!("read failed after {read} messages: {err}"),
                }
            }
            panic!("the connection ended after {read} messages without an answering close");
        })
        .await
        .unwrap_or_else(|_| panic!("no answering close within 10 s ({read} messages read)"));
        assert_eq!(answer, Some(4321));
        publisher.await.unwrap();
    }
    server.wait_for_sessions(0).await;
}

#[tokio::test]
async fn a_shutdown_closes_sessions_a_few_at_a_time_and_serves_them_until_their_turn() {
    let server = TestServer::start(Config {
        shutdown_timeout: Duration::from_secs(4),
        ..config()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(server.client().await);
    }
    let started = Instant::now();
    let shutdown = tokio::spawn(server.shutdown());
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                // Served normally until its turn: an echo still comes back.
                if let Ok(reply) = client.call(opcode::ECHO, "still here").await {
                    assert_eq!(reply.payload, "still here");
                }
                loop {
                    match client.recv_timeout(Duration::from_secs(5)).await {
                        Err(ClientError::Closed { code, reason }) => {
                            assert_eq!(code, 1001);
                            return (started.elapsed(), reason);
                        }
                        Ok(_) => continue,
                        other => panic!("expected close 1001, got {other:?}"),
                    }
                }
            })
        })
        .collect();
    let mut closed_after = Vec::new();
    let mut hints = std::collections::BTreeSet::new();
    for watcher in watchers {
        let (after, reason) = watcher.await.unwrap();
        closed_after.push(after);
        // Each is told when to come back, not all the same moment.
        let hint = reason
            .strip_prefix("server shutting down; reconnect after ")
            .and_then(|ms| ms.strip_suffix(" ms"))
            .and_then(|ms| ms.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no reconnect hint in {reason:?}"));
        assert!(hint < 1000, "{reason}");
        hints.insert(hint);
    }
    assert!(hints.len() >= 3, "40 sessions got hints {hints:?}");
    shutdown.await.unwrap().unwrap();
    closed_after.sort();
    let (first, last) = (closed_after[0], closed_after[closed_after.len() - 1]);
    // Spread over the first half of the shutdown timeout (2 s), not at once.
    assert!(
        last - first > Duration::from_millis(800),
        "{closed_after:?}"
    );
    assert!(last < Duration::from_millis(2500), "{closed_after:?}");
}
