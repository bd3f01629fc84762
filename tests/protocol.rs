//! The protocol as a client sees it: built-in opcodes and every bad input.

mod common;

use bytes::Bytes;
use common::{assert_error, config, TestServer};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;
use wsproto::{opcode, proto::v1, ErrorCode, Frame};
use wsproto_client::ClientError;

#[tokio::test]
async fn welcome_opens_every_session() {
    let server = TestServer::start(config()).await;
    let mut client = wsproto_client::Client::connect(&server.url())
        .await
        .unwrap();
    let welcome = client.welcome().await.unwrap();
    assert!(!welcome.session_id.is_empty());
    assert_eq!(welcome.protocol_version, wsproto::PROTOCOL_VERSION);
    assert_eq!(welcome.max_message_size, 64 * 1024);
}

#[tokio::test]
async fn echo_returns_the_payload_with_and_without_request_id() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;

    client
        .send(&Frame::new(opcode::ECHO, "我们都好"))
        .await
        .unwrap();
    assert_eq!(
        client.recv().await.unwrap(),
        Frame::new(opcode::ECHO, "我们都好")
    );

    let reply = client
        .call(opcode::ECHO, vec![0u8, 1, 2, 255])
        .await
        .unwrap();
    assert_eq!(reply.opcode, opcode::ECHO);
    assert_eq!(&reply.payload[..], &[0, 1, 2, 255]);
    assert!(reply.request_id.is_some());

    let empty = client.call(opcode::ECHO, Bytes::new()).await.unwrap();
    assert!(empty.payload.is_empty());
}

