//! Tampering with `hub.redb` alone (security review, findings 3 and 7b): the audit chain and
//! the people's credentials are keyed with secrets in `keys/`, so someone who can write the
//! database but not read the key folder can neither rewrite the audit log nor make a working
//! credential; and audit details expire with the 28-day retention while the chain verifies.
//!
//! Each attack is written the way it worked against the unkeyed layout (the old hash and
//! digest algorithms, computed here), straight into the database file with redb while no hub
//! holds it, and the real `sync-hub` binary judges the result.

use anyhow::{Context, Result, bail};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde_json::{Value, json};
use shared::time::{DAY_SECONDS, UnixSeconds};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use sync_hub::Hub;
use sync_hub::audit::{AUDIT, Event};
use sync_hub::auth::{self, AuthError, Principal, Role};

/// The unkeyed layout's credential table and digest context.
const PEOPLE_CREDENTIALS_V1: TableDefinition<&str, &[u8]> =
    TableDefinition::new("people-credentials-1");

fn hub_in(tmp: &tempfile::TempDir) -> Result<(PathBuf, Hub)> {
    let dir = tmp.path().join("hub");
    let hub = Hub::init(&dir, "suwon", None, vec![], None, sync_hub::clock::now())?.hub;
    Ok((dir, hub))
}

fn sync_hub(dir: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_sync-hub"))
        .arg("--data")
        .arg(dir)
        .args(args)
        .env_remove("SYNC_HUB_DATA")
        .env_remove("KIPASS_CLOCK_OFFSET")
        .output()?)
}

/// `sync-hub audit --verify`: Ok(stdout) if it says the chain holds, Err(stderr) if not.
fn verify(dir: &Path) -> Result<std::result::Result<String, String>> {
    let out = sync_hub(dir, &["audit", "--verify"])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    Ok(if out.status.success() {
        Ok(stdout)
    } else {
        Err(stderr)
    })
}

fn trace_event(case: &str, facility: &str) -> Event {
    let mut e = Event::new("trace", json!({ "tokens": 1 })).facilities([facility]);
    e.case_id = Some(case.to_owned());
    e.purpose = Some("outbreak".to_owned());
    e
}

/// The previous code's hashed part of an entry (field order as it serialised them).
#[derive(Serialize)]
struct OldActor {
    id: String,
    name: String,
    role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
}

#[derive(Serialize)]
struct OldEvent {
    action: String,
    case_id: Option<String>,
    purpose: Option<String>,
    region: Option<String>,
    facilities: Vec<String>,
    detail: Value,
}

#[derive(Serialize)]
struct OldHashed {
    seq: u64,
    at: u64,
    actor: OldActor,
    event: OldEvent,
    prev: String,
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// The previous code's entry hash: BLAKE3 in derive-key mode, no secret.
fn old_hash(e: &Value) -> Result<String> {
    let body = OldHashed {
        seq: e["seq"].as_u64().context("seq")?,
        at: e["at"].as_u64().context("at")?,
        actor: OldActor {
            id: text(&e["actor"]["id"]).unwrap_or_default(),
            name: text(&e["actor"]["name"]).unwrap_or_default(),
            role: text(&e["actor"]["role"]).unwrap_or_default(),
            region: text(&e["actor"]["region"]),
        },
        event: OldEvent {
            action: text(&e["action"]).unwrap_or_default(),
            case_id: text(&e["case_id"]),
            purpose: text(&e["purpose"]),
            region: text(&e["region"]),
            facilities: serde_json::from_value(e["facilities"].clone()).unwrap_or_default(),
            detail: e["detail"].clone(),
        },
        prev: text(&e["prev"]).unwrap_or_default(),
    };
    let mut h = blake3::Hasher::new_derive_key("kipass hub audit entry v1");
    h.update(&serde_json::to_vec(&body)?);
    Ok(h.finalize().to_hex().to_string())
}

fn rows(db: &redb::Database) -> Result<Vec<Value>> {
    let txn = db.begin_read()?;
    let t = txn.open_table(AUDIT)?;
    let mut out = Vec::new();
    for row in t.iter()? {
        out.push(serde_json::from_slice(row?.1.value())?);
    }
    Ok(out)
}

/// Four entries: a credential change and three traces with case ids.
fn four_entries(hub: &Hub) -> Result<()> {
    let now = sync_hub::clock::now();
    let who = Principal::local_operator();
    hub.audit().append(
        &who,
        Event::new("credential.add", json!({ "credential": "cred_1" })),
        now,
    )?;
    for (i, case) in ["case-1", "case-2", "case-3"].into_iter().enumerate() {
        hub.audit()
            .append(&who, trace_event(case, "fac_a"), now + i as u64)?;
    }
    Ok(())
}

#[test]
fn an_entry_edited_relinked_and_followed_by_one_more_is_reported() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (dir, hub) = hub_in(&tmp)?;
    four_entries(&hub)?;
    drop(hub);
    assert!(verify(&dir)?.is_ok(), "an untouched log verifies");

