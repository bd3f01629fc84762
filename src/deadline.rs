//! The deadlines every open session has (its next heartbeat, its token's
//! expiry, and in a shutdown its turn to be closed), kept by one thread
//! for the whole process instead of a tokio timer per session.
//!
//! Why a thread: while any tokio timer is pending, every time a worker
//! parks it runs the timer wheel and passes a timeout to `epoll_wait`,
//! which arms a kernel timer. A heartbeat is due every `--ping-interval`
//! whatever the session does, so a timer per session meant one always
//! pending, and that cost about 1 µs of CPU per request of a single client
//! on the benchmark machine (a virtual machine, where arming a timer is
//! dear). This thread sleeps until the earliest deadline, then tells the
//! session through its queue (a heartbeat request, or a close), which
//! wakes the session like any push. Tokio's timers are left to what is
//! rare: a write the socket makes wait, a close handshake, a shutdown.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    hash::BuildHasher,
    sync::{
        atomic::{AtomicU64, Ordering},
        LazyLock, Mutex, MutexGuard,
    },
    thread::Thread,
    time::{Duration, Instant},
};

use crate::{close::CloseReason, queue::SessionQueue};

/// One session's place among the deadlines; dropping it forgets them.
#[must_use = "the deadlines are forgotten when this is dropped"]
pub(crate) struct Deadlines {
    /// Its own until dropped.
    slot: u32,
}

impl Deadlines {
    /// Keeps deadlines for the session whose queue this is (none yet but
    /// its turn, if `drain` has begun).
    pub(crate) fn register(queue: SessionQueue, drain: Drain) -> Deadlines {
        let mut state = KEEPER.state();
        let slot = match state.free.pop() {
            Some(slot) => slot,
            None => {
                state.slots.push(Slot::default());
                u32::try_from(state.slots.len() - 1).expect("fewer than 2^32 sessions")
            }
        };
        state.live += 1;
        let entry = &mut state.slots[slot as usize];
        entry.queue = Some(queue);
        entry.drain = Some(drain);
        let now = Instant::now();
        let ends = state
            .draining
            .iter()
            .find(|(d, _)| *d == drain)
            .map(|(_, ends)| *ends);
        let sooner = ends.is_some_and(|ends| {
            let turn = now + random_within(ends.saturating_duration_since(now));
            state.schedule(slot, Kind::Drain, Some(turn))
        });
        drop(state);
        if sooner {
            KEEPER.thread.unpark();
        }
        Deadlines { slot }
    }

    /// Asks for the session's next heartbeat at `at` (the writer's
    /// [`Batch::Heartbeat`](crate::queue::Batch::Heartbeat)), replacing the
    /// one asked for before.
    pub(crate) fn heartbeat_at(&self, at: Instant) {
        self.set(Kind::Heartbeat, Some(at));
    }

    /// Closes the session with [`CloseReason::TOKEN_EXPIRED`] at `at`, or
    /// never; replaces the expiry set before.
    pub(crate) fn expire_at(&self, at: Option<Instant>) {
        self.set(Kind::Expiry, at);
    }

    fn set(&self, kind: Kind, at: Option<Instant>) {
        let mut state = KEEPER.state();
        let sooner = state.schedule(self.slot, kind, at);
        drop(state);
        if sooner {
            KEEPER.thread.unpark();
        }
    }
}

impl Drop for Deadlines {
    fn drop(&mut self) {
        let mut state = KEEPER.state();
        let slot = &mut state.slots[self.slot as usize];
        // What is still in the heap for this slot no longer matches it.
        slot.generation = slot.generation.wrapping_add(1);
        let queue = slot.queue.take();
        slot.heartbeat = None;
        slot.expiry = None;
        slot.turn = None;
        slot.drain = None;
        state.free.push(self.slot);
        state.live -= 1;
        drop(state);
        drop(queue);
    }
}

/// The sessions of one server, which its shutdown closes (see
/// [`Drain::begin`]); several servers may share a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Drain(u64);

impl Drain {
    pub(crate) fn new() -> Drain {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Drain(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// Closes these sessions with 1001, each at a random moment within
    /// `spread` from now (and those registered later within what is left
    /// of it), so that the clients of a node being restarted reconnect
    /// elsewhere a few at a time rather than all at once. Each is served
    /// normally until then.
    pub(crate) fn begin(self, spread: Duration) {
        let now = Instant::now();
        let mut state = KEEPER.state();
        state.draining.push((self, now + spread));
        let mut sooner = false;
        for slot in 0..state.slots.len() {
            let entry = &state.slots[slot];
            if entry.drain == Some(self) && entry.queue.is_some() {
                sooner |=
                    state.schedule(slot as u32, Kind::Drain, Some(now + random_within(spread)));
            }
        }
        drop(state);
        if sooner {
            KEEPER.thread.unpark();
        }
    }
}

/// A random span up to `span`.
fn random_within(span: Duration) -> Duration {
    let fraction = (random() % 1_000_000) as f64 / 1_000_000.0;
    span.mul_f64(fraction)
}

fn random() -> u64 {
    std::hash::RandomState::new().hash_one(Instant::now())
}

/// What a deadline does when it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Heartbeat,
    Expiry,
    /// Its turn to be closed in a shutdown.
    Drain,
}

/// A deadline in the heap. It still counts only while its slot holds the
/// same generation and the same deadline of its kind: replaced or
/// forgotten deadlines are left in the heap and skipped when they come.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at: Instant,
    slot: u32,
    generation: u32,
    kind: Kind,
}

