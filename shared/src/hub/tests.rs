//! The hub core's rules, accepted and refused, at their boundaries.

use super::*;
use crate::daykey::DayKeyRatchet;
use crate::envelope::SessionKey;
use crate::partition::Partition;
use crate::unseal::unseal_partition;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use std::cell::RefCell;

const DAY: Day = Day(20_000);
const T: UnixSeconds = 20_000 * 86_400 + 12 * 3_600;

fn fac(s: &str) -> FacilityId {
    FacilityId::parse(s).expect("valid facility id")
}

fn dev(s: &str) -> DeviceId {
    DeviceId::parse(s).expect("valid device id")
}

fn qr(facility: &str, t: UnixSeconds, token: u8) -> Record {
    Record {
        facility: fac(facility),
        device: dev("dev-a"),
        scanned_at: t,
        body: RecordBody::Qr {
            issuer_id: 1,
            key_id: 1,
            issued_at: t - 5,
            token: [token; 16],
        },
    }
}

struct Sealer {
    rng: ChaCha20Rng,
    ratchet: DayKeyRatchet,
}

impl Sealer {
    fn new() -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let ratchet = DayKeyRatchet::generate(&mut rng, Day(DAY.0 - 5));
        Sealer { rng, ratchet }
    }

    /// A session key of `DAY` wrapped to the hub key of `key_day`.
    fn session(&mut self, key_day: Day) -> (SessionKey, crate::envelope::WrappedKey) {
        let key = SessionKey::generate(&mut self.rng, DAY);
        let public = self.ratchet.public(key_day).expect("live day");
        let wrapped = key.wrap(&public).expect("wraps");
        (key, wrapped)
    }

    fn seal(
        &mut self,
        key: &SessionKey,
        id: &PartitionId,
        record: &Record,
    ) -> (RecordId, Envelope) {
        let rid = RecordId::random(&mut self.rng);
        let env = key.seal(&mut self.rng, id, rid, record).expect("seals");
        (rid, env)
    }
}

fn pid() -> PartitionId {
    PartitionId {
        facility: fac("fac-a"),
        day: DAY,
    }
}

/// The envelope with one ciphertext byte flipped.
fn tampered(env: &Envelope) -> Envelope {
    let mut bytes = env.to_bytes();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    Envelope::from_bytes(&bytes).expect("still parses")
}

#[test]
fn the_hub_indexes_exactly_what_unseal_opens() {
    let mut s = Sealer::new();
    let id = pid();
    let mut p = Partition::new(id.clone(), &[1; 16]);
    let (key, wrapped) = s.session(DAY);
    p.insert_wrapped_key(&wrapped).expect("key");
    let mut good = BTreeSet::new();
    for n in 0..3 {
        let (rid, env) = s.seal(&key, &id, &qr("fac-a", T + n, n as u8));
        p.insert_record(rid, &env).expect("insert");
        good.insert(rid);
    }
    // Tampered ciphertext.
    let (bad, env) = s.seal(&key, &id, &qr("fac-a", T, 9));
    p.insert_record(bad, &tampered(&env)).expect("insert");
    // A sound envelope moved under another record id (the id is bound into it).
    let (_, env) = s.seal(&key, &id, &qr("fac-a", T, 8));
    let moved = RecordId([0x4D; 16]);
    p.insert_record(moved, &env).expect("insert");
    // A record whose session key has not arrived yet.
    let (late_key, late_wrapped) = s.session(DAY);
    let (late, env) = s.seal(&late_key, &id, &qr("fac-a", T, 7));
    p.insert_record(late, &env).expect("insert");

    let ratchet = &s.ratchet;
    let secret_for = |d| ratchet.secret(d);
    let mut opener = PartitionOpener::new(&p, secret_for);
    let plan = plan_index(&mut opener, p.records());
    let indexed: BTreeSet<RecordId> = plan.visits.iter().map(|v| v.record).collect();
    assert_eq!(indexed, good);
    let unsealed = unseal_partition(&p, secret_for);
    assert_eq!(
        unsealed.records.keys().copied().collect::<BTreeSet<_>>(),
        indexed,
        "the hub indexes what shared::unseal opens, no more, no less"
    );
    let retry: BTreeMap<RecordId, OpenFailure> = plan.retry.iter().cloned().collect();
    assert_eq!(retry.len(), 3);
    assert!(matches!(retry.get(&bad), Some(OpenFailure::Open(_))));
    assert!(matches!(retry.get(&moved), Some(OpenFailure::Open(_))));
    assert_eq!(retry.get(&late), Some(&OpenFailure::NoWrappedKey));
    assert_eq!((plan.waiting_for_key(), plan.sessions_without_key), (1, 1));
    let failed: BTreeSet<RecordId> = unsealed.failures.iter().map(|f| f.0).collect();
    assert_eq!(failed, retry.keys().copied().collect());
    assert_eq!(plan.fallback, 0);

    // The late key arrives: the record left out is indexed at the next persist, nothing else.
    p.insert_wrapped_key(&late_wrapped).expect("key");
    let indexed_now = indexed.clone();
    let fresh = fresh_records(p.records(), |r| indexed_now.contains(r));
    assert_eq!(fresh.len(), 3);
    let plan = plan_index(&mut PartitionOpener::new(&p, secret_for), fresh);
    assert_eq!(
        plan.visits.iter().map(|v| v.record).collect::<Vec<_>>(),
        vec![late]
    );
    assert!(unseal_partition(&p, secret_for).records.contains_key(&late));
    assert_eq!(
        plan.visits[0],
        IndexedVisit::of(&id, late, &qr("fac-a", T, 7))
    );
}

