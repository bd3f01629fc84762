//! The rate limit on the frames one session may send: a token bucket, and
//! the policy for a client that keeps sending over it.

use std::time::{Duration, Instant};

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
    #[cfg(test)]
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }
}

/// What to do with one frame a session sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit: handle it.
    Allow,
    /// Over the limit: do not handle it; answer with RATE_LIMITED only if
    /// `reply`, so that a flood does not buy an error frame per frame.
    Refuse { reply: bool },
    /// Over the limit for too long: close the session
    /// ([`CloseReason::RATE_LIMITED`](crate::CloseReason::RATE_LIMITED)).
    Close,
}

/// Refused frames answered with an error frame per [`REPLY_WINDOW`]; the
/// others are dropped silently.
pub const REPLIES_PER_WINDOW: u32 = 10;
/// See [`REPLIES_PER_WINDOW`].
pub const REPLY_WINDOW: Duration = Duration::from_secs(1);
/// A client that sends nothing over the limit for this long is forgiven:
/// its count of refusals starts again from zero.
pub const QUIET_PERIOD: Duration = Duration::from_secs(1);

/// One session's rate limit: a [`TokenBucket`] of `rate` frames a second
/// and bursts of `burst`, and what happens past it.
///
/// A client is closed once more than `burst` of its frames have been
/// refused with no [`QUIET_PERIOD`] between two refusals. Frames that get
/// through in between do not reset the count: a flooder gets a frame
/// through each time a token comes back, and must not be kept forever by
/// that. At the default 100 frames/s and bursts of 200, a client sending
/// 3,000 frames a second is closed within a fifth of a second; one sending
/// 110 a second within about 40 seconds (20 to use up its burst, 20 more of
/// refusals at 10 a second).
#[derive(Debug, Clone)]
pub struct RateLimit {
    bucket: TokenBucket,
    max_refusals: u32,
    refusals: u32,
    last_refusal: Option<Instant>,
    window_start: Option<Instant>,
    replies_in_window: u32,
}

impl RateLimit {
    /// `rate` frames a second (0: unlimited) with bursts of `burst`.
    pub fn new(rate: f64, burst: u32) -> RateLimit {
        RateLimit {
            bucket: TokenBucket::new(rate, burst),
            max_refusals: burst.max(1),
            refusals: 0,
            last_refusal: None,
            window_start: None,
            replies_in_window: 0,
        }
    }

    /// The verdict on a frame received now (without reading the clock when
    /// there is no limit: this runs for every frame).
    pub fn check(&mut self) -> Verdict {
        match self.bucket.rate <= 0.0 {
            true => Verdict::Allow,
            false => self.check_at(Instant::now()),
        }
    }

    /// The verdict on a frame received at `now`.
    pub fn check_at(&mut self, now: Instant) -> Verdict {
        if self.bucket.take_at(now) {
            return Verdict::Allow;
        }
        let since = |at: Option<Instant>| at.map(|at| now.saturating_duration_since(at));
        if since(self.last_refusal).is_some_and(|quiet| quiet >= QUIET_PERIOD) {
            self.refusals = 0;
        }
        self.last_refusal = Some(now);
        self.refusals = self.refusals.saturating_add(1);
        if self.refusals > self.max_refusals {
            return Verdict::Close;
        }
        if since(self.window_start).is_none_or(|age| age >= REPLY_WINDOW) {
            self.window_start = Some(now);
            self.replies_in_window = 0;
        }
        let reply = self.replies_in_window < REPLIES_PER_WINDOW;
        self.replies_in_window += u32::from(reply);
        Verdict::Refuse { reply }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooder_is_closed_although_tokens_keep_letting_frames_through() {
        let start = Instant::now();
        let mut limit = RateLimit::new(100.0, 20);
        limit.bucket.last = start;
        let (mut allowed, mut replies, mut silent) = (0, 0, 0);
        // One frame a millisecond: one in ten gets a token.
        let closed_at = (0..10_000u64).find(|ms| {
            match limit.check_at(start + Duration::from_millis(*ms)) {
                Verdict::Allow => allowed += 1,
                Verdict::Refuse { reply: true } => replies += 1,
                Verdict::Refuse { reply: false } => silent += 1,
                Verdict::Close => return true,
            }
            false
        });
        assert!(closed_at.is_some(), "never closed");
        assert!(allowed > 20, "the burst and the refills got through");
        assert_eq!(
            replies, REPLIES_PER_WINDOW,
            "only the first refusals are answered"
        );
        assert_eq!(replies + silent, 20);
    }

    #[test]
    fn a_quiet_second_forgives_and_replies_come_back_each_window() {
        let start = Instant::now();
        let mut limit = RateLimit::new(1.0, 3);
        limit.bucket.last = start;
        let at = |ms| start + Duration::from_millis(ms);
        assert!((0..3).all(|_| limit.check_at(at(0)) == Verdict::Allow));
        for _ in 0..3 {
            assert_eq!(limit.check_at(at(1)), Verdict::Refuse { reply: true });
        }
        // Quiet for over a second (and a token back): allowed, then the
        // count of refusals starts again.
        assert_eq!(limit.check_at(at(1500)), Verdict::Allow);
        for _ in 0..3 {
            assert_eq!(limit.check_at(at(1600)), Verdict::Refuse { reply: true });
        }
        assert_eq!(limit.check_at(at(1700)), Verdict::Close);
        let mut unlimited = RateLimit::new(0.0, 1);
        assert!((0..1000).all(|_| unlimited.check() == Verdict::Allow));
    }

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
