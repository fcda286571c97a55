//! A rogue enrolled device for attack tests: a device admitted through the real binaries
//! whose iroh identity the test takes over, to run a real [`Session`] over a hostile copy of
//! a partition, or to send hand-made frames after a genuine `Hello`.
//!
//! Everything is bounded: each dial and read has a timeout and each session a frame budget,
//! so a hub that misbehaves fails the test instead of hanging it.

use anyhow::{Context, Result, bail};
use iroh::endpoint::{RecvStream, SendStream, presets};
use iroh::{Endpoint, EndpointAddr, SecretKey};
use rand_core::OsRng;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::partition::Partition;
use shared::sync::harness::MemoryStore;
use shared::sync::{
    ALPN, Decision, Event, Frame, FrameDecoder, Hello, PROTOCOL_VERSION, Peer, RefuseReason,
    Session, Side,
};
use shared::time::{Day, horizon};
use shared::{PartitionId, RecordId};
use std::path::Path;
use std::time::Duration;

/// How long a dial may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long the hub may stay silent before the test gives up on it.
const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// The most reads one session may take (a healthy one needs a handful per round).
const MAX_READS: usize = 100_000;

/// How a rogue session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Both sides said done: nothing was refused.
    Finished,
    /// A side refused.
    Refused {
        /// Who refused.
        by: Side,
        /// Why.
        reason: RefuseReason,
        /// The explanation.
        detail: String,
    },
    /// The session ended with an error, or the stream without a refusal.
    Failed(String),
}

/// A device enrolled through the binaries, driven by the test with its own identity.
pub struct Rogue {
    endpoint: Endpoint,
    hub: EndpointAddr,
    /// Who the device is, as it says in its `Hello`.
    pub me: Peer,
    /// Its facility's partition of `day`.
    pub partition: PartitionId,
    /// The enrollment credential its `Hello` presents (`None`: its endpoint is bound).
    credential: Option<[u8; 32]>,
}

impl Rogue {
    /// Takes over the enrolled (and not running) device in `dir`: its endpoint key, device
    /// id and facility; binds an endpoint on `listen` that dials the hub at `sync_port` and,
    /// with `turn_away`, closes every incoming connection at once.
    pub async fn bind(
        dir: &Path,
        hub_dir: &Path,
        sync_port: u16,
        day: Day,
        listen: std::net::SocketAddr,
        turn_away: bool,
    ) -> Result<Rogue> {
        let (key, me, facility) = {
            let device = edge_node::device::Device::open(dir)?;
            let e = device.enrollment();
            let me = Peer::Device {
                device: e.device_id.clone(),
                facility: e.facility.id.clone(),
            };
            (device.endpoint_key()?, me, e.facility.id.clone())
        };
        let endpoint = Endpoint::builder(presets::Minimal)
            .secret_key(SecretKey::from_bytes(&key))
            .alpns(vec![ALPN.to_vec()])
            .clear_ip_transports()
            .bind_addr(listen)?
            .bind()
            .await?;
        // The hub lists this endpoint in its siblings' rosters: turn their dials away at once
        // rather than let each wait out its connect timeout. Ends when the endpoint closes.
        let acceptor = endpoint.clone();
        tokio::spawn(async move {
            if !turn_away {
                return;
            }
            while let Some(incoming) = acceptor.accept().await {
                if let Ok(conn) = incoming.await {
                    conn.close(1u32.into(), b"not serving siblings");
                }
            }
        });
        let hub_id = sync_hub::keys::KeyDir::new(hub_dir)
            .endpoint_secret()?
            .public();
        let hub = EndpointAddr::new(hub_id).with_ip_addr(format!("127.0.0.1:{sync_port}").parse()?);
        Ok(Rogue {
            endpoint,
            hub,
            me,
            partition: PartitionId { facility, day },
            credential: None,
        })
    }

