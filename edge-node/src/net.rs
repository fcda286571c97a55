//! The device's network shell: an iroh endpoint that carries sync sessions to the hub and
//! to sibling devices, and accepts siblings' sessions. It moves frames; the session in
//! `shared::sync` decides everything, and [`crate::device::Device`] stores what it merged.
//!
//! No relays and no public discovery: peers are dialled at the addresses the ticket (or the
//! hub's refresh since: names resolved at each dial, `crate::hub_addrs`), the hub's roster or
//! `--peer` gave, each attempt bounded by a short timeout (a dead
//! address would otherwise hold a QUIC connect for its 30 s idle timeout).

use crate::device::Device;
use crate::replica::Replica;
use iroh::endpoint::{RecvStream, SendStream, presets};
use iroh::{Endpoint, EndpointAddr, PublicKey, SecretKey};
use serde::Serialize;
use shared::PartitionId;
use shared::sync::driver::{self, Abort, End as DriverEnd, Link, Shell};
use shared::sync::{ALPN, ALPN_V1, Frame, FrameDecoder, Peer};
use shared::sync::{Decision, PeerHello, Session, WireStats};
use shared::ticket::Refresh;
use shared::time::UnixSeconds;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a dial may take before the peer counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a session may wait for the peer's next bytes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How many sibling connections may be open at once (in their handshake, roster check or
/// session); more are refused at once. A stranger on the LAN gets no further than the roster
/// check, each step of which is bounded by [`CONNECT_TIMEOUT`].
pub const MAX_SIBLING_HANDSHAKES: usize = 16;
/// How many sessions a device serves to its siblings at once. A facility has a handful of
/// entrance devices, each relaying at most once per change.
pub const MAX_SIBLING_SESSIONS: usize = 4;
/// The longest a session served to a sibling may run, however it trickles its bytes.
pub const SIBLING_SESSION_TIME: Duration = Duration::from_secs(300);
/// The most bytes a sibling may send in one session (frames as decoded): a busy facility-day
/// of 200,000 visits is about 30 MB.
pub const SIBLING_SESSION_BYTES: u64 = 64 * 1024 * 1024;

/// Bounds on the sessions a device serves to its siblings. A sibling is a device of the
/// hub's roster, but a stolen one is still on the roster until the hub revokes it: without
/// bounds it could hold any number of sessions, send without limit and trickle bytes forever
/// (finding 9 of the sync v2 review).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiblingLimits {
    /// Sessions served at once ([`MAX_SIBLING_SESSIONS`]).
    pub max_sessions: usize,
    /// Wall-clock limit of one session ([`SIBLING_SESSION_TIME`]).
    pub session_time: Duration,
    /// Bytes one session may send ([`SIBLING_SESSION_BYTES`]).
    pub session_bytes: u64,
}

impl Default for SiblingLimits {
    fn default() -> Self {
        SiblingLimits {
            max_sessions: MAX_SIBLING_SESSIONS,
            session_time: SIBLING_SESSION_TIME,
            session_bytes: SIBLING_SESSION_BYTES,
        }
    }
}

impl SiblingLimits {
    /// The defaults, with `EDGE_NODE_SIBLING_SESSION_SECS` and `EDGE_NODE_SIBLING_SESSION_BYTES`
    /// (positive numbers) in their place when set: tests and operators tighten them.
    pub fn from_env() -> Self {
        let positive = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&n| n > 0)
        };
        let mut limits = SiblingLimits::default();
        if let Some(secs) = positive("EDGE_NODE_SIBLING_SESSION_SECS") {
            limits.session_time = Duration::from_secs(secs);
        }
        if let Some(bytes) = positive("EDGE_NODE_SIBLING_SESSION_BYTES") {
            limits.session_bytes = bytes;
        }
        limits
    }
}

/// What the sessions a device serves to siblings share: the handshake and session slots and
/// the siblings being served (one session per sibling at a time).
#[derive(Debug, Clone)]
pub struct SiblingGate {
    limits: SiblingLimits,
    handshakes: Arc<tokio::sync::Semaphore>,
    sessions: Arc<tokio::sync::Semaphore>,
    serving: Arc<Mutex<std::collections::HashSet<PublicKey>>>,
}

impl SiblingGate {
    /// A gate with `limits`.
    pub fn new(limits: SiblingLimits) -> Self {
        SiblingGate {
            limits,
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_SIBLING_HANDSHAKES)),
            sessions: Arc::new(tokio::sync::Semaphore::new(limits.max_sessions.max(1))),
            serving: Arc::new(Mutex::new(Default::default())),
        }
    }

    /// A handshake slot for a new connection, or `None` when all are taken (refuse it).
    pub fn handshake(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.handshakes.clone().try_acquire_owned().ok()
    }
}

/// A sibling being served; it leaves the gate's set when dropped.
struct Serving {
    serving: Arc<Mutex<std::collections::HashSet<PublicKey>>>,
    remote: PublicKey,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.serving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.remote);
    }
}

/// The bounds of one served session: when it must end, how many bytes it may still send.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    deadline: tokio::time::Instant,
    limits: SiblingLimits,
}

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
    /// Names to resolve at each dial, their addresses tried too (the hub's `NAME:PORT`
    /// addresses; empty for siblings).
    pub names: Vec<shared::hub_addr::HubAddr>,
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
    /// Whether the peer was one of the region's hubs (not printed: the JSON is unchanged).
    #[serde(skip)]
    pub is_hub: bool,
    /// When a side refused: which (`local` or `peer`).
    pub refused_by: Option<String>,
    /// When a side refused: the reason (`Revoked`, `InvalidChange`, ...).
    pub reason: Option<String>,
}

/// The device-store setting holding the last sync session that did not complete, for
/// `status` (a separate process from the `run` that synced).
pub const LAST_SYNC_FAILURE: &str = "last_sync_failure";

