//! Bad input of every kind gets a clear one-line error, no panic, and loses nothing stored.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_edge-node");

fn edge(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("EDGE_NODE_DATA")
        .output()
        .unwrap_or_else(|e| panic!("cannot start edge-node: {e}"))
}

fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "stderr {err:?} does not mention {needle:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "more than one line: {err}");
}

#[test]
fn missing_and_wrong_tickets() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = tmp.path().join("dev");
    let d = d.to_str().unwrap_or_default();
    assert_clean_error(
        &edge(&["--data", d, "init", "--ticket", "/nonexistent/ticket"]),
        "cannot read ticket",
    );
    let dir = tmp.path().to_str().unwrap_or_default();
    assert_clean_error(&edge(&["--data", d, "init", "--ticket", dir]), "directory");
    let garbage = tmp.path().join("garbage.ticket");
    std::fs::write(&garbage, b"\x00\x01not json").unwrap_or_default();
    assert_clean_error(
        &edge(&[
            "--data",
            d,
            "init",
            "--ticket",
            garbage.to_str().unwrap_or_default(),
        ]),
        "not an enrollment ticket",
    );
    let other = tmp.path().join("other.json");
    std::fs::write(&other, br#"{"kind":"something-else","version":1}"#).unwrap_or_default();
    assert_clean_error(
        &edge(&[
            "--data",
            d,
            "init",
            "--ticket",
            other.to_str().unwrap_or_default(),
        ]),
        "not an enrollment ticket",
    );
    let future = tmp.path().join("future.json");
    std::fs::write(
        &future,
        br#"{"kind":"kipass-enrollment-ticket","version":9}"#,
    )
    .unwrap_or_default();
    assert_clean_error(
        &edge(&[
            "--data",
            d,
            "init",
            "--ticket",
            future.to_str().unwrap_or_default(),
        ]),
        "version 9",
    );
}

#[test]
fn commands_on_a_folder_without_a_device() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let d = tmp.path().to_str().unwrap_or_default();
    assert_clean_error(&edge(&["--data", d, "status", "--json"]), "init --ticket");
    assert_clean_error(&edge(&["--data", d, "scan", "x.png"]), "init --ticket");
}

#[test]
fn corrupted_store_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let db = tmp.path().join("edge.redb");
    std::fs::write(&db, vec![0x5a; 10_000]).unwrap_or_default();
    // Loose modes, as a file copied in under umask 022 has (and independent of this process's
    // umask): the store was readable by every local user until the device opened the folder.
    for (p, m) in [(tmp.path(), 0o755), (db.as_path(), 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
    }
    let d = tmp.path().to_str().unwrap_or_default();
    let out = edge(&["--data", d, "status", "--json"]);
    // First the data folder's tightening warns, rightly, that the store was exposed (one
    // line naming it and the advice to rotate); then the one-line error.
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut lines = err.trim().lines();
    let warning = lines.next().unwrap_or_default();
    assert!(
        warning.contains("WARN")
            && warning.contains("readable by other users")
            && warning.contains(&db.display().to_string())
            && warning.contains("rotate"),
        "no exposure warning first: {err}"
    );
    let rest = Output {
        status: out.status,
        stdout: out.stdout.clone(),
        stderr: lines.collect::<Vec<_>>().join("\n").into_bytes(),
    };
    assert_clean_error(&rest, "edge.redb");
    assert!(!rest.stderr.starts_with(b"\x1b") && rest.stderr.starts_with(b"edge-node: "));
    assert_eq!(
        std::fs::metadata(&db)
            .map(|m| m.permissions().mode() & 0o777)
            .ok(),
        Some(0o600),
        "the store was not made owner-only"
    );
    // Now owner-only: the next attempt gets the one-line error alone.
    let out = edge(&["--data", d, "status", "--json"]);
    assert_clean_error(&out, "edge.redb");
    // Nothing was overwritten.
    assert_eq!(std::fs::read(&db).unwrap_or_default(), vec![0x5a; 10_000]);
}

#[test]
fn check_code_diagnoses_without_a_store() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ring = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/qr-token-v1-vectors.json");
    let vectors: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ring).unwrap_or_default()).unwrap_or_default();
    let keyring = tmp.path().join("keyring.json");
    std::fs::write(&keyring, vectors["keyring"].to_string()).unwrap_or_default();
    let k = keyring.to_str().unwrap_or_default();
    let d = tmp.path().join("none");
    let d = d.to_str().unwrap_or_default();
    for v in vectors["vectors"].as_array().into_iter().flatten() {
        let now = v["now"].as_u64().unwrap_or(0).to_string();
        let payload = v["payload"].as_str().unwrap_or_default();
        let out = edge(&[
            "--data",
            d,
            "check-code",
            "--keyring",
            k,
            "--now",
            &now,
            "--json",
            "--",
            payload,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert_eq!(line["verdict"], v["verdict"], "vector {}", v["name"]);
    }
    assert_clean_error(
        &edge(&[
            "--data",
            d,
            "check-code",
            "--keyring",
            "/missing.json",
            "KP1:",
        ]),
        "cannot read keyring",
    );
}
