//! Hostile and cross-site clients: origin policy and per-address limits.

mod common;

use std::{net::IpAddr, time::Duration};

use common::{config, raw_handshake, TestServer};
use wsproto::{opcode, Config, ErrorCode, Frame};
use wsproto_client::ClientError;

#[tokio::test]
async fn browser_origins_are_same_origin_only_unless_allowed() {
    let server = TestServer::start(config()).await;
    let same = format!("http://{}", server.addr);
    for (origin, expected) in [
        (None, 101),
        (Some(same.as_str()), 101),
        (Some("http://evil.test"), 403),
        (Some("null"), 403),
        (Some("garbage"), 403),
    ] {
        let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
        for path in ["/ws", "/echo"] {
            let (status, _) = raw_handshake(server.addr, path, &headers, None).await;
            assert_eq!(status, expected, "{path} from {origin:?}");
        }
    }
    server.wait_for_sessions(0).await;
    assert_eq!(server.node.counter_snapshot().refused_origin, 6);

    let allowing = TestServer::start(Config {
        allowed_origins: vec![
            "https://*.example.com".parse().unwrap(),
            "http://localhost:3000".parse().unwrap(),
        ],
        ..config()
    })
    .await;
    for (origin, expected) in [
        ("https://app.example.com", 101),
        ("https://example.com", 403),
        ("http://localhost:3000", 101),
        ("http://localhost:3001", 403),
    ] {
        let (status, _) = raw_handshake(allowing.addr, "/ws", &[("Origin", origin)], None).await;
        assert_eq!(status, expected, "{origin}");
    }
}

#[tokio::test]
async fn connections_per_address_are_capped_with_429() {
    let server = TestServer::start(Config {
        max_connections_per_ip: 2,
        ..config()
    })
    .await;
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let (_, first) = raw_handshake(server.addr, "/ws", &[], Some(local)).await;
    let (_, _second) = raw_handshake(server.addr, "/ws", &[], Some(local)).await;
    let (status, _) = raw_handshake(server.addr, "/ws", &[], Some(local)).await;
    assert_eq!(status, 429);
    assert_eq!(server.node.counter_snapshot().refused_per_address, 1);
    let (status, _another_host) = raw_handshake(server.addr, "/ws", &[], Some(other)).await;
    assert_eq!(status, 101, "another address has its own allowance");

    drop(first);
    server.wait_for_sessions(2).await;
    let (status, _) = raw_handshake(server.addr, "/ws", &[], Some(local)).await;
    assert_eq!(status, 101, "a closed session frees its slot");
}

#[tokio::test]
async fn a_frame_flood_gets_rate_limited_then_closed_with_4002() {
    let server = TestServer::start(Config {
        // Slow enough that no token comes back during the test.
        rate_limit: 0.2,
        rate_burst: 5,
        ..config()
    })
    .await;
    let mut bystander = server.client().await;
    let mut flooder = server.client().await;
    for _ in 0..5 {
        assert_eq!(
            flooder.call(opcode::ECHO, "ok").await.unwrap().opcode,
            opcode::ECHO
        );
    }
    let refused = flooder.call(opcode::ECHO, "one too many").await.unwrap();
    common::assert_error(&refused, ErrorCode::RateLimited, opcode::ECHO);
    assert!(
        refused.request_id.is_some(),
        "the refusal echoes the request id"
    );

    // Keeping on past another burst ends the session.
    for _ in 0..20 {
        if flooder
            .send(&Frame::new(opcode::ECHO, "flood"))
            .await
            .is_err()
        {
            break;
        }
    }
    let closed = loop {
        match flooder.recv().await {
            Ok(_) => continue,
            Err(err) => break err,
        }
    };
    assert!(
        matches!(closed, ClientError::Closed { code: 4002, .. }),
        "{closed:?}"
    );
    assert_eq!(
        bystander.call(opcode::ECHO, "fine").await.unwrap().payload,
        "fine"
    );
    server.wait_for_sessions(1).await;
    let counters = server.node.counter_snapshot();
    assert_eq!(counters.closed_rate_limit, 1);
    assert!(counters.rate_limited_frames > 5, "{counters:?}");
}

