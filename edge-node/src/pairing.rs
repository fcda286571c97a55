//! Pairing a tablet with the device, once, without a terminal.
//!
//! 1. On the device itself (its own screen, or a printout of it) the owner opens
//!    `http://127.0.0.1:7451/pair` (loopback only; `edge-node pair` prints the same). The sheet
//!    shows a QR code of a one-time pairing URL, `https://<device>:<port>/pair/<code>#sha256=<fp>`,
//!    the URL as text, and the fingerprint of the device's certificate authority (`tls`).
//! 2. The tablet scans it. Its browser warns once that it does not know the certificate yet
//!    (the owner proceeds); the pairing page downloads the CA (`/pair/<code>/ca.crt`, which
//!    uses the code up), hashes it, and compares it with the fingerprint the QR carried in its
//!    `#` part (never sent over the network). Only on a match does it offer the certificate to
//!    install, with the fingerprint to compare once more in the tablet's certificate details.
//! 3. With the CA trusted, `https://<device>:<port>/` is a secure context: the camera works.
//!
//! What stops a LAN attacker: the fingerprint comes from the device's own screen, not from
//! the network; a device (or impostor) whose CA differs fails the page's check, and the
//! tablet's trust store shows the installed certificate's fingerprint against the sheet. A
//! code works once and for [`PAIRING_VALID`]; outside an owner-started pairing the device
//! offers no certificate to install (`/pair/<code>` is 404), and an old printout is dead. The
//! page's own check guards against the wrong or a re-made device; against an attacker who
//! rewrites pages in flight it is the owner's comparison with the sheet that holds, which is
//! why the page and the sheet both say to compare.

use crate::tls::{DeviceTls, is_pairable};
use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a pairing code works.
pub const PAIRING_VALID: Duration = Duration::from_secs(600);
/// Pairing codes alive at once; while this many are live no new one is made.
pub const MAX_CODES: usize = 4;

const PAIR_HTML: &str = include_str!("../assets/pair.html");
const PAIR_JS: &str = include_str!("../assets/pair.js");
const PAIR_CSS: &str = include_str!("../assets/pair.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One pairing: what the sheet shows and `edge-node pair --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairingOffer {
    /// The URL the tablet opens (the QR code's content): HTTPS, the one-time code in the
    /// path, the CA's SHA-256 (lower-case hex) after `#sha256=`.
    pub url: String,
    /// SHA-256 of the device's CA certificate, `AB:CD:...` as certificate details show it.
    pub ca_sha256: String,
    /// SHA-256 of the CA's public key (SPKI), base64: for a managed browser's pin list.
    pub spki_sha256: String,
    /// When the code stops working (Unix seconds).
    pub expires_at: u64,
    /// Whether a tablet can reach the URL's address (false: the kiosk listens on loopback
    /// only; run with `--http 0.0.0.0:7451`).
    pub reachable_from_network: bool,
}

/// The live pairing codes and what they pair with.
pub struct Pairing {
    tls: Arc<DeviceTls>,
    /// Where the server listens.
    listen: SocketAddr,
    /// BLAKE3 of each live code and when it lapses.
    codes: Mutex<Vec<([u8; 32], Instant)>>,
}

/// Why a pairing code was not honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeRefusal {
    /// Unknown, used up or expired (not told apart: a guesser learns nothing).
    Unknown,
}

impl Pairing {
    /// Pairing for a server listening on `listen` with the device's CA.
    pub fn new(tls: Arc<DeviceTls>, listen: SocketAddr) -> Pairing {
        Pairing {
            tls,
            listen,
            codes: Mutex::new(Vec::new()),
        }
    }

    /// The device's CA.
    pub fn tls(&self) -> &DeviceTls {
        &self.tls
    }

