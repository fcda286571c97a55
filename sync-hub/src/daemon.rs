//! `sync-hub run`: the iroh sync endpoint and the actor that owns the hub's state.
//!
//! One thread (the actor) owns the store, the key files and the ledger, and runs every
//! sync session's state machine; connection tasks only move bytes and frames to and from it
//! over channels (the redb-owned-by-one-actor shape of iroh-docs). Admission is decided here,
//! against the registry: a device is admitted only if its endpoint id is the one bound to
//! it, or it presents its ticket's unused credential (which then binds it).
//!
//! Every queue and buffer is bounded (`docs/protocol.md`, "Limits"): at most
//! [`MAX_CONNECTIONS`] connections, each held to [`PRE_ADMISSION_FRAME_BYTES`] and
//! [`HELLO_TIMEOUT`] until admitted; the actor's input queue and each connection's outgoing
//! queue are bounded, so a flood meets backpressure instead of growing memory. A store error
//! while carrying out a session's effects aborts the session (`Internal`) and stores none of
//! its later sync states: a failure is never reported to the device as success.
//!
//! Sessions run through `shared::sync::driver`, the one event loop of every node; this
//! module is its hub `Shell` (`HubShell`).
//!
//! Group commit: the actor works in turns ([`Turn`]: the inputs queued, at most
//! [`TURN_INPUTS`] or [`TURN_TIME`]); its sessions' writes in a turn commit without fsync and
//! one durable commit ends the turn ([`end_turn`]) before the frames they sent, held in their
//! [`Conn`], go to the writers: a crash loses at most writes no peer was told of.
//!
//! Per-device quotas ([`Quotas`]) keep one rogue enrolled device from filling the disk or
//! holding the actor: the bytes a session receives after admission, and the new records a
//! device delivers per UTC day (`device-day-records-1`) and the new wrapped keys it delivers per
//! UTC day (`device-day-keys-1`). Over either, the session is aborted
//! with `QuotaExceeded` before the frame or partition that went over is stored.

use crate::auth::Principal;
use crate::clock;
use crate::ledger::{Charge, HubPartitions, Ledger, Persisted, PurgeReport, RefusalNote, Stats};
use crate::people::{self, OpError};
use crate::registry::DeviceRecord;
use crate::registry::{DAY_KEYS_AHEAD, Hub, HubError};
use iroh::endpoint::presets;
use iroh::{Endpoint, PublicKey, SecretKey};
use shared::facility::FacilityStatus;
use shared::partition::Partition;
use shared::sync::driver::{self, Abort, End, Link, Shell};
use shared::sync::harness::MemoryStore;
use shared::sync::{
    ALPN, Decision, Frame, FrameDecoder, FrameError, Inbound, MAX_FRAME_BYTES,
    MAX_PARTITIONS_PER_SESSION, PartitionStore, PartitionSummary, Peer, PeerHello, RefuseReason,
    Session, Side, StoreError, WireStats,
};
use shared::ticket::{Refresh, Sibling};
use shared::time::Day;
use shared::{DeviceId, FacilityId, PartitionId, UnixSeconds};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc as tmpsc, oneshot};
use tokio::time::Instant;

/// How long a session may wait for the device's next bytes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often retention runs while the hub is up.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// A device clock further off than this is flagged.
pub const CLOCK_WARNING_SECONDS: i64 = 300;

/// The default cap on concurrent sync connections (`sync-hub run --max-connections`). A
/// region's devices sync every few minutes in sessions of about a second, so even thousands of
/// devices keep a few dozen connections open; the cap is far above that and bounds what a
/// flood can hold: about 200 KiB per connection before admission (read buffer plus
/// [`PRE_ADMISSION_FRAME_BYTES`] of partial frame), some 200 MiB at the cap.
pub const MAX_CONNECTIONS: usize = 1024;
/// The largest frame body accepted before the peer is admitted (shared with a device serving
/// a sibling).
pub use shared::sync::PRE_ADMISSION_FRAME_BYTES;
/// A connection that has not delivered its `Hello` this long after it arrived is closed
/// (handshake and stream opening included): an honest device sends it at once.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a session may run, in wall time, whatever the peer keeps sending (a peer that
/// sends a byte every 29 s would otherwise hold its slot forever). A 200,000-visit day (~30 MB)
/// crosses a 1 Mbit/s hotspot in about 4 min; a longer backlog finishes over several sessions,
/// since what a session stored stays. `SYNC_HUB_SESSION_LIMIT_SECS` changes it.
pub const SESSION_LIMIT: Duration = Duration::from_secs(600);

/// [`SESSION_LIMIT`], or `SYNC_HUB_SESSION_LIMIT_SECS` when set to a positive number.
pub fn session_limit() -> Duration {
    std::env::var("SYNC_HUB_SESSION_LIMIT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(SESSION_LIMIT, Duration::from_secs)
}
/// Inputs waiting for the actor. Each connection task has at most one input in flight (its
/// reader awaits every send), so this is never the limit for sessions at [`MAX_CONNECTIONS`];
/// what it stops is a connection outrunning the actor with decoded frames.
pub const ACTOR_QUEUE: usize = 4 * MAX_CONNECTIONS;
/// Frames waiting to be written to one connection: a round of a session sends at most a
/// `Welcome`, one `Sync` per partition and a `Done`, and the writer drains as it goes. A peer
/// that stops reading until this fills is cut off rather than buffered without end.
pub const OUTGOING_FRAMES: usize = 2 * MAX_PARTITIONS_PER_SESSION + 16;
/// Connections over the cap that are still told why (a QUIC handshake and an application
/// close); beyond these, excess connections are refused without a handshake.
const BUSY_HANDSHAKES: usize = 64;

/// The default cap on the bytes one session may send the hub after admission
/// (`sync-hub run --max-session-bytes`), counted per frame as decoded (a deflated `Sync` frame
/// counts at its inflated size: what the hub holds and merges). An entrance's month offline
/// at a few thousand visits a day is some 15 MB of sealed records (about 140 B each), and
/// even a 200,000-visit facility-day is about 28 MB: 64 MiB carries two of those in one
/// session. An honest device over it is not stuck either: partitions persisted before the cut
/// stay, and its next session carries on from there.
pub const MAX_SESSION_BYTES: u64 = 64 * 1024 * 1024;
/// The default cap on new records one device may deliver per UTC day
/// (`sync-hub run --max-device-records-per-day`). KI-Pass's busiest venues saw a few thousand
/// visitors a day per entrance: 100,000 is a month of such an entrance's visits delivered at
/// once after it was offline, while a key used to inject records stops there. Every new record
/// of a session counts against the device admitted for it, its siblings' records it relays
/// too: the quota bounds what one key can bring in, whoever sealed the records.
pub const MAX_DEVICE_RECORDS_PER_DAY: u64 = 100_000;
/// The default cap on new wrapped keys (`k/` entries) one device may deliver per UTC day
/// (`sync-hub run --max-device-keys-per-day`). A device wraps one session key per day and
/// process (a restart or a day-key fallback makes another), so an honest device brings a few
/// a day, its relayed siblings' included; without a cap a rogue device could push unlimited
/// wrapped keys, which the records quota does not count.
pub const MAX_DEVICE_KEYS_PER_DAY: u64 = 64;

/// Per-device quotas at the hub (`docs/protocol.md`, "Hub connection limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Bytes of frames one session may deliver after admission.
    pub session_bytes: u64,
    /// New records one device may deliver per UTC day (of the hub's clock).
    pub device_records_per_day: u64,
    /// New wrapped keys (`k/` entries) one device may deliver per UTC day.
    pub device_keys_per_day: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            session_bytes: MAX_SESSION_BYTES,
            device_records_per_day: MAX_DEVICE_RECORDS_PER_DAY,
            device_keys_per_day: MAX_DEVICE_KEYS_PER_DAY,
        }
    }
}

/// Application close code: the session ended (either way; its frames said how).
pub const CLOSE_DONE: u32 = 0;
/// Application close code: the hub is at its connection cap; try again later.
pub const CLOSE_BUSY: u32 = 2;
/// Application close code: no `Hello` within [`HELLO_TIMEOUT`].
pub const CLOSE_NO_HELLO: u32 = 3;
/// Application close code: closed before admission to make room for a newer connection, the
/// hub being at its cap of connections not yet admitted ([`MAX_UNADMITTED`]).
pub const CLOSE_EVICTED: u32 = 4;

/// The default cap on connections not admitted yet (`sync-hub run --max-unadmitted`): from
/// the handshake until the hub admits the peer's `Hello`. An honest device says `Hello` at
/// once, so few are ever in that state; at the cap, the oldest unadmitted connection is closed
/// ([`CLOSE_EVICTED`]) for the new one. Peers that connect and stay silent therefore hold at
/// most this many of the [`MAX_CONNECTIONS`] slots, never all of them, and a device that
/// connects meanwhile gets in unless the flood opens this many connections within its
/// handshake and `Hello`.
pub const MAX_UNADMITTED: usize = 64;

/// A connection not admitted yet, as `serve` tracks them for eviction.
struct Unadmitted {
    admitted: Arc<AtomicBool>,
    /// Set once its handshake shows the endpoint of a device this hub admitted before.
    known: Arc<AtomicBool>,
    /// Dropped when the connection's task ends.
    evict: std::sync::Weak<tokio::sync::Notify>,
}

/// Which waiting connection makes room for a new one: the oldest whose endpoint is not a
/// device the hub has admitted before, else the oldest (finding 3 of the sync v2 review: a
/// stranger opening connections with fresh keys must not evict an enrolled device between its
/// handshake and its admission). `known` lists the waiting connections, oldest first.
fn eviction_victim(known: &[bool]) -> Option<usize> {
    if known.is_empty() {
        return None;
    }
    Some(known.iter().position(|k| !k).unwrap_or(0))
}

