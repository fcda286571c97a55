//! The offline check-in path end to end through the real binaries: enrollment, scans with
//! every verdict a visitor can meet, duplicates across restarts, the paper log, status,
//! retention, and nothing readable at rest.

use anyhow::Result;
use serde_json::Value;
use tests::fixture::{self, HubFixture, code_frame, run, run_ok};
use tests::frames::{Damage, encode_png, frame};

fn lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
        .collect()
}

#[test]
fn check_in_verdicts_duplicates_paper_and_status() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("north-gate")?;
    let d = dev.display().to_string();
    let tmp = tempfile::tempdir()?;
    let now = fixture::now();

    let (fresh, _, _) = code_frame(tmp.path(), "fresh", now)?;
    let (old, _, _) = code_frame(tmp.path(), "old", now - 120)?;
    let url = tmp.path().join("url.png");
    std::fs::write(
        &url,
        encode_png(&frame("https://example.com/menu", Damage::ByteMode, 1)?)?,
    )?;
    let blank = tmp.path().join("blank.png");
    std::fs::write(
        &blank,
        encode_png(&image::GrayImage::from_pixel(640, 480, image::Luma([200])))?,
    )?;

    let out = run_ok(
        "edge-node",
        &[
            "--data",
            &d,
            "scan",
            "--json",
            fresh.to_str().unwrap_or_default(),
            old.to_str().unwrap_or_default(),
            url.to_str().unwrap_or_default(),
            blank.to_str().unwrap_or_default(),
            fresh.to_str().unwrap_or_default(),
        ],
    )?;
    let v = lines(&out);
    let verdicts: Vec<&str> = v
        .iter()
        .map(|l| l["verdict"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        verdicts,
        ["accepted", "expired", "malformed", "no_code", "duplicate"],
        "{out}"
    );
    assert!(
        v[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("인증되었습니다")
    );
    assert!(
        v[2]["message"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("not a check-in code")
    );

    // Still a duplicate in a new process: the seen-token memory is durable.
    let out = run_ok(
        "edge-node",
        &[
            "--data",
            &d,
            "scan",
            "--json",
            fresh.to_str().unwrap_or_default(),
        ],
    )?;
    assert_eq!(lines(&out)[0]["verdict"], "duplicate");

    // Paper log: refused without both consents, stored with them.
    let refused = run(
        "edge-node",
        &[
            "--data",
            &d,
            "paper",
            "add",
            "--name",
            "Hong Gildong",
            "--phone",
            "010-1234-5678",
            "--consent-collect",
        ],
    )?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("consent"));
    let minor = run(
        "edge-node",
        &[
            "--data",
            &d,
            "paper",
            "add",
            "--name",
            "Kim Minor",
            "--phone",
            "010-2222-3333",
            "--consent-collect",
            "--consent-share",
            "--minor",
        ],
    )?;
    assert!(!minor.status.success());
    run_ok(
        "edge-node",
        &[
            "--data",
            &d,
            "paper",
            "add",
            "--name",
            "Hong Gildong",
            "--phone",
            "010-1234-5678",
            "--consent-collect",
            "--consent-share",
            "--remarks",
            "wheelchair",
        ],
    )?;

    let s: Value =
        serde_json::from_str(run_ok("edge-node", &["--data", &d, "status", "--json"])?.trim())?;
    assert_eq!(s["records"], 2);
    assert_eq!(s["unsynced"], 2);
    assert_eq!(s["last_sync"], Value::Null);
    assert_eq!(s["facility_id"], hub.facility.as_str());
    assert!(s["day_keys_left"].as_u64().unwrap_or(0) >= 35);

    // The hub can open what the device stored: one QR visit, one paper entry.
    let records = fixture::stored_records(&dev, &hub.data)?;
    assert_eq!(records.len(), 2);
    assert_eq!(fixture::qr_tokens(&records).len(), 1);

    // Retention: 29 days on, the partition is gone (it is unsynced, so one more day of grace).
    let later = (now + 30 * 86_400).to_string();
    let p: Value = serde_json::from_str(
        run_ok(
            "edge-node",
            &["--data", &d, "purge", "--as-of", &later, "--json"],
        )?
        .trim(),
    )?;
    assert_eq!(p["dropped"].as_array().map(Vec::len), Some(1), "{p}");
    let s: Value =
        serde_json::from_str(run_ok("edge-node", &["--data", &d, "status", "--json"])?.trim())?;
    assert_eq!(s["records"], 0);
    // An --as-of in the past keeps nothing longer.
    run_ok("edge-node", &["--data", &d, "purge", "--as-of", "0"])?;
    Ok(())
}

#[test]
fn nothing_readable_at_rest() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("south-gate")?;
    let d = dev.display().to_string();
    let tmp = tempfile::tempdir()?;
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    // Six batches of 50, each issued just before it is scanned, so none expires meanwhile.
    for batch in 0..6 {
        let now = fixture::now();
        let mut paths = Vec::new();
        for i in 0..50 {
            let (p, payload, token) = code_frame(tmp.path(), &format!("c{batch}-{i}"), now)?;
            paths.push(p.display().to_string());
            secrets.push(token.to_vec());
            secrets.push(hex::encode(token).into_bytes());
            secrets.push(hex::encode_upper(token).into_bytes());
            secrets.push(payload.clone().into_bytes());
            // The base45 part alone, and a run of it.
            secrets.push(payload.as_bytes()[4..].to_vec());
            secrets.push(payload.as_bytes()[40..80].to_vec());
        }
        let mut args = vec!["--data", &d, "scan", "--json"];
        args.extend(paths.iter().map(String::as_str));
        let out = run_ok("edge-node", &args)?;
        assert_eq!(out.matches("\"accepted\"").count(), 50, "{out}");
    }
    for i in 0..20 {
        let name = format!("Visitor Name{i:02}");
        let phone = format!("010-9{i:03}-7{i:03}");
        run_ok(
            "edge-node",
            &[
                "--data",
                &d,
                "paper",
                "add",
                "--name",
                &name,
                "--phone",
                &phone,
                "--consent-collect",
                "--consent-share",
            ],
        )?;
        secrets.push(name.into_bytes());
        secrets.push(phone.clone().into_bytes());
        secrets.push(phone.replace('-', "").into_bytes());
    }
    let hay = fixture::all_bytes_below(&dev)?;
    for s in &secrets {
        assert!(
            !fixture::contains(&hay, s),
            "found {:?} in the device folder",
            String::from_utf8_lossy(s)
        );
    }
    // And yet everything is there for the hub.
    let records = fixture::stored_records(&dev, &hub.data)?;
    assert_eq!(records.len(), 320);
    Ok(())
}

