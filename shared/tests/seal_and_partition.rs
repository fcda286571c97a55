//! Sealing, day keys, paper entries and partition merging, exercised through the public API
//! the edge and the hub use.
//!
//! Run with `--nocapture` to see the measured envelope sizes and sealing cost.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use shared::daykey::{DayKeyRatchet, MAX_DAYS_AHEAD};
use shared::envelope::{Envelope, EnvelopeError, Record, RecordBody, SessionKey, WrappedKey};
use shared::paper::{PaperEntry, PaperError};
use shared::partition::{Partition, PartitionError, session_actor};
use shared::{Day, DeviceId, FacilityId, PartitionId, RecordId};
use std::collections::BTreeMap;
use std::time::Instant;

const DAY: Day = Day(20_000);

fn facility() -> FacilityId {
    FacilityId::parse("fac_0123456789abcdef").expect("valid facility id")
}

fn device(n: usize) -> DeviceId {
    DeviceId::parse(&format!("dev_{n:016x}")).expect("valid device id")
}

fn pid(day: Day) -> PartitionId {
    PartitionId {
        facility: facility(),
        day,
    }
}

fn qr_record(dev: usize, scanned_at: u64, token: [u8; 16]) -> Record {
    Record {
        facility: facility(),
        device: device(dev),
        scanned_at,
        body: RecordBody::Qr {
            issuer_id: 2,
            key_id: 1,
            issued_at: scanned_at.saturating_sub(20),
            token,
        },
    }
}

fn paper_entry() -> PaperEntry {
    PaperEntry {
        name: "Hong Gildong".into(),
        phone: "010-9876-5432".into(),
        safe_number: None,
        visited_at: DAY.start() + 3_600,
        consent_collect: true,
        consent_share: true,
        guardian_consent: false,
        remarks: "came with a group".into(),
    }
}

#[test]
fn seal_and_open_through_the_day_key() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let hub = DayKeyRatchet::generate(&mut rng, DAY.minus(28));
    let public = hub.public(DAY).expect("live day");
    let session = SessionKey::generate(&mut rng, DAY);
    let wrapped = session.wrap(&public).expect("wrap");
    assert_eq!((wrapped.session, wrapped.key_day), (session.id(), DAY));
    let wrapped = WrappedKey::from_bytes(&wrapped.to_bytes()).expect("wire round trip");

    let p = pid(DAY);
    let id = RecordId::random(&mut rng);
    let record = qr_record(1, DAY.start() + 40_000, [7; 16]);
    let envelope = session.seal(&mut rng, &p, id, &record).expect("seal");
    let envelope = Envelope::from_bytes(&envelope.to_bytes()).expect("wire round trip");
    assert_eq!(envelope.session(), session.id());

    // The hub side: unwrap with the day secret, then open.
    let secret = hub.secret(DAY).expect("live day");
    let key = wrapped.unwrap(&secret).expect("unwrap");
    assert_eq!(envelope.open(&key, &p, id).expect("open"), record);
}

#[test]
fn opening_elsewhere_fails() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let session = SessionKey::generate(&mut rng, DAY);
    let p = pid(DAY);
    let id = RecordId([1; 16]);
    let envelope = session
        .seal(&mut rng, &p, id, &qr_record(1, DAY.start(), [1; 16]))
        .expect("seal");
    assert_eq!(
        envelope.open(&session, &p, RecordId([2; 16])),
        Err(EnvelopeError::Open)
    );
    let other_facility = PartitionId {
        facility: FacilityId::parse("fac_other").expect("valid"),
        day: DAY,
    };
    assert_eq!(
        envelope.open(&session, &other_facility, id),
        Err(EnvelopeError::Open)
    );
    // Another day's partition: refused before even trying, as the key is for DAY.
    assert!(matches!(
        envelope.open(&session, &pid(DAY.plus(1)), id),
        Err(EnvelopeError::WrongDay { .. })
    ));
    // Another session's key.
    let other = SessionKey::generate(&mut rng, DAY);
    assert!(matches!(
        envelope.open(&other, &p, id),
        Err(EnvelopeError::WrongSession { .. })
    ));
    // A flipped ciphertext bit.
    let mut bytes = envelope.to_bytes();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let damaged = Envelope::from_bytes(&bytes).expect("framing still fine");
    assert_eq!(damaged.open(&session, &p, id), Err(EnvelopeError::Open));
}

