use wsproto_proto::v1;

use crate::{ErrorCode, Frame, HandlerError, HandlerResult, Reply, Session};

/// Longest friend name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Most friends one session may hold; keeps per-session memory bounded.
pub const MAX_FRIENDS: usize = 1000;

/// A session's friends, in the order they were added.
#[derive(Debug, Default)]
pub struct FriendList(pub Vec<String>);

/// Opcode 110: adds the name in the payload to this session's friend list.
///
/// Idempotent: adding a name twice reports `already_friends`. The list lives
/// as long as the session (per user once identities are verified).
pub async fn add_friend(session: Session, frame: Frame) -> HandlerResult {
    let name = frame.text()?.trim();
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(HandlerError::bad_payload(format!(
            "a friend's name is 1 to {MAX_NAME_CHARS} printable characters"
        )));
    }
    let reply = session.with_local(|friends: &mut FriendList| {
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
