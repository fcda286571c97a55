//! The hub by name (issue #18, first bullet), through the real binaries on loopback:
//! `--advertise` takes `NAME:PORT`, tickets carry it and devices resolve it at each dial; a
//! hub whose advertised addresses change (`sync-hub advertise set`) tells its devices at their
//! next sync; a name that does not resolve is logged and the other addresses still serve.
//! (A name that resolves to a new address, and the last good addresses of a name whose
//! resolver is down, are `edge-node`'s lib tests in `hub_addrs.rs`, with a resolver the test
//! controls: no test can make `localhost` move.)

use anyhow::{Context, Result, bail};
use std::path::Path;
use tests::fixture::{HubFixture, Proc, free_udp_port, run, run_ok, sync_once};

/// `sync-hub advertise set ADDR... --json`; returns the list the hub then advertises.
fn advertise_set(hub: &HubFixture, addrs: &[&str]) -> Result<Vec<String>> {
    let d = hub.data_str();
    let mut args = vec!["--data", &d, "advertise", "set"];
    args.extend_from_slice(addrs);
    args.push("--json");
    let v: serde_json::Value = serde_json::from_str(run_ok("sync-hub", &args)?.trim())?;
    Ok(serde_json::from_value(v["advertise"].clone())?)
}

/// One `sync --once --json` of `dev`: the hub session's report and the run's stderr.
fn hub_session(dev: &Path) -> Result<(serde_json::Value, String)> {
    let out = sync_once(dev, &[])?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["peer"] == "hub" {
            return Ok((v, stderr));
        }
    }
    bail!("no hub session in {stdout}; stderr: {stderr}")
}

fn synced(dev: &Path) -> Result<serde_json::Value> {
    let (v, stderr) = hub_session(dev)?;
    if v["ok"] != true {
        bail!("the hub session failed: {v}; stderr: {stderr}");
    }
    Ok(v)
}

fn start_on(hub: &HubFixture, port: u16) -> Result<Proc> {
    hub.start_with(&["--listen", &format!("127.0.0.1:{port}")], &[])
}

#[test]
fn init_takes_names_and_refuses_what_is_neither_an_address_nor_a_name() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let d = tmp.path().join("hub").display().to_string();
    let out = run_ok(
        "sync-hub",
        &[
            "--data",
            &d,
            "init",
            "--region",
            "mapo",
            "--listen",
            "127.0.0.1:7447",
            "--advertise",
            "Hub.Example.org:7447",
            "--advertise",
            "192.0.2.7:7447",
            "--json",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(
        v["advertise"],
        serde_json::json!(["hub.example.org:7447", "192.0.2.7:7447"])
    );
    let shown = run_ok("sync-hub", &["--data", &d, "advertise", "show"])?;
    assert_eq!(shown.trim(), "hub.example.org:7447 192.0.2.7:7447");
    for bad in ["hub.example.org", "bad_name:7447", "hub.example.org:0"] {
        let out = run("sync-hub", &["--data", &d, "advertise", "set", bad])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains("hub address") {
            bail!("advertise set {bad:?} was not refused clearly: {stderr}");
        }
    }
    let nine: Vec<String> = (1..=9).map(|p| format!("127.0.0.1:{p}")).collect();
    let mut args = vec!["--data", &d, "advertise", "set"];
    args.extend(nine.iter().map(String::as_str));
    let out = run("sync-hub", &args)?;
    if out.status.success() {
        bail!("nine advertised addresses were accepted");
    }
    let shown = run_ok("sync-hub", &["--data", &d, "advertise", "show"])?;
    assert_eq!(
        shown.trim(),
        "hub.example.org:7447 192.0.2.7:7447",
        "unchanged"
    );
    Ok(())
}

/// (a) A ticket naming the hub `localhost:PORT`: the device resolves it and syncs.
#[test]
fn a_ticket_with_a_name_reaches_the_hub() -> Result<()> {
    let hub = HubFixture::new()?;
    let name = format!("localhost:{}", hub.sync_port);
    assert_eq!(advertise_set(&hub, &[&name])?, vec![name.clone()]);
    let ticket = hub.write_ticket(&hub.facility, "north")?;
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ticket)?)?;
    assert_eq!(t["hub"]["addrs"], serde_json::json!([name]));
    let dev = hub.tmp.path().join("dev-north");
    run_ok(
        "edge-node",
        &[
            "--data",
            &dev.display().to_string(),
            "init",
            "--ticket",
            &ticket.display().to_string(),
        ],
    )?;
    let _proc = hub.start()?;
    tests::fixture::check_in_codes(&dev, 2)?;
    synced(&dev)?;
    if hub.records_of(&hub.facility)? != 2 {
        bail!("the hub did not get the visits: {}", hub.stats()?);
    }
    Ok(())
}

