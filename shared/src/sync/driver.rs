//! The one event loop every shell runs a [`Session`] with: the edge (`edge-node`'s `net`), the
//! hub (`sync-hub`'s `daemon`) and the in-memory pairs of tests and the simulation
//! ([`super::harness::run_pair`]). Pure like the session: the effects that differ between
//! shells (admission, persisting a merged partition, storing a sync state, acting on the
//! hub's welcome, recording a completed session, sending bytes) go through a [`Shell`]; the
//! order they happen in and what a failure means live here, once.
//!
//! Each input ([`handle_frame`], [`handle_malformed`], [`handle_closed`], [`abort`]) is handed
//! to the session and followed by [`pump`], which drains the session until it is quiet:
//! first its events, in order, carried out through the shell; then its frames, handed to
//! [`Shell::send`]. Events go first so that a frame that acknowledges merged changes (a
//! `Sync` reply, a `Done`) never leaves before those changes are stored.
//!
//! The failure rules: the first effect the shell cannot carry out (an [`Abort`]: a store
//! error is [`RefuseReason::Internal`], a quota its own reason) ends the session with that
//! reason ([`Session::abort`]), and from then on nothing more of the session is stored: no
//! sync state (it could claim changes the store does not hold, and the peer would never send
//! them again), no partition (each later `PartitionUpdated`, like the one that failed, is
//! discarded through [`PartitionStore::discard_partition`], so memory returns to what is
//! stored), no welcome, no completion. Frames the session queued before the failure are not
//! sent, only its refusal: the peer is told the reason instead of taking a `Done` that claims
//! a clean end. A failure after the session had already finished (a sync state written
//! after both sides said done) still sends the peer a `Refused` frame, which it reads if it is
//! still waiting for this side's `Done`. The [`End`] then says [`End::Aborted`], whatever the
//! session's own end event was.

use super::frame::{Frame, Inbound, Peer, Refusal, RefuseReason};
use super::session::{
    Decision, Event, PartitionStore, PeerHello, Session, Side, SyncError, WireStats,
};
use crate::ids::PartitionId;
use crate::time::UnixSeconds;
use automerge::ChangeHash;

/// An effect the shell could not carry out: the session is aborted with `reason`, and the
/// peer is told `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// What the peer is told (`Internal` for a store error, `QuotaExceeded` for a quota, ...).
    pub reason: RefuseReason,
    /// The explanation for the peer's logs and this node's outcome.
    pub detail: String,
    /// From [`Shell::persist`]: refuse only the partition being persisted (it is discarded,
    /// the peer gets a `Skipped` frame) and go on with the others, instead of ending the
    /// session. For a rule about that partition (a quota per device and day); a store error
    /// is never partition-only.
    pub partition_only: bool,
}

impl Abort {
    /// A store or other local failure: [`RefuseReason::Internal`].
    pub fn internal(detail: impl Into<String>) -> Abort {
        Abort {
            reason: RefuseReason::Internal,
            detail: detail.into(),
            partition_only: false,
        }
    }

    /// The session is aborted with `reason`.
    pub fn new(reason: RefuseReason, detail: impl Into<String>) -> Abort {
        Abort {
            reason,
            detail: detail.into(),
            partition_only: false,
        }
    }

    /// The partition being persisted is refused with `reason`; the session goes on.
    pub fn partition(reason: RefuseReason, detail: impl Into<String>) -> Abort {
        Abort {
            reason,
            detail: detail.into(),
            partition_only: true,
        }
    }
}

/// A partition refused during a session, by either side, while the session went on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPartition {
    /// Who refused.
    pub by: Side,
    /// The partition.
    pub partition: PartitionId,
    /// Why.
    pub reason: RefuseReason,
    /// The explanation.
    pub detail: String,
}

/// How a session ended, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both sides were done and every effect of this side was carried out.
    Completed,
    /// This side aborted the session: an effect failed (a store error, a quota) or the shell
    /// aborted it ([`abort`]). Nothing of the session was stored from then on.
    Aborted {
        /// What the peer was told.
        reason: RefuseReason,
        /// Why.
        detail: String,
    },
    /// A side refused (this side's session itself, e.g. an invalid change, or the peer).
    Refused {
        /// Who refused.
        by: Side,
        /// Why.
        reason: RefuseReason,
        /// The explanation.
        detail: String,
    },
    /// The session failed (a protocol error, the stream ended early).
    Failed(SyncError),
}

