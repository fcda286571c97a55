//! The record envelope: how one visit is sealed at the edge so that only the hub can read it.
//!
//! Each device seals its records under an in-memory [`SessionKey`] with XChaCha20-Poly1305.
//! The session key is wrapped with age to the hub's public key of its day ([`WrappedKey`]; in a
//! region of two hubs, to both hubs' keys of that day in one age file) and stored in the same
//! partition, so the device can write its log but never read it back, and
//! the hub can read it only while it still holds that day's secret.
//!
//! Wire forms (all integers big-endian):
//!
//! ```text
//! Envelope   = version:u8 (=1) | session:16 | nonce:24 | ciphertext (plaintext + 16-byte tag)
//! WrappedKey = version:u8 (=1) | session:16 | key_day:u32 | age file (one X25519 stanza per hub)
//! age payload of a WrappedKey = session:16 | session_day:u32 | key:32
//! AEAD associated data = "kipass envelope" | version | session:16
//!                        | facility_len:u32 | facility | day:u32 | record_id:16
//! ```
//!
//! The associated data binds an envelope to its partition and record id, so moving it to
//! another record or partition makes it fail to open. The plaintext is a compact postcard
//! encoding that leaves out the facility (it is the partition's, and authenticated through the
//! associated data) and stores times as small offsets, so a QR record seals to about 100 bytes.

use crate::daykey::{DayKeyError, DayPublicKey, DaySecret};
use crate::ids::{DeviceId, FacilityId, PartitionId, RecordId};
use crate::time::{Day, UnixSeconds};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroizing;

/// The only envelope and wrapped-key format version this code writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;

/// Largest encoded envelope accepted or produced. A paper entry, the largest record, seals to
/// under 3 KiB; anything near this limit is not ours.
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024;

/// Largest encoded wrapped key accepted. An age X25519 file of a 52-byte payload to one
/// recipient is at most about 470 bytes (the 22-byte version line, a 97-byte X25519 stanza,
/// age's random "grease" stanza of up to 192 bytes, the 48-byte MAC line and the 84-byte
/// payload); each further recipient adds one 97-byte stanza, so a key wrapped to
/// [`MAX_WRAP_RECIPIENTS`] hubs is at most 582 bytes with its header
/// (`wrapped_key_bound_fits_two_recipients` measures it). The bound leaves room for that and
/// no more than twice it.
pub const MAX_WRAPPED_KEY_BYTES: usize = 1024;
/// The most recipients [`SessionKey::wrap_to`] takes: the region's two hubs.
pub const MAX_WRAP_RECIPIENTS: usize = 2;

const AD_LABEL: &[u8] = b"kipass envelope";
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + 16 + NONCE_LEN;
const WRAPPED_HEADER_LEN: usize = 1 + 16 + 4;
const WRAP_PAYLOAD_LEN: usize = 16 + 4 + 32;

