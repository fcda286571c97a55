//! Validated changes through whole sessions: a peer whose partition holds a delete, an
//! overwrite, a nested object or a value of the wrong shape is refused with `InvalidChange`,
//! both ends see why, and the receiver's partition is untouched; hand-made hostile messages
//! (compressed chunks, an inflation bomb, absurd counts) are refused before automerge reads
//! them; honest syncs, including a device that re-folds the same entries after a crash, pass.
//! A bounded smoke test feeds random and mutated messages to the validator.

use automerge::sync::{Message, MessageVersion};
use automerge::transaction::Transactable;
use automerge::{ObjType, ROOT, ReadDoc, ScalarValue};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use shared::daykey::DayKeyRatchet;
use shared::envelope::{Record, RecordBody, SessionKey, WrappedKey};
use shared::partition::Partition;
use shared::sync::harness::{MemoryStore, PairOutcome, PairSetup, run_pair};
use shared::sync::validate::{ChangeError, fuzz_sync_change, read_message};
use shared::sync::{Decision, Event, Frame, Peer, PeerHello, RefuseReason, Role, Session, Side};
use shared::{Day, DeviceId, FacilityId, PartitionId, RecordId, UnixSeconds};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// Noon of day 20,000.
const NOW: UnixSeconds = 20_000 * 86_400 + 12 * 3_600;

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

