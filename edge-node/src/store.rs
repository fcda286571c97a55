//! The device's redb store: enrollment, the partitioned log as automerge chunks, and the
//! short memory of seen tokens.
//!
//! One file, `edge.redb`, in the data folder; every table name carries a layout version.
//! `docs/storage.md` documents each key and value. Nothing in it is readable without the
//! hub's day secrets or the health authority's identity: envelopes are sealed, seen tokens
//! are keyed hashes that expire with the code.

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use shared::envelope::{Envelope, WrappedKey};
use shared::{Day, RecordId, UnixSeconds};
use std::path::Path;
use std::time::Duration;

/// How long `edge-node run` waits for the store while another process holds it. redb lets
/// one process open the file at a time, and a short command (`status`, `scan`, `pin set`)
/// holds it for a few transactions, well under a second even with an argon2 PIN hash: 10 s
/// rides out any of them, a supervisor restarting `run` next to a cron'd command does not
/// fail, and a second `run` that holds the store for good is still reported promptly.
/// `EDGE_NODE_LOCK_WAIT_MS` overrides it (tests).
pub const RUN_LOCK_WAIT: Duration = Duration::from_secs(10);

/// `device-1`: setting name -> bytes (JSON documents and raw keys).
pub const DEVICE: TableDefinition<&str, &[u8]> = TableDefinition::new("device-1");
/// `chunks-1`: (day, sequence) -> automerge chunk of that day's partition.
pub const CHUNKS: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("chunks-1");
/// `seen-1`: keyed hash of (facility, token) -> the last second the code could still pass.
pub const SEEN: TableDefinition<&[u8; 32], u64> = TableDefinition::new("seen-1");
/// `counts-1`: day -> (records stored, records the hub is known to have).
pub const COUNTS: TableDefinition<u32, (u64, u64)> = TableDefinition::new("counts-1");

/// `pending-1`: (day, sequence) -> a check-in made durable but not yet folded into the day's
/// partition: `0x01` + 16-byte record id + sealed envelope, or `0x02` + a wrapped session
/// key. A sync round folds a day's pending rows into the partition as one automerge change
/// and deletes them in the same transaction (see [`Store::fold`]).
pub const PENDING: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("pending-1");

/// `fallback-1`: day -> (records of that day sealed under an earlier day's hub key, the
/// earliest such key's day). The device ran out of day keys; those records become unreadable
/// at the hub when that earlier key expires, before their own day does.
pub const FALLBACK: TableDefinition<u32, (u64, u32)> = TableDefinition::new("fallback-1");

/// `sync-states-1`: (peer key, day) -> encoded automerge `sync::State` for that peer and
/// partition, so the next session with the same peer sends only what is new.
pub const SYNC_STATES: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("sync-states-1");

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened.
    #[error(
        "cannot open the device store {path}: {source}; if the file is damaged, move it aside and re-enroll, then let siblings resend the log"
    )]
    Open {
        /// The file.
        path: String,
        /// redb's reason.
        source: redb::DatabaseError,
    },
    /// Another process holds the store.
    #[error(
        "the device store {0} is in use by another process (is `edge-node run` or another command active?)"
    )]
    Busy(String),
    /// redb failed.
    #[error("device store error: {0}")]
    Db(#[from] redb::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A pending row: what a check-in adds to its day's partition at the next fold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// A sealed record.
    Record(RecordId, Envelope),
    /// The wrapped key of a new session.
    Key(WrappedKey),
}

const PENDING_RECORD: u8 = 1;
const PENDING_KEY: u8 = 2;

impl Pending {
    /// The row's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Pending::Record(id, envelope) => {
                let mut out = vec![PENDING_RECORD];
                out.extend_from_slice(&id.0);
                out.extend_from_slice(&envelope.to_bytes());
                out
            }
            Pending::Key(key) => {
                let mut out = vec![PENDING_KEY];
                out.extend_from_slice(&key.to_bytes());
                out
            }
        }
    }

    /// Parses a row; `None` if it is damaged.
    pub fn decode(b: &[u8]) -> Option<Pending> {
        match b.split_first()? {
            (&PENDING_RECORD, rest) if rest.len() > 16 => {
                let (id, env) = rest.split_at(16);
                Some(Pending::Record(
                    RecordId(id.try_into().ok()?),
                    Envelope::from_bytes(env).ok()?,
                ))
            }
            (&PENDING_KEY, rest) => WrappedKey::from_bytes(rest).ok().map(Pending::Key),
            _ => None,
        }
    }
}

