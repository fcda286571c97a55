//! The regional world and its clock: a hub, facilities of devices, visits, links that come
//! and go, crashes, retention, and real sync sessions between real stores.
//!
//! Time advances in one-minute ticks. Every random decision comes from one seeded ChaCha
//! stream (each device's link flapping from its own stream, so that asking whether a link is
//! up never shifts other decisions). The core is not mocked: visits are genuine KP1 codes
//! verified with `token::verify`, sealed with `SessionKey::seal` under keys wrapped to the
//! hub's `DayKeyRatchet`, stored in automerge partitions, and moved by
//! `sync::harness::run_pair`, which runs both sides' `Session`s over encoded frames. The
//! device's rules are the binary's, from `shared::device`: the scan's verdict with the
//! duplicate-code rule, the day-key fallback and session-key replacement, the retention plan
//! with the clock offset learnt from the hub and the grace day, the retention timer, and the
//! roster admission of sibling sessions; when to sync is `shared::sync::schedule`. The link
//! is modelled at session level: an attempt is either cut before it starts (loss) or runs to
//! its end, possibly twice (duplication).

use crate::check;
use crate::faulty::{self, Crash, Plan, SideFaults};
use crate::refresh::HubRefresh;
use crate::report::{Sample, Summary, percentile};
use crate::scenario::{Config, Scenario};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shared::daykey::DayKeyRatchet;
use shared::device::{
    HeldDay, HeldSession, RETENTION_EVERY_SECS, ScanVerdict, Scanner, SessionPlan, admit_sibling,
    purge_plan, seal_key_day, seen_prune_before, seen_remembered, session_ended, session_plan,
    session_survives_refresh,
};
use shared::envelope::SessionKey;
use shared::partition::{Partition, session_actor};
use shared::sync::harness::{
    MemoryStore, PairFaults, PairOutcome, PairSetup, run_pair, run_pair_with,
};
use shared::sync::schedule::{Schedule, Step};
use shared::sync::{Decision, Event, PartitionStore, Peer, PeerHello, Role};
use shared::ticket::Sibling;
use shared::time::{DAY_SECONDS, horizon};
use shared::token::{self, Keyring, TestIssuer, Verdict};
use shared::{Day, DeviceId, FacilityId, PartitionId, RecordId, UnixSeconds};
use std::collections::{BTreeMap, BTreeSet};

mod failover;
pub use failover::{DEAD_DIAL_BYTES, DIAL_TIMEOUT_SECONDS, link_exchange_bytes};

/// The first simulated day (2024-10-04).
pub const START_DAY: Day = Day(20_000);
/// One tick of the simulated clock.
pub const TICK: u64 = 60;
/// One hour: how often the chart is sampled and the retention checks run.
pub const HOUR: u64 = 3_600;
/// The devices' processes start (and so run their schedule's first round) at random within
/// this many seconds of the start: boot times, not a sync interval (the schedule is the
/// binary's, `shared::sync::schedule`).
pub const START_SPREAD: u64 = 5 * 60;
/// The share of accepted visitors who show the same code again at once (a second tap at the
/// door): the device must refuse it as a duplicate.
const RESCAN: f64 = 0.02;
/// Simulated seconds as the schedule's milliseconds.
fn ms(t: UnixSeconds) -> u64 {
    t.saturating_mul(1_000)
}

/// Days of day public keys a refresh brings.
pub const PUBLIC_KEY_DAYS: u32 = 30;
/// The modelled link rate of a device, bits per second.
pub const LINK_BITS_PER_SECOND: f64 = 1_000_000.0;
/// The modelled time of one flight (a round trip), seconds.
pub const ROUND_TRIP_SECONDS: f64 = 0.05;
/// The issuer's code lifetime, seconds.
const TOKEN_TTL: u8 = 15;

/// How a device reaches the hub.
#[derive(Debug, Clone)]
pub enum Link {
    /// Always reachable.
    AlwaysOn,
    /// A phone hotspot: up and down for exponentially distributed stretches.
    Flapping {
        /// Whether the link is up now.
        up: bool,
        /// When it next changes.
        next_toggle: UnixSeconds,
        /// Mean seconds up.
        up_mean: f64,
        /// Mean seconds down.
        down_mean: f64,
    },
    /// Outdoors: no link for `hours` from `from_hour` (UTC) every day.
    Outdoor {
        /// First dead hour.
        from_hour: u64,
        /// Dead hours.
        hours: u64,
    },
    /// Cut from the hub from `from` until `until` (it can still reach its siblings).
    Outage {
        /// Start.
        from: UnixSeconds,
        /// End.
        until: UnixSeconds,
    },
}

impl Link {
    fn is_up(&mut self, t: UnixSeconds, rng: &mut ChaCha8Rng) -> bool {
        match self {
            Link::AlwaysOn => true,
            Link::Flapping {
                up,
                next_toggle,
                up_mean,
                down_mean,
            } => {
                while *next_toggle <= t {
                    *up = !*up;
                    let mean = if *up { *up_mean } else { *down_mean };
                    let u: f64 = rng.r#gen();
                    *next_toggle += 1 + (-mean * (1.0 - u).ln()) as u64;
                }
                *up
            }
            Link::Outdoor { from_hour, hours } => {
                let hour = (t % DAY_SECONDS) / HOUR;
                !(hour >= *from_hour && hour < *from_hour + *hours)
            }
            Link::Outage { from, until } => !(*from <= t && t < *until),
        }
    }
}

/// One edge device: a durable store, in-memory session keys, a link and a clock.
struct Device {
    id: DeviceId,
    peer: Peer,
    facility: usize,
    /// Its iroh endpoint id stand-in, as siblings' rosters list it.
    endpoint: String,
    store: MemoryStore,
    /// The session key of today, if a record was sealed today: memory only, lost in a crash.
    session: Option<(SessionKey, HeldSession)>,
    /// The first and the last day whose public day key the device holds.
    publics_from: Day,
    publics_until: Day,
    /// The key of its seen-token hashes (durable).
    seen_key: [u8; 32],
    /// The seen-token memory: hash -> remembered until (durable).
    seen: BTreeMap<[u8; 32], UnixSeconds>,
    /// Records of each day known to be at the hub, after the last completed hub session
    /// (durable, as the binary's `counts` table).
    synced: BTreeMap<Day, u64>,
    /// Its clock minus the hub's, as the hub measured at the last completed session (durable).
    clock_offset: Option<i64>,
    link: Link,
    link_rng: ChaCha8Rng,
    /// Seconds this device's clock is ahead of true time.
    drift: i64,
    /// When it syncs: the device's own policy (`shared::sync::schedule`), in milliseconds of
    /// simulated time.
    schedule: Schedule,
    /// Rebooting after a crash until then.
    down_until: UnixSeconds,
    /// Powered off in this window (no visits, no sessions, no retention).
    powered_off: Option<(UnixSeconds, UnixSeconds)>,
    /// Whether the device was off at the previous tick (to lose its keys once).
    was_off: bool,
    /// Its disk is full until then (`--disk-full`): every write is refused.
    disk_full_until: UnixSeconds,
    /// The clock jump in force (`--clock-jumps`), included in `drift`, and when the clock is
    /// set right again.
    jump: i64,
    jump_until: UnixSeconds,
    /// Its clock jumped since the hub last measured its offset: retention corrects it by a
    /// stale offset until the next completed hub session.
    offset_stale: bool,
}

impl Device {
    fn is_on(&self, t: UnixSeconds) -> bool {
        t >= self.down_until && !self.powered_off.is_some_and(|(a, b)| a <= t && t < b)
    }

    fn clock(&self, t: UnixSeconds) -> UnixSeconds {
        t.saturating_add_signed(self.drift)
    }
}

