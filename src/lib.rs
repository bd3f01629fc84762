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
//! Data flows one way: socket → [`session`] (read loop) → [`frame`] decode →
//! [`router`] (opcode → handler) → [`hub`] / [`queue`] → [`session`] (the
//! single writer) → socket.
//! - [`frame`]: the codec. [`opcode`]: opcode numbers and payload kinds.
//! - [`error`]: error-frame codes and [`HandlerError`]; [`close`]: close codes.
//! - [`router`]: the handler table; [`handlers`]: the built-in handlers.
//! - [`session`]: one connection; [`queue`]: its bounded send queue.
//! - [`hub`]: this node's sessions. [`server`]: HTTP, upgrade, accept loop,
//!   shutdown; [`upgrade`]: the handshake. [`config`]: settings.
//! - [`read_ahead`]: large socket reads with no read buffer held while idle.

pub mod api;
pub mod auth;
pub mod broker;
pub mod close;
pub mod config;
pub mod error;
pub mod frame;
pub mod handlers;
pub mod hub;
pub mod identity;
pub mod limit;
pub mod metrics;
pub mod opcode;
pub mod origin;
pub mod proxy;
pub mod queue;
pub mod rate;
pub mod read_ahead;
pub mod router;
pub mod server;
pub mod session;
pub mod tls;
pub mod topic;
pub mod upgrade;
pub mod web;

pub use close::CloseReason;
pub use config::{Config, ListenAddr};
pub use error::{ErrorCode, HandlerError};
pub use frame::{Frame, FrameError};
pub use hub::Hub;
pub use router::{Handler, HandlerResult, Reply, Router};
pub use server::{shutdown_signal, Server};
pub use session::Session;
pub use wsproto_proto as proto;

/// Server software and version, as reported in WELCOME and GET_INFO.
pub const SERVER_NAME: &str = concat!("wsproto/", env!("CARGO_PKG_VERSION"));

/// Version of the frame protocol specified in `proto/PROTOCOL.md`.
pub const PROTOCOL_VERSION: u32 = 1;
