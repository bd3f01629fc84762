use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock, Weak,
    },
    time::{Instant, SystemTime},
};

use super::{
    BoxFuture, Broker, BrokerError, BrokerEventHandler, History, HistoryPolicies, HistoryPolicy,
    Position, Publication, Published, Target, IDEMPOTENCY_TTL,
};

/// Most devices whose acknowledged positions are kept; past it an
/// arbitrary other device's are forgotten (it then recovers from its own).
const MAX_DEVICES: usize = 100_000;

/// Most idempotency keys remembered at once; past it, expired ones go, and
/// if none has expired, all do (a retry then publishes again).
const MAX_IDEMPOTENCY_KEYS: usize = 100_000;

/// Streams are split over this many locks, so publications to different
/// topics rarely wait on each other.
const SHARDS: usize = 16;
/// Most topics and rooms whose numbering one shard remembers; past it an
/// arbitrary other stream is forgotten, which keeps memory bounded however
/// many topics are used. A forgotten stream starts again in a new epoch,
/// so its subscribers can tell (it never silently restarts at 1).
const MAX_STREAMS_PER_SHARD: usize = 8192;

/// The in-process broker: numbers each publication, keeps the history its
/// policy asks for, and hands it, in-line, to every registered node — the
/// one node of a single-process server, or several in-process nodes
/// sharing it (as tests do).
///
/// A stream's publications are numbered, kept and delivered under the same
/// lock, so every subscriber sees them in sequence order even when several
/// tasks publish to the stream at once.
#[derive(Debug)]
pub struct MemoryBroker {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, Stream>>>,
    handlers: RwLock<Vec<Weak<dyn BrokerEventHandler>>>,
    history: HistoryPolicies,
    /// Acknowledged positions by device, then by stream.
    acknowledged: Mutex<HashMap<String, HashMap<String, Position>>>,
    /// Idempotency keys seen, with when and what publishing them did.
    idempotent: Mutex<HashMap<Arc<str>, (Instant, Published)>>,
    /// This broker's epochs are `{run}-{n}`: `run` is random per broker (a
    /// new process has another), `n` counts the streams it has started.
    run: u64,
    started: AtomicU64,
}

/// One topic's or room's numbering and history.
#[derive(Debug)]
struct Stream {
    epoch: Arc<str>,
    seq: u64,
    /// (seq, publication), oldest first; empty without a history policy.
    kept: VecDeque<(u64, Publication)>,
}

impl Default for MemoryBroker {
    fn default() -> MemoryBroker {
        MemoryBroker::with_history(HistoryPolicies::default())
    }
}

impl MemoryBroker {
    /// A broker with no nodes registered yet, keeping no history.
    pub fn new() -> MemoryBroker {
        MemoryBroker::default()
    }

