//! The hub's ledger: the merged partitions, the per-peer automerge sync states and the trace
//! index, all in `hub.redb`, and retention over them.
//!
//! **Partitions** are stored as automerge chunks, exactly like the edge's `chunks-1` but keyed
//! by facility as well: each persist appends `save_incremental()`, and after
//! [`COMPACT_AFTER_CHUNKS`] chunks a partition is rewritten as one full save. The envelopes in
//! them are sealed to the day keys, so the chunks reveal nothing without `keys/`.
//!
//! **The trace index** answers "where was this token?" and "who else was at that facility
//! then?" without unsealing partitions at query time, yet becomes unreadable when a day
//! expires. Every key and value in it is derived from the day's *index key*
//! ([`DayKeyRatchet::index_key`]), which comes from the same ratchet seed as the day secret:
//!
//! - lookup tags are BLAKE3 keyed hashes of the token (or the facility id) under keys derived
//!   from the index key, so without it a tag cannot be linked to any token or facility;
//! - under the facility's tag, one [`hub::VisitBatch`] per persist holds every visit it
//!   indexed there, sealed with XChaCha20-Poly1305 under a third derived key (a trace reads
//!   all of a facility-day's visits anyway; one seal and one nonce per batch, the facility id
//!   once and each device once, instead of per visit);
//! - under the token's tag, one 36-byte row per facility the token visited that day says
//!   which facility's batches hold the visit, encrypted deterministically (SIV, see
//!   [`DayIndex::token_row`]): a trace opens those batches and finds the token's visits in
//!   them.
//!
//! When [`Ledger::purge`] advances the ratchet past a day, the index key of that day is gone
//! with its seed: the day's rows are deleted as well, but even a copy of the file taken before
//! the deletion, or free pages that still hold the rows, can no longer be read or linked.
//!
//! `docs/storage.md` documents every table. Facility ids appear in clear in the keys of
//! `hub-chunks-1`, `partition-counts-1`, `partition-heads-1`, `fallback-counts-1`, `indexed-2`
//! and `sync-states-1`: which facility had how many visits on which day is metadata the hub's
//! administrators see anyway (it is in `stats`), and it names no visitor; device ids, in
//! `device-day-records-1`, with how many records each delivered per day (the quota's count).

pub mod runs;

use crate::keys::{KeyDir, KeyError};
use crate::store::{Store, StoreError as RegistryError};
use automerge::ReadDoc;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_core::{OsRng, RngCore};
use redb::{
    MultimapTableDefinition, MultimapTableHandle, ReadableDatabase, ReadableMultimapTable,
    ReadableTable, TableDefinition, TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use shared::daykey::{DayKeyRatchet, DaySecret};
use shared::envelope::{Envelope, EnvelopeError, Record, RecordBody, SessionId};
use shared::hub;
use shared::partition::{Partition, PartitionError};
use shared::sync::{
    MAX_FUTURE_DAYS, PartitionStore, PartitionSummary, Peer, StoreError as SessionStoreError,
};
use shared::time::{Day, UnixSeconds, horizon};
use shared::unseal::{Opened, PartitionOpener};
use shared::{DeviceId, FacilityId, PartitionId, RecordId};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use zeroize::Zeroizing;

/// `hub-chunks-1`: (facility, day, sequence) -> automerge chunk of that partition.
pub const HUB_CHUNKS: TableDefinition<(&str, u32, u64), &[u8]> =
    TableDefinition::new("hub-chunks-1");
/// `sync-states-1`: (peer key, facility, day) -> encoded `automerge::sync::State`.
pub const SYNC_STATES: TableDefinition<(&str, &str, u32), &[u8]> =
    TableDefinition::new("sync-states-1");
/// `visits-by-token-3`, the token index as one B-tree, which the sorted runs of
/// `token-runs-1` ([`runs`]) replaced: (day, token tag, row tag) -> which facility the token
/// visited that day, sealed: 8 bytes of the facility's tag, encrypted deterministically
/// ([`DayIndex::token_row`]), the row tag being their synthetic IV. The runs hold the very same
/// rows (token tag, row tag, sealed locator); [`Ledger::open`] moves them there, in chunks of
/// [`MIGRATE_TOKEN_ROWS`] rows a transaction, and deletes this table. Public for the tests of
/// that move.
pub const VISITS_BY_TOKEN_V3: TableDefinition<TokenKey, &[u8; 8]> =
    TableDefinition::new("visits-by-token-3");
/// Rows of `visits-by-token-3` moved into runs per write transaction when [`Ledger::open`]
/// migrates them.
const MIGRATE_TOKEN_ROWS: usize = 65_536;
/// A key of `visits-by-token-3`: (day, token tag, row tag).
pub type TokenKey = (u32, &'static [u8; 16], &'static [u8; 8]);
/// `visits-by-token-2`, which held a sealed [`IndexedVisit`] per QR visit: (day, token tag,
/// n) -> sealed visit. Every visit in it is also in `visits-by-facility-1` (both were written
/// from the same visits in one transaction), so [`Ledger::open`] rebuilds the new index from
/// the facility batches and deletes this table.
const VISITS_BY_TOKEN_V2: TableDefinition<(u32, &[u8; 32], u16), &[u8]> =
    TableDefinition::new("visits-by-token-2");
/// `visits-by-token-1`, the multimap before `visits-by-token-2`: deleted like it.
const VISITS_BY_TOKEN_V1: MultimapTableDefinition<(u32, &[u8; 32]), &[u8]> =
    MultimapTableDefinition::new("visits-by-token-1");
/// `visits-by-facility-2`: (day, facility tag, n) -> one sealed [`hub::VisitBatch`]: every
/// visit (QR and paper) one persist indexed at that facility, the facility id once and each
/// device once. `n` numbers the facility-day's batches from 0.
pub const VISITS_BY_FACILITY: TableDefinition<(u32, &[u8; 16], u32), &[u8]> =
    TableDefinition::new("visits-by-facility-2");
/// `visits-by-facility-1`, the multimap `visits-by-facility-2` replaced: (day, 32-byte
/// facility tag) -> sealed `Vec<IndexedVisit>` batches. [`Ledger::open`] converts its rows,
/// in chunks of [`MIGRATE_CHUNK_KEYS`] facility-days a transaction, and deletes it.
const VISITS_BY_FACILITY_V1: MultimapTableDefinition<(u32, &[u8; 32]), &[u8]> =
    MultimapTableDefinition::new("visits-by-facility-1");
/// Facility-days of `visits-by-facility-1` converted per write transaction when
/// [`Ledger::open`] migrates the index.
const MIGRATE_CHUNK_KEYS: usize = 256;
/// `indexed-2`: (facility, day, sequence) -> the ids of the records one persist indexed,
/// 16 bytes each, concatenated. One row per persist instead of one per record: knowing what is
/// indexed costs one insert a persist, not one a record (a tenth of ingest's time).
pub const INDEXED: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("indexed-2");
/// `indexed-1`, the per-record form `indexed-2` replaced: (facility, day, record id) -> ().
/// [`Ledger::open`] moves its rows into `indexed-2` and deletes it.
const INDEXED_V1: TableDefinition<(&str, u32, &[u8; 16]), ()> = TableDefinition::new("indexed-1");
/// `partition-counts-1`: (facility, day) -> records the stored partition holds.
pub const PARTITION_COUNTS: TableDefinition<(&str, u32), u64> =
    TableDefinition::new("partition-counts-1");
/// `partition-heads-1`: (facility, day) -> the stored partition's sorted automerge heads,
/// 32 bytes each, so that a session's summaries need not load every partition.
pub const PARTITION_HEADS: TableDefinition<(&str, u32), &[u8]> =
    TableDefinition::new("partition-heads-1");
/// `fallback-counts-1`: (facility, day) -> records of that partition indexed so far whose
/// session key was wrapped to an earlier day's key (the device's day-key fallback after it ran
/// out of day public keys). Such records become unreadable when that earlier day expires, up
/// to `DAY_KEYS_AHEAD` days before their own day does; operators see how many in `stats` and
/// `/metrics`. Absent: none.
pub const FALLBACK_COUNTS: TableDefinition<(&str, u32), u64> =
    TableDefinition::new("fallback-counts-1");
/// `device-day-records-1`: (device id, UTC day the hub received them) -> new records the
/// device's sessions delivered that day, the count the hub's per-device daily quota is checked
/// against (`daemon::Quotas`). Written in the transaction that persists the records, so the
/// count never disagrees with what is stored. Absent: none.
pub const DEVICE_DAY_RECORDS: TableDefinition<(&str, u32), u64> =
    TableDefinition::new("device-day-records-1");
/// `device-day-keys-1`: (device id, UTC day the hub received them) -> new wrapped keys (`k/`
/// entries) the device's sessions delivered that day, the count the wrapped-keys-per-device-
/// per-day quota is checked against (`daemon::Quotas`). Written with `device-day-records-1`.
/// Absent: none.
pub const DEVICE_DAY_KEYS: TableDefinition<(&str, u32), u64> =
    TableDefinition::new("device-day-keys-1");

/// `sync-refusals-1`: refusal reason (`RefuseReason` as its Rust name) -> sync sessions the
/// hub ended with that refusal, either side refusing (`sync-hub stats`). Absent: none.
pub const SYNC_REFUSALS: TableDefinition<&str, u64> = TableDefinition::new("sync-refusals-1");
/// `recent-refusals-1`: sequence number -> JSON of a [`RefusalNote`]; the last
/// [`RECENT_REFUSALS`] refusals, older rows deleted as new ones come (`sync-hub stats`).
pub const RECENT_REFUSALS_TABLE: TableDefinition<u64, &[u8]> =
    TableDefinition::new("recent-refusals-1");
/// `revoked-records-refused-1`: device id -> records attributed to that device (the sealed
/// record's `device`) that a sibling relayed after the device was revoked and that the hub
/// therefore left out of the trace index (`sync-hub stats`, `/metrics`
/// `kipass_hub_revoked_records_refused_total`). Their changes are stored all the same. Each
/// such record is counted once: it is marked in `indexed-2` like an indexed one. Absent: none.
pub const REVOKED_REFUSED: TableDefinition<&str, u64> =
    TableDefinition::new("revoked-records-refused-1");
/// How many recent refusals `sync-hub stats` lists.
pub const RECENT_REFUSALS: u64 = 20;

/// One refused sync session, as `sync-hub stats` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalNote {
    /// When, the hub's clock.
    pub at: UnixSeconds,
    /// The device, as its hello named it (absent before a hello).
    pub device: Option<String>,
    /// The reason (`RefuseReason`'s name).
    pub reason: String,
    /// Who refused: `local` (the hub) or `peer` (the device).
    pub by: String,
    /// The refusal's detail, cut to 200 characters.
    pub detail: String,
}

/// What a persist charges to the device whose session delivered it (`device-day-records-1`,
/// `device-day-keys-1`); the quota rule over it is `shared::hub::DeviceQuota`.
pub use shared::hub::Charge;

/// Chunks after which a partition is rewritten as one full save. One chunk is written per
/// partition per sync session, so this is about a day of busy syncing; loading 64 chunks
/// costs little more than loading one.
pub const COMPACT_AFTER_CHUNKS: u64 = 64;

/// Domain separation for the key of token tags, from a day's index key.
const TOKEN_TAG_CONTEXT: &str = "kipass hub index token tag v1";
/// Domain separation for the key of facility tags, from a day's index key.
const FACILITY_TAG_CONTEXT: &str = "kipass hub index facility tag v1";
/// Domain separation for the key sealing index values, from a day's index key.
const SEAL_CONTEXT: &str = "kipass hub index seal v1";
/// Domain separation for the MAC (synthetic IV) of token rows, from a day's index key.
const TOKEN_ROW_MAC_CONTEXT: &str = "kipass hub index token row mac v1";
/// Domain separation for the pad encrypting token rows, from a day's index key.
const TOKEN_ROW_PAD_CONTEXT: &str = "kipass hub index token row pad v1";
/// Domain separation for the hub's automerge actor prefix.
const ACTOR_CONTEXT: &str = "kipass hub automerge actor v1";
/// Associated-data label of sealed index values.
const SEAL_LABEL: &[u8] = b"kipass hub visit v1";
const NONCE_LEN: usize = 24;

/// A ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// redb failed.
    #[error("hub ledger storage failed: {0}; check the disk holding the hub's data folder")]
    Db(#[from] redb::Error),
    /// The registry part of the store failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The key files failed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// A stored partition does not load.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// The partition's day is past the retention horizon: it is never stored.
    #[error(
        "partition {partition} is past the retention horizon (oldest live day {horizon}): \
         expired partitions are never stored; the device should drop it"
    )]
    Expired {
        /// The partition refused.
        partition: PartitionId,
        /// The oldest live day.
        horizon: Day,
    },
    /// The changes of this session conflict with what another session stored meanwhile (a
    /// key put with other bytes): nothing of this copy is stored.
    #[error(
        "partition {partition} conflicts with what another session stored meanwhile: {detail}; \
         nothing of this session's copy was stored"
    )]
    Conflict {
        /// The partition refused.
        partition: PartitionId,
        /// The conflicting key.
        detail: String,
    },
    /// The partition's day lies beyond tomorrow.
    #[error(
        "partition {partition} is of a day after {last}: the writing device's clock runs \
         ahead; it is accepted once the hub's calendar reaches it"
    )]
    Ahead {
        /// The partition refused.
        partition: PartitionId,
        /// The last day accepted now.
        last: Day,
    },
    /// A stored ledger value did not parse.
    #[error("damaged entry in hub table {table}: {reason}; restore hub.redb from a backup")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The keyed revocation list does not verify (see `crate::auth::revocations`): nothing
    /// is indexed or stored until an operator restores it, as no session is admitted either.
    #[error("cannot index: {0}")]
    Revocations(String),
    /// An index entry could not be sealed (an absurdly large record).
    #[error("cannot seal an index entry: {0}")]
    Seal(String),
    /// zstd could not pack a partition's save (out of memory).
    #[error("cannot pack a partition's save: {0}")]
    Pack(std::io::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for LedgerError {
            fn from(e: $t) -> Self {
                LedgerError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<LedgerError> for SessionStoreError {
    fn from(e: LedgerError) -> Self {
        SessionStoreError::Failed(e.to_string())
    }
}

/// One visit as the trace index holds it, sealed under the day's index key (the hub core's
/// type: `shared::hub`).
pub use shared::hub::IndexedVisit;

/// `sync-hub stats`: registered facilities and the live records the hub holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Registered facilities.
    pub facilities: usize,
    /// Records in live partitions, summed over `per_facility`.
    pub records: u64,
    /// Records in live partitions by facility id: every registered facility (0 if none), and
    /// any removed facility whose partitions are still live.
    pub per_facility: BTreeMap<String, u64>,
    /// Records in live partitions sealed to an earlier day's key by the device's day-key
    /// fallback: they become unreadable before their own day expires.
    pub records_fallback_key: u64,
    /// `records_fallback_key` by facility id (only facilities that have any).
    pub fallback_per_facility: BTreeMap<String, u64>,
    /// Sync sessions ended by a refusal, by reason (`sync-refusals-1`).
    pub refusals_by_reason: BTreeMap<String, u64>,
    /// The last few refusals, newest first (`recent-refusals-1`).
    pub recent_refusals: Vec<RefusalNote>,
    /// Records a sibling relayed that their device wrote at or after its revocation, left out
    /// of the trace index (`revoked-records-refused-1`, summed).
    pub revoked_records_refused: u64,
    /// `revoked_records_refused` by device id (only devices that have any).
    pub revoked_refused_per_device: BTreeMap<String, u64>,
}

/// One visit of a traced token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceVisit {
    /// The token, 32 hex characters.
    pub token: String,
    /// Where.
    pub facility_id: FacilityId,
    /// When, by the recording device's clock.
    pub scanned_at: UnixSeconds,
    /// Which device recorded it.
    pub device_id: DeviceId,
}

/// A visit at the same facility within the window of one of the traced visits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceContact {
    /// The contact's token, 32 hex characters; absent for a paper entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A paper-log entry: the health authority opens it with its own key.
    pub paper: bool,
    /// Where.
    pub facility_id: FacilityId,
    /// When, by the recording device's clock.
    pub scanned_at: UnixSeconds,
}

