//! The invariants every run must keep, checked against the simulation's own ledger of
//! acknowledged visits, and the deliberate faults that show the checks can fail.
//!
//! - Nothing acknowledged is lost: every visit a device sealed and stored whose day is still
//!   live is at the hub, exactly once. The hub's partitions are opened with the day-key
//!   ratchet, the hub's real read path, and counted by record id and by token.
//! - Retention: no day secret and no partition past the horizon survives anywhere (devices
//!   get one hour of grace: their retention timer runs hourly, on clocks that drift; and a
//!   device keeps a partition the hub may not hold yet one grace day past the horizon, the
//!   rule of `shared::device::purge_plan`, never longer).
//! - Convergence: after the quiet period, every device of a facility holds every live
//!   partition of its facility with the hub's heads.

use crate::scenario::Fault;
use crate::world::{HOUR, World};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shared::envelope::{Record, RecordBody};
use shared::partition::Partition;
use shared::sync::harness::MemoryStore;
use shared::time::horizon;
use shared::unseal::unseal_partition;
use shared::{FacilityId, PartitionId, RecordId, UnixSeconds};
use std::collections::BTreeMap;

/// Retention at the hub (strictly) and at running devices (within an hour), during the run.
pub(crate) fn retention_during_run(world: &mut World, t: UnixSeconds) {
    let found = retention_breaches(world, t, HOUR, false);
    report_retention(world, found);
}

fn report_retention(world: &mut World, found: Vec<String>) {
    for f in found {
        world.summary.retention_violations += 1;
        world.summary.violation(f);
    }
}

/// Descriptions of every retention breach at `t`; devices are held to the horizon of
/// `t - grace`, less the one grace day for a partition with records not known to be at the
/// hub, and only running ones unless `all_devices`.
pub(crate) fn retention_breaches(
    world: &World,
    t: UnixSeconds,
    grace: u64,
    all_devices: bool,
) -> Vec<String> {
    let h = horizon(t);
    let mut found = Vec::new();
    let gone = h.minus(1);
    if world.ratchet.oldest() < h || world.ratchet.secret(gone).is_some() {
        found.push(format!(
            "the hub can still derive the day secret of expired day {gone} at t={t}"
        ));
    }
    for p in world.hub.partitions().filter(|p| p.id().day < h) {
        found.push(format!(
            "the hub holds expired partition {} at t={t}",
            p.id()
        ));
    }
    let dh = horizon(t.saturating_sub(grace));
    let devices: Vec<(&shared::DeviceId, &MemoryStore)> = if all_devices {
        world.device_stores().map(|(id, _, s)| (id, s)).collect()
    } else {
        world.running_devices(t).collect()
    };
    for (id, store) in devices {
        // A device whose clock jumped back since the hub measured it runs its retention
        // behind (by the rule); it catches up at its next hub session.
        let lag = world.device_clock_lag(id, t);
        let dh = if lag == 0 {
            dh
        } else {
            horizon(t.saturating_sub(grace).saturating_sub(lag))
        };
        let kept = |day| day == dh.minus(1) && world.device_unsynced(id, day);
        for p in store
            .partitions()
            .filter(|p| p.id().day < dh && !kept(p.id().day))
        {
            found.push(format!(
                "device {id} holds expired partition {} at t={t}",
                p.id()
            ));
        }
    }
    found
}

/// Applies the configured [`Fault`], standing in for a bug in the core or a shell.
pub(crate) fn apply_fault(world: &mut World, t: UnixSeconds) {
    match world.config.fault {
        Fault::None => {}
        Fault::DropOneAtHub => {
            let Some(id) = fullest_hub_partition(&world.hub) else {
                return;
            };
            let Some(old) = world.hub.remove(&id) else {
                return;
            };
            let mut rebuilt = Partition::new(id, b"hub-rebuilt");
            for key in old.wrapped_keys() {
                let _ = rebuilt.insert_wrapped_key(&key);
            }
            for (rid, envelope) in old.records().into_iter().skip(1) {
                if let Ok(env) = envelope {
                    let _ = rebuilt.insert_record(rid, &env);
                }
            }
            world.hub.insert(rebuilt);
        }
        Fault::DuplicateAtHub => {
            // A second record of the same visit, sealed properly under the same session key.
            let Some(id) = fullest_hub_partition(&world.hub) else {
                return;
            };
            let Some(p) = world.hub.get(&id) else {
                return;
            };
            let Some((rid, Ok(envelope))) = p.records().into_iter().next() else {
                return;
            };
            let Some(wrapped) = p.wrapped_key(envelope.session()) else {
                return;
            };
            let Some(secret) = world.ratchet.secret(wrapped.key_day) else {
                return;
            };
            let Ok(key) = wrapped.unwrap(&secret) else {
                return;
            };
            let Ok(record) = envelope.open(&key, &id, rid) else {
                return;
            };
            let copy_id = RecordId([0xdd; 16]);
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            if let (Ok(copy), Some(p)) = (
                key.seal(&mut rng, &id, copy_id, &record),
                world.hub.get_mut(&id),
            ) {
                let _ = p.insert_record(copy_id, &copy);
            }
        }
        // Applied during the run (`World::wrap_session_key`, `World::hub_link`).
        Fault::WrapToOneHub | Fault::NoHubLink => {}
        Fault::KeepExpiredAtDevice => {
            let id = PartitionId {
                facility: world.facilities[0].clone(),
                day: horizon(t).minus(1),
            };
            if let Some(store) = world.device_store_mut(0) {
                store.get_or_create(&id);
            }
        }
    }
}

