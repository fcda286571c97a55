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

// Revocations survive someone who can write `hub.redb` but not `keys/` (security review,
// finding 2): a revoked credential's or device's row restored to its pre-revocation bytes
// does not let it back in, and deleting the revocation list's rows refuses everyone.

mod revocation {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    use shared::facility::Registration;
    use std::path::{Path, PathBuf};
    use sync_hub::Hub;
    use sync_hub::auth::{self, AuthError, PEOPLE_CREDENTIALS, Role};
    use sync_hub::registry::DEVICES;

    const NOW: u64 = 1_750_000_000;

    fn init(tmp: &tempfile::TempDir) -> (PathBuf, Hub) {
        let dir = tmp.path().join("hub");
        let hub = Hub::init(&dir, "suwon", None, vec![], None, NOW)
            .unwrap_or_else(|e| panic!("init: {e}"))
            .hub;
        (dir, hub)
    }

    fn open(dir: &Path) -> Hub {
        Hub::open(dir).unwrap_or_else(|e| panic!("open: {e}"))
    }

    fn row(dir: &Path, table: TableDefinition<&str, &[u8]>, key: &str) -> Vec<u8> {
        let db = redb::Database::open(dir.join("hub.redb")).unwrap_or_else(|e| panic!("{e}"));
        let txn = db.begin_read().unwrap_or_else(|e| panic!("{e}"));
        let t = txn.open_table(table).unwrap_or_else(|e| panic!("{e}"));
        let v = t.get(key).unwrap_or_else(|e| panic!("{e}"));
        v.unwrap_or_else(|| panic!("no row {key}")).value().to_vec()
    }

