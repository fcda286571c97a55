//! The kiosk: the page a tablet at the entrance shows, and the routes it talks to.
//!
//! `edge-node run --http ADDR` serves it beside the control API. The page (`GET /`, its script
//! and style embedded from `edge-node/assets/`, nothing from the internet) shows the camera,
//! sends a few frames a second to `POST /kiosk/frame`, and shows and speaks each verdict in the
//! language the visitor chose (Korean, English or Chinese; [`message_key`] names the message,
//! the page holds the three texts). `GET /kiosk/status` gives the status line (and
//! `reader_panics`, frames a QR reader panicked on since the start). Staff open the paper log with
//! the device's staff PIN (`POST /kiosk/staff/login`, a short-lived `HttpOnly` session cookie)
//! and add entries through `POST /kiosk/paper`.
//!
//! None of these routes needs the control token: a kiosk tablet reaches the device over the
//! facility's LAN (`run --http 0.0.0.0:7451`), while `/api/*` stays loopback-only and
//! token-bound (see `control`). What the kiosk routes can do is what a person at the entrance
//! can do anyway: show a code, read the status line; the paper log needs the PIN, and wrong
//! PINs lock the staff login for a while, for the address (an IPv6 /64) they came from, and
//! a device-wide brake holds strangers to 10 wrong PINs an hour (see `pin_guard`); an attempt
//! is counted, and the count written to the device's store, before its PIN is hashed, so
//! PINs sent at once cannot outrun the count and a restart does not reset it. Every route of the device's server answers only a `Host` that is the device's own
//! ([`own_host_only`], against DNS rebinding), and frames are held to
//! [`frame::FrameLimits::KIOSK`] from their headers, [`MAX_DECODES`] decoding at once.
//!
//! The decision is the device's: frames are decoded by `frame`, codes verified and stored by
//! [`Device::check_in`] (one visit per code, however many frames show it), entries validated
//! and sealed by [`Device::add_paper`]. This module only moves bytes and adds the kiosk's own
//! session state, which lives in memory and dies with the process, and the wrong-PIN state,
//! which is kept in the store.

use crate::device::{Device, StaffPin};
use crate::net::SharedDevice;
use crate::pin_guard::{self, Attempt, Failure, PinGuard, Refusal};
use crate::{clock, frame};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use rand_core::{OsRng, RngCore};
use serde::Deserialize;
use shared::paper::PaperEntry;
use shared::token::Verdict;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Notify, Semaphore};

/// The largest frame the kiosk accepts: a 640x480 JPEG is 30 to 80 KB, a PNG a few hundred.
pub const MAX_KIOSK_FRAME: usize = 2 * 1024 * 1024;
/// Staff mode ends after this long without a staff request.
pub const STAFF_IDLE: Duration = Duration::from_secs(300);
/// While records wait for the hub, the status line says "online" only when the last completed
/// hub sync is at most this old: with work waiting the sync loop runs a round at most 30 s
/// after the previous one (`shared::sync::schedule::MIN_GAP_MS`), so a missed round plus
/// slack means the hub is not being reached.
pub const ONLINE_WITHIN: u64 = 90;
// A device whose rounds run on time shows online.
const _: () = assert!(
    ONLINE_WITHIN * 1_000
        > shared::sync::schedule::MIN_GAP_MS + shared::sync::schedule::COALESCE_MS
);
/// With nothing waiting, a device syncs once a day (for the hub's refresh): "online" then
/// means the last daily round completed, with an hour of slack.
pub const UP_TO_DATE_WITHIN: u64 = shared::sync::schedule::REFRESH_EVERY_MS / 1_000 + 3_600;
/// Frame decodes running at once. Each takes at most about 20 MiB under
/// [`frame::FrameLimits::KIOSK`] (16 MiB decoded plus its luma copy); two keep both cores of a
/// small device busy without letting a burst of frames take its memory.
pub const MAX_DECODES: usize = 2;
/// Frames in the house at once, being received or waiting for a decoder; each holds up to
/// [`MAX_KIOSK_FRAME`] of body. More are told the device is busy (503) before their body is
/// read: a live camera sends the next frame a quarter of a second later anyway.
pub const MAX_FRAMES_IN_FLIGHT: usize = 8;
/// How long a received frame waits for a decoder before it is answered 503: a frame older
/// than this is no longer what the camera sees.
pub const DECODE_WAIT: Duration = Duration::from_secs(2);
/// How long a frame's body may take to arrive: a client trickling bytes would otherwise hold
/// a place among [`MAX_FRAMES_IN_FLIGHT`] for good.
pub const FRAME_BODY_WITHIN: Duration = Duration::from_secs(10);
/// Staff sessions kept at most (one per tablet; old ones are dropped first).
const MAX_STAFF_SESSIONS: usize = 16;
/// The staff session cookie.
const COOKIE: &str = "kiosk_staff";

const PAGE_HTML: &str = include_str!("../assets/kiosk.html");
const PAGE_JS: &str = include_str!("../assets/kiosk.js");
const PAGE_CSS: &str = include_str!("../assets/kiosk.css");