    // Who ran trace 1 is rewritten, every hash from there on recomputed, and one entry appended
    // (so the table holds more entries than the head file, which the old check let pass).
    let db = redb::Database::open(dir.join("hub.redb"))?;
    let mut entries = rows(&db)?;
    entries[1]["actor"]["name"] = json!("someone else");
    let mut extra = entries[3].clone();
    extra["seq"] = json!(4);
    extra["case_id"] = json!("case-4");
    entries.push(extra);
    let txn = db.begin_write()?;
    {
        let mut t = txn.open_table(AUDIT)?;
        for i in 1..entries.len() {
            let prev = entries[i - 1]["hash"].clone();
            entries[i]["prev"] = prev;
            let hash = old_hash(&entries[i])?;
            entries[i]["hash"] = json!(hash);
            t.insert(i as u64, serde_json::to_vec(&entries[i])?.as_slice())?;
        }
    }
    txn.commit()?;
    drop(db);

    let Err(err) = verify(&dir)? else {
        bail!("a relinked chain verified");
    };
    assert!(err.contains("entry 1") && err.contains("edited"), "{err}");
    Ok(())
}

#[test]
fn entries_cut_off_the_end_with_the_head_file_rewritten_to_match_are_reported() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (dir, hub) = hub_in(&tmp)?;
    four_entries(&hub)?;
    drop(hub);

    // The last two entries go, and the head file is made to name what is left: its count
    // and its last hash (both readable in the database), everything else in it kept.
    let db = redb::Database::open(dir.join("hub.redb"))?;
    let entries = rows(&db)?;
    let txn = db.begin_write()?;
    {
        let mut t = txn.open_table(AUDIT)?;
        t.remove(2)?;
        t.remove(3)?;
    }
    txn.commit()?;
    drop(db);
    let head = dir.join("keys").join("audit.head");
    let was = std::fs::read_to_string(&head)?;
    let last = text(&entries[3]["hash"]).context("hash")?;
    let kept = text(&entries[1]["hash"]).context("hash")?;
    let words: Vec<String> = was
        .split_whitespace()
        .map(|w| match w {
            "4" => "2".to_owned(),
            w if w == last => kept.clone(),
            w => w.to_owned(),
        })
        .collect();
    assert!(
        words.contains(&kept),
        "the head file named the last hash: {was}"
    );
    std::fs::write(&head, words.join(" ") + "\n")?;

    let Err(err) = verify(&dir)? else {
        bail!("a chain cut short, with a head file to match, verified");
    };
    assert!(err.contains("head file"), "{err}");
    Ok(())
}

/// A row of the unkeyed credential layout for secret `kph1.<id>.<hex random>`.
fn unkeyed_row(id: &str, role: &str, random: &[u8; 32]) -> Result<Vec<u8>> {
    let digest = blake3::derive_key("kipass hub people credential v1", random);
    Ok(serde_json::to_vec(&json!({
        "id": id, "role": role, "region": null, "name": "intruder",
        "digest": hex::encode(digest), "created_at": 1, "revoked_at": null,
    }))?)
}

