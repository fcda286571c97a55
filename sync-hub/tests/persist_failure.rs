//! A failed persist is a failure: the hub's connection driver (`daemon::Conn`, what the actor
//! runs for every sync connection) aborts the session with `Internal`, stores no sync state
//! and counts it, when the ledger refuses to persist a partition. The failure is a real one:
//! a damaged `indexed-2` row, which `Ledger::persist_counted` refuses to build on.

use rand::SeedableRng;
use rand::rngs::StdRng;
use redb::{ReadableDatabase, ReadableTableMetadata};
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
use sync_hub::daemon::{Conn, Metrics, Output};
use sync_hub::ledger::{INDEXED, Ledger, SYNC_STATES};
use tokio::sync::mpsc;

const DAY: Day = Day(20_000);
const NOW: UnixSeconds = 20_000 * DAY_SECONDS + 12 * 3_600;

struct Setup {
    _tmp: tempfile::TempDir,
    hub: Hub,
    facility: FacilityId,
    device: DeviceId,
    credential: [u8; 32],
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
    let ticket = hub
        .enroll(f.id.as_str(), "gate", NOW)
        .unwrap_or_else(|e| panic!("enroll: {e}"));
    Setup {
        _tmp: tmp,
        hub,
        facility: f.id,
        device: ticket.device_id,
        credential: ticket.credential.0,
    }
}

/// The device's partition of `DAY` with three QR visits, sealed as an edge device seals them.
fn device_partition(s: &Setup) -> Partition {
    let rng = &mut StdRng::seed_from_u64(7);
    let id = PartitionId {
        facility: s.facility.clone(),
        day: DAY,
    };
    let ratchet = s
        .hub
        .keys()
        .ratchet()
        .unwrap_or_else(|e| panic!("ratchet: {e}"));
    let public = ratchet
        .public(DAY)
        .unwrap_or_else(|| panic!("a public key for the day"));
    let key = SessionKey::generate(rng, DAY);
    let wrapped = key.wrap(&public).unwrap_or_else(|e| panic!("wrap: {e}"));
    let mut p = Partition::new(id.clone(), &session_actor(&s.device, rng));
    p.insert_wrapped_key(&wrapped)
        .unwrap_or_else(|e| panic!("key: {e}"));
    for n in 0..3u8 {
        let t = NOW - 3_600 + u64::from(n) * 60;
        let record = Record {
            facility: s.facility.clone(),
            device: s.device.clone(),
            scanned_at: t,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: t - 5,
                token: [n; 16],
            },
        };
        let rid = RecordId::random(rng);
        let env = key
            .seal(rng, &id, rid, &record)
            .unwrap_or_else(|e| panic!("seal: {e}"));
        p.insert_record(rid, &env)
            .unwrap_or_else(|e| panic!("insert: {e}"));
    }
    p
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

/// Runs one session between a device and the hub's connection driver, in memory; returns the
/// device's events and the hub's metrics.
fn session(s: &Setup) -> (Vec<Event>, Metrics) {
    let ledger = Ledger::open(s.hub.store(), s.hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let metrics = Metrics::default();
    let (tx, mut rx) = mpsc::channel(1024);
    let remote = iroh::SecretKey::generate().public();
    let mut conn = Conn::new(&s.hub, remote, None, tx, Arc::new(AtomicBool::new(false)));
    let mut store = MemoryStore::new(b"device-test", Some(s.facility.clone()));
    store.insert(device_partition(s));
    let me = Peer::Device {
        device: s.device.clone(),
        facility: s.facility.clone(),
    };
    let mut device = Session::initiator_to(NOW, me, None, Some(s.credential), None, true, &store)
        .unwrap_or_else(|e| panic!("initiator: {e}"));
    let mut events = Vec::new();
    // A session of one partition takes a handful of rounds; 100 bounds a broken one.
    for _ in 0..100 {
        let mut progressed = false;
        while let Some(f) = device.poll_transmit() {
            progressed = true;
            let bytes = f.encode().unwrap_or_else(|e| panic!("encode: {e}"));
            for f in decode(&bytes) {
                conn.on_frame(&s.hub, &ledger, f, NOW, &metrics);
            }
        }
        while let Ok(out) = rx.try_recv() {
            progressed = true;
            if let Output::Bytes(b) = out {
                for f in decode(&b) {
                    device.handle_frame(NOW, f, &mut store);
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

fn sync_states(s: &Setup) -> u64 {
    let txn = s
        .hub
        .store()
        .db()
        .begin_read()
        .unwrap_or_else(|e| panic!("{e}"));
    match txn.open_table(SYNC_STATES) {
        Ok(t) => t.len().unwrap_or_else(|e| panic!("{e}")),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_healthy_hub_completes_the_session_and_stores_its_sync_state() {
    let s = setup();
    let (events, metrics) = session(&s);
    assert!(
        events.iter().any(|e| matches!(e, Event::Finished(_))),
        "{events:?}"
    );
    assert!(sync_states(&s) > 0);
    assert_eq!(metrics.persist_failures.load(Ordering::Relaxed), 0);
    assert_eq!(metrics.records_ingested.load(Ordering::Relaxed), 3);
}

#[test]
fn a_persist_the_ledger_refuses_aborts_the_session_and_stores_no_sync_state() {
    let s = setup();
    // A damaged indexed-2 row (not whole 16-byte ids): persist_counted refuses the partition.
    {
        let txn = s
            .hub
            .store()
            .db()
            .begin_write()
            .unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(INDEXED)
            .unwrap_or_else(|e| panic!("{e}"))
            .insert((s.facility.as_str(), DAY.0, 0u64), [1u8; 5].as_slice())
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
    }
    let (events, metrics) = session(&s);
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::Refused {
                by: Side::Peer,
                reason: RefuseReason::Internal,
                ..
            }
        )),
        "the device is told the hub failed: {events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, Event::Finished(_))),
        "{events:?}"
    );
    assert_eq!(
        sync_states(&s),
        0,
        "no sync state claims what was not stored"
    );
    assert_eq!(metrics.persist_failures.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.records_ingested.load(Ordering::Relaxed), 0);
}