/// `sync-hub trace`: what the hub knows about a case's tokens (`spec/cli.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Trace {
    /// The tokens' visits, by time.
    pub visits: Vec<TraceVisit>,
    /// Every other visit at the same facility within the window of one of them, by time.
    pub contacts: Vec<TraceContact>,
    /// Visited facilities with a device that has not synced since the end of the window of
    /// the latest visit there: the hub may not know every contact yet.
    pub unsynced_facilities: Vec<FacilityId>,
}

/// What [`Ledger::trace_facts`] found, as indexed visits (each in time order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceFacts {
    /// The case's visits.
    pub visits: Vec<IndexedVisit>,
    /// Every other visit at the same facility within the window of one of them.
    pub contacts: Vec<IndexedVisit>,
    /// Visited facilities that may still hold unsynced visits.
    pub unsynced: Vec<FacilityId>,
}

/// What [`Ledger::facility_activity`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FacilityActivity {
    /// Visits at or after the time asked about.
    pub visits_since: u64,
    /// The latest visit the hub holds.
    pub last_visit: Option<UnixSeconds>,
}

/// What one [`Ledger::persist_counted`] indexed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Persisted {
    /// Records newly indexed.
    pub indexed: u64,
    /// Of those, records whose session key was wrapped to an earlier day's key than the
    /// partition's (the device's day-key fallback).
    pub fallback: u64,
    /// Records left out of the index because their device was revoked before it sealed them
    /// (counted in `revoked-records-refused-1`; their changes are stored).
    pub revoked_refused: u64,
}

/// What [`Ledger::purge`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PurgeReport {
    /// The oldest live day afterwards: every day before it is gone.
    pub horizon: Day,
    /// Partitions dropped.
    pub partitions: u64,
    /// Records those partitions held.
    pub records: u64,
    /// Chunks deleted.
    pub chunks: u64,
    /// Sync states deleted.
    pub sync_states: u64,
    /// Index entries deleted (both index tables).
    pub index_entries: u64,
}

/// The key used in `sync-states-1` for a peer: a device's id, or `hub:` and the region for a
/// hub (device ids cannot contain `:`, so the two never collide).
pub fn peer_key(peer: &Peer) -> String {
    match peer {
        Peer::Device { device, .. } => device.to_string(),
        Peer::Hub { region } => format!("hub:{region}"),
        // One state per facility's partitions: the partition id already names the facility,
        // so the peer hub's sessions of every facility share one key.
        Peer::HubLink { region, .. } => format!("hublink:{region}"),
    }
}

/// Rewrites the store file so that deleted pages no longer hold old rows. Needs exclusive
/// access to the database; best effort (it fails while a read transaction is open).
/// Call it after [`Ledger::purge`].
pub fn compact(db: &mut redb::Database) -> bool {
    db.compact().unwrap_or(false)
}

/// Which index table a sealed value belongs to; bound into its associated data so a value
/// cannot be moved from one table to another. `Facility` is a row of `visits-by-facility-1`,
/// only opened to convert it (1 was `visits-by-token-2`'s, never opened any more).
#[derive(Clone, Copy)]
enum IndexKind {
    Facility = 2,
    Batch = 3,
}

/// The keys of one day's index, derived from its index key.
struct DayIndex {
    day: Day,
    token_key: Zeroizing<[u8; 32]>,
    facility_key: Zeroizing<[u8; 32]>,
    row_mac_key: Zeroizing<[u8; 32]>,
    row_pad_key: Zeroizing<[u8; 32]>,
    // Zeroizes its key on drop.
    cipher: XChaCha20Poly1305,
}

impl DayIndex {
    fn new(day: Day, index_key: &[u8; 32]) -> Self {
        let seal = Zeroizing::new(blake3::derive_key(SEAL_CONTEXT, index_key));
        DayIndex {
            day,
            token_key: Zeroizing::new(blake3::derive_key(TOKEN_TAG_CONTEXT, index_key)),
            facility_key: Zeroizing::new(blake3::derive_key(FACILITY_TAG_CONTEXT, index_key)),
            row_mac_key: Zeroizing::new(blake3::derive_key(TOKEN_ROW_MAC_CONTEXT, index_key)),
            row_pad_key: Zeroizing::new(blake3::derive_key(TOKEN_ROW_PAD_CONTEXT, index_key)),
            cipher: XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(seal.as_ref())),
        }
    }

    /// The token's tag: 16 bytes of a keyed hash (a collision between two tokens of a day,
    /// about 2^-128 a pair, would only make a trace read one more batch: a batch's visits are
    /// matched on the token itself).
    fn token_tag(&self, token: &[u8; 16]) -> [u8; 16] {
        first::<16>(blake3::keyed_hash(&self.token_key, token).as_bytes())
    }

    /// The facility's tag in `visits-by-facility-2`: the first 16 bytes of its
    /// `visits-by-facility-1` tag ([`Self::facility_tag_v1`]).
    fn facility_tag(&self, facility: &FacilityId) -> [u8; 16] {
        first::<16>(&self.facility_tag_v1(facility))
    }

    fn facility_tag_v1(&self, facility: &FacilityId) -> [u8; 32] {
        *blake3::keyed_hash(&self.facility_key, facility.as_str().as_bytes()).as_bytes()
    }

    /// The token row (of a run of `token-runs-1`) saying that the token of `tag` visited the
    /// facility of tag `facility` this day: (row tag, sealed locator), the locator being the
    /// first 8 bytes of the facility tag.
    ///
    /// Deterministic authenticated encryption (SIV: Rogaway and Shrimpton, 2006), with no
    /// stored nonce: the row tag is a MAC (keyed BLAKE3) of (day, token tag, locator), and the
    /// locator is encrypted by XOR with a pad that is a PRF (keyed BLAKE3, another key) of
    /// (day, token tag, row tag). A pad is reused only for the same key and the same
    /// plaintext: two different locators under one token tag and day get different row tags
    /// (but for a 64-bit collision, 2^-64 a pair), so different pads; the same locator gives
    /// the very same row, which is the same key written again (an idempotent insert). Nothing
    /// else goes into a pad, so no crash, retry, migration or rewrite can pair one pad with two
    /// plaintexts. Without the day's index key the row is a pseudorandom 36 bytes; with it,
    /// a forged or moved row opens with probability 2^-64 and then only sends a trace to a
    /// batch where it looks for the token itself.
    fn token_row(&self, tag: &[u8; 16], facility: &[u8; 16]) -> ([u8; 8], [u8; 8]) {
        let locator = first::<8>(facility);
        let row = self.token_row_mac(tag, &locator);
        let pad = self.token_row_pad(tag, &row);
        (row, xor8(&locator, &pad))
    }

    /// The locator (first 8 bytes of the facility tag) a token row seals, or `None` if the
    /// row does not open (damaged, forged, moved, or of another day's key).
    fn open_token_row(&self, tag: &[u8; 16], row: &[u8; 8], sealed: &[u8; 8]) -> Option<[u8; 8]> {
        let locator = xor8(sealed, &self.token_row_pad(tag, row));
        let expected = self.token_row_mac(tag, &locator);
        // Constant time, as MACs are compared.
        let same = expected
            .iter()
            .zip(row)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        same.then_some(locator)
    }

    fn token_row_mac(&self, tag: &[u8; 16], locator: &[u8; 8]) -> [u8; 8] {
        self.token_row_hash(&self.row_mac_key, tag, locator)
    }

    fn token_row_pad(&self, tag: &[u8; 16], row: &[u8; 8]) -> [u8; 8] {
        self.token_row_hash(&self.row_pad_key, tag, row)
    }

    /// `keyed_hash(key, day (u32 BE) || tag || last)[..8]`: a token row's tag and its pad.
    fn token_row_hash(&self, key: &[u8; 32], tag: &[u8; 16], last: &[u8; 8]) -> [u8; 8] {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(&self.day.0.to_be_bytes());
        h.update(tag);
        h.update(last);
        first::<8>(h.finalize().as_bytes())
    }

    fn aad(&self, kind: IndexKind, tag: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(SEAL_LABEL.len() + 1 + 4 + tag.len());
        aad.extend_from_slice(SEAL_LABEL);
        aad.push(kind as u8);
        aad.extend_from_slice(&self.day.0.to_be_bytes());
        aad.extend_from_slice(tag);
        aad
    }

    /// `nonce (24) || ciphertext` of the postcard-encoded plaintext. A random nonce: one per
    /// batch, not per visit, so its 24 bytes are shared by every visit of a persist.
    fn seal(
        &self,
        rng: &mut impl RngCore,
        kind: IndexKind,
        tag: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, LedgerError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let aad = self.aad(kind, tag);
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| LedgerError::Seal(format!("{} bytes", plaintext.len())))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// What `bytes` seals, decoded, or `None` if it does not open or decode (damaged).
    fn open<T: serde::de::DeserializeOwned>(
        &self,
        kind: IndexKind,
        tag: &[u8],
        bytes: &[u8],
    ) -> Option<T> {
        let (nonce, ct) = bytes.split_at_checked(NONCE_LEN)?;
        let aad = self.aad(kind, tag);
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
                .ok()?,
        );
        postcard::from_bytes(&plain).ok()
    }

    /// The token rows and the sealed batch that index `visits`, all at `facility`.
    fn seal_visits(
        &self,
        rng: &mut impl RngCore,
        facility: &FacilityId,
        visits: &[IndexedVisit],
    ) -> Result<(Vec<runs::Row>, Vec<Vec<u8>>), LedgerError> {
        if visits.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let rows = self.token_rows(facility, visits);
        let batches = self.seal_batches(rng, facility, visits)?;
        Ok((rows, batches))
    }

    /// The token rows of `visits` at `facility` (those with a token), for a run of
    /// `token-runs-1`.
    fn token_rows(&self, facility: &FacilityId, visits: &[IndexedVisit]) -> Vec<runs::Row> {
        let ftag = self.facility_tag(facility);
        visits
            .iter()
            .filter_map(|v| v.token.as_ref())
            .map(|token| {
                let tag = self.token_tag(token);
                let (row, sealed) = self.token_row(&tag, &ftag);
                runs::row(&tag, &row, &sealed)
            })
            .collect()
    }

    /// The sealed batches of `visits` at `facility` for `visits-by-facility-2`, one per
    /// [`BATCH_VISITS`] visits.
    fn seal_batches(
        &self,
        rng: &mut impl RngCore,
        facility: &FacilityId,
        visits: &[IndexedVisit],
    ) -> Result<Vec<Vec<u8>>, LedgerError> {
        let ftag = self.facility_tag(facility);
        let mut batches = Vec::with_capacity(visits.len().div_ceil(BATCH_VISITS));
        for group in visits.chunks(BATCH_VISITS) {
            let plain = Zeroizing::new(
                postcard::to_stdvec(&hub::VisitBatch::new(facility, group))
                    .map_err(|e| LedgerError::Seal(e.to_string()))?,
            );
            batches.push(self.seal(rng, IndexKind::Batch, &ftag, &plain)?);
        }
        Ok(batches)
    }

    /// The visits of the batch `bytes` stored under facility tag `tag`, or `None` if it does
    /// not open or decode (damaged).
    #[cfg(test)]
    fn open_batch(&self, tag: &[u8; 16], bytes: &[u8]) -> Option<Vec<IndexedVisit>> {
        self.open::<hub::VisitBatch>(IndexKind::Batch, tag, bytes)?
            .visits()
    }
}

/// The most visits one sealed batch of `visits-by-facility-2` holds: about 36 bytes each, so a
/// batch fits in one page of redb's (4 KiB, less its leaf's header and key). A larger value is
/// stored in a power of two of pages of its own: a 120-visit batch (4.4 KiB) took 8 KiB, a
/// third of the table's pages empty (measured at a million visits).
const BATCH_VISITS: usize = 100;

/// The first `N` bytes of `bytes` (which holds at least `N`).
fn first<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn xor8(a: &[u8; 8], b: &[u8; 8]) -> [u8; 8] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// What [`Ledger::reader`] needs of the actor's ledger: its day keys and automerge actor.
pub struct ReadKeys {
    ratchet: DayKeyRatchet,
    actor: [u8; 16],
}

/// The hub's ledger over its store and day-key ratchet. See the module docs.
///
/// It holds the ratchet in memory; [`Ledger::purge`] advances it and the key file together.
/// Open one ledger per process (the sync actor's), so that every path sees the same horizon;
/// readers off the actor take its day keys ([`Ledger::read_keys`], [`Ledger::reader`]).
pub struct Ledger<'s> {
    store: &'s Store,
    keys: KeyDir,
    ratchet: DayKeyRatchet,
    actor: [u8; 16],
    /// The keyed revocation list as read in the actor's current turn ([`Store::group_epoch`]).
    revoked: std::sync::Mutex<Option<(u64, std::sync::Arc<crate::auth::RevocationList>)>>,
    /// Session keys the connections' side unwrapped ahead ([`Ledger::unwrap_ahead`]).
    ahead: Option<std::sync::Arc<crate::ahead::UnwrapAhead>>,
}

impl fmt::Debug for Ledger<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("ratchet", &self.ratchet)
            .finish_non_exhaustive()
    }
}

impl<'s> Ledger<'s> {
    /// Opens the ledger tables (creating them if missing) and reads the day-key ratchet.
    pub fn open(store: &'s Store, keys: KeyDir) -> Result<Self, LedgerError> {
        let ratchet = keys.ratchet()?;
        let txn = store.db().begin_write()?;
        txn.open_table(HUB_CHUNKS)?;
        txn.open_table(SYNC_STATES)?;
        txn.open_table(runs::TOKEN_RUNS)?;
        txn.open_table(runs::TOKEN_RUN_SIZES)?;
        txn.open_table(VISITS_BY_FACILITY)?;
        txn.open_table(INDEXED)?;
        txn.open_table(PARTITION_COUNTS)?;
        txn.open_table(PARTITION_HEADS)?;
        txn.open_table(FALLBACK_COUNTS)?;
        txn.open_table(DEVICE_DAY_RECORDS)?;
        txn.open_table(DEVICE_DAY_KEYS)?;
        txn.open_table(SYNC_REFUSALS)?;
        txn.open_table(RECENT_REFUSALS_TABLE)?;
        txn.open_table(REVOKED_REFUSED)?;
        migrate_indexed_v1(&txn)?;
        txn.commit()?;
        migrate_index_v1(store, &ratchet)?;
        migrate_token_index_v3(store)?;
        // The actor that merges into partitions at this hub: 8 bytes naming the hub, 8 random
        // bytes per process, so a restarted hub never reuses an automerge sequence number
        // (see `shared::partition`). The hub never writes records itself, so this matters only
        // for the correctness of the documents it holds.
        let name = store
            .config::<crate::registry::HubConfig>("hub")?
            .map(|c| c.endpoint_id)
            .unwrap_or_default();
        let mut actor = [0u8; 16];
        actor[..8].copy_from_slice(&blake3::derive_key(ACTOR_CONTEXT, name.as_bytes())[..8]);
        OsRng.fill_bytes(&mut actor[8..]);
        Ok(Ledger {
            store,
            keys,
            ratchet,
            actor,
            revoked: Default::default(),
            ahead: None,
        })
    }

    /// A handle on the same tables for a reader on another thread (the hub's reads off its
    /// actor, `crate::reads`), with the day keys the ledger that handed out `keys` held then
    /// ([`Ledger::read_keys`]). Opens nothing and writes nothing: every read method begins its
    /// own redb read transaction, an MVCC snapshot that never waits for the writer.
    pub fn reader(store: &'s Store, dir: KeyDir, keys: ReadKeys) -> Self {
        Ledger {
            store,
            keys: dir,
            ratchet: keys.ratchet,
            actor: keys.actor,
            revoked: Default::default(),
            ahead: None,
        }
    }

