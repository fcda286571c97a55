//! The designs a user might pick instead of ours, run on the same records so that benchmarks
//! can print them side by side with our sync:
//!
//! - [`post_per_visit`]: the naive online design of the original scanners, one JSON HTTP/1.1
//!   POST per visit to a sink on loopback, counting every byte each client writes on and
//!   reads from its TCP socket, over one of three [`Transport`]s: plain HTTP on one reused
//!   connection per scanner, HTTPS on one reused connection per scanner, or HTTPS with a new
//!   connection per visit (TLS 1.3 session resumption on);
//! - [`single_document`]: the whole regional log in one automerge document without
//!   partitions, one change per check-in, synced with automerge's own sync protocol.
//!
//! Each is a lower bound for its design, on purpose (the comparison is fair to them, not to
//! us): no TCP/IP headers counted; the HTTPS sink's certificate is a single 477-byte ECDSA
//! P-256 leaf (a public site sends a chain of two or three, 2-5 KB); the automerge document in
//! memory, starting empty, no persistence and no network.

use anyhow::{Context, Result, bail};
use automerge::sync::{Message, State, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ROOT, ReadDoc, ScalarValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};
use shared::envelope::{Envelope, WrappedKey};
use shared::{PartitionId, RecordId};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// How the naive design's scanners reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP/1.1 on one keep-alive connection per scanner. No deployed scanner sent
    /// personal data in clear; this is the floor of the naive design's bytes.
    Plain,
    /// HTTPS (TLS 1.3) on one keep-alive connection per scanner, held open for its whole
    /// backlog: one handshake per scanner.
    TlsKeepAlive,
    /// HTTPS with a new connection per visit, as an online scanner posts when each visitor
    /// arrives, minutes apart, long after the previous connection went idle and was closed.
    /// Each scanner keeps its TLS 1.3 session tickets, so all but its first connection resume
    /// without a certificate.
    TlsPerVisit,
}

impl Transport {
    /// A short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Plain => "HTTP, one reused connection per scanner",
            Transport::TlsKeepAlive => "HTTPS, one reused connection per scanner",
            Transport::TlsPerVisit => "HTTPS, a connection per visit (resumed)",
        }
    }
}

/// What the naive design's clients put on and read from their sockets.
#[derive(Debug, Clone)]
pub struct PostFigures {
    /// How the clients reached the sink.
    pub transport: Transport,
    /// Concurrent clients.
    pub clients: usize,
    /// TCP connections made in all.
    pub connections: usize,
    /// Requests answered.
    pub requests: usize,
    /// Bytes the clients wrote on their TCP sockets: request lines, headers, bodies, and with
    /// TLS the handshakes, record framing and closing alerts.
    pub sent: u64,
    /// Bytes the clients read from their TCP sockets.
    pub received: u64,
    /// From the moment every client was ready to start until the last one had its last answer.
    pub elapsed: Duration,
}

/// How long a client or the sink waits for the other side's next bytes.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the sink waits for the next connection before it gives up on the missing ones.
const ACCEPT_IDLE: Duration = Duration::from_secs(60);
/// Stack of each client and connection thread: they only format and copy a few hundred bytes.
/// TLS handshakes need more than plain copies.
const THREAD_STACK: usize = 512 * 1024;

/// The sink's certificate (ECDSA P-256, for `localhost` and 127.0.0.1, CA:FALSE), issued by
/// [`BENCH_ROOT_PEM`]. Made once with openssl for this benchmark: loopback only, the key is
/// public on purpose (`tests/assets/bench-tls/README.md`).
const SERVER_CERT_PEM: &[u8] = include_bytes!("../assets/bench-tls/server.pem");
const SERVER_KEY_PEM: &[u8] = include_bytes!("../assets/bench-tls/server.key");
const BENCH_ROOT_PEM: &[u8] = include_bytes!("../assets/bench-tls/ca.pem");

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

