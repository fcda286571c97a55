//! One enrolled entrance device: the check-in path from a verified code to a durable,
//! sealed record, the paper log, status and retention.
//!
//! The rules come from `shared`: the scan's verdict and the duplicate-code rule, the day-key
//! fallback and when a session key is replaced, the paper-entry rules and the retention plan
//! are `shared::device`'s; sealing and partitions are `shared::envelope` and
//! `shared::partition`. This module carries them out against the store, in order: verify,
//! check the seen-token memory, seal, commit durably, and only then report `accepted`.

use crate::store::{CheckInWrite, Pending, Store, StoreError};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use shared::daykey::DayPublicKey;
use shared::device::{
    HeldDay, HeldSession, PaperRefusal, PeerHubUpdate, ScanVerdict, Scanner, SessionPlan,
    fallback_key_day, fallback_summary, peer_hub_update, purge_plan, seal_keys, seen_prune_before,
    session_ended, session_plan, session_survives_refresh,
};
use shared::envelope::{Envelope, Record, RecordBody, SessionKey, WrappedKey};
use shared::facility::Facility;
use shared::paper::{PaperEntry, PaperError};
use shared::partition::{Partition, PartitionError};
use shared::ticket::{Credential, EnrollmentTicket, HubContact, PeerHub, TicketError};
use shared::time::{Day, UnixSeconds, horizon};
use shared::token::{Keyring, Verdict};
use shared::{DeviceId, PartitionId, RecordId};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Default clock tolerance for code expiry, seconds (`qr-token-v1.md`).
pub const DEFAULT_SKEW: u64 = shared::device::DEFAULT_SKEW;
/// Chunks a partition may gather in the store before it is compacted into one save.
pub const COMPACT_AFTER_CHUNKS: usize = 512;
/// The most records [`Device::fold_pending`] folds into one automerge change. A change travels
/// whole in one sync message, and peers refuse a change over
/// `shared::sync::validate::MAX_CHANGE_BYTES` (1 MiB): 2,000 QR visits of ~140 B (envelope,
/// key, automerge's per-operation columns) are ~280 KB, so a backlog of any size (a busy day
/// offline, ~100,000 visits) folds into many small changes that the session spreads over
/// bounded messages, instead of one change no peer would take.
pub const MAX_RECORDS_PER_CHANGE: usize = 2_000;
/// The most envelope and wrapped-key bytes folded into one change, half the peers' per-change
/// limit: paper entries seal to up to ~3 KiB, so a batch of them reaches this before
/// [`MAX_RECORDS_PER_CHANGE`], and the other half is room for keys and automerge's columns.
pub const MAX_FOLD_BYTES: usize = 512 * 1024;
/// `status` warns when fewer day keys than this remain.
pub const DAY_KEYS_WARNING: usize = 7;
/// How many digits a staff PIN has: 4 to 12 for one set by an earlier release, which keeps
/// working (`status` warns once the kiosk has seen it is short).
pub const STAFF_PIN_DIGITS: std::ops::RangeInclusive<usize> = 4..=12;
/// The fewest digits of a PIN set now: 10^6 values, years of guessing behind the kiosk's
/// brake (`pin_guard`'s numbers).
pub const STAFF_PIN_MIN_NEW_DIGITS: usize = 6;
/// Argon2id memory cost of the staff PIN hash, KiB: 19 MiB, OWASP's minimum memory for
/// argon2id. Measured on this project's 2-core machine (argon2 at opt-level 2): t=2 (OWASP's
/// minimum) took 24-29 ms a hash, so [`STAFF_PIN_ARGON2_T`] is 4 for ~50 ms (80 ms under
/// load); a kiosk's slower CPU takes a few times that, once per staff login.
pub const STAFF_PIN_ARGON2_M_KIB: u32 = 19_456;
/// Argon2id passes over memory of the staff PIN hash.
pub const STAFF_PIN_ARGON2_T: u32 = 4;
/// Argon2id lanes of the staff PIN hash.
pub const STAFF_PIN_ARGON2_P: u32 = 1;
/// The stored form of the staff PIN this code writes (`{"version": 2, "argon2id": PHC}`);
/// version 1 was the salted BLAKE3 stretch of earlier releases.
const STAFF_PIN_FORM: u32 = 2;
/// Bounds on the argon2 parameters read back from a stored PIN, so a damaged store cannot make
/// a login allocate gigabytes or run for minutes.
const STAFF_PIN_MAX_M_KIB: u32 = 64 * 1024;
const STAFF_PIN_MAX_T: u32 = 16;
const STAFF_PIN_MAX_P: u32 = 4;

/// A device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The folder holds no enrolled device.
    #[error("{0} holds no enrolled device: run `edge-node --data {0} init --ticket FILE` first")]
    NotEnrolled(String),
    /// `init` on an enrolled folder.
    #[error("{0} is already enrolled as device {1}; use a new data folder for another device")]
    AlreadyEnrolled(String, String),
    /// The ticket file could not be read.
    #[error("cannot read ticket {path}: {source}")]
    TicketFile {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The ticket was refused.
    #[error("ticket {path}: {source}")]
    Ticket {
        /// The file.
        path: String,
        /// Why.
        source: TicketError,
    },
    /// Creating the data folder failed.
    #[error("cannot create data folder {path}: {source}")]
    DataDir {
        /// The folder.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store failed; nothing of this operation was recorded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored state did not parse.
    #[error("the device store is damaged ({0}); move {1} aside and re-enroll")]
    Damaged(String, String),
    /// A stored partition did not load.
    #[error("partition {0} is damaged: {1}")]
    Partition(String, PartitionError),
    /// Sealing failed.
    #[error("cannot seal the record: {0}")]
    Seal(String),
    /// No hub key is usable for the day.
    #[error(
        "this device holds no usable hub key for day {0}: it has not synced for too long; connect it to the hub"
    )]
    NoDayKey(Day),
    /// A paper-log entry was refused.
    #[error(transparent)]
    Paper(#[from] PaperError),
    /// A paper-log entry the device's rules refuse (the guardian rule, the visit time).
    #[error(transparent)]
    PaperRule(PaperRefusal),
    /// A staff PIN that is not of the allowed form.
    #[error(
        "the staff PIN must be {} to {} digits (0-9) and nothing else (a shorter PIN is guessed within weeks); it was not set",
        STAFF_PIN_MIN_NEW_DIGITS,
        STAFF_PIN_DIGITS.end()
    )]
    BadPin,
    /// Hashing a new staff PIN failed.
    #[error("cannot hash the staff PIN ({0}); it was not set")]
    PinHash(String),
}

impl From<PaperRefusal> for DeviceError {
    fn from(r: PaperRefusal) -> DeviceError {
        match r {
            PaperRefusal::Entry(e) => DeviceError::Paper(e),
            other => DeviceError::PaperRule(other),
        }
    }
}

/// What the device keeps of its enrollment (everything in the ticket but the keys that
/// change on sync and the credential, which are kept apart).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrollment {
    /// The facility it logs for.
    pub facility: Facility,
    /// Its id at the hub.
    pub device_id: DeviceId,
    /// Where it stands.
    pub device_name: String,
    /// The hub.
    pub hub: HubContact,
    /// The health authority's age recipient.
    pub authority_recipient: String,
    /// When it was enrolled (device clock).
    pub enrolled_at: UnixSeconds,
}

/// The result of one check-in attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckIn {
    /// The verdict.
    pub verdict: Verdict,
    /// The stored record's id, for `accepted`.
    pub record: Option<RecordId>,
}

/// Per-day figures for `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionStatus {
    /// The UTC day.
    pub day: Day,
    /// Records stored.
    pub records: u64,
    /// Records not yet known to be at the hub.
    pub unsynced: u64,
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The facility.
    pub facility_id: String,
    /// The facility's name.
    pub facility_name: String,
    /// This device.
    pub device_id: String,
    /// Its iroh endpoint id (siblings name it in `--peer ID@ADDR`).
    pub endpoint_id: String,
    /// Where it stands.
    pub device_name: String,
    /// Records stored in live partitions.
    pub records: u64,
    /// Records not yet known to be at the hub.
    pub unsynced: u64,
    /// The last completed sync with the hub, or null.
    pub last_sync: Option<UnixSeconds>,
    /// Live partitions.
    pub partitions: Vec<PartitionStatus>,
    /// Days from today for which the device holds a hub key.
    pub day_keys_left: usize,
    /// The device clock minus the hub's, at the last sync.
    pub clock_offset: Option<i64>,
    /// Live records sealed under an earlier day's hub key because the device had run out of
    /// day keys: the hub can read them only until that earlier key expires.
    #[serde(default)]
    pub fallback_sealed: u64,
    /// How many days before their own 28 days are up the earliest-expiring of those records
    /// become unreadable at the hub (0 when there are none).
    #[serde(default)]
    pub fallback_days_early: u32,
    /// The facility's other devices: where this device sees them (on the local network,
    /// from the hub's roster) and when it last reached each (`crate::lan`).
    #[serde(default)]
    pub siblings: Vec<shared::lan::SiblingStatus>,
    /// The revocations this device knows: from the hub, or a sibling's copy of its signed list.
    #[serde(default)]
    pub revocations: RevocationStatus,
    /// The region's hubs this device syncs with: the one it enrolled with, then the peer hub
    /// when the region runs two.
    #[serde(default)]
    pub hubs: Vec<HubStatus>,
    /// Session keys wrapped to one hub only although the device knows the region's peer hub
    /// (it held no key of that day for the other): records only that hub can open.
    #[serde(default)]
    pub single_hub_wraps: u64,
    /// Things an operator should act on.
    pub warnings: Vec<String>,
}

/// What `status` says of one of the region's hubs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HubStatus {
    /// `enrolled` (the ticket's hub, or the hub that replaced it) or `peer`.
    pub role: String,
    /// Its iroh endpoint id.
    pub endpoint_id: String,
    /// The addresses this device dials it at.
    pub addrs: Vec<String>,
    /// The last completed sync with this hub, or null.
    pub last_sync: Option<UnixSeconds>,
    /// The last day for which this device holds its day key (null: none from today on).
    pub day_keys_until: Option<Day>,
    /// Whether this hub has admitted this device, or the enrollment credential is spent: it
    /// is then not sent to this hub again.
    pub admitted: bool,
}

/// What `status` says of the revocation list (`shared::revocation`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RevocationStatus {
    /// How many of the facility's devices the list this device holds revokes (0: none held).
    pub version: u32,
    /// When the hub signed that list.
    pub issued_at: Option<UnixSeconds>,
    /// The revoked devices: their sessions are refused.
    pub revoked_devices: Vec<String>,
    /// Seconds since the newest of the list's issue time and the last completed hub sync:
    /// how old this device's knowledge of revocations is (null: neither).
    pub age_seconds: Option<u64>,
    /// Whether that is older than `shared::revocation::STALE_AFTER` (72 h) or unknown: a
    /// device revoked since may still be served by this device.
    pub stale: bool,
}

/// Where a revocation list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListSource {
    /// The hub's own refresh, in a session with the hub: its list replaces the one held.
    Hub,
    /// A sibling's welcome: taken only if it verifies and is newer.
    Sibling,
}

/// What `purge` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeReport {
    /// The time retention was enforced as of.
    pub as_of: UnixSeconds,
    /// The horizon: partitions of earlier days are gone.
    pub horizon: Day,
    /// Days dropped.
    pub dropped: Vec<Day>,
    /// Expired days kept one more day because the hub may not hold them yet.
    pub kept_unsynced: Vec<Day>,
}

/// The staff PIN as stored: the argon2id hash of the PIN under a random salt, as a PHC string
/// (`$argon2id$v=19$m=19456,t=4,p=1$<salt>$<hash>`). The PIN itself is never stored.
///
/// What this buys, honestly: a PIN of 4 to 12 digits has at most 10^4 to 10^12 values, and a
/// 4-digit one only 10^4. Argon2id at ~50 ms and 19 MiB a guess makes trying every 4-digit PIN
/// against a copied store cost about 10^4 x 50 ms, some minutes per device on one core, instead
/// of the seconds a fast hash allowed; it does not make a short PIN safe. The real protections
/// are that the store is readable by its owner only and the kiosk's wrong-PIN lockout
/// (`pin_guard`) against guessing online.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "StoredPin", into = "StoredPin")]
pub struct StaffPin {
    phc: String,
}

/// The `staff_pin` setting's JSON forms.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StoredPin {
    /// The form this code writes: `{"version": 2, "argon2id": PHC string}`.
    Argon2id { version: u32, argon2id: String },
    /// Earlier releases' form (version 1): `{salt, hash}`, a salted BLAKE3 stretch cheap
    /// enough to brute-force a 4-digit PIN in seconds. Never verified: [`Device::open`]
    /// removes it and the PIN must be set again.
    LegacyBlake3 {
        #[serde(with = "hex32")]
        salt: [u8; 32],
        #[serde(with = "hex32")]
        hash: [u8; 32],
    },
}

