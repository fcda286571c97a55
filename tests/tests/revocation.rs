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

// ---------------------------------------------------------------------------------------------
// Revocation reaching the siblings (issue 15): the hub-signed list in the refresh, handed on
// from sibling to sibling.

use std::process::{Command, Stdio};
use std::time::Duration;
use tests::fixture::{Proc, bin, free_udp_port, sync_via_sibling_only, wait_until};

fn endpoint_of(dev: &Path) -> Result<String> {
    Ok(device_status(dev)?["endpoint_id"]
        .as_str()
        .context("no endpoint id in status")?
        .to_owned())
}

fn device_id_of(dev: &Path) -> Result<String> {
    Ok(device_status(dev)?["device_id"]
        .as_str()
        .context("no device id in status")?
        .to_owned())
}

/// `edge-node run` on a loopback `listen`, with `--peer` arguments; killed when dropped.
fn start_run(dev: &Path, listen: &str, peers: &[String], log: &Path) -> Result<Proc> {
    let mut args = vec![
        "--data".to_owned(),
        dev.display().to_string(),
        "run".into(),
        "--listen".into(),
        listen.into(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--no-lan".into(),
    ];
    for p in peers {
        args.push("--peer".into());
        args.push(p.clone());
    }
    let _ = std::fs::remove_file(dev.join("run.json"));
    let child = Command::new(bin("edge-node"))
        .args(&args)
        .env_remove("EDGE_NODE_DATA")
        .env("EDGE_NODE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    let proc = Proc(child);
    // Commands reach a running device through the address its `run.json` names.
    if !wait_until(Duration::from_secs(20), || dev.join("run.json").exists()) {
        bail!(
            "edge-node run did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(proc)
}

/// Records `dev` holds, read through its running `run` (status goes through its control API).
fn records_held(dev: &Path) -> Result<u64> {
    device_status(dev)?["records"]
        .as_u64()
        .context("no records in status")
}

/// A hands one new record to `sibling` (`ID@ADDR`, running) with no route to the hub; returns
/// the output text and whether the sibling's record count grew within a few seconds.
fn relay_one(a: &Path, sibling_dir: &Path, sibling: &str) -> Result<(String, bool)> {
    let before = records_held(sibling_dir)?;
    check_in_codes(a, 1)?;
    let mut text = String::new();
    // `run` may still be starting: a refused dial is retried a few times.
    for _ in 0..10 {
        let out = sync_via_sibling_only(a, sibling)?;
        text = text_of(&out);
        if !text.contains("timed out") && !text.contains("Connection") {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let grew = wait_until(Duration::from_secs(3), || {
        records_held(sibling_dir).is_ok_and(|n| n > before)
    });
    Ok((text, grew))
}

/// Revoke A at the hub; B syncs with the hub and then refuses A's session even though its
/// operator named A with `--peer` (before, `--peer` admitted a revoked device: the roster
/// dropped it but the operator's list did not). C, offline, gets the signed list from B and
/// then refuses A too (before, C's roster still listed A and C served it).
#[test]
fn a_revocation_reaches_a_synced_sibling_and_from_it_an_offline_one() -> Result<()> {
    let hub = HubFixture::new()?;
    let a = hub.enroll_device("a")?;
    let b = hub.enroll_device("b")?;
    let c = hub.enroll_device("c")?;
    let mut hub_proc = hub.start()?;
    // Every device binds its endpoint at the hub (A first, so that B's and C's rosters list it).
    for dev in [&a, &b, &c] {
        let out = sync_once(dev, &[])?;
        if !out.status.success() {
            bail!("enrolment sync: {}", text_of(&out));
        }
    }
    for dev in [&b, &c] {
        let out = sync_once(dev, &[])?;
        if !out.status.success() {
            bail!("roster sync: {}", text_of(&out));
        }
    }
    let a_id = device_id_of(&a)?;
    let a_peer = format!("{}@127.0.0.1:{}", endpoint_of(&a)?, free_udp_port()?);
    let b_listen = format!("127.0.0.1:{}", free_udp_port()?);
    let b_peer = format!("{}@{b_listen}", endpoint_of(&b)?);
    let c_listen = format!("127.0.0.1:{}", free_udp_port()?);
    let c_peer = format!("{}@{c_listen}", endpoint_of(&c)?);

    // Before the revocation B serves A (the path works).
    {
        let _b_run = start_run(
            &b,
            &b_listen,
            std::slice::from_ref(&a_peer),
            &hub.tmp.path().join("b0.log"),
        )?;
        let (text, grew) = relay_one(&a, &b, &b_peer)?;
        if !grew {
            bail!("before its revocation A's record must reach B: {text}");
        }
    }

    run_ok(
        "sync-hub",
        &["--data", &hub.data_str(), "device", "revoke", &a_id],
    )?;
    // B learns it at its next hub sync: the signed list, with A in it.
    let out = sync_once(&b, &[])?;
    if !out.status.success() {
        bail!("B's sync after the revocation: {}", text_of(&out));
    }
    let st = device_status(&b)?;
    let r = &st["revocations"];
    if r["version"] != 1 || r["revoked_devices"][0] != a_id.as_str() || r["stale"] != false {
        bail!("B does not hold the list revoking A: {st}");
    }
    // The hub is now out of reach for everyone.
    hub_proc.kill();

    // B refuses A's session, though `--peer` names A.
    {
        let _b_run = start_run(
            &b,
            &b_listen,
            std::slice::from_ref(&a_peer),
            &hub.tmp.path().join("b1.log"),
        )?;
        let (text, grew) = relay_one(&a, &b, &b_peer)?;
        if grew {
            bail!("B took a revoked device's record: {text}");
        }
        let log = std::fs::read_to_string(hub.tmp.path().join("b1.log"))?;
        if text.contains("\"ok\":true") || !log.contains("revoked") {
            bail!("B did not refuse A as revoked: {text}\n{log}");
        }
    }

    // C, offline since before the revocation, still lists A; it hands its records to B and
    // B's welcome carries the hub-signed list.
    if device_status(&c)?["revocations"]["version"] != 0 {
        bail!("C must not know of the revocation yet");
    }
    {
        let _b_run = start_run(&b, &b_listen, &[], &hub.tmp.path().join("b2.log"))?;
        check_in_codes(&c, 1)?;
        let mut ok = false;
        for _ in 0..10 {
            let _ = sync_via_sibling_only(&c, &b_peer)?;
            if device_status(&c)?["revocations"]["version"] == 1 {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        if !ok {
            bail!("C did not take B's list: {}", device_status(&c)?);
        }
    }
    // Then C refuses A.
    let _c_run = start_run(&c, &c_listen, &[], &hub.tmp.path().join("c.log"))?;
    let (text, grew) = relay_one(&a, &c, &c_peer)?;
    if grew {
        bail!("C took a revoked device's record: {text}");
    }
    let log = std::fs::read_to_string(hub.tmp.path().join("c.log"))?;
    if text.contains("\"ok\":true") || !log.contains("revoked") {
        bail!("C did not refuse A as revoked: {text}\n{log}");
    }
    Ok(())
}

/// A sibling's copy of the list is taken only if the hub signed it for this facility and it
/// is newer than the one held: a rogue sibling's welcome carrying a list it signed itself
/// (revoking an honest device), the hub's list with its signature stripped, and the hub's
/// genuine but older list are all ignored, and the device keeps the list it had.
#[test]
fn a_forged_unsigned_or_older_list_from_a_sibling_is_ignored() -> Result<()> {
    use shared::revocation::{RevocationList, RevokedDevice, SignedRevocations};
    use shared::ticket::Refresh;
    use shared::time::Day;
    use tests::rogue::Rogue;

    let hub = HubFixture::new()?;
    let a = hub.enroll_device("a")?;
    let d = hub.enroll_device("d")?;
    let b = hub.enroll_device("b")?;
    let c = hub.enroll_device("c")?;
    let r = hub.enroll_device("r")?;
    let mut hub_proc = hub.start()?;
    for dev in [&a, &d, &b, &c, &r] {
        let out = sync_once(dev, &[])?;
        if !out.status.success() {
            bail!("enrolment sync: {}", text_of(&out));
        }
    }
    let revoke = |dev: &Path| -> Result<()> {
        run_ok(
            "sync-hub",
            &[
                "--data",
                &hub.data_str(),
                "device",
                "revoke",
                &device_id_of(dev)?,
            ],
        )?;
        Ok(())
    };
    // B holds the list revoking A (version 1); C the later one revoking A and D (version 2).
    revoke(&a)?;
    if !sync_once(&b, &[])?.status.success() {
        bail!("B's sync");
    }
    revoke(&d)?;
    if !sync_once(&c, &[])?.status.success() {
        bail!("C's sync");
    }
    hub_proc.kill();
    let older: SignedRevocations = edge_node::device::Device::open(&b)?
        .signed_revocations()?
        .context("B holds no list")?;
    if older.list.version != 1 {
        bail!("B's list: {older:?}");
    }
    let held = device_status(&c)?["revocations"].clone();
    if held["version"] != 2 {
        bail!("C's list: {held}");
    }

    // The rogue R signs a list of its own revoking B (with its own endpoint key).
    let r_key = edge_node::device::Device::open(&r)?.endpoint_key()?;
    let b_dev = edge_node::device::Device::open(&b)?;
    let b_id = b_dev.enrollment().device_id.clone();
    let facility = b_dev.enrollment().facility.id.clone();
    drop(b_dev);
    let forged_list = RevocationList {
        facility,
        version: 3,
        issued_at: tests::fixture::now(),
        devices: older
            .list
            .devices
            .iter()
            .cloned()
            .chain([RevokedDevice {
                device_id: b_id.clone(),
                endpoint_id: Some(endpoint_of(&b)?),
                revoked_at: tests::fixture::now(),
            }])
            .chain(std::iter::once(RevokedDevice {
                device_id: shared::DeviceId::parse("d-0000000000000000")?,
                endpoint_id: None,
                revoked_at: 1,
            }))
            .collect(),
    };
    let forged = forged_list.clone().sign(&r_key);
    let mut unsigned = forged_list.sign(&[0u8; 32]);
    unsigned.signature.clear();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r_listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let rogue = rt.block_on(Rogue::bind(
        &r,
        &hub.data,
        hub.sync_port,
        Day::of(tests::fixture::now()),
        r_listen,
        false,
    ))?;
    let r_peer = format!("{}@{r_listen}", rogue.id());
    for (what, list) in [("forged", forged), ("unsigned", unsigned), ("older", older)] {
        let refresh = Refresh {
            day_keys: Vec::new(),
            keyring: None,
            roster: None,
            hub_addrs: None,
            revocations: Some(list),
            ..Refresh::default()
        }
        .to_bytes();
        check_in_codes(&c, 1)?;
        let mut store = rogue.store_with(shared::partition::Partition::new(
            rogue.partition.clone(),
            &rand::random::<[u8; 16]>(),
        ));
        let served = {
            let serve = rogue.serve_one_with(&mut store, tests::fixture::now(), Some(refresh));
            let dial = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                tokio::task::spawn_blocking({
                    let c = c.clone();
                    let r_peer = r_peer.clone();
                    move || sync_via_sibling_only(&c, &r_peer)
                })
                .await
            };
            let (served, dialled) = rt.block_on(async { tokio::join!(serve, dial) });
            dialled??;
            served?
        };
        if served != tests::rogue::Ending::Finished {
            bail!("{what}: the session with the rogue did not complete: {served:?}");
        }
        let now_held = device_status(&c)?["revocations"].clone();
        if now_held["version"] != 2 || now_held["revoked_devices"] != held["revoked_devices"] {
            bail!("{what} list taken from a sibling: {now_held}, held before {held}");
        }
    }
    rt.block_on(rogue.close());
    Ok(())
}

/// A revoked device's records at the hub stay traceable; one it writes after its revocation
/// and hands to sibling B, which has not heard of the revocation (the hub is down), reaches the
/// hub when B syncs, and is stored but not traceable, and counted
/// (`revoked_records_refused` in `stats`). Before, the hub indexed it like any other.
#[test]
fn a_record_written_after_revocation_and_relayed_by_a_sibling_is_not_traceable() -> Result<()> {
    let hub = HubFixture::new()?;
    let a = hub.enroll_device("a")?;
    let b = hub.enroll_device("b")?;
    let mut hub_proc = hub.start()?;
    for dev in [&a, &b, &b] {
        let out = sync_once(dev, &[])?;
        if !out.status.success() {
            bail!("enrolment sync: {}", text_of(&out));
        }
    }
    // A's visit before the revocation reaches the hub.
    let before = check_in_codes(&a, 1)?;
    let out = sync_once(&a, &[])?;
    if !out.status.success() {
        bail!("A's sync: {}", text_of(&out));
    }
    if hub.records_of(&hub.facility)? != 1 {
        bail!("A's first record did not arrive");
    }
    hub_proc.kill();
    // Scan times are whole seconds: the revocation comes a second after A's first visit.
    std::thread::sleep(Duration::from_millis(1_100));
    let a_id = device_id_of(&a)?;
    run_ok(
        "sync-hub",
        &["--data", &hub.data_str(), "device", "revoke", &a_id],
    )?;
    std::thread::sleep(Duration::from_millis(1_100));

    // A, revoked, writes a visit and hands it to B (B has no route to the hub, and no list).
    let a_peer = format!("{}@127.0.0.1:{}", endpoint_of(&a)?, free_udp_port()?);
    let b_listen = format!("127.0.0.1:{}", free_udp_port()?);
    let b_peer = format!("{}@{b_listen}", endpoint_of(&b)?);
    let after = {
        let _b_run = start_run(&b, &b_listen, &[a_peer], &hub.tmp.path().join("b.log"))?;
        let held = records_held(&b)?;
        let after = check_in_codes(&a, 1)?;
        let mut text = String::new();
        for _ in 0..10 {
            text = text_of(&sync_via_sibling_only(&a, &b_peer)?);
            if !text.contains("timed out") && !text.contains("Connection") {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        if !wait_until(Duration::from_secs(3), || {
            records_held(&b).is_ok_and(|n| n > held)
        }) {
            bail!("A's record did not reach B: {text}");
        }
        after
    };

    // B syncs with the hub: the record is stored, but it is not traceable, and it is counted.
    let _hub_proc = hub.start()?;
    let out = sync_once(&b, &[])?;
    if !out.status.success() {
        bail!("B's sync: {}", text_of(&out));
    }
    let stats = hub.stats()?;
    if hub.records_of(&hub.facility)? != 2 {
        bail!("the relayed record must be stored: {stats}");
    }
    if stats["revoked_records_refused"] != 1
        || stats["revoked_refused_per_device"][a_id.as_str()] != 1
    {
        bail!("the refused record is not counted once: {stats}");
    }
    let trace = hub.trace(&after[0])?;
    if trace["visits"].as_array().is_none_or(|v| !v.is_empty()) {
        bail!("a record A wrote after its revocation is traceable: {trace}");
    }
    let trace = hub.trace(&before[0])?;
    if trace["visits"].as_array().map(Vec::len) != Some(1) {
        bail!("A's record from before its revocation must stay traceable: {trace}");
    }
    Ok(())
}
