//! Reconnect backoff: exponential with full jitter, capped, reset after a healthy link.

use std::time::Duration;

use rand::Rng;

/// First retry delay (before jitter).
pub const INITIAL: Duration = Duration::from_millis(250);
/// Largest retry delay.
pub const MAX: Duration = Duration::from_secs(30);
/// A link that stayed up this long resets the backoff.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Exponential backoff state.
#[derive(Debug, Default)]
pub struct Backoff {
    /// Failures since the last reset.
    attempt: u32,
}

impl Backoff {
    /// The delay before the next attempt: random in [ceiling/2, ceiling], where the ceiling
    /// doubles per failure up to [`MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = INITIAL
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(MAX);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    /// Forgets past failures.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= INITIAL / 2 && first <= INITIAL);
        for _ in 0..40 {
            assert!(b.next_delay() <= MAX);
        }
        assert!(b.next_delay() >= MAX / 2);
        b.reset();
        assert!(b.next_delay() <= INITIAL);
    }
}