    /// A broker keeping history as `policies` say.
    pub fn with_history(policies: HistoryPolicies) -> MemoryBroker {
        let hasher = RandomState::new();
        let run = hasher.hash_one((std::process::id(), SystemTime::now())) & 0xffff_ffff_ffff;
        MemoryBroker {
            hasher,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            handlers: RwLock::new(Vec::new()),
            history: policies,
            idempotent: Mutex::new(HashMap::new()),
            acknowledged: Mutex::new(HashMap::new()),
            run,
            started: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<String, Stream>> {
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_stream(&self) -> Stream {
        let n = self.started.fetch_add(1, Ordering::Relaxed) + 1;
        Stream {
            epoch: format!("{:012x}-{n:x}", self.run).into(),
            seq: 0,
            kept: VecDeque::new(),
        }
    }

    /// Numbers, keeps and delivers a publication.
    fn publish_now(&self, publication: &Publication) -> Published {
        let (position, (sessions, nodes)) = match publication.target.stream_key() {
            None => {
                let position = Position::default();
                let reached = self.deliver(publication, &position);
                (position, reached)
            }
            Some(key) => {
                let mut streams = self.shard(&key);
                if streams.len() >= MAX_STREAMS_PER_SHARD && !streams.contains_key(&key) {
                    if let Some(idle) = streams.keys().next().cloned() {
                        streams.remove(&idle);
                    }
                }
                let stream = streams.entry(key).or_insert_with(|| self.new_stream());
                stream.seq += 1;
                let position = Position::new(stream.epoch.clone(), stream.seq);
                if let Some(policy) = self.history.of(&publication.target) {
                    stream.kept.push_back((stream.seq, publication.clone()));
                    while stream.kept.len() > policy.max_len {
                        stream.kept.pop_front();
                    }
                    expire(&mut stream.kept, &policy);
                }
                // Delivery only queues frames (it never waits on a socket),
                // so holding the shard lock across it is brief.
                let reached = self.deliver(publication, &position);
                (position, reached)
            }
        };
        Published {
            seq: position.seq,
            epoch: position.epoch,
            sessions,
            nodes,
            duplicate: false,
        }
    }

    /// Hands `publication` to every live node; (sessions, nodes) it reached.
    fn deliver(&self, publication: &Publication, position: &Position) -> (usize, usize) {
        let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner());
        let (mut sessions, mut nodes) = (0, 0);
        for handler in handlers.iter().filter_map(Weak::upgrade) {
            sessions += handler.handle_publication(publication, position);
            nodes += 1;
        }
        (sessions, nodes)
    }
}

/// Drops kept messages older than `policy` serves.
fn expire(kept: &mut VecDeque<(u64, Publication)>, policy: &HistoryPolicy) {
    let oldest = policy.oldest_kept_ms();
    while kept
        .front()
        .is_some_and(|(_, p)| p.published_at_ms < oldest)
    {
        kept.pop_front();
    }
}

impl Broker for MemoryBroker {
    fn register_event_handler(&self, handler: Weak<dyn BrokerEventHandler>) {
        let mut handlers = self.handlers.write().unwrap_or_else(|e| e.into_inner());
        handlers.retain(|h| h.strong_count() > 0);
        handlers.push(handler);
    }

    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Published, BrokerError>> {
        let published = match publication.idempotency_key.clone() {
            None => self.publish_now(&publication),
            Some(key) => {
                // Held across the publication, so two requests with one key
                // cannot both publish.
                let mut seen = self.idempotent.lock().unwrap_or_else(|e| e.into_inner());
                match seen.get(&key) {
                    Some((at, prior)) if at.elapsed() < IDEMPOTENCY_TTL => Published {
                        duplicate: true,
                        sessions: 0,
                        ..prior.clone()
                    },
                    _ => {
                        if seen.len() >= MAX_IDEMPOTENCY_KEYS {
                            seen.retain(|_, (at, _)| at.elapsed() < IDEMPOTENCY_TTL);
                            if seen.len() >= MAX_IDEMPOTENCY_KEYS {
                                seen.clear();
                            }
                        }
                        let published = self.publish_now(&publication);
                        seen.insert(key, (Instant::now(), published.clone()));
                        published
                    }
                }
            }
        };
        Box::pin(std::future::ready(Ok(published)))
    }

    fn save_acknowledged<'a>(
        &'a self,
        device: &'a str,
        acks: &'a [(String, Position)],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let mut devices = self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
        if devices.len() >= MAX_DEVICES && !devices.contains_key(device) {
            if let Some(any) = devices.keys().next().cloned() {
                devices.remove(&any);
            }
        }
        let streams = devices.entry(device.to_owned()).or_default();
        for (stream, position) in acks {
            if super::advances(streams.get(stream), position) {
                streams.insert(stream.clone(), position.clone());
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn acknowledged<'a>(
        &'a self,
        device: &'a str,
    ) -> BoxFuture<'a, Result<HashMap<String, Position>, BrokerError>> {
        let devices = self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
        let streams = devices.get(device).cloned().unwrap_or_default();
        Box::pin(std::future::ready(Ok(streams)))
    }

    fn history<'a>(
        &'a self,
        stream: &'a Target,
        since: Option<&'a Position>,
        limit: usize,
    ) -> BoxFuture<'a, Result<History, BrokerError>> {
        let Some(key) = stream.stream_key() else {
            return Box::pin(std::future::ready(Ok(History::default())));
        };
        let mut streams = self.shard(&key);
        // A stream nobody published to yet starts its epoch now, so that a
        // client's position taken from it stays valid once it gets messages.
        let stream_state = streams.entry(key).or_insert_with(|| self.new_stream());
        if let Some(policy) = self.history.of(stream) {
            expire(&mut stream_state.kept, &policy);
        }
        let after = since
            .filter(|p| p.epoch == stream_state.epoch)
            .map_or(0, |p| p.seq);
        let history = History {
            epoch: stream_state.epoch.clone(),
            top: stream_state.seq,
            publications: stream_state
                .kept
                .iter()
                .filter(|(seq, _)| *seq > after)
                .take(limit)
                .cloned()
                .collect(),
        };
        Box::pin(std::future::ready(Ok(history)))
    }
}
