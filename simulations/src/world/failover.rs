//! The `hub-failover` scenario: a region run by two hubs, A and B, each with its own day-key
//! ratchet (design.md, "Two hubs per region", property 8).
//!
//! - Devices wrap every session key to both hubs' day keys of its day: one age file with two
//!   recipients (`wrap_to_both`), so either hub's secret opens it.
//! - A device dials the hub that answered it last first; a dead hub costs it the edge's
//!   connect timeout ([`DIAL_TIMEOUT_SECONDS`]) and a few padded Initials
//!   ([`DEAD_DIAL_BYTES`]), then it dials the other in the same round.
//! - Hub A's process is killed at seeded random moments ([`plan_deaths`]): the first session
//!   A takes part in at that minute (a device's or the link's) dies at one of A's commits,
//!   before or after it (the simulation's faulty shell puts A's store back to what it had
//!   committed); with no session running, A dies idle. It comes back after minutes to hours,
//!   and once after a day or more. Hub B never dies.
//! - While both run, the hub link runs: one real two-way session (`Peer::HubLink`, through
//!   `Session::initiator_to` as `sync-hub`'s link dials it) per facility whose live
//!   partitions' heads differ, the hubs dialling in turn. The simulation runs it once a
//!   simulated minute (the product every 10 s) and models the exchange that precedes it
//!   every 10 s ([`link_exchange_bytes`]).
//!
//! Checked (each a violation): every visit a device counted as delivered (a completed
//! session with a hub held it) is readable, with the day secret of a hub holding it, at a
//! live hub at the end of every day, and at both hubs once the link has run after A came
//! back; at the end of the run both hubs pass the checks the one hub of the other scenarios
//! passes (every acknowledged visit once, nothing phantom, converged with every device,
//! retention).

use super::{DAY_SECONDS, START_DAY, TICK, World};
use crate::faulty::{self, Crash, Plan, SideFaults};
use crate::refresh::HubRefresh;
use crate::report::{FailoverFigures, QUIC_ATTEMPT_BYTES, QUIC_CONNECTION_BYTES, percentile};
use crate::scenario::Fault;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use shared::daykey::{DayKeyRatchet, DayPublicKey};
use shared::envelope::{SessionKey, WrappedKey};
use shared::sync::harness::{MemoryStore, PairOutcome, PairSetup, run_pair};
use shared::sync::{Decision, Event, Peer, PeerHello};
use shared::time::{Day, horizon};
use shared::unseal::unseal_partition;
use shared::{FacilityId, PartitionId, RecordId, UnixSeconds};
use std::collections::{BTreeMap, BTreeSet};

/// The region both hubs serve.
pub const REGION: &str = "sim";
/// How long a device waits for a dead hub before it dials the other: the edge's
/// `CONNECT_TIMEOUT` (edge-node/src/net.rs).
pub const DIAL_TIMEOUT_SECONDS: u64 = 4;
/// What a dial of a dead hub sends: a padded client Initial and its retransmissions within
/// the timeout (about 1, 2 and 4 s after it).
pub const DEAD_DIAL_BYTES: u64 = 4 * QUIC_ATTEMPT_BYTES;
/// How often the product's hub link runs (`sync-hub`'s `LINK_INTERVAL`).
pub const LINK_INTERVAL_SECONDS: u64 = 10;

/// The bytes of one link exchange before its sessions, both ways, modelled from
/// `sync-hub/src/link.rs`'s messages as JSON: `Hello` and `Welcome` each carry 256 registry
/// bucket digests (32 hex digits each), the hub's day public keys for `DAY_KEYS_AHEAD` (42)
/// days and a heads digest per facility; `Entities` and `Done` are small when nothing
/// changed; every exchange dials a new QUIC connection ([`QUIC_CONNECTION_BYTES`]). Both hubs
/// run one every [`LINK_INTERVAL_SECONDS`]. Not measured.
pub fn link_exchange_bytes(facilities: usize) -> u64 {
    let hello = 256 * 35 + 42 * 90 + facilities as u64 * 90 + 200;
    2 * hello + 100 + QUIC_CONNECTION_BYTES
}

