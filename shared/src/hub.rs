//! The hub core: the hub's rules as pure functions over plain inputs. `sync-hub` reads its
//! redb tables, calls these and writes what they decide; `simulations` calls the same ones.
//!
//! - **Indexing** ([`plan_index`]): which records of a persisted partition enter the trace
//!   index, opened with the one opener of [`crate::unseal`], and which are left to be tried
//!   again at the next persist (a record whose session key has not arrived, or that does not
//!   open).
//! - **The trace join** ([`is_case_visit`], [`days_to_search`], [`contacts`]) and the rule
//!   "this visited facility may still hold unsynced visits" ([`may_hold_unsynced`]), and
//!   codes that look like a shared screenshot ([`find_shared`]).
//! - **Admission** ([`admit`]): a device's hello against a [`Registry`] view of who is
//!   enrolled where, bound to which endpoint.
//! - **Per-device quotas** ([`DeviceQuota`], [`Charge`]): new records and wrapped keys per
//!   device per UTC day.
//!
//! No IO, no clock, no randomness: time comes in as arguments, the registry as a view.

use crate::daykey::DaySecret;
use crate::envelope::{Envelope, EnvelopeError, Record, RecordBody};
use crate::facility::FacilityStatus;
use crate::ids::{DeviceId, FacilityId, PartitionId, RecordId};
use crate::sync::{Decision, Peer, PeerHello, RefuseReason};
use crate::ticket::Credential;
use crate::time::{Day, UnixSeconds};
use crate::unseal::{OpenFailure, PartitionOpener};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

// ---------------------------------------------------------------------------------------
// Indexing

/// One visit as the hub's trace index holds it (sealed there under the day's index key).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedVisit {
    /// The facility visited.
    pub facility: FacilityId,
    /// When the device recorded it, by its clock.
    pub scanned_at: UnixSeconds,
    /// The device that recorded it.
    pub device: DeviceId,
    /// The QR token; `None` for a paper entry.
    pub token: Option<[u8; 16]>,
    /// The record's id in its partition.
    pub record: RecordId,
}

// Tokens identify people through their issuer; logs must never show them.
impl fmt::Debug for IndexedVisit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexedVisit")
            .field("facility", &self.facility)
            .field("scanned_at", &self.scanned_at)
            .field("device", &self.device)
            .field("token", &self.token.map(|_| "<elided>"))
            .field("record", &self.record)
            .finish()
    }
}

impl IndexedVisit {
    /// The visit `record`, stored as `id` in partition `partition`, stands for.
    pub fn of(partition: &PartitionId, id: RecordId, record: &Record) -> Self {
        IndexedVisit {
            facility: partition.facility.clone(),
            scanned_at: record.scanned_at,
            device: record.device.clone(),
            token: match record.body {
                RecordBody::Qr { token, .. } => Some(token),
                RecordBody::Paper { .. } => None,
            },
            record: id,
        }
    }

    /// The key that orders and dedupes visits: time, then facility, then record.
    fn order_key(&self) -> (UnixSeconds, FacilityId, RecordId) {
        (self.scanned_at, self.facility.clone(), self.record)
    }
}

/// The visits one persist indexed at one facility, as the facility index seals them
/// (`visits-by-facility-2`): the facility once, each device once, and per visit only what
/// differs (about 36 bytes encoded, against about 80 for an [`IndexedVisit`] on its own): the
/// seconds since the batch's previous visit (visits are kept in time order, so this is one or
/// two bytes), the device as a number into the batch's list, the token and the record id.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitBatch {
    facility: FacilityId,
    devices: Vec<DeviceId>,
    visits: Vec<BatchVisit>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BatchVisit {
    /// Seconds after the previous visit of the batch (the first: after 0).
    after: u64,
    /// Index into the batch's `devices`.
    device: u32,
    token: Option<[u8; 16]>,
    record: RecordId,
}

// Tokens identify people through their issuer; logs must never show them.
impl fmt::Debug for VisitBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VisitBatch")
            .field("facility", &self.facility)
            .field("devices", &self.devices)
            .field("visits", &self.visits.len())
            .finish()
    }
}

