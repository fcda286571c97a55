//! Bytes on the wire per visit record, device to hub, through the real binaries on loopback:
//! design property 6 ("cheap on a hotspot": bytes per record close to the sealed record's own
//! size; sync resumes where it stopped).
//!
//! A hub (`sync-hub run`) and one enrolled device. The device checks in fresh codes in-process
//! (`Device::check_in`, the same durable path `edge-node scan` takes, without the images), then
//! `edge-node sync --once --json` reports the bytes its iroh connection put in UDP datagrams
//! (`socket_bytes_*`, QUIC headers, handshake, encryption and acknowledgements included) and
//! the protocol's own frame bytes. Scenarios:
//!
//! - a 1,000-record backlog, first sync of a freshly enrolled device;
//! - 10,000 records synced, then 100 new ones: the second sync alone; then a sync with
//!   nothing new (the fixed cost of a session) and one of 1,000 more, which split the
//!   incremental cost into a fixed and a per-record part;
//! - the baseline a simpler design would use: one JSON HTTP POST per visit to a loopback sink,
//!   counting every byte the client writes on its TCP socket (request line, headers, body).
//!
//! Build the binaries first (the bench runs `target/release/{edge-node,sync-hub}`), then run:
//!
//! ```text
//! cargo build --release -p edge-node -p sync-hub
//! cargo bench -p tests --bench wire
//! ```
//!
//! Targets: socket bytes sent per record at most 1.5x the sealed envelope's size for the
//! backlog, at most 2x for the incremental sync.

use anyhow::{Context, Result, bail};
use edge_node::device::Device;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::time::Day;
use shared::{PartitionId, RecordId};
use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::baseline::{self, PostFigures, Transport, Visit};
use tests::fixture::{self, bin, run_ok};

