//! Sibling discovery on the facility's local network: the socket loop around `shared::lan`
//! (`docs/lan.md`).
//!
//! While `run` is active the device sends its beacon (a blinded tag of the day and its sync
//! port, [`shared::lan::Beacon`]) every [`shared::lan::BEACON_EVERY_SECS`] to the
//! organization-local group [`shared::lan::GROUP`]:[`shared::lan::PORT`] with TTL 1, and
//! listens there for its roster siblings' beacons. The address a sibling's beacon came from is
//! stored (`lan_siblings` in the device's settings) and becomes a dial target
//! ([`crate::net::roster_targets`]), also for a later `sync --once`. Who may sync with the
//! device does not change: `net::serve_sibling` still serves only roster (or `--peer`)
//! endpoints. `run --no-lan` turns it off; a device listening on loopback or IPv6 only sends
//! no beacon (no sibling on the network could dial it there).

use crate::device::Device;
use crate::net::SharedDevice;
use shared::lan::{Beacon, Matcher, SiblingStatus, Sightings};
use shared::time::{Day, UnixSeconds};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::UdpSocket;

/// The device setting holding the sightings (JSON of [`Sightings`]).
pub const K_LAN_SIBLINGS: &str = "lan_siblings";
/// The device setting holding when each sibling was last reached (endpoint id → Unix seconds).
pub const K_SIBLINGS_REACHED: &str = "siblings_reached";
/// How often the roster is read again for the matcher.
const ROSTER_EVERY: Duration = Duration::from_secs(30);
/// How often sightings are written when only their times moved.
/// How often new addresses may be written at once (a beacon's interval).
const BEACON_EVERY: Duration = Duration::from_secs(shared::lan::BEACON_EVERY_SECS);
const PERSIST_EVERY: Duration = Duration::from_secs(60);
/// How long to wait before opening the socket again after it failed.
const REOPEN_AFTER: Duration = Duration::from_secs(30);

fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, Device> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// The sightings the device stored (none when unreadable).
pub fn sightings(device: &Device) -> Sightings {
    device
        .store()
        .get(K_LAN_SIBLINGS)
        .ok()
        .flatten()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_default()
}

/// When each sibling (endpoint id, hex) was last reached by a session this device opened.
pub fn reached(device: &Device) -> BTreeMap<String, UnixSeconds> {
    device
        .store()
        .get(K_SIBLINGS_REACHED)
        .ok()
        .flatten()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .unwrap_or_default()
}

/// Notes that a session with the sibling `endpoint` (hex) completed at `now`; a store that
/// cannot take it is logged, not fatal.
pub fn note_reached(device: &SharedDevice, endpoint: &str, now: UnixSeconds) {
    let dev = lock(device);
    let mut map = reached(&dev);
    map.insert(endpoint.to_owned(), now);
    // Only roster members are kept, so the map cannot grow beyond the facility.
    if let Ok(roster) = dev.roster() {
        map.retain(|id, _| roster.iter().any(|s| &s.endpoint_id == id));
    }
    if let Ok(json) = serde_json::to_vec(&map)
        && let Err(e) = dev.store().put(&[(K_SIBLINGS_REACHED, &json)])
    {
        tracing::warn!("cannot store when a sibling was reached: {e}");
    }
}

/// The siblings `status` shows: each roster member, where it was seen, when it was reached.
pub fn status(device: &Device, now: UnixSeconds) -> Vec<SiblingStatus> {
    let roster = device.roster().unwrap_or_default();
    shared::lan::sibling_status(&roster, &sightings(device), &reached(device), now)
}

/// The interface beacons go out on for a device listening on `listen`, or why none do.
fn interface(listen: IpAddr) -> Result<Ipv4Addr, &'static str> {
    match listen {
        IpAddr::V4(ip) if ip.is_loopback() => Err("the device listens on loopback only"),
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(_) => Err("beacons are IPv4 only and the device listens on IPv6"),
    }
}

fn open_socket(iface: Ipv4Addr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Several devices on one machine share the group's port; each gets every beacon.
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, shared::lan::PORT)).into())?;
    s.join_multicast_v4(&shared::lan::GROUP, &iface)?;
    s.set_multicast_ttl_v4(1)?;
    s.set_multicast_loop_v4(true)?;
    if !iface.is_unspecified() {
        s.set_multicast_if_v4(&iface)?;
    }
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// Sends beacons for a device whose sync endpoint listens on `listen` and is bound to UDP
/// port `sync_port`, and records its siblings' beacons, until the task is aborted.
pub async fn run(device: SharedDevice, listen: IpAddr, sync_port: u16) {
    let iface = match interface(listen) {
        Ok(i) => i,
        Err(why) => {
            tracing::info!("no sibling discovery on the local network: {why}");
            return;
        }
    };
    loop {
        match open_socket(iface) {
            Ok(sock) => {
                tracing::info!(
                    "sibling discovery on {}:{} (sync port {sync_port})",
                    shared::lan::GROUP,
                    shared::lan::PORT
                );
                let e = serve(&device, &sock, sync_port).await;
                tracing::warn!("sibling discovery socket failed: {e}");
            }
            Err(e) => tracing::warn!(
                "cannot open the sibling discovery socket {}:{}: {e}",
                shared::lan::GROUP,
                shared::lan::PORT
            ),
        }
        tokio::time::sleep(REOPEN_AFTER).await;
    }
}

