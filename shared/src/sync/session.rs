//! One sync session as a pure state machine, in the style of quinn-proto.
//!
//! The shell feeds it frames (`handle_frame`), the responder's admission decision (`admit`)
//! and the end of the stream (`handle_malformed`, `handle_closed`); it drains frames to send
//! (`poll_transmit`) and events to act on (`poll_event`). The session never reads a clock, a
//! socket or a disk: time comes in as `now`, partitions through a [`PartitionStore`].
//!
//! Every decision about who may sync is the shell's (`admit`); the session enforces what
//! follows from it: only the admitted facility's partitions, only inside the agreed horizon
//! window, within bounded rounds. `docs/protocol.md` describes the states and rules.

use super::frame::{
    Frame, HeadsDigest, Hello, InSync, Inbound, InboundBody, LENGTH_PREFIX_BYTES, MAX_DETAIL_CHARS,
    MAX_FRAME_BYTES, MAX_REFRESH_HAVE_BYTES, PROTOCOL_VERSION, PartitionSummary, Peer, PeerSummary,
    Refusal, RefuseReason, Welcome, heads_digest, set_digest,
};
use super::validate::{self, ReadMessage};
use crate::ids::{FacilityId, PartitionId};
use crate::partition::Partition;
use crate::time::{Day, UnixSeconds, horizon};
use automerge::ChangeHash;
use automerge::ReadDoc;
use automerge::sync::{Message, State as SyncState, SyncDoc};
use std::collections::{BTreeMap, VecDeque};

/// The most `Sync` frames a session accepts for one partition. A healthy automerge exchange
/// settles in a handful of round trips plus one per [`MAX_SYNC_MESSAGE_BYTES`] of changes the
/// peer lacks: a busy facility-day of 200,000 visits (~30 MB) takes about eight. 64 rounds carry
/// up to 256 MiB; a peer that keeps going is broken or hostile, and whatever it sent before
/// the limit is kept, so a larger backlog still finishes over several sessions.
pub const MAX_ROUNDS_PER_PARTITION: u32 = 64;

/// The most bytes of an automerge sync message this side builds. automerge puts every change
/// the peer lacks into one message; [`next_message`] keeps only as many as fit (at least one)
/// and leaves the rest for the next round trip, so no partition is ever too big to sync. Well
/// below the frame limit (`MAX_FRAME_BYTES`, 16 MiB): one message of changes is one burst of
/// memory at both ends, and an interrupted session keeps what the earlier messages carried.
pub const MAX_SYNC_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The most bytes of sync messages a session accepts while automerge holds changes of them
/// back for missing dependencies. An honest peer causes a held-back change only when a bloom
/// filter's false positive makes it skip a dependency for a round (one message); a peer that
/// keeps sending changes nobody can apply is filling memory.
pub const MAX_HELD_BACK_BYTES: usize = 2 * MAX_SYNC_MESSAGE_BYTES;

/// The most partitions a `Hello` or `Welcome` may list and a session may touch. One facility
/// has 29 live days; the rest is room for hubs and clock trouble.
pub const MAX_PARTITIONS_PER_SESSION: usize = 128;

/// The most heads one partition summary may list (concurrent writers of one partition).
pub const MAX_HEADS_PER_PARTITION: usize = 1024;

/// How many days past the earlier of the two clocks' today a partition may be and still sync.
/// Room for midnight and small skew; a device whose clock runs days ahead keeps those
/// partitions until the hub's calendar reaches them.
pub const MAX_FUTURE_DAYS: u32 = 1;

/// What a shell provides to a session: its partitions and its per-peer sync states.
///
/// In memory in tests and simulation (`harness::MemoryStore`), redb-backed in the shells.
///
/// The session mutates partitions in place through `partition_mut`/`create_partition` and
/// reads sync states through `sync_state`; it never persists anything. Persistence follows
/// the events, in order: `Event::PartitionUpdated` (save the partition) always comes before
/// the `Event::SyncStateChanged` that depends on it, and a shell must make the partition
/// durable before it stores the state, or a crash could leave a state claiming changes the
/// partition lost. `put_sync_state` is how a shell (or `harness::run_pair`) stores the state of
/// a `SyncStateChanged` event; the session never calls it.
pub trait PartitionStore {
    /// Summaries of the partitions this node holds, of `facility` only when given.
    /// The session filters them again by facility and horizon.
    fn live_partitions(
        &self,
        facility: Option<&FacilityId>,
    ) -> Result<Vec<PartitionSummary>, StoreError>;

    /// The partition `id` if this node holds it.
    fn partition_mut(&mut self, id: &PartitionId) -> Result<Option<&mut Partition>, StoreError>;

    /// Creates the empty partition `id` to receive a peer's copy; `StoreError::NotAllowed`
    /// if this node must not hold it.
    fn create_partition(&mut self, id: &PartitionId) -> Result<&mut Partition, StoreError>;

    /// The encoded `automerge::sync::State` last persisted for (`peer`, `id`).
    fn sync_state(&self, peer: &Peer, id: &PartitionId) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores an encoded sync state from `Event::SyncStateChanged`.
    fn put_sync_state(
        &mut self,
        peer: &Peer,
        id: &PartitionId,
        state: &[u8],
    ) -> Result<(), StoreError>;

    /// Drops the in-memory copy of partition `id`, which a peer's message made invalid after
    /// it was applied (`validate::check_applied`): its next use must return what is stored,
    /// and nothing of the dropped copy may ever be persisted. The session calls this before it
    /// refuses the peer; it has emitted no `Event::PartitionUpdated` for the bad apply.
    /// `good_heads` are the partition's heads before that apply, i.e. what the shell stored
    /// at the last `PartitionUpdated`; a store without a disk (`harness::MemoryStore`)
    /// reverts to them.
    fn discard_partition(
        &mut self,
        id: &PartitionId,
        good_heads: &[ChangeHash],
    ) -> Result<(), StoreError>;
}

/// A [`PartitionStore`] could not do what the session asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// This node must not hold the partition (another facility's, for a device).
    #[error("partition {id} may not be created here: {why}")]
    NotAllowed {
        /// The partition asked for.
        id: PartitionId,
        /// The store's reason.
        why: String,
    },
    /// The store failed (disk, corruption).
    #[error("partition store failed: {0}; check the node's storage and sync again")]
    Failed(String),
}

/// Everything that can end a session with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The peer's bytes did not form a frame.
    #[error("malformed frame from the peer: {0}")]
    Frame(#[from] super::frame::FrameError),
    /// A frame arrived that the session's state does not allow.
    #[error("unexpected {frame} frame while {state}: the peer does not follow the protocol")]
    Unexpected {
        /// The frame's kind.
        frame: &'static str,
        /// What the session was doing.
        state: &'static str,
    },
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks sync protocol version {theirs}, this node speaks {PROTOCOL_VERSION}: update the older side"
    )]
    Version {
        /// The peer's version.
        theirs: u16,
    },
    /// A hello or welcome listed more than the session accepts.
    #[error("peer listed {what} over the limit of {max}: the peer is broken or hostile")]
    TooMany {
        /// What was listed.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// The peer sent a partition that does not belong in this session.
    #[error("peer sent partition {partition}: {why}")]
    Forbidden {
        /// The partition.
        partition: PartitionId,
        /// Which rule it broke.
        why: String,
    },
    /// The peer kept sending sync messages for one partition.
    #[error(
        "peer sent more than {MAX_ROUNDS_PER_PARTITION} sync messages for {partition}: it is broken or hostile"
    )]
    TooManyRounds {
        /// The partition.
        partition: PartitionId,
    },
    /// The peer sent more `Done` frames than it has reasons to.
    #[error(
        "peer sent {dones} Done frames for {sent} sync messages: it does not follow the protocol"
    )]
    TooManyDones {
        /// Done frames received.
        dones: u64,
        /// Sync frames sent to the peer.
        sent: u32,
    },
    /// The peer acknowledged more sync messages than were sent to it.
    #[error("peer says it received {claimed} sync messages but only {sent} were sent")]
    BadDone {
        /// The peer's count.
        claimed: u32,
        /// This side's count.
        sent: u32,
    },
    /// A `Sync` frame did not hold an automerge sync message.
    #[error("sync message for {partition} does not decode: {detail}")]
    BadSyncMessage {
        /// The partition.
        partition: PartitionId,
        /// automerge's report.
        detail: String,
    },
    /// automerge refused to apply a sync message.
    #[error("sync message for {partition} could not be applied: {detail}")]
    Merge {
        /// The partition.
        partition: PartitionId,
        /// automerge's report.
        detail: String,
    },
    /// A frame this side would send is over the frame limit.
    #[error(
        "a {what} frame of {len} bytes is over the {MAX_FRAME_BYTES}-byte limit: the partition is too large to send in one message"
    )]
    TooLarge {
        /// Which frame.
        what: &'static str,
        /// Its body length.
        len: usize,
    },
    /// The partition store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stream ended before both sides were done.
    #[error("the stream closed before the session finished: sync again")]
    ClosedEarly,
}