fn admit_claimed(hello: &PeerHello) -> Decision {
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

fn setup(from: &str, to: Peer) -> PairSetup {
    PairSetup {
        initiator: device(from),
        responder: to,
        credential: None,
        push_only: false,
    }
}

/// Folds a wrapped key and `n` sealed records of `device` into today's partition of `store`,
/// as a device does at a sync: one change.
fn fold(store: &mut MemoryStore, device: &str, n: usize, rng: &mut ChaCha8Rng) -> WrappedKey {
    let id = today();
    let key = SessionKey::generate(rng, id.day);
    let ratchet = DayKeyRatchet::generate(rng, id.day);
    let wrapped = key.wrap(&ratchet.public(id.day).unwrap()).unwrap();
    let mut batch = Vec::new();
    for i in 0..n {
        let record_id = RecordId::random(rng);
        let mut token = [0u8; 16];
        rng.fill_bytes(&mut token);
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
        batch.push((record_id, key.seal(rng, &id, record_id, &record).unwrap()));
    }
    let partition = store.get_or_create(&id);
    partition
        .insert_batch(std::slice::from_ref(&wrapped), &batch)
        .unwrap();
    wrapped
}

/// The refuser refused today's partition with `InvalidChange` and the peer heard it; the
/// session itself went on (one bad partition does not stop the others).
fn refused_with_invalid_change(outcome: &PairOutcome, refuser: Role) -> String {
    let other = match refuser {
        Role::Initiator => Role::Responder,
        Role::Responder => Role::Initiator,
    };
    let local = outcome.events.iter().find_map(|(r, e)| match e {
        Event::PartitionRefused {
            by: Side::Local,
            reason: RefuseReason::InvalidChange,
            partition,
            detail,
        } if *r == refuser && *partition == today() => Some(detail.clone()),
        _ => None,
    });
    // The peer hears the refusal, unless it refused the same partition itself first.
    let seen_by_peer = outcome.events.iter().any(|(r, e)| {
        *r == other
            && matches!(
                e,
                Event::PartitionRefused {
                    reason: RefuseReason::InvalidChange,
                    ..
                }
            )
    });
    assert!(
        seen_by_peer,
        "the peer did not see the refusal: {:?}",
        outcome.events
    );
    local.unwrap_or_else(|| panic!("no InvalidChange refusal: {:?}", outcome.events))
}

/// What a partition holds, to compare before and after.
fn snapshot(store: &mut MemoryStore) -> Option<Vec<u8>> {
    store.get_mut(&today()).map(|p| p.save())
}

fn record_keys(p: &Partition) -> Vec<String> {
    p.records()
        .into_iter()
        .map(|(id, _)| format!("r/{id}"))
        .collect()
}

#[test]
fn a_relaying_sibling_that_deletes_records_is_refused_and_the_hub_keeps_them() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut a = MemoryStore::new(b"device-a", Some(facility()));
    let mut b = MemoryStore::new(b"device-b", Some(facility()));
    let mut hub_store = MemoryStore::new(b"hub", None);
    fold(&mut a, "dev_a", 5, &mut rng);
    // A reaches the hub once, and hands its records to its sibling B.
    let first = run_pair(
        NOW,
        &setup("dev_a", hub()),
        &mut a,
        &mut hub_store,
        admit_claimed,
    );
    assert!(first.unwrap().completed());
    let handed = run_pair(
        NOW,
        &setup("dev_a", device("dev_b")),
        &mut a,
        &mut b,
        admit_claimed,
    );
    assert!(handed.unwrap().completed());
    let before = snapshot(&mut hub_store);

    // B deletes three of the records it was handed, and relays.
    let part = b.get_mut(&today()).unwrap();
    let victims: Vec<String> = record_keys(part).into_iter().take(3).collect();
    part.doc_mut()
        .transact(|tx| {
            for k in &victims {
                tx.delete(ROOT, k.as_str())?;
            }
            Ok::<_, automerge::AutomergeError>(())
        })
        .unwrap();
    let outcome = run_pair(
        NOW,
        &setup("dev_b", hub()),
        &mut b,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    let detail = refused_with_invalid_change(&outcome, Role::Responder);
    assert!(detail.contains("deletes a key"), "{detail}");
    assert_eq!(snapshot(&mut hub_store), before);
    let at_hub = record_keys(hub_store.get(&today()).unwrap());
    assert!(victims.iter().all(|k| at_hub.contains(k)));
    assert_eq!(at_hub.len(), 5);
}

#[test]
fn hostile_partitions_are_refused_by_the_hub_with_the_rule_they_break() {
    type Edit = Box<dyn Fn(&mut automerge::transaction::Transaction<'_>, &str, &str)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "overwrite of a k/ key",
            Box::new(|tx, _, k| tx.put(ROOT, k, vec![1u8; 40]).unwrap()),
            "predecessor",
        ),
        (
            "overwrite of an r/ key",
            Box::new(|tx, r, _| tx.put(ROOT, r, vec![1u8; 80]).unwrap()),
            "predecessor",
        ),
        (
            "nested map",
            Box::new(|tx, _, _| {
                tx.put_object(ROOT, format!("r/{}", "ab".repeat(16)), ObjType::Map)
                    .unwrap();
            }),
            "creates a nested map",
        ),
        (
            "text object",
            Box::new(|tx, _, _| {
                tx.put_object(ROOT, format!("r/{}", "ab".repeat(16)), ObjType::Text)
                    .unwrap();
            }),
            "creates a text object",
        ),
        (
            "counter",
            Box::new(|tx, _, _| {
                tx.put(
                    ROOT,
                    format!("r/{}", "ab".repeat(16)),
                    ScalarValue::counter(1),
                )
                .unwrap()
            }),
            "puts a counter",
        ),
        (
            "oversize value",
            Box::new(|tx, _, _| {
                let mut v = vec![0u8; shared::envelope::MAX_ENVELOPE_BYTES + 1];
                v[0] = shared::envelope::ENVELOPE_VERSION;
                tx.put(ROOT, format!("r/{}", "ab".repeat(16)), v).unwrap()
            }),
            "over the limit",
        ),
    ];
    for (name, edit, expected) in cases {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut a = MemoryStore::new(b"device-a", Some(facility()));
        let mut hub_store = MemoryStore::new(b"hub", None);
        let wrapped = fold(&mut a, "dev_a", 3, &mut rng);
        let first = run_pair(
            NOW,
            &setup("dev_a", hub()),
            &mut a,
            &mut hub_store,
            admit_claimed,
        );
        assert!(first.unwrap().completed(), "{name}");
        let before = snapshot(&mut hub_store);

        let part = a.get_mut(&today()).unwrap();
        let record = record_keys(part).remove(0);
        let key = format!("k/{}", wrapped.session);
        let mut tx = part.doc_mut().transaction();
        edit(&mut tx, &record, &key);
        tx.commit();
        let outcome = run_pair(
            NOW,
            &setup("dev_a", hub()),
            &mut a,
            &mut hub_store,
            admit_claimed,
        )
        .unwrap();
        let detail = refused_with_invalid_change(&outcome, Role::Responder);
        assert!(detail.contains(expected), "{name}: {detail}");
        assert_eq!(snapshot(&mut hub_store), before, "{name}");
    }
}

