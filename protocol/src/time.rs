//! Times on the wire and in stored records: Unix milliseconds (`deadline_unix_ms`, the
//! relay's session records). One pair of conversions for both sides.

use std::time::{Duration, SystemTime};

/// Milliseconds since the Unix epoch (0 for a time before it; saturates far in the future).
pub fn to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A time from Unix milliseconds.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_round_trip_and_early_times_are_zero() {
        let t = from_unix_ms(1_800_000_000_123);
        assert_eq!(to_unix_ms(t), 1_800_000_000_123);
        assert_eq!(
            to_unix_ms(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
            0
        );
    }
}
