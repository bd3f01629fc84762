//! The sessions open on this node, indexed by id, user, topic and room, and
//! the fan-out of publications into their queues.
//!
//! The hub holds each session's delivery handle (id, user, send queue), not
//! the session itself, and knows nothing of brokers beyond their types:
//! publishing goes `node → broker → hub → session queues` whether there is
//! one node or many, the hub being the node's [`BrokerEventHandler`].
//! Delivery encodes the frame once and shares the bytes; the index lock is
//! held only to list recipients, never while queuing to them, and a queue
//! push never waits, so one slow client cannot delay the others. Large
//! recipient lists are kept between publications until the indexes change,
//! so the fan-out to a stable audience is one walk over a flat list.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock, Weak},
};

use bytes::Bytes;
use prost::Message as _;
use tracing::debug;
use wsproto_proto::v1;

pub use crate::broker::{Position, Publication, Published, Sender, Target};
use crate::{
    broker::{BrokerEventHandler, Interest, Membership, PresenceChange, StreamGap},
    frame::Frame,
    opcode,
    queue::{DeliveryPolicy, PushError, Pushed, SessionQueue},
    topic::{Topic, TopicIndex},
};

/// Most room members listed in a presence reply.
pub const MAX_LISTED_MEMBERS: usize = 1000;

/// Why a subscription or membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The session already has [`HubConfig::max_subscriptions`] patterns.
    #[error("at most {0} subscriptions per session")]
    TooManySubscriptions(usize),
    /// The session is already in [`HubConfig::max_rooms`] rooms.
    #[error("at most {0} rooms per session")]
    TooManyRooms(usize),
    /// The session has closed (or was never registered with this hub).
    #[error("session is not connected")]
    NotConnected,
    /// The broker could not route the stream to this node in time, so what
    /// a recovery replays could be followed by a hole; nothing was changed.
    #[error("the cluster could not route this stream to this node in time; retry shortly")]
    NotRouted,
}

/// Settings of a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Per-topic queue policies; the first pattern covering a
    /// publication's topic wins, else the default (disconnect).
    pub policies: Vec<(Topic, DeliveryPolicy)>,
    /// Subscriptions one session may hold at once (`--max-subscriptions`).
    pub max_subscriptions: usize,
    /// Rooms one session may be in at once (`--max-rooms`).
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
    config: HubConfig,
    /// The hub announces joins and leaves itself (false when the broker
    /// keeps presence and announces them to every node).
    announces_presence: std::sync::atomic::AtomicBool,
    state: RwLock<State>,
    /// Recipient lists of recent fan-outs (see [`ReadyLists`]).
    ready: std::sync::Mutex<ReadyLists>,
}

/// One session as a fan-out reaches it.
type Recipient = (Arc<str>, SessionQueue);

/// Recipient lists of the topics, rooms and broadcasts published to
/// recently, so that a publication to thousands of subscribers walks a
/// flat list instead of matching patterns, removing duplicates and looking
/// every session up again.
///
/// Lists are filled under the state's read lock and the whole set is
/// emptied under its write lock (any change to sessions, subscriptions or
/// rooms), so a list is never older than the index it was built from.
/// Lock order: state, then this.
#[derive(Default)]
struct ReadyLists {
    lists: HashMap<ListKey, Arc<[Recipient]>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum ListKey {
    Topic(Box<str>),
    Room(Arc<str>),
    Broadcast,
}

/// Fan-outs smaller than this are listed afresh each time: cheap enough,
/// and not worth the memory.
const MIN_READY_LIST: usize = 16;
/// Most lists kept; past it the set starts again empty.
const MAX_READY_LISTS: usize = 1024;

/// How many recipients ahead of the one being pushed to a delivery starts
/// loading queues (see `SessionQueue::prefetch`).
const PREFETCH_AHEAD: usize = 8;

#[derive(Default)]
struct State {
    sessions: HashMap<Arc<str>, Entry>,
    users: HashMap<Arc<str>, HashSet<Arc<str>>>,
    topics: TopicIndex<Arc<str>>,
    rooms: HashMap<Arc<str>, HashMap<Arc<str>, Member>>,
}

/// What the hub keeps of one session: enough to deliver to it.
struct Entry {
    user_id: Option<Arc<str>>,
    queue: SessionQueue,
    topics: HashSet<Topic>,
    rooms: HashSet<Arc<str>>,
}

struct Member {
    user_id: Option<Arc<str>>,
    presence_events: bool,
    queue: SessionQueue,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new()
    }
}

