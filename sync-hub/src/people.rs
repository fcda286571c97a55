//! What each person may do at the hub, in one place: every operation the HTTP API, the
//! command line and `/api/admin` offer the hub's people is an [`Op`], and [`PERMISSIONS`] is
//! the one table of who may do it; [`permit`] checks a principal against it. Every entry point
//! goes through it: each [`Desk`] method (the HTTP routes of [`crate::http::ROUTES`] and the
//! commands of [`crate::commands::AdminCommand`] call them). Region scoping (an officer sees
//! and acts on their region only) is applied by the `Desk` methods on top. Audited: traces,
//! approvals, removals, designations, credential and device changes, issuer imports.
//!
//! | operation | operator | officer | authority |
//! |---|---|---|---|
//! | facilities, pending approvals, designations, compliance, dashboard | all regions | own region | - |
//! | approve, remove, remove duplicates, designate | - | own region | - |
//! | trace, shared-code report | - | - | yes |
//! | audit log | all entries | own region's administration | the authority's own entries |
//! | stats, purge at the hub's clock, metrics, audit verification | yes | - | - |
//! | purge ahead of the hub's clock (`purge --as-of`, at most [`MAX_PURGE_AHEAD_SECONDS`]) | local operator only | - | - |
//! | credentials, `/api/admin` | local operator only | - | - |
//!
//! The local operator (`keys/operator.token`, or a command on the hub's machine) may do
//! everything, audited as `local-operator`. Every purge anyone asks for is audited
//! before it destroys anything (`retention.purge`: who, the time asked for, the time enforced;
//! no entry, no purge), and what it destroyed afterwards (`retention.purge.result`); the
//! hourly timer's purges are audited as `retention-timer` when they destroy anything.

use crate::audit::{AuditEntry, AuditError, AuditLog, Event, Verification};
use crate::auth::{self, AuthError, CredentialRecord, Principal, Role};
use crate::gov::{self, ComplianceRow, Designation, GovError, Target};
use crate::ledger::{Ledger, LedgerError, PURGE_CHUNK_ROWS, PurgeJob, PurgeReport};
use crate::registry::{DeviceRecord, Hub, HubError};
use crate::trace::{self, SharedCodeReport, TraceError, TraceQuery, TraceReport};
use serde::{Deserialize, Serialize};
use shared::facility::{Facility, FacilityStatus};
use shared::ticket::EnrollmentTicket;
use shared::time::DAY_SECONDS;
use shared::{DeviceId, UnixSeconds};
use std::time::Duration;

/// How far ahead of the hub's clock the local operator may move retention (`purge --as-of`,
/// the demo's fast-forward): 400 days, a year and a margin. A purge destroys every day key
/// before `as_of - 28 days` for good, so a typo in `--as-of` (an extra digit, milliseconds for
/// seconds) must be refused rather than destroy the region's every visit and every key a
/// device will ever sync with.
pub const MAX_PURGE_AHEAD_SECONDS: u64 = 400 * DAY_SECONDS;
/// A people credential's `as_of` up to this far ahead of the hub's clock is taken as "now"
/// (a script's clock a little ahead of the hub's); further ahead is refused.
pub const PURGE_SKEW_SECONDS: u64 = 300;
/// The principal id the retention timer's purges are audited under.
pub const RETENTION_TIMER: &str = "retention-timer";
/// The audit action written before a purge destroys anything: who, the time asked for and
/// the time (and horizon) enforced.
pub const PURGE_INTENT: &str = "retention.purge";
/// The audit action written after a purge: what it destroyed or why it failed, and the
/// sequence number of its [`PURGE_INTENT`] entry.
pub const PURGE_RESULT: &str = "retention.purge.result";

/// Every operation the hub's people can ask for, whatever the entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Who the credential belongs to (`GET /api/whoami`).
    Whoami,
    /// Facilities and records held (`stats`).
    Stats,
    /// Prometheus metrics.
    Metrics,
    /// Enforce retention (`purge`).
    Purge,
    /// A trace (`trace`).
    Trace,
    /// The shared-code report (`report shared-codes`).
    SharedCodes,
    /// The compliance report (`compliance`).
    Compliance,
    /// The dashboard.
    Dashboard,
    /// List facilities (`facility list`).
    Facilities,
    /// List pending approvals (`facility pending`).
    Pending,
    /// List duplicate registrations (`facility duplicates`).
    Duplicates,
    /// Remove duplicate registrations (`facility duplicates --remove`).
    RemoveDuplicates,
    /// Approve a facility (`facility approve`).
    Approve,
    /// Remove a facility (`facility remove`).
    Remove,
    /// Register a facility (`facility add`).
    FacilityAdd,
    /// List designations (`designation list`).
    Designations,
    /// Designate (`designation add`).
    Designate,
    /// Remove a designation (`designation remove`).
    RemoveDesignation,
    /// Read the audit log (`audit`).
    Audit,
    /// Verify the audit chain (`audit --verify`).
    AuditVerify,
    /// Make a credential (`credential add`).
    CredentialAdd,
    /// List credentials (`credential list`).
    CredentialList,
    /// Revoke a credential (`credential revoke`).
    CredentialRevoke,
    /// Trust issuer keys (`issuers import`).
    IssuersImport,
    /// Write an enrollment ticket (`enroll`).
    Enroll,
    /// List devices (`device list`).
    DeviceList,
    /// Revoke a device (`device revoke`).
    DeviceRevoke,
    /// Pair this hub with the region's other hub (`peer add`, `init --peer`).
    PeerPair,
    /// Show the paired hub (`peer status`).
    PeerStatus,
    /// Send a command (`POST /api/admin`, what commands use while `run` holds the store);
    /// the command is then checked as its own operation as well.
    AdminRoute,
}

/// Who may do an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Anyone with a valid credential.
    Anyone,
    /// These roles (and the local operator, who may do everything).
    Roles(&'static [Role]),
    /// The local operator only (`keys/operator.token`, or a command on the hub's machine).
    LocalOperator,
}

