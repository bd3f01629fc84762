//! The [`Session`] handle: one connected client as handlers see it.
//!
//! A session identifies its client (id, user, token claims) and is the way
//! to send it frames from anywhere: everything goes through its bounded
//! [`SessionQueue`], which only the connection's writer drains
//! (see `connection`). Handlers act on the rest of the deployment through
//! the session's [`Node`].

use std::{
    any::{Any, TypeId},
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message as _;
use tracing::debug;
use wsproto_proto::v1;

use crate::{
    auth::Authenticator,
    broker::{BrokerError, Sender},
    error::ErrorCode,
    frame::{Frame, Outgoing},
    hub::Hub,
    identity::Identity,
    metrics,
    node::Node,
    opcode,
    queue::{PushError, SessionQueue},
};

/// A handle to one connected client; cheap to clone.
///
/// Handlers receive it with every frame; it identifies the client and is
/// the way to send it frames from anywhere.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

// `repr(C)`: `hot` first, its fields kept together (see `Hot`).
#[repr(C)]
struct Inner {
    hot: Hot,
    id: Arc<str>,
    /// Fixed for the session's life (a refreshed token must name the same user).
    user_id: Option<Arc<str>>,
    /// The client's device (`?device=ID`), whose acknowledged positions the
    /// broker keeps.
    device: Option<Arc<str>>,
    /// Replaced by REFRESH_TOKEN.
    identity: RwLock<Arc<Identity>>,
    /// Verifies refreshed tokens; `None` in insecure mode.
    authenticator: Option<Arc<Authenticator>>,
    remote_addr: Option<SocketAddr>,
    locals: Mutex<HashMap<TypeId, Box<dyn Any + Send>>>,
}

/// What the session's task reads or writes for every frame, together: with
/// thousands of sessions served in turn, each cache line a frame touches is
/// a miss, and these were spread over four. 64 bytes, so they span at most
/// two lines. (Aligning them to a line of their own cost 122 bytes per
/// idle session, for no gain a benchmark could tell from noise.)
#[repr(C)]
struct Hot {
    connected_at: Instant,
    /// Milliseconds after `connected_at` when the client was last heard from.
    last_seen_ms: AtomicU64,
    /// Written only by the session's own task (see `count_received`).
    frames_received: AtomicU64,
    /// Written only by the session's own task.
    frames_sent: AtomicU64,
    queue: SessionQueue,
    node: Node,
    /// A handler is running for this session.
    handling: AtomicBool,
    /// Set when `identity` was replaced, so the session re-arms the expiry timer.
    identity_changed: AtomicBool,
}

const _: () = assert!(std::mem::size_of::<Hot>() <= 64, "Hot outgrew a cache line");

impl Session {
    pub(crate) fn new(
        node: Node,
        identity: Identity,
        authenticator: Option<Arc<Authenticator>>,
        remote_addr: Option<SocketAddr>,
        queue: SessionQueue,
        device: Option<Arc<str>>,
    ) -> Session {
        Session {
            inner: Arc::new(Inner {
                id: node.next_session_id(),
                hot: Hot {
                    connected_at: Instant::now(),
                    last_seen_ms: AtomicU64::new(0),
                    frames_received: AtomicU64::new(0),
                    frames_sent: AtomicU64::new(0),
                    queue,
                    node,
                    handling: AtomicBool::new(false),
                    identity_changed: AtomicBool::new(false),
                },
                user_id: identity.user_id.clone(),
                device,
                identity: RwLock::new(Arc::new(identity)),
                authenticator,
                remote_addr,
                locals: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A session with no socket behind it, registered with `node`'s hub
    /// until the returned guard is dropped: what it is sent stays in
    /// [`Session::queue`]. For testing and fuzzing handlers.
    pub fn detached(node: &Node, identity: Identity, queue_capacity: usize) -> Registration {
        let queue = SessionQueue::new(queue_capacity);
        Registration::local(&Session::new(
            node.clone(),
            identity,
            None,
            None,
            queue,
            None,
        ))
    }

    /// Unique across the nodes of a deployment.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The key the broker keeps this session's device's acknowledged
    /// positions under: `USER/DEVICE` (a device id only counts within its
    /// user); `None` without `?device=`.
    pub fn device_key(&self) -> Option<String> {
        let device = self.inner.device.as_deref()?;
        Some(format!(
            "{}/{device}",
            self.inner.user_id.as_deref().unwrap_or_default()
        ))
    }

    /// The user this session acts for, when known.
    pub fn user_id(&self) -> Option<&str> {
        self.inner.user_id.as_deref()
    }

    /// Who the session acts for and what it may subscribe and publish to,
    /// as of its latest token.
    pub fn identity(&self) -> Arc<Identity> {
        self.inner
            .identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Verifies tokens for REFRESH_TOKEN; `None` in insecure mode.
    pub(crate) fn authenticator(&self) -> Option<&Authenticator> {
        self.inner.authenticator.as_deref()
    }

    /// Puts a refreshed token's identity in place (same user); its expiry
    /// takes over from the old one.
    pub(crate) fn replace_identity(&self, identity: Identity) {
        debug_assert_eq!(identity.user_id, self.inner.user_id);
        *self
            .inner
            .identity
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(identity);
        self.inner
            .hot
            .identity_changed
            .store(true, Ordering::Release);
    }

    /// The client's address as the server saw it.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.remote_addr
    }

    /// How long the session has been open.
    pub fn connected_for(&self) -> Duration {
        self.inner.hot.connected_at.elapsed()
    }

    /// The node this session is on.
    pub fn node(&self) -> &Node {
        &self.inner.hot.node
    }

    /// The hub of the node this session is on.
    pub fn hub(&self) -> &Hub {
        self.inner.hot.node.hub()
    }

    /// This session as the sender of a publication.
    pub fn sender(&self) -> Sender {
        Sender {
            session_id: self.inner.id.clone(),
            user_id: self.inner.user_id.clone(),
        }
    }

    /// The session's send queue.
    pub fn queue(&self) -> &SessionQueue {
        &self.inner.hot.queue
    }

    /// Frames received from the client so far.
    pub fn frames_received(&self) -> u64 {
        self.inner.hot.frames_received.load(Ordering::Relaxed)
    }

    /// Frames written to the client so far.
    pub fn frames_sent(&self) -> u64 {
        self.inner.hot.frames_sent.load(Ordering::Relaxed)
    }

    /// Queues a frame for the client: a [`Frame`], owned (its payload is
    /// written from where it is, without a copy) or borrowed.
    ///
    /// # Errors
    /// When the session is closing, or its queue is full (the session is
    /// then closed as a slow consumer).
    pub fn send(&self, frame: impl Into<Outgoing>) -> Result<(), PushError> {
        self.inner.hot.queue.push(frame)
    }

    /// Queues an already-encoded frame; lets one encoding serve many sessions.
    ///
    /// # Errors
    /// As [`Session::send`].
    pub fn send_encoded(&self, frame: Bytes) -> Result<(), PushError> {
        self.inner.hot.queue.push(frame)
    }

    /// Queues an ERROR frame. Failure to queue is ignored: the session is
    /// closing then, and the client will learn that from the close frame.
    pub fn send_error(&self, code: u32, message: String, opcode: u32, request_id: Option<u32>) {
        if code == ErrorCode::LimitExceeded.as_u32() {
            metrics::bump(&self.node().counters().limit_exceeded);
        }
        debug!(session = %self.id(), code, opcode, %message, "error frame");
        let error = v1::Error {
            code,
            message,
            opcode,
        };
        let frame = Frame::new(opcode::ERROR, error.encode_to_vec()).with_request_id(request_id);
        let _ = self.send(frame);
    }

    /// Runs `f` on this session's value of type `T` (created with
    /// `T::default()` on first use). Handlers keep per-connection state here;
    /// it is dropped with the session.
    pub fn with_local<T: Default + Send + 'static, R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut locals = self.inner.locals.lock().unwrap_or_else(|e| e.into_inner());
        let slot = locals
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()));
        match slot.downcast_mut::<T>() {
            Some(value) => f(value),
            None => unreachable!("locals are keyed by their own TypeId"),
        }
    }

    /// Records that the client was just heard from.
    pub(crate) fn touch(&self) {
        let now = self.inner.hot.connected_at.elapsed().as_millis() as u64;
        self.inner.hot.last_seen_ms.store(now, Ordering::Relaxed);
    }

    /// How long the client has said nothing.
    pub(crate) fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.inner.hot.last_seen_ms.load(Ordering::Relaxed));
        self.inner.hot.connected_at.elapsed().saturating_sub(last)
    }

    /// Marks whether a handler is running for this session, or its reading
    /// is held back by a backlog of replies (the client cannot show it is
    /// alive meanwhile: nothing is read from it).
    pub(crate) fn set_handling(&self, handling: bool) {
        self.inner.hot.handling.store(handling, Ordering::Relaxed);
    }

    /// Whether a handler is running for this session.
    pub(crate) fn is_handling(&self) -> bool {
        self.inner.hot.handling.load(Ordering::Relaxed)
    }

    /// Only the session's own task counts (so a load and a store, not an
    /// atomic add, which locks the cache line, on every frame).
    pub(crate) fn count_received(&self, frames: u64) {
        let received = &self.inner.hot.frames_received;
        received.store(received.load(Ordering::Relaxed) + frames, Ordering::Relaxed);
    }

    /// As [`count_received`](Session::count_received).
    pub(crate) fn count_sent(&self, frames: u64) {
        let sent = &self.inner.hot.frames_sent;
        sent.store(sent.load(Ordering::Relaxed) + frames, Ordering::Relaxed);
    }

    /// Whether the token was replaced since the last call. (Checked on
    /// every frame: a plain load first, as the swap would lock the line.)
    pub(crate) fn take_identity_changed(&self) -> bool {
        let changed = &self.inner.hot.identity_changed;
        changed.load(Ordering::Relaxed) && changed.swap(false, Ordering::Acquire)
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id())
            .field("user_id", &self.user_id())
            .field("remote_addr", &self.remote_addr())
            .finish()
    }
}

/// Keeps a session registered with its hub while it lives; dropping it
/// unregisters the session and everything it held, even if the task that
/// owns it panics.
pub struct Registration(Session);

impl Registration {
    /// Registers `session` with its node; completes once what is sent to
    /// its user from any node reaches it, or (the `Err`) once the broker
    /// has failed to make sure of that in time.
    pub(crate) async fn new(session: &Session) -> (Registration, Result<(), BrokerError>) {
        let (id, user_id) = (session.inner.id.clone(), session.inner.user_id.clone());
        let node = session.node();
        let routed = node.register(id, user_id, session.queue().clone()).await;
        (Registration(session.clone()), routed)
    }

    /// Registers `session` with its node's hub only (what [`Session::detached`]
    /// does: a session with no socket is not announced to other nodes).
    fn local(session: &Session) -> Registration {
        let (id, user_id) = (session.inner.id.clone(), session.inner.user_id.clone());
        session.hub().register(id, user_id, session.queue().clone());
        Registration(session.clone())
    }
}

impl std::ops::Deref for Registration {
    type Target = Session;

    fn deref(&self) -> &Session {
        &self.0
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.node().unregister(self.0.id());
    }
}
