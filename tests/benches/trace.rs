//! Trace latency over 28 days of a busy region's visits (`cargo bench -p tests --bench trace`).
//!
//! A hub in a temporary folder is filled in-process through the real ledger (real day keys,
//! sealed envelopes, automerge partitions, the sealed trace index): `KIPASS_BENCH_FACILITIES`
//! facilities (default 100) with `KIPASS_BENCH_VISITS` visits each per day (default 300), for
//! the 28 live days, 3% of them paper entries. Then it times one-token traces of random visits:
//! the ledger's indexed trace, and the whole people's trace (names, sealed paper, shared-code
//! flags, the durable audit append). The baseline, measured in the same run, is the trace
//! without the token index: a full scan of the sealed facility index for the token.
//!
//! Prints a table; asserts nothing (BENCHMARKS.md records the figures).

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use shared::time::{DAY_SECONDS, Day};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use sync_hub::auth::Principal;
use sync_hub::ledger::Ledger;
use sync_hub::trace::TraceRequest;
use tests::measure::percentile;
use tests::people::{PeopleHub, Visit, add_device, add_facility, registration, set_last_sync};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let facilities = env("KIPASS_BENCH_FACILITIES", 100);
    let per_day = env("KIPASS_BENCH_VISITS", 300);
    let samples = env("KIPASS_BENCH_SAMPLES", 300);
    let days = 28u64;
    let ph = PeopleHub::new("mapo")?;
    let now = tests::people::now();
    let today = Day::of(now);
    let mut rng = ChaCha20Rng::seed_from_u64(28);

    let built = Instant::now();
    let hub = ph.open()?;
    let mut ids = Vec::new();
    for i in 0..facilities {
        let f = add_facility(
            &hub,
            registration(
                &format!("Facility {i}"),
                "karaoke",
                "mapo",
                &format!("{i} Mapo-daero"),
                Some(tests::fixture::BUSINESS_NUMBER),
            ),
            now - days * DAY_SECONDS,
        )?;
        let d = add_device(&hub, &f, now - days * DAY_SECONDS)?;
        set_last_sync(&hub, &d, Some(now))?;
        ids.push((f, d));
    }
    let mut total = 0usize;
    let mut sample_tokens: Vec<[u8; 16]> = Vec::new();
    // One day at a time, so memory stays at one day of visits.
    for back in (0..days).rev() {
        let day = today.minus(back as u32);
        let start = day.start();
        let end = if back == 0 { now - 60 } else { day.end() };
        if end <= start + 3600 {
            continue;
        }
        let mut visits = Vec::with_capacity(facilities * per_day);
        for (f, d) in &ids {
            for _ in 0..per_day {
                let at = rng.gen_range(start..end);
                let paper = rng.gen_range(0..100) < 3;
                let token = (!paper).then(|| rng.r#gen::<[u8; 16]>());
                if let Some(t) = token
                    && rng.gen_range(
                        0..(facilities * per_day * days as usize / samples.max(1)).max(1),
                    ) == 0
                {
                    sample_tokens.push(t);
                }
                visits.push(Visit {
                    facility: f.clone(),
                    device: d.clone(),
                    at,
                    token,
                    paper_name: paper.then(|| "김민준".to_owned()),
                    paper_remarks: String::new(),
                });
            }
        }
        total += visits.len();
        tests::people::store_visits(
            &hub,
            &ph.authority_recipient,
            &visits,
            u64::from(day.0),
            now,
        )?;
        eprint!("\rbuilt {total} visits ({} days)", days - back);
    }
    eprintln!();
    let build_time = built.elapsed();
    let db_size = std::fs::metadata(tests::people::db_path(&ph.data))?.len();
    sample_tokens.truncate(samples);
    anyhow::ensure!(!sample_tokens.is_empty(), "no sample tokens drawn");

    let ledger = Ledger::open(hub.store(), hub.keys())?;
    let who = Principal::local_operator();
    // Warm the page cache once.
    ledger.trace_facts(&sample_tokens[..1], 30, 0, u64::MAX, now)?;

    let mut indexed = Vec::new();
    let mut contacts_seen = 0usize;
    for t in &sample_tokens {
        let s = Instant::now();
        let facts = ledger.trace_facts(std::slice::from_ref(t), 30, 0, u64::MAX, now)?;
        indexed.push(s.elapsed());
        anyhow::ensure!(facts.visits.len() == 1, "a sampled token has one visit");
        contacts_seen += facts.contacts.len();
    }
    indexed.sort();

    let mut full = Vec::new();
    let desk = sync_hub::people::Desk::new(&hub, &ledger, now);
    for t in &sample_tokens {
        let q = TraceRequest {
            tokens: vec![hex::encode(t)],
            window_minutes: Some(30),
            case: Some("bench".into()),
            purpose: Some("latency".into()),
            ..TraceRequest::default()
        }
        .check(now, true)
        .map_err(anyhow::Error::msg)?;
        let s = Instant::now();
        let r = desk.trace(&who, &q)?;
        full.push(s.elapsed());
        anyhow::ensure!(r.visits.len() == 1, "a sampled token has one visit");
    }
    full.sort();

    // The baseline: no token index, so the trace reads every sealed facility batch of the
    // live days looking for the token, then the contacts beside it.
    let mut scans = Vec::new();
    for t in sample_tokens.iter().take(3) {
        let s = Instant::now();
        let mut hits = Vec::new();
        let mut all = Vec::new();
        ledger.scan_visits(today.minus(days as u32), today.plus(1), now, |v| {
            if v.token.as_ref() == Some(t) {
                hits.push((v.facility.clone(), v.scanned_at));
            }
            all.push((v.facility.clone(), v.scanned_at, v.record));
        })?;
        let contacts: BTreeSet<_> = all
            .iter()
            .filter(|(f, at, _)| {
                hits.iter()
                    .any(|(hf, ht)| hf == f && ht.abs_diff(*at) <= 1800)
            })
            .collect();
        scans.push(s.elapsed());
        anyhow::ensure!(
            hits.len() == 1 && !contacts.is_empty(),
            "the scan finds the token"
        );
    }
    scans.sort();

    println!("## Trace latency, 28 days of a busy region");
    println!();
    println!(
        "{facilities} facilities × {per_day} visits/day × {days} days = {total} visits \
         (3% paper), one device per facility; hub.redb {:.0} MiB; built in {:.0} s",
        db_size as f64 / (1 << 20) as f64,
        build_time.as_secs_f64()
    );
    println!(
        "{} one-token traces of random visits; {:.1} contacts per trace on average (±30 min)",
        sample_tokens.len(),
        contacts_seen as f64 / sample_tokens.len() as f64
    );
    println!();
    println!("| path | p50 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| full scan without the token index (baseline, {} runs) | {} | {} | {} |",
        scans.len(),
        ms(percentile(&scans, 0.5)),
        ms(percentile(&scans, 0.99)),
        ms(*scans.last().context("scans")?)
    );
    println!(
        "| ledger trace (token index) | {} | {} | {} |",
        ms(percentile(&indexed, 0.5)),
        ms(percentile(&indexed, 0.99)),
        ms(*indexed.last().context("traces")?)
    );
    println!(
        "| people's trace: names, sealed paper, flags, audit append | {} | {} | {} |",
        ms(percentile(&full, 0.5)),
        ms(percentile(&full, 0.99)),
        ms(*full.last().context("traces")?)
    );
    Ok(())
}
