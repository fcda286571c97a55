//! The hub-signed revocation list a facility's devices carry to each other.
//!
//! `sync-hub device revoke` (and removing a facility) shuts a device out at the hub, and its
//! siblings learn it from the hub's refresh at their next sync. A sibling that cannot reach the
//! hub learns it from a sibling that has: every device keeps the newest list it has seen and
//! hands it to the devices it serves (in the welcome's `refresh`, `docs/protocol.md`).
//!
//! Peers are hostile, so a list is taken from a peer only when it is signed by the hub the
//! device enrolled with: Ed25519 with the hub's iroh endpoint key, whose public half is the
//! `hub.endpoint_id` of the enrollment ticket. What is signed is the list's postcard encoding
//! after a context string of its own ([`SIGNING_CONTEXT`]), so no other message of that key
//! (iroh's TLS handshakes sign TLS transcripts) can be taken for a list. A list names its
//! facility: one facility's list is no use at another.
//!
//! **Two hubs.** In a region of two hubs each signs its own lists with its own endpoint key. A
//! device takes a list signed by either of its region's hubs ([`SignedRevocations::verify_by`]),
//! keeps the newest per signer, and refuses a device that ANY list it holds names ([`union`]):
//! revocations only grow, so a hub that has not heard of one yet cannot undo it.
//!
//! **Newest wins.** Revocations are never withdrawn, so the hub's list for a facility only
//! grows: its `version` is how many of the facility's devices it revokes. Of two lists the one
//! with the higher `(version, issued_at)` wins; an older or equal one from a peer is ignored.
//!
//! **Freshness.** A list carries the time the hub signed it (`issued_at`). A device knows the
//! revocations as of the newest of that time and its last completed hub session (the hub
//! sends its list whenever the device's differs, so a session that sends none confirms it).
//! When that is older than [`STALE_AFTER`], `status` and `/metrics` say so: a device revoked
//! since may still be served.

use crate::ids::{DeviceId, FacilityId};
use crate::time::UnixSeconds;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// What precedes a list's encoding when it is signed.
pub const SIGNING_CONTEXT: &[u8] = b"kipass facility revocation list v1\0";
/// The most devices one list may name (a facility has a handful).
pub const MAX_REVOKED_DEVICES: usize = 1024;
/// How old the revocations a device knows may be before `status` calls them stale: three
/// days, the schedule's daily sync missed twice.
pub const STALE_AFTER: u64 = 72 * 3600;
/// The hub re-signs a list a device holds when it is older than this (so that the copies
/// siblings hand on stay fresh); a list that changed is sent at once.
pub const REISSUE_AFTER: u64 = 12 * 3600;

/// One revoked device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedDevice {
    /// Its device id.
    pub device_id: DeviceId,
    /// Its iroh endpoint id (hex), if it ever bound one at the hub.
    pub endpoint_id: Option<String>,
    /// When the hub revoked it.
    pub revoked_at: UnixSeconds,
}

/// A facility's revoked devices as the hub lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    /// The facility whose devices these are.
    pub facility: FacilityId,
    /// How many of its devices the hub has revoked (the list only grows).
    pub version: u32,
    /// When the hub signed it.
    pub issued_at: UnixSeconds,
    /// The revoked devices.
    pub devices: Vec<RevokedDevice>,
}

/// A list with the hub's signature, as it travels in a refresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRevocations {
    /// The list.
    pub list: RevocationList,
    /// Ed25519 over [`SIGNING_CONTEXT`] and the list's postcard encoding (hex, 128 characters).
    pub signature: String,
}

/// Why a list was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// The signature is missing, malformed or not the hub's.
    #[error("the revocation list is not signed by this device's hub")]
    BadSignature,
    /// The hub's endpoint id is not an Ed25519 public key.
    #[error("the hub's endpoint id is not a public key")]
    BadHubKey,
    /// Another facility's list.
    #[error("the revocation list is for facility {0}, not this device's")]
    WrongFacility(FacilityId),
    /// Over [`MAX_REVOKED_DEVICES`], or a version that does not match its devices.
    #[error("the revocation list is malformed: {0}")]
    Malformed(String),
}

fn signed_bytes(list: &RevocationList) -> Vec<u8> {
    let mut out = SIGNING_CONTEXT.to_vec();
    // A plain data type always encodes.
    out.extend(postcard::to_allocvec(list).unwrap_or_default());
    out
}