impl VisitBatch {
    /// The batch of `visits` at `facility` (their own `facility` is not looked at: a persist
    /// indexes one partition, so one facility).
    pub fn new<'v>(
        facility: &FacilityId,
        visits: impl IntoIterator<Item = &'v IndexedVisit>,
    ) -> Self {
        let mut sorted: Vec<&IndexedVisit> = visits.into_iter().collect();
        sorted.sort_by_key(|v| (v.scanned_at, v.record));
        let mut devices: Vec<DeviceId> = Vec::new();
        let mut numbers: BTreeMap<&DeviceId, u32> = BTreeMap::new();
        let mut last = 0;
        let mut out = Vec::with_capacity(sorted.len());
        for v in sorted {
            let device = *numbers.entry(&v.device).or_insert_with(|| {
                devices.push(v.device.clone());
                u32::try_from(devices.len() - 1).unwrap_or(u32::MAX)
            });
            out.push(BatchVisit {
                after: v.scanned_at - last,
                device,
                token: v.token,
                record: v.record,
            });
            last = v.scanned_at;
        }
        VisitBatch {
            facility: facility.clone(),
            devices,
            visits: out,
        }
    }

    /// The facility the batch's visits are at.
    pub fn facility(&self) -> &FacilityId {
        &self.facility
    }

    /// How many visits the batch holds.
    pub fn len(&self) -> usize {
        self.visits.len()
    }

    /// Whether the batch holds no visit.
    pub fn is_empty(&self) -> bool {
        self.visits.is_empty()
    }

    /// The batch's visits, in time order; `None` if it is damaged (a device number out of
    /// the list, a time past the end of time).
    pub fn visits(&self) -> Option<Vec<IndexedVisit>> {
        let mut at: UnixSeconds = 0;
        self.visits
            .iter()
            .map(|v| {
                at = at.checked_add(v.after)?;
                Some(IndexedVisit {
                    facility: self.facility.clone(),
                    scanned_at: at,
                    device: self.devices.get(usize::try_from(v.device).ok()?)?.clone(),
                    token: v.token,
                    record: v.record,
                })
            })
            .collect()
    }
}

/// What one persist indexes of a partition's records not indexed yet.
#[derive(Debug, Default)]
pub struct IndexPlan {
    /// Visits to index, in the order of the records given.
    pub visits: Vec<IndexedVisit>,
    /// Of those, how many were sealed to an earlier day's key than the partition's (the
    /// device's day-key fallback): unreadable once that earlier day expires.
    pub fallback: u64,
    /// Records left out, to be tried again at the next persist: not marked indexed. A record
    /// whose session key has not arrived yet is indexed once it has; one that is damaged
    /// stays out.
    pub retry: Vec<(RecordId, OpenFailure)>,
    /// Sessions whose key could not be had (no wrapped key or no day secret).
    pub sessions_without_key: usize,
}

impl IndexPlan {
    /// Records of `retry` that only wait for their session key.
    pub fn waiting_for_key(&self) -> usize {
        self.retry.iter().filter(|(_, e)| e.key_missing()).count()
    }
}

/// The records of a partition not indexed yet: those `indexed` does not hold.
pub fn fresh_records<E>(
    records: Vec<(RecordId, E)>,
    indexed: impl Fn(&RecordId) -> bool,
) -> Vec<(RecordId, E)> {
    records.into_iter().filter(|(id, _)| !indexed(id)).collect()
}

/// The indexing decision for `fresh` records of `opener`'s partition: every record that opens
/// with [`PartitionOpener`] (the opener [`crate::unseal::unseal_partition`] loops over) is
/// indexed; every other one is retried later.
pub fn plan_index<F: FnMut(Day) -> Option<DaySecret>>(
    opener: &mut PartitionOpener<F>,
    fresh: Vec<(RecordId, Result<Envelope, EnvelopeError>)>,
) -> IndexPlan {
    let id = opener.partition().clone();
    let mut plan = IndexPlan {
        visits: Vec::with_capacity(fresh.len()),
        ..IndexPlan::default()
    };
    for (record_id, envelope) in fresh {
        match opener.open_entry(record_id, envelope) {
            Ok(opened) => {
                if opened.key_day != id.day {
                    plan.fallback += 1;
                }
                plan.visits
                    .push(IndexedVisit::of(&id, record_id, &opened.record));
            }
            Err(e) => plan.retry.push((record_id, e)),
        }
    }
    plan.sessions_without_key = opener.sessions_without_key();
    plan
}

// ---------------------------------------------------------------------------------------
// The trace join

/// A contact window of `minutes` either side of a visit, in seconds.
pub fn window_seconds(minutes: u64) -> u64 {
    minutes.saturating_mul(60)
}

/// Whether two visits `a` and `b` at one facility are within `window` seconds of each other
/// (inclusive: exactly `window` apart is a contact).
pub fn within_window(a: UnixSeconds, b: UnixSeconds, window: u64) -> bool {
    a.abs_diff(b) <= window
}

