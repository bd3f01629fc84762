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
//! // A handler that never waits may be a plain function: it costs less.
//! fn whisper(_session: &Session, frame: Frame) -> HandlerResult {
//!     Ok(Reply::text(frame.text()?.to_lowercase()))
//! }
//!
//! let router = Router::new().route(200, shout).route_sync(201, whisper);
//! ```

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{future::CatchUnwind, stream::FuturesOrdered, FutureExt, StreamExt};
use tracing::{debug, warn};

use crate::handler::BoxFuture;
pub use crate::handler::{Handler, HandlerResult, Reply, SyncHandler};
use crate::{
    error::{ErrorCode, HandlerError},
    frame::{Frame, Preview, MAX_OPCODE},
    opcode,
    session::Session,
};

/// Maps application opcodes to handlers, and answers the protocol's own.
pub struct Router {
    /// By opcode, ascending: a table of a few dozen entries is searched in
    /// a handful of comparisons, where a `HashMap` hashed every frame's
    /// opcode twice with SipHash.
    routes: Vec<Route>,
}

struct Route {
    opcode: u32,
    handler: Run,
    /// May run side by side with the next frames' handlers (see
    /// [`Router::handle_run`]).
    pipelined: bool,
}

/// How a route's handler runs.
enum Run {
    /// To completion, polled as a future.
    Async(Box<dyn Handler>),
    /// Done when called.
    Sync(Box<dyn SyncHandler>),
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
        Router { routes: Vec::new() }
    }

    fn route_of(&self, opcode: u32) -> Option<&Route> {
        let found = self.routes.binary_search_by_key(&opcode, |r| r.opcode);
        found.ok().map(|at| &self.routes[at])
    }

    /// Adds a route.
    ///
    /// # Panics
    /// When `opcode` has one already.
    fn add(&mut self, opcode: u32, handler: Run, pipelined: bool) {
        let at = match self.routes.binary_search_by_key(&opcode, |r| r.opcode) {
            Ok(_) => panic!("opcode {opcode} is already routed"),
            Err(at) => at,
        };
        let route = Route {
            opcode,
            handler,
            pipelined,
        };
        self.routes.insert(at, route);
    }

    /// Registers the handler of one of the protocol's own opcodes.
    ///
    /// # Panics
    /// When `opcode` is not reserved or already registered.
    pub(crate) fn route_protocol(self, opcode: u32, handler: impl Handler) -> Router {
        self.route_protocol_as(opcode, Run::Async(Box::new(handler)), false)
    }

    /// [`route_protocol`](Router::route_protocol) for a handler that never
    /// waits (see [`Router::route_sync`]).
    pub(crate) fn route_protocol_sync(self, opcode: u32, handler: impl SyncHandler) -> Router {
        self.route_protocol_as(opcode, Run::Sync(Box::new(handler)), false)
    }

    fn route_protocol_as(mut self, opcode: u32, handler: Run, pipelined: bool) -> Router {
        assert!(
            opcode::is_reserved(opcode),
            "opcode {opcode} is not reserved"
        );
        self.add(opcode, handler, pipelined);
        self
    }

    /// Registers the handler of one of the protocol's publishing opcodes,
    /// whose frames may be handled as a run (see [`Router::handle_run`]):
    /// its handler must do everything that orders it among other
    /// publications (hand the publication to the broker) in its first poll.
    pub(crate) fn route_protocol_pipelined(self, opcode: u32, handler: impl Handler) -> Router {
        self.route_protocol_as(opcode, Run::Async(Box::new(handler)), true)
    }

    /// Whether a binary message may join a run of frames handled side by
    /// side: its opcode's handler is pipelined. Undecodable messages may
    /// not (they are answered on their own).
    pub(crate) fn is_pipelined(&self, message: &Bytes) -> bool {
        // The opcode first: most frames are not pipelined, and need no
        // decoding here.
        Frame::peek_opcode(message).is_some_and(|op| self.route_of(op).is_some_and(|r| r.pipelined))
            && Frame::decode(message.clone()).is_ok()
    }

    /// Whether `opcode` has a handler.
    pub fn routes(&self, opcode: u32) -> bool {
        self.route_of(opcode).is_some()
    }

    /// Registers `handler` for `opcode`.
    ///
    /// # Panics
    /// When `opcode` is reserved (below 100), above the 24-bit maximum, or
    /// already registered: each is a programming error, caught at start-up.
    pub fn route(self, opcode: u32, handler: impl Handler) -> Router {
        self.route_app(opcode, Run::Async(Box::new(handler)))
    }

    /// Registers `handler`, which never waits, for `opcode`: it is called
    /// in the session's task as the frame is read, and its reply is queued
    /// at once. For handlers that do not `.await`, this saves what an
    /// `async fn` costs per frame (its future, boxed, and a handle on the
    /// session). A panic becomes an INTERNAL error frame, as for any
    /// handler.
    ///
    /// # Panics
    /// As [`Router::route`].
    pub fn route_sync(self, opcode: u32, handler: impl SyncHandler) -> Router {
        self.route_app(opcode, Run::Sync(Box::new(handler)))
    }

    fn route_app(mut self, opcode: u32, handler: Run) -> Router {
        assert!(
            !opcode::is_reserved(opcode),
            "opcode {opcode} is reserved for the protocol"
        );
        assert!(
            opcode <= MAX_OPCODE,
            "opcode {opcode} exceeds the 24-bit maximum"
        );
        self.add(opcode, handler, false);
        self
    }

    /// The application opcodes that have a handler, in ascending order.
    pub fn opcodes(&self) -> Vec<u32> {
        self.routes
            .iter()
            .map(|r| r.opcode)
            .filter(|&op| !opcode::is_reserved(op))
            .collect()
    }

    /// Handles one binary message from `session`: decodes it, runs its
    /// handler and queues the reply, ACK or error frame.
    ///
    /// Never fails: whatever the bytes, the client gets a documented answer,
    /// and a panicking handler becomes an INTERNAL error frame.
    pub async fn handle_message(&self, session: &Session, message: Bytes) {
        if let Some(call) = self.start(session, message) {
            let (op, request_id) = (call.op, call.request_id);
            let result = call.await;
            answer(session, op, request_id, result);
        }
    }

    /// Handles a run of binary messages whose handlers are all pipelined
    /// (see [`Router::is_pipelined`]) side by side: each handler is polled
    /// first in the order of its frame, so their publications are ordered
    /// as the frames were, and the answers are queued in that order too.
    /// A client publishing many messages in a row thus waits for one broker
    /// round trip per run, not per message.
    pub(crate) async fn handle_run(&self, session: &Session, messages: Vec<Bytes>) {
        let mut calls: FuturesOrdered<_> = messages
            .into_iter()
            .filter_map(|message| self.start(session, message))
            .map(|call| {
                let (op, request_id) = (call.op, call.request_id);
                call.map(move |result| (op, request_id, result))
            })
            .collect();
        while let Some((op, request_id, result)) = calls.next().await {
            answer(session, op, request_id, result);
        }
    }

    /// Decodes `message` and starts its handler; `None` when the frame was
    /// answered at once (it does not decode, its opcode has no handler, or
    /// its handler never waits).
    pub(crate) fn start(&self, session: &Session, message: Bytes) -> Option<Call> {
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
                return None;
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
        // A handler that is done at once, or an unknown opcode, is answered
        // right here. (Neither is ever part of a run, whose answers keep
        // the frames' order: pipelined routes are all async.)
        let running = match self.route_of(op).map(|route| &route.handler) {
            Some(Run::Async(handler)) => handler.call(session.clone(), frame),
            Some(Run::Sync(handler)) => {
                let result =
                    std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(session, frame)));
                answer(session, op, request_id, result.ok());
                return None;
            }
            None => {
                let message = unknown_opcode_message(op);
                let unknown = HandlerError::protocol(ErrorCode::UnknownOpcode, message);
                answer(session, op, request_id, Some(Err(unknown)));
                return None;
            }
        };
        Some(Call {
            op,
            request_id,
            running: AssertUnwindSafe(running).catch_unwind(),
        })
    }
}

