//! Session keys unwrapped ahead, where a `Sync` message is read (issue 14).
//!
//! Unwrapping a session's key (an age X25519 file: about 90 µs) is the one step of a first
//! sync's persist that neither of its threads can share, so it held the hub's actor for about
//! 0.75 µs a record of a 120-record first sync. The connections' side reads every `Sync`
//! message before the actor takes it (`shared::sync::Inbound::read`, on the connection's
//! task); it now also unwraps the wrapped keys the message puts ([`UnwrapAhead::unwrap_from`])
//! and leaves them here, and the persist that indexes the partition takes them
//! ([`UnwrapAhead::take`]) instead of unwrapping again.
//!
//! What may be trusted: a key here is the unwrapping of one exact wrapped key (the map's key,
//! all its bytes) under the ledger's day secret of that key's day, a function of those alone,
//! so it is the key the persist would unwrap from the same wrapped key. The persist offers it
//! to its opener only for the wrapped key the merged partition holds
//! (`PartitionOpener::offer_unwrapped`): a peer's wrapped key that lost the merge, or a forged
//! one, is never used for the session.
//!
//! What a hostile peer can make it cost: a message's first [`MAX_PER_MESSAGE`] wrapped keys
//! are unwrapped, only keys of days the ledger's ratchet still holds, only for admitted peers
//! (the daemon reads no `Sync` message before admission), and at most [`CAPACITY`] keys are
//! kept, the oldest dropped first (dropping a key overwrites it). A key never taken (its
//! partition refused) is dropped that way, or when the ratchet moves past its day.

use shared::daykey::DayKeyRatchet;
use shared::envelope::{SessionKey, WrappedKey};
use shared::sync::validate::ReadMessage;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The most wrapped keys of one message unwrapped ahead. A device's first sync of a day puts
/// one (its session's); the rest, if any, are unwrapped by the persist as before.
pub const MAX_PER_MESSAGE: usize = 4;

/// The most keys kept: far more than the first syncs of one actor turn bring.
pub const CAPACITY: usize = 4096;

/// Session keys unwrapped ahead of the persists that need them. Shared by the connections'
/// side ([`Self::unwrap_from`]) and the ledger ([`crate::ledger::Ledger::unwrap_ahead`]).
#[derive(Default)]
pub struct UnwrapAhead {
    inner: Mutex<Inner>,
    /// Keys unwrapped and kept, and keys taken by persists, since the start.
    kept: AtomicU64,
    taken: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// A copy of the ledger's ratchet; `None` until a ledger shares it (nothing is unwrapped).
    ratchet: Option<DayKeyRatchet>,
    keys: HashMap<WrappedKey, SessionKey>,
    /// The keys in the order kept, for dropping the oldest. May name keys already taken.
    order: VecDeque<WrappedKey>,
}

impl std::fmt::Debug for UnwrapAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("UnwrapAhead")
            .field("ratchet", &inner.ratchet)
            .field("keys", &inner.keys.len())
            .finish()
    }
}

