//! The enrollment ticket: everything a new device needs to work offline and to find and
//! authenticate to its hub.
//!
//! A ticket is a credential. Whoever holds it can enroll one device for the facility until
//! the device's first sync binds the credential to the device's endpoint id; after that the
//! hub refuses the ticket. Hand it over like a key (a USB stick, a QR shown once), delete it
//! after `edge-node init`, and never log it: [`EnrollmentTicket`]'s `Debug` elides the
//! credential.

use crate::daykey::DayPublicKey;
use crate::facility::Facility;
use crate::ids::DeviceId;
use crate::time::{Day, UnixSeconds};
use crate::token::Keyring;
use serde::{Deserialize, Serialize};

/// The `kind` field every ticket carries, so a wrong file is recognised as such.
pub const TICKET_KIND: &str = "kipass-enrollment-ticket";
/// The ticket format this code writes and reads.
pub const TICKET_VERSION: u32 = 1;
/// Tickets larger than this are refused before parsing.
pub const MAX_TICKET_BYTES: usize = 1 << 20;
/// Day public keys a ticket must carry at least (the device works this long without sync).
pub const MIN_TICKET_DAYS: usize = 35;

/// Why a ticket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// Larger than [`MAX_TICKET_BYTES`].
    #[error("the ticket is {0} bytes, larger than any real ticket: is this the right file?")]
    TooLarge(usize),
    /// Not JSON of the ticket's form.
    #[error("not an enrollment ticket ({0}): ask the hub operator for a new one")]
    Format(String),
    /// Another kind of JSON file.
    #[error("this file is a {0:?}, not an enrollment ticket")]
    Kind(String),
    /// A ticket of a format this device does not know.
    #[error(
        "ticket format version {0} is not supported (this device reads version {TICKET_VERSION}): update edge-node"
    )]
    Version(u32),
    /// Fields present but unusable.
    #[error("the ticket is damaged: {0}; ask the hub operator for a new one")]
    Invalid(String),
}

/// The single-use enrollment credential (32 random bytes, hex in the file).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Credential(#[serde(with = "hex32")] pub [u8; 32]);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(..)")
    }
}

impl Credential {
    /// A fresh random credential.
    pub fn generate(rng: &mut impl rand_core::RngCore) -> Self {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        Credential(b)
    }

    /// What the hub stores instead of the credential itself.
    pub fn digest(&self) -> [u8; 32] {
        blake3::derive_key("kipass enrollment credential v1", &self.0)
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out)
            .map_err(|_| serde::de::Error::custom("expected 64 hex characters"))?;
        Ok(out)
    }
}

/// How a device reaches its hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubContact {
    /// The hub's iroh endpoint id (hex of its Ed25519 public key).
    pub endpoint_id: String,
    /// Addresses to dial: `IP:PORT` or `NAME:PORT` ([`crate::hub_addr::HubAddr`]), at most
    /// [`crate::hub_addr::MAX_HUB_ADDRS`].
    pub addrs: Vec<String>,
    /// The region the hub serves.
    pub region: String,
}

/// The region's other hub, as a device knows it: where to reach it and its day public keys.
///
/// A region runs two hubs, each with its own day-key ratchet (design: "Two hubs per region");
/// a device wraps each session key to both hubs' keys of the day and syncs with whichever
/// answers. A ticket names the other hub in [`EnrollmentTicket::peer_hubs`]; a hub's refresh
/// names the hub other than itself in [`Refresh::peer_hub`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHub {
    /// How to reach it (its endpoint id, addresses and region).
    pub contact: HubContact,
    /// Consecutive days from some day on (may be empty: the peer's keys are not known yet).
    pub day_keys: Vec<DayPublicKey>,
}

/// The most peer hubs a ticket names (a region runs two hubs: the ticket's and one more).
pub const MAX_PEER_HUBS: usize = 1;
/// The most day keys a [`PeerHub`] may carry (a ticket's hub hands out about 35 to 60).
pub const MAX_PEER_DAY_KEYS: usize = 400;

