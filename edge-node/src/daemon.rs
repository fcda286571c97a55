//! `edge-node run` and `sync --once`: the device's long-running shell.
//!
//! A background loop syncs with the hub, then with every sibling it knows, whenever a scan
//! asks for it or a timer fires; while nothing answers it backs off exponentially with
//! jitter, capped at [`MAX_BACKOFF`]. While the hub answers but nothing moves (no scan, nothing
//! received), the wait between rounds doubles from [`SYNC_INTERVAL`] up to
//! [`IDLE_MAX_INTERVAL`]: an idle session still costs about 14 KB of QUIC handshake and
//! summaries, which every 30 s would be some 40 MB a day on a metered hotspot. A scan, a
//! `sync` command or a sibling handing over records wakes the loop at once. Siblings' sessions are accepted at any time. Retention
//! runs hourly. Just after each UTC midnight (checked at least every [`SESSION_CHECK_MAX`]) the
//! device drops the ended day's session key, so a quiet device holds no key of an earlier day.
//! Scans never wait for any of this: the device lock is held for one step of a session at a
//! time.

use crate::clock;
use crate::net::{self, NetError, SharedDevice, SyncReport, Target};
use iroh::{Endpoint, PublicKey};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The longest wait between attempts while nothing answers.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The wait between syncs while the hub answers and records move.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(30);
/// The longest wait between syncs while the hub answers and nothing moves.
pub const IDLE_MAX_INTERVAL: Duration = Duration::from_secs(300);
/// After a scan wakes the loop, how long it waits for the rest of a queue at the door, so
/// that a burst of visitors travels as one automerge change in one session.
pub const WAKE_COALESCE: Duration = Duration::from_millis(1500);
/// How often retention runs.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// The longest wait between checks for an ended day's session key: the timer aims at the next
/// UTC midnight, and this cap bounds the error of a clock that was set while it slept.
pub const SESSION_CHECK_MAX: Duration = Duration::from_secs(60);

/// How long to wait at `now` (Unix seconds) before the next check for an ended day's session
/// key: until one second past the next UTC midnight, at most [`SESSION_CHECK_MAX`].
pub fn session_check_wait(now: u64) -> Duration {
    let next_midnight = (now / 86_400 + 1) * 86_400;
    Duration::from_secs(next_midnight - now + 1).min(SESSION_CHECK_MAX)
}

/// One round: the hub, then every sibling (roster and `extra`), one session each.
pub async fn sync_round(
    endpoint: &Endpoint,
    device: &SharedDevice,
    extra: &[Target],
    hub_addr: Option<SocketAddr>,
) -> Result<Vec<SyncReport>, NetError> {
    let (mut hub, siblings) = {
        let dev = device.lock().unwrap_or_else(|p| p.into_inner());
        (net::hub_target(&dev)?, net::roster_targets(&dev)?)
    };
    if let Some(a) = hub_addr {
        hub.addrs = vec![a];
    }
    let mut reports = vec![net::sync_with(endpoint, device, &hub, clock::now).await];
    let mut seen: Vec<PublicKey> = Vec::new();
    for t in extra.iter().chain(siblings.iter()) {
        if seen.contains(&t.id) {
            continue;
        }
        seen.push(t.id);
        reports.push(net::sync_with(endpoint, device, t, clock::now).await);
    }
    // A sibling may have brought in records the hub has not seen: hand them on now.
    if reports
        .iter()
        .skip(1)
        .any(|r| r.ok && r.records_received > 0)
        && reports[0].ok
    {
        reports.push(net::sync_with(endpoint, device, &hub, clock::now).await);
    }
    Ok(reports)
}

/// The delay before attempt `failures + 1`: exponential from 1 s, capped, with jitter.
pub fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.min(6)).min(MAX_BACKOFF);
    let jitter: f64 = rand::thread_rng().gen_range(0.5..1.0);
    base.mul_f64(jitter)
}

/// The wait after a successful round, `idle_rounds` successful rounds in a row having moved
/// nothing: [`SYNC_INTERVAL`], doubling per idle round, capped at [`IDLE_MAX_INTERVAL`].
pub fn idle_wait(idle_rounds: u32) -> Duration {
    SYNC_INTERVAL
        .saturating_mul(1u32 << idle_rounds.min(16))
        .min(IDLE_MAX_INTERVAL)
}