impl End {
    /// Whether the session completed cleanly.
    pub fn is_completed(&self) -> bool {
        matches!(self, End::Completed)
    }

    /// (who refused, the reason) when a side refused or this side aborted.
    pub fn refusal(&self) -> Option<(Side, RefuseReason)> {
        match self {
            End::Aborted { reason, .. } => Some((Side::Local, *reason)),
            End::Refused { by, reason, .. } => Some((*by, *reason)),
            End::Completed | End::Failed(_) => None,
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Completed => write!(f, "completed"),
            End::Aborted { detail, .. } => write!(f, "{detail}"),
            End::Refused { by, reason, detail } => {
                write!(f, "{by:?} refused ({reason:?}): {detail}")
            }
            End::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// A session and what the driver has learned of it: the first failure, the end, what was
/// stored. A shell keeps one per connection and lends it to the driver through [`Shell`].
#[derive(Debug)]
pub struct Link {
    session: Session,
    failure: Option<Abort>,
    /// A refusal to send although the session had finished (see the module docs).
    late_refusal: Option<Refusal>,
    end: Option<End>,
    /// The heads of the partition a `Sync` frame names, read before the session merged it:
    /// what [`PartitionStore::discard_partition`] reverts to when the merge is not stored.
    heads_before: Option<(PartitionId, Vec<ChangeHash>)>,
    new_records: u64,
    new_keys: u64,
    refused: Vec<RefusedPartition>,
}

impl Link {
    /// A link around a fresh session.
    pub fn new(session: Session) -> Link {
        Link {
            session,
            failure: None,
            late_refusal: None,
            end: None,
            heads_before: None,
            new_records: 0,
            new_keys: 0,
            refused: Vec::new(),
        }
    }

    /// The partitions refused so far while the session went on: not delivered.
    pub fn refused_partitions(&self) -> &[RefusedPartition] {
        &self.refused
    }

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The first effect that failed, if one did: nothing of the session was stored since.
    pub fn failure(&self) -> Option<&Abort> {
        self.failure.as_ref()
    }

    /// How the session ended, once it has.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Whether the session is over and its end known: flush what the shell was sent, then
    /// close the stream.
    pub fn is_finished(&self) -> bool {
        self.session.is_finished() && self.late_refusal.is_none()
    }

    /// Records stored (persisted `PartitionUpdated`s), summed.
    pub fn new_records(&self) -> u64 {
        self.new_records
    }

    /// Wrapped keys stored, summed.
    pub fn new_keys(&self) -> u64 {
        self.new_keys
    }

    /// The session's frame and byte counts.
    pub fn stats(&self) -> WireStats {
        self.session.stats()
    }
}

/// What differs between the shells that run sessions. Every method but
/// [`Shell::link_and_store`], [`Shell::admit`], [`Shell::persist`] and [`Shell::send`] has a
/// default that does nothing (or, for sync states, writes through the partition store).
pub trait Shell {
    /// The partitions the session works on.
    type Store: PartitionStore;

    /// The link and the store, borrowed together (the session needs both at once).
    fn link_and_store(&mut self) -> (&mut Link, &mut Self::Store);

    /// The link alone.
    fn link(&mut self) -> &mut Link {
        self.link_and_store().0
    }

    /// Responder: decides on the initiator's hello. On `Decision::Admit` the shell may switch
    /// [`Shell::link_and_store`] to the admitted facility's partitions; the session is then
    /// admitted against that store.
    fn admit(&mut self, now: UnixSeconds, hello: &PeerHello) -> Decision;

    /// Makes the merged partition `id` durable (`new_records` and `new_keys` arrived). An
    /// error aborts the session and the partition is discarded.
    fn persist(
        &mut self,
        now: UnixSeconds,
        id: &PartitionId,
        new_records: u64,
        new_keys: u64,
    ) -> Result<(), Abort>;

    /// Stores a sync state (after the partitions it depends on were persisted).
    fn store_sync_state(
        &mut self,
        peer: &Peer,
        partition: &PartitionId,
        state: &[u8],
    ) -> Result<(), Abort> {
        self.link_and_store()
            .1
            .put_sync_state(peer, partition, state)
            .map_err(|e| {
                Abort::internal(format!("cannot store the sync state of {partition}: {e}"))
            })
    }

    /// Initiator: the responder admitted this node (`Event::Welcomed`); apply its refresh.
    fn welcomed(
        &mut self,
        _peer: &Peer,
        _peer_now: UnixSeconds,
        _refresh: Option<Vec<u8>>,
    ) -> Result<(), Abort> {
        Ok(())
    }

    /// The peer's clock minus this node's (`Event::ClockOffset`).
    fn clock_offset(&mut self, _seconds: i64) {}

    /// Both sides are done and nothing failed: record the completed session.
    fn completed(&mut self, _now: UnixSeconds, _stats: &WireStats) -> Result<(), Abort> {
        Ok(())
    }

    /// A partition was refused (by either side) and the session goes on: logs, stats.
    fn partition_refused(&mut self, _now: UnixSeconds, _refused: &RefusedPartition) {}

    /// The session ended (once per session): logs, metrics.
    fn ended(&mut self, _now: UnixSeconds, _end: &End) {}

    /// Every event, before it is acted on (a harness records them).
    fn observe(&mut self, _event: &Event) {}

    /// Sends a frame to the peer. An error aborts the session (unless it is over).
    fn send(&mut self, frame: Frame) -> Result<(), Abort>;
}

/// Hands the session a frame from the peer, then [`pump`]s.
pub fn handle_frame<S: Shell>(shell: &mut S, now: UnixSeconds, frame: impl Into<Inbound>) {
    let frame = frame.into();
    {
        let (link, store) = shell.link_and_store();
        link.heads_before = None;
        if let Some(partition) = frame.sync_partition()
            && !link.session.is_finished()
        {
            let heads = match store.partition_mut(partition) {
                Ok(Some(p)) => p.heads(),
                _ => Vec::new(),
            };
            link.heads_before = Some((partition.clone(), heads));
        }
        link.session.handle_frame(now, frame, store);
    }
    pump(shell, now);
}

/// The shell's frame decoder failed on the peer's bytes.
pub fn handle_malformed<S: Shell>(
    shell: &mut S,
    now: UnixSeconds,
    error: super::frame::FrameError,
) {
    shell.link().session.handle_malformed(error);
    pump(shell, now);
}

/// The stream or connection ended.
pub fn handle_closed<S: Shell>(shell: &mut S, now: UnixSeconds) {
    shell.link().session.handle_closed();
    pump(shell, now);
}

/// The shell ends the session from outside an effect (a quota on bytes, a time limit, a newer
/// session of the same peer): the same rules as a failed effect.
pub fn abort<S: Shell>(shell: &mut S, now: UnixSeconds, why: Abort) {
    fail(shell, why);
    pump(shell, now);
}

/// Drains the session until it is quiet: events first, carried out through the shell, then
/// frames to send. Call after anything the session was handed outside this module (a fresh
/// initiator's `Hello` is queued at creation).
pub fn pump<S: Shell>(shell: &mut S, now: UnixSeconds) {
    loop {
        let mut progressed = false;
        while let Some(event) = shell.link().session.poll_event() {
            progressed = true;
            shell.observe(&event);
            apply(shell, now, event);
        }
        while let Some(frame) = next_transmit(shell.link()) {
            progressed = true;
            if let Err(why) = shell.send(frame)
                && !shell.link().session.is_finished()
            {
                fail(shell, why);
            }
        }
        if !progressed {
            break;
        }
    }
}

/// The next frame to send: after a failure only the refusal goes out.
fn next_transmit(link: &mut Link) -> Option<Frame> {
    while let Some(frame) = link.session.poll_transmit() {
        if link.failure.is_none() || matches!(frame, Frame::Refused(_)) {
            return Some(frame);
        }
    }
    link.late_refusal.take().map(Frame::Refused)
}

/// Carries out one event.
fn apply<S: Shell>(shell: &mut S, now: UnixSeconds, event: Event) {
    let failed = shell.link().failure.is_some();
    match event {
        Event::PeerHello(hello) => {
            if failed {
                return;
            }
            let decision = shell.admit(now, &hello);
            let (link, store) = shell.link_and_store();
            link.session.admit(now, decision, store);
        }
        Event::Welcomed {
            peer,
            now: peer_now,
            refresh,
        } => {
            if failed {
                return;
            }
            if let Err(why) = shell.welcomed(&peer, peer_now, refresh) {
                fail(shell, why);
            }
        }
        Event::ClockOffset { seconds } => shell.clock_offset(seconds),
        Event::PartitionUpdated {
            id,
            new_records,
            new_keys,
        } => {
            if failed {
                // Merged in memory, never to be stored: the peer still has it.
                discard(shell, &id);
                return;
            }
            match shell.persist(now, &id, new_records, new_keys) {
                Ok(()) => {
                    let link = shell.link();
                    link.new_records = link.new_records.saturating_add(new_records);
                    link.new_keys = link.new_keys.saturating_add(new_keys);
                }
                Err(why) if why.partition_only && !shell.link().session.is_finished() => {
                    discard(shell, &id);
                    shell
                        .link()
                        .session
                        .skip_partition(id, why.reason, why.detail);
                }
                Err(why) => {
                    discard(shell, &id);
                    fail(shell, why);
                }
            }
        }
        Event::SyncStateChanged {
            peer,
            partition,
            state,
        } => {
            if failed {
                return;
            }
            if let Err(why) = shell.store_sync_state(&peer, &partition, &state) {
                fail(shell, why);
            }
        }
        Event::PartitionRefused {
            by,
            partition,
            reason,
            detail,
        } => {
            let refused = RefusedPartition {
                by,
                partition,
                reason,
                detail,
            };
            shell.partition_refused(now, &refused);
            shell.link().refused.push(refused);
        }
        Event::Refused { by, reason, detail } => {
            conclude(shell, now, End::Refused { by, reason, detail });
        }
        Event::Failed(e) => conclude(shell, now, End::Failed(e)),
        Event::Finished(stats) => {
            if !failed && let Err(why) = shell.completed(now, &stats) {
                fail(shell, why);
            }
            conclude(shell, now, End::Completed);
        }
    }
}

/// Drops the in-memory copy of partition `id`, reverting it to its heads before the frame
/// that merged it.
fn discard<S: Shell>(shell: &mut S, id: &PartitionId) {
    let (link, store) = shell.link_and_store();
    let heads = match &link.heads_before {
        Some((p, heads)) if p == id => heads.clone(),
        _ => Vec::new(),
    };
    if let Err(e) = store.discard_partition(id, &heads)
        && link.failure.is_none()
    {
        link.failure = Some(Abort::internal(format!(
            "cannot drop the unsaved copy of partition {id}: {e}"
        )));
    }
}

/// The first failure of the session: abort it with the failure's reason.
fn fail<S: Shell>(shell: &mut S, why: Abort) {
    let link = shell.link();
    if link.failure.is_some() || link.end.is_some() {
        return;
    }
    if link.session.is_completed() {
        // Both sides said done before this side's last write failed: tell the peer all the
        // same, in case it still waits for this side's `Done` (which is not sent).
        link.late_refusal = Some(Refusal::new(why.reason, &why.detail));
    } else {
        link.session.abort(why.reason, why.detail.clone());
    }
    link.failure = Some(why);
}

/// Records the end (once), an abort overriding the session's own end event.
fn conclude<S: Shell>(shell: &mut S, now: UnixSeconds, end: End) {
    if shell.link().end.is_some() {
        return;
    }
    // Nothing a peer left held back outlives its session. Dropping it changes no heads and
    // nothing stored.
    let released = {
        let (link, store) = shell.link_and_store();
        link.session.release_held_back(store)
    };
    let link = shell.link();
    let end = match &link.failure {
        Some(why) => End::Aborted {
            reason: why.reason,
            detail: why.detail.clone(),
        },
        None => end,
    };
    link.end = Some(end.clone());
    shell.ended(now, &end);
    // Should the store fail here, the next session that touches the partition drops them
    // before its first message (as before this rule): nothing is lost either way.
    drop(released);
}
