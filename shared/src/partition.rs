//! The partitioned visit log: one automerge document per facility per UTC day.
//!
//! Every device of a facility writes into the same partition and automerge merges them. The
//! document is a flat map at its root:
//!
//! ```text
//! "r/<32 hex record id>"  -> bytes: an Envelope (see `envelope`)
//! "k/<32 hex session id>" -> bytes: a WrappedKey
//! ```
//!
//! The keys live directly in the root map on purpose. A nested `records` map would be an
//! object that two devices could each create concurrently; automerge would then keep one of
//! the two objects and hide every record written into the other.
//!
//! A partition only grows: entries are never changed or deleted (automerge keeps deleted
//! values in its history anyway), and the whole document is dropped when it expires.
//!
//! **Actors.** automerge requires that an actor never reuse a sequence number. A device that
//! crashes may lose changes it had committed in memory but not yet stored, and would then reuse
//! their sequence numbers with different content, which breaks sync with every peer that saw
//! the lost changes. So an actor is the device's stable 8-byte tag followed by 8 random bytes
//! drawn at every start ([`session_actor`]): a new run never continues an old run's sequence.
//! The cost is one more entry in each document's actor table per run, not per change.

use crate::envelope::{Envelope, EnvelopeError, SessionId, WrappedKey};
use crate::ids::{DeviceId, PartitionId, RecordId};
use automerge::transaction::Transactable;
use automerge::{
    ActorId, Automerge, AutomergeError, ChangeHash, ROOT, ReadDoc, SaveOptions, ScalarValue,
};
use rand_core::RngCore;
use std::borrow::Cow;

/// Root-map key prefix of record envelopes.
pub const RECORD_PREFIX: &str = "r/";
/// Root-map key prefix of wrapped session keys.
pub const WRAPPED_KEY_PREFIX: &str = "k/";

/// Domain separation for the device part of an actor id.
const ACTOR_CONTEXT: &str = "kipass automerge actor v1";

/// A partition operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Stored bytes did not load as an automerge document.
    #[error(
        "partition {partition} could not be loaded: {source}; the stored bytes are damaged: \
         drop them and fetch the partition again from a sibling device or the hub"
    )]
    Load {
        /// The partition being loaded.
        partition: PartitionId,
        /// What automerge said.
        #[source]
        source: Box<AutomergeError>,
    },
    /// A record id already holds another envelope.
    #[error(
        "record {record} of partition {partition} already holds a different envelope: a \
         record id must be fresh for every record; draw a new one"
    )]
    RecordConflict {
        /// The partition.
        partition: PartitionId,
        /// The record id.
        record: RecordId,
    },
    /// One batch named the same key twice.
    #[error("a batch for partition {partition} names {key} twice: nothing was written")]
    DuplicateInBatch {
        /// The partition.
        partition: PartitionId,
        /// The repeated key.
        key: String,
    },
    /// A session id already holds another wrapped key.
    #[error(
        "session {session} of partition {partition} already has a different wrapped key: a \
         session id must be fresh for every session key"
    )]
    WrappedKeyConflict {
        /// The partition.
        partition: PartitionId,
        /// The session id.
        session: SessionId,
    },
    /// Two different partitions cannot be merged.
    #[error("cannot merge partition {other} into partition {this}: they are different partitions")]
    WrongPartition {
        /// The partition merged into.
        this: PartitionId,
        /// The partition offered.
        other: PartitionId,
    },
    /// automerge refused an operation on a loaded document.
    #[error("automerge refused an operation on partition {partition}: {source}")]
    Automerge {
        /// The partition.
        partition: PartitionId,
        /// What automerge said.
        #[source]
        source: Box<AutomergeError>,
    },
}

/// The actor id for this run of `device`: 8 bytes that name the device (a hash of its id)
/// followed by 8 random bytes drawn fresh at every start. See the module docs for why.
pub fn session_actor(device: &DeviceId, rng: &mut impl RngCore) -> [u8; 16] {
    let mut actor = [0u8; 16];
    let tag = blake3::derive_key(ACTOR_CONTEXT, device.as_str().as_bytes());
    actor[..8].copy_from_slice(&tag[..8]);
    rng.fill_bytes(&mut actor[8..]);
    actor
}

/// One facility's visit log of one UTC day.
pub struct Partition {
    id: PartitionId,
    doc: Automerge,
    /// Heads at the last save, save_incremental or load: what storage already holds.
    saved_heads: Vec<ChangeHash>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("id", &self.id)
            .field("heads", &self.doc.get_heads())
            .finish_non_exhaustive()
    }
}

