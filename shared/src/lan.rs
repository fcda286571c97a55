//! Sibling discovery on the facility's local network, the pure parts (`docs/lan.md`).
//!
//! Every running device sends a small UDP multicast beacon at a fixed rate to
//! [`GROUP`]:[`PORT`]. A beacon carries only a blinded tag and the device's sync port: the tag
//! is a keyed hash of the UTC day under a key derived from the facility id and the device's
//! endpoint id, so it changes every day and only someone who knows both (the hub, and the
//! facility's devices through the hub's roster) can tell whose beacon it is. A stranger on
//! the network sees fixed-size datagrams at a fixed rate from hosts it already sees: no
//! facility, no endpoint id, nothing that grows with visits.
//!
//! A device computes the tags it expects from each sibling in its roster ([`Matcher`]) and
//! remembers the source address of a matching beacon as a dial target ([`Sightings`]). A
//! beacon is not proof of anything: the address and port are not authenticated (anyone on
//! the link can replay a tag from another address), so a sighting only adds an address to
//! try; the QUIC handshake proves the endpoint, and the device still serves only endpoints of
//! the hub's roster.
//!
//! No IO here: the edge node's `lan` module owns the socket and the clock.

use crate::ids::FacilityId;
use crate::ticket::Sibling;
use crate::time::{Day, UnixSeconds};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

/// The multicast group beacons go to: in the organization-local scope (239.255.0.0/16,
/// RFC 2365), which routers do not forward off the site; beacons are also sent with TTL 1.
pub const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 74, 80);
/// The UDP port of the group (next to the device's default sync port 7450 and API 7451).
pub const PORT: u16 = 7452;
/// Seconds between two beacons of a device, whatever it does.
pub const BEACON_EVERY_SECS: u64 = 5;
/// How long an address seen in a beacon stays a dial target without being seen again.
pub const KEEP_ADDR_SECS: u64 = 600;
/// At most this many addresses are kept per sibling (the newest): a replayed beacon from a
/// stranger's address adds a target, it cannot push the real one out unless it is repeated
/// from this many addresses.
pub const MAX_ADDRS: usize = 4;
/// At most this many roster members are matched (a roster is a facility's devices).
pub const MAX_MEMBERS: usize = 256;

/// The beacon format's version.
pub const VERSION: u8 = 1;
/// Bytes in a tag.
pub const TAG_LEN: usize = 16;
/// Bytes in a beacon: version, flags (0), the sync port (big-endian), the tag.
pub const BEACON_LEN: usize = 4 + TAG_LEN;

const KEY_CONTEXT: &str = "kipass 2026-12 lan beacon key v1";

/// A beacon's blinded tag.
pub type Tag = [u8; TAG_LEN];

/// The tag a device with endpoint id `endpoint` of `facility` sends on `day`.
pub fn tag(facility: &FacilityId, endpoint: &[u8; 32], day: Day) -> Tag {
    let mut material = Vec::with_capacity(facility.as_str().len() + 1 + 32);
    material.extend_from_slice(facility.as_str().as_bytes());
    material.push(0);
    material.extend_from_slice(endpoint);
    let key = blake3::derive_key(KEY_CONTEXT, &material);
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(b"day:");
    msg[4..].copy_from_slice(&day.0.to_be_bytes());
    let hash = blake3::keyed_hash(&key, &msg);
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&hash.as_bytes()[..TAG_LEN]);
    out
}

/// One beacon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beacon {
    /// The sender's tag of the day.
    pub tag: Tag,
    /// The UDP port the sender syncs on (the source port is the beacon socket's).
    pub port: u16,
}

/// Why bytes are not a beacon.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BeaconError {
    /// Not exactly [`BEACON_LEN`] bytes.
    #[error("a beacon is {BEACON_LEN} bytes, not {0}")]
    Length(usize),
    /// Another version of the format.
    #[error("beacon version {0} is not {VERSION}")]
    Version(u8),
    /// Flags this version does not define.
    #[error("beacon flags {0:#04x} are not 0")]
    Flags(u8),
    /// Port 0.
    #[error("a beacon names port 0")]
    Port,
}

impl Beacon {
    /// The beacon's bytes.
    pub fn encode(&self) -> [u8; BEACON_LEN] {
        let mut out = [0u8; BEACON_LEN];
        out[0] = VERSION;
        out[1] = 0;
        out[2..4].copy_from_slice(&self.port.to_be_bytes());
        out[4..].copy_from_slice(&self.tag);
        out
    }

