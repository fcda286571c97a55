//! The device's network shell: an iroh endpoint that carries sync sessions to the hub and
//! to sibling devices, and accepts siblings' sessions. It moves frames; the session in
//! `shared::sync` decides everything, and [`crate::device::Device`] stores what it merged.
//!
//! No relays and no public discovery: peers are dialled at the socket addresses the ticket,
//! the hub's roster or `--peer` gave, each attempt bounded by a short timeout (a dead
//! address would otherwise hold a QUIC connect for its 30 s idle timeout).

use crate::device::Device;
use crate::replica::Replica;
use iroh::endpoint::{RecvStream, SendStream, presets};
use iroh::{Endpoint, EndpointAddr, PublicKey, SecretKey};
use serde::Serialize;
use shared::sync::{ALPN, FrameDecoder, Peer, RefuseReason};
use shared::sync::{Decision, Event, Session, WireStats};
use shared::ticket::Refresh;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a dial may take before the peer counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a session may wait for the peer's next bytes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A device shared between the sync tasks and whatever else the process does; the lock is
/// held for one step of a session at a time, never across a network wait.
pub type SharedDevice = Arc<Mutex<Device>>;

/// A network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Binding the endpoint failed.
    #[error("cannot open the sync endpoint on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer did not answer in time.
    #[error("{0} did not answer within {1:?}")]
    Timeout(String, Duration),
    /// Connecting or streaming failed.
    #[error("connection to {0} failed: {1}")]
    Connection(String, String),
    /// The session ended with a refusal or an error.
    #[error("sync with {0} ended: {1}")]
    Session(String, String),
    /// The device's store failed.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
}

/// Where to find a peer.
#[derive(Debug, Clone)]
pub struct Target {
    /// A name for reports ("hub", a device id).
    pub label: String,
    /// Its endpoint id.
    pub id: PublicKey,
    /// Addresses to try, in order.
    pub addrs: Vec<SocketAddr>,
    /// Whether it is the hub (a completed session then means the hub holds everything).
    pub is_hub: bool,
}

/// What one session moved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Who.
    pub peer: String,
    /// Whether the session completed.
    pub ok: bool,
    /// Records this device gained.
    pub records_received: u64,
    /// Protocol bytes (frames with length prefixes) sent and received.
    pub frame_bytes_sent: u64,
    /// See `frame_bytes_sent`.
    pub frame_bytes_received: u64,
    /// Bytes in UDP datagrams on the connection's socket, sent and received.
    pub socket_bytes_sent: u64,
    /// See `socket_bytes_sent`.
    pub socket_bytes_received: u64,
    /// Why it did not complete.
    pub error: Option<String>,
}

fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, Device> {
    // A panic while holding the lock cannot leave the store inconsistent (redb is
    // transactional), so a poisoned lock is still usable.
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds the device's endpoint on `listen` (no relays, no discovery).
pub async fn bind(device: &SharedDevice, listen: SocketAddr) -> Result<Endpoint, NetError> {
    let key = lock(device).endpoint_key()?;
    let bind_err = |reason: String| NetError::Bind {
        addr: listen,
        reason,
    };
    Endpoint::builder(presets::Minimal)
        .secret_key(SecretKey::from_bytes(&key))
        .alpns(vec![ALPN.to_vec()])
        .transport_config(transport_config())
        .clear_ip_transports()
        .bind_addr(listen)
        .map_err(|e| bind_err(e.to_string()))?
        .bind()
        .await
        .map_err(|e| bind_err(e.to_string()))
}

/// The hub as the enrollment names it.
pub fn hub_target(device: &Device) -> Result<Target, NetError> {
    let hub = &device.enrollment().hub;
    let id: PublicKey = hub
        .endpoint_id
        .parse()
        .map_err(|_| NetError::Connection("hub".into(), "the enrolled hub id is damaged".into()))?;
    Ok(Target {
        label: "hub".into(),
        id,
        addrs: hub.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
        is_hub: true,
    })
}

/// Sibling devices from the hub's roster (those with an address).
pub fn roster_targets(device: &Device) -> Result<Vec<Target>, NetError> {
    Ok(device
        .roster()?
        .into_iter()
        .filter_map(|s| {
            let id: PublicKey = s.endpoint_id.parse().ok()?;
            let addrs: Vec<SocketAddr> = s.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            (!addrs.is_empty()).then_some(Target {
                label: s.device_id.to_string(),
                id,
                addrs,
                is_hub: false,
            })
        })
        .collect())
}

/// Parses `--peer ENDPOINT_ID@IP:PORT`.
pub fn parse_peer(s: &str) -> Result<Target, String> {
    let (id, addr) = s
        .split_once('@')
        .ok_or_else(|| format!("--peer {s:?}: use ENDPOINT_ID@IP:PORT"))?;
    let id: PublicKey = id
        .parse()
        .map_err(|_| format!("--peer {s:?}: the endpoint id is not 64 hex characters"))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("--peer {s:?}: {addr:?} is not IP:PORT"))?;
    Ok(Target {
        label: id.fmt_short().to_string(),
        id,
        addrs: vec![addr],
        is_hub: false,
    })
}