/// Resolves once the connection is told to make room, unless it was admitted by then.
async fn evicted(evict: &tokio::sync::Notify, admitted: &AtomicBool) {
    loop {
        evict.notified().await;
        if !admitted.load(Ordering::Acquire) {
            return;
        }
    }
}

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
    /// Sessions aborted because a partition or a sync state could not be stored.
    pub persist_failures: AtomicU64,
    /// Connections closed at once because the hub was at its connection cap.
    pub connections_refused: AtomicU64,
    /// Connections of sync protocol v1 told to upgrade and closed.
    pub v1_refused: AtomicU64,
    /// Sessions aborted because the device went over a quota (`QuotaExceeded`).
    pub quota_refusals: AtomicU64,
    /// Retention runs that failed.
    pub retention_failures: AtomicU64,
    /// The last retention run that succeeded, Unix seconds (0: none since the start).
    pub last_purge_at: AtomicU64,
    /// Records in the partitions the last successful retention run dropped.
    pub last_purge_records: AtomicU64,
    /// Records dropped by retention since the start.
    pub records_purged: AtomicU64,
    /// Whether the last retention run failed (1) or not (0).
    pub last_purge_failed: AtomicU64,
    /// When the actor started, Unix seconds.
    pub started_at: AtomicU64,
    /// How long traces took (`POST /api/trace`).
    pub trace_seconds: crate::health::Histogram,
    /// Hub link exchanges with the paired hub that completed (`crate::link`).
    pub link_rounds: AtomicU64,
    /// Hub link exchanges that failed (the paired hub unreachable, or refusing).
    pub link_failures: AtomicU64,
    /// When the last hub link exchange completed, Unix seconds (0: none since the start).
    pub link_last_ok: AtomicU64,
    /// Administrative operations the actor ran (registry edits among them): a change wakes
    /// an idle hub link.
    pub admin_writes: AtomicU64,
    /// How long each input held the actor ([`Holds`]).
    pub holds: Holds,
    /// The actor stopped because a durable commit failed ([`end_turn`]): `sync-hub run`
    /// exits with an error.
    pub actor_failed: AtomicBool,
    /// Durable commits that ended an actor turn with writes ([`end_turn`]).
    pub group_commits: AtomicU64,
    /// Write transactions those durable commits covered (each committed non-durably first).
    pub group_commit_writes: AtomicU64,
}

/// What held the hub's actor: every input it handles and every step of a purge is timed
/// ([`Holds::start`]), by kind. The actor runs every device's sync session, so while one of
/// these runs no session moves (issue 14: no request may hold the sync path 100 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldKind {
    /// A sync session's frame (admission, merging and persisting a partition, the answer).
    Frame,
    /// A session opening, closing, timing out or sending bytes that do not decode (a hub link
    /// session's opening loads its partitions).
    Session,
    /// A job of the people's API or the hub link on the hub and its ledger
    /// ([`Request::Query`]): authentication, the day keys a read copies, an audit append,
    /// a write of the API, the health probe.
    Query,
    /// An administrative closure ([`Request::Admin`]).
    Admin,
    /// `stats` through the actor ([`Request::Stats`]).
    Stats,
    /// A purge's start: its audit entry and the destruction of its day keys.
    PurgeStart,
    /// One chunk of a purge's deletion (the last one with the purge's result entry).
    PurgeChunk,
    /// The durable commit that ends an actor turn ([`end_turn`]) and releases its frames.
    Commit,
    /// Anything else (a purge asked for or the retention timer, queued; the stop).
    Other,
}

impl HoldKind {
    /// Every kind, in the order [`Holds`] keeps them.
    pub const ALL: [HoldKind; 9] = [
        HoldKind::Frame,
        HoldKind::Session,
        HoldKind::Query,
        HoldKind::Admin,
        HoldKind::Stats,
        HoldKind::PurgeStart,
        HoldKind::PurgeChunk,
        HoldKind::Commit,
        HoldKind::Other,
    ];

    /// Its `kind` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            HoldKind::Frame => "frame",
            HoldKind::Session => "session",
            HoldKind::Query => "query",
            HoldKind::Admin => "admin",
            HoldKind::Stats => "stats",
            HoldKind::PurgeStart => "purge_start",
            HoldKind::PurgeChunk => "purge_chunk",
            HoldKind::Commit => "commit",
            HoldKind::Other => "other",
        }
    }

    fn of(input: &Input) -> HoldKind {
        match input {
            Input::Frame { .. } => HoldKind::Frame,
            Input::Open { .. }
            | Input::OpenLink { .. }
            | Input::Malformed { .. }
            | Input::Closed { .. }
            | Input::TimeUp { .. } => HoldKind::Session,
            Input::Request(Request::Query(_)) => HoldKind::Query,
            Input::Request(Request::Admin(_)) => HoldKind::Admin,
            Input::Request(Request::Stats(_)) => HoldKind::Stats,
            Input::Request(Request::Purge { .. }) | Input::Tick | Input::Stop => HoldKind::Other,
        }
    }
}

/// How long the actor was held, per [`HoldKind`]: the longest hold since the start and the
/// count, and one histogram of every hold ([`crate::health::HOLD_BUCKETS`], up to 1 s).
#[derive(Debug)]
pub struct Holds {
    max_micros: [AtomicU64; HoldKind::ALL.len()],
    counts: [AtomicU64; HoldKind::ALL.len()],
    /// Every hold, whatever its kind.
    pub seconds: crate::health::Histogram,
}

impl Default for Holds {
    fn default() -> Self {
        Holds {
            max_micros: Default::default(),
            counts: Default::default(),
            seconds: crate::health::Histogram::with_bounds(&crate::health::HOLD_BUCKETS),
        }
    }
}

impl Holds {
    /// Times a hold of `kind` until the guard is dropped.
    pub fn start(&self, kind: HoldKind) -> Holding<'_> {
        Holding {
            holds: self,
            kind,
            started: std::time::Instant::now(),
        }
    }

    /// Counts a hold of `kind` that lasted `d`.
    pub fn record(&self, kind: HoldKind, d: Duration) {
        let i = kind as usize;
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.max_micros[i].fetch_max(micros, Ordering::Relaxed);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.seconds.observe(d);
    }

    /// The longest hold of `kind` since the start.
    pub fn max(&self, kind: HoldKind) -> Duration {
        Duration::from_micros(self.max_micros[kind as usize].load(Ordering::Relaxed))
    }

    /// How many holds of `kind` there were.
    pub fn count(&self, kind: HoldKind) -> u64 {
        self.counts[kind as usize].load(Ordering::Relaxed)
    }
}

/// A hold being timed ([`Holds::start`]): recorded when dropped.
pub struct Holding<'a> {
    holds: &'a Holds,
    kind: HoldKind,
    started: std::time::Instant,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.holds.record(self.kind, self.started.elapsed());
    }
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
        reply: tmpsc::Sender<Output>,
        admitted: Arc<AtomicBool>,
    },
    /// A session this hub opens to its peer hub for one facility (`crate::link`).
    OpenLink {
        conn: u64,
        remote: PublicKey,
        facility: FacilityId,
        reply: tmpsc::Sender<Output>,
    },
    /// A frame, its `Sync` message already read on the connection's task.
    Frame {
        conn: u64,
        frame: Inbound,
    },
    Malformed {
        conn: u64,
        error: FrameError,
    },
    Closed {
        conn: u64,
    },
    /// The session ran past [`session_limit`].
    TimeUp {
        conn: u64,
    },
    Request(Request),
    Tick,
    Stop,
}

/// What the actor hands a connection's writer.
#[derive(Debug)]
pub enum Output {
    /// Encoded frames to write.
    Bytes(Vec<u8>),
    /// The session ended: finish the stream.
    Close,
}

/// A handle to the running actor.
#[derive(Clone)]
pub struct HubHandle {
    tx: tmpsc::Sender<Input>,
    /// Endpoint ids (hex) of devices this hub has admitted (bound devices at start, and every
    /// connection admitted since): preferred when the pre-admission cap must make room.
    known_endpoints: Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
    /// Set by [`stop`], so the actor stops even if its queue was full when asked.
    stopping: Arc<AtomicBool>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The hub the actor owns, for reads on other threads (`crate::reads`): its redb
    /// database serves read transactions on any thread while the actor writes. Writes go
    /// through the actor, never through this.
    pub(crate) hub: Arc<Hub>,
    /// Session keys the connections unwrap from the `Sync` messages they read, for the
    /// actor's persists ([`crate::ahead`]).
    ahead: Arc<crate::ahead::UnwrapAhead>,
}