/// Hub B, hub A's life, and what the scenario measures.
pub(crate) struct SecondHub {
    /// B's partitions and sync states (its disk).
    pub(crate) store: MemoryStore,
    /// B's own day-key ratchet: no secret is shared with A.
    pub(crate) ratchet: DayKeyRatchet,
    /// B as devices key their sync states with it: apart from A's (two hubs are two peers to
    /// a device, or a device's shared heads with A would keep it from offering B anything).
    pub(crate) peer: Peer,
    pub(crate) refresh: HubRefresh,
    pub(crate) full_until: UnixSeconds,
    /// When hub A is down: `[from, until)`, sorted and apart.
    a_down: Vec<(UnixSeconds, UnixSeconds)>,
    /// A's death at this minute has not struck yet: the first session A takes part in
    /// dies at one of A's commits.
    kill_pending: bool,
    /// A's death planned at this minute struck at the end of the minute before, before that
    /// minute's link round could copy what A took in it.
    struck_early: Option<UnixSeconds>,
    /// Per device: hub B answered it last.
    prefer_b: Vec<bool>,
    /// Per device: A died at this time and the device has not synced since.
    waiting: Vec<Option<UnixSeconds>>,
    failover_seconds: Vec<u64>,
    /// Facilities a device session touched (at either hub) since the last link round.
    dirty: BTreeSet<usize>,
    /// Every facility must be compared at the next link round (A came back).
    compare_all: bool,
    /// Visits a device counted as delivered after a completed session with a hub, with the
    /// partition that holds them.
    hub_acked: BTreeMap<RecordId, PartitionId>,
    pub(crate) figures: FailoverFigures,
    /// The crash A's next kill strikes at, instead of a drawn one (tests).
    #[cfg(test)]
    pinned_crash: Option<Crash>,
}

/// Hub A's down times from `t0` over `days` days: one to three deaths a day lasting 5 minutes
/// to 3 hours, and (from two days on) one lasting 24 to 36 hours; all minute-aligned, apart
/// from each other, and over an hour before the end.
pub(crate) fn plan_deaths(
    rng: &mut ChaCha8Rng,
    t0: UnixSeconds,
    days: u32,
) -> Vec<(UnixSeconds, UnixSeconds)> {
    let end = t0 + u64::from(days) * DAY_SECONDS - 3_600;
    let minute = |t: u64| t - t % TICK;
    let mut all = Vec::new();
    for day in 0..u64::from(days) {
        for _ in 0..rng.gen_range(1..=3) {
            let from = minute(t0 + day * DAY_SECONDS + rng.gen_range(0..DAY_SECONDS));
            let until = minute(from + rng.gen_range(5 * 60..=3 * 3_600));
            all.push((from, until));
        }
    }
    if days >= 2 {
        let latest = end - 25 * 3_600;
        let from = minute(rng.gen_range(t0 + 6 * 3_600..=latest.max(t0 + 6 * 3_600)));
        let until = minute((from + rng.gen_range(24 * 3_600..=36 * 3_600)).min(end));
        all.push((from, until));
    }
    all.sort_unstable();
    let mut merged: Vec<(UnixSeconds, UnixSeconds)> = Vec::new();
    for (from, until) in all {
        let until = until.min(end);
        if from + TICK > until {
            continue;
        }
        match merged.last_mut() {
            // Touching or overlapping: one longer stretch (a hub must be up a minute
            // between two deaths).
            Some(last) if from <= last.1 => last.1 = last.1.max(until),
            _ => merged.push((from, until)),
        }
    }
    merged
}

impl SecondHub {
    pub(crate) fn new(
        ratchet: DayKeyRatchet,
        devices: usize,
        a_down: Vec<(UnixSeconds, UnixSeconds)>,
    ) -> Self {
        let mut figures = FailoverFigures::default();
        for (from, until) in &a_down {
            let hours = (until - from) as f64 / 3_600.0;
            figures.a_down_hours += hours;
            figures.a_longest_down_hours = figures.a_longest_down_hours.max(hours);
        }
        SecondHub {
            store: MemoryStore::new(b"hub-b", None),
            ratchet,
            peer: Peer::Hub {
                region: format!("{REGION}:b"),
            },
            refresh: HubRefresh::default(),
            full_until: 0,
            a_down,
            kill_pending: false,
            struck_early: None,
            prefer_b: vec![false; devices],
            waiting: vec![None; devices],
            failover_seconds: Vec::new(),
            dirty: BTreeSet::new(),
            compare_all: false,
            hub_acked: BTreeMap::new(),
            figures,
            #[cfg(test)]
            pinned_crash: None,
        }
    }

