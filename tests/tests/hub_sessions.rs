//! A hub runs at most one session per device, and no session longer than its time limit:
//! a newer session of a device replaces the older (a connection that died without closing
//! would otherwise hold its slot until its read timeout), and a peer that keeps its session
//! open without finishing is refused after `SYNC_HUB_SESSION_LIMIT_SECS`.

use anyhow::{Result, bail};
use shared::sync::{RefuseReason, Side};
use shared::time::Day;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tests::fixture::{HubFixture, check_in_codes, free_udp_port, now, run_ok, sync_once};
use tests::rogue::{Ending, Rogue};

/// An enrolled device that synced once (its endpoint is bound at the hub), and a rogue with
/// its identity.
fn bound_device(
    hub: &HubFixture,
    rt: &tokio::runtime::Runtime,
) -> Result<(std::path::PathBuf, Rogue)> {
    let dev = hub.enroll_device("gate")?;
    let listen = format!("127.0.0.1:{}", free_udp_port()?);
    let d = dev.display().to_string();
    run_ok(
        "edge-node",
        &["--data", &d, "sync", "--once", "--listen", &listen],
    )?;
    let r_listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let rogue = rt.block_on(Rogue::bind(
        &dev,
        &hub.data,
        hub.sync_port,
        Day::of(now()),
        r_listen,
        true,
    ))?;
    Ok((dev, rogue))
}

#[test]
fn a_newer_session_of_a_device_replaces_the_older() -> Result<()> {
    let hub = HubFixture::new()?;
    let mut proc = hub.start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (dev, rogue) = bound_device(&hub, &rt)?;
    let rogue = std::sync::Arc::new(rogue);
    // The older session: admitted, then silent (a connection that died without closing).
    let held = {
        let rogue = rogue.clone();
        rt.spawn(async move { rogue.send_raw(&[], now()).await })
    };
    std::thread::sleep(Duration::from_millis(1500));
    // The device's own newer session.
    check_in_codes(&dev, 1)?;
    let started = Instant::now();
    let out = sync_once(&dev, &[])?;
    if !out.status.success() {
        bail!(
            "the newer session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ending =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), held).await })??;
    let ending = ending?;
    match &ending {
        Ending::Refused {
            by: Side::Peer,
            reason: RefuseReason::Replaced,
            ..
        } => {}
        other => bail!("the older session ended with {other:?}, not Replaced"),
    }
    // Replaced at once, not after the hub's 30 s read timeout.
    if started.elapsed() > Duration::from_secs(15) {
        bail!(
            "the older session was cut only after {:?}",
            started.elapsed()
        );
    }
    if hub.records_of(&hub.facility)? != 1 {
        bail!("the newer session's visit is not at the hub");
    }
    proc.kill();
    Ok(())
}

#[test]
fn a_session_past_the_time_limit_is_refused() -> Result<()> {
    let hub = HubFixture::new()?;
    let mut proc = hub.start_with(&[], &[("SYNC_HUB_SESSION_LIMIT_SECS", "3")])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (dev, rogue) = bound_device(&hub, &rt)?;
    let started = Instant::now();
    let ending = rt.block_on(rogue.send_raw(&[], now()))?;
    let took = started.elapsed();
    match &ending {
        Ending::Refused {
            reason: RefuseReason::QuotaExceeded,
            detail,
            ..
        } if detail.contains("longer than") => {}
        other => bail!("a session held open ended with {other:?}"),
    }
    if took < Duration::from_secs(2) || took > Duration::from_secs(15) {
        bail!("refused after {took:?}, the limit is 3 s");
    }
    // Honest sessions are short and still go through.
    check_in_codes(&dev, 2)?;
    let out = sync_once(&dev, &[])?;
    if !out.status.success() {
        bail!(
            "an honest sync failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if hub.records_of(&hub.facility)? != 2 {
        bail!("the honest visits are not at the hub");
    }
    rt.block_on(rogue.close());
    proc.kill();
    Ok(())
}
