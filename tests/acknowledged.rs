//! Acknowledged delivery: critical topics and users' critical pushes, as a
//! device sees them. Real server, real WebSocket clients; the raw client
//! where the test must control exactly what is acknowledged, the
//! `Subscriber` where it does what an app would.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{config, delivery, next_message, TestServer, API_KEY};
use prost::Message as _;
use wsproto::{
    broker::{BrokerError, HistoryPolicy, Publication, Target},
    opcode,
    proto::v1,
    topic::Topic,
    Config,
};
use wsproto_client::{Client, ClientError, Event, Subscriber};

/// `alarm.#` critical with history, and acknowledgements due quickly.
fn critical_alarms() -> Config {
    Config {
        topic_policies: vec![(
            Topic::parse("alarm.#").unwrap(),
            "critical".parse().unwrap(),
        )],
        history: vec![(
            Topic::parse("alarm.#").unwrap(),
            HistoryPolicy {
                max_len: 100,
                max_age: None,
            },
        )],
        ack_timeout: Duration::from_millis(300),
        ..config()
    }
}

async fn publish(server: &TestServer, topic: &str, data: &str) -> u64 {
    let target = Target::Topic(Topic::parse(topic).unwrap());
    let publication = Publication::new(target, None, Bytes::from(data.to_owned()));
    server.node.publish(publication).await.unwrap().seq
}

