//! The hub's HTTP API: the people's routes (health authority, local government, operators),
//! what commands use while `run` holds the store, Prometheus metrics and the dashboard page.
//!
//! Every route is listed once, in [`ROUTES`], with the operation of
//! [`crate::people::PERMISSIONS`] it is; [`router`] is built from that list. Every route that
//! returns data needs a bearer credential (`Authorization: Bearer ...`): one made with
//! `sync-hub credential add`, or the local operator's token in `keys/operator.token`. A
//! `route_layer` middleware ([`gate`]) asks the actor to authenticate it and checks the
//! route's operation against the table BEFORE the handler's extractors run, so the request
//! body is not even read (let alone parsed) for a missing, unknown or revoked credential
//! (401) or one of the wrong role (403); the caller is handed to the handler in the request
//! extensions. Region scoping is checked by [`crate::people::Desk`] after that. Only `GET /`
//! (the dashboard page, which holds no data and asks for a credential) and `GET /healthz`
//! are open (`/healthz?detail=1` answers states and times only: [`crate::health::Health`]).
//!
//! Writes (approvals, removals, designations, purges, `/api/admin`) run as one job on the
//! hub's actor thread ([`HubHandle::query`]), between two sync frames. Reads do not hold the
//! actor: every `GET` route and the read part of a trace run on a blocking thread over a redb
//! read transaction ([`crate::reads`]), with a bound on how many run at once (over it, 503
//! with `Retry-After`); a trace's or report's audit entry is appended on the actor, after the
//! read and before the answer. The actor keeps the authentication of [`gate`] (a few rows).

use crate::auth::{self, Principal};
use crate::commands::AdminCommand;
use crate::daemon::{HubHandle, Metrics};
use crate::gov::Target;
use crate::ledger::Ledger;
use crate::people::{self, Desk, FacilityView, Op, OpError};
use crate::reads::{self, ReadError, Weight};
use crate::trace::{self, TraceRequest};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use shared::time::Day;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The dashboard page: one file, no external assets.
const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");

pub use crate::trace::{MAX_WINDOW_MINUTES, parse_tokens};

#[derive(Clone)]
struct AppState {
    hub: HubHandle,
    token: Arc<String>,
    /// The last health write probe: when, and whether it committed.
    probe: Probe,
    /// The bounds of the reads off the actor.
    reads: reads::Pool,
}

/// One route of the API.
pub struct Route {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The path, axum's syntax (`{id}` a parameter).
    pub path: &'static str,
    /// The operation it is ([`crate::people::PERMISSIONS`]); `None` for the two open routes.
    pub op: Option<Op>,
    handler: fn() -> MethodRouter<AppState>,
}

const fn route(
    method: &'static str,
    path: &'static str,
    op: Option<Op>,
    handler: fn() -> MethodRouter<AppState>,
) -> Route {
    Route {
        method,
        path,
        op,
        handler,
    }
}

/// Every route of the API, the one list [`router`] is built from.
pub const ROUTES: &[Route] = &[
    route("GET", "/", None, || get(|| async { Html(DASHBOARD_HTML) })),
    route("GET", "/healthz", None, || get(healthz)),
    route("GET", "/metrics", Some(Op::Metrics), || get(metrics)),
    route("GET", "/api/whoami", Some(Op::Whoami), || get(whoami)),
    route("GET", "/api/stats", Some(Op::Stats), || get(stats)),
    route("POST", "/api/purge", Some(Op::Purge), || post(purge)),
    route("POST", "/api/admin", Some(Op::AdminRoute), || post(admin)),
    route("POST", "/api/trace", Some(Op::Trace), || post(trace)),
    route(
        "GET",
        "/api/reports/shared-codes",
        Some(Op::SharedCodes),
        || get(shared_codes),
    ),
    route(
        "GET",
        "/api/reports/compliance",
        Some(Op::Compliance),
        || get(compliance),
    ),
    route("GET", "/api/facilities", Some(Op::Facilities), || {
        get(facilities)
    }),
    route("GET", "/api/facilities/pending", Some(Op::Pending), || {
        get(pending)
    }),
    route(
        "GET",
        "/api/facilities/duplicates",
        Some(Op::Duplicates),
        || get(duplicates),
    ),
    route(
        "POST",
        "/api/facilities/duplicates/remove",
        Some(Op::RemoveDuplicates),
        || post(remove_duplicates),
    ),
    route(
        "POST",
        "/api/facilities/{id}/approve",
        Some(Op::Approve),
        || post(approve),
    ),
    route(
        "POST",
        "/api/facilities/{id}/remove",
        Some(Op::Remove),
        || post(remove),
    ),
    route("GET", "/api/designations", Some(Op::Designations), || {
        get(designations)
    }),
    route("POST", "/api/designations", Some(Op::Designate), || {
        post(designate)
    }),
    route(
        "POST",
        "/api/designations/{id}/remove",
        Some(Op::RemoveDesignation),
        || post(remove_designation),
    ),
    route("GET", "/api/audit", Some(Op::Audit), || get(audit)),
    route("GET", "/api/audit/verify", Some(Op::AuditVerify), || {
        get(audit_verify)
    }),
    route("GET", "/api/dashboard", Some(Op::Dashboard), || {
        get(dashboard)
    }),
];

