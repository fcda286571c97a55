//! The trace index of the previous release (`visits-by-token-2`, `visits-by-facility-1`, as
//! `testdata/upgrade/` holds it, written by that release's own code) is converted when the
//! ledger opens (the token index as sorted runs, `token-runs-1`, and `visits-by-facility-2`):
//! the old tables are gone and traces answer as the old hub did (`expected.json`). Likewise
//! the token index as one B-tree (`visits-by-token-3`, the release before the runs) is moved
//! into runs.

use redb::{
    MultimapTableHandle, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableHandle,
};
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use sync_hub::Hub;
use sync_hub::ledger::{Ledger, VISITS_BY_FACILITY, VISITS_BY_TOKEN_V3, runs};

const PREVIOUS: &str = "6207a77";

fn copy_private(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("{e}"));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{e}")) {
        let entry = entry.unwrap_or_else(|e| panic!("{e}"));
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_private(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap_or_else(|e| panic!("{e}"));
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// The names of the store's tables (plain and multimap).
fn tables(hub: &Hub) -> BTreeSet<String> {
    let txn = hub
        .store()
        .db()
        .begin_read()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut names: BTreeSet<String> = txn
        .list_tables()
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|t| t.name().to_owned())
        .collect();
    names.extend(
        txn.list_multimap_tables()
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|t| t.name().to_owned()),
    );
    names
}

/// (token or "paper", facility, time) of a trace's visits or contacts, as JSON.
fn set(list: &Value) -> BTreeSet<(String, String, u64)> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|x| {
            (
                x["token"].as_str().unwrap_or("paper").to_owned(),
                x["facility_id"].as_str().unwrap_or_default().to_owned(),
                x["scanned_at"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn token(hex_text: &str) -> [u8; 16] {
    let mut t = [0u8; 16];
    hex::decode_to_slice(hex_text, &mut t).unwrap_or_else(|e| panic!("{e}"));
    t
}

/// The previous release's stored hub (`testdata/upgrade/`) and what it recorded
/// (`expected.json`).
fn previous() -> (std::path::PathBuf, Value) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/upgrade")
        .join(PREVIOUS);
    let expected: Value = serde_json::from_slice(
        &std::fs::read(src.join("expected.json")).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (src, expected)
}

#[test]
fn the_previous_releases_index_is_converted_and_traces_the_same() {
    let (src, expected) = previous();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().join("hub");
    copy_private(&src.join("hub"), &dir);
    let hub = Hub::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    let before = tables(&hub);
    assert!(before.contains("visits-by-token-2"), "{before:?}");
    assert!(before.contains("visits-by-facility-1"), "{before:?}");
    let now = expected["made_at"].as_u64().unwrap_or_default() + 600;

    let l = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let after = tables(&hub);
    assert!(!after.contains("visits-by-token-2"), "{after:?}");
    assert!(!after.contains("visits-by-facility-1"), "{after:?}");
    let synced: Vec<String> = expected["visits_synced"]
        .as_array()
        .unwrap_or_else(|| panic!("no visits_synced"))
        .iter()
        .filter_map(|v| v["token"].as_str().map(str::to_owned))
        .collect();
    let rows = |hub: &Hub| {
        let txn = hub
            .store()
            .db()
            .begin_read()
            .unwrap_or_else(|e| panic!("{e}"));
        let f = txn
            .open_table(VISITS_BY_FACILITY)
            .unwrap_or_else(|e| panic!("{e}"));
        (token_rows(&txn), f.len().unwrap_or(0))
    };
    let (token_rows, batches) = rows(&hub);
    assert_eq!(
        token_rows,
        synced.len() as u64,
        "one token row per QR visit"
    );
    assert!(batches > 0);

    // The old trace of the first visit, traced again: the same visits and contacts.
    let old = &expected["old_trace_of_first"];
    let trace = l
        .trace(&[token(&synced[0])], 30, now)
        .unwrap_or_else(|e| panic!("{e}"));
    let json = serde_json::to_value(&trace).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set(&json["visits"]), set(&old["visits"]), "{json}");
    assert_eq!(set(&json["contacts"]), set(&old["contacts"]), "{json}");
    assert!(
        !trace.contacts.is_empty(),
        "the fixture's first visit has contacts"
    );
    assert!(trace.contacts.iter().any(|c| c.paper), "and a paper one");
    // Every synced visit is found.
    let all: Vec<[u8; 16]> = synced.iter().map(|t| token(t)).collect();
    let trace = l.trace(&all, 30, now).unwrap_or_else(|e| panic!("{e}"));
    let found: BTreeSet<String> = trace.visits.iter().map(|v| v.token.clone()).collect();
    assert_eq!(found, synced.iter().cloned().collect::<BTreeSet<_>>());

    // Opening again converts nothing twice.
    drop(l);
    let l = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows(&hub), (token_rows, batches));
    let again = l.trace(&all, 30, now).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, trace);
}

