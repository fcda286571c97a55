//! One small scenario as data, for checking the simulation against the product: the same
//! [`Plan`] runs here, through [`World`]'s own device and hub model ([`run`]), and through the
//! real `edge-node` and `sync-hub` binaries on loopback (`tests/tests/sim_vs_real.rs`), and the
//! two must show the same deliveries and the same protocol bytes within 10 %.
//!
//! [`small_plan`] is one facility of three devices on one day: every device checks visitors in
//! while the hub is down, the third device (no route to the hub) hands its log to the second,
//! the hub comes up, every device syncs, two more visits arrive and a second round syncs them.

use crate::report::QUIC_CONNECTION_BYTES;
use crate::scenario::{Config, Scale, Scenario};
use crate::world::{HOUR, START_DAY, World};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shared::UnixSeconds;
use shared::envelope::RecordBody;
use shared::token::{Keyring, TestIssuer};
use std::collections::BTreeMap;

/// The lifetime of the plan's codes, seconds (as the tests' issuer uses).
pub const CODE_TTL: u8 = 60;
/// Simulated seconds between two steps of a plan.
const STEP_SECONDS: UnixSeconds = 60;

/// One step of a [`Plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Device `device` scans a fresh code of `token`, issued at the moment of the scan.
    /// Consecutive scans of one device are one process (one `edge-node scan` of several
    /// frames, or a running kiosk); the first of a run starts a new process, without the
    /// last one's session key.
    Scan {
        /// The device's index.
        device: usize,
        /// The visitor's token.
        token: [u8; 16],
    },
    /// The hub starts; it is down before (so a sibling handing logs on cannot reach it).
    HubUp,
    /// Device `device` syncs with the hub.
    SyncHub {
        /// The device's index.
        device: usize,
    },
    /// Device `from`, with no route to the hub, hands its log to sibling `via`. Only while
    /// the hub is down (through the binaries the sibling runs its daemon, which would
    /// otherwise deliver on its own schedule).
    Relay {
        /// The device handing its log on.
        from: usize,
        /// The sibling taking it.
        via: usize,
    },
}

/// A small scenario both the simulation and the binaries run: one facility, `devices`
/// devices, `steps` in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Devices of the one facility.
    pub devices: usize,
    /// What happens, in order.
    pub steps: Vec<Step>,
}

impl Plan {
    /// The tokens of every scan, in order.
    pub fn tokens(&self) -> Vec<[u8; 16]> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Scan { token, .. } => Some(*token),
                _ => None,
            })
            .collect()
    }
}

/// The plan `tests/tests/sim_vs_real.rs` runs: tokens drawn from `seed`.
pub fn small_plan(seed: u64) -> Plan {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut token = || {
        let mut t = [0u8; 16];
        rng.fill_bytes(&mut t);
        t
    };
    let mut steps = Vec::new();
    for (device, n) in [(0, 4), (1, 3), (2, 3)] {
        for _ in 0..n {
            steps.push(Step::Scan {
                device,
                token: token(),
            });
        }
    }
    steps.push(Step::Relay { from: 2, via: 1 });
    steps.push(Step::HubUp);
    for device in [0, 1, 2] {
        steps.push(Step::SyncHub { device });
    }
    for _ in 0..2 {
        steps.push(Step::Scan {
            device: 0,
            token: token(),
        });
    }
    for device in [0, 1] {
        steps.push(Step::SyncHub { device });
    }
    Plan { devices: 3, steps }
}

/// What one session of a plan moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFigures {
    /// The index of its step in the plan.
    pub step: usize,
    /// The step.
    pub what: Step,
    /// Whether it completed.
    pub completed: bool,
    /// Protocol bytes (frames with their length prefixes) from the device that started it.
    pub bytes_up: u64,
    /// Protocol bytes back. For a relay the simulation counts only the total, here in
    /// `bytes_up`, and this is 0.
    pub bytes_down: u64,
}

impl SessionFigures {
    /// Protocol bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.bytes_up + self.bytes_down
    }
}

/// What the simulation saw of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    /// Every session, in order.
    pub sessions: Vec<SessionFigures>,
    /// Visits (records) the hub holds at the end.
    pub delivered: u64,
    /// Records at the hub whose token another record there carries too.
    pub duplicates: u64,
    /// The QR tokens the hub holds, sorted.
    pub tokens_at_hub: Vec<[u8; 16]>,
    /// Visits refused at the device (0 for a plan of fresh codes).
    pub refused: u64,
    /// What the simulation would add for QUIC: [`QUIC_CONNECTION_BYTES`] per session.
    pub modelled_quic_bytes: u64,
    /// Violations the world reported while running the plan.
    pub violations: Vec<String>,
}

