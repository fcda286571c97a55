//! A running hub whose durable commit fails stops, and loses nothing a device was told of.
//!
//! The hub's actor commits a turn's writes without fsync and makes them durable with one
//! commit at the turn's end (`sync_hub::daemon::end_turn`). If that commit fails, redb refuses
//! every later write while its reads still show the turn's writes, so the actor must stop
//! (and `sync-hub run` exit for its supervisor to restart it) rather than answer from writes a
//! restart loses. `sync-hub/tests/group_commit.rs` checks one turn of that by hand; this test
//! runs the real actor behind a real iroh endpoint on loopback: a device syncs, the next
//! durable commit is made to fail while a second device session delivers new records, and then
//! the session must end refused (`Internal`) rather than finished, the actor must stop by
//! itself and say so (`actor_failed`), requests must be answered "stopped", and a hub started
//! again on the same folder must take the device's next sync and hold every record.

use anyhow::{Context, Result, ensure};
use rand::SeedableRng;
use rand::rngs::StdRng;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::partition::{Partition, session_actor};
use shared::sync::harness::MemoryStore;
use shared::sync::{Peer, RefuseReason, Side};
use shared::time::{Day, UnixSeconds};
use shared::{DeviceId, PartitionId, RecordId};
use std::sync::atomic::Ordering;
use std::time::Duration;
use sync_hub::Hub;
use sync_hub::daemon::{self, HubHandle, Quotas};
use tests::rogue::{Ending, Rogue};

/// Records the device has at its first sync; as many again arrive at each later one.
const RECORDS: u64 = 6;
/// The longest the actor may take to stop after the failed commit.
const STOP_BOUND: Duration = Duration::from_secs(20);

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Adds `n` QR visits to `p`, sealed to the hub's key of the partition's day (`key`).
fn add_visits(
    p: &mut Partition,
    key: &SessionKey,
    device: &DeviceId,
    now: UnixSeconds,
    rng: &mut StdRng,
    n: u64,
) -> Result<()> {
    let id = p.id().clone();
    for i in 0..n {
        // Within the partition's day and not after `now`, whenever the test runs.
        let at = (now.saturating_sub(600).max(id.day.start()) + i).min(now);
        let record = Record {
            facility: id.facility.clone(),
            device: device.clone(),
            scanned_at: at,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: at - 5,
                token: rand::Rng::r#gen(rng),
            },
        };
        let rid = RecordId::random(rng);
        let envelope = key.seal(rng, &id, rid, &record)?;
        p.insert_record(rid, &envelope)?;
    }
    Ok(())
}

/// Starts the actor and the sync endpoint over the hub in `dir`; returns the handle, the
/// actor's thread, the serving task and the hub's address.
async fn start(
    dir: &std::path::Path,
) -> Result<(
    HubHandle,
    std::thread::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
    iroh::Endpoint,
    iroh::EndpointAddr,
)> {
    let hub = Hub::open(dir)?;
    let secret = hub.keys().endpoint_secret()?;
    let endpoint = daemon::bind(secret, "127.0.0.1:0".parse()?).await?;
    let sock = *endpoint
        .bound_sockets()
        .first()
        .context("the endpoint bound no socket")?;
    let addr = iroh::EndpointAddr::new(endpoint.id()).with_ip_addr(sock);
    let (handle, actor) = daemon::start(hub, Quotas::default())?;
    let serve = tokio::spawn(daemon::serve(
        endpoint.clone(),
        handle.clone(),
        daemon::MAX_CONNECTIONS,
        16,
        None,
    ));
    Ok((handle, actor, serve, endpoint, addr))
}

