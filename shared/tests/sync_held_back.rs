//! A change automerge holds back for missing dependencies is applied later, when they arrive;
//! the session checks what was really applied (`validate::check_applied`), refuses the peer
//! and drops the partition in memory if a held-back change overwrote or conflicted with a key.

use automerge::sync::{Message, MessageVersion};
use automerge::{ChangeHash, ROOT, ReadDoc, ScalarValue, Value};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use shared::envelope::{Envelope, Record, RecordBody, SessionKey};
use shared::partition::Partition;
use shared::sync::harness::MemoryStore;
use shared::sync::{Event, Frame, Peer, RefuseReason, Session, Side};
use shared::{Day, DeviceId, FacilityId, PartitionId, RecordId, UnixSeconds};

/// Noon of day 20,000.
const NOW: UnixSeconds = 20_000 * 86_400 + 12 * 3_600;

fn pid() -> PartitionId {
    PartitionId {
        facility: FacilityId::parse("fac_a").unwrap(),
        day: Day::of(NOW),
    }
}

fn sealed(rng: &mut ChaCha8Rng, key: &SessionKey, id: RecordId, second: u64) -> Envelope {
    let partition = pid();
    let record = Record {
        facility: partition.facility.clone(),
        device: DeviceId::parse("dev_a").unwrap(),
        scanned_at: partition.day.start() + second,
        body: RecordBody::Qr {
            issuer_id: 1,
            key_id: 1,
            issued_at: partition.day.start(),
            token: [second as u8; 16],
        },
    };
    key.seal(rng, &partition, id, &record).unwrap()
}

/// A hub's session admitted for a device of fac_a, driven by hand.
fn admitted(store: &mut MemoryStore) -> Session {
    let hub = Peer::Hub {
        region: "seoul".into(),
    };
    let device = Peer::Device {
        device: DeviceId::parse("dev_r").unwrap(),
        facility: FacilityId::parse("fac_a").unwrap(),
    };
    shared::sync::harness::admitted_responder(hub, device, NOW, store).unwrap()
}

/// A sync frame carrying exactly `changes` (raw change chunks), as a rogue peer writes it.
fn sync_frame(changes: Vec<Vec<u8>>) -> Frame {
    shared::sync::harness::raw_sync_frame(&pid(), changes)
}

fn raw(p: &Partition, hash: ChangeHash) -> Vec<u8> {
    p.doc()
        .get_change_by_hash(&hash)
        .unwrap()
        .raw_bytes()
        .to_vec()
}

/// Every value the partition holds under `r/<id>`, as bytes.
fn values(store: &MemoryStore, id: RecordId) -> Vec<Vec<u8>> {
    let doc = store.get(&pid()).unwrap().doc();
    doc.get_all(ROOT, format!("r/{id}"))
        .unwrap()
        .into_iter()
        .map(|(v, _)| match v {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Bytes(b) => b.clone(),
                other => panic!("not bytes: {other:?}"),
            },
            other => panic!("not a scalar: {other:?}"),
        })
        .collect()
}

fn refused_invalid(session: &mut Session) -> bool {
    let events: Vec<Event> = std::iter::from_fn(|| session.poll_event()).collect();
    let frames: Vec<Frame> = std::iter::from_fn(|| session.poll_transmit()).collect();
    // The partition is refused, not the session: other days of the peer keep syncing.
    let refused = events.iter().any(|e| {
        matches!(
            e,
            Event::PartitionRefused {
                by: Side::Local,
                reason: RefuseReason::InvalidChange,
                partition,
                ..
            } if *partition == pid()
        )
    });
    // Nothing of the bad apply is announced for persisting.
    if refused {
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::PartitionUpdated { .. })),
            "{events:?}"
        );
        assert!(frames.iter().any(|f| matches!(
            f,
            Frame::Skipped { partition, refusal }
                if *partition == pid() && refusal.reason == RefuseReason::InvalidChange
        )));
        assert!(!session.is_finished(), "the session goes on");
    }
    refused
}