impl Figures {
    /// Protocol bytes of every session, both ways.
    pub fn frame_bytes(&self) -> u64 {
        self.sessions.iter().map(SessionFigures::bytes).sum()
    }
}

/// Runs `plan` in the simulation: a [`World`] of one facility with `plan.devices` devices,
/// whose keyring trusts `issuer`; each step one simulated minute after the last, from noon
/// of the first simulated day. Scans, hub sessions and relays are the world's own
/// (`World::scan`, `World::sync_with_hub`, `World::relay`), so the figures are its model's.
pub fn run(plan: &Plan, issuer: &TestIssuer, seed: u64) -> Figures {
    let mut config = Config::new(Scenario::RegionalOutage, seed);
    config.scale = Scale {
        facilities: 1,
        devices: plan.devices as u32,
        days: 1,
        visits: 0,
    };
    let mut world = World::new(config);
    let mut keyring = Keyring::new();
    // A fresh keyring takes any one key.
    let _ = keyring.insert(issuer.keyring_entry("lockstep", 0, u64::MAX));
    world.keyring = keyring;
    let mut figures = Figures::default();
    let mut t = START_DAY.start() + 12 * HOUR;
    for (i, step) in plan.steps.iter().enumerate() {
        t += STEP_SECONDS;
        let before = (
            world.summary.wire_bytes,
            world.summary.upload_bytes,
            world.summary.violations.len(),
        );
        let completed = match *step {
            Step::HubUp => continue,
            Step::Scan { device, token } => {
                // Consecutive scans of a device are one process of the binary (one `scan`
                // command with several frames): a new one starts without a session key.
                let first = i == 0
                    || !matches!(plan.steps[i - 1], Step::Scan { device: d, .. } if d == device);
                if first && let Err(e) = world.new_process(device) {
                    figures.violations.push(format!("step {i}: {e}"));
                }
                match world.scan(device, t, &issuer.issue(t, CODE_TTL, token)) {
                    Ok(Some(_)) => {}
                    Ok(None) => figures.refused += 1,
                    Err(e) => figures.violations.push(format!("step {i}: {e}")),
                }
                continue;
            }
            Step::SyncHub { device } => {
                world.sync_with_hub(device, t);
                world.summary.violations.len() == before.2
            }
            Step::Relay { from, via } => world.relay(from, via, t),
        };
        let wire = world.summary.wire_bytes - before.0;
        let up = match step {
            Step::SyncHub { .. } => world.summary.upload_bytes - before.1,
            _ => wire,
        };
        figures.sessions.push(SessionFigures {
            step: i,
            what: *step,
            completed,
            bytes_up: up,
            bytes_down: wire - up,
        });
    }
    figures
        .violations
        .extend(world.summary.violations.iter().cloned());
    let mut tokens: BTreeMap<[u8; 16], u64> = BTreeMap::new();
    for p in world.hub.partitions() {
        let opened = shared::unseal::unseal_partition(p, |d| world.ratchet.secret(d));
        for (id, why) in &opened.failures {
            figures
                .violations
                .push(format!("record {id} at the hub does not open: {why}"));
        }
        for record in opened.records.values() {
            figures.delivered += 1;
            if let RecordBody::Qr { token, .. } = &record.body {
                *tokens.entry(*token).or_default() += 1;
            }
        }
    }
    figures.duplicates = tokens.values().map(|n| n - 1).sum();
    figures.tokens_at_hub = tokens.into_keys().collect();
    figures.modelled_quic_bytes = figures.sessions.len() as u64 * QUIC_CONNECTION_BYTES;
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan runs in the simulation: every visit arrives once, every session completes,
    /// and the relay and the hub sessions move bytes.
    #[test]
    fn the_small_plan_delivers_every_visit_once() {
        let plan = small_plan(7);
        let issuer = TestIssuer::new([0x11; 32], 1, 1);
        let f = run(&plan, &issuer, 7);
        assert!(f.violations.is_empty(), "{:?}", f.violations);
        let mut want = plan.tokens();
        want.sort_unstable();
        assert_eq!(f.tokens_at_hub, want);
        assert_eq!(f.delivered, 12);
        assert_eq!(f.duplicates, 0);
        assert_eq!(f.refused, 0);
        assert_eq!(f.sessions.len(), 6);
        assert!(f.sessions.iter().all(|s| s.completed && s.bytes() > 0));
        // The same plan and seed give the same deliveries and sessions (the bytes vary a
        // little: age draws its ephemeral keys from the operating system).
        let again = run(&plan, &issuer, 7);
        assert_eq!(again.tokens_at_hub, f.tokens_at_hub);
        let steps = |f: &Figures| f.sessions.iter().map(|s| s.step).collect::<Vec<_>>();
        assert_eq!(steps(&again), steps(&f));
    }
}