impl SyncError {
    /// The reason sent to the peer when this error ends the session.
    fn reason(&self) -> RefuseReason {
        match self {
            SyncError::Version { .. } => RefuseReason::Version,
            SyncError::TooManyRounds { .. } | SyncError::TooManyDones { .. } => {
                RefuseReason::TooManyRounds
            }
            SyncError::TooLarge { .. } | SyncError::Store(_) => RefuseReason::Internal,
            _ => RefuseReason::Protocol,
        }
    }
}

/// Which end of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Opened the connection and sent `Hello` (a device).
    Initiator,
    /// Accepted it (a hub, or a sibling device).
    Responder,
}

/// Who sent a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This node refused the peer.
    Local,
    /// The peer refused this node.
    Peer,
}

/// The responder's view of an initiator's hello, for the shell to decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    /// Who the initiator says it is; the shell checks this against the endpoint id.
    pub peer: Peer,
    /// The enrollment credential, on first contact.
    pub credential: Option<[u8; 32]>,
    /// The initiator's clock.
    pub now: UnixSeconds,
    /// What the initiator holds of the responder's refresh (opaque shell bytes).
    pub refresh_have: Option<Vec<u8>>,
    /// Whether the initiator only sends (`Hello::push_only`). Hubs and devices admit a
    /// device only when it does: a device has no reason to download records it cannot read.
    pub push_only: bool,
}

/// The shell's answer to a [`PeerHello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Sync the partitions of `facility` with this peer.
    Admit {
        /// The facility the peer is enrolled for, from the shell's registry.
        facility: FacilityId,
        /// Opaque bytes for the peer's shell (day keys, keyring, roster).
        refresh: Option<Vec<u8>>,
    },
    /// End the session.
    Refuse {
        /// Why.
        reason: RefuseReason,
        /// For the peer's logs.
        detail: String,
    },
}

/// Frame and byte counts of one session, encoded sizes with length prefixes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Frames queued for the peer.
    pub frames_sent: u64,
    /// Frames handled from the peer.
    pub frames_received: u64,
    /// Bytes of the frames queued for the peer.
    pub bytes_sent: u64,
    /// Bytes of the frames handled from the peer.
    pub bytes_received: u64,
    /// `Sync` frames queued for the peer.
    pub syncs_sent: u64,
    /// `Sync` frames handled from the peer.
    pub syncs_received: u64,
    /// Partitions whose heads differed, so that automerge sync ran for them.
    pub partitions_synced: u64,
}

/// What the session tells its shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Responder: the initiator introduced itself; answer with `Session::admit`.
    PeerHello(PeerHello),
    /// Initiator: the responder admitted this node.
    Welcomed {
        /// Who the responder is.
        peer: Peer,
        /// The responder's clock.
        now: UnixSeconds,
        /// The responder's refresh bytes, for the shell to apply.
        refresh: Option<Vec<u8>>,
    },
    /// The peer's clock minus this node's, in seconds, measured from its hello or welcome.
    ClockOffset {
        /// Positive when the peer's clock is ahead.
        seconds: i64,
    },
    /// A partition took in the peer's changes: persist it before any later event.
    PartitionUpdated {
        /// Which partition.
        id: PartitionId,
        /// How many records it gained.
        new_records: u64,
        /// How many wrapped keys (`k/` entries) it gained.
        new_keys: u64,
    },
    /// Persist this encoded sync state for (`peer`, `partition`) so the next session stays small.
    SyncStateChanged {
        /// The peer the state is about.
        peer: Peer,
        /// The partition.
        partition: PartitionId,
        /// `automerge::sync::State::encode()`.
        state: Vec<u8>,
    },
    /// The session ended with a refusal: flush `poll_transmit`, then close the stream.
    Refused {
        /// Who refused.
        by: Side,
        /// Why.
        reason: RefuseReason,
        /// The explanation, at most `MAX_DETAIL_CHARS` characters.
        detail: String,
    },
    /// One partition's changes were refused (by this side or the peer) and the session goes
    /// on without it: nothing of it crossed in this session after the refused message, and
    /// the shell must not count it as delivered. Log it and show it in status.
    PartitionRefused {
        /// Who refused.
        by: Side,
        /// The partition.
        partition: PartitionId,
        /// Why.
        reason: RefuseReason,
        /// The explanation, at most `MAX_DETAIL_CHARS` characters.
        detail: String,
    },
    /// The session ended with an error: flush `poll_transmit`, then close the stream.
    Failed(SyncError),
    /// Both sides are done: flush `poll_transmit`, then close the stream.
    Finished(WireStats),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    AwaitAdmission,
    AwaitWelcome,
    Syncing,
    Finished,
    Closed,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::AwaitHello => "awaiting a hello",
            Phase::AwaitAdmission => "awaiting the admission decision",
            Phase::AwaitWelcome => "awaiting a welcome",
            Phase::Syncing => "syncing",
            Phase::Finished => "finished",
            Phase::Closed => "closed",
        }
    }
}

/// The days both sides agreed to sync: from the later horizon to one day past the earlier today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    from: Day,
    to: Day,
}

impl Window {
    /// Computed identically on both sides from the hello's and the welcome's `now`/`horizon`.
    fn agreed(a_now: UnixSeconds, a_horizon: Day, b_now: UnixSeconds, b_horizon: Day) -> Self {
        Window {
            from: a_horizon.max(b_horizon),
            to: Day::of(a_now.min(b_now)).plus(MAX_FUTURE_DAYS),
        }
    }

    fn contains(&self, day: Day) -> bool {
        self.from <= day && day <= self.to
    }
}

/// Per-partition automerge sync progress within one session.
#[derive(Debug)]
struct PartitionSync {
    state: SyncState,
    /// The encoded state as loaded, to emit `SyncStateChanged` only on change.
    loaded: Option<Vec<u8>>,
    received: u32,
}

/// One sync session with one peer. See the module docs.
#[derive(Debug)]
pub struct Session {
    role: Role,
    me: Peer,
    phase: Phase,
    peer: Option<Peer>,
    /// The only facility whose partitions may cross this session, once known.
    scope: Option<FacilityId>,
    /// The initiator's hello: sent (initiator) or received and awaiting admission (responder).
    hello: Option<Hello>,
    /// Initiator: the digest of every partition its hello stood for, listed or in `in_sync`.
    advertised: BTreeMap<PartitionId, HeadsDigest>,
    /// Initiator: the partitions its hello listed (changed since the last session).
    listed: Vec<PartitionId>,
    /// The initiator only sends (its hello's `push_only`).
    push_only: bool,
    window: Window,
    partitions: BTreeMap<PartitionId, PartitionSync>,
    /// Partitions refused in this session, by either side, with the `Sync` frames received
    /// for them since: they are not applied.
    skipped: BTreeMap<PartitionId, u32>,
    /// Sync states of partitions found already in sync, emitted on a clean finish.
    settled: Vec<(PartitionId, Vec<u8>)>,
    transmits: VecDeque<Frame>,
    events: VecDeque<Event>,
    sent_syncs: u32,
    received_syncs: u32,
    /// Bytes of received messages after which automerge still held changes back.
    held_back_bytes: usize,
    /// By partition, the actors and operation ids of the changes received while automerge
    /// held something back (`validate::CheckedMessage::check_op_ids`): dropped once nothing
    /// is held back, when everything received is in the partition's own history.
    op_spans: BTreeMap<PartitionId, Vec<validate::OpSpan>>,
    /// (sent, received) when this side last sent `Done`.
    done_sent_at: Option<(u32, u32)>,
    /// The peer's last `Done` count, cleared by any later `Sync` from it.
    peer_done: Option<u32>,
    dones_received: u64,
    /// Whether handling the current input queued a `Sync`: the peer then owes a frame.
    step_sent_sync: bool,
    stats: WireStats,
}