/// The rogue's two changes: `c1` puts a record of its own, `c2` (depending on `c1`) puts
/// `target` with its bytes, naming no predecessor (its document never held `target`).
fn rogue_changes(rng: &mut ChaCha8Rng, target: RecordId) -> (Vec<u8>, Vec<u8>, Envelope) {
    let key = SessionKey::generate(rng, pid().day);
    let mut rogue = Partition::new(pid(), &[0xee; 16]);
    let own = RecordId::random(rng);
    let own_env = sealed(rng, &key, own, 7);
    rogue.insert_batch(&[], &[(own, own_env)]).unwrap();
    let c1 = rogue.heads()[0];
    let evil = sealed(rng, &key, target, 66);
    rogue.insert_batch(&[], &[(target, evil.clone())]).unwrap();
    let c2 = rogue.heads()[0];
    assert_eq!(
        rogue.doc().get_change_by_hash(&c2).unwrap().deps(),
        &[c1],
        "c2 depends on c1"
    );
    (raw(&rogue, c1), raw(&rogue, c2), evil)
}

#[test]
fn a_held_back_change_cannot_overwrite_a_record_written_while_it_waited() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let honest_key = SessionKey::generate(&mut rng, pid().day);
    let mut hub = MemoryStore::new(b"hub", None);
    let first = RecordId::random(&mut rng);
    let env = sealed(&mut rng, &honest_key, first, 1);
    hub.insert({
        let mut p = Partition::new(pid(), b"hub");
        p.insert_batch(&[], &[(first, env)]).unwrap();
        p
    });
    let target = RecordId::random(&mut rng);
    let (c1, c2, _evil) = rogue_changes(&mut rng, target);
    let mut session = admitted(&mut hub);

    // The overwriting change first: its dependency is missing, automerge holds it back.
    session.handle_frame(NOW, sync_frame(vec![c2]), &mut hub);
    assert!(!session.is_finished());
    while session.poll_event().is_some() {}
    while session.poll_transmit().is_some() {}

    // Meanwhile the honest record `target` arrives (another device's session; a sibling
    // relaying it; here put straight into the partition the session holds in memory).
    let good = sealed(&mut rng, &honest_key, target, 2);
    hub.get_mut(&pid())
        .unwrap()
        .insert_batch(&[], &[(target, good.clone())])
        .unwrap();
    let heads_with_good = hub.get(&pid()).unwrap().heads();

    // Then the dependency: automerge applies it and the held-back change after it.
    session.handle_frame(NOW, sync_frame(vec![c1]), &mut hub);
    assert_eq!(
        values(&hub, target),
        vec![good.to_bytes()],
        "the honest record must stay the only value under its key"
    );
    assert!(refused_invalid(&mut session));
    // The partition was reverted to what was stored: nothing of the rogue's changes.
    let part = hub.get(&pid()).unwrap();
    assert_eq!(part.heads(), heads_with_good);
    assert_eq!(part.record_count(), 2);
}

#[test]
fn a_held_back_change_cannot_conflict_with_a_put_of_the_completing_message() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut hub = MemoryStore::new(b"hub", None);
    let first = RecordId::random(&mut rng);
    let key = SessionKey::generate(&mut rng, pid().day);
    let env = sealed(&mut rng, &key, first, 1);
    hub.insert({
        let mut p = Partition::new(pid(), b"hub");
        p.insert_batch(&[], &[(first, env)]).unwrap();
        p
    });
    let heads_before = hub.get(&pid()).unwrap().heads();
    let target = RecordId::random(&mut rng);
    let (c1, c2, _evil) = rogue_changes(&mut rng, target);
    // An independent change by another actor putting `target` with other bytes, sent in the
    // message that completes c2's dependencies: each message alone passes `check_against`.
    let mut other = Partition::new(pid(), &[0x11; 16]);
    let good = sealed(&mut rng, &key, target, 3);
    other.insert_batch(&[], &[(target, good)]).unwrap();
    let d = raw(&other, other.heads()[0]);

    let mut session = admitted(&mut hub);
    session.handle_frame(NOW, sync_frame(vec![c2]), &mut hub);
    assert!(!session.is_finished());
    while session.poll_event().is_some() {}
    while session.poll_transmit().is_some() {}
    session.handle_frame(NOW, sync_frame(vec![c1, d]), &mut hub);
    assert!(
        values(&hub, target).len() <= 1,
        "a conflict was applied: {} values",
        values(&hub, target).len()
    );
    assert!(refused_invalid(&mut session));
    assert_eq!(hub.get(&pid()).unwrap().heads(), heads_before);
}

