//! The storm: every facility's backlog of a day delivered at the same moment, after a hub
//! outage. Answers the issue's question (1,000 facilities x 1,000 visits at the hub within 60
//! simulated seconds?) with real sessions and a stated timing model:
//!
//! - each device's session takes `flights x ROUND_TRIP_SECONDS + bytes x 8 / LINK_BITS_PER_SECOND`
//!   (all devices have their own 1 Mbit/s link and start together when the outage ends);
//! - the hub ingests the records of finished sessions first come, first served, at
//!   [`HUB_RECORDS_PER_SECOND`].
//!
//! Facilities are simulated in batches with a fresh hub store per batch so memory stays
//! bounded; that is exact here because sessions of different facilities touch disjoint hub
//! partitions, and the hub's queue is computed over all sessions afterwards.

use crate::report::{Sample, StormFigures, Summary, percentile};
use crate::scenario::Config;
use crate::world::{
    HOUR, LINK_BITS_PER_SECOND, ROUND_TRIP_SECONDS, START_DAY, admit_claimed, device_id,
    facility_id, session_seconds,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shared::daykey::DayKeyRatchet;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::partition::session_actor;
use shared::sync::harness::{MemoryStore, PairSetup, run_pair};
use shared::sync::{Peer, Role};
use shared::time::{DAY_SECONDS, horizon};
use shared::token::{self, Keyring, TestIssuer};
use shared::unseal::unseal_partition;
use shared::{Day, FacilityId, PartitionId, RecordId, UnixSeconds};
use std::collections::BTreeMap;
use std::time::Instant;

/// The assumed rate at which the hub merges, opens and indexes records.
pub const HUB_RECORDS_PER_SECOND: f64 = 50_000.0;
/// The issue's target for the storm's delivery time.
pub const TARGET_SECONDS: f64 = 60.0;
/// Facilities per batch (one hub store each).
const BATCH: usize = 50;

/// One finished device session: when its link work ended, and how many records it brought.
struct Arrival {
    link_seconds: f64,
    records: u64,
    /// When each of its records was acknowledged.
    acked: Vec<UnixSeconds>,
}

/// Runs the storm of `config` (`visits` per facility, spread over `devices` devices).
pub fn run_storm(config: &Config, progress: &mut dyn FnMut(u64, u64)) -> Summary {
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let t0 = START_DAY.start();
    // The hub is down from 08:00 to 08:00 the next day; every visit of the day waits.
    let reconnect = t0 + DAY_SECONDS + 8 * HOUR;
    let mut ratchet = DayKeyRatchet::generate(&mut rng, horizon(t0));
    ratchet.advance(horizon(reconnect));
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let issuer = TestIssuer::new(seed, 1, 1);
    let mut keyring = Keyring::new();
    let _ = keyring.insert(issuer.keyring_entry("sim", 0, u64::MAX));
    let hub_peer = Peer::Hub {
        region: "sim".into(),
    };
    let nf = config.scale.facilities as usize;
    let nd = config.scale.devices.max(1) as usize;
    let mut summary = Summary {
        scenario: config.scenario.name().to_owned(),
        seed: config.seed,
        facilities: config.scale.facilities,
        devices: nd as u32,
        days: 1,
        ..Default::default()
    };
    let mut arrivals = Vec::new();
    let day = Day::of(t0);
    let Some(public) = ratchet.public(day) else {
        summary.violation(format!("the hub has no day key for day {day}"));
        return summary;
    };
    for batch_start in (0..nf).step_by(BATCH) {
        let batch = batch_start..(batch_start + BATCH).min(nf);
        let mut hub = MemoryStore::new(b"hub", None);
        let mut ledger: BTreeMap<RecordId, (FacilityId, [u8; 16])> = BTreeMap::new();
        let mut devices: Vec<(Peer, MemoryStore, Vec<UnixSeconds>)> = Vec::new();
        for f in batch.clone() {
            let fac = facility_id(f);
            let pid = PartitionId {
                facility: fac.clone(),
                day,
            };
            let mut stores = Vec::new();
            for d in 0..nd {
                let id = device_id(f, d);
                let actor = session_actor(&id, &mut rng);
                let mut store = MemoryStore::new(&actor, Some(fac.clone()));
                let key = SessionKey::generate(&mut rng, day);
                match key.wrap(&public) {
                    Ok(w) => {
                        if let Err(e) = store.get_or_create(&pid).insert_wrapped_key(&w) {
                            summary.violation(format!("storing a wrapped key failed: {e}"));
                        }
                    }
                    Err(e) => summary.violation(format!("wrapping a session key failed: {e}")),
                }
                stores.push((id, store, key, Vec::new()));
            }
            for _ in 0..config.scale.visits {
                summary.visits += 1;
                let t = t0 + 11 * HOUR + rng.gen_range(0..12 * HOUR);
                let d = rng.gen_range(0..nd);
                let (dev, store, key, acked) = &mut stores[d];
                let mut tok = [0u8; 16];
                rng.fill_bytes(&mut tok);
                let text = issuer.issue(t, 15, tok);
                let Ok(verified) = token::verify(&text, &keyring, t, token::DEFAULT_SKEW) else {
                    summary.refused_at_scan += 1;
                    continue;
                };
                let record = Record {
                    facility: fac.clone(),
                    device: dev.clone(),
                    scanned_at: t,
                    body: RecordBody::Qr {
                        issuer_id: verified.issuer_id(),
                        key_id: verified.key_id(),
                        issued_at: verified.issued_at(),
                        token: *verified.token().as_bytes(),
                    },
                };
                let rid = RecordId::random(&mut rng);
                let stored = key
                    .seal(&mut rng, &pid, rid, &record)
                    .map_err(|e| e.to_string())
                    .and_then(|env| {
                        store
                            .get_or_create(&pid)
                            .insert_record(rid, &env)
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = stored {
                    summary.violation(format!("recording a visit failed: {e}"));
                    continue;
                }
                summary.acknowledged += 1;
                ledger.insert(rid, (fac.clone(), tok));
                acked.push(t);
            }
            for (id, store, _, acked) in stores {
                let peer = Peer::Device {
                    device: id,
                    facility: fac.clone(),
                };
                devices.push((peer, store, acked));
            }
        }
        // The outage ends: every device of the batch syncs at the same instant.
        for (peer, store, acked) in &mut devices {
            let setup = PairSetup {
                initiator: peer.clone(),
                responder: hub_peer.clone(),
                credential: None,
                push_only: true,
            };
            summary.sessions += 1;
            match run_pair(reconnect, &setup, store, &mut hub, admit_claimed) {
                Ok(outcome) => {
                    if !outcome.completed() {
                        summary.violation(format!("session of {peer} did not complete"));
                    }
                    summary.wire_bytes += outcome.bytes_i_to_r + outcome.bytes_r_to_i;
                    summary.upload_bytes += outcome.bytes_i_to_r;
                    let records = outcome.new_records(Role::Responder);
                    arrivals.push(Arrival {
                        link_seconds: session_seconds(&outcome),
                        records,
                        acked: std::mem::take(acked),
                    });
                }
                Err(e) => summary.violation(format!("session of {peer} failed: {e}")),
            }
        }
        // The hub's read path over the batch, against the ledger.
        let mut seen: BTreeMap<RecordId, u64> = BTreeMap::new();
        let mut tokens: BTreeMap<(FacilityId, [u8; 16]), u64> = BTreeMap::new();
        for p in hub.partitions() {
            let opened = unseal_partition(p, |d| ratchet.secret(d));
            for (rid, why) in opened.failures {
                summary.violation(format!("the hub cannot open {rid} of {}: {why}", p.id()));
            }
            for (rid, record) in opened.records {
                *seen.entry(rid).or_default() += 1;
                if let RecordBody::Qr { token, .. } = record.body {
                    *tokens.entry((record.facility, token)).or_default() += 1;
                }
                if !ledger.contains_key(&rid) {
                    summary.phantom += 1;
                }
            }
        }
        for (rid, (f, tok)) in &ledger {
            let copies = seen.get(rid).copied().unwrap_or(0);
            let by_token = tokens.get(&(f.clone(), *tok)).copied().unwrap_or(0);
            if copies == 0 {
                summary.lost += 1;
                summary.violation(format!("visit {rid} of facility {f} is not at the hub"));
            } else {
                summary.duplicated += copies.max(by_token) - 1;
            }
        }
        progress(batch.end as u64, nf as u64);
    }

    // The hub's queue: sessions in the order their link work ends.
    arrivals.sort_by(|a, b| a.link_seconds.total_cmp(&b.link_seconds));
    let mut hub_free = 0.0_f64;
    let mut after_outage: Vec<u64> = Vec::new();
    let mut delays: Vec<u64> = Vec::new();
    let mut delivered = 0u64;
    let total: u64 = arrivals.iter().map(|a| a.records).sum();
    summary.series.push(Sample {
        at: 0.0,
        backlog: total,
        delivered: 0,
    });
    for a in &arrivals {
        hub_free = hub_free.max(a.link_seconds) + a.records as f64 / HUB_RECORDS_PER_SECOND;
        delivered += a.records;
        let done = hub_free.ceil() as u64;
        after_outage.extend(std::iter::repeat_n(done, a.records as usize));
        for acked in &a.acked {
            delays.push(reconnect + done - acked);
        }
        summary.series.push(Sample {
            at: hub_free,
            backlog: total - delivered,
            delivered,
        });
    }
    after_outage.sort_unstable();
    delays.sort_unstable();
    summary.delivered = delivered;
    summary.delay_p50_s = percentile(&delays, 0.5);
    summary.delay_p99_s = percentile(&delays, 0.99);
    summary.delay_max_s = delays.last().copied().unwrap_or(0) as f64;
    summary.per_record();
    summary.storm = Some(StormFigures {
        delivery_seconds: hub_free,
        target_seconds: TARGET_SECONDS,
        link_bits_per_second: LINK_BITS_PER_SECOND,
        round_trip_seconds: ROUND_TRIP_SECONDS,
        hub_records_per_second: HUB_RECORDS_PER_SECOND,
        slowest_link_seconds: arrivals.last().map_or(0.0, |a| a.link_seconds),
        after_outage_p50_s: percentile(&after_outage, 0.5),
        after_outage_p99_s: percentile(&after_outage, 0.99),
        wall_seconds: started.elapsed().as_secs_f64(),
    });
    if summary.lost > 0 || summary.duplicated > 0 || summary.phantom > 0 {
        let what = format!(
            "storm: {} lost, {} duplicated, {} phantom",
            summary.lost, summary.duplicated, summary.phantom
        );
        summary.violation(what);
    }
    summary
}
