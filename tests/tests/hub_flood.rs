//! A flood of raw sync connections at a running hub: oversize frames before the `Hello` are
//! refused at once without being buffered, connections over `--max-connections` are closed
//! at once (`CLOSE_BUSY`), a connection that never says `Hello` is closed after
//! `HELLO_TIMEOUT`, and an honest device still syncs afterwards. Silent peers hold at most
//! `--max-unadmitted` connections: an honest device syncs while they fill that cap.

use anyhow::{Context, Result};
use std::time::Duration;
use sync_hub::daemon::{CLOSE_BUSY, CLOSE_EVICTED, CLOSE_NO_HELLO, HELLO_TIMEOUT};
use tests::fixture::{self, HubFixture, Proc, sync_once};

/// The cap the hub runs with here: small, so exceeding it is quick.
const CAP: usize = 40;
/// Connections that each send a 1 MiB frame before their `Hello`.
const FLOODERS: usize = 32;
const MIB: usize = 1024 * 1024;

fn start(hub: &HubFixture) -> Result<Proc> {
    hub.start_with(&["--max-connections", &CAP.to_string()], &[])
}

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

fn app_close_code(e: &iroh::endpoint::ConnectionError) -> Option<u64> {
    match e {
        iroh::endpoint::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
        _ => None,
    }
}

