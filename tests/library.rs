//! Building a server from the library: custom handlers, replies, pushes,
//! errors, and what the router does around them.

mod common;

use bytes::Bytes;
use common::{assert_error, config, TestServer};
use wsproto::{opcode, ErrorCode, Frame, HandlerError, HandlerResult, Reply, Router, Session};

async fn silent(_session: Session, _frame: Frame) -> HandlerResult {
    Ok(Reply::None)
}

async fn push_three_then_reply(session: Session, frame: Frame) -> HandlerResult {
    for i in 0..3 {
        session.send(Frame::new(301, format!("push {i}"))).unwrap();
    }
    Ok(Reply::Frame {
        opcode: 302,
        payload: frame.payload,
    })
}

async fn refuse(_session: Session, _frame: Frame) -> HandlerResult {
    Err(HandlerError::new(1234, "not today"))
}

async fn explode(_session: Session, _frame: Frame) -> HandlerResult {
    panic!("handler bug")
}

/// A handler that never waits: a plain function, routed with `route_sync`.
fn shout(session: &Session, frame: Frame) -> HandlerResult {
    let loud = frame.text()?.to_uppercase();
    session.send(Frame::new(307, "before the reply")).unwrap();
    Ok(Reply::text(loud))
}

fn explode_at_once(_session: &Session, _frame: Frame) -> HandlerResult {
    panic!("handler bug")
}

fn router() -> Router {
    Router::new()
        .route(300, silent)
        .route(301, push_three_then_reply)
        .route(303, refuse)
        .route(304, explode)
        .route(305, |session: Session, _frame: Frame| async move {
            Ok(Reply::text(session.id().to_owned()))
        })
        .route(306, |_session: Session, _frame: Frame| async move {
            Ok(Reply::Frame {
                opcode: 0x0100_0000,
                payload: Bytes::new(),
            })
        })
        .route_sync(307, shout)
        .route_sync(308, explode_at_once)
        .route_sync(309, |session: &Session, _frame: Frame| {
            Ok(Reply::text(session.id().to_owned()))
        })
}

#[tokio::test]
async fn a_request_with_an_id_and_no_reply_gets_an_ack() {
    let server = TestServer::with_router(config(), router()).await;
    let mut client = server.client().await;
    let ack = client.call(300, "x").await.unwrap();
    assert_eq!(ack.opcode, opcode::ACK);
    assert!(ack.payload.is_empty());
    // Without a request id, nothing at all comes back.
    client.send(&Frame::new(300, "x")).await.unwrap();
    client.send(&Frame::new(305, "")).await.unwrap();
    assert_eq!(
        client.recv().await.unwrap().opcode,
        305,
        "nothing before the next reply"
    );
}

#[tokio::test]
async fn handlers_push_frames_before_their_reply_in_order() {
    let server = TestServer::with_router(config(), router()).await;
    let mut client = server.client().await;
    client
        .send(&Frame::new(301, "payload").with_request_id(Some(7)))
        .await
        .unwrap();
    for i in 0..3 {
        assert_eq!(
            client.recv().await.unwrap(),
            Frame::new(301, format!("push {i}"))
        );
    }
    let reply = client.recv().await.unwrap();
    assert_eq!(reply, Frame::new(302, "payload").with_request_id(Some(7)));
}

#[tokio::test]
async fn handler_errors_and_panics_become_error_frames() {
    let server = TestServer::with_router(config(), router()).await;
    let mut client = server.client().await;

    let refused = client.call(303, "").await.unwrap();
    let error = common::error_of(&refused).unwrap();
    assert_eq!(
        (error.code, error.opcode, error.message.as_str()),
        (1234, 303, "not today")
    );

    let exploded = client.call(304, "").await.unwrap();
    assert_error(&exploded, ErrorCode::Internal, 304);
    let invalid_reply = client.call(306, "").await.unwrap();
    assert_error(&invalid_reply, ErrorCode::Internal, 306);
    // The session survived its handler's panic.
    assert_eq!(client.call(305, "").await.unwrap().opcode, 305);
}

#[tokio::test]
async fn handlers_that_never_wait_answer_like_async_ones() {
    let server = TestServer::with_router(config(), router()).await;
    let mut client = server.client().await;
    // Pushes first, then the reply with the request's id.
    client
        .send(&Frame::new(307, "hush").with_request_id(Some(9)))
        .await
        .unwrap();
    assert_eq!(
        client.recv().await.unwrap(),
        Frame::new(307, "before the reply")
    );
    assert_eq!(
        client.recv().await.unwrap(),
        Frame::new(307, "HUSH").with_request_id(Some(9))
    );
    // A `?` on the payload is a BAD_PAYLOAD error frame.
    assert_error(
        &client.call(307, vec![0xff, 0xfe]).await.unwrap(),
        ErrorCode::BadPayload,
        307,
    );
    // A panic is an INTERNAL error frame, and the session goes on.
    assert_error(
        &client.call(308, "").await.unwrap(),
        ErrorCode::Internal,
        308,
    );
    let id = client.call(309, "").await.unwrap();
    assert_eq!(id.opcode, 309);
    assert!(!id.payload.is_empty());
    // Frames in a row are answered in order, sync and async alike.
    for (i, op) in [309, 305, 309, 300].into_iter().enumerate() {
        client
            .send(&Frame::new(op, "").with_request_id(Some(i as u32)))
            .await
            .unwrap();
    }
    for (i, op) in [309, 305, 309, opcode::ACK].into_iter().enumerate() {
        let reply = client.recv().await.unwrap();
        assert_eq!((reply.opcode, reply.request_id), (op, Some(i as u32)));
    }
}

#[test]
#[should_panic(expected = "reserved")]
fn reserved_opcodes_cannot_be_routed_sync_either() {
    let _ = Router::new().route_sync(opcode::PING, shout);
}

#[tokio::test]
async fn only_routed_opcodes_are_served() {
    let server = TestServer::with_router(config(), router()).await;
    let mut client = server.client().await;
    assert_error(
        &client.call(opcode::ECHO, "").await.unwrap(),
        ErrorCode::UnknownOpcode,
        100,
    );
    // The protocol's own PING works whatever the router holds.
    assert_eq!(
        client.call(opcode::PING, "").await.unwrap().opcode,
        opcode::PONG
    );
}

#[test]
#[should_panic(expected = "already routed")]
fn routing_an_opcode_twice_is_a_programming_error() {
    let _ = Router::new().route(300, silent).route(300, silent);
}

#[test]
#[should_panic(expected = "reserved")]
fn reserved_opcodes_cannot_be_routed() {
    let _ = Router::new().route(opcode::PING, silent);
}

#[test]
fn builtin_router_serves_the_documented_opcodes() {
    assert_eq!(wsproto::handlers::builtin().opcodes(), [100, 110, 111]);
}

/// Handlers can be tested without a network through a detached session,
/// which is registered with the hub until dropped.
#[tokio::test]
async fn handlers_run_against_a_detached_session() {
    let node = wsproto::Node::new();
    let hub = node.hub();
    let session = Session::detached(&node, Default::default(), 16);
    assert_eq!(hub.len(), 1);
    router()
        .handle_message(&session, Frame::new(301, "x").encode())
        .await;
    assert_eq!(session.queue().len(), 4);
    drop(session);
    assert!(hub.is_empty());
}