/// Whether `v` is a visit of the case: one of its `tokens`, scanned between `from` and `to`
/// inclusive.
pub fn is_case_visit(
    v: &IndexedVisit,
    tokens: &BTreeSet<[u8; 16]>,
    from: UnixSeconds,
    to: UnixSeconds,
) -> bool {
    v.token.is_some_and(|t| tokens.contains(&t)) && (from..=to).contains(&v.scanned_at)
}

/// The days whose index of the visit's facility may hold its contacts: the day the case's
/// visit is indexed under, and every day its window touches, clipped to the live days
/// `first..=last`.
pub fn days_to_search(
    indexed_day: Day,
    scanned_at: UnixSeconds,
    window: u64,
    first: Day,
    last: Day,
) -> Vec<Day> {
    let from = Day::of(scanned_at.saturating_sub(window)).max(first);
    let to = Day::of(scanned_at.saturating_add(window)).min(last);
    let mut days: BTreeSet<Day> = (from.0..=to.0).map(Day).collect();
    days.insert(indexed_day);
    days.into_iter().collect()
}

/// The case's visits, deduplicated and in time order (then facility, then record).
pub fn ordered(visits: impl IntoIterator<Item = IndexedVisit>) -> Vec<IndexedVisit> {
    let map: BTreeMap<_, _> = visits.into_iter().map(|v| (v.order_key(), v)).collect();
    map.into_values().collect()
}

/// The join: every visit of `candidates` at a facility the case visited, within `window`
/// seconds of one of the case's visits there, and not itself one of the case's `tokens`;
/// deduplicated and in time order.
pub fn contacts(
    case: &[IndexedVisit],
    tokens: &BTreeSet<[u8; 16]>,
    candidates: impl IntoIterator<Item = IndexedVisit>,
    window: u64,
) -> Vec<IndexedVisit> {
    let mut times: BTreeMap<&FacilityId, Vec<UnixSeconds>> = BTreeMap::new();
    for v in case {
        times.entry(&v.facility).or_default().push(v.scanned_at);
    }
    ordered(candidates.into_iter().filter(|v| {
        !v.token.is_some_and(|t| tokens.contains(&t))
            && times
                .get(&v.facility)
                .is_some_and(|ts| ts.iter().any(|t| within_window(*t, v.scanned_at, window)))
    }))
}

/// One code's validity: the same token at two facilities within this many seconds is a
/// shared screenshot, not one visitor.
pub const SHARED_CODE_SECONDS: u64 = 15;

/// Pairs of `visits` (indices) with the same token at different facilities within
/// [`SHARED_CODE_SECONDS`], earlier first. Paper entries have no token and never pair.
pub fn find_shared(visits: &[IndexedVisit]) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..visits.len())
        .filter(|i| visits[*i].token.is_some())
        .collect();
    order.sort_by_key(|i| (visits[*i].token, visits[*i].scanned_at));
    let mut out = Vec::new();
    for (n, &i) in order.iter().enumerate() {
        for &j in &order[n + 1..] {
            let (a, b) = (&visits[i], &visits[j]);
            if a.token != b.token || b.scanned_at.saturating_sub(a.scanned_at) > SHARED_CODE_SECONDS
            {
                break;
            }
            if a.facility != b.facility {
                out.push((i, j));
            }
        }
    }
    out
}

/// One enrolled device as the "may hold unsynced visits" rule needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSync {
    /// The facility it is enrolled for.
    pub facility: FacilityId,
    /// When it last completed a sync with the hub, by the hub's clock.
    pub last_sync: Option<UnixSeconds>,
    /// Revoked (row flag or keyed list): it never syncs again.
    pub revoked: bool,
}

/// The facilities the case visited that may still hold visits the hub has not seen: one of
/// their devices has not synced since the end of the window of the case's latest visit there
/// (never synced counts). Revoked devices are left out: waiting for one would flag its
/// facility for ever. In facility order.
pub fn may_hold_unsynced(
    case: &[IndexedVisit],
    devices: impl IntoIterator<Item = DeviceSync>,
    window: u64,
) -> Vec<FacilityId> {
    let mut latest: BTreeMap<&FacilityId, UnixSeconds> = BTreeMap::new();
    for v in case {
        let t = latest.entry(&v.facility).or_default();
        *t = (*t).max(v.scanned_at);
    }
    let mut out = BTreeSet::new();
    for d in devices {
        let Some(t) = latest.get(&d.facility) else {
            continue;
        };
        if !d.revoked && d.last_sync.is_none_or(|s| s < t.saturating_add(window)) {
            out.insert(d.facility);
        }
    }
    out.into_iter().collect()
}

