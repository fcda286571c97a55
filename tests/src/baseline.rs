//! The designs a user might pick instead of ours, run on the same records so that benchmarks
//! can print them side by side with our sync:
//!
//! - [`post_per_visit`]: the naive online design of the original scanners, one JSON HTTP/1.1
//!   POST per visit to a sink on loopback, counting every byte each client writes on and
//!   reads from its TCP socket;
//! - [`single_document`]: the whole regional log in one automerge document without
//!   partitions, one change per check-in, synced with automerge's own sync protocol.
//!
//! Both are lower bounds for their design, on purpose (the comparison is fair to them, not to
//! us): plain TCP without TLS, one reused connection per client, no TCP/IP headers counted;
//! the automerge document in memory, starting empty, no persistence and no network.

use anyhow::{Context, Result, bail};
use automerge::sync::{Message, State, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ROOT, ReadDoc, ScalarValue};
use shared::envelope::{Envelope, WrappedKey};
use shared::{PartitionId, RecordId};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One visit as the naive design's scanner posts it.
#[derive(Debug, Clone)]
pub struct Visit {
    /// The facility's id.
    pub facility: String,
    /// The device's id.
    pub device: String,
    /// When the code was scanned (Unix seconds).
    pub scanned_at: u64,
    /// The visitor's one-time token (posted as 32 hex characters).
    pub token: [u8; 16],
}

/// What the naive design's clients put on and read from their sockets.
#[derive(Debug, Clone)]
pub struct PostFigures {
    /// Concurrent clients (one connection each).
    pub clients: usize,
    /// Requests answered.
    pub requests: usize,
    /// Bytes the clients wrote: request lines, headers, bodies.
    pub sent: u64,
    /// Bytes the clients read: the sink's responses.
    pub received: u64,
    /// From the moment every client was ready to start until the last one had its last answer.
    pub elapsed: Duration,
}

/// How long a client or the sink waits for the other side's next bytes.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the sink waits for all clients to connect.
const ACCEPT_DEADLINE: Duration = Duration::from_secs(60);
/// Stack of each client and connection thread: they only format and copy a few hundred bytes.
const THREAD_STACK: usize = 256 * 1024;

/// The request the naive design sends for one visit, byte-exact as ureq 3 sends it by
/// default (built by hand: no HTTP client dependency, and every byte known).
pub fn visit_request(host: SocketAddr, visit: &Visit) -> String {
    let body = serde_json::json!({
        "facility": visit.facility,
        "device": visit.device,
        "scanned_at": visit.scanned_at,
        "token": hex::encode(visit.token),
    })
    .to_string();
    format!(
        "POST /visits HTTP/1.1\r\nhost: {host}\r\nuser-agent: ureq/3.5.2\r\naccept: */*\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The sink's response to every request: 200 with an empty body.
pub const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

/// Each element of `clients` is one scanner's visits: every scanner opens one keep-alive
/// HTTP/1.1 connection to a sink on loopback and posts its visits one by one, each waiting for
/// its answer; all scanners start at once (a storm of the naive design). Fails unless the sink
/// read exactly the bytes and requests the clients sent.
pub fn post_per_visit(clients: &[Vec<Visit>]) -> Result<PostFigures> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = Sink::start(listener, clients.len())?;
    let ready = Arc::new(Barrier::new(clients.len() + 1));
    let mut handles = Vec::with_capacity(clients.len());
    for (i, visits) in clients.iter().enumerate() {
        let requests: Vec<String> = visits.iter().map(|v| visit_request(addr, v)).collect();
        let ready = Arc::clone(&ready);
        let handle = std::thread::Builder::new()
            .name(format!("post-{i}"))
            .stack_size(THREAD_STACK)
            .spawn(move || post_all(addr, &requests, &ready))
            .context("cannot start a client thread")?;
        handles.push(handle);
    }
    // Every client has formatted its requests; the clock starts when all are released.
    ready.wait();
    let started = Instant::now();
    let (mut sent, mut received, mut requests) = (0u64, 0u64, 0usize);
    let mut failures = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok((s, r, n))) => {
                sent += s;
                received += r;
                requests += n;
            }
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push("a client thread panicked".into()),
        }
    }
    let elapsed = started.elapsed();
    let (sink_read, sink_requests) = sink.finish()?;
    if let Some(first) = failures.first() {
        bail!(
            "{} of {} clients failed: {first}",
            failures.len(),
            clients.len()
        );
    }
    let expected: usize = clients.iter().map(Vec::len).sum();
    if sink_read != sent || sink_requests != expected || requests != expected {
        bail!(
            "the sink read {sink_read} bytes in {sink_requests} requests; the clients sent {sent} in {requests} of {expected}"
        );
    }
    Ok(PostFigures {
        clients: clients.len(),
        requests,
        sent,
        received,
        elapsed,
    })
}

