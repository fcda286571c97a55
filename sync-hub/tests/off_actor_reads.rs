//! Reports do not stall sync: the shared-code report (a full scan of the live index, about a
//! minute at a region's size; here a scan made slow with `trace::pause_scans_for_tests`) runs
//! off the hub's actor, so a job on the actor (what every sync frame is) is answered while it
//! runs; the report is audited before its answer; and more reports than the bound are refused
//! at once with 503 and `Retry-After`, while a light read still answers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use sync_hub::Hub;
use sync_hub::daemon::HubHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long each shared-code scan is made to take.
const SCAN: Duration = Duration::from_millis(1500);
/// The longest an actor job may wait while a report runs (the issue asks 100 ms of the
/// sync path; the margin is for a loaded two-core test machine. A report on the actor holds
/// it for the whole scan, 1.5 s).
const ACTOR_BOUND: Duration = Duration::from_millis(400);
const TOKEN: &str = "7777777777777777777777777777777777777777777777777777777777777777";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh hub, its actor and its HTTP API on loopback (reads bounded by `pool`).
async fn hub(
    dir: &std::path::Path,
    pool: sync_hub::reads::Pool,
) -> (HubHandle, std::thread::JoinHandle<()>, SocketAddr) {
    let hub = Hub::init(dir, "mapo", None, vec![], None, 1_750_000_000)
        .unwrap_or_else(|e| panic!("init: {e}"))
        .hub;
    let (handle, actor) =
        sync_hub::daemon::start(hub, Default::default()).unwrap_or_else(|e| panic!("start: {e}"));
    let app = sync_hub::http::router_with(handle.clone(), TOKEN.to_owned(), pool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (handle, actor, addr)
}

/// `GET path` with the operator's token: the status line's code, the `Retry-After` header and
/// the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, Option<String>, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let head = format!(
        "GET {path} HTTP/1.1\r\nhost: hub\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("no answer to {path} within 30 s"))
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let retry = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after: ")
            .map(str::to_owned)
    });
    (code, retry, body.to_owned())
}

/// How long a job on the actor takes to be answered (every sync frame is such a job).
async fn actor_ping(handle: &HubHandle) -> Duration {
    let started = Instant::now();
    handle
        .query(|_, _, _| ())
        .await
        .unwrap_or_else(|e| panic!("ping: {e}"));
    started.elapsed()
}

