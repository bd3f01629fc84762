//! The sessions open on this node, and the ways to reach them.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::session::Session;

/// This node's registry of open sessions; cheap to clone.
///
/// Its lock is only ever held for a map operation, never across an await
/// or a socket write.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// Random per process, so session ids stay unique across nodes and restarts.
    node_id: u32,
    next_session: AtomicU64,
    started_at: Instant,
    sessions: Mutex<HashMap<Arc<str>, Session>>,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Hub {
        Hub {
            inner: Arc::new(Inner {
                node_id: RandomState::new().hash_one(Instant::now()) as u32,
                next_session: AtomicU64::new(1),
                started_at: Instant::now(),
                sessions: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Session>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn next_session_id(&self) -> Arc<str> {
        let n = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{n}", self.inner.node_id).into()
    }

    pub(crate) fn register(&self, session: &Session) {
        self.sessions().insert(session.id().into(), session.clone());
    }

    pub(crate) fn unregister(&self, session_id: &str) {
        self.sessions().remove(session_id);
    }

    /// Sessions open on this node.
    pub fn len(&self) -> usize {
        self.sessions().len()
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open session with this id.
    pub fn session(&self, session_id: &str) -> Option<Session> {
        self.sessions().get(session_id).cloned()
    }

    /// How long this node has been up.
    pub fn uptime(&self) -> Duration {
        self.inner.started_at.elapsed()
    }
}
