//! `sync-hub run`: the iroh sync endpoint and the actor that owns the hub's state.
//!
//! One thread (the actor) owns the store, the key files and the ledger, and runs every
//! sync session's state machine; connection tasks only move bytes and frames to and from it
//! over channels (the redb-owned-by-one-actor shape of iroh-docs). Admission is decided here,
//! against the registry: a device is admitted only if its endpoint id is the one bound to
//! it, or it presents its ticket's unused credential (which then binds it).

use crate::admin::{DAY_KEYS_AHEAD, Hub, HubError};
use crate::auth::Principal;
use crate::clock;
use crate::ledger::{Ledger, Persisted, PurgeReport, Stats};
use crate::people::{self, OpError};
use crate::store::DeviceRecord;
use iroh::endpoint::presets;
use iroh::{Endpoint, PublicKey, SecretKey};
use shared::facility::FacilityStatus;
use shared::partition::Partition;
use shared::sync::harness::MemoryStore;
use shared::sync::{
    ALPN, Decision, Event, Frame, FrameDecoder, FrameError, PartitionStore, Peer, PeerHello,
    RefuseReason, Session,
};
use shared::ticket::{Credential, Refresh, Sibling};
use shared::time::Day;
use shared::{DeviceId, FacilityId, PartitionId, UnixSeconds};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;
use tokio::sync::{mpsc as tmpsc, oneshot};

/// How long a session may wait for the device's next bytes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often retention runs while the hub is up.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// A device clock further off than this is flagged.
pub const CLOCK_WARNING_SECONDS: i64 = 300;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Sessions that completed.
    pub sessions_completed: AtomicU64,
    /// Sessions refused (admission) or failed.
    pub sessions_failed: AtomicU64,
    /// Devices refused at admission.
    pub refused_devices: AtomicU64,
    /// Records newly indexed.
    pub records_ingested: AtomicU64,
    /// UDP bytes received on sync connections.
    pub bytes_received: AtomicU64,
    /// UDP bytes sent on sync connections.
    pub bytes_sent: AtomicU64,
    /// Retention runs.
    pub retention_runs: AtomicU64,
    /// Records indexed whose session key was wrapped to an earlier day's key (the device's
    /// day-key fallback): readable only until that earlier day expires.
    pub records_fallback_key: AtomicU64,
}

/// A question for the actor from HTTP or a command going through the running hub.
pub enum Request {
    /// `stats`.
    Stats(oneshot::Sender<Result<Stats, String>>),
    /// `purge`, asked for by `who`: checked and audited by [`people::purge`].
    Purge {
        /// Who asks (only the local operator may move retention ahead of the clock).
        who: Principal,
        /// Retention as of this time (never earlier than now).
        as_of: Option<UnixSeconds>,
        /// The answer.
        reply: oneshot::Sender<Result<PurgeReport, OpError>>,
    },
    /// Run an administrative closure on the hub (facility approval and the like).
    Admin(AdminJob),
    /// Run a closure on the hub and its ledger (the people's API: traces, reports,
    /// administration, metrics); it replies through what it captured.
    Query(QueryJob),
}

/// A purge asked for: who, the time asked for, where the answer goes.
type PurgeAsked = (
    Principal,
    Option<UnixSeconds>,
    oneshot::Sender<Result<PurgeReport, OpError>>,
);

/// An administrative operation for the actor to run on the hub.
pub type AdminJob = Box<dyn FnOnce(&Hub) -> Result<serde_json::Value, String> + Send>;

