//! The region's second hub: pairing, and the registry both hubs hold, replicated.
//!
//! Two hubs of one region each keep their own day-key ratchet (no secret ever moves between
//! them); what they share is the registry (facilities, devices with their endpoint bindings
//! and revocations, unused enrollment credentials, designations, trusted issuers) and the
//! partitions (synced per facility by the sync protocol itself, `Peer::HubLink`). This module
//! is the registry's part, pure over the store: the entities a hub holds ([`snapshot`]), their
//! 256 bucket digests ([`buckets`]) so that two hubs whose registries agree exchange 8 KiB and
//! nothing else, and the merge of the peer's entities into this hub's tables ([`apply`]).
//!
//! **How conflicts resolve** (every rule is commutative, associative and idempotent, so the
//! two hubs converge whatever the order of their exchanges):
//! - A removal wins: a facility or designation with a tombstone (`tombstones-1`) at either hub
//!   is removed at both; a removed facility's devices are revoked.
//! - A revocation wins: a device revoked at either hub is revoked at both (and put on each
//!   hub's own keyed revocation list).
//! - A device's endpoint binding: the first binding is kept; two different endpoints bound
//!   to one device (its ticket used twice, once at each hub, before they synced) revoke it:
//!   the operator enrolls it again. Unused credentials of a bound device are burnt.
//! - A facility's approval: approved wins over pending. Its registration never changes after
//!   it is made; should two copies differ, the one whose JSON sorts last is kept at both.
//! - A device's last contact, clock offset and addresses: the most recent contact's.
//! - Issuer keys: the union (an issuer key with the same issuer and key id but other bytes:
//!   the one whose JSON sorts last).
//!
//! People's credentials are not replicated: each hub stores them as digests keyed with its own
//! `keys/credential.key`, and copying one would mean copying its secret. An authority or
//! officer holds one credential per hub (`sync-hub credential issue` at each).
//!
//! Every change applied from the peer is appended to this hub's audit chain
//! (`registry.replicated`), so each hub's chain stays verifiable on its own.

use crate::audit::Event;
use crate::auth::{Principal, Revoked};
use crate::gov::Designation;
use crate::registry::{DeviceRecord, Hub, HubError};
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use shared::facility::{Facility, FacilityStatus};
use shared::ids::{DeviceId, FacilityId};
use shared::time::UnixSeconds;
use shared::token::Keyring;
use std::collections::BTreeMap;

/// The hub link's protocol: the registry exchange between the two hubs of a region
/// (`crate::link`). Partitions travel by the sync protocol (`shared::sync::ALPN`,
/// `Peer::HubLink`).
pub const ALPN_LINK: &[u8] = b"kipass/hub-link/1";

/// The `kind` of a pairing file.
pub const PAIRING_KIND: &str = "kipass-hub-pairing";
/// How many registry buckets a link hello digests.
pub const BUCKETS: usize = 256;
/// The most entities one link message carries; more travel in the next rounds.
pub const MAX_ENTITIES_PER_MESSAGE: usize = 20_000;
/// The most device contacts one link message carries.
pub const MAX_CONTACTS_PER_MESSAGE: usize = 100_000;
/// Day public keys a hub announces to its peer (the peer hands them to devices).
pub const PEER_DAY_KEYS: usize = 400;

/// What a hub hands the operator of the other hub of its region to pair them: no secret (the
/// endpoint id is public; iroh authenticates it on every connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingFile {
    /// Always [`PAIRING_KIND`].
    pub kind: String,
    /// The hub's iroh endpoint id (hex).
    pub endpoint_id: String,
    /// Where it can be reached (`IP:PORT` or `NAME:PORT`).
    pub addrs: Vec<String>,
    /// The region it serves.
    pub region: String,
    /// The health authority's age recipient it seals paper entries to (a second hub of the
    /// region takes the same).
    pub authority_recipient: String,
}

impl PairingFile {
    /// Parses and checks a pairing file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<PairingFile, HubError> {
        if bytes.len() > 64 * 1024 {
            return Err(HubError::Invalid(
                "the pairing file is larger than any real one: is this the right file?".into(),
            ));
        }
        let p: PairingFile = serde_json::from_slice(bytes).map_err(|e| {
            HubError::Invalid(format!(
                "not a hub pairing file ({e}): write one with `sync-hub peer show --out FILE` on the other hub"
            ))
        })?;
        if p.kind != PAIRING_KIND {
            return Err(HubError::Invalid(format!(
                "this file is a {:?}, not a hub pairing file",
                p.kind.chars().take(60).collect::<String>()
            )));
        }
        check_endpoint(&p.endpoint_id)?;
        shared::hub_addr::parse_list(&p.addrs)
            .map_err(|e| HubError::Invalid(format!("the pairing file's addresses: {e}")))?;
        if p.authority_recipient
            .parse::<age::x25519::Recipient>()
            .is_err()
        {
            return Err(HubError::Invalid(
                "the pairing file's health authority key is not an age recipient".into(),
            ));
        }
        if p.region.trim().is_empty() || p.region.chars().count() > 100 {
            return Err(HubError::Invalid("the pairing file names no region".into()));
        }
        Ok(p)
    }
}