/// One durable write of a check-in: the pending rows (or, after a sync merged something,
/// the partition's new chunk), the seen-token entry, the record count; all in one
/// transaction, committed with `Durability::Immediate`.
pub struct CheckInWrite<'a> {
    /// The partition's day.
    pub day: Day,
    /// The automerge chunk (changes since the last save); empty for none.
    pub chunk: &'a [u8],
    /// Pending rows to add.
    pub pending: &'a [Pending],
    /// The seen-token entry, for QR visits.
    pub seen: Option<([u8; 32], UnixSeconds)>,
    /// Records added by the chunk.
    pub new_records: u64,
    /// Drop seen entries that expired before this time.
    pub prune_before: UnixSeconds,
    /// The day of the hub key the record's session key was wrapped to, when it is not the
    /// record's own day (the day-key fallback): counted in `fallback-1`.
    pub fallback_key_day: Option<Day>,
}

/// The device's store.
pub struct Store {
    db: Database,
    /// Unit tests: while set, every write transaction fails as a full or failing disk would.
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens (or creates) the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::Busy(path.display().to_string())
            }
            source => StoreError::Open {
                path: path.display().to_string(),
                source,
            },
        })?;
        let txn = db.begin_write()?;
        txn.open_table(DEVICE)?;
        txn.open_table(CHUNKS)?;
        txn.open_table(SEEN)?;
        txn.open_table(COUNTS)?;
        txn.open_table(SYNC_STATES)?;
        txn.open_table(PENDING)?;
        txn.open_table(FALLBACK)?;
        txn.commit()?;
        Ok(Store {
            db,
            #[cfg(test)]
            fail_writes: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Unit tests: makes every later write transaction fail (`true`) or work again.
    #[cfg(test)]
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(
                redb::StorageError::Io(std::io::Error::other("injected write failure")).into(),
            );
        }
        Ok(self.db.begin_write()?)
    }

    /// A setting.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(DEVICE)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Writes settings atomically.
    pub fn put(&self, entries: &[(&str, &[u8])]) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(DEVICE)?;
            for (k, v) in entries {
                t.insert(*k, *v)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Removes a setting.
    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        txn.open_table(DEVICE)?.remove(key)?;
        txn.commit()?;
        Ok(())
    }

    /// Whether a seen-token entry is present and not expired at `now`.
    pub fn seen(&self, hash: &[u8; 32], now: UnixSeconds) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SEEN)?;
        Ok(t.get(hash)?.is_some_and(|v| v.value() >= now))
    }

    /// Commits one check-in durably.
    pub fn commit_check_in(&self, w: &CheckInWrite<'_>) -> Result<(), StoreError> {
        let mut txn = self.begin_write()?;
        // Immediate is redb's default; say it, because "accepted" depends on it.
        txn.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        if !w.chunk.is_empty() {
            let mut chunks = txn.open_table(CHUNKS)?;
            let next = next_seq(&chunks, w.day)?;
            chunks.insert((w.day.0, next), w.chunk)?;
        }
        if !w.pending.is_empty() {
            let mut pending = txn.open_table(PENDING)?;
            let first = next_seq(&pending, w.day)?;
            for (seq, row) in (first..).zip(w.pending) {
                pending.insert((w.day.0, seq), row.encode().as_slice())?;
            }
        }
        {
            let mut counts = txn.open_table(COUNTS)?;
            let (total, synced) = counts.get(w.day.0)?.map_or((0, 0), |v| v.value());
            counts.insert(w.day.0, (total + w.new_records, synced))?;
        }
        if let Some(key_day) = w.fallback_key_day {
            let mut fallback = txn.open_table(FALLBACK)?;
            let (n, earliest) = fallback.get(w.day.0)?.map_or((0, key_day.0), |v| v.value());
            fallback.insert(w.day.0, (n + w.new_records, earliest.min(key_day.0)))?;
        }
        {
            let mut seen = txn.open_table(SEEN)?;
            if let Some((h, until)) = &w.seen {
                seen.insert(h, *until)?;
            }
            // The table holds only codes of the last minute or so: a scan is cheap.
            let expired: Vec<[u8; 32]> = seen
                .iter()?
                .filter_map(|r| r.ok())
                .filter(|(_, v)| v.value() < w.prune_before)
                .map(|(k, _)| *k.value())
                .collect();
            for h in expired {
                seen.remove(&h)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The chunks of one day's partition, in order, concatenated.
    pub fn partition_bytes(&self, day: Day) -> Result<(Vec<u8>, usize), StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CHUNKS)?;
        let mut out = Vec::new();
        let mut n = 0;
        for row in t.range((day.0, 0)..=(day.0, u64::MAX))? {
            let (_, v) = row?;
            out.extend_from_slice(v.value());
            n += 1;
        }
        Ok((out, n))
    }

    /// Days that have pending rows.
    pub fn pending_days(&self) -> Result<Vec<Day>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PENDING)?;
        let mut days = Vec::new();
        for row in t.iter()? {
            let (k, _) = row?;
            let day = Day(k.value().0);
            if days.last() != Some(&day) {
                days.push(day);
            }
        }
        Ok(days)
    }

    /// A day's pending rows, in order: (sequence, row or `None` if the row is damaged).
    pub fn pending(&self, day: Day) -> Result<Vec<(u64, Option<Pending>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PENDING)?;
        let mut out = Vec::new();
        for row in t.range((day.0, 0)..=(day.0, u64::MAX))? {
            let (k, v) = row?;
            out.push((k.value().1, Pending::decode(v.value())));
        }
        Ok(out)
    }

    /// Folds pending rows into the partition atomically: appends the chunk that holds them
    /// (one automerge change) and deletes exactly the rows `folded`.
    pub fn fold(&self, day: Day, chunk: &[u8], folded: &[u64]) -> Result<(), StoreError> {
        let mut txn = self.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(redb::Error::from)?;
        {
            let mut chunks = txn.open_table(CHUNKS)?;
            if !chunk.is_empty() {
                let next = next_seq(&chunks, day)?;
                chunks.insert((day.0, next), chunk)?;
            }
            let mut pending = txn.open_table(PENDING)?;
            for seq in folded {
                pending.remove((day.0, *seq))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Replaces a day's chunks with one full save (compaction), atomically.
    pub fn replace_partition(&self, day: Day, full: &[u8], records: u64) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(CHUNKS)?;
            t.retain_in((day.0, 0)..=(day.0, u64::MAX), |_, _| false)?;
            t.insert((day.0, 0), full)?;
        }
        {
            let mut counts = txn.open_table(COUNTS)?;
            let synced = counts.get(day.0)?.map_or(0, |v| v.value().1);
            counts.insert(day.0, (records, synced.min(records)))?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Days that have a partition, with (records, records known at the hub).
    pub fn days(&self) -> Result<Vec<(Day, u64, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(COUNTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (total, synced) = v.value();
            out.push((Day(k.value()), total, synced));
        }
        Ok(out)
    }

    /// Days with records sealed under an earlier day's hub key: (day, records, the earliest
    /// key's day).
    pub fn fallback_sealed(&self) -> Result<Vec<(Day, u64, Day)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FALLBACK)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let (n, key_day) = v.value();
            out.push((Day(k.value()), n, Day(key_day)));
        }
        Ok(out)
    }

    /// Marks how many of a day's records the hub is known to hold.
    pub fn set_synced(&self, day: Day, synced: u64) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        {
            let mut counts = txn.open_table(COUNTS)?;
            let total = counts.get(day.0)?.map_or(0, |v| v.value().0);
            counts.insert(day.0, (total, synced.min(total)))?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The sync state stored for (`peer`, `day`).
    pub fn sync_state(&self, peer: &str, day: Day) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SYNC_STATES)?;
        Ok(t.get((peer, day.0))?.map(|v| v.value().to_vec()))
    }

    /// Stores the sync state for (`peer`, `day`).
    pub fn put_sync_state(&self, peer: &str, day: Day, state: &[u8]) -> Result<(), StoreError> {
        let txn = self.begin_write()?;
        txn.open_table(SYNC_STATES)?.insert((peer, day.0), state)?;
        txn.commit()?;
        Ok(())
    }

    /// Drops whole partitions, then compacts the file so their pages are rewritten.
    ///
    /// Dropped envelopes may survive in free pages until reused; they are sealed to day keys
    /// the hub destroys on the same schedule, so what survives is unreadable.
    pub fn drop_days(&mut self, days: &[Day]) -> Result<(), StoreError> {
        if days.is_empty() {
            return Ok(());
        }
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(CHUNKS)?;
            let mut counts = txn.open_table(COUNTS)?;
            let mut states = txn.open_table(SYNC_STATES)?;
            let mut pending = txn.open_table(PENDING)?;
            let mut fallback = txn.open_table(FALLBACK)?;
            for d in days {
                t.retain_in((d.0, 0)..=(d.0, u64::MAX), |_, _| false)?;
                pending.retain_in((d.0, 0)..=(d.0, u64::MAX), |_, _| false)?;
                counts.remove(d.0)?;
                fallback.remove(d.0)?;
            }
            states.retain(|(_, day), _| !days.contains(&Day(day)))?;
        }
        txn.commit()?;
        // Compaction is best effort: it fails while a read transaction is open.
        let _ = self.db.compact();
        Ok(())
    }
}

/// The next free sequence number of `day` in a (day, sequence) table.
fn next_seq(
    t: &impl ReadableTable<(u32, u64), &'static [u8]>,
    day: Day,
) -> Result<u64, StoreError> {
    Ok(t.range((day.0, 0)..=(day.0, u64::MAX))?
        .next_back()
        .transpose()?
        .map_or(0, |(k, _)| k.value().1 + 1))
}