/// An operation for the actor to run on the hub and its ledger.
pub type QueryJob = Box<dyn FnOnce(&Hub, &Ledger<'_>, &Metrics) + Send>;

enum Input {
    Open {
        conn: u64,
        remote: PublicKey,
        addr: Option<SocketAddr>,
        reply: tmpsc::UnboundedSender<Output>,
    },
    Frame {
        conn: u64,
        frame: Frame,
    },
    Malformed {
        conn: u64,
        error: FrameError,
    },
    Closed {
        conn: u64,
    },
    Request(Request),
    Tick,
    Stop,
}

enum Output {
    Bytes(Vec<u8>),
    Close,
}

/// A handle to the running actor.
#[derive(Clone)]
pub struct HubHandle {
    tx: mpsc::Sender<Input>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl HubHandle {
    /// Sends a request to the actor.
    pub fn request(&self, r: Request) -> Result<(), String> {
        self.tx
            .send(Input::Request(r))
            .map_err(|_| "the hub has stopped".to_owned())
    }

    /// `stats` through the actor.
    pub async fn stats(&self) -> Result<Stats, String> {
        let (tx, rx) = oneshot::channel();
        self.request(Request::Stats(tx))?;
        rx.await.map_err(|_| "the hub has stopped".to_owned())?
    }

    /// `purge` through the actor, asked for by `who`; `Err` if the hub has stopped.
    pub async fn purge(
        &self,
        who: Principal,
        as_of: Option<UnixSeconds>,
    ) -> Result<Result<PurgeReport, OpError>, String> {
        let (reply, rx) = oneshot::channel();
        self.request(Request::Purge { who, as_of, reply })?;
        rx.await.map_err(|_| "the hub has stopped".to_owned())
    }

    /// Runs `f` on the actor's hub and ledger, between sessions' frames.
    pub async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Hub, &Ledger<'_>, &Metrics) -> T + Send + 'static,
    ) -> Result<T, String> {
        let (reply, rx) = oneshot::channel();
        self.request(Request::Query(Box::new(move |hub, ledger, metrics| {
            let _ = reply.send(f(hub, ledger, metrics));
        })))?;
        rx.await.map_err(|_| "the hub has stopped".to_owned())
    }

    /// An administrative operation through the actor.
    pub async fn admin(
        &self,
        f: impl FnOnce(&Hub) -> Result<serde_json::Value, String> + Send + 'static,
    ) -> Result<serde_json::Value, String> {
        let (reply, rx) = oneshot::channel();
        self.request(Request::Admin(Box::new(move |hub| {
            let r = f(hub);
            let _ = reply.send(r.clone());
            r
        })))?;
        rx.await.map_err(|_| "the hub has stopped".to_owned())?
    }
}

struct Conn {
    session: Session,
    reply: tmpsc::UnboundedSender<Output>,
    remote: PublicKey,
    addr: Option<SocketAddr>,
    device: Option<DeviceId>,
    facility: Option<FacilityId>,
    clock_offset: Option<i64>,
    /// The partitions this session loaded, kept between its frames (each partition is read
    /// from redb once per session, not once per frame); dropped with the connection.
    cache: BTreeMap<PartitionId, Partition>,
}

/// Binds the hub's endpoint on `listen` (no relays, no discovery).
pub async fn bind(secret: SecretKey, listen: SocketAddr) -> Result<Endpoint, HubError> {
    let err =
        |e: String| HubError::Invalid(format!("cannot open the sync endpoint on {listen}: {e}"));
    Endpoint::builder(presets::Minimal)
        .secret_key(secret)
        .alpns(vec![ALPN.to_vec()])
        .transport_config(transport_config())
        .clear_ip_transports()
        .bind_addr(listen)
        .map_err(|e| err(e.to_string()))?
        .bind()
        .await
        .map_err(|e| err(e.to_string()))
}

/// Starts the actor thread over an open hub.
pub fn start(hub: Hub) -> Result<(HubHandle, std::thread::JoinHandle<()>), HubError> {
    let (tx, rx) = mpsc::channel();
    let metrics = Arc::new(Metrics::default());
    let m = metrics.clone();
    // Check the ledger opens before reporting success.
    Ledger::open(hub.store(), hub.keys()).map_err(|e| HubError::Invalid(e.to_string()))?;
    let thread = std::thread::Builder::new()
        .name("hub-actor".into())
        .spawn(move || actor(hub, rx, m))
        .map_err(|e| HubError::Invalid(format!("cannot start the hub actor: {e}")))?;
    Ok((HubHandle { tx, metrics }, thread))
}

/// Stops the actor.
pub fn stop(handle: &HubHandle) {
    let _ = handle.tx.send(Input::Stop);
}

/// Accepts sync connections until the endpoint closes.
pub async fn serve(endpoint: Endpoint, handle: HubHandle) {
    let next = Arc::new(AtomicU64::new(1));
    let retention = {
        let tx = handle.tx.clone();
        tokio::spawn(async move {
            loop {
                if tx.send(Input::Tick).is_err() {
                    break;
                }
                tokio::time::sleep(RETENTION_INTERVAL).await;
            }
        })
    };
    while let Some(incoming) = endpoint.accept().await {
        let id = next.fetch_add(1, Ordering::Relaxed);
        let handle = handle.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(incoming, id, handle).await {
                tracing::debug!("connection {id}: {e}");
            }
        });
    }
    retention.abort();
}

