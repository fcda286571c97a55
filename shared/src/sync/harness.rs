//! Runs two sync sessions against each other in memory: for tests, benchmarks and the
//! simulation, which drives many of these pairs over its own simulated network.
//!
//! [`run_pair`] runs both sides with [`driver`], the event loop the binaries run, behind a tiny
//! in-memory shell: it moves every frame through [`Frame::encode`] and a [`FrameDecoder`]
//! exactly as a socket would, answers `PeerHello` with the caller's admission rule, and
//! stores `SyncStateChanged` states, so what it measures is what goes on the wire.
//! [`run_pair_with`] makes chosen store writes fail ([`Faults`]).
//! [`MemoryStore`] is the in-memory [`PartitionStore`].

use super::driver::{self, Abort, End, Link, Shell};
use super::frame::{Frame, FrameDecoder, PartitionSummary, Peer};
use super::session::{
    Decision, Event, PartitionStore, PeerHello, Role, Session, StoreError, SyncError,
};
use crate::ids::{FacilityId, PartitionId};
use crate::partition::Partition;
use crate::time::UnixSeconds;
use std::collections::BTreeMap;

/// The most flights (one delivery of everything both sides queued) `run_pair` allows.
/// A healthy session needs a few per partition round trip.
pub const MAX_FLIGHTS: u32 = 10_000;

/// Partitions and sync states in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    actor: Vec<u8>,
    facility: Option<FacilityId>,
    partitions: BTreeMap<PartitionId, Partition>,
    sync_states: BTreeMap<(Peer, PartitionId), Vec<u8>>,
}

impl MemoryStore {
    /// An empty store whose new partitions write as `actor`. With `facility`, it holds only that
    /// facility's partitions (a device); without, any (a hub).
    pub fn new(actor: &[u8], facility: Option<FacilityId>) -> Self {
        MemoryStore {
            actor: actor.to_vec(),
            facility,
            ..Default::default()
        }
    }

    /// Adds or replaces a partition.
    pub fn insert(&mut self, partition: Partition) {
        self.partitions.insert(partition.id().clone(), partition);
    }

    /// The partition `id`, if held.
    pub fn get(&self, id: &PartitionId) -> Option<&Partition> {
        self.partitions.get(id)
    }

    /// The partition `id` for writing, if held.
    pub fn get_mut(&mut self, id: &PartitionId) -> Option<&mut Partition> {
        self.partitions.get_mut(id)
    }

    /// The partition `id`, created empty if missing; ignores the facility rule (for setting up).
    pub fn get_or_create(&mut self, id: &PartitionId) -> &mut Partition {
        let actor = &self.actor;
        self.partitions
            .entry(id.clone())
            .or_insert_with(|| Partition::new(id.clone(), actor))
    }

    /// Drops a partition (retention).
    pub fn remove(&mut self, id: &PartitionId) -> Option<Partition> {
        self.partitions.remove(id)
    }

    /// All held partitions, in id order.
    pub fn partitions(&self) -> impl Iterator<Item = &Partition> {
        self.partitions.values()
    }

    /// How many sync states are stored.
    pub fn sync_state_count(&self) -> usize {
        self.sync_states.len()
    }

    /// Forgets every sync state, as a node rebuilt from its partitions would.
    pub fn forget_sync_states(&mut self) {
        self.sync_states.clear();
    }
}

impl PartitionStore for MemoryStore {
    fn live_partitions(
        &self,
        facility: Option<&FacilityId>,
    ) -> Result<Vec<PartitionSummary>, StoreError> {
        Ok(self
            .partitions
            .values()
            .filter(|p| facility.is_none_or(|f| *f == p.id().facility))
            .map(PartitionSummary::of)
            .collect())
    }

    fn partition_mut(&mut self, id: &PartitionId) -> Result<Option<&mut Partition>, StoreError> {
        Ok(self.partitions.get_mut(id))
    }

    fn create_partition(&mut self, id: &PartitionId) -> Result<&mut Partition, StoreError> {
        if let Some(own) = self.facility.as_ref().filter(|f| **f != id.facility) {
            return Err(StoreError::NotAllowed {
                id: id.clone(),
                why: format!("this store holds only facility {own}"),
            });
        }
        Ok(self.get_or_create(id))
    }

