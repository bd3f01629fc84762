//! The Redis broker: several nodes on one Redis act as one server.
//!
//! **Routing.** Each node subscribes to two Redis channels only: its inbox
//! `{prefix}:n:{node}` and the broadcast channel `{prefix}:all`. What a node
//! has local recipients for is recorded in Redis as *interest sets* (node
//! ids, each set with a TTL that the node keeps refreshing):
//! `{prefix}:i:r:{room}`, `{prefix}:i:u:{user}` and, for topics, sets keyed
//! by the pattern's literal prefix (see [`topic_interest`]). One Lua call per
//! publication numbers it (`{prefix}:s:{stream}` holds the stream's epoch
//! and sequence number), keeps it in the stream's history when its policy
//! asks for one (a Redis stream, `{prefix}:h:{stream}`), reads the
//! union of the interest sets the publication may concern and `PUBLISH`es
//! it once to each of those nodes' inboxes. So a node receives only what
//! may concern it, never twice, and the script's receiver count is exactly
//! the number of nodes that took it; Redis runs each call atomically, so a
//! stream's publications reach every inbox in sequence order.
//!
//! **Receiving** happens on one task per node, reading the subscription
//! connection and handing each publication to the node's hub, which only
//! queues frames: the read side never waits on a session, so Redis never
//! has a reason to cut a slow subscriber.
//!
//! **Outages.** Commands time out after [`RedisSettings::command_timeout`].
//! A publication Redis cannot take is still delivered on this node (with
//! sequence number 0) and counted; the node reports itself `degraded`. The
//! subscription connection is probed with `PING` every
//! [`RedisSettings::probe_interval`], so a connection that died silently is
//! replaced; every (re)connection re-registers the node's interest, so a
//! node heals on its own once Redis is back.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message as _;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{
    ordered::{OrderedCalls, ScriptCall},
    BoxFuture, Broker, BrokerError, BrokerEventHandler, BrokerStatus, History, HistoryPolicies,
    HistoryPolicy, Interest, Membership, Position, PresenceChange, Publication, Published,
    RoomMembers, Sender, StreamGap, Target, IDEMPOTENCY_TTL, MAX_REPLAY,
};
use crate::topic::Topic;

/// Topic interest and routing look at this many leading literal segments:
/// deeper prefixes route more precisely but cost one more interest set per
/// publication.
const TOPIC_DEPTH: usize = 2;
/// Interest operations waiting for the interest task; past it removals are
/// dropped (their sets expire) and additions wait.
const INTEREST_QUEUE: usize = 4096;
/// Interest keys refreshed per pipeline.
const REFRESH_BATCH: usize = 500;
/// Pause before interest that could not be written is written again.
const RETRY: Duration = Duration::from_millis(200);
/// Streams whose last received position a node keeps (to catch up after
/// its subscription connection was lost).
const MAX_TRACKED_STREAMS: usize = 100_000;

/// Where a Redis broker connects and how it names things.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// Prefix of every key and channel, so deployments can share a Redis.
    pub prefix: String,
    /// This node's id, unique in the deployment (it names the inbox).
    pub node_id: Arc<str>,
    /// How long a command may take before the broker counts Redis as
    /// unreachable.
    pub command_timeout: Duration,
    /// How often the subscription connection is probed; one that does not
    /// answer within the interval is replaced.
    pub probe_interval: Duration,
    /// Lifetime of an interest set the node stops refreshing (a node that
    /// died stops receiving after at most this long).
    pub interest_ttl: Duration,
    /// Lifetime of an idle stream's sequence counter.
    pub sequence_ttl: Duration,
    /// A node that has not said it is alive for this long is taken for dead:
    /// the others remove its room members and announce them gone.
    pub node_ttl: Duration,
    /// Which streams keep history (in a Redis stream per topic or room).
    pub history: HistoryPolicies,
}

impl RedisSettings {
    /// Settings with the defaults: prefix `wsproto`, 500 ms commands, 1 s
    /// probes, 30 s interest, 7 days of sequence, nodes dead after 3 s.
    pub fn new(url: impl Into<String>, node_id: impl Into<Arc<str>>) -> RedisSettings {
        RedisSettings {
            url: url.into(),
            prefix: "wsproto".into(),
            node_id: node_id.into(),
            command_timeout: Duration::from_millis(500),
            probe_interval: Duration::from_secs(1),
            interest_ttl: Duration::from_secs(30),
            sequence_ttl: Duration::from_secs(7 * 24 * 3600),
            node_ttl: Duration::from_secs(3),
            history: HistoryPolicies::default(),
        }
    }
}

/// A broker on a Redis server; see the module docs. Cheap to share.
pub struct RedisBroker {
    shared: Arc<Shared>,
    interest_ops: mpsc::Sender<InterestOp>,
    interest_rx: Mutex<Option<mpsc::Receiver<InterestOp>>>,
}

struct Shared {
    settings: RedisSettings,
    client: redis::Client,
    commands: ConnectionManager,
    publish: redis::Script,
    /// Publications, sent in the order they were made.
    ordered: OrderedCalls,
    history: redis::Script,
    acknowledge: redis::Script,
    presence_write: redis::Script,
    presence_read: redis::Script,
    sweep: redis::Script,
    handler: OnceLock<Weak<dyn BrokerEventHandler>>,
    /// Interest keys with how many local subscriptions, memberships or
    /// sessions need each.
    interest: Mutex<HashMap<String, usize>>,
    /// The last position received per stream (key: [`Target::stream_key`]),
    /// to drop a message received twice and, after the subscription
    /// connection was lost, to find what was missed meanwhile.
    received_positions: Mutex<HashMap<String, Position>>,
    /// Held by a publication delivered here directly (not subscribed) and
    /// by a catch-up, so a catch-up never takes a message being delivered
    /// here for one this node missed.
    local_delivery: tokio::sync::Mutex<()>,
    subscribed: AtomicBool,
    /// Some interest this node needs is not written in Redis yet (a write
    /// failed and waits for its retry).
    interest_unwritten: AtomicBool,
    commands_ok: AtomicBool,
    local_only: AtomicU64,
    failures: AtomicU64,
    received: AtomicU64,
    unmatched: AtomicU64,
    reconnects: AtomicU64,
}

enum InterestOp {
    /// Keys to add; answered whether they were written.
    Add(Vec<String>, oneshot::Sender<bool>),
    Remove(Vec<String>),
    /// Re-register everything (after a reconnection).
    Refresh,
    /// A member joined or left a room on this node.
    Presence {
        room: Arc<str>,
        joined: bool,
        session_id: Arc<str>,
        user_id: Option<Arc<str>>,
        done: oneshot::Sender<()>,
    },
}

/// Numbers the publication (when it has a stream) in the stream's epoch,
/// keeps it in the stream's history when asked, then publishes it to a
/// direct channel or to every node in the union of the interest sets but
/// the one named in ARGV[6] (a publisher that is not subscribed right now
/// delivers to itself). Numbering, history and publishing are one atomic
/// step, so history holds exactly what was published, in order.
/// KEYS: [stream hash `s:STREAM` and history `h:STREAM` if ARGV[1] ==
/// 'seq'], interest sets...
/// ARGV: 'seq' to number it ('': unnumbered; else a number to send in
/// front, such as a presence event's count), sequence TTL (s), payload,
/// inbox prefix, direct channel, node to skip, the epoch to start if the
/// stream has none, history length ('': none), history TTL (s), the
/// idempotency key's key ('': none) and its TTL (s).
/// Messages are `SEQ:EPOCH:PAYLOAD`; returns {seq, nodes, epoch, duplicate}
/// (a key seen before returns the first publication's answer and publishes
/// nothing).
const PUBLISH_SCRIPT: &str = r"
local idempotency = ARGV[10] or ''
if idempotency ~= '' then
  local prior = redis.call('GET', idempotency)
  if prior then
    local seq, nodes, epoch = string.match(prior, '^(%d+):(%d+):(.*)$')
    return {tonumber(seq), tonumber(nodes), epoch, 1}
  end