#[test]
fn a_credential_row_written_into_the_database_does_not_authenticate() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (dir, hub) = hub_in(&tmp)?;
    let now = sync_hub::clock::now();
    let (officer, officer_secret) =
        auth::issue(hub.store(), Role::Officer, Some("suwon"), "kim", now)?;
    let (revoked, revoked_secret) = auth::issue(hub.store(), Role::Authority, None, "lee", now)?;
    auth::revoke(hub.store(), &revoked.id, now)?;
    drop(hub);

    let random = [0x5a; 32];
    let db = redb::Database::open(dir.join("hub.redb"))?;
    let txn = db.begin_write()?;
    {
        // A chosen secret's row, as the previous code made them, in the table of today's
        // layout and in the previous layout's table.
        let row = unkeyed_row("cred_00000000000000aa", "authority", &random)?;
        txn.open_table(auth::PEOPLE_CREDENTIALS)?
            .insert("cred_00000000000000aa", row.as_slice())?;
        let row = unkeyed_row("cred_00000000000000bb", "authority", &random)?;
        txn.open_table(PEOPLE_CREDENTIALS_V1)?
            .insert("cred_00000000000000bb", row.as_slice())?;
        // The officer's own row made an authority's, and the revoked one un-revoked.
        let mut t = txn.open_table(auth::PEOPLE_CREDENTIALS)?;
        for (id, edit) in [
            (officer.id.as_str(), ("role", json!("authority"))),
            (revoked.id.as_str(), ("revoked_at", Value::Null)),
        ] {
            let mut v: Value = serde_json::from_slice(t.get(id)?.context("row")?.value())?;
            v[edit.0] = edit.1;
            t.insert(id, serde_json::to_vec(&v)?.as_slice())?;
        }
    }
    txn.commit()?;
    drop(db);

    let hub = Hub::open(&dir)?;
    for id in ["cred_00000000000000aa", "cred_00000000000000bb"] {
        let secret = format!("kph1.{id}.{}", hex::encode(random));
        let who = auth::authenticate(hub.store(), Some(&secret), "");
        assert!(matches!(who, Err(AuthError::Unknown)), "{id}: {who:?}");
    }
    for secret in [&officer_secret.0, &revoked_secret.0] {
        let who = auth::authenticate(hub.store(), Some(secret), "");
        assert!(matches!(who, Err(AuthError::Unknown)), "{who:?}");
    }
    Ok(())
}

#[test]
fn credentials_of_the_unkeyed_layout_keep_working_once_moved_and_only_those() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (dir, hub) = hub_in(&tmp)?;
    drop(hub);
    // A data folder of the previous code: an unkeyed row, no credential key.
    let random = [0x11; 32];
    let db = redb::Database::open(dir.join("hub.redb"))?;
    let txn = db.begin_write()?;
    txn.open_table(PEOPLE_CREDENTIALS_V1)?.insert(
        "cred_0000000000000001",
        unkeyed_row("cred_0000000000000001", "authority", &random)?.as_slice(),
    )?;
    txn.commit()?;
    drop(db);
    std::fs::remove_file(dir.join("keys").join("credential.key"))?;

    let hub = Hub::open(&dir)?;
    assert!(dir.join("keys").join("credential.key").exists());
    let secret = format!("kph1.cred_0000000000000001.{}", hex::encode(random));
    let who = auth::authenticate(hub.store(), Some(&secret), "")?;
    assert_eq!(who.role, Role::Authority);
    let listed = auth::list(hub.store())?;
    assert!(listed.len() == 1 && listed[0].legacy, "{listed:?}");
    let actions: Vec<String> = hub
        .audit()
        .entries(None)?
        .into_iter()
        .map(|e| e.event.action)
        .collect();
    assert!(
        actions.contains(&"credential.rekey".to_owned()),
        "{actions:?}"
    );
    drop(hub);

    // The same kind of row written after the move is never read.
    let db = redb::Database::open(dir.join("hub.redb"))?;
    let txn = db.begin_write()?;
    txn.open_table(PEOPLE_CREDENTIALS_V1)?.insert(
        "cred_0000000000000002",
        unkeyed_row("cred_0000000000000002", "authority", &random)?.as_slice(),
    )?;
    txn.commit()?;
    drop(db);
    let hub = Hub::open(&dir)?;
    let secret = format!("kph1.cred_0000000000000002.{}", hex::encode(random));
    let who = auth::authenticate(hub.store(), Some(&secret), "");
    assert!(matches!(who, Err(AuthError::Unknown)), "{who:?}");
    Ok(())
}

