//! A one-time event, such as "shutting down" or "this session is closing",
//! that tasks wait for alongside their real work.
//!
//! A session's loops wait on several such events in every `select!`, so
//! waiting is on the hot path: a `CancellationToken` takes its node's lock
//! and its waiter list's lock on every poll, and the server-wide shutdown
//! token's locks are shared by every session on every core. A [`Fired`]
//! future takes a lock once, to register, and afterwards costs an atomic
//! load per poll until the event happens.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Waker},
};

use tokio::sync::{futures::Notified, Notify};

/// A one-time event; clones share it.
#[derive(Clone, Default)]
pub struct Signal {
    inner: Arc<Event>,
}

impl Signal {
    /// An event that has not happened yet.
    pub fn new() -> Signal {
        Signal::default()
    }
}

/// A handle on the shared event: [`Event::fire`], [`Event::fired`] and
/// [`Event::is_fired`] act on it.
impl std::ops::Deref for Signal {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.inner
    }
}

/// A one-time event kept inside its owner, for an owner already shared
/// (a session's queue): a session polls its queue's "closing" on every
/// wait, and an event in its own allocation is one more cache miss per
/// poll once thousands of sessions take turns.
#[derive(Default)]
pub struct Event {
    fired: AtomicBool,
    notify: Notify,
}

impl Event {
    /// Makes the event happen: every [`Fired`] completes, now and later.
    /// Returns whether this call did it (false when it had happened already).
    pub fn fire(&self) -> bool {
        let first = !self.fired.swap(true, Ordering::AcqRel);
        if first {
            self.notify.notify_waiters();
        }
        first
    }

    /// Whether the event has happened.
    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Completes once the event has happened.
    pub fn fired(&self) -> Fired<'_> {
        Fired {
            // Made before the flag is first read: `notify_waiters` reaches
            // a `Notified` from the moment it exists, so an event between
            // the read and the registration is not missed.
            notified: self.notify.notified(),
            fired: &self.fired,
            registered: None,
        }
    }
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signal")
            .field("fired", &self.is_fired())
            .finish()
    }
}

pin_project_lite::pin_project! {
    /// Completes once its [`Signal`] has fired.
    #[must_use = "futures do nothing unless polled"]
    pub struct Fired<'a> {
        #[pin]
        notified: Notified<'a>,
        fired: &'a AtomicBool,
        // The waker the `Notified` holds: while it is the one polling, the
        // registration stands and the lock is not taken again.
        registered: Option<Waker>,
    }
}

impl Future for Fired<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if let Some(waker) = this.registered {
            if waker.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        if this.notified.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_fired_and_later_waiters_complete_at_once() {
        let signal = Signal::new();
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.fired().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert!(signal.fire());
        assert!(!signal.fire(), "only the first fire counts");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert!(signal.is_fired());
        signal.fired().await;
    }

    #[tokio::test]
    async fn a_waiter_polled_many_times_is_still_woken() {
        let signal = Signal::new();
        let fired = signal.fired();
        tokio::pin!(fired);
        for _ in 0..3 {
            assert!(futures_util::poll!(fired.as_mut()).is_pending());
        }
        let firing = signal.clone();
        tokio::spawn(async move { firing.fire() });
        tokio::time::timeout(Duration::from_secs(5), fired)
            .await
            .expect("woken");
    }

    #[tokio::test]
    async fn fired_between_creation_and_first_poll_is_seen() {
        let signal = Signal::new();
        let fired = signal.fired();
        signal.fire();
        tokio::time::timeout(Duration::from_secs(5), fired)
            .await
            .expect("completes");
    }
}
