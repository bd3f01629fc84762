//! Brokers carry publications between nodes.
//!
//! Every publication goes through the broker, even on a single node, so the
//! path is the same with one node or many: the broker numbers the message
//! within its topic or room and hands it to the [`BrokerEventHandler`] of
//! every node it reaches (the node's hub), which queues it for the sessions
//! there. The broker knows nothing of hubs or sessions: a node registers its
//! handler once, and deliveries may then arrive on any task — in-line from
//! [`Broker::publish`] for [`MemoryBroker`], from a subscription loop for a
//! broker with a network behind it.

mod memory;
mod ordered;
mod redis;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Weak},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;

pub use memory::MemoryBroker;
pub use redis::{RedisBroker, RedisSettings};

use crate::topic::Topic;

/// Why a broker could not take a publication.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker's backend is unreachable or failed.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, so the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a publication goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every session subscribed to a pattern overlapping this topic.
    Topic(Topic),
    /// Every member of a room, except `exclude` when set.
    Room {
        /// The room's name.
        room: Arc<str>,
        /// A session id that does not get it (the sender, usually).
        exclude: Option<Arc<str>>,
    },
    /// Every session of a user.
    User(Arc<str>),
    /// Every session of a user, numbered in the user's own stream and kept
    /// in its history: a critical push, which devices acknowledge and
    /// recover after a reconnect (see [`HistoryPolicies::user`]).
    UserStream(Arc<str>),
    /// One session.
    Session(Arc<str>),
    /// Every session on every node.
    Broadcast,
}

impl Target {
    /// The stream this target's publications are numbered in: `t:TOPIC`,
    /// `r:ROOM` or `u:USER`; `None` for targets that are not numbered
    /// (sequence 0).
    pub fn stream_key(&self) -> Option<String> {
        match self {
            Target::Topic(topic) => Some(format!("t:{topic}")),
            Target::Room { room, .. } => Some(format!("r:{room}")),
            Target::UserStream(user) => Some(format!("u:{user}")),
            Target::User(_) | Target::Session(_) | Target::Broadcast => None,
        }
    }
}

/// Who sent a publication, when a session did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    /// The sending session.
    pub session_id: Arc<str>,
    /// Its user, when known.
    pub user_id: Option<Arc<str>>,
}

/// A message on its way to its recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Who gets it.
    pub target: Target,
    /// Who sent it; `None` for the publish API.
    pub sender: Option<Sender>,
    /// The payload, passed through untouched.
    pub data: Bytes,
    /// Application opcode the data is meant for (0: none).
    pub opcode: u32,
    /// Milliseconds since the Unix epoch when it was published.
    pub published_at_ms: u64,
    /// A publisher's key for this message: publishing again with the same
    /// key within a day publishes nothing and answers as the first time did
    /// (a retry after a lost answer is harmless). Not delivered.
    pub idempotency_key: Option<Arc<str>>,
}

impl Publication {
    /// A publication stamped with the current time.
    pub fn new(target: Target, sender: Option<Sender>, data: Bytes) -> Publication {
        Publication {
            target,
            sender,
            data,
            opcode: 0,
            published_at_ms: now_ms(),
            idempotency_key: None,
        }
    }
}

/// Where a message stands in its stream (a topic's or a room's).
///
/// The epoch names one run of the stream's numbering: it changes whenever
/// the sequence could restart (a new process for the memory broker, a
/// stream Redis lost), so positions of different epochs are never compared.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Position {
    /// The stream's epoch; empty for messages that are not numbered.
    pub epoch: Arc<str>,
    /// Sequence number within the epoch, from 1; 0 when not numbered.
    pub seq: u64,
}

impl Position {
    /// A position in `epoch`.
    pub fn new(epoch: impl Into<Arc<str>>, seq: u64) -> Position {
        Position {
            epoch: epoch.into(),
            seq,
        }
    }
}

/// Whether `position` moves an acknowledged `current` forward (a new epoch
/// always does).
pub fn advances(current: Option<&Position>, position: &Position) -> bool {
    current.is_none_or(|c| c.epoch != position.epoch || c.seq < position.seq)
}

/// How long a publication's idempotency key is remembered.
pub const IDEMPOTENCY_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Most messages one stream replays in a recovery (or one catch-up);
/// history policies are capped at it.
pub const MAX_REPLAY: usize = 10_000;

/// How much of a stream's past a broker keeps, for recovery and
/// `POST /api/history`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Most messages kept.
    pub max_len: usize,
    /// Messages older than this are no longer served (none: kept until
    /// pushed out by newer ones).
    pub max_age: Option<std::time::Duration>,
}