/// The token index's rows, summed over its runs' sizes.
fn token_rows(txn: &redb::ReadTransaction) -> u64 {
    let sizes = txn
        .open_table(runs::TOKEN_RUN_SIZES)
        .unwrap_or_else(|e| panic!("{e}"));
    sizes
        .iter()
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|row| {
            row.map(|(_, v)| v.value())
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .sum()
}

#[test]
fn the_token_index_as_one_tree_is_moved_into_runs_and_traces_the_same() {
    let (src, expected) = previous();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().join("hub");
    copy_private(&src.join("hub"), &dir);
    let hub = Hub::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    let now = expected["made_at"].as_u64().unwrap_or_default() + 600;
    let all: Vec<[u8; 16]> = expected["visits_synced"]
        .as_array()
        .unwrap_or_else(|| panic!("no visits_synced"))
        .iter()
        .filter_map(|v| v["token"].as_str().map(token))
        .collect();
    let l = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let trace = l.trace(&all, 30, now).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(trace.visits.len(), all.len());
    drop(l);

    // The store as the release before the runs left it: every token row in
    // `visits-by-token-3`, no runs. The rows are the same bytes.
    let txn = hub
        .store()
        .db()
        .begin_write()
        .unwrap_or_else(|e| panic!("{e}"));
    let moved = {
        let mut pieces = txn
            .open_table(runs::TOKEN_RUNS)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut old = txn
            .open_table(VISITS_BY_TOKEN_V3)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut moved = 0u64;
        for piece in pieces.iter().unwrap_or_else(|e| panic!("{e}")) {
            let (k, v) = piece.unwrap_or_else(|e| panic!("{e}"));
            for r in v.value().chunks_exact(runs::ROW) {
                let mut row = [0u8; runs::ROW];
                row.copy_from_slice(r);
                let mut tag = [0u8; 16];
                tag.copy_from_slice(&row[..16]);
                let (row_tag, sealed) = runs::parts(&row);
                old.insert((k.value().0, &tag, &row_tag), &sealed)
                    .unwrap_or_else(|e| panic!("{e}"));
                moved += 1;
            }
        }
        pieces
            .retain(|_, _| false)
            .unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(runs::TOKEN_RUN_SIZES)
            .unwrap_or_else(|e| panic!("{e}"))
            .retain(|_, _| false)
            .unwrap_or_else(|e| panic!("{e}"));
        moved
    };
    txn.commit().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(moved, all.len() as u64, "one token row per QR visit");
    // More rows than one transaction of the move takes (65,536), of the same day.
    let day = {
        let txn = hub
            .store()
            .db()
            .begin_read()
            .unwrap_or_else(|e| panic!("{e}"));
        let old = txn
            .open_table(VISITS_BY_TOKEN_V3)
            .unwrap_or_else(|e| panic!("{e}"));
        let first = old.first().unwrap_or_else(|e| panic!("{e}"));
        first.map(|(k, _)| k.value().0).unwrap_or_default()
    };
    const EXTRA: u32 = 70_000;
    let txn = hub
        .store()
        .db()
        .begin_write()
        .unwrap_or_else(|e| panic!("{e}"));
    {
        let mut old = txn
            .open_table(VISITS_BY_TOKEN_V3)
            .unwrap_or_else(|e| panic!("{e}"));
        for i in 0..EXTRA {
            let tag = *blake3::hash(&i.to_be_bytes()).as_bytes();
            let mut t = [0u8; 16];
            t.copy_from_slice(&tag[..16]);
            old.insert((day, &t, &[1u8; 8]), &[2u8; 8])
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    txn.commit().unwrap_or_else(|e| panic!("{e}"));

    // The first start of the new release under another hub's keys (a wrong or half-restored
    // `keys/`, whose oldest day is after every day here): the move deletes nothing (review of
    // the move: it dropped the rows of days it held no key for).
    let key_file = dir.join("keys/day-ratchet.key");
    let own_key = std::fs::read(&key_file).unwrap_or_else(|e| panic!("{e}"));
    let other = tmp.path().join("other");
    drop(
        Hub::init(
            &other,
            "suwon",
            None,
            vec![],
            None,
            expected["made_at"].as_u64().unwrap_or_default() + 40 * 86_400,
        )
        .unwrap_or_else(|e| panic!("init: {e}")),
    );
    std::fs::copy(other.join("keys/day-ratchet.key"), &key_file).unwrap_or_else(|e| panic!("{e}"));
    drop(Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}")));
    std::fs::write(&key_file, own_key).unwrap_or_else(|e| panic!("{e}"));

    let l = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!tables(&hub).contains("visits-by-token-3"));
    let txn = hub
        .store()
        .db()
        .begin_read()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(token_rows(&txn), moved + u64::from(EXTRA));
    drop(txn);
    let again = l.trace(&all, 30, now).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, trace);
}

#[test]
fn under_another_hubs_day_keys_nothing_is_converted_or_deleted() {
    // A wrong or half-restored `keys/` at the first start of the new release: not one old
    // batch opens. The conversion refuses (the hub does not start) and keeps every old row,
    // instead of deleting them all as unreadable (review of the conversion).
    let (src, expected) = previous();
    let made_at = expected["made_at"].as_u64().unwrap_or_default();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().join("hub");
    copy_private(&src.join("hub"), &dir);
    let other = tmp.path().join("other");
    drop(
        Hub::init(&other, "suwon", None, vec![], None, made_at)
            .unwrap_or_else(|e| panic!("init: {e}")),
    );
    std::fs::copy(
        other.join("keys/day-ratchet.key"),
        dir.join("keys/day-ratchet.key"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let hub = Hub::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    let err = Ledger::open(hub.store(), hub.keys())
        .err()
        .unwrap_or_else(|| panic!("converted under another hub's keys"));
    assert!(err.to_string().contains("keys/"), "{err}");
    let after = tables(&hub);
    assert!(after.contains("visits-by-token-2"), "{after:?}");
    assert!(after.contains("visits-by-facility-1"), "{after:?}");
}
