//! The hub's day keys: one X25519 (age) key pair per UTC day, derived from a forward-secure
//! hash ratchet so that destroying a day's secret is a single in-place overwrite.
//!
//! The hub stores only [`DayKeyRatchet`]: the oldest live day and a 32-byte seed for it. Every
//! later day's seed follows by hashing (`seed_{d+1} = blake3::derive_key(RATCHET_CONTEXT,
//! seed_d)`), and a day's age secret is a second, independent hash of its seed. Hashing cannot
//! be undone, so once [`DayKeyRatchet::advance`] has overwritten the seed, no copy of the hub's
//! current state can recover an earlier day's secret: retention holds at the hub even if old
//! disk blocks or backups of the *current* state are stolen.
//!
//! Devices only ever see [`DayPublicKey`]s, the `age1...` recipients for the coming days.

use crate::time::Day;
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use zeroize::Zeroizing;

/// Domain separation for the step from one day's seed to the next.
const RATCHET_CONTEXT: &str = "kipass day-key ratchet v1";
/// Domain separation for a day's X25519 secret scalar, derived from that day's seed.
const SECRET_CONTEXT: &str = "kipass day-key secret v1";
/// Domain separation for a day's index key (the hub's trace index), derived from that day's seed.
const INDEX_CONTEXT: &str = "kipass day-index v1";
/// Domain separation for the shortcut taken by a jump longer than [`MAX_DAYS_AHEAD`].
const SKIP_CONTEXT: &str = "kipass day-key ratchet skip v1";

/// The HRP age uses for X25519 identities (`AGE-SECRET-KEY-1...`).
const AGE_SECRET_HRP: bech32::Hrp = bech32::Hrp::parse_unchecked("AGE-SECRET-KEY-");

/// How many days past the oldest live day [`DayKeyRatchet::secret`] and
/// [`DayKeyRatchet::public`] will ratchet. Each step is one hash, so this bounds the work any
/// outside input (a requested day) can cause; it is far more than the few weeks of public keys
/// a device needs.
pub const MAX_DAYS_AHEAD: u32 = 400;

/// Length of [`DayKeyRatchet::to_bytes`]: the oldest day (u32 big-endian) and the 32-byte seed.
pub const RATCHET_STATE_LEN: usize = 36;

/// A day key could not be read or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DayKeyError {
    /// The stored ratchet state has the wrong length.
    #[error(
        "day-key ratchet state must be exactly {RATCHET_STATE_LEN} bytes (day + seed), got {0}: \
         the stored state is damaged; restore it from the hub's key backup"
    )]
    BadRatchetLength(usize),
    /// A public day key is not an age X25519 recipient.
    #[error(
        "public key for day {day} is not an age X25519 recipient (\"age1...\"): {reason}; \
         refresh the day keys from the hub"
    )]
    BadRecipient {
        /// The day the key claims to be for.
        day: Day,
        /// What age said about it.
        reason: &'static str,
    },
}

/// The public half of one day's key, handed to devices: they wrap session keys to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayPublicKey {
    /// The UTC day whose partitions this key protects.
    pub day: Day,
    /// The age X25519 recipient, `age1...` in Bech32.
    pub recipient: String,
}

impl DayPublicKey {
    /// Parses the recipient string into age's type.
    pub fn to_recipient(&self) -> Result<age::x25519::Recipient, DayKeyError> {
        age::x25519::Recipient::from_str(&self.recipient).map_err(|reason| {
            DayKeyError::BadRecipient {
                day: self.day,
                reason,
            }
        })
    }
}

/// The secret half of one day's key. Exists only at the hub, only while the day is live.
pub struct DaySecret {
    day: Day,
    identity: age::x25519::Identity,
}

impl DaySecret {
    /// The day this secret opens.
    pub fn day(&self) -> Day {
        self.day
    }

    /// The age identity, for decrypting wrapped session keys of this day.
    pub fn identity(&self) -> &age::x25519::Identity {
        &self.identity
    }

    /// The matching public key.
    pub fn public(&self) -> DayPublicKey {
        DayPublicKey {
            day: self.day,
            recipient: self.identity.to_public().to_string(),
        }
    }
}

impl fmt::Debug for DaySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaySecret")
            .field("day", &self.day)
            .field("identity", &"<secret>")
            .finish()
    }
}

