//! Issue 13's fault campaign, CI-sized: every fault kind on at once (a process kill just
//! before or after a commit, torn sessions, full disks, clock jumps, failing writes), several
//! seeds and scenarios, and still nothing acknowledged is lost, doubled or phantom, retention
//! holds and every replica converges. `cargo bench -p simulations --bench faults` runs the
//! million-fault campaign.

use simulations::{Config, Scale, Scenario, Summary, run};

fn faulty(scenario: Scenario, seed: u64, scale: Scale) -> Config {
    let mut c = Config::new(scenario, seed);
    c.scale = scale;
    c.store_faults_per_mille = 200;
    c.crash_faults_per_mille = 150;
    c.torn_sessions_per_mille = 300;
    c.disk_full_per_mille = 30;
    c.clock_jumps_per_mille = 30;
    c
}

fn check(c: &Config) -> Summary {
    let s = run(c, &mut |_, _| {});
    assert!(s.passed(), "{}", s.human(c));
    assert_eq!(s.lost + s.duplicated + s.phantom, 0, "{}", s.human(c));
    assert!(s.acknowledged > 0 && s.visits_checked > 0, "{}", s.human(c));
    let human = s.human(c);
    assert!(human.contains("faults injected"), "{human}");
    s
}

#[test]
fn every_fault_kind_at_once_keeps_the_invariants_over_several_seeds() {
    let mut total = Summary::default();
    for seed in 1..=4 {
        let c = faulty(
            Scenario::OutdoorHotspot,
            seed,
            Scale {
                facilities: 3,
                devices: 3,
                days: 3,
                visits: 20,
            },
        );
        let s = check(&c);
        total.crash_faults += s.crash_faults;
        total.torn_sessions += s.torn_sessions;
        total.disk_full_faults += s.disk_full_faults;
        total.disk_full_refusals += s.disk_full_refusals;
        total.clock_jumps += s.clock_jumps;
        total.store_faults += s.store_faults;
        total.stored_unacknowledged += s.stored_unacknowledged;
    }
    // Every kind was actually injected, more than a handful of times.
    assert!(total.crash_faults > 20, "{total:?}");
    assert!(total.torn_sessions > 20, "{total:?}");
    assert!(
        total.disk_full_faults > 3 && total.disk_full_refusals > 0,
        "{total:?}"
    );
    assert!(total.clock_jumps > 3, "{total:?}");
    assert!(total.store_faults > 20, "{total:?}");
    assert!(total.stored_unacknowledged > 0, "{total:?}");
}

/// A hub outage and a region syncing at once, then 40 days of retention with clocks that
/// jump: retention and delivery hold under every fault.
#[test]
fn outage_and_retention_scenarios_keep_their_invariants_under_faults() {
    let c = faulty(
        Scenario::RegionalOutage,
        21,
        Scale {
            facilities: 4,
            devices: 2,
            days: 3,
            visits: 15,
        },
    );
    check(&c);
    let mut c = faulty(
        Scenario::LongOffline,
        22,
        Scale {
            facilities: 2,
            devices: 3,
            days: 42,
            visits: 3,
        },
    );
    c.clock_jumps_per_mille = 60;
    let s = check(&c);
    assert!(s.clock_jumps > 20, "{}", s.human(&c));
}

/// Every session torn at a random frame (one of the first twelve): devices retry, and the
/// sessions that end before the tear deliver everything in the quiet period.
#[test]
fn torn_sessions_alone_lose_nothing() {
    let mut c = Config::new(Scenario::OutdoorHotspot, 5);
    c.scale = Scale {
        facilities: 2,
        devices: 2,
        days: 2,
        visits: 10,
    };
    c.torn_sessions_per_mille = 1000;
    let s = check(&c);
    assert!(s.torn_sessions > 20, "{}", s.human(&c));
    assert_eq!(s.crash_faults + s.clock_jumps + s.disk_full_faults, 0);
}
