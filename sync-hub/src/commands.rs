//! The hub's administrative commands and their typed answers: what `sync-hub` runs on an open
//! hub, or sends to the running one (`POST /api/admin`) while `run` holds the store. Each
//! command is one operation of [`crate::people::PERMISSIONS`] and runs through a [`Desk`]
//! method, which checks it; its answer is a typed struct (Serialize + Deserialize), so the
//! command line prints from fields the compiler knows, and the running hub's JSON answer is
//! read back into the same struct.

use crate::audit::{AuditEntry, Verification};
use crate::auth::{Principal, Role};
use crate::gov::{ComplianceRow, Designation, Target};
use crate::people::{Desk, FacilityView, Op, OpError};
use crate::trace::SharedCodeReport;
use serde::{Deserialize, Serialize};
use shared::facility::{Facility, Registration};
use shared::ticket::EnrollmentTicket;
use shared::time::UnixSeconds;
use shared::{DeviceId, FacilityId};

/// An administrative command, run on an open hub or sent to the running one
/// (`POST /api/admin`, the local operator's route), so every command works whether or not
/// `run` is active. Each runs through [`Desk`] as the given principal, so it is checked against
/// the one table of who may do what ([`crate::people::PERMISSIONS`], by [`AdminCommand::op`])
/// and audited like the same act over the people's API. Each answers with a typed
/// [`AdminReply`], which serialises to the JSON the command line prints.
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
    /// `peer add`, `init --peer`: the other hub's pairing file.
    PeerAdd {
        /// The pairing file's contents.
        pairing: crate::replica::PairingFile,
    },
    /// `peer status`.
    PeerStatus,
    /// `peer show`: this hub's pairing file.
    PeerShow,
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

/// `issuers import`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedKeys {
    /// How many issuer keys the hub trusts now.
    pub trusted_keys: usize,
}

/// `facility add` and `facility approve`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilityState {
    /// The facility.
    pub facility_id: FacilityId,
    /// `approved` or `pending`.
    pub status: String,
}

/// `facility remove`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilityRemoved {
    /// The facility.
    pub facility_id: String,
    /// Always true.
    pub removed: bool,
}

/// `facility duplicates`' answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duplicates {
    /// Groups of duplicate registrations, earliest first.
    pub groups: Vec<Vec<FacilityView>>,
    /// Facilities removed (`--remove`).
    pub removed: Vec<String>,
}

/// A device as `device list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Its id.
    pub device_id: DeviceId,
    /// Its facility.
    pub facility_id: FacilityId,
    /// Where it stands.
    pub name: String,
    /// Whether it is revoked.
    pub revoked: bool,
    /// Its iroh endpoint id, once bound.
    pub endpoint_id: Option<String>,
    /// Its last sync.
    pub last_sync: Option<UnixSeconds>,
    /// Its clock's offset at the last sync, seconds.
    pub clock_offset: Option<i64>,
}

/// `device revoke`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRevoked {
    /// The device.
    pub device_id: String,
    /// Always true.
    pub revoked: bool,
}

/// `credential add`'s answer, with the secret (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCredential {
    /// Its id.
    pub credential_id: String,
    /// Its role.
    pub role: Role,
    /// An officer's region.
    pub region: Option<String>,
    /// Whose it is.
    pub name: String,
    /// The secret.
    pub secret: String,
}

/// A credential as `credential list` shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialView {
    /// Its id.
    pub credential_id: String,
    /// Its role.
    pub role: Role,
    /// An officer's region.
    pub region: Option<String>,
    /// Whose it is.
    pub name: String,
    /// When it was made.
    pub created_at: UnixSeconds,
    /// When it was revoked.
    pub revoked_at: Option<UnixSeconds>,
}

/// `credential revoke`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRevoked {
    /// The credential.
    pub credential_id: String,
    /// When it was revoked.
    pub revoked_at: Option<UnixSeconds>,
}

/// `audit`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReply {
    /// The entries, oldest first.
    pub entries: Vec<AuditEntry>,
    /// The chain's verification (`--verify`).
    pub verification: Option<Verification>,
}