#[test]
fn a_failed_durable_commit_stops_the_hub_and_a_restart_takes_the_sync_again() -> Result<()> {
    let rt = runtime()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("hub");
    // The actor reads the real clock: the partition is of today.
    let now = sync_hub::clock::now();
    let day = Day::of(now);
    let (facility, device, credential, day_key) = {
        let hub = Hub::init(&dir, "suwon", None, vec![], None, now)?.hub;
        let f = hub.add_facility(
            tests::people::registration("Hall", "wedding_hall", "suwon", "Gwanggyo-ro 1", None),
            now,
        )?;
        hub.approve_facility(f.id.as_str())?;
        let ticket = hub.enroll(f.id.as_str(), "gate", now)?;
        let public = hub
            .keys()
            .ratchet()?
            .public(day)
            .context("the hub's key of today")?;
        (f.id, ticket.device_id, ticket.credential.0, public)
    };
    let me = Peer::Device {
        device: device.clone(),
        facility: facility.clone(),
    };
    let rng = &mut StdRng::seed_from_u64(7);
    let key = SessionKey::generate(rng, day);
    let id = PartitionId {
        facility: facility.clone(),
        day,
    };
    let mut partition = Partition::new(id.clone(), &session_actor(&device, rng));
    partition.insert_wrapped_key(&key.wrap(&day_key)?)?;
    add_visits(&mut partition, &key, &device, now, rng, RECORDS)?;

    let device_key = iroh::SecretKey::generate();
    let mut store = MemoryStore::new(b"commit-failure-device", Some(facility.clone()));
    store.insert(partition);

    rt.block_on(async {
        let (handle, actor, serve, endpoint, addr) = start(&dir).await?;
        let rogue =
            Rogue::with_ticket(addr, me.clone(), day, device_key.clone(), Some(credential)).await?;
        let first = rogue.sync(&mut store, now).await?;
        ensure!(first == Ending::Finished, "the first sync: {first:?}");
        let records = handle.stats().await.map_err(anyhow::Error::msg)?.records;
        ensure!(records == RECORDS, "{records} records after the first sync");

        // The next durable commit fails, while the device delivers new records.
        handle
            .query(|hub, _, _| hub.store().fail_next_group_commit())
            .await
            .map_err(anyhow::Error::msg)?;
        let p = store.get_mut(&id).context("the device's partition")?;
        add_visits(p, &key, &device, now, rng, RECORDS)?;
        let second = rogue.sync(&mut store, now).await?;
        ensure!(
            matches!(
                &second,
                Ending::Refused {
                    by: Side::Peer,
                    reason: RefuseReason::Internal,
                    ..
                }
            ),
            "a session whose writes were not made durable must not end finished: {second:?}"
        );

        // The actor stops by itself and says why; requests are told the hub stopped.
        let stopped = tokio::task::spawn_blocking(move || actor.join());
        tokio::time::timeout(STOP_BOUND, stopped)
            .await
            .context("the actor did not stop after its durable commit failed")??
            .map_err(|_| anyhow::anyhow!("the actor panicked"))?;
        ensure!(handle.metrics.actor_failed.load(Ordering::Acquire));
        let after = handle.stats().await;
        ensure!(
            after.as_ref().is_err_and(|e| e.contains("stopped")),
            "a request after the stop: {after:?}"
        );
        serve.abort();
        rogue.close().await;
        endpoint.close().await;
        Ok::<_, anyhow::Error>(())
    })?;

    // Started again on the same folder (what the supervisor does), the hub takes the
    // device's next sync: every record is there, whatever the failed turn had written.
    rt.block_on(async {
        let (handle, actor, serve, endpoint, addr) = start(&dir).await?;
        let rogue = Rogue::with_ticket(addr, me.clone(), day, device_key, None).await?;
        let third = rogue.sync(&mut store, now).await?;
        ensure!(
            third == Ending::Finished,
            "the sync after the restart: {third:?}"
        );
        let records = handle.stats().await.map_err(anyhow::Error::msg)?.records;
        ensure!(
            records == 2 * RECORDS,
            "{records} records after the restart, {} delivered",
            2 * RECORDS
        );
        ensure!(!handle.metrics.actor_failed.load(Ordering::Acquire));
        daemon::stop(&handle);
        let stopped = tokio::task::spawn_blocking(move || actor.join());
        tokio::time::timeout(STOP_BOUND, stopped)
            .await
            .context("the actor did not stop when asked")??
            .map_err(|_| anyhow::anyhow!("the actor panicked"))?;
        serve.abort();
        rogue.close().await;
        endpoint.close().await;
        Ok::<_, anyhow::Error>(())
    })
}
