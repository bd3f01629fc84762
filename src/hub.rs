//! The sessions open on this node, indexed by id, user, topic and room, and
//! the fan-out of publications into their queues.
//!
//! Publishing goes `publish → broker → hub → session queues` whether there
//! is one node or many: [`Hub::publish`] hands the publication to the
//! [`Broker`], which numbers it and has every node's hub [`deliver`]
//! it. Delivery encodes the frame once and shares the bytes; the index lock
//! is held only to list recipients, never while queuing to them, and a
//! queue push never waits, so one slow client cannot delay the others.
//!
//! [`deliver`]: Hub::deliver

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use prost::Message as _;
use tracing::debug;
use wsproto_proto::v1;

use crate::{
    broker::{Broker, BrokerError, MemoryBroker},
    frame::Frame,
    metrics::Counters,
    opcode,
    queue::{DeliveryPolicy, PushError, Pushed},
    session::Session,
    topic::{Topic, TopicIndex},
};

/// Most room members listed in a presence reply.
pub const MAX_LISTED_MEMBERS: usize = 1000;

/// Where a publication goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every session subscribed to a pattern overlapping this topic.
    Topic(Topic),
    /// Every member of a room, except `exclude` when set.
    Room {
        room: Arc<str>,
        exclude: Option<Arc<str>>,
    },
    /// Every session of a user.
    User(Arc<str>),
    /// One session.
    Session(Arc<str>),
    /// Every session on every node.
    Broadcast,
}

/// Who sent a publication, when a session did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub session_id: Arc<str>,
    pub user_id: Option<Arc<str>>,
}

impl Sender {
    /// The sender `session` is.
    pub fn of(session: &Session) -> Sender {
        Sender {
            session_id: session.id().into(),
            user_id: session.user_id().map(Into::into),
        }
    }
}

/// A message on its way to its recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub target: Target,
    pub sender: Option<Sender>,
    pub data: Bytes,
    /// Application opcode the data is meant for (0: none).
    pub opcode: u32,
    /// Milliseconds since the Unix epoch when it was published.
    pub published_at_ms: u64,
}

impl Publication {
    /// A publication stamped with the current time.
    pub fn new(target: Target, sender: Option<Sender>, data: Bytes) -> Publication {
        let published_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Publication {
            target,
            sender,
            data,
            opcode: 0,
            published_at_ms,
        }
    }
}

/// What publishing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Published {
    /// Sequence number of the message within its topic or room (0 otherwise).
    pub seq: u64,
    /// Sessions on this node it was handed to.
    pub sessions: usize,
}

/// Why a subscription or membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("at most {0} subscriptions per session")]
    TooManySubscriptions(usize),
    #[error("at most {0} rooms per session")]
    TooManyRooms(usize),
    #[error("session is not connected")]
    NotConnected,
}

/// Settings of a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Per-topic queue policies; the first pattern covering a
    /// publication's topic wins, else the default (disconnect).
    pub policies: Vec<(Topic, DeliveryPolicy)>,
    pub max_subscriptions: usize,
    pub max_rooms: usize,
}

impl Default for HubConfig {
    fn default() -> HubConfig {
        HubConfig {
            policies: Vec::new(),
            max_subscriptions: 1000,
            max_rooms: 100,
        }
    }
}

/// This node's registry of open sessions; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// Random per process, so session ids stay unique across nodes and restarts.
    node_id: u32,
    next_session: AtomicU64,
    started_at: Instant,
    config: HubConfig,
    broker: Arc<dyn Broker>,
    counters: Counters,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<Arc<str>, Entry>,
    users: HashMap<Arc<str>, HashSet<Arc<str>>>,
    topics: TopicIndex<Arc<str>>,
    rooms: HashMap<Arc<str>, HashMap<Arc<str>, Member>>,
}

struct Entry {
    session: Session,
    topics: HashSet<Topic>,
    rooms: HashSet<Arc<str>>,
}

struct Member {
    user_id: Option<Arc<str>>,
    presence_events: bool,
    session: Session,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new()
    }
}

impl Hub {
    /// A single-node hub with default settings.
    pub fn new() -> Hub {
        Hub::with_config(HubConfig::default(), Arc::new(MemoryBroker::new()))
    }

    /// A hub with `config`, publishing through `broker`.
    pub fn with_config(config: HubConfig, broker: Arc<dyn Broker>) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                node_id: RandomState::new().hash_one(Instant::now()) as u32,
                next_session: AtomicU64::new(1),
                started_at: Instant::now(),
                config,
                broker,
                counters: Counters::default(),
                state: RwLock::new(State::default()),
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn next_session_id(&self) -> Arc<str> {
        let n = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{n}", self.inner.node_id).into()
    }