end
local first = 1
local seq = 0
local epoch = ''
if ARGV[1] == 'seq' then
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  epoch = redis.call('HGET', KEYS[1], 'epoch')
  if not epoch then
    epoch = ARGV[7]
    redis.call('HSET', KEYS[1], 'epoch', epoch)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  if ARGV[8] ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[8], '0-' .. seq, 'p', ARGV[3])
    redis.call('EXPIRE', KEYS[2], ARGV[9])
  end
  first = 3
elseif ARGV[1] ~= '' then
  seq = ARGV[1]
end
local message = seq .. ':' .. epoch .. ':' .. ARGV[3]
local nodes = 0
if ARGV[5] ~= '' then
  nodes = redis.call('PUBLISH', ARGV[5], message)
elseif #KEYS >= first then
  local members = redis.call('SUNION', unpack(KEYS, first))
  for _, node in ipairs(members) do
    if node ~= ARGV[6] then
      nodes = nodes + redis.call('PUBLISH', ARGV[4] .. node, message)
    end
  end
end
if idempotency ~= '' then
  redis.call('SET', idempotency, seq .. ':' .. nodes .. ':' .. epoch, 'EX', ARGV[11])
end
return {seq, nodes, epoch, 0}
";

/// Keeps a device's acknowledged positions (hash KEYS[1], field stream,
/// value `SEQ:EPOCH`, TTL ARGV[1]); ARGV[2..] are (stream, epoch, seq)
/// triples. A position never moves back within its epoch.
const ACKNOWLEDGE_SCRIPT: &str = r"
for i = 2, #ARGV, 3 do
  local stream, epoch, seq = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local current = redis.call('HGET', KEYS[1], stream)
  local write = true
  if current then
    local cseq, cepoch = string.match(current, '^(%d+):(.*)$')
    write = cepoch ~= epoch or tonumber(cseq) < seq
  end
  if write then redis.call('HSET', KEYS[1], stream, seq .. ':' .. epoch) end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
";

/// Reads a stream's history: its epoch (starting one, ARGV[4], if the
/// stream has none, with TTL ARGV[5]), its latest sequence number, and up
/// to ARGV[3] kept entries after ARGV[2] when ARGV[1] is the current epoch,
/// else from the start. KEYS: stream hash, history.
/// Returns {epoch, top, {id, {field, value}}...}.
const HISTORY_SCRIPT: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('DEL', KEYS[2])
end
local top = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local after = 0
if ARGV[1] == epoch then after = tonumber(ARGV[2]) end
local entries = redis.call('XRANGE', KEYS[2], '0-' .. (after + 1), '+', 'COUNT', ARGV[3])
return {epoch, top, entries}
";

/// Members of a room on the nodes still alive (this one always counts).
/// A Lua fragment shared by the presence scripts: defines `members(room)`.
const LIVE_MEMBERS: &str = r"
local prefix, me = ARGV[1], ARGV[2]
local function live(node)
  return node == me or redis.call('EXISTS', prefix .. ':alive:' .. node) == 1
end
local function count(room)
  local n = 0
  for _, node in ipairs(redis.call('SMEMBERS', prefix .. ':prn:' .. room)) do
    if live(node) then n = n + redis.call('HLEN', prefix .. ':pm:' .. node .. ':' .. room) end
  end
  return n
end
";

/// Records a join (ARGV[4] == '1') or leave of session ARGV[5] (user
/// ARGV[6]) in room ARGV[3] on node ARGV[2]; returns the room's live count.
/// Keys: `pm:NODE:ROOM` (session → user), `prn:ROOM` (nodes with members),
/// `pn:NODE` (rooms with members), each with TTL ARGV[7].
const PRESENCE_WRITE: &str = r"
local room, ttl = ARGV[3], ARGV[7]
local pm = prefix .. ':pm:' .. me .. ':' .. room
local prn = prefix .. ':prn:' .. room
local pn = prefix .. ':pn:' .. me
if ARGV[4] == '1' then
  redis.call('HSET', pm, ARGV[5], ARGV[6])
  redis.call('EXPIRE', pm, ttl)
  redis.call('SADD', prn, me)
  redis.call('EXPIRE', prn, ttl)
  redis.call('SADD', pn, room)
  redis.call('EXPIRE', pn, ttl)
else
  redis.call('HDEL', pm, ARGV[5])
  if redis.call('HLEN', pm) == 0 then
    redis.call('SREM', prn, me)
    redis.call('SREM', pn, room)
  end
end
return count(room)
";

/// Room ARGV[3]'s live members: {count, session, user, session, user, …}.
const PRESENCE_READ: &str = r"
local room = ARGV[3]
local out = {0}
for _, node in ipairs(redis.call('SMEMBERS', prefix .. ':prn:' .. room)) do
  if live(node) then
    local pairs = redis.call('HGETALL', prefix .. ':pm:' .. node .. ':' .. room)
    for i = 1, #pairs do out[#out + 1] = pairs[i] end
  end