    /// Whether hub A's process runs at `t` (at the minute of its death until the kill
    /// struck).
    fn a_runs(&self, t: UnixSeconds, quiet: bool) -> bool {
        quiet
            || self.kill_pending
            || !self
                .a_down
                .iter()
                .any(|(from, until)| *from <= t && t < *until)
    }
}

/// The session key `key` wrapped to hub A's day key `a` and hub B's `b` of the same day as
/// one age file with two recipients (issue 15: "one age wrap, two recipients"), under one
/// `WrappedKey` entry, so either hub's day secret opens it: the device's own wrap
/// (`SessionKey::wrap_to`).
pub(crate) fn wrap_to_both(
    key: &SessionKey,
    a: &DayPublicKey,
    b: &DayPublicKey,
) -> Result<WrappedKey, String> {
    key.wrap_to(&[a, b]).map_err(|e| e.to_string())
}

/// The responding hub's admission of a link session: `shared::hub::admit_link`, as `sync-hub`
/// admits it (the simulated connection always comes from the paired endpoint).
pub(crate) fn admit_link(hello: &PeerHello, facilities: &[FacilityId]) -> Decision {
    shared::hub::admit_link(hello, true, REGION, |f| Ok(facilities.contains(f)))
}

/// The heads of `store`'s live partitions of `facility`, by day: what the link's facility
/// digest covers.
fn facility_heads(
    store: &MemoryStore,
    facility: &FacilityId,
    h: Day,
) -> Vec<(Day, Vec<automerge::ChangeHash>)> {
    store
        .partitions()
        .filter(|p| &p.id().facility == facility && p.id().day >= h)
        .map(|p| {
            let mut heads = p.heads();
            heads.sort_unstable();
            (p.id().day, heads)
        })
        .collect()
}

/// Record ids `store` holds in live partitions that open with `ratchet`'s day secrets.
fn readable(store: &MemoryStore, ratchet: &DayKeyRatchet, h: Day) -> BTreeSet<RecordId> {
    let mut out = BTreeSet::new();
    for p in store.partitions().filter(|p| p.id().day >= h) {
        let opened = unseal_partition(p, |day| ratchet.secret(day));
        out.extend(opened.records.into_keys());
    }
    out
}

/// Which hub a device dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hub {
    A,
    B,
}

impl World {
    /// Runs `f` with hub B in hub A's place (its store, ratchet, peer, refresh and disk),
    /// so the one-hub code paths (a device's session, retention, the final checks) serve B.
    pub(crate) fn with_hub_b<T>(&mut self, f: impl FnOnce(&mut World) -> T) -> T {
        self.swap_hubs();
        let out = f(self);
        self.swap_hubs();
        out
    }

    fn swap_hubs(&mut self) {
        if let Some(b) = self.second.as_mut() {
            std::mem::swap(&mut self.hub, &mut b.store);
            std::mem::swap(&mut self.ratchet, &mut b.ratchet);
            std::mem::swap(&mut self.hub_peer, &mut b.peer);
            std::mem::swap(&mut self.refresh, &mut b.refresh);
            std::mem::swap(&mut self.hub_full_until, &mut b.full_until);
        }
    }

    /// The session key wrapped as the scenario's devices wrap it: to both hubs' keys of
    /// `public`'s day in `hub-failover` (to A's alone under [`Fault::WrapToOneHub`]), else to
    /// `public` alone.
    pub(crate) fn wrap_session_key(
        second: Option<&SecondHub>,
        fault: Fault,
        key: &SessionKey,
        public: &DayPublicKey,
    ) -> Result<WrappedKey, String> {
        let Some(b) = second.filter(|_| fault != Fault::WrapToOneHub) else {
            return key.wrap(public).map_err(|e| e.to_string());
        };
        let Some(b_public) = b.ratchet.public(public.day) else {
            return Err(format!("hub B has no key of day {}", public.day));
        };
        wrap_to_both(key, public, &b_public)
    }