    fn sync_state(&self, peer: &Peer, id: &PartitionId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.sync_states.get(&(peer.clone(), id.clone())).cloned())
    }

    fn put_sync_state(
        &mut self,
        peer: &Peer,
        id: &PartitionId,
        state: &[u8],
    ) -> Result<(), StoreError> {
        self.sync_states
            .insert((peer.clone(), id.clone()), state.to_vec());
        Ok(())
    }

    /// Memory is this store's disk: the partition reverts to `good_heads`, without the changes
    /// applied since and without automerge's held-back ones.
    fn discard_partition(
        &mut self,
        id: &PartitionId,
        good_heads: &[automerge::ChangeHash],
    ) -> Result<(), StoreError> {
        let Some(part) = self.partitions.get(id) else {
            return Ok(());
        };
        let kept = part
            .doc()
            .fork_at(good_heads)
            .map_err(|e| StoreError::Failed(format!("cannot revert partition {id}: {e}")))?;
        let reverted = Partition::load(id.clone(), &kept.save(), &self.actor)
            .map_err(|e| StoreError::Failed(format!("cannot revert partition {id}: {e}")))?;
        self.partitions.insert(id.clone(), reverted);
        Ok(())
    }
}

/// Who runs a pair and how the initiator introduces itself.
#[derive(Debug, Clone)]
pub struct PairSetup {
    /// The initiator's identity (a device).
    pub initiator: Peer,
    /// The responder's identity (a hub or a sibling device).
    pub responder: Peer,
    /// The initiator's enrollment credential, on first contact.
    pub credential: Option<[u8; 32]>,
    /// The initiator only sends (`Hello::push_only`), as devices do.
    pub push_only: bool,
}

/// Store writes one side of a pair fails on purpose, to exercise the failure rules of
/// [`driver`] (and, in the simulation, storage faults). Counts start at 0 per run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fail this side's n-th persist of a merged partition (0: the first).
    pub fail_persist: Option<u32>,
    /// Fail this side's n-th sync-state write (0: the first).
    pub fail_sync_state: Option<u32>,
    /// Refuse this side's n-th persist as over a quota (`QuotaExceeded`), as a hub does.
    pub quota_persist: Option<u32>,
}

/// Faults for both sides of a pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairFaults {
    /// The initiator's.
    pub initiator: Faults,
    /// The responder's.
    pub responder: Faults,
}

/// What one run of a pair did.
#[derive(Debug, Default)]
pub struct PairOutcome {
    /// Wire bytes (length prefixes included) from initiator to responder.
    pub bytes_i_to_r: u64,
    /// Wire bytes from responder to initiator.
    pub bytes_r_to_i: u64,
    /// Flights until both sides were quiet: each delivers everything both sides had queued.
    pub rounds: u32,
    /// Every event, tagged with the side that raised it, in order.
    pub events: Vec<(Role, Event)>,
    /// Every frame, tagged with its sender, in order.
    pub frames: Vec<(Role, Frame)>,
    /// The longest frame either side sent, in wire bytes (length prefix included).
    pub max_frame_bytes: usize,
    /// Whether the initiator finished cleanly.
    pub initiator_completed: bool,
    /// Whether the responder finished cleanly.
    pub responder_completed: bool,
    /// How the initiator's session ended, as its driver saw it.
    pub initiator_end: Option<End>,
    /// How the responder's session ended.
    pub responder_end: Option<End>,
    /// Records the initiator stored.
    pub initiator_stored: u64,
    /// Records the responder stored.
    pub responder_stored: u64,
}

impl PairOutcome {
    /// Whether both sides finished cleanly.
    pub fn completed(&self) -> bool {
        self.initiator_completed && self.responder_completed
    }

    /// Records that arrived, summed over `PartitionUpdated` events of `side`.
    pub fn new_records(&self, side: Role) -> u64 {
        self.events
            .iter()
            .filter(|(r, _)| *r == side)
            .map(|(_, e)| match e {
                Event::PartitionUpdated { new_records, .. } => *new_records,
                _ => 0,
            })
            .sum()
    }

    /// How `side`'s session ended.
    pub fn end(&self, side: Role) -> Option<&End> {
        match side {
            Role::Initiator => self.initiator_end.as_ref(),
            Role::Responder => self.responder_end.as_ref(),
        }
    }
}

