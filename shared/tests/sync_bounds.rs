//! Change sets of any size travel in bounded frames: a busy facility-day (200,000 visits, ~30
//! MB of changes, more than the 16 MiB frame limit) syncs from a device to a hub and from the
//! hub to a fresh device in sync messages of at most `MAX_SYNC_MESSAGE_BYTES`, and every
//! record arrives; a rogue device's 9 MiB change is refused by the validator with its size
//! named, and the honest devices of the same facility keep syncing that partition.

use automerge::ReadDoc;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use shared::daykey::DayKeyRatchet;
use shared::envelope::{Envelope, MAX_ENVELOPE_BYTES, SessionKey, WrappedKey};
use shared::partition::Partition;
use shared::sync::harness::{MemoryStore, PairOutcome, PairSetup, run_pair};
use shared::sync::validate::MAX_CHANGE_BYTES;
use shared::sync::{
    Decision, Event, MAX_FRAME_BYTES, MAX_SYNC_MESSAGE_BYTES, Peer, PeerHello, RefuseReason, Role,
    Side,
};
use shared::{Day, DeviceId, FacilityId, PartitionId, RecordId, UnixSeconds};
use std::time::Instant;

/// Noon of day 20,000.
const NOW: UnixSeconds = 20_000 * 86_400 + 12 * 3_600;

/// Records per change, as a device folds them (`edge-node`'s `MAX_RECORDS_PER_CHANGE`).
const PER_CHANGE: usize = 2_000;

/// A sealed QR visit's envelope length: version, session id, nonce, ciphertext and tag.
const ENVELOPE_BYTES: usize = 1 + 16 + 24 + 60;

/// A frame's body beyond its sync message: the frame tag, the partition id, length prefixes.
const FRAME_OVERHEAD: usize = 256;

fn facility() -> FacilityId {
    FacilityId::parse("fac_a").unwrap()
}

fn device(name: &str) -> Peer {
    Peer::Device {
        device: DeviceId::parse(name).unwrap(),
        facility: facility(),
    }
}

fn hub() -> Peer {
    Peer::Hub {
        region: "seoul".into(),
    }
}

fn today() -> PartitionId {
    PartitionId {
        facility: facility(),
        day: Day::of(NOW),
    }
}

fn admit(hello: &PeerHello) -> Decision {
    match hello.peer.facility() {
        Some(f) => Decision::Admit {
            facility: f.clone(),
            refresh: None,
        },
        None => Decision::Refuse {
            reason: RefuseReason::UnknownDevice,
            detail: "only devices sync here".into(),
        },
    }
}

fn setup(from: &str) -> PairSetup {
    PairSetup {
        initiator: device(from),
        responder: hub(),
        credential: None,
        push_only: false,
    }
}

fn wrapped_key(rng: &mut ChaCha8Rng) -> WrappedKey {
    let day = today().day;
    let key = SessionKey::generate(rng, day);
    let ratchet = DayKeyRatchet::generate(rng, day);
    key.wrap(&ratchet.public(day).unwrap()).unwrap()
}

/// An envelope-shaped value of `len` bytes: the version byte, then random bytes (the
/// validator checks the shape, only the day secret's holder could check the seal).
fn envelope(rng: &mut ChaCha8Rng, len: usize) -> Envelope {
    let mut bytes = vec![0u8; len];
    rng.fill_bytes(&mut bytes);
    bytes[0] = shared::envelope::ENVELOPE_VERSION;
    Envelope::from_bytes(&bytes).unwrap()
}