/// What [`gate`] needs: the hub, the operator token and the route's operation.
#[derive(Clone)]
struct Gate {
    app: AppState,
    op: Op,
}

/// The router, for `run` and for in-process tests: every route of [`ROUTES`], the ones with
/// an operation behind [`gate`].
pub fn router(hub: HubHandle, operator_token: String) -> Router {
    router_with(hub, operator_token, reads::Pool::default())
}

/// [`router`] with other bounds on the reads off the actor (tests).
pub fn router_with(hub: HubHandle, operator_token: String, pool: reads::Pool) -> Router {
    let app = AppState {
        hub,
        token: Arc::new(operator_token),
        probe: Arc::default(),
        reads: pool,
    };
    let mut router = Router::new();
    for r in ROUTES {
        let handler = (r.handler)();
        let handler = match r.op {
            None => handler,
            Some(op) => handler.route_layer(middleware::from_fn_with_state(
                Gate {
                    app: app.clone(),
                    op,
                },
                gate,
            )),
        };
        router = router.route(r.path, handler);
    }
    router
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

/// Authenticates the bearer credential on the actor thread and checks the route's operation
/// against [`crate::people::PERMISSIONS`], before any extractor of the handler runs (the body
/// is not read); on success the caller goes into the request's extensions.
async fn gate(State(g): State<Gate>, mut req: Request, next: Next) -> Response {
    let given = bearer(req.headers());
    let token = g.app.token.clone();
    let op = g.op;
    let who = g
        .app
        .hub
        .query(move |hub, _, _| -> Result<Principal, OpError> {
            let who = auth::authenticate(hub.store(), given.as_deref(), &token)?;
            people::permit(&who, op)?;
            Ok(who)
        })
        .await;
    match who {
        Err(stopped) => error(StatusCode::SERVICE_UNAVAILABLE, &stopped),
        Ok(Err(e)) => op_error(&e),
        Ok(Ok(who)) => {
            req.extensions_mut().insert(who);
            next.run(req).await
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn op_error(e: &OpError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, &e.to_string())
}

/// What a job answers with.
enum Reply {
    Json(serde_json::Value),
    Csv(String),
    Text(String),
}

fn json<T: serde::Serialize>(v: T) -> Result<Reply, OpError> {
    serde_json::to_value(v)
        .map(Reply::Json)
        .map_err(|e| OpError::Invalid(format!("cannot encode the answer: {e}")))
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// Runs `job` on the actor thread as `who`, the caller [`gate`] authenticated.
async fn serve<F>(s: &AppState, who: Principal, job: F) -> Response
where
    F: FnOnce(&Desk<'_>, &Principal, &Metrics) -> Result<Reply, OpError> + Send + 'static,
{
    let answer = s
        .hub
        .query(move |hub, ledger: &Ledger<'_>, metrics| {
            let desk = Desk::new(hub, ledger, crate::clock::now());
            // A write: the hub link replicates registry edits at its next round.
            metrics.admin_writes.fetch_add(1, Ordering::Relaxed);
            job(&desk, &who, metrics)
        })
        .await;
    match answer {
        Err(stopped) => error(StatusCode::SERVICE_UNAVAILABLE, &stopped),
        Ok(answer) => respond(answer),
    }
}

/// Runs the read `job` off the actor ([`reads::read`]) as `who`, counted against `weight`.
async fn serve_read<F>(s: &AppState, who: Principal, weight: Weight, job: F) -> Response
where
    F: FnOnce(&Desk<'_>, &Principal, &Metrics) -> Result<Reply, OpError> + Send + 'static,
{
    let now = crate::clock::now();
    let id = who.id.clone();
    let answer = reads::read_as(&s.hub, &s.reads, weight, &id, now, move |desk, m| {
        job(desk, &who, m)
    })
    .await;
    read_answer(answer)
}

/// Runs the audited read `job` off the actor and appends its audit event on the actor before
/// answering ([`reads::audited`]).
async fn serve_audited<F>(s: &AppState, who: Principal, weight: Weight, job: F) -> Response
where
    F: FnOnce(&Desk<'_>, &Principal, &Metrics) -> Result<(Reply, crate::audit::Event), OpError>
        + Send
        + 'static,
{
    read_answer(reads::audited(&s.hub, &s.reads, weight, who, job).await)
}

fn read_answer(answer: Result<Reply, ReadError>) -> Response {
    match answer {
        Ok(reply) => respond(Ok(reply)),
        Err(ReadError::Op(e)) => op_error(&e),
        Err(ReadError::Stopped(why)) => error(StatusCode::SERVICE_UNAVAILABLE, &why),
        Err(ReadError::Busy(busy)) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &busy.to_string());
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(busy.retry_after),
            );
            r
        }
    }
}

fn respond(answer: Result<Reply, OpError>) -> Response {
    match answer {
        Err(e) => op_error(&e),
        Ok(Reply::Json(v)) => Json(v).into_response(),
        Ok(Reply::Csv(text)) => (
            [
                ("content-type", "text/csv; charset=utf-8"),
                ("content-disposition", "attachment; filename=\"trace.csv\""),
            ],
            text,
        )
            .into_response(),
        Ok(Reply::Text(text)) => {
            ([("content-type", "text/plain; version=0.0.4")], text).into_response()
        }
    }
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, OpError> {
    b.map(|Json(v)| v)
        .map_err(|e| OpError::Invalid(e.body_text()))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, OpError> {
    q.map(|Query(v)| v)
        .map_err(|e| OpError::Invalid(e.body_text()))
}

/// The caller [`gate`] put in the request's extensions.
type Caller = Extension<Principal>;

async fn whoami(State(s): State<AppState>, Extension(who): Caller) -> Response {
    serve_read(&s, who, Weight::Light, |_, who, _| json(who)).await
}

async fn stats(State(s): State<AppState>, Extension(who): Caller) -> Response {
    serve_read(&s, who, Weight::Light, |desk, _, _| {
        json(desk.ledger.stats(desk.now)?)
    })
    .await
}

/// A purge request's body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Enforce retention as if the clock read this. Not after the hub's clock, except from
    /// the local operator (`sync-hub purge --as-of`), and then at most
    /// [`crate::people::MAX_PURGE_AHEAD_SECONDS`] ahead.
    pub as_of: Option<u64>,
}

async fn purge(
    State(s): State<AppState>,
    Extension(who): Caller,
    b: Result<Json<PurgeRequest>, JsonRejection>,
) -> Response {
    // `gate` authenticated the caller and checked the operation before the body was read.
    // The purge itself needs the actor's mutable ledger: `people::purge` checks the time
    // asked for against the actor's clock and the principal, enforces retention and audits it.
    let req = match body(b) {
        Ok(r) => r,
        Err(e) => return op_error(&e),
    };
    match s.hub.purge(who, req.as_of).await {
        Ok(Ok(r)) => Json(r).into_response(),
        Ok(Err(e)) => op_error(&e),
        Err(stopped) => error(StatusCode::SERVICE_UNAVAILABLE, &stopped),
    }
}

async fn admin(
    State(s): State<AppState>,
    Extension(who): Caller,
    b: Result<Json<AdminCommand>, JsonRejection>,
) -> Response {
    serve(&s, who, move |desk, who, _| {
        json(body(b)?.execute(desk, who)?)
    })
    .await
}

/// Query parameters of `POST /api/trace`.
#[derive(Debug, Default, Deserialize)]
pub struct TraceParams {
    /// `json` (default) or `csv`.
    pub format: Option<String>,
}

async fn trace(
    State(s): State<AppState>,
    Extension(who): Caller,
    params: Result<Query<TraceParams>, QueryRejection>,
    b: Result<Json<TraceRequest>, JsonRejection>,
) -> Response {
    serve_audited(&s, who, Weight::Trace, move |desk, who, m| {
        let params = query(params)?;
        let csv = match params.format.as_deref() {
            None | Some("json") => false,
            Some("csv") => true,
            Some(other) => {
                return Err(OpError::Invalid(format!(
                    "format {:?}: use json or csv",
                    other.chars().take(20).collect::<String>()
                )));
            }
        };
        // The health authority names its case and purpose; the hub's own operator (the
        // command line's `trace`, `spec/cli.md`) may leave them out.
        let q = body(b)?
            .check(desk.now, !who.local)
            .map_err(OpError::Invalid)?;
        let started = Instant::now();
        let read = desk.trace_unaudited(who, &q);
        m.trace_seconds.observe(started.elapsed());
        let (report, event) = read?;
        let mut report = with_peer_days(desk, who, &q, report);
        trace::retain_live(
            &mut report,
            trace::live_floor(desk.hub, crate::clock::now()),
        );
        let reply = if csv {
            Reply::Csv(trace::to_csv(&report))
        } else {
            json(report)?
        };
        Ok((reply, event))
    })
    .await
}

/// The region's other hub's part of a trace, merged in: when paired, a trace at either
/// hub asks the other for the same period, so it finds a visit that only the other holds yet
/// (the link runs every few seconds) and the days a rebuilt hub cannot read; each hub audits
/// its own part, and the report says which hub answered for which days. Runs on a blocking
/// thread of the reads pool, bounded by the link's timeouts.
fn with_peer_days(
    desk: &Desk<'_>,
    who: &Principal,
    q: &trace::TraceQuery,
    report: trace::TraceReport,
) -> trace::TraceReport {
    let Ok(Some(peer)) = crate::replica::peer(desk.hub.store()) else {
        return report;
    };
    let (_, unreadable) = trace::readable_split(q, desk.hub.config().created_at);
    let request = trace::TraceRequest {
        tokens: q.tokens.iter().map(hex::encode).collect(),
        window_minutes: Some(q.window_minutes),
        case: q.case.clone(),
        purpose: q.purpose.clone(),
        from: Some(q.from),
        to: Some(q.to),
    };
    let answer = match (
        crate::link::ENDPOINT.get(),
        tokio::runtime::Handle::try_current(),
    ) {
        (Some(endpoint), Ok(rt)) => rt.block_on(crate::link::ask_trace(
            endpoint, &peer, request, &who.name, who.local,
        )),
        _ => Err("this hub's sync endpoint is not running".to_owned()),
    };
    trace::merge_peer_answer(report, &peer.endpoint_id, q, unreadable, answer)
}

/// A period in query parameters.
#[derive(Debug, Default, Deserialize)]
pub struct Period {
    /// Start, Unix seconds.
    pub from: Option<u64>,
    /// End, Unix seconds.
    pub to: Option<u64>,
}

async fn shared_codes(
    State(s): State<AppState>,
    Extension(who): Caller,
    q: Result<Query<Period>, QueryRejection>,
) -> Response {
    serve_audited(&s, who, Weight::Heavy, move |desk, who, _| {
        let p = query(q)?;
        let (mut report, event) = desk.shared_codes_unaudited(who, p.from, p.to)?;
        trace::retain_live_codes(
            &mut report,
            trace::live_floor(desk.hub, crate::clock::now()),
        );
        Ok((json(report)?, event))
    })
    .await
}

/// `?hours=N` (default 24).
#[derive(Debug, Default, Deserialize)]
pub struct Hours {
    /// The period, hours.
    pub hours: Option<u64>,
}

async fn compliance(
    State(s): State<AppState>,
    Extension(who): Caller,
    q: Result<Query<Hours>, QueryRejection>,
) -> Response {
    serve_read(&s, who, Weight::Heavy, move |desk, who, _| {
        let h = query(q)?;
        json(desk.compliance(who, h.hours.unwrap_or(24))?)
    })
    .await
}

async fn facilities(State(s): State<AppState>, Extension(who): Caller) -> Response {
    serve_read(&s, who, Weight::Light, |desk, who, _| {
        json(
            desk.facilities(who)?
                .iter()
                .map(FacilityView::from)
                .collect::<Vec<_>>(),
        )
    })
    .await
}

async fn pending(State(s): State<AppState>, Extension(who): Caller) -> Response {
    serve_read(&s, who, Weight::Light, |desk, who, _| {
        json(
            desk.pending(who)?
                .iter()
                .map(FacilityView::from)
                .collect::<Vec<_>>(),
        )
    })
    .await
}

async fn duplicates(State(s): State<AppState>, Extension(who): Caller) -> Response {
    serve_read(&s, who, Weight::Light, |desk, who, _| {
        json(
            desk.duplicates(who)?
                .iter()
                .map(|g| g.iter().map(FacilityView::from).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        )
    })
    .await
}

async fn remove_duplicates(State(s): State<AppState>, Extension(who): Caller) -> Response {
    serve(&s, who, |desk, who, _| {
        let removed: Vec<String> = desk
            .remove_duplicates(who)?
            .iter()
            .map(|f| f.id.to_string())
            .collect();
        json(serde_json::json!({ "removed": removed }))
    })
    .await
}

async fn approve(
    State(s): State<AppState>,
    Extension(who): Caller,
    Path(id): Path<String>,
) -> Response {
    serve(&s, who, move |desk, who, _| {
        json(FacilityView::from(&desk.approve(who, &id)?))
    })
    .await
}

/// `POST /api/facilities/{id}/remove` body (optional).
#[derive(Debug, Default, Deserialize)]
pub struct RemoveRequest {
    /// Why (kept in the audit log).
    pub reason: Option<String>,
}

async fn remove(
    State(s): State<AppState>,
    Extension(who): Caller,
    Path(id): Path<String>,
    b: Result<Json<RemoveRequest>, JsonRejection>,
) -> Response {
    serve(&s, who, move |desk, who, _| {
        // The body is optional: no body (no JSON content type) means no reason given.
        let given = match b {
            Ok(Json(r)) => r.reason,
            Err(JsonRejection::MissingJsonContentType(_)) => None,
            Err(e) => return Err(OpError::Invalid(e.body_text())),
        };
        let reason = given
            .map(|r| r.chars().filter(|c| !c.is_control()).take(200).collect())
            .unwrap_or_else(|| "removed by request".to_owned());
        let f = desk.remove(who, &id, &reason)?;
        json(serde_json::json!({ "facility_id": f.id, "removed": true }))
    })
    .await
}

/// `POST /api/designations` body.
#[derive(Debug, Deserialize)]
pub struct DesignateRequest {
    /// What becomes mandatory.
    pub target: Target,
    /// The region (the local operator's category designations).
    pub region: Option<String>,
}

async fn designations(State(s): State<AppState>, Extension(who): Caller) -> Response {
    serve_read(&s, who, Weight::Light, |desk, who, _| {
        json(desk.designations(who)?)
    })
    .await
}

async fn designate(
    State(s): State<AppState>,
    Extension(who): Caller,
    b: Result<Json<DesignateRequest>, JsonRejection>,
) -> Response {
    serve(&s, who, move |desk, who, _| {
        let req = body(b)?;
        json(desk.designate(who, req.target, req.region.as_deref())?)
    })
    .await
}

async fn remove_designation(
    State(s): State<AppState>,
    Extension(who): Caller,
    Path(id): Path<String>,
) -> Response {
    serve(&s, who, move |desk, who, _| {
        json(desk.remove_designation(who, &id)?)
    })
    .await
}

/// `?limit=N` (default 100).
#[derive(Debug, Default, Deserialize)]
pub struct Limit {
    /// The last this many entries.
    pub limit: Option<usize>,
}

async fn audit(
    State(s): State<AppState>,
    Extension(who): Caller,
    q: Result<Query<Limit>, QueryRejection>,
) -> Response {
    serve_read(&s, who, Weight::Heavy, move |desk, who, _| {
        let l = query(q)?;
        json(desk.audit_entries(who, Some(l.limit.unwrap_or(100).min(10_000)))?)
    })
    .await
}

async fn audit_verify(State(s): State<AppState>, Extension(who): Caller) -> Response {
    serve_read(&s, who, Weight::Heavy, |desk, who, _| {
        json(desk.audit_verify(who)?)
    })
    .await
}

async fn dashboard(
    State(s): State<AppState>,
    Extension(who): Caller,
    q: Result<Query<Hours>, QueryRejection>,
) -> Response {
    serve_read(&s, who, Weight::Heavy, move |desk, who, _| {
        let h = query(q)?;
        Ok(Reply::Json(desk.dashboard(who, h.hours.unwrap_or(24))?))
    })
    .await
}

/// How long a health check's answer is reused: `/healthz` needs no credential, so a flood of
/// detailed checks costs one job on the hub's actor (and one durable write) per this period,
/// not one per request, and cannot crowd out sync sessions or the watchdog's own check.
pub const PROBE_REUSE: Duration = Duration::from_secs(5);

/// Whether a request asks for the detailed health check (`host::wants_health_detail`).
fn wants_detail(req: &Request) -> bool {
    let accept = req.headers().get("accept").and_then(|v| v.to_str().ok());
    host::wants_health_detail(req.uri().query(), accept)
}

/// The last health check: when, and its answer. Requests wait for one check at a time.
pub type Probe = Arc<tokio::sync::Mutex<Option<(Instant, crate::health::Health)>>>;

/// The hub's health check ([`crate::health::Health`]), as `/healthz?detail=1` answers it and
/// the systemd watchdog uses it: a real write probe into `config-1`, the day keys, the last
/// retention run and the newest device sync, all read on the actor, at most once per
/// [`PROBE_REUSE`] per `probe` (the answer is reused meanwhile); an error when the actor does
/// not answer.
pub async fn check_health(hub: &HubHandle, probe: &Probe) -> Result<crate::health::Health, String> {
    let mut last = probe.lock().await;
    if let Some((at, health)) = last.as_ref()
        && at.elapsed() < PROBE_REUSE
    {
        return Ok(health.clone());
    }
    let health = compute_health(hub).await?;
    *last = Some((Instant::now(), health.clone()));
    Ok(health)
}

async fn compute_health(hub: &HubHandle) -> Result<crate::health::Health, String> {
    hub.query(move |hub, ledger, m| {
        let now = crate::clock::now();
        let store_writable = hub.store().set_config("health_probe", &now).is_ok();
        let today = Day::of(now);
        let oldest = ledger.oldest_live_day(now);
        let last = Ledger::last_live_day(now);
        // Days from today on whose key the hub can still derive, of those it hands out.
        let ahead = crate::registry::DAY_KEYS_AHEAD;
        let future = ahead.saturating_sub(oldest.0.saturating_sub(today.0));
        let last_sync = hub
            .store()
            .devices()
            .ok()
            .and_then(|ds| ds.iter().filter_map(|d| d.last_sync).max());
        let last_purge = Some(m.last_purge_at.load(Ordering::Relaxed)).filter(|t| *t > 0);
        let facts = crate::health::HealthFacts {
            store_writable,
            future_day_keys: future,
            last_purge,
            last_purge_failed: m.last_purge_failed.load(Ordering::Relaxed) > 0,
            started: m.started_at.load(Ordering::Relaxed),
        };
        let (status, problems) = crate::health::decide(&facts, now);
        crate::health::Health {
            status,
            store_writable,
            day_keys_ahead: future,
            day_keys_left: last.0.saturating_sub(oldest.0) + 1,
            last_purge,
            last_sync,
            problems,
        }
    })
    .await
}

/// `GET /healthz`: `ok` for a bare request (as before); with `?detail=1` or
/// `Accept: application/json`, [`crate::health::Health`] (a real write probe into
/// `config-1`, the day keys, the last retention run and the newest device sync), 503 when
/// unhealthy. Open like the bare check: it holds states and times only (no name, id, count
/// or secret), which a watchdog needs without a credential; its one cost, a durable write,
/// is made at most once per [`PROBE_REUSE`] and on the actor, behind its bounded queue.
async fn healthz(State(s): State<AppState>, req: Request) -> Response {
    if !wants_detail(&req) {
        return "ok".into_response();
    }
    let answer = check_health(&s.hub, &s.probe).await;
    match answer {
        Err(stopped) => error(StatusCode::SERVICE_UNAVAILABLE, &stopped),
        Ok(h) => {
            let code = if h.status == crate::health::Overall::Unhealthy {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            (code, Json(h)).into_response()
        }
    }
}

async fn metrics(State(s): State<AppState>, Extension(who): Caller) -> Response {
    serve_read(&s, who, Weight::Light, |desk, _, m| {
        Ok(Reply::Text(metrics_text(desk, m)?))
    })
    .await
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of the hub's counters and gauges.
pub fn metrics_text(desk: &Desk<'_>, m: &Metrics) -> Result<String, OpError> {
    let mut out = String::new();
    let head = |out: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    for (name, help, v) in [
        (
            "kipass_sync_sessions_completed_total",
            "Sync sessions that completed.",
            &m.sessions_completed,
        ),
        (
            "kipass_sync_sessions_failed_total",
            "Sync sessions refused or failed.",
            &m.sessions_failed,
        ),
        (
            "kipass_refused_devices_total",
            "Devices refused at admission.",
            &m.refused_devices,
        ),
        (
            "kipass_records_ingested_total",
            "Records merged and indexed.",
            &m.records_ingested,
        ),
        (
            "kipass_sync_bytes_received_total",
            "UDP bytes received on sync connections.",
            &m.bytes_received,
        ),
        (
            "kipass_sync_bytes_sent_total",
            "UDP bytes sent on sync connections.",
            &m.bytes_sent,
        ),
        (
            "kipass_retention_runs_total",
            "Retention runs.",
            &m.retention_runs,
        ),
        (
            "kipass_records_fallback_key_total",
            "Records indexed whose session key a device wrapped to an earlier day's key (it ran \
             out of day keys): readable only until that earlier day expires.",
            &m.records_fallback_key,
        ),
        (
            "kipass_sync_persist_failures_total",
            "Sync sessions aborted because a partition or sync state could not be stored.",
            &m.persist_failures,
        ),
        (
            "kipass_sync_connections_refused_total",
            "Sync connections closed at once because the hub was at its connection cap.",
            &m.connections_refused,
        ),
        (
            "kipass_sync_v1_refused_total",
            "Sync connections of protocol v1 told to upgrade edge-node and closed.",
            &m.v1_refused,
        ),
        (
            "kipass_hub_group_commits_total",
            "Durable commits that ended a turn of the hub's actor with writes (group commit: \
             the turn's writes commit without fsync, then this one commit makes them durable \
             before any frame of the turn is sent).",
            &m.group_commits,
        ),
        (
            "kipass_hub_group_commit_writes_total",
            "Write transactions of sync sessions covered by those durable commits.",
            &m.group_commit_writes,
        ),
        (
            "kipass_sync_quota_refusals_total",
            "Sync sessions refused because a device went over its bytes per session or records \
             per device per day.",
            &m.quota_refusals,
        ),
    ] {
        head(&mut out, name, help, "counter");
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
    for (name, help, v) in [
        (
            "kipass_retention_failures_total",
            "Retention runs that failed.",
            &m.retention_failures,
        ),
        (
            "kipass_retention_records_purged_total",
            "Records dropped by retention since the hub started.",
            &m.records_purged,
        ),
        (
            "kipass_hub_link_rounds_total",
            "Hub link exchanges with the region's other hub that completed.",
            &m.link_rounds,
        ),
        (
            "kipass_hub_link_failures_total",
            "Hub link exchanges that failed (the other hub unreachable or refusing).",
            &m.link_failures,
        ),
    ] {
        head(&mut out, name, help, "counter");
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
    head(
        &mut out,
        "kipass_retention_last_run_timestamp_seconds",
        "The last retention run that succeeded, Unix seconds (absent: none since the start).",
        "gauge",
    );
    let last_purge = m.last_purge_at.load(Ordering::Relaxed);
    if last_purge > 0 {
        let _ = writeln!(
            out,
            "kipass_retention_last_run_timestamp_seconds {last_purge}"
        );
    }
    head(
        &mut out,
        "kipass_retention_last_records_purged",
        "Records in the partitions the last successful retention run dropped.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "kipass_retention_last_records_purged {}",
        m.last_purge_records.load(Ordering::Relaxed)
    );
    let peer = crate::replica::peer(desk.hub.store())?;
    head(
        &mut out,
        "kipass_hub_peer_paired",
        "1 when this hub is paired with its region's other hub, 0 when it is the only one.",
        "gauge",
    );
    let _ = writeln!(out, "kipass_hub_peer_paired {}", u8::from(peer.is_some()));
    head(
        &mut out,
        "kipass_hub_link_last_ok_timestamp_seconds",
        "When the last hub link exchange completed, Unix seconds (absent: none since the start).",
        "gauge",
    );
    let last_link = m.link_last_ok.load(Ordering::Relaxed);
    if last_link > 0 {
        let _ = writeln!(out, "kipass_hub_link_last_ok_timestamp_seconds {last_link}");
    }
    m.trace_seconds.render(
        &mut out,
        "kipass_trace_duration_seconds",
        "How long traces took at the hub (POST /api/trace), seconds.",
    );
    head(
        &mut out,
        "kipass_hub_actor_hold_max_seconds",
        "The longest one input held the hub's actor (which runs every sync session) since the \
         start, by kind: frame, session, query, admin, stats, purge_start, purge_chunk, commit (a turn's durable commit), other.",
        "gauge",
    );
    for k in crate::daemon::HoldKind::ALL {
        let _ = writeln!(
            out,
            "kipass_hub_actor_hold_max_seconds{{kind=\"{}\"}} {}",
            k.label(),
            m.holds.max(k).as_secs_f64()
        );
    }
    head(
        &mut out,
        "kipass_hub_actor_holds_total",
        "Inputs the hub's actor handled (and purge steps it ran), by kind.",
        "counter",
    );
    for k in crate::daemon::HoldKind::ALL {
        let _ = writeln!(
            out,
            "kipass_hub_actor_holds_total{{kind=\"{}\"}} {}",
            k.label(),
            m.holds.count(k)
        );
    }
    m.holds.seconds.render(
        &mut out,
        "kipass_hub_actor_hold_seconds",
        "How long each input (and each purge step) held the hub's actor, seconds.",
    );
    let now = desk.now;
    let store = desk.hub.store();
    let facilities = store.facilities()?;
    let devices = store.devices()?;
    head(
        &mut out,
        "kipass_facilities",
        "Registered facilities by approval state.",
        "gauge",
    );
    for status in ["approved", "pending"] {
        let n = facilities
            .iter()
            .filter(|f| f.status.as_str() == status)
            .count();
        let _ = writeln!(out, "kipass_facilities{{status=\"{status}\"}} {n}");
    }
    let stats = desk.ledger.stats(now)?;
    head(
        &mut out,
        "kipass_sync_refusals_total",
        "Sync sessions ended by a refusal, by reason (kept in the store: survives restarts).",
        "counter",
    );
    for (reason, n) in &stats.refusals_by_reason {
        let _ = writeln!(
            out,
            "kipass_sync_refusals_total{{reason=\"{}\"}} {n}",
            label(reason)
        );
    }
    head(
        &mut out,
        "kipass_records_held",
        "Records in live partitions.",
        "gauge",
    );
    let _ = writeln!(out, "kipass_records_held {}", stats.records);
    head(
        &mut out,
        "kipass_records_fallback_key_held",
        "Records in live partitions sealed to an earlier day's key by a device's day-key \
         fallback: they become unreadable when that day expires, before their own day does.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "kipass_records_fallback_key_held {}",
        stats.records_fallback_key
    );
    head(
        &mut out,
        "kipass_facility_records_fallback_key_held",
        "kipass_records_fallback_key_held by facility (facilities that have any): a device \
         there has gone too long without a sync.",
        "gauge",
    );
    for (f, n) in &stats.fallback_per_facility {
        let _ = writeln!(
            out,
            "kipass_facility_records_fallback_key_held{{facility=\"{}\"}} {n}",
            label(f)
        );
    }
    crate::health::render_revoked_refused(&mut out, &stats.revoked_refused_per_device);
    let oldest = desk.ledger.oldest_live_day(now);
    let last = Ledger::last_live_day(now);
    head(
        &mut out,
        "kipass_day_keys_left",
        "Day secrets the hub still holds (oldest live day to tomorrow); each is destroyed when its day expires.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "kipass_day_keys_left {}",
        last.0.saturating_sub(oldest.0) + 1
    );
    head(
        &mut out,
        "kipass_oldest_live_day",
        "The oldest day whose visits are still readable (days since 1970-01-01).",
        "gauge",
    );
    let _ = writeln!(out, "kipass_oldest_live_day {}", oldest.0);

    let mut by_facility: BTreeMap<&str, (Option<u64>, usize, Option<u32>)> = BTreeMap::new();
    let today = Day::of(now);
    for d in devices.iter().filter(|d| !d.revoked) {
        let e = by_facility.entry(d.facility.as_str()).or_default();
        e.0 = e.0.max(d.last_sync);
        if d.last_sync.is_none() {
            e.1 += 1;
        }
        // A device holds day public keys for DAY_KEYS_AHEAD days from its last contact.
        let got = Day::of(d.last_sync.unwrap_or(d.enrolled_at)).0 + crate::registry::DAY_KEYS_AHEAD;
        let left = got.saturating_sub(today.0);
        e.2 = Some(e.2.map_or(left, |l| l.min(left)));
    }
    head(
        &mut out,
        "kipass_facility_last_sync_age_seconds",
        "Seconds since any device of the facility last synced (absent: never).",
        "gauge",
    );
    for (f, (last, _, _)) in &by_facility {
        if let Some(t) = last {
            let _ = writeln!(
                out,
                "kipass_facility_last_sync_age_seconds{{facility=\"{}\"}} {}",
                label(f),
                now.saturating_sub(*t)
            );
        }
    }
    head(
        &mut out,
        "kipass_facility_last_sync_timestamp_seconds",
        "When any device of the facility last synced, Unix seconds (absent: never).",
        "gauge",
    );
    for (f, (last, _, _)) in &by_facility {
        if let Some(t) = last {
            let _ = writeln!(
                out,
                "kipass_facility_last_sync_timestamp_seconds{{facility=\"{}\"}} {t}",
                label(f)
            );
        }
    }
    head(
        &mut out,
        "kipass_device_clock_offset_seconds",
        "A device's clock minus the hub's at its last sync, by facility and device id (never \
         names; absent: never measured).",
        "gauge",
    );
    for d in devices.iter().filter(|d| !d.revoked) {
        if let Some(o) = d.clock_offset {
            let _ = writeln!(
                out,
                "kipass_device_clock_offset_seconds{{facility=\"{}\",device=\"{}\"}} {o}",
                label(d.facility.as_str()),
                label(d.id.as_str())
            );
        }
    }
    head(
        &mut out,
        "kipass_facility_devices_never_synced",
        "Enrolled devices of the facility that never synced.",
        "gauge",
    );
    for (f, (_, never, _)) in &by_facility {
        let _ = writeln!(
            out,
            "kipass_facility_devices_never_synced{{facility=\"{}\"}} {never}",
            label(f)
        );
    }
    head(
        &mut out,
        "kipass_facility_device_day_keys_left",
        "Days of hub day public keys the facility's least recently synced device still holds.",
        "gauge",
    );
    for (f, (_, _, left)) in &by_facility {
        if let Some(l) = left {
            let _ = writeln!(
                out,
                "kipass_facility_device_day_keys_left{{facility=\"{}\"}} {l}",
                label(f)
            );
        }
    }
    Ok(out)
}
