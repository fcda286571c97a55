//! Retention at both ends, through the real binaries: 28 days and a partition on, traces
//! find nothing, neither data folder holds anything decryptable from that day, and a device
//! that kept the partition cannot bring it back.

use anyhow::Result;
use tests::fixture::{self, HubFixture, check_in_codes, device_status, run_ok, sync_once};

#[test]
fn purge_destroys_every_readable_copy_and_expired_partitions_stay_out() -> Result<()> {
    let hub = HubFixture::new()?;
    let f = hub.facility.clone();
    let synced = hub.enroll_device_for(&f, "synced")?;
    let kept = hub.enroll_device_for(&f, "kept")?;
    let tokens = check_in_codes(&synced, 6)?;
    let late = check_in_codes(&kept, 3)?;
    {
        let _h = hub.start()?;
        let out = sync_once(&synced, &[])?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(hub.records_of(&f)?, 6);
        assert_eq!(
            hub.trace(&tokens[0])?["visits"].as_array().map(Vec::len),
            Some(1)
        );
    }

    // 28 days and one partition on, at the hub and at the synced device.
    let later = (fixture::now() + 29 * 86_400).to_string();
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
    let p: serde_json::Value = serde_json::from_str(p.trim())?;
    assert!(p["partitions"].as_u64().unwrap_or(0) >= 1, "{p}");
    run_ok(
        "edge-node",
        &[
            "--data",
            synced.to_str().unwrap_or_default(),
            "purge",
            "--as-of",
            &later,
        ],
    )?;

    // Traces find nothing; the counts are gone.
    for t in &tokens {
        assert_eq!(hub.trace(t)?["visits"].as_array().map(Vec::len), Some(0));
    }
    assert_eq!(hub.records_of(&f)?, 0);
    assert_eq!(device_status(&synced)?["records"], 0);

    // The day secret is destroyed: the device that kept its partition holds only ciphertext
    // that nothing can open any more, and the hub's files hold no token.
    let ratchet = sync_hub::keys::KeyDir::new(&hub.data).ratchet()?;
    assert!(ratchet.secret(shared::Day::of(fixture::now())).is_none());
    let err = fixture::stored_records(&kept, &hub.data)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("destroyed") || err.contains("does not open"),
        "{err}"
    );
    let hay = fixture::all_bytes_below(&hub.data)?;
    for t in tokens.iter().chain(&late) {
        assert!(!fixture::contains(&hay, t));
        assert!(!fixture::contains(&hay, hex::encode(t).as_bytes()));
    }

    // The device that kept the partition syncs: the hub refuses it, nothing comes back.
    let _h = hub.start()?;
    let _ = sync_once(&kept, &[])?;
    assert_eq!(hub.records_of(&f)?, 0);
    for t in &late {
        assert_eq!(hub.trace(t)?["visits"].as_array().map(Vec::len), Some(0));
    }
    Ok(())
}
