//! Whole sync sessions between in-memory nodes: delivery, incremental cost, relay through a
//! sibling, the horizon, facility authorization, and hostile or broken peers.

use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::partition::Partition;
use shared::sync::harness::{MemoryStore, PairOutcome, PairSetup, run_pair};
use shared::sync::{
    Decision, Event, Frame, FrameDecoder, FrameError, Hello, MAX_ROUNDS_PER_PARTITION,
    PROTOCOL_VERSION, PartitionStore, Peer, PeerHello, RefuseReason, Role, Session, Side,
    SyncError,
};
use shared::time::horizon;
use shared::{Day, DeviceId, FacilityId, PartitionId, RecordId, UnixSeconds};
use std::collections::BTreeSet;

/// Noon of day 20,000 (2024-10-04).
const NOW: UnixSeconds = 20_000 * 86_400 + 12 * 3_600;

fn facility(s: &str) -> FacilityId {
    FacilityId::parse(s).unwrap()
}

fn device(name: &str, fac: &str) -> Peer {
    Peer::Device {
        device: DeviceId::parse(name).unwrap(),
        facility: facility(fac),
    }
}

fn hub() -> Peer {
    Peer::Hub {
        region: "seoul".into(),
    }
}

fn pid(fac: &str, day: Day) -> PartitionId {
    PartitionId {
        facility: facility(fac),
        day,
    }
}

fn today() -> Day {
    Day::of(NOW)
}

/// The registry stand-in: every device is admitted for the facility it claims.
fn admit_claimed(hello: &PeerHello) -> Decision {
    match hello.peer.facility() {
        Some(f) => Decision::Admit {
            facility: f.clone(),
            refresh: Some(b"day keys".to_vec()),
        },
        None => Decision::Refuse {
            reason: RefuseReason::UnknownDevice,
            detail: "only devices sync here".into(),
        },
    }
}

/// Seals and inserts `n` records of `device` into partition `id` of `store`.
fn add_records(
    store: &mut MemoryStore,
    id: &PartitionId,
    device: &str,
    n: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<RecordId> {
    let key = SessionKey::generate(rng, id.day);
    let partition = store.get_or_create(id);
    let mut ids = Vec::with_capacity(n);
    let mut batch = Vec::with_capacity(n);
    for i in 0..n {
        let record_id = RecordId::random(rng);
        let mut token = [0u8; 16];
        rand_core::RngCore::fill_bytes(rng, &mut token);
        let record = Record {
            facility: id.facility.clone(),
            device: DeviceId::parse(device).unwrap(),
            scanned_at: id.day.start() + i as u64,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: id.day.start(),
                token,
            },
        };
        let envelope = key.seal(rng, id, record_id, &record).unwrap();
        batch.push((record_id, envelope));
        ids.push(record_id);
    }
    // As a device folds its durable check-ins at a sync: one change for the batch.
    assert_eq!(partition.insert_batch(&[], &batch).unwrap(), n);
    ids
}

fn record_ids(store: &MemoryStore, id: &PartitionId) -> BTreeSet<RecordId> {
    store
        .get(id)
        .map(|p| p.records().into_iter().map(|(r, _)| r).collect())
        .unwrap_or_default()
}

fn sorted_heads(p: &Partition) -> Vec<[u8; 32]> {
    let mut h: Vec<[u8; 32]> = p.heads().iter().map(|h| h.0).collect();
    h.sort_unstable();
    h
}

fn sync_frames(outcome: &PairOutcome) -> Vec<(Role, PartitionId)> {
    outcome
        .frames
        .iter()
        .filter_map(|(r, f)| match f {
            Frame::Sync { partition, .. } => Some((*r, partition.clone())),
            _ => None,
        })
        .collect()
}

fn device_to_hub() -> PairSetup {
    PairSetup {
        initiator: device("dev_a", "fac_a"),
        responder: hub(),
        credential: None,
        push_only: false,
    }
}