impl Hub {
    /// A hub with default settings.
    pub fn new() -> Hub {
        Hub::with_config(HubConfig::default())
    }

    /// A hub with `config`.
    pub fn with_config(config: HubConfig) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                config,
                announces_presence: std::sync::atomic::AtomicBool::new(true),
                state: RwLock::new(State::default()),
                ready: std::sync::Mutex::new(ReadyLists::default()),
            }),
        }
    }

    /// Leaves announcing joins and leaves to the broker, which keeps
    /// presence for every node.
    pub fn leave_presence_to_broker(&self) {
        self.inner
            .announces_presence
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    fn announces_presence(&self) -> bool {
        self.inner
            .announces_presence
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This hub as a broker's delivery target; held weakly by the broker.
    pub fn event_handler(&self) -> Weak<dyn BrokerEventHandler> {
        let handler: Arc<dyn BrokerEventHandler> = self.inner.clone();
        Arc::downgrade(&handler)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.read()
    }

    /// The state, to change it: every ready list is dropped, since any
    /// change may change who a fan-out reaches.
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        let state = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
        self.inner.ready_lists().lists.clear();
        state
    }

    /// Makes a session reachable: publications to it, its user, and the
    /// topics and rooms it takes part in are queued on `queue`.
    pub fn register(&self, session_id: Arc<str>, user_id: Option<Arc<str>>, queue: SessionQueue) {
        let mut state = self.write();
        if let Some(user) = &user_id {
            state
                .users
                .entry(user.clone())
                .or_default()
                .insert(session_id.clone());
        }
        let entry = Entry {
            user_id,
            queue,
            topics: HashSet::new(),
            rooms: HashSet::new(),
        };
        state.sessions.insert(session_id, entry);
    }

    /// Removes a session and everything it held: subscriptions, room
    /// memberships (announced to those who asked) and its user entry.
    /// Returns what it held, for the broker.
    pub fn unregister(&self, session_id: &str) -> Vec<Interest> {
        let mut events = Vec::new();
        let mut state = self.write();
        let Some((id, entry)) = state.sessions.remove_entry(session_id) else {
            return Vec::new();
        };
        let mut held: Vec<Interest> = entry.topics.iter().cloned().map(Interest::Topic).collect();
        held.extend(entry.rooms.iter().cloned().map(Interest::Room));
        held.extend(entry.user_id.clone().map(Interest::User));
        for topic in &entry.topics {
            state.topics.remove(topic, &id);
        }
        for room in &entry.rooms {
            events.extend(leave_room(&mut state, room, &id));
        }
        if let Some(user) = &entry.user_id {
            if let Some(sessions) = state.users.get_mut(user) {
                sessions.remove(&id);
                if sessions.is_empty() {
                    state.users.remove(user);
                }
            }
        }
        // Queued under the lock, so listeners see joins and leaves in the
        // order they happened (queuing never waits).
        if self.announces_presence() {
            send_all(events);
        }
        held
    }

    /// Sessions open on this node.
    pub fn len(&self) -> usize {
        self.read().sessions.len()
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The send queue of the open session with this id.
    pub fn queue_of(&self, session_id: &str) -> Option<SessionQueue> {
        self.read()
            .sessions
            .get(session_id)
            .map(|e| e.queue.clone())
    }

    /// The user of an open session, when it has one.
    pub fn user_of(&self, session_id: &str) -> Option<Arc<str>> {
        self.read().sessions.get(session_id)?.user_id.clone()
    }

    /// The ids of a user's open sessions on this node.
    pub fn sessions_of_user(&self, user_id: &str) -> Vec<Arc<str>> {
        let state = self.read();
        state
            .users
            .get(user_id)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
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
        self.subscribe_new(session_id, topics).map(|new| new.len())
    }

    /// As [`Hub::subscribe_all`], returning the subscriptions that are new.
    ///
    /// # Errors
    /// As [`Hub::subscribe_all`].
    pub fn subscribe_new(
        &self,
        session_id: &str,
        topics: &[Topic],
    ) -> Result<Vec<Topic>, HubError> {
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
        let new: Vec<Topic> = new.into_iter().cloned().collect();
        entry.topics.extend(new.iter().cloned());
        for topic in &new {
            state.topics.insert(topic, id.clone());
        }
        Ok(new)
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
        self.join_new(session_id, room, presence_events)
            .map(|(presence, _)| presence)
    }

    /// As [`Hub::join`], also saying whether the session is new in the room.
    ///
    /// # Errors
    /// As [`Hub::join`].
    pub fn join_new(
        &self,
        session_id: &str,
        room: &Topic,
        presence_events: bool,
    ) -> Result<(v1::Presence, bool), HubError> {
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
                user_id: entry.user_id.clone(),
                presence_events,
                queue: entry.queue.clone(),
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
                    members.len() as u32,
                ),
                false => Vec::new(),
            };
            if self.announces_presence() {
                send_all(events);
            }
            (room_presence(&room, members), joined)
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
            let events = leave_room(&mut state, room, &id);
            if self.announces_presence() {
                send_all(events);
            }
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

    /// Delivers a numbered publication to this node's recipients: encodes
    /// the DELIVERY frame once and queues the same bytes for each. Returns
    /// how many sessions it was handed to.
    pub fn deliver(&self, publication: &Publication, position: &Position) -> usize {
        self.inner.deliver(publication, position)
    }

    /// The queue policy for a topic.
    pub fn policy(&self, topic: &Topic) -> DeliveryPolicy {
        self.inner.policy(topic)
    }
}