impl Partition {
    /// An empty partition written by `actor` (see [`session_actor`]; it must not be shared by
    /// two running writers).
    pub fn new(id: PartitionId, actor: &[u8]) -> Self {
        Partition {
            id,
            doc: Automerge::new().with_actor(ActorId::from(actor)),
            saved_heads: Vec::new(),
        }
    }

    /// Loads a partition from the concatenation of chunks written by [`Self::save`] and
    /// [`Self::save_incremental`], in the order written. Malformed or truncated bytes are an
    /// error. Empty bytes give an empty partition.
    pub fn load(id: PartitionId, bytes: &[u8], actor: &[u8]) -> Result<Self, PartitionError> {
        let doc = Automerge::load(bytes).map_err(|source| PartitionError::Load {
            partition: id.clone(),
            source: Box::new(source),
        })?;
        let saved_heads = doc.get_heads();
        Ok(Partition {
            id,
            doc: doc.with_actor(ActorId::from(actor)),
            saved_heads,
        })
    }

    /// Which partition this is.
    pub fn id(&self) -> &PartitionId {
        &self.id
    }

    /// Adds a sealed record. Adding the same envelope under the same id again does nothing;
    /// a different envelope under an existing id is refused.
    pub fn insert_record(
        &mut self,
        id: RecordId,
        envelope: &Envelope,
    ) -> Result<(), PartitionError> {
        let bytes = envelope.to_bytes();
        match self.put_once(format!("{RECORD_PREFIX}{id}"), bytes)? {
            PutOutcome::Written | PutOutcome::AlreadyThere => Ok(()),
            PutOutcome::Conflict => Err(PartitionError::RecordConflict {
                partition: self.id.clone(),
                record: id,
            }),
        }
    }

    /// Adds a wrapped session key, with the same rules as [`Self::insert_record`].
    pub fn insert_wrapped_key(&mut self, key: &WrappedKey) -> Result<(), PartitionError> {
        match self.put_once(
            format!("{WRAPPED_KEY_PREFIX}{}", key.session),
            key.to_bytes(),
        )? {
            PutOutcome::Written | PutOutcome::AlreadyThere => Ok(()),
            PutOutcome::Conflict => Err(PartitionError::WrappedKeyConflict {
                partition: self.id.clone(),
                session: key.session,
            }),
        }
    }

    /// Adds wrapped keys and sealed records as **one** automerge change: how a device folds
    /// the check-ins it made durable since the last sync into its partition. One change per
    /// batch instead of one per record saves automerge's per-change overhead (~145 B: chunk
    /// header, checksum, dependency hash, actor, sequence, time) on every record sent.
    ///
    /// Entries already present with the same bytes are skipped (folding again after a crash
    /// is harmless); a different value under an existing key refuses the whole batch and
    /// writes nothing. Returns how many records were new.
    pub fn insert_batch(
        &mut self,
        keys: &[WrappedKey],
        records: &[(RecordId, Envelope)],
    ) -> Result<usize, PartitionError> {
        let mut puts: Vec<(String, Vec<u8>)> = Vec::with_capacity(keys.len() + records.len());
        let mut new_records = 0;
        for key in keys {
            let k = format!("{WRAPPED_KEY_PREFIX}{}", key.session);
            let bytes = key.to_bytes();
            match self.existing(&k, &bytes)? {
                Some(PutOutcome::AlreadyThere) => {}
                Some(_) => {
                    return Err(PartitionError::WrappedKeyConflict {
                        partition: self.id.clone(),
                        session: key.session,
                    });
                }
                None => puts.push((k, bytes)),
            }
        }
        for (id, envelope) in records {
            let k = format!("{RECORD_PREFIX}{id}");
            let bytes = envelope.to_bytes();
            match self.existing(&k, &bytes)? {
                Some(PutOutcome::AlreadyThere) => {}
                Some(_) => {
                    return Err(PartitionError::RecordConflict {
                        partition: self.id.clone(),
                        record: *id,
                    });
                }
                None => {
                    puts.push((k, bytes));
                    new_records += 1;
                }
            }
        }
        // Two entries of the batch under one key (a caller's bug) would make the second
        // overwrite the first inside one change: refuse instead.
        let mut seen = std::collections::BTreeSet::new();
        for (k, _) in &puts {
            if !seen.insert(k.as_str()) {
                return Err(PartitionError::DuplicateInBatch {
                    partition: self.id.clone(),
                    key: k.clone(),
                });
            }
        }
        if puts.is_empty() {
            return Ok(0);
        }
        self.doc
            .transact(|tx| {
                for (k, bytes) in &puts {
                    tx.put(ROOT, k.as_str(), ScalarValue::Bytes(bytes.clone()))?;
                }
                Ok::<_, AutomergeError>(())
            })
            .map_err(|failure| PartitionError::Automerge {
                partition: self.id.clone(),
                source: Box::new(failure.error),
            })?;
        Ok(new_records)
    }

