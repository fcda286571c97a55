//! What `/metrics` and `/healthz?detail=1` need that is not a row of a table: a latency
//! histogram ([`Histogram`], Prometheus' cumulative buckets) and the health decision
//! ([`decide`]). A base-layer module: it imports nothing of the crate, so the actor
//! ([`crate::daemon`]) keeps its counters in it and [`crate::http`] renders them.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A trace's duration buckets, seconds (upper bounds; `+Inf` is the count).
pub const TRACE_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// How long one input held the hub's actor, seconds (upper bounds up to 1 s; `+Inf` is the
/// count): a sync frame takes well under a millisecond to tens of milliseconds, and the
/// issue-14 target is that nothing holds it 100 ms.
pub const HOLD_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A fixed-bucket histogram of durations.
#[derive(Debug)]
pub struct Histogram {
    /// The buckets' upper bounds, seconds, ascending.
    bounds: &'static [f64],
    /// Observations at or under each of `bounds` (not cumulative; summed on render).
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum, microseconds.
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    /// Over [`TRACE_BUCKETS`].
    fn default() -> Self {
        Histogram::with_bounds(&TRACE_BUCKETS)
    }
}

impl Histogram {
    /// An empty histogram over `bounds` (seconds, ascending).
    pub fn with_bounds(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Counts one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The histogram in Prometheus text, with its `HELP` and `TYPE` lines.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// `kipass_hub_revoked_records_refused_total` (and its per-device form) in Prometheus text:
/// records a sibling relayed that a revoked device sealed after its revocation, left out of
/// the trace index (`ledger::Stats::revoked_refused_per_device`, kept in the store).
pub fn render_revoked_refused(out: &mut String, per_device: &BTreeMap<String, u64>) {
    let name = "kipass_hub_revoked_records_refused_total";
    let total: u64 = per_device.values().sum();
    let _ = writeln!(
        out,
        "# HELP {name} Records relayed by a sibling that a revoked device sealed at or after \
         its revocation: stored, but left out of the trace index.\n# TYPE {name} counter\n\
         {name} {total}"
    );
    let name = "kipass_hub_device_revoked_records_refused_total";
    let _ = writeln!(
        out,
        "# HELP {name} kipass_hub_revoked_records_refused_total by device (devices that have \
         any).\n# TYPE {name} counter"
    );
    for (device, n) in per_device {
        let device = device
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = writeln!(out, "{name}{{device=\"{device}\"}} {n}");
    }
}

/// A retention run older than this makes the hub `degraded` (its timer runs hourly).
pub const PURGE_STALE_SECONDS: u64 = 26 * 3600;

/// The overall state a health check reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overall {
    /// Everything checked is fine.
    Ok,
    /// Working, but something needs an operator (the `problems` say what); HTTP 200.
    Degraded,
    /// The hub cannot do its job; HTTP 503.
    Unhealthy,
}

/// What the decision reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthFacts {
    /// A write to the store committed.
    pub store_writable: bool,
    /// The hub's day keys are readable and reach tomorrow (its ratchet loaded).
    pub future_day_keys: u32,
    /// The last retention run that succeeded, Unix seconds (0: none since the start).
    pub last_purge: Option<u64>,
    /// The last retention run failed.
    pub last_purge_failed: bool,
    /// When the process started (the first retention run is due at once).
    pub started: u64,
}

/// The health decision at `now`: unhealthy (503) when the store cannot be written, the last
/// retention run failed (visits past 28 days may be kept: a legal duty) or no day key for
/// tomorrow is derivable (devices would fall back to older keys); degraded when no retention
/// run succeeded for [`PURGE_STALE_SECONDS`].
pub fn decide(f: &HealthFacts, now: u64) -> (Overall, Vec<String>) {
    let mut fatal = Vec::new();
    let mut warn = Vec::new();
    if !f.store_writable {
        fatal.push("the store cannot be written: check the disk".to_owned());
    }
    if f.last_purge_failed {
        fatal.push("the last retention run failed: see the log".to_owned());
    }
    if f.future_day_keys == 0 {
        fatal.push("no day key for the coming days".to_owned());
    }
    let since = now.saturating_sub(f.last_purge.unwrap_or(f.started));
    if since > PURGE_STALE_SECONDS {
        warn.push("retention has not run for over 26 hours".to_owned());
    }
    let status = if !fatal.is_empty() {
        Overall::Unhealthy
    } else if !warn.is_empty() {
        Overall::Degraded
    } else {
        Overall::Ok
    };
    fatal.extend(warn);
    (status, fatal)
}

/// `/healthz?detail=1`'s answer: states and times only, no name, id, count of visits or
/// secret, so it needs no credential (see [`crate::http`]).
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// The overall state.
    pub status: Overall,
    /// A write to the store committed.
    pub store_writable: bool,
    /// Days of future day public keys the hub hands each device (today on).
    pub day_keys_ahead: u32,
    /// Day secrets the hub holds (oldest live day to tomorrow).
    pub day_keys_left: u32,
    /// The last retention run that succeeded.
    pub last_purge: Option<u64>,
    /// The newest completed sync of any device.
    pub last_sync: Option<u64>,
    /// What is wrong, for an operator.
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HealthFacts {
        HealthFacts {
            store_writable: true,
            future_day_keys: 42,
            last_purge: Some(1_000_000),
            last_purge_failed: false,
            started: 999_000,
        }
    }

    #[test]
    fn the_decision() {
        let now = 1_000_100;
        assert_eq!(decide(&facts(), now), (Overall::Ok, vec![]));
        for f in [
            HealthFacts {
                store_writable: false,
                ..facts()
            },
            HealthFacts {
                last_purge_failed: true,
                ..facts()
            },
            HealthFacts {
                future_day_keys: 0,
                ..facts()
            },
        ] {
            let (s, p) = decide(&f, now);
            assert_eq!(s, Overall::Unhealthy, "{f:?}");
            assert_eq!(p.len(), 1);
        }
        let stale = decide(&facts(), 1_000_000 + PURGE_STALE_SECONDS + 1);
        assert_eq!(stale.0, Overall::Degraded);
        // Just started, no run yet: fine.
        let new = HealthFacts {
            last_purge: None,
            ..facts()
        };
        assert_eq!(decide(&new, 999_010).0, Overall::Ok);
    }

    #[test]
    fn revoked_refused_renders_total_and_per_device() {
        let mut out = String::new();
        let per: BTreeMap<String, u64> = [("dev_a".to_owned(), 2), ("dev_\"b".to_owned(), 1)]
            .into_iter()
            .collect();
        render_revoked_refused(&mut out, &per);
        assert!(
            out.contains("\nkipass_hub_revoked_records_refused_total 3\n"),
            "{out}"
        );
        assert!(
            out.contains("kipass_hub_device_revoked_records_refused_total{device=\"dev_a\"} 2"),
            "{out}"
        );
        assert!(out.contains("{device=\"dev_\\\"b\"} 1"), "{out}");
        let mut empty = String::new();
        render_revoked_refused(&mut empty, &BTreeMap::new());
        assert!(
            empty.contains("\nkipass_hub_revoked_records_refused_total 0\n"),
            "{empty}"
        );
    }

    #[test]
    fn buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(300));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.5\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert!(out.contains("x_sum 60.303\n"), "{out}");
    }
}
