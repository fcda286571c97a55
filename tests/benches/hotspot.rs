//! A hotspot-tethered entrance: a day's backlog of 2,000 visits delivered to the hub over an
//! emulated phone link (1 Mbit/s each way, 100 ms round trip, 2% packet loss).
//!
//! This machine's kernel has no `sch_netem`, so `tc netem` cannot shape a link here. The
//! link is emulated in user space instead: the device runs in a network namespace of its own
//! (`kp-hotspot`, a veth pair 10.77.1.2 <-> 10.77.1.1, created and removed by this bench, root
//! required) so the only way to the hub (on 127.0.0.1 in the root namespace) is a UDP relay on
//! 10.77.1.1 that serialises each direction at 1 Mbit/s, delays every datagram by 50 ms and
//! drops 2% at random (seeded). The device dials the relay (`sync --once --hub-addr`); iroh
//! cannot find a direct path around it.
//!
//! Then a day at the same entrance with visits far apart: `DAY_VISITS` visits, each checked in
//! and synced in a session of its own (what `edge-node run`'s schedule does when visits are
//! more than 30 s apart), counting every byte the relay carried both ways: the fixed cost of
//! a session (QUIC handshake included) against the visits it carries.
//!
//! Run: `cargo bench -p tests --bench hotspot` (`KIPASS_BENCH_RECORDS` sets the backlog,
//! default 2,000; `KIPASS_BENCH_DAY_VISITS` the day's visits, default 40).

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tests::fixture::{HubFixture, check_in_codes};

const RATE_BPS: f64 = 1_000_000.0;
const ONE_WAY: Duration = Duration::from_millis(50);
const LOSS: f64 = 0.02;
const RECORDS: usize = 2_000;
const DAY_VISITS: usize = 40;
/// The sealed envelope of one QR visit (see the wire bench).
const ENVELOPE: f64 = 101.0;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Link {
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    carried: Arc<AtomicU64>,
}

/// One direction: datagrams from `rx` go out of `tx` to wherever `dest` says, shaped.
fn direction(
    rx: UdpSocket,
    tx: UdpSocket,
    dest: Arc<Mutex<Option<SocketAddr>>>,
    learn: Option<Arc<Mutex<Option<SocketAddr>>>>,
    seed: u64,
    link: &Link,
) {
    let (qtx, qrx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let stop = link.stop.clone();
    let dropped = link.dropped.clone();
    let carried = link.carried.clone();
    std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut free_at = Instant::now();
        let mut buf = vec![0u8; 65_536];
        let _ = rx.set_read_timeout(Some(Duration::from_millis(100)));
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = rx.recv_from(&mut buf) else {
                continue;
            };
            if let Some(l) = &learn {
                *l.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
            }
            if rng.gen_bool(LOSS) {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Serialisation at the link rate, queued behind what is already in flight.
            let now = Instant::now();
            let start = free_at.max(now);
            free_at = start + Duration::from_secs_f64(((n + 28) * 8) as f64 / RATE_BPS);
            carried.fetch_add((n + 28) as u64, Ordering::Relaxed);
            let _ = qtx.send((free_at + ONE_WAY, buf[..n].to_vec()));
        }
    });
    let stop = link.stop.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((due, pkt)) = qrx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if let Some(d) = *dest.lock().unwrap_or_else(|p| p.into_inner()) {
                let _ = tx.send_to(&pkt, d);
            }
        }
    });
}

struct Netns;

const NS: &str = "kp-hotspot";

fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Netns {
    fn create() -> Result<Netns> {
        let _ = ip(&["netns", "del", NS]);
        ip(&["netns", "add", NS])?;
        let ns = Netns;
        ip(&[
            "link", "add", "kph0", "type", "veth", "peer", "name", "kph1",
        ])?;
        ip(&["link", "set", "kph1", "netns", NS])?;
        ip(&["addr", "add", "10.77.1.1/30", "dev", "kph0"])?;
        ip(&["link", "set", "kph0", "up"])?;
        ip(&["-n", NS, "addr", "add", "10.77.1.2/30", "dev", "kph1"])?;
        ip(&["-n", NS, "link", "set", "kph1", "up"])?;
        ip(&["-n", NS, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", "kph0"]);
        let _ = ip(&["netns", "del", NS]);
    }
}

fn main() -> Result<()> {
    let records = env_count("KIPASS_BENCH_RECORDS", RECORDS);
    let day_visits = env_count("KIPASS_BENCH_DAY_VISITS", DAY_VISITS);
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device_for(&hub.facility, "outdoor")?;
    let t0 = Instant::now();
    check_in_codes(&dev, records)?;
    println!(
        "{records} visits checked in offline in {:.1?}",
        t0.elapsed()
    );
    let _hub_run = hub.start()?;

    let _ns = Netns::create()?;
    // The relay: device <-> front socket (on the veth), back socket <-> hub (loopback).
    let front = UdpSocket::bind("10.77.1.1:0")?;
    let back = UdpSocket::bind("127.0.0.1:0")?;
    let relay_addr = front.local_addr()?;
    let hub_addr: SocketAddr = format!("127.0.0.1:{}", hub.sync_port).parse()?;
    let device_addr = Arc::new(Mutex::new(None));
    let link = Link {
        stop: Arc::new(AtomicBool::new(false)),
        dropped: Arc::new(AtomicU64::new(0)),
        carried: Arc::new(AtomicU64::new(0)),
    };
    direction(
        front.try_clone()?,
        back.try_clone()?,
        Arc::new(Mutex::new(Some(hub_addr))),
        Some(device_addr.clone()),
        1,
        &link,
    );
    direction(back, front, device_addr, None, 2, &link);

    let sync_once = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", NS])
            .arg(tests::fixture::bin("edge-node"))
            .args([
                "--data",
                dev.to_str().unwrap_or_default(),
                "sync",
                "--once",
                "--json",
                "--listen",
                "10.77.1.2:0",
                "--hub-addr",
                &relay_addr.to_string(),
            ])
            .output()
    };
    let started = Instant::now();
    let out = sync_once()?;
    let elapsed = started.elapsed();
    let backlog_link = link.carried.load(Ordering::Relaxed);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "sync over the emulated hotspot failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap_or("{}"))?;
    let at_hub = hub.records_of(&hub.facility)?;
    println!(
        "| link | records | delivered at hub | time | device UDP bytes sent | bytes/record | link bytes | datagrams dropped |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| 1 Mbit/s, 100 ms RTT, 2% loss (user-space relay) | {records} | {at_hub} | {:.1} s | {} | {:.0} | {} | {} |",
        elapsed.as_secs_f64(),
        report["socket_bytes_sent"],
        report["socket_bytes_sent"].as_f64().unwrap_or(0.0) / records as f64,
        link.carried.load(Ordering::Relaxed),
        link.dropped.load(Ordering::Relaxed)
    );
    println!(
        "backlog: {:.1} B a record both ways through the hub's port = {:.2}x the {ENVELOPE} B envelope",
        backlog_link as f64 / records as f64,
        backlog_link as f64 / records as f64 / ENVELOPE
    );
    if at_hub != records as u64 {
        bail!("only {at_hub} of {records} records arrived");
    }

    // A day of visits far apart: one session each.
    let before = link.carried.load(Ordering::Relaxed);
    let mut frames = 0u64;
    let mut socket = 0u64;
    for i in 0..day_visits {
        check_in_codes(&dev, 1)?;
        let out = sync_once()?;
        if !out.status.success() {
            bail!(
                "day visit {i}: sync failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report: serde_json::Value = serde_json::from_str(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("{}"),
        )?;
        frames += report["frame_bytes_sent"].as_u64().unwrap_or(0)
            + report["frame_bytes_received"].as_u64().unwrap_or(0);
        socket += report["socket_bytes_sent"].as_u64().unwrap_or(0)
            + report["socket_bytes_received"].as_u64().unwrap_or(0);
    }
    let day_link = link.carried.load(Ordering::Relaxed) - before;
    link.stop.store(true, Ordering::Relaxed);
    let n = day_visits.max(1) as f64;
    println!(
        "| day: visits, one session each | link B (both ways) | B/visit | ÷ envelope | socket B/visit | frame B/visit |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {day_visits} | {day_link} | {:.0} | {:.1}x | {:.0} | {:.0} |",
        day_link as f64 / n,
        day_link as f64 / n / ENVELOPE,
        socket as f64 / n,
        frames as f64 / n
    );
    let at_hub = hub.records_of(&hub.facility)?;
    if at_hub != (records + day_visits) as u64 {
        bail!(
            "{at_hub} records at the hub, {} expected",
            records + day_visits
        );
    }
    Ok(())
}
