//! Does the hub's sync stall under the people's reads and the daily purge? (issue 14, "no
//! stall"): `cargo bench -p tests --bench stall`.
//!
//! A real `sync-hub run` (the binary beside this bench: `target/<profile>/sync-hub`) over a
//! large data folder; in this process `STALL_DEVICES` enrolled devices (default 6), each on
//! its own iroh endpoint on loopback, doing real sync rounds (`edge_node::net::sync_with`,
//! two fresh check-ins before each, a 100 ms pause after) back to back. Each round is timed
//! from the dial to the end of the session. Three phases:
//!
//! - **(a) quiet**: the rounds alone, `STALL_SECONDS` (default 20);
//! - **(b) reads**: the same, while one client each calls, over HTTP with real credentials and
//!   back to back, the audited trace (`POST /api/trace`, one sampled token, as the health
//!   authority), the shared-code report (`GET /api/reports/shared-codes`, the authority), the
//!   compliance report (`GET /api/reports/compliance?hours=24`) and the dashboard data
//!   (`GET /api/dashboard`), both as a local-government officer of the region;
//! - **(c) purge**: the rounds while the local operator's `POST /api/purge` (as of two days
//!   ahead) purges the folder's oldest day, until it answers (at most [`PURGE_DEADLINE`]).
//!
//! Printed: per phase the rounds' p50/p99/max; the ratios p99(b)/p99(a) and p99(c)/p99(a)
//! beside the target (2x); what held the hub's actor (`/metrics`:
//! `kipass_hub_actor_hold_max_seconds` by kind, and from `kipass_hub_actor_hold_seconds` the
//! holds of each phase over 100 ms) beside the target (no hold over 100 ms); the reads'
//! latencies and how many the hub refused as busy (503). The bench fails only when a round or
//! a setup step fails; a missed target is printed as such.
//!
//! The data folder: `KIPASS_REGION_DIR=<folder>` names one `tests/benches/region.rs` built
//! (its `region-bench.json` beside `hub.redb`). Its facilities' devices were never enrolled
//! for real (no endpoint, no credentials), so this bench works on a copy
//! (`KIPASS_STALL_COPY`, default `<folder>.stall-copy`, removed at the end): it trusts the
//! test issuer, registers `STALL_DEVICES` new facilities with one enrolled device each, adds
//! the two credentials, and runs the hub with its clock set to the region bench's
//! (`KIPASS_CLOCK_OFFSET`, from [`REGION_NOW`] or `KIPASS_REGION_NOW`); the traces use the
//! region bench's sampled tokens. Without it, a modest folder is built in a temporary folder
//! through the hub's real ledger (`tests::people::store_visits`: sealed envelopes, real day
//! keys, 2% paper): `STALL_FACILITIES` (default 30) × `STALL_VISITS` a day (default 40) × 28
//! days.
//!
//! ```text
//! cargo build -p sync-hub --bins && cargo bench --profile dev -p tests --bench stall
//! cargo build --release -p sync-hub && KIPASS_REGION_DIR=/data/region cargo bench -p tests --bench stall
//! ```