impl UnwrapAhead {
    /// An empty cache, unwrapping nothing until a ledger shares its ratchet.
    pub fn new() -> UnwrapAhead {
        UnwrapAhead::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a copy of the ledger's ratchet (at its opening and after each advance), and
    /// drops the keys of days it no longer holds.
    pub(crate) fn set_ratchet(&self, ratchet: &DayKeyRatchet) {
        // The ratchet is not `Clone`: its state goes through its own encoding, zeroized.
        let Ok(copy) = DayKeyRatchet::from_bytes(ratchet.to_bytes().as_slice()) else {
            return;
        };
        let oldest = copy.oldest();
        let mut inner = self.lock();
        inner.ratchet = Some(copy);
        inner.keys.retain(|w, _| w.key_day >= oldest);
        let Inner { keys, order, .. } = &mut *inner;
        order.retain(|w| keys.contains_key(w));
    }

    /// Unwraps the first [`MAX_PER_MESSAGE`] wrapped keys `message` puts that are not kept
    /// yet and whose day the ratchet holds, and keeps them. Returns how many it kept. Keys
    /// that do not unwrap are left to the persist, which counts them. The unwrapping runs
    /// outside the lock: connections do not wait for each other.
    pub fn unwrap_from(&self, message: &ReadMessage) -> usize {
        let mut kept = 0;
        for wrapped in message.wrapped_keys().into_iter().take(MAX_PER_MESSAGE) {
            let secret = {
                let inner = self.lock();
                if inner.keys.contains_key(&wrapped) {
                    continue;
                }
                match inner
                    .ratchet
                    .as_ref()
                    .and_then(|r| r.secret(wrapped.key_day))
                {
                    Some(secret) => secret,
                    None => continue,
                }
            };
            let Ok(key) = wrapped.unwrap(&secret) else {
                continue;
            };
            drop(secret);
            let mut inner = self.lock();
            // The ratchet may have moved past the day meanwhile.
            if inner
                .ratchet
                .as_ref()
                .is_none_or(|r| wrapped.key_day < r.oldest())
            {
                continue;
            }
            while inner.keys.len() >= CAPACITY {
                let Some(oldest) = inner.order.pop_front() else {
                    break;
                };
                inner.keys.remove(&oldest);
            }
            if inner.keys.insert(wrapped.clone(), key).is_none() {
                inner.order.push_back(wrapped);
                kept += 1;
            }
        }
        self.kept.fetch_add(kept as u64, Ordering::Relaxed);
        kept
    }

    /// The key unwrapped ahead from exactly `wrapped`, taken out (a persist takes it once).
    pub(crate) fn take(&self, wrapped: &WrappedKey) -> Option<SessionKey> {
        let mut inner = self.lock();
        let key = inner.keys.remove(wrapped)?;
        if inner.order.len() > 2 * CAPACITY {
            let Inner { keys, order, .. } = &mut *inner;
            order.retain(|w| keys.contains_key(w));
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
        Some(key)
    }

    /// How many keys were unwrapped and kept, and how many of them persists took, since the
    /// start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.kept.load(Ordering::Relaxed),
            self.taken.load(Ordering::Relaxed),
        )
    }

    /// How many keys are kept.
    pub fn len(&self) -> usize {
        self.lock().keys.len()
    }

    /// Whether no key is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::{Message, MessageVersion};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use shared::ids::{FacilityId, PartitionId};
    use shared::partition::{Partition, WRAPPED_KEY_PREFIX};
    use shared::time::Day;

    const DAY: Day = Day(20_000);

    /// A read `Sync` message whose one change puts `keys`, as a device's first sync does.
    fn message_putting(keys: &[WrappedKey]) -> ReadMessage {
        let id = PartitionId {
            facility: FacilityId::parse("fac_a").expect("valid"),
            day: DAY,
        };
        let mut p = Partition::new(id, &[7; 16]);
        {
            use automerge::transaction::Transactable;
            let mut tx = p.doc_mut().transaction();
            for k in keys {
                let key = format!("{WRAPPED_KEY_PREFIX}{}", k.session);
                tx.put(automerge::ROOT, key, k.to_bytes()).expect("put");
            }
            tx.commit();
        }
        let changes: Vec<Vec<u8>> = p
            .doc()
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        let bytes = Message {
            heads: vec![],
            need: vec![],
            have: vec![],
            changes: changes.into(),
            flags: None,
            version: MessageVersion::V1,
        }
        .encode();
        let read = ReadMessage::read(bytes);
        assert!(read.checked().is_ok(), "the message reads");
        read
    }

    fn wrapped(rng: &mut StdRng, ratchet: &DayKeyRatchet, day: Day) -> (SessionKey, WrappedKey) {
        let key = SessionKey::generate(rng, day);
        let public = ratchet.public(day).expect("a live day");
        let w = key.wrap(&public).expect("wraps");
        (key, w)
    }

    fn same(a: &SessionKey, b: &SessionKey) -> bool {
        a.id() == b.id() && format!("{a:?}") == format!("{b:?}") && {
            // Seal with one and open with the other: the same key bytes.
            let mut rng = StdRng::seed_from_u64(1);
            let id = PartitionId {
                facility: FacilityId::parse("fac_a").expect("valid"),
                day: DAY,
            };
            let rid = shared::RecordId::random(&mut rng);
            let record = shared::envelope::Record {
                facility: id.facility.clone(),
                device: shared::DeviceId::parse("dev_a").expect("valid"),
                scanned_at: DAY.0 as u64 * shared::time::DAY_SECONDS,
                body: shared::envelope::RecordBody::Paper {
                    sealed_for_authority: vec![1; 8],
                },
            };
            let env = a.seal(&mut rng, &id, rid, &record).expect("seals");
            env.open(b, &id, rid).is_ok()
        }
    }