/// Records in the fresh-backlog scenario.
const BACKLOG: usize = 1_000;
/// Records synced before the incremental scenario.
const SYNCED: usize = 10_000;
/// Records in the incremental sync.
const INCREMENT: usize = 100;
/// Records in the second, larger incremental sync.
const LARGER_INCREMENT: usize = 1_000;
/// How long one `sync --once` may take before the bench gives up on it.
const SYNC_DEADLINE: Duration = Duration::from_secs(90);
/// How long the hub may take to come up or to show what it ingested.
const HUB_DEADLINE: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    for name in ["edge-node", "sync-hub"] {
        if !bin(name).exists() {
            bail!(
                "{} is missing: run `cargo build --release -p edge-node -p sync-hub` first",
                bin(name).display()
            );
        }
    }
    let started = Instant::now();
    println!("wire benchmark: one hub, one device, loopback");

    // (a) A fresh device's first sync of a backlog.
    let bed = Bed::new()?;
    let envelope_len = bed.envelope_len()?;
    let tokens_a = bed.check_in(BACKLOG)?;
    let hub = bed.start_hub()?;
    let a = bed.sync()?;
    let a_visible = hub.wait_for_records(&bed, BACKLOG as u64)?;
    drop(hub);
    let baseline = http_baseline(&bed, &tokens_a)?;
    drop(bed);

    // (b) An incremental sync after a large one.
    let bed = Bed::new()?;
    bed.check_in(SYNCED)?;
    let hub = bed.start_hub()?;
    let big = bed.sync()?;
    hub.wait_for_records(&bed, SYNCED as u64)?;
    bed.check_in(INCREMENT)?;
    let b = bed.sync()?;
    let b_visible = hub.wait_for_records(&bed, (SYNCED + INCREMENT) as u64)?;
    // What a session costs with nothing to send (handshake, hello, refresh, acknowledgements),
    // and a larger increment: together they split the incremental cost into fixed and per-record.
    let idle = bed.sync()?;
    bed.check_in(LARGER_INCREMENT)?;
    let c = bed.sync()?;
    hub.wait_for_records(&bed, (SYNCED + INCREMENT + LARGER_INCREMENT) as u64)?;
    drop(hub);
    drop(bed);

    println!("\nsealed envelope of one QR visit: {envelope_len} bytes (41 B header, 16 B tag)");
    println!();
    println!(
        "| scenario | records | socket B sent | socket B received | frame B sent | frame B received | sent B/record | / envelope | target | time to deliver |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let rows = [
        ("fresh backlog", BACKLOG, &a, Some(1.5)),
        ("10,000 backlog (setup of the next row)", SYNCED, &big, None),
        ("incremental: 100 after 10,000", INCREMENT, &b, Some(2.0)),
        (
            "incremental: 1,000 after 10,100",
            LARGER_INCREMENT,
            &c,
            None,
        ),
    ];
    let mut verdicts = Vec::new();
    for (name, records, s, target) in rows {
        let per = s.socket_sent as f64 / records as f64;
        let ratio = per / envelope_len as f64;
        let target_text = match target {
            Some(t) => {
                let met = ratio <= t;
                verdicts.push(format!(
                    "{name}: {ratio:.2}x the envelope (target <= {t}x: {})",
                    if met { "met" } else { "NOT met" }
                ));
                format!("<= {t}x")
            }
            None => "-".into(),
        };
        println!(
            "| {name} | {records} | {} | {} | {} | {} | {per:.1} | {ratio:.2}x | {target_text} | {:.2} s |",
            s.socket_sent,
            s.socket_received,
            s.frame_sent,
            s.frame_received,
            s.elapsed.as_secs_f64()
        );
    }
    println!(
        "| no change (fixed cost of a session) | 0 | {} | {} | {} | {} | - | - | - | {:.2} s |",
        idle.socket_sent,
        idle.socket_received,
        idle.frame_sent,
        idle.frame_received,
        idle.elapsed.as_secs_f64()
    );
    println!();
    for (name, records, s) in [
        ("100 after 10,000", INCREMENT, &b),
        ("1,000 after 10,100", LARGER_INCREMENT, &c),
    ] {
        let marginal = s.socket_sent.saturating_sub(idle.socket_sent) as f64 / records as f64;
        let frames = s.frame_sent.saturating_sub(idle.frame_sent) as f64 / records as f64;
        println!(
            "incremental {name}: beyond a no-change session, {marginal:.1} socket B/record ({:.2}x the envelope), {frames:.1} frame B/record",
            marginal / envelope_len as f64
        );
    }
    println!();
    for v in &verdicts {
        println!("{v}");
    }
    println!(
        "hub shows the records: backlog {:.2} s, incremental {:.2} s after sync started",
        a_visible.as_secs_f64() + a.elapsed.as_secs_f64(),
        b_visible.as_secs_f64() + b.elapsed.as_secs_f64()
    );

    let per_ours = a.socket_sent as f64 / BACKLOG as f64;
    let per_post = baseline.sent as f64 / BACKLOG as f64;
    println!();
    println!(
        "baseline: one JSON HTTP/1.1 POST per visit, keep-alive, plain TCP, ureq's default headers"
    );
    println!("| design | records | client B sent | client B received | sent B/record | time |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| POST per visit | {BACKLOG} | {} | {} | {per_post:.1} | {:.2} s |",
        baseline.sent,
        baseline.received,
        baseline.elapsed.as_secs_f64()
    );
    println!(
        "| sync (fresh backlog) | {BACKLOG} | {} | {} | {per_ours:.1} | {:.2} s |",
        a.socket_sent,
        a.socket_received,
        a.elapsed.as_secs_f64()
    );
    println!(
        "sync sends {:.2}x the baseline's bytes per record ({:.2}x counting both directions)",
        per_ours / per_post,
        (a.socket_sent + a.socket_received) as f64 / (baseline.sent + baseline.received) as f64
    );
    println!(
        "incremental (100 after 10,000) sends {:.2}x the baseline's bytes per record",
        (b.socket_sent as f64 / INCREMENT as f64) / per_post
    );
    println!("\nbench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// What one `edge-node sync --once --json` session with the hub reported, and its wall time.
struct SyncFigures {
    socket_sent: u64,
    socket_received: u64,
    frame_sent: u64,
    frame_received: u64,
    elapsed: Duration,
}

/// A hub with one approved facility and one enrolled device, in a temporary folder; the hub
/// records a fixed loopback port at init so that the ticket carries it.
struct Bed {
    /// Keeps the folders alive.
    tmp: tempfile::TempDir,
    hub: PathBuf,
    device: PathBuf,
    sync_port: u16,
}

impl Bed {
    fn new() -> Result<Bed> {
        let tmp = tempfile::tempdir()?;
        let hub = tmp.path().join("hub");
        let device = tmp.path().join("device");
        let sync_port = free_udp_port()?;
        let h = path_str(&hub)?;
        let listen = format!("127.0.0.1:{sync_port}");
        run_ok(
            "sync-hub",
            &["--data", h, "init", "--region", "mapo", "--listen", &listen],
        )?;
        let ring = tmp.path().join("keyring.json");
        std::fs::write(&ring, fixture::keyring_json())?;
        run_ok(
            "sync-hub",
            &["--data", h, "issuers", "import", path_str(&ring)?],
        )?;
        let out = run_ok(
            "sync-hub",
            &[
                "--data",
                h,
                "facility",
                "add",
                "--name",
                "Star Karaoke",
                "--business-number",
                fixture::BUSINESS_NUMBER,
                "--representative",
                "Kim",
                "--phone",
                "02-123-4567",
                "--category",
                "karaoke",
                "--region",
                "mapo",
                "--address",
                "1 Wausan-ro",
                "--json",
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        let facility = v["facility_id"]
            .as_str()
            .context("facility add printed no id")?;
        let ticket = tmp.path().join("gate.ticket");
        let t = path_str(&ticket)?;
        run_ok(
            "sync-hub",
            &[
                "--data",
                h,
                "enroll",
                facility,
                "--device-name",
                "gate",
                "--out",
                t,
            ],
        )?;
        run_ok(
            "edge-node",
            &["--data", path_str(&device)?, "init", "--ticket", t],
        )?;
        Ok(Bed {
            tmp,
            hub,
            device,
            sync_port,
        })
    }

    /// Checks in `n` fresh codes through the device's durable path; returns their tokens.
    /// The device is closed again before returning, so the CLI can open the folder.
    fn check_in(&self, n: usize) -> Result<Vec<[u8; 16]>> {
        let mut device = Device::open(&self.device)?;
        let issuer = fixture::issuer();
        (0..n)
            .map(|_| fixture::check_in_fresh(&mut device, &issuer, fixture::now()))
            .collect()
    }

    /// The size of one QR visit sealed as this device seals it (its facility and device ids,
    /// a scan time mid-day, a token issued a second before).
    fn envelope_len(&self) -> Result<usize> {
        let device = Device::open(&self.device)?;
        let e = device.enrollment();
        let now = fixture::now();
        let day = Day::of(now);
        let record = Record {
            facility: e.facility.id.clone(),
            device: e.device_id.clone(),
            scanned_at: now,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: now - 1,
                token: fixture::random_token(),
            },
        };
        let partition = PartitionId {
            facility: e.facility.id.clone(),
            day,
        };
        let mut rng = rand::thread_rng();
        let record_id = RecordId::random(&mut rng);
        let envelope =
            SessionKey::generate(&mut rng, day).seal(&mut rng, &partition, record_id, &record)?;
        Ok(envelope.len())
    }

    /// Starts `sync-hub run` on the port recorded at init and waits until it answers.
    fn start_hub(&self) -> Result<HubProcess> {
        let proc = fixture::start_hub_run(
            &self.hub,
            self.sync_port,
            &self.tmp.path().join("hub.log"),
            HUB_DEADLINE,
        )?;
        Ok(HubProcess { _proc: proc })
    }

    /// One `edge-node sync --once --json`: the hub session's figures and the command's wall time.
    fn sync(&self) -> Result<SyncFigures> {
        let started = Instant::now();
        let mut child = Command::new(bin("edge-node"))
            .args([
                "--data",
                path_str(&self.device)?,
                "sync",
                "--once",
                "--json",
                "--listen",
                "127.0.0.1:0",
            ])
            .env_remove("EDGE_NODE_DATA")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start edge-node sync")?;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > SYNC_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                bail!("edge-node sync --once took longer than {SYNC_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let elapsed = started.elapsed();
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_string(&mut stdout)?;
        }
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut stderr)?;
        }
        if !status.success() {
            bail!("edge-node sync --once failed ({status}): {stdout} {stderr}");
        }
        let line = stdout.lines().next().context("sync printed no report")?;
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["ok"] != serde_json::Value::Bool(true) || v["peer"] != "hub" {
            bail!("the hub session did not complete: {line}");
        }
        let n = |k: &str| {
            v[k].as_u64()
                .with_context(|| format!("report has no {k}: {line}"))
        };
        Ok(SyncFigures {
            socket_sent: n("socket_bytes_sent")?,
            socket_received: n("socket_bytes_received")?,
            frame_sent: n("frame_bytes_sent")?,
            frame_received: n("frame_bytes_received")?,
            elapsed,
        })
    }
}