/// One client: connects when released, posts every request, reads every answer; returns bytes
/// sent, bytes received and requests answered.
fn post_all(addr: SocketAddr, requests: &[String], ready: &Barrier) -> Result<(u64, u64, usize)> {
    ready.wait();
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let (mut sent, mut received) = (0u64, 0u64);
    for request in requests {
        writer.write_all(request.as_bytes())?;
        sent += request.len() as u64;
        received += read_response(&mut reader)?;
    }
    Ok((sent, received, requests.len()))
}

/// Reads one response of the sink (headers only: its body is empty); returns its size.
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<u64> {
    let mut n = 0u64;
    loop {
        let mut line = String::new();
        let got = reader.read_line(&mut line)?;
        if got == 0 {
            bail!("the sink closed the connection mid-response");
        }
        n += got as u64;
        if line == "\r\n" {
            return Ok(n);
        }
    }
}

/// An HTTP sink on loopback: accepts a fixed number of connections and answers every POST on
/// each until its client closes it.
struct Sink {
    accept: JoinHandle<Result<(u64, usize)>>,
}

impl Sink {
    fn start(listener: TcpListener, connections: usize) -> Result<Sink> {
        let accept = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || accept_all(listener, connections))
            .context("cannot start the sink")?;
        Ok(Sink { accept })
    }

    /// Waits for every connection to end; returns the bytes and requests read in all.
    fn finish(self) -> Result<(u64, usize)> {
        self.accept
            .join()
            .map_err(|_| anyhow::anyhow!("the HTTP sink panicked"))?
    }
}

fn accept_all(listener: TcpListener, connections: usize) -> Result<(u64, usize)> {
    // Non-blocking accept polled against a deadline: a client that never connects must not
    // hold the sink forever.
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + ACCEPT_DEADLINE;
    let mut handlers = Vec::with_capacity(connections);
    while handlers.len() < connections {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                let handler = std::thread::Builder::new()
                    .name("sink-conn".into())
                    .stack_size(THREAD_STACK)
                    .spawn(move || serve(stream))
                    .context("cannot start a sink thread")?;
                handlers.push(handler);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!(
                        "only {} of {connections} clients connected within {ACCEPT_DEADLINE:?}",
                        handlers.len()
                    );
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (mut read, mut requests) = (0u64, 0usize);
    for h in handlers {
        let (r, n) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a sink thread panicked"))??;
        read += r;
        requests += n;
    }
    Ok((read, requests))
}

/// Answers POSTs on one connection until the client closes it between requests; returns the
/// bytes and requests read.
fn serve(stream: TcpStream) -> Result<(u64, usize)> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let (mut read, mut requests) = (0u64, 0usize);
    loop {
        let mut length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            let got = reader.read_line(&mut line)?;
            if got == 0 {
                if first {
                    return Ok((read, requests));
                }
                bail!("the client closed the connection mid-request");
            }
            first = false;
            read += got as u64;
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().context("bad content-length")?;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        read += length as u64;
        requests += 1;
        out.write_all(RESPONSE)?;
    }
}

