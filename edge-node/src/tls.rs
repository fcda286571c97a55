//! The kiosk over HTTPS: the device's own certificate authority, its leaf certificates, and
//! the one port that serves TLS to anyone and plain HTTP to this machine only.
//!
//! Browsers give the camera only to a secure context, so a tablet on the facility's network
//! must reach the kiosk over HTTPS. The device makes its own small certificate authority the
//! first time `run` starts (`DATA/tls/ca.key`, an ECDSA P-256 key, and `DATA/tls/ca.crt`, both
//! owner-only): a tablet is paired once by trusting that CA (`pairing`), and from then on the
//! kiosk at `https://<device>:7451/` is a secure context. The CA is name-constrained to
//! private, link-local and loopback addresses and to `localhost` and `*.local` names, so its
//! key, were it ever copied off the device, could not vouch for any site on the internet.
//!
//! Leaf certificates are not stored: one is issued in memory, per local address a connection
//! arrived on (the address the tablet typed), when the first connection to it arrives, so a
//! device whose DHCP address moves needs no new pairing. Each leaf carries that address,
//! `localhost` and `<hostname>.local`, and is served with the CA behind it.
//!
//! [`serve`] reads the first byte of every connection: a TLS handshake (0x16) is served over
//! TLS from any address; anything else is plain HTTP, which the router answers only for
//! loopback peers and otherwise redirects to HTTPS ([`https_only`]). Handshakes and request
//! heads have time limits; malformed TLS or garbage closes that connection and nothing else.

use crate::kiosk;
use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// How long a client may take to start talking and to finish the TLS handshake.
pub const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);
/// How long a request's head may take to arrive.
pub const HEADERS_WITHIN: Duration = Duration::from_secs(30);
/// Connections being served at once from the network; more are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections kept for this machine (the control API, `status`, `pair`, the owner's
/// browser) on top of [`MAX_CONNECTIONS`]: the network cannot take them.
pub const LOOPBACK_RESERVE: usize = 32;
/// Connections one peer address may hold at once; more are closed at once.
pub const MAX_PER_PEER: usize = 16;
/// How long a request's body may take to arrive (and its answer to be made), on every route.
pub const REQUEST_WITHIN: Duration = Duration::from_secs(60);
/// How long one connection may live; then it is closed after the request in flight.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Leaf certificates kept (one per local address connections arrive on).
const MAX_LEAVES: usize = 16;
/// How long a leaf is valid; a new one is issued at every start.
const LEAF_DAYS: i64 = 365;
/// How long the CA is valid; before it lapses the owner makes a new one and pairs the
/// tablets again (README, "Renewing the kiosk's certificate authority").
const CA_YEARS: i64 = 2;

/// The folder of the device's TLS files.
pub fn tls_dir(data: &Path) -> PathBuf {
    data.join("tls")
}

/// How a request reached the device: over TLS or as plain HTTP (a request extension every
/// connection [`serve`] serves carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TLS, from any address.
    Tls,
    /// Plain HTTP.
    Plain,
}

/// What a paired tablet pins, as the pairing page and `edge-node pair` show them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprints {
    /// SHA-256 of the CA certificate (DER), upper-case hex in colon-separated pairs: what a
    /// tablet's certificate details show.
    pub ca_sha256: String,
    /// SHA-256 of the CA's SubjectPublicKeyInfo, base64: Chromium's
    /// `--ignore-certificate-errors-spki-list` and managed-browser policies take this form.
    pub spki_sha256: String,
}

/// The device's certificate authority and the leaves it issued.
pub struct DeviceTls {
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// `<hostname>.local`, if the hostname makes a valid DNS label.
    local_name: Option<String>,
    fingerprints: Fingerprints,
    leaves: Mutex<HashMap<IpAddr, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for DeviceTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTls")
            .field("fingerprints", &self.fingerprints)
            .finish_non_exhaustive()
    }
}

