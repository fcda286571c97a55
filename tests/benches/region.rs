//! A region's month on one hub (issue 14): `cargo bench -p tests --bench region`.
//!
//! Builds `KIPASS_REGION_FACILITIES` facilities (default 600) × `KIPASS_REGION_VISITS` visits
//! a facility a day (default 60) × the 28 live days through the hub's real ingest path, one
//! partition per facility and day as a device's first sync delivers it: devices seal real
//! envelopes to real day keys (one automerge change per 100 check-ins, 2% paper entries sealed
//! to the health authority with age), the `Sync` frames a device's sync v2 session
//! (`shared::sync::Session`) sends a hub session that holds nothing are recorded as they go
//! on the wire, and the hub's side of the session is timed. As the daemon runs it, the
//! connections' side (`connection_side`: the frames decoded, each message read and checked on
//! its own, `Inbound::read`) runs on a thread beside the actor's, at most `READ_AHEAD`
//! deliveries ahead; the actor's side (`hub_side`) checks each message against the partition
//! (`check_against`, `check_op_ids`), decodes, applies, checks again
//! (`check_applied_message`) and answers, then the partition is persisted and indexed
//! (`HubPartitions::persist`: the chunk, the counts and heads, the token and facility
//! indexes). Persists commit as the hub's actor commits them (`sync_hub::daemon::Turn`: a
//! turn's writes without fsync, one durable commit at the turn's end, `end_turn`), a turn
//! taking the messages of consecutive deliveries as its inputs. The devices' side (sealing,
//! the device's documents, the recorded messages) is generated beforehand, 256 facility-days
//! at a time on both cores, and the hub then ingests them with the machine to itself: the
//! devices' work is done on the devices, not on the hub.
//!
//! Prints, with a baseline measured in the same run (unsealing every eighth partition's
//! records, nothing else): the ingest rate at each size step and over the whole build; the
//! data folder's bytes per visit at each step, with redb's own accounting per table; one-token
//! audited traces (`Desk::trace`: index, names, sealed paper, audit append) and 20-token cases,
//! p50/p99; the process's peak resident memory (`VmHWM`); the purge of the oldest day, on a
//! copy of the folder.
//!
//! `KIPASS_REGION_DIR=<folder>` builds into that folder once and reuses it on later runs
//! (traces, sizes and purge only); the folder must not exist before the first run. A folder
//! whose build did not finish (no `region-bench.json`) is refused. Other knobs:
//! `KIPASS_REGION_SAMPLES` (one-token traces, default 300), `KIPASS_REGION_CASES` (20-token
//! cases, default 40), `KIPASS_REGION_PURGE=0` skips the purge (it copies the folder),
//! `KIPASS_REGION_DAYS` (default 28) builds only the oldest that many of the live days: with
//! 3,000 facilities × 1,000 visits and 2 days, the purge (here, and in `stall.rs` on the same
//! folder) is of a day of 3 million visits, a region's, without building its whole month.

/// The hub binary's allocator (`sync-hub/src/main.rs`), so the hub's side here allocates as the
/// daemon does.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail, ensure};
use automerge::sync::{Message, State as SyncState, SyncDoc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use redb::{MultimapTableHandle, ReadableDatabase, ReadableTableMetadata, TableHandle};
use shared::daykey::DayKeyRatchet;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::paper::PaperEntry;
use shared::partition::{Partition, session_actor};
use shared::sync::harness::MemoryStore;
use shared::sync::validate::{self, ReadMessage};
use shared::sync::{Decision, Event, Frame, FrameDecoder, Inbound, PartitionStore, Peer, Session};
use shared::time::{DAY_SECONDS, Day, UnixSeconds};
use shared::unseal::unseal_partition;
use shared::{DeviceId, FacilityId, PartitionId, RecordId};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use sync_hub::Hub;
use sync_hub::ahead::UnwrapAhead;
use sync_hub::auth::Principal;
use sync_hub::daemon::{self, Metrics};
use sync_hub::ledger::{self, Ledger};
use sync_hub::trace::TraceRequest;
use tests::measure::{ms, percentile};

/// The hub's clock: 13:00 UTC of day 20,400. Fixed, so a reused folder stays live.
const NOW: UnixSeconds = tests::people::REGION_BENCH_NOW;
/// The live days (retention: 28 days).
const LIVE_DAYS: u32 = 28;
const RECORDS_PER_CHANGE: usize = 100;
const PAPER_PERCENT: u32 = 2;
const MARKER: &str = "region-bench.json";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The steps a purge made in one stage.
struct StageSteps {
    /// The table the stage deletes from.
    table: &'static str,
    steps: u64,
    /// The rows the last step was sized to.
    rows: u64,
    longest: Duration,
    total: Duration,
}

impl StageSteps {
    fn new(table: &'static str) -> Self {
        StageSteps {
            table,
            steps: 0,
            rows: 0,
            longest: Duration::ZERO,
            total: Duration::ZERO,
        }
    }

    fn add(&mut self, took: Duration, rows: u64) {
        self.steps += 1;
        self.rows = rows;
        self.longest = self.longest.max(took);
        self.total += took;
    }
}

/// Peak resident memory of this process so far, bytes (`VmHWM`).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The bytes of the disk the folder's files take (their allocated blocks: redb grows its file
/// ahead of use, and the part never written takes no disk).
fn folder_disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    folder_total(dir, &|m| m.blocks() * 512)
}

