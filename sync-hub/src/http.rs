//! The hub's HTTP API: what commands use while `run` holds the store, and Prometheus
//! metrics. Every `/api` route needs the operator's bearer token (`keys/operator.token`);
//! `/metrics` and `/healthz` are open, as scrapers expect, and reveal no visit.

use crate::daemon::HubHandle;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
struct AppState {
    hub: HubHandle,
    token: Arc<String>,
}

/// The router, for `run` and for in-process tests.
pub fn router(hub: HubHandle, operator_token: String) -> Router {
    Router::new()
        .route("/api/stats", get(stats))
        .route("/api/trace", post(trace))
        .route("/api/purge", post(purge))
        .route("/api/admin", post(admin))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState {
            hub,
            token: Arc::new(operator_token),
        })
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
        // Compare digests so the comparison takes the same time whatever the input.
        Some(g) if blake3::hash(g.as_bytes()) == blake3::hash(token.as_bytes()) => Ok(()),
        Some(_) => Err(error(StatusCode::FORBIDDEN, "wrong token")),
    }
}

async fn stats(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    match s.hub.stats().await {
        Ok(st) => Json(st).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// A trace request's body.
#[derive(Debug, Deserialize)]
pub struct TraceRequest {
    /// Tokens as 32 hex characters.
    pub tokens: Vec<String>,
    /// ± minutes for contacts (default 30).
    pub window_minutes: Option<u64>,
    /// The case id, for the audit trail.
    pub case: Option<String>,
    /// Why, for the audit trail.
    pub purpose: Option<String>,
}

/// Parses and checks trace tokens.
pub fn parse_tokens(tokens: &[String]) -> Result<Vec<[u8; 16]>, String> {
    if tokens.is_empty() {
        return Err("give at least one token".into());
    }
    if tokens.len() > 1000 {
        return Err("at most 1000 tokens per trace".into());
    }
    tokens
        .iter()
        .map(|t| {
            shared::token::Token::from_hex(t)
                .map(|t| *t.as_bytes())
                .map_err(|_| {
                    format!(
                        "{:?} is not a token (32 hex characters)",
                        t.chars().take(40).collect::<String>()
                    )
                })
        })
        .collect()
}

/// The longest trace window: the retention period.
pub const MAX_WINDOW_MINUTES: u64 = 28 * 24 * 60;

async fn trace(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<TraceRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let tokens = match parse_tokens(&req.tokens) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let window = req.window_minutes.unwrap_or(30);
    if window > MAX_WINDOW_MINUTES {
        return error(
            StatusCode::BAD_REQUEST,
            "the window may not exceed the retention period (40320 minutes)",
        );
    }
    tracing::info!(
        case = req.case.as_deref().unwrap_or("-"),
        purpose = req.purpose.as_deref().unwrap_or("-"),
        tokens = tokens.len(),
        "trace"
    );
    match s.hub.trace(tokens, window).await {
        Ok(t) => Json(t).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// A purge request's body.
#[derive(Debug, Deserialize)]
pub struct PurgeRequest {
    /// Enforce retention as if the clock read this (never earlier than now).
    pub as_of: Option<u64>,
}

async fn purge(
    State(s): State<AppState>,
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
    match s.hub.purge(req.as_of.unwrap_or(0)).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let m = &s.hub.metrics;
    let mut out = String::new();
    let mut line = |name: &str, help: &str, kind: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    };
    line(
        "kipass_sync_sessions_completed_total",
        "Sync sessions that completed.",
        "counter",
        m.sessions_completed.load(Ordering::Relaxed),
    );
    line(
        "kipass_sync_sessions_failed_total",
        "Sync sessions refused or failed.",
        "counter",
        m.sessions_failed.load(Ordering::Relaxed),
    );
    line(
        "kipass_refused_devices_total",
        "Devices refused at admission.",
        "counter",
        m.refused_devices.load(Ordering::Relaxed),
    );
    line(
        "kipass_records_ingested_total",
        "Records merged and indexed.",
        "counter",
        m.records_ingested.load(Ordering::Relaxed),
    );
    line(
        "kipass_sync_bytes_received_total",
        "UDP bytes received on sync connections.",
        "counter",
        m.bytes_received.load(Ordering::Relaxed),
    );
    line(
        "kipass_sync_bytes_sent_total",
        "UDP bytes sent on sync connections.",
        "counter",
        m.bytes_sent.load(Ordering::Relaxed),
    );
    line(
        "kipass_retention_runs_total",
        "Retention runs.",
        "counter",
        m.retention_runs.load(Ordering::Relaxed),
    );
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

async fn admin(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<crate::admin::AdminCommand>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&headers, &s.token) {
        return r;
    }
    let Json(cmd) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    match s
        .hub
        .admin(move |hub| {
            cmd.execute(hub, crate::clock::now())
                .map_err(|e| e.to_string())
        })
        .await
    {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}
