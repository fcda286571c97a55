//! Upgrades: the stores of the previous release open with today's binaries and lose nothing.
//!
//! The fixtures in `testdata/upgrade/<commit>/` were written by that release's own code
//! (`testdata/upgrade/make-fixtures.sh`, which names the commit): a hub data folder, a device
//! data folder with synced and unsynced days and paper entries, the health authority's
//! identity, and `expected.json` with what the old binaries reported. Each test copies them to
//! a temporary folder (owner-only, as the binaries keep their folders) and runs today's
//! binaries on the copy with the clock set to just after the fixtures were made
//! (`KIPASS_CLOCK_OFFSET`), so the 28-day retention never makes them expire.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tests::fixture::{Proc, bin, free_udp_port, now, wait_until};

/// The previous release's fixtures (the folder is named by its commit).
const PREVIOUS: &str = "6207a77";

/// A copy of the fixtures and the clock that reads just after they were made.
struct Old {
    tmp: tempfile::TempDir,
    hub: PathBuf,
    edge: PathBuf,
    expected: Value,
    /// `KIPASS_CLOCK_OFFSET` for every command: ten minutes after the fixtures were made.
    offset: String,
}

/// Copies `from` into `to`: folders 0700, files 0600, as the binaries keep them (git keeps
/// neither mode).
fn copy_private(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_private(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

impl Old {
    fn copy() -> Result<Self> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/upgrade")
            .join(PREVIOUS);
        let tmp = tempfile::tempdir()?;
        copy_private(&src, tmp.path())?;
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("expected.json"))?)?;
        let made_at = expected["made_at"]
            .as_u64()
            .context("expected.json has no made_at")?;
        let offset = (i128::from(made_at) + 600 - i128::from(now())).to_string();
        Ok(Old {
            hub: tmp.path().join("hub"),
            edge: tmp.path().join("edge"),
            tmp,
            expected,
            offset,
        })
    }

    fn cmd(&self, name: &str, data: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin(name));
        c.arg("--data")
            .arg(data)
            .args(args)
            .env_remove("EDGE_NODE_DATA")
            .env_remove("SYNC_HUB_DATA")
            .env("KIPASS_CLOCK_OFFSET", &self.offset)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, name: &str, data: &Path, args: &[&str]) -> Result<Output> {
        self.cmd(name, data, args)
            .output()
            .with_context(|| format!("cannot start {name}: build the binaries first"))
    }

    fn json(&self, name: &str, data: &Path, args: &[&str]) -> Result<Value> {
        let out = self.run(name, data, args)?;
        if !out.status.success() {
            bail!(
                "{name} {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_str(
            String::from_utf8_lossy(&out.stdout).trim(),
        )?)
    }

    fn status(&self) -> Result<Value> {
        self.json("edge-node", &self.edge, &["status", "--json"])
    }

    fn stats(&self) -> Result<Value> {
        self.json("sync-hub", &self.hub, &["stats", "--json"])
    }

    fn trace(&self, tokens: &[String]) -> Result<Value> {
        let mut args = vec!["trace", "--case", "upgrade", "--purpose", "upgrade test"];
        for t in tokens {
            args.extend(["--token", t.as_str()]);
        }
        args.push("--json");
        self.json("sync-hub", &self.hub, &args)
    }

    /// Tokens of the fixture's QR visits: `key` is `visits_synced` or `visits_unsynced`.
    fn tokens(&self, key: &str) -> Vec<String> {
        self.expected[key]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|t| t["token"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Today's `sync-hub run` on the copy, its sync endpoint on `127.0.0.1:port`.
    fn start_hub(&self, port: u16) -> Result<Proc> {
        let run_file = self.hub.join("run.json");
        let log = self.tmp.path().join("hub.log");
        let listen = format!("127.0.0.1:{port}");
        let child = self
            .cmd(
                "sync-hub",
                &self.hub,
                &["run", "--listen", &listen, "--http", "127.0.0.1:0"],
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut hub = Proc(child);
        if !wait_until(Duration::from_secs(30), || run_file.exists()) {
            hub.kill();
            bail!(
                "sync-hub run did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(hub)
    }
}

/// The visits and contacts of a trace, as comparable sets.
fn trace_sets(t: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let set = |key: &str| {
        t[key]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|x| {
                        format!(
                            "{} {} {} {}",
                            x["token"].as_str().unwrap_or("paper"),
                            x["facility_id"],
                            x["scanned_at"],
                            x["paper"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    (set("visits"), set("contacts"))
}

#[test]
fn the_previous_releases_stores_open_with_nothing_lost() -> Result<()> {
    let old = Old::copy()?;
    let e = &old.expected;

    // The device: same enrollment, same records, same backlog.
    let status = old.status()?;
    for key in ["facility_id", "device_id", "records", "unsynced"] {
        assert_eq!(status[key], e["old_status"][key], "{key}: {status}");
    }
    assert_eq!(
        status["unsynced"].as_u64(),
        Some(old.tokens("visits_unsynced").len() as u64),
        "{status}"
    );

    // The hub: the same facilities and records; the migrated audit chain verifies.
    let stats = old.stats()?;
    for key in ["facilities", "records", "per_facility"] {
        assert_eq!(stats[key], e["old_stats"][key], "{key}: {stats}");
    }
    let synced = old.tokens("visits_synced");
    let papers = e["paper"].as_array().map_or(0, Vec::len);
    assert_eq!(
        stats["records"].as_u64(),
        Some((synced.len() + papers) as u64),
        "{stats}"
    );
    let verify = old.run("sync-hub", &old.hub, &["audit", "--verify"])?;
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // The old trace, traced again, finds the same visits and contacts.
    let first = synced.first().context("no synced visit")?.clone();
    let trace = old.trace(std::slice::from_ref(&first))?;
    assert_eq!(
        trace_sets(&trace),
        trace_sets(&e["old_trace_of_first"]),
        "{trace}"
    );
    // Every synced visit is readable at the hub.
    let all = old.trace(&synced)?;
    let found: BTreeSet<&str> = all["visits"]
        .as_array()
        .context("no visits")?
        .iter()
        .filter_map(|v| v["token"].as_str())
        .collect();
    assert_eq!(
        found,
        synced.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "{all}"
    );

    // The paper entry among the first visit's contacts opens with the authority's identity.
    let export = old.tmp.path().join("export.json");
    std::fs::write(&export, serde_json::to_vec(&trace)?)?;
    let identity = old.tmp.path().join("authority-identity.txt");
    let opened = old.run(
        "sync-hub",
        &old.hub,
        &[
            "paper",
            "open",
            "--identity",
            identity.to_str().context("path")?,
            export.to_str().context("path")?,
        ],
    )?;
    let text = String::from_utf8_lossy(&opened.stdout);
    assert!(
        opened.status.success() && text.contains(e["paper"][0]["name"].as_str().unwrap_or("?")),
        "{text} {}",
        String::from_utf8_lossy(&opened.stderr)
    );

    // The operator credential made by the old release still authenticates.
    let hub = old.start_hub(free_udp_port()?)?;
    let run: Value = serde_json::from_str(&std::fs::read_to_string(old.hub.join("run.json"))?)?;
    let http = run["http"].as_str().context("run.json has no http")?;
    let api = tests::people::Api::new(&format!("http://{http}"));
    let secret = e["credential"]["secret"]
        .as_str()
        .context("no credential secret")?;
    let who = api.call("GET", "/api/whoami", Some(secret), None)?;
    assert_eq!(who.status, 200, "{}", who.text);
    assert!(who.text.contains("Test Operator"), "{}", who.text);
    drop(hub);
    Ok(())
}

#[test]
fn the_previous_releases_device_syncs_its_backlog_to_todays_hub() -> Result<()> {
    let old = Old::copy()?;
    let e = &old.expected;
    let port = free_udp_port()?;
    let hub = old.start_hub(port)?;
    let hub_addr = format!("127.0.0.1:{port}");
    let out = old.run(
        "edge-node",
        &old.edge,
        &[
            "sync",
            "--once",
            "--json",
            "--listen",
            "127.0.0.1:0",
            "--hub-addr",
            &hub_addr,
        ],
    )?;
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(hub);

    // Nothing left behind at the device; everything at the hub.
    let status = old.status()?;
    assert_eq!(status["unsynced"], 0, "{status}");
    assert_eq!(status["records"], e["old_status"]["records"], "{status}");
    let mut tokens = old.tokens("visits_synced");
    tokens.extend(old.tokens("visits_unsynced"));
    let papers = e["paper"].as_array().map_or(0, Vec::len);
    let stats = old.stats()?;
    let facility = e["facility_id"].as_str().context("no facility_id")?;
    assert_eq!(
        stats["per_facility"][facility].as_u64(),
        Some((tokens.len() + papers) as u64),
        "{stats}"
    );
    let all = old.trace(&tokens)?;
    let found: BTreeSet<&str> = all["visits"]
        .as_array()
        .context("no visits")?
        .iter()
        .filter_map(|v| v["token"].as_str())
        .collect();
    assert_eq!(
        found,
        tokens.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "{all}"
    );
    Ok(())
}
