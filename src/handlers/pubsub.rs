//! Opcodes 10–18: topics, rooms, direct messages and presence. They are
//! part of the protocol, so every [`Router`](crate::Router) serves them.

use std::sync::Arc;

use wsproto_proto::v1;

use crate::{
    broker::{Position, Publication, Published, Target},
    frame::MAX_OPCODE,
    hub::HubError,
    topic::Topic,
    ErrorCode, Frame, HandlerError, HandlerResult, Reply, Session,
};

fn hub_error(err: HubError) -> HandlerError {
    match err {
        HubError::TooManySubscriptions(_) | HubError::TooManyRooms(_) => {
            HandlerError::protocol(ErrorCode::LimitExceeded, err.to_string())
        }
        HubError::NotConnected => HandlerError::internal(err.to_string()),
        HubError::NotRouted => HandlerError::protocol(ErrorCode::Unavailable, err.to_string()),
    }
}

fn permission_denied(action: &str, topic: &Topic) -> HandlerError {
    HandlerError::protocol(
        ErrorCode::PermissionDenied,
        format!("not allowed to {action} {topic}"),
    )
}

/// Parses every topic of a request; at least one is required.
fn topics(names: &[String]) -> Result<Vec<Topic>, HandlerError> {
    if names.is_empty() {
        return Err(HandlerError::bad_payload("no topics given"));
    }
    names.iter().map(|name| Ok(Topic::parse(name)?)).collect()
}

/// A room name: a topic name without wildcards.
fn room(name: &str) -> Result<Topic, HandlerError> {
    let room = Topic::parse(name)?;
    match room.is_name() {
        true => Ok(room),
        false => Err(HandlerError::protocol(
            ErrorCode::InvalidTopic,
            format!("room {name:?}: wildcards are not allowed in room names"),
        )),
    }
}

async fn publish(session: &Session, publication: Publication) -> Result<Published, HandlerError> {
    session
        .node()
        .publish(publication)
        .await
        .map_err(|err| HandlerError::protocol(ErrorCode::Unavailable, err.to_string()))
}

fn published(topic: &str, room: &str, published: Published) -> Reply {
    Reply::message(&v1::Published {
        topic: topic.to_owned(),
        room: room.to_owned(),
        seq: published.seq,
        sessions: published.sessions as u32,
        nodes: published.nodes as u32,
        epoch: published.epoch.to_string(),
    })
}

/// Opcode 10: subscribes to every topic given, or to none if any is
/// invalid, not permitted, or past the limit. With `since` it recovers
/// what the client missed in those streams, and with `since` or
/// `positions` it replies with where each stream stands.
pub async fn subscribe(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::Subscribe = frame.message()?;
    let topics = topics(&request.topics)?;
    if let Some(topic) = topics.iter().find(|t| !session.identity().may_subscribe(t)) {
        return Err(permission_denied("subscribe to", topic));
    }
    if request.since.is_empty() && !request.positions && session.device_key().is_none() {
        session
            .node()
            .subscribe_all(session.id(), &topics)
            .await
            .map_err(hub_error)?;
        return Ok(Reply::None);
    }
    let mut since = Vec::with_capacity(request.since.len());
    // What this device acknowledged, for the streams the client names no
    // position for (an app that lost its own, or never kept any).
    for (stream, position) in acknowledged(&session).await? {
        let Some(name) = stream.strip_prefix("t:") else {
            continue;
        };
        let Ok(topic) = Topic::parse(name) else {
            continue;
        };
        if !request.since.contains_key(name) && topics.iter().any(|t| t.covers(&topic)) {
            since.push((topic, position));
        }
    }
    for (name, position) in &request.since {
        let stream = Topic::parse(name)?;
        if !topics.iter().any(|t| t.covers(&stream)) {
            return Err(HandlerError::bad_payload(format!(
                "since: {name:?} is not covered by the topics subscribed to"
            )));
        }
        since.push((stream, Position::new(&*position.epoch, position.seq)));
    }
    // A pattern names no one stream to report on.
    let report: Vec<Topic> = match request.positions {
        true => topics.iter().filter(|t| t.is_name()).cloned().collect(),
        false => Vec::new(),
    };
    let streams = session
        .node()
        .subscribe_recovering(session.id(), &topics, &since, &report)
        .await
        .map_err(hub_error)?;
    Ok(Reply::message(&v1::Subscribed { streams }))
}

/// Opcode 11: ends subscriptions; unknown ones are ignored.
pub async fn unsubscribe(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::Unsubscribe = frame.message()?;
    for topic in topics(&request.topics)? {
        session.node().unsubscribe(session.id(), &topic);
    }
    Ok(Reply::None)
}

/// Opcode 12: publishes to a topic the session may publish to.
pub async fn publish_to_topic(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::Publish = frame.message()?;
    let topic = Topic::parse(&request.topic)?;
    if !session.identity().may_publish(&topic) {
        return Err(permission_denied("publish to", &topic));
    }
    if request.opcode > MAX_OPCODE {
        return Err(HandlerError::bad_payload(format!(
            "opcode exceeds {MAX_OPCODE}"
        )));
    }
    let mut publication = Publication::new(
        Target::Topic(topic.clone()),
        Some(session.sender()),
        request.data,
    );
    publication.opcode = request.opcode;
    let result = publish(&session, publication).await?;
    Ok(published(topic.as_str(), "", result))
}