/// Why `run_pair` could not run a session to its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HarnessError {
    /// The initiator could not open its session.
    #[error("the initiator could not start: {0}")]
    Start(SyncError),
    /// Neither side had anything to send and they were not both finished.
    #[error("sessions stalled after {rounds} flights with neither side finished: a protocol bug")]
    Stalled {
        /// Flights run.
        rounds: u32,
    },
    /// The flight bound was reached.
    #[error("sessions still running after {MAX_FLIGHTS} flights: a protocol bug")]
    TooManyFlights,
}

/// A `Sync` frame for `partition` carrying exactly `changes` (raw change chunks) in a v1
/// message with no heads, need or have: what a rogue peer writes by hand in attack tests.
pub fn raw_sync_frame(partition: &PartitionId, changes: Vec<Vec<u8>>) -> Frame {
    Frame::Sync {
        partition: partition.clone(),
        message: raw_sync_message(changes),
    }
}

/// The message of a [`raw_sync_frame`].
fn raw_sync_message(changes: Vec<Vec<u8>>) -> Vec<u8> {
    automerge::sync::Message {
        heads: vec![],
        need: vec![],
        have: vec![],
        changes: changes.into(),
        flags: None,
        version: automerge::sync::MessageVersion::V1,
    }
    .encode()
}

/// What a hub's connection reads of a [`raw_sync_frame`] carrying every change of `p`
/// ([`super::Inbound::read`]): a device's first sync of the partition, in one message.
pub fn read_sync_of(p: &Partition) -> super::validate::ReadMessage {
    let changes = p
        .doc()
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().to_vec())
        .collect();
    super::validate::ReadMessage::read(raw_sync_message(changes))
}

/// A responder `me` that has taken `peer`'s empty `Hello` (not push-only) at `now` and
/// admitted it for its own facility, its Welcome and events drained: the starting point of
/// tests that drive a hub session by hand. An error names what did not go as expected.
pub fn admitted_responder(
    me: Peer,
    peer: Peer,
    now: UnixSeconds,
    store: &mut impl PartitionStore,
) -> Result<Session, String> {
    let facility = peer
        .facility()
        .cloned()
        .ok_or("only a device is admitted for a facility")?;
    let mut session = Session::responder(me);
    let hello = super::frame::Hello {
        version: super::frame::PROTOCOL_VERSION,
        peer,
        now,
        horizon: crate::time::horizon(now),
        partitions: vec![],
        in_sync: Default::default(),
        push_only: false,
        credential: None,
        refresh_have: None,
    };
    session.handle_frame(now, Frame::Hello(hello), store);
    let mut saw_hello = false;
    while let Some(e) = session.poll_event() {
        saw_hello |= matches!(e, Event::PeerHello(_));
    }
    if !saw_hello {
        return Err("the responder raised no PeerHello".into());
    }
    session.admit(
        now,
        Decision::Admit {
            facility,
            refresh: None,
        },
        store,
    );
    while session.poll_transmit().is_some() {}
    while session.poll_event().is_some() {}
    if session.is_finished() {
        return Err("the session ended at admission".into());
    }
    Ok(session)
}

/// One side of a pair: the in-memory shell of [`driver`]. Memory is its disk, so a persist
/// stores nothing more; [`Faults`] make chosen writes fail.
struct Side<'a, S: PartitionStore> {
    role: Role,
    link: Link,
    store: &'a mut S,
    admit: &'a dyn Fn(&PeerHello) -> Decision,
    faults: Faults,
    persists: u32,
    sync_states: u32,
    /// Frames sent and not yet delivered.
    outbox: Vec<Frame>,
    /// Events raised since the pair loop last collected them.
    events: Vec<Event>,
}

