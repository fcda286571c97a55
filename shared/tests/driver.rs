//! The one sync event loop (`shared::sync::driver`) under injected store failures, through
//! the in-memory pair that runs it on both sides (`harness::run_pair_with`): a failed persist
//! or sync-state write on either side aborts the session with the reason at both ends (when
//! the peer is still listening), stores no sync state from then on, discards the merged
//! partition, and a later clean session delivers everything.

use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::sync::driver::End;
use shared::sync::harness::{
    Faults, MemoryStore, PairFaults, PairOutcome, PairSetup, run_pair_with,
};
use shared::sync::{Decision, Event, Frame, Peer, PeerHello, RefuseReason, Role, Side};
use shared::{Day, DeviceId, FacilityId, PartitionId, RecordId, UnixSeconds};
use std::collections::BTreeSet;

/// Noon of day 20,000.
const NOW: UnixSeconds = 20_000 * 86_400 + 12 * 3_600;

fn facility() -> FacilityId {
    FacilityId::parse("fac_a").unwrap()
}

fn today() -> PartitionId {
    PartitionId {
        facility: facility(),
        day: Day::of(NOW),
    }
}

fn admit(hello: &PeerHello) -> Decision {
    Decision::Admit {
        facility: hello.peer.facility().cloned().unwrap_or_else(facility),
        refresh: None,
    }
}

fn setup() -> PairSetup {
    setup_push(false)
}

fn setup_push(push_only: bool) -> PairSetup {
    PairSetup {
        initiator: Peer::Device {
            device: DeviceId::parse("dev_a").unwrap(),
            facility: facility(),
        },
        responder: Peer::Hub {
            region: "seoul".into(),
        },
        credential: None,
        // Without it both ways, so that both sides merge and persist.
        push_only,
    }
}

/// Seals `n` records of `device` into today's partition of `store`, as one change.
fn add_records(store: &mut MemoryStore, device: &str, n: usize, rng: &mut ChaCha8Rng) {
    add_records_to(store, today(), device, n, rng);
}

/// Seals `n` records of `device` into partition `id` of `store`, as one change.
fn add_records_to(
    store: &mut MemoryStore,
    id: PartitionId,
    device: &str,
    n: usize,
    rng: &mut ChaCha8Rng,
) {
    let key = SessionKey::generate(rng, id.day);
    let mut batch = Vec::new();
    for i in 0..n {
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
        let record_id = RecordId::random(rng);
        batch.push((record_id, key.seal(rng, &id, record_id, &record).unwrap()));
    }
    assert_eq!(
        store.get_or_create(&id).insert_batch(&[], &batch).unwrap(),
        n
    );
}

fn records(store: &MemoryStore) -> BTreeSet<RecordId> {
    store
        .get(&today())
        .map(|p| p.records().into_iter().map(|(r, _)| r).collect())
        .unwrap_or_default()
}

/// A device holding 30 records and a hub holding 20 of a sibling's, both today.
fn stores() -> (MemoryStore, MemoryStore) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut dev = MemoryStore::new(b"device-a", Some(facility()));
    let mut hub = MemoryStore::new(b"hub", None);
    add_records(&mut dev, "dev_a", 30, &mut rng);
    add_records(&mut hub, "dev_b", 20, &mut rng);
    // A second partition, so that each side has more than one sync state to store.
    let yesterday = PartitionId {
        facility: facility(),
        day: Day::of(NOW).minus(1),
    };
    add_records_to(&mut dev, yesterday, "dev_a", 5, &mut rng);
    (dev, hub)
}

fn run(dev: &mut MemoryStore, hub: &mut MemoryStore, faults: PairFaults) -> PairOutcome {
    run_pair_with(NOW, &setup(), dev, hub, admit, faults).unwrap()
}

fn run_push(dev: &mut MemoryStore, hub: &mut MemoryStore, faults: PairFaults) -> PairOutcome {
    run_pair_with(NOW, &setup_push(true), dev, hub, admit, faults).unwrap()
}

fn other(role: Role) -> Role {
    match role {
        Role::Initiator => Role::Responder,
        Role::Responder => Role::Initiator,
    }
}

fn faults_on(role: Role, faults: Faults) -> PairFaults {
    match role {
        Role::Initiator => PairFaults {
            initiator: faults,
            ..PairFaults::default()
        },
        Role::Responder => PairFaults {
            responder: faults,
            ..PairFaults::default()
        },
    }
}