    /// A device's sync round with the region: the hub that answered last first, then the
    /// other; a dead hub costs a connect timeout. Returns the records that moved.
    pub(crate) fn sync_with_region(&mut self, d: usize, t: UnixSeconds) -> u64 {
        let Some(b) = self.second.as_ref() else {
            return self.sync_with_hub(d, t);
        };
        let order = if b.prefer_b[d] {
            [Hub::B, Hub::A]
        } else {
            [Hub::A, Hub::B]
        };
        let facility = self.devices[d].facility;
        let mut waited = 0u64;
        for hub in order {
            let quiet = self.quiet;
            let Some(b) = self.second.as_mut() else {
                return 0;
            };
            b.dirty.insert(facility);
            if hub == Hub::A && !b.a_runs(t, quiet) {
                b.figures.dead_dials += 1;
                self.summary.wire_bytes += DEAD_DIAL_BYTES;
                waited += DIAL_TIMEOUT_SECONDS;
                continue;
            }
            if hub == Hub::A && b.kill_pending {
                self.forced_plan = Some(Plan {
                    responder: SideFaults {
                        crash: Some(self.draw_crash()),
                        ..SideFaults::default()
                    },
                    ..Plan::default()
                });
            }
            self.dial_delay = waited;
            let round = match hub {
                Hub::A => self.hub_session(d, t),
                Hub::B => self.with_hub_b(|w| w.hub_session(d, t)),
            };
            self.dial_delay = 0;
            self.forced_plan = None;
            let day = Day::of(t).0.saturating_sub(START_DAY.0) as usize;
            let Some(b) = self.second.as_mut() else {
                return 0;
            };
            if hub == Hub::A && b.kill_pending && round.hub_died {
                b.kill_pending = false;
                b.figures.a_kills += 1;
                b.figures.a_killed_in_device_session += 1;
            }
            // (A kill drawn at a commit the session never reached strikes A's next session
            // this minute, or A idle after the link round.)
            bump(&mut b.figures.device_hub_bytes_per_day, day, round.bytes);
            b.figures.device_hub_bytes += round.bytes;
            if round.completed {
                b.prefer_b[d] = hub == Hub::B;
                let died = b.waiting[d].take();
                match hub {
                    Hub::A => b.figures.completed_at_a += 1,
                    Hub::B => {
                        b.figures.completed_at_b += 1;
                        if let Some(died) = died {
                            b.failover_seconds
                                .push(t + waited + round.seconds - died.min(t));
                        }
                    }
                }
                return round.moved;
            }
            // The session broke (A killed in it, or an injected fault): the other hub next,
            // in the same round, once the device saw the connection close.
            waited += round.seconds + DIAL_TIMEOUT_SECONDS;
        }
        0
    }

    /// [`Self::sync_with_region`] with A's pending kill at `crash` (tests).
    #[cfg(test)]
    fn sync_with_region_with_kill(&mut self, d: usize, t: UnixSeconds, crash: Crash) -> u64 {
        if let Some(b) = self.second.as_mut() {
            b.pinned_crash = Some(crash);
        }
        let moved = self.sync_with_region(d, t);
        if let Some(b) = self.second.as_mut() {
            b.pinned_crash = None;
        }
        moved
    }

    fn draw_crash(&mut self) -> Crash {
        #[cfg(test)]
        if let Some(crash) = self.second.as_ref().and_then(|b| b.pinned_crash) {
            return crash;
        }
        Crash {
            at_commit: self.rng.gen_range(0..4),
            after: self.rng.gen_bool(0.5),
        }
    }

    /// Notes, before a completed hub session updates device `d`'s synced counts, every visit
    /// the device now counts as delivered: the records of its live partitions with more
    /// records than it counted.
    pub(crate) fn note_hub_acked(&mut self, d: usize, h: Day, refused: &[Day]) {
        let Some(b) = self.second.as_mut() else {
            return;
        };
        let dev = &self.devices[d];
        for p in dev
            .store
            .partitions()
            .filter(|p| p.id().day >= h && !refused.contains(&p.id().day))
        {
            let synced = dev.synced.get(&p.id().day).copied().unwrap_or(0);
            if p.record_count() as u64 > synced {
                for (rid, _) in p.records() {
                    b.hub_acked.insert(rid, p.id().clone());
                }
            }
        }
    }

    /// The start of a minute: hub A's death strikes at its first session this minute, and a
    /// device that had A as its hub starts waiting to fail over.
    pub(crate) fn failover_minute_starts(&mut self, t: UnixSeconds) {
        let Some(b) = self.second.as_mut() else {
            return;
        };
        if b.a_down.iter().any(|(from, _)| *from == t) {
            b.kill_pending = b.struck_early.take() != Some(t);
            for d in 0..b.prefer_b.len() {
                if !b.prefer_b[d] {
                    b.waiting[d] = Some(t);
                }
            }
        }
    }

