//! A pair of sync sessions run with faults injected at every effect: the simulation's own
//! in-memory shell of `shared::sync::driver` (the loop the binaries run), where
//! `shared::sync::harness::run_pair_with` only makes chosen writes fail.
//!
//! Its stores are the nodes' disks, and it knows what each side has committed: the heads
//! of every partition when the session began, then of every partition a persist made
//! durable, and the sync states written. A fault can
//! - kill a side's process just before or just after its n-th commit (a persist or a
//!   sync-state write), as `kill -9` between two effects: the dead side sends and hears
//!   nothing more, and its store is put back to what it had committed (merged changes not
//!   persisted are gone); its peer sees the connection close;
//! - tear the link after the n-th frame: both sides see the connection close, in either
//!   order;
//! - fill a side's disk: every persist and sync-state write fails as "no space left";
//! - fail one write as `run_pair_with` does (a persist, a sync-state write, a quota).

use automerge::ChangeHash;
use shared::PartitionId;
use shared::sync::driver::{self, Abort, End, Link, Shell};
use shared::sync::harness::{
    Faults, HarnessError, MAX_FLIGHTS, MemoryStore, PairOutcome, PairSetup,
};
use shared::sync::{
    Decision, Event, Frame, FrameDecoder, PartitionStore, Peer, PeerHello, RefuseReason, Role,
    Session,
};
use shared::time::UnixSeconds;
use std::collections::BTreeMap;

/// When one side's process dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crash {
    /// At its n-th commit (persists and sync-state writes together, 0: the first).
    pub at_commit: u32,
    /// After the commit is durable (else just before it).
    pub after: bool,
}

/// The faults of one side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SideFaults {
    /// Single failing writes, as `run_pair_with`'s.
    pub writes: Faults,
    /// A process kill at a commit.
    pub crash: Option<Crash>,
    /// The disk is full: every write fails.
    pub disk_full: bool,
}

/// The faults of one pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// The initiator's.
    pub initiator: SideFaults,
    /// The responder's.
    pub responder: SideFaults,
    /// The link drops after this many frames were delivered; the side named sees it first.
    pub tear: Option<(u32, Role)>,
}

/// What a faulty pair did, beyond the harness's outcome.
#[derive(Debug, Default)]
pub struct Run {
    /// The outcome (a dead side has no end and did not complete).
    pub outcome: PairOutcome,
    /// The initiator's process was killed.
    pub initiator_died: bool,
    /// The responder's process was killed.
    pub responder_died: bool,
    /// The link was torn before the session ended.
    pub torn: bool,
    /// Writes refused by a full disk.
    pub disk_full_refusals: u64,
    /// A dead side's store could not be put back to what it had committed.
    pub revert_error: Option<String>,
}

struct Side<'a> {
    role: Role,
    link: Link,
    store: &'a mut MemoryStore,
    admit: &'a dyn Fn(&PeerHello) -> Decision,
    faults: SideFaults,
    persists: u32,
    sync_states: u32,
    commits: u32,
    dead: bool,
    /// Heads of every partition as far as they are durable (only kept for a side that may
    /// die).
    committed: BTreeMap<PartitionId, Vec<ChangeHash>>,
    disk_full_refusals: u64,
    outbox: Vec<Frame>,
    events: Vec<Event>,
}