/// Sealing, wrapping, parsing or opening an envelope failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The day key to wrap to is unusable.
    #[error(transparent)]
    DayKey(#[from] DayKeyError),
    /// age refused to encrypt the session key.
    #[error("wrapping the session key with age failed: {0}")]
    Wrap(String),
    /// The wrapped key is for one day, the secret offered for another.
    #[error(
        "wrapped key is sealed to the day key of day {key_day} but the secret offered is for \
         day {secret_day}: look up the secret of the key's day"
    )]
    WrongDaySecret {
        /// The day of the hub key the session key was wrapped to.
        key_day: Day,
        /// The day of the secret offered.
        secret_day: Day,
    },
    /// age could not decrypt the wrapped key.
    #[error(
        "cannot unwrap session key {session}: {reason}; the day secret does not match or the \
         wrapped key is damaged"
    )]
    Unwrap {
        /// The session whose key was being unwrapped.
        session: SessionId,
        /// What went wrong.
        reason: String,
    },
    /// The wrapped key decrypted to something that is not this session's key.
    #[error(
        "wrapped key labelled session {expected} holds a key for another session or a damaged \
         payload: it was tampered with; ignore it"
    )]
    WrappedKeyMismatch {
        /// The session id the wrapped key is stored under.
        expected: SessionId,
    },
    /// A session key may only seal or open records of its own day's partitions.
    #[error(
        "session key of day {session_day} cannot be used for partition day {partition_day}: \
         start a new session key for each UTC day"
    )]
    WrongDay {
        /// The day the session key was generated for.
        session_day: Day,
        /// The day of the partition.
        partition_day: Day,
    },
    /// The record names another facility than the partition it is sealed into.
    #[error(
        "record of facility {record} cannot be sealed into a partition of facility \
         {partition}: a device writes only its own facility's partitions"
    )]
    WrongFacility {
        /// The record's facility.
        record: FacilityId,
        /// The partition's facility.
        partition: FacilityId,
    },
    /// The envelope was sealed under another session key.
    #[error(
        "envelope was sealed under session {envelope} but the key offered is for session \
         {key}: look up the wrapped key of the envelope's session"
    )]
    WrongSession {
        /// The envelope's session.
        envelope: SessionId,
        /// The key's session.
        key: SessionId,
    },
    /// The AEAD refused the envelope.
    #[error(
        "envelope does not authenticate: it was damaged, or moved to another partition or \
         record id, or sealed under a different key"
    )]
    Open,
    /// Encoded bytes are not of the expected form.
    #[error("malformed {what}: {reason}; the bytes are damaged or not from this protocol")]
    Malformed {
        /// What was being parsed.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A format version this code does not know.
    #[error(
        "unsupported {what} version {version} (this build reads version {ENVELOPE_VERSION}): \
         upgrade this node"
    )]
    UnsupportedVersion {
        /// What was being parsed.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },
    /// Too large to be one of ours.
    #[error("{what} of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// What was being built or parsed.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
}

fn malformed(what: &'static str, reason: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Malformed {
        what,
        reason: reason.into(),
    }
}

/// Names a session key; stored in clear in every envelope so the hub can find the wrapped key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// Parses the 32-hex-character form.
    pub fn parse_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; 16];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(SessionId(b))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A symmetric key that seals one device's records of one day for one run of the device.
/// It lives only in memory at the edge; the hub recovers it by unwrapping a [`WrappedKey`].
/// Dropping it overwrites the key bytes ([`zeroize::ZeroizeOnDrop`]), so a device that ends a
/// day's session leaves no copy of the key behind in its memory.
pub struct SessionKey {
    id: SessionId,
    day: Day,
    key: Zeroizing<[u8; 32]>,
}

// The key is the only secret field and is `Zeroizing`, which wipes it on drop.
impl zeroize::ZeroizeOnDrop for SessionKey {}

/// A copy for a second thread opening the same session's records (the hub's persist: see
/// `PartitionOpener::share_keys`); each copy wipes its key when dropped.
impl Clone for SessionKey {
    fn clone(&self) -> Self {
        SessionKey {
            id: self.id,
            day: self.day,
            key: self.key.clone(),
        }
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKey")
            .field("id", &self.id)
            .field("day", &self.day)
            .field("key", &"<secret>")
            .finish()
    }
}