    /// A device enrolled straight in a hub's registry (a ticket's device id, no `edge-node`
    /// folder), on an endpoint of key `secret` on loopback that dials `hub`, presenting the
    /// ticket's `credential` (its first session binds the endpoint; `None` once bound).
    pub async fn with_ticket(
        hub: EndpointAddr,
        me: Peer,
        day: Day,
        secret: SecretKey,
        credential: Option<[u8; 32]>,
    ) -> Result<Rogue> {
        let facility = me
            .facility()
            .cloned()
            .context("a device names its facility")?;
        let endpoint = Endpoint::builder(presets::Minimal)
            .secret_key(secret)
            .alpns(vec![ALPN.to_vec()])
            .clear_ip_transports()
            .bind_addr(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?
            .bind()
            .await?;
        Ok(Rogue {
            endpoint,
            hub,
            me,
            partition: PartitionId { facility, day },
            credential,
        })
    }

    /// A copy of the device's stored partition (what its last honest sync left), writing
    /// as a fresh actor.
    pub fn stored_copy(dir: &Path, day: Day) -> Result<Partition> {
        let mut device = edge_node::device::Device::open(dir)?;
        let p = device.partition(day)?;
        let id = p.id().clone();
        let bytes = p.save();
        Ok(Partition::load(id, &bytes, &rand::random::<[u8; 16]>())?)
    }

    /// A device-side store holding exactly `partition`.
    pub fn store_with(&self, partition: Partition) -> MemoryStore {
        let mut store = MemoryStore::new(&rand::random::<[u8; 16]>(), self.me.facility().cloned());
        store.insert(partition);
        store
    }

    async fn connect(&self) -> Result<(iroh::endpoint::Connection, SendStream, RecvStream)> {
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.endpoint.connect(self.hub.clone(), ALPN),
        )
        .await
        .context("the hub did not answer the dial")??;
        let (send, recv) = conn.open_bi().await?;
        Ok((conn, send, recv))
    }

    /// Runs a real initiator session over `store` against the hub, moving frames as
    /// `edge-node`'s shell does (but persisting nothing), until it ends.
    pub async fn sync(&self, store: &mut MemoryStore, now: u64) -> Result<Ending> {
        let (conn, send, recv) = self.connect().await?;
        let session = Session::initiator_to(
            now,
            self.me.clone(),
            None,
            self.credential,
            None,
            true,
            store,
        )?;
        drive(conn, send, recv, session, store, now).await
    }

    /// Like [`Rogue::sync`], asking to download the hub's copy too (not push-only).
    pub async fn pull(&self, store: &mut MemoryStore, now: u64) -> Result<Ending> {
        let (conn, send, recv) = self.connect().await?;
        let session = Session::initiator(now, self.me.clone(), None, store)?;
        drive(conn, send, recv, session, store, now).await
    }

    /// Serves one sibling's session as the responder over `store`, admitting any device of
    /// the facility: the rogue as a relay. Only on an endpoint bound without `turn_away`.
    pub async fn serve_one(&self, store: &mut MemoryStore, now: u64) -> Result<Ending> {
        self.serve_one_with(store, now, None).await
    }

    /// Like [`Rogue::serve_one`], its welcome carrying `refresh` (what a sibling's welcome
    /// may carry: a hostile copy of the revocation list).
    pub async fn serve_one_with(
        &self,
        store: &mut MemoryStore,
        now: u64,
        refresh: Option<Vec<u8>>,
    ) -> Result<Ending> {
        let incoming = tokio::time::timeout(READ_TIMEOUT, self.endpoint.accept())
            .await
            .context("no sibling dialled")?
            .context("the endpoint closed")?;
        let conn = incoming.await?;
        let (send, recv) = tokio::time::timeout(READ_TIMEOUT, conn.accept_bi())
            .await
            .context("the sibling opened no stream")??;
        let session = Session::responder(self.me.clone());
        drive_with(conn, send, recv, session, store, now, refresh).await
    }
}

/// Moves frames between `session` and the stream as `edge-node`'s shell does (persisting
/// nothing; a sibling's hello is admitted) until the session ends.
async fn drive(
    conn: iroh::endpoint::Connection,
    send: SendStream,
    recv: RecvStream,
    session: Session,
    store: &mut MemoryStore,
    now: u64,
) -> Result<Ending> {
    drive_with(conn, send, recv, session, store, now, None).await
}