impl Inner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(&self, publication: &Publication, position: &Position) -> usize {
        let frame = delivery_frame(publication, position, false);
        // Numbered deliveries go through the sessions' position checks
        // (which cost nothing for a session that never recovered).
        let stream = publication.target.stream_key().filter(|_| position.seq > 0);
        let (policy, conflate_key) = match &publication.target {
            Target::Topic(topic) => (self.policy(topic), Some(Arc::<str>::from(topic.as_str()))),
            Target::UserStream(_) => (DeliveryPolicy::CRITICAL, None),
            _ => (DeliveryPolicy::default(), None),
        };

        let recipients = self.recipients(&publication.target);
        let exclude = match &publication.target {
            Target::Room { exclude, .. } => exclude.as_deref(),
            _ => None,
        };
        let mut handed = 0;
        for (index, (id, queue)) in recipients.iter().enumerate() {
            // Each queue is a cache miss or more when thousands are pushed
            // to in turn: start loading the ones a few pushes ahead.
            if let Some((_, ahead)) = recipients.get(index + PREFETCH_AHEAD) {
                ahead.prefetch();
            }
            if exclude == Some(&**id) {
                continue;
            }
            let pushed = match &stream {
                Some(stream) => queue.push_delivery(
                    frame.clone(),
                    policy,
                    conflate_key.as_ref(),
                    stream,
                    position,
                ),
                None => queue.push_with(frame.clone(), policy, conflate_key.as_ref()),
            };
            match pushed {
                Ok(Pushed::Queued | Pushed::Conflated) => handed += 1,
                Ok(Pushed::Dropped | Pushed::Duplicate) => {}
                Err(PushError::Full) => debug!(session = %id, "slow consumer: closing"),
                Err(PushError::Unacknowledged) => {
                    debug!(session = %id, "acknowledgement window full: closing")
                }
                Err(PushError::Closed) => {}
            }
        }
        handed
    }

    fn policy(&self, topic: &Topic) -> DeliveryPolicy {
        self.config
            .policies
            .iter()
            .find(|(pattern, _)| pattern.covers(topic))
            .map(|(_, policy)| *policy)
            .unwrap_or_default()
    }

    fn ready_lists(&self) -> std::sync::MutexGuard<'_, ReadyLists> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Who a publication to `target` reaches on this node (for a room,
    /// including the member it excludes). Large lists come from, or go
    /// into, the ready lists.
    fn recipients(&self, target: &Target) -> Arc<[Recipient]> {
        let state = self.read();
        let key = match target {
            Target::Topic(topic) => Some(ListKey::Topic(topic.as_str().into())),
            Target::Room { room, .. } => Some(ListKey::Room(room.clone())),
            Target::Broadcast => Some(ListKey::Broadcast),
            Target::User(_) | Target::UserStream(_) | Target::Session(_) => None,
        };
        if let Some(key) = &key {
            if let Some(list) = self.ready_lists().lists.get(key) {
                return list.clone();
            }
        }
        let list: Arc<[Recipient]> = list_recipients(&state, target).into();
        if let Some(key) = key.filter(|_| list.len() >= MIN_READY_LIST) {
            let mut ready = self.ready_lists();
            if ready.lists.len() >= MAX_READY_LISTS {
                ready.lists.clear();
            }
            ready.lists.insert(key, list.clone());
        }
        list
    }
}