/// Every asset comes from the device itself; camera frames are drawn to a canvas only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// What the kiosk routes share.
#[derive(Clone)]
pub struct KioskState {
    device: SharedDevice,
    wake: Arc<Notify>,
    shared: Arc<Shared>,
}

struct Shared {
    staff: Mutex<StaffGate>,
    /// Keys the per-code fingerprint the page uses to tell "the same code, still in view"
    /// from a new one; random per process, so a fingerprint means nothing elsewhere.
    fingerprint_key: [u8; 32],
    /// Frames being received or waiting to be decoded ([`MAX_FRAMES_IN_FLIGHT`]).
    frames: Semaphore,
    /// Frame decodes running at once ([`MAX_DECODES`]); the rest wait up to [`DECODE_WAIT`].
    /// A permit lives as long as its decode, not as long as the request (see
    /// [`decode_within_cap`]).
    decoders: Arc<Semaphore>,
    /// One full-ladder climb at a time: a second one asked for meanwhile gets the live pass,
    /// so climbs (five passes on a frame with nobody in view) never hold every core while
    /// live frames queue.
    full_ladder: Semaphore,
}

/// Staff sessions and the wrong-PIN bookkeeping.
struct StaffGate {
    /// BLAKE3 of a session token -> when it lapses.
    sessions: HashMap<[u8; 32], Instant>,
    pins: PinGuard,
}

impl KioskState {
    /// The kiosk's state over the running device.
    pub fn new(device: SharedDevice, wake: Arc<Notify>) -> KioskState {
        let mut fingerprint_key = [0u8; 32];
        OsRng.fill_bytes(&mut fingerprint_key);
        let pins = load_pin_guard(&lock_device(&device));
        KioskState {
            device,
            wake,
            shared: Arc::new(Shared {
                staff: Mutex::new(StaffGate {
                    sessions: HashMap::new(),
                    pins,
                }),
                fingerprint_key,
                frames: Semaphore::new(MAX_FRAMES_IN_FLIGHT),
                decoders: Arc::new(Semaphore::new(MAX_DECODES)),
                full_ladder: Semaphore::new(1),
            }),
        }
    }

    /// Ends every staff session (the PIN changed).
    pub fn end_staff_sessions(&self) {
        let mut gate = lock(&self.shared.staff);
        gate.sessions.clear();
        gate.pins.reset();
    }
}

/// The wrong-PIN state the device's store holds (`pin_guard`: it survives restarts), bound to
/// the stored PIN: if that changed while the device was off, the old state is dropped.
fn load_pin_guard(dev: &Device) -> PinGuard {
    let mut pins = match dev.store().get(pin_guard::STORE_KEY) {
        Ok(None) => PinGuard::default(),
        Ok(Some(bytes)) => PinGuard::from_bytes(&bytes).unwrap_or_else(|| {
            tracing::warn!("the kiosk's stored wrong-PIN state is damaged; starting afresh");
            PinGuard::default()
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the kiosk's wrong-PIN state; starting afresh");
            PinGuard::default()
        }
    };
    if let Ok(Some(pin)) = dev.staff_pin() {
        pins.for_pin(pin_digest(&pin));
    }
    pins
}

/// What the wrong-PIN state is bound to: BLAKE3 of the stored PIN's form (its salted hash).
fn pin_digest(pin: &StaffPin) -> [u8; 32] {
    *blake3::hash(&serde_json::to_vec(pin).unwrap_or_default()).as_bytes()
}

/// Writes the wrong-PIN state to the device's store.
fn save_pin_guard(dev: &Device, pins: &PinGuard) -> Result<(), crate::store::StoreError> {
    dev.store().put(&[(pin_guard::STORE_KEY, &pins.to_bytes())])
}

/// The kiosk's routes.
pub fn router(state: KioskState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/kiosk", get(page))
        .route("/kiosk/kiosk.js", get(script))
        .route("/kiosk/kiosk.css", get(style))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/kiosk/frame",
            post(frame_verdict).layer(DefaultBodyLimit::max(MAX_KIOSK_FRAME)),
        )
        .route("/kiosk/status", get(status))
        .route("/kiosk/staff", get(staff_session))
        .route("/kiosk/staff/login", post(staff_login))
        .route("/kiosk/staff/logout", post(staff_logout))
        .route("/kiosk/paper", post(paper))
        .with_state(state)
}

/// This machine's own names, for [`own_host_only`].
#[derive(Debug, Clone, Default)]
pub struct OwnNames {
    /// The hostname, lower-case, if one could be read.
    hostname: Option<Arc<str>>,
}

impl OwnNames {
    /// This machine's names, read once when the server starts.
    pub fn of_this_machine() -> OwnNames {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let hostname = read("/proc/sys/kernel/hostname")
            .or_else(|| read("/etc/hostname"))
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|h| !h.is_empty() && h.len() <= 253 && !h.contains(['/', ' ', ':']));
        OwnNames {
            hostname: hostname.map(Arc::from),
        }
    }

    /// The hostname, lower-case, if one could be read.
    pub fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref()
    }
}