impl RevocationList {
    /// Signs with the hub's endpoint secret (the 32-byte Ed25519 seed of its iroh key).
    pub fn sign(self, hub_secret: &[u8; 32]) -> SignedRevocations {
        let key = SigningKey::from_bytes(hub_secret);
        let signature = key.sign(&signed_bytes(&self));
        SignedRevocations {
            list: self,
            signature: hex::encode(signature.to_bytes()),
        }
    }

    /// Whether `endpoint` (hex) is a revoked device's endpoint.
    pub fn revokes_endpoint(&self, endpoint: &str) -> bool {
        self.devices
            .iter()
            .any(|d| d.endpoint_id.as_deref() == Some(endpoint))
    }

    /// Whether `device` is revoked.
    pub fn revokes_device(&self, device: &DeviceId) -> bool {
        self.devices.iter().any(|d| &d.device_id == device)
    }

    /// Whether this list is newer than `other` (none held: any list is).
    pub fn newer_than(&self, other: Option<&RevocationList>) -> bool {
        other.is_none_or(|o| (self.version, self.issued_at) > (o.version, o.issued_at))
    }
}

impl SignedRevocations {
    /// The list, if it is signed by the hub whose endpoint id (hex) is `hub_endpoint`, is for
    /// `facility`, and is well formed. Anything else is refused: a peer's bytes are not trusted.
    pub fn verify(
        &self,
        hub_endpoint: &str,
        facility: &FacilityId,
    ) -> Result<&RevocationList, RevocationError> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(hub_endpoint, &mut key).map_err(|_| RevocationError::BadHubKey)?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| RevocationError::BadHubKey)?;
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig)
            .map_err(|_| RevocationError::BadSignature)?;
        key.verify_strict(&signed_bytes(&self.list), &Signature::from_bytes(&sig))
            .map_err(|_| RevocationError::BadSignature)?;
        let list = &self.list;
        if &list.facility != facility {
            return Err(RevocationError::WrongFacility(list.facility.clone()));
        }
        if list.devices.len() > MAX_REVOKED_DEVICES {
            return Err(RevocationError::Malformed(format!(
                "{} devices, at most {MAX_REVOKED_DEVICES}",
                list.devices.len()
            )));
        }
        if list.devices.len() != list.version as usize {
            return Err(RevocationError::Malformed(format!(
                "version {} with {} devices",
                list.version,
                list.devices.len()
            )));
        }
        Ok(list)
    }
}

impl SignedRevocations {
    /// [`SignedRevocations::verify`] against each of `hubs` (the endpoint ids of the device's
    /// region's hubs): the index of the hub that signed it and the list. A list no hub of
    /// `hubs` signed is [`RevocationError::BadSignature`]; a signed list that is malformed or
    /// of another facility is that error.
    pub fn verify_by(
        &self,
        hubs: &[&str],
        facility: &FacilityId,
    ) -> Result<(usize, &RevocationList), RevocationError> {
        let mut err = RevocationError::BadSignature;
        for (i, hub) in hubs.iter().enumerate() {
            match self.verify(hub, facility) {
                Ok(list) => return Ok((i, list)),
                Err(RevocationError::BadSignature | RevocationError::BadHubKey) => {}
                Err(e) => err = e,
            }
        }
        Err(err)
    }
}

/// Every device that any of `lists` (one per signing hub) names, as one list for the refusal
/// checks (`revokes_device`, `revokes_endpoint`): of the first list's facility, its version
/// the number of devices, issued at the newest list's time. `None` when `lists` is empty.
/// Not signed: it is never handed on (siblings get each hub's own list).
pub fn union<'a>(lists: impl IntoIterator<Item = &'a RevocationList>) -> Option<RevocationList> {
    let mut out: Option<RevocationList> = None;
    for l in lists {
        let u = out.get_or_insert_with(|| RevocationList {
            facility: l.facility.clone(),
            version: 0,
            issued_at: 0,
            devices: Vec::new(),
        });
        u.issued_at = u.issued_at.max(l.issued_at);
        for d in &l.devices {
            if !u.devices.iter().any(|h| h.device_id == d.device_id) {
                u.devices.push(d.clone());
            } else if let Some(h) = u
                .devices
                .iter_mut()
                .find(|h| h.device_id == d.device_id && h.endpoint_id.is_none())
            {
                h.endpoint_id.clone_from(&d.endpoint_id);
            }
        }
    }
    if let Some(u) = out.as_mut() {
        u.version = u32::try_from(u.devices.len()).unwrap_or(u32::MAX);
    }
    out
}