const OPERATOR: &[Role] = &[Role::Operator];
const OFFICER: &[Role] = &[Role::Officer];
const AUTHORITY: &[Role] = &[Role::Authority];
const ADMINISTRATION: &[Role] = &[Role::Operator, Role::Officer];
const ALL_ROLES: &[Role] = &[Role::Operator, Role::Officer, Role::Authority];

/// The one table of who may do what. On top of it, an officer acts on their own region only,
/// the audit entries each role sees are filtered ([`Desk::audit_entries`]), and a purge ahead
/// of the hub's clock is the local operator's ([`purge_as_of`]).
pub const PERMISSIONS: &[(Op, Allowed)] = &[
    (Op::Whoami, Allowed::Anyone),
    (Op::Stats, Allowed::Roles(OPERATOR)),
    (Op::Metrics, Allowed::Roles(OPERATOR)),
    (Op::Purge, Allowed::Roles(OPERATOR)),
    (Op::AuditVerify, Allowed::Roles(OPERATOR)),
    (Op::Trace, Allowed::Roles(AUTHORITY)),
    (Op::SharedCodes, Allowed::Roles(AUTHORITY)),
    (Op::Compliance, Allowed::Roles(ADMINISTRATION)),
    (Op::Dashboard, Allowed::Roles(ADMINISTRATION)),
    (Op::Facilities, Allowed::Roles(ADMINISTRATION)),
    (Op::Pending, Allowed::Roles(ADMINISTRATION)),
    (Op::Duplicates, Allowed::Roles(ADMINISTRATION)),
    (Op::Designations, Allowed::Roles(ADMINISTRATION)),
    (Op::RemoveDuplicates, Allowed::Roles(OFFICER)),
    (Op::Approve, Allowed::Roles(OFFICER)),
    (Op::Remove, Allowed::Roles(OFFICER)),
    (Op::Designate, Allowed::Roles(OFFICER)),
    (Op::RemoveDesignation, Allowed::Roles(OFFICER)),
    (Op::Audit, Allowed::Roles(ALL_ROLES)),
    (Op::FacilityAdd, Allowed::LocalOperator),
    (Op::CredentialAdd, Allowed::LocalOperator),
    (Op::CredentialList, Allowed::LocalOperator),
    (Op::CredentialRevoke, Allowed::LocalOperator),
    (Op::IssuersImport, Allowed::LocalOperator),
    (Op::Enroll, Allowed::LocalOperator),
    (Op::DeviceList, Allowed::LocalOperator),
    (Op::DeviceRevoke, Allowed::LocalOperator),
    (Op::PeerPair, Allowed::LocalOperator),
    (Op::PeerStatus, Allowed::LocalOperator),
    (Op::AdminRoute, Allowed::LocalOperator),
];

impl Op {
    /// Every operation (the tests check each has exactly one row in [`PERMISSIONS`]).
    pub const ALL: &'static [Op] = &[
        Op::Whoami,
        Op::Stats,
        Op::Metrics,
        Op::Purge,
        Op::Trace,
        Op::SharedCodes,
        Op::Compliance,
        Op::Dashboard,
        Op::Facilities,
        Op::Pending,
        Op::Duplicates,
        Op::RemoveDuplicates,
        Op::Approve,
        Op::Remove,
        Op::FacilityAdd,
        Op::Designations,
        Op::Designate,
        Op::RemoveDesignation,
        Op::Audit,
        Op::AuditVerify,
        Op::CredentialAdd,
        Op::CredentialList,
        Op::CredentialRevoke,
        Op::IssuersImport,
        Op::Enroll,
        Op::DeviceList,
        Op::DeviceRevoke,
        Op::PeerPair,
        Op::PeerStatus,
        Op::AdminRoute,
    ];

    /// Who may do it, from [`PERMISSIONS`]; `None` for an operation missing from the table
    /// (which [`permit`] refuses).
    pub fn allowed(self) -> Option<Allowed> {
        PERMISSIONS
            .iter()
            .find(|(op, _)| *op == self)
            .map(|(_, a)| *a)
    }
}

/// Whether `who` may do `op`, by [`PERMISSIONS`]. An operation missing from the table is
/// refused. Every refusal names the operation.
pub fn permit(who: &Principal, op: Op) -> Result<(), AuthError> {
    let refused = |why: String| Err(AuthError::Forbidden(format!("{op:?}: {why}")));
    match op.allowed() {
        Some(Allowed::Anyone) => Ok(()),
        Some(Allowed::Roles(roles)) => match who.require(roles) {
            Ok(()) => Ok(()),
            Err(AuthError::Forbidden(why)) => refused(why),
            Err(e) => Err(e),
        },
        Some(Allowed::LocalOperator) if who.local => Ok(()),
        Some(Allowed::LocalOperator) => {
            refused("only the hub's own operator (on its machine) may do this".into())
        }
        None => refused("not in the hub's table of who may do what".into()),
    }
}

/// An operation was refused or failed; [`OpError::status`] is its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Authentication or authorisation.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
    /// The registry.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// Local-government data.
    #[error(transparent)]
    Gov(#[from] GovError),
    /// The audit log.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A trace.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The ledger.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A purge was refused because its audit entry could not be written first.
    #[error(
        "nothing was purged: the purge's audit entry could not be written first ({0}); free \
         disk space or repair the audit log (`sync-hub audit --verify`) and purge again"
    )]
    Unaudited(AuditError),
}

impl OpError {
    /// The HTTP status this answers with.
    pub fn status(&self) -> u16 {
        match self {
            OpError::Auth(e) => e.status(),
            OpError::Invalid(_) | OpError::Gov(GovError::Invalid(_)) => 400,
            OpError::Hub(
                HubError::Invalid(_)
                | HubError::UnknownFacility(_)
                | HubError::NotApproved(_)
                | HubError::Registration(_)
                | HubError::Keyring(_),
            ) => 400,
            _ => 500,
        }
    }
}

/// The hub, its ledger and its audit log, at one moment, for one request.
pub struct Desk<'a> {
    /// The hub.
    pub hub: &'a Hub,
    /// Its ledger.
    pub ledger: &'a Ledger<'a>,
    /// Now.
    pub now: UnixSeconds,
}

