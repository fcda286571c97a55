//! The running device's `/metrics` (Prometheus text) and `/healthz?detail=1` (JSON), both
//! served by [`crate::control`] on loopback only (`/metrics` also needs the control token).
//!
//! One source: the figures are those `status` computes ([`Device::status`]: backlog, days
//! held, day keys, clock offset, fallback-sealed records, last sync), the last sync failure
//! `status` reports ([`crate::net::last_sync_failure`]) and the last purge, which
//! [`Device::purge`] stores in the settings table ([`K_LAST_PURGE`]) in the transaction that
//! keeps the day keys. Only what `status` cannot know lives here, in process-wide counters
//! since the process started ([`COUNTERS`]): QR verdicts, sync sessions by outcome and
//! refusal reason, and the siblings seen. No label carries a name, a token or a phone; the
//! facility and device ids are left out too (a scrape job labels its target).

use crate::device::Device;
use crate::net::SyncReport;
use serde::{Deserialize, Serialize};
use shared::UnixSeconds;
use shared::token::Verdict;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The settings key of the last purge ([`LastPurge`]).
pub const K_LAST_PURGE: &str = "last_purge";

/// The settings key the health check's write probe writes (the time of the probe).
pub const K_HEALTH_PROBE: &str = "health_probe";

/// How long a write probe's answer is reused: a watchdog polling often costs one durable
/// write per this period, not one per request.
pub const PROBE_REUSE: Duration = Duration::from_secs(5);

/// A purge older than this makes the health check report `degraded` (retention runs hourly).
pub const PURGE_STALE_SECONDS: u64 = 26 * 3600;

/// No completed hub sync for this long makes the health check report `degraded`.
pub const SYNC_STALE_SECONDS: u64 = 24 * 3600;

/// The last purge, as stored by [`Device::purge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastPurge {
    /// When it ran, Unix seconds of the device's clock.
    pub at: UnixSeconds,
    /// Records in the partitions it dropped.
    pub records: u64,
    /// Partitions (days) it dropped.
    pub days: u64,
}

