//! The entrance device's rules, once, for the `edge-node` binary and the simulation alike.
//!
//! Pure like the sync session: time comes in as an argument, the store's answers come in as
//! values (or a closure asked once), and what to write, drop or show comes out. The shells
//! (`edge-node`'s `Device` over redb, the simulation's in-memory devices) carry it out.
//!
//! - Scans: [`Scanner::scan`] verifies a KP1 code with the device's keyring and clock
//!   tolerance and applies the duplicate-code rule (a keyed hash of the token, remembered until
//!   the code has expired, [`SeenEntry`]); it returns the record to seal and the seen entry to
//!   store with it, or the verdict to show.
//! - Day keys and session keys: [`seal_key_day`] picks the hub's day public key a day's records
//!   are sealed to (the day's own, else the newest earlier one still inside retention: the
//!   fallback), [`seal_keys`] the keys of both hubs of a region of two; [`fallback_key_day`] and [`fallback_summary`] are what `status` counts of it;
//!   [`session_plan`], [`session_ended`] and [`session_survives_refresh`] say when a session
//!   key is reused, replaced or dropped.
//! - Paper entries: [`check_paper`] (the entry's form, the under-14 guardian rule, the visit
//!   time within skew of now and inside retention).
//! - Retention: [`purge_plan`] (the horizon from the corrected clock, the days to drop, the
//!   unsynced ones kept one grace day).
//! - Timing: [`RETENTION_EVERY_SECS`], [`session_check_wait`]; when to sync is
//!   `crate::sync::schedule`.
//! - Sibling admission: [`sibling_endpoint_known`] and [`admit_sibling_hello`], together
//!   [`admit_sibling`].
//! - The region's two hubs: [`peer_hub_update`] says what a hub's refresh may change of the
//!   other hub the device knows.

use crate::daykey::DayPublicKey;
use crate::envelope::{Record, RecordBody};
use crate::paper::{PaperEntry, PaperError};
use crate::revocation::RevocationList;
use crate::sync::{Decision, Peer, PeerHello, RefuseReason};
use crate::ticket::{PeerHub, Sibling};
use crate::time::{Day, UnixSeconds, horizon};
use crate::token::{Keyring, Verdict, verify};
use crate::{DeviceId, FacilityId};

pub use crate::token::DEFAULT_SKEW;

/// How often a running device enforces retention, seconds.
pub const RETENTION_EVERY_SECS: u64 = 3_600;
/// The longest wait between checks for an ended day's session key, seconds: the timer aims at
/// the next UTC midnight, and this cap bounds the error of a clock that was set while it slept.
pub const SESSION_CHECK_MAX_SECS: u64 = 60;

/// Seconds to wait at `now` before the next check for an ended day's session key: until one
/// second past the next UTC midnight, at most [`SESSION_CHECK_MAX_SECS`].
pub fn session_check_wait(now: UnixSeconds) -> u64 {
    let next_midnight = (now / 86_400 + 1) * 86_400;
    (next_midnight - now + 1).min(SESSION_CHECK_MAX_SECS)
}

// ---------------------------------------------------------------------------------------------
// Scans and the duplicate-code rule.

/// One entry of the seen-token memory: the keyed hash of a token, and until when it is
/// remembered (the code's expiry with the device's skew; a code past it is refused as expired
/// anyway, so remembering it longer would keep a visitor's trace for nothing).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SeenEntry {
    /// [`seen_hash`] of the token.
    pub hash: [u8; 32],
    /// Remembered while `now <= until`.
    pub until: UnixSeconds,
}

impl std::fmt::Debug for SeenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeenEntry")
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

/// The seen-token memory's key for `token`: keyed with the device's own secret and bound to
/// the facility, so the table reveals nothing about which codes were shown.
pub fn seen_hash(seen_key: &[u8; 32], facility: &FacilityId, token: &[u8; 16]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(seen_key);
    h.update(facility.as_str().as_bytes());
    h.update(&[0]);
    h.update(token);
    *h.finalize().as_bytes()
}

/// Whether a seen entry stored with `until` still counts at `now`.
pub fn seen_remembered(until: UnixSeconds, now: UnixSeconds) -> bool {
    until >= now
}

/// Seen entries that expired before this time may be deleted (with the next check-in's write).
pub fn seen_prune_before(now: UnixSeconds, skew: u64) -> UnixSeconds {
    now.saturating_sub(skew)
}

/// What a scan comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanVerdict {
    /// Show this refusal; nothing is stored.
    Refuse(Verdict),
    /// Seal `record` and store it with `seen`, in one durable write; only then show
    /// `accepted`.
    Accept {
        /// The visit to seal.
        record: Box<Record>,
        /// The seen-token entry to store with it.
        seen: SeenEntry,
    },
}

/// The device's side of a scan: what it trusts and who it is.
#[derive(Debug, Clone, Copy)]
pub struct Scanner<'a> {
    /// Trusted issuer keys.
    pub keyring: &'a Keyring,
    /// Clock tolerance for code expiry, seconds.
    pub skew: u64,
    /// The key of the seen-token hashes.
    pub seen_key: &'a [u8; 32],
    /// The facility the device logs for.
    pub facility: &'a FacilityId,
    /// The device.
    pub device: &'a DeviceId,
}