#[derive(Default)]
struct Slot {
    generation: u32,
    queue: Option<SessionQueue>,
    /// The server whose shutdown closes it.
    drain: Option<Drain>,
    heartbeat: Option<Instant>,
    expiry: Option<Instant>,
    /// Its turn to be closed, once its server shuts down.
    turn: Option<Instant>,
}

impl Slot {
    /// Whether `due` is still this slot's deadline of its kind.
    fn is_current(&self, due: &Due) -> bool {
        let deadline = match due.kind {
            Kind::Heartbeat => self.heartbeat,
            Kind::Expiry => self.expiry,
            Kind::Drain => self.turn,
        };
        self.generation == due.generation && deadline == Some(due.at)
    }

    fn deadline(&mut self, kind: Kind) -> &mut Option<Instant> {
        match kind {
            Kind::Heartbeat => &mut self.heartbeat,
            Kind::Expiry => &mut self.expiry,
            Kind::Drain => &mut self.turn,
        }
    }
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Sessions registered (see the heap's sweep in `Keeper::run`).
    live: usize,
    heap: BinaryHeap<Reverse<Due>>,
    /// When the thread looks next, while it sleeps until a deadline.
    wakes_at: Option<Instant>,
    /// Servers shutting down, and when their spread ends.
    draining: Vec<(Drain, Instant)>,
}

impl State {
    /// Sets `slot`'s deadline of `kind`; true when the thread must be
    /// woken for it (it sleeps until its earliest deadline).
    fn schedule(&mut self, slot: u32, kind: Kind, at: Option<Instant>) -> bool {
        let entry = &mut self.slots[slot as usize];
        *entry.deadline(kind) = at;
        let Some(at) = at else { return false };
        self.heap.push(Reverse(Due {
            at,
            slot,
            generation: entry.generation,
            kind,
        }));
        let sooner = self.wakes_at.is_none_or(|wakes_at| at < wakes_at);
        if sooner {
            self.wakes_at = Some(at);
        }
        sooner
    }
}

/// The process's one keeper of session deadlines, and its thread.
struct Keeper {
    state: Mutex<State>,
    thread: Thread,
}

static KEEPER: LazyLock<Keeper> = LazyLock::new(|| {
    // The thread waits for this initialisation to finish before it runs.
    let thread = std::thread::Builder::new()
        .name("wsproto-deadlines".into())
        .spawn(|| KEEPER.run())
        .expect("spawn the session deadline thread");
    Keeper {
        state: Mutex::new(State::default()),
        thread: thread.thread().clone(),
    }
});

impl Keeper {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every change under this lock is a single step: a panic elsewhere
        // cannot leave it half done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let mut due = Vec::new();
        loop {
            let mut state = self.state();
            let now = Instant::now();
            while state.heap.peek().is_some_and(|next| next.0.at <= now) {
                let Some(Reverse(next)) = state.heap.pop() else {
                    break;
                };
                let slot = &mut state.slots[next.slot as usize];
                if !slot.is_current(&next) {
                    continue;
                }
                *slot.deadline(next.kind) = None;
                if let Some(queue) = &slot.queue {
                    due.push((queue.clone(), next.kind));
                }
            }
            // Stale deadlines (replaced, or of closed sessions) wait in the
            // heap until they come. A session has at most three current
            // ones, so past four per session, at least one per session is
            // stale: drop them (a sweep per that many closes or changes).
            if state.heap.len() > 4 * state.live + 64 {
                let State { heap, slots, .. } = &mut *state;
                heap.retain(|Reverse(due)| slots[due.slot as usize].is_current(due));
            }
            let next = state.heap.peek().map(|next| next.0.at);
            state.wakes_at = next;
            drop(state);
            // Outside the lock: waking a session may take a while.
            for (queue, kind) in due.drain(..) {
                match kind {
                    Kind::Heartbeat => queue.request_heartbeat(),
                    Kind::Expiry => {
                        queue.close(CloseReason::TOKEN_EXPIRED);
                    }
                    Kind::Drain => {
                        queue.close(CloseReason::going_away_after(random() as usize));
                    }
                }
            }
            match next {
                Some(at) => std::thread::park_timeout(at.saturating_duration_since(Instant::now())),
                None => std::thread::park(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::queue::Batch;

    async fn next_batch(queue: &SessionQueue) -> Batch {
        let mut out = Vec::new();
        let batch = std::future::poll_fn(|cx| queue.poll_batch(cx, &mut out, 16));
        tokio::time::timeout(Duration::from_secs(5), batch)
            .await
            .expect("the deadline came")
    }

    #[tokio::test]
    async fn a_heartbeat_comes_through_the_queue_when_due() {
        let queue = SessionQueue::new(8);
        let deadlines = Deadlines::register(queue.clone(), Drain::new());
        let start = Instant::now();
        deadlines.heartbeat_at(start + Duration::from_millis(30));
        assert_eq!(next_batch(&queue).await, Batch::Heartbeat);
        assert!(start.elapsed() >= Duration::from_millis(30), "not early");
        // Once only.
        let mut out = Vec::new();
        let again = std::future::poll_fn(|cx| queue.poll_batch(cx, &mut out, 16));
        assert!(tokio::time::timeout(Duration::from_millis(100), again)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn an_earlier_deadline_wakes_the_thread_and_a_replaced_one_is_skipped() {
        let queue = SessionQueue::new(8);
        let deadlines = Deadlines::register(queue.clone(), Drain::new());
        // The thread goes to sleep until an hour from now...
        deadlines.heartbeat_at(Instant::now() + Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(20));
        // ...and this, which replaces it, comes within the test's timeout.
        deadlines.heartbeat_at(Instant::now() + Duration::from_millis(10));
        assert_eq!(next_batch(&queue).await, Batch::Heartbeat);
    }

    #[tokio::test]
    async fn an_expiry_closes_the_session_and_a_dropped_one_never_comes() {
        let expiring = SessionQueue::new(8);
        let deadlines = Deadlines::register(expiring.clone(), Drain::new());
        deadlines.expire_at(Some(Instant::now() + Duration::from_millis(20)));
        assert_eq!(
            next_batch(&expiring).await,
            Batch::Close(CloseReason::TOKEN_EXPIRED)
        );

        let forgotten = SessionQueue::new(8);
        let dropped = Deadlines::register(forgotten.clone(), Drain::new());
        dropped.expire_at(Some(Instant::now() + Duration::from_millis(20)));
        dropped.heartbeat_at(Instant::now() + Duration::from_millis(20));
        drop(dropped);
        // A new session may take the slot; the old deadlines do not reach it.
        let reused = SessionQueue::new(8);
        let _taker = Deadlines::register(reused.clone(), Drain::new());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(forgotten.close_reason(), None);
        assert_eq!(reused.close_reason(), None);
        assert!(!reused.heartbeat_requested());
    }

    #[tokio::test]
    async fn an_expiry_set_to_never_is_cancelled() {
        let queue = SessionQueue::new(8);
        let deadlines = Deadlines::register(queue.clone(), Drain::new());
        deadlines.expire_at(Some(Instant::now() + Duration::from_millis(20)));
        deadlines.expire_at(None);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(queue.close_reason(), None);
    }

    #[tokio::test]
    async fn a_drain_closes_its_servers_sessions_within_the_spread_and_no_others() {
        let drain = Drain::new();
        let before = SessionQueue::new(8);
        let _before = Deadlines::register(before.clone(), drain);
        let other = SessionQueue::new(8);
        let _other = Deadlines::register(other.clone(), Drain::new());
        let start = Instant::now();
        drain.begin(Duration::from_millis(200));
        // Registered once the drain has begun: closed within what is left.
        let after = SessionQueue::new(8);
        let _after = Deadlines::register(after.clone(), drain);
        for queue in [&before, &after] {
            let batch = next_batch(queue).await;
            assert!(
                matches!(batch, Batch::Close(reason) if reason.code == 1001),
                "{batch:?}"
            );
        }
        assert!(start.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(other.close_reason(), None, "another server's session");
    }

    #[test]
    fn deadlines_of_closed_sessions_do_not_pile_up() {
        let later = Instant::now() + Duration::from_secs(3600);
        for _ in 0..2_000 {
            let deadlines = Deadlines::register(SessionQueue::new(8), Drain::new());
            deadlines.heartbeat_at(later);
            deadlines.expire_at(Some(later));
        }
        // Wakes the thread, which sweeps the heap before it sleeps again.
        let queue = SessionQueue::new(8);
        let deadlines = Deadlines::register(queue.clone(), Drain::new());
        deadlines.heartbeat_at(Instant::now());
        let start = Instant::now();
        while !queue.heartbeat_requested() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let state = KEEPER.state();
        // Other tests' sessions share the heap: a generous bound.
        assert!(
            state.heap.len() <= 4 * state.live + 64 + 100,
            "{} deadlines for {} sessions",
            state.heap.len(),
            state.live
        );
    }
}
