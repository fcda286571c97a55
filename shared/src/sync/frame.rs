//! The sync protocol's wire frames and the byte framing that carries them.
//!
//! A stream is a sequence of frames, each a 4-byte big-endian length followed by that many
//! bytes of postcard-encoded [`Frame`]. The length is checked against [`MAX_FRAME_BYTES`]
//! before anything is allocated for the body, so a hostile length costs nothing.
//! `docs/protocol.md` gives the byte layout of every field.

use crate::ids::{DeviceId, FacilityId, PartitionId};
use crate::time::{Day, UnixSeconds};
use serde::{Deserialize, Serialize};

/// The ALPN of the sync protocol, version 2. A breaking change to any frame gets a new ALPN, so
/// peers of different versions part at the QUIC handshake, not mid-stream. Version 2 validates
/// every received change and refuses encodings version 1 peers send (compressed chunks, whole
/// documents), so it is not compatible with version 1.
pub const ALPN: &[u8] = b"kipass/sync/2";

/// The ALPN of version 1. Nodes still accept it, only to tell the old peer to upgrade
/// ([`super::legacy::v1_refusal`]) and close: no v1 session is ever run.
pub const ALPN_V1: &[u8] = b"kipass/sync/1";

/// The version carried in `Hello` and `Welcome`; always equal to the digit in [`ALPN`].
pub const PROTOCOL_VERSION: u16 = 2;

/// Bytes of the length prefix before every frame body.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// The largest frame body (without its length prefix) either side sends or accepts.
///
/// A `Sync` frame carries one automerge sync message, and a peer that holds nothing of a
/// partition gets every change of it in one, so this bounds the size of a partition that can
/// be synced to such a peer: at about 150 B a record (sealed envelope plus automerge
/// overhead) 16 MiB is some 100,000 visits for one facility on one day. The same limit bounds
/// a `SyncDeflated` message after inflating.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// The largest frame body a responder (the hub, or a device serving a sibling) buffers before
/// the peer is admitted. A `Hello` is a few hundred bytes, its credential and one summary per
/// live partition (about 60 B each plus 32 B per extra head): 64 KiB is some 2,000 heads, far
/// more than a month of partitions has.
pub const PRE_ADMISSION_FRAME_BYTES: usize = 64 * 1024;

/// Who is on the other end of a session, as it introduces itself.
///
/// A claim, not a proof: the shell checks the claim against the iroh endpoint id that
/// authenticated the connection and against its registry before admitting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Peer {
    /// An edge device enrolled for one facility.
    Device {
        /// The device's id.
        device: DeviceId,
        /// The facility it is enrolled for: the only facility whose partitions it holds.
        facility: FacilityId,
    },
    /// A regional sync hub.
    Hub {
        /// The region the hub serves.
        region: String,
    },
    /// The region's other hub syncing one facility's partitions (the hub link: a hub opens
    /// one session per facility whose partitions differ). Admitted only from the endpoint
    /// the responding hub was paired with; it sends and takes changes both ways.
    HubLink {
        /// The region both hubs serve.
        region: String,
        /// The one facility this session syncs.
        facility: FacilityId,
    },
}

impl Peer {
    /// The facility this peer is bound to, if it is a device.
    pub fn facility(&self) -> Option<&FacilityId> {
        match self {
            Peer::Device { facility, .. } | Peer::HubLink { facility, .. } => Some(facility),
            Peer::Hub { .. } => None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Device { device, facility } => write!(f, "device {device} of {facility}"),
            Peer::Hub { region } => write!(f, "hub of region {region:?}"),
            Peer::HubLink { region, facility } => {
                write!(f, "peer hub of region {region:?} for {facility}")
            }
        }
    }
}

/// One live partition as a peer advertises it: enough to skip partitions both sides already share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSummary {
    /// Which partition.
    pub id: PartitionId,
    /// The automerge heads of the sender's copy, sorted.
    pub heads: Vec<[u8; 32]>,
    /// How many records the sender's copy holds (informational: dashboards and logs).
    pub records: u64,
}

impl PartitionSummary {
    /// The summary of a partition this node holds.
    pub fn of(partition: &crate::partition::Partition) -> Self {
        let mut heads: Vec<[u8; 32]> = partition.heads().iter().map(|h| h.0).collect();
        heads.sort_unstable();
        PartitionSummary {
            id: partition.id().clone(),
            heads,
            records: partition.record_count() as u64,
        }
    }
}

/// A digest of a partition's sorted heads: what a summary sends instead of the heads.
///
/// 8 bytes of BLAKE3: two honest peers whose heads differ collide with probability 2^-64; a
/// peer that forges a collision only keeps its own partition from syncing.
pub type HeadsDigest = [u8; 8];