    /// Shares this ledger's day keys with `ahead`, where the connections' side unwraps the
    /// session keys of the `Sync` messages it reads ([`crate::ahead`]), and takes the keys
    /// found there in its persists instead of unwrapping them again. The ratchet `ahead`
    /// holds follows this ledger's (its purges advance both).
    pub fn unwrap_ahead(&mut self, ahead: std::sync::Arc<crate::ahead::UnwrapAhead>) {
        ahead.set_ratchet(&self.ratchet);
        self.ahead = Some(ahead);
    }

    /// Offers `opener` the keys of `sessions` unwrapped ahead from the wrapped keys its
    /// partition holds ([`PartitionOpener::offer_unwrapped`]).
    fn take_ahead(&self, opener: &mut Opener<'_>, sessions: &BTreeSet<SessionId>) {
        let Some(ahead) = &self.ahead else {
            return;
        };
        for session in sessions {
            let Some(wrapped) = opener.wrapped_key(*session).cloned() else {
                continue;
            };
            if let Some(key) = ahead.take(&wrapped) {
                opener.offer_unwrapped(&wrapped, key);
            }
        }
    }

    /// This ledger's day keys and automerge actor as they are now, for [`Ledger::reader`].
    pub fn read_keys(&self) -> Result<ReadKeys, LedgerError> {
        let ratchet =
            DayKeyRatchet::from_bytes(self.ratchet.to_bytes().as_slice()).map_err(|e| {
                LedgerError::Corrupt {
                    table: "day-ratchet",
                    reason: e.to_string(),
                }
            })?;
        Ok(ReadKeys {
            ratchet,
            actor: self.actor,
        })
    }

    /// The automerge actor partitions are loaded and created with.
    pub fn actor(&self) -> [u8; 16] {
        self.actor
    }

    /// The day-key ratchet as the ledger holds it.
    pub fn ratchet(&self) -> &DayKeyRatchet {
        &self.ratchet
    }

    /// The oldest live day at `now`: the horizon, or later if a purge ran ahead of the clock.
    pub fn oldest_live_day(&self, now: UnixSeconds) -> Day {
        horizon(now).max(self.ratchet.oldest())
    }

    /// The last day accepted at `now`: tomorrow, as the sync protocol allows.
    pub fn last_live_day(now: UnixSeconds) -> Day {
        Day::of(now).plus(MAX_FUTURE_DAYS)
    }

