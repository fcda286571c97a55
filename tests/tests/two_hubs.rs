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

fn knows_device(hub: &HubFixture, id: &str) -> bool {
    lines(hub, &["device", "list", "--json"])
        .is_ok_and(|ds| ds.iter().any(|d| d["device_id"] == id))
}

/// Waits until the device enrolled at one hub is known at `other` (the link replicated it;
/// a hub that dies before its next link round takes an enrollment only it knew with it).
fn wait_for_device(other: &HubFixture, dev: &std::path::Path) -> Result<()> {
    let id = fixture::device_status(dev)?["device_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !wait_until(Duration::from_secs(30), || knows_device(other, &id)) {
        bail!("the other hub never learned the device");
    }
    Ok(())
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

/// `peer status --json` of a hub.
fn peer_status(hub: &HubFixture) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(
        run_ok(
            "sync-hub",
            &["--data", &hub.data_str(), "peer", "status", "--json"],
        )?
        .trim(),
    )?)
}

/// Waits until `hub` knows its peer's day keys (the link ran once), so tickets and
/// refreshes carry both hubs.
fn wait_for_peer_keys(hub: &HubFixture) -> Result<()> {
    if !wait_until(Duration::from_secs(30), || {
        peer_status(hub).is_ok_and(|p| !p["day_keys_until"].is_null())
    }) {
        bail!("the hub never learned its peer's day keys");
    }
    Ok(())
}

