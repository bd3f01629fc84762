//! One WebSocket connection, from upgrade to close.
//!
//! Each connection is one task, [`run`]: it reads and dispatches the
//! client's frames in order and, through its [`Writer`], is the only thing
//! that ever writes to the socket. Everything else — replies, pushes from
//! other sessions, heartbeat pings, close frames — goes through the
//! session's bounded [`SessionQueue`](crate::queue::SessionQueue), so a
//! client that stops reading fills its own queue and is closed; it never
//! blocks a producer. One task rather than a reader and a writer: a reply
//! goes out without waking a second task, and an idle connection pays for
//! one task, with no lock between two halves of its socket.
//!
//! While a handler waits (for the broker, say), the task keeps writing:
//! the handler is polled beside the queue, and the client's next frame is
//! read once it is done. And while the queue is backlogged, the task reads
//! nothing more from the client, so a client that pipelines requests
//! faster than it reads the replies is slowed down by TCP instead of
//! overflowing its queue.

mod socket;
mod writer;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::debug;
use wsproto_proto::v1;

use crate::{
    close::CloseReason,
    deadline::Drain,
    error::ErrorCode,
    frame::{Frame, Preview},
    metrics,
    node::UserStream,
    opcode,
    queue::SessionQueue,
    rate::{RateLimit, Verdict},
    router::{Call, Router},
    session::{Registration, Session},
    stream::ReadReady,
    topic::Topic,
    Config,
};
pub(crate) use socket::Socket;
pub(crate) use writer::flush_rest;
use writer::{Outcome, Work, Writer};

/// When the task lets the replies out in the middle of a client's burst of
/// frames, so that a pipelining client gets its first replies while the
/// rest of its frames are handled.
///
/// How soon depends on how busy the server is, measured by how long the
/// yield after the last such write took. Little else to run: after two
/// frames, so the client works on the first replies while the server
/// handles the rest, and neither side runs out of work and sleeps while
/// the other runs. (Where waking a sleeping CPU is slow, as in many VMs,
/// four in a row let a single pipelining client and the server take turns,
/// each waking the other: 0.64× fastwebsockets' round trips at one
/// connection × depth 16 against 0.93× with two.) Busy: after more, since
/// each write and yield costs a system call and a pass through the
/// scheduler. The count starts again whenever the client has nothing more
/// in flight: a client that sends one frame at a time never makes the
/// task yield.
struct Pacer {
    in_a_row: u32,
    every: u32,
}

impl Pacer {
    /// Frames in a row before the replies go out while the server has
    /// little else to run.
    const SOON: u32 = 2;
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

    /// One more frame handled: true when it is time to let the replies out
    /// and then [`pause`](Pacer::pause).
    fn handled(&mut self) -> bool {
        self.in_a_row += 1;
        if self.in_a_row < self.every {
            return false;
        }
        self.in_a_row = 0;
        true
    }

    /// Lets other tasks run, and learns from how long that took.
    async fn pause(&mut self) {
        let before = std::time::Instant::now();
        tokio::task::yield_now().await;
        self.every = match before.elapsed() < Pacer::BUSY {
            true => Pacer::SOON,
            false => Pacer::LATE,
        };
    }
}

/// Events the task takes in a row without its full select: frames read,
/// flushes done and batches taken as soon as they are there. Then the
/// select checks the closing signal and the timer of its rare deadlines.
const QUICK_EVENTS: u32 = 16;