impl From<StaffPin> for StoredPin {
    fn from(p: StaffPin) -> StoredPin {
        StoredPin::Argon2id {
            version: STAFF_PIN_FORM,
            argon2id: p.phc,
        }
    }
}

impl TryFrom<StoredPin> for StaffPin {
    type Error = String;

    fn try_from(stored: StoredPin) -> Result<StaffPin, String> {
        match stored {
            StoredPin::Argon2id { version, argon2id } if version == STAFF_PIN_FORM => {
                check_pin_hash(&argon2id)?;
                Ok(StaffPin { phc: argon2id })
            }
            StoredPin::Argon2id { version, .. } => Err(format!(
                "staff PIN form version {version} is not one this release reads"
            )),
            StoredPin::LegacyBlake3 { .. } => {
                Err("the staff PIN is in an earlier release's form; set it again".into())
            }
        }
    }
}

/// Checks a stored PHC string: argon2id, with a salt and a hash, parameters within bounds.
fn check_pin_hash(phc: &str) -> Result<(), String> {
    let hash = argon2::PasswordHash::new(phc).map_err(|e| format!("staff PIN hash: {e}"))?;
    if hash.algorithm != argon2::ARGON2ID_IDENT || hash.salt.is_none() || hash.hash.is_none() {
        return Err("the staff PIN hash is not an argon2id hash with salt".into());
    }
    let params = argon2::Params::try_from(&hash).map_err(|e| format!("staff PIN hash: {e}"))?;
    if params.m_cost() > STAFF_PIN_MAX_M_KIB
        || params.t_cost() > STAFF_PIN_MAX_T
        || params.p_cost() > STAFF_PIN_MAX_P
    {
        return Err("the staff PIN hash's argon2 parameters are out of bounds".into());
    }
    Ok(())
}

fn staff_pin_hasher() -> Result<argon2::Argon2<'static>, DeviceError> {
    let params = argon2::Params::new(
        STAFF_PIN_ARGON2_M_KIB,
        STAFF_PIN_ARGON2_T,
        STAFF_PIN_ARGON2_P,
        None,
    )
    .map_err(|e| DeviceError::PinHash(e.to_string()))?;
    Ok(argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params,
    ))
}

impl std::fmt::Debug for StaffPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaffPin(..)")
    }
}

impl StaffPin {
    /// Hashes a new PIN with argon2id under a fresh 16-byte salt; refuses a PIN that is not
    /// [`STAFF_PIN_MIN_NEW_DIGITS`] (6) to 12 digits. Costs ~50 ms and 19 MiB: call it outside the device lock.
    pub fn new(pin: &str) -> Result<StaffPin, DeviceError> {
        use argon2::PasswordHasher;
        validate_staff_pin(pin)?;
        if pin.len() < STAFF_PIN_MIN_NEW_DIGITS {
            return Err(DeviceError::BadPin);
        }
        let mut salt = [0u8; 16];
        OsRng.fill_bytes(&mut salt);
        let salt = argon2::password_hash::SaltString::encode_b64(&salt)
            .map_err(|e| DeviceError::PinHash(e.to_string()))?;
        let phc = staff_pin_hasher()?
            .hash_password(pin.as_bytes(), &salt)
            .map_err(|e| DeviceError::PinHash(e.to_string()))?
            .to_string();
        Ok(StaffPin { phc })
    }

    /// Whether `pin` is this PIN. It recomputes argon2id with the stored salt and parameters
    /// (~50 ms, so call it outside the device lock) and compares the outputs in constant time
    /// (`password_hash::Output`'s `==`).
    pub fn matches(&self, pin: &str) -> bool {
        use argon2::PasswordVerifier;
        if validate_staff_pin(pin).is_err() {
            return false;
        }
        let Ok(hash) = argon2::PasswordHash::new(&self.phc) else {
            return false;
        };
        argon2::Argon2::default()
            .verify_password(pin.as_bytes(), &hash)
            .is_ok()
    }
}

/// Checks a staff PIN's form: 4 to 12 ASCII digits.
pub fn validate_staff_pin(pin: &str) -> Result<(), DeviceError> {
    if STAFF_PIN_DIGITS.contains(&pin.len()) && pin.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(DeviceError::BadPin)
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(D::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| D::Error::custom("expected 32 bytes"))
    }
}

const K_ENROLLMENT: &str = "enrollment";
const K_CREDENTIAL: &str = "credential";
const K_KEYRING: &str = "keyring";
const K_DAY_KEYS: &str = "day_keys";
const K_SEEN_KEY: &str = "seen_key";
const K_ENDPOINT_KEY: &str = "endpoint_key";
const K_SKEW: &str = "skew";
const K_LAST_SYNC: &str = "last_sync";
const K_CLOCK_OFFSET: &str = "clock_offset";
const K_ROSTER: &str = "roster";
/// The newest hub-signed revocation list this device holds (`shared::revocation`), as a
/// device of before two hubs per region stored it; read as one more list.
const K_REVOCATIONS: &str = "revocations";
/// The prefix of the row holding the newest list one hub signed: `revocations:<endpoint id>`.
const K_REVOCATIONS_BY: &str = "revocations:";
/// The region's other hub (JSON `PeerHub`); absent in a region of one hub.
const K_PEER_HUB: &str = "peer_hub";
/// Hubs this device knew and no longer does (replaced by a rebuilt hub): JSON list of
/// endpoint ids whose revocation lists still count (revocations are never withdrawn).
const K_RETIRED_HUBS: &str = "retired_hubs";
/// The hubs that have admitted this device (JSON list of endpoint ids): the enrollment
/// credential is not sent to them again, and is dropped once every hub of the region has.
const K_ADMITTED_BY: &str = "admitted_by";
/// The last completed sync with each hub (JSON map endpoint id -> Unix seconds).
const K_HUB_SYNCS: &str = "hub_syncs";
/// The endpoint id of the hub whose session completed last: dialled first.
const K_LAST_HUB: &str = "last_hub";
/// How many session keys were wrapped to one hub only while a peer hub was known.
const K_SINGLE_HUB_WRAPS: &str = "single_hub_wraps";
const K_STAFF_PIN: &str = "staff_pin";
const K_STAFF_PIN_RESET: &str = "staff_pin_reset";
const K_STAFF_PIN_SHORT: &str = "staff_pin_short";

fn store_path(dir: &Path) -> PathBuf {
    dir.join("edge.redb")
}

/// An open, enrolled device.
pub struct Device {
    dir: PathBuf,
    store: Store,
    enrollment: Enrollment,
    keyring: Keyring,
    day_keys: Vec<DayPublicKey>,
    /// The region's other hub, with its day keys, when the region runs two.
    peer: Option<PeerHub>,
    seen_key: [u8; 32],
    skew: u64,
    actor: Vec<u8>,
    partitions: BTreeMap<Day, (Partition, usize)>,
    /// The session key of the current UTC day, if a record was sealed today. Never a key of
    /// another day: a stolen, running device can open at most today's records.
    session: Option<DaySession>,
}

/// The session key sealing the current day's records, and the day of the hub key it was
/// wrapped to (earlier than its own day when the device ran out of day keys).
struct DaySession {
    key: SessionKey,
    key_day: Day,
    /// Wrapped to one hub only while a peer hub was known.
    single_hub: bool,
}