fn check_endpoint(hex_id: &str) -> Result<(), HubError> {
    if hex_id.len() != 64 || hex::decode(hex_id).is_err() {
        return Err(HubError::Invalid(
            "a hub endpoint id is 64 hex characters".into(),
        ));
    }
    Ok(())
}

pub use crate::registry::{PEER_CONFIG, PeerConfig, peer};

/// Pairs this hub with the one `file` describes (replacing an earlier pairing: a rebuilt
/// peer has a new endpoint id). Audited.
pub fn pair(hub: &Hub, file: &PairingFile, now: UnixSeconds) -> Result<PeerConfig, HubError> {
    if file.endpoint_id == hub.config().endpoint_id {
        return Err(HubError::Invalid(
            "this is this hub's own pairing file: give it the OTHER hub's".into(),
        ));
    }
    if file.authority_recipient != hub.config().authority_recipient {
        return Err(HubError::Invalid(
            "the other hub seals paper entries to another health authority key: both hubs of a \
             region must use one (`sync-hub init --peer` takes it from the pairing file)"
                .into(),
        ));
    }
    if !crate::auth::same_region(&file.region, &hub.config().region) {
        return Err(HubError::Invalid(format!(
            "the other hub serves region {:?}, this one {:?}: only the two hubs of one region pair",
            file.region,
            hub.config().region
        )));
    }
    let old = peer(hub.store())?;
    let cfg = PeerConfig {
        endpoint_id: file.endpoint_id.clone(),
        addrs: file.addrs.clone(),
        region: hub.config().region.clone(),
        paired_at: now,
        day_keys: Vec::new(),
        last_link: None,
        rebuilt_at: None,
        oldest_day: None,
    };
    hub.store().set_config(PEER_CONFIG, &cfg)?;
    hub.audit()
        .append(
            &Principal::local_operator(),
            Event::new(
                "hub.pair",
                serde_json::json!({
                    "peer": cfg.endpoint_id,
                    "addrs": cfg.addrs,
                    "replaces": old.map(|o| o.endpoint_id),
                }),
            ),
            now,
        )
        .map_err(|e| HubError::Invalid(format!("cannot audit the pairing: {e}")))?;
    Ok(cfg)
}

/// This hub's pairing file.
pub fn pairing_file(hub: &Hub) -> PairingFile {
    PairingFile {
        kind: PAIRING_KIND.to_owned(),
        endpoint_id: hub.config().endpoint_id.clone(),
        addrs: hub.advertised(),
        region: hub.config().region.clone(),
        authority_recipient: hub.config().authority_recipient.clone(),
    }
}

/// One registry entity as hubs exchange it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entity {
    /// A registered facility.
    Facility {
        /// Its row.
        facility: Facility,
    },
    /// A device (its volatile contact fields travel too; the digest leaves them out).
    Device {
        /// Its row.
        device: DeviceRecord,
    },
    /// An unused enrollment credential (its digest, never the credential).
    Credential {
        /// Hex of the credential digest.
        digest: String,
        /// The device it enrolls.
        device: DeviceId,
    },
    /// A designation.
    Designation {
        /// Its row.
        designation: Designation,
    },
    /// A removal (`f/<id>` or `g/<id>`).
    Tombstone {
        /// What was removed.
        key: String,
        /// When.
        at: UnixSeconds,
    },
    /// The trusted issuer keys.
    Issuers {
        /// The keyring.
        keyring: Keyring,
    },
}

impl Entity {
    /// The entity's key: which bucket it falls in, and what it merges with.
    pub fn key(&self) -> String {
        match self {
            Entity::Facility { facility } => format!("f/{}", facility.id),
            Entity::Device { device } => format!("d/{}", device.id),
            Entity::Credential { digest, .. } => format!("c/{digest}"),
            Entity::Designation { designation } => format!("g/{}", designation.id),
            Entity::Tombstone { key, .. } => format!("x/{key}"),
            Entity::Issuers { .. } => "i".to_owned(),
        }
    }

    /// The bytes the digest covers: the entity without a device's contact fields (they
    /// change at every sync and travel as contacts instead).
    fn digest_bytes(&self) -> Vec<u8> {
        match self {
            Entity::Device { device } => {
                let stable = DeviceRecord {
                    last_sync: None,
                    clock_offset: None,
                    addrs: Vec::new(),
                    ..device.clone()
                };
                serde_json::to_vec(&Entity::Device { device: stable }).unwrap_or_default()
            }
            other => serde_json::to_vec(other).unwrap_or_default(),
        }
    }
}

