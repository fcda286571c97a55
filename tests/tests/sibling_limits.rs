//! A device serving its siblings bounds what one sibling can take (finding 9 of the sync v2
//! review): a sibling on the hub's roster may be a stolen tablet, so a session it opens has a
//! time limit and a byte limit, and one sibling gets one session at a time. Through the real
//! binaries: device A runs (`edge-node run`) with tightened limits, and a rogue enrolled in
//! the same facility (R, on A's roster) dials it with each attack; afterwards A still relays
//! R's honest visits to the hub.

use anyhow::{Context, Result};
use iroh::{EndpointAddr, SecretKey};
use shared::sync::RefuseReason;
use shared::time::Day;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::fixture::{
    HubFixture, Proc, bin, check_in_codes, free_udp_port, now, run_ok, wait_until,
};
use tests::rogue::{Ending, Rogue};

/// The limits A runs with: short enough for a test, far above an honest session of it.
const SESSION_SECS: u64 = 3;
const SESSION_BYTES: u64 = 100_000;

fn refused(ending: &Ending, needle: &str) -> bool {
    matches!(
        ending,
        Ending::Refused { reason: RefuseReason::QuotaExceeded, detail, .. } if detail.contains(needle)
    )
}

#[test]
fn a_sibling_is_held_to_time_bytes_and_one_session_and_honest_relay_goes_on() -> Result<()> {
    let hub = HubFixture::new()?;
    let a = hub.enroll_device("a")?;
    let r = hub.enroll_device("r")?;
    let _hub_proc = hub.start()?;
    let a_listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let r_listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    // R binds its credential first, so the roster A gets lists R.
    for (dev, listen) in [(&r, r_listen), (&a, a_listen)] {
        let d = dev.display().to_string();
        run_ok(
            "edge-node",
            &[
                "--data",
                &d,
                "sync",
                "--once",
                "--listen",
                &listen.to_string(),
            ],
        )?;
    }
    let a_id = {
        let device = edge_node::device::Device::open(&a)?;
        SecretKey::from_bytes(&device.endpoint_key()?).public()
    };
    let _a_run = Proc(
        Command::new(bin("edge-node"))
            .args([
                "--data",
                &a.display().to_string(),
                "run",
                "--listen",
                &a_listen.to_string(),
                "--http",
                "127.0.0.1:0",
            ])
            .env_remove("EDGE_NODE_DATA")
            .env("EDGE_NODE_SIBLING_SESSION_SECS", SESSION_SECS.to_string())
            .env("EDGE_NODE_SIBLING_SESSION_BYTES", SESSION_BYTES.to_string())
            .env("EDGE_NODE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(hub.tmp.path().join("a.log"))?)
            .spawn()?,
    );

    let day = Day::of(now());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rogue = rt.block_on(Rogue::bind(
        &r,
        &hub.data,
        hub.sync_port,
        day,
        r_listen,
        true,
    ))?;
    rogue.retarget(EndpointAddr::new(a_id).with_ip_addr(a_listen));

    // 1. A Hello, then silence: cut off at the time limit with the reason, not held for
    // ever (before, the session waited 30 s per read, without end for a trickle).
    let start = Instant::now();
    let mut silent = None;
    for _ in 0..20 {
        match rt.block_on(rogue.send_raw(&[], now())) {
            Ok(ending) => {
                silent = Some(ending);
                break;
            }
            // A is still starting.
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
    let silent = silent.context("A never answered the rogue's dial")?;
    assert!(
        refused(&silent, "longer than"),
        "a silent sibling: {silent:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(15));

    // 2. More bytes than a session may send: refused before the frame is handled.
    let flood = shared::sync::Frame::Sync {
        partition: rogue.partition.clone(),
        message: vec![0x42; 2 * SESSION_BYTES as usize],
    }
    .encode()?;
    let ending = rt
        .block_on(rogue.send_raw(&flood, now()))
        .context("step 2")?;
    assert!(
        refused(&ending, "more than this device's"),
        "a sibling over the byte limit: {ending:?}"
    );

    // 3. One session per sibling: a second connection while the first is held is closed.
    let (first, second) = rt.block_on(async {
        let first = rogue.send_raw(&[], now());
        let second = async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            rogue.send_raw(&[], now()).await
        };
        tokio::join!(first, second)
    });
    assert!(refused(&first.context("step 3, first")?, "longer than"));
    // The refusal surfaces while the stream opens or on its first read.
    let second = match second {
        Ok(Ending::Failed(why)) => why,
        Err(e) => format!("{e:#}"),
        Ok(other) => panic!("a second session of the same sibling was served: {other:?}"),
    };
    assert!(
        second.contains("already being served"),
        "the second session: {second}"
    );

    // 4. A still serves an honest session of R (the real binary, no route to the hub),
    // and relays its visits to the hub.
    let before = hub.records_of(&hub.facility)?;
    check_in_codes(&r, 2)?;
    let out = tests::fixture::sync_via_sibling_only(&r, &format!("{a_id}@{a_listen}"))?;
    let log = || std::fs::read_to_string(hub.tmp.path().join("a.log")).unwrap_or_default();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        report.contains("\"records_received\"") && !out.status.success(),
        "R had no route to the hub and handed its visits to A: {report}"
    );
    assert!(
        wait_until(Duration::from_secs(60), || hub
            .records_of(&hub.facility)
            .is_ok_and(|n| n == before + 2)),
        "A relayed R's two visits to the hub; R's sync: {report}; A's log:\n{}",
        log()
    );
    rt.block_on(rogue.close());
    Ok(())
}
