//! One WebSocket connection, from upgrade to close.
//!
//! Each connection runs as two tasks: [`run`] reads and dispatches frames in
//! order; a writer task ([`writer`]) owns the sink and is the only thing
//! that ever writes to the socket. Everything else — replies, pushes from
//! other sessions, heartbeat pings, close frames — goes through the
//! session's bounded [`SessionQueue`](crate::queue::SessionQueue), so a
//! client that stops reading fills its own queue and is closed; it never
//! blocks a producer.
//!
//! The one exception is the client itself: while its queue is backlogged
//! the reader reads nothing more from it, so a client that pipelines
//! requests faster than it reads the replies is slowed down by TCP instead
//! of overflowing its queue.

mod writer;

use std::{future::Future, pin::Pin, sync::Arc, task::Poll, time::Duration};

use bytes::Bytes;
use futures_util::{stream::SplitStream, FutureExt, StreamExt};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio_tungstenite::{
    tungstenite::{self, Message},
    WebSocketStream,
};
use tracing::debug;
use wsproto_proto::v1;

use crate::{
    close::CloseReason,
    error::ErrorCode,
    frame::{Frame, Preview},
    metrics,
    node::UserStream,
    opcode,
    rate::{RateLimit, Verdict},
    router::Router,
    session::{Registration, Session},
    signal::Signal,
    topic::Topic,
    Config,
};
pub(crate) use writer::flush_rest;
use writer::Sink;

/// When the reader lets the writer run in the middle of a client's burst
/// of frames, so that a pipelining client gets its first replies while the
/// rest of its frames are handled.
///
/// How soon depends on how busy the server is, measured by how long the
/// last yield took. Little else to run: after a few frames, so the client
/// works on the first replies while the server handles the rest (one
/// pipelining connection: about 1.3–1.5× the round trips of a fixed 8).
/// Busy: after more, since the writer runs late anyway and each yield
/// costs a pass through the scheduler (100 and 1,000 connections at depth
/// 16: about 1.25–1.3×). The count starts again whenever the client has
/// nothing more in flight: a client that sends one frame at a time never
/// makes the reader yield.
struct Pacer {
    in_a_row: u32,
    every: u32,
}

impl Pacer {
    /// Frames in a row before a yield while the server has little else to run.
    const SOON: u32 = 4;
    /// The same while it is busy.
    const LATE: u32 = 16;
    /// A yield that took longer was waiting behind other tasks.
    const BUSY: Duration = Duration::from_micros(200);

    fn new() -> Pacer {
        Pacer {
            in_a_row: 0,
            every: Pacer::SOON,
        }
    }

    /// The client had nothing more to read.
    fn caught_up(&mut self) {
        self.in_a_row = 0;
    }

    /// One more frame handled: yields when it is time to.
    async fn handled(&mut self) {
        self.in_a_row += 1;
        if self.in_a_row < self.every {
            return;
        }
        self.in_a_row = 0;
        let before = std::time::Instant::now();
        tokio::task::yield_now().await;
        self.every = match before.elapsed() < Pacer::BUSY {
            true => Pacer::SOON,
            false => Pacer::LATE,
        };
    }
}

/// Frames the reader takes in a row without checking for termination,
/// shutdown, closing and its timer.
const QUICK_READS: u32 = 8;

/// Runs one opcode-protocol connection until it ends, then unregisters it.
/// How long after a shutdown begins this session is closed: spread evenly
/// over the first half of `--shutdown-timeout`, so that the clients of a
/// node being restarted reconnect elsewhere a few at a time rather than
/// all at once (the session is served normally until then).
fn drain_delay(session: &Session, config: &Config) -> std::time::Duration {
    let spread = random_slot(session) % 1_000_000;
    config.shutdown_timeout / 2 * spread as u32 / 1_000_000
}