end
out[1] = (#out - 1) / 2
return out
";

/// Removes every member node ARGV[3] had (a dead node, or this node's own
/// previous life) and forgets the node; returns {room, session, user,
/// count after, …} for the leave events.
const SWEEP: &str = r"
local node = ARGV[3]
local pn = prefix .. ':pn:' .. node
local removed = {}
for _, room in ipairs(redis.call('SMEMBERS', pn)) do
  local pm = prefix .. ':pm:' .. node .. ':' .. room
  local pairs = redis.call('HGETALL', pm)
  redis.call('DEL', pm)
  redis.call('SREM', prefix .. ':prn:' .. room, node)
  local after = tostring(count(room))
  for i = 1, #pairs, 2 do
    removed[#removed + 1] = room
    removed[#removed + 1] = pairs[i]
    removed[#removed + 1] = pairs[i + 1]
    removed[#removed + 1] = after
  end
end
redis.call('DEL', pn)
if node ~= me then
  redis.call('ZREM', prefix .. ':nodes', node)
end
return removed
";

static PRESENCE_WRITE_SCRIPT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{LIVE_MEMBERS}{PRESENCE_WRITE}"));
static PRESENCE_READ_SCRIPT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{LIVE_MEMBERS}{PRESENCE_READ}"));
static SWEEP_SCRIPT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{LIVE_MEMBERS}{SWEEP}"));

impl RedisBroker {
    /// A broker for `settings`. It connects lazily, so a node starts (in
    /// degraded mode) even while Redis is unreachable.
    ///
    /// # Errors
    /// When the URL is not a valid Redis URL.
    pub fn new(settings: RedisSettings) -> Result<RedisBroker, BrokerError> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| BrokerError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.command_timeout))
            .set_connection_timeout(Some(settings.command_timeout))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(2);
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let (interest_ops, interest_rx) = mpsc::channel(INTEREST_QUEUE);
        let publish = redis::Script::new(PUBLISH_SCRIPT);
        Ok(RedisBroker {
            shared: Arc::new(Shared {
                settings,
                client,
                ordered: OrderedCalls::new(commands.clone(), publish.clone()),
                commands,
                publish,
                history: redis::Script::new(HISTORY_SCRIPT),
                acknowledge: redis::Script::new(ACKNOWLEDGE_SCRIPT),
                presence_write: redis::Script::new(&PRESENCE_WRITE_SCRIPT),
                presence_read: redis::Script::new(&PRESENCE_READ_SCRIPT),
                sweep: redis::Script::new(&SWEEP_SCRIPT),
                handler: OnceLock::new(),
                interest: Mutex::new(HashMap::new()),
                received_positions: Mutex::new(HashMap::new()),
                local_delivery: tokio::sync::Mutex::new(()),
                subscribed: AtomicBool::new(false),
                interest_unwritten: AtomicBool::new(false),
                commands_ok: AtomicBool::new(true),
                local_only: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                received: AtomicU64::new(0),
                unmatched: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
            }),
            interest_ops,
            interest_rx: Mutex::new(Some(interest_rx)),
        })
    }
}

impl Broker for RedisBroker {
    /// Registers the node and starts the subscription and interest tasks.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    fn register_event_handler(&self, handler: Weak<dyn BrokerEventHandler>) {
        if self.shared.handler.set(handler).is_err() {
            warn!("a Redis broker serves one node; a second one was not registered");
            return;
        }
        let Some(rx) = self
            .interest_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        self.shared.ordered.start();
        tokio::spawn(subscription_loop(
            self.shared.clone(),
            self.interest_ops.clone(),
        ));
        tokio::spawn(interest_loop(self.shared.clone(), rx));
        tokio::spawn(liveness_loop(self.shared.clone()));
    }

    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Published, BrokerError>> {
        Box::pin(self.shared.publish(publication))
    }

    fn save_acknowledged<'a>(
        &'a self,
        device: &'a str,
        acks: &'a [(String, Position)],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(self.shared.save_acknowledged(device, acks))
    }

    fn acknowledged<'a>(
        &'a self,
        device: &'a str,
    ) -> BoxFuture<'a, Result<HashMap<String, Position>, BrokerError>> {
        Box::pin(self.shared.acknowledged(device))
    }

    fn history<'a>(
        &'a self,
        stream: &'a Target,
        since: Option<&'a Position>,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        Box::pin(self.shared.history(stream, since, limit))
    }

    fn add_interest(&self, interest: &[Interest]) -> BoxFuture<'_, Result<(), BrokerError>> {
        let new = self.shared.count_interest(interest, true);
        Box::pin(async move {
            let unrouted = || {
                Err(BrokerError::Unavailable(
                    "Redis did not take this node's interest in time".into(),
                ))
            };
            // Even with nothing new to write (the keys are needed here
            // already), the answer comes through the queue: an addition of
            // the same keys may still be on its way to Redis.
            let (done, registered) = oneshot::channel();
            if self
                .interest_ops
                .send(InterestOp::Add(new, done))
                .await
                .is_err()
            {
                return unrouted();
            }
            // Bounded: a Redis that does not answer degrades the node; the
            // interest is registered when it heals.
            let wait = self.shared.settings.command_timeout * 2;
            match tokio::time::timeout(wait, registered).await {
                Ok(Ok(true)) => Ok(()),
                _ => unrouted(),
            }
        })
    }

    fn remove_interest(&self, interest: &[Interest]) {
        let gone = self.shared.count_interest(interest, false);
        if !gone.is_empty() {
            // Dropped when the queue is full: the sets then expire instead.
            let _ = self.interest_ops.try_send(InterestOp::Remove(gone));
        }
    }

    fn keeps_presence(&self) -> bool {
        true
    }

    fn node_id(&self) -> Option<Arc<str>> {
        Some(self.shared.settings.node_id.clone())
    }

    fn change_presence(
        &self,
        room: &str,
        joined: bool,
        session_id: &str,
        user_id: Option<&str>,
    ) -> BoxFuture<'_, ()> {
        let (done, written) = oneshot::channel();
        let op = InterestOp::Presence {
            room: room.into(),
            joined,
            session_id: session_id.into(),
            user_id: user_id.map(Into::into),
            done,
        };
        // Queued now, in order with interest changes; the future only
        // waits for it to be written.
        let queued = self.interest_ops.try_send(op).is_ok();
        if !queued {
            // Rewritten from the hub at the next refresh.
            self.shared.failures.fetch_add(1, Ordering::Relaxed);
        }
        let wait = self.shared.settings.command_timeout * 2;
        Box::pin(async move {
            if queued {
                let _ = tokio::time::timeout(wait, written).await;
            }
        })
    }

    fn room_members(&self, room: &str) -> BoxFuture<'_, Option<RoomMembers>> {
        let room = room.to_owned();
        Box::pin(async move { self.shared.room_members(&room).await })
    }

    fn status(&self) -> BrokerStatus {
        let s = &self.shared;
        BrokerStatus {
            degraded: !s.subscribed.load(Ordering::Relaxed)
                || !s.commands_ok.load(Ordering::Relaxed),
            local_only: s.local_only.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            received: s.received.load(Ordering::Relaxed),
            unmatched: s.unmatched.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    fn handler(&self) -> Option<Arc<dyn BrokerEventHandler>> {
        self.handler.get().and_then(Weak::upgrade)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.settings.prefix)
    }

    fn inbox(&self, node: &str) -> String {
        format!("{}:n:{node}", self.settings.prefix)
    }

    fn failed(&self, what: &str, err: &dyn std::fmt::Display) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if self.commands_ok.swap(false, Ordering::Relaxed) {
            warn!(%err, "Redis {what} failed; degraded until it answers again");
        } else {
            debug!(%err, "Redis {what} failed");
        }
    }

    fn succeeded(&self) {
        if !self.commands_ok.swap(true, Ordering::Relaxed) {
            info!("Redis answers again");
        }
    }

    /// Runs one Redis operation for at most `wait`. A failure or a timeout
    /// is counted and marks the node degraded until an operation succeeds.
    async fn bounded<T>(
        &self,
        what: &str,
        wait: Duration,
        operation: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(wait, operation).await {
            Ok(Ok(value)) => {
                self.succeeded();
                Some(value)
            }
            Ok(Err(err)) => {
                self.failed(what, &err);
                None
            }
            Err(elapsed) => {
                self.failed(what, &elapsed);
                None
            }
        }
    }

    async fn publish(&self, publication: Publication) -> Result<Published, BrokerError> {
        // Not subscribed (Redis was away and the subscription is not back
        // yet): Redis cannot bring this publication back to this node, so
        // it is delivered here directly, numbered by Redis all the same.
        let deliver_here = !self.subscribed.load(Ordering::Acquire);
        let _delivering_here = match deliver_here {
            true => Some(self.local_delivery.lock().await),
            false => None,
        };
        let payload = Envelope::of(&publication).encode_to_vec();
        let mut invocation = ScriptCall::new(&self.publish);
        let sequenced = match publication.target.stream_key() {
            Some(stream) => {
                invocation.key(self.key(&format!("s:{stream}")));
                invocation.key(self.key(&format!("h:{stream}")));
                true
            }
            None => false,
        };
        let history = self.settings.history.of(&publication.target);
        let mut direct = String::new();
        match &publication.target {
            Target::Topic(topic) => {
                for set in topic_routes(topic) {
                    invocation.key(self.key(&set));
                }
            }
            Target::Room { room, .. } => {
                invocation.key(self.key(&format!("i:r:{room}")));
            }
            Target::User(user) | Target::UserStream(user) => {
                invocation.key(self.key(&format!("i:u:{user}")));
            }
            Target::Session(id) => {
                let node = node_of_session(id);
                if !(deliver_here && node == &*self.settings.node_id) {
                    direct = self.inbox(node);
                }
            }
            Target::Broadcast => direct = self.key("all"),
        }
        invocation
            .arg(if sequenced { "seq" } else { "" })
            .arg(self.settings.sequence_ttl.as_secs().max(1))
            .arg(payload)
            .arg(self.inbox(""))
            .arg(direct)
            .arg(match deliver_here {
                true => &*self.settings.node_id,
                false => "",
            })
            .arg(new_epoch())
            .arg(history.map_or(String::new(), |h| h.max_len.to_string()))
            .arg(history_ttl(&self.settings, history))
            .arg(
                publication
                    .idempotency_key
                    .as_ref()
                    .map_or(String::new(), |key| self.key(&format!("idem:{key}"))),
            )
            .arg(IDEMPOTENCY_TTL.as_secs());
        let wait = self.settings.command_timeout;
        // In line now, before the first await: publications are numbered
        // in the order they were made (see `ordered`).
        let published = self.ordered.call::<(u64, u64, String, u8)>(invocation);
        let published = self.bounded("publish", wait, published).await;
        let handler = self.handler();
        match published {
            Some((seq, nodes, epoch, 1)) => Ok(Published {
                seq,
                epoch: epoch.into(),
                nodes: nodes as usize,
                duplicate: true,
                ..Published::default()
            }),
            Some((seq, nodes, epoch, _)) => {
                let position = Position::new(epoch, seq);
                let Some(handler) = handler else {
                    return Ok(Published {
                        seq,
                        epoch: position.epoch,
                        nodes: nodes as usize,
                        ..Published::default()
                    });
                };
                let (sessions, nodes) = match deliver_here {
                    true => {
                        // Delivered here, not through the inbox: recorded,
                        // so a catch-up does not take it for missed.
                        self.note_received(&publication.target, &position);
                        let sessions = handler.handle_publication(&publication, &position);
                        (sessions, nodes as usize + usize::from(sessions > 0))
                    }
                    false => (handler.recipients(&publication.target), nodes as usize),
                };
                Ok(Published {
                    seq,
                    epoch: position.epoch,
                    sessions,
                    nodes,
                    duplicate: false,
                })
            }
            None if history.is_some() => {
                // A stream with history promises its readers every
                // message: refused (the publisher retries), not delivered
                // here alone and missing from history.
                Err(BrokerError::Unavailable(
                    "Redis is unreachable; retry shortly".into(),
                ))
            }
            None => {
                // Accepted, so delivered where it can be: on this node,
                // unnumbered (Redis did not number or keep it).
                self.local_only.fetch_add(1, Ordering::Relaxed);
                let unnumbered = Position::default();
                let sessions =
                    handler.map_or(0, |h| h.handle_publication(&publication, &unnumbered));
                Ok(Published {
                    sessions,
                    nodes: 1,
                    ..Published::default()
                })
            }
        }
    }

    /// One script call: each stream's position is written unless it would
    /// move back within its epoch.
    async fn save_acknowledged(
        &self,
        device: &str,
        acks: &[(String, Position)],
    ) -> Result<(), BrokerError> {
        let mut invocation = self.acknowledge.prepare_invoke();
        invocation
            .key(self.key(&format!("ack:{device}")))
            .arg(self.settings.sequence_ttl.as_secs().max(1));
        for (stream, position) in acks {
            invocation
                .arg(stream)
                .arg(&*position.epoch)
                .arg(position.seq);
        }
        let mut commands = self.commands.clone();
        let wait = self.settings.command_timeout;
        let saved = invocation.invoke_async::<()>(&mut commands);
        self.bounded("acknowledge", wait, saved)
            .await
            .ok_or_else(|| BrokerError::Unavailable("Redis is unreachable".into()))
    }

    async fn acknowledged(&self, device: &str) -> Result<HashMap<String, Position>, BrokerError> {
        let mut commands = self.commands.clone();
        let wait = self.settings.command_timeout;
        let key = self.key(&format!("ack:{device}"));
        let mut command = redis::cmd("HGETALL");
        command.arg(key);
        let read = command.query_async::<HashMap<String, String>>(&mut commands);
        let Some(stored) = self.bounded("acknowledged", wait, read).await else {
            return Err(BrokerError::Unavailable("Redis is unreachable".into()));
        };
        Ok(stored
            .into_iter()
            .filter_map(|(stream, value)| {
                let (seq, epoch) = value.split_once(':')?;
                Some((stream, Position::new(epoch, seq.parse().ok()?)))
            })
            .collect())
    }

    async fn history(
        &self,
        stream: &Target,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let Some(key) = stream.stream_key() else {
            return Ok(History::default());
        };
        let mut invocation = self.history.prepare_invoke();
        invocation
            .key(self.key(&format!("s:{key}")))
            .key(self.key(&format!("h:{key}")))
            .arg(since.map_or("", |p| &*p.epoch))
            .arg(since.map_or(0, |p| p.seq))
            .arg(limit.max(1))
            .arg(new_epoch())
            .arg(self.settings.sequence_ttl.as_secs().max(1));
        let mut commands = self.commands.clone();
        let wait = self.settings.command_timeout;
        type Entries = Vec<(String, HashMap<String, Bytes>)>;
        let read = invocation.invoke_async::<(String, u64, Entries)>(&mut commands);
        let Some((epoch, top, entries)) = self.bounded("history", wait, read).await else {
            return Err(BrokerError::Unavailable("history read failed".into()));
        };
        let policy = self.settings.history.of(stream);
        let oldest = policy.map_or(0, |h| h.oldest_kept_ms());
        let mut publications = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let seq = id.rsplit('-').next().and_then(|n| n.parse().ok());
            let publication = fields.get("p").and_then(|p| decode_envelope(p));
            let (Some(seq), Some(publication)) = (seq, publication) else {
                self.failures.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if publication.published_at_ms >= oldest {
                publications.push((seq, publication));
            }
        }
        Ok(History {
            epoch: epoch.into(),
            top,
            publications,
        })
    }

    /// Counts `interest` up (`add`) or down; returns the keys that became
    /// needed or unneeded.
    fn count_interest(&self, interest: &[Interest], add: bool) -> Vec<String> {
        let mut counts = self.interest.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = Vec::new();
        for key in interest.iter().flat_map(interest_keys) {
            let key = self.key(&key);
            if add {
                let count = counts.entry(key.clone()).or_insert(0);
                *count += 1;
                if *count == 1 {
                    changed.push(key);
                }
            } else if let Some(count) = counts.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&key);
                    changed.push(key);
                }
            }
        }
        changed
    }

    /// `SADD` + `EXPIRE` (or `SREM`) of this node in each set, pipelined.
    async fn write_interest(&self, keys: &[String], add: bool) -> bool {
        let ttl = self.settings.interest_ttl.as_secs().max(1);
        for batch in keys.chunks(REFRESH_BATCH) {
            let mut pipe = redis::pipe();
            for key in batch {
                if add {
                    pipe.sadd(key, &*self.settings.node_id).ignore();
                    pipe.expire(key, ttl as i64).ignore();
                } else {
                    pipe.srem(key, &*self.settings.node_id).ignore();
                }
            }
            let mut commands = self.commands.clone();
            let wait = self.settings.command_timeout * 2;
            let written = pipe.query_async::<()>(&mut commands);
            if self.bounded("interest", wait, written).await.is_none() {
                return false;
            }
        }
        true
    }

    /// When `position` opens a new epoch of a stream this node was
    /// receiving but is not its first message, the last seq missed before
    /// it. (Within an epoch a jump is not taken for a loss: this node may
    /// simply have had no one interested for a while.)
    fn missed_epoch_start(&self, target: &Target, position: &Position) -> Option<u64> {
        let key = target.stream_key()?;
        let received = self
            .received_positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let last = received.get(&key)?;
        (last.epoch != position.epoch && position.seq > 1).then_some(position.seq - 1)
    }

    /// Records that `target`'s stream reached `position` here; false when
    /// this node had it already.
    fn note_received(&self, target: &Target, position: &Position) -> bool {
        if position.seq == 0 {
            return true;
        }
        let Some(key) = target.stream_key() else {
            return true;
        };
        let mut received = self
            .received_positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match received.get_mut(&key) {
            Some(last) if last.epoch == position.epoch && position.seq <= last.seq => false,
            Some(last) => {
                *last = position.clone();
                true
            }
            None => {
                if received.len() >= MAX_TRACKED_STREAMS {
                    // Bounded: an arbitrary stream is no longer checked.
                    if let Some(any) = received.keys().next().cloned() {
                        received.remove(&any);
                    }
                }
                received.insert(key, position.clone());
                true
            }
        }
    }

    /// After the subscription connection was lost and is back (and
    /// subscribed again): reads where each stream this node was receiving
    /// stands, then publishes a marker to this node's own inbox. Redis
    /// delivers in order, so every message published before those reads
    /// that will ever reach this node arrives before the marker: what has
    /// not by then was missed, exactly. The subscription loop holds back
    /// what it receives until the marker and hands it to
    /// [`Shared::finish_catch_up`].
    async fn start_catch_up(&self) -> Option<CatchUp> {
        let tracked: Vec<(String, Position)> = self
            .received_positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        let mut streams = Vec::with_capacity(tracked.len());
        for batch in tracked.chunks(REFRESH_BATCH) {
            let mut pipe = redis::pipe();
            for (key, _) in batch {
                pipe.cmd("HMGET")
                    .arg(self.key(&format!("s:{key}")))
                    .arg("epoch")
                    .arg("seq");
            }
            let mut commands = self.commands.clone();
            let wait = self.settings.command_timeout * 2;
            let query = pipe.query_async::<Vec<(Option<String>, Option<u64>)>>(&mut commands);
            let now = self.bounded("catch-up", wait, query).await?;
            for ((key, last), (epoch, top)) in batch.iter().zip(now) {
                let now = Position::new(epoch.unwrap_or_default(), top.unwrap_or(0));
                streams.push((key.clone(), last.clone(), now));
            }
        }
        let marker = format!("catch-up:{}", new_epoch());
        let mut commands = self.commands.clone();
        let wait = self.settings.command_timeout;
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.inbox(&self.settings.node_id)).arg(&marker);
        let published = publish.query_async::<u64>(&mut commands);
        self.bounded("catch-up", wait, published).await?;
        Some(CatchUp {
            marker: marker.into_bytes(),
            streams,
            held: Vec::new(),
        })
    }

    /// Ends a catch-up once its marker came back (or did not in time):
    /// per stream, delivers in order what was held back, what history has
    /// of what was missed, and a GAP for the rest.
    async fn finish_catch_up(&self, catch_up: CatchUp) {
        let Some(handler) = self.handler() else {
            return;
        };
        let mut held: HashMap<String, Vec<(Position, Publication)>> = HashMap::new();
        let mut others = Vec::new();
        for (position, publication) in catch_up.held {
            match publication.target.stream_key().filter(|_| position.seq > 0) {
                Some(key) => held.entry(key).or_default().push((position, publication)),
                None => others.push((position, publication)),
            }
        }
        for (key, last, now) in catch_up.streams {
            let Some(stream) = target_of_stream_key(&key) else {
                continue;
            };
            let arrived = held.remove(&key).unwrap_or_default();
            let after = match *now.epoch == *last.epoch {
                true => last.clone(),
                false => {
                    handler.handle_gap(&StreamGap {
                        stream: stream.clone(),
                        epoch: last.epoch.clone(),
                        from_seq: last.seq + 1,
                        to_seq: 0,
                        reason: "epoch",
                    });
                    Position::new(now.epoch.clone(), 0)
                }
            };
            self.fill(&handler, &stream, &after, now.seq, arrived).await;
        }
        // Streams this node was not tracking, and the rest: as they came.
        for (position, publication) in held.into_values().flatten().chain(others) {
            self.deliver_once(
                handler.as_ref(),
                &publication.target,
                &publication,
                &position,
            );
        }
    }

    /// Delivers `stream`'s messages after `after` (same epoch) up to `top`
    /// or the last of `arrived`, in order: those in `arrived` (received
    /// meanwhile), then what history has of the rest; a GAP announces each
    /// range neither has. Marks all of them received, so later copies are
    /// dropped and the stream stays in order.
    async fn fill(
        &self,
        handler: &Arc<dyn BrokerEventHandler>,
        stream: &Target,
        after: &Position,
        top: u64,
        arrived: Vec<(Position, Publication)>,
    ) {
        let mut have = std::collections::BTreeMap::new();
        let mut elsewhere = Vec::new();
        for (position, publication) in arrived {
            match position.epoch == after.epoch && position.seq > after.seq {
                true => {
                    have.insert(position.seq, publication);
                }
                false => elsewhere.push((position, publication)),
            }
        }
        let last = have.keys().next_back().copied().unwrap_or(0).max(top);
        let complete = (after.seq + 1..=last).all(|seq| have.contains_key(&seq));
        if !complete && self.settings.history.of(stream).is_some() {
            if let Ok(kept) = self.history(stream, Some(after), MAX_REPLAY).await {
                if *kept.epoch == *after.epoch {
                    for (seq, publication) in kept.publications {
                        have.entry(seq).or_insert(publication);
                    }
                }
            }
        }
        let mut hole: Option<u64> = None;
        for seq in after.seq + 1..=last {
            match have.remove(&seq) {
                Some(publication) => {
                    if let Some(from) = hole.take() {
                        self.announce_lost(handler, stream, &after.epoch, from, seq - 1);
                    }
                    let position = Position::new(after.epoch.clone(), seq);
                    self.deliver_once(handler.as_ref(), stream, &publication, &position);
                }
                None => {
                    hole.get_or_insert(seq);
                }
            }
        }
        if let Some(from) = hole {
            self.announce_lost(handler, stream, &after.epoch, from, last);
        }
        // Kept by history past `last`, then other epochs: in order.
        let later = have
            .into_iter()
            .map(|(seq, p)| (Position::new(after.epoch.clone(), seq), p));
        for (position, publication) in later.chain(elsewhere) {
            self.deliver_once(handler.as_ref(), stream, &publication, &position);
        }
    }

    /// Hands `publication` to the node unless this node had `position`
    /// of `stream` already.
    fn deliver_once(
        &self,
        handler: &dyn BrokerEventHandler,
        stream: &Target,
        publication: &Publication,
        position: &Position,
    ) {
        if self.note_received(stream, position) {
            handler.handle_publication(publication, position);
        }
    }

    /// A GAP "lost" for `from_seq..=to_seq`, marked received.
    fn announce_lost(
        &self,
        handler: &Arc<dyn BrokerEventHandler>,
        stream: &Target,
        epoch: &Arc<str>,
        from_seq: u64,
        to_seq: u64,
    ) {
        handler.handle_gap(&StreamGap {
            stream: stream.clone(),
            epoch: epoch.clone(),
            from_seq,
            to_seq,
            reason: "lost",
        });
        self.note_received(stream, &Position::new(epoch.clone(), to_seq));
    }

    /// Hands one received message to the node, or, during a catch-up,
    /// holds it back (see [`Shared::start_catch_up`]); ends the catch-up
    /// when its marker comes.
    async fn receive(&self, payload: &[u8], catching_up: &mut Option<CatchUp>) {
        if let Some(catch_up) = catching_up {
            if payload == catch_up.marker.as_slice() {
                if let Some(catch_up) = catching_up.take() {
                    self.finish_catch_up(catch_up).await;
                }
                return;
            }
            if let Some(Received::Publication(position, publication)) = decode(payload) {
                self.received.fetch_add(1, Ordering::Relaxed);
                catch_up.held.push((position, publication));
                return;
            }
        }
        let Some(received) = decode(payload) else {
            // Another node's catch-up marker that outlived it, or garbage.
            if !payload.starts_with(b"catch-up:") {
                self.failures.fetch_add(1, Ordering::Relaxed);
                debug!(len = payload.len(), "undecodable message on the inbox");
            }
            return;
        };
        let Some(handler) = self.handler() else {
            return;
        };
        match received {
            Received::Publication(position, publication) => {
                self.received.fetch_add(1, Ordering::Relaxed);
                if let Some(missed) = self.missed_epoch_start(&publication.target, &position) {
                    // The stream restarted (Redis lost it) and its first
                    // messages did not come here: fill them in first.
                    let start = Position::new(position.epoch.clone(), 0);
                    let stream = &publication.target;
                    self.fill(&handler, stream, &start, missed, Vec::new())
                        .await;
                }
                if !self.note_received(&publication.target, &position) {
                    return; // delivered already, by a catch-up
                }
                if handler.handle_publication(&publication, &position) == 0 {
                    self.unmatched.fetch_add(1, Ordering::Relaxed);
                }
            }
            Received::Presence(change) => handler.handle_presence(&change),
        }
    }

    /// Runs one of the presence scripts with this node's prefix and id.
    async fn presence_script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        args: &[&str],
    ) -> Option<T> {
        let mut invocation = script.prepare_invoke();
        invocation
            .arg(&self.settings.prefix)
            .arg(&*self.settings.node_id);
        for arg in args {
            invocation.arg(*arg);
        }
        let mut commands = self.commands.clone();
        let wait = self.settings.command_timeout;
        self.bounded("presence", wait, invocation.invoke_async(&mut commands))
            .await
    }

    /// Records a change and announces it to every node with members in the room.
    async fn write_presence(
        &self,
        room: &str,
        joined: bool,
        session_id: &str,
        user_id: Option<&str>,
    ) -> bool {
        let ttl = (self.settings.interest_ttl * 2).as_secs().to_string();
        let flag = if joined { "1" } else { "0" };
        let args = [
            room,
            flag,
            session_id,
            user_id.unwrap_or_default(),
            ttl.as_str(),
        ];
        let Some(count) = self
            .presence_script::<u64>(&self.presence_write, &args)
            .await
        else {
            return false;
        };
        self.announce(room, joined, session_id, user_id, count)
            .await
    }

    /// Sends a presence change to the nodes with interest in the room.
    async fn announce(
        &self,
        room: &str,
        joined: bool,
        session_id: &str,
        user_id: Option<&str>,
        count: u64,
    ) -> bool {
        let payload = presence_envelope(room, joined, session_id, user_id).encode_to_vec();
        let mut invocation = self.publish.prepare_invoke();
        invocation
            .key(self.key(&format!("i:r:{room}")))
            .arg(count.to_string())
            .arg(1)
            .arg(payload)
            .arg(self.inbox(""))
            .arg("")
            .arg("");
        let mut commands = self.commands.clone();
        let wait = self.settings.command_timeout;
        let sent = invocation.invoke_async::<redis::Value>(&mut commands);
        self.bounded("presence", wait, sent).await.is_some()
    }

    async fn room_members(&self, room: &str) -> Option<RoomMembers> {
        let reply: Vec<String> = self.presence_script(&self.presence_read, &[room]).await?;
        let (count, pairs) = reply.split_first()?;
        let members = pairs
            .chunks(2)
            .filter_map(|pair| match pair {
                [session, user] => Some((session.clone(), user.clone())),
                _ => None,
            })
            .collect();
        Some(RoomMembers {
            count: count.parse().unwrap_or(0),
            members,
        })
    }

    /// Writes this node's room members again from the hub, replacing what
    /// Redis holds for it (after an outage it may be stale or gone).
    async fn rewrite_members(&self) -> bool {
        let Some(handler) = self.handler() else {
            return true;
        };
        let mut rooms: HashMap<Arc<str>, Vec<Membership>> = HashMap::new();
        for membership in handler.local_members() {
            rooms
                .entry(membership.room.clone())
                .or_default()
                .push(membership);
        }
        let node = &*self.settings.node_id;
        let ttl = (self.settings.interest_ttl * 2).as_secs() as i64;
        let pn = self.key(&format!("pn:{node}"));
        let mut commands = self.commands.clone();
        let wait = self.settings.command_timeout * 2;
        let mut members = redis::cmd("SMEMBERS");
        let held = members.arg(&pn).query_async::<Vec<String>>(&mut commands);
        let Some(held) = self.bounded("presence", wait, held).await else {
            return false;
        };
        let stale: Vec<&String> = held
            .iter()
            .filter(|r| !rooms.contains_key(r.as_str()))
            .collect();
        if stale.is_empty() && rooms.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        for room in stale {
            pipe.del(self.key(&format!("pm:{node}:{room}"))).ignore();
            pipe.srem(self.key(&format!("prn:{room}")), node).ignore();
            pipe.srem(&pn, room).ignore();
        }
        for (room, members) in &rooms {
            let pm = self.key(&format!("pm:{node}:{room}"));
            let prn = self.key(&format!("prn:{room}"));
            pipe.del(&pm).ignore();
            for member in members {
                let user = member.user_id.as_deref().unwrap_or_default();
                pipe.hset(&pm, &*member.session_id, user).ignore();
            }
            pipe.expire(&pm, ttl).ignore();
            pipe.sadd(&prn, node).ignore();
            pipe.expire(&prn, ttl).ignore();
            pipe.sadd(&pn, &**room).ignore();
        }
        if !rooms.is_empty() {
            pipe.expire(&pn, ttl).ignore();
        }
        let written = pipe.query_async::<()>(&mut commands);
        self.bounded("presence", wait, written).await.is_some()
    }

    /// Removes `node`'s members and announces them gone.
    async fn sweep_node(&self, node: &str) {
        let Some(removed) = self
            .presence_script::<Vec<String>>(&self.sweep, &[node])
            .await
        else {
            return;
        };
        if !removed.is_empty() {
            info!(
                node,
                members = removed.len() / 4,
                "removed a dead node's room members"
            );
        }
        for entry in removed.chunks(4) {
            if let [room, session, user, count] = entry {
                let user = Some(user.as_str()).filter(|u| !u.is_empty());
                let count = count.parse().unwrap_or(0);
                self.announce(room, false, session, user, count).await;
            }
        }
    }
}