impl SessionKey {
    /// A fresh session key for the partitions of `day`.
    pub fn generate(rng: &mut impl RngCore, day: Day) -> Self {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(key.as_mut());
        SessionKey {
            id: SessionId(id),
            day,
            key,
        }
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The day whose partitions this key seals.
    pub fn day(&self) -> Day {
        self.day
    }

    /// Wraps this key with age to a hub day key. `to` is normally the key of the session's own
    /// day; an edge that ran out of day keys may fall back to its newest one, so any day is
    /// accepted and recorded in the result (the hub then needs that day's secret).
    ///
    /// age draws its ephemeral key, file key and a random-length "grease" stanza from the
    /// operating system, so the output (about 250 to 450 bytes) differs on every call even
    /// under a seeded `RngCore`.
    pub fn wrap(&self, to: &DayPublicKey) -> Result<WrappedKey, EnvelopeError> {
        self.wrap_to(&[to])
    }

    /// Wraps this key with age to several hub day keys at once (the region's two hubs, each
    /// with its own ratchet): one age file with one stanza per recipient, which the secret of
    /// any of them opens. `to` holds 1 to [`MAX_WRAP_RECIPIENTS`] keys, all of the same day
    /// (the result's `key_day`), no key twice; anything else is refused
    /// ([`EnvelopeError::Wrap`]).
    pub fn wrap_to(&self, to: &[&DayPublicKey]) -> Result<WrappedKey, EnvelopeError> {
        let Some(first) = to.first() else {
            return Err(EnvelopeError::Wrap("no hub day key to wrap to".into()));
        };
        if to.len() > MAX_WRAP_RECIPIENTS {
            return Err(EnvelopeError::Wrap(format!(
                "{} hub day keys to wrap to, at most {MAX_WRAP_RECIPIENTS}",
                to.len()
            )));
        }
        if let Some(other) = to.iter().find(|k| k.day != first.day) {
            return Err(EnvelopeError::Wrap(format!(
                "the hub day keys to wrap to are of days {} and {}: all must be of one day",
                first.day, other.day
            )));
        }
        for (i, k) in to.iter().enumerate() {
            if to[..i].iter().any(|o| o.recipient == k.recipient) {
                return Err(EnvelopeError::Wrap("the same hub day key twice".into()));
            }
        }
        let recipients = to
            .iter()
            .map(|k| k.to_recipient())
            .collect::<Result<Vec<_>, _>>()?;
        let mut payload = Zeroizing::new([0u8; WRAP_PAYLOAD_LEN]);
        payload[..16].copy_from_slice(&self.id.0);
        payload[16..20].copy_from_slice(&self.day.0.to_be_bytes());
        payload[20..].copy_from_slice(self.key.as_ref());
        let wrap_err = |e: String| EnvelopeError::Wrap(e);
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| wrap_err(e.to_string()))?;
        let mut age = Vec::with_capacity(WRAP_PAYLOAD_LEN + 600);
        {
            use std::io::Write;
            let mut writer = encryptor
                .wrap_output(&mut age)
                .map_err(|e| wrap_err(e.to_string()))?;
            writer
                .write_all(payload.as_ref())
                .map_err(|e| wrap_err(e.to_string()))?;
            writer.finish().map_err(|e| wrap_err(e.to_string()))?;
        }
        Ok(WrappedKey {
            session: self.id,
            key_day: first.day,
            age,
        })
    }

    /// Seals `record` as record `record_id` of `partition`. The record must belong to the
    /// partition's facility and the partition must be of this key's day.
    pub fn seal(
        &self,
        rng: &mut impl RngCore,
        partition: &PartitionId,
        record_id: RecordId,
        record: &Record,
    ) -> Result<Envelope, EnvelopeError> {
        if partition.day != self.day {
            return Err(EnvelopeError::WrongDay {
                session_day: self.day,
                partition_day: partition.day,
            });
        }
        if record.facility != partition.facility {
            return Err(EnvelopeError::WrongFacility {
                record: record.facility.clone(),
                partition: partition.facility.clone(),
            });
        }
        let plaintext = Zeroizing::new(
            postcard::to_stdvec(&WireRecord::from_record(record, partition.day))
                .map_err(|e| malformed("record", e.to_string()))?,
        );
        let len = HEADER_LEN + plaintext.len() + TAG_LEN;
        if len > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                what: "envelope",
                len,
                max: MAX_ENVELOPE_BYTES,
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let aad = associated_data(ENVELOPE_VERSION, self.id, partition, record_id);
        let ciphertext = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            // Encryption fails only for inputs longer than the cipher's 256 GiB limit.
            .map_err(|_| EnvelopeError::TooLarge {
                what: "record",
                len: plaintext.len(),
                max: MAX_ENVELOPE_BYTES,
            })?;
        Ok(Envelope {
            version: ENVELOPE_VERSION,
            session: self.id,
            nonce,
            ciphertext,
        })
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&self.key[..]))
    }
}

