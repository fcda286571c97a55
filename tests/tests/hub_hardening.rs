//! The hub's retention and trace limits through the real binaries: a people credential cannot
//! move retention ahead of the hub's clock (an operator's, or the one a metrics scrape holds),
//! only the local operator can and by at most 400 days, every purge asked for is audited, and a
//! trace's contact window is at most 12 hours.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::Path;
use tests::fixture::{self, HubFixture, check_in_codes, run, run_ok, sync_once};
use tests::people::Api;

const DAY: u64 = 86_400;

/// `sync-hub credential add`; returns (id, secret).
fn credential(hub: &HubFixture, role: &str, name: &str) -> Result<(String, String)> {
    let out = run_ok(
        "sync-hub",
        &[
            "--data",
            &hub.data_str(),
            "credential",
            "add",
            "--role",
            role,
            "--name",
            name,
            "--json",
        ],
    )?;
    let v: Value = serde_json::from_str(out.trim())?;
    let id = v["credential_id"]
        .as_str()
        .context(format!("no credential id in {v}"))?;
    let secret = v["secret"].as_str().context("no secret")?;
    Ok((id.to_owned(), secret.to_owned()))
}

/// The running hub's HTTP address, from its run file.
fn http_base(data: &Path) -> Result<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(data.join("run.json"))?)?;
    Ok(format!(
        "http://{}",
        v["http"].as_str().context("run.json has no http")?
    ))
}

/// Whether the hub still holds today's day secret.
fn holds_todays_secret(hub: &HubFixture) -> Result<bool> {
    let ratchet = sync_hub::keys::KeyDir::new(&hub.data).ratchet()?;
    Ok(ratchet.secret(shared::Day::of(fixture::now())).is_some())
}

/// The audit log's `retention.purge` entries, oldest first (`sync-hub audit --json`).
fn purge_entries(hub: &HubFixture) -> Result<Vec<Value>> {
    let out = run_ok("sync-hub", &["--data", &hub.data_str(), "audit", "--json"])?;
    let mut entries = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let e: Value = serde_json::from_str(line)?;
        if e["action"] == "retention.purge" {
            entries.push(e);
        }
    }
    Ok(entries)
}

fn sync_ok(dev: &Path) -> Result<()> {
    let out = sync_once(dev, &[])?;
    if !out.status.success() {
        bail!("sync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[test]
fn only_the_local_operator_moves_retention_ahead_and_every_purge_is_audited() -> Result<()> {
    let hub = HubFixture::new()?;
    let f = hub.facility.clone();
    let dev = hub.enroll_device("gate")?;
    let (operator_id, operator) = credential(&hub, "operator", "prometheus scrape")?;
    check_in_codes(&dev, 3)?;
    let now = fixture::now();
    let absurd = 350_000_000_000u64.to_string();
    let later = (now + 29 * DAY).to_string();
    let further = (now + 60 * DAY).to_string();

    // A typo in --as-of is refused before anything is destroyed, with the run stopped too.
    let out = run(
        "sync-hub",
        &["--data", &hub.data_str(), "purge", "--as-of", &absurd],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("at most 400 days"), "{err}");

    {
        let _run = hub.start()?;
        let api = Api::new(&http_base(&hub.data)?);
        sync_ok(&dev)?;
        assert_eq!(hub.records_of(&f)?, 3);

        // A people credential asks for retention far ahead (year ~11 million), or just past
        // the partition's expiry: refused, nothing destroyed.
        for as_of in [350_000_000_000u64, now + 29 * DAY] {
            let a = api.call(
                "POST",
                "/api/purge",
                Some(&operator),
                Some(&json!({ "as_of": as_of }).to_string()),
            )?;
            assert_eq!(a.status, 400, "{}", a.text);
            assert!(
                a.json()["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("hub's own clock"),
                "{}",
                a.text
            );
        }
        assert_eq!(hub.records_of(&f)?, 3);
        assert!(holds_todays_secret(&hub)?);
        // Later visits still sync.
        check_in_codes(&dev, 2)?;
        sync_ok(&dev)?;
        assert_eq!(hub.records_of(&f)?, 5);

        // At the hub's own clock the credential may purge; that is audited under its id.
        let a = api.call("POST", "/api/purge", Some(&operator), Some("{}"))?;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(hub.records_of(&f)?, 5);

        // The local operator's absurd --as-of through the running hub: refused.
        let out = run(
            "sync-hub",
            &["--data", &hub.data_str(), "purge", "--as-of", &absurd],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("at most 400 days"), "{err}");
        assert_eq!(hub.records_of(&f)?, 5);

        // Within the cap it fast-forwards: 29 days on, today's visits are gone.
        let p = run_ok(
            "sync-hub",
            &[
                "--data",
                &hub.data_str(),
                "purge",
                "--as-of",
                &later,
                "--json",
            ],
        )?;
        let p: Value = serde_json::from_str(p.trim())?;
        assert!(p["partitions"].as_u64().unwrap_or(0) >= 1, "{p}");
        assert_eq!(hub.records_of(&f)?, 0);
    }

    // With the run stopped, the command fast-forwards further within the cap.
    run_ok(
        "sync-hub",
        &["--data", &hub.data_str(), "purge", "--as-of", &further],
    )?;
    assert!(!holds_todays_secret(&hub)?);

    // Every purge that ran is in the audit log, with who asked; the refused ones are not.
    let entries = purge_entries(&hub)?;
    let by = |id: &str| {
        entries
            .iter()
            .filter(|e| e["actor"]["id"] == id)
            .collect::<Vec<_>>()
    };
    assert_eq!(by(&operator_id).len(), 1, "{entries:?}");
    let local = by("local-operator");
    assert_eq!(local.len(), 2, "{entries:?}");
    // An entry's details expire with retention; while kept, they say what was asked.
    for (e, asked) in local.iter().zip([&later, &further]) {
        if let Some(t) = e["detail"]["as_of"].as_u64() {
            assert_eq!(t.to_string(), *asked, "{e}");
        }
    }
    Ok(())
}

#[test]
fn a_trace_window_of_days_is_refused() -> Result<()> {
    let hub = HubFixture::new()?;
    let (_, authority) = credential(&hub, "authority", "Mapo health centre")?;
    let token = hex::encode([7u8; 16]);
    // The command line, with the run stopped.
    let out = run(
        "sync-hub",
        &[
            "--data",
            &hub.data_str(),
            "trace",
            "--token",
            &token,
            "--window-minutes",
            &(7 * 24 * 60).to_string(),
            "--json",
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("720 minutes"), "{err}");

    let _run = hub.start()?;
    let api = Api::new(&http_base(&hub.data)?);
    let body = |window: u64| {
        json!({"tokens": [token], "case": "case-7", "purpose": "contact tracing",
               "window_minutes": window})
        .to_string()
    };
    let a = api.call(
        "POST",
        "/api/trace",
        Some(&authority),
        Some(&body(7 * 24 * 60)),
    )?;
    assert_eq!(a.status, 400, "{}", a.text);
    assert!(a.text.contains("720 minutes"), "{}", a.text);
    let a = api.call("POST", "/api/trace", Some(&authority), Some(&body(720)))?;
    assert_eq!(a.status, 200, "{}", a.text);
    Ok(())
}