impl Session {
    /// A device opening a session with a peer it does not name: its `Hello` lists every
    /// live partition. See [`Session::initiator_to`].
    pub fn initiator(
        now: UnixSeconds,
        me: Peer,
        credential: Option<[u8; 32]>,
        store: &impl PartitionStore,
    ) -> Result<Session, SyncError> {
        Session::initiator_to(now, me, None, credential, None, false, store)
    }

    /// A device opening a session with `to` (the hub or the sibling it dials): queues its
    /// `Hello`.
    ///
    /// A device offers only its own facility's partitions from `horizon(now)` on. A partition
    /// whose heads are those its stored sync state with `to` says both sides shared at the end
    /// of their last session is left out of the list and counted in `in_sync` instead, so an
    /// idle partition costs nothing on the wire. `refresh_have` (opaque, at most
    /// [`MAX_REFRESH_HAVE_BYTES`]) tells the responder's shell what refresh it already holds.
    /// With `push_only` this side only sends: the responder sends it no changes (automerge's
    /// read-only sync) and starts nothing of its own, so a device does not download what its
    /// siblings wrote.
    #[allow(clippy::too_many_arguments)]
    pub fn initiator_to(
        now: UnixSeconds,
        me: Peer,
        to: Option<&Peer>,
        credential: Option<[u8; 32]>,
        refresh_have: Option<Vec<u8>>,
        push_only: bool,
        store: &impl PartitionStore,
    ) -> Result<Session, SyncError> {
        if refresh_have
            .as_ref()
            .is_some_and(|b| b.len() > MAX_REFRESH_HAVE_BYTES)
        {
            return Err(SyncError::TooMany {
                what: "bytes of refresh_have",
                max: MAX_REFRESH_HAVE_BYTES,
            });
        }
        let scope = me.facility().cloned();
        let own_horizon = horizon(now);
        let mut live: Vec<PartitionSummary> = store
            .live_partitions(scope.as_ref())?
            .into_iter()
            .filter(|s| s.id.day >= own_horizon && in_scope(scope.as_ref(), &s.id))
            .collect();
        // Oldest first: they are the nearest to expiry if the list must be cut.
        live.sort_by(|a, b| a.id.cmp(&b.id));
        live.truncate(MAX_PARTITIONS_PER_SESSION);
        let mut partitions = Vec::new();
        let mut listed = Vec::new();
        let mut quiet: Vec<(PartitionId, Vec<[u8; 32]>)> = Vec::new();
        let mut advertised = BTreeMap::new();
        for summary in live {
            let heads = sorted(&summary.heads);
            advertised.insert(summary.id.clone(), heads_digest(&heads));
            let shared = match to {
                Some(peer) => shared_heads(store, peer, &summary.id)?,
                None => None,
            };
            // The peer holds every change of ours when each of our heads is among the heads
            // both shared (a push-only side's shared heads also keep older ones: it never
            // takes the peer's newer heads).
            let held = shared
                .as_ref()
                .is_some_and(|s| heads.iter().all(|h| s.binary_search(h).is_ok()));
            if !heads.is_empty() && held {
                quiet.push((summary.id, heads));
            } else {
                listed.push(summary.id.clone());
                partitions.push(summary.advertised());
            }
        }
        let in_sync = InSync {
            // At most MAX_PARTITIONS_PER_SESSION (128) partitions.
            count: u16::try_from(quiet.len()).unwrap_or(u16::MAX),
            digest: set_digest(quiet.iter().map(|(id, h)| (id, h.as_slice()))),
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            peer: me.clone(),
            now,
            horizon: own_horizon,
            partitions,
            in_sync,
            push_only,
            credential,
            refresh_have,
        };
        let mut session = Session::new(Role::Initiator, me, Phase::AwaitWelcome);
        session.scope = scope;
        session.advertised = advertised;
        session.listed = listed;
        session.push_only = push_only;
        session.send(Frame::Hello(hello.clone()))?;
        session.hello = Some(hello);
        Ok(session)
    }

    /// A hub or sibling device accepting a session: waits for the peer's `Hello`.
    pub fn responder(me: Peer) -> Session {
        Session::new(Role::Responder, me, Phase::AwaitHello)
    }

    fn new(role: Role, me: Peer, phase: Phase) -> Session {
        Session {
            role,
            me,
            phase,
            peer: None,
            scope: None,
            hello: None,
            advertised: BTreeMap::new(),
            listed: Vec::new(),
            push_only: false,
            window: Window {
                from: Day(u32::MAX),
                to: Day(0),
            },
            partitions: BTreeMap::new(),
            settled: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            sent_syncs: 0,
            received_syncs: 0,
            held_back_bytes: 0,
            op_spans: BTreeMap::new(),
            skipped: BTreeMap::new(),
            done_sent_at: None,
            peer_done: None,
            dones_received: 0,
            step_sent_sync: false,
            stats: WireStats::default(),
        }
    }

    /// Which end this session is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The peer, once its hello or welcome arrived.
    pub fn peer(&self) -> Option<&Peer> {
        self.peer.as_ref()
    }

    /// Frame and byte counts so far.
    pub fn stats(&self) -> WireStats {
        self.stats
    }

    /// Forgets the changes automerge holds back (for dependencies that never arrived) in every
    /// partition this session synced, so that none stays in memory after the session (finding
    /// F4 of the second sync v2 review: a peer could leave up to [`MAX_HELD_BACK_BYTES`] in
    /// each of many partitions until each was next synced). `shared::sync::driver` calls it
    /// when a session ends; a partition the store no longer holds is skipped. Only a
    /// partition that holds something back is dropped from memory ([`PartitionStore::discard_partition`]).
    pub fn release_held_back(&self, store: &mut impl PartitionStore) -> Result<(), StoreError> {
        for id in self.partitions.keys() {
            let heads = match store.partition_mut(id)? {
                Some(part) if part.holds_back_changes() => part.heads(),
                _ => continue,
            };
            // Every merge of the session was stored (or its partition already discarded), so
            // the heads are what is stored: dropping the copy in memory loses nothing, and
            // costs nothing until the partition is next used (a hub's per-connection cache
            // is simply gone).
            store.discard_partition(id, &heads)?;
        }
        Ok(())
    }

