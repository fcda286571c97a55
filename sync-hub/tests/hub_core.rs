//! The ledger runs the hub core: what it indexes is exactly what `shared::unseal` (the opener
//! the simulation and the tests check the hub with) opens, and a tampered record neither does.

use automerge::ReadDoc;
use rand::SeedableRng;
use rand::rngs::StdRng;
use redb::{ReadableDatabase, ReadableTable};
use shared::envelope::{Envelope, Record, RecordBody, SessionKey};
use shared::facility::Registration;
use shared::partition::{Partition, session_actor};
use shared::time::{DAY_SECONDS, Day, UnixSeconds};
use shared::unseal::unseal_partition;
use shared::{PartitionId, RecordId};
use std::collections::BTreeSet;
use sync_hub::Hub;
use sync_hub::ledger::{INDEXED, Ledger};

const DAY: Day = Day(20_000);
const NOW: UnixSeconds = 20_000 * DAY_SECONDS + 12 * 3_600;

fn registration() -> Registration {
    Registration {
        name: "Hall A".into(),
        business_number: None,
        representative: "Lee".into(),
        phone: "031-000-0000".into(),
        category: "wedding_hall".into(),
        region: "suwon".into(),
        address: "Hall A 2 Gwanggyo-ro".into(),
    }
}

/// A hub in `dir` with one approved facility and one device enrolled for it.
fn hub_with_device(dir: &std::path::Path) -> (Hub, shared::FacilityId, shared::DeviceId) {
    let hub = Hub::init(&dir.join("hub"), "suwon", None, vec![], None, NOW)
        .unwrap_or_else(|e| panic!("init: {e}"))
        .hub;
    let facility = hub
        .add_facility(registration(), NOW)
        .unwrap_or_else(|e| panic!("add: {e}"))
        .id;
    hub.approve_facility(facility.as_str())
        .unwrap_or_else(|e| panic!("approve: {e}"));
    let device = hub
        .enroll(facility.as_str(), "gate", NOW)
        .unwrap_or_else(|e| panic!("enroll: {e}"))
        .device_id;
    (hub, facility, device)
}

/// The ids `indexed-2` lists.
fn indexed_ids(hub: &Hub) -> BTreeSet<RecordId> {
    let txn = hub
        .store()
        .db()
        .begin_read()
        .unwrap_or_else(|e| panic!("{e}"));
    let table = txn.open_table(INDEXED).unwrap_or_else(|e| panic!("{e}"));
    let mut ids = BTreeSet::new();
    for row in table.iter().unwrap_or_else(|e| panic!("{e}")) {
        let (_, v) = row.unwrap_or_else(|e| panic!("{e}"));
        for c in v.value().chunks_exact(16) {
            let mut id = [0u8; 16];
            id.copy_from_slice(c);
            ids.insert(RecordId(id));
        }
    }
    ids
}