/// One check-in as a device made it durable: a sealed record, preceded by the wrapped session
/// key when the check-in opened a new session (the device writes both in one transaction).
#[derive(Debug, Clone)]
pub struct CheckInEntry {
    /// The partition our design files it under (facility and UTC day).
    pub partition: PartitionId,
    /// The wrapped key of the session this check-in opened, if it opened one.
    pub new_key: Option<WrappedKey>,
    /// The record's id.
    pub record: RecordId,
    /// The sealed record.
    pub envelope: Envelope,
}

/// One device's check-ins, in the order it made them.
#[derive(Debug, Clone)]
pub struct DeviceLog {
    /// 16 bytes naming the device's automerge actor.
    pub actor: [u8; 16],
    /// Its check-ins.
    pub check_ins: Vec<CheckInEntry>,
}

/// What syncing every device's copy of the single regional document with the hub's cost.
#[derive(Debug, Clone)]
pub struct DocFigures {
    /// Today's records the devices synced.
    pub records: usize,
    /// Records the hub's copy holds afterwards (history included).
    pub hub_records: usize,
    /// Encoded sync messages, devices to hub.
    pub sent: u64,
    /// Encoded sync messages, hub to devices.
    pub received: u64,
    /// Messages both ways.
    pub messages: u64,
    /// Rounds until every session was quiescent.
    pub rounds: usize,
    /// Wall time of the sync (making the day's check-ins and the earlier history is not
    /// counted).
    pub elapsed: Duration,
}

/// Rounds of messages after which a session that is still talking counts as stuck.
const MAX_ROUNDS: usize = 64;

/// The root-map key of a record in the single document. Without partitions the key must say
/// which facility and day a record belongs to: the envelope is sealed with the partition as
/// associated data, so the hub cannot open it without them.
fn record_key(partition: &PartitionId, record: RecordId) -> String {
    format!("{partition}/r/{record}")
}

fn wrapped_key_key(partition: &PartitionId, key: &WrappedKey) -> String {
    format!("{partition}/k/{}", key.session)
}

/// Makes each check-in one automerge change, as a naive CRDT design does.
fn check_in_all(doc: &mut Automerge, check_ins: &[CheckInEntry]) -> Result<()> {
    for c in check_ins {
        doc.transact(|tx| {
            if let Some(k) = &c.new_key {
                tx.put(
                    ROOT,
                    wrapped_key_key(&c.partition, k),
                    ScalarValue::Bytes(k.to_bytes()),
                )?;
            }
            tx.put(
                ROOT,
                record_key(&c.partition, c.record),
                ScalarValue::Bytes(c.envelope.to_bytes()),
            )
        })
        .map_err(|f| anyhow::anyhow!("a check-in change failed: {}", f.error))?;
    }
    Ok(())
}

/// `check_ins` moved `days_back` days earlier under fresh record ids: a device's earlier
/// history, of the same size as its day.
fn history(check_ins: &[CheckInEntry], days_back: u32) -> Vec<CheckInEntry> {
    let mut rng = rand::thread_rng();
    check_ins
        .iter()
        .map(|c| CheckInEntry {
            partition: PartitionId {
                facility: c.partition.facility.clone(),
                day: shared::time::Day(c.partition.day.0.saturating_sub(days_back)),
            },
            new_key: c.new_key.clone(),
            record: RecordId::random(&mut rng),
            envelope: c.envelope.clone(),
        })
        .collect()
}

/// Bytes and messages of a group of sessions.
#[derive(Default)]
struct Traffic {
    sent: u64,
    received: u64,
    messages: u64,
    rounds: usize,
}

