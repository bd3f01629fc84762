//! One WebSocket connection: the [`Session`] handle handlers act through,
//! and the loop that runs the connection.
//!
//! Each connection runs as two tasks: this one reads and dispatches frames in
//! order; a writer task owns the sink and is the only thing that ever writes
//! to the socket. Everything else — replies, pushes from other sessions,
//! heartbeat pings, close frames — goes through the session's bounded
//! [`SessionQueue`], so a client that stops reading fills its own queue and
//! is closed; it never blocks a producer.

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
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::{
    tungstenite::{
        error::{Error as WsError, ProtocolError},
        Message,
    },
    WebSocketStream,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;
use wsproto_proto::v1;

use crate::{
    auth::Authenticator,
    close::CloseReason,
    error::ErrorCode,
    frame::{Frame, Preview},
    hub::Hub,
    identity::Identity,
    metrics, opcode,
    queue::{Batch, PushError, SessionQueue},
    rate::{RateLimit, Verdict},
    router::Router,
    topic::Topic,
    Config,
};

/// Most frames the writer moves from the queue into one socket write.
const WRITE_BATCH: usize = 64;
/// Frames the reader handles before it lets the writer run.
const YIELD_EVERY: u32 = 8;

/// A handle to one connected client; cheap to clone.
///
/// Handlers receive it with every frame; it identifies the client and is
/// the way to send it frames from anywhere.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

struct Inner {
    id: Arc<str>,
    /// Fixed for the session's life (a refreshed token must name the same user).
    user_id: Option<Arc<str>>,
    /// Replaced by REFRESH_TOKEN.
    identity: RwLock<Arc<Identity>>,
    /// Set when `identity` was replaced, so the reader re-arms the expiry timer.
    identity_changed: AtomicBool,
    /// Verifies refreshed tokens; `None` in insecure mode.
    authenticator: Option<Arc<Authenticator>>,
    remote_addr: Option<SocketAddr>,
    connected_at: Instant,
    queue: SessionQueue,
    hub: Hub,
    frames_received: AtomicU64,
    frames_sent: AtomicU64,
    /// Milliseconds after `connected_at` when the client was last heard from.
    last_seen_ms: AtomicU64,
    /// A handler is running for this session.
    handling: AtomicBool,
    locals: Mutex<HashMap<TypeId, Box<dyn Any + Send>>>,
}

impl Session {
    pub(crate) fn new(
        hub: Hub,
        identity: Identity,
        authenticator: Option<Arc<Authenticator>>,
        remote_addr: Option<SocketAddr>,
        queue: SessionQueue,
    ) -> Session {
        Session {
            inner: Arc::new(Inner {
                id: hub.next_session_id(),
                user_id: identity.user_id.clone(),
                identity: RwLock::new(Arc::new(identity)),
                identity_changed: AtomicBool::new(false),
                authenticator,
                remote_addr,
                connected_at: Instant::now(),
                queue,
                hub,
                frames_received: AtomicU64::new(0),
                frames_sent: AtomicU64::new(0),
                last_seen_ms: AtomicU64::new(0),
                handling: AtomicBool::new(false),
                locals: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A session with no socket behind it, registered with `hub` until the
    /// returned guard is dropped: what it is sent stays in
    /// [`Session::queue`]. For testing and fuzzing handlers.
    pub fn detached(hub: &Hub, identity: Identity, queue_capacity: usize) -> Registration {
        let queue = SessionQueue::new(queue_capacity);
        Registration::new(&Session::new(hub.clone(), identity, None, None, queue))
    }

    /// Unique across the nodes of a deployment.
    pub fn id(&self) -> &str {
        &self.inner.id
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
        self.inner.identity_changed.store(true, Ordering::Release);
    }

    /// The client's address as the server saw it.
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.inner.remote_addr
    }

    /// How long the session has been open.
    pub fn connected_for(&self) -> Duration {
        self.inner.connected_at.elapsed()
    }

    /// The hub of the node this session is on.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// The session's send queue.
    pub fn queue(&self) -> &SessionQueue {
        &self.inner.queue
    }

    /// Frames received from the client so far.
    pub fn frames_received(&self) -> u64 {
        self.inner.frames_received.load(Ordering::Relaxed)
    }

    /// Frames written to the client so far.
    pub fn frames_sent(&self) -> u64 {
        self.inner.frames_sent.load(Ordering::Relaxed)
    }

    /// Queues a frame for the client.
    ///
    /// # Errors
    /// When the session is closing, or its queue is full (the session is
    /// then closed as a slow consumer).
    pub fn send(&self, frame: &Frame) -> Result<(), PushError> {
        self.send_encoded(frame.encode())
    }

    /// Queues an already-encoded frame; lets one encoding serve many sessions.
    ///
    /// # Errors
    /// As [`Session::send`].
    pub fn send_encoded(&self, frame: Bytes) -> Result<(), PushError> {
        self.inner.queue.push(frame)
    }

    /// Queues an ERROR frame. Failure to queue is ignored: the session is
    /// closing then, and the client will learn that from the close frame.
    pub fn send_error(&self, code: u32, message: String, opcode: u32, request_id: Option<u32>) {
        if code == ErrorCode::LimitExceeded.as_u32() {
            metrics::bump(&self.hub().counters().limit_exceeded);
        }
        debug!(session = %self.id(), code, opcode, %message, "error frame");
        let error = v1::Error {
            code,
            message,
            opcode,
        };
        let frame = Frame::new(opcode::ERROR, error.encode_to_vec()).with_request_id(request_id);
        let _ = self.send(&frame);
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

    fn touch(&self) {
        let now = self.inner.connected_at.elapsed().as_millis() as u64;
        self.inner.last_seen_ms.store(now, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.inner.last_seen_ms.load(Ordering::Relaxed));
        self.inner.connected_at.elapsed().saturating_sub(last)
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

/// Runs one opcode-protocol connection until it ends, then unregisters it.
/// `shutdown` asks for a Close 1001 handshake; `abort` ends it at once.
pub(crate) async fn run<S>(
    ws: WebSocketStream<S>,
    session: Session,
    subscriptions: Vec<Topic>,
    router: Arc<Router>,
    config: Arc<Config>,
    shutdown: CancellationToken,
    abort: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // WELCOME is queued before the session is reachable through the hub, so
    // it is always the first frame.
    send_welcome(&session, &config);
    let registration = Registration::new(&session);
    // Checked against permissions and the limit at upgrade.
    let _ = session.hub().subscribe_all(session.id(), &subscriptions);
    debug!(session = %session.id(), remote = ?session.remote_addr(), "session opened");

    let (sink, mut stream) = ws.split();
    // Cancelled when either half is done, or when the server gives up
    // waiting at shutdown: the other half then stops too.
    let terminate = abort.child_token();
    let mut writer = tokio::spawn(write_loop(
        sink,
        session.clone(),
        config.clone(),
        terminate.clone(),
    ));
    // The writer hands the sink back when it ends, for the last flush.
    let mut writer_ended = None;

    let queue = session.queue().clone();
    let mut limiter = RateLimit::new(config.rate_limit, config.rate_burst);
    let mut handled_in_a_row = 0u32;
    let mut close_deadline: Option<tokio::time::Instant> = None;
    let mut linger = false;
    let expiry_of = |session: &Session| {
        session
            .identity()
            .expires_at
            .map(|at| tokio::time::Instant::now() + crate::auth::time_left(at))
    };
    let mut token_expiry = expiry_of(&session);
    // Made once, not per frame: each registers with its token or queue.
    // The guards below never poll one again after it has completed.
    let terminated = terminate.cancelled();
    let shutting_down = shutdown.cancelled();
    let closing = queue.closing();
    tokio::pin!(terminated, shutting_down, closing);
    loop {
        if close_deadline.is_none() && queue.close_reason().is_some() {
            close_deadline = Some(tokio::time::Instant::now() + config.shutdown_timeout);
        }
        let message = tokio::select! {
            biased;
            _ = &mut terminated => break,
            _ = &mut shutting_down, if close_deadline.is_none() => {
                queue.close(CloseReason::GOING_AWAY);
                continue;
            }
            _ = &mut closing, if close_deadline.is_none() => continue,
            _ = sleep_until(token_expiry), if close_deadline.is_none() && token_expiry.is_some() => {
                queue.close(CloseReason::TOKEN_EXPIRED);
                continue;
            }
            _ = sleep_until(close_deadline), if close_deadline.is_some() => break,
            message = stream.next() => message,
        };
        match message {
            None => break,
            Some(Err(err)) => {
                debug!(session = %session.id(), %err, "read failed");
                let Some(reason) = CloseReason::for_read_error(&err) else {
                    break;
                };
                queue.close(reason);
                // The rest of a broken or oversized message may still be on
                // the wire, so nothing more can be read; let the writer send
                // the close, and drain at the end so no reset destroys it.
                if let Ok(ended) = tokio::time::timeout(config.write_timeout, &mut writer).await {
                    writer_ended = Some(ended.ok());
                }
                linger = true;
                break;
            }
            Some(Ok(message)) => {
                session.touch();
                if close_deadline.is_some() {
                    // Closing: wait for the client's close, act on nothing else.
                    continue;
                }
                let verdict = match message.is_binary() || message.is_text() {
                    true => limiter.check(),
                    false => Verdict::Allow,
                };
                if verdict != Verdict::Allow {
                    metrics::bump(&session.hub().counters().rate_limited_frames);
                    if verdict == (Verdict::Refuse { reply: true }) {
                        refuse_over_limit(&session, &message, config.rate_limit);
                    } else if verdict == Verdict::Close {
                        queue.close(CloseReason::RATE_LIMITED);
                    }
                    continue;
                }
                // A handler that never finishes must not outlive the session.
                session.inner.handling.store(true, Ordering::Relaxed);
                tokio::select! {
                    biased;
                    _ = &mut terminated => break,
                    _ = handle_message(&session, &router, message) => {}
                }
                session.inner.handling.store(false, Ordering::Relaxed);
                session.touch();
                if session
                    .inner
                    .identity_changed
                    .swap(false, Ordering::Acquire)
                {
                    token_expiry = expiry_of(&session);
                }
                // A client that pipelines gets its first replies while the
                // rest of its frames are handled, not all of them at the end.
                handled_in_a_row = handled_in_a_row.wrapping_add(1);
                if handled_in_a_row % YIELD_EVERY == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    terminate.cancel();
    let sink = match writer_ended {
        Some(sink) => sink,
        None => writer.await.ok(),
    };
    count_ending(&session);
    drop(registration);
    // When the client closed first, the codec answers its close and reports
    // the connection closed without flushing: what it could not write yet,
    // and what a TLS stream holds, go out now (the session is already gone
    // from the hub). A session the server closed has had its chance to
    // flush, so a slow consumer gets only a moment more.
    let last_flush = match queue.close_reason() {
        None => config.write_timeout,
        Some(_) => config.write_timeout.min(Duration::from_secs(1)),
    };
    if let Some(sink) = sink {
        // Boxed: the whole socket is in this future, and inline it would
        // make every session's task that much bigger for its whole life.
        Box::pin(async move {
            if let Ok(mut ws) = stream.reunite(sink) {
                flush_rest(&mut ws, last_flush).await;
                if linger {
                    crate::close::linger(ws.get_mut(), crate::close::LINGER).await;
                }
            }
        })
        .await;
    }
    debug!(
        session = %session.id(),
        reason = ?queue.close_reason(),
        received = session.frames_received(),
        sent = session.frames_sent(),
        dropped = queue.dropped(),
        "session closed"
    );
}

/// Flushes what the codec and the stream still hold, for at most `within`.
/// The codec answers a client's close and reports the connection closed
/// without flushing, and a TLS stream holds what was written until then.
pub(crate) async fn flush_rest<S>(ws: &mut WebSocketStream<S>, within: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let flush = async {
        // The codec's buffer (it reports ConnectionClosed once written),
        // then the stream's.
        let _ = SinkExt::flush(&mut *ws).await;
        let _ = ws.get_mut().flush().await;
    };
    let _ = tokio::time::timeout(within, flush).await;
}

/// Adds a finished session's close reason and drops to the node's counters.
fn count_ending(session: &Session) {
    let counters = session.hub().counters();
    let counter = match session.queue().close_reason() {
        Some(CloseReason::SLOW_CONSUMER) => Some(&counters.closed_slow_consumer),
        Some(CloseReason::RATE_LIMITED) => Some(&counters.closed_rate_limit),
        Some(CloseReason::MESSAGE_TOO_BIG) => Some(&counters.closed_message_too_big),
        Some(CloseReason::HEARTBEAT_TIMEOUT) => Some(&counters.closed_heartbeat),
        _ => None,
    };
    if let Some(counter) = counter {
        metrics::bump(counter);
    }
    let dropped = session.queue().dropped();
    counters.dropped_frames.inc_by(dropped);
}

/// Answers a frame over the rate limit with RATE_LIMITED, echoing what
/// can be read of it; the frame itself is not processed.
fn refuse_over_limit(session: &Session, message: &Message, rate: f64) {
    let frame = match message {
        Message::Binary(data) => Frame::decode(data.clone()).ok(),
        _ => None,
    };
    let (opcode, request_id) = frame.map_or((0, None), |f| (f.opcode, f.request_id));
    let reason = format!("rate limit exceeded: at most {rate} frames a second");
    session.send_error(ErrorCode::RateLimited.as_u32(), reason, opcode, request_id);
}

async fn handle_message(session: &Session, router: &Router, message: Message) {
    match message {
        Message::Binary(data) => {
            session
                .inner
                .frames_received
                .fetch_add(1, Ordering::Relaxed);
            router.handle_message(session, data).await;
        }
        Message::Text(text) => {
            session
                .inner
                .frames_received
                .fetch_add(1, Ordering::Relaxed);
            debug!(
                session = %session.id(),
                kind = "text",
                len = text.len(),
                payload = %Preview::new(text.as_bytes(), 32),
                "frame in"
            );
            session.send_error(
                ErrorCode::TextNotSupported.as_u32(),
                "text messages are not supported; send binary frames".into(),
                0,
                None,
            );
        }
        // Pongs only count as liveness (done by the caller); tungstenite
        // answers pings and close frames itself.
        Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
    }
}

fn send_welcome(session: &Session, config: &Config) {
    let welcome = v1::Welcome {
        session_id: session.id().to_owned(),
        user_id: session.user_id().unwrap_or_default().to_owned(),
        server: crate::SERVER_NAME.to_owned(),
        protocol_version: crate::PROTOCOL_VERSION,
        ping_interval_ms: config
            .ping_interval
            .as_millis()
            .try_into()
            .unwrap_or(u32::MAX),
        max_message_size: config.max_message_size.try_into().unwrap_or(u32::MAX),
        ping_timeout_ms: config
            .ping_timeout
            .as_millis()
            .try_into()
            .unwrap_or(u32::MAX),
    };
    let _ = session.send(&Frame::new(opcode::WELCOME, welcome.encode_to_vec()));
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Writes `messages` into the socket's buffer, then flushes once: a burst
/// of queued frames costs one write, not one per frame.
async fn write_all<S>(
    sink: &mut futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    messages: &mut Vec<Message>,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for message in messages.drain(..) {
        sink.feed(message).await?;
    }
    sink.flush().await
}

/// Keeps a session registered with its hub while it lives; dropping it
/// unregisters the session and everything it held, even if the task that
/// owns it panics.
pub struct Registration(Session);

impl Registration {
    fn new(session: &Session) -> Registration {
        session.hub().register(session);
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
        self.0.hub().unregister(self.0.id());
    }
}

enum WriterWork {
    Batch(Batch),
    Heartbeat,
}

/// The only task that writes to the socket: drains the queue in batches
/// (one flush per batch), pings on an interval and closes silent clients.
///
/// Returns the sink, so the session can flush what is left at the end.
async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    session: Session,
    config: Arc<Config>,
    terminate: CancellationToken,
) -> futures_util::stream::SplitSink<WebSocketStream<S>, Message>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let queue = session.queue().clone();
    // Grown on demand: an idle session should not carry room for 64 frames.
    let mut batch = Vec::new();
    let mut messages = Vec::new();
    let period = config.ping_interval;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let terminated = terminate.cancelled();
    tokio::pin!(terminated);
    loop {
        let work = tokio::select! {
            biased;
            _ = &mut terminated => break,
            // Before the queue, so a queue that never empties cannot starve
            // the heartbeat.
            _ = heartbeat.tick() => WriterWork::Heartbeat,
            batch = queue.next_batch(&mut batch, WRITE_BATCH) => WriterWork::Batch(batch),
        };
        let mut closing = false;
        match work {
            WriterWork::Batch(Batch::Frames) => {
                messages.extend(batch.drain(..).map(Message::Binary))
            }
            WriterWork::Batch(Batch::Close(reason)) => {
                debug!(session = %session.id(), code = reason.code, reason = reason.reason, "closing");
                messages.push(Message::Close(Some(reason.frame())));
                closing = true;
            }
            // While a handler runs the reader is not reading, so the client
            // cannot show it is alive; silence only counts between frames.
            WriterWork::Heartbeat
                if !session.inner.handling.load(Ordering::Relaxed)
                    && session.silent_for() > config.ping_timeout =>
            {
                queue.close(CloseReason::HEARTBEAT_TIMEOUT);
                continue;
            }
            WriterWork::Heartbeat => messages.push(Message::Ping(Bytes::new())),
        }
        let frames = messages.iter().filter(|m| m.is_binary()).count() as u64;
        let written = tokio::select! {
            biased;
            _ = &mut terminated => break,
            written = tokio::time::timeout(config.write_timeout, write_all(&mut sink, &mut messages)) => written,
        };
        match written {
            Ok(Ok(())) if closing => {
                // The reader waits for the client's answering close.
                return sink;
            }
            Ok(Ok(())) => {
                session
                    .inner
                    .frames_sent
                    .fetch_add(frames, Ordering::Relaxed);
            }
            Ok(Err(
                WsError::AlreadyClosed
                | WsError::ConnectionClosed
                | WsError::Protocol(ProtocolError::SendAfterClosing),
            )) if !closing => {
                // The client closed first: the reader answers its close and
                // ends the session; cutting it off here would lose that answer.
                return sink;
            }
            Ok(Err(err)) => {
                debug!(session = %session.id(), %err, "write failed");
                break;
            }
            Err(_) => {
                debug!(session = %session.id(), "write timed out; slow consumer");
                queue.close(CloseReason::SLOW_CONSUMER);
                break;
            }
        }
    }
    terminate.cancel();
    sink
}