    pub(crate) fn register(&self, session: &Session) {
        let id: Arc<str> = session.id().into();
        let mut state = self.write();
        if let Some(user) = session.user_id() {
            state
                .users
                .entry(user.into())
                .or_default()
                .insert(id.clone());
        }
        let entry = Entry {
            session: session.clone(),
            topics: HashSet::new(),
            rooms: HashSet::new(),
        };
        state.sessions.insert(id, entry);
    }

    /// Removes a session and everything it held: subscriptions, room
    /// memberships (announced to those who asked) and its user entry.
    pub(crate) fn unregister(&self, session_id: &str) {
        {
            let mut events = Vec::new();
            let mut state = self.write();
            let Some((id, entry)) = state.sessions.remove_entry(session_id) else {
                return;
            };
            for topic in &entry.topics {
                state.topics.remove(topic, &id);
            }
            for room in &entry.rooms {
                events.extend(leave_room(&mut state, room, &id));
            }
            if let Some(user) = entry.session.user_id() {
                if let Some(sessions) = state.users.get_mut(user) {
                    sessions.remove(&id);
                    if sessions.is_empty() {
                        state.users.remove(user);
                    }
                }
            }
            // Queued under the lock, so listeners see joins and leaves in
            // the order they happened (queuing never waits).
            send_all(events);
        }
    }

