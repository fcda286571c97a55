//! What a run reports: the summary (human text and one JSON line) and the SVG chart of
//! backlog and delivery over simulated time.

use crate::scenario::Config;
use serde::Serialize;
use std::fmt::Write as _;

/// The figures of the `storm` scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StormFigures {
    /// Simulated seconds from the end of the outage until the last record was at the hub.
    pub delivery_seconds: f64,
    /// The issue's target for that time.
    pub target_seconds: f64,
    /// The assumed link rate of every device, bits per second.
    pub link_bits_per_second: f64,
    /// The assumed round-trip time per flight, seconds.
    pub round_trip_seconds: f64,
    /// The assumed hub ingest rate, records per second.
    pub hub_records_per_second: f64,
    /// The slowest device session over its link alone, seconds.
    pub slowest_link_seconds: f64,
    /// Median delivery time of a record after the outage ended, simulated seconds.
    pub after_outage_p50_s: f64,
    /// 99th percentile of that time.
    pub after_outage_p99_s: f64,
    /// Wall-clock seconds the simulator itself took.
    pub wall_seconds: f64,
}

/// The figures of the `hub-failover` scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FailoverFigures {
    /// Times hub A's process was killed.
    pub a_kills: u64,
    /// Of those, in the middle of a device's session with A (at one of A's commits).
    pub a_killed_in_device_session: u64,
    /// In the middle of a hub-link session (at one of A's commits).
    pub a_killed_in_link_session: u64,
    /// Between sessions.
    pub a_killed_idle: u64,
    /// Of the idle kills, at the end of a minute before its link round ran (what devices
    /// delivered to A alone in that minute was not yet at B).
    pub a_killed_before_link: u64,
    /// Hours hub A was down in all.
    pub a_down_hours: f64,
    /// Its longest stretch down, hours.
    pub a_longest_down_hours: f64,
    /// Dials of a dead hub A (each costs the device's connect timeout before it tries B).
    pub dead_dials: u64,
    /// Device sessions completed with hub A and with hub B.
    pub completed_at_a: u64,
    /// See `completed_at_a`.
    pub completed_at_b: u64,
    /// Devices that failed over: their first good sync with B after A died (a device that
    /// next reached A again, A having come back, did not need to).
    pub failovers: u64,
    /// Failover time (A's death to the device's first good sync with B, dead dial and session
    /// included), simulated seconds: median.
    pub failover_p50_s: f64,
    /// 99th percentile of that time.
    pub failover_p99_s: f64,
    /// Its maximum.
    pub failover_max_s: f64,
    /// Hub-link sessions run (`Peer::HubLink`, one per differing facility per round).
    pub link_sessions: u64,
    /// Their bytes on the wire, both ways (the real sessions' frames).
    pub link_session_bytes: u64,
    /// The link's exchange every 10 s while both hubs run (registry digests, facility
    /// digests, day keys, a QUIC connection): modelled, not measured.
    pub link_exchange_bytes: u64,
    /// Bytes of device sessions with either hub, both ways.
    pub device_hub_bytes: u64,
    /// Per simulated day (and the quiet period's day after them): hub-link session bytes.
    pub link_session_bytes_per_day: Vec<u64>,
    /// Per simulated day: modelled link exchange bytes.
    pub link_exchange_bytes_per_day: Vec<u64>,
    /// Per simulated day: device-to-hub session bytes.
    pub device_hub_bytes_per_day: Vec<u64>,
    /// Times the hubs were checked (each day's end, each return of A after the link ran,
    /// the end of the run).
    pub hold_checks: u64,
    /// Visits a device counted as delivered to a hub, looked up over all those checks.
    pub visits_hold_checked: u64,
    /// Such visits readable at no live hub at a day's end, A being down, but still held by
    /// their device (delivered to A alone before its death; the device delivers them to B
    /// at its next sync), summed over the checks.
    pub held_by_device_only: u64,
    /// Such visits readable at no live hub and held by no device at a day's end, or missing
    /// at one hub after the link ran with A back: each a recovery-point violation.
    pub rpo_violations: u64,
}

