//! Writes the upgrade fixtures with the PREVIOUS release's code: a hub data folder and a
//! device data folder, plus `expected.json` (what the old binaries themselves reported).
//!
//! Not part of today's workspace: `make-fixtures.sh` copies this file into a worktree of the
//! old commit as `tests/src/bin/make_upgrade_fixtures.rs` and runs it there, so it links that
//! commit's `tests`, `edge_node` and `shared` crates and drives that commit's binaries.
//!
//! Timeline (every child process gets `KIPASS_CLOCK_OFFSET` so its clock reads the step's
//! time; day A is two UTC days before the day the script ran, noon):
//! - A-1h: hub init (region mapo, issuer keyring, one approved facility), device enrolled
//!   (staff PIN 1234, four digits as the old release allowed), the ticket deleted;
//! - day A: 3 QR visits, 1 paper entry; synced (the old `sync --once` to the old `run`);
//! - day B: 2 QR visits, 1 paper entry; synced; then 1 more QR visit, not synced;
//! - day C: 2 QR visits, not synced; an operator credential made;
//! - C+1h: the old `status --json`, `stats --json` and a trace of day A's first token are
//!   recorded in expected.json with the tokens, the paper entries and the credential.
//!
//! Usage: make_upgrade_fixtures OUT_DIR COMMIT

use anyhow::{Context, Result, bail};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::fixture::{bin, free_udp_port, issuer, keyring_json, now, random_token};

const DAY: u64 = 86_400;

fn main() {
    if let Err(e) = make() {
        eprintln!("make_upgrade_fixtures: {e:#}");
        std::process::exit(1);
    }
}

/// A command of a binary whose clock reads `at`.
fn cmd(name: &str, at: u64, args: &[&str]) -> Command {
    let mut c = Command::new(bin(name));
    c.args(args)
        .env_remove("EDGE_NODE_DATA")
        .env_remove("SYNC_HUB_DATA")
        .env("KIPASS_CLOCK_OFFSET", (at as i64 - now() as i64).to_string());
    c
}