impl Scanner<'_> {
    /// Verifies the code's text at `now` (`token::verify`, the spec's order), then the
    /// duplicate rule: `seen(hash)` answers whether the store remembers the token's hash at
    /// `now` (asked only for a code that verified). Its error is the store's, passed through.
    pub fn scan<E>(
        &self,
        now: UnixSeconds,
        text: &str,
        seen: impl FnOnce(&[u8; 32]) -> Result<bool, E>,
    ) -> Result<ScanVerdict, E> {
        let token = match verify(text, self.keyring, now, self.skew) {
            Ok(t) => t,
            Err(verdict) => return Ok(ScanVerdict::Refuse(verdict)),
        };
        let hash = seen_hash(self.seen_key, self.facility, token.token().as_bytes());
        if seen(&hash)? {
            return Ok(ScanVerdict::Refuse(Verdict::Duplicate));
        }
        let record = Record {
            facility: self.facility.clone(),
            device: self.device.clone(),
            scanned_at: now,
            body: RecordBody::Qr {
                issuer_id: token.issuer_id(),
                key_id: token.key_id(),
                issued_at: token.issued_at(),
                token: *token.token().as_bytes(),
            },
        };
        Ok(ScanVerdict::Accept {
            record: Box::new(record),
            seen: SeenEntry {
                hash,
                until: token.valid_until(self.skew),
            },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Day keys and session keys.

/// The day whose hub public key seals `day`'s records at `now`, of the days the device holds
/// keys for: `day` itself, else (the device ran out of keys: no sync for weeks) the newest
/// earlier day still inside retention, whose secret the hub still keeps. Never a later day's
/// key: its secret would outlive the records' retention. `None`: no usable key.
pub fn seal_key_day(
    held: impl IntoIterator<Item = Day>,
    day: Day,
    now: UnixSeconds,
) -> Option<Day> {
    let h = horizon(now);
    let mut best = None;
    for k in held {
        if k == day {
            return Some(day);
        }
        if k < day && k >= h && best.is_none_or(|b| k > b) {
            best = Some(k);
        }
    }
    best
}

/// The hub day keys a record of `day` is sealed to at `now`, in a region of two hubs: the
/// enrolled hub's keys (`enrolled`) and the other hub's (`peer`, empty when the device knows
/// none). See [`seal_keys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealTo<'a> {
    /// The day of the keys (the record's own, else a fallback: [`seal_key_day`]).
    pub key_day: Day,
    /// The enrolled hub's key of `key_day`, if it holds one.
    pub enrolled: Option<&'a DayPublicKey>,
    /// The peer hub's key of `key_day`, if the device holds one.
    pub peer: Option<&'a DayPublicKey>,
}

impl<'a> SealTo<'a> {
    /// The keys to wrap the session key to (`SessionKey::wrap_to`): one or two.
    pub fn keys(&self) -> Vec<&'a DayPublicKey> {
        self.enrolled
            .iter()
            .chain(self.peer.iter())
            .copied()
            .collect()
    }

    /// Whether only one hub can open the key although the device knows a peer hub
    /// (`peer_known`): what `status` counts as a single-hub wrap.
    pub fn single_hub(&self, peer_known: bool) -> bool {
        peer_known && (self.enrolled.is_none() || self.peer.is_none())
    }
}

/// Which hub keys seal `day`'s records at `now`: the key day is [`seal_key_day`] over the days
/// either hub holds a key for (the day's own key from either hub, else the newest earlier live
/// day of either), and the session key is wrapped to every hub's key of that day. So with
/// both hubs' keys of the day it opens at either hub; a device that holds no key of the day for
/// its enrolled hub (a rebuilt hub whose new keys have not arrived) still seals under the
/// peer's; and a device with no peer hub seals exactly as a single-hub device. `None`: neither
/// hub has a usable key.
pub fn seal_keys<'a>(
    enrolled: &'a [DayPublicKey],
    peer: &'a [DayPublicKey],
    day: Day,
    now: UnixSeconds,
) -> Option<SealTo<'a>> {
    let key_day = seal_key_day(enrolled.iter().chain(peer).map(|k| k.day), day, now)?;
    Some(SealTo {
        key_day,
        enrolled: enrolled.iter().find(|k| k.day == key_day),
        peer: peer.iter().find(|k| k.day == key_day),
    })
}

/// [`seal_key_day`] over the keys themselves.
pub fn day_key_for(keys: &[DayPublicKey], day: Day, now: UnixSeconds) -> Option<&DayPublicKey> {
    let pick = seal_key_day(keys.iter().map(|k| k.day), day, now)?;
    keys.iter().find(|k| k.day == pick)
}

/// The fallback key's day when a record of `day` was sealed under `key_day`'s key, which
/// `status` counts; `None` when it had its own day's key.
pub fn fallback_key_day(day: Day, key_day: Day) -> Option<Day> {
    (key_day != day).then_some(key_day)
}

/// `status`'s figures of the fallback: from `(record day, records, key day)` rows, the live
/// records sealed under an earlier day's key, and how many days before their own 28 days are
/// up the earliest-expiring of them become unreadable at the hub.
pub fn fallback_summary(
    rows: impl IntoIterator<Item = (Day, u64, Day)>,
    now: UnixSeconds,
) -> (u64, u32) {
    let live = horizon(now);
    let mut sealed = 0;
    let mut days_early = 0;
    for (day, n, key_day) in rows {
        if day >= live {
            sealed += n;
            days_early = days_early.max(day.0.saturating_sub(key_day.0));
        }
    }
    (sealed, days_early)
}

/// The session key the device holds: the day it seals and the day of the hub key it was
/// wrapped to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSession {
    /// The day its records belong to.
    pub day: Day,
    /// The day of the hub public key it was wrapped to (earlier than `day` under fallback).
    pub key_day: Day,
}

