//! A rogue enrolled device attacks a running hub over iroh with its real identity: a real
//! sync session over a hostile copy of the facility's partition (deletes, an overwritten
//! wrapped key, a nested object, a 9 MiB change, 20,000 one-operation changes), and raw
//! frames after a genuine `Hello` (an inflation bomb as a compressed change chunk, and as a
//! `SyncDeflated` frame). Each hostile session is refused with its reason; the hub stays up
//! with bounded memory, every honest visit stays readable at the hub, and an honest device
//! still syncs after each attack. The connection flood is `hub_flood.rs`.

use anyhow::{Context, Result};
use automerge::transaction::Transactable;
use automerge::{ObjType, ROOT, ReadDoc, ScalarValue};
use shared::sync::{Frame, RefuseReason, Side};
use shared::time::Day;
use std::net::SocketAddr;
use std::path::Path;
use tests::fixture::{
    self, HubFixture, Proc, check_in_codes, free_udp_port, now, run_ok, sync_once,
};
use tests::rogue::{self, Ending, Rogue};

const MIB: usize = 1024 * 1024;

/// The process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> Result<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

fn err_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What must hold after every attack: the hub runs, each of A's visits is traced at the hub,
/// and B syncs a new visit that the hub then counts.
fn honest_side_unharmed(
    what: &str,
    hub: &HubFixture,
    proc: &mut Proc,
    a_tokens: &[[u8; 16]],
    b: &Path,
) -> Result<()> {
    assert!(
        proc.0.try_wait()?.is_none(),
        "the hub exited after the {what}"
    );
    for t in a_tokens {
        let tr = hub.trace(t)?;
        assert_eq!(
            tr["visits"].as_array().map(Vec::len),
            Some(1),
            "after the {what}: {tr}"
        );
    }
    let before = hub.records_of(&hub.facility)?;
    check_in_codes(b, 1)?;
    let out = sync_once(b, &[])?;
    assert!(out.status.success(), "B after the {what}: {}", err_of(&out));
    assert_eq!(
        hub.records_of(&hub.facility)?,
        before + 1,
        "after the {what}"
    );
    Ok(())
}

fn assert_refused(what: &str, ending: &Ending, reason: RefuseReason, needle: &str) {
    match ending {
        Ending::Refused {
            by: Side::Peer,
            reason: r,
            detail,
        } if *r == reason => {
            assert!(detail.contains(needle), "{what}: {detail}");
        }
        other => panic!("{what}: expected the hub to refuse with {reason:?}, got {other:?}"),
    }
}