/// The [`HeadsDigest`] of `heads` (sorted by the caller, as every summary keeps them).
pub fn heads_digest(heads: &[[u8; 32]]) -> HeadsDigest {
    let mut h = blake3::Hasher::new_derive_key("kipass sync v2 partition heads");
    for head in heads {
        h.update(head);
    }
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

/// The digest of a set of partitions with their heads, in the order given (sorted by id).
pub fn set_digest<'a>(
    partitions: impl IntoIterator<Item = (&'a PartitionId, &'a [[u8; 32]])>,
) -> HeadsDigest {
    let mut h = blake3::Hasher::new_derive_key("kipass sync v2 partition set");
    for (id, heads) in partitions {
        let facility = id.facility.as_str().as_bytes();
        h.update(
            &u32::try_from(facility.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        h.update(facility);
        h.update(&id.day.0.to_be_bytes());
        h.update(&heads_digest(heads));
    }
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

impl PartitionSummary {
    /// The digest of this summary's heads.
    pub fn digest(&self) -> HeadsDigest {
        heads_digest(&self.heads)
    }

    /// This summary as a hello or welcome lists it.
    pub fn advertised(&self) -> PeerSummary {
        PeerSummary {
            id: self.id.clone(),
            digest: self.digest(),
            records: self.records,
        }
    }
}

/// One partition as a hello or welcome lists it: its id, a digest of its heads, its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSummary {
    /// Which partition.
    pub id: PartitionId,
    /// [`heads_digest`] of the sender's heads; of no heads when the sender lacks it.
    pub digest: HeadsDigest,
    /// How many records the sender's copy holds (informational: dashboards and logs).
    pub records: u64,
}

/// The partitions a hello leaves out: unchanged since the initiator's last session with the
/// same peer, by the sync state it stored then. The responder checks the claim against its own
/// stored states before it relies on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InSync {
    /// How many partitions were left out.
    pub count: u16,
    /// [`set_digest`] of those partitions with their heads.
    pub digest: HeadsDigest,
}

/// The initiator's opening frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// Who the sender says it is.
    pub peer: Peer,
    /// The sender's clock when it opened the session.
    pub now: UnixSeconds,
    /// The sender's retention horizon: it holds no partition of an earlier day.
    pub horizon: Day,
    /// The sender's live partitions, except those `in_sync` stands for.
    pub partitions: Vec<PeerSummary>,
    /// The live partitions left out because the peer already holds them as they are.
    pub in_sync: InSync,
    /// The initiator only sends: the responder sends it no changes and starts no exchange of
    /// its own (a device handing its records to its hub or a sibling; it cannot read them
    /// anyway, and the hub keeps them).
    pub push_only: bool,
    /// A single-use enrollment credential, sent on a device's first contact only.
    pub credential: Option<[u8; 32]>,
    /// Opaque bytes for the responder's shell (what the device already holds of the hub's
    /// refresh), at most [`MAX_REFRESH_HAVE_BYTES`]; the core carries them and never reads them.
    pub refresh_have: Option<Vec<u8>>,
}

/// The most bytes of a hello's `refresh_have`.
pub const MAX_REFRESH_HAVE_BYTES: usize = 64;

/// The responder's answer to an admitted `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// Who the responder is.
    pub peer: Peer,
    /// The responder's clock when it admitted the initiator.
    pub now: UnixSeconds,
    /// The responder's retention horizon.
    pub horizon: Day,
    /// The responder's live partitions of the admitted facility: with `delta`, only those
    /// whose heads differ from the hello's (a partition the responder lacks is listed with the
    /// digest of no heads); without, all of them.
    pub partitions: Vec<PeerSummary>,
    /// Whether partitions left out are in sync with the hello. False when the responder could
    /// not confirm the hello's `in_sync` claim: then every partition is listed and both sides
    /// run automerge's exchange for every one the other did not name.
    pub delta: bool,
    /// Opaque bytes for the initiator's shell (a hub's day public keys, issuer keyring,
    /// sibling roster); the core carries them and never reads them.
    pub refresh: Option<Vec<u8>>,
}

/// Why a side ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// The device is not enrolled here.
    UnknownDevice,
    /// The device was enrolled and has been revoked.
    Revoked,
    /// The enrollment credential was already used.
    CredentialReused,
    /// A partition or peer of another facility than the one admitted.
    WrongFacility,
    /// The peer speaks another protocol version.
    Version,
    /// The peer's clock is too far off to sync safely.
    Clock,
    /// A partition before the session's horizon or too far in the future.
    OutsideWindow,
    /// A frame that does not decode, or arrives when it is not allowed.
    Protocol,
    /// The peer kept sending sync messages past the session's bounds.
    TooManyRounds,
    /// The refusing side failed on its own (storage, message too large); try again later.
    Internal,
    /// A sync message carried a change the partition's rules refuse (a delete, an overwrite,
    /// a nested object, a value of the wrong shape or size) or an encoding that is refused
    /// (compressed chunks or columns, whole documents, counts over the limits). Appended last:
    /// the indices of the other reasons are unchanged.
    InvalidChange,
    /// The peer went over one of the refusing side's quotas (a hub's bytes per session or
    /// records per device per day); the detail says which. Appended last like `InvalidChange`.
    QuotaExceeded,
    /// A newer session of the same device replaced this one (the older is most likely a dead
    /// connection): at most one session per device runs at a hub. Appended last.
    Replaced,
}

