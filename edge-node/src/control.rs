//! The running device's local HTTP API: what `scan`, `status`, `paper add`, `purge`,
//! `pin set` and `sync --once` use while `run` holds the store, and the kiosk page
//! (`kiosk`), served on the same address.
//!
//! Every `/api` route needs the device's control token (`DATA/control.token`, owner-only)
//! and answers only connections from loopback, so the token never crosses a network even
//! when `run --http 0.0.0.0:7451` exposes the kiosk page to a tablet on the facility's LAN.
//! The server binds to loopback by default. A scan through it wakes the sync loop, so a new
//! visit leaves for the hub at once when a route exists.

use crate::device::{Device, StaffPin};
use crate::kiosk::{self, KioskState};
use crate::net::SharedDevice;
use crate::pairing::Pairing;
use crate::{clock, frame};
use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use rand_core::{OsRng, RngCore};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shared::paper::PaperEntry;
use shared::token::Verdict;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Notify;

/// The largest frame accepted over HTTP.
pub const MAX_FRAME_BODY: usize = 8 * 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct ControlState {
    /// The device.
    pub device: SharedDevice,
    /// Wakes the sync loop.
    pub wake: Arc<Notify>,
    /// The control token.
    pub token: Arc<String>,
}

fn token_path(data: &Path) -> PathBuf {
    data.join("control.token")
}

fn run_file(data: &Path) -> PathBuf {
    data.join("run.json")
}

/// The control token, created on first use.
pub fn control_token(data: &Path) -> Result<String> {
    let path = token_path(data);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if t.len() == 64 {
            return Ok(t);
        }
    }
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    let t = hex::encode(b);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, t.as_bytes())?;
    Ok(t)
}

/// Records where the running device answers.
pub fn write_run_file(data: &Path, http: SocketAddr) -> Result<()> {
    let v = serde_json::json!({ "pid": std::process::id(), "http": http.to_string() });
    std::fs::write(run_file(data), v.to_string()).context("cannot write run.json")
}

/// Removes the run file at shutdown.
pub fn remove_run_file(data: &Path) {
    let _ = std::fs::remove_file(run_file(data));
}

/// The router: the control API under `/api` and `/metrics` (loopback and token), the kiosk
/// page and its routes, `/healthz` (its detail on loopback only); every
/// route answers only requests whose `Host` is this device's (`kiosk::own_host_only`).
///
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so that `/api` can
/// refuse connections that do not come from loopback.
pub fn router(state: ControlState) -> Router {
    router_with(state, None)
}

/// [`router`] with tablet pairing (`pairing`: the sheet at `/pair`, `/api/pair` for
/// `edge-node pair`), as `run` serves it through `tls::serve`, which marks each request's
/// transport: plain HTTP from another machine is sent to HTTPS (`tls::https_only`).
pub fn router_with(state: ControlState, pairing: Option<Arc<Pairing>>) -> Router {
    let kiosk = KioskState::new(state.device.clone(), state.wake.clone());
    let mut api = Router::new()
        .route("/api/scan", post(scan))
        .route("/api/status", get(status))
        .route("/api/paper", post(paper))
        .route("/api/purge", post(purge))
        .route("/api/sync", post(sync_now))
        .route("/api/pin", post(set_pin))
        .route("/api/pair", post(pair))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_FRAME_BODY))
        .layer(Extension(kiosk.clone()))
        .layer(Extension(pairing.clone()))
        .layer(middleware::from_fn(loopback_only))
        .route("/healthz", get(healthz))
        .layer(Extension(Arc::new(crate::metrics::ProbeCache::default())))
        .with_state(state)
        .merge(kiosk::router(kiosk));
    if let Some(p) = pairing {
        api = api.merge(crate::pairing::router(p));
    }
    api.layer(middleware::from_fn(crate::tls::https_only))
        // Outermost: a request that names another host reaches nothing (DNS rebinding).
        .layer(middleware::from_fn_with_state(
            kiosk::OwnNames::of_this_machine(),
            kiosk::own_host_only,
        ))
}