#[test]
fn a_concurrent_put_over_a_held_wrapped_key_is_refused() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut a = MemoryStore::new(b"device-a", Some(facility()));
    let mut b = MemoryStore::new(b"device-b", Some(facility()));
    let mut hub_store = MemoryStore::new(b"hub", None);
    let wrapped = fold(&mut a, "dev_a", 2, &mut rng);
    let first = run_pair(
        NOW,
        &setup("dev_a", hub()),
        &mut a,
        &mut hub_store,
        admit_claimed,
    );
    assert!(first.unwrap().completed());
    let before = snapshot(&mut hub_store);
    // B never saw A's key and puts other bytes under it: no predecessor, but automerge would
    // let the higher actor's value win and A's session would become unreadable.
    let mut forged = wrapped.clone();
    forged.age = vec![7; forged.age.len()];
    b.get_or_create(&today())
        .insert_wrapped_key(&forged)
        .unwrap();
    let outcome = run_pair(
        NOW,
        &setup("dev_b", hub()),
        &mut b,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    // Whichever side first reads the other's value under the key refuses it: usually the hub
    // B's forged put, in about one run in a hundred B the hub's copy of A's (the wrapped keys
    // are sealed with age's random ephemeral keys, so the change hashes, and with them the
    // sync rounds automerge's bloom filters lead to, differ from run to run). Either way
    // nothing of B's reaches the hub.
    let hub_refused = outcome.events.iter().any(|(r, e)| {
        *r == Role::Responder
            && matches!(
                e,
                Event::PartitionRefused {
                    by: Side::Local,
                    reason: RefuseReason::InvalidChange,
                    ..
                }
            )
    });
    let refuser = if hub_refused {
        Role::Responder
    } else {
        Role::Initiator
    };
    let detail = refused_with_invalid_change(&outcome, refuser);
    assert!(detail.contains("overwrites a key"), "{detail}");
    assert_eq!(snapshot(&mut hub_store), before);
}

#[test]
fn a_device_refolding_the_same_entries_after_a_crash_still_syncs() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut a = MemoryStore::new(b"device-a", Some(facility()));
    let mut hub_store = MemoryStore::new(b"hub", None);
    fold(&mut a, "dev_a", 4, &mut rng);
    let saved_entries: Vec<(String, Vec<u8>)> = {
        let p = a.get(&today()).unwrap();
        let doc = p.doc();
        doc.keys(ROOT)
            .map(|k| {
                let (v, _) = automerge::ReadDoc::get(doc, ROOT, k.as_str())
                    .unwrap()
                    .unwrap();
                (k, v.as_bytes().unwrap().to_vec())
            })
            .collect()
    };
    let first = run_pair(
        NOW,
        &setup("dev_a", hub()),
        &mut a,
        &mut hub_store,
        admit_claimed,
    );
    assert!(first.unwrap().completed());
    // The device lost its partition before storing it, restarts with a new actor, and folds
    // the same pending rows again: the same keys and bytes in a change the hub does not have.
    let mut restarted = MemoryStore::new(b"device-a-2", Some(facility()));
    let part = restarted.get_or_create(&today());
    part.doc_mut()
        .transact(|tx| {
            for (k, v) in &saved_entries {
                tx.put(ROOT, k.as_str(), v.clone())?;
            }
            Ok::<_, automerge::AutomergeError>(())
        })
        .unwrap();
    let again = run_pair(
        NOW,
        &setup("dev_a", hub()),
        &mut restarted,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    assert!(again.completed(), "{:?}", again.events);
    assert_eq!(hub_store.get(&today()).unwrap().record_count(), 4);
}

/// A hub session admitted for a device of fac_a, driven by hand.
fn admitted_hub_session(store: &mut MemoryStore) -> Session {
    shared::sync::harness::admitted_responder(hub(), device("dev_a"), NOW, store).unwrap()
}

