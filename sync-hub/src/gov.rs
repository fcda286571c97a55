//! Local-government administration: pending approvals, duplicate registrations, designations
//! of facilities that must keep a log, and the compliance report.
//!
//! **Designations.** By default the 13 high-risk kinds of the guide's table (the seed's
//! 고위험시설, `shared::facility::Mandatory::HighRisk`) must keep a log. An officer adds more: a
//! whole category in their region (the capital-region kinds, say), a single facility, or a
//! facility for a dated one-off event (`from`..`to`), as the guide allows ("일회성 행사도
//! 가능함"). Designations are kept in `designations-1` and removed, never edited.
//!
//! **Duplicates.** One business number may register several branches, told apart by their
//! detailed address; two registrations with the same business number *and* the same address
//! (ignoring case and spacing) are duplicates. Removing them keeps the earliest registration.
//!
//! **Compliance.** A mandatory, approved facility is flagged when the hub holds no visit of it
//! in the last N hours, or none of its devices has synced in that time; the report gives its
//! last contact (last sync and last visit) so an officer knows since when.

use crate::auth::same_region;
use crate::ledger::Ledger;
use crate::store::{Store, StoreError};
use rand_core::{OsRng, RngCore};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shared::UnixSeconds;
use shared::facility::{CATEGORIES, Facility, FacilityStatus, Mandatory, parse_category};
use std::collections::BTreeMap;

/// `designations-1`: designation id -> JSON [`Designation`].
pub const DESIGNATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("designations-1");

/// Creates the designations' table (called by [`crate::schema`] when the store opens).
pub(crate) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(DESIGNATIONS)?;
    Ok(())
}

/// The longest one-off event: the retention period.
pub const MAX_EVENT_SECONDS: u64 = 28 * 86_400;

/// What a designation makes mandatory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Every facility of a category in the region.
    Category {
        /// The category slug.
        category: String,
    },
    /// One facility.
    Facility {
        /// Its id.
        facility_id: String,
    },
    /// One facility during a dated one-off event.
    Event {
        /// Its id.
        facility_id: String,
        /// The event's name.
        name: String,
        /// Start, Unix seconds.
        from: UnixSeconds,
        /// End, Unix seconds.
        to: UnixSeconds,
    },
}

/// A designation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Designation {
    /// `des_` and 12 hex digits.
    pub id: String,
    /// What it covers.
    pub target: Target,
    /// The region it applies in.
    pub region: String,
    /// When it was made.
    pub created_at: UnixSeconds,
    /// Who made it (a principal id).
    pub created_by: String,
}