/// What sealing a record of `day` at `now` needs of the session key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionPlan {
    /// Seal under the held key (today's, for a record of today).
    Reuse,
    /// Generate a key for the record's day and wrap it ([`seal_key_day`]); keep it afterwards
    /// only if `keep` (it is today's). A backdated paper entry's key seals that one record and
    /// is dropped: a running device never holds a key of a day other than today's.
    Fresh {
        /// Whether the new key replaces the held one.
        keep: bool,
    },
}

/// Whether a held session key must be dropped at `now`: it is not today's.
pub fn session_ended(held: HeldSession, now: UnixSeconds) -> bool {
    held.day != Day::of(now)
}

/// How to seal a record of `day` at `now` given the held session key, if any. Call
/// [`session_ended`] first (an ended key is dropped, not reused).
pub fn session_plan(held: Option<HeldSession>, day: Day, now: UnixSeconds) -> SessionPlan {
    let today = Day::of(now);
    match held {
        Some(s) if day == today && s.day == day => SessionPlan::Reuse,
        _ => SessionPlan::Fresh { keep: day == today },
    }
}

/// Whether a held session key stays after the hub's refresh: a key wrapped to an earlier day's
/// hub key for want of its own is dropped, so the next record starts a session wrapped to the
/// day's own key, which may now be here.
pub fn session_survives_refresh(held: HeldSession) -> bool {
    held.key_day == held.day
}

// ---------------------------------------------------------------------------------------------
// Paper entries.

/// A paper entry the device must not keep.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaperRefusal {
    /// The entry's form or consents (`PaperEntry::validate`).
    #[error(transparent)]
    Entry(#[from] PaperError),
    /// A visitor under 14 without a guardian's consent.
    #[error("a visitor under 14 needs a guardian's consent; nothing was recorded")]
    GuardianConsentMissing,
    /// The visit lies in the future beyond the clock tolerance.
    #[error("--visited-at lies in the future by this device's clock")]
    InTheFuture,
    /// The visit's day is past the retention horizon.
    #[error(
        "--visited-at is older than the 28-day retention period; such entries must not be kept"
    )]
    PastRetention,
}

/// The under-14 rule alone (a shell may check it before asking for the visitor's name).
pub fn check_guardian(minor: bool, guardian_consent: bool) -> Result<(), PaperRefusal> {
    if minor && !guardian_consent {
        Err(PaperRefusal::GuardianConsentMissing)
    } else {
        Ok(())
    }
}

/// The form rules of an entry, without the time: the guardian rule, then both consents and
/// the fields (`PaperEntry::validate`).
pub fn check_paper_form(entry: &PaperEntry, minor: bool) -> Result<(), PaperRefusal> {
    check_guardian(minor, entry.guardian_consent)?;
    entry.validate()?;
    Ok(())
}

/// Whether the device may keep `entry` at `now`: [`check_paper_form`], then the visit is not
/// later than `now + skew` and its day is not before the horizon. Returns the partition day.
pub fn check_paper(
    entry: &PaperEntry,
    minor: bool,
    now: UnixSeconds,
    skew: u64,
) -> Result<Day, PaperRefusal> {
    check_paper_form(entry, minor)?;
    if entry.visited_at > now.saturating_add(skew) {
        return Err(PaperRefusal::InTheFuture);
    }
    let day = Day::of(entry.visited_at);
    if day < horizon(now) {
        return Err(PaperRefusal::PastRetention);
    }
    Ok(day)
}

// ---------------------------------------------------------------------------------------------
// Retention.

/// A day the device holds: its records, and how many of them the hub is known to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldDay {
    /// The UTC day.
    pub day: Day,
    /// Records stored.
    pub total: u64,
    /// Records known to be at the hub (after the last completed hub session).
    pub synced: u64,
}

/// What retention does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgePlan {
    /// The time retention is enforced as of.
    pub as_of: UnixSeconds,
    /// Partitions of earlier days go (day keys of earlier days too).
    pub horizon: Day,
    /// Days to drop.
    pub dropped: Vec<Day>,
    /// Expired days kept one more day because the hub may not hold them yet.
    pub kept_unsynced: Vec<Day>,
}

/// Retention at device clock `now`: the clock is corrected by `clock_offset` (the device's
/// clock minus the hub's, learnt at the last sync), `as_of` may only move it forward, and a
/// partition the hub may not hold yet (fewer synced than stored) is kept for one grace day
/// past the horizon, so a clock that jumped forward does not destroy an unsynced visit early.
pub fn purge_plan(
    now: UnixSeconds,
    clock_offset: Option<i64>,
    as_of: Option<UnixSeconds>,
    days: impl IntoIterator<Item = HeldDay>,
) -> PurgePlan {
    let corrected = now.saturating_add_signed(clock_offset.unwrap_or(0).saturating_neg());
    let as_of = as_of.map_or(corrected, |a| a.max(corrected));
    let h = horizon(as_of);
    let mut dropped = Vec::new();
    let mut kept_unsynced = Vec::new();
    for d in days {
        if d.day >= h {
            continue;
        }
        if d.synced >= d.total || d.day < h.minus(1) {
            dropped.push(d.day);
        } else {
            kept_unsynced.push(d.day);
        }
    }
    PurgePlan {
        as_of,
        horizon: h,
        dropped,
        kept_unsynced,
    }
}