#[test]
fn unwrap_with_another_days_secret_fails() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let hub = DayKeyRatchet::generate(&mut rng, DAY);
    let session = SessionKey::generate(&mut rng, DAY);
    let wrapped = session.wrap(&hub.public(DAY).expect("live")).expect("wrap");
    let next = hub.secret(DAY.plus(1)).expect("live");
    assert!(matches!(
        wrapped.unwrap(&next),
        Err(EnvelopeError::WrongDaySecret { .. })
    ));
    // Even when the label is changed to match, age refuses the wrong identity.
    let relabelled = WrappedKey {
        key_day: DAY.plus(1),
        ..wrapped
    };
    assert!(matches!(
        relabelled.unwrap(&next),
        Err(EnvelopeError::Unwrap { .. })
    ));
}

#[test]
fn fallback_to_another_days_key_is_recorded() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let hub = DayKeyRatchet::generate(&mut rng, DAY);
    let session = SessionKey::generate(&mut rng, DAY.plus(5));
    let wrapped = session
        .wrap(&hub.public(DAY.plus(3)).expect("live"))
        .expect("wrap");
    assert_eq!(wrapped.key_day, DAY.plus(3));
    let key = wrapped
        .unwrap(&hub.secret(DAY.plus(3)).expect("live"))
        .expect("unwrap");
    assert_eq!(key.day(), DAY.plus(5));
}

#[test]
fn advancing_destroys_the_day() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let mut hub = DayKeyRatchet::generate(&mut rng, DAY);
    let session = SessionKey::generate(&mut rng, DAY);
    let wrapped = session.wrap(&hub.public(DAY).expect("live")).expect("wrap");
    let stored_before = hub.to_bytes();

    hub.advance(DAY.plus(1));
    assert!(hub.secret(DAY).is_none());
    // No later day's secret opens it either.
    for d in 1..=40 {
        let secret = hub.secret(DAY.plus(d)).expect("live");
        let relabelled = WrappedKey {
            key_day: secret.day(),
            ..wrapped.clone()
        };
        assert!(relabelled.unwrap(&secret).is_err(), "day +{d} opened it");
    }
    // The stored state changed completely: the old seed is not in the new state.
    assert_ne!(hub.to_bytes()[4..], stored_before[4..]);
    // A ratchet restored from the old state still could: which is why the state is
    // overwritten in place.
    let old = DayKeyRatchet::from_bytes(stored_before.as_ref()).expect("valid");
    assert!(wrapped.unwrap(&old.secret(DAY).expect("live")).is_ok());
}

#[test]
fn ratchet_state_round_trips() {
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let mut hub = DayKeyRatchet::generate(&mut rng, DAY);
    hub.advance(DAY.plus(10));
    let restored = DayKeyRatchet::from_bytes(hub.to_bytes().as_ref()).expect("valid");
    assert_eq!(restored.oldest(), DAY.plus(10));
    assert_eq!(
        restored.publics(DAY, 60),
        hub.publics(DAY, 60),
        "same keys after a restore"
    );
    assert_eq!(restored.publics(DAY, 60).len(), 50);
    assert!(DayKeyRatchet::from_bytes(&[0; 35]).is_err());
    assert!(DayKeyRatchet::from_bytes(&[0; 37]).is_err());
    assert!(
        hub.public(DAY.plus(10 + MAX_DAYS_AHEAD + 1)).is_none(),
        "bounded look-ahead"
    );
}