/// A refusal: the session ends after this frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The machine-readable reason.
    pub reason: RefuseReason,
    /// A human-readable explanation for logs, at most [`MAX_DETAIL_CHARS`] characters.
    pub detail: String,
}

/// The longest `Refusal::detail` a side sends; longer received details are cut to this.
pub const MAX_DETAIL_CHARS: usize = 256;

impl Refusal {
    /// A refusal with its detail cut to [`MAX_DETAIL_CHARS`].
    pub fn new(reason: RefuseReason, detail: &str) -> Self {
        Refusal {
            reason,
            detail: detail.chars().take(MAX_DETAIL_CHARS).collect(),
        }
    }
}

/// One frame of the sync protocol. The variant order is part of the wire format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Initiator to responder, first frame.
    Hello(Hello),
    /// Responder to initiator after admitting it.
    Welcome(Welcome),
    /// Either side; the last frame it sends.
    Refused(Refusal),
    /// One automerge sync message for one partition.
    Sync {
        /// The partition the message belongs to.
        partition: PartitionId,
        /// An encoded `automerge::sync::Message`.
        message: Vec<u8>,
    },
    /// The sender has nothing more to send until it hears from the peer.
    Done {
        /// How many `Sync` frames the sender has received in this session.
        received: u32,
    },
    /// The sender refused the peer's changes to one partition and takes no more `Sync`
    /// frames for it in this session; the session goes on with the other partitions.
    Skipped {
        /// The partition refused.
        partition: PartitionId,
        /// Why.
        refusal: Refusal,
    },
}

/// A frame from the peer as a [`super::Session`] takes it: a [`Frame`], or one whose `Sync`
/// message was already read on its own (`validate::read_message`, the check that needs no
/// partition) where it arrived. A shell that reads frames on another thread than the one
/// that runs its sessions (the hub: a task per connection, one actor for every session)
/// makes them with [`Inbound::read`] there, so the actor spends its time on what needs the
/// partitions. A plain `Frame` converts into one that is read when the session takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub(crate) body: InboundBody,
}

/// What an [`Inbound`] holds, with the frame's size on the wire as received (length prefix
/// included): always known for a message read where it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InboundBody {
    Frame(Frame, Option<usize>),
    Sync {
        partition: PartitionId,
        message: super::validate::ReadMessage,
        wire_len: usize,
    },
}

impl From<Frame> for Inbound {
    fn from(frame: Frame) -> Inbound {
        Inbound {
            body: InboundBody::Frame(frame, None),
        }
    }
}

impl Inbound {
    /// A frame as received, `wire_len` bytes on the wire (length prefix included;
    /// [`FrameDecoder::pop_sized`]), a `Sync` frame's message read now.
    pub fn read(frame: Frame, wire_len: usize) -> Inbound {
        let body = match frame {
            Frame::Sync { partition, message } => InboundBody::Sync {
                partition,
                message: super::validate::ReadMessage::read(message),
                wire_len,
            },
            other => InboundBody::Frame(other, Some(wire_len)),
        };
        Inbound { body }
    }

    /// A `Sync` frame's partition and read message (read now if it was not yet).
    pub fn into_sync(self) -> Option<(PartitionId, super::validate::ReadMessage)> {
        match self.body {
            InboundBody::Sync {
                partition, message, ..
            } => Some((partition, message)),
            InboundBody::Frame(Frame::Sync { partition, message }, _) => {
                Some((partition, super::validate::ReadMessage::read(message)))
            }
            InboundBody::Frame(..) => None,
        }
    }

    /// A frame as received, `wire_len` bytes on the wire, left unread: a `Sync` message is
    /// read when the session takes it, if it does.
    pub fn unread(frame: Frame, wire_len: usize) -> Inbound {
        Inbound {
            body: InboundBody::Frame(frame, Some(wire_len)),
        }
    }

    /// A `Sync` frame's message if it was read ([`Inbound::read`]).
    pub fn read_message(&self) -> Option<&super::validate::ReadMessage> {
        match &self.body {
            InboundBody::Sync { message, .. } => Some(message),
            InboundBody::Frame(..) => None,
        }
    }

    /// Whether a `Sync` frame's message was already read ([`Inbound::read`]).
    pub fn is_read(&self) -> bool {
        matches!(self.body, InboundBody::Sync { .. })
    }