    /// Parses a datagram: exactly [`BEACON_LEN`] bytes of this version, no flags, a port.
    pub fn decode(bytes: &[u8]) -> Result<Beacon, BeaconError> {
        let b: &[u8; BEACON_LEN] = bytes
            .try_into()
            .map_err(|_| BeaconError::Length(bytes.len()))?;
        if b[0] != VERSION {
            return Err(BeaconError::Version(b[0]));
        }
        if b[1] != 0 {
            return Err(BeaconError::Flags(b[1]));
        }
        let port = u16::from_be_bytes([b[2], b[3]]);
        if port == 0 {
            return Err(BeaconError::Port);
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&b[4..]);
        Ok(Beacon { tag, port })
    }
}

/// An endpoint id in hex (as rosters carry it) as bytes.
pub fn endpoint_bytes(hex_id: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_id, &mut out).ok()?;
    Some(out)
}

/// The tags a device expects from its siblings around one day: each roster member's tag of
/// the day before, the day and the day after (clocks of two devices may straddle midnight).
#[derive(Debug, Clone)]
pub struct Matcher {
    day: Day,
    expected: BTreeMap<Tag, String>,
}

impl Matcher {
    /// The matcher of `facility`'s `roster` (this device's siblings) on `day`; members whose
    /// endpoint id is not hex, and `own` (this device's own beacons come back on loopback),
    /// are left out; at most [`MAX_MEMBERS`].
    pub fn new(facility: &FacilityId, roster: &[Sibling], own: &[u8; 32], day: Day) -> Matcher {
        let mut expected = BTreeMap::new();
        for s in roster.iter().take(MAX_MEMBERS) {
            let Some(id) = endpoint_bytes(&s.endpoint_id) else {
                continue;
            };
            if &id == own {
                continue;
            }
            for d in [day.minus(1), day, day.plus(1)] {
                expected.insert(tag(facility, &id, d), s.endpoint_id.clone());
            }
        }
        Matcher { day, expected }
    }

    /// The day the matcher was made for.
    pub fn day(&self) -> Day {
        self.day
    }

    /// The endpoint id (hex) of the roster member that sent `beacon`, if any.
    pub fn matches(&self, beacon: &Beacon) -> Option<&str> {
        self.expected.get(&beacon.tag).map(String::as_str)
    }
}

/// One address a sibling's beacon came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenAddr {
    /// The source IP of the beacon and the sync port it named.
    pub addr: SocketAddr,
    /// When a beacon last came from it.
    pub seen_at: UnixSeconds,
}

/// The addresses siblings' beacons came from, per endpoint id (hex); newest first, at most
/// [`MAX_ADDRS`] each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sightings {
    /// Endpoint id → addresses, newest first.
    pub siblings: BTreeMap<String, Vec<SeenAddr>>,
}

impl Sightings {
    /// Records a beacon of `endpoint` from `addr` at `now`. Returns whether the dial targets
    /// changed (an address not seen before, or one that moved to the front).
    pub fn observe(&mut self, endpoint: &str, addr: SocketAddr, now: UnixSeconds) -> bool {
        let list = self.siblings.entry(endpoint.to_owned()).or_default();
        let was_first = list.first().map(|s| s.addr) == Some(addr);
        list.retain(|s| s.addr != addr);
        list.insert(0, SeenAddr { addr, seen_at: now });
        list.truncate(MAX_ADDRS);
        !was_first
    }

    /// Forgets addresses not seen for [`KEEP_ADDR_SECS`] at `now`, and endpoints not in
    /// `members` (hex endpoint ids of the roster).
    pub fn prune(&mut self, now: UnixSeconds, members: &[&str]) {
        self.siblings.retain(|id, list| {
            list.retain(|s| now.saturating_sub(s.seen_at) <= KEEP_ADDR_SECS);
            !list.is_empty() && members.contains(&id.as_str())
        });
    }

