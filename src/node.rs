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

use crate::{
    broker::{Broker, BrokerError, MemoryBroker, Publication, Published},
    hub::{Hub, HubConfig},
    metrics::Counters,
};

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
        Node::with_id(generated_id(), config, broker)
    }

    /// As [`Node::with_broker`], with a chosen id (unique in the deployment).
    pub fn with_id(id: impl Into<Arc<str>>, config: HubConfig, broker: Arc<dyn Broker>) -> Node {
        let hub = Hub::with_config(config);
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
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// How long this node has been up.
    pub fn uptime(&self) -> Duration {
        self.inner.started_at.elapsed()
    }

    /// Publishes through the broker, which delivers on every node.
    ///
    /// # Errors
    /// When the broker cannot take the publication.
    pub async fn publish(&self, publication: Publication) -> Result<Published, BrokerError> {
        self.inner.broker.publish(publication).await
    }
}

/// Eight hex digits, random per process.
fn generated_id() -> String {
    format!("{:08x}", RandomState::new().hash_one(Instant::now()) as u32)
}