    /// The frame's kind ([`Frame::kind`]).
    pub fn kind(&self) -> &'static str {
        match &self.body {
            InboundBody::Frame(f, _) => f.kind(),
            InboundBody::Sync { .. } => "Sync",
        }
    }

    /// The partition of a `Sync` frame.
    pub fn sync_partition(&self) -> Option<&PartitionId> {
        match &self.body {
            InboundBody::Frame(Frame::Sync { partition, .. }, _)
            | InboundBody::Sync { partition, .. } => Some(partition),
            InboundBody::Frame(..) => None,
        }
    }

    /// The frame's size on the wire: as received if known, else [`Frame::wire_len`] (which
    /// deflates a large `Sync` message again to find it).
    pub fn wire_len(&self) -> usize {
        match &self.body {
            InboundBody::Frame(_, Some(n)) | InboundBody::Sync { wire_len: n, .. } => *n,
            InboundBody::Frame(f, None) => f.wire_len(),
        }
    }

    /// What the frame counts for against a per-session byte quota ([`Frame::quota_len`]).
    pub fn quota_len(&self) -> u64 {
        match &self.body {
            InboundBody::Frame(f, _) => f.quota_len(),
            InboundBody::Sync {
                partition, message, ..
            } => sync_quota_len(partition, message.bytes()),
        }
    }
}

/// [`Frame::quota_len`] of a `Sync` frame: prefix, variant tag, partition id (facility text
/// and day) and message length.
fn sync_quota_len(partition: &PartitionId, message: &[u8]) -> u64 {
    let n = LENGTH_PREFIX_BYTES + 16 + partition.facility.as_str().len() + message.len();
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Frame {
    /// A short name of the frame's kind for errors and logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Refused(_) => "Refused",
            Frame::Sync { .. } => "Sync",
            Frame::Done { .. } => "Done",
            Frame::Skipped { .. } => "Skipped",
        }
    }

    /// The frame's size on the wire, length prefix included.
    pub fn wire_len(&self) -> usize {
        // Serializing into the size-counting flavor cannot fail for these plain types.
        LENGTH_PREFIX_BYTES
            + postcard::serialize_with_flavor(&self.wire(), postcard::ser_flavors::Size::default())
                .unwrap_or(0)
    }

    /// The size a received frame counts for against a per-session byte quota (the hub's
    /// and a device serving a sibling): as decoded, so a `Sync` is measured without
    /// deflating it again (a deflated one counts at its full size).
    pub fn quota_len(&self) -> u64 {
        match self {
            Frame::Sync { partition, message } => sync_quota_len(partition, message),
            other => u64::try_from(other.wire_len()).unwrap_or(u64::MAX),
        }
    }

    /// The frame as it goes on the wire: length prefix and body.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = postcard::to_extend(&self.wire(), vec![0u8; LENGTH_PREFIX_BYTES])
            .map_err(|e| FrameError::Encode(e.to_string()))?;
        let body = out.len() - LENGTH_PREFIX_BYTES;
        if body > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge { declared: body });
        }
        // body <= MAX_FRAME_BYTES < 2^32, so the conversion cannot fail.
        let prefix = u32::try_from(body).unwrap_or(u32::MAX).to_be_bytes();
        out[..LENGTH_PREFIX_BYTES].copy_from_slice(&prefix);
        Ok(out)
    }

    /// The wire form: a `Sync` frame whose automerge message is a v1 message (changes, which
    /// automerge sends uncompressed) of more than [`DEFLATE_MIN_BYTES`] goes as
    /// `SyncDeflated` when DEFLATE makes it smaller; everything else as it is.
    fn wire(&self) -> WireRef<'_> {
        match self {
            Frame::Hello(h) => WireRef::Hello(h),
            Frame::Welcome(w) => WireRef::Welcome(w),
            Frame::Refused(r) => WireRef::Refused(r),
            Frame::Done { received } => WireRef::Done {
                received: *received,
            },
            Frame::Skipped { partition, refusal } => WireRef::Skipped { partition, refusal },
            Frame::Sync { partition, message } => {
                if message.len() > DEFLATE_MIN_BYTES
                    && message.first() == Some(&AUTOMERGE_V1_MESSAGE)
                {
                    let deflated = deflate(message);
                    if deflated.len() < message.len() {
                        return WireRef::SyncDeflated {
                            partition,
                            deflated: std::borrow::Cow::Owned(deflated),
                        };
                    }
                }
                WireRef::Sync {
                    partition,
                    message: message.as_slice(),
                }
            }
        }
    }

    /// Decodes one frame body (without its length prefix); the body must be consumed exactly.
    pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
        if body.len() > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge {
                declared: body.len(),
            });
        }
        let (wire, rest) =
            postcard::take_from_bytes::<Wire>(body).map_err(|e| FrameError::Malformed {
                len: body.len(),
                detail: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(FrameError::TrailingBytes {
                len: body.len(),
                extra: rest.len(),
            });
        }
        Ok(match wire {
            Wire::Hello(h) => Frame::Hello(h),
            Wire::Welcome(w) => Frame::Welcome(w),
            Wire::Refused(r) => Frame::Refused(r),
            Wire::Sync { partition, message } => Frame::Sync { partition, message },
            Wire::Done { received } => Frame::Done { received },
            Wire::SyncDeflated {
                partition,
                deflated,
            } => Frame::Sync {
                partition,
                message: inflate(&deflated, body.len())?,
            },
            Wire::Skipped { partition, refusal } => Frame::Skipped {
                partition,
                refusal: Refusal::new(refusal.reason, &refusal.detail),
            },
        })
    }
}