    /// The end of a minute: the hub link runs if both hubs do (and A, were it to die this
    /// minute, dies in it or idle after it); when A came back this minute, both hubs must
    /// now hold every visit a device counted as delivered.
    pub(crate) fn failover_minute_ends(&mut self, t: UnixSeconds) {
        let Some(b) = self.second.as_mut() else {
            return;
        };
        let came_back = b.a_down.iter().any(|(_, until)| *until == t);
        if came_back {
            b.compare_all = true;
        }
        let dies_next = b.a_down.iter().any(|(from, _)| *from == t + TICK);
        if dies_next && !self.quiet && self.rng.gen_bool(0.5) {
            // Killed idle before this minute's link round: what devices delivered to A alone
            // in it (the product's window: up to one link interval) is on A's disk and on
            // the devices only, until they sync with B.
            if let Some(b) = self.second.as_mut() {
                b.struck_early = Some(t + TICK);
                b.figures.a_kills += 1;
                b.figures.a_killed_idle += 1;
                b.figures.a_killed_before_link += 1;
            }
        } else {
            self.hub_link(t);
        }
        let Some(b) = self.second.as_mut() else {
            return;
        };
        if b.kill_pending {
            b.kill_pending = false;
            b.figures.a_kills += 1;
            b.figures.a_killed_idle += 1;
        }
        if came_back {
            self.check_held(t, true);
        }
        if t.is_multiple_of(super::HOUR) {
            self.retention_breaches_at_b(t);
        }
    }

    /// Hub B's retention, as the world checks A's every hour: no secret of an expired day,
    /// no expired partition.
    fn retention_breaches_at_b(&mut self, t: UnixSeconds) {
        let h = horizon(t);
        let Some(b) = self.second.as_ref() else {
            return;
        };
        let mut found = Vec::new();
        if b.ratchet.oldest() < h || b.ratchet.secret(h.minus(1)).is_some() {
            found.push(format!(
                "hub B can still derive the day secret of expired day {} at t={t}",
                h.minus(1)
            ));
        }
        for p in b.store.partitions().filter(|p| p.id().day < h) {
            found.push(format!("hub B holds expired partition {} at t={t}", p.id()));
        }
        for f in found {
            self.summary.retention_violations += 1;
            self.summary.violation(f);
        }
    }

    /// One round of the hub link at `t` if both hubs run: a `Peer::HubLink` session for each
    /// facility whose live partitions differ, the hubs dialling in turn. Returns the records
    /// that moved.
    pub(crate) fn hub_link(&mut self, t: UnixSeconds) -> u64 {
        if self.config.fault == Fault::NoHubLink {
            return 0;
        }
        let quiet = self.quiet;
        let nf = self.facilities.len();
        let Some(b) = self.second.as_mut() else {
            return 0;
        };
        if !b.a_runs(t, quiet) {
            return 0;
        }
        let day = Day::of(t).0.saturating_sub(START_DAY.0) as usize;
        // Both hubs dial every interval.
        let exchange = 2 * link_exchange_bytes(nf) * (TICK / LINK_INTERVAL_SECONDS);
        bump(&mut b.figures.link_exchange_bytes_per_day, day, exchange);
        b.figures.link_exchange_bytes += exchange;
        let candidates: Vec<usize> = if b.compare_all {
            (0..nf).collect()
        } else {
            b.dirty.iter().copied().collect()
        };
        b.compare_all = false;
        b.dirty.clear();
        let h = horizon(t);
        let a_dials = (t / TICK).is_multiple_of(2);
        let mut moved = 0;
        for f in candidates {
            let facility = self.facilities[f].clone();
            let Some(b) = self.second.as_mut() else {
                return moved;
            };
            if facility_heads(&self.hub, &facility, h) == facility_heads(&b.store, &facility, h) {
                continue;
            }
            let (a_peer, b_peer) = (self.hub_peer.clone(), b.peer.clone());
            let setup = PairSetup {
                initiator: Peer::HubLink {
                    region: REGION.into(),
                    facility: facility.clone(),
                },
                responder: if a_dials { b_peer } else { a_peer },
                credential: None,
                push_only: false,
            };
            let pending = b.kill_pending;
            let kill = pending.then(|| {
                let side = SideFaults {
                    crash: Some(self.draw_crash()),
                    ..SideFaults::default()
                };
                if a_dials {
                    Plan {
                        initiator: side,
                        ..Plan::default()
                    }
                } else {
                    Plan {
                        responder: side,
                        ..Plan::default()
                    }
                }
            });
            let facilities = &self.facilities;
            let admit = |hello: &PeerHello| admit_link(hello, facilities);
            let Some(b) = self.second.as_mut() else {
                return moved;
            };
            let (init, resp) = if a_dials {
                (&mut self.hub, &mut b.store)
            } else {
                (&mut b.store, &mut self.hub)
            };
            let result: Result<(PairOutcome, bool), String> = match kill {
                None => run_pair(t, &setup, init, resp, admit)
                    .map(|o| (o, false))
                    .map_err(|e| e.to_string()),
                Some(plan) => faulty::run(t, &setup, init, resp, admit, plan)
                    .map(|r| {
                        let died = r.initiator_died || r.responder_died;
                        (r.outcome, died)
                    })
                    .map_err(|e| e.to_string()),
            };
            b.figures.link_sessions += 1;
            let (outcome, a_died) = match result {
                Ok(r) => r,
                Err(e) => {
                    self.summary
                        .violation(format!("hub link session for {facility} at t={t}: {e}"));
                    continue;
                }
            };
            let bytes = outcome.bytes_i_to_r + outcome.bytes_r_to_i;
            bump(&mut b.figures.link_session_bytes_per_day, day, bytes);
            b.figures.link_session_bytes += bytes;
            for (_, event) in &outcome.events {
                if let Event::PartitionUpdated {
                    id, new_records, ..
                } = event
                {
                    moved += new_records;
                    if id.day < h {
                        self.summary.retention_violations += 1;
                        self.summary.violation(format!(
                            "expired partition {id} moved over the hub link at t={t}"
                        ));
                    }
                }
            }
            if a_died {
                b.kill_pending = false;
                b.figures.a_kills += 1;
                b.figures.a_killed_in_link_session += 1;
                // A is dead: the round ends with it.
                return moved;
            }
            if kill.is_some() {
                // A never reached the commit its kill was drawn at: the kill strikes its next
                // session, or A idle after this round.
                continue;
            }
            if !outcome.completed() {
                let last = outcome.events.last().map(|(_, e)| format!("{e:?}"));
                self.summary.violation(format!(
                    "hub link session for {facility} at t={t} did not complete: {}",
                    last.unwrap_or_default()
                ));
            }
        }
        moved
    }

