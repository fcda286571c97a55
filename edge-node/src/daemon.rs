//! `edge-node run` and `sync --once`: the device's long-running shell.
//!
//! A background loop syncs with the hub when the device's sync schedule says so
//! (`shared::sync::schedule`, the same policy the simulation runs): after a scan or a
//! sibling's hand-over (a short wait gathers a queue at the door into one session, at least
//! 30 s after a previous round that carried scans), and otherwise once a day for
//! the hub's refresh. A session costs kilobytes of QUIC handshake however little it carries,
//! so a device with nothing to send does not sync. While the hub does not answer the schedule
//! backs off exponentially with jitter, and the device hands records the hub has not taken to
//! the first sibling that takes them, once per change. Siblings' sessions are accepted at any
//! time. Retention
//! runs hourly. Just after each UTC midnight (checked at least every [`SESSION_CHECK_MAX`]) the
//! device drops the ended day's session key, so a quiet device holds no key of an earlier day.
//! Scans never wait for any of this: the device lock is held for one step of a session at a
//! time.

use crate::clock;
use crate::net::{self, NetError, SharedDevice, SyncReport, Target};
use iroh::{Endpoint, PublicKey};
use rand::Rng;
use shared::sync::schedule::{Schedule, Step};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often retention runs (`shared::device::RETENTION_EVERY_SECS`, as in the simulation).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(shared::device::RETENTION_EVERY_SECS);
/// The longest wait between checks for an ended day's session key
/// (`shared::device::SESSION_CHECK_MAX_SECS`).
pub const SESSION_CHECK_MAX: Duration = Duration::from_secs(shared::device::SESSION_CHECK_MAX_SECS);

/// How long to wait at `now` (Unix seconds) before the next check for an ended day's session
/// key (`shared::device::session_check_wait`).
pub fn session_check_wait(now: u64) -> Duration {
    Duration::from_secs(shared::device::session_check_wait(now))
}

/// The hub part of a round: the region's hubs in [`net::hub_targets`]'s order (the one that
/// answered last first), one session each until one completes, so a dead hub costs one
/// dial's timeout and the other takes the round (each hub keeps its own sync states, so
/// nothing is sent again for the switch). With `hub_addr` (`sync --once --hub`) only the
/// enrolled hub, at that address. The reports of every attempt.
pub async fn sync_hubs(
    endpoint: &Endpoint,
    device: &SharedDevice,
    hub_addr: Option<SocketAddr>,
) -> Result<Vec<SyncReport>, NetError> {
    let hubs = {
        let dev = device.lock().unwrap_or_else(|p| p.into_inner());
        match hub_addr {
            Some(a) => {
                let mut hub = net::hub_target(&dev)?;
                hub.addrs = vec![a];
                hub.names.clear();
                vec![hub]
            }
            None => net::hub_targets(&dev)?,
        }
    };
    let mut reports = Vec::new();
    for hub in &hubs {
        let r = net::sync_with(endpoint, device, hub, clock::now).await;
        let ok = r.ok;
        reports.push(r);
        if ok {
            break;
        }
    }
    Ok(reports)
}

/// One round: the region's hubs ([`sync_hubs`]), then every sibling (roster and `extra`),
/// one session each.
pub async fn sync_round(
    endpoint: &Endpoint,
    device: &SharedDevice,
    extra: &[Target],
    hub_addr: Option<SocketAddr>,
) -> Result<Vec<SyncReport>, NetError> {
    let siblings = {
        let dev = device.lock().unwrap_or_else(|p| p.into_inner());
        net::roster_targets(&dev)?
    };
    let mut reports = sync_hubs(endpoint, device, hub_addr).await?;
    let hub_ok = reports.iter().any(|r| r.ok);
    let hubs = reports.len();
    let mut seen: Vec<PublicKey> = Vec::new();
    for t in extra.iter().chain(siblings.iter()) {
        if seen.contains(&t.id) {
            continue;
        }
        seen.push(t.id);
        reports.push(net::sync_with(endpoint, device, t, clock::now).await);
    }
    // A sibling may have brought in records the hub has not seen: hand them on now (to the
    // hub that answered, dialled first).
    if reports
        .iter()
        .skip(hubs)
        .any(|r| r.ok && r.records_received > 0)
        && hub_ok
    {
        reports.extend(sync_hubs(endpoint, device, hub_addr).await?);
    }
    Ok(reports)
}

/// Hands this device's records to the first sibling (roster, then `extra`) whose session
/// completes; the reports of every attempt.
pub async fn relay(
    endpoint: &Endpoint,
    device: &SharedDevice,
    extra: &[Target],
) -> Vec<SyncReport> {
    let siblings = {
        let dev = device.lock().unwrap_or_else(|p| p.into_inner());
        net::roster_targets(&dev).unwrap_or_default()
    };
    let mut reports = Vec::new();
    let mut seen: Vec<PublicKey> = Vec::new();
    for t in siblings.iter().chain(extra.iter()) {
        if seen.contains(&t.id) {
            continue;
        }
        seen.push(t.id);
        let report = net::sync_with(endpoint, device, t, clock::now).await;
        let ok = report.ok;
        reports.push(report);
        if ok {
            break;
        }
    }
    reports
}