    /// The partitions of `facility`, for one sync session admitted for it.
    pub fn partitions(&self, facility: FacilityId, now: UnixSeconds) -> HubPartitions<'_> {
        self.resume(facility, now, BTreeMap::new())
    }

    /// Like [`Self::partitions`], with the partitions a previous [`HubPartitions`] of the same
    /// session loaded ([`HubPartitions::into_cache`]), so that a shell that handles one frame
    /// at a time does not load every partition again for each frame. Cached partitions that
    /// another session changed since are caught up when persisted; partitions of another
    /// facility are dropped.
    pub fn resume(
        &self,
        facility: FacilityId,
        now: UnixSeconds,
        mut cache: BTreeMap<PartitionId, Partition>,
    ) -> HubPartitions<'_> {
        cache.retain(|id, _| id.facility == facility);
        HubPartitions {
            ledger: self,
            facility,
            now,
            cache,
        }
    }

    /// The opener of `partition`'s records with this ledger's day secrets.
    fn opener(&self, partition: &Partition) -> Opener<'_> {
        PartitionOpener::new(partition, self.secrets())
    }

    /// This ledger's day secrets, as an opener asks for them.
    fn secrets(&self) -> Secrets<'_> {
        let ratchet = &self.ratchet;
        Box::new(move |day| ratchet.secret(day))
    }

    fn check_live(&self, id: &PartitionId, now: UnixSeconds) -> Result<(), LedgerError> {
        let oldest = self.oldest_live_day(now);
        if id.day < oldest {
            return Err(LedgerError::Expired {
                partition: id.clone(),
                horizon: oldest,
            });
        }
        let last = Self::last_live_day(now);
        if id.day > last {
            return Err(LedgerError::Ahead {
                partition: id.clone(),
                last,
            });
        }
        Ok(())
    }

    /// The stored partition `id`, if the hub holds it.
    pub fn load(&self, id: &PartitionId) -> Result<Option<Partition>, LedgerError> {
        let txn = self.store.db().begin_read()?;
        let chunks = txn.open_table(HUB_CHUNKS)?;
        let bytes = read_chunks(&chunks, id)?;
        match bytes {
            Some(bytes) => Ok(Some(Partition::load(id.clone(), &bytes, &self.actor)?)),
            None => Ok(None),
        }
    }

    /// Summaries of the live stored partitions of `facility`, from the counts and heads
    /// tables (no partition is loaded).
    pub fn summaries(
        &self,
        facility: &FacilityId,
        now: UnixSeconds,
    ) -> Result<Vec<PartitionSummary>, LedgerError> {
        let (first, last) = (self.oldest_live_day(now), Self::last_live_day(now));
        let txn = self.store.db().begin_read()?;
        let counts = txn.open_table(PARTITION_COUNTS)?;
        let heads = txn.open_table(PARTITION_HEADS)?;
        let f = facility.as_str();
        let mut out = Vec::new();
        for row in counts.range((f, first.0)..=(f, last.0))? {
            let (k, v) = row?;
            let day = k.value().1;
            let stored = heads.get((f, day))?;
            out.push(PartitionSummary {
                id: PartitionId {
                    facility: facility.clone(),
                    day: Day(day),
                },
                heads: parse_heads(stored.as_ref().map(|g| g.value()).unwrap_or_default())?,
                records: v.value(),
            });
        }
        Ok(out)
    }

    /// A digest per facility of its live partitions' days and heads (16 bytes, hex): what
    /// the hub link compares to find the facilities whose partitions differ between the two
    /// hubs of a region. A facility with no live partition is absent.
    ///
    /// Days before `floor` are left out: a hub rebuilt from nothing holds no partition of the
    /// days before it was made (it has no key for them), and the two hubs compare only the
    /// days both hold.
    pub fn facility_digests(
        &self,
        now: UnixSeconds,
        floor: Day,
    ) -> Result<BTreeMap<String, String>, LedgerError> {
        let (first, last) = (
            self.oldest_live_day(now).max(floor),
            Self::last_live_day(now),
        );
        let txn = self.store.db().begin_read()?;
        let heads = txn.open_table(PARTITION_HEADS)?;
        let mut hashers: BTreeMap<String, blake3::Hasher> = BTreeMap::new();
        for row in heads.iter()? {
            let (k, v) = row?;
            let (facility, day) = k.value();
            if day < first.0 || day > last.0 || v.value().is_empty() {
                continue;
            }
            let h = hashers.entry(facility.to_owned()).or_default();
            h.update(&day.to_be_bytes());
            h.update(&(v.value().len() as u64).to_be_bytes());
            h.update(v.value());
        }
        Ok(hashers
            .into_iter()
            .map(|(f, h)| (f, hex::encode(&h.finalize().as_bytes()[..16])))
            .collect())
    }

    /// Stores what `partition` gained since it was loaded or last persisted, and indexes its
    /// records not indexed yet, in one write transaction. Returns how many records it indexed.
    ///
    /// Refuses partitions outside the live days (never stored). Records that do not open
    /// (no usable wrapped key, damaged or forged envelopes) are counted in a warning and left
    /// out of the index; they are tried again at the next persist.
    ///
    /// Encoding the automerge chunk and the cryptography of indexing (unwrapping the session
    /// keys, opening envelopes, sealing index entries) are independent, so for large batches
    /// they run on this thread and the persists' worker at once (`share_beside`): the save,
    /// written in this persist's write transaction, on whichever thread comes to it first. The
    /// index rows are written here, in the same transaction.
    ///
    /// On error the partition's notion of what is saved may have moved on: drop it and load it
    /// again rather than persisting it a second time.
    pub fn persist(&self, partition: &mut Partition, now: UnixSeconds) -> Result<u64, LedgerError> {
        self.persist_counted(partition, now).map(|p| p.indexed)
    }

    /// [`Self::persist`], also saying how many of the records it indexed were sealed under
    /// the device's day-key fallback (counted in `fallback-counts-1`).
    pub fn persist_counted(
        &self,
        partition: &mut Partition,
        now: UnixSeconds,
    ) -> Result<Persisted, LedgerError> {
        self.persist_charged(partition, now, None)
    }

    /// Counts a refused sync session by its reason and keeps it among the recent ones
    /// (`sync-refusals-1`, `recent-refusals-1`).
    pub fn note_refusal(&self, note: &RefusalNote) -> Result<(), LedgerError> {
        let mut note = note.clone();
        note.detail = note.detail.chars().take(200).collect();
        let json = serde_json::to_vec(&note)
            .map_err(|e| LedgerError::Seal(format!("cannot encode a refusal: {e}")))?;
        let txn = self.store.begin_write()?;
        {
            let mut counts = txn.open_table(SYNC_REFUSALS)?;
            let before = counts.get(note.reason.as_str())?.map_or(0, |g| g.value());
            counts.insert(note.reason.as_str(), before.saturating_add(1))?;
            let mut recent = txn.open_table(RECENT_REFUSALS_TABLE)?;
            let next = recent
                .last()?
                .map_or(0, |(k, _)| k.value().saturating_add(1));
            recent.insert(next, json.as_slice())?;
            let keep_from = next.saturating_sub(RECENT_REFUSALS - 1);
            recent.retain_in(..keep_from, |_, _| false)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// New records device `device` delivered on UTC day `day` (`device-day-records-1`).
    pub fn device_day_records(&self, device: &DeviceId, day: Day) -> Result<u64, LedgerError> {
        self.device_day_count(DEVICE_DAY_RECORDS, device, day)
    }

    /// New wrapped keys device `device` delivered on UTC day `day` (`device-day-keys-1`).
    pub fn device_day_keys(&self, device: &DeviceId, day: Day) -> Result<u64, LedgerError> {
        self.device_day_count(DEVICE_DAY_KEYS, device, day)
    }

    fn device_day_count(
        &self,
        def: TableDefinition<(&str, u32), u64>,
        device: &DeviceId,
        day: Day,
    ) -> Result<u64, LedgerError> {
        let txn = self.store.db().begin_read()?;
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        Ok(table
            .get((device.as_str(), day.0))?
            .map_or(0, |g| g.value()))
    }

    /// The keyed revocation list (`crate::auth::revocations`: a key file and a walk of the
    /// list), read once per turn of the actor and kept for the rest of it, unless a revocation
    /// is written during the turn (admission lists a device whose row says revoked:
    /// `crate::auth::list_revoked` moves the turn's epoch on). Outside a turn, read at every
    /// call.
    fn revocations(&self) -> Result<std::sync::Arc<crate::auth::RevocationList>, LedgerError> {
        let epoch = self.store.group_epoch();
        if let (Some(epoch), Ok(cache)) = (epoch, self.revoked.lock())
            && let Some((at, list)) = cache.as_ref()
            && *at == epoch
        {
            return Ok(list.clone());
        }
        let list = std::sync::Arc::new(
            crate::auth::revocations(self.store)
                .map_err(|e| LedgerError::Revocations(e.to_string()))?,
        );
        if let (Some(epoch), Ok(mut cache)) = (epoch, self.revoked.lock()) {
            *cache = Some((epoch, list.clone()));
        }
        Ok(list)
    }

    /// [`Self::persist_counted`], also adding `charge` to that device's counts of the day of
    /// `now` in `device-day-records-1` and `device-day-keys-1`, in the same transaction.
    pub fn persist_charged(
        &self,
        partition: &mut Partition,
        now: UnixSeconds,
        charge: Option<(&DeviceId, Charge)>,
    ) -> Result<Persisted, LedgerError> {
        let id = partition.id().clone();
        self.check_live(&id, now)?;
        let Some(index_key) = self.ratchet.index_key(id.day) else {
            // Unreachable after check_live unless the ratchet is damaged: say so, store nothing.
            return Err(LedgerError::Expired {
                partition: id,
                horizon: self.ratchet.oldest(),
            });
        };
        let index = DayIndex::new(id.day, &index_key);
        let f = id.facility.as_str();
        let day = id.day.0;
        // Read before the write transaction: a store of before the list writes it on first read.
        let revoked = self.revocations()?;
        let revoked = &*revoked;
        let txn = self.store.begin_write()?;
        self.catch_up(&txn, partition)?;

        let records = partition.records();
        let count = records.len() as u64;
        let (already, indexed_rows) = read_indexed(&txn.open_table(INDEXED)?, f, day)?;
        let fresh = hub::fresh_records(records, |rid| already.contains(&rid.0));
        let mut opener = self.opener(partition);
        let sessions: BTreeSet<SessionId> = fresh
            .iter()
            .filter_map(|(_, e)| e.as_ref().ok().map(Envelope::session))
            .collect();
        self.take_ahead(&mut opener, &sessions);
        let work = if fresh.len() >= OVERLAP_INDEX_MIN {
            // This thread unwraps the session keys not unwrapped ahead while the persists'
            // worker encodes and writes the save (or the other way round, or this thread does
            // both if the worker comes late); then both open and seal records, with a copy of
            // the keys (`share_beside`).
            let secrets = self.secrets();
            let prepare = move || {
                let mut opener = opener;
                opener.unwrap_sessions(sessions);
                let copy = opener.share_keys(secrets);
                ((opener, Sealing::default()), (copy, Sealing::default()))
            };
            let blocks = blocks_of(fresh, INDEX_BLOCK);
            let facility = &id.facility;
            let index = &index;
            let open = |(opener, sealing): &mut (Opener<'_>, Sealing), block| {
                sealing.add(index, facility, hub::plan_index(opener, block), revoked);
            };
            let seal = |(opener, sealing): (Opener<'_>, Sealing)| {
                sealing.finish(index, facility, opener.sessions_without_key())
            };
            let (chunk, works) =
                share_beside(persist_worker(), prepare, blocks, open, seal, || {
                    self.write_chunk(&txn, partition)
                });
            chunk?;
            works
                .into_iter()
                .reduce(|a, b| Ok(a?.merged(b?)))
                .unwrap_or_else(|| Ok(IndexWork::default()))?
        } else {
            let work = build_index(&index, opener, fresh, revoked)?;
            self.write_chunk(&txn, partition)?;
            work
        };
        txn.open_table(PARTITION_COUNTS)?.insert((f, day), count)?;
        if work.fallback > 0 {
            let mut fallback = txn.open_table(FALLBACK_COUNTS)?;
            let before = fallback.get((f, day))?.map_or(0, |g| g.value());
            fallback.insert((f, day), before.saturating_add(work.fallback))?;
            tracing::warn!(
                partition = %id,
                records = work.fallback,
                "records sealed to an earlier day's key (the device ran out of day keys): \
                 they become unreadable when that day expires, before their own"
            );
        }
        let refused: u64 = work.refused.values().sum();
        let indexed = (work.records.len() as u64).saturating_sub(refused);
        if refused > 0 {
            let mut counts = txn.open_table(REVOKED_REFUSED)?;
            for (device, n) in &work.refused {
                let before = counts.get(device.as_str())?.map_or(0, |g| g.value());
                counts.insert(device.as_str(), before.saturating_add(*n))?;
            }
            tracing::warn!(
                partition = %id,
                records = refused,
                "records a sibling relayed that a revoked device sealed after its revocation \
                 were left out of the trace index (their changes are stored)"
            );
        }
        {
            runs::write_run(&txn, day, work.tokens)?;
            write_batches(
                &mut txn.open_table(VISITS_BY_FACILITY)?,
                day,
                &index.facility_tag(&id.facility),
                &work.batches,
            )?;
            if !work.records.is_empty() {
                let mut done = txn.open_table(INDEXED)?;
                let ids: Vec<u8> = work.records.iter().flat_map(|r| r.0).collect();
                if indexed_rows + 1 >= COMPACT_AFTER_CHUNKS {
                    // Rewrite the partition's rows as one, so a persist reads few rows.
                    let mut all: Vec<u8> = already.iter().flatten().copied().collect();
                    all.extend_from_slice(&ids);
                    done.retain_in((f, day, 0u64)..=(f, day, u64::MAX), |_, _| false)?;
                    done.insert((f, day, 0u64), all.as_slice())?;
                } else {
                    done.insert((f, day, indexed_rows), ids.as_slice())?;
                }
            }
        }
        if work.unreadable > 0 {
            tracing::warn!(
                partition = %id,
                unreadable = work.unreadable,
                sessions_without_key = work.missing_keys,
                "records that do not open were left out of the trace index"
            );
        }
        if let Some((device, charge)) = charge {
            let key = (device.as_str(), Day::of(now).0);
            for (def, n) in [
                (DEVICE_DAY_RECORDS, charge.records),
                (DEVICE_DAY_KEYS, charge.keys),
            ] {
                if n > 0 {
                    let mut counts = txn.open_table(def)?;
                    let before = counts.get(key)?.map_or(0, |g| g.value());
                    counts.insert(key, before.saturating_add(n))?;
                }
            }
        }
        txn.commit()?;
        Ok(Persisted {
            indexed,
            fallback: work.fallback,
            revoked_refused: refused,
        })
    }

    /// If another session persisted this partition since this copy was loaded (the stored
    /// heads are not all in it), merges the stored changes in, so that the count and heads
    /// written next describe everything stored.
    fn catch_up(
        &self,
        txn: &WriteTransaction,
        partition: &mut Partition,
    ) -> Result<(), LedgerError> {
        let id = partition.id().clone();
        let heads = txn.open_table(PARTITION_HEADS)?;
        let stored_heads = match heads.get((id.facility.as_str(), id.day.0))? {
            Some(g) => parse_heads(g.value())?,
            None => return Ok(()),
        };
        let behind = stored_heads.iter().any(|h| {
            partition
                .doc()
                .get_change_by_hash(&automerge::ChangeHash(*h))
                .is_none()
        });
        if behind && let Some(bytes) = read_chunks(&txn.open_table(HUB_CHUNKS)?, &id)? {
            let stored = Partition::load(id.clone(), &bytes, &self.actor)?;
            let before = partition.heads();
            // Each copy's changes were checked against its own history only: two sessions
            // may have taken changes of one actor that reuse each other's operation ids.
            if let Err(e) =
                shared::sync::validate::check_merge_op_ids(partition.doc(), stored.doc())
            {
                return Err(LedgerError::Conflict {
                    partition: id,
                    detail: e.to_string(),
                });
            }
            // The merge also applies what automerge held back in this copy for dependencies
            // the stored copy brings, unchecked by the session that received it; automerge
            // 0.12 panics on some such changes (a change numbered 2 of an actor it never saw
            // numbered 1). A panic refuses this copy, which the caller then drops.
            let merged =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| partition.merge(&stored)));
            match merged {
                Ok(merged) => merged?,
                Err(_) => {
                    return Err(LedgerError::Conflict {
                        partition: id,
                        detail: "automerge failed merging this copy, with changes it held back, \
                                 into what was stored"
                            .into(),
                    });
                }
            }
            // This copy was validated against the partition as it stood when it was loaded;
            // another session may have stored a key since that this copy puts with other
            // bytes (finding 6 of the sync v2 review). Both values would be stored, and the
            // higher operation's would win at every later load.
            if let Err(e) = shared::sync::validate::check_applied(partition.doc(), &before) {
                return Err(LedgerError::Conflict {
                    partition: id,
                    detail: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Appends the partition's new changes as a chunk (or writes it whole: first, and once it
    /// has [`COMPACT_AFTER_CHUNKS`] chunks) and records its heads.
    fn write_chunk(
        &self,
        txn: &WriteTransaction,
        partition: &mut Partition,
    ) -> Result<(), LedgerError> {
        let id = partition.id().clone();
        let f = id.facility.as_str();
        let day = id.day.0;
        let mut chunks = txn.open_table(HUB_CHUNKS)?;
        // The persist number of this chunk: one more than the last stored (rows of one
        // persist share it in the key's high bits, see [`chunk_pieces`]).
        let next = chunks
            .range((f, day, 0u64)..=(f, day, u64::MAX))?
            .next_back()
            .transpose()?
            .map_or(0, |(k, _)| (k.value().2 >> PIECE_BITS).saturating_add(1));
        // The first chunk is a full save: it costs no more than an incremental one and is about
        // half the size (automerge encodes a whole document column by column), packed with
        // zstd ([`pack_save`]; issue 14's 300 bytes a visit).
        if next == 0 || next + 1 >= COMPACT_AFTER_CHUNKS {
            let full = pack_save(&partition.save_uncompressed())?;
            chunks.retain_in((f, day, 0u64)..=(f, day, u64::MAX), |_, _| false)?;
            for (i, piece) in chunk_pieces(&full).enumerate() {
                chunks.insert((f, day, i as u64), piece)?;
            }
        } else {
            let chunk = partition.save_incremental();
            let first = next
                .checked_shl(PIECE_BITS)
                .filter(|s| s >> PIECE_BITS == next);
            let Some(first) = first else {
                return Err(LedgerError::Corrupt {
                    table: "hub-chunks-1",
                    reason: format!("partition {id} has no chunk number left"),
                });
            };
            for (i, piece) in chunk_pieces(&chunk).enumerate() {
                chunks.insert((f, day, first | i as u64), piece)?;
            }
        }
        let mut sorted: Vec<[u8; 32]> = partition.heads().iter().map(|h| h.0).collect();
        sorted.sort_unstable();
        txn.open_table(PARTITION_HEADS)?
            .insert((f, day), sorted.concat().as_slice())?;
        Ok(())
    }

    /// Registered facilities and live records (`sync-hub stats`).
    pub fn stats(&self, now: UnixSeconds) -> Result<Stats, LedgerError> {
        let facilities = self.store.facilities()?;
        let mut per_facility: BTreeMap<String, u64> =
            facilities.iter().map(|f| (f.id.to_string(), 0)).collect();
        let (first, last) = (self.oldest_live_day(now), Self::last_live_day(now));
        let txn = self.store.db().begin_read()?;
        let counts = txn.open_table(PARTITION_COUNTS)?;
        for row in counts.iter()? {
            let (k, v) = row?;
            let (facility, day) = k.value();
            if (first.0..=last.0).contains(&day) {
                *per_facility.entry(facility.to_owned()).or_default() += v.value();
            }
        }
        let mut fallback_per_facility: BTreeMap<String, u64> = BTreeMap::new();
        for row in txn.open_table(FALLBACK_COUNTS)?.iter()? {
            let (k, v) = row?;
            let (facility, day) = k.value();
            if (first.0..=last.0).contains(&day) && v.value() > 0 {
                *fallback_per_facility
                    .entry(facility.to_owned())
                    .or_default() += v.value();
            }
        }
        let mut refusals_by_reason = BTreeMap::new();
        for row in txn.open_table(SYNC_REFUSALS)?.iter()? {
            let (k, v) = row?;
            refusals_by_reason.insert(k.value().to_owned(), v.value());
        }
        let mut recent_refusals = Vec::new();
        for row in txn.open_table(RECENT_REFUSALS_TABLE)?.iter()?.rev() {
            let (_, v) = row?;
            // A row that does not parse (a later format) is skipped, not fatal to stats.
            if let Ok(note) = serde_json::from_slice::<RefusalNote>(v.value()) {
                recent_refusals.push(note);
            }
        }
        let mut revoked_refused_per_device = BTreeMap::new();
        for row in txn.open_table(REVOKED_REFUSED)?.iter()? {
            let (k, v) = row?;
            if v.value() > 0 {
                revoked_refused_per_device.insert(k.value().to_owned(), v.value());
            }
        }
        Ok(Stats {
            revoked_records_refused: revoked_refused_per_device.values().sum(),
            revoked_refused_per_device,
            refusals_by_reason,
            recent_refusals,
            facilities: facilities.len(),
            records: per_facility.values().sum(),
            per_facility,
            records_fallback_key: fallback_per_facility.values().sum(),
            fallback_per_facility,
        })
    }

    /// A health-authority trace over the live days (`sync-hub trace`): the visits of
    /// `tokens`, every other visit at the same facility within `window_minutes` of one of
    /// them, and the visited facilities that may still hold unsynced visits.
    pub fn trace(
        &self,
        tokens: &[[u8; 16]],
        window_minutes: u64,
        now: UnixSeconds,
    ) -> Result<Trace, LedgerError> {
        let facts = self.trace_facts(tokens, window_minutes, 0, UnixSeconds::MAX, now)?;
        Ok(Trace {
            visits: facts
                .visits
                .into_iter()
                .map(|v| TraceVisit {
                    token: v.token.map(hex::encode).unwrap_or_default(),
                    facility_id: v.facility,
                    scanned_at: v.scanned_at,
                    device_id: v.device,
                })
                .collect(),
            contacts: facts
                .contacts
                .into_iter()
                .map(|v| TraceContact {
                    token: v.token.map(hex::encode),
                    paper: v.token.is_none(),
                    facility_id: v.facility,
                    scanned_at: v.scanned_at,
                })
                .collect(),
            unsynced_facilities: facts.unsynced,
        })
    }

    /// The index keys of the live days from `first` to `last`.
    fn day_indexes(&self, first: Day, last: Day) -> BTreeMap<Day, DayIndex> {
        let mut indexes = BTreeMap::new();
        for day in first.0..=last.0 {
            if let Some(key) = self.ratchet.index_key(Day(day)) {
                indexes.insert(Day(day), DayIndex::new(Day(day), &key));
            }
        }
        indexes
    }

    /// What a trace finds, as indexed visits: the case's visits scanned between `from` and
    /// `to` (inclusive, clipped to the live days), every other visit at the same facility
    /// within `window_minutes` of one of them, and the visited facilities with a device that
    /// has not synced since the end of the window of the latest visit there.
    pub fn trace_facts(
        &self,
        tokens: &[[u8; 16]],
        window_minutes: u64,
        from: UnixSeconds,
        to: UnixSeconds,
        now: UnixSeconds,
    ) -> Result<TraceFacts, LedgerError> {
        let window = hub::window_seconds(window_minutes);
        let case: BTreeSet<[u8; 16]> = tokens.iter().copied().collect();
        let (first, last) = (self.oldest_live_day(now), Self::last_live_day(now));
        let txn = self.store.db().begin_read()?;
        let pieces = txn.open_table(runs::TOKEN_RUNS)?;
        let sizes = txn.open_table(runs::TOKEN_RUN_SIZES)?;
        let by_facility = txn.open_table(VISITS_BY_FACILITY)?;
        let mut damaged = 0u64;
        let indexes = self.day_indexes(first, last);
        let (scan_first, scan_last) = (Day::of(from).max(first), Day::of(to).min(last));

        // The facility-days the case's tokens visited, as the token rows locate them.
        let mut located: BTreeSet<(Day, [u8; 8])> = BTreeSet::new();
        let scan_days = if scan_first <= scan_last {
            indexes.range(scan_first..=scan_last)
        } else {
            indexes.range(scan_first..scan_first)
        };
        let mut rows = Vec::new();
        for (day, index) in scan_days {
            let day_runs = runs::runs_of(&sizes, day.0)?;
            for token in &case {
                let tag = index.token_tag(token);
                rows.clear();
                runs::lookup(&pieces, day.0, &day_runs, &tag, &mut rows, &mut damaged)?;
                for row in &rows {
                    let (row_tag, sealed) = runs::parts(row);
                    match index.open_token_row(&tag, &row_tag, &sealed) {
                        Some(locator) => {
                            located.insert((*day, locator));
                        }
                        None => damaged += 1,
                    }
                }
            }
        }

        // Their batches hold the case's visits whole; each facility-day read is kept for the
        // join, which reads the same facility-days (and those the windows reach into).
        let mut read: BTreeMap<(Day, FacilityId), Vec<IndexedVisit>> = BTreeMap::new();
        let mut visits: Vec<IndexedVisit> = Vec::new();
        let mut facility_days: BTreeSet<(FacilityId, Day)> = BTreeSet::new();
        for (day, locator) in &located {
            let Some(index) = indexes.get(day) else {
                continue;
            };
            let (lo, hi) = (pad16(locator, 0), pad16(locator, 0xff));
            for (facility, batch) in read_batches(&by_facility, index, &lo, &hi, &mut damaged)? {
                for v in &batch {
                    // A batch found through a token row is searched for the token itself.
                    if !hub::is_case_visit(v, &case, from, to) {
                        continue;
                    }
                    for d in hub::days_to_search(*day, v.scanned_at, window, first, last) {
                        facility_days.insert((v.facility.clone(), d));
                    }
                    visits.push(v.clone());
                }
                read.entry((*day, facility)).or_default().extend(batch);
            }
        }
        let visits = hub::ordered(visits);

        // Every visit indexed at those facility-days; the join picks the contacts.
        let mut candidates: Vec<IndexedVisit> = Vec::new();
        for (facility, day) in &facility_days {
            let Some(index) = indexes.get(day) else {
                continue;
            };
            let batch = match read.remove(&(*day, facility.clone())) {
                Some(batch) => batch,
                None => {
                    let tag = index.facility_tag(facility);
                    read_batches(&by_facility, index, &tag, &tag, &mut damaged)?
                        .into_iter()
                        .flat_map(|(_, b)| b)
                        .collect()
                }
            };
            // A facility's batches hold its own visits only.
            candidates.extend(batch.into_iter().filter(|v| &v.facility == facility));
        }
        let contacts = hub::contacts(&visits, &case, candidates, window);
        if damaged > 0 {
            tracing::warn!(damaged, "trace index entries that do not open were skipped");
        }

        let unsynced = if visits.is_empty() {
            Vec::new()
        } else {
            let devices = self.store.devices()?.into_iter().map(|d| hub::DeviceSync {
                facility: d.facility,
                last_sync: d.last_sync,
                revoked: d.revoked,
            });
            hub::may_hold_unsynced(&visits, devices, window)
        };

        Ok(TraceFacts {
            visits,
            contacts,
            unsynced,
        })
    }

    /// The sealed paper entries (age, to the health authority) of `records` of partition
    /// `id`, by record id: the hub opens the outer envelope with the day secret and hands the
    /// inner sealed bytes on unread. Records that are not paper entries or do not open are
    /// left out.
    pub fn sealed_paper(
        &self,
        id: &PartitionId,
        records: &BTreeSet<RecordId>,
    ) -> Result<BTreeMap<RecordId, Vec<u8>>, LedgerError> {
        let mut out = BTreeMap::new();
        if records.is_empty() {
            return Ok(out);
        }
        let Some(partition) = self.load(id)? else {
            return Ok(out);
        };
        let mut opener = self.opener(&partition);
        for (rid, envelope) in partition.records() {
            if !records.contains(&rid) {
                continue;
            }
            if let Ok(Opened {
                record:
                    Record {
                        body:
                            RecordBody::Paper {
                                sealed_for_authority,
                            },
                        ..
                    },
                ..
            }) = opener.open_entry(rid, envelope)
            {
                out.insert(rid, sealed_for_authority);
            }
        }
        Ok(out)
    }

    /// Visits of `facility` at or after `since`, and its latest visit, over the live days
    /// (from the facility index: nothing is unsealed but the index itself).
    pub fn facility_activity(
        &self,
        facility: &FacilityId,
        since: UnixSeconds,
        now: UnixSeconds,
    ) -> Result<FacilityActivity, LedgerError> {
        let (first, last) = (self.oldest_live_day(now), Self::last_live_day(now));
        let txn = self.store.db().begin_read()?;
        let by_facility = txn.open_table(VISITS_BY_FACILITY)?;
        let mut activity = FacilityActivity::default();
        let mut damaged = 0u64;
        for index in self.day_indexes(first, last).into_values() {
            let tag = index.facility_tag(facility);
            for (_, batch) in read_batches(&by_facility, &index, &tag, &tag, &mut damaged)? {
                for v in batch.iter().filter(|v| &v.facility == facility) {
                    if v.scanned_at >= since {
                        activity.visits_since += 1;
                    }
                    activity.last_visit = activity.last_visit.max(Some(v.scanned_at));
                }
            }
        }
        Ok(activity)
    }

    /// Calls `f` with every indexed visit (QR and paper) of the live days from `from` to `to`,
    /// reading the whole facility index of those days: the full scan a trace would need
    /// without the token index, and what the shared-code report reads. Returns how many index
    /// entries did not open (damaged).
    pub fn scan_visits(
        &self,
        from: Day,
        to: Day,
        now: UnixSeconds,
        mut f: impl FnMut(&IndexedVisit),
    ) -> Result<u64, LedgerError> {
        let (first, last) = (
            self.oldest_live_day(now).max(from),
            Self::last_live_day(now).min(to),
        );
        let mut damaged = 0;
        if first > last {
            return Ok(0);
        }
        let txn = self.store.db().begin_read()?;
        let by_facility = txn.open_table(VISITS_BY_FACILITY)?;
        for index in self.day_indexes(first, last).into_values() {
            let (lo, hi) = ([0u8; 16], [0xffu8; 16]);
            for (_, batch) in read_batches(&by_facility, &index, &lo, &hi, &mut damaged)? {
                batch.iter().for_each(&mut f);
            }
        }
        Ok(damaged)
    }

    /// Enforces retention as of `as_of`: destroys the day keys of every day before
    /// `horizon(as_of)` (the ratchet advances and its file is overwritten in place) *first*,
    /// so that from then on nothing of those days can be read even if the deletion below is
    /// interrupted; then deletes every row of those days from every ledger table, in chunks
    /// of [`PURGE_CHUNK_ROWS`] rows each committed on its own ([`Self::begin_purge`] and
    /// [`Self::purge_chunk`] run to completion: the daemon drives those two itself, between
    /// sessions' frames).
    ///
    /// Deleted rows may survive in free pages until the file is compacted: call [`compact`]
    /// afterwards with exclusive access to the database. What survives there is sealed under
    /// keys that no longer exist. Never moves the horizon back.
    pub fn purge(&mut self, as_of: UnixSeconds) -> Result<PurgeReport, LedgerError> {
        let mut job = self.begin_purge(as_of)?;
        while !self.purge_chunk(&mut job, PURGE_CHUNK_ROWS)? {}
        Ok(job.report)
    }

    /// The first step of [`Self::purge`], on its own: destroys the day keys of every day before
    /// `horizon(as_of)` (the ratchet file is overwritten and synced before this returns), and
    /// returns the deletion still to do, for [`Self::purge_chunk`]. From here on every read
    /// skips those days (they are before [`Self::oldest_live_day`], and their keys are gone),
    /// however many of their rows are left. Never moves the horizon back; a purge at the
    /// current horizon (after a restart interrupted one) only finds the leftovers.
    pub fn begin_purge(&mut self, as_of: UnixSeconds) -> Result<PurgeJob, LedgerError> {
        let mut ratchet = self.keys.ratchet()?;
        ratchet.advance(horizon(as_of).max(self.ratchet.oldest()));
        self.keys.store_ratchet(&ratchet)?;
        self.ratchet = ratchet;
        if let Some(ahead) = &self.ahead {
            ahead.set_ratchet(&self.ratchet);
        }
        let h = self.ratchet.oldest();
        Ok(PurgeJob {
            report: PurgeReport {
                horizon: h,
                ..PurgeReport::default()
            },
            stage: PurgeStage::TokenRunSizes,
            cursor: String::new(),
            cursor2: String::new(),
            chunks: 0,
        })
    }

    /// One chunk of `job`'s deletion in one short write transaction: at most about `budget`
    /// rows deleted or index seeks made. Returns whether the purge is complete. Each chunk
    /// commits on its own, so a purge interrupted between chunks leaves a consistent store
    /// (every live day whole) and the next purge deletes what is left.
    ///
    /// The days' index rows go by range of day (the token and facility index tables lead with
    /// the day); the facility-keyed tables (`hub-chunks-1`, `indexed-2`, heads, counts,
    /// fallback counts, the devices' daily counts, sync states) are walked facility by
    /// facility (device, peer), seeking straight to each one's expired days, so a chunk never
    /// reads the live days' chunks and a partition's chunks go even without its counts row.
    pub fn purge_chunk(&self, job: &mut PurgeJob, budget: u64) -> Result<bool, LedgerError> {
        let h = job.report.horizon.0;
        let mut budget = budget.max(1);
        let txn = self.store.db().begin_write()?;
        // One table a chunk: rows of the next table may cost many times more (a chunk row is
        // up to 16 KiB, a token row 36 bytes), so a chunk never runs into it on a budget that
        // was sized for this one (a 10-million-visit purge's step took 136 ms doing so).
        let stage = job.stage;
        while budget > 0 && job.stage == stage && job.stage != PurgeStage::Done {
            let done = match job.stage {
                PurgeStage::TokenRunSizes => {
                    // A run's size row is one row; its rows are the index entries it held.
                    let mut t = txn.open_table(runs::TOKEN_RUN_SIZES)?;
                    let (mut n, mut entries) = (0u64, 0u64);
                    for row in t
                        .extract_from_if((0u32, 0u64)..(h, 0u64), |_, _| true)?
                        .take(usize::try_from(budget).unwrap_or(usize::MAX))
                    {
                        let (_, size) = row?;
                        entries = entries.saturating_add(size.value());
                        n += 1;
                    }
                    job.report.index_entries += entries;
                    budget = budget.saturating_sub(n);
                    budget > 0
                }
                PurgeStage::TokenIndex => {
                    // A piece holds up to `runs::PIECE_ROWS` rows in a page of its own: it
                    // costs [`PIECE_COST`] rows of the budget.
                    let mut t = txn.open_table(runs::TOKEN_RUNS)?;
                    let n = purge_rows(
                        &mut t,
                        (0u32, 0u64, &[0u8; 16])..(h, 0u64, &[0u8; 16]),
                        budget.div_ceil(PIECE_COST),
                    )?;
                    budget = budget.saturating_sub(n.saturating_mul(PIECE_COST));
                    budget > 0
                }
                PurgeStage::FacilityIndex => {
                    let mut t = txn.open_table(VISITS_BY_FACILITY)?;
                    let n = purge_rows(
                        &mut t,
                        (0u32, &[0u8; 16], 0u32)..(h, &[0u8; 16], 0u32),
                        budget,
                    )?;
                    job.report.index_entries += n;
                    budget = budget.saturating_sub(n);
                    budget > 0
                }
                PurgeStage::Chunks => {
                    let mut t = txn.open_table(HUB_CHUNKS)?;
                    let (n, done) = purge_facility_days(&mut t, &mut job.cursor, h, &mut budget)?;
                    job.report.chunks += n;
                    done
                }
                PurgeStage::Indexed => {
                    let mut t = txn.open_table(INDEXED)?;
                    purge_facility_days(&mut t, &mut job.cursor, h, &mut budget)?.1
                }
                PurgeStage::Heads => {
                    let mut t = txn.open_table(PARTITION_HEADS)?;
                    let (_, _, done) = purge_days(&mut t, &mut job.cursor, h, &mut budget, |_| 0)?;
                    done
                }
                PurgeStage::Counts => {
                    let mut t = txn.open_table(PARTITION_COUNTS)?;
                    let (n, records, done) =
                        purge_days(&mut t, &mut job.cursor, h, &mut budget, |v| *v)?;
                    job.report.partitions += n;
                    job.report.records = job.report.records.saturating_add(records);
                    done
                }
                PurgeStage::Fallback => {
                    let mut t = txn.open_table(FALLBACK_COUNTS)?;
                    purge_days(&mut t, &mut job.cursor, h, &mut budget, |_| 0)?.2
                }
                PurgeStage::DeviceRecords => {
                    let mut t = txn.open_table(DEVICE_DAY_RECORDS)?;
                    purge_days(&mut t, &mut job.cursor, h, &mut budget, |_| 0)?.2
                }
                PurgeStage::DeviceKeys => {
                    let mut t = txn.open_table(DEVICE_DAY_KEYS)?;
                    purge_days(&mut t, &mut job.cursor, h, &mut budget, |_| 0)?.2
                }
                PurgeStage::SyncStates => {
                    let mut t = txn.open_table(SYNC_STATES)?;
                    let (n, done) = purge_sync_states(
                        &mut t,
                        (&mut job.cursor, &mut job.cursor2),
                        h,
                        &mut budget,
                    )?;
                    job.report.sync_states += n;
                    done
                }
                PurgeStage::Done => true,
            };
            if done {
                job.stage = job.stage.next();
                job.cursor.clear();
                job.cursor2.clear();
            }
        }
        txn.commit()?;
        job.chunks += 1;
        Ok(job.stage == PurgeStage::Done)
    }
}

/// Rows one chunk of a purge ([`Ledger::purge_chunk`]) deletes at most (index seeks count
/// as rows): one short write transaction, a few tens of milliseconds, so the sessions the
/// actor serves between chunks wait at most that long.
pub const PURGE_CHUNK_ROWS: u64 = 20_000;

/// What deleting one piece of `token-runs-1` (a page of up to [`runs::PIECE_ROWS`] token rows)
/// costs of a purge chunk's budget of rows.
const PIECE_COST: u64 = 16;

/// Which table a purge is deleting from, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PurgeStage {
    TokenRunSizes,
    TokenIndex,
    FacilityIndex,
    Chunks,
    Indexed,
    Heads,
    Counts,
    Fallback,
    DeviceRecords,
    DeviceKeys,
    SyncStates,
    Done,
}

impl PurgeStage {
    /// The table this stage deletes from.
    fn table(self) -> &'static str {
        use PurgeStage::*;
        match self {
            TokenRunSizes => runs::TOKEN_RUN_SIZES.name(),
            TokenIndex => runs::TOKEN_RUNS.name(),
            FacilityIndex => VISITS_BY_FACILITY.name(),
            Chunks => HUB_CHUNKS.name(),
            Indexed => INDEXED.name(),
            Heads => PARTITION_HEADS.name(),
            Counts => PARTITION_COUNTS.name(),
            Fallback => FALLBACK_COUNTS.name(),
            DeviceRecords => DEVICE_DAY_RECORDS.name(),
            DeviceKeys => DEVICE_DAY_KEYS.name(),
            SyncStates => SYNC_STATES.name(),
            Done => "done",
        }
    }

    fn next(self) -> Self {
        use PurgeStage::*;
        match self {
            TokenRunSizes => TokenIndex,
            TokenIndex => FacilityIndex,
            FacilityIndex => Chunks,
            Chunks => Indexed,
            Indexed => Heads,
            Heads => Counts,
            Counts => Fallback,
            Fallback => DeviceRecords,
            DeviceRecords => DeviceKeys,
            DeviceKeys => SyncStates,
            SyncStates | Done => Done,
        }
    }
}

/// A purge in progress: its day keys are destroyed ([`Ledger::begin_purge`]), its rows go
/// chunk by chunk ([`Ledger::purge_chunk`]).
#[derive(Debug)]
pub struct PurgeJob {
    report: PurgeReport,
    stage: PurgeStage,
    /// Where the stage's walk resumes: the facility, device or peer it was at.
    cursor: String,
    /// With `cursor` a peer (sync states): the facility.
    cursor2: String,
    chunks: u64,
}

impl PurgeJob {
    /// What the purge has removed so far; its horizon is final from the start.
    pub fn report(&self) -> &PurgeReport {
        &self.report
    }

    /// Which table the purge is at (its stages in order, from 0): a step's rows are sized
    /// per table.
    pub fn stage(&self) -> u8 {
        self.stage as u8
    }

    /// The name of the table the purge is at (`"done"` at the end).
    pub fn table(&self) -> &'static str {
        self.stage.table()
    }

    /// Whether every row of the expired days is gone.
    pub fn is_done(&self) -> bool {
        self.stage == PurgeStage::Done
    }

    /// The chunks (write transactions) run so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }
}

/// The first key after every key that starts with `s` (strings order bytewise).
fn after(s: &mut String) {
    s.push('\0');
}

/// Deletes, within `budget` (one per seek, and per row one plus a page of its value's size:
/// a piece of a chunk of 64 KiB costs 17, a row of a few bytes 1), the rows of days before
/// `h` of a (facility, day, sequence)-keyed table, facility by facility from `cursor` on.
/// Returns the rows deleted and whether the table is done. Weighing rows by their pages keeps
/// a step's time near what its budget was sized on: counted as rows, steps of a day of 3
/// million visits (chunks of 1,000-visit partitions) took 5 to 82 ms for the same budget.
fn purge_facility_days(
    t: &mut redb::Table<'_, (&'static str, u32, u64), &'static [u8]>,
    cursor: &mut String,
    h: u32,
    budget: &mut u64,
) -> Result<(u64, bool), LedgerError> {
    let mut deleted = 0u64;
    while *budget > 0 {
        *budget -= 1;
        let (f, day) = match t.range((cursor.as_str(), 0u32, 0u64)..)?.next() {
            None => return Ok((deleted, true)),
            Some(row) => {
                let (k, _) = row?;
                (k.value().0.to_owned(), k.value().1)
            }
        };
        *cursor = f;
        if day < h {
            let f = cursor.as_str();
            // The first `budget` rows go in one sweep of the tree (far cheaper than a
            // removal per key): up to the first row past them, or all of the expired days.
            let (mut n, mut cost, mut end) = (0u64, 0u64, (h, 0u64));
            for row in t.range((f, 0u32, 0u64)..(f, h, 0u64))? {
                let (k, v) = row?;
                if cost >= *budget {
                    end = (k.value().1, k.value().2);
                    break;
                }
                n += 1;
                cost = cost.saturating_add(1 + (v.value().len() / PAGE) as u64);
            }
            t.retain_in((f, 0u32, 0u64)..(f, end.0, end.1), |_, _| false)?;
            deleted += n;
            *budget = budget.saturating_sub(cost);
            if *budget == 0 {
                // Resume at this facility: it may have more.
                return Ok((deleted, false));
            }
        }
        after(cursor);
    }
    Ok((deleted, false))
}