/// (b) The hub moves to a new port: it advertises old and new for a transition, a device
/// syncs and learns the new one, the hub drops the old and restarts on the new, and the
/// device still reaches it; a device that did not sync during the transition does not.
#[test]
fn a_hub_that_moves_tells_its_devices_at_their_next_sync() -> Result<()> {
    let hub = HubFixture::new()?;
    let old = format!("127.0.0.1:{}", hub.sync_port);
    let new_port = free_udp_port()?;
    let new = format!("localhost:{new_port}");
    let dev = hub.enroll_device("north")?;
    let late = hub.enroll_device("south")?;

    let mut proc = start_on(&hub, hub.sync_port)?;
    synced(&dev)?;
    synced(&late)?;
    synced(&dev)?; // the sibling's roster entry
    let quiet = synced(&dev)?["frame_bytes_received"]
        .as_u64()
        .context("frame bytes")?;
    proc.kill();

    // The transition: both addresses, the hub still where it was.
    advertise_set(&hub, &[&old, &new])?;
    let mut proc = start_on(&hub, hub.sync_port)?;
    let learnt = synced(&dev)?["frame_bytes_received"]
        .as_u64()
        .context("frame bytes")?;
    if learnt <= quiet {
        bail!("the new addresses did not travel: {learnt} B after {quiet} B");
    }
    // Told once: the next session's refresh leaves them out again.
    let again = synced(&dev)?["frame_bytes_received"]
        .as_u64()
        .context("frame bytes")?;
    if again > quiet + 16 {
        bail!("the unchanged addresses were sent again: {again} B, {quiet} B before the move");
    }
    proc.kill();

    // The hub drops the old address and listens on the new one only.
    advertise_set(&hub, &[&new])?;
    let _proc = start_on(&hub, new_port)?;
    tests::fixture::check_in_codes(&dev, 3)?;
    synced(&dev)?;
    if hub.records_of(&hub.facility)? != 3 {
        bail!("the moved hub did not get the visits: {}", hub.stats()?);
    }
    // The device that slept through the transition knows only the old address.
    let (v, _) = hub_session(&late)?;
    if v["ok"] == true {
        bail!("a device that never learnt the new address reached the hub: {v}");
    }
    Ok(())
}

/// (c) A name that does not resolve, beside a good address: a clear warning naming it, and
/// the sync goes through the good address. With nothing else to dial, a clear error.
#[test]
fn a_name_that_does_not_resolve_is_logged_and_the_other_addresses_serve() -> Result<()> {
    let hub = HubFixture::new()?;
    let bad = format!("kipass-hub.invalid:{}", hub.sync_port);
    let good = format!("127.0.0.1:{}", hub.sync_port);
    advertise_set(&hub, &[&bad, &good])?;
    let dev = hub.enroll_device("north")?;
    let _proc = hub.start()?;
    tests::fixture::check_in_codes(&dev, 1)?;
    let started = std::time::Instant::now();
    let (v, stderr) = hub_session(&dev)?;
    if v["ok"] != true {
        bail!("the good address did not serve: {v}; stderr: {stderr}");
    }
    if !stderr.contains(&format!("cannot resolve the hub's name {bad}")) {
        bail!("no clear warning about the unresolvable name: {stderr}");
    }
    if started.elapsed() > std::time::Duration::from_secs(15) {
        bail!(
            "the failing resolution held the sync {:?}",
            started.elapsed()
        );
    }
    if hub.records_of(&hub.facility)? != 1 {
        bail!("the hub did not get the visit: {}", hub.stats()?);
    }

    // Only the bad name: nothing to dial, said as such.
    let hub2 = HubFixture::new()?;
    advertise_set(&hub2, &[&format!("kipass-hub.invalid:{}", hub2.sync_port)])?;
    let dev2 = hub2.enroll_device("south")?;
    let _proc2 = hub2.start()?;
    let (v, stderr) = hub_session(&dev2)?;
    let error = v["error"].as_str().unwrap_or_default();
    if v["ok"] == true || !error.contains("no address to dial") {
        bail!("an unresolvable hub gave no clear error: {v}; stderr: {stderr}");
    }
    Ok(())
}