#[test]
fn fallback_keys_are_counted_and_destroyed_days_wait() {
    let mut s = Sealer::new();
    let id = pid();
    let mut p = Partition::new(id.clone(), &[1; 16]);
    // The device fell back to the day key of two days before.
    let (key, wrapped) = s.session(Day(DAY.0 - 2));
    p.insert_wrapped_key(&wrapped).expect("key");
    let (rid, env) = s.seal(&key, &id, &qr("fac-a", T, 1));
    p.insert_record(rid, &env).expect("insert");
    let ratchet = &s.ratchet;
    let plan = plan_index(
        &mut PartitionOpener::new(&p, |d| ratchet.secret(d)),
        p.records(),
    );
    assert_eq!((plan.visits.len(), plan.fallback), (1, 1));
    // The earlier day's key is destroyed: the record waits, as a missing key.
    let cut = Day(DAY.0 - 2);
    let plan = plan_index(
        &mut PartitionOpener::new(&p, |d| (d != cut).then(|| ratchet.secret(d)).flatten()),
        p.records(),
    );
    assert!(plan.visits.is_empty());
    assert_eq!(plan.retry, vec![(rid, OpenFailure::DayKeyUnknown(cut))]);
    assert!(plan.retry[0].1.key_missing());
}

#[test]
fn each_day_secret_is_asked_for_once() {
    let mut s = Sealer::new();
    let id = pid();
    let mut p = Partition::new(id.clone(), &[1; 16]);
    for _ in 0..3 {
        let (key, wrapped) = s.session(DAY);
        p.insert_wrapped_key(&wrapped).expect("key");
        for n in 0..4 {
            let (rid, env) = s.seal(&key, &id, &qr("fac-a", T, n));
            p.insert_record(rid, &env).expect("insert");
        }
    }
    let asked = RefCell::new(0);
    let ratchet = &s.ratchet;
    let plan = plan_index(
        &mut PartitionOpener::new(&p, |d| {
            *asked.borrow_mut() += 1;
            ratchet.secret(d)
        }),
        p.records(),
    );
    assert_eq!(plan.visits.len(), 12);
    assert_eq!(*asked.borrow(), 1);
}

fn visit(facility: &str, t: UnixSeconds, token: Option<u8>, n: u8) -> IndexedVisit {
    IndexedVisit {
        facility: fac(facility),
        scanned_at: t,
        device: dev("dev-a"),
        token: token.map(|b| [b; 16]),
        record: RecordId([n; 16]),
    }
}