/// [`drive`], a sibling's hello admitted with `refresh` in the welcome.
async fn drive_with(
    conn: iroh::endpoint::Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    mut session: Session,
    store: &mut MemoryStore,
    now: u64,
    refresh: Option<Vec<u8>>,
) -> Result<Ending> {
    {
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut ending = None;
        for _ in 0..MAX_READS {
            let mut progressed = true;
            while progressed {
                progressed = false;
                while let Some(frame) = session.poll_transmit() {
                    progressed = true;
                    // The hub may already have hung up after refusing: that is an ending too.
                    if send.write_all(&frame.encode()?).await.is_err() {
                        break;
                    }
                }
                while let Some(event) = session.poll_event() {
                    progressed = true;
                    match event {
                        Event::Refused { by, reason, detail } => {
                            ending = Some(Ending::Refused { by, reason, detail })
                        }
                        Event::Failed(e) => ending = Some(Ending::Failed(e.to_string())),
                        // The hub refuses one partition and the session goes on: the
                        // refusal is the ending that matters.
                        Event::PartitionRefused {
                            by, reason, detail, ..
                        } => ending = Some(Ending::Refused { by, reason, detail }),
                        Event::Finished(_) => {
                            ending.get_or_insert(Ending::Finished);
                        }
                        Event::PeerHello(hello) => {
                            let decision = match hello.peer.facility() {
                                Some(f) => Decision::Admit {
                                    facility: f.clone(),
                                    refresh: refresh.clone(),
                                },
                                None => Decision::Refuse {
                                    reason: RefuseReason::WrongFacility,
                                    detail: "devices only".into(),
                                },
                            };
                            session.admit(now, decision, store);
                        }
                        _ => {}
                    }
                }
            }
            if session.is_finished() {
                let _ = send.finish();
                conn.close(0u32.into(), b"done");
                return ending.context("the session finished without an ending event");
            }
            let n = tokio::time::timeout(READ_TIMEOUT, recv.read(&mut buf))
                .await
                .context("the hub went silent")?;
            match n {
                Ok(Some(n)) => {
                    if let Err(e) = decoder.push(&buf[..n]) {
                        session.handle_malformed(e);
                        continue;
                    }
                    loop {
                        match decoder.pop() {
                            Ok(Some(frame)) => session.handle_frame(now, frame, store),
                            Ok(None) => break,
                            Err(e) => {
                                session.handle_malformed(e);
                                break;
                            }
                        }
                    }
                }
                Ok(None) => session.handle_closed(),
                Err(e) => {
                    // A reset stream after a refusal already read ends the session as refused.
                    conn.close(0u32.into(), b"done");
                    return Ok(ending.unwrap_or(Ending::Failed(e.to_string())));
                }
            }
        }
        bail!("the session did not end within {MAX_READS} reads")
    }
}

