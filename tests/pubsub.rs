//! The push hub as clients and backends see it: every targeting case of the
//! Go original, rooms, presence, the publish API and permissions.

mod common;

use std::time::Duration;

use common::{config, TestServer, API_KEY};
use wsproto::{opcode, proto::v1, Config, ErrorCode, Frame};
use wsproto_client::{Client, ClientError};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

async fn publish(server: &TestServer, json: &str) -> serde_json::Value {
    let (status, body) = server.publish_api(Some(API_KEY), json).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn text_of(client: &mut Client) -> String {
    let delivery = client.delivery(WAIT).await.unwrap();
    String::from_utf8(delivery.data.to_vec()).unwrap()
}

async fn assert_quiet(client: &mut Client) {
    match client.recv_timeout(QUIET).await {
        Err(ClientError::Timeout(_)) => {}
        other => panic!("expected nothing, got {other:?}"),
    }
}

fn assert_error_code(result: Result<impl std::fmt::Debug, ClientError>, code: ErrorCode) {
    match result {
        Err(ClientError::ErrorFrame { code: got, .. }) => assert_eq!(got, code.as_u32()),
        other => panic!("expected {code}, got {other:?}"),
    }
}

/// Cases 1 and 2: a business type and everything beneath it; one type + id.
#[tokio::test]
async fn push_to_a_business_type_or_to_one_business_id() {
    let server = TestServer::start(config()).await;
    let mut temp42 = server.client_with("subscribe=rowdata.temp.42").await;
    let mut temp43 = server.client_with("subscribe=rowdata.temp.43").await;
    let mut hum42 = server.client_with("subscribe=rowdata.hum.42").await;
    let mut all_rowdata = server.client().await;
    all_rowdata.subscribe(&["rowdata.#"]).await.unwrap();

    let body = publish(
        &server,
        r#"{"topic": "rowdata.temp.#", "data": "all temp"}"#,
    )
    .await;
    assert_eq!(body["sessions"], 3);
    for client in [&mut temp42, &mut temp43, &mut all_rowdata] {
        let delivery = client.delivery(WAIT).await.unwrap();
        assert_eq!(delivery.topic, "rowdata.temp.#");
        assert_eq!(delivery.kind(), v1::delivery::Kind::Topic);
        assert_eq!(&delivery.data[..], b"all temp");
        assert!(delivery.sender.is_none(), "published by a backend");
    }
    assert_quiet(&mut hum42).await;

    let body = publish(
        &server,
        r#"{"topic": "rowdata.temp.42", "data": "only 42"}"#,
    )
    .await;
    assert_eq!(body["sessions"], 2);
    assert_eq!(text_of(&mut temp42).await, "only 42");
    assert_eq!(text_of(&mut all_rowdata).await, "only 42");
    assert_quiet(&mut temp43).await;
}

/// Case 3: alarms to every alarm subscriber, numbered per topic.
#[tokio::test]
async fn alarms_reach_every_alarm_subscriber_in_sequence() {
    let server = TestServer::start(config()).await;
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        subscribers.push(server.client_with("subscribe=alarm.%23").await);
    }
    let mut bystander = server.client_with("subscribe=rowdata.%23").await;
    for i in 1..=3 {
        publish(
            &server,
            &format!(r#"{{"topic": "alarm.fire", "data": "alarm {i}"}}"#),
        )
        .await;
    }
    for subscriber in &mut subscribers {
        for i in 1..=3 {
            let delivery = subscriber.delivery(WAIT).await.unwrap();
            assert_eq!(
                (delivery.seq, &delivery.data[..]),
                (i, format!("alarm {i}").as_bytes())
            );
        }
    }
    assert_quiet(&mut bystander).await;
}

/// A client that sends many PUBLISH frames at once has them handled as
/// runs, side by side: still numbered in the order sent, answered in that
/// order (a PING or an invalid frame in between included), and delivered
/// in that order.
#[tokio::test]
async fn publications_sent_in_one_burst_keep_their_order() {
    const COUNT: u32 = 200;
    let server = TestServer::start(Config {
        client_publish: vec!["feed.#".parse().unwrap()],
        ..config()
    })
    .await;
    let mut subscriber = server.client_with("subscribe=feed.x").await;
    let first = common::publish_in_one_burst(&server.url(), "feed.x", COUNT).await;
    assert_eq!(first, 1);
    for n in 0..COUNT {
        let delivery = subscriber.delivery(WAIT).await.unwrap();
        assert_eq!(
            (delivery.seq, &delivery.data[..]),
            (u64::from(n) + 1, n.to_string().as_bytes())
        );
    }
}

/// Case 4: one user, every session (device) they have open.
#[tokio::test]
async fn push_to_every_session_of_one_user() {
    let server = TestServer::start(config()).await;
    let mut phone = server.client_with("user=alice").await;
    let mut laptop = server.client_with("user=alice").await;
    let mut bob = server.client_with("user=bob").await;

    let body = publish(&server, r#"{"user": "alice", "data": "hi alice"}"#).await;
    assert_eq!(body["sessions"], 2);
    for device in [&mut phone, &mut laptop] {
        let delivery = device.delivery(WAIT).await.unwrap();
        assert_eq!(delivery.kind(), v1::delivery::Kind::Direct);
        assert_eq!(&delivery.data[..], b"hi alice");
    }
    assert_quiet(&mut bob).await;

    // The same from another client, which then shows as the sender.
    let send = v1::Send {
        user_id: "alice".into(),
        session_id: String::new(),
        data: "from bob".into(),
    };
    let sent: v1::Published = bob.request(opcode::SEND, &send).await.unwrap();
    assert_eq!(sent.sessions, 2);
    let delivery = phone.delivery(WAIT).await.unwrap();
    assert_eq!(delivery.sender.unwrap().user_id, "bob");
}

/// Case 5: a room broadcast reaches everyone but the sender, or everyone.
#[tokio::test]
async fn room_broadcast_excludes_the_sender_unless_asked() {
    let server = TestServer::start(config()).await;
    let mut clients = Vec::new();
    for user in ["ann", "ben", "cat"] {
        let mut client = server.client_with(&format!("user={user}")).await;
        client.join("lobby", false).await.unwrap();
        clients.push(client);
    }
    let mut outsider = server.client().await;

    let said = clients[0].say("lobby", "hello", false).await.unwrap();
    assert_eq!(
        (said.room.as_str(), said.seq, said.sessions),
        ("lobby", 1, 2)
    );
    for client in &mut clients[1..] {
        let delivery = client.delivery(WAIT).await.unwrap();
        assert_eq!(delivery.kind(), v1::delivery::Kind::Room);
        assert_eq!(delivery.room, "lobby");
        assert_eq!(delivery.sender.unwrap().user_id, "ann");
    }
    assert_quiet(&mut clients[0]).await;
    assert_quiet(&mut outsider).await;

    let said = clients[0].say("lobby", "echo me", true).await.unwrap();
    assert_eq!((said.seq, said.sessions), (2, 3));
    for client in &mut clients {
        assert_eq!(text_of(client).await, "echo me");
    }

    // Saying something in a room one has not joined is refused.
    assert_error_code(
        outsider.say("lobby", "let me in", false).await,
        ErrorCode::NotInRoom,
    );
}

/// Case 6: every connected client, subscribed or not.
#[tokio::test]
async fn broadcast_reaches_every_connected_client() {
    let server = TestServer::start(config()).await;
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(server.client_with(&format!("user=u{i}")).await);
    }
    let body = publish(
        &server,
        r#"{"broadcast": true, "data_base64": "AAEC", "opcode": 200}"#,
    )
    .await;
    assert_eq!(body["sessions"], 4);
    for client in &mut clients {
        let delivery = client.delivery(WAIT).await.unwrap();
        assert_eq!(delivery.kind(), v1::delivery::Kind::Broadcast);
        assert_eq!(
            (&delivery.data[..], delivery.opcode),
            (&[0u8, 1, 2][..], 200)
        );
        assert!(delivery.published_at_ms > 0);
    }
}

#[tokio::test]
async fn presence_lists_room_members_counts_subscribers_and_announces_changes() {
    let server = TestServer::start(config()).await;
    let mut ann = server.client_with("user=ann").await;
    let presence = ann.join("lobby", true).await.unwrap();
    assert_eq!(presence.count, 1);

    let mut ben = server.client_with("user=ben").await;
    let presence = ben.join("lobby", false).await.unwrap();
    let users: Vec<&str> = presence
        .members
        .iter()
        .map(|m| m.user_id.as_str())
        .collect();
    assert_eq!((presence.count, users), (2, vec!["ann", "ben"]));

    let event = ann.recv_timeout(WAIT).await.unwrap();
    assert_eq!(event.opcode, opcode::PRESENCE_EVENT);
    let event: v1::PresenceEvent = prost::Message::decode(event.payload).unwrap();
    assert_eq!(event.action(), v1::presence_event::Action::Join);
    assert_eq!(
        (event.member.unwrap().user_id.as_str(), event.count),
        ("ben", 2)
    );

    // Leaving by disconnecting is announced too.
    drop(ben);
    let event = ann.recv_timeout(WAIT).await.unwrap();
    let event: v1::PresenceEvent = prost::Message::decode(event.payload).unwrap();
    assert_eq!(
        (event.action(), event.count),
        (v1::presence_event::Action::Leave, 1)
    );

    let query = v1::PresenceRequest {
        room: "lobby".into(),
        topic: String::new(),
    };
    let presence: v1::Presence = ann.request(opcode::PRESENCE, &query).await.unwrap();
    assert_eq!(presence.count, 1);

    let _s1 = server.client_with("subscribe=rowdata.temp.42").await;
    let _s2 = server.client_with("subscribe=rowdata.%23").await;
    let query = v1::PresenceRequest {
        room: String::new(),
        topic: "rowdata.temp.42".into(),
    };
    let presence: v1::Presence = ann.request(opcode::PRESENCE, &query).await.unwrap();
    assert_eq!(presence.count, 2);
}

#[tokio::test]
async fn publish_api_refuses_bad_keys_and_bodies() {
    let server = TestServer::start(config()).await;
    let good = r#"{"topic": "a", "data": "x"}"#;
    assert_eq!(server.publish_api(None, good).await.0, 401);
    assert_eq!(server.publish_api(Some("wrong"), good).await.0, 401);
    let (status, body) = server.publish_api(Some(API_KEY), good).await;
    assert_eq!(
        (status, &body["sessions"], &body["seq"]),
        (200, &0.into(), &1.into())
    );

    for (bad, reason) in [
        ("not json", "invalid JSON"),
        (r#"{"data": "x"}"#, "exactly one target"),
        (
            r#"{"topic": "a", "user": "b", "data": "x"}"#,
            "exactly one target",
        ),
        (r#"{"topic": "a"}"#, "exactly one of data"),
        (
            r#"{"topic": "a", "data": "x", "data_base64": "eA=="}"#,
            "exactly one of data",
        ),
        (r#"{"topic": "a..b", "data": "x"}"#, "empty segment"),
        (r#"{"topic": "a", "data_base64": "!!"}"#, "not base64"),
        (
            r#"{"topic": "a", "data": "x", "extra": 1}"#,
            "unknown field",
        ),
    ] {
        let (status, body) = server.publish_api(Some(API_KEY), bad).await;
        assert_eq!(status, 400, "{bad}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(reason), "{bad}: {error}");
    }

    // PROTOCOL.md §11: a body over 1 MiB is refused with 413.
    let huge = format!(r#"{{"topic": "a", "data": "{}"}}"#, "x".repeat(1024 * 1024));
    assert_eq!(server.publish_api(Some(API_KEY), &huge).await.0, 413);
    assert_eq!(
        server.publish_api(None, &huge).await.0,
        401,
        "the key is checked first"
    );

    let off = TestServer::start(wsproto::Config {
        api_key: None,
        ..config()
    })
    .await;
    assert_eq!(off.publish_api(Some(API_KEY), good).await.0, 404);
}

#[tokio::test]
async fn clients_publish_only_where_permitted() {
    let server = TestServer::start(wsproto::Config {
        client_publish: vec!["chat.#".parse().unwrap()],
        ..config()
    })
    .await;
    let mut listener = server.client_with("subscribe=chat.%23").await;
    let mut publisher = server.client_with("user=pat").await;

    let published = publisher.publish("chat.general", "hi").await.unwrap();
    assert_eq!((published.seq, published.sessions), (1, 1));
    let delivery = listener.delivery(WAIT).await.unwrap();
    assert_eq!(delivery.sender.unwrap().user_id, "pat");

    assert_error_code(
        publisher.publish("alarm.fire", "fake").await,
        ErrorCode::PermissionDenied,
    );
    assert_error_code(
        publisher.publish("chat..x", "bad").await,
        ErrorCode::InvalidTopic,
    );
    assert_error_code(
        publisher.subscribe(&["a.#.b"]).await,
        ErrorCode::InvalidTopic,
    );
    assert_quiet(&mut listener).await;

    // By default nobody may publish over WebSocket.
    let locked = TestServer::start(config()).await;
    let mut client = locked.client().await;
    assert_error_code(
        client.publish("chat.general", "hi").await,
        ErrorCode::PermissionDenied,
    );
}

#[tokio::test]
async fn subscriptions_are_capped_and_bad_connect_urls_are_refused() {
    let server = TestServer::start(wsproto::Config {
        max_subscriptions: 2,
        ..config()
    })
    .await;
    let mut client = server.client().await;
    client.subscribe(&["a"]).await.unwrap();
    client.subscribe(&["a"]).await.unwrap();
    // All or nothing: "b" would fit, "c" would not, so neither is added.
    assert_error_code(
        client.subscribe(&["b", "c"]).await,
        ErrorCode::LimitExceeded,
    );
    let info: v1::Info = client
        .request(opcode::GET_INFO, &v1::InfoRequest::default())
        .await
        .unwrap();
    assert_eq!(server.node.counter_snapshot().limit_exceeded, 1);
    assert_eq!(info.session.unwrap().subscriptions, ["a"]);
    client.subscribe(&["b"]).await.unwrap();

    for query in [
        "subscribe=a..b",
        "user=",
        "subscribe=a&subscribe=b&subscribe=c",
    ] {
        match Client::connect(&format!("{}?{query}", server.url())).await {
            Err(ClientError::Refused { status, .. }) => assert_eq!(status, 400, "{query}"),
            other => panic!("{query}: expected 400, got {:?}", other.map(|_| ())),
        }
    }
}

#[tokio::test]
async fn unsubscribe_stops_deliveries() {
    let server = TestServer::start(config()).await;
    let mut client = server.client_with("subscribe=news").await;
    publish(&server, r#"{"topic": "news", "data": "one"}"#).await;
    assert_eq!(text_of(&mut client).await, "one");
    let unsubscribe = v1::Unsubscribe {
        topics: vec!["news".into()],
    };
    let ack = client
        .call(
            opcode::UNSUBSCRIBE,
            prost::Message::encode_to_vec(&unsubscribe),
        )
        .await
        .unwrap();
    assert_eq!(
        ack,
        Frame::new(opcode::ACK, bytes::Bytes::new()).with_request_id(ack.request_id)
    );
    let body = publish(&server, r#"{"topic": "news", "data": "two"}"#).await;
    assert_eq!(body["sessions"], 0);
    assert_quiet(&mut client).await;
}

/// Two servers built with one shared broker act as one deployment: a
/// publication on either reaches subscribers on both, numbered once, and
/// the reply counts the nodes that took it.
#[tokio::test]
async fn servers_sharing_a_broker_deliver_to_each_others_subscribers() {
    let broker: std::sync::Arc<dyn wsproto::broker::Broker> =
        std::sync::Arc::new(wsproto::broker::MemoryBroker::new());
    let config = || wsproto::Config {
        client_publish: vec!["alarm.#".parse().unwrap()],
        ..config()
    };
    let router = wsproto::handlers::builtin;
    let a = TestServer::with_broker(config(), router(), Some(broker.clone())).await;
    let b = TestServer::with_broker(config(), router(), Some(broker)).await;
    let mut on_a = a.client_with("subscribe=alarm.%23").await;
    let mut on_b = b.client_with("subscribe=alarm.fire").await;
    let mut publisher = b.client().await;

    for n in 1..=3u64 {
        let published = publisher.publish("alarm.fire", "smoke").await.unwrap();
        assert_eq!((published.seq, published.nodes), (n, 2));
        for client in [&mut on_a, &mut on_b] {
            let delivery = client.delivery(Duration::from_secs(5)).await.unwrap();
            assert_eq!((delivery.topic.as_str(), delivery.seq), ("alarm.fire", n));
        }
    }
    let (status, body) = a
        .publish_api(Some(API_KEY), r#"{"topic": "alarm.fire", "data": "x"}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["seq"].as_u64(), body["nodes"].as_u64()),
        (Some(4), Some(2))
    );
    assert_eq!(on_b.delivery(Duration::from_secs(5)).await.unwrap().seq, 4);
}