/// Why a request's `Host` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostRefusal {
    /// No `Host` (nor an authority in the request target), or more than one.
    Missing,
    /// Not `name[:port]`, `IPv4[:port]` or `[IPv6][:port]`.
    Malformed,
    /// A name or address that is not this machine's.
    Foreign,
}

/// Whether `host` (a `Host` header or a request target's authority) names this device: an IP
/// literal that `is_own_ip` says this machine holds, `localhost`, or the machine's hostname
/// (also under `.local`), with or without a port.
fn host_check(
    host: &str,
    hostname: Option<&str>,
    is_own_ip: impl Fn(IpAddr) -> bool,
) -> Result<(), HostRefusal> {
    let own_ip = |ip: IpAddr| {
        if is_own_ip(ip) {
            Ok(())
        } else {
            Err(HostRefusal::Foreign)
        }
    };
    if let Some(rest) = host.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or(HostRefusal::Malformed)?;
        let ip: std::net::Ipv6Addr = inner.parse().map_err(|_| HostRefusal::Malformed)?;
        port_ok(after)?;
        return own_ip(IpAddr::V6(ip));
    }
    let (name, after) = host.split_at(host.find(':').unwrap_or(host.len()));
    port_ok(after)?;
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return own_ip(IpAddr::V4(ip));
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    {
        return Err(HostRefusal::Malformed);
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let own = name == "localhost"
        || hostname
            .is_some_and(|h| name == h || name.strip_suffix(".local").is_some_and(|n| n == h));
    if own {
        Ok(())
    } else {
        Err(HostRefusal::Foreign)
    }
}

/// `""` or `:PORT`.
fn port_ok(after: &str) -> Result<(), HostRefusal> {
    match after.strip_prefix(':') {
        None if after.is_empty() => Ok(()),
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(HostRefusal::Malformed),
    }
}

/// Whether this machine holds `ip`. The listener's own address is not visible here (the
/// server hands handlers only the peer's), so an address of one of this machine's interfaces
/// is the test: binding a socket to it succeeds only then. Against DNS rebinding what counts
/// is that the browser's origin is an address, not a name whose DNS a stranger controls.
fn is_this_machine(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        return true;
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Refuses, before any handler runs, a request whose `Host` is not one of this device's own
/// names or addresses (421). A web page anyone on the facility's Wi-Fi opens could otherwise
/// point its own name at the device (DNS rebinding) and use the kiosk, and the staff login,
/// from the visitor's browser as if it were the same site. A rebound page's requests carry
/// the page's name in `Host`, which no DNS answer can change. Applied to every route of the
/// device's HTTP server, the control API's included.
pub async fn own_host_only(State(names): State<OwnNames>, req: Request, next: Next) -> Response {
    let hosts = req.headers().get_all(header::HOST);
    let mut given: Vec<&str> = Vec::with_capacity(2);
    for h in hosts.iter() {
        match h.to_str() {
            Ok(h) => given.push(h),
            Err(_) => return host_refused(HostRefusal::Malformed, "(not text)"),
        }
    }
    if given.len() > 1 {
        return host_refused(HostRefusal::Missing, "");
    }
    if let Some(a) = req.uri().authority() {
        given.push(a.as_str());
    }
    if given.is_empty() {
        return host_refused(HostRefusal::Missing, "");
    }
    for host in given {
        if let Err(why) = host_check(host, names.hostname.as_deref(), is_this_machine) {
            return host_refused(why, host);
        }
    }
    next.run(req).await
}

fn host_refused(why: HostRefusal, host: &str) -> Response {
    let shown: String = host.chars().take(80).collect();
    match why {
        HostRefusal::Missing => error(
            StatusCode::BAD_REQUEST,
            "a request must name this device in exactly one Host header",
        ),
        HostRefusal::Malformed => error(
            StatusCode::BAD_REQUEST,
            &format!("the Host header {shown:?} is not a name or address with an optional port"),
        ),
        HostRefusal::Foreign => error(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "this device answers only to its own addresses, localhost and its hostname, not {shown:?}: open it as http://<device address>:<port>/ (another name pointing here is refused, against DNS rebinding)"
            ),
        ),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_device(device: &SharedDevice) -> std::sync::MutexGuard<'_, Device> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", PAGE_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", PAGE_CSS)
}

/// How the page colours a verdict: the five things a visitor can be told, and "nothing yet".
pub fn verdict_kind(v: Verdict) -> &'static str {
    match v {
        Verdict::Accepted => "accepted",
        Verdict::Duplicate => "duplicate",
        Verdict::Expired | Verdict::NotYetValid | Verdict::BadSignature => "refresh",
        Verdict::Malformed | Verdict::UnsupportedVersion => "not_checkin",
        Verdict::UnknownKey | Verdict::KeyNotValid => "unknown_issuer",
        Verdict::NoCode => "idle",
    }
}

/// What the visitor is told, Korean and English; for a malformed code, why.
pub fn messages(v: Verdict, text: Option<&str>) -> (&'static str, &'static str) {
    if v == Verdict::Malformed
        && let Some(m) = text.and_then(shared::token::malformed_reason)
    {
        return (m.message_ko(), m.message_en());
    }
    (v.message_ko(), v.message_en())
}

