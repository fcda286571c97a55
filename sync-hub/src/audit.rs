//! The audit log: every trace, approval, removal, designation and credential change, who did
//! it, when, for which case and which facilities it touched.
//!
//! Append-only and hash-chained under a secret: each entry's `hash` is
//! `blake3::keyed_hash(chain key, prev || entry)`, the chain key derived from `keys/audit.key`
//! (32 random bytes apart from the database). Editing, removing or inserting an entry breaks
//! the chain at that entry ([`AuditLog::verify`] names it), and since nobody without the key
//! can compute a link, re-hashing the chain after an edit does not mend it.
//!
//! What an entry says about a case (case id, purpose, the facilities it touched, its detail)
//! expires with the 28-day retention: it lives in `audit-details-1`, and the chain holds only
//! a keyed commitment to it, over a random nonce stored with the details. Retention deletes
//! the details of older entries ([`AuditLog::expire_details`]); who did what and when stays in
//! the chain, which still verifies, and without the nonce the commitment tells nothing about
//! what was deleted, not even to the holder of the key.
//!
//! The chain's head (entry count, last hash, and the time before which details have expired)
//! is written after every append to `keys/audit.head` with a MAC under the same key, so that
//! entries cut off the end of the table, or details deleted before their time, are detected
//! too. The database may hold entries past the head's count (an append that committed before
//! its head was written); they verify like every other keyed link, so only a holder of the key
//! can have written them.
//!
//! A log made before the key existed (`audit-1`, unkeyed) is verified the old way and re-keyed
//! once into `audit-2` when the store first opens with the key (`upgrade`); an `audit.rekey`
//! entry records what the old verification found.

use crate::auth::Principal;
use crate::keys::MacKey;
use crate::store::{Store, StoreError};
use rand_core::{OsRng, RngCore};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use shared::UnixSeconds;
use std::path::{Path, PathBuf};

/// `audit-2`: sequence number (from 0) -> JSON of the chained part of an entry.
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit-2");
/// `audit-details-1`: sequence number -> 32-byte nonce || JSON of the entry's details.
pub const AUDIT_DETAILS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit-details-1");

/// Creates the audit log's tables (called by [`crate::schema`] when the store opens).
pub(crate) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(AUDIT)?;
    txn.open_table(AUDIT_DETAILS)?;
    Ok(())
}

impl crate::registry::Hub {
    /// The hub's audit log.
    pub fn audit(&self) -> AuditLog<'_> {
        AuditLog::new(self.store(), self.dir())
    }
}
/// `audit-1`: the unkeyed log of a hub made before `keys/audit.key`; read once by `upgrade`.
pub const AUDIT_V1: TableDefinition<u64, &[u8]> = TableDefinition::new("audit-1");

/// Domain separation of the unkeyed entry hashes of `audit-1`.
const LEGACY_HASH_CONTEXT: &str = "kipass hub audit entry v1";
/// The chain's link key, derived from `keys/audit.key`.
const CHAIN_CONTEXT: &str = "kipass hub audit chain v2";
/// The details' commitment key.
const DETAILS_CONTEXT: &str = "kipass hub audit details v2";
/// The head file's MAC key.
const HEAD_CONTEXT: &str = "kipass hub audit head v2";
/// The first word of a keyed head file.
const HEAD_MAGIC: &str = "kipass-audit-head-2";
/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// What listings show in place of details that expired.
pub const EXPIRED: &str = "(expired)";

/// Who did it, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// Credential id or `local-operator`.
    pub id: String,
    /// The credential holder's name.
    pub name: String,
    /// The role.
    pub role: String,
    /// An officer's region.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub region: Option<String>,
}

impl From<&Principal> for Actor {
    fn from(p: &Principal) -> Self {
        Actor {
            id: p.id.clone(),
            name: p.name.clone(),
            role: p.role.as_str().to_owned(),
            region: p.region.clone(),
        }
    }
}

/// What is appended: everything but the chain fields. Its action and region stay in the chain;
/// the rest are its details, which expire ([`AuditLog::expire_details`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// What was done: `trace`, `facility.approve`, `credential.add`, ...
    pub action: String,
    /// The case id (traces).
    pub case_id: Option<String>,
    /// Why (traces).
    pub purpose: Option<String>,
    /// The region acted in, when there is one.
    pub region: Option<String>,
    /// The facilities it touched.
    pub facilities: Vec<String>,
    /// Anything else worth keeping (never a token or a name from a paper entry).
    pub detail: serde_json::Value,
}

impl Event {
    /// An event with no case, region or facilities.
    pub fn new(action: &str, detail: serde_json::Value) -> Self {
        Event {
            action: action.to_owned(),
            case_id: None,
            purpose: None,
            region: None,
            facilities: Vec::new(),
            detail,
        }
    }

    /// With the facilities touched.
    pub fn facilities(mut self, ids: impl IntoIterator<Item = impl ToString>) -> Self {
        self.facilities = ids.into_iter().map(|i| i.to_string()).collect();
        self
    }