/// What a command answers. Serialised untagged: each variant is exactly its struct's JSON,
/// which is what the command line prints with `--json` and `/api/admin` answers.
#[derive(Clone, Serialize)]
#[serde(untagged)]
pub enum AdminReply {
    /// `issuers import`.
    TrustedKeys(TrustedKeys),
    /// `facility add`, `facility approve`.
    Facility(FacilityState),
    /// `facility remove`.
    FacilityRemoved(FacilityRemoved),
    /// `facility list`, `facility pending`.
    Facilities(Vec<FacilityView>),
    /// `facility duplicates`.
    Duplicates(Duplicates),
    /// `enroll`: the ticket, which the command writes to its file.
    Ticket(Box<EnrollmentTicket>),
    /// `device list`.
    Devices(Vec<DeviceView>),
    /// `device revoke`.
    DeviceRevoked(DeviceRevoked),
    /// `peer add`, `peer status`: the paired hub (none: not paired).
    Peer(Option<PeerView>),
    /// `peer show`.
    Pairing(crate::replica::PairingFile),
    /// `credential add`.
    NewCredential(NewCredential),
    /// `credential list`.
    Credentials(Vec<CredentialView>),
    /// `credential revoke`.
    CredentialRevoked(CredentialRevoked),
    /// `designation add`, `designation remove`.
    Designation(Designation),
    /// `designation list`.
    Designations(Vec<Designation>),
    /// `compliance`.
    Compliance(Vec<ComplianceRow>),
    /// `report shared-codes`.
    SharedCodes(SharedCodeReport),
    /// `audit`.
    Audit(AuditReply),
}

/// The paired hub as `peer status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerView {
    /// Its endpoint id.
    pub endpoint_id: String,
    /// Where this hub dials it.
    pub addrs: Vec<String>,
    /// The region.
    pub region: String,
    /// When it was paired here.
    pub paired_at: UnixSeconds,
    /// When the last link exchange with it completed (`null`: never).
    pub last_link: Option<UnixSeconds>,
    /// The last day whose key it announced (`null`: none yet; devices then wrap to this hub
    /// alone).
    pub day_keys_until: Option<shared::time::Day>,
    /// When it announced new keys for days it had keys for (a rebuild).
    pub rebuilt_at: Option<UnixSeconds>,
}

impl From<&crate::replica::PeerConfig> for PeerView {
    fn from(p: &crate::replica::PeerConfig) -> Self {
        PeerView {
            endpoint_id: p.endpoint_id.clone(),
            addrs: p.addrs.clone(),
            region: p.region.clone(),
            paired_at: p.paired_at,
            last_link: p.last_link,
            day_keys_until: p.day_keys.iter().map(|k| k.day).max(),
            rebuilt_at: p.rebuilt_at,
        }
    }
}

fn views(list: &[Facility]) -> Vec<FacilityView> {
    list.iter().map(FacilityView::from).collect()
}

fn state(f: &Facility) -> FacilityState {
    FacilityState {
        facility_id: f.id.clone(),
        status: f.status.as_str().to_owned(),
    }
}

impl AdminCommand {
    /// The operation of [`crate::people::PERMISSIONS`] this command is.
    pub fn op(&self) -> Op {
        match self {
            AdminCommand::IssuersImport { .. } => Op::IssuersImport,
            AdminCommand::FacilityAdd { .. } => Op::FacilityAdd,
            AdminCommand::FacilityApprove { .. } => Op::Approve,
            AdminCommand::FacilityRemove { .. } => Op::Remove,
            AdminCommand::FacilityList => Op::Facilities,
            AdminCommand::FacilityPending => Op::Pending,
            AdminCommand::FacilityDuplicates { remove: false } => Op::Duplicates,
            AdminCommand::FacilityDuplicates { remove: true } => Op::RemoveDuplicates,
            AdminCommand::Enroll { .. } => Op::Enroll,
            AdminCommand::DeviceList => Op::DeviceList,
            AdminCommand::DeviceRevoke { .. } => Op::DeviceRevoke,
            AdminCommand::PeerAdd { .. } => Op::PeerPair,
            AdminCommand::PeerStatus | AdminCommand::PeerShow => Op::PeerStatus,
            AdminCommand::CredentialAdd { .. } => Op::CredentialAdd,
            AdminCommand::CredentialList => Op::CredentialList,
            AdminCommand::CredentialRevoke { .. } => Op::CredentialRevoke,
            AdminCommand::DesignationAdd { .. } => Op::Designate,
            AdminCommand::DesignationList => Op::Designations,
            AdminCommand::DesignationRemove { .. } => Op::RemoveDesignation,
            AdminCommand::Compliance { .. } => Op::Compliance,
            AdminCommand::SharedCodes { .. } => Op::SharedCodes,
            AdminCommand::Audit { verify: false, .. } => Op::Audit,
            AdminCommand::Audit { verify: true, .. } => Op::AuditVerify,
        }
    }