/// Like [`purge_facility_days`] for a (facility or device, day)-keyed table; also sums
/// `value` over the deleted rows. Returns the rows deleted, the sum and whether it is done.
fn purge_days<V: redb::Value + 'static>(
    t: &mut redb::Table<'_, (&'static str, u32), V>,
    cursor: &mut String,
    h: u32,
    budget: &mut u64,
    value: impl for<'f> Fn(&V::SelfType<'f>) -> u64,
) -> Result<(u64, u64, bool), LedgerError> {
    let (mut deleted, mut sum) = (0u64, 0u64);
    while *budget > 0 {
        *budget -= 1;
        let (f, day) = match t.range((cursor.as_str(), 0u32)..)?.next() {
            None => return Ok((deleted, sum, true)),
            Some(row) => {
                let (k, _) = row?;
                (k.value().0.to_owned(), k.value().1)
            }
        };
        *cursor = f;
        if day < h {
            let f = cursor.as_str();
            let days = t
                .range((f, 0u32)..(f, h))?
                .take(usize::try_from(*budget).unwrap_or(usize::MAX))
                .map(|row| row.map(|(k, _)| k.value().1))
                .collect::<Result<Vec<_>, _>>()?;
            for d in &days {
                if let Some(v) = t.remove((f, *d))? {
                    sum = sum.saturating_add(value(&v.value()));
                }
            }
            deleted += days.len() as u64;
            *budget = budget.saturating_sub(days.len() as u64);
            if *budget == 0 {
                return Ok((deleted, sum, false));
            }
        }
        after(cursor);
    }
    Ok((deleted, sum, false))
}

/// Like [`purge_facility_days`] for `sync-states-1`, keyed (peer, facility, day): walks
/// (peer, facility) pairs from `cursor` on.
fn purge_sync_states(
    t: &mut redb::Table<'_, (&'static str, &'static str, u32), &'static [u8]>,
    cursor: (&mut String, &mut String),
    h: u32,
    budget: &mut u64,
) -> Result<(u64, bool), LedgerError> {
    let (peer, facility) = cursor;
    let mut deleted = 0u64;
    while *budget > 0 {
        *budget -= 1;
        let (p, f, day) = match t.range((peer.as_str(), facility.as_str(), 0u32)..)?.next() {
            None => return Ok((deleted, true)),
            Some(row) => {
                let (k, _) = row?;
                let (p, f, d) = k.value();
                (p.to_owned(), f.to_owned(), d)
            }
        };
        (*peer, *facility) = (p, f);
        if day < h {
            let (p, f) = (peer.as_str(), facility.as_str());
            let days = t
                .range((p, f, 0u32)..(p, f, h))?
                .take(usize::try_from(*budget).unwrap_or(usize::MAX))
                .map(|row| row.map(|(k, _)| k.value().2))
                .collect::<Result<Vec<_>, _>>()?;
            for d in &days {
                t.remove((p, f, *d))?;
            }
            deleted += days.len() as u64;
            *budget = budget.saturating_sub(days.len() as u64);
            if *budget == 0 {
                return Ok((deleted, false));
            }
        }
        after(facility);
    }
    Ok((deleted, false))
}