    /// With the region acted in.
    pub fn region(mut self, region: Option<&str>) -> Self {
        self.region = region.map(str::to_owned);
        self
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One audit entry as listed: the chain's part joined with its details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// When, Unix seconds.
    pub at: UnixSeconds,
    /// Who.
    pub actor: Actor,
    /// What. When the details have expired, only the action and region are left, and
    /// `detail` says [`EXPIRED`].
    #[serde(flatten)]
    pub event: Event,
    /// The previous entry's hash (hex); [`GENESIS`] for the first.
    pub prev: String,
    /// This entry's link: keyed BLAKE3 over `prev` and the chained fields (hex).
    pub hash: String,
    /// The details were deleted by retention (older than 28 days).
    #[serde(default, skip_serializing_if = "is_false")]
    pub details_expired: bool,
}

/// An entry's chained part, as `audit-2` stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Link {
    seq: u64,
    at: UnixSeconds,
    actor: Actor,
    action: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    region: Option<String>,
    /// The keyed commitment to the details row (hex).
    details: String,
    prev: String,
    hash: String,
}

/// What a link's hash covers after `prev`: every field but `prev` and `hash`, in this order.
#[derive(Serialize)]
struct LinkBody<'a> {
    seq: u64,
    at: UnixSeconds,
    actor: &'a Actor,
    action: &'a str,
    region: &'a Option<String>,
    details: &'a str,
}

/// The details of an entry, as `audit-details-1` stores them after the nonce.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Details {
    case_id: Option<String>,
    purpose: Option<String>,
    facilities: Vec<String>,
    detail: serde_json::Value,
}

/// The keys of one use each, derived from `keys/audit.key`.
struct ChainKeys {
    chain: [u8; 32],
    details: [u8; 32],
    head: [u8; 32],
}

impl ChainKeys {
    fn of(key: &MacKey) -> Self {
        ChainKeys {
            chain: key.derive(CHAIN_CONTEXT),
            details: key.derive(DETAILS_CONTEXT),
            head: key.derive(HEAD_CONTEXT),
        }
    }

    /// The hash link `l` should have: `keyed_hash(chain key, prev || JSON of the body)`.
    fn link(&self, l: &Link) -> String {
        let body = LinkBody {
            seq: l.seq,
            at: l.at,
            actor: &l.actor,
            action: &l.action,
            region: &l.region,
            details: &l.details,
        };
        // A plain data type always serialises.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut h = blake3::Hasher::new_keyed(&self.chain);
        h.update(l.prev.as_bytes());
        h.update(&bytes);
        h.finalize().to_hex().to_string()
    }

    /// The commitment to a details row (nonce and JSON, as stored).
    fn commit(&self, row: &[u8]) -> String {
        blake3::keyed_hash(&self.details, row).to_hex().to_string()
    }

    fn head_mac(&self, h: &Head) -> String {
        let text = format!("{} {} {}", h.count, h.hash, h.expired_before);
        blake3::keyed_hash(&self.head, text.as_bytes())
            .to_hex()
            .to_string()
    }
}

impl Drop for ChainKeys {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.chain);
        zeroize::Zeroize::zeroize(&mut self.details);
        zeroize::Zeroize::zeroize(&mut self.head);
    }
}

/// What `keys/audit.head` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    /// Entries in the chain when it was written.
    count: u64,
    /// The hash of entry `count - 1` ([`GENESIS`] for none).
    hash: String,
    /// Details of entries before this time may have expired; later ones must be there.
    expired_before: UnixSeconds,
}

/// The head file as found.
#[derive(Debug)]
enum HeadFile {
    Absent,
    /// Written by this hub: its MAC holds.
    Keyed(Head),
    /// `<count> <hash>` of the unkeyed log.
    Legacy {
        count: u64,
        hash: String,
    },
    /// Keyed format whose MAC does not hold.
    Forged,
    /// Neither format.
    Damaged,
}

