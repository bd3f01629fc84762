//! The bounded queue between every producer of a session's frames (its own
//! handlers, other sessions, the server) and the one task that writes to
//! its socket.
//!
//! Producers never wait: a push either succeeds at once or fails, so a slow
//! client can never stall whoever is sending to it. A full queue closes the
//! session as a slow consumer and frees what was pending.

use std::{collections::VecDeque, sync::Arc};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::close::CloseReason;

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The queue was full; the session is now closing as a slow consumer.
    #[error("send queue full; session closed as a slow consumer")]
    Full,
    /// The session is already closing.
    #[error("session is closing")]
    Closed,
}

/// What the writer should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Batch {
    /// Frames were moved into the caller's buffer: write them.
    Frames,
    /// Send this close frame; nothing follows it.
    Close(CloseReason),
}

/// A cheaply cloned handle to one session's send queue.
#[derive(Clone)]
pub struct SessionQueue {
    inner: Arc<Inner>,
}

struct Inner {
    state: std::sync::Mutex<State>,
    wake: Notify,
    /// Cancelled once a close reason is set, for whoever waits on that.
    closing: CancellationToken,
    capacity: usize,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Bytes>,
    close: Option<CloseReason>,
}

impl SessionQueue {
    /// A queue holding at most `capacity` frames (at least one).
    pub fn new(capacity: usize) -> SessionQueue {
        SessionQueue {
            inner: Arc::new(Inner {
                state: std::sync::Mutex::new(State::default()),
                wake: Notify::new(),
                closing: CancellationToken::new(),
                capacity: capacity.max(1),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every mutation is a single push/pop), so poisoning is ignored.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an encoded frame for the writer.
    ///
    /// # Errors
    /// [`PushError::Full`] when the queue was full (the session is then
    /// closed with 1008 and its pending frames dropped), and
    /// [`PushError::Closed`] when the session is already closing.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let mut state = self.state();
        if state.close.is_some() {
            return Err(PushError::Closed);
        }
        if state.frames.len() >= self.inner.capacity {
            state.frames = VecDeque::new();
            state.close = Some(CloseReason::SLOW_CONSUMER);
            drop(state);
            self.inner.wake.notify_one();
            self.inner.closing.cancel();
            return Err(PushError::Full);
        }
        state.frames.push_back(frame);
        drop(state);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Asks the writer to close the session after the frames already queued.
    /// The first reason given wins; returns whether this call set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut state = self.state();
        if state.close.is_some() {
            return false;
        }
        state.close = Some(reason);
        drop(state);
        self.inner.wake.notify_one();
        self.inner.closing.cancel();
        true
    }

    /// The reason the session is closing, once it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.state().close
    }

    /// Completes once the session is closing, whoever closed it.
    pub async fn closing(&self) {
        self.inner.closing.cancelled().await
    }

    /// Frames waiting to be written.
    pub fn len(&self) -> usize {
        self.state().frames.len()
    }

    /// True when no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for work: moves up to `max` pending frames into `out`, or, once
    /// none are left and the queue is closing, returns the close reason.
    /// Only the session's writer calls this.
    pub async fn next_batch(&self, out: &mut Vec<Bytes>, max: usize) -> Batch {
        loop {
            {
                let mut state = self.state();
                if !state.frames.is_empty() {
                    let n = state.frames.len().min(max.max(1));
                    out.extend(state.frames.drain(..n));
                    return Batch::Frames;
                }
                if let Some(reason) = state.close {
                    return Batch::Close(reason);
                }
            }
            // notify_one stores a permit when nobody waits, so a push between
            // the check above and this await is not missed.
            self.inner.wake.notified().await;
        }
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
}