/// Which of the visitor's messages [`messages`] gives, as a code the page maps to Korean,
/// English and Chinese (its table in `assets/kiosk.js`): the verdict's name, or for a
/// malformed code whose reason is known, `malformed.<reason>`.
pub fn message_key(v: Verdict, text: Option<&str>) -> &'static str {
    match text.and_then(shared::token::malformed_reason) {
        Some(m) if v == Verdict::Malformed => malformed_key(&m),
        _ => v.as_str(),
    }
}

/// [`message_key`] of a malformed code whose reason is known.
fn malformed_key(m: &shared::token::Malformed) -> &'static str {
    use shared::token::Malformed;
    match m {
        Malformed::NotCheckInCode => "malformed.not_checkin_code",
        Malformed::Base45(_) | Malformed::WrongLength { .. } => "malformed.unreadable",
        Malformed::TtlOutOfRange { .. } => "malformed.bad_ttl",
    }
}

/// The media type of a frame, if it is one the kiosk takes.
fn frame_type(headers: &HeaderMap) -> Result<&'static str, String> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"))
        .unwrap_or("(none)");
    let essence = given
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "image/jpeg" => Ok("image/jpeg"),
        "image/png" => Ok("image/png"),
        _ => Err(format!(
            "a frame must be sent as image/jpeg or image/png, not {given}"
        )),
    }
}

fn too_large() -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!(
            "a frame may be at most {} MiB: send a 640x480 JPEG",
            MAX_KIOSK_FRAME / (1024 * 1024)
        ),
    )
}

/// 503: too many frames at once; the page simply sends the next one.
fn busy() -> Response {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the device is busy decoding other frames: retry with the next frame",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// How hard to look for a code in one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ladder {
    /// The live pass ([`frame::decode_live_luma`]: `rxing`'s detector, our locator, `rxing` on
    /// the median filter, after the downscale a large frame gets): the live camera stream, where the next frame is a
    /// tenth of a second away.
    #[default]
    Live,
    /// The whole preprocessing ladder, as `scan` climbs it: one frame a second of the live
    /// stream (the page asks), and single photos.
    Full,
}

/// The `/kiosk/frame` query.
#[derive(Debug, Deserialize, Default)]
struct FrameQuery {
    #[serde(default)]
    ladder: Ladder,
}

/// Decodes a frame with the chosen effort, under the kiosk's frame limits. Every frame with no
/// code in it (most of what an entrance camera sees) climbs the whole ladder at about five
/// times one pass's cost, so the live stream climbs it only when the page asks
/// (`BENCHMARKS.md`, decoding).
pub fn decode(bytes: &[u8], ladder: Ladder) -> Result<Option<String>, frame::FrameError> {
    match ladder {
        Ladder::Full => frame::decode_frame_within(bytes, frame::FrameLimits::KIOSK),
        Ladder::Live => {
            let img = frame::load_luma_within(bytes, frame::FrameLimits::KIOSK)?;
            Ok(frame::decode_live_luma(&img).text)
        }
    }
}

/// Runs `work` (a frame decode) on the blocking pool once one of `decoders`' permits is free,
/// waiting at most [`DECODE_WAIT`]. The permit is moved into the blocking closure and released
/// only when the decode ends: a client that hangs up drops this future, not the decode, and a
/// permit released then would let a client that posts and hangs up over and over run any
/// number of decodes at once.
async fn decode_within_cap<T: Send + 'static>(
    decoders: &Arc<Semaphore>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    let permit = match tokio::time::timeout(DECODE_WAIT, decoders.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the device is shutting down",
            ));
        }
        Err(_) => return Err(busy()),
    };
    let decoded = tokio::task::spawn_blocking(move || {
        let out = work();
        drop(permit);
        out
    })
    .await;
    decoded.map_err(|_| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "decoding the frame failed unexpectedly; the device keeps running",
        )
    })
}