/// An audit operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store failed.
    #[error("audit log: {0}")]
    Store(#[from] StoreError),
    /// The head file could not be written or read.
    #[error("audit head file {path}: {reason}")]
    Head {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for AuditError {
            fn from(e: $t) -> Self {
                AuditError::Store(StoreError::Db(e.into()))
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

/// The audit log of one hub data folder.
pub struct AuditLog<'s> {
    store: &'s Store,
    head: PathBuf,
}

/// What [`AuditLog::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// Entries checked.
    pub entries: u64,
    /// Whether the whole chain holds.
    pub ok: bool,
    /// The first entry that breaks the chain, if any.
    pub broken_at: Option<u64>,
    /// Why, in words.
    pub problems: Vec<String>,
}

type Rows<'t> = redb::Table<'t, u64, &'static [u8]>;

fn head_path(data: &Path) -> PathBuf {
    data.join("keys").join("audit.head")
}

/// Whether data folder `data` has a keyed head file (its log was keyed with `keys/audit.key`).
pub(crate) fn head_is_keyed(data: &Path) -> bool {
    std::fs::read_to_string(head_path(data))
        .is_ok_and(|t| t.split_whitespace().next() == Some(HEAD_MAGIC))
}

/// Appends one entry at `seq` after the entry whose hash is `prev` into the open tables;
/// returns it as listed.
fn push(
    keys: &ChainKeys,
    t: &mut Rows<'_>,
    d: &mut Rows<'_>,
    (seq, prev): (u64, String),
    at: UnixSeconds,
    actor: Actor,
    event: Event,
) -> Result<AuditEntry, AuditError> {
    let details = Details {
        case_id: event.case_id.clone(),
        purpose: event.purpose.clone(),
        facilities: event.facilities.clone(),
        detail: event.detail.clone(),
    };
    let mut row = vec![0u8; 32];
    OsRng.fill_bytes(&mut row);
    // A plain data type always serialises.
    row.extend(serde_json::to_vec(&details).unwrap_or_default());
    let mut link = Link {
        seq,
        at,
        actor,
        action: event.action.clone(),
        region: event.region.clone(),
        details: keys.commit(&row),
        prev,
        hash: String::new(),
    };
    link.hash = keys.link(&link);
    t.insert(seq, encode(&link).as_slice())?;
    d.insert(seq, row.as_slice())?;
    Ok(AuditEntry {
        seq,
        at,
        actor: link.actor,
        event,
        prev: link.prev,
        hash: link.hash,
        details_expired: false,
    })
}

impl<'s> AuditLog<'s> {
    /// The audit log of the hub whose store is `store` and data folder is `data`.
    pub fn new(store: &'s Store, data: &Path) -> Self {
        AuditLog {
            store,
            head: head_path(data),
        }
    }

    fn keys(&self) -> ChainKeys {
        ChainKeys::of(self.store.audit_key())
    }

    /// Appends an event done by `who` at `at`; returns the entry. Durable before it returns.
    pub fn append(
        &self,
        who: &Principal,
        event: Event,
        at: UnixSeconds,
    ) -> Result<AuditEntry, AuditError> {
        let keys = self.keys();
        let head = self.read_head(&keys)?;
        let txn = self.store.db().begin_write()?;
        let (entry, carry) = {
            let mut t = txn.open_table(AUDIT)?;
            let mut d = txn.open_table(AUDIT_DETAILS)?;
            let last = t.last()?.map(|(k, v)| (k.value(), v.value().to_vec()));
            let (seq, prev) = match last {
                Some((k, v)) => (k + 1, decode_link(k, &v)?.hash),
                None => (0, GENESIS.to_owned()),
            };
            let carry = head_carries(&head, &t, seq)?;
            let entry = push(
                &keys,
                &mut t,
                &mut d,
                (seq, prev),
                at,
                Actor::from(who),
                event,
            )?;
            (entry, carry)
        };
        txn.commit()?;
        match carry {
            Some(expired_before) => self.write_head(
                &keys,
                &Head {
                    count: entry.seq + 1,
                    hash: entry.hash.clone(),
                    expired_before,
                },
            )?,
            // Rewriting it would hide what it shows: leave it for `audit --verify`.
            None => tracing::warn!(
                "audit head file {} does not match the log; left as it is: run `sync-hub audit --verify`",
                self.head.display()
            ),
        }
        Ok(entry)
    }

    /// Deletes the details (case id, purpose, facilities, detail) of every entry older than
    /// the retention horizon of `as_of` (`horizon(as_of)`, 28 days back); the chain keeps their
    /// commitments and still verifies. Returns how many entries lost their details. Part of
    /// retention: called wherever the ledger is purged.
    pub fn expire_details(&self, as_of: UnixSeconds) -> Result<u64, AuditError> {
        let horizon = shared::time::horizon(as_of).start();
        let keys = self.keys();
        let head = self.read_head(&keys)?;
        let txn = self.store.db().begin_write()?;
        let (expired, keep) = {
            let t = txn.open_table(AUDIT)?;
            let mut d = txn.open_table(AUDIT_DETAILS)?;
            let mut old = Vec::new();
            for row in d.iter()? {
                let seq = row?.0.value();
                let at = match t.get(seq)? {
                    Some(v) => serde_json::from_slice::<Link>(v.value()).ok().map(|l| l.at),
                    None => None,
                };
                // Details of an unreadable or missing entry are left for `--verify` to name.
                if at.is_some_and(|at| at < horizon) {
                    old.push(seq);
                }
            }
            for seq in &old {
                d.remove(*seq)?;
            }
            let count = t.last()?.map_or(0, |(k, _)| k.value() + 1);
            let keep = match (&head, head_carries(&head, &t, count)?) {
                (HeadFile::Keyed(h), Some(_)) if h.expired_before < horizon => Some(Head {
                    expired_before: horizon,
                    ..h.clone()
                }),
                _ => None,
            };
            (old.len() as u64, keep)
        };
        txn.commit()?;
        if let Some(h) = keep {
            self.write_head(&keys, &h)?;
        }
        Ok(expired)
    }

    fn write_head(&self, keys: &ChainKeys, h: &Head) -> Result<(), AuditError> {
        let err = |reason: String| AuditError::Head {
            path: self.head.display().to_string(),
            reason,
        };
        let text = format!(
            "{HEAD_MAGIC} {} {} {} {}\n",
            h.count,
            h.hash,
            h.expired_before,
            keys.head_mac(h)
        );
        let tmp = self.head.with_extension("head.tmp");
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(|e| err(e.to_string()))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| err(e.to_string()))?;
        f.sync_all().map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &self.head).map_err(|e| err(e.to_string()))
    }

    fn read_head(&self, keys: &ChainKeys) -> Result<HeadFile, AuditError> {
        let text = match std::fs::read_to_string(&self.head) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HeadFile::Absent),
            Err(e) => {
                return Err(AuditError::Head {
                    path: self.head.display().to_string(),
                    reason: e.to_string(),
                });
            }
        };
        let parts: Vec<&str> = text.split_whitespace().collect();
        Ok(match parts.as_slice() {
            [HEAD_MAGIC, count, hash, expired_before, mac] => {
                match (count.parse(), expired_before.parse()) {
                    (Ok(count), Ok(expired_before)) => {
                        let h = Head {
                            count,
                            hash: (*hash).to_owned(),
                            expired_before,
                        };
                        let want = keys.head_mac(&h);
                        // Constant-time comparison of the MACs.
                        match blake3::Hash::from_hex(mac) {
                            Ok(m) if blake3::Hash::from_hex(&want).is_ok_and(|w| w == m) => {
                                HeadFile::Keyed(h)
                            }
                            _ => HeadFile::Forged,
                        }
                    }
                    _ => HeadFile::Damaged,
                }
            }
            [count, hash] => match count.parse() {
                Ok(count) => HeadFile::Legacy {
                    count,
                    hash: (*hash).to_owned(),
                },
                Err(_) => HeadFile::Damaged,
            },
            _ => HeadFile::Damaged,
        })
    }

    /// The last `limit` entries (all if `None`), oldest first, with their details where they
    /// have not expired.
    pub fn entries(&self, limit: Option<usize>) -> Result<Vec<AuditEntry>, AuditError> {
        let txn = self.store.db().begin_read()?;
        let t = txn.open_table(AUDIT)?;
        let d = txn.open_table(AUDIT_DETAILS)?;
        let mut out = Vec::new();
        for row in t.iter()?.rev() {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            let (k, v) = row?;
            let seq = k.value();
            let link = decode_link(seq, v.value())?;
            let details = match d.get(seq)? {
                Some(row) => Some(decode_details(seq, row.value())?),
                None => None,
            };
            out.push(listed(link, details));
        }
        out.reverse();
        Ok(out)
    }

    /// Walks the whole chain: each entry's key and sequence agree, its `prev` is the hash of
    /// the one before, its `hash` is its keyed link, its details (where still present) match
    /// their commitment and are present where they should not have expired yet; and the chain
    /// holds the head file's entry at the head's count. Names the first entry that fails.
    pub fn verify(&self) -> Result<Verification, AuditError> {
        let keys = self.keys();
        let head = self.read_head(&keys)?;
        let txn = self.store.db().begin_read()?;
        let t = txn.open_table(AUDIT)?;
        let d = txn.open_table(AUDIT_DETAILS)?;
        let mut problems = Vec::new();
        let mut broken_at: Option<u64> = None;
        let mut fail = |seq: u64, why: String, problems: &mut Vec<String>| {
            broken_at.get_or_insert(seq);
            problems.push(format!("entry {seq}: {why}"));
        };
        let (head_count, expired_before) = match &head {
            HeadFile::Keyed(h) => (Some(h.count), Some(h.expired_before)),
            _ => (None, None),
        };
        let mut expected_seq = 0u64;
        let mut prev = GENESIS.to_owned();
        let mut count = 0u64;
        let mut hash_at_head: Option<String> = None;
        for row in t.iter()? {
            let (k, v) = row?;
            let key = k.value();
            count += 1;
            if key != expected_seq {
                fail(
                    expected_seq,
                    format!("missing: the next stored entry is {key} (entries were removed)"),
                    &mut problems,
                );
            }
            match serde_json::from_slice::<Link>(v.value()) {
                Ok(l) => {
                    if l.seq != key {
                        fail(
                            key,
                            format!("says it is entry {} (moved or edited)", l.seq),
                            &mut problems,
                        );
                    }
                    if l.prev != prev {
                        fail(
                            key,
                            "does not follow the entry before it (its prev hash differs: an \
                             entry before it was edited, removed or inserted)"
                                .into(),
                            &mut problems,
                        );
                    }
                    if keys.link(&l) != l.hash {
                        fail(
                            key,
                            "its content does not match its hash (it was edited, or written \
                             without the hub's audit key)"
                                .into(),
                            &mut problems,
                        );
                    }
                    match d.get(key)? {
                        Some(row) if keys.commit(row.value()) != l.details => fail(
                            key,
                            "its details do not match the chain's commitment to them (they \
                             were edited)"
                                .into(),
                            &mut problems,
                        ),
                        Some(_) => {}
                        None if expired_before.is_some_and(|e| l.at >= e) => fail(
                            key,
                            "its details are gone before retention expired them (they were \
                             deleted)"
                                .into(),
                            &mut problems,
                        ),
                        None => {}
                    }
                    prev = l.hash;
                }
                Err(err) => {
                    fail(
                        key,
                        format!("does not parse ({err}): it was edited"),
                        &mut problems,
                    );
                    prev = String::new();
                }
            }
            if head_count == Some(key.saturating_add(1)) {
                hash_at_head = Some(prev.clone());
            }
            expected_seq = key.saturating_add(1);
        }
        if t.len()? != count {
            problems.push("the table's length disagrees with its rows".into());
        }
        for row in d.iter()? {
            let seq = row?.0.value();
            if t.get(seq)?.is_none() {
                problems.push(format!(
                    "details row {seq} belongs to no entry (it was written into the database)"
                ));
            }
        }
        match txn.open_table(AUDIT_V1) {
            Ok(old) if !old.is_empty()? => problems.push(format!(
                "table audit-1 holds {} unkeyed entries although the log was keyed: they were \
                 written into the database afterwards, and are ignored",
                old.len()?
            )),
            Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let path = self.head.display();
        match head {
            HeadFile::Keyed(h) => {
                if count < h.count {
                    fail(
                        count,
                        format!(
                            "missing: the head file records {} entries, the log holds {count} \
                             (entries were cut off the end)",
                            h.count
                        ),
                        &mut problems,
                    );
                } else if h.count > 0 && hash_at_head.as_deref() != Some(h.hash.as_str()) {
                    fail(
                        h.count - 1,
                        "its hash differs from the head file's (the log was rewritten)".into(),
                        &mut problems,
                    );
                }
                // count > h.count: an append committed but the process stopped before the head
                // file was rewritten. Those entries' links were checked above with the key.
            }
            HeadFile::Absent if count > 0 => problems.push(format!(
                "the head file {path} is missing: cannot tell whether entries were cut off the end"
            )),
            HeadFile::Absent => {}
            HeadFile::Legacy { .. } => problems.push(format!(
                "the head file {path} is in the old unkeyed format although the log is keyed: \
                 it was rewritten without the audit key"
            )),
            HeadFile::Forged => problems.push(format!(
                "the head file {path} was not written with the hub's audit key (its MAC does not \
                 match): it was rewritten"
            )),
            HeadFile::Damaged => problems.push(format!(
                "the head file {path} is damaged (expected `{HEAD_MAGIC} <count> <hash> \
                 <expired-before> <mac>`)"
            )),
        }
        Ok(Verification {
            entries: count,
            ok: problems.is_empty(),
            broken_at,
            problems,
        })
    }
}

