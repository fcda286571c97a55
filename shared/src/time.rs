//! Time as the core sees it: Unix seconds passed in by the caller, UTC days, the retention horizon.
//!
//! The core never reads a clock. Shells read theirs in one place and pass `now` down.

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch, UTC.
pub type UnixSeconds = u64;

/// Seconds in one UTC day, the length of a partition.
pub const DAY_SECONDS: u64 = 86_400;

/// Days a visit is kept (twice the 14-day incubation period).
pub const RETENTION_DAYS: u32 = 28;

/// A UTC day, counted from the Unix epoch: the unit of partitions and day keys.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Day(pub u32);

impl Day {
    /// The UTC day that contains `t`.
    pub fn of(t: UnixSeconds) -> Day {
        Day(u32::try_from(t / DAY_SECONDS).unwrap_or(u32::MAX))
    }

    /// The first second of this day.
    pub fn start(self) -> UnixSeconds {
        u64::from(self.0) * DAY_SECONDS
    }

    /// The first second after this day.
    pub fn end(self) -> UnixSeconds {
        self.start() + DAY_SECONDS
    }

    /// This day plus `n` days (saturating).
    pub fn plus(self, n: u32) -> Day {
        Day(self.0.saturating_add(n))
    }

    /// This day minus `n` days (saturating at the epoch).
    pub fn minus(self, n: u32) -> Day {
        Day(self.0.saturating_sub(n))
    }
}

impl std::fmt::Display for Day {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The oldest day still live at `now`: partitions of earlier days are expired everywhere,
/// are never requested, sent or accepted, and their day secrets are destroyed.
///
/// A visit on day `d` stays readable until the end of day `d + 28`, so it is gone at most
/// 28 days plus one partition's length after it happened.
pub fn horizon(now: UnixSeconds) -> Day {
    Day::of(now).minus(RETENTION_DAYS)
}

/// Whether a partition of `day` is expired at `now`.
pub fn is_expired(day: Day, now: UnixSeconds) -> bool {
    day < horizon(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizon_keeps_28_days_plus_at_most_one_partition() {
        let visit = Day(20_000).start() + 5;
        let day = Day::of(visit);
        // Still live at the last second of day d + 28.
        assert!(!is_expired(day, day.plus(28).end() - 1));
        // Expired the second after.
        assert!(is_expired(day, day.plus(28).end()));
        // Never expired before 28 full days have passed.
        assert!(!is_expired(day, visit + 28 * DAY_SECONDS));
    }

    #[test]
    fn day_arithmetic_saturates() {
        assert_eq!(Day(3).minus(10), Day(0));
        assert_eq!(Day(u32::MAX).plus(1), Day(u32::MAX));
        assert_eq!(Day::of(u64::MAX), Day(u32::MAX));
    }
}
