//! A token bucket for the frames one session may send.

use std::time::Instant;

/// Allows `rate` frames a second on average and bursts of `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `rate` 0 allows everything.
    pub fn new(rate: f64, burst: u32) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token at `now`; false when the bucket is empty.
    pub fn take_at(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes one token now.
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bursts_then_the_sustained_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 5);
        bucket.last = start;
        assert!((0..5).all(|_| bucket.take_at(start)), "a full burst");
        assert!(!bucket.take_at(start));
        // 10 a second: one more every 100 ms.
        assert!(bucket.take_at(start + Duration::from_millis(100)));
        assert!(!bucket.take_at(start + Duration::from_millis(150)));
        // Idle time refills up to the burst, not beyond.
        let later = start + Duration::from_secs(60);
        assert!((0..5).all(|_| bucket.take_at(later)));
        assert!(!bucket.take_at(later));
        assert!(TokenBucket::new(0.0, 1).take(), "rate 0 is unlimited");
    }
}
