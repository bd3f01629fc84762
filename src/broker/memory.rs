use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Mutex, RwLock, Weak},
};

use super::{BoxFuture, Broker, BrokerError, BrokerEventHandler, Publication, Published};

/// Counters are split over this many locks, so publications to different
/// topics rarely wait on each other.
const SHARDS: usize = 16;
/// Most topics and rooms whose sequence numbers one shard remembers; past
/// it an arbitrary other counter is forgotten (that topic's sequence starts
/// again at 1), which keeps memory bounded however many topics are used.
const MAX_SEQUENCES_PER_SHARD: usize = 8192;

/// The in-process broker: numbers each publication and hands it, in-line,
/// to every registered node — the one node of a single-process server, or
/// several in-process nodes sharing it (as tests do).
///
/// A topic's (or room's) publications are numbered and delivered under the
/// same lock, so every subscriber sees them in sequence order even when
/// several tasks publish to the topic at once.
#[derive(Debug)]
pub struct MemoryBroker {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, u64>>>,
    handlers: RwLock<Vec<Weak<dyn BrokerEventHandler>>>,
}

impl Default for MemoryBroker {
    fn default() -> MemoryBroker {
        MemoryBroker {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            handlers: RwLock::new(Vec::new()),
        }
    }
}

impl MemoryBroker {
    /// A broker with no nodes registered yet.
    pub fn new() -> MemoryBroker {
        MemoryBroker::default()
    }

    /// Hands `publication` to every live node; (sessions, nodes) it reached.
    fn deliver(&self, publication: &Publication, seq: u64) -> (usize, usize) {
        let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner());
        let (mut sessions, mut nodes) = (0, 0);
        for handler in handlers.iter().filter_map(Weak::upgrade) {
            sessions += handler.handle_publication(publication, seq);
            nodes += 1;
        }
        (sessions, nodes)
    }
}

impl Broker for MemoryBroker {
    fn register_event_handler(&self, handler: Weak<dyn BrokerEventHandler>) {
        let mut handlers = self.handlers.write().unwrap_or_else(|e| e.into_inner());
        handlers.retain(|h| h.strong_count() > 0);
        handlers.push(handler);
    }

    fn publish(&self, publication: Publication) -> BoxFuture<'_, Result<Published, BrokerError>> {
        let (seq, (sessions, nodes)) = match publication.target.stream_key() {
            None => (0, self.deliver(&publication, 0)),
            Some(key) => {
                let shard = &self.shards[self.hasher.hash_one(&key) as usize % SHARDS];
                let mut sequences = shard.lock().unwrap_or_else(|e| e.into_inner());
                if sequences.len() >= MAX_SEQUENCES_PER_SHARD && !sequences.contains_key(&key) {
                    if let Some(idle) = sequences.keys().next().cloned() {
                        sequences.remove(&idle);
                    }
                }
                let seq = sequences.entry(key).or_insert(0);
                *seq += 1;
                // Delivery only queues frames (it never waits on a socket),
                // so holding the shard lock across it is brief.
                (*seq, self.deliver(&publication, *seq))
            }
        };
        let published = Published {
            seq,
            sessions,
            nodes,
        };
        Box::pin(std::future::ready(Ok(published)))
    }
}