async fn push(server: &TestServer, user: &str, data: &str, critical: bool) -> serde_json::Value {
    let json = serde_json::json!({"user": user, "data": data, "critical": critical});
    let (status, body) = server.publish_api(Some(API_KEY), &json.to_string()).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The next DELIVERY (other frames are skipped).
async fn next_delivery(client: &mut Client) -> v1::Delivery {
    loop {
        let frame = client
            .recv_timeout(Duration::from_secs(10))
            .await
            .expect("a frame within 10 s");
        if frame.opcode == opcode::DELIVERY {
            return v1::Delivery::decode(frame.payload).unwrap();
        }
    }
}

/// Asserts nothing arrives for `quiet`.
async fn assert_quiet(client: &mut Client, quiet: Duration) {
    match client.recv_timeout(quiet).await {
        Err(ClientError::Timeout(_)) => {}
        other => panic!("expected nothing for {quiet:?}, got {other:?}"),
    }
}

fn topic_ack(delivery: &v1::Delivery) -> v1::Acknowledge {
    v1::Acknowledge {
        streams: vec![v1::StreamAck {
            topic: delivery.topic.clone(),
            position: Some(v1::Position {
                epoch: delivery.epoch.clone(),
                seq: delivery.seq,
            }),
            ..Default::default()
        }],
    }
}

async fn acknowledge(client: &mut Client, ack: &v1::Acknowledge) {
    let reply = client
        .call(opcode::ACKNOWLEDGE, ack.encode_to_vec())
        .await
        .unwrap();
    assert_eq!(reply.opcode, opcode::ACK, "{reply:?}");
}

#[tokio::test]
async fn an_unacknowledged_critical_delivery_comes_again_until_the_device_acknowledges_it() {
    let server = TestServer::start(critical_alarms()).await;
    let mut phone = server
        .client_with("user=ann&device=phone&subscribe=alarm.%23")
        .await;
    let mut browser = server.client_with("user=ann&subscribe=alarm.%23").await;
    server.wait_for_sessions(2).await;

    publish(&server, "alarm.fire", "smoke in b3").await;
    let first = next_delivery(&mut phone).await;
    assert_eq!((first.seq, first.redelivered), (1, false));
    assert_eq!(next_delivery(&mut browser).await.seq, 1);

    // Not acknowledged within 300 ms: the same position again, marked.
    let again = next_delivery(&mut phone).await;
    assert!(again.redelivered, "{again:?}");
    assert_eq!(
        (again.seq, &again.epoch, &again.data),
        (first.seq, &first.epoch, &first.data)
    );
    acknowledge(&mut phone, &topic_ack(&first)).await;
    assert_quiet(&mut phone, Duration::from_millis(1500)).await;
    assert!(server.node.counter_snapshot().redelivered >= 1);

    // A session without a device acknowledges nothing and is owed nothing.
    assert_quiet(&mut browser, Duration::from_millis(100)).await;

    // Non-critical topics are never redelivered, even to a device.
    let mut phone2 = server
        .client_with("user=ann&device=phone2&subscribe=news")
        .await;
    server.wait_for_sessions(3).await;
    publish(&server, "news", "hello").await;
    assert!(!next_delivery(&mut phone2).await.redelivered);
    assert_quiet(&mut phone2, Duration::from_millis(1000)).await;
}

#[tokio::test]
async fn a_device_past_its_window_is_closed_and_recovers_what_it_did_not_acknowledge() {
    let server = TestServer::start(Config {
        ack_window: 3,
        ack_timeout: Duration::from_secs(30),
        ..critical_alarms()
    })
    .await;
    let mut phone = server
        .client_with("user=ann&device=phone&subscribe=alarm.%23")
        .await;
    server.wait_for_sessions(1).await;
    publish(&server, "alarm.fire", "1").await;
    publish(&server, "alarm.fire", "2").await;
    next_delivery(&mut phone).await;
    let second = next_delivery(&mut phone).await;
    acknowledge(&mut phone, &topic_ack(&second)).await;

    // Three in flight fill the window; the fourth closes the session.
    for n in 3..=6 {
        publish(&server, "alarm.fire", &n.to_string()).await;
    }
    let mut seen = Vec::new();
    let closed = loop {
        match phone.recv_timeout(Duration::from_secs(10)).await {
            Ok(frame) if frame.opcode == opcode::DELIVERY => {
                seen.push(v1::Delivery::decode(frame.payload).unwrap().seq)
            }
            Ok(_) => {}
            Err(err) => break err,
        }
    };
    assert_eq!(seen, [3, 4, 5]);
    match closed {
        ClientError::Closed { code: 4003, .. } => {}
        other => panic!("expected close 4003, got {other:?}"),
    }
    server.wait_for_sessions(0).await;
    assert_eq!(server.node.counter_snapshot().closed_ack_window, 1);

    // Back as the same device with no positions of its own: everything
    // after what it acknowledged (2), in order, once.
    let mut phone = Subscriber::new(
        format!("{}?user=ann", server.url()),
        vec!["alarm.#".into()],
        vec![],
    )
    .with_device("phone");
    for n in 3..=6 {
        let delivery = delivery(&mut phone).await;
        assert_eq!((delivery.seq, delivery.replayed), (n, true));
    }
    phone.close().await;
}

#[tokio::test]
async fn critical_pushes_reach_every_device_of_the_user_and_each_recovers_what_it_missed() {
    let server = TestServer::start(Config {
        ack_timeout: Duration::from_secs(30),
        ..config()
    })
    .await;
    let url = format!("{}?user=ann", server.url());
    let mut phone = Subscriber::new(url.clone(), vec![], vec![]).with_device("phone");

    // Pushed before the phone was ever seen: not its business.
    push(&server, "ann", "before", true).await;
    let first_connect = next_message(&mut phone);
    let published = async {
        server.wait_for_sessions(1).await;
        push(&server, "ann", "p1", true).await
    };
    let (event, answer) = tokio::join!(first_connect, published);
    let Event::Delivery(p1) = event else {
        panic!("expected p1, got {event:?}")
    };
    assert_eq!(answer["seq"], 2, "{answer}");
    assert_eq!(p1.kind, i32::from(v1::delivery::Kind::Direct));
    assert_eq!((p1.seq, p1.data.as_ref()), (2, &b"p1"[..]));
    // (Live, or replayed if it beat the phone's recovery: either way once.)
    assert!(!p1.epoch.is_empty());

    // An ordinary push is not numbered, kept or acknowledged.
    let plain = push(&server, "ann", "plain", false).await;
    assert_eq!(plain["seq"], 0, "{plain}");
    assert_eq!(delivery(&mut phone).await.seq, 0);
    phone.close().await;
    server.wait_for_sessions(0).await;

    // Two pushes while the phone is away; a tablet appears meanwhile and
    // starts from where the stream stands.
    push(&server, "ann", "p2", true).await;
    let mut tablet = Subscriber::new(url.clone(), vec![], vec![]).with_device("tablet");
    let tablet_first = next_message(&mut tablet);
    let published = async {
        server.wait_for_sessions(1).await;
        push(&server, "ann", "p3", true).await
    };
    let (event, _) = tokio::join!(tablet_first, published);
    match event {
        Event::Delivery(d) => assert_eq!(d.seq, 4),
        other => panic!("expected p3 live, got {other:?}"),
    }

    // The phone, back with no positions of its own, gets both from its
    // acknowledged position, then live ones with the tablet.
    let mut phone = Subscriber::new(url.clone(), vec![], vec![]).with_device("phone");
    for (seq, data) in [(3, "p2"), (4, "p3")] {
        let missed = delivery(&mut phone).await;
        assert_eq!(
            (missed.seq, missed.data.as_ref(), missed.replayed),
            (seq, data.as_bytes(), true)
        );
    }
    push(&server, "ann", "p4", true).await;
    assert_eq!(delivery(&mut phone).await.seq, 5);
    assert_eq!(delivery(&mut tablet).await.seq, 5);
    assert_eq!(phone.duplicates(), 0);

    // Backends read a user's stream like any other.
    let url = format!("http://{}/api/history", server.addr);
    let (status, body) = wsproto_client::http::post_json(&url, Some(API_KEY), r#"{"user": "ann"}"#)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status.as_u16(), 200, "{body}");
    let kept: Vec<&str> = body["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["before", "p1", "p2", "p3", "p4"]);
    phone.close().await;
    tablet.close().await;
}

#[tokio::test]
async fn a_user_stream_without_history_announces_what_the_device_missed() {
    let server = TestServer::start(Config {
        user_history: None,
        ..config()
    })
    .await;
    let url = format!("{}?user=ann", server.url());
    let mut phone = Subscriber::new(url.clone(), vec![], vec![]).with_device("phone");
    let first = next_message(&mut phone);
    let published = async {
        server.wait_for_sessions(1).await;
        push(&server, "ann", "p1", true).await
    };
    tokio::join!(first, published);
    phone.close().await;
    server.wait_for_sessions(0).await;
    push(&server, "ann", "p2", true).await;

    let mut phone = Subscriber::new(url, vec![], vec![]).with_device("phone");
    match next_message(&mut phone).await {
        Event::Gap(gap) => {
            assert!(gap.user, "{gap:?}");
            assert_eq!(
                (gap.from_seq, gap.to_seq, gap.reason.as_str()),
                (2, 2, "history")
            );
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    phone.close().await;
}

#[tokio::test]
async fn critical_applies_to_user_pushes_only() {
    let server = TestServer::start(config()).await;
    let (status, body) = server
        .publish_api(
            Some(API_KEY),
            r#"{"topic": "alarm.fire", "data": "x", "critical": true}"#,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("--topic-policy"),
        "{body}"
    );

    // An anonymous session has no user stream to acknowledge.
    let mut anonymous = server.client_with("device=phone").await;
    let ack = v1::Acknowledge {
        streams: vec![v1::StreamAck {
            user: true,
            position: Some(v1::Position {
                epoch: "e".into(),
                seq: 1,
            }),
            ..Default::default()
        }],
    };
    let reply = anonymous
        .call(opcode::ACKNOWLEDGE, ack.encode_to_vec())
        .await
        .unwrap();
    common::assert_error(&reply, wsproto::ErrorCode::BadPayload, opcode::ACKNOWLEDGE);
}

/// A memory broker whose device positions cannot be read, as a cluster
/// node's are while Redis is away.
struct Unreadable(wsproto::broker::MemoryBroker);

impl wsproto::broker::Broker for Unreadable {
    fn register_event_handler(
        &self,
        handler: std::sync::Weak<dyn wsproto::broker::BrokerEventHandler>,
    ) {
        self.0.register_event_handler(handler)
    }

    fn publish(
        &self,
        publication: Publication,
    ) -> wsproto::broker::BoxFuture<'_, Result<wsproto::broker::Published, BrokerError>> {
        self.0.publish(publication)
    }

    fn history<'a>(
        &'a self,
        stream: &'a Target,
        since: Option<&'a wsproto::broker::Position>,
        limit: usize,
    ) -> wsproto::broker::BoxFuture<'a, Result<wsproto::broker::History, BrokerError>> {
        self.0.history(stream, since, limit)
    }

    fn save_acknowledged<'a>(
        &'a self,
        device: &'a str,
        acks: &'a [(String, wsproto::broker::Position)],
    ) -> wsproto::broker::BoxFuture<'a, Result<(), BrokerError>> {
        self.0.save_acknowledged(device, acks)
    }

    fn acknowledged<'a>(
        &'a self,
        _device: &'a str,
    ) -> wsproto::broker::BoxFuture<
        'a,
        Result<std::collections::HashMap<String, wsproto::broker::Position>, BrokerError>,
    > {
        Box::pin(async { Err(BrokerError::Unavailable("backend away".into())) })
    }
}

