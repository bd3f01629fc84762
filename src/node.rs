//! One server process in a deployment: its id, its hub of local sessions,
//! the broker that connects it to the other nodes, and its counters.
//!
//! Handlers act on the deployment through the node: [`Node::publish`] goes
//! to the broker, which numbers the publication and hands it to every
//! node's hub (this one's included); subscriptions and room memberships are
//! recorded in this node's hub.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use wsproto_proto::v1;

use crate::{
    broker::{
        Broker, BrokerError, Interest, MemoryBroker, Position, Publication, Published, Target,
    },
    hub::{Hub, HubConfig, HubError, MAX_LISTED_MEMBERS},
    metrics::Counters,
    queue::SessionQueue,
    recovery::{self, MAX_REPLAY},
    topic::Topic,
};

/// A device's recovery of its user's stream, between
/// [`Node::begin_user_stream`] and [`Node::recover_user_stream`].
pub(crate) struct UserStream {
    stream: Target,
    since: Position,
}

/// The key a session's queue follows a stream's positions by.
fn stream_key(stream: &Target) -> String {
    stream.stream_key().unwrap_or_default()
}

pub use crate::metrics::CounterSnapshot;

/// A node of a deployment; cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    /// Prefix of every session id, so ids stay unique across nodes and
    /// restarts and say which node a session is on.
    id: Arc<str>,
    next_session: AtomicU64,
    started_at: Instant,
    hub: Hub,
    broker: Arc<dyn Broker>,
    counters: Counters,
}

impl Default for Node {
    fn default() -> Node {
        Node::new()
    }
}

impl Node {
    /// A single node with default hub settings and a [`MemoryBroker`].
    pub fn new() -> Node {
        Node::with_broker(HubConfig::default(), Arc::new(MemoryBroker::new()))
    }

    /// A node with a generated id whose hub (with `config`) receives what
    /// `broker` delivers.
    pub fn with_broker(config: HubConfig, broker: Arc<dyn Broker>) -> Node {
        Node::with_id(Node::generated_id(), config, broker)
    }

    /// As [`Node::with_broker`], with a chosen id (unique in the deployment).
    pub fn with_id(id: impl Into<Arc<str>>, config: HubConfig, broker: Arc<dyn Broker>) -> Node {
        let hub = Hub::with_config(config);
        if broker.keeps_presence() {
            hub.leave_presence_to_broker();
        }
        broker.register_event_handler(hub.event_handler());
        Node {
            inner: Arc::new(Inner {
                id: id.into(),
                next_session: AtomicU64::new(1),
                started_at: Instant::now(),
                hub,
                broker,
                counters: Counters::default(),
            }),
        }
    }

    /// A node id for a node that was given none: eight hex digits, random
    /// per process.
    pub fn generated_id() -> String {
        format!("{:08x}", RandomState::new().hash_one(Instant::now()) as u32)
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// A new session id: `NODE-N`.
    pub(crate) fn next_session_id(&self) -> Arc<str> {
        let n = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.inner.id).into()
    }

    /// This node's sessions and their indexes.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// The broker publications go through.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// Counts of the limits that tripped on this node.
    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// A copy of this node's counts of the limits that tripped (refused
    /// upgrades, rate-limited frames, slow consumers, ...).
    pub fn counter_snapshot(&self) -> CounterSnapshot {
        self.inner.counters.snapshot()
    }

    /// How long this node has been up.
    pub fn uptime(&self) -> Duration {
        self.inner.started_at.elapsed()
    }

    /// Makes a session reachable on this node and, for a user's session,
    /// tells the broker (so pushes to the user reach it from any node).
    ///
    /// # Errors
    /// When the broker could not make sure of that in time (see
    /// [`Broker::add_interest`]); the session is registered all the same.
    pub async fn register(
        &self,
        session_id: Arc<str>,
        user_id: Option<Arc<str>>,
        queue: SessionQueue,
    ) -> Result<(), BrokerError> {
        self.hub().register(session_id, user_id.clone(), queue);
        match user_id {
            Some(user) => self.broker().add_interest(&[Interest::User(user)]).await,
            None => Ok(()),
        }
    }

    /// Removes a session and everything it held, here and at the broker.
    pub fn unregister(&self, session_id: &str) {
        let held = self.hub().unregister(session_id);
        if self.broker().keeps_presence() {
            let user = held.iter().find_map(|i| match i {
                Interest::User(user) => Some(user.clone()),
                _ => None,
            });
            for interest in &held {
                if let Interest::Room(room) = interest {
                    // Taken now; written in the background.
                    drop(
                        self.broker()
                            .change_presence(room, false, session_id, user.as_deref()),
                    );
                }
            }
        }
        self.broker().remove_interest(&held);
    }

    /// Subscribes a session to every topic given, or, past the limit, to
    /// none of them; returns how many were new. Completes once publications
    /// to them reach this node.
    ///
    /// # Errors
    /// Past the per-session subscription limit, or for an unknown session.
    pub async fn subscribe_all(
        &self,
        session_id: &str,
        topics: &[Topic],
    ) -> Result<usize, HubError> {
        let (new, _routed) = self.subscribe_routed(session_id, topics).await?;
        Ok(new.len())
    }