/// `shutdown` asks for a Close 1001 handshake. (At the shutdown deadline
/// the server drops this future, which ends the writer too.)
///
/// Not an `async fn`: an async function's arguments stay in its future for
/// as long as it lives, and this one lives as long as the connection. The
/// stream is split here and the one-time setup is boxed, so that an idle
/// session's future holds only what its read loop needs.
pub(crate) fn run<S>(
    ws: WebSocketStream<S>,
    session: Session,
    subscriptions: Vec<Topic>,
    router: Arc<Router>,
    config: Arc<Config>,
    shutdown: Signal,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // WELCOME is queued before the session is reachable through the hub, so
    // it is always the first frame.
    send_welcome(&session, &config);
    let (sink, mut stream) = ws.split();
    // Fired when either half is done, or when the server gives up waiting
    // at shutdown and drops this future: the other half then stops too.
    let terminate = Signal::new();
    let terminate_when_dropped = FireOnDrop(terminate.clone());
    let opening = Box::pin(open(
        session.clone(),
        subscriptions,
        sink,
        config.clone(),
        terminate.clone(),
    ));
    async move {
        let _terminate_when_dropped = terminate_when_dropped;
        let (registration, mut writer) = {
            let Opened {
                registration,
                user_stream,
                writer,
            } = opening.await;
            if let Some(user_stream) = user_stream {
                // Paced by the writer, so it runs now; the client's frames
                // wait (and its silence does not count) until it is done.
                // Boxed: it runs once.
                session.set_handling(true);
                let queue = session.queue();
                let recovery = Box::pin(session.node().recover_user_stream(queue, user_stream));
                tokio::select! {
                    _ = terminate.fired() => {}
                    _ = recovery => {}
                }
                session.set_handling(false);
            }
            (registration, writer)
        };
        let ended = read_loop(
            &mut stream,
            &session,
            &router,
            &config,
            &shutdown,
            &terminate,
            &mut writer,
        )
        .await;

        terminate.fire();
        let sink = match ended.writer {
            Some(sink) => sink,
            None => writer.await.ok(),
        };
        count_ending(&session);
        drop(registration);
        let queue = session.queue();
        // When the client closed first, the codec answers its close and
        // reports the connection closed without flushing: what it could not
        // write yet, and what a TLS stream holds, go out now (the session is
        // already gone from the hub). A session the server closed has had
        // its chance to flush, so a slow consumer gets only a moment more.
        let last_flush = match queue.close_reason() {
            None => config.write_timeout,
            Some(_) => config.write_timeout.min(Duration::from_secs(1)),
        };
        if let Some(sink) = sink {
            // Boxed: the whole socket is in this future.
            Box::pin(async move {
                if let Ok(mut ws) = stream.reunite(sink) {
                    flush_rest(&mut ws, last_flush).await;
                    if ended.linger {
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
}

/// What a session holds once it is open.
struct Opened<S> {
    registration: Registration,
    /// The user's critical pushes this device recovers before anything else.
    user_stream: Option<UserStream>,
    writer: JoinHandle<Sink<S>>,
}

/// Makes the session reachable and subscribes it, then starts its writer:
/// a client that has WELCOME (queued first) can be reached.
async fn open<S>(
    session: Session,
    subscriptions: Vec<Topic>,
    sink: Sink<S>,
    config: Arc<Config>,
    terminate: Signal,
) -> Opened<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A device's session recovers its user's critical pushes; if where
    // the device stands cannot be read, it comes back later rather than
    // silently skipping what it missed.
    let user_stream = match (session.device_key(), session.user_id()) {
        (Some(device), Some(user)) => {
            let node = session.node();
            match node.begin_user_stream(&device, user, session.queue()).await {
                Ok(user_stream) => Some(user_stream),
                Err(err) => {
                    debug!(session = %session.id(), %err, "device position unreadable");
                    session.queue().close(CloseReason::TRY_AGAIN_LATER);
                    None
                }
            }
        }
        _ => None,
    };
    let (registration, routed) = Registration::new(&session).await;
    // The user's pushes may not reach this node yet: a recovery now could
    // be followed by a silent hole, so the device comes back a little later
    // (nothing is lost: it recovers from where it stands then).
    let user_stream = match routed {
        Err(err) if user_stream.is_some() => {
            debug!(session = %session.id(), %err, "user's pushes not routed here in time");
            session.queue().close(CloseReason::TRY_AGAIN_LATER);
            None
        }
        _ => user_stream,
    };
    // Checked against permissions and the limit at upgrade.
    let _ = session
        .node()
        .subscribe_all(session.id(), &subscriptions)
        .await;
    debug!(session = %session.id(), remote = ?session.remote_addr(), "session opened");
    let writer = tokio::spawn(writer::write_loop(sink, session, config, terminate));
    Opened {
        registration,
        user_stream,
        writer,
    }
}

/// How the read loop ended.
struct Ended<S> {
    /// What the writer returned, when the loop already waited for it.
    writer: Option<Option<Sink<S>>>,
    /// Whether to drain what the client still sends before closing, so
    /// that no reset destroys the close frame.
    linger: bool,
}

/// Reads and dispatches the client's frames in order until the session
/// ends.
async fn read_loop<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    session: &Session,
    router: &Router,
    config: &Config,
    shutdown: &Signal,
    terminate: &Signal,
    writer: &mut JoinHandle<Sink<S>>,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let queue = session.queue();
    let mut limiter = RateLimit::new(config.rate_limit, config.rate_burst);
    let mut pacer = Pacer::new();
    // Frames taken in a row without the full select (see `QUICK_READS`).
    let mut quick_reads = 0u32;
    // What was read while gathering a run of publications but belongs
    // after it (see `gather_run`).
    let mut read_past_run = None;
    let mut close_deadline: Option<tokio::time::Instant> = None;
    let expiry_of = |session: &Session| {
        session
            .identity()
            .expires_at
            .map(|at| tokio::time::Instant::now() + crate::auth::time_left(at))
    };
    let mut token_expiry = expiry_of(session);
    // One timer for whichever deadline comes first, made when one is
    // first set (each timer a session holds is memory every connection
    // pays).
    let mut timer = Timer::default();
    // Made once, not per frame: each registers with its token or queue.
    // The guards below never poll one again after it has completed.
    let terminated = terminate.fired();
    let shutting_down = shutdown.fired();
    // When this session's turn to be closed by a shutdown comes (see
    // `drain_turn`).
    let mut drain_turn: Option<tokio::time::Instant> = None;
    let closing = queue.closing();
    tokio::pin!(terminated, shutting_down, closing);
    loop {
        if close_deadline.is_none() && queue.close_reason().is_some() {
            close_deadline = Some(tokio::time::Instant::now() + config.shutdown_timeout);
        }
        // Replies are queued past the bound: read nothing more until the
        // writer has taken them, so TCP holds the client back. Each request
        // adds about one reply, so replies alone never fill the queue. The
        // client cannot show it is alive meanwhile, as while a handler runs.
        let held_back = close_deadline.is_none() && queue.is_backlogged();
        session.set_handling(held_back);
        let deadline = match close_deadline {
            Some(at) => Some((at, Deadline::Close)),
            None => [
                drain_turn.map(|at| (at, Deadline::DrainTurn)),
                token_expiry.map(|at| (at, Deadline::TokenExpiry)),
            ]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at),
        };
        // A frame already here is taken without polling the other branches
        // (each costs a lock); they stay registered, and every few frames
        // the full select below checks them.
        let quick = !held_back && read_past_run.is_none() && quick_reads < QUICK_READS;
        let ready = quick
            && std::future::poll_fn(|cx| match stream.poll_next_unpin(cx) {
                Poll::Ready(message) => {
                    read_past_run = Some((message, None));
                    Poll::Ready(true)
                }
                Poll::Pending => Poll::Ready(false),
            })
            .await;
        if quick && !ready {
            pacer.caught_up();
        }
        quick_reads = match ready {
            true => quick_reads + 1,
            false => 0,
        };
        // What is already here (read now, or past a run) is taken first;
        // otherwise wait. Only a bool is matched on, so the wait keeps no
        // copy of an empty read in this future.
        let (message, verdict) = match !held_back && read_past_run.is_some() {
            true => read_past_run.take().expect("checked to be there"),
            false => {
                tokio::select! {
                    biased;
                    _ = &mut terminated => break,
                    _ = &mut shutting_down, if close_deadline.is_none() && drain_turn.is_none() => {
                        drain_turn = Some(tokio::time::Instant::now() + drain_delay(session, config));
                        continue;
                    }
                    _ = &mut closing, if close_deadline.is_none() => continue,
                    _ = timer.until(deadline.map(|(at, _)| at)) => match deadline.map(|(_, what)| what) {
                        Some(Deadline::Close) => break,
                        Some(Deadline::DrainTurn) => {
                            queue.close(CloseReason::going_away_after(random_slot(session)));
                            continue;
                        }
                        Some(Deadline::TokenExpiry) => {
                            queue.close(CloseReason::TOKEN_EXPIRED);
                            continue;
                        }
                        None => continue,
                    },
                    _ = queue.backlog_drained(), if held_back => {
                        // The writer is getting the replies through: the client is reading.
                        session.touch();
                        continue;
                    }
                    message = stream.next(), if !held_back => (message, None),
                }
            }
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
                let writer = match tokio::time::timeout(config.write_timeout, writer).await {
                    Ok(ended) => Some(ended.ok()),
                    Err(_) => None,
                };
                return Ended {
                    writer,
                    linger: true,
                };
            }
            Some(Ok(message)) => {
                session.touch();
                if close_deadline.is_some() {
                    // Closing: wait for the client's close, act on nothing else.
                    continue;
                }
                // Checked already when it was read while gathering a run.
                let verdict =
                    verdict.unwrap_or_else(|| match message.is_binary() || message.is_text() {
                        true => limiter.check(),
                        false => Verdict::Allow,
                    });
                if verdict != Verdict::Allow {
                    metrics::bump(&session.node().counters().rate_limited_frames);
                    if verdict == (Verdict::Refuse { reply: true }) {
                        refuse_over_limit(session, &message, config.rate_limit);
                    } else if verdict == Verdict::Close {
                        queue.close(CloseReason::RATE_LIMITED);
                    }
                    continue;
                }
                // A handler that never finishes must not outlive the session.
                session.set_handling(true);
                match message {
                    Message::Binary(data) if router.is_pipelined(&data) => {
                        // No more answers than fit before the queue is
                        // backlogged, so a run cannot overflow it.
                        let most = MAX_RUN.min(queue.room_before_backlog());
                        let gathered = gather_run(stream, router, &mut limiter, data, most);
                        read_past_run = gathered.read_past;
                        session.count_received(gathered.run.len() as u64);
                        tokio::select! {
                            biased;
                            _ = &mut terminated => break,
                            _ = router.handle_run(session, gathered.run) => {}
                        }
                    }
                    message => tokio::select! {
                        biased;
                        _ = &mut terminated => break,
                        _ = handle_message(session, router, message) => {}
                    },
                }
                session.set_handling(false);
                session.touch();
                if session.take_identity_changed() {
                    token_expiry = expiry_of(session);
                }
                pacer.handled().await;
            }
        }
    }
    Ended {
        writer: None,
        linger: false,
    }
}

/// Fires its signal when dropped, however the owner ends.
struct FireOnDrop(Signal);

impl Drop for FireOnDrop {
    fn drop(&mut self) {
        self.0.fire();
    }
}

/// Adds a finished session's close reason and drops to the node's counters.
fn count_ending(session: &Session) {
    let counters = session.node().counters();
    let counter = match session.queue().close_reason() {
        Some(CloseReason::SLOW_CONSUMER) => Some(&counters.closed_slow_consumer),
        Some(CloseReason::RATE_LIMITED) => Some(&counters.closed_rate_limit),
        Some(CloseReason::MESSAGE_TOO_BIG) => Some(&counters.closed_message_too_big),
        Some(CloseReason::HEARTBEAT_TIMEOUT) => Some(&counters.closed_heartbeat),
        Some(CloseReason::ACK_WINDOW) => Some(&counters.closed_ack_window),
        _ => None,
    };
    if let Some(counter) = counter {
        metrics::bump(counter);
    }
    let dropped = session.queue().dropped();
    counters.dropped_frames.inc_by(dropped);
}

/// Most publications handled as one run (see [`Router::handle_run`]).
const MAX_RUN: usize = 32;

/// What a read brought, and the rate limit's verdict on it when it was
/// checked already.
type Read = (Option<Result<Message, tungstenite::Error>>, Option<Verdict>);

/// A run of publications, and what was read after them.
struct Run {
    run: Vec<Bytes>,
    /// The next read, when it was not one more publication for the run (or
    /// one the rate limit did not allow: it is answered after the run).
    read_past: Option<Read>,
}

/// `first`, with the publications right behind it that have already
/// arrived and that the rate limit allows (up to `most`): handled side by
/// side, they cost one broker round trip, not one each, while their order
/// and their answers' order stay as sent. Never waits for more to arrive.
fn gather_run<S>(
    stream: &mut S,
    router: &Router,
    limiter: &mut RateLimit,
    first: Bytes,
    most: usize,
) -> Run
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let mut run = vec![first];
    while run.len() < most {
        let read = match stream.next().now_or_never() {
            None => break,
            Some(Some(Ok(Message::Binary(data)))) if router.is_pipelined(&data) => {
                match limiter.check() {
                    Verdict::Allow => {
                        run.push(data);
                        continue;
                    }
                    verdict => (Some(Ok(Message::Binary(data))), Some(verdict)),
                }
            }
            Some(other) => (other, None),
        };
        return Run {
            run,
            read_past: Some(read),
        };
    }
    Run {
        run,
        read_past: None,
    }
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
            session.count_received(1);
            router.handle_message(session, data).await;
        }
        Message::Text(text) => {
            session.count_received(1);
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

/// A number that differs from session to session and run to run.
fn random_slot(session: &Session) -> usize {
    use std::hash::BuildHasher;
    std::hash::RandomState::new().hash_one(session.id()) as usize
}

/// What the reader's one timer is set for.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    /// The session is closing and the client had its time to answer.
    Close,
    /// Its turn to be closed in a shutdown.
    DrainTurn,
    /// Its token expires.
    TokenExpiry,
}

/// A timer made on first use and reset after: most sessions never set one,
/// and those that do keep one registration instead of a new timer per
/// wait.
#[derive(Default)]
struct Timer(Option<Pin<Box<tokio::time::Sleep>>>);

impl Timer {
    /// Completes at `due`, or never when nothing is due.
    async fn until(&mut self, due: Option<tokio::time::Instant>) {
        let Some(due) = due else {
            return std::future::pending().await;
        };
        let sleep = match &mut self.0 {
            Some(sleep) => {
                if sleep.deadline() != due {
                    sleep.as_mut().reset(due);
                }
                sleep
            }
            None => self.0.insert(Box::pin(tokio::time::sleep_until(due))),
        };
        sleep.as_mut().await
    }

    /// Completes `period` after it is first polled (never, for a period
    /// past the clock's range).
    async fn after(&mut self, period: Duration) {
        let due = tokio::time::Instant::now().checked_add(period);
        self.until(due).await
    }
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::{identity::Identity, node::Node, queue::SessionQueue};

    /// The futures of one connection's two tasks live as long as it does,
    /// idle or not: their size is memory every connection pays. Printed
    /// with `--nocapture`; the budgets catch a change that inlines a large
    /// future (box it instead).
    #[tokio::test]
    async fn a_connections_tasks_stay_small() {
        let socket = |io| WebSocketStream::from_raw_socket(io, Role::Server, None);
        let (reader_io, _a) = tokio::io::duplex(64);
        let (writer_io, _b) = tokio::io::duplex(64);
        let session = Session::new(
            Node::new(),
            Identity::insecure(None, Vec::new()),
            None,
            None,
            SessionQueue::new(8),
            None,
        );
        let config = Arc::new(Config::default());
        let signal = Signal::new();
        let reader = run(
            socket(reader_io).await,
            session.clone(),
            Vec::new(),
            Arc::new(Router::new()),
            config.clone(),
            signal.clone(),
        );
        let (sink, _stream) = socket(writer_io).await.split();
        let writer = writer::write_loop(sink, session, config, signal);
        let (reader, writer) = (
            std::mem::size_of_val(&reader),
            std::mem::size_of_val(&writer),
        );
        println!("connection task futures: reader {reader} B, writer {writer} B");
        assert!(reader <= 1280, "reader future {reader} B");
        assert!(writer <= 768, "writer future {writer} B");
    }
}