#[test]
fn the_join_finds_contacts_within_the_window_inclusive() {
    let w = window_seconds(30);
    assert_eq!(w, 1_800);
    let tokens: BTreeSet<[u8; 16]> = [[0xC1; 16]].into();
    let case = vec![visit("fac-a", T, Some(0xC1), 0)];
    let candidates = vec![
        visit("fac-a", T - w, Some(1), 1), // the window's first second: in
        visit("fac-a", T + w, Some(2), 2), // its last second: in
        visit("fac-a", T - w - 1, Some(3), 3), // one second early: out
        visit("fac-a", T + w + 1, Some(4), 4), // one second late: out
        visit("fac-b", T, Some(5), 5),     // same time, another facility: out
        visit("fac-a", T + 1, Some(0xC1), 6), // the case itself: out
        visit("fac-a", T + 60, None, 7),   // a paper entry: in
        visit("fac-a", T + w, Some(2), 2), // the same visit read twice: once
    ];
    let found = contacts(&case, &tokens, candidates, w);
    let ids: Vec<u8> = found.iter().map(|v| v.record.0[0]).collect();
    assert_eq!(ids, vec![1, 7, 2], "in time order, deduplicated");
    // No case visit at a facility: no contacts there, whatever the times.
    assert!(contacts(&[], &tokens, vec![visit("fac-a", T, Some(1), 1)], w).is_empty());
    // A zero window is the same second only.
    let same = contacts(
        &case,
        &tokens,
        vec![
            visit("fac-a", T, Some(1), 1),
            visit("fac-a", T + 1, Some(2), 2),
        ],
        0,
    );
    assert_eq!(same.len(), 1);
}

#[test]
fn case_visits_are_the_tokens_within_the_period_inclusive() {
    let tokens: BTreeSet<[u8; 16]> = [[0xC1; 16], [0xC2; 16]].into();
    let v = |t, token| visit("fac-a", t, token, 0);
    assert!(is_case_visit(&v(T, Some(0xC1)), &tokens, T, T));
    assert!(is_case_visit(&v(T, Some(0xC2)), &tokens, T - 10, T));
    assert!(!is_case_visit(
        &v(T, Some(0xC3)),
        &tokens,
        0,
        UnixSeconds::MAX
    ));
    assert!(!is_case_visit(&v(T, None), &tokens, 0, UnixSeconds::MAX));
    assert!(!is_case_visit(&v(T, Some(0xC1)), &tokens, T + 1, T + 10));
    assert!(!is_case_visit(&v(T, Some(0xC1)), &tokens, T - 10, T - 1));
    // Ordered and deduplicated.
    let o = ordered(vec![
        v(T + 5, Some(0xC1)),
        v(T, Some(0xC1)),
        v(T, Some(0xC1)),
    ]);
    assert_eq!(
        o.iter().map(|v| v.scanned_at).collect::<Vec<_>>(),
        vec![T, T + 5]
    );
}

#[test]
fn the_days_searched_cross_midnight_and_stay_live() {
    let midnight = 20_001 * 86_400;
    let w = window_seconds(30);
    // Ten minutes before midnight: tonight and tomorrow.
    assert_eq!(
        days_to_search(Day(20_000), midnight - 600, w, Day(19_990), Day(20_010)),
        vec![Day(20_000), Day(20_001)]
    );
    // Exactly a window before midnight: the window's last second is midnight itself.
    assert_eq!(
        days_to_search(Day(20_000), midnight - w, w, Day(19_990), Day(20_010)),
        vec![Day(20_000), Day(20_001)]
    );
    assert_eq!(
        days_to_search(Day(20_000), midnight - w - 1, w, Day(19_990), Day(20_010)),
        vec![Day(20_000)]
    );
    // Tomorrow is not live: not searched. The day the visit is indexed under always is.
    assert_eq!(
        days_to_search(Day(20_000), midnight - 600, w, Day(19_990), Day(20_000)),
        vec![Day(20_000)]
    );
    assert_eq!(
        days_to_search(Day(19_999), midnight - 600, w, Day(19_990), Day(20_000)),
        vec![Day(19_999), Day(20_000)]
    );
}