#[test]
fn fresh_sync_delivers_every_record_both_ways() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut hub_store = MemoryStore::new(b"hub", None);
    let day_now = pid("fac_a", today());
    let yesterday = pid("fac_a", today().minus(1));
    let mut written = add_records(&mut dev, &day_now, "dev_a", 50, &mut rng);
    written.extend(add_records(&mut dev, &yesterday, "dev_a", 20, &mut rng));
    // The hub already has one record of today from a sibling: it must reach the device.
    let from_sibling = add_records(&mut hub_store, &day_now, "dev_b", 1, &mut rng);

    let outcome = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();

    assert!(outcome.completed(), "{:?}", outcome.events);
    for id in [&day_now, &yesterday] {
        assert_eq!(record_ids(&dev, id), record_ids(&hub_store, id));
        assert_eq!(
            sorted_heads(dev.get(id).unwrap()),
            sorted_heads(hub_store.get(id).unwrap())
        );
    }
    let at_hub: BTreeSet<RecordId> = record_ids(&hub_store, &day_now)
        .union(&record_ids(&hub_store, &yesterday))
        .copied()
        .collect();
    assert!(written.iter().all(|r| at_hub.contains(r)));
    assert!(record_ids(&dev, &day_now).contains(&from_sibling[0]));
    assert_eq!(outcome.new_records(Role::Responder), 70);
    assert_eq!(outcome.new_records(Role::Initiator), 1);

    // The device was welcomed with the hub's refresh and both sides measured the clock.
    assert!(outcome.events.iter().any(|(r, e)| *r == Role::Initiator
        && matches!(e, Event::Welcomed { refresh: Some(b), .. } if b == b"day keys")));
    assert!(
        outcome
            .events
            .iter()
            .filter(|(_, e)| matches!(e, Event::ClockOffset { seconds: 0 }))
            .count()
            == 2
    );
    // States persisted on both sides, one per partition.
    assert_eq!(dev.sync_state_count(), 2);
    assert_eq!(hub_store.sync_state_count(), 2);
    // The byte counts of the harness and of the sessions' own stats agree.
    let finished: Vec<_> = outcome
        .events
        .iter()
        .filter_map(|(r, e)| match e {
            Event::Finished(stats) => Some((*r, *stats)),
            _ => None,
        })
        .collect();
    assert_eq!(finished.len(), 2);
    for (role, stats) in finished {
        let sent = match role {
            Role::Initiator => outcome.bytes_i_to_r,
            Role::Responder => outcome.bytes_r_to_i,
        };
        assert_eq!(stats.bytes_sent, sent);
    }
}

#[test]
fn persisted_states_make_incremental_syncs_small() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut hub_store = MemoryStore::new(b"hub", None);
    let day_now = pid("fac_a", today());
    add_records(&mut dev, &day_now, "dev_a", 1_000, &mut rng);
    let fresh = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    assert!(fresh.completed());
    let fresh_bytes = fresh.bytes_i_to_r + fresh.bytes_r_to_i;

    // Nothing changed: no sync message at all, just the handshake.
    let idle = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    assert!(idle.completed());
    assert!(sync_frames(&idle).is_empty());

    add_records(&mut dev, &day_now, "dev_a", 100, &mut rng);
    let incremental = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    assert!(incremental.completed());
    assert_eq!(incremental.new_records(Role::Responder), 100);
    let incremental_bytes = incremental.bytes_i_to_r + incremental.bytes_r_to_i;

    // The same 100 records again, but with the sync states forgotten on both sides.
    add_records(&mut dev, &day_now, "dev_a", 100, &mut rng);
    dev.forget_sync_states();
    hub_store.forget_sync_states();
    let stateless = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    assert!(stateless.completed());
    let stateless_bytes = stateless.bytes_i_to_r + stateless.bytes_r_to_i;

    println!(
        "fresh 1000: {fresh_bytes} B; +100 with states: {incremental_bytes} B ({} B/record); \
         +100 without states: {stateless_bytes} B; rounds {} / {} / {}",
        incremental_bytes / 100,
        fresh.rounds,
        incremental.rounds,
        stateless.rounds
    );
    // A fresh sync of a partition the hub lacks goes as one compressed document (about
    // 92 B a record here, both directions). Increments go as the missing changes only: a
    // device folds a round's check-ins into one change, so 100 new records cost about
    // 1.3x their envelopes (~128 B a record), with or without persisted sync states;
    // never the whole document again (that would be ~100 KB here).
    assert!(
        incremental_bytes * 4 < fresh_bytes,
        "100 new records cost {incremental_bytes} B, the first 1,000 {fresh_bytes} B"
    );
    assert!(
        incremental_bytes < 100 * 160,
        "{} B a record is far above the sealed record's own size",
        incremental_bytes / 100
    );
    assert!(
        stateless_bytes * 4 < fresh_bytes,
        "with the sync states forgotten, 100 new records cost {stateless_bytes} B: the whole \
         document was resent"
    );
    assert_eq!(
        sorted_heads(dev.get(&day_now).unwrap()),
        sorted_heads(hub_store.get(&day_now).unwrap())
    );
}