    /// [`Node::subscribe_all`], with the subscriptions that are new and
    /// whether the broker routes them here (see [`Broker::add_interest`]).
    async fn subscribe_routed(
        &self,
        session_id: &str,
        topics: &[Topic],
    ) -> Result<(Vec<Topic>, Result<(), BrokerError>), HubError> {
        let new = self.hub().subscribe_new(session_id, topics)?;
        let interest: Vec<Interest> = new.iter().cloned().map(Interest::Topic).collect();
        let routed = self.broker().add_interest(&interest).await;
        Ok((new, routed))
    }

    /// Ends a subscription; returns false if there was none.
    pub fn unsubscribe(&self, session_id: &str, topic: &Topic) -> bool {
        let removed = self.hub().unsubscribe(session_id, topic);
        if let Some(queue) = self.hub().queue_of(session_id) {
            queue.forget_stream(&stream_key(&Target::Topic(topic.clone())));
        }
        if removed {
            self.broker()
                .remove_interest(&[Interest::Topic(topic.clone())]);
        }
        removed
    }

    /// Adds a session to a room and returns the room's presence; members
    /// that asked for presence events hear of it.
    ///
    /// # Errors
    /// Past the per-session room limit, or for an unknown session.
    pub async fn join(
        &self,
        session_id: &str,
        room: &Topic,
        presence_events: bool,
    ) -> Result<v1::Presence, HubError> {
        let (presence, _routed) = self.join_routed(session_id, room, presence_events).await?;
        Ok(presence)
    }

    /// [`Node::join`], and whether the broker routes the room here (see
    /// [`Broker::add_interest`]).
    async fn join_routed(
        &self,
        session_id: &str,
        room: &Topic,
        presence_events: bool,
    ) -> Result<(v1::Presence, Result<(), BrokerError>), HubError> {
        let (presence, joined) = self.hub().join_new(session_id, room, presence_events)?;
        let routed = match joined {
            true => {
                let interest = Interest::Room(room.as_str().into());
                self.broker().add_interest(&[interest]).await
            }
            false => Ok(()),
        };
        if !self.broker().keeps_presence() {
            return Ok((presence, routed));
        }
        if joined {
            let user = self.hub().user_of(session_id);
            self.broker()
                .change_presence(room.as_str(), true, session_id, user.as_deref())
                .await;
        }
        Ok((self.room_presence(room.as_str()).await, routed))
    }

    /// Who is in a room, on every node when the broker keeps presence
    /// (else, or while it cannot be reached, on this node).
    pub async fn room_presence(&self, room: &str) -> v1::Presence {
        let Some(mut all) = self.broker().room_members(room).await else {
            return self.hub().room_presence(room);
        };
        all.members.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        all.members.truncate(MAX_LISTED_MEMBERS);
        v1::Presence {
            room: room.to_owned(),
            topic: String::new(),
            count: all.count,
            stream: None,
            members: all
                .members
                .into_iter()
                .map(|(session_id, user_id)| v1::Member {
                    session_id,
                    user_id,
                })
                .collect(),
        }
    }

    /// Removes a session from a room; returns false if it was not there.
    pub async fn leave(&self, session_id: &str, room: &str) -> bool {
        let user = self.hub().user_of(session_id);
        let left = self.hub().leave(session_id, room);
        if let Some(queue) = self.hub().queue_of(session_id) {
            let stream = Target::Room {
                room: room.into(),
                exclude: None,
            };
            queue.forget_stream(&stream_key(&stream));
        }
        if left {
            if self.broker().keeps_presence() {
                let change =
                    self.broker()
                        .change_presence(room, false, session_id, user.as_deref());
                change.await;
            }
            self.broker()
                .remove_interest(&[Interest::Room(room.into())]);
        }
        left
    }

    /// Subscribes a session to `topics` and recovers the streams it names
    /// in `since` (each a topic name covered by `topics`, with the last
    /// position the client saw); see [`crate::recovery`]. Returns where
    /// each stream of `since` and of `report` stands.
    ///
    /// # Errors
    /// As [`Node::subscribe_all`]; nothing is subscribed or recovered then.
    pub async fn subscribe_recovering(
        &self,
        session_id: &str,
        topics: &[Topic],
        since: &[(Topic, Position)],
        report: &[Topic],
    ) -> Result<Vec<v1::StreamState>, HubError> {
        let queue = self
            .hub()
            .queue_of(session_id)
            .ok_or(HubError::NotConnected)?;
        let streams: Vec<(Target, &Position)> = since
            .iter()
            .map(|(topic, position)| (Target::Topic(topic.clone()), position))
            .collect();
        for (stream, _) in &streams {
            queue.begin_recovery(&stream_key(stream));
        }
        let forget = || {
            for (stream, _) in &streams {
                queue.forget_stream(&stream_key(stream));
            }
        };
        match self.subscribe_routed(session_id, topics).await {
            Err(err) => {
                forget();
                return Err(err);
            }
            // A replay followed by live messages that may not come: refused
            // instead, with nothing changed, so the client retries.
            Ok((new, Err(_))) if !streams.is_empty() => {
                for topic in &new {
                    self.unsubscribe(session_id, topic);
                }
                forget();
                return Err(HubError::NotRouted);
            }
            Ok(_) => {}
        }
        let mut states = Vec::with_capacity(streams.len() + report.len());
        for (stream, position) in &streams {
            states.push(self.recover(&queue, stream, Some(position)).await);
        }
        for topic in report {
            if !since.iter().any(|(t, _)| t == topic) {
                states.push(self.stream_state(&Target::Topic(topic.clone())).await);
            }
        }
        Ok(states)
    }