    /// Whether the session is over (finished, refused or failed): flush `poll_transmit` and
    /// `poll_event`, then close the stream.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished | Phase::Closed)
    }

    /// Whether the session ended with both sides done, rather than refused or failed.
    pub fn is_completed(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Whether the responder waits for `admit`.
    pub fn awaits_admission(&self) -> bool {
        self.phase == Phase::AwaitAdmission
    }

    /// Whether the session takes `Sync` frames now (admitted, not ended): a shell reads their
    /// messages ahead ([`Inbound::read`]) only then.
    pub fn is_syncing(&self) -> bool {
        self.phase == Phase::Syncing
    }

    /// The next frame to write to the stream.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmits.pop_front()
    }

    /// The next event for the shell.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Handles one frame from the peer (a [`Frame`], or an [`Inbound`] whose `Sync` message
    /// was already read where it arrived). Late frames after the end are ignored.
    pub fn handle_frame(
        &mut self,
        now: UnixSeconds,
        frame: impl Into<Inbound>,
        store: &mut impl PartitionStore,
    ) {
        if self.is_finished() {
            return;
        }
        let inbound = frame.into();
        self.stats.frames_received += 1;
        self.stats.bytes_received += inbound.wire_len() as u64;
        self.step_sent_sync = false;
        let frame = match inbound.body {
            InboundBody::Sync {
                partition, message, ..
            } => {
                let result = if self.phase == Phase::Syncing {
                    self.on_sync(partition, message, store)
                } else {
                    Err(SyncError::Unexpected {
                        frame: "Sync",
                        state: self.phase.describe(),
                    })
                };
                self.conclude(result);
                return;
            }
            InboundBody::Frame(frame, _) => frame,
        };
        let result = match (self.phase, frame) {
            (_, Frame::Refused(refusal)) => {
                self.close_refused(
                    Side::Peer,
                    refusal.reason,
                    refusal.detail.chars().take(MAX_DETAIL_CHARS).collect(),
                );
                Ok(())
            }
            (Phase::AwaitHello, Frame::Hello(hello)) => self.on_hello(now, hello),
            (Phase::AwaitWelcome, Frame::Welcome(welcome)) => self.on_welcome(now, welcome, store),
            (Phase::Syncing, Frame::Sync { partition, message }) => {
                self.on_sync(partition, ReadMessage::read(message), store)
            }
            (Phase::Syncing, Frame::Done { received }) => self.on_done(received),
            (Phase::Syncing, Frame::Skipped { partition, refusal }) => {
                self.on_skipped(partition, refusal)
            }
            (phase, frame) => Err(SyncError::Unexpected {
                frame: frame.kind(),
                state: phase.describe(),
            }),
        };
        self.conclude(result);
    }

    /// Responder: the shell's decision on the `PeerHello` event.
    /// Ignored unless the session awaits admission.
    pub fn admit(&mut self, now: UnixSeconds, decision: Decision, store: &mut impl PartitionStore) {
        if self.phase != Phase::AwaitAdmission {
            return;
        }
        self.step_sent_sync = false;
        let result = self.on_admit(now, decision, store);
        self.conclude(result);
    }

    /// The shell's frame decoder failed on the peer's bytes.
    pub fn handle_malformed(&mut self, error: super::frame::FrameError) {
        if !self.is_finished() {
            self.fail(SyncError::Frame(error));
        }
    }

    /// Ends the session from this side because its shell could not carry out an effect (a
    /// partition that did not persist, a store that cannot be read): the peer is told `reason`
    /// and `detail`, and the session emits [`Event::Refused`] by [`Side::Local`]. The shell must
    /// then store none of the sync states still queued, since they may claim changes the store
    /// does not hold. A no-op after the end.
    pub fn abort(&mut self, reason: RefuseReason, detail: impl Into<String>) {
        if !self.is_finished() {
            self.refuse(reason, detail.into());
        }
    }

    /// The stream or connection ended. A no-op after the end; otherwise the session fails.
    pub fn handle_closed(&mut self) {
        if !self.is_finished() {
            self.phase = Phase::Closed;
            self.events.push_back(Event::Failed(SyncError::ClosedEarly));
        }
    }

    fn conclude(&mut self, result: Result<(), SyncError>) {
        match result {
            Err(e) => self.fail(e),
            Ok(()) if self.phase == Phase::Syncing => {
                if let Err(e) = self.settle() {
                    self.fail(e);
                }
            }
            Ok(()) => {}
        }
    }

    fn on_hello(&mut self, now: UnixSeconds, hello: Hello) -> Result<(), SyncError> {
        if hello.version != PROTOCOL_VERSION {
            self.refuse(
                RefuseReason::Version,
                format!(
                    "this node speaks sync protocol version {PROTOCOL_VERSION}, the peer {}",
                    hello.version
                ),
            );
            return Ok(());
        }
        check_summaries(&hello.partitions)?;
        if hello
            .refresh_have
            .as_ref()
            .is_some_and(|b| b.len() > MAX_REFRESH_HAVE_BYTES)
        {
            return Err(SyncError::TooMany {
                what: "bytes of refresh_have",
                max: MAX_REFRESH_HAVE_BYTES,
            });
        }
        if usize::from(hello.in_sync.count) > MAX_PARTITIONS_PER_SESSION {
            return Err(SyncError::TooMany {
                what: "partitions in sync",
                max: MAX_PARTITIONS_PER_SESSION,
            });
        }
        self.events.push_back(Event::ClockOffset {
            seconds: offset(hello.now, now),
        });
        self.events.push_back(Event::PeerHello(PeerHello {
            peer: hello.peer.clone(),
            credential: hello.credential,
            now: hello.now,
            refresh_have: hello.refresh_have.clone(),
            push_only: hello.push_only,
        }));
        self.peer = Some(hello.peer.clone());
        self.hello = Some(hello);
        self.phase = Phase::AwaitAdmission;
        Ok(())
    }

    fn on_admit(
        &mut self,
        now: UnixSeconds,
        decision: Decision,
        store: &mut impl PartitionStore,
    ) -> Result<(), SyncError> {
        let (facility, refresh) = match decision {
            Decision::Refuse { reason, detail } => {
                self.refuse(reason, detail);
                return Ok(());
            }
            Decision::Admit { facility, refresh } => (facility, refresh),
        };
        let Some(hello) = self.hello.take() else {
            return Err(SyncError::Unexpected {
                frame: "admission",
                state: "without a hello",
            });
        };
        // A device relays only its own facility, whatever its shell admitted.
        if let Some(own) = self.me.facility().filter(|own| **own != facility) {
            self.refuse(
                RefuseReason::WrongFacility,
                format!("this device holds only facility {own}, not {facility}"),
            );
            return Ok(());
        }
        if let Some(claimed) = hello.peer.facility().filter(|c| **c != facility) {
            self.refuse(
                RefuseReason::WrongFacility,
                format!("peer says it belongs to {claimed} but is admitted for {facility}"),
            );
            return Ok(());
        }
        if let Some(s) = hello.partitions.iter().find(|s| s.id.facility != facility) {
            self.refuse(
                RefuseReason::WrongFacility,
                format!("peer offered {} but is admitted for {facility}", s.id),
            );
            return Ok(());
        }
        let own_horizon = horizon(now);
        self.scope = Some(facility);
        self.window = Window::agreed(hello.now, hello.horizon, now, own_horizon);
        self.push_only = hello.push_only;
        let mine = self.own_summaries(store)?;
        // What the initiator holds, as far as this side can tell: what it listed, and for
        // the partitions its `in_sync` stands for, the heads this side's stored states say
        // both shared. The claim holds only if those states give the same count and digest;
        // otherwise (a state lost or never stored at one end, a store restored from a
        // backup) every partition is listed and exchanged.
        let listed: BTreeMap<PartitionId, HeadsDigest> = hello
            .partitions
            .iter()
            .filter(|s| self.window.contains(s.id.day))
            .map(|s| (s.id.clone(), s.digest))
            .collect();
        let mut quiet: Vec<(PartitionId, Vec<[u8; 32]>)> = Vec::new();
        if hello.in_sync.count > 0
            && let Some(peer) = self.peer.clone()
        {
            for summary in mine.iter().filter(|s| !listed.contains_key(&s.id)) {
                if let Some(shared) = shared_heads(store, &peer, &summary.id)? {
                    quiet.push((summary.id.clone(), shared));
                }
            }
        }
        let delta = usize::from(hello.in_sync.count) == quiet.len()
            && set_digest(quiet.iter().map(|(id, h)| (id, h.as_slice()))) == hello.in_sync.digest;
        let mut theirs = listed.clone();
        if delta {
            theirs.extend(quiet.iter().map(|(id, h)| (id.clone(), heads_digest(h))));
        }
        let lacking = heads_digest(&[]);
        let partitions: Vec<PeerSummary> = if delta && hello.push_only {
            // The initiator sends what it listed and takes nothing: nothing to name.
            Vec::new()
        } else if delta {
            let mut out: Vec<PeerSummary> = mine
                .iter()
                .filter(|m| theirs.get(&m.id) != Some(&m.digest()))
                .map(PartitionSummary::advertised)
                .collect();
            // Listed by the initiator and not held here: say so, or it would read as in sync.
            out.extend(
                listed
                    .keys()
                    .filter(|id| !mine.iter().any(|m| &m.id == *id))
                    .map(|id| PeerSummary {
                        id: id.clone(),
                        digest: lacking,
                        records: 0,
                    }),
            );
            out.sort_by(|a, b| a.id.cmp(&b.id));
            out.truncate(MAX_PARTITIONS_PER_SESSION);
            out
        } else {
            mine.iter().map(PartitionSummary::advertised).collect()
        };
        self.send(Frame::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            peer: self.me.clone(),
            now,
            horizon: own_horizon,
            partitions,
            delta,
            refresh,
        }))?;
        if hello.push_only {
            // Only the initiator starts exchanges; this side answers them.
            self.phase = Phase::Syncing;
            return Ok(());
        }
        self.start_syncing(mine, &theirs, store)
    }

    fn on_welcome(
        &mut self,
        now: UnixSeconds,
        welcome: Welcome,
        store: &mut impl PartitionStore,
    ) -> Result<(), SyncError> {
        if welcome.version != PROTOCOL_VERSION {
            return Err(SyncError::Version {
                theirs: welcome.version,
            });
        }
        check_summaries(&welcome.partitions)?;
        self.events.push_back(Event::ClockOffset {
            seconds: offset(welcome.now, now),
        });
        if let (Some(own), Some(theirs)) = (self.scope.as_ref(), welcome.peer.facility())
            && own != theirs
        {
            let detail = format!("this device holds only facility {own}, the peer {theirs}");
            self.refuse(RefuseReason::WrongFacility, detail);
            return Ok(());
        }
        if let Some(s) = welcome
            .partitions
            .iter()
            .find(|s| !in_scope(self.scope.as_ref(), &s.id))
        {
            let detail = format!("peer offered {} of another facility", s.id);
            self.refuse(RefuseReason::WrongFacility, detail);
            return Ok(());
        }
        let Some(hello) = self.hello.take() else {
            return Err(SyncError::Unexpected {
                frame: "Welcome",
                state: "without a hello sent",
            });
        };
        self.window = Window::agreed(hello.now, hello.horizon, welcome.now, welcome.horizon);
        self.peer = Some(welcome.peer.clone());
        self.events.push_back(Event::Welcomed {
            peer: welcome.peer,
            now: welcome.now,
            refresh: welcome.refresh,
        });
        if self.push_only {
            // Send what the hello listed (changed since the last session), what changed since
            // the hello, and without `delta` everything: the responder's states did not
            // confirm what it holds.
            let mine = self.own_summaries(store)?;
            self.phase = Phase::Syncing;
            for summary in mine {
                let changed = self.listed.contains(&summary.id)
                    || self.advertised.get(&summary.id) != Some(&summary.digest());
                if welcome.delta && !changed {
                    continue;
                }
                self.generate(&summary.id, store)?;
            }
            return Ok(());
        }
        // What the responder holds: what it listed; with `delta`, for what it left out, what
        // the hello advertised; without, nothing.
        let mut theirs: BTreeMap<PartitionId, HeadsDigest> = if welcome.delta {
            std::mem::take(&mut self.advertised)
        } else {
            BTreeMap::new()
        };
        theirs.extend(
            welcome
                .partitions
                .iter()
                .filter(|s| self.window.contains(s.id.day))
                .map(|s| (s.id.clone(), s.digest)),
        );
        // Fresh summaries: records scanned since the hello are worth sending now.
        let mine = self.own_summaries(store)?;
        self.start_syncing(mine, &theirs, store)
    }

    /// This node's partitions that may cross this session.
    fn own_summaries(
        &self,
        store: &impl PartitionStore,
    ) -> Result<Vec<PartitionSummary>, SyncError> {
        let mut mine: Vec<PartitionSummary> = store
            .live_partitions(self.scope.as_ref())?
            .into_iter()
            .filter(|s| in_scope(self.scope.as_ref(), &s.id) && self.window.contains(s.id.day))
            .collect();
        mine.sort_by(|a, b| a.id.cmp(&b.id));
        mine.truncate(MAX_PARTITIONS_PER_SESSION);
        Ok(mine)
    }

    /// Sends a first sync message for every partition of ours whose heads differ from the
    /// peer's (`theirs`: the digest of the peer's heads where known; a partition missing from
    /// it the peer lacks); partitions only the peer holds start when its first message arrives.
    fn start_syncing(
        &mut self,
        mine: Vec<PartitionSummary>,
        theirs: &BTreeMap<PartitionId, HeadsDigest>,
        store: &mut impl PartitionStore,
    ) -> Result<(), SyncError> {
        self.phase = Phase::Syncing;
        let lacking = heads_digest(&[]);
        for summary in mine {
            let their_digest = theirs.get(&summary.id).copied().unwrap_or(lacking);
            let heads = sorted(&summary.heads);
            if heads_digest(&heads) == their_digest {
                if !heads.is_empty() {
                    self.note_settled(&summary.id, &heads, store)?;
                }
                continue;
            }
            self.generate(&summary.id, store)?;
        }
        Ok(())
    }

    /// Both sides hold exactly `heads`: a state with those shared heads lets the next session
    /// start its bloom filter there instead of at an older sync.
    fn note_settled(
        &mut self,
        id: &PartitionId,
        heads: &[[u8; 32]],
        store: &impl PartitionStore,
    ) -> Result<(), SyncError> {
        let Some(peer) = self.peer.as_ref() else {
            return Ok(());
        };
        let mut state = SyncState::new();
        state.shared_heads = heads.iter().map(|h| ChangeHash(*h)).collect();
        let encoded = state.encode();
        if store.sync_state(peer, id)?.as_deref() != Some(encoded.as_slice()) {
            self.settled.push((id.clone(), encoded));
        }
        Ok(())
    }

    fn on_sync(
        &mut self,
        partition: PartitionId,
        message: ReadMessage,
        store: &mut impl PartitionStore,
    ) -> Result<(), SyncError> {
        self.received_syncs = self.received_syncs.saturating_add(1);
        self.stats.syncs_received += 1;
        self.peer_done = None;
        // Authorization before anything touches the store: nothing of a forbidden partition
        // is created, merged or kept.
        if !in_scope(self.scope.as_ref(), &partition) {
            let detail = format!("partition {partition} is not of the admitted facility");
            self.refuse(RefuseReason::WrongFacility, detail);
            return Ok(());
        }
        if let Some(count) = self.skipped.get_mut(&partition) {
            // The peer may have sent more before it read our `Skipped`: counted, not applied.
            *count += 1;
            if *count > MAX_ROUNDS_PER_PARTITION {
                return Err(SyncError::TooManyRounds { partition });
            }
            return Ok(());
        }
        if !self.window.contains(partition.day) {
            let detail = format!(
                "partition {partition} is outside the session's days {} to {}",
                self.window.from, self.window.to
            );
            self.refuse(RefuseReason::OutsideWindow, detail);
            return Ok(());
        }
        if !self.partitions.contains_key(&partition)
            && self.partitions.len() + self.skipped.len() >= MAX_PARTITIONS_PER_SESSION
        {
            return Err(SyncError::TooMany {
                what: "partitions synced",
                max: MAX_PARTITIONS_PER_SESSION,
            });
        }
        // Our own bounded reader and the partition's rules first: automerge inflates and
        // applies whatever it is given (`validate`).
        let checked = match message.checked() {
            Ok(checked) => checked,
            Err(e) if e.is_malformed() => {
                return Err(SyncError::BadSyncMessage {
                    partition,
                    detail: e.to_string(),
                });
            }
            Err(e) => {
                let detail = format!("sync message for {partition} refused: {e}");
                return self.skip(partition, RefuseReason::InvalidChange, detail);
            }
        };
        let held = match store.partition_mut(&partition)? {
            Some(part) => checked.check_against(Some(part.doc())),
            None => checked.check_against(None),
        };
        if let Err(e) = held {
            let detail = format!("sync message for {partition} refused: {e}");
            return self.skip(partition, RefuseReason::InvalidChange, detail);
        }
        // No change may reuse another's operation ids (automerge trusts they are unique), the
        // changes automerge may still hold back from earlier messages included.
        let earlier = self.op_spans.get(&partition).map_or(&[][..], Vec::as_slice);
        let spans = match store.partition_mut(&partition)? {
            Some(part) => checked.check_op_ids(Some(part.doc()), earlier),
            None => checked.check_op_ids(None, earlier),
        };
        let spans = match spans {
            Ok(spans) => spans,
            Err(e) => {
                let detail = format!("sync message for {partition} refused: {e}");
                return self.skip(partition, RefuseReason::InvalidChange, detail);
            }
        };
        let message_len = message.bytes().len();
        let message = Message::decode(message.bytes()).map_err(|e| SyncError::BadSyncMessage {
            partition: partition.clone(),
            detail: e.to_string(),
        })?;
        let preloaded = self.preload(&partition, store)?;

        if store.partition_mut(&partition)?.is_none() {
            match store.create_partition(&partition) {
                Ok(_) => {}
                Err(StoreError::NotAllowed { why, .. }) => {
                    // The scope was checked above, so this is the store's own rule (a day the
                    // hub's retention already destroyed): this partition only.
                    let detail = format!("partition {partition} refused: {why}");
                    return self.skip(partition, RefuseReason::WrongFacility, detail);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some(part) = store.partition_mut(&partition)? else {
            return Err(StoreError::Failed(format!(
                "partition {partition} vanished right after it was created"
            ))
            .into());
        };
        if !self.partitions.contains_key(&partition) {
            // Changes an earlier session left held back (never stored, see
            // `Partition::save`) do not stay in memory from one session to the next.
            part.drop_held_back_changes()
                .map_err(|e| StoreError::Failed(e.to_string()))?;
        }
        let sync = sync_entry(
            &mut self.partitions,
            &mut self.stats,
            &partition,
            preloaded,
            part,
        );
        sync.received += 1;
        if sync.received > MAX_ROUNDS_PER_PARTITION {
            return Err(SyncError::TooManyRounds { partition });
        }
        let heads_before = part.heads();
        let records_before = part.record_count();
        let entries_before = part.doc().length(automerge::ROOT);
        // automerge 0.12 panics on some changes our checks let through (a change numbered 2
        // of an actor it never saw numbered 1 looks the actor up with `unwrap`; its debug
        // build asserts on operation ids a change reuses): such a panic refuses this
        // partition, whose copy in memory is dropped, instead of ending the node.
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            part.doc_mut()
                .receive_sync_message(&mut sync.state, message)
        }));
        let Ok(merged) = applied else {
            self.op_spans.remove(&partition);
            store.discard_partition(&partition, &heads_before)?;
            let detail = format!(
                "sync message for {partition} refused: automerge failed while applying its \
                 changes"
            );
            return self.skip(partition, RefuseReason::InvalidChange, detail);
        };
        // automerge applies a change held back for missing dependencies only now, unchecked
        // against what the partition holds by now: check what was really applied.
        if part.heads() != heads_before
            && let Err(e) = validate::check_applied_message(part.doc(), &heads_before, &checked)
        {
            self.op_spans.remove(&partition);
            store.discard_partition(&partition, &heads_before)?;
            let detail = format!("sync message for {partition} refused after applying it: {e}");
            return self.skip(partition, RefuseReason::InvalidChange, detail);
        }
        if part.holds_back_changes() {
            self.op_spans
                .entry(partition.clone())
                .or_default()
                .extend(spans);
            self.held_back_bytes = self.held_back_bytes.saturating_add(message_len);
            if self.held_back_bytes > MAX_HELD_BACK_BYTES {
                // The copy in memory, with its queue and whatever this message applied, is
                // dropped; nothing of this message is stored.
                self.op_spans.remove(&partition);
                store.discard_partition(&partition, &heads_before)?;
                let detail = format!(
                    "over {MAX_HELD_BACK_BYTES} bytes of changes for {partition} whose \
                     dependencies never arrived"
                );
                return self.skip(partition, RefuseReason::InvalidChange, detail);
            }
        } else {
            self.op_spans.remove(&partition);
        }
        let updated = (part.heads() != heads_before).then(|| {
            let records = part.record_count();
            // The root map holds records and wrapped keys only (`validate`).
            let keys = part.doc().length(automerge::ROOT).saturating_sub(records);
            let keys_before = entries_before.saturating_sub(records_before);
            (
                records.saturating_sub(records_before) as u64,
                keys.saturating_sub(keys_before) as u64,
            )
        });
        if self.push_only && self.role == Role::Initiator && merged.is_ok() {
            // A push-only side never takes the peer's newer heads, so automerge keeps adding
            // the ones it knows to the shared heads, and the list (sent in every `have`) would
            // grow by a hash a session. Once the peer holds all of ours, our heads say it all.
            let ours = part.heads();
            if ours.iter().all(|h| sync.state.shared_heads.contains(h)) {
                sync.state.shared_heads = ours;
            }
        }
        let reply = match merged {
            Ok(()) => next_message(part.doc(), &mut sync.state),
            Err(_) => None,
        };
        // A push-only initiator takes nothing back. Its honest messages carry automerge's
        // read-only flag, which keeps changes out of our replies; a hostile one can leave the
        // flag out (and reset what automerge thinks it sent) to pull the partition after all,
        // a few bytes asking for megabytes. So the responder never sends it changes, whatever
        // its messages say.
        let reply = if self.push_only && self.role == Role::Responder {
            reply.map(|mut m| {
                m.changes = automerge::sync::ChunkList::empty();
                m
            })
        } else {
            reply
        };
        // Reported even when the merge failed part-way: whatever was applied is in memory and
        // must reach the disk too, so memory and disk never disagree.
        if let Some((new_records, new_keys)) = updated {
            self.events.push_back(Event::PartitionUpdated {
                id: partition.clone(),
                new_records,
                new_keys,
            });
        }
        merged.map_err(|e| SyncError::Merge {
            partition: partition.clone(),
            detail: e.to_string(),
        })?;
        if let Some(reply) = reply {
            self.send_sync(partition, reply)?;
        }
        Ok(())
    }

    /// Generates and queues this side's next message for `id`, if automerge has one.
    fn generate(
        &mut self,
        id: &PartitionId,
        store: &mut impl PartitionStore,
    ) -> Result<(), SyncError> {
        let preloaded = self.preload(id, store)?;
        let Some(part) = store.partition_mut(id)? else {
            return Ok(());
        };
        let sync = sync_entry(&mut self.partitions, &mut self.stats, id, preloaded, part);
        if self.push_only && self.role == Role::Initiator {
            sync.state.read_only = true;
            // The peer holds the heads both shared at the end of the last session: the first
            // message can carry the changes since then at once, instead of heads and a bloom
            // filter first and the changes a round trip later. If the peer lost them after
            // all, it asks for what it misses in its answer.
            if sync.state.their_heads.is_none() && !sync.state.shared_heads.is_empty() {
                let shared = sync.state.shared_heads.clone();
                sync.state.their_have = Some(vec![automerge::sync::Have {
                    last_sync: shared.clone(),
                    bloom: automerge::sync::BloomFilter::default(),
                }]);
                sync.state.their_need = Some(Vec::new());
                sync.state.their_heads = Some(shared);
            }
        }
        if let Some(message) = next_message(part.doc(), &mut sync.state) {
            self.send_sync(id.clone(), message)?;
        }
        Ok(())
    }

    /// The persisted sync state for a partition this session has not touched yet.
    /// `None`: the partition already has its in-session state.
    fn preload(
        &self,
        id: &PartitionId,
        store: &impl PartitionStore,
    ) -> Result<Option<Option<Vec<u8>>>, SyncError> {
        if self.partitions.contains_key(id) {
            return Ok(None);
        }
        match self.peer.as_ref() {
            Some(peer) => Ok(Some(store.sync_state(peer, id)?)),
            None => Ok(Some(None)),
        }
    }

    fn on_done(&mut self, received: u32) -> Result<(), SyncError> {
        self.dones_received += 1;
        if received > self.sent_syncs {
            return Err(SyncError::BadDone {
                claimed: received,
                sent: self.sent_syncs,
            });
        }
        // A peer sends Done at most once per change of its (sent, received) counts, plus
        // once at the start: anything beyond is a peer stuck in a loop.
        let allowed = 1 + u64::from(self.sent_syncs) + u64::from(self.received_syncs);
        if self.dones_received > allowed {
            return Err(SyncError::TooManyDones {
                dones: self.dones_received,
                sent: self.sent_syncs,
            });
        }
        self.peer_done = Some(received);
        Ok(())
    }

    /// After each input while syncing: say `Done` if this side has nothing more to send, and
    /// finish once the peer has said `Done` after seeing every message this side sent.
    ///
    /// Sessions react only to frames, so after handling one everything this side can send is
    /// queued. If that includes a `Sync`, the peer owes an answer and `Done` waits for it.
    fn settle(&mut self) -> Result<(), SyncError> {
        if self.step_sent_sync {
            return Ok(());
        }
        let counts = (self.sent_syncs, self.received_syncs);
        if self.done_sent_at != Some(counts) {
            self.send(Frame::Done {
                received: self.received_syncs,
            })?;
            self.done_sent_at = Some(counts);
        }
        if self.peer_done == Some(self.sent_syncs) {
            self.finish();
        }
        Ok(())
    }

    fn finish(&mut self) {
        if let Some(peer) = self.peer.clone() {
            for (id, sync) in &self.partitions {
                // A state that never learned anything shared is not worth a write.
                if sync.loaded.is_none() && sync.state.shared_heads.is_empty() {
                    continue;
                }
                let state = sync.state.encode();
                if sync.loaded.as_deref() != Some(state.as_slice()) {
                    self.events.push_back(Event::SyncStateChanged {
                        peer: peer.clone(),
                        partition: id.clone(),
                        state,
                    });
                }
            }
            for (id, state) in std::mem::take(&mut self.settled) {
                self.events.push_back(Event::SyncStateChanged {
                    peer: peer.clone(),
                    partition: id,
                    state,
                });
            }
        }
        self.phase = Phase::Finished;
        self.events.push_back(Event::Finished(self.stats));
    }

    fn send_sync(&mut self, partition: PartitionId, message: Message) -> Result<(), SyncError> {
        self.send(Frame::Sync {
            partition,
            message: message.encode(),
        })?;
        self.sent_syncs = self.sent_syncs.saturating_add(1);
        self.stats.syncs_sent += 1;
        self.step_sent_sync = true;
        Ok(())
    }

    fn send(&mut self, frame: Frame) -> Result<(), SyncError> {
        let len = frame.wire_len();
        if len - LENGTH_PREFIX_BYTES > MAX_FRAME_BYTES {
            return Err(SyncError::TooLarge {
                what: frame.kind(),
                len: len - LENGTH_PREFIX_BYTES,
            });
        }
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += len as u64;
        self.transmits.push_back(frame);
        Ok(())
    }

    /// This side refuses the peer's changes to `partition` and goes on with the others: a
    /// `Skipped` frame, an event, and no sync state for the partition from this session.
    /// One bad partition (a rogue sibling's change relayed by an honest device, an oversize
    /// change from an old release, a day the hub already destroyed) must not keep every later
    /// day from syncing.
    fn skip(
        &mut self,
        partition: PartitionId,
        reason: RefuseReason,
        detail: String,
    ) -> Result<(), SyncError> {
        let refusal = Refusal::new(reason, &detail);
        self.partitions.remove(&partition);
        self.skipped.insert(partition.clone(), 0);
        self.events.push_back(Event::PartitionRefused {
            by: Side::Local,
            partition: partition.clone(),
            reason,
            detail: refusal.detail.clone(),
        });
        self.send(Frame::Skipped { partition, refusal })
    }

    /// The peer refused our changes to `partition`: stop sending it. A `Skipped` for a
    /// partition this side never synced in this session, or a repeated one, is ignored.
    fn on_skipped(&mut self, partition: PartitionId, refusal: Refusal) -> Result<(), SyncError> {
        if self.partitions.remove(&partition).is_none() {
            // Only a partition this side synced in this session can be refused, once: any
            // other `Skipped` is a peer sending frames for nothing.
            return Err(SyncError::Unexpected {
                frame: "Skipped",
                state: "naming a partition not being synced",
            });
        }
        self.skipped.insert(partition.clone(), 0);
        self.events.push_back(Event::PartitionRefused {
            by: Side::Peer,
            partition,
            reason: refusal.reason,
            detail: refusal.detail.chars().take(MAX_DETAIL_CHARS).collect(),
        });
        Ok(())
    }

    /// The shell refuses the changes the peer sent for `partition` (a quota, a store rule):
    /// the peer is told with a `Skipped` frame, the session goes on with the other partitions,
    /// and no sync state of `partition` is emitted from this session. The shell must not
    /// persist what it was told of the partition in this session (drop its in-memory copy).
    /// A no-op unless syncing.
    pub fn skip_partition(
        &mut self,
        partition: PartitionId,
        reason: RefuseReason,
        detail: impl Into<String>,
    ) {
        if self.phase != Phase::Syncing || self.skipped.contains_key(&partition) {
            return;
        }
        self.step_sent_sync = false;
        let result = self.skip(partition, reason, detail.into());
        self.conclude(result);
    }

    /// This side refuses the peer: a `Refused` frame, an event, the end.
    fn refuse(&mut self, reason: RefuseReason, detail: String) {
        let refusal = Refusal::new(reason, &detail);
        self.events.push_back(Event::Refused {
            by: Side::Local,
            reason,
            detail: refusal.detail.clone(),
        });
        // A refusal is a few hundred bytes at most, far below the frame limit.
        let _ = self.send(Frame::Refused(refusal));
        self.phase = Phase::Closed;
    }

    fn close_refused(&mut self, by: Side, reason: RefuseReason, detail: String) {
        self.events.push_back(Event::Refused { by, reason, detail });
        self.phase = Phase::Closed;
    }

    /// The session ends on an error: tell the peer why, then the shell.
    fn fail(&mut self, error: SyncError) {
        let refusal = Refusal::new(error.reason(), &error.to_string());
        let _ = self.send(Frame::Refused(refusal));
        self.events.push_back(Event::Failed(error));
        self.phase = Phase::Closed;
    }
}

