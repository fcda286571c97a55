//! The token index's two shapes on one day of a region's size: the sorted runs the hub writes
//! (`sync_hub::ledger::runs`) against the B-tree they replaced (`visits-by-token-3`'s shape,
//! the baseline), both written as the hub's actor writes them (one write transaction per
//! persist without fsync, a durable commit every `TURN` persists) and both looked up as a trace
//! does (per token and day: the runs' list of the day, then one piece per run; or one range of
//! the tree). Rows are 32 random-looking bytes (a keyed hash's tag, row tag, sealed locator).
//!
//! ```text
//! cargo bench -p sync-hub --bench token_runs
//! ```
//!
//! `KIPASS_RUNS_ROWS` (default 3,300,000: a day of a region of 92 million visits in 28 days),
//! `KIPASS_RUNS_PERSIST` (rows a persist writes, default 120: a facility's first sync of the
//! day in the region bench), `KIPASS_RUNS_TURN` (persists per durable commit, default 11, as
//! measured there), `KIPASS_RUNS_LOOKUPS` (default 3,000, half of them tags not in the day).

use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use std::error::Error;
use std::time::{Duration, Instant};
use sync_hub::ledger::runs;

const DAY: u32 = 20_000;
/// The baseline: the token index as one B-tree, keyed (day, token tag, row tag).
const BTREE: TableDefinition<sync_hub::ledger::TokenKey, &[u8; 8]> =
    TableDefinition::new("bench-visits-by-token");

type Res<T> = Result<T, Box<dyn Error>>;

fn env(name: &str, default: u64) -> Res<u64> {
    match std::env::var(name) {
        Ok(v) => Ok(v.parse().map_err(|e| format!("{name}={v}: {e}"))?),
        Err(_) => Ok(default),
    }
}

/// Row `i` of the day: a hash of `i`, so tags are spread like keyed hashes.
fn row(i: u64) -> runs::Row {
    let h = blake3::hash(&i.to_le_bytes());
    let mut r = [0u8; runs::ROW];
    r.copy_from_slice(h.as_bytes());
    r
}

fn tag(r: &runs::Row) -> [u8; 16] {
    let mut t = [0u8; 16];
    t.copy_from_slice(&r[..16]);
    t
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Runs,
    Btree,
}

struct Written {
    took: Duration,
    longest: Duration,
    merges: u64,
    merged_rows: u64,
    bytes: u64,
}

fn write(db: &Database, shape: Shape, rows: u64, persist: u64, turn: u64) -> Res<Written> {
    let (mut longest, mut merges, mut merged_rows) = (Duration::ZERO, 0u64, 0u64);
    let start = Instant::now();
    let (mut i, mut n) = (0u64, 0u64);
    while i < rows {
        let end = (i + persist).min(rows);
        let batch: Vec<runs::Row> = (i..end).map(row).collect();
        let t = Instant::now();
        let mut txn = db.begin_write()?;
        n += 1;
        let durable = n % turn == 0 || end == rows;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        match shape {
            Shape::Runs => {
                let m = runs::write_run(&txn, DAY, batch)?;
                merges += m.merges;
                merged_rows += m.rows;
            }
            Shape::Btree => {
                let mut t = txn.open_table(BTREE)?;
                let mut batch = batch;
                batch.sort_unstable();
                for r in &batch {
                    let (row_tag, sealed) = runs::parts(r);
                    t.insert((DAY, &tag(r), &row_tag), &sealed)?;
                }
            }
        }
        txn.commit()?;
        longest = longest.max(t.elapsed());
        i = end;
    }
    Ok(Written {
        took: start.elapsed(),
        longest,
        merges,
        merged_rows,
        bytes: 0,
    })
}

