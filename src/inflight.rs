//! Critical deliveries a device has not acknowledged yet, per session.
//!
//! A session connected with `?device=` must acknowledge (opcode 21) what it
//! gets on critical streams: topics whose policy is `critical` and its
//! user's stream of critical pushes. Until it does, each such delivery
//! stays here; one still unacknowledged after the ack timeout is sent
//! again, marked `redelivered`, then again after twice as long, and so on
//! up to [`MAX_BACKOFF`] timeouts. The window is bounded: a device that
//! lets more than `window` deliveries go unacknowledged is closed (4003)
//! and recovers from its acknowledged position when it reconnects, so the
//! server never holds an unbounded backlog for a device that stopped
//! acknowledging.
//!
//! Redelivery is for the application, not the network: over one WebSocket
//! nothing is lost in transit, but an app may take a frame and die, or
//! drop it on the floor, before it has processed it. The client libraries
//! drop a redelivered position they have already processed.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use bytes::Bytes;
use tokio::time::Instant;

use crate::broker::Position;

/// A redelivery waits at most this many ack timeouts after the previous
/// one (1, 2, 4, 8, 16, 16, ...).
pub const MAX_BACKOFF: u32 = 16;

/// The protobuf field `redelivered = 11` set to true (tag 11, varint):
/// appended to an encoded DELIVERY, it marks the message as redelivered
/// (protobuf merges repeated occurrences, so the last value wins).
const REDELIVERED: [u8; 2] = [11 << 3, 1];

/// The device let more deliveries go unacknowledged than its window holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than {0} deliveries unacknowledged")]
pub struct WindowFull(pub usize);

/// How a session's unacknowledged deliveries are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckSettings {
    /// Most deliveries unacknowledged at once (`--ack-window`).
    pub window: usize,
    /// How long before the first redelivery (`--ack-timeout`).
    pub timeout: Duration,
}

/// One session's unacknowledged critical deliveries.
#[derive(Debug)]
pub struct Inflight {
    settings: AckSettings,
    /// By stream key, oldest first (positions increase within an epoch).
    streams: HashMap<Box<str>, VecDeque<Pending>>,
    len: usize,
}

#[derive(Debug)]
struct Pending {
    position: Position,
    /// The DELIVERY frame as first sent.
    frame: Bytes,
    due: Instant,
    /// Times redelivered so far.
    attempts: u32,
}

impl Inflight {
    /// Nothing in flight yet.
    pub fn new(settings: AckSettings) -> Inflight {
        Inflight {
            settings,
            streams: HashMap::new(),
            len: 0,
        }
    }

    /// Deliveries waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether a replay from history may put one more delivery in flight:
    /// replays take at most half the window, so live deliveries still find
    /// room after a long one.
    pub fn has_replay_room(&self) -> bool {
        self.len < (self.settings.window / 2).max(1)
    }

    /// True when every delivery was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records that `frame`, at `position` of `stream`, was queued for the
    /// device at `now`. A position at or before the stream's latest in
    /// flight (same epoch) is not recorded again: positions are queued in
    /// order, so it is in flight already or was acknowledged.
    ///
    /// # Errors
    /// [`WindowFull`] when the window is full; nothing is recorded.
    pub fn track(
        &mut self,
        stream: &str,
        position: &Position,
        frame: &Bytes,
        now: Instant,
    ) -> Result<(), WindowFull> {
        let pending = self.streams.entry(stream.into()).or_default();
        let known = pending
            .back()
            .is_some_and(|p| p.position.epoch == position.epoch && position.seq <= p.position.seq);
        if known {
            return Ok(());
        }
        if self.len >= self.settings.window {
            if pending.is_empty() {
                self.streams.remove(stream);
            }
            return Err(WindowFull(self.settings.window));
        }
        pending.push_back(Pending {
            position: position.clone(),
            frame: frame.clone(),
            due: now + self.settings.timeout,
            attempts: 0,
        });
        self.len += 1;
        Ok(())
    }

    /// The device processed `stream` up to `position`: forgets what it
    /// covers (everything of an older epoch, too: that run of the stream
    /// is over). Returns how many deliveries that settled.
    pub fn acknowledge(&mut self, stream: &str, position: &Position) -> usize {
        let Some(pending) = self.streams.get_mut(stream) else {
            return 0;
        };
        let before = pending.len();
        pending.retain(|p| p.position.epoch == position.epoch && p.position.seq > position.seq);
        let settled = before - pending.len();
        if pending.is_empty() {
            self.streams.remove(stream);
        }
        self.len -= settled;
        settled
    }

    /// Forgets `stream` (the subscription ended: nothing of it is owed).
    pub fn forget(&mut self, stream: &str) {
        if let Some(pending) = self.streams.remove(stream) {
            self.len -= pending.len();
        }
    }

    /// When the next redelivery is due, if any delivery is in flight.
    pub fn next_due(&self) -> Option<Instant> {
        self.streams.values().flatten().map(|p| p.due).min()
    }

