//! Counts of every limit that trips and of what the node holds, for
//! operators: a JSON snapshot in `/healthz`, Prometheus text at `/metrics`
//! (encoded by `prometheus-client`).

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;

/// One counter per way a limit can refuse or end something.
#[derive(Debug, Default)]
pub struct Counters {
    /// Upgrades refused: origin not allowed (403).
    pub refused_origin: Counter,
    /// Upgrades refused: missing or invalid credentials (401).
    pub refused_auth: Counter,
    /// Upgrades refused: per-address cap (429).
    pub refused_per_address: Counter,
    /// Upgrades refused: connection cap or shutdown (503).
    pub refused_capacity: Counter,
    /// Times the accept loop waited because --max-handshakes connections
    /// were still plain HTTP.
    pub handshakes_full: Counter,
    /// Connections closed at once: their address already had
    /// --max-handshakes-per-ip connections not yet upgraded.
    pub refused_handshakes_per_address: Counter,
    /// Refusals answered without waiting (best effort), because refusals
    /// in flight were at their bound.
    pub refusals_answered_at_once: Counter,
    /// HTTP connections closed for not upgrading in time (slowloris, idle).
    pub closed_handshake_timeout: Counter,
    /// Frames refused with RATE_LIMITED.
    pub rate_limited_frames: Counter,
    /// Requests refused with LIMIT_EXCEEDED (subscriptions, rooms, friends).
    pub limit_exceeded: Counter,
    /// Sessions closed for flooding (4002 rate limit exceeded).
    pub closed_rate_limit: Counter,
    /// Sessions closed as slow consumers (1008 send queue full, or a write
    /// slower than --write-timeout).
    pub closed_slow_consumer: Counter,
    /// Sessions closed for an oversized message (1009).
    pub closed_message_too_big: Counter,
    /// Sessions closed for silence (4000).
    pub closed_heartbeat: Counter,
    /// Frames dropped or conflated away by slow-consumer policies.
    pub dropped_frames: Counter,
    /// Critical deliveries sent again for want of an acknowledgement.
    pub redelivered: Counter,
    /// Sessions closed with 4003: too many deliveries unacknowledged.
    pub closed_ack_window: Counter,
}

/// A point-in-time copy of the node's counters: what `/healthz` reports
/// under `limits`, and what tests assert on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    /// Upgrades refused: origin not allowed (403).
    pub refused_origin: u64,
    /// Upgrades refused: missing or invalid credentials (401).
    pub refused_auth: u64,
    /// Upgrades refused: per-address cap (429).
    pub refused_per_address: u64,
    /// Upgrades refused: connection cap or shutdown (503).
    pub refused_capacity: u64,
    /// Times the accept loop waited because --max-handshakes connections
    /// were still plain HTTP.
    pub handshakes_full: u64,
    /// Connections closed at once: their address already had
    /// --max-handshakes-per-ip connections not yet upgraded.
    pub refused_handshakes_per_address: u64,
    /// Refusals answered without waiting (best effort), because refusals
    /// in flight were at their bound.
    pub refusals_answered_at_once: u64,
    /// HTTP connections closed for not upgrading in time (slowloris, idle).
    pub closed_handshake_timeout: u64,
    /// Frames refused with RATE_LIMITED.
    pub rate_limited_frames: u64,
    /// Requests refused with LIMIT_EXCEEDED (subscriptions, rooms, friends).
    pub limit_exceeded: u64,
    /// Sessions closed for flooding (4002 rate limit exceeded).
    pub closed_rate_limit: u64,
    /// Sessions closed as slow consumers (1008 send queue full, or a write
    /// slower than --write-timeout).
    pub closed_slow_consumer: u64,
    /// Sessions closed for an oversized message (1009).
    pub closed_message_too_big: u64,
    /// Sessions closed for silence (4000).
    pub closed_heartbeat: u64,
    /// Frames dropped or conflated away by slow-consumer policies.
    pub dropped_frames: u64,
    /// Critical deliveries sent again for want of an acknowledgement.
    pub redelivered: u64,
    /// Sessions closed with 4003: too many deliveries unacknowledged.
    pub closed_ack_window: u64,
}

/// What the node holds right now, read when metrics are asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Levels {
    /// Open WebSocket sessions.
    pub sessions: usize,
    /// Connections still plain HTTP (not yet upgraded).
    pub handshakes: usize,
    /// The broker cannot reach the other nodes (local delivery goes on).
    pub broker_degraded: bool,
    /// The broker's own counts: (name, help, value), each a counter.
    pub broker_counts: [(&'static str, &'static str, u64); 5],
}

/// Adds one to a counter.
pub fn bump(counter: &Counter) {
    counter.inc();
}

