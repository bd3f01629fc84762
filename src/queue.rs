//! The bounded queue between every producer of a session's frames (its own
//! handlers, other sessions, the server) and the one task that writes to
//! its socket.
//!
//! Producers never wait: a push either succeeds at once or fails, so a slow
//! client can never stall whoever is sending to it. What happens when the
//! queue is full depends on each frame's [`DeliveryPolicy`]: by default the
//! session is closed as a slow consumer (1008) and what was pending is
//! freed; topics may instead drop their oldest frames or keep only their
//! newest, and critical topics are evicted last.
//!
//! Replies to the client's own requests are held back differently: while
//! the queue is [backlogged](SessionQueue::is_backlogged) the session's
//! reader stops reading the socket, so a client that pipelines faster than
//! it reads is slowed down by TCP rather than closed.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::{
    broker::Position,
    close::CloseReason,
    frame::Outgoing,
    inflight::{AckSettings, Inflight},
    signal::{Event, Fired},
};

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The queue was full; the session is now closing as a slow consumer.
    #[error("send queue full; session closed as a slow consumer")]
    Full,
    /// The session is already closing.
    #[error("session is closing")]
    Closed,
    /// The device let too many critical deliveries go unacknowledged; the
    /// session is now closing (4003).
    #[error("acknowledgement window full; session closed")]
    Unacknowledged,
}

/// What a full queue does to make room, per topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Close the session with 1008: no message of this topic is ever lost
    /// silently.
    #[default]
    Disconnect,
    /// Drop the oldest droppable frame (or, if none, this one).
    DropOldest,
    /// Keep only the newest pending frame of the topic (what a live
    /// dashboard wants); when full, like `DropOldest`.
    Conflate,
}

/// How one topic's frames are treated in a session queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeliveryPolicy {
    /// What happens to the topic's frames when the queue is full.
    pub overflow: Overflow,
    /// Never evicted or conflated; when the queue is full, droppable
    /// (drop-oldest, conflate) frames make room first.
    pub critical: bool,
}

/// A policy that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy {0:?}: expected disconnect, drop-oldest or conflate, optionally followed by ,critical")]
pub struct PolicyError(String);

impl DeliveryPolicy {
    /// Never dropped; a full queue closes the session (users' critical
    /// pushes, `--topic-policy PATTERN=critical`).
    pub const CRITICAL: DeliveryPolicy = DeliveryPolicy {
        overflow: Overflow::Disconnect,
        critical: true,
    };
}

impl FromStr for DeliveryPolicy {
    type Err = PolicyError;

    /// `disconnect`, `drop-oldest`, `conflate` or `critical` (= disconnect,
    /// critical), each optionally followed by `,critical`.
    fn from_str(s: &str) -> Result<DeliveryPolicy, PolicyError> {
        let mut policy = DeliveryPolicy::default();
        for word in s.split(',').map(str::trim) {
            match word {
                "disconnect" => policy.overflow = Overflow::Disconnect,
                "drop-oldest" => policy.overflow = Overflow::DropOldest,
                "conflate" => policy.overflow = Overflow::Conflate,
                "critical" => policy.critical = true,
                _ => return Err(PolicyError(s.to_owned())),
            }
        }
        Ok(policy)
    }
}

impl fmt::Display for DeliveryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let overflow = match self.overflow {
            Overflow::Disconnect => "disconnect",
            Overflow::DropOldest => "drop-oldest",
            Overflow::Conflate => "conflate",
        };
        f.write_str(overflow)?;
        if self.critical {
            f.write_str(",critical")?;
        }
        Ok(())
    }
}

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued (possibly after evicting an older, lower-priority frame).
    Queued,
    /// Replaced the pending frame of the same conflated topic.
    Conflated,
    /// The queue was full and this frame was the one to go.
    Dropped,
    /// The session already has this position of the stream (it came with
    /// a recovery): not queued twice.
    Duplicate,
}

/// What the writer should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    /// Frames were moved into the caller's buffer: write them.
    Frames,
    /// Send this close frame; nothing follows it.
    Close(CloseReason),
    /// A heartbeat is due (see `SessionQueue::request_heartbeat`): it
    /// comes before frames, so a queue that never empties cannot starve it.
    Heartbeat,
}

/// A cheaply cloned handle to one session's send queue.
#[derive(Clone)]
pub struct SessionQueue {
    inner: Arc<Inner>,
}

