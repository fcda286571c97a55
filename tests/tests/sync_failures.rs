//! Failures are failures: a hub that cannot read its registry refuses the session with an
//! internal error instead of sending the device an empty keyring (review: every visitor was
//! then "unknown issuer" until the device's next good sync).

use anyhow::{Result, bail};
use redb::{Database, TableDefinition};
use tests::fixture::{HubFixture, check_in_codes, sync_once};

/// The hub's settings table (`docs/storage.md`): JSON values under names.
const CONFIG: TableDefinition<&str, &[u8]> = TableDefinition::new("config-1");

#[test]
fn an_unreadable_keyring_at_the_hub_refuses_the_session_and_the_device_keeps_its_own() -> Result<()>
{
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("north")?;
    check_in_codes(&dev, 1)?;
    // The hub's stored keyring becomes unreadable (a damaged page, a bad upgrade).
    {
        let db = Database::open(hub.data.join("hub.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(CONFIG)?
            .insert("keyring", b"{not json".as_slice())?;
        txn.commit()?;
    }
    let mut proc = hub.start()?;
    let out = sync_once(&dev, &[])?;
    proc.kill();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !text.contains("cannot read its registry") {
        bail!("the session was not refused with the hub's reason: {text}");
    }
    // The device still trusts its issuer: visitors are still accepted.
    check_in_codes(&dev, 1)?;
    let status = tests::fixture::device_status(&dev)?;
    if status["unsynced"].as_u64() != Some(2) {
        bail!("nothing should count as delivered: {status}");
    }
    Ok(())
}