    /// Sessions open on this node.
    pub fn len(&self) -> usize {
        self.read().sessions.len()
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open session with this id.
    pub fn session(&self, session_id: &str) -> Option<Session> {
        self.read()
            .sessions
            .get(session_id)
            .map(|e| e.session.clone())
    }

    /// The open sessions of a user.
    pub fn sessions_of_user(&self, user_id: &str) -> Vec<Session> {
        let state = self.read();
        let ids = state.users.get(user_id).into_iter().flatten();
        ids.filter_map(|id| state.sessions.get(id).map(|e| e.session.clone()))
            .collect()
    }

    /// Counts of the limits that tripped on this node.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// How long this node has been up.
    pub fn uptime(&self) -> Duration {
        self.inner.started_at.elapsed()
    }

    /// Index sizes, for leak checks and metrics: (users, rooms, whether the
    /// topic index is empty).
    pub fn index_sizes(&self) -> (usize, usize, bool) {
        let state = self.read();
        (
            state.users.len(),
            state.rooms.len(),
            state.topics.is_empty(),
        )
    }

    /// Subscribes a session to a topic or pattern; returns false if it
    /// already was.
    ///
    /// # Errors
    /// Past the per-session subscription limit, or for an unknown session.
    pub fn subscribe(&self, session_id: &str, topic: &Topic) -> Result<bool, HubError> {
        self.subscribe_all(session_id, std::slice::from_ref(topic))
            .map(|added| added > 0)
    }

    /// Subscribes a session to every topic given, or, past the limit, to
    /// none of them; returns how many were new.
    ///
    /// # Errors
    /// Past the per-session subscription limit, or for an unknown session.
    pub fn subscribe_all(&self, session_id: &str, topics: &[Topic]) -> Result<usize, HubError> {
        let max = self.inner.config.max_subscriptions;
        let mut state = self.write();
        let (id, entry) = entry_mut(&mut state.sessions, session_id)?;
        let new: HashSet<&Topic> = topics
            .iter()
            .filter(|t| !entry.topics.contains(*t))
            .collect();
        if entry.topics.len() + new.len() > max {
            return Err(HubError::TooManySubscriptions(max));
        }
        entry.topics.extend(new.iter().map(|t| (*t).clone()));
        for topic in &new {
            state.topics.insert(topic, id.clone());
        }
        Ok(new.len())
    }

    /// Ends a subscription; returns false if there was none.
    pub fn unsubscribe(&self, session_id: &str, topic: &Topic) -> bool {
        let mut state = self.write();
        let Ok((id, entry)) = entry_mut(&mut state.sessions, session_id) else {
            return false;
        };
        entry.topics.remove(topic) && state.topics.remove(topic, &id)
    }

    /// The topics and patterns a session subscribes to.
    pub fn subscriptions(&self, session_id: &str) -> Vec<Topic> {
        let state = self.read();
        let mut topics: Vec<Topic> = state
            .sessions
            .get(session_id)
            .map(|e| e.topics.iter().cloned().collect())
            .unwrap_or_default();
        topics.sort();
        topics
    }

    /// Sessions on this node subscribed to a pattern overlapping `topic`.
    pub fn subscriber_count(&self, topic: &Topic) -> usize {
        self.read().topics.matching(topic).len()
    }

    /// Adds a session to a room and returns the room's presence; members
    /// that asked for presence events hear of it.
    ///
    /// # Errors
    /// Past the per-session room limit, or for an unknown session.
    pub fn join(
        &self,
        session_id: &str,
        room: &Topic,
        presence_events: bool,
    ) -> Result<v1::Presence, HubError> {
        let max = self.inner.config.max_rooms;
        let room: Arc<str> = room.as_str().into();
        let presence = {
            let mut state = self.write();
            let (id, entry) = entry_mut(&mut state.sessions, session_id)?;
            let joined = !entry.rooms.contains(&room);
            if joined && entry.rooms.len() >= max {
                return Err(HubError::TooManyRooms(max));
            }
            entry.rooms.insert(room.clone());
            let member = Member {
                user_id: entry.session.user_id().map(Into::into),
                presence_events,
                session: entry.session.clone(),
            };
            let members = state.rooms.entry(room.clone()).or_default();
            let event_member = v1::Member {
                session_id: id.to_string(),
                user_id: member.user_id.as_deref().unwrap_or_default().to_owned(),
            };
            members.insert(id.clone(), member);
            let events = match joined {
                true => presence_events_for(
                    &room,
                    members,
                    v1::presence_event::Action::Join,
                    event_member,
                    &id,
                ),
                false => Vec::new(),
            };
            send_all(events);
            room_presence(&room, members)
        };
        Ok(presence)
    }

    /// Removes a session from a room; returns false if it was not there.
    pub fn leave(&self, session_id: &str, room: &str) -> bool {
        {
            let mut state = self.write();
            let Ok((id, entry)) = entry_mut(&mut state.sessions, session_id) else {
                return false;
            };
            if !entry.rooms.remove(room) {
                return false;
            }
            send_all(leave_room(&mut state, room, &id));
        }
        true
    }

    /// Whether a session is in a room.
    pub fn is_member(&self, session_id: &str, room: &str) -> bool {
        self.read()
            .rooms
            .get(room)
            .is_some_and(|members| members.contains_key(session_id))
    }

    /// Who is in a room.
    pub fn room_presence(&self, room: &str) -> v1::Presence {
        let state = self.read();
        match state.rooms.get(room) {
            Some(members) => room_presence(room, members),
            None => v1::Presence {
                room: room.to_owned(),
                ..Default::default()
            },
        }
    }

    /// Publishes through the broker, which delivers on every node.
    ///
    /// # Errors
    /// When the broker cannot take the publication.
    pub async fn publish(&self, publication: Publication) -> Result<Published, BrokerError> {
        self.inner.broker.publish(self, publication).await
    }

    /// Delivers a numbered publication to this node's recipients: encodes
    /// the DELIVERY frame once and queues the same bytes for each. Returns
    /// how many sessions it was handed to. Called by brokers.
    pub fn deliver(&self, publication: &Publication, seq: u64) -> usize {
        let (kind, topic, room) = match &publication.target {
            Target::Topic(topic) => (v1::delivery::Kind::Topic, topic.as_str(), ""),
            Target::Room { room, .. } => (v1::delivery::Kind::Room, "", &**room),
            Target::User(_) | Target::Session(_) => (v1::delivery::Kind::Direct, "", ""),
            Target::Broadcast => (v1::delivery::Kind::Broadcast, "", ""),
        };
        let delivery = v1::Delivery {
            kind: kind.into(),
            topic: topic.to_owned(),
            room: room.to_owned(),
            sender: publication.sender.as_ref().map(|s| v1::Sender {
                session_id: s.session_id.to_string(),
                user_id: s.user_id.as_deref().unwrap_or_default().to_owned(),
            }),
            seq,
            data: publication.data.clone(),
            opcode: publication.opcode,
            published_at_ms: publication.published_at_ms,
        };
        let frame = Frame::new(opcode::DELIVERY, delivery.encode_to_vec()).encode();
        let (policy, conflate_key) = match &publication.target {
            Target::Topic(topic) => (self.policy(topic), Some(Arc::<str>::from(topic.as_str()))),
            _ => (DeliveryPolicy::default(), None),
        };

        let recipients = self.recipients(&publication.target);
        let mut handed = 0;
        for session in recipients {
            match session
                .queue()
                .push_with(frame.clone(), policy, conflate_key.as_ref())
            {
                Ok(Pushed::Queued | Pushed::Conflated) => handed += 1,
                Ok(Pushed::Dropped) => {}
                Err(PushError::Full) => debug!(session = %session.id(), "slow consumer: closing"),
                Err(PushError::Closed) => {}
            }
        }
        handed
    }

    /// The queue policy for a topic.
    pub fn policy(&self, topic: &Topic) -> DeliveryPolicy {
        self.inner
            .config
            .policies
            .iter()
            .find(|(pattern, _)| pattern.covers(topic))
            .map(|(_, policy)| *policy)
            .unwrap_or_default()
    }

    fn recipients(&self, target: &Target) -> Vec<Session> {
        let state = self.read();
        let session = |id: &str| state.sessions.get(id).map(|e| e.session.clone());
        match target {
            Target::Topic(topic) => state
                .topics
                .matching(topic)
                .iter()
                .filter_map(|id| session(id))
                .collect(),
            Target::Room { room, exclude } => state
                .rooms
                .get(room)
                .map(|members| {
                    members
                        .iter()
                        .filter(|(id, _)| Some(*id) != exclude.as_ref())
                        .map(|(_, m)| m.session.clone())
                        .collect()
                })
                .unwrap_or_default(),
            Target::User(user) => state
                .users
                .get(user)
                .map(|ids| ids.iter().filter_map(|id| session(id)).collect())
                .unwrap_or_default(),
            Target::Session(id) => session(id).into_iter().collect(),
            Target::Broadcast => state.sessions.values().map(|e| e.session.clone()).collect(),
        }
    }
}

fn entry_mut<'a>(
    sessions: &'a mut HashMap<Arc<str>, Entry>,
    session_id: &str,
) -> Result<(Arc<str>, &'a mut Entry), HubError> {
    match sessions.get_key_value(session_id) {
        Some((id, _)) => {
            let id = id.clone();
            let entry = sessions.get_mut(session_id).ok_or(HubError::NotConnected)?;
            Ok((id, entry))
        }
        None => Err(HubError::NotConnected),
    }
}

