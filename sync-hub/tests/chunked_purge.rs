//! Retention at a region's size: the purge of a big day runs in chunks on the hub's actor,
//! each one short write transaction, so a job on the actor (what every sync frame is) is
//! answered between chunks while the purge is under way; afterwards no row of the day is
//! left in any ledger table (partitions without counts or heads rows among them), the live
//! days are whole, and a purge a stop interrupts is finished by the next start's purge.

use redb::{ReadableDatabase, ReadableTable};
use shared::Day;
use shared::time::{DAY_SECONDS, horizon};
use std::path::Path;
use std::time::{Duration, Instant};
use sync_hub::Hub;
use sync_hub::auth::Principal;
use sync_hub::daemon::{HoldKind, HubHandle};
use sync_hub::ledger::{
    DEVICE_DAY_KEYS, DEVICE_DAY_RECORDS, FALLBACK_COUNTS, HUB_CHUNKS, INDEXED, Ledger,
    PARTITION_COUNTS, PARTITION_HEADS, SYNC_STATES, VISITS_BY_FACILITY, runs,
};

/// Facilities with a partition of the expired day.
const FACILITIES: u32 = 2_000;
/// Chunks per partition (`hub-chunks-1`, the bulk).
const CHUNKS: u64 = 120;
/// Token index rows per facility.
const TOKENS: u32 = 120;
/// Facilities whose chunks of the day have no counts or heads row (a partition whose persist
/// wrote chunks only, or a damaged store): the purge must find them all the same.
const ORPHANS: u32 = 40;
/// The longest an actor job may wait while the purge runs. One chunk is a few tens of
/// milliseconds; the purge in one transaction holds the actor for the whole purge, which
/// here (two days in the store, not a region's 28) is only about as long, so the test also
/// asks that no wait come near the purge's own length, and that jobs were answered during it.
/// The margin is for a loaded two-core test machine.
const ACTOR_BOUND: Duration = Duration::from_millis(400);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn facility(i: u32) -> String {
    format!("fac-{i:05}")
}

fn tag(day: u32, i: u32, n: u32) -> [u8; 16] {
    let mut t = [0u8; 32];
    t[..4].copy_from_slice(&day.to_be_bytes());
    t[4..8].copy_from_slice(&i.to_be_bytes());
    t[8..12].copy_from_slice(&n.to_be_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(&t).as_bytes()[..16]);
    out
}

