//! When a failed source runs again: exponential backoff with full jitter.
//!
//! The n-th delay in a row (n counted from 0) is drawn uniformly from
//! `[0, min(cap, base * 2^n)]` ("full jitter", as in the AWS architecture blog's
//! *Exponential Backoff And Jitter*): many agents that lost the same database at
//! the same moment do not all come back at the same moments, and the expected
//! wait is half the ceiling rather than the whole. [`Backoff::reset`] starts the
//! sequence over once a restarted source is healthy again.
//!
//! Every source is restarted by the same [`crate::supervise`] loop with this
//! backoff; no source keeps a retry loop of its own.

use std::time::Duration;

use rand::Rng;

/// An exponential backoff with full jitter; see the module doc.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// Delays handed out since the last reset.
    attempt: u32,
}

impl Backoff {
    /// Delays start below `base` and their ceiling doubles up to `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The longest the next delay can be: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        // 2^31 times any base above a nanosecond is past every sensible cap;
        // saturating keeps huge attempt counts from overflowing.
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, uniformly random in `[0, ceiling()]`.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    /// [`Self::next_delay`] drawing from `rng` (tests pass a seeded one).
    pub fn next_with(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over at `base`: the source was healthy again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rand::SeedableRng;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_ceiling_doubles_from_base_up_to_the_cap() {
        let mut b = Backoff::new(SECOND, Duration::from_secs(30));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_secs());
            b.next_with(&mut rng);
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 30, 30, 30]);
        b.reset();
        assert_eq!(b.ceiling(), SECOND);
        assert_eq!(b.attempts(), 0);
    }

    #[test]
    fn every_delay_lies_between_zero_and_its_ceiling() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (base_ms, cap_ms) in [(1, 10), (200, 30_000), (1000, 30_000), (700, 700)] {
            let mut b = Backoff::new(
                Duration::from_millis(base_ms),
                Duration::from_millis(cap_ms),
            );
            for n in 0..40u32 {
                let ceiling = Duration::from_millis(
                    base_ms
                        .saturating_mul(1u64.checked_shl(n).unwrap_or(u64::MAX))
                        .min(cap_ms),
                );
                assert_eq!(b.ceiling(), ceiling, "attempt {n}");
                let d = b.next_with(&mut rng);
                assert!(d <= ceiling, "attempt {n}: {d:?} > {ceiling:?}");
            }
        }
    }

    /// Full jitter, not "equal jitter" (`[ceiling/2, ceiling]`): the lower half of
    /// the range is drawn as often as the upper one, zero included.
    #[test]
    fn delays_fill_the_whole_range_from_zero() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut low = 0;
        let mut smallest = Duration::MAX;
        const DRAWS: u32 = 2000;
        for _ in 0..DRAWS {
            // Each draw at the cap's ceiling: the sixth attempt of 1 s … 30 s.
            let mut b = Backoff::new(SECOND, Duration::from_secs(30));
            for _ in 0..6 {
                b.next_with(&mut rng);
            }
            let d = b.next_with(&mut rng);
            low += u32::from(d < Duration::from_secs(15));
            smallest = smallest.min(d);
        }
        assert!(
            (DRAWS * 4 / 10..=DRAWS * 6 / 10).contains(&low),
            "{low} of {DRAWS} below half the ceiling"
        );
        assert!(smallest < Duration::from_millis(200), "{smallest:?}");
    }

    #[test]
    fn huge_attempt_counts_stay_at_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        b.attempt = u32::MAX;
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        let d = b.next_delay();
        assert!(d <= Duration::from_secs(30));
        assert_eq!(b.attempts(), u32::MAX);
        // A cap beyond what u32 doublings reach is still honoured.
        let mut wide = Backoff::new(Duration::from_nanos(1), Duration::MAX);
        wide.attempt = 200;
        assert_eq!(wide.ceiling(), Duration::from_nanos(1 << 31));
    }
}
