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
}

impl std::fmt::Debug for EnrollmentTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentTicket")
            .field("facility", &self.facility.id)
            .field("device_id", &self.device_id)
            .field("device_name", &self.device_name)
            .field("hub", &self.hub)
            .field("day_keys", &self.day_keys.len())
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
        if self.hub.endpoint_id.len() != 64 || hex::decode(&self.hub.endpoint_id).is_err() {
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

impl Refresh {
    /// Whether it carries nothing: then the hub sends no refresh at all.
    pub fn is_empty(&self) -> bool {
        self.day_keys.is_empty()
            && self.keyring.is_none()
            && self.roster.is_none()
            && self.hub_addrs.is_none()
            && self.revocations.is_none()
    }
}

/// What a device already holds of the hub's refresh, sent in its hello (opaque to the sync
/// core) so the hub sends only the rest. 32 bytes, or 40 with the digest of the hub addresses
/// the device dials ([`REFRESH_HAVE_HUB_ADDRS_BYTES`]).
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
}

/// The length of an encoded [`RefreshHave`] without `hub_addrs`.
pub const REFRESH_HAVE_BYTES: usize = 32;
/// The length of an encoded [`RefreshHave`] with `hub_addrs`.
pub const REFRESH_HAVE_HUB_ADDRS_BYTES: usize = 40;
/// The length of an encoded [`RefreshHave`] with `hub_addrs` and `revocations`.
pub const REFRESH_HAVE_REVOCATIONS_BYTES: usize = 48;

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

    /// The 32 bytes of the hello.
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
            }
        }
        out
    }

    /// Parses a hello's bytes; `None` unless exactly [`REFRESH_HAVE_BYTES`],
    /// [`REFRESH_HAVE_HUB_ADDRS_BYTES`] or [`REFRESH_HAVE_REVOCATIONS_BYTES`] (the hub then
    /// sends everything).
    pub fn from_bytes(b: &[u8]) -> Option<RefreshHave> {
        if ![
            REFRESH_HAVE_BYTES,
            REFRESH_HAVE_HUB_ADDRS_BYTES,
            REFRESH_HAVE_REVOCATIONS_BYTES,
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
            revocations: (b.len() == REFRESH_HAVE_REVOCATIONS_BYTES).then(|| (four(40), four(44))),
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
        };
        assert!(!with.is_empty());
        let back = Refresh::from_bytes(&with.to_bytes()).unwrap();
        assert_eq!(back.hub_addrs, with.hub_addrs);
    }
}