async fn connection(
    incoming: iroh::endpoint::Incoming,
    conn_id: u64,
    handle: HubHandle,
) -> Result<(), String> {
    let addr = match incoming.remote_addr() {
        iroh::endpoint::IncomingAddr::Ip(a) => Some(a),
        _ => None,
    };
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let remote = conn.remote_id();
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let (otx, mut orx) = tmpsc::unbounded_channel();
    handle
        .tx
        .send(Input::Open {
            conn: conn_id,
            remote,
            addr,
            reply: otx,
        })
        .map_err(|_| "hub stopped")?;
    let writer = async {
        while let Some(out) = orx.recv().await {
            match out {
                Output::Bytes(b) => {
                    if send.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Output::Close => break,
            }
        }
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    };
    let tx = handle.tx.clone();
    let reader = async move {
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(READ_TIMEOUT, recv.read(&mut buf)).await {
                Ok(Ok(Some(n))) => {
                    if let Err(error) = decoder.push(&buf[..n]) {
                        let _ = tx.send(Input::Malformed {
                            conn: conn_id,
                            error,
                        });
                        return;
                    }
                    loop {
                        match decoder.pop() {
                            Ok(Some(frame)) => {
                                if tx
                                    .send(Input::Frame {
                                        conn: conn_id,
                                        frame,
                                    })
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(error) => {
                                let _ = tx.send(Input::Malformed {
                                    conn: conn_id,
                                    error,
                                });
                                return;
                            }
                        }
                    }
                }
                _ => {
                    let _ = tx.send(Input::Closed { conn: conn_id });
                    return;
                }
            }
        }
    };
    // The writer ends when the actor closes the session; the reader with the stream.
    tokio::join!(writer, async {
        tokio::select! {
            _ = reader => {}
            _ = conn.closed() => {
                let _ = handle.tx.send(Input::Closed { conn: conn_id });
            }
        }
    });
    let stats = conn.stats();
    handle
        .metrics
        .bytes_received
        .fetch_add(stats.udp_rx.bytes, Ordering::Relaxed);
    handle
        .metrics
        .bytes_sent
        .fetch_add(stats.udp_tx.bytes, Ordering::Relaxed);
    conn.close(0u32.into(), b"done");
    Ok(())
}

fn actor(hub: Hub, rx: mpsc::Receiver<Input>, metrics: Arc<Metrics>) {
    let mut ledger = match Ledger::open(hub.store(), hub.keys()) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot open the ledger: {e}");
            return;
        }
    };
    let mut conns: BTreeMap<u64, Conn> = BTreeMap::new();
    // Purges asked for (who, as_of, the answer), or the timer's (`None`).
    let mut pending_purge: Vec<Option<PurgeAsked>> = Vec::new();
    while let Ok(input) = rx.recv() {
        let now = clock::now();
        match input {
            Input::Stop => break,
            Input::Open {
                conn,
                remote,
                addr,
                reply,
            } => {
                let me = Peer::Hub {
                    region: hub.config().region.clone(),
                };
                conns.insert(
                    conn,
                    Conn {
                        session: Session::responder(me),
                        reply,
                        remote,
                        addr,
                        device: None,
                        facility: None,
                        clock_offset: None,
                        cache: BTreeMap::new(),
                    },
                );
            }
            Input::Frame { conn, frame } => {
                if let Some(c) = conns.get_mut(&conn) {
                    match c.facility.clone() {
                        Some(f) => {
                            let cache = std::mem::take(&mut c.cache);
                            let mut parts = ledger.resume(f, now, cache);
                            c.session.handle_frame(now, frame, &mut parts);
                            pump(&hub, &ledger, c, &mut parts, now, &metrics);
                            c.cache = parts.into_cache();
                        }
                        None => {
                            // Before admission no partition is touched.
                            let mut none = MemoryStore::new(b"hub-pre-admission", None);
                            c.session.handle_frame(now, frame, &mut none);
                            pump(&hub, &ledger, c, &mut none, now, &metrics);
                        }
                    }
                }
            }
            Input::Malformed { conn, error } => {
                if let Some(c) = conns.get_mut(&conn) {
                    c.session.handle_malformed(error);
                    let mut none = MemoryStore::new(b"hub-closed", None);
                    pump(&hub, &ledger, c, &mut none, now, &metrics);
                }
            }
            Input::Closed { conn } => {
                if let Some(mut c) = conns.remove(&conn) {
                    c.session.handle_closed();
                    let mut none = MemoryStore::new(b"hub-closed", None);
                    pump(&hub, &ledger, &mut c, &mut none, now, &metrics);
                }
            }
            Input::Request(r) => match r {
                Request::Stats(reply) => {
                    let _ = reply.send(ledger.stats(now).map_err(|e| e.to_string()));
                }
                Request::Purge { who, as_of, reply } => {
                    pending_purge.push(Some((who, as_of, reply)));
                }
                Request::Admin(f) => {
                    let _ = f(&hub);
                }
                Request::Query(f) => f(&hub, &ledger, &metrics),
            },
            Input::Tick => pending_purge.push(None),
        }
        conns.retain(|_, c| !c.session.is_finished());
        if !pending_purge.is_empty() {
            // Partitions cached by open sessions may have just expired: reload from the
            // ledger, which refuses them.
            for c in conns.values_mut() {
                c.cache.clear();
            }
        }
        for asked in pending_purge.drain(..) {
            // Checked, enforced and audited in `people`; only the local operator may move
            // retention ahead of the clock.
            let (r, reply) = match asked {
                Some((who, as_of, reply)) => (
                    people::purge(&hub, &mut ledger, &who, as_of, now),
                    Some(reply),
                ),
                None => (people::purge_on_timer(&hub, &mut ledger, now), None),
            };
            match &r {
                Ok(_) => {
                    metrics.retention_runs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!("retention: {e}"),
            }
            if let Some(reply) = reply {
                let _ = reply.send(r);
            }
        }
    }
}

