//! Per-device quotas at the hub, through its connection driver (`daemon::Conn`) in memory: a
//! device that would go over its records per day is refused with `QuotaExceeded` and nothing
//! of that session is stored, other devices sync on, and the next UTC day the device delivers
//! again; a session that sends more than its bytes quota is refused the same way.

use rand::SeedableRng;
use rand::rngs::StdRng;
use redb::ReadableDatabase;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::facility::Registration;
use shared::partition::{Partition, session_actor};
use shared::sync::harness::MemoryStore;
use shared::sync::{Event, Frame, FrameDecoder, Peer, RefuseReason, Session, Side};
use shared::time::{DAY_SECONDS, Day, UnixSeconds};
use shared::{DeviceId, FacilityId, PartitionId, RecordId};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use sync_hub::Hub;
use sync_hub::daemon::{Conn, Metrics, Output, Quotas};
use sync_hub::ledger::{Ledger, PARTITION_COUNTS};
use tokio::sync::mpsc;

const DAY: Day = Day(20_000);
const NOW: UnixSeconds = 20_000 * DAY_SECONDS + 12 * 3_600;

/// One entrance device: its identity, endpoint key, store and session key of `DAY`.
struct Device {
    id: DeviceId,
    credential: [u8; 32],
    secret: iroh::SecretKey,
    store: MemoryStore,
    key: SessionKey,
    rng: StdRng,
    /// Distinct tokens for the device's visits.
    next_token: u16,
}

struct Setup {
    _tmp: tempfile::TempDir,
    hub: Hub,
    facility: FacilityId,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let hub = Hub::init(&tmp.path().join("hub"), "suwon", None, vec![], None, NOW)
        .unwrap_or_else(|e| panic!("init: {e}"))
        .hub;
    let reg = Registration {
        name: "Hall A".into(),
        business_number: None,
        representative: "Lee".into(),
        phone: "031-000-0000".into(),
        category: "wedding_hall".into(),
        region: "suwon".into(),
        address: "Hall A 2 Gwanggyo-ro".into(),
    };
    let f = hub
        .add_facility(reg, NOW)
        .unwrap_or_else(|e| panic!("add: {e}"));
    hub.approve_facility(f.id.as_str())
        .unwrap_or_else(|e| panic!("approve: {e}"));
    Setup {
        _tmp: tmp,
        hub,
        facility: f.id,
    }
}

fn partition_id(s: &Setup) -> PartitionId {
    PartitionId {
        facility: s.facility.clone(),
        day: DAY,
    }
}

/// Enrolls a device of the facility with an empty partition of `DAY` holding its wrapped key.
fn enroll(s: &Setup, name: &str, seed: u64) -> Device {
    let ticket = s
        .hub
        .enroll(s.facility.as_str(), name, NOW)
        .unwrap_or_else(|e| panic!("enroll: {e}"));
    let mut rng = StdRng::seed_from_u64(seed);
    let ratchet = s
        .hub
        .keys()
        .ratchet()
        .unwrap_or_else(|e| panic!("ratchet: {e}"));
    let public = ratchet
        .public(DAY)
        .unwrap_or_else(|| panic!("a public key for the day"));
    let key = SessionKey::generate(&mut rng, DAY);
    let wrapped = key.wrap(&public).unwrap_or_else(|e| panic!("wrap: {e}"));
    let mut p = Partition::new(partition_id(s), &session_actor(&ticket.device_id, &mut rng));
    p.insert_wrapped_key(&wrapped)
        .unwrap_or_else(|e| panic!("key: {e}"));
    let mut store = MemoryStore::new(name.as_bytes(), Some(s.facility.clone()));
    store.insert(p);
    Device {
        id: ticket.device_id,
        credential: ticket.credential.0,
        secret: iroh::SecretKey::generate(),
        store,
        key,
        rng,
        next_token: u16::try_from(seed * 1_000).unwrap_or_else(|e| panic!("{e}")),
    }
}

/// `n` more QR visits of `DAY`, sealed as an edge device seals them.
fn check_in(s: &Setup, d: &mut Device, n: usize) {
    let id = partition_id(s);
    for _ in 0..n {
        d.next_token = d.next_token.wrapping_add(1);
        let t = NOW - 3_600 + u64::from(d.next_token % 1_000);
        let mut token = [7u8; 16];
        token[..2].copy_from_slice(&d.next_token.to_be_bytes());
        let record = Record {
            facility: s.facility.clone(),
            device: d.id.clone(),
            scanned_at: t,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: t - 5,
                token,
            },
        };
        let rid = RecordId::random(&mut d.rng);
        let env = d
            .key
            .seal(&mut d.rng, &id, rid, &record)
            .unwrap_or_else(|e| panic!("seal: {e}"));
        d.store
            .get_mut(&id)
            .unwrap_or_else(|| panic!("the device's partition"))
            .insert_record(rid, &env)
            .unwrap_or_else(|e| panic!("insert: {e}"));
    }
}