/// One point of the chart.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Simulated time, in the unit the chart's axis names (hours, or seconds for the storm).
    pub at: f64,
    /// Acknowledged visits not yet at the hub (and not expired).
    pub backlog: u64,
    /// Distinct visits at the hub so far.
    pub delivered: u64,
}

/// Everything a run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// Facilities.
    pub facilities: u32,
    /// Devices per facility.
    pub devices: u32,
    /// Simulated days of visits.
    pub days: u32,
    /// Visits that arrived at a facility.
    pub visits: u64,
    /// Visits a device verified, sealed and stored: the ones that must reach the hub.
    pub acknowledged: u64,
    /// Visits refused at the scanner (token verification or no day key).
    pub refused_at_scan: u64,
    /// Visits that found no device running (the facility's devices were all down).
    pub unrecorded: u64,
    /// Acknowledged visits at the hub, each counted once.
    pub delivered: u64,
    /// Acknowledged visits inside retention missing at the hub.
    pub lost: u64,
    /// Extra copies at the hub (same record id twice, or one token under two records).
    pub duplicated: u64,
    /// Records at the hub that no device acknowledged.
    pub phantom: u64,
    /// Acknowledged visits that expired before any path to the hub existed.
    pub expired_undelivered: u64,
    /// Median delay from acknowledgement to the hub, simulated seconds.
    pub delay_p50_s: f64,
    /// 99th percentile of that delay.
    pub delay_p99_s: f64,
    /// Its maximum.
    pub delay_max_s: f64,
    /// Bytes on the wire, every session both ways, length prefixes included.
    pub wire_bytes: u64,
    /// `wire_bytes` per acknowledged visit.
    pub wire_bytes_per_record: f64,
    /// Bytes devices sent to the hub.
    pub upload_bytes: u64,
    /// `upload_bytes` per acknowledged visit: the cost of getting a visit to the hub.
    pub upload_bytes_per_record: f64,
    /// `wire_bytes` plus a modelled QUIC cost: every session a new connection of
    /// [`QUIC_CONNECTION_BYTES`], every cut attempt one padded Initial ([`QUIC_ATTEMPT_BYTES`]).
    pub all_in_bytes: u64,
    /// `all_in_bytes` per acknowledged visit.
    pub all_in_bytes_per_record: f64,
    /// `all_in_bytes_per_record` over the sealed envelope of one visit ([`ENVELOPE_BYTES`]).
    pub all_in_vs_envelope: f64,
    /// Sessions run (device-hub and device-device).
    pub sessions: u64,
    /// Of those, relayed through a sibling.
    pub relay_sessions: u64,
    /// Attempts cut by link loss.
    pub failed_attempts: u64,
    /// Sessions run a second time (duplicated delivery).
    pub duplicated_sessions: u64,
    /// Device crashes (in-memory state lost, store kept).
    pub crashes: u64,
    /// Storage faults injected into sessions (`--store-faults`).
    pub store_faults: u64,
    /// Process kills injected at a commit (`--crash-faults`): in sessions, either side, and
    /// in scans.
    pub crash_faults: u64,
    /// Sessions whose link was torn at a random frame (`--torn-sessions`).
    pub torn_sessions: u64,
    /// Stretches of a full disk (`--disk-full`), at devices and the hub.
    pub disk_full_faults: u64,
    /// Writes a full disk refused (persists, sync states, scans).
    pub disk_full_refusals: u64,
    /// Device clock jumps (`--clock-jumps`).
    pub clock_jumps: u64,
    /// Visits a device stored whose verdict was never shown (a kill right after the commit):
    /// they may reach the hub without being acknowledged.
    pub stored_unacknowledged: u64,
    /// Acknowledged visits, not expired by the hub's clock, that a device's retention dropped
    /// before they reached the hub because its clock had jumped forward since the hub last
    /// measured it: what `shared::device::purge_plan` allows (checked in `crate::world`).
    pub lost_to_clock_jump: u64,
    /// Acknowledged visits the final check looked for at the hub.
    pub visits_checked: u64,
    /// Retention breaches found (live secrets or partitions past the horizon).
    pub retention_violations: u64,
    /// Replicas of a live partition whose heads differ after the quiet period.
    pub convergence_violations: u64,
    /// Every violation, described (first 50).
    pub violations: Vec<String>,
    /// Figures of the storm scenario.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storm: Option<StormFigures>,
    /// Figures of the hub-failover scenario.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverFigures>,
    /// The chart's points (not in the JSON line).
    #[serde(skip)]
    pub series: Vec<Sample>,
}