/// Keeps the subscription connection up: connect, subscribe, re-register
/// interest, read until the connection dies or a probe goes unanswered,
/// then again after a short back-off.
async fn subscription_loop(shared: Arc<Shared>, interest_ops: mpsc::Sender<InterestOp>) {
    let channels = [shared.inbox(&shared.settings.node_id), shared.key("all")];
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        if shared.handler().is_none() {
            return; // the node is gone
        }
        let connect = async {
            let pubsub = shared.client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&channels).await?;
            Ok((sink, stream))
        };
        let wait = shared.settings.command_timeout * 2;
        let Some((sink, mut stream)) = shared.bounded("subscribe", wait, connect).await else {
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
            continue;
        };
        backoff = Duration::from_millis(50);
        if !first {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        // What was registered while Redis was away, or lost with it.
        let _ = interest_ops.try_send(InterestOp::Refresh);
        shared.subscribed.store(true, Ordering::Relaxed);
        info!(node = %shared.settings.node_id, "subscribed to Redis");
        let mut catching_up = None;
        if shared.reconnects.load(Ordering::Relaxed) > 0 {
            let _no_local_delivery = shared.local_delivery.lock().await;
            catching_up = shared.start_catch_up().await;
        }
        // A marker that does not come back in time ends the catch-up
        // anyway (what is missing is then announced).
        let marker_deadline = tokio::time::Instant::now() + shared.settings.command_timeout * 4;

        let (dead_tx, mut dead) = oneshot::channel::<()>();
        let prober = tokio::spawn(probe(sink, shared.settings.probe_interval, dead_tx));
        loop {
            tokio::select! {
                biased;
                _ = &mut dead => break,
                _ = tokio::time::sleep_until(marker_deadline), if catching_up.is_some() => {
                    if let Some(catch_up) = catching_up.take() {
                        shared.finish_catch_up(catch_up).await;
                    }
                }
                message = stream.next() => match message {
                    Some(message) => {
                        shared.receive(message.get_payload_bytes(), &mut catching_up).await
                    }
                    None => break,
                },
            }
        }
        prober.abort();
        shared.subscribed.store(false, Ordering::Relaxed);
        shared.failures.fetch_add(1, Ordering::Relaxed);
        warn!(node = %shared.settings.node_id, "Redis subscription lost; reconnecting");
    }
}

