//! The named scenarios and the knobs of one run: what the CLI parses and the tests build.
//!
//! A scenario fixes the shape of the world (connectivity profiles, outages, loss, crashes);
//! the scale (facilities, devices, days, visits) comes from the caller, with per-scenario
//! defaults chosen so that a release run takes seconds, not minutes.

use std::fmt;
use std::str::FromStr;

/// One of the named worlds the simulator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    /// Hotspot devices whose link flaps every few minutes, outdoor devices with dead hours
    /// each day, lossy and duplicating links, crashes and clock drift, for weeks.
    OutdoorHotspot,
    /// A 24-hour hub outage, after which every facility syncs at once.
    RegionalOutage,
    /// One device powered off for 40 days, another cut from the hub for 3 days (it relays
    /// through a sibling), with retention running throughout.
    LongOffline,
    /// Every facility's backlog of visits delivered at once after an outage; measures the
    /// simulated delivery time against a per-device link rate and the hub's ingest rate.
    Storm,
    /// Two hubs in the region (A and B, each with its own day-key ratchet, joined by the hub
    /// link): hub A is killed at random moments, mid-session or idle, and comes back after
    /// minutes to hours, and once stays down for a day or more; devices wrap every session
    /// key to both hubs and fail over to the hub that answers.
    HubFailover,
}

impl Scenario {
    /// Every scenario, in the order the README lists them.
    pub const ALL: [Scenario; 5] = [
        Scenario::OutdoorHotspot,
        Scenario::RegionalOutage,
        Scenario::LongOffline,
        Scenario::Storm,
        Scenario::HubFailover,
    ];