impl HubHandle {
    /// Sends a request to the actor; an error if it has stopped or its queue is full (the
    /// caller answers "busy" rather than waiting behind a flood).
    pub fn request(&self, r: Request) -> Result<(), String> {
        self.tx.try_send(Input::Request(r)).map_err(|e| match e {
            tmpsc::error::TrySendError::Full(_) => "the hub is busy; try again".to_owned(),
            tmpsc::error::TrySendError::Closed(_) => "the hub has stopped".to_owned(),
        })
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

/// One sync connection as the actor sees it: the session (in its [`Link`], run by
/// `shared::sync::driver`), what it has learned of the peer, and where its frames go. Public
/// so a test can drive it without a network.
pub struct Conn {
    link: Link,
    reply: tmpsc::Sender<Output>,
    remote: PublicKey,
    addr: Option<SocketAddr>,
    device: Option<DeviceId>,
    facility: Option<FacilityId>,
    clock_offset: Option<i64>,
    /// The partitions this session loaded, kept between its frames (each partition is read
    /// from redb once per session, not once per frame); dropped with the connection, and as
    /// soon as the session stores nothing more (a store error or a quota ended it).
    cache: BTreeMap<PartitionId, Partition>,
    /// Set once the peer is admitted: the connection's reader then accepts full-size frames.
    admitted: Arc<AtomicBool>,
    /// The quotas this connection is held to.
    quotas: Quotas,
    /// Bytes of frames received since admission.
    received: u64,
    /// For the paired hub's `HubLink` sessions, which carry records of many devices: the
    /// account their new records and keys are charged to (`link-<facility>`) and how many
    /// devices' quotas it holds (the facility's non-revoked devices, at least one), so a
    /// compromised paired hub can bring no more a day than the facility's own devices could.
    link_quota: Option<(DeviceId, u64)>,
    /// What the session sent during the actor's turn, held until the turn's writes are
    /// durable ([`end_turn`]): no peer hears of a change a crash could still lose.
    held: Vec<Output>,
}

impl Conn {
    /// A connection from `remote` (at `addr`) whose frames go to `reply`; `admitted` is set
    /// when the peer is admitted.
    pub fn new(
        hub: &Hub,
        remote: PublicKey,
        addr: Option<SocketAddr>,
        reply: tmpsc::Sender<Output>,
        admitted: Arc<AtomicBool>,
    ) -> Conn {
        let me = Peer::Hub {
            region: hub.config().region.clone(),
        };
        Conn {
            link: Link::new(Session::responder(me)),
            reply,
            remote,
            addr,
            device: None,
            facility: None,
            clock_offset: None,
            cache: BTreeMap::new(),
            admitted,
            quotas: Quotas::default(),
            received: 0,
            link_quota: None,
            held: Vec::new(),
        }
    }

    /// A session this hub opens to its paired hub `remote` for `facility`'s partitions
    /// (`Peer::HubLink`): both sides send and take changes. Its `Hello` is queued at once.
    pub fn initiator(
        hub: &Hub,
        ledger: &Ledger<'_>,
        remote: PublicKey,
        facility: FacilityId,
        reply: tmpsc::Sender<Output>,
        now: UnixSeconds,
        metrics: &Metrics,
    ) -> Result<Conn, String> {
        let region = hub.config().region.clone();
        let me = Peer::HubLink {
            region: region.clone(),
            facility: facility.clone(),
        };
        let to = Peer::Hub { region };
        let store = ledger.partitions(facility.clone(), now);
        let session = Session::initiator_to(now, me, Some(&to), None, None, false, &store)
            .map_err(|e| e.to_string())?;
        let mut conn = Conn {
            link: Link::new(session),
            reply,
            remote,
            addr: None,
            device: None,
            facility: Some(facility),
            clock_offset: None,
            cache: store.into_cache(),
            admitted: Arc::new(AtomicBool::new(true)),
            quotas: Quotas::default(),
            received: 0,
            link_quota: None,
            held: Vec::new(),
        };
        conn.link_quota = conn.facility.as_ref().and_then(|f| link_quota(hub, f));
        let mut shell = HubShell::new(hub, ledger, &mut conn, now, metrics);
        driver::pump(&mut shell, now);
        shell.done();
        Ok(conn)
    }

    /// The same connection held to `quotas` instead of the defaults.
    pub fn with_quotas(mut self, quotas: Quotas) -> Conn {
        self.quotas = quotas;
        self
    }

    /// Whether the session has ended.
    pub fn is_finished(&self) -> bool {
        self.link.is_finished()
    }

    /// A frame from the peer.
    pub fn on_frame(
        &mut self,
        hub: &Hub,
        ledger: &Ledger<'_>,
        frame: impl Into<Inbound>,
        now: UnixSeconds,
        metrics: &Metrics,
    ) {
        let frame = frame.into();
        if let Some(detail) = self.over_session_bytes(&frame) {
            metrics.quota_refusals.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "device {:?} over quota: {detail}",
                self.device.as_ref().map(DeviceId::to_string)
            );
            let why = Abort::new(RefuseReason::QuotaExceeded, detail);
            self.abort(hub, ledger, why, now, metrics);
            return;
        }
        let mut shell = HubShell::new(hub, ledger, self, now, metrics);
        driver::handle_frame(&mut shell, now, frame);
        shell.done();
    }

    /// The peer's bytes did not decode.
    pub fn on_malformed(
        &mut self,
        hub: &Hub,
        ledger: &Ledger<'_>,
        error: FrameError,
        now: UnixSeconds,
        metrics: &Metrics,
    ) {
        let mut shell = HubShell::closed(hub, ledger, self, metrics);
        driver::handle_malformed(&mut shell, now, error);
        shell.done();
    }

    /// The stream or connection ended.
    pub fn on_closed(
        &mut self,
        hub: &Hub,
        ledger: &Ledger<'_>,
        now: UnixSeconds,
        metrics: &Metrics,
    ) {
        let mut shell = HubShell::closed(hub, ledger, self, metrics);
        driver::handle_closed(&mut shell, now);
        shell.done();
    }

    /// Ends the session from the hub's side (a quota, the time limit, a newer session of
    /// the device): the peer is told `why`, and nothing more of the session is stored.
    fn abort(
        &mut self,
        hub: &Hub,
        ledger: &Ledger<'_>,
        why: Abort,
        now: UnixSeconds,
        metrics: &Metrics,
    ) {
        let mut shell = HubShell::closed(hub, ledger, self, metrics);
        driver::abort(&mut shell, now, why);
        shell.done();
    }

    /// Hands `out` to the connection's writer, or holds it until the turn's durable commit
    /// while `hold` (the store defers this thread's writes). `Err` if the writer's queue is
    /// full counting what is held: the peer stopped reading.
    fn emit(&mut self, out: Output, hold: bool) -> Result<(), ()> {
        if !hold {
            return match self.reply.try_send(out) {
                Err(tmpsc::error::TrySendError::Full(_)) => Err(()),
                _ => Ok(()),
            };
        }
        // Only the actor sends on this queue, so its free room only grows until the release.
        if matches!(out, Output::Bytes(_)) && self.held.len() >= self.reply.capacity() {
            return Err(());
        }
        self.held.push(out);
        Ok(())
    }

    /// Whether frames of this session wait for the turn's durable commit.
    pub fn holds_output(&self) -> bool {
        !self.held.is_empty()
    }

    /// Hands the held frames to the connection's writer (after the turn's durable commit).
    fn release(&mut self) {
        for out in self.held.drain(..) {
            // Never full for frames (`emit` counted them); a full queue drops a held `Close`,
            // as it always did: the writer also ends when the connection is dropped.
            let _ = self.reply.try_send(out);
        }
    }

    /// Counts `frame` against the session's byte quota once the peer is admitted: over it,
    /// the detail to refuse with (before the frame is handled).
    fn over_session_bytes(&mut self, frame: &Inbound) -> Option<String> {
        if self.facility.is_none() || self.link.session().is_finished() {
            return None;
        }
        self.received = self.received.saturating_add(frame.quota_len());
        (self.received > self.quotas.session_bytes).then(|| {
            format!(
                "this session sent more than the hub's {} bytes per session; what was stored \
                 stays, sync again to send the rest",
                self.quotas.session_bytes
            )
        })
    }
}

/// The partitions a hub session works on: none before admission (nor once it ended), the
/// admitted facility's afterwards.
enum HubStore<'l> {
    Closed(MemoryStore),
    Facility(HubPartitions<'l>),
}

impl PartitionStore for HubStore<'_> {
    fn live_partitions(
        &self,
        facility: Option<&FacilityId>,
    ) -> Result<Vec<PartitionSummary>, StoreError> {
        match self {
            HubStore::Closed(s) => s.live_partitions(facility),
            HubStore::Facility(s) => s.live_partitions(facility),
        }
    }

    fn partition_mut(&mut self, id: &PartitionId) -> Result<Option<&mut Partition>, StoreError> {
        match self {
            HubStore::Closed(s) => s.partition_mut(id),
            HubStore::Facility(s) => s.partition_mut(id),
        }
    }

    fn create_partition(&mut self, id: &PartitionId) -> Result<&mut Partition, StoreError> {
        match self {
            HubStore::Closed(s) => s.create_partition(id),
            HubStore::Facility(s) => s.create_partition(id),
        }
    }

    fn sync_state(&self, peer: &Peer, id: &PartitionId) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            HubStore::Closed(s) => s.sync_state(peer, id),
            HubStore::Facility(s) => s.sync_state(peer, id),
        }
    }

    fn put_sync_state(
        &mut self,
        peer: &Peer,
        id: &PartitionId,
        state: &[u8],
    ) -> Result<(), StoreError> {
        match self {
            HubStore::Closed(s) => s.put_sync_state(peer, id, state),
            HubStore::Facility(s) => s.put_sync_state(peer, id, state),
        }
    }

    fn discard_partition(
        &mut self,
        id: &PartitionId,
        good_heads: &[automerge::ChangeHash],
    ) -> Result<(), StoreError> {
        match self {
            HubStore::Closed(s) => s.discard_partition(id, good_heads),
            HubStore::Facility(s) => s.discard_partition(id, good_heads),
        }
    }
}

/// The hub's side of `shared::sync::driver`: admission against the registry, persisting
/// into the ledger (quotas first), metrics and the refusal notes for `stats`.
struct HubShell<'a, 'l> {
    hub: &'a Hub,
    ledger: &'a Ledger<'l>,
    conn: &'a mut Conn,
    store: HubStore<'a>,
    metrics: &'a Metrics,
}

/// What the peer is told when the hub cannot store what it synced.
const STORE_FAILURE: &str =
    "the hub could not store what was synced; the device keeps it, sync again later";

impl<'a, 'l> HubShell<'a, 'l> {
    /// For a frame: the admitted facility's partitions (with what the session cached).
    fn new(
        hub: &'a Hub,
        ledger: &'a Ledger<'l>,
        conn: &'a mut Conn,
        now: UnixSeconds,
        metrics: &'a Metrics,
    ) -> Self {
        let store = match conn.facility.clone() {
            Some(f) => HubStore::Facility(ledger.resume(f, now, std::mem::take(&mut conn.cache))),
            // Before admission no partition is touched.
            None => HubStore::Closed(MemoryStore::new(b"hub-pre-admission", None)),
        };
        HubShell {
            hub,
            ledger,
            conn,
            store,
            metrics,
        }
    }

    /// For an input that touches no partition (the end of the stream, an abort).
    fn closed(
        hub: &'a Hub,
        ledger: &'a Ledger<'l>,
        conn: &'a mut Conn,
        metrics: &'a Metrics,
    ) -> Self {
        HubShell {
            hub,
            ledger,
            conn,
            store: HubStore::Closed(MemoryStore::new(b"hub-closed", None)),
            metrics,
        }
    }

    /// Keeps the loaded partitions for the next frame unless the session stores nothing
    /// more (they may hold merged changes that were never stored), and closes the writer once
    /// the session is over.
    fn done(self) {
        let stores_nothing = self.conn.link.failure().is_some();
        if let HubStore::Facility(parts) = self.store {
            let cache = parts.into_cache();
            if !stores_nothing {
                self.conn.cache = cache;
            }
        }
        if stores_nothing {
            self.conn.cache.clear();
        }
        if self.conn.is_finished() {
            // A full queue drops this; the writer also ends when the connection is dropped.
            let hold = self.hub.store().grouping();
            let _ = self.conn.emit(Output::Close, hold);
        }
    }

    /// A store error: logged and counted; the peer is told [`STORE_FAILURE`].
    fn store_failure(&self, what: &str) -> Abort {
        tracing::error!("{what}: the session is aborted and stores nothing more");
        self.metrics
            .persist_failures
            .fetch_add(1, Ordering::Relaxed);
        Abort::internal(STORE_FAILURE)
    }
}