/// Pings the subscription connection every `interval`; completes `dead`
/// when a ping is not answered within the interval (a connection that died
/// without an error delivers nothing and would otherwise go unnoticed).
async fn probe(mut sink: redis::aio::PubSubSink, interval: Duration, dead: oneshot::Sender<()>) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(interval, sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => {}
            _ => {
                let _ = dead.send(());
                return;
            }
        }
    }
}

/// Applies interest changes in order (an addition and a removal of the same
/// set never overtake each other), and refreshes every set the node needs
/// each third of their TTL and after every reconnection.
async fn interest_loop(shared: Arc<Shared>, mut ops: mpsc::Receiver<InterestOp>) {
    let mut refresh = tokio::time::interval(shared.settings.interest_ttl / 3);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a failed write, everything is written again soon: the sets may
    // be gone (a Redis restart) and nothing else would bring them back
    // before the next refresh.
    let mut retry: Option<tokio::time::Instant> = None;
    // An operation read while gathering additions, to apply next.
    let mut next = None;
    loop {
        let op = match next.take() {
            Some(op) => op,
            None => tokio::select! {
                op = ops.recv() => match op {
                    Some(op) => op,
                    None => return,
                },
                _ = refresh.tick() => InterestOp::Refresh,
                _ = tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)),
                    if retry.is_some() => InterestOp::Refresh,
            },
        };
        retry = None;
        if shared.handler().is_none() {
            return;
        }
        match op {
            InterestOp::Add(mut keys, done) => {
                // Additions queued behind this one (a reconnect storm brings
                // hundreds) go in the same pipelines, not a round trip each;
                // anything else stays in its place, after them.
                let mut waiting = vec![done];
                while let Ok(op) = ops.try_recv() {
                    match op {
                        InterestOp::Add(more, done) => {
                            keys.extend(more);
                            waiting.push(done);
                        }
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                let written = shared.write_interest(&keys, true).await;
                if !written {
                    shared.interest_unwritten.store(true, Ordering::Release);
                    retry = Some(tokio::time::Instant::now() + RETRY);
                }
                // Also no to a caller whose keys were written by an
                // earlier failed addition and wait for the retry.
                let routed = written && !shared.interest_unwritten.load(Ordering::Acquire);
                for done in waiting {
                    let _ = done.send(routed);
                }
            }
            InterestOp::Remove(keys) => {
                // A key needed again meanwhile stays.
                let still_needed: Vec<String> = {
                    let counts = shared.interest.lock().unwrap_or_else(|e| e.into_inner());
                    keys.into_iter()
                        .filter(|k| !counts.contains_key(k))
                        .collect()
                };
                shared.write_interest(&still_needed, false).await;
            }
            InterestOp::Refresh => {
                let keys: Vec<String> = {
                    let counts = shared.interest.lock().unwrap_or_else(|e| e.into_inner());
                    counts.keys().cloned().collect()
                };
                if !shared.write_interest(&keys, true).await || !shared.rewrite_members().await {
                    retry = Some(tokio::time::Instant::now() + RETRY);
                } else {
                    shared.interest_unwritten.store(false, Ordering::Release);
                }
            }
            InterestOp::Presence {
                room,
                joined,
                session_id,
                user_id,
                done,
            } => {
                let written = shared
                    .write_presence(&room, joined, &session_id, user_id.as_deref())
                    .await;
                let _ = done.send(());
                if !written {
                    retry = Some(tokio::time::Instant::now() + RETRY);
                }
            }
        }
    }
}

