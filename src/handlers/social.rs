//! Opcode 110 ADD_FRIEND, and the friend lists GET_INFO reports.
//!
//! A friend list belongs to a user, not to a connection: every connection
//! of user `alice` on this node (a browser tab, a phone, one CLI `send`
//! after another) sees and extends the same list. The lists live in this
//! process, so they are per node and are gone after a restart; a
//! deployment that wants them durable or shared across nodes stores them
//! itself. A session without a user id (insecure mode without `?user=`)
//! has a list of its own that ends with the connection.
//!
//! Memory stays bounded: a list holds at most [`MAX_FRIENDS`] names, and at
//! most [`MAX_FRIEND_LISTS`] users' lists are kept; past that, adding the
//! first friend of another user drops the list used least recently.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use wsproto_proto::v1;

use crate::{ErrorCode, Frame, HandlerError, HandlerResult, Reply, Session};

/// Longest friend name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Most friends one user (or one anonymous session) may hold.
pub const MAX_FRIENDS: usize = 1000;
/// Most users whose friend lists this process keeps; the least recently
/// used list makes room for a new one. At worst (every list full of the
/// longest names) that is about 2.8 GB, the bound 10,000 connections with
/// a full list each had when lists were per connection; real lists are a
/// few names.
pub const MAX_FRIEND_LISTS: usize = 10_000;

/// A friend list, in the order the names were added.
#[derive(Debug, Default, Clone)]
pub struct FriendList(pub Vec<String>);

/// Every user's friend list on this node, with when each was last used.
#[derive(Default)]
struct FriendBook {
    lists: HashMap<Arc<str>, (FriendList, u64)>,
    /// Counts uses, ordering the lists from least to most recently used.
    clock: u64,
}

impl FriendBook {
    /// The process-wide book. Its lock is held only for a lookup or an
    /// insert, never across an await.
    fn get() -> std::sync::MutexGuard<'static, FriendBook> {
        static BOOK: OnceLock<Mutex<FriendBook>> = OnceLock::new();
        BOOK.get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// `user`'s list, created (dropping the least recently used one when
    /// the book is full) if there is none.
    fn list_of(&mut self, user: &str) -> &mut FriendList {
        self.clock += 1;
        let now = self.clock;
        if !self.lists.contains_key(user) && self.lists.len() >= MAX_FRIEND_LISTS {
            let oldest = self
                .lists
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(user, _)| user.clone());
            if let Some(oldest) = oldest {
                self.lists.remove(&oldest);
            }
        }
        let (list, used) = self.lists.entry(Arc::from(user)).or_default();
        *used = now;
        list
    }
}

/// Runs `f` on the friend list of `session`: its user's, shared with the
/// user's other connections, or its own when it has no user id.
fn with_friends<R>(session: &Session, f: impl FnOnce(&mut FriendList) -> R) -> R {
    match session.user_id() {
        Some(user) => f(FriendBook::get().list_of(user)),
        None => session.with_local(f),
    }
}

/// The number of friends of `session` (as for [`with_friends`]) and, with
/// `names`, the list itself. Reading creates no list.
pub(super) fn friends_of(session: &Session, names: bool) -> (u32, Vec<String>) {
    let summary = |list: &FriendList| {
        let names = if names { list.0.clone() } else { Vec::new() };
        (list.0.len() as u32, names)
    };
    match session.user_id() {
        Some(user) => match FriendBook::get().lists.get(user) {
            Some((list, _)) => summary(list),
            None => (0, Vec::new()),
        },
        None => session.with_local(|list: &mut FriendList| summary(list)),
    }
}

/// Opcode 110: adds the name in the payload to the friend list of this
/// session's user (see the module docs: per user on this node, per
/// connection without a user id).
///
/// Idempotent: adding a name twice reports `already_friends`.
pub fn add_friend(session: &Session, frame: Frame) -> HandlerResult {
    let name = frame.text()?.trim();
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(HandlerError::bad_payload(format!(
            "a friend's name is 1 to {MAX_NAME_CHARS} printable characters"
        )));
    }
    let reply = with_friends(session, |friends| {
        let already_friends = friends.0.iter().any(|f| f == name);
        if !already_friends {
            if friends.0.len() >= MAX_FRIENDS {
                let message = format!("at most {MAX_FRIENDS} friends");
                return Err(HandlerError::protocol(ErrorCode::LimitExceeded, message));
            }
            friends.0.push(name.to_owned());
        }
        Ok(v1::FriendAdded {
            name: name.to_owned(),
            friend_count: friends.0.len() as u32,
            already_friends,
        })
    })?;
    Ok(Reply::message(&reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_list_makes_room() {
        let mut book = FriendBook::default();
        for i in 0..MAX_FRIEND_LISTS {
            book.list_of(&format!("user{i}")).0.push("x".into());
        }
        // user0 is used again, so user1 is now the oldest.
        book.list_of("user0");
        book.list_of("newcomer");
        assert_eq!(book.lists.len(), MAX_FRIEND_LISTS);
        assert!(book.lists.contains_key("user0"));
        assert!(!book.lists.contains_key("user1"));
        assert!(book.lists.contains_key("newcomer"));
    }
}
