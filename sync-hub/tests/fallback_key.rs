//! The device's day-key fallback seen from the hub: a partition whose session key was wrapped
//! to an earlier day's key (the device ran out of day public keys) is counted when the hub
//! indexes it, in `stats` and in `/metrics`, and the count leaves with the partition.

use rand::SeedableRng;
use rand::rngs::StdRng;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::facility::Registration;
use shared::partition::{Partition, session_actor};
use shared::time::{DAY_SECONDS, Day, UnixSeconds};
use shared::{DeviceId, FacilityId, PartitionId, RecordId};
use sync_hub::Hub;
use sync_hub::daemon::Metrics;
use sync_hub::ledger::Ledger;
use sync_hub::people::Desk;

const DAY: Day = Day(20_000);
/// Noon of `DAY`, the hub's clock in these tests.
const NOW: UnixSeconds = 20_000 * DAY_SECONDS + 12 * 3_600;

fn registration(name: &str) -> Registration {
    Registration {
        name: name.into(),
        business_number: None,
        representative: "Lee".into(),
        phone: "031-000-0000".into(),
        category: "wedding_hall".into(),
        region: "suwon".into(),
        address: format!("{name} 2 Gwanggyo-ro"),
    }
}

/// A device's partition of `day` with `n` QR visits, its session key wrapped to the hub's
/// public key of `key_day` (`day` itself normally; an earlier day under the fallback).
fn partition(
    hub: &Hub,
    facility: &FacilityId,
    device: &DeviceId,
    day: Day,
    key_day: Day,
    n: u8,
    rng: &mut StdRng,
) -> Partition {
    let id = PartitionId {
        facility: facility.clone(),
        day,
    };
    let public = hub
        .keys()
        .ratchet()
        .unwrap_or_else(|e| panic!("ratchet: {e}"))
        .public(key_day)
        .unwrap_or_else(|| panic!("day {key_day} has a public key"));
    let key = SessionKey::generate(rng, day);
    let wrapped = key.wrap(&public).unwrap_or_else(|e| panic!("wrap: {e}"));
    assert_eq!(wrapped.key_day, key_day);
    let mut p = Partition::new(id.clone(), &session_actor(device, rng));
    p.insert_wrapped_key(&wrapped)
        .unwrap_or_else(|e| panic!("key: {e}"));
    for i in 0..n {
        let t = day.start() + 9 * 3_600 + u64::from(i) * 60;
        let record = Record {
            facility: facility.clone(),
            device: device.clone(),
            scanned_at: t,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: t - 5,
                token: [i.wrapping_add(day.0 as u8); 16],
            },
        };
        let rid = RecordId::random(rng);
        let env = key
            .seal(rng, &id, rid, &record)
            .unwrap_or_else(|e| panic!("seal: {e}"));
        p.insert_record(rid, &env)
            .unwrap_or_else(|e| panic!("insert: {e}"));
    }
    p
}

/// The hub's copy of a device's partition, as a session would merge it.
fn hub_copy(l: &Ledger<'_>, device: &Partition) -> Partition {
    let mut p = Partition::new(device.id().clone(), &l.actor());
    p.merge(device).unwrap_or_else(|e| panic!("merge: {e}"));
    p
}

fn metric(text: &str, line_start: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

#[test]
fn records_sealed_to_an_earlier_days_key_are_counted_in_stats_and_metrics() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // The hub was set up days before, so it holds the earlier days' secrets.
    let hub = Hub::init(
        &tmp.path().join("hub"),
        "suwon",
        None,
        vec![],
        None,
        NOW - 5 * DAY_SECONDS,
    )
    .unwrap_or_else(|e| panic!("init: {e}"))
    .hub;
    let mut ids = Vec::new();
    for name in ["Hall A", "Hall B"] {
        let f = hub
            .add_facility(registration(name), NOW)
            .unwrap_or_else(|e| panic!("add: {e}"));
        hub.approve_facility(f.id.as_str())
            .unwrap_or_else(|e| panic!("approve: {e}"));
        let ticket = hub
            .enroll(f.id.as_str(), "gate", NOW)
            .unwrap_or_else(|e| panic!("enroll: {e}"));
        ids.push((f.id, ticket.device_id));
    }
    let [(fa, da), (fb, db)] =
        <[(FacilityId, DeviceId); 2]>::try_from(ids).unwrap_or_else(|_| panic!("two facilities"));
    let mut rng = StdRng::seed_from_u64(11);
    let mut l = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("ledger: {e}"));

    // Facility A's device ran out of day keys: today's visits are sealed to the key of three
    // days ago. Facility B's are sealed to today's key, as normal.
    let fallback = partition(&hub, &fa, &da, DAY, DAY.minus(3), 4, &mut rng);
    let normal = partition(&hub, &fb, &db, DAY, DAY, 3, &mut rng);
    let mut copy = hub_copy(&l, &fallback);
    let done = l
        .persist_counted(&mut copy, NOW)
        .unwrap_or_else(|e| panic!("persist: {e}"));
    assert_eq!((done.indexed, done.fallback), (4, 4));
    // Persisting again indexes nothing new and counts nothing twice.
    let again = l
        .persist_counted(&mut copy, NOW)
        .unwrap_or_else(|e| panic!("persist: {e}"));
    assert_eq!((again.indexed, again.fallback), (0, 0));
    let done = l
        .persist_counted(&mut hub_copy(&l, &normal), NOW)
        .unwrap_or_else(|e| panic!("persist: {e}"));
    assert_eq!((done.indexed, done.fallback), (3, 0));

    let stats = l.stats(NOW).unwrap_or_else(|e| panic!("stats: {e}"));
    assert_eq!(stats.records, 7);
    assert_eq!(stats.records_fallback_key, 4);
    assert_eq!(
        stats.fallback_per_facility.into_iter().collect::<Vec<_>>(),
        vec![(fa.to_string(), 4)]
    );
    let json = serde_json::to_value(l.stats(NOW).unwrap_or_else(|e| panic!("stats: {e}")))
        .unwrap_or_else(|e| panic!("json: {e}"));
    assert_eq!(json["records_fallback_key"], 4, "{json}");

    let text = sync_hub::http::metrics_text(&Desk::new(&hub, &l, NOW), &Metrics::default())
        .unwrap_or_else(|e| panic!("metrics: {e}"));
    assert_eq!(metric(&text, "kipass_records_fallback_key_held "), Some(4));
    assert_eq!(
        metric(
            &text,
            &format!("kipass_facility_records_fallback_key_held{{facility=\"{fa}\"}} ")
        ),
        Some(4),
        "{text}"
    );
    assert!(!text.contains(&format!("fallback_key_held{{facility=\"{fb}\"}}")));
    assert_eq!(metric(&text, "kipass_records_fallback_key_total "), Some(0));

    // The count goes with the partition.
    let later = NOW + 29 * DAY_SECONDS;
    l.purge(later).unwrap_or_else(|e| panic!("purge: {e}"));
    let stats = l.stats(later).unwrap_or_else(|e| panic!("stats: {e}"));
    assert_eq!(stats.records_fallback_key, 0);
    assert!(stats.fallback_per_facility.is_empty());
}