/// Opens one session with `target` as the initiator and runs it to the end.
pub async fn sync_with(
    endpoint: &Endpoint,
    device: &SharedDevice,
    target: &Target,
    now: impl Fn() -> u64,
) -> SyncReport {
    let mut report = SyncReport {
        peer: target.label.clone(),
        ..SyncReport::default()
    };
    match sync_inner(endpoint, device, target, &now, &mut report).await {
        Ok(()) => report.ok = true,
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

async fn sync_inner(
    endpoint: &Endpoint,
    device: &SharedDevice,
    target: &Target,
    now: &impl Fn() -> u64,
    report: &mut SyncReport,
) -> Result<(), NetError> {
    let mut addr = EndpointAddr::new(target.id);
    for a in &target.addrs {
        addr = addr.with_ip_addr(*a);
    }
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect(addr, ALPN))
        .await
        .map_err(|_| NetError::Timeout(target.label.clone(), CONNECT_TIMEOUT))?
        .map_err(|e| NetError::Connection(target.label.clone(), e.to_string()))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| NetError::Connection(target.label.clone(), e.to_string()))?;
    let mut session = {
        let mut dev = lock(device);
        let t = now();
        dev.preload(t)?;
        let e = dev.enrollment().clone();
        let me = Peer::Device {
            device: e.device_id.clone(),
            facility: e.facility.id.clone(),
        };
        let credential = if target.is_hub {
            dev.credential()?.map(|c| c.0)
        } else {
            None
        };
        Session::initiator(
            t,
            me,
            credential,
            &Replica {
                device: &mut dev,
                now: t,
            },
        )
        .map_err(|e| NetError::Session(target.label.clone(), e.to_string()))?
    };
    let outcome = drive(
        &mut session,
        &mut send,
        &mut recv,
        device,
        now,
        target.is_hub,
        &[],
    )
    .await;
    let stats = conn.stats();
    report.socket_bytes_sent = stats.udp_tx.bytes;
    report.socket_bytes_received = stats.udp_rx.bytes;
    conn.close(0u32.into(), b"done");
    let result = outcome?;
    report.records_received = result.new_records;
    report.frame_bytes_sent = result.stats.bytes_sent;
    report.frame_bytes_received = result.stats.bytes_received;
    match result.end {
        End::Finished => Ok(()),
        End::Failed(why) => Err(NetError::Session(target.label.clone(), why)),
    }
}

enum End {
    Finished,
    Failed(String),
}

struct Outcome {
    end: End,
    stats: WireStats,
    new_records: u64,
}

