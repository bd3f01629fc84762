//! Who a session acts for and what it may do, decided once at upgrade.
//!
//! Handlers only ever read a session's [`Identity`]; where it comes from
//! (a verified JWT, or the connect URL in insecure mode) does not concern
//! them.

use std::{sync::Arc, time::SystemTime};

use crate::topic::Topic;

/// The user behind a session and its permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The user id, when known.
    pub user_id: Option<Arc<str>>,
    /// Patterns the session may subscribe to.
    pub subscribe: Vec<Topic>,
    /// Patterns the session may publish to with PUBLISH.
    pub publish: Vec<Topic>,
    /// Patterns of the rooms the session may join (and so say things in).
    pub rooms: Vec<Topic>,
    /// When the credentials expire; the session is closed with 4001 then.
    pub expires_at: Option<SystemTime>,
}

impl Identity {
    /// The identity of insecure mode: the user the connect URL names, free
    /// to subscribe to anything and join any room, and to publish where
    /// `publish` allows.
    pub fn insecure(user_id: Option<Arc<str>>, publish: Vec<Topic>) -> Identity {
        let everything = Topic::parse("#").expect("'#' is a valid pattern");
        Identity {
            user_id,
            subscribe: vec![everything.clone()],
            publish,
            rooms: vec![everything],
            expires_at: None,
        }
    }

    /// Whether the session may subscribe to `topic` (a name or a pattern).
    pub fn may_subscribe(&self, topic: &Topic) -> bool {
        self.subscribe.iter().any(|allowed| allowed.covers(topic))
    }

    /// Whether the session may join `room`.
    pub fn may_join(&self, room: &Topic) -> bool {
        self.rooms.iter().any(|allowed| allowed.covers(room))
    }

    /// Whether the session may publish to `topic` (a name or a pattern).
    pub fn may_publish(&self, topic: &Topic) -> bool {
        self.publish.iter().any(|allowed| allowed.covers(topic))
    }
}