impl DaySession {
    fn held(&self) -> HeldSession {
        HeldSession {
            day: self.key.day(),
            key_day: self.key_day,
        }
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl Device {
    /// Enrolls a new device from a ticket file; works offline.
    pub fn init(dir: &Path, ticket_path: &Path, now: UnixSeconds) -> Result<Device, DeviceError> {
        let bytes = read_ticket(ticket_path)?;
        let ticket = EnrollmentTicket::parse(&bytes).map_err(|source| DeviceError::Ticket {
            path: ticket_path.display().to_string(),
            source,
        })?;
        std::fs::create_dir_all(dir).map_err(|source| DeviceError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let store = Store::open(&store_path(dir))?;
        if let Some(raw) = store.get(K_ENROLLMENT)? {
            let id = serde_json::from_slice::<Enrollment>(&raw)
                .map(|e| e.device_id.to_string())
                .unwrap_or_else(|_| "?".into());
            return Err(DeviceError::AlreadyEnrolled(dir.display().to_string(), id));
        }
        let enrollment = Enrollment {
            facility: ticket.facility.clone(),
            device_id: ticket.device_id.clone(),
            device_name: ticket.device_name.clone(),
            hub: ticket.hub.clone(),
            authority_recipient: ticket.authority_recipient.clone(),
            enrolled_at: now,
        };
        let mut seen_key = [0u8; 32];
        OsRng.fill_bytes(&mut seen_key);
        let mut endpoint_key = [0u8; 32];
        OsRng.fill_bytes(&mut endpoint_key);
        let keyring = serde_json::to_vec(&ticket.keyring).unwrap_or_default();
        store.put(&[
            (K_CREDENTIAL, &ticket.credential.0),
            (K_KEYRING, &keyring),
            (K_DAY_KEYS, &json(&ticket.day_keys)),
            // A ticket without a peer hub writes `null`: a region of one hub.
            (K_PEER_HUB, &json(&ticket.peer_hubs.first())),
            (K_SEEN_KEY, &seen_key),
            (K_ENDPOINT_KEY, &endpoint_key),
            (K_SKEW, &json(&DEFAULT_SKEW)),
            // Written last in the same transaction: its presence means "enrolled".
            (K_ENROLLMENT, &json(&enrollment)),
        ])?;
        drop(store);
        Device::open(dir)
    }

    /// Opens an enrolled device's data folder.
    pub fn open(dir: &Path) -> Result<Device, DeviceError> {
        let path = store_path(dir);
        if !path.exists() {
            return Err(DeviceError::NotEnrolled(dir.display().to_string()));
        }
        let store = Store::open(&path)?;
        let damaged =
            |what: &str| DeviceError::Damaged(what.to_owned(), path.display().to_string());
        let enrollment: Enrollment = match store.get(K_ENROLLMENT)? {
            Some(raw) => serde_json::from_slice(&raw).map_err(|_| damaged("enrollment"))?,
            None => return Err(DeviceError::NotEnrolled(dir.display().to_string())),
        };
        let keyring: Keyring = store
            .get(K_KEYRING)?
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .ok_or_else(|| damaged("keyring"))?;
        let day_keys: Vec<DayPublicKey> = store
            .get(K_DAY_KEYS)?
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .ok_or_else(|| damaged("day keys"))?;
        let seen_key: [u8; 32] = store
            .get(K_SEEN_KEY)?
            .and_then(|raw| raw.try_into().ok())
            .ok_or_else(|| damaged("seen key"))?;
        // A damaged peer row leaves the device with its enrolled hub, which still works.
        let peer: Option<PeerHub> = match store.get(K_PEER_HUB)? {
            None => None,
            Some(raw) => serde_json::from_slice(&raw).unwrap_or_else(|e| {
                tracing::warn!("the stored peer hub does not parse ({e}); ignoring it");
                None
            }),
        };
        let skew = store
            .get(K_SKEW)?
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or(DEFAULT_SKEW);
        migrate_staff_pin(&store)?;
        // A fresh automerge actor per process: a change lost in a crash must never be
        // re-made under the same actor and sequence number with other content.
        let actor = shared::partition::session_actor(&enrollment.device_id, &mut OsRng).to_vec();
        Ok(Device {
            dir: dir.to_owned(),
            store,
            enrollment,
            keyring,
            day_keys,
            peer,
            seen_key,
            skew,
            actor,
            partitions: BTreeMap::new(),
            session: None,
        })
    }

    /// The enrollment.
    pub fn enrollment(&self) -> &Enrollment {
        &self.enrollment
    }

    /// The trusted issuer keys.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The clock tolerance for code expiry.
    pub fn skew(&self) -> u64 {
        self.skew
    }

    /// Sets the clock tolerance for code expiry.
    pub fn set_skew(&mut self, skew: u64) -> Result<(), DeviceError> {
        self.store.put(&[(K_SKEW, &json(&skew))])?;
        self.skew = skew;
        Ok(())
    }

    /// Sets (or replaces) the staff PIN that opens the kiosk's staff mode.
    pub fn set_staff_pin(&mut self, pin: &StaffPin) -> Result<(), DeviceError> {
        self.store.put(&[(K_STAFF_PIN, &json(pin))])?;
        self.store.remove(K_STAFF_PIN_RESET)?;
        self.store.remove(K_STAFF_PIN_SHORT)?;
        Ok(())
    }

    /// Notes that the stored staff PIN (set by an earlier release) has fewer than
    /// [`STAFF_PIN_MIN_NEW_DIGITS`] digits, as the kiosk saw when it was used; `status` warns
    /// until a new one is set.
    pub fn note_short_staff_pin(&self) -> Result<(), DeviceError> {
        if self.store.get(K_STAFF_PIN_SHORT)?.is_none() {
            self.store.put(&[(K_STAFF_PIN_SHORT, b"true")])?;
        }
        Ok(())
    }

    /// The stored staff PIN, if one was set.
    pub fn staff_pin(&self) -> Result<Option<StaffPin>, DeviceError> {
        match self.store.get(K_STAFF_PIN)? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw).map(Some).map_err(|_| {
                DeviceError::Damaged(
                    "staff PIN".into(),
                    store_path(&self.dir).display().to_string(),
                )
            }),
        }
    }

    /// The store (for the sync shell).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The enrollment credential, until the hub has bound this device.
    pub fn credential(&self) -> Result<Option<Credential>, DeviceError> {
        Ok(self
            .store
            .get(K_CREDENTIAL)?
            .and_then(|raw| <[u8; 32]>::try_from(raw).ok())
            .map(Credential))
    }

    /// The iroh secret key bytes of this device.
    pub fn endpoint_key(&self) -> Result<[u8; 32], DeviceError> {
        self.store
            .get(K_ENDPOINT_KEY)?
            .and_then(|raw| raw.try_into().ok())
            .ok_or_else(|| {
                DeviceError::Damaged(
                    "endpoint key".into(),
                    store_path(&self.dir).display().to_string(),
                )
            })
    }

    /// Verifies a code's text and, if it passes, stores the visit durably.
    ///
    /// A rejected code is a result (`Ok` with its verdict); `Err` means the device could not
    /// do its job (the store failed) and nothing was recorded.
    pub fn check_in(&mut self, now: UnixSeconds, text: &str) -> Result<CheckIn, DeviceError> {
        let scanner = Scanner {
            keyring: &self.keyring,
            skew: self.skew,
            seen_key: &self.seen_key,
            facility: &self.enrollment.facility.id,
            device: &self.enrollment.device_id,
        };
        let store = &self.store;
        match scanner.scan(now, text, |hash| store.seen(hash, now))? {
            ScanVerdict::Refuse(verdict) => {
                crate::metrics::note_verdict(verdict);
                Ok(CheckIn {
                    verdict,
                    record: None,
                })
            }
            ScanVerdict::Accept { record, seen } => {
                let id = self.append(now, Day::of(now), &record, Some((seen.hash, seen.until)))?;
                crate::metrics::note_verdict(Verdict::Accepted);
                Ok(CheckIn {
                    verdict: Verdict::Accepted,
                    record: Some(id),
                })
            }
        }
    }

    /// Records a paper-log visitor, sealed to the health authority inside and under the
    /// session key outside. `minor`: the visitor is under 14, so the entry needs the
    /// guardian's consent (`shared::device::check_paper`, with the visit-time rules).
    pub fn add_paper(
        &mut self,
        now: UnixSeconds,
        entry: &PaperEntry,
        minor: bool,
    ) -> Result<RecordId, DeviceError> {
        let day = shared::device::check_paper(entry, minor, now, self.skew)?;
        let sealed = entry.seal_for_authority(&self.enrollment.authority_recipient)?;
        let record = Record {
            facility: self.enrollment.facility.id.clone(),
            device: self.enrollment.device_id.clone(),
            scanned_at: entry.visited_at,
            body: RecordBody::Paper {
                sealed_for_authority: sealed,
            },
        };
        self.append(now, day, &record, None)
    }

    /// The region's other hub, when it runs two.
    pub fn peer_hub(&self) -> Option<&PeerHub> {
        self.peer.as_ref()
    }

    /// The endpoint ids of the region's hubs this device knows: the enrolled hub's, then the
    /// peer's.
    pub fn region_hubs(&self) -> Vec<String> {
        let mut out = vec![self.enrollment.hub.endpoint_id.clone()];
        out.extend(self.peer.iter().map(|p| p.contact.endpoint_id.clone()));
        out
    }

    /// Whether `endpoint` is the enrolled hub (not the peer).
    fn is_enrolled_hub(&self, endpoint: &str) -> bool {
        self.enrollment
            .hub
            .endpoint_id
            .eq_ignore_ascii_case(endpoint)
    }

    /// Whether `endpoint` is one of the region's hubs this device knows.
    pub fn is_region_hub(&self, endpoint: &str) -> bool {
        self.region_hubs()
            .iter()
            .any(|h| h.eq_ignore_ascii_case(endpoint))
    }

    /// The hub of the region other than `endpoint`, as a peer hub (contact at the addresses
    /// this device dials, day keys): what a refresh from `endpoint` describes as its peer.
    pub fn other_hub(&self, endpoint: &str) -> Option<PeerHub> {
        if self.is_enrolled_hub(endpoint) {
            return self.peer.clone();
        }
        let mut contact = self.enrollment.hub.clone();
        contact.addrs = crate::hub_addrs::current(self);
        Some(PeerHub {
            contact,
            day_keys: self.day_keys.clone(),
        })
    }

    /// The day keys this device holds for the hub `endpoint`.
    pub fn hub_day_keys(&self, endpoint: &str) -> &[DayPublicKey] {
        match &self.peer {
            Some(p) if !self.is_enrolled_hub(endpoint) => &p.day_keys,
            _ => &self.day_keys,
        }
    }

    /// The hubs that have admitted this device.
    fn admitted_by(&self) -> Result<Vec<String>, DeviceError> {
        Ok(self
            .store
            .get(K_ADMITTED_BY)?
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default())
    }

    /// The enrollment credential to send to hub `endpoint`: until that hub has admitted this
    /// device once (hubs replicate the binding, but one may not have it yet).
    pub fn credential_for(&self, endpoint: &str) -> Result<Option<Credential>, DeviceError> {
        if self
            .admitted_by()?
            .iter()
            .any(|h| h.eq_ignore_ascii_case(endpoint))
        {
            return Ok(None);
        }
        self.credential()
    }

    /// Hub `endpoint` admitted this device: the credential is not sent to it again, and is
    /// dropped once every hub of the region has admitted the device.
    pub fn admitted_by_hub(&self, endpoint: &str) -> Result<(), DeviceError> {
        let mut admitted = self.admitted_by()?;
        if !admitted.iter().any(|h| h.eq_ignore_ascii_case(endpoint)) {
            admitted.push(endpoint.to_owned());
            self.store.put(&[(K_ADMITTED_BY, &json(&admitted))])?;
        }
        if self
            .region_hubs()
            .iter()
            .all(|h| admitted.iter().any(|a| a.eq_ignore_ascii_case(h)))
        {
            self.forget_credential()?;
        }
        Ok(())
    }

    /// The endpoint id of the hub whose session completed last, if any.
    pub fn last_hub(&self) -> Option<String> {
        self.store
            .get(K_LAST_HUB)
            .ok()
            .flatten()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
    }

    fn hub_syncs(&self) -> Result<BTreeMap<String, UnixSeconds>, DeviceError> {
        Ok(self
            .store
            .get(K_HUB_SYNCS)?
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default())
    }
    /// The partition of `day`, loaded from the store on first use.
    pub fn partition(&mut self, day: Day) -> Result<&mut Partition, DeviceError> {
        let (p, _) = load_partition(
            &mut self.partitions,
            &self.store,
            &self.actor,
            &self.enrollment.facility.id,
            day,
        )?;
        Ok(p)
    }

    /// Seals `record` and makes it durable as a pending row of its day, with the seen-token
    /// entry and the day's count, in one transaction. The partition itself is not touched:
    /// [`Device::fold_pending`] folds the rows into it as one change when a sync starts.
    fn append(
        &mut self,
        now: UnixSeconds,
        day: Day,
        record: &Record,
        seen: Option<([u8; 32], UnixSeconds)>,
    ) -> Result<RecordId, DeviceError> {
        self.end_past_sessions(now);
        let keep = match session_plan(self.session.as_ref().map(DaySession::held), day, now) {
            SessionPlan::Reuse => None,
            SessionPlan::Fresh { keep } => Some(keep),
        };
        let fresh = match keep {
            None => None,
            Some(_) => {
                let no_peer_keys = Vec::new();
                let peer_keys = self.peer.as_ref().map_or(&no_peer_keys, |p| &p.day_keys);
                let to = seal_keys(&self.day_keys, peer_keys, day, now)
                    .ok_or(DeviceError::NoDayKey(day))?;
                let key = SessionKey::generate(&mut OsRng, day);
                let wrapped = key
                    .wrap_to(&to.keys())
                    .map_err(|e| DeviceError::Seal(e.to_string()))?;
                Some((
                    DaySession {
                        key,
                        key_day: to.key_day,
                        single_hub: to.single_hub(self.peer.is_some()),
                    },
                    wrapped,
                ))
            }
        };
        let session = match (&fresh, &self.session) {
            (Some((s, _)), _) | (None, Some(s)) => s,
            (None, None) => return Err(DeviceError::NoDayKey(day)),
        };
        let id = PartitionId {
            facility: self.enrollment.facility.id.clone(),
            day,
        };
        let record_id = RecordId::random(&mut OsRng);
        let envelope = session
            .key
            .seal(&mut OsRng, &id, record_id, record)
            .map_err(|e| DeviceError::Seal(e.to_string()))?;
        let fallback_key_day = fallback_key_day(day, session.key_day);
        let mut rows = Vec::with_capacity(2);
        if let Some((_, wrapped)) = &fresh {
            rows.push(Pending::Key(wrapped.clone()));
        }
        rows.push(Pending::Record(record_id, envelope));
        self.store.commit_check_in(&CheckInWrite {
            day,
            chunk: &[],
            pending: &rows,
            seen,
            new_records: 1,
            prune_before: seen_prune_before(now, self.skew),
            fallback_key_day,
        })?;
        if let Some((s, _)) = &fresh
            && s.single_hub
        {
            // A figure for `status`: the record is stored whatever becomes of it.
            let n = self.single_hub_wraps().saturating_add(1);
            if let Err(e) = self.store.put(&[(K_SINGLE_HUB_WRAPS, &json(&n))]) {
                tracing::warn!("cannot count a single-hub wrap: {e}");
            }
        }
        // A key for another day (a paper entry written up later) seals this one record and
        // is dropped, wiped, here; only today's key stays for the next visitor.
        if let Some((s, _)) = fresh
            && keep == Some(true)
        {
            self.session = Some(s);
        }
        Ok(record_id)
    }

    /// Drops the session key unless it is `now`'s day's: a new day starts a new key, so a
    /// running device holds no key that opens an earlier day's records. [`Device::append`]
    /// does this on every record; the daemon calls it on a timer so a quiet device lets go of
    /// yesterday's key soon after midnight UTC too. Returns whether a key was dropped.
    pub fn end_past_sessions(&mut self, now: UnixSeconds) -> bool {
        if self
            .session
            .as_ref()
            .is_some_and(|s| session_ended(s.held(), now))
        {
            // `SessionKey` wipes its bytes on drop.
            self.session = None;
            true
        } else {
            false
        }
    }

    /// The days whose session keys this device holds in memory (at most one: today).
    pub fn session_days(&self) -> Vec<Day> {
        self.session.iter().map(|s| s.key.day()).collect()
    }

    /// Folds every pending check-in into its day's partition: in pending order, at most
    /// [`MAX_RECORDS_PER_CHANGE`] records and [`MAX_FOLD_BYTES`] of values per automerge
    /// change, each change stored and its pending rows deleted in one transaction. Returns the
    /// records folded. A sync session starts with this ([`Device::preload`]), so a batch of
    /// visits made offline travels as a few changes instead of one per visit (design property
    /// 6), and none too big for a peer to take. A failure leaves the rows of the changes not
    /// yet stored pending, for the next fold.
    ///
    /// A damaged pending row (disk corruption) is left where it is, and reported.
    pub fn fold_pending(&mut self) -> Result<u64, DeviceError> {
        self.fold_pending_in(MAX_RECORDS_PER_CHANGE, MAX_FOLD_BYTES)
    }

    /// [`Device::fold_pending`] with its bounds as arguments, so tests can use small ones.
    fn fold_pending_in(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<u64, DeviceError> {
        let mut total = 0;
        for day in self.store.pending_days()? {
            let mut keys = Vec::new();
            let mut records = Vec::new();
            let mut folded = Vec::new();
            let mut bytes = 0;
            let rows = self.store.pending(day)?;
            let last = rows.len();
            for (i, (seq, row)) in rows.into_iter().enumerate() {
                match row {
                    Some(Pending::Key(k)) => {
                        bytes += k.to_bytes().len();
                        keys.push(k);
                        folded.push(seq);
                    }
                    Some(Pending::Record(id, e)) => {
                        bytes += e.len();
                        records.push((id, e));
                        folded.push(seq);
                    }
                    None => {
                        tracing::warn!(day = %day, seq, "a pending check-in row is damaged; left in place");
                    }
                }
                let full = records.len() >= max_records || bytes >= max_bytes;
                if folded.is_empty() || !(full || i + 1 == last) {
                    continue;
                }
                let result = self.fold_day(day, &keys, &records, &folded);
                if result.is_err() {
                    // Memory may be ahead of the disk: forget it and reload next time.
                    self.partitions.remove(&day);
                }
                total += result?;
                keys.clear();
                records.clear();
                folded.clear();
                bytes = 0;
            }
        }
        Ok(total)
    }

    fn fold_day(
        &mut self,
        day: Day,
        keys: &[WrappedKey],
        records: &[(RecordId, Envelope)],
        folded: &[u64],
    ) -> Result<u64, DeviceError> {
        let (partition, chunks) = load_partition(
            &mut self.partitions,
            &self.store,
            &self.actor,
            &self.enrollment.facility.id,
            day,
        )?;
        let new = partition
            .insert_batch(keys, records)
            .map_err(|e| DeviceError::Partition(partition.id().to_string(), e))?;
        let chunk = partition.save_incremental();
        self.store.fold(day, &chunk, folded)?;
        *chunks += 1;
        if *chunks > COMPACT_AFTER_CHUNKS {
            let full = partition.save();
            let records = partition.record_count() as u64;
            self.store.replace_partition(day, &full, records)?;
            *chunks = 1;
        }
        Ok(new as u64)
    }

    /// Days for which this device holds a partition, live at `now`.
    pub fn live_days(&self, now: UnixSeconds) -> Result<Vec<Day>, DeviceError> {
        let h = horizon(now);
        let mut days: Vec<Day> = self
            .store
            .days()?
            .into_iter()
            .map(|(d, _, _)| d)
            .filter(|d| *d >= h)
            .collect();
        days.extend(self.partitions.keys().copied().filter(|d| *d >= h));
        days.sort_unstable();
        days.dedup();
        Ok(days)
    }

    /// Folds pending check-ins, then loads every live partition into memory (sync summaries
    /// need them).
    pub fn preload(&mut self, now: UnixSeconds) -> Result<(), DeviceError> {
        self.fold_pending()?;
        for day in self.live_days(now)? {
            self.partition(day)?;
        }
        Ok(())
    }

    /// The live partitions already in memory (see [`Device::preload`]).
    pub fn loaded_partitions(&self, now: UnixSeconds) -> Result<Vec<&Partition>, DeviceError> {
        let h = horizon(now);
        Ok(self
            .partitions
            .iter()
            .filter(|(d, _)| **d >= h)
            .map(|(_, (p, _))| p)
            .collect())
    }

    /// Whether the device holds (on disk or in memory) a partition of `day`.
    pub fn has_partition(&self, day: Day) -> Result<bool, DeviceError> {
        Ok(self.partitions.contains_key(&day)
            || self.store.days()?.iter().any(|(d, _, _)| *d == day))
    }

    /// Makes what a sync merged into the partition of `day` durable: one chunk, one
    /// transaction, like a check-in.
    pub fn persist_partition(&mut self, day: Day, new_records: u64) -> Result<(), DeviceError> {
        let (partition, chunks) = load_partition(
            &mut self.partitions,
            &self.store,
            &self.actor,
            &self.enrollment.facility.id,
            day,
        )?;
        let chunk = partition.save_incremental();
        if chunk.is_empty() {
            return Ok(());
        }
        let result = self.store.commit_check_in(&CheckInWrite {
            day,
            chunk: &chunk,
            pending: &[],
            seen: None,
            new_records,
            prune_before: 0,
            fallback_key_day: None,
        });
        if let Err(e) = result {
            self.partitions.remove(&day);
            return Err(e.into());
        }
        *chunks += 1;
        Ok(())
    }

    /// After a completed hub session: the hub holds every record of every live partition
    /// but those of `refused` days (the hub refused their changes in this session; they stay
    /// unsynced, so status shows them and retention keeps their grace day).
    pub fn mark_synced_with_hub(
        &mut self,
        now: UnixSeconds,
        hub_clock_offset: Option<i64>,
        refused: &[Day],
    ) -> Result<(), DeviceError> {
        let hub = self.enrollment.hub.endpoint_id.clone();
        self.mark_synced_with(&hub, now, hub_clock_offset, refused)
    }

    /// [`Device::mark_synced_with_hub`] after a session with hub `endpoint` (a day counts as
    /// delivered when any hub holds it): that hub's last sync, and it is dialled first next.
    pub fn mark_synced_with(
        &mut self,
        endpoint: &str,
        now: UnixSeconds,
        hub_clock_offset: Option<i64>,
        refused: &[Day],
    ) -> Result<(), DeviceError> {
        for day in self.live_days(now)? {
            if refused.contains(&day) {
                continue;
            }
            let n = self.partition(day)?.record_count() as u64;
            self.store.set_synced(day, n)?;
        }
        let mut syncs = self.hub_syncs()?;
        syncs.insert(endpoint.to_owned(), now);
        syncs.retain(|h, _| self.is_region_hub(h));
        let mut entries: Vec<(&str, Vec<u8>)> = vec![
            (K_LAST_SYNC, json(&now)),
            (K_HUB_SYNCS, json(&syncs)),
            (K_LAST_HUB, json(&endpoint)),
        ];
        if let Some(off) = hub_clock_offset {
            entries.push((K_CLOCK_OFFSET, json(&off)));
        }
        let refs: Vec<(&str, &[u8])> = entries.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        self.store.put(&refs)?;
        Ok(())
    }

    /// The hub has bound this device: the ticket's credential is spent.
    pub fn forget_credential(&self) -> Result<(), DeviceError> {
        Ok(self.store.remove(K_CREDENTIAL)?)
    }

    /// Applies the enrolled hub's refresh ([`Device::apply_refresh_from`]).
    pub fn apply_refresh(&mut self, refresh: &shared::ticket::Refresh) -> Result<(), DeviceError> {
        let hub = self.enrollment.hub.endpoint_id.clone();
        self.apply_refresh_from(&hub, refresh)
    }

    /// Applies the refresh of hub `from` (the endpoint this device dialled, one of its
    /// region's hubs): that hub's newer day keys and addresses, the current keyring, the
    /// sibling roster, the revocation list, and what it says of the region's other hub
    /// (`shared::device::peer_hub_update`: mapped by endpoint id, a rebuilt hub with a new id
    /// replacing the one it rebuilds). A refresh of an endpoint that is not one of the
    /// region's hubs is ignored.
    pub fn apply_refresh_from(
        &mut self,
        from: &str,
        refresh: &shared::ticket::Refresh,
    ) -> Result<(), DeviceError> {
        if !self.is_region_hub(from) {
            tracing::warn!(
                hub = from,
                "ignoring a refresh of a hub this device does not know"
            );
            return Ok(());
        }
        fn merge(held: &[DayPublicKey], new: &[DayPublicKey]) -> Vec<DayPublicKey> {
            let mut keys: BTreeMap<Day, DayPublicKey> =
                held.iter().map(|k| (k.day, k.clone())).collect();
            for k in new {
                keys.insert(k.day, k.clone());
            }
            keys.into_values().collect()
        }
        let from_enrolled = self.is_enrolled_hub(from);
        let enrollment = self.enrollment.clone();
        let mut enrolled_keys = self.day_keys.clone();
        let mut peer = self.peer.clone();
        // The enrolled hub's addresses to store, when they change.
        let mut enrolled_addrs: Option<Vec<String>> = None;
        let mut retired: Vec<String> = Vec::new();
        if from_enrolled {
            enrolled_keys = merge(&enrolled_keys, &refresh.day_keys);
            enrolled_addrs.clone_from(&refresh.hub_addrs);
        } else if let Some(p) = peer.as_mut() {
            p.day_keys = merge(&p.day_keys, &refresh.day_keys);
            if let Some(list) = &refresh.hub_addrs {
                match shared::hub_addr::parse_list(list) {
                    Ok(a) => p.contact.addrs = a.iter().map(ToString::to_string).collect(),
                    Err(e) => tracing::warn!("ignoring the peer hub's addresses: {e}"),
                }
            }
        }
        if let Some(offered) = &refresh.peer_hub {
            let known = self.region_hubs();
            let known: Vec<&str> = known.iter().map(String::as_str).collect();
            let enrolled_id = enrollment.hub.endpoint_id.clone();
            match peer_hub_update(&enrollment.hub.region, from, &enrolled_id, &known, offered) {
                PeerHubUpdate::Update if from_enrolled => {
                    // The peer as the enrolled hub relays it: its addresses only while the
                    // peer has never answered this device itself, its keys only for days the
                    // device holds none of.
                    let first_hand = self.admitted_by()?;
                    if let Some(p) = peer.as_mut() {
                        if !first_hand
                            .iter()
                            .any(|h| h.eq_ignore_ascii_case(&p.contact.endpoint_id))
                        {
                            p.contact.addrs.clone_from(&offered.contact.addrs);
                        }
                        p.day_keys = shared::device::relayed_keys(&p.day_keys, &offered.day_keys);
                    }
                }
                PeerHubUpdate::Update => {
                    // The enrolled hub as the peer relays it: never its addresses (the device
                    // got them first-hand), its keys only for days the device holds none of.
                    enrolled_keys = shared::device::relayed_keys(&enrolled_keys, &offered.day_keys);
                }
                PeerHubUpdate::Replace if from_enrolled => {
                    tracing::info!(
                        hub = %offered.contact.endpoint_id,
                        "the hub names a new peer hub for the region"
                    );
                    retired.extend(peer.as_ref().map(|p| p.contact.endpoint_id.clone()));
                    peer = Some(offered.clone());
                }
                PeerHubUpdate::Replace => {
                    // Only the enrolled hub may name a hub the device does not know
                    // (`peer_hub_update`); a device that knew only its peer takes it as peer.
                    tracing::info!(
                        hub = %offered.contact.endpoint_id,
                        "the region's other hub is named by the hub answering"
                    );
                    retired.extend(peer.as_ref().map(|p| p.contact.endpoint_id.clone()));
                    peer = Some(offered.clone());
                }
                PeerHubUpdate::Ignore(why) => {
                    tracing::warn!(hub = from, "ignoring the peer hub in the refresh: {why}");
                }
            }
        }
        // An empty keyring is never what a hub means to send: with it every visitor is
        // "unknown issuer" until the next good sync. Keep the keys this device trusts; a
        // withdrawn issuer key is removed by a refresh that still lists the others. No keyring
        // at all means the hub's is unchanged.
        let keyring = match &refresh.keyring {
            Some(k) if k.is_empty() && !self.keyring.is_empty() => {
                tracing::warn!(
                    trusted = self.keyring.len(),
                    "the hub sent an empty issuer keyring; keeping the keys this device trusts"
                );
                self.keyring.clone()
            }
            Some(k) => k.clone(),
            None => self.keyring.clone(),
        };
        let keys_json = json(&enrolled_keys);
        let keyring_json = json(&keyring);
        let peer_json = json(&peer);
        let mut rows: Vec<(&str, &[u8])> = vec![
            (K_DAY_KEYS, keys_json.as_slice()),
            (K_KEYRING, keyring_json.as_slice()),
            (K_PEER_HUB, peer_json.as_slice()),
        ];
        let enrollment_json = json(&enrollment);
        let mut all_retired = self.retired_hubs()?;
        if !retired.is_empty() {
            rows.push((K_ENROLLMENT, enrollment_json.as_slice()));
            all_retired.extend(retired.iter().cloned());
        }
        let retired_json = json(&all_retired);
        if !retired.is_empty() {
            rows.push((K_RETIRED_HUBS, retired_json.as_slice()));
        }
        if let Some(signed) = &refresh.revocations {
            self.take_revocations(signed, ListSource::Hub)?;
        }
        let roster_json = refresh.roster.as_ref().map(json);
        if let Some(r) = &roster_json {
            rows.push((K_ROSTER, r.as_slice()));
        }
        let hub_addrs_row = enrolled_addrs
            .as_deref()
            .and_then(crate::hub_addrs::accepted_row);
        if let Some(h) = &hub_addrs_row {
            rows.push((crate::hub_addrs::K_HUB_ADDRS, h.as_slice()));
        }
        self.store.put(&rows)?;
        self.enrollment = enrollment;
        self.day_keys = enrolled_keys;
        self.peer = peer;
        self.keyring = keyring;
        // A session wrapped to an earlier day's key for want of its own: now that its own key
        // may be here, the next record starts a session wrapped to it. Likewise a session
        // wrapped to one hub only, once both hubs' keys of its day are here.
        let both_hold = |day: Day| {
            self.day_keys.iter().any(|k| k.day == day)
                && self
                    .peer
                    .as_ref()
                    .is_some_and(|p| p.day_keys.iter().any(|k| k.day == day))
        };
        if self.session.as_ref().is_some_and(|s| {
            !session_survives_refresh(s.held()) || (s.single_hub && both_hold(s.key_day))
        }) {
            self.session = None;
        }
        Ok(())
    }

    fn retired_hubs(&self) -> Result<Vec<String>, DeviceError> {
        Ok(self
            .store
            .get(K_RETIRED_HUBS)?
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default())
    }

    /// What this device holds of the enrolled hub's refresh at `now`
    /// ([`Device::refresh_have_for`]).
    pub fn refresh_have(
        &self,
        now: UnixSeconds,
    ) -> Result<shared::ticket::RefreshHave, DeviceError> {
        let hub = self.enrollment.hub.endpoint_id.clone();
        self.refresh_have_for(now, Some(&hub))
    }

    /// What this device holds of hub `hub`'s refresh at `now`, for its hello: the hub then
    /// sends only the day keys it lacks, the keyring and roster when they changed, its list
    /// when the one it signed differs, and the region's other hub when that differs. To a
    /// sibling (`None`) only the revocation list matters: the newest this device holds.
    pub fn refresh_have_for(
        &self,
        now: UnixSeconds,
        hub: Option<&str>,
    ) -> Result<shared::ticket::RefreshHave, DeviceError> {
        let today = Day::of(now);
        let Some(hub) = hub else {
            return Ok(shared::ticket::RefreshHave::of(
                today,
                &self.day_keys,
                &self.keyring,
                &self.roster()?,
            )
            .with_hub_addrs(&crate::hub_addrs::current(self))
            .with_revocations(self.signed_revocations()?.as_ref().map(|s| &s.list)));
        };
        let addrs = match &self.peer {
            Some(p) if !self.is_enrolled_hub(hub) => p.contact.addrs.clone(),
            _ => crate::hub_addrs::current(self),
        };
        let signed_by = self
            .held_revocations()?
            .into_iter()
            .find(|(signer, _)| signer.eq_ignore_ascii_case(hub))
            .map(|(_, s)| s.list);
        Ok(shared::ticket::RefreshHave::of(
            today,
            self.hub_day_keys(hub),
            &self.keyring,
            &self.roster()?,
        )
        .with_hub_addrs(&addrs)
        .with_revocations(signed_by.as_ref())
        .with_peer(self.other_hub(hub).as_ref()))
    }

    /// The hubs whose signed lists this device holds to: the region's, and those it knew
    /// before a rebuilt hub replaced them (their revocations are not withdrawn).
    fn revocation_signers(&self) -> Result<Vec<String>, DeviceError> {
        let mut out = self.region_hubs();
        for r in self.retired_hubs()? {
            if !out.iter().any(|h| h.eq_ignore_ascii_case(&r)) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The newest signed revocation list this device holds of each hub that signed one,
    /// verified again against that hub's key (a store edited by hand holds nothing this device
    /// acts on): `(signer's endpoint id, list)`.
    pub fn held_revocations(
        &self,
    ) -> Result<Vec<(String, shared::revocation::SignedRevocations)>, DeviceError> {
        let signers = self.revocation_signers()?;
        let refs: Vec<&str> = signers.iter().map(String::as_str).collect();
        let mut rows = Vec::new();
        rows.extend(self.store.get(K_REVOCATIONS)?);
        for h in &signers {
            rows.extend(self.store.get(&format!("{K_REVOCATIONS_BY}{h}"))?);
        }
        let mut best: BTreeMap<usize, shared::revocation::SignedRevocations> = BTreeMap::new();
        for raw in rows {
            let Ok(signed) = serde_json::from_slice::<shared::revocation::SignedRevocations>(&raw)
            else {
                tracing::warn!("a stored revocation list does not parse; ignoring it");
                continue;
            };
            match signed.verify_by(&refs, &self.enrollment.facility.id) {
                Ok((i, list)) => {
                    if list.newer_than(best.get(&i).map(|s| &s.list)) {
                        best.insert(i, signed.clone());
                    }
                }
                Err(err) => {
                    tracing::warn!("a stored revocation list does not verify ({err}); ignoring it");
                }
            }
        }
        Ok(best
            .into_iter()
            .map(|(i, s)| (signers[i].clone(), s))
            .collect())
    }

    /// The newest of the signed revocation lists this device holds (of any of its region's
    /// hubs): what it hands a sibling.
    pub fn signed_revocations(
        &self,
    ) -> Result<Option<shared::revocation::SignedRevocations>, DeviceError> {
        Ok(self
            .held_revocations()?
            .into_iter()
            .map(|(_, s)| s)
            .max_by_key(|s| (s.list.version, s.list.issued_at)))
    }

    /// Every device any list this device holds revokes, as one list
    /// (`shared::revocation::union`): what it refuses.
    pub fn revocation_list(
        &self,
    ) -> Result<Option<shared::revocation::RevocationList>, DeviceError> {
        let held = self.held_revocations()?;
        Ok(shared::revocation::union(held.iter().map(|(_, s)| &s.list)))
    }

    /// Takes a revocation list if it is signed by one of this device's region's hubs for its
    /// facility, not of a lower version than the one of that hub held (from anyone) and, from
    /// a sibling, newer than it ([`ListSource`]); returns whether it was taken. Each hub's
    /// newest list is kept. A list that does not verify is ignored and counted, never stored.
    pub fn take_revocations(
        &mut self,
        signed: &shared::revocation::SignedRevocations,
        source: ListSource,
    ) -> Result<bool, DeviceError> {
        let hubs = self.region_hubs();
        let refs: Vec<&str> = hubs.iter().map(String::as_str).collect();
        let (signer, list) = match signed.verify_by(&refs, &self.enrollment.facility.id) {
            Ok((i, l)) => (hubs[i].clone(), l),
            Err(err) => {
                tracing::warn!(?source, "ignoring a revocation list: {err}");
                crate::metrics::note_revocation_list(false);
                return Ok(false);
            }
        };
        let held = self
            .held_revocations()?
            .into_iter()
            .find(|(h, _)| h.eq_ignore_ascii_case(&signer))
            .map(|(_, s)| s.list);
        if source == ListSource::Sibling && !list.newer_than(held.as_ref()) {
            return Ok(false);
        }
        // The list only grows: a lower version, even from the hub itself, would un-revoke
        // devices (a hub restored from an old backup, or rebuilt, must start above).
        if let Some(h) = held.as_ref().filter(|h| list.version < h.version) {
            tracing::error!(
                ?source,
                held = h.version,
                offered = list.version,
                "refusing a revocation list with a lower version than the one held: it would un-revoke devices (a rebuilt hub must issue versions above {})",
                h.version
            );
            crate::metrics::note_revocation_list(false);
            return Ok(false);
        }
        self.store.put(&[(
            format!("{K_REVOCATIONS_BY}{signer}").as_str(),
            json(signed).as_slice(),
        )])?;
        crate::metrics::note_revocation_list(true);
        tracing::info!(
            ?source,
            signer = %signer,
            version = list.version,
            issued_at = list.issued_at,
            "took a hub's revocation list"
        );
        Ok(true)
    }

    /// What `status` says of the revocations this device knows, at `now`.
    pub fn revocation_status(&self, now: UnixSeconds) -> Result<RevocationStatus, DeviceError> {
        let list = self.revocation_list()?;
        let last_sync: Option<UnixSeconds> = self
            .store
            .get(K_LAST_SYNC)?
            .and_then(|raw| serde_json::from_slice(&raw).ok());
        let age = shared::revocation::knowledge_age(list.as_ref(), last_sync, now);
        Ok(RevocationStatus {
            version: list.as_ref().map_or(0, |l| l.version),
            issued_at: list.as_ref().map(|l| l.issued_at),
            revoked_devices: list
                .iter()
                .flat_map(|l| l.devices.iter().map(|d| d.device_id.to_string()))
                .collect(),
            age_seconds: age,
            stale: shared::revocation::is_stale(age),
        })
    }

    /// How many session keys were wrapped to one hub only while a peer hub was known.
    pub fn single_hub_wraps(&self) -> u64 {
        self.store
            .get(K_SINGLE_HUB_WRAPS)
            .ok()
            .flatten()
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or(0)
    }

    /// What `status` says of each of the region's hubs at `now`.
    pub fn hub_status(&self, now: UnixSeconds) -> Result<Vec<HubStatus>, DeviceError> {
        let today = Day::of(now);
        let mut syncs = self.hub_syncs()?;
        if syncs.is_empty() {
            // A device of before two hubs per region synced with its enrolled hub only.
            let last: Option<UnixSeconds> = self
                .store
                .get(K_LAST_SYNC)?
                .and_then(|raw| serde_json::from_slice(&raw).ok());
            syncs.extend(last.map(|t| (self.enrollment.hub.endpoint_id.clone(), t)));
        }
        let mut admitted = self.admitted_by()?;
        if self.credential()?.is_none() {
            // Spent (every hub admitted it, or a device of before two hubs was bound): it is
            // sent to no hub.
            admitted = self.region_hubs();
        }
        let until =
            |keys: &[DayPublicKey]| keys.iter().map(|k| k.day).filter(|d| *d >= today).max();
        let mut out = Vec::new();
        let mut one = |role: &str, id: &str, addrs: Vec<String>, keys: &[DayPublicKey]| {
            out.push(HubStatus {
                role: role.into(),
                endpoint_id: id.to_owned(),
                addrs,
                last_sync: syncs.get(id).copied(),
                day_keys_until: until(keys),
                admitted: admitted.iter().any(|a| a.eq_ignore_ascii_case(id)),
            });
        };
        one(
            "enrolled",
            &self.enrollment.hub.endpoint_id,
            crate::hub_addrs::current(self),
            &self.day_keys,
        );
        if let Some(p) = &self.peer {
            one(
                "peer",
                &p.contact.endpoint_id,
                p.contact.addrs.clone(),
                &p.day_keys,
            );
        }
        Ok(out)
    }

    /// The facility's other devices, as the hub last listed them.
    pub fn roster(&self) -> Result<Vec<shared::ticket::Sibling>, DeviceError> {
        Ok(self
            .store
            .get(K_ROSTER)?
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default())
    }

    /// The device's figures.
    pub fn status(&self, now: UnixSeconds) -> Result<Status, DeviceError> {
        let live = horizon(now);
        let mut partitions = Vec::new();
        for (day, total, synced) in self.store.days()? {
            if day >= live {
                partitions.push(PartitionStatus {
                    day,
                    records: total,
                    unsynced: total.saturating_sub(synced),
                });
            }
        }
        let today = Day::of(now);
        // Days from today for which either hub's key is held: a record of such a day seals.
        let peer_keys = self.peer.iter().flat_map(|p| p.day_keys.iter());
        let mut key_days: Vec<Day> = self
            .day_keys
            .iter()
            .chain(peer_keys)
            .map(|k| k.day)
            .filter(|d| *d >= today)
            .collect();
        key_days.sort_unstable();
        key_days.dedup();
        let day_keys_left = key_days.len();
        let last_sync: Option<UnixSeconds> = self
            .store
            .get(K_LAST_SYNC)?
            .and_then(|raw| serde_json::from_slice(&raw).ok());
        let clock_offset: Option<i64> = self
            .store
            .get(K_CLOCK_OFFSET)?
            .and_then(|raw| serde_json::from_slice(&raw).ok());
        let (fallback_sealed, fallback_days_early) =
            fallback_summary(self.store.fallback_sealed()?, now);
        let mut warnings = Vec::new();
        if let Some(why) = crate::tls::unavailable() {
            warnings.push(format!(
                "the kiosk's HTTPS is unavailable (tablets cannot reach it; this machine still can over plain HTTP): {why}"
            ));
        }
        if fallback_sealed > 0 {
            warnings.push(format!(
                "{fallback_sealed} visits were sealed to an earlier day's hub key because this device ran out of day keys: sync it with the hub for fresh day keys; these visits become unreadable at the hub up to {fallback_days_early} days before their 28 days are up"
            ));
        }
        if self.store.get(K_STAFF_PIN_RESET)?.is_some() {
            warnings.push(
                "the staff PIN set under an earlier release was stored under a fast hash and has been removed: set it again with `edge-node pin set`"
                    .into(),
            );
        }
        if self.store.get(K_STAFF_PIN_SHORT)?.is_some() {
            warnings.push(format!(
                "the staff PIN has fewer than {STAFF_PIN_MIN_NEW_DIGITS} digits and can be guessed within weeks: set a new one with `edge-node pin set`"
            ));
        }
        if day_keys_left < DAY_KEYS_WARNING {
            warnings.push(format!(
                "only {day_keys_left} days of hub keys left: connect this device to the hub (sync) before they run out"
            ));
        }
        if clock_offset.is_some_and(|o| o.abs() > 300) {
            warnings.push(
                "this device's clock differs from the hub's by more than 5 minutes: set the clock"
                    .into(),
            );
        }
        if self.enrollment.facility.status != shared::facility::FacilityStatus::Approved {
            warnings.push("the facility is not approved".into());
        }
        let revocations = self.revocation_status(now)?;
        let hubs = self.hub_status(now)?;
        let single_hub_wraps = self.single_hub_wraps();
        if let Some(p) = hubs.iter().find(|h| h.role == "peer") {
            let left = p
                .day_keys_until
                .map_or(0, |d| d.0.saturating_sub(today.0).saturating_add(1));
            if (left as usize) < DAY_KEYS_WARNING {
                warnings.push(format!(
                    "only {left} days of the peer hub's keys left: visits are then readable at one hub only; sync with the region's hubs"
                ));
            }
        }
        if let Some(age) = revocations.age_seconds.filter(|_| revocations.stale) {
            warnings.push(format!(
                "this device last learnt of revoked devices {} hours ago (more than {} hours): a sibling revoked since may still be served; sync with the hub",
                age / 3600,
                shared::revocation::STALE_AFTER / 3600
            ));
        }
        Ok(Status {
            facility_id: self.enrollment.facility.id.to_string(),
            facility_name: self.enrollment.facility.registration.name.clone(),
            device_id: self.enrollment.device_id.to_string(),
            endpoint_id: self
                .endpoint_key()
                .map(|k| iroh::SecretKey::from_bytes(&k).public().to_string())
                .unwrap_or_default(),
            device_name: self.enrollment.device_name.clone(),
            records: partitions.iter().map(|p| p.records).sum(),
            unsynced: partitions.iter().map(|p| p.unsynced).sum(),
            last_sync,
            partitions,
            day_keys_left,
            clock_offset,
            fallback_sealed,
            fallback_days_early,
            siblings: crate::lan::status(self, now),
            revocations,
            hubs,
            single_hub_wraps,
            warnings,
        })
    }

    /// Enforces retention: drops whole partitions past the horizon.
    ///
    /// `as_of` may only move the clock forward. The device clock is corrected by the offset
    /// the hub measured at the last sync, and a partition the hub may not hold yet is kept
    /// one more day (the one partition's length of grace the design allows), so a clock that
    /// jumped forward does not destroy an unsynced visit early.
    pub fn purge(
        &mut self,
        now: UnixSeconds,
        as_of: Option<UnixSeconds>,
    ) -> Result<PurgeReport, DeviceError> {
        let offset: Option<i64> = self
            .store
            .get(K_CLOCK_OFFSET)?
            .and_then(|raw| serde_json::from_slice(&raw).ok());
        let held = self.store.days()?;
        let days = held
            .iter()
            .map(|&(day, total, synced)| HeldDay { day, total, synced });
        let plan = purge_plan(now, offset, as_of, days);
        let dropped = plan.dropped.clone();
        let records = held.iter().filter(|h| dropped.contains(&h.0)).map(|h| h.1);
        let last_purge = crate::metrics::LastPurge {
            at: now,
            records: records.sum(),
            days: dropped.len() as u64,
        };
        self.store.drop_days(&dropped)?;
        for d in &dropped {
            self.partitions.remove(d);
        }
        if self
            .session
            .as_ref()
            .is_some_and(|s| dropped.contains(&s.key.day()))
        {
            self.session = None;
        }
        // Day keys of expired days are useless; keep the lists short.
        self.day_keys.retain(|k| plan.keeps_day_key(k.day));
        if let Some(p) = self.peer.as_mut() {
            p.day_keys.retain(|k| plan.keeps_day_key(k.day));
        }
        self.store.put(&[
            (K_DAY_KEYS, &json(&self.day_keys)),
            (K_PEER_HUB, &json(&self.peer)),
            (crate::metrics::K_LAST_PURGE, &json(&last_purge)),
        ])?;
        Ok(PurgeReport {
            as_of: plan.as_of,
            horizon: plan.horizon,
            dropped: plan.dropped,
            kept_unsynced: plan.kept_unsynced,
        })
    }

    /// Drops the in-memory copy of `day`'s partition, so its next use reloads what the store
    /// holds: a sync shell calls it when a merge into memory could not be made durable.
    pub fn forget_partition(&mut self, day: Day) {
        self.partitions.remove(&day);
    }
}

/// Migration on open: a staff PIN stored by an earlier release (salted BLAKE3, version 1) is
/// removed rather than verified, since its hash falls to an offline search in seconds; the
/// `staff_pin_reset` setting makes `status` ask for a new PIN until one is set.
fn migrate_staff_pin(store: &Store) -> Result<(), DeviceError> {
    let Some(raw) = store.get(K_STAFF_PIN)? else {
        return Ok(());
    };
    if let Ok(StoredPin::LegacyBlake3 { .. }) = serde_json::from_slice::<StoredPin>(&raw) {
        store.put(&[(K_STAFF_PIN_RESET, b"true")])?;
        store.remove(K_STAFF_PIN)?;
        tracing::warn!(
            "the staff PIN was stored by an earlier release under a fast hash; it was removed: set it again with `edge-node pin set`"
        );
    }
    Ok(())
}

fn load_partition<'a>(
    cache: &'a mut BTreeMap<Day, (Partition, usize)>,
    store: &Store,
    actor: &[u8],
    facility: &shared::FacilityId,
    day: Day,
) -> Result<&'a mut (Partition, usize), DeviceError> {
    use std::collections::btree_map::Entry;
    match cache.entry(day) {
        Entry::Occupied(e) => Ok(e.into_mut()),
        Entry::Vacant(v) => {
            let id = PartitionId {
                facility: facility.clone(),
                day,
            };
            let (bytes, chunks) = store.partition_bytes(day)?;
            let p = if bytes.is_empty() {
                Partition::new(id, actor)
            } else {
                Partition::load(id.clone(), &bytes, actor)
                    .map_err(|e| DeviceError::Partition(id.to_string(), e))?
            };
            Ok(v.insert((p, chunks)))
        }
    }
}

fn read_ticket(path: &Path) -> Result<Vec<u8>, DeviceError> {
    let err = |source| DeviceError::TicketFile {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.is_dir() {
        return Err(err(std::io::Error::other("it is a directory")));
    }
    if meta.len() > shared::ticket::MAX_TICKET_BYTES as u64 {
        return Err(DeviceError::Ticket {
            path: path.display().to_string(),
            source: TicketError::TooLarge(meta.len() as usize),
        });
    }
    std::fs::read(path).map_err(err)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shared::daykey::DayKeyRatchet;
    use shared::facility::{BusinessNumber, FacilityStatus, Registration};
    use shared::ticket::{TICKET_KIND, TICKET_VERSION};
    use shared::token::TestIssuer;

    /// Noon UTC of some day in 2025.
    const NOON: UnixSeconds = 20_200 * 86_400 + 12 * 3600;

    fn issuer() -> TestIssuer {
        TestIssuer::new([0x11; 32], 1, 1)
    }

    /// A device enrolled at `now` whose ticket holds `count` day keys from `first_key_day`.
    pub(crate) fn enrolled(
        tmp: &tempfile::TempDir,
        now: UnixSeconds,
        first_key_day: Day,
        count: u32,
    ) -> Device {
        let ratchet = DayKeyRatchet::generate(&mut OsRng, first_key_day);
        let day_keys = ratchet.publics(first_key_day, count);
        let mut keyring = Keyring::new();
        keyring
            .insert(issuer().keyring_entry("test", 1_577_836_800, 4_102_444_800))
            .expect("a fresh keyring takes a key");
        let ticket = EnrollmentTicket {
            kind: TICKET_KIND.into(),
            version: TICKET_VERSION,
            issued_at: now,
            hub: HubContact {
                endpoint_id: "ab".repeat(32),
                addrs: vec!["127.0.0.1:7447".into()],
                region: "mapo".into(),
            },
            facility: Facility {
                id: shared::FacilityId::parse("f-test").expect("an id"),
                registration: Registration {
                    name: "Star Karaoke".into(),
                    business_number: Some(BusinessNumber::parse("123-45-67891").expect("valid")),
                    representative: "Kim".into(),
                    phone: "02-123-4567".into(),
                    category: "karaoke".into(),
                    region: "mapo".into(),
                    address: "1 Wausan-ro".into(),
                },
                status: FacilityStatus::Approved,
                registered_at: now,
            },
            device_id: DeviceId::parse("d-0123456789abcdef").expect("an id"),
            device_name: "front door".into(),
            credential: Credential([7; 32]),
            keyring,
            // Any age recipient seals paper entries; a day key is one.
            authority_recipient: ratchet
                .public(first_key_day)
                .expect("the ratchet's first day")
                .recipient,
            day_keys,
            peer_hubs: Vec::new(),
        };
        let path = tmp.path().join("ticket.json");
        std::fs::write(&path, ticket.to_json()).expect("write the ticket");
        Device::init(&tmp.path().join("dev"), &path, now).expect("enroll")
    }

    #[test]
    fn the_hub_cannot_roll_the_revocation_list_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut dev = enrolled(&tmp, NOON, Day::of(NOON), 35);
        let secret = [5u8; 32];
        dev.enrollment.hub.endpoint_id = iroh::SecretKey::from_bytes(&secret).public().to_string();
        let facility = dev.enrollment.facility.id.clone();
        let list = |version: u32, issued_at: UnixSeconds| {
            shared::revocation::RevocationList {
                facility: facility.clone(),
                version,
                issued_at,
                devices: (0..version)
                    .map(|i| shared::revocation::RevokedDevice {
                        device_id: DeviceId::parse(&format!("d-00000000000000{i:02x}"))
                            .expect("an id"),
                        endpoint_id: None,
                        revoked_at: NOON,
                    })
                    .collect(),
            }
            .sign(&secret)
        };
        let two = list(2, NOON);
        let one_later = list(1, NOON + 3_600);
        let three = list(3, NOON + 7_200);
        assert!(dev.take_revocations(&two, ListSource::Hub).expect("take"));
        assert!(
            !dev.take_revocations(&one_later, ListSource::Hub)
                .expect("take"),
            "a lower version from the hub"
        );
        assert_eq!(
            dev.revocation_list().expect("read").map(|l| l.version),
            Some(2)
        );
        assert!(
            dev.take_revocations(&list(2, NOON + 60), ListSource::Hub)
                .expect("take")
        );
        assert!(dev.take_revocations(&three, ListSource::Hub).expect("take"));
        assert_eq!(
            dev.revocation_list().expect("read").map(|l| l.version),
            Some(3)
        );
    }

    #[test]
    fn an_empty_keyring_from_the_hub_never_replaces_the_trusted_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut dev = enrolled(&tmp, NOON, Day::of(NOON), 35);
        let refresh = shared::ticket::Refresh {
            day_keys: Vec::new(),
            keyring: Some(Keyring::new()),
            roster: Some(Vec::new()),
            hub_addrs: None,
            revocations: None,
            peer_hub: None,
        };
        dev.apply_refresh(&refresh).expect("apply");
        assert_eq!(dev.keyring().len(), 1, "the trusted issuer is kept");
        scan(&mut dev, NOON + 60);
        drop(dev);
        let mut dev = Device::open(&tmp.path().join("dev")).expect("reopen");
        assert_eq!(dev.keyring().len(), 1, "and kept on disk");
        scan(&mut dev, NOON + 120);
    }

    pub(crate) fn scan(dev: &mut Device, now: UnixSeconds) {
        let mut token = [0u8; 16];
        OsRng.fill_bytes(&mut token);
        let code = issuer().issue(now, 60, token);
        let r = dev.check_in(now, &code).expect("check in");
        assert_eq!(r.verdict, Verdict::Accepted);
    }

    fn paper(dev: &mut Device, now: UnixSeconds, visited_at: UnixSeconds) {
        let entry = PaperEntry {
            name: "Hong Gildong".into(),
            phone: "010-1234-5678".into(),
            safe_number: None,
            visited_at,
            consent_collect: true,
            consent_share: true,
            guardian_consent: false,
            remarks: String::new(),
        };
        dev.add_paper(now, &entry, false).expect("paper entry");
    }

    /// The wrapped session keys written (pending) for `day`.
    fn wrapped_keys(dev: &Device, day: Day) -> usize {
        dev.store()
            .pending(day)
            .expect("pending rows")
            .iter()
            .filter(|(_, r)| matches!(r, Some(Pending::Key(_))))
            .count()
    }

    #[test]
    fn a_session_key_does_not_outlive_its_day() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = Day::of(NOON);
        let next = NOON + 86_400;
        let mut dev = enrolled(&tmp, NOON, d, 35);
        assert!(dev.session_days().is_empty());
        scan(&mut dev, NOON);
        scan(&mut dev, NOON + 60);
        assert_eq!(dev.session_days(), [d]);
        assert_eq!(wrapped_keys(&dev, d), 1, "one key for the day, reused");

        // The clock moves to D+1: the next check-in drops D's key and starts a new one.
        scan(&mut dev, next);
        assert_eq!(dev.session_days(), [d.plus(1)], "D's key is still held");
        assert_eq!(wrapped_keys(&dev, d.plus(1)), 1);
        assert_eq!(wrapped_keys(&dev, d), 1);

        // A quiet device: the daemon's timer drops the key soon after midnight.
        assert!(!dev.end_past_sessions(next + 3600));
        assert_eq!(dev.session_days(), [d.plus(1)]);
        assert!(dev.end_past_sessions(next + 86_400 + 1));
        assert!(dev.session_days().is_empty());
        assert!(!dev.end_past_sessions(next + 86_400 + 2));
    }