/// Whether `id` is an endpoint id as a [`HubContact`] names it: 64 hex characters.
fn endpoint_id_ok(id: &str) -> bool {
    id.len() == 64 && hex::decode(id).is_ok()
}

impl PeerHub {
    /// Checks a peer hub as a ticket or a refresh names it: an endpoint id of 64 hex
    /// characters other than `hub` (the hub that names it), addresses per
    /// [`crate::hub_addr::parse_list`], the region `region`, and at most
    /// [`MAX_PEER_DAY_KEYS`] day keys of consecutive days, each an age recipient.
    pub fn check(&self, hub: &str, region: &str) -> Result<(), String> {
        let c = &self.contact;
        if !endpoint_id_ok(&c.endpoint_id) {
            return Err("the peer hub's endpoint id is not 64 hex characters".into());
        }
        if c.endpoint_id.eq_ignore_ascii_case(hub) {
            return Err("the peer hub is the hub itself".into());
        }
        crate::hub_addr::parse_list(&c.addrs).map_err(|e| format!("the peer hub's {e}"))?;
        if c.region != region {
            return Err(format!(
                "the peer hub serves region {:?}, not {region:?}",
                c.region.chars().take(60).collect::<String>()
            ));
        }
        if self.day_keys.len() > MAX_PEER_DAY_KEYS {
            return Err(format!(
                "the peer hub has {} day keys, at most {MAX_PEER_DAY_KEYS}",
                self.day_keys.len()
            ));
        }
        for pair in self.day_keys.windows(2) {
            if pair[1].day != pair[0].day.plus(1) {
                return Err("the peer hub's day keys are not consecutive days".into());
            }
        }
        if self.day_keys.iter().any(|k| k.to_recipient().is_err()) {
            return Err("a peer hub's day key is not an age recipient".into());
        }
        Ok(())
    }
}

/// Everything a device needs to work offline and to find and authenticate to the hub.
#[derive(Clone, Serialize, Deserialize)]
pub struct EnrollmentTicket {
    /// Always [`TICKET_KIND`].
    pub kind: String,
    /// Always [`TICKET_VERSION`] for tickets this code writes.
    pub version: u32,
    /// When the hub wrote it.
    pub issued_at: UnixSeconds,
    /// The hub to sync with.
    pub hub: HubContact,
    /// The facility this device logs for.
    pub facility: Facility,
    /// The id the hub gave this device.
    pub device_id: DeviceId,
    /// Where it stands ("north gate").
    pub device_name: String,
    /// The single-use credential that binds this device's endpoint id at first sync.
    pub credential: Credential,
    /// Trusted issuer keys.
    pub keyring: Keyring,
    /// The hub's day public keys, consecutive days from the day of issue.
    pub day_keys: Vec<DayPublicKey>,
    /// The health authority's age recipient, for sealing paper-log entries.
    pub authority_recipient: String,
    /// The region's other hub (at most [`MAX_PEER_HUBS`]); absent from tickets of a region
    /// with one hub.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_hubs: Vec<PeerHub>,
}

impl std::fmt::Debug for EnrollmentTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentTicket")
            .field("facility", &self.facility.id)
            .field("device_id", &self.device_id)
            .field("device_name", &self.device_name)
            .field("hub", &self.hub)
            .field("day_keys", &self.day_keys.len())
            .field("peer_hubs", &self.peer_hubs)
            .finish_non_exhaustive()
    }
}