    /// Every visit a device counted as delivered whose day is live must open at a hub that
    /// runs and holds it (`both`: at each of the two hubs).
    pub(crate) fn check_held(&mut self, t: UnixSeconds, both: bool) {
        let quiet = self.quiet;
        let h = horizon(t);
        let Some(b) = self.second.as_ref() else {
            return;
        };
        let a_runs = b.a_runs(t, quiet) || both;
        let at_a = if a_runs {
            readable(&self.hub, &self.ratchet, h)
        } else {
            BTreeSet::new()
        };
        let at_b = readable(&b.store, &b.ratchet, h);
        let mut found = Vec::new();
        let mut checked = 0u64;
        let mut on_devices: Option<BTreeSet<RecordId>> = None;
        let mut device_only = 0u64;
        for (rid, pid) in b.hub_acked.iter().filter(|(_, p)| p.day >= h) {
            checked += 1;
            let (in_a, in_b) = (at_a.contains(rid), at_b.contains(rid));
            let ok = if both { in_a && in_b } else { in_a || in_b };
            if !ok && !both && !a_runs {
                // Delivered to A alone in its last link interval: the device that holds it
                // (it keeps partitions until expiry) delivers it to B at its next sync.
                let held = on_devices.get_or_insert_with(|| {
                    self.devices
                        .iter()
                        .flat_map(|dev| dev.store.partitions())
                        .filter(|p| p.id().day >= h)
                        .flat_map(|p| p.records().into_iter().map(|(r, _)| r))
                        .collect()
                });
                if held.contains(rid) {
                    device_only += 1;
                    continue;
                }
            }
            if !ok {
                found.push(format!(
                    "visit {rid} of {pid}, delivered to a hub, is not readable at {} at t={t} \
                     (hub A {}, B {})",
                    if both {
                        "both hubs after the link ran"
                    } else {
                        "a live hub"
                    },
                    if !a_runs {
                        "down"
                    } else if in_a {
                        "holds it"
                    } else {
                        "lacks it"
                    },
                    if in_b { "holds it" } else { "lacks it" },
                ));
            }
        }
        let Some(b) = self.second.as_mut() else {
            return;
        };
        b.figures.hold_checks += 1;
        b.figures.visits_hold_checked += checked;
        b.figures.held_by_device_only += device_only;
        b.figures.rpo_violations += found.len() as u64;
        for f in found {
            self.summary.violation(f);
        }
    }