/// The failing side aborted with `reason` and the peer was refused with it.
fn assert_aborted_at_both_ends(outcome: &PairOutcome, failing: Role, reason: RefuseReason) {
    match outcome.end(failing) {
        Some(End::Aborted { reason: r, .. }) => assert_eq!(*r, reason),
        e => panic!("{failing:?} should have aborted: {e:?}"),
    }
    match outcome.end(other(failing)) {
        Some(End::Refused {
            by: Side::Peer,
            reason: r,
            ..
        }) => assert_eq!(*r, reason),
        e => panic!("{:?} should have been refused: {e:?}", other(failing)),
    }
    // Only the refusal left the failing side after the failure: no `Done` claiming a clean end.
    let last = outcome.frames.iter().rev().find(|(r, _)| *r == failing);
    assert!(
        matches!(last, Some((_, Frame::Refused(_)))),
        "{:?}",
        outcome.frames
    );
    assert!(!outcome.completed());
}

/// Everything both held is on both sides, and the clean session completed.
fn assert_clean_session_delivers_everything(
    dev: &mut MemoryStore,
    hub: &mut MemoryStore,
    all: &BTreeSet<RecordId>,
) {
    let clean = run(dev, hub, PairFaults::default());
    assert!(
        clean.completed(),
        "{:?} {:?}",
        clean.initiator_end,
        clean.responder_end
    );
    assert_eq!(&records(dev), all);
    assert_eq!(&records(hub), all);
    assert!(dev.sync_state_count() > 0 && hub.sync_state_count() > 0);
}

fn failed_persist_on(failing: Role, fault: Faults, reason: RefuseReason) {
    let (mut dev, mut hub) = stores();
    let (dev_before, hub_before) = (records(&dev), records(&hub));
    let all: BTreeSet<RecordId> = dev_before.union(&hub_before).copied().collect();

    let outcome = run(&mut dev, &mut hub, faults_on(failing, fault));
    assert_aborted_at_both_ends(&outcome, failing, reason);
    // The failing side raised the update it could not store, and kept none of it: its
    // in-memory partition was discarded back to what it held.
    assert!(outcome.new_records(failing) > 0, "{:?}", outcome.events);
    let (failing_store, before) = match failing {
        Role::Initiator => (&dev, &dev_before),
        Role::Responder => (&hub, &hub_before),
    };
    assert_eq!(&records(failing_store), before);
    match failing {
        Role::Initiator => assert_eq!(outcome.initiator_stored, 0),
        Role::Responder => assert_eq!(outcome.responder_stored, 0),
    }
    // No sync state on either side: none may claim what was not stored.
    assert_eq!((dev.sync_state_count(), hub.sync_state_count()), (0, 0));

    assert_clean_session_delivers_everything(&mut dev, &mut hub, &all);
}

#[test]
fn a_failed_persist_at_the_responder_aborts_with_internal_at_both_ends() {
    let fault = Faults {
        fail_persist: Some(0),
        ..Faults::default()
    };
    failed_persist_on(Role::Responder, fault, RefuseReason::Internal);
}

#[test]
fn a_failed_persist_at_the_initiator_aborts_with_internal_at_both_ends() {
    let fault = Faults {
        fail_persist: Some(0),
        ..Faults::default()
    };
    failed_persist_on(Role::Initiator, fault, RefuseReason::Internal);
}

/// A quota refuses one partition (`Abort::partition`), not the session: the partition is
/// discarded and named to the peer, the session completes, nothing of it is stored, and a
/// later session delivers it.
#[test]
fn a_quota_refusal_of_a_persist_refuses_that_partition_and_the_session_goes_on() {
    let (mut dev, mut hub) = stores();
    let (dev_before, hub_before) = (records(&dev), records(&hub));
    let all: BTreeSet<RecordId> = dev_before.union(&hub_before).copied().collect();
    let fault = Faults {
        quota_persist: Some(0),
        ..Faults::default()
    };
    let outcome = run(&mut dev, &mut hub, faults_on(Role::Responder, fault));
    assert!(
        outcome.completed(),
        "{:?} {:?}",
        outcome.initiator_end,
        outcome.responder_end
    );
    for (role, by) in [
        (Role::Responder, Side::Local),
        (Role::Initiator, Side::Peer),
    ] {
        assert!(
            outcome.events.iter().any(|(r, e)| *r == role
                && matches!(
                    e,
                    Event::PartitionRefused {
                        by: b,
                        reason: RefuseReason::QuotaExceeded,
                        ..
                    } if *b == by
                )),
            "{role:?} did not see the partition refused: {:?}",
            outcome.events
        );
    }
    assert_eq!(
        records(&hub),
        hub_before,
        "nothing of the refused partition is kept"
    );
    assert!(
        outcome
            .frames
            .iter()
            .any(|(r, f)| *r == Role::Responder && matches!(f, Frame::Skipped { .. }))
    );
    assert_clean_session_delivers_everything(&mut dev, &mut hub, &all);
}