/// The bucket of an entity key.
pub fn bucket_of(key: &str) -> usize {
    usize::from(blake3::hash(key.as_bytes()).as_bytes()[0])
}

/// Every entity this hub holds, sorted by key.
pub fn snapshot(store: &Store, keyring: &Keyring) -> Result<Vec<Entity>, StoreError> {
    let mut out = Vec::new();
    for facility in store.facilities()? {
        out.push(Entity::Facility { facility });
    }
    for device in store.devices()? {
        out.push(Entity::Device { device });
    }
    for (digest, device) in store.credentials()? {
        out.push(Entity::Credential {
            digest: hex::encode(digest),
            device,
        });
    }
    for designation in crate::gov::designations(store, None).map_err(|e| match e {
        crate::gov::GovError::Store(s) => s,
        other => StoreError::Corrupt {
            table: "designations-1",
            key: String::new(),
            reason: other.to_string(),
        },
    })? {
        out.push(Entity::Designation { designation });
    }
    for (key, at) in store.tombstones()? {
        out.push(Entity::Tombstone { key, at });
    }
    if !keyring.is_empty() {
        out.push(Entity::Issuers {
            keyring: keyring.clone(),
        });
    }
    out.sort_by_key(Entity::key);
    Ok(out)
}

/// The 256 bucket digests of `entities` (16 bytes each, hex in the link's JSON).
pub fn buckets(entities: &[Entity]) -> Vec<String> {
    let mut hashers: Vec<blake3::Hasher> = (0..BUCKETS).map(|_| blake3::Hasher::new()).collect();
    let mut sorted: Vec<(String, Vec<u8>)> = entities
        .iter()
        .map(|e| (e.key(), e.digest_bytes()))
        .collect();
    sorted.sort();
    for (key, bytes) in sorted {
        let h = &mut hashers[bucket_of(&key)];
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    hashers
        .into_iter()
        .map(|h| hex::encode(&h.finalize().as_bytes()[..16]))
        .collect()
}

/// The buckets whose digests differ between `ours` and `theirs` (all of them when
/// `theirs` is not a list of [`BUCKETS`]).
pub fn differing(ours: &[String], theirs: &[String]) -> Vec<usize> {
    if theirs.len() != BUCKETS || ours.len() != BUCKETS {
        return (0..BUCKETS).collect();
    }
    (0..BUCKETS).filter(|&i| ours[i] != theirs[i]).collect()
}

/// The entities of `entities` in `buckets`, whole buckets at a time up to `cap` entities,
/// beginning at bucket `start` and going round: when more differ than one message carries,
/// the next exchange (another `start`) carries others, so every bucket travels within a few
/// rounds. A single bucket larger than `cap` travels alone, cut at `cap`. Within the message
/// tombstones come first, then facilities, then devices, then the rest: each after what it
/// refers to.
pub fn in_buckets_from(
    entities: &[Entity],
    buckets: &[usize],
    cap: usize,
    start: usize,
) -> Vec<Entity> {
    let mut by_bucket: BTreeMap<usize, Vec<&Entity>> = BTreeMap::new();
    let wanted: std::collections::BTreeSet<usize> = buckets.iter().copied().collect();
    for e in entities {
        let b = bucket_of(&e.key());
        if wanted.contains(&b) {
            by_bucket.entry(b).or_default().push(e);
        }
    }
    let mut out: Vec<Entity> = Vec::new();
    let order = (0..BUCKETS).map(|i| (start + i) % BUCKETS);
    for b in order {
        let Some(these) = by_bucket.get(&b) else {
            continue;
        };
        if !out.is_empty() && out.len() + these.len() > cap {
            continue;
        }
        out.extend(these.iter().take(cap).map(|e| (*e).clone()));
        if out.len() >= cap {
            break;
        }
    }
    out.sort_by_key(|e| (apply_rank(e), e.key()));
    out
}

/// [`in_buckets_from`] with [`MAX_ENTITIES_PER_MESSAGE`] from a random bucket.
pub fn in_buckets(entities: &[Entity], buckets: &[usize]) -> Vec<Entity> {
    let start = usize::from(rand_core::RngCore::next_u32(&mut rand_core::OsRng) as u8);
    in_buckets_from(entities, buckets, MAX_ENTITIES_PER_MESSAGE, start)
}

/// The order [`apply`] takes entities in: each after what it refers to.
fn apply_rank(e: &Entity) -> u8 {
    match e {
        Entity::Tombstone { .. } => 0,
        Entity::Facility { .. } => 1,
        Entity::Device { .. } => 2,
        _ => 3,
    }
}

/// A device's last contact with a hub, as the peer hub learns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The device.
    pub device: DeviceId,
    /// When its last completed session at the sending hub ended.
    pub last_sync: UnixSeconds,
    /// Its clock offset then.
    pub clock_offset: Option<i64>,
    /// Where it connected from.
    #[serde(default)]
    pub addrs: Vec<String>,
}

