//! Sync protocol v2 against v1 peers, through the real binaries: a v1 device dialling the hub
//! (ALPN `kipass/sync/1`) reads one v1 `Refused` frame telling it to upgrade, the hub logs
//! and counts it and keeps serving v2 devices; a v2 device dialling a node that accepts only
//! v1 reports which side to upgrade.

use anyhow::{Context, Result, bail};
use shared::sync::{ALPN_V1, Frame, FrameDecoder, Hello, Peer, RefuseReason};
use std::time::Duration;
use tests::fixture::{self, HubFixture, free_udp_port, start_hub_run, sync_once};

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A fresh loopback endpoint that offers or accepts only `alpns`.
async fn endpoint(
    alpns: Vec<Vec<u8>>,
    secret: Option<iroh::SecretKey>,
    port: u16,
) -> Result<iroh::Endpoint> {
    let mut b = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .alpns(alpns)
        .clear_ip_transports()
        .bind_addr(format!("127.0.0.1:{port}").parse::<std::net::SocketAddr>()?)?;
    if let Some(s) = secret {
        b = b.secret_key(s);
    }
    Ok(b.bind().await?)
}

#[test]
fn a_v1_device_is_told_to_upgrade_and_the_hub_keeps_serving_v2() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("gate")?;
    let hub_id = sync_hub::keys::KeyDir::new(&hub.data)
        .endpoint_secret()?
        .public();
    let log = hub.tmp.path().join("hub.log");
    let proc = start_hub_run(&hub.data, hub.sync_port, &log, Duration::from_secs(30))?;

    let refusal = runtime()?.block_on(async {
        let ep = endpoint(vec![ALPN_V1.to_vec()], None, 0).await?;
        let addr = iroh::EndpointAddr::new(hub_id)
            .with_ip_addr(format!("127.0.0.1:{}", hub.sync_port).parse()?);
        let conn = tokio::time::timeout(Duration::from_secs(5), ep.connect(addr, ALPN_V1))
            .await
            .context("the hub did not accept a v1 connection")??;
        assert_eq!(conn.alpn(), ALPN_V1);
        let (mut send, mut recv) = conn.open_bi().await?;
        // A v1 Hello: its layout is v2's with version 1.
        let hello = Frame::Hello(Hello {
            version: 1,
            peer: Peer::Device {
                device: shared::DeviceId::parse("d-old")?,
                facility: shared::FacilityId::parse(&hub.facility)?,
            },
            now: fixture::now(),
            horizon: shared::time::Day::of(fixture::now()).minus(28),
            partitions: vec![],
            in_sync: Default::default(),
            push_only: false,
            credential: None,
            refresh_have: None,
        });
        send.write_all(&hello.encode()?).await?;
        let bytes = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64 * 1024))
            .await
            .context("no answer from the hub")??;
        ep.close().await;
        anyhow::Ok(bytes)
    })?;
    // The answer is exactly one v1 Refused frame: prefix, tag 2, reason 7 (Protocol).
    assert_eq!(&refusal[4..6], &[2, 7], "{refusal:?}");
    let mut d = FrameDecoder::new();
    d.push(&refusal)?;
    let Some(Frame::Refused(r)) = d.pop()? else {
        bail!("not a Refused frame: {refusal:?}");
    };
    d.finish()?;
    assert_eq!(r.reason, RefuseReason::Protocol);
    assert!(
        r.detail.contains("sync protocol v2")
            && r.detail.contains(&format!(
                "upgrade edge-node to {}",
                env!("CARGO_PKG_VERSION")
            )),
        "{}",
        r.detail
    );

    // The hub logged which device is behind, and counted it.
    assert!(
        fixture::wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|l| {
                l.contains("WARN") && l.contains("d-old") && l.contains("sync protocol v1")
            })
        }),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hub.data.join("run.json"))?)?;
    let http = run["http"].as_str().context("run.json has no http")?;
    let api = tests::people::Api::new(&format!("http://{http}"));
    let token = sync_hub::control::operator_token(&hub.data)?;
    let m = api.call("GET", "/metrics", Some(&token), None)?;
    assert!(
        m.text.contains("\nkipass_sync_v1_refused_total 1\n"),
        "{}",
        m.text
    );

    // `sync-hub stats` keeps it too, naming the device (its claim), across a restart.
    let refused_v1 = |stats: &serde_json::Value| {
        stats["refusals_by_reason"]["Protocol"] == 1
            && stats["recent_refusals"][0]["device"] == "d-old"
            && stats["recent_refusals"][0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("sync protocol v1") && d.contains("upgrade edge-node"))
    };
    let mut stats = serde_json::Value::Null;
    assert!(
        fixture::wait_until(Duration::from_secs(5), || {
            stats = hub.stats().unwrap_or_default();
            refused_v1(&stats)
        }),
        "{stats}"
    );

    // A v2 device still syncs.
    fixture::check_in_codes(&dev, 1)?;
    let out = sync_once(&dev, &[])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hub.records_of(&hub.facility)?, 1);
    drop(proc);
    let stats = hub.stats()?;
    assert!(refused_v1(&stats), "{stats}");
    Ok(())
}