/// A sync-state write fails on `failing`: it stores no sync state after it, counts nothing
/// as completed, and the peer is told unless it had already finished.
fn failed_sync_state_on(failing: Role, push_only: bool) {
    let (mut dev, mut hub) = stores();
    let all: BTreeSet<RecordId> = records(&dev).union(&records(&hub)).copied().collect();
    let fault = Faults {
        fail_sync_state: Some(0),
        ..Faults::default()
    };
    let outcome = if push_only {
        run_push(&mut dev, &mut hub, faults_on(failing, fault))
    } else {
        run(&mut dev, &mut hub, faults_on(failing, fault))
    };
    match outcome.end(failing) {
        Some(End::Aborted {
            reason: RefuseReason::Internal,
            detail,
        }) => assert!(detail.contains("sync state"), "{detail}"),
        e => panic!("{failing:?} should have aborted: {e:?}"),
    }
    let raised = outcome
        .events
        .iter()
        .filter(|(r, e)| *r == failing && matches!(e, Event::SyncStateChanged { .. }))
        .count();
    assert!(
        raised > 1,
        "the failing side had sync states to store after the first"
    );
    let stored = match failing {
        Role::Initiator => dev.sync_state_count(),
        Role::Responder => hub.sync_state_count(),
    };
    assert_eq!(stored, 0, "no sync state stored after the failure");
    // The partitions were stored before the states: nothing is discarded.
    if !push_only {
        assert_eq!(records(&dev), all);
    }
    assert_eq!(records(&hub), all);
    // The failing side still sent the peer its refusal. Whether the peer hears of it depends
    // on who finished first: a peer still waiting for this side's `Done` gets the refusal
    // instead; one that had finished already completed (the states are written after both
    // sides said done, and everything the peer sent is stored; only this side's state is
    // missing, so the next session is larger, not wrong).
    let last = outcome.frames.iter().rev().find(|(r, _)| *r == failing);
    assert!(
        matches!(last, Some((_, Frame::Refused(_)))),
        "{:?}",
        outcome.frames
    );
    match outcome.end(other(failing)) {
        Some(End::Refused {
            by: Side::Peer,
            reason: RefuseReason::Internal,
            ..
        })
        | Some(End::Completed) => {}
        e => panic!("unexpected end of the peer: {e:?}"),
    }
    assert_clean_session_delivers_everything(&mut dev, &mut hub, &all);
}

#[test]
fn a_failed_sync_state_write_at_the_responder_stores_no_state_after_it() {
    failed_sync_state_on(Role::Responder, false);
    failed_sync_state_on(Role::Responder, true);
}

#[test]
fn a_failed_sync_state_write_at_the_initiator_stores_no_state_after_it() {
    failed_sync_state_on(Role::Initiator, false);
    failed_sync_state_on(Role::Initiator, true);
}

/// A shell of its own over a `MemoryStore` that logs what it does, for the order of effects.
struct LogShell<'a> {
    link: shared::sync::driver::Link,
    store: &'a mut MemoryStore,
    fail_persist: bool,
    log: Vec<String>,
    outbox: Vec<Frame>,
}

impl shared::sync::driver::Shell for LogShell<'_> {
    type Store = MemoryStore;

    fn link_and_store(&mut self) -> (&mut shared::sync::driver::Link, &mut MemoryStore) {
        (&mut self.link, &mut *self.store)
    }

    fn admit(&mut self, _now: UnixSeconds, hello: &PeerHello) -> Decision {
        admit(hello)
    }

    fn persist(
        &mut self,
        _now: UnixSeconds,
        id: &PartitionId,
        _new_records: u64,
        _new_keys: u64,
    ) -> Result<(), shared::sync::driver::Abort> {
        self.log.push("persist".into());
        if self.fail_persist {
            return Err(shared::sync::driver::Abort::internal(format!(
                "cannot store partition {id}"
            )));
        }
        Ok(())
    }

    fn send(&mut self, frame: Frame) -> Result<(), shared::sync::driver::Abort> {
        self.log.push(format!("send {}", frame.kind()));
        self.outbox.push(frame);
        Ok(())
    }
}