impl<'a> Side<'a> {
    fn new(
        role: Role,
        session: Session,
        store: &'a mut MemoryStore,
        admit: &'a dyn Fn(&PeerHello) -> Decision,
        faults: SideFaults,
    ) -> Self {
        let committed = if faults.crash.is_some() {
            store
                .partitions()
                .map(|p| (p.id().clone(), p.heads()))
                .collect()
        } else {
            BTreeMap::new()
        };
        Side {
            role,
            link: Link::new(session),
            store,
            admit,
            faults,
            persists: 0,
            sync_states: 0,
            commits: 0,
            dead: false,
            committed,
            disk_full_refusals: 0,
            outbox: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Whether the next commit kills the process, and when: `Some(after)`.
    fn crash_now(&mut self) -> Option<bool> {
        let n = self.commits;
        self.commits = n.saturating_add(1);
        self.faults
            .crash
            .filter(|c| c.at_commit == n)
            .map(|c| c.after)
    }

    /// The dead process's disk: every partition back to its committed heads, partitions
    /// never committed gone.
    fn revert_to_committed(&mut self) -> Result<(), String> {
        let held: Vec<(PartitionId, Vec<ChangeHash>)> = self
            .store
            .partitions()
            .map(|p| (p.id().clone(), p.heads()))
            .collect();
        for (id, heads) in held {
            match self.committed.get(&id) {
                None => {
                    self.store.remove(&id);
                }
                Some(good) if *good != heads => {
                    self.store
                        .discard_partition(&id, good)
                        .map_err(|e| format!("reverting {id} after a crash failed: {e}"))?;
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

impl Shell for Side<'_> {
    type Store = MemoryStore;

    fn link_and_store(&mut self) -> (&mut Link, &mut MemoryStore) {
        (&mut self.link, &mut *self.store)
    }

    fn admit(&mut self, _now: UnixSeconds, hello: &PeerHello) -> Decision {
        (self.admit)(hello)
    }

    fn persist(
        &mut self,
        _now: UnixSeconds,
        id: &PartitionId,
        _new_records: u64,
        _new_keys: u64,
    ) -> Result<(), Abort> {
        if self.dead {
            return Err(Abort::internal("the process is dead"));
        }
        let n = self.persists;
        self.persists = n.saturating_add(1);
        if self.faults.writes.quota_persist == Some(n) {
            return Err(Abort::partition(
                RefuseReason::QuotaExceeded,
                format!("partition {id} is over the injected quota"),
            ));
        }
        if self.faults.writes.fail_persist == Some(n) {
            return Err(Abort::internal(format!(
                "cannot store partition {id}: injected write failure"
            )));
        }
        if self.faults.disk_full {
            self.disk_full_refusals += 1;
            return Err(Abort::internal(format!(
                "cannot store partition {id}: no space left on device"
            )));
        }
        match self.crash_now() {
            Some(false) => {
                self.dead = true;
                Err(Abort::internal("killed before the persist"))
            }
            crash => {
                if self.faults.crash.is_some() {
                    let heads = self.store.get(id).map(|p| p.heads()).unwrap_or_default();
                    self.committed.insert(id.clone(), heads);
                }
                self.dead = crash == Some(true);
                Ok(())
            }
        }
    }

    fn store_sync_state(
        &mut self,
        peer: &Peer,
        partition: &PartitionId,
        state: &[u8],
    ) -> Result<(), Abort> {
        if self.dead {
            return Err(Abort::internal("the process is dead"));
        }
        let n = self.sync_states;
        self.sync_states = n.saturating_add(1);
        if self.faults.writes.fail_sync_state == Some(n) {
            return Err(Abort::internal(format!(
                "cannot store the sync state of {partition}: injected write failure"
            )));
        }
        if self.faults.disk_full {
            self.disk_full_refusals += 1;
            return Err(Abort::internal(format!(
                "cannot store the sync state of {partition}: no space left on device"
            )));
        }
        let crash = self.crash_now();
        if crash == Some(false) {
            self.dead = true;
            return Err(Abort::internal("killed before the sync-state write"));
        }
        self.store
            .put_sync_state(peer, partition, state)
            .map_err(|e| {
                Abort::internal(format!("cannot store the sync state of {partition}: {e}"))
            })?;
        self.dead = crash == Some(true);
        Ok(())
    }

    fn observe(&mut self, event: &Event) {
        self.events.push(event.clone());
    }

    fn send(&mut self, frame: Frame) -> Result<(), Abort> {
        // A dead process sends nothing.
        if !self.dead {
            self.outbox.push(frame);
        }
        Ok(())
    }
}

/// Runs a fresh initiator against a fresh responder with `plan`'s faults until both are
/// finished, dead or cut off. A dead side's store is left as it had committed.
pub fn run(
    now: UnixSeconds,
    setup: &PairSetup,
    initiator_store: &mut MemoryStore,
    responder_store: &mut MemoryStore,
    admit: impl Fn(&PeerHello) -> Decision,
    plan: Plan,
) -> Result<Run, HarnessError> {
    let session = Session::initiator_to(
        now,
        setup.initiator.clone(),
        Some(&setup.responder),
        setup.credential,
        None,
        setup.push_only,
        initiator_store,
    )
    .map_err(HarnessError::Start)?;
    let mut i = Side::new(
        Role::Initiator,
        session,
        initiator_store,
        &admit,
        plan.initiator,
    );
    let mut r = Side::new(
        Role::Responder,
        Session::responder(setup.responder.clone()),
        responder_store,
        &admit,
        plan.responder,
    );
    let mut run = Run::default();
    let mut to_r = FrameDecoder::new();
    let mut to_i = FrameDecoder::new();
    let mut frames = 0u32;
    driver::pump(&mut i, now);
    collect(&mut i, &mut run.outcome);
    loop {
        if run.outcome.rounds >= MAX_FLIGHTS {
            return Err(HarnessError::TooManyFlights);
        }
        let a = deliver(now, &mut i, &mut r, &mut to_r, &mut run, &mut frames, plan);
        let b = if run.torn {
            0
        } else {
            deliver(now, &mut r, &mut i, &mut to_i, &mut run, &mut frames, plan)
        };
        if run.torn || (a == 0 && b == 0) {
            break;
        }
        run.outcome.rounds += 1;
    }
    // Whoever is alive and not finished sees the connection close: at the tear, in the
    // order the plan names, or because the peer died.
    let first_r = plan.tear.is_some_and(|(_, side)| side == Role::Responder);
    for role in if first_r {
        [Role::Responder, Role::Initiator]
    } else {
        [Role::Initiator, Role::Responder]
    } {
        let side = if role == Role::Initiator {
            &mut i
        } else {
            &mut r
        };
        if !side.dead && !side.link.is_finished() {
            driver::handle_closed(side, now);
            collect(side, &mut run.outcome);
        }
    }
    if !(i.dead || i.link.is_finished()) || !(r.dead || r.link.is_finished()) {
        return Err(HarnessError::Stalled {
            rounds: run.outcome.rounds,
        });
    }
    for side in [&mut i, &mut r] {
        run.disk_full_refusals += side.disk_full_refusals;
        if side.dead {
            // A crash is no harness error: the store is what a restart finds.
            if let Err(e) = side.revert_to_committed() {
                run.revert_error = Some(e);
            }
        }
    }
    let o = &mut run.outcome;
    o.initiator_end = (!i.dead).then(|| i.link.end().cloned()).flatten();
    o.responder_end = (!r.dead).then(|| r.link.end().cloned()).flatten();
    o.initiator_completed = o.initiator_end.as_ref().is_some_and(End::is_completed);
    o.responder_completed = o.responder_end.as_ref().is_some_and(End::is_completed);
    o.initiator_stored = i.link.new_records();
    o.responder_stored = r.link.new_records();
    run.initiator_died = i.dead;
    run.responder_died = r.dead;
    Ok(run)
}

fn collect(side: &mut Side<'_>, outcome: &mut PairOutcome) {
    let role = side.role;
    outcome
        .events
        .extend(side.events.drain(..).map(|e| (role, e)));
}

/// Moves what `from` sent into `to` through the byte encoding, frame by frame, until the
/// plan tears the link; returns the bytes moved.
fn deliver(
    now: UnixSeconds,
    from: &mut Side<'_>,
    to: &mut Side<'_>,
    decoder: &mut FrameDecoder,
    run: &mut Run,
    frames: &mut u32,
    plan: Plan,
) -> u64 {
    let mut moved = 0u64;
    for frame in std::mem::take(&mut from.outbox) {
        if from.dead || to.dead {
            break;
        }
        if plan.tear.is_some_and(|(n, _)| *frames >= n) {
            run.torn = true;
            break;
        }
        *frames += 1;
        let bytes = match frame.encode() {
            Ok(b) => b,
            Err(e) => {
                driver::handle_malformed(to, now, e);
                collect(to, &mut run.outcome);
                continue;
            }
        };
        moved += bytes.len() as u64;
        run.outcome.max_frame_bytes = run.outcome.max_frame_bytes.max(bytes.len());
        run.outcome.frames.push((from.role, frame));
        if let Err(e) = decoder.push(&bytes) {
            driver::handle_malformed(to, now, e);
            collect(to, &mut run.outcome);
            continue;
        }
        loop {
            match decoder.pop() {
                Ok(Some(frame)) => {
                    driver::handle_frame(to, now, frame);
                    collect(to, &mut run.outcome);
                }
                Ok(None) => break,
                Err(e) => {
                    driver::handle_malformed(to, now, e);
                    collect(to, &mut run.outcome);
                    break;
                }
            }
        }
    }
    if run.torn || from.dead || to.dead {
        from.outbox.clear();
    }
    match from.role {
        Role::Initiator => run.outcome.bytes_i_to_r += moved,
        Role::Responder => run.outcome.bytes_r_to_i += moved,
    }
    moved
}
