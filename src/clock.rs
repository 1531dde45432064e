//! The wall clock: only [`now`] reads the system clock (one place for a test seam or clock policy);
//! the unix seconds, ms and ns derived from it never go below 0 (a clock before 1970 reads as the
//! epoch). Durations and deadlines use the monotonic `Instant`: the wall clock can jump.

use time::OffsetDateTime;

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_secs() -> i64 {
    now().unix_timestamp().max(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> i64 {
    unix_ns() / 1_000_000
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it). An `i64` holds them until 2262.
pub fn unix_ns() -> i64 {
    i64::try_from(now().unix_timestamp_nanos().max(0)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_agree() {
        let (s, ms, ns) = (unix_secs(), unix_ms(), unix_ns());
        assert!(s > 1_700_000_000, "{s}");
        assert!(ms / 1000 >= s && ms / 1000 - s <= 1, "{ms} vs {s}");
        assert!(
            ns / 1_000_000 >= ms && ns / 1_000_000 - ms <= 1000,
            "{ns} vs {ms}"
        );
    }
}