#[test]
fn a_device_dialling_a_v1_only_node_is_told_which_side_to_upgrade() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("gate")?;
    let secret = sync_hub::keys::KeyDir::new(&hub.data).endpoint_secret()?;
    let rt = runtime()?;
    // An old hub (v1 only) where the enrollment says the hub is, and an old sibling.
    let (old_hub, old_sibling) = rt.block_on(async {
        let old_hub = endpoint(vec![ALPN_V1.to_vec()], Some(secret), hub.sync_port).await?;
        let old_sibling = endpoint(vec![ALPN_V1.to_vec()], None, free_udp_port()?).await?;
        anyhow::Ok((old_hub, old_sibling))
    })?;
    // Accept whatever arrives, as a v1 node would: the TLS handshake then fails on the ALPN.
    for ep in [old_hub.clone(), old_sibling.clone()] {
        rt.spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(async move { incoming.await.map(|c| c.remote_id()) });
            }
        });
    }
    let sibling_addr = old_sibling
        .bound_sockets()
        .into_iter()
        .next()
        .context("the sibling endpoint has no socket")?;
    let peer = format!("{}@{sibling_addr}", old_sibling.id());
    let out = sync_once(&dev, &[peer])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    let reports: Vec<serde_json::Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let error = |i: usize| reports[i]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error(0).contains("the hub does not speak sync protocol v2")
            && error(0).contains("upgrade sync-hub"),
        "{stdout}"
    );
    assert!(
        error(1).contains("the sibling does not speak sync protocol v2")
            && error(1).contains("upgrade its edge-node"),
        "{stdout}"
    );
    assert!(stderr.contains("upgrade sync-hub"), "{stderr}");
    rt.block_on(async {
        old_hub.close().await;
        old_sibling.close().await;
    });
    Ok(())
}

#[test]
fn a_v1_sibling_dialling_a_device_is_told_to_upgrade() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("kiosk")?;
    let dev_id: iroh::PublicKey = fixture::device_status(&dev)?["endpoint_id"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    let port = free_udp_port()?;
    // The old sibling is trusted (`--peer`): only then is a session, or a refusal, its due.
    let old = iroh::SecretKey::from_bytes(&rand::random());
    let _run = fixture::Proc(
        std::process::Command::new(fixture::bin("edge-node"))
            .args(["--data", dev.to_str().unwrap_or_default(), "run"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--peer", &format!("{}@127.0.0.1:9", old.public())])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let refusal = runtime()?.block_on(async {
        let ep = endpoint(vec![ALPN_V1.to_vec()], Some(old), 0).await?;
        let addr =
            iroh::EndpointAddr::new(dev_id).with_ip_addr(format!("127.0.0.1:{port}").parse()?);
        // The device needs a moment to bind: retry the dial within a deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let conn = loop {
            match tokio::time::timeout(Duration::from_secs(2), ep.connect(addr.clone(), ALPN_V1))
                .await
            {
                Ok(Ok(c)) => break c,
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => bail!("the device did not accept a v1 connection"),
            }
        };
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Frame::Hello(Hello {
            version: 1,
            peer: Peer::Device {
                device: shared::DeviceId::parse("d-old")?,
                facility: shared::FacilityId::parse(&hub.facility)?,
            },
            now: fixture::now(),
            horizon: shared::time::Day::of(fixture::now()).minus(28),
            partitions: vec![],
            in_sync: Default::default(),
            push_only: false,
            credential: None,
            refresh_have: None,
        });
        send.write_all(&hello.encode()?).await?;
        let bytes = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64 * 1024))
            .await
            .context("no answer from the device")??;
        ep.close().await;
        anyhow::Ok(bytes)
    })?;
    let mut d = FrameDecoder::new();
    d.push(&refusal)?;
    let Some(Frame::Refused(r)) = d.pop()? else {
        bail!("not a Refused frame: {refusal:?}");
    };
    assert_eq!(r.reason, RefuseReason::Protocol);
    assert!(
        r.detail.contains("this device speaks sync protocol v2")
            && r.detail.contains("upgrade the sibling"),
        "{}",
        r.detail
    );
    Ok(())
}