#[test]
fn a_sibling_relays_a_record_to_the_hub() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut a = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut b = MemoryStore::new(b"device-b", Some(facility("fac_a")));
    let mut hub_store = MemoryStore::new(b"hub", None);
    let day_now = pid("fac_a", today());
    let written = add_records(&mut a, &day_now, "dev_a", 3, &mut rng);

    // A has no route to the hub; B, a device of the same facility, does.
    let a_to_b = PairSetup {
        initiator: device("dev_a", "fac_a"),
        responder: device("dev_b", "fac_a"),
        credential: None,
        push_only: false,
    };
    let first = run_pair(NOW, &a_to_b, &mut a, &mut b, admit_claimed).unwrap();
    assert!(first.completed(), "{:?}", first.events);
    let b_to_hub = PairSetup {
        initiator: device("dev_b", "fac_a"),
        responder: hub(),
        credential: None,
        push_only: false,
    };
    let second = run_pair(NOW, &b_to_hub, &mut b, &mut hub_store, admit_claimed).unwrap();
    assert!(second.completed(), "{:?}", second.events);

    let at_hub = record_ids(&hub_store, &day_now);
    assert!(written.iter().all(|r| at_hub.contains(r)));
}

#[test]
fn a_sibling_of_another_facility_is_refused() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut a = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut c = MemoryStore::new(b"device-c", Some(facility("fac_c")));
    add_records(&mut a, &pid("fac_a", today()), "dev_a", 2, &mut rng);
    let setup = PairSetup {
        initiator: device("dev_a", "fac_a"),
        responder: device("dev_c", "fac_c"),
        credential: None,
        push_only: false,
    };
    // Even if c's shell admitted a for a's own facility, c holds only fac_c.
    let outcome = run_pair(NOW, &setup, &mut a, &mut c, admit_claimed).unwrap();
    assert!(!outcome.completed());
    assert!(outcome.events.iter().any(|(r, e)| *r == Role::Responder
        && matches!(
            e,
            Event::Refused {
                by: Side::Local,
                reason: RefuseReason::WrongFacility,
                ..
            }
        )));
    assert!(
        outcome
            .events
            .iter()
            .any(|(r, e)| *r == Role::Initiator
                && matches!(e, Event::Refused { by: Side::Peer, .. }))
    );
    assert_eq!(c.partitions().count(), 0);
}

#[test]
fn expired_partitions_are_never_offered_or_sent() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut hub_store = MemoryStore::new(b"hub", None);
    let expired = pid("fac_a", horizon(NOW).minus(1));
    let oldest_live = pid("fac_a", horizon(NOW));
    add_records(&mut dev, &expired, "dev_a", 5, &mut rng);
    add_records(&mut dev, &oldest_live, "dev_a", 5, &mut rng);
    // The hub still holds an expired partition of its own (retention has not run yet).
    let hub_expired = pid("fac_a", horizon(NOW).minus(2));
    add_records(&mut hub_store, &hub_expired, "dev_b", 5, &mut rng);

    let outcome = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    assert!(outcome.completed());

    for (_, frame) in &outcome.frames {
        let listed: Vec<&PartitionId> = match frame {
            Frame::Hello(h) => h.partitions.iter().map(|s| &s.id).collect(),
            Frame::Welcome(w) => w.partitions.iter().map(|s| &s.id).collect(),
            Frame::Sync { partition, .. } => vec![partition],
            _ => vec![],
        };
        assert!(
            listed.iter().all(|id| id.day >= horizon(NOW)),
            "{} frame names an expired partition",
            frame.kind()
        );
    }
    assert!(hub_store.get(&expired).is_none());
    assert!(dev.get(&hub_expired).is_none());
    assert_eq!(record_ids(&hub_store, &oldest_live).len(), 5);
}

/// A responder for the hub, admitted a device of fac_a, driven by hand.
fn admitted_hub_session(store: &mut MemoryStore, now: UnixSeconds) -> Session {
    shared::sync::harness::admitted_responder(hub(), device("dev_a", "fac_a"), now, store).unwrap()
}