/// Says this node is alive every third of [`RedisSettings::node_ttl`], and
/// sweeps nodes that stopped saying so: a node missing on two rounds in a
/// row (so a Redis that was itself paused, and saw every node go quiet, is
/// not mistaken for a cluster of dead nodes) is claimed by one survivor,
/// which removes its room members and announces them gone. The first
/// round also sweeps this node's own previous life (a restart with the
/// same id).
async fn liveness_loop(shared: Arc<Shared>) {
    let node = shared.settings.node_id.to_string();
    let ttl = shared.settings.node_ttl;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut suspects: HashMap<String, u32> = HashMap::new();
    let mut swept_self = false;
    loop {
        tick.tick().await;
        if shared.handler().is_none() {
            return;
        }
        let now_ms = super::now_ms();
        let nodes = shared.key("nodes");
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(shared.key(&format!("alive:{node}")))
            .arg(1)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .ignore();
        pipe.zadd(&nodes, &node, now_ms).ignore();
        pipe.expire(&nodes, 24 * 3600).ignore();
        pipe.zrangebyscore(&nodes, 0, now_ms.saturating_sub(ttl.as_millis() as u64));
        let mut commands = shared.commands.clone();
        let wait = shared.settings.command_timeout * 2;
        let said = pipe.query_async::<(Vec<String>,)>(&mut commands);
        let Some((quiet,)) = shared.bounded("liveness", wait, said).await else {
            suspects.clear();
            continue;
        };
        if !swept_self {
            shared.sweep_node(&node).await;
            swept_self = true;
            // Members registered meanwhile are written back.
            let _ = shared.rewrite_members().await;
        }
        suspects.retain(|n, _| quiet.contains(n));
        for other in quiet.into_iter().filter(|n| *n != node) {
            let strikes = suspects.entry(other.clone()).or_insert(0);
            *strikes += 1;
            if *strikes < 2 {
                continue;
            }
            let mut set = redis::cmd("SET");
            set.arg(shared.key(&format!("sweep:{other}")))
                .arg(&node)
                .arg("NX")
                .arg("PX")
                .arg(10_000);
            let claim = set.query_async::<Option<String>>(&mut commands);
            if let Some(Some(_)) = shared.bounded("liveness", wait, claim).await {
                shared.sweep_node(&other).await;
            }
            suspects.remove(&other);
        }
    }
}