/// The record ids `indexed-2` holds for partition (`f`, `day`), and the number of its rows
/// (rows are numbered from 0 without gaps, so this is also the next row's sequence number).
fn read_indexed(
    table: &impl ReadableTable<(&'static str, u32, u64), &'static [u8]>,
    f: &str,
    day: u32,
) -> Result<(HashSet<[u8; 16]>, u64), LedgerError> {
    let mut ids = HashSet::new();
    let mut rows = 0u64;
    for row in table.range((f, day, 0u64)..=(f, day, u64::MAX))? {
        let (key, value) = row?;
        let (seq, bytes) = (key.value().2, value.value());
        if seq != rows || !bytes.len().is_multiple_of(16) {
            return Err(LedgerError::Corrupt {
                table: "indexed-2",
                reason: format!(
                    "row {seq} of partition {f}/{day} is not row {rows} of whole 16-byte ids \
                     ({} bytes)",
                    bytes.len()
                ),
            });
        }
        ids.extend(fixed_chunks::<16>(bytes));
        rows += 1;
    }
    Ok((ids, rows))
}

/// Writes one persist's facility batches: the facility-day's next batches under facility tag
/// `ftag`, numbered on from its last.
fn write_batches(
    by_facility: &mut redb::Table<'_, (u32, &'static [u8; 16], u32), &'static [u8]>,
    day: u32,
    ftag: &[u8; 16],
    batches: &[Vec<u8>],
) -> Result<(), LedgerError> {
    if batches.is_empty() {
        return Ok(());
    }
    // One past the last batch (`None` past u32::MAX: never overwrite the last one).
    let first = match by_facility
        .range((day, ftag, 0u32)..=(day, ftag, u32::MAX))?
        .next_back()
        .transpose()?
    {
        Some((k, _)) => k.value().2.checked_add(1),
        None => Some(0),
    };
    for (i, batch) in batches.iter().enumerate() {
        let next = u32::try_from(i)
            .ok()
            .zip(first)
            .and_then(|(i, first)| first.checked_add(i))
            .ok_or_else(|| {
                LedgerError::Seal("a facility has 4,294,967,295 index batches on one day".into())
            })?;
        by_facility.insert((day, ftag, next), batch.as_slice())?;
    }
    Ok(())
}

/// The 16-byte facility tag that starts with `locator`, the rest `fill`.
fn pad16(locator: &[u8; 8], fill: u8) -> [u8; 16] {
    let mut out = [fill; 16];
    out[..8].copy_from_slice(locator);
    out
}

/// The batches of `index`'s day whose facility tags lie from `lo` to `hi` (inclusive), opened:
/// (facility, its visits) per batch. Batches that do not open or decode are counted in
/// `damaged` and skipped.
fn read_batches(
    table: &impl ReadableTable<(u32, &'static [u8; 16], u32), &'static [u8]>,
    index: &DayIndex,
    lo: &[u8; 16],
    hi: &[u8; 16],
    damaged: &mut u64,
) -> Result<Vec<(FacilityId, Vec<IndexedVisit>)>, LedgerError> {
    let day = index.day.0;
    let mut out = Vec::new();
    for row in table.range((day, lo, 0u32)..=(day, hi, u32::MAX))? {
        let (key, value) = row?;
        let tag = key.value().1;
        let opened = index
            .open::<hub::VisitBatch>(IndexKind::Batch, tag, value.value())
            .and_then(|b| Some((b.facility().clone(), b.visits()?)));
        match opened {
            Some(batch) => out.push(batch),
            None => *damaged += 1,
        }
    }
    Ok(out)
}

/// Deletes at most `budget` rows of `range` (in key order); returns how many.
fn purge_rows<'a, K, V, KR>(
    t: &mut redb::Table<'_, K, V>,
    range: impl std::ops::RangeBounds<KR> + 'a,
    budget: u64,
) -> Result<u64, LedgerError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
    KR: std::borrow::Borrow<K::SelfType<'a>> + 'a,
{
    let mut n = 0u64;
    for row in t
        .extract_from_if(range, |_, _| true)?
        .take(usize::try_from(budget).unwrap_or(usize::MAX))
    {
        row?;
        n += 1;
    }
    Ok(n)
}

/// Converts the trace index of `visits-by-facility-1` (sealed `Vec<IndexedVisit>` batches)
/// and `visits-by-token-2` (a sealed [`IndexedVisit`] per QR visit) to `visits-by-facility-2`
/// and the token runs (`token-runs-1`), then deletes the old tables (and `visits-by-token-1`,
/// if a hub from before `visits-by-token-2` still has it). Does nothing once they are gone.
///
/// The new index is rebuilt from the facility batches alone: every persist wrote each visit
/// it indexed into its facility batch and, for a QR visit, into the token table too, in one
/// transaction, so the token tables hold nothing the batches do not. Each chunk of
/// [`MIGRATE_CHUNK_KEYS`] facility-days is one write transaction that writes their new rows
/// and deletes their old ones, so an interrupted migration resumes at the next open and loses
/// nothing. Rows of days whose index key is gone (expired, purged) are deleted: nothing can
/// read them. A batch that does not open is counted and deleted: no trace could read it.
fn migrate_index_v1(store: &Store, ratchet: &DayKeyRatchet) -> Result<(), LedgerError> {
    let (mut batches, mut visits, mut unreadable, mut expired) = (0u64, 0u64, 0u64, 0u64);
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let mut rng = StdRng::from_seed(seed);
    loop {
        let txn = store.db().begin_write()?;
        if !txn
            .list_multimap_tables()?
            .any(|t| t.name() == VISITS_BY_FACILITY_V1.name())
        {
            let v2 = txn
                .list_tables()?
                .any(|t| t.name() == VISITS_BY_TOKEN_V2.name());
            let v1 = txn
                .list_multimap_tables()?
                .any(|t| t.name() == VISITS_BY_TOKEN_V1.name());
            if v2 {
                txn.delete_table(VISITS_BY_TOKEN_V2)?;
            }
            if v1 {
                txn.delete_multimap_table(VISITS_BY_TOKEN_V1)?;
            }
            txn.commit()?;
            if unreadable > 0 {
                tracing::warn!(
                    unreadable,
                    "trace-index batches that did not open under their day's key were dropped \
                     by the conversion (damaged rows; the visits stay in their partitions)"
                );
            }
            if batches + unreadable + expired > 0 || v1 || v2 {
                tracing::info!(
                    batches,
                    visits,
                    unreadable,
                    expired,
                    "converted the trace index (visits-by-facility-1, visits-by-token-2 -> \
                     visits-by-facility-2, token-runs-1)"
                );
            }
            return Ok(());
        }
        let finished = {
            let mut old = txn.open_multimap_table(VISITS_BY_FACILITY_V1)?;
            let mut by_facility = txn.open_table(VISITS_BY_FACILITY)?;
            let mut token_rows: BTreeMap<u32, Vec<runs::Row>> = BTreeMap::new();
            let keys = old
                .iter()?
                .take(MIGRATE_CHUNK_KEYS)
                .map(|row| row.map(|(k, _)| (k.value().0, *k.value().1)))
                .collect::<Result<Vec<_>, _>>()?;
            for (day, tag) in &keys {
                let values = old
                    .remove_all((*day, tag))?
                    .map(|v| v.map(|v| v.value().to_vec()))
                    .collect::<Result<Vec<_>, _>>()?;
                let Some(key) = ratchet.index_key(Day(*day)) else {
                    expired += values.len() as u64;
                    continue;
                };
                let index = DayIndex::new(Day(*day), &key);
                for value in &values {
                    let Some(old_batch) =
                        index.open::<Vec<IndexedVisit>>(IndexKind::Facility, tag, value)
                    else {
                        unreadable += 1;
                        continue;
                    };
                    let mut by_place: BTreeMap<FacilityId, Vec<IndexedVisit>> = BTreeMap::new();
                    for v in old_batch {
                        by_place.entry(v.facility.clone()).or_default().push(v);
                    }
                    for (facility, vs) in &by_place {
                        let (tokens, sealed) = index.seal_visits(&mut rng, facility, vs)?;
                        token_rows.entry(*day).or_default().extend(tokens);
                        write_batches(
                            &mut by_facility,
                            *day,
                            &index.facility_tag(facility),
                            &sealed,
                        )?;
                        visits += vs.len() as u64;
                    }
                    batches += 1;
                }
            }
            drop(by_facility);
            for (day, rows) in token_rows {
                runs::write_run(&txn, day, rows)?;
            }
            keys.len() < MIGRATE_CHUNK_KEYS
        };
        if unreadable > 0 && batches == 0 {
            // Not one batch opened under the live days' keys: these are not this index's keys
            // (a wrong or half-restored `keys/`), not damaged rows. Stop before this chunk's
            // deletions commit (the transaction is dropped), keeping every old row.
            return Err(LedgerError::Corrupt {
                table: "visits-by-facility-1",
                reason: format!(
                    "none of {unreadable} trace-index batches opens with this hub's day keys: \
                     the index is not converted and nothing is deleted; check that keys/ is \
                     this hub's, then start it again"
                ),
            });
        }
        if finished {
            txn.delete_multimap_table(VISITS_BY_FACILITY_V1)?;
        }
        txn.commit()?;
    }
}

/// Moves the rows of `visits-by-token-3` (the token index as one B-tree) into sorted runs of
/// `token-runs-1` ([`runs`]), then deletes the table. Does nothing once it is gone.
///
/// Each write transaction takes the table's first [`MIGRATE_TOKEN_ROWS`] rows (in key order,
/// so each day's rows come sorted), writes them as one run per day and deletes them: a move
/// interrupted between transactions leaves every row in exactly one of the two tables, and
/// the next open goes on. The rows are the same bytes (token tag, row tag, sealed locator),
/// moved unread, whatever the day keys: rows of expired days go with the next purge, and a
/// start under the wrong `keys/` (which would see the live days as expired) deletes nothing
/// (review of the move).
fn migrate_token_index_v3(store: &Store) -> Result<(), LedgerError> {
    let mut moved = 0u64;
    loop {
        let txn = store.db().begin_write()?;
        if !txn
            .list_tables()?
            .any(|t| t.name() == VISITS_BY_TOKEN_V3.name())
        {
            return Ok(());
        }
        let mut by_day: BTreeMap<u32, Vec<runs::Row>> = BTreeMap::new();
        let finished = {
            let mut old = txn.open_table(VISITS_BY_TOKEN_V3)?;
            let mut last = None;
            let mut n = 0usize;
            for row in old.iter()?.take(MIGRATE_TOKEN_ROWS) {
                let (k, v) = row?;
                let (day, tag, row_tag) = k.value();
                by_day
                    .entry(day)
                    .or_default()
                    .push(runs::row(tag, row_tag, v.value()));
                last = Some((day, *tag, *row_tag));
                n += 1;
            }
            if let Some((day, tag, row_tag)) = last {
                old.retain_in(..=(day, &tag, &row_tag), |_, _| false)?;
            }
            n < MIGRATE_TOKEN_ROWS
        };
        for (day, rows) in by_day {
            moved += rows.len() as u64;
            runs::write_run(&txn, day, rows)?;
        }
        if finished {
            txn.delete_table(VISITS_BY_TOKEN_V3)?;
        }
        txn.commit()?;
        if finished {
            tracing::info!(
                moved,
                "moved the token index into sorted runs (visits-by-token-3 -> token-runs-1)"
            );
            return Ok(());
        }
    }
}

/// Moves the rows of `indexed-1` (one per record, written by earlier versions) into
/// `indexed-2` (one row per partition) and deletes `indexed-1`. Does nothing if it is gone.
fn migrate_indexed_v1(txn: &WriteTransaction) -> Result<(), LedgerError> {
    if !txn.list_tables()?.any(|t| t.name() == INDEXED_V1.name()) {
        return Ok(());
    }
    let mut grouped: BTreeMap<(String, u32), Vec<u8>> = BTreeMap::new();
    for row in txn.open_table(INDEXED_V1)?.iter()? {
        let (key, _) = row?;
        let (f, day, id) = key.value();
        grouped
            .entry((f.to_owned(), day))
            .or_default()
            .extend_from_slice(id);
    }
    let mut next = txn.open_table(INDEXED)?;
    for ((f, day), ids) in &grouped {
        let (_, rows) = read_indexed(&next, f, *day)?;
        next.insert((f.as_str(), *day, rows), ids.as_slice())?;
    }
    drop(next);
    txn.delete_table(INDEXED_V1)?;
    tracing::info!(
        partitions = grouped.len(),
        "moved the indexed-record list to one row per partition (indexed-1 -> indexed-2)"
    );
    Ok(())
}

/// The concatenated chunks of partition `id`, if any.
/// Bits of a `hub-chunks-1` sequence number that number the pieces of one persist's chunk
/// (the bits above number the persists): rows are read back in key order and concatenated, so
/// pieces and persists alike come back as the byte stream that was saved. Rows written before
/// chunks were split (persist numbers 0 to 63, one piece each) read as pieces of persist 0.
const PIECE_BITS: u32 = 8;
/// The bytes of redb's page that one row's leaf header and key take, at most.
const PIECE_SLACK: usize = 256;
/// redb's page size (its default, which the hub's store uses).
const PAGE: usize = 4096;

/// Splits a chunk into the rows it is stored as. redb stores a value larger than a page in a
/// leaf of its own, allocated in a power of two of pages: a 17 KiB first save of a 120-visit
/// partition took 32 KiB (124 of every 273 bytes a visit wasted, measured at a million
/// visits). Each piece but the last fills such an allocation to within [`PIECE_SLACK`]; the
/// last, smaller than a page, shares a leaf with other rows. At most about 40 pieces for any
/// size, so [`PIECE_BITS`] holds them.
fn chunk_pieces(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let take = if rest.len() > PAGE - PIECE_SLACK {
            let mut size = PAGE;
            while size.saturating_mul(2) - PIECE_SLACK <= rest.len() {
                size *= 2;
            }
            size - PIECE_SLACK
        } else {
            rest.len()
        };
        let (piece, after) = rest.split_at(take);
        rest = after;
        Some(piece)
    })
}

/// zstd's frame magic number as stored (little-endian): a chunk that begins with it is a full
/// save packed by [`pack_save`]. automerge's own chunks begin with theirs (85 6f 4a 83), so the
/// chunks stored before zstd (automerge's column DEFLATE) load as they are.
const ZSTD_MAGIC: [u8; 4] = zstd::zstd_safe::MAGICNUMBER.to_le_bytes();

/// zstd's level for full saves. A save is mostly sealed envelopes, which no level compresses;
/// the rest (keys, operation ids, actors) compresses about as well at 1 as automerge's
/// DEFLATE at 6, and level 1 passes the envelopes at memory speed where DEFLATE searched them
/// (BENCHMARKS.md, issue 14: 2.0 against 0.x µs a visit).
const SAVE_LEVEL: i32 = 1;

/// The most a packed chunk may unpack to: far beyond any partition the quotas let a facility's
/// devices send in a day, and a bound on what a damaged row can make the hub allocate.
const UNPACKED_MAX: usize = 1 << 30;