/// Runs every device's session with the hub at once, interleaved message by message (one
/// message each way per session per round), until every session is quiescent. Every message
/// is encoded, counted, and decoded by its receiver.
fn sync_all(
    docs: &mut [Automerge],
    hub: &mut Automerge,
    device_states: &mut [State],
    hub_states: &mut [State],
) -> Result<Traffic> {
    let mut t = Traffic::default();
    let mut active: Vec<bool> = vec![true; docs.len()];
    while active.iter().any(|a| *a) {
        if t.rounds == MAX_ROUNDS {
            bail!("sessions still talking after {MAX_ROUNDS} rounds");
        }
        t.rounds += 1;
        for i in 0..docs.len() {
            if !active[i] {
                continue;
            }
            let up = docs[i].generate_sync_message(&mut device_states[i]);
            let up_some = up.is_some();
            if let Some(m) = up {
                let bytes = m.encode();
                t.sent += bytes.len() as u64;
                t.messages += 1;
                hub.receive_sync_message(&mut hub_states[i], Message::decode(&bytes)?)?;
            }
            let down = hub.generate_sync_message(&mut hub_states[i]);
            let down_some = down.is_some();
            if let Some(m) = down {
                let bytes = m.encode();
                t.received += bytes.len() as u64;
                t.messages += 1;
                docs[i].receive_sync_message(&mut device_states[i], Message::decode(&bytes)?)?;
            }
            if !up_some && !down_some {
                active[i] = false;
            }
        }
    }
    Ok(t)
}

/// The whole regional log as one automerge document without partitions, synced with
/// automerge's sync protocol from every device's copy to the hub's copy, in memory.
///
/// The model, as a user would build it:
///
/// - One change per check-in (a record put into the root map; a check-in that opened a
///   session also puts its wrapped key, in the same change).
/// - Each device's copy holds only its own changes: it syncs with a read-only `sync::State`
///   (automerge 0.12), pushing its changes and asking for none, so the hub does not send it
///   the region's other visits. With a plain state every kiosk would download and store the
///   whole region's log.
/// - Without partitions there is one document for all days, so a device's copy also holds
///   its earlier days: `history_days` days of the same size as today, synced to the hub
///   before the outage (not measured), the sync states persisted then (`State::encode`) and
///   reloaded for the storm, as our design persists its own. How many days matters little,
///   as long as today's changes are under a third of the device's copy (two days or more);
///   otherwise automerge sends the whole document instead of the missing changes.
/// - All devices' sessions run at once, interleaved message by message.
///
/// Fails unless the hub ends with every record.
pub fn single_document(
    devices: &[DeviceLog],
    hub_actor: [u8; 16],
    history_days: u32,
) -> Result<DocFigures> {
    let mut hub = Automerge::new().with_actor(ActorId::from(hub_actor.as_slice()));
    let mut docs = Vec::with_capacity(devices.len());
    for log in devices {
        let mut doc = Automerge::new().with_actor(ActorId::from(log.actor.as_slice()));
        for back in (1..=history_days).rev() {
            check_in_all(&mut doc, &history(&log.check_ins, back))?;
        }
        docs.push(doc);
    }
    let mut device_states: Vec<State> = devices.iter().map(|_| State::new_read_only()).collect();
    let mut hub_states: Vec<State> = devices.iter().map(|_| State::new()).collect();
    sync_all(&mut docs, &mut hub, &mut device_states, &mut hub_states)?;
    // The outage: connections gone, sync states persisted and reloaded.
    let reload = |s: &State| State::decode(&s.encode());
    let mut device_states = device_states
        .iter()
        .map(|s| {
            reload(s).map(|mut s| {
                s.set_read_only(true);
                s
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut hub_states = hub_states
        .iter()
        .map(reload)
        .collect::<Result<Vec<_>, _>>()?;

    let mut records = 0;
    for (doc, log) in docs.iter_mut().zip(devices) {
        check_in_all(doc, &log.check_ins)?;
        records += log.check_ins.len();
    }
    let started = Instant::now();
    let t = sync_all(&mut docs, &mut hub, &mut device_states, &mut hub_states)?;
    let elapsed = started.elapsed();
    let hub_records = hub.keys(ROOT).filter(|k| k.contains("/r/")).count();
    let expected = records * (history_days as usize + 1);
    if hub_records != expected {
        bail!("the hub's document holds {hub_records} records, not {expected}");
    }
    Ok(DocFigures {
        records,
        hub_records,
        sent: t.sent,
        received: t.received,
        messages: t.messages,
        rounds: t.rounds,
        elapsed,
    })
}