/// A facility as the people's API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FacilityView {
    /// Its id.
    pub facility_id: String,
    /// `approved` or `pending`.
    pub status: String,
    /// Name.
    pub name: String,
    /// Business number, `123-45-67891`, if any.
    pub business_number: Option<String>,
    /// Representative.
    pub representative: String,
    /// Business phone.
    pub phone: String,
    /// Category slug.
    pub category: String,
    /// Region.
    pub region: String,
    /// Address.
    pub address: String,
    /// When registered.
    pub registered_at: UnixSeconds,
}

impl From<&Facility> for FacilityView {
    fn from(f: &Facility) -> Self {
        let r = &f.registration;
        FacilityView {
            facility_id: f.id.to_string(),
            status: f.status.as_str().to_owned(),
            name: r.name.clone(),
            business_number: r.business_number.as_ref().map(|b| b.formatted()),
            representative: r.representative.clone(),
            phone: r.phone.clone(),
            category: r.category.clone(),
            region: r.region.clone(),
            address: r.address.clone(),
            registered_at: f.registered_at,
        }
    }
}

impl<'a> Desk<'a> {
    /// A desk over an open hub and ledger.
    pub fn new(hub: &'a Hub, ledger: &'a Ledger<'a>, now: UnixSeconds) -> Self {
        Desk { hub, ledger, now }
    }

