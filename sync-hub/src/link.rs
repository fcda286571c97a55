//! The hub link: how the two hubs of a region keep each other whole.
//!
//! Every [`LINK_INTERVAL`] each hub dials its paired hub (`sync-hub peer add`) on
//! [`ALPN_LINK`] and they exchange, in three messages, what they need to converge:
//!
//! 1. `Hello` (dialler): its region, addresses and day public keys (the peer hands them to
//!    devices, which wrap every session key to both hubs), the 256 digests of its registry
//!    ([`replica::buckets`]), and a digest per facility of its live partitions' heads.
//! 2. `Welcome` (answerer): the same of its own, the registry entities of the buckets that
//!    differ, the device contacts since the dialler's last exchange, and the facilities whose
//!    partitions differ.
//! 3. `Entities` (dialler): its entities of the differing buckets and its contacts; the
//!    answerer merges them ([`replica::apply`], on its actor) and answers `Done`.
//!
//! Then the dialler runs one sync session per differing facility (`Peer::HubLink`, the same
//! protocol, validation and persistence as a device's session; [`crate::daemon::dial_session`]),
//! at most [`SESSIONS_AT_ONCE`] at a time. Both hubs dial, so a link that works one way only
//! still converges. Messages are length-prefixed JSON, at most [`MAX_LINK_MESSAGE`] bytes, each
//! read within [`LINK_READ_TIMEOUT`]; a connection from any endpoint but the paired hub's is
//! closed before a byte is read.

use crate::daemon::HubHandle;
use crate::replica::{self, ALPN_LINK, Contact, Entity, PeerConfig};
use iroh::{Endpoint, EndpointAddr, PublicKey};
use serde::{Deserialize, Serialize};
use shared::FacilityId;
use shared::daykey::DayPublicKey;
use shared::time::{Day, UnixSeconds};
use std::collections::BTreeMap;
use std::time::Duration;

/// How often a hub exchanges with its peer (and after a failure, tries again).
pub const LINK_INTERVAL: Duration = Duration::from_secs(10);
/// An idle link (nothing moved in the last exchanges) runs at most this many intervals apart
/// (one minute); a record taken in here brings it back to every interval.
pub const IDLE_ROUNDS_APART: u32 = 6;
/// The most bytes of one link message.
pub const MAX_LINK_MESSAGE: usize = 64 * 1024 * 1024;
/// How long the peer may take to send one message.
pub const LINK_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Facility sessions a link round runs at once.
pub const SESSIONS_AT_ONCE: usize = 4;
/// The link protocol's version.
pub const LINK_VERSION: u32 = 1;
/// The environment variable that shortens [`LINK_INTERVAL`] (milliseconds; tests).
pub const LINK_INTERVAL_ENV: &str = "KIPASS_HUB_LINK_INTERVAL_MS";

/// The interval in force.
pub fn interval() -> Duration {
    std::env::var(LINK_INTERVAL_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms >= 50)
        .map_or(LINK_INTERVAL, Duration::from_millis)
}

/// The first message on a link connection: an exchange, or a trace this hub cannot read
/// itself (it was rebuilt) asked of its peer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ask {
    Exchange(Hello),
    Trace(TraceAsk),
}

