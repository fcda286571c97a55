//! The registry, the hub's lowest layer above the store: its settings ([`HubConfig`], fixed
//! at `init`), the trusted issuer keys, facilities, devices and their enrollment credentials.
//! It owns the tables `facilities-1`, `devices-1` and `credentials-1` (and the `hub` and
//! `keyring` settings in `config-1`), and imports nothing of the layers above it (ledger,
//! people, shells): see `tests/layers.rs`. Opening and creating a hub (`Hub::open`,
//! `Hub::init`) is in [`crate::schema`], which creates every owner's tables.

use crate::keys::{KeyDir, KeyError};
use crate::store::{Store, StoreError, decode, encode};
use rand_core::OsRng;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shared::facility::{Facility, FacilityStatus, Registration, RegistrationError};
use shared::hub_addr::{self, HubAddr};
use shared::ticket::{Credential, EnrollmentTicket, HubContact, TICKET_KIND, TICKET_VERSION};
use shared::time::{Day, UnixSeconds};
use shared::token::{Keyring, KeyringError};
use shared::{DeviceId, FacilityId};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `facilities-1`: facility id -> JSON [`Facility`].
pub const FACILITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("facilities-1");
/// `devices-1`: device id -> JSON [`DeviceRecord`].
pub const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices-1");
/// `credentials-1`: blake3 digest of an enrollment credential -> device id.
pub const CREDENTIALS: TableDefinition<&[u8; 32], &str> = TableDefinition::new("credentials-1");

/// Creates the registry's tables (called by [`crate::schema`] when the store opens).
pub(crate) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(FACILITIES)?;
    txn.open_table(DEVICES)?;
    txn.open_table(CREDENTIALS)?;
    txn.open_table(TOMBSTONES)?;
    Ok(())
}

/// `tombstones-1`: registry entities removed at this hub or at its peer hub (`f/<facility
/// id>`, `g/<designation id>`) -> when. Kept so that the peer hub's copy of a removed entity
/// never brings it back (`crate::replica`); a few dozen bytes per removal, never purged.
pub const TOMBSTONES: TableDefinition<&str, u64> = TableDefinition::new("tombstones-1");

/// Days of day public keys handed to a device in its ticket and on every sync.
pub const DAY_KEYS_AHEAD: u32 = 42;

/// The default port of the hub's sync endpoint.
pub const DEFAULT_PORT: u16 = 7447;