/// The hub's whole day-key state: the oldest live day and its seed.
pub struct DayKeyRatchet {
    oldest: Day,
    seed: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for DayKeyRatchet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DayKeyRatchet")
            .field("oldest", &self.oldest)
            .field("seed", &"<secret>")
            .finish()
    }
}

impl DayKeyRatchet {
    /// A fresh ratchet whose oldest live day is `oldest`.
    pub fn generate(rng: &mut impl RngCore, oldest: Day) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        DayKeyRatchet { oldest, seed }
    }

    /// Reads the state written by [`Self::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, DayKeyError> {
        if b.len() != RATCHET_STATE_LEN {
            return Err(DayKeyError::BadRatchetLength(b.len()));
        }
        let mut day = [0u8; 4];
        day.copy_from_slice(&b[..4]);
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&b[4..]);
        Ok(DayKeyRatchet {
            oldest: Day(u32::from_be_bytes(day)),
            seed,
        })
    }

    /// The state to store: oldest day (u32 big-endian) followed by the seed. Overwrite the
    /// previous state in place when it changes.
    pub fn to_bytes(&self) -> Zeroizing<[u8; RATCHET_STATE_LEN]> {
        let mut out = Zeroizing::new([0u8; RATCHET_STATE_LEN]);
        out[..4].copy_from_slice(&self.oldest.0.to_be_bytes());
        out[4..].copy_from_slice(self.seed.as_ref());
        out
    }

    /// The oldest day whose secret still exists.
    pub fn oldest(&self) -> Day {
        self.oldest
    }

    /// The secret of `day`: `None` if it was destroyed (`day < oldest`) or lies more than
    /// [`MAX_DAYS_AHEAD`] days past the oldest live day.
    pub fn secret(&self, day: Day) -> Option<DaySecret> {
        let seed = self.seed_for(day)?;
        Some(secret_from_seed(day, &seed))
    }

    /// The symmetric key under which the hub indexes `day`'s visits for traces, under the same
    /// conditions as [`Self::secret`].
    ///
    /// It comes from the same per-day seed as the day secret through its own derivation
    /// context, so it is independent of the age key yet destroyed by the same
    /// [`Self::advance`]: once a day expires, its index entries can no longer be linked to a
    /// token or read.
    pub fn index_key(&self, day: Day) -> Option<Zeroizing<[u8; 32]>> {
        let seed = self.seed_for(day)?;
        Some(Zeroizing::new(blake3::derive_key(
            INDEX_CONTEXT,
            seed.as_ref(),
        )))
    }

    /// The public key of `day`, under the same conditions as [`Self::secret`].
    pub fn public(&self, day: Day) -> Option<DayPublicKey> {
        self.secret(day).map(|s| s.public())
    }

    /// Public keys of up to `count` consecutive days starting at `from`, leaving out days that
    /// are destroyed or beyond [`MAX_DAYS_AHEAD`]. Walks the ratchet once, not once per day.
    pub fn publics(&self, from: Day, count: u32) -> Vec<DayPublicKey> {
        // Inclusive bounds, so that the last representable day is not lost to saturation.
        let Some(last_asked) = (u64::from(from.0) + u64::from(count)).checked_sub(1) else {
            return Vec::new();
        };
        let last_live = u64::from(self.oldest.0) + u64::from(MAX_DAYS_AHEAD);
        let last = last_asked.min(last_live).min(u64::from(u32::MAX));
        let first = from.max(self.oldest);
        let Some(mut seed) = self.seed_for(first) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut day = first.0;
        while u64::from(day) <= last {
            out.push(secret_from_seed(Day(day), &seed).public());
            let Some(next) = day.checked_add(1) else {
                break;
            };
            seed = step(&seed);
            day = next;
        }
        out
    }

    /// Irreversibly forgets every day before `new_oldest`. Does nothing if `new_oldest` is not
    /// later than the current oldest day.
    ///
    /// A jump of more than [`MAX_DAYS_AHEAD`] days does not walk the chain day by day (an
    /// absurd clock could otherwise cost billions of hashes); it replaces the seed by a one-way
    /// hash of the seed and the new day. That starts a new chain, which is safe because no
    /// public key was ever handed out for a day this far ahead of the old oldest day.
    pub fn advance(&mut self, new_oldest: Day) {
        if new_oldest <= self.oldest {
            return;
        }
        let gap = new_oldest.0 - self.oldest.0;
        if gap <= MAX_DAYS_AHEAD {
            for _ in 0..gap {
                self.seed = step(&self.seed);
            }
        } else {
            let mut hasher = blake3::Hasher::new_derive_key(SKIP_CONTEXT);
            hasher.update(self.seed.as_ref());
            hasher.update(&new_oldest.0.to_be_bytes());
            self.seed = Zeroizing::new(*hasher.finalize().as_bytes());
        }
        self.oldest = new_oldest;
    }

    /// The seed of `day`, walking forward from the oldest live day.
    fn seed_for(&self, day: Day) -> Option<Zeroizing<[u8; 32]>> {
        if day < self.oldest {
            return None;
        }
        let ahead = day.0 - self.oldest.0;
        if ahead > MAX_DAYS_AHEAD {
            return None;
        }
        let mut seed = Zeroizing::new(*self.seed);
        for _ in 0..ahead {
            seed = step(&seed);
        }
        Some(seed)
    }
}

