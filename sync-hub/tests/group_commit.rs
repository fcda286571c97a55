//! Group commit at the hub: the actor's turn (`daemon::begin_turn` .. `daemon::end_turn`)
//! commits its sessions' writes without fsync and makes them durable with one commit at its
//! end, and no frame a session sent during the turn reaches its writer before that commit.
//! The sessions are the hub's real connection driver (`daemon::Conn`, what the actor runs for
//! every sync connection) against device sessions in memory, one turn a round of frames.

use rand::SeedableRng;
use rand::rngs::StdRng;
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
use sync_hub::daemon::{self, Conn, Metrics, Output};
use sync_hub::ledger::Ledger;
use tokio::sync::mpsc;

const DAY: Day = Day(20_000);
const NOW: UnixSeconds = 20_000 * DAY_SECONDS + 12 * 3_600;
const RECORDS: u8 = 5;

struct Device {
    facility: FacilityId,
    id: DeviceId,
    credential: [u8; 32],
}

fn setup(devices: usize) -> (tempfile::TempDir, Hub, Vec<Device>) {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let hub = Hub::init(&tmp.path().join("hub"), "suwon", None, vec![], None, NOW)
        .unwrap_or_else(|e| panic!("init: {e}"))
        .hub;
    let devices = (0..devices)
        .map(|n| {
            let reg = Registration {
                name: format!("Hall {n}"),
                business_number: None,
                representative: "Lee".into(),
                phone: "031-000-0000".into(),
                category: "wedding_hall".into(),
                region: "suwon".into(),
                address: format!("Hall {n} Gwanggyo-ro"),
            };
            let f = hub
                .add_facility(reg, NOW)
                .unwrap_or_else(|e| panic!("add: {e}"));
            hub.approve_facility(f.id.as_str())
                .unwrap_or_else(|e| panic!("approve: {e}"));
            let ticket = hub
                .enroll(f.id.as_str(), "gate", NOW)
                .unwrap_or_else(|e| panic!("enroll: {e}"));
            Device {
                facility: f.id,
                id: ticket.device_id,
                credential: ticket.credential.0,
            }
        })
        .collect();
    (tmp, hub, devices)
}