#[test]
fn paper_entry_round_trip_and_double_seal() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let authority = age::x25519::Identity::generate();
    let entry = paper_entry();
    let sealed = entry
        .seal_for_authority(&authority.to_public().to_string())
        .expect("seal");
    assert_eq!(
        PaperEntry::open_as_authority(&sealed, &authority),
        Ok(entry.clone())
    );
    let stranger = age::x25519::Identity::generate();
    assert!(matches!(
        PaperEntry::open_as_authority(&sealed, &stranger),
        Err(PaperError::Open(_))
    ));

    // Outer seal: the hub opens the envelope and sees only that a paper entry exists.
    let hub = DayKeyRatchet::generate(&mut rng, DAY);
    let session = SessionKey::generate(&mut rng, DAY);
    let wrapped = session.wrap(&hub.public(DAY).expect("live")).expect("wrap");
    let record = Record {
        facility: facility(),
        device: device(1),
        scanned_at: entry.visited_at,
        body: RecordBody::Paper {
            sealed_for_authority: sealed.clone(),
        },
    };
    let id = RecordId::random(&mut rng);
    let envelope = session
        .seal(&mut rng, &pid(DAY), id, &record)
        .expect("seal");
    println!(
        "paper entry: sealed for authority {} B, envelope {} B",
        sealed.len(),
        envelope.len()
    );
    let key = wrapped
        .unwrap(&hub.secret(DAY).expect("live"))
        .expect("unwrap");
    let opened = envelope.open(&key, &pid(DAY), id).expect("open");
    let text = format!("{opened:?}");
    assert!(!text.contains("Gildong") && !text.contains("9876"));
    let RecordBody::Paper {
        sealed_for_authority,
    } = opened.body
    else {
        panic!("expected a paper record, got {opened:?}");
    };
    assert_eq!(
        PaperEntry::open_as_authority(&sealed_for_authority, &authority),
        Ok(entry)
    );
}

#[test]
fn paper_validation_refuses() {
    let authority = age::x25519::Identity::generate().to_public().to_string();
    type Spoil = fn(&mut PaperEntry);
    let cases: Vec<(&str, Spoil)> = vec![
        ("no collect consent", |e| e.consent_collect = false),
        ("no share consent", |e| e.consent_share = false),
        ("empty name", |e| e.name.clear()),
        ("blank name", |e| e.name = "   ".into()),
        ("long name", |e| e.name = "가".repeat(101)),
        ("control in name", |e| e.name = "a\u{0}b".into()),
        ("short phone", |e| e.phone = "123".into()),
        ("long phone", |e| e.phone = "1".repeat(21)),
        ("letters in phone", |e| e.phone = "010-CALL-ME".into()),
        ("phone without digits", |e| e.phone = "+-- -".into()),
        ("long remarks", |e| e.remarks = "x".repeat(501)),
        ("escape in remarks", |e| e.remarks = "\u{1b}[2J".into()),
    ];
    for (what, change) in cases {
        let mut e = paper_entry();
        change(&mut e);
        let err = e.validate().expect_err(what);
        // Messages never repeat the name or phone.
        let msg = err.to_string();
        assert!(
            !msg.contains("Gildong") && !msg.contains("9876"),
            "{what}: {msg}"
        );
        assert_eq!(e.seal_for_authority(&authority), Err(err), "{what}");
    }
    assert!(matches!(
        paper_entry().seal_for_authority("age1notakey"),
        Err(PaperError::BadAuthorityKey(_))
    ));
    assert!(matches!(
        PaperEntry::open_as_authority(&[0; 5000], &age::x25519::Identity::generate()),
        Err(PaperError::TooLarge { .. })
    ));
}

