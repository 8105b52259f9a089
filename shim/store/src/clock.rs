//! Times in milliseconds, as manifests, the job's history, status and events record them:
//! the one place a time becomes a number of milliseconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `t` as milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// Now, as milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// A duration in whole milliseconds (saturating at `u64::MAX`).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_since_the_epoch() {
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1_234)), 1_234);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(millis(Duration::from_micros(2_999)), 2);
        assert!(now_unix_ms() > 1_700_000_000_000);
    }
}
