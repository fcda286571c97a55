//! Per-device quotas at a running hub, set small through `sync-hub run`'s flags: a device
//! with more new check-ins than its records per day gets a clear `QuotaExceeded` refusal in
//! `edge-node sync --once --json`, nothing of it is stored, and another device of the same
//! facility still syncs.

use anyhow::{Context, Result, bail};
use std::process::Command;
use std::time::Duration;
use tests::fixture::{self, HubFixture, Proc, bin, sync_once, wait_until};

/// The records per device per day the hub runs with here.
const QUOTA: usize = 3;

fn start(hub: &HubFixture) -> Result<Proc> {
    let run = hub.data.join("run.json");
    let _ = std::fs::remove_file(&run);
    let quota = QUOTA.to_string();
    let child = Command::new(bin("sync-hub"))
        .args(["--data", &hub.data_str(), "run", "--http", "127.0.0.1:0"])
        .args(["--max-device-records-per-day", &quota])
        .env_remove("SYNC_HUB_DATA")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let proc = Proc(child);
    if !wait_until(Duration::from_secs(30), || run.exists()) {
        bail!("the hub did not start within 30 s");
    }
    Ok(proc)
}

/// The one report line of `sync --once --json` (the hub's session).
fn report(out: &std::process::Output) -> Result<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().next().with_context(|| {
        format!(
            "no report; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(serde_json::from_str(line)?)
}

#[test]
fn a_device_over_its_records_per_day_is_refused_clearly() -> Result<()> {
    let hub = HubFixture::new()?;
    let gate = hub.enroll_device("gate")?;
    let side = hub.enroll_device("side")?;
    let proc = start(&hub)?;

    fixture::check_in_codes(&gate, QUOTA + 2)?;
    let out = sync_once(&gate, &[])?;
    assert!(
        !out.status.success(),
        "a device over its quota is not synced"
    );
    let r = report(&out)?;
    assert_eq!(r["ok"], false, "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("QuotaExceeded") && error.contains("per device per day"),
        "the device is told why: {r}"
    );
    assert_eq!(hub.records_of(&hub.facility)?, 0, "nothing of it stored");
    // Operators see it counted.
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hub.data.join("run.json"))?)?;
    let http = run["http"].as_str().context("run.json has no http")?;
    let api = tests::people::Api::new(&format!("http://{http}"));
    let token = sync_hub::control::operator_token(&hub.data)?;
    let m = api.call("GET", "/metrics", Some(&token), None)?;
    assert!(
        m.text.contains("\nkipass_sync_quota_refusals_total 1\n"),
        "{}",
        m.text
    );

    // Another device of the facility has its own count.
    fixture::check_in_codes(&side, QUOTA)?;
    let out = sync_once(&side, &[])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hub.records_of(&hub.facility)?, QUOTA as u64);
    drop(proc);
    Ok(())
}
