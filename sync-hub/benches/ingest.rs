//! Ingest throughput of the hub's ledger: how fast partitions arriving from devices are merged,
//! stored and indexed for traces, against the cost of merely unsealing their records.
//!
//! Builds `FACILITIES x DAYS` partitions of `RECORDS` records each, sealed with real day keys
//! exactly as edge devices seal them (one automerge change per sync round of
//! `RECORDS_PER_CHANGE` check-ins, as devices fold them), then ingests them
//! into fresh hubs in temporary folders, and prints a table. Run it in release mode:
//!
//! ```text
//! cargo bench -p sync-hub --bench ingest
//! ```
//!
//! The hub's target is 50,000 records a second merged and indexed.

use automerge::sync::{Message, State as SyncState, SyncDoc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shared::daykey::DayKeyRatchet;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::facility::Registration;
use shared::partition::{Partition, session_actor};
use shared::sync::harness::{MemoryStore, PairSetup, run_pair};
use shared::sync::{Decision, Peer};
use shared::time::{DAY_SECONDS, Day, UnixSeconds};
use shared::unseal::unseal_partition;
use shared::{DeviceId, FacilityId, PartitionId, RecordId};
use std::error::Error;
use std::path::Path;
use std::time::{Duration, Instant};
use sync_hub::Hub;
use sync_hub::ledger::Ledger;

const FACILITIES: u32 = 4;
const DAYS: u32 = 5;
const RECORDS: usize = 5_000;
/// Records per automerge change: a device folds the check-ins of one sync round into one
/// change (`Device::fold_pending`); 100 is a busy entrance syncing every half minute or so.
const RECORDS_PER_CHANGE: usize = 100;
/// One visit in fifty is a paper-log entry.
const PAPER_EVERY: usize = 50;
/// The hub's clock: noon of day 20,010, so days 20,005..=20,009 are live.
const NOW: UnixSeconds = 20_010 * DAY_SECONDS + 12 * 3_600;
const FIRST_DAY: u32 = 20_005;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn registration(i: u32) -> Registration {
    Registration {
        name: format!("Hall {i}"),
        business_number: None,
        representative: "Lee".into(),
        phone: "031-000-0000".into(),
        category: "wedding_hall".into(),
        region: "suwon".into(),
        address: format!("{i} Gwanggyo-ro"),
    }
}

/// A hub with `FACILITIES` approved facilities and one device each.
fn hub(dir: &Path) -> Result<(Hub, Vec<(FacilityId, DeviceId)>)> {
    let hub = Hub::init(dir, "suwon", None, vec![], None, NOW)?.hub;
    let mut out = Vec::new();
    for i in 0..FACILITIES {
        let f = hub.add_facility(registration(i), NOW)?;
        hub.approve_facility(f.id.as_str())?;
        let ticket = hub.enroll(f.id.as_str(), "gate", NOW)?;
        out.push((f.id, ticket.device_id));
    }
    Ok((hub, out))
}

/// A device's partition of `RECORDS` check-ins, one automerge change each.
fn device_partition(
    rng: &mut StdRng,
    ratchet: &DayKeyRatchet,
    facility: &FacilityId,
    device: &DeviceId,
    day: Day,
) -> Result<Partition> {
    let id = PartitionId {
        facility: facility.clone(),
        day,
    };
    let public = ratchet.public(day).ok_or("no public key for the day")?;
    let key = SessionKey::generate(rng, day);
    let mut p = Partition::new(id.clone(), &session_actor(device, rng));
    p.insert_wrapped_key(&key.wrap(&public)?)?;
    let mut batch = Vec::with_capacity(RECORDS_PER_CHANGE);
    for i in 0..RECORDS {
        let scanned_at = day.start() + rng.gen_range(0..DAY_SECONDS);
        let body = if i % PAPER_EVERY == 0 {
            RecordBody::Paper {
                sealed_for_authority: vec![0x55; 300],
            }
        } else {
            RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: scanned_at - 20,
                token: rng.r#gen(),
            }
        };
        let record = Record {
            facility: facility.clone(),
            device: device.clone(),
            scanned_at,
            body,
        };
        let rid = RecordId::random(rng);
        batch.push((rid, key.seal(rng, &id, rid, &record)?));
        if batch.len() == RECORDS_PER_CHANGE {
            p.insert_batch(&[], &batch)?;
            batch.clear();
        }
    }
    p.insert_batch(&[], &batch)?;
    Ok(p)
}

/// A second hub in `dir` holding the first hub's day keys, so that it can open the same
/// partitions from an empty ledger.
fn twin(dir: &Path, source: &Hub) -> Result<(Hub, Vec<(FacilityId, DeviceId)>)> {
    let (twin, devices) = hub(dir)?;
    twin.keys().store_ratchet(&source.keys().ratchet()?)?;
    Ok((twin, devices))
}

