//! The audit log: every trace, approval, removal, designation and credential change, who did
//! it, when, for which case and which facilities it touched.
//!
//! Append-only and hash-chained: each entry carries the BLAKE3 hash of the entry before it and
//! its own hash over everything else it holds, so editing, removing or inserting an entry
//! breaks the chain at that entry ([`AuditLog::verify`] names it). The chain lives in `hub.redb`
//! (`audit-1`); its head (entry count and last hash) is also written to `keys/audit.head`, apart
//! from the database, so that cutting entries off the end of the table is detected too unless
//! the key folder is rewritten as well.

use crate::auth::Principal;
use crate::store::{Store, StoreError};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use shared::UnixSeconds;
use std::path::{Path, PathBuf};

/// `audit-1`: sequence number (from 0) -> JSON [`AuditEntry`].
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit-1");

/// Domain separation of entry hashes.
const HASH_CONTEXT: &str = "kipass hub audit entry v1";
/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

/// What is appended: everything but the chain fields.
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

/// One audit entry as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// When, Unix seconds.
    pub at: UnixSeconds,
    /// Who.
    pub actor: Actor,
    /// What.
    #[serde(flatten)]
    pub event: Event,
    /// The previous entry's hash (hex); [`GENESIS`] for the first.
    pub prev: String,
    /// BLAKE3 (keyed by context) over this entry without this field (hex).
    pub hash: String,
}

/// The hashed part of an entry: every field but `hash`, in a fixed order.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    at: UnixSeconds,
    actor: &'a Actor,
    event: &'a Event,
    prev: &'a str,
}

impl AuditEntry {
    /// The hash this entry's content should have.
    pub fn compute_hash(&self) -> String {
        let body = Hashed {
            seq: self.seq,
            at: self.at,
            actor: &self.actor,
            event: &self.event,
            prev: &self.prev,
        };
        // A plain data type always serialises.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut h = blake3::Hasher::new_derive_key(HASH_CONTEXT);
        h.update(&bytes);
        h.finalize().to_hex().to_string()
    }
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

impl<'s> AuditLog<'s> {
    /// The audit log of the hub whose store is `store` and data folder is `data`.
    pub fn new(store: &'s Store, data: &Path) -> Self {
        AuditLog {
            store,
            head: data.join("keys").join("audit.head"),
        }
    }

    /// Appends an event done by `who` at `at`; returns the entry. Durable before it returns.
    pub fn append(
        &self,
        who: &Principal,
        event: Event,
        at: UnixSeconds,
    ) -> Result<AuditEntry, AuditError> {
        let txn = self.store.db().begin_write()?;
        let entry = {
            let mut t = txn.open_table(AUDIT)?;
            let last = t.last()?.map(|(k, v)| (k.value(), v.value().to_vec()));
            let (seq, prev) = match last {
                Some((k, v)) => {
                    let e = decode(k, &v)?;
                    (k + 1, e.hash)
                }
                None => (0, GENESIS.to_owned()),
            };
            let mut entry = AuditEntry {
                seq,
                at,
                actor: Actor::from(who),
                event,
                prev,
                hash: String::new(),
            };
            entry.hash = entry.compute_hash();
            t.insert(seq, encode(&entry).as_slice())?;
            entry
        };
        txn.commit()?;
        self.write_head(entry.seq + 1, &entry.hash)?;
        Ok(entry)
    }

    fn write_head(&self, count: u64, hash: &str) -> Result<(), AuditError> {
        let err = |reason: String| AuditError::Head {
            path: self.head.display().to_string(),
            reason,
        };
        let tmp = self.head.with_extension("head.tmp");
        std::fs::write(&tmp, format!("{count} {hash}\n")).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &self.head).map_err(|e| err(e.to_string()))
    }

