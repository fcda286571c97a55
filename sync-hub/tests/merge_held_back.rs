//! A change automerge holds back in one session's copy of a partition is applied when the hub
//! merges what another session stored into that copy (`Ledger::catch_up`, at the copy's next
//! persist), outside the session's checks. Found in review: a change numbered 2 of an actor
//! automerge never saw numbered 1, held back for a dependency another session then stored,
//! panicked automerge (an `unwrap`) on the hub's actor thread, ending the hub. The persist
//! must refuse that copy (`Conflict`, which the actor answers by refusing the partition and
//! dropping the copy) and keep what was stored.

use automerge::ReadDoc;
use rand::SeedableRng;
use rand::rngs::StdRng;
use shared::envelope::{Envelope, Record, RecordBody, SessionKey};
use shared::facility::Registration;
use shared::partition::Partition;
use shared::sync::{Event, PartitionStore, Peer, Session};
use shared::time::{DAY_SECONDS, Day, UnixSeconds};
use shared::{DeviceId, FacilityId, PartitionId, RecordId};
use sync_hub::Hub;
use sync_hub::ledger::{Ledger, LedgerError};

const DAY: Day = Day(20_000);
const NOW: UnixSeconds = 20_000 * DAY_SECONDS + 12 * 3_600;

fn sealed(rng: &mut StdRng, key: &SessionKey, pid: &PartitionId, id: RecordId, s: u64) -> Envelope {
    let record = Record {
        facility: pid.facility.clone(),
        device: DeviceId::parse("dev_a").unwrap_or_else(|e| panic!("{e}")),
        scanned_at: pid.day.start() + s,
        body: RecordBody::Qr {
            issuer_id: 1,
            key_id: 1,
            issued_at: pid.day.start(),
            token: [s as u8; 16],
        },
    };
    key.seal(rng, pid, id, &record)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The last change of `p`, raw.
fn last_raw(p: &Partition) -> Vec<u8> {
    p.doc()
        .get_change_by_hash(&p.heads()[0])
        .unwrap_or_else(|| panic!("no head"))
        .raw_bytes()
        .to_vec()
}

/// One record of a fresh actor `actor` put on top of `base` (or of nothing).
fn put(
    rng: &mut StdRng,
    key: &SessionKey,
    pid: &PartitionId,
    actor: u8,
    base: Option<&Partition>,
    s: u64,
) -> Partition {
    let mut p = Partition::new(pid.clone(), &[actor; 16]);
    if let Some(b) = base {
        p.merge(b).unwrap_or_else(|e| panic!("{e}"));
    }
    let id = RecordId::random(rng);
    p.insert_batch(&[], &[(id, sealed(rng, key, pid, id, s))])
        .unwrap_or_else(|e| panic!("{e}"));
    p
}

fn admitted(store: &mut impl PartitionStore, dev: &DeviceId, fac: &FacilityId) -> Session {
    let hub = Peer::Hub {
        region: "suwon".into(),
    };
    let device = Peer::Device {
        device: dev.clone(),
        facility: fac.clone(),
    };
    shared::sync::harness::admitted_responder(hub, device, NOW, store)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn updated(s: &mut Session) -> bool {
    let events: Vec<Event> = std::iter::from_fn(|| s.poll_event()).collect();
    while s.poll_transmit().is_some() {}
    events
        .iter()
        .any(|e| matches!(e, Event::PartitionUpdated { .. }))
}

#[test]
fn a_change_held_back_in_a_sessions_copy_cannot_panic_the_merge_of_what_another_stored() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let hub = Hub::init(&tmp.path().join("hub"), "suwon", None, vec![], None, NOW)
        .unwrap_or_else(|e| panic!("{e}"))
        .hub;
    let reg = Registration {
        name: "Hall".into(),
        business_number: None,
        representative: "Lee".into(),
        phone: "031-000-0000".into(),
        category: "wedding_hall".into(),
        region: "suwon".into(),
        address: "Gwanggyo-ro 7".into(),
    };
    let f = hub.add_facility(reg, NOW).unwrap_or_else(|e| panic!("{e}"));
    hub.approve_facility(f.id.as_str())
        .unwrap_or_else(|e| panic!("{e}"));
    let dev = hub
        .enroll(f.id.as_str(), "gate", NOW)
        .unwrap_or_else(|e| panic!("{e}"))
        .device_id;
    let fac = f.id.clone();
    let pid = PartitionId {
        facility: fac.clone(),
        day: DAY,
    };

    // G1, G2: an honest actor's chain. H: another actor's change. X: a copy of a change of
    // actor `e` made on top of H, renumbered 2 (actor `e` has no change 1 anywhere).
    let rng = &mut StdRng::seed_from_u64(2);
    let key = SessionKey::generate(rng, DAY);
    let g1p = put(rng, &key, &pid, 0x61, None, 1);
    let g1 = last_raw(&g1p);
    let g2 = last_raw(&put(rng, &key, &pid, 0x61, Some(&g1p), 2));
    let hp = put(rng, &key, &pid, 0x68, None, 3);
    let h = last_raw(&hp);
    let ep = put(rng, &key, &pid, 0x65, Some(&hp), 4);
    let mut x = ep
        .doc()
        .get_change_by_hash(&ep.heads()[0])
        .unwrap_or_else(|| panic!("no head"))
        .decode();
    x.seq = 2;
    x.hash = None;
    let x = automerge::Change::from(x).raw_bytes().to_vec();

    let ledger = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    // Session 1: G1 applies, X is held back (H is missing); the copy is persisted.
    let mut p1 = ledger.partitions(fac.clone(), NOW);
    let mut s1 = admitted(&mut p1, &dev, &fac);
    s1.handle_frame(
        NOW,
        shared::sync::harness::raw_sync_frame(&pid, vec![g1, x]),
        &mut p1,
    );
    assert!(updated(&mut s1));
    p1.persist(&pid).unwrap_or_else(|e| panic!("{e}"));
    // Session 2 stores H.
    let mut p2 = ledger.partitions(fac.clone(), NOW);
    let mut s2 = admitted(&mut p2, &dev, &fac);
    s2.handle_frame(
        NOW,
        shared::sync::harness::raw_sync_frame(&pid, vec![h]),
        &mut p2,
    );
    assert!(updated(&mut s2));
    p2.persist(&pid).unwrap_or_else(|e| panic!("{e}"));
    // Session 1 goes on with G2; its persist merges what session 2 stored, which completes
    // X's dependencies.
    s1.handle_frame(
        NOW,
        shared::sync::harness::raw_sync_frame(&pid, vec![g2]),
        &mut p1,
    );
    assert!(updated(&mut s1));
    let persisted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p1.persist(&pid)));
    let Ok(persisted) = persisted else {
        panic!("the persist panicked (automerge, in the merge of what was stored)");
    };
    assert!(
        matches!(persisted, Err(LedgerError::Conflict { .. })),
        "{persisted:?}"
    );
    // What was stored is G1 and H, whole and readable.
    let mut p3 = ledger.partitions(fac.clone(), NOW);
    let stored = p3
        .partition_mut(&pid)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("nothing stored"));
    assert_eq!(stored.record_count(), 2);
}