impl EnrollmentTicket {
    /// Parses and checks a ticket file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, TicketError> {
        if bytes.len() > MAX_TICKET_BYTES {
            return Err(TicketError::TooLarge(bytes.len()));
        }
        #[derive(Deserialize)]
        struct Head {
            kind: String,
            version: u32,
        }
        let head: Head =
            serde_json::from_slice(bytes).map_err(|e| TicketError::Format(e.to_string()))?;
        if head.kind != TICKET_KIND {
            return Err(TicketError::Kind(head.kind.chars().take(60).collect()));
        }
        if head.version != TICKET_VERSION {
            return Err(TicketError::Version(head.version));
        }
        let t: EnrollmentTicket =
            serde_json::from_slice(bytes).map_err(|e| TicketError::Format(e.to_string()))?;
        t.check()?;
        Ok(t)
    }

    /// The ticket as the file holds it.
    pub fn to_json(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    fn check(&self) -> Result<(), TicketError> {
        let bad = |s: &str| Err(TicketError::Invalid(s.to_owned()));
        if !endpoint_id_ok(&self.hub.endpoint_id) {
            return bad("the hub endpoint id is not 64 hex characters");
        }
        if let Err(e) = crate::hub_addr::parse_list(&self.hub.addrs) {
            return Err(TicketError::Invalid(e));
        }
        if self.device_name.trim().is_empty() || self.device_name.chars().count() > 60 {
            return bad("the device name must be 1 to 60 characters");
        }
        if self.day_keys.len() < MIN_TICKET_DAYS {
            return bad("fewer than 35 day keys");
        }
        for pair in self.day_keys.windows(2) {
            if pair[1].day != pair[0].day.plus(1) {
                return bad("day keys are not consecutive days");
            }
        }
        for k in &self.day_keys {
            if k.to_recipient().is_err() {
                return bad("a day key is not an age recipient");
            }
        }
        if self
            .authority_recipient
            .parse::<age::x25519::Recipient>()
            .is_err()
        {
            return bad("the health authority key is not an age recipient");
        }
        if self.peer_hubs.len() > MAX_PEER_HUBS {
            return bad("more than one peer hub");
        }
        for p in &self.peer_hubs {
            p.check(&self.hub.endpoint_id, &self.hub.region)
                .map_err(TicketError::Invalid)?;
        }
        Ok(())
    }

    /// The day public key for `day`, if the ticket carries one.
    pub fn day_key(&self, day: Day) -> Option<&DayPublicKey> {
        self.day_keys.iter().find(|k| k.day == day)
    }
}

/// A sibling device of the same facility, as the hub's roster lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    /// Its device id.
    pub device_id: DeviceId,
    /// Where it stands.
    pub name: String,
    /// Its iroh endpoint id (hex).
    pub endpoint_id: String,
    /// Where the hub last saw it connect from (it may listen there too).
    pub addrs: Vec<String>,
}

/// What the hub hands a device on a sync (the opaque `refresh` of the welcome): the day public
/// keys it lacks, and the issuer keyring and the facility's other devices when they changed.
///
/// Only what differs from the device's [`RefreshHave`] travels: a refresh of 30 day keys, a
/// keyring and a roster is about 4 KB, which on every session would cost more than the
/// visits it carries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Refresh {
    /// Day public keys the device lacks, from today on (a key for a day the device already
    /// holds replaces it: a rebuilt hub has new keys).
    pub day_keys: Vec<DayPublicKey>,
    /// Trusted issuer keys (removing a key revokes it); absent when unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<Keyring>,
    /// The facility's other enrolled, non-revoked devices; absent when unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roster: Option<Vec<Sibling>>,
    /// The hub's advertised addresses (`IP:PORT` or `NAME:PORT`), when they differ from the
    /// ones the device's [`RefreshHave::hub_addrs`] names; absent when unchanged or when the
    /// device did not say (an older device, which would not read them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_addrs: Option<Vec<String>>,
    /// The facility's hub-signed revocation list ([`crate::revocation`]), when the device's
    /// [`RefreshHave::revocations`] is not the current one or is older than
    /// [`crate::revocation::REISSUE_AFTER`]; absent when the facility has none revoked. The
    /// only field a sibling's welcome carries (and the only one a device takes from one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocations: Option<crate::revocation::SignedRevocations>,
    /// The region's other hub than the one answering, its day keys from the device's today
    /// on, when the device's [`RefreshHave::peer`] differs from [`peer_digest`] of it; absent
    /// when unchanged, when the device did not say, or when the region has one hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_hub: Option<PeerHub>,
}

impl Refresh {
    /// Whether it carries nothing: then the hub sends no refresh at all.
    pub fn is_empty(&self) -> bool {
        self.day_keys.is_empty()
            && self.keyring.is_none()
            && self.roster.is_none()
            && self.hub_addrs.is_none()
            && self.revocations.is_none()
            && self.peer_hub.is_none()
    }
}

