//! Sync over real iroh on loopback, with real processes: a hub, two facilities with two
//! devices each; backlogs built while the hub is down arrive exactly once, directly or
//! through a sibling; a hub killed mid-sync converges; intruders are refused; retention.

use anyhow::{Context, Result, bail};
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::fixture::{
    self, HubFixture, Proc, bin, check_in_codes, device_status, run_ok, sync_once, wait_until,
};

fn err_of(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn backlogs_arrive_exactly_once_directly_and_through_a_sibling() -> Result<()> {
    let hub = HubFixture::new()?;
    let fa = hub.facility.clone();
    let fb = hub.add_facility("Moon PC Room")?;
    let a1 = hub.enroll_device_for(&fa, "a1")?;
    let a2 = hub.enroll_device_for(&fa, "a2")?;
    let b1 = hub.enroll_device_for(&fb, "b1")?;
    let b2 = hub.enroll_device_for(&fb, "b2")?;

    // The hub is down: every device keeps checking visitors in.
    let mut tokens = Vec::new();
    for (dev, n) in [(&a1, 7), (&a2, 5), (&b1, 6), (&b2, 4)] {
        tokens.extend(check_in_codes(dev, n)?);
    }
    run_ok(
        "edge-node",
        &[
            "--data",
            a2.to_str().unwrap_or_default(),
            "paper",
            "add",
            "--name",
            "Kim",
            "--phone",
            "010-1111-2222",
            "--consent-collect",
            "--consent-share",
        ],
    )?;

    // a2 runs as a kiosk; a1 has no route to the hub, only to a2.
    let port = fixture::free_udp_port()?;
    let a2_id = device_status(&a2)?["endpoint_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let a1_id = device_status(&a1)?["endpoint_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let a2_run = Proc(
        Command::new(bin("edge-node"))
            .args([
                "--data",
                a2.to_str().unwrap_or_default(),
                "run",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--peer",
                &format!("{a1_id}@127.0.0.1:9"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let peer = format!("{a2_id}@127.0.0.1:{port}");
    let mut relayed = false;
    // The kiosk needs a moment to bind; retry the hand-over within a deadline.
    let ok = wait_until(Duration::from_secs(30), || {
        let out = sync_once(&a1, std::slice::from_ref(&peer)).unwrap_or_else(|_| {
            std::process::Command::new("false")
                .output()
                .unwrap_or_else(|_| unreachable_output())
        });
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // The hub is down, so the command exits non-zero, but the sibling session completed.
        relayed = text
            .lines()
            .any(|l| l.contains("\"ok\":true") && !l.contains("\"peer\":\"hub\""));
        relayed
    });
    if !ok {
        bail!("a1 could not hand its log to a2");
    }

    // The hub comes back. b1 and b2 sync directly; a1 stays cut off; a2's loop delivers.
    let _hub_run = hub.start()?;
    for dev in [&b1, &b2] {
        let out = sync_once(dev, &[])?;
        if !out.status.success() {
            bail!("sync failed: {}", err_of(&out));
        }
    }
    if !wait_until(Duration::from_secs(90), || {
        hub.records_of(&fa).unwrap_or(0) >= 13
    }) {
        bail!("facility A's records did not all arrive: {}", hub.stats()?);
    }
    drop(a2_run);
    let stats = hub.stats()?;
    assert_eq!(stats["per_facility"][&fa], 13, "{stats}");
    assert_eq!(stats["per_facility"][&fb], 10, "{stats}");
    // Exactly once: each token is found once, at the right facility.
    for t in &tokens {
        let tr = hub.trace(t)?;
        assert_eq!(tr["visits"].as_array().map(Vec::len), Some(1), "{tr}");
    }
    // A second round moves nothing new and changes no count.
    for dev in [&b1, &b2] {
        let out = sync_once(dev, &[])?;
        assert!(out.status.success(), "{}", err_of(&out));
    }
    assert_eq!(hub.stats()?, stats);
    // The directly synced devices know the hub has everything.
    assert_eq!(device_status(&b1)?["unsynced"], 0);
    Ok(())
}

fn unreachable_output() -> std::process::Output {
    std::process::Output {
        status: std::process::ExitStatus::default(),
        stdout: Vec::new(),
        stderr: Vec::new(),
    }
}

#[test]
fn hub_killed_mid_sync_converges_with_nothing_lost() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device_for(&hub.facility, "big")?;
    let tokens = check_in_codes(&dev, 1500)?;
    for (round, delay_ms) in [150u64, 400, 900].into_iter().enumerate() {
        let mut h = hub.start()?;
        let mut sync = Proc(
            Command::new(bin("edge-node"))
                .args([
                    "--data",
                    dev.to_str().unwrap_or_default(),
                    "sync",
                    "--once",
                    "--listen",
                    "127.0.0.1:0",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        h.kill();
        let _ = sync.0.wait();
        sync.kill();
        println!("round {round}: hub killed after {delay_ms} ms");
    }
    let _h = hub.start()?;
    let out = sync_once(&dev, &[])?;
    assert!(out.status.success(), "{}", err_of(&out));
    assert_eq!(hub.records_of(&hub.facility)?, 1500);
    for t in tokens.iter().step_by(97) {
        assert_eq!(hub.trace(t)?["visits"].as_array().map(Vec::len), Some(1));
    }
    Ok(())
}

#[test]
fn intruders_are_refused_and_nothing_of_theirs_is_stored() -> Result<()> {
    let hub = HubFixture::new()?;
    let f = hub.facility.clone();
    let _h = hub.start()?;

    // A ticket used twice: the first device binds it, the second is refused.
    let ticket = hub.write_ticket(&f, "twice")?;
    let first = hub.tmp.path().join("first");
    let second = hub.tmp.path().join("second");
    for d in [&first, &second] {
        run_ok(
            "edge-node",
            &[
                "--data",
                d.to_str().unwrap_or_default(),
                "init",
                "--ticket",
                ticket.to_str().unwrap_or_default(),
            ],
        )?;
    }
    check_in_codes(&first, 2)?;
    check_in_codes(&second, 3)?;
    assert!(sync_once(&first, &[])?.status.success());
    let out = sync_once(&second, &[])?;
    assert!(!out.status.success());
    assert!(
        err_of(&out).contains("CredentialReused"),
        "{}",
        err_of(&out)
    );
    assert_eq!(hub.records_of(&f)?, 2);

    // An unknown endpoint claiming an enrolled device's id.
    let mut store = edge_node::store::Store::open(&first.join("edge.redb"))?;
    let thief = hub.tmp.path().join("thief");
    drop(store);
    copy_dir(&first, &thief)?;
    store = edge_node::store::Store::open(&thief.join("edge.redb"))?;
    store.put(&[("endpoint_key", &[7u8; 32])])?;
    drop(store);
    check_in_codes(&thief, 4)?;
    let out = sync_once(&thief, &[])?;
    assert!(!out.status.success());
    assert!(err_of(&out).contains("UnknownDevice"), "{}", err_of(&out));
    assert_eq!(hub.records_of(&f)?, 2);

    // A revoked device (revoked through the running hub).
    let dev_id = device_status(&first)?["device_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    run_ok(
        "sync-hub",
        &["--data", &hub.data_str(), "device", "revoke", &dev_id],
    )?;
    check_in_codes(&first, 5)?;
    let out = sync_once(&first, &[])?;
    assert!(!out.status.success());
    assert!(err_of(&out).contains("Revoked"), "{}", err_of(&out));
    assert_eq!(hub.records_of(&f)?, 2);
    // Facility administration works while the hub runs, too.
    let list = run_ok(
        "sync-hub",
        &["--data", &hub.data_str(), "facility", "list", "--json"],
    )?;
    assert_eq!(list.lines().count(), 1);
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

#[test]
fn commands_go_through_a_running_device_and_a_scan_syncs_at_once() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device_for(&hub.facility, "kiosk")?;
    let _h = hub.start()?;
    let d = dev.display().to_string();
    let _run = Proc(
        Command::new(bin("edge-node"))
            .args([
                "--data",
                &d,
                "run",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    if !wait_until(Duration::from_secs(30), || dev.join("run.json").exists()) {
        bail!("the device did not start");
    }
    // The first round binds the device; wait for it so the scan below is what syncs next.
    if !wait_until(Duration::from_secs(30), || {
        device_status(&dev)
            .map(|s| !s["last_sync"].is_null())
            .unwrap_or(false)
    }) {
        bail!("the running device never reached the hub");
    }
    let tmp = tempfile::tempdir()?;
    let (frame, _, token) = fixture::code_frame(tmp.path(), "through", fixture::now())?;
    let out = run_ok(
        "edge-node",
        &[
            "--data",
            &d,
            "scan",
            "--json",
            frame.to_str().unwrap_or_default(),
        ],
    )?;
    assert!(out.contains("\"accepted\""), "{out}");
    run_ok(
        "edge-node",
        &[
            "--data",
            &d,
            "paper",
            "add",
            "--name",
            "Lee",
            "--phone",
            "010-3333-4444",
            "--consent-collect",
            "--consent-share",
        ],
    )?;
    // The scan woke the sync loop: the visit reaches the hub without waiting for the timer.
    if !wait_until(Duration::from_secs(20), || {
        hub.records_of(&hub.facility).unwrap_or(0) >= 2
    }) {
        bail!(
            "the scanned visit did not reach the hub promptly: {}",
            hub.stats()?
        );
    }
    assert_eq!(
        hub.trace(&token)?["visits"].as_array().map(Vec::len),
        Some(1)
    );
    let s = device_status(&dev)?;
    assert_eq!(s["records"], 2);
    let p = run_ok("edge-node", &["--data", &d, "purge", "--json"])?;
    assert!(p.contains("horizon"), "{p}");
    Ok(())
}

/// The frames a hand-written client receives from the hub until it refuses or closes.
async fn read_until_end(recv: &mut iroh::endpoint::RecvStream) -> Vec<shared::sync::Frame> {
    let mut decoder = shared::sync::FrameDecoder::new();
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let read = tokio::time::timeout_at(deadline, recv.read(&mut buf)).await;
        let Ok(Ok(Some(n))) = read else { break };
        if decoder.push(&buf[..n]).is_err() {
            break;
        }
        while let Ok(Some(f)) = decoder.pop() {
            let end = matches!(f, shared::sync::Frame::Refused(_));
            frames.push(f);
            if end {
                return frames;
            }
        }
    }
    frames
}

/// A rogue client with an enrolled device's own key (so it is admitted as that device) that
/// speaks the protocol by hand: it claims another facility in its hello, then, admitted as
/// its own facility, pushes a partition of the other facility. Both are refused and nothing
/// of the other facility changes at the hub.
#[test]
fn a_device_writing_another_facilitys_partition_is_refused() -> Result<()> {
    use shared::sync::{Frame, Hello, PROTOCOL_VERSION, PartitionSummary, Peer};
    let hub = HubFixture::new()?;
    let fa = hub.facility.clone();
    let fb = hub.add_facility("Moon Bar")?;
    let _h = hub.start()?;
    let honest = hub.enroll_device_for(&fb, "moon-door")?;
    let honest_tokens = check_in_codes(&honest, 3)?;
    assert!(sync_once(&honest, &[])?.status.success());
    let rogue = hub.enroll_device("star-door")?;
    check_in_codes(&rogue, 1)?;
    assert!(
        sync_once(&rogue, &[])?.status.success(),
        "binds the rogue's key"
    );
    assert_eq!((hub.records_of(&fa)?, hub.records_of(&fb)?), (1, 3));

    let (key, device_id, hub_id) = {
        let d = edge_node::device::Device::open(&rogue)?;
        let e = d.enrollment();
        (
            d.endpoint_key()?,
            e.device_id.clone(),
            e.hub.endpoint_id.parse::<iroh::PublicKey>()?,
        )
    };
    let now = fixture::now();
    let day = shared::Day::of(now);
    let fb_id = shared::FacilityId::parse(&fb)?;
    let fa_id = shared::FacilityId::parse(&fa)?;
    // A partition of facility B, with one record the rogue made up.
    let foreign_id = shared::PartitionId {
        facility: fb_id.clone(),
        day,
    };
    let mut foreign = shared::partition::Partition::new(foreign_id.clone(), b"rogue-actor");
    let rogue_token = fixture::random_token();
    let session = shared::envelope::SessionKey::generate(&mut rand_core::OsRng, day);
    let record_id = shared::RecordId::random(&mut rand_core::OsRng);
    let record = shared::envelope::Record {
        facility: fb_id.clone(),
        device: device_id.clone(),
        scanned_at: now,
        body: shared::envelope::RecordBody::Qr {
            issuer_id: 1,
            key_id: 1,
            issued_at: now,
            token: rogue_token,
        },
    };
    let envelope = session.seal(&mut rand_core::OsRng, &foreign_id, record_id, &record)?;
    foreign.insert_record(record_id, &envelope)?;
    let message = {
        use automerge::sync::SyncDoc;
        let mut st = automerge::sync::State::new();
        foreign
            .doc()
            .generate_sync_message(&mut st)
            .map(|m| m.encode())
            .unwrap_or_default()
    };
    // The hello lists the foreign partition only when it claims facility B; admitted as
    // itself, the rogue lists nothing and pushes the partition unasked.
    let hello = |facility: shared::FacilityId| {
        let partitions = if facility == fb_id {
            vec![PartitionSummary::of(&foreign).advertised()]
        } else {
            Vec::new()
        };
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            peer: Peer::Device {
                device: device_id.clone(),
                facility,
            },
            now,
            horizon: shared::time::horizon(now),
            partitions,
            in_sync: Default::default(),
            push_only: true,
            credential: None,
            refresh_have: None,
        })
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (claimed_b, pushed_b) = rt.block_on(async {
        let endpoint = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
            .secret_key(iroh::SecretKey::from_bytes(&key))
            .alpns(vec![shared::sync::ALPN.to_vec()])
            .clear_ip_transports()
            .bind_addr("127.0.0.1:0".parse::<std::net::SocketAddr>()?)?
            .bind()
            .await?;
        let addr = iroh::EndpointAddr::new(hub_id)
            .with_ip_addr(format!("127.0.0.1:{}", hub.sync_port).parse()?);
        let mut results = Vec::new();
        for (claim, push) in [(fb_id.clone(), false), (fa_id.clone(), true)] {
            let conn = endpoint.connect(addr.clone(), shared::sync::ALPN).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&hello(claim).encode()?).await?;
            if push {
                // Wait for the Welcome, then push the foreign partition.
                let mut decoder = shared::sync::FrameDecoder::new();
                let mut buf = vec![0u8; 64 * 1024];
                let welcomed: Option<String> = loop {
                    let n = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
                        .await??
                        .unwrap_or(0);
                    if n == 0 {
                        break Some("end of stream".into());
                    }
                    decoder.push(&buf[..n])?;
                    match decoder.pop()? {
                        Some(Frame::Welcome(_)) => break None,
                        Some(other) => break Some(format!("{other:?}")),
                        None => continue,
                    }
                };
                if let Some(other) = welcomed {
                    bail!("the rogue's own identity should be admitted, got {other}");
                }
                let frame = Frame::Sync {
                    partition: foreign_id.clone(),
                    message: message.clone(),
                };
                send.write_all(&frame.encode()?).await?;
            }
            results.push(read_until_end(&mut recv).await);
            conn.close(0u32.into(), b"done");
        }
        endpoint.close().await;
        anyhow::Ok((results[0].clone(), results[1].clone()))
    })?;
    let refusal = |frames: &[Frame]| {
        frames.iter().find_map(|f| match f {
            Frame::Refused(r) => Some(format!("{:?}: {}", r.reason, r.detail)),
            _ => None,
        })
    };
    let why = refusal(&claimed_b).context("claiming another facility must be refused")?;
    println!("claimed another facility: {why}");
    let why = refusal(&pushed_b).context("pushing another facility's partition must be refused")?;
    println!("pushed another facility's partition: {why}");
    // Nothing of the rogue's reached facility B; the honest visits are all there.
    assert_eq!((hub.records_of(&fa)?, hub.records_of(&fb)?), (1, 3));
    assert_eq!(
        hub.trace(&rogue_token)?["visits"].as_array().map(Vec::len),
        Some(0)
    );
    assert_eq!(
        hub.trace(&honest_tokens[0])?["visits"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    Ok(())
}