/// Up to `delay`, at random ("full jitter"), so nodes do not reconnect in step.
fn jitter(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let random = RandomState::new().hash_one(std::time::Instant::now());
    delay.mul_f64((random % 1000) as f64 / 1000.0)
}

/// The node a session id belongs to: ids are `NODE-N`.
fn node_of_session(id: &str) -> &str {
    id.rsplit_once('-').map_or(id, |(node, _)| node)
}

/// The leading literal segments of a topic or pattern, at most
/// [`TOPIC_DEPTH`], and whether a wildcard follows them within that depth.
fn literal_prefix(topic: &Topic) -> (Vec<&str>, bool) {
    let mut prefix = Vec::new();
    for segment in topic.segments().take(TOPIC_DEPTH) {
        if segment == "*" || segment == "#" {
            return (prefix, true);
        }
        prefix.push(segment);
    }
    (prefix, false)
}

/// The interest sets a subscription to `pattern` joins: `i:t=L` for its
/// literal prefix L, and `i:t/Q` for every proper prefix Q of L (for
/// publications whose own wildcard sits where L is still literal).
fn topic_interest(pattern: &Topic) -> Vec<String> {
    let (prefix, _) = literal_prefix(pattern);
    let mut keys = vec![format!("i:t={}", prefix.join("."))];
    keys.extend((0..prefix.len()).map(|n| format!("i:t/{}", prefix[..n].join("."))));
    keys
}

/// The interest sets a publication to `topic` is routed by: `i:t=Q` for
/// every prefix Q of its literal prefix L (the empty one included), and
/// `i:t/L` when a wildcard follows L within the routing depth. Every
/// subscription that may overlap the topic is in one of them.
fn topic_routes(topic: &Topic) -> Vec<String> {
    let (prefix, wildcard) = literal_prefix(topic);
    let mut keys: Vec<String> = (0..=prefix.len())
        .map(|n| format!("i:t={}", prefix[..n].join(".")))
        .collect();
    if wildcard {
        keys.push(format!("i:t/{}", prefix.join(".")));
    }
    keys
}

fn interest_keys(interest: &Interest) -> Vec<String> {
    match interest {
        Interest::Topic(pattern) => topic_interest(pattern),
        Interest::Room(room) => vec![format!("i:r:{room}")],
        Interest::User(user) => vec![format!("i:u:{user}")],
    }
}

/// A publication as it crosses Redis (the sequence number travels in front
/// of it: `SEQ:ENVELOPE`).
#[derive(Clone, PartialEq, prost::Message)]
struct Envelope {
    #[prost(enumeration = "Kind", tag = "1")]
    kind: i32,
    /// Topic, room, user or session id, by kind.
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, optional, tag = "3")]
    exclude: Option<String>,
    #[prost(string, optional, tag = "4")]
    sender_session: Option<String>,
    #[prost(string, optional, tag = "5")]
    sender_user: Option<String>,
    #[prost(bytes = "bytes", tag = "6")]
    data: Bytes,
    #[prost(uint32, tag = "7")]
    opcode: u32,
    #[prost(uint64, tag = "8")]
    published_at_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