impl<S: PartitionStore> Shell for Side<'_, S> {
    type Store = S;

    fn link_and_store(&mut self) -> (&mut Link, &mut S) {
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
        let n = self.persists;
        self.persists = n.saturating_add(1);
        if self.faults.quota_persist == Some(n) {
            return Err(Abort::partition(
                super::frame::RefuseReason::QuotaExceeded,
                format!("partition {id} is over the injected quota"),
            ));
        }
        if self.faults.fail_persist == Some(n) {
            return Err(Abort::internal(format!(
                "cannot store partition {id}: injected write failure"
            )));
        }
        Ok(())
    }

    fn store_sync_state(
        &mut self,
        peer: &Peer,
        partition: &PartitionId,
        state: &[u8],
    ) -> Result<(), Abort> {
        let n = self.sync_states;
        self.sync_states = n.saturating_add(1);
        if self.faults.fail_sync_state == Some(n) {
            return Err(Abort::internal(format!(
                "cannot store the sync state of {partition}: injected write failure"
            )));
        }
        self.store
            .put_sync_state(peer, partition, state)
            .map_err(|e| {
                Abort::internal(format!("cannot store the sync state of {partition}: {e}"))
            })
    }

    fn observe(&mut self, event: &Event) {
        self.events.push(event.clone());
    }

    fn send(&mut self, frame: Frame) -> Result<(), Abort> {
        self.outbox.push(frame);
        Ok(())
    }
}

/// Runs a fresh initiator against a fresh responder until both sessions end (cleanly or not),
/// with `admit` standing in for the responder's registry. Both sides run [`driver`], the
/// loop the binaries run, over encoded frames.
pub fn run_pair<I: PartitionStore, R: PartitionStore>(
    now: UnixSeconds,
    setup: &PairSetup,
    initiator_store: &mut I,
    responder_store: &mut R,
    admit: impl Fn(&PeerHello) -> Decision,
) -> Result<PairOutcome, HarnessError> {
    run_pair_with(
        now,
        setup,
        initiator_store,
        responder_store,
        admit,
        PairFaults::default(),
    )
}

/// [`run_pair`] with store writes that fail on purpose.
pub fn run_pair_with<I: PartitionStore, R: PartitionStore>(
    now: UnixSeconds,
    setup: &PairSetup,
    initiator_store: &mut I,
    responder_store: &mut R,
    admit: impl Fn(&PeerHello) -> Decision,
    faults: PairFaults,
) -> Result<PairOutcome, HarnessError> {
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
    let mut initiator = Side {
        role: Role::Initiator,
        link: Link::new(session),
        store: initiator_store,
        admit: &admit,
        faults: faults.initiator,
        persists: 0,
        sync_states: 0,
        outbox: Vec::new(),
        events: Vec::new(),
    };
    let mut responder = Side {
        role: Role::Responder,
        link: Link::new(Session::responder(setup.responder.clone())),
        store: responder_store,
        admit: &admit,
        faults: faults.responder,
        persists: 0,
        sync_states: 0,
        outbox: Vec::new(),
        events: Vec::new(),
    };
    let mut outcome = PairOutcome::default();
    let mut to_responder = FrameDecoder::new();
    let mut to_initiator = FrameDecoder::new();
    driver::pump(&mut initiator, now);
    collect(&mut initiator, &mut outcome);

    loop {
        if outcome.rounds >= MAX_FLIGHTS {
            return Err(HarnessError::TooManyFlights);
        }
        let moved_i = deliver(
            now,
            &mut initiator,
            &mut responder,
            &mut to_responder,
            &mut outcome,
        );
        let moved_r = deliver(
            now,
            &mut responder,
            &mut initiator,
            &mut to_initiator,
            &mut outcome,
        );
        if moved_i == 0 && moved_r == 0 {
            break;
        }
        outcome.rounds += 1;
    }
    if !(initiator.link.is_finished() && responder.link.is_finished()) {
        return Err(HarnessError::Stalled {
            rounds: outcome.rounds,
        });
    }
    outcome.initiator_end = initiator.link.end().cloned();
    outcome.responder_end = responder.link.end().cloned();
    outcome.initiator_completed = outcome
        .initiator_end
        .as_ref()
        .is_some_and(End::is_completed);
    outcome.responder_completed = outcome
        .responder_end
        .as_ref()
        .is_some_and(End::is_completed);
    outcome.initiator_stored = initiator.link.new_records();
    outcome.responder_stored = responder.link.new_records();
    Ok(outcome)
}

/// Moves the events `side` raised into the outcome, in order.
fn collect<S: PartitionStore>(side: &mut Side<'_, S>, outcome: &mut PairOutcome) {
    let role = side.role;
    outcome
        .events
        .extend(side.events.drain(..).map(|e| (role, e)));
}