    /// What is stored under `key`: `None` if nothing, else whether it equals `bytes`.
    fn existing(&self, key: &str, bytes: &[u8]) -> Result<Option<PutOutcome>, PartitionError> {
        let existing = self
            .doc
            .get(ROOT, key)
            .map_err(|source| PartitionError::Automerge {
                partition: self.id.clone(),
                source: Box::new(source),
            })?;
        Ok(existing.map(|(value, _)| {
            if value.as_bytes() == Some(bytes) {
                PutOutcome::AlreadyThere
            } else {
                PutOutcome::Conflict
            }
        }))
    }

    /// Every record, in record-id order. An entry whose value does not parse as an envelope
    /// is returned as an error so the hub can count and report it; a key under `r/` that is
    /// not a valid record id cannot be named and is skipped (only a faulty or hostile writer
    /// makes either). If two writers put different envelopes under one record id concurrently,
    /// automerge's deterministic winner is returned.
    pub fn records(&self) -> Vec<(RecordId, Result<Envelope, EnvelopeError>)> {
        self.entries(RECORD_PREFIX)
            .filter_map(|(suffix, value)| {
                let id = RecordId::parse_hex(&suffix)?;
                let envelope = match value {
                    Some(bytes) => Envelope::from_bytes(&bytes),
                    None => Err(EnvelopeError::Malformed {
                        what: "envelope",
                        reason: "partition value is not bytes".into(),
                    }),
                };
                Some((id, envelope))
            })
            .collect()
    }

    /// Every well-formed wrapped key, in session-id order. Malformed entries, and entries
    /// whose key names another session than the wrapped key inside, are skipped: without a
    /// usable wrapped key the session's records simply stay unreadable.
    pub fn wrapped_keys(&self) -> Vec<WrappedKey> {
        self.entries(WRAPPED_KEY_PREFIX)
            .filter_map(|(suffix, value)| parse_wrapped_key(&suffix, &value?))
            .collect()
    }

    /// The wrapped key of `session`, if present and well formed.
    pub fn wrapped_key(&self, session: SessionId) -> Option<WrappedKey> {
        let key = format!("{WRAPPED_KEY_PREFIX}{session}");
        let (value, _) = self.doc.get(ROOT, key.as_str()).ok()??;
        parse_wrapped_key(&key[WRAPPED_KEY_PREFIX.len()..], value.as_bytes()?)
    }

    /// How many records [`Self::records`] returns.
    pub fn record_count(&self) -> usize {
        self.entries(RECORD_PREFIX)
            .filter(|(suffix, _)| RecordId::parse_hex(suffix).is_some())
            .count()
    }

    /// The document's heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The whole document, compacted. Storage may replace everything it holds with this.
    ///
    /// Changes automerge holds back for dependencies it lacks are not saved (automerge's
    /// default would append them): a peer's change that depends on a hash nobody has would
    /// otherwise be stored unchecked, counted nowhere, and loaded into memory by every later
    /// session. An honest peer sends them again once their dependencies are here.
    pub fn save(&mut self) -> Vec<u8> {
        let bytes = self.doc.save_with_options(SaveOptions {
            deflate: true,
            retain_orphans: false,
        });
        self.saved_heads = self.doc.get_heads();
        bytes
    }

    /// Like [`Self::save`], without DEFLATE on the columns: faster to write, a little larger
    /// (sealed envelopes, most of a partition, do not compress). For the hub's store, where
    /// ingest speed matters more than a few bytes of disk.
    /// Held-back changes are not saved, as in [`Self::save`].
    pub fn save_uncompressed(&mut self) -> Vec<u8> {
        let bytes = self.doc.save_with_options(SaveOptions {
            deflate: false,
            retain_orphans: false,
        });
        self.saved_heads = self.doc.get_heads();
        bytes
    }