/// The session's sync progress for `id`, created from the preloaded persisted state on first
/// use. A persisted state naming changes the partition does not have (the partition was lost
/// or rolled back since) is dropped for a fresh one: automerge would otherwise believe the
/// peer needs nothing before those changes.
fn sync_entry<'a>(
    partitions: &'a mut BTreeMap<PartitionId, PartitionSync>,
    stats: &mut WireStats,
    id: &PartitionId,
    preloaded: Option<Option<Vec<u8>>>,
    part: &Partition,
) -> &'a mut PartitionSync {
    partitions.entry(id.clone()).or_insert_with(|| {
        stats.partitions_synced += 1;
        let loaded = preloaded.flatten();
        let state = loaded
            .as_deref()
            .and_then(|b| SyncState::decode(b).ok())
            .filter(|s| {
                s.shared_heads
                    .iter()
                    .all(|h| part.doc().get_change_by_hash(h).is_some())
            })
            .unwrap_or_default();
        PartitionSync {
            state,
            loaded,
            received: 0,
        }
    })
}

/// Whether `id` may cross a session limited to `scope`.
fn in_scope(scope: Option<&FacilityId>, id: &PartitionId) -> bool {
    scope.is_none_or(|f| *f == id.facility)
}

fn sorted(heads: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let mut h = heads.to_vec();
    h.sort_unstable();
    h
}