/// Moves everything `from` has sent into `to`, through the byte encoding; returns the bytes.
fn deliver<F: PartitionStore, T: PartitionStore>(
    now: UnixSeconds,
    from: &mut Side<'_, F>,
    to: &mut Side<'_, T>,
    decoder: &mut FrameDecoder,
    outcome: &mut PairOutcome,
) -> u64 {
    let mut moved = 0u64;
    for frame in std::mem::take(&mut from.outbox) {
        let bytes = match frame.encode() {
            Ok(b) => b,
            // The session checks sizes before queuing; an encoding failure is a bug worth seeing.
            Err(e) => {
                driver::handle_malformed(to, now, e);
                collect(to, outcome);
                continue;
            }
        };
        moved += bytes.len() as u64;
        outcome.max_frame_bytes = outcome.max_frame_bytes.max(bytes.len());
        outcome.frames.push((from.role, frame));
        if let Err(e) = decoder.push(&bytes) {
            driver::handle_malformed(to, now, e);
            collect(to, outcome);
            continue;
        }
        loop {
            match decoder.pop() {
                Ok(Some(frame)) => {
                    driver::handle_frame(to, now, frame);
                    collect(to, outcome);
                }
                Ok(None) => break,
                Err(e) => {
                    driver::handle_malformed(to, now, e);
                    collect(to, outcome);
                    break;
                }
            }
        }
    }
    match from.role {
        Role::Initiator => outcome.bytes_i_to_r += moved,
        Role::Responder => outcome.bytes_r_to_i += moved,
    }
    moved
}

/// The noon the fuzz drivers run at (day 20,000).
const FUZZ_NOW: UnixSeconds = 20_000 * crate::time::DAY_SECONDS + 12 * 3_600;

/// A deterministic byte stream standing in for an `RngCore` where the fuzz fixture seals
/// records; its output never needs to be unpredictable.
struct FixtureRng(u64);

impl rand_core::RngCore for FixtureRng {
    fn next_u32(&mut self) -> u32 {
        // Truncation keeps the low half of a 64-bit step, as intended.
        self.next_u64() as u32
    }

    fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let b = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// What the fuzz drivers start from: a node's saved partition and realistic sync messages a
/// peer would send about it. Build once, reuse for every input.
#[derive(Debug, Clone)]
pub struct FuzzFixture {
    own: Vec<u8>,
    own_id: PartitionId,
    messages: Vec<Vec<u8>>,
    facilities: [FacilityId; 2],
    hub: Peer,
    device: Peer,
    /// A device of the other facility.
    stranger: Peer,
}

impl FuzzFixture {
    /// Seals a few records into a partition of facility `fac_a` for today, and collects every
    /// message of a full automerge sync between a peer's copy of it and an empty document.
    pub fn new() -> Result<Self, String> {
        use crate::envelope::{Record, RecordBody, SessionKey};
        use automerge::sync::SyncDoc;
        let fac = |s: &str| FacilityId::parse(s).map_err(|e| e.to_string());
        let facilities = [fac("fac_a")?, fac("fac_b")?];
        let device_id = crate::ids::DeviceId::parse("dev_a").map_err(|e| e.to_string())?;
        let own_id = PartitionId {
            facility: facilities[0].clone(),
            day: crate::time::Day::of(FUZZ_NOW),
        };
        let mut rng = FixtureRng(7);
        let mut seal_into = |p: &mut Partition, n: u64| -> Result<(), String> {
            let key = SessionKey::generate(&mut rng, own_id.day);
            for i in 0..n {
                let record_id = crate::ids::RecordId::random(&mut rng);
                let record = Record {
                    facility: own_id.facility.clone(),
                    device: device_id.clone(),
                    scanned_at: FUZZ_NOW + i,
                    body: RecordBody::Qr {
                        issuer_id: 1,
                        key_id: 1,
                        issued_at: FUZZ_NOW,
                        token: [i as u8; 16],
                    },
                };
                let envelope = key
                    .seal(&mut rng, &own_id, record_id, &record)
                    .map_err(|e| e.to_string())?;
                p.insert_record(record_id, &envelope)
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        let mut own = Partition::new(own_id.clone(), b"fuzz-own");
        seal_into(&mut own, 2)?;
        let mut theirs = Partition::new(own_id.clone(), b"fuzz-peer");
        seal_into(&mut theirs, 3)?;

        let mut messages = Vec::new();
        let mut empty = automerge::Automerge::new();
        let (mut s1, mut s2) = (automerge::sync::State::new(), automerge::sync::State::new());
        for _ in 0..16 {
            // As sessions generate them: v1 messages of change chunks (`validate`).
            let a = super::session::next_message(theirs.doc(), &mut s1);
            if let Some(m) = a.clone() {
                messages.push(m.clone().encode());
                empty
                    .receive_sync_message(&mut s2, m)
                    .map_err(|e| e.to_string())?;
            }
            let b = super::session::next_message(&empty, &mut s2);
            if let Some(m) = b.clone() {
                messages.push(m.clone().encode());
                theirs
                    .doc_mut()
                    .receive_sync_message(&mut s1, m)
                    .map_err(|e| e.to_string())?;
            }
            if a.is_none() && b.is_none() {
                break;
            }
        }
        Ok(FuzzFixture {
            own: own.save(),
            own_id,
            messages,
            hub: Peer::Hub {
                region: "fuzz".into(),
            },
            device: Peer::Device {
                device: device_id,
                facility: facilities[0].clone(),
            },
            stranger: Peer::Device {
                device: crate::ids::DeviceId::parse("dev_b").map_err(|e| e.to_string())?,
                facility: facilities[1].clone(),
            },
            facilities,
        })
    }
}

/// Fuzz driver for [`FrameDecoder`]: `data` is cut into chunks whose sizes come from `data`
/// itself and fed to a decoder; every decoded frame must re-encode to a frame that decodes
/// to itself, and the decoder must never buffer more than it was given.
pub fn fuzz_frame_decoder(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split % 64) + 1;
    let mut decoder = FrameDecoder::new();
    let mut given = 0usize;
    'stream: for piece in rest.chunks(chunk) {
        given += piece.len();
        if decoder.push(piece).is_err() {
            break;
        }
        assert!(
            decoder.buffered() <= given,
            "decoder holds more than it was given"
        );
        loop {
            match decoder.pop() {
                Ok(Some(frame)) => {
                    let bytes = frame.encode().expect("a decoded frame re-encodes");
                    let again = Frame::decode_body(&bytes[super::frame::LENGTH_PREFIX_BYTES..])
                        .expect("a re-encoded frame decodes");
                    assert_eq!(again, frame, "frame changed across a round trip");
                }
                Ok(None) => break,
                Err(_) => break 'stream,
            }
        }
    }
    let _ = decoder.finish();
}

/// Reads small values off the fuzz input; zeros once it runs out.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.byte()).min(max).min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken.to_vec()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Fuzz driver for [`Session`]: `data` is a script of inputs (frames of every kind with
/// fields drawn from a small dictionary, raw bytes through a [`FrameDecoder`], admission
/// decisions, the end of the stream) for a hub responder or a device initiator holding one
/// small partition. Checks that nothing panics, that no partition of another facility or
/// outside the agreed days is ever created, and that nothing happens after the end.
///
/// The report says how far the script got, so seed corpora can be checked for depth.
pub fn fuzz_session(fixture: &FuzzFixture, data: &[u8]) -> FuzzReport {
    let mut report = FuzzReport::default();
    let mut script = Script(data);
    let as_initiator = script.byte() % 2 == 1;
    let mut store = MemoryStore::new(b"fuzz-node", None);
    if let Ok(p) = Partition::load(fixture.own_id.clone(), &fixture.own, b"fuzz-node") {
        store.insert(p);
    }
    let today = fixture.own_id.day;
    let days = [
        crate::time::horizon(FUZZ_NOW).minus(1),
        crate::time::horizon(FUZZ_NOW),
        today,
        today.plus(1),
        today.plus(5),
    ];
    let mut session = if as_initiator {
        match Session::initiator(FUZZ_NOW, fixture.device.clone(), None, &store) {
            Ok(s) => s,
            Err(_) => return report,
        }
    } else {
        Session::responder(fixture.hub.clone())
    };
    report.frames_sent += drain_count(&mut session, &mut report);
    let mut decoder = FrameDecoder::new();
    let mut admitted: Option<FacilityId> = as_initiator.then(|| fixture.facilities[0].clone());
    let mut steps = 0;
    while !script.is_empty() && steps < 256 {
        steps += 1;
        let was_finished = session.is_finished();
        let op = script.byte();
        let now = FUZZ_NOW + u64::from(script.byte()) * 600;
        let pick_facility = |b: u8| fixture.facilities[usize::from(b % 2)].clone();
        let pick_partition = |script: &mut Script<'_>| PartitionId {
            facility: pick_facility(script.byte()),
            day: days[usize::from(script.byte()) % days.len()],
        };
        let frame = match op % 9 {
            0 => {
                let n = script.byte() % 4;
                let partitions = (0..n)
                    .map(|_| {
                        PartitionSummary {
                            id: pick_partition(&mut script),
                            heads: vec![[script.byte(); 32]; usize::from(script.byte() % 3)],
                            records: u64::from(script.byte()),
                        }
                        .advertised()
                    })
                    .collect();
                let peer = match script.byte() % 3 {
                    0 => fixture.hub.clone(),
                    1 => fixture.device.clone(),
                    _ => fixture.stranger.clone(),
                };
                let hello = super::frame::Hello {
                    version: if script.byte() < 250 {
                        super::frame::PROTOCOL_VERSION
                    } else {
                        super::frame::PROTOCOL_VERSION + 1
                    },
                    peer: peer.clone(),
                    now,
                    horizon: days[usize::from(script.byte()) % days.len()],
                    partitions,
                    in_sync: super::frame::InSync {
                        count: u16::from(script.byte() % 3),
                        digest: [script.byte(); 8],
                    },
                    push_only: script.byte() % 2 == 0,
                    credential: (script.byte() % 2 == 0).then_some([3; 32]),
                    refresh_have: None,
                };
                if as_initiator {
                    Some(Frame::Welcome(super::frame::Welcome {
                        version: hello.version,
                        peer,
                        now,
                        horizon: hello.horizon,
                        partitions: hello.partitions,
                        delta: script.byte() % 2 == 0,
                        refresh: Some(script.bytes(16)),
                    }))
                } else {
                    Some(Frame::Hello(hello))
                }
            }
            1 => {
                let decision = if script.byte() % 4 == 0 {
                    Decision::Refuse {
                        reason: super::frame::RefuseReason::Revoked,
                        detail: "fuzz".into(),
                    }
                } else {
                    let facility = pick_facility(script.byte());
                    if session.awaits_admission() {
                        admitted = Some(facility.clone());
                    }
                    Decision::Admit {
                        facility,
                        refresh: None,
                    }
                };
                session.admit(now, decision, &mut store);
                None
            }
            2 | 3 => {
                let partition = pick_partition(&mut script);
                let mut message = fixture
                    .messages
                    .get(usize::from(script.byte()) % fixture.messages.len().max(1))
                    .cloned()
                    .unwrap_or_default();
                // Mutate a few bytes of the realistic message.
                for _ in 0..(script.byte() % 4) {
                    let at = usize::from(script.byte()) * 7;
                    let value = script.byte();
                    let len = message.len().max(1);
                    if let Some(b) = message.get_mut(at % len) {
                        *b ^= value;
                    }
                }
                Some(Frame::Sync { partition, message })
            }
            4 => Some(Frame::Sync {
                partition: pick_partition(&mut script),
                message: script.bytes(64),
            }),
            5 => Some(Frame::Done {
                received: u32::from(script.byte() % 8),
            }),
            6 => Some(Frame::Refused(super::frame::Refusal::new(
                super::frame::RefuseReason::Protocol,
                "fuzz",
            ))),
            7 => {
                let raw = script.bytes(64);
                let mut frames = Vec::new();
                match decoder.push(&raw) {
                    Ok(()) => loop {
                        match decoder.pop() {
                            Ok(Some(f)) => frames.push(f),
                            Ok(None) => break,
                            Err(e) => {
                                session.handle_malformed(e);
                                break;
                            }
                        }
                    },
                    Err(e) => session.handle_malformed(e),
                }
                for f in frames {
                    session.handle_frame(now, f, &mut store);
                }
                None
            }
            _ => {
                session.handle_closed();
                None
            }
        };
        if let Some(frame) = frame {
            session.handle_frame(now, frame, &mut store);
        }
        let events_before = report.events;
        let out = drain_count(&mut session, &mut report);
        report.frames_sent += out;
        if was_finished {
            assert_eq!(
                (out, report.events - events_before),
                (0, 0),
                "a finished session kept talking"
            );
        }
        for p in store.partitions() {
            let id = p.id();
            if *id == fixture.own_id {
                continue;
            }
            assert!(
                Some(&id.facility) == admitted.as_ref(),
                "partition {id} of a facility that was not admitted was created"
            );
            assert!(
                id.day >= crate::time::horizon(FUZZ_NOW) && id.day <= today.plus(2),
                "partition {id} outside the agreed days was created"
            );
        }
    }
    report
}