/// TLS settings of both ends, built once per run.
struct Tls {
    server: Arc<ServerConfig>,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Tls {
    fn new() -> Result<Tls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(SERVER_CERT_PEM)
            .collect::<Result<Vec<_>, _>>()
            .context("the bench certificate does not parse")?;
        let key = PrivateKeyDer::from_pem_slice(SERVER_KEY_PEM)
            .context("the bench key does not parse")?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        // Stateless tickets, as public web servers issue them: any scanner can resume.
        server.ticketer = rustls::crypto::ring::Ticketer::new()?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(BENCH_ROOT_PEM) {
            roots.add(cert.context("the bench root does not parse")?)?;
        }
        Ok(Tls {
            server: Arc::new(server),
            roots: Arc::new(roots),
            provider,
        })
    }

    /// One scanner's client settings: its own session-ticket store, as each device has.
    fn client(&self) -> Result<Arc<ClientConfig>> {
        Ok(Arc::new(
            ClientConfig::builder_with_provider(Arc::clone(&self.provider))
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(Arc::clone(&self.roots))
                .with_no_client_auth(),
        ))
    }
}

/// A TCP stream that counts the bytes read from and written to it.
struct Counted {
    stream: TcpStream,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl Counted {
    fn new(stream: TcpStream) -> Counted {
        Counted {
            stream,
            read: Arc::new(AtomicU64::new(0)),
            written: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.stream.write(buf)?;
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Each element of `clients` is one scanner's visits: every scanner connects to a sink on
/// loopback over `transport` and posts its visits one by one, each waiting for its answer;
/// all scanners start at once (a storm of the naive design). Fails unless the sink read
/// exactly the bytes, connections and requests the clients sent.
pub fn post_per_visit(clients: &[Vec<Visit>], transport: Transport) -> Result<PostFigures> {
    let tls = match transport {
        Transport::Plain => None,
        Transport::TlsKeepAlive | Transport::TlsPerVisit => Some(Tls::new()?),
    };
    let expected: usize = clients.iter().map(Vec::len).sum();
    let connections = match transport {
        Transport::TlsPerVisit => expected,
        Transport::Plain | Transport::TlsKeepAlive => clients.len(),
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = Sink::start(
        listener,
        connections,
        tls.as_ref().map(|t| Arc::clone(&t.server)),
    )?;
    let ready = Arc::new(Barrier::new(clients.len() + 1));
    let mut handles = Vec::with_capacity(clients.len());
    for (i, visits) in clients.iter().enumerate() {
        let requests: Vec<String> = visits.iter().map(|v| visit_request(addr, v)).collect();
        let ready = Arc::clone(&ready);
        let client = tls.as_ref().map(Tls::client).transpose()?;
        let handle = std::thread::Builder::new()
            .name(format!("post-{i}"))
            .stack_size(THREAD_STACK)
            .spawn(move || {
                ready.wait();
                match client {
                    None => post_all(addr, &requests),
                    Some(config) => post_all_tls(
                        addr,
                        &requests,
                        &config,
                        transport == Transport::TlsPerVisit,
                    ),
                }
            })
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
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push("a client thread panicked".into()),
        }
    }
    let elapsed = started.elapsed();
    if let Some(first) = failures.first() {
        bail!(
            "{} of {} clients failed: {first}",
            failures.len(),
            clients.len()
        );
    }
    let tally = sink.finish()?;
    if tally.read != sent
        || tally.written != received
        || tally.requests != expected
        || requests != expected
    {
        bail!(
            "the sink read {} bytes and wrote {} in {} requests; the clients sent {sent}, read {received} in {requests} of {expected}",
            tally.read,
            tally.written,
            tally.requests
        );
    }
    Ok(PostFigures {
        transport,
        clients: clients.len(),
        connections,
        requests,
        sent,
        received,
        elapsed,
    })
}

/// One plain-HTTP client: connects, posts every request on that connection, reads every
/// answer; returns bytes sent, bytes received and requests answered.
fn post_all(addr: SocketAddr, requests: &[String]) -> Result<(u64, u64, usize)> {
    let stream = connect(addr)?;
    let counted = Counted::new(stream.try_clone()?);
    let (read, written) = (Arc::clone(&counted.read), Arc::clone(&counted.written));
    let mut reader = BufReader::new(counted);
    for request in requests {
        reader.get_mut().write_all(request.as_bytes())?;
        read_response(&mut reader)?;
    }
    drop(reader);
    stream.shutdown(std::net::Shutdown::Both).ok();
    Ok((
        written.load(Ordering::Relaxed),
        read.load(Ordering::Relaxed),
        requests.len(),
    ))
}

/// One HTTPS client: posts every request on one connection, or on a new connection each
/// (`per_visit`), closing each connection with a TLS close_notify; returns bytes sent, bytes
/// received and requests answered.
fn post_all_tls(
    addr: SocketAddr,
    requests: &[String],
    config: &Arc<ClientConfig>,
    per_visit: bool,
) -> Result<(u64, u64, usize)> {
    let (mut sent, mut received) = (0u64, 0u64);
    let batches: Vec<&[String]> = if per_visit {
        requests.chunks(1).collect()
    } else {
        vec![requests]
    };
    for batch in batches {
        let server = ServerName::try_from("localhost")?.to_owned();
        let conn = ClientConnection::new(Arc::clone(config), server)?;
        let counted = Counted::new(connect(addr)?);
        let (read, written) = (Arc::clone(&counted.read), Arc::clone(&counted.written));
        let mut reader = BufReader::new(StreamOwned::new(conn, counted));
        for request in batch {
            reader.get_mut().write_all(request.as_bytes())?;
            reader.get_mut().flush()?;
            read_response(&mut reader)?;
        }
        let tls = reader.get_mut();
        tls.conn.send_close_notify();
        tls.flush()?;
        tls.sock.stream.shutdown(std::net::Shutdown::Write).ok();
        // Wait for the sink to close its side, so that every byte it wrote is counted here.
        let mut rest = Vec::new();
        tls.sock.read_to_end(&mut rest)?;
        sent += written.load(Ordering::Relaxed);
        received += read.load(Ordering::Relaxed);
    }
    Ok((sent, received, requests.len()))
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads one response of the sink (headers only: its body is empty).
fn read_response(reader: &mut impl BufRead) -> Result<()> {
    loop {
        let mut line = String::new();
        let got = reader.read_line(&mut line)?;
        if got == 0 {
            bail!("the sink closed the connection mid-response");
        }
        if line == "\r\n" {
            return Ok(());
        }
    }
}

/// What the sink read and wrote on all its sockets.
#[derive(Default)]
struct Tally {
    read: u64,
    written: u64,
    requests: usize,
}

/// An HTTP(S) sink on loopback: accepts a fixed number of connections and answers every POST
/// on each until its client closes it.
struct Sink {
    accept: JoinHandle<Result<Tally>>,
}

impl Sink {
    fn start(
        listener: TcpListener,
        connections: usize,
        tls: Option<Arc<ServerConfig>>,
    ) -> Result<Sink> {
        let accept = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || accept_all(listener, connections, tls))
            .context("cannot start the sink")?;
        Ok(Sink { accept })
    }

    /// Waits for every connection to end; returns what was read and written in all.
    fn finish(self) -> Result<Tally> {
        self.accept
            .join()
            .map_err(|_| anyhow::anyhow!("the HTTP sink panicked"))?
    }
}

fn accept_all(
    listener: TcpListener,
    connections: usize,
    tls: Option<Arc<ServerConfig>>,
) -> Result<Tally> {
    // Non-blocking accept polled against an idle deadline: a client that never connects must
    // not hold the sink forever.
    listener.set_nonblocking(true)?;
    let mut last = Instant::now();
    let mut handlers = Vec::new();
    let mut tally = Tally::default();
    let mut accepted = 0usize;
    while accepted < connections {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted += 1;
                last = Instant::now();
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.set_nodelay(true)?;
                let tls = tls.clone();
                let handler = std::thread::Builder::new()
                    .name("sink-conn".into())
                    .stack_size(THREAD_STACK)
                    .spawn(move || serve(stream, tls))
                    .context("cannot start a sink thread")?;
                handlers.push(handler);
                // Reap finished connections as we go: a connection per visit makes tens of
                // thousands of them.
                if handlers.len() >= 1024 {
                    let (done, open): (Vec<_>, Vec<_>) =
                        handlers.into_iter().partition(|h| h.is_finished());
                    handlers = open;
                    for h in done {
                        add(&mut tally, h)?;
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if last.elapsed() > ACCEPT_IDLE {
                    bail!(
                        "only {accepted} of {connections} connections came, none for {ACCEPT_IDLE:?}"
                    );
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e.into()),
        }
    }
    for h in handlers {
        add(&mut tally, h)?;
    }
    Ok(tally)
}

fn add(tally: &mut Tally, handler: JoinHandle<Result<Tally>>) -> Result<()> {
    let t = handler
        .join()
        .map_err(|_| anyhow::anyhow!("a sink thread panicked"))??;
    tally.read += t.read;
    tally.written += t.written;
    tally.requests += t.requests;
    Ok(())
}

/// Answers POSTs on one connection until the client closes it between requests.
fn serve(stream: TcpStream, tls: Option<Arc<ServerConfig>>) -> Result<Tally> {
    let counted = Counted::new(stream.try_clone()?);
    let (read, written) = (Arc::clone(&counted.read), Arc::clone(&counted.written));
    let requests = match tls {
        None => answer_all(BufReader::new(counted))?,
        Some(config) => {
            let conn = ServerConnection::new(config)?;
            answer_all(BufReader::new(StreamOwned::new(conn, counted)))?
        }
    };
    stream.shutdown(std::net::Shutdown::Both).ok();
    Ok(Tally {
        read: read.load(Ordering::Relaxed),
        written: written.load(Ordering::Relaxed),
        requests,
    })
}

/// Reads requests and writes [`RESPONSE`] to each until a clean end of stream (for TLS, the
/// client's close_notify); returns the requests answered.
fn answer_all<S: Read + Write>(mut reader: BufReader<S>) -> Result<usize> {
    let mut requests = 0usize;
    loop {
        let mut length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            let got = reader.read_line(&mut line)?;
            if got == 0 {
                if first {
                    return Ok(requests);
                }
                bail!("the client closed the connection mid-request");
            }
            first = false;
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().context("bad content-length")?;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        requests += 1;
        let out = reader.get_mut();
        out.write_all(RESPONSE)?;
        out.flush()?;
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

#[cfg(test)]
mod test {
    use super::*;

    fn scanners(n: usize, visits: usize) -> Vec<Vec<Visit>> {
        (0..n)
            .map(|s| {
                (0..visits)
                    .map(|v| Visit {
                        facility: format!("fac_{s:04}"),
                        device: format!("dev_{s:04}"),
                        scanned_at: 1_790_000_000 + v as u64,
                        token: [v as u8; 16],
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn each_transport_delivers_every_post_and_counts_both_ends_alike() -> Result<()> {
        let clients = scanners(3, 4);
        let request_bytes: u64 = clients
            .iter()
            .flatten()
            .map(|v| visit_request("127.0.0.1:1".parse().unwrap(), v).len() as u64)
            .sum();
        let plain = post_per_visit(&clients, Transport::Plain)?;
        let kept = post_per_visit(&clients, Transport::TlsKeepAlive)?;
        let each = post_per_visit(&clients, Transport::TlsPerVisit)?;
        for f in [&plain, &kept, &each] {
            assert_eq!(f.requests, 12);
        }
        assert_eq!(
            (plain.connections, kept.connections, each.connections),
            (3, 3, 12)
        );
        // Plain HTTP is the requests themselves (the host's port differs by a few digits).
        assert!(plain.sent.abs_diff(request_bytes) <= 12 * 4, "{plain:?}");
        assert_eq!(plain.received, 12 * RESPONSE.len() as u64);
        // TLS adds framing to every request and a handshake per connection.
        assert!(kept.sent > plain.sent + 3 * 200, "{kept:?} vs {plain:?}");
        assert!(each.sent > kept.sent + 9 * 200, "{each:?} vs {kept:?}");
        Ok(())
    }
}