/// A well-formed first sync message for a partition holding one record.
fn first_message(id: &PartitionId, rng: &mut ChaCha8Rng) -> Vec<u8> {
    use automerge::sync::SyncDoc;
    let mut store = MemoryStore::new(b"peer", None);
    add_records(&mut store, id, "dev_x", 1, rng);
    let mut state = automerge::sync::State::new();
    store
        .get(id)
        .unwrap()
        .doc()
        .generate_sync_message(&mut state)
        .unwrap()
        .encode()
}

fn events(session: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| session.poll_event()).collect()
}

fn transmits(session: &mut Session) -> Vec<Frame> {
    std::iter::from_fn(|| session.poll_transmit()).collect()
}

#[test]
fn a_partition_of_another_facility_is_refused_and_not_stored() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut hub_store = MemoryStore::new(b"hub", None);
    let mut session = admitted_hub_session(&mut hub_store, NOW);
    let foreign = pid("fac_b", today());
    let message = first_message(&foreign, &mut rng);
    session.handle_frame(
        NOW,
        Frame::Sync {
            partition: foreign.clone(),
            message,
        },
        &mut hub_store,
    );
    assert!(session.is_finished() && !session.is_completed());
    assert!(events(&mut session).iter().any(|e| matches!(
        e,
        Event::Refused {
            by: Side::Local,
            reason: RefuseReason::WrongFacility,
            ..
        }
    )));
    assert!(matches!(
        transmits(&mut session).as_slice(),
        [Frame::Refused(r)] if r.reason == RefuseReason::WrongFacility
    ));
    assert!(hub_store.get(&foreign).is_none());
    assert_eq!(hub_store.partitions().count(), 0);
}

#[test]
fn a_sync_frame_outside_the_window_is_refused_and_not_stored() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for day in [horizon(NOW).minus(1), today().plus(5)] {
        let mut hub_store = MemoryStore::new(b"hub", None);
        let mut session = admitted_hub_session(&mut hub_store, NOW);
        let id = pid("fac_a", day);
        let message = first_message(&id, &mut rng);
        session.handle_frame(
            NOW,
            Frame::Sync {
                partition: id.clone(),
                message,
            },
            &mut hub_store,
        );
        assert!(events(&mut session).iter().any(|e| matches!(
            e,
            Event::Refused {
                reason: RefuseReason::OutsideWindow,
                ..
            }
        )));
        assert!(hub_store.get(&id).is_none());
    }
}

#[test]
fn truncated_and_garbage_bytes_end_the_session_with_an_error() {
    let mut hub_store = MemoryStore::new(b"hub", None);
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let initiator = Session::initiator(NOW, device("dev_a", "fac_a"), None, &dev).unwrap();
    let mut initiator = initiator;
    let hello = initiator.poll_transmit().unwrap().encode().unwrap();

    // Truncated: the stream ends inside the hello.
    let mut decoder = FrameDecoder::new();
    decoder.push(&hello[..hello.len() - 3]).unwrap();
    assert_eq!(decoder.pop(), Ok(None));
    let err = decoder.finish().unwrap_err();
    assert!(matches!(err, FrameError::Truncated { .. }));
    let mut session = Session::responder(hub());
    session.handle_malformed(err);
    assert!(session.is_finished());
    assert!(matches!(
        events(&mut session).as_slice(),
        [Event::Failed(SyncError::Frame(
            FrameError::Truncated { .. }
        ))]
    ));
    assert!(matches!(
        transmits(&mut session).as_slice(),
        [Frame::Refused(r)] if r.reason == RefuseReason::Protocol
    ));

    // Garbage after a valid length prefix.
    let mut decoder = FrameDecoder::new();
    decoder.push(&[0, 0, 0, 5, 9, 9, 9, 9, 9]).unwrap();
    assert!(matches!(decoder.pop(), Err(FrameError::Malformed { .. })));

    // A well-framed Sync whose automerge message is garbage.
    let mut session = admitted_hub_session(&mut hub_store, NOW);
    session.handle_frame(
        NOW,
        Frame::Sync {
            partition: pid("fac_a", today()),
            message: vec![0x42, 0xff, 0xff, 0xff],
        },
        &mut hub_store,
    );
    assert!(matches!(
        events(&mut session).as_slice(),
        [Event::Failed(SyncError::BadSyncMessage { .. })]
    ));

    // Frames out of order: Done before any hello.
    let mut session = Session::responder(hub());
    session.handle_frame(NOW, Frame::Done { received: 0 }, &mut hub_store);
    assert!(matches!(
        events(&mut session).as_slice(),
        [Event::Failed(SyncError::Unexpected { .. })]
    ));

    // And the initiator after a second hello-like frame from its peer.
    initiator.handle_frame(
        NOW,
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            peer: hub(),
            now: NOW,
            horizon: horizon(NOW),
            partitions: vec![],
            in_sync: Default::default(),
            push_only: false,
            credential: None,
            refresh_have: None,
        }),
        &mut dev,
    );
    assert!(initiator.is_finished());
    // Late frames after the end are ignored, not answered.
    initiator.handle_frame(NOW, Frame::Done { received: 0 }, &mut dev);
    let _ = events(&mut initiator);
    assert!(
        transmits(&mut initiator)
            .iter()
            .all(|f| matches!(f, Frame::Refused(_)))
    );
}