    #[test]
    fn a_backdated_paper_entry_gets_a_one_off_key() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = Day::of(NOON);
        let now = NOON + 2 * 86_400;
        let mut dev = enrolled(&tmp, NOON, d, 35);
        scan(&mut dev, now);
        assert_eq!(dev.session_days(), [d.plus(2)]);
        // Two entries written up for day D: each sealed under its own key, neither kept.
        paper(&mut dev, now, NOON);
        paper(&mut dev, now + 5, NOON + 60);
        assert_eq!(dev.session_days(), [d.plus(2)], "only today's key stays");
        assert_eq!(wrapped_keys(&dev, d), 2);
        // Today's key is still today's: the next visitor reuses it.
        paper(&mut dev, now + 10, now + 10);
        assert_eq!(wrapped_keys(&dev, d.plus(2)), 1);
    }

    #[test]
    fn records_sealed_under_a_fallback_key_are_counted_in_status() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = Day::of(NOON);
        // Enrolled 38 days ago with the 35 days of keys a ticket holds (D-38 .. D-4), never
        // synced since: at D the device falls back to D-4's key.
        let mut dev = enrolled(&tmp, NOON - 38 * 86_400, d.minus(38), 35);
        let before = dev.status(NOON).expect("status");
        assert_eq!(before.fallback_sealed, 0);
        assert_eq!(before.fallback_days_early, 0);
        scan(&mut dev, NOON);
        scan(&mut dev, NOON + 60);
        paper(&mut dev, NOON + 120, NOON - 86_400);
        let s = dev.status(NOON + 180).expect("status");
        assert_eq!(s.fallback_sealed, 3, "{s:?}");
        assert_eq!(s.fallback_days_early, 4, "{s:?}");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("3 visits") && w.contains("up to 4 days")),
            "{:?}",
            s.warnings
        );
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(v["fallback_sealed"], 3);
        // Persisted: a new process reports the same.
        drop(dev);
        let dev = Device::open(&tmp.path().join("dev")).expect("open");
        assert_eq!(dev.status(NOON + 180).expect("status").fallback_sealed, 3);
    }

    #[test]
    fn staff_pin_matches_only_itself_and_survives_storage() {
        let pin = StaffPin::new("402913").expect("a valid PIN");
        assert!(pin.matches("402913"));
        assert!(!pin.matches("402914"));
        assert!(!pin.matches("40291"));
        assert!(!pin.matches(""));
        let stored = json(&pin);
        let text = String::from_utf8_lossy(&stored);
        assert!(!text.contains("402913"), "the PIN itself is stored: {text}");
        let v: serde_json::Value = serde_json::from_slice(&stored).expect("json");
        assert_eq!(v["version"], 2, "{text}");
        let phc = v["argon2id"].as_str().unwrap_or_default();
        assert!(
            phc.starts_with("$argon2id$v=19$m=19456,t=4,p=1$"),
            "not argon2id with the set parameters: {text}"
        );
        let back: StaffPin = serde_json::from_slice(&stored).expect("round trip");
        assert!(back.matches("402913"));
        assert!(!back.matches("402914"));
        // A fresh salt each time: the same PIN never hashes the same twice.
        let again = StaffPin::new("402913").expect("a valid PIN");
        assert_ne!(again.phc, pin.phc);
        assert_eq!(format!("{pin:?}"), "StaffPin(..)");
    }

    #[test]
    fn stored_pin_hashes_out_of_form_or_bounds_are_refused() {
        let pin = StaffPin::new("402913").expect("a valid PIN");
        let weaker = pin.phc.replacen("$argon2id$", "$argon2i$", 1);
        let huge = pin.phc.replacen("m=19456", "m=4194304", 1);
        for (phc, version) in [
            (weaker.as_str(), 2),
            (huge.as_str(), 2),
            ("not a hash", 2),
            (pin.phc.as_str(), 3),
        ] {
            let raw = serde_json::json!({ "version": version, "argon2id": phc }).to_string();
            assert!(
                serde_json::from_str::<StaffPin>(&raw).is_err(),
                "{raw} was accepted"
            );
        }
    }

    #[test]
    fn an_earlier_releases_blake3_pin_is_removed_and_must_be_set_again() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dev = enrolled(&tmp, NOON, Day::of(NOON), 35);
        // The previous release's form: {salt, hash}, hex.
        let legacy = serde_json::json!({ "salt": "11".repeat(32), "hash": "22".repeat(32) });
        dev.store()
            .put(&[(K_STAFF_PIN, legacy.to_string().as_bytes())])
            .expect("put");
        drop(dev);
        let mut dev = Device::open(&tmp.path().join("dev")).expect("open");
        assert!(dev.staff_pin().expect("readable").is_none());
        assert!(
            dev.store().get(K_STAFF_PIN).expect("get").is_none(),
            "the weak hash stays"
        );
        let warned = |dev: &Device| {
            dev.status(NOON)
                .expect("status")
                .warnings
                .iter()
                .any(|w| w.contains("edge-node pin set"))
        };
        assert!(warned(&dev));
        dev.set_staff_pin(&StaffPin::new("402913").expect("valid"))
            .expect("set");
        assert!(!warned(&dev));
        let pin = dev.staff_pin().expect("readable").expect("set");
        assert!(pin.matches("402913"));
    }

    #[test]
    fn staff_pin_form_is_checked() {
        for bad in [
            "",
            "123",
            "1234",
            "12345",
            "12a456",
            "1234567890123",
            " 123456",
            "１２３４５６",
        ] {
            assert!(
                matches!(StaffPin::new(bad), Err(DeviceError::BadPin)),
                "{bad:?} was accepted"
            );
        }
        for good in ["000000", "123456789012"] {
            assert!(StaffPin::new(good).is_ok(), "{good:?} was refused");
        }
        let msg = StaffPin::new("1234")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("6 to 12 digits"), "{msg}");
        let bad_json = br#"{"salt":"zz","hash":"00"}"#;
        assert!(serde_json::from_slice::<StaffPin>(bad_json).is_err());
    }

    /// A 4-digit PIN set by an earlier release keeps working; once the kiosk has seen it is
    /// short, `status` says to change it, until a new one is set.
    #[test]
    fn a_short_pin_of_an_earlier_release_works_and_status_warns() {
        use argon2::PasswordHasher;
        let tmp = tempfile::tempdir().expect("tmp");
        let mut dev = enrolled(&tmp, NOON, Day::of(NOON), 35);
        let salt = argon2::password_hash::SaltString::encode_b64(&[9; 16]).expect("salt");
        let phc = staff_pin_hasher()
            .expect("hasher")
            .hash_password(b"1234", &salt)
            .expect("hash")
            .to_string();
        dev.set_staff_pin(&StaffPin { phc }).expect("stored");
        let pin = dev.staff_pin().expect("read").expect("set");
        assert!(pin.matches("1234"));
        let warns = |dev: &Device| dev.status(NOON).expect("status").warnings.join("\n");
        assert!(!warns(&dev).contains("staff PIN"), "{}", warns(&dev));
        dev.note_short_staff_pin().expect("noted");
        assert!(
            warns(&dev).contains("fewer than 6 digits"),
            "{}",
            warns(&dev)
        );
        dev.set_staff_pin(&StaffPin::new("402913").expect("valid"))
            .expect("stored");
        assert!(!warns(&dev).contains("staff PIN"), "{}", warns(&dev));
    }

    /// A backlog folds into bounded changes, in pending order, each stored with its rows, so
    /// no change is too big for a peer's validator.
    #[test]
    fn a_backlog_folds_into_bounded_changes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut dev = enrolled(&tmp, NOON, Day::of(NOON), 35);
        let day = Day::of(NOON);
        for i in 0..7 {
            scan(&mut dev, NOON + 60 * i);
        }
        // The session key's row and 7 records, at most 3 records a change: 3 + 3 + 1.
        assert_eq!(dev.fold_pending_in(3, MAX_FOLD_BYTES).expect("fold"), 7);
        assert!(dev.store().pending(day).expect("pending").is_empty());
        let changes = dev
            .partition(day)
            .expect("partition")
            .doc()
            .get_changes(&[]);
        let ops: Vec<usize> = changes.iter().map(|c| c.len()).collect();
        assert_eq!(ops, vec![4, 3, 1], "the key travels with the first records");

        // The byte bound alone: every row is over it, so every row is its own change.
        for i in 0..2 {
            scan(&mut dev, NOON + 3_600 + 60 * i);
        }
        assert_eq!(dev.fold_pending_in(1_000, 1).expect("fold"), 2);
        let changes = dev
            .partition(day)
            .expect("partition")
            .doc()
            .get_changes(&[]);
        assert_eq!(changes.len(), 5);
        drop(dev);
        let mut dev = Device::open(&tmp.path().join("dev")).expect("reopen");
        assert_eq!(dev.partition(day).expect("partition").record_count(), 9);
    }
}