/// Runs one opcode-protocol connection until it ends, then unregisters it.
/// Its server's `drain` closes it with 1001 in a shutdown. (At the
/// shutdown deadline the server drops this future.)
///
/// Not an `async fn`: an async function's arguments stay in its future for
/// as long as it lives, and this one lives as long as the connection. The
/// one-time setup is boxed, so that an idle session's future holds only
/// what its loop needs.
pub(crate) fn run<S>(
    mut socket: Socket<S>,
    session: Session,
    subscriptions: Vec<Topic>,
    router: Arc<Router>,
    config: Arc<Config>,
    drain: Drain,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + ReadReady + Send + 'static,
{
    // WELCOME goes into the socket's buffer before the session is reachable
    // through the hub, so it is always the first frame; not through the
    // queue, so that a session nothing is sent to never grows the queue's
    // buffer or the writer's. (Only a bool is kept: an error would stay in
    // the future for the session's whole life.)
    let welcomed = socket
        .write_first(Message::Binary(welcome(&session, &config).encode()))
        .is_ok();
    let opening = Box::pin(open(session.clone(), subscriptions));
    async move {
        let Opened {
            registration,
            user_stream,
        } = opening.await;
        let ended = match welcomed {
            true => serve(&mut socket, &session, &router, &config, drain, user_stream).await,
            false => Ended { linger: false },
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
        // Boxed: it runs once.
        Box::pin(async {
            writer::flush_socket(&mut socket, last_flush).await;
            if ended.linger {
                crate::close::linger(socket.stream_mut(), crate::close::LINGER).await;
            }
        })
        .await;
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
struct Opened {
    registration: Registration,
    /// The user's critical pushes this device recovers before anything else.
    user_stream: Option<UserStream>,
}

/// Makes the session reachable and subscribes it; its frames (WELCOME
/// first) are written once this is done, so a client that has WELCOME can
/// be reached.
async fn open(session: Session, subscriptions: Vec<Topic>) -> Opened {
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
    Opened {
        registration,
        user_stream,
    }
}

/// How the session's loop ended.
struct Ended {
    /// Whether to drain what the client still sends before closing, so
    /// that no reset destroys the close frame.
    linger: bool,
}

/// What woke the session's task.
enum Event {
    /// What a read brought (see [`Read`]).
    Read(Read),
    /// What the session was busy with is done.
    Done,
    /// The writer has something to do.
    Work(Work),
    /// The socket's flush of the writer's batch ended.
    Flushed(Result<(), tungstenite::Error>),
}

/// What a session is busy with. Its next frame is read once this is done
/// (frames are handled in order), while the writer goes on.
enum Busy<'a> {
    /// One frame's handler.
    Frame(Call),
    /// A run of publications, or a device's recovery of its user's pushes.
    Other(Pin<Box<dyn Future<Output = ()> + Send + 'a>>),
}

impl Busy<'_> {
    fn poll_done(&mut self, session: &Session, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Busy::Frame(call) => call.poll_answered(session, cx),
            Busy::Other(future) => future.as_mut().poll(cx),
        }
    }
}

/// Runs `f` once with the task's context.
async fn with_context<T>(f: impl FnOnce(&mut Context<'_>) -> T) -> T {
    let mut f = Some(f);
    std::future::poll_fn(|cx| Poll::Ready(f.take().expect("polled once")(cx))).await
}

/// Serves the session until it ends: reads and dispatches the client's
/// frames in order, and writes what its queue holds.
async fn serve<S>(
    socket: &mut Socket<S>,
    session: &Session,
    router: &Router,
    config: &Config,
    drain: Drain,
    user_stream: Option<UserStream>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin + ReadReady,
{
    let queue = session.queue();
    // WELCOME waits in the socket's buffer (see `run`).
    let mut writer = Writer::new(session, config, drain, 1);
    // A device first recovers its user's critical pushes. Boxed: it runs
    // once. The client's frames wait (and its silence does not count)
    // until it is done.
    let mut busy = user_stream.map(|user_stream| {
        let recovery = session.node().recover_user_stream(queue, user_stream);
        Busy::Other(Box::pin(async move {
            recovery.await;
        }))
    });
    let mut limiter = RateLimit::new(config.rate_limit, config.rate_burst);
    let mut pacer = Pacer::new();
    // The replies are let out before anything more is read (see `Pacer`).
    let mut let_out = false;
    // Events taken in a row without the full select (see `QUICK_EVENTS`).
    let mut quick = 0u32;
    // What was read while gathering a run of publications but belongs
    // after it (see `gather_run`).
    let mut read_past_run: Option<Read> = None;
    let mut close_deadline: Option<tokio::time::Instant> = None;
    // When the writer's flush has to be done by; set when the socket makes
    // it wait.
    let mut write_deadline: Option<tokio::time::Instant> = None;
    writer.expire_at(token_expiry(session));
    // One timer for whichever of the rare deadlines comes first (each
    // timer a session holds is memory every connection pays, and a
    // registration in tokio's timer wheel). The heartbeat and the token's
    // expiry are the deadline thread's (see `Writer`).
    let mut timer = Timer::default();
    // Made once, not per wait: it registers with its signal. The guard
    // below never polls it again after it has completed.
    let closing = queue.closing();
    tokio::pin!(closing);
    // A read found nothing earlier in this same poll of the task, which
    // is registered to be woken by the socket's readiness: until the task
    // has waited (the select, a pause), another look would find the same.
    let mut read_registered = false;
    loop {
        if let_out && (queue.is_empty() || !writer.is_open()) {
            let_out = false;
            read_registered = false;
            pacer.pause().await;
        }
        let (close_reason, backlogged) = queue.close_reason_and_backlog();
        if close_deadline.is_none() && close_reason.is_some() {
            close_deadline = Some(tokio::time::Instant::now() + config.shutdown_timeout);
        }
        // Replies are queued past the bound: read nothing more until they
        // are written, so TCP holds the client back. Each request adds
        // about one reply, so replies alone never fill the queue. The
        // client cannot show it is alive meanwhile, as while a handler runs.
        let held_back = close_deadline.is_none() && backlogged;
        session.set_handling(held_back || busy.is_some());
        let may_read = busy.is_none() && !held_back && !let_out;
        let flushing = writer.is_flushing();

        // What is here already (read past a run, or ready on the socket or
        // in the queue) is taken without the full select, a few in a row.
        // The quick path's polls registered the task with the socket and
        // the queue just now, in this same poll of the task: the select's
        // first poll need not repeat them (each a readiness check or a
        // lock), only its later ones, once something woke the task.
        let mut just_polled = false;
        let ready = match may_read && read_past_run.is_some() {
            true => read_past_run.take().map(Event::Read),
            false if quick < QUICK_EVENTS => {
                let ready = with_context(|cx| {
                    let registered = &mut read_registered;
                    poll_now(
                        socket,
                        &mut writer,
                        &mut pacer,
                        queue,
                        may_read,
                        registered,
                        cx,
                    )
                })
                .await;
                just_polled = ready.is_none();
                ready
            }
            false => None,
        };
        quick = match ready {
            Some(_) => quick + 1,
            None => 0,
        };
        let event = match ready {
            Some(event) => event,
            None => {
                read_registered = false;
                // Only for the select: most turns of the loop find an
                // event without it.
                let deadline = [
                    close_deadline.map(|at| (at, Deadline::Close)),
                    write_deadline.map(|at| (at, Deadline::Write)),
                ]
                .into_iter()
                .flatten()
                .min_by_key(|(at, _)| *at);
                if deadline.is_none() {
                    timer.clear();
                }
                tokio::select! {
                    biased;
                    // A close wakes the queue's writer too: while the writer's
                    // branch waits on the queue, this one would only touch
                    // one more cache line per wait.
                    _ = &mut closing, if close_deadline.is_none() && (flushing || !writer.is_open()) => continue,
                    _ = timer.until(deadline.map(|(at, _)| at)), if deadline.is_some() => match deadline.map(|(_, what)| what) {
                        Some(Deadline::Close) => break,
                        Some(Deadline::Write) => {
                            debug!(session = %session.id(), "write timed out; slow consumer");
                            queue.close(CloseReason::SLOW_CONSUMER);
                            break;
                        }
                        None => continue,
                    },
                    () = std::future::poll_fn(|cx| match &mut busy {
                        Some(busy) => busy.poll_done(session, cx),
                        None => Poll::Pending,
                    }), if busy.is_some() => Event::Done,
                    // The socket before the queue: a session its client woke
                    // reads without a look at the queue, which it takes
                    // before it waits again anyway.
                    event = after_first(just_polled, |cx| poll_socket(socket, flushing, may_read, cx)),
                        if flushing || may_read => event,
                    work = writer.next_work(queue, just_polled), if writer.is_open() && !flushing => Event::Work(work),
                }
            }
        };
        let read = match event {
            Event::Work(work) => {
                let begun =
                    with_context(|cx| writer.begin(work, socket, cx, session, config)).await;
                let flushed = match begun {
                    None => continue,
                    Some(Poll::Pending) => {
                        // Only a write the socket makes wait reads the clock.
                        write_deadline = Some(tokio::time::Instant::now() + config.write_timeout);
                        continue;
                    }
                    Some(Poll::Ready(flushed)) => flushed,
                };
                if !take_flush(&mut writer, flushed, session, held_back) {
                    break;
                }
                continue;
            }
            Event::Flushed(flushed) => {
                write_deadline = None;
                if !take_flush(&mut writer, flushed, session, held_back) {
                    break;
                }
                continue;
            }
            Event::Done => {
                busy = None;
                session.touch();
                if session.take_identity_changed() {
                    writer.expire_at(token_expiry(session));
                }
                let_out |= pacer.handled();
                continue;
            }
            Event::Read(read) => read,
        };
        let (message, verdict) = read;
        let message = match message {
            None => break,
            Some(Err(err)) => {
                debug!(session = %session.id(), %err, "read failed");
                let Some(reason) = CloseReason::for_read_error(&err) else {
                    break;
                };
                queue.close(reason);
                // The rest of a broken or oversized message may still be on
                // the wire, so nothing more can be read: write the close,
                // and drain at the end so no reset destroys it. Boxed: it
                // runs once.
                Box::pin(writer.finish(socket, session, config)).await;
                return Ended { linger: true };
            }
            Some(Ok(message)) => message,
        };
        session.touch();
        if close_deadline.is_some() {
            // Closing: wait for the client's close, act on nothing else.
            continue;
        }
        // Checked already when it was read while gathering a run.
        let verdict = verdict.unwrap_or_else(|| match message.is_binary() || message.is_text() {
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
        match message {
            Message::Binary(data) if router.is_pipelined(&data) => {
                // No more answers than fit before the queue is backlogged,
                // so a run cannot overflow it.
                let most = MAX_RUN.min(queue.room_before_backlog());
                let gathered =
                    with_context(|cx| gather_run(socket, cx, router, &mut limiter, data, most))
                        .await;
                read_past_run = gathered.read_past;
                session.count_received(gathered.run.len() as u64);
                busy = Some(Busy::Other(Box::pin(
                    router.handle_run(session, gathered.run),
                )));
                continue;
            }
            // Handled right here (most handlers are done at once), and the
            // next turn writes what they pushed: the pushes wake no one.
            Message::Binary(data) => {
                session.count_received(1);
                let pending = with_context(|cx| {
                    queue.while_writer_runs(|| {
                        let mut call = router.start(session, data)?;
                        call.poll_answered(session, cx).is_pending().then_some(call)
                    })
                })
                .await;
                if let Some(call) = pending {
                    busy = Some(Busy::Frame(call));
                    continue;
                }
            }
            message => queue.while_writer_runs(|| handle_other(session, message)),
        }
        if session.take_identity_changed() {
            writer.expire_at(token_expiry(session));
        }
        let_out |= pacer.handled();
    }
    Ended { linger: false }
}

/// Hands a finished flush to the writer; false when nothing more can be
/// written.
fn take_flush(
    writer: &mut Writer,
    flushed: Result<(), tungstenite::Error>,
    session: &Session,
    held_back: bool,
) -> bool {
    if writer.written(flushed, session) == Outcome::Failed {
        return false;
    }
    if held_back {
        // The replies are getting through: the client is reading.
        session.touch();
    }
    true
}

/// The socket's flush, while the writer is `flushing`, and its next read,
/// when the session `may_read`.
fn poll_socket<S>(
    socket: &mut Socket<S>,
    flushing: bool,
    may_read: bool,
    cx: &mut Context<'_>,
) -> Poll<Event>
where
    S: AsyncRead + AsyncWrite + Unpin + ReadReady,
{
    if flushing {
        if let Poll::Ready(flushed) = socket.poll_flush(cx) {
            return Poll::Ready(Event::Flushed(flushed));
        }
    }
    if may_read {
        if let Poll::Ready(message) = socket.poll_read(cx) {
            return Poll::Ready(Event::Read((message, None)));
        }
    }
    Poll::Pending
}

/// `poll` as a future whose first poll is skipped when `just_polled`: the
/// caller found it pending a moment ago, in the same poll of the task, so
/// the task is registered to be woken already.
pub(super) fn after_first<T>(
    mut just_polled: bool,
    mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>,
) -> impl Future<Output = T> {
    std::future::poll_fn(move |cx| match std::mem::take(&mut just_polled) {
        true => Poll::Pending,
        false => poll(cx),
    })
}

/// What is ready now: the socket's flush or next read, or the queue's next
/// batch (see `QUICK_EVENTS`).
fn poll_now<S>(
    socket: &mut Socket<S>,
    writer: &mut Writer,
    pacer: &mut Pacer,
    queue: &SessionQueue,
    may_read: bool,
    // See `read_registered` in `serve`: set when a read found nothing.
    read_registered: &mut bool,
    cx: &mut Context<'_>,
) -> Option<Event>
where
    S: AsyncRead + AsyncWrite + Unpin + ReadReady,
{
    let flushing = writer.is_flushing();
    let read = may_read && !*read_registered;
    match poll_socket(socket, flushing, read, cx) {
        Poll::Ready(event) => return Some(event),
        Poll::Pending if may_read => {
            *read_registered = true;
            pacer.caught_up();
        }
        Poll::Pending => {}
    }
    match !flushing && writer.is_open() {
        true => match writer.poll_queue(queue, cx) {
            Poll::Ready(work) => Some(Event::Work(work)),
            Poll::Pending => None,
        },
        false => None,
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
    socket: &mut Socket<S>,
    cx: &mut Context<'_>,
    router: &Router,
    limiter: &mut RateLimit,
    first: Bytes,
    most: usize,
) -> Run
where
    S: AsyncRead + AsyncWrite + Unpin + ReadReady,
{
    let mut run = vec![first];
    while run.len() < most {
        let read = match socket.poll_read(cx) {
            Poll::Pending => break,
            Poll::Ready(Some(Ok(Message::Binary(data)))) if router.is_pipelined(&data) => {
                match limiter.check() {
                    Verdict::Allow => {
                        run.push(data);
                        continue;
                    }
                    verdict => (Some(Ok(Message::Binary(data))), Some(verdict)),
                }
            }
            Poll::Ready(other) => (other, None),
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

/// Answers a message that is not a binary frame.
fn handle_other(session: &Session, message: Message) {
    match message {
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
        // answers pings and close frames itself. Binary frames are the
        // router's.
        Message::Binary(_)
        | Message::Ping(_)
        | Message::Pong(_)
        | Message::Close(_)
        | Message::Frame(_) => {}
    }
}

/// The session's WELCOME frame.
fn welcome(session: &Session, config: &Config) -> Frame {
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
    Frame::new(opcode::WELCOME, welcome.encode_to_vec())
}

/// What the session's one timer is set for.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    /// The session is closing and the client had its time to answer.
    Close,
    /// The writer's flush had its `--write-timeout`: the client does not
    /// read.
    Write,
}

/// When the session's token expires, if it does.
fn token_expiry(session: &Session) -> Option<std::time::Instant> {
    let left = crate::auth::time_left(session.identity().expires_at?);
    std::time::Instant::now().checked_add(left)
}

/// A timer made on first use, reset while a deadline follows another (one
/// registration instead of a new timer per wait), and dropped once none is
/// due (a device's redelivery timer is never made for other sessions).
#[derive(Default)]
struct Timer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The task the armed timer will wake: until it fires, polling it
    /// again for the same task and deadline would change nothing. (A
    /// session's select polls its timer on every wait, and tokio's poll
    /// of a sleep costs more than this check.)
    registered: Option<Waker>,
}

impl Timer {
    /// Forgets the deadline. The timer is dropped rather than left armed:
    /// while any tokio timer is registered, every park of a worker runs
    /// the timer wheel and gives `epoll_wait` a timeout (see
    /// [`deadline`](crate::deadline)).
    fn clear(&mut self) {
        if self.sleep.is_some() {
            self.sleep = None;
            self.registered = None;
        }
    }

    /// Completes at `due`, or never when nothing is due.
    async fn until(&mut self, due: Option<tokio::time::Instant>) {
        std::future::poll_fn(|cx| self.poll_until(due, cx)).await
    }

    fn poll_until(&mut self, due: Option<tokio::time::Instant>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(due) = due else {
            self.clear();
            return Poll::Pending;
        };
        let sleep = match &mut self.sleep {
            Some(sleep) if sleep.deadline() == due => {
                let registered = self
                    .registered
                    .as_ref()
                    .is_some_and(|waker| waker.will_wake(cx.waker()));
                if registered && !sleep.is_elapsed() {
                    return Poll::Pending;
                }
                sleep
            }
            Some(sleep) => {
                sleep.as_mut().reset(due);
                self.registered = None;
                sleep
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(due))),
        };
        // Out of its cooperative budget, tokio returns Pending without
        // registering the task with the timer.
        let budgeted = tokio::task::coop::has_budget_remaining();
        let poll = sleep.as_mut().poll(cx);
        if poll.is_pending() && budgeted {
            match &self.registered {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => self.registered = Some(cx.waker().clone()),
            }
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    use super::*;
    use crate::{identity::Identity, node::Node};

    /// The timer skips polls that could change nothing, but a first poll
    /// that tokio's cooperative budget turned away registered nothing: the
    /// next one must reach tokio, or the timer would never fire.
    #[tokio::test]
    async fn a_timer_first_polled_out_of_budget_still_fires() {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..1_000 {
            sender.send(i).unwrap();
        }
        let mut timer = Timer::default();
        let due = tokio::time::Instant::now() + Duration::from_millis(20);
        std::future::poll_fn(|cx| {
            // Each message taken spends budget, until tokio says Pending.
            while let Poll::Ready(Some(_)) = receiver.poll_recv(cx) {}
            assert!(!tokio::task::coop::has_budget_remaining());
            assert!(timer.poll_until(Some(due), cx).is_pending());
            Poll::Ready(())
        })
        .await;
        tokio::time::timeout(Duration::from_secs(5), timer.until(Some(due)))
            .await
            .expect("the timer fires");
        // Armed again, and polled many times while waiting: still fires.
        let due = tokio::time::Instant::now() + Duration::from_millis(20);
        tokio::time::timeout(Duration::from_secs(5), async {
            for _ in 0..3 {
                assert!(futures_util::poll!(std::pin::pin!(timer.until(Some(due)))).is_pending());
            }
            timer.until(Some(due)).await
        })
        .await
        .expect("the timer fires");
    }

    /// A connection's task lives as long as it does, idle or not: its
    /// future's size is memory every connection pays. Printed with
    /// `--nocapture`; the budget catches a change that inlines a large
    /// future (box it instead).
    #[tokio::test]
    async fn a_connections_task_stays_small() {
        let (io, _peer) = tokio::io::duplex(64);
        let session = Session::new(
            Node::new(),
            Identity::insecure(None, Vec::new()),
            None,
            None,
            SessionQueue::new(8),
            None,
        );
        let task = run(
            Socket::new(io, WebSocketConfig::default()),
            session,
            Vec::new(),
            Arc::new(Router::new()),
            Arc::new(Config::default()),
            crate::deadline::Drain::new(),
        );
        let size = std::mem::size_of_val(&task);
        println!("connection task future: {size} B");
        assert!(size <= 4096, "connection task future {size} B");
    }
}
