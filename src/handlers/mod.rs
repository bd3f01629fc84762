//! The built-in application handlers that `wsproto-server` registers.
//!
//! | opcode | name       | request                    | reply                      |
//! |--------|------------|----------------------------|----------------------------|
//! | 100    | ECHO       | any bytes                  | the same bytes             |
//! | 110    | ADD_FRIEND | friend's name, UTF-8       | `wsproto.v1.FriendAdded`   |
//! | 111    | GET_INFO   | `wsproto.v1.InfoRequest`   | `wsproto.v1.Info`          |

pub(crate) mod auth;
mod echo;
mod info;
pub mod pubsub;
mod social;

pub use echo::echo;
pub use info::get_info;
pub use social::{add_friend, FriendList, MAX_FRIENDS, MAX_NAME_CHARS};

use crate::{opcode, Router};

/// A router with every built-in handler registered.
pub fn builtin() -> Router {
    Router::new()
        .route(opcode::ECHO, echo)
        .route(opcode::ADD_FRIEND, add_friend)
        .route(opcode::GET_INFO, get_info)
}
