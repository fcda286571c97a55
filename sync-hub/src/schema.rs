//! Opening the hub's store: the one place that opens the database file, creates the tables
//! of every module that owns some (`registry`, `auth`, `gov`, `audit`; the ledger creates its
//! own in `Ledger::open`) and runs their upgrades (`audit::upgrade`, `auth::upgrade`, with
//! the keys they need). It sits above the layers it calls, so none of them imports another
//! layer to create a table (`tests/layers.rs`). It also creates and opens hub data folders
//! ([`Hub::init`], [`Hub::open`]).

use crate::audit::{self, AuditLog, Event};
use crate::auth::{self, Principal};
use crate::clock;
use crate::gov;
use crate::keys::{KeyDir, KeyError, MacKeyFile};
use crate::registry::{self, DEFAULT_PORT, Hub, HubConfig, HubError, Initialised, store_path};
use crate::store::{CONFIG, Store, StoreError};
use redb::Database;
use shared::time::{UnixSeconds, horizon};
use shared::token::Keyring;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
        // Every owner creates its tables, so every reader finds them. The ledger creates its
        // own when it opens (`Ledger::open`), with its layout upgrades.
        let txn = db.begin_write()?;
        txn.open_table(CONFIG)?;
        registry::create_tables(&txn)?;
        auth::create_tables(&txn)?;
        gov::create_tables(&txn)?;
        audit::create_tables(&txn)?;
        txn.commit()?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let keys = KeyDir::new(&dir);
        let (audit_key, audit_staged) = match keys.mac_key(MacKeyFile::Audit)? {
            Some(k) => (k, false),
            None if !keys.has_staged(MacKeyFile::Audit) && audit::head_is_keyed(&dir) => {
                return Err(
                    KeyError::Missing(keys.path().join("audit.key").display().to_string()).into(),
                );
            }
            None => (keys.stage(MacKeyFile::Audit)?, true),
        };
        let (credential_key, credential_staged) = match keys.mac_key(MacKeyFile::Credential)? {
            Some(k) => (k, false),
            None if !keys.has_staged(MacKeyFile::Credential) && auth::has_keyed_rows(&db)? => {
                return Err(KeyError::Missing(
                    keys.path().join("credential.key").display().to_string(),
                )
                .into());
            }
            None => (keys.stage(MacKeyFile::Credential)?, true),
        };
        let store = Store::from_parts(db, dir, audit_key, credential_key);
        // The upgrade's own audit entries are the one reading of the clock in the store: the
        // callers of `open` (every command) have no `now` of their own to hand in.
        let now = clock::now();
        if audit_staged {
            audit::upgrade(&store, now).map_err(|e| StoreError::Upgrade {
                what: "the audit log",
                reason: e.to_string(),
            })?;
            keys.commit_staged(MacKeyFile::Audit)?;
        }
        if credential_staged {
            let moved = auth::upgrade(&store).map_err(|e| StoreError::Upgrade {
                what: "the people's credentials",
                reason: e.to_string(),
            })?;
            if !moved.moved.is_empty() || !moved.damaged.is_empty() {
                // Best effort after the commit: the move is done either way, and the rows
                // say `legacy` themselves.
                let event = Event::new(
                    "credential.rekey",
                    serde_json::json!({ "moved": moved.moved, "not_moved_damaged": moved.damaged }),
                );
                let log = AuditLog::new(&store, store.dir());
                if let Err(e) = log.append(&Principal::local_operator(), event, now) {
                    tracing::warn!("credential upgrade: could not audit it: {e}");
                }
            }
            keys.commit_staged(MacKeyFile::Credential)?;
        }
        Ok(store)
    }
}

impl Hub {
    /// Creates a hub in `dir`: keys, store, configuration.
    ///
    /// Without `authority_recipient`, a health-authority key pair is generated and its
    /// identity written to `dir/authority-identity.txt`; it must be moved to the health
    /// authority and deleted from the hub (the hub must not read paper-log identities).
    pub fn init(
        dir: &Path,
        region: &str,
        listen: Option<SocketAddr>,
        advertise: Vec<shared::hub_addr::HubAddr>,
        authority_recipient: Option<String>,
        now: UnixSeconds,
    ) -> Result<Initialised, HubError> {
        let region = region.trim();
        if region.is_empty() || region.chars().count() > 60 {
            return Err(HubError::Invalid(
                "--region must be 1 to 60 characters".into(),
            ));
        }
        // Checked before anything is created.
        let advertise = if advertise.is_empty() {
            advertise
        } else {
            crate::registry::checked_advertise(advertise)?
        };
        if store_path(dir).exists() || dir.join("keys").exists() {
            return Err(HubError::AlreadyInitialised(dir.display().to_string()));
        }
        std::fs::create_dir_all(dir).map_err(|source| HubError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let (authority_recipient, authority_identity_file) = match authority_recipient {
            Some(r) => {
                r.parse::<age::x25519::Recipient>().map_err(|_| {
                    HubError::Invalid(
                        "--authority-recipient is not an age recipient (age1...)".into(),
                    )
                })?;
                (r, None)
            }
            None => {
                let id = age::x25519::Identity::generate();
                let path = dir.join("authority-identity.txt");
                let text = format!(
                    "# The health authority's age identity. Move this file to the health authority\n# and delete it from the hub: whoever holds it can read paper-log entries.\n{}\n",
                    age::secrecy::ExposeSecret::expose_secret(&id.to_string())
                );
                std::fs::write(&path, text).map_err(|source| HubError::DataDir {
                    path: path.display().to_string(),
                    source,
                })?;
                (id.to_public().to_string(), Some(path))
            }
        };
        let secret = KeyDir::new(dir).create(horizon(now))?;
        let listen = listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)));
        use shared::hub_addr::HubAddr;
        let advertise = if advertise.is_empty() {
            if listen.ip().is_unspecified() {
                vec![HubAddr::Socket(SocketAddr::from((
                    [127, 0, 0, 1],
                    listen.port(),
                )))]
            } else {
                vec![HubAddr::Socket(listen)]
            }
        } else {
            advertise
        };
        let config = HubConfig {
            region: region.to_owned(),
            listen,
            advertise,
            endpoint_id: secret.public().to_string(),
            authority_recipient,
            created_at: now,
        };
        let store = Store::open(&store_path(dir))?;
        store.set_config("hub", &config)?;
        store.set_config("keyring", &Keyring::default())?;
        Ok(Initialised {
            hub: Hub {
                dir: dir.to_owned(),
                store,
                config,
            },
            authority_identity_file,
        })
    }

    /// Opens an existing hub data folder.
    pub fn open(dir: &Path) -> Result<Hub, HubError> {
        let path = store_path(dir);
        if !path.exists() {
            return Err(HubError::NotInitialised(dir.display().to_string()));
        }
        let store = Store::open(&path)?;
        let config: HubConfig = store
            .config("hub")?
            .ok_or_else(|| HubError::NotInitialised(dir.display().to_string()))?;
        Ok(Hub {
            dir: dir.to_owned(),
            store,
            config,
        })
    }

    /// Rewrites the store file so that deleted pages are gone (best effort).
    pub fn compact(mut self) {
        crate::ledger::compact(self.store.db_mut());
    }
}