/// The last sync session that was refused or failed (`status`'s `last_sync_failure`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SyncFailure {
    /// When it ended, Unix seconds of the device's clock.
    pub at: u64,
    /// The peer: `hub` or a sibling's short endpoint id.
    pub peer: String,
    /// Who refused (`local` or `peer`); absent for failures that were not refusals (a
    /// timeout, a lost connection).
    pub refused_by: Option<String>,
    /// The refusal's reason (`Revoked`, `UnknownDevice`, `InvalidChange`, `QuotaExceeded`, ...).
    pub reason: Option<String>,
    /// What went wrong, as the session reported it.
    pub detail: String,
}

/// The last sync failure this device stored, if any (an unreadable one counts as none).
pub fn last_sync_failure(device: &Device) -> Option<SyncFailure> {
    let bytes = device.store().get(LAST_SYNC_FAILURE).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Stores `failure` as the device's last; a store that cannot take it is logged, not fatal.
fn note_failure(device: &SharedDevice, failure: &SyncFailure) {
    tracing::warn!(
        peer = %failure.peer,
        reason = ?failure.reason,
        "sync did not complete: {}",
        failure.detail
    );
    let Ok(json) = serde_json::to_vec(failure) else {
        return;
    };
    if let Err(e) = lock(device).store().put(&[(LAST_SYNC_FAILURE, &json)]) {
        tracing::warn!("cannot store the last sync failure: {e}");
    }
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
        // v1 is accepted only to tell a sibling to upgrade (`serve_sibling`).
        .alpns(vec![ALPN.to_vec(), ALPN_V1.to_vec()])
        .transport_config(transport_config())
        .clear_ip_transports()
        .bind_addr(listen)
        .map_err(|e| bind_err(e.to_string()))?
        .bind()
        .await
        .map_err(|e| bind_err(e.to_string()))
}

/// The region's hubs in the order a sync round dials them: the hub whose session completed
/// last first, then the other (the enrolled hub first when neither has). Each is dialled with
/// the short [`CONNECT_TIMEOUT`], so a dead hub costs one timeout before the other answers.
/// The enrolled hub is labelled `hub`, the peer `peer hub`.
pub fn hub_targets(device: &Device) -> Result<Vec<Target>, NetError> {
    let mut out = vec![hub_target(device)?];
    if let Some(p) = device.peer_hub() {
        // A peer of damaged fields is skipped; the enrolled hub still serves.
        match (
            p.contact.endpoint_id.parse::<PublicKey>(),
            shared::hub_addr::parse_list(&p.contact.addrs),
        ) {
            (Ok(id), Ok(list)) => out.push(Target {
                label: "peer hub".into(),
                id,
                addrs: list
                    .iter()
                    .filter_map(shared::hub_addr::HubAddr::socket)
                    .collect(),
                names: list.into_iter().filter(|a| a.socket().is_none()).collect(),
                is_hub: true,
            }),
            _ => {
                tracing::warn!("the stored peer hub is damaged; syncing with the enrolled hub only")
            }
        }
    }
    if let Some(last) = device.last_hub()
        && let Some(i) = out
            .iter()
            .position(|t| t.id.to_string().eq_ignore_ascii_case(&last))
    {
        out.swap(0, i);
    }
    Ok(out)
}

/// The hub as the enrollment names it, at the addresses it last advertised (the ticket's
/// until a refresh moved them): socket addresses, and names resolved when it is dialled.
pub fn hub_target(device: &Device) -> Result<Target, NetError> {
    let hub = &device.enrollment().hub;
    let id: PublicKey = hub
        .endpoint_id
        .parse()
        .map_err(|_| NetError::Connection("hub".into(), "the enrolled hub id is damaged".into()))?;
    let (addrs, names) = crate::hub_addrs::split(device);
    Ok(Target {
        label: "hub".into(),
        id,
        addrs,
        names,
        is_hub: true,
    })
}

/// Sibling devices from the hub's roster (those with an address): at the addresses their
/// beacons came from on the local network (`crate::lan`), newest first, then where the hub
/// last saw them.
pub fn roster_targets(device: &Device) -> Result<Vec<Target>, NetError> {
    let seen = crate::lan::sightings(device);
    let now = crate::clock::now();
    Ok(device
        .roster()?
        .into_iter()
        .filter_map(|s| {
            let id: PublicKey = s.endpoint_id.parse().ok()?;
            let addrs = shared::lan::dial_addrs(&s, &seen, now);
            (!addrs.is_empty()).then_some(Target {
                label: s.device_id.to_string(),
                id,
                addrs,
                names: Vec::new(),
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
        names: Vec::new(),
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
        is_hub: target.is_hub,
        ..SyncReport::default()
    };
    match sync_inner(endpoint, device, target, &now, &mut report).await {
        Ok(()) => {
            report.ok = true;
            if !target.is_hub {
                crate::lan::note_reached(device, &target.id.to_string(), now());
            }
        }
        Err(e) => {
            report.error = Some(e.to_string());
            note_failure(
                device,
                &SyncFailure {
                    at: now(),
                    peer: report.peer.clone(),
                    refused_by: report.refused_by.clone(),
                    reason: report.reason.clone(),
                    detail: e.to_string(),
                },
            );
        }
    }
    crate::metrics::note_session(target.is_hub, &target.id.to_string(), &report);
    report
}

async fn sync_inner(
    endpoint: &Endpoint,
    device: &SharedDevice,
    target: &Target,
    now: &impl Fn() -> u64,
    report: &mut SyncReport,
) -> Result<(), NetError> {
    // Records are not handed to a sibling the hub has revoked (a stolen device), whether the
    // roster still lists it or `--peer` names it.
    if !target.is_hub
        && lock(device)
            .revocation_list()?
            .is_some_and(|l| l.revokes_endpoint(&target.id.to_string()))
    {
        return Err(NetError::Session(
            target.label.clone(),
            "the hub has revoked this device; it is not dialled".into(),
        ));
    }
    let hub_id = target.id.to_string();
    // A hub session only with one of the region's hubs (a target built from the store is;
    // this holds should the store change between building and dialling).
    if target.is_hub && !lock(device).is_region_hub(&hub_id) {
        return Err(NetError::Session(
            target.label.clone(),
            "not one of this device's region's hubs; it is not dialled".into(),
        ));
    }
    let addrs = crate::hub_addrs::dial_addrs(
        device,
        &target.addrs,
        &target.names,
        &crate::hub_addrs::SystemResolver,
    )
    .await;
    if addrs.is_empty() {
        return Err(NetError::Connection(
            target.label.clone(),
            "no address to dial: its names did not resolve and none is remembered".into(),
        ));
    }
    let mut addr = EndpointAddr::new(target.id);
    for a in addrs {
        addr = addr.with_ip_addr(a);
    }
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect(addr, ALPN))
        .await
        .map_err(|_| NetError::Timeout(target.label.clone(), CONNECT_TIMEOUT))?
        .map_err(|e| NetError::Connection(target.label.clone(), connect_error(&e, target)))?;
    // iroh authenticates the endpoint dialled; the session trusts nothing else.
    if conn.remote_id() != target.id {
        conn.close(1u32.into(), b"unexpected endpoint");
        return Err(NetError::Session(
            target.label.clone(),
            "the endpoint that answered is not the one dialled".into(),
        ));
    }
    let hub = target.is_hub.then_some(hub_id.as_str());
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| NetError::Connection(target.label.clone(), e.to_string()))?;
    let session = {
        let mut dev = lock(device);
        let t = now();
        dev.preload(t)?;
        let e = dev.enrollment().clone();
        let me = Peer::Device {
            device: e.device_id.clone(),
            facility: e.facility.id.clone(),
        };
        // The credential goes to each hub until that hub has admitted this device.
        let credential = match hub {
            Some(h) => dev.credential_for(h)?.map(|c| c.0),
            None => None,
        };
        // Who the target is, when this device knows: the hub it enrolled with, or a sibling of
        // its roster. Its hello then leaves out partitions unchanged since their last session.
        let to = if target.is_hub {
            Some(Peer::Hub {
                region: e.hub.region.clone(),
            })
        } else {
            dev.roster()?
                .into_iter()
                .find(|s| s.endpoint_id.parse::<PublicKey>().ok() == Some(target.id))
                .map(|s| Peer::Device {
                    device: s.device_id,
                    facility: e.facility.id.clone(),
                })
        };
        // To a sibling: only when this device holds a revocation list, so that the sibling
        // sends a newer one only (without, it sends the one it holds, if any).
        let refresh_have = if target.is_hub || dev.revocation_list()?.is_some() {
            Some(dev.refresh_have_for(t, hub)?.to_bytes())
        } else {
            None
        };
        Session::initiator_to(
            t,
            me,
            to.as_ref(),
            credential,
            refresh_have,
            // A device hands its records on and takes none back: it cannot read them, and the
            // hub (or the sibling that relays them) keeps them.
            true,
            &Replica {
                device: &mut dev,
                now: t,
                hub,
            },
        )
        .map_err(|e| NetError::Session(target.label.clone(), e.to_string()))?
    };
    let mut link = Link::new(session);
    let outcome = drive(&mut link, &mut send, &mut recv, device, now, hub, None).await;
    let stats = conn.stats();
    report.socket_bytes_sent = stats.udp_tx.bytes;
    report.socket_bytes_received = stats.udp_rx.bytes;
    conn.close(0u32.into(), b"done");
    let result = outcome?;
    report.records_received = result.new_records;
    report.frame_bytes_sent = result.stats.bytes_sent;
    report.frame_bytes_received = result.stats.bytes_received;
    if let Some((by, reason)) = result.refusal {
        report.refused_by = Some(by);
        report.reason = Some(reason);
    }
    match result.end {
        End::Finished => Ok(()),
        End::Failed(why) => Err(NetError::Session(target.label.clone(), why)),
    }
}

/// What a failed dial says: the reason, or, when the peer does not accept [`ALPN`] (it
/// speaks an older protocol version), which side the operator has to upgrade.
fn connect_error(e: &iroh::endpoint::ConnectError, target: &Target) -> String {
    if !refused_our_alpn(e) {
        return e.to_string();
    }
    if target.is_hub {
        "the hub does not speak sync protocol v2 (kipass/sync/2): upgrade sync-hub".into()
    } else {
        "the sibling does not speak sync protocol v2 (kipass/sync/2): upgrade its edge-node".into()
    }
}

/// Whether the peer ended the handshake with TLS alert 120 (`no_application_protocol`): it
/// accepts none of the ALPNs offered, that is, not this protocol version.
fn refused_our_alpn(e: &iroh::endpoint::ConnectError) -> bool {
    use iroh::endpoint::{ConnectError, ConnectingError, ConnectionError, TransportErrorCode};
    const NO_APPLICATION_PROTOCOL: u8 = 120;
    let conn_err = match e {
        ConnectError::Connecting {
            source: ConnectingError::ConnectionError { source, .. },
            ..
        }
        | ConnectError::Connection { source, .. } => source,
        _ => return false,
    };
    let code = TransportErrorCode::crypto(NO_APPLICATION_PROTOCOL);
    match conn_err {
        ConnectionError::ConnectionClosed(close) => close.error_code == code,
        ConnectionError::TransportError(t) => t.code == code,
        _ => false,
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
    /// (who refused, reason), when a side refused.
    refusal: Option<(String, String)>,
}

impl Outcome {
    /// What the driver's link says of a session that is over.
    fn of(link: &Link) -> Outcome {
        let end = match link.end() {
            // The session went on after a day's partition was refused, but that day was not
            // delivered: the round did not sync everything, and says which day and why.
            Some(DriverEnd::Completed) if !link.refused_partitions().is_empty() => {
                let why: Vec<String> = link
                    .refused_partitions()
                    .iter()
                    .map(|r| {
                        format!(
                            "{:?} refused partition {} ({:?}): {}",
                            r.by, r.partition, r.reason, r.detail
                        )
                    })
                    .collect();
                End::Failed(why.join("; "))
            }
            Some(DriverEnd::Completed) => End::Finished,
            Some(end) => End::Failed(end.to_string()),
            // A session that ends emits its end; should one not, it did not complete.
            None => End::Failed("the session ended without an outcome".into()),
        };
        Outcome {
            end,
            stats: link.stats(),
            new_records: link.new_records(),
            // The session's own refusal, else the last partition refused while it went on.
            refusal: link
                .end()
                .and_then(DriverEnd::refusal)
                .or_else(|| link.refused_partitions().last().map(|r| (r.by, r.reason)))
                .map(|(by, reason)| (format!("{by:?}").to_lowercase(), format!("{reason:?}"))),
        }
    }
}

/// The device's side of `shared::sync::driver`, for one step of a session (the device is
/// locked for the step, never across a network wait): persisting merged partitions into the
/// device's store, the hub's welcome (credential spent, refresh applied), recording a
/// completed hub session, and the frames to write once the step is over.
///
/// The failure rules are the driver's: a write that fails aborts the session
/// ([`RefuseReason::Internal`], so the peer is told and retries later), the device's
/// in-memory copy of the partition concerned is dropped (`Replica::discard_partition`) so the
/// next use reloads what is durable, and nothing more of the session is stored: no sync
/// state, no refresh, no "synced with the hub".
struct EdgeShell<'a, 'd> {
    link: &'a mut Link,
    replica: Replica<'d>,
    /// The hub's clock offset, stored when the session completes.
    clock_offset: &'a mut Option<i64>,
    /// Encoded frames to write after the step.
    outbox: &'a mut Vec<u8>,
    /// The hub's endpoint id when the peer is one of the region's hubs.
    hub: Option<&'a str>,
}

impl<'d> Shell for EdgeShell<'_, 'd> {
    type Store = Replica<'d>;

    fn link_and_store(&mut self) -> (&mut Link, &mut Replica<'d>) {
        (&mut *self.link, &mut self.replica)
    }

    fn admit(&mut self, _now: UnixSeconds, hello: &PeerHello) -> Decision {
        let dev: &Device = self.replica.device;
        let signed = match dev.signed_revocations() {
            Ok(s) => s,
            Err(e) => {
                return Decision::Refuse {
                    reason: shared::sync::RefuseReason::Internal,
                    detail: format!("cannot read the revocation list: {e}"),
                };
            }
        };
        // Refused when any list held names it (the region's hubs sign their own lists); the
        // newest list is the one handed on.
        let union = match dev.revocation_list() {
            Ok(u) => u,
            Err(e) => {
                return Decision::Refuse {
                    reason: shared::sync::RefuseReason::Internal,
                    detail: format!("cannot read the revocation list: {e}"),
                };
            }
        };
        let held = signed.as_ref().map(|s| &s.list);
        let decision = shared::device::admit_sibling_hello(
            &dev.enrollment().facility.id,
            union.as_ref(),
            hello,
        );
        // An admitted sibling gets this device's copy of the hub-signed revocation list when
        // its hello says it holds an older one (or says nothing): how a sibling that cannot
        // reach the hub learns of a revocation.
        let have = hello
            .refresh_have
            .as_deref()
            .and_then(shared::ticket::RefreshHave::from_bytes)
            .and_then(|h| h.revocations);
        match decision {
            Decision::Admit { facility, .. } if shared::revocation::sibling_sends(held, have) => {
                let refresh = Refresh {
                    revocations: signed,
                    ..Refresh::default()
                };
                Decision::Admit {
                    facility,
                    refresh: Some(refresh.to_bytes()),
                }
            }
            other => other,
        }
    }

    fn persist(
        &mut self,
        _now: UnixSeconds,
        id: &PartitionId,
        new_records: u64,
        _new_keys: u64,
    ) -> Result<(), Abort> {
        self.replica
            .device
            .persist_partition(id.day, new_records)
            .map_err(|e| Abort::internal(format!("cannot store partition {id}: {e}")))
    }

    fn welcomed(
        &mut self,
        _peer: &Peer,
        _peer_now: UnixSeconds,
        refresh: Option<Vec<u8>>,
    ) -> Result<(), Abort> {
        let Some(hub) = self.hub else {
            // From a sibling only its copy of the hub-signed revocation list is taken, and only
            // if it verifies and is newer; day keys, keyring, roster and addresses come from
            // the hub alone.
            let signed = refresh
                .and_then(|b| Refresh::from_bytes(&b).ok())
                .and_then(|r| r.revocations);
            if let Some(signed) = signed {
                self.replica
                    .device
                    .take_revocations(&signed, crate::device::ListSource::Sibling)
                    .map_err(|e| {
                        Abort::internal(format!("cannot store the revocation list: {e}"))
                    })?;
            }
            return Ok(());
        };
        let dev = &mut *self.replica.device;
        // The hub admitted us: our credential is bound there (and spent once every hub of the
        // region has admitted us).
        dev.admitted_by_hub(hub)
            .map_err(|e| Abort::internal(format!("cannot drop the spent credential: {e}")))?;
        if let Some(bytes) = refresh {
            match Refresh::from_bytes(&bytes) {
                Ok(r) => dev
                    .apply_refresh_from(hub, &r)
                    .map_err(|e| Abort::internal(format!("cannot store the hub's refresh: {e}")))?,
                Err(e) => tracing::warn!("ignoring the hub's refresh: {e}"),
            }
        }
        Ok(())
    }

    fn clock_offset(&mut self, seconds: i64) {
        *self.clock_offset = Some(seconds.saturating_neg());
    }

    fn completed(&mut self, now: UnixSeconds, _stats: &WireStats) -> Result<(), Abort> {
        let Some(hub) = self.hub else {
            return Ok(());
        };
        // A day whose partition was refused in this session was not delivered.
        let refused: Vec<shared::Day> = self
            .link
            .refused_partitions()
            .iter()
            .map(|r| r.partition.day)
            .collect();
        self.replica
            .device
            .mark_synced_with(hub, now, *self.clock_offset, &refused)
            .map_err(|e| Abort::internal(format!("cannot record the completed sync: {e}")))
    }

    fn partition_refused(&mut self, _now: UnixSeconds, r: &driver::RefusedPartition) {
        tracing::warn!(
            "partition {} refused by {:?} ({:?}): {}",
            r.partition,
            r.by,
            r.reason,
            r.detail
        );
    }

    fn ended(&mut self, _now: UnixSeconds, end: &DriverEnd) {
        if let DriverEnd::Aborted { detail, .. } = end {
            tracing::warn!("sync session aborted: {detail}");
        }
    }

    fn send(&mut self, frame: Frame) -> Result<(), Abort> {
        let bytes = frame
            .encode()
            .map_err(|e| Abort::internal(format!("cannot encode a frame: {e}")))?;
        self.outbox.extend_from_slice(&bytes);
        Ok(())
    }
}

/// What one step of a session does with the device locked.
enum Step {
    /// Flush what the session queued (an initiator's `Hello`).
    Start,
    /// A frame, its `Sync` message already read (before the device is locked).
    Frame(shared::sync::Inbound),
    Malformed(shared::sync::FrameError),
    Closed,
    /// This side ends the session (a served sibling over its bounds).
    Abort(Abort),
}

/// Runs one step through the driver with the device locked; returns the bytes to write.
fn step(
    device: &SharedDevice,
    link: &mut Link,
    clock_offset: &mut Option<i64>,
    now: &impl Fn() -> u64,
    hub: Option<&str>,
    input: Step,
) -> Vec<u8> {
    let mut dev = lock(device);
    let t = now();
    let mut outbox = Vec::new();
    let mut shell = EdgeShell {
        link,
        replica: Replica {
            device: &mut dev,
            now: t,
            hub,
        },
        clock_offset,
        outbox: &mut outbox,
        hub,
    };
    dispatch(&mut shell, t, input);
    outbox
}

/// Hands one input to the driver.
fn dispatch(shell: &mut EdgeShell<'_, '_>, t: UnixSeconds, input: Step) {
    match input {
        Step::Start => driver::pump(shell, t),
        Step::Frame(frame) => driver::handle_frame(shell, t, frame),
        Step::Malformed(e) => driver::handle_malformed(shell, t, e),
        Step::Closed => driver::handle_closed(shell, t),
        Step::Abort(why) => driver::abort(shell, t, why),
    }
}

/// Moves frames between the session and the stream until the session ends; each input is
/// one step of `shared::sync::driver` with the device locked.
async fn drive(
    link: &mut Link,
    send: &mut SendStream,
    recv: &mut RecvStream,
    device: &SharedDevice,
    now: &impl Fn() -> u64,
    hub: Option<&str>,
    served: Option<(Bounds, Serving)>,
) -> Result<Outcome, NetError> {
    let bounds = served.as_ref().map(|(b, _)| *b);
    let mut serving = served.map(|(_, s)| s);
    // A served sibling gets a Hello-sized buffer until its first frame (the Hello) is
    // handled, and the full frame size only then.
    let mut decoder = match bounds {
        Some(_) => FrameDecoder::with_limit(shared::sync::PRE_ADMISSION_FRAME_BYTES),
        None => FrameDecoder::new(),
    };
    let mut raised = bounds.is_none();
    let mut received: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let mut clock_offset = None;
    let mut out = step(device, link, &mut clock_offset, now, hub, Step::Start);
    loop {
        if link.is_finished() {
            // The sibling may start its next session as soon as it reads this one's end.
            drop(serving.take());
        }
        if !out.is_empty() {
            let written = send.write_all(&out).await;
            // Once the session is over a peer that closed first loses nothing.
            if let Err(e) = written
                && !link.is_finished()
            {
                return Err(NetError::Connection("peer".into(), e.to_string()));
            }
            out.clear();
        }
        if link.is_finished() {
            // What the end queued (a refusal, a last Done) is written; close our side.
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            return Ok(Outcome::of(link));
        }
        let read_until = tokio::time::Instant::now() + READ_TIMEOUT;
        let read_until = bounds.map_or(read_until, |b| read_until.min(b.deadline));
        let read = tokio::time::timeout_at(read_until, recv.read(&mut buf)).await;
        let mut inputs = Vec::new();
        match read {
            Err(_) if bounds.is_some_and(|b| tokio::time::Instant::now() >= b.deadline) => {
                let limit = bounds.map_or(Duration::ZERO, |b| b.limits.session_time);
                inputs.push(Step::Abort(Abort::new(
                    shared::sync::RefuseReason::QuotaExceeded,
                    format!(
                        "the session ran longer than this device's {} s for a sibling; what \
                         was stored stays, sync again to send the rest",
                        limit.as_secs()
                    ),
                )));
            }
            Err(_) => return Err(NetError::Timeout("peer".into(), READ_TIMEOUT)),
            Ok(Err(e)) => {
                tracing::debug!("stream ended: {e}");
                inputs.push(Step::Closed);
            }
            Ok(Ok(None)) => inputs.push(Step::Closed),
            Ok(Ok(Some(n))) => match decoder.push(&buf[..n]) {
                Err(e) => inputs.push(Step::Malformed(e)),
                Ok(()) => loop {
                    match decoder.pop_sized() {
                        Ok(Some((frame, len))) => {
                            if !raised {
                                decoder.set_limit(shared::sync::MAX_FRAME_BYTES);
                                raised = true;
                            }
                            if let Some(b) = bounds {
                                received = received.saturating_add(frame.quota_len());
                                if received > b.limits.session_bytes {
                                    inputs.push(Step::Abort(Abort::new(
                                        shared::sync::RefuseReason::QuotaExceeded,
                                        format!(
                                            "this session sent more than this device's {} \
                                             bytes for a sibling; what was stored stays, sync \
                                             again to send the rest",
                                            b.limits.session_bytes
                                        ),
                                    )));
                                    break;
                                }
                            }
                            // Read ahead, before the device is locked, only while the session
                            // takes `Sync` frames: a stranger's are refused unread.
                            let frame = if link.session().is_syncing() {
                                shared::sync::Inbound::read(frame, len)
                            } else {
                                shared::sync::Inbound::unread(frame, len)
                            };
                            inputs.push(Step::Frame(frame));
                        }
                        Ok(None) => break,
                        Err(e) => {
                            inputs.push(Step::Malformed(e));
                            break;
                        }
                    }
                },
            },
        }
        for input in inputs {
            out.extend(step(device, link, &mut clock_offset, now, hub, input));
        }
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
    gate: SiblingGate,
) -> Result<u64, NetError> {
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, incoming)
        .await
        .map_err(|_| NetError::Timeout("sibling".into(), CONNECT_TIMEOUT))?
        .map_err(|e| NetError::Connection("sibling".into(), e.to_string()))?;
    let remote = conn.remote_id();
    let (roster, revoked) = {
        let dev = lock(&device);
        (dev.roster()?, dev.revocation_list()?)
    };
    let operator: Vec<String> = trusted.iter().map(ToString::to_string).collect();
    if revoked
        .as_ref()
        .is_some_and(|l| l.revokes_endpoint(&remote.to_string()))
    {
        conn.close(3u32.into(), b"revoked by the hub");
        crate::metrics::note_served(&remote.to_string(), false, Some("Revoked"));
        return Err(NetError::Session(
            remote.fmt_short().to_string(),
            "refused: the hub has revoked this device".into(),
        ));
    }
    if !shared::device::sibling_endpoint_known(
        &roster,
        &operator,
        revoked.as_ref(),
        &remote.to_string(),
    ) {
        conn.close(1u32.into(), b"unknown endpoint");
        return Err(NetError::Session(
            remote.fmt_short().to_string(),
            "not a known sibling (not in the hub's roster nor --peer)".into(),
        ));
    }
    if conn.alpn() == ALPN_V1 {
        return Err(refuse_v1_sibling(&conn).await);
    }
    // One session per sibling, and at most the gate's sessions at once.
    let serving = {
        let mut serving = gate
            .serving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let busy = if serving.contains(&remote) {
            Some("a session of this sibling is already being served")
        } else {
            None
        };
        let slot = match busy {
            Some(_) => None,
            None => gate.sessions.clone().try_acquire_owned().ok(),
        };
        match slot {
            Some(slot) => {
                serving.insert(remote);
                Serving {
                    serving: gate.serving.clone(),
                    remote,
                    _slot: slot,
                }
            }
            None => {
                let why = busy.unwrap_or("this device is serving as many siblings as it may");
                conn.close(2u32.into(), why.as_bytes());
                return Err(NetError::Session(
                    remote.fmt_short().to_string(),
                    format!("refused: {why}"),
                ));
            }
        }
    };
    let (mut send, mut recv) = tokio::time::timeout(CONNECT_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| NetError::Timeout("sibling".into(), CONNECT_TIMEOUT))?
        .map_err(|e| NetError::Connection("sibling".into(), e.to_string()))?;
    let me = {
        let dev = lock(&device);
        let e = dev.enrollment();
        Peer::Device {
            device: e.device_id.clone(),
            facility: e.facility.id.clone(),
        }
    };
    let mut link = Link::new(Session::responder(me));
    let bounds = Bounds {
        deadline: tokio::time::Instant::now() + gate.limits.session_time,
        limits: gate.limits,
    };
    // The deadline bounds reads inside `drive`; this bounds the whole session, writes
    // included (a sibling that stops granting stream credit would otherwise hold its slot).
    let whole = bounds.deadline + Duration::from_secs(5);
    let out = tokio::time::timeout_at(
        whole,
        drive(
            &mut link,
            &mut send,
            &mut recv,
            &device,
            &now,
            None,
            Some((bounds, serving)),
        ),
    )
    .await
    .map_err(|_| NetError::Timeout("sibling".into(), gate.limits.session_time))??;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    let ok = matches!(out.end, End::Finished);
    let reason = out.refusal.as_ref().map(|r| r.1.as_str());
    crate::metrics::note_served(&remote.to_string(), ok, reason);
    match out.end {
        End::Finished => Ok(out.new_records),
        End::Failed(why) => {
            let (refused_by, reason) = out.refusal.unzip();
            note_failure(
                &device,
                &SyncFailure {
                    at: now(),
                    peer: remote.fmt_short().to_string(),
                    refused_by,
                    reason,
                    detail: why.clone(),
                },
            );
            Err(NetError::Session(remote.fmt_short().to_string(), why))
        }
    }
}

/// A sibling that dialled with sync protocol v1: one v1 `Refused` frame telling its operator
/// to upgrade (`shared::sync::legacy`), then close; no session. Returns the error to log.
async fn refuse_v1_sibling(conn: &iroh::endpoint::Connection) -> NetError {
    let remote = conn.remote_id().fmt_short().to_string();
    // The v1 initiator opens the stream with its Hello; bounded like a dial.
    if let Ok(Ok((mut send, _recv))) = tokio::time::timeout(CONNECT_TIMEOUT, conn.accept_bi()).await
    {
        let detail = shared::sync::legacy::sibling_upgrade_detail(env!("CARGO_PKG_VERSION"));
        if send
            .write_all(&shared::sync::legacy::v1_refusal(&detail))
            .await
            .is_ok()
        {
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        }
    }
    conn.close(0u32.into(), b"sync protocol v1: upgrade edge-node");
    NetError::Session(
        remote,
        format!(
            "the sibling speaks sync protocol v1: refused; upgrade its edge-node to {} or later",
            env!("CARGO_PKG_VERSION")
        ),
    )
}

/// QUIC settings for sync links: no path-MTU discovery. Its probes (padded datagrams up to
/// 1,452 B, a few per connection) cost kilobytes per session, several times what a sync of a
/// few records sends on a hotspot; frames fit the 1,200-byte minimum MTU every path carries.
fn transport_config() -> iroh::endpoint::QuicTransportConfig {
    iroh::endpoint::QuicTransportConfig::builder()
        .mtu_discovery_config(None)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;
    use shared::daykey::DayKeyRatchet;
    use shared::facility::{BusinessNumber, Facility, FacilityStatus, Registration};
    use shared::ticket::{Credential, EnrollmentTicket, HubContact, TICKET_KIND, TICKET_VERSION};
    use shared::time::Day;
    use shared::token::{Keyring, TestIssuer, Verdict};
    use shared::{DeviceId, FacilityId};

    /// Noon UTC of some day in 2025.
    const NOON: u64 = 20_200 * 86_400 + 12 * 3600;

    fn issuer() -> TestIssuer {
        TestIssuer::new([0x11; 32], 1, 1)
    }

    /// A device of facility `f-test` enrolled in `tmp/name`.
    fn enrolled(tmp: &tempfile::TempDir, name: &str, device_id: &str) -> Device {
        let day = Day::of(NOON);
        let ratchet = DayKeyRatchet::generate(&mut OsRng, day);
        let mut keyring = Keyring::new();
        keyring
            .insert(issuer().keyring_entry("test", 1_577_836_800, 4_102_444_800))
            .expect("a fresh keyring takes a key");
        let ticket = EnrollmentTicket {
            kind: TICKET_KIND.into(),
            version: TICKET_VERSION,
            issued_at: NOON,
            hub: HubContact {
                endpoint_id: "ab".repeat(32),
                addrs: vec!["127.0.0.1:7447".into()],
                region: "mapo".into(),
            },
            facility: Facility {
                id: FacilityId::parse("f-test").expect("an id"),
                registration: Registration {
                    name: "Star Karaoke".into(),
                    business_number: Some(BusinessNumber::parse("123-45-67891").expect("valid")),
                    representative: "Kim".into(),
                    phone: "02-123-4567".into(),
                    category: "karaoke".into(),
                    region: "mapo".into(),
                    address: "1 Wausan-ro".into(),
                },
                status: FacilityStatus::Approved,
                registered_at: NOON,
            },
            device_id: DeviceId::parse(device_id).expect("an id"),
            device_name: name.into(),
            credential: Credential([7; 32]),
            keyring,
            authority_recipient: ratchet.public(day).expect("the first day").recipient,
            day_keys: ratchet.publics(day, 35),
            peer_hubs: Vec::new(),
        };
        let path = tmp.path().join(format!("{name}.ticket"));
        std::fs::write(&path, ticket.to_json()).expect("write the ticket");
        Device::init(&tmp.path().join(name), &path, NOON).expect("enroll")
    }

    fn scan(dev: &mut Device, n: usize) {
        for i in 0..n {
            let mut token = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut OsRng, &mut token);
            let code = issuer().issue(NOON + i as u64, 60, token);
            let r = dev.check_in(NOON + i as u64, &code).expect("check in");
            assert_eq!(r.verdict, Verdict::Accepted);
        }
    }

    fn me(dev: &Device) -> Peer {
        let e = dev.enrollment();
        Peer::Device {
            device: e.device_id.clone(),
            facility: e.facility.id.clone(),
        }
    }

    /// One side of an in-memory session: its device, link and clock offset.
    struct Node<'a> {
        dev: &'a mut Device,
        link: Link,
        clock_offset: Option<i64>,
        hub: Option<String>,
    }

    impl Node<'_> {
        /// One step through the driver, as `step` runs it; returns the frames sent.
        fn step(&mut self, input: Step) -> Vec<Frame> {
            let t = NOON + 600;
            let mut outbox = Vec::new();
            let mut shell = EdgeShell {
                link: &mut self.link,
                replica: Replica {
                    device: &mut *self.dev,
                    now: t,
                    hub: self.hub.as_deref(),
                },
                clock_offset: &mut self.clock_offset,
                outbox: &mut outbox,
                hub: self.hub.as_deref(),
            };
            dispatch(&mut shell, t, input);
            let mut decoder = FrameDecoder::new();
            decoder.push(&outbox).expect("own frames decode");
            let mut frames = Vec::new();
            while let Some(f) = decoder.pop().expect("own frames decode") {
                frames.push(f);
            }
            frames
        }
    }

    /// Runs a sibling session between `a` (initiator; `a_is_hub_session` makes it act as
    /// towards the hub) and `b` (responder) in memory, each side through the driver with the
    /// device's shell, until neither moves; bounded. `before_a` runs before each frame `a`
    /// takes. Returns both links and the kinds of the frames `b` sent.
    fn session_with(
        a: &mut Device,
        b: &mut Device,
        a_is_hub_session: bool,
        mut before_a: impl FnMut(&Device),
    ) -> (Link, Link, Vec<&'static str>) {
        let now = NOON + 600;
        a.preload(now).expect("preload");
        // Push-only, as every device's session is (siblings refuse any other).
        let sa = Session::initiator_to(
            now,
            me(a),
            None,
            None,
            None,
            true,
            &Replica {
                device: &mut *a,
                now,
                hub: None,
            },
        )
        .expect("initiator");
        let a_hub = a_is_hub_session.then(|| a.enrollment().hub.endpoint_id.clone());
        let sb = Session::responder(me(b));
        let mut na = Node {
            dev: a,
            link: Link::new(sa),
            clock_offset: None,
            hub: a_hub,
        };
        let mut nb = Node {
            dev: b,
            link: Link::new(sb),
            clock_offset: None,
            hub: None,
        };
        let mut b_sent = Vec::new();
        let mut to_b = na.step(Step::Start);
        for _ in 0..200 {
            let mut to_a = Vec::new();
            for f in std::mem::take(&mut to_b) {
                to_a.extend(nb.step(Step::Frame(f.into())));
            }
            b_sent.extend(to_a.iter().map(Frame::kind));
            for f in to_a {
                before_a(na.dev);
                to_b.extend(na.step(Step::Frame(f.into())));
            }
            if to_b.is_empty() {
                break;
            }
        }
        assert!(
            na.link.is_finished() && nb.link.is_finished(),
            "the session ended"
        );
        (na.link, nb.link, b_sent)
    }

    fn session(a: &mut Device, b: &mut Device) -> (Link, Link, Vec<&'static str>) {
        session_with(a, b, false, |_| {})
    }

    fn failed(link: &Link) -> Option<String> {
        match link.end() {
            Some(DriverEnd::Completed) | None => None,
            Some(end) => Some(end.to_string()),
        }
    }

    #[test]
    fn a_partition_the_store_refuses_aborts_the_session_and_is_reloaded_from_disk() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut a = enrolled(&tmp, "a", "d-00000000000000aa");
        let mut b = enrolled(&tmp, "b", "d-00000000000000bb");
        scan(&mut a, 3);
        let day = Day::of(NOON);

        b.store().fail_writes(true);
        let (la, lb, b_sent) = session(&mut a, &mut b);
        b.store().fail_writes(false);
        let why = failed(&lb).expect("the refusing side's session failed");
        assert!(why.contains("cannot store partition"), "{why}");
        assert!(lb.failure().is_some());
        assert_eq!(lb.new_records(), 0, "nothing counted that is not durable");
        // The peer is told, and takes no `Done` of this side after the failure (the one the
        // failing step queued is not sent): both ends say why.
        assert_eq!(b_sent.last(), Some(&"Refused"), "{b_sent:?}");
        match la.end() {
            Some(DriverEnd::Refused {
                by: shared::sync::Side::Peer,
                reason: shared::sync::RefuseReason::Internal,
                ..
            }) => {}
            e => panic!("the initiator is told: {e:?}"),
        }
        // No sync state of the failed session was stored, and memory holds what disk holds.
        let peer_key = crate::replica::peer_key(&me(&a), None);
        assert_eq!(b.store().sync_state(&peer_key, day).expect("read"), None);
        assert_eq!(b.partition(day).expect("reload").record_count(), 0);

        // The next session moves the records for real: the merge was not kept in memory
        // (where it would have hidden them from the sync and never reached the disk).
        let (la, lb, _) = session(&mut a, &mut b);
        assert_eq!(failed(&lb), None);
        assert_eq!(failed(&la), None);
        assert_eq!(lb.new_records(), 3);
        drop(b);
        let b = Device::open(&tmp.path().join("b")).expect("reopen");
        assert_eq!(b.status(NOON + 700).expect("status").records, 3);
    }

    #[test]
    fn a_finished_hub_session_after_a_failed_write_delivers_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut a = enrolled(&tmp, "a", "d-00000000000000aa");
        let mut b = enrolled(&tmp, "b", "d-00000000000000bb");
        scan(&mut a, 2);
        // `a` syncs as with its hub; after the welcome (its first frame from `b`) every write
        // of `a` fails: its sync states at the end, then recording the completed sync.
        let mut frames = 0;
        let (la, _lb, _) = session_with(&mut a, &mut b, true, |dev| {
            frames += 1;
            if frames == 2 {
                dev.store().fail_writes(true);
            }
        });
        a.store().fail_writes(false);
        let why = failed(&la).expect("the session failed");
        assert!(why.contains("sync state"), "{why}");
        let status = a.status(NOON + 700).expect("status");
        assert_eq!(status.unsynced, 2, "no record counted as delivered");
        assert_eq!(status.last_sync, None);
    }

    #[test]
    fn a_sibling_named_by_any_held_list_is_refused_not_only_by_the_newest() {
        use shared::revocation::{RevocationList, RevokedDevice};
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut a = enrolled(&tmp, "a", "d-00000000000000aa");
        let mut b = enrolled(&tmp, "b", "d-00000000000000bb");
        scan(&mut a, 1);
        let hub = b.enrollment().hub.clone();
        let peer = |secret: u8| shared::ticket::PeerHub {
            contact: HubContact {
                endpoint_id: SecretKey::from_bytes(&[secret; 32]).public().to_string(),
                addrs: vec!["127.0.0.1:7448".into()],
                region: hub.region.clone(),
            },
            day_keys: Vec::new(),
        };
        let list = |device: &str, issued_at: u64| RevocationList {
            facility: b.enrollment().facility.id.clone(),
            version: 1,
            issued_at,
            devices: vec![RevokedDevice {
                device_id: DeviceId::parse(device).expect("an id"),
                endpoint_id: None,
                revoked_at: 1,
            }],
        };
        let with_peer = |secret: u8| Refresh {
            peer_hub: Some(peer(secret)),
            ..Refresh::default()
        };
        // The peer hub revokes `a`; then a rebuilt peer signs a newer list naming another.
        let names_a = list("d-00000000000000aa", NOON).sign(&[8; 32]);
        let names_c = list("d-00000000000000cc", NOON + 100).sign(&[9; 32]);
        b.apply_refresh_from(&hub.endpoint_id, &with_peer(8))
            .expect("peer");
        assert!(
            b.take_revocations(&names_a, crate::device::ListSource::Hub)
                .expect("take")
        );
        b.apply_refresh_from(&hub.endpoint_id, &with_peer(9))
            .expect("rebuilt peer");
        assert!(
            b.take_revocations(&names_c, crate::device::ListSource::Hub)
                .expect("take")
        );
        assert_eq!(b.signed_revocations().expect("read"), Some(names_c));
        let (la, _lb, _) = session(&mut a, &mut b);
        let why = failed(&la).expect("refused");
        assert!(why.contains("Revoked") || why.contains("revoked"), "{why}");
    }
}
