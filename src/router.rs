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

use std::{collections::HashMap, panic::AssertUnwindSafe};

use bytes::Bytes;
use futures_util::FutureExt;
use tracing::{debug, warn};

pub use crate::handler::{Handler, HandlerResult, Reply};
use crate::{
    error::{ErrorCode, HandlerError},
    frame::{Frame, Preview, MAX_OPCODE},
    opcode,
    session::Session,
};

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
    /// An empty table for application opcodes. The protocol's own opcodes
    /// (pub/sub, rooms, presence, ping, token refresh) are added by the
    /// server when it starts (see [`handlers::with_protocol`]).
    ///
    /// [`handlers::with_protocol`]: crate::handlers::with_protocol
    pub fn new() -> Router {
        Router {
            handlers: HashMap::new(),
        }
    }

    /// Registers the handler of one of the protocol's own opcodes.
    ///
    /// # Panics
    /// When `opcode` is not reserved or already registered.
    pub(crate) fn route_protocol(mut self, opcode: u32, handler: impl Handler) -> Router {
        assert!(
            opcode::is_reserved(opcode),
            "opcode {opcode} is not reserved"
        );
        let previous = self.handlers.insert(opcode, Box::new(handler));
        assert!(previous.is_none(), "opcode {opcode} is already routed");
        self
    }

    /// Whether `opcode` has a handler.
    pub fn routes(&self, opcode: u32) -> bool {
        self.handlers.contains_key(&opcode)
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

fn unknown_opcode_message(op: u32) -> String {
    match opcode::spec(op) {
        Some(spec) if spec.request == opcode::PayloadKind::None => {
            format!("opcode {op} ({}) is sent by the server only", spec.name)
        }
        _ => format!("unknown opcode {op}"),
    }
}
