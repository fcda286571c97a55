//! The hub's redb store handle, the lowest layer: the open database, the keys loaded for it,
//! the settings table `config-1` and the store's errors. It owns no other table: each module
//! owns and creates its own (`registry`, `ledger`, `auth`, `gov`, `audit`), and
//! [`crate::schema`] opens the file and calls each owner (`Store::open`).
//!
//! One database file, `hub.redb`, in the data folder. Every table name carries a layout
//! version (`facilities-1`); `docs/storage.md` documents each key and value. Key material
//! lives apart from it, in `keys/` (see [`crate::keys`]): a copy of `hub.redb` alone reveals
//! no visit, and a write to it alone can neither forge an audit entry nor a credential (both
//! are keyed with secrets from `keys/`, which the store loads when it opens).

use crate::keys::MacKey;
use redb::{Database, Durability, ReadableDatabase, TableDefinition, WriteTransaction};
use serde::{Serialize, de::DeserializeOwned};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long `sync-hub run` waits for the store while another process holds it. redb lets one
/// process open the file at a time, and a short command (`stats`, `facility add`, `enroll`)
/// holds it for a few transactions, well under a second: 10 s rides out any of them, so a
/// supervisor restarting `run` next to a cron'd command does not fail, and a second `run`
/// that holds the store for good is still reported promptly. `SYNC_HUB_LOCK_WAIT_MS`
/// overrides it (tests).
pub const RUN_LOCK_WAIT: Duration = Duration::from_secs(10);

/// `config-1`: setting name -> JSON value.
pub const CONFIG: TableDefinition<&str, &[u8]> = TableDefinition::new("config-1");

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened.
    #[error("cannot open the hub store at {path}: {source}")]
    Open {
        /// The database file.
        path: String,
        /// redb's reason.
        source: redb::DatabaseError,
    },
    /// Another process (usually `sync-hub run`) holds the store.
    #[error(
        "the hub store at {0} is in use by another process (is `sync-hub run` active?); stop it or use its HTTP API"
    )]
    Busy(String),
    /// redb failed during a transaction.
    #[error("hub store error: {0}")]
    Db(#[from] redb::Error),
    /// A stored value did not parse: the store is damaged.
    #[error("damaged entry {key:?} in table {table}: {reason}")]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// The key.
        key: String,
        /// Parse error.
        reason: String,
    },
    /// A key file in `keys/` failed.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// Moving data of an older layout to the keyed one failed.
    #[error("cannot move {what} to the keyed layout: {reason}")]
    Upgrade {
        /// What was being moved.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
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

/// The hub's store.
pub struct Store {
    pub(crate) db: Database,
    dir: PathBuf,
    audit_key: MacKey,
    credential_key: MacKey,
    group: Group,
}

/// Group commit ([`Store::begin_group`]): the thread whose writes are deferred, how many
/// transactions it committed non-durably since, and a test's fault.
#[derive(Default)]
struct Group {
    owner: std::sync::Mutex<Option<std::thread::ThreadId>>,
    pending: std::sync::atomic::AtomicU64,
    /// Durable commits of transactions opened with [`Store::begin_write`] and of groups.
    durable: std::sync::atomic::AtomicU64,
    fail_next: std::sync::atomic::AtomicBool,
    /// Counts the groups begun ([`Store::group_epoch`]).
    epoch: std::sync::atomic::AtomicU64,
}

pub(crate) fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    v: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        table,
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Our own plain data types always serialise.
    serde_json::to_vec(v).unwrap_or_default()
}

impl Store {
    /// The handle over an open database and the keys loaded for it ([`crate::schema`] opens
    /// the file, creates every owner's tables and loads the keys: `Store::open`).
    pub(crate) fn from_parts(
        db: Database,
        dir: PathBuf,
        audit_key: MacKey,
        credential_key: MacKey,
    ) -> Self {
        Store {
            db,
            dir,
            audit_key,
            credential_key,
            group: Group::default(),
        }
    }

    /// The data folder the store file is in (its `keys/` folder is beside the file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of the audit chain (`keys/audit.key`).
    pub fn audit_key(&self) -> &MacKey {
        &self.audit_key
    }