/// A full save of a partition (automerge's, without its column DEFLATE) as the hub stores it:
/// one zstd frame with its size and a checksum of the content (a damaged row is found as
/// such before automerge reads it), which [`read_chunks`] unpacks. Each thread keeps its
/// compression context.
pub fn pack_save(save: &[u8]) -> Result<Vec<u8>, LedgerError> {
    // What could never be read back is refused before it is stored.
    if save.len() > UNPACKED_MAX {
        return Err(LedgerError::Pack(std::io::Error::other(format!(
            "a save of {} bytes is more than the {UNPACKED_MAX} a chunk may unpack to",
            save.len()
        ))));
    }
    thread_local! {
        static PACKER: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let failed = LedgerError::Pack;
    PACKER.with(|packer| {
        let mut packer = packer.borrow_mut();
        let packer = match packer.as_mut() {
            Some(p) => p,
            None => {
                let mut p = zstd::bulk::Compressor::new(SAVE_LEVEL).map_err(failed)?;
                p.include_checksum(true).map_err(failed)?;
                packer.insert(p)
            }
        };
        packer.compress(save).map_err(failed)
    })
}

/// Appends one stored chunk to `out`: as it is (automerge's bytes), or unpacked (a zstd
/// frame of [`pack_save`]).
fn unpack_chunk(chunk: &[u8], id: &PartitionId, out: &mut Vec<u8>) -> Result<(), LedgerError> {
    if !chunk.starts_with(&ZSTD_MAGIC) {
        out.extend_from_slice(chunk);
        return Ok(());
    }
    let damaged = |reason: String| LedgerError::Corrupt {
        table: "hub-chunks-1",
        reason: format!("partition {id}: a packed chunk {reason}"),
    };
    let size = zstd::zstd_safe::get_frame_content_size(chunk)
        .map_err(|e| damaged(format!("has no readable frame header ({e})")))?
        .ok_or_else(|| damaged("does not say its size".into()))?;
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s <= UNPACKED_MAX)
        .ok_or_else(|| damaged(format!("claims {size} bytes, more than any partition")))?;
    let unpacked = zstd::bulk::decompress(chunk, size)
        .map_err(|e| damaged(format!("does not unpack ({e})")))?;
    if unpacked.len() != size {
        return Err(damaged(format!(
            "unpacks to {} bytes, not the {size} it says",
            unpacked.len()
        )));
    }
    out.extend_from_slice(&unpacked);
    Ok(())
}

/// Partition `id`'s stored chunks, unpacked and concatenated (what `Partition::load` takes),
/// or `None` if it has none. A chunk's rows are the pieces of [`chunk_pieces`], numbered by
/// its persist in the key's high bits.
fn read_chunks(
    chunks: &impl ReadableTable<(&'static str, u32, u64), &'static [u8]>,
    id: &PartitionId,
) -> Result<Option<Vec<u8>>, LedgerError> {
    let f = id.facility.as_str();
    let mut out: Option<Vec<u8>> = None;
    // The chunk being read: its persist number and the pieces read so far.
    let mut chunk: Option<(u64, Vec<u8>)> = None;
    for row in chunks.range((f, id.day.0, 0u64)..=(f, id.day.0, u64::MAX))? {
        let (k, v) = row?;
        let persist = k.value().2 >> PIECE_BITS;
        match &mut chunk {
            Some((p, pieces)) if *p == persist => pieces.extend_from_slice(v.value()),
            _ => {
                if let Some((_, pieces)) = chunk.take() {
                    unpack_chunk(&pieces, id, out.get_or_insert_with(Vec::new))?;
                }
                chunk = Some((persist, v.value().to_vec()));
            }
        }
    }
    if let Some((_, pieces)) = chunk {
        unpack_chunk(&pieces, id, out.get_or_insert_with(Vec::new))?;
    }
    Ok(out)
}

fn parse_heads(bytes: &[u8]) -> Result<Vec<[u8; 32]>, LedgerError> {
    if !bytes.len().is_multiple_of(32) {
        return Err(LedgerError::Corrupt {
            table: "partition-heads-1",
            reason: format!(
                "{} bytes is not a whole number of 32-byte heads",
                bytes.len()
            ),
        });
    }
    Ok(fixed_chunks::<32>(bytes).collect())
}

/// `bytes` as consecutive `N`-byte arrays (a trailing partial chunk is dropped: callers check
/// the length first).
fn fixed_chunks<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

/// From this many records to index, a persist opens and seals them on a worker, and on its own
/// thread once the save is written ([`share_beside`]). Below it, all on the calling thread: a
/// thread costs more than it saves.
const OVERLAP_INDEX_MIN: usize = 64;

/// Records a persist's thread takes at a time ([`share_beside`]): small enough that the two
/// threads finish within a block of each other.
const INDEX_BLOCK: usize = 16;

/// `items` in blocks of `size` (the last may be shorter), each holding only its own items:
/// splitting a vector off the front again and again copied the rest each time and left each
/// block the capacity of all that followed it, quadratic in the records of a persist (a review
/// of the shared persist: about 7 GB at 50,000 fresh records).
fn blocks_of<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let size = size.max(1);
    let mut items = items.into_iter();
    std::iter::from_fn(|| {
        let block: Vec<T> = items.by_ref().take(size).collect();
        (!block.is_empty()).then_some(block)
    })
    .collect()
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The persists' worker: one thread kept for the process (spawning one per persist cost about
/// 0.3 µs a record of a first sync, a thread's start and its allocator's set-up included).
/// `None` if the OS gave no thread: persists then run all their work on their own thread.
fn persist_worker() -> Option<&'static rayon_core::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon_core::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon_core::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "persist-worker".into())
            .build()
            .map_err(|e| {
                tracing::warn!(
                    "no thread for the persists' worker ({e}): each persist runs all its work \
                     on its own thread"
                );
            })
            .ok()
    })
    .as_ref()
}

/// Runs `prepare` and `here` on this thread and `worker`'s, each on whichever thread comes to
/// it first, and then `work` on `blocks` on both. This thread comes to `prepare` first unless
/// the worker is already running (it may be asleep, or busy with another thread's persist),
/// and the worker then takes `here` (a persist's save) while this one prepares; if the worker
/// comes late, this thread does both. `prepare` makes two states: the preparing thread's, and
/// a copy it hands the other (a persist's: the session keys unwrapped once,
/// [`PartitionOpener::share_keys`]). Each thread then takes one block at a time until none is
/// left, so both finish together whatever `here` and `prepare` took; each state is then
/// `finish`ed. Returns `here`'s result and the finished states (one or two).
///
/// Without a worker (the OS gave it no thread), all of it runs here: a persist is slower
/// then, never refused. A panic on either thread is raised here.
fn share_beside<S: Send, B: Send, T: Send, H: Send>(
    worker: Option<&rayon_core::ThreadPool>,
    prepare: impl FnOnce() -> (S, S) + Send,
    blocks: Vec<B>,
    work: impl Fn(&mut S, B) + Sync,
    finish: impl Fn(S) -> T + Sync,
    here: impl FnOnce() -> H + Send,
) -> (H, Vec<T>) {
    let slots: Vec<std::sync::Mutex<Option<B>>> = blocks
        .into_iter()
        .map(|b| std::sync::Mutex::new(Some(b)))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let drain = |state: &mut S| {
        while let Some(slot) = slots.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
            if let Some(block) = lock(slot).take() {
                work(state, block);
            }
        }
    };
    // `prepare` goes to whichever thread comes to it first, with the sender of the copy; the
    // other receives the copy. None comes if the thread preparing panicked: its panic is
    // raised here. `here` goes to whichever thread comes to it first, after `prepare`.
    let (tx, rx) = std::sync::mpsc::sync_channel::<S>(1);
    let first = std::sync::Mutex::new(Some((prepare, tx)));
    let copy = std::sync::Mutex::new(rx);
    let save = std::sync::Mutex::new(Some(here));
    let saved = std::sync::Mutex::new(None);
    let part = || -> Option<T> {
        let taken = lock(&first).take();
        let mine = taken.map(|(prepare, tx)| {
            let (mine, theirs) = prepare();
            // Room for one: never blocks, also when no thread is left to take it.
            let _ = tx.send(theirs);
            mine
        });
        let here = lock(&save).take();
        if let Some(here) = here {
            let out = here();
            *lock(&saved) = Some(out);
        }
        let mut state = match mine {
            Some(mine) => mine,
            None => lock(&copy).recv().ok()?,
        };
        drain(&mut state);
        Some(finish(state))
    };
    let mut done = Vec::with_capacity(2);
    match worker {
        None => done.extend(part()),
        Some(worker) => {
            let theirs = std::sync::Mutex::new(None);
            // The worker's job borrows this frame: `in_place_scope` returns only once it has
            // run (and raises its panic here).
            worker.in_place_scope(|scope| {
                let (part, theirs) = (&part, &theirs);
                scope.spawn(move |_| *lock(theirs) = part());
                done.extend(part());
            });
            done.extend(
                theirs
                    .into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
        }
    }
    let here = saved
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Both threads ran `part` to its end without a panic, so one of them ran `here`.
    let here = here.unwrap_or_else(|| unreachable!("a persist's save ran on neither thread"));
    (here, done)
}

/// The index rows one persist writes, built apart from the database.
#[derive(Default)]
struct IndexWork {
    /// The token rows, for the persist's run ([`runs::write_run`] sorts them).
    tokens: Vec<runs::Row>,
    /// The sealed batches of the visits indexed, for the facility's entry (one per worker).
    batches: Vec<Vec<u8>>,
    /// The records marked done in `indexed-2`: those indexed, and those `refused`.
    records: Vec<RecordId>,
    /// Records left out because their device was revoked when it sealed them, by device id.
    refused: BTreeMap<String, u64>,
    unreadable: u64,
    missing_keys: usize,
    /// Records indexed whose session key was wrapped to another day's key than the partition's.
    fallback: u64,
}

impl IndexWork {
    /// This work and `other`'s, as one.
    fn merged(mut self, other: IndexWork) -> IndexWork {
        self.tokens.extend(other.tokens);
        self.batches.extend(other.batches);
        self.records.extend(other.records);
        for (device, n) in other.refused {
            *self.refused.entry(device).or_default() += n;
        }
        self.unreadable += other.unreadable;
        // The openers of one persist share their keys: each counts every session it lacks.
        self.missing_keys = self.missing_keys.max(other.missing_keys);
        self.fallback += other.fallback;
        self
    }
}

/// The opener of a partition's records under the ledger's ratchet: `shared::unseal`'s, the one
/// the simulation and the tests check what the hub holds with.
type Opener<'r> = PartitionOpener<Secrets<'r>>;

/// The day secrets an [`Opener`] asks for.
type Secrets<'r> = Box<dyn FnMut(Day) -> Option<DaySecret> + Send + 'r>;

/// Whether the hub leaves `visit` out of the trace index because of the revocation list:
/// its device (the sealed record's `device`, what a trace shows) is revoked and it was
/// sealed (`scanned_at`, by the device's clock) at or after the revocation. Both are the
/// writer's claims, as is the automerge actor (a hash of the device id the writer picks): a
/// stolen device running altered software can name a sibling or backdate. What bounds that
/// is the siblings' refusing its sessions once they hold the list (`ARCHITECTURE.md`,
/// "Revocation reaching the siblings").
pub fn refused_as_revoked(list: &crate::auth::RevocationList, visit: &IndexedVisit) -> bool {
    list.device_revoked_at(visit.device.as_str())
        .is_some_and(|at| visit.scanned_at >= at)
}

/// Opens `fresh` envelopes of the opener's partition, decides what is indexed
/// ([`hub::plan_index`], less what [`refused_as_revoked`] refuses) and seals their index
/// entries.
fn build_index(
    index: &DayIndex,
    mut opener: Opener<'_>,
    fresh: Vec<(RecordId, Result<Envelope, EnvelopeError>)>,
    revoked: &crate::auth::RevocationList,
) -> Result<IndexWork, LedgerError> {
    let facility = opener.partition().facility.clone();
    let plan = hub::plan_index(&mut opener, fresh);
    let mut sealing = Sealing::default();
    sealing.add(index, &facility, plan, revoked);
    sealing.finish(index, &facility, opener.sessions_without_key())
}

/// The index entries of a persist, sealed as its records are opened, block by block: each
/// block's token rows at once, by the thread that opened it (so that a persist's two threads
/// finish together), the facility's batches of every visit at the end.
#[derive(Default)]
struct Sealing {
    work: IndexWork,
    /// The visits to index so far, for the facility's batches.
    visits: Vec<IndexedVisit>,
}

impl Sealing {
    /// Seals the token rows of what `plan` opened of a partition of `facility`, less what
    /// [`refused_as_revoked`] refuses, and keeps its visits for the batches.
    fn add(
        &mut self,
        index: &DayIndex,
        facility: &FacilityId,
        plan: hub::IndexPlan,
        revoked: &crate::auth::RevocationList,
    ) {
        let work = &mut self.work;
        work.fallback += plan.fallback;
        work.unreadable += plan.retry.len() as u64;
        let from = self.visits.len();
        for v in plan.visits {
            work.records.push(v.record);
            if refused_as_revoked(revoked, &v) {
                *work.refused.entry(v.device.to_string()).or_default() += 1;
            } else {
                self.visits.push(v);
            }
        }
        work.tokens
            .extend(index.token_rows(facility, &self.visits[from..]));
    }

    /// The index work: what was added, and the facility's batches of its visits, sealed once
    /// per [`BATCH_VISITS`] visits (a trace reads all of a facility-day's visits anyway; a
    /// token row only says which facility's batches hold the token's visit).
    fn finish(
        mut self,
        index: &DayIndex,
        facility: &FacilityId,
        sessions_without_key: usize,
    ) -> Result<IndexWork, LedgerError> {
        self.work.missing_keys = sessions_without_key;
        if !self.visits.is_empty() {
            let mut seed = [0u8; 32];
            OsRng.fill_bytes(&mut seed);
            let mut rng = StdRng::from_seed(seed);
            self.work.batches = index.seal_batches(&mut rng, facility, &self.visits)?;
        }
        Ok(self.work)
    }
}

/// A [`PartitionStore`] over the hub's ledger for one sync session, admitted for one facility.
///
/// Partitions are loaded on first use and kept in memory for the session; the shell persists
/// them with [`HubPartitions::persist`] on every `Event::PartitionUpdated`, and stores sync
/// states with [`PartitionStore::put_sync_state`] on `Event::SyncStateChanged` (in that order,
/// as the events come). Sync states are keyed by [`peer_key`].
pub struct HubPartitions<'a> {
    ledger: &'a Ledger<'a>,
    facility: FacilityId,
    now: UnixSeconds,
    cache: BTreeMap<PartitionId, Partition>,
}

impl fmt::Debug for HubPartitions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubPartitions")
            .field("facility", &self.facility)
            .field("now", &self.now)
            .field("loaded", &self.cache.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl HubPartitions<'_> {
    /// The facility this session is admitted for.
    pub fn facility(&self) -> &FacilityId {
        &self.facility
    }

    /// A partition loaded or created in this session.
    pub fn get(&self, id: &PartitionId) -> Option<&Partition> {
        self.cache.get(id)
    }

    /// The partitions loaded or created in this session.
    pub fn loaded(&self) -> impl Iterator<Item = &Partition> {
        self.cache.values()
    }

    /// The loaded partitions, to hand to [`Ledger::resume`] for the session's next frame.
    pub fn into_cache(self) -> BTreeMap<PartitionId, Partition> {
        self.cache
    }

    /// Persists and indexes partition `id` (see [`Ledger::persist`]); returns the records
    /// newly indexed, 0 if the partition was not touched in this session. On error the
    /// partition is dropped from memory, so that a later use reloads what is stored.
    pub fn persist(&mut self, id: &PartitionId) -> Result<u64, LedgerError> {
        let Some(partition) = self.cache.get_mut(id) else {
            return Ok(0);
        };
        self.ledger.persist(partition, self.now).inspect_err(|_| {
            self.cache.remove(id);
        })
    }

    /// Persists every partition of the session, in id order; returns the records indexed.
    pub fn persist_all(&mut self) -> Result<u64, LedgerError> {
        let ids: Vec<PartitionId> = self.cache.keys().cloned().collect();
        let mut total = 0u64;
        for id in ids {
            total += self.persist(&id)?;
        }
        Ok(total)
    }

    /// Why this session may not hold `id`, if it may not.
    fn refusal(&self, id: &PartitionId) -> Option<String> {
        if id.facility != self.facility {
            return Some(format!(
                "this session is admitted for facility {} only",
                self.facility
            ));
        }
        self.ledger
            .check_live(id, self.now)
            .err()
            .map(|e| e.to_string())
    }
}