/// What a device already holds of the hub's refresh, sent in its hello (opaque to the sync
/// core) so the hub sends only the rest. 32 bytes, or 40 with the digest of the hub addresses
/// the device dials ([`REFRESH_HAVE_HUB_ADDRS_BYTES`]), 48 with the revocation list it holds
/// ([`REFRESH_HAVE_REVOCATIONS_BYTES`]), 56 with the digest of the peer hub it holds
/// ([`REFRESH_HAVE_PEER_BYTES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshHave {
    /// The device's today, when it wrote this.
    pub from: crate::time::Day,
    /// Its newest day public key.
    pub newest: crate::time::Day,
    /// [`digest`] of its day public keys from `from` to `newest`.
    pub day_keys: [u8; 8],
    /// [`digest`] of its issuer keyring.
    pub keyring: [u8; 8],
    /// [`digest`] of its roster.
    pub roster: [u8; 8],
    /// [`digest`] of the hub addresses it dials (a `Vec<String>`); absent from devices that
    /// do not take the hub's addresses from a refresh.
    pub hub_addrs: Option<[u8; 8]>,
    /// The `version` and `issued_at` of the revocation list the device holds (`(0, 0)`: none);
    /// only with `hub_addrs`. Absent from devices that do not take a list.
    pub revocations: Option<(u32, u32)>,
    /// [`peer_digest`] of the peer hub the device holds (the region's other hub than the one
    /// dialled; all zero bytes when it holds none); only with `revocations`. Absent from
    /// devices that do not take a peer hub.
    pub peer: Option<[u8; 8]>,
}

/// The length of an encoded [`RefreshHave`] without `hub_addrs`.
pub const REFRESH_HAVE_BYTES: usize = 32;
/// The length of an encoded [`RefreshHave`] with `hub_addrs`.
pub const REFRESH_HAVE_HUB_ADDRS_BYTES: usize = 40;
/// The length of an encoded [`RefreshHave`] with `hub_addrs` and `revocations`.
pub const REFRESH_HAVE_REVOCATIONS_BYTES: usize = 48;
/// The length of an encoded [`RefreshHave`] with `hub_addrs`, `revocations` and `peer`.
pub const REFRESH_HAVE_PEER_BYTES: usize = 56;

/// 8 bytes that name what a device holds of a peer hub: its endpoint id, addresses and region
/// and its day keys of days from `from` on. `None`: `[0; 8]` (the device holds no peer).
pub fn peer_digest(from: Day, peer: Option<&PeerHub>) -> [u8; 8] {
    let Some(p) = peer else {
        return [0; 8];
    };
    let keys: Vec<&DayPublicKey> = p.day_keys.iter().filter(|k| k.day >= from).collect();
    digest(&(
        &p.contact.endpoint_id,
        &p.contact.addrs,
        &p.contact.region,
        &keys,
    ))
}

impl RefreshHave {
    /// Computes the summary of what a device holds at its today `from`.
    pub fn of(
        from: crate::time::Day,
        day_keys: &[DayPublicKey],
        keyring: &Keyring,
        roster: &[Sibling],
    ) -> RefreshHave {
        let current: Vec<&DayPublicKey> = day_keys.iter().filter(|k| k.day >= from).collect();
        RefreshHave {
            from,
            newest: current
                .iter()
                .map(|k| k.day)
                .max()
                .unwrap_or(crate::time::Day(0)),
            day_keys: digest(&current),
            keyring: digest(keyring),
            roster: digest(&roster),
            hub_addrs: None,
            revocations: None,
            peer: None,
        }
    }

    /// The same, also saying which peer hub the device holds ([`peer_digest`] from its
    /// today): a hub whose peer differs then sends it. With `hub_addrs` and `revocations`
    /// only: the encoding appends it after them.
    pub fn with_peer(self, peer: Option<&PeerHub>) -> RefreshHave {
        RefreshHave {
            peer: Some(peer_digest(self.from, peer)),
            ..self
        }
    }