#[test]
fn concurrent_devices_merge_both_ways() {
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let p = pid(DAY);
    let mut a = Partition::new(p.clone(), &session_actor(&device(1), &mut rng));
    let mut b = Partition::new(p.clone(), &session_actor(&device(2), &mut rng));
    let ka = SessionKey::generate(&mut rng, DAY);
    let kb = SessionKey::generate(&mut rng, DAY);
    let hub = DayKeyRatchet::generate(&mut rng, DAY);
    let public = hub.public(DAY).expect("live");
    a.insert_wrapped_key(&ka.wrap(&public).expect("wrap"))
        .expect("insert");
    b.insert_wrapped_key(&kb.wrap(&public).expect("wrap"))
        .expect("insert");
    for i in 0..20u8 {
        let (part, key, dev) = if i.is_multiple_of(2) {
            (&mut a, &ka, 1)
        } else {
            (&mut b, &kb, 2)
        };
        let id = RecordId::random(&mut rng);
        let env = key
            .seal(
                &mut rng,
                &p,
                id,
                &qr_record(dev, DAY.start() + u64::from(i), [i; 16]),
            )
            .expect("seal");
        part.insert_record(id, &env).expect("insert");
    }
    let a_before = a.save();
    a.merge(&b).expect("merge b into a");
    b.merge(&Partition::load(p.clone(), &a_before, &[9; 16]).expect("load"))
        .expect("merge a into b");
    assert_eq!(a.record_count(), 20);
    assert_eq!(b.record_count(), 20);
    assert_eq!(sorted(a.heads()), sorted(b.heads()));
    assert_eq!(a.wrapped_keys(), b.wrapped_keys());
    assert_eq!(a.wrapped_keys().len(), 2);

    // The hub opens every record from the merged partition.
    let secret = hub.secret(DAY).expect("live");
    let keys: BTreeMap<_, _> = a
        .wrapped_keys()
        .iter()
        .map(|w| (w.session, w.unwrap(&secret).expect("unwrap")))
        .collect();
    for (id, env) in a.records() {
        let env = env.expect("well formed");
        let key = &keys[&env.session()];
        env.open(key, &p, id).expect("open");
    }
}

#[test]
fn save_and_incremental_chunks_load_back() {
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let p = pid(DAY);
    let key = SessionKey::generate(&mut rng, DAY);
    let mut part = Partition::new(p.clone(), &[1; 16]);
    let mut stored = Vec::new();
    let mut sibling = Partition::new(p.clone(), &[2; 16]);
    for round in 0..5u8 {
        for i in 0..10u8 {
            let id = RecordId::random(&mut rng);
            let env = key
                .seal(
                    &mut rng,
                    &p,
                    id,
                    &qr_record(1, DAY.start(), [i ^ round; 16]),
                )
                .expect("seal");
            part.insert_record(id, &env).expect("insert");
        }
        if round == 2 {
            // Changes merged in from a peer are stored too.
            let id = RecordId::random(&mut rng);
            let k2 = SessionKey::generate(&mut rng, DAY);
            let env = k2
                .seal(&mut rng, &p, id, &qr_record(2, DAY.start(), [99; 16]))
                .expect("seal");
            sibling.insert_record(id, &env).expect("insert");
            part.merge(&sibling).expect("merge");
        }
        if round == 0 {
            stored.extend(part.save());
        } else {
            stored.extend(part.save_incremental());
        }
    }
    let loaded = Partition::load(p.clone(), &stored, &[3; 16]).expect("load");
    assert_eq!(loaded.record_count(), 51);
    assert_eq!(loaded.heads(), part.heads());
    assert_eq!(loaded.records(), part.records());

    // A loaded partition's incremental save starts from what was loaded.
    let mut loaded = loaded;
    assert!(loaded.save_incremental().is_empty());

    // A full save compacts: smaller than the incremental chunks.
    let full = part.save();
    println!(
        "51 records: chunks {} B, compacted {} B ({} B a record)",
        stored.len(),
        full.len(),
        full.len() / 51
    );
    let reloaded = Partition::load(p.clone(), &full, &[3; 16]).expect("load");
    assert_eq!(reloaded.records(), part.records());
}