#[test]
fn a_facility_may_hold_unsynced_visits_until_every_live_device_synced_after_the_window() {
    let w = 1_800;
    let case = vec![
        visit("fac-a", T - 3_600, Some(0xC1), 0),
        visit("fac-a", T, Some(0xC1), 1), // the latest at fac-a counts
        visit("fac-b", T, Some(0xC1), 2),
    ];
    let d = |f: &str, last_sync, revoked| DeviceSync {
        facility: fac(f),
        last_sync,
        revoked,
    };
    // Synced exactly at the window's end: complete.
    assert!(may_hold_unsynced(&case, vec![d("fac-a", Some(T + w), false)], w).is_empty());
    // One second before: may be incomplete.
    assert_eq!(
        may_hold_unsynced(&case, vec![d("fac-a", Some(T + w - 1), false)], w),
        vec![fac("fac-a")]
    );
    // Never synced: may be incomplete; revoked: never waited for.
    assert_eq!(
        may_hold_unsynced(
            &case,
            vec![d("fac-b", None, false), d("fac-a", None, true)],
            w
        ),
        vec![fac("fac-b")]
    );
    // A facility the case did not visit is not asked about.
    assert!(may_hold_unsynced(&case, vec![d("fac-c", None, false)], w).is_empty());
    assert!(may_hold_unsynced(&[], vec![d("fac-a", None, false)], w).is_empty());
}

#[test]
fn a_code_at_two_facilities_within_fifteen_seconds_is_shared() {
    let w = SHARED_CODE_SECONDS;
    let visits = vec![
        visit("fac-a", T, Some(1), 0),
        visit("fac-b", T + w, Some(1), 1), // 15 s later elsewhere: shared
        visit("fac-c", T + w + 1, Some(1), 2), // 16 s after the first, 1 s after the second
        visit("fac-a", T + 5, Some(2), 3),
        visit("fac-a", T + 6, Some(2), 4), // the same facility twice: not shared
        visit("fac-b", T, None, 5),        // paper entries never pair
        visit("fac-c", T, None, 6),
        visit("fac-d", T + 100, Some(3), 7),
        visit("fac-e", T + 100 + w + 1, Some(3), 8), // 16 s apart: not shared
    ];
    assert_eq!(find_shared(&visits), vec![(0, 1), (1, 2)]);
}

/// A registry of plain maps.
#[derive(Default)]
struct Map {
    devices: BTreeMap<DeviceId, EnrolledDevice>,
    facilities: BTreeMap<FacilityId, FacilityStatus>,
    credentials: BTreeMap<[u8; 32], DeviceId>,
    broken: bool,
}

impl Registry for Map {
    fn device(&self, id: &DeviceId) -> Result<Option<EnrolledDevice>, String> {
        if self.broken {
            return Err("disk on fire".into());
        }
        Ok(self.devices.get(id).cloned())
    }
    fn facility_status(&self, id: &FacilityId) -> Result<Option<FacilityStatus>, String> {
        Ok(self.facilities.get(id).copied())
    }
    fn credential_device(&self, digest: &[u8; 32]) -> Result<Option<DeviceId>, String> {
        Ok(self.credentials.get(digest).cloned())
    }
}

fn hello(device: &str, facility: &str, credential: Option<[u8; 32]>) -> PeerHello {
    PeerHello {
        peer: Peer::Device {
            device: dev(device),
            facility: fac(facility),
        },
        credential,
        now: T,
        refresh_have: None,
        push_only: true,
    }
}

