//! The device's one clock reading. Everything else gets `now` passed in.
//!
//! `KIPASS_CLOCK_OFFSET` (seconds, may be negative) shifts the clock for tests and the demo,
//! which fast-forward days or simulate a drifting device clock. Production leaves it unset.

use shared::UnixSeconds;
use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix seconds.
pub fn now() -> UnixSeconds {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match std::env::var("KIPASS_CLOCK_OFFSET")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
    {
        Some(off) => real.saturating_add_signed(off),
        None => real,
    }
}