/// A running `sync-hub run`, killed and reaped when dropped.
struct HubProcess {
    _proc: fixture::Proc,
}

impl HubProcess {
    /// Polls the hub's stats until it holds `records`; returns how long that took.
    fn wait_for_records(&self, bed: &Bed, records: u64) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let out = run_ok(
                "sync-hub",
                &["--data", path_str(&bed.hub)?, "stats", "--json"],
            )?;
            let v: serde_json::Value = serde_json::from_str(out.trim())?;
            let held = v["records"].as_u64().unwrap_or(0);
            if held >= records {
                return Ok(started.elapsed());
            }
            if started.elapsed() > HUB_DEADLINE {
                bail!(
                    "the hub holds {held} records, not {records}, {HUB_DEADLINE:?} after the sync"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The same visits as one JSON POST each over one keep-alive HTTP/1.1 connection to a sink on
/// loopback ([`baseline::post_per_visit`] with one client). Plain TCP and a reused connection
/// make this a lower bound for the naive design: a real one would use TLS and often a new
/// connection per visit.
fn http_baseline(bed: &Bed, tokens: &[[u8; 16]]) -> Result<PostFigures> {
    let device = Device::open(&bed.device)?;
    let facility = device.enrollment().facility.id.to_string();
    let device_id = device.enrollment().device_id.to_string();
    drop(device);
    let visits: Vec<Visit> = tokens
        .iter()
        .map(|token| Visit {
            facility: facility.clone(),
            device: device_id.clone(),
            scanned_at: fixture::now(),
            token: *token,
        })
        .collect();
    baseline::post_per_visit(&[visits], Transport::Plain)
}

/// A UDP port free on loopback now (bound, read, released: the hub binds it right after).
fn free_udp_port() -> Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let addr: SocketAddr = socket.local_addr()?;
    Ok(addr.port())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