/// Contacts of devices that synced at this hub since `since`.
pub fn contacts_since(store: &Store, since: UnixSeconds) -> Result<Vec<Contact>, StoreError> {
    Ok(store
        .devices()?
        .into_iter()
        .filter_map(|d| {
            let last = d.last_sync?;
            (last >= since).then_some(Contact {
                device: d.id,
                last_sync: last,
                clock_offset: d.clock_offset,
                addrs: d.addrs,
            })
        })
        .take(MAX_CONTACTS_PER_MESSAGE)
        .collect())
}

/// What [`apply`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// Entity keys changed here.
    pub changed: Vec<String>,
    /// Devices revoked here because of the peer (a revocation there, a removed facility,
    /// or two endpoints bound to one ticket).
    pub revoked: Vec<String>,
    /// Device contacts that moved forward.
    pub contacts: u64,
}

fn merge_facility(ours: &Facility, theirs: &Facility) -> Facility {
    let status =
        if ours.status == FacilityStatus::Approved || theirs.status == FacilityStatus::Approved {
            FacilityStatus::Approved
        } else {
            FacilityStatus::Pending
        };
    let a = Facility {
        status,
        ..ours.clone()
    };
    let b = Facility {
        status,
        ..theirs.clone()
    };
    let (ja, jb) = (
        serde_json::to_vec(&a).unwrap_or_default(),
        serde_json::to_vec(&b).unwrap_or_default(),
    );
    if jb > ja { b } else { a }
}