/// A region of two hubs, from the device's side (design: "Two hubs per region").
#[cfg(test)]
mod two_hub_tests {
    use super::tests::{enrolled, scan};
    use super::*;
    use shared::daykey::DayKeyRatchet;
    use shared::revocation::{RevocationList, RevokedDevice};
    use shared::ticket::{Refresh, RefreshHave, peer_digest};

    const NOON: UnixSeconds = 20_200 * 86_400 + 12 * 3600;

    /// A hub: its endpoint secret and id, and its day-key ratchet.
    struct Hub {
        secret: [u8; 32],
        id: String,
        ratchet: DayKeyRatchet,
    }

    fn hub(seed: u8) -> Hub {
        let secret = [seed; 32];
        Hub {
            secret,
            id: iroh::SecretKey::from_bytes(&secret).public().to_string(),
            ratchet: DayKeyRatchet::generate(&mut OsRng, Day::of(NOON)),
        }
    }

    fn contact(h: &Hub, port: u16) -> HubContact {
        HubContact {
            endpoint_id: h.id.clone(),
            addrs: vec![format!("127.0.0.1:{port}")],
            region: "mapo".into(),
        }
    }

    fn peer_of(h: &Hub, port: u16, days: u32) -> PeerHub {
        PeerHub {
            contact: contact(h, port),
            day_keys: h.ratchet.publics(Day::of(NOON), days),
        }
    }