/// A session key wrapped with age to one of the hub's day keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WrappedKey {
    /// The session the key belongs to.
    pub session: SessionId,
    /// The day of the hub key it is wrapped to.
    pub key_day: Day,
    /// The age file holding the key.
    pub age: Vec<u8>,
}

impl WrappedKey {
    /// The wire form (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(WRAPPED_HEADER_LEN + self.age.len());
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&self.session.0);
        out.extend_from_slice(&self.key_day.0.to_be_bytes());
        out.extend_from_slice(&self.age);
        out
    }

    /// Parses the wire form. Checks the framing only; [`Self::unwrap`] checks the contents.
    pub fn from_bytes(b: &[u8]) -> Result<Self, EnvelopeError> {
        const WHAT: &str = "wrapped key";
        if b.len() > MAX_WRAPPED_KEY_BYTES {
            return Err(EnvelopeError::TooLarge {
                what: WHAT,
                len: b.len(),
                max: MAX_WRAPPED_KEY_BYTES,
            });
        }
        let (&version, rest) = b.split_first().ok_or_else(|| malformed(WHAT, "empty"))?;
        if version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion {
                what: WHAT,
                version,
            });
        }
        if b.len() <= WRAPPED_HEADER_LEN {
            return Err(malformed(
                WHAT,
                format!("{} bytes is shorter than its header", b.len()),
            ));
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&rest[..16]);
        let mut day = [0u8; 4];
        day.copy_from_slice(&rest[16..20]);
        Ok(WrappedKey {
            session: SessionId(session),
            key_day: Day(u32::from_be_bytes(day)),
            age: rest[20..].to_vec(),
        })
    }

    /// Recovers the session key with the secret of [`Self::key_day`].
    pub fn unwrap(&self, secret: &DaySecret) -> Result<SessionKey, EnvelopeError> {
        if secret.day() != self.key_day {
            return Err(EnvelopeError::WrongDaySecret {
                key_day: self.key_day,
                secret_day: secret.day(),
            });
        }
        let payload = Zeroizing::new(age::decrypt(secret.identity(), &self.age).map_err(|e| {
            EnvelopeError::Unwrap {
                session: self.session,
                reason: e.to_string(),
            }
        })?);
        // The session id inside the age payload must match the label outside, so a wrapped
        // key cannot be relabelled to pose as another session's.
        if payload.len() != WRAP_PAYLOAD_LEN || payload[..16] != self.session.0 {
            return Err(EnvelopeError::WrappedKeyMismatch {
                expected: self.session,
            });
        }
        let mut day = [0u8; 4];
        day.copy_from_slice(&payload[16..20]);
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&payload[20..]);
        Ok(SessionKey {
            id: self.session,
            day: Day(u32::from_be_bytes(day)),
            key,
        })
    }
}

/// One sealed record. Only [`SessionKey::seal`] makes one with real ciphertext;
/// [`Envelope::from_bytes`] parses the wire form for transport and storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    version: u8,
    session: SessionId,
    nonce: [u8; NONCE_LEN],
    ciphertext: Vec<u8>,
}