/// A local-government operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GovError {
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for GovError {
            fn from(e: $t) -> Self {
                GovError::Store(StoreError::Db(e.into()))
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

/// Whether `f` is in `region` (every region when `None`).
pub fn in_region(f: &Facility, region: Option<&str>) -> bool {
    region.is_none_or(|r| same_region(r, &f.registration.region))
}

/// Pending facilities (registered without a business number), oldest first.
pub fn pending(store: &Store, region: Option<&str>) -> Result<Vec<Facility>, GovError> {
    let mut out: Vec<Facility> = store
        .facilities()?
        .into_iter()
        .filter(|f| f.status == FacilityStatus::Pending && in_region(f, region))
        .collect();
    out.sort_by(|a, b| (a.registered_at, &a.id).cmp(&(b.registered_at, &b.id)));
    Ok(out)
}

fn normalise_address(a: &str) -> String {
    a.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Groups of duplicate registrations (same business number, same detailed address), each
/// oldest first; only groups of two or more.
pub fn duplicates(store: &Store, region: Option<&str>) -> Result<Vec<Vec<Facility>>, GovError> {
    let mut groups: BTreeMap<(String, String), Vec<Facility>> = BTreeMap::new();
    for f in store.facilities()? {
        if !in_region(&f, region) {
            continue;
        }
        let Some(b) = &f.registration.business_number else {
            continue;
        };
        groups
            .entry((b.formatted(), normalise_address(&f.registration.address)))
            .or_default()
            .push(f);
    }
    Ok(groups
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort_by(|a, b| (a.registered_at, &a.id).cmp(&(b.registered_at, &b.id)));
            g
        })
        .collect())
}

fn encode(d: &Designation) -> Vec<u8> {
    // A plain data type always serialises.
    serde_json::to_vec(d).unwrap_or_default()
}

/// Checks a new designation's target against the registry.
pub fn check_target(store: &Store, target: &Target) -> Result<Option<Facility>, GovError> {
    match target {
        Target::Category { category } => {
            parse_category(category).map_err(|e| GovError::Invalid(e.to_string()))?;
            Ok(None)
        }
        Target::Facility { facility_id } => Ok(Some(facility(store, facility_id)?)),
        Target::Event {
            facility_id,
            name,
            from,
            to,
        } => {
            let n = name.trim().chars().count();
            if n == 0 || n > 100 || name.chars().any(char::is_control) {
                return Err(GovError::Invalid(
                    "the event name must be 1 to 100 characters".into(),
                ));
            }
            if to <= from || to - from > MAX_EVENT_SECONDS {
                return Err(GovError::Invalid(
                    "an event needs --from before --to, at most 28 days apart".into(),
                ));
            }
            Ok(Some(facility(store, facility_id)?))
        }
    }
}

/// A registered facility by id.
pub fn facility(store: &Store, id: &str) -> Result<Facility, GovError> {
    let fid = shared::FacilityId::parse(id).map_err(|e| GovError::Invalid(e.to_string()))?;
    store
        .facility(&fid)?
        .ok_or_else(|| GovError::Invalid(format!("no facility {id}: see `sync-hub facility list`")))
}

/// Stores a designation (its target already checked).
pub fn designate(
    store: &Store,
    target: Target,
    region: &str,
    created_by: &str,
    now: UnixSeconds,
) -> Result<Designation, GovError> {
    let mut id = [0u8; 6];
    OsRng.fill_bytes(&mut id);
    let d = Designation {
        id: format!("des_{}", hex::encode(id)),
        target,
        region: region.trim().to_owned(),
        created_at: now,
        created_by: created_by.to_owned(),
    };
    let txn = store.db().begin_write()?;
    txn.open_table(DESIGNATIONS)?
        .insert(d.id.as_str(), encode(&d).as_slice())?;
    txn.commit()?;
    Ok(d)
}

/// Stores a designation made at the peer hub (`crate::replica`), unchanged.
pub fn put_designation(store: &Store, d: &Designation) -> Result<(), GovError> {
    let txn = store.db().begin_write()?;
    txn.open_table(DESIGNATIONS)?
        .insert(d.id.as_str(), encode(d).as_slice())?;
    txn.commit()?;
    Ok(())
}

/// Every designation (in `region` when given).
pub fn designations(store: &Store, region: Option<&str>) -> Result<Vec<Designation>, GovError> {
    let txn = store.db().begin_read()?;
    let t = txn.open_table(DESIGNATIONS)?;
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        let d: Designation =
            serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                table: "designations-1",
                key: k.value().to_owned(),
                reason: e.to_string(),
            })?;
        if region.is_none_or(|r| same_region(r, &d.region)) {
            out.push(d);
        }
    }
    Ok(out)
}

/// Removes a designation; returns it.
pub fn remove_designation(store: &Store, id: &str) -> Result<Designation, GovError> {
    let d = designations(store, None)?
        .into_iter()
        .find(|d| d.id == id)
        .ok_or_else(|| {
            GovError::Invalid(format!(
                "no designation {:?}: see `sync-hub designation list`",
                id.chars().take(40).collect::<String>()
            ))
        })?;
    // Its tombstone first: the peer hub's copy must never bring it back.
    store.put_tombstone(&format!("g/{id}"), crate::clock::now())?;
    let txn = store.db().begin_write()?;
    txn.open_table(DESIGNATIONS)?.remove(id)?;
    txn.commit()?;
    Ok(d)
}

/// Why a facility must keep a log at `now`, if it must.
pub fn mandatory_because(
    f: &Facility,
    designations: &[Designation],
    now: UnixSeconds,
) -> Option<String> {
    let category = &f.registration.category;
    if CATEGORIES
        .iter()
        .any(|c| c.slug == category && c.mandatory == Mandatory::HighRisk)
    {
        return Some(format!("high-risk category {category} (default)"));
    }
    for d in designations {
        if !same_region(&d.region, &f.registration.region) {
            continue;
        }
        match &d.target {
            Target::Category { category: c } if c == category => {
                return Some(format!("category {c} designated ({})", d.id));
            }
            Target::Facility { facility_id } if facility_id == f.id.as_str() => {
                return Some(format!("facility designated ({})", d.id));
            }
            Target::Event {
                facility_id,
                name,
                from,
                to,
            } if facility_id == f.id.as_str() && (*from..=*to).contains(&now) => {
                return Some(format!("one-off event {name:?} ({})", d.id));
            }
            _ => {}
        }
    }
    None
}

