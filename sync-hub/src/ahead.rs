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
//! What a hostile peer can make it cost (a review's attack: a small message of garbage wrapped
//! keys, sent again and again, each costing X25519 operations, and ratchet steps under the
//! lock the actor takes): only admitted peers' messages are read (the daemon reads no `Sync`
//! message before admission); a message's first [`MAX_PER_MESSAGE`] wrapped keys are tried, a
//! connection's first [`MAX_PER_CONNECTION`] ([`Budget`]); only keys of the live days
//! ([`AHEAD_DAYS`] from the ratchet's oldest), whose day secrets are derived once per ratchet,
//! not under the lock at each key; only keys of at most [`MAX_STANZAS`] X25519 stanzas (an
//! honest key has one per hub of the region); and a wrapped key that did not unwrap is
//! remembered (the last [`CAPACITY`]) and not tried again. Anything left out is unwrapped by
//! the persist as before. At most [`CAPACITY`] keys are kept, the oldest dropped first; a key
//! never taken (its partition refused) goes that way, or when the ratchet moves past its day.
//! Each key is kept boxed, so the map's table holds pointers, not key bytes: dropping a key
//! overwrites it, and no copy is left in a slot the map moved or freed.

use shared::daykey::{DayKeyRatchet, DaySecret};
use shared::envelope::{SessionKey, WrappedKey};
use shared::sync::validate::ReadMessage;
use shared::time::Day;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The most wrapped keys of one message tried ahead. A device's first sync of a day puts one
/// (its session's); the rest, if any, are unwrapped by the persist as before.
pub const MAX_PER_MESSAGE: usize = 4;

/// The most wrapped keys tried ahead for one connection: a device's backlog of a month with a
/// few sessions a day, and more; past it the persists unwrap them as before.
pub const MAX_PER_CONNECTION: u32 = 256;

/// The most keys kept, and the most wrapped keys that did not unwrap remembered: far more
/// than the first syncs of one actor turn bring.
pub const CAPACITY: usize = 4096;

/// The days whose keys are unwrapped ahead: the ratchet's oldest and the next ones, the live
/// days and tomorrow (`shared::sync::MAX_FUTURE_DAYS`), with a day to spare for a purge not run
/// yet today. A key of another day is left to the persist.
pub const AHEAD_DAYS: u32 = shared::time::RETENTION_DAYS + shared::sync::MAX_FUTURE_DAYS + 1;

/// The most X25519 stanzas of a wrapped key unwrapped ahead (age tries the day secret on each):
/// an honest key is wrapped to each hub of its region.
pub const MAX_STANZAS: usize = shared::envelope::MAX_WRAP_RECIPIENTS;

/// What one connection may still have unwrapped ahead ([`MAX_PER_CONNECTION`] to begin with).
#[derive(Debug)]
pub struct Budget(AtomicU32);

impl Default for Budget {
    fn default() -> Self {
        Budget(AtomicU32::new(MAX_PER_CONNECTION))
    }
}

impl Budget {
    /// A connection's budget.
    pub fn new() -> Budget {
        Budget::default()
    }

    /// Spends one try; `false` once none is left.
    fn spend(&self) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Session keys unwrapped ahead of the persists that need them. Shared by the connections'
/// side ([`Self::unwrap_from`]) and the ledger ([`crate::ledger::Ledger::unwrap_ahead`]).
#[derive(Default)]
pub struct UnwrapAhead {
    inner: Mutex<Inner>,
    /// Keys unwrapped and kept, and keys taken by persists, since the start.
    kept: AtomicU64,
    taken: AtomicU64,
    /// Wrapped keys tried (unwrapped or not), since the start.
    tried: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// The day secrets of [`AHEAD_DAYS`] days from the ledger's ratchet's oldest, derived when
    /// the ledger shares its ratchet; empty until then (nothing is unwrapped).
    secrets: BTreeMap<Day, Arc<DaySecret>>,
    /// The keys, each with the number it was kept under.
    keys: HashMap<WrappedKey, (u64, Box<SessionKey>)>,
    /// The keys in the order kept, for dropping the oldest; an entry whose number is not its
    /// key's any more (taken, or kept again since) is passed over.
    order: VecDeque<(u64, WrappedKey)>,
    next: u64,
    /// Digests of wrapped keys that did not unwrap, the last [`CAPACITY`].
    failed: HashSet<[u8; 32]>,
    failed_order: VecDeque<[u8; 32]>,
}

impl Inner {
    fn forget_failed_beyond_capacity(&mut self) {
        while self.failed_order.len() > CAPACITY {
            if let Some(d) = self.failed_order.pop_front() {
                self.failed.remove(&d);
            }
        }
    }