impl Rogue {
    /// Says a genuine `Hello` (listing nothing), waits for the `Welcome`, then sends `raw`
    /// (length prefixes included) as it is; returns the hub's refusal (its other frames are
    /// skipped).
    pub async fn send_raw(&self, raw: &[u8], now: u64) -> Result<Ending> {
        let (conn, mut send, mut recv) = self.connect().await?;
        let hello = Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            peer: self.me.clone(),
            now,
            horizon: horizon(now),
            partitions: Vec::new(),
            in_sync: Default::default(),
            push_only: true,
            credential: None,
            refresh_have: None,
        });
        send.write_all(&hello.encode()?).await?;
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut welcomed = false;
        for _ in 0..MAX_READS {
            let n = tokio::time::timeout(READ_TIMEOUT, recv.read(&mut buf))
                .await
                .context("the hub went silent")?;
            let Ok(Some(n)) = n else {
                conn.close(0u32.into(), b"done");
                return Ok(Ending::Failed(format!("the stream ended: {n:?}")));
            };
            decoder.push(&buf[..n])?;
            while let Some(got) = decoder.pop()? {
                match got {
                    Frame::Welcome(_) if !welcomed => {
                        welcomed = true;
                        // The hub stops reading after refusing: a failed write is expected.
                        let _ = send.write_all(raw).await;
                    }
                    // The hub refuses the session, or only the partition (it would then go
                    // on with others): either is the hub's answer to the raw frame.
                    Frame::Refused(r) | Frame::Skipped { refusal: r, .. } => {
                        conn.close(0u32.into(), b"done");
                        return Ok(Ending::Refused {
                            by: Side::Peer,
                            reason: r.reason,
                            detail: r.detail,
                        });
                    }
                    _ => {}
                }
            }
        }
        bail!("no refusal within {MAX_READS} reads")
    }

    /// Aims the rogue's dials at `peer` (a sibling device) instead of the hub.
    pub fn retarget(&mut self, peer: EndpointAddr) {
        self.hub = peer;
    }

    /// The endpoint id (the enrolled device's).
    pub fn id(&self) -> iroh::PublicKey {
        self.endpoint.id()
    }

    /// Closes the endpoint.
    pub async fn close(self) {
        self.endpoint.close().await;
    }
}

/// Adds `n` valid visits to `partition`, each as its own one-operation change, sealed under a
/// fresh session key wrapped to the hub's day key (read from `hub_dir`), as device `me`.
pub fn add_single_record_changes(
    partition: &mut Partition,
    hub_dir: &Path,
    me: &Peer,
    now: u64,
    n: usize,
) -> Result<Vec<[u8; 16]>> {
    let Peer::Device { device, .. } = me else {
        bail!("a rogue is a device");
    };
    let id = partition.id().clone();
    let public = sync_hub::keys::KeyDir::new(hub_dir)
        .ratchet()?
        .public(id.day)
        .context("the hub has no key for today")?;
    let key = SessionKey::generate(&mut OsRng, id.day);
    partition.insert_wrapped_key(&key.wrap(&public)?)?;
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        let token: [u8; 16] = rand::random();
        let record = Record {
            facility: id.facility.clone(),
            device: device.clone(),
            scanned_at: now,
            body: RecordBody::Qr {
                issuer_id: 1,
                key_id: 1,
                issued_at: now,
                token,
            },
        };
        let record_id = RecordId::random(&mut OsRng);
        let envelope = key.seal(&mut OsRng, &id, record_id, &record)?;
        partition.insert_record(record_id, &envelope)?;
        tokens.push(token);
    }
    Ok(tokens)
}

/// A `SyncDeflated` frame (wire variant 5) for `partition` carrying `deflated` as it is,
/// length prefix included: the frame layer inflates it before any validator sees it.
pub fn sync_deflated_frame(partition: &PartitionId, deflated: &[u8]) -> Result<Vec<u8>> {
    let mut body = vec![5];
    let facility = partition.facility.as_str().as_bytes();
    leb(&mut body, facility.len() as u64);
    body.extend_from_slice(facility);
    leb(&mut body, u64::from(partition.day.0));
    leb(&mut body, deflated.len() as u64);
    body.extend_from_slice(deflated);
    let mut out = u32::try_from(body.len())?.to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// automerge's chunk magic bytes.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// A v1 sync message whose only change is a compressed change chunk (type 2) holding
/// `deflated` as its body: automerge would inflate it without a bound.
pub fn compressed_chunk_message(deflated: &[u8]) -> Vec<u8> {
    let mut chunk = MAGIC.to_vec();
    chunk.extend_from_slice(&[0; 4]);
    chunk.push(2);
    leb(&mut chunk, deflated.len() as u64);
    chunk.extend_from_slice(deflated);
    // type, no heads, no need, no haves, one change entry, no flags.
    let mut m = vec![0x42, 0, 0, 0, 1];
    leb(&mut m, chunk.len() as u64);
    m.extend_from_slice(&chunk);
    m
}

fn leb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}