    /// The address a tablet should use: `host` if given and pairable, else the address the
    /// server listens on, else (listening on every interface) the address this machine
    /// reaches other networks from.
    fn host_for(&self, host: Option<IpAddr>) -> Result<IpAddr, String> {
        if let Some(h) = host {
            let h = h.to_canonical();
            return if is_pairable(h) {
                Ok(h)
            } else {
                Err(format!(
                    "{h} is not a private network address: the device's certificate authority vouches for private addresses only"
                ))
            };
        }
        let ip = self.listen.ip().to_canonical();
        if !ip.is_unspecified() {
            return Ok(ip);
        }
        // No packet is sent: connecting a UDP socket only picks the source address.
        let probe = |target: &str, bind: &str| -> Option<IpAddr> {
            let s = std::net::UdpSocket::bind(bind).ok()?;
            s.connect(target).ok()?;
            Some(s.local_addr().ok()?.ip())
        };
        let found = if ip.is_ipv4() {
            probe("192.0.2.1:9", "0.0.0.0:0")
        } else {
            probe("[2001:db8::1]:9", "[::]:0").or_else(|| probe("192.0.2.1:9", "0.0.0.0:0"))
        };
        Ok(found
            .filter(|a| is_pairable(*a) && !a.is_loopback())
            .unwrap_or(IpAddr::from([127, 0, 0, 1])))
    }

