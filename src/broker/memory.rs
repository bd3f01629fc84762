use std::{collections::HashMap, sync::Mutex};

use super::{BoxFuture, Broker, BrokerError};
use crate::hub::{Hub, Publication, Published, Target};

/// Most topics and rooms whose sequence numbers are remembered; past it the
/// counters start over (a client sees the sequence restart at 1), which
/// keeps memory bounded however many topics are published to.
const MAX_SEQUENCES: usize = 100_000;

/// The single-node broker: delivers straight to the local hub.
#[derive(Debug, Default)]
pub struct MemoryBroker {
    sequences: Mutex<HashMap<String, u64>>,
}

impl MemoryBroker {
    pub fn new() -> MemoryBroker {
        MemoryBroker::default()
    }

    fn next_seq(&self, target: &Target) -> u64 {
        let key = match target {
            Target::Topic(topic) => format!("t:{topic}"),
            Target::Room { room, .. } => format!("r:{room}"),
            _ => return 0,
        };
        let mut sequences = self.sequences.lock().unwrap_or_else(|e| e.into_inner());
        if sequences.len() >= MAX_SEQUENCES && !sequences.contains_key(&key) {
            sequences.clear();
        }
        let seq = sequences.entry(key).or_insert(0);
        *seq += 1;
        *seq
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        publication: Publication,
    ) -> BoxFuture<'a, Result<Published, BrokerError>> {
        let seq = self.next_seq(&publication.target);
        let sessions = hub.deliver(&publication, seq);
        Box::pin(std::future::ready(Ok(Published { seq, sessions })))
    }
}