/// Whether the hub sends its list (of `current` version, signed at the session) to a device
/// whose hello says it holds `have` ([`crate::ticket::RefreshHave::revocations`]; `None`: a
/// device that did not say, which gets it). Nothing while the facility has none revoked; else
/// when the device's version differs or its copy is older than [`REISSUE_AFTER`].
pub fn hub_sends(current: u32, have: Option<(u32, u32)>, now: UnixSeconds) -> bool {
    current > 0
        && have.is_none_or(|(version, issued_at)| {
            version != current || now.saturating_sub(u64::from(issued_at)) > REISSUE_AFTER
        })
}

/// Whether a device serving a sibling hands it the list it holds: when it holds one and the
/// sibling's hello says it holds an older one, or says nothing.
pub fn sibling_sends(held: Option<&RevocationList>, have: Option<(u32, u32)>) -> bool {
    held.is_some_and(|l| {
        have.is_none_or(|(version, issued_at)| {
            (l.version, u32::try_from(l.issued_at).unwrap_or(u32::MAX)) > (version, issued_at)
        })
    })
}

/// How old the revocations a device knows are at `now`: since the newest of its list's issue
/// time and its last completed hub session; `None` when it has neither.
pub fn knowledge_age(
    list: Option<&RevocationList>,
    last_hub_sync: Option<UnixSeconds>,
    now: UnixSeconds,
) -> Option<u64> {
    let newest = list.map(|l| l.issued_at).max(last_hub_sync)?;
    Some(now.saturating_sub(newest))
}