/// The apparent size of the folder's files (redb's file length, grown ahead of use).
fn folder_bytes(dir: &Path) -> u64 {
    folder_total(dir, &|m| m.len())
}

/// `size` summed over the files under `dir`, sub-folders included.
fn folder_total(dir: &Path, size: &dyn Fn(&std::fs::Metadata) -> u64) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += folder_total(&e.path(), size),
                Ok(m) => total += size(&m),
                Err(_) => {}
            }
        }
    }
    total
}

fn copy_folder(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.metadata()?.is_dir() {
            copy_folder(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// What a finished build leaves in the folder for later runs.
#[derive(serde::Serialize, serde::Deserialize)]
struct Built {
    facilities: usize,
    per_day: usize,
    /// Live days built, the oldest (folders of before this field: all 28).
    #[serde(default = "all_live_days")]
    days: u32,
    visits: u64,
    /// Sampled QR tokens, hex.
    tokens: Vec<String>,
    /// Visits of the oldest built day.
    oldest_day_visits: u64,
    /// The build's report (ingest rate, sizes), printed again on reuse.
    report: Vec<String>,
}

fn all_live_days() -> u32 {
    LIVE_DAYS
}

/// One partition as a device's first sync delivers it: the sync messages it sends an empty
/// hub, and the tokens sampled from it.
struct Delivery {
    id: PartitionId,
    /// The device's `Sync` frames as they go on the wire (`Frame::encode`: length prefix,
    /// the message deflated by the device).
    frames: Vec<Vec<u8>>,
    records: u64,
    /// For the unseal baseline (every eighth partition).
    partition: Option<Partition>,
    sampled: Vec<[u8; 16]>,
}

struct Setup {
    facilities: Vec<(FacilityId, DeviceId)>,
    ratchet: DayKeyRatchet,
    authority: String,
    per_day: usize,
    sample_every: u64,
}

fn device_partition(
    s: &Setup,
    rng: &mut ChaCha20Rng,
    facility: &FacilityId,
    device: &DeviceId,
    day: Day,
) -> Result<(Partition, Vec<[u8; 16]>)> {
    let id = PartitionId {
        facility: facility.clone(),
        day,
    };
    let public = s.ratchet.public(day).context("no public key for the day")?;
    let key = SessionKey::generate(rng, day);
    let mut p = Partition::new(id.clone(), &session_actor(device, rng));
    p.insert_wrapped_key(&key.wrap(&public)?)?;
    let (start, end) = (day.start(), day.end().min(NOW - 60));
    let mut batch = Vec::with_capacity(RECORDS_PER_CHANGE);
    let mut sampled = Vec::new();
    for _ in 0..s.per_day {
        let at = rng.gen_range(start..end);
        let body = if rng.gen_range(0..100) < PAPER_PERCENT {
            let entry = PaperEntry {
                name: "김민준".into(),
                phone: format!(
                    "010-{:04}-{:04}",
                    rng.gen_range(0..10_000),
                    rng.gen_range(0..10_000)
                ),
                visited_at: at,
                consent_collect: true,
                consent_share: true,
                guardian_consent: false,
                remarks: String::new(),
                safe_number: None,
            };
            RecordBody::Paper {
                sealed_for_authority: entry.seal_for_authority(&s.authority)?,
            }
        } else {
            let token: [u8; 16] = rng.r#gen();
            if rng.gen_range(0..s.sample_every) == 0 {
                sampled.push(token);
            }
            RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: at.saturating_sub(20),
                token,
            }
        };
        let record = Record {
            facility: facility.clone(),
            device: device.clone(),
            scanned_at: at,
            body,
        };
        let rid = RecordId::random(rng);
        batch.push((rid, key.seal(rng, &id, rid, &record)?));
        if batch.len() == RECORDS_PER_CHANGE {
            p.insert_batch(&[], &batch)?;
            batch.clear();
        }
    }
    p.insert_batch(&[], &batch)?;
    Ok((p, sampled))
}

/// Every sync message a device's sync v2 session sends a hub session that holds nothing of
/// its partition (as `edge-node` syncs: an initiator, push-only), found by running both
/// sessions once in memory, the hub's over a throwaway store, as encoded frames. Gives the
/// partition back.
fn device_messages(device: Partition, device_id: &DeviceId) -> Result<(Vec<Vec<u8>>, Partition)> {
    let facility = device.id().facility.clone();
    let id = device.id().clone();
    let mut dev_store = MemoryStore::new(b"bench-device", Some(facility.clone()));
    dev_store.insert(device);
    let mut hub_store = MemoryStore::new(b"bench-hub-replay", None);
    let me = Peer::Device {
        device: device_id.clone(),
        facility: facility.clone(),
    };
    let mut dev = Session::initiator_to(NOW, me, None, None, None, true, &dev_store)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut hub = Session::responder(Peer::Hub {
        region: "seoul".into(),
    });
    let mut sent = Vec::new();
    for _ in 0..256 {
        let mut moved = false;
        while let Some(f) = dev.poll_transmit() {
            moved = true;
            if let Frame::Sync { .. } = &f {
                sent.push(f.encode()?);
            }
            hub.handle_frame(NOW, f, &mut hub_store);
        }
        while let Some(e) = hub.poll_event() {
            if let Event::PeerHello(_) = e {
                let admit = Decision::Admit {
                    facility: facility.clone(),
                    refresh: None,
                };
                hub.admit(NOW, admit, &mut hub_store);
            }
        }
        while let Some(f) = hub.poll_transmit() {
            moved = true;
            dev.handle_frame(NOW, f, &mut dev_store);
        }
        while dev.poll_event().is_some() {}
        if !moved {
            ensure!(
                dev.is_completed(),
                "the recorded sync ended without completing"
            );
            let device = dev_store.remove(&id).context("the device's partition")?;
            return Ok((sent, device));
        }
    }
    bail!("the recorded sync did not settle in 256 rounds")
}

/// Facility-days generated at a time, on both cores, before the hub ingests them.
const GENERATE_BATCH: usize = 256;
/// How many deliveries the connections' side reads ahead of the actor (the daemon's actor
/// queue holds up to `daemon::ACTOR_QUEUE` inputs of every connection).
const READ_AHEAD: usize = 16;

/// Facility `fi`'s delivery of `day`, from a seed of its own (so the two generator threads
/// make the same data as one would).
fn delivery(setup: &Setup, fi: usize, day: Day) -> Result<Delivery> {
    let (f, d) = &setup.facilities[fi];
    let seed = (u64::from(day.0) << 32) | fi as u64;
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 14);
    let (p, sampled) = device_partition(setup, &mut rng, f, d, day)?;
    let records = p.record_count() as u64;
    let id = p.id().clone();
    let (frames, p) = device_messages(p, d)?;
    Ok(Delivery {
        id,
        frames,
        records,
        partition: (fi % 8 == 7).then_some(p),
        sampled,
    })
}

/// The deliveries of facilities `range` on `day`, in order, made on two threads: the
/// devices' side of a sync is not the hub's work, so the hub ingests each batch with the
/// machine to itself.
fn generate(setup: &Setup, day: Day, range: std::ops::Range<usize>) -> Result<Vec<Delivery>> {
    let mid = range.start + range.len() / 2;
    std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            (range.start..mid)
                .map(|fi| delivery(setup, fi, day))
                .collect::<Result<Vec<_>>>()
        });
        let second = (mid..range.end)
            .map(|fi| delivery(setup, fi, day))
            .collect::<Result<Vec<_>>>();
        let mut all = first
            .join()
            .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        all.extend(second?);
        Ok(all)
    })
}

