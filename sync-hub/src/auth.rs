//! The people who use the hub over HTTP: roles, credentials, and who may do what.
//!
//! Three roles (`Role`): the hub's **operators**, **local-government officers** (each bound
//! to one region, the `region` field of the facilities they administer) and the **health
//! authority**. Credentials are made with `sync-hub credential add`, which prints the secret
//! once; the hub keeps only a digest of its random part keyed with `keys/credential.key` and
//! bound to the row's id, role, region and name (`people-credentials-2` in `docs/storage.md`),
//! so a copy of `hub.redb` lets nobody in, and neither does a row written into it without the
//! key, nor an officer's row edited into an authority's. A credential is revoked, never
//! deleted, so the audit log's references to it stay meaningful; revoking re-keys its digest,
//! so clearing `revoked_at` in the database does not bring it back.
//!
//! Restoring a revoked row's old bytes would, so every revocation of a credential or a device
//! is also listed in the revocation list (`revocations-1`), a chain keyed with
//! `keys/credential.key` whose head (count and last link, MACed) is `keys/revocations.head`:
//! [`authenticate`] and [`check_device`] refuse what the list holds whatever its row says, and
//! refuse everything while the list does not verify (a row deleted, edited or added without
//! the key). A store made before the list gets it once, from the rows marked revoked.
//!
//! Rows made before the key existed (`people-credentials-1`, an unkeyed digest) are wrapped
//! once, when the store first opens with the key (`upgrade`): the keyed digest is taken over
//! the old digest, so their secrets keep working, and the row is marked `legacy`. Rows that
//! appear in `people-credentials-1` after that are never read.
//!
//! The operator token in `keys/operator.token` (what commands use while `run` holds the store)
//! is the **local operator**: whoever can read the hub's key folder already holds every key, so
//! it may do everything, including traces on the hub's own machine; every such act is audited
//! as `local-operator`. Remote operators get an `operator` credential, which runs the hub but
//! sees no visit.

use crate::keys::MacKey;
use crate::store::{Store, StoreError};
use rand_core::{OsRng, RngCore};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use shared::UnixSeconds;
use std::fmt;

/// `people-credentials-2`: credential id -> JSON [`CredentialRecord`] with a keyed digest.
pub const PEOPLE_CREDENTIALS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("people-credentials-2");
/// `people-credentials-1`: the unkeyed layout, read once by `upgrade`.
pub const PEOPLE_CREDENTIALS_V1: TableDefinition<&str, &[u8]> =
    TableDefinition::new("people-credentials-1");

/// Domain separation of the unkeyed digests of `people-credentials-1`.
const LEGACY_DIGEST_CONTEXT: &str = "kipass hub people credential v1";
/// The key of digests, derived from `keys/credential.key`.
const DIGEST_KEY_CONTEXT: &str = "kipass hub people credential digest v2";
/// The key that turns an active digest into a revoked one.
const REVOKED_KEY_CONTEXT: &str = "kipass hub people credential revoked v2";
/// The prefix of every credential secret, so a leaked one is recognisable in a scan.
const SECRET_PREFIX: &str = "kph1";
/// The principal id of the operator token in `keys/operator.token`.
pub const LOCAL_OPERATOR: &str = "local-operator";

/// What a person may do at the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the hub: statistics, metrics, the dashboard, retention. Sees no visit.
    Operator,
    /// A local-government officer: facility administration and compliance in one region.
    Officer,
    /// The health authority: traces and the shared-code report.
    Authority,
}

impl Role {
    /// The role as the CLI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Officer => "officer",
            Role::Authority => "authority",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "operator" => Ok(Role::Operator),
            "officer" | "local-government" | "local_government" => Ok(Role::Officer),
            "authority" | "health-authority" | "health_authority" => Ok(Role::Authority),
            _ => Err(AuthError::Invalid(format!(
                "unknown role {:?}: use operator, officer or authority",
                s.chars().take(40).collect::<String>()
            ))),
        }
    }
}

/// A credential as the hub keeps it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    /// `cred_` and 16 hex digits; also the first part of the secret.
    pub id: String,
    /// What it may do.
    pub role: Role,
    /// For officers: the region they administer.
    pub region: Option<String>,
    /// Whose it is (for the audit log).
    pub name: String,
    /// Hex of the keyed BLAKE3 digest of the row and the secret's random part (see
    /// `docs/storage.md`); re-keyed once more when revoked.
    pub digest: String,
    /// When it was made.
    pub created_at: UnixSeconds,
    /// When it was revoked; a revoked credential is refused everywhere.
    pub revoked_at: Option<UnixSeconds>,
    /// Made before credential digests were keyed: its digest wraps the old unkeyed one.
    #[serde(default)]
    pub legacy: bool,
}