    /// The audit log.
    pub fn audit(&self) -> AuditLog<'a> {
        self.hub.audit()
    }

    fn record(&self, who: &Principal, event: Event) -> Result<AuditEntry, OpError> {
        Ok(self.audit().append(who, event, self.now)?)
    }

    fn facility_for(&self, who: &Principal, id: &str) -> Result<Facility, OpError> {
        let f = gov::facility(self.hub.store(), id)?;
        who.require_region(&f.registration.region)?;
        Ok(f)
    }

    /// Facilities the principal may see.
    pub fn facilities(&self, who: &Principal) -> Result<Vec<Facility>, OpError> {
        permit(who, Op::Facilities)?;
        let scope = who.region_scope();
        Ok(self
            .hub
            .store()
            .facilities()?
            .into_iter()
            .filter(|f| gov::in_region(f, scope))
            .collect())
    }

    /// Pending approvals the principal may see.
    pub fn pending(&self, who: &Principal) -> Result<Vec<Facility>, OpError> {
        permit(who, Op::Pending)?;
        Ok(gov::pending(self.hub.store(), who.region_scope())?)
    }

    /// Approves a pending facility (an officer of its region).
    pub fn approve(&self, who: &Principal, id: &str) -> Result<Facility, OpError> {
        permit(who, Op::Approve)?;
        let f = self.facility_for(who, id)?;
        let before = f.status;
        let f = self.hub.approve_facility(id)?;
        self.record(
            who,
            Event::new(
                "facility.approve",
                serde_json::json!({ "was": before.as_str(), "name": f.registration.name }),
            )
            .region(Some(&f.registration.region))
            .facilities([&f.id]),
        )?;
        Ok(f)
    }

    /// Removes a facility and revokes its devices (an officer of its region).
    pub fn remove(&self, who: &Principal, id: &str, reason: &str) -> Result<Facility, OpError> {
        permit(who, Op::Remove)?;
        let f = self.facility_for(who, id)?;
        // Its devices go into the keyed revocation list first, so that restoring their rows
        // (or the facility's) in `hub.redb` does not re-admit them.
        let devices: Vec<(auth::Revoked, String)> = self
            .hub
            .store()
            .devices()?
            .into_iter()
            .filter(|d| d.facility == f.id)
            .map(|d| (auth::Revoked::Device, d.id.to_string()))
            .collect();
        auth::list_revoked(self.hub.store(), devices, self.now)?;
        self.hub.remove_facility(id)?;
        self.record(
            who,
            Event::new(
                "facility.remove",
                serde_json::json!({ "reason": reason, "name": f.registration.name,
                    "business_number": f.registration.business_number.as_ref().map(|b| b.formatted()),
                    "address": f.registration.address }),
            )
            .region(Some(&f.registration.region))
            .facilities([&f.id]),
        )?;
        Ok(f)
    }

    /// Groups of duplicate registrations the principal may see.
    pub fn duplicates(&self, who: &Principal) -> Result<Vec<Vec<Facility>>, OpError> {
        permit(who, Op::Duplicates)?;
        Ok(gov::duplicates(self.hub.store(), who.region_scope())?)
    }

    /// Removes every duplicate registration but the earliest of each group; returns the
    /// removed facilities.
    pub fn remove_duplicates(&self, who: &Principal) -> Result<Vec<Facility>, OpError> {
        permit(who, Op::RemoveDuplicates)?;
        let mut removed = Vec::new();
        for group in gov::duplicates(self.hub.store(), who.region_scope())? {
            let kept = group[0].id.to_string();
            for f in group.iter().skip(1) {
                removed.push(self.remove(who, f.id.as_str(), &format!("duplicate of {kept}"))?);
            }
        }
        Ok(removed)
    }

    /// Designates a category, a facility or a one-off event as mandatory. An officer's
    /// designation applies in their region; the local operator's in `region` (default: the
    /// facility's, or the hub's).
    pub fn designate(
        &self,
        who: &Principal,
        target: Target,
        region: Option<&str>,
    ) -> Result<Designation, OpError> {
        permit(who, Op::Designate)?;
        let facility = gov::check_target(self.hub.store(), &target)?;
        let region = match (&facility, who.region_scope()) {
            (Some(f), _) => {
                who.require_region(&f.registration.region)?;
                f.registration.region.clone()
            }
            (None, Some(own)) => {
                if let Some(r) = region
                    && !auth::same_region(r, own)
                {
                    return Err(AuthError::Forbidden(format!(
                        "this officer administers region {own:?}, not {r:?}"
                    ))
                    .into());
                }
                own.to_owned()
            }
            (None, None) => region
                .map(str::to_owned)
                .unwrap_or_else(|| self.hub.config().region.clone()),
        };
        let d = gov::designate(self.hub.store(), target, &region, &who.id, self.now)?;
        let facilities: Vec<String> = facility.iter().map(|f| f.id.to_string()).collect();
        self.record(
            who,
            Event::new(
                "designation.add",
                serde_json::json!({ "designation": d.id, "target": d.target }),
            )
            .region(Some(&region))
            .facilities(facilities),
        )?;
        Ok(d)
    }

    /// Designations the principal may see.
    pub fn designations(&self, who: &Principal) -> Result<Vec<Designation>, OpError> {
        permit(who, Op::Designations)?;
        Ok(gov::designations(self.hub.store(), who.region_scope())?)
    }

    /// Removes a designation of the principal's region.
    pub fn remove_designation(&self, who: &Principal, id: &str) -> Result<Designation, OpError> {
        permit(who, Op::RemoveDesignation)?;
        let d = gov::designations(self.hub.store(), None)?
            .into_iter()
            .find(|d| d.id == id)
            .ok_or_else(|| {
                OpError::Invalid(format!(
                    "no designation {:?}",
                    id.chars().take(40).collect::<String>()
                ))
            })?;
        who.require_region(&d.region)?;
        let d = gov::remove_designation(self.hub.store(), id)?;
        self.record(
            who,
            Event::new(
                "designation.remove",
                serde_json::json!({ "designation": d.id, "target": d.target }),
            )
            .region(Some(&d.region)),
        )?;
        Ok(d)
    }

    /// The compliance report over the last `hours` hours.
    pub fn compliance(&self, who: &Principal, hours: u64) -> Result<Vec<ComplianceRow>, OpError> {
        permit(who, Op::Compliance)?;
        Ok(gov::compliance(
            self.hub.store(),
            self.ledger,
            who.region_scope(),
            hours,
            self.now,
        )?)
    }

    /// A trace (the health authority, or the local operator), audited before it is returned.
    pub fn trace(&self, who: &Principal, q: &TraceQuery) -> Result<TraceReport, OpError> {
        let (report, event) = self.trace_unaudited(who, q)?;
        self.audit_read(who, event)?;
        Ok(report)
    }

    /// The read part of [`Desk::trace`] (checked against [`PERMISSIONS`]): the report, and
    /// the event [`Desk::audit_read`] must append before the report is handed to anyone.
    /// Writes nothing, so it may run off the hub's actor (`crate::reads`).
    pub fn trace_unaudited(
        &self,
        who: &Principal,
        q: &TraceQuery,
    ) -> Result<(TraceReport, Event), OpError> {
        permit(who, Op::Trace)?;
        Ok(trace::read(self.hub, self.ledger, q, self.now)?)
    }

    /// Appends the audit event of a trace or report read by [`Desk::trace_unaudited`] or
    /// [`Desk::shared_codes_unaudited`]; its failure is the read's ("not answered because it
    /// could not be audited").
    pub fn audit_read(&self, who: &Principal, event: Event) -> Result<AuditEntry, OpError> {
        self.audit()
            .append(who, event, self.now)
            .map_err(|e| OpError::Trace(TraceError::Audit(e)))
    }

    /// The shared-code report (the health authority, or the local operator), audited before
    /// it is returned.
    pub fn shared_codes(
        &self,
        who: &Principal,
        from: Option<UnixSeconds>,
        to: Option<UnixSeconds>,
    ) -> Result<SharedCodeReport, OpError> {
        let (report, event) = self.shared_codes_unaudited(who, from, to)?;
        self.audit_read(who, event)?;
        Ok(report)
    }

    /// The read part of [`Desk::shared_codes`] (checked against [`PERMISSIONS`]): the
    /// report and the event [`Desk::audit_read`] must append first. Writes nothing.
    pub fn shared_codes_unaudited(
        &self,
        who: &Principal,
        from: Option<UnixSeconds>,
        to: Option<UnixSeconds>,
    ) -> Result<(SharedCodeReport, Event), OpError> {
        permit(who, Op::SharedCodes)?;
        let to = to.unwrap_or(self.now);
        let from = from.unwrap_or(to.saturating_sub(trace::MAX_PERIOD_SECONDS));
        if from > to || to - from > trace::MAX_PERIOD_SECONDS {
            return Err(OpError::Invalid(
                "the period must run forwards and not exceed the retention period (28 days)".into(),
            ));
        }
        Ok(trace::read_shared_codes(
            self.hub,
            self.ledger,
            from,
            to,
            self.now,
        )?)
    }

    /// The last `limit` audit entries the principal may see, oldest first.
    pub fn audit_entries(
        &self,
        who: &Principal,
        limit: Option<usize>,
    ) -> Result<Vec<AuditEntry>, OpError> {
        permit(who, Op::Audit)?;
        let all = self.audit().entries(None)?;
        let visible: Vec<AuditEntry> = all
            .into_iter()
            .filter(|e| match (who.local, who.role) {
                (true, _) | (false, Role::Operator) => true,
                (false, Role::Officer) => {
                    !e.event.action.starts_with("trace")
                        && !e.event.action.starts_with("report.")
                        && !e.event.action.starts_with("credential.")
                        && e.event.region.as_deref().is_some_and(|r| {
                            who.region
                                .as_deref()
                                .is_some_and(|own| auth::same_region(r, own))
                        })
                }
                (false, Role::Authority) => e.actor.role == Role::Authority.as_str(),
            })
            .collect();
        let skip = limit.map_or(0, |l| visible.len().saturating_sub(l));
        Ok(visible.into_iter().skip(skip).collect())
    }

    /// Verifies the audit chain (operators).
    pub fn audit_verify(&self, who: &Principal) -> Result<Verification, OpError> {
        permit(who, Op::AuditVerify)?;
        Ok(self.audit().verify()?)
    }

    /// Makes a credential (local operator only); returns it with its secret.
    pub fn credential_add(
        &self,
        who: &Principal,
        role: Role,
        region: Option<&str>,
        name: &str,
    ) -> Result<(CredentialRecord, auth::Secret), OpError> {
        permit(who, Op::CredentialAdd)?;
        let (rec, secret) = auth::issue(self.hub.store(), role, region, name, self.now)?;
        self.record(
            who,
            Event::new(
                "credential.add",
                serde_json::json!({ "credential": rec.id, "role": rec.role, "name": rec.name }),
            )
            .region(rec.region.as_deref()),
        )?;
        Ok((rec, secret))
    }

    /// Every credential (local operator only).
    pub fn credentials(&self, who: &Principal) -> Result<Vec<CredentialRecord>, OpError> {
        permit(who, Op::CredentialList)?;
        Ok(auth::list(self.hub.store())?)
    }

    /// Revokes a credential (local operator only).
    pub fn credential_revoke(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<CredentialRecord, OpError> {
        permit(who, Op::CredentialRevoke)?;
        let rec = auth::revoke(self.hub.store(), id, self.now)?;
        self.record(
            who,
            Event::new(
                "credential.revoke",
                serde_json::json!({ "credential": rec.id, "role": rec.role, "name": rec.name }),
            )
            .region(rec.region.as_deref()),
        )?;
        Ok(rec)
    }

    /// Registers a facility (audited; the command line's `facility add`).
    pub fn add_facility(
        &self,
        who: &Principal,
        reg: shared::facility::Registration,
    ) -> Result<Facility, OpError> {
        permit(who, Op::FacilityAdd)?;
        let f = self.hub.add_facility(reg, self.now)?;
        self.record(
            who,
            Event::new(
                "facility.add",
                serde_json::json!({ "name": f.registration.name, "status": f.status.as_str() }),
            )
            .region(Some(&f.registration.region))
            .facilities([&f.id]),
        )?;
        Ok(f)
    }

    /// Trusts the keys of a keyring file (local operator only); returns how many keys the hub
    /// trusts afterwards.
    pub fn import_issuers(&self, who: &Principal, keyring: &str) -> Result<usize, OpError> {
        permit(who, Op::IssuersImport)?;
        let n = self.hub.import_issuers(keyring)?;
        self.record(
            who,
            Event::new("issuers.import", serde_json::json!({ "trusted_keys": n })),
        )?;
        Ok(n)
    }

    /// Writes an enrollment ticket for a new device of an approved facility (local operator
    /// only).
    pub fn enroll(
        &self,
        who: &Principal,
        facility_id: &str,
        device_name: &str,
    ) -> Result<EnrollmentTicket, OpError> {
        permit(who, Op::Enroll)?;
        let t = self.hub.enroll(facility_id, device_name, self.now)?;
        self.record(
            who,
            Event::new(
                "device.enroll",
                serde_json::json!({ "device": t.device_id, "name": t.device_name }),
            )
            .region(Some(&t.facility.registration.region))
            .facilities([&t.facility.id]),
        )?;
        Ok(t)
    }

    /// Every enrolled device (local operator only).
    pub fn devices(&self, who: &Principal) -> Result<Vec<DeviceRecord>, OpError> {
        permit(who, Op::DeviceList)?;
        Ok(self.hub.store().devices()?)
    }

    /// Revokes a device (local operator only): onto the keyed revocation list first, so that a
    /// row later restored to its old bytes (or this write lost) still leaves the device
    /// refused at every sync, then its row.
    pub fn revoke_device(&self, who: &Principal, id: &str) -> Result<DeviceRecord, OpError> {
        permit(who, Op::DeviceRevoke)?;
        let did = DeviceId::parse(id).map_err(|e| OpError::Invalid(e.to_string()))?;
        let mut d = self.hub.store().device(&did)?.ok_or_else(|| {
            OpError::Invalid(format!("no device {id}: see `sync-hub device list`"))
        })?;
        auth::list_revoked(
            self.hub.store(),
            [(auth::Revoked::Device, d.id.to_string())],
            self.now,
        )
        .map_err(|e| HubError::Revocation(e.to_string()))?;
        d.revoked = true;
        d.revoked_at = Some(self.now);
        self.hub.store().put_device(&d)?;
        self.record(
            who,
            Event::new("device.revoke", serde_json::json!({ "device": id })),
        )?;
        Ok(d)
    }

    /// Pairs this hub with the region's other hub (local operator only); audited by
    /// [`crate::replica::pair`].
    pub fn pair(
        &self,
        who: &Principal,
        file: &crate::replica::PairingFile,
    ) -> Result<crate::replica::PeerConfig, OpError> {
        permit(who, Op::PeerPair)?;
        Ok(crate::replica::pair(self.hub, file, self.now)?)
    }

    /// The paired hub, if any (local operator only).
    pub fn peer(&self, who: &Principal) -> Result<Option<crate::replica::PeerConfig>, OpError> {
        permit(who, Op::PeerStatus)?;
        Ok(crate::replica::peer(self.hub.store())?)
    }

    /// What the dashboard shows the principal.
    pub fn dashboard(&self, who: &Principal, hours: u64) -> Result<serde_json::Value, OpError> {
        permit(who, Op::Dashboard)?;
        let facilities = self.facilities(who)?;
        let compliance = self.compliance(who, hours)?;
        let devices = self.hub.store().devices()?;
        let stats = self.ledger.stats(self.now)?;
        let rows: Vec<serde_json::Value> = facilities
            .iter()
            .map(|f| {
                let mine: Vec<_> = devices
                    .iter()
                    .filter(|d| d.facility == f.id && !d.revoked)
                    .collect();
                let last_sync = mine.iter().filter_map(|d| d.last_sync).max();
                let never = mine.iter().filter(|d| d.last_sync.is_none()).count();
                let oldest_sync = mine.iter().filter_map(|d| d.last_sync).min();
                let flags = compliance
                    .iter()
                    .find(|c| c.facility_id == f.id.as_str())
                    .map(|c| {
                        serde_json::json!({"mandatory_because": c.mandatory_because,
                            "no_visits": c.no_visits, "no_sync": c.no_sync,
                            "compliant": c.compliant, "last_visit": c.last_visit})
                    });
                let mut v = serde_json::to_value(FacilityView::from(f)).unwrap_or_default();
                v["devices"] = mine.len().into();
                v["devices_never_synced"] = never.into();
                v["last_sync"] = last_sync.into();
                v["last_sync_age_seconds"] = last_sync.map(|s| self.now.saturating_sub(s)).into();
                v["oldest_device_sync_age_seconds"] =
                    oldest_sync.map(|s| self.now.saturating_sub(s)).into();
                v["records_held"] = stats
                    .per_facility
                    .get(f.id.as_str())
                    .copied()
                    .unwrap_or(0)
                    .into();
                v["compliance"] = flags.unwrap_or(serde_json::Value::Null);
                v
            })
            .collect();
        let pending: Vec<FacilityView> = facilities
            .iter()
            .filter(|f| f.status == FacilityStatus::Pending)
            .map(FacilityView::from)
            .collect();
        Ok(serde_json::json!({
            "now": self.now,
            "region": self.hub.config().region,
            "who": { "name": who.name, "role": who.role, "region": who.region, "local": who.local },
            "can_approve": who.local || who.role == Role::Officer,
            "hours": hours,
            "facilities": rows,
            "pending": pending,
            "audit": self.audit_entries(who, Some(20))?,
            "backlog_note": "The hub cannot count a device's unsynced visits until they arrive: \
                it shows what it knows, the age of each facility's last sync and devices that \
                never synced.",
        }))
    }
}