#[test]
fn a_flood_is_cut_off_and_an_honest_device_still_syncs() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("gate")?;
    let hub_id = sync_hub::keys::KeyDir::new(&hub.data)
        .endpoint_secret()?
        .public();
    let proc = start(&hub)?;
    let pid = proc.0.id();
    let before = peak_rss(pid)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
            .alpns(vec![shared::sync::ALPN.to_vec()])
            .clear_ip_transports()
            .bind_addr("127.0.0.1:0".parse::<std::net::SocketAddr>()?)?
            .bind()
            .await?;
        let addr = iroh::EndpointAddr::new(hub_id)
            .with_ip_addr(format!("127.0.0.1:{}", hub.sync_port).parse()?);

        // 1. Oversize frames before the Hello, all at once: each is refused on its length
        // prefix and its connection closed, long before the Hello deadline.
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..FLOODERS {
            let (endpoint, addr) = (endpoint.clone(), addr.clone());
            tasks.push(tokio::spawn(async move {
                let conn = endpoint.connect(addr, shared::sync::ALPN).await?;
                let (mut send, _recv) = conn.open_bi().await?;
                let mut frame = u32::try_from(MIB)?.to_be_bytes().to_vec();
                frame.resize(4 + MIB, 0x42);
                // The hub stops reading after the prefix: the write may fail or stall.
                let _ = tokio::time::timeout(Duration::from_secs(5), send.write_all(&frame)).await;
                tokio::time::timeout(Duration::from_secs(5), conn.closed())
                    .await
                    .context("the hub did not close a connection that sent 1 MiB before Hello")?;
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        assert!(
            started.elapsed() < HELLO_TIMEOUT,
            "closed for the frame, not the deadline"
        );

        // 2. More connections than the cap, each holding a stream open without a Hello.
        let mut held = Vec::new();
        let mut busy = 0;
        for _ in 0..CAP + 8 {
            let conn = endpoint.connect(addr.clone(), shared::sync::ALPN).await?;
            let Ok((mut send, recv)) = conn.open_bi().await else {
                busy += 1;
                continue;
            };
            // One byte makes the stream visible to the hub (a partial length prefix).
            if send.write_all(&[0]).await.is_err() {
                busy += 1;
                continue;
            }
            held.push((conn, send, recv));
        }
        // The excess are closed at once with CLOSE_BUSY.
        let count_busy = |held: &[(iroh::endpoint::Connection, _, _)]| {
            held.iter()
                .filter(|(c, _, _)| {
                    c.close_reason()
                        .is_some_and(|e| app_close_code(&e) == Some(u64::from(CLOSE_BUSY)))
                })
                .count()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while count_busy(&held) + busy < 8 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let closed_busy = count_busy(&held);
        assert_eq!(
            closed_busy + busy,
            8,
            "exactly the connections over the cap"
        );

        // 3. The ones within the cap never said Hello: closed at the deadline.
        let open = held
            .iter()
            .find(|(c, _, _)| c.close_reason().is_none())
            .context("connections within the cap stay open")?;
        let e = tokio::time::timeout(HELLO_TIMEOUT + Duration::from_secs(5), open.0.closed())
            .await
            .context("no close at the Hello deadline")?;
        assert_eq!(app_close_code(&e), Some(u64::from(CLOSE_NO_HELLO)), "{e}");
        drop(held);
        endpoint.close().await;
        anyhow::Ok(())
    })?;

    // Nothing of the flood was buffered: 32 MiB sent, far less kept.
    let grown = peak_rss(pid)?.saturating_sub(before);
    assert!(grown < 16 * MIB, "the hub's peak RSS grew by {grown} B");

    // An honest device syncs once the flood has gone (its slots are freed).
    fixture::check_in_codes(&dev, 1)?;
    let out = sync_once(&dev, &[])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hub.records_of(&hub.facility)?, 1);
    drop(proc);
    Ok(())
}

#[test]
fn silent_peers_hold_only_the_pre_admission_cap_and_an_honest_device_syncs() -> Result<()> {
    const SLOTS: usize = 12;
    const UNADMITTED: usize = 4;
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("gate")?;
    fixture::check_in_codes(&dev, 1)?;
    let hub_id = sync_hub::keys::KeyDir::new(&hub.data)
        .endpoint_secret()?
        .public();
    let proc = hub.start_with(
        &[
            "--max-connections",
            &SLOTS.to_string(),
            "--max-unadmitted",
            &UNADMITTED.to_string(),
        ],
        &[],
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
            .alpns(vec![shared::sync::ALPN.to_vec()])
            .clear_ip_transports()
            .bind_addr("127.0.0.1:0".parse::<std::net::SocketAddr>()?)?
            .bind()
            .await?;
        let addr = iroh::EndpointAddr::new(hub_id)
            .with_ip_addr(format!("127.0.0.1:{}", hub.sync_port).parse()?);
        // As many silent peers as the hub has connection slots, each holding a stream with
        // one byte of a length prefix and never a Hello.
        let mut held = Vec::new();
        for _ in 0..SLOTS {
            let conn = endpoint.connect(addr.clone(), shared::sync::ALPN).await?;
            if let Ok((mut send, recv)) = conn.open_bi().await {
                let _ = send.write_all(&[0]).await;
                held.push((conn, Some((send, recv))));
            } else {
                held.push((conn, None));
            }
        }
        let open = |held: &[(iroh::endpoint::Connection, _)]| {
            held.iter()
                .filter(|(c, _)| c.close_reason().is_none())
                .count()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while open(&held) > UNADMITTED && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The pre-admission cap is full of silent peers: an honest device still syncs.
        let dev = dev.clone();
        let out = tokio::task::spawn_blocking(move || sync_once(&dev, &[])).await??;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The device's own connection made room by closing the oldest silent peer.
        assert_eq!(
            open(&held),
            UNADMITTED - 1,
            "the newest silent peers stay, up to the cap"
        );
        let evicted = held
            .iter()
            .filter(|(c, _)| {
                c.close_reason()
                    .is_some_and(|e| app_close_code(&e) == Some(u64::from(CLOSE_EVICTED)))
            })
            .count();
        assert_eq!(
            evicted,
            SLOTS - UNADMITTED + 1,
            "the older ones were closed to make room"
        );
        drop(held);
        endpoint.close().await;
        anyhow::Ok(())
    })?;
    assert_eq!(hub.records_of(&hub.facility)?, 1);
    drop(proc);
    Ok(())
}

/// Finding 3 of the sync v2 review: strangers opening connection after connection evicted the
/// oldest connection waiting for admission, an enrolled device's included. Now a connection
/// from the endpoint of a device the hub has admitted is evicted last: here one that says
/// nothing stays while eight strangers come and go over a cap of four.
#[test]
fn strangers_at_the_pre_admission_cap_do_not_evict_a_known_device() -> Result<()> {
    const UNADMITTED: usize = 4;
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("gate")?;
    fixture::check_in_codes(&dev, 1)?;
    let hub_id = sync_hub::keys::KeyDir::new(&hub.data)
        .endpoint_secret()?
        .public();
    // The device binds its endpoint at its first sync (a hub started afresh below reads the
    // bound endpoints from its registry).
    {
        let _proc = hub.start()?;
        let out = sync_once(&dev, &[])?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let key = edge_node::device::Device::open(&dev)?.endpoint_key()?;
    let _proc = hub.start_with(&["--max-unadmitted", &UNADMITTED.to_string()], &[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let bind = |secret: Option<iroh::SecretKey>| async move {
            let mut b = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
                .alpns(vec![shared::sync::ALPN.to_vec()])
                .clear_ip_transports()
                .bind_addr("127.0.0.1:0".parse::<std::net::SocketAddr>()?)?;
            if let Some(s) = secret {
                b = b.secret_key(s);
            }
            anyhow::Ok(b.bind().await?)
        };
        let addr = iroh::EndpointAddr::new(hub_id)
            .with_ip_addr(format!("127.0.0.1:{}", hub.sync_port).parse()?);
        let device_end = bind(Some(iroh::SecretKey::from_bytes(&key))).await?;
        let stranger_end = bind(None).await?;
        // The device's endpoint connects first (the oldest waiting) and says nothing yet.
        let known = device_end.connect(addr.clone(), shared::sync::ALPN).await?;
        let _known_stream = known.open_bi().await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut strangers = Vec::new();
        for _ in 0..2 * UNADMITTED {
            let conn = stranger_end
                .connect(addr.clone(), shared::sync::ALPN)
                .await?;
            let stream = conn.open_bi().await.ok();
            strangers.push((conn, stream));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let evicted = strangers
            .iter()
            .filter(|(c, _)| {
                c.close_reason()
                    .is_some_and(|e| app_close_code(&e) == Some(u64::from(CLOSE_EVICTED)))
            })
            .count();
        assert!(
            evicted >= UNADMITTED,
            "strangers made room for each other: {evicted} evicted"
        );
        assert!(
            known.close_reason().is_none(),
            "the known device's connection was closed: {:?}",
            known.close_reason()
        );
        drop(strangers);
        device_end.close().await;
        stranger_end.close().await;
        anyhow::Ok(())
    })?;
    Ok(())
}