impl Envelope {
    /// The session whose key sealed this envelope.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The wire form (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.push(self.version);
        out.extend_from_slice(&self.session.0);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses the wire form. Checks framing only; [`Self::open`] authenticates.
    pub fn from_bytes(b: &[u8]) -> Result<Self, EnvelopeError> {
        const WHAT: &str = "envelope";
        if b.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                what: WHAT,
                len: b.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        let (&version, _) = b.split_first().ok_or_else(|| malformed(WHAT, "empty"))?;
        if version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion {
                what: WHAT,
                version,
            });
        }
        if b.len() < HEADER_LEN + TAG_LEN {
            return Err(malformed(
                WHAT,
                format!(
                    "{} bytes is shorter than header and tag ({})",
                    b.len(),
                    HEADER_LEN + TAG_LEN
                ),
            ));
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&b[1..17]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[17..HEADER_LEN]);
        Ok(Envelope {
            version,
            session: SessionId(session),
            nonce,
            ciphertext: b[HEADER_LEN..].to_vec(),
        })
    }

    /// Size of the wire form in bytes.
    #[allow(clippy::len_without_is_empty)] // reason: an envelope is never empty (41-byte header)
    pub fn len(&self) -> usize {
        HEADER_LEN + self.ciphertext.len()
    }

    /// Opens the envelope stored as `record_id` in `partition` with its session's key.
    pub fn open(
        &self,
        key: &SessionKey,
        partition: &PartitionId,
        record_id: RecordId,
    ) -> Result<Record, EnvelopeError> {
        if key.id != self.session {
            return Err(EnvelopeError::WrongSession {
                envelope: self.session,
                key: key.id,
            });
        }
        if key.day != partition.day {
            return Err(EnvelopeError::WrongDay {
                session_day: key.day,
                partition_day: partition.day,
            });
        }
        let aad = associated_data(self.version, self.session, partition, record_id);
        let plaintext = Zeroizing::new(
            key.cipher()
                .decrypt(
                    XNonce::from_slice(&self.nonce),
                    Payload {
                        msg: &self.ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| EnvelopeError::Open)?,
        );
        let (wire, rest): (WireRecord, _) = postcard::take_from_bytes(&plaintext)
            .map_err(|e| malformed("sealed record", e.to_string()))?;
        if !rest.is_empty() {
            return Err(malformed(
                "sealed record",
                format!("{} trailing bytes", rest.len()),
            ));
        }
        Ok(wire.into_record(partition))
    }
}

fn associated_data(
    version: u8,
    session: SessionId,
    partition: &PartitionId,
    record_id: RecordId,
) -> Vec<u8> {
    let facility = partition.facility.as_str().as_bytes();
    let mut ad = Vec::with_capacity(AD_LABEL.len() + 1 + 16 + 4 + facility.len() + 4 + 16);
    ad.extend_from_slice(AD_LABEL);
    ad.push(version);
    ad.extend_from_slice(&session.0);
    // A facility id is at most 40 bytes, so the length always fits.
    ad.extend_from_slice(
        &u32::try_from(facility.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    ad.extend_from_slice(facility);
    ad.extend_from_slice(&partition.day.0.to_be_bytes());
    ad.extend_from_slice(&record_id.0);
    ad
}

/// One visit as the edge records it: the plaintext inside an [`Envelope`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The facility visited; always the partition's facility.
    pub facility: FacilityId,
    /// The device that recorded the visit.
    pub device: DeviceId,
    /// When the visit was recorded, by the device's clock.
    pub scanned_at: UnixSeconds,
    /// What was recorded.
    pub body: RecordBody,
}

/// What a visit record holds.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordBody {
    /// A verified one-time QR token.
    Qr {
        /// The issuer that signed the token.
        issuer_id: u16,
        /// The issuer key that signed it.
        key_id: u8,
        /// When the token was issued.
        issued_at: u64,
        /// The token's random identifier, which the issuer maps to a person.
        token: [u8; 16],
    },
    /// A paper-log entry, sealed to the health authority (see `paper`).
    Paper {
        /// The age file only the health authority can open.
        sealed_for_authority: Vec<u8>,
    },
}

// Records carry tokens that identify people through their issuer; logs must never show them.
impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("facility", &self.facility)
            .field("device", &self.device)
            .field("scanned_at", &self.scanned_at)
            .field("body", &self.body)
            .finish()
    }
}