    /// Retention at hub B (A's is the world's): its expired secrets and partitions go.
    pub(crate) fn retention_at_b(&mut self, t: UnixSeconds) {
        let h = horizon(t);
        let Some(b) = self.second.as_mut() else {
            return;
        };
        b.ratchet.advance(h);
        let expired: Vec<PartitionId> = b
            .store
            .partitions()
            .filter(|p| p.id().day < h)
            .map(|p| p.id().clone())
            .collect();
        for id in expired {
            b.store.remove(&id);
        }
    }

    /// After the quiet period: both hubs hold every visit a device counted as delivered, and
    /// hub B passes the one-hub final checks too (its violations named as B's); then the
    /// figures.
    pub(crate) fn failover_final(&mut self, t: UnixSeconds) {
        if self.second.is_none() {
            return;
        }
        self.check_held(t, true);
        let a = (
            self.summary.lost,
            self.summary.duplicated,
            self.summary.phantom,
        );
        let before = self.summary.violations.len();
        self.with_hub_b(|w| crate::check::final_checks(w, t));
        for v in self.summary.violations.iter_mut().skip(before) {
            *v = format!("hub B: {v}");
        }
        self.summary.lost += a.0;
        self.summary.duplicated += a.1;
        self.summary.phantom += a.2;
        let days = self.config.scale.days as usize;
        let Some(b) = self.second.as_mut() else {
            return;
        };
        let mut secs = std::mem::take(&mut b.failover_seconds);
        secs.sort_unstable();
        let f = &mut b.figures;
        f.failovers = secs.len() as u64;
        f.failover_p50_s = percentile(&secs, 0.5);
        f.failover_p99_s = percentile(&secs, 0.99);
        f.failover_max_s = secs.last().copied().unwrap_or(0) as f64;
        // One entry per day of visits, and the quiet period's day after them.
        for v in [
            &mut f.link_session_bytes_per_day,
            &mut f.link_exchange_bytes_per_day,
            &mut f.device_hub_bytes_per_day,
        ] {
            v.resize(days + 1, 0);
        }
        self.summary.failover = Some(b.figures.clone());
    }
}