/// Whether that age is past [`STALE_AFTER`] (never synced counts as stale).
pub fn is_stale(age: Option<u64>) -> bool {
    age.is_none_or(|a| a > STALE_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fac(s: &str) -> FacilityId {
        FacilityId::parse(s).unwrap()
    }

    fn list(version: u32, issued_at: UnixSeconds) -> RevocationList {
        RevocationList {
            facility: fac("fac_01"),
            version,
            issued_at,
            devices: (0..version)
                .map(|i| RevokedDevice {
                    device_id: DeviceId::parse(&format!("dev_0{i}")).unwrap(),
                    endpoint_id: Some(format!("{i:02x}")),
                    revoked_at: 100,
                })
                .collect(),
        }
    }

    fn hub() -> ([u8; 32], String) {
        let secret = [7u8; 32];
        let public = SigningKey::from_bytes(&secret).verifying_key();
        (secret, hex::encode(public.to_bytes()))
    }

    #[test]
    fn a_list_signed_by_the_hub_verifies_and_nothing_else_does() {
        let (secret, public) = hub();
        let signed = list(1, 1000).sign(&secret);
        let l = signed.verify(&public, &fac("fac_01")).unwrap();
        assert!(l.revokes_device(&DeviceId::parse("dev_00").unwrap()));
        assert!(l.revokes_endpoint("00") && !l.revokes_endpoint("01"));

        // Another key (a hostile peer signing its own list).
        let forged = list(1, 1000).sign(&[8u8; 32]);
        assert_eq!(
            forged.verify(&public, &fac("fac_01")),
            Err(RevocationError::BadSignature)
        );
        // Unsigned, or a signature that is not hex.
        for sig in ["", "zz", &"00".repeat(64)] {
            let mut s = signed.clone();
            s.signature = sig.into();
            assert_eq!(
                s.verify(&public, &fac("fac_01")),
                Err(RevocationError::BadSignature)
            );
        }
        // An edited list: a device dropped (version kept), the issue time moved on.
        let mut s = signed.clone();
        s.list.devices.clear();
        assert_eq!(
            s.verify(&public, &fac("fac_01")),
            Err(RevocationError::BadSignature)
        );
        let mut s = signed.clone();
        s.list.issued_at += 1;
        assert_eq!(
            s.verify(&public, &fac("fac_01")),
            Err(RevocationError::BadSignature)
        );
        // Another facility's list, even the hub's own.
        assert!(matches!(
            signed.verify(&public, &fac("fac_02")),
            Err(RevocationError::WrongFacility(_))
        ));
        // A hub key that is not a key.
        assert_eq!(
            signed.verify("nothex", &fac("fac_01")),
            Err(RevocationError::BadHubKey)
        );
        // Signed, but a version that does not count its devices.
        let mut bad = list(2, 1000);
        bad.version = 3;
        assert!(matches!(
            bad.sign(&secret).verify(&public, &fac("fac_01")),
            Err(RevocationError::Malformed(_))
        ));
    }

    #[test]
    fn a_list_of_either_hub_verifies_and_the_union_refuses_what_any_names() {
        let (secret_a, a) = hub();
        let secret_b = [9u8; 32];
        let b = hex::encode(SigningKey::from_bytes(&secret_b).verifying_key().to_bytes());
        let hubs = [a.as_str(), b.as_str()];
        let by_a = list(1, 1000).sign(&secret_a);
        let mut lb = list(2, 2000);
        lb.devices.remove(0);
        lb.devices.push(RevokedDevice {
            device_id: DeviceId::parse("dev_09").unwrap(),
            endpoint_id: Some("09".into()),
            revoked_at: 100,
        });
        let by_b = lb.sign(&secret_b);
        assert_eq!(by_a.verify_by(&hubs, &fac("fac_01")).unwrap().0, 0);
        assert_eq!(by_b.verify_by(&hubs, &fac("fac_01")).unwrap().0, 1);
        // Only the hubs named: b's list is not a's.
        assert_eq!(
            by_b.verify_by(&hubs[..1], &fac("fac_01")),
            Err(RevocationError::BadSignature)
        );
        assert_eq!(
            list(1, 1).sign(&[3u8; 32]).verify_by(&hubs, &fac("fac_01")),
            Err(RevocationError::BadSignature)
        );
        assert!(matches!(
            by_b.verify_by(&hubs, &fac("fac_02")),
            Err(RevocationError::WrongFacility(_))
        ));
        // a names dev_00; b names dev_01 and dev_09: the union refuses all three.
        let u = union([&by_a.list, &by_b.list]).unwrap();
        for d in ["dev_00", "dev_01", "dev_09"] {
            assert!(u.revokes_device(&DeviceId::parse(d).unwrap()), "{d}");
        }
        assert!(u.revokes_endpoint("00") && u.revokes_endpoint("09"));
        assert!(!u.revokes_device(&DeviceId::parse("dev_02").unwrap()));
        assert_eq!((u.version, u.issued_at), (3, 2000));
        assert_eq!(union(std::iter::empty()), None);
        assert_eq!(union([&by_a.list]).unwrap(), by_a.list);
    }

    #[test]
    fn newest_wins_by_version_then_issue_time() {
        let l = list(2, 1000);
        assert!(l.newer_than(None));
        assert!(l.newer_than(Some(&list(1, 5000))));
        assert!(l.newer_than(Some(&list(2, 999))));
        assert!(!l.newer_than(Some(&list(2, 1000))));
        assert!(!l.newer_than(Some(&list(2, 1001))));
        assert!(!l.newer_than(Some(&list(3, 10))));
    }

    #[test]
    fn the_hub_sends_a_changed_or_aging_list_and_a_sibling_a_newer_one() {
        let now = 100_000;
        assert!(!hub_sends(0, None, now), "nothing revoked: nothing sent");
        assert!(hub_sends(1, None, now));
        assert!(hub_sends(2, Some((1, 99_999)), now));
        assert!(!hub_sends(2, Some((2, 99_000)), now));
        let old = u32::try_from(now - REISSUE_AFTER - 1).unwrap();
        assert!(hub_sends(2, Some((2, old)), now));

        let l = list(2, 1000);
        assert!(!sibling_sends(None, None));
        assert!(sibling_sends(Some(&l), None));
        assert!(sibling_sends(Some(&l), Some((0, 0))));
        assert!(sibling_sends(Some(&l), Some((2, 999))));
        assert!(!sibling_sends(Some(&l), Some((2, 1000))));
        assert!(!sibling_sends(Some(&l), Some((3, 0))));
    }

    #[test]
    fn knowledge_is_as_old_as_the_newest_of_list_and_hub_sync() {
        assert_eq!(knowledge_age(None, None, 50), None);
        assert!(is_stale(None));
        assert_eq!(knowledge_age(Some(&list(0, 100)), None, 150), Some(50));
        assert_eq!(knowledge_age(Some(&list(0, 100)), Some(140), 150), Some(10));
        assert_eq!(knowledge_age(None, Some(140), 150), Some(10));
        assert!(!is_stale(Some(STALE_AFTER)));
        assert!(is_stale(Some(STALE_AFTER + 1)));
    }
}