// In declaration order (`repr(C)`), what every push touches first: a
// fan-out pushes to thousands of queues in turn, and each cache line of
// one is a miss (see `SessionQueue::prefetch`).
#[repr(C)]
struct Inner {
    capacity: usize,
    max_bytes: usize,
    /// The writer's own task runs something that may push (a handler) and
    /// looks at the queue before it waits again: a push need not wake it.
    /// Read under the state's lock (see [`SessionQueue::while_writer_runs`]).
    writer_runs: AtomicBool,
    state: std::sync::Mutex<State>,
    /// Notified (all waiters) when the writer takes frames, for a replay
    /// waiting for room.
    taken: Notify,
    /// Fired once a close reason is set, for whoever waits on that.
    closing: Event,
}

#[derive(Default)]
#[repr(C)]
struct State {
    frames: VecDeque<Entry>,
    /// Bytes of the frames pending.
    bytes: usize,
    /// The writer, while it waits for frames. (A waker, not a `Notify`:
    /// there is only ever one writer, and this costs no lock of its own.)
    writer: Option<Waker>,
    close: Option<CloseReason>,
    /// Critical deliveries not acknowledged yet, for a session that must
    /// acknowledge them (a device's); boxed, so other sessions pay a word.
    inflight: Option<Box<Inflight>>,
    /// Streams this session recovered or is recovering, by stream key; only
    /// those are checked for positions (see [`SessionQueue::replay`]).
    streams: HashMap<Box<str>, Follow>,
    /// Frames dropped or conflated away so far.
    dropped: u64,
    /// Paced pushes waiting for the writer to take frames; `taken` is
    /// notified only when there are some.
    pacing: usize,
    /// A heartbeat is due: the writer's next batch is
    /// [`Batch::Heartbeat`].
    heartbeat: bool,
}

/// Counts a paced push as waiting for room until it stops waiting, however
/// it stops.
struct Pacing<'a>(&'a SessionQueue);

impl Drop for Pacing<'_> {
    fn drop(&mut self) {
        self.0.state().pacing -= 1;
    }
}

/// What a recovering session is sent before its live deliveries resume.
#[derive(Debug, Default)]
pub struct Replay {
    /// The last position the client has (when of the stream's current
    /// epoch): live deliveries up to it are not sent again.
    pub seen: Option<Position>,
    /// A GAP frame for what cannot be recovered.
    pub notice: Option<Bytes>,
    /// Numbered DELIVERY frames from history, oldest first, all of the
    /// stream's current epoch.
    pub missed: Vec<(Position, Bytes)>,
    /// The stream is critical: a session that acknowledges must
    /// acknowledge these too.
    pub critical: bool,
}

/// Where a recovered stream stands for this session.
enum Follow {
    /// A replay from history is under way: live deliveries wait here.
    Recovering(Vec<(Position, Entry)>),
    /// Live deliveries at or before this position were replayed already.
    Following(Position),
}

struct Entry {
    frame: Outgoing,
    policy: DeliveryPolicy,
    /// The topic a conflated frame belongs to.
    topic: Option<Arc<str>>,
}

/// A queue entry; the topic is kept only where conflation needs it.
fn entry(frame: impl Into<Outgoing>, policy: DeliveryPolicy, topic: Option<&Arc<str>>) -> Entry {
    Entry {
        frame: frame.into(),
        policy,
        // Not cloned (an atomic increment per recipient of a fan-out)
        // for anything but conflation.
        topic: topic
            .filter(|_| policy.overflow == Overflow::Conflate)
            .cloned(),
    }
}

impl Entry {
    fn evictable(&self) -> bool {
        !self.policy.critical && self.policy.overflow != Overflow::Disconnect
    }
}

impl SessionQueue {
    /// A queue holding at most `capacity` frames (at least one), with no
    /// limit on their bytes.
    pub fn new(capacity: usize) -> SessionQueue {
        SessionQueue::with_limits(capacity, usize::MAX)
    }

    /// A queue holding at most `capacity` frames and `max_bytes` bytes; a
    /// single frame larger than `max_bytes` is only taken into an empty
    /// queue, so large replies still get through.
    pub fn with_limits(capacity: usize, max_bytes: usize) -> SessionQueue {
        SessionQueue {
            inner: Arc::new(Inner {
                state: std::sync::Mutex::new(State::default()),
                taken: Notify::new(),
                closing: Event::default(),
                capacity: capacity.max(1),
                max_bytes,
                writer_runs: AtomicBool::new(false),
            }),
        }
    }

