//! Who a session acts for and what it may do, decided once at upgrade.
//!
//! Handlers only ever read a session's [`Identity`]; where it comes from
//! (the connect URL in insecure mode today, verified credentials later)
//! does not concern them.

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