/// One ratchet step: the next day's seed. The old value is dropped (and zeroized) by the caller.
fn step(seed: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(blake3::derive_key(RATCHET_CONTEXT, seed))
}

/// The age identity of the day whose seed is `seed`.
fn secret_from_seed(day: Day, seed: &[u8; 32]) -> DaySecret {
    let scalar = Zeroizing::new(blake3::derive_key(SECRET_CONTEXT, seed));
    DaySecret {
        day,
        identity: identity_from_bytes(&scalar),
    }
}

/// Builds an age X25519 identity from 32 secret bytes. age offers no constructor from raw
/// bytes, so the bytes go through its own text form (`AGE-SECRET-KEY-1...`, Bech32), which is
/// the documented, stable way to hand age a key.
fn identity_from_bytes(bytes: &[u8; 32]) -> age::x25519::Identity {
    // Neither step depends on outside data: a 32-byte payload under this fixed HRP always
    // encodes (74 characters, within Bech32's 90-character limit) and always parses back.
    let text = Zeroizing::new(
        bech32::encode_upper::<bech32::Bech32>(AGE_SECRET_HRP, bytes)
            .expect("32 bytes under the age secret-key HRP always encode as Bech32"),
    );
    age::x25519::Identity::from_str(&text)
        .expect("a Bech32 AGE-SECRET-KEY of 32 bytes is always a valid age identity")
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn ratchet(oldest: u32) -> DayKeyRatchet {
        DayKeyRatchet::generate(&mut ChaCha20Rng::seed_from_u64(7), Day(oldest))
    }

    #[test]
    fn identity_round_trips_through_age_text_form() {
        let bytes = [42u8; 32];
        let id = identity_from_bytes(&bytes);
        let text = id.to_string();
        assert!(text.expose_secret().starts_with("AGE-SECRET-KEY-1"));
        // Decoding age's own encoding gives back the same 32 bytes.
        let parsed = bech32::primitives::decode::CheckedHrpstring::new::<bech32::Bech32>(
            text.expose_secret(),
        )
        .expect("age's text form is Bech32");
        assert_eq!(parsed.byte_iter().collect::<Vec<u8>>(), bytes.to_vec());
    }

    #[test]
    fn age_encrypts_to_derived_public_and_decrypts_with_derived_secret() {
        let r = ratchet(100);
        let secret = r.secret(Day(103)).expect("live day");
        let public = r.public(Day(103)).expect("live day");
        assert_eq!(public.day, Day(103));
        assert!(public.recipient.starts_with("age1"));
        let recipient = public.to_recipient().expect("valid recipient");
        let ct = age::encrypt(&recipient, b"hello day").expect("encrypt");
        assert_eq!(
            age::decrypt(secret.identity(), &ct).expect("decrypt"),
            b"hello day"
        );
        let other = r.secret(Day(104)).expect("live day");
        assert!(age::decrypt(other.identity(), &ct).is_err());
    }

    #[test]
    fn ratchet_chain_is_the_documented_hash_chain() {
        let r = ratchet(10);
        let seed0: [u8; 32] = *r.seed;
        let seed1 = blake3::derive_key(RATCHET_CONTEXT, &seed0);
        let scalar1 = blake3::derive_key(SECRET_CONTEXT, &seed1);
        let expected = identity_from_bytes(&scalar1).to_public().to_string();
        assert_eq!(r.public(Day(11)).expect("live").recipient, expected);
    }

    #[test]
    fn index_keys_follow_the_seed_and_die_with_it() {
        let mut r = ratchet(100);
        let k101 = r.index_key(Day(101)).expect("live day");
        // Its own context: neither the seed, nor the age scalar, nor another day's key.
        let seed1 = blake3::derive_key(RATCHET_CONTEXT, r.seed.as_ref());
        assert_eq!(*k101, blake3::derive_key(INDEX_CONTEXT, &seed1));
        assert_ne!(*k101, blake3::derive_key(SECRET_CONTEXT, &seed1));
        assert_ne!(k101, r.index_key(Day(102)).expect("live day"));
        assert!(r.index_key(Day(99)).is_none());
        assert!(r.index_key(Day(100 + MAX_DAYS_AHEAD)).is_some());
        assert!(r.index_key(Day(101 + MAX_DAYS_AHEAD)).is_none());
        // Advancing keeps later keys and destroys earlier ones.
        r.advance(Day(101));
        assert!(r.index_key(Day(100)).is_none());
        assert_eq!(r.index_key(Day(101)), Some(k101));
    }

    #[test]
    fn secrets_are_none_outside_the_window() {
        let r = ratchet(100);
        assert!(r.secret(Day(99)).is_none());
        assert!(r.secret(Day(100)).is_some());
        assert!(r.secret(Day(100 + MAX_DAYS_AHEAD)).is_some());
        assert!(r.secret(Day(101 + MAX_DAYS_AHEAD)).is_none());
        assert!(r.secret(Day(u32::MAX)).is_none());
    }

    #[test]
    fn publics_match_public_and_respect_bounds() {
        let r = ratchet(100);
        let ps = r.publics(Day(98), 5);
        assert_eq!(
            ps.iter().map(|p| p.day).collect::<Vec<_>>(),
            vec![Day(100), Day(101), Day(102)]
        );
        for p in &ps {
            assert_eq!(Some(p.clone()), r.public(p.day));
        }
        assert_eq!(
            r.publics(Day(100), u32::MAX).len(),
            MAX_DAYS_AHEAD as usize + 1
        );
        assert!(r.publics(Day(0), 50).is_empty());
    }

    #[test]
    fn advance_keeps_later_keys_and_forgets_earlier() {
        let mut r = ratchet(100);
        let before = r.public(Day(130)).expect("live");
        r.advance(Day(120));
        assert_eq!(r.oldest(), Day(120));
        assert!(r.secret(Day(119)).is_none());
        assert_eq!(r.public(Day(130)), Some(before));
        // Going back is a no-op.
        let bytes = r.to_bytes();
        r.advance(Day(50));
        assert_eq!(*r.to_bytes(), *bytes);
    }

    #[test]
    fn huge_jump_is_cheap_and_forgets_everything_before() {
        let mut r = ratchet(100);
        let old = r.public(Day(100 + MAX_DAYS_AHEAD)).expect("live");
        r.advance(Day(u32::MAX - 3));
        assert_eq!(r.oldest(), Day(u32::MAX - 3));
        assert!(r.secret(Day(100 + MAX_DAYS_AHEAD)).is_none());
        let now = r.public(Day(u32::MAX - 3)).expect("live");
        assert_ne!(now.recipient, old.recipient);
        assert_eq!(r.publics(Day(u32::MAX - 3), 10).len(), 4);
    }

    #[test]
    fn state_round_trips_and_bad_lengths_are_refused() {
        let r = ratchet(12_345);
        let b = r.to_bytes();
        assert_eq!(&b[..4], &12_345u32.to_be_bytes());
        let back = DayKeyRatchet::from_bytes(b.as_ref()).expect("valid state");
        assert_eq!(back.oldest(), Day(12_345));
        assert_eq!(back.public(Day(12_350)), r.public(Day(12_350)));
        assert_eq!(
            DayKeyRatchet::from_bytes(&b[..35]).err(),
            Some(DayKeyError::BadRatchetLength(35))
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let r = ratchet(1);
        let s = r.secret(Day(1)).expect("live");
        let text = format!("{r:?} {s:?}");
        assert!(!text.contains("AGE-SECRET-KEY"));
        assert!(!text.contains(&hex::encode(*r.seed)));
        assert!(text.contains("<secret>"));
    }

    #[test]
    fn bad_recipient_is_an_error() {
        let p = DayPublicKey {
            day: Day(3),
            recipient: "age1nope".into(),
        };
        assert!(matches!(
            p.to_recipient(),
            Err(DayKeyError::BadRecipient { day: Day(3), .. })
        ));
    }
}