impl<'a> Shell for HubShell<'a, '_> {
    type Store = HubStore<'a>;

    fn link_and_store(&mut self) -> (&mut Link, &mut HubStore<'a>) {
        (&mut self.conn.link, &mut self.store)
    }

    fn admit(&mut self, now: UnixSeconds, hello: &PeerHello) -> Decision {
        let (decision, device) = decide(self.hub, self.ledger, &self.conn.remote, hello, now);
        match &decision {
            Decision::Admit { facility, .. } => {
                if matches!(hello.peer, Peer::HubLink { .. }) {
                    self.conn.link_quota = link_quota(self.hub, facility);
                }
                self.conn.device = device;
                self.conn.facility = Some(facility.clone());
                // Before the Welcome is queued: the peer's next frames may be large.
                self.conn.admitted.store(true, Ordering::Release);
                self.store = HubStore::Facility(self.ledger.partitions(facility.clone(), now));
            }
            Decision::Refuse { .. } => {
                self.metrics.refused_devices.fetch_add(1, Ordering::Relaxed);
            }
        }
        decision
    }

    fn persist(
        &mut self,
        now: UnixSeconds,
        id: &PartitionId,
        new_records: u64,
        new_keys: u64,
    ) -> Result<(), Abort> {
        // Checked before anything is stored: over the quota, the merged partition is
        // discarded and never persisted.
        let charge = Charge {
            records: new_records,
            keys: new_keys,
        };
        match over_device_quota(self.ledger, self.conn, charge, now) {
            Ok(None) => {}
            Ok(Some(detail)) => {
                tracing::warn!(
                    "device {:?} over quota: {detail}",
                    self.conn.device.as_ref().map(DeviceId::to_string)
                );
                // This partition only: a quota per device and day must not keep the device's
                // other days (or a relaying sibling's) from syncing.
                return Err(Abort::partition(RefuseReason::QuotaExceeded, detail));
            }
            Err(e) => return Err(self.store_failure(&format!("cannot read a device's count: {e}"))),
        }
        // The ledger persists and indexes what the session merged, and charges its new
        // records to the device in the same transaction.
        let account = self
            .conn
            .device
            .as_ref()
            .or(self.conn.link_quota.as_ref().map(|(a, _)| a));
        let charge = account.map(|d| (d, charge));
        match persist(self.ledger, &mut self.store, id, now, charge) {
            Ok(n) => {
                self.metrics
                    .records_ingested
                    .fetch_add(n.indexed, Ordering::Relaxed);
                self.metrics
                    .records_fallback_key
                    .fetch_add(n.fallback, Ordering::Relaxed);
                Ok(())
            }
            // The session's changes conflict with another session's stored ones: this
            // partition is refused, like any invalid change, and the session goes on.
            Err((true, e)) => Err(Abort::partition(RefuseReason::InvalidChange, e)),
            Err((false, e)) => {
                Err(self.store_failure(&format!("cannot persist partition {id}: {e}")))
            }
        }
    }

    fn store_sync_state(
        &mut self,
        peer: &Peer,
        partition: &PartitionId,
        state: &[u8],
    ) -> Result<(), Abort> {
        self.store
            .put_sync_state(peer, partition, state)
            .map_err(|e| self.store_failure(&format!("cannot store a sync state: {e}")))
    }

    fn clock_offset(&mut self, seconds: i64) {
        self.conn.clock_offset = Some(seconds);
        if seconds.abs() > CLOCK_WARNING_SECONDS {
            tracing::warn!(
                "device {:?} clock is off by {seconds} s",
                self.conn.device.as_ref().map(DeviceId::to_string)
            );
        }
    }

    fn completed(&mut self, now: UnixSeconds, _stats: &WireStats) -> Result<(), Abort> {
        // A session in which a day's partition was refused did not deliver everything: the
        // device's last contact (which traces read as "holds nothing unsynced before this")
        // does not move, so the facility stays flagged as possibly holding unsynced visits.
        if !self.conn.link.refused_partitions().is_empty() {
            return Ok(());
        }
        if let Some(id) = &self.conn.device {
            record_contact(self.hub, id, self.conn, now);
        }
        Ok(())
    }

    fn ended(&mut self, now: UnixSeconds, end: &End) {
        let (by, reason, detail) = match end {
            End::Completed => {
                self.metrics
                    .sessions_completed
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            End::Failed(e) => {
                self.metrics.sessions_failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!("session failed: {e}");
                return;
            }
            End::Aborted { reason, detail } => (Side::Local, reason, detail),
            End::Refused { by, reason, detail } => (*by, reason, detail),
        };
        self.metrics.sessions_failed.fetch_add(1, Ordering::Relaxed);
        tracing::info!("session refused by {by:?}: {reason:?} {detail}");
        // For `sync-hub stats`: counts by reason and the last few.
        let device = match self.conn.link.session().peer() {
            Some(Peer::Device { device, .. }) => Some(device.to_string()),
            _ => None,
        };
        let note = RefusalNote {
            at: now,
            device,
            reason: format!("{reason:?}"),
            by: format!("{by:?}").to_lowercase(),
            detail: detail.clone(),
        };
        if let Err(e) = self.ledger.note_refusal(&note) {
            tracing::warn!("cannot record a refusal for stats: {e}");
        }
    }

    /// One partition refused while the session goes on: logged, and noted for `stats` like
    /// a refused session, naming the partition.
    fn partition_refused(&mut self, now: UnixSeconds, r: &driver::RefusedPartition) {
        if r.reason == RefuseReason::QuotaExceeded {
            self.metrics.quota_refusals.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(
            "partition {} refused by {:?}: {:?} {}",
            r.partition,
            r.by,
            r.reason,
            r.detail
        );
        let device = match self.conn.link.session().peer() {
            Some(Peer::Device { device, .. }) => Some(device.to_string()),
            _ => None,
        };
        let note = RefusalNote {
            at: now,
            device,
            reason: format!("{:?}", r.reason),
            by: format!("{:?}", r.by).to_lowercase(),
            detail: format!("partition {}: {}", r.partition, r.detail),
        };
        if let Err(e) = self.ledger.note_refusal(&note) {
            tracing::warn!("cannot record a refusal for stats: {e}");
        }
    }

    /// Queues bytes for the writer, held until the turn's durable commit when the actor
    /// groups its writes ([`end_turn`]). A full queue means the peer stopped reading: the
    /// session is aborted instead of buffering more.
    fn send(&mut self, frame: Frame) -> Result<(), Abort> {
        let bytes = match frame.encode() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("cannot encode a frame: {e}");
                return Ok(());
            }
        };
        let hold = self.hub.store().grouping();
        self.conn.emit(Output::Bytes(bytes), hold).map_err(|()| {
            tracing::info!("a peer stopped reading its frames: closing its session");
            Abort::internal("the peer does not read its frames")
        })
    }
}

/// Binds the hub's endpoint on `listen` (no relays, no discovery).
pub async fn bind(secret: SecretKey, listen: SocketAddr) -> Result<Endpoint, HubError> {
    let err =
        |e: String| HubError::Invalid(format!("cannot open the sync endpoint on {listen}: {e}"));
    Endpoint::builder(presets::Minimal)
        .secret_key(secret)
        // v1 is accepted only to tell the device to upgrade (`refuse_v1`).
        .alpns(vec![
            ALPN.to_vec(),
            shared::sync::ALPN_V1.to_vec(),
            crate::replica::ALPN_LINK.to_vec(),
        ])
        .transport_config(transport_config())
        .clear_ip_transports()
        .bind_addr(listen)
        .map_err(|e| err(e.to_string()))?
        .bind()
        .await
        .map_err(|e| err(e.to_string()))
}

/// Starts the actor thread over an open hub, holding every session to `quotas`.
pub fn start(
    hub: Hub,
    quotas: Quotas,
) -> Result<(HubHandle, std::thread::JoinHandle<()>), HubError> {
    let (tx, rx) = tmpsc::channel(ACTOR_QUEUE);
    let metrics = Arc::new(Metrics::default());
    metrics.started_at.store(clock::now(), Ordering::Relaxed);
    let m = metrics.clone();
    let stopping = Arc::new(AtomicBool::new(false));
    let stop_flag = stopping.clone();
    // Check the ledger opens before reporting success.
    Ledger::open(hub.store(), hub.keys()).map_err(|e| HubError::Invalid(e.to_string()))?;
    let mut known: std::collections::HashSet<String> = hub
        .store()
        .devices()
        .map_err(|e| HubError::Invalid(format!("cannot read the devices: {e}")))?
        .into_iter()
        .filter(|d| !d.revoked)
        .filter_map(|d| d.endpoint_id)
        .collect();
    // The paired hub's sessions are not evicted first under a flood of strangers.
    if let Ok(Some(p)) = crate::replica::peer(hub.store()) {
        known.insert(p.endpoint_id);
    }
    let hub = Arc::new(hub);
    let shared = hub.clone();
    let ahead = Arc::new(crate::ahead::UnwrapAhead::new());
    let actor_ahead = ahead.clone();
    let thread = std::thread::Builder::new()
        .name("hub-actor".into())
        .spawn(move || actor(hub, quotas, rx, m, stop_flag, actor_ahead))
        .map_err(|e| HubError::Invalid(format!("cannot start the hub actor: {e}")))?;
    Ok((
        HubHandle {
            tx,
            known_endpoints: Arc::new(std::sync::RwLock::new(known)),
            stopping,
            metrics,
            hub: shared,
            ahead,
        },
        thread,
    ))
}

/// Stops the actor (after the input it is handling, even if its queue is full).
pub fn stop(handle: &HubHandle) {
    handle.stopping.store(true, Ordering::Release);
    let _ = handle.tx.try_send(Input::Stop);
}

/// Accepts sync connections until the endpoint closes, at most `max_connections` at a time
/// ([`MAX_CONNECTIONS`] unless the operator chose otherwise); the excess are closed at once
/// with [`CLOSE_BUSY`]. Of those, at most `max_unadmitted` ([`MAX_UNADMITTED`]) may be waiting
/// for admission: a new connection over that closes the oldest waiting one ([`CLOSE_EVICTED`]).
pub async fn serve(
    endpoint: Endpoint,
    handle: HubHandle,
    max_connections: usize,
    max_unadmitted: usize,
    links: Option<tmpsc::Sender<iroh::endpoint::Connection>>,
) {
    let max_unadmitted = max_unadmitted.max(1);
    let mut unadmitted: std::collections::VecDeque<Unadmitted> = Default::default();
    let next = Arc::new(AtomicU64::new(1));
    let slots = Arc::new(Semaphore::new(max_connections));
    let busy = Arc::new(Semaphore::new(BUSY_HANDSHAKES));
    let retention = {
        let tx = handle.tx.clone();
        tokio::spawn(async move {
            loop {
                if tx.send(Input::Tick).await.is_err() {
                    break;
                }
                tokio::time::sleep(RETENTION_INTERVAL).await;
            }
        })
    };
    while let Some(incoming) = endpoint.accept().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            handle
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            match busy.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        // Told why, so a device logs "busy" rather than a network error.
                        if let Ok(Ok(conn)) = tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
                            conn.close(CLOSE_BUSY.into(), b"the hub is at its connection limit");
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
                        }
                        drop(permit);
                    });
                }
                Err(_) => incoming.refuse(),
            }
            continue;
        };
        unadmitted.retain(|u| !u.admitted.load(Ordering::Acquire) && u.evict.strong_count() > 0);
        while unadmitted.len() >= max_unadmitted {
            let known: Vec<bool> = unadmitted
                .iter()
                .map(|u| u.known.load(Ordering::Acquire))
                .collect();
            let Some(victim) = eviction_victim(&known).and_then(|i| unadmitted.remove(i)) else {
                break;
            };
            if let Some(evict) = victim.evict.upgrade() {
                evict.notify_one();
                handle
                    .metrics
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let admitted = Arc::new(AtomicBool::new(false));
        let known = Arc::new(AtomicBool::new(false));
        let evict = Arc::new(tokio::sync::Notify::new());
        unadmitted.push_back(Unadmitted {
            admitted: admitted.clone(),
            known: known.clone(),
            evict: Arc::downgrade(&evict),
        });
        let id = next.fetch_add(1, Ordering::Relaxed);
        let handle = handle.clone();
        let links = links.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(incoming, id, handle, admitted, known, evict, links).await {
                tracing::debug!("connection {id}: {e}");
            }
            drop(slot);
        });
    }
    retention.abort();
}