impl fmt::Debug for RecordBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordBody::Qr {
                issuer_id,
                key_id,
                issued_at,
                token: _,
            } => f
                .debug_struct("Qr")
                .field("issuer_id", issuer_id)
                .field("key_id", key_id)
                .field("issued_at", issued_at)
                .field("token", &"<elided>")
                .finish(),
            RecordBody::Paper {
                sealed_for_authority,
            } => f
                .debug_struct("Paper")
                .field(
                    "sealed_for_authority",
                    &format_args!("<{} bytes>", sealed_for_authority.len()),
                )
                .finish(),
        }
    }
}

/// The sealed plaintext of a [`Record`]. The facility is left out (it is the partition's and
/// bound through the associated data). Times are stored as wrapping offsets, which postcard
/// writes as short zigzag varints: the scan time from the start of the partition's day (3
/// bytes), the issue time back from the scan time (1 or 2 bytes for a fresh token). Wrapping
/// arithmetic makes every `u64` round-trip exactly, however far off a clock is.
#[derive(Serialize, Deserialize)]
struct WireRecord {
    device: DeviceId,
    scan_offset: i64,
    body: WireBody,
}

#[derive(Serialize, Deserialize)]
enum WireBody {
    Qr {
        issuer_id: u16,
        key_id: u8,
        issued_before_scan: i64,
        token: [u8; 16],
    },
    Paper {
        sealed_for_authority: Vec<u8>,
    },
}

// The `as` casts below reinterpret bits between u64 and i64 on purpose: the offsets are
// wrapping differences, and the reverse cast with wrapping addition restores the exact value.
impl WireRecord {
    fn from_record(r: &Record, day: Day) -> Self {
        WireRecord {
            device: r.device.clone(),
            scan_offset: r.scanned_at.wrapping_sub(day.start()) as i64,
            body: match &r.body {
                RecordBody::Qr {
                    issuer_id,
                    key_id,
                    issued_at,
                    token,
                } => WireBody::Qr {
                    issuer_id: *issuer_id,
                    key_id: *key_id,
                    issued_before_scan: r.scanned_at.wrapping_sub(*issued_at) as i64,
                    token: *token,
                },
                RecordBody::Paper {
                    sealed_for_authority,
                } => WireBody::Paper {
                    sealed_for_authority: sealed_for_authority.clone(),
                },
            },
        }
    }