#[test]
fn a_peer_that_keeps_sending_is_cut_off() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut hub_store = MemoryStore::new(b"hub", None);
    let mut session = admitted_hub_session(&mut hub_store, NOW);
    let id = pid("fac_a", today());
    // The same opening message again and again: automerge answers each, a healthy peer never
    // needs this many.
    let message = first_message(&id, &mut rng);
    let mut sent = 0;
    while !session.is_finished() && sent < 10 * MAX_ROUNDS_PER_PARTITION {
        session.handle_frame(
            NOW,
            Frame::Sync {
                partition: id.clone(),
                message: message.clone(),
            },
            &mut hub_store,
        );
        sent += 1;
    }
    assert_eq!(sent, MAX_ROUNDS_PER_PARTITION + 1);
    assert!(
        events(&mut session)
            .iter()
            .any(|e| matches!(e, Event::Failed(SyncError::TooManyRounds { .. })))
    );

    // Endless Done frames are cut off too.
    let mut session = admitted_hub_session(&mut hub_store, NOW);
    let mut dones = 0;
    while !session.is_finished() && dones < 100 {
        session.handle_frame(NOW, Frame::Done { received: 0 }, &mut hub_store);
        dones += 1;
    }
    // The hub has fac_a's partition now, so it sent a sync message; one Done is the most a
    // peer may send before answering it.
    assert!(dones <= 3, "cut off after {dones} Done frames");
}

#[test]
fn an_unadmitted_device_gets_a_refusal_and_nothing_else() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut hub_store = MemoryStore::new(b"hub", None);
    add_records(&mut dev, &pid("fac_a", today()), "dev_a", 3, &mut rng);
    add_records(&mut hub_store, &pid("fac_a", today()), "dev_b", 3, &mut rng);
    let setup = PairSetup {
        credential: Some([9; 32]),
        push_only: false,
        ..device_to_hub()
    };
    let outcome = run_pair(NOW, &setup, &mut dev, &mut hub_store, |hello| {
        assert_eq!(hello.credential, Some([9; 32]));
        Decision::Refuse {
            reason: RefuseReason::CredentialReused,
            detail: "ticket already used".into(),
        }
    })
    .unwrap();
    assert!(!outcome.completed());
    let from_hub: Vec<&Frame> = outcome
        .frames
        .iter()
        .filter(|(r, _)| *r == Role::Responder)
        .map(|(_, f)| f)
        .collect();
    assert!(matches!(
        from_hub.as_slice(),
        [Frame::Refused(r)] if r.reason == RefuseReason::CredentialReused
    ));
    assert_eq!(record_ids(&dev, &pid("fac_a", today())).len(), 3);
    assert_eq!(record_ids(&hub_store, &pid("fac_a", today())).len(), 3);
}

#[test]
fn a_device_offered_another_facilitys_partition_refuses_it() {
    // A hub that (wrongly) lists another facility's partition to a device.
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut session = Session::initiator(NOW, device("dev_a", "fac_a"), None, &dev).unwrap();
    let _ = transmits(&mut session);
    session.handle_frame(
        NOW,
        Frame::Welcome(shared::sync::Welcome {
            version: PROTOCOL_VERSION,
            peer: hub(),
            now: NOW,
            horizon: horizon(NOW),
            partitions: vec![
                shared::sync::PartitionSummary {
                    id: pid("fac_b", today()),
                    heads: vec![[1; 32]],
                    records: 1,
                }
                .advertised(),
            ],
            delta: false,
            refresh: None,
        }),
        &mut dev,
    );
    assert!(events(&mut session).iter().any(|e| matches!(
        e,
        Event::Refused {
            reason: RefuseReason::WrongFacility,
            ..
        }
    )));
    assert_eq!(dev.live_partitions(None).unwrap().len(), 0);
}