impl HistoryPolicy {
    /// The publication time (ms since the Unix epoch) of the oldest message
    /// still served now: 0 without a maximum age.
    pub fn oldest_kept_ms(&self) -> u64 {
        self.max_age
            .map_or(0, |age| now_ms().saturating_sub(age.as_millis() as u64))
    }
}

/// Milliseconds since the Unix epoch, now (0 on a clock before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What history streams keep: topics and rooms by name pattern (the first
/// pattern covering a stream wins, and a stream no pattern covers keeps
/// none), and users' streams of critical pushes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryPolicies {
    /// Policies by topic (or room name) pattern.
    pub patterns: Vec<(Topic, HistoryPolicy)>,
    /// The policy of every user's stream ([`Target::UserStream`]).
    pub user: Option<HistoryPolicy>,
}

impl HistoryPolicies {
    /// Topic and room policies, and none for users' streams.
    pub fn patterns(patterns: Vec<(Topic, HistoryPolicy)>) -> HistoryPolicies {
        HistoryPolicies {
            patterns,
            user: None,
        }
    }

    /// The policy of `target`'s stream, if it keeps history.
    pub fn of(&self, target: &Target) -> Option<HistoryPolicy> {
        let name = match target {
            Target::Topic(topic) => topic.clone(),
            Target::Room { room, .. } => Topic::parse(room).ok()?,
            Target::UserStream(_) => return self.user,
            _ => return None,
        };
        self.patterns
            .iter()
            .find(|(pattern, _)| pattern.covers(&name))
            .map(|(_, policy)| *policy)
    }
}

/// A read of a stream's history.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct History {
    /// The stream's current epoch.
    pub epoch: Arc<str>,
    /// The stream's latest sequence number in that epoch (0: none yet).
    pub top: u64,
    /// Kept messages after the position asked for (or from the start of the
    /// epoch when the position was of another epoch or none), oldest first,
    /// at most the limit asked for.
    pub publications: Vec<(u64, Publication)>,
}

/// Messages of a stream a node knows it missed and cannot deliver, to be
/// announced to the stream's sessions there (a GAP frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamGap {
    /// The stream (a topic or room target).
    pub stream: Target,
    /// The epoch the missing range belongs to.
    pub epoch: Arc<str>,
    /// First and last missing sequence numbers (`to_seq` 0: unknown).
    pub from_seq: u64,
    /// See `from_seq`.
    pub to_seq: u64,
    /// `lost` (the node missed them and history does not have them) or
    /// `epoch` (the stream restarted).
    pub reason: &'static str,
}

/// What publishing did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Published {
    /// Sequence number of the message within its topic or room (0 otherwise).
    pub seq: u64,
    /// The epoch `seq` counts in (empty when not numbered).
    pub epoch: Arc<str>,
    /// Sessions it was handed to, as far as the publishing node can tell
    /// (with a networked broker: those on the publishing node).
    pub sessions: usize,
    /// Nodes that took it (this one included).
    pub nodes: usize,
    /// It was published before under the same idempotency key: nothing was
    /// published now, and `seq`/`epoch` are the first publication's.
    pub duplicate: bool,
}

/// What a node has local recipients for; a networked broker routes to a
/// node only what it has declared interest in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Interest {
    /// A subscription to a topic or pattern.
    Topic(Topic),
    /// Membership of a room.
    Room(Arc<str>),
    /// A session of a user.
    User(Arc<str>),
}

/// How a broker is doing, for `/healthz` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BrokerStatus {
    /// The broker cannot currently reach the other nodes: local delivery
    /// goes on, what cannot cross nodes is counted.
    pub degraded: bool,
    /// Publications delivered on this node only, because the backend was
    /// unreachable.
    pub local_only: u64,
    /// Backend operations that failed (publish, interest, probe).
    pub failures: u64,
    /// Publications received from the backend.
    pub received: u64,
    /// Received publications that matched no session here.
    pub unmatched: u64,
    /// Reconnections of the subscription connection.
    pub reconnects: u64,
}

/// A member joined or left a room, as every node hears of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    /// The room.
    pub room: Arc<str>,
    /// True for a join, false for a leave.
    pub joined: bool,
    /// The member's session.
    pub session_id: Arc<str>,
    /// The member's user, when known.
    pub user_id: Option<Arc<str>>,
    /// Members of the room after the change, on every node.
    pub count: u32,
}

/// One session's membership of one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The room.
    pub room: Arc<str>,
    /// The member's session.
    pub session_id: Arc<str>,
    /// The member's user, when known.
    pub user_id: Option<Arc<str>>,
}

/// A room's members on every node, as a broker that keeps presence knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomMembers {
    /// How many there are.
    pub count: u32,
    /// (session id, user id) of each, possibly fewer than `count`.
    pub members: Vec<(String, String)>,
}