async fn frame_verdict(
    State(s): State<KioskState>,
    query: Result<Query<FrameQuery>, QueryRejection>,
    req: Request,
) -> Response {
    let ladder = match query {
        Ok(Query(q)) => q.ladder,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    // Both refusals come before a byte of the body is read.
    if let Err(why) = frame_type(req.headers()) {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &why);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_KIOSK_FRAME as u64) {
        return too_large();
    }
    let Ok(_in_flight) = s.shared.frames.try_acquire() else {
        return busy();
    };
    // A body without a length (chunked) is cut off at the limit the route sets.
    let body = match tokio::time::timeout(FRAME_BODY_WITHIN, Bytes::from_request(req, &())).await {
        Ok(Ok(b)) => b,
        Ok(Err(r)) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => return too_large(),
        Ok(Err(r)) => return error(StatusCode::BAD_REQUEST, &r.body_text()),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the frame did not arrive within {} s: send it in one go",
                    FRAME_BODY_WITHIN.as_secs()
                ),
            );
        }
    };
    let started = Instant::now();
    let climb = match ladder {
        Ladder::Full => s.shared.full_ladder.try_acquire().ok(),
        Ladder::Live => None,
    };
    let ladder = if climb.is_some() {
        Ladder::Full
    } else {
        Ladder::Live
    };
    let decoded = decode_within_cap(&s.shared.decoders, move || decode(&body, ladder)).await;
    let text = match decoded {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
        Err(r) => return r,
    };
    drop(climb);
    drop(_in_flight);
    let verdict = match &text {
        None => Verdict::NoCode,
        Some(t) => {
            let device = s.device.clone();
            let t = t.clone();
            let checked = tokio::task::spawn_blocking(move || {
                lock_device(&device).check_in(clock::now(), &t)
            })
            .await;
            match checked {
                Ok(Ok(c)) => c.verdict,
                Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                Err(_) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "recording the visit failed unexpectedly; nothing was recorded",
                    );
                }
            }
        }
    };
    if verdict == Verdict::Accepted {
        s.wake.notify_one();
    }
    let (ko, en) = messages(verdict, text.as_deref());
    let code = text.as_deref().map(|t| {
        let h = blake3::keyed_hash(&s.shared.fingerprint_key, t.as_bytes());
        hex::encode(&h.as_bytes()[..8])
    });
    Json(serde_json::json!({
        "verdict": verdict.as_str(),
        "kind": verdict_kind(verdict),
        "message_ko": ko,
        "message_en": en,
        "message": message_key(verdict, text.as_deref()),
        "code": code,
        "ladder": match ladder {
            Ladder::Full => "full",
            Ladder::Live => "live",
        },
        "server_ms": started.elapsed().as_secs_f64() * 1000.0,
    }))
    .into_response()
}

async fn status(State(s): State<KioskState>) -> Response {
    let device = s.device.clone();
    let result = tokio::task::spawn_blocking(move || {
        let dev = lock_device(&device);
        let now = clock::now();
        Ok::<_, crate::device::DeviceError>((dev.status(now)?, dev.staff_pin()?.is_some(), now))
    })
    .await;
    let (st, pin_set, now) = match result {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "status failed unexpectedly",
            );
        }
    };
    // `run` does not publish the outcome of each sync attempt; a recent completed hub sync
    // is the evidence that the hub is reachable. A device with nothing to send syncs once a
    // day, so then the daily round is the evidence.
    let within = if st.unsynced == 0 {
        UP_TO_DATE_WITHIN
    } else {
        ONLINE_WITHIN
    };
    let online = st
        .last_sync
        .is_some_and(|t| now.saturating_sub(t) <= within);
    let clock_warning = st.clock_offset.is_some_and(|o| o.abs() > 300);
    Json(serde_json::json!({
        "facility_name": st.facility_name,
        "device_name": st.device_name,
        "online": online,
        "last_sync": st.last_sync,
        "unsynced": st.unsynced,
        "records": st.records,
        "day_keys_left": st.day_keys_left,
        "clock_offset": st.clock_offset,
        "clock_warning": clock_warning,
        "warnings": st.warnings,
        "staff_pin_set": pin_set,
        // Frames a QR reader panicked on since the device started (read as "no code"): a
        // count that keeps rising means someone shows the camera crafted pictures.
        "reader_panics": crate::frame::reader_panics(),
        "now": now,
    }))
    .into_response()
}

/// The staff session token in the request's cookies, if any.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// Whether the request carries a live staff session; extends it when it does.
fn staff_active(s: &KioskState, headers: &HeaderMap) -> bool {
    let Some(token) = session_cookie(headers) else {
        return false;
    };
    let key = *blake3::hash(token.as_bytes()).as_bytes();
    let now = Instant::now();
    let mut gate = lock(&s.shared.staff);
    gate.sessions.retain(|_, until| *until > now);
    match gate.sessions.get_mut(&key) {
        Some(until) => {
            *until = now + STAFF_IDLE;
            true
        }
        None => false,
    }
}

async fn staff_session(State(s): State<KioskState>, headers: HeaderMap) -> Response {
    Json(serde_json::json!({ "active": staff_active(&s, &headers) })).into_response()
}

/// A staff login.
#[derive(Deserialize)]
struct Login {
    pin: String,
}