/// The time a purge asked for by `who` at `now` enforces retention as of, or why it may not.
///
/// Retention follows the hub's own clock: without `as_of`, or with one not after `now`, that
/// is `now` (a purge can delete earlier, never keep longer). Moving the horizon ahead of the
/// clock destroys day keys early and refuses every later sync of those days, so it is a local,
/// explicit act: only the local operator (`keys/operator.token`, which only someone with the
/// hub's data folder can read) may, and at most [`MAX_PURGE_AHEAD_SECONDS`] ahead. A people
/// credential (an operator's, or the one a metrics scrape job holds) purges at the hub's clock.
pub fn purge_as_of(
    who: &Principal,
    as_of: Option<UnixSeconds>,
    now: UnixSeconds,
) -> Result<UnixSeconds, OpError> {
    permit(who, Op::Purge)?;
    let Some(asked) = as_of.filter(|&t| t > now) else {
        return Ok(now);
    };
    let ahead = asked - now;
    if !who.local {
        if ahead <= PURGE_SKEW_SECONDS {
            return Ok(now);
        }
        return Err(OpError::Invalid(format!(
            "as_of {asked} is {} ahead of the hub's clock: over the API a purge enforces \
             retention at the hub's own clock only (leave as_of out); moving retention ahead \
             of the clock is done on the hub's machine (`sync-hub purge --as-of`)",
            span(ahead)
        )));
    }
    if ahead > MAX_PURGE_AHEAD_SECONDS {
        return Err(OpError::Invalid(format!(
            "--as-of {asked} is {} ahead of the hub's clock; retention may be moved at most \
             {} days ahead (it destroys every day key before that date for good): check the \
             time, in Unix seconds",
            span(ahead),
            MAX_PURGE_AHEAD_SECONDS / DAY_SECONDS
        )));
    }
    Ok(asked)
}