/// Upper-case hex in colon-separated pairs.
pub fn colon_hex(bytes: &[u8]) -> String {
    let h = hex::encode_upper(bytes);
    let pairs: Vec<&str> = (0..h.len()).step_by(2).map(|i| &h[i..i + 2]).collect();
    pairs.join(":")
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The CA's parameters. The subject is derived from the key alone, so the issuer of the
/// leaves is rebuilt identically from the stored key at every start.
fn ca_params(spki_hash: &[u8; 32]) -> CertificateParams {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "KI-Pass visitor log");
    dn.push(
        DnType::CommonName,
        format!("KI-Pass entrance device {}", hex::encode(&spki_hash[..4])),
    );
    let mut p = CertificateParams::default();
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let v4 = |a: [u8; 4], n| GeneralSubtree::IpAddress(CidrSubnet::from_v4_prefix(a, n));
    let v6 = |a: [u8; 16], n| GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix(a, n));
    let mut fc00 = [0u8; 16];
    fc00[0] = 0xfc;
    let mut fe80 = [0u8; 16];
    fe80[0] = 0xfe;
    fe80[1] = 0x80;
    let mut lo6 = [0u8; 16];
    lo6[15] = 1;
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![
            v4([10, 0, 0, 0], 8),
            v4([172, 16, 0, 0], 12),
            v4([192, 168, 0, 0], 16),
            v4([169, 254, 0, 0], 16),
            v4([100, 64, 0, 0], 10),
            v4([127, 0, 0, 0], 8),
            v6(fc00, 7),
            v6(fe80, 10),
            v6(lo6, 128),
            GeneralSubtree::DnsName("local".into()),
            GeneralSubtree::DnsName("localhost".into()),
        ],
        excluded_subtrees: Vec::new(),
    });
    p
}