fn run_at(name: &str, at: u64, args: &[&str]) -> Result<String> {
    let out = cmd(name, at, args)
        .output()
        .with_context(|| format!("cannot start {name}"))?;
    if !out.status.success() {
        bail!(
            "{name} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn hex(t: &[u8; 16]) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks in one fresh code at `at` through the old device's durable path.
fn visit(dev: &Path, at: u64) -> Result<String> {
    let mut device = edge_node::device::Device::open(dev)?;
    let token = random_token();
    let r = device.check_in(at, &issuer().issue(at, 60, token))?;
    if r.verdict != shared::token::Verdict::Accepted {
        bail!("a fresh code was {}", r.verdict.as_str());
    }
    Ok(hex(&token))
}

fn paper(dev: &str, at: u64, visited_at: u64, name: &str, phone: &str) -> Result<serde_json::Value> {
    let v = visited_at.to_string();
    run_at(
        "edge-node",
        at,
        &[
            "--data", dev, "paper", "add", "--name", name, "--phone", phone, "--visited-at", &v,
            "--consent-collect", "--consent-share", "--json",
        ],
    )?;
    Ok(json!({ "name": name, "phone": phone, "visited_at": visited_at }))
}

/// The old `sync-hub run` at `at` while the old device syncs once, then stopped.
fn sync(hub: &str, dev: &str, port: u16, at: u64, log: &Path) -> Result<()> {
    let run_file = Path::new(hub).join("run.json");
    let _ = std::fs::remove_file(&run_file);
    let listen = format!("127.0.0.1:{port}");
    let mut child = cmd(
        "sync-hub",
        at,
        &["--data", hub, "run", "--listen", &listen, "--http", "127.0.0.1:0"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(log)?)
    .spawn()?;
    let result = (|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !run_file.exists() {
            if std::time::Instant::now() > deadline {
                bail!("sync-hub run did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = run_at(
            "edge-node",
            at,
            &["--data", dev, "sync", "--once", "--json", "--listen", "127.0.0.1:0"],
        )?;
        eprintln!("sync at {at}: {}", out.trim());
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&run_file);
    result
}

fn make() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(out), Some(commit)) = (args.get(1), args.get(2)) else {
        bail!("usage: make_upgrade_fixtures OUT_DIR COMMIT");
    };
    let out = PathBuf::from(out);
    if out.exists() {
        bail!("{} exists; remove it first", out.display());
    }
    std::fs::create_dir_all(&out)?;
    let scratch = tempfile::tempdir()?;
    let hub_dir = out.join("hub");
    let dev_dir = out.join("edge");
    let hub = hub_dir.to_str().context("path")?.to_owned();
    let dev = dev_dir.to_str().context("path")?.to_owned();
    let port = free_udp_port()?;
    let log = scratch.path().join("hub.log");

    let today = now() / DAY * DAY;
    let a = today - 2 * DAY + 12 * 3600;
    let b = a + DAY;
    let c = b + DAY;

    let listen = format!("127.0.0.1:{port}");
    run_at(
        "sync-hub",
        a - 3600,
        &["--data", &hub, "init", "--region", "mapo", "--listen", &listen],
    )?;
    let ring = scratch.path().join("keyring.json");
    std::fs::write(&ring, keyring_json())?;
    run_at(
        "sync-hub",
        a - 3600,
        &["--data", &hub, "issuers", "import", ring.to_str().context("path")?],
    )?;
    let fac: serde_json::Value = serde_json::from_str(run_at(
        "sync-hub",
        a - 3600,
        &[
            "--data", &hub, "facility", "add", "--name", "Test Karaoke", "--business-number",
            tests::fixture::BUSINESS_NUMBER, "--representative", "Test Representative",
            "--phone", "010-0000-0000", "--category", "karaoke", "--region", "mapo",
            "--address", "1 Test Street", "--json",
        ],
    )?.trim())?;
    let facility = fac["facility_id"].as_str().context("facility_id")?.to_owned();
    let ticket = scratch.path().join("ticket");
    let t = ticket.to_str().context("path")?;
    run_at(
        "sync-hub",
        a - 3600,
        &["--data", &hub, "enroll", &facility, "--device-name", "gate", "--out", t],
    )?;
    run_at(
        "edge-node",
        a - 3600,
        &["--data", &dev, "init", "--ticket", t, "--staff-pin", "1234"],
    )?;
    std::fs::remove_file(&ticket)?;
    // The identity goes to the health authority, not the hub (the fixture keeps it beside).
    std::fs::rename(
        hub_dir.join("authority-identity.txt"),
        out.join("authority-identity.txt"),
    )?;

    let mut synced = Vec::new();
    let mut unsynced = Vec::new();
    let mut papers = Vec::new();
    // Day A.
    for i in 0..3 {
        synced.push(json!({ "token": visit(&dev_dir, a + i * 300)?, "at": a + i * 300 }));
    }
    papers.push(paper(&dev, a + 1200, a + 300, "Paper Visitor A", "010-0000-0001")?);
    sync(&hub, &dev, port, a + 1800, &log)?;
    // Day B.
    for i in 0..2 {
        synced.push(json!({ "token": visit(&dev_dir, b + i * 300)?, "at": b + i * 300 }));
    }
    papers.push(paper(&dev, b + 1200, b + 300, "Paper Visitor B", "010-0000-0002")?);
    sync(&hub, &dev, port, b + 1800, &log)?;
    unsynced.push(json!({ "token": visit(&dev_dir, b + 2400)?, "at": b + 2400 }));
    // Day C.
    for i in 0..2 {
        unsynced.push(json!({ "token": visit(&dev_dir, c + i * 300)?, "at": c + i * 300 }));
    }
    let cred: serde_json::Value = serde_json::from_str(run_at(
        "sync-hub",
        c + 3000,
        &[
            "--data", &hub, "credential", "add", "--role", "operator", "--name",
            "Test Operator", "--json",
        ],
    )?.trim())?;

    // What the old release reports at C+1h.
    let made_at = c + 3600;
    let status: serde_json::Value =
        serde_json::from_str(run_at("edge-node", made_at, &["--data", &dev, "status", "--json"])?.trim())?;
    let stats: serde_json::Value =
        serde_json::from_str(run_at("sync-hub", made_at, &["--data", &hub, "stats", "--json"])?.trim())?;
    let first = synced[0]["token"].as_str().context("token")?.to_owned();
    let trace: serde_json::Value = serde_json::from_str(
        run_at(
            "sync-hub",
            made_at,
            &[
                "--data", &hub, "trace", "--token", &first, "--case", "fixture",
                "--purpose", "upgrade fixture", "--json",
            ],
        )?
        .trim(),
    )?;
    let expected = json!({
        "commit": commit,
        "made_at": made_at,
        "days": { "a": a / DAY, "b": b / DAY, "c": c / DAY },
        "facility_id": facility,
        "device_id": status["device_id"],
        "hub_listen": listen,
        "visits_synced": synced,
        "visits_unsynced": unsynced,
        "paper": papers,
        "credential": cred,
        "old_status": status,
        "old_stats": stats,
        "old_trace_of_first": trace,
    });
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_string_pretty(&expected)? + "\n",
    )?;
    for f in ["hub.log", "run.json"] {
        let _ = std::fs::remove_file(hub_dir.join(f));
    }
    println!("{}", out.display());
    Ok(())
}