/// What the connection's task does with a delivery's bytes before the actor sees them
/// (`sync_hub::daemon`, `forward_frames`): decodes the frames (inflating the deflated
/// messages) and reads each `Sync` message on its own (`Inbound::read`).
#[inline(never)]
fn connection_side(d: &Delivery, ahead: &UnwrapAhead) -> Result<Vec<ReadMessage>> {
    let mut decoder = FrameDecoder::new();
    let mut read = Vec::with_capacity(d.frames.len());
    let budget = sync_hub::ahead::Budget::new();
    for bytes in &d.frames {
        decoder.push(bytes)?;
        while let Some((frame, len)) = decoder.pop_sized()? {
            let (partition, message) = Inbound::read(frame, len)
                .into_sync()
                .context("a recorded frame that is not a Sync")?;
            ensure!(partition == d.id, "a frame for another partition");
            // As the daemon's connection tasks do (`sync_hub::ahead`), one connection a
            // delivery.
            ahead.unwrap_from(&message, &budget);
            read.push(message);
        }
    }
    decoder.finish()?;
    Ok(read)
}

/// The hub's side of one device's first sync of one partition on the actor: check against
/// the partition, decode, apply, check again and answer each message read on the
/// connection's side (as `shared::sync::session` does), then persist and index.
#[inline(never)]
fn hub_side(
    ledger: &Ledger<'_>,
    d: &Delivery,
    read: &[ReadMessage],
    stages: &mut Stages,
) -> Result<u64> {
    let mut parts = ledger.partitions(d.id.facility.clone(), NOW);
    let mut state = SyncState::new();
    for m in read {
        let t = Instant::now();
        let checked = m.checked().map_err(|e| anyhow::anyhow!("{e}"))?;
        match parts.partition_mut(&d.id)? {
            Some(part) => checked.check_against(Some(part.doc())),
            None => checked.check_against(None),
        }
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        match parts.partition_mut(&d.id)? {
            Some(part) => checked.check_op_ids(Some(part.doc()), &[]),
            None => checked.check_op_ids(None, &[]),
        }
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        stages.check += t.elapsed();
        let t = Instant::now();
        let message = Message::decode(m.bytes())?;
        if parts.partition_mut(&d.id)?.is_none() {
            parts.create_partition(&d.id)?;
        }
        let part = parts
            .partition_mut(&d.id)?
            .context("the partition just created")?;
        let before = part.heads();
        part.doc_mut().receive_sync_message(&mut state, message)?;
        if part.heads() != before {
            validate::check_applied_message(part.doc(), &before, &checked)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let _reply = part.doc().generate_sync_message(&mut state);
        stages.apply += t.elapsed();
    }
    let t = Instant::now();
    let indexed = parts.persist(&d.id)?;
    let took = t.elapsed();
    stages.persist += took;
    stages.longest_persist = stages.longest_persist.max(took);
    Ok(indexed)
}

/// Writes `what` ("enable\n" or "disable\n") to the perf control FIFO named by `PERF_CTL`, if
/// set, so that a profile covers the hub's ingest only: `mkfifo /tmp/perfctl`, then
/// `PERF_CTL=/tmp/perfctl perf record -D -1 --control=fifo:/tmp/perfctl BENCH --bench`.
fn perf_ctl(what: &str) {
    if let Ok(path) = std::env::var("PERF_CTL") {
        let _ = std::fs::write(path, what);
    }
}

/// Where the hub's side of the build spends its time.
#[derive(Default)]
struct Stages {
    /// The connections' side (`connection_side`: frames decoded, messages read), beside the
    /// actor's.
    read: Duration,
    /// `check_against` and `check_op_ids`, on the actor.
    check: Duration,
    /// Decode, apply, `check_applied_message`, the answer.
    apply: Duration,
    /// `HubPartitions::persist` (the write transaction, committed without fsync).
    persist: Duration,
    /// The turns' durable commits (`daemon::end_turn`).
    commit: Duration,
    /// The longest single persist (a merge of the token index's runs happens inside one).
    longest_persist: Duration,
    /// The longest single durable commit.
    longest_commit: Duration,
}

/// redb's accounting of the ledger's tables: (name, stored bytes, leaf+branch pages bytes,
/// fragmented bytes).
fn table_sizes(hub: &Hub) -> Result<Vec<(String, u64, u64, u64)>> {
    let txn = hub.store().db().begin_read()?;
    let mut out = Vec::new();
    let page = 4096u64;
    for t in txn.list_tables()? {
        let name = t.name().to_owned();
        let s = txn
            .open_untyped_table(t)
            .map_err(anyhow::Error::from)
            .and_then(|x| Ok(x.stats()?));
        if let Ok(s) = s {
            out.push((
                name,
                s.stored_bytes(),
                (s.leaf_pages() + s.branch_pages()) * page,
                s.fragmented_bytes(),
            ));
        }
    }
    for t in txn.list_multimap_tables()? {
        let name = t.name().to_owned();
        let s = txn
            .open_untyped_multimap_table(t)
            .map_err(anyhow::Error::from)
            .and_then(|x| Ok(x.stats()?));
        if let Ok(s) = s {
            out.push((
                name,
                s.stored_bytes(),
                (s.leaf_pages() + s.branch_pages()) * page,
                s.fragmented_bytes(),
            ));
        }
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.2));
    Ok(out)
}