    /// A new one-time pairing code and its offer (`now_unix` for the expiry shown).
    pub fn offer(
        &self,
        host: Option<IpAddr>,
        now: Instant,
        now_unix: u64,
    ) -> Result<PairingOffer, String> {
        let host = self.host_for(host)?;
        let mut code = [0u8; 16];
        OsRng.fill_bytes(&mut code);
        let code = hex::encode(code);
        {
            let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
            codes.retain(|(_, until)| *until > now);
            if codes.len() >= MAX_CODES {
                return Err(format!(
                    "{MAX_CODES} pairing codes are already live: use one of them, or wait until one expires (each works for {} minutes)",
                    PAIRING_VALID.as_secs() / 60
                ));
            }
            codes.push((hash(&code), now + PAIRING_VALID));
        }
        let fp = self.tls.fingerprints();
        let shown = match host {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        Ok(PairingOffer {
            url: format!(
                "https://{shown}:{}/pair/{code}#sha256={}",
                self.listen.port(),
                fp.ca_sha256.replace(':', "").to_ascii_lowercase()
            ),
            ca_sha256: fp.ca_sha256.clone(),
            spki_sha256: fp.spki_sha256.clone(),
            expires_at: now_unix + PAIRING_VALID.as_secs(),
            reachable_from_network: !self.listen.ip().is_loopback(),
        })
    }

    /// Whether `code` is live (not used).
    pub fn is_live(&self, code: &str, now: Instant) -> bool {
        let h = hash(code);
        let codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        codes.iter().any(|(c, until)| *c == h && *until > now)
    }

    /// Uses `code` up: true once per live code.
    pub fn take(&self, code: &str, now: Instant) -> Result<(), CodeRefusal> {
        let h = hash(code);
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        codes.retain(|(_, until)| *until > now);
        let before = codes.len();
        codes.retain(|(c, _)| *c != h);
        if codes.len() < before {
            Ok(())
        } else {
            Err(CodeRefusal::Unknown)
        }
    }
}

fn hash(code: &str) -> [u8; 32] {
    *blake3::hash(code.as_bytes()).as_bytes()
}

/// The pairing routes: the sheet (loopback only), the tablet's page and the CA download.
pub fn router(pairing: Arc<Pairing>) -> Router {
    Router::new()
        .route("/pair", get(sheet))
        .route("/pair/{code}", get(page))
        .route("/pair/{code}/ca.crt", get(ca_cert))
        .route(
            "/pairing/pair.js",
            get(|| async { asset("text/javascript", PAIR_JS) }),
        )
        .route(
            "/pairing/pair.css",
            get(|| async { asset("text/css", PAIR_CSS) }),
        )
        .with_state(pairing)
}

fn with_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    with_headers(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

fn html(status: StatusCode, body: String) -> Response {
    with_headers(
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
    )
}

fn is_code(code: &str) -> bool {
    code.len() == 32 && code.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Deserialize)]
struct SheetQuery {
    host: Option<IpAddr>,
}

/// `GET /pair`: the owner's pairing sheet, on this machine only.
async fn sheet(
    State(p): State<Arc<Pairing>>,
    query: Result<Query<SheetQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Response {
    if !from_loopback(&req) {
        return html(
            StatusCode::FORBIDDEN,
            page_shell(
                "Pairing",
                "<p>The pairing sheet opens only on the device itself (http://127.0.0.1:7451/pair) \
                 or with <code>edge-node pair</code>.</p>",
            ),
        );
    }
    if !sheet_may_be_made(&req) {
        return html(
            StatusCode::FORBIDDEN,
            page_shell(
                "Pairing",
                "<p>A pairing code is made only when the sheet is opened directly (typed into \
                 the address bar or reloaded), not from another page.</p>",
            ),
        );
    }
    let Ok(Query(q)) = query else {
        return html(
            StatusCode::BAD_REQUEST,
            page_shell("Pairing", "<p>host= must be an IP address.</p>"),
        );
    };
    match p.offer(q.host, Instant::now(), crate::clock::now()) {
        Ok(offer) => html(StatusCode::OK, render_sheet(&offer)),
        Err(e) => html(
            StatusCode::BAD_REQUEST,
            page_shell("Pairing", &format!("<p>{}</p>", escape(&e))),
        ),
    }
}

/// Whether the request's peer is this machine; a request that names no peer is not.
fn from_loopback(req: &Request) -> bool {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(peer)| peer.ip().to_canonical().is_loopback())
}

/// Whether a browser opened the sheet itself (`Sec-Fetch-Site` absent, `none` or
/// `same-origin`), not another page on this machine (an `<img src>` from any site would
/// otherwise make codes).
fn sheet_may_be_made(req: &Request) -> bool {
    match req.headers().get("sec-fetch-site") {
        None => true,
        Some(v) => matches!(v.to_str(), Ok("none" | "same-origin")),
    }
}

/// `GET /pair/{code}`: the tablet's pairing page while the code is live.
async fn page(State(p): State<Arc<Pairing>>, Path(code): Path<String>) -> Response {
    if is_code(&code) && p.is_live(&code, Instant::now()) {
        html(StatusCode::OK, PAIR_HTML.to_owned())
    } else {
        used_up()
    }
}

fn used_up() -> Response {
    html(
        StatusCode::NOT_FOUND,
        page_shell(
            "Pairing code used or expired",
            "<p id=\"pair-dead\">This pairing code is used up or has expired. Open the pairing \
             sheet on the device again for a new one.</p>\
             <p>이 페어링 코드는 이미 사용되었거나 만료되었습니다.</p>",
        ),
    )
}

/// `GET /pair/{code}/ca.crt`: the CA certificate (DER), once per code.
async fn ca_cert(State(p): State<Arc<Pairing>>, Path(code): Path<String>) -> Response {
    if !is_code(&code) || p.take(&code, Instant::now()).is_err() {
        return used_up();
    }
    tracing::info!("a tablet downloaded the kiosk's certificate authority to pair");
    with_headers(
        (
            [
                (header::CONTENT_TYPE, "application/x-x509-ca-cert"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"kipass-device-ca.crt\"",
                ),
            ],
            p.tls().ca_der().to_vec(),
        )
            .into_response(),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page_shell(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/pairing/pair.css\"></head>\
         <body><main><h1>{}</h1>{body}</main></body></html>",
        escape(title),
        escape(title)
    )
}

/// The QR code of `text` as an inline SVG (dark modules as one path), or nothing if it does
/// not fit a QR code.
fn qr_svg(text: &str) -> String {
    let Ok(code) = qrcode::QrCode::new(text.as_bytes()) else {
        return String::new();
    };
    let w = code.width();
    let colors = code.to_colors();
    let mut d = String::new();
    for (i, c) in colors.iter().enumerate() {
        if *c == qrcode::Color::Dark {
            d.push_str(&format!("M{} {}h1v1h-1z", i % w + 4, i / w + 4));
        }
    }
    let size = w + 8;
    format!(
        "<svg id=\"pair-qr\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" \
         role=\"img\" aria-label=\"QR code of the pairing address\" shape-rendering=\"crispEdges\">\
         <rect width=\"{size}\" height=\"{size}\" fill=\"#fff\"/><path d=\"{d}\" fill=\"#000\"/></svg>"
    )
}

fn render_sheet(o: &PairingOffer) -> String {
    let warning = if o.reachable_from_network {
        String::new()
    } else {
        "<p class=\"warn\">The kiosk listens on this machine only: tablets cannot reach it. Run \
         the device with <code>--http 0.0.0.0:7451</code> to serve the facility's network.</p>"
            .to_owned()
    };
    let minutes = PAIRING_VALID.as_secs() / 60;
    let body = format!(
        "{warning}{qr}\
         <p>Scan with the tablet's camera, or type:</p><p><code id=\"pair-url\">{url}</code></p>\
         <p>The device's certificate fingerprint (SHA-256):</p>\
         <p><code id=\"pair-fingerprint\">{fp}</code></p>\
         <ol><li>The tablet's browser warns once that it does not know this device yet: \
         choose Advanced, then Proceed.</li>\
         <li>The pairing page checks the certificate against the fingerprint in the QR code and \
         offers it to install; compare the fingerprint it shows, and the one in the tablet's \
         certificate details, with this sheet.</li>\
         <li>Install it as a CA certificate (Android: Settings, Security, Install a certificate, \
         CA certificate; iPad: install the profile, then turn on full trust under General, \
         About, Certificate Trust Settings).</li>\
         <li>Open the kiosk at the same address without <code>/pair/...</code>.</li></ol>\
         <p>This code works once, for {minutes} minutes (until <span id=\"pair-expires\" \
         data-unix=\"{exp}\">{exp}</span> Unix time). Reload this page for a new one.</p>",
        qr = qr_svg(&o.url),
        url = escape(&o.url),
        fp = escape(&o.ca_sha256),
        exp = o.expires_at,
    );
    page_shell("Pair a tablet with this device", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairing(listen: &str) -> anyhow::Result<(tempfile::TempDir, Pairing)> {
        let tmp = tempfile::tempdir()?;
        let tls = DeviceTls::load_or_create(tmp.path(), 1_800_000_000)?;
        Ok((tmp, Pairing::new(Arc::new(tls), listen.parse()?)))
    }

    fn code_of(url: &str) -> String {
        url.split("/pair/")
            .nth(1)
            .and_then(|r| r.split('#').next())
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn a_code_works_once_and_not_after_it_expires() -> anyhow::Result<()> {
        let (_tmp, p) = pairing("192.168.1.10:7451")?;
        let t0 = Instant::now();
        let offer = p
            .offer(None, t0, 1_800_000_000)
            .map_err(anyhow::Error::msg)?;
        assert!(
            offer.url.starts_with("https://192.168.1.10:7451/pair/"),
            "{}",
            offer.url
        );
        assert!(offer.reachable_from_network);
        let fp = p.tls().fingerprints();
        assert!(offer.url.ends_with(&format!(
            "#sha256={}",
            fp.ca_sha256.replace(':', "").to_ascii_lowercase()
        )));
        assert_eq!(offer.expires_at, 1_800_000_600);
        let code = code_of(&offer.url);
        assert!(is_code(&code));
        assert!(p.is_live(&code, t0));
        assert!(!p.is_live(&"0".repeat(32), t0));
        p.take(&code, t0).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(p.take(&code, t0), Err(CodeRefusal::Unknown), "used twice");
        assert!(!p.is_live(&code, t0));

        let late = p
            .offer(None, t0, 1_800_000_000)
            .map_err(anyhow::Error::msg)?;
        let late = code_of(&late.url);
        let after = t0 + PAIRING_VALID + Duration::from_secs(1);
        assert!(!p.is_live(&late, after));
        assert_eq!(p.take(&late, after), Err(CodeRefusal::Unknown), "expired");
        Ok(())
    }

    #[test]
    fn at_most_a_few_codes_live_and_public_addresses_are_refused() -> anyhow::Result<()> {
        let (_tmp, p) = pairing("0.0.0.0:7451")?;
        let t0 = Instant::now();
        let codes: Vec<String> = (0..MAX_CODES)
            .map(|_| p.offer(None, t0, 0).map(|o| code_of(&o.url)))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?;
        let refused = p.offer(None, t0, 0).err().unwrap_or_default();
        assert!(refused.contains("already live"), "{refused:?}");
        assert!(codes.iter().all(|c| p.is_live(c, t0)), "none retired");
        // One used up or expired makes room again.
        p.take(&codes[0], t0)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert!(p.offer(None, t0, 0).is_ok());
        let later = t0 + PAIRING_VALID + Duration::from_secs(1);
        assert!(p.offer(None, later, 0).is_ok());
        let (_tmp2, p) = pairing("0.0.0.0:7451")?;
        assert!(p.offer(Some("8.8.8.8".parse()?), t0, 0).is_err());
        let o = p
            .offer(Some("fd00::7".parse()?), t0, 0)
            .map_err(anyhow::Error::msg)?;
        assert!(
            o.url.starts_with("https://[fd00::7]:7451/pair/"),
            "{}",
            o.url
        );
        let local = pairing("127.0.0.1:7451")?
            .1
            .offer(None, t0, 0)
            .map_err(anyhow::Error::msg)?;
        assert!(!local.reachable_from_network);
        Ok(())
    }

    /// What the sheet answers a GET from `peer` (none: no peer known) with `sec_fetch_site`.
    fn sheet_status(
        p: &Arc<Pairing>,
        peer: Option<&str>,
        sec_fetch_site: Option<&str>,
    ) -> anyhow::Result<StatusCode> {
        let mut req = axum::http::Request::builder().uri("/pair");
        if let Some(v) = sec_fetch_site {
            req = req.header("sec-fetch-site", v);
        }
        let mut req = req.body(axum::body::Body::empty())?;
        if let Some(peer) = peer {
            req.extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(peer.parse()?));
        }
        let mut app = router(p.clone());
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        Ok(rt
            .block_on(tower_service::Service::call(&mut app, req))?
            .status())
    }

    #[test]
    fn the_sheet_needs_a_known_loopback_peer_and_a_direct_visit() -> anyhow::Result<()> {
        let (_tmp, p) = pairing("127.0.0.1:7451")?;
        let p = Arc::new(p);
        assert_eq!(
            sheet_status(&p, None, None)?,
            StatusCode::FORBIDDEN,
            "no peer"
        );
        assert_eq!(
            sheet_status(&p, Some("192.168.1.5:4000"), None)?,
            StatusCode::FORBIDDEN
        );
        for site in ["cross-site", "same-site"] {
            assert_eq!(
                sheet_status(&p, Some("127.0.0.1:4000"), Some(site))?,
                StatusCode::FORBIDDEN,
                "{site}"
            );
        }
        let live = |p: &Pairing| p.codes.lock().map(|c| c.len()).unwrap_or(99);
        assert_eq!(live(&p), 0, "a refused visit made no code");
        for site in [None, Some("none"), Some("same-origin")] {
            assert_eq!(
                sheet_status(&p, Some("127.0.0.1:4000"), site)?,
                StatusCode::OK,
                "{site:?}"
            );
        }
        assert_eq!(live(&p), 3);
        Ok(())
    }

    #[test]
    fn the_sheet_carries_the_url_as_qr_and_text() -> anyhow::Result<()> {
        let (_tmp, p) = pairing("10.0.0.2:7451")?;
        let offer = p
            .offer(None, Instant::now(), 0)
            .map_err(anyhow::Error::msg)?;
        let sheet = render_sheet(&offer);
        assert!(sheet.contains(&escape(&offer.url)));
        assert!(sheet.contains("<svg id=\"pair-qr\""));
        assert!(sheet.contains(&offer.ca_sha256));
        Ok(())
    }
}