/// Whether a leaf may name `ip`: the CA's name constraints allow only these.
pub fn is_pairable(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Writes `bytes` to `path` (owner-only) whole or not at all: a temporary file beside it,
/// synced, renamed over `path`, and the folder synced, so a power cut leaves no half file.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

/// Why the kiosk's HTTPS is not served (the CA could not be loaded), once `run` found out.
static UNAVAILABLE: Mutex<Option<String>> = Mutex::new(None);

/// Records that HTTPS is not served and why (`status` and `/healthz?detail=1` say so).
pub fn set_unavailable(why: String) {
    *UNAVAILABLE.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
}

/// Why the kiosk's HTTPS is not served, if it is not.
pub fn unavailable() -> Option<String> {
    UNAVAILABLE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

fn time_of(unix: u64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(i64::MAX))
        .context("the clock is out of range for a certificate")
}

impl DeviceTls {
    /// The device's CA from `DATA/tls/`, made there (owner-only) on first use. A damaged or
    /// half-present CA is an error, never silently replaced: a new CA unpairs every tablet.
    pub fn load_or_create(data: &Path, now: u64) -> Result<DeviceTls> {
        let dir = tls_dir(data);
        let key_path = dir.join("ca.key");
        let crt_path = dir.join("ca.crt");
        let (key, ca_der) = match (key_path.exists(), crt_path.exists()) {
            (true, true) => {
                let pem = std::fs::read_to_string(&key_path)
                    .with_context(|| format!("cannot read {}", key_path.display()))?;
                let key = KeyPair::from_pem(&pem).map_err(|e| {
                    anyhow::anyhow!(
                        "{} is not a private key ({e}); remove {} to make a new one (every tablet must then be paired again)",
                        key_path.display(),
                        dir.display()
                    )
                })?;
                let der = CertificateDer::from_pem_file(&crt_path).map_err(|e| {
                    anyhow::anyhow!(
                        "{} is not a certificate ({e}); remove {} to make a new one (every tablet must then be paired again)",
                        crt_path.display(),
                        dir.display()
                    )
                })?;
                let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
                if !der.windows(spki.len()).any(|w| w == spki.as_slice()) {
                    bail!(
                        "{} does not belong to {}; remove {} to make a new pair (every tablet must then be paired again)",
                        crt_path.display(),
                        key_path.display(),
                        dir.display()
                    );
                }
                (key, der)
            }
            (false, false) => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                }
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .context("cannot make the device's TLS key")?;
                let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
                let mut params = ca_params(&sha256(&spki));
                let start = now.saturating_sub(3_600);
                params.not_before = time_of(start)?;
                params.not_after = time_of(start + (CA_YEARS as u64) * 365 * 86_400)?;
                params.serial_number = Some(random_serial());
                let cert = params
                    .self_signed(&key)
                    .context("cannot make the device's certificate authority")?;
                // The key first: a crash between the two leaves a key without a certificate,
                // which the next start reports rather than pairing against a lost key.
                write_private(&key_path, key.serialize_pem().as_bytes())?;
                write_private(&crt_path, cert.pem().as_bytes())?;
                tracing::info!(
                    "made the kiosk's certificate authority in {} (pair tablets at /pair on this machine)",
                    dir.display()
                );
                (key, cert.der().clone())
            }
            _ => bail!(
                "{} holds only one of ca.key and ca.crt; remove the folder to make a new pair (every tablet must then be paired again)",
                dir.display()
            ),
        };
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let spki_hash = sha256(&spki);
        let fingerprints = Fingerprints {
            ca_sha256: colon_hex(&sha256(&ca_der)),
            spki_sha256: base64_std(&spki_hash),
        };
        let issuer = Issuer::new(ca_params(&spki_hash), key);
        let local_name = kiosk::OwnNames::of_this_machine()
            .hostname()
            .filter(|h| {
                !h.is_empty()
                    && h.len() <= 63
                    && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !h.starts_with('-')
            })
            .map(|h| format!("{h}.local"));
        Ok(DeviceTls {
            ca_der,
            issuer,
            local_name,
            fingerprints,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// What a paired tablet pins.
    pub fn fingerprints(&self) -> &Fingerprints {
        &self.fingerprints
    }

    /// The CA certificate (DER), what a tablet installs.
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// The server configuration for connections that arrived on `local` (a leaf for that
    /// address, issued on first use).
    pub fn config_for(&self, local: IpAddr, now: u64) -> Result<Arc<rustls::ServerConfig>> {
        let local = local.to_canonical();
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = leaves.get(&local) {
            return Ok(c.clone());
        }
        let config = Arc::new(self.issue(local, now)?);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(local, config.clone());
        Ok(config)
    }

    fn issue(&self, local: IpAddr, now: u64) -> Result<rustls::ServerConfig> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("cannot make a TLS key")?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "KI-Pass kiosk");
        p.distinguished_name = dn;
        p.subject_alt_names = vec![SanType::DnsName(
            "localhost".try_into().context("localhost")?,
        )];
        if is_pairable(local) {
            p.subject_alt_names.push(SanType::IpAddress(local));
        } else {
            tracing::warn!(
                "a TLS connection arrived on {local}, which is not a private network address: \
                 paired tablets will not trust it (the device's certificate authority vouches for private addresses only)"
            );
        }
        if let Some(name) = &self.local_name
            && let Ok(n) = name.clone().try_into()
        {
            p.subject_alt_names.push(SanType::DnsName(n));
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let start = now.saturating_sub(3_600);
        p.not_before = time_of(start)?;
        p.not_after = time_of(start + (LEAF_DAYS as u64) * 86_400)?;
        let leaf = p
            .signed_by(&key, &self.issuer)
            .context("cannot issue the kiosk's certificate")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), self.ca_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .context("the kiosk's certificate")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn random_serial() -> SerialNumber {
    use rand_core::{OsRng, RngCore};
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn base64_std(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Plain HTTP from another machine is not served: a GET or HEAD is sent to the same address
/// over HTTPS (308), anything else refused (403). Loopback and TLS pass; plain HTTP whose peer
/// is not known counts as remote. Requests without a [`Transport`] (a router served
/// in-process) pass too. Runs after `kiosk::own_host_only`, so
/// the `Host` it redirects to is one of the device's own.
pub async fn https_only(req: Request, next: Next) -> Response {
    let plain = req.extensions().get::<Transport>() == Some(&Transport::Plain);
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_none_or(|ConnectInfo(peer)| !peer.ip().to_canonical().is_loopback());
    if !(plain && remote) {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    match (req.method(), host) {
        (&Method::GET | &Method::HEAD, Some(host)) => {
            match HeaderValue::from_str(&format!("https://{host}{path}")) {
                Ok(to) => (
                    StatusCode::PERMANENT_REDIRECT,
                    [(header::LOCATION, to)],
                    "the kiosk is served over HTTPS on this port\n",
                )
                    .into_response(),
                Err(_) => plain_refused(),
            }
        }
        _ => plain_refused(),
    }
}

fn request_too_slow() -> Response {
    let mut r = (
        StatusCode::REQUEST_TIMEOUT,
        axum::Json(serde_json::json!({ "error": "the request took too long" })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn plain_refused() -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({
            "error": "plain HTTP is served on this machine (loopback) only; use https:// on the same port"
        })),
    )
        .into_response()
}

/// Serves `app` on `listener` until the listener fails: TLS for every client, plain HTTP
/// (which [`https_only`] holds to loopback) for the rest; without `tls` (the CA could not be
/// loaded), plain HTTP to loopback peers only. Each peer address holds at most
/// [`MAX_PER_PEER`] connections, the network at most [`MAX_CONNECTIONS`], and loopback has
/// [`LOOPBACK_RESERVE`] more of its own; every request has [`REQUEST_WITHIN`] and every
/// connection [`CONNECTION_LIFETIME`]. Every request carries its peer
/// (`ConnectInfo<SocketAddr>`) and its [`Transport`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<DeviceTls>>,
    now: fn() -> u64,
) -> std::io::Result<()> {
    let admission = Arc::new(Admission::new(
        MAX_CONNECTIONS,
        LOOPBACK_RESERVE,
        MAX_PER_PEER,
    ));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) if is_transient(&e) => {
                tracing::debug!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if tls.is_none() && !peer.ip().to_canonical().is_loopback() {
            // Without its CA the device serves this machine only, over plain HTTP.
            drop(stream);
            continue;
        }
        let Some(ticket) = admission.admit(peer.ip()) else {
            tracing::debug!("connection from {peer} refused: too many at once");
            drop(stream);
            continue;
        };
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ticket = ticket;
            if let Err(e) = connection(stream, peer, app, tls, now).await {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
}

/// Who may hold a connection: at most `per_peer` per address, `shared` for everyone, and
/// `reserve` more that only loopback peers may take once the shared ones are gone.
#[derive(Debug)]
pub struct Admission {
    shared: usize,
    reserve: usize,
    per_peer: usize,
    held: Mutex<AdmissionState>,
}

#[derive(Debug, Default)]
struct AdmissionState {
    shared: usize,
    reserve: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its slot.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    peer: IpAddr,
    from_reserve: bool,
}

impl Admission {
    /// A pool of `shared` slots for anyone, `reserve` for loopback only, `per_peer` per address.
    pub fn new(shared: usize, reserve: usize, per_peer: usize) -> Admission {
        Admission {
            shared,
            reserve,
            per_peer,
            held: Mutex::new(AdmissionState::default()),
        }
    }

    /// A slot for a connection from `peer`, or `None` when its address or the pool is full.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Ticket> {
        let peer = peer.to_canonical();
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mine = h.per_peer.get(&peer).copied().unwrap_or(0);
        if mine >= self.per_peer {
            return None;
        }
        let from_reserve = if h.shared < self.shared {
            h.shared += 1;
            false
        } else if peer.is_loopback() && h.reserve < self.reserve {
            h.reserve += 1;
            true
        } else {
            return None;
        };
        *h.per_peer.entry(peer).or_insert(0) += 1;
        Some(Ticket {
            admission: self.clone(),
            peer,
            from_reserve,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut h = self
            .admission
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.from_reserve {
            h.reserve = h.reserve.saturating_sub(1);
        } else {
            h.shared = h.shared.saturating_sub(1);
        }
        if let Some(n) = h.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                h.per_peer.remove(&self.peer);
            }
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut
    ) || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    tls: Option<Arc<DeviceTls>>,
    now: fn() -> u64,
) -> Result<()> {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(HANDSHAKE_WITHIN, stream.peek(&mut first))
        .await
        .context("the client sent nothing")??;
    if n == 0 {
        return Ok(());
    }
    if first[0] == 0x16 {
        let Some(tls) = tls else {
            bail!("TLS is unavailable: {}", unavailable().unwrap_or_default());
        };
        let local = stream.local_addr()?.ip();
        let config = tls.config_for(local, now())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let stream = tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(stream))
            .await
            .context("the TLS handshake took too long")?
            .context("TLS handshake")?;
        http(stream, peer, app, Transport::Tls).await
    } else {
        http(stream, peer, app, Transport::Plain).await
    }
}

async fn http<S>(stream: S, peer: SocketAddr, app: Router, transport: Transport) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(transport);
        let mut app = app.clone();
        async move {
            // Every route's body (and answer) within a time limit: a slow sender cannot
            // hold its connection and handler open by trickling bytes.
            match tokio::time::timeout(REQUEST_WITHIN, tower_service::Service::call(&mut app, req))
                .await
            {
                Ok(r) => r,
                Err(_) => Ok(request_too_slow()),
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADERS_WITHIN)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r.context("HTTP"),
        () = tokio::time::sleep(CONNECTION_LIFETIME) => {}
    }
    // Old enough: finish the request in flight (within its own limit), then close.
    conn.as_mut().graceful_shutdown();
    tokio::time::timeout(REQUEST_WITHIN, conn)
        .await
        .context("the last request took too long")?
        .context("HTTP")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64_std(b""), "");
        assert_eq!(base64_std(b"f"), "Zg==");
        assert_eq!(base64_std(b"fo"), "Zm8=");
        assert_eq!(base64_std(b"foobar"), "Zm9vYmFy");
        assert_eq!(colon_hex(&[0xab, 0x01]), "AB:01");
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_ca_is_made_once_kept_private_and_reloaded_with_the_same_fingerprints() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let a = DeviceTls::load_or_create(tmp.path(), 1_800_000_000)?;
        let b = DeviceTls::load_or_create(tmp.path(), 1_800_000_100)?;
        assert_eq!(a.fingerprints(), b.fingerprints());
        assert_eq!(a.ca_der(), b.ca_der());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
            assert_eq!(mode(&tls_dir(tmp.path()))?, 0o700);
            assert_eq!(mode(&tls_dir(tmp.path()).join("ca.key"))?, 0o600);
            assert_eq!(mode(&tls_dir(tmp.path()).join("ca.crt"))?, 0o600);
        }
        // Leaves from the reloaded CA chain to the same CA.
        let c = b.config_for("192.168.1.20".parse()?, 1_800_000_100)?;
        assert_eq!(c.alpn_protocols, vec![b"http/1.1".to_vec()]);
        Ok(())
    }

    #[test]
    fn a_damaged_or_half_present_ca_is_an_error_not_a_new_ca() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        DeviceTls::load_or_create(tmp.path(), 1_800_000_000)?;
        let dir = tls_dir(tmp.path());
        let key = std::fs::read(dir.join("ca.key"))?;
        std::fs::write(dir.join("ca.key"), b"garbage")?;
        let e = DeviceTls::load_or_create(tmp.path(), 1_800_000_000).unwrap_err();
        assert!(e.to_string().contains("not a private key"), "{e}");
        // Another device's key beside this certificate.
        let other = tempfile::tempdir()?;
        DeviceTls::load_or_create(other.path(), 1_800_000_000)?;
        std::fs::copy(tls_dir(other.path()).join("ca.key"), dir.join("ca.key"))?;
        let e = DeviceTls::load_or_create(tmp.path(), 1_800_000_000).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        std::fs::write(dir.join("ca.key"), key)?;
        std::fs::remove_file(dir.join("ca.crt"))?;
        let e = DeviceTls::load_or_create(tmp.path(), 1_800_000_000).unwrap_err();
        assert!(e.to_string().contains("only one of"), "{e}");
        Ok(())
    }

    /// What `https_only` answers a request from `peer` over `transport`.
    fn through_https_only(
        method: &str,
        peer: &str,
        transport: Transport,
    ) -> Result<(StatusCode, Option<String>)> {
        let app = Router::new()
            .route("/", axum::routing::any(|| async { "kiosk" }))
            .layer(axum::middleware::from_fn(https_only));
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri("/?x=1")
            .header(header::HOST, "192.168.1.10:7451")
            .body(axum::body::Body::empty())?;
        req.extensions_mut()
            .insert(ConnectInfo::<SocketAddr>(peer.parse()?));
        req.extensions_mut().insert(transport);
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let mut app = app;
        let resp = rt.block_on(tower_service::Service::call(&mut app, req))?;
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((resp.status(), location))
    }

    #[test]
    fn plain_http_from_the_network_goes_to_https_and_loopback_stays() -> Result<()> {
        assert_eq!(
            through_https_only("GET", "192.168.1.7:5555", Transport::Plain)?,
            (
                StatusCode::PERMANENT_REDIRECT,
                Some("https://192.168.1.10:7451/?x=1".into())
            )
        );
        assert_eq!(
            through_https_only("POST", "192.168.1.7:5555", Transport::Plain)?.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            through_https_only("POST", "192.168.1.7:5555", Transport::Tls)?.0,
            StatusCode::OK
        );
        assert_eq!(
            through_https_only("GET", "127.0.0.1:5555", Transport::Plain)?.0,
            StatusCode::OK
        );
        assert_eq!(
            through_https_only("GET", "[::ffff:127.0.0.1]:5555", Transport::Plain)?.0,
            StatusCode::OK
        );
        Ok(())
    }

    #[test]
    fn one_address_cannot_take_every_slot_and_loopback_keeps_its_own() {
        let a = Arc::new(Admission::new(8, 2, 3));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(a.admit(ip("192.168.1.50")));
        }
        assert!(a.admit(ip("192.168.1.50")).is_none(), "over its share");
        assert!(
            a.admit(ip("::ffff:192.168.1.50")).is_none(),
            "the same address"
        );
        for i in 51..=55 {
            held.push(a.admit(ip(&format!("192.168.1.{i}"))));
        }
        assert!(held.iter().all(Option::is_some));
        assert!(
            a.admit(ip("192.168.1.60")).is_none(),
            "the shared slots are gone"
        );
        let local = [a.admit(ip("127.0.0.1")), a.admit(ip("::1"))];
        assert!(local.iter().all(Option::is_some), "loopback's reserve");
        assert!(
            a.admit(ip("127.0.0.1")).is_none(),
            "the reserve is full too"
        );
        drop(local);
        assert!(a.admit(ip("127.0.0.1")).is_some(), "freed on drop");
        held.truncate(2);
        assert!(a.admit(ip("192.168.1.50")).is_some(), "its own slot freed");
    }

    #[test]
    fn plain_http_without_a_known_peer_is_remote() -> Result<()> {
        let mut app = Router::new()
            .route("/", axum::routing::any(|| async { "kiosk" }))
            .layer(axum::middleware::from_fn(https_only));
        let mut req = axum::http::Request::builder()
            .method("POST")
            .uri("/")
            .header(header::HOST, "192.168.1.10:7451")
            .body(axum::body::Body::empty())?;
        req.extensions_mut().insert(Transport::Plain);
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        let resp = rt.block_on(tower_service::Service::call(&mut app, req))?;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        Ok(())
    }

    #[test]
    fn the_ca_is_valid_for_two_years() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let now = 1_800_000_000;
        let ca = DeviceTls::load_or_create(tmp.path(), now)?;
        // The validity's two times (UTCTime, tag 0x17, 13 bytes: YYMMDDhhmmssZ).
        let der = ca.ca_der();
        let times: Vec<&[u8]> = der
            .windows(15)
            .filter(|w| w[0] == 0x17 && w[1] == 13 && w[14] == b'Z')
            .map(|w| &w[2..14])
            .take(2)
            .collect();
        assert_eq!(times.len(), 2, "no validity found");
        let year = |t: &[u8]| -> i64 {
            String::from_utf8_lossy(&t[..2])
                .parse::<i64>()
                .unwrap_or(-100)
        };
        assert_eq!(year(times[1]) - year(times[0]), 2, "{times:?}");
        assert_eq!(&times[1][6..], &times[0][6..], "to the second of the day");
        Ok(())
    }

    #[test]
    fn only_private_and_local_addresses_are_pairable() {
        for ip in [
            "192.168.0.5",
            "10.1.2.3",
            "172.20.0.1",
            "127.0.0.1",
            "::1",
            "fe80::1",
            "fd00::5",
            "100.100.1.1",
            "::ffff:192.168.1.1",
        ] {
            assert!(
                is_pairable(ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
                "{ip}"
            );
        }
        for ip in ["8.8.8.8", "2001:db8::1", "172.32.0.1", "100.128.0.1"] {
            assert!(
                !is_pairable(ip.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]))),
                "{ip}"
            );
        }
    }
}