    /// A device enrolled (through a ticket file) with hub `a`, whose ticket names `b` as the
    /// peer with `b_days` day keys.
    fn enrolled_two(tmp: &tempfile::TempDir, a: &Hub, b: &Hub, b_days: u32) -> Device {
        drop(enrolled(tmp, NOON, Day::of(NOON), 35));
        let path = tmp.path().join("ticket.json");
        let mut t = EnrollmentTicket::parse(&std::fs::read(&path).unwrap()).unwrap();
        t.hub = contact(a, 7447);
        t.day_keys = a.ratchet.publics(Day::of(NOON), 35);
        t.peer_hubs = vec![peer_of(b, 7448, b_days)];
        std::fs::write(&path, t.to_json()).unwrap();
        Device::init(&tmp.path().join("two"), &path, NOON).unwrap()
    }

    fn wrapped(dev: &Device, day: Day) -> Vec<WrappedKey> {
        dev.store()
            .pending(day)
            .unwrap()
            .into_iter()
            .filter_map(|(_, r)| match r {
                Some(Pending::Key(k)) => Some(k),
                _ => None,
            })
            .collect()
    }

    fn opens(k: &WrappedKey, h: &Hub) -> bool {
        k.unwrap(&h.ratchet.secret(k.key_day).unwrap()).is_ok()
    }

