//! "A refused change ends the session with a reason both ends log and `status`/`stats` show":
//! after a refused sync, the device's `status --json` names the last failure (when, peer,
//! reason, detail) and the hub's `stats` counts refusals by reason and lists the last ones.

use anyhow::{Result, bail};
use tests::fixture::{HubFixture, check_in_codes, device_status, run_ok, sync_once};

#[test]
fn a_refused_sync_shows_in_the_devices_status_and_the_hubs_stats() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("north")?;
    let mut proc = hub.start()?;
    check_in_codes(&dev, 1)?;
    let out = sync_once(&dev, &[])?;
    if !out.status.success() {
        bail!("first sync: {}", String::from_utf8_lossy(&out.stderr));
    }
    let status = device_status(&dev)?;
    if !status["last_sync_failure"].is_null() {
        bail!("no failure yet: {status}");
    }
    let dev_id = status["device_id"].as_str().unwrap_or_default().to_owned();
    run_ok(
        "sync-hub",
        &["--data", &hub.data_str(), "device", "revoke", &dev_id],
    )?;
    let before = tests::fixture::now();
    let out = sync_once(&dev, &[])?;
    if out.status.success() {
        bail!("a revoked device's sync must fail");
    }
    let status = device_status(&dev)?;
    let f = &status["last_sync_failure"];
    if f["reason"] != "Revoked" || f["refused_by"] != "peer" || f["peer"] != "hub" {
        bail!("status does not show the refusal: {status}");
    }
    if !f["detail"].as_str().unwrap_or_default().contains("revoked") {
        bail!("no detail: {status}");
    }
    if f["at"].as_u64().unwrap_or(0) + 5 < before {
        bail!("wrong time: {status}");
    }
    // The hub, through the running process.
    let stats = hub.stats()?;
    if stats["refusals_by_reason"]["Revoked"] != 1 {
        bail!("stats do not count the refusal: {stats}");
    }
    let last = &stats["recent_refusals"][0];
    if last["device"] != dev_id.as_str() || last["reason"] != "Revoked" || last["by"] != "local" {
        bail!("stats do not list the refusal: {stats}");
    }
    proc.kill();
    // And with the hub stopped, from its store.
    let stats = hub.stats()?;
    if stats["refusals_by_reason"]["Revoked"] != 1 {
        bail!("stats of the stopped hub: {stats}");
    }
    Ok(())
}
