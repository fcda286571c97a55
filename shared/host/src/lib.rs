//! What both binaries need of the machine they run on, and nothing else: owner-only files
//! ([`private_files`]), personal data and PINs read from stdin rather than the command line
//! ([`secret_input`]), waiting for a store another process holds ([`store_lock`]) and logs on
//! stderr as text or JSON lines ([`logging`]).
//!
//! It lives apart from `shared`, which never does IO, so that `edge-node` and `sync-hub` call
//! one copy of these rules instead of each keeping its own.

pub mod logging;
pub mod private_files;
pub mod secret_input;
pub mod store_lock;
pub mod watchdog;

/// Whether an HTTP request asks for the detailed health check (`/healthz` on both binaries):
/// `detail`, `detail=1` or `detail=true` in its query, or an `Accept` header naming JSON.
pub fn wants_health_detail(query: Option<&str>, accept: Option<&str>) -> bool {
    let asked = query
        .unwrap_or("")
        .split('&')
        .any(|kv| matches!(kv, "detail=1" | "detail=true" | "detail"));
    asked || accept.is_some_and(|v| v.contains("application/json"))
}

#[cfg(test)]
mod health_detail_tests {
    use super::wants_health_detail;

    #[test]
    fn the_detail_is_asked_by_query_or_accept() {
        assert!(!wants_health_detail(None, None));
        assert!(!wants_health_detail(Some("x=1"), Some("text/plain")));
        assert!(wants_health_detail(Some("a=b&detail=1"), None));
        assert!(wants_health_detail(Some("detail"), None));
        assert!(!wants_health_detail(Some("detail=0"), None));
        assert!(wants_health_detail(None, Some("application/json")));
    }
}
