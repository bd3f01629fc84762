//! Positions, history and recovery after a reconnect, as a client sees
//! them: real server, real WebSocket clients, the client library's
//! `Subscriber` doing what an app would.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{config, delivery, next_message, TestServer, API_KEY};
use wsproto::{
    broker::{HistoryPolicy, Publication, Target},
    opcode,
    proto::v1,
    topic::Topic,
    Config,
};
use wsproto_client::{Event, Positions, Subscriber};

fn with_history(pattern: &str, max_len: usize) -> Config {
    Config {
        history: vec![(
            Topic::parse(pattern).unwrap(),
            HistoryPolicy {
                max_len,
                max_age: None,
            },
        )],
        ..config()
    }
}

async fn publish(server: &TestServer, topic: &str, data: String) -> u64 {
    let target = Target::Topic(Topic::parse(topic).unwrap());
    let publication = Publication::new(target, None, Bytes::from(data));
    server.node.publish(publication).await.unwrap().seq
}

/// Connects and returns the first report of the streams.
async fn subscribed(subscriber: &mut Subscriber) -> Vec<v1::StreamState> {
    match subscriber.next().await.unwrap() {
        Event::Subscribed { streams, .. } => streams,
        other => panic!("expected the subscription report, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_that_missed_1000_messages_gets_all_of_them_in_order_then_live_ones() {
    let server = TestServer::start(with_history("alarms.#", 2000)).await;
    let mut subscriber = Subscriber::new(server.url(), vec!["alarms.#".into()], vec![]);
    let streams = subscribed(&mut subscriber).await;
    assert!(streams.is_empty(), "a pattern names no stream: {streams:?}");
    publish(&server, "alarms.b3", "first".into()).await;
    assert_eq!(delivery(&mut subscriber).await.seq, 1);

    // Offline while 1,000 alarms are published.
    subscriber.disconnect();
    server.wait_for_sessions(0).await;
    for n in 2..=1001 {
        publish(&server, "alarms.b3", format!("alarm {n}")).await;
    }
    let started = std::time::Instant::now();
    let Event::Subscribed {
        streams,
        reconnected,
    } = subscriber.next().await.unwrap()
    else {
        panic!("expected the recovery report");
    };
    assert!(reconnected);
    assert_eq!(streams.len(), 1);
    assert!(streams[0].recovered, "{streams:?}");
    assert_eq!(streams[0].replayed, 1000);
    for n in 2..=1001 {
        let delivery = delivery(&mut subscriber).await;
        assert_eq!((delivery.seq, delivery.replayed), (n, true));
        assert_eq!(delivery.data, format!("alarm {n}"));
    }
    let recovery = started.elapsed();
    publish(&server, "alarms.b3", "live".into()).await;
    let live = delivery(&mut subscriber).await;
    assert_eq!((live.seq, live.replayed), (1002, false));
    assert_eq!(subscriber.duplicates(), 0);
    eprintln!("recovered 1,000 messages in {recovery:?}");
}

#[tokio::test]
async fn a_range_history_no_longer_holds_is_announced_never_a_silent_hole() {
    let server = TestServer::start(with_history("alarms.#", 100)).await;
    let mut subscriber = Subscriber::new(server.url(), vec!["alarms.b3".into()], vec![]);
    let streams = subscribed(&mut subscriber).await;
    let epoch = streams[0].position.clone().unwrap().epoch;
    publish(&server, "alarms.b3", "seen".into()).await;
    delivery(&mut subscriber).await;

    subscriber.disconnect();
    server.wait_for_sessions(0).await;
    for n in 2..=1001 {
        publish(&server, "alarms.b3", format!("alarm {n}")).await;
    }
    let streams = subscribed(&mut subscriber).await;
    assert!(!streams[0].recovered);
    match next_message(&mut subscriber).await {
        Event::Gap(gap) => {
            assert_eq!(
                (gap.topic.as_str(), gap.epoch.as_str()),
                ("alarms.b3", &*epoch)
            );
            assert_eq!(
                (gap.from_seq, gap.to_seq, gap.reason.as_str()),
                (2, 901, "history")
            );
        }
        other => panic!("expected a GAP, got {other:?}"),
    }
    // What history still has follows, in order.
    for n in 902..=1001 {
        assert_eq!(delivery(&mut subscriber).await.seq, n);
    }
}

#[tokio::test]
async fn without_history_a_missed_range_is_announced_too() {
    let server = TestServer::start(config()).await;
    let mut subscriber = Subscriber::new(server.url(), vec!["news".into()], vec![]);
    subscribed(&mut subscriber).await;
    subscriber.disconnect();
    server.wait_for_sessions(0).await;
    publish(&server, "news", "missed".into()).await;
    let streams = subscribed(&mut subscriber).await;
    assert!(!streams[0].recovered);
    let Event::Gap(gap) = next_message(&mut subscriber).await else {
        panic!("expected a GAP");
    };
    assert_eq!((gap.from_seq, gap.to_seq), (1, 1));
}

#[tokio::test]
async fn reconnecting_while_messages_keep_coming_loses_and_doubles_nothing() {
    let server = std::sync::Arc::new(TestServer::start(with_history("ticks", 10_000)).await);
    let mut subscriber = Subscriber::new(server.url(), vec!["ticks".into()], vec![]);
    subscribed(&mut subscriber).await;
    let total = 3000u64;
    let publisher = {
        let server = server.clone();
        tokio::spawn(async move {
            for n in 1..=total {
                publish(&server, "ticks", n.to_string()).await;
                if n % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let mut expected = 1;
    let mut reconnects = 0;
    while expected <= total {
        match tokio::time::timeout(Duration::from_secs(10), subscriber.next())
            .await
            .expect("an event within 10 s")
            .unwrap()
        {
            Event::Delivery(delivery) => {
                assert_eq!(delivery.seq, expected, "in order, no hole, no duplicate");
                expected += 1;
                // Drop the connection every 400 messages, mid-stream.
                if expected % 400 == 0 {
                    subscriber.disconnect();
                    reconnects += 1;
                }
            }
            Event::Subscribed { streams, .. } => {
                assert!(streams.iter().all(|s| s.recovered), "{streams:?}")
            }
            Event::Gap(gap) => panic!("unexpected gap {gap:?}"),
            Event::Frame(_) | Event::Disconnected { .. } => {}
        }
    }
    publisher.await.unwrap();
    assert!(reconnects >= 7);
    eprintln!(
        "{total} messages over {reconnects} reconnects; {} duplicates dropped by the client",
        subscriber.duplicates()
    );
}

#[tokio::test]
async fn a_restarted_server_is_a_new_epoch_and_the_client_is_told() {
    let first = TestServer::start(with_history("alarms.#", 100)).await;
    let mut subscriber = Subscriber::new(first.url(), vec!["alarms.#".into()], vec![]);
    subscribed(&mut subscriber).await;
    for n in 1..=5 {
        publish(&first, "alarms.b3", format!("old {n}")).await;
        delivery(&mut subscriber).await;
    }
    let saved: Positions = subscriber.positions().clone();
    subscriber.close().await;
    first.shutdown().await.unwrap();

    // A new process: the same topic starts again at 1, in another epoch.
    let second = TestServer::start(with_history("alarms.#", 100)).await;
    publish(&second, "alarms.b3", "new 1".into()).await;
    let mut subscriber =
        Subscriber::new(second.url(), vec!["alarms.#".into()], vec![]).with_positions(saved);
    let streams = subscribed(&mut subscriber).await;
    assert_eq!(streams.len(), 1);
    assert!(!streams[0].recovered);
    let Event::Gap(gap) = next_message(&mut subscriber).await else {
        panic!("expected a GAP");
    };
    assert_eq!((gap.from_seq, gap.reason.as_str()), (6, "epoch"));
    // Not mistaken for a duplicate of the old seq 1.
    let new = delivery(&mut subscriber).await;
    assert_eq!((new.seq, new.data.as_ref()), (1, b"new 1".as_slice()));
    assert_ne!(new.epoch, gap.epoch);
}

#[tokio::test]
async fn a_room_member_recovers_what_was_said_while_away() {
    let server = TestServer::start(with_history("chat.#", 100)).await;
    let mut member = Subscriber::new(server.url(), vec![], vec!["chat.lobby".into()]);
    let streams = subscribed(&mut member).await;
    assert_eq!(streams[0].room, "chat.lobby");
    member.disconnect();
    server.wait_for_sessions(0).await;

    let mut speaker = server.client().await;
    speaker.join("chat.lobby", false).await.unwrap();
    for line in ["hello", "anyone?"] {
        speaker.say("chat.lobby", line, false).await.unwrap();
    }
    let streams = subscribed(&mut member).await;
    assert!(streams[0].recovered, "{streams:?}");
    for line in ["hello", "anyone?"] {
        let said = delivery(&mut member).await;
        assert_eq!(
            (said.room.as_str(), said.data.as_ref()),
            ("chat.lobby", line.as_bytes())
        );
    }
}

#[tokio::test]
async fn since_must_name_a_stream_the_subscription_covers() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;
    let subscribe = v1::Subscribe {
        topics: vec!["a.*".into()],
        since: [(
            "b.c".to_owned(),
            v1::Position {
                epoch: "e".into(),
                seq: 1,
            },
        )]
        .into(),
        positions: false,
    };
    let reply = client
        .call(opcode::SUBSCRIBE, prost::Message::encode_to_vec(&subscribe))
        .await
        .unwrap();
    common::assert_error(&reply, wsproto::ErrorCode::BadPayload, opcode::SUBSCRIBE);
    let covered = Topic::parse("a.x").unwrap();
    assert_eq!(
        server.hub.subscriber_count(&covered),
        0,
        "nothing subscribed"
    );
}

async fn history_api(
    server: &TestServer,
    key: Option<&str>,
    json: &str,
) -> (u16, serde_json::Value) {
    let url = format!("http://{}/api/history", server.addr);
    let (status, body) = wsproto_client::http::post_json(&url, key, json)
        .await
        .unwrap();
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status.as_u16(), body)
}

#[tokio::test]
async fn backends_read_history_over_http() {
    let server = TestServer::start(with_history("rowdata.#", 3)).await;
    for n in 1..=5 {
        let (status, body) = server
            .publish_api(
                Some(API_KEY),
                &format!(r#"{{"topic": "rowdata.t1", "data": "v{n}"}}"#),
            )
            .await;
        assert_eq!((status, body["seq"].as_u64()), (200, Some(n)));
    }
    let (status, all) = history_api(&server, Some(API_KEY), r#"{"topic": "rowdata.t1"}"#).await;
    assert_eq!(status, 200, "{all}");
    let epoch = all["epoch"].as_str().unwrap().to_owned();
    assert_eq!(all["top"], 5);
    let seqs: Vec<u64> = all["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [3, 4, 5], "the last 3 kept");
    assert_eq!(all["recovered"], false, "1 and 2 are gone");
    assert_eq!(all["publications"][0]["data"], "v3");

    let since = |epoch: &str, seq: u64| {
        format!(
            r#"{{"topic": "rowdata.t1", "since": {{"epoch": "{epoch}", "seq": {seq}}}, "limit": 1}}"#
        )
    };
    let (_, page) = history_api(&server, Some(API_KEY), &since(&epoch, 3)).await;
    assert_eq!(
        (
            page["recovered"].as_bool(),
            page["publications"][0]["seq"].as_u64()
        ),
        (Some(true), Some(4))
    );
    let (_, other) = history_api(&server, Some(API_KEY), &since("other", 3)).await;
    assert_eq!(other["recovered"], false);

    let (status, _) = history_api(&server, None, r#"{"topic": "rowdata.t1"}"#).await;
    assert_eq!(status, 401);
    for bad in [
        r#"{"topic": "a..b"}"#,
        r#"{}"#,
        r#"{"topic": "a", "limit": 0}"#,
        r#"{"room": "a.*"}"#,
    ] {
        let (status, body) = history_api(&server, Some(API_KEY), bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[tokio::test]
async fn a_publish_retried_with_its_idempotency_key_publishes_once() {
    let server = TestServer::start(config()).await;
    let mut subscriber = server.client_with("subscribe=orders").await;
    let url = format!("http://{}/api/publish", server.addr);
    let body = r#"{"topic": "orders", "data": "order 1"}"#;
    let mut answers = Vec::new();
    for _ in 0..3 {
        let (status, answer) = wsproto_client::http::post_json_with(
            &url,
            Some(API_KEY),
            body,
            &[("Idempotency-Key", "order-1")],
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        answers.push(serde_json::from_slice::<serde_json::Value>(&answer).unwrap());
    }
    assert_eq!(answers[0]["seq"], 1);
    assert_eq!(answers[0].get("duplicate"), None);
    for retry in &answers[1..] {
        assert_eq!(
            (&retry["seq"], &retry["epoch"]),
            (&answers[0]["seq"], &answers[0]["epoch"])
        );
        assert_eq!(retry["duplicate"], true);
    }
    assert_eq!(
        subscriber
            .delivery(Duration::from_secs(5))
            .await
            .unwrap()
            .seq,
        1
    );
    assert!(
        subscriber
            .recv_timeout(Duration::from_millis(200))
            .await
            .is_err(),
        "once"
    );
    for bad in ["", "has space", &"x".repeat(129)] {
        let (status, _) = wsproto_client::http::post_json_with(
            &url,
            Some(API_KEY),
            body,
            &[("Idempotency-Key", bad)],
        )
        .await
        .unwrap();
        assert_eq!(status, 400, "{bad:?}");
    }
}

#[tokio::test]
async fn a_device_that_lost_its_positions_resumes_from_what_it_acknowledged() {
    let server = TestServer::start(with_history("alarm.#", 100)).await;
    let mut phone =
        Subscriber::new(server.url(), vec!["alarm.#".into()], vec![]).with_device("phone-1");
    subscribed(&mut phone).await;
    for n in 1..=5 {
        publish(&server, "alarm.b3", format!("alarm {n}")).await;
    }
    for n in 1..=5 {
        assert_eq!(delivery(&mut phone).await.seq, n);
    }
    // The app has processed all five; the server keeps that for phone-1.
    phone.acknowledge().await;
    phone.close().await;
    server.wait_for_sessions(0).await;
    for n in 6..=8 {
        publish(&server, "alarm.b3", format!("alarm {n}")).await;
    }

    // The app restarts with no positions of its own: the device's
    // acknowledged ones bring it back where it was.
    let mut phone =
        Subscriber::new(server.url(), vec!["alarm.#".into()], vec![]).with_device("phone-1");
    let streams = subscribed(&mut phone).await;
    assert_eq!(streams.len(), 1, "{streams:?}");
    assert!(
        streams[0].recovered && streams[0].replayed == 3,
        "{streams:?}"
    );
    for n in 6..=8 {
        assert_eq!(delivery(&mut phone).await.data, format!("alarm {n}"));
    }
    // Another device of no acknowledgements starts fresh.
    let mut tablet =
        Subscriber::new(server.url(), vec!["alarm.#".into()], vec![]).with_device("tablet");
    assert!(subscribed(&mut tablet).await.is_empty());

    // Acknowledging needs a device.
    let mut anonymous = server.client().await;
    let ack = v1::Acknowledge {
        streams: vec![v1::StreamAck {
            topic: "alarm.b3".into(),
            room: String::new(),
            position: Some(v1::Position {
                epoch: "e".into(),
                seq: 1,
            }),
            user: false,
        }],
    };
    let reply = anonymous
        .call(opcode::ACKNOWLEDGE, prost::Message::encode_to_vec(&ack))
        .await
        .unwrap();
    common::assert_error(&reply, wsproto::ErrorCode::BadPayload, opcode::ACKNOWLEDGE);
}