async fn report_actions(handle: &HubHandle) -> usize {
    handle
        .query(|hub, _, _| {
            hub.audit()
                .entries(None)
                .unwrap_or_else(|e| panic!("audit: {e}"))
                .iter()
                .filter(|e| e.event.action == "report.shared_codes")
                .count()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_slow_report_does_not_hold_the_actor_and_is_audited_before_its_answer() {
    sync_hub::trace::pause_scans_for_tests(SCAN);
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let rt = runtime();
    let (handle, actor) = rt.block_on(async {
        let (handle, actor, addr) = hub(tmp.path(), Default::default()).await;
        assert_eq!(report_actions(&handle).await, 0);
        let started = Instant::now();
        let report = tokio::spawn(async move { get(addr, "/api/reports/shared-codes").await });
        // While the report scans, the actor answers its jobs at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut slowest = Duration::ZERO;
        while started.elapsed() < SCAN - Duration::from_millis(300) {
            slowest = slowest.max(actor_ping(&handle).await);
            let stats = Instant::now();
            handle
                .stats()
                .await
                .unwrap_or_else(|e| panic!("stats: {e}"));
            slowest = slowest.max(stats.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            slowest < ACTOR_BOUND,
            "an actor job waited {slowest:?} while a report ran: the report holds the actor"
        );
        let (code, _, body) = report.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code, 200, "{body}");
        assert!(started.elapsed() >= SCAN, "the report took its scan's time");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(v["shared_codes"].is_array(), "{body}");
        // Audited by the time it was answered: the entry is there, once.
        assert_eq!(report_actions(&handle).await, 1);
        (handle, actor)
    });
    sync_hub::daemon::stop(&handle);
    drop(rt);
    actor.join().unwrap_or_else(|_| panic!("actor panicked"));
}

#[test]
fn reports_over_the_bound_are_refused_at_once_with_retry_after() {
    sync_hub::trace::pause_scans_for_tests(SCAN);
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let rt = runtime();
    let (handle, actor) = rt.block_on(async {
        let (handle, actor, addr) = hub(tmp.path(), sync_hub::reads::Pool::new(2, 4)).await;
        let running: Vec<_> = (0..2)
            .map(|_| tokio::spawn(async move { get(addr, "/api/reports/shared-codes").await }))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A third report while two scan: refused at once, saying when to come back.
        let asked = Instant::now();
        let (code, retry, body) = get(addr, "/api/reports/shared-codes").await;
        assert_eq!(code, 503, "{body}");
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "refused at once"
        );
        assert_eq!(retry.as_deref(), Some("5"), "Retry-After");
        assert!(body.contains("try again in 5 s"), "{body}");
        // A light read is not queued behind the reports.
        let asked = Instant::now();
        let (code, _, body) = get(addr, "/api/stats").await;
        assert_eq!(code, 200, "{body}");
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "stats answered at once"
        );
        for r in running {
            let (code, _, body) = r.await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(code, 200, "{body}");
        }
        // The refused one was not audited (it read nothing); the two answered ones were.
        assert_eq!(report_actions(&handle).await, 2);
        // Once they are done, reports are served again.
        let (code, _, body) = get(addr, "/api/reports/shared-codes").await;
        assert_eq!(code, 200, "{body}");
        (handle, actor)
    });
    sync_hub::daemon::stop(&handle);
    drop(rt);
    actor.join().unwrap_or_else(|_| panic!("actor panicked"));
}

/// `POST /api/trace` with `bearer`: the status line's code and the body.
async fn post_trace(addr: SocketAddr, bearer: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let head = format!(
        "POST /api/trace HTTP/1.1\r\nhost: hub\r\nauthorization: Bearer {bearer}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("no answer to the trace within 30 s"))
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}

#[test]
fn a_trace_and_the_audit_log_answer_while_every_light_read_is_held() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use sync_hub::auth::{self, Role};
    use sync_hub::reads::{Pool, Weight};
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let rt = runtime();
    let (handle, actor) = rt.block_on(async {
        let hub = Hub::init(tmp.path(), "mapo", None, vec![], None, 1_750_000_000)
            .unwrap_or_else(|e| panic!("init: {e}"))
            .hub;
        let (_, secret) = auth::issue(hub.store(), Role::Authority, None, "kdca", 1_750_000_000)
            .unwrap_or_else(|e| panic!("issue: {e}"));
        let (handle, actor) = sync_hub::daemon::start(hub, Default::default())
            .unwrap_or_else(|e| panic!("start: {e}"));
        let pool = Pool::new(2, 4);
        let app = sync_hub::http::router_with(handle.clone(), TOKEN.to_owned(), pool.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        // Four slow light reads (any credential holder's whoami, metrics, lists) hold every
        // light permit until released (at most 20 s).
        let release = Arc::new(AtomicBool::new(false));
        let held: Vec<_> = (0..4)
            .map(|_| {
                let (handle, pool, release) = (handle.clone(), pool.clone(), release.clone());
                tokio::spawn(async move {
                    sync_hub::reads::read(
                        &handle,
                        &pool,
                        Weight::Light,
                        1_750_000_000,
                        move |_, _| {
                            let started = Instant::now();
                            while !release.load(Ordering::SeqCst)
                                && started.elapsed() < Duration::from_secs(20)
                            {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            Ok(())
                        },
                    )
                    .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The light bound is full: another light read is refused.
        let (code, _, body) = get(addr, "/api/stats").await;
        assert_eq!(code, 503, "the light reads are held: {body}");
        // The authority's trace has permits of its own.
        let token = "ab".repeat(16);
        let (code, body) = post_trace(
            addr,
            &secret.0,
            &format!(r#"{{"tokens": ["{token}"], "case": "case-1", "purpose": "cluster"}}"#),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("case-1"), "{body}");
        // The audit log is read as a report, not against the light bound.
        let (code, _, body) = get(addr, "/api/audit").await;
        assert_eq!(code, 200, "{body}");
        release.store(true, Ordering::SeqCst);
        for h in held {
            h.await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("held read: {e}"));
        }
        (handle, actor)
    });
    sync_hub::daemon::stop(&handle);
    drop(rt);
    actor.join().unwrap_or_else(|_| panic!("actor panicked"));
}

#[test]
fn one_credential_cannot_take_every_trace_permit() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use sync_hub::auth::{self, Role};
    use sync_hub::reads::{Pool, Weight};
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let rt = runtime();
    let (handle, actor) = rt.block_on(async {
        let hub = Hub::init(tmp.path(), "mapo", None, vec![], None, 1_750_000_000)
            .unwrap_or_else(|e| panic!("init: {e}"))
            .hub;
        let (first, first_secret) =
            auth::issue(hub.store(), Role::Authority, None, "kdca", 1_750_000_000)
                .unwrap_or_else(|e| panic!("issue: {e}"));
        let (_, other_secret) = auth::issue(
            hub.store(),
            Role::Authority,
            None,
            "mapo health",
            1_750_000_000,
        )
        .unwrap_or_else(|e| panic!("issue: {e}"));
        let (handle, actor) = sync_hub::daemon::start(hub, Default::default())
            .unwrap_or_else(|e| panic!("start: {e}"));
        let pool = Pool::new(2, 4);
        let app = sync_hub::http::router_with(handle.clone(), TOKEN.to_owned(), pool.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        // The first credential has three slow traces running (of the four trace permits).
        let release = Arc::new(AtomicBool::new(false));
        let held: Vec<_> = (0..3)
            .map(|_| {
                let (handle, pool, release, id) = (
                    handle.clone(),
                    pool.clone(),
                    release.clone(),
                    first.id.clone(),
                );
                tokio::spawn(async move {
                    sync_hub::reads::read_as(
                        &handle,
                        &pool,
                        Weight::Trace,
                        &id,
                        1_750_000_000,
                        move |_, _| {
                            let started = Instant::now();
                            while !release.load(Ordering::SeqCst)
                                && started.elapsed() < Duration::from_secs(20)
                            {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            Ok(())
                        },
                    )
                    .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let token = "ab".repeat(16);
        let body = format!(r#"{{"tokens": ["{token}"], "case": "case-1", "purpose": "cluster"}}"#);
        // Its fourth is refused: the last permit is kept for everyone else...
        let (code, text) = post_trace(addr, &first_secret.0, &body).await;
        assert_eq!(code, 503, "a fourth trace of one credential: {text}");
        assert!(text.contains("traces of this credential"), "{text}");
        // ...whose trace is answered.
        let (code, text) = post_trace(addr, &other_secret.0, &body).await;
        assert_eq!(code, 200, "another credential's trace: {text}");
        release.store(true, Ordering::SeqCst);
        for h in held {
            h.await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("held read: {e}"));
        }
        // Once they end, the first credential is served again.
        let (code, text) = post_trace(addr, &first_secret.0, &body).await;
        assert_eq!(code, 200, "after its traces ended: {text}");
        (handle, actor)
    });
    sync_hub::daemon::stop(&handle);
    drop(rt);
    actor.join().unwrap_or_else(|_| panic!("actor panicked"));
}

#[test]
fn reads_run_at_a_lower_cpu_priority_than_the_actor_and_a_panic_is_an_error() {
    // On two cores a report's thread at the actor's priority took the core a sync round waited
    // for (round p99 2.2-4x the quiet hub's at a day of 3 million visits, stall bench).
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // The priority the test process runs at (0 unless started under `nice`).
    let base = rustix::process::getpriority_process(None).unwrap_or_else(|e| panic!("{e}"));
    let rt = runtime();
    rt.block_on(async {
        let pool = sync_hub::reads::Pool::default();
        let (handle, actor, _) = hub(tmp.path(), pool.clone()).await;
        let now = sync_hub::clock::now();
        for weight in [
            sync_hub::reads::Weight::Heavy,
            sync_hub::reads::Weight::Light,
            sync_hub::reads::Weight::Trace,
        ] {
            let read_nice = sync_hub::reads::read(&handle, &pool, weight, now, |_, _| {
                Ok(rustix::process::getpriority_process(None).unwrap_or(i32::MIN))
            })
            .await
            .unwrap_or_else(|e| panic!("read: {e}"));
            assert_eq!(
                read_nice,
                base.max(sync_hub::reads::READ_NICE),
                "{weight:?}"
            );
        }
        // The actor (and this test's threads) keep the normal priority.
        let actor_nice = handle
            .query(|_, _, _| rustix::process::getpriority_process(None).unwrap_or(i32::MIN))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(actor_nice, base);
        // A read's permits are free once it has answered: back-to-back reports of one
        // credential (one report at once each) are all answered, none refused as busy.
        for i in 0..200 {
            sync_hub::reads::read_as(
                &handle,
                &pool,
                sync_hub::reads::Weight::Heavy,
                "cred_0011223344556677",
                now,
                |_, _| Ok(()),
            )
            .await
            .unwrap_or_else(|e| panic!("report {i}: {e}"));
        }
        // A read that panics is an error for its caller, and the hub goes on.
        let failed = sync_hub::reads::read(
            &handle,
            &pool,
            sync_hub::reads::Weight::Light,
            now,
            |_, _| -> Result<(), sync_hub::people::OpError> { panic!("a read's bug") },
        )
        .await;
        assert!(failed.is_err());
        assert!(actor_ping(&handle).await < ACTOR_BOUND);
        sync_hub::daemon::stop(&handle);
        drop(handle);
        actor
            .join()
            .unwrap_or_else(|_| panic!("the actor panicked"));
    });
}