    /// The CLI name.
    pub const fn name(self) -> &'static str {
        match self {
            Scenario::OutdoorHotspot => "outdoor-hotspot",
            Scenario::RegionalOutage => "regional-outage",
            Scenario::LongOffline => "long-offline",
            Scenario::Storm => "storm",
            Scenario::HubFailover => "hub-failover",
        }
    }

    /// The scale a run uses when the caller does not say.
    pub const fn default_scale(self) -> Scale {
        match self {
            Scenario::OutdoorHotspot => Scale {
                facilities: 8,
                devices: 3,
                days: 40,
                visits: 40,
            },
            Scenario::RegionalOutage => Scale {
                facilities: 40,
                devices: 2,
                days: 4,
                visits: 150,
            },
            Scenario::LongOffline => Scale {
                facilities: 6,
                devices: 3,
                days: 45,
                visits: 40,
            },
            Scenario::Storm => Scale {
                facilities: 1_000,
                devices: 1,
                days: 1,
                visits: 1_000,
            },
            Scenario::HubFailover => Scale {
                facilities: 20,
                devices: 2,
                days: 6,
                visits: 100,
            },
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A scenario name that is not one of [`Scenario::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scenario {0:?}: use one of outdoor-hotspot, regional-outage, long-offline, storm, hub-failover"
)]
pub struct UnknownScenario(pub String);

impl FromStr for Scenario {
    type Err = UnknownScenario;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .ok_or_else(|| UnknownScenario(s.to_owned()))
    }
}

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    /// Facilities in the region.
    pub facilities: u32,
    /// Devices per facility.
    pub devices: u32,
    /// Simulated days of visits (a quiet period follows).
    pub days: u32,
    /// Visits per facility per day (for `storm`: the backlog per facility).
    pub visits: u32,
}

/// A deliberate defect, applied after the final quiet period and before the checks (the
/// `hub-failover` ones throughout the run), so tests can show that the invariant checker
/// notices it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// No defect: the run as the core behaves.
    #[default]
    None,
    /// The hub loses one record (its partition is rebuilt without it).
    DropOneAtHub,
    /// The hub holds one visit twice (its envelope copied under a second record id).
    DuplicateAtHub,
    /// A device keeps one partition past the horizon.
    KeepExpiredAtDevice,
    /// `hub-failover` only: devices wrap their session keys to hub A's day keys alone (as a
    /// device that ignored the second hub's keys): hub B holds the visits but cannot open them.
    WrapToOneHub,
    /// `hub-failover` only: the hub link never runs (the hubs hold what devices gave each).
    NoHubLink,
}

/// Everything one run depends on: with the same config, a run makes the same decisions
/// (only age's own randomness, and so byte counts, vary a little).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Which world.
    pub scenario: Scenario,
    /// The seed of every random decision of the simulation.
    pub seed: u64,
    /// The scale.
    pub scale: Scale,
    /// A defect to inject, for testing the checker.
    pub fault: Fault,
    /// The chance that a hub session has a storage fault injected at one of its effects
    /// (the hub's persist or sync-state write failing, a per-day quota refusing a
    /// partition, the device's sync-state write failing): what the shells' driver must turn
    /// into "nothing stored, sync again", never a lost visit. In thousandths.
    pub store_faults_per_mille: u32,
    /// The chance that a session (with the hub or a sibling) or a scan has a process kill
    /// injected just before or just after one of its commits, on either side: the shell
    /// loses what it had not committed and restarts from its disk. In thousandths.
    pub crash_faults_per_mille: u32,
    /// The chance that a session's link drops at a random frame, either side noticing first.
    /// In thousandths.
    pub torn_sessions_per_mille: u32,
    /// The chance, per node (device or hub) and simulated hour, that its disk fills up for
    /// 10 minutes to 6 hours: every write is refused (a scan cannot be stored, so it is not
    /// acknowledged). In thousandths.
    pub disk_full_per_mille: u32,
    /// The chance, per device and simulated hour, that its clock jumps forwards or backwards
    /// by 5 minutes to 3 days, for 1 hour to 2 days (then it is set right again). In
    /// thousandths.
    pub clock_jumps_per_mille: u32,
}

impl Config {
    /// A run of `scenario` with its default scale.
    pub fn new(scenario: Scenario, seed: u64) -> Self {
        Config {
            scenario,
            seed,
            scale: scenario.default_scale(),
            fault: Fault::None,
            store_faults_per_mille: 0,
            crash_faults_per_mille: 0,
            torn_sessions_per_mille: 0,
            disk_full_per_mille: 0,
            clock_jumps_per_mille: 0,
        }
    }

    /// Whether any fault kind beyond `--store-faults` is on (they need the simulation's own
    /// faulty shell, `crate::faulty`).
    pub fn injects_faults(&self) -> bool {
        self.crash_faults_per_mille > 0
            || self.torn_sessions_per_mille > 0
            || self.disk_full_per_mille > 0
            || self.clock_jumps_per_mille > 0
    }

    /// The command line that repeats this run.
    pub fn command(&self) -> String {
        let mut faults = String::new();
        for (flag, per_mille) in [
            ("--store-faults", self.store_faults_per_mille),
            ("--crash-faults", self.crash_faults_per_mille),
            ("--torn-sessions", self.torn_sessions_per_mille),
            ("--disk-full", self.disk_full_per_mille),
            ("--clock-jumps", self.clock_jumps_per_mille),
        ] {
            if per_mille > 0 {
                faults.push_str(&format!(" {flag} {}", f64::from(per_mille) / 1000.0));
            }
        }
        format!(
            "cargo run --release -p simulations -- --scenario {} --seed {} --facilities {} \
             --devices {} --days {} --visits {}{faults}",
            self.scenario,
            self.seed,
            self.scale.facilities,
            self.scale.devices,
            self.scale.days,
            self.scale.visits
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for sc in Scenario::ALL {
            assert_eq!(sc.name().parse::<Scenario>(), Ok(sc));
        }
        assert!("outage".parse::<Scenario>().is_err());
    }

    #[test]
    fn the_command_names_every_knob() {
        let c = Config::new(Scenario::LongOffline, 9);
        let cmd = c.command();
        assert!(cmd.contains("--scenario long-offline --seed 9"));
        assert!(cmd.contains("--days 45"));
        assert!(!cmd.contains("faults") && !c.injects_faults());
        let mut c = c;
        c.crash_faults_per_mille = 100;
        c.clock_jumps_per_mille = 5;
        let cmd = c.command();
        assert!(
            cmd.ends_with("--crash-faults 0.1 --clock-jumps 0.005"),
            "{cmd}"
        );
        assert!(c.injects_faults());
    }
}