fn table_report(hub: &Hub, visits: u64, out: &mut Vec<String>) -> Result<()> {
    out.push(String::new());
    out.push(format!(
        "redb tables at {visits} visits (bytes a visit: stored = keys+values, pages = leaf+branch pages):"
    ));
    out.push(String::new());
    out.push("| table | stored B/visit | pages B/visit | fragmented B/visit |".into());
    out.push("|---|---|---|---|".into());
    for (name, stored, pages, frag) in table_sizes(hub)? {
        if pages < 4096 * 4 {
            continue;
        }
        let v = visits.max(1) as f64;
        out.push(format!(
            "| {name} | {:.0} | {:.0} | {:.0} |",
            stored as f64 / v,
            pages as f64 / v,
            frag as f64 / v
        ));
    }
    Ok(())
}

fn build(
    dir: &Path,
    facilities: usize,
    per_day: usize,
    days: u32,
    samples: usize,
) -> Result<Built> {
    let init = Hub::init(dir, "seoul", None, vec![], None, NOW)?;
    let identity_file = init
        .authority_identity_file
        .clone()
        .context("init generated no authority identity")?;
    let hub = init.hub;
    let identity = sync_hub::trace::read_identity(&std::fs::read_to_string(&identity_file)?)
        .map_err(anyhow::Error::msg)?;
    let authority = identity.to_public().to_string();
    let registered = NOW - u64::from(LIVE_DAYS + 1) * DAY_SECONDS;
    let mut ids = Vec::new();
    for i in 0..facilities {
        let f = tests::people::add_facility(
            &hub,
            tests::people::registration(
                &format!("Facility {i}"),
                "karaoke",
                "seoul",
                &format!("{i} Sejong-daero"),
                Some(tests::fixture::BUSINESS_NUMBER),
            ),
            registered,
        )?;
        let d = tests::people::add_device(&hub, &f, registered)?;
        tests::people::set_last_sync(&hub, &d, Some(NOW))?;
        ids.push((f, d));
    }
    let total = (facilities * per_day) as u64 * u64::from(days);
    let setup = Setup {
        facilities: ids,
        ratchet: hub.keys().ratchet()?,
        authority,
        per_day,
        sample_every: (total / (samples as u64 * 2).max(1)).max(1),
    };
    let today = Day::of(NOW);
    let first = today.minus(LIVE_DAYS - 1);
    // The oldest `days` live days.
    let last = Day(first.0 + days - 1);
    let mut ledger = Ledger::open(hub.store(), hub.keys())?;
    // The session keys the connections' side unwraps ahead for the actor's persists.
    let ahead = std::sync::Arc::new(UnwrapAhead::new());
    ledger.unwrap_ahead(ahead.clone());
    let ledger = ledger;

    // Sizes are measured after these many days (and the growth between them).
    let checkpoints = [1u32, 2, 4, 7, 14, 21, 28];
    let mut report = Vec::new();
    let mut tokens: Vec<[u8; 16]> = Vec::new();
    let mut oldest_day_visits = 0u64;
    {
        let setup = &setup;
        report.push("| days | visits | ingest s (this step) | ingest rec/s (this step) | ingest rec/s (whole build) | unseal-only rec/s (baseline) | data folder (file sizes) | B/visit (file sizes) | disk (allocated) | disk B/visit | disk B/visit added this step |".into());
        report.push("|---|---|---|---|---|---|---|---|---|---|---|".into());
        let mut visits = 0u64;
        let mut ingest = Duration::ZERO;
        let (mut step_visits, mut step_ingest, mut step_bytes) = (0u64, Duration::ZERO, 0u64);
        let (mut unsealed, mut unseal_time) = (0u64, Duration::ZERO);
        let mut saves = (0u64, 0u64, 0u64, 0u64);
        let mut save_times = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let wall = Instant::now();
        let mut generating = Duration::ZERO;
        // The hub's actor commits in turns (group commit): the persists of a turn without
        // fsync, then one durable commit. A device's first sync is about four inputs besides
        // its `Sync` frames (the connection's opening, `Hello`, `Done`, the close).
        let metrics = Metrics::default();
        let end_turn = || {
            let durable = daemon::end_turn(
                &hub,
                &ledger,
                std::iter::empty::<&mut daemon::Conn>(),
                NOW,
                &metrics,
            );
            assert!(durable, "a turn's durable commit failed (see the log)");
        };
        let mut turn = daemon::Turn::begin(&hub);
        let mut partitions = 0u64;
        let mut stages = Stages::default();
        for (di, day) in (first.0..=last.0).enumerate() {
            let mut day_visits = 0u64;
            for batch in 0..setup.facilities.len().div_ceil(GENERATE_BATCH) {
                let from = batch * GENERATE_BATCH;
                let to = (from + GENERATE_BATCH).min(setup.facilities.len());
                let t = Instant::now();
                let deliveries = generate(setup, Day(day), from..to)?;
                generating += t.elapsed();
                // The hub's ingest of the batch, timed as a whole: the connections' side
                // (`connection_side`) on a thread of its own, as the daemon's connection
                // tasks run beside its actor, at most READ_AHEAD deliveries ahead; the actor's
                // side (`hub_side`, the turns) on this one.
                let t = Instant::now();
                perf_ctl("enable\n");
                let ingested = std::thread::scope(|scope| -> Result<Vec<(Delivery, u64)>> {
                    let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD);
                    let ahead = &*ahead;
                    let reader = scope.spawn(move || {
                        let mut busy = Duration::ZERO;
                        for d in deliveries {
                            let t = Instant::now();
                            let read = connection_side(&d, ahead);
                            busy += t.elapsed();
                            if tx.send(read.map(|read| (d, read))).is_err() {
                                break;
                            }
                        }
                        busy
                    });
                    let mut ingested = Vec::with_capacity(GENERATE_BATCH);
                    for next in rx {
                        let (d, read): (Delivery, Vec<ReadMessage>) = next?;
                        ensure!(d.id.day.0 == day, "deliveries out of order");
                        let indexed = hub_side(&ledger, &d, &read, &mut stages)?;
                        let mut full = false;
                        for _ in 0..d.frames.len() + 4 {
                            full |= turn.took();
                        }
                        if full {
                            let t = Instant::now();
                            end_turn();
                            let took = t.elapsed();
                            stages.commit += took;
                            stages.longest_commit = stages.longest_commit.max(took);
                            turn = daemon::Turn::begin(&hub);
                        }
                        ingested.push((d, indexed));
                    }
                    stages.read += reader
                        .join()
                        .map_err(|_| anyhow::anyhow!("the connections' thread panicked"))?;
                    Ok(ingested)
                })?;
                perf_ctl("disable\n");
                ingest += t.elapsed();
                for (d, indexed) in ingested {
                    partitions += 1;
                    ensure!(
                        indexed == d.records,
                        "indexed {indexed} of {} records of {}",
                        d.records,
                        d.id
                    );
                    visits += d.records;
                    day_visits += d.records;
                    tokens.extend(d.sampled);
                    if let Some(mut p) = d.partition {
                        let t = Instant::now();
                        unsealed += unseal_partition(&p, |day| setup.ratchet.secret(day))
                            .records
                            .len() as u64;
                        unseal_time += t.elapsed();
                        // What the hub's full save would weigh with and without DEFLATE.
                        let t = Instant::now();
                        saves.0 += p.save_uncompressed().len() as u64;
                        let t2 = Instant::now();
                        saves.1 += p.save().len() as u64;
                        let t3 = Instant::now();
                        saves.3 += ledger::pack_save(&p.save_uncompressed())?.len() as u64;
                        saves.2 += d.records;
                        save_times.0 += t2 - t;
                        save_times.1 += t3 - t2;
                        save_times.2 += t3.elapsed();
                    }
                }
            }
            if di == 0 {
                oldest_day_visits = day_visits;
            }
            let built_days = di as u32 + 1;
            eprint!(
                "\rday {built_days}/{days}: {visits} visits, ingest {:.0} rec/s, {:.0} s",
                visits as f64 / ingest.as_secs_f64(),
                wall.elapsed().as_secs_f64()
            );
            if checkpoints.contains(&built_days) || built_days == days {
                let t = Instant::now();
                end_turn();
                turn = daemon::Turn::begin(&hub);
                ingest += t.elapsed();
                let apparent = folder_bytes(dir);
                let bytes = folder_disk_bytes(dir);
                let added = visits - step_visits;
                let step = ingest - step_ingest;
                report.push(format!(
                    "| {built_days} | {visits} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} MiB | {:.0} | {:.1} MiB | {:.0} | {:.0} |",
                    step.as_secs_f64(),
                    added as f64 / step.as_secs_f64(),
                    visits as f64 / ingest.as_secs_f64(),
                    unsealed as f64 / unseal_time.as_secs_f64(),
                    apparent as f64 / (1u64 << 20) as f64,
                    apparent as f64 / visits as f64,
                    bytes as f64 / (1u64 << 20) as f64,
                    bytes as f64 / visits as f64,
                    (bytes as f64 - step_bytes as f64) / added as f64,
                ));
                step_visits = visits;
                step_ingest = ingest;
                step_bytes = bytes;
            }
        }
        eprintln!();
        end_turn();
        let commits = metrics.group_commits.load(Ordering::Relaxed);
        report.push(String::new());
        report.push(format!(
            "group commit: {commits} durable commits for {partitions} persisted partitions \
             ({:.1} partitions, {:.0} records a durable commit; {} write transactions covered)",
            partitions as f64 / commits.max(1) as f64,
            visits as f64 / commits.max(1) as f64,
            metrics.group_commit_writes.load(Ordering::Relaxed),
        ));
        let (kept, taken) = ahead.counts();
        report.push(format!(
            "session keys unwrapped ahead on the connections' side (`sync_hub::ahead`): {} \
             tried, {kept} kept, {taken} of them taken by persists, {} left",
            ahead.tried(),
            ahead.len()
        ));
        let per = |d: Duration| d.as_secs_f64() * 1e6 / visits.max(1) as f64;
        report.push(format!(
            "the hub's side per record: on the connections' side (beside the actor) frames \
             decoded and messages read {:.1} µs; on the actor check against the partition \
             {:.1} µs, decode+apply+answer {:.1} µs, persist (chunk, unseal, index, write \
             without fsync) {:.1} µs, durable commits {:.1} µs; unseal only {:.1} µs",
            per(stages.read),
            per(stages.check),
            per(stages.apply),
            per(stages.persist),
            per(stages.commit),
            unseal_time.as_secs_f64() * 1e6 / unsealed.max(1) as f64,
        ));
        report.push(format!(
            "the longest single persist (a session's hold of the writer; merges of the token \
             index's runs happen inside persists): {:.1} ms; the longest durable commit: \
             {:.1} ms",
            stages.longest_persist.as_secs_f64() * 1e3,
            stages.longest_commit.as_secs_f64() * 1e3,
        ));
        report.insert(
            0,
            format!(
                "built {visits} visits in {:.0} s wall ({:.0} s of it the hub's ingest, {:.0} s \
                 the devices' side generated beforehand on both cores); peak RSS during the \
                 build (generator included) {:.0} MiB",
                wall.elapsed().as_secs_f64(),
                ingest.as_secs_f64(),
                generating.as_secs_f64(),
                peak_rss() as f64 / (1u64 << 20) as f64
            ),
        );
        report.insert(1, String::new());
        report.push(String::new());
        report.push(format!(
            "a partition's full automerge save (every eighth partition): {:.0} B/visit \
             uncompressed ({:.1} µs/visit), {:.0} B/visit with automerge's column DEFLATE \
             ({:.1} µs/visit), {:.0} B/visit uncompressed and packed with zstd (what the hub \
             stores as a partition's first chunk and at compaction, `ledger::pack_save`, {:.1} \
             µs/visit)",
            saves.0 as f64 / saves.2.max(1) as f64,
            save_times.0.as_secs_f64() * 1e6 / saves.2.max(1) as f64,
            saves.1 as f64 / saves.2.max(1) as f64,
            save_times.1.as_secs_f64() * 1e6 / saves.2.max(1) as f64,
            saves.3 as f64 / saves.2.max(1) as f64,
            save_times.2.as_secs_f64() * 1e6 / saves.2.max(1) as f64,
        ));
    }
    let visits: u64 = total;
    table_report(&hub, visits, &mut report)?;
    // Spread over the month, not the first days only.
    let stride = (tokens.len() / samples.max(20)).max(1);
    let tokens: Vec<[u8; 16]> = tokens.into_iter().step_by(stride).collect();
    let built = Built {
        facilities,
        per_day,
        days,
        visits,
        tokens: tokens.iter().map(hex::encode).collect(),
        oldest_day_visits,
        report,
    };
    std::fs::write(dir.join(MARKER), serde_json::to_vec(&built)?)?;
    Ok(built)
}

