//! Reconnect backoff: exponential with full jitter, capped, reset after a healthy link.

use std::time::Duration;

use rand::Rng;

/// First retry delay (before jitter).
pub const INITIAL: Duration = Duration::from_millis(250);
/// Largest retry delay.
pub const MAX: Duration = Duration::from_secs(30);
/// Largest delay after a `session_busy` refusal. Another link still holds the session: a
/// dead one the relay drops after three missed heartbeats, or in a cluster a dead node whose
/// lease has not run out yet (`--node-lease-ttl`). Either frees the session at a moment the
/// agent cannot know, so it keeps asking about once a second instead of backing off for up
/// to 30 s (one TLS handshake a second per waiting agent, refused cheaply).
pub const BUSY_MAX: Duration = Duration::from_secs(1);
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

    /// The delay after a `session_busy` refusal: [`Backoff::next_delay`] while that is at
    /// most [`BUSY_MAX`], then random in [BUSY_MAX/2, BUSY_MAX] (still jittered, so agents
    /// of a dead node do not all ask at the same instant).
    pub fn busy_delay(&mut self) -> Duration {
        let delay = self.next_delay();
        if delay <= BUSY_MAX {
            return delay;
        }
        let half = BUSY_MAX / 2;
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

    #[test]
    fn a_busy_session_is_asked_about_again_within_a_second_with_jitter() {
        let mut b = Backoff::default();
        let first = b.busy_delay();
        assert!(first >= INITIAL / 2 && first <= INITIAL, "{first:?}");
        // Growing as usual while the ceiling is at most a second (0.5 s, 1 s), then capped.
        for _ in 0..2 {
            assert!(b.busy_delay() <= BUSY_MAX);
        }
        let later: Vec<Duration> = (0..200).map(|_| b.busy_delay()).collect();
        assert!(
            later.iter().all(|d| *d >= BUSY_MAX / 2 && *d <= BUSY_MAX),
            "{later:?}"
        );
        assert!(
            later.iter().any(|d| *d != later[0]),
            "the delays are jittered: {later:?}"
        );
        // Other failures after busy refusals still back off in full.
        assert!(b.next_delay() >= MAX / 2);
    }
}