fn message(chunks: Vec<Vec<u8>>) -> Vec<u8> {
    Message {
        heads: vec![],
        need: vec![],
        have: vec![],
        changes: chunks.into(),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode()
}

fn leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Sends `bytes` as a Sync frame to an admitted hub; returns the refusal's detail, after
/// checking both the event and the Refused frame, and that nothing was stored.
fn hub_refuses(bytes: Vec<u8>) -> String {
    let mut hub_store = MemoryStore::new(b"hub", None);
    let mut session = admitted_hub_session(&mut hub_store);
    let started = Instant::now();
    session.handle_frame(
        NOW,
        Frame::Sync {
            partition: today(),
            message: bytes,
        },
        &mut hub_store,
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        !session.is_finished(),
        "the partition is refused, not the session"
    );
    let frames: Vec<Frame> = std::iter::from_fn(|| session.poll_transmit()).collect();
    assert!(
        matches!(
            frames.as_slice(),
            [Frame::Skipped { partition, refusal }, Frame::Done { .. }]
                if refusal.reason == RefuseReason::InvalidChange && *partition == today()
        ),
        "{frames:?}"
    );
    assert_eq!(hub_store.partitions().count(), 0, "nothing is created");
    std::iter::from_fn(|| session.poll_event())
        .find_map(|e| match e {
            Event::PartitionRefused {
                by: Side::Local,
                reason: RefuseReason::InvalidChange,
                detail,
                ..
            } => Some(detail),
            _ => None,
        })
        .expect("an InvalidChange refusal")
}

#[test]
fn compressed_chunks_bombs_and_absurd_counts_are_refused_before_automerge() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut a = MemoryStore::new(b"device-a", Some(facility()));
    fold(&mut a, "dev_a", 10, &mut rng);
    let part = a.get_mut(&today()).unwrap();
    let head = part.heads()[0];
    let mut change = part.doc().get_change_by_hash(&head).unwrap().clone();
    let compressed = change.bytes().to_vec();
    let detail = hub_refuses(message(vec![compressed]));
    assert!(detail.contains("compressed change chunk"), "{detail}");
    let detail = hub_refuses(message(vec![part.save()]));
    assert!(detail.contains("whole-document chunk"), "{detail}");

    // ~1 MB of DEFLATE that would inflate to about a gigabyte: a dynamic-Huffman block whose
    // code for "repeat 258 bytes at distance 1" is two bits (see the unit test of `validate`
    // for the block layout; here a run of zero bits after a valid header is enough to be
    // refused on the chunk type alone).
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    let body = vec![0u8; 1 << 20];
    leb(&mut chunk, body.len() as u64);
    chunk.extend_from_slice(&body);
    let detail = hub_refuses(message(vec![chunk]));
    assert!(detail.contains("compressed change chunk"), "{detail}");

    // A count of heads no frame could hold.
    let mut absurd = vec![0x42];
    leb(&mut absurd, 1 << 40);
    let detail = hub_refuses(absurd);
    assert!(detail.contains("over the limit"), "{detail}");
}

/// Random bytes and mutations of honest messages never panic the validator, and every
/// message it accepts is one automerge decodes and applies as checked (the fuzz driver of
/// `fuzz/fuzz_targets/sync_change.rs`).
#[test]
fn random_and_mutated_messages_never_panic_the_validator() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut a = MemoryStore::new(b"device-a", Some(facility()));
    let mut hub_store = MemoryStore::new(b"hub", None);
    fold(&mut a, "dev_a", 3, &mut rng);
    let outcome = run_pair(
        NOW,
        &setup("dev_a", hub()),
        &mut a,
        &mut hub_store,
        admit_claimed,
    )
    .unwrap();
    let corpus: Vec<Vec<u8>> = outcome
        .frames
        .iter()
        .filter_map(|(_, f)| match f {
            Frame::Sync { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect();
    assert!(
        corpus
            .iter()
            .any(|m| read_message(m).unwrap().put_count() == 4)
    );
    let started = Instant::now();
    let mut accepted = 0;
    for i in 0..20_000u32 {
        let mut m = if i % 4 == 0 {
            let mut v = vec![0u8; (rng.next_u32() % 300) as usize];
            rng.fill_bytes(&mut v);
            v
        } else {
            corpus[(rng.next_u32() as usize) % corpus.len()].clone()
        };
        for _ in 0..=(rng.next_u32() % 3) {
            if m.is_empty() {
                break;
            }
            let at = (rng.next_u32() as usize) % m.len();
            match rng.next_u32() % 4 {
                0 => m[at] ^= 1 << (rng.next_u32() % 8),
                1 => m[at] = rng.next_u32() as u8,
                2 => m.truncate(at),
                _ => m.insert(at, rng.next_u32() as u8),
            }
        }
        if catch_unwind(AssertUnwindSafe(|| fuzz_sync_change(&m))).is_err() {
            panic!("input {i} failed the fuzz driver: {m:?}");
        }
        let result = catch_unwind(AssertUnwindSafe(|| read_message(&m).map(|c| c.put_count())));
        match result {
            Err(_) => panic!("input {i} panicked: {m:?}"),
            Ok(Ok(_)) => {
                accepted += 1;
                assert!(
                    Message::decode(&m).is_ok(),
                    "accepted but undecodable: {m:?}"
                );
            }
            Ok(Err(ChangeError::Malformed { .. } | ChangeError::TooMany { .. })) => {}
            Ok(Err(_)) => {}
        }
    }
    assert!(accepted > 0);
    assert!(started.elapsed() < Duration::from_secs(30));
}
