//! The hub's redb store: registry, credentials and configuration. It also creates the tables
//! of the modules that own them (`auth`, `gov`, `audit`), so every reader finds them.
//!
//! One database file, `hub.redb`, in the data folder. Every table name carries a layout
//! version (`facilities-1`); `docs/storage.md` documents each key and value. Key material
//! lives apart from it, in `keys/` (see [`crate::keys`]): a copy of `hub.redb` alone reveals
//! no visit, and a write to it alone can neither forge an audit entry nor a credential (both
//! are keyed with secrets from `keys/`, which the store loads when it opens).

use crate::keys::{KeyDir, MacKey, MacKeyFile};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use shared::facility::Facility;
use shared::{DeviceId, FacilityId, UnixSeconds};
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
/// `facilities-1`: facility id -> JSON [`Facility`].
pub const FACILITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("facilities-1");
/// `devices-1`: device id -> JSON [`DeviceRecord`].
pub const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices-1");
/// `credentials-1`: blake3 digest of an enrollment credential -> device id.
pub const CREDENTIALS: TableDefinition<&[u8; 32], &str> = TableDefinition::new("credentials-1");

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

/// A device enrolled at the hub.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRecord {
    /// Its id.
    pub id: DeviceId,
    /// The facility it logs for.
    pub facility: FacilityId,
    /// Where it stands.
    pub name: String,
    /// When its ticket was written.
    pub enrolled_at: UnixSeconds,
    /// Its iroh endpoint id, bound at first sync with the ticket's credential.
    pub endpoint_id: Option<String>,
    /// A revoked device is refused at every sync.
    pub revoked: bool,
    /// The last completed sync session.
    pub last_sync: Option<UnixSeconds>,
    /// The device clock's offset from the hub's at the last sync (device minus hub), seconds.
    pub clock_offset: Option<i64>,
    /// Where the device last connected from (its siblings may reach it there).
    #[serde(default)]
    pub addrs: Vec<String>,
}

/// The hub's store.
pub struct Store {
    db: Database,
    dir: PathBuf,
    audit_key: MacKey,
    credential_key: MacKey,
}

fn decode<T: DeserializeOwned>(table: &'static str, key: &str, v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        table,
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Our own plain data types always serialise.
    serde_json::to_vec(v).unwrap_or_default()
}