async fn connection(
    incoming: iroh::endpoint::Incoming,
    conn_id: u64,
    handle: HubHandle,
    admitted: Arc<AtomicBool>,
    known: Arc<AtomicBool>,
    evict: Arc<tokio::sync::Notify>,
    links: Option<tmpsc::Sender<iroh::endpoint::Connection>>,
) -> Result<(), String> {
    let addr = match incoming.remote_addr() {
        iroh::endpoint::IncomingAddr::Ip(a) => Some(a),
        _ => None,
    };
    let hello_deadline = Instant::now() + HELLO_TIMEOUT;
    let session_deadline = Instant::now() + session_limit();
    let conn = tokio::select! {
        r = tokio::time::timeout_at(hello_deadline, incoming) => r
            .map_err(|_| "no handshake in time".to_owned())?
            .map_err(|e| e.to_string())?,
        () = evicted(&evict, &admitted) => return Err("evicted during the handshake".to_owned()),
    };
    let remote = conn.remote_id();
    let remote_hex = remote.to_string();
    if handle
        .known_endpoints
        .read()
        .is_ok_and(|k| k.contains(&remote_hex))
    {
        known.store(true, Ordering::Release);
    }
    if conn.alpn() == shared::sync::ALPN_V1 {
        refuse_v1(&conn, addr, hello_deadline, &handle).await;
        return Ok(());
    }
    if conn.alpn() == crate::replica::ALPN_LINK {
        // The registry exchange of the region's other hub: anyone else is closed here, before
        // it holds a link slot or counts as admitted; the paired hub's goes to the link task.
        let paired = crate::replica::peer(handle.hub.store())
            .ok()
            .flatten()
            .is_some_and(|p| p.endpoint_id == remote_hex);
        if !paired {
            conn.close(CLOSE_NO_HELLO.into(), b"not the paired hub");
            return Err("a hub link from an endpoint that is not the paired hub".to_owned());
        }
        admitted.store(true, Ordering::Release);
        match links {
            Some(tx) if tx.try_send(conn.clone()).is_ok() => {
                // The link task owns it now; this slot is held until it closes.
                conn.closed().await;
            }
            _ => conn.close(CLOSE_BUSY.into(), b"no hub link here"),
        }
        return Ok(());
    }
    let accepted = tokio::select! {
        r = tokio::time::timeout_at(hello_deadline, conn.accept_bi()) => r,
        () = evicted(&evict, &admitted) => {
            conn.close(CLOSE_EVICTED.into(), b"too many connections waiting for admission");
            return Err("evicted before its stream".to_owned());
        }
    };
    let (mut send, mut recv) = match accepted {
        Ok(r) => r.map_err(|e| e.to_string())?,
        Err(_) => {
            conn.close(CLOSE_NO_HELLO.into(), b"no Hello in time");
            return Err("no stream in time".to_owned());
        }
    };
    let (otx, mut orx) = tmpsc::channel(OUTGOING_FRAMES);
    handle
        .tx
        .send(Input::Open {
            conn: conn_id,
            remote,
            addr,
            reply: otx,
            admitted: admitted.clone(),
        })
        .await
        .map_err(|_| "hub stopped")?;
    // Set once the actor ended the session (it closes the writer): later frames go on unread.
    let ended = Arc::new(AtomicBool::new(false));
    let writer = write_frames(&mut send, &mut orx, &ended);
    let reader_ended = ended.clone();
    let tx = handle.tx.clone();
    let reader_admitted = admitted.clone();
    // This connection's reads unwrap session keys ahead for the actor, within its budget.
    let ahead = Ahead::new(&handle.ahead);
    // Returns whether the peer sent no frame before the Hello deadline.
    let reader = async move {
        let admitted = reader_admitted;
        // Until admission only a Hello-sized frame is buffered.
        let mut decoder = FrameDecoder::with_limit(PRE_ADMISSION_FRAME_BYTES);
        let mut raised = false;
        let mut got_frame = false;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let deadline = if got_frame {
                (Instant::now() + READ_TIMEOUT).min(session_deadline)
            } else {
                hello_deadline
            };
            let read = tokio::time::timeout_at(deadline, recv.read(&mut buf)).await;
            if read.is_err() && got_frame && Instant::now() >= session_deadline {
                // Told why, then closed like any ended session.
                let _ = tx.send(Input::TimeUp { conn: conn_id }).await;
                let _ = tx.send(Input::Closed { conn: conn_id }).await;
                return false;
            }
            match read {
                Ok(Ok(Some(n))) => {
                    // Checked after the read, not before it: admission (and the Welcome that
                    // lets the peer send large frames) usually happens while this task waits.
                    if !raised && admitted.load(Ordering::Acquire) {
                        decoder.set_limit(MAX_FRAME_BYTES);
                        raised = true;
                    }
                    match forward_frames(
                        &tx,
                        conn_id,
                        &mut decoder,
                        &buf[..n],
                        &admitted,
                        &reader_ended,
                        &ahead,
                    )
                    .await
                    {
                        Some(frames) => got_frame |= frames > 0,
                        None => return false,
                    }
                }
                outcome => {
                    let _ = tx.send(Input::Closed { conn: conn_id }).await;
                    return outcome.is_err() && !got_frame;
                }
            }
        }
    };
    // The writer ends when the actor closes the session; the reader with the stream.
    let mut was_evicted = false;
    let ((), no_hello) = tokio::join!(writer, async {
        tokio::select! {
            no_hello = reader => no_hello,
            _ = conn.closed() => {
                let _ = handle.tx.send(Input::Closed { conn: conn_id }).await;
                false
            }
            () = evicted(&evict, &admitted) => {
                was_evicted = true;
                conn.close(CLOSE_EVICTED.into(), b"too many connections waiting for admission");
                let _ = handle.tx.send(Input::Closed { conn: conn_id }).await;
                false
            }
        }
    });
    if was_evicted {
        return Ok(());
    }
    if admitted.load(Ordering::Acquire)
        && let Ok(mut known) = handle.known_endpoints.write()
    {
        // A device admitted once is preferred at the pre-admission cap from now on. Revoked
        // ones stay in the set until the hub restarts; their Hello is refused all the same.
        known.insert(remote_hex);
    }
    let stats = conn.stats();
    handle
        .metrics
        .bytes_received
        .fetch_add(stats.udp_rx.bytes, Ordering::Relaxed);
    handle
        .metrics
        .bytes_sent
        .fetch_add(stats.udp_tx.bytes, Ordering::Relaxed);
    if no_hello {
        conn.close(CLOSE_NO_HELLO.into(), b"no Hello in time");
    } else {
        conn.close(CLOSE_DONE.into(), b"done");
    }
    Ok(())
}

/// Writes a session's outgoing frames until the actor closes it, then sets `ended` and
/// finishes the stream (both the hub's answering and its dialling connections).
async fn write_frames(
    send: &mut iroh::endpoint::SendStream,
    out: &mut tmpsc::Receiver<Output>,
    ended: &AtomicBool,
) {
    while let Some(o) = out.recv().await {
        match o {
            Output::Bytes(b) => {
                if send.write_all(&b).await.is_err() {
                    break;
                }
            }
            Output::Close => break,
        }
    }
    ended.store(true, Ordering::Release);
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

/// Where a connection's task reads a frame's `Sync` message (`Inbound::read`) before the
/// actor takes the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadAt {
    /// Nowhere: the frame goes on unread. Before admission the session refuses a `Sync`
    /// unread, and after its end the actor drops every frame: a peer gets no work done for it
    /// on the hub's threads either way.
    Unread,
    /// On the runtime's worker, in the task.
    Here,
    /// On the blocking pool, one at a time ([`LARGE_READS`]): a message longer than
    /// [`READ_INLINE_MAX`] once inflated, whatever its size on the wire.
    Pool,
}

/// [`ReadAt`] for `frame` of a session whose peer is `admitted` and which has `ended` or not.
fn read_at(frame: &Frame, admitted: bool, ended: bool) -> ReadAt {
    match frame {
        Frame::Sync { .. } if !admitted || ended => ReadAt::Unread,
        Frame::Sync { message, .. } if message.len() > READ_INLINE_MAX => ReadAt::Pool,
        _ => ReadAt::Here,
    }
}

/// One connection's way to the session keys unwrapped ahead ([`crate::ahead`]): the hub's
/// cache and the connection's budget.
#[derive(Clone)]
struct Ahead {
    keys: Arc<crate::ahead::UnwrapAhead>,
    budget: Arc<crate::ahead::Budget>,
}

impl Ahead {
    fn new(keys: &Arc<crate::ahead::UnwrapAhead>) -> Ahead {
        Ahead {
            keys: keys.clone(),
            budget: Arc::new(crate::ahead::Budget::new()),
        }
    }

    /// Reads `frame` ([`Inbound::read`]) and unwraps ahead the session keys its `Sync`
    /// message puts ([`crate::ahead::UnwrapAhead::unwrap_from`]).
    fn read(&self, frame: Frame, len: usize) -> Inbound {
        let inbound = Inbound::read(frame, len);
        if let Some(message) = inbound.read_message() {
            self.keys.unwrap_from(message, &self.budget);
        }
        inbound
    }
}