/// Tokens a trace at `hub` finds among `tokens`.
fn traced(hub: &HubFixture, tokens: &[[u8; 16]]) -> Result<usize> {
    let mut args = vec![
        "--data".to_owned(),
        hub.data_str(),
        "trace".into(),
        "--json".into(),
    ];
    for t in tokens {
        args.push("--token".into());
        args.push(hex::encode(t));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let v: serde_json::Value = serde_json::from_str(run_ok("sync-hub", &refs)?.trim())?;
    let found: std::collections::BTreeSet<String> = v["visits"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["token"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(tokens
        .iter()
        .filter(|t| found.contains(&hex::encode(t)))
        .count())
}

fn sync_ok(dev: &std::path::Path) -> Result<Duration> {
    let started = std::time::Instant::now();
    let out = sync_once(dev, &[])?;
    if !out.status.success() {
        bail!(
            "sync --once failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(started.elapsed())
}

#[test]
fn a_device_fails_over_to_the_other_hub_in_one_round_and_either_hub_reads_its_visits() -> Result<()>
{
    let a = HubFixture::new()?;
    let b = pair_second_hub(&a)?;
    let mut ha = a.start_with(&[], &[FAST_LINK])?;
    let _hb = b.start_with(&[], &[FAST_LINK])?;
    wait_for_peer_keys(&a)?;
    // A ticket written after the pairing names both hubs and carries both hubs' keys.
    let dev = a.enroll_device("gate")?;
    wait_for_device(&b, &dev)?;
    let mut tokens = check_in_codes(&dev, 3)?;
    sync_ok(&dev)?;
    // Hub A dies; the next round goes to B, no reset, nothing downloaded again.
    ha.kill();
    tokens.extend(check_in_codes(&dev, 2)?);
    let took = sync_ok(&dev)?;
    println!("failover: the sync round with hub A dead took {took:?}");
    if took > Duration::from_secs(20) {
        bail!("failing over took {took:?}");
    }
    // B reads every visit, the ones it got from A over the link and the ones the device
    // gave it directly: each was sealed to both hubs.
    if !wait_until(Duration::from_secs(20), || {
        traced(&b, &tokens).is_ok_and(|n| n == tokens.len())
    }) {
        bail!(
            "hub B traces {:?} of the device's {} visits",
            traced(&b, &tokens),
            tokens.len()
        );
    }
    // A comes back and gets what B received meanwhile.
    let _ha = a.start_with(&[], &[FAST_LINK])?;
    if !wait_until(Duration::from_secs(30), || {
        traced(&a, &tokens).is_ok_and(|n| n == tokens.len())
    }) {
        bail!(
            "hub A traces {:?} of the device's {} visits after it came back",
            traced(&a, &tokens),
            tokens.len()
        );
    }
    Ok(())
}

#[test]
fn killing_either_hub_at_random_moments_loses_no_acknowledged_visit() -> Result<()> {
    use rand::{Rng, SeedableRng};
    const ROUNDS: usize = 10;
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let a = HubFixture::new()?;
    let b = pair_second_hub(&a)?;
    let mut hubs = [
        Some(a.start_with(&[], &[FAST_LINK])?),
        Some(b.start_with(&[], &[FAST_LINK])?),
    ];
    wait_for_peer_keys(&a)?;
    wait_for_peer_keys(&b)?;
    let dev = a.enroll_device("gate")?;
    wait_for_device(&b, &dev)?;
    let mut tokens = Vec::new();
    let fixtures = [&a, &b];
    for round in 0..ROUNDS {
        // Acknowledged visits: stored durably at the device before anything else happens.
        tokens.extend(check_in_codes(&dev, 2)?);
        // A sync runs while one hub is killed at a random moment (before, during or after
        // the device's session or a hub link session).
        let victim = rng.gen_range(0..2);
        let delay = Duration::from_millis(rng.gen_range(0..400));
        let d = dev.clone();
        let sync = std::thread::spawn(move || sync_once(&d, &[]));
        std::thread::sleep(delay);
        if let Some(mut p) = hubs[victim].take() {
            p.kill();
        }
        let _ = sync.join();
        println!("round {round}: killed hub {victim} after {delay:?}");
        // Restart it, half the time at once, half the time after one more device round.
        if rng.gen_bool(0.5) {
            let _ = sync_once(&dev, &[]);
        }
        hubs[victim] = Some(fixtures[victim].start_with(&[], &[FAST_LINK])?);
    }
    // Both hubs up: the device syncs once more; both converge and trace every visit.
    sync_ok(&dev)?;
    for (name, hub) in [("A", &a), ("B", &b)] {
        if !wait_until(Duration::from_secs(40), || {
            traced(hub, &tokens).is_ok_and(|n| n == tokens.len())
        }) {
            bail!(
                "hub {name} traces {:?} of {} acknowledged visits (seed {seed})",
                traced(hub, &tokens),
                tokens.len()
            );
        }
    }
    Ok(())
}

#[test]
fn a_hub_rebuilt_from_an_empty_folder_reads_through_its_peer_and_says_so() -> Result<()> {
    let a = HubFixture::new()?;
    let b = pair_second_hub(&a)?;
    let _ha = a.start_with(&[], &[FAST_LINK])?;
    let mut hb = b.start_with(&[], &[FAST_LINK])?;
    wait_for_peer_keys(&a)?;
    let dev = a.enroll_device("gate")?;
    let mut tokens = check_in_codes(&dev, 3)?;
    sync_ok(&dev)?;
    // B's machine is lost with its whole folder; a new B joins from nothing.
    let old_b = peer_status(&a)?["endpoint_id"].clone();
    hb.kill();
    drop(hb);
    let b2 = pair_second_hub(&a)?;
    let _hb2 = b2.start_with(&[], &[FAST_LINK])?;
    // A learns the new B's keys; the device learns the new B from A at its next sync.
    if !wait_until(Duration::from_secs(30), || {
        peer_status(&a).is_ok_and(|p| p["endpoint_id"] != old_b && !p["day_keys_until"].is_null())
    }) {
        bail!("hub A never learned the rebuilt hub's keys");
    }
    sync_ok(&dev)?;
    tokens.extend(check_in_codes(&dev, 2)?);
    sync_ok(&dev)?;
    // The rebuilt hub answers for every visit: the old ones through A, and says so.
    let mut args = vec![
        "--data".to_owned(),
        b2.data_str(),
        "trace".into(),
        "--json".into(),
    ];
    for t in &tokens {
        args.push("--token".into());
        args.push(hex::encode(t));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    if !wait_until(Duration::from_secs(30), || {
        traced(&b2, &tokens).is_ok_and(|n| n == tokens.len())
    }) {
        bail!(
            "the rebuilt hub traces {:?} of {} visits",
            traced(&b2, &tokens),
            tokens.len()
        );
    }
    let v: serde_json::Value = serde_json::from_str(run_ok("sync-hub", &refs)?.trim())?;
    let answered: Vec<String> = v["answered_by"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["answered"] == true)
                .filter_map(|x| x["hub"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let a_id = peer_status(&b2)?["endpoint_id"].clone();
    if !answered.iter().any(|h| h.as_str() == a_id) {
        bail!("the rebuilt hub's trace does not say hub A answered: {v}");
    }
    // The rebuilt hub could not read the old visits itself: they are not in its own index.
    let own = b2.records_of(&a.facility)?;
    println!("the rebuilt hub holds {own} records of the facility");
    Ok(())
}

#[test]
fn the_paired_hub_brings_no_more_a_day_than_the_facilitys_own_devices_could() -> Result<()> {
    let a = HubFixture::new()?;
    let b = pair_second_hub(&a)?;
    // B holds every device to 2 new records a day; the facility has one device, so the
    // paired hub's sessions may bring B at most 2 records of it a day.
    let _ha = a.start_with(&[], &[FAST_LINK])?;
    let _hb = b.start_with(&["--max-device-records-per-day", "2"], &[FAST_LINK])?;
    wait_for_peer_keys(&a)?;
    let dev = a.enroll_device("gate")?;
    wait_for_device(&b, &dev)?;
    check_in_codes(&dev, 3)?;
    sync_ok(&dev)?;
    if a.records_of(&a.facility)? != 3 {
        bail!("hub A did not take the device's 3 records");
    }
    // Several link rounds later B still holds none of that partition: refused whole, as a
    // device's over-quota session is, and counted.
    let refused = wait_until(Duration::from_secs(20), || {
        b.stats().is_ok_and(|s| {
            s["refusals_by_reason"]["QuotaExceeded"]
                .as_u64()
                .unwrap_or(0)
                > 0
        })
    });
    let held = b.records_of(&a.facility)?;
    if !refused || held > 2 {
        bail!(
            "hub B holds {held} records from the link, over the facility's quota (stats {})",
            b.stats()?
        );
    }
    Ok(())
}