    /// The key of the people's credential digests (`keys/credential.key`).
    pub fn credential_key(&self) -> &MacKey {
        &self.credential_key
    }

    /// The underlying database, to compact it ([`crate::schema`]).
    pub(crate) fn db_mut(&mut self) -> &mut Database {
        &mut self.db
    }

    /// The underlying database, for the modules that own further tables.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Begins a group of writes on this thread (the hub actor's turn): until
    /// [`Store::end_group`], the transactions this thread opens with [`Store::begin_write`]
    /// commit with redb's `Durability::None` (no fsync; visible to every later transaction,
    /// durable only with the next durable commit; after a crash the file is the last durable
    /// commit, whole). Whoever defers writes must hold back every acknowledgement of them
    /// until `end_group` has returned `Ok`. Other threads' writes stay durable.
    pub fn begin_group(&self) {
        if let Ok(mut owner) = self.group.owner.lock() {
            *owner = Some(std::thread::current().id());
        }
        self.group
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Says that what the actor keeps for a turn under [`Store::group_epoch`] (the revocation
    /// list) changed within it: the epoch moves on, so the next read is a fresh one. A
    /// revocation can be written during a turn: admission lists a device whose row says
    /// revoked when the list lacks it (review of group commit).
    pub fn kept_reads_changed(&self) {
        self.group
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Which group this thread's writes are in (a number no other group had), `None` outside
    /// one: what the actor reads once per turn may be kept for the rest of the turn under it.
    pub fn group_epoch(&self) -> Option<u64> {
        self.grouping()
            .then(|| self.group.epoch.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Whether this thread's writes are deferred ([`Store::begin_group`]).
    pub fn grouping(&self) -> bool {
        self.group
            .owner
            .lock()
            .is_ok_and(|o| *o == Some(std::thread::current().id()))
    }

    /// Ends the group of writes: if any transaction was committed in it, one durable commit
    /// (an empty write transaction with `Durability::Immediate`: redb's durable commit writes
    /// the current root, which holds every earlier non-durable commit, and fsyncs it) makes
    /// them all durable. Returns how many transactions that commit covered (`None`: there was
    /// nothing to commit). Later writes are durable again until the next `begin_group`.
    pub fn end_group(&self) -> Result<Option<u64>, StoreError> {
        if let Ok(mut owner) = self.group.owner.lock() {
            *owner = None;
        }
        let pending = self
            .group
            .pending
            .swap(0, std::sync::atomic::Ordering::AcqRel);
        if pending == 0 {
            return Ok(None);
        }
        if self
            .group
            .fail_next
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return Err(StoreError::Db(redb::Error::Io(std::io::Error::other(
                "injected failure of a group commit (test)",
            ))));
        }
        let txn = self.db.begin_write()?;
        txn.commit()?;
        self.group
            .durable
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(pending))
    }

    /// How many durable commits the writes of the sync path made (transactions opened with
    /// [`Store::begin_write`] outside a group, each its own durable commit, and the one commit
    /// of each group that wrote): what group commit saves is the difference to the writes.
    pub fn durable_commits(&self) -> u64 {
        self.group
            .durable
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes the next [`Store::end_group`] that has something to commit fail without
    /// committing (tests of what a failed group commit must not acknowledge).
    #[doc(hidden)]
    pub fn fail_next_group_commit(&self) {
        self.group
            .fail_next
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// A write transaction: durable when committed, unless this thread is in a group of
    /// writes ([`Store::begin_group`]), whose durable commit then covers it.
    pub(crate) fn begin_write(&self) -> Result<WriteTransaction, redb::Error> {
        let mut txn = self.db.begin_write()?;
        if self.grouping() {
            txn.set_durability(Durability::None)?;
            self.group
                .pending
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        } else {
            self.group
                .durable
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(txn)
    }

    /// Reads a JSON setting.
    pub fn config<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CONFIG)?;
        match t.get(key)? {
            Some(v) => Ok(Some(decode("config-1", key, v.value())?)),
            None => Ok(None),
        }
    }

    /// Writes a JSON setting.
    pub fn set_config<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(CONFIG)?
            .insert(key, encode(value).as_slice())?;
        txn.commit()?;
        Ok(())
    }
}