/// 429 with `Retry-After`.
fn too_many(secs: u64, message: &str) -> Response {
    let mut r = error(StatusCode::TOO_MANY_REQUESTS, message);
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// 429 for a login attempt the wrong-PIN rules do not allow now.
fn refused(r: Refusal, addr: IpAddr) -> Response {
    let secs = r.retry_after_secs();
    match r {
        Refusal::Locked(_) => too_many(
            secs,
            &format!(
                "too many wrong PINs from this address: staff login is locked here for {secs} s"
            ),
        ),
        Refusal::Brake(_) => {
            tracing::warn!(%addr, "staff login refused: too many wrong PINs on this kiosk recently");
            too_many(
                secs,
                &format!(
                    "too many wrong PINs on this kiosk recently: only a tablet that has logged in before may try; others in {secs} s"
                ),
            )
        }
    }
}

async fn staff_login(
    State(s): State<KioskState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    transport: Option<Extension<crate::tls::Transport>>,
    body: Result<Json<Login>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(login) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    // Served without connection info (only in-process tests do), every client counts as one.
    let addr = peer.map_or(
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        |Extension(ConnectInfo(a))| a.ip(),
    );
    // A cheap early refusal, before the device lock is touched; `reserve` below decides.
    let early = lock(&s.shared.staff).pins.check(addr, SystemTime::now());
    if let Err(r) = early {
        return refused(r, addr);
    }
    // Under the device lock (then the staff lock): the stored PIN, the attempt reserved and
    // counted as a wrong PIN, and that count written to the store, all before the PIN is
    // hashed: however many arrive at once, and whether or not the device restarts, at most
    // the allowance is ever evaluated (`pin_guard`).
    let (device, shared) = (s.device.clone(), s.shared.clone());
    let reserved = tokio::task::spawn_blocking(move || {
        let dev = lock_device(&device);
        let pin = match dev.staff_pin() {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(Box::new(error(
                    StatusCode::CONFLICT,
                    "no staff PIN is set on this device: set one with `edge-node pin set`",
                )));
            }
            Err(e) => {
                return Err(Box::new(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &e.to_string(),
                )));
            }
        };
        let mut gate = lock(&shared.staff);
        gate.pins.for_pin(pin_digest(&pin));
        let attempt = match gate.pins.reserve(addr, SystemTime::now()) {
            Ok(a) => a,
            Err(r) => return Err(Box::new(refused(r, addr))),
        };
        if let Err(e) = save_pin_guard(&dev, &gate.pins) {
            return Err(Box::new(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot record the login attempt ({e}); the PIN was not checked"),
            )));
        }
        Ok((pin, attempt))
    })
    .await;
    let (pin, attempt): (StaffPin, Attempt) = match reserved {
        Ok(Ok(v)) => v,
        Ok(Err(r)) => return *r,
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "login failed unexpectedly",
            );
        }
    };
    let short = login.pin.len() < crate::device::STAFF_PIN_MIN_NEW_DIGITS;
    // Hashing takes tens of milliseconds: off the async workers, outside every lock.
    let ok = tokio::task::spawn_blocking(move || StaffPin::matches(&pin, &login.pin))
        .await
        .unwrap_or(false);
    if !ok {
        return match attempt.wrong() {
            Failure::Locked(d) => {
                tracing::warn!(%addr, lockout_s = d.as_secs(), "staff login locked for an address after wrong PINs");
                too_many(
                    d.as_secs(),
                    &format!(
                        "wrong PIN; too many wrong PINs from this address: staff login is locked here for {} s",
                        d.as_secs()
                    ),
                )
            }
            Failure::AttemptsLeft(left) => (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({
                    "error": format!("wrong PIN ({left} attempts left before the staff login locks)"),
                    "attempts_left": left,
                })),
            )
                .into_response(),
        };
    }
    // The right PIN: the attempt is taken back and the address trusted, in the store too.
    let (device, shared) = (s.device.clone(), s.shared.clone());
    let _ = tokio::task::spawn_blocking(move || {
        let dev = lock_device(&device);
        let mut gate = lock(&shared.staff);
        gate.pins.succeeded(attempt);
        if let Err(e) = save_pin_guard(&dev, &gate.pins) {
            tracing::warn!(error = %e, "cannot store the kiosk's trusted tablets");
        }
        drop(gate);
        if short && let Err(e) = dev.note_short_staff_pin() {
            tracing::warn!(error = %e, "cannot note that the staff PIN is short");
        }
    })
    .await;
    let mut gate = lock(&s.shared.staff);
    let now = Instant::now();
    gate.sessions.retain(|_, until| *until > now);
    while gate.sessions.len() >= MAX_STAFF_SESSIONS {
        let oldest = gate
            .sessions
            .iter()
            .min_by_key(|(_, until)| **until)
            .map(|(k, _)| *k);
        match oldest {
            Some(k) => gate.sessions.remove(&k),
            None => break,
        };
    }
    let mut raw = [0u8; 32];
    OsRng.fill_bytes(&mut raw);
    let token = hex::encode(raw);
    gate.sessions
        .insert(*blake3::hash(token.as_bytes()).as_bytes(), now + STAFF_IDLE);
    drop(gate);
    // Over HTTPS the cookie never travels in the clear (`Secure`); loopback HTTP keeps it.
    let secure = match transport {
        Some(Extension(crate::tls::Transport::Tls)) => "; Secure",
        _ => "",
    };
    let cookie = format!("{COOKIE}={token}; Path=/kiosk; HttpOnly; SameSite=Strict{secure}");
    let warning = short.then(|| {
        format!(
            "this staff PIN has fewer than {} digits and can be guessed within weeks: set a new one with `edge-node pin set`",
            crate::device::STAFF_PIN_MIN_NEW_DIGITS
        )
    });
    let mut r = Json(serde_json::json!({
        "active": true,
        "idle_timeout_s": STAFF_IDLE.as_secs(),
        "warning": warning,
    }))
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn staff_logout(State(s): State<KioskState>, headers: HeaderMap) -> Response {
    if let Some(token) = session_cookie(&headers) {
        let key = *blake3::hash(token.as_bytes()).as_bytes();
        lock(&s.shared.staff).sessions.remove(&key);
    }
    let mut r = Json(serde_json::json!({ "active": false })).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("kiosk_staff=; Path=/kiosk; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// The staff's paper-log form. No `Debug`: it holds a name and a phone number or a personal
/// safe number (an empty one is none).
#[derive(Deserialize)]
struct PaperForm {
    name: String,
    #[serde(default)]
    phone: String,
    #[serde(default)]
    safe_number: String,
    #[serde(default)]
    consent_collect: bool,
    #[serde(default)]
    consent_share: bool,
    #[serde(default)]
    minor: bool,
    #[serde(default)]
    guardian_consent: bool,
    #[serde(default)]
    remarks: String,
}

async fn paper(
    State(s): State<KioskState>,
    headers: HeaderMap,
    body: Result<Json<PaperForm>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !staff_active(&s, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "staff mode has ended: enter the staff PIN again",
        );
    }
    let Json(form) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let device = s.device.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let now = clock::now();
        let entry = PaperEntry {
            name: form.name,
            phone: form.phone.trim().to_owned(),
            safe_number: Some(form.safe_number.trim().to_owned()).filter(|n| !n.is_empty()),
            visited_at: now,
            consent_collect: form.consent_collect,
            consent_share: form.consent_share,
            guardian_consent: form.guardian_consent,
            remarks: form.remarks,
        };
        // Refused before the device lock is taken: a refused entry touches nothing.
        shared::device::check_paper_form(&entry, form.minor)?;
        lock_device(&device)
            .add_paper(now, &entry, form.minor)
            .map(|_| ())
    })
    .await;
    match stored {
        Ok(Ok(())) => {
            s.wake.notify_one();
            Json(serde_json::json!({ "stored": true })).into_response()
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storing the entry failed unexpectedly; nothing was recorded",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16: the live pass (every frame of the camera stream) runs our locator before
    /// rqrr's own scan, so a code plain rqrr finds no grid in is read on the frame it arrives
    /// in, not only by the once-a-second full ladder. The frame: a real 640x480 camera photo
    /// of zxing's blackbox set (`testdata/qr-photos/qrcode-1/15.png`), a code held at an angle.
    #[test]
    fn the_live_pass_reads_a_camera_frame_plain_rqrr_misses() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/qr-photos/qrcode-1"
        );
        let png = std::fs::read(format!("{dir}/15.png")).expect("the photo corpus");
        let expected = std::fs::read_to_string(format!("{dir}/15.txt")).expect("its text");
        let img = frame::load_luma_within(&png, frame::FrameLimits::KIOSK).expect("a frame");
        assert_eq!(img.dimensions(), (640, 480));
        assert_eq!(frame::decode_step(&img, frame::LadderStep::Plain), None);
        assert_eq!(
            decode(&png, Ladder::Live)
                .expect("a valid frame")
                .as_deref(),
            Some(expected.trim_end_matches('\n'))
        );
        let stats = frame::decode_live_luma(&img);
        assert_eq!(
            (stats.step, stats.attempts),
            (Some(frame::LadderStep::Rxing), 1)
        );
        // Our locator, the live pass's last rung, reads it too.
        assert_eq!(
            frame::decode_step(&img, frame::LadderStep::Finder).as_deref(),
            Some(expected.trim_end_matches('\n'))
        );
        // A frame with nothing in it climbs the live pass and reads nothing: every rung but
        // rxing on the median, which only a speckled frame gets.
        let blank = image::GrayImage::from_pixel(640, 480, image::Luma([170]));
        let stats = frame::decode_live_luma(&blank);
        assert_eq!(
            (stats.text, stats.attempts),
            (None, frame::LadderStep::LIVE.len() as u32 - 1)
        );
    }

    #[test]
    fn every_verdict_has_a_kind_and_both_messages() {
        for v in Verdict::ALL {
            let (ko, en) = messages(v, None);
            assert!(!ko.is_empty() && !en.is_empty(), "{v}");
            assert!(!verdict_kind(v).is_empty());
        }
        assert_eq!(verdict_kind(Verdict::Accepted), "accepted");
        let (_, en) = messages(Verdict::Malformed, Some("https://example.com/menu"));
        assert!(en.to_lowercase().contains("not a check-in code"), "{en}");
    }

    /// The page's entry for `key` in its message table (`'key': { ko: "..", en: "..", zh: ".." }`).
    fn page_entry(key: &str) -> &'static str {
        let start = PAGE_JS
            .find(&format!("'{key}': {{"))
            .unwrap_or_else(|| panic!("kiosk.js has no message {key:?}"));
        let rest = &PAGE_JS[start..];
        &rest[..rest.find('}').unwrap_or(rest.len())]
    }

    #[test]
    fn the_page_has_every_message_the_device_names_in_three_languages() {
        use shared::token::Malformed;
        let mut cases: Vec<(&str, &str, &str)> = Verdict::ALL
            .into_iter()
            .map(|v| (message_key(v, None), v.message_ko(), v.message_en()))
            .collect();
        for m in [
            Malformed::NotCheckInCode,
            Malformed::WrongLength { len: 3 },
            Malformed::TtlOutOfRange { ttl: 0 },
        ] {
            cases.push((malformed_key(&m), m.message_ko(), m.message_en()));
        }
        for (key, ko, en) in cases {
            let entry = page_entry(key);
            assert!(entry.contains(&format!("ko: \"{ko}\"")), "{key}: {entry}");
            assert!(entry.contains(&format!("en: \"{en}\"")), "{key}: {entry}");
            assert!(entry.contains("zh: \""), "{key}: {entry}");
        }
        // What the frame route answers for texts of each kind.
        assert_eq!(
            message_key(Verdict::Malformed, Some("https://example.com/menu")),
            "malformed.not_checkin_code"
        );
        assert_eq!(
            message_key(Verdict::Malformed, Some("KP1:abc")),
            "malformed.unreadable"
        );
        assert_eq!(message_key(Verdict::Malformed, None), "malformed");
        assert_eq!(message_key(Verdict::Expired, Some("KP1:abc")), "expired");
    }

    #[test]
    fn only_this_devices_names_and_addresses_pass_the_host_check() {
        let own: [IpAddr; 3] = [
            "127.0.0.1".parse().unwrap(),
            "192.168.0.20".parse().unwrap(),
            "fe80::1".parse().unwrap(),
        ];
        let is_own = |ip: IpAddr| own.contains(&ip.to_canonical());
        let check = |h: &str| host_check(h, Some("gate-1"), is_own);
        for ok in [
            "127.0.0.1",
            "127.0.0.1:7451",
            "192.168.0.20:80",
            "[fe80::1]",
            "[fe80::1]:7451",
            "[::ffff:192.168.0.20]:7451",
            "localhost",
            "LOCALHOST:7451",
            "localhost.:7451",
            "gate-1",
            "Gate-1.local:7451",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for foreign in [
            "evil.example",
            "evil.example:7451",
            "192.168.0.21:7451",
            "[fe80::2]",
            "gate-1.evil.example",
            "localhost.evil.example",
            "gate-2.local",
        ] {
            assert_eq!(check(foreign), Err(HostRefusal::Foreign), "{foreign}");
        }
        for malformed in [
            "",
            ":7451",
            "127.0.0.1:",
            "127.0.0.1:http",
            "127.0.0.1:7451:1",
            "::1",
            "[::1",
            "[::1]x",
            "[not-v6]:80",
            "evil example",
            "evil/example",
            "127.0.0.1:123456",
        ] {
            assert_eq!(check(malformed), Err(HostRefusal::Malformed), "{malformed}");
        }
        // Without a known hostname, names other than localhost are refused.
        assert_eq!(
            host_check("gate-1", None, is_own),
            Err(HostRefusal::Foreign)
        );
        // The real test of an address: loopback always, a documentation address never.
        assert!(is_this_machine("127.0.0.1".parse().unwrap()));
        assert!(is_this_machine("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_this_machine("203.0.113.9".parse().unwrap()));
        assert!(!is_this_machine("0.0.0.0".parse().unwrap()));
    }

    /// Finding 1 of the edge review: the decode permit was held by the request's future, so a
    /// client that posted a frame and hung up released it while the decode ran on. Forty
    /// requests, each dropped a moment after its decode started, must never have more than
    /// [`MAX_DECODES`] decodes running at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hung_up_frames_never_run_more_decodes_than_the_cap() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let decoders = Arc::new(Semaphore::new(MAX_DECODES));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        for _ in 0..40 {
            let (running, peak) = (running.clone(), peak.clone());
            let slow_decode = move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(40));
                running.fetch_sub(1, Ordering::SeqCst);
            };
            // The client hangs up: the request's future is dropped, the decode is not.
            let hung_up = tokio::time::timeout(
                Duration::from_millis(5),
                decode_within_cap(&decoders, slow_decode),
            )
            .await;
            assert!(hung_up.is_err(), "the decode outlasts the client");
        }
        // Every decode started ends (within 40 x 40 ms when run two at a time).
        let deadline = Instant::now() + Duration::from_secs(10);
        while (running.load(Ordering::SeqCst) > 0 || decoders.available_permits() < MAX_DECODES)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(decoders.available_permits(), MAX_DECODES);
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            (1..=MAX_DECODES).contains(&peak),
            "{peak} decodes ran at once, the cap is {MAX_DECODES}"
        );
    }

    #[test]
    fn frame_types_and_cookies_are_parsed() {
        let mut h = HeaderMap::new();
        assert!(frame_type(&h).is_err());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("IMAGE/JPEG; q=1"),
        );
        assert_eq!(frame_type(&h), Ok("image/jpeg"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/gif"));
        assert!(frame_type(&h).unwrap_err().contains("image/gif"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; kiosk_staff=abc123 ; c=d"),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("abc123"));
        h.insert(header::COOKIE, HeaderValue::from_static("kiosk_staffx=1"));
        assert_eq!(session_cookie(&h), None);
    }
}
