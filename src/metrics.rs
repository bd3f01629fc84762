//! Counts of every limit that trips, for operators (reported by `/healthz`).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// One counter per way a limit can refuse or end something.
#[derive(Debug, Default)]
pub struct Counters {
    /// Upgrades refused: origin not allowed (403).
    pub refused_origin: AtomicU64,
    /// Upgrades refused: missing or invalid credentials (401).
    pub refused_auth: AtomicU64,
    /// Upgrades refused: per-address cap (429).
    pub refused_per_address: AtomicU64,
    /// Upgrades refused: connection cap or shutdown (503).
    pub refused_capacity: AtomicU64,
    /// HTTP connections closed for not upgrading in time (slowloris, idle).
    pub closed_handshake_timeout: AtomicU64,
    /// Frames refused with RATE_LIMITED.
    pub rate_limited_frames: AtomicU64,
    /// Requests refused with LIMIT_EXCEEDED (subscriptions, rooms, friends).
    pub limit_exceeded: AtomicU64,
    /// Sessions closed for flooding (1008 rate limit exceeded).
    pub closed_rate_limit: AtomicU64,
    /// Sessions closed as slow consumers (1008 send queue full).
    pub closed_slow_consumer: AtomicU64,
    /// Sessions closed for an oversized message (1009).
    pub closed_message_too_big: AtomicU64,
    /// Sessions closed for silence (4000).
    pub closed_heartbeat: AtomicU64,
    /// Frames dropped or conflated away by slow-consumer policies.
    pub dropped_frames: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    pub refused_origin: u64,
    pub refused_auth: u64,
    pub refused_per_address: u64,
    pub refused_capacity: u64,
    pub closed_handshake_timeout: u64,
    pub rate_limited_frames: u64,
    pub limit_exceeded: u64,
    pub closed_rate_limit: u64,
    pub closed_slow_consumer: u64,
    pub closed_message_too_big: u64,
    pub closed_heartbeat: u64,
    pub dropped_frames: u64,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            refused_origin: get(&self.refused_origin),
            refused_auth: get(&self.refused_auth),
            refused_per_address: get(&self.refused_per_address),
            refused_capacity: get(&self.refused_capacity),
            closed_handshake_timeout: get(&self.closed_handshake_timeout),
            rate_limited_frames: get(&self.rate_limited_frames),
            limit_exceeded: get(&self.limit_exceeded),
            closed_rate_limit: get(&self.closed_rate_limit),
            closed_slow_consumer: get(&self.closed_slow_consumer),
            closed_message_too_big: get(&self.closed_message_too_big),
            closed_heartbeat: get(&self.closed_heartbeat),
            dropped_frames: get(&self.dropped_frames),
        }
    }
}
