//! The sync protocol between devices and hubs, as pure code: frames, a session state
//! machine, the one event loop that runs it in every node, and an in-memory harness that
//! runs two sessions against each other.
//!
//! The shells (`edge-node`, `sync-hub`) only move bytes: they open an iroh connection with
//! [`ALPN`], feed received bytes to a [`FrameDecoder`] and its frames to the one event loop,
//! [`driver`], which hands them to a [`Session`], carries out its events through the shell's
//! [`driver::Shell`] (with the failure rules in one place) and gives the shell the frames to
//! write. The simulation and the tests run the same driver through [`harness`]. The wire
//! format and the rules are written down in `docs/protocol.md`. Every automerge message a
//! peer sends passes [`validate`] before automerge reads it.

pub mod driver;
mod frame;
pub mod harness;
pub mod legacy;
pub mod schedule;
mod session;
pub mod validate;

pub use frame::{
    ALPN, ALPN_V1, Frame, FrameDecoder, FrameError, HeadsDigest, Hello, InSync, Inbound,
    LENGTH_PREFIX_BYTES, MAX_DETAIL_CHARS, MAX_FRAME_BYTES, PRE_ADMISSION_FRAME_BYTES,
    PROTOCOL_VERSION, PartitionSummary, Peer, PeerSummary, Refusal, RefuseReason, Welcome,
    heads_digest, set_digest,
};
pub use session::{
    Decision, Event, MAX_FUTURE_DAYS, MAX_HEADS_PER_PARTITION, MAX_HELD_BACK_BYTES,
    MAX_PARTITIONS_PER_SESSION, MAX_ROUNDS_PER_PARTITION, MAX_SYNC_MESSAGE_BYTES, PartitionStore,
    PeerHello, Role, Session, Side, StoreError, SyncError, WireStats,
};