/// A node's side of the broker: where publications are delivered.
pub trait BrokerEventHandler: Send + Sync + 'static {
    /// Queues a numbered publication for this node's recipients and returns
    /// how many sessions it was handed to. Must not wait: it runs on the
    /// broker's delivery path.
    fn handle_publication(&self, publication: &Publication, position: &Position) -> usize;

    /// How many sessions on this node `target` reaches now (what a broker
    /// that delivers later reports as a publication's local reach).
    fn recipients(&self, target: &Target) -> usize;

    /// Tells this node's members of the room who asked for presence events.
    fn handle_presence(&self, change: &PresenceChange);

    /// Tells this node's sessions of a stream that messages of it were
    /// missed and cannot be delivered. Must not wait.
    fn handle_gap(&self, gap: &StreamGap) {
        let _ = gap;
    }

    /// This node's room memberships. A broker that keeps presence
    /// re-registers them after an outage.
    fn local_members(&self) -> Vec<Membership>;
}

/// Carries publications to every node's [`BrokerEventHandler`].
pub trait Broker: Send + Sync + 'static {
    /// Registers a node's handler. It is held weakly, so a node that is
    /// dropped stops receiving without unregistering.
    fn register_event_handler(&self, handler: Weak<dyn BrokerEventHandler>);

    /// Numbers `publication` within its stream (see [`Target::stream_key`]),
    /// keeps it in the stream's history when its policy says so, and
    /// delivers it on every node.
    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Published, BrokerError>>;

    /// Reads the history of `stream` (a topic or a room target): messages
    /// after `since` when it is a position of the current epoch, else from
    /// the start of the current epoch; at most `limit`.
    fn history<'a>(
        &'a self,
        stream: &'a Target,
        since: Option<&'a Position>,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>>;

    /// This node now has local recipients for `interest` (called for each
    /// new subscription, membership or session of a user). Completes once
    /// publications for it will reach this node.
    ///
    /// # Errors
    /// When that could not be made sure of in time. The broker keeps trying
    /// and registers it when it heals, but publications made meanwhile do
    /// not reach this node: a caller about to replay history must not rely
    /// on live delivery to follow on seamlessly.
    fn add_interest(&self, interest: &[Interest]) -> BoxFuture<'_, Result<(), BrokerError>> {
        let _ = interest;
        Box::pin(std::future::ready(Ok(())))
    }

    /// The counterpart of [`Broker::add_interest`], once per ended
    /// subscription, membership or session. Must not wait.
    fn remove_interest(&self, interest: &[Interest]) {
        let _ = interest;
    }

    /// The id this broker knows its node by, when it was given one (a
    /// networked broker names the node's inbox after it); the node must use
    /// the same, since session ids carry it.
    fn node_id(&self) -> Option<Arc<str>> {
        None
    }

    /// How the broker is doing.
    fn status(&self) -> BrokerStatus {
        BrokerStatus::default()
    }

    /// Whether this broker keeps room presence across nodes (and delivers
    /// join and leave events to every node, this one included). When it
    /// does not, each node's hub keeps its own and announces changes itself.
    fn keeps_presence(&self) -> bool {
        false
    }

    /// Records a join or leave and announces it to the room's members on
    /// every node. Only called when [`Broker::keeps_presence`]. The change
    /// is taken when this is called; the future completes once it is
    /// recorded (bounded), and may be dropped.
    fn change_presence(
        &self,
        room: &str,
        joined: bool,
        session_id: &str,
        user_id: Option<&str>,
    ) -> BoxFuture<'_, ()> {
        let _ = (room, joined, session_id, user_id);
        Box::pin(std::future::ready(()))
    }

    /// Records that `device` (a `USER/DEVICE` key) has processed each
    /// stream (`t:TOPIC` / `r:ROOM` / `u:USER`) up to its position; a
    /// position never moves back within an epoch. Bounded.
    ///
    /// # Errors
    /// When the backend cannot be reached (the failure is also counted).
    fn save_acknowledged<'a>(
        &'a self,
        device: &'a str,
        acks: &'a [(String, Position)],
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// The positions `device` acknowledged, by stream; empty when unknown.
    ///
    /// # Errors
    /// When the backend cannot be reached: "unknown" and "could not be
    /// read" must not be confused (a device taken for new would skip what
    /// it missed).
    fn acknowledged<'a>(
        &'a self,
        device: &'a str,
    ) -> BoxFuture<'a, Result<HashMap<String, Position>, BrokerError>>;

    /// A room's members on every node; `None` when the broker does not keep
    /// presence or cannot reach its backend (the node then answers with
    /// its own members).
    fn room_members(&self, room: &str) -> BoxFuture<'_, Option<RoomMembers>> {
        let _ = room;
        Box::pin(std::future::ready(None))
    }
}