/// UDP bytes, both ways, of one iroh 1.4 connection beyond its protocol frames, measured on
/// loopback by capturing a no-change session (BENCHMARKS.md, "QUIC's fixed cost per
/// session"): padded handshake ~3.6 KB, multipath connection ids ~2.5 KB, NAT-traversal probes
/// ~3.9 KB, tickets, ACKs and close.
pub const QUIC_CONNECTION_BYTES: u64 = 10_700;
/// A connection attempt the link cut: one client Initial, padded to 1,200 B.
pub const QUIC_ATTEMPT_BYTES: u64 = 1_200;
/// The sealed envelope of one QR visit (the wire bench prints it).
pub const ENVELOPE_BYTES: f64 = 101.0;

/// The most violation descriptions a summary keeps.
pub const MAX_VIOLATIONS_KEPT: usize = 50;

impl Summary {
    /// Fills the per-record byte figures from the totals.
    pub fn per_record(&mut self) {
        let n = self.acknowledged.max(1) as f64;
        self.wire_bytes_per_record = self.wire_bytes as f64 / n;
        self.upload_bytes_per_record = self.upload_bytes as f64 / n;
        self.all_in_bytes = self
            .wire_bytes
            .saturating_add(self.sessions.saturating_mul(QUIC_CONNECTION_BYTES))
            .saturating_add(self.failed_attempts.saturating_mul(QUIC_ATTEMPT_BYTES));
        self.all_in_bytes_per_record = self.all_in_bytes as f64 / n;
        self.all_in_vs_envelope = self.all_in_bytes_per_record / ENVELOPE_BYTES;
    }