#[test]
fn clock_offset_is_measured_from_the_peers_hello() {
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let session_now = NOW - 90;
    let mut initiator =
        Session::initiator(session_now, device("dev_a", "fac_a"), None, &dev).unwrap();
    let hello = initiator.poll_transmit().unwrap();
    let mut hub_store = MemoryStore::new(b"hub", None);
    let mut responder = Session::responder(hub());
    responder.handle_frame(NOW, hello, &mut hub_store);
    assert!(events(&mut responder).contains(&Event::ClockOffset { seconds: -90 }));
    let _ = &mut dev;
}

#[test]
fn random_syncs_among_siblings_and_a_hub_converge() {
    for seed in 0..6u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(100 + seed);
        let names = ["dev_a", "dev_b", "dev_c"];
        let mut devices: Vec<MemoryStore> = names
            .iter()
            .map(|n| MemoryStore::new(n.as_bytes(), Some(facility("fac_a"))))
            .collect();
        let mut hub_store = MemoryStore::new(b"hub", None);
        let days = [today().minus(2), today().minus(1), today()];
        let mut written = BTreeSet::new();
        let pick = |rng: &mut ChaCha8Rng, n: usize| (rng.next_u32() as usize) % n;
        use rand_core::RngCore;

        for step in 0..30 {
            let d = pick(&mut rng, 3);
            let day = days[pick(&mut rng, 3)];
            let n = pick(&mut rng, 6);
            written.extend(add_records(
                &mut devices[d],
                &pid("fac_a", day),
                names[d],
                n,
                &mut rng,
            ));
            match pick(&mut rng, 10) {
                // A hub rebuilt from nothing but its sync states (the worst case for them).
                0 => {
                    for day in days {
                        hub_store.remove(&pid("fac_a", day));
                    }
                }
                // A device that lost its sync states.
                1 => devices[pick(&mut rng, 3)].forget_sync_states(),
                _ => {}
            }
            let from = pick(&mut rng, 3);
            let to = pick(&mut rng, 4);
            let outcome = if to == 3 || to == from {
                let setup = PairSetup {
                    initiator: device(names[from], "fac_a"),
                    responder: hub(),
                    credential: None,
                    push_only: false,
                };
                run_pair(
                    NOW,
                    &setup,
                    &mut devices[from],
                    &mut hub_store,
                    admit_claimed,
                )
            } else {
                let setup = PairSetup {
                    initiator: device(names[from], "fac_a"),
                    responder: device(names[to], "fac_a"),
                    credential: None,
                    push_only: false,
                };
                let (a, b) = two_mut(&mut devices, from, to);
                run_pair(NOW, &setup, a, b, admit_claimed)
            };
            let outcome = outcome.unwrap();
            assert!(
                outcome.completed(),
                "seed {seed} step {step}: {:?}",
                outcome.events
            );
        }
        // Every device syncs with the hub twice: all of them end with everything.
        for _ in 0..2 {
            for (d, store) in devices.iter_mut().enumerate() {
                let setup = PairSetup {
                    initiator: device(names[d], "fac_a"),
                    responder: hub(),
                    credential: None,
                    push_only: false,
                };
                assert!(
                    run_pair(NOW, &setup, store, &mut hub_store, admit_claimed)
                        .unwrap()
                        .completed()
                );
            }
        }
        let everywhere = |store: &MemoryStore| -> BTreeSet<RecordId> {
            days.iter()
                .flat_map(|d| record_ids(store, &pid("fac_a", *d)))
                .collect()
        };
        assert_eq!(everywhere(&hub_store), written, "seed {seed}");
        for store in &devices {
            assert_eq!(everywhere(store), written, "seed {seed}");
        }
    }
}

fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (l, r) = v.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = v.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}