/// A trace for days the asking hub cannot read, on behalf of the principal it authenticated.
#[derive(Debug, Serialize, Deserialize)]
struct TraceAsk {
    version: u32,
    /// The checked request (tokens as hex, period limited to the days asked for).
    request: crate::trace::TraceRequest,
    /// Who asked at the other hub (for this hub's audit log).
    asked_by: String,
    /// Whether the asker may leave case and purpose out (the other hub's local operator).
    local: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct TraceAnswer {
    report: Option<crate::trace::TraceReport>,
    error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: u32,
    region: String,
    addrs: Vec<String>,
    day_keys: Vec<DayPublicKey>,
    buckets: Vec<String>,
    /// Contacts wanted since (the dialler's last completed exchange, minus a margin).
    contacts_since: UnixSeconds,
    /// The oldest day the sender holds partitions of.
    oldest_day: Day,
    /// Per facility, the digest of its partitions from the later of the two hubs' oldest
    /// days (as the sender last heard the other's).
    facilities: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    version: u32,
    region: String,
    addrs: Vec<String>,
    day_keys: Vec<DayPublicKey>,
    buckets: Vec<String>,
    contacts_since: UnixSeconds,
    oldest_day: Day,
    entities: Vec<Entity>,
    contacts: Vec<Contact>,
    /// Facilities whose partitions differ: the dialler opens a session for each.
    sync: Vec<FacilityId>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entities {
    entities: Vec<Entity>,
    contacts: Vec<Contact>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Done {
    changed: usize,
}

/// What one exchange did, for logs and `peer status`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Round {
    /// Registry entities changed here.
    pub changed_here: usize,
    /// Registry entities changed at the peer.
    pub changed_there: usize,
    /// Facility sessions run.
    pub sessions: usize,
    /// Of those, failed.
    pub sessions_failed: usize,
}

async fn write_msg<T: Serialize>(
    send: &mut iroh::endpoint::SendStream,
    msg: &T,
) -> Result<(), String> {
    let body = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    if body.len() > MAX_LINK_MESSAGE {
        return Err(format!(
            "a link message of {} bytes is over the limit",
            body.len()
        ));
    }
    let len = u32::try_from(body.len()).map_err(|e| e.to_string())?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    send.write_all(&body).await.map_err(|e| e.to_string())
}

async fn read_msg<T: for<'de> Deserialize<'de>>(
    recv: &mut iroh::endpoint::RecvStream,
) -> Result<T, String> {
    let read = async {
        let mut len = [0u8; 4];
        recv.read_exact(&mut len)
            .await
            .map_err(|e| format!("the peer hub closed the link: {e}"))?;
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_LINK_MESSAGE {
            return Err(format!(
                "the peer hub announced a link message of {n} bytes, over the {MAX_LINK_MESSAGE}-byte limit"
            ));
        }
        let mut body = vec![0u8; n];
        recv.read_exact(&mut body)
            .await
            .map_err(|e| format!("the peer hub closed the link mid-message: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("a malformed link message: {e}"))
    };
    tokio::time::timeout(LINK_READ_TIMEOUT, read)
        .await
        .map_err(|_| "the peer hub sent nothing in time".to_owned())?
}

/// What this hub says about itself in a hello or welcome, read on the actor.
struct Own {
    region: String,
    addrs: Vec<String>,
    day_keys: Vec<DayPublicKey>,
    entities: Vec<Entity>,
    buckets: Vec<String>,
    facilities: BTreeMap<String, String>,
    oldest_day: Day,
    peer: Option<PeerConfig>,
}

/// What this hub says of itself; partitions digested from `floor` on (else from the later of
/// its own oldest day and the one its peer last said).
async fn own(handle: &HubHandle, floor: Option<Day>) -> Result<Own, String> {
    handle
        .query(move |hub, ledger, _| -> Result<Own, String> {
            let now = crate::clock::now();
            let keyring = hub.keyring().map_err(|e| e.to_string())?;
            let entities = replica::snapshot(hub.store(), &keyring).map_err(|e| e.to_string())?;
            let buckets = replica::buckets(&entities);
            let day_keys = ledger
                .ratchet()
                .publics(Day::of(now), crate::registry::DAY_KEYS_AHEAD);
            let peer = replica::peer(hub.store()).map_err(|e| e.to_string())?;
            let oldest_day = ledger.oldest_live_day(now);
            let floor = floor
                .or_else(|| peer.as_ref().and_then(|p| p.oldest_day))
                .unwrap_or(oldest_day)
                .max(oldest_day);
            Ok(Own {
                region: hub.config().region.clone(),
                addrs: hub.advertised(),
                day_keys,
                entities,
                buckets,
                facilities: ledger
                    .facility_digests(now, floor)
                    .map_err(|e| e.to_string())?,
                oldest_day,
                peer,
            })
        })
        .await?
}

/// Merges the peer's entities and contacts and remembers what it announced of itself.
async fn merge(
    handle: &HubHandle,
    entities: Vec<Entity>,
    contacts: Vec<Contact>,
    announced: Option<(Vec<String>, Vec<DayPublicKey>, Day)>,
) -> Result<usize, String> {
    // A query job, not an admin one: the link's own writes must not wake the link.
    handle
        .query(move |hub, _, _| -> Result<usize, String> {
            let now = crate::clock::now();
            let applied =
                replica::apply(hub, &entities, &contacts, now).map_err(|e| e.to_string())?;
            if let Some((addrs, day_keys, oldest)) = announced {
                remember(hub, addrs, day_keys, oldest, now).map_err(|e| e.to_string())?;
            }
            Ok(applied.changed.len())
        })
        .await?
}

/// Stores the peer's announced addresses and day keys (checked: valid recipients, at most
/// [`replica::PEER_DAY_KEYS`]), and the time of this exchange. A day whose key changed means
/// the peer was rebuilt from nothing: noted, since it cannot read the days before.
fn remember(
    hub: &crate::registry::Hub,
    addrs: Vec<String>,
    day_keys: Vec<DayPublicKey>,
    oldest: Day,
    now: UnixSeconds,
) -> Result<(), crate::registry::HubError> {
    let Some(mut cfg) = replica::peer(hub.store())? else {
        return Ok(());
    };
    let mut keys: Vec<DayPublicKey> = day_keys
        .into_iter()
        .filter(|k| k.to_recipient().is_ok())
        .take(replica::PEER_DAY_KEYS)
        .collect();
    keys.sort_by_key(|k| k.day);
    keys.dedup_by_key(|k| k.day);
    let changed_day = keys.iter().any(|k| {
        cfg.day_keys
            .iter()
            .any(|o| o.day == k.day && o.recipient != k.recipient)
    });
    if changed_day {
        tracing::warn!(
            "the peer hub announced new keys for days it had keys for: it was rebuilt and \
             cannot read those days; this hub answers for them"
        );
        cfg.rebuilt_at = Some(now);
    }
    if shared::hub_addr::parse_list(&addrs).is_ok() && !addrs.is_empty() {
        cfg.addrs = addrs;
    }
    cfg.day_keys = keys;
    cfg.oldest_day = Some(oldest);
    cfg.last_link = Some(now);
    hub.store().set_config(replica::PEER_CONFIG, &cfg)?;
    Ok(())
}

fn differing_facilities(
    ours: &BTreeMap<String, String>,
    theirs: &BTreeMap<String, String>,
) -> Vec<FacilityId> {
    let mut out: Vec<FacilityId> = ours
        .iter()
        .filter(|(f, d)| theirs.get(*f) != Some(*d))
        .map(|(f, _)| f)
        .chain(theirs.keys().filter(|f| !ours.contains_key(*f)))
        .filter_map(|f| FacilityId::parse(f).ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Answers a link connection (from `crate::daemon::serve`): only the paired hub's endpoint.
pub async fn respond(conn: iroh::endpoint::Connection, handle: HubHandle) -> Result<(), String> {
    let remote = conn.remote_id().to_string();
    // Checked before anything is read or computed: a stranger costs one settings read.
    let peer = replica::peer(handle.hub.store()).map_err(|e| e.to_string())?;
    let Some(peer) = peer else {
        conn.close(3u32.into(), b"this hub is paired with no other hub");
        return Err("a hub link from an endpoint, but this hub is not paired".into());
    };
    if peer.endpoint_id != remote {
        conn.close(3u32.into(), b"not the paired hub");
        return Err(format!(
            "a hub link from {remote}, which is not the paired hub"
        ));
    }
    let (mut send, mut recv) = tokio::time::timeout(LINK_READ_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| "no link stream in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let hello = match read_msg::<Ask>(&mut recv).await? {
        Ask::Exchange(h) => h,
        Ask::Trace(ask) => {
            let answer = answer_trace(&handle, &remote, ask).await;
            write_msg(&mut send, &answer).await?;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(0u32.into(), b"done");
            return Ok(());
        }
    };
    let own = own(&handle, Some(hello.oldest_day)).await?;
    if hello.version != LINK_VERSION || !crate::auth::same_region(&hello.region, &own.region) {
        conn.close(3u32.into(), b"another version or region");
        return Err(format!(
            "the peer hub speaks link version {} of region {:?}",
            hello.version, hello.region
        ));
    }
    let differ = replica::differing(&own.buckets, &hello.buckets);
    let contacts = contacts(&handle, hello.contacts_since).await?;
    let welcome = Welcome {
        version: LINK_VERSION,
        region: own.region.clone(),
        addrs: own.addrs.clone(),
        day_keys: own.day_keys.clone(),
        buckets: own.buckets.clone(),
        contacts_since: contacts_since(&peer),
        oldest_day: own.oldest_day,
        entities: replica::in_buckets(&own.entities, &differ),
        contacts,
        sync: differing_facilities(&own.facilities, &hello.facilities),
    };
    write_msg(&mut send, &welcome).await?;
    let theirs: Entities = read_msg(&mut recv).await?;
    let changed = merge(
        &handle,
        theirs.entities,
        theirs.contacts,
        Some((hello.addrs, hello.day_keys, hello.oldest_day)),
    )
    .await?;
    write_msg(&mut send, &Done { changed }).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(0u32.into(), b"done");
    Ok(())
}

/// Runs a trace the paired hub asked for (the days it cannot read) and audits it here, as
/// the paired hub's principal "via" the link.
async fn answer_trace(handle: &HubHandle, remote: &str, ask: TraceAsk) -> TraceAnswer {
    let failed = |e: String| TraceAnswer {
        report: None,
        error: Some(e),
    };
    if ask.version != LINK_VERSION {
        return failed(format!("link version {} is not spoken here", ask.version));
    }
    let now = crate::clock::now();
    let q = match ask.request.check(now, !ask.local) {
        Ok(q) => q,
        Err(e) => return failed(e),
    };
    let who = crate::auth::Principal {
        id: format!("peer-hub:{}", remote.get(..16).unwrap_or(remote)),
        name: format!(
            "{} via the region's other hub",
            ask.asked_by.chars().take(80).collect::<String>()
        ),
        role: crate::auth::Role::Authority,
        region: None,
        local: false,
    };
    // Off the actor, over a reader of its ledger (as the people's traces are), one at a time;
    // the audit entry is appended on the actor before the answer leaves.
    static PEER_TRACES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let Ok(_permit) = PEER_TRACES.try_acquire() else {
        return failed("this hub is answering another trace of the paired hub; ask again".into());
    };
    let keys = match handle.query(|_, ledger, _| ledger.read_keys()).await {
        Ok(Ok(k)) => k,
        Ok(Err(e)) => return failed(e.to_string()),
        Err(e) => return failed(e),
    };
    let shared = handle.hub.clone();
    let read = tokio::task::spawn_blocking(move || {
        let ledger = crate::ledger::Ledger::reader(shared.store(), shared.keys(), keys);
        crate::trace::read(&shared, &ledger, &q, now).map_err(|e| e.to_string())
    })
    .await;
    let (report, mut event) = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return failed(e),
        Err(e) => return failed(format!("the trace failed: {e}")),
    };
    event.action = "trace.for_peer_hub".to_owned();
    let r = handle
        .query(
            move |hub, _, _| -> Result<crate::trace::TraceReport, String> {
                hub.audit()
                    .append(&who, event, now)
                    .map_err(|e| format!("not answered: it could not be audited here: {e}"))?;
                Ok(report)
            },
        )
        .await;
    match r {
        Ok(Ok(report)) => TraceAnswer {
            report: Some(report),
            error: None,
        },
        Ok(Err(e)) | Err(e) => failed(e),
    }
}

/// Asks the paired hub for a trace of days this hub cannot read (`request`'s period is
/// those days). Bounded by the link's timeouts.
pub async fn ask_trace(
    endpoint: &Endpoint,
    peer: &PeerConfig,
    request: crate::trace::TraceRequest,
    asked_by: &str,
    local: bool,
) -> Result<crate::trace::TraceReport, String> {
    let addr = dial_addr(peer)?;
    let conn = tokio::time::timeout(
        crate::daemon::LINK_CONNECT_TIMEOUT,
        endpoint.connect(addr, ALPN_LINK),
    )
    .await
    .map_err(|_| "it did not answer in time".to_owned())?
    .map_err(|e| format!("it cannot be reached: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_msg(
        &mut send,
        &Ask::Trace(TraceAsk {
            version: LINK_VERSION,
            request,
            asked_by: asked_by.to_owned(),
            local,
        }),
    )
    .await?;
    let answer: TraceAnswer = read_msg(&mut recv).await?;
    let _ = send.finish();
    conn.close(0u32.into(), b"done");
    match (answer.report, answer.error) {
        (Some(r), _) => Ok(r),
        (None, Some(e)) => Err(e),
        (None, None) => Err("it answered nothing".into()),
    }
}

/// The endpoint the running hub dials its peer with (set by `run`), for traces that
/// must ask the peer.
pub static ENDPOINT: std::sync::OnceLock<Endpoint> = std::sync::OnceLock::new();

/// This hub's device contacts since `since`, read off the actor (a redb read transaction).
async fn contacts(handle: &HubHandle, since: UnixSeconds) -> Result<Vec<Contact>, String> {
    let hub = handle.hub.clone();
    tokio::task::spawn_blocking(move || replica::contacts_since(hub.store(), since))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Contacts wanted from the peer: since the last exchange, a minute of margin; all of them
/// when there was none.
fn contacts_since(peer: &PeerConfig) -> UnixSeconds {
    peer.last_link.map_or(0, |t| t.saturating_sub(60))
}

/// The peer's dial address.
fn dial_addr(peer: &PeerConfig) -> Result<EndpointAddr, String> {
    let id: PublicKey = peer
        .endpoint_id
        .parse()
        .map_err(|e| format!("the paired hub's endpoint id: {e}"))?;
    let mut addr = EndpointAddr::new(id);
    let mut any = false;
    for a in &peer.addrs {
        if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
            addr = addr.with_ip_addr(sa);
            any = true;
        } else if let Some(sa) = std::net::ToSocketAddrs::to_socket_addrs(a.as_str())
            .ok()
            .and_then(|mut r| r.next())
        {
            addr = addr.with_ip_addr(sa);
            any = true;
        }
    }
    if !any {
        return Err("the paired hub has no address this hub can dial".into());
    }
    Ok(addr)
}

/// One exchange with the paired hub, then a session per differing facility.
pub async fn round(endpoint: &Endpoint, handle: &HubHandle) -> Result<Option<Round>, String> {
    // A hub of its region alone does nothing more than read one setting.
    if replica::peer(handle.hub.store())
        .map_err(|e| e.to_string())?
        .is_none()
    {
        return Ok(None);
    }
    let own = own(handle, None).await?;
    let Some(peer) = own.peer.clone() else {
        return Ok(None);
    };
    let addr = dial_addr(&peer)?;
    let conn = tokio::time::timeout(
        crate::daemon::LINK_CONNECT_TIMEOUT,
        endpoint.connect(addr.clone(), ALPN_LINK),
    )
    .await
    .map_err(|_| "the paired hub did not answer in time".to_owned())?
    .map_err(|e| format!("cannot reach the paired hub: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = Hello {
        version: LINK_VERSION,
        region: own.region.clone(),
        addrs: own.addrs.clone(),
        day_keys: own.day_keys.clone(),
        buckets: own.buckets.clone(),
        contacts_since: contacts_since(&peer),
        oldest_day: own.oldest_day,
        facilities: own.facilities.clone(),
    };
    write_msg(&mut send, &Ask::Exchange(hello)).await?;
    let welcome: Welcome = read_msg(&mut recv).await?;
    if welcome.version != LINK_VERSION || !crate::auth::same_region(&welcome.region, &own.region) {
        return Err(format!(
            "the paired hub speaks link version {} of region {:?}",
            welcome.version, welcome.region
        ));
    }
    let differ = replica::differing(&own.buckets, &welcome.buckets);
    let contacts = contacts(handle, welcome.contacts_since).await?;
    write_msg(
        &mut send,
        &Entities {
            entities: replica::in_buckets(&own.entities, &differ),
            contacts,
        },
    )
    .await?;
    let changed_here = merge(
        handle,
        welcome.entities,
        welcome.contacts,
        Some((welcome.addrs, welcome.day_keys, welcome.oldest_day)),
    )
    .await?;
    let done: Done = read_msg(&mut recv).await?;
    let _ = send.finish();
    conn.close(0u32.into(), b"done");
    let mut r = Round {
        changed_here,
        changed_there: done.changed,
        ..Round::default()
    };
    // One session per differing facility this hub knows (the peer names them; a hostile
    // one must not make it dial sessions for nothing), a few at a time.
    let sync: Vec<FacilityId> = {
        let asked = welcome.sync;
        handle
            .query(move |hub, _, _| {
                asked
                    .into_iter()
                    .filter(|f| hub.store().facility(f).ok().flatten().is_some())
                    .collect()
            })
            .await?
    };
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(SESSIONS_AT_ONCE));
    let mut tasks = tokio::task::JoinSet::new();
    for facility in sync {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let endpoint = endpoint.clone();
        let handle = handle.clone();
        let addr = addr.clone();
        tasks.spawn(async move {
            let r = crate::daemon::dial_session(&endpoint, &handle, addr, facility.clone()).await;
            drop(permit);
            (facility, r)
        });
    }
    while let Some(done) = tasks.join_next().await {
        r.sessions += 1;
        if let Ok((facility, Err(e))) = done {
            r.sessions_failed += 1;
            tracing::info!("hub link session for {facility} failed: {e}");
        }
    }
    Ok(Some(r))
}

/// Runs the link until the endpoint closes: a round every [`interval`], and answers the
/// peer's link connections from `incoming`.
pub async fn run(
    endpoint: Endpoint,
    handle: HubHandle,
    mut incoming: tokio::sync::mpsc::Receiver<iroh::endpoint::Connection>,
) {
    let answering = {
        let handle = handle.clone();
        tokio::spawn(async move {
            // One answer at a time: the paired hub has no reason to open more, and a hostile
            // one must not make this hub answer many at once.
            let one = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
            while let Some(conn) = incoming.recv().await {
                let Ok(permit) = one.clone().try_acquire_owned() else {
                    conn.close(2u32.into(), b"one link exchange at a time");
                    continue;
                };
                let handle = handle.clone();
                tokio::spawn(async move {
                    if let Err(e) = respond(conn, handle).await {
                        tracing::info!("hub link (answering): {e}");
                    }
                    drop(permit);
                });
            }
        })
    };
    let every = interval();
    // An idle region backs off to IDLE_ROUNDS_APART intervals between exchanges (each costs
    // some 10 KB both ways); anything that moved, or a record this hub took in since the last
    // round, brings the next one back to the interval.
    let mut apart = 1u32;
    let mut waited = 0u32;
    let mut ingested = u64::MAX;
    loop {
        let now_ingested = handle
            .metrics
            .records_ingested
            .load(std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(
                handle
                    .metrics
                    .admin_writes
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
        if waited + 1 >= apart || now_ingested != ingested {
            waited = 0;
            ingested = now_ingested;
            match round(&endpoint, &handle).await {
                Ok(Some(r)) => {
                    handle
                        .metrics
                        .link_rounds
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    handle
                        .metrics
                        .link_last_ok
                        .store(crate::clock::now(), std::sync::atomic::Ordering::Relaxed);
                    let moved = r.changed_here + r.changed_there + r.sessions > 0;
                    apart = if moved {
                        1
                    } else {
                        (apart * 2).min(IDLE_ROUNDS_APART)
                    };
                    if moved {
                        tracing::info!(
                            "hub link: {} registry changes here, {} there, {} facility sessions ({} failed)",
                            r.changed_here,
                            r.changed_there,
                            r.sessions,
                            r.sessions_failed
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    apart = 1;
                    handle
                        .metrics
                        .link_failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!("hub link: {e}");
                }
            }
        } else {
            waited += 1;
        }
        if endpoint.is_closed() {
            break;
        }
        tokio::time::sleep(every).await;
    }
    answering.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facilities_differ_when_digests_differ_or_one_side_lacks_them() {
        let a = FacilityId::random(&mut rand_core::OsRng);
        let b = FacilityId::random(&mut rand_core::OsRng);
        let c = FacilityId::random(&mut rand_core::OsRng);
        let ours: BTreeMap<String, String> = [
            (a.to_string(), "1".to_owned()),
            (b.to_string(), "2".to_owned()),
        ]
        .into();
        let theirs: BTreeMap<String, String> = [
            (a.to_string(), "1".to_owned()),
            (b.to_string(), "3".to_owned()),
            (c.to_string(), "4".to_owned()),
        ]
        .into();
        let mut want = vec![b.clone(), c.clone()];
        want.sort();
        assert_eq!(differing_facilities(&ours, &theirs), want);
        assert!(differing_facilities(&ours, &ours).is_empty());
    }
}