fn listing(dir: &Path) -> Result<Vec<Value>> {
    let out = sync_hub(dir, &["audit", "--json"])?;
    if !out.status.success() {
        bail!("audit: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[test]
fn a_purge_expires_the_details_of_entries_older_than_28_days_and_the_chain_verifies() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let (dir, hub) = hub_in(&tmp)?;
    let now: UnixSeconds = sync_hub::clock::now();
    let who = Principal::local_operator();
    hub.audit().append(
        &who,
        trace_event("case-old", "fac_old"),
        now - 30 * DAY_SECONDS,
    )?;
    hub.audit()
        .append(&who, trace_event("case-new", "fac_new"), now - DAY_SECONDS)?;
    drop(hub);

    let before = listing(&dir)?;
    assert_eq!(before[0]["case_id"], "case-old");
    let out = sync_hub(&dir, &["purge"])?;
    assert!(
        out.status.success(),
        "purge: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let after = listing(&dir)?;
    let old = after
        .iter()
        .find(|e| e["seq"] == 0)
        .context("entry 0 is listed")?;
    assert!(old["case_id"].is_null(), "{old}");
    assert!(old["purpose"].is_null(), "{old}");
    assert_eq!(old["facilities"], json!([]), "{old}");
    assert_eq!(old["details_expired"], true, "{old}");
    assert_eq!(old["action"], "trace", "who did what and when stays: {old}");
    let new = after
        .iter()
        .find(|e| e["seq"] == 1)
        .context("entry 1 is listed")?;
    assert_eq!(new["case_id"], "case-new", "{new}");
    assert_eq!(new["facilities"], json!(["fac_new"]), "{new}");

    // Nothing of the old details is left in the database's live tables.
    let db = redb::Database::open(dir.join("hub.redb"))?;
    let txn = db.begin_read()?;
    let mut live = String::new();
    for def in [AUDIT, sync_hub::audit::AUDIT_DETAILS] {
        for row in txn.open_table(def)?.iter()? {
            live.push_str(&String::from_utf8_lossy(row?.1.value()));
        }
    }
    assert!(!live.contains("case-old") && !live.contains("fac_old"));
    assert!(live.contains("case-new"));
    drop(txn);
    drop(db);

    let ok = verify(&dir)?.map_err(anyhow::Error::msg)?;
    assert!(ok.contains("chain intact"), "{ok}");
    let text = sync_hub(&dir, &["audit"])?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines().next().is_some_and(|l| l.contains("(expired)")),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_purge_fast_forwarded_ahead_keeps_the_details_of_recent_entries() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (dir, hub) = hub_in(&tmp)?;
    let now: UnixSeconds = sync_hub::clock::now();
    let who = Principal::local_operator();
    hub.audit()
        .append(&who, trace_event("case-new", "fac_new"), now - DAY_SECONDS)?;
    drop(hub);
    let ahead = (now + 40 * DAY_SECONDS).to_string();
    let out = sync_hub(&dir, &["purge", "--as-of", &ahead])?;
    assert!(
        out.status.success(),
        "purge: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = listing(&dir)?;
    let recent = after
        .iter()
        .find(|e| e["seq"] == 0)
        .context("entry 0 is listed")?;
    assert_eq!(recent["case_id"], "case-new", "{recent}");
    assert_ne!(recent["details_expired"], true, "{recent}");
    let verify = sync_hub(&dir, &["audit", "--verify"])?;
    assert!(
        verify.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    Ok(())
}

/// Makes the audit log unwritable the way a full disk or a damaged key folder does: the head
/// file's path becomes a folder, so every append fails before it writes anything; `heal` puts
/// the real head file back.
struct BrokenHead {
    head: PathBuf,
    saved: PathBuf,
}

impl BrokenHead {
    fn break_it(dir: &Path) -> Result<Self> {
        let head = dir.join("keys").join("audit.head");
        let saved = dir.join("audit.head.saved");
        std::fs::rename(&head, &saved)?;
        std::fs::create_dir(&head)?;
        Ok(BrokenHead { head, saved })
    }

    fn heal(self) -> Result<()> {
        std::fs::remove_dir(&self.head)?;
        std::fs::rename(&self.saved, &self.head)?;
        Ok(())
    }
}

#[test]
fn a_purge_whose_audit_entry_cannot_be_written_destroys_nothing() -> Result<()> {
    use sync_hub::ledger::Ledger;
    use sync_hub::people;
    let tmp = tempfile::tempdir()?;
    let (dir, hub) = hub_in(&tmp)?;
    let now: UnixSeconds = sync_hub::clock::now();
    let who = Principal::local_operator();
    hub.audit()
        .append(&who, trace_event("case-1", "fac_1"), now - DAY_SECONDS)?;
    let oldest = || -> Result<shared::Day> { Ok(hub.keys().ratchet()?.oldest()) };
    let before = oldest()?;
    let entries_before = hub.audit().entries(None)?.len();
    let mut ledger = Ledger::open(hub.store(), hub.keys())?;
    let ahead = now + 40 * DAY_SECONDS;

    let broken = BrokenHead::break_it(&dir)?;
    // Asked for (`sync-hub purge --as-of`, `/api/purge`): refused, nothing destroyed.
    let refused = people::purge(&hub, &mut ledger, &who, Some(ahead), now);
    assert_eq!(
        oldest()?,
        before,
        "day keys were destroyed without an audit entry"
    );
    assert_eq!(ledger.ratchet().oldest(), before);
    let e = refused
        .err()
        .context("a purge ran without its audit entry")?;
    assert!(e.to_string().contains("nothing was purged"), "{e}");
    assert_eq!(e.status(), 500);
    // The hourly timer, with the horizon past the ratchet's oldest day: refused too.
    let refused = people::purge_on_timer(&hub, &mut ledger, ahead);
    assert_eq!(oldest()?, before, "the timer destroyed day keys unaudited");
    assert!(refused.is_err(), "{refused:?}");
    broken.heal()?;
    assert_eq!(hub.audit().entries(None)?.len(), entries_before);

    // With the log writable the purge runs: its entry first, then what it destroyed.
    let report = people::purge(&hub, &mut ledger, &who, Some(ahead), now)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(report.horizon > before, "{report:?}");
    assert!(oldest()? > before);
    let entries = hub.audit().entries(None)?;
    let n = entries.len();
    assert_eq!(n, entries_before + 2, "{entries:?}");
    let (intent, result) = (&entries[n - 2], &entries[n - 1]);
    assert_eq!(intent.event.action, "retention.purge");
    assert_eq!(intent.event.detail["enforced_as_of"], ahead);
    assert_eq!(result.event.action, "retention.purge.result");
    assert_eq!(result.event.detail["intent"], intent.seq);
    assert!(result.event.detail["destroyed"].is_object(), "{result:?}");
    let v = hub.audit().verify()?;
    assert!(v.ok, "{v:?}");
    Ok(())
}