#[test]
fn honest_out_of_order_changes_still_apply() {
    // A held-back change whose keys nobody else wrote is applied when its dependency arrives.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut hub = MemoryStore::new(b"hub", None);
    hub.insert(Partition::new(pid(), b"hub"));
    let target = RecordId::random(&mut rng);
    let (c1, c2, evil) = rogue_changes(&mut rng, target);
    let mut session = admitted(&mut hub);
    session.handle_frame(NOW, sync_frame(vec![c2]), &mut hub);
    session.handle_frame(NOW, sync_frame(vec![c1]), &mut hub);
    assert!(!refused_invalid(&mut session));
    assert!(!session.is_finished());
    assert_eq!(values(&hub, target), vec![evil.to_bytes()]);
    assert_eq!(hub.get(&pid()).unwrap().record_count(), 2);
}

/// A change of about `records` sealed visits that depends on one nobody else has: automerge
/// holds it back for ever.
fn orphan_change(rng: &mut ChaCha8Rng, records: usize) -> Vec<u8> {
    let key = SessionKey::generate(rng, pid().day);
    let mut rogue = Partition::new(pid(), &[0xed; 16]);
    let seed = RecordId::random(rng);
    let seed_env = sealed(rng, &key, seed, 9);
    rogue.insert_batch(&[], &[(seed, seed_env)]).unwrap();
    let batch: Vec<(RecordId, Envelope)> = (0..records)
        .map(|i| {
            let id = RecordId::random(rng);
            (id, sealed(rng, &key, id, 10 + i as u64 % 40_000))
        })
        .collect();
    rogue.insert_batch(&[], &batch).unwrap();
    raw(&rogue, rogue.heads()[0])
}

/// Finding 5 of the sync v2 review: changes whose dependency never arrives were kept in
/// memory without a bound (and stored with the next full save).
#[test]
fn changes_held_back_for_ever_are_refused_past_a_bound_and_dropped() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut hub = MemoryStore::new(b"hub", None);
    hub.insert(Partition::new(pid(), b"hub"));
    let orphan = orphan_change(&mut rng, 5_000);
    let frame = sync_frame(vec![orphan]);
    let Frame::Sync { message, .. } = &frame else {
        unreachable!()
    };
    let per_frame = message.len();
    assert!(per_frame > 500_000, "{per_frame} bytes");
    let mut session = admitted(&mut hub);
    let mut sent = 0usize;
    let mut refused = false;
    for _ in 0..(shared::sync::MAX_HELD_BACK_BYTES / per_frame + 2) {
        session.handle_frame(NOW, frame.clone(), &mut hub);
        sent += per_frame;
        if refused_invalid(&mut session) {
            refused = true;
            break;
        }
        assert!(hub.get(&pid()).unwrap().holds_back_changes());
    }
    assert!(
        refused,
        "{sent} bytes of changes held back and still accepted"
    );
    assert!(sent > shared::sync::MAX_HELD_BACK_BYTES);
    let part = hub.get(&pid()).unwrap();
    assert!(!part.holds_back_changes(), "the queue outlived the refusal");
    assert_eq!(part.record_count(), 0);
}

#[test]
fn a_session_starts_without_what_the_last_one_left_held_back() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut hub = MemoryStore::new(b"hub", None);
    hub.insert(Partition::new(pid(), b"hub"));
    let mut first = admitted(&mut hub);
    first.handle_frame(NOW, sync_frame(vec![orphan_change(&mut rng, 10)]), &mut hub);
    assert!(!refused_invalid(&mut first));
    assert!(hub.get(&pid()).unwrap().holds_back_changes());
    drop(first);
    // The next session (the peer reconnects) touches the partition: the old queue is gone
    // before its message is applied, and an honest message applies as usual.
    let target = RecordId::random(&mut rng);
    let (c1, c2, _) = rogue_changes(&mut rng, target);
    let mut second = admitted(&mut hub);
    second.handle_frame(NOW, sync_frame(vec![c1, c2]), &mut hub);
    assert!(!refused_invalid(&mut second));
    let part = hub.get(&pid()).unwrap();
    assert!(!part.holds_back_changes());
    assert_eq!(part.record_count(), 2);
}