/// Whether the head file may be rewritten after an append to a chain of `count` entries, and
/// with which `expired_before`: only when it is missing or agrees with the chain, so that a
/// head showing tampering stays as it is.
fn head_carries(
    head: &HeadFile,
    t: &impl ReadableTable<u64, &'static [u8]>,
    count: u64,
) -> Result<Option<UnixSeconds>, AuditError> {
    Ok(match head {
        HeadFile::Absent => Some(0),
        HeadFile::Keyed(h) if h.count == 0 => Some(h.expired_before),
        HeadFile::Keyed(h) if h.count <= count => {
            let at_head = match t.get(h.count - 1)? {
                Some(v) => serde_json::from_slice::<Link>(v.value()).ok(),
                None => None,
            };
            at_head
                .filter(|l| l.hash == h.hash)
                .map(|_| h.expired_before)
        }
        _ => None,
    })
}

fn listed(link: Link, details: Option<Details>) -> AuditEntry {
    let expired = details.is_none();
    let d = details.unwrap_or(Details {
        case_id: None,
        purpose: None,
        facilities: Vec::new(),
        detail: serde_json::Value::String(EXPIRED.to_owned()),
    });
    AuditEntry {
        seq: link.seq,
        at: link.at,
        actor: link.actor,
        event: Event {
            action: link.action,
            case_id: d.case_id,
            purpose: d.purpose,
            region: link.region,
            facilities: d.facilities,
            detail: d.detail,
        },
        prev: link.prev,
        hash: link.hash,
        details_expired: expired,
    }
}

