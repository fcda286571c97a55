//! Issue 15's revocation rule at the hub, for records a sibling relays: a revoked device's
//! records already at the hub stay traceable; a record it sealed at or after its revocation,
//! relayed by a sibling that did not know of the revocation yet, is stored (its change is
//! merged) but left out of the trace index and counted (`stats`, `/metrics`
//! `kipass_hub_revoked_records_refused_total`), once.

use rand::SeedableRng;
use rand::rngs::StdRng;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::facility::Registration;
use shared::partition::{Partition, session_actor};
use shared::time::{DAY_SECONDS, Day, UnixSeconds};
use shared::{DeviceId, FacilityId, PartitionId, RecordId};
use sync_hub::Hub;
use sync_hub::auth::{Revoked, list_revoked};
use sync_hub::daemon::Metrics;
use sync_hub::ledger::Ledger;
use sync_hub::people::Desk;

const DAY: Day = Day(20_000);
/// Noon of `DAY`, the hub's clock.
const NOW: UnixSeconds = 20_000 * DAY_SECONDS + 12 * 3_600;
/// When device A is revoked: 10:00 of `DAY`.
const REVOKED_AT: UnixSeconds = 20_000 * DAY_SECONDS + 10 * 3_600;

fn registration() -> Registration {
    Registration {
        name: "Hall".into(),
        business_number: None,
        representative: "Lee".into(),
        phone: "031-000-0000".into(),
        category: "wedding_hall".into(),
        region: "suwon".into(),
        address: "Hall 2 Gwanggyo-ro".into(),
    }
}

/// One device writing into its copy of the facility's partition of `DAY`.
struct Writer {
    device: DeviceId,
    key: SessionKey,
    partition: Partition,
}

impl Writer {
    fn new(hub: &Hub, facility: &FacilityId, device: &DeviceId, rng: &mut StdRng) -> Self {
        let id = PartitionId {
            facility: facility.clone(),
            day: DAY,
        };
        let public = hub
            .keys()
            .ratchet()
            .unwrap_or_else(|e| panic!("ratchet: {e}"))
            .public(DAY)
            .unwrap_or_else(|| panic!("a public key for the day"));
        let key = SessionKey::generate(rng, DAY);
        let wrapped = key.wrap(&public).unwrap_or_else(|e| panic!("wrap: {e}"));
        let mut partition = Partition::new(id, &session_actor(device, rng));
        partition
            .insert_wrapped_key(&wrapped)
            .unwrap_or_else(|e| panic!("key: {e}"));
        Writer {
            device: device.clone(),
            key,
            partition,
        }
    }

    fn scan(&mut self, token: u8, at: UnixSeconds, rng: &mut StdRng) {
        let id = self.partition.id().clone();
        let record = Record {
            facility: id.facility.clone(),
            device: self.device.clone(),
            scanned_at: at,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: at - 5,
                token: [token; 16],
            },
        };
        let rid = RecordId::random(rng);
        let env = self
            .key
            .seal(rng, &id, rid, &record)
            .unwrap_or_else(|e| panic!("seal: {e}"));
        self.partition
            .insert_record(rid, &env)
            .unwrap_or_else(|e| panic!("insert: {e}"));
    }
}

/// The hub's copy of `from`, as a session would merge it.
fn hub_copy(l: &Ledger<'_>, from: &Partition) -> Partition {
    let mut p = Partition::new(from.id().clone(), &l.actor());
    p.merge(from).unwrap_or_else(|e| panic!("merge: {e}"));
    p
}

fn traced(l: &Ledger<'_>, token: u8) -> usize {
    l.trace(&[[token; 16]], 30, NOW)
        .unwrap_or_else(|e| panic!("trace: {e}"))
        .visits
        .len()
}

