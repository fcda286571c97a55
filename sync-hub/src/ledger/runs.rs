//! The token index as sorted runs (`token-runs-1`, `token-run-sizes-1`): a log-structured
//! merge of the rows that say which facility a token visited on a day.
//!
//! Why not a B-tree keyed by the token: a token's tag is a keyed hash, so a persist's rows
//! land in random leaves of the day's tree. At a region's size (hundreds of thousands of
//! visits a day, thousands of leaves) every row dirtied a leaf of its own: a 4 KiB page copied
//! in the persist's transaction and written and fsynced at the turn's durable commit, about
//! 14 of the 34 µs a record the hub's ingest took at 10 million visits (`BENCHMARKS.md`).
//!
//! Here a persist writes its rows, sorted, as one new **run** of its day: pieces of at most
//! [`PIECE_ROWS`] rows (one page each), keyed (day, run, first tag of the piece), appended
//! at the end of the day's key range. A run's size goes into `token-run-sizes-1` in the same
//! transaction. Runs of a day are merged size-tiered: a run of `n` rows is of tier
//! `floor(log8 n)`, and when a tier below [`FROZEN_TIER`] holds [`FANOUT`] runs, the oldest
//! of them (up to [`FANOUT`]) are merged into one (rows deduplicated) in the transaction that
//! made them that many, which may cascade a tier up. Each row is so rewritten about once a
//! tier (five times), sequentially, at 32 bytes; a run of the frozen tier (32,768 rows or
//! more) is never merged. What one write merges, cascades included, is at most
//! [`MERGE_MAX_ROWS`] rows (4 MiB): a merge that does not fit waits for the day's next write,
//! so a persist holds the writer a bounded time whatever the sizes of its day's runs.
//!
//! A lookup of a tag reads one piece per run of the day: the last piece of the run whose first
//! tag is at most the tag (a tag's rows never straddle two pieces: a piece is cut only between
//! two tags). A day holds at most `FANOUT - 1` runs in each tier below the frozen one (35),
//! plus one frozen run per ~32,768-131,072 rows (and, for a while, merges that waited).
//!
//! Rows are the same 32 bytes the B-tree held (tag, row tag, sealed locator; the ledger seals
//! and opens them). What a copy of the file shows differs in one way: until it is merged, a
//! run holds one persist's rows, the day's token tags of one facility's persist, so a copy
//! without the day's index key groups pseudonymous tags by (unnamed) facility and links two
//! facilities where one tag is in two runs; the B-tree's rows could not be grouped. A day's
//! tags are keyed hashes under that day's index key (unlinkable to tokens and to other days
//! without it), and the purge deletes the runs with the key (`docs/storage.md`).

use super::first;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