/// The device's partition of `DAY` with [`RECORDS`] QR visits, sealed as an edge device seals.
fn device_partition(hub: &Hub, d: &Device, seed: u64) -> Partition {
    let rng = &mut StdRng::seed_from_u64(seed);
    let id = PartitionId {
        facility: d.facility.clone(),
        day: DAY,
    };
    let ratchet = hub.keys().ratchet().unwrap_or_else(|e| panic!("{e}"));
    let public = ratchet.public(DAY).unwrap_or_else(|| panic!("day key"));
    let key = SessionKey::generate(rng, DAY);
    let wrapped = key.wrap(&public).unwrap_or_else(|e| panic!("wrap: {e}"));
    let mut p = Partition::new(id.clone(), &session_actor(&d.id, rng));
    p.insert_wrapped_key(&wrapped)
        .unwrap_or_else(|e| panic!("key: {e}"));
    for n in 0..RECORDS {
        let t = NOW - 3_600 + u64::from(n) * 60;
        let record = Record {
            facility: d.facility.clone(),
            device: d.id.clone(),
            scanned_at: t,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: t - 5,
                token: [n.wrapping_add(seed as u8); 16],
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

/// One device session and the hub connection that serves it.
struct Pair {
    device: Session,
    store: MemoryStore,
    conn: Conn,
    rx: mpsc::Receiver<Output>,
    events: Vec<Event>,
    /// Every frame the hub's writer was handed, in order, with the round it came in.
    received: Vec<(usize, Frame)>,
}

fn pair(hub: &Hub, d: &Device, seed: u64) -> Pair {
    let (tx, rx) = mpsc::channel(daemon::OUTGOING_FRAMES);
    let remote = iroh::SecretKey::generate().public();
    let conn = Conn::new(hub, remote, None, tx, Arc::new(AtomicBool::new(false)));
    let mut store = MemoryStore::new(b"device-test", Some(d.facility.clone()));
    store.insert(device_partition(hub, d, seed));
    let me = Peer::Device {
        device: d.id.clone(),
        facility: d.facility.clone(),
    };
    let device = Session::initiator_to(NOW, me, None, Some(d.credential), None, true, &store)
        .unwrap_or_else(|e| panic!("initiator: {e}"));
    Pair {
        device,
        store,
        conn,
        rx,
        events: Vec::new(),
        received: Vec::new(),
    }
}

/// Runs rounds until every session is quiet: in each round, one actor turn takes every
/// device's queued frames, then the devices read what the hub's writers were handed.
/// `before_turn(round, hub)` runs before each turn. Checks that nothing reaches a writer
/// while the turn is open. Returns, per round, the records ingested and the persist failures
/// counted by its end.
fn run(
    hub: &Hub,
    ledger: &Ledger<'_>,
    pairs: &mut [Pair],
    metrics: &Metrics,
    before_turn: impl Fn(usize, &Hub),
) -> Vec<(u64, u64, bool)> {
    let mut counts = Vec::new();
    for round in 0..100 {
        before_turn(round, hub);
        let mut progressed = false;
        daemon::begin_turn(hub);
        for p in pairs.iter_mut() {
            while let Some(f) = p.device.poll_transmit() {
                progressed = true;
                let bytes = f.encode().unwrap_or_else(|e| panic!("encode: {e}"));
                for f in decode(&bytes) {
                    p.conn.on_frame(hub, ledger, f, NOW, metrics);
                }
            }
        }
        for p in pairs.iter_mut() {
            assert!(
                p.rx.try_recv().is_err(),
                "a frame reached the writer before the turn's durable commit"
            );
        }
        let durable = daemon::end_turn(
            hub,
            ledger,
            pairs.iter_mut().map(|p| &mut p.conn),
            NOW,
            metrics,
        );
        counts.push((
            metrics.records_ingested.load(Ordering::Relaxed),
            metrics.persist_failures.load(Ordering::Relaxed),
            durable,
        ));
        for p in pairs.iter_mut() {
            while let Ok(out) = p.rx.try_recv() {
                progressed = true;
                if let Output::Bytes(b) = out {
                    for f in decode(&b) {
                        p.received.push((round, f.clone()));
                        p.device.handle_frame(NOW, f, &mut p.store);
                    }
                }
            }
            while let Some(e) = p.device.poll_event() {
                p.events.push(e);
            }
        }
        if !progressed {
            return counts;
        }
    }
    panic!("the sessions did not end in 100 rounds");
}

#[test]
fn devices_syncing_at_once_share_durable_commits() {
    const DEVICES: usize = 8;
    let (_tmp, hub, devices) = setup(DEVICES);
    let ledger = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let metrics = Metrics::default();
    let mut pairs: Vec<Pair> = devices
        .iter()
        .enumerate()
        .map(|(n, d)| pair(&hub, d, n as u64 * 16))
        .collect();
    let durable_before = hub.store().durable_commits();
    let _ = run(&hub, &ledger, &mut pairs, &metrics, |_, _| {});
    for p in &pairs {
        assert!(
            p.events.iter().any(|e| matches!(e, Event::Finished(_))),
            "{:?}",
            p.events
        );
        assert!(p.conn.is_finished());
    }
    let partitions = DEVICES as u64;
    assert_eq!(
        metrics.records_ingested.load(Ordering::Relaxed),
        partitions * u64::from(RECORDS)
    );
    let durable = hub.store().durable_commits() - durable_before;
    let commits = metrics.group_commits.load(Ordering::Relaxed);
    let writes = metrics.group_commit_writes.load(Ordering::Relaxed);
    // Each session wrote at least its partition, its sync state and its last contact.
    assert!(writes >= 3 * partitions, "{writes} writes");
    assert!(
        durable < partitions,
        "{durable} durable commits for {partitions} persisted partitions ({writes} writes)"
    );
    assert_eq!(durable, commits, "every durable commit was a turn's");
    // What was committed is there for a reader (and durable: the turn's commit covered it).
    let stats = ledger.stats(NOW).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stats.records, partitions * u64::from(RECORDS), "{stats:?}");
}

#[test]
fn a_failed_group_commit_sends_no_frame_of_its_turn_and_aborts_the_session() {
    let (_tmp, hub, devices) = setup(1);
    let ledger = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let metrics = Metrics::default();
    let mut pairs = vec![pair(&hub, &devices[0], 3)];
    // The first turn admits the device (Hello -> Welcome, a durable commit of its binding);
    // the next turn that writes is the one that persists its partition and would answer
    // with the hub's heads: that commit fails.
    let counts = run(&hub, &ledger, &mut pairs, &metrics, |round, hub| {
        if round == 1 {
            hub.store().fail_next_group_commit();
        }
    });
    let failed = counts
        .iter()
        .position(|&(_, failures, _)| failures > 0)
        .unwrap_or_else(|| panic!("no turn failed: {counts:?}"));
    assert_eq!(
        counts[failed].0,
        u64::from(RECORDS),
        "the failed turn persisted the partition (without fsync): {counts:?}"
    );
    // The turn reports its writes as not durable: the actor stops on it (redb refuses writes
    // until reopened while its reads still show them) and `sync-hub run` exits.
    assert!(!counts[failed].2, "{counts:?}");
    assert!(counts[..failed].iter().all(|c| c.2), "{counts:?}");
    let p = &pairs[0];
    assert!(
        p.events.iter().any(|e| matches!(
            e,
            Event::Refused {
                by: Side::Peer,
                reason: RefuseReason::Internal,
                ..
            }
        )),
        "the device is told the hub failed: {:?}",
        p.events
    );
    assert!(
        !p.events.iter().any(|e| matches!(e, Event::Finished(_))),
        "{:?}",
        p.events
    );
    // The device heard the Welcome (a durable turn) and, of the turn whose commit failed,
    // only the refusal: none of the Sync or Done frames the session sent in it.
    let kinds: Vec<(usize, &str)> = p.received.iter().map(|(r, f)| (*r, f.kind())).collect();
    assert!(
        matches!(p.received.first(), Some((_, Frame::Welcome(_)))),
        "{kinds:?}"
    );
    let of_failed: Vec<&str> = kinds
        .iter()
        .filter(|(r, _)| *r >= failed)
        .map(|(_, k)| *k)
        .collect();
    assert_eq!(
        of_failed,
        ["Refused"],
        "frames from the failed turn on: {kinds:?}"
    );
    assert_eq!(metrics.persist_failures.load(Ordering::Relaxed), 1);
    assert!(p.conn.is_finished());
}

#[test]
fn a_revocation_written_during_a_turn_is_not_hidden_by_the_turns_kept_list() {
    // The actor keeps the revocation list for a turn under the turn's epoch; admission can
    // list a revoked device during the turn, and persists later in the same turn must see it.
    let (_tmp, hub, _) = setup(0);
    daemon::begin_turn(&hub);
    let before = hub.store().group_epoch();
    assert!(before.is_some());
    sync_hub::auth::list_revoked(
        hub.store(),
        [(
            sync_hub::auth::Revoked::Device,
            "dev_revokedinturn".to_owned(),
        )],
        NOW,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        hub.store().group_epoch(),
        before,
        "the turn's kept reads were not told of the revocation"
    );
    hub.store().end_group().unwrap_or_else(|e| panic!("{e}"));
}