/// Check-ins wait as pending rows and fold into the partition as one automerge change when a
/// sync starts; the fold is durable, idempotent, and loses nothing.
#[test]
fn check_ins_fold_into_one_change_per_sync_round() -> Result<()> {
    use edge_node::device::Device;
    use tests::fixture::{check_in_codes, qr_tokens, stored_records};
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("fold-gate")?;
    let tokens = check_in_codes(&dev, 40)?;
    let pending_rows = |dev: &std::path::Path| -> Result<usize> {
        let d = Device::open(dev)?;
        let mut n = 0;
        for day in d.store().pending_days()? {
            n += d.store().pending(day)?.len();
        }
        Ok(n)
    };
    // 40 records and one wrapped session key, nothing in the document yet.
    assert_eq!(pending_rows(&dev)?, 41);
    let mut before = qr_tokens(&stored_records(&dev, &hub.data)?);
    before.sort();
    let mut expected = tokens.clone();
    expected.sort();
    assert_eq!(
        before, expected,
        "pending check-ins are part of the stored log"
    );

    let now = fixture::now();
    let day = shared::Day::of(now);
    {
        let mut d = Device::open(&dev)?;
        let changes_before = d.partition(day)?.doc().get_changes(&[]).len();
        assert_eq!(changes_before, 0);
        d.preload(now)?;
        let p = d.partition(day)?;
        assert_eq!(p.record_count(), 40);
        assert_eq!(
            p.doc().get_changes(&[]).len(),
            1,
            "40 check-ins and their session key fold into one change"
        );
        assert_eq!(d.fold_pending()?, 0, "a second fold has nothing to do");
        let status = d.status(now)?;
        assert_eq!((status.records, status.unsynced), (40, 40));
    }
    assert_eq!(pending_rows(&dev)?, 0);
    // Reopened from disk: the folded change was stored.
    let mut after = qr_tokens(&stored_records(&dev, &hub.data)?);
    after.sort();
    assert_eq!(after, expected);

    // More check-ins after the fold, then another round: one more change.
    check_in_codes(&dev, 5)?;
    let mut d = Device::open(&dev)?;
    d.preload(fixture::now())?;
    let p = d.partition(day)?;
    assert_eq!(p.record_count(), 45);
    assert_eq!(p.doc().get_changes(&[]).len(), 2);
    Ok(())
}