/// `token-runs-1`: (day, run, first token tag of the piece) -> a piece of a run: rows of 32
/// bytes (token tag 16, row tag 8, sealed locator 8), sorted, at most [`PIECE_ROWS`] of them
/// unless one tag has more rows (a tag's rows are never split between pieces).
pub const TOKEN_RUNS: TableDefinition<RunKey, &[u8]> = TableDefinition::new("token-runs-1");
/// A key of `token-runs-1`: (day, run, first token tag of the piece).
pub type RunKey = (u32, u64, &'static [u8; 16]);
/// `token-run-sizes-1`: (day, run) -> the rows the run holds. A run's pieces and its size are
/// written and deleted in one transaction.
pub const TOKEN_RUN_SIZES: TableDefinition<(u32, u64), u64> =
    TableDefinition::new("token-run-sizes-1");

/// A row's bytes: token tag (16), row tag (8), sealed locator (8).
pub const ROW: usize = 32;
/// A row of the index: token tag, row tag, sealed locator, as one sortable array.
pub type Row = [u8; ROW];
/// Rows a piece holds at most (3,584 bytes: one 4 KiB page of redb's with its key).
pub const PIECE_ROWS: usize = 112;
/// Runs of one tier merged into one.
pub const FANOUT: usize = 8;
/// The tier from which runs are never merged: runs of at least 8^5 = 32,768 rows.
pub const FROZEN_TIER: u32 = 5;
/// The most rows one write merges, its merges' cascade included (4 MiB of rows, about 40 ms of
/// the writer; the longest persist measured at 10 million visits, merges of up to 70,000 rows
/// inside, took 23.5 ms).
pub const MERGE_MAX_ROWS: u64 = 1 << 17;

/// The tier of a run of `rows` rows: `floor(log8 rows)` (0 for an empty run).
pub fn tier(rows: u64) -> u32 {
    if rows == 0 {
        0
    } else {
        (63 - rows.leading_zeros()) / 3
    }
}

/// The row (token tag, row tag, sealed locator) as its 32 bytes.
pub fn row(tag: &[u8; 16], row_tag: &[u8; 8], sealed: &[u8; 8]) -> Row {
    let mut out = [0u8; ROW];
    out[..16].copy_from_slice(tag);
    out[16..24].copy_from_slice(row_tag);
    out[24..].copy_from_slice(sealed);
    out
}

/// (row tag, sealed locator) of a row.
pub fn parts(r: &Row) -> ([u8; 8], [u8; 8]) {
    (first::<8>(&r[16..]), first::<8>(&r[24..]))
}

/// What a compaction did, for the caller's metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    /// Merges made.
    pub merges: u64,
    /// Rows read and written again by them.
    pub rows: u64,
}

/// Writes `rows` as a new run of `day` (sorted and deduplicated here), then merges the day's
/// runs as the tiers ask ([`compact_day`]). Nothing is written for no rows.
pub fn write_run(
    txn: &WriteTransaction,
    day: u32,
    mut rows: Vec<Row>,
) -> Result<Merged, redb::Error> {
    if rows.is_empty() {
        return Ok(Merged::default());
    }
    rows.sort_unstable();
    rows.dedup();
    {
        let mut pieces = txn.open_table(TOKEN_RUNS)?;
        let mut sizes = txn.open_table(TOKEN_RUN_SIZES)?;
        let run = next_run(&sizes, day)?;
        put_run(&mut pieces, &mut sizes, day, run, &rows)?;
    }
    compact_day(txn, day)
}

/// The next run number of `day`: one past its last (runs are numbered in the order written,
/// so a day's new pieces append at the end of its key range).
fn next_run(sizes: &impl ReadableTable<(u32, u64), u64>, day: u32) -> Result<u64, redb::Error> {
    Ok(
        match sizes.range((day, 0u64)..=(day, u64::MAX))?.next_back() {
            Some(row) => row?.0.value().1.saturating_add(1),
            None => 0,
        },
    )
}

/// Writes sorted, deduplicated `rows` as run `run` of `day`: its pieces and its size.
fn put_run(
    pieces: &mut redb::Table<'_, RunKey, &'static [u8]>,
    sizes: &mut redb::Table<'_, (u32, u64), u64>,
    day: u32,
    run: u64,
    rows: &[Row],
) -> Result<(), redb::Error> {
    let mut start = 0;
    while start < rows.len() {
        // Cut after PIECE_ROWS rows, at the next change of tag.
        let mut end = (start + PIECE_ROWS).min(rows.len());
        while end < rows.len() && rows[end][..16] == rows[end - 1][..16] {
            end += 1;
        }
        let bytes: Vec<u8> = rows[start..end].iter().flatten().copied().collect();
        pieces.insert((day, run, &first::<16>(&rows[start])), bytes.as_slice())?;
        start = end;
    }
    sizes.insert((day, run), rows.len() as u64)?;
    Ok(())
}