fn encode(l: &Link) -> Vec<u8> {
    // A plain data type always serialises.
    serde_json::to_vec(l).unwrap_or_default()
}

fn corrupt(table: &'static str, key: u64, reason: String) -> AuditError {
    AuditError::Store(StoreError::Corrupt {
        table,
        key: key.to_string(),
        reason: format!("{reason} (run `sync-hub audit --verify`)"),
    })
}

fn decode_link(key: u64, v: &[u8]) -> Result<Link, AuditError> {
    serde_json::from_slice(v).map_err(|e| corrupt("audit-2", key, e.to_string()))
}

fn decode_details(key: u64, row: &[u8]) -> Result<Details, AuditError> {
    let body = row
        .get(32..)
        .ok_or_else(|| corrupt("audit-details-1", key, "shorter than its nonce".into()))?;
    serde_json::from_slice(body).map_err(|e| corrupt("audit-details-1", key, e.to_string()))
}

/// The hashed part of an `audit-1` entry: every field but `hash`, in a fixed order.
#[derive(Serialize)]
struct LegacyHashed<'a> {
    seq: u64,
    at: UnixSeconds,
    actor: &'a Actor,
    event: &'a Event,
    prev: &'a str,
}

/// The hash an `audit-1` entry should have (BLAKE3 in derive-key mode, no secret).
fn legacy_hash(e: &AuditEntry) -> String {
    let body = LegacyHashed {
        seq: e.seq,
        at: e.at,
        actor: &e.actor,
        event: &e.event,
        prev: &e.prev,
    };
    // A plain data type always serialises.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut h = blake3::Hasher::new_derive_key(LEGACY_HASH_CONTEXT);
    h.update(&bytes);
    h.finalize().to_hex().to_string()
}