fn offset(peer_now: UnixSeconds, now: UnixSeconds) -> i64 {
    let diff = i128::from(peer_now) - i128::from(now);
    i64::try_from(diff).unwrap_or(if diff < 0 { i64::MIN } else { i64::MAX })
}

fn check_summaries(summaries: &[PeerSummary]) -> Result<(), SyncError> {
    if summaries.len() > MAX_PARTITIONS_PER_SESSION {
        return Err(SyncError::TooMany {
            what: "partitions",
            max: MAX_PARTITIONS_PER_SESSION,
        });
    }
    Ok(())
}

/// The heads (sorted) that the sync state stored for (`peer`, `id`) says both sides shared at
/// the end of their last session; `None` without a usable state.
fn shared_heads(
    store: &impl PartitionStore,
    peer: &Peer,
    id: &PartitionId,
) -> Result<Option<Vec<[u8; 32]>>, SyncError> {
    let Some(bytes) = store.sync_state(peer, id)? else {
        return Ok(None);
    };
    let Ok(state) = SyncState::decode(&bytes) else {
        return Ok(None);
    };
    if state.shared_heads.is_empty() {
        return Ok(None);
    }
    let heads: Vec<[u8; 32]> = state.shared_heads.iter().map(|h| h.0).collect();
    Ok(Some(sorted(&heads)))
}