fn registry() -> Map {
    let mut m = Map::default();
    let enrolled = |facility: &str, endpoint: Option<&str>, revoked| EnrolledDevice {
        facility: fac(facility),
        endpoint: endpoint.map(str::to_owned),
        revoked,
    };
    m.devices
        .insert(dev("dev-bound"), enrolled("fac-a", Some("ep-1"), false));
    m.devices
        .insert(dev("dev-new"), enrolled("fac-a", None, false));
    m.devices
        .insert(dev("dev-new2"), enrolled("fac-a", None, false));
    m.devices
        .insert(dev("dev-gone"), enrolled("fac-a", Some("ep-2"), true));
    m.devices
        .insert(dev("dev-pend"), enrolled("fac-p", Some("ep-3"), false));
    m.devices
        .insert(dev("dev-rm"), enrolled("fac-x", Some("ep-4"), false));
    m.facilities.insert(fac("fac-a"), FacilityStatus::Approved);
    m.facilities.insert(fac("fac-p"), FacilityStatus::Pending);
    m.credentials
        .insert(Credential([7; 32]).digest(), dev("dev-new"));
    m.credentials
        .insert(Credential([8; 32]).digest(), dev("dev-new2"));
    m
}

fn refused(a: Admission) -> RefuseReason {
    match a {
        Admission::Refuse { reason, .. } => reason,
        Admission::Admit { .. } => panic!("admitted: {a:?}"),
    }
}

#[test]
fn admission_admits_bound_devices_and_first_contacts_with_their_credential() {
    let r = registry();
    assert_eq!(
        admit(&hello("dev-bound", "fac-a", None), "ep-1", &r),
        Admission::Admit {
            device: dev("dev-bound"),
            facility: fac("fac-a"),
            bind: None
        }
    );
    // A bound device presenting a credential again (a retried first contact) is still fine.
    assert!(matches!(
        admit(&hello("dev-bound", "fac-a", Some([7; 32])), "ep-1", &r),
        Admission::Admit { bind: None, .. }
    ));
    let first = admit(&hello("dev-new", "fac-a", Some([7; 32])), "ep-9", &r);
    assert_eq!(
        first,
        Admission::Admit {
            device: dev("dev-new"),
            facility: fac("fac-a"),
            bind: Some(Credential([7; 32]).digest())
        }
    );
    assert_eq!(
        first.into_decision(Some(vec![1, 2])),
        Decision::Admit {
            facility: fac("fac-a"),
            refresh: Some(vec![1, 2])
        }
    );
}

#[test]
fn admission_refuses_each_way_in_order() {
    let r = registry();
    let hub_hello = PeerHello {
        peer: Peer::Hub { region: "x".into() },
        credential: None,
        now: T,
        refresh_have: None,
        push_only: true,
    };
    let cases = [
        (admit(&hub_hello, "ep-1", &r), RefuseReason::Protocol),
        (
            admit(&hello("dev-who", "fac-a", None), "ep-1", &r),
            RefuseReason::UnknownDevice,
        ),
        (
            admit(&hello("dev-gone", "fac-a", None), "ep-2", &r),
            RefuseReason::Revoked,
        ),
        (
            admit(&hello("dev-bound", "fac-b", None), "ep-1", &r),
            RefuseReason::WrongFacility,
        ),
        (
            admit(&hello("dev-pend", "fac-p", None), "ep-3", &r),
            RefuseReason::Revoked,
        ),
        (
            admit(&hello("dev-rm", "fac-x", None), "ep-4", &r),
            RefuseReason::Revoked,
        ),
        // Bound to another endpoint: an impostor, or a stolen ticket used a second time.
        (
            admit(&hello("dev-bound", "fac-a", None), "ep-9", &r),
            RefuseReason::UnknownDevice,
        ),
        (
            admit(&hello("dev-bound", "fac-a", Some([7; 32])), "ep-9", &r),
            RefuseReason::CredentialReused,
        ),
        // First contact without a credential, with a wrong one, with another device's.
        (
            admit(&hello("dev-new", "fac-a", None), "ep-9", &r),
            RefuseReason::UnknownDevice,
        ),
        (
            admit(&hello("dev-new", "fac-a", Some([1; 32])), "ep-9", &r),
            RefuseReason::CredentialReused,
        ),
        (
            admit(&hello("dev-new", "fac-a", Some([8; 32])), "ep-9", &r),
            RefuseReason::CredentialReused,
        ),
    ];
    for (i, (got, want)) in cases.into_iter().enumerate() {
        assert_eq!(refused(got), want, "case {i}");
    }
    let broken = Map {
        broken: true,
        ..registry()
    };
    let a = admit(&hello("dev-bound", "fac-a", None), "ep-1", &broken);
    assert_eq!(
        a.clone().into_decision(None),
        Decision::Refuse {
            reason: RefuseReason::Internal,
            detail: "disk on fire".into()
        }
    );
}