fn span(seconds: u64) -> String {
    if seconds >= 2 * DAY_SECONDS {
        format!("{} days", seconds / DAY_SECONDS)
    } else {
        format!("{seconds} s")
    }
}

/// A purge asked for by `who` (the HTTP API, or the command line without `run`): checks the
/// time ([`purge_as_of`]), writes the purge's audit entry (`retention.purge`: who, the time
/// asked for and enforced) BEFORE anything is destroyed, enforces retention, then records what
/// was destroyed, or the failure, in a second entry (`retention.purge.result`, naming the first
/// by its sequence number). If the first entry cannot be written nothing is destroyed and the
/// error says so ([`OpError::Unaudited`]). Returns what was destroyed.
///
/// Runs the whole purge here ([`begin_purge`], [`purge_step`] until done, [`finish_purge`]);
/// the running hub's actor drives the same three steps with sessions served between chunks.
pub fn purge(
    hub: &Hub,
    ledger: &mut Ledger<'_>,
    who: &Principal,
    as_of: Option<UnixSeconds>,
    now: UnixSeconds,
) -> Result<PurgeReport, OpError> {
    let run = begin_purge(hub, ledger, who, as_of, now)?;
    run_to_end(hub, ledger, run, now)
}

/// The retention timer's purge at `now`, audited as [`RETENTION_TIMER`]. When it will destroy
/// day keys (the horizon moved past the ratchet's oldest day) its `retention.purge` entry is
/// written first, and nothing is destroyed if that fails. An hour in which the horizon did not
/// move writes no entry unless the purge found rows to delete (rows of days whose keys an
/// earlier, audited purge already destroyed, or an interrupted purge's leftovers) or failed;
/// then it records the result.
pub fn purge_on_timer(
    hub: &Hub,
    ledger: &mut Ledger<'_>,
    now: UnixSeconds,
) -> Result<PurgeReport, OpError> {
    let run = begin_purge_on_timer(hub, ledger, now)?;
    run_to_end(hub, ledger, run, now)
}