/// One acknowledged visit, as the ledger of the simulation remembers it.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The facility's index.
    pub facility: usize,
    /// The partition it was stored in.
    pub partition: PartitionId,
    /// The visitor's token.
    pub token: [u8; 16],
    /// When the device showed the verdict (true time).
    pub acked_at: UnixSeconds,
}

/// The per-scenario behaviour of links, loss and faults.
#[derive(Debug, Clone)]
struct Params {
    loss: f64,
    duplicate: f64,
    crashes_per_day: f64,
    max_drift: i64,
    hub_outage: Option<(UnixSeconds, UnixSeconds)>,
}

/// The whole simulated region.
pub struct World {
    pub(crate) config: Config,
    params: Params,
    rng: ChaCha8Rng,
    pub(crate) hub: MemoryStore,
    pub(crate) ratchet: DayKeyRatchet,
    hub_peer: Peer,
    pub(crate) facilities: Vec<FacilityId>,
    devices: Vec<Device>,
    issuer: TestIssuer,
    pub(crate) keyring: Keyring,
    pub(crate) ledger: BTreeMap<RecordId, Ack>,
    pub(crate) delivered: BTreeMap<RecordId, UnixSeconds>,
    /// Acknowledged visits not yet at the hub, by partition day (for the backlog).
    pending: BTreeMap<Day, u64>,
    delays: Vec<u64>,
    pub(crate) summary: Summary,
    /// During the final quiet period every link is up and nothing is lost.
    quiet: bool,
    /// The hub's disk is full until then (`--disk-full`).
    hub_full_until: UnixSeconds,
    /// Visits stored by a device killed before it showed the verdict: not acknowledged, so
    /// they need not reach the hub, and are no phantom if they do.
    pub(crate) stored_unacknowledged: BTreeSet<RecordId>,
    /// Acknowledged visits a device's retention dropped, undelivered, while its clock had
    /// jumped forward, as `purge_plan` allows.
    pub(crate) lost_to_clock_jump: BTreeSet<RecordId>,
    /// What the hub's welcome refreshes (for its bytes).
    refresh: HubRefresh,
    /// `hub-failover`'s second hub (B; the fields above are hub A's), hub A's deaths and
    /// the scenario's figures.
    second: Option<failover::SecondHub>,
    /// The faults of the next hub session, set by the caller (a hub killed in it).
    forced_plan: Option<Plan>,
    /// Seconds the device waited before the next hub session (dials of a dead hub).
    dial_delay: u64,
}

/// What one device session with a hub did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HubRound {
    /// Records that moved.
    pub(crate) moved: u64,
    /// Whether both sides completed it (the device counts its days as delivered).
    pub(crate) completed: bool,
    /// Its modelled duration, seconds.
    pub(crate) seconds: u64,
    /// Its bytes, both ways.
    pub(crate) bytes: u64,
    /// The hub's process was killed in it (a forced or injected crash).
    pub(crate) hub_died: bool,
}

/// Admission as the hub decides it (`shared::hub::admit`, the code `sync-hub` runs), over the
/// simulation's registry: every device it creates, `device_id(f, d)`, is enrolled for
/// `facility_id(f)`, which is approved, and bound to its endpoint id (as the hub binds a device
/// at first contact); nobody else is enrolled. The simulated link is the claimed device's own,
/// so the connection comes from the endpoint bound to it. Revocation and first contact are
/// tested in `shared::hub` and through the binaries.
pub fn admit_claimed(hello: &PeerHello) -> Decision {
    use shared::facility::FacilityStatus;
    use shared::hub::{EnrolledDevice, Registry, admit};

    /// The sim's endpoint id of a device.
    fn endpoint(device: &DeviceId) -> String {
        format!("sim-endpoint-{device}")
    }
    /// `f` and `d` of a device the sim creates, from its id.
    fn created(id: &DeviceId) -> Option<(usize, usize)> {
        let (f, d) = id.as_str().strip_prefix("dev-")?.rsplit_once('-')?;
        let (f, d) = (f.parse().ok()?, d.parse().ok()?);
        (device_id(f, d) == *id).then_some((f, d))
    }
    struct Enrolled;
    impl Registry for Enrolled {
        fn device(&self, id: &DeviceId) -> Result<Option<EnrolledDevice>, String> {
            Ok(created(id).map(|(f, _)| EnrolledDevice {
                facility: facility_id(f),
                endpoint: Some(endpoint(id)),
                revoked: false,
            }))
        }
        fn facility_status(&self, id: &FacilityId) -> Result<Option<FacilityStatus>, String> {
            let f = id
                .as_str()
                .strip_prefix("fac-")
                .and_then(|f| f.parse().ok());
            Ok(f.filter(|f| facility_id(*f) == *id)
                .map(|_| FacilityStatus::Approved))
        }
        fn credential_device(&self, _digest: &[u8; 32]) -> Result<Option<DeviceId>, String> {
            // Every device is bound already: no credential is left unused.
            Ok(None)
        }
    }
    let remote = match &hello.peer {
        Peer::Device { device, .. } => endpoint(device),
        Peer::Hub { .. } | Peer::HubLink { .. } => String::new(),
    };
    admit(hello, &remote, &Enrolled).into_decision(None)
}

/// The sim's facility and device names: short, valid ids.
pub fn facility_id(f: usize) -> FacilityId {
    FacilityId::parse(&format!("fac-{f:05}")).unwrap_or_else(|e| unreachable!("{e}"))
}

/// The name of device `d` of facility `f`.
pub fn device_id(f: usize, d: usize) -> DeviceId {
    DeviceId::parse(&format!("dev-{f:05}-{d:02}")).unwrap_or_else(|e| unreachable!("{e}"))
}

/// Seconds a session takes over a device's link: every flight pays a round trip, every byte
/// the link rate.
pub fn session_seconds(outcome: &PairOutcome) -> f64 {
    let bytes = (outcome.bytes_i_to_r + outcome.bytes_r_to_i) as f64;
    f64::from(outcome.rounds) * ROUND_TRIP_SECONDS + bytes * 8.0 / LINK_BITS_PER_SECOND
}

/// Visits per hour (UTC stands in for local time): none before 11:00 or after 23:00, peaks
/// at lunch and dinner.
const HOURLY_WEIGHT: [u32; 24] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 9, 8, 4, 3, 3, 5, 9, 10, 8, 5, 3, 2,
];