/// Adds `n` to day `day` of `v`, growing it.
fn bump(v: &mut Vec<u64>, day: usize, n: u64) {
    if v.len() <= day {
        v.resize(day + 1, 0);
    }
    v[day] += n;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A key wrapped to both hubs opens with either hub's secret of its day, and with no
    /// other.
    #[test]
    fn a_key_wrapped_to_both_hubs_opens_at_either() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let day = Day(20_000);
        let a = DayKeyRatchet::generate(&mut rng, day);
        let b = DayKeyRatchet::generate(&mut rng, day);
        let c = DayKeyRatchet::generate(&mut rng, day);
        let key = SessionKey::generate(&mut rng, day);
        let (pa, pb) = (a.public(day).unwrap(), b.public(day).unwrap());
        let wrapped = wrap_to_both(&key, &pa, &pb).unwrap();
        assert!(wrapped.to_bytes().len() <= shared::envelope::MAX_WRAPPED_KEY_BYTES);
        for r in [&a, &b] {
            let opened = wrapped.unwrap(&r.secret(day).unwrap()).unwrap();
            assert_eq!(opened.id(), key.id());
        }
        assert!(wrapped.unwrap(&c.secret(day).unwrap()).is_err());
        // Keys of two different days are refused.
        let other = b.public(day.plus(1)).unwrap();
        assert!(wrap_to_both(&key, &pa, &other).is_err());
    }

    /// Deaths are apart, at least a minute long, end before the run does, and one lasts a
    /// day or more.
    #[test]
    fn planned_deaths_are_apart_and_one_is_long() {
        for seed in 0..20 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let t0 = START_DAY.start();
            let plan = plan_deaths(&mut rng, t0, 4);
            assert!(plan.iter().all(|(a, b)| a + TICK <= *b && a % TICK == 0));
            assert!(plan.windows(2).all(|w| w[0].1 < w[1].0), "{plan:?}");
            assert!(plan.last().unwrap().1 < t0 + 4 * DAY_SECONDS);
            assert!(plan.iter().any(|(a, b)| b - a >= DAY_SECONDS), "{plan:?}");
        }
    }

    fn two_hub_world() -> World {
        let mut c = crate::scenario::Config::new(crate::scenario::Scenario::HubFailover, 5);
        c.scale = crate::scenario::Scale {
            facilities: 1,
            devices: 2,
            days: 3,
            visits: 0,
        };
        World::new(c)
    }

    /// A visit at device 0 at `at`, stored unsynced.
    fn visit(w: &mut World, at: UnixSeconds) -> RecordId {
        let mut token = [0u8; 16];
        rand::RngCore::fill_bytes(&mut w.rng, &mut token);
        let text = w.issuer.issue(at, super::super::TOKEN_TTL, token);
        w.scan(0, at, &text).expect("no error").expect("accepted")
    }

    /// Hub A killed in a device's session (at its first commit, before it is durable): the
    /// device fails over to B in the same round, B holds and opens the visit, the kill and
    /// the failover are counted with the failed session's time and a connect timeout; the
    /// next round dials B first and never waits for A.
    #[test]
    fn a_hub_killed_in_a_session_fails_the_device_over_in_the_same_round() {
        let mut w = two_hub_world();
        w.devices[0].drift = 0;
        let t = START_DAY.start() + 12 * 3_600;
        let rid = visit(&mut w, t);
        let b = w.second.as_mut().unwrap();
        b.a_down = vec![(t, t + 3_600)];
        w.failover_minute_starts(t);
        let b = w.second.as_ref().unwrap();
        assert!(b.kill_pending && b.waiting[0] == Some(t) && b.a_runs(t, false));
        // The kill is drawn from the world's stream: pinned here to A's first commit.
        let crash = Crash {
            at_commit: 0,
            after: false,
        };
        w.sync_with_region_with_kill(0, t, crash);
        let b = w.second.as_ref().unwrap();
        let f = &b.figures;
        assert_eq!((f.a_kills, f.a_killed_in_device_session), (1, 1));
        assert_eq!((f.completed_at_a, f.completed_at_b), (0, 1));
        assert!(b.prefer_b[0] && !b.a_runs(t, false));
        assert!(b.hub_acked.contains_key(&rid));
        assert_eq!(b.failover_seconds.len(), 1);
        assert!(b.failover_seconds[0] >= DIAL_TIMEOUT_SECONDS);
        let h = horizon(t);
        assert!(readable(&b.store, &b.ratchet, h).contains(&rid));
        assert!(
            !readable(&w.hub, &w.ratchet, h).contains(&rid),
            "A died before its commit"
        );
        w.check_held(t, false);
        assert!(
            w.summary.violations.is_empty(),
            "{:?}",
            w.summary.violations
        );
        // A is down; the next round goes to B first: no dead dial.
        visit(&mut w, t + 60);
        w.sync_with_region(0, t + 60);
        let f = &w.second.as_ref().unwrap().figures;
        assert_eq!((f.dead_dials, f.completed_at_b), (0, 2));
        // Device 1 still has A first: one dead dial, then B.
        w.sync_with_region(1, t + 120);
        let f = &w.second.as_ref().unwrap().figures;
        assert_eq!((f.dead_dials, f.completed_at_b), (1, 3));
        // A back, the link run: both hubs hold both visits, and nothing else differs.
        w.failover_minute_ends(t + 3_600);
        assert!(
            w.summary.violations.is_empty(),
            "{:?}",
            w.summary.violations
        );
        assert_eq!(w.second.as_ref().unwrap().figures.rpo_violations, 0);
        assert!(readable(&w.hub, &w.ratchet, h).contains(&rid));
        assert_eq!(w.hub_link(t + 3_660), 0);
    }

    /// The link admits the region's other hub for a facility of the region only.
    #[test]
    fn the_link_admits_only_the_paired_hub() {
        let facilities = vec![super::super::facility_id(0)];
        let hello = |peer| PeerHello {
            peer,
            credential: None,
            now: 0,
            refresh_have: None,
            push_only: false,
        };
        let link = |region: &str, f| Peer::HubLink {
            region: region.into(),
            facility: super::super::facility_id(f),
        };
        assert!(matches!(
            admit_link(&hello(link(REGION, 0)), &facilities),
            Decision::Admit { .. }
        ));
        for peer in [
            link(REGION, 1),
            link("elsewhere", 0),
            Peer::Hub {
                region: REGION.into(),
            },
        ] {
            assert!(matches!(
                admit_link(&hello(peer), &facilities),
                Decision::Refuse { .. }
            ));
        }
    }
}
