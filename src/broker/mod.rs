//! Brokers carry publications between nodes.
//!
//! Every publication goes through the broker, even on a single node, so
//! the path is the same with one node or many: the broker numbers the
//! message within its topic or room and has each node's [`Hub`] deliver it
//! to the sessions there. [`MemoryBroker`] is the single-node default.

mod memory;

use std::{future::Future, pin::Pin};

pub use memory::MemoryBroker;

use crate::hub::{Hub, Publication, Published};

/// Why a broker could not take a publication.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker's backend is unreachable or failed.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, so the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Carries publications to every node's hub.
pub trait Broker: Send + Sync + 'static {
    /// Numbers `publication`, delivers it on every node (through
    /// [`Hub::deliver`]) and reports what this node delivered.
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        publication: Publication,
    ) -> BoxFuture<'a, Result<Published, BrokerError>>;
}