    /// Runs the command as `who`: checked against the table first ([`AdminCommand::op`]),
    /// then by the [`Desk`] method that does it.
    pub fn execute(self, desk: &Desk<'_>, who: &Principal) -> Result<AdminReply, OpError> {
        crate::people::permit(who, self.op())?;
        Ok(match self {
            AdminCommand::IssuersImport { keyring } => AdminReply::TrustedKeys(TrustedKeys {
                trusted_keys: desk.import_issuers(who, &keyring)?,
            }),
            AdminCommand::FacilityAdd { registration } => {
                AdminReply::Facility(state(&desk.add_facility(who, registration)?))
            }
            AdminCommand::FacilityApprove { id } => {
                AdminReply::Facility(state(&desk.approve(who, &id)?))
            }
            AdminCommand::FacilityRemove { id } => {
                desk.remove(who, &id, "removed by request")?;
                AdminReply::FacilityRemoved(FacilityRemoved {
                    facility_id: id,
                    removed: true,
                })
            }
            AdminCommand::FacilityList => AdminReply::Facilities(views(&desk.facilities(who)?)),
            AdminCommand::FacilityPending => AdminReply::Facilities(views(&desk.pending(who)?)),
            AdminCommand::FacilityDuplicates { remove } => {
                let groups = desk.duplicates(who)?.iter().map(|g| views(g)).collect();
                let removed = if remove {
                    desk.remove_duplicates(who)?
                        .iter()
                        .map(|f| f.id.to_string())
                        .collect()
                } else {
                    Vec::new()
                };
                AdminReply::Duplicates(Duplicates { groups, removed })
            }
            AdminCommand::Enroll {
                facility_id,
                device_name,
            } => AdminReply::Ticket(Box::new(desk.enroll(who, &facility_id, &device_name)?)),
            AdminCommand::DeviceList => AdminReply::Devices(
                desk.devices(who)?
                    .into_iter()
                    .map(|d| DeviceView {
                        device_id: d.id,
                        facility_id: d.facility,
                        name: d.name,
                        revoked: d.revoked,
                        endpoint_id: d.endpoint_id,
                        last_sync: d.last_sync,
                        clock_offset: d.clock_offset,
                    })
                    .collect(),
            ),
            AdminCommand::DeviceRevoke { id } => {
                desk.revoke_device(who, &id)?;
                AdminReply::DeviceRevoked(DeviceRevoked {
                    device_id: id,
                    revoked: true,
                })
            }
            AdminCommand::PeerAdd { pairing } => {
                AdminReply::Peer(Some(PeerView::from(&desk.pair(who, &pairing)?)))
            }
            AdminCommand::PeerStatus => {
                AdminReply::Peer(desk.peer(who)?.as_ref().map(PeerView::from))
            }
            AdminCommand::PeerShow => {
                crate::people::permit(who, Op::PeerStatus)?;
                AdminReply::Pairing(crate::replica::pairing_file(desk.hub))
            }
            AdminCommand::CredentialAdd { role, region, name } => {
                let (rec, secret) = desk.credential_add(who, role, region.as_deref(), &name)?;
                AdminReply::NewCredential(NewCredential {
                    credential_id: rec.id,
                    role: rec.role,
                    region: rec.region,
                    name: rec.name,
                    secret: secret.0,
                })
            }
            AdminCommand::CredentialList => AdminReply::Credentials(
                desk.credentials(who)?
                    .into_iter()
                    .map(|c| CredentialView {
                        credential_id: c.id,
                        role: c.role,
                        region: c.region,
                        name: c.name,
                        created_at: c.created_at,
                        revoked_at: c.revoked_at,
                    })
                    .collect(),
            ),
            AdminCommand::CredentialRevoke { id } => {
                let rec = desk.credential_revoke(who, &id)?;
                AdminReply::CredentialRevoked(CredentialRevoked {
                    credential_id: rec.id,
                    revoked_at: rec.revoked_at,
                })
            }
            AdminCommand::DesignationAdd { target, region } => {
                AdminReply::Designation(desk.designate(who, target, region.as_deref())?)
            }
            AdminCommand::DesignationList => AdminReply::Designations(desk.designations(who)?),
            AdminCommand::DesignationRemove { id } => {
                AdminReply::Designation(desk.remove_designation(who, &id)?)
            }
            AdminCommand::Compliance { hours } => {
                AdminReply::Compliance(desk.compliance(who, hours)?)
            }
            AdminCommand::SharedCodes { from, to } => {
                AdminReply::SharedCodes(desk.shared_codes(who, from, to)?)
            }
            AdminCommand::Audit { limit, verify } => {
                let entries = desk.audit_entries(who, limit)?;
                let verification = if verify {
                    Some(desk.audit_verify(who)?)
                } else {
                    None
                };
                AdminReply::Audit(AuditReply {
                    entries,
                    verification,
                })
            }
        })
    }