impl PartitionStore for HubPartitions<'_> {
    fn live_partitions(
        &self,
        facility: Option<&FacilityId>,
    ) -> Result<Vec<PartitionSummary>, SessionStoreError> {
        if facility.is_some_and(|f| *f != self.facility) {
            return Ok(Vec::new());
        }
        let mut out: BTreeMap<PartitionId, PartitionSummary> = self
            .ledger
            .summaries(&self.facility, self.now)?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        // What this session holds in memory is at least as new as what is stored.
        for p in self.cache.values() {
            if self.refusal(p.id()).is_none() {
                out.insert(p.id().clone(), PartitionSummary::of(p));
            }
        }
        Ok(out.into_values().collect())
    }

    fn partition_mut(
        &mut self,
        id: &PartitionId,
    ) -> Result<Option<&mut Partition>, SessionStoreError> {
        if self.refusal(id).is_some() {
            return Ok(None);
        }
        if !self.cache.contains_key(id) {
            match self.ledger.load(id)? {
                Some(p) => {
                    self.cache.insert(id.clone(), p);
                }
                None => return Ok(None),
            }
        }
        Ok(self.cache.get_mut(id))
    }

    fn create_partition(&mut self, id: &PartitionId) -> Result<&mut Partition, SessionStoreError> {
        if let Some(why) = self.refusal(id) {
            return Err(SessionStoreError::NotAllowed {
                id: id.clone(),
                why,
            });
        }
        if !self.cache.contains_key(id) {
            let p = match self.ledger.load(id)? {
                Some(p) => p,
                None => Partition::new(id.clone(), &self.ledger.actor),
            };
            self.cache.insert(id.clone(), p);
        }
        self.cache.get_mut(id).ok_or_else(|| {
            SessionStoreError::Failed(format!("partition {id} vanished right after creation"))
        })
    }

    fn sync_state(
        &self,
        peer: &Peer,
        id: &PartitionId,
    ) -> Result<Option<Vec<u8>>, SessionStoreError> {
        if self.refusal(id).is_some() {
            return Ok(None);
        }
        let read = || -> Result<Option<Vec<u8>>, LedgerError> {
            let txn = self.ledger.store.db().begin_read()?;
            let t = txn.open_table(SYNC_STATES)?;
            let key = peer_key(peer);
            Ok(t.get((key.as_str(), id.facility.as_str(), id.day.0))?
                .map(|v| v.value().to_vec()))
        };
        Ok(read()?)
    }

    fn put_sync_state(
        &mut self,
        peer: &Peer,
        id: &PartitionId,
        state: &[u8],
    ) -> Result<(), SessionStoreError> {
        if let Some(why) = self.refusal(id) {
            return Err(SessionStoreError::NotAllowed {
                id: id.clone(),
                why,
            });
        }
        let write = || -> Result<(), LedgerError> {
            let txn = self.ledger.store.begin_write()?;
            let key = peer_key(peer);
            txn.open_table(SYNC_STATES)?
                .insert((key.as_str(), id.facility.as_str(), id.day.0), state)?;
            txn.commit()?;
            Ok(())
        };
        Ok(write()?)
    }

    fn discard_partition(
        &mut self,
        id: &PartitionId,
        _good_heads: &[automerge::ChangeHash],
    ) -> Result<(), SessionStoreError> {
        // The ledger holds what the last `PartitionUpdated` persisted; the next use reloads it.
        self.cache.remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> DayIndex {
        DayIndex::new(Day(20_000), &[7u8; 32])
    }

    fn visit(token: Option<[u8; 16]>) -> IndexedVisit {
        IndexedVisit {
            facility: FacilityId::parse("fac_a").expect("valid"),
            scanned_at: 1_728_000_000,
            device: DeviceId::parse("dev_a").expect("valid"),
            token,
            record: RecordId([1; 16]),
        }
    }

    /// A persist's worker and its own thread share the blocks, each exactly once, the thread
    /// that prepares keeping its state and handing the copy over; the save runs once, on
    /// either. Without a worker thread (the OS gave none) all of it
    /// runs on the persist's own thread after the save (the persist panicked there before).
    /// The pool the OS refuses a thread: a stack of 1 EiB, beyond any address space.
    #[test]
    fn a_persists_blocks_are_shared_and_fall_back_to_its_own_thread() {
        let me = std::thread::current().id();
        let refused = rayon_core::ThreadPoolBuilder::new()
            .num_threads(1)
            .stack_size(1 << 60)
            .build();
        assert!(refused.is_err(), "a thread with a stack of 1 EiB");
        for (worker, threaded) in [(persist_worker(), true), (refused.ok().as_ref(), false)] {
            assert_eq!(worker.is_some(), threaded);
            let prepared = std::sync::Mutex::new(None);
            let saved_on = std::sync::Mutex::new(Vec::new());
            let (here, done) = share_beside(
                worker,
                || {
                    *lock(&prepared) = Some(std::thread::current().id());
                    ((1u64, Vec::new()), (2u64, Vec::new()))
                },
                (1..=40u64).collect(),
                |(_, got): &mut (u64, Vec<(u64, std::thread::ThreadId)>), b| {
                    // Slow enough that the worker is still at it when the save returns.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    got.push((b, std::thread::current().id()));
                },
                |(who, got)| (who, got),
                || {
                    lock(&saved_on).push(std::thread::current().id());
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    7
                },
            );
            assert_eq!(here, 7);
            let saved_on = lock(&saved_on).clone();
            assert_eq!(saved_on.len(), 1, "the save runs once");
            let mut blocks: Vec<u64> = done
                .iter()
                .flat_map(|(_, got)| got.iter().map(|g| g.0))
                .collect();
            blocks.sort_unstable();
            assert_eq!(blocks, (1..=40).collect::<Vec<_>>(), "threaded: {threaded}");
            let on = |t: u64| {
                done.iter()
                    .filter(|(who, _)| *who == t)
                    .flat_map(|(_, got)| got.iter().map(|g| g.1))
                    .collect::<Vec<_>>()
            };
            let prepared = lock(&prepared)
                .take()
                .unwrap_or_else(|| panic!("not prepared"));
            // The state prepared stays on the thread that prepared it; the copy goes to the
            // other. Which thread prepares, and how many blocks each takes, depends on the
            // scheduler.
            assert!(on(1).iter().all(|t| *t == prepared));
            assert!(on(2).iter().all(|t| *t != prepared));
            if !threaded {
                assert_eq!(prepared, me);
                assert_eq!(saved_on, [me]);
                assert_eq!(done.len(), 1);
            }
        }
    }

    /// Each block holds its own records only, in order, whatever their number (a block split
    /// off the front of the rest kept the capacity of all that followed it).
    #[test]
    fn a_persists_blocks_hold_their_own_records_only() {
        for n in [0usize, 1, 15, 16, 17, 120, 5_000] {
            let blocks = blocks_of((0..n).collect::<Vec<usize>>(), 16);
            assert_eq!(blocks.len(), n.div_ceil(16), "{n}");
            assert!(
                blocks.iter().all(|b| !b.is_empty() && b.capacity() <= 16),
                "{n}"
            );
            let all: Vec<usize> = blocks.into_iter().flatten().collect();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "{n}");
        }
        assert_eq!(blocks_of(vec![1, 2], 0), [[1], [2]]);
    }

    /// A panic preparing, saving or working (whichever thread) reaches the persist's caller;
    /// the other thread does not wait for a copy that never comes. The worker survives it.
    #[test]
    fn a_panic_in_a_persists_worker_is_raised_not_waited_for() {
        let cases = [
            // (prepare panics, the save panics, a block panics, the save is slow)
            (true, false, false, false),
            (true, false, false, true),
            (false, false, true, true),
            (false, true, false, false),
            (false, true, false, true),
        ];
        for (in_prepare, in_here, in_block, slow_here) in cases {
            let run = std::panic::catch_unwind(|| {
                share_beside(
                    persist_worker(),
                    || {
                        assert!(!in_prepare, "prepare fails");
                        (0u64, 0u64)
                    },
                    vec![1u64, 2, 3],
                    |_: &mut u64, b| assert!(!(in_block && b == 2), "block 2 fails"),
                    |s| s,
                    || {
                        if slow_here {
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        assert!(!in_here, "the save fails");
                    },
                )
            });
            assert!(
                run.is_err(),
                "{in_prepare} {in_here} {in_block} {slow_here}"
            );
        }
        // And the worker takes the next persist's work as before.
        let (here, done) = share_beside(
            persist_worker(),
            || (0u64, 0u64),
            vec![1u64, 2, 3],
            |n: &mut u64, b| *n += b,
            |s| s,
            || 5,
        );
        assert_eq!((here, done.iter().sum::<u64>()), (5, 6));
    }

    #[test]
    fn chunk_pieces_fill_power_of_two_allocations_and_concatenate_to_the_chunk() {
        for len in [0usize, 1, 3_839, 3_840, 3_841, 8_000, 17_700, 1_000_000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let pieces: Vec<&[u8]> = chunk_pieces(&bytes).collect();
            assert_eq!(pieces.concat(), bytes, "{len}");
            assert!(pieces.len() < 1 << PIECE_BITS, "{len}");
            let (last, whole) = pieces
                .split_last()
                .map_or((None, &[][..]), |(l, w)| (Some(l), w));
            for p in whole {
                let alloc = p.len() + PIECE_SLACK;
                assert!(
                    alloc.is_power_of_two() && alloc >= PAGE,
                    "{len}: piece {}",
                    p.len()
                );
            }
            if let Some(last) = last {
                assert!(
                    last.len() <= PAGE - PIECE_SLACK
                        || (last.len() + PIECE_SLACK).is_power_of_two(),
                    "{len}: last {}",
                    last.len()
                );
            }
        }
    }

    #[test]
    fn a_persists_visits_are_sealed_in_batches_that_fit_a_page() {
        let ix = index();
        let mut rng = StdRng::from_seed([2; 32]);
        let visits: Vec<IndexedVisit> = (0..250u32)
            .map(|i| {
                let mut v = visit(Some([(i % 251) as u8; 16]));
                v.scanned_at += u64::from(i) * 30;
                v.record = RecordId([(i % 256) as u8; 16]);
                v
            })
            .collect();
        let (_, batches) = ix
            .seal_visits(&mut rng, &visits[0].facility, &visits)
            .expect("seals");
        assert_eq!(batches.len(), 3);
        let tag = ix.facility_tag(&visits[0].facility);
        let mut back = Vec::new();
        for b in &batches {
            assert!(b.len() <= PAGE - PIECE_SLACK, "{} bytes", b.len());
            back.extend(ix.open_batch(&tag, b).expect("opens"));
        }
        assert_eq!(back, visits);
    }

    #[test]
    fn sealed_batches_open_only_under_their_day_table_and_tag() {
        let ix = index();
        let mut rng = StdRng::from_seed([1; 32]);
        let v = visit(Some([9; 16]));
        let (rows, batches) = ix
            .seal_visits(&mut rng, &v.facility, std::slice::from_ref(&v))
            .expect("seals");
        let sealed = batches.into_iter().next().expect("a batch");
        assert_eq!(rows.len(), 1);
        let tag = ix.facility_tag(&v.facility);
        assert_eq!(ix.open_batch(&tag, &sealed), Some(vec![v.clone()]));
        // Moved to another tag, another day or another kind of row: it does not open.
        assert_eq!(ix.open_batch(&[0; 16], &sealed), None);
        let other_day = DayIndex::new(Day(20_001), &[7u8; 32]);
        assert_eq!(other_day.open_batch(&tag, &sealed), None);
        assert_eq!(
            ix.open::<Vec<IndexedVisit>>(IndexKind::Facility, &tag, &sealed),
            None
        );
        assert_eq!(ix.open_batch(&tag, &sealed[..10]), None);
        // Without the day's index key (another key, same day): nothing opens.
        let other_key = DayIndex::new(Day(20_000), &[8u8; 32]);
        assert_eq!(other_key.open_batch(&tag, &sealed), None);
        // The token, the device and the facility are nowhere in the sealed bytes.
        assert!(!sealed.windows(16).any(|w| w == [9u8; 16]));
        assert!(!sealed.windows(5).any(|w| w == b"dev_a" || w == b"fac_a"));
    }

    #[test]
    fn token_rows_open_only_under_their_day_key_and_tag() {
        let ix = index();
        let tag = ix.token_tag(&[9; 16]);
        let fa = ix.facility_tag(&FacilityId::parse("fac_a").expect("valid"));
        let fb = ix.facility_tag(&FacilityId::parse("fac_b").expect("valid"));
        let (row, sealed) = ix.token_row(&tag, &fa);
        assert_eq!(
            ix.open_token_row(&tag, &row, &sealed),
            Some(first::<8>(&fa))
        );
        // Deterministic: the same visit's row is the same row, another facility's another.
        assert_eq!(ix.token_row(&tag, &fa), (row, sealed));
        let (row_b, sealed_b) = ix.token_row(&tag, &fb);
        assert_ne!(row_b, row);
        assert_eq!(
            ix.open_token_row(&tag, &row_b, &sealed_b),
            Some(first::<8>(&fb))
        );
        // The locator is not in clear, nor is the facility tag's start.
        assert_ne!(sealed, first::<8>(&fa));
        // Without the day's index key, under another tag, or altered: it does not open.
        for other in [
            DayIndex::new(Day(20_000), &[8u8; 32]),
            DayIndex::new(Day(20_001), &[7u8; 32]),
        ] {
            assert_eq!(other.open_token_row(&tag, &row, &sealed), None);
        }
        let other_tag = ix.token_tag(&[10; 16]);
        assert_eq!(ix.open_token_row(&other_tag, &row, &sealed), None);
        let mut flipped = sealed;
        flipped[0] ^= 1;
        assert_eq!(ix.open_token_row(&tag, &row, &flipped), None);
        assert_eq!(ix.open_token_row(&tag, &row_b, &sealed), None);
    }

    #[test]
    fn tags_depend_on_the_day_key_and_kind() {
        let a = index();
        let b = DayIndex::new(Day(20_000), &[8u8; 32]);
        assert_ne!(a.token_tag(&[1; 16]), b.token_tag(&[1; 16]));
        assert_ne!(a.token_tag(&[1; 16]), a.token_tag(&[2; 16]));
        let f = FacilityId::parse("fac_a").expect("valid");
        assert_ne!(a.facility_tag(&f), b.facility_tag(&f));
        assert_eq!(a.facility_tag(&f), first::<16>(&a.facility_tag_v1(&f)));
        // Token and facility tags use different keys even over equal bytes.
        let g = FacilityId::parse("0123456789abcdef").expect("valid");
        let mut t = [0u8; 16];
        t.copy_from_slice(b"0123456789abcdef");
        assert_ne!(a.facility_tag(&g), a.token_tag(&t));
    }

    #[test]
    fn debug_elides_the_token() {
        let text = format!("{:?}", visit(Some([0xAB; 16])));
        assert!(text.contains("<elided>"));
        assert!(!text.contains("171") && !text.to_lowercase().contains("abab"));
    }

    #[test]
    fn heads_parse_or_are_damaged() {
        assert_eq!(parse_heads(&[]).expect("empty"), Vec::<[u8; 32]>::new());
        assert_eq!(
            parse_heads(&[1u8; 64]).expect("two heads"),
            vec![[1u8; 32]; 2]
        );
        assert!(matches!(
            parse_heads(&[1u8; 33]),
            Err(LedgerError::Corrupt { .. })
        ));
    }

    #[test]
    fn peer_keys_do_not_collide() {
        let device = Peer::Device {
            device: DeviceId::parse("hub-x").expect("valid"),
            facility: FacilityId::parse("fac_a").expect("valid"),
        };
        let hub = Peer::Hub { region: "x".into() };
        assert_eq!(peer_key(&device), "hub-x");
        assert_eq!(peer_key(&hub), "hub:x");
    }
}