    /// Faults injected, every kind: storage faults, crashes, torn sessions, full disks
    /// (each refused write counts) and clock jumps.
    pub fn faults_injected(&self) -> u64 {
        self.store_faults
            + self.crash_faults
            + self.torn_sessions
            + self.disk_full_refusals
            + self.clock_jumps
    }

    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.phantom == 0
            && self.retention_violations == 0
            && self.convergence_violations == 0
            && self.violations.is_empty()
    }

    /// Notes a violation; the counters are the caller's.
    pub fn violation(&mut self, what: String) {
        if self.violations.len() < MAX_VIOLATIONS_KEPT {
            self.violations.push(what);
        }
    }

    /// The single-line JSON form.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The human summary, several lines.
    pub fn human(&self, config: &Config) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "scenario {} seed {}: {} facilities x {} devices, {} days",
            self.scenario, self.seed, self.facilities, self.devices, self.days
        );
        let _ = writeln!(
            s,
            "  visits {}  acknowledged {}  refused at scan {}  unrecorded (no device up) {}",
            self.visits, self.acknowledged, self.refused_at_scan, self.unrecorded
        );
        let _ = writeln!(
            s,
            "  delivered {}  lost {}  duplicated {}  phantom {}  expired before any route {}",
            self.delivered, self.lost, self.duplicated, self.phantom, self.expired_undelivered
        );
        let _ = writeln!(
            s,
            "  delay to hub p50 {:.0} s  p99 {:.0} s  max {:.0} s (simulated)",
            self.delay_p50_s, self.delay_p99_s, self.delay_max_s
        );
        let _ = writeln!(
            s,
            "  sessions {} (relayed {}, cut by loss {}, duplicated {})  crashes {}  storage faults {}",
            self.sessions,
            self.relay_sessions,
            self.failed_attempts,
            self.duplicated_sessions,
            self.crashes,
            self.store_faults
        );
        if config.injects_faults() {
            let _ = writeln!(
                s,
                "  faults injected: {} (crashes at a commit {}, torn sessions {}, full disks {} \
                 refusing {} writes, clock jumps {}, storage {}); visits checked {}",
                self.faults_injected(),
                self.crash_faults,
                self.torn_sessions,
                self.disk_full_faults,
                self.disk_full_refusals,
                self.clock_jumps,
                self.store_faults,
                self.visits_checked
            );
            let _ = writeln!(
                s,
                "  stored but never acknowledged (killed before the verdict) {}; dropped by a \
                 jumped clock's retention {}",
                self.stored_unacknowledged, self.lost_to_clock_jump
            );
        }
        let _ = writeln!(
            s,
            "  wire {} bytes = {:.0} B per acknowledged visit (all sessions, both ways); \
             device-to-hub {:.0} B per visit",
            self.wire_bytes, self.wire_bytes_per_record, self.upload_bytes_per_record
        );
        let _ = writeln!(
            s,
            "  all in, with a modelled {QUIC_CONNECTION_BYTES} B QUIC connection per session: \
             {:.0} B per visit = {:.1}x the {ENVELOPE_BYTES} B envelope",
            self.all_in_bytes_per_record, self.all_in_vs_envelope
        );
        if let Some(st) = &self.storm {
            let _ = writeln!(
                s,
                "  storm: last record at the hub {:.1} s after the outage (target {:.0} s); \
                 slowest device link {:.2} s",
                st.delivery_seconds, st.target_seconds, st.slowest_link_seconds
            );
            let _ = writeln!(
                s,
                "  storm: per record after the outage p50 {:.1} s  p99 {:.1} s",
                st.after_outage_p50_s, st.after_outage_p99_s
            );
            let _ = writeln!(
                s,
                "  storm model: {:.1} Mbit/s per device link, {:.0} ms per flight, hub ingest \
                 {:.0} records/s (FIFO); simulator wall time {:.1} s",
                st.link_bits_per_second / 1e6,
                st.round_trip_seconds * 1e3,
                st.hub_records_per_second,
                st.wall_seconds
            );
        }
        if let Some(fo) = &self.failover {
            let mb = |b: u64| b as f64 / 1e6;
            let _ = writeln!(
                s,
                "  hub A killed {} times (in a device session {}, in a link session {}, idle {}, \
                 idle before a link round {}), down {:.1} h in all, longest {:.1} h",
                fo.a_kills,
                fo.a_killed_in_device_session,
                fo.a_killed_in_link_session,
                fo.a_killed_idle,
                fo.a_killed_before_link,
                fo.a_down_hours,
                fo.a_longest_down_hours
            );
            let _ = writeln!(
                s,
                "  device sessions completed at A {}  at B {}  dead dials of A {}; failovers {}: \
                 A's death to first good sync with B p50 {:.0} s  p99 {:.0} s  max {:.0} s",
                fo.completed_at_a,
                fo.completed_at_b,
                fo.dead_dials,
                fo.failovers,
                fo.failover_p50_s,
                fo.failover_p99_s,
                fo.failover_max_s
            );
            let days = (fo.device_hub_bytes_per_day.len().max(2) - 1) as f64;
            let _ = writeln!(
                s,
                "  per day: hub link sessions {:.2} MB ({} sessions in all) + modelled link \
                 exchange {:.1} MB vs device-to-hub sessions {:.2} MB",
                mb(fo.link_session_bytes) / days,
                fo.link_sessions,
                mb(fo.link_exchange_bytes) / days,
                mb(fo.device_hub_bytes) / days
            );
            let per_day: Vec<String> = fo
                .link_session_bytes_per_day
                .iter()
                .zip(&fo.device_hub_bytes_per_day)
                .enumerate()
                .map(|(d, (l, dev))| format!("d{d} {:.3}/{:.3}", mb(*l), mb(*dev)))
                .collect();
            let _ = writeln!(
                s,
                "  link sessions/device sessions MB by day (the last: the quiet period): {}",
                per_day.join("  ")
            );
            let _ = writeln!(
                s,
                "  recovery point: {} checks of {} hub-delivered visits, {} not readable where \
                 they must be, {} at no live hub but still on their device",
                fo.hold_checks, fo.visits_hold_checked, fo.rpo_violations, fo.held_by_device_only
            );
        }
        let _ = writeln!(
            s,
            "  retention violations {}  convergence violations {}",
            self.retention_violations, self.convergence_violations
        );
        if self.passed() {
            let _ = writeln!(s, "  invariants: all held");
        } else {
            let _ = writeln!(s, "  INVARIANTS FAILED:");
            for v in &self.violations {
                let _ = writeln!(s, "    - {v}");
            }
            let _ = writeln!(
                s,
                "  reproduce with seed {}: {}",
                self.seed,
                config.command()
            );
        }
        s
    }
}