/// How far one [`fuzz_session`] script got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuzzReport {
    /// Frames the session queued.
    pub frames_sent: usize,
    /// Events it raised.
    pub events: usize,
    /// `PartitionUpdated` events among them.
    pub partitions_updated: usize,
    /// Whether it finished cleanly.
    pub completed: bool,
    /// Whether it ended refused or failed.
    pub ended_badly: bool,
}

/// Drains a session's transmits (returning how many) and events (counted into `report`).
fn drain_count(session: &mut Session, report: &mut FuzzReport) -> usize {
    let mut out = 0;
    while session.poll_transmit().is_some() {
        out += 1;
    }
    while let Some(event) = session.poll_event() {
        report.events += 1;
        match event {
            Event::PartitionUpdated { .. } => report.partitions_updated += 1,
            Event::Finished(_) => report.completed = true,
            Event::Refused { .. } | Event::Failed(_) => report.ended_badly = true,
            _ => {}
        }
    }
    out
}

/// Deflate (RFC 1951) of `n` zero bytes in one dynamic-Huffman block: a literal zero, then
/// copies of 258 bytes at distance 1 at 2 bits each (the format's best ratio, about 1000:1),
/// the rest as literals. Test input for hostile peers and image bombs: a megabyte that a
/// careless reader inflates to a gigabyte.
pub fn deflate_zeros(n: u64) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        len: u32,
    }
    impl Bits {
        /// `count` bits of `value`, least significant first (header fields, extra bits).
        fn put(&mut self, value: u64, count: u32) {
            self.acc |= value << self.len;
            self.len += count;
            while self.len >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.len -= 8;
            }
        }
        /// A Huffman code of `len` bits, most significant first.
        fn code(&mut self, code: u64, len: u32) {
            for i in (0..len).rev() {
                self.put((code >> i) & 1, 1);
            }
        }
    }
    let mut b = Bits {
        out: Vec::new(),
        acc: 0,
        len: 0,
    };
    b.put(1, 1); // final block
    b.put(2, 2); // dynamic Huffman
    b.put(29, 5); // 286 literal/length codes
    b.put(1, 5); // 2 distance codes
    b.put(14, 4); // 18 code-length code lengths
    // In the format's order 16 17 18 0 8 7 9 6 10 5 11 4 12 3 13 2 14 1: the code-length
    // alphabet uses 18 (1 bit: "0"), 1 ("10") and 2 ("11").
    for len in [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2] {
        b.put(len, 3);
    }
    let (cl1, cl2, cl18) = ((0b10, 2), (0b11, 2), (0b0, 1));
    // Literal 0: 2 bits; 1..=255: none; 256 (end): 2 bits; 257..=284: none; 285 (copy 258): 1.
    b.code(cl2.0, cl2.1);
    b.code(cl18.0, cl18.1);
    b.put(138 - 11, 7);
    b.code(cl18.0, cl18.1);
    b.put(117 - 11, 7);
    b.code(cl2.0, cl2.1);
    b.code(cl18.0, cl18.1);
    b.put(28 - 11, 7);
    b.code(cl1.0, cl1.1);
    // Distance codes 0 (distance 1) and 1: one bit each.
    b.code(cl1.0, cl1.1);
    b.code(cl1.0, cl1.1);
    // Codes: literal 0 "10", end "11", length 258 "0"; distance 1 "0".
    let mut left = n;
    if left > 0 {
        b.code(0b10, 2);
        left -= 1;
    }
    while left >= 258 {
        b.code(0b0, 1);
        b.code(0b0, 1);
        left -= 258;
    }
    for _ in 0..left {
        b.code(0b10, 2);
    }
    b.code(0b11, 2);
    if b.len > 0 {
        b.put(0, 8 - b.len);
    }
    b.out
}