fn decode(bytes: &[u8]) -> Vec<Frame> {
    let mut d = FrameDecoder::new();
    d.push(bytes).unwrap_or_else(|e| panic!("push: {e}"));
    let mut out = Vec::new();
    while let Some(f) = d.pop().unwrap_or_else(|e| panic!("pop: {e}")) {
        out.push(f);
    }
    out
}

/// Runs one session at `now` between the device and the hub's connection driver held to
/// `quotas`; returns the device's events and the hub's metrics.
fn session(s: &Setup, d: &mut Device, quotas: Quotas, now: UnixSeconds) -> (Vec<Event>, Metrics) {
    let ledger = Ledger::open(s.hub.store(), s.hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let metrics = Metrics::default();
    let (tx, mut rx) = mpsc::channel(1024);
    let mut conn = Conn::new(
        &s.hub,
        d.secret.public(),
        None,
        tx,
        Arc::new(AtomicBool::new(false)),
    )
    .with_quotas(quotas);
    let me = Peer::Device {
        device: d.id.clone(),
        facility: s.facility.clone(),
    };
    let mut device = Session::initiator_to(now, me, None, Some(d.credential), None, true, &d.store)
        .unwrap_or_else(|e| panic!("initiator: {e}"));
    let mut events = Vec::new();
    // A session of one partition takes a handful of rounds; 100 bounds a broken one.
    for _ in 0..100 {
        let mut progressed = false;
        while let Some(f) = device.poll_transmit() {
            progressed = true;
            let bytes = f.encode().unwrap_or_else(|e| panic!("encode: {e}"));
            for f in decode(&bytes) {
                conn.on_frame(&s.hub, &ledger, f, now, &metrics);
            }
        }
        while let Ok(out) = rx.try_recv() {
            progressed = true;
            if let Output::Bytes(b) = out {
                for f in decode(&b) {
                    device.handle_frame(now, f, &mut d.store);
                }
            }
        }
        while let Some(e) = device.poll_event() {
            events.push(e);
        }
        if !progressed {
            break;
        }
    }
    assert!(device.is_finished(), "the session ended: {events:?}");
    assert!(conn.is_finished());
    (events, metrics)
}

fn finished(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Finished(_)))
}

/// The detail of the hub's `QuotaExceeded` refusal, if the device got one.
/// The hub's quota refusal the device was told of: of the session (bytes, time) or of one
/// day's partition (records and keys per device per day; the session then goes on).
fn quota_refusal(events: &[Event]) -> Option<String> {
    events.iter().find_map(|e| match e {
        Event::Refused {
            by: Side::Peer,
            reason: RefuseReason::QuotaExceeded,
            detail,
        }
        | Event::PartitionRefused {
            by: Side::Peer,
            reason: RefuseReason::QuotaExceeded,
            detail,
            ..
        } => Some(detail.clone()),
        _ => None,
    })
}

/// Records the hub has stored for the facility's partition of `DAY`.
fn stored_records(s: &Setup) -> u64 {
    let txn = s
        .hub
        .store()
        .db()
        .begin_read()
        .unwrap_or_else(|e| panic!("{e}"));
    match txn.open_table(PARTITION_COUNTS) {
        Ok(t) => t
            .get((s.facility.as_str(), DAY.0))
            .unwrap_or_else(|e| panic!("{e}"))
            .map_or(0, |g| g.value()),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => panic!("{e}"),
    }
}

fn day_count(s: &Setup, d: &Device, day: Day) -> u64 {
    Ledger::open(s.hub.store(), s.hub.keys())
        .unwrap_or_else(|e| panic!("{e}"))
        .device_day_records(&d.id, day)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_device_over_its_records_per_day_is_refused_and_syncs_again_the_next_day() {
    let s = setup();
    let quotas = Quotas {
        device_records_per_day: 5,
        ..Quotas::default()
    };
    let mut gate = enroll(&s, "gate", 1);
    let mut side = enroll(&s, "side", 2);

    // Within the quota: delivered and counted.
    check_in(&s, &mut gate, 3);
    let (events, _) = session(&s, &mut gate, quotas, NOW);
    assert!(finished(&events), "{events:?}");
    assert_eq!(stored_records(&s), 3);
    assert_eq!(day_count(&s, &gate, DAY), 3);

    // Three more would make six: refused, and nothing of the session stored.
    check_in(&s, &mut gate, 3);
    let (events, metrics) = session(&s, &mut gate, quotas, NOW + 60);
    let detail = quota_refusal(&events)
        .unwrap_or_else(|| panic!("the device is told it is over its quota: {events:?}"));
    assert!(detail.contains("per device per day"), "{detail}");
    // Only that day's partition is refused: the session itself completes. The device's last
    // contact stays at the session that delivered everything (finding F2 of the second
    // review: traces read it as "nothing unsynced before this").
    assert!(finished(&events), "{events:?}");
    let last_sync = |s: &Setup| {
        s.hub
            .store()
            .device(&gate.id)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("the gate is enrolled"))
            .last_sync
    };
    assert_eq!(
        last_sync(&s),
        Some(NOW),
        "a refused day does not move last contact"
    );
    assert_eq!(
        stored_records(&s),
        3,
        "nothing of the refused session stored"
    );
    assert_eq!(day_count(&s, &gate, DAY), 3);
    assert_eq!(metrics.records_ingested.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.quota_refusals.load(Ordering::Relaxed), 1);

    // Another device of the same facility is not held to the gate's count.
    check_in(&s, &mut side, 4);
    let (events, _) = session(&s, &mut side, quotas, NOW + 120);
    assert!(finished(&events), "{events:?}");
    assert_eq!(stored_records(&s), 7);
    assert_eq!(day_count(&s, &side, DAY), 4);

    // The next UTC day the gate delivers what was refused (its partition of DAY is live).
    let tomorrow = NOW + DAY_SECONDS;
    let (events, _) = session(&s, &mut gate, quotas, tomorrow);
    assert!(finished(&events), "{events:?}");
    assert_eq!(stored_records(&s), 10);
    assert_eq!(day_count(&s, &gate, Day::of(tomorrow)), 3);
}