/// Executes the session's events and sends its frames.
fn pump(
    hub: &Hub,
    ledger: &Ledger<'_>,
    c: &mut Conn,
    parts: &mut impl PartitionStore,
    now: UnixSeconds,
    metrics: &Metrics,
) {
    loop {
        let mut progressed = false;
        while let Some(frame) = c.session.poll_transmit() {
            progressed = true;
            match frame.encode() {
                Ok(b) => {
                    let _ = c.reply.send(Output::Bytes(b));
                }
                Err(e) => tracing::warn!("cannot encode a frame: {e}"),
            }
        }
        while let Some(event) = c.session.poll_event() {
            progressed = true;
            match event {
                Event::PeerHello(hello) => {
                    let (decision, device) = decide(hub, ledger, &c.remote, &hello, now);
                    if let Decision::Admit { facility, .. } = &decision {
                        c.device = device;
                        c.facility = Some(facility.clone());
                        let mut hp = ledger.partitions(facility.clone(), now);
                        c.session.admit(now, decision, &mut hp);
                        pump(hub, ledger, c, &mut hp, now, metrics);
                        c.cache = hp.into_cache();
                        return;
                    }
                    metrics.refused_devices.fetch_add(1, Ordering::Relaxed);
                    c.session.admit(now, decision, parts);
                }
                Event::PartitionUpdated { id, .. } => {
                    // The ledger persists and indexes what the session merged.
                    match persist(ledger, parts, &id, now) {
                        Ok(n) => {
                            metrics
                                .records_ingested
                                .fetch_add(n.indexed, Ordering::Relaxed);
                            metrics
                                .records_fallback_key
                                .fetch_add(n.fallback, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!("cannot persist partition {id}: {e}"),
                    }
                }
                Event::SyncStateChanged {
                    peer,
                    partition,
                    state,
                } => {
                    if let Err(e) = parts.put_sync_state(&peer, &partition, &state) {
                        tracing::warn!("cannot store a sync state: {e}");
                    }
                }
                Event::ClockOffset { seconds } => {
                    c.clock_offset = Some(seconds);
                    if seconds.abs() > CLOCK_WARNING_SECONDS {
                        tracing::warn!(
                            "device {:?} clock is off by {seconds} s",
                            c.device.as_ref().map(DeviceId::to_string)
                        );
                    }
                }
                Event::Finished(_) => {
                    metrics.sessions_completed.fetch_add(1, Ordering::Relaxed);
                    if let Some(id) = &c.device {
                        record_contact(hub, id, c, now);
                    }
                }
                Event::Refused { by, reason, detail } => {
                    metrics.sessions_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("session refused by {by:?}: {reason:?} {detail}");
                }
                Event::Failed(e) => {
                    metrics.sessions_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("session failed: {e}");
                }
                Event::Welcomed { .. } => {}
            }
        }
        if !progressed {
            break;
        }
    }
    if c.session.is_finished() {
        let _ = c.reply.send(Output::Close);
    }
}

fn persist(
    ledger: &Ledger<'_>,
    parts: &mut impl PartitionStore,
    id: &shared::PartitionId,
    now: UnixSeconds,
) -> Result<Persisted, String> {
    match parts.partition_mut(id).map_err(|e| e.to_string())? {
        Some(p) => ledger.persist_counted(p, now).map_err(|e| e.to_string()),
        None => Ok(Persisted::default()),
    }
}

fn record_contact(hub: &Hub, id: &DeviceId, c: &Conn, now: UnixSeconds) {
    match hub.store().device(id) {
        Ok(Some(mut d)) => {
            d.last_sync = Some(now);
            d.clock_offset = c.clock_offset;
            if let Some(a) = c.addr {
                d.addrs = vec![a.to_string()];
            }
            if let Err(e) = hub.store().put_device(&d) {
                tracing::warn!("cannot record the sync of {id}: {e}");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("cannot read device {id}: {e}"),
    }
}

fn refuse(reason: RefuseReason, detail: &str) -> (Decision, Option<DeviceId>) {
    (
        Decision::Refuse {
            reason,
            detail: detail.to_owned(),
        },
        None,
    )
}

/// Admission: who may sync, for which facility, and what they get back.
fn decide(
    hub: &Hub,
    ledger: &Ledger<'_>,
    remote: &PublicKey,
    hello: &PeerHello,
    now: UnixSeconds,
) -> (Decision, Option<DeviceId>) {
    let Peer::Device { device, facility } = &hello.peer else {
        return refuse(RefuseReason::Protocol, "only devices sync with a hub");
    };
    let rec: DeviceRecord = match hub.store().device(device) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return refuse(
                RefuseReason::UnknownDevice,
                "this device is not enrolled here",
            );
        }
        Err(e) => return refuse(RefuseReason::Internal, &e.to_string()),
    };
    if rec.revoked {
        return refuse(RefuseReason::Revoked, "this device has been revoked");
    }
    if &rec.facility != facility {
        return refuse(
            RefuseReason::WrongFacility,
            "this device is enrolled for another facility",
        );
    }
    match hub.store().facility(facility) {
        Ok(Some(f)) if f.status == FacilityStatus::Approved => {}
        Ok(Some(_)) => return refuse(RefuseReason::Revoked, "the facility is not approved"),
        Ok(None) => return refuse(RefuseReason::Revoked, "the facility has been removed"),
        Err(e) => return refuse(RefuseReason::Internal, &e.to_string()),
    }
    let remote_hex = remote.to_string();
    match &rec.endpoint_id {
        Some(bound) if *bound == remote_hex => {}
        Some(_) => {
            return if hello.credential.is_some() {
                refuse(
                    RefuseReason::CredentialReused,
                    "this enrollment ticket was already used by another device",
                )
            } else {
                refuse(
                    RefuseReason::UnknownDevice,
                    "this endpoint is not the one enrolled for the device",
                )
            };
        }
        None => {
            let Some(cred) = hello.credential else {
                return refuse(
                    RefuseReason::UnknownDevice,
                    "first contact needs the enrollment credential",
                );
            };
            let digest = Credential(cred).digest();
            match hub.store().credential_device(&digest) {
                Ok(Some(d)) if &d == device => {
                    let mut bound = rec.clone();
                    bound.endpoint_id = Some(remote_hex);
                    if let Err(e) = hub.store().bind_device(&digest, &bound) {
                        return refuse(RefuseReason::Internal, &e.to_string());
                    }
                    tracing::info!("device {device} bound to endpoint {}", remote.fmt_short());
                }
                Ok(_) => {
                    return refuse(
                        RefuseReason::CredentialReused,
                        "the enrollment credential is not valid (used or wrong)",
                    );
                }
                Err(e) => return refuse(RefuseReason::Internal, &e.to_string()),
            }
        }
    }
    let refresh = match refresh_for(hub, ledger, &rec, now) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot build the refresh of device {device}: {e}");
            return refuse(
                RefuseReason::Internal,
                "the hub cannot read its registry right now; nothing was changed, sync again later",
            );
        }
    };
    (
        Decision::Admit {
            facility: facility.clone(),
            refresh: Some(refresh.to_bytes()),
        },
        Some(device.clone()),
    )
}