    /// What is kept is the unwrapping of exactly the wrapped key the message put, for days the
    /// ratchet holds; nothing before a ledger shares its ratchet; at most
    /// [`MAX_PER_MESSAGE`] a message; a key is taken once.
    #[test]
    fn keys_unwrapped_ahead_are_the_ones_the_persist_would_unwrap() {
        let mut rng = StdRng::seed_from_u64(3);
        let ratchet = DayKeyRatchet::generate(&mut rng, DAY);
        let (k1, w1) = wrapped(&mut rng, &ratchet, DAY);
        let (_, w2) = wrapped(&mut rng, &ratchet, Day(DAY.0 + 1));
        let message = message_putting(&[w1.clone(), w2.clone()]);

        let ahead = UnwrapAhead::new();
        assert_eq!(
            ahead.unwrap_from(&message),
            0,
            "no ratchet yet: nothing unwrapped"
        );
        ahead.set_ratchet(&ratchet);
        assert_eq!(ahead.unwrap_from(&message), 2);
        assert_eq!(ahead.unwrap_from(&message), 0, "kept already");
        let got = ahead.take(&w1).expect("kept");
        assert!(same(&got, &k1));
        assert!(ahead.take(&w1).is_none(), "taken once");
        // Another wrapped key of the same session (a forgery wrapping other key bytes to the
        // same public day key, as any peer can) is another entry: taking by the stored
        // wrapped key never gives its key.
        let recipient = ratchet
            .public(DAY)
            .expect("live")
            .to_recipient()
            .expect("recipient");
        let mut payload = w1.session.0.to_vec();
        payload.extend_from_slice(&DAY.0.to_be_bytes());
        payload.extend_from_slice(&[0x66; 32]);
        let forged = WrappedKey {
            age: age::encrypt(&recipient, &payload).expect("encrypts"),
            ..w1.clone()
        };
        assert_eq!(ahead.unwrap_from(&message_putting(std::slice::from_ref(&forged))), 1);
        assert!(ahead.take(&w1).is_none());
        assert!(ahead.take(&forged).is_some());
        assert_eq!(ahead.counts(), (3, 2));

        // Past the ratchet's days: not unwrapped, and dropped when the ratchet moves on.
        let mut later = DayKeyRatchet::from_bytes(ratchet.to_bytes().as_slice()).expect("copy");
        later.advance(Day(DAY.0 + 1));
        let (_, w3) = wrapped(&mut rng, &ratchet, DAY);
        ahead.set_ratchet(&later);
        assert!(ahead.take(&w2).is_some(), "day + 1 is still held");
        assert_eq!(ahead.unwrap_from(&message_putting(std::slice::from_ref(&w3))), 0);
        ahead.set_ratchet(&ratchet);
        assert_eq!(ahead.unwrap_from(&message_putting(std::slice::from_ref(&w3))), 1);
        ahead.set_ratchet(&later);
        assert!(ahead.is_empty(), "the expired day's key is dropped");

        // At most MAX_PER_MESSAGE keys of one message.
        let many: Vec<WrappedKey> = (0..MAX_PER_MESSAGE + 3)
            .map(|_| wrapped(&mut rng, &ratchet, Day(DAY.0 + 1)).1)
            .collect();
        assert_eq!(ahead.unwrap_from(&message_putting(&many)), MAX_PER_MESSAGE);
    }

    /// A wrapped key that does not unwrap under the day key (damaged, or wrapped to another
    /// key) is left to the persist: nothing kept, no panic.
    #[test]
    fn wrapped_keys_that_do_not_unwrap_are_not_kept() {
        let mut rng = StdRng::seed_from_u64(4);
        let ratchet = DayKeyRatchet::generate(&mut rng, DAY);
        let stranger = DayKeyRatchet::generate(&mut rng, DAY);
        let (_, foreign) = wrapped(&mut rng, &stranger, DAY);
        let (_, mut damaged) = wrapped(&mut rng, &ratchet, DAY);
        let last = damaged.age.len() - 1;
        damaged.age[last] ^= 1;
        let ahead = UnwrapAhead::new();
        ahead.set_ratchet(&ratchet);
        assert_eq!(ahead.unwrap_from(&message_putting(&[foreign, damaged])), 0);
        assert!(ahead.is_empty());
    }
}