impl Store {
    /// Opens (or creates) the store file, and loads the keys of the audit chain and of the
    /// people's credentials from the `keys/` folder beside it.
    ///
    /// A store made before those keys existed is moved to the keyed layout here, once: the
    /// key is staged, the legacy audit chain re-keyed (`audit::upgrade`) and legacy
    /// credential rows wrapped (`auth::upgrade`), then the key is put in place. A key
    /// that is missing although data was keyed with it is an error, never silently replaced.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::Busy(path.display().to_string())
            }
            source => StoreError::Open {
                path: path.display().to_string(),
                source,
            },
        })?;
        let txn = db.begin_write()?;
        txn.open_table(CONFIG)?;
        txn.open_table(FACILITIES)?;
        txn.open_table(DEVICES)?;
        txn.open_table(CREDENTIALS)?;
        txn.open_table(crate::auth::PEOPLE_CREDENTIALS)?;
        txn.open_table(crate::gov::DESIGNATIONS)?;
        txn.open_table(crate::audit::AUDIT)?;
        txn.open_table(crate::audit::AUDIT_DETAILS)?;
        txn.commit()?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let keys = KeyDir::new(&dir);
        let (audit_key, audit_staged) = match keys.mac_key(MacKeyFile::Audit)? {
            Some(k) => (k, false),
            None if !keys.has_staged(MacKeyFile::Audit) && crate::audit::head_is_keyed(&dir) => {
                return Err(crate::keys::KeyError::Missing(
                    keys.path().join("audit.key").display().to_string(),
                )
                .into());
            }
            None => (keys.stage(MacKeyFile::Audit)?, true),
        };
        let (credential_key, credential_staged) = match keys.mac_key(MacKeyFile::Credential)? {
            Some(k) => (k, false),
            None if !keys.has_staged(MacKeyFile::Credential)
                && crate::auth::has_keyed_rows(&db)? =>
            {
                return Err(crate::keys::KeyError::Missing(
                    keys.path().join("credential.key").display().to_string(),
                )
                .into());
            }
            None => (keys.stage(MacKeyFile::Credential)?, true),
        };
        let store = Store {
            db,
            dir,
            audit_key,
            credential_key,
        };
        // The upgrade's own audit entries are the one reading of the clock in the store: the
        // callers of `open` (every command) have no `now` of their own to hand in.
        let now = crate::clock::now();
        if audit_staged {
            crate::audit::upgrade(&store, now).map_err(|e| StoreError::Upgrade {
                what: "the audit log",
                reason: e.to_string(),
            })?;
            keys.commit_staged(MacKeyFile::Audit)?;
        }
        if credential_staged {
            crate::auth::upgrade(&store, now).map_err(|e| StoreError::Upgrade {
                what: "the people's credentials",
                reason: e.to_string(),
            })?;
            keys.commit_staged(MacKeyFile::Credential)?;
        }
        Ok(store)
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

    /// Rewrites the file without free pages (best effort: false if it could not run).
    pub fn compact(&mut self) -> bool {
        crate::ledger::compact(&mut self.db)
    }

    /// The underlying database, for the modules that own further tables.
    pub fn db(&self) -> &Database {
        &self.db
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

    /// Inserts or replaces a facility.
    pub fn put_facility(&self, f: &Facility) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(FACILITIES)?
            .insert(f.id.as_str(), encode(f).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// One facility.
    pub fn facility(&self, id: &FacilityId) -> Result<Option<Facility>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FACILITIES)?;
        match t.get(id.as_str())? {
            Some(v) => Ok(Some(decode("facilities-1", id.as_str(), v.value())?)),
            None => Ok(None),
        }
    }

    /// Every facility, by id.
    pub fn facilities(&self) -> Result<Vec<Facility>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FACILITIES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(decode("facilities-1", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Removes a facility and revokes its devices; returns whether it existed.
    pub fn remove_facility(&self, id: &FacilityId) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(FACILITIES)?.remove(id.as_str())?.is_some();
        {
            let mut devices = txn.open_table(DEVICES)?;
            let mut revoke = Vec::new();
            for row in devices.iter()? {
                let (k, v) = row?;
                let mut d: DeviceRecord = decode("devices-1", k.value(), v.value())?;
                if &d.facility == id && !d.revoked {
                    d.revoked = true;
                    revoke.push(d);
                }
            }
            for d in revoke {
                devices.insert(d.id.as_str(), encode(&d).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(existed)
    }

    /// Records a new device and the digest of its enrollment credential, atomically.
    pub fn add_device(
        &self,
        d: &DeviceRecord,
        credential_digest: &[u8; 32],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(DEVICES)?
            .insert(d.id.as_str(), encode(d).as_slice())?;
        txn.open_table(CREDENTIALS)?
            .insert(credential_digest, d.id.as_str())?;
        txn.commit()?;
        Ok(())
    }

    /// Replaces a device record.
    pub fn put_device(&self, d: &DeviceRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(DEVICES)?
            .insert(d.id.as_str(), encode(d).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// One device.
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(DEVICES)?;
        match t.get(id.as_str())? {
            Some(v) => Ok(Some(decode("devices-1", id.as_str(), v.value())?)),
            None => Ok(None),
        }
    }

    /// Every device, by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(DEVICES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(decode("devices-1", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// The device a credential digest was issued to, if the credential is still unused.
    pub fn credential_device(&self, digest: &[u8; 32]) -> Result<Option<DeviceId>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CREDENTIALS)?;
        match t.get(digest)? {
            Some(v) => Ok(DeviceId::parse(v.value()).ok()),
            None => Ok(None),
        }
    }

    /// Binds a device's endpoint id and burns its credential, atomically: a ticket works once.
    pub fn bind_device(&self, digest: &[u8; 32], device: &DeviceRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(CREDENTIALS)?.remove(digest)?;
        txn.open_table(DEVICES)?
            .insert(device.id.as_str(), encode(device).as_slice())?;
        txn.commit()?;
        Ok(())
    }
}
