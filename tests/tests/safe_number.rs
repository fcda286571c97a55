//! The personal safe number (개인안심번호) through the real binaries: `edge-node paper add
//! --safe-number` (inline and from stdin) beside a phone-only entry, refusals with clear
//! errors, a sync to the hub, a trace, and the health authority's `paper open` showing the
//! safe number of one entry and the phone of the other.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};
use tests::fixture::{self, HubFixture, bin, run_ok};

fn paper_add(dev: &str, args: &[&str], stdin: &str) -> Result<std::process::Output> {
    let mut child = Command::new(bin("edge-node"))
        .args(["--data", dev, "paper", "add"])
        .args(args)
        .env_remove("EDGE_NODE_DATA")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

#[test]
fn a_safe_number_is_recorded_sealed_and_opened_by_the_authority() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("door")?;
    let d = dev.display().to_string();
    let case = fixture::check_in_codes(&dev, 1)?[0];
    let consents = ["--consent-collect", "--consent-share", "--json"];

    // Refused, nothing stored: a malformed safe number, and neither phone nor safe number.
    let bad = paper_add(
        &d,
        &[
            &["--name", "이서연", "--safe-number", "98다76"][..],
            &consents,
        ]
        .concat(),
        "",
    )?;
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("개인안심번호") && err.contains("4 digits and 2 Hangul"),
        "{err}"
    );
    assert!(!err.contains("98다76"), "the number is not echoed: {err}");
    let none = paper_add(&d, &[&["--name", "이서연"][..], &consents].concat(), "")?;
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        err.contains("--phone") || err.contains("safe-number"),
        "{err}"
    );
    assert_eq!(fixture::device_status(&dev)?["records"], 1);

    // Stored: a safe number inline, a safe number and name from stdin, a phone as before.
    for (args, stdin) in [
        (vec!["--name", "김민준", "--safe-number", "12가34나"], ""),
        (vec!["--name", "--safe-number"], "박지우\n 1가23나4 \n"),
        (vec!["--name", "최유진", "--phone", "010-2222-3333"], ""),
    ] {
        let out = paper_add(&d, &[&args[..], &consents].concat(), stdin)?;
        if !out.status.success() {
            bail!(
                "paper add {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(v["stored"], true, "{v}");
    }
    assert_eq!(fixture::device_status(&dev)?["records"], 4);

    // To the hub, then the trace and the authority's opening.
    let running = hub.start()?;
    let synced = fixture::sync_once(&dev, &[])?;
    if !synced.status.success() {
        bail!("sync: {}", String::from_utf8_lossy(&synced.stderr));
    }
    let report = hub.trace(&case)?;
    let paper = report["contacts"]
        .as_array()
        .context("contacts")?
        .iter()
        .filter(|c| c["paper"] == true)
        .count();
    assert_eq!(paper, 3, "{report}");
    let export = hub.tmp.path().join("trace.json");
    std::fs::write(&export, report.to_string())?;
    let identity = hub.data.join("authority-identity.txt");
    let opened = run_ok(
        "sync-hub",
        &[
            "paper",
            "open",
            "--identity",
            &identity.display().to_string(),
            &export.display().to_string(),
        ],
    )?;
    let mut rows: Vec<(String, String, Value)> = opened
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            Ok((
                v["name"].as_str().unwrap_or_default().to_owned(),
                v["phone"].as_str().unwrap_or_default().to_owned(),
                v["safe_number"].clone(),
            ))
        })
        .collect::<Result<_>>()?;
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        rows,
        [
            ("김민준".into(), String::new(), Value::from("12가34나")),
            ("박지우".into(), String::new(), Value::from("1가23나4")),
            ("최유진".into(), "010-2222-3333".into(), Value::Null),
        ]
    );
    // And in the spreadsheet export, in its own column.
    let csv = run_ok(
        "sync-hub",
        &[
            "paper",
            "open",
            "--identity",
            &identity.display().to_string(),
            "--format",
            "csv",
            &export.display().to_string(),
        ],
    )?;
    let header = csv.lines().next().unwrap_or_default();
    assert!(header.contains(",phone,safe_number,"), "{header}");
    assert!(csv.contains(",12가34나,"), "{csv}");
    // The hub itself never sees it: not in its store's bytes.
    drop(running);
    let bytes = fixture::all_bytes_below(&hub.data)?;
    assert!(!fixture::contains(&bytes, "12가34나".as_bytes()));
    Ok(())
}