    /// Reads the running hub's answer to this command (`POST /api/admin`) back into the
    /// command's typed answer.
    pub fn read_reply(&self, text: &str) -> Result<AdminReply, String> {
        fn de<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
            serde_json::from_str(text).map_err(|e| e.to_string())
        }
        Ok(match self {
            AdminCommand::IssuersImport { .. } => AdminReply::TrustedKeys(de(text)?),
            AdminCommand::FacilityAdd { .. } | AdminCommand::FacilityApprove { .. } => {
                AdminReply::Facility(de(text)?)
            }
            AdminCommand::FacilityRemove { .. } => AdminReply::FacilityRemoved(de(text)?),
            AdminCommand::FacilityList | AdminCommand::FacilityPending => {
                AdminReply::Facilities(de(text)?)
            }
            AdminCommand::FacilityDuplicates { .. } => AdminReply::Duplicates(de(text)?),
            AdminCommand::Enroll { .. } => AdminReply::Ticket(Box::new(
                EnrollmentTicket::parse(text.as_bytes()).map_err(|e| e.to_string())?,
            )),
            AdminCommand::DeviceList => AdminReply::Devices(de(text)?),
            AdminCommand::DeviceRevoke { .. } => AdminReply::DeviceRevoked(de(text)?),
            AdminCommand::PeerAdd { .. } | AdminCommand::PeerStatus => AdminReply::Peer(de(text)?),
            AdminCommand::PeerShow => AdminReply::Pairing(de(text)?),
            AdminCommand::CredentialAdd { .. } => AdminReply::NewCredential(de(text)?),
            AdminCommand::CredentialList => AdminReply::Credentials(de(text)?),
            AdminCommand::CredentialRevoke { .. } => AdminReply::CredentialRevoked(de(text)?),
            AdminCommand::DesignationAdd { .. } | AdminCommand::DesignationRemove { .. } => {
                AdminReply::Designation(de(text)?)
            }
            AdminCommand::DesignationList => AdminReply::Designations(de(text)?),
            AdminCommand::Compliance { .. } => AdminReply::Compliance(de(text)?),
            AdminCommand::SharedCodes { .. } => AdminReply::SharedCodes(de(text)?),
            AdminCommand::Audit { .. } => AdminReply::Audit(de(text)?),
        })
    }
}
