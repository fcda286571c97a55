//! The hub's refresh travels only when it changed: a device's hello says what it holds (day
//! keys, issuer keyring, roster), so sessions the same day receive a welcome without the ~4 KB
//! of keys and keyring (before, every welcome carried them), and a new sibling reaches the
//! device's roster at its next sync.

use anyhow::{Result, bail};
use tests::fixture::{HubFixture, device_status, sync_once};

/// The hub's session of one `sync --once --json` run: its frame bytes received.
fn hub_frames_received(out: &std::process::Output) -> Result<u64> {
    if !out.status.success() {
        bail!("sync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["peer"] == "hub" {
            if v["ok"] != true {
                bail!("hub session failed: {v}");
            }
            return Ok(v["frame_bytes_received"].as_u64().unwrap_or(u64::MAX));
        }
    }
    bail!("no hub session in {stdout}")
}

#[test]
fn a_refresh_carries_only_what_changed() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("north")?;
    let mut proc = hub.start()?;

    let first = hub_frames_received(&sync_once(&dev, &[])?)?;
    let keys_left = device_status(&dev)?["day_keys_left"].as_u64().unwrap_or(0);
    let second = hub_frames_received(&sync_once(&dev, &[])?)?;
    println!("welcome frames: first session {first} B, second {second} B");
    // Enrollment gave the device today's keys and keyring: neither session needs them.
    for (n, b) in [(1, first), (2, second)] {
        if b >= 600 {
            bail!("session {n} received {b} B of frames: the refresh was sent unchanged");
        }
    }
    // Nothing was lost by leaving the refresh out.
    let status = device_status(&dev)?;
    if status["day_keys_left"].as_u64().unwrap_or(0) != keys_left || keys_left == 0 {
        bail!("day keys changed by a session without a refresh: {status}");
    }

    // A sibling enrolled and synced: its address is new roster news for the first device.
    let sibling = hub.enroll_device("south")?;
    hub_frames_received(&sync_once(&sibling, &[])?)?;
    let third = hub_frames_received(&sync_once(&dev, &[])?)?;
    if third <= second + 50 {
        bail!("the roster change did not travel: {third} B after {second} B");
    }
    let fourth = hub_frames_received(&sync_once(&dev, &[])?)?;
    if fourth >= 600 {
        bail!("after the roster arrived, a session still received {fourth} B");
    }
    proc.kill();
    Ok(())
}
