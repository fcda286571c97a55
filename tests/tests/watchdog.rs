//! Both binaries speak systemd's notification protocol (issue #17, "Health": the units'
//! watchdog uses the health check): under `NOTIFY_SOCKET` with `WATCHDOG_USEC`, `run` says
//! `READY=1` once it serves and then `WATCHDOG=1` at half the period while its health check
//! passes. The test plays systemd: it binds the notification socket and reads what arrives.

use anyhow::{Context, Result, bail};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::fixture::{HubFixture, Proc, bin};

/// The watchdog period the test asks for: pings every 0.5 s.
const WATCHDOG_USEC: &str = "1000000";

/// Reads notifications until `READY=1` and then two `WATCHDOG=1` arrived, within `limit`.
fn ready_then_pinged(socket: &UnixDatagram, limit: Duration) -> Result<Vec<String>> {
    let end = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while Instant::now() < end {
        socket.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10)),
        ))?;
        let Ok(n) = socket.recv(&mut buf) else {
            break;
        };
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        let ready = seen.iter().position(|m| m == "READY=1");
        if let Some(at) = ready
            && seen[at..].iter().filter(|m| *m == "WATCHDOG=1").count() >= 2
        {
            return Ok(seen);
        }
    }
    bail!("no READY=1 followed by two WATCHDOG=1 within {limit:?}: got {seen:?}")
}

#[test]
fn the_hub_and_a_device_tell_systemd_they_are_ready_and_ping_its_watchdog() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("gate")?;

    let hub_socket_path = hub.tmp.path().join("hub-notify");
    let hub_socket = UnixDatagram::bind(&hub_socket_path)?;
    let notify = hub_socket_path.display().to_string();
    let _hub = hub.start_with(
        &[],
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", WATCHDOG_USEC)],
    )?;
    let seen = ready_then_pinged(&hub_socket, Duration::from_secs(20)).context("sync-hub")?;
    println!("sync-hub: {seen:?}");

    let dev_socket_path = hub.tmp.path().join("dev-notify");
    let dev_socket = UnixDatagram::bind(&dev_socket_path)?;
    let _dev = Proc(
        Command::new(bin("edge-node"))
            .args([
                "--data",
                &dev.display().to_string(),
                "run",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
            ])
            .env_remove("EDGE_NODE_DATA")
            .env("NOTIFY_SOCKET", dev_socket_path.display().to_string())
            .env("WATCHDOG_USEC", WATCHDOG_USEC)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let seen = ready_then_pinged(&dev_socket, Duration::from_secs(20)).context("edge-node")?;
    println!("edge-node: {seen:?}");

    // A watchdog meant for another process (`WATCHDOG_PID`) is not pinged; ready is still said.
    let other_path = hub.tmp.path().join("other-notify");
    let other = UnixDatagram::bind(&other_path)?;
    let _hub2 = {
        let hub2 = HubFixture::new()?;
        let p = hub2.start_with(
            &[],
            &[
                ("NOTIFY_SOCKET", &other_path.display().to_string()),
                ("WATCHDOG_USEC", WATCHDOG_USEC),
                ("WATCHDOG_PID", "1"),
            ],
        )?;
        (hub2, p)
    };
    other.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 64];
    let n = other.recv(&mut buf)?;
    assert_eq!(&buf[..n], b"READY=1");
    other.set_read_timeout(Some(Duration::from_secs(2)))?;
    assert!(
        other.recv(&mut buf).is_err(),
        "no ping for a watchdog of another process"
    );
    Ok(())
}
