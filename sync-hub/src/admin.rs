//! Hub set-up and the registry: `init`, issuer keys, facilities, device enrollment.

use crate::audit::Event;
use crate::auth::{Principal, Role};
use crate::gov::Target;
use crate::keys::{KeyDir, KeyError};
use crate::people::{Desk, FacilityView, OpError};
use crate::store::{DeviceRecord, Store, StoreError};
use rand_core::OsRng;
use serde::{Deserialize, Serialize};
use shared::facility::{Facility, FacilityStatus, Registration, RegistrationError};
use shared::ticket::{Credential, EnrollmentTicket, HubContact, TICKET_KIND, TICKET_VERSION};
use shared::time::{Day, UnixSeconds, horizon};
use shared::token::{Keyring, KeyringError};
use shared::{DeviceId, FacilityId};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Addresses written into enrollment tickets.
    pub advertise: Vec<SocketAddr>,
    /// The hub's iroh endpoint id (hex).
    pub endpoint_id: String,
    /// The health authority's age recipient (paper-log entries are sealed to it).
    pub authority_recipient: String,
    /// When the hub was created.
    pub created_at: UnixSeconds,
}

/// An open hub data folder.
pub struct Hub {
    dir: PathBuf,
    store: Store,
    config: HubConfig,
}

fn store_path(dir: &Path) -> PathBuf {
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
    /// Creates a hub in `dir`: keys, store, configuration.
    ///
    /// Without `authority_recipient`, a health-authority key pair is generated and its
    /// identity written to `dir/authority-identity.txt`; it must be moved to the health
    /// authority and deleted from the hub (the hub must not read paper-log identities).
    pub fn init(
        dir: &Path,
        region: &str,
        listen: Option<SocketAddr>,
        advertise: Vec<SocketAddr>,
        authority_recipient: Option<String>,
        now: UnixSeconds,
    ) -> Result<Initialised, HubError> {
        let region = region.trim();
        if region.is_empty() || region.chars().count() > 60 {
            return Err(HubError::Invalid(
                "--region must be 1 to 60 characters".into(),
            ));
        }
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
        let advertise = if advertise.is_empty() {
            if listen.ip().is_unspecified() {
                vec![SocketAddr::from(([127, 0, 0, 1], listen.port()))]
            } else {
                vec![listen]
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

    /// The settings.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The data folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The audit log.
    pub fn audit(&self) -> crate::audit::AuditLog<'_> {
        crate::audit::AuditLog::new(&self.store, &self.dir)
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

    /// Revokes a device: its later syncs are refused.
    pub fn revoke_device(&self, id: &str) -> Result<(), HubError> {
        let did = DeviceId::parse(id).map_err(|e| HubError::Invalid(e.to_string()))?;
        let mut d = self.store.device(&did)?.ok_or_else(|| {
            HubError::Invalid(format!("no device {id}: see `sync-hub device list`"))
        })?;
        // Onto the keyed revocation list first: a row later restored to its old bytes (or this
        // write lost) still leaves the device refused at every sync.
        crate::auth::list_revoked(
            &self.store,
            [(crate::auth::Revoked::Device, d.id.to_string())],
            crate::clock::now(),
        )
        .map_err(|e| HubError::Revocation(e.to_string()))?;
        d.revoked = true;
        self.store.put_device(&d)?;
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
        };
        let ticket = EnrollmentTicket {
            kind: TICKET_KIND.to_owned(),
            version: TICKET_VERSION,
            issued_at: now,
            hub: HubContact {
                endpoint_id: self.config.endpoint_id.clone(),
                addrs: self
                    .config
                    .advertise
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
                region: self.config.region.clone(),
            },
            facility,
            device_id: device.id.clone(),
            device_name: name.to_owned(),
            credential: credential.clone(),
            keyring: self.keyring()?,
            day_keys: self.day_keys(Day::of(now), DAY_KEYS_AHEAD)?,
            authority_recipient: self.config.authority_recipient.clone(),
        };
        self.store.add_device(&device, &credential.digest())?;
        Ok(ticket)
    }

    /// Rewrites the store file so that deleted pages are gone (best effort).
    pub fn compact(mut self) {
        self.store.compact();
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

/// An administrative command, run on an open hub or sent to the running one
/// (`POST /api/admin`, the local operator's route), so every command works whether or not
/// `run` is active. Each runs through [`Desk`] as the given principal, so it is checked and
/// audited like the same act over the people's API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AdminCommand {
    /// `issuers import`: the keyring file's text.
    IssuersImport {
        /// The keyring JSON.
        keyring: String,
    },
    /// `facility add`.
    FacilityAdd {
        /// The registration.
        registration: Registration,
    },
    /// `facility approve`.
    FacilityApprove {
        /// The facility id.
        id: String,
    },
    /// `facility remove`.
    FacilityRemove {
        /// The facility id.
        id: String,
    },
    /// `facility list`.
    FacilityList,
    /// `facility pending`.
    FacilityPending,
    /// `facility duplicates [--remove]`.
    FacilityDuplicates {
        /// Remove all but the earliest registration of each group.
        remove: bool,
    },
    /// `enroll`: answers with the ticket, which the command writes to its file.
    Enroll {
        /// The facility id.
        facility_id: String,
        /// Where the device stands.
        device_name: String,
    },
    /// `device list`.
    DeviceList,
    /// `device revoke`.
    DeviceRevoke {
        /// The device id.
        id: String,
    },
    /// `credential add`: answers with the secret, shown once.
    CredentialAdd {
        /// `operator`, `officer` or `authority`.
        role: Role,
        /// An officer's region.
        region: Option<String>,
        /// Whose it is.
        name: String,
    },
    /// `credential list`.
    CredentialList,
    /// `credential revoke`.
    CredentialRevoke {
        /// The credential id.
        id: String,
    },
    /// `designation add`.
    DesignationAdd {
        /// What becomes mandatory.
        target: Target,
        /// The region (category designations; default the hub's).
        region: Option<String>,
    },
    /// `designation list`.
    DesignationList,
    /// `designation remove`.
    DesignationRemove {
        /// The designation id.
        id: String,
    },
    /// `compliance`.
    Compliance {
        /// The period, hours.
        hours: u64,
    },
    /// `report shared-codes`.
    SharedCodes {
        /// Start, Unix seconds.
        from: Option<UnixSeconds>,
        /// End, Unix seconds.
        to: Option<UnixSeconds>,
    },
    /// `audit`.
    Audit {
        /// The last this many entries.
        limit: Option<usize>,
        /// Verify the chain as well.
        verify: bool,
    },
}

fn facility_json(f: &Facility) -> serde_json::Value {
    serde_json::to_value(FacilityView::from(f)).unwrap_or_default()
}

impl AdminCommand {
    /// Runs the command as `who`; the answer is JSON for the command line to print.
    pub fn execute(self, desk: &Desk<'_>, who: &Principal) -> Result<serde_json::Value, OpError> {
        let hub = desk.hub;
        let now = desk.now;
        let local_only = || -> Result<(), OpError> {
            if who.local {
                Ok(())
            } else {
                Err(crate::auth::AuthError::Forbidden(
                    "only the hub's own operator may do this".into(),
                )
                .into())
            }
        };
        let v = match self {
            AdminCommand::IssuersImport { keyring } => {
                local_only()?;
                let n = hub.import_issuers(&keyring)?;
                hub.audit().append(
                    who,
                    Event::new("issuers.import", serde_json::json!({ "trusted_keys": n })),
                    now,
                )?;
                serde_json::json!({ "trusted_keys": n })
            }
            AdminCommand::FacilityAdd { registration } => {
                let f = desk.add_facility(who, registration)?;
                serde_json::json!({ "facility_id": f.id, "status": f.status.as_str() })
            }
            AdminCommand::FacilityApprove { id } => {
                let f = desk.approve(who, &id)?;
                serde_json::json!({ "facility_id": f.id, "status": f.status.as_str() })
            }
            AdminCommand::FacilityRemove { id } => {
                desk.remove(who, &id, "removed by request")?;
                serde_json::json!({ "facility_id": id, "removed": true })
            }
            AdminCommand::FacilityList => {
                serde_json::Value::Array(desk.facilities(who)?.iter().map(facility_json).collect())
            }
            AdminCommand::FacilityPending => {
                serde_json::Value::Array(desk.pending(who)?.iter().map(facility_json).collect())
            }
            AdminCommand::FacilityDuplicates { remove } => {
                let groups: Vec<serde_json::Value> = desk
                    .duplicates(who)?
                    .iter()
                    .map(|g| serde_json::Value::Array(g.iter().map(facility_json).collect()))
                    .collect();
                let removed: Vec<String> = if remove {
                    desk.remove_duplicates(who)?
                        .iter()
                        .map(|f| f.id.to_string())
                        .collect()
                } else {
                    Vec::new()
                };
                serde_json::json!({ "groups": groups, "removed": removed })
            }
            AdminCommand::Enroll {
                facility_id,
                device_name,
            } => {
                local_only()?;
                let t = hub.enroll(&facility_id, &device_name, now)?;
                hub.audit().append(
                    who,
                    Event::new(
                        "device.enroll",
                        serde_json::json!({ "device": t.device_id, "name": t.device_name }),
                    )
                    .region(Some(&t.facility.registration.region))
                    .facilities([&t.facility.id]),
                    now,
                )?;
                serde_json::from_str(&t.to_json())
                    .map_err(|e| HubError::Invalid(format!("cannot encode the ticket: {e}")))?
            }
            AdminCommand::DeviceList => {
                local_only()?;
                let list: Vec<serde_json::Value> = hub
                    .store()
                    .devices()?
                    .into_iter()
                    .map(|d| {
                        serde_json::json!({"device_id": d.id, "facility_id": d.facility, "name": d.name,
                            "revoked": d.revoked, "endpoint_id": d.endpoint_id, "last_sync": d.last_sync,
                            "clock_offset": d.clock_offset})
                    })
                    .collect();
                serde_json::Value::Array(list)
            }
            AdminCommand::DeviceRevoke { id } => {
                local_only()?;
                hub.revoke_device(&id)?;
                hub.audit().append(
                    who,
                    Event::new("device.revoke", serde_json::json!({ "device": id })),
                    now,
                )?;
                serde_json::json!({ "device_id": id, "revoked": true })
            }
            AdminCommand::CredentialAdd { role, region, name } => {
                let (rec, secret) = desk.credential_add(who, role, region.as_deref(), &name)?;
                serde_json::json!({ "credential_id": rec.id, "role": rec.role, "region": rec.region,
                    "name": rec.name, "secret": secret.0 })
            }
            AdminCommand::CredentialList => serde_json::to_value(
                desk.credentials(who)?
                    .into_iter()
                    .map(|c| {
                        serde_json::json!({"credential_id": c.id, "role": c.role, "region": c.region,
                            "name": c.name, "created_at": c.created_at, "revoked_at": c.revoked_at})
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap_or_default(),
            AdminCommand::CredentialRevoke { id } => {
                let rec = desk.credential_revoke(who, &id)?;
                serde_json::json!({ "credential_id": rec.id, "revoked_at": rec.revoked_at })
            }
            AdminCommand::DesignationAdd { target, region } => {
                serde_json::to_value(desk.designate(who, target, region.as_deref())?)
                    .unwrap_or_default()
            }
            AdminCommand::DesignationList => {
                serde_json::to_value(desk.designations(who)?).unwrap_or_default()
            }
            AdminCommand::DesignationRemove { id } => {
                serde_json::to_value(desk.remove_designation(who, &id)?).unwrap_or_default()
            }
            AdminCommand::Compliance { hours } => {
                serde_json::to_value(desk.compliance(who, hours)?).unwrap_or_default()
            }
            AdminCommand::SharedCodes { from, to } => {
                serde_json::to_value(desk.shared_codes(who, from, to)?).unwrap_or_default()
            }
            AdminCommand::Audit { limit, verify } => {
                let entries = desk.audit_entries(who, limit)?;
                let verification = if verify {
                    Some(desk.audit_verify(who)?)
                } else {
                    None
                };
                serde_json::json!({ "entries": entries, "verification": verification })
            }
        };
        Ok(v)
    }
}