#[test]
fn garbage_does_not_load() {
    let p = pid(DAY);
    for bytes in [
        &b"not an automerge document"[..],
        &[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 0, 0][..],
        &[0xff; 64][..],
    ] {
        assert!(matches!(
            Partition::load(p.clone(), bytes, &[1; 16]),
            Err(PartitionError::Load { .. })
        ));
    }
    // A valid save, truncated.
    let mut rng = ChaCha20Rng::seed_from_u64(10);
    let key = SessionKey::generate(&mut rng, DAY);
    let mut part = Partition::new(p.clone(), &[1; 16]);
    let id = RecordId::random(&mut rng);
    part.insert_record(
        id,
        &key.seal(&mut rng, &p, id, &qr_record(1, DAY.start(), [1; 16]))
            .expect("seal"),
    )
    .expect("insert");
    let saved = part.save();
    assert!(Partition::load(p.clone(), &saved[..saved.len() - 1], &[1; 16]).is_err());
    assert!(Partition::load(p, &saved[..saved.len() / 2], &[1; 16]).is_err());
}

#[test]
fn measure_envelope_size_and_seal_cost() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let p = pid(DAY);
    let key = SessionKey::generate(&mut rng, DAY);
    let n = 2_000u32;
    let records: Vec<_> = (0..n)
        .map(|i| {
            let mut token = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut rng, &mut token);
            (
                RecordId::random(&mut rng),
                qr_record(1, DAY.start() + u64::from(i) * 40, token),
            )
        })
        .collect();
    let started = Instant::now();
    let envelopes: Vec<_> = records
        .iter()
        .map(|(id, r)| key.seal(&mut rng, &p, *id, r).expect("seal"))
        .collect();
    let seal = started.elapsed() / n;
    let sizes: Vec<usize> = envelopes.iter().map(Envelope::len).collect();
    let max = sizes.iter().copied().max().unwrap_or(0);
    let min = sizes.iter().copied().min().unwrap_or(0);
    // Regression guard on the compact encoding, not a timing.
    assert!(max <= 102, "QR envelope grew to {max} bytes");

    let started = Instant::now();
    let mut part = Partition::new(p.clone(), &[1; 16]);
    for ((id, _), env) in records.iter().zip(&envelopes) {
        part.insert_record(*id, env).expect("insert");
    }
    let insert = started.elapsed() / n;
    let saved = part.save().len();

    let hub = DayKeyRatchet::generate(&mut rng, DAY);
    let started = Instant::now();
    let wrapped = key.wrap(&hub.public(DAY).expect("live")).expect("wrap");
    let wrap = started.elapsed();
    println!(
        "QR envelope {min}..={max} B; seal {seal:?}/record; partition insert {insert:?}/record; \
         saved partition {} B/record; wrapped key {} B (wrap incl. key derivation {wrap:?})",
        saved / n as usize,
        wrapped.to_bytes().len()
    );
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// One step of a merge schedule.
#[derive(Debug, Clone)]
enum Step {
    /// The device records a visit.
    Insert(usize),
    /// The first device merges everything the second has.
    Merge(usize, usize),
    /// The device stores its unsaved changes, restarts with a fresh actor, and reloads.
    Restart(usize),
}

fn step(devices: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..devices).prop_map(Step::Insert),
        3 => (0..devices, 0..devices).prop_map(|(a, b)| Step::Merge(a, b)),
        1 => (0..devices).prop_map(Step::Restart),
    ]
}

fn schedule() -> impl Strategy<Value = (usize, Vec<Step>, Vec<usize>)> {
    (2usize..=5).prop_flat_map(|n| {
        (
            Just(n),
            prop::collection::vec(step(n), 0..60),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
        )
    })
}

