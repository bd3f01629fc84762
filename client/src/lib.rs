//! The wsproto client: an async [`Client`] for the opcode protocol, and the
//! payload [`schema`] helpers the `wsproto-client` CLI is built from.

pub mod backoff;
pub mod checker;
pub mod client;
pub mod http;
pub mod positions;
pub mod schema;

pub use client::{error_of, tls_config, Client, ClientError};
pub use positions::{Event, Positions, Subscriber};
