use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::Mutex,
};

use super::{BoxFuture, Broker, BrokerError};
use crate::hub::{Hub, Publication, Published, Target};

/// Counters are split over this many locks, so publications to different
/// topics rarely wait on each other.
const SHARDS: usize = 16;
/// Most topics and rooms whose sequence numbers one shard remembers; past
/// it an arbitrary other counter is forgotten (that topic's sequence starts
/// again at 1), which keeps memory bounded however many topics are used.
const MAX_SEQUENCES_PER_SHARD: usize = 8192;

/// The single-node broker: numbers each publication and delivers it
/// straight to the local hub.
///
/// A topic's (or room's) publications are numbered and delivered under the
/// same lock, so every subscriber sees them in sequence order even when
/// several tasks publish to the topic at once.
#[derive(Debug)]
pub struct MemoryBroker {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, u64>>>,
}

impl Default for MemoryBroker {
    fn default() -> MemoryBroker {
        MemoryBroker {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl MemoryBroker {
    pub fn new() -> MemoryBroker {
        MemoryBroker::default()
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        publication: Publication,
    ) -> BoxFuture<'a, Result<Published, BrokerError>> {
        let key = match &publication.target {
            Target::Topic(topic) => Some(format!("t:{topic}")),
            Target::Room { room, .. } => Some(format!("r:{room}")),
            _ => None,
        };
        let published = match key {
            None => Published {
                seq: 0,
                sessions: hub.deliver(&publication, 0),
            },
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
                Published {
                    seq: *seq,
                    sessions: hub.deliver(&publication, *seq),
                }
            }
        };
        Box::pin(std::future::ready(Ok(published)))
    }
}