/// The hello and welcome of `outcome`, for their partition lists.
fn greetings(outcome: &PairOutcome) -> (Hello, shared::sync::Welcome) {
    let hello = outcome.frames.iter().find_map(|(_, f)| match f {
        Frame::Hello(h) => Some(h.clone()),
        _ => None,
    });
    let welcome = outcome.frames.iter().find_map(|(_, f)| match f {
        Frame::Welcome(w) => Some(w.clone()),
        _ => None,
    });
    (hello.unwrap(), welcome.unwrap())
}

/// A device with a week of partitions, all synced: the next sessions list none of them, and a
/// new record names only its own partition.
#[test]
fn partitions_in_sync_since_the_last_session_are_not_listed() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut hub_store = MemoryStore::new(b"hub", None);
    let days: Vec<PartitionId> = (0..7).map(|d| pid("fac_a", Day(today().0 - d))).collect();
    for id in &days {
        add_records(&mut dev, id, "dev_a", 5, &mut rng);
    }
    let first = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    assert!(first.completed());
    let (hello, welcome) = greetings(&first);
    assert_eq!(
        hello.partitions.len(),
        7,
        "no state yet: everything is listed"
    );
    assert_eq!(hello.in_sync.count, 0);
    assert!(welcome.delta);

    let idle = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    assert!(idle.completed());
    let (hello, welcome) = greetings(&idle);
    assert!(hello.partitions.is_empty(), "{:?}", hello.partitions);
    assert_eq!(hello.in_sync.count, 7);
    assert!(welcome.delta, "the hub's states confirm the claim");
    assert!(welcome.partitions.is_empty(), "{:?}", welcome.partitions);
    assert!(sync_frames(&idle).is_empty());
    let idle_bytes = idle.bytes_i_to_r + idle.bytes_r_to_i;
    assert!(
        idle_bytes < 200,
        "an idle session costs {idle_bytes} B of frames"
    );

    add_records(&mut dev, &days[0], "dev_a", 1, &mut rng);
    let one = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    assert!(one.completed());
    assert_eq!(one.new_records(Role::Responder), 1);
    let (hello, _) = greetings(&one);
    assert_eq!(hello.partitions.len(), 1);
    assert_eq!(hello.partitions[0].id, days[0]);
    assert_eq!(hello.in_sync.count, 6);
    for id in &days {
        assert_eq!(record_ids(&dev, id), record_ids(&hub_store, id), "{id}");
    }
}

/// A hub restored from an older backup (partitions and sync states as they were) no longer
/// holds what the device's states say it holds: the claim fails, every partition is listed,
/// and everything the backup lacked reaches the hub again.
#[test]
fn a_hub_restored_from_a_backup_gets_everything_it_lost() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut hub_store = MemoryStore::new(b"hub", None);
    let older = pid("fac_a", Day(today().0 - 1));
    let day_now = pid("fac_a", today());
    add_records(&mut dev, &older, "dev_a", 3, &mut rng);
    add_records(&mut dev, &day_now, "dev_a", 3, &mut rng);
    assert!(
        run_pair(
            NOW,
            &device_to_hub(),
            &mut dev,
            &mut hub_store,
            admit_claimed
        )
        .unwrap()
        .completed()
    );
    // The backup: a copy of the hub as it is now.
    let mut backup = MemoryStore::new(b"hub", None);
    for id in [&older, &day_now] {
        let bytes = hub_store.get_mut(id).unwrap().save();
        let id = id.clone();
        backup.insert(Partition::load(id, &bytes, b"hub").unwrap());
    }
    let dev_peer = device("dev_a", "fac_a");
    for id in [&older, &day_now] {
        let state = hub_store.sync_state(&dev_peer, id).unwrap().unwrap();
        backup.put_sync_state(&dev_peer, id, &state).unwrap();
    }
    // More records in both partitions, synced, then the hub is restored from the backup.
    add_records(&mut dev, &older, "dev_a", 2, &mut rng);
    add_records(&mut dev, &day_now, "dev_a", 2, &mut rng);
    assert!(
        run_pair(
            NOW,
            &device_to_hub(),
            &mut dev,
            &mut hub_store,
            admit_claimed
        )
        .unwrap()
        .completed()
    );
    let mut restored = backup;
    let again = run_pair(
        NOW,
        &device_to_hub(),
        &mut dev,
        &mut restored,
        admit_claimed,
    )
    .unwrap();
    assert!(again.completed());
    let (hello, welcome) = greetings(&again);
    assert_eq!(
        hello.in_sync.count, 2,
        "the device believes the hub is up to date"
    );
    assert!(
        !welcome.delta,
        "the restored hub's states contradict the claim"
    );
    for id in [&older, &day_now] {
        assert_eq!(record_ids(&dev, id).len(), 5);
        assert_eq!(record_ids(&dev, id), record_ids(&restored, id), "{id}");
    }
}