fn room_presence(room: &str, members: &HashMap<Arc<str>, Member>) -> v1::Presence {
    let mut listed: Vec<v1::Member> = members
        .iter()
        .map(|(id, m)| v1::Member {
            session_id: id.to_string(),
            user_id: m.user_id.as_deref().unwrap_or_default().to_owned(),
        })
        .collect();
    listed.sort_by(|a, b| (&a.user_id, &a.session_id).cmp(&(&b.user_id, &b.session_id)));
    listed.truncate(MAX_LISTED_MEMBERS);
    v1::Presence {
        room: room.to_owned(),
        topic: String::new(),
        count: members.len() as u32,
        members: listed,
    }
}

/// Removes `id` from `room` (dropping the room when empty) and returns the
/// LEAVE events to send.
fn leave_room(state: &mut State, room: &str, id: &Arc<str>) -> Vec<(Session, Bytes)> {
    let Some(members) = state.rooms.get_mut(room) else {
        return Vec::new();
    };
    let Some(member) = members.remove(id) else {
        return Vec::new();
    };
    let left = v1::Member {
        session_id: id.to_string(),
        user_id: member.user_id.as_deref().unwrap_or_default().to_owned(),
    };
    let events = presence_events_for(room, members, v1::presence_event::Action::Leave, left, id);
    if members.is_empty() {
        state.rooms.remove(room);
    }
    events
}

/// The PRESENCE_EVENT frame for `member`, addressed to every other member
/// that asked for events.
fn presence_events_for(
    room: &str,
    members: &HashMap<Arc<str>, Member>,
    action: v1::presence_event::Action,
    member: v1::Member,
    about: &Arc<str>,
) -> Vec<(Session, Bytes)> {
    let listeners: Vec<Session> = members
        .iter()
        .filter(|(id, m)| m.presence_events && *id != about)
        .map(|(_, m)| m.session.clone())
        .collect();
    if listeners.is_empty() {
        return Vec::new();
    }
    let event = v1::PresenceEvent {
        room: room.to_owned(),
        action: action.into(),
        member: Some(member),
        count: members.len() as u32,
    };
    let frame = Frame::new(opcode::PRESENCE_EVENT, event.encode_to_vec()).encode();
    listeners.into_iter().map(|s| (s, frame.clone())).collect()
}

fn send_all(events: Vec<(Session, Bytes)>) {
    for (session, frame) in events {
        let _ = session.send_encoded(frame);
    }
}