/// Writes a synthetic day's rows into every day-keyed ledger table: `facilities` partitions
/// of `chunks` chunks (and `orphans` more facilities with chunks only), their index rows,
/// counts, heads, fallback counts, sync states and device counts.
fn fill_day(hub: &Hub, day: u32, facilities: u32, chunks: u64, tokens: u32, orphans: u32) {
    let txn = hub
        .store()
        .db()
        .begin_write()
        .unwrap_or_else(|e| panic!("{e}"));
    // One run of the token index per facility, as its persist writes it (they merge as the
    // runs' tiers ask).
    let mut token_runs: Vec<Vec<runs::Row>> = Vec::new();
    {
        let mut ch = txn.open_table(HUB_CHUNKS).unwrap_or_else(|e| panic!("{e}"));
        let mut idx = txn.open_table(INDEXED).unwrap_or_else(|e| panic!("{e}"));
        let mut counts = txn
            .open_table(PARTITION_COUNTS)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut heads = txn
            .open_table(PARTITION_HEADS)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut fallback = txn
            .open_table(FALLBACK_COUNTS)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut states = txn
            .open_table(SYNC_STATES)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut records = txn
            .open_table(DEVICE_DAY_RECORDS)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut keys = txn
            .open_table(DEVICE_DAY_KEYS)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut by_facility = txn
            .open_table(VISITS_BY_FACILITY)
            .unwrap_or_else(|e| panic!("{e}"));
        let value = [7u8; 48];
        for i in 0..facilities + orphans {
            let f = facility(i);
            let f = f.as_str();
            for s in 0..chunks {
                ch.insert((f, day, s), value.as_slice())
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            if i >= facilities {
                continue;
            }
            idx.insert((f, day, 0u64), [1u8; 32].as_slice())
                .unwrap_or_else(|e| panic!("{e}"));
            counts
                .insert((f, day), u64::from(tokens))
                .unwrap_or_else(|e| panic!("{e}"));
            heads
                .insert((f, day), [2u8; 32].as_slice())
                .unwrap_or_else(|e| panic!("{e}"));
            fallback
                .insert((f, day), 1u64)
                .unwrap_or_else(|e| panic!("{e}"));
            let device = format!("dev-{i:05}");
            states
                .insert((device.as_str(), f, day), value.as_slice())
                .unwrap_or_else(|e| panic!("{e}"));
            records
                .insert((device.as_str(), day), u64::from(tokens))
                .unwrap_or_else(|e| panic!("{e}"));
            keys.insert((device.as_str(), day), 1u64)
                .unwrap_or_else(|e| panic!("{e}"));
            token_runs.push(
                (0..tokens)
                    .map(|n| runs::row(&tag(day, i, n), &[0u8; 8], &[1u8; 8]))
                    .collect(),
            );
            for n in 0..4u8 {
                by_facility
                    .insert(
                        (day, &tag(day, i, u32::MAX), u32::from(n)),
                        [n; 40].as_slice(),
                    )
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
    for rows in token_runs {
        runs::write_run(&txn, day, rows).unwrap_or_else(|e| panic!("{e}"));
    }
    txn.commit().unwrap_or_else(|e| panic!("{e}"));
}

/// The rows of `day` in every day-keyed ledger table, by table.
fn rows_of_day(hub: &Hub, day: u32) -> Vec<(&'static str, u64)> {
    let txn = hub
        .store()
        .db()
        .begin_read()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    macro_rules! count {
        ($name:expr, $def:expr, $day:expr) => {{
            let t = txn.open_table($def).unwrap_or_else(|e| panic!("{e}"));
            let mut n = 0u64;
            for row in t.iter().unwrap_or_else(|e| panic!("{e}")) {
                let (k, _) = row.unwrap_or_else(|e| panic!("{e}"));
                #[allow(clippy::redundant_closure_call)]
                if ($day)(k.value()) == day {
                    n += 1;
                }
            }
            out.push(($name, n));
        }};
    }
    count!("hub-chunks-1", HUB_CHUNKS, |k: (&str, u32, u64)| k.1);
    count!("indexed-2", INDEXED, |k: (&str, u32, u64)| k.1);
    count!("partition-counts-1", PARTITION_COUNTS, |k: (&str, u32)| k.1);
    count!("partition-heads-1", PARTITION_HEADS, |k: (&str, u32)| k.1);
    count!("fallback-counts-1", FALLBACK_COUNTS, |k: (&str, u32)| k.1);
    count!("device-day-records-1", DEVICE_DAY_RECORDS, |k: (
        &str,
        u32
    )| k.1);
    count!("device-day-keys-1", DEVICE_DAY_KEYS, |k: (&str, u32)| k.1);
    count!("sync-states-1", SYNC_STATES, |k: (&str, &str, u32)| k.2);
    count!("token-runs-1", runs::TOKEN_RUNS, |k: (
        u32,
        u64,
        &[u8; 16]
    )| k.0);
    count!("token-run-sizes-1", runs::TOKEN_RUN_SIZES, |k: (
        u32,
        u64
    )| k.0);
    count!("visits-by-facility-2", VISITS_BY_FACILITY, |k: (
        u32,
        &[u8; 16],
        u32
    )| k.0);
    out
}

fn total(rows: &[(&str, u64)]) -> u64 {
    rows.iter().map(|(_, n)| n).sum()
}

/// The days of the test, at the real clock: an expired day (live now, so the start's timer
/// purge keeps it), a live day after it, and a time to purge as of whose horizon is the day
/// after the expired one.
fn days() -> (u32, u32, u64) {
    let now = sync_hub::clock::now();
    let expired = horizon(now).0 + 3;
    let live = expired + 2;
    let mut as_of = now;
    while horizon(as_of).0 <= expired {
        as_of += DAY_SECONDS;
    }
    assert!(horizon(as_of).0 <= live);
    (expired, live, as_of)
}

/// A fresh hub with the big expired day and a small live day.
fn hub_with_days(dir: &Path, expired: u32, live: u32) -> Hub {
    let hub = Hub::init(dir, "mapo", None, vec![], None, 1_750_000_000)
        .unwrap_or_else(|e| panic!("init: {e}"))
        .hub;
    Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    fill_day(&hub, expired, FACILITIES, CHUNKS, TOKENS, ORPHANS);
    fill_day(&hub, live, 10, 3, 3, 2);
    hub
}

fn start(hub: Hub) -> (HubHandle, std::thread::JoinHandle<()>) {
    sync_hub::daemon::start(hub, Default::default()).unwrap_or_else(|e| panic!("start: {e}"))
}

/// How long a job on the actor takes to be answered.
async fn actor_ping(handle: &HubHandle) -> Duration {
    let started = Instant::now();
    handle
        .query(|_, _, _| ())
        .await
        .unwrap_or_else(|e| panic!("ping: {e}"));
    started.elapsed()
}

fn stop(handle: HubHandle, actor: std::thread::JoinHandle<()>) {
    sync_hub::daemon::stop(&handle);
    drop(handle);
    actor
        .join()
        .unwrap_or_else(|_| panic!("the actor panicked"));
}

#[test]
fn the_actor_answers_during_a_big_purge_and_the_day_is_gone_after() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (expired, live, as_of) = days();
    let hub = hub_with_days(tmp.path(), expired, live);
    let live_before = rows_of_day(&hub, live);
    // Chunks and index batches row by row; the token index's 240,000 rows as pages of runs.
    assert!(total(&rows_of_day(&hub, expired)) > 250_000);
    let rt = runtime();
    let (handle, actor) = start(hub);
    let (pings, slowest, took) = rt.block_on(async {
        // The start's timer purge first (nothing of these days is expired at the clock).
        actor_ping(&handle).await;
        let h = handle.clone();
        let purge =
            tokio::spawn(async move { h.purge(Principal::local_operator(), Some(as_of)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (mut pings, mut slowest) = (0u32, Duration::ZERO);
        let began = Instant::now();
        while !purge.is_finished() {
            let took = actor_ping(&handle).await;
            if !purge.is_finished() {
                pings += 1;
                slowest = slowest.max(took);
            } else if pings == 0 {
                // Answered only once the purge was over: it held the actor throughout.
                slowest = took;
            }
        }
        let report = purge
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("purge: {e}"));
        eprintln!(
            "purge: {:?}, {pings} actor jobs answered during it, the slowest in {slowest:?}",
            began.elapsed()
        );
        assert_eq!(report.horizon, Day(expired + 1));
        assert_eq!(report.partitions, u64::from(FACILITIES));
        assert_eq!(report.records, u64::from(FACILITIES * TOKENS));
        assert_eq!(report.chunks, u64::from(FACILITIES + ORPHANS) * CHUNKS);
        assert_eq!(report.sync_states, u64::from(FACILITIES));
        (pings, slowest, began.elapsed())
    });
    assert!(
        slowest < ACTOR_BOUND,
        "an actor job waited {slowest:?} during the purge (bound {ACTOR_BOUND:?})"
    );
    // Relative to the purge itself, so the bound holds at any machine's speed: one chunk of
    // it, not the whole.
    assert!(
        slowest * 4 < took,
        "an actor job waited {slowest:?} of the purge's {took:?}"
    );
    assert!(
        pings >= 3,
        "only {pings} actor jobs were answered while the purge ran"
    );
    // The actor timed what held it: every purge step, the purge's start and the pings.
    let holds = &handle.metrics.holds;
    assert!(holds.count(HoldKind::PurgeChunk) >= 3, "{holds:?}");
    assert!(holds.count(HoldKind::PurgeStart) >= 1, "{holds:?}");
    assert!(holds.count(HoldKind::Query) > u64::from(pings), "{holds:?}");
    assert!(
        holds.max(HoldKind::PurgeChunk) < ACTOR_BOUND,
        "a purge step held the actor {:?}",
        holds.max(HoldKind::PurgeChunk)
    );
    assert!(holds.seconds.count() >= holds.count(HoldKind::PurgeChunk));
    stop(handle, actor);
    let hub = Hub::open(tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    let left = rows_of_day(&hub, expired);
    assert_eq!(total(&left), 0, "rows of the purged day left: {left:?}");
    assert_eq!(
        rows_of_day(&hub, live),
        live_before,
        "the live day lost rows"
    );
}

#[test]
fn a_purge_a_stop_interrupts_is_finished_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (expired, live, as_of) = days();
    let hub = hub_with_days(tmp.path(), expired, live);
    let before = total(&rows_of_day(&hub, expired));
    let live_before = rows_of_day(&hub, live);
    let rt = runtime();
    let (handle, actor) = start(hub);
    rt.block_on(async {
        actor_ping(&handle).await;
        let h = handle.clone();
        let purge =
            tokio::spawn(async move { h.purge(Principal::local_operator(), Some(as_of)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        actor_ping(&handle).await;
        assert!(!purge.is_finished(), "the purge ended before the stop");
        sync_hub::daemon::stop(&handle);
        // The purge's answer never comes: the hub stopped.
        let answer = purge.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(answer.is_err(), "{answer:?}");
    });
    drop(handle);
    actor
        .join()
        .unwrap_or_else(|_| panic!("the actor panicked"));

    // Stopped mid-purge: the day's keys are gone for good, some of its rows are left.
    let hub = Hub::open(tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    let ledger = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ledger.ratchet().oldest(), Day(expired + 1));
    assert!(ledger.ratchet().index_key(Day(expired)).is_none());
    drop(ledger);
    let left = total(&rows_of_day(&hub, expired));
    assert!(
        left > 0 && left < before,
        "{left} of {before} rows left: not interrupted midway"
    );

    // The next start's timer purge (at the clock, where the day is not yet expired) finishes it.
    let (handle, actor) = start(hub);
    rt.block_on(async {
        // Queued behind the start's timer purge, this purge at the clock answers once that one
        // has finished.
        handle
            .purge(Principal::local_operator(), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("purge: {e}"));
    });
    stop(handle, actor);
    let hub = Hub::open(tmp.path()).unwrap_or_else(|e| panic!("{e}"));
    let left = rows_of_day(&hub, expired);
    assert_eq!(total(&left), 0, "rows of the purged day left: {left:?}");
    assert_eq!(
        rows_of_day(&hub, live),
        live_before,
        "the live day lost rows"
    );
}

/// A running hub's purge steps are sized by time, not by a fixed count of rows: with a target
/// no step can meet, every step after the first deletes the fewest rows allowed (many short
/// steps, where a fixed 20,000 rows went whatever they cost); with a target every step
/// meets, they grow. Either way the day is gone.
#[test]
fn purge_steps_follow_their_time_target() {
    use sync_hub::people::{
        PURGE_STEP_FIRST_ROWS, PURGE_STEP_MIN_ROWS, begin_purge, finish_purge, purge_step,
    };
    let (expired, live, as_of) = days();
    for target in [Duration::ZERO, Duration::from_secs(3_600)] {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let hub = Hub::init(tmp.path(), "mapo", None, vec![], None, 1_750_000_000)
            .unwrap_or_else(|e| panic!("init: {e}"))
            .hub;
        let mut ledger = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
        fill_day(&hub, expired, 200, 20, 40, 4);
        fill_day(&hub, live, 2, 2, 2, 0);
        let rows = total(&rows_of_day(&hub, expired));
        let now = sync_hub::clock::now();
        let who = Principal::local_operator();
        let mut run = begin_purge(&hub, &mut ledger, &who, Some(as_of), now)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_step_target(target);
        assert_eq!(run.chunk_rows(), PURGE_STEP_FIRST_ROWS);
        let mut steps = 0u64;
        let mut stage = run.stage();
        while !purge_step(&ledger, &mut run).unwrap_or_else(|e| panic!("{e}")) {
            steps += 1;
            assert!(steps < 100_000, "the purge does not end");
            // A step deletes rows of one table only: the next table's rows may cost many
            // times more than those its budget was sized on (a step of a 10-million-visit
            // purge took 136 ms running on into the automerge chunks).
            assert!(
                run.stage() <= stage + 1,
                "a step ran from table {stage} into table {}",
                run.stage()
            );
            if run.stage() != stage {
                assert_eq!(
                    run.chunk_rows(),
                    PURGE_STEP_FIRST_ROWS,
                    "a new table starts small"
                );
            }
            stage = run.stage();
        }
        if target.is_zero() {
            assert_eq!(run.chunk_rows(), PURGE_STEP_MIN_ROWS);
            assert!(
                steps * PURGE_STEP_MIN_ROWS * 2 >= rows,
                "{rows} rows in {steps} steps"
            );
        } else {
            assert!(run.chunk_rows() > PURGE_STEP_FIRST_ROWS, "{steps} steps");
        }
        let report = finish_purge(&hub, run, Ok(()), now).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.partitions, 200);
        assert_eq!(total(&rows_of_day(&hub, expired)), 0);
    }
}
