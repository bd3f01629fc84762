//! Reconnect delays: exponential back-off with full jitter.
//!
//! When a server restarts, every client reconnects at once. With a fixed
//! or merely exponential delay they keep arriving together, and each wave
//! meets the same limits; with *full jitter* each delay is uniform in
//! `[0, min(cap, base · 2^attempt)]`, which spreads a wave over the whole
//! window (the scheme AWS measured as finishing soonest with the least
//! work). The web client (`web/wsproto.js`) uses the same scheme.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    time::Duration,
};

/// Delays between attempts to reconnect: full jitter over a window that
/// doubles per attempt up to a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    /// xorshift64* state; never zero.
    state: u64,
}

impl Default for Backoff {
    /// A window of 100 ms doubling up to 10 s.
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    /// A first window of `base`, doubling per attempt up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        // Seeded per instance from the standard library's random hash keys,
        // so clients started together do not share a sequence.
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_usize(&hasher as *const _ as usize);
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
            state: hasher.finish() | 1,
        }
    }

    /// The delay before the next attempt, uniform in `[0, window]`; each
    /// call doubles the window (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let window = self.window();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        match nanos.checked_add(1) {
            Some(bound) => Duration::from_nanos(self.next_u64() % bound),
            None => Duration::from_nanos(self.next_u64()),
        }
    }

    /// The current window: `min(cap, base · 2^attempt)`.
    pub fn window(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Attempts since the last [`reset`](Backoff::reset).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// A number uniform in `[0, 1)` from the same generator (for jitter
    /// elsewhere, e.g. when a test device drops its connection).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_spread_over_a_window_that_doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let windows: Vec<u64> = (0..6)
            .map(|_| {
                let window = backoff.window();
                assert!(backoff.next_delay() <= window);
                window.as_millis() as u64
            })
            .collect();
        assert_eq!(windows, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.attempt(), 6);
        // Full jitter: delays cover the whole window, short ones included.
        let delays: Vec<Duration> = (0..1000).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(900)));
        backoff.reset();
        assert_eq!(backoff.window(), Duration::from_millis(100));
        let mut huge = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
        for _ in 0..100 {
            huge.next_delay();
        }
    }

    #[test]
    fn two_clients_do_not_share_a_sequence() {
        let (mut a, mut b) = (Backoff::default(), Backoff::default());
        let a: Vec<_> = (0..8).map(|_| a.next_delay()).collect();
        let b: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_ne!(a, b);
    }
}