/// Opcode 14: joins a room and replies with who is in it.
pub async fn join(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::Join = frame.message()?;
    let room = room(&request.room)?;
    if !session.identity().may_join(&room) {
        return Err(permission_denied("join room", &room));
    }
    let since = match request.since {
        Some(p) => Some(Position::new(&*p.epoch, p.seq)),
        None => acknowledged(&session)
            .await?
            .remove(&format!("r:{}", room.as_str())),
    };
    let presence = session
        .node()
        .join_recovering(session.id(), &room, request.presence_events, since.as_ref())
        .await
        .map_err(hub_error)?;
    Ok(Reply::message(&presence))
}

/// What the session's device acknowledged, by stream (empty without a
/// device).
///
/// # Errors
/// UNAVAILABLE when the broker cannot say: the client retries, rather than
/// subscribing as if the device had no position and skipping what it
/// missed.
async fn acknowledged(
    session: &Session,
) -> Result<std::collections::HashMap<String, Position>, HandlerError> {
    match session.device_key() {
        Some(device) => session
            .node()
            .broker()
            .acknowledged(&device)
            .await
            .map_err(|err| HandlerError::protocol(ErrorCode::Unavailable, err.to_string())),
        None => Ok(Default::default()),
    }
}

/// Opcode 21: keeps the positions the device has processed, and settles
/// the critical deliveries they cover (no longer redelivered).
pub async fn acknowledge(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::Acknowledge = frame.message()?;
    let Some(device) = session.device_key() else {
        return Err(HandlerError::bad_payload(
            "connect with ?device=ID to acknowledge deliveries",
        ));
    };
    let mut acks = Vec::with_capacity(request.streams.len());
    for ack in request.streams {
        let stream = match (ack.topic.is_empty(), ack.room.is_empty(), ack.user) {
            (false, true, false) => Target::Topic(Topic::parse(&ack.topic)?),
            (true, false, false) => Target::Room {
                room: room(&ack.room)?.as_str().into(),
                exclude: None,
            },
            (true, true, true) => match session.user_id() {
                Some(user) => Target::UserStream(user.into()),
                None => {
                    return Err(HandlerError::bad_payload(
                        "an anonymous session has no user stream",
                    ))
                }
            },
            _ => {
                return Err(HandlerError::bad_payload(
                    "give exactly one of topic, room and user",
                ))
            }
        };
        let Some(position) = ack.position.filter(|p| p.seq > 0) else {
            return Err(HandlerError::bad_payload("every stream needs a position"));
        };
        let key = stream.stream_key().unwrap_or_default();
        let position = Position::new(&*position.epoch, position.seq);
        session.queue().acknowledge(&key, &position);
        acks.push((key, position));
    }
    // Not saved (broker unreachable, counted there): the device's next
    // recovery starts earlier, and the client drops what it had.
    let _ = session
        .node()
        .broker()
        .save_acknowledged(&device, &acks)
        .await;
    Ok(Reply::None)
}

/// Opcode 15: leaves a room; leaving a room one is not in is harmless.
pub async fn leave(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::Leave = frame.message()?;
    let room = room(&request.room)?;
    session.node().leave(session.id(), room.as_str()).await;
    Ok(Reply::None)
}

/// Opcode 16: sends to every member of a joined room, the sender only if
/// it asks to be included.
pub async fn say(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::Say = frame.message()?;
    let room = room(&request.room)?;
    if !session.hub().is_member(session.id(), room.as_str()) {
        return Err(HandlerError::protocol(
            ErrorCode::NotInRoom,
            format!("join room {room} before saying anything in it"),
        ));
    }
    let exclude = (!request.include_self).then(|| Arc::<str>::from(session.id()));
    let target = Target::Room {
        room: room.as_str().into(),
        exclude,
    };
    let result = publish(
        &session,
        Publication::new(target, Some(session.sender()), request.data),
    )
    .await?;
    Ok(published("", room.as_str(), result))
}

/// Opcode 17: a direct message to every session of a user, or to one session.
pub async fn send(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::Send = frame.message()?;
    let target = match (request.user_id.is_empty(), request.session_id.is_empty()) {
        (false, true) => Target::User(request.user_id.into()),
        (true, false) => Target::Session(request.session_id.into()),
        _ => {
            return Err(HandlerError::bad_payload(
                "give exactly one of user_id and session_id",
            ))
        }
    };
    let result = publish(
        &session,
        Publication::new(target, Some(session.sender()), request.data),
    )
    .await?;
    Ok(published("", "", result))
}

/// Opcode 18: who is in a room, or how many sessions subscribe to a topic.
pub async fn presence(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::PresenceRequest = frame.message()?;
    let presence = match (request.room.is_empty(), request.topic.is_empty()) {
        (false, true) => {
            let room = room(&request.room)?;
            session.node().room_presence(room.as_str()).await
        }
        (true, false) => {
            let topic = Topic::parse(&request.topic)?;
            v1::Presence {
                topic: topic.to_string(),
                count: session.hub().subscriber_count(&topic) as u32,
                ..Default::default()
            }
        }
        _ => {
            return Err(HandlerError::bad_payload(
                "give exactly one of room and topic",
            ))
        }
    };
    Ok(Reply::message(&presence))
}