/// Every automerge sync message a device sends to a hub that holds nothing of `device` yet,
/// encoded, found by running the exchange once against a throwaway copy.
fn device_messages(device: &Partition) -> Result<Vec<Vec<u8>>> {
    let mut dev = Partition::new(device.id().clone(), b"bench-device-replay");
    dev.merge(device)?;
    let mut hub = Partition::new(device.id().clone(), b"bench-hub-replay");
    let (mut dev_state, mut hub_state) = (SyncState::new(), SyncState::new());
    let mut sent = Vec::new();
    for _ in 0..64 {
        let to_hub = dev.doc().generate_sync_message(&mut dev_state);
        let moved = to_hub.is_some();
        if let Some(m) = to_hub {
            sent.push(m.clone().encode());
            hub.doc_mut().receive_sync_message(&mut hub_state, m)?;
        }
        let to_dev = hub.doc().generate_sync_message(&mut hub_state);
        let answered = to_dev.is_some();
        if let Some(m) = to_dev {
            dev.doc_mut().receive_sync_message(&mut dev_state, m)?;
        }
        if !moved && !answered {
            return Ok(sent);
        }
    }
    Err("the recorded sync did not settle in 64 rounds".into())
}

/// The hub's side of first syncs: decode and apply each recorded device message, answer it,
/// then persist and index the partition. Returns the records indexed and the time persisting.
/// Not inlined, so that a profile of the bench can tell it apart from the set-up.
#[inline(never)]
fn hub_side(
    ledger: &Ledger<'_>,
    recorded: &[(PartitionId, Vec<Vec<u8>>)],
) -> Result<(u64, Duration)> {
    let mut indexed = 0u64;
    let mut persisting = Duration::ZERO;
    for (id, messages) in recorded {
        let mut parts = ledger.partitions(id.facility.clone(), NOW);
        let hub_copy = shared::sync::PartitionStore::create_partition(&mut parts, id)?;
        let mut state = SyncState::new();
        for m in messages {
            hub_copy
                .doc_mut()
                .receive_sync_message(&mut state, Message::decode(m)?)?;
            let _reply = hub_copy.doc().generate_sync_message(&mut state);
        }
        let t = Instant::now();
        indexed += parts.persist(id)?;
        persisting += t.elapsed();
    }
    Ok((indexed, persisting))
}

fn rate(records: usize, d: Duration) -> f64 {
    records as f64 / d.as_secs_f64().max(1e-9)
}