use anyhow::{Context, Result, bail, ensure};
use edge_node::device::Device;
use edge_node::net::{self, SharedDevice, Target};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use shared::time::{DAY_SECONDS, Day};
use shared::{DeviceId, FacilityId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sync_hub::Hub;
use tests::fixture::{self, Proc, bin};
use tests::measure::{ms, percentile};
use tests::people::{Api, Visit};

/// The region bench's clock.
const REGION_NOW: u64 = tests::people::REGION_BENCH_NOW;
const DAYS: u32 = 28;
/// Check-ins a device makes before each round.
const VISITS_PER_ROUND: usize = 2;
/// A device's pause after a round.
const PAUSE: Duration = Duration::from_millis(100);
/// Rounds a device makes in one phase at most.
const MAX_ROUNDS: usize = 2_000;
/// How long a round may take before it counts as failed.
const ROUND_LIMIT: Duration = Duration::from_secs(60);
/// The longest the purge phase waits for the purge's answer.
const PURGE_DEADLINE: Duration = Duration::from_secs(1_800);
/// How long the hub may take to start.
const HUB_DEADLINE: Duration = Duration::from_secs(300);
/// Targets of issue 14.
const TARGET_RATIO: f64 = 2.0;
const TARGET_HOLD: Duration = Duration::from_millis(100);

fn env(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a count")),
        Err(_) => Ok(default),
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

/// Copies the folder and syncs every file it wrote to disk: the copy's gigabytes of dirty
/// pages, left to the kernel's writeback, would stall the hub's first durable commits behind
/// them (a purge step's commit once waited 124-201 ms on it), which measures the bench, not
/// the hub.
fn copy_folder(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.metadata()?.is_dir() {
            copy_folder(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    Ok(())
}

/// The hub's folder, its clock and what the phases need of it.
struct Setup {
    /// The hub's data folder (a copy of the region's, or a temporary one).
    dir: PathBuf,
    /// Removed at the end when it is a copy.
    copy: bool,
    /// Keeps a built folder alive.
    _tmp: Option<tempfile::TempDir>,
    /// Seconds added to the real clock (the hub's and the devices').
    offset: i64,
    visits: u64,
    /// Sampled QR tokens, hex, for the traces.
    tokens: Vec<String>,
    /// (device folder, ticket) of the devices enrolled for the rounds.
    devices: Vec<PathBuf>,
    authority: String,
    officer: String,
    what: String,
}

fn clock(offset: i64) -> u64 {
    fixture::now().saturating_add_signed(offset)
}

/// A modest region in `dir`: `facilities` × `per_day` × [`DAYS`] visits, stored through the
/// hub's ledger as the devices' syncs would have; returns the visits and sampled tokens.
fn build(dir: &Path, facilities: u64, per_day: u64) -> Result<(u64, Vec<String>)> {
    let now = fixture::now();
    let init = Hub::init(dir, "seoul", None, vec![], None, now)?;
    let identity = std::fs::read_to_string(
        init.authority_identity_file
            .as_ref()
            .context("init generated no authority identity")?,
    )?;
    let recipient = sync_hub::trace::read_identity(&identity)
        .map_err(anyhow::Error::msg)?
        .to_public()
        .to_string();
    let hub = init.hub;
    let registered = now - u64::from(DAYS + 1) * DAY_SECONDS;
    let mut ids: Vec<(FacilityId, DeviceId)> = Vec::new();
    for i in 0..facilities {
        let f = tests::people::add_facility(
            &hub,
            tests::people::registration(
                &format!("Facility {i}"),
                "karaoke",
                "seoul",
                &format!("{i} Sejong-daero"),
                Some(fixture::BUSINESS_NUMBER),
            ),
            registered,
        )?;
        let d = tests::people::add_device(&hub, &f, registered)?;
        tests::people::set_last_sync(&hub, &d, Some(now))?;
        ids.push((f, d));
    }
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let today = Day::of(now);
    let mut tokens = Vec::new();
    let mut visits = 0u64;
    // A day at a time, so memory stays at one day's visits.
    for back in (0..DAYS).rev() {
        let day = today.minus(back);
        let (start, end) = (day.start(), day.end().min(now - 60));
        let mut batch = Vec::new();
        for (f, d) in &ids {
            for _ in 0..per_day {
                let at = rng.gen_range(start..end);
                let paper = rng.gen_range(0..100) < 2;
                let token = (!paper).then(|| tests::people::token(&mut rng));
                if let Some(t) = token
                    && rng.gen_range(0..200) == 0
                {
                    tokens.push(hex::encode(t));
                }
                batch.push(Visit {
                    facility: f.clone(),
                    device: d.clone(),
                    at,
                    token,
                    paper_name: paper.then(|| "김민준".to_owned()),
                    paper_remarks: String::new(),
                });
            }
        }
        visits += tests::people::store_visits(&hub, &recipient, &batch, u64::from(day.0), now)?;
        eprint!("\rbuilt day {}/{DAYS}: {visits} visits", DAYS - back);
    }
    eprintln!();
    Ok((visits, tokens))
}

/// Trusts the test issuer, registers `n` facilities with a device each and enrolls the devices
/// in `devices_dir`, at the hub's time `now`; then the two credentials (through the binary).
fn prepare(
    dir: &Path,
    devices_dir: &Path,
    n: u64,
    now: u64,
) -> Result<(Vec<PathBuf>, String, String)> {
    let region;
    let mut devices = Vec::new();
    {
        let hub = Hub::open(dir)?;
        region = hub.config().region.clone();
        hub.import_issuers(&fixture::keyring_json())?;
        std::fs::create_dir_all(devices_dir)?;
        for i in 0..n {
            let f = tests::people::add_facility(
                &hub,
                tests::people::registration(
                    &format!("Stall bench {i}"),
                    "karaoke",
                    &region,
                    &format!("{i} Stall-ro"),
                    Some(fixture::BUSINESS_NUMBER),
                ),
                now,
            )?;
            let ticket = hub.enroll(f.as_str(), "gate", now)?;
            let path = devices_dir.join(format!("{i}.ticket"));
            Hub::write_ticket(&ticket, &path)?;
            let dev = devices_dir.join(format!("dev-{i}"));
            Device::init(&dev, &path, now)?;
            devices.push(dev);
        }
    }
    let credential = |role: &str, region: Option<&str>| -> Result<String> {
        let mut args = vec![
            "--data",
            path_str(dir)?,
            "credential",
            "add",
            "--role",
            role,
            "--name",
            "stall bench",
            "--json",
        ];
        if let Some(r) = region {
            args.extend(["--region", r]);
        }
        let v: serde_json::Value =
            serde_json::from_str(fixture::run_ok("sync-hub", &args)?.trim())?;
        Ok(v["secret"].as_str().context("no secret")?.to_owned())
    };
    let authority = credential("authority", None)?;
    let officer = credential("officer", Some(&region))?;
    Ok((devices, authority, officer))
}

fn setup(devices: u64) -> Result<Setup> {
    let t = Instant::now();
    let (dir, copy, tmp, offset, visits, tokens, what) = match std::env::var_os("KIPASS_REGION_DIR")
    {
        Some(region) => {
            let region = PathBuf::from(region);
            let marker: serde_json::Value = serde_json::from_slice(
                &std::fs::read(region.join("region-bench.json")).with_context(|| {
                    format!("{} holds no finished region build", region.display())
                })?,
            )?;
            let copy = std::env::var_os("KIPASS_STALL_COPY")
                .map(PathBuf::from)
                .unwrap_or_else(|| region.with_extension("stall-copy"));
            ensure!(
                !copy.exists(),
                "{} exists: remove it (a copy of an earlier run) or name another KIPASS_STALL_COPY",
                copy.display()
            );
            copy_folder(&region, &copy)?;
            let now = env("KIPASS_REGION_NOW", REGION_NOW)?;
            let offset = i64::try_from(now)? - i64::try_from(fixture::now())?;
            let tokens: Vec<String> = marker["tokens"]
                .as_array()
                .context("region-bench.json has no tokens")?
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect();
            let visits = marker["visits"].as_u64().unwrap_or(0);
            let what = format!(
                "region folder {} ({} facilities × {} visits/day), copied to {} in {:.0} s",
                region.display(),
                marker["facilities"],
                marker["per_day"],
                copy.display(),
                t.elapsed().as_secs_f64()
            );
            (copy, true, None, offset, visits, tokens, what)
        }
        None => {
            let facilities = env("STALL_FACILITIES", 30)?;
            let per_day = env("STALL_VISITS", 40)?;
            let tmp = tempfile::tempdir()?;
            let dir = tmp.path().join("hub");
            let (visits, tokens) = build(&dir, facilities, per_day)?;
            let what = format!(
                "built folder: {facilities} facilities × {per_day} visits/day × {DAYS} days, in {:.0} s",
                t.elapsed().as_secs_f64()
            );
            (dir, false, Some(tmp), 0, visits, tokens, what)
        }
    };
    ensure!(!tokens.is_empty(), "no sampled tokens to trace");
    let devices_dir = dir.with_extension("stall-devices");
    let _ = std::fs::remove_dir_all(&devices_dir);
    let (devices, authority, officer) = prepare(&dir, &devices_dir, devices, clock(offset))?;
    Ok(Setup {
        dir,
        copy,
        _tmp: tmp,
        offset,
        visits,
        tokens,
        devices,
        authority,
        officer,
        what,
    })
}

/// `sync-hub run` on `dir` with the clock `offset`, sync on `127.0.0.1:port`; waits for its
/// `run.json` and returns the process and its HTTP base URL.
fn start_hub(dir: &Path, port: u16, offset: i64, log: &Path) -> Result<(Proc, String)> {
    let run = dir.join("run.json");
    let _ = std::fs::remove_file(&run);
    let mut cmd = Command::new(bin("sync-hub"));
    cmd.arg("--data")
        .arg(dir)
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--http", "127.0.0.1:0"])
        .env_remove("SYNC_HUB_DATA")
        .env("KIPASS_CLOCK_OFFSET", offset.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    let mut hub = Proc(cmd.spawn().context("cannot start sync-hub run")?);
    let deadline = Instant::now() + HUB_DEADLINE;
    while !run.exists() {
        if let Some(status) = hub.0.try_wait()? {
            bail!(
                "sync-hub run exited early ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "sync-hub run did not start in {HUB_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&run)?)?;
    let http = v["http"].as_str().context("run.json has no http")?;
    Ok((hub, format!("http://{http}")))
}

/// The sync rounds of one phase, all devices together.
#[derive(Default)]
struct Rounds {
    took: Vec<Duration>,
    failed: Vec<String>,
}

impl Rounds {
    fn sorted(mut self) -> Self {
        self.took.sort();
        self
    }
}

/// How long a phase's rounds go on.
#[derive(Clone)]
struct Until {
    /// Checked before each round.
    stop: Arc<AtomicBool>,
    limit: Instant,
    rounds: usize,
}

impl Until {
    fn time(d: Duration) -> Self {
        Until {
            stop: Arc::new(AtomicBool::new(false)),
            limit: Instant::now() + d,
            rounds: MAX_ROUNDS,
        }
    }
}

/// One device's rounds until `until` says stop.
async fn device_rounds(
    endpoint: iroh::Endpoint,
    device: SharedDevice,
    target: Target,
    offset: i64,
    until: Until,
) -> Result<Rounds> {
    let issuer = fixture::issuer();
    let mut out = Rounds::default();
    let (stop, limit) = (until.stop, until.limit);
    for _ in 0..until.rounds {
        if stop.load(Ordering::Acquire) || Instant::now() >= limit {
            break;
        }
        {
            let mut d = device
                .lock()
                .map_err(|_| anyhow::anyhow!("a device lock was poisoned"))?;
            for _ in 0..VISITS_PER_ROUND {
                fixture::check_in_fresh(&mut d, &issuer, clock(offset))?;
            }
        }
        let started = Instant::now();
        let r = tokio::time::timeout(
            ROUND_LIMIT,
            net::sync_with(&endpoint, &device, &target, move || clock(offset)),
        )
        .await;
        match r {
            Ok(r) if r.ok => out.took.push(started.elapsed()),
            Ok(r) => out
                .failed
                .push(r.error.unwrap_or_else(|| "no reason given".into())),
            Err(_) => out.failed.push(format!("no answer in {ROUND_LIMIT:?}")),
        }
        tokio::time::sleep(PAUSE).await;
    }
    Ok(out)
}

/// Every device's rounds until `until` says stop.
async fn phase(
    devices: &[(iroh::Endpoint, SharedDevice, Target)],
    offset: i64,
    until: Until,
) -> Result<Rounds> {
    let mut tasks = Vec::new();
    for (e, d, t) in devices {
        tasks.push(tokio::spawn(device_rounds(
            e.clone(),
            d.clone(),
            t.clone(),
            offset,
            until.clone(),
        )));
    }
    let mut all = Rounds::default();
    for t in tasks {
        let r = t.await.context("a device task panicked")??;
        all.took.extend(r.took);
        all.failed.extend(r.failed);
    }
    Ok(all.sorted())
}

/// One reader's calls: latencies of answered calls, and counts by status.
#[derive(Default)]
struct Reads {
    ok: Vec<Duration>,
    busy: u64,
    other: BTreeMap<String, u64>,
}

/// Calls `path` back to back as `bearer` until `stop` is set.
fn reader(
    base: String,
    method: &'static str,
    path: String,
    bearer: String,
    body: impl Fn(usize) -> Option<String>,
    stop: Arc<AtomicBool>,
) -> Reads {
    let api = Api::new(&base);
    let mut out = Reads::default();
    let mut i = 0usize;
    while !stop.load(Ordering::Acquire) {
        let b = body(i);
        i += 1;
        let started = Instant::now();
        match api.call(method, &path, Some(&bearer), b.as_deref()) {
            Ok(a) if a.status == 200 => out.ok.push(started.elapsed()),
            Ok(a) if a.status == 503 => {
                out.busy += 1;
                // What the answer's Retry-After asks is seconds; a client polling this hard
                // is the worst case, a short wait keeps it from spinning.
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(a) => *out.other.entry(format!("HTTP {}", a.status)).or_default() += 1,
            Err(e) => *out.other.entry(e.to_string()).or_default() += 1,
        }
    }
    out.ok.sort();
    out
}

/// The hub's `/metrics` as (series, value).
fn scrape(api: &Api, operator: &str) -> Result<BTreeMap<String, f64>> {
    let a = api.call("GET", "/metrics", Some(operator), None)?;
    ensure!(a.status == 200, "/metrics: HTTP {}: {}", a.status, a.text);
    Ok(a.text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

/// Holds over [`TARGET_HOLD`] between two scrapes, and all holds.
fn holds_between(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> (f64, f64) {
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let count = "kipass_hub_actor_hold_seconds_count";
    let under = "kipass_hub_actor_hold_seconds_bucket{le=\"0.1\"}";
    let all = get(after, count) - get(before, count);
    let within = get(after, under) - get(before, under);
    (all - within, all)
}

fn main() -> Result<()> {
    if !bin("sync-hub").exists() {
        bail!(
            "{} is missing: build it first (`cargo build [--release] -p sync-hub`)",
            bin("sync-hub").display()
        );
    }
    let n_devices = env("STALL_DEVICES", 6)?.max(1);
    let seconds = Duration::from_secs(env("STALL_SECONDS", 20)?.max(1));
    let started = Instant::now();
    let s = setup(n_devices)?;
    println!("## Sync rounds under the people's reads and the purge (issue 14, no stall)");
    println!();
    println!(
        "{}; {} visits; {} devices syncing ({VISITS_PER_ROUND} new visits a round, {} ms pause), \
         {} s a phase; hub binary {}",
        s.what,
        s.visits,
        s.devices.len(),
        PAUSE.as_millis(),
        seconds.as_secs(),
        bin("sync-hub").display()
    );
    let result = run(&s, seconds);
    if s.copy {
        let _ = std::fs::remove_dir_all(&s.dir);
    }
    let _ = std::fs::remove_dir_all(s.dir.with_extension("stall-devices"));
    result?;
    println!();
    println!("bench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn run(s: &Setup, seconds: Duration) -> Result<()> {
    let port = fixture::free_udp_port()?;
    let log = s.dir.with_extension("stall-hub.log");
    let (hub, base) = start_hub(&s.dir, port, s.offset, &log)?;
    let operator = sync_hub::control::operator_token(&s.dir)?;
    let api = Api::new(&base);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let hub_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let devices = runtime.block_on(async {
        let mut out = Vec::new();
        for dir in &s.devices {
            let d: SharedDevice = Arc::new(Mutex::new(Device::open(dir)?));
            let endpoint = net::bind(&d, "127.0.0.1:0".parse()?).await?;
            let mut target = {
                let g = d.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                net::hub_target(&g)?
            };
            target.addrs = vec![hub_addr];
            target.names.clear();
            out.push((endpoint, d, target));
        }
        anyhow::Ok(out)
    })?;
    // A first round each (admission binds the endpoint, the device's first partition): not
    // measured.
    let warm = runtime.block_on(phase(
        &devices,
        s.offset,
        Until {
            rounds: 1,
            ..Until::time(ROUND_LIMIT)
        },
    ))?;
    ensure!(
        warm.failed.is_empty(),
        "warm-up rounds failed: {:?}",
        warm.failed
    );

    let m0 = scrape(&api, &operator)?;
    // (a) quiet.
    let quiet = runtime.block_on(phase(&devices, s.offset, Until::time(seconds)))?;
    let m1 = scrape(&api, &operator)?;

    // (b) the people's reads, back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(s.tokens.clone());
    let mut readers = Vec::new();
    let spawn = |name: &'static str,
                 method: &'static str,
                 path: &str,
                 bearer: &str,
                 body: Box<dyn Fn(usize) -> Option<String> + Send>| {
        let (base, path, bearer, stop) = (
            base.clone(),
            path.to_owned(),
            bearer.to_owned(),
            stop.clone(),
        );
        (
            name,
            std::thread::spawn(move || reader(base, method, path, bearer, body, stop)),
        )
    };
    let t = tokens.clone();
    readers.push(spawn(
        "audited trace, one token (authority)",
        "POST",
        "/api/trace",
        &s.authority,
        Box::new(move |i| {
            Some(
                serde_json::json!({
                    "tokens": [t[i % t.len()]],
                    "case": "stall-bench",
                    "purpose": "sync latency under load"
                })
                .to_string(),
            )
        }),
    ));
    readers.push(spawn(
        "shared-code report (authority)",
        "GET",
        "/api/reports/shared-codes",
        &s.authority,
        Box::new(|_| None),
    ));
    readers.push(spawn(
        "compliance report, 24 h (officer)",
        "GET",
        "/api/reports/compliance?hours=24",
        &s.officer,
        Box::new(|_| None),
    ));
    readers.push(spawn(
        "dashboard data (officer)",
        "GET",
        "/api/dashboard",
        &s.officer,
        Box::new(|_| None),
    ));
    // The readers' first calls are under way before the rounds are timed.
    std::thread::sleep(Duration::from_millis(500));
    let loaded = runtime.block_on(phase(&devices, s.offset, Until::time(seconds)))?;
    let m2 = scrape(&api, &operator)?;
    stop.store(true, Ordering::Release);
    let read_figures: Vec<(&str, Reads)> = readers
        .into_iter()
        .map(|(name, h)| {
            Ok((
                name,
                h.join().map_err(|_| anyhow::anyhow!("a reader panicked"))?,
            ))
        })
        .collect::<Result<_>>()?;

    // (c) the purge of the oldest day, the rounds until it answers.
    let m3 = scrape(&api, &operator)?;
    // Live days run from `horizon(now)`, 28 days before today; the folder's oldest is 27 days
    // before today (as the region bench's), so retention two days ahead takes exactly that one.
    let as_of = clock(s.offset) + 2 * DAY_SECONDS;
    let purge_done = Arc::new(AtomicBool::new(false));
    let purge = {
        let (base, operator, done) = (base.clone(), operator.clone(), purge_done.clone());
        std::thread::spawn(move || {
            let api = Api::new(&base);
            let started = Instant::now();
            let r = api.call(
                "POST",
                "/api/purge",
                Some(&operator),
                Some(&serde_json::json!({ "as_of": as_of }).to_string()),
            );
            done.store(true, Ordering::Release);
            r.map(|a| (started.elapsed(), a))
        })
    };
    let purging = runtime.block_on(phase(
        &devices,
        s.offset,
        Until {
            stop: purge_done.clone(),
            ..Until::time(PURGE_DEADLINE)
        },
    ))?;
    let (purge_took, purge_answer) = purge
        .join()
        .map_err(|_| anyhow::anyhow!("the purge thread panicked"))??;
    let m4 = scrape(&api, &operator)?;
    runtime.block_on(async {
        for (e, _, _) in &devices {
            let _ = tokio::time::timeout(Duration::from_secs(2), e.close()).await;
        }
    });
    drop(hub);

    println!();
    println!(
        "| phase | rounds | failed | p50 | p99 | max | p99 / p99 quiet (target <= {TARGET_RATIO}x) | actor holds | of them > 100 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let p99_quiet = percentile(&quiet.took, 0.99);
    let mut ratios = Vec::new();
    for (name, r, (before, after)) in [
        ("(a) quiet", &quiet, (&m0, &m1)),
        ("(b) reads running", &loaded, (&m1, &m2)),
        ("(c) purge of the oldest day", &purging, (&m3, &m4)),
    ] {
        let p99 = percentile(&r.took, 0.99);
        let ratio = p99.as_secs_f64() / p99_quiet.as_secs_f64().max(1e-9);
        let (over, all) = holds_between(before, after);
        let verdict = if name.starts_with("(a)") {
            String::new()
        } else if r.took.is_empty() {
            "no round".to_owned()
        } else {
            ratios.push(ratio);
            format!(
                "{ratio:.2}x: {}",
                if ratio <= TARGET_RATIO {
                    "met"
                } else {
                    "NOT met"
                }
            )
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {verdict} | {all:.0} | {over:.0} |",
            r.took.len(),
            r.failed.len(),
            ms(percentile(&r.took, 0.5)),
            ms(p99),
            ms(r.took.last().copied().unwrap_or_default()),
        );
    }
    for r in [&quiet, &loaded, &purging] {
        for e in r.failed.iter().take(3) {
            println!("  failed round: {e}");
        }
    }
    println!();
    println!(
        "purge: HTTP {} in {:.2} s: {}",
        purge_answer.status,
        purge_took.as_secs_f64(),
        purge_answer.text.chars().take(300).collect::<String>()
    );
    println!();
    println!("the people's reads during (b), back to back, one client each:");
    println!();
    println!("| read | answered | p50 | p99 | max | refused busy (503) | other |");
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in &read_figures {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            r.ok.len(),
            ms(percentile(&r.ok, 0.5)),
            ms(percentile(&r.ok, 0.99)),
            ms(r.ok.last().copied().unwrap_or_default()),
            r.busy,
            if r.other.is_empty() {
                "-".to_owned()
            } else {
                format!("{:?}", r.other)
            }
        );
    }
    println!();
    println!(
        "what held the hub's actor, longest since the start (`kipass_hub_actor_hold_max_seconds`):"
    );
    println!();
    println!("| kind | holds | longest | target < {} |", ms(TARGET_HOLD));
    println!("|---|---|---|---|");
    let mut longest = Duration::ZERO;
    for kind in sync_hub::daemon::HoldKind::ALL {
        let label = kind.label();
        let max = m4
            .get(&format!(
                "kipass_hub_actor_hold_max_seconds{{kind=\"{label}\"}}"
            ))
            .copied()
            .unwrap_or(0.0);
        let n = m4
            .get(&format!("kipass_hub_actor_holds_total{{kind=\"{label}\"}}"))
            .copied()
            .unwrap_or(0.0);
        let max = Duration::from_secs_f64(max);
        longest = longest.max(max);
        println!(
            "| {label} | {n:.0} | {} | {} |",
            ms(max),
            if max < TARGET_HOLD { "met" } else { "NOT met" }
        );
    }
    println!();
    let missed_ratio = ratios.iter().any(|r| *r > TARGET_RATIO);
    println!(
        "targets: p99 of a round within {TARGET_RATIO}x of the quiet hub's: {}; no hold of the actor over {}: {} (longest {})",
        if missed_ratio { "NOT met" } else { "met" },
        ms(TARGET_HOLD),
        if longest < TARGET_HOLD {
            "met"
        } else {
            "NOT met"
        },
        ms(longest)
    );
    ensure!(
        purge_answer.status == 200,
        "the purge failed: HTTP {} {}",
        purge_answer.status,
        purge_answer.text
    );
    let purged: serde_json::Value = serde_json::from_str(&purge_answer.text)?;
    ensure!(
        purged["records"].as_u64().is_some_and(|n| n > 0),
        "the purge removed no visits: {purged}"
    );
    ensure!(
        quiet.failed.is_empty() && loaded.failed.is_empty() && purging.failed.is_empty(),
        "sync rounds failed"
    );
    Ok(())
}