/// One mandatory facility in the compliance report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComplianceRow {
    /// The facility.
    pub facility_id: String,
    /// Its name.
    pub name: String,
    /// Its category.
    pub category: String,
    /// Its region.
    pub region: String,
    /// Why it must keep a log.
    pub mandatory_because: String,
    /// Its enrolled, non-revoked devices.
    pub devices: usize,
    /// The latest sync of any of its devices (its last contact with the hub).
    pub last_sync: Option<UnixSeconds>,
    /// The latest visit the hub holds.
    pub last_visit: Option<UnixSeconds>,
    /// Visits in the period.
    pub visits_in_period: u64,
    /// No visit in the period.
    pub no_visits: bool,
    /// No sync in the period.
    pub no_sync: bool,
    /// Neither flag is set.
    pub compliant: bool,
}

/// The compliance report over the last `hours` hours: every mandatory approved facility in
/// `region` (all when `None`), flagged ones first.
pub fn compliance(
    store: &Store,
    ledger: &Ledger<'_>,
    region: Option<&str>,
    hours: u64,
    now: UnixSeconds,
) -> Result<Vec<ComplianceRow>, GovError> {
    if hours == 0 || hours > 28 * 24 {
        return Err(GovError::Invalid(
            "--hours must be 1 to 672 (the retention period)".into(),
        ));
    }
    let since = now.saturating_sub(hours * 3600);
    let designations = designations(store, region)?;
    let devices = store.devices()?;
    let mut rows = Vec::new();
    for f in store.facilities()? {
        if f.status != FacilityStatus::Approved || !in_region(&f, region) {
            continue;
        }
        let Some(because) = mandatory_because(&f, &designations, now) else {
            continue;
        };
        let mine: Vec<_> = devices
            .iter()
            .filter(|d| d.facility == f.id && !d.revoked)
            .collect();
        let last_sync = mine.iter().filter_map(|d| d.last_sync).max();
        let activity = ledger.facility_activity(&f.id, since, now)?;
        let no_visits = activity.visits_since == 0;
        let no_sync = last_sync.is_none_or(|s| s < since);
        rows.push(ComplianceRow {
            facility_id: f.id.to_string(),
            name: f.registration.name.clone(),
            category: f.registration.category.clone(),
            region: f.registration.region.clone(),
            mandatory_because: because,
            devices: mine.len(),
            last_sync,
            last_visit: activity.last_visit,
            visits_in_period: activity.visits_since,
            no_visits,
            no_sync,
            compliant: !no_visits && !no_sync,
        });
    }
    rows.sort_by(|a, b| (a.compliant, &a.facility_id).cmp(&(b.compliant, &b.facility_id)));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::facility::{BusinessNumber, Registration};

    fn fac(id: &str, category: &str, address: &str, at: u64) -> Facility {
        Facility {
            id: shared::FacilityId::parse(id).unwrap_or_else(|e| panic!("{e}")),
            registration: Registration {
                name: id.into(),
                business_number: BusinessNumber::parse("123-45-67891").ok(),
                representative: "Kim".into(),
                phone: "02-000-0000".into(),
                category: category.into(),
                region: "Mapo".into(),
                address: address.into(),
            },
            status: FacilityStatus::Approved,
            registered_at: at,
        }
    }

    #[test]
    fn high_risk_categories_are_mandatory_by_default_and_designations_add_more() {
        let karaoke = fac("fac_a", "karaoke", "1 Road", 1);
        let cinema = fac("fac_b", "cinema", "2 Road", 1);
        assert!(mandatory_because(&karaoke, &[], 100).is_some());
        assert!(mandatory_because(&cinema, &[], 100).is_none());
        let d = |target| Designation {
            id: "des_1".into(),
            target,
            region: "mapo".into(),
            created_at: 0,
            created_by: "x".into(),
        };
        let by_category = d(Target::Category {
            category: "cinema".into(),
        });
        assert!(mandatory_because(&cinema, &[by_category], 100).is_some());
        let event = d(Target::Event {
            facility_id: "fac_b".into(),
            name: "festival".into(),
            from: 50,
            to: 150,
        });
        assert!(mandatory_because(&cinema, std::slice::from_ref(&event), 100).is_some());
        assert!(mandatory_because(&cinema, &[event], 151).is_none());
        let mut elsewhere = d(Target::Facility {
            facility_id: "fac_b".into(),
        });
        elsewhere.region = "gangnam".into();
        assert!(mandatory_because(&cinema, &[elsewhere], 100).is_none());
    }

    #[test]
    fn addresses_compare_without_case_or_spacing() {
        assert_eq!(normalise_address(" 1  Wausan-RO "), "1 wausan-ro");
    }
}