#[test]
fn quotas_allow_exactly_the_limit_and_refuse_one_more() {
    let q = DeviceQuota {
        records_per_day: 100,
        keys_per_day: 4,
    };
    let d = dev("dev-a");
    let c = |records, keys| Charge { records, keys };
    assert_eq!(q.check(&d, DAY, c(60, 3), c(40, 1)), Ok(()));
    let over = q
        .check(&d, DAY, c(60, 0), c(41, 0))
        .expect_err("one record over");
    assert!(over.contains("101 new records") && over.contains("100 per device per day"));
    assert!(over.contains(&format!("UTC day {}", DAY.0)) && over.contains("dev-a"));
    let over = q
        .check(&d, DAY, c(0, 4), c(1, 1))
        .expect_err("one key over");
    assert!(over.contains("5 new wrapped keys") && over.contains("4 wrapped keys"));
    // A charge without keys does not look at the keys delivered so far.
    assert_eq!(q.check(&d, DAY, c(0, 1_000), c(1, 0)), Ok(()));
    // Records are checked first, and nothing overflows.
    let over = q
        .check(&d, DAY, c(u64::MAX, u64::MAX), c(1, 1))
        .expect_err("saturates, over");
    assert!(over.contains("new records"));
    assert_eq!(c(1, 2).plus(c(u64::MAX, 3)), c(u64::MAX, 5));
}

/// Finding 2 of the sync v2 review: an enrolled device asking for a session that downloads
/// the hub's records (not push-only) is refused, after it proved who it is.
#[test]
fn admission_refuses_a_device_that_asks_to_download() {
    let r = registry();
    let mut pulling = hello("dev-bound", "fac-a", None);
    pulling.push_only = false;
    let admission = admit(&pulling, "ep-1", &r);
    assert!(
        matches!(
            &admission,
            Admission::Refuse {
                reason: RefuseReason::Protocol,
                ..
            }
        ),
        "{admission:?}"
    );
    assert!(matches!(
        admit(&hello("dev-bound", "fac-a", None), "ep-1", &r),
        Admission::Admit { .. }
    ));
}

#[test]
fn a_visit_batch_gives_back_its_visits_in_time_order_and_is_compact() {
    let mut visits: Vec<IndexedVisit> = (0..40u8)
        .map(|n| {
            let mut v = visit(
                "fac-long-facility-name",
                T + 600 - u64::from(n) * 7,
                Some(n),
                n,
            );
            v.token = (n % 5 != 0).then_some([n; 16]);
            if n % 3 == 0 {
                v.device = dev("dev-b");
            }
            v
        })
        .collect();
    let batch = VisitBatch::new(&fac("fac-long-facility-name"), &visits);
    assert_eq!(batch.len(), 40);
    assert_eq!(batch.facility(), &fac("fac-long-facility-name"));
    visits.sort_by_key(|v| (v.scanned_at, v.record));
    assert_eq!(batch.visits(), Some(visits.clone()));
    // Encoded: the facility and devices once, per visit the time step, the device number,
    // the token and the record: under 40 bytes a visit, against ~80 one by one.
    let bytes = postcard::to_stdvec(&batch).expect("encodes");
    let alone: usize = visits
        .iter()
        .map(|v| postcard::to_stdvec(v).expect("encodes").len())
        .sum();
    assert!(bytes.len() < 40 * 40, "{} bytes", bytes.len());
    assert!(bytes.len() * 3 < alone * 2, "{} vs {alone}", bytes.len());
    let back: VisitBatch = postcard::from_bytes(&bytes).expect("decodes");
    assert_eq!(back.visits(), Some(visits));
}