/// A hub operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The data folder has no hub yet.
    #[error("{0} holds no hub: run `sync-hub --data {0} init --region NAME` first")]
    NotInitialised(String),
    /// `init` on a folder that already holds a hub.
    #[error("{0} already holds a hub; refusing to overwrite its keys")]
    AlreadyInitialised(String),
    /// Creating the data folder failed.
    #[error("cannot create data folder {path}: {source}")]
    DataDir {
        /// The folder.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Key files failed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// An issuer keyring file was refused.
    #[error("issuer keyring: {0}")]
    Keyring(#[from] KeyringError),
    /// A registration was refused.
    #[error(transparent)]
    Registration(#[from] RegistrationError),
    /// No such facility.
    #[error("no facility {0}: see `sync-hub facility list`")]
    UnknownFacility(String),
    /// Enrolling a device for a facility that is not approved.
    #[error(
        "facility {0} is pending approval by a local-government officer; approve it first (`sync-hub facility approve {0}`)"
    )]
    NotApproved(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// The keyed revocation list could not be read or written.
    #[error("revocation list: {0}")]
    Revocation(String),
    /// Writing the ticket file failed.
    #[error("cannot write ticket {path}: {source}")]
    TicketFile {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The hub's settings, fixed at `init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubConfig {
    /// The region (jurisdiction) this hub serves.
    pub region: String,
    /// Where `run` listens for sync (UDP, iroh).
    pub listen: SocketAddr,
    /// Addresses written into enrollment tickets and sent to devices in the refresh when
    /// they change: `IP:PORT` or `NAME:PORT` (stored as strings, so a config of before names
    /// were allowed reads as it is).
    pub advertise: Vec<HubAddr>,
    /// The hub's iroh endpoint id (hex).
    pub endpoint_id: String,
    /// The health authority's age recipient (paper-log entries are sealed to it).
    pub authority_recipient: String,
    /// When the hub was created.
    pub created_at: UnixSeconds,
}

/// An open hub data folder.
pub struct Hub {
    pub(crate) dir: PathBuf,
    pub(crate) store: Store,
    pub(crate) config: HubConfig,
}

pub(crate) fn store_path(dir: &Path) -> PathBuf {
    dir.join("hub.redb")
}

/// What `init` made.
pub struct Initialised {
    /// The open hub.
    pub hub: Hub,
    /// Where the generated health-authority identity was written, if one was generated.
    pub authority_identity_file: Option<PathBuf>,
}

impl Hub {
    /// The settings.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The advertised addresses as tickets and refreshes carry them.
    pub fn advertised(&self) -> Vec<String> {
        self.config
            .advertise
            .iter()
            .map(HubAddr::to_string)
            .collect()
    }

    /// Replaces the addresses advertised to devices (`sync-hub advertise set`): new tickets
    /// carry them, and every enrolled device gets them in its next sync's refresh. 1 to
    /// [`hub_addr::MAX_HUB_ADDRS`], duplicates dropped; the hub keeps listening where it did
    /// (`run --listen` moves that).
    pub fn set_advertise(&mut self, advertise: Vec<HubAddr>) -> Result<(), HubError> {
        let advertise = checked_advertise(advertise)?;
        let config = HubConfig {
            advertise,
            ..self.config.clone()
        };
        self.store.set_config("hub", &config)?;
        self.config = config;
        Ok(())
    }

    /// The data folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key folder.
    pub fn keys(&self) -> KeyDir {
        KeyDir::new(&self.dir)
    }

    /// The trusted issuer keys.
    pub fn keyring(&self) -> Result<Keyring, HubError> {
        Ok(self.store.config("keyring")?.unwrap_or_default())
    }

    /// Trusts the keys of a keyring file (replacing any with the same issuer and key id).
    /// Returns how many keys the hub trusts afterwards.
    pub fn import_issuers(&self, json: &str) -> Result<usize, HubError> {
        let incoming = Keyring::from_json(json)?;
        let mut ring = self.keyring()?;
        for key in incoming.iter() {
            ring.remove(key.issuer_id(), key.key_id());
            ring.insert(key.clone())?;
        }
        let n = ring.len();
        self.store.set_config("keyring", &ring)?;
        Ok(n)
    }

    /// Registers a facility.
    pub fn add_facility(&self, reg: Registration, now: UnixSeconds) -> Result<Facility, HubError> {
        reg.validate()?;
        let f = Facility {
            id: FacilityId::random(&mut OsRng),
            status: reg.initial_status(),
            registration: reg,
            registered_at: now,
        };
        self.store.put_facility(&f)?;
        Ok(f)
    }

    fn facility(&self, id: &str) -> Result<Facility, HubError> {
        let fid = FacilityId::parse(id).map_err(|e| HubError::Invalid(e.to_string()))?;
        self.store
            .facility(&fid)?
            .ok_or_else(|| HubError::UnknownFacility(id.to_owned()))
    }

    /// Approves a pending facility (idempotent).
    pub fn approve_facility(&self, id: &str) -> Result<Facility, HubError> {
        let mut f = self.facility(id)?;
        f.status = FacilityStatus::Approved;
        self.store.put_facility(&f)?;
        Ok(f)
    }

    /// Removes a facility (a duplicate registration, say) and revokes its devices.
    pub fn remove_facility(&self, id: &str) -> Result<(), HubError> {
        let f = self.facility(id)?;
        self.store.remove_facility(&f.id)?;
        Ok(())
    }

    /// Every facility.
    pub fn facilities(&self) -> Result<Vec<Facility>, HubError> {
        Ok(self.store.facilities()?)
    }

    /// Day public keys from `from` for `count` days.
    pub fn day_keys(
        &self,
        from: Day,
        count: u32,
    ) -> Result<Vec<shared::daykey::DayPublicKey>, HubError> {
        Ok(self.keys().ratchet()?.publics(from, count))
    }

    /// Writes an enrollment ticket for one new device of an approved facility.
    pub fn enroll(
        &self,
        facility_id: &str,
        device_name: &str,
        now: UnixSeconds,
    ) -> Result<EnrollmentTicket, HubError> {
        let facility = self.facility(facility_id)?;
        if facility.status != FacilityStatus::Approved {
            return Err(HubError::NotApproved(facility.id.to_string()));
        }
        let name = device_name.trim();
        if name.is_empty() || name.chars().count() > 60 || name.chars().any(char::is_control) {
            return Err(HubError::Invalid(
                "--device-name must be 1 to 60 characters (e.g. \"north gate\")".into(),
            ));
        }
        let credential = Credential::generate(&mut OsRng);
        let device = DeviceRecord {
            id: DeviceId::random(&mut OsRng),
            facility: facility.id.clone(),
            name: name.to_owned(),
            enrolled_at: now,
            endpoint_id: None,
            revoked: false,
            last_sync: None,
            clock_offset: None,
            addrs: Vec::new(),
            revoked_at: None,
        };
        let ticket = EnrollmentTicket {
            kind: TICKET_KIND.to_owned(),
            version: TICKET_VERSION,
            issued_at: now,
            hub: HubContact {
                endpoint_id: self.config.endpoint_id.clone(),
                addrs: self.advertised(),
                region: self.config.region.clone(),
            },
            facility,
            device_id: device.id.clone(),
            device_name: name.to_owned(),
            credential: credential.clone(),
            keyring: self.keyring()?,
            day_keys: self.day_keys(Day::of(now), DAY_KEYS_AHEAD)?,
            authority_recipient: self.config.authority_recipient.clone(),
            // The region's other hub, when paired: the device wraps to both from its first
            // scan and fails over to it.
            peer_hubs: peer(&self.store)?
                .map(|p| p.as_peer_hub(Day::of(now)))
                .into_iter()
                .collect(),
        };
        self.store.add_device(&device, &credential.digest())?;
        Ok(ticket)
    }

    /// Writes a ticket to a new file readable only by its owner.
    pub fn write_ticket(ticket: &EnrollmentTicket, path: &Path) -> Result<(), HubError> {
        let err = |source| HubError::TicketFile {
            path: path.display().to_string(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(err)?;
        std::io::Write::write_all(&mut f, ticket.to_json().as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)
    }
}

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
    /// When it was revoked (here, or at the paired hub, which sends the time with the row):
    /// records it wrote after this are refused at both hubs alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<UnixSeconds>,
}

/// The registry's rows in the store.
impl Store {
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

    /// Removes a facility and revokes its devices; returns whether it existed. Its tombstone
    /// stays, so the peer hub's copy never brings it back.
    pub fn remove_facility(&self, id: &FacilityId) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = txn.open_table(FACILITIES)?.remove(id.as_str())?.is_some();
        {
            let mut t = txn.open_table(TOMBSTONES)?;
            let key = format!("f/{id}");
            if t.get(key.as_str())?.is_none() {
                t.insert(key.as_str(), crate::clock::now())?;
            }
        }
        {
            let mut devices = txn.open_table(DEVICES)?;
            let mut revoke = Vec::new();
            for row in devices.iter()? {
                let (k, v) = row?;
                let mut d: DeviceRecord = decode("devices-1", k.value(), v.value())?;
                if &d.facility == id && !d.revoked {
                    d.revoked = true;
                    d.revoked_at = Some(crate::clock::now());
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
        let txn = self.begin_write()?;
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

    /// Records a tombstone (`f/<id>`, `g/<id>`), keeping the earlier time when there is one
    /// (both hubs removing one thing must end with one tombstone).
    pub fn put_tombstone(&self, key: &str, at: UnixSeconds) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(TOMBSTONES)?;
            let old = t.get(key)?.map(|v| v.value());
            if old.is_none_or(|o| at < o) {
                t.insert(key, at)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every tombstone, by key.
    pub fn tombstones(&self) -> Result<Vec<(String, UnixSeconds)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(TOMBSTONES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_owned(), v.value()));
        }
        Ok(out)
    }

    /// Whether `key` has a tombstone.
    pub fn has_tombstone(&self, key: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(TOMBSTONES)?.get(key)?.is_some())
    }

    /// Every unused enrollment credential: (digest, device).
    pub fn credentials(&self) -> Result<Vec<([u8; 32], DeviceId)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CREDENTIALS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            if let Ok(d) = DeviceId::parse(v.value()) {
                out.push((*k.value(), d));
            }
        }
        Ok(out)
    }

    /// Records an unused enrollment credential of `device` (from the peer hub) unless the
    /// device is bound already; returns whether it was added.
    pub fn put_credential(&self, digest: &[u8; 32], device: &DeviceId) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let added = {
            let devices = txn.open_table(DEVICES)?;
            let bound = match devices.get(device.as_str())? {
                Some(v) => {
                    let d: DeviceRecord = decode("devices-1", device.as_str(), v.value())?;
                    d.endpoint_id.is_some()
                }
                None => false,
            };
            let mut t = txn.open_table(CREDENTIALS)?;
            if bound || t.get(digest)?.is_some() {
                false
            } else {
                t.insert(digest, device.as_str())?;
                true
            }
        };
        txn.commit()?;
        Ok(added)
    }

    /// Burns every credential of `device` (it was bound at the peer hub).
    pub fn burn_credentials(&self, device: &DeviceId) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let mut n = 0;
        {
            let mut t = txn.open_table(CREDENTIALS)?;
            let burn: Vec<[u8; 32]> = t
                .iter()?
                .filter_map(|r| r.ok())
                .filter(|(_, v)| v.value() == device.as_str())
                .map(|(k, _)| *k.value())
                .collect();
            for d in burn {
                t.remove(&d)?;
                n += 1;
            }
        }
        txn.commit()?;
        Ok(n)
    }

    /// Binds a device's endpoint id and burns its credential, atomically: a ticket works once.
    pub fn bind_device(&self, digest: &[u8; 32], device: &DeviceRecord) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        txn.open_table(CREDENTIALS)?.remove(digest)?;
        txn.open_table(DEVICES)?
            .insert(device.id.as_str(), encode(device).as_slice())?;
        txn.commit()?;
        Ok(())
    }
}