#[tokio::test]
async fn add_friend_keeps_a_list_per_session() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;

    let reply = client.call(opcode::ADD_FRIEND, "我们都好").await.unwrap();
    let added = v1::FriendAdded::decode(reply.payload).unwrap();
    assert_eq!(
        added,
        v1::FriendAdded {
            name: "我们都好".into(),
            friend_count: 1,
            already_friends: false
        }
    );
    let again = v1::FriendAdded::decode(
        client
            .call(opcode::ADD_FRIEND, " 我们都好 ")
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    assert!(again.already_friends);
    assert_eq!(again.friend_count, 1);
    client.call(opcode::ADD_FRIEND, "bob").await.unwrap();

    let request = v1::InfoRequest {
        include_friends: true,
    }
    .encode_to_vec();
    let info = v1::Info::decode(
        client
            .call(opcode::GET_INFO, request)
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    let session = info.session.unwrap();
    assert_eq!(session.friends, ["我们都好", "bob"]);
    assert_eq!(session.friend_count, 2);

    // Another session has its own (empty) list.
    let mut other = server.client().await;
    let info = v1::Info::decode(
        other
            .call(opcode::GET_INFO, Bytes::new())
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    assert_eq!(info.session.unwrap().friend_count, 0);
}

#[tokio::test]
async fn get_info_describes_server_and_session() {
    let server = TestServer::start(config()).await;
    let mut client = wsproto_client::Client::connect(&server.url())
        .await
        .unwrap();
    let welcome = client.welcome().await.unwrap();
    let _second = server.client().await;

    let info = v1::Info::decode(
        client
            .call(opcode::GET_INFO, Bytes::new())
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    assert_eq!(info.server, wsproto::SERVER_NAME);
    assert_eq!(info.sessions, 2);
    let session = info.session.unwrap();
    assert_eq!(session.session_id, welcome.session_id);
    assert!(session.remote_addr.starts_with("127.0.0.1:"));
    assert_eq!(session.frames_received, 1);
    assert!(session.friends.is_empty(), "friends only when asked for");
}

#[tokio::test]
async fn ping_opcode_answers_pong_with_the_same_payload() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;
    let pong = client.call(opcode::PING, "t=42").await.unwrap();
    assert_eq!(pong.opcode, opcode::PONG);
    assert_eq!(&pong.payload[..], b"t=42");
}

/// Each bad input gets its error frame, and the connection keeps working.
#[tokio::test]
async fn bad_input_gets_an_error_frame_and_the_connection_stays_up() {
    let server = TestServer::start(config()).await;
    let mut client = server.client().await;

    let cases: Vec<(Message, ErrorCode, u32, Option<u32>)> = vec![
        (
            Message::Binary(Bytes::new()),
            ErrorCode::FrameTooShort,
            0,
            None,
        ),
        (
            Message::Binary(Bytes::from_static(&[0, 0, 110])),
            ErrorCode::FrameTooShort,
            0,
            None,
        ),
        (
            Message::Binary(Bytes::from_static(&[0x80, 0, 0, 100, 0, 7])),
            ErrorCode::FrameTooShort,
            100,
            None,
        ),
        (
            Message::Binary(Bytes::from_static(&[0x40, 0, 0, 100, 1])),
            ErrorCode::ReservedFlags,
            100,
            None,
        ),
        (
            Message::Binary(Bytes::from_static(&[0xc0, 0, 0, 100, 0, 0, 0, 5])),
            ErrorCode::ReservedFlags,
            100,
            Some(5),
        ),
        (
            Message::Binary(Frame::new(999, "x").encode()),
            ErrorCode::UnknownOpcode,
            999,
            None,
        ),
        (
            Message::Binary(Frame::new(999, "x").with_request_id(Some(9)).encode()),
            ErrorCode::UnknownOpcode,
            999,
            Some(9),
        ),
        (
            Message::Binary(Frame::new(opcode::ERROR, "").encode()),
            ErrorCode::UnknownOpcode,
            opcode::ERROR,
            None,
        ),
        (
            Message::Binary(Frame::new(50, "").encode()),
            ErrorCode::UnknownOpcode,
            50,
            None,
        ),
        (
            Message::Binary(Frame::new(opcode::GET_INFO, vec![0xff, 0xff]).encode()),
            ErrorCode::BadPayload,
            111,
            None,
        ),
        (
            Message::Binary(Frame::new(opcode::ADD_FRIEND, vec![0xc3, 0x28]).encode()),
            ErrorCode::BadPayload,
            110,
            None,
        ),
        (
            Message::Binary(Frame::new(opcode::ADD_FRIEND, "   ").encode()),
            ErrorCode::BadPayload,
            110,
            None,
        ),
        (
            Message::Binary(Frame::new(opcode::ADD_FRIEND, "x".repeat(65)).encode()),
            ErrorCode::BadPayload,
            110,
            None,
        ),
        (
            Message::Text("110 hello".into()),
            ErrorCode::TextNotSupported,
            0,
            None,
        ),
    ];
    for (message, code, op, request_id) in cases {
        let what = format!("{message:?}");
        client.send_raw(message).await.unwrap();
        let reply = client.recv().await.unwrap();
        assert_error(&reply, code, op);
        assert_eq!(reply.request_id, request_id, "{what}");
        // Still serving.
        assert_eq!(client.call(opcode::ECHO, "ok").await.unwrap().payload, "ok");
    }
}

#[tokio::test]
async fn oversized_message_is_refused_with_1009_and_others_are_unaffected() {
    let server = TestServer::start(wsproto::Config {
        max_message_size: 1024,
        ..config()
    })
    .await;
    let mut bystander = server.client().await;
    let mut client = server.client().await;

    // Exactly at the limit is fine.
    let at_limit = client
        .call(opcode::ECHO, vec![7u8; 1024 - 8])
        .await
        .unwrap();
    assert_eq!(at_limit.payload.len(), 1016);

    client
        .send(&Frame::new(opcode::ECHO, vec![7u8; 1024]))
        .await
        .unwrap();
    match client.recv().await {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
    assert_eq!(
        bystander
            .call(opcode::ECHO, "still here")
            .await
            .unwrap()
            .payload,
        "still here"
    );
    server.wait_for_sessions(1).await;
}

/// Replies may be larger than what clients may send (the limit is on input).
#[tokio::test]
async fn a_reply_larger_than_the_message_limit_is_delivered() {
    let server = TestServer::start(wsproto::Config {
        max_message_size: 4096,
        ..config()
    })
    .await;
    let mut client = server.client().await;
    for i in 0..wsproto::handlers::MAX_FRIENDS {
        let name = format!("{i:04}{}", "好".repeat(60));
        client
            .send(&Frame::new(opcode::ADD_FRIEND, name))
            .await
            .unwrap();
    }
    let full = client.call(opcode::ADD_FRIEND, "one more").await.unwrap();
    assert_error(&full, ErrorCode::LimitExceeded, opcode::ADD_FRIEND);
    let request = v1::InfoRequest {
        include_friends: true,
    }
    .encode_to_vec();
    let reply = client.call(opcode::GET_INFO, request).await.unwrap();
    assert!(reply.payload.len() > 150_000, "{}", reply.payload.len());
    let info = v1::Info::decode(reply.payload).unwrap();
    assert_eq!(
        info.session.unwrap().friends.len(),
        wsproto::handlers::MAX_FRIENDS
    );
}