fn metric(text: &str, line_start: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

#[test]
fn a_record_a_revoked_device_sealed_after_revocation_relayed_by_a_sibling_is_not_indexed() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let hub = Hub::init(
        &tmp.path().join("hub"),
        "suwon",
        None,
        vec![],
        None,
        NOW - DAY_SECONDS,
    )
    .unwrap_or_else(|e| panic!("init: {e}"))
    .hub;
    let f = hub
        .add_facility(registration(), NOW)
        .unwrap_or_else(|e| panic!("add: {e}"));
    hub.approve_facility(f.id.as_str())
        .unwrap_or_else(|e| panic!("approve: {e}"));
    let enroll = |name: &str| {
        hub.enroll(f.id.as_str(), name, NOW)
            .unwrap_or_else(|e| panic!("enroll: {e}"))
            .device_id
    };
    let (da, db) = (enroll("gate a"), enroll("gate b"));
    let mut rng = StdRng::seed_from_u64(15);
    let l = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("ledger: {e}"));

    // A scans at 9:00 and syncs: at the hub before the revocation.
    let mut a = Writer::new(&hub, &f.id, &da, &mut rng);
    a.scan(1, REVOKED_AT - 3_600, &mut rng);
    let done = l
        .persist_counted(&mut hub_copy(&l, &a.partition), NOW)
        .unwrap_or_else(|e| panic!("persist: {e}"));
    assert_eq!((done.indexed, done.revoked_refused), (1, 0));

    // A is revoked at 10:00. It goes on scanning (10:30), and one record it sealed at 9:30
    // reaches the hub only now; sibling B, offline from the hub, takes both from A and syncs.
    list_revoked(hub.store(), [(Revoked::Device, da.to_string())], REVOKED_AT)
        .unwrap_or_else(|e| panic!("revoke: {e}"));
    a.scan(2, REVOKED_AT + 1_800, &mut rng);
    a.scan(3, REVOKED_AT - 1_800, &mut rng);
    let mut b = Writer::new(&hub, &f.id, &db, &mut rng);
    b.scan(4, REVOKED_AT + 3_000, &mut rng);
    b.partition
        .merge(&a.partition)
        .unwrap_or_else(|e| panic!("relay: {e}"));
    let mut at_hub = hub_copy(&l, &b.partition);
    let done = l
        .persist_counted(&mut at_hub, NOW)
        .unwrap_or_else(|e| panic!("persist: {e}"));
    assert_eq!((done.indexed, done.revoked_refused), (2, 1));

    // The change is stored whole: every record is held.
    let stored = l
        .load(at_hub.id())
        .unwrap_or_else(|e| panic!("load: {e}"))
        .unwrap_or_else(|| panic!("the partition is stored"));
    assert_eq!(stored.records().len(), 4);
    // Before the revocation: traceable; after it: not; B's own: traceable.
    assert_eq!(traced(&l, 1), 1, "A's record from before the revocation");
    assert_eq!(traced(&l, 3), 1, "A's record sealed before, relayed after");
    assert_eq!(traced(&l, 2), 0, "A's record sealed after its revocation");
    assert_eq!(traced(&l, 4), 1, "B's own record");

    // Persisting again neither indexes nor counts it a second time.
    let again = l
        .persist_counted(&mut at_hub, NOW)
        .unwrap_or_else(|e| panic!("persist: {e}"));
    assert_eq!((again.indexed, again.revoked_refused), (0, 0));
    assert_eq!(traced(&l, 2), 0);

    let stats = l.stats(NOW).unwrap_or_else(|e| panic!("stats: {e}"));
    assert_eq!(stats.revoked_records_refused, 1);
    assert_eq!(
        stats
            .revoked_refused_per_device
            .into_iter()
            .collect::<Vec<_>>(),
        vec![(da.to_string(), 1)]
    );
    assert_eq!(stats.records, 4);
    let text = sync_hub::http::metrics_text(&Desk::new(&hub, &l, NOW), &Metrics::default())
        .unwrap_or_else(|e| panic!("metrics: {e}"));
    assert_eq!(
        metric(&text, "kipass_hub_revoked_records_refused_total "),
        Some(1),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            &format!("kipass_hub_device_revoked_records_refused_total{{device=\"{da}\"}} ")
        ),
        Some(1),
        "{text}"
    );
}