#[test]
fn a_merge_is_stored_before_any_frame_and_after_a_failure_only_the_refusal_leaves() {
    use shared::sync::Session;
    use shared::sync::driver::{self, Link};
    let (mut dev, mut hub) = stores();
    let hub_before = records(&hub);
    let setup = setup();
    let initiator = Session::initiator_to(
        NOW,
        setup.initiator.clone(),
        Some(&setup.responder),
        None,
        None,
        false,
        &dev,
    )
    .unwrap();
    let mut i = LogShell {
        link: Link::new(initiator),
        store: &mut dev,
        fail_persist: false,
        log: Vec::new(),
        outbox: Vec::new(),
    };
    let mut r = LogShell {
        link: Link::new(Session::responder(setup.responder.clone())),
        store: &mut hub,
        fail_persist: true,
        log: Vec::new(),
        outbox: Vec::new(),
    };
    driver::pump(&mut i, NOW);
    // One step of the responder per frame: the failing step's log.
    let mut failing_step = None;
    for _ in 0..100 {
        let to_r = std::mem::take(&mut i.outbox);
        for f in to_r {
            r.log.clear();
            driver::handle_frame(&mut r, NOW, f);
            if failing_step.is_none() && r.log.iter().any(|l| l == "persist") {
                failing_step = Some(r.log.clone());
            }
        }
        let to_i = std::mem::take(&mut r.outbox);
        if to_i.is_empty() && i.outbox.is_empty() {
            break;
        }
        for f in to_i {
            driver::handle_frame(&mut i, NOW, f);
        }
    }
    // The merge was offered for storing before the step sent anything, and when it failed
    // the step's reply was not sent, only the refusal.
    assert_eq!(
        failing_step,
        Some(vec!["persist".to_owned(), "send Refused".to_owned()])
    );
    assert!(matches!(r.link.end(), Some(End::Aborted { .. })));
    assert!(matches!(
        i.link.end(),
        Some(End::Refused {
            by: Side::Peer,
            reason: RefuseReason::Internal,
            ..
        })
    ));
    drop(r);
    assert_eq!(records(&hub), hub_before, "the merge was discarded");
}

/// Finding F4 of the second sync v2 review: changes a peer left held back (their dependency
/// never sent) stayed in the responder's memory after the session, until the partition was
/// next synced: a peer could park up to `MAX_HELD_BACK_BYTES` in each of many partitions.
/// The driver now drops them when the session ends, however it ends.
#[test]
fn changes_held_back_do_not_outlive_their_session() {
    use automerge::ReadDoc;
    use automerge::sync::{Message, MessageVersion};
    use shared::sync::Session;
    use shared::sync::driver::{self, Link};
    for ends_by_closing in [true, false] {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (_, mut hub) = stores();
        let empty = MemoryStore::new(b"device-a", Some(facility()));
        // Two changes of the peer's; only the second (which depends on the first) is sent.
        let mut peer = MemoryStore::new(b"rogue", Some(facility()));
        add_records(&mut peer, "dev_a", 1, &mut rng);
        add_records(&mut peer, "dev_a", 1, &mut rng);
        let second = {
            let p = peer.get(&today()).unwrap();
            let head = p.heads()[0];
            p.doc()
                .get_change_by_hash(&head)
                .unwrap()
                .raw_bytes()
                .to_vec()
        };
        let orphan = Frame::Sync {
            partition: today(),
            message: Message {
                heads: vec![],
                need: vec![],
                have: vec![],
                changes: vec![second].into(),
                flags: None,
                version: MessageVersion::V1,
            }
            .encode(),
        };
        let setup = setup_push(true);
        let initiator = Session::initiator_to(
            NOW,
            setup.initiator.clone(),
            Some(&setup.responder),
            None,
            None,
            true,
            &empty,
        )
        .unwrap();
        let mut i = LogShell {
            link: Link::new(initiator),
            store: &mut MemoryStore::new(b"device-a", Some(facility())),
            fail_persist: false,
            log: Vec::new(),
            outbox: Vec::new(),
        };
        driver::pump(&mut i, NOW);
        let mut r = LogShell {
            link: Link::new(Session::responder(setup.responder.clone())),
            store: &mut hub,
            fail_persist: false,
            log: Vec::new(),
            outbox: Vec::new(),
        };
        for f in std::mem::take(&mut i.outbox) {
            driver::handle_frame(&mut r, NOW, f);
        }
        driver::handle_frame(&mut r, NOW, orphan);
        assert!(
            r.store.get(&today()).unwrap().holds_back_changes(),
            "the orphan is held back while the session runs"
        );
        if ends_by_closing {
            driver::handle_closed(&mut r, NOW);
        } else {
            driver::abort(&mut r, NOW, driver::Abort::internal("test".to_owned()));
        }
        assert!(r.link.end().is_some());
        assert!(
            !r.store.get(&today()).unwrap().holds_back_changes(),
            "held-back changes outlived the session (closed: {ends_by_closing})"
        );
        assert_eq!(records(r.store).len(), 20, "nothing stored was lost");
    }
}