/// Verifies an `audit-1` log the old way: the unkeyed chain and the old head file.
fn legacy_problems(
    old: &impl ReadableTable<u64, &'static [u8]>,
    head: &HeadFile,
) -> Result<(u64, Vec<String>), AuditError> {
    let mut problems = Vec::new();
    let mut prev = GENESIS.to_owned();
    let mut count = 0u64;
    for row in old.iter()? {
        let (k, v) = row?;
        let key = k.value();
        if key != count {
            problems.push(format!("entry {count}: missing"));
        }
        count += 1;
        match serde_json::from_slice::<AuditEntry>(v.value()) {
            Ok(e) => {
                if e.seq != key || e.prev != prev || legacy_hash(&e) != e.hash {
                    problems.push(format!("entry {key}: edited, moved or out of the chain"));
                }
                prev = e.hash;
            }
            Err(_) => {
                problems.push(format!("entry {key}: does not parse (not moved)"));
                prev = String::new();
            }
        }
    }
    match head {
        HeadFile::Legacy { count: n, hash } => {
            if count < *n {
                problems.push(format!(
                    "the head file recorded {n} entries, the log held {count}"
                ));
            } else if count == *n && *n > 0 && prev != *hash {
                problems.push("the last entry's hash differed from the head file's".into());
            }
        }
        HeadFile::Absent if count > 0 => problems.push("the head file was missing".into()),
        HeadFile::Absent => {}
        _ => problems.push("the head file was not in the old format".into()),
    }
    Ok((count, problems))
}