/// Moves frames between the session and the stream until the session ends, executing its
/// events against the device in order.
async fn drive(
    session: &mut Session,
    send: &mut SendStream,
    recv: &mut RecvStream,
    device: &SharedDevice,
    now: &impl Fn() -> u64,
    peer_is_hub: bool,
    trusted_siblings: &[PublicKey],
) -> Result<Outcome, NetError> {
    let _ = trusted_siblings;
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut new_records = 0;
    let mut clock_offset = None;
    let mut end = None;
    loop {
        let mut progressed = true;
        while progressed {
            progressed = false;
            while let Some(frame) = session.poll_transmit() {
                progressed = true;
                let bytes = frame
                    .encode()
                    .map_err(|e| NetError::Session("peer".into(), e.to_string()))?;
                send.write_all(&bytes)
                    .await
                    .map_err(|e| NetError::Connection("peer".into(), e.to_string()))?;
            }
            while let Some(event) = session.poll_event() {
                progressed = true;
                let mut dev = lock(device);
                match event {
                    Event::PartitionUpdated { id, new_records: n } => {
                        dev.persist_partition(id.day, n)?;
                        new_records += n;
                    }
                    Event::SyncStateChanged {
                        peer,
                        partition,
                        state,
                    } => {
                        let t = now();
                        let mut r = Replica {
                            device: &mut dev,
                            now: t,
                        };
                        shared::sync::PartitionStore::put_sync_state(
                            &mut r, &peer, &partition, &state,
                        )
                        .map_err(|e| NetError::Session("peer".into(), e.to_string()))?;
                    }
                    Event::Welcomed { refresh, .. } => {
                        if peer_is_hub {
                            // The hub admitted us: our credential is bound and spent.
                            dev.forget_credential()?;
                            if let Some(bytes) = refresh {
                                match Refresh::from_bytes(&bytes) {
                                    Ok(r) => dev.apply_refresh(&r)?,
                                    Err(e) => tracing::warn!("ignoring the hub's refresh: {e}"),
                                }
                            }
                        }
                    }
                    Event::ClockOffset { seconds } => clock_offset = Some(seconds.saturating_neg()),
                    Event::PeerHello(hello) => {
                        let decision = admit_sibling(&dev, &hello.peer);
                        let t = now();
                        session.admit(
                            t,
                            decision,
                            &mut Replica {
                                device: &mut dev,
                                now: t,
                            },
                        );
                    }
                    Event::Refused { by, reason, detail } => {
                        end = Some(End::Failed(format!(
                            "{by:?} refused ({reason:?}): {detail}"
                        )));
                    }
                    Event::Failed(e) => end = Some(End::Failed(e.to_string())),
                    Event::Finished(_) => {
                        if peer_is_hub {
                            dev.mark_synced_with_hub(now(), clock_offset)?;
                        }
                        end = Some(End::Finished);
                    }
                }
            }
        }
        if session.is_finished() {
            // Flush what the end queued (a refusal, a last Done), then close our side.
            while let Some(frame) = session.poll_transmit() {
                if let Ok(bytes) = frame.encode() {
                    let _ = send.write_all(&bytes).await;
                }
            }
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            return Ok(Outcome {
                end: end.unwrap_or(End::Finished),
                stats: session.stats(),
                new_records,
            });
        }
        let read = tokio::time::timeout(READ_TIMEOUT, recv.read(&mut buf)).await;
        match read {
            Err(_) => return Err(NetError::Timeout("peer".into(), READ_TIMEOUT)),
            Ok(Err(e)) => {
                tracing::debug!("stream ended: {e}");
                session.handle_closed();
            }
            Ok(Ok(None)) => session.handle_closed(),
            Ok(Ok(Some(n))) => {
                let pushed = decoder.push(&buf[..n]);
                if let Err(e) = pushed {
                    session.handle_malformed(e);
                    continue;
                }
                loop {
                    match decoder.pop() {
                        Ok(Some(frame)) => {
                            let mut dev = lock(device);
                            let t = now();
                            session.handle_frame(
                                t,
                                frame,
                                &mut Replica {
                                    device: &mut dev,
                                    now: t,
                                },
                            );
                        }
                        Ok(None) => break,
                        Err(e) => {
                            session.handle_malformed(e);
                            break;
                        }
                    }
                }
            }
        }
    }
}

fn admit_sibling(device: &Device, peer: &Peer) -> Decision {
    let own = &device.enrollment().facility.id;
    match peer {
        Peer::Device { facility, .. } if facility == own => Decision::Admit {
            facility: own.clone(),
            refresh: None,
        },
        _ => Decision::Refuse {
            reason: RefuseReason::WrongFacility,
            detail: "this device syncs only with devices of its own facility".into(),
        },
    }
}

/// Accepts one sibling's connection and runs its session as the responder.
///
/// Only endpoints in the hub's roster or the operator's `--peer` list are served.
pub async fn serve_sibling(
    incoming: iroh::endpoint::Incoming,
    device: SharedDevice,
    trusted: Vec<PublicKey>,
    now: impl Fn() -> u64,
) -> Result<u64, NetError> {
    let conn = incoming
        .await
        .map_err(|e| NetError::Connection("sibling".into(), e.to_string()))?;
    let remote = conn.remote_id();
    let in_roster = lock(&device)
        .roster()?
        .iter()
        .any(|s| s.endpoint_id == remote.to_string());
    if !in_roster && !trusted.contains(&remote) {
        conn.close(1u32.into(), b"unknown endpoint");
        return Err(NetError::Session(
            remote.fmt_short().to_string(),
            "not a known sibling (not in the hub's roster nor --peer)".into(),
        ));
    }
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| NetError::Connection("sibling".into(), e.to_string()))?;
    let me = {
        let dev = lock(&device);
        let e = dev.enrollment();
        Peer::Device {
            device: e.device_id.clone(),
            facility: e.facility.id.clone(),
        }
    };
    let mut session = Session::responder(me);
    let out = drive(
        &mut session,
        &mut send,
        &mut recv,
        &device,
        &now,
        false,
        &trusted,
    )
    .await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    match out.end {
        End::Finished => Ok(out.new_records),
        End::Failed(why) => Err(NetError::Session(remote.fmt_short().to_string(), why)),
    }
}

/// QUIC settings for sync links: no path-MTU discovery. Its probes (padded datagrams up to
/// 1,452 B, a few per connection) cost kilobytes per session, several times what a sync of a
/// few records sends on a hotspot; frames fit the 1,200-byte minimum MTU every path carries.
fn transport_config() -> iroh::endpoint::QuicTransportConfig {
    iroh::endpoint::QuicTransportConfig::builder()
        .mtu_discovery_config(None)
        .build()
}