/// Everyone a publication to `target` reaches, listed from the indexes.
fn list_recipients(state: &State, target: &Target) -> Vec<Recipient> {
    let session = |id: &Arc<str>| {
        state
            .sessions
            .get(id)
            .map(|e| (id.clone(), e.queue.clone()))
    };
    match target {
        Target::Topic(topic) => state
            .topics
            .matching(topic)
            .iter()
            .filter_map(session)
            .collect(),
        Target::Room { room, .. } => state
            .rooms
            .get(room)
            .map(|members| {
                members
                    .iter()
                    .map(|(id, m)| (id.clone(), m.queue.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        Target::User(user) | Target::UserStream(user) => state
            .users
            .get(user)
            .map(|ids| ids.iter().filter_map(session).collect())
            .unwrap_or_default(),
        Target::Session(id) => state
            .sessions
            .get_key_value(&**id)
            .map(|(id, e)| (id.clone(), e.queue.clone()))
            .into_iter()
            .collect(),
        Target::Broadcast => state
            .sessions
            .iter()
            .map(|(id, e)| (id.clone(), e.queue.clone()))
            .collect(),
    }
}

impl BrokerEventHandler for Inner {
    fn handle_publication(&self, publication: &Publication, position: &Position) -> usize {
        self.deliver(publication, position)
    }

    fn recipients(&self, target: &Target) -> usize {
        if let Target::Topic(_) = target {
            // Matching a topic means walking its index and collecting a set
            // (10,000 entries for a wide audience); the list kept for its
            // deliveries already knows, or will be needed anyway.
            return Inner::recipients(self, target).len();
        }
        // Counted, not listed: no queue handle is cloned for a count.
        let state = self.read();
        match target {
            Target::Topic(topic) => state.topics.matching(topic).len(),
            Target::Room { room, exclude } => state.rooms.get(room).map_or(0, |members| {
                let excluded = exclude.as_ref().is_some_and(|id| members.contains_key(id));
                members.len() - usize::from(excluded)
            }),
            Target::User(user) | Target::UserStream(user) => {
                state.users.get(user).map_or(0, HashSet::len)
            }
            Target::Session(id) => usize::from(state.sessions.contains_key(&**id)),
            Target::Broadcast => state.sessions.len(),
        }
    }

    fn handle_presence(&self, change: &PresenceChange) {
        let state = self.read();
        let Some(members) = state.rooms.get(&change.room) else {
            return;
        };
        let member = v1::Member {
            session_id: change.session_id.to_string(),
            user_id: change.user_id.as_deref().unwrap_or_default().to_owned(),
        };
        let action = match change.joined {
            true => v1::presence_event::Action::Join,
            false => v1::presence_event::Action::Leave,
        };
        // The count is the deployment's, not this node's.
        let about = &change.session_id;
        send_all(presence_events_for(
            &change.room,
            members,
            action,
            member,
            about,
            change.count,
        ));
    }

    fn handle_gap(&self, gap: &StreamGap) {
        let (topic, room, user) = match &gap.stream {
            Target::Topic(topic) => (topic.to_string(), String::new(), false),
            Target::Room { room, .. } => (String::new(), room.to_string(), false),
            Target::UserStream(_) => (String::new(), String::new(), true),
            _ => return,
        };
        let notice = v1::Gap {
            topic,
            room,
            user,
            epoch: gap.epoch.to_string(),
            from_seq: gap.from_seq,
            to_seq: gap.to_seq,
            reason: gap.reason.to_owned(),
        };
        let frame = Frame::new(opcode::GAP, notice.encode_to_vec()).encode();
        for (_, queue) in self.recipients(&gap.stream).iter() {
            let _ = queue.push(frame.clone());
        }
    }

    fn local_members(&self) -> Vec<Membership> {
        let state = self.read();
        state
            .rooms
            .iter()
            .flat_map(|(room, members)| {
                members.iter().map(|(id, m)| Membership {
                    room: room.clone(),
                    session_id: id.clone(),
                    user_id: m.user_id.clone(),
                })
            })
            .collect()
    }
}

/// The DELIVERY frame of `publication` at `position`, encoded once for all
/// its recipients.
pub(crate) fn delivery_frame(
    publication: &Publication,
    position: &Position,
    replayed: bool,
) -> Bytes {
    let (kind, topic, room) = match &publication.target {
        Target::Topic(topic) => (v1::delivery::Kind::Topic, topic.as_str(), ""),
        Target::Room { room, .. } => (v1::delivery::Kind::Room, "", &**room),
        Target::User(_) | Target::UserStream(_) | Target::Session(_) => {
            (v1::delivery::Kind::Direct, "", "")
        }
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
        seq: position.seq,
        data: publication.data.clone(),
        opcode: publication.opcode,
        published_at_ms: publication.published_at_ms,
        epoch: position.epoch.to_string(),
        replayed,
        redelivered: false,
    };
    Frame::new(opcode::DELIVERY, delivery.encode_to_vec()).encode()
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
        stream: None,
    }
}

/// Removes `id` from `room` (dropping the room when empty) and returns the
/// LEAVE events to send.
fn leave_room(state: &mut State, room: &str, id: &Arc<str>) -> Vec<(SessionQueue, Bytes)> {
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
    let count = members.len() as u32;
    let events = presence_events_for(
        room,
        members,
        v1::presence_event::Action::Leave,
        left,
        id,
        count,
    );
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
    count: u32,
) -> Vec<(SessionQueue, Bytes)> {
    let listeners: Vec<SessionQueue> = members
        .iter()
        .filter(|(id, m)| m.presence_events && *id != about)
        .map(|(_, m)| m.queue.clone())
        .collect();
    if listeners.is_empty() {
        return Vec::new();
    }
    let event = v1::PresenceEvent {
        room: room.to_owned(),
        action: action.into(),
        member: Some(member),
        count,
    };
    let frame = Frame::new(opcode::PRESENCE_EVENT, event.encode_to_vec()).encode();
    listeners.into_iter().map(|s| (s, frame.clone())).collect()
}

fn send_all(events: Vec<(SessionQueue, Bytes)>) {
    for (queue, frame) in events {
        let _ = queue.push(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    fn publish(hub: &Hub, target: Target) -> usize {
        let position = Position::new("e", 1);
        hub.deliver(
            &Publication::new(target, None, Bytes::from_static(b"x")),
            &position,
        )
    }

    /// Sessions `s0..s{n}`, each with a queue large enough for the test.
    fn sessions(hub: &Hub, n: usize) -> Vec<SessionQueue> {
        (0..n)
            .map(|i| {
                let queue = SessionQueue::new(64);
                hub.register(format!("s{i}").into(), None, queue.clone());
                queue
            })
            .collect()
    }

    #[test]
    fn a_kept_recipient_list_follows_every_change_of_audience() {
        let hub = Hub::new();
        let queues = sessions(&hub, 40);
        let news = Target::Topic(topic("news.eu"));
        for i in 0..30 {
            hub.subscribe(&format!("s{i}"), &topic("news.*")).unwrap();
        }
        // Overlapping patterns still deliver once.
        hub.subscribe("s0", &topic("news.#")).unwrap();
        assert_eq!(publish(&hub, news.clone()), 30);
        assert_eq!(publish(&hub, news.clone()), 30, "from the kept list");

        hub.subscribe("s35", &topic("news.eu")).unwrap();
        assert_eq!(publish(&hub, news.clone()), 31, "a new subscriber");
        hub.unsubscribe("s1", &topic("news.*"));
        assert_eq!(publish(&hub, news.clone()), 30, "an unsubscribe");
        hub.unregister("s2");
        assert_eq!(publish(&hub, news.clone()), 29, "a closed session");
        assert_eq!(queues[1].len(), 3, "s1 got what came before it left");
        assert_eq!(queues[35].len(), 3);

        assert_eq!(publish(&hub, Target::Broadcast), 39);
        hub.register("late".into(), None, SessionQueue::new(8));
        assert_eq!(publish(&hub, Target::Broadcast), 40);
    }

    #[test]
    fn a_room_list_is_kept_whole_and_the_sender_still_skipped() {
        let hub = Hub::new();
        sessions(&hub, 20);
        let room = topic("lobby");
        for i in 0..20 {
            hub.join(&format!("s{i}"), &room, false).unwrap();
        }
        let say = |exclude: Option<&str>| Target::Room {
            room: "lobby".into(),
            exclude: exclude.map(Into::into),
        };
        assert_eq!(publish(&hub, say(Some("s3"))), 19);
        assert_eq!(publish(&hub, say(None)), 20);
        assert_eq!(publish(&hub, say(Some("s4"))), 19);
        hub.leave("s5", "lobby");
        assert_eq!(publish(&hub, say(Some("s4"))), 18);
    }
}