#[tokio::test]
async fn a_steady_flood_that_gets_a_frame_through_now_and_then_is_still_closed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start(Config {
        rate_limit: 100.0,
        rate_burst: 50,
        ..config()
    })
    .await;
    let (ws, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .unwrap();
    let (mut sink, mut stream) = ws.split();
    // One frame a millisecond: a token comes back every tenth frame, so
    // refusals never run more than ~10 in a row.
    let flood = tokio::spawn(async move {
        let frame = Frame::new(opcode::ECHO, "flood").encode();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        // No catching up in bursts after a stall: a steady stream.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        for _ in 0..20_000 {
            tick.tick().await;
            if sink.send(Message::Binary(frame.clone())).await.is_err() {
                break;
            }
        }
    });
    let (mut echoes, mut refusals) = (0u32, 0u32);
    let close = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Binary(data)) => match Frame::decode(data).unwrap().opcode {
                    opcode::ECHO => echoes += 1,
                    opcode::ERROR => refusals += 1,
                    _ => {}
                },
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("the flooder was closed");
    flood.abort();
    assert_eq!(close, Some(4002));
    assert!(echoes > 50, "frames within the limit were served: {echoes}");
    let refused = server.node.counter_snapshot().rate_limited_frames;
    assert!(
        u64::from(refusals) < refused,
        "not every refusal costs an error frame: {refusals} of {refused}"
    );
    // PROTOCOL.md §5: only the first 10 refusals in each second are answered.
    assert!(refusals <= 2 * 10, "{refusals}");
    server.wait_for_sessions(0).await;
    assert_eq!(server.node.counter_snapshot().closed_rate_limit, 1);
}

#[tokio::test]
async fn connections_not_yet_upgraded_are_capped_before_accept() {
    let server = TestServer::start(Config {
        max_handshakes: 2,
        ..config()
    })
    .await;
    // Sessions hand their permit back once upgraded: many fit under a cap of 2.
    let mut sessions = Vec::new();
    for _ in 0..5 {
        sessions.push(server.client().await);
    }

    // Two connections that never send a request hold both permits...
    let idle: Vec<_> =
        futures_util::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(server.addr)))
            .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so the next one waits in the backlog rather than being served.
    let waiting = tokio::spawn({
        let url = server.url();
        async move { wsproto_client::Client::connect(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served past the handshake cap");
    assert!(server.node.counter_snapshot().handshakes_full >= 1);

    drop(idle);
    let mut client = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a permit is free")
        .unwrap()
        .unwrap();
    client.welcome().await.unwrap();
    let metrics = common::http_get(server.addr, "/metrics").await;
    assert!(metrics.contains("wsproto_sessions 6"), "{metrics}");
    assert!(
        metrics.contains("wsproto_handshakes_full_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn one_address_cannot_hold_every_handshake_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(Config {
        max_handshakes_per_ip: 2,
        ..config()
    })
    .await;
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let connect_from = |source: IpAddr| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(source, 0)).unwrap();
        socket.connect(server.addr).await.unwrap()
    };
    // Two idle connections from one address hold its share...
    let _idle = [connect_from(local).await, connect_from(local).await];
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a third from it is answered 429 with Retry-After and closed
    // cleanly (no reset), before its request is even read,
    let mut third = connect_from(local).await;
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut answer)).await;
    assert!(matches!(read, Ok(Ok(_))), "closed cleanly: {read:?}");
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 429"), "{answer}");
    assert!(answer.contains("\r\nretry-after: 1\r\n"), "{answer}");
    assert_eq!(
        server
            .node
            .counter_snapshot()
            .refused_handshakes_per_address,
        1
    );
    // ...while another address is served.
    let (status, _) =
        raw_handshake(server.addr, "/ws", &[], Some("127.0.0.2".parse().unwrap())).await;
    assert_eq!(status, 101);
}

/// Publications over the rate limit in the middle of a burst are refused
/// in their place: every answer, PUBLISHED or RATE_LIMITED, comes in the
/// order the frames were sent (a run of publications included).
#[tokio::test]
async fn publications_over_the_limit_in_a_burst_are_answered_in_order() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let server = TestServer::start(Config {
        rate_limit: 0.2,
        rate_burst: 5,
        client_publish: vec!["feed.#".parse().unwrap()],
        ..config()
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .unwrap();
    for id in 1..=20u32 {
        let frame = common::publish_frame(id, "feed.x", id.to_string());
        ws.feed(Message::Binary(frame)).await.unwrap();
    }
    ws.flush().await.unwrap();
    let mut answered = Vec::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(500), ws.next()).await
    {
        let Message::Binary(data) = message else {
            continue;
        };
        let frame = Frame::decode(data).unwrap();
        if let Some(id) = frame.request_id {
            answered.push((id, frame.opcode));
        }
    }
    let published = answered
        .iter()
        .filter(|(_, op)| *op == opcode::PUBLISH)
        .count();
    let refused = answered
        .iter()
        .filter(|(_, op)| *op == opcode::ERROR)
        .count();
    // The burst's worth gets through; of the refusals, the first few a
    // second are answered (the rest only counted).
    assert_eq!(published, 5, "{answered:?}");
    assert!(refused > 0, "{answered:?}");
    let ids: Vec<u32> = answered.iter().map(|(id, _)| *id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "answers out of order: {ids:?}"
    );
}