/// Runs the device until `shutdown` resolves.
pub async fn run(
    device: SharedDevice,
    listen: SocketAddr,
    peers: Vec<Target>,
    wake: Arc<Notify>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NetError> {
    let endpoint = net::bind(&device, listen).await?;
    tracing::info!(
        "device endpoint {} listening on {:?}",
        endpoint.id(),
        endpoint.bound_sockets()
    );
    let trusted: Vec<PublicKey> = peers.iter().map(|p| p.id).collect();
    let accept = {
        let endpoint = endpoint.clone();
        let device = device.clone();
        let wake = wake.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let device = device.clone();
                let trusted = trusted.clone();
                let wake = wake.clone();
                tokio::spawn(async move {
                    match net::serve_sibling(incoming, device, trusted, clock::now).await {
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
            let mut failures = 0u32;
            let mut idle_rounds = 0u32;
            // Whether a scan, a command or a sibling asked for this round (the first counts).
            let mut woken = true;
            let mut last_retention = tokio::time::Instant::now();
            loop {
                match sync_round(&endpoint, &device, &peers, None).await {
                    Ok(reports) => {
                        let moved = reports.iter().any(|r| r.ok && r.records_received > 0);
                        idle_rounds = if woken || moved {
                            0
                        } else {
                            idle_rounds.saturating_add(1)
                        };
                        for r in &reports {
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
                        if reports.first().is_some_and(|r| r.ok) {
                            failures = 0;
                        } else {
                            failures = failures.saturating_add(1);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("sync round: {e}");
                        failures = failures.saturating_add(1);
                    }
                }
                if failures > 0 {
                    // When the hub answers again, rounds start at the normal interval.
                    idle_rounds = 0;
                }
                if last_retention.elapsed() >= RETENTION_INTERVAL {
                    last_retention = tokio::time::Instant::now();
                    let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = dev.purge(clock::now(), None) {
                        tracing::warn!("retention: {e}");
                    }
                }
                let wait = if failures == 0 {
                    idle_wait(idle_rounds)
                } else {
                    backoff(failures)
                };
                woken = false;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake.notified() => {
                        woken = true;
                        tokio::time::sleep(WAKE_COALESCE).await;
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
    sessions.abort();
    sync.abort();
    accept.abort();
    endpoint.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for f in 0..20 {
            let d = backoff(f);
            assert!(d <= MAX_BACKOFF, "{d:?}");
            assert!(d >= Duration::from_millis(500).min(MAX_BACKOFF / 2));
        }
        assert!(backoff(0) <= Duration::from_secs(1));
        assert!(backoff(10) >= Duration::from_secs(30));
    }

    #[test]
    fn session_check_wakes_just_after_midnight_and_at_least_every_minute() {
        let midnight = 20_000 * 86_400;
        assert_eq!(session_check_wait(midnight - 30), Duration::from_secs(31));
        assert_eq!(session_check_wait(midnight - 1), Duration::from_secs(2));
        assert_eq!(session_check_wait(midnight), SESSION_CHECK_MAX);
        assert_eq!(session_check_wait(midnight - 3600), SESSION_CHECK_MAX);
        for now in (midnight - 200)..(midnight + 200) {
            let w = session_check_wait(now);
            assert!(w > Duration::ZERO && w <= SESSION_CHECK_MAX, "{now}: {w:?}");
        }
    }

    #[test]
    fn idle_rounds_stretch_the_interval_up_to_the_cap() {
        assert_eq!(idle_wait(0), SYNC_INTERVAL);
        assert_eq!(idle_wait(1), SYNC_INTERVAL * 2);
        assert_eq!(idle_wait(2), SYNC_INTERVAL * 4);
        let mut last = Duration::ZERO;
        for n in 0..40 {
            let d = idle_wait(n);
            assert!(d >= last && d <= IDLE_MAX_INTERVAL, "{n}: {d:?}");
            last = d;
        }
        assert_eq!(idle_wait(u32::MAX), IDLE_MAX_INTERVAL);
        assert!(
            crate::kiosk::ONLINE_WITHIN > IDLE_MAX_INTERVAL.as_secs(),
            "an idle device that reaches its hub must show online"
        );
    }
}