/// Who is asking: a credential's holder, or the local operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The credential id, or [`LOCAL_OPERATOR`].
    pub id: String,
    /// Whose it is.
    pub name: String,
    /// The role.
    pub role: Role,
    /// For officers: their region.
    pub region: Option<String>,
    /// The holder of `keys/operator.token` (or a command on the hub's machine).
    pub local: bool,
}

impl Principal {
    /// The hub's own operator, on its machine.
    pub fn local_operator() -> Self {
        Principal {
            id: LOCAL_OPERATOR.to_owned(),
            name: "local operator".to_owned(),
            role: Role::Operator,
            region: None,
            local: true,
        }
    }

    /// Refuses unless the principal has one of `roles` (the local operator always may).
    pub fn require(&self, roles: &[Role]) -> Result<(), AuthError> {
        if self.local || roles.contains(&self.role) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "the {} role may not do this",
                self.role.as_str()
            )))
        }
    }

    /// Refuses an officer acting on a facility outside their region.
    pub fn require_region(&self, facility_region: &str) -> Result<(), AuthError> {
        match (&self.role, &self.region) {
            (Role::Officer, Some(r)) if !same_region(r, facility_region) => {
                Err(AuthError::Forbidden(format!(
                    "this officer administers region {r:?}, not {facility_region:?}"
                )))
            }
            (Role::Officer, None) if !self.local => Err(AuthError::Forbidden(
                "this officer credential has no region".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The region an officer is bound to; `None` for everyone else (who see every region).
    pub fn region_scope(&self) -> Option<&str> {
        match self.role {
            Role::Officer if !self.local => self.region.as_deref(),
            _ => None,
        }
    }
}

/// Whether two region names are the same jurisdiction (case and surrounding space ignored).
pub fn same_region(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

/// A credential was refused, or a credential operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing credential: send `Authorization: Bearer <credential>`")]
    Missing,
    /// The credential is not one the hub issued (or is malformed).
    #[error("unknown credential")]
    Unknown,
    /// The credential was revoked.
    #[error("this credential has been revoked")]
    Revoked,
    /// The credential is valid but may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A bad argument to a credential operation.
    #[error("{0}")]
    Invalid(String),
    /// The revocation list in `hub.redb` does not match `keys/revocations.head`: every
    /// credential and device is refused until it is repaired (fail closed).
    #[error(
        "the revocation list does not verify ({0}); every credential and device is refused \
         until it is repaired: restore hub.redb from a backup (see docs/storage.md)"
    )]
    RevocationList(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AuthError {
    /// The HTTP status for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Unknown | AuthError::Revoked => 401,
            AuthError::Forbidden(_) => 403,
            AuthError::Invalid(_) => 400,
            AuthError::Store(_) | AuthError::RevocationList(_) => 500,
        }
    }
}

impl From<redb::Error> for AuthError {
    fn from(e: redb::Error) -> Self {
        AuthError::Store(StoreError::Db(e))
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for AuthError {
            fn from(e: $t) -> Self {
                AuthError::Store(StoreError::Db(e.into()))
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

/// A secret shown once: `kph1.<id>.<64 hex>`. Its `Debug` hides it.
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

/// The unkeyed digest of `people-credentials-1`.
fn legacy_digest(random: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key(LEGACY_DIGEST_CONTEXT, random)
}

/// The digest an active row holds: keyed, over the fields that say who the holder is and what
/// they may do (length-prefixed, so no two rows share an encoding) and the legacy mark, then
/// `part`: the secret's random part, or for a legacy row its old unkeyed digest (all the hub
/// ever had of it).
fn row_digest(key: &MacKey, r: &CredentialRecord, part: &[u8; 32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(&key.derive(DIGEST_KEY_CONTEXT));
    let region = r.region.as_deref().unwrap_or("");
    for field in [r.id.as_str(), r.role.as_str(), region, r.name.as_str()] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    h.update(&[u8::from(r.legacy)]);
    h.update(part);
    h.finalize()
}

/// The active digest of row `r` for a secret with random part `random`.
fn active_digest(key: &MacKey, r: &CredentialRecord, random: &[u8; 32]) -> blake3::Hash {
    if r.legacy {
        row_digest(key, r, &legacy_digest(random))
    } else {
        row_digest(key, r, random)
    }
}

/// The digest of a revoked row: the active one, keyed again, so that clearing `revoked_at`
/// leaves a row whose digest matches no secret.
fn revoked_digest(key: &MacKey, active: &blake3::Hash) -> blake3::Hash {
    blake3::keyed_hash(&key.derive(REVOKED_KEY_CONTEXT), active.as_bytes())
}

/// The digest row `r` should hold for a secret with random part `random`.
fn expected_digest(key: &MacKey, r: &CredentialRecord, random: &[u8; 32]) -> blake3::Hash {
    let active = active_digest(key, r, random);
    if r.revoked_at.is_some() {
        revoked_digest(key, &active)
    } else {
        active
    }
}

fn clean_text(field: &str, value: &str, max: usize) -> Result<String, AuthError> {
    let v = value.trim();
    if v.is_empty() || v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(AuthError::Invalid(format!(
            "{field} must be 1 to {max} characters without control characters"
        )));
    }
    Ok(v.to_owned())
}

/// Makes a credential; returns it and its secret, which is never stored.
pub fn issue(
    store: &Store,
    role: Role,
    region: Option<&str>,
    name: &str,
    now: UnixSeconds,
) -> Result<(CredentialRecord, Secret), AuthError> {
    let name = clean_text("--name", name, 100)?;
    let region = match (role, region) {
        (Role::Officer, Some(r)) => Some(clean_text("--region", r, 60)?),
        (Role::Officer, None) => {
            return Err(AuthError::Invalid(
                "an officer credential needs --region (the region they administer)".into(),
            ));
        }
        (_, Some(_)) => {
            return Err(AuthError::Invalid(
                "--region is only for officer credentials".into(),
            ));
        }
        (_, None) => None,
    };
    let mut id_bytes = [0u8; 8];
    OsRng.fill_bytes(&mut id_bytes);
    let id = format!("cred_{}", hex::encode(id_bytes));
    let mut random = [0u8; 32];
    OsRng.fill_bytes(&mut random);
    let mut record = CredentialRecord {
        id: id.clone(),
        role,
        region,
        name,
        digest: String::new(),
        created_at: now,
        revoked_at: None,
        legacy: false,
    };
    record.digest = active_digest(store.credential_key(), &record, &random)
        .to_hex()
        .to_string();
    let txn = store.db().begin_write()?;
    txn.open_table(PEOPLE_CREDENTIALS)?
        .insert(id.as_str(), encode(&record).as_slice())?;
    txn.commit()?;
    Ok((
        record,
        Secret(format!("{SECRET_PREFIX}.{id}.{}", hex::encode(random))),
    ))
}

fn encode(r: &CredentialRecord) -> Vec<u8> {
    // A plain data type always serialises.
    serde_json::to_vec(r).unwrap_or_default()
}

fn decode(key: &str, v: &[u8]) -> Result<CredentialRecord, AuthError> {
    serde_json::from_slice(v).map_err(|e| {
        AuthError::Store(StoreError::Corrupt {
            table: "people-credentials-2",
            key: key.to_owned(),
            reason: e.to_string(),
        })
    })
}

fn stored_digest(r: &CredentialRecord) -> Result<blake3::Hash, AuthError> {
    blake3::Hash::from_hex(&r.digest).map_err(|_| {
        AuthError::Store(StoreError::Corrupt {
            table: "people-credentials-2",
            key: r.id.clone(),
            reason: "digest is not 64 hex digits".into(),
        })
    })
}

/// Whether any row of the keyed layout exists (then `keys/credential.key` must too).
pub(crate) fn has_keyed_rows(db: &redb::Database) -> Result<bool, StoreError> {
    let txn = db.begin_read()?;
    let t = txn.open_table(PEOPLE_CREDENTIALS)?;
    Ok(!t.is_empty()?)
}

/// Moves the rows of `people-credentials-1` into `people-credentials-2`, each marked `legacy`
/// with its unkeyed digest wrapped under the store's credential key (revoked rows in their
/// revoked form), and deletes the old table. Runs only while `keys/credential.key` is being
/// created ([`Store::open`], which audits the ids moved), so rows written into the old table
/// later are never trusted. Returns the ids it moved and the damaged ones it left.
pub(crate) fn upgrade(store: &Store) -> Result<Upgraded, AuthError> {
    let key = store.credential_key();
    let txn = store.db().begin_write()?;
    let mut moved = Vec::new();
    let mut damaged = Vec::new();
    {
        let old = txn.open_table(PEOPLE_CREDENTIALS_V1)?;
        let mut new = txn.open_table(PEOPLE_CREDENTIALS)?;
        for row in old.iter()? {
            let (k, v) = row?;
            let id = k.value().to_owned();
            let Ok(mut r) = serde_json::from_slice::<CredentialRecord>(v.value()) else {
                damaged.push(id);
                continue;
            };
            let Ok(old_digest) = blake3::Hash::from_hex(&r.digest) else {
                damaged.push(id);
                continue;
            };
            if r.id != id || new.get(id.as_str())?.is_some() {
                damaged.push(id);
                continue;
            }
            r.legacy = true;
            let active = row_digest(key, &r, old_digest.as_bytes());
            let digest = if r.revoked_at.is_some() {
                revoked_digest(key, &active)
            } else {
                active
            };
            r.digest = digest.to_hex().to_string();
            new.insert(id.as_str(), encode(&r).as_slice())?;
            moved.push(id);
        }
    }
    txn.delete_table(PEOPLE_CREDENTIALS_V1)?;
    txn.commit()?;
    Ok(Upgraded { moved, damaged })
}

/// What [`upgrade`] moved to the keyed layout, and the damaged rows it left behind.
pub(crate) struct Upgraded {
    /// Ids of the rows moved.
    pub moved: Vec<String>,
    /// Ids of damaged rows not moved.
    pub damaged: Vec<String>,
}

/// Creates the people credentials' table (called by [`crate::schema`] when the store opens).
pub(crate) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(PEOPLE_CREDENTIALS)?;
    Ok(())
}

/// Every credential, by id.
pub fn list(store: &Store) -> Result<Vec<CredentialRecord>, AuthError> {
    let txn = store.db().begin_read()?;
    let t = txn.open_table(PEOPLE_CREDENTIALS)?;
    let mut out = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        out.push(decode(k.value(), v.value())?);
    }
    Ok(out)
}

/// Revokes a credential (idempotent); returns it. The credential is listed in the revocation
/// list ([`revocations`]) in the same transaction as its row changes, so restoring the row's
/// old bytes does not bring it back.
pub fn revoke(store: &Store, id: &str, now: UnixSeconds) -> Result<CredentialRecord, AuthError> {
    let mut list = revocations(store)?;
    let txn = store.db().begin_write()?;
    let record = {
        let mut t = txn.open_table(PEOPLE_CREDENTIALS)?;
        let mut record = match t.get(id)? {
            Some(v) => decode(id, v.value())?,
            None => {
                return Err(AuthError::Invalid(format!(
                    "no credential {:?}: see `sync-hub credential list`",
                    id.chars().take(40).collect::<String>()
                )));
            }
        };
        if record.revoked_at.is_none() {
            let active = stored_digest(&record)?;
            record.digest = revoked_digest(store.credential_key(), &active)
                .to_hex()
                .to_string();
            record.revoked_at = Some(now);
            t.insert(id, encode(&record).as_slice())?;
        }
        record
    };
    let listed = {
        let mut t = txn.open_table(REVOCATIONS)?;
        push_revocations(
            store.credential_key(),
            &mut t,
            &mut list,
            [(Revoked::Credential, record.id.clone())],
            now,
        )?
    };
    txn.commit()?;
    if listed {
        write_revocations_head(store, list.count, &list.last)?;
    }
    Ok(record)
}

/// Who the `Authorization` header's bearer credential belongs to.
///
/// `operator_token` is the local operator's token. Comparisons are of BLAKE3 digests
/// (`blake3::Hash` compares in constant time), so timing reveals nothing of a secret. A row's
/// digest is keyed with `keys/credential.key` and bound to the row, so only rows the hub wrote
/// authenticate, with the role, region and name it wrote.
pub fn authenticate(
    store: &Store,
    bearer: Option<&str>,
    operator_token: &str,
) -> Result<Principal, AuthError> {
    let given = bearer.map(str::trim).filter(|b| !b.is_empty());
    let Some(given) = given else {
        return Err(AuthError::Missing);
    };
    if !operator_token.is_empty()
        && blake3::hash(given.as_bytes()) == blake3::hash(operator_token.as_bytes())
    {
        return Ok(Principal::local_operator());
    }
    let mut parts = given.splitn(3, '.');
    let (Some(SECRET_PREFIX), Some(id), Some(random_hex)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Unknown);
    };
    let mut random = [0u8; 32];
    if id.len() > 40 || hex::decode_to_slice(random_hex, &mut random).is_err() {
        return Err(AuthError::Unknown);
    }
    let txn = store.db().begin_read()?;
    let t = txn.open_table(PEOPLE_CREDENTIALS)?;
    let record = match t.get(id)? {
        Some(v) => decode(id, v.value())?,
        None => return Err(AuthError::Unknown),
    };
    if record.id != id {
        return Err(AuthError::Unknown);
    }
    let stored = stored_digest(&record)?;
    if expected_digest(store.credential_key(), &record, &random) != stored {
        return Err(AuthError::Unknown);
    }
    if record.revoked_at.is_some() {
        return Err(AuthError::Revoked);
    }
    drop(t);
    drop(txn);
    // The row may be an old copy restored over its revoked form: the list, keyed with
    // `keys/credential.key` and vouched for by `keys/revocations.head`, decides.
    if revocations(store)?.contains(Revoked::Credential, &record.id) {
        return Err(AuthError::Revoked);
    }
    Ok(Principal {
        id: record.id,
        name: record.name,
        role: record.role,
        region: record.region,
        local: false,
    })
}

// ---------------------------------------------------------------------------------------------
// The revocation list.

/// `revocations-1`: sequence number (from 0) -> JSON [`Revocation`]: every device and
/// credential ever revoked, as a chain keyed with `keys/credential.key`. Append-only.
pub const REVOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("revocations-1");
/// The key of the list's links, derived from `keys/credential.key`.
const REVOCATION_LINK_CONTEXT: &str = "kipass hub revocation link v1";
/// The key of `keys/revocations.head`'s MAC.
const REVOCATION_HEAD_CONTEXT: &str = "kipass hub revocation head v1";
/// The first word of `keys/revocations.head`.
const REVOCATION_HEAD_MAGIC: &str = "kipass-revocations-1";
/// The `prev` of the first revocation.
const REVOCATION_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a revocation revokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revoked {
    /// An enrolled device (`devices-1`): refused at every sync.
    Device,
    /// A people's credential (`people-credentials-2`): refused at every request.
    Credential,
}

/// One row of `revocations-1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Position in the list, from 0.
    pub seq: u64,
    /// A device or a credential.
    pub kind: Revoked,
    /// The device id or credential id.
    pub id: String,
    /// When it was revoked (or, for a revocation moved from the old tables, listed).
    pub at: UnixSeconds,
    /// The link of the row before (64 zeros for the first).
    pub prev: String,
    /// This row's keyed link over `prev` and the fields above (hex).
    pub link: String,
}

/// The revocation list as verified against `keys/revocations.head`.
#[derive(Debug, Default)]
pub struct RevocationList {
    revoked: std::collections::HashSet<(Revoked, String)>,
    /// When each revoked device was listed.
    device_at: std::collections::HashMap<String, UnixSeconds>,
    count: u64,
    last: String,
}

impl RevocationList {
    /// Whether `id` of `kind` was revoked.
    pub fn contains(&self, kind: Revoked, id: &str) -> bool {
        self.revoked.contains(&(kind, id.to_owned()))
    }

    /// When device `id` was revoked, if it was.
    pub fn device_revoked_at(&self, id: &str) -> Option<UnixSeconds> {
        self.device_at.get(id).copied()
    }

    /// How many revocations the list holds.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

fn revocation_link(key: &MacKey, r: &Revocation) -> String {
    let mut h = blake3::Hasher::new_keyed(&key.derive(REVOCATION_LINK_CONTEXT));
    h.update(r.prev.as_bytes());
    let kind = match r.kind {
        Revoked::Device => "device",
        Revoked::Credential => "credential",
    };
    for field in [kind, r.id.as_str()] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    h.update(&r.seq.to_le_bytes());
    h.update(&r.at.to_le_bytes());
    h.finalize().to_hex().to_string()
}

fn revocations_head_path(store: &Store) -> std::path::PathBuf {
    store.dir().join("keys").join("revocations.head")
}

fn head_mac(key: &MacKey, count: u64, last: &str) -> blake3::Hash {
    blake3::keyed_hash(
        &key.derive(REVOCATION_HEAD_CONTEXT),
        format!("{count} {last}").as_bytes(),
    )
}

fn broken(why: String) -> AuthError {
    AuthError::RevocationList(why)
}

/// `keys/revocations.head`: `None` if absent, else the count and last link it vouches for.
fn read_revocations_head(store: &Store) -> Result<Option<(u64, String)>, AuthError> {
    let path = revocations_head_path(store);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(broken(format!("cannot read {}: {e}", path.display()))),
    };
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [REVOCATION_HEAD_MAGIC, count, last, mac] = parts.as_slice() else {
        return Err(broken(format!("{} is damaged", path.display())));
    };
    let count: u64 = count
        .parse()
        .map_err(|_| broken(format!("{} is damaged", path.display())))?;
    match blake3::Hash::from_hex(mac) {
        // `blake3::Hash` compares in constant time.
        Ok(m) if m == head_mac(store.credential_key(), count, last) => {
            Ok(Some((count, (*last).to_owned())))
        }
        _ => Err(broken(format!(
            "{} was not written with the hub's credential key (its MAC does not match)",
            path.display()
        ))),
    }
}

fn write_revocations_head(store: &Store, count: u64, last: &str) -> Result<(), AuthError> {
    let path = revocations_head_path(store);
    let err = |e: std::io::Error| broken(format!("cannot write {}: {e}", path.display()));
    let mac = head_mac(store.credential_key(), count, last).to_hex();
    let text = format!("{REVOCATION_HEAD_MAGIC} {count} {last} {mac}\n");
    let tmp = path.with_extension("head.tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(err)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

/// Walks `revocations-1`: consecutive keys, each row's `prev` the link before it, each link
/// keyed with the hub's credential key.
fn walk(
    key: &MacKey,
    t: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<RevocationList, AuthError> {
    let mut list = RevocationList {
        last: REVOCATION_GENESIS.to_owned(),
        ..RevocationList::default()
    };
    for row in t.iter()? {
        let (k, v) = row?;
        let seq = k.value();
        let r: Revocation = serde_json::from_slice(v.value())
            .map_err(|e| broken(format!("row {seq} does not parse ({e})")))?;
        if seq != list.count || r.seq != seq {
            return Err(broken(format!(
                "row {} is missing (the next row is {seq}): revocations were deleted",
                list.count
            )));
        }
        if r.prev != list.last || revocation_link(key, &r) != r.link {
            return Err(broken(format!(
                "row {seq} was edited, or written without the hub's credential key"
            )));
        }
        if r.kind == Revoked::Device {
            list.device_at.insert(r.id.clone(), r.at);
        }
        list.revoked.insert((r.kind, r.id));
        list.last = r.link;
        list.count += 1;
    }
    Ok(list)
}

/// Appends revocations of `items` that `list` does not hold yet to the open table; returns
/// whether it appended any.
fn push_revocations(
    key: &MacKey,
    t: &mut redb::Table<'_, u64, &'static [u8]>,
    list: &mut RevocationList,
    items: impl IntoIterator<Item = (Revoked, String)>,
    at: UnixSeconds,
) -> Result<bool, AuthError> {
    let mut any = false;
    for (kind, id) in items {
        if list.contains(kind, &id) {
            continue;
        }
        let mut r = Revocation {
            seq: list.count,
            kind,
            id,
            at,
            prev: list.last.clone(),
            link: String::new(),
        };
        r.link = revocation_link(key, &r);
        // A plain data type always serialises.
        t.insert(r.seq, serde_json::to_vec(&r).unwrap_or_default().as_slice())?;
        if r.kind == Revoked::Device {
            list.device_at.insert(r.id.clone(), r.at);
        }
        list.revoked.insert((r.kind, r.id));
        list.last = r.link;
        list.count += 1;
        any = true;
    }
    Ok(any)
}

/// Every device and credential the registry marks revoked (what a store made before the list
/// existed holds; moved into the list once).
fn revoked_in_tables(txn: &redb::WriteTransaction) -> Result<Vec<(Revoked, String)>, AuthError> {
    let mut out = Vec::new();
    for row in txn.open_table(crate::registry::DEVICES)?.iter()? {
        let (k, v) = row?;
        let d: crate::registry::DeviceRecord =
            serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                table: "devices-1",
                key: k.value().to_owned(),
                reason: e.to_string(),
            })?;
        if d.revoked {
            out.push((Revoked::Device, d.id.to_string()));
        }
    }
    for row in txn.open_table(PEOPLE_CREDENTIALS)?.iter()? {
        let (k, v) = row?;
        let r = decode(k.value(), v.value())?;
        if r.revoked_at.is_some() {
            out.push((Revoked::Credential, r.id));
        }
    }
    Ok(out)
}

/// The revocation list, verified against `keys/revocations.head`; fails closed
/// ([`AuthError::RevocationList`]) if a row was deleted, edited or added without the key, so
/// that nobody who can only write `hub.redb` re-admits a revoked device or credential.
///
/// A store without the head file (made before the list existed) gets its list here, once: every
/// device and credential its tables mark revoked is listed, and the head written. Rows past the
/// head's count (a revocation that committed before its head was written) are accepted, since
/// only the key's holder can link them, and the head is brought up to date.
pub fn revocations(store: &Store) -> Result<RevocationList, AuthError> {
    let key = store.credential_key();
    let head = read_revocations_head(store)?;
    let list = {
        let txn = store.db().begin_read()?;
        match txn.open_table(REVOCATIONS) {
            Ok(t) => walk(key, &t)?,
            Err(redb::TableError::TableDoesNotExist(_)) => RevocationList {
                last: REVOCATION_GENESIS.to_owned(),
                ..RevocationList::default()
            },
            Err(e) => return Err(e.into()),
        }
    };
    match head {
        Some((count, last)) => {
            if list.count < count {
                return Err(broken(format!(
                    "keys/revocations.head vouches for {count} revocations, hub.redb holds {}: \
                     revocations were deleted",
                    list.count
                )));
            }
            let at_head = if count == list.count {
                Some(list.last.clone())
            } else {
                // Re-walk to find the link at the head's count.
                let txn = store.db().begin_read()?;
                let t = txn.open_table(REVOCATIONS)?;
                match count.checked_sub(1) {
                    None => Some(REVOCATION_GENESIS.to_owned()),
                    Some(i) => match t.get(i)? {
                        Some(v) => serde_json::from_slice::<Revocation>(v.value())
                            .ok()
                            .map(|r| r.link),
                        None => None,
                    },
                }
            };
            if at_head.as_deref() != Some(last.as_str()) {
                return Err(broken(
                    "the list in hub.redb is not the one keys/revocations.head vouches for: \
                     it was rewritten"
                        .into(),
                ));
            }
            if list.count > count {
                write_revocations_head(store, list.count, &list.last)?;
            }
            Ok(list)
        }
        None => {
            let txn = store.db().begin_write()?;
            let list = {
                let mut t = txn.open_table(REVOCATIONS)?;
                let mut list = walk(key, &t)?;
                let found = revoked_in_tables(&txn)?;
                push_revocations(key, &mut t, &mut list, found, crate::clock::now())?;
                list
            };
            txn.commit()?;
            write_revocations_head(store, list.count, &list.last)?;
            Ok(list)
        }
    }
}

/// Lists `items` as revoked (idempotent) in their own transaction, and writes the head.
/// Refuses while the list does not verify ([`revocations`]).
pub fn list_revoked(
    store: &Store,
    items: impl IntoIterator<Item = (Revoked, String)>,
    at: UnixSeconds,
) -> Result<(), AuthError> {
    revocations(store)?;
    let key = store.credential_key();
    let txn = store.db().begin_write()?;
    let (any, list) = {
        let mut t = txn.open_table(REVOCATIONS)?;
        let mut list = walk(key, &t)?;
        let any = push_revocations(key, &mut t, &mut list, items, at)?;
        (any, list)
    };
    txn.commit()?;
    if any {
        store.kept_reads_changed();
        write_revocations_head(store, list.count, &list.last)?;
    }
    Ok(())
}

/// Admission of a device by the revocation list as well as its row: refused if its row says
/// revoked or the list holds it (a row restored to its pre-revocation bytes), and refused
/// whatever the row says if the list does not verify. A row that says revoked but is not
/// listed yet is listed now.
pub fn check_device(
    store: &Store,
    device: &crate::registry::DeviceRecord,
) -> Result<(), AuthError> {
    let list = revocations(store)?;
    let id = device.id.to_string();
    if device.revoked {
        if !list.contains(Revoked::Device, &id) {
            list_revoked(store, [(Revoked::Device, id)], crate::clock::now())?;
        }
        return Err(AuthError::Revoked);
    }
    if list.contains(Revoked::Device, &id) {
        return Err(AuthError::Revoked);
    }
    Ok(())
}

/// The hub-signed revocation list of `facility` for a device's refresh, when the device's
/// hello says it holds `have` (`shared::revocation::hub_sends`): its devices that the keyed
/// list (`list`) or their row names revoked, signed with the hub's endpoint key (the
/// ticket's `hub.endpoint_id` is its public half). `None` when the device holds the current
/// list, or the facility has no revoked device.
pub fn refresh_revocations(
    hub: &crate::registry::Hub,
    list: &RevocationList,
    facility: &shared::FacilityId,
    have: Option<(u32, u32)>,
    now: UnixSeconds,
) -> Result<Option<shared::revocation::SignedRevocations>, crate::registry::HubError> {
    let mut devices: Vec<shared::revocation::RevokedDevice> = hub
        .store()
        .devices()?
        .into_iter()
        .filter(|d| &d.facility == facility)
        .filter_map(|d| {
            let id = d.id.to_string();
            let at = list
                .device_revoked_at(&id)
                .or(d.revoked.then_some(d.enrolled_at))?;
            Some(shared::revocation::RevokedDevice {
                device_id: d.id,
                endpoint_id: d.endpoint_id,
                revoked_at: at,
            })
        })
        .take(shared::revocation::MAX_REVOKED_DEVICES)
        .collect();
    devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    let version = u32::try_from(devices.len()).unwrap_or(u32::MAX);
    if !shared::revocation::hub_sends(version, have, now) {
        return Ok(None);
    }
    let secret = hub.keys().endpoint_secret()?;
    let signed = shared::revocation::RevocationList {
        facility: facility.clone(),
        version,
        issued_at: now,
        devices,
    }
    .sign(&secret.to_bytes());
    Ok(Some(signed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let s = Store::open(&tmp.path().join("hub.redb")).unwrap_or_else(|e| panic!("open: {e}"));
        (tmp, s)
    }

    #[test]
    fn issued_credentials_authenticate_until_revoked() {
        let (_t, s) = store();
        let (rec, secret) = issue(&s, Role::Officer, Some(" Seoul "), "kim", 10)
            .unwrap_or_else(|e| panic!("issue: {e}"));
        assert_eq!(rec.region.as_deref(), Some("Seoul"));
        let who = authenticate(&s, Some(&secret.0), "op").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((who.role, who.name.as_str()), (Role::Officer, "kim"));
        // The secret is nowhere in the stored record.
        let stored = encode(&list(&s).unwrap_or_default()[0]);
        assert!(!String::from_utf8_lossy(&stored).contains(&secret.0[40..]));
        // One flipped digit: unknown.
        let mut wrong = secret.0.clone();
        let last = if wrong.ends_with('0') { "1" } else { "0" };
        wrong.replace_range(wrong.len() - 1.., last);
        assert!(matches!(
            authenticate(&s, Some(&wrong), "op"),
            Err(AuthError::Unknown)
        ));
        revoke(&s, &rec.id, 20).unwrap_or_else(|e| panic!("revoke: {e}"));
        assert!(matches!(
            authenticate(&s, Some(&secret.0), "op"),
            Err(AuthError::Revoked)
        ));
        assert!(matches!(
            authenticate(&s, None, "op"),
            Err(AuthError::Missing)
        ));
        assert!(authenticate(&s, Some("op"), "op").is_ok_and(|p| p.local));
        assert!(matches!(
            authenticate(&s, Some("kph1.x.zz"), "op"),
            Err(AuthError::Unknown)
        ));
    }

    #[test]
    fn officers_need_a_region_and_stay_in_it() {
        let (_t, s) = store();
        assert!(issue(&s, Role::Officer, None, "kim", 1).is_err());
        assert!(issue(&s, Role::Authority, Some("x"), "kdca", 1).is_err());
        let (_, secret) =
            issue(&s, Role::Officer, Some("mapo"), "kim", 1).unwrap_or_else(|e| panic!("{e}"));
        let who = authenticate(&s, Some(&secret.0), "").unwrap_or_else(|e| panic!("{e}"));
        assert!(who.require_region("MAPO").is_ok());
        assert_eq!(
            who.require_region("gangnam").map_err(|e| e.status()),
            Err(403)
        );
        assert_eq!(
            who.require(&[Role::Authority]).map_err(|e| e.status()),
            Err(403)
        );
    }
}
