//! A revoked device stays revoked when its hub row is put back to its bytes from before the
//! revocation: the hub's admission consults the keyed revocation list (`revocations-1`, head in
//! `keys/revocations.head`), which `sync-hub device revoke` writes first, not only the row's
//! `revoked` flag. Through the real binaries: enroll, sync, stop the hub, save the row, revoke,
//! restore the row, start the hub, sync again.

use anyhow::{Context, Result, bail};
use redb::{ReadableDatabase, TableDefinition};
use std::path::Path;
use tests::fixture::{HubFixture, check_in_codes, device_status, run_ok, sync_once};

/// The hub's device registry (`sync-hub/src/store.rs::DEVICES`): device id → encoded row.
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices-1");

fn read_row(hub_db: &Path, id: &str) -> Result<Vec<u8>> {
    let db = redb::Database::open(hub_db).context("open hub.redb")?;
    let txn = db.begin_read()?;
    let t = txn.open_table(DEVICES)?;
    let row = t.get(id)?.context("no row for the device")?;
    Ok(row.value().to_vec())
}

fn write_row(hub_db: &Path, id: &str, bytes: &[u8]) -> Result<()> {
    let db = redb::Database::open(hub_db).context("open hub.redb")?;
    let txn = db.begin_write()?;
    txn.open_table(DEVICES)?.insert(id, bytes)?;
    txn.commit()?;
    Ok(())
}

fn text_of(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_revoked_device_whose_row_is_restored_stays_refused() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("north")?;
    let dev_id = device_status(&dev)?["device_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if dev_id.is_empty() {
        bail!("no device id in status");
    }

    // Enrolled and synced: admitted (this also binds the row to the device's endpoint).
    let mut proc = hub.start()?;
    check_in_codes(&dev, 1)?;
    let out = sync_once(&dev, &[])?;
    if !out.status.success() {
        bail!("first sync must succeed: {}", text_of(&out));
    }
    if hub.records_of(&hub.facility)? != 1 {
        bail!("the first record did not arrive");
    }
    proc.kill();

    // The row as it was before the revocation.
    let hub_db = hub.data.join("hub.redb");
    let before = read_row(&hub_db, &dev_id)?;

    run_ok(
        "sync-hub",
        &["--data", &hub.data_str(), "device", "revoke", &dev_id],
    )?;
    let revoked = read_row(&hub_db, &dev_id)?;
    if revoked == before {
        bail!("revoke did not change the device's row");
    }
    if !hub.data.join("keys").join("revocations.head").exists() {
        bail!("revoke did not write the revocation list's head");
    }

    // Someone with write access to hub.redb puts the old row back.
    write_row(&hub_db, &dev_id, &before)?;
    if read_row(&hub_db, &dev_id)? != before {
        bail!("the row was not restored");
    }

    let mut proc = hub.start()?;
    check_in_codes(&dev, 1)?;
    let out = sync_once(&dev, &[])?;
    let text = text_of(&out);
    if out.status.success() {
        bail!("a revoked device with a restored row must be refused: {text}");
    }
    // `sync --once` exits 3 when the hub's session did not complete.
    if out.status.code() != Some(3) {
        bail!("exit status {:?}: {text}", out.status.code());
    }
    // The JSON report (first line of stdout) names the hub's refusal.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().next().unwrap_or_default().trim())
            .with_context(|| format!("sync --json report: {text}"))?;
    if report["peer"] != "hub"
        || report["ok"] != false
        || report["reason"] != "Revoked"
        || report["refused_by"] != "peer"
        || report["records_received"] != 0
        || !report["error"]
            .as_str()
            .unwrap_or_default()
            .contains("this device has been revoked")
    {
        bail!("the report does not show the revocation: {report}");
    }
    if !String::from_utf8_lossy(&out.stderr).contains("this device has been revoked") {
        bail!("stderr does not say revoked: {text}");
    }
    let status = device_status(&dev)?;
    let f = &status["last_sync_failure"];
    if f["reason"] != "Revoked" || f["refused_by"] != "peer" {
        bail!("status does not show the refusal: {status}");
    }
    if !f["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("this device has been revoked")
    {
        bail!("status detail: {status}");
    }
    // Nothing of the refused session was taken.
    if hub.records_of(&hub.facility)? != 1 {
        bail!("a refused device's record arrived");
    }
    let stats = hub.stats()?;
    if stats["refusals_by_reason"]["Revoked"] != 1 {
        bail!("the hub does not count the refusal: {stats}");
    }
    proc.kill();
    Ok(())
}