#[test]
fn a_session_over_its_bytes_is_refused_and_stores_nothing() {
    let s = setup();
    let mut gate = enroll(&s, "gate", 3);
    check_in(&s, &mut gate, 40);
    // 40 sealed visits and a wrapped key are several kilobytes: over 2 KiB.
    let quotas = Quotas {
        session_bytes: 2 * 1024,
        ..Quotas::default()
    };
    let (events, metrics) = session(&s, &mut gate, quotas, NOW);
    let detail = quota_refusal(&events)
        .unwrap_or_else(|| panic!("the device is told it is over its quota: {events:?}"));
    assert!(detail.contains("bytes per session"), "{detail}");
    assert!(!finished(&events), "{events:?}");
    assert_eq!(stored_records(&s), 0);
    assert_eq!(metrics.records_ingested.load(Ordering::Relaxed), 0);

    // With the default quota the same device delivers all of it.
    let (events, _) = session(&s, &mut gate, Quotas::default(), NOW + 60);
    assert!(finished(&events), "{events:?}");
    assert_eq!(stored_records(&s), 40);
}

/// `n` more wrapped keys in the device's partition of `DAY`, as many processes would make.
fn add_wrapped_keys(s: &Setup, d: &mut Device, n: usize) {
    let public = s
        .hub
        .keys()
        .ratchet()
        .unwrap_or_else(|e| panic!("ratchet: {e}"))
        .public(DAY)
        .unwrap_or_else(|| panic!("a public key for the day"));
    for _ in 0..n {
        let key = SessionKey::generate(&mut d.rng, DAY);
        let wrapped = key.wrap(&public).unwrap_or_else(|e| panic!("wrap: {e}"));
        d.store
            .get_mut(&partition_id(s))
            .unwrap_or_else(|| panic!("the device's partition"))
            .insert_wrapped_key(&wrapped)
            .unwrap_or_else(|e| panic!("key: {e}"));
    }
}

fn day_keys(s: &Setup, d: &Device, day: Day) -> u64 {
    Ledger::open(s.hub.store(), s.hub.keys())
        .unwrap_or_else(|e| panic!("{e}"))
        .device_day_keys(&d.id, day)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn wrapped_keys_count_against_their_own_quota_per_device_per_day() {
    let s = setup();
    let quotas = Quotas {
        device_keys_per_day: 3,
        ..Quotas::default()
    };
    let mut gate = enroll(&s, "gate", 4);
    // Its own key and one more, with a visit: within both quotas.
    add_wrapped_keys(&s, &mut gate, 1);
    check_in(&s, &mut gate, 1);
    let (events, _) = session(&s, &mut gate, quotas, NOW);
    assert!(finished(&events), "{events:?}");
    assert_eq!(day_keys(&s, &gate, DAY), 2);
    assert_eq!(day_count(&s, &gate, DAY), 1);

    // A flood of wrapped keys and no records at all: the records quota never sees it.
    add_wrapped_keys(&s, &mut gate, 20);
    let (events, metrics) = session(&s, &mut gate, quotas, NOW + 60);
    let detail = quota_refusal(&events)
        .unwrap_or_else(|| panic!("the device is told it is over its quota: {events:?}"));
    assert!(
        detail.contains("wrapped keys per device per day"),
        "{detail}"
    );
    assert_eq!(metrics.quota_refusals.load(Ordering::Relaxed), 1);
    assert_eq!(
        day_keys(&s, &gate, DAY),
        2,
        "nothing of the refused session counted"
    );
    let ledger = Ledger::open(s.hub.store(), s.hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let stored = ledger
        .load(&partition_id(&s))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("the partition is stored"));
    assert_eq!(stored.wrapped_keys().len(), 2, "no key of the flood stored");

    // The next UTC day the keys go through (the partition of DAY is still live).
    let tomorrow = NOW + DAY_SECONDS;
    let (events, _) = session(&s, &mut gate, Quotas::default(), tomorrow);
    assert!(finished(&events), "{events:?}");
    assert_eq!(day_keys(&s, &gate, Day::of(tomorrow)), 20);
}