/// Sync messages at most this long are sent as they are.
pub const DEFLATE_MIN_BYTES: usize = 256;

/// The first byte of an automerge v1 sync message (`MESSAGE_TYPE_SYNC` in automerge).
const AUTOMERGE_V1_MESSAGE: u8 = 0x42;

fn deflate(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(bytes.len() / 2),
        flate2::Compression::default(),
    );
    // Writing into a Vec cannot fail.
    match e.write_all(bytes).and_then(|()| e.finish()) {
        Ok(out) => out,
        Err(_) => bytes.to_vec(),
    }
}

/// Inflates a `SyncDeflated` message, refusing more than [`MAX_FRAME_BYTES`] of output (a
/// small frame must not expand into an unbounded allocation).
fn inflate(deflated: &[u8], frame_len: usize) -> Result<Vec<u8>, FrameError> {
    use std::io::Read;
    let mut out = Vec::with_capacity(deflated.len().saturating_mul(2).min(MAX_FRAME_BYTES));
    let limit = u64::try_from(MAX_FRAME_BYTES).unwrap_or(u64::MAX) + 1;
    flate2::read::DeflateDecoder::new(deflated)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| FrameError::Malformed {
            len: frame_len,
            detail: format!("deflated sync message: {e}"),
        })?;
    if out.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            declared: out.len(),
        });
    }
    Ok(out)
}

/// [`Frame`] as it is serialized; the variant order is the wire format (`SyncDeflated` last,
/// so the first five tags are [`Frame`]'s own).
#[derive(Serialize)]
enum WireRef<'a> {
    Hello(&'a Hello),
    Welcome(&'a Welcome),
    Refused(&'a Refusal),
    Sync {
        partition: &'a PartitionId,
        message: &'a [u8],
    },
    Done {
        received: u32,
    },
    SyncDeflated {
        partition: &'a PartitionId,
        deflated: std::borrow::Cow<'a, [u8]>,
    },
    Skipped {
        partition: &'a PartitionId,
        refusal: &'a Refusal,
    },
}

/// [`WireRef`] as it is deserialized.
#[derive(Deserialize)]
enum Wire {
    Hello(Hello),
    Welcome(Welcome),
    Refused(Refusal),
    Sync {
        partition: PartitionId,
        message: Vec<u8>,
    },
    Done {
        received: u32,
    },
    SyncDeflated {
        partition: PartitionId,
        deflated: Vec<u8>,
    },
    Skipped {
        partition: PartitionId,
        refusal: Refusal,
    },
}

/// What can go wrong turning bytes into frames or frames into bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A length prefix (or an outgoing frame) is over the limit.
    #[error(
        "frame of {declared} bytes is over the {MAX_FRAME_BYTES}-byte limit: the peer is broken or hostile; close the stream"
    )]
    TooLarge {
        /// The declared or actual body length.
        declared: usize,
    },
    /// The body is not a postcard-encoded frame of this protocol version.
    #[error(
        "frame of {len} bytes does not decode ({detail}): the peer speaks another version or is broken; close the stream"
    )]
    Malformed {
        /// The body length.
        len: usize,
        /// What postcard reported.
        detail: String,
    },
    /// The body decoded but bytes were left over.
    #[error("frame of {len} bytes has {extra} bytes after its end: close the stream")]
    TrailingBytes {
        /// The body length.
        len: usize,
        /// Bytes left after the frame.
        extra: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error(
        "stream ended inside a frame ({buffered} bytes of it received): the peer or the connection broke; sync again"
    )]
    Truncated {
        /// Bytes of the unfinished frame that had arrived.
        buffered: usize,
    },
    /// `push` was called while complete frames were still waiting in the decoder.
    #[error("bytes pushed before the decoded frames were popped: call pop until it returns None")]
    NotDrained,
    /// An earlier error already ended this stream.
    #[error("the stream already failed; open a new one")]
    Failed,
    /// A frame could not be serialized.
    #[error("frame could not be encoded: {0}")]
    Encode(String),
    /// A length prefix is over the smaller limit this decoder was set to (a hub's limit
    /// before it admits the peer, [`FrameDecoder::set_limit`]).
    #[error(
        "frame of {declared} bytes is over the {limit}-byte limit at this point of the session: the peer is broken or hostile; close the stream"
    )]
    OverLimit {
        /// The declared body length.
        declared: usize,
        /// The decoder's limit when it arrived.
        limit: usize,
    },
}