fn run_to_end(
    hub: &Hub,
    ledger: &Ledger<'_>,
    mut run: PurgeRun,
    now: UnixSeconds,
) -> Result<PurgeReport, OpError> {
    // Nothing waits between these chunks (no actor): full-size ones.
    let outcome = loop {
        match ledger.purge_chunk(&mut run.job, PURGE_CHUNK_ROWS) {
            Ok(false) => continue,
            Ok(true) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    finish_purge(hub, run, outcome, now)
}

/// A purge under way: audited, its day keys destroyed, its rows going chunk by chunk.
#[derive(Debug)]
pub struct PurgeRun {
    who: Principal,
    /// Its `retention.purge` entry, if one was written (the timer's writes none when the
    /// horizon does not move).
    intent: Option<u64>,
    job: PurgeJob,
    /// Rows the next [`purge_step`] deletes at most ([`next_chunk_rows`]).
    rows: u64,
    /// How long one step should take ([`PURGE_STEP_TARGET`] unless a test chose otherwise).
    target: Duration,
}

impl PurgeRun {
    /// What it has removed so far.
    pub fn report(&self) -> &PurgeReport {
        self.job.report()
    }

    /// Rows the next [`purge_step`] deletes at most.
    pub fn chunk_rows(&self) -> u64 {
        self.rows
    }

    /// Which table the purge is at ([`PurgeJob::stage`]).
    pub fn stage(&self) -> u8 {
        self.job.stage()
    }

    /// The name of the table the purge is at ([`PurgeJob::table`]).
    pub fn table(&self) -> &'static str {
        self.job.table()
    }

    /// The same purge with its steps sized to take about `target` each.
    pub fn with_step_target(mut self, target: Duration) -> Self {
        self.target = target;
        self
    }
}

/// How long one [`purge_step`] should hold the running hub's actor: its chunk of rows is
/// resized after each step from how long that one took ([`next_chunk_rows`]), so a region's
/// day goes in steps of about this long on any disk and at any size of the tables (issue 14:
/// nothing holds the sync path 100 ms; a fixed count of rows took 20 ms on one machine and
/// several times that on a slower disk or a bigger B-tree).
pub const PURGE_STEP_TARGET: Duration = Duration::from_millis(25);
/// The fewest rows one step deletes, however slow the disk: the purge always progresses.
pub const PURGE_STEP_MIN_ROWS: u64 = 200;
/// The rows (or seeks) of a table's first step, before any of its steps has been timed: the
/// fewest, growing at most twofold a step while steps stay under the target. What a row or a
/// seek costs differs a hundredfold between tables and between a warm and a cold page cache:
/// at the start of a hub over a day of 3 million visits, the timer's purge walked 2,000
/// facilities in its first step, a cold read each, and held the actor 245-356 ms
/// (`tests/benches/stall.rs`).
pub const PURGE_STEP_FIRST_ROWS: u64 = PURGE_STEP_MIN_ROWS;

/// The rows of the next step after a step of `rows` rows took `took`, to take about `target`:
/// scaled by `target / took`, at most doubled, between [`PURGE_STEP_MIN_ROWS`] and
/// [`PURGE_CHUNK_ROWS`].
pub fn next_chunk_rows(rows: u64, took: Duration, target: Duration) -> u64 {
    let grown = rows.saturating_mul(2);
    let scaled = if took.is_zero() {
        grown
    } else {
        let f = target.as_secs_f64() / took.as_secs_f64();
        // Saturating float to integer conversion.
        (rows as f64 * f) as u64
    };
    scaled
        .min(grown)
        .clamp(PURGE_STEP_MIN_ROWS, PURGE_CHUNK_ROWS)
}

/// Starts the purge `who` asks for: checks and audits it as [`purge`] does and destroys the
/// day keys. The rows go with [`purge_step`]; [`finish_purge`] records the result. A failure
/// to destroy the keys is audited here, and nothing else is done.
pub fn begin_purge(
    hub: &Hub,
    ledger: &mut Ledger<'_>,
    who: &Principal,
    as_of: Option<UnixSeconds>,
    now: UnixSeconds,
) -> Result<PurgeRun, OpError> {
    let enforced = purge_as_of(who, as_of, now)?;
    let intent = audit_purge_intent(hub, who, as_of, enforced, now)?;
    start_purge(hub, ledger, who.clone(), Some(intent), enforced, now)
}

/// Starts the retention timer's purge at `now` (see [`purge_on_timer`]).
pub fn begin_purge_on_timer(
    hub: &Hub,
    ledger: &mut Ledger<'_>,
    now: UnixSeconds,
) -> Result<PurgeRun, OpError> {
    let timer = Principal {
        id: RETENTION_TIMER.to_owned(),
        name: "hourly retention".to_owned(),
        role: Role::Operator,
        region: None,
        local: true,
    };
    let intent = if shared::time::horizon(now) > ledger.ratchet().oldest() {
        Some(audit_purge_intent(hub, &timer, None, now, now)?)
    } else {
        None
    };
    start_purge(hub, ledger, timer, intent, now, now)
}

fn start_purge(
    hub: &Hub,
    ledger: &mut Ledger<'_>,
    who: Principal,
    intent: Option<u64>,
    enforced: UnixSeconds,
    now: UnixSeconds,
) -> Result<PurgeRun, OpError> {
    match ledger.begin_purge(enforced) {
        Ok(job) => Ok(PurgeRun {
            who,
            intent,
            job,
            rows: PURGE_STEP_FIRST_ROWS,
            target: PURGE_STEP_TARGET,
        }),
        Err(e) => {
            let result = Err(e);
            record_purge(hub, &who, intent, &result, now)?;
            hub.audit().expire_details(now)?;
            Err(result
                .err()
                .map(OpError::from)
                .unwrap_or_else(|| OpError::Invalid("the purge failed".into())))
        }
    }
}

/// One chunk of `run`'s deletion ([`Ledger::purge_chunk`], of [`PurgeRun::chunk_rows`] rows,
/// resized for the next step by [`next_chunk_rows`]); whether it is complete.
pub fn purge_step(ledger: &Ledger<'_>, run: &mut PurgeRun) -> Result<bool, LedgerError> {
    let started = std::time::Instant::now();
    let stage = run.job.stage();
    let done = ledger.purge_chunk(&mut run.job, run.rows)?;
    run.rows = if run.job.stage() == stage || done {
        next_chunk_rows(run.rows, started.elapsed(), run.target)
    } else {
        // The next table's rows may cost many times more: start it over, small.
        PURGE_STEP_FIRST_ROWS
    };
    Ok(done)
}

/// Ends `run`: records what it destroyed, or `outcome`'s failure (`retention.purge.result`),
/// and expires audit details. Returns what was destroyed.
pub fn finish_purge(
    hub: &Hub,
    run: PurgeRun,
    outcome: Result<(), LedgerError>,
    now: UnixSeconds,
) -> Result<PurgeReport, OpError> {
    let result = outcome.map(|()| run.job.report().clone());
    record_purge(hub, &run.who, run.intent, &result, now)?;
    // Audit details expire by the hub's own clock, never a fast-forwarded one: a purge far
    // ahead must not erase recent traces' details (its own entry's among them) nor move the
    // head's expiry point past entries a `hub.redb` writer could then delete unnoticed.
    hub.audit().expire_details(now)?;
    Ok(result?)
}

/// Writes a purge's `retention.purge.result` entry when it has an intent entry, or destroyed
/// something (then the timer writes the intent it skipped: the keys of those rows' days went
/// under an earlier purge's entry), or failed.
fn record_purge(
    hub: &Hub,
    who: &Principal,
    intent: Option<u64>,
    result: &Result<PurgeReport, LedgerError>,
    now: UnixSeconds,
) -> Result<(), OpError> {
    let destroyed = match result {
        Ok(r) => r.partitions > 0 || r.sync_states > 0 || r.chunks > 0 || r.index_entries > 0,
        Err(_) => true,
    };
    if intent.is_none() && !destroyed {
        return Ok(());
    }
    let intent = match intent {
        Some(seq) => seq,
        None => audit_purge_intent(hub, who, None, now, now).map_err(|e| {
            tracing::error!("a timer purge deleted leftover rows but could not audit it: {e}");
            e
        })?,
    };
    audit_purge_result(hub, who, intent, result, now)
}

/// Writes a purge's `retention.purge` entry before it runs; returns the entry's sequence
/// number. Fails with [`OpError::Unaudited`], and then the purge must not run.
fn audit_purge_intent(
    hub: &Hub,
    who: &Principal,
    asked: Option<UnixSeconds>,
    enforced: UnixSeconds,
    now: UnixSeconds,
) -> Result<u64, OpError> {
    let detail = serde_json::json!({
        "as_of": asked,
        "enforced_as_of": enforced,
        "ahead_seconds": enforced.saturating_sub(now),
        "horizon": shared::time::horizon(enforced),
    });
    match hub
        .audit()
        .append(who, Event::new(PURGE_INTENT, detail), now)
    {
        Ok(e) => Ok(e.seq),
        Err(e) => {
            tracing::error!(actor = %who.id, "a purge was not run: its audit entry could not be written: {e}");
            Err(OpError::Unaudited(e))
        }
    }
}

/// Records what the purge announced by entry `intent` destroyed, or why it failed.
fn audit_purge_result(
    hub: &Hub,
    who: &Principal,
    intent: u64,
    result: &Result<PurgeReport, LedgerError>,
    now: UnixSeconds,
) -> Result<(), OpError> {
    let mut detail = serde_json::json!({ "intent": intent });
    match result {
        Ok(r) => detail["destroyed"] = serde_json::to_value(r).unwrap_or_default(),
        Err(e) => detail["error"] = e.to_string().into(),
    }
    hub.audit()
        .append(who, Event::new(PURGE_RESULT, detail), now)
        .map_err(|e| {
            tracing::error!(
                actor = %who.id,
                "a purge ran (announced by audit entry {intent}) but its result could not be written: {e}"
            );
            OpError::Audit(e)
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_steps_are_resized_to_their_target() {
        let ms = Duration::from_millis;
        let target = PURGE_STEP_TARGET;
        // Twice too slow: half the rows; ten times too slow: a tenth (not under the floor).
        assert_eq!(next_chunk_rows(2_000, target * 2, target), 1_000);
        assert_eq!(next_chunk_rows(20_000, target * 10, target), 2_000);
        assert_eq!(
            next_chunk_rows(1_000, ms(10_000), target),
            PURGE_STEP_MIN_ROWS
        );
        // Fast: at most doubled, never over the offline chunk.
        assert_eq!(next_chunk_rows(2_000, ms(1), target), 4_000);
        assert_eq!(next_chunk_rows(2_000, Duration::ZERO, target), 4_000);
        assert_eq!(next_chunk_rows(16_000, ms(1), target), PURGE_CHUNK_ROWS);
        // On target: unchanged.
        assert_eq!(next_chunk_rows(3_000, target, target), 3_000);
        assert_eq!(
            next_chunk_rows(3_000, ms(1), Duration::ZERO),
            PURGE_STEP_MIN_ROWS
        );
    }

    const NOW: UnixSeconds = 1_750_000_000;

    fn operator(local: bool) -> Principal {
        Principal {
            id: if local {
                "local-operator"
            } else {
                "cred_0011223344556677"
            }
            .to_owned(),
            name: "scrape job".to_owned(),
            role: Role::Operator,
            region: None,
            local,
        }
    }

    #[test]
    fn a_people_credential_purges_at_the_hubs_clock_only() {
        let remote = operator(false);
        assert_eq!(purge_as_of(&remote, None, NOW).ok(), Some(NOW));
        assert_eq!(purge_as_of(&remote, Some(0), NOW).ok(), Some(NOW));
        // A script's clock a little ahead of the hub's: still the hub's clock.
        assert_eq!(
            purge_as_of(&remote, Some(NOW + PURGE_SKEW_SECONDS), NOW).ok(),
            Some(NOW)
        );
        for ahead in [PURGE_SKEW_SECONDS + 1, 29 * DAY_SECONDS, 350_000_000_000] {
            let e = purge_as_of(&remote, Some(NOW + ahead), NOW)
                .err()
                .unwrap_or_else(|| panic!("{ahead} s ahead was accepted"));
            assert_eq!(e.status(), 400, "{e}");
            assert!(e.to_string().contains("hub's own clock"), "{e}");
        }
        let officer = Principal {
            role: Role::Officer,
            region: Some("mapo".into()),
            ..operator(false)
        };
        assert_eq!(
            purge_as_of(&officer, None, NOW).err().map(|e| e.status()),
            Some(403)
        );
    }

    #[test]
    fn the_local_operator_moves_retention_ahead_within_the_cap() {
        let local = operator(true);
        assert_eq!(purge_as_of(&local, None, NOW).ok(), Some(NOW));
        assert_eq!(purge_as_of(&local, Some(1), NOW).ok(), Some(NOW));
        let later = NOW + 30 * DAY_SECONDS;
        assert_eq!(purge_as_of(&local, Some(later), NOW).ok(), Some(later));
        let cap = NOW + MAX_PURGE_AHEAD_SECONDS;
        assert_eq!(purge_as_of(&local, Some(cap), NOW).ok(), Some(cap));
        for absurd in [cap + 1, 350_000_000_000, u64::MAX] {
            let e = purge_as_of(&local, Some(absurd), NOW)
                .err()
                .unwrap_or_else(|| panic!("{absurd} was accepted"));
            assert_eq!(e.status(), 400, "{e}");
            assert!(e.to_string().contains("at most 400 days"), "{e}");
        }
    }
}