    /// Writes `bytes` back as `key`'s row, with redb, while no hub holds the file.
    fn restore(dir: &Path, table: TableDefinition<&str, &[u8]>, key: &str, bytes: &[u8]) {
        let db = redb::Database::open(dir.join("hub.redb")).unwrap_or_else(|e| panic!("{e}"));
        let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(table)
            .unwrap_or_else(|e| panic!("{e}"))
            .insert(key, bytes)
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Deletes every row of the table named `name` (keys u64), with redb.
    fn clear_u64_table(dir: &Path, name: &str) {
        let def: TableDefinition<u64, &[u8]> = TableDefinition::new(name);
        let db = redb::Database::open(dir.join("hub.redb")).unwrap_or_else(|e| panic!("{e}"));
        let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
        {
            let mut t = txn.open_table(def).unwrap_or_else(|e| panic!("{e}"));
            let keys: Vec<u64> = t
                .iter()
                .unwrap_or_else(|e| panic!("{e}"))
                .filter_map(|r| r.ok().map(|(k, _)| k.value()))
                .collect();
            assert!(!keys.is_empty(), "{name} holds no rows");
            for k in keys {
                t.remove(k).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn a_revoked_credential_restored_to_its_old_row_is_still_refused() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (dir, hub) = init(&tmp);
        let (rec, secret) = auth::issue(hub.store(), Role::Authority, None, "kdca", NOW)
            .unwrap_or_else(|e| panic!("issue: {e}"));
        assert!(auth::authenticate(hub.store(), Some(&secret.0), "op").is_ok());
        drop(hub);
        let before = row(&dir, PEOPLE_CREDENTIALS, &rec.id);
        let hub = open(&dir);
        auth::revoke(hub.store(), &rec.id, NOW + 1).unwrap_or_else(|e| panic!("revoke: {e}"));
        drop(hub);

        // The row as it was before the revocation, written back with redb.
        restore(&dir, PEOPLE_CREDENTIALS, &rec.id, &before);
        let hub = open(&dir);
        match auth::authenticate(hub.store(), Some(&secret.0), "op") {
            Err(AuthError::Revoked) => {}
            other => panic!("a restored revoked credential authenticated: {other:?}"),
        }
    }

    #[test]
    fn deleting_the_revocation_list_refuses_every_credential() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (dir, hub) = init(&tmp);
        let (gone, gone_secret) = auth::issue(hub.store(), Role::Authority, None, "old", NOW)
            .unwrap_or_else(|e| panic!("issue: {e}"));
        let (_, kept) = auth::issue(hub.store(), Role::Operator, None, "ops", NOW)
            .unwrap_or_else(|e| panic!("issue: {e}"));
        drop(hub);
        let before = row(&dir, PEOPLE_CREDENTIALS, &gone.id);
        let hub = open(&dir);
        auth::revoke(hub.store(), &gone.id, NOW + 1).unwrap_or_else(|e| panic!("revoke: {e}"));
        drop(hub);

        // Restore the old row and delete the list's rows too.
        restore(&dir, PEOPLE_CREDENTIALS, &gone.id, &before);
        clear_u64_table(&dir, "revocations-1");
        let hub = open(&dir);
        for secret in [&gone_secret.0, &kept.0] {
            match auth::authenticate(hub.store(), Some(secret), "op") {
                Err(e) => {
                    let text = e.to_string();
                    assert!(text.contains("revocation list"), "{text}");
                    assert_eq!(e.status(), 500, "{text}");
                }
                Ok(p) => panic!("{} authenticated with the list deleted", p.name),
            }
        }
        // The local operator (keys/operator.token) still gets in, to repair.
        assert!(auth::authenticate(hub.store(), Some("op"), "op").is_ok_and(|p| p.local));
    }

    fn facility_and_device(hub: &Hub) -> (String, shared::DeviceId) {
        let reg = Registration {
            name: "Hall A".into(),
            business_number: None,
            representative: "Lee".into(),
            phone: "031-000-0000".into(),
            category: "wedding_hall".into(),
            region: "suwon".into(),
            address: "2 Gwanggyo-ro".into(),
        };
        let f = hub
            .add_facility(reg, NOW)
            .unwrap_or_else(|e| panic!("add: {e}"));
        hub.approve_facility(f.id.as_str())
            .unwrap_or_else(|e| panic!("approve: {e}"));
        let t = hub
            .enroll(f.id.as_str(), "gate", NOW)
            .unwrap_or_else(|e| panic!("enroll: {e}"));
        (f.id.to_string(), t.device_id)
    }

    fn device_check(hub: &Hub, id: &shared::DeviceId) -> Result<(), AuthError> {
        let rec = hub
            .store()
            .device(id)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no device {id}"));
        auth::check_device(hub.store(), &rec)
    }

    #[test]
    fn a_revoked_device_restored_to_its_old_row_is_still_refused() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (dir, hub) = init(&tmp);
        let (facility, device) = facility_and_device(&hub);
        let (_, other) = facility_and_device(&hub);
        assert!(device_check(&hub, &device).is_ok());
        drop(hub);
        let before = row(&dir, DEVICES, device.as_str());
        let hub = open(&dir);
        // Removing the facility (an officer's act through the desk) revokes its devices.
        let ledger = sync_hub::ledger::Ledger::open(hub.store(), hub.keys())
            .unwrap_or_else(|e| panic!("{e}"));
        let desk = sync_hub::people::Desk::new(&hub, &ledger, NOW + 1);
        let officer = auth::Principal {
            id: "cred_0011223344556677".into(),
            name: "kim".into(),
            role: Role::Officer,
            region: Some("suwon".into()),
            local: false,
        };
        desk.remove(&officer, &facility, "closed")
            .unwrap_or_else(|e| panic!("remove: {e}"));
        drop(ledger);
        drop(hub);

        restore(&dir, DEVICES, device.as_str(), &before);
        let hub = open(&dir);
        assert!(
            !hub.store()
                .device(&device)
                .ok()
                .flatten()
                .is_some_and(|d| d.revoked),
            "the restored row says not revoked"
        );
        assert!(matches!(
            device_check(&hub, &device),
            Err(AuthError::Revoked)
        ));
        assert!(
            device_check(&hub, &other).is_ok(),
            "another device is admitted"
        );
        drop(hub);

        // Its revocation row deleted as well: every device is refused, with a clear error.
        clear_u64_table(&dir, "revocations-1");
        let hub = open(&dir);
        for id in [&device, &other] {
            let e = device_check(&hub, id)
                .err()
                .unwrap_or_else(|| panic!("{id} admitted"));
            assert!(e.to_string().contains("revocation list"), "{e}");
        }
    }

    #[test]
    fn a_store_made_before_the_list_gets_its_revocations_listed_once() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (dir, hub) = init(&tmp);
        let (_, device) = facility_and_device(&hub);
        let (rec, secret) = auth::issue(hub.store(), Role::Authority, None, "kdca", NOW)
            .unwrap_or_else(|e| panic!("issue: {e}"));
        drop(hub);
        let device_before = row(&dir, DEVICES, device.as_str());
        let cred_before = row(&dir, PEOPLE_CREDENTIALS, &rec.id);
        let hub = open(&dir);
        auth::revoke(hub.store(), &rec.id, NOW + 1).unwrap_or_else(|e| panic!("revoke: {e}"));
        {
            // Device revocation is the local operator's act at the desk (the permission table).
            let ledger = sync_hub::ledger::Ledger::open(hub.store(), hub.keys())
                .unwrap_or_else(|e| panic!("{e}"));
            sync_hub::people::Desk::new(&hub, &ledger, NOW + 1)
                .revoke_device(
                    &sync_hub::auth::Principal::local_operator(),
                    device.as_str(),
                )
                .unwrap_or_else(|e| panic!("revoke device: {e}"));
        }
        drop(hub);
        // As the previous code left it: no list, no head file; the rows say revoked.
        {
            let db = redb::Database::open(dir.join("hub.redb")).unwrap_or_else(|e| panic!("{e}"));
            let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
            txn.delete_table(auth::REVOCATIONS)
                .unwrap_or_else(|e| panic!("{e}"));
            txn.commit().unwrap_or_else(|e| panic!("{e}"));
        }
        let _ = std::fs::remove_file(dir.join("keys").join("revocations.head"));

        let hub = open(&dir);
        let list = auth::revocations(hub.store()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(list.len(), 2);
        assert!(list.contains(auth::Revoked::Device, device.as_str()));
        assert!(list.contains(auth::Revoked::Credential, &rec.id));
        assert!(dir.join("keys").join("revocations.head").exists());
        drop(hub);

        restore(&dir, DEVICES, device.as_str(), &device_before);
        restore(&dir, PEOPLE_CREDENTIALS, &rec.id, &cred_before);
        let hub = open(&dir);
        assert!(matches!(
            device_check(&hub, &device),
            Err(AuthError::Revoked)
        ));
        assert!(matches!(
            auth::authenticate(hub.store(), Some(&secret.0), "op"),
            Err(AuthError::Revoked)
        ));
    }
}