    fn read_head(&self) -> Result<Option<(u64, String)>, AuditError> {
        let text = match std::fs::read_to_string(&self.head) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(AuditError::Head {
                    path: self.head.display().to_string(),
                    reason: e.to_string(),
                });
            }
        };
        let mut parts = text.split_whitespace();
        match (parts.next().and_then(|c| c.parse().ok()), parts.next()) {
            (Some(c), Some(h)) => Ok(Some((c, h.to_owned()))),
            _ => Err(AuditError::Head {
                path: self.head.display().to_string(),
                reason: "damaged (expected `<count> <hash>`)".into(),
            }),
        }
    }

    /// The last `limit` entries (all if `None`), oldest first, parsed as far as they parse.
    pub fn entries(&self, limit: Option<usize>) -> Result<Vec<AuditEntry>, AuditError> {
        let txn = self.store.db().begin_read()?;
        let t = txn.open_table(AUDIT)?;
        let mut out = Vec::new();
        for row in t.iter()?.rev() {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            let (k, v) = row?;
            out.push(decode(k.value(), v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// Walks the whole chain: each entry's key and sequence agree, its `prev` is the hash of
    /// the one before, its `hash` is of its own content; and the chain ends where the head
    /// file says. Names the first entry that fails.
    pub fn verify(&self) -> Result<Verification, AuditError> {
        let txn = self.store.db().begin_read()?;
        let t = txn.open_table(AUDIT)?;
        let mut problems = Vec::new();
        let mut broken_at: Option<u64> = None;
        let mut fail = |seq: u64, why: String, problems: &mut Vec<String>| {
            broken_at.get_or_insert(seq);
            problems.push(format!("entry {seq}: {why}"));
        };
        let mut expected_seq = 0u64;
        let mut prev = GENESIS.to_owned();
        let mut count = 0u64;
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
            match serde_json::from_slice::<AuditEntry>(v.value()) {
                Ok(e) => {
                    if e.seq != key {
                        fail(
                            key,
                            format!("says it is entry {} (moved or edited)", e.seq),
                            &mut problems,
                        );
                    }
                    if e.prev != prev {
                        fail(
                            key,
                            "does not follow the entry before it (its prev hash differs: an \
                             entry before it was edited, removed or inserted)"
                                .into(),
                            &mut problems,
                        );
                    }
                    if e.compute_hash() != e.hash {
                        fail(
                            key,
                            "its content does not match its hash (it was edited)".into(),
                            &mut problems,
                        );
                    }
                    prev = e.hash;
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
            expected_seq = key.saturating_add(1);
        }
        if t.len()? != count {
            problems.push("the table's length disagrees with its rows".into());
        }
        match self.read_head()? {
            Some((n, hash)) => {
                if count < n {
                    fail(
                        count,
                        format!(
                            "missing: the head file records {n} entries, the log holds {count} \
                             (entries were cut off the end)"
                        ),
                        &mut problems,
                    );
                } else if count == n && n > 0 && prev != hash {
                    fail(
                        n - 1,
                        "the last entry's hash differs from the head file's".into(),
                        &mut problems,
                    );
                }
                // count > n: an append committed but the process stopped before the head file
                // was rewritten; the chain itself was checked above.
            }
            None if count > 0 => problems.push(format!(
                "the head file {} is missing: cannot tell whether entries were cut off the end",
                self.head.display()
            )),
            None => {}
        }
        Ok(Verification {
            entries: count,
            ok: problems.is_empty(),
            broken_at,
            problems,
        })
    }
}

fn encode(e: &AuditEntry) -> Vec<u8> {
    // A plain data type always serialises.
    serde_json::to_vec(e).unwrap_or_default()
}

fn decode(key: u64, v: &[u8]) -> Result<AuditEntry, AuditError> {
    serde_json::from_slice(v).map_err(|e| {
        AuditError::Store(StoreError::Corrupt {
            table: "audit-1",
            key: key.to_string(),
            reason: format!("{e} (run `sync-hub audit --verify`)"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_in(dir: &Path) -> (Store, PathBuf) {
        std::fs::create_dir_all(dir.join("keys")).unwrap_or_else(|e| panic!("{e}"));
        let s = Store::open(&dir.join("hub.redb")).unwrap_or_else(|e| panic!("open: {e}"));
        (s, dir.to_owned())
    }

    #[test]
    fn chain_verifies_and_an_edit_is_named() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (s, dir) = log_in(tmp.path());
        let log = AuditLog::new(&s, &dir);
        let who = Principal::local_operator();
        for i in 0..5 {
            log.append(
                &who,
                Event::new("test", serde_json::json!({ "i": i })),
                100 + i,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let v = log.verify().unwrap_or_else(|e| panic!("{e}"));
        assert!(v.ok && v.entries == 5, "{v:?}");
        // Edit entry 2's detail in place, keeping its stored hash.
        let mut e = log.entries(None).unwrap_or_default()[2].clone();
        e.event.detail = serde_json::json!({ "i": 99 });
        let txn = s.db().begin_write().unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(AUDIT)
            .unwrap_or_else(|e| panic!("{e}"))
            .insert(2, encode(&e).as_slice())
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
        let v = log.verify().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((v.ok, v.broken_at), (false, Some(2)), "{v:?}");
        // Re-hashing the edited entry moves the break to the next one.
        e.hash = e.compute_hash();
        let txn = s.db().begin_write().unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(AUDIT)
            .unwrap_or_else(|e| panic!("{e}"))
            .insert(2, encode(&e).as_slice())
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
        let v = log.verify().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((v.ok, v.broken_at), (false, Some(3)), "{v:?}");
    }

    #[test]
    fn cutting_the_tail_is_detected_by_the_head_file() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (s, dir) = log_in(tmp.path());
        let log = AuditLog::new(&s, &dir);
        let who = Principal::local_operator();
        for i in 0..3 {
            log.append(&who, Event::new("test", serde_json::Value::Null), i)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let txn = s.db().begin_write().unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(AUDIT)
            .unwrap_or_else(|e| panic!("{e}"))
            .remove(2)
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
        let v = log.verify().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((v.ok, v.broken_at), (false, Some(2)), "{v:?}");
    }
}