#[test]
fn a_damaged_visit_batch_gives_nothing() {
    let batch = VisitBatch::new(&fac("fac-a"), &[visit("fac-a", T, Some(1), 1)]);
    let mut bytes = postcard::to_stdvec(&batch).expect("encodes");
    // The visit's device number (after the facility, the one device and the time step):
    // point it past the device list.
    let facility = postcard::to_stdvec(&fac("fac-a")).expect("encodes").len();
    let devices = postcard::to_stdvec(&vec![dev("dev-a")])
        .expect("encodes")
        .len();
    let at = facility + devices + 1 + postcard::to_stdvec(&T).expect("encodes").len();
    assert_eq!(bytes[at], 0, "the device number");
    bytes[at] = 1;
    let damaged: VisitBatch = postcard::from_bytes(&bytes).expect("decodes");
    assert_eq!(damaged.visits(), None);
    // Times past the end of time do not wrap.
    let two = VisitBatch::new(
        &fac("fac-a"),
        &[
            visit("fac-a", 1, Some(1), 1),
            visit("fac-a", u64::MAX, Some(2), 2),
        ],
    );
    let mut bytes = postcard::to_stdvec(&two).expect("encodes");
    // The first visit's time step 1 -> 2: the second then lands past u64::MAX.
    let step = facility + devices + 1;
    assert_eq!(bytes[step], 1);
    bytes[step] = 2;
    let damaged: VisitBatch = postcard::from_bytes(&bytes).expect("decodes");
    assert_eq!(damaged.visits(), None);
}

/// A key unwrapped elsewhere is taken only for the very wrapped key the partition holds for
/// its session: a key that comes with another wrapped key under the session's label (a peer's
/// put that lost the merge, or a forgery wrapping its own key to the hub's public day key) is
/// refused, and so is a key of another session; the records open with the key taken, and no
/// day secret is asked for.
#[test]
fn an_opener_takes_a_key_unwrapped_ahead_only_for_the_wrapped_key_it_holds() {
    let mut s = Sealer::new();
    let id = pid();
    let mut p = Partition::new(id.clone(), &[1; 16]);
    let (key, wrapped) = s.session(DAY);
    p.insert_wrapped_key(&wrapped).expect("key");
    let (rid, env) = s.seal(&key, &id, &qr("fac-a", T, 1));
    p.insert_record(rid, &env).expect("insert");
    let secret = s.ratchet.secret(DAY).expect("live");
    let unwrapped = wrapped.unwrap(&secret).expect("unwraps");

    let (other, other_wrapped) = s.session(DAY);
    // Another wrapped key under this session's label.
    let mut forged = other_wrapped.clone();
    forged.session = wrapped.session;
    let asked = RefCell::new(0);
    let ratchet = &s.ratchet;
    let mut opener = PartitionOpener::new(&p, |d| {
        *asked.borrow_mut() += 1;
        ratchet.secret(d)
    });
    assert_eq!(opener.wrapped_key(wrapped.session), Some(&wrapped));
    assert!(
        !opener.offer_unwrapped(&forged, unwrapped.clone()),
        "another wrapped key of the session"
    );
    assert!(
        !opener.offer_unwrapped(&other_wrapped, other.clone()),
        "a session the partition does not hold"
    );
    assert!(
        !opener.offer_unwrapped(&wrapped, other.clone()),
        "another session's key"
    );
    assert!(opener.offer_unwrapped(&wrapped, unwrapped.clone()));
    assert!(!opener.offer_unwrapped(&wrapped, unwrapped), "met already");
    let plan = plan_index(&mut opener, p.records());
    assert_eq!(plan.visits.len(), 1);
    assert_eq!(*asked.borrow(), 0, "no day secret needed");
}
