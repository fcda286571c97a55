//! No route reads a request body before the credential is checked: for every route of the
//! router ([`sync_hub::http::ROUTES`], the one list it is built from), a request without a
//! credential or with an unknown one gets 401 (never 400, 413, 415 or 422), even with a
//! malformed JSON body, and even with a body that never arrives. `/` and `/healthz` stay open.

use std::time::Duration;
use sync_hub::Hub;
use sync_hub::http::ROUTES;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `head` (and `body`) on a fresh connection; returns the status of the answer, or
/// `None` if none came within two seconds.
async fn status(addr: std::net::SocketAddr, head: String, body: &[u8]) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    s.write_all(head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(body).await.unwrap_or_else(|e| panic!("{e}"));
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.split(' ').nth(1)?.parse().ok()
}

fn request(method: &str, path: &str, auth: Option<&str>, length: usize) -> String {
    let path = path.replace("{id}", "fac_0123456789abcdef");
    let auth = auth.map_or(String::new(), |a| format!("authorization: {a}\r\n"));
    format!(
        "{method} {path} HTTP/1.1\r\nhost: hub\r\n{auth}content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    )
}

#[test]
fn no_route_reads_a_body_before_the_credential_is_checked() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let hub = Hub::init(tmp.path(), "mapo", None, vec![], None, 1_750_000_000)
        .unwrap_or_else(|e| panic!("init: {e}"))
        .hub;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let (handle, actor) = rt.block_on(async {
        let (handle, actor) = sync_hub::daemon::start(hub, Default::default())
            .unwrap_or_else(|e| panic!("start: {e}"));
        let app = sync_hub::http::router(handle.clone(), "7".repeat(64));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut wrong = Vec::new();
        let malformed = b"{\"as_of\": [not json";
        for r in ROUTES {
            for auth in [None, Some("Bearer 0123456789"), Some("Basic abc")] {
                let got = status(
                    addr,
                    request(r.method, r.path, auth, malformed.len()),
                    malformed,
                )
                .await;
                let want = if r.op.is_none() { 200 } else { 401 };
                if got != Some(want) {
                    wrong.push(format!(
                        "{} {} ({auth:?}, malformed body): {got:?}, want {want}",
                        r.method, r.path
                    ));
                }
                if r.op.is_some() {
                    // A body announced but never sent: answered at once, not awaited.
                    let got = status(addr, request(r.method, r.path, auth, 1000), b"{").await;
                    if got != Some(401) {
                        wrong.push(format!(
                            "{} {} ({auth:?}, body never sent): {got:?}, want 401",
                            r.method, r.path
                        ));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        (handle, actor)
    });
    sync_hub::daemon::stop(&handle);
    let _ = actor.join();
    rt.shutdown_timeout(Duration::from_secs(1));
}