    fn into_record(self, partition: &PartitionId) -> Record {
        let scanned_at = partition.day.start().wrapping_add(self.scan_offset as u64);
        Record {
            facility: partition.facility.clone(),
            device: self.device,
            scanned_at,
            body: match self.body {
                WireBody::Qr {
                    issuer_id,
                    key_id,
                    issued_before_scan,
                    token,
                } => RecordBody::Qr {
                    issuer_id,
                    key_id,
                    issued_at: scanned_at.wrapping_sub(issued_before_scan as u64),
                    token,
                },
                WireBody::Paper {
                    sealed_for_authority,
                } => RecordBody::Paper {
                    sealed_for_authority,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daykey::DayKeyRatchet;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn a_key_wrapped_to_both_hubs_opens_with_either_secret() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let day = Day(20_000);
        let a = DayKeyRatchet::generate(&mut rng, day);
        let b = DayKeyRatchet::generate(&mut rng, day);
        let (pa, pb) = (a.public(day).unwrap(), b.public(day).unwrap());
        let key = SessionKey::generate(&mut rng, day);
        let wrapped = key.wrap_to(&[&pa, &pb]).unwrap();
        assert_eq!(wrapped.key_day, day);
        let wire = WrappedKey::from_bytes(&wrapped.to_bytes()).unwrap();
        for secret in [a.secret(day).unwrap(), b.secret(day).unwrap()] {
            let k = wire.unwrap(&secret).unwrap();
            assert_eq!(k.id(), key.id());
            assert_eq!(*k.key, *key.key);
        }
        // A third hub's secret of the day opens nothing.
        let c = DayKeyRatchet::generate(&mut rng, day);
        assert!(matches!(
            wire.unwrap(&c.secret(day).unwrap()),
            Err(EnvelopeError::Unwrap { .. })
        ));
        // One recipient is what `wrap` does.
        let one = key.wrap_to(&[&pb]).unwrap();
        assert!(one.unwrap(&b.secret(day).unwrap()).is_ok());
        assert!(one.unwrap(&a.secret(day).unwrap()).is_err());
    }

    #[test]
    fn wrap_to_refuses_no_keys_mixed_days_duplicates_and_too_many() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let day = Day(20_000);
        let a = DayKeyRatchet::generate(&mut rng, day);
        let b = DayKeyRatchet::generate(&mut rng, day);
        let c = DayKeyRatchet::generate(&mut rng, day);
        let key = SessionKey::generate(&mut rng, day);
        let (pa, pb, pc) = (
            a.public(day).unwrap(),
            b.public(day).unwrap(),
            c.public(day).unwrap(),
        );
        let wrap_err =
            |r: Result<WrappedKey, EnvelopeError>| matches!(r, Err(EnvelopeError::Wrap(_)));
        assert!(wrap_err(key.wrap_to(&[])));
        assert!(wrap_err(
            key.wrap_to(&[&pa, &b.public(day.plus(1)).unwrap()])
        ));
        assert!(wrap_err(key.wrap_to(&[&pa, &pa])));
        assert!(wrap_err(key.wrap_to(&[&pa, &pb, &pc])));
        let mut bad = pb.clone();
        bad.recipient = "age1bad".into();
        assert!(matches!(
            key.wrap_to(&[&pa, &bad]),
            Err(EnvelopeError::DayKey(_))
        ));
    }

    #[test]
    fn wrapped_key_bound_fits_two_recipients() {
        // The worst case by age's format: version line, one X25519 stanza per recipient (a
        // 53-byte line and a 44-byte body line), the grease stanza (a first line of at most
        // 3 + 15 + 4 * 9 + 1 bytes, a body of at most 100 bytes: 134 base64 characters in
        // lines of 64, 137 bytes), the MAC line, the 16-byte nonce and the 52-byte payload
        // with its 16-byte tag; then this format's 21-byte header.
        let grease = (3 + 15 + 4 * 9 + 1) + 137;
        let worst = 21 + 22 + MAX_WRAP_RECIPIENTS * 97 + grease + 48 + 16 + 52 + 16;
        assert!(worst <= MAX_WRAPPED_KEY_BYTES, "{worst}");
        // And as measured, over many draws of the grease.
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let day = Day(20_000);
        let a = DayKeyRatchet::generate(&mut rng, day).public(day).unwrap();
        let b = DayKeyRatchet::generate(&mut rng, day).public(day).unwrap();
        let key = SessionKey::generate(&mut rng, day);
        let longest = (0..300)
            .map(|_| key.wrap_to(&[&a, &b]).unwrap().to_bytes().len())
            .max()
            .unwrap();
        assert!(longest <= worst, "{longest} > {worst}");
        assert!(WrappedKey::from_bytes(&vec![ENVELOPE_VERSION; longest]).is_ok());
    }

    fn partition(day: u32) -> PartitionId {
        PartitionId {
            facility: FacilityId::parse("fac_0123456789abcdef").expect("valid"),
            day: Day(day),
        }
    }

    fn qr_record(scanned_at: u64, issued_at: u64) -> Record {
        Record {
            facility: FacilityId::parse("fac_0123456789abcdef").expect("valid"),
            device: DeviceId::parse("dev_0123456789abcdef").expect("valid"),
            scanned_at,
            body: RecordBody::Qr {
                issuer_id: 3,
                key_id: 1,
                issued_at,
                token: [0xAB; 16],
            },
        }
    }

    #[test]
    fn extreme_times_round_trip() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let p = partition(20_000);
        let key = SessionKey::generate(&mut rng, p.day);
        for (scan, issued) in [
            (0, u64::MAX),
            (u64::MAX, 0),
            (p.day.start() + 5, p.day.start() + 100),
            (p.day.start(), p.day.start()),
        ] {
            let r = qr_record(scan, issued);
            let e = key.seal(&mut rng, &p, RecordId([1; 16]), &r).expect("seal");
            assert_eq!(e.open(&key, &p, RecordId([1; 16])).expect("open"), r);
        }
    }

    #[test]
    fn qr_envelope_is_about_100_bytes() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let p = partition(20_000);
        let key = SessionKey::generate(&mut rng, p.day);
        let scan = p.day.start() + 50_000;
        let e = key
            .seal(&mut rng, &p, RecordId([1; 16]), &qr_record(scan, scan - 30))
            .expect("seal");
        // 41 header + 16 tag + 21 device + 3 scan offset + 1 variant + 1 issuer + 1 key id
        // + 1 issue offset + 16 token.
        assert_eq!(e.len(), 101);
        assert_eq!(e.to_bytes().len(), e.len());
    }