/// Turns a byte stream, in whatever chunks the socket hands over, into frames.
///
/// Use: `push` each chunk, then `pop` until it returns `Ok(None)`, then push again. Memory
/// stays below one partial frame (at most [`MAX_FRAME_BYTES`] plus the prefix) plus one chunk.
/// After the first error every call fails: a stream that broke framing cannot be resynchronised.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames; compacted on the next push.
    start: usize,
    failed: bool,
    /// A limit below [`MAX_FRAME_BYTES`], if one is set.
    limit: Option<usize>,
}

impl FrameDecoder {
    /// An empty decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty decoder that accepts frame bodies of at most `max` bytes (never more than
    /// [`MAX_FRAME_BYTES`]), so it buffers at most that much plus one chunk.
    pub fn with_limit(max: usize) -> Self {
        let mut d = Self::default();
        d.set_limit(max);
        d
    }

    /// Changes the largest body accepted from the next length prefix on (clamped to
    /// [`MAX_FRAME_BYTES`]): a hub raises it once it has admitted the peer.
    pub fn set_limit(&mut self, max: usize) {
        self.limit = (max < MAX_FRAME_BYTES).then_some(max);
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if self.failed {
            return Err(FrameError::Failed);
        }
        // Refuse to grow while a whole frame sits unread: that is what keeps memory bounded.
        if self.complete_frame_len()?.is_some() {
            return Err(FrameError::NotDrained);
        }
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(bytes);
        // Check the length prefix now, so an oversize frame fails on the chunk that declares it.
        self.complete_frame_len()?;
        Ok(())
    }

    /// The next complete frame, or `None` if more bytes are needed.
    pub fn pop(&mut self) -> Result<Option<Frame>, FrameError> {
        Ok(self.pop_sized()?.map(|(frame, _)| frame))
    }