/// automerge's next sync message for a peer, always a v1 message: the changes the peer lacks,
/// each as the uncompressed change chunk automerge committed.
///
/// automerge would otherwise send a v2 message holding the whole document, saved with DEFLATE
/// columns, to a peer that holds nothing of the partition or lacks more than a third of its
/// changes. A receiver refuses both the document chunk and the DEFLATE columns (`validate`:
/// inflating them is unbounded), and the third-of-the-changes rule would resend the whole day
/// for every increment, since devices fold each sync round's check-ins into one change. A
/// large v1 message is compressed by the frame layer instead (`SyncDeflated`), whose
/// inflation is bounded.
///
/// The message is then cut to [`MAX_SYNC_MESSAGE_BYTES`] ([`bound_message`]).
pub(crate) fn next_message(doc: &automerge::Automerge, state: &mut SyncState) -> Option<Message> {
    use automerge::sync::Capability;
    let capabilities = state.their_capabilities.clone();
    if let Some(c) = state.their_capabilities.as_mut() {
        c.retain(|c| *c != Capability::MessageV2);
    }
    let sent_before = state.sent_hashes.clone();
    let message = doc.generate_sync_message(state);
    state.their_capabilities = capabilities;
    message.map(|m| bound_message(m, state, sent_before))
}

