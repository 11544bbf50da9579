//! The daily quota's clock: UTC days and the wait until the next one.

use chrono::{DateTime, Duration, Utc};

/// The UTC day of an instant, as stored in `daily_usage.day` (`YYYY-MM-DD`).
pub fn day_of(now: DateTime<Utc>) -> String {
    now.format("%Y-%m-%d").to_string()
}

/// Seconds from `now` until the next UTC midnight, rounded up (at least 1): the `Retry-After` of a 429.
pub fn seconds_until_next_day(now: DateTime<Utc>) -> u64 {
    let next = (now.date_naive() + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc());
    let secs = next
        .map(|n| ((n - now).num_milliseconds() + 999).div_euclid(1000))
        .unwrap_or(86_400);
    u64::try_from(secs).unwrap_or(1).clamp(1, 86_400)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn day_is_utc() {
        assert_eq!(day_of(at("2025-03-01T23:59:59Z")), "2025-03-01");
        assert_eq!(day_of(at("2025-03-01T23:30:00-02:00")), "2025-03-02");
    }

    #[test]
    fn retry_after_reaches_midnight() {
        assert_eq!(seconds_until_next_day(at("2025-03-01T23:59:59Z")), 1);
        assert_eq!(seconds_until_next_day(at("2025-03-01T23:59:59.5Z")), 1);
        assert_eq!(seconds_until_next_day(at("2025-03-01T00:00:00Z")), 86_400);
        assert_eq!(seconds_until_next_day(at("2025-03-01T12:00:00Z")), 43_200);
    }
}
