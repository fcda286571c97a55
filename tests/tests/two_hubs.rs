//! Two hubs per region, through the real binaries on loopback: pairing, the registry and the
//! partitions converging over the hub link, a device failing over to the other hub, each hub
//! killed at random moments, and a hub rebuilt from an empty folder.

use anyhow::{Result, bail};
use std::time::Duration;
use tests::fixture::{
    self, FAST_LINK, HubFixture, check_in_codes, pair_second_hub, run_ok, sync_once, wait_until,
};

fn lines(hub: &HubFixture, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let mut full = vec!["--data", hub.data.to_str().unwrap_or_default()];
    full.extend_from_slice(args);
    run_ok("sync-hub", &full)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

fn device_revoked(hub: &HubFixture, id: &str) -> bool {
    lines(hub, &["device", "list", "--json"]).is_ok_and(|ds| {
        ds.iter()
            .any(|d| d["device_id"] == id && d["revoked"] == true)
    })
}

fn has_facility(hub: &HubFixture, id: &str) -> bool {
    lines(hub, &["facility", "list", "--json"])
        .is_ok_and(|fs| fs.iter().any(|f| f["facility_id"] == id))
}

fn audit_verifies(hub: &HubFixture) -> Result<()> {
    run_ok(
        "sync-hub",
        &[
            "--data",
            &hub.data_str(),
            "audit",
            "--verify",
            "--limit",
            "1",
        ],
    )?;
    Ok(())
}

#[test]
fn registry_and_partitions_converge_between_the_two_hubs_of_a_region() -> Result<()> {
    let a = HubFixture::new()?;
    let b = pair_second_hub(&a)?;
    let dev = a.enroll_device("gate")?;
    check_in_codes(&dev, 3)?;
    let _ha = a.start_with(&[], &[FAST_LINK])?;
    let _hb = b.start_with(&[], &[FAST_LINK])?;
    // The facility registered at A (before B existed) reaches B.
    if !wait_until(Duration::from_secs(20), || has_facility(&b, &a.facility)) {
        bail!("the facility registered at hub A never reached hub B");
    }
    let out = sync_once(&dev, &[])?;
    if !out.status.success() {
        bail!(
            "the device's sync with hub A failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The partitions the device gave A reach B over the hub link.
    if !wait_until(Duration::from_secs(20), || {
        b.records_of(&a.facility).is_ok_and(|n| n == 3)
    }) {
        bail!(
            "hub B holds {:?} of the 3 records hub A received",
            b.records_of(&a.facility)
        );
    }
    // A facility registered at B reaches A.
    let at_b = b.add_facility("Moon Cafe")?;
    if !wait_until(Duration::from_secs(20), || has_facility(&a, &at_b)) {
        bail!("the facility registered at hub B never reached hub A");
    }
    // A device revoked at B is revoked at A.
    let status = fixture::device_status(&dev)?;
    let device_id = status["device_id"].as_str().unwrap_or_default().to_owned();
    run_ok(
        "sync-hub",
        &["--data", &b.data_str(), "device", "revoke", &device_id],
    )?;
    if !wait_until(Duration::from_secs(20), || device_revoked(&a, &device_id)) {
        bail!("the device revoked at hub B is not revoked at hub A");
    }
    // Each hub's audit chain still verifies on its own, replicated changes included.
    audit_verifies(&a)?;
    audit_verifies(&b)?;
    Ok(())
}

#[test]
fn a_hub_refuses_a_link_from_an_endpoint_it_is_not_paired_with() -> Result<()> {
    let a = HubFixture::new()?;
    let _b = pair_second_hub(&a)?;
    // A third hub of the region that A never paired with: it pairs itself with A one way.
    let c = pair_second_hub(&a)?;
    // A is now paired with C (the last `peer add`), so re-pair A with a fresh fourth hub and
    // check C's link is refused: C never gets A's registry.
    let d = pair_second_hub(&a)?;
    let _ha = a.start_with(&[], &[FAST_LINK])?;
    let _hc = c.start_with(&[], &[FAST_LINK])?;
    let _hd = d.start_with(&[], &[FAST_LINK])?;
    if !wait_until(Duration::from_secs(20), || has_facility(&d, &a.facility)) {
        bail!("the paired hub never got the registry");
    }
    std::thread::sleep(Duration::from_secs(2));
    if has_facility(&c, &a.facility) {
        bail!("a hub A is not paired with received A's registry");
    }
    Ok(())
}