/// The settings key of the paired hub (`crate::replica`).
pub const PEER_CONFIG: &str = "peer-hub";

/// The paired hub as this hub remembers it (settings key [`PEER_CONFIG`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConfig {
    /// Its endpoint id (hex): the only endpoint admitted for `Peer::HubLink` sessions.
    pub endpoint_id: String,
    /// Where to dial it.
    pub addrs: Vec<String>,
    /// The region (the same as this hub's).
    pub region: String,
    /// When the pairing was made here.
    pub paired_at: UnixSeconds,
    /// Its day public keys, as it last announced them (handed to devices so they wrap each
    /// session key to both hubs).
    #[serde(default)]
    pub day_keys: Vec<shared::daykey::DayPublicKey>,
    /// When a link exchange with it last completed.
    #[serde(default)]
    pub last_link: Option<UnixSeconds>,
    /// When it last announced new day keys whose days this hub had other keys for (it was
    /// rebuilt: it cannot read the days before).
    #[serde(default)]
    pub rebuilt_at: Option<UnixSeconds>,
    /// The oldest day it holds partitions of, as it last said (a rebuilt hub's is the day it
    /// was made): the hubs compare partitions from the later of the two.
    #[serde(default)]
    pub oldest_day: Option<Day>,
}

impl PeerConfig {
    /// The paired hub as devices learn it (ticket, refresh): its contact and its day keys
    /// from `from` on.
    pub fn as_peer_hub(&self, from: Day) -> shared::ticket::PeerHub {
        shared::ticket::PeerHub {
            contact: HubContact {
                endpoint_id: self.endpoint_id.clone(),
                addrs: self.addrs.clone(),
                region: self.region.clone(),
            },
            day_keys: self
                .day_keys
                .iter()
                .filter(|k| k.day >= from)
                .take(shared::ticket::MAX_PEER_DAY_KEYS)
                .cloned()
                .collect(),
        }
    }
}

/// The paired hub, if any.
pub fn peer(store: &Store) -> Result<Option<PeerConfig>, StoreError> {
    store.config(PEER_CONFIG)
}

/// `--advertise` as the hub stores it: 1 to [`hub_addr::MAX_HUB_ADDRS`] addresses,
/// duplicates dropped (the first kept).
pub(crate) fn checked_advertise(advertise: Vec<HubAddr>) -> Result<Vec<HubAddr>, HubError> {
    let strings: Vec<String> = advertise.iter().map(HubAddr::to_string).collect();
    hub_addr::parse_list(&strings).map_err(|e| HubError::Invalid(format!("--advertise: {e}")))
}
