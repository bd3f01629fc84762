#![warn(missing_docs)]
//! wsproto: a WebSocket server for a binary opcode-framed command protocol.
//!
//! Every binary WebSocket message is one [`Frame`]: a 4-byte big-endian
//! opcode, an optional request id, and a payload. The server decodes each
//! frame and dispatches it to the handler registered for its opcode in a
//! [`Router`]; the `wsproto-server` binary is this library with the
//! [built-in handlers](handlers::builtin) registered.
//!
//! ```no_run
//! use wsproto::{handlers, Config, Server};
//!
//! # async fn run() -> std::io::Result<()> {
//! let server = Server::bind(Config::default(), handlers::builtin()).await?;
//! server.run(wsproto::shutdown_signal()).await
//! # }
//! ```
//!
//! # Layout
//! Data flows one way: socket → `connection` (read loop) → [`frame`]
//! decode → [`router`] (opcode → [`handler`]) → [`handlers`] → [`node`] →
//! [`broker`] → ([`BrokerEventHandler`](broker::BrokerEventHandler)) →
//! [`hub`] → [`queue`] → the connection's writer → socket. Each module
//! imports only from those before it:
//! - wire: [`frame`] (the codec), [`opcode`], [`error`] (error-frame codes,
//!   [`HandlerError`]), [`close`] (close codes), [`topic`] (names, patterns,
//!   the pattern index).
//! - fan-out, with no sessions or sockets: [`broker`] (publications, the
//!   [`Broker`](broker::Broker) trait, [`MemoryBroker`](broker::MemoryBroker)),
//!   [`queue`] (a session's bounded send queue), [`hub`] (this node's
//!   sessions' queues, by id, user, topic and room), [`node`] (hub + broker
//!   + counters: what handlers act through).
//! - one connection: [`session`] (the handle handlers get), `connection`
//!   (read loop, writer, heartbeat), `rate`, `read_ahead`.
//! - dispatch: [`handler`] (the contract), [`router`] (the table),
//!   [`handlers`] (the protocol's own opcodes and the built-in examples).
//! - the edge: [`server`] (HTTP, accept loop, shutdown), `upgrade`, `auth`,
//!   [`identity`], `origin`, `proxy`, `limit`, `tls`, `api` (the publish
//!   API), `metrics`, `web`; [`config`]: settings.
//!
//! The modules in `code` without a link are private: a library user sets
//! them up through [`Config`] and sees their effects through [`Server`].
//! What is public is what a custom server needs (routers, handlers,
//! sessions, frames, settings), what a handler acts through (node, hub,
//! broker, queue, topics) and what a test or a fuzz target drives directly.

mod api;
mod auth;
pub mod broker;
pub mod close;
pub mod config;
mod connection;
mod copy;
mod deadline;
pub mod error;
pub mod frame;
pub mod handler;
pub mod handlers;
pub mod hub;
pub mod identity;
pub mod inflight;
mod limit;
mod metrics;
pub mod node;
pub mod opcode;
mod origin;
mod proxy;
pub mod queue;
mod rate;
mod read_ahead;
pub(crate) mod recovery;
pub mod router;
pub mod server;
pub mod session;
pub mod signal;
mod stream;
mod tls;
pub mod topic;
mod upgrade;
mod web;

pub use close::CloseReason;
pub use config::{Config, ListenAddr};
pub use error::{ErrorCode, HandlerError};
pub use frame::{Frame, FrameError, Outgoing};
pub use handler::{Handler, HandlerResult, Reply, SyncHandler};
pub use hub::Hub;
pub use node::Node;
pub use router::Router;
pub use server::{shutdown_signal, Server, ServerError};
pub use session::Session;
pub use wsproto_proto as proto;

/// Server software and version, as reported in WELCOME and GET_INFO.
pub const SERVER_NAME: &str = concat!("wsproto/", env!("CARGO_PKG_VERSION"));

/// Version of the frame protocol specified in `proto/PROTOCOL.md`.
pub const PROTOCOL_VERSION: u32 = 1;