#[test]
fn the_ledger_indexes_what_shared_unseal_opens_and_neither_opens_a_tampered_record() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (hub, facility, device) = hub_with_device(tmp.path());
    let ratchet = hub.keys().ratchet().unwrap_or_else(|e| panic!("{e}"));

    // A device's partition: three sound records and one whose ciphertext was tampered with.
    let rng = &mut StdRng::seed_from_u64(3);
    let id = PartitionId {
        facility: facility.clone(),
        day: DAY,
    };
    let key = SessionKey::generate(rng, DAY);
    let public = ratchet.public(DAY).unwrap_or_else(|| panic!("public key"));
    let mut p = Partition::new(id.clone(), &session_actor(&device, rng));
    p.insert_wrapped_key(&key.wrap(&public).unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut sealed = Vec::new();
    for n in 0..4u8 {
        let record = Record {
            facility: facility.clone(),
            device: device.clone(),
            scanned_at: NOW - 600 + u64::from(n),
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: NOW - 610,
                token: [n; 16],
            },
        };
        let rid = RecordId::random(rng);
        let env = key
            .seal(rng, &id, rid, &record)
            .unwrap_or_else(|e| panic!("{e}"));
        sealed.push((rid, env));
    }
    let (tampered_id, env) = sealed.pop().unwrap_or_else(|| panic!("four records"));
    let mut bytes = env.to_bytes();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let tampered = Envelope::from_bytes(&bytes).unwrap_or_else(|e| panic!("{e}"));
    for (rid, env) in &sealed {
        p.insert_record(*rid, env).unwrap_or_else(|e| panic!("{e}"));
    }
    p.insert_record(tampered_id, &tampered)
        .unwrap_or_else(|e| panic!("{e}"));

    let ledger = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let mut copy = Partition::new(id.clone(), &ledger.actor());
    copy.merge(&p).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ledger.persist(&mut copy, NOW).ok(), Some(3));

    let stored = ledger
        .load(&id)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("stored partition"));
    assert_eq!(
        stored.record_count(),
        4,
        "the tampered record is stored, not indexed"
    );
    let unsealed = unseal_partition(&stored, |d| ratchet.secret(d));
    let opened: BTreeSet<RecordId> = unsealed.records.keys().copied().collect();
    let indexed = indexed_ids(&hub);
    assert_eq!(indexed, opened);
    assert_eq!(indexed, sealed.iter().map(|(r, _)| *r).collect());
    assert!(!indexed.contains(&tampered_id));
    assert_eq!(
        unsealed
            .failures
            .iter()
            .map(|(r, _)| *r)
            .collect::<Vec<_>>(),
        vec![tampered_id]
    );
    // Persisting again retries it, and it still does not open.
    assert_eq!(ledger.persist(&mut copy, NOW).ok(), Some(0));
    assert!(!indexed_ids(&hub).contains(&tampered_id));
}

/// Finding 6 of the sync v2 review: two sessions' copies of one partition, each validated
/// against the partition as it was loaded, put one key with different bytes. The second to
/// persist merged the first's stored changes without a check, and both values were stored.
#[test]
fn a_copy_that_puts_a_key_another_session_stored_meanwhile_is_not_stored() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (hub, facility, device) = hub_with_device(tmp.path());
    let rng = &mut StdRng::seed_from_u64(6);
    let id = PartitionId {
        facility: facility.clone(),
        day: DAY,
    };
    let key = SessionKey::generate(rng, DAY);
    let seal = |rng: &mut StdRng, rid: RecordId, n: u8| {
        let record = Record {
            facility: facility.clone(),
            device: device.clone(),
            scanned_at: NOW - 600 + u64::from(n),
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: NOW - 610,
                token: [n; 16],
            },
        };
        key.seal(rng, &id, rid, &record)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let ledger = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let mut first = Partition::new(id.clone(), &ledger.actor());
    let base = RecordId::random(rng);
    first
        .insert_record(base, &seal(rng, base, 1))
        .unwrap_or_else(|e| panic!("{e}"));
    ledger
        .persist(&mut first, NOW)
        .unwrap_or_else(|e| panic!("{e}"));
    // Two sessions load the stored partition.
    let load = || {
        ledger
            .load(&id)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("stored partition"))
    };
    // Each merges what its device wrote (two devices, two actors) under the same key.
    let k = RecordId::random(rng);
    let good = seal(rng, k, 2);
    let from_device = |actor: u8, env: &Envelope| {
        let mut dev = Partition::new(id.clone(), &[actor; 16]);
        dev.merge(&load()).unwrap_or_else(|e| panic!("{e}"));
        dev.insert_record(k, env).unwrap_or_else(|e| panic!("{e}"));
        let mut copy = load();
        copy.merge(&dev).unwrap_or_else(|e| panic!("{e}"));
        copy
    };
    let mut honest = from_device(0xa1, &good);
    let mut rogue = from_device(0xb2, &seal(rng, k, 3));
    ledger
        .persist(&mut honest, NOW)
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = ledger.persist(&mut rogue, NOW);
    assert!(
        matches!(refused, Err(sync_hub::ledger::LedgerError::Conflict { .. })),
        "{refused:?}"
    );
    let stored = load();
    assert_eq!(stored.record_count(), 2);
    let values = stored
        .doc()
        .get_all(automerge::ROOT, format!("r/{k}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(values.len(), 1, "only the first value of the key is stored");
    assert_eq!(
        stored
            .records()
            .into_iter()
            .find(|(r, _)| *r == k)
            .map(|(_, e)| e.ok()),
        Some(Some(good))
    );
}