/// Cuts a v1 message whose changes would make it larger than [`MAX_SYNC_MESSAGE_BYTES`] to
/// the changes that fit, in automerge's order (at least one, so that an oversized change still
/// travels alone and the peer's validator names it).
///
/// The cut message is an ordinary sync message: its heads are all of ours, so the receiver
/// applies what it got (queueing any change whose dependencies are still missing), finds our
/// heads unknown, and answers with those heads in its `need` and a bloom filter of what it
/// holds; from that answer automerge computes the rest, minus what it already sent. For that,
/// `sent_hashes` (which automerge filled with every change it generated) must list only the
/// changes that actually left: the ones cut are taken back out, or automerge would believe the
/// peer has them and never send them. And the receiver cannot mistake the cut for the end:
/// its heads still differ from ours, so automerge always answers (its `in_flight` clears on
/// every received message), and a session says `Done` only after a step that sent no `Sync`.
fn bound_message(
    mut message: Message,
    state: &mut SyncState,
    sent_before: std::collections::BTreeSet<ChangeHash>,
) -> Message {
    let total: usize = message.changes.iter().map(<[u8]>::len).sum();
    // Heads, need, have and flags: hashes and a bloom filter, small next to the bound.
    let overhead = Message {
        heads: message.heads.clone(),
        need: message.need.clone(),
        have: message.have.clone(),
        changes: automerge::sync::ChunkList::empty(),
        flags: message.flags,
        version: message.version.clone(),
    }
    .encode()
    .len();
    if message.changes.len() <= 1 || overhead + total <= MAX_SYNC_MESSAGE_BYTES {
        return message;
    }
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut size = overhead;
    for chunk in message.changes.iter() {
        // Each change costs its bytes and a LEB128 length of at most five bytes.
        let cost = chunk.len() + 5;
        if !kept.is_empty() && size + cost > MAX_SYNC_MESSAGE_BYTES {
            break;
        }
        size += cost;
        kept.push(chunk.to_vec());
    }
    // Hashes of the kept changes: the sender committed or validated each one, so they parse;
    // one that would not is simply not recorded as sent, and automerge sends it again later.
    let mut sent = sent_before;
    sent.extend(
        kept.iter()
            .filter_map(|c| automerge::Change::try_from(c.as_slice()).ok())
            .map(|c| c.hash()),
    );
    state.sent_hashes = sent;
    message.changes = kept.into();
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::harness::MemoryStore;

    fn fac(s: &str) -> FacilityId {
        FacilityId::parse(s).unwrap()
    }

    #[test]
    fn both_sides_agree_on_the_window() {
        let a_now = Day(20_000).start() + 100;
        let b_now = Day(20_001).start() + 5; // a day ahead
        let w1 = Window::agreed(a_now, horizon(a_now), b_now, horizon(b_now));
        let w2 = Window::agreed(b_now, horizon(b_now), a_now, horizon(a_now));
        assert_eq!(w1, w2);
        // The later horizon and one day past the earlier today.
        assert_eq!(w1.from, horizon(b_now));
        assert_eq!(w1.to, Day(20_001));
        assert!(!w1.contains(horizon(a_now)));
        assert!(w1.contains(Day(20_001)));
        assert!(!w1.contains(Day(20_002)));
    }

    #[test]
    fn clock_offsets_saturate() {
        assert_eq!(offset(10, 4), 6);
        assert_eq!(offset(4, 10), -6);
        assert_eq!(offset(u64::MAX, 0), i64::MAX);
        assert_eq!(offset(0, u64::MAX), i64::MIN);
    }

    #[test]
    fn empty_sessions_finish_with_one_done_each() {
        let now = Day(20_000).start();
        let mut dev = MemoryStore::new(b"d", Some(fac("fac_a")));
        let mut hub = MemoryStore::new(b"h", None);
        let me = Peer::Device {
            device: crate::ids::DeviceId::parse("dev_a").unwrap(),
            facility: fac("fac_a"),
        };
        let mut i = Session::initiator(now, me, None, &dev).unwrap();
        let mut r = Session::responder(Peer::Hub { region: "r".into() });
        let hello = i.poll_transmit().unwrap();
        assert!(!r.is_syncing() && !i.is_syncing());
        r.handle_frame(now, hello, &mut hub);
        assert!(r.awaits_admission() && !r.is_syncing());
        r.admit(
            now,
            Decision::Admit {
                facility: fac("fac_a"),
                refresh: None,
            },
            &mut hub,
        );
        let from_r: Vec<Frame> = std::iter::from_fn(|| r.poll_transmit()).collect();
        assert!(matches!(
            from_r.as_slice(),
            [Frame::Welcome(_), Frame::Done { received: 0 }]
        ));
        assert!(
            r.is_syncing(),
            "admitted: the shell reads Sync frames ahead"
        );
        for f in from_r {
            i.handle_frame(now, f, &mut dev);
        }
        assert!(i.is_completed() && !i.is_syncing());
        let from_i: Vec<Frame> = std::iter::from_fn(|| i.poll_transmit()).collect();
        assert_eq!(from_i, vec![Frame::Done { received: 0 }]);
        r.handle_frame(now, from_i[0].clone(), &mut hub);
        assert!(r.is_completed() && !r.is_syncing());
        assert_eq!(r.poll_transmit(), None);
    }

    #[test]
    fn a_done_claiming_unsent_messages_is_an_error() {
        let now = Day(20_000).start();
        let mut hub = MemoryStore::new(b"h", None);
        let mut r = Session::responder(Peer::Hub { region: "r".into() });
        r.handle_frame(
            now,
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                peer: Peer::Hub { region: "x".into() },
                now,
                horizon: horizon(now),
                partitions: vec![],
                in_sync: Default::default(),
                push_only: false,
                credential: None,
                refresh_have: None,
            }),
            &mut hub,
        );
        r.admit(
            now,
            Decision::Admit {
                facility: fac("fac_a"),
                refresh: None,
            },
            &mut hub,
        );
        r.handle_frame(now, Frame::Done { received: 5 }, &mut hub);
        let events: Vec<Event> = std::iter::from_fn(|| r.poll_event()).collect();
        assert!(matches!(
            events.last(),
            Some(Event::Failed(SyncError::BadDone {
                claimed: 5,
                sent: 0
            }))
        ));
    }
}