    /// Whether automerge holds changes back because their dependencies are missing (a
    /// sync round's bloom-filter false positive does this for a round; a hostile peer can
    /// do it on purpose).
    pub fn holds_back_changes(&self) -> bool {
        !self.doc.get_missing_deps(&[]).is_empty()
    }

    /// Forgets the changes automerge holds back (see [`Self::holds_back_changes`]); the
    /// applied history and the heads are unchanged. Returns whether there were any. This
    /// reloads the document, so it costs about a load of the partition: sessions call it
    /// only when something is held back.
    pub fn drop_held_back_changes(&mut self) -> Result<bool, PartitionError> {
        if !self.holds_back_changes() {
            return Ok(false);
        }
        let actor = self.doc.get_actor().clone();
        let bytes = self.doc.save_with_options(SaveOptions {
            deflate: false,
            retain_orphans: false,
        });
        let doc = Automerge::load(&bytes).map_err(|source| PartitionError::Load {
            partition: self.id.clone(),
            source: Box::new(source),
        })?;
        self.doc = doc.with_actor(actor);
        Ok(true)
    }

    /// The changes since the last [`Self::save`], [`Self::save_incremental`] or
    /// [`Self::load`], local or merged from peers; empty if none. Storage appends this.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        let bytes = self.doc.save_after(&self.saved_heads);
        self.saved_heads = self.doc.get_heads();
        bytes
    }

    /// Applies every change of `other` (the same partition) that this one lacks.
    pub fn merge(&mut self, other: &Partition) -> Result<(), PartitionError> {
        if other.id != self.id {
            return Err(PartitionError::WrongPartition {
                this: self.id.clone(),
                other: other.id.clone(),
            });
        }
        let changes = self.doc.get_changes_added(&other.doc);
        self.doc
            .apply_changes(changes)
            .map_err(|source| PartitionError::Automerge {
                partition: self.id.clone(),
                source: Box::new(source),
            })
    }

    /// The automerge document, for the sync layer.
    pub fn doc(&self) -> &Automerge {
        &self.doc
    }

    /// The automerge document, for the sync layer. Write only through this module's methods,
    /// so the layout above stays true.
    pub fn doc_mut(&mut self) -> &mut Automerge {
        &mut self.doc
    }

    /// Root-map entries under `prefix`: the key suffix and the value if it is bytes.
    fn entries<'a>(
        &'a self,
        prefix: &'static str,
    ) -> impl Iterator<Item = (Cow<'a, str>, Option<Cow<'a, [u8]>>)> + 'a {
        // Keys sort as strings, so "<p>" .. "<p with its last byte + 1>" is exactly the keys
        // starting with the prefix ('/' + 1 = '0').
        let end = format!("{}0", &prefix[..prefix.len() - 1]);
        self.doc
            .map_range(ROOT, prefix.to_owned()..end)
            .filter_map(move |item| {
                let suffix = match item.key {
                    Cow::Borrowed(k) => Cow::Borrowed(k.strip_prefix(prefix)?),
                    Cow::Owned(k) => Cow::Owned(k.strip_prefix(prefix)?.to_owned()),
                };
                let value = match item.value {
                    automerge::ValueRef::Scalar(automerge::ScalarValueRef::Bytes(b)) => Some(b),
                    _ => None,
                };
                Some((suffix, value))
            })
    }

    fn put_once(&mut self, key: String, bytes: Vec<u8>) -> Result<PutOutcome, PartitionError> {
        let existing =
            self.doc
                .get(ROOT, key.as_str())
                .map_err(|source| PartitionError::Automerge {
                    partition: self.id.clone(),
                    source: Box::new(source),
                })?;
        if let Some((value, _)) = existing {
            return Ok(if value.as_bytes() == Some(bytes.as_slice()) {
                PutOutcome::AlreadyThere
            } else {
                PutOutcome::Conflict
            });
        }
        self.doc
            .transact(|tx| tx.put(ROOT, key.as_str(), ScalarValue::Bytes(bytes)))
            .map_err(|failure| PartitionError::Automerge {
                partition: self.id.clone(),
                source: Box::new(failure.error),
            })?;
        Ok(PutOutcome::Written)
    }
}

enum PutOutcome {
    Written,
    AlreadyThere,
    Conflict,
}