/// Feeds `bytes` read from connection `conn` to its decoder and every whole frame to the
/// actor, its `Sync` message read first as [`read_at`] says (`admitted`: the peer was
/// admitted; `ended`: the actor ended the session); `None` once the connection must stop
/// (bytes that do not decode, told to the actor as `Malformed`, a read that failed, told as
/// `Closed`, or a stopped actor), else how many frames went.
async fn forward_frames(
    tx: &tmpsc::Sender<Input>,
    conn: u64,
    decoder: &mut FrameDecoder,
    bytes: &[u8],
    admitted: &AtomicBool,
    ended: &AtomicBool,
    ahead: &Ahead,
) -> Option<usize> {
    if let Err(error) = decoder.push(bytes) {
        let _ = tx.send(Input::Malformed { conn, error }).await;
        return None;
    }
    let mut frames = 0;
    loop {
        match decoder.pop_sized() {
            Ok(Some((frame, len))) => {
                frames += 1;
                // A `Sync` message is read and checked on its own here, on the connection's
                // task, not on the actor that every session shares; a large one on the
                // blocking pool, not on a worker of the runtime that moves every connection's
                // bytes. The order of the frames is kept: the next waits for this one.
                let at = read_at(
                    &frame,
                    admitted.load(Ordering::Acquire),
                    ended.load(Ordering::Acquire),
                );
                // A message read also has the session keys it puts unwrapped for the actor's
                // persist (`crate::ahead`), in the same place.
                let read = match at {
                    ReadAt::Unread => Ok(Inbound::unread(frame, len)),
                    ReadAt::Here => {
                        let ahead = ahead.clone();
                        std::panic::catch_unwind(move || ahead.read(frame, len))
                            .map_err(|_| "a panic".to_owned())
                    }
                    ReadAt::Pool => {
                        // One at a time, whatever the number of connections: hostile peers'
                        // large frames take one thread of the two cores, not all the actor's
                        // time. The permit goes with the read: a task dropped meanwhile (its
                        // connection closed) does not free it before the read ends.
                        let Ok(permit) = LARGE_READS.acquire().await else {
                            return None;
                        };
                        let ahead = ahead.clone();
                        tokio::task::spawn_blocking(move || {
                            let _permit = permit;
                            ahead.read(frame, len)
                        })
                        .await
                        .map_err(|e| e.to_string())
                    }
                };
                let frame = match read {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::error!("reading a sync message failed: {e}");
                        let _ = tx.send(Input::Closed { conn }).await;
                        return None;
                    }
                };
                tx.send(Input::Frame { conn, frame }).await.ok()?;
            }
            Ok(None) => return Some(frames),
            Err(error) => {
                let _ = tx.send(Input::Malformed { conn, error }).await;
                return None;
            }
        }
    }
}

/// The longest `Sync` message (inflated) a connection's task reads on the runtime's own
/// worker (about a millisecond of work); longer ones go to the blocking pool.
const READ_INLINE_MAX: usize = 64 * 1024;