fn fullest_hub_partition(hub: &MemoryStore) -> Option<PartitionId> {
    hub.partitions()
        .max_by_key(|p| p.record_count())
        .filter(|p| p.record_count() > 0)
        .map(|p| p.id().clone())
}

/// The checks after the quiet period: retention everywhere, every live acknowledged visit at
/// the hub exactly once, nothing at the hub nobody acknowledged, replicas converged.
pub(crate) fn final_checks(world: &mut World, t: UnixSeconds) {
    let found = retention_breaches(world, t, 0, true);
    report_retention(world, found);

    // The hub's read path: open every live partition with the ratchet.
    let mut by_record: BTreeMap<RecordId, u64> = BTreeMap::new();
    let mut by_token: BTreeMap<(FacilityId, [u8; 16]), u64> = BTreeMap::new();
    let mut unreadable = Vec::new();
    let mut phantom = 0u64;
    for p in world.hub.partitions() {
        let opened = unseal_partition(p, |day| world.ratchet.secret(day));
        for (rid, why) in opened.failures {
            unreadable.push(format!(
                "the hub cannot open record {rid} of {}: {why}",
                p.id()
            ));
        }
        for (rid, record) in opened.records {
            *by_record.entry(rid).or_default() += 1;
            let Record {
                facility,
                body: RecordBody::Qr { token, .. },
                ..
            } = record
            else {
                continue;
            };
            *by_token.entry((facility, token)).or_default() += 1;
            if !world.ledger.contains_key(&rid) && !world.stored_unacknowledged.contains(&rid) {
                phantom += 1;
            }
        }
    }
    for u in unreadable {
        world.summary.violation(u);
    }

    let h = horizon(t);
    let mut lost = Vec::new();
    let mut duplicated = 0u64;
    let mut expired = 0u64;
    let mut checked = 0u64;
    for (rid, ack) in &world.ledger {
        if ack.partition.day < h {
            if !world.delivered.contains_key(rid) {
                expired += 1;
            }
            continue;
        }
        checked += 1;
        if world.lost_to_clock_jump.contains(rid) && !by_record.contains_key(rid) {
            // Dropped by a device whose clock had jumped forward (`World::retention` checked
            // it against the rule when it happened).
            continue;
        }
        let copies = by_record.get(rid).copied().unwrap_or(0);
        let fac = world.facilities[ack.facility].clone();
        let tokens = by_token.get(&(fac, ack.token)).copied().unwrap_or(0);
        if copies == 0 {
            lost.push(format!(
                "visit {rid} acknowledged at t={} in {} is not at the hub",
                ack.acked_at, ack.partition
            ));
        } else {
            duplicated += copies.max(tokens) - 1;
        }
    }
    world.summary.visits_checked = checked;
    world.summary.lost = lost.len() as u64;
    world.summary.duplicated = duplicated;
    world.summary.phantom = phantom;
    world.summary.expired_undelivered = expired;
    world.summary.delivered = world.delivered.len() as u64;
    for l in lost {
        world.summary.violation(l);
    }
    if duplicated > 0 {
        world
            .summary
            .violation(format!("{duplicated} extra copies of visits at the hub"));
    }
    if phantom > 0 {
        world.summary.violation(format!(
            "{phantom} records at the hub that no device acknowledged"
        ));
    }
    converged(world, t);
}

/// The hub holds everything every device holds: each live partition of a device is at the hub
/// with every one of the device's heads (and so every change before them). Devices push only
/// (`Hello::push_only`): they do not receive what their siblings wrote, so they do not hold
/// the hub's heads, and a device's copy is its own records plus whatever siblings relayed
/// through it.
fn converged(world: &mut World, t: UnixSeconds) {
    use automerge::ReadDoc;
    let h = horizon(t);
    let mut found = Vec::new();
    for (id, _, store) in world.device_stores() {
        for p in store.partitions().filter(|p| p.id().day >= h) {
            let pid = p.id();
            match world.hub.get(pid) {
                None if p.record_count() > 0 => {
                    found.push(format!("device {id} holds partition {pid} the hub lacks"));
                }
                None => {}
                Some(hub)
                    if p.heads()
                        .iter()
                        .any(|c| hub.doc().get_change_by_hash(c).is_none()) =>
                {
                    found.push(format!(
                        "device {id} holds changes of partition {pid} the hub lacks"
                    ));
                }
                Some(_) => {}
            }
        }
    }
    for f in found {
        world.summary.convergence_violations += 1;
        world.summary.violation(f);
    }
}