proptest! {
    // Integration tests have no lib.rs beside them, so name the regression file explicitly.
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/seal_and_partition.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    /// Whatever the interleaving of inserts, merges and restarts, once every device has merged
    /// every other, all hold exactly the union of the records, with equal heads.
    #[test]
    fn merges_converge((n, steps, final_order) in schedule(), seed in any::<u64>()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let p = pid(DAY);
        let key = SessionKey::generate(&mut rng, DAY);
        let mut parts: Vec<Partition> = (0..n)
            .map(|d| Partition::new(p.clone(), &session_actor(&device(d), &mut rng)))
            .collect();
        let mut stored: Vec<Vec<u8>> = vec![Vec::new(); n];
        let mut expected = BTreeMap::new();
        for s in steps {
            match s {
                Step::Insert(d) => {
                    let id = RecordId::random(&mut rng);
                    let env = key
                        .seal(&mut rng, &p, id, &qr_record(d, DAY.start(), [d as u8; 16]))
                        .expect("seal");
                    parts[d].insert_record(id, &env).expect("insert");
                    expected.insert(id, env);
                }
                Step::Merge(a, b) if a != b => {
                    let (x, y) = if a < b {
                        let (l, r) = parts.split_at_mut(b);
                        (&mut l[a], &r[0])
                    } else {
                        let (l, r) = parts.split_at_mut(a);
                        (&mut r[0], &l[b])
                    };
                    x.merge(y).expect("merge");
                }
                Step::Merge(_, _) => {}
                Step::Restart(d) => {
                    stored[d].extend(parts[d].save_incremental());
                    parts[d] = Partition::load(
                        p.clone(),
                        &stored[d],
                        &session_actor(&device(d), &mut rng),
                    )
                    .expect("reload");
                }
            }
        }
        // Gossip to everyone in a random order, twice round so late merges spread.
        for _ in 0..2 {
            for &a in &final_order {
                for b in 0..n {
                    if a != b {
                        let other = Partition::load(p.clone(), &parts[b].save(), &[0; 16])
                            .expect("load");
                        parts[a].merge(&other).expect("merge");
                    }
                }
            }
        }
        let heads = sorted(parts[0].heads());
        for part in &parts {
            prop_assert_eq!(sorted(part.heads()), heads.clone());
            let got: BTreeMap<_, _> = part
                .records()
                .into_iter()
                .map(|(id, e)| (id, e.expect("well formed")))
                .collect();
            prop_assert_eq!(&got, &expected);
        }
    }

    /// Arbitrary bytes never panic the loader.
    #[test]
    fn load_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Partition::load(pid(DAY), &bytes, &[1; 16]);
    }

    /// A valid document with bytes flipped either loads or errors, never panics.
    #[test]
    fn damaged_save_never_panics(flips in prop::collection::vec((any::<usize>(), 1u8..), 1..4)) {
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        let p = pid(DAY);
        let key = SessionKey::generate(&mut rng, DAY);
        let mut part = Partition::new(p.clone(), &[1; 16]);
        for i in 0..3u8 {
            let id = RecordId::random(&mut rng);
            let env = key.seal(&mut rng, &p, id, &qr_record(1, DAY.start(), [i; 16])).expect("seal");
            part.insert_record(id, &env).expect("insert");
        }
        let mut bytes = part.save();
        bytes.extend(part.save_incremental());
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
        if let Ok(loaded) = Partition::load(p, &bytes, &[1; 16]) {
            let _ = loaded.records();
        }
    }

    /// Any record round-trips through seal and open, and arbitrary bytes never panic the
    /// envelope parser.
    #[test]
    fn seal_open_round_trip(
        scanned_at in any::<u64>(),
        issued_at in any::<u64>(),
        issuer_id in any::<u16>(),
        key_id in any::<u8>(),
        token in any::<[u8; 16]>(),
        paper in prop::option::of(prop::collection::vec(any::<u8>(), 0..3000)),
        junk in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let p = pid(DAY);
        let key = SessionKey::generate(&mut rng, DAY);
        let body = match paper {
            Some(sealed_for_authority) => RecordBody::Paper { sealed_for_authority },
            None => RecordBody::Qr { issuer_id, key_id, issued_at, token },
        };
        let record = Record { facility: facility(), device: device(3), scanned_at, body };
        let id = RecordId::random(&mut rng);
        let env = key.seal(&mut rng, &p, id, &record).expect("seal");
        let back = Envelope::from_bytes(&env.to_bytes()).expect("parse");
        prop_assert_eq!(back.open(&key, &p, id).expect("open"), record);
        if let Ok(e) = Envelope::from_bytes(&junk) {
            prop_assert!(e.open(&key, &p, id).is_err());
        }
        let _ = WrappedKey::from_bytes(&junk);
    }
}