    #[test]
    fn seal_refuses_wrong_day_and_facility() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let key = SessionKey::generate(&mut rng, Day(10));
        let r = qr_record(10, 5);
        assert!(matches!(
            key.seal(&mut rng, &partition(11), RecordId([0; 16]), &r),
            Err(EnvelopeError::WrongDay { .. })
        ));
        let other = PartitionId {
            facility: FacilityId::parse("fac_other").expect("valid"),
            day: Day(10),
        };
        assert!(matches!(
            key.seal(&mut rng, &other, RecordId([0; 16]), &r),
            Err(EnvelopeError::WrongFacility { .. })
        ));
    }

    #[test]
    fn envelope_parsing_refuses_bad_framing() {
        assert!(matches!(
            Envelope::from_bytes(&[]),
            Err(EnvelopeError::Malformed { .. })
        ));
        assert!(matches!(
            Envelope::from_bytes(&[2; 80]),
            Err(EnvelopeError::UnsupportedVersion { version: 2, .. })
        ));
        assert!(matches!(
            Envelope::from_bytes(&[1; 56]),
            Err(EnvelopeError::Malformed { .. })
        ));
        assert!(Envelope::from_bytes(&[1; 57]).is_ok());
        assert!(matches!(
            Envelope::from_bytes(&vec![1; MAX_ENVELOPE_BYTES + 1]),
            Err(EnvelopeError::TooLarge { .. })
        ));
        assert!(WrappedKey::from_bytes(&[1; 21]).is_err());
        assert!(WrappedKey::from_bytes(&[0; 40]).is_err());
    }

    #[test]
    fn relabelled_wrapped_key_is_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let ratchet = DayKeyRatchet::generate(&mut rng, Day(10));
        let key = SessionKey::generate(&mut rng, Day(10));
        let mut wrapped = key
            .wrap(&ratchet.public(Day(10)).expect("live"))
            .expect("wrap");
        let secret = ratchet.secret(Day(10)).expect("live");
        let back = wrapped.unwrap(&secret).expect("unwrap");
        assert_eq!((back.id(), back.day()), (key.id(), key.day()));
        assert_eq!(*back.key, *key.key);
        wrapped.session = SessionId([9; 16]);
        assert!(matches!(
            wrapped.unwrap(&secret),
            Err(EnvelopeError::WrappedKeyMismatch { .. })
        ));
    }

    #[test]
    fn debug_output_elides_secrets() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let key = SessionKey::generate(&mut rng, Day(1));
        let r = qr_record(1, 1);
        let text = format!("{key:?} {r:?}");
        assert!(!text.contains(&hex::encode(*key.key)));
        assert!(!text.contains("171")); // 0xAB = 171, the token bytes
        assert!(text.contains("<elided>"));
        let paper = RecordBody::Paper {
            sealed_for_authority: vec![7; 300],
        };
        assert_eq!(
            format!("{paper:?}"),
            "Paper { sealed_for_authority: <300 bytes> }"
        );
    }
}