fn main() -> Result<()> {
    let facilities = env("KIPASS_REGION_FACILITIES", 600);
    let per_day = env("KIPASS_REGION_VISITS", 60);
    let samples = env("KIPASS_REGION_SAMPLES", 300);
    let cases = env("KIPASS_REGION_CASES", 40);
    let purge = env("KIPASS_REGION_PURGE", 1) != 0;
    let days = u32::try_from(env("KIPASS_REGION_DAYS", LIVE_DAYS as usize))
        .ok()
        .filter(|d| (1..=LIVE_DAYS).contains(d))
        .context("KIPASS_REGION_DAYS must be 1 to 28")?;
    let tmp;
    let (dir, reused): (PathBuf, bool) = match std::env::var_os("KIPASS_REGION_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            (d.clone(), d.join(MARKER).exists())
        }
        None => {
            tmp = tempfile::tempdir()?;
            (tmp.path().join("hub"), false)
        }
    };
    if !reused && dir.exists() {
        bail!(
            "{} exists but holds no finished build ({MARKER}): remove it or name a new folder",
            dir.display()
        );
    }
    let built = if reused {
        let b: Built = serde_json::from_slice(&std::fs::read(dir.join(MARKER))?)?;
        eprintln!("reusing {} ({} visits)", dir.display(), b.visits);
        b
    } else {
        build(&dir, facilities, per_day, days, samples)?
    };

    println!("## A region's month on one hub (issue 14)");
    println!();
    println!(
        "{} facilities × {} visits/day × {} days = {} visits ({PAPER_PERCENT}% paper), \
         one device per facility, one first sync per facility-day; folder {}{}",
        built.facilities,
        built.per_day,
        built.days,
        built.visits,
        dir.display(),
        if reused {
            " (reused: build figures from the run that built it)"
        } else {
            ""
        }
    );
    println!();
    for line in &built.report {
        println!("{line}");
    }

    // Traces over the whole month.
    let hub = Hub::open(&dir)?;
    let ledger = Ledger::open(hub.store(), hub.keys())?;
    let who = Principal::local_operator();
    let desk = sync_hub::people::Desk::new(&hub, &ledger, NOW);
    let tokens = &built.tokens;
    ensure!(tokens.len() >= 20, "too few sampled tokens");
    let query = |ts: &[String]| {
        TraceRequest {
            tokens: ts.to_vec(),
            window_minutes: Some(30),
            case: Some("bench".into()),
            purpose: Some("latency".into()),
            ..TraceRequest::default()
        }
        .check(NOW, true)
        .map_err(anyhow::Error::msg)
    };
    desk.trace(&who, &query(&tokens[..1])?)?; // warm the page cache's first pages
    let mut one = Vec::new();
    let mut contacts = 0usize;
    for t in tokens.iter().take(samples) {
        let q = query(std::slice::from_ref(t))?;
        let s = Instant::now();
        let r = desk.trace(&who, &q)?;
        one.push(s.elapsed());
        ensure!(r.visits.len() == 1, "a sampled token has one visit");
        contacts += r.contacts.len();
    }
    one.sort();
    let mut rng = ChaCha20Rng::seed_from_u64(20);
    let mut case_times = Vec::new();
    for _ in 0..cases {
        let pick: Vec<String> = (0..20)
            .map(|_| tokens[rng.gen_range(0..tokens.len())].clone())
            .collect();
        let q = query(&pick)?;
        let s = Instant::now();
        let r = desk.trace(&who, &q)?;
        case_times.push(s.elapsed());
        ensure!(!r.visits.is_empty(), "a case finds its visits");
    }
    case_times.sort();
    // Baseline: the ledger's trace without the audited desk (index only).
    let mut bare = Vec::new();
    for t in tokens.iter().take(samples) {
        let tok: [u8; 16] = hex::decode(t)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("token"))?;
        let s = Instant::now();
        ledger.trace_facts(&[tok], 30, 0, u64::MAX, NOW)?;
        bare.push(s.elapsed());
    }
    bare.sort();
    println!();
    println!(
        "traces over {} visits ({:.1} contacts a one-token trace on average):",
        built.visits,
        contacts as f64 / one.len().max(1) as f64
    );
    println!();
    println!("| trace | runs | p50 | p99 | max | target |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| ledger trace_facts, one token (baseline: no names, paper or audit) | {} | {} | {} | {} | |",
        bare.len(),
        ms(percentile(&bare, 0.5)),
        ms(percentile(&bare, 0.99)),
        ms(*bare.last().context("runs")?)
    );
    let verdict = |d: Duration, limit: u64| {
        if d < Duration::from_millis(limit) {
            format!("< {limit} ms: met")
        } else {
            format!("< {limit} ms: NOT met")
        }
    };
    println!(
        "| audited trace, one token | {} | {} | {} | {} | {} |",
        one.len(),
        ms(percentile(&one, 0.5)),
        ms(percentile(&one, 0.99)),
        ms(*one.last().context("runs")?),
        verdict(percentile(&one, 0.99), 50)
    );
    println!(
        "| audited trace, 20-token case | {} | {} | {} | {} | {} |",
        case_times.len(),
        ms(percentile(&case_times, 0.5)),
        ms(percentile(&case_times, 0.99)),
        ms(*case_times.last().context("runs")?),
        verdict(percentile(&case_times, 0.99), 200)
    );
    drop(ledger);
    drop(hub);

    if purge {
        // On a copy: the purge destroys the oldest day's keys for good.
        let copy = dir.with_extension("purge-copy");
        let _ = std::fs::remove_dir_all(&copy);
        copy_folder(&dir, &copy)?;
        // As the running hub purges: the operator's purge, begun and audited by `people`, its
        // rows deleted in steps sized to `people::PURGE_STEP_TARGET` (the actor serves sync
        // sessions between steps), each step timed.
        let result = (|| -> Result<(Duration, ledger::PurgeReport, Vec<StageSteps>)> {
            let hub = Hub::open(&copy)?;
            let mut ledger = Ledger::open(hub.store(), hub.keys())?;
            let who = Principal::local_operator();
            let s = Instant::now();
            let mut run = sync_hub::people::begin_purge(
                &hub,
                &mut ledger,
                &who,
                Some(NOW + 2 * DAY_SECONDS),
                NOW,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut stages: Vec<StageSteps> = Vec::new();
            loop {
                let (table, rows) = (run.table(), run.chunk_rows());
                let t = Instant::now();
                let done = sync_hub::people::purge_step(&ledger, &mut run)?;
                let took = t.elapsed();
                match stages.last_mut() {
                    Some(st) if st.table == table => st.add(took, rows),
                    _ => {
                        let mut st = StageSteps::new(table);
                        st.add(took, rows);
                        stages.push(st);
                    }
                }
                if done {
                    break;
                }
            }
            let r = sync_hub::people::finish_purge(&hub, run, Ok(()), NOW)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((s.elapsed(), r, stages))
        })();
        let _ = std::fs::remove_dir_all(&copy);
        let (took, r, stages) = result?;
        println!();
        println!(
            "purge of the oldest day in the running hub's time-sized steps ({} visits, {} \
             partitions, {} index entries): {:.2} s, {:.0} visits/s",
            r.records,
            r.partitions,
            r.index_entries,
            took.as_secs_f64(),
            r.records as f64 / took.as_secs_f64(),
        );
        println!();
        println!(
            "| purge stage | steps | budget of the last step (rows; pages of chunks) | longest step | time |"
        );
        println!("|---|---|---|---|---|");
        for st in &stages {
            println!(
                "| {} | {} | {} | {:.1} ms | {:.0} ms |",
                st.table,
                st.steps,
                st.rows,
                st.longest.as_secs_f64() * 1e3,
                st.total.as_secs_f64() * 1e3
            );
        }
        let longest = stages.iter().map(|s| s.longest).max().unwrap_or_default();
        println!();
        println!(
            "longest purge step (what holds the running hub's actor): {:.1} ms (target < 100 ms: \
             {})",
            longest.as_secs_f64() * 1e3,
            if longest < Duration::from_millis(100) {
                "met"
            } else {
                "NOT met"
            }
        );
        ensure!(
            r.records == built.oldest_day_visits,
            "the purge removed {} visits, the oldest day held {}",
            r.records,
            built.oldest_day_visits
        );
    }
    println!();
    println!(
        "peak RSS of this process (VmHWM){}: {:.0} MiB (target 2048 MiB)",
        if reused {
            ", traces and purge only"
        } else {
            ", build (generator included), traces, purge"
        },
        peak_rss() as f64 / (1u64 << 20) as f64
    );
    Ok(())
}