    /// Drops `order`'s entries that no longer name a kept key under their number.
    fn compact_order(&mut self) {
        let Inner { keys, order, .. } = self;
        order.retain(|(n, w)| keys.get(w).is_some_and(|(m, _)| m == n));
    }
}

impl std::fmt::Debug for UnwrapAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("UnwrapAhead")
            .field("days", &inner.secrets.len())
            .field("keys", &inner.keys.len())
            .finish()
    }
}

/// How many X25519 stanzas the age file `age` names in its header.
fn x25519_stanzas(age: &[u8]) -> usize {
    const TAG: &[u8] = b"\n-> X25519 ";
    let header_end = age
        .windows(5)
        .position(|w| w == b"\n--- ")
        .unwrap_or(age.len());
    age[..header_end]
        .windows(TAG.len())
        .filter(|w| *w == TAG)
        .count()
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

    /// Derives the day secrets of [`AHEAD_DAYS`] days from `ratchet`'s oldest (at the ledger's
    /// opening and after each advance: about 0.2 ms), and drops the keys of days before it.
    pub(crate) fn set_ratchet(&self, ratchet: &DayKeyRatchet) {
        let oldest = ratchet.oldest();
        let secrets: BTreeMap<Day, Arc<DaySecret>> = (0..AHEAD_DAYS)
            .filter_map(|i| {
                let day = Day(oldest.0.checked_add(i)?);
                Some((day, Arc::new(ratchet.secret(day)?)))
            })
            .collect();
        let mut inner = self.lock();
        inner.secrets = secrets;
        inner.keys.retain(|w, _| w.key_day >= oldest);
        inner.compact_order();
    }

    /// Unwraps the first [`MAX_PER_MESSAGE`] wrapped keys `message` puts that are not kept
    /// yet, as `budget` allows, and keeps them (see the module docs for which are tried).
    /// Returns how many it kept. Keys that do not unwrap are left to the persist, which counts
    /// them. The unwrapping runs outside the lock: connections and the actor do not wait for
    /// it.
    pub fn unwrap_from(&self, message: &ReadMessage, budget: &Budget) -> usize {
        let mut kept = 0;
        for wrapped in message.wrapped_keys().take(MAX_PER_MESSAGE) {
            if x25519_stanzas(&wrapped.age) > MAX_STANZAS {
                continue;
            }
            let digest = *blake3::hash(&wrapped.to_bytes()).as_bytes();
            let secret = {
                let inner = self.lock();
                if inner.keys.contains_key(&wrapped) || inner.failed.contains(&digest) {
                    continue;
                }
                match inner.secrets.get(&wrapped.key_day) {
                    Some(secret) => secret.clone(),
                    None => continue,
                }
            };
            if !budget.spend() {
                break;
            }
            self.tried.fetch_add(1, Ordering::Relaxed);
            let unwrapped = wrapped.unwrap(&secret);
            drop(secret);
            let mut inner = self.lock();
            let Ok(key) = unwrapped else {
                if inner.failed.insert(digest) {
                    inner.failed_order.push_back(digest);
                    inner.forget_failed_beyond_capacity();
                }
                continue;
            };
            // The ratchet may have moved past the day meanwhile.
            if !inner.secrets.contains_key(&wrapped.key_day) {
                continue;
            }
            if inner.keys.contains_key(&wrapped) {
                continue;
            }
            while inner.keys.len() >= CAPACITY {
                let Some((n, oldest)) = inner.order.pop_front() else {
                    break;
                };
                if inner.keys.get(&oldest).is_some_and(|(m, _)| *m == n) {
                    inner.keys.remove(&oldest);
                }
            }
            let n = inner.next;
            inner.next += 1;
            inner.keys.insert(wrapped.clone(), (n, Box::new(key)));
            inner.order.push_back((n, wrapped));
            if inner.order.len() > 2 * CAPACITY {
                inner.compact_order();
            }
            kept += 1;
        }
        self.kept.fetch_add(kept as u64, Ordering::Relaxed);
        kept
    }

    /// The key unwrapped ahead from exactly `wrapped`, taken out (a persist takes it once).
    pub(crate) fn take(&self, wrapped: &WrappedKey) -> Option<SessionKey> {
        let (_, key) = self.lock().keys.remove(wrapped)?;
        self.taken.fetch_add(1, Ordering::Relaxed);
        Some(*key)
    }

    /// How many keys were unwrapped and kept, and how many of them persists took, since the
    /// start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.kept.load(Ordering::Relaxed),
            self.taken.load(Ordering::Relaxed),
        )
    }

    /// How many wrapped keys were tried (each one X25519 unwrapping at most [`MAX_STANZAS`]
    /// times), since the start.
    pub fn tried(&self) -> u64 {
        self.tried.load(Ordering::Relaxed)
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
        let read = shared::sync::harness::read_sync_of(&p);
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

    /// A wrapped key of `session`'s label holding `key_bytes`, encrypted to `recipients` as
    /// any peer can (a forgery, when the session is another's).
    fn forge(
        session: shared::envelope::SessionId,
        day: Day,
        key_bytes: [u8; 32],
        recipients: &[age::x25519::Recipient],
    ) -> WrappedKey {
        let mut payload = session.0.to_vec();
        payload.extend_from_slice(&day.0.to_be_bytes());
        payload.extend_from_slice(&key_bytes);
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .expect("recipients");
        let mut out = Vec::new();
        {
            use std::io::Write;
            let mut w = encryptor.wrap_output(&mut out).expect("wraps");
            w.write_all(&payload).expect("writes");
            w.finish().expect("finishes");
        }
        WrappedKey {
            session,
            key_day: day,
            age: out,
        }
    }

    fn recipient(ratchet: &DayKeyRatchet, day: Day) -> age::x25519::Recipient {
        ratchet
            .public(day)
            .expect("live")
            .to_recipient()
            .expect("recipient")
    }

    /// What is kept is the unwrapping of exactly the wrapped key the message put, for the live
    /// days of the ratchet; nothing before a ledger shares its ratchet; at most
    /// [`MAX_PER_MESSAGE`] a message; a key is taken once.
    #[test]
    fn keys_unwrapped_ahead_are_the_ones_the_persist_would_unwrap() {
        let mut rng = StdRng::seed_from_u64(3);
        let ratchet = DayKeyRatchet::generate(&mut rng, DAY);
        let (k1, w1) = wrapped(&mut rng, &ratchet, DAY);
        let (_, w2) = wrapped(&mut rng, &ratchet, Day(DAY.0 + 1));
        let message = message_putting(&[w1.clone(), w2.clone()]);
        let budget = Budget::new();

        let ahead = UnwrapAhead::new();
        assert_eq!(
            ahead.unwrap_from(&message, &budget),
            0,
            "no ratchet yet: nothing unwrapped"
        );
        ahead.set_ratchet(&ratchet);
        assert_eq!(ahead.unwrap_from(&message, &budget), 2);
        assert_eq!(ahead.unwrap_from(&message, &budget), 0, "kept already");
        let got = ahead.take(&w1).expect("kept");
        assert!(same(&got, &k1));
        assert!(ahead.take(&w1).is_none(), "taken once");
        // Another wrapped key of the same session (a forgery wrapping other key bytes to the
        // same public day key, as any peer can) is another entry: taking by the stored
        // wrapped key never gives its key.
        let forged = forge(w1.session, DAY, [0x66; 32], &[recipient(&ratchet, DAY)]);
        assert_eq!(
            ahead.unwrap_from(&message_putting(std::slice::from_ref(&forged)), &budget),
            1
        );
        assert!(ahead.take(&w1).is_none());
        assert!(ahead.take(&forged).is_some());
        assert_eq!(ahead.counts(), (3, 2));

        // Past the ratchet's days: not unwrapped, and dropped when the ratchet moves on.
        let mut later = DayKeyRatchet::from_bytes(ratchet.to_bytes().as_slice()).expect("copy");
        later.advance(Day(DAY.0 + 1));
        let (_, w3) = wrapped(&mut rng, &ratchet, DAY);
        let only_w3 = message_putting(std::slice::from_ref(&w3));
        ahead.set_ratchet(&later);
        assert!(ahead.take(&w2).is_some(), "day + 1 is still held");
        assert_eq!(ahead.unwrap_from(&only_w3, &budget), 0);
        ahead.set_ratchet(&ratchet);
        assert_eq!(ahead.unwrap_from(&only_w3, &budget), 1);
        ahead.set_ratchet(&later);
        assert!(ahead.is_empty(), "the expired day's key is dropped");

        // At most MAX_PER_MESSAGE keys of one message.
        let many: Vec<WrappedKey> = (0..MAX_PER_MESSAGE + 3)
            .map(|_| wrapped(&mut rng, &ratchet, Day(DAY.0 + 1)).1)
            .collect();
        assert_eq!(
            ahead.unwrap_from(&message_putting(&many), &budget),
            MAX_PER_MESSAGE
        );
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
        let message = message_putting(&[foreign, damaged]);
        assert_eq!(ahead.unwrap_from(&message, &Budget::new()), 0);
        assert!(ahead.is_empty());
    }

    /// A review's attack: a small message of garbage wrapped keys, sent again and again, cost
    /// X25519 operations each time (and ratchet steps under the lock the actor takes, for
    /// days up to 400 ahead). Now only the live days' keys are tried, each wrapped key that
    /// did not unwrap once is not tried again, keys of more stanzas than an honest one are not
    /// tried, and a connection's tries are bounded.
    #[test]
    fn garbage_wrapped_keys_cost_one_try_and_only_within_bounds() {
        let mut rng = StdRng::seed_from_u64(5);
        let ratchet = DayKeyRatchet::generate(&mut rng, DAY);
        let ahead = UnwrapAhead::new();
        ahead.set_ratchet(&ratchet);

        // Days: the last one unwrapped ahead, and the first one past it (400 ahead was tried
        // before, the ratchet stepped 400 times under the lock to find its secret).
        let last = Day(DAY.0 + AHEAD_DAYS - 1);
        let past = Day(DAY.0 + AHEAD_DAYS);
        let far = Day(DAY.0 + 400);
        let (_, in_window) = wrapped(&mut rng, &ratchet, last);
        let (_, beyond) = wrapped(&mut rng, &ratchet, past);
        let (_, way_beyond) = wrapped(&mut rng, &ratchet, far);
        let budget = Budget::new();
        assert_eq!(
            ahead.unwrap_from(&message_putting(&[beyond, way_beyond]), &budget),
            0
        );
        assert_eq!(ahead.tried(), 0, "days past the window are not tried");
        assert_eq!(
            ahead.unwrap_from(&message_putting(&[in_window]), &budget),
            1
        );

        // Garbage: tried once, then remembered.
        let garbage: Vec<WrappedKey> = (0..MAX_PER_MESSAGE)
            .map(|i| {
                let (_, mut w) = wrapped(&mut rng, &ratchet, DAY);
                let at = w.age.len() - 1 - i;
                w.age[at] ^= 0x40;
                w
            })
            .collect();
        let message = message_putting(&garbage);
        let before = ahead.tried();
        for _ in 0..3 {
            assert_eq!(ahead.unwrap_from(&message, &budget), 0);
        }
        assert_eq!(
            ahead.tried() - before,
            MAX_PER_MESSAGE as u64,
            "each tried once"
        );

        // More X25519 stanzas than an honest key has: not tried.
        let r = recipient(&ratchet, DAY);
        let others: Vec<age::x25519::Recipient> = (0..MAX_STANZAS)
            .map(|_| age::x25519::Identity::generate().to_public())
            .collect();
        let mut all = vec![r];
        all.extend(others);
        let session = wrapped(&mut rng, &ratchet, DAY).0.id();
        let wide = forge(session, DAY, [0x11; 32], &all);
        assert_eq!(x25519_stanzas(&wide.age), MAX_STANZAS + 1);
        let before = ahead.tried();
        assert_eq!(ahead.unwrap_from(&message_putting(&[wide]), &budget), 0);
        assert_eq!(ahead.tried(), before);

        // A connection's budget: past it, nothing is tried.
        let spent = Budget::new();
        for _ in 0..MAX_PER_CONNECTION {
            assert!(spent.spend());
        }
        let (_, fresh) = wrapped(&mut rng, &ratchet, DAY);
        let before = ahead.tried();
        assert_eq!(ahead.unwrap_from(&message_putting(&[fresh]), &spent), 0);
        assert_eq!(ahead.tried(), before);
    }

    /// Dropping the oldest key when full passes over entries of keys taken since (a review
    /// found that a key taken and kept again was dropped for its stale first entry).
    #[test]
    fn the_oldest_key_kept_is_dropped_first_when_full() {
        let mut rng = StdRng::seed_from_u64(6);
        let ratchet = DayKeyRatchet::generate(&mut rng, DAY);
        let ahead = UnwrapAhead::new();
        ahead.set_ratchet(&ratchet);
        let keys: Vec<WrappedKey> = (0..CAPACITY + 1)
            .map(|_| wrapped(&mut rng, &ratchet, DAY).1)
            .collect();
        let keep = |w: &WrappedKey| {
            ahead.unwrap_from(&message_putting(std::slice::from_ref(w)), &Budget::new())
        };
        // The first kept and taken; the others kept; the first kept again, now the newest.
        assert_eq!(keep(&keys[0]), 1);
        assert!(ahead.take(&keys[0]).is_some());
        for w in &keys[1..CAPACITY] {
            assert_eq!(keep(w), 1);
        }
        assert_eq!(keep(&keys[0]), 1);
        assert_eq!(ahead.len(), CAPACITY);
        // One more: the oldest (keys[1]) goes, not keys[0].
        assert_eq!(keep(&keys[CAPACITY]), 1);
        assert_eq!(ahead.len(), CAPACITY);
        assert!(
            ahead.take(&keys[0]).is_some(),
            "kept again, so not the oldest"
        );
        assert!(ahead.take(&keys[1]).is_none(), "the oldest was dropped");
        assert!(ahead.take(&keys[CAPACITY]).is_some());
    }
}