/// What the loop needs of the device, read under its lock.
struct Me {
    facility: shared::FacilityId,
    endpoint: [u8; 32],
}

fn me(device: &SharedDevice) -> Result<Me, String> {
    let dev = lock(device);
    let key = dev.endpoint_key().map_err(|e| e.to_string())?;
    Ok(Me {
        facility: dev.enrollment().facility.id.clone(),
        endpoint: *iroh::SecretKey::from_bytes(&key).public().as_bytes(),
    })
}

fn persist(device: &SharedDevice, s: &Sightings) {
    let Ok(json) = serde_json::to_vec(s) else {
        return;
    };
    if let Err(e) = lock(device).store().put(&[(K_LAN_SIBLINGS, &json)]) {
        tracing::warn!("cannot store the siblings seen on the local network: {e}");
    }
}

/// The beacon loop on an open socket; returns the error that ended it.
async fn serve(device: &SharedDevice, sock: &UdpSocket, sync_port: u16) -> String {
    let me = match me(device) {
        Ok(m) => m,
        Err(e) => return e,
    };
    let group = SocketAddr::from((shared::lan::GROUP, shared::lan::PORT));
    let mut sightings = sightings(&lock(device));
    let mut matcher: Option<(Matcher, tokio::time::Instant)> = None;
    let mut dirty = false;
    let mut fresh = false;
    let mut persisted = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(shared::lan::BEACON_EVERY_SECS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 64];
    loop {
        let now = crate::clock::now();
        let day = Day::of(now);
        let stale = matcher
            .as_ref()
            .is_none_or(|(m, at)| m.day() != day || at.elapsed() >= ROSTER_EVERY);
        if stale {
            let roster = lock(device).roster().unwrap_or_default();
            let members: Vec<&str> = roster.iter().map(|s| s.endpoint_id.as_str()).collect();
            sightings.prune(now, &members);
            matcher = Some((
                Matcher::new(&me.facility, &roster, &me.endpoint, day),
                tokio::time::Instant::now(),
            ));
        }
        let Some((m, _)) = matcher.as_ref() else {
            continue;
        };
        tokio::select! {
            _ = tick.tick() => {
                let beacon = Beacon { tag: shared::lan::tag(&me.facility, &me.endpoint, day), port: sync_port };
                // A network without a route for the group now (an address being changed) is
                // not fatal: the next beacon tries again.
                if let Err(e) = sock.send_to(&beacon.encode(), group).await {
                    tracing::debug!("beacon not sent: {e}");
                }
                if fresh || (dirty && persisted.elapsed() >= PERSIST_EVERY) {
                    persist(device, &sightings);
                    persisted = tokio::time::Instant::now();
                    dirty = false;
                    fresh = false;
                }
            }
            r = sock.recv_from(&mut buf) => {
                let (n, src) = match r {
                    Ok(x) => x,
                    Err(e) => return e.to_string(),
                };
                // Only a sender on the local network can be a sibling beside this device: a
                // spoofed source elsewhere would make the device dial where a stranger chose.
                if !local_sender(src.ip()) {
                    continue;
                }
                let Ok(beacon) = Beacon::decode(&buf[..n]) else { continue };
                let Some(endpoint) = m.matches(&beacon) else { continue };
                let addr = SocketAddr::new(src.ip(), beacon.port);
                let endpoint = endpoint.to_owned();
                // A new address is stored at once, but at most once per beacon interval: a
                // replayed tag with a new port in every datagram must not turn into a store
                // write (and a log line) per datagram.
                let new_address = sightings.observe(&endpoint, addr, now);
                if new_address && persisted.elapsed() >= BEACON_EVERY {
                    tracing::info!("sibling {} seen on the local network at {addr}", &endpoint[..10]);
                    persist(device, &sightings);
                    persisted = tokio::time::Instant::now();
                    dirty = false;
                    fresh = false;
                } else {
                    // Written at the next beacon when new, within a minute otherwise.
                    fresh |= new_address;
                    dirty = true;
                }
            }
        }
    }
}

/// Whether a beacon's sender is on a local network: a private or link-local IPv4 address
/// (RFC 1918, 169.254/16), or a unique-local or link-local IPv6 one; never loopback.
fn local_sender(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.is_unique_local() || v6.is_unicast_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_senders_are_heard() {
        for ip in [
            "10.77.0.2",
            "192.168.1.9",
            "172.16.0.1",
            "169.254.3.4",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(local_sender(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "127.0.0.1", "0.0.0.0", "2001:db8::1", "::1"] {
            assert!(!local_sender(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn beacons_go_out_only_where_siblings_could_dial_the_device() {
        assert!(interface("127.0.0.1".parse().expect("ip")).is_err());
        assert!(interface("::".parse().expect("ip")).is_err());
        assert_eq!(
            interface("0.0.0.0".parse().expect("ip")),
            Ok(Ipv4Addr::UNSPECIFIED)
        );
        assert_eq!(
            interface("10.1.2.3".parse().expect("ip")),
            Ok(Ipv4Addr::new(10, 1, 2, 3))
        );
    }
}