/// The merge of two copies of one device; `true` if the copies' endpoint bindings disagree.
fn merge_device(ours: &DeviceRecord, theirs: &DeviceRecord) -> (DeviceRecord, bool) {
    let (endpoint_id, conflict) = match (&ours.endpoint_id, &theirs.endpoint_id) {
        (Some(a), Some(b)) if a != b => (Some(a.min(b).clone()), true),
        (Some(a), _) => (Some(a.clone()), false),
        (None, b) => (b.clone(), false),
    };
    let newer = if theirs.last_sync > ours.last_sync {
        theirs
    } else {
        ours
    };
    let merged = DeviceRecord {
        id: ours.id.clone(),
        facility: ours.facility.clone(),
        name: ours.name.clone().max(theirs.name.clone()),
        enrolled_at: ours.enrolled_at.min(theirs.enrolled_at),
        endpoint_id,
        revoked: ours.revoked || theirs.revoked || conflict,
        last_sync: newer.last_sync,
        clock_offset: newer.clock_offset,
        addrs: newer.addrs.clone(),
        // The earlier revocation of the two.
        revoked_at: match (ours.revoked_at, theirs.revoked_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    };
    (merged, conflict)
}

/// The union of two keyrings, where two copies of one key id (issuer, key) meet by the rule
/// "the restriction wins": the later `not_before` and the earlier `not_after` (a key is ended
/// by importing it again with an earlier `not_after`, and that must hold at both hubs). Two
/// different public keys under one id is a conflict nobody can settle here: that id is
/// trusted at neither hub until an operator imports one of them again at both.
fn merge_keyring(ours: &Keyring, theirs: &Keyring) -> Result<Keyring, HubError> {
    let mut by_id: BTreeMap<(u16, u8), Option<shared::token::IssuerKey>> = BTreeMap::new();
    for k in ours.iter().chain(theirs.iter()) {
        let id = (k.issuer_id(), k.key_id());
        let merged = match by_id.get(&id) {
            None => Some(k.clone()),
            Some(None) => None,
            Some(Some(old)) if old.public_key() != k.public_key() => None,
            Some(Some(old)) => {
                let name = if key_json(k) > key_json(old) {
                    k.name()
                } else {
                    old.name()
                };
                let mut pk = [0u8; 32];
                pk.copy_from_slice(old.public_key().as_bytes());
                Some(shared::token::IssuerKey::new(
                    id.0,
                    id.1,
                    name,
                    &pk,
                    old.not_before().max(k.not_before()),
                    old.not_after().min(k.not_after()),
                )?)
            }
        };
        by_id.insert(id, merged);
    }
    let mut ring = Keyring::new();
    for k in by_id.into_values().flatten() {
        ring.insert(k)?;
    }
    Ok(ring)
}

/// Whether `id` is a designation id as this code makes them (`des_` and 12 hex digits).
fn is_designation_id(id: &str) -> bool {
    id.strip_prefix("des_")
        .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A device row from the peer holds what `enroll` and a sync would write: a name of 1 to 60
/// characters, an endpoint id of 64 hex digits, at most 8 socket addresses.
fn check_device_row(d: &DeviceRecord) -> Result<(), String> {
    let n = d.name.chars().count();
    if n == 0 || n > 60 || d.name.chars().any(char::is_control) {
        return Err("a name that is not 1 to 60 characters".into());
    }
    if d.endpoint_id
        .as_ref()
        .is_some_and(|e| e.len() != 64 || hex::decode(e).is_err())
    {
        return Err("an endpoint id that is not 64 hex digits".into());
    }
    if d.addrs.len() > 8
        || d.addrs
            .iter()
            .any(|a| a.parse::<std::net::SocketAddr>().is_err())
    {
        return Err("addresses that are not at most 8 socket addresses".into());
    }
    Ok(())
}

/// One key in the keyring file's form: what decides between two keys with one id.
fn key_json(k: &shared::token::IssuerKey) -> Vec<u8> {
    let mut one = Keyring::new();
    match one.insert(k.clone()) {
        Ok(()) => serde_json::to_vec(&one).unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Merges the peer's `entities` and `contacts` into this hub's tables, every rule of the
/// module's header; audits every change. An entity for another region's facility, or of a
/// shape this hub refuses (a bad id), is skipped and logged: the peer is one compromise away
/// from hostile, and a bad row must not stop the good ones.
pub fn apply(
    hub: &Hub,
    entities: &[Entity],
    contacts: &[Contact],
    now: UnixSeconds,
) -> Result<Applied, HubError> {
    let store = hub.store();
    // The keyed list read (and, for a hub that never revoked anything, made) before any row
    // changes: made later, it would list the rows revoked below at this hub's clock instead
    // of the time the peer revoked them.
    crate::auth::revocations(store).map_err(|e| HubError::Revocation(e.to_string()))?;
    // The sender caps its messages; a peer that does not is cut here (the next exchange
    // carries the rest).
    let entities = &entities[..entities.len().min(MAX_ENTITIES_PER_MESSAGE)];
    let contacts = &contacts[..contacts.len().min(MAX_CONTACTS_PER_MESSAGE)];
    let mut applied = Applied::default();
    // Devices to put on the keyed list, each with the time it was revoked where it was.
    let mut revoke: Vec<(Revoked, String)> = Vec::new();
    let mut revoked_at: BTreeMap<String, UnixSeconds> = BTreeMap::new();
    // Tombstones first: a removal wins over the copy that arrives with it.
    for e in entities {
        let Entity::Tombstone { key, at } = e else {
            continue;
        };
        let Some((kind, id)) = key.split_once('/') else {
            continue;
        };
        match kind {
            "f" => {
                let Ok(fid) = FacilityId::parse(id) else {
                    continue;
                };
                if store.has_tombstone(key)? {
                    // Both hubs removed it: keep the earlier time at both, or the bucket
                    // would differ for ever.
                    store.put_tombstone(key, *at)?;
                    continue;
                }
                store.put_tombstone(key, *at)?;
                store.remove_facility(&fid)?;
                for d in store.devices()?.into_iter().filter(|d| d.facility == fid) {
                    revoke.push((Revoked::Device, d.id.to_string()));
                    applied.revoked.push(d.id.to_string());
                }
                applied.changed.push(e.key());
            }
            "g" => {
                // Only a designation this hub holds, or could: `des_` and 12 hex digits (a
                // peer must not fill the table with tombstones of made-up ids).
                if !is_designation_id(id) {
                    continue;
                }
                if store.has_tombstone(key)? {
                    store.put_tombstone(key, *at)?;
                    continue;
                }
                store.put_tombstone(key, *at)?;
                let _ = crate::gov::remove_designation(store, id);
                applied.changed.push(e.key());
            }
            _ => continue,
        }
    }
    // Then facilities before devices before credentials, each after what it refers to.
    let mut ordered: Vec<&Entity> = entities.iter().collect();
    ordered.sort_by_key(|e| apply_rank(e));
    let arriving: std::collections::BTreeSet<&FacilityId> = entities
        .iter()
        .filter_map(|e| match e {
            Entity::Facility { facility } => Some(&facility.id),
            _ => None,
        })
        .collect();
    let mut designations: std::collections::BTreeSet<String> =
        crate::gov::designations(store, None)
            .map_err(|e| HubError::Invalid(e.to_string()))?
            .into_iter()
            .map(|d| d.id)
            .collect();
    for e in ordered {
        match e {
            Entity::Tombstone { .. } => {}
            Entity::Facility { facility } => {
                if !crate::auth::same_region(&facility.registration.region, &hub.config().region) {
                    tracing::warn!(
                        "the peer hub sent facility {} of region {:?}: skipped",
                        facility.id,
                        facility.registration.region
                    );
                    continue;
                }
                if store.has_tombstone(&format!("f/{}", facility.id))? {
                    continue;
                }
                if let Err(e) = facility.registration.validate() {
                    tracing::warn!("the peer hub sent facility {}: {e}; skipped", facility.id);
                    continue;
                }
                let merged = match store.facility(&facility.id)? {
                    Some(ours) => merge_facility(&ours, facility),
                    None => facility.clone(),
                };
                if store.facility(&facility.id)?.as_ref() != Some(&merged) {
                    store.put_facility(&merged)?;
                    applied.changed.push(e.key());
                }
            }
            Entity::Device { device } => {
                let gone = store.has_tombstone(&format!("f/{}", device.facility))?;
                let known_facility = store.facility(&device.facility)?.is_some();
                if !gone && !known_facility && !arriving.contains(&device.facility) {
                    // Its facility did not arrive (another region's, or in a bucket a later
                    // exchange carries): that exchange brings it.
                    continue;
                }
                if let Err(why) = check_device_row(device) {
                    tracing::warn!("the peer hub sent device {}: {why}; skipped", device.id);
                    continue;
                }
                let ours = store.device(&device.id)?;
                let (mut merged, conflict) = match &ours {
                    Some(o) => merge_device(o, device),
                    None => (device.clone(), false),
                };
                if gone {
                    merged.revoked = true;
                }
                if conflict {
                    tracing::warn!(
                        "device {}: bound to two endpoints, one at each hub; revoked (enroll it again)",
                        device.id
                    );
                }
                if ours.as_ref() != Some(&merged) {
                    store.put_device(&merged)?;
                    applied.changed.push(e.key());
                }
                if merged.revoked && ours.as_ref().is_none_or(|o| !o.revoked) {
                    revoke.push((Revoked::Device, merged.id.to_string()));
                    applied.revoked.push(merged.id.to_string());
                }
                if let Some(at) = merged.revoked_at {
                    revoked_at.insert(merged.id.to_string(), at.min(now));
                }
                if merged.endpoint_id.is_some() {
                    store.burn_credentials(&merged.id)?;
                }
            }
            Entity::Credential { digest, device } => {
                let mut d = [0u8; 32];
                if hex::decode_to_slice(digest, &mut d).is_err() {
                    continue;
                }
                if store.device(device)?.is_some() && store.put_credential(&d, device)? {
                    applied.changed.push(e.key());
                }
            }
            Entity::Designation { designation } => {
                if !is_designation_id(&designation.id)
                    || store.has_tombstone(&format!("g/{}", designation.id))?
                {
                    continue;
                }
                if designations.insert(designation.id.clone()) {
                    crate::gov::put_designation(store, designation)
                        .map_err(|e| HubError::Invalid(e.to_string()))?;
                    applied.changed.push(e.key());
                }
            }
            Entity::Issuers { keyring } => {
                let ours = hub.keyring()?;
                let merged = merge_keyring(&ours, keyring)?;
                if merged != ours {
                    store.set_config("keyring", &merged)?;
                    applied.changed.push(e.key());
                }
            }
        }
    }
    for c in contacts {
        let Some(mut d) = store.device(&c.device)? else {
            continue;
        };
        // A contact from the future of this hub's clock is capped: it must not hide a
        // facility's unsynced visits from traces for longer than the truth.
        let at = c.last_sync.min(now);
        if d.last_sync.is_none_or(|l| l < at) {
            d.last_sync = Some(at);
            d.clock_offset = c.clock_offset;
            d.addrs = c
                .addrs
                .iter()
                .filter(|a| a.parse::<std::net::SocketAddr>().is_ok())
                .take(8)
                .cloned()
                .collect();
            store.put_device(&d)?;
            applied.contacts += 1;
        }
    }
    // Every revoked row on the keyed list, also those an earlier apply revoked but could not
    // list (a store error, a crash between the two writes).
    let listed =
        crate::auth::revocations(store).map_err(|e| HubError::Revocation(e.to_string()))?;
    for d in store.devices()?.into_iter().filter(|d| d.revoked) {
        let id = d.id.to_string();
        if !listed.contains(Revoked::Device, &id) && !revoke.iter().any(|(_, r)| *r == id) {
            revoke.push((Revoked::Device, id));
        }
    }
    // Listed with the time the hub that revoked it gave (a record written after it is
    // refused here as there), else now; one append per distinct time.
    let mut by_time: BTreeMap<UnixSeconds, Vec<(Revoked, String)>> = BTreeMap::new();
    for (kind, id) in revoke {
        let at = revoked_at.get(&id).copied().unwrap_or(now);
        by_time.entry(at).or_default().push((kind, id));
    }
    for (at, items) in by_time {
        crate::auth::list_revoked(store, items, at)
            .map_err(|e| HubError::Revocation(e.to_string()))?;
    }
    if !applied.changed.is_empty() {
        hub.audit()
            .append(
                &Principal::local_operator(),
                Event::new(
                    "registry.replicated",
                    serde_json::json!({
                        "changed": applied.changed,
                        "revoked": applied.revoked,
                    }),
                ),
                now,
            )
            .map_err(|e| HubError::Invalid(format!("cannot audit a replicated change: {e}")))?;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(endpoint: Option<&str>, revoked: bool, last: Option<u64>) -> DeviceRecord {
        DeviceRecord {
            id: DeviceId::parse("dev_00112233445566778899aabb")
                .unwrap_or_else(|_| DeviceId::random(&mut rand_core::OsRng)),
            facility: FacilityId::random(&mut rand_core::OsRng),
            name: "gate".into(),
            enrolled_at: 10,
            endpoint_id: endpoint.map(str::to_owned),
            revoked,
            last_sync: last,
            clock_offset: None,
            addrs: vec![],
            revoked_at: None,
        }
    }

    #[test]
    fn device_merge_is_commutative_and_revocation_and_conflicts_win() {
        let a = device(Some("aa"), false, Some(100));
        let mut b = a.clone();
        b.endpoint_id = None;
        b.revoked = true;
        b.last_sync = Some(200);
        let (ab, c1) = merge_device(&a, &b);
        let (ba, c2) = merge_device(&b, &a);
        assert_eq!(ab, ba);
        assert!(!c1 && !c2);
        assert!(ab.revoked);
        assert_eq!(ab.endpoint_id.as_deref(), Some("aa"));
        assert_eq!(ab.last_sync, Some(200));
        // Two endpoints bound to one ticket: revoked at both, same row at both.
        let mut c = a.clone();
        c.endpoint_id = Some("bb".into());
        let (ac, conflict) = merge_device(&a, &c);
        let (ca, _) = merge_device(&c, &a);
        assert!(conflict && ac.revoked);
        assert_eq!(ac, ca);
        // Idempotent.
        assert_eq!(merge_device(&ac, &ac).0, ac);
    }

    #[test]
    fn buckets_ignore_contacts_and_find_the_differing_bucket() {
        let a = device(Some("aa"), false, Some(100));
        let mut b = a.clone();
        b.last_sync = Some(999);
        b.addrs = vec!["127.0.0.1:1".into()];
        let x = buckets(&[Entity::Device { device: a.clone() }]);
        let y = buckets(&[Entity::Device { device: b }]);
        assert_eq!(x, y, "contact fields are not in the digest");
        let mut c = a.clone();
        c.revoked = true;
        let z = buckets(&[Entity::Device { device: c }]);
        let diff = differing(&x, &z);
        assert_eq!(diff, vec![bucket_of(&format!("d/{}", a.id))]);
        assert_eq!(differing(&x, &[]).len(), BUCKETS);
    }

    #[test]
    fn pairing_files_are_checked() {
        assert!(PairingFile::parse(b"{}").is_err());
        assert!(PairingFile::parse(&[0xff; 70_000]).is_err());
        let ok = PairingFile {
            kind: PAIRING_KIND.into(),
            endpoint_id: "ab".repeat(32),
            addrs: vec!["127.0.0.1:7000".into()],
            region: "Seoul".into(),
            authority_recipient: age::x25519::Identity::generate().to_public().to_string(),
        };
        let bytes = serde_json::to_vec(&ok).unwrap_or_default();
        assert_eq!(PairingFile::parse(&bytes).ok(), Some(ok.clone()));
        let bad = PairingFile {
            endpoint_id: "zz".into(),
            ..ok.clone()
        };
        assert!(PairingFile::parse(&serde_json::to_vec(&bad).unwrap_or_default()).is_err());
        let other = PairingFile {
            kind: "kipass-enrollment-ticket".into(),
            ..ok
        };
        let e = PairingFile::parse(&serde_json::to_vec(&other).unwrap_or_default());
        assert!(format!("{e:?}").contains("not a hub pairing file"));
    }

    fn designation(n: usize) -> Entity {
        Entity::Tombstone {
            key: format!("g/des_{n:012x}"),
            at: 1,
        }
    }

    #[test]
    fn a_backlog_larger_than_a_message_travels_in_whole_buckets_over_rounds() {
        let entities: Vec<Entity> = (0..2_000).map(designation).collect();
        let all: Vec<usize> = (0..BUCKETS).collect();
        let mut seen = std::collections::BTreeSet::new();
        for round in 0..12 {
            let msg = in_buckets_from(&entities, &all, 300, (round * 97) % BUCKETS);
            assert!(msg.len() <= 300);
            // Whole buckets: every entity of a bucket it carries is in it.
            let carried: std::collections::BTreeSet<usize> =
                msg.iter().map(|e| bucket_of(&e.key())).collect();
            for b in &carried {
                let whole = entities
                    .iter()
                    .filter(|e| bucket_of(&e.key()) == *b)
                    .count();
                let got = msg.iter().filter(|e| bucket_of(&e.key()) == *b).count();
                assert_eq!(whole, got, "bucket {b} cut in half");
            }
            seen.extend(msg.into_iter().map(|e| e.key()));
        }
        // Not the same prefix for ever: rounds from other buckets carry the rest.
        assert_eq!(
            seen.len(),
            entities.len(),
            "every entity travelled within 12 rounds"
        );
        // Tombstones and facilities go first in a message.
        let mixed = vec![
            Entity::Issuers {
                keyring: Keyring::new(),
            },
            designation(1),
        ];
        let msg = in_buckets_from(&mixed, &all, 10, 0);
        assert!(matches!(msg[0], Entity::Tombstone { .. }));
    }

    fn key(not_before: u64, not_after: u64, seed: u8) -> shared::token::IssuerKey {
        let issuer = shared::token::TestIssuer::new([seed; 32], 1, 1);
        let mut ring = Keyring::new();
        let _ = ring.insert(issuer.keyring_entry("naver", not_before, not_after));
        ring.iter()
            .next()
            .cloned()
            .unwrap_or_else(|| panic!("a key"))
    }

    fn ring(keys: &[shared::token::IssuerKey]) -> Keyring {
        let mut r = Keyring::new();
        for k in keys {
            r.insert(k.clone()).unwrap_or_else(|e| panic!("{e}"));
        }
        r
    }

    #[test]
    fn an_issuer_key_ended_at_one_hub_stays_ended_at_both() {
        let open = ring(&[key(0, 4_102_444_800, 7)]);
        let ended = ring(&[key(0, 1_000, 7)]);
        for (a, b) in [(&open, &ended), (&ended, &open)] {
            let m = merge_keyring(a, b).unwrap_or_else(|e| panic!("{e}"));
            let k = m.iter().next().unwrap_or_else(|| panic!("kept"));
            assert_eq!(k.not_after(), 1_000, "the restriction wins in both orders");
        }
        // Two different public keys under one id: trusted at neither.
        let other = ring(&[key(0, 4_102_444_800, 9)]);
        let m = merge_keyring(&open, &other).unwrap_or_else(|e| panic!("{e}"));
        assert!(m.is_empty());
    }

    #[test]
    fn two_removals_of_one_thing_end_with_one_tombstone() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let hub = Hub::init(tmp.path(), "mapo", None, vec![], None, 1_750_000_000)
            .unwrap_or_else(|e| panic!("init: {e}"))
            .hub;
        hub.store()
            .put_tombstone("g/des_00000000000a", 500)
            .unwrap_or_else(|e| panic!("{e}"));
        let theirs = vec![Entity::Tombstone {
            key: "g/des_00000000000a".into(),
            at: 300,
        }];
        apply(&hub, &theirs, &[], 1_750_000_000).unwrap_or_else(|e| panic!("{e}"));
        let snap = snapshot(hub.store(), &Keyring::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(buckets(&snap), buckets(&theirs), "the earlier time at both");
        // A made-up id is not stored.
        let junk = vec![Entity::Tombstone {
            key: "g/anything-at-all".into(),
            at: 1,
        }];
        apply(&hub, &junk, &[], 1_750_000_000).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !hub.store()
                .has_tombstone("g/anything-at-all")
                .unwrap_or(true)
        );
    }

    #[test]
    fn a_device_revoked_at_the_peer_is_listed_here_with_the_peers_time() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let hub = Hub::init(tmp.path(), "mapo", None, vec![], None, 1_750_000_000)
            .unwrap_or_else(|e| panic!("init: {e}"))
            .hub;
        let facility = hub
            .add_facility(
                shared::facility::Registration {
                    name: "Star".into(),
                    business_number: None,
                    representative: "Kim".into(),
                    phone: "02-123-4567".into(),
                    category: "karaoke".into(),
                    region: "mapo".into(),
                    address: "1 Wausan-ro".into(),
                },
                1_750_000_000,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let mut d = device(Some(&"ab".repeat(32)), false, Some(100));
        d.facility = facility.id.clone();
        hub.store().put_device(&d).unwrap_or_else(|e| panic!("{e}"));
        // Revoked at the peer at 1,750,000,100; the link brings it here at 1,750,009,000.
        let theirs = DeviceRecord {
            revoked: true,
            revoked_at: Some(1_750_000_100),
            ..d.clone()
        };
        apply(
            &hub,
            &[Entity::Device { device: theirs }],
            &[],
            1_750_009_000,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let list = crate::auth::revocations(hub.store()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            list.device_revoked_at(&d.id.to_string()),
            Some(1_750_000_100),
            "records written between the two times are refused here too"
        );
    }
}