/// The nearest-rank percentile `q` (0..=1) of sorted `values`; 0 when empty.
pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// A line chart of backlog (red) and delivered-at-hub (blue) over simulated hours, drawn by
/// hand so the crate needs no plotting library. Each series has its own vertical scale,
/// labelled on its side.
pub fn svg_chart(title: &str, x_unit: &str, series: &[Sample]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 360.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 70.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 40.0;
    let max_h = series.iter().map(|p| p.at).fold(1.0_f64, f64::max);
    let max_backlog = series.iter().map(|p| p.backlog).max().unwrap_or(0).max(1) as f64;
    let max_delivered = series.iter().map(|p| p.delivered).max().unwrap_or(0).max(1) as f64;
    let x = |h: f64| LEFT + h / max_h * (W - LEFT - RIGHT);
    let y = |v: f64, max: f64| H - BOTTOM - v / max * (H - TOP - BOTTOM);
    let line = |f: &dyn Fn(&Sample) -> f64, max: f64| {
        series
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.at), y(f(p), max)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="14">{}</text>"#,
        escape(title)
    );
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, H - BOTTOM, TOP);
    let _ = writeln!(
        s,
        r#"<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0} L{x1},{y1}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">simulated {} (0 to {max_h:.1})</text>"#,
        (x0 + x1) / 2.0,
        H - 10.0,
        escape(x_unit)
    );
    let _ = writeln!(
        s,
        r##"<text x="5" y="{}" fill="#c0392b">backlog {max_backlog:.0}</text>"##,
        y1 + 4.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" fill="#2c6fbb" text-anchor="end">delivered {max_delivered:.0}</text>"##,
        W - 5.0,
        y1 + 4.0
    );
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#2c6fbb" stroke-width="1.5" points="{}"/>"##,
        line(&|p| p.delivered as f64, max_delivered)
    );
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#c0392b" stroke-width="1.5" points="{}"/>"##,
        line(&|p| p.backlog as f64, max_backlog)
    );
    let _ = writeln!(s, "</svg>");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn a_summary_with_a_loss_fails_and_names_the_seed() {
        let config = Config::new(crate::scenario::Scenario::OutdoorHotspot, 77);
        let mut s = Summary {
            seed: 77,
            lost: 1,
            ..Default::default()
        };
        s.violation("visit x lost".into());
        assert!(!s.passed());
        let text = s.human(&config);
        assert!(
            text.contains("seed 77") && text.contains("--seed 77"),
            "{text}"
        );
        assert!(!s.json_line().contains('\n'));
    }

    #[test]
    fn the_chart_has_both_series() {
        let pts = [
            Sample {
                at: 0.0,
                backlog: 3,
                delivered: 0,
            },
            Sample {
                at: 2.0,
                backlog: 0,
                delivered: 3,
            },
        ];
        let svg = svg_chart("t <1>", "hours", &pts);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
    }
}