#[tokio::test]
async fn a_device_whose_position_cannot_be_read_is_told_to_come_back_not_skipped() {
    let broker = std::sync::Arc::new(Unreadable(wsproto::broker::MemoryBroker::new()));
    let router = wsproto::handlers::builtin();
    let server = TestServer::with_broker(config(), router, Some(broker)).await;

    // A device of a user: its user stream cannot be recovered, so 1013.
    let mut phone = Client::connect(&format!("{}?user=ann&device=phone", server.url()))
        .await
        .unwrap();
    let closed = loop {
        match phone.recv_timeout(Duration::from_secs(10)).await {
            Ok(_) => continue,
            Err(err) => break err,
        }
    };
    match closed {
        ClientError::Closed { code: 1013, .. } => {}
        other => panic!("expected close 1013, got {other:?}"),
    }

    // An anonymous device's SUBSCRIBE is refused, not served as if it had
    // acknowledged nothing.
    let mut tablet = server.client_with("device=tablet").await;
    let subscribe = v1::Subscribe {
        topics: vec!["alarm.#".into()],
        ..Default::default()
    };
    let reply = tablet
        .call(opcode::SUBSCRIBE, subscribe.encode_to_vec())
        .await
        .unwrap();
    common::assert_error(&reply, wsproto::ErrorCode::Unavailable, opcode::SUBSCRIBE);
}
