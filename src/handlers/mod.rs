//! Handlers: the protocol's own opcodes, which every server serves, and the
//! example application handlers that `wsproto-server` registers.
//!
//! | opcode | name       | request                    | reply                      |
//! |--------|------------|----------------------------|----------------------------|
//! | 100    | ECHO       | any bytes                  | the same bytes             |
//! | 110    | ADD_FRIEND | friend's name, UTF-8       | `wsproto.v1.FriendAdded`   |
//! | 111    | GET_INFO   | `wsproto.v1.InfoRequest`   | `wsproto.v1.Info`          |
//!
//! Handlers register onto a [`Router`]; the router itself knows none of them.

mod echo;
mod info;
pub mod pubsub;
mod refresh;
mod social;

pub use echo::echo;
pub use info::get_info;
pub use social::{add_friend, FriendList, MAX_FRIENDS, MAX_NAME_CHARS};

use crate::{opcode, Frame, HandlerResult, Reply, Router, Session};

/// A router with every built-in application handler registered.
pub fn builtin() -> Router {
    Router::new()
        .route_sync(opcode::ECHO, echo)
        .route_sync(opcode::ADD_FRIEND, add_friend)
        .route_sync(opcode::GET_INFO, get_info)
}

/// `router` with the protocol's own opcodes (10–18: topics, rooms, direct
/// messages, presence; PING; REFRESH_TOKEN) added. The server does this to
/// every router it serves; call it to dispatch frames to a router directly.
/// Adding them twice is harmless.
pub fn with_protocol(router: Router) -> Router {
    if router.routes(opcode::PING) {
        return router;
    }
    router
        .route_protocol(opcode::SUBSCRIBE, pubsub::subscribe)
        .route_protocol(opcode::UNSUBSCRIBE, pubsub::unsubscribe)
        .route_protocol_pipelined(opcode::PUBLISH, pubsub::publish_to_topic)
        .route_protocol(opcode::JOIN, pubsub::join)
        .route_protocol(opcode::LEAVE, pubsub::leave)
        .route_protocol_pipelined(opcode::SAY, pubsub::say)
        .route_protocol_pipelined(opcode::SEND, pubsub::send)
        .route_protocol(opcode::PRESENCE, pubsub::presence)
        .route_protocol(opcode::ACKNOWLEDGE, pubsub::acknowledge)
        .route_protocol_sync(opcode::PING, pong)
        .route_protocol(opcode::REFRESH_TOKEN, refresh::refresh_token)
}

/// Opcode 3: answers PONG with the same payload.
fn pong(_session: &Session, frame: Frame) -> HandlerResult {
    Ok(Reply::Frame {
        opcode: opcode::PONG,
        payload: frame.payload,
    })
}
