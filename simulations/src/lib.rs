//! A seeded discrete-event simulation of a region: one hub (two in `hub-failover`), many
//! facilities, their devices, visits, flaky links, crashes, outages and 40 days of
//! retention, all driving the real
//! `shared` core (token verification, sealing, automerge partitions, sync sessions over
//! encoded frames, the day-key ratchet, the hub's unseal path).
//!
//! [`run`] executes one [`Config`] and returns a [`Summary`] whose invariants
//! ([`Summary::passed`]) are what CI and the CLI check; `check` holds the invariants,
//! `world` the model, `storm` the delivery-time experiment.

mod check;
pub mod faulty;
pub mod lockstep;
mod refresh;
pub mod report;
pub mod scenario;
pub mod storm;
pub mod world;

pub use report::{FailoverFigures, Sample, StormFigures, Summary, svg_chart};
pub use scenario::{Config, Fault, Scale, Scenario, UnknownScenario};

/// Runs `config` to the end. `progress(done, total)` is called as the run advances (in
/// simulated hours, or facilities for the storm).
pub fn run(config: &Config, progress: &mut dyn FnMut(u64, u64)) -> Summary {
    match config.scenario {
        Scenario::Storm => storm::run_storm(config, progress),
        _ => world::World::new(config.clone()).run(progress),
    }
}