/// Milliseconds since `start`, the schedule's clock.
fn millis(start: tokio::time::Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Runs the device until `shutdown` resolves.
pub async fn run(
    device: SharedDevice,
    listen: SocketAddr,
    peers: Vec<Target>,
    wake: Arc<Notify>,
    lan: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NetError> {
    let endpoint = net::bind(&device, listen).await?;
    tracing::info!(
        "device endpoint {} listening on {:?}",
        endpoint.id(),
        endpoint.bound_sockets()
    );
    // Sibling discovery on the local network (`crate::lan`), unless `--no-lan`.
    let sync_port = (endpoint.bound_sockets().iter())
        .find(|a| a.is_ipv4())
        .map_or(listen.port(), |a| a.port());
    let beacons =
        lan.then(|| tokio::spawn(crate::lan::run(device.clone(), listen.ip(), sync_port)));
    let trusted: Vec<PublicKey> = peers.iter().map(|p| p.id).collect();
    let gate = net::SiblingGate::new(net::SiblingLimits::from_env());
    let accept = {
        let endpoint = endpoint.clone();
        let device = device.clone();
        let wake = wake.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Some(handshake) = gate.handshake() else {
                    tracing::warn!(
                        "sibling connection refused: {} already in their handshake",
                        net::MAX_SIBLING_HANDSHAKES
                    );
                    incoming.refuse();
                    continue;
                };
                let device = device.clone();
                let trusted = trusted.clone();
                let wake = wake.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    let _handshake = handshake;
                    match net::serve_sibling(incoming, device, trusted, clock::now, gate).await {
                        Ok(n) => {
                            tracing::info!("sibling session merged {n} records");
                            if n > 0 {
                                // Hand the sibling's records on to the hub now.
                                wake.notify_one();
                            }
                        }
                        Err(e) => tracing::warn!("sibling session: {e}"),
                    }
                });
            }
        })
    };
    let sync = {
        let endpoint = endpoint.clone();
        let device = device.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut schedule = Schedule::new(millis(start));
            let mut last_retention = tokio::time::Instant::now();
            loop {
                match schedule.next(millis(start)) {
                    Step::Wait { until_ms } => {
                        let wait = Duration::from_millis(until_ms.saturating_sub(millis(start)))
                            .min(RETENTION_INTERVAL);
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = wake.notified() => schedule.changed(millis(start)),
                        }
                    }
                    Step::SyncHub => {
                        let ticket = schedule.begin();
                        let ok = match sync_hubs(&endpoint, &device, None).await {
                            Ok(reports) => {
                                reports.iter().for_each(log_report);
                                reports.iter().any(|r| r.ok)
                            }
                            Err(e) => {
                                tracing::warn!("sync round: {e}");
                                false
                            }
                        };
                        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
                        schedule.hub_done(ticket, millis(start), ok, jitter);
                        if schedule.wants_relay() {
                            let reports = relay(&endpoint, &device, &peers).await;
                            reports.iter().for_each(log_report);
                            schedule.relay_done(ticket, reports.iter().any(|r| r.ok));
                        }
                    }
                }
                if last_retention.elapsed() >= RETENTION_INTERVAL {
                    last_retention = tokio::time::Instant::now();
                    let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = dev.purge(clock::now(), None) {
                        tracing::warn!("retention: {e}");
                    }
                }
            }
        })
    };
    let sessions = {
        let device = device.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(session_check_wait(clock::now())).await;
                let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
                if dev.end_past_sessions(clock::now()) {
                    tracing::info!("a new UTC day: the ended day's session key was dropped");
                }
            }
        })
    };
    shutdown.await;
    beacons.inspect(tokio::task::JoinHandle::abort);
    sessions.abort();
    sync.abort();
    accept.abort();
    endpoint.close().await;
    Ok(())
}

fn log_report(r: &SyncReport) {
    match &r.error {
        None => tracing::info!(
            "synced with {}: {} records in, {} bytes out",
            r.peer,
            r.records_received,
            r.socket_bytes_sent
        ),
        Some(e) => tracing::debug!("sync with {}: {e}", r.peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_check_waits_are_the_shared_rules() {
        let midnight = 20_000 * 86_400;
        assert_eq!(session_check_wait(midnight - 30), Duration::from_secs(31));
        assert_eq!(session_check_wait(midnight), SESSION_CHECK_MAX);
        assert_eq!(RETENTION_INTERVAL, Duration::from_secs(3600));
    }
}