    /// The live addresses of `endpoint` at `now`, newest first.
    pub fn addrs(&self, endpoint: &str, now: UnixSeconds) -> Vec<SocketAddr> {
        self.siblings
            .get(endpoint)
            .map(|list| {
                list.iter()
                    .filter(|s| now.saturating_sub(s.seen_at) <= KEEP_ADDR_SECS)
                    .map(|s| s.addr)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// When `endpoint`'s beacon was last seen, if it is live at `now`.
    pub fn last_seen(&self, endpoint: &str, now: UnixSeconds) -> Option<UnixSeconds> {
        self.siblings
            .get(endpoint)?
            .iter()
            .map(|s| s.seen_at)
            .filter(|t| now.saturating_sub(*t) <= KEEP_ADDR_SECS)
            .max()
    }
}

/// The addresses to dial a roster sibling at: those seen on the local network (newest first),
/// then those the hub's roster names, without repeats.
pub fn dial_addrs(sibling: &Sibling, sightings: &Sightings, now: UnixSeconds) -> Vec<SocketAddr> {
    let mut out = sightings.addrs(&sibling.endpoint_id, now);
    for a in sibling.addrs.iter().filter_map(|a| a.parse().ok()) {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// One sibling as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiblingStatus {
    /// Its device id.
    pub device_id: String,
    /// Where it stands.
    pub name: String,
    /// Its endpoint id.
    pub endpoint_id: String,
    /// Addresses its beacons came from on the local network lately, newest first.
    pub lan_addrs: Vec<String>,
    /// When its last beacon was seen, or null.
    pub lan_seen_at: Option<UnixSeconds>,
    /// Where the hub last saw it connect from.
    pub roster_addrs: Vec<String>,
    /// When a session this device opened with it last completed, or null.
    pub last_reached: Option<UnixSeconds>,
}

/// The siblings `status` shows: every roster member (with where it was seen), in roster order.
pub fn sibling_status(
    roster: &[Sibling],
    sightings: &Sightings,
    reached: &BTreeMap<String, UnixSeconds>,
    now: UnixSeconds,
) -> Vec<SiblingStatus> {
    roster
        .iter()
        .map(|s| SiblingStatus {
            device_id: s.device_id.to_string(),
            name: s.name.clone(),
            endpoint_id: s.endpoint_id.clone(),
            lan_addrs: sightings
                .addrs(&s.endpoint_id, now)
                .iter()
                .map(ToString::to_string)
                .collect(),
            lan_seen_at: sightings.last_seen(&s.endpoint_id, now),
            roster_addrs: s.addrs.clone(),
            last_reached: reached.get(&s.endpoint_id).copied(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceId;
    use proptest::prelude::*;

    fn fac(s: &str) -> FacilityId {
        FacilityId::parse(s).expect("an id")
    }

    fn sibling(n: u8, addrs: &[&str]) -> Sibling {
        Sibling {
            device_id: DeviceId::parse(&format!("d-00000000000000{n:02x}")).expect("an id"),
            name: format!("door {n}"),
            endpoint_id: hex::encode([n; 32]),
            addrs: addrs.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn tags_depend_on_facility_endpoint_and_day_and_nothing_else() {
        let f = fac("f-one");
        let t = tag(&f, &[1; 32], Day(20_000));
        assert_eq!(t, tag(&f, &[1; 32], Day(20_000)), "deterministic");
        assert_ne!(t, tag(&f, &[1; 32], Day(20_001)), "rotates daily");
        assert_ne!(t, tag(&f, &[2; 32], Day(20_000)), "per device");
        assert_ne!(t, tag(&fac("f-two"), &[1; 32], Day(20_000)), "per facility");
        // The tag shows neither the endpoint id nor the facility id.
        assert!(!t.windows(4).any(|w| w == [1; 4]));
    }

    #[test]
    fn beacons_round_trip_and_decode_strictly() {
        let b = Beacon {
            tag: [9; TAG_LEN],
            port: 7450,
        };
        let bytes = b.encode();
        assert_eq!(bytes.len(), BEACON_LEN);
        assert_eq!(Beacon::decode(&bytes), Ok(b));
        assert_eq!(
            Beacon::decode(&bytes[..BEACON_LEN - 1]),
            Err(BeaconError::Length(BEACON_LEN - 1))
        );
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(
            Beacon::decode(&long),
            Err(BeaconError::Length(BEACON_LEN + 1))
        );
        let mut v = bytes;
        v[0] = 2;
        assert_eq!(Beacon::decode(&v), Err(BeaconError::Version(2)));
        let mut f = bytes;
        f[1] = 1;
        assert_eq!(Beacon::decode(&f), Err(BeaconError::Flags(1)));
        let zero = Beacon {
            tag: [9; 16],
            port: 0,
        }
        .encode();
        assert_eq!(Beacon::decode(&zero), Err(BeaconError::Port));
        assert_eq!(Beacon::decode(&[]), Err(BeaconError::Length(0)));
    }

    #[test]
    fn the_matcher_knows_roster_siblings_around_the_day_but_not_itself_or_strangers() {
        let f = fac("f-one");
        let roster = [sibling(1, &[]), sibling(2, &[])];
        let day = Day(20_000);
        let m = Matcher::new(&f, &roster, &[2; 32], day);
        assert_eq!(m.day(), day);
        let beacon = |id: u8, d: Day, f: &FacilityId| Beacon {
            tag: tag(f, &[id; 32], d),
            port: 7450,
        };
        let one = hex::encode([1u8; 32]);
        for d in [day.minus(1), day, day.plus(1)] {
            assert_eq!(m.matches(&beacon(1, d, &f)), Some(one.as_str()));
        }
        assert_eq!(m.matches(&beacon(1, day.plus(2), &f)), None, "stale day");
        assert_eq!(m.matches(&beacon(1, day.minus(2), &f)), None, "stale day");
        assert_eq!(m.matches(&beacon(2, day, &f)), None, "its own beacon");
        assert_eq!(m.matches(&beacon(3, day, &f)), None, "not in the roster");
        assert_eq!(
            m.matches(&beacon(1, day, &fac("f-two"))),
            None,
            "another facility's device with the same endpoint id"
        );
    }

    #[test]
    fn sightings_keep_the_newest_addresses_and_forget_old_ones() {
        let mut s = Sightings::default();
        let id = hex::encode([1u8; 32]);
        assert!(s.observe(&id, addr("10.0.0.2:7450"), 100));
        assert!(!s.observe(&id, addr("10.0.0.2:7450"), 105), "same address");
        assert_eq!(s.last_seen(&id, 106), Some(105));
        // The sibling's address changed: the new one comes first, the old one stays a while.
        assert!(s.observe(&id, addr("10.0.0.3:7450"), 110));
        assert_eq!(
            s.addrs(&id, 111),
            vec![addr("10.0.0.3:7450"), addr("10.0.0.2:7450")]
        );
        for i in 0..10 {
            s.observe(&id, addr(&format!("10.0.1.{i}:7450")), 120 + i);
        }
        assert_eq!(s.addrs(&id, 130).len(), MAX_ADDRS);
        assert_eq!(s.addrs(&id, 130)[0], addr("10.0.1.9:7450"));
        // Ten minutes without a beacon: gone.
        assert_eq!(s.addrs(&id, 129 + KEEP_ADDR_SECS + 1), vec![]);
        assert_eq!(s.last_seen(&id, 129 + KEEP_ADDR_SECS + 1), None);
        s.prune(129 + KEEP_ADDR_SECS, &[id.as_str()]);
        assert_eq!(s.addrs(&id, 129 + KEEP_ADDR_SECS).len(), 1);
        s.prune(129 + KEEP_ADDR_SECS, &[]);
        assert_eq!(s, Sightings::default(), "not in the roster any more");
    }

    #[test]
    fn dial_addresses_put_the_lan_first_and_status_shows_both() {
        let mut s = Sightings::default();
        let a = sibling(1, &["127.0.0.1:9000", "10.0.0.2:7450"]);
        let b = sibling(2, &[]);
        s.observe(&a.endpoint_id, addr("10.0.0.2:7450"), 100);
        s.observe(&a.endpoint_id, addr("10.0.0.3:7450"), 101);
        assert_eq!(
            dial_addrs(&a, &s, 102),
            vec![
                addr("10.0.0.3:7450"),
                addr("10.0.0.2:7450"),
                addr("127.0.0.1:9000")
            ]
        );
        assert_eq!(dial_addrs(&b, &s, 102), vec![]);
        let reached = BTreeMap::from([(a.endpoint_id.clone(), 99)]);
        let st = sibling_status(&[a.clone(), b.clone()], &s, &reached, 102);
        assert_eq!(st.len(), 2);
        assert_eq!(st[0].lan_addrs, vec!["10.0.0.3:7450", "10.0.0.2:7450"]);
        assert_eq!(st[0].lan_seen_at, Some(101));
        assert_eq!(st[0].last_reached, Some(99));
        assert_eq!(st[0].roster_addrs, a.addrs);
        assert_eq!(st[1].lan_addrs, Vec::<String>::new());
        assert_eq!(st[1].lan_seen_at, None);
        assert_eq!(st[1].last_reached, None);
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(b) = Beacon::decode(&bytes) {
                let again = b.encode();
                prop_assert_eq!(again.as_slice(), bytes.as_slice());
            }
        }

        #[test]
        fn every_beacon_round_trips(tag in any::<[u8; TAG_LEN]>(), port in 1u16..) {
            let b = Beacon { tag, port };
            prop_assert_eq!(Beacon::decode(&b.encode()), Ok(b));
        }
    }
}