#[test]
fn a_rogue_device_is_refused_for_each_attack_and_honest_visits_survive() -> Result<()> {
    let started = std::time::Instant::now();
    let hub = HubFixture::new()?;
    let a = hub.enroll_device("a")?;
    let b = hub.enroll_device("b")?;
    let r = hub.enroll_device("r")?;
    let mut proc = hub.start()?;
    let pid = proc.0.id();

    // A checks in and syncs; R (enrolled, admitted) syncs honestly once and so holds A's
    // visits; B binds its credential. A and R listen on known ports: the hub hands them to B
    // as siblings, and the test answers there (below) so that B's dials fail at once instead
    // of each waiting out its connect timeout.
    let a_tokens = check_in_codes(&a, 3)?;
    let a_listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let r_listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    for (dev, listen) in [(&a, a_listen.to_string()), (&r, r_listen.to_string())] {
        let d = dev.display().to_string();
        run_ok(
            "edge-node",
            &["--data", &d, "sync", "--once", "--listen", &listen],
        )?;
    }
    let out = sync_once(&b, &[])?;
    assert!(out.status.success(), "{}", err_of(&out));
    assert_eq!(hub.records_of(&hub.facility)?, 3);
    let day = Day::of(now());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let rogue = rt.block_on(Rogue::bind(
        &r,
        &hub.data,
        hub.sync_port,
        day,
        r_listen,
        true,
    ))?;
    // Devices push only: R's own store holds none of A's visits, and the hub refuses a
    // session that would download them (finding 2 of the sync v2 review: such sessions let
    // one device make the hub build and queue megabytes per tiny request).
    {
        let mut store = rogue.store_with(Rogue::stored_copy(&r, day)?);
        let ending = rt.block_on(rogue.pull(&mut store, now()))?;
        assert_refused(
            "a device's pull",
            &ending,
            RefuseReason::Protocol,
            "devices only push",
        );
    }
    // So the test hands R what a thief of A's tablet would have: A's own copy of the day,
    // A's visits in it, which is what each attack below starts from.
    let pulled = Rogue::stored_copy(&a, day)?.save();
    let hub_copy = || -> Result<shared::partition::Partition> {
        Ok(shared::partition::Partition::load(
            rogue.partition.clone(),
            &pulled,
            &rand::random::<[u8; 16]>(),
        )?)
    };
    let honest = hub_copy()?;
    assert_eq!(honest.record_count(), 3, "R's copy holds A's visits");
    let a_keys: Vec<String> = honest
        .doc()
        .keys(ROOT)
        .filter(|k| k.starts_with("r/"))
        .collect();
    let wrapped_key = honest
        .doc()
        .keys(ROOT)
        .find(|k| k.starts_with("k/"))
        .context("R's copy holds A's wrapped key")?;
    drop(honest);

    // A's address, answered with A's identity: B's sibling dials to A end at once.
    let a_stub = rt.block_on(Rogue::bind(
        &a,
        &hub.data,
        hub.sync_port,
        day,
        a_listen,
        true,
    ))?;

    // A real session over a hostile copy of the partition: one change made by `edit`.
    let hostile = |edit: &dyn Fn(&mut automerge::transaction::Transaction<'_>) -> Result<()>| {
        let mut copy = hub_copy()?;
        let mut tx = copy.doc_mut().transaction();
        edit(&mut tx)?;
        tx.commit();
        let mut store = rogue.store_with(copy);
        rt.block_on(rogue.sync(&mut store, now()))
    };
    let fresh_record_key = || format!("r/{}", hex::encode(rand::random::<[u8; 16]>()));

    // 1. An inflation bomb: a compressed change chunk (~1 MB inflating to ~1 GiB) in a Sync
    // frame, refused without inflating.
    let bomb = shared::sync::harness::deflate_zeros(1 + 258 * (4 << 20));
    let frame = Frame::Sync {
        partition: rogue.partition.clone(),
        message: rogue::compressed_chunk_message(&bomb),
    }
    .encode()?;
    let ending = rt.block_on(rogue.send_raw(&frame, now()))?;
    assert_refused(
        "compressed chunk bomb",
        &ending,
        RefuseReason::InvalidChange,
        "compressed change chunk",
    );
    let peak = peak_rss(pid)?;
    assert!(peak < 256 * MIB, "the hub's peak RSS reached {peak} B");
    honest_side_unharmed("compressed chunk bomb", &hub, &mut proc, &a_tokens, &b)?;

    // 2. The same bomb as a SyncDeflated frame: the frame layer stops inflating at the frame
    // limit (16 MiB) and the frame is refused as undecodable.
    let frame = rogue::sync_deflated_frame(&rogue.partition, &bomb)?;
    let ending = rt.block_on(rogue.send_raw(&frame, now()))?;
    assert_refused(
        "SyncDeflated bomb",
        &ending,
        RefuseReason::Protocol,
        "frame of 16777217 bytes is over",
    );
    let peak = peak_rss(pid)?;
    assert!(peak < 256 * MIB, "the hub's peak RSS reached {peak} B");
    honest_side_unharmed("SyncDeflated bomb", &hub, &mut proc, &a_tokens, &b)?;

    // 3. Deletes of A's records.
    let ending = hostile(&|tx| {
        for k in &a_keys {
            tx.delete(ROOT, k.as_str())?;
        }
        Ok(())
    })?;
    assert_refused(
        "delete",
        &ending,
        RefuseReason::InvalidChange,
        "deletes a key",
    );
    honest_side_unharmed("deletes", &hub, &mut proc, &a_tokens, &b)?;

    // 4. An overwrite of A's wrapped session key with other bytes.
    let ending = hostile(&|tx| {
        tx.put(
            ROOT,
            wrapped_key.as_str(),
            ScalarValue::Bytes(vec![0x5a; 300]),
        )?;
        Ok(())
    })?;
    assert_refused(
        "overwrite",
        &ending,
        RefuseReason::InvalidChange,
        "overwrites an existing value",
    );
    honest_side_unharmed("overwrite", &hub, &mut proc, &a_tokens, &b)?;

    // 5. A nested map under a new record key.
    let ending = hostile(&|tx| {
        let inner = tx.put_object(ROOT, fresh_record_key(), ObjType::Map)?;
        tx.put(&inner, "x", ScalarValue::Bytes(vec![1; 8]))?;
        Ok(())
    })?;
    assert_refused(
        "nested object",
        &ending,
        RefuseReason::InvalidChange,
        "creates a nested map",
    );
    honest_side_unharmed("nested object", &hub, &mut proc, &a_tokens, &b)?;

    // 6. One 9 MiB change (incompressible, so it crosses as one 9 MiB frame).
    let ending = hostile(&|tx| {
        let big: Vec<u8> = (0..9 * MIB).map(|_| rand::random::<u8>()).collect();
        tx.put(ROOT, fresh_record_key(), ScalarValue::Bytes(big))?;
        Ok(())
    })?;
    assert_refused(
        "9 MiB change",
        &ending,
        RefuseReason::InvalidChange,
        "over the limit of 1048576",
    );
    honest_side_unharmed("9 MiB change", &hub, &mut proc, &a_tokens, &b)?;

    // 7. Very many small changes: 20,000 one-operation changes, each a valid sealed visit.
    // Nothing refuses them, and nothing should: they are well-formed new records of an
    // admitted device. The session cuts them into messages of at most 4 MiB, well inside
    // the validator's 65,536 changes a message and the 64 rounds a partition.
    const MANY: usize = 20_000;
    let before = hub.records_of(&hub.facility)?;
    let mut copy = hub_copy()?;
    let many = rogue::add_single_record_changes(&mut copy, &hub.data, &rogue.me, now(), MANY)?;
    let mut store = rogue.store_with(copy);
    let ending = rt.block_on(rogue.sync(&mut store, now()))?;
    assert_eq!(ending, Ending::Finished, "many small changes");
    assert_eq!(
        hub.records_of(&hub.facility)?,
        before + u64::try_from(MANY)?
    );
    let tr = hub.trace(&many[MANY / 2])?;
    assert_eq!(tr["visits"].as_array().map(Vec::len), Some(1), "{tr}");
    honest_side_unharmed("many small changes", &hub, &mut proc, &a_tokens, &b)?;

    // 8. A relaying sibling: A, without a route to the hub, hands two new visits to R; R
    // deletes A's earlier records in its copy and relays to the hub, which refuses it. A's
    // visits still reach the hub through A's own later sync.
    let relay_listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
    let relay = rt.block_on(Rogue::bind(
        &r,
        &hub.data,
        hub.sync_port,
        day,
        relay_listen,
        false,
    ))?;
    let a_new = check_in_codes(&a, 2)?;
    let a_owned = a.clone();
    let peer = format!("{}@{relay_listen}", relay.id());
    let a_sync = std::thread::spawn(move || fixture::sync_via_sibling_only(&a_owned, &peer));
    let mut relay_store = relay.store_with(hub_copy()?);
    let served = rt.block_on(relay.serve_one(&mut relay_store, now()));
    let a_out = a_sync
        .join()
        .map_err(|_| anyhow::anyhow!("A's sync thread panicked"))??;
    assert_eq!(served?, Ending::Finished, "A hands its visits to R");
    assert!(!a_out.status.success(), "A had no route to the hub");
    let relayed = relay_store
        .get_mut(&relay.partition)
        .context("R holds the partition")?;
    assert_eq!(relayed.record_count(), a_keys.len() + a_new.len());
    let mut tx = relayed.doc_mut().transaction();
    for k in &a_keys {
        tx.delete(ROOT, k.as_str())?;
    }
    tx.commit();
    let ending = rt.block_on(relay.sync(&mut relay_store, now()))?;
    assert_refused(
        "relayed deletes",
        &ending,
        RefuseReason::InvalidChange,
        "deletes a key",
    );
    for t in &a_new {
        let tr = hub.trace(t)?;
        assert_eq!(tr["visits"].as_array().map(Vec::len), Some(0), "{tr}");
    }
    let out = sync_once(&a, &[])?;
    assert!(out.status.success(), "{}", err_of(&out));
    for t in &a_new {
        let tr = hub.trace(t)?;
        assert_eq!(tr["visits"].as_array().map(Vec::len), Some(1), "{tr}");
    }
    honest_side_unharmed("relaying sibling", &hub, &mut proc, &a_tokens, &b)?;
    rt.block_on(relay.close());

    rt.block_on(rogue.close());
    rt.block_on(a_stub.close());
    eprintln!("rogue device attacks took {:?}", started.elapsed());
    drop(proc);
    Ok(())
}