impl World {
    /// Builds the region of `config` (not the storm, which has its own driver).
    pub fn new(config: Config) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let t0 = START_DAY.start();
        let end = START_DAY.plus(config.scale.days).start();
        let ratchet = DayKeyRatchet::generate(&mut rng, horizon(t0));
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let issuer = TestIssuer::new(seed, 1, 1);
        let mut keyring = Keyring::new();
        // A fresh keyring cannot already hold this key.
        let _ = keyring.insert(issuer.keyring_entry("sim", 0, u64::MAX));
        let params = match config.scenario {
            Scenario::OutdoorHotspot => Params {
                loss: 0.10,
                duplicate: 0.05,
                crashes_per_day: 0.2,
                max_drift: 8,
                hub_outage: None,
            },
            Scenario::RegionalOutage => Params {
                loss: 0.02,
                duplicate: 0.02,
                crashes_per_day: 0.05,
                max_drift: 8,
                hub_outage: Some((t0 + DAY_SECONDS + 9 * HOUR, t0 + 2 * DAY_SECONDS + 9 * HOUR)),
            },
            Scenario::HubFailover => Params {
                loss: 0.02,
                duplicate: 0.02,
                crashes_per_day: 0.05,
                max_drift: 8,
                hub_outage: None,
            },
            Scenario::LongOffline | Scenario::Storm => Params {
                loss: 0.05,
                duplicate: 0.02,
                crashes_per_day: 0.05,
                max_drift: 8,
                hub_outage: None,
            },
        };
        let nf = config.scale.facilities as usize;
        let nd = config.scale.devices.max(1) as usize;
        let facilities: Vec<FacilityId> = (0..nf).map(facility_id).collect();
        let mut devices = Vec::with_capacity(nf * nd);
        for (f, fac) in facilities.iter().enumerate() {
            for d in 0..nd {
                let id = device_id(f, d);
                let actor = session_actor(&id, &mut rng);
                let link = Self::link_for(&config, f, d, t0, end, &mut rng);
                let mut seen_key = [0u8; 32];
                rng.fill_bytes(&mut seen_key);
                let powered_off = (config.scenario == Scenario::LongOffline && f == 0 && d == 0)
                    .then(|| {
                        let off = t0 + 20 * HOUR;
                        (off, off + 40 * DAY_SECONDS + HOUR / 2)
                    });
                devices.push(Device {
                    peer: Peer::Device {
                        device: id.clone(),
                        facility: fac.clone(),
                    },
                    endpoint: format!("endpoint-of-{id}"),
                    id,
                    facility: f,
                    store: MemoryStore::new(&actor, Some(fac.clone())),
                    session: None,
                    publics_from: Day::of(t0),
                    publics_until: Day::of(t0).plus(PUBLIC_KEY_DAYS),
                    seen_key,
                    seen: BTreeMap::new(),
                    synced: BTreeMap::new(),
                    clock_offset: None,
                    link,
                    link_rng: ChaCha8Rng::seed_from_u64(rng.next_u64()),
                    drift: rng.gen_range(-params.max_drift..=params.max_drift),
                    schedule: Schedule::new(ms(t0 + rng.gen_range(0..START_SPREAD))),
                    down_until: 0,
                    powered_off,
                    was_off: false,
                    disk_full_until: 0,
                    jump: 0,
                    jump_until: 0,
                    offset_stale: false,
                });
            }
        }
        let summary = Summary {
            scenario: config.scenario.name().to_owned(),
            seed: config.seed,
            facilities: config.scale.facilities,
            devices: nd as u32,
            days: config.scale.days,
            ..Default::default()
        };
        let second = (config.scenario == Scenario::HubFailover).then(|| {
            let ratchet = DayKeyRatchet::generate(&mut rng, horizon(t0));
            let deaths = failover::plan_deaths(&mut rng, t0, config.scale.days);
            failover::SecondHub::new(ratchet, devices.len(), deaths)
        });
        World {
            config,
            params,
            rng,
            hub: MemoryStore::new(b"hub", None),
            ratchet,
            hub_peer: Peer::Hub {
                region: "sim".into(),
            },
            facilities,
            devices,
            issuer,
            keyring,
            ledger: BTreeMap::new(),
            delivered: BTreeMap::new(),
            pending: BTreeMap::new(),
            delays: Vec::new(),
            summary,
            quiet: false,
            hub_full_until: 0,
            stored_unacknowledged: BTreeSet::new(),
            lost_to_clock_jump: BTreeSet::new(),
            refresh: HubRefresh::default(),
            second,
            forced_plan: None,
            dial_delay: 0,
        }
    }

    fn link_for(
        config: &Config,
        f: usize,
        d: usize,
        t0: UnixSeconds,
        end: UnixSeconds,
        rng: &mut ChaCha8Rng,
    ) -> Link {
        let flapping = |rng: &mut ChaCha8Rng| Link::Flapping {
            up: true,
            next_toggle: t0 + rng.gen_range(60..600),
            up_mean: 6.0 * 60.0,
            down_mean: 3.0 * 60.0,
        };
        match config.scenario {
            Scenario::OutdoorHotspot => match (f + d) % 3 {
                0 => flapping(rng),
                1 => Link::Outdoor {
                    from_hour: rng.gen_range(12..16),
                    hours: rng.gen_range(3..7),
                },
                _ => Link::AlwaysOn,
            },
            Scenario::RegionalOutage | Scenario::HubFailover => {
                if (f + d) % 4 == 3 {
                    flapping(rng)
                } else {
                    Link::AlwaysOn
                }
            }
            Scenario::LongOffline => {
                if f == 1.min(config.scale.facilities as usize - 1) && d == 1 {
                    let from = t0 + 2 * DAY_SECONDS + 8 * HOUR;
                    Link::Outage {
                        from,
                        until: (from + 3 * DAY_SECONDS).min(end),
                    }
                } else if d == 2 {
                    flapping(rng)
                } else {
                    Link::AlwaysOn
                }
            }
            Scenario::Storm => Link::AlwaysOn,
        }
    }

    /// Runs the whole scenario: `days` of visits, a quiet period in which every device syncs
    /// until nothing moves, then the invariant checks. `progress(done, total)` is called
    /// every simulated hour.
    pub fn run(mut self, progress: &mut dyn FnMut(u64, u64)) -> Summary {
        let t0 = START_DAY.start();
        let days = self.config.scale.days;
        let total_hours = u64::from(days) * 24;
        let mut visits: Vec<(UnixSeconds, usize)> = Vec::new();
        let mut next_visit = 0usize;
        let end = START_DAY.plus(days).start();
        let mut t = t0;
        while t < end {
            if t.is_multiple_of(DAY_SECONDS) {
                if t > t0 {
                    self.check_held(t, false);
                }
                visits = self.plan_visits(Day::of(t));
                next_visit = 0;
            }
            if t.is_multiple_of(RETENTION_EVERY_SECS) {
                self.retention(t);
            }
            if t.is_multiple_of(HOUR) {
                check::retention_during_run(&mut self, t);
                self.sample(t);
                self.hourly_faults(t);
                progress((t - t0) / HOUR, total_hours);
            }
            self.power_and_crashes(t);
            self.failover_minute_starts(t);
            // Visits of the minute before `t`, then the sync timers at `t`.
            while let Some(&(vt, f)) = visits.get(next_visit) {
                if vt >= t {
                    break;
                }
                next_visit += 1;
                if let Err(e) = self.visit(vt, f) {
                    self.summary
                        .violation(format!("recording a visit failed: {e}"));
                }
            }
            for d in 0..self.devices.len() {
                self.maybe_sync(d, t);
            }
            self.failover_minute_ends(t);
            t += TICK;
        }
        self.quiet_period(end + HOUR);
        progress(total_hours, total_hours);
        let final_t = end + 2 * HOUR;
        check::apply_fault(&mut self, final_t);
        check::final_checks(&mut self, final_t);
        self.failover_final(final_t);
        self.finish()
    }

    /// Visit times of one day for every facility, in time order.
    fn plan_visits(&mut self, day: Day) -> Vec<(UnixSeconds, usize)> {
        let total_weight: u32 = HOURLY_WEIGHT.iter().sum();
        let mut out = Vec::new();
        for f in 0..self.facilities.len() {
            let base = self.config.scale.visits;
            // +-20% day to day.
            let n = if base == 0 {
                0
            } else {
                self.rng.gen_range(base * 4 / 5..=base * 6 / 5)
            };
            for _ in 0..n {
                let mut pick = self.rng.gen_range(0..total_weight);
                let mut hour = 0u64;
                for (h, w) in HOURLY_WEIGHT.iter().enumerate() {
                    if pick < *w {
                        hour = h as u64;
                        break;
                    }
                    pick -= w;
                }
                let at = day.start() + hour * HOUR + self.rng.gen_range(0..HOUR);
                out.push((at, f));
            }
        }
        out.sort_unstable();
        out
    }

    /// Power cuts of the scenario and random crashes: a crash loses the session keys and the
    /// automerge actor of the running process; the store (durable) survives.
    fn power_and_crashes(&mut self, t: UnixSeconds) {
        let p = self.params.crashes_per_day * TICK as f64 / DAY_SECONDS as f64;
        let peers = self.peers();
        for d in 0..self.devices.len() {
            let off = !self.devices[d].is_on(t);
            let crash = !off && !self.quiet && self.rng.gen_bool(p);
            let went_off = off && !self.devices[d].was_off;
            self.devices[d].was_off = off;
            if crash || went_off {
                if crash {
                    self.summary.crashes += 1;
                    self.devices[d].down_until = t + self.rng.gen_range(60..600);
                }
                if let Err(e) = self.restart(d, &peers) {
                    self.summary.violation(e);
                }
                // A new process starts with a new schedule: a first round as soon as it runs.
                let dev = &mut self.devices[d];
                let starts = dev.down_until.max(t);
                dev.schedule = Schedule::new(ms(starts));
            }
        }
    }

    /// Device `d` starts a new process (as each one-shot command of the binary does): see
    /// [`Self::restart`].
    pub(crate) fn new_process(&mut self, d: usize) -> Result<(), String> {
        let peers = self.peers();
        self.restart(d, &peers)
    }

    /// Every peer a device may hold sync states for: the hub (both hubs in `hub-failover`)
    /// and the devices.
    fn peers(&self) -> Vec<Peer> {
        std::iter::once(self.hub_peer.clone())
            .chain(self.second.as_ref().map(|b| b.peer.clone()))
            .chain(self.devices.iter().map(|d| d.peer.clone()))
            .collect()
    }

    /// A new process on the same disk: keys gone, a fresh actor, partitions and sync states
    /// reloaded from what storage holds.
    fn restart(&mut self, d: usize, peers: &[Peer]) -> Result<(), String> {
        let dev = &mut self.devices[d];
        // `SessionKey` is memory only; the seen memory, synced counts and offset are stored.
        dev.session = None;
        let actor = session_actor(&dev.id, &mut self.rng);
        let mut old = std::mem::take(&mut dev.store);
        let mut fresh = MemoryStore::new(&actor, Some(self.facilities[dev.facility].clone()));
        let ids: Vec<PartitionId> = old.partitions().map(|p| p.id().clone()).collect();
        for id in ids {
            let Some(mut p) = old.remove(&id) else {
                continue;
            };
            let bytes = p.save();
            let loaded = Partition::load(id.clone(), &bytes, &actor)
                .map_err(|e| format!("reloading {id} after a crash failed: {e}"))?;
            fresh.insert(loaded);
            for peer in peers {
                if let Ok(Some(state)) = old.sync_state(peer, &id) {
                    fresh
                        .put_sync_state(peer, &id, &state)
                        .map_err(|e| format!("restoring a sync state failed: {e}"))?;
                }
            }
        }
        dev.store = fresh;
        Ok(())
    }

    /// One visit at facility `f`: a device that is running scans a genuine code, verifies it
    /// with its clock, seals and stores the record. Only then is the visit acknowledged.
    fn visit(&mut self, t: UnixSeconds, f: usize) -> Result<(), String> {
        self.summary.visits += 1;
        let nd = self.config.scale.devices.max(1) as usize;
        let on: Vec<usize> = (f * nd..(f + 1) * nd)
            .filter(|&d| self.devices[d].is_on(t))
            .collect();
        if on.is_empty() {
            self.summary.unrecorded += 1;
            return Ok(());
        }
        let d = on[self.rng.gen_range(0..on.len())];
        if self.devices[d].disk_full_until > t {
            // The record cannot be stored: the device shows a refusal, nothing is kept.
            self.summary.disk_full_refusals += 1;
            self.summary.refused_at_scan += 1;
            return Ok(());
        }
        let crash = self.draw(self.config.crash_faults_per_mille);
        let mut token = [0u8; 16];
        self.rng.fill_bytes(&mut token);
        let issued_at = t.saturating_sub(self.rng.gen_range(0..5));
        let text = self.issuer.issue(issued_at, TOKEN_TTL, token);
        let dev = &mut self.devices[d];
        let now = dev.clock(t);
        let pid = PartitionId {
            facility: self.facilities[f].clone(),
            day: Day::of(now),
        };
        if crash {
            // Killed just before the record's commit (nothing stored) or just after it
            // (stored, the verdict never shown): either way not acknowledged.
            self.summary.crash_faults += 1;
            self.summary.unrecorded += 1;
            if self.rng.gen_bool(0.5)
                && let Some(rid) = self.scan(d, now, &text)?
            {
                self.stored_unacknowledged.insert(rid);
                self.summary.stored_unacknowledged += 1;
            }
            self.kill_device(d, t);
            return Ok(());
        }
        let Some(rid) = self.scan(d, now, &text)? else {
            self.summary.refused_at_scan += 1;
            return Ok(());
        };
        self.devices[d].schedule.changed(ms(t));
        *self.pending.entry(pid.day).or_default() += 1;
        self.ledger.insert(
            rid,
            Ack {
                facility: f,
                partition: pid,
                token,
                acked_at: t,
            },
        );
        self.summary.acknowledged += 1;
        if self.rng.gen_bool(RESCAN) {
            let again = self.devices[d].clock(t + 2);
            if self.scan(d, again, &text)?.is_some() {
                self.summary
                    .violation(format!("a code shown twice was accepted twice at t={t}"));
            }
        }
        Ok(())
    }

    /// Device `d` scans `text` at its clock's `now`, as `Device::check_in` does: the verdict
    /// and the duplicate rule from `shared::device`, the session key of the day (the fallback
    /// key when it ran out of day keys), then the record sealed and stored with its seen entry.
    /// The stored record's id, or `None` for a refusal.
    pub(crate) fn scan(
        &mut self,
        d: usize,
        now: UnixSeconds,
        text: &str,
    ) -> Result<Option<RecordId>, String> {
        let dev = &mut self.devices[d];
        let facility = self.facilities[dev.facility].clone();
        let scanner = Scanner {
            keyring: &self.keyring,
            skew: token::DEFAULT_SKEW,
            seen_key: &dev.seen_key,
            facility: &facility,
            device: &dev.id,
        };
        let seen = &dev.seen;
        let verdict = scanner.scan(now, text, |hash| {
            Ok::<_, String>(seen.get(hash).is_some_and(|u| seen_remembered(*u, now)))
        })?;
        let (record, entry) = match verdict {
            ScanVerdict::Refuse(Verdict::Accepted) => return Err("a refusal that accepts".into()),
            ScanVerdict::Refuse(_) => return Ok(None),
            ScanVerdict::Accept { record, seen } => (record, seen),
        };
        let pid = PartitionId {
            facility,
            day: Day::of(now),
        };
        if dev
            .session
            .as_ref()
            .is_some_and(|(_, h)| session_ended(*h, now))
        {
            dev.session = None;
        }
        let held = dev.session.as_ref().map(|(_, h)| *h);
        if let SessionPlan::Fresh { .. } = session_plan(held, pid.day, now) {
            let days = (dev.publics_from.0..=dev.publics_until.0).map(Day);
            let Some(public) =
                seal_key_day(days, pid.day, now).and_then(|k| self.ratchet.public(k))
            else {
                return Ok(None);
            };
            let key = SessionKey::generate(&mut self.rng, pid.day);
            let wrapped =
                Self::wrap_session_key(self.second.as_ref(), self.config.fault, &key, &public)?;
            dev.store
                .get_or_create(&pid)
                .insert_wrapped_key(&wrapped)
                .map_err(|e| e.to_string())?;
            let held = HeldSession {
                day: pid.day,
                key_day: public.day,
            };
            // Scans are of today: the new key is today's and kept.
            dev.session = Some((key, held));
        }
        let (key, _) = dev
            .session
            .as_ref()
            .ok_or("the session key just made is missing")?;
        let rid = RecordId::random(&mut self.rng);
        let envelope = key
            .seal(&mut self.rng, &pid, rid, &record)
            .map_err(|e| e.to_string())?;
        dev.store
            .get_or_create(&pid)
            .insert_record(rid, &envelope)
            .map_err(|e| e.to_string())?;
        let prune = seen_prune_before(now, token::DEFAULT_SKEW);
        dev.seen.retain(|_, until| *until >= prune);
        dev.seen.insert(entry.hash, entry.until);
        Ok(Some(rid))
    }

    fn hub_up(&self, t: UnixSeconds) -> bool {
        self.quiet || !self.params.hub_outage.is_some_and(|(a, b)| a <= t && t < b)
    }

    fn reaches_hub(&mut self, d: usize, t: UnixSeconds) -> bool {
        if !self.hub_up(t) || !self.devices[d].is_on(t) {
            return false;
        }
        let dev = &mut self.devices[d];
        let up = dev.link.is_up(t, &mut dev.link_rng);
        self.quiet || up
    }

    /// A device's sync timer: to the hub if it can reach it, else to a sibling that can
    /// (relay), with backoff after cut attempts.
    fn maybe_sync(&mut self, d: usize, t: UnixSeconds) {
        let dev = &self.devices[d];
        if dev.schedule.next(ms(t)) != Step::SyncHub || !dev.is_on(t) {
            return;
        }
        let ticket = dev.schedule.begin();
        if self.reaches_hub(d, t) {
            if self.rng.gen_bool(self.params.loss) {
                self.summary.failed_attempts += 1;
                let jitter = self.rng.gen_range(0.5..=1.0);
                self.devices[d]
                    .schedule
                    .hub_done(ticket, ms(t), false, jitter);
                return;
            }
            self.sync_with_region(d, t);
            if self.rng.gen_bool(self.params.duplicate) {
                self.summary.duplicated_sessions += 1;
                self.sync_with_region(d, t);
            }
            return;
        }
        let jitter = self.rng.gen_range(0.5..=1.0);
        self.devices[d]
            .schedule
            .hub_done(ticket, ms(t), false, jitter);
        if !self.devices[d].schedule.wants_relay() {
            return;
        }
        let nd = self.config.scale.devices.max(1) as usize;
        let f = self.devices[d].facility;
        let sibling = (f * nd..(f + 1) * nd).find(|&s| s != d && self.reaches_hub(s, t));
        if let Some(s) = sibling {
            if self.rng.gen_bool(self.params.loss) {
                self.summary.failed_attempts += 1;
                return;
            }
            let ok = self.relay(d, s, t);
            if self.rng.gen_bool(self.params.duplicate) {
                self.summary.duplicated_sessions += 1;
                self.relay(d, s, t);
            }
            self.devices[d].schedule.relay_done(ticket, ok);
        }
    }

    /// Runs one real session between device `d` and the hub; returns the records that moved.
    pub(crate) fn sync_with_hub(&mut self, d: usize, t: UnixSeconds) -> u64 {
        self.hub_session(d, t).moved
    }

    /// Runs one real session between device `d` and the hub: what it did.
    pub(crate) fn hub_session(&mut self, d: usize, t: UnixSeconds) -> HubRound {
        let setup = PairSetup {
            initiator: self.devices[d].peer.clone(),
            responder: self.hub_peer.clone(),
            credential: None,
            push_only: true,
        };
        let ticket = self.devices[d].schedule.begin();
        let faults = self.storage_faults(t);
        let dev = &self.devices[d];
        let refresh = self.refresh.for_session(
            &self.ratchet,
            dev.facility,
            &dev.id,
            Day::of(t),
            dev.publics_until,
            PUBLIC_KEY_DAYS,
        );
        let admit = |hello: &PeerHello| match admit_claimed(hello) {
            Decision::Admit { facility, .. } => Decision::Admit {
                facility,
                refresh: refresh.clone(),
            },
            refused => refused,
        };
        let full = (self.devices[d].disk_full_until > t, self.hub_full_until > t);
        let plan = match self.forced_plan.take() {
            Some(forced) => Some(forced),
            None => self.session_faults(faults, full),
        };
        let mut died = (false, false);
        let result = match plan {
            None => run_pair_with(
                t,
                &setup,
                &mut self.devices[d].store,
                &mut self.hub,
                admit,
                faults,
            ),
            Some(plan) => {
                let r = faulty::run(
                    t,
                    &setup,
                    &mut self.devices[d].store,
                    &mut self.hub,
                    admit,
                    plan,
                );
                self.faulty_ran(r, &mut died)
            }
        };
        let faulted = faults != PairFaults::default() || plan.is_some();
        let outcome = self.account_with(&setup, t, result, faulted);
        if died.0 {
            self.kill_device(d, t);
        }
        let Some(outcome) = outcome else {
            let jitter = self.rng.gen_range(0.5..=1.0);
            self.devices[d]
                .schedule
                .hub_done(ticket, ms(t), false, jitter);
            return HubRound {
                hub_died: died.1,
                ..HubRound::default()
            };
        };
        let seconds = session_seconds(&outcome).ceil() as u64;
        let arrive = t + self.dial_delay + seconds;
        let mut moved = 0;
        for (role, event) in &outcome.events {
            if let Event::PartitionUpdated {
                id, new_records, ..
            } = event
            {
                moved += new_records;
                if *role == Role::Responder && *new_records > 0 {
                    self.mark_delivered(id, arrive);
                }
            }
        }
        // As the edge's shell: a day whose partition was refused was not delivered.
        let refused: Vec<Day> = outcome
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::PartitionRefused { partition, .. } => Some(partition.day),
                _ => None,
            })
            .collect();
        if outcome.completed() {
            let dev = &self.devices[d];
            self.refresh
                .completed(dev.facility, &dev.id, &dev.endpoint, d);
            let h = horizon(dev.clock(t));
            self.note_hub_acked(d, h, &refused);
        }
        let dev = &mut self.devices[d];
        if outcome.completed() {
            // As `Device::mark_synced_with_hub` and `apply_refresh`: the hub holds every
            // record of every live partition, the offset it measured, fresh day keys, and a
            // session key wrapped to a fallback key is dropped.
            let h = horizon(dev.clock(t));
            for p in dev
                .store
                .partitions()
                .filter(|p| p.id().day >= h && !refused.contains(&p.id().day))
            {
                dev.synced.insert(p.id().day, p.record_count() as u64);
            }
            dev.clock_offset = Some(dev.drift);
            dev.offset_stale = false;
            dev.publics_until = Day::of(t).plus(PUBLIC_KEY_DAYS);
            if dev
                .session
                .as_ref()
                .is_some_and(|(_, h)| !session_survives_refresh(*h))
            {
                dev.session = None;
            }
        }
        dev.schedule
            .hub_done(ticket, ms(t), outcome.completed(), 1.0);
        HubRound {
            moved,
            completed: outcome.completed(),
            seconds,
            bytes: outcome.bytes_i_to_r + outcome.bytes_r_to_i,
            hub_died: died.1,
        }
    }

    /// Device `d` hands its partitions to sibling `s`, which can reach the hub.
    /// Whether the sibling took them (the session completed).
    pub(crate) fn relay(&mut self, d: usize, s: usize, t: UnixSeconds) -> bool {
        let setup = PairSetup {
            initiator: self.devices[d].peer.clone(),
            responder: self.devices[s].peer.clone(),
            credential: None,
            push_only: true,
        };
        let own = self.facilities[self.devices[s].facility].clone();
        let roster = self.roster_of(s);
        let caller = self.devices[d].endpoint.clone();
        let admit = |hello: &PeerHello| admit_sibling(&own, &roster, &[], None, &caller, hello);
        let mut sibling = std::mem::take(&mut self.devices[s].store);
        let full = (
            self.devices[d].disk_full_until > t,
            self.devices[s].disk_full_until > t,
        );
        let plan = self.session_faults(PairFaults::default(), full);
        let mut died = (false, false);
        let result = match plan {
            None => run_pair(t, &setup, &mut self.devices[d].store, &mut sibling, admit),
            Some(plan) => {
                let r = faulty::run(
                    t,
                    &setup,
                    &mut self.devices[d].store,
                    &mut sibling,
                    admit,
                    plan,
                );
                self.faulty_ran(r, &mut died)
            }
        };
        self.devices[s].store = sibling;
        self.summary.relay_sessions += 1;
        let outcome = self.account_with(&setup, t, result, plan.is_some());
        if died.0 {
            self.kill_device(d, t);
        }
        if died.1 {
            self.kill_device(s, t);
        }
        let Some(outcome) = outcome else {
            return false;
        };
        if outcome.new_records(Role::Responder) > 0 {
            self.devices[s].schedule.changed(ms(t));
        }
        outcome.completed()
    }

    /// The hub's roster for device `s`: the other devices of its facility.
    fn roster_of(&self, s: usize) -> Vec<Sibling> {
        let f = self.devices[s].facility;
        self.devices
            .iter()
            .enumerate()
            .filter(|(i, dev)| *i != s && dev.facility == f)
            .map(|(_, dev)| Sibling {
                device_id: dev.id.clone(),
                name: dev.id.to_string(),
                endpoint_id: dev.endpoint.clone(),
                addrs: Vec::new(),
            })
            .collect()
    }

    /// Counts a session's bytes and checks what honest peers must never see: errors,
    /// refusals, and partitions past the horizon moving.
    /// The storage faults of the next hub session: none, or (with `--store-faults`' chance)
    /// one effect that fails, drawn from the world's seeded stream.
    fn storage_faults(&mut self, t: UnixSeconds) -> PairFaults {
        let per_mille = self.config.store_faults_per_mille.min(1000);
        if per_mille == 0 || self.quiet || !self.hub_up(t) {
            return PairFaults::default();
        }
        if !self.rng.gen_bool(f64::from(per_mille) / 1000.0) {
            return PairFaults::default();
        }
        self.summary.store_faults += 1;
        let nth = self.rng.gen_range(0..3u32);
        let mut faults = PairFaults::default();
        match self.rng.gen_range(0..4u8) {
            0 => faults.responder.fail_persist = Some(nth),
            1 => faults.responder.fail_sync_state = Some(nth),
            2 => faults.responder.quota_persist = Some(nth),
            _ => faults.initiator.fail_sync_state = Some(nth),
        }
        faults
    }

    /// One draw with a chance in thousandths; no draw at all (so the stream of decisions is
    /// the one of a run without the fault) when the chance is 0 or in the quiet period.
    fn draw(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && !self.quiet && self.rng.gen_bool(f64::from(per_mille.min(1000)) / 1000.0)
    }

    /// The faults of the next session for the simulation's faulty shell, or `None` when no
    /// fault kind beyond `--store-faults` is on (the session then runs on the harness as it
    /// always did). `writes` are the storage faults drawn already, `full` whether the
    /// initiator's and the responder's disks are full.
    fn session_faults(&mut self, writes: PairFaults, full: (bool, bool)) -> Option<Plan> {
        if !self.config.injects_faults() || self.quiet {
            return None;
        }
        let mut plan = Plan {
            initiator: SideFaults {
                writes: writes.initiator,
                crash: None,
                disk_full: full.0,
            },
            responder: SideFaults {
                writes: writes.responder,
                crash: None,
                disk_full: full.1,
            },
            tear: None,
        };
        if self.draw(self.config.crash_faults_per_mille) {
            let crash = Some(Crash {
                at_commit: self.rng.gen_range(0..4),
                after: self.rng.gen_bool(0.5),
            });
            if self.rng.gen_bool(0.5) {
                plan.initiator.crash = crash;
            } else {
                plan.responder.crash = crash;
            }
        }
        if self.draw(self.config.torn_sessions_per_mille) {
            let side = if self.rng.gen_bool(0.5) {
                Role::Initiator
            } else {
                Role::Responder
            };
            plan.tear = Some((self.rng.gen_range(0..12), side));
        }
        Some(plan)
    }

    /// Counts what a faulty session injected; `died` gets which sides were killed.
    fn faulty_ran(
        &mut self,
        run: Result<faulty::Run, shared::sync::harness::HarnessError>,
        died: &mut (bool, bool),
    ) -> Result<PairOutcome, shared::sync::harness::HarnessError> {
        let run = run?;
        *died = (run.initiator_died, run.responder_died);
        self.summary.crash_faults += u64::from(run.initiator_died) + u64::from(run.responder_died);
        self.summary.torn_sessions += u64::from(run.torn);
        self.summary.disk_full_refusals += run.disk_full_refusals;
        if let Some(e) = run.revert_error {
            self.summary.violation(e);
        }
        Ok(run.outcome)
    }

    /// Device `d`'s process is killed at `t` (a fault at a commit): it reboots within
    /// minutes from what its disk holds, as after a crash.
    fn kill_device(&mut self, d: usize, t: UnixSeconds) {
        let peers = self.peers();
        self.devices[d].down_until = t + self.rng.gen_range(60..600);
        self.devices[d].was_off = true;
        if let Err(e) = self.restart(d, &peers) {
            self.summary.violation(e);
        }
        let dev = &mut self.devices[d];
        dev.schedule = Schedule::new(ms(dev.down_until));
    }

    /// The hourly faults: disks that fill up (devices and the hub) and device clocks that
    /// jump, or are set right again after a jump.
    fn hourly_faults(&mut self, t: UnixSeconds) {
        if !self.config.injects_faults() || self.quiet {
            return;
        }
        let disk = self.config.disk_full_per_mille;
        let jumps = self.config.clock_jumps_per_mille;
        for d in 0..self.devices.len() {
            if self.devices[d].disk_full_until <= t && self.draw(disk) {
                self.devices[d].disk_full_until = t + self.rng.gen_range(10 * 60..=6 * HOUR);
                self.summary.disk_full_faults += 1;
            }
            let dev = &mut self.devices[d];
            if dev.jump != 0 && dev.jump_until <= t {
                dev.drift -= dev.jump;
                dev.jump = 0;
                dev.offset_stale = true;
            }
            if self.devices[d].jump == 0 && self.draw(jumps) {
                let size = self.rng.gen_range(5 * 60..=3 * DAY_SECONDS) as i64;
                let jump = if self.rng.gen_bool(0.5) { size } else { -size };
                let until = t + self.rng.gen_range(HOUR..=2 * DAY_SECONDS);
                let dev = &mut self.devices[d];
                dev.jump = jump;
                dev.drift += jump;
                dev.jump_until = until;
                dev.offset_stale = true;
                self.summary.clock_jumps += 1;
            }
        }
        if self.hub_full_until <= t && self.draw(disk) {
            self.hub_full_until = t + self.rng.gen_range(10 * 60..=6 * HOUR);
            self.summary.disk_full_faults += 1;
        }
    }

    /// How far behind true time device `id`'s retention may legitimately run: its clock as
    /// corrected by a stale offset (it jumped since the hub measured it), else 0.
    pub(crate) fn device_clock_lag(&self, id: &DeviceId, t: UnixSeconds) -> u64 {
        self.devices
            .iter()
            .find(|d| &d.id == id)
            .filter(|d| d.offset_stale)
            .map_or(0, |d| {
                let corrected = d
                    .clock(t)
                    .saturating_add_signed(d.clock_offset.unwrap_or(0).saturating_neg());
                t.saturating_sub(corrected)
            })
    }

    /// As [`Self::account`]; a session with an injected storage fault may end refused (that
    /// is the driver's answer to the fault), so only a harness error is a violation then.
    fn account_with(
        &mut self,
        setup: &PairSetup,
        t: UnixSeconds,
        result: Result<PairOutcome, shared::sync::harness::HarnessError>,
        faulted: bool,
    ) -> Option<PairOutcome> {
        self.summary.sessions += 1;
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                self.summary.violation(format!(
                    "session {} -> {} at t={t} failed: {e}",
                    setup.initiator, setup.responder
                ));
                return None;
            }
        };
        self.summary.wire_bytes += outcome.bytes_i_to_r + outcome.bytes_r_to_i;
        if matches!(setup.responder, Peer::Hub { .. }) {
            self.summary.upload_bytes += outcome.bytes_i_to_r;
        }
        if !outcome.completed() && !faulted {
            let last = outcome.events.last().map(|(_, e)| format!("{e:?}"));
            self.summary.violation(format!(
                "session {} -> {} at t={t} did not complete: {}",
                setup.initiator,
                setup.responder,
                last.unwrap_or_default()
            ));
        }
        let h = horizon(t);
        for (_, event) in &outcome.events {
            if let Event::PartitionUpdated { id, .. } = event
                && id.day < h
            {
                self.summary.retention_violations += 1;
                self.summary.violation(format!(
                    "expired partition {id} moved in session {} -> {} at t={t}",
                    setup.initiator, setup.responder
                ));
            }
        }
        Some(outcome)
    }

    /// Records every ledger visit of hub partition `id` seen for the first time.
    fn mark_delivered(&mut self, id: &PartitionId, at: UnixSeconds) {
        let Some(p) = self.hub.get(id) else {
            return;
        };
        for (rid, _) in p.records() {
            let Some(ack) = self.ledger.get(&rid) else {
                continue;
            };
            if self.delivered.contains_key(&rid) {
                continue;
            }
            self.delivered.insert(rid, at);
            self.delays.push(at.saturating_sub(ack.acked_at));
            if let Some(n) = self.pending.get_mut(&ack.partition.day) {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// Retention at `t`: the hub destroys expired day secrets and drops expired partitions;
    /// every running device drops partitions past the horizon of its own clock.
    pub(crate) fn retention(&mut self, t: UnixSeconds) {
        self.retention_at_b(t);
        let h = horizon(t);
        self.ratchet.advance(h);
        let expired: Vec<PartitionId> = self
            .hub
            .partitions()
            .filter(|p| p.id().day < h)
            .map(|p| p.id().clone())
            .collect();
        for id in expired {
            self.hub.remove(&id);
        }
        for dev in &mut self.devices {
            if !dev.is_on(t) {
                continue;
            }
            // `Device::purge`: the plan from the device's clock, the offset the hub measured
            // and each day's stored and synced counts.
            let days: Vec<HeldDay> = dev
                .store
                .partitions()
                .map(|p| HeldDay {
                    day: p.id().day,
                    total: p.record_count() as u64,
                    synced: dev.synced.get(&p.id().day).copied().unwrap_or(0),
                })
                .collect();
            let plan = purge_plan(dev.clock(t), dev.clock_offset, None, days);
            for day in &plan.dropped {
                let id = PartitionId {
                    facility: self.facilities[dev.facility].clone(),
                    day: *day,
                };
                if let Some(p) = dev.store.remove(&id) {
                    // An acknowledged visit of a day the hub still keeps, not at the hub:
                    // only a clock that jumped forward since the hub measured it may cause
                    // that, and only past the grace day the rule keeps for a day the hub
                    // may lack (a day counted as synced must be at the hub).
                    let allowed =
                        dev.offset_stale && plan.as_of > t && *day < plan.horizon.minus(1);
                    for (rid, _) in p.records() {
                        if *day < h
                            || !self.ledger.contains_key(&rid)
                            || self.delivered.contains_key(&rid)
                        {
                            continue;
                        }
                        if allowed {
                            if self.lost_to_clock_jump.insert(rid) {
                                self.summary.lost_to_clock_jump += 1;
                            }
                        } else {
                            self.summary.violation(format!(
                                "device {}'s retention at t={t} dropped acknowledged visit \
                                 {rid} of live day {day} before it reached the hub",
                                dev.id
                            ));
                        }
                    }
                }
                dev.synced.remove(day);
            }
            if dev
                .session
                .as_ref()
                .is_some_and(|(_, h)| plan.dropped.contains(&h.day))
            {
                dev.session = None;
            }
            if plan.keeps_day_key(dev.publics_from) {
                continue;
            }
            dev.publics_from = plan.horizon;
        }
    }

    fn sample(&mut self, t: UnixSeconds) {
        let h = horizon(t);
        let backlog = self.pending.range(h..).map(|(_, n)| n).sum();
        self.summary.series.push(Sample {
            at: (t - START_DAY.start()) as f64 / HOUR as f64,
            backlog,
            delivered: self.delivered.len() as u64,
        });
    }

    /// After the last day: every device is powered and linked, nothing is lost, and every
    /// device syncs with the hub round after round until a round moves nothing.
    fn quiet_period(&mut self, t: UnixSeconds) {
        self.quiet = true;
        self.hub_full_until = 0;
        for dev in &mut self.devices {
            dev.powered_off = None;
            dev.down_until = 0;
            dev.disk_full_until = 0;
            if dev.jump != 0 {
                dev.drift -= dev.jump;
                dev.jump = 0;
                dev.offset_stale = true;
            }
        }
        self.power_and_crashes(t);
        self.retention(t);
        self.sample(t);
        for round in 0..8u64 {
            let mut moved = 0;
            for d in 0..self.devices.len() {
                moved += self.sync_with_region(d, t + round * TICK);
            }
            moved += self.hub_link(t + round * TICK);
            self.sample(t + round * TICK);
            if moved == 0 {
                if self.config.injects_faults() {
                    // Clocks set right and measured again: retention as the devices' next
                    // timer runs it.
                    self.retention(t + round * TICK);
                }
                return;
            }
        }
        self.summary
            .violation("the quiet period did not settle within 8 rounds".into());
    }

    /// Whether device `id` holds records of `day` the hub may not have (by the device's own
    /// synced counts, which its retention reads): such a day may be kept one grace day.
    pub(crate) fn device_unsynced(&self, id: &DeviceId, day: Day) -> bool {
        self.devices.iter().find(|d| &d.id == id).is_some_and(|d| {
            let total = d
                .store
                .partitions()
                .find(|p| p.id().day == day)
                .map_or(0, |p| p.record_count() as u64);
            total > d.synced.get(&day).copied().unwrap_or(0)
        })
    }

    pub(crate) fn device_stores(&self) -> impl Iterator<Item = (&DeviceId, usize, &MemoryStore)> {
        self.devices.iter().map(|d| (&d.id, d.facility, &d.store))
    }

    pub(crate) fn device_store_mut(&mut self, d: usize) -> Option<&mut MemoryStore> {
        self.devices.get_mut(d).map(|d| &mut d.store)
    }

    /// Devices that are running at `t`, with their clocks.
    pub(crate) fn running_devices(
        &self,
        t: UnixSeconds,
    ) -> impl Iterator<Item = (&DeviceId, &MemoryStore)> {
        self.devices
            .iter()
            .filter(move |d| d.is_on(t))
            .map(|d| (&d.id, &d.store))
    }

    fn finish(mut self) -> Summary {
        self.delays.sort_unstable();
        self.summary.delay_p50_s = percentile(&self.delays, 0.5);
        self.summary.delay_p99_s = percentile(&self.delays, 0.99);
        self.summary.delay_max_s = self.delays.last().copied().unwrap_or(0) as f64;
        self.summary.per_record();
        self.summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scale;

    fn small_world() -> World {
        let mut c = Config::new(Scenario::RegionalOutage, 5);
        c.scale = Scale {
            facilities: 1,
            devices: 2,
            days: 40,
            visits: 0,
        };
        World::new(c)
    }

    /// A visit at device 0 at `at` (true time), stored unsynced.
    fn visit_at(w: &mut World, at: UnixSeconds) -> RecordId {
        let mut token = [0u8; 16];
        w.rng.fill_bytes(&mut token);
        let text = w.issuer.issue(at, TOKEN_TTL, token);
        let now = w.devices[0].clock(at);
        w.scan(0, now, &text).expect("no error").expect("accepted")
    }

    fn held_days(w: &World) -> Vec<Day> {
        w.devices[0]
            .store
            .partitions()
            .map(|p| p.id().day)
            .collect()
    }

    /// The simulated device runs the binary's retention rule: an expired partition the hub
    /// may not hold stays one grace day (and the checker allows exactly that), a synced one
    /// goes at the horizon, and nothing stays past the grace day.
    #[test]
    fn device_retention_keeps_an_unsynced_day_one_grace_day_only() {
        let mut w = small_world();
        let t = START_DAY.plus(35).start() + 12 * HOUR;
        let h = horizon(t);
        visit_at(&mut w, h.minus(1).start() + 12 * HOUR);
        visit_at(&mut w, h.minus(2).start() + 12 * HOUR);
        w.retention(t);
        assert_eq!(
            held_days(&w),
            vec![h.minus(1)],
            "grace for the unsynced day only"
        );
        assert!(check::retention_breaches(&w, t, HOUR, true).is_empty());
        // A day later the grace is over.
        w.retention(t + DAY_SECONDS);
        assert!(held_days(&w).is_empty());

        // Synced: no grace.
        let mut w = small_world();
        visit_at(&mut w, h.minus(1).start() + 12 * HOUR);
        w.devices[0].synced.insert(h.minus(1), 1);
        w.retention(t);
        assert!(held_days(&w).is_empty());
    }

    /// The faulty shell: the hub killed just before its first commit keeps nothing of the
    /// session (what automerge merged in memory is gone), killed just after it keeps the
    /// partition; a session torn after two frames completes neither side and moved nothing;
    /// and the next clean session delivers
    /// everything either way.
    #[test]
    fn a_kill_before_a_commit_loses_the_merge_and_the_next_session_delivers() {
        let hub_crash = |after| Plan {
            responder: SideFaults {
                crash: Some(Crash {
                    at_commit: 0,
                    after,
                }),
                ..SideFaults::default()
            },
            ..Plan::default()
        };
        let torn = Plan {
            tear: Some((2, Role::Responder)),
            ..Plan::default()
        };
        for (plan, hub_keeps) in [
            (hub_crash(false), false),
            (hub_crash(true), true),
            (torn, false),
        ] {
            let mut w = small_world();
            let t = START_DAY.start() + 12 * HOUR;
            let rid = visit_at(&mut w, t);
            let pid = w.devices[0]
                .store
                .partitions()
                .next()
                .expect("stored")
                .id()
                .clone();
            let setup = PairSetup {
                initiator: w.devices[0].peer.clone(),
                responder: w.hub_peer.clone(),
                credential: None,
                push_only: true,
            };
            let run = faulty::run(
                t,
                &setup,
                &mut w.devices[0].store,
                &mut w.hub,
                admit_claimed,
                plan,
            )
            .expect("runs");
            assert!(!run.outcome.completed(), "{plan:?}");
            assert_eq!(run.responder_died, plan.responder.crash.is_some());
            assert_eq!(run.torn, plan.tear.is_some());
            let held = w
                .hub
                .get(&pid)
                .is_some_and(|p| p.records().iter().any(|(r, _)| *r == rid));
            assert_eq!(held, hub_keeps, "{plan:?}");
            // The device did not count the day as synced; a clean session delivers it.
            let again = run_pair(
                t + 60,
                &setup,
                &mut w.devices[0].store,
                &mut w.hub,
                admit_claimed,
            )
            .expect("runs");
            assert!(again.completed(), "{plan:?}");
            let p = w.hub.get(&pid).expect("at the hub");
            assert!(p.records().iter().any(|(r, _)| *r == rid));
        }
    }

    /// A clock that jumped forward since the hub measured it may make retention drop an
    /// unsynced, unexpired visit past the grace day (the rule allows it, and it is counted);
    /// with an offset that is up to date, the same drop is a violation. A clock that jumped
    /// back keeps expired days until the hub measures it again, which the checker allows.
    #[test]
    fn retention_under_a_jumped_clock_is_held_to_the_rule() {
        let t = START_DAY.plus(10).start() + 12 * HOUR;
        for stale in [true, false] {
            let mut w = small_world();
            let rid = visit_at(&mut w, t);
            let partition = w.devices[0]
                .store
                .partitions()
                .next()
                .expect("held")
                .id()
                .clone();
            w.ledger.insert(
                rid,
                Ack {
                    facility: 0,
                    partition,
                    token: [0; 16],
                    acked_at: t,
                },
            );
            let dev = &mut w.devices[0];
            dev.clock_offset = Some(0);
            dev.drift += 40 * DAY_SECONDS as i64;
            dev.offset_stale = stale;
            w.retention(t);
            assert!(held_days(&w).is_empty());
            assert_eq!(w.lost_to_clock_jump.contains(&rid), stale);
            assert_eq!(
                w.summary.violations.is_empty(),
                stale,
                "{:?}",
                w.summary.violations
            );
        }
        let mut w = small_world();
        visit_at(&mut w, t);
        w.devices[0].synced.insert(Day::of(t), 1);
        w.devices[0].clock_offset = Some(0);
        w.devices[0].drift -= 5 * DAY_SECONDS as i64;
        w.devices[0].offset_stale = true;
        let later = t + 30 * DAY_SECONDS;
        w.retention(later);
        assert_eq!(held_days(&w), vec![Day::of(t)], "kept by the clock behind");
        assert!(check::retention_breaches(&w, later, HOUR, true).is_empty());
        w.devices[0].offset_stale = false;
        assert!(!check::retention_breaches(&w, later, HOUR, true).is_empty());
    }

    /// A code shown twice is stored once: the second scan is a duplicate.
    #[test]
    fn a_code_scanned_twice_is_a_duplicate() {
        let mut w = small_world();
        let t = START_DAY.start() + 12 * HOUR;
        let text = w.issuer.issue(t, TOKEN_TTL, [7; 16]);
        assert!(w.scan(0, t, &text).expect("ok").is_some());
        assert!(w.scan(0, t + 2, &text).expect("ok").is_none());
        // Another device has its own memory (as the binary's; siblings do not share it).
        assert!(w.scan(1, t + 2, &text).expect("ok").is_some());
    }

    /// Sibling sessions are admitted from the hub's roster: a device of the facility is, an
    /// endpoint not in the roster is not.
    #[test]
    fn sibling_sessions_are_admitted_by_roster() {
        let w = small_world();
        let roster = w.roster_of(1);
        let own = w.facilities[0].clone();
        let me = PeerHello {
            peer: w.devices[0].peer.clone(),
            credential: None,
            now: 0,
            refresh_have: None,
            push_only: true,
        };
        assert!(matches!(
            admit_sibling(&own, &roster, &[], None, &w.devices[0].endpoint, &me),
            Decision::Admit { .. }
        ));
        assert!(matches!(
            admit_sibling(&own, &roster, &[], None, "endpoint-of-a-stranger", &me),
            Decision::Refuse { .. }
        ));
        assert!(roster.iter().all(|s| s.device_id != w.devices[1].id));
    }
}