/// Finding F1 of the second review: a device admitted as push-only left automerge's
/// read-only flag out of its messages and reset what the hub thought it had sent, and the hub
/// answered a ~100-byte request with the whole partition. A push-only peer gets no changes.
#[test]
fn a_push_only_peer_that_drops_the_read_only_flag_still_gets_no_changes() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let key = SessionKey::generate(&mut rng, pid().day);
    let mut hub = MemoryStore::new(b"hub", None);
    hub.insert({
        let mut p = Partition::new(pid(), b"hub");
        let batch: Vec<(RecordId, Envelope)> = (0..50)
            .map(|i| {
                let id = RecordId::random(&mut rng);
                (id, sealed(&mut rng, &key, id, i))
            })
            .collect();
        p.insert_batch(&[], &batch).unwrap();
        p
    });
    let device = Peer::Device {
        device: DeviceId::parse("dev_r").unwrap(),
        facility: FacilityId::parse("fac_a").unwrap(),
    };
    let mut session = Session::responder(Peer::Hub {
        region: "seoul".into(),
    });
    let hello = shared::sync::Hello {
        version: shared::sync::PROTOCOL_VERSION,
        peer: device,
        now: NOW,
        horizon: shared::time::horizon(NOW),
        partitions: vec![],
        in_sync: Default::default(),
        push_only: true,
        credential: None,
        refresh_have: None,
    };
    session.handle_frame(NOW, Frame::Hello(hello), &mut hub);
    while session.poll_event().is_some() {}
    session.admit(
        NOW,
        shared::sync::Decision::Admit {
            facility: FacilityId::parse("fac_a").unwrap(),
            refresh: None,
        },
        &mut hub,
    );
    while session.poll_transmit().is_some() {}
    while session.poll_event().is_some() {}
    // A flagless message with no heads and an empty bloom filter: "send me everything".
    let ask = Frame::Sync {
        partition: pid(),
        message: Message {
            heads: vec![],
            need: vec![],
            have: vec![automerge::sync::Have::default()],
            changes: Vec::<Vec<u8>>::new().into(),
            flags: None,
            version: MessageVersion::V1,
        }
        .encode(),
    };
    let mut got = 0usize;
    for _ in 0..3 {
        session.handle_frame(NOW, ask.clone(), &mut hub);
        for f in std::iter::from_fn(|| session.poll_transmit()) {
            if let Frame::Sync { message, .. } = f {
                got += Message::decode(&message).unwrap().changes.len();
            }
        }
        while session.poll_event().is_some() {}
    }
    assert_eq!(got, 0, "the hub sent a push-only peer {got} changes");
}

/// Finding F5 of the second review: `Skipped` frames naming partitions this side never
/// synced were ignored one by one, so a peer could send them without bound. The first ends
/// the session as a protocol error.
#[test]
fn a_skipped_frame_for_a_partition_not_being_synced_ends_the_session() {
    let mut hub = MemoryStore::new(b"hub", None);
    let mut session = admitted(&mut hub);
    session.handle_frame(
        NOW,
        Frame::Skipped {
            partition: pid(),
            refusal: shared::sync::Refusal::new(RefuseReason::InvalidChange, "nothing"),
        },
        &mut hub,
    );
    assert!(session.is_finished() && !session.is_completed());
    let events: Vec<Event> = std::iter::from_fn(|| session.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(e, Event::Failed(_))),
        "{events:?}"
    );
}

/// A rogue's two changes of one actor with the same operation ids (found in review): `c1`
/// puts 26 records, `c2` is a copy numbered 2 that keeps `c1`'s start op (so reuses its ids),
/// with other bytes under `target`, the fourth put. `c2` depends on `c1` unless `concurrent`.
/// Both pass `read_message`: predless puts of well-formed envelopes.
fn reused_ids(rng: &mut ChaCha8Rng, concurrent: bool) -> (Vec<u8>, Vec<u8>, RecordId) {
    let key = SessionKey::generate(rng, pid().day);
    let mut ids: Vec<RecordId> = (0..26).map(|_| RecordId::random(rng)).collect();
    ids.sort_by_key(|id| id.to_string());
    let target = ids.remove(0);
    ids.insert(3, target);
    let batch: Vec<(RecordId, Envelope)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, sealed(rng, &key, *id, 10 + i as u64)))
        .collect();
    let mut rogue = Partition::new(pid(), &[0xee; 16]);
    rogue.insert_batch(&[], &batch).unwrap();
    let c1 = rogue.doc().get_change_by_hash(&rogue.heads()[0]).unwrap();
    let mut e = c1.decode();
    let at = format!("r/{target}");
    let pos = e
        .operations
        .iter()
        .position(|o| matches!(&o.key, automerge::legacy::Key::Map(k) if k.as_str() == at))
        .unwrap();
    let evil = sealed(rng, &key, target, 99);
    e.operations[pos].action = automerge::legacy::OpType::Put(ScalarValue::Bytes(evil.to_bytes()));
    e.seq = 2;
    e.deps = if concurrent { vec![] } else { vec![c1.hash()] };
    e.hash = None;
    let c2 = automerge::Change::from(e);
    assert_eq!(c2.start_op(), c1.start_op(), "c2 reuses c1's operation ids");
    (c1.raw_bytes().to_vec(), c2.raw_bytes().to_vec(), target)
}