/// A hub that lost a partition and its states (a rebuilt hub) while the device's states still
/// claim it in sync: the count differs, and the partition is sent again.
#[test]
fn a_hub_that_lost_a_partition_gets_it_again() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut hub_store = MemoryStore::new(b"hub", None);
    let day_now = pid("fac_a", today());
    add_records(&mut dev, &day_now, "dev_a", 4, &mut rng);
    assert!(
        run_pair(
            NOW,
            &device_to_hub(),
            &mut dev,
            &mut hub_store,
            admit_claimed
        )
        .unwrap()
        .completed()
    );
    let mut rebuilt = MemoryStore::new(b"hub-2", None);
    let again = run_pair(NOW, &device_to_hub(), &mut dev, &mut rebuilt, admit_claimed).unwrap();
    assert!(again.completed());
    assert!(!greetings(&again).1.delta);
    assert_eq!(record_ids(&rebuilt, &day_now).len(), 4);
}

/// A push-only device (as every device now syncs) hands its records to the hub and takes none
/// of its siblings' back; its first message carries its new change at once; a session with
/// one new record costs a few hundred bytes of frames, and nothing grows from one session to
/// the next.
#[test]
fn a_push_only_device_sends_and_takes_nothing_back() {
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let mut dev = MemoryStore::new(b"device-a", Some(facility("fac_a")));
    let mut hub_store = MemoryStore::new(b"hub", None);
    let day_now = pid("fac_a", today());
    let push = PairSetup {
        push_only: true,
        ..device_to_hub()
    };
    add_records(&mut dev, &day_now, "dev_a", 20, &mut rng);
    // A sibling's records, already at the hub.
    let sibling = add_records(&mut hub_store, &day_now, "dev_b", 5, &mut rng);
    let first = run_pair(NOW, &push, &mut dev, &mut hub_store, admit_claimed).unwrap();
    assert!(first.completed());
    assert_eq!(first.new_records(Role::Responder), 20);
    assert_eq!(first.new_records(Role::Initiator), 0);
    assert_eq!(
        record_ids(&dev, &day_now).len(),
        20,
        "the sibling's records stay at the hub"
    );
    assert!(
        sibling
            .iter()
            .all(|r| !record_ids(&dev, &day_now).contains(r))
    );
    let mut sizes = Vec::new();
    for _ in 0..4 {
        add_records(&mut dev, &day_now, "dev_a", 1, &mut rng);
        let o = run_pair(NOW, &push, &mut dev, &mut hub_store, admit_claimed).unwrap();
        assert!(o.completed());
        assert_eq!(o.new_records(Role::Responder), 1);
        assert_eq!(o.new_records(Role::Initiator), 0);
        let device_syncs: Vec<&Frame> = o
            .frames
            .iter()
            .filter(|(r, f)| *r == Role::Initiator && matches!(f, Frame::Sync { .. }))
            .map(|(_, f)| f)
            .collect();
        assert_eq!(
            device_syncs.len(),
            1,
            "the change goes in the first message"
        );
        sizes.push(o.bytes_i_to_r + o.bytes_r_to_i);
    }
    println!("push-only sessions of one record: {sizes:?} B of frames");
    assert!(sizes.iter().all(|&b| b < 700), "{sizes:?}");
    // Varints and random ids move a few bytes; a hash more a session would be 32.
    let spread = sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0);
    assert!(spread < 16, "sessions grow: {sizes:?}");
    // Nothing new: nothing but the handshake.
    let idle = run_pair(NOW, &push, &mut dev, &mut hub_store, admit_claimed).unwrap();
    assert!(idle.completed());
    assert!(sync_frames(&idle).is_empty(), "{:?}", sync_frames(&idle));
    let hub_ids = record_ids(&hub_store, &day_now);
    assert!(record_ids(&dev, &day_now).is_subset(&hub_ids));
    assert_eq!(hub_ids.len(), 20 + 5 + 4);
}