enum Kind {
    Topic = 0,
    Room = 1,
    User = 2,
    Session = 3,
    Broadcast = 4,
    /// A join (opcode 1) or leave (0) of the sender in room `name`; the
    /// number in front is the room's count.
    Presence = 5,
    /// A critical push to user `name`, numbered in the user's stream.
    UserStream = 6,
}

impl Envelope {
    fn of(publication: &Publication) -> Envelope {
        let (kind, name, exclude) = match &publication.target {
            Target::Topic(topic) => (Kind::Topic, topic.as_str().to_owned(), None),
            Target::Room { room, exclude } => (
                Kind::Room,
                room.to_string(),
                exclude.as_deref().map(str::to_owned),
            ),
            Target::User(user) => (Kind::User, user.to_string(), None),
            Target::UserStream(user) => (Kind::UserStream, user.to_string(), None),
            Target::Session(id) => (Kind::Session, id.to_string(), None),
            Target::Broadcast => (Kind::Broadcast, String::new(), None),
        };
        let sender = publication.sender.as_ref();
        Envelope {
            kind: kind as i32,
            name,
            exclude,
            sender_session: sender.map(|s| s.session_id.to_string()),
            sender_user: sender.and_then(|s| s.user_id.as_deref().map(str::to_owned)),
            data: publication.data.clone(),
            opcode: publication.opcode,
            published_at_ms: publication.published_at_ms,
        }
    }
}

/// What arrives on a node's inbox.
#[derive(Debug, PartialEq)]
enum Received {
    Publication(Position, Publication),
    Presence(PresenceChange),
}

/// A presence change as it crosses Redis (the count travels in front).
fn presence_envelope(
    room: &str,
    joined: bool,
    session_id: &str,
    user_id: Option<&str>,
) -> Envelope {
    Envelope {
        kind: Kind::Presence as i32,
        name: room.to_owned(),
        sender_session: Some(session_id.to_owned()),
        sender_user: user_id.map(str::to_owned),
        opcode: u32::from(joined),
        ..Envelope::default()
    }
}

/// `NUMBER:ENVELOPE` back into what it carries; `None` if malformed.
fn decode(payload: &[u8]) -> Option<Received> {
    let colon = payload.iter().position(|&b| b == b':')?;
    let seq = std::str::from_utf8(&payload[..colon]).ok()?.parse().ok()?;
    let rest = &payload[colon + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let epoch = std::str::from_utf8(&rest[..colon]).ok()?;
    let envelope = Envelope::decode(&rest[colon + 1..]).ok()?;
    if Kind::try_from(envelope.kind).ok()? == Kind::Presence {
        return Some(Received::Presence(PresenceChange {
            room: envelope.name.into(),
            joined: envelope.opcode == 1,
            session_id: envelope.sender_session?.into(),
            user_id: envelope
                .sender_user
                .filter(|u| !u.is_empty())
                .map(Into::into),
            count: u32::try_from(seq).ok()?,
        }));
    }
    let publication = publication_of(envelope)?;
    Some(Received::Publication(
        Position::new(epoch, seq),
        publication,
    ))
}

/// A publication kept in history (its envelope alone).
fn decode_envelope(payload: &[u8]) -> Option<Publication> {
    publication_of(Envelope::decode(payload).ok()?)
}

fn publication_of(envelope: Envelope) -> Option<Publication> {
    let target = match Kind::try_from(envelope.kind).ok()? {
        Kind::Presence => return None,
        Kind::Topic => Target::Topic(Topic::parse(&envelope.name).ok()?),
        Kind::Room => Target::Room {
            room: envelope.name.into(),
            exclude: envelope.exclude.map(Into::into),
        },
        Kind::User => Target::User(envelope.name.into()),
        Kind::UserStream => Target::UserStream(envelope.name.into()),
        Kind::Session => Target::Session(envelope.name.into()),
        Kind::Broadcast => Target::Broadcast,
    };
    let sender = envelope.sender_session.map(|session_id| Sender {
        session_id: session_id.into(),
        user_id: envelope.sender_user.map(Into::into),
    });
    Some(Publication {
        target,
        sender,
        data: envelope.data,
        opcode: envelope.opcode,
        published_at_ms: envelope.published_at_ms,
        idempotency_key: None,
    })
}

/// A catch-up under way (see [`Shared::start_catch_up`]).
struct CatchUp {
    /// The message that ends it when it comes back on the inbox.
    marker: Vec<u8>,
    /// Per stream: its key, the last position received here, and where it
    /// stood in Redis before the marker was published.
    streams: Vec<(String, Position, Position)>,
    /// Publications received meanwhile, in order.
    held: Vec<(Position, Publication)>,
}

/// The target a stream key names (`t:TOPIC`, `r:ROOM` or `u:USER`).
fn target_of_stream_key(key: &str) -> Option<Target> {
    match key.split_once(':')? {
        ("t", topic) => Some(Target::Topic(Topic::parse(topic).ok()?)),
        ("r", room) => Some(Target::Room {
            room: room.into(),
            exclude: None,
        }),
        ("u", user) => Some(Target::UserStream(user.into())),
        _ => None,
    }
}

/// A fresh epoch for a stream that has none: random, so a stream Redis
/// lost (restarted without persistence, expired) never continues one.
fn new_epoch() -> String {
    use std::hash::{BuildHasher, RandomState};
    let n = RandomState::new().hash_one(std::time::SystemTime::now());
    format!("{:012x}", n & 0xffff_ffff_ffff)
}

/// How long a stream's history outlives its last publication.
fn history_ttl(settings: &RedisSettings, history: Option<HistoryPolicy>) -> u64 {
    history
        .and_then(|h| h.max_age)
        .unwrap_or(settings.sequence_ttl)
        .as_secs()
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    /// Every subscription overlapping a publication shares an interest set
    /// with its routes, on both sides' wildcards.
    #[test]
    fn routes_reach_every_overlapping_subscription() {
        let names = [
            "alarm",
            "alarm.fire",
            "alarm.fire.b3",
            "alarm.#",
            "alarm.*",
            "alarm.*.b3",
            "#",
            "*",
            "*.fire",
            "alarm.fire.#",
            "rowdata.temp.42",
            "rowdata.#",
            "*.*.42",
        ];
        for p in names {
            for t in names {
                let (p, t) = (topic(p), topic(t));
                let interest = topic_interest(&p);
                let routes = topic_routes(&t);
                let shared = routes.iter().any(|r| interest.contains(r));
                if p.overlaps(&t) {
                    assert!(
                        shared,
                        "{p} overlaps {t}: interest {interest:?}, routes {routes:?}"
                    );
                }
            }
        }
        // And routing stays narrow where it can.
        assert!(!topic_routes(&topic("rowdata.temp.42"))
            .iter()
            .any(|r| topic_interest(&topic("alarm.#")).contains(r)));
    }

    #[test]
    fn envelopes_round_trip() {
        let publication = Publication {
            target: Target::Room {
                room: "lobby".into(),
                exclude: Some("n1-4".into()),
            },
            sender: Some(Sender {
                session_id: "n1-4".into(),
                user_id: Some("ann".into()),
            }),
            data: Bytes::from_static(b"hi: there"),
            opcode: 7,
            published_at_ms: 42,
            idempotency_key: None,
        };
        let payload = [
            b"17:5f3a:".as_slice(),
            &Envelope::of(&publication).encode_to_vec(),
        ]
        .concat();
        assert_eq!(
            decode(&payload),
            Some(Received::Publication(
                Position::new("5f3a", 17),
                publication
            ))
        );
        let change = presence_envelope("lobby", true, "n1-4", Some("ann")).encode_to_vec();
        let payload = [b"3::".as_slice(), &change].concat();
        let Some(Received::Presence(change)) = decode(&payload) else {
            panic!("a presence change");
        };
        assert_eq!(
            (change.joined, change.count, &*change.room),
            (true, 3, "lobby")
        );
        assert_eq!(decode(b"garbage"), None);
        assert_eq!(node_of_session("a1b2-c3-17"), "a1b2-c3");
    }
}