/// The larger frames being read on the blocking pool, at most one at a time (every hub of
/// the process shares it).
static LARGE_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// How long dialling the peer hub may take before the link gives up for this round.
pub const LINK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one `Peer::HubLink` session for `facility` with the paired hub at `addr` (this hub
/// initiates: the peer's partitions of the facility and this hub's are merged both ways, and
/// persisted and indexed here like any device's). Bounded by [`session_limit`]. Returns the
/// new records this side received, or why it failed.
pub async fn dial_session(
    endpoint: &Endpoint,
    handle: &HubHandle,
    addr: iroh::EndpointAddr,
    facility: FacilityId,
) -> Result<(), String> {
    static NEXT: AtomicU64 = AtomicU64::new(1 << 62);
    let remote = addr.id;
    let conn = tokio::time::timeout(LINK_CONNECT_TIMEOUT, endpoint.connect(addr, ALPN))
        .await
        .map_err(|_| "the peer hub did not answer in time".to_owned())?
        .map_err(|e| format!("cannot connect to the peer hub: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let conn_id = NEXT.fetch_add(1, Ordering::Relaxed);
    let (otx, mut orx) = tmpsc::channel(OUTGOING_FRAMES);
    handle
        .tx
        .send(Input::OpenLink {
            conn: conn_id,
            remote,
            facility,
            reply: otx,
        })
        .await
        .map_err(|_| "hub stopped".to_owned())?;
    let deadline = Instant::now() + session_limit();
    // This hub dialled its paired hub: the peer is the one admitted.
    let admitted = AtomicBool::new(true);
    let ended = AtomicBool::new(false);
    let writer = write_frames(&mut send, &mut orx, &ended);
    let tx = handle.tx.clone();
    let ahead = Ahead::new(&handle.ahead);
    let reader = async {
        let mut decoder = FrameDecoder::with_limit(MAX_FRAME_BYTES);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let until = (Instant::now() + READ_TIMEOUT).min(deadline);
            match tokio::time::timeout_at(until, recv.read(&mut buf)).await {
                Ok(Ok(Some(n))) => {
                    if forward_frames(
                        &tx,
                        conn_id,
                        &mut decoder,
                        &buf[..n],
                        &admitted,
                        &ended,
                        &ahead,
                    )
                    .await
                    .is_none()
                    {
                        return;
                    }
                }
                _ => {
                    let _ = tx.send(Input::Closed { conn: conn_id }).await;
                    return;
                }
            }
        }
    };
    tokio::join!(writer, reader);
    conn.close(CLOSE_DONE.into(), b"done");
    Ok(())
}

/// A connection that negotiated sync protocol v1: no session, one v1 `Refused` frame telling
/// the device's operator to upgrade (`shared::sync::legacy`), a warning naming the device, a
/// refusal noted for `sync-hub stats` (reason `Protocol`, the claimed device), and close. The v1 `Hello` is read (held to [`PRE_ADMISSION_FRAME_BYTES`] and the Hello deadline)
/// only to name the device in the log; its claim is not checked, so it is logged as a claim.
async fn refuse_v1(
    conn: &iroh::endpoint::Connection,
    addr: Option<SocketAddr>,
    deadline: Instant,
    handle: &HubHandle,
) {
    handle.metrics.v1_refused.fetch_add(1, Ordering::Relaxed);
    let remote = conn.remote_id();
    let mut claim = None;
    if let Ok(Ok((mut send, mut recv))) = tokio::time::timeout_at(deadline, conn.accept_bi()).await
    {
        let mut decoder = FrameDecoder::with_limit(PRE_ADMISSION_FRAME_BYTES);
        let mut buf = vec![0u8; 4096];
        while let Ok(Ok(Some(n))) = tokio::time::timeout_at(deadline, recv.read(&mut buf)).await {
            match decoder.push(&buf[..n]).and_then(|()| decoder.pop()) {
                Ok(None) => continue,
                Ok(Some(Frame::Hello(h))) => claim = Some(h.peer),
                _ => {}
            }
            break;
        }
        let detail = shared::sync::legacy::hub_upgrade_detail(env!("CARGO_PKG_VERSION"));
        if send
            .write_all(&shared::sync::legacy::v1_refusal(&detail))
            .await
            .is_ok()
        {
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        }
    }
    let who = claim
        .as_ref()
        .map_or_else(|| "a peer".to_owned(), |p| format!("{p} (claimed)"));
    let at = addr.map_or_else(String::new, |a| format!(" at {a}"));
    tracing::warn!(
        "{who}, endpoint {remote}{at}, speaks sync protocol v1: refused, its edge-node must be upgraded to {}",
        env!("CARGO_PKG_VERSION")
    );
    let note = RefusalNote {
        at: clock::now(),
        device: claim.and_then(|p| match p {
            Peer::Device { device, .. } => Some(device.to_string()),
            _ => None,
        }),
        reason: format!("{:?}", RefuseReason::Protocol),
        by: "local".to_owned(),
        detail: format!(
            "sync protocol v1 (endpoint {remote}): told to upgrade edge-node to {}",
            env!("CARGO_PKG_VERSION")
        ),
    };
    let noted = handle.request(Request::Query(Box::new(move |_, ledger, _| {
        if let Err(e) = ledger.note_refusal(&note) {
            tracing::warn!("cannot record a refusal for stats: {e}");
        }
    })));
    if let Err(e) = noted {
        tracing::warn!("cannot record a refusal for stats: {e}");
    }
    conn.close(CLOSE_DONE.into(), b"sync protocol v1: upgrade edge-node");
}

/// The most inputs one actor turn takes before its durable commit ([`end_turn`]).
pub const TURN_INPUTS: usize = 64;
/// The longest an actor turn keeps taking inputs before its durable commit: frames a session
/// sent wait at most about this long (plus the commit) for the turn's end.
pub const TURN_TIME: Duration = Duration::from_millis(50);

/// Begins an actor turn: the writes of the sessions' inputs handled until [`end_turn`]
/// commit without fsync, and the frames they send are held.
pub fn begin_turn(hub: &Hub) {
    hub.store().begin_group();
}

/// How much an actor turn has taken: it ends after [`TURN_INPUTS`] inputs or [`TURN_TIME`],
/// or earlier when no input waits.
#[derive(Debug)]
pub struct Turn {
    started: std::time::Instant,
    inputs: usize,
}

impl Turn {
    /// Begins a turn ([`begin_turn`]).
    pub fn begin(hub: &Hub) -> Turn {
        begin_turn(hub);
        Turn {
            started: std::time::Instant::now(),
            inputs: 0,
        }
    }

    /// Counts one input taken; whether the turn is full and must end now.
    pub fn took(&mut self) -> bool {
        self.inputs += 1;
        self.inputs >= TURN_INPUTS || self.started.elapsed() >= TURN_TIME
    }
}

/// Ends an actor turn (group commit): if its sessions wrote anything, one durable commit
/// covers every write of the turn, and only then are the frames the sessions sent during the
/// turn handed to their writers, so that no peer is told of a change a crash could lose
/// (`/work/shared/design.md` item 4). A turn that wrote nothing sends at once.
///
/// Returns whether the turn's writes are durable. If the durable commit fails, nothing held
/// is sent and `false` is returned: redb then refuses every write until the database is
/// reopened while its reads still see the turn's non-durable writes, so the actor stops and the
/// hub exits (`sync-hub run` fails; its supervisor restarts it on the last durable state)
/// rather than answer from writes a restart loses. Every session that held frames is
/// aborted with the store failure (`Internal`) and counted in `persist_failures`; one that had
/// already ended is told so by a late `Refused` frame.
pub fn end_turn<'c>(
    hub: &Hub,
    ledger: &Ledger<'_>,
    conns: impl IntoIterator<Item = &'c mut Conn>,
    now: UnixSeconds,
    metrics: &Metrics,
) -> bool {
    match hub.store().end_group() {
        Ok(writes) => {
            if let Some(writes) = writes {
                metrics.group_commits.fetch_add(1, Ordering::Relaxed);
                metrics
                    .group_commit_writes
                    .fetch_add(writes, Ordering::Relaxed);
            }
            for c in conns {
                c.release();
            }
            true
        }
        Err(e) => {
            tracing::error!(
                "cannot commit the sessions' writes durably: {e}; their sessions are aborted \
                 and told nothing of what they synced"
            );
            for c in conns.into_iter().filter(|c| c.holds_output()) {
                c.held.clear();
                metrics.persist_failures.fetch_add(1, Ordering::Relaxed);
                if c.is_finished() {
                    let refused = Frame::Refused(shared::sync::Refusal::new(
                        RefuseReason::Internal,
                        STORE_FAILURE,
                    ));
                    if let Ok(bytes) = refused.encode() {
                        let _ = c.reply.try_send(Output::Bytes(bytes));
                    }
                    let _ = c.reply.try_send(Output::Close);
                    c.cache.clear();
                } else {
                    c.abort(hub, ledger, Abort::internal(STORE_FAILURE), now, metrics);
                }
            }
            false
        }
    }
}

fn actor(
    hub: Arc<Hub>,
    quotas: Quotas,
    mut rx: tmpsc::Receiver<Input>,
    metrics: Arc<Metrics>,
    stopping: Arc<AtomicBool>,
    ahead: Arc<crate::ahead::UnwrapAhead>,
) {
    let mut ledger = match Ledger::open(hub.store(), hub.keys()) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot open the ledger: {e}");
            return;
        }
    };
    ledger.unwrap_ahead(ahead);
    let mut conns: BTreeMap<u64, Conn> = BTreeMap::new();
    // Purges asked for (who, as_of, the answer), or the timer's (`None`), waiting for the one
    // under way to end.
    let mut pending_purge: std::collections::VecDeque<Option<PurgeAsked>> = Default::default();
    // The purge under way and who waits for its answer: one chunk of it runs after each input,
    // or whenever the queue is empty, so every session is served between chunks. A purge a
    // stop interrupts is finished by the next one (the timer's, at the next start).
    let mut purging: Option<(people::PurgeRun, Option<PurgeReply>)> = None;
    // Sessions that ended in this turn, kept until its durable commit releases their frames.
    let mut ended: Vec<Conn> = Vec::new();
    loop {
        let first = if purging.is_some() || !pending_purge.is_empty() {
            match rx.try_recv() {
                Ok(input) => Some(input),
                Err(tmpsc::error::TryRecvError::Empty) => None,
                Err(tmpsc::error::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.blocking_recv() {
                Some(input) => Some(input),
                None => break,
            }
        };
        if stopping.load(Ordering::Acquire) {
            break;
        }
        // One turn: the inputs queued now (up to TURN_INPUTS or TURN_TIME), their writes
        // committed without fsync and their frames held, then one durable commit.
        let mut turn = Turn::begin(&hub);
        let mut stop = false;
        let mut failed = false;
        let mut next = first;
        while let Some(input) = next.take() {
            let now = clock::now();
            let _held = metrics.holds.start(HoldKind::of(&input));
            match input {
                Input::Stop => {
                    stop = true;
                    break;
                }
                Input::Request(r) => {
                    // A request answers at once: what the turn wrote is made durable (and its
                    // frames sent) first, and the request's own writes are durable.
                    let durable = end_turn(
                        &hub,
                        &ledger,
                        conns.values_mut().chain(ended.iter_mut()),
                        now,
                        &metrics,
                    );
                    ended.clear();
                    if !durable {
                        failed = true;
                        break;
                    }
                    match r {
                        Request::Stats(reply) => {
                            let _ = reply.send(ledger.stats(now).map_err(|e| e.to_string()));
                        }
                        Request::Purge { who, as_of, reply } => {
                            pending_purge.push_back(Some((who, as_of, reply)));
                        }
                        Request::Admin(f) => {
                            let _ = f(&hub);
                            // The hub link replicates registry edits at its next round.
                            metrics.admin_writes.fetch_add(1, Ordering::Relaxed);
                        }
                        Request::Query(f) => f(&hub, &ledger, &metrics),
                    }
                    begin_turn(&hub);
                }
                Input::Tick => pending_purge.push_back(None),
                Input::Open {
                    conn,
                    remote,
                    addr,
                    reply,
                    admitted,
                } => {
                    let c = Conn::new(&hub, remote, addr, reply, admitted).with_quotas(quotas);
                    conns.insert(conn, c);
                }
                Input::OpenLink {
                    conn,
                    remote,
                    facility,
                    reply,
                } => match Conn::initiator(
                    &hub,
                    &ledger,
                    remote,
                    facility,
                    reply.clone(),
                    now,
                    &metrics,
                ) {
                    Ok(c) => {
                        conns.insert(conn, c.with_quotas(quotas));
                    }
                    Err(e) => {
                        tracing::warn!("cannot open a session to the peer hub: {e}");
                        let _ = reply.try_send(Output::Close);
                    }
                },
                Input::Frame { conn, frame } => {
                    let mut newly_admitted = None;
                    if let Some(c) = conns.get_mut(&conn) {
                        let before = c.device.is_some();
                        c.on_frame(&hub, &ledger, frame, now, &metrics);
                        if !before && c.admitted.load(Ordering::Acquire) {
                            newly_admitted = c.device.clone();
                        }
                    }
                    // One session per device: a newer one replaces the older, which is most
                    // likely a connection that died without closing (its device reconnected).
                    if let Some(device) = newly_admitted {
                        for (_, old) in conns.iter_mut().filter(|(id, c)| {
                            **id != conn && c.device.as_ref() == Some(&device) && !c.is_finished()
                        }) {
                            tracing::info!(
                                "device {device}: a newer session replaces an older one"
                            );
                            let why = Abort::new(
                                RefuseReason::Replaced,
                                "a newer session of this device replaced this one",
                            );
                            old.abort(&hub, &ledger, why, now, &metrics);
                        }
                    }
                }
                Input::TimeUp { conn } => {
                    if let Some(c) = conns.get_mut(&conn) {
                        let why = Abort::new(
                            RefuseReason::QuotaExceeded,
                            format!(
                                "the session ran longer than the hub's {} s; what was stored stays, \
                                 sync again to send the rest",
                                session_limit().as_secs()
                            ),
                        );
                        c.abort(&hub, &ledger, why, now, &metrics);
                    }
                }
                Input::Malformed { conn, error } => {
                    if let Some(c) = conns.get_mut(&conn) {
                        c.on_malformed(&hub, &ledger, error, now, &metrics);
                    }
                }
                Input::Closed { conn } => {
                    if let Some(mut c) = conns.remove(&conn) {
                        c.on_closed(&hub, &ledger, now, &metrics);
                        // Its writer may still send what the turn holds for it.
                        ended.push(c);
                    }
                }
            }
            // Ended sessions leave the map at once (later inputs for them are dropped); their
            // held frames go out at the turn's end.
            let finished: Vec<u64> = conns
                .iter()
                .filter(|(_, c)| c.is_finished())
                .map(|(id, _)| *id)
                .collect();
            for id in finished {
                if let Some(c) = conns.remove(&id) {
                    ended.push(c);
                }
            }
            if stopping.load(Ordering::Acquire) {
                stop = true;
                break;
            }
            // A session whose held frames fill half its writer's free room ends the turn now
            // (they go out after the durable commit) rather than be aborted later in the turn
            // as a peer that stopped reading (review of group commit).
            if turn.took()
                || conns
                    .values()
                    .any(|c| c.held.len() * 2 >= c.reply.capacity())
            {
                break;
            }
            next = match rx.try_recv() {
                Ok(input) => Some(input),
                Err(tmpsc::error::TryRecvError::Empty) => None,
                Err(tmpsc::error::TryRecvError::Disconnected) => {
                    stop = true;
                    None
                }
            };
        }
        let now = clock::now();
        let held = metrics.holds.start(HoldKind::Commit);
        let durable = failed
            || end_turn(
                &hub,
                &ledger,
                conns.values_mut().chain(ended.iter_mut()),
                now,
                &metrics,
            );
        drop(held);
        ended.clear();
        if failed || !durable {
            // redb refuses writes until reopened, and its reads would still show the turn's
            // lost writes: stop here; `sync-hub run` exits and its supervisor restarts it.
            tracing::error!(
                "the hub's database refused a durable commit: the hub stops, to restart on its \
                 last durable state (devices keep what they synced and send it again)"
            );
            metrics.actor_failed.store(true, Ordering::Release);
            break;
        }
        if stop {
            break;
        }
        if purging.is_none()
            && let Some(asked) = pending_purge.pop_front()
        {
            let _held = metrics.holds.start(HoldKind::PurgeStart);
            // Checked, enforced and audited in `people`; only the local operator may move
            // retention ahead of the clock.
            let (begun, reply) = match asked {
                Some((who, as_of, reply)) => (
                    people::begin_purge(&hub, &mut ledger, &who, as_of, now),
                    Some(reply),
                ),
                None => (people::begin_purge_on_timer(&hub, &mut ledger, now), None),
            };
            match begun {
                Ok(run) => {
                    // Partitions cached by open sessions may have just expired: reload from
                    // the ledger, which refuses them.
                    for c in conns.values_mut() {
                        c.cache.clear();
                    }
                    purging = Some((run, reply));
                }
                Err(e) => purge_ended(&metrics, Err(e), reply, now),
            }
            continue;
        }
        if let Some((run, _)) = purging.as_mut() {
            let _held = metrics.holds.start(HoldKind::PurgeChunk);
            let outcome = match people::purge_step(&ledger, run) {
                Ok(false) => continue,
                Ok(true) => Ok(()),
                Err(e) => Err(e),
            };
            if let Some((run, reply)) = purging.take() {
                let r = people::finish_purge(&hub, run, outcome, now);
                purge_ended(&metrics, r, reply, now);
            }
        }
    }
}

/// Where a purge's answer goes.
type PurgeReply = oneshot::Sender<Result<PurgeReport, OpError>>;

/// Counts a purge's end in the metrics and answers who asked for it.
fn purge_ended(
    metrics: &Metrics,
    r: Result<PurgeReport, OpError>,
    reply: Option<PurgeReply>,
    now: UnixSeconds,
) {
    match &r {
        Ok(report) => {
            metrics.retention_runs.fetch_add(1, Ordering::Relaxed);
            metrics.last_purge_at.store(now, Ordering::Relaxed);
            metrics
                .last_purge_records
                .store(report.records, Ordering::Relaxed);
            metrics
                .records_purged
                .fetch_add(report.records, Ordering::Relaxed);
            metrics.last_purge_failed.store(0, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::warn!("retention: {e}");
            metrics.retention_failures.fetch_add(1, Ordering::Relaxed);
            metrics.last_purge_failed.store(1, Ordering::Relaxed);
        }
    }
    if let Some(reply) = reply {
        let _ = reply.send(r);
    }
}

/// Whether `new_records` more would take the session's device over its records per day:
/// `Some(detail)` to refuse with.
/// The quota account of the paired hub's sessions for `facility` ([`Conn`]'s `link_quota`).
fn link_quota(hub: &Hub, facility: &FacilityId) -> Option<(DeviceId, u64)> {
    let account = DeviceId::parse(&format!("link-{facility}")).ok()?;
    let devices = hub
        .store()
        .devices()
        .map(|ds| {
            ds.iter()
                .filter(|d| &d.facility == facility && !d.revoked)
                .count() as u64
        })
        .unwrap_or(1);
    Some((account, devices.max(1)))
}

fn over_device_quota(
    ledger: &Ledger<'_>,
    c: &Conn,
    charge: Charge,
    now: UnixSeconds,
) -> Result<Option<String>, String> {
    let (device, scale) = match (&c.device, &c.link_quota) {
        (Some(d), _) => (d, 1),
        (None, Some((account, devices))) => (account, *devices),
        (None, None) => return Ok(None),
    };
    let today = Day::of(now);
    let quota = shared::hub::DeviceQuota {
        records_per_day: c.quotas.device_records_per_day.saturating_mul(scale),
        keys_per_day: c.quotas.device_keys_per_day.saturating_mul(scale),
    };
    let records = ledger
        .device_day_records(device, today)
        .map_err(|e| e.to_string())?;
    // The keys' count is read only when the charge brings keys: it is not looked at otherwise.
    let keys = if charge.keys > 0 {
        ledger
            .device_day_keys(device, today)
            .map_err(|e| e.to_string())?
    } else {
        0
    };
    let delivered = Charge { records, keys };
    Ok(quota.check(device, today, delivered, charge).err())
}

fn persist(
    ledger: &Ledger<'_>,
    parts: &mut impl PartitionStore,
    id: &shared::PartitionId,
    now: UnixSeconds,
    charge: Option<(&DeviceId, Charge)>,
) -> Result<Persisted, (bool, String)> {
    match parts
        .partition_mut(id)
        .map_err(|e| (false, e.to_string()))?
    {
        Some(p) => ledger.persist_charged(p, now, charge).map_err(|e| {
            (
                matches!(e, crate::ledger::LedgerError::Conflict { .. }),
                e.to_string(),
            )
        }),
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

/// The hub's registry in redb, as the hub core's admission reads it.
struct StoreRegistry<'h>(&'h Hub);

impl shared::hub::Registry for StoreRegistry<'_> {
    fn device(&self, id: &DeviceId) -> Result<Option<shared::hub::EnrolledDevice>, String> {
        let Some(rec) = self.0.store().device(id).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        // The keyed revocation list, not only the row's flag: a row restored to its bytes from
        // before the revocation does not readmit the device, and a list that does not verify
        // refuses every device (fail closed).
        let revoked = match crate::auth::check_device(self.0.store(), &rec) {
            Ok(()) => false,
            Err(crate::auth::AuthError::Revoked) => true,
            Err(e) => return Err(e.to_string()),
        };
        Ok(Some(shared::hub::EnrolledDevice {
            facility: rec.facility,
            endpoint: rec.endpoint_id,
            revoked,
        }))
    }

    fn facility_status(&self, id: &FacilityId) -> Result<Option<FacilityStatus>, String> {
        Ok(self
            .0
            .store()
            .facility(id)
            .map_err(|e| e.to_string())?
            .map(|f| f.status))
    }

    fn credential_device(&self, digest: &[u8; 32]) -> Result<Option<DeviceId>, String> {
        self.0
            .store()
            .credential_device(digest)
            .map_err(|e| e.to_string())
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

/// Admission: who may sync, for which facility, and what they get back. The rule is the hub
/// core's (`shared::hub::admit`); this carries out its binding and builds the refresh.
fn decide(
    hub: &Hub,
    ledger: &Ledger<'_>,
    remote: &PublicKey,
    hello: &PeerHello,
    now: UnixSeconds,
) -> (Decision, Option<DeviceId>) {
    let remote_hex = remote.to_string();
    if let Peer::HubLink { .. } = &hello.peer {
        return (admit_link(hub, &remote_hex, hello), None);
    }
    let admission = shared::hub::admit(hello, &remote_hex, &StoreRegistry(hub));
    let shared::hub::Admission::Admit {
        device,
        facility,
        bind,
    } = &admission
    else {
        return (admission.into_decision(None), None);
    };
    if let Some(digest) = bind {
        let bound = match hub.store().device(device) {
            Ok(Some(rec)) => DeviceRecord {
                endpoint_id: Some(remote_hex),
                ..rec
            },
            Ok(None) => {
                return refuse(
                    RefuseReason::UnknownDevice,
                    "this device is not enrolled here",
                );
            }
            Err(e) => return refuse(RefuseReason::Internal, &e.to_string()),
        };
        if let Err(e) = hub.store().bind_device(digest, &bound) {
            return refuse(RefuseReason::Internal, &e.to_string());
        }
        tracing::info!("device {device} bound to endpoint {}", remote.fmt_short());
    }
    let have = hello
        .refresh_have
        .as_deref()
        .and_then(shared::ticket::RefreshHave::from_bytes);
    let refresh = match refresh_for(hub, ledger, device, facility, now, have.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot build the refresh of device {device}: {e}");
            return refuse(
                RefuseReason::Internal,
                "the hub cannot read its registry right now; nothing was changed, sync again later",
            );
        }
    };
    let device = device.clone();
    (
        admission.into_decision((!refresh.is_empty()).then(|| refresh.to_bytes())),
        Some(device),
    )
}

/// Admission of the region's other hub for one facility's partitions: only from the endpoint
/// this hub was paired with (`sync-hub peer add`), of this region, for a facility this hub
/// has registered and not removed.
fn admit_link(hub: &Hub, remote_hex: &str, hello: &PeerHello) -> Decision {
    let paired = match crate::replica::peer(hub.store()) {
        Ok(p) => p.is_some_and(|p| p.endpoint_id == remote_hex),
        Err(e) => return refuse(RefuseReason::Internal, &e.to_string()).0,
    };
    shared::hub::admit_link(hello, paired, &hub.config().region, |f| {
        hub.store()
            .facility(f)
            .map(|f| f.is_some())
            .map_err(|e| e.to_string())
    })
}

/// What an admitted device gets back: the day keys it lacks, and the issuers' keyring, its
/// siblings and the hub's advertised addresses when they differ from what its hello says it
/// holds (`have`; without it, everything). A read error is an error, never an empty keyring or roster: a device that
/// applied an empty keyring would answer "unknown issuer" to every visitor until its next
/// good sync.
fn refresh_for(
    hub: &Hub,
    ledger: &Ledger<'_>,
    device: &DeviceId,
    facility: &FacilityId,
    now: UnixSeconds,
    have: Option<&shared::ticket::RefreshHave>,
) -> Result<Refresh, HubError> {
    // A sibling whose row was restored after its revocation stays out of the roster: the
    // keyed list is read (and verified) once, not once per sibling.
    let revoked =
        crate::auth::revocations(hub.store()).map_err(|e| HubError::Revocation(e.to_string()))?;
    let roster = hub
        .store()
        .devices()?
        .into_iter()
        .filter(|d| {
            &d.facility == facility
                && &d.id != device
                && !d.revoked
                && !revoked.contains(crate::auth::Revoked::Device, &d.id.to_string())
        })
        .filter_map(|d| {
            Some(Sibling {
                endpoint_id: d.endpoint_id.clone()?,
                device_id: d.id,
                name: d.name,
                addrs: d.addrs,
            })
        })
        .collect();
    let today = Day::of(now);
    let all = ledger.ratchet().publics(today, DAY_KEYS_AHEAD);
    let keyring = hub.keyring()?;
    let hub_addrs = hub.advertised();
    let revocations = crate::auth::refresh_revocations(
        hub,
        &revoked,
        facility,
        have.and_then(|h| h.revocations),
        now,
    )?;
    // The region's other hub, with its day keys from today on: the device wraps every
    // session key to both hubs and fails over to it.
    let peer_hub = crate::registry::peer(hub.store())?.map(|p| p.as_peer_hub(today));
    let Some(have) = have else {
        return Ok(Refresh {
            day_keys: all,
            keyring: Some(keyring),
            roster: Some(roster),
            hub_addrs: Some(hub_addrs),
            revocations,
            peer_hub,
        });
    };
    // The device's keys from today to its newest must be this hub's (a rebuilt hub has new
    // ones); then only the days after its newest travel.
    let held: Vec<&shared::daykey::DayPublicKey> =
        all.iter().filter(|k| k.day <= have.newest).collect();
    let day_keys = if have.from == today
        && have.newest >= today
        && shared::ticket::digest(&held) == have.day_keys
    {
        all.into_iter().filter(|k| k.day > have.newest).collect()
    } else {
        all
    };
    Ok(Refresh {
        day_keys,
        keyring: (shared::ticket::digest(&keyring) != have.keyring).then_some(keyring),
        roster: (shared::ticket::digest(&roster) != have.roster).then_some(roster),
        // Only to a device that says which addresses it dials (an older one would not read
        // them), and only when they differ.
        hub_addrs: have
            .hub_addrs
            .is_some_and(|h| shared::ticket::digest(&hub_addrs) != h)
            .then_some(hub_addrs),
        revocations,
        // Only to a device that says which peer hub it holds, and only when it differs.
        peer_hub: match (have.peer, peer_hub) {
            (Some(held), Some(p)) if shared::ticket::peer_digest(have.from, Some(&p)) != held => {
                Some(p)
            }
            _ => None,
        },
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

#[cfg(test)]
mod eviction_tests {
    use super::{Frame, Inbound, READ_INLINE_MAX, ReadAt, eviction_victim, read_at};
    use shared::time::Day;
    use shared::{FacilityId, PartitionId};

    /// A connection's task reads a `Sync` message only for an admitted peer whose session
    /// goes on, and a message long once inflated on the blocking pool whatever its size on the
    /// wire (found in review: a 54 KB frame inflating to a 14 MB message was read on a worker
    /// of the runtime, and a stranger's before its `Hello` was admitted).
    #[test]
    fn a_sync_message_is_read_ahead_only_for_an_admitted_session_that_goes_on() {
        let partition = PartitionId {
            facility: FacilityId::parse("fac_1").unwrap(),
            day: Day(20_000),
        };
        let sync = |len: usize| Frame::Sync {
            partition: partition.clone(),
            message: vec![0x42; len],
        };
        let (small, large) = (sync(READ_INLINE_MAX), sync(READ_INLINE_MAX + 1));
        assert_eq!(read_at(&small, true, false), ReadAt::Here);
        assert_eq!(read_at(&large, true, false), ReadAt::Pool);
        for frame in [&small, &large] {
            assert_eq!(read_at(frame, false, false), ReadAt::Unread);
            assert_eq!(read_at(frame, true, true), ReadAt::Unread);
        }
        let done = Frame::Done { received: 1 };
        assert_eq!(read_at(&done, false, false), ReadAt::Here);
        // What goes on unread keeps its size on the wire and is read by the session if ever.
        let unread = Inbound::unread(large.clone(), 70_000);
        assert!(!unread.is_read() && unread.wire_len() == 70_000);
        assert!(Inbound::read(large, 70_000).is_read());
    }

    #[test]
    fn the_pre_admission_cap_evicts_strangers_before_known_devices() {
        assert_eq!(eviction_victim(&[]), None);
        assert_eq!(eviction_victim(&[false, false]), Some(0));
        assert_eq!(eviction_victim(&[true, false, false]), Some(1));
        assert_eq!(eviction_victim(&[true, true, false]), Some(2));
        assert_eq!(
            eviction_victim(&[true, true]),
            Some(0),
            "all known: the oldest"
        );
    }
}
