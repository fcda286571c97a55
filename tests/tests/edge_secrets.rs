//! Names, phone numbers and PINs stay off the command line: a bare `--name`, `--phone`,
//! `--staff-pin`, `--pin` or `--representative` reads its value from stdin, so it never shows
//! in shell history or in `/proc/PID/cmdline`; a value given inline still works, with a
//! warning.

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tests::fixture::{self, HubFixture, run, run_ok};

const NAME: &str = "Hong Gildong";
const PHONE: &str = "010-1234-5678";
const PIN: &str = "402913";

/// Runs a binary with `input` on its stdin; returns its output and its `/proc/PID/cmdline`,
/// read while it waits for that input.
fn run_with_stdin(name: &str, args: &[&str], input: &str) -> Result<(Output, String)> {
    let mut child = Command::new(fixture::bin(name))
        .args(args)
        .env_remove("EDGE_NODE_DATA")
        .env_remove("SYNC_HUB_DATA")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    // The child is blocked on its stdin until we write: its command line is the one it runs.
    // Right after spawn the kernel may still be setting up the new program's arguments (an
    // empty cmdline): poll briefly.
    let proc_file = format!("/proc/{}/cmdline", child.id());
    let mut cmdline = String::new();
    fixture::wait_until(Duration::from_secs(5), || {
        cmdline = std::fs::read(&proc_file)
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        !cmdline.is_empty()
    });
    let written = child
        .stdin
        .take()
        .context("no stdin")
        .and_then(|mut s| Ok(s.write_all(input.as_bytes())?));
    // Reaped whatever happened to the write.
    let out = child.wait_with_output()?;
    written?;
    Ok((out, cmdline))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn records(dev: &Path) -> Result<u64> {
    fixture::device_status(dev)?["records"]
        .as_u64()
        .context("status without records")
}

#[test]
fn paper_add_reads_the_visitors_name_and_phone_from_stdin() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("north-gate")?;
    let d = dev.display().to_string();
    let args = [
        "--data",
        &d,
        "paper",
        "add",
        "--name",
        "--phone",
        "--consent-collect",
        "--consent-share",
        "--json",
    ];
    let (out, cmdline) = run_with_stdin("edge-node", &args, &format!("{NAME}\n{PHONE}\n"))?;
    if !out.status.success() {
        bail!("paper add failed: {}", stderr(&out));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["stored"], true, "{v}");
    assert!(cmdline.contains("paper add --name --phone"), "{cmdline:?}");
    assert!(
        !cmdline.contains(NAME) && !cmdline.contains(PHONE),
        "{cmdline:?}"
    );
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    assert_eq!(records(&dev)?, 1);

    // Stdin ends before the phone: refused, with what to send, and nothing recorded.
    let (out, _) = run_with_stdin("edge-node", &args, &format!("{NAME}\n"))?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--phone") && err.contains("stdin"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(records(&dev)?, 1);

    // The inline form still works for scripts, with a warning.
    let out = run(
        "edge-node",
        &[
            "--data",
            &d,
            "paper",
            "add",
            "--name",
            NAME,
            "--phone",
            PHONE,
            "--consent-collect",
            "--consent-share",
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("warning") && err.contains("--name") && err.contains("shell history"),
        "{err}"
    );
    assert_eq!(records(&dev)?, 2);
    Ok(())
}

#[test]
fn init_and_pin_set_read_the_staff_pin_from_stdin() -> Result<()> {
    let hub = HubFixture::new()?;
    let ticket = hub.write_ticket(&hub.facility, "north-gate")?;
    let dev = hub.tmp.path().join("dev");
    let d = dev.display().to_string();
    let t = ticket.display().to_string();
    let init = ["--data", &d, "init", "--ticket", &t, "--staff-pin"];

    // No PIN on stdin: refused before enrolling.
    let (out, _) = run_with_stdin("edge-node", &init, "")?;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--staff-pin"), "{}", stderr(&out));
    assert!(!dev.join("edge.redb").exists(), "enrolled without its PIN");

    let (out, cmdline) = run_with_stdin("edge-node", &init, &format!("{PIN}\n"))?;
    if !out.status.success() {
        bail!("init failed: {}", stderr(&out));
    }
    assert!(cmdline.ends_with("--staff-pin "), "{cmdline:?}");
    assert!(!cmdline.contains(PIN), "{cmdline:?}");
    {
        let device = edge_node::device::Device::open(&dev)?;
        let pin = device.staff_pin()?.context("no staff PIN set")?;
        assert!(pin.matches(PIN));
        assert!(!pin.matches("402914"));
        let raw = device.store().get("staff_pin")?.unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&raw).contains("\"$argon2id$"),
            "{}",
            String::from_utf8_lossy(&raw)
        );
    }

    // `pin set --pin` alone reads the new PIN from stdin too.
    let (out, cmdline) = run_with_stdin(
        "edge-node",
        &["--data", &d, "pin", "set", "--pin"],
        "771234\n",
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!cmdline.contains("771234"), "{cmdline:?}");
    let device = edge_node::device::Device::open(&dev)?;
    let pin = device.staff_pin()?.context("no staff PIN set")?;
    assert!(pin.matches("771234") && !pin.matches(PIN));
    Ok(())
}

#[test]
fn facility_add_reads_the_representative_and_phone_from_stdin() -> Result<()> {
    let hub = HubFixture::new()?;
    let h = hub.data_str();
    let (out, cmdline) = run_with_stdin(
        "sync-hub",
        &[
            "--data",
            &h,
            "facility",
            "add",
            "--name",
            "Moon Hall",
            "--no-business-number",
            "--representative",
            "--phone",
            "--category",
            "karaoke",
            "--region",
            "mapo",
            "--address",
            "9 Wausan-ro",
            "--json",
        ],
        "Lee Owner\n010-5555-6666\n",
    )?;
    if !out.status.success() {
        bail!("facility add failed: {}", stderr(&out));
    }
    assert!(cmdline.contains("--representative --phone"), "{cmdline:?}");
    assert!(!cmdline.contains("Lee Owner") && !cmdline.contains("010-5555"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let id = v["facility_id"].as_str().unwrap_or_default().to_owned();
    let list = run_ok("sync-hub", &["--data", &h, "facility", "list", "--json"])?;
    let row: serde_json::Value = list
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|r| r["facility_id"] == id.as_str())
        .context("the new facility is not listed")?;
    assert_eq!(row["representative"], "Lee Owner");
    assert_eq!(row["phone"], "010-5555-6666");
    Ok(())
}
