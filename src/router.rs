//! The handler table: opcode → async handler.
//!
//! ```no_run
//! use wsproto::{Frame, HandlerResult, Reply, Router, Session};
//!
//! async fn shout(_session: Session, frame: Frame) -> HandlerResult {
//!     let text = frame.text()?;
//!     Ok(Reply::text(text.to_uppercase()))
//! }
//!
//! let router = Router::new().route(200, shout);
//! ```

use std::{collections::HashMap, future::Future, panic::AssertUnwindSafe, pin::Pin};

use bytes::Bytes;
use futures_util::FutureExt;
use tracing::{debug, warn};

use crate::{
    error::{ErrorCode, HandlerError},
    frame::{Frame, Preview, MAX_OPCODE},
    handlers::{auth, pubsub},
    opcode,
    session::Session,
};

/// What a handler returns.
pub type HandlerResult = Result<Reply, HandlerError>;

/// A handler's answer to a frame. Every reply frame echoes the request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// No reply frame; a request that carried a request id gets an ACK.
    None,
    /// A frame with the request's opcode and this payload.
    Payload(Bytes),
    /// A frame with another opcode.
    Frame { opcode: u32, payload: Bytes },
}

impl Reply {
    /// A reply with the request's opcode carrying an encoded protobuf message.
    pub fn message(message: &impl prost::Message) -> Reply {
        Reply::Payload(message.encode_to_vec().into())
    }

    /// A reply with the request's opcode carrying UTF-8 text.
    pub fn text(text: impl Into<String>) -> Reply {
        Reply::Payload(Bytes::from(text.into()))
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;

/// Anything that can answer a frame; implemented for every
/// `async fn(Session, Frame) -> HandlerResult` and matching closure.
pub trait Handler: Send + Sync + 'static {
    /// Handles one frame from `session`.
    fn call(&self, session: Session, frame: Frame) -> BoxFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Session, Frame) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, session: Session, frame: Frame) -> BoxFuture {
        Box::pin(self(session, frame))
    }
}

/// Maps application opcodes to handlers, and answers the protocol's own.
pub struct Router {
    handlers: HashMap<u32, Box<dyn Handler>>,
}

impl Default for Router {
    fn default() -> Router {
        Router::new()
    }
}

impl Router {
    /// A table with the protocol's own opcodes (pub/sub, rooms, presence)
    /// and no application opcodes.
    pub fn new() -> Router {
        let protocol: [(u32, Box<dyn Handler>); 10] = [
            (opcode::SUBSCRIBE, Box::new(pubsub::subscribe)),
            (opcode::UNSUBSCRIBE, Box::new(pubsub::unsubscribe)),
            (opcode::PUBLISH, Box::new(pubsub::publish_to_topic)),
            (opcode::JOIN, Box::new(pubsub::join)),
            (opcode::LEAVE, Box::new(pubsub::leave)),
            (opcode::SAY, Box::new(pubsub::say)),
            (opcode::SEND, Box::new(pubsub::send)),
            (opcode::PRESENCE, Box::new(pubsub::presence)),
            (opcode::PING, Box::new(pong)),
            (opcode::REFRESH_TOKEN, Box::new(auth::refresh_token)),
        ];
        Router {
            handlers: protocol.into_iter().collect(),
        }
    }

    /// Registers `handler` for `opcode`.
    ///
    /// # Panics
    /// When `opcode` is reserved (below 100), above the 24-bit maximum, or
    /// already registered: each is a programming error, caught at start-up.
    pub fn route(mut self, opcode: u32, handler: impl Handler) -> Router {
        assert!(
            !opcode::is_reserved(opcode),
            "opcode {opcode} is reserved for the protocol"
        );
        assert!(
            opcode <= MAX_OPCODE,
            "opcode {opcode} exceeds the 24-bit maximum"
        );
        let previous = self.handlers.insert(opcode, Box::new(handler));
        assert!(previous.is_none(), "opcode {opcode} is already routed");
        self
    }

    /// The application opcodes that have a handler, in ascending order.
    pub fn opcodes(&self) -> Vec<u32> {
        let mut opcodes: Vec<u32> = self
            .handlers
            .keys()
            .copied()
            .filter(|&op| !opcode::is_reserved(op))
            .collect();
        opcodes.sort_unstable();
        opcodes
    }

    /// Handles one binary message from `session`: decodes it, runs its
    /// handler and queues the reply, ACK or error frame.
    ///
    /// Never fails: whatever the bytes, the client gets a documented answer,
    /// and a panicking handler becomes an INTERNAL error frame.
    pub async fn handle_message(&self, session: &Session, message: Bytes) {
        let len = message.len();
        let frame = match Frame::decode(message) {
            Ok(frame) => frame,
            Err(err) => {
                debug!(session = %session.id(), kind = "binary", len, %err, "bad frame");
                session.send_error(
                    err.error_code().as_u32(),
                    err.to_string(),
                    err.opcode(),
                    err.request_id(),
                );
                return;
            }
        };
        debug!(
            session = %session.id(),
            kind = "binary",
            len,
            opcode = frame.opcode,
            request_id = frame.request_id,
            payload = %Preview::new(&frame.payload, 32),
            "frame in"
        );
        let (op, request_id) = (frame.opcode, frame.request_id);
        let result = match self.handlers.get(&op) {
            Some(handler) => {
                let call = AssertUnwindSafe(handler.call(session.clone(), frame));
                call.catch_unwind().await.unwrap_or_else(|_| {
                    warn!(session = %session.id(), opcode = op, "handler panicked");
                    Err(HandlerError::internal(format!(
                        "handler for opcode {op} failed"
                    )))
                })
            }
            None => Err(HandlerError::protocol(
                ErrorCode::UnknownOpcode,
                unknown_opcode_message(op),
            )),
        };
        let reply = match result {
            Ok(Reply::None) if request_id.is_none() => return,
            Ok(Reply::None) => Frame::new(opcode::ACK, Bytes::new()),
            Ok(Reply::Payload(payload)) => Frame::new(op, payload),
            Ok(Reply::Frame { opcode, .. }) if opcode > MAX_OPCODE => {
                warn!(session = %session.id(), opcode = op, reply = opcode, "handler replied with an invalid opcode");
                let message = format!("handler for opcode {op} failed");
                session.send_error(ErrorCode::Internal.as_u32(), message, op, request_id);
                return;
            }
            Ok(Reply::Frame { opcode, payload }) => Frame::new(opcode, payload),
            Err(err) => {
                session.send_error(err.code(), err.message().to_owned(), op, request_id);
                return;
            }
        };
        // A full queue closes the session; nothing else to do here.
        let _ = session.send(&reply.with_request_id(request_id));
    }
}

/// Opcode 3: answers PONG with the same payload.
async fn pong(_session: Session, frame: Frame) -> HandlerResult {
    Ok(Reply::Frame {
        opcode: opcode::PONG,
        payload: frame.payload,
    })
}

fn unknown_opcode_message(op: u32) -> String {
    match opcode::spec(op) {
        Some(spec) if spec.request == opcode::PayloadKind::None => {
            format!("opcode {op} ({}) is sent by the server only", spec.name)
        }
        _ => format!("unknown opcode {op}"),
    }
}