/// Merges `day`'s runs until no tier below [`FROZEN_TIER`] holds [`FANOUT`] runs, or until
/// the next merge would take the rows merged past [`MERGE_MAX_ROWS`]: each merge takes the
/// oldest runs of the lowest such tier, [`FANOUT`] of them or as many (at least two) as fit,
/// and writes their rows, sorted and deduplicated, as one new run.
pub fn compact_day(txn: &WriteTransaction, day: u32) -> Result<Merged, redb::Error> {
    let mut done = Merged::default();
    let mut budget = MERGE_MAX_ROWS;
    let mut pieces = txn.open_table(TOKEN_RUNS)?;
    let mut sizes = txn.open_table(TOKEN_RUN_SIZES)?;
    loop {
        let runs = runs_of(&sizes, day)?;
        let mut by_tier: std::collections::BTreeMap<u32, Vec<(u64, u64)>> = Default::default();
        for (run, n) in &runs {
            let t = tier(*n);
            if t < FROZEN_TIER {
                by_tier.entry(t).or_default().push((*run, *n));
            }
        }
        let Some(candidates) = by_tier.into_values().find(|runs| runs.len() >= FANOUT) else {
            return Ok(done);
        };
        // The oldest runs of the tier that fit the budget, up to FANOUT.
        let mut group = Vec::with_capacity(FANOUT);
        let mut rows_in = 0u64;
        for (run, n) in candidates.into_iter().take(FANOUT) {
            if rows_in.saturating_add(n) > budget {
                break;
            }
            rows_in += n;
            group.push(run);
        }
        if group.len() < 2 {
            // The rest waits for the day's next write.
            return Ok(done);
        }
        budget -= rows_in;
        let mut rows: Vec<Row> = Vec::new();
        for run in &group {
            for piece in pieces.range((day, *run, &[0u8; 16])..=(day, *run, &[0xffu8; 16]))? {
                let (_, bytes) = piece?;
                // A damaged piece (not whole rows) keeps its whole rows; the rest is lost
                // with it, as a lookup would skip it.
                rows.extend(bytes.value().chunks_exact(ROW).map(|c| {
                    let mut r = [0u8; ROW];
                    r.copy_from_slice(c);
                    r
                }));
            }
        }
        rows.sort_unstable();
        rows.dedup();
        for run in &group {
            pieces.retain_in(
                (day, *run, &[0u8; 16])..=(day, *run, &[0xffu8; 16]),
                |_, _| false,
            )?;
            sizes.remove((day, *run))?;
        }
        let run = next_run(&sizes, day)?;
        done.merges += 1;
        done.rows += rows.len() as u64;
        if rows.is_empty() {
            continue;
        }
        put_run(&mut pieces, &mut sizes, day, run, &rows)?;
    }
}

/// The runs of `day` and their sizes, oldest first.
pub fn runs_of(
    sizes: &impl ReadableTable<(u32, u64), u64>,
    day: u32,
) -> Result<Vec<(u64, u64)>, redb::Error> {
    let mut out = Vec::new();
    for row in sizes.range((day, 0u64)..=(day, u64::MAX))? {
        let (k, v) = row?;
        out.push((k.value().1, v.value()));
    }
    Ok(out)
}