/// Folds `n` records into today's partition of `store` in changes of [`PER_CHANGE`] records,
/// as a device's bounded folds would, with one wrapped key in the first.
fn fold_bounded(store: &mut MemoryStore, n: usize, rng: &mut ChaCha8Rng) {
    let key = wrapped_key(rng);
    let partition = store.get_or_create(&today());
    let mut left = n;
    let mut first = true;
    while left > 0 {
        let take = left.min(PER_CHANGE);
        let batch: Vec<(RecordId, Envelope)> = (0..take)
            .map(|_| (RecordId::random(rng), envelope(rng, ENVELOPE_BYTES)))
            .collect();
        let keys = if first { vec![key.clone()] } else { vec![] };
        assert_eq!(partition.insert_batch(&keys, &batch).unwrap(), take);
        first = false;
        left -= take;
    }
}

fn syncs_from(outcome: &PairOutcome, side: Role) -> usize {
    outcome
        .frames
        .iter()
        .filter(|(r, f)| *r == side && matches!(f, shared::sync::Frame::Sync { .. }))
        .count()
}

/// A day of `n` visits goes device → hub and hub → a fresh device, every frame bounded.
fn busy_day(n: usize) {
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
    let mut dev = MemoryStore::new(b"dev_a-run1", Some(facility()));
    fold_bounded(&mut dev, n, &mut rng);
    let total = dev.get(&today()).unwrap().doc().save_nocompress().len();
    eprintln!(
        "{n} records, {total} bytes of changes, built in {:?}",
        started.elapsed()
    );

    let mut hub_store = MemoryStore::new(b"hub", None);
    let up = run_pair(NOW, &setup("dev_a"), &mut dev, &mut hub_store, admit).unwrap();
    assert!(up.completed(), "{:?}", up.events.last());
    // The brief's bound, independent of the constant that implements it.
    const { assert!(MAX_SYNC_MESSAGE_BYTES <= 4 * 1024 * 1024) };
    let bound = 4 * 1024 * 1024 + FRAME_OVERHEAD;
    assert!(
        up.max_frame_bytes <= bound,
        "a frame of {} bytes, over {bound}",
        up.max_frame_bytes
    );
    let at_hub = hub_store.get(&today()).unwrap();
    assert_eq!(at_hub.record_count(), n);
    assert_eq!(at_hub.heads(), dev.get(&today()).unwrap().heads());
    assert_eq!(up.new_records(Role::Responder), n as u64);
    // More changes than fit one message: the device sent them over several.
    let needed = total.div_ceil(MAX_SYNC_MESSAGE_BYTES);
    assert!(syncs_from(&up, Role::Initiator) > needed);
    eprintln!(
        "up: {} syncs, largest frame {} bytes, {:?}",
        syncs_from(&up, Role::Initiator),
        up.max_frame_bytes,
        started.elapsed()
    );

    // A new device of the facility fetches the whole day from the hub, bounded the same way.
    let mut fresh = MemoryStore::new(b"dev_b-run1", Some(facility()));
    let down = run_pair(NOW, &setup("dev_b"), &mut fresh, &mut hub_store, admit).unwrap();
    assert!(down.completed(), "{:?}", down.events.last());
    assert!(down.max_frame_bytes <= bound, "{}", down.max_frame_bytes);
    assert_eq!(fresh.get(&today()).unwrap().record_count(), n);
    assert!(syncs_from(&down, Role::Responder) > needed);
    eprintln!("down: done after {:?}", started.elapsed());
}

/// 40,000 visits (~5.6 MB) overflow one bounded message, even deflated.
#[test]
fn a_busy_day_syncs_in_bounded_frames() {
    busy_day(40_000);
}

/// The design load: 200,000 visits in a day, ~28 MB of changes, well over the 16 MiB frame
/// limit. About a minute on a 2-core machine (most of it automerge applying and our validator
/// reading every change), so not in the default run:
/// `cargo test -p shared --test sync_bounds -- --ignored`.
#[test]
#[ignore = "about a minute; the 40,000-visit test covers the same path by default"]
fn a_200k_visit_day_syncs_in_bounded_frames() {
    busy_day(200_000);
}