    /// [`FrameDecoder::pop`] with the frame's size on the wire (length prefix included), for
    /// [`Inbound::read`].
    pub fn pop_sized(&mut self) -> Result<Option<(Frame, usize)>, FrameError> {
        if self.failed {
            return Err(FrameError::Failed);
        }
        let Some(body_len) = self.complete_frame_len()? else {
            return Ok(None);
        };
        let body_start = self.start + LENGTH_PREFIX_BYTES;
        let body = &self.buf[body_start..body_start + body_len];
        match Frame::decode_body(body) {
            Ok(frame) => {
                self.start = body_start + body_len;
                Ok(Some((frame, LENGTH_PREFIX_BYTES + body_len)))
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Call when the stream ends: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.failed {
            return Err(FrameError::Failed);
        }
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(FrameError::Truncated { buffered }),
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The body length of the frame at the front if it is complete; checks the prefix.
    fn complete_frame_len(&mut self) -> Result<Option<usize>, FrameError> {
        let pending = &self.buf[self.start..];
        let Some(prefix) = pending.get(..LENGTH_PREFIX_BYTES) else {
            return Ok(None);
        };
        let mut be = [0u8; LENGTH_PREFIX_BYTES];
        be.copy_from_slice(prefix);
        let declared = usize::try_from(u32::from_be_bytes(be)).unwrap_or(usize::MAX);
        if declared > MAX_FRAME_BYTES {
            self.failed = true;
            return Err(FrameError::TooLarge { declared });
        }
        if let Some(limit) = self.limit
            && declared > limit
        {
            self.failed = true;
            return Err(FrameError::OverLimit { declared, limit });
        }
        if pending.len() - LENGTH_PREFIX_BYTES >= declared {
            Ok(Some(declared))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A received frame counts at its size on the wire, which the sender's DEFLATE decides,
    /// not at the size this side's DEFLATE would give it: `Inbound::read` takes the length
    /// the decoder read, and keeps the message's bytes and what `validate` reads in them.
    #[test]
    fn a_received_frame_counts_at_its_size_on_the_wire() {
        use std::io::Write;
        let partition = PartitionId {
            facility: FacilityId::parse("fac_1").unwrap(),
            day: Day(20_000),
        };
        let message: Vec<u8> = std::iter::once(AUTOMERGE_V1_MESSAGE)
            .chain((0..4000u32).map(|i| (i % 7) as u8))
            .collect();
        let frame = Frame::Sync {
            partition: partition.clone(),
            message: message.clone(),
        };
        // The sender stored its deflate stream rather than compressing it.
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::none());
        e.write_all(&message).unwrap();
        let stored = e.finish().unwrap();
        let body = postcard::to_allocvec(&WireRef::SyncDeflated {
            partition: &partition,
            deflated: std::borrow::Cow::Owned(stored),
        })
        .unwrap();
        let mut bytes = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        bytes.extend(body);
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes).unwrap();
        let (decoded, len) = decoder.pop_sized().unwrap().unwrap();
        assert_eq!(decoded, frame);
        assert_eq!(len, bytes.len());
        assert!(frame.wire_len() < len, "ours would deflate it");

        let inbound = Inbound::read(decoded, len);
        assert_eq!(inbound.wire_len(), bytes.len());
        assert_eq!(inbound.quota_len(), frame.quota_len());
        assert_eq!(inbound.kind(), "Sync");
        assert_eq!(inbound.sync_partition(), Some(&partition));
        // Unknown sizes are this side's estimate, as before.
        assert_eq!(Inbound::from(frame.clone()).wire_len(), frame.wire_len());
        let (p, read) = inbound.into_sync().unwrap();
        assert_eq!(p, partition);
        assert_eq!(read.bytes(), &message[..]);
        assert_eq!(
            read.checked(),
            crate::sync::validate::read_message(&message),
            "what the reader found travels with the bytes"
        );
        // Other frames pass through as they are.
        let done = Inbound::read(Frame::Done { received: 3 }, 7);
        assert_eq!((done.kind(), done.wire_len()), ("Done", 7));
        assert!(done.sync_partition().is_none() && done.into_sync().is_none());
    }

    fn sample() -> Vec<Frame> {
        let facility = FacilityId::parse("fac_1").unwrap();
        let id = PartitionId {
            facility: facility.clone(),
            day: Day(20_000),
        };
        vec![
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                peer: Peer::Device {
                    device: DeviceId::parse("dev_1").unwrap(),
                    facility,
                },
                now: 1_728_000_000,
                horizon: Day(19_972),
                partitions: vec![PeerSummary {
                    id: id.clone(),
                    digest: heads_digest(&[[7; 32]]),
                    records: 3,
                }],
                in_sync: InSync {
                    count: 2,
                    digest: [9; 8],
                },
                push_only: true,
                credential: Some([1; 32]),
                refresh_have: Some(vec![5; 32]),
            }),
            Frame::Sync {
                partition: id,
                message: vec![0x42, 1, 2, 3],
            },
            Frame::Done { received: 300 },
            Frame::Refused(Refusal::new(RefuseReason::Revoked, "revoked on day 3")),
        ]
    }

    #[test]
    fn frames_round_trip_through_any_chunking() {
        let frames = sample();
        let mut wire = Vec::new();
        for f in &frames {
            let bytes = f.encode().unwrap();
            assert_eq!(bytes.len(), f.wire_len());
            wire.extend_from_slice(&bytes);
        }
        for chunk in [1, 2, 3, 7, 64, wire.len()] {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                dec.push(c).unwrap();
                while let Some(f) = dec.pop().unwrap() {
                    got.push(f);
                }
            }
            dec.finish().unwrap();
            assert_eq!(got, frames, "chunk size {chunk}");
        }
    }