    /// [`Node::join`], then the room stream's state, recovered from `since`
    /// when given (see [`Node::subscribe_recovering`]).
    ///
    /// # Errors
    /// As [`Node::join`].
    pub async fn join_recovering(
        &self,
        session_id: &str,
        room: &Topic,
        presence_events: bool,
        since: Option<&Position>,
    ) -> Result<v1::Presence, HubError> {
        let stream = Target::Room {
            room: room.as_str().into(),
            exclude: None,
        };
        let queue = self
            .hub()
            .queue_of(session_id)
            .ok_or(HubError::NotConnected)?;
        if since.is_some() {
            queue.begin_recovery(&stream_key(&stream));
        }
        let mut presence = match self.join_routed(session_id, room, presence_events).await {
            Ok((presence, Ok(()))) => presence,
            Ok((presence, Err(_))) if since.is_none() => presence,
            // As for subscriptions: refused with nothing changed rather
            // than a replay that live messages may not follow.
            Ok((_, Err(_))) => {
                self.leave(session_id, room.as_str()).await;
                queue.forget_stream(&stream_key(&stream));
                return Err(HubError::NotRouted);
            }
            Err(err) => {
                queue.forget_stream(&stream_key(&stream));
                return Err(err);
            }
        };
        presence.stream = Some(match since {
            Some(position) => self.recover(&queue, &stream, Some(position)).await,
            None => self.stream_state(&stream).await,
        });
        Ok(presence)
    }

    /// Replays what a session missed in `stream` since `since` (its
    /// recovery begun) and says how it went.
    async fn recover(
        &self,
        queue: &SessionQueue,
        stream: &Target,
        since: Option<&Position>,
    ) -> v1::StreamState {
        let history = self.broker().history(stream, since, MAX_REPLAY).await;
        let mut plan = recovery::plan(stream, since, history);
        plan.replay.critical = self.is_critical(stream);
        queue.replay(&stream_key(stream), plan.replay).await;
        plan.state
    }

    /// Whether deliveries of `stream` wait for a device's acknowledgement:
    /// critical topics and users' streams of critical pushes.
    fn is_critical(&self, stream: &Target) -> bool {
        match stream {
            Target::Topic(topic) => self.hub().policy(topic).critical,
            Target::UserStream(_) => true,
            _ => false,
        }
    }

    /// The first half of a device's recovery of its user's stream of
    /// critical pushes, before its session is registered: where the device
    /// acknowledged the stream up to. A device seen for the first time
    /// starts where the stream stands now, and that is saved as its
    /// acknowledged position, so that what is published while it is away
    /// is recovered from then on. Live pushes are held from here until
    /// [`Node::recover_user_stream`].
    ///
    /// # Errors
    /// When the broker cannot say where the device stands (or record where
    /// a new one starts): the session cannot promise what it missed and
    /// should be closed for the device to come back later.
    pub(crate) async fn begin_user_stream(
        &self,
        device: &str,
        user: &str,
        queue: &SessionQueue,
    ) -> Result<UserStream, BrokerError> {
        let stream = Target::UserStream(user.into());
        let key = stream_key(&stream);
        let since = match self.broker().acknowledged(device).await?.remove(&key) {
            Some(position) => position,
            None => {
                let history = self.broker().history(&stream, None, 1).await?;
                let start = Position::new(history.epoch, history.top);
                let acks = [(key.clone(), start.clone())];
                self.broker().save_acknowledged(device, &acks).await?;
                start
            }
        };
        queue.begin_recovery(&key);
        Ok(UserStream { stream, since })
    }

    /// The second half, once the session is registered and its writer
    /// runs: replays what the device has not acknowledged (a GAP for what
    /// history no longer has), then the live pushes held meanwhile.
    pub(crate) async fn recover_user_stream(
        &self,
        queue: &SessionQueue,
        user_stream: UserStream,
    ) -> v1::StreamState {
        self.recover(queue, &user_stream.stream, Some(&user_stream.since))
            .await
    }

    /// Where a stream stands now (for a client's first subscription).
    async fn stream_state(&self, stream: &Target) -> v1::StreamState {
        let history = self.broker().history(stream, None, 1).await;
        recovery::plan(stream, None, history).state
    }

    /// Publishes through the broker, which delivers on every node.
    ///
    /// # Errors
    /// When the broker cannot take the publication.
    pub async fn publish(&self, publication: Publication) -> Result<Published, BrokerError> {
        self.inner.broker.publish(publication).await
    }
}