/// The rows of `tag` in the runs `runs` of `day` (one piece read per run), in `out`; pieces
/// that are not whole rows are counted in `damaged` and skipped.
pub fn lookup(
    pieces: &impl ReadableTable<RunKey, &'static [u8]>,
    day: u32,
    runs: &[(u64, u64)],
    tag: &[u8; 16],
    out: &mut Vec<Row>,
    damaged: &mut u64,
) -> Result<(), redb::Error> {
    for (run, _) in runs {
        let Some(piece) = pieces
            .range((day, *run, &[0u8; 16])..=(day, *run, tag))?
            .next_back()
        else {
            continue;
        };
        let (_, bytes) = piece?;
        let bytes = bytes.value();
        if bytes.len() % ROW != 0 {
            *damaged += 1;
            continue;
        }
        let rows = bytes.len() / ROW;
        let at = |i: usize| &bytes[i * ROW..(i + 1) * ROW];
        // The first row of the tag, then every row of it.
        let (mut lo, mut hi) = (0usize, rows);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if at(mid)[..16] < tag[..] {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        for i in lo..rows {
            let r = at(i);
            if r[..16] != tag[..] {
                break;
            }
            let mut row = [0u8; ROW];
            row.copy_from_slice(r);
            out.push(row);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase};

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = Database::create(dir.path().join("t.redb")).unwrap_or_else(|e| panic!("{e}"));
        (dir, db)
    }

    /// A row whose tag is `tag` (big-endian in its first bytes) and whose other bytes are `n`.
    fn r(tag: u32, n: u8) -> Row {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&tag.to_be_bytes());
        row(&t, &[n; 8], &[n ^ 0x5a; 8])
    }

    fn tag(tag: u32) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&tag.to_be_bytes());
        t
    }

    fn find(db: &Database, day: u32, t: u32) -> (Vec<Row>, u64) {
        find_tag(db, day, &tag(t))
    }

    fn find_tag(db: &Database, day: u32, t: &[u8; 16]) -> (Vec<Row>, u64) {
        let txn = db.begin_read().unwrap_or_else(|e| panic!("{e}"));
        let pieces = txn.open_table(TOKEN_RUNS).unwrap_or_else(|e| panic!("{e}"));
        let sizes = txn
            .open_table(TOKEN_RUN_SIZES)
            .unwrap_or_else(|e| panic!("{e}"));
        let runs = runs_of(&sizes, day).unwrap_or_else(|e| panic!("{e}"));
        let (mut out, mut damaged) = (Vec::new(), 0);
        lookup(&pieces, day, &runs, t, &mut out, &mut damaged).unwrap_or_else(|e| panic!("{e}"));
        out.sort_unstable();
        (out, damaged)
    }

    fn write(db: &Database, day: u32, rows: Vec<Row>) -> Merged {
        let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
        let m = write_run(&txn, day, rows).unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
        m
    }

    fn runs(db: &Database, day: u32) -> Vec<(u64, u64)> {
        let txn = db.begin_read().unwrap_or_else(|e| panic!("{e}"));
        let sizes = txn
            .open_table(TOKEN_RUN_SIZES)
            .unwrap_or_else(|e| panic!("{e}"));
        runs_of(&sizes, day).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn tiers_are_powers_of_eight() {
        assert_eq!(
            [1, 7, 8, 63, 64, 511, 512, 32_767, 32_768].map(tier),
            [0, 0, 1, 1, 2, 2, 3, 4, 5]
        );
    }

    #[test]
    fn every_row_of_a_tag_is_found_in_every_run_and_no_other_tags_or_days() {
        let (_dir, db) = db();
        // Run 0: even tags 0..600 (several pieces) and a second row of tag 300; run 1: tag 300
        // again, and 301.
        let mut rows: Vec<Row> = (0..300u32).map(|t| r(t * 2, 1)).collect();
        rows.push(r(300, 2));
        write(&db, 7, rows);
        write(&db, 7, vec![r(300, 3), r(301, 3)]);
        write(&db, 8, vec![r(300, 4)]);
        assert_eq!(
            find(&db, 7, 300),
            (vec![r(300, 1), r(300, 2), r(300, 3)], 0)
        );
        assert_eq!(find(&db, 7, 0), (vec![r(0, 1)], 0));
        assert_eq!(find(&db, 7, 598), (vec![r(598, 1)], 0));
        assert_eq!(find(&db, 7, 301), (vec![r(301, 3)], 0));
        // Absent tags: between two rows, before the first, after the last.
        assert_eq!(find(&db, 7, 3).0, Vec::<Row>::new());
        assert_eq!(find(&db, 7, 10_000).0, Vec::<Row>::new());
        assert_eq!(find(&db, 8, 300).0, vec![r(300, 4)]);
        assert_eq!(find(&db, 9, 300).0, Vec::<Row>::new());
    }

    #[test]
    fn a_tags_rows_are_never_split_between_pieces() {
        let (_dir, db) = db();
        // 300 rows of one tag after 100 of others: one piece holds all 300.
        let mut rows: Vec<Row> = (0..100u32).map(|t| r(t, 0)).collect();
        rows.extend((0..300u16).map(|n| {
            let mut x = r(1000, 0);
            x[16..18].copy_from_slice(&n.to_be_bytes());
            x
        }));
        write(&db, 1, rows);
        assert_eq!(find(&db, 1, 1000).0.len(), 300);
        assert_eq!(find(&db, 1, 99).0, vec![r(99, 0)]);
        assert_eq!(find(&db, 1, 1001).0, Vec::<Row>::new());
    }

    #[test]
    fn runs_merge_by_tier_and_keep_every_row() {
        let (_dir, db) = db();
        let mut all = Vec::new();
        // 64 runs of 100 rows (tier 2): 8 merges into tier 3, then one into tier 4.
        let mut merges = 0;
        for i in 0..64u32 {
            let rows: Vec<Row> = (0..100u32).map(|j| r(i * 100 + j, 9)).collect();
            all.extend(rows.iter().copied());
            merges += write(&db, 3, rows).merges;
        }
        assert_eq!(merges, 9);
        let left = runs(&db, 3);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].1, 6400);
        for (i, row) in all.iter().enumerate().step_by(97) {
            let t = u32::from_be_bytes([row[0], row[1], row[2], row[3]]);
            assert_eq!(find(&db, 3, t).0, vec![*row], "row {i}");
        }
    }

    #[test]
    fn frozen_runs_are_not_merged() {
        let (_dir, db) = db();
        for i in 0..FANOUT as u32 + 1 {
            let rows: Vec<Row> = (0..32_768u32).map(|j| r(i * 40_000 + j, 1)).collect();
            assert_eq!(write(&db, 2, rows).merges, 0);
        }
        assert_eq!(runs(&db, 2).len(), FANOUT + 1);
    }

    #[test]
    fn a_damaged_piece_is_counted_and_skipped() {
        let (_dir, db) = db();
        write(&db, 5, vec![r(1, 1), r(2, 1)]);
        write(&db, 5, vec![r(1, 2)]);
        {
            let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
            {
                let mut t = txn.open_table(TOKEN_RUNS).unwrap_or_else(|e| panic!("{e}"));
                t.insert((5u32, 0u64, &tag(1)), [1u8; 33].as_slice())
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            txn.commit().unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(find(&db, 5, 1), (vec![r(1, 2)], 1));
        // A merge keeps what the damaged piece holds whole, and loses nothing else.
        for n in 3..3 + FANOUT as u8 {
            write(&db, 5, vec![r(1, n)]);
        }
        let (found, damaged) = find(&db, 5, 1);
        assert_eq!(damaged, 0);
        let mut all: Vec<Row> = (2..3 + FANOUT as u8).map(|n| r(1, n)).collect();
        all.sort_unstable();
        assert_eq!(found, all);
        assert_eq!(find_tag(&db, 5, &[1u8; 16]).0, vec![[1u8; ROW]]);
    }

    #[test]
    fn one_write_merges_at_most_its_budget_and_the_rest_waits() {
        let (_dir, db) = db();
        // Runs of 511 distinct rows (the top of tier 2): merged without a budget, the 512th
        // write would cascade 8 x 511, 8 x 4,088 and 8 x 32,704 rows: 298,424 (review).
        let mut most = 0;
        let mut next = 0u32;
        for _ in 0..512 {
            let rows: Vec<Row> = (next..next + 511).map(|t| r(t, 1)).collect();
            next += 511;
            let m = write(&db, 4, rows);
            most = most.max(m.rows);
        }
        assert!(most <= MERGE_MAX_ROWS, "one write merged {most} rows");
        assert!(most > MERGE_MAX_ROWS / 2, "{most}");
        // Nothing lost, and the day's runs stay few.
        let left = runs(&db, 4);
        assert_eq!(left.iter().map(|(_, n)| n).sum::<u64>(), u64::from(next));
        assert!(left.len() <= 16, "{} runs", left.len());
        for t in (0..next).step_by(4_099) {
            assert_eq!(find(&db, 4, t).0, vec![r(t, 1)], "tag {t}");
        }
    }
}
