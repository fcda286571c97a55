//! The hub's registry through its command line: init, issuer keys, facilities, enrollment.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sync-hub");

fn hub(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SYNC_HUB_DATA")
        .output()
        .unwrap_or_else(|e| panic!("cannot start sync-hub: {e}"))
}

fn ok(args: &[&str]) -> String {
    let out = hub(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fail(args: &[&str], needle: &str) {
    let out = hub(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
}

fn add(d: &str, business: Option<&str>) -> serde_json::Value {
    let mut args = vec![
        "--data",
        d,
        "facility",
        "add",
        "--name",
        "Hall",
        "--representative",
        "Lee",
        "--phone",
        "031-000-0000",
        "--category",
        "wedding_hall",
        "--region",
        "suwon",
        "--address",
        "2 Gwanggyo-ro",
        "--json",
    ];
    match business {
        Some(b) => args.extend(["--business-number", b]),
        None => args.push("--no-business-number"),
    }
    serde_json::from_str(ok(&args).trim()).unwrap_or_default()
}

#[test]
fn facilities_approval_and_tickets() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = tmp.path().join("hub");
    let d = d.to_str().unwrap_or_default();
    fail(&["--data", d, "facility", "list"], "init --region");
    let id = ok(&[
        "--data",
        d,
        "init",
        "--region",
        "suwon",
        "--listen",
        "127.0.0.1:7447",
    ]);
    assert_eq!(id.trim().len(), 64);
    fail(
        &["--data", d, "init", "--region", "suwon"],
        "already holds a hub",
    );

    let approved = add(d, Some("123-45-67891"));
    assert_eq!(approved["status"], "approved");
    let pending = add(d, None);
    assert_eq!(pending["status"], "pending");
    fail(
        &[
            "--data",
            d,
            "facility",
            "add",
            "--name",
            "X",
            "--business-number",
            "123-45-67890",
            "--representative",
            "L",
            "--phone",
            "1",
            "--category",
            "karaoke",
            "--region",
            "r",
            "--address",
            "a",
        ],
        "check digit",
    );
    fail(
        &[
            "--data",
            d,
            "facility",
            "add",
            "--name",
            "X",
            "--no-business-number",
            "--representative",
            "L",
            "--phone",
            "1",
            "--category",
            "casino",
            "--region",
            "r",
            "--address",
            "a",
        ],
        "unknown category",
    );

    let pid = pending["facility_id"].as_str().unwrap_or_default();
    let ticket = tmp.path().join("t.json");
    let t = ticket.to_str().unwrap_or_default();
    fail(
        &[
            "--data",
            d,
            "enroll",
            pid,
            "--device-name",
            "gate",
            "--out",
            t,
        ],
        "pending approval",
    );
    ok(&["--data", d, "facility", "approve", pid]);
    ok(&[
        "--data",
        d,
        "enroll",
        pid,
        "--device-name",
        "gate",
        "--out",
        t,
    ]);
    let text = std::fs::read_to_string(&ticket).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    assert_eq!(v["kind"], "kipass-enrollment-ticket");
    assert!(v["day_keys"].as_array().map_or(0, Vec::len) >= 35);
    assert!(
        v["authority_recipient"]
            .as_str()
            .unwrap_or_default()
            .starts_with("age1")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&ticket)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        assert_eq!(mode & 0o077, 0, "a ticket is a credential: owner-only");
    }
    fail(
        &[
            "--data",
            d,
            "enroll",
            "fac_nope",
            "--device-name",
            "gate",
            "--out",
            t,
        ],
        "no facility",
    );

    let list = ok(&["--data", d, "facility", "list", "--json"]);
    assert_eq!(list.lines().count(), 2);
    let aid = approved["facility_id"].as_str().unwrap_or_default();
    ok(&["--data", d, "facility", "remove", aid]);
    assert_eq!(
        ok(&["--data", d, "facility", "list", "--json"])
            .lines()
            .count(),
        1
    );

    let ring = tmp.path().join("ring.json");
    std::fs::write(&ring, "{\"issuers\": [").unwrap_or_default();
    fail(
        &[
            "--data",
            d,
            "issuers",
            "import",
            ring.to_str().unwrap_or_default(),
        ],
        "keyring",
    );
}