// ---------------------------------------------------------------------------------------
// Admission

/// One device as the hub's registry holds it, for [`admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledDevice {
    /// The facility it is enrolled for.
    pub facility: FacilityId,
    /// The endpoint id it is bound to (hex), once it has made first contact.
    pub endpoint: Option<String>,
    /// Revoked: by the row's flag or the hub's keyed revocation list.
    pub revoked: bool,
}

/// What [`admit`] reads of the hub's registry. The hub fills it from redb; the simulation from
/// the devices it created. Errors are the registry's, as text (they refuse with `Internal`).
pub trait Registry {
    /// Device `id`, if enrolled.
    fn device(&self, id: &DeviceId) -> Result<Option<EnrolledDevice>, String>;
    /// The status of facility `id`, if registered.
    fn facility_status(&self, id: &FacilityId) -> Result<Option<FacilityStatus>, String>;
    /// The device an unused enrollment credential (by its digest) belongs to.
    fn credential_device(&self, digest: &[u8; 32]) -> Result<Option<DeviceId>, String>;
}

/// The outcome of [`admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Sync `facility`'s partitions with `device`.
    Admit {
        /// The device, as enrolled.
        device: DeviceId,
        /// Its facility.
        facility: FacilityId,
        /// First contact with a valid credential: bind the device to the connection's
        /// endpoint and spend the credential with this digest, before admitting.
        bind: Option<[u8; 32]>,
    },
    /// Refuse the session.
    Refuse {
        /// Why.
        reason: RefuseReason,
        /// For the device's logs.
        detail: String,
    },
}

impl Admission {
    fn refuse(reason: RefuseReason, detail: impl Into<String>) -> Self {
        Admission::Refuse {
            reason,
            detail: detail.into(),
        }
    }

    /// The session's [`Decision`], with the refresh bytes the shell built for an admitted
    /// device.
    pub fn into_decision(self, refresh: Option<Vec<u8>>) -> Decision {
        match self {
            Admission::Admit { facility, .. } => Decision::Admit { facility, refresh },
            Admission::Refuse { reason, detail } => Decision::Refuse { reason, detail },
        }
    }
}

/// Admission of the region's other hub for one facility's partitions (`Peer::HubLink`): only
/// from the endpoint this hub was paired with (`from_paired_hub`, which the shell decides from
/// the authenticated endpoint id), of this hub's `region` (compared as `sync-hub` compares
/// regions: trimmed, case-folded), for a facility this hub has registered and not removed
/// (`facility_known`). `sync-hub`'s daemon and the simulation's second hub both admit with it.
pub fn admit_link(
    hello: &PeerHello,
    from_paired_hub: bool,
    region: &str,
    facility_known: impl Fn(&FacilityId) -> Result<bool, String>,
) -> Decision {
    let refuse = |reason, detail: &str| Decision::Refuse {
        reason,
        detail: detail.to_owned(),
    };
    if !from_paired_hub {
        return refuse(
            RefuseReason::UnknownDevice,
            "this endpoint is not the hub this one is paired with",
        );
    }
    let Peer::HubLink {
        region: theirs,
        facility,
    } = &hello.peer
    else {
        return refuse(RefuseReason::Protocol, "the paired hub syncs as a hub link");
    };
    if theirs.trim().to_lowercase() != region.trim().to_lowercase() {
        return refuse(RefuseReason::WrongFacility, "another region's hub");
    }
    match facility_known(facility) {
        Ok(true) => Decision::Admit {
            facility: facility.clone(),
            refresh: None,
        },
        Ok(false) => refuse(
            RefuseReason::WrongFacility,
            "this hub has no such facility (yet): the registry exchange brings it",
        ),
        Err(e) => refuse(RefuseReason::Internal, &e),
    }
}