/// A frame's handler, running.
pub(crate) struct Call {
    op: u32,
    request_id: Option<u32>,
    running: CatchUnwind<AssertUnwindSafe<BoxFuture>>,
}

impl Call {
    /// Runs the handler; once it is done, queues its answer for `session`.
    pub(crate) fn poll_answered(&mut self, session: &Session, cx: &mut Context<'_>) -> Poll<()> {
        let result = std::task::ready!(self.running.poll_unpin(cx)).ok();
        answer(session, self.op, self.request_id, result);
        Poll::Ready(())
    }
}

impl Future for Call {
    /// The handler's result, or `None` when it panicked.
    type Output = Option<HandlerResult>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<HandlerResult>> {
        self.running.poll_unpin(cx).map(Result::ok)
    }
}

/// Queues the answer to frame `op` (with `request_id`): the reply, an ACK
/// or an error frame.
fn answer(session: &Session, op: u32, request_id: Option<u32>, result: Option<HandlerResult>) {
    let result = result.unwrap_or_else(|| {
        warn!(session = %session.id(), opcode = op, "handler panicked");
        Err(HandlerError::internal(format!(
            "handler for opcode {op} failed"
        )))
    });
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
    let _ = session.send(reply.with_request_id(request_id));
}

fn unknown_opcode_message(op: u32) -> String {
    match opcode::spec(op) {
        Some(spec) if spec.request == opcode::PayloadKind::None => {
            format!("opcode {op} ({}) is sent by the server only", spec.name)
        }
        _ => format!("unknown opcode {op}"),
    }
}