    #[test]
    fn each_session_key_is_wrapped_to_both_hubs_and_either_opens_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (hub(1), hub(2));
        let mut dev = enrolled_two(&tmp, &a, &b, 35);
        assert_eq!(dev.region_hubs(), vec![a.id.clone(), b.id.clone()]);
        scan(&mut dev, NOON);
        let keys = wrapped(&dev, Day::of(NOON));
        assert_eq!(keys.len(), 1);
        assert!(opens(&keys[0], &a) && opens(&keys[0], &b));
        let st = dev.status(NOON).unwrap();
        assert_eq!(st.single_hub_wraps, 0);
        let roles: Vec<(&str, &str)> = st
            .hubs
            .iter()
            .map(|h| (h.role.as_str(), h.endpoint_id.as_str()))
            .collect();
        assert_eq!(
            roles,
            vec![("enrolled", a.id.as_str()), ("peer", b.id.as_str())]
        );
        assert_eq!(st.hubs[1].day_keys_until, Some(Day::of(NOON).plus(34)));
        assert!(st.hubs.iter().all(|h| !h.admitted && h.last_sync.is_none()));
        // And it survives a reopen.
        drop(dev);
        let dev = Device::open(&tmp.path().join("two")).unwrap();
        assert_eq!(dev.peer_hub().unwrap().contact.endpoint_id, b.id);
    }

    #[test]
    fn without_the_peers_key_of_the_day_one_hub_is_wrapped_to_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (hub(1), hub(2));
        // The peer's keys are not known yet.
        let mut dev = enrolled_two(&tmp, &a, &b, 0);
        scan(&mut dev, NOON);
        let keys = wrapped(&dev, Day::of(NOON));
        assert!(opens(&keys[0], &a) && !opens(&keys[0], &b));
        assert_eq!(dev.status(NOON).unwrap().single_hub_wraps, 1);
        // The peer's keys arrive (from the enrolled hub's refresh): the one-hub session ends,
        // the next record starts a session wrapped to both.
        dev.apply_refresh_from(
            &a.id,
            &Refresh {
                peer_hub: Some(peer_of(&b, 7448, 35)),
                ..Refresh::default()
            },
        )
        .unwrap();
        scan(&mut dev, NOON + 60);
        let keys = wrapped(&dev, Day::of(NOON));
        assert_eq!(keys.len(), 2);
        assert!(opens(&keys[1], &a) && opens(&keys[1], &b));
        assert_eq!(dev.status(NOON).unwrap().single_hub_wraps, 1);
    }

    #[test]
    fn a_device_without_keys_of_its_enrolled_hub_seals_under_the_peers() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (hub(1), hub(2));
        let mut dev = enrolled_two(&tmp, &a, &b, 35);
        // The enrolled hub was rebuilt: its old keys are gone, its new ones not here yet.
        dev.day_keys.clear();
        scan(&mut dev, NOON);
        let keys = wrapped(&dev, Day::of(NOON));
        assert!(!opens(&keys[0], &a) && opens(&keys[0], &b));
        let st = dev.status(NOON).unwrap();
        assert_eq!(st.single_hub_wraps, 1);
        assert_eq!(st.day_keys_left, 35, "the peer's keys count");
        assert_eq!(st.hubs[0].day_keys_until, None);
    }

    #[test]
    fn a_refresh_is_mapped_by_the_answering_hubs_endpoint_id() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (hub(1), hub(2));
        let mut dev = enrolled_two(&tmp, &a, &b, 3);
        let a_keys = dev.day_keys.clone();
        // b answers: its keys and addresses are b's; its peer (a) at a new address with keys.
        let mut a_moved = peer_of(&a, 7450, 35);
        a_moved.contact.addrs = vec!["127.0.0.1:7450".into()];
        dev.apply_refresh_from(
            &b.id,
            &Refresh {
                day_keys: b.ratchet.publics(Day::of(NOON), 40),
                hub_addrs: Some(vec!["127.0.0.1:7449".into()]),
                peer_hub: Some(a_moved.clone()),
                ..Refresh::default()
            },
        )
        .unwrap();
        let peer = dev.peer_hub().unwrap();
        assert_eq!(peer.day_keys, b.ratchet.publics(Day::of(NOON), 40));
        assert_eq!(peer.contact.addrs, vec!["127.0.0.1:7449".to_owned()]);
        assert_eq!(dev.day_keys, a_keys, "a's keys are a's");
        // The enrolled hub's addresses come from itself only: the peer's copy is not taken
        // (review finding 3: a peer hub must not be able to cut the device off from it).
        assert_eq!(
            crate::hub_addrs::current(&dev),
            vec!["127.0.0.1:7447".to_owned()]
        );
        assert_eq!(dev.enrollment().hub.endpoint_id, a.id);

        // What the device says it holds, to each hub: that hub's keys, the other as its peer.
        let to_b = dev.refresh_have_for(NOON, Some(&b.id)).unwrap();
        let bytes = to_b.to_bytes();
        assert_eq!(bytes.len(), shared::ticket::REFRESH_HAVE_PEER_BYTES);
        let expect = RefreshHave::of(
            Day::of(NOON),
            &b.ratchet.publics(Day::of(NOON), 40),
            dev.keyring(),
            &dev.roster().unwrap(),
        );
        assert_eq!(to_b.day_keys, expect.day_keys);
        assert_eq!(
            to_b.peer,
            Some(peer_digest(Day::of(NOON), dev.other_hub(&b.id).as_ref()))
        );
        assert_ne!(to_b.peer, Some(peer_digest(Day::of(NOON), Some(&a_moved))));
        let to_a = dev.refresh_have_for(NOON, Some(&a.id)).unwrap();
        assert_eq!(to_a.peer, Some(peer_digest(Day::of(NOON), dev.peer_hub())));

        // A hub naming itself as its peer, or a peer of another region: ignored.
        let before = (dev.enrollment().hub.clone(), dev.peer_hub().cloned());
        let mut other_region = peer_of(&hub(3), 7451, 3);
        other_region.contact.region = "gangnam".into();
        for offered in [peer_of(&b, 7452, 3), other_region] {
            dev.apply_refresh_from(
                &b.id,
                &Refresh {
                    peer_hub: Some(offered),
                    ..Refresh::default()
                },
            )
            .unwrap();
            assert_eq!(
                (dev.enrollment().hub.clone(), dev.peer_hub().cloned()),
                before
            );
        }
        // A refresh from an endpoint that is not one of the region's hubs: ignored whole.
        let c = hub(3);
        dev.apply_refresh_from(
            &c.id,
            &Refresh {
                day_keys: c.ratchet.publics(Day::of(NOON), 40),
                peer_hub: Some(peer_of(&c, 7453, 3)),
                ..Refresh::default()
            },
        )
        .unwrap();
        assert_eq!(
            (dev.enrollment().hub.clone(), dev.peer_hub().cloned()),
            before
        );
        assert_eq!(dev.day_keys, a_keys);
    }

    #[test]
    fn a_rebuilt_peer_hub_is_taken_from_the_enrolled_hub_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c, d) = (hub(1), hub(2), hub(3), hub(4));
        let mut dev = enrolled_two(&tmp, &a, &b, 35);
        let a_keys = dev.day_keys.clone();
        // a (the enrolled hub) names a new peer: b was rebuilt as d.
        dev.apply_refresh_from(
            &a.id,
            &Refresh {
                peer_hub: Some(peer_of(&d, 7454, 5)),
                ..Refresh::default()
            },
        )
        .unwrap();
        assert_eq!(dev.region_hubs(), vec![a.id.clone(), d.id.clone()]);
        // d names a third endpoint in a's place: refused (review finding 3). A compromised or
        // mis-paired peer hub cannot cut the device off from the hub it enrolled with.
        dev.apply_refresh_from(
            &d.id,
            &Refresh {
                peer_hub: Some(peer_of(&c, 7455, 0)),
                ..Refresh::default()
            },
        )
        .unwrap();
        assert_eq!(dev.region_hubs(), vec![a.id.clone(), d.id.clone()]);
        assert_eq!(dev.day_keys, a_keys, "a's keys stay a's");
        // Nor may it swap a's keys for its own: a relayed copy fills missing days only.
        dev.apply_refresh_from(
            &d.id,
            &Refresh {
                peer_hub: Some(peer_of(&a, 7447, 40)),
                ..Refresh::default()
            },
        )
        .unwrap();
        assert_eq!(&dev.day_keys[..a_keys.len()], &a_keys[..]);
        // Sealing goes on to a and d.
        scan(&mut dev, NOON);
        let keys = wrapped(&dev, Day::of(NOON));
        assert!(opens(&keys[0], &d) && opens(&keys[0], &a));
        // All of it survives a reopen.
        drop(dev);
        let dev = Device::open(&tmp.path().join("two")).unwrap();
        assert_eq!(dev.region_hubs(), vec![a.id.clone(), d.id.clone()]);
        assert_eq!(dev.enrollment().hub.endpoint_id, a.id);
    }

    #[test]
    fn the_credential_goes_to_each_hub_until_that_hub_admitted_the_device() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (hub(1), hub(2));
        let dev = enrolled_two(&tmp, &a, &b, 35);
        assert!(dev.credential_for(&a.id).unwrap().is_some());
        dev.admitted_by_hub(&a.id).unwrap();
        assert!(dev.credential_for(&a.id).unwrap().is_none());
        assert!(
            dev.credential_for(&b.id).unwrap().is_some(),
            "b may not have the binding"
        );
        dev.admitted_by_hub(&b.id).unwrap();
        assert!(
            dev.credential().unwrap().is_none(),
            "spent at both: dropped"
        );
        assert!(dev.status(NOON).unwrap().hubs.iter().all(|h| h.admitted));

        // A device of one hub drops it at the first admission, as before.
        let tmp = tempfile::tempdir().unwrap();
        let one = enrolled(&tmp, NOON, Day::of(NOON), 35);
        let hub = one.enrollment().hub.endpoint_id.clone();
        one.admitted_by_hub(&hub).unwrap();
        assert!(one.credential().unwrap().is_none());
    }

    #[test]
    fn either_hubs_list_is_taken_and_any_held_list_refuses() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (hub(1), hub(2));
        let mut dev = enrolled_two(&tmp, &a, &b, 35);
        let facility = dev.enrollment().facility.id.clone();
        let list = |ids: &[&str], issued_at: UnixSeconds| RevocationList {
            facility: facility.clone(),
            version: ids.len() as u32,
            issued_at,
            devices: ids
                .iter()
                .map(|i| RevokedDevice {
                    device_id: DeviceId::parse(i).unwrap(),
                    endpoint_id: Some(format!("{i}-endpoint")),
                    revoked_at: 1,
                })
                .collect(),
        };
        let d1 = DeviceId::parse("d-0000000000000001").unwrap();
        let d2 = DeviceId::parse("d-0000000000000002").unwrap();
        assert!(
            dev.take_revocations(
                &list(&["d-0000000000000001"], NOON).sign(&a.secret),
                ListSource::Hub
            )
            .unwrap()
        );
        // b has not heard of d1 yet, but of d2; from a sibling.
        assert!(
            dev.take_revocations(
                &list(&["d-0000000000000002"], NOON + 10).sign(&b.secret),
                ListSource::Sibling
            )
            .unwrap()
        );
        let union = dev.revocation_list().unwrap().unwrap();
        assert!(union.revokes_device(&d1) && union.revokes_device(&d2));
        assert_eq!(dev.held_revocations().unwrap().len(), 2);
        // Per signer: b's older list is not taken from a sibling, a lower version never.
        assert!(
            !dev.take_revocations(
                &list(&["d-0000000000000002"], NOON).sign(&b.secret),
                ListSource::Sibling
            )
            .unwrap()
        );
        assert!(
            !dev.take_revocations(&list(&[], NOON + 99).sign(&a.secret), ListSource::Hub)
                .unwrap()
        );
        // A third hub's list: refused.
        assert!(
            !dev.take_revocations(
                &list(&["d-0000000000000003"], NOON).sign(&[3; 32]),
                ListSource::Hub
            )
            .unwrap()
        );
        // Each hub is told of its own list.
        assert_eq!(
            dev.refresh_have_for(NOON, Some(&a.id)).unwrap().revocations,
            Some((1, u32::try_from(NOON).unwrap()))
        );
        assert_eq!(
            dev.refresh_have_for(NOON, Some(&b.id)).unwrap().revocations,
            Some((1, u32::try_from(NOON + 10).unwrap()))
        );
        // b rebuilt as c: b's list still counts (revocations are never withdrawn).
        let c = hub(3);
        dev.apply_refresh_from(
            &a.id,
            &Refresh {
                peer_hub: Some(peer_of(&c, 7456, 5)),
                ..Refresh::default()
            },
        )
        .unwrap();
        let union = dev.revocation_list().unwrap().unwrap();
        assert!(union.revokes_device(&d1) && union.revokes_device(&d2));
        // ... but a retired hub's new lists are not taken.
        assert!(
            !dev.take_revocations(
                &list(&["d-0000000000000002", "d-0000000000000004"], NOON + 20).sign(&b.secret),
                ListSource::Hub
            )
            .unwrap()
        );
    }

    #[test]
    fn the_hub_that_answered_last_is_dialled_first_and_each_hub_has_its_sync_states() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (hub(1), hub(2));
        let mut dev = enrolled_two(&tmp, &a, &b, 35);
        let order = |dev: &Device| -> Vec<String> {
            crate::net::hub_targets(dev)
                .unwrap()
                .iter()
                .map(|t| t.id.to_string())
                .collect()
        };
        assert_eq!(order(&dev), vec![a.id.clone(), b.id.clone()]);
        dev.mark_synced_with(&b.id, NOON, None, &[]).unwrap();
        assert_eq!(order(&dev), vec![b.id.clone(), a.id.clone()]);
        let st = dev.status(NOON + 5).unwrap();
        assert_eq!(st.last_sync, Some(NOON));
        assert_eq!(
            (st.hubs[0].last_sync, st.hubs[1].last_sync),
            (None, Some(NOON))
        );
        dev.mark_synced_with(&a.id, NOON + 9, None, &[]).unwrap();
        assert_eq!(order(&dev), vec![a.id.clone(), b.id.clone()]);
        let hub = shared::sync::Peer::Hub {
            region: "mapo".into(),
        };
        assert_ne!(
            crate::replica::peer_key(&hub, Some(&a.id)),
            crate::replica::peer_key(&hub, Some(&b.id))
        );
    }
}