/// Moves a log made before `keys/audit.key` (`audit-1`, unkeyed) into the keyed layout:
/// verifies it the old way, re-keys every entry that parses, in order, into `audit-2` (with its
/// details in `audit-details-1`), appends an `audit.rekey` entry saying what the old
/// verification found, deletes `audit-1`, and writes the keyed head file. Runs only while
/// `keys/audit.key` is being created ([`Store::open`]): rows written into `audit-1` later are
/// never moved, and `--verify` names them.
pub(crate) fn upgrade(store: &Store, now: UnixSeconds) -> Result<(), AuditError> {
    let log = AuditLog::new(store, store.dir());
    let keys = log.keys();
    let head = log.read_head(&keys)?;
    let txn = store.db().begin_write()?;
    let mut moved = false;
    {
        let old = txn.open_table(AUDIT_V1)?;
        let mut t = txn.open_table(AUDIT)?;
        let mut d = txn.open_table(AUDIT_DETAILS)?;
        let legacy_head = matches!(head, HeadFile::Legacy { .. });
        if (!old.is_empty()? || legacy_head) && t.is_empty()? {
            let (entries, problems) = legacy_problems(&old, &head)?;
            let mut seq = 0u64;
            let mut prev = GENESIS.to_owned();
            for row in old.iter()? {
                let (_, v) = row?;
                if let Ok(e) = serde_json::from_slice::<AuditEntry>(v.value()) {
                    prev = push(&keys, &mut t, &mut d, (seq, prev), e.at, e.actor, e.event)?.hash;
                    seq += 1;
                }
            }
            let event = Event::new(
                "audit.rekey",
                serde_json::json!({
                    "legacy_entries": entries,
                    "legacy_verified": problems.is_empty(),
                    "legacy_problems": problems.iter().take(20).collect::<Vec<_>>(),
                }),
            );
            let who = Actor::from(&Principal::local_operator());
            push(&keys, &mut t, &mut d, (seq, prev), now, who, event)?;
            moved = true;
        } else if !old.is_empty()? {
            tracing::warn!(
                "audit upgrade: audit-1 has entries but audit-2 is not empty; audit-1 left unmoved"
            );
        }
    }
    if moved {
        txn.delete_table(AUDIT_V1)?;
    }
    txn.commit()?;
    // The head of whatever the keyed log holds now (also after a crash between an earlier
    // run's commit and its head write).
    let txn = store.db().begin_read()?;
    let t = txn.open_table(AUDIT)?;
    let last = t.last()?.map(|(k, v)| (k.value(), v.value().to_vec()));
    if let Some((k, v)) = last {
        let expired_before = match &head {
            HeadFile::Keyed(h) => h.expired_before,
            _ => 0,
        };
        log.write_head(
            &keys,
            &Head {
                count: k + 1,
                hash: decode_link(k, &v)?.hash,
                expired_before,
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_in(dir: &Path) -> Store {
        Store::open(&dir.join("hub.redb")).unwrap_or_else(|e| panic!("open: {e}"))
    }

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    fn fill(log: &AuditLog<'_>, ats: &[UnixSeconds]) {
        let who = Principal::local_operator();
        for (i, at) in ats.iter().enumerate() {
            let mut event =
                Event::new("trace", serde_json::json!({ "i": i })).facilities([format!("fac_{i}")]);
            event.case_id = Some(format!("case-{i}"));
            ok(log.append(&who, event, *at));
        }
    }

    /// Rewrites the `audit-2` row `seq` with `edit` applied to its JSON.
    fn edit_link(s: &Store, seq: u64, edit: impl FnOnce(&mut serde_json::Value)) {
        let txn = ok(s.db().begin_write());
        {
            let mut t = ok(txn.open_table(AUDIT));
            let mut v: serde_json::Value = match ok(t.get(seq)) {
                Some(g) => ok(serde_json::from_slice(g.value())),
                None => panic!("no entry {seq}"),
            };
            edit(&mut v);
            ok(t.insert(seq, ok(serde_json::to_vec(&v)).as_slice()));
        }
        ok(txn.commit());
    }

    #[test]
    fn chain_verifies_and_an_edit_is_named_even_when_relinked_without_the_key() {
        let tmp = ok(tempfile::tempdir());
        let s = log_in(tmp.path());
        let log = AuditLog::new(&s, tmp.path());
        fill(&log, &[100, 101, 102, 103, 104]);
        let v = ok(log.verify());
        assert!(v.ok && v.entries == 5, "{v:?}");
        edit_link(&s, 2, |e| e["actor"]["name"] = "someone else".into());
        let v = ok(log.verify());
        assert_eq!((v.ok, v.broken_at), (false, Some(2)), "{v:?}");
        // Re-linking the edited entry under any key but the hub's still fails at it.
        let guess = ChainKeys::of(&MacKey::from_bytes([7; 32]));
        let mut l = listed_link(&s, 2);
        l.hash = guess.link(&l);
        edit_link(&s, 2, |e| e["hash"] = l.hash.clone().into());
        let v = ok(log.verify());
        assert_eq!((v.ok, v.broken_at), (false, Some(2)), "{v:?}");
    }

    fn listed_link(s: &Store, seq: u64) -> Link {
        let txn = ok(s.db().begin_read());
        let t = ok(txn.open_table(AUDIT));
        let g = ok(t.get(seq)).unwrap_or_else(|| panic!("no entry {seq}"));
        ok(decode_link(seq, g.value()))
    }

    #[test]
    fn cutting_the_tail_is_detected_by_the_head_file() {
        let tmp = ok(tempfile::tempdir());
        let s = log_in(tmp.path());
        let log = AuditLog::new(&s, tmp.path());
        fill(&log, &[1, 2, 3]);
        let txn = ok(s.db().begin_write());
        ok(ok(txn.open_table(AUDIT)).remove(2));
        ok(txn.commit());
        let v = ok(log.verify());
        assert_eq!((v.ok, v.broken_at), (false, Some(2)), "{v:?}");
        // A later append leaves the head showing the cut, and the cut stays named.
        fill(&log, &[4]);
        let v = ok(log.verify());
        assert!(!v.ok, "{v:?}");
    }

    #[test]
    fn details_expire_with_retention_and_the_chain_still_verifies() {
        let tmp = ok(tempfile::tempdir());
        let s = log_in(tmp.path());
        let log = AuditLog::new(&s, tmp.path());
        let day = shared::time::DAY_SECONDS;
        let now = 100 * day;
        fill(&log, &[now - 30 * day, now - 29 * day, now - day, now]);
        assert_eq!(ok(log.expire_details(now)), 2);
        assert_eq!(ok(log.expire_details(now)), 0, "idempotent");
        let v = ok(log.verify());
        assert!(v.ok, "{v:?}");
        let listed = ok(log.entries(None));
        let expired: Vec<bool> = listed.iter().map(|e| e.details_expired).collect();
        assert_eq!(expired, [true, true, false, false]);
        assert_eq!(listed[0].event.case_id, None);
        assert!(listed[0].event.facilities.is_empty());
        assert_eq!(listed[0].event.detail, serde_json::json!(EXPIRED));
        assert_eq!(listed[0].event.action, "trace");
        assert_eq!(listed[2].event.case_id.as_deref(), Some("case-2"));
        assert_eq!(listed[3].event.facilities, ["fac_3"]);

        // Deleting recent details before their time, or editing them, is named.
        let txn = ok(s.db().begin_write());
        ok(ok(txn.open_table(AUDIT_DETAILS)).remove(2));
        ok(txn.commit());
        let v = ok(log.verify());
        assert_eq!((v.ok, v.broken_at), (false, Some(2)), "{v:?}");
        let txn = ok(s.db().begin_write());
        {
            let mut d = ok(txn.open_table(AUDIT_DETAILS));
            let mut row = ok(d.get(3)).map(|g| g.value().to_vec()).unwrap_or_default();
            let body = String::from_utf8_lossy(&row[32..]).replace("case-3", "case-9");
            row.truncate(32);
            row.extend(body.as_bytes());
            ok(d.insert(3, row.as_slice()));
        }
        ok(txn.commit());
        let v = ok(log.verify());
        assert!(
            v.problems
                .iter()
                .any(|p| p.starts_with("entry 3: its details")),
            "{v:?}"
        );
    }

    #[test]
    fn a_forged_head_file_is_named_and_not_overwritten() {
        let tmp = ok(tempfile::tempdir());
        let s = log_in(tmp.path());
        let log = AuditLog::new(&s, tmp.path());
        fill(&log, &[1, 2, 3]);
        let head = tmp.path().join("keys").join("audit.head");
        let text = ok(std::fs::read_to_string(&head));
        // Two entries cut off, and the head's count and hash made to match what is left.
        let h1 = listed_link(&s, 0).hash;
        let txn = ok(s.db().begin_write());
        {
            let mut t = ok(txn.open_table(AUDIT));
            ok(t.remove(1));
            ok(t.remove(2));
        }
        ok(txn.commit());
        let h3 = text
            .split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_owned();
        let forged = text.replacen(" 3 ", " 1 ", 1).replace(&h3, &h1);
        ok(std::fs::write(&head, &forged));
        let v = ok(log.verify());
        assert!(
            !v.ok && v.problems.iter().any(|p| p.contains("MAC")),
            "{v:?}"
        );
        fill(&log, &[4]);
        assert_eq!(ok(std::fs::read_to_string(&head)), forged);
    }

    /// Writes an `audit-1` log the way the previous code did, and its head file.
    fn legacy_log(s: &Store, dir: &Path, n: u64, head: bool) {
        let txn = ok(s.db().begin_write());
        let mut prev = GENESIS.to_owned();
        {
            let mut t = ok(txn.open_table(AUDIT_V1));
            for seq in 0..n {
                let mut event = Event::new("trace", serde_json::json!({ "n": seq }));
                event.case_id = Some(format!("old-{seq}"));
                let mut e = AuditEntry {
                    seq,
                    at: 1000 + seq,
                    actor: Actor::from(&Principal::local_operator()),
                    event,
                    prev: prev.clone(),
                    hash: String::new(),
                    details_expired: false,
                };
                e.hash = legacy_hash(&e);
                prev = e.hash.clone();
                ok(t.insert(seq, ok(serde_json::to_vec(&e)).as_slice()));
            }
        }
        ok(txn.commit());
        if head {
            ok(std::fs::write(
                dir.join("keys").join("audit.head"),
                format!("{n} {prev}\n"),
            ));
        }
    }

    #[test]
    fn a_legacy_log_is_rekeyed_once_and_later_legacy_rows_are_ignored() {
        let tmp = ok(tempfile::tempdir());
        let dir = tmp.path();
        {
            let s = log_in(dir);
            legacy_log(&s, dir, 3, true);
        }
        // As a data folder of the previous code: no audit key yet.
        ok(std::fs::remove_file(dir.join("keys").join("audit.key")));
        let s = log_in(dir);
        assert!(dir.join("keys").join("audit.key").exists());
        assert!(head_is_keyed(dir));
        let log = AuditLog::new(&s, dir);
        let v = ok(log.verify());
        assert!(v.ok && v.entries == 4, "{v:?}");
        let listed = ok(log.entries(None));
        assert_eq!(listed[1].event.case_id.as_deref(), Some("old-1"));
        assert_eq!(listed[3].event.action, "audit.rekey");
        assert_eq!(listed[3].event.detail["legacy_verified"], true);
        drop(s);

        // Unkeyed rows written into `audit-1` afterwards are named and never moved.
        let s = log_in(dir);
        legacy_log(&s, dir, 2, false);
        drop(s);
        let s = log_in(dir);
        let v = ok(AuditLog::new(&s, dir).verify());
        assert!(
            v.problems.iter().any(|p| p.contains("audit-1 holds 2")),
            "{v:?}"
        );
        assert_eq!(v.entries, 4, "{v:?}");
        drop(s);

        // A keyed log whose key went missing is refused, not silently re-keyed.
        ok(std::fs::remove_file(dir.join("keys").join("audit.key")));
        assert!(matches!(
            Store::open(&dir.join("hub.redb")),
            Err(StoreError::Keys(crate::keys::KeyError::Missing(_)))
        ));
    }

    #[test]
    fn a_tampered_legacy_log_is_rekeyed_and_says_so() {
        let tmp = ok(tempfile::tempdir());
        let dir = tmp.path();
        {
            let s = log_in(dir);
            legacy_log(&s, dir, 3, true);
            let txn = ok(s.db().begin_write());
            ok(ok(txn.open_table(AUDIT_V1)).remove(2));
            ok(txn.commit());
        }
        ok(std::fs::remove_file(dir.join("keys").join("audit.key")));
        let s = log_in(dir);
        let listed = ok(AuditLog::new(&s, dir).entries(None));
        let rekey = &listed[listed.len() - 1];
        assert_eq!(rekey.event.action, "audit.rekey");
        assert_eq!(rekey.event.detail["legacy_verified"], false, "{rekey:?}");
    }
}