    #[test]
    fn oversize_length_fails_before_the_body_arrives() {
        let mut dec = FrameDecoder::new();
        let declared = u32::try_from(MAX_FRAME_BYTES + 1).unwrap();
        let err = dec.push(&declared.to_be_bytes()).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                declared: MAX_FRAME_BYTES + 1
            }
        );
        assert_eq!(dec.pop(), Err(FrameError::Failed));
        assert_eq!(dec.push(&[0]), Err(FrameError::Failed));
    }

    #[test]
    fn a_lowered_limit_refuses_a_larger_prefix_and_a_raised_one_accepts_it() {
        let mut dec = FrameDecoder::with_limit(64);
        assert_eq!(
            dec.push(&65u32.to_be_bytes()),
            Err(FrameError::OverLimit {
                declared: 65,
                limit: 64
            })
        );
        assert_eq!(dec.pop(), Err(FrameError::Failed));

        let bytes = Frame::Refused(Refusal::new(RefuseReason::Internal, &"x".repeat(100)))
            .encode()
            .unwrap();
        let mut dec = FrameDecoder::with_limit(64);
        dec.set_limit(usize::MAX);
        dec.push(&bytes).unwrap();
        assert!(matches!(dec.pop(), Ok(Some(Frame::Refused(_)))));
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(dec.pop(), Err(FrameError::Malformed { .. })));

        let bytes = Frame::Done { received: 1 }.encode().unwrap();
        let mut dec = FrameDecoder::new();
        dec.push(&bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(dec.pop(), Ok(None));
        assert_eq!(
            dec.finish(),
            Err(FrameError::Truncated {
                buffered: bytes.len() - 1
            })
        );

        // A valid frame followed by junk inside the same declared body.
        let mut body = postcard::to_stdvec(&Frame::Done { received: 1 }).unwrap();
        body.push(0);
        let mut wire = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        wire.extend_from_slice(&body);
        let mut dec = FrameDecoder::new();
        dec.push(&wire).unwrap();
        assert!(matches!(dec.pop(), Err(FrameError::TrailingBytes { .. })));
    }

    #[test]
    fn wire_layout_matches_the_protocol_doc() {
        assert_eq!(
            Frame::Done { received: 3 }.encode().unwrap(),
            vec![0, 0, 0, 2, 4, 3]
        );
        let refused = Frame::Refused(Refusal::new(RefuseReason::Internal, "x"));
        assert_eq!(refused.encode().unwrap(), vec![0, 0, 0, 4, 2, 9, 1, b'x']);
        let sync = Frame::Sync {
            partition: PartitionId {
                facility: FacilityId::parse("f").unwrap(),
                day: Day(300),
            },
            message: vec![0x42],
        };
        // index 3, "f", day 300 as a varint (0xac 0x02), one message byte.
        assert_eq!(
            sync.encode().unwrap(),
            vec![0, 0, 0, 7, 3, 1, b'f', 0xac, 0x02, 1, 0x42]
        );
    }

    #[test]
    fn pushing_without_popping_is_refused() {
        let bytes = Frame::Done { received: 1 }.encode().unwrap();
        let mut dec = FrameDecoder::new();
        dec.push(&bytes).unwrap();
        assert_eq!(dec.push(&bytes), Err(FrameError::NotDrained));
        // Not a stream failure: popping still works.
        assert_eq!(dec.pop(), Ok(Some(Frame::Done { received: 1 })));
        dec.push(&bytes).unwrap();
    }

    #[test]
    fn invalid_ids_inside_frames_do_not_decode() {
        let f = Frame::Sync {
            partition: PartitionId {
                facility: FacilityId::parse("fac_1").unwrap(),
                day: Day(1),
            },
            message: vec![],
        };
        let mut body = postcard::to_stdvec(&f).unwrap();
        // Turn "fac_1" into "Fac_1": upper case is not a valid id.
        let pos = body.iter().position(|&b| b == b'f').unwrap();
        body[pos] = b'F';
        assert!(matches!(
            Frame::decode_body(&body),
            Err(FrameError::Malformed { .. })
        ));
    }

    fn pid() -> PartitionId {
        PartitionId {
            facility: FacilityId::parse("fac_1").unwrap(),
            day: Day(20_000),
        }
    }

    #[test]
    fn large_v1_sync_messages_travel_deflated_and_come_back_whole() {
        // A v1 message whose body compresses (hex-like keys repeat): deflated on the wire.
        let mut message = vec![AUTOMERGE_V1_MESSAGE];
        for i in 0..200u32 {
            message.extend_from_slice(format!("r/{i:032x}").as_bytes());
        }
        let frame = Frame::Sync {
            partition: pid(),
            message: message.clone(),
        };
        let bytes = frame.encode().unwrap();
        assert!(
            bytes.len() < message.len() / 2,
            "{} B on the wire",
            bytes.len()
        );
        assert_eq!(frame.wire_len(), bytes.len());
        assert_eq!(bytes[LENGTH_PREFIX_BYTES], 5, "the SyncDeflated tag");
        let mut d = FrameDecoder::new();
        d.push(&bytes).unwrap();
        assert_eq!(d.pop().unwrap(), Some(frame));
        // Short messages, v2 messages (whole compressed documents) and incompressible
        // bytes go as they are.
        for message in [
            vec![AUTOMERGE_V1_MESSAGE; 100],
            vec![0x43; 4_000],
            (0..4_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ] {
            let frame = Frame::Sync {
                partition: pid(),
                message,
            };
            let bytes = frame.encode().unwrap();
            assert_eq!(bytes[LENGTH_PREFIX_BYTES], 3, "the plain Sync tag");
            assert_eq!(
                Frame::decode_body(&bytes[LENGTH_PREFIX_BYTES..]).unwrap(),
                frame
            );
        }
    }

    #[test]
    fn a_deflate_bomb_or_broken_deflate_is_refused() {
        // 17 MiB of zeros deflate to a few KiB: inflating must stop at the frame limit.
        let bomb = deflate(&vec![0u8; MAX_FRAME_BYTES + 1024 * 1024]);
        assert!(bomb.len() < 64 * 1024);
        let body = postcard::to_stdvec(&WireRef::SyncDeflated {
            partition: &pid(),
            deflated: std::borrow::Cow::Borrowed(&bomb),
        })
        .unwrap();
        assert!(matches!(
            Frame::decode_body(&body),
            Err(FrameError::TooLarge { .. })
        ));
        let body = postcard::to_stdvec(&WireRef::SyncDeflated {
            partition: &pid(),
            deflated: std::borrow::Cow::Borrowed(&[0xFF, 0x00, 0x13, 0x37]),
        })
        .unwrap();
        assert!(matches!(
            Frame::decode_body(&body),
            Err(FrameError::Malformed { .. })
        ));
    }
}