impl PurgePlan {
    /// Whether a day public key of `day` is kept (keys of expired days are useless).
    pub fn keeps_day_key(&self, day: Day) -> bool {
        day >= self.horizon
    }
}

// ---------------------------------------------------------------------------------------------
// Sibling admission.

/// Whether a connecting endpoint (hex id) is one this device serves: a sibling in the hub's
/// roster, or one the operator named (`--peer`), and in neither case a device the newest
/// hub-signed revocation list this device holds names (`revoked`): a revoked device's
/// endpoint is refused even when `--peer` names it, and before the roster drops it.
pub fn sibling_endpoint_known(
    roster: &[Sibling],
    operator_trusted: &[String],
    revoked: Option<&RevocationList>,
    endpoint: &str,
) -> bool {
    if revoked.is_some_and(|l| l.revokes_endpoint(endpoint)) {
        return false;
    }
    roster.iter().any(|s| s.endpoint_id == endpoint)
        || operator_trusted.iter().any(|t| t == endpoint)
}

/// The answer to a known endpoint's hello: only a device of this device's own facility that
/// the revocation list it holds does not name.
pub fn admit_sibling_hello(
    own: &FacilityId,
    revoked: Option<&RevocationList>,
    hello: &PeerHello,
) -> Decision {
    if !hello.push_only {
        // A sibling relays what it is handed; it never hands out what it holds.
        return Decision::Refuse {
            reason: RefuseReason::Protocol,
            detail: "devices only push their records; a session that downloads them is refused"
                .into(),
        };
    }
    match &hello.peer {
        Peer::Device { device, facility }
            if facility == own && revoked.is_some_and(|l| l.revokes_device(device)) =>
        {
            Decision::Refuse {
                reason: RefuseReason::Revoked,
                detail: "this device has been revoked by the hub".into(),
            }
        }
        Peer::Device { facility, .. } if facility == own => Decision::Admit {
            facility: own.clone(),
            refresh: None,
        },
        _ => Decision::Refuse {
            reason: RefuseReason::WrongFacility,
            detail: "this device syncs only with devices of its own facility".into(),
        },
    }
}

/// Who a device accepts a session from, both steps: the endpoint must be known and not
/// revoked ([`sibling_endpoint_known`]), then the hello must be a device of its facility that
/// is not revoked ([`admit_sibling_hello`]).
pub fn admit_sibling(
    own: &FacilityId,
    roster: &[Sibling],
    operator_trusted: &[String],
    revoked: Option<&RevocationList>,
    endpoint: &str,
    hello: &PeerHello,
) -> Decision {
    if revoked.is_some_and(|l| l.revokes_endpoint(endpoint)) {
        return Decision::Refuse {
            reason: RefuseReason::Revoked,
            detail: "this device has been revoked by the hub".into(),
        };
    }
    if !sibling_endpoint_known(roster, operator_trusted, revoked, endpoint) {
        return Decision::Refuse {
            reason: RefuseReason::UnknownDevice,
            detail: "not a known sibling (not in the hub's roster nor --peer)".into(),
        };
    }
    admit_sibling_hello(own, revoked, hello)
}

// ---------------------------------------------------------------------------------------------
// The region's two hubs.

/// What a device does with the peer hub ([`crate::ticket::Refresh::peer_hub`]) a hub's
/// refresh names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerHubUpdate {
    /// It is the other hub the device knows: take its addresses and day keys.
    Update,
    /// A hub the device does not know: it takes the place of the other hub the device knows
    /// (or becomes the peer, when the device knows only the answering hub). A hub rebuilt
    /// from nothing has a new endpoint id, and its peer announces it so.
    Replace,
    /// Not taken, and why.
    Ignore(String),
}

/// The rule for a refresh's peer hub `offered`, sent by the hub `answering` (the endpoint id
/// the device dialled and iroh authenticated) to a device of `region` that knows the hubs
/// `known` (endpoint ids, 1 or 2: the enrolled hub and the peer). Only a hub the device knows
/// may name a peer, only a peer of the device's region, never itself, and the peer's fields
/// must pass [`PeerHub::check`]. A known endpoint is [`PeerHubUpdate::Update`]d; an unknown
/// one replaces the hub other than `answering`: two hubs are never more than two, and a hub the
/// device does not know yet can never displace the one that vouches for it.
///
/// The hub the device was enrolled with (`enrolled`, whose ticket it holds) is its anchor:
/// only it may bring a hub the device does not know. The peer may describe the enrolled hub
/// ([`PeerHubUpdate::Update`]: its keys for days the device holds none of,
/// [`relayed_keys`]) but never replace it: a compromised or mis-paired peer hub must not cut
/// the device off from the hub it enrolled with (a device whose enrolled hub was rebuilt keeps
/// syncing with the other one, and is enrolled again to wrap to the rebuilt one).
pub fn peer_hub_update(
    region: &str,
    answering: &str,
    enrolled: &str,
    known: &[&str],
    offered: &PeerHub,
) -> PeerHubUpdate {
    let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    if !known.iter().any(|k| same(k, answering)) {
        return PeerHubUpdate::Ignore(
            "the answering hub is not one of this device's region's hubs".into(),
        );
    }
    if let Err(e) = offered.check(answering, region) {
        return PeerHubUpdate::Ignore(e);
    }
    if known.iter().any(|k| same(k, &offered.contact.endpoint_id)) {
        PeerHubUpdate::Update
    } else if same(answering, enrolled) || known.len() < 2 {
        PeerHubUpdate::Replace
    } else {
        PeerHubUpdate::Ignore(
            "only the hub this device enrolled with may name a hub it does not know".into(),
        )
    }
}

