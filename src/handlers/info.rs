use wsproto_proto::v1;

use super::social::friends_of;
use crate::{Frame, HandlerResult, Reply, Session};

/// Opcode 111: server and session info; the request (`InfoRequest`, may be
/// empty) chooses whether the friend list is included. The friends are
/// those of the session's user, shared by all its connections on this node
/// (see [`add_friend`](super::add_friend)); a session without a user id
/// has its own.
pub fn get_info(session: &Session, frame: Frame) -> HandlerResult {
    let request: v1::InfoRequest = frame.message()?;
    let (friend_count, friends) = friends_of(session, request.include_friends);
    let (node, hub) = (session.node(), session.hub());
    Ok(Reply::message(&v1::Info {
        server: crate::SERVER_NAME.to_owned(),
        uptime_ms: node.uptime().as_millis() as u64,
        sessions: hub.len() as u32,
        session: Some(v1::SessionInfo {
            session_id: session.id().to_owned(),
            user_id: session.user_id().unwrap_or_default().to_owned(),
            remote_addr: session
                .remote_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            connected_ms: session.connected_for().as_millis() as u64,
            frames_received: session.frames_received(),
            frames_sent: session.frames_sent(),
            friend_count,
            friends,
            dropped: session.queue().dropped(),
            subscriptions: hub
                .subscriptions(session.id())
                .iter()
                .map(|t| t.to_string())
                .collect(),
        }),
    }))
}