/// Asserts that the session's last input updated the partition.
fn assert_updated(session: &mut Session) {
    let events: Vec<Event> = std::iter::from_fn(|| session.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::PartitionUpdated { .. })),
        "{events:?}"
    );
}

/// A hub that holds nothing, and its session for a rogue device after it took `changes`.
fn delivered(changes: Vec<Vec<u8>>) -> (MemoryStore, Session) {
    let mut hub = MemoryStore::new(b"hub", None);
    let mut session = admitted(&mut hub);
    session.handle_frame(NOW, sync_frame(changes), &mut hub);
    (hub, session)
}

/// At most one value under `target`, or no partition at all (refused and discarded).
fn one_value_at_most(store: &MemoryStore, target: RecordId) -> bool {
    store.get(&pid()).is_none() || values(store, target).len() <= 1
}

#[test]
fn a_change_reusing_the_operation_ids_of_a_held_back_one_is_refused_before_the_apply() {
    // The held-back copy first, then the change it depends on: each message alone passes
    // `check_against`, and automerge would apply both, keeping two values under `target`
    // (its debug build panics on the duplicate ids; its release build rebuilt the changes
    // without one of the puts, which hid the conflict from a check that trusted them).
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (c1, c2, target) = reused_ids(&mut rng, false);
    let (mut hub, mut session) = delivered(vec![c2]);
    assert!(!session.is_finished());
    while session.poll_event().is_some() {}
    while session.poll_transmit().is_some() {}
    session.handle_frame(NOW, sync_frame(vec![c1]), &mut hub);
    assert!(one_value_at_most(&hub, target));
    assert!(refused_invalid(&mut session));
    assert!(hub.get(&pid()).is_none_or(|p| p.record_count() == 0));
}

/// Where the reuse is visible to the other checks as well (one message; a key the partition
/// holds), the partition is refused all the same, whichever check sees it first.
#[test]
fn changes_reusing_operation_ids_are_refused_in_one_message_or_against_the_partition() {
    // Both in one message, chained or concurrent.
    for concurrent in [false, true] {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (c1, c2, target) = reused_ids(&mut rng, concurrent);
        let mut hub = MemoryStore::new(b"hub", None);
        let mut session = admitted(&mut hub);
        session.handle_frame(NOW, sync_frame(vec![c1, c2]), &mut hub);
        assert!(one_value_at_most(&hub, target), "concurrent: {concurrent}");
        assert!(refused_invalid(&mut session), "concurrent: {concurrent}");
    }
    // The first change applied and stored, the copy in a later message.
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (c1, c2, target) = reused_ids(&mut rng, false);
    let (mut hub, mut session) = delivered(vec![c1]);
    assert_updated(&mut session);
    while session.poll_transmit().is_some() {}
    let heads = hub.get(&pid()).unwrap().heads();
    session.handle_frame(NOW, sync_frame(vec![c2]), &mut hub);
    assert!(refused_invalid(&mut session));
    assert_eq!(values(&hub, target).len(), 1);
    assert_eq!(hub.get(&pid()).unwrap().heads(), heads);
}

/// Found in review: automerge 0.12 looks an actor up with `unwrap` when it applies a change
/// numbered 2 or more of an actor it never saw numbered 1, so such a change (well-formed,
/// its dependencies met) panicked the node that applied it.
#[test]
fn a_change_of_an_unknown_actor_numbered_two_is_refused_without_ending_the_node() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let (_c1, c2, _target) = reused_ids(&mut rng, true);
    let (hub, mut session) = delivered(vec![c2]);
    assert!(refused_invalid(&mut session));
    assert!(hub.get(&pid()).is_none_or(|p| p.record_count() == 0));
    // An honest first change of the same partition is taken as before.
    let key = SessionKey::generate(&mut rng, pid().day);
    let mut honest = Partition::new(pid(), &[0x21; 16]);
    let id = RecordId::random(&mut rng);
    honest
        .insert_batch(&[], &[(id, sealed(&mut rng, &key, id, 5))])
        .unwrap();
    let mut hub = MemoryStore::new(b"hub", None);
    let mut session = admitted(&mut hub);
    session.handle_frame(
        NOW,
        sync_frame(vec![raw(&honest, honest.heads()[0])]),
        &mut hub,
    );
    assert_updated(&mut session);
}