/// A hub's day keys as another hub relays them (a refresh's `peer_hub`): taken only for days
/// the device holds no key of that hub for. A hub's own refresh replaces its keys (a rebuilt
/// hub has new ones); a relayed copy never overwrites a key the device got first-hand, so a
/// compromised relaying hub cannot swap the other hub's keys for its own.
pub fn relayed_keys(
    held: &[crate::daykey::DayPublicKey],
    relayed: &[crate::daykey::DayPublicKey],
) -> Vec<crate::daykey::DayPublicKey> {
    let mut keys: std::collections::BTreeMap<Day, crate::daykey::DayPublicKey> =
        held.iter().map(|k| (k.day, k.clone())).collect();
    for k in relayed {
        keys.entry(k.day).or_insert_with(|| k.clone());
    }
    keys.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daykey::DayKeyRatchet;
    use crate::time::DAY_SECONDS;
    use crate::token::TestIssuer;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    /// Noon UTC of some day.
    const NOON: UnixSeconds = 20_200 * DAY_SECONDS + 12 * 3600;
    const D: Day = Day(20_200);

    fn issuer() -> TestIssuer {
        TestIssuer::new([0x11; 32], 1, 1)
    }

    fn keyring() -> Keyring {
        let mut k = Keyring::new();
        k.insert(issuer().keyring_entry("test", 0, u64::MAX))
            .expect("a fresh keyring takes a key");
        k
    }

    fn fac() -> FacilityId {
        FacilityId::parse("f-test").expect("an id")
    }

    fn dev() -> DeviceId {
        DeviceId::parse("d-0123456789abcdef").expect("an id")
    }

    fn scan_at(now: UnixSeconds, text: &str, seen: bool) -> ScanVerdict {
        let (k, f, d) = (keyring(), fac(), dev());
        let scanner = Scanner {
            keyring: &k,
            skew: DEFAULT_SKEW,
            seen_key: &[3; 32],
            facility: &f,
            device: &d,
        };
        let r: Result<ScanVerdict, ()> = scanner.scan(now, text, |_| Ok(seen));
        r.expect("no store error")
    }

    #[test]
    fn a_fresh_code_is_accepted_with_its_seen_entry_until_expiry_plus_skew() {
        let code = issuer().issue(NOON, 15, [9; 16]);
        let ScanVerdict::Accept { record, seen } = scan_at(NOON + 3, &code, false) else {
            panic!("refused");
        };
        assert_eq!(record.scanned_at, NOON + 3);
        assert_eq!(record.facility, fac());
        assert_eq!(seen.until, NOON + 15 + DEFAULT_SKEW);
        assert_eq!(seen.hash, seen_hash(&[3; 32], &fac(), &[9; 16]));
        // Keyed and bound to the facility.
        assert_ne!(seen.hash, seen_hash(&[4; 32], &fac(), &[9; 16]));
        let other = FacilityId::parse("f-other").expect("an id");
        assert_ne!(seen.hash, seen_hash(&[3; 32], &other, &[9; 16]));
    }

    #[test]
    fn a_remembered_code_is_a_duplicate_and_the_store_is_asked_only_after_verify() {
        let code = issuer().issue(NOON, 15, [9; 16]);
        assert_eq!(
            scan_at(NOON, &code, true),
            ScanVerdict::Refuse(Verdict::Duplicate)
        );
        let (k, f, d) = (keyring(), fac(), dev());
        let scanner = Scanner {
            keyring: &k,
            skew: DEFAULT_SKEW,
            seen_key: &[3; 32],
            facility: &f,
            device: &d,
        };
        let r = scanner.scan(NOON, "not a code", |_| Err("asked"));
        assert!(matches!(r, Ok(ScanVerdict::Refuse(v)) if v != Verdict::Duplicate));
        // A store error passes through.
        assert_eq!(scanner.scan(NOON, &code, |_| Err("disk")), Err("disk"));
    }

    #[test]
    fn expiry_is_at_the_skew_boundary() {
        let code = issuer().issue(NOON, 15, [9; 16]);
        let last = NOON + 15 + DEFAULT_SKEW;
        assert!(matches!(
            scan_at(last, &code, false),
            ScanVerdict::Accept { .. }
        ));
        assert_eq!(
            scan_at(last + 1, &code, false),
            ScanVerdict::Refuse(Verdict::Expired)
        );
    }

    #[test]
    fn seen_memory_lasts_until_its_expiry_and_is_pruned_after_the_skew() {
        assert!(seen_remembered(NOON, NOON));
        assert!(!seen_remembered(NOON, NOON + 1));
        assert_eq!(seen_prune_before(NOON, 10), NOON - 10);
        assert_eq!(seen_prune_before(5, 10), 0);
    }

    #[test]
    fn the_days_own_key_else_the_newest_earlier_live_one() {
        let days = |r: std::ops::RangeInclusive<u32>| r.map(Day).collect::<Vec<_>>();
        // Its own key.
        assert_eq!(seal_key_day(days(D.0 - 5..=D.0 + 5), D, NOON), Some(D));
        // Ran out: the newest earlier key, never a later one.
        assert_eq!(
            seal_key_day(
                days(D.0 - 10..=D.0 - 4).into_iter().chain([D.plus(3)]),
                D,
                NOON
            ),
            Some(D.minus(4))
        );
        // The horizon's own day is still live; the one before is not.
        let h = horizon(NOON);
        assert_eq!(seal_key_day([h], D, NOON), Some(h));
        assert_eq!(seal_key_day([h.minus(1)], D, NOON), None);
        assert_eq!(seal_key_day([D.plus(1)], D, NOON), None);
        // Over the keys.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let ratchet = DayKeyRatchet::generate(&mut rng, D.minus(10));
        let keys = ratchet.publics(D.minus(10), 5);
        assert_eq!(day_key_for(&keys, D, NOON).map(|k| k.day), Some(D.minus(6)));
        assert_eq!(fallback_key_day(D, D.minus(6)), Some(D.minus(6)));
        assert_eq!(fallback_key_day(D, D), None);
    }

    #[test]
    fn both_hubs_keys_of_the_day_else_either_hubs() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a = DayKeyRatchet::generate(&mut rng, D.minus(10)).publics(D.minus(10), 20);
        let b = DayKeyRatchet::generate(&mut rng, D.minus(10)).publics(D.minus(10), 20);
        let of = |keys: &[DayPublicKey], d: Day| keys.iter().find(|k| k.day == d).cloned();
        // Both hold the day: wrapped to both.
        let s = seal_keys(&a, &b, D, NOON).unwrap();
        assert_eq!(s.key_day, D);
        assert_eq!(s.keys(), vec![&of(&a, D).unwrap(), &of(&b, D).unwrap()]);
        assert!(!s.single_hub(true));
        // No peer known: exactly the single-hub rule, not counted.
        let s = seal_keys(&a, &[], D, NOON).unwrap();
        assert_eq!((s.key_day, s.keys().len()), (D, 1));
        assert!(!s.single_hub(false));
        assert_eq!(s.enrolled, day_key_for(&a, D, NOON));
        // The peer's keys end earlier: the enrolled hub's alone, counted.
        let b_short: Vec<DayPublicKey> = b.iter().filter(|k| k.day < D).cloned().collect();
        let s = seal_keys(&a, &b_short, D, NOON).unwrap();
        assert_eq!((s.key_day, s.peer), (D, None));
        assert!(s.single_hub(true));
        // The enrolled hub was rebuilt and its keys have not arrived: the peer's alone.
        let s = seal_keys(&[], &b, D, NOON).unwrap();
        assert_eq!((s.key_day, s.enrolled), (D, None));
        assert_eq!(s.keys(), vec![&of(&b, D).unwrap()]);
        assert!(s.single_hub(true));
        // The enrolled hub holds only earlier keys, the peer the day's own: the day's own.
        let a_short: Vec<DayPublicKey> = a.iter().filter(|k| k.day < D).cloned().collect();
        let s = seal_keys(&a_short, &b, D, NOON).unwrap();
        assert_eq!(s.key_day, D);
        // Neither holds the day: the newest earlier live day of either, both where both hold it.
        let s = seal_keys(&a_short, &b_short, D, NOON).unwrap();
        assert_eq!(s.key_day, D.minus(1));
        assert_eq!(s.keys().len(), 2);
        // Never a later day's key, nothing past the horizon.
        let later: Vec<DayPublicKey> = b.iter().filter(|k| k.day > D).cloned().collect();
        assert_eq!(seal_keys(&[], &later, D, NOON), None);
        assert_eq!(seal_keys(&[], &[], D, NOON), None);
    }

    #[test]
    fn a_peer_hub_is_taken_only_from_a_known_hub_of_the_region_and_never_itself() {
        use crate::ticket::HubContact;
        let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        let peer = |id: &str, region: &str| PeerHub {
            contact: HubContact {
                endpoint_id: id.into(),
                addrs: vec!["127.0.0.1:7448".into()],
                region: region.into(),
            },
            day_keys: vec![],
        };
        let both = [a.as_str(), b.as_str()];
        // a names b, b names a: the other known hub, updated.
        assert_eq!(
            peer_hub_update("mapo", &a, &a, &both, &peer(&b, "mapo")),
            PeerHubUpdate::Update
        );
        assert_eq!(
            peer_hub_update("mapo", &b, &a, &both, &peer(&a, "mapo")),
            PeerHubUpdate::Update
        );
        // A device that knows only a learns b.
        assert_eq!(
            peer_hub_update("mapo", &a, &a, &[&a], &peer(&b, "mapo")),
            PeerHubUpdate::Replace
        );
        // A third endpoint from the enrolled hub: the rebuilt other hub, replacing it.
        assert_eq!(
            peer_hub_update("mapo", &a, &a, &both, &peer(&c, "mapo")),
            PeerHubUpdate::Replace
        );
        // The peer hub may not replace the hub the device enrolled with (review finding 3).
        assert!(matches!(
            peer_hub_update("mapo", &b, &a, &both, &peer(&c, "mapo")),
            PeerHubUpdate::Ignore(_)
        ));
        let ignored = |u: PeerHubUpdate| matches!(u, PeerHubUpdate::Ignore(_));
        // A hub naming itself.
        assert!(ignored(peer_hub_update(
            "mapo",
            &a,
            &a,
            &both,
            &peer(&a, "mapo")
        )));
        assert!(ignored(peer_hub_update(
            "mapo",
            &a,
            &a,
            &both,
            &peer(&a.to_uppercase(), "mapo")
        )));
        // A peer of another region.
        assert!(ignored(peer_hub_update(
            "mapo",
            &a,
            &a,
            &both,
            &peer(&c, "gangnam")
        )));
        // A hub the device does not know (it never dials one, but the rule holds alone).
        assert!(ignored(peer_hub_update(
            "mapo",
            &c,
            &a,
            &both,
            &peer(&a, "mapo")
        )));
        // A malformed peer.
        assert!(ignored(peer_hub_update(
            "mapo",
            &a,
            &a,
            &both,
            &peer("zz", "mapo")
        )));
    }

    #[test]
    fn a_relayed_copy_of_a_hubs_keys_never_replaces_a_key_held_first_hand() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let own = DayKeyRatchet::generate(&mut rng, D);
        let other = DayKeyRatchet::generate(&mut rng, D);
        let held = own.publics(D, 3);
        let relayed = other.publics(D, 5);
        let merged = relayed_keys(&held, &relayed);
        assert_eq!(merged.len(), 5);
        assert_eq!(
            &merged[..3],
            &held[..],
            "held days keep their first-hand keys"
        );
        assert_eq!(&merged[3..], &relayed[3..], "missing days are filled");
    }

    #[test]
    fn fallback_summary_counts_live_days_only() {
        let h = horizon(NOON);
        let rows = [
            (D, 2, D.minus(4)),
            (D.minus(1), 1, D.minus(2)),
            (h.minus(1), 9, h.minus(9)),
        ];
        assert_eq!(fallback_summary(rows, NOON), (3, 4));
        assert_eq!(fallback_summary([], NOON), (0, 0));
    }

    #[test]
    fn session_keys_are_todays_only() {
        let today = HeldSession { day: D, key_day: D };
        assert!(!session_ended(today, NOON));
        assert!(!session_ended(today, D.plus(1).start() - 1));
        assert!(session_ended(today, D.plus(1).start()));
        assert_eq!(session_plan(Some(today), D, NOON), SessionPlan::Reuse);
        assert_eq!(
            session_plan(None, D, NOON),
            SessionPlan::Fresh { keep: true }
        );
        // A backdated entry: a one-off key, today's stays.
        assert_eq!(
            session_plan(Some(today), D.minus(2), NOON),
            SessionPlan::Fresh { keep: false }
        );
        // A key of yesterday is not reused today.
        let old = HeldSession {
            day: D.minus(1),
            key_day: D.minus(1),
        };
        assert_eq!(
            session_plan(Some(old), D, NOON),
            SessionPlan::Fresh { keep: true }
        );
        // A fallback-wrapped key goes with the refresh; its own day's key stays.
        assert!(session_survives_refresh(today));
        assert!(!session_survives_refresh(HeldSession {
            day: D,
            key_day: D.minus(4)
        }));
    }

    #[test]
    fn session_check_wakes_just_after_midnight_and_at_least_every_minute() {
        let midnight = 20_000 * DAY_SECONDS;
        assert_eq!(session_check_wait(midnight - 30), 31);
        assert_eq!(session_check_wait(midnight - 1), 2);
        assert_eq!(session_check_wait(midnight), SESSION_CHECK_MAX_SECS);
        for now in (midnight - 200)..(midnight + 200) {
            let w = session_check_wait(now);
            assert!(w > 0 && w <= SESSION_CHECK_MAX_SECS, "{now}: {w}");
        }
    }

    fn paper(visited_at: UnixSeconds, guardian: bool) -> PaperEntry {
        PaperEntry {
            name: "Hong Gildong".into(),
            phone: "010-1234-5678".into(),
            safe_number: None,
            visited_at,
            consent_collect: true,
            consent_share: true,
            guardian_consent: guardian,
            remarks: String::new(),
        }
    }

    #[test]
    fn a_minor_needs_a_guardians_consent() {
        assert_eq!(check_paper(&paper(NOON, false), false, NOON, 10), Ok(D));
        assert_eq!(check_paper(&paper(NOON, true), true, NOON, 10), Ok(D));
        assert_eq!(
            check_paper(&paper(NOON, false), true, NOON, 10),
            Err(PaperRefusal::GuardianConsentMissing)
        );
        assert_eq!(
            check_guardian(true, false),
            Err(PaperRefusal::GuardianConsentMissing)
        );
        let mut no_consent = paper(NOON, false);
        no_consent.consent_share = false;
        assert!(matches!(
            check_paper(&no_consent, false, NOON, 10),
            Err(PaperRefusal::Entry(PaperError::ConsentMissing { .. }))
        ));
    }

    #[test]
    fn paper_visit_times_are_bounded_by_skew_and_horizon() {
        assert_eq!(
            check_paper(&paper(NOON + 10, false), false, NOON, 10),
            Ok(D)
        );
        assert_eq!(
            check_paper(&paper(NOON + 11, false), false, NOON, 10),
            Err(PaperRefusal::InTheFuture)
        );
        let h = horizon(NOON);
        assert_eq!(
            check_paper(&paper(h.start(), false), false, NOON, 10),
            Ok(h)
        );
        assert_eq!(
            check_paper(&paper(h.start() - 1, false), false, NOON, 10),
            Err(PaperRefusal::PastRetention)
        );
    }

    fn held(day: Day, total: u64, synced: u64) -> HeldDay {
        HeldDay { day, total, synced }
    }

    #[test]
    fn retention_drops_past_the_horizon_and_keeps_unsynced_one_grace_day() {
        let h = horizon(NOON);
        let days = [
            held(h, 5, 0),
            held(h.minus(1), 5, 4),
            held(h.minus(2), 5, 0),
            held(h.minus(3), 5, 5),
        ];
        let p = purge_plan(NOON, None, None, days);
        assert_eq!(p.horizon, h);
        assert_eq!(p.as_of, NOON);
        assert_eq!(p.dropped, vec![h.minus(2), h.minus(3)]);
        assert_eq!(p.kept_unsynced, vec![h.minus(1)]);
        // Synced: no grace.
        let p = purge_plan(NOON, None, None, [held(h.minus(1), 5, 5)]);
        assert_eq!(p.dropped, vec![h.minus(1)]);
        assert!(p.keeps_day_key(h) && !p.keeps_day_key(h.minus(1)));
    }

    #[test]
    fn retention_corrects_the_clock_and_as_of_only_moves_forward() {
        let h = horizon(NOON);
        let days = [held(h, 1, 1)];
        // A device clock a day fast, which the hub measured: the horizon stays.
        let p = purge_plan(NOON + DAY_SECONDS, Some(DAY_SECONDS as i64), None, days);
        assert_eq!((p.as_of, p.horizon), (NOON, h));
        assert!(p.dropped.is_empty());
        // Without the correction the day would go.
        let p = purge_plan(NOON + DAY_SECONDS, None, None, days);
        assert_eq!(p.dropped, vec![h]);
        // `as_of` earlier than the clock is ignored; later moves it.
        assert_eq!(purge_plan(NOON, None, Some(NOON - 999), days).as_of, NOON);
        let p = purge_plan(NOON, None, Some(NOON + DAY_SECONDS), days);
        assert_eq!(p.dropped, vec![h]);
    }

    fn sibling(endpoint: &str) -> Sibling {
        Sibling {
            device_id: DeviceId::parse("d-1111111111111111").expect("an id"),
            name: "back door".into(),
            endpoint_id: endpoint.into(),
            addrs: Vec::new(),
        }
    }

    #[test]
    fn siblings_are_admitted_from_the_roster_or_the_operator_and_of_the_facility() {
        let hi = |peer: Peer, push_only: bool| PeerHello {
            peer,
            credential: None,
            now: 0,
            refresh_have: None,
            push_only,
        };
        let me = hi(
            Peer::Device {
                device: dev(),
                facility: fac(),
            },
            true,
        );
        let roster = [sibling("aa")];
        let admitted = |d: &Decision| matches!(d, Decision::Admit { .. });
        assert!(admitted(&admit_sibling(
            &fac(),
            &roster,
            &[],
            None,
            "aa",
            &me
        )));
        assert!(admitted(&admit_sibling(
            &fac(),
            &[],
            &["bb".into()],
            None,
            "bb",
            &me
        )));
        assert!(matches!(
            admit_sibling(&fac(), &roster, &[], None, "cc", &me),
            Decision::Refuse {
                reason: RefuseReason::UnknownDevice,
                ..
            }
        ));
        let stranger = hi(
            Peer::Device {
                device: dev(),
                facility: FacilityId::parse("f-other").expect("an id"),
            },
            true,
        );
        assert!(matches!(
            admit_sibling(&fac(), &roster, &[], None, "aa", &stranger),
            Decision::Refuse {
                reason: RefuseReason::WrongFacility,
                ..
            }
        ));
        let hub = hi(Peer::Hub { region: "r".into() }, true);
        assert!(!admitted(&admit_sibling_hello(&fac(), None, &hub)));
        // Finding 2 of the sync v2 review: a sibling that asks to download is refused.
        let puller = hi(me.peer.clone(), false);
        assert!(matches!(
            admit_sibling(&fac(), &roster, &[], None, "aa", &puller),
            Decision::Refuse {
                reason: RefuseReason::Protocol,
                ..
            }
        ));
    }

    #[test]
    fn a_revoked_sibling_is_refused_by_endpoint_and_by_hello_even_when_named_by_peer() {
        let me = PeerHello {
            peer: Peer::Device {
                device: dev(),
                facility: fac(),
            },
            credential: None,
            now: 0,
            refresh_have: None,
            push_only: true,
        };
        let list = RevocationList {
            facility: fac(),
            version: 1,
            issued_at: 10,
            devices: vec![crate::revocation::RevokedDevice {
                device_id: dev(),
                endpoint_id: Some("aa".into()),
                revoked_at: 5,
            }],
        };
        let roster = [sibling("aa")];
        let operator = ["aa".to_owned()];
        // Known by the roster and by `--peer`, but revoked: its endpoint is not served.
        assert!(sibling_endpoint_known(&roster, &operator, None, "aa"));
        assert!(!sibling_endpoint_known(
            &roster,
            &operator,
            Some(&list),
            "aa"
        ));
        assert!(matches!(
            admit_sibling(&fac(), &roster, &operator, Some(&list), "aa", &me),
            Decision::Refuse {
                reason: RefuseReason::Revoked,
                ..
            }
        ));
        // From another endpoint (re-keyed, or never bound at the hub): its hello names it.
        assert!(matches!(
            admit_sibling(&fac(), &[sibling("bb")], &[], Some(&list), "bb", &me),
            Decision::Refuse {
                reason: RefuseReason::Revoked,
                ..
            }
        ));
        // Other devices of the facility still get in.
        let other = PeerHello {
            peer: Peer::Device {
                device: DeviceId::parse("d-1111111111111111").expect("an id"),
                facility: fac(),
            },
            ..me.clone()
        };
        assert!(matches!(
            admit_sibling(&fac(), &[sibling("bb")], &[], Some(&list), "bb", &other),
            Decision::Admit { .. }
        ));
    }
}