impl Counters {
    /// Every counter with its Prometheus name (`_total` is appended when
    /// encoded) and help text.
    fn named(&self) -> [(&'static str, &'static str, &Counter); 17] {
        [
            (
                "wsproto_refused_origin",
                "Upgrades refused: origin not allowed (403)",
                &self.refused_origin,
            ),
            (
                "wsproto_refused_auth",
                "Upgrades refused: missing or invalid credentials (401)",
                &self.refused_auth,
            ),
            (
                "wsproto_refused_per_address",
                "Upgrades refused: per-address cap (429)",
                &self.refused_per_address,
            ),
            (
                "wsproto_refused_capacity",
                "Upgrades refused: connection cap or shutdown (503)",
                &self.refused_capacity,
            ),
            (
                "wsproto_handshakes_full",
                "Accepts delayed because --max-handshakes connections were not yet upgraded",
                &self.handshakes_full,
            ),
            (
                "wsproto_refused_handshakes_per_address",
                "Connections closed at once: --max-handshakes-per-ip reached",
                &self.refused_handshakes_per_address,
            ),
            (
                "wsproto_refusals_answered_at_once",
                "Refusals written at once, best effort, because refusals in flight were at their bound",
                &self.refusals_answered_at_once,
            ),
            (
                "wsproto_closed_handshake_timeout",
                "HTTP connections closed for not upgrading within --handshake-timeout",
                &self.closed_handshake_timeout,
            ),
            (
                "wsproto_rate_limited_frames",
                "Frames refused with RATE_LIMITED",
                &self.rate_limited_frames,
            ),
            (
                "wsproto_limit_exceeded",
                "Requests refused with LIMIT_EXCEEDED",
                &self.limit_exceeded,
            ),
            (
                "wsproto_closed_rate_limit",
                "Sessions closed with 4002 for flooding",
                &self.closed_rate_limit,
            ),
            (
                "wsproto_closed_slow_consumer",
                "Sessions closed with 1008 as slow consumers",
                &self.closed_slow_consumer,
            ),
            (
                "wsproto_closed_message_too_big",
                "Sessions closed with 1009 for an oversized message",
                &self.closed_message_too_big,
            ),
            (
                "wsproto_closed_heartbeat",
                "Sessions closed with 4000 for silence",
                &self.closed_heartbeat,
            ),
            (
                "wsproto_dropped_frames",
                "Frames dropped or conflated away by slow-consumer policies",
                &self.dropped_frames,
            ),
            (
                "wsproto_redelivered",
                "Critical deliveries sent again for want of an acknowledgement",
                &self.redelivered,
            ),
            (
                "wsproto_closed_ack_window",
                "Sessions closed with 4003: more deliveries unacknowledged than --ack-window",
                &self.closed_ack_window,
            ),
        ]
    }

    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            refused_origin: self.refused_origin.get(),
            refused_auth: self.refused_auth.get(),
            refused_per_address: self.refused_per_address.get(),
            refused_capacity: self.refused_capacity.get(),
            handshakes_full: self.handshakes_full.get(),
            refused_handshakes_per_address: self.refused_handshakes_per_address.get(),
            refusals_answered_at_once: self.refusals_answered_at_once.get(),
            closed_handshake_timeout: self.closed_handshake_timeout.get(),
            rate_limited_frames: self.rate_limited_frames.get(),
            limit_exceeded: self.limit_exceeded.get(),
            closed_rate_limit: self.closed_rate_limit.get(),
            closed_slow_consumer: self.closed_slow_consumer.get(),
            closed_message_too_big: self.closed_message_too_big.get(),
            closed_heartbeat: self.closed_heartbeat.get(),
            dropped_frames: self.dropped_frames.get(),
            redelivered: self.redelivered.get(),
            closed_ack_window: self.closed_ack_window.get(),
        }
    }

    /// The counters and `levels` in the Prometheus text exposition format.
    pub fn prometheus(&self, levels: Levels) -> String {
        let mut registry = Registry::default();
        for (name, help, counter) in self.named() {
            // Counters are shared handles: the registry reads the live values.
            registry.register(name, help, counter.clone());
        }
        let gauge = |value: usize| {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            gauge
        };
        registry.register(
            "wsproto_sessions",
            "Open WebSocket sessions",
            gauge(levels.sessions),
        );
        registry.register(
            "wsproto_handshakes",
            "Connections not yet upgraded",
            gauge(levels.handshakes),
        );
        registry.register(
            "wsproto_broker_degraded",
            "1 while the broker cannot reach the other nodes",
            gauge(usize::from(levels.broker_degraded)),
        );
        for (name, help, value) in levels.broker_counts {
            if name.is_empty() {
                continue;
            }
            let counter = Counter::<u64>::default();
            counter.inc_by(value);
            registry.register(name, help, counter);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_every_counter_and_level() {
        let counters = Counters::default();
        bump(&counters.refused_origin);
        bump(&counters.refused_origin);
        let text = counters.prometheus(Levels {
            sessions: 3,
            handshakes: 1,
            ..Levels::default()
        });
        assert!(
            text.contains("# TYPE wsproto_refused_origin counter"),
            "{text}"
        );
        assert!(text.contains("wsproto_refused_origin_total 2"), "{text}");
        assert!(text.contains("wsproto_sessions 3"), "{text}");
        assert!(text.contains("wsproto_handshakes 1"), "{text}");
        assert!(text.contains("wsproto_broker_degraded 0"), "{text}");
        assert_eq!(text.matches("_total ").count(), 17);
        assert!(text.ends_with("# EOF\n"));
    }
}