/// What an admitted device gets back: day keys, the issuers' keyring and its siblings. A read
/// error is an error, never an empty keyring or roster: a device that applied an empty keyring
/// would answer "unknown issuer" to every visitor until its next good sync.
fn refresh_for(
    hub: &Hub,
    ledger: &Ledger<'_>,
    rec: &DeviceRecord,
    now: UnixSeconds,
) -> Result<Refresh, HubError> {
    let roster = hub
        .store()
        .devices()?
        .into_iter()
        .filter(|d| d.facility == rec.facility && d.id != rec.id && !d.revoked)
        .filter_map(|d| {
            Some(Sibling {
                endpoint_id: d.endpoint_id.clone()?,
                device_id: d.id,
                name: d.name,
                addrs: d.addrs,
            })
        })
        .collect();
    Ok(Refresh {
        day_keys: ledger.ratchet().publics(Day::of(now), DAY_KEYS_AHEAD),
        keyring: hub.keyring()?,
        roster,
    })
}

/// QUIC settings for sync links: no path-MTU discovery. Its probes (padded datagrams up to
/// 1,452 B, a few per connection) cost kilobytes per session, several times what a sync of a
/// few records sends on a hotspot; frames fit the 1,200-byte minimum MTU every path carries.
fn transport_config() -> iroh::endpoint::QuicTransportConfig {
    iroh::endpoint::QuicTransportConfig::builder()
        .mtu_discovery_config(None)
        .build()
}