/// A rogue device of the facility commits one change of 9 MiB (600 puts of 16 KiB
/// envelope-shaped values, each legal on its own) to yesterday's partition: the hub refuses
/// that partition naming the size and keeps nothing of it, while the same session still
/// delivers today's records (one bad day must not block the later ones: finding 1 of the
/// sync v2 review), and an honest device's records, earlier and later, still arrive.
#[test]
fn a_9_mib_change_is_refused_and_the_partition_keeps_syncing() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut hub_store = MemoryStore::new(b"hub", None);

    let mut honest = MemoryStore::new(b"dev_a-run1", Some(facility()));
    fold_bounded(&mut honest, 100, &mut rng);
    let first = run_pair(NOW, &setup("dev_a"), &mut honest, &mut hub_store, admit).unwrap();
    assert!(first.completed());

    // The rogue first takes the honest day from the hub, then adds its huge change to
    // yesterday and ten ordinary records to today.
    let mut rogue = MemoryStore::new(b"dev_r-run1", Some(facility()));
    let fetch = run_pair(NOW, &setup("dev_r"), &mut rogue, &mut hub_store, admit).unwrap();
    assert!(fetch.completed());
    let big: Vec<(RecordId, Envelope)> = (0..600)
        .map(|_| {
            (
                RecordId::random(&mut rng),
                envelope(&mut rng, MAX_ENVELOPE_BYTES - 64),
            )
        })
        .collect();
    let yesterday = PartitionId {
        facility: facility(),
        day: today().day.minus(1),
    };
    let part: &mut Partition = rogue.get_or_create(&yesterday);
    part.insert_batch(&[], &big).unwrap();
    let change = part.doc().get_last_local_change().unwrap();
    assert!(change.raw_bytes().len() > 9 * 1024 * 1024);
    assert!(change.raw_bytes().len() + FRAME_OVERHEAD < MAX_FRAME_BYTES);
    let ten: Vec<(RecordId, Envelope)> = (0..10)
        .map(|_| {
            (
                RecordId::random(&mut rng),
                envelope(&mut rng, ENVELOPE_BYTES),
            )
        })
        .collect();
    rogue
        .get_mut(&today())
        .unwrap()
        .insert_batch(&[], &ten)
        .unwrap();

    let pushed = run_pair(NOW, &setup("dev_r"), &mut rogue, &mut hub_store, admit).unwrap();
    assert!(pushed.completed(), "{:?}", pushed.events.last());
    let refused = |by: Side, role: Role| {
        pushed.events.iter().find_map(|(r, e)| match e {
            Event::PartitionRefused {
                by: b,
                partition,
                reason: RefuseReason::InvalidChange,
                detail,
            } if *b == by && *r == role && *partition == yesterday => Some(detail.clone()),
            _ => None,
        })
    };
    let detail = refused(Side::Local, Role::Responder)
        .unwrap_or_else(|| panic!("the hub did not refuse: {:?}", pushed.events));
    assert!(
        detail.contains("bytes in one change") && detail.contains(&MAX_CHANGE_BYTES.to_string()),
        "{detail}"
    );
    assert!(
        refused(Side::Peer, Role::Initiator).is_some(),
        "the device is told which partition was refused"
    );
    assert!(
        hub_store
            .get(&yesterday)
            .is_none_or(|p| p.record_count() == 0)
    );
    assert_eq!(hub_store.get(&today()).unwrap().record_count(), 110);

    // The honest device folds more visits and syncs as before.
    fold_bounded(&mut honest, 50, &mut rng);
    let later = run_pair(NOW, &setup("dev_a"), &mut honest, &mut hub_store, admit).unwrap();
    assert!(later.completed(), "{:?}", later.events.last());
    assert_eq!(hub_store.get(&today()).unwrap().record_count(), 160);
    assert!(honest.get(&today()).unwrap().heads().iter().all(|h| {
        hub_store
            .get(&today())
            .unwrap()
            .doc()
            .get_change_by_hash(h)
            .is_some()
    }));
}
