//! The long fault campaign of issue 13: seed after seed of a small region with every fault
//! kind on at high rates (a process kill just before or after a commit, torn sessions, full
//! disks, clock jumps, failing writes), on two threads, until at least a million faults were
//! injected. Prints the faults per kind, the visits checked, the losses (must be 0) and the
//! time; exits non-zero with the command that reproduces a run that broke an invariant.
//!
//! `cargo bench -p simulations --bench faults` (release). `FAULTS_TARGET=20000` runs a
//! shorter campaign.

use simulations::{Config, Scale, Scenario, Summary, run};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const DEFAULT_TARGET: u64 = 1_000_000;
const THREADS: u64 = 2;

fn config(seed: u64) -> Config {
    let mut c = Config::new(Scenario::OutdoorHotspot, seed);
    c.scale = Scale {
        facilities: 4,
        devices: 3,
        days: 2,
        visits: 20,
    };
    c.store_faults_per_mille = 900;
    c.crash_faults_per_mille = 300;
    c.torn_sessions_per_mille = 900;
    c.disk_full_per_mille = 50;
    c.clock_jumps_per_mille = 50;
    c
}

#[derive(Default)]
struct Totals {
    runs: u64,
    sessions: u64,
    store: u64,
    crash: u64,
    torn: u64,
    disk_full: u64,
    disk_full_refusals: u64,
    clock_jumps: u64,
    acknowledged: u64,
    checked: u64,
    lost: u64,
    lost_to_clock_jump: u64,
    stored_unacknowledged: u64,
    failed: Vec<String>,
}

impl Totals {
    fn add(&mut self, s: &Summary, c: &Config) {
        self.runs += 1;
        self.sessions += s.sessions;
        self.store += s.store_faults;
        self.crash += s.crash_faults;
        self.torn += s.torn_sessions;
        self.disk_full += s.disk_full_faults;
        self.disk_full_refusals += s.disk_full_refusals;
        self.clock_jumps += s.clock_jumps;
        self.acknowledged += s.acknowledged;
        self.checked += s.visits_checked;
        self.lost += s.lost;
        self.lost_to_clock_jump += s.lost_to_clock_jump;
        self.stored_unacknowledged += s.stored_unacknowledged;
        if !s.passed() {
            self.failed.push(format!("{}\n{}", c.command(), s.human(c)));
        }
    }
}

fn main() {
    let target = std::env::var("FAULTS_TARGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_TARGET);
    let started = Instant::now();
    let injected = AtomicU64::new(0);
    let next_seed = AtomicU64::new(1);
    let totals = Mutex::new(Totals::default());
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                while injected.load(Ordering::Relaxed) < target {
                    let seed = next_seed.fetch_add(1, Ordering::Relaxed);
                    let c = config(seed);
                    let s = run(&c, &mut |_, _| {});
                    injected.fetch_add(s.faults_injected(), Ordering::Relaxed);
                    if let Ok(mut t) = totals.lock() {
                        t.add(&s, &c);
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let t = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    let all = injected.into_inner();
    println!(
        "fault campaign: {} runs (outdoor-hotspot, 4 facilities x 3 devices, 2 days, seeds 1..), \
         {} sessions, {:.1} s on {THREADS} threads",
        t.runs, t.sessions, secs
    );
    println!(
        "faults injected {all} ({:.0}/s): kills at a commit {}, torn sessions {}, writes refused \
         by a full disk {} (in {} stretches), clock jumps {}, failing writes {}",
        all as f64 / secs,
        t.crash,
        t.torn,
        t.disk_full_refusals,
        t.disk_full,
        t.clock_jumps,
        t.store
    );
    println!(
        "visits acknowledged {}, checked at the hub {}, lost {} (must be 0); stored but never \
         acknowledged {}, dropped by a jumped clock's retention {}",
        t.acknowledged, t.checked, t.lost, t.stored_unacknowledged, t.lost_to_clock_jump
    );
    if t.failed.is_empty() {
        println!("invariants: all held in every run");
    } else {
        eprintln!(
            "{} runs broke an invariant; the first:\n{}",
            t.failed.len(),
            t.failed[0]
        );
        std::process::exit(1);
    }
}