/// Per lookup: (time, rows found).
fn lookups(db: &Database, shape: Shape, tags: &[[u8; 16]]) -> Res<Vec<(Duration, usize)>> {
    let txn = db.begin_read()?;
    let mut out = Vec::with_capacity(tags.len());
    match shape {
        Shape::Runs => {
            let pieces = txn.open_table(runs::TOKEN_RUNS)?;
            let sizes = txn.open_table(runs::TOKEN_RUN_SIZES)?;
            let mut found = Vec::new();
            for t in tags {
                let s = Instant::now();
                // As a trace does per token and day: the day's runs, then one piece each.
                let day_runs = runs::runs_of(&sizes, DAY)?;
                found.clear();
                let mut damaged = 0;
                runs::lookup(&pieces, DAY, &day_runs, t, &mut found, &mut damaged)?;
                out.push((s.elapsed(), found.len()));
            }
        }
        Shape::Btree => {
            let table = txn.open_table(BTREE)?;
            for t in tags {
                let s = Instant::now();
                let n = table
                    .range((DAY, t, &[0u8; 8])..=(DAY, t, &[0xffu8; 8]))?
                    .count();
                out.push((s.elapsed(), n));
            }
        }
    }
    Ok(out)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> Res<()> {
    let rows = env("KIPASS_RUNS_ROWS", 3_300_000)?;
    let persist = env("KIPASS_RUNS_PERSIST", 120)?.max(1);
    let turn = env("KIPASS_RUNS_TURN", 11)?.max(1);
    let samples = env("KIPASS_RUNS_LOOKUPS", 3_000)?.max(2);
    let tmp = tempfile::tempdir()?;
    println!("## The token index on one day: sorted runs against the B-tree");
    println!();
    println!(
        "{rows} rows on one day, persists of {persist} rows, a durable commit every {turn} \
         persists; {samples} lookups (half of tags in the day, half absent)"
    );
    println!();
    println!(
        "| shape | write s | rows/s | µs a row | longest write txn | runs of the day | merges \
         (rows rewritten a row) | file MiB | lookup p50 | p99 | max |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut present: Vec<[u8; 16]> = Vec::new();
    let stride = (rows / (samples / 2).max(1)).max(1);
    let mut i = 0;
    while i < rows && present.len() < (samples / 2) as usize {
        present.push(tag(&row(i)));
        i += stride;
    }
    let absent: Vec<[u8; 16]> = (0..samples / 2).map(|j| tag(&row(rows + 1 + j))).collect();
    let mut rates = Vec::new();
    for shape in [Shape::Btree, Shape::Runs] {
        let name = match shape {
            Shape::Runs => "sorted runs (token-runs-1)",
            Shape::Btree => "B-tree (baseline, visits-by-token-3's shape)",
        };
        let path = tmp.path().join(match shape {
            Shape::Runs => "runs.redb",
            Shape::Btree => "btree.redb",
        });
        let db = Database::create(&path)?;
        let mut w = write(&db, shape, rows, persist, turn)?;
        w.bytes = std::fs::metadata(&path)?.len();
        let day_runs = match shape {
            Shape::Runs => {
                let txn = db.begin_read()?;
                runs::runs_of(&txn.open_table(runs::TOKEN_RUN_SIZES)?, DAY)?.len()
            }
            Shape::Btree => 1,
        };
        let hit = lookups(&db, shape, &present)?;
        if let Some(miss) = hit.iter().position(|(_, n)| *n == 0) {
            return Err(format!("{name}: a row written was not found (lookup {miss})").into());
        }
        let missed = lookups(&db, shape, &absent)?;
        if missed.iter().any(|(_, n)| *n > 0) {
            return Err(format!("{name}: an absent tag was found").into());
        }
        let mut times: Vec<Duration> = hit.iter().chain(&missed).map(|(d, _)| *d).collect();
        times.sort_unstable();
        let rate = rows as f64 / w.took.as_secs_f64();
        rates.push((rate, pct(&times, 0.5)));
        println!(
            "| {name} | {:.1} | {:.0} | {:.2} | {:.1} ms | {day_runs} | {} ({:.1}) | {:.0} | {:.0} µs | \
             {:.0} µs | {:.0} µs |",
            w.took.as_secs_f64(),
            rate,
            us(w.took) / rows as f64,
            ms(w.longest),
            w.merges,
            w.merged_rows as f64 / rows as f64,
            w.bytes as f64 / (1u64 << 20) as f64,
            us(pct(&times, 0.5)),
            us(pct(&times, 0.99)),
            us(*times.last().unwrap_or(&Duration::ZERO)),
        );
        drop(db);
        std::fs::remove_file(&path)?;
    }
    if let [(btree, btree_p50), (runs, runs_p50)] = rates[..] {
        println!();
        println!(
            "runs against the B-tree: writes {:.1}x as fast, a lookup (one token, one day) {:.1}x \
             as long at p50",
            runs / btree,
            runs_p50.as_secs_f64() / btree_p50.as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}