/// The last purge this device stored, if any (an unreadable one counts as none).
pub fn last_purge(device: &Device) -> Option<LastPurge> {
    let bytes = device.store().get(K_LAST_PURGE).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Counters kept in memory since the process started.
pub struct Counters {
    /// QR check-ins by verdict, in `Verdict::ALL`'s order.
    verdicts: [AtomicU64; 10],
    /// Sync sessions this device opened or served: (peer kind, outcome, reason) -> count.
    sessions: Mutex<BTreeMap<(&'static str, &'static str, String), u64>>,
    /// Endpoint ids of siblings a session completed with, either way.
    siblings: Mutex<BTreeSet<String>>,
    /// Hub-signed revocation lists taken, and lists ignored because they did not verify.
    revocation_lists: [AtomicU64; 2],
}

/// The process's counters (one device per process).
pub static COUNTERS: Counters = Counters {
    verdicts: [const { AtomicU64::new(0) }; 10],
    sessions: Mutex::new(BTreeMap::new()),
    siblings: Mutex::new(BTreeSet::new()),
    revocation_lists: [const { AtomicU64::new(0) }; 2],
};

/// Counts a revocation list taken (`true`) or ignored as not the hub's (`false`).
pub fn note_revocation_list(taken: bool) {
    COUNTERS.revocation_lists[usize::from(!taken)].fetch_add(1, Ordering::Relaxed);
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts one check-in's verdict ([`Device::check_in`]).
pub fn note_verdict(v: Verdict) {
    if let Some(i) = Verdict::ALL.iter().position(|a| *a == v) {
        COUNTERS.verdicts[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts one session this device opened ([`crate::net::sync_with`]): its outcome and the
/// refusal's reason; a completed sibling session adds the sibling to those seen.
pub fn note_session(peer_is_hub: bool, sibling: &str, report: &SyncReport) {
    let kind = if peer_is_hub { "hub" } else { "sibling" };
    let (outcome, reason) = match (&report.reason, report.ok) {
        (_, true) => ("ok", String::new()),
        (Some(r), false) => ("refused", reason_label(r)),
        (None, false) => ("failed", String::new()),
    };
    *locked(&COUNTERS.sessions)
        .entry((kind, outcome, reason))
        .or_default() += 1;
    if report.ok && !peer_is_hub {
        note_sibling(sibling);
    }
}

/// A sibling's session this device served ended: completed (`ok`), refused (`reason`) or
/// failed.
pub fn note_served(sibling: &str, ok: bool, reason: Option<&str>) {
    let (outcome, reason) = match (ok, reason) {
        (true, _) => ("ok", String::new()),
        (false, Some(r)) => ("refused", reason_label(r)),
        (false, None) => ("failed", String::new()),
    };
    *locked(&COUNTERS.sessions)
        .entry(("sibling", outcome, reason))
        .or_default() += 1;
    if ok {
        note_sibling(sibling);
    }
}

fn note_sibling(endpoint: &str) {
    locked(&COUNTERS.siblings).insert(endpoint.to_owned());
}

/// A refusal reason as a label value: the enum's name (`Revoked`, `QuotaExceeded`), never
/// free text; anything else is `other`.
fn reason_label(r: &str) -> String {
    if !r.is_empty() && r.len() <= 40 && r.chars().all(|c| c.is_ascii_alphanumeric()) {
        r.to_owned()
    } else {
        "other".to_owned()
    }
}

fn head(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: Option<impl std::fmt::Display>) {
    head(out, name, help, "gauge");
    if let Some(v) = value {
        let _ = writeln!(out, "{name} {v}");
    }
}

/// The Prometheus text exposition of the device's figures and counters at `now`.
pub fn render(device: &Device, now: UnixSeconds) -> Result<String, crate::device::DeviceError> {
    let st = device.status(now)?;
    let failure = crate::net::last_sync_failure(device);
    let purge = last_purge(device);
    let roster = device.roster()?.len();
    let mut out = String::new();
    head(
        &mut out,
        "kipass_edge_visits_total",
        "QR check-ins by verdict since the process started (accepted, or the refusal's reason).",
        "counter",
    );
    for (v, n) in Verdict::ALL.iter().zip(&COUNTERS.verdicts) {
        let _ = writeln!(
            out,
            "kipass_edge_visits_total{{verdict=\"{}\"}} {}",
            v.as_str(),
            n.load(Ordering::Relaxed)
        );
    }
    head(
        &mut out,
        "kipass_edge_sync_sessions_total",
        "Sync sessions since the process started, by peer (hub, sibling), outcome (ok, \
         refused, failed) and a refusal's reason.",
        "counter",
    );
    for ((kind, outcome, reason), n) in locked(&COUNTERS.sessions).iter() {
        let _ = writeln!(
            out,
            "kipass_edge_sync_sessions_total{{peer=\"{kind}\",outcome=\"{outcome}\",reason=\"{reason}\"}} {n}"
        );
    }
    let unsynced_days = st.partitions.iter().filter(|p| p.unsynced > 0).count();
    gauge(
        &mut out,
        "kipass_edge_unsynced_records",
        "Records not yet known to be at the hub (status: unsynced).",
        Some(st.unsynced),
    );
    gauge(
        &mut out,
        "kipass_edge_unsynced_days",
        "Live days holding records not yet known to be at the hub.",
        Some(unsynced_days),
    );
    gauge(
        &mut out,
        "kipass_edge_records_held",
        "Records in live partitions (status: records).",
        Some(st.records),
    );
    gauge(
        &mut out,
        "kipass_edge_days_held",
        "Live partitions (days) the device holds.",
        Some(st.partitions.len()),
    );
    gauge(
        &mut out,
        "kipass_edge_last_sync_timestamp_seconds",
        "The last completed sync with the hub, Unix seconds (absent: never).",
        st.last_sync,
    );
    let attempt = st.last_sync.max(failure.as_ref().map(|f| f.at));
    gauge(
        &mut out,
        "kipass_edge_last_sync_attempt_timestamp_seconds",
        "The last sync session that ended, completed or not, Unix seconds (absent: none).",
        attempt,
    );
    gauge(
        &mut out,
        "kipass_edge_clock_offset_seconds",
        "This device's clock minus the hub's at the last sync (absent: never measured).",
        st.clock_offset,
    );
    gauge(
        &mut out,
        "kipass_edge_day_keys_left",
        "Days from today for which the device holds a hub day key.",
        Some(st.day_keys_left),
    );
    gauge(
        &mut out,
        "kipass_edge_fallback_sealed_records",
        "Live records sealed to an earlier day's hub key because the device ran out of day keys.",
        Some(st.fallback_sealed),
    );
    gauge(
        &mut out,
        "kipass_edge_last_purge_timestamp_seconds",
        "The last retention run, Unix seconds (absent: none recorded).",
        purge.map(|p| p.at),
    );
    gauge(
        &mut out,
        "kipass_edge_last_purge_records",
        "Records in the partitions the last retention run dropped.",
        purge.map(|p| p.records),
    );
    gauge(
        &mut out,
        "kipass_edge_siblings_known",
        "Sibling devices of the facility in the hub's roster.",
        Some(roster),
    );
    gauge(
        &mut out,
        "kipass_edge_siblings_seen",
        "Distinct siblings a sync session completed with since the process started.",
        Some(locked(&COUNTERS.siblings).len()),
    );
    gauge(
        &mut out,
        "kipass_edge_revoked_devices",
        "Devices of the facility the hub-signed revocation list this device holds revokes.",
        Some(st.revocations.version),
    );
    gauge(
        &mut out,
        "kipass_edge_revocations_age_seconds",
        "Seconds since this device last learnt the revocations (the newest of its list's \
         signing and its last hub sync; absent: never).",
        st.revocations.age_seconds,
    );
    gauge(
        &mut out,
        "kipass_edge_revocations_stale",
        "1 when this device's knowledge of revocations is older than 72 hours or unknown.",
        Some(u8::from(st.revocations.stale)),
    );
    head(
        &mut out,
        "kipass_edge_revocation_lists_total",
        "Hub-signed revocation lists received since the process started: taken, or ignored \
         because they were not signed by this device's hub for its facility.",
        "counter",
    );
    for (outcome, n) in ["taken", "ignored"].iter().zip(&COUNTERS.revocation_lists) {
        let _ = writeln!(
            out,
            "kipass_edge_revocation_lists_total{{outcome=\"{outcome}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    Ok(out)
}

/// The overall state a health check reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overall {
    /// Everything checked is fine.
    Ok,
    /// Working, but something needs an operator (the `problems` say what); HTTP 200.
    Degraded,
    /// The device cannot do its job (the store cannot be written); HTTP 503.
    Unhealthy,
}

/// `/healthz?detail=1`'s answer. No name, token, phone or id.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// The overall state.
    pub status: Overall,
    /// A write to the store (a settings row) committed.
    pub store_writable: bool,
    /// Days from today for which the device holds a hub day key.
    pub day_keys_left: usize,
    /// The last completed sync with the hub.
    pub last_sync: Option<UnixSeconds>,
    /// The last sync session that ended, completed or not.
    pub last_sync_attempt: Option<UnixSeconds>,
    /// The last retention run.
    pub last_purge: Option<UnixSeconds>,
    /// Records not yet known to be at the hub.
    pub unsynced: u64,
    /// What is wrong, for an operator.
    pub problems: Vec<String>,
}

/// What the health decision reads.
#[derive(Debug, Clone, Copy)]
pub struct HealthFacts {
    /// The write probe committed.
    pub store_writable: bool,
    /// Day keys from today on.
    pub day_keys_left: usize,
    /// The last completed hub sync.
    pub last_sync: Option<UnixSeconds>,
    /// The last purge.
    pub last_purge: Option<UnixSeconds>,
    /// When the device was enrolled (a new device has not synced or purged yet).
    pub enrolled_at: UnixSeconds,
}

/// The health decision: unhealthy (503) only when the store cannot be written, the one
/// failure a restart may cure and that loses visits; missing day keys, a stale sync or a
/// purge that has not run are `degraded`, since a watchdog restarting the device would not
/// help (and a restarted device runs its first purge only an hour later).
pub fn decide(f: &HealthFacts, now: UnixSeconds) -> (Overall, Vec<String>) {
    let mut problems = Vec::new();
    if !f.store_writable {
        problems.push("the store cannot be written: check the disk".to_owned());
    }
    if f.day_keys_left == 0 {
        problems.push("no hub day key for today: sync with the hub".to_owned());
    }
    let since = |t: Option<UnixSeconds>| now.saturating_sub(t.unwrap_or(f.enrolled_at));
    if since(f.last_sync) > SYNC_STALE_SECONDS {
        problems.push("no completed sync with the hub for over 24 hours".to_owned());
    }
    if since(f.last_purge) > PURGE_STALE_SECONDS {
        problems.push("retention has not run for over 26 hours".to_owned());
    }
    let status = if !f.store_writable {
        Overall::Unhealthy
    } else if problems.is_empty() {
        Overall::Ok
    } else {
        Overall::Degraded
    };
    (status, problems)
}

/// The last write probe's time and answer, reused for [`PROBE_REUSE`].
#[derive(Default)]
pub struct ProbeCache(Mutex<Option<(Instant, bool)>>);

impl ProbeCache {
    /// Whether the store takes a write: a settings row committed durably, or the answer of a
    /// probe less than [`PROBE_REUSE`] old.
    pub fn probe(&self, device: &Device, now: UnixSeconds) -> bool {
        let mut last = locked(&self.0);
        if let Some((at, ok)) = *last
            && at.elapsed() < PROBE_REUSE
        {
            return ok;
        }
        let ok = device
            .store()
            .put(&[(K_HEALTH_PROBE, now.to_string().as_bytes())])
            .is_ok();
        *last = Some((Instant::now(), ok));
        ok
    }
}

/// The health check at `now`.
pub fn health(
    device: &Device,
    probe: &ProbeCache,
    now: UnixSeconds,
) -> Result<Health, crate::device::DeviceError> {
    let store_writable = probe.probe(device, now);
    let st = device.status(now)?;
    let last_purge = last_purge(device).map(|p| p.at);
    let failure = crate::net::last_sync_failure(device).map(|f| f.at);
    let facts = HealthFacts {
        store_writable,
        day_keys_left: st.day_keys_left,
        last_sync: st.last_sync,
        last_purge,
        enrolled_at: device.enrollment().enrolled_at,
    };
    let (status, problems) = decide(&facts, now);
    Ok(Health {
        status,
        store_writable,
        day_keys_left: st.day_keys_left,
        last_sync: st.last_sync,
        last_sync_attempt: st.last_sync.max(failure),
        last_purge,
        unsynced: st.unsynced,
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::Day;

    fn facts() -> HealthFacts {
        HealthFacts {
            store_writable: true,
            day_keys_left: 30,
            last_sync: Some(1_000_000),
            last_purge: Some(1_000_000),
            enrolled_at: 900_000,
        }
    }

    #[test]
    fn only_an_unwritable_store_is_unhealthy() {
        let now = 1_000_100;
        assert_eq!(decide(&facts(), now), (Overall::Ok, vec![]));
        let broken = HealthFacts {
            store_writable: false,
            ..facts()
        };
        assert_eq!(decide(&broken, now).0, Overall::Unhealthy);
        for f in [
            HealthFacts {
                day_keys_left: 0,
                ..facts()
            },
            HealthFacts {
                last_sync: Some(now - SYNC_STALE_SECONDS - 1),
                ..facts()
            },
            HealthFacts {
                last_purge: None,
                ..facts()
            },
        ] {
            let (status, problems) = decide(&f, now + PURGE_STALE_SECONDS);
            assert_eq!(status, Overall::Degraded, "{f:?}");
            assert!(!problems.is_empty());
        }
        // A device enrolled an hour ago has not purged or synced yet: that is fine.
        let new = HealthFacts {
            last_sync: None,
            last_purge: None,
            enrolled_at: now - 3600,
            ..facts()
        };
        assert_eq!(decide(&new, now).0, Overall::Ok);
    }

    /// A store whose writes fail makes the check unhealthy, and a probe's answer is reused
    /// for a few seconds only.
    #[test]
    fn a_failing_store_is_reported_unhealthy() {
        let tmp = tempfile::tempdir().expect("tmp");
        let now = crate::clock::now();
        let dev = crate::device::tests::enrolled(&tmp, now, Day::of(now), 35);
        let cache = ProbeCache::default();
        let h = health(&dev, &cache, now).expect("health");
        assert!(h.store_writable);
        assert_ne!(h.status, Overall::Unhealthy);
        dev.store().fail_writes(true);
        // Reused within PROBE_REUSE.
        assert!(health(&dev, &cache, now).expect("health").store_writable);
        let h = health(&dev, &ProbeCache::default(), now).expect("health");
        assert!(!h.store_writable);
        assert_eq!(h.status, Overall::Unhealthy);
    }

    /// The purge stores its time and the records it dropped; `render` exposes them.
    #[test]
    fn a_purge_is_recorded_and_rendered() {
        let tmp = tempfile::tempdir().expect("tmp");
        let now = crate::clock::now();
        let mut dev = crate::device::tests::enrolled(&tmp, now, Day::of(now), 35);
        assert_eq!(last_purge(&dev), None);
        dev.purge(now, None).expect("purge");
        let p = last_purge(&dev).expect("recorded");
        assert_eq!((p.at, p.records, p.days), (now, 0, 0));
        let text = render(&dev, now).expect("render");
        assert!(text.contains(&format!("kipass_edge_last_purge_timestamp_seconds {now}\n")));
        assert!(text.contains("kipass_edge_last_purge_records 0\n"));
        assert!(text.contains("kipass_edge_day_keys_left "));
    }
}
