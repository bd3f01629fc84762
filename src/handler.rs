//! The contract between the router and a handler: what a handler is given
//! (a [`Session`] and a [`Frame`]) and what it answers ([`HandlerResult`]).

use std::{future::Future, pin::Pin};

use bytes::Bytes;

use crate::{error::HandlerError, frame::Frame, session::Session};

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
    Frame {
        /// The reply's opcode (at most the 24-bit maximum).
        opcode: u32,
        /// The reply's payload.
        payload: Bytes,
    },
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

/// The future a [`Handler`] returns, boxed so handlers fit in one table.
pub type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;

/// Anything that can answer a frame; implemented for every
/// `async fn(Session, Frame) -> HandlerResult` and matching closure.
pub trait Handler: Send + Sync + 'static {
    /// Handles one frame from `session`.
    fn call(&self, session: Session, frame: Frame) -> BoxFuture;
}

/// A handler that is done as soon as it is called: it never waits. Every
/// `fn(&Session, Frame) -> HandlerResult` and matching closure is one.
/// Registered with [`Router::route_sync`](crate::Router::route_sync), it
/// runs without a future, a box for it or a handle on the session, which
/// an `async fn` costs on every frame.
pub trait SyncHandler: Send + Sync + 'static {
    /// Handles one frame from `session`.
    fn call(&self, session: &Session, frame: Frame) -> HandlerResult;
}

impl<F> SyncHandler for F
where
    F: Fn(&Session, Frame) -> HandlerResult + Send + Sync + 'static,
{
    fn call(&self, session: &Session, frame: Frame) -> HandlerResult {
        self(session, frame)
    }
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