    /// The same, also saying which revocation list the device holds (with `hub_addrs` only:
    /// the encoding appends it after them).
    pub fn with_revocations(self, held: Option<&crate::revocation::RevocationList>) -> RefreshHave {
        RefreshHave {
            revocations: Some(held.map_or((0, 0), |l| {
                (l.version, u32::try_from(l.issued_at).unwrap_or(u32::MAX))
            })),
            ..self
        }
    }

    /// The same, also saying which hub addresses the device dials: a hub whose advertised
    /// addresses differ then sends them.
    pub fn with_hub_addrs(self, addrs: &[String]) -> RefreshHave {
        RefreshHave {
            hub_addrs: Some(digest(addrs)),
            ..self
        }
    }

    /// The 32, 40, 48 or 56 bytes of the hello.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REFRESH_HAVE_BYTES);
        out.extend_from_slice(&self.from.0.to_be_bytes());
        out.extend_from_slice(&self.newest.0.to_be_bytes());
        out.extend_from_slice(&self.day_keys);
        out.extend_from_slice(&self.keyring);
        out.extend_from_slice(&self.roster);
        if let Some(h) = &self.hub_addrs {
            out.extend_from_slice(h);
            if let Some((version, issued_at)) = self.revocations {
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&issued_at.to_be_bytes());
                if let Some(p) = &self.peer {
                    out.extend_from_slice(p);
                }
            }
        }
        out
    }

    /// Parses a hello's bytes; `None` unless exactly [`REFRESH_HAVE_BYTES`],
    /// [`REFRESH_HAVE_HUB_ADDRS_BYTES`], [`REFRESH_HAVE_REVOCATIONS_BYTES`] or
    /// [`REFRESH_HAVE_PEER_BYTES`] (the hub then sends everything).
    pub fn from_bytes(b: &[u8]) -> Option<RefreshHave> {
        if ![
            REFRESH_HAVE_BYTES,
            REFRESH_HAVE_HUB_ADDRS_BYTES,
            REFRESH_HAVE_REVOCATIONS_BYTES,
            REFRESH_HAVE_PEER_BYTES,
        ]
        .contains(&b.len())
        {
            return None;
        }
        let four = |i: usize| {
            let mut d = [0u8; 4];
            d.copy_from_slice(&b[i..i + 4]);
            u32::from_be_bytes(d)
        };
        let day = |i: usize| {
            let mut d = [0u8; 4];
            d.copy_from_slice(&b[i..i + 4]);
            crate::time::Day(u32::from_be_bytes(d))
        };
        let eight = |i: usize| {
            let mut d = [0u8; 8];
            d.copy_from_slice(&b[i..i + 8]);
            d
        };
        Some(RefreshHave {
            from: day(0),
            newest: day(4),
            day_keys: eight(8),
            keyring: eight(16),
            roster: eight(24),
            hub_addrs: (b.len() >= REFRESH_HAVE_HUB_ADDRS_BYTES).then(|| eight(32)),
            revocations: (b.len() >= REFRESH_HAVE_REVOCATIONS_BYTES).then(|| (four(40), four(44))),
            peer: (b.len() == REFRESH_HAVE_PEER_BYTES).then(|| eight(48)),
        })
    }
}

/// 8 bytes of BLAKE3 over the JSON of `value`: how a device and its hub compare a keyring, a
/// roster or a run of day keys without sending it. Both sides serialize the same types with
/// the same code; a mismatch only makes the hub send the value again.
pub fn digest<T: Serialize + ?Sized>(value: &T) -> [u8; 8] {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let mut out = [0u8; 8];
    out.copy_from_slice(&blake3::derive_key("kipass refresh digest", &json)[..8]);
    out
}

/// The most bytes a refresh may take.
pub const MAX_REFRESH_BYTES: usize = 256 * 1024;