    /// The deliveries due at `now`, marked redelivered, oldest first per
    /// stream; each is due again after twice its last wait (at most
    /// [`MAX_BACKOFF`] timeouts).
    pub fn take_due(&mut self, now: Instant) -> Vec<Bytes> {
        let timeout = self.settings.timeout;
        let mut due = Vec::new();
        for pending in self.streams.values_mut().flatten() {
            if pending.due > now {
                continue;
            }
            pending.attempts += 1;
            let factor = 1u32
                .checked_shl(pending.attempts)
                .unwrap_or(MAX_BACKOFF)
                .min(MAX_BACKOFF);
            pending.due = now + timeout * factor;
            let mut frame = Vec::with_capacity(pending.frame.len() + REDELIVERED.len());
            frame.extend_from_slice(&pending.frame);
            frame.extend_from_slice(&REDELIVERED);
            due.push(Bytes::from(frame));
        }
        due
    }

    /// Puts off every delivery due by `now` until `now + timeout`, without
    /// counting it as a redelivery: the device is still being sent older
    /// frames, so its silence says nothing yet.
    pub fn postpone_due(&mut self, now: Instant) {
        let later = now + self.settings.timeout;
        for pending in self.streams.values_mut().flatten() {
            if pending.due <= now {
                pending.due = later;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use wsproto_proto::v1;

    use super::*;
    use crate::{frame::Frame, opcode};

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn inflight(window: usize) -> Inflight {
        Inflight::new(AckSettings {
            window,
            timeout: TIMEOUT,
        })
    }

    fn delivery(seq: u64) -> Bytes {
        let delivery = v1::Delivery {
            topic: "alarm.fire".into(),
            seq,
            epoch: "e1".into(),
            ..Default::default()
        };
        Frame::new(opcode::DELIVERY, delivery.encode_to_vec()).encode()
    }

    fn at(seq: u64) -> Position {
        Position::new("e1", seq)
    }

    #[test]
    fn an_acknowledgement_settles_everything_up_to_its_position() {
        let now = Instant::now();
        let mut inflight = inflight(8);
        for seq in 1..=4 {
            inflight
                .track("t:a", &at(seq), &delivery(seq), now)
                .unwrap();
        }
        inflight.track("t:a", &at(4), &delivery(4), now).unwrap();
        assert_eq!(inflight.len(), 4, "a position is tracked once");
        assert_eq!(inflight.acknowledge("t:a", &at(2)), 2);
        assert_eq!(inflight.acknowledge("t:other", &at(9)), 0);
        assert_eq!(inflight.len(), 2);
        assert_eq!(
            inflight.acknowledge("t:a", &Position::new("e2", 1)),
            2,
            "a newer epoch ends the old one"
        );
        assert!(inflight.is_empty());
        assert_eq!(inflight.next_due(), None);
    }

    #[test]
    fn past_the_window_nothing_more_is_tracked() {
        let now = Instant::now();
        let mut inflight = inflight(2);
        inflight.track("t:a", &at(1), &delivery(1), now).unwrap();
        inflight.track("u:ann", &at(1), &delivery(1), now).unwrap();
        assert_eq!(
            inflight.track("t:b", &at(1), &delivery(1), now),
            Err(WindowFull(2))
        );
        assert_eq!(inflight.len(), 2);
        inflight.forget("u:ann");
        inflight.track("t:b", &at(1), &delivery(1), now).unwrap();
    }

    #[test]
    fn due_deliveries_come_back_marked_with_a_growing_wait() {
        let start = Instant::now();
        let mut inflight = inflight(8);
        inflight.track("t:a", &at(1), &delivery(1), start).unwrap();
        assert!(inflight.take_due(start + TIMEOUT / 2).is_empty());
        assert_eq!(inflight.next_due(), Some(start + TIMEOUT));

        let mut now = start + TIMEOUT;
        let again = inflight.take_due(now);
        assert_eq!(again.len(), 1);
        let frame = Frame::decode(again[0].clone()).unwrap();
        let redelivered: v1::Delivery = frame.message().unwrap();
        assert!(redelivered.redelivered);
        assert_eq!(
            (redelivered.seq, redelivered.topic.as_str()),
            (1, "alarm.fire")
        );

        let mut waits = Vec::new();
        for _ in 0..6 {
            let due = inflight.next_due().unwrap();
            waits.push((due - now).as_secs() / TIMEOUT.as_secs());
            now = due;
            assert_eq!(inflight.take_due(now).len(), 1);
        }
        assert_eq!(waits, [2, 4, 8, 16, 16, 16]);
    }

    #[test]
    fn postponing_does_not_count_as_a_redelivery() {
        let start = Instant::now();
        let mut inflight = inflight(8);
        inflight.track("t:a", &at(1), &delivery(1), start).unwrap();
        inflight.postpone_due(start + TIMEOUT);
        assert_eq!(inflight.next_due(), Some(start + TIMEOUT * 2));
        inflight.take_due(start + TIMEOUT * 2);
        assert_eq!(
            inflight.next_due(),
            Some(start + TIMEOUT * 4),
            "the first redelivery waits 2 timeouts"
        );
    }
}