    /// Asks the CPU to start loading the part of this queue a push touches,
    /// for a caller about to push to many queues in turn. Only a hint.
    #[inline]
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // From the reference counts, which come first, through the
            // first fields of the state.
            let start = Arc::as_ptr(&self.inner).cast::<i8>().wrapping_sub(16);
            for line in 0..3 {
                // SAFETY: a prefetch is a hint; it neither faults nor reads
                // into the program, whatever the address.
                #[allow(unused_unsafe)]
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(64 * line));
                }
            }
        }
    }

    /// Runs `f` on the writer's own task, which looks at the queue before
    /// it waits again: what `f` pushes (a handler's reply) wakes no one. A
    /// wake would only have tokio poll the task once more, for nothing.
    pub(crate) fn while_writer_runs<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        self.inner.writer_runs.store(true, Ordering::Relaxed);
        let _done = Done(&self.inner.writer_runs);
        f()
    }

    /// Releases the state's lock, then wakes the writer if it waits for
    /// frames.
    fn unlock_and_wake_writer(&self, mut state: std::sync::MutexGuard<'_, State>) {
        // Read under the lock: a push that sees the flag set comes before
        // the writer's next look at the queue, which takes this lock after
        // clearing the flag, so the writer finds what was pushed. (Other
        // tasks' pushes too: the writer is awake then either way.)
        let writer = match self.inner.writer_runs.load(Ordering::Relaxed) {
            true => None,
            false => state.writer.take(),
        };
        drop(state);
        if let Some(writer) = writer {
            writer.wake();
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every mutation is a single push/pop), so poisoning is ignored.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reply or control frame for the writer (the default policy:
    /// a full queue closes the session): encoded whole (`Bytes`), or a
    /// [`Frame`](crate::Frame) with its header apart ([`Outgoing`]).
    ///
    /// # Errors
    /// [`PushError::Full`] when the queue was full (the session is then
    /// closed with 1008 and its pending frames dropped), and
    /// [`PushError::Closed`] when the session is already closing.
    pub fn push(&self, frame: impl Into<Outgoing>) -> Result<(), PushError> {
        self.push_with(frame, DeliveryPolicy::default(), None)
            .map(drop)
    }

    /// Queues a frame of `topic` under `policy`.
    ///
    /// # Errors
    /// As [`SessionQueue::push`]; `Full` only when the policies leave no
    /// other way to make room.
    pub fn push_with(
        &self,
        frame: impl Into<Outgoing>,
        policy: DeliveryPolicy,
        topic: Option<&Arc<str>>,
    ) -> Result<Pushed, PushError> {
        let state = self.state();
        if state.close.is_some() {
            return Err(PushError::Closed);
        }
        self.push_locked(state, entry(frame, policy, topic))
    }

    /// Queues a numbered delivery of `stream` at `position`. On a stream
    /// being recovered it waits for the replay; on a recovered one, a
    /// position the replay already delivered is dropped as a duplicate.
    ///
    /// # Errors
    /// As [`SessionQueue::push_with`].
    pub fn push_delivery(
        &self,
        frame: Bytes,
        policy: DeliveryPolicy,
        topic: Option<&Arc<str>>,
        stream: &str,
        position: &Position,
    ) -> Result<Pushed, PushError> {
        let mut state = self.state();
        if state.close.is_some() {
            return Err(PushError::Closed);
        }
        if !state.streams.is_empty() {
            let capacity = self.inner.capacity;
            match state.streams.get_mut(stream) {
                None => {}
                Some(Follow::Recovering(held)) => {
                    if held.len() < capacity {
                        held.push((position.clone(), entry(frame, policy, topic)));
                        return Ok(Pushed::Queued);
                    }
                    // A replay slower than the stream: as a full queue.
                    drop(state);
                    self.close(CloseReason::SLOW_CONSUMER);
                    return Err(PushError::Full);
                }
                Some(Follow::Following(seen)) => {
                    if seen.epoch == position.epoch && position.seq <= seen.seq {
                        return Ok(Pushed::Duplicate);
                    }
                    *seen = position.clone();
                }
            }
        }
        if policy.critical && !self.track(&mut state, stream, position, &frame) {
            drop(state);
            self.close(CloseReason::ACK_WINDOW);
            return Err(PushError::Unacknowledged);
        }
        self.push_locked(state, entry(frame, policy, topic))
    }

    /// From now on, critical deliveries wait for the client's
    /// acknowledgement and are sent again when it does not come (see
    /// [`crate::inflight`]).
    pub fn expect_acknowledgements(&self, settings: AckSettings) {
        self.state().inflight = Some(Box::new(Inflight::new(settings)));
    }

    /// Records a critical delivery as in flight, when this session
    /// acknowledges; false when its window is full.
    fn track(&self, state: &mut State, stream: &str, position: &Position, frame: &Bytes) -> bool {
        match state.inflight.as_mut() {
            Some(inflight) if position.seq > 0 => inflight
                .track(stream, position, frame, tokio::time::Instant::now())
                .is_ok(),
            _ => true,
        }
    }

    /// The client processed `stream` up to `position`; returns how many
    /// deliveries in flight that settled.
    pub fn acknowledge(&self, stream: &str, position: &Position) -> usize {
        self.state()
            .inflight
            .as_mut()
            .map_or(0, |inflight| inflight.acknowledge(stream, position))
    }

    /// When the next redelivery is due; `None` when nothing waits for an
    /// acknowledgement.
    pub fn next_redelivery(&self) -> Option<tokio::time::Instant> {
        self.state().inflight.as_ref()?.next_due()
    }

    /// Queues again, marked redelivered, what is due at `now` and still
    /// unacknowledged; returns how many. While older frames are still
    /// waiting to be written the due ones are put off instead: the client
    /// has not had a chance to acknowledge.
    pub fn redeliver(&self, now: tokio::time::Instant) -> usize {
        let due = {
            let mut state = self.state();
            if state.close.is_some() {
                return 0;
            }
            let State {
                frames, inflight, ..
            } = &mut *state;
            let Some(inflight) = inflight.as_mut() else {
                return 0;
            };
            if !frames.is_empty() {
                inflight.postpone_due(now);
                return 0;
            }
            inflight.take_due(now)
        };
        let count = due.len();
        for frame in due {
            // Like any critical frame: a full queue closes the session.
            if self
                .push_with(frame, DeliveryPolicy::CRITICAL, None)
                .is_err()
            {
                break;
            }
        }
        count
    }

    fn push_locked(
        &self,
        mut state: std::sync::MutexGuard<'_, State>,
        entry: Entry,
    ) -> Result<Pushed, PushError> {
        let policy = entry.policy;
        if policy.overflow == Overflow::Conflate && !policy.critical {
            let pending = state.frames.iter_mut().find(|e| {
                e.policy.overflow == Overflow::Conflate
                    && !e.policy.critical
                    && e.topic.is_some()
                    && e.topic == entry.topic
            });
            if let Some(pending) = pending {
                let added = entry.frame.len();
                let removed = std::mem::replace(pending, entry).frame.len();
                state.bytes = state.bytes - removed + added;
                state.dropped += 1;
                return Ok(Pushed::Conflated);
            }
        }
        let len = entry.frame.len();
        while !self.fits(&state, len) {
            // Droppable frames make room first. Replies, errors and
            // disconnect-policy frames are never dropped silently, so when
            // they and critical frames fill the queue the session goes.
            match state.frames.iter().position(Entry::evictable) {
                Some(victim) => {
                    if let Some(evicted) = state.frames.remove(victim) {
                        state.bytes -= evicted.frame.len();
                    }
                    state.dropped += 1;
                }
                None if entry.evictable() => {
                    state.dropped += 1;
                    return Ok(Pushed::Dropped);
                }
                None => {
                    state.frames = VecDeque::new();
                    state.bytes = 0;
                    self.close_locked(state, CloseReason::SLOW_CONSUMER);
                    return Err(PushError::Full);
                }
            }
        }
        state.bytes += len;
        state.frames.push_back(entry);
        self.unlock_and_wake_writer(state);
        Ok(Pushed::Queued)
    }

    /// Holds live deliveries of `stream` until [`SessionQueue::replay`]
    /// has delivered what the session missed: call it before the
    /// subscription (or membership) that brings them is registered.
    pub fn begin_recovery(&self, stream: &str) {
        self.state()
            .streams
            .insert(stream.into(), Follow::Recovering(Vec::new()));
    }

    /// Ends a recovery begun with [`SessionQueue::begin_recovery`]: queues
    /// the replay's notice and missed messages, then the live deliveries
    /// held meanwhile that are not
    /// among them, in order; from then on a delivery at or before the last
    /// position is dropped as a duplicate. The replay waits for room
    /// rather than overflowing the queue, so a long one is paced by the
    /// client. Returns false when the session closed meanwhile.
    pub async fn replay(&self, stream: &str, replay: Replay) -> bool {
        if let Some(notice) = replay.notice {
            if !self
                .push_paced(entry(notice, DeliveryPolicy::default(), None))
                .await
            {
                return false;
            }
        }
        let mut last = replay.seen;
        let policy = match replay.critical {
            true => DeliveryPolicy::CRITICAL,
            false => DeliveryPolicy::default(),
        };
        for (position, frame) in replay.missed {
            if !self
                .push_tracked(stream, &position, entry(frame, policy, None))
                .await
            {
                return false;
            }
            last = Some(position);
        }
        loop {
            let held = {
                let mut state = self.state();
                let Some(follow) = state.streams.get_mut(stream) else {
                    return state.close.is_none();
                };
                let held = match follow {
                    Follow::Recovering(held) => std::mem::take(held),
                    Follow::Following(_) => Vec::new(),
                };
                if held.is_empty() {
                    // What the client has from now on: the last replayed
                    // position (or, with nothing replayed, none yet).
                    let seen = last.clone().unwrap_or_default();
                    state.streams.insert(stream.into(), Follow::Following(seen));
                    return state.close.is_none();
                }
                held
            };
            for (position, entry) in held {
                let duplicate = last
                    .as_ref()
                    .is_some_and(|l| l.epoch == position.epoch && position.seq <= l.seq);
                if duplicate {
                    continue;
                }
                if !self.push_tracked(stream, &position, entry).await {
                    return false;
                }
                last = Some(position);
            }
        }
    }

    /// [`SessionQueue::push_paced`] for a numbered delivery, which is in
    /// flight until acknowledged when critical and the window has room for
    /// replays (half of it). A replay never waits for acknowledgements
    /// (the client may be waiting for the reply that follows it) and never
    /// overflows the window: what does not fit is not redelivered within
    /// this session, and still covered by the device's acknowledged
    /// position at its next recovery.
    async fn push_tracked(&self, stream: &str, position: &Position, entry: Entry) -> bool {
        if entry.policy.critical {
            let mut state = self.state();
            if state.inflight.as_ref().is_some_and(|i| i.has_replay_room()) {
                // A numbered delivery is encoded whole (no header apart).
                self.track(&mut state, stream, position, entry.frame.payload());
            }
        }
        self.push_paced(entry).await
    }

    /// Stops checking positions of `stream` (the subscription ended), and
    /// stops waiting for its acknowledgements.
    pub fn forget_stream(&self, stream: &str) {
        let mut state = self.state();
        state.streams.remove(stream);
        if let Some(inflight) = state.inflight.as_mut() {
            inflight.forget(stream);
        }
    }

    /// Whether a frame of `len` bytes fits: under the frame count and the
    /// byte budget (a larger frame fits only an empty queue).
    fn fits(&self, state: &State, len: usize) -> bool {
        state.frames.len() < self.inner.capacity
            && (state.bytes + len <= self.inner.max_bytes || state.frames.is_empty())
    }

    /// Queues `entry` once there is room for it; false once closed.
    async fn push_paced(&self, entry: Entry) -> bool {
        loop {
            let taken = self.inner.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            {
                let mut state = self.state();
                if state.close.is_some() {
                    return false;
                }
                if self.fits(&state, entry.frame.len()) {
                    state.bytes += entry.frame.len();
                    state.frames.push_back(entry);
                    self.unlock_and_wake_writer(state);
                    return true;
                }
                state.pacing += 1;
            }
            let _pacing = Pacing(self);
            tokio::select! {
                _ = &mut taken => {}
                _ = self.inner.closing.fired() => return false,
            }
        }
    }

    /// Frames dropped or conflated away so far under non-disconnect policies.
    pub fn dropped(&self) -> u64 {
        self.state().dropped
    }

    /// Asks the writer to close the session after the frames already queued.
    /// The first reason given wins; returns whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let state = self.state();
        if state.close.is_some() {
            return false;
        }
        self.close_locked(state, reason);
        true
    }

    /// Sets the close reason of a queue that has none yet, releases the
    /// lock, and tells whoever waits: the writer and the closing signal's
    /// waiters.
    fn close_locked(&self, mut state: std::sync::MutexGuard<'_, State>, reason: CloseReason) {
        state.close = Some(reason);
        self.unlock_and_wake_writer(state);
        self.inner.closing.fire();
    }

    /// Asks the writer for a heartbeat (a ping, or a close if the client
    /// has been silent too long), ahead of the frames waiting; called when
    /// one is due (see `deadline`). Nothing happens once the session is
    /// closing.
    pub(crate) fn request_heartbeat(&self) {
        let mut state = self.state();
        if state.close.is_some() {
            return;
        }
        state.heartbeat = true;
        self.unlock_and_wake_writer(state);
    }

    /// Whether a heartbeat was asked for and not taken yet.
    #[cfg(test)]
    pub(crate) fn heartbeat_requested(&self) -> bool {
        self.state().heartbeat
    }

    /// The reason the session is closing, once it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.state().close
    }

    /// Completes once the session is closing, whoever closed it.
    pub fn closing(&self) -> Fired<'_> {
        self.inner.closing.fired()
    }

    /// Gives back the memory of the queue's buffer, when it is empty.
    pub fn shrink(&self) {
        let mut state = self.state();
        if state.frames.is_empty() {
            state.frames = VecDeque::new();
        }
    }

    /// Frames waiting to be written.
    pub fn len(&self) -> usize {
        self.state().frames.len()
    }

    /// Bytes of the frames waiting to be written.
    pub fn bytes(&self) -> usize {
        self.state().bytes
    }

    /// True when no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when more than half the queue is taken, in frames or in bytes.
    /// The session then reads no further request until its writer has
    /// drained it: each request adds at most about one reply, so
    /// replies alone never fill the queue, and the other half stays free
    /// for pushes.
    pub fn is_backlogged(&self) -> bool {
        self.backlogged(&self.state())
    }

    /// The close reason, once there is one, and whether the queue is
    /// [backlogged](SessionQueue::is_backlogged): what a session checks
    /// before each turn, under one lock.
    pub fn close_reason_and_backlog(&self) -> (Option<CloseReason>, bool) {
        let state = self.state();
        (state.close, self.backlogged(&state))
    }

    /// Frames that can still be queued before the queue is
    /// [backlogged](SessionQueue::is_backlogged) (at least 1).
    pub fn room_before_backlog(&self) -> usize {
        let state = self.state();
        (self.inner.capacity / 2)
            .saturating_sub(state.frames.len())
            .max(1)
    }

    fn backlogged(&self, state: &State) -> bool {
        state.frames.len() > self.inner.capacity / 2 || state.bytes > self.inner.max_bytes / 2
    }

    /// Waits for work: moves up to `max` pending frames into `out`, or, once
    /// none are left and the queue is closing, returns the close reason.
    /// Only the session's writer calls this.
    pub async fn next_batch(&self, out: &mut Vec<Outgoing>, max: usize) -> Batch {
        std::future::poll_fn(|cx| self.poll_batch(cx, out, max)).await
    }

    /// [`next_batch`](SessionQueue::next_batch), polled.
    pub(crate) fn poll_batch(
        &self,
        cx: &mut Context<'_>,
        out: &mut Vec<Outgoing>,
        max: usize,
    ) -> Poll<Batch> {
        let mut guard = self.state();
        if std::mem::take(&mut guard.heartbeat) && guard.close.is_none() {
            return Poll::Ready(Batch::Heartbeat);
        }
        if !guard.frames.is_empty() {
            let n = guard.frames.len().min(max.max(1));
            let state = &mut *guard;
            for entry in state.frames.drain(..n) {
                state.bytes -= entry.frame.len();
                out.push(entry.frame);
            }
            let pacing = state.pacing > 0;
            drop(guard);
            if pacing {
                self.inner.taken.notify_waiters();
            }
            return Poll::Ready(Batch::Frames);
        }
        if let Some(reason) = guard.close {
            return Poll::Ready(Batch::Close(reason));
        }
        // Registered under the lock every push takes, so no push between
        // the check above and the wait is missed.
        match &guard.writer {
            Some(writer) if writer.will_wake(cx.waker()) => {}
            _ => guard.writer = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_come_out_in_order_then_the_close() {
        let queue = SessionQueue::new(8);
        queue.push(Bytes::from_static(b"a")).unwrap();
        queue.push(Bytes::from_static(b"b")).unwrap();
        assert!(queue.close(CloseReason::GOING_AWAY));
        assert_eq!(queue.push(Bytes::from_static(b"c")), Err(PushError::Closed));
        let mut out = Vec::new();
        assert_eq!(queue.next_batch(&mut out, 16).await, Batch::Frames);
        assert_eq!(out, [Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        assert_eq!(
            queue.next_batch(&mut out, 16).await,
            Batch::Close(CloseReason::GOING_AWAY)
        );
    }

    #[tokio::test]
    async fn shrinking_frees_an_empty_queues_buffer_and_keeps_a_busy_ones() {
        let queue = SessionQueue::new(8);
        queue.push(Bytes::from_static(b"a")).unwrap();
        queue.shrink();
        assert!(queue.state().frames.capacity() > 0, "a frame waits");
        let mut out = Vec::new();
        assert_eq!(queue.next_batch(&mut out, 8).await, Batch::Frames);
        queue.shrink();
        assert_eq!(queue.state().frames.capacity(), 0);
        queue.push(Bytes::from_static(b"b")).unwrap();
        out.clear();
        assert_eq!(queue.next_batch(&mut out, 8).await, Batch::Frames);
        assert_eq!(out, [Bytes::from_static(b"b")]);
    }

    #[tokio::test]
    async fn past_half_full_is_a_backlog_until_the_writer_takes_frames() {
        let queue = SessionQueue::with_limits(4, 100);
        for _ in 0..2 {
            queue.push(Bytes::from_static(b"x")).unwrap();
        }
        assert!(!queue.is_backlogged(), "half is not past half");
        queue.push(Bytes::from_static(b"x")).unwrap();
        assert!(queue.is_backlogged(), "3 of 4 frames");
        let mut out = Vec::new();
        assert_eq!(queue.next_batch(&mut out, 1).await, Batch::Frames);
        assert!(!queue.is_backlogged(), "the writer took one");

        let bytes = SessionQueue::with_limits(100, 100);
        bytes.push(Bytes::from(vec![0u8; 51])).unwrap();
        assert!(bytes.is_backlogged(), "51 of 100 bytes");
    }

    #[tokio::test]
    async fn a_full_queue_closes_as_slow_consumer_and_frees_its_frames() {
        let queue = SessionQueue::new(2);
        queue.push(Bytes::from_static(b"1")).unwrap();
        queue.push(Bytes::from_static(b"2")).unwrap();
        assert_eq!(queue.push(Bytes::from_static(b"3")), Err(PushError::Full));
        assert_eq!(queue.len(), 0);
        assert!(!queue.close(CloseReason::NORMAL), "first reason wins");
        let mut out = Vec::new();
        assert_eq!(
            queue.next_batch(&mut out, 16).await,
            Batch::Close(CloseReason::SLOW_CONSUMER)
        );
        assert!(out.is_empty());
    }

    fn policy(s: &str) -> DeliveryPolicy {
        s.parse().unwrap()
    }

    async fn drain(queue: &SessionQueue) -> Vec<Bytes> {
        let mut out = Vec::new();
        if !queue.is_empty() {
            queue.next_batch(&mut out, usize::MAX).await;
        }
        out.into_iter().map(Outgoing::into_bytes).collect()
    }

    #[test]
    fn policies_parse() {
        assert_eq!(policy("disconnect"), DeliveryPolicy::default());
        assert_eq!(
            policy("conflate,critical"),
            DeliveryPolicy {
                overflow: Overflow::Conflate,
                critical: true
            }
        );
        assert_eq!(policy("critical").overflow, Overflow::Disconnect);
        assert_eq!(policy("drop-oldest").to_string(), "drop-oldest");
        assert!("sometimes".parse::<DeliveryPolicy>().is_err());
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest_frames_and_counts_drops() {
        let queue = SessionQueue::new(3);
        let topic: Arc<str> = "t".into();
        for i in 0..5u8 {
            let pushed = queue.push_with(Bytes::from(vec![i]), policy("drop-oldest"), Some(&topic));
            assert_eq!(pushed, Ok(Pushed::Queued));
        }
        assert_eq!(queue.dropped(), 2);
        assert_eq!(drain(&queue).await, [vec![2u8], vec![3], vec![4]]);
    }

    #[tokio::test]
    async fn conflate_keeps_one_pending_frame_per_topic() {
        let queue = SessionQueue::new(8);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        for i in 0..3u8 {
            queue
                .push_with(Bytes::from(vec![i]), policy("conflate"), Some(&a))
                .unwrap();
            queue
                .push_with(Bytes::from(vec![10 + i]), policy("conflate"), Some(&b))
                .unwrap();
        }
        assert_eq!(queue.dropped(), 4);
        assert_eq!(drain(&queue).await, [vec![2u8], vec![12]]);
    }

    #[tokio::test]
    async fn critical_frames_push_out_droppable_ones_and_only_they_can_overflow() {
        let queue = SessionQueue::new(3);
        let (alarm, data): (Arc<str>, Arc<str>) = ("alarm".into(), "data".into());
        queue
            .push_with(
                Bytes::from_static(b"d1"),
                policy("drop-oldest"),
                Some(&data),
            )
            .unwrap();
        queue
            .push_with(
                Bytes::from_static(b"d2"),
                policy("drop-oldest"),
                Some(&data),
            )
            .unwrap();
        queue
            .push_with(Bytes::from_static(b"a1"), policy("critical"), Some(&alarm))
            .unwrap();
        // Full: alarms evict droppable data.
        queue
            .push_with(Bytes::from_static(b"a2"), policy("critical"), Some(&alarm))
            .unwrap();
        queue
            .push_with(Bytes::from_static(b"a3"), policy("critical"), Some(&alarm))
            .unwrap();
        // Data can no longer get in, and is dropped rather than closing the session.
        let pushed = queue.push_with(
            Bytes::from_static(b"d3"),
            policy("drop-oldest"),
            Some(&data),
        );
        assert_eq!(pushed, Ok(Pushed::Dropped));
        assert_eq!(queue.dropped(), 3);
        // Critical frames alone overflow: now the session goes.
        let overflow = queue.push_with(Bytes::from_static(b"a4"), policy("critical"), Some(&alarm));
        assert_eq!(overflow, Err(PushError::Full));
        assert_eq!(queue.close_reason(), Some(CloseReason::SLOW_CONSUMER));
    }

    #[tokio::test]
    async fn replies_are_never_evicted_even_by_critical_frames() {
        let queue = SessionQueue::new(2);
        let alarm: Arc<str> = "alarm".into();
        queue.push(Bytes::from_static(b"reply")).unwrap();
        queue
            .push_with(Bytes::from_static(b"a1"), policy("critical"), Some(&alarm))
            .unwrap();
        let overflow = queue.push_with(Bytes::from_static(b"a2"), policy("critical"), Some(&alarm));
        assert_eq!(overflow, Err(PushError::Full));
        assert_eq!(queue.dropped(), 0);
    }

    #[tokio::test]
    async fn a_disconnect_frame_takes_the_place_of_a_droppable_one() {
        let queue = SessionQueue::new(2);
        let data: Arc<str> = "data".into();
        queue
            .push_with(Bytes::from_static(b"d1"), policy("conflate"), Some(&data))
            .unwrap();
        queue.push(Bytes::from_static(b"r1")).unwrap();
        queue.push(Bytes::from_static(b"r2")).unwrap();
        assert_eq!(
            drain(&queue).await,
            [Bytes::from_static(b"r1"), Bytes::from_static(b"r2")]
        );
        assert_eq!(queue.close_reason(), None);
    }

    #[tokio::test]
    async fn the_byte_budget_bounds_memory_like_the_frame_count() {
        let queue = SessionQueue::with_limits(100, 10);
        let data: Arc<str> = "data".into();
        queue
            .push_with(
                Bytes::from_static(b"12345"),
                policy("drop-oldest"),
                Some(&data),
            )
            .unwrap();
        queue
            .push_with(
                Bytes::from_static(b"67890"),
                policy("drop-oldest"),
                Some(&data),
            )
            .unwrap();
        // 5 more bytes do not fit: the oldest droppable frame makes room.
        queue
            .push_with(
                Bytes::from_static(b"abcde"),
                policy("drop-oldest"),
                Some(&data),
            )
            .unwrap();
        assert_eq!((queue.len(), queue.bytes(), queue.dropped()), (2, 10, 1));
        // Replies cannot be dropped, so a reply that does not fit closes the session.
        assert_eq!(queue.push(Bytes::from_static(b"0123456789")), Ok(()));
        assert_eq!(queue.push(Bytes::from_static(b"x")), Err(PushError::Full));
        assert_eq!(queue.bytes(), 0);

        // A frame bigger than the whole budget still goes into an empty queue.
        let roomy = SessionQueue::with_limits(100, 10);
        roomy.push(Bytes::from(vec![0u8; 1000])).unwrap();
        assert_eq!(drain(&roomy).await.len(), 1);
        assert_eq!(roomy.bytes(), 0);
    }

    #[tokio::test]
    async fn batches_are_capped() {
        let queue = SessionQueue::new(8);
        for _ in 0..5 {
            queue.push(Bytes::from_static(b"x")).unwrap();
        }
        let mut out = Vec::new();
        queue.next_batch(&mut out, 3).await;
        assert_eq!(out.len(), 3);
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_push_from_another_task() {
        let queue = SessionQueue::new(8);
        let producer = queue.clone();
        let writer = tokio::spawn(async move {
            let mut out = Vec::new();
            queue.next_batch(&mut out, 8).await;
            out
        });
        tokio::task::yield_now().await;
        producer.push(Bytes::from_static(b"late")).unwrap();
        assert_eq!(writer.await.unwrap(), [Bytes::from_static(b"late")]);
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What the writer's own task pushes while it runs wakes nothing (it
    /// looks at the queue before it waits again, and finds it there);
    /// after that, a push wakes it as before.
    #[test]
    fn pushes_while_the_writer_runs_wake_nothing_and_are_found() {
        let queue = SessionQueue::new(8);
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        assert!(queue.poll_batch(&mut cx, &mut out, 8).is_pending());

        queue.while_writer_runs(|| queue.push(Bytes::from_static(b"reply")).unwrap());
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "woken by its own reply");
        assert!(queue.poll_batch(&mut cx, &mut out, 8).is_ready());
        assert_eq!(out, [Bytes::from_static(b"reply")]);

        out.clear();
        assert!(queue.poll_batch(&mut cx, &mut out, 8).is_pending());
        queue.push(Bytes::from_static(b"push")).unwrap();
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "not woken by a push");
    }
}