fn main() -> Result<()> {
    let total = (FACILITIES * DAYS) as usize * RECORDS;
    let tmp = tempfile::tempdir()?;
    let mut rng = StdRng::seed_from_u64(2024);

    // Setup: the partitions, sealed to the first hub's day keys.
    let built = Instant::now();
    let (hub_a, devices_a) = hub(&tmp.path().join("a"))?;
    let ratchet = hub_a.keys().ratchet()?;
    let mut partitions: Vec<(usize, Partition)> = Vec::new();
    for (i, (f, d)) in devices_a.iter().enumerate() {
        for day in FIRST_DAY..FIRST_DAY + DAYS {
            partitions.push((i, device_partition(&mut rng, &ratchet, f, d, Day(day))?));
        }
    }
    let build_time = built.elapsed();

    // Baseline: unseal every record, nothing else.
    let start = Instant::now();
    let mut opened = 0usize;
    for (_, p) in &partitions {
        opened += unseal_partition(p, |day| ratchet.secret(day)).records.len();
    }
    let unseal_time = start.elapsed();
    if opened != total {
        return Err(format!("unsealed {opened} of {total} records").into());
    }

    // 0. The hub's side of each device's first sync: the automerge sync messages a device sends
    //    to an empty hub are recorded beforehand; the hub decodes and applies them, answers,
    //    and persists and indexes the partition. This is the hub's ingest cost.
    let mut recorded: Vec<(PartitionId, Vec<Vec<u8>>)> = Vec::new();
    for (_, p) in &partitions {
        recorded.push((p.id().clone(), device_messages(p)?));
    }
    let (hub_c, _) = twin(&tmp.path().join("c"), &hub_a)?;
    let ledger_c = Ledger::open(hub_c.store(), hub_c.keys())?;
    let start = Instant::now();
    let (received_indexed, received_persist) = hub_side(&ledger_c, &recorded)?;
    let received_time = start.elapsed();

    // 1. Real sync sessions (frames encoded and decoded) into a fresh ledger, each merged
    //    partition persisted and indexed in one write transaction.
    let ledger_a = Ledger::open(hub_a.store(), hub_a.keys())?;
    let mut session_indexed = 0u64;
    let mut wire_bytes = 0u64;
    let start = Instant::now();
    for (i, (facility, device)) in devices_a.iter().enumerate() {
        let mut store = MemoryStore::new(b"bench-device", Some(facility.clone()));
        for (_, p) in partitions.iter().filter(|(owner, _)| *owner == i) {
            let mut copy = Partition::new(p.id().clone(), b"bench-device-copy");
            copy.merge(p)?;
            store.insert(copy);
        }
        let setup = PairSetup {
            initiator: Peer::Device {
                device: device.clone(),
                facility: facility.clone(),
            },
            responder: Peer::Hub {
                region: "suwon".into(),
            },
            credential: None,
            push_only: false,
        };
        let admitted = facility.clone();
        let mut parts = ledger_a.partitions(facility.clone(), NOW);
        let outcome = run_pair(NOW, &setup, &mut store, &mut parts, |_| Decision::Admit {
            facility: admitted.clone(),
            refresh: None,
        })?;
        if !outcome.completed() {
            return Err("a sync session did not complete".into());
        }
        wire_bytes += outcome.bytes_i_to_r;
        session_indexed += parts.persist_all()?;
    }
    let session_time = start.elapsed();

    // 2. Direct merges into a second fresh ledger, timing persist + index apart.
    let (hub_b, _) = twin(&tmp.path().join("b"), &hub_a)?;
    let ledger_b = Ledger::open(hub_b.store(), hub_b.keys())?;
    let mut merge_indexed = 0u64;
    let mut persist_time = Duration::ZERO;
    let start = Instant::now();
    for (_, p) in &partitions {
        let mut parts = ledger_b.partitions(p.id().facility.clone(), NOW);
        let hub_copy = shared::sync::PartitionStore::create_partition(&mut parts, p.id())?;
        hub_copy.merge(p)?;
        let t = Instant::now();
        merge_indexed += parts.persist(p.id())?;
        persist_time += t.elapsed();
    }
    let merge_time = start.elapsed();

    // 3. Re-persisting what is already indexed (an idle sync): the skip path.
    let start = Instant::now();
    let mut again = 0u64;
    for (_, p) in &partitions {
        let mut parts = ledger_b.partitions(p.id().facility.clone(), NOW);
        let hub_copy = shared::sync::PartitionStore::partition_mut(&mut parts, p.id())?
            .ok_or("a persisted partition does not load")?;
        hub_copy.merge(p)?;
        again += parts.persist(p.id())?;
    }
    let idle_time = start.elapsed();

    // Traces over the ingested ledger: tokens drawn from the partitions.
    let mut tokens = Vec::new();
    for (_, p) in partitions.iter().step_by(2) {
        let unsealed = unseal_partition(p, |day| ratchet.secret(day));
        if let Some(RecordBody::Qr { token, .. }) =
            unsealed.records.values().nth(17).map(|r| &r.body)
        {
            tokens.push(*token);
        }
    }
    let start = Instant::now();
    let mut contacts = 0usize;
    for t in &tokens {
        contacts += ledger_b.trace(&[*t], 30, NOW)?.contacts.len();
    }
    let trace_time = start.elapsed();

    let expected = total as u64;
    if received_indexed != expected
        || session_indexed != expected
        || merge_indexed != expected
        || again != 0
    {
        return Err(format!(
            "indexed {received_indexed} (hub side), {session_indexed} (sessions), \
             {merge_indexed} (merges), then {again} again; expected {total} thrice, then 0"
        )
        .into());
    }

    let db_bytes = std::fs::metadata(tmp.path().join("b").join("hub.redb"))?.len();
    let base = rate(total, unseal_time);
    println!(
        "ingest: {FACILITIES} facilities x {DAYS} days = {} partitions x {RECORDS} records = \
         {total} records (built in {:.1} s)",
        FACILITIES * DAYS,
        build_time.as_secs_f64()
    );
    println!();
    println!(
        "| {:<44} | {:>9} | {:>10} | {:>13} |",
        "phase", "seconds", "records/s", "vs unseal"
    );
    println!("|{:-<46}|{:->11}|{:->12}|{:->15}|", "", "", "", "");
    let row = |name: &str, d: Duration, n: usize| {
        let r = rate(n, d);
        println!(
            "| {:<44} | {:>9.3} | {:>10.0} | {:>12.2}x |",
            name,
            d.as_secs_f64(),
            r,
            r / base
        );
    };
    row("unseal only (baseline)", unseal_time, total);
    row(
        "hub side of first syncs: receive + persist",
        received_time,
        total,
    );
    row("  of which persist + index", received_persist, total);
    row("both sides of sync sessions + persist", session_time, total);
    row("merge + persist + index", merge_time, total);
    row("  of which persist + index", persist_time, total);
    row(
        "idle re-sync: merge + persist, nothing new",
        idle_time,
        total,
    );
    println!();
    println!(
        "wire: {:.0} bytes a record through sessions; hub.redb: {:.0} bytes a record; \
         traces: {:.1} ms each ({} tokens, {contacts} contacts in all)",
        wire_bytes as f64 / total as f64,
        db_bytes as f64 / total as f64,
        trace_time.as_secs_f64() * 1e3 / tokens.len().max(1) as f64,
        tokens.len()
    );
    let target = 50_000.0;
    let hub_rate = rate(total, received_time);
    println!(
        "target {target:.0} records/s merged and indexed at the hub: {} ({hub_rate:.0})",
        if hub_rate >= target { "met" } else { "NOT met" }
    );
    Ok(())
}