/// Admission: whether the device `hello` claims to be, connecting from endpoint `remote`
/// (hex), may sync, and for which facility. In order: only devices sync with a hub; the device
/// must be enrolled, not revoked, for the facility it claims, which must be approved; its
/// endpoint must be the one bound to it, or, on first contact, it must present its unused
/// enrollment credential (which then binds it).
pub fn admit(hello: &PeerHello, remote: &str, registry: &impl Registry) -> Admission {
    let Peer::Device { device, facility } = &hello.peer else {
        return Admission::refuse(RefuseReason::Protocol, "only devices sync with a hub");
    };
    let rec = match registry.device(device) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Admission::refuse(
                RefuseReason::UnknownDevice,
                "this device is not enrolled here",
            );
        }
        Err(e) => return Admission::refuse(RefuseReason::Internal, e),
    };
    if rec.revoked {
        return Admission::refuse(RefuseReason::Revoked, "this device has been revoked");
    }
    if &rec.facility != facility {
        return Admission::refuse(
            RefuseReason::WrongFacility,
            "this device is enrolled for another facility",
        );
    }
    match registry.facility_status(facility) {
        Ok(Some(FacilityStatus::Approved)) => {}
        Ok(Some(_)) => {
            return Admission::refuse(RefuseReason::Revoked, "the facility is not approved");
        }
        Ok(None) => {
            return Admission::refuse(RefuseReason::Revoked, "the facility has been removed");
        }
        Err(e) => return Admission::refuse(RefuseReason::Internal, e),
    }
    let bind = match &rec.endpoint {
        Some(bound) if bound == remote => None,
        Some(_) => {
            return if hello.credential.is_some() {
                Admission::refuse(
                    RefuseReason::CredentialReused,
                    "this enrollment ticket was already used by another device",
                )
            } else {
                Admission::refuse(
                    RefuseReason::UnknownDevice,
                    "this endpoint is not the one enrolled for the device",
                )
            };
        }
        None => {
            let Some(cred) = hello.credential else {
                return Admission::refuse(
                    RefuseReason::UnknownDevice,
                    "first contact needs the enrollment credential",
                );
            };
            let digest = Credential(cred).digest();
            match registry.credential_device(&digest) {
                Ok(Some(d)) if &d == device => Some(digest),
                Ok(_) => {
                    return Admission::refuse(
                        RefuseReason::CredentialReused,
                        "the enrollment credential is not valid (used or wrong)",
                    );
                }
                Err(e) => return Admission::refuse(RefuseReason::Internal, e),
            }
        }
    };
    if !hello.push_only {
        // Finding 2 of the sync v2 review: a session that takes the hub's records lets one
        // enrolled device make the hub build and queue megabytes per tiny request.
        return Admission::refuse(
            RefuseReason::Protocol,
            "devices only push their records; a session that downloads the hub's is refused",
        );
    }
    Admission::Admit {
        device: device.clone(),
        facility: facility.clone(),
        bind,
    }
}

// ---------------------------------------------------------------------------------------
// Per-device quotas

/// New records and wrapped keys: what a persist charges to the device whose session delivered
/// it, or what a device has delivered so far on one UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Charge {
    /// New records.
    pub records: u64,
    /// New wrapped keys.
    pub keys: u64,
}

impl Charge {
    /// `self` and `other` together (saturating).
    pub fn plus(self, other: Charge) -> Charge {
        Charge {
            records: self.records.saturating_add(other.records),
            keys: self.keys.saturating_add(other.keys),
        }
    }
}

/// The per-device daily quotas: new records and new wrapped keys one device may deliver per
/// UTC day (of the hub's clock). Every new record of a session counts against the device
/// admitted for it, its siblings' records it relays too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceQuota {
    /// New records per device per day.
    pub records_per_day: u64,
    /// New wrapped keys per device per day.
    pub keys_per_day: u64,
}

impl DeviceQuota {
    /// Whether `charge` on top of what `device` delivered so far on UTC day `today`
    /// (`delivered`) stays within the quotas: `Err(detail)` to refuse the session with
    /// (`QuotaExceeded`) if not. Exactly at a quota is within it. Records are checked first;
    /// `delivered.keys` is only looked at when `charge.keys > 0` (the shell may leave it 0
    /// then, and skip reading it).
    pub fn check(
        &self,
        device: &DeviceId,
        today: Day,
        delivered: Charge,
        charge: Charge,
    ) -> Result<(), String> {
        let records = delivered.records.saturating_add(charge.records);
        if records > self.records_per_day {
            return Err(format!(
                "device {device} would deliver {records} new records today (UTC day {}), over \
                 the hub's {} per device per day; the device keeps them, sync again tomorrow",
                today.0, self.records_per_day
            ));
        }
        // Wrapped keys are counted apart: an honest device brings a few a day.
        let keys = if charge.keys > 0 {
            delivered.keys.saturating_add(charge.keys)
        } else {
            0
        };
        if keys > self.keys_per_day {
            return Err(format!(
                "device {device} would deliver {keys} new wrapped keys today (UTC day {}), over \
                 the hub's {} wrapped keys per device per day",
                today.0, self.keys_per_day
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