pub(crate) fn parse_wrapped_key(suffix: &str, bytes: &[u8]) -> Option<WrappedKey> {
    let session = SessionId::parse_hex(suffix)?;
    let key = WrappedKey::from_bytes(bytes).ok()?;
    (key.session == session).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Record, RecordBody, SessionKey};
    use crate::ids::FacilityId;
    use crate::time::Day;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn pid() -> PartitionId {
        PartitionId {
            facility: FacilityId::parse("fac_a").expect("valid"),
            day: Day(100),
        }
    }

    fn envelope(rng: &mut ChaCha20Rng, key: &SessionKey, id: RecordId) -> Envelope {
        let record = Record {
            facility: pid().facility,
            device: DeviceId::parse("dev_a").expect("valid"),
            scanned_at: Day(100).start() + 7,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: Day(100).start(),
                token: [3; 16],
            },
        };
        key.seal(rng, &pid(), id, &record).expect("seal")
    }

    /// Finding 5 of the sync v2 review: a change whose dependency nobody has was kept by
    /// automerge's save and loaded back into every later session's memory.
    #[test]
    fn changes_held_back_for_missing_dependencies_are_neither_saved_nor_kept() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let key = SessionKey::generate(&mut rng, Day(100));
        let mut a = Partition::new(pid(), &[1; 16]);
        a.insert_record(
            RecordId([1; 16]),
            &envelope(&mut rng, &key, RecordId([1; 16])),
        )
        .expect("insert");
        let mut b = Partition::load(pid(), &a.save(), &[2; 16]).expect("load");
        for i in [2u8, 3] {
            b.insert_record(
                RecordId([i; 16]),
                &envelope(&mut rng, &key, RecordId([i; 16])),
            )
            .expect("insert");
        }
        // Only the last change: it depends on the one before, which `a` never gets.
        let last = b
            .doc
            .get_changes(&a.heads())
            .last()
            .cloned()
            .expect("a change");
        let heads = a.heads();
        a.doc.apply_changes([last.clone()]).expect("queued");
        assert_eq!(a.heads(), heads, "held back, not applied");
        assert!(a.holds_back_changes());
        for bytes in [a.save(), a.save_uncompressed()] {
            let reloaded = Partition::load(pid(), &bytes, &[1; 16]).expect("load");
            assert!(
                !reloaded.holds_back_changes(),
                "a save kept a held-back change"
            );
            assert_eq!(reloaded.heads(), heads);
            assert_eq!(reloaded.record_count(), 1);
        }
        assert!(a.drop_held_back_changes().expect("drop"));
        assert!(!a.holds_back_changes());
        assert!(!a.drop_held_back_changes().expect("nothing to drop"));
        assert_eq!(a.heads(), heads);
        assert_eq!(a.record_count(), 1);
        // The partition still writes as its own actor and merges the whole history later.
        a.merge(&b).expect("merge");
        assert_eq!(a.record_count(), 3);
        assert_eq!(a.doc.get_actor(), &ActorId::from(&[1u8; 16][..]));
    }

    #[test]
    fn insert_is_idempotent_and_refuses_overwrite() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let key = SessionKey::generate(&mut rng, Day(100));
        let mut p = Partition::new(pid(), &[1; 16]);
        let id = RecordId([5; 16]);
        let e1 = envelope(&mut rng, &key, id);
        p.insert_record(id, &e1).expect("insert");
        let heads = p.heads();
        p.insert_record(id, &e1).expect("same bytes again");
        assert_eq!(p.heads(), heads, "a repeated insert makes no change");
        let e2 = envelope(&mut rng, &key, id);
        assert!(matches!(
            p.insert_record(id, &e2),
            Err(PartitionError::RecordConflict { .. })
        ));
        assert_eq!(p.record_count(), 1);
        let records = p.records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].0, id);
        assert_eq!(records[0].1.as_ref().ok(), Some(&e1));
    }

    #[test]
    fn a_batch_is_one_change_idempotent_and_all_or_nothing() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let key = SessionKey::generate(&mut rng, Day(100));
        let wrapped = key
            .wrap(
                &crate::daykey::DayKeyRatchet::generate(&mut rng, Day(100))
                    .public(Day(100))
                    .expect("key"),
            )
            .expect("wrap");
        let mut p = Partition::new(pid(), &[1; 16]);
        let batch: Vec<(RecordId, Envelope)> = (0..20u8)
            .map(|i| {
                let id = RecordId([i; 16]);
                (id, envelope(&mut rng, &key, id))
            })
            .collect();
        assert_eq!(
            p.insert_batch(std::slice::from_ref(&wrapped), &batch)
                .expect("batch"),
            20
        );
        assert_eq!(
            p.doc().get_changes(&[]).len(),
            1,
            "one change for the batch"
        );
        assert_eq!(p.record_count(), 20);
        assert_eq!(p.wrapped_keys(), vec![wrapped.clone()]);
        // Folding the same rows again (after a crash) changes nothing.
        let heads = p.heads();
        assert_eq!(
            p.insert_batch(std::slice::from_ref(&wrapped), &batch)
                .expect("again"),
            0
        );
        assert_eq!(p.heads(), heads);
        // A conflicting record refuses the whole batch: the fresh record is not written.
        let fresh = RecordId([99; 16]);
        let conflicting = vec![
            (fresh, envelope(&mut rng, &key, fresh)),
            (batch[3].0, envelope(&mut rng, &key, batch[3].0)),
        ];
        assert!(matches!(
            p.insert_batch(&[], &conflicting),
            Err(PartitionError::RecordConflict { .. })
        ));
        assert_eq!(p.heads(), heads);
        // The same key twice in one batch is refused.
        let twice = vec![conflicting[0].clone(), conflicting[0].clone()];
        assert!(matches!(
            p.insert_batch(&[], &twice),
            Err(PartitionError::DuplicateInBatch { .. })
        ));
        assert_eq!(p.record_count(), 20);
    }

    #[test]
    fn keys_and_records_do_not_mix_and_foreign_keys_are_skipped() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let key = SessionKey::generate(&mut rng, Day(100));
        let mut p = Partition::new(pid(), &[1; 16]);
        for i in 0..3u8 {
            let id = RecordId([i; 16]);
            p.insert_record(id, &envelope(&mut rng, &key, id))
                .expect("insert");
        }
        let wk = WrappedKey {
            session: key.id(),
            key_day: Day(100),
            age: vec![1, 2, 3],
        };
        p.insert_wrapped_key(&wk).expect("insert key");
        // Entries a faulty writer might add: a bad record id, a non-bytes value, garbage bytes,
        // a key labelled with another session, and keys sorting right next to the prefixes.
        p.doc_mut()
            .transact(|tx| {
                tx.put(ROOT, "r/zz", ScalarValue::Bytes(vec![1]))?;
                tx.put(ROOT, format!("r/{}", RecordId([9; 16])), 5i64)?;
                tx.put(ROOT, format!("r/{}", RecordId([8; 16])), vec![0u8; 3])?;
                tx.put(ROOT, format!("k/{}", SessionId([7; 16])), wk.to_bytes())?;
                tx.put(ROOT, "r.", vec![1u8])?;
                tx.put(ROOT, "r0", vec![1u8])?;
                tx.put(ROOT, "s/x", vec![1u8])
            })
            .expect("raw writes");
        let records = p.records();
        assert_eq!(records.len(), 5);
        assert_eq!(p.record_count(), 5);
        assert_eq!(records.iter().filter(|(_, e)| e.is_err()).count(), 2);
        assert_eq!(p.wrapped_keys(), vec![wk.clone()]);
        assert_eq!(p.wrapped_key(key.id()), Some(wk));
        assert_eq!(p.wrapped_key(SessionId([7; 16])), None);
        assert_eq!(p.wrapped_key(SessionId([6; 16])), None);
    }

    #[test]
    fn merge_refuses_another_partition() {
        let mut a = Partition::new(pid(), &[1; 16]);
        let b = Partition::new(
            PartitionId {
                facility: pid().facility,
                day: Day(101),
            },
            &[2; 16],
        );
        assert!(matches!(
            a.merge(&b),
            Err(PartitionError::WrongPartition { .. })
        ));
    }

    #[test]
    fn session_actor_keeps_device_tag_and_varies_per_run() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let dev = DeviceId::parse("dev_a").expect("valid");
        let a = session_actor(&dev, &mut rng);
        let b = session_actor(&dev, &mut rng);
        assert_eq!(a[..8], b[..8]);
        assert_ne!(a[8..], b[8..]);
        let other = session_actor(&DeviceId::parse("dev_b").expect("valid"), &mut rng);
        assert_ne!(a[..8], other[..8]);
    }

    #[test]
    fn save_incremental_is_empty_without_changes() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let key = SessionKey::generate(&mut rng, Day(100));
        let mut p = Partition::new(pid(), &[1; 16]);
        assert!(p.save_incremental().is_empty());
        let id = RecordId([1; 16]);
        p.insert_record(id, &envelope(&mut rng, &key, id))
            .expect("insert");
        assert!(!p.save_incremental().is_empty());
        assert!(p.save_incremental().is_empty());
    }
}