/// `/api/pair`'s body: the address tablets reach the device on, if not the one it guesses.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PairRequest {
    /// A private IP address of this machine.
    pub host: Option<std::net::IpAddr>,
}

/// `POST /api/pair`: a new one-time pairing code (`crate::pairing`).
async fn pair(
    State(s): State<ControlState>,
    Extension(pairing): Extension<Option<Arc<Pairing>>>,
    headers: HeaderMap,
    body: Result<Json<PairRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let Some(pairing) = pairing else {
        return error(
            StatusCode::NOT_FOUND,
            "this device serves no HTTPS, so there is nothing to pair with",
        );
    };
    match pairing.offer(req.host, std::time::Instant::now(), clock::now()) {
        Ok(offer) => Json(offer).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

/// `GET /metrics`: the device's figures in Prometheus text ([`crate::metrics`]); loopback
/// only and behind the control token, like `/api` (a scrape job sends the token from
/// `DATA/control.token` as its bearer credential).
async fn metrics(State(s): State<ControlState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    match crate::metrics::render(&lock(&s.device), clock::now()) {
        Ok(text) => ([("content-type", "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Whether a request asks for the detailed health check (`host::wants_health_detail`).
fn wants_detail(req: &Request) -> bool {
    let accept = req.headers().get("accept").and_then(|v| v.to_str().ok());
    host::wants_health_detail(req.uri().query(), accept)
}

/// `GET /healthz`: a bare request gets `ok` (any address, as before); the detail
/// ([`crate::metrics::health`]: a real write probe, day keys, last sync and purge) answers
/// only on loopback, without the token (a watchdog on this machine needs no secret; it holds
/// no name, token or id), with 503 when the device cannot store visits.
async fn healthz(
    State(s): State<ControlState>,
    Extension(probe): Extension<Arc<crate::metrics::ProbeCache>>,
    req: Request,
) -> Response {
    if !wants_detail(&req) {
        return "ok".into_response();
    }
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>()
        && !is_loopback(peer.ip())
    {
        return error(
            StatusCode::FORBIDDEN,
            "the detailed health check answers only on this machine (loopback)",
        );
    }
    let health = crate::metrics::health(&lock(&s.device), &probe, clock::now());
    match health {
        Ok(mut h) => {
            if let Some(why) = crate::tls::unavailable() {
                h.problems
                    .push(format!("the kiosk's HTTPS is unavailable: {why}"));
                if h.status == crate::metrics::Overall::Ok {
                    h.status = crate::metrics::Overall::Degraded;
                }
            }
            let code = if h.status == crate::metrics::Overall::Unhealthy {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            (code, Json(h)).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// Whether a peer address is this machine (IPv4-mapped IPv6 included).
fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

/// Refuses `/api` requests from other machines. Without connection info (a router served
/// in-process without it) the token alone guards the API.
async fn loopback_only(req: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>()
        && !is_loopback(peer.ip())
    {
        return error(
            StatusCode::FORBIDDEN,
            "the control API answers only on this machine (loopback); the kiosk page is at /",
        );
    }
    next.run(req).await
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

// The error is the response itself; boxing it would only add an allocation per refusal.
#[allow(clippy::result_large_err)]
fn authorized(headers: &HeaderMap, token: &str) -> Result<(), Response> {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Err(error(StatusCode::UNAUTHORIZED, "missing bearer token")),
        Some(g) if blake3::hash(g.as_bytes()) == blake3::hash(token.as_bytes()) => Ok(()),
        Some(_) => Err(error(StatusCode::FORBIDDEN, "wrong token")),
    }
}

fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, Device> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

async fn scan(State(s): State<ControlState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    let text = match frame::decode_frame(&body) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
    };
    let verdict = match &text {
        None => Verdict::NoCode,
        Some(t) => match lock(&s.device).check_in(clock::now(), t) {
            Ok(c) => c.verdict,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
    };
    if verdict == Verdict::Accepted {
        s.wake.notify_one();
    }
    Json(serde_json::json!({ "verdict": verdict.as_str(), "text": text })).into_response()
}

async fn status(State(s): State<ControlState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    let dev = lock(&s.device);
    match dev.status(clock::now()) {
        Ok(st) => {
            let mut v = serde_json::to_value(st).unwrap_or_default();
            v["last_sync_failure"] =
                serde_json::to_value(crate::net::last_sync_failure(&dev)).unwrap_or_default();
            Json(v).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `/api/paper`'s body: the entry and whether the visitor is under 14 (then the entry needs
/// the guardian's consent, as at every other entry point). No `Debug`: it holds a name.
#[derive(Serialize, Deserialize)]
pub struct PaperRequest {
    /// The entry.
    #[serde(flatten)]
    pub entry: PaperEntry,
    /// The visitor is under 14.
    #[serde(default)]
    pub minor: bool,
}

async fn paper(
    State(s): State<ControlState>,
    headers: HeaderMap,
    body: Result<Json<PaperRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    let Json(PaperRequest { entry, minor }) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    match lock(&s.device).add_paper(clock::now(), &entry, minor) {
        Ok(id) => {
            s.wake.notify_one();
            Json(serde_json::json!({ "record_id": id.to_string(), "stored": true })).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// Wakes the sync loop and waits (up to 45 s) for the next completed hub sync.
async fn sync_now(State(s): State<ControlState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    let last = |s: &ControlState| {
        lock(&s.device)
            .status(clock::now())
            .map(|st| st.last_sync)
            .unwrap_or(None)
    };
    let before = last(&s);
    s.wake.notify_one();
    // A round starts at most 30 s after the previous one (the schedule's gap); while the
    // hub does not answer, at the next attempt of the backoff (at most 5 min).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(45);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let now = last(&s);
        if now != before {
            return Json(serde_json::json!({ "peer": "hub", "ok": true, "last_sync": now }))
                .into_response();
        }
    }
    Json(serde_json::json!({ "peer": "hub", "ok": false, "error": "the hub was not reached within 45 s; the device keeps trying in the background" }))
        .into_response()
}

/// A staff PIN to set.
#[derive(Serialize, Deserialize)]
pub struct PinRequest {
    /// The new PIN (6 to 12 digits; a shorter one is refused).
    pub pin: String,
}

/// Sets the staff PIN and ends every open staff session of the kiosk.
async fn set_pin(
    State(s): State<ControlState>,
    Extension(kiosk): Extension<KioskState>,
    headers: HeaderMap,
    body: Result<Json<PinRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    // Hashing takes a few milliseconds: off the async workers, outside the device lock.
    let pin = match tokio::task::spawn_blocking(move || StaffPin::new(&req.pin)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "hashing the PIN failed"),
    };
    if let Err(e) = lock(&s.device).set_staff_pin(&pin) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    kiosk.end_staff_sessions();
    Json(serde_json::json!({ "staff_pin_set": true })).into_response()
}

/// A purge request.
#[derive(Debug, Serialize, Deserialize)]
pub struct PurgeRequest {
    /// As if the clock read this (never earlier than now).
    pub as_of: Option<u64>,
}

async fn purge(
    State(s): State<ControlState>,
    headers: HeaderMap,
    body: Result<Json<PurgeRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    match lock(&s.device).purge(clock::now(), req.as_of) {
        Ok(r) => Json(r).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// A client for the running device, used by commands when the store is busy.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    /// Finds the running device of `data`.
    pub fn find(data: &Path) -> Result<Client> {
        let text = std::fs::read_to_string(run_file(data)).context(
            "the device store is busy but no run.json says where the running device answers: is another command holding it?",
        )?;
        let v: serde_json::Value = serde_json::from_str(&text).context("run.json is damaged")?;
        let http: SocketAddr = v["http"]
            .as_str()
            .context("run.json has no http address")?
            .parse()
            .context("run.json's http address is not IP:PORT")?;
        // `run --http 0.0.0.0:PORT` serves every interface; the API answers on loopback.
        let http = if http.ip().is_unspecified() {
            let lo: std::net::IpAddr = if http.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            SocketAddr::new(lo, http.port())
        } else {
            http
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into();
        Ok(Client {
            base: format!("http://{http}"),
            token: control_token(data)?,
            agent,
        })
    }

    /// The answer to `path` as `T`; a refusal is an error carrying the device's reason.
    fn finish<T: DeserializeOwned>(
        path: &str,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<T> {
        let status = resp.status();
        let v: serde_json::Value = resp
            .body_mut()
            .read_json()
            .with_context(|| format!("the running device answered {status} without JSON"))?;
        if !status.is_success() {
            bail!(
                "{}",
                v["error"].as_str().unwrap_or("the running device refused")
            );
        }
        serde_json::from_value(v)
            .with_context(|| format!("the running device's answer to {path} is not understood"))
    }

    /// GET a route; its answer as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self
            .agent
            .get(&format!("{}{path}", self.base))
            .header("authorization", &format!("Bearer {}", self.token))
            .call()
            .context("the running device did not answer")?;
        Self::finish(path, resp)
    }

    /// POST JSON to a route; its answer as `T`.
    pub fn post_json<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        let resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("authorization", &format!("Bearer {}", self.token))
            .send_json(body)
            .context("the running device did not answer")?;
        Self::finish(path, resp)
    }

    /// POST raw bytes (a frame) to a route; its answer as `T`.
    pub fn post_bytes<T: DeserializeOwned>(&self, path: &str, bytes: &[u8]) -> Result<T> {
        let resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("authorization", &format!("Bearer {}", self.token))
            .header("content-type", "application/octet-stream")
            .send(bytes)
            .context("the running device did not answer")?;
        Self::finish(path, resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::Day;
    use std::sync::Mutex;

    /// `/api/paper` (what `paper add` uses while `run` holds the store) applies the under-14
    /// rule like the kiosk and the CLI: a minor without a guardian's consent is refused and
    /// nothing is stored. The route used to ignore the flag and store the entry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_paper_refuses_a_minor_without_a_guardians_consent() {
        let tmp = tempfile::tempdir().expect("tmp");
        let now = clock::now();
        let dev = crate::device::tests::enrolled(&tmp, now, Day::of(now), 35);
        let data = tmp.path().join("dev");
        let device: SharedDevice = Arc::new(Mutex::new(dev));
        let state = ControlState {
            device: device.clone(),
            wake: Arc::new(Notify::new()),
            token: Arc::new(control_token(&data).expect("token")),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        write_run_file(&data, addr).expect("run.json");
        let server = tokio::spawn(
            axum::serve(
                listener,
                router(state).into_make_service_with_connect_info::<SocketAddr>(),
            )
            .into_future(),
        );
        let entry = |guardian: bool| {
            serde_json::json!({
                "name": "Hong Gildong", "phone": "010-1234-5678", "visited_at": now,
                "consent_collect": true, "consent_share": true,
                "guardian_consent": guardian, "remarks": "", "minor": true,
            })
        };
        let post = |body: serde_json::Value| {
            let data = data.clone();
            tokio::task::spawn_blocking(move || {
                Client::find(&data)?.post_json::<serde_json::Value>("/api/paper", &body)
            })
        };
        let records = |device: &SharedDevice| {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            dev.store()
                .pending_days()
                .expect("pending days")
                .iter()
                .map(|d| dev.store().pending(*d).expect("pending").len())
                .sum::<usize>()
        };
        let refused = post(entry(false)).await.expect("joined");
        let msg = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("guardian"), "not refused: {msg:?}");
        assert_eq!(records(&device), 0, "a refused entry stored something");
        let stored = post(entry(true)).await.expect("joined").expect("stored");
        assert_eq!(stored["stored"], true);
        assert_eq!(records(&device), 2, "the session key's row and the entry");
        server.abort();
    }
}