impl Refresh {
    /// Encodes for the welcome frame.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a welcome's refresh; refuses oversized or malformed ones and unusable keys.
    pub fn from_bytes(b: &[u8]) -> Result<Self, TicketError> {
        if b.len() > MAX_REFRESH_BYTES {
            return Err(TicketError::TooLarge(b.len()));
        }
        let r: Refresh =
            serde_json::from_slice(b).map_err(|e| TicketError::Format(e.to_string()))?;
        if r.day_keys.iter().any(|k| k.to_recipient().is_err()) {
            return Err(TicketError::Invalid(
                "a refreshed day key is not an age recipient".into(),
            ));
        }
        // The peer's fields are checked by the device against the hub that sent it (its
        // endpoint id and region); its keys' form here.
        if let Some(p) = &r.peer_hub
            && (p.day_keys.len() > MAX_PEER_DAY_KEYS
                || p.day_keys.iter().any(|k| k.to_recipient().is_err()))
        {
            return Err(TicketError::Invalid(
                "a refreshed peer hub's day key is not an age recipient".into(),
            ));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod hub_addrs_tests {
    use super::*;

    #[test]
    fn refresh_have_with_and_without_hub_addrs_round_trips() {
        let base = RefreshHave::of(crate::time::Day(20000), &[], &Keyring::default(), &[]);
        let old = base.to_bytes();
        assert_eq!(old.len(), REFRESH_HAVE_BYTES);
        assert_eq!(RefreshHave::from_bytes(&old), Some(base));
        let addrs = vec!["localhost:7447".to_owned()];
        let new = base.with_hub_addrs(&addrs);
        let bytes = new.to_bytes();
        assert_eq!(bytes.len(), REFRESH_HAVE_HUB_ADDRS_BYTES);
        let read = RefreshHave::from_bytes(&bytes).unwrap();
        assert_eq!(read.hub_addrs, Some(digest(&addrs)));
        assert_eq!(read, new);
        assert_eq!(RefreshHave::from_bytes(&bytes[..36]), None);
    }

    #[test]
    fn refresh_have_with_revocations_round_trips_and_needs_hub_addrs() {
        let base = RefreshHave::of(crate::time::Day(20000), &[], &Keyring::default(), &[]);
        // Without hub addresses the revocations are not encoded (their place is after them).
        let no_addrs = base.with_revocations(None).to_bytes();
        assert_eq!(no_addrs.len(), REFRESH_HAVE_BYTES);
        let list = crate::revocation::RevocationList {
            facility: crate::FacilityId::parse("f-test").unwrap(),
            version: 0,
            issued_at: 1_700_000_000,
            devices: vec![],
        };
        let have = base.with_hub_addrs(&[]).with_revocations(Some(&list));
        let bytes = have.to_bytes();
        assert_eq!(bytes.len(), REFRESH_HAVE_REVOCATIONS_BYTES);
        let read = RefreshHave::from_bytes(&bytes).unwrap();
        assert_eq!(read.revocations, Some((0, 1_700_000_000)));
        assert_eq!(read, have);
        assert_eq!(RefreshHave::from_bytes(&bytes[..44]), None);
    }

    #[test]
    fn a_refresh_without_hub_addrs_reads_as_before() {
        // What a hub of before this field sends.
        let r = Refresh::from_bytes(br#"{"day_keys":[]}"#).unwrap();
        assert!(r.hub_addrs.is_none() && r.is_empty());
        let with = Refresh {
            day_keys: vec![],
            keyring: None,
            roster: None,
            hub_addrs: Some(vec!["127.0.0.1:1".into()]),
            revocations: None,
            peer_hub: None,
        };
        assert!(!with.is_empty());
        let back = Refresh::from_bytes(&with.to_bytes()).unwrap();
        assert_eq!(back.hub_addrs, with.hub_addrs);
    }
}

#[cfg(test)]
mod peer_hub_tests {
    use super::*;
    use crate::daykey::DayKeyRatchet;
    use crate::facility::{FacilityStatus, Registration};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    const DAY: Day = Day(20_200);

    fn keys(seed: u64, from: Day, n: u32) -> Vec<DayPublicKey> {
        DayKeyRatchet::generate(&mut ChaCha8Rng::seed_from_u64(seed), from).publics(from, n)
    }

    fn peer(id: char, region: &str, day_keys: Vec<DayPublicKey>) -> PeerHub {
        PeerHub {
            contact: HubContact {
                endpoint_id: id.to_string().repeat(64),
                addrs: vec!["127.0.0.1:7448".into()],
                region: region.into(),
            },
            day_keys,
        }
    }

    fn ticket(peer_hubs: Vec<PeerHub>) -> EnrollmentTicket {
        let day_keys = keys(1, DAY, 40);
        EnrollmentTicket {
            kind: TICKET_KIND.into(),
            version: TICKET_VERSION,
            issued_at: u64::from(DAY.0) * 86_400,
            hub: HubContact {
                endpoint_id: "a".repeat(64),
                addrs: vec!["127.0.0.1:7447".into()],
                region: "mapo".into(),
            },
            facility: Facility {
                id: crate::FacilityId::parse("f-test").unwrap(),
                registration: Registration {
                    name: "Star".into(),
                    business_number: None,
                    representative: "Kim".into(),
                    phone: "02-123-4567".into(),
                    category: "karaoke".into(),
                    region: "mapo".into(),
                    address: "1 Wausan-ro".into(),
                },
                status: FacilityStatus::Approved,
                registered_at: 0,
            },
            device_id: DeviceId::parse("d-0123456789abcdef").unwrap(),
            device_name: "door".into(),
            credential: Credential([7; 32]),
            keyring: Keyring::default(),
            authority_recipient: day_keys[0].recipient.clone(),
            day_keys,
            peer_hubs,
        }
    }

    fn parse(t: &EnrollmentTicket) -> Result<EnrollmentTicket, TicketError> {
        EnrollmentTicket::parse(t.to_json().as_bytes())
    }

    #[test]
    fn a_ticket_without_peer_hubs_reads_and_writes_as_before() {
        let t = ticket(vec![]);
        assert!(!t.to_json().contains("peer_hubs"));
        assert!(parse(&t).unwrap().peer_hubs.is_empty());
    }

    #[test]
    fn a_tickets_peer_hub_is_checked() {
        let good = peer('b', "mapo", keys(2, DAY, 40));
        let back = parse(&ticket(vec![good.clone()])).unwrap();
        assert_eq!(back.peer_hubs, vec![good.clone()]);
        // Keys may be unknown yet.
        assert!(parse(&ticket(vec![peer('b', "mapo", vec![])])).is_ok());

        let invalid = |p: Vec<PeerHub>| matches!(parse(&ticket(p)), Err(TicketError::Invalid(_)));
        assert!(
            invalid(vec![good.clone(), peer('c', "mapo", vec![])]),
            "two peers"
        );
        assert!(invalid(vec![peer('a', "mapo", vec![])]), "the hub itself");
        assert!(
            invalid(vec![peer('A', "mapo", vec![])]),
            "the hub itself, upper case"
        );
        assert!(invalid(vec![peer('g', "mapo", vec![])]), "not hex");
        assert!(
            invalid(vec![peer('b', "gangnam", vec![])]),
            "another region"
        );
        let mut short = good.clone();
        short.contact.endpoint_id.pop();
        assert!(invalid(vec![short]));
        let mut no_addrs = good.clone();
        no_addrs.contact.addrs.clear();
        assert!(invalid(vec![no_addrs]));
        let mut bad_addr = good.clone();
        bad_addr.contact.addrs = vec!["no port".into()];
        assert!(invalid(vec![bad_addr]));
        let mut gap = good.clone();
        gap.day_keys.remove(3);
        assert!(invalid(vec![gap]), "keys not consecutive");
        let mut bad_key = good.clone();
        bad_key.day_keys[0].recipient = "age1nope".into();
        assert!(invalid(vec![bad_key]));
        let too_many = peer('b', "mapo", keys(3, DAY, 401));
        assert!(invalid(vec![too_many]));
        assert!(parse(&ticket(vec![peer('b', "mapo", keys(3, DAY, 400))])).is_ok());
    }

    #[test]
    fn refresh_have_with_peer_round_trips_and_older_encodings_still_decode() {
        let base = RefreshHave::of(DAY, &[], &Keyring::default(), &[]).with_hub_addrs(&[]);
        let p = peer('b', "mapo", keys(2, DAY, 5));
        // 48 bytes: revocations, no peer.
        let r48 = base.with_revocations(None);
        let b48 = r48.to_bytes();
        assert_eq!(b48.len(), REFRESH_HAVE_REVOCATIONS_BYTES);
        assert_eq!(RefreshHave::from_bytes(&b48), Some(r48));
        assert_eq!(RefreshHave::from_bytes(&b48).unwrap().peer, None);
        // 56 bytes: with the peer's digest.
        let r56 = r48.with_peer(Some(&p));
        let b56 = r56.to_bytes();
        assert_eq!(b56.len(), REFRESH_HAVE_PEER_BYTES);
        let read = RefreshHave::from_bytes(&b56).unwrap();
        assert_eq!(read, r56);
        assert_eq!(read.peer, Some(peer_digest(DAY, Some(&p))));
        assert_eq!(read.revocations, Some((0, 0)));
        // No peer held: zero bytes, still 56.
        let none = r48.with_peer(None).to_bytes();
        assert_eq!(none.len(), REFRESH_HAVE_PEER_BYTES);
        assert_eq!(RefreshHave::from_bytes(&none).unwrap().peer, Some([0; 8]));
        // The peer is placed after the revocations: without them it is not encoded.
        assert_eq!(
            base.with_peer(Some(&p)).to_bytes().len(),
            REFRESH_HAVE_HUB_ADDRS_BYTES
        );
        assert_eq!(RefreshHave::from_bytes(&b56[..52]), None);
        assert_eq!(RefreshHave::from_bytes(&[0; 64]), None);
    }

    #[test]
    fn peer_digest_covers_id_addresses_region_and_current_keys() {
        let p = peer('b', "mapo", keys(2, DAY, 5));
        let d = peer_digest(DAY, Some(&p));
        assert_eq!(peer_digest(DAY, None), [0; 8]);
        assert_ne!(d, [0; 8]);
        assert_eq!(d, peer_digest(DAY, Some(&p.clone())));
        let mut other = p.clone();
        other.contact.endpoint_id = "c".repeat(64);
        assert_ne!(peer_digest(DAY, Some(&other)), d);
        let mut moved = p.clone();
        moved.contact.addrs = vec!["127.0.0.1:9".into()];
        assert_ne!(peer_digest(DAY, Some(&moved)), d);
        let mut region = p.clone();
        region.contact.region = "gangnam".into();
        assert_ne!(peer_digest(DAY, Some(&region)), d);
        let mut rekeyed = p.clone();
        rekeyed.day_keys = keys(9, DAY, 5);
        assert_ne!(peer_digest(DAY, Some(&rekeyed)), d);
        // Keys of days before `from` do not count: yesterday's key is of no use.
        let mut with_yesterday = p.clone();
        with_yesterday
            .day_keys
            .insert(0, keys(4, DAY.minus(1), 1).remove(0));
        assert_eq!(peer_digest(DAY, Some(&with_yesterday)), d);
        assert_ne!(peer_digest(DAY.minus(1), Some(&with_yesterday)), d);
    }

    #[test]
    fn a_refresh_with_a_peer_hub_is_not_empty_and_round_trips() {
        let r = Refresh {
            peer_hub: Some(peer('b', "mapo", keys(2, DAY, 3))),
            ..Refresh::default()
        };
        assert!(!r.is_empty());
        let back = Refresh::from_bytes(&r.to_bytes()).unwrap();
        assert_eq!(back.peer_hub, r.peer_hub);
        assert!(
            !String::from_utf8(Refresh::default().to_bytes())
                .unwrap()
                .contains("peer_hub")
        );
        let mut bad = r.clone();
        bad.peer_hub.as_mut().unwrap().day_keys[0].recipient = "x".into();
        assert!(Refresh::from_bytes(&bad.to_bytes()).is_err());
    }
}
