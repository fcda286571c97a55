//! The kiosk's frame endpoint under load: four kiosks at once, each sending a 640x480 JPEG
//! camera frame ten times a second for about 20 s to a real `edge-node run --http` (with its
//! hub running, so accepted visits also wake the sync loop), the way the kiosk page does.
//! Each kiosk's visitors show a fresh code for eight frames (one visit, then "already
//! checked in") and then step away for two frames (no code).
//!
//! Latency is measured from each frame's scheduled send time to its verdict, so a kiosk that
//! falls behind is charged for its queueing (no coordinated omission). Baselines in the same
//! run: the decode of the same frames in-process, and one kiosk alone.
//!
//! Two transports, one after the other on the same device folder: plain HTTP on loopback (the
//! baseline, as earlier runs measured it), then HTTPS as a paired tablet reaches the kiosk: the
//! device restarted listening on the address `KIOSK_BENCH_LAN` names (else loopback), each kiosk one kept-alive TLS
//! connection verified against the device's own CA from `DATA/tls/ca.crt` (the address itself
//! when the CA may name it, else the device's `<hostname>.local` name, which its leaf carries).
//! `KIOSK_BENCH_LAN=<ip>` picks the address (one of this machine's); without it the HTTPS phases
//! run to 127.0.0.1 over TLS. Fails when a four-kiosk p99 is 100 ms or more, or when any
//! verdict is not the expected one, or the device stores other than one visit per code.
//!
//! `cargo build --release -p edge-node -p sync-hub && cargo bench -p tests --bench kiosk`

use anyhow::{Context, Result, bail};
use rustls::pki_types::ServerName;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::fixture::{self, HubFixture, Proc, bin, wait_until};
use tests::frames::{Damage, encode_jpeg, frame};

const KIOSKS: usize = 4;
const FPS: u32 = 10;
const SECONDS: u32 = 20;
const BASELINE_SECONDS: u32 = 5;
/// Frames a visitor shows their code, then frames with nobody in view.
const SHOWING: usize = 8;
const AWAY: usize = 2;
const P99_LIMIT_MS: f64 = 100.0;

/// One frame to send: a visitor's code (by visitor number) or nobody in view.
#[derive(Clone)]
struct Shot {
    jpeg: Arc<Vec<u8>>,
    visitor: Option<usize>,
}

/// What one request measured.
struct Sample {
    latency_ms: f64,
    server_ms: f64,
    /// The verdict was one this frame may get: for a visitor's first read "accepted", for
    /// later ones "duplicate", "no_code" for nobody in view.
    ok: bool,
    /// A code was in view but this frame's pass did not read it (the next frame will).
    missed: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Summary {
    n: usize,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

fn summarize(mut v: Vec<f64>) -> Summary {
    v.sort_by(f64::total_cmp);
    Summary {
        n: v.len(),
        p50: percentile(&v, 50.0),
        p95: percentile(&v, 95.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

fn row(name: &str, s: &Summary) {
    println!(
        "{name:<58} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        s.n, s.p50, s.p95, s.p99, s.max
    );
}

/// A kiosk's frames: `visitors` visitors, each a fresh code in a few camera positions.
fn kiosk_script(visitors: usize, seed: u64, blank: &Arc<Vec<u8>>) -> Result<Vec<Shot>> {
    let issuer = fixture::issuer();
    let mut shots = Vec::new();
    for v in 0..visitors {
        // Valid for the spec's longest lifetime: the whole run fits in it.
        let payload = issuer.issue(fixture::now(), 60, fixture::random_token());
        let variants: Vec<Arc<Vec<u8>>> = (0..3)
            .map(|i| {
                let img = frame(&payload, Damage::Clean, seed * 1000 + v as u64 * 10 + i)?;
                Ok(Arc::new(encode_jpeg(&img, 85)?))
            })
            .collect::<Result<_>>()?;
        for i in 0..SHOWING {
            shots.push(Shot {
                jpeg: variants[i % variants.len()].clone(),
                visitor: Some(v),
            });
        }
        for _ in 0..AWAY {
            shots.push(Shot {
                jpeg: blank.clone(),
                visitor: None,
            });
        }
    }
    Ok(shots)
}

/// Where the kiosks send their frames.
#[derive(Clone)]
enum Target {
    /// Plain HTTP, `http://127.0.0.1:port` (loopback only: the device redirects others).
    Http { base: String },
    /// HTTPS as a paired tablet: TLS to `addr`, verified as `name` against the device's CA.
    Https {
        addr: SocketAddr,
        name: ServerName<'static>,
        host: String,
        config: Arc<rustls::ClientConfig>,
    },
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Http { base } => format!("HTTP {base}"),
            Target::Https { addr, host, .. } => format!("HTTPS {addr} as {host}"),
        }
    }

    fn client(&self) -> Client {
        match self {
            Target::Http { base } => Client::Http {
                base: base.clone(),
                agent: ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build()
                    .into(),
            },
            Target::Https {
                addr,
                name,
                host,
                config,
            } => Client::Https(Box::new(TlsClient {
                addr: *addr,
                name: name.clone(),
                host: host.clone(),
                config: config.clone(),
                conn: None,
            })),
        }
    }
}

/// One kiosk's connection: ureq's kept-alive agent for HTTP, one kept-alive TLS connection
/// for HTTPS (what a browser's `fetch` keeps to the device), made again when it closes.
enum Client {
    Http { base: String, agent: ureq::Agent },
    Https(Box<TlsClient>),
}

impl Client {
    /// POSTs a JPEG to `path`; the JSON answer of a 200, else `None`.
    fn post_jpeg(&mut self, path: &str, body: &[u8]) -> Option<Value> {
        match self {
            Client::Http { base, agent } => agent
                .post(&format!("{base}{path}"))
                .header("content-type", "image/jpeg")
                .send(body)
                .ok()
                .filter(|r| r.status() == 200)
                .and_then(|mut r| r.body_mut().read_json().ok()),
            Client::Https(c) => {
                let (status, body) = c.request("POST", path, Some(body)).ok()?;
                (status == 200)
                    .then(|| serde_json::from_slice(&body).ok())
                    .flatten()
            }
        }
    }
}

struct TlsClient {
    addr: SocketAddr,
    name: ServerName<'static>,
    host: String,
    config: Arc<rustls::ClientConfig>,
    conn: Option<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl TlsClient {
    /// One HTTP/1.1 request on the kept-alive connection (a new one if there is none or the
    /// device closed it since): status and body.
    fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Vec<u8>)> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.host,
            body.map_or(0, <[u8]>::len)
        );
        if body.is_some() {
            head.push_str("Content-Type: image/jpeg\r\n");
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        let fresh = self.conn.is_none();
        match self.exchange(&request) {
            Ok(answer) => Ok(answer),
            // A kept-alive connection the device closed meanwhile: once more on a new one.
            Err(_) if !fresh => {
                self.conn = None;
                self.exchange(&request)
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    fn exchange(&mut self, request: &[u8]) -> Result<(u16, Vec<u8>)> {
        if self.conn.is_none() {
            let tcp = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10))?;
            tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
            tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
            tcp.set_nodelay(true)?;
            let conn = rustls::ClientConnection::new(self.config.clone(), self.name.clone())?;
            self.conn = Some(rustls::StreamOwned::new(conn, tcp));
        }
        let stream = self.conn.as_mut().context("a connection")?;
        stream.write_all(request)?;
        stream.flush()?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                bail!("the device closed the connection");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("a status line")?;
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("a Content-Length")?;
        while buf.len() < head_end + len {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                bail!("the device closed the connection mid-answer");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        if head.contains("\r\nconnection: close") {
            self.conn = None;
        }
        Ok((status, buf[head_end..head_end + len].to_vec()))
    }
}

/// Sends `shots` at `FPS` from one kiosk; latency counts from each frame's scheduled time.
fn run_kiosk(target: &Target, shots: &[Shot], start: Instant) -> Vec<Sample> {
    let mut client = target.client();
    let period = Duration::from_secs(1) / FPS;
    let mut out = Vec::with_capacity(shots.len());
    let mut checked_in: Option<usize> = None;
    for (i, shot) in shots.iter().enumerate() {
        let due = start + period * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // As the page does: the whole decoding ladder once a second.
        let path = if i % FPS as usize == 0 {
            "/kiosk/frame?ladder=full"
        } else {
            "/kiosk/frame"
        };
        let v = client.post_jpeg(path, &shot.jpeg);
        let latency_ms = due.elapsed().as_secs_f64() * 1000.0;
        let verdict = v.as_ref().and_then(|v| v["verdict"].as_str());
        let server_ms = v
            .as_ref()
            .and_then(|v| v["server_ms"].as_f64())
            .unwrap_or(f64::NAN);
        let missed = shot.visitor.is_some() && verdict == Some("no_code");
        let expect = match shot.visitor {
            None => "no_code",
            Some(n) if checked_in == Some(n) => "duplicate",
            Some(_) => "accepted",
        };
        let ok = missed || verdict == Some(expect);
        if ok && expect == "accepted" && !missed {
            checked_in = shot.visitor;
        }
        out.push(Sample {
            latency_ms,
            server_ms,
            ok,
            missed,
        });
    }
    out
}

/// Starts `edge-node run` with its kiosk on `http_ip`; the address it serves on.
fn start_device(dev: &Path, http_ip: IpAddr) -> Result<(Proc, SocketAddr)> {
    let run_json = dev.join("run.json");
    let _ = std::fs::remove_file(&run_json);
    let http_arg = SocketAddr::new(http_ip, 0).to_string();
    let proc = Proc(
        Command::new(bin("edge-node"))
            .args([
                "--data",
                dev.to_str().unwrap_or_default(),
                "run",
                "--listen",
                "127.0.0.1:0",
                "--http",
                &http_arg,
                // No sibling beacons on the LAN: this is a bench, not a facility.
                "--no-lan",
            ])
            .env_remove("EDGE_NODE_DATA")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start edge-node run")?,
    );
    let mut http = None;
    wait_until(Duration::from_secs(30), || {
        http = std::fs::read_to_string(&run_json)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["http"].as_str().map(str::to_owned));
        http.is_some()
    });
    let http: SocketAddr = http
        .context("the device did not write run.json within 30 s")?
        .parse()
        .context("run.json's http address")?;
    Ok((proc, http))
}

/// Waits until the device answers `/healthz` through `target`.
fn wait_healthy(target: &Target) -> Result<()> {
    let mut client = target.client();
    let ok = wait_until(Duration::from_secs(30), || match &mut client {
        Client::Http { base, agent } => agent.get(&format!("{base}/healthz")).call().is_ok(),
        Client::Https(c) => c
            .request("GET", "/healthz", None)
            .is_ok_and(|(status, _)| status == 200),
    });
    if !ok {
        bail!(
            "the device did not answer {} within 30 s",
            target.describe()
        );
    }
    Ok(())
}

/// The address the HTTPS phases reach the device at: `KIOSK_BENCH_LAN` (an address of this
/// machine the device can bind, e.g. its LAN address on a bench host), else loopback over TLS.
/// Never guessed from the machine's interfaces: a bench only targets addresses it was given
/// or loopback.
fn lan_address() -> IpAddr {
    std::env::var("KIOSK_BENCH_LAN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// The HTTPS target a paired tablet uses for the device at `addr`: trusting only the device's
/// CA, reaching it by the address when the CA may name it, else by `<hostname>.local`.
fn https_target(dev: &Path, addr: SocketAddr) -> Result<Target> {
    use rustls::pki_types::pem::PemObject;
    let ca = rustls::pki_types::CertificateDer::from_pem_file(dev.join("tls/ca.crt"))
        .context("the device's tls/ca.crt")?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (name, host) = if edge_node::tls::is_pairable(addr.ip()) {
        (ServerName::IpAddress(addr.ip().into()), addr.to_string())
    } else {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("this machine's hostname")?
            .trim()
            .to_ascii_lowercase();
        let local = format!("{hostname}.local");
        (
            ServerName::try_from(local.clone()).context("the hostname as a DNS name")?,
            format!("{local}:{}", addr.port()),
        )
    };
    Ok(Target::Https {
        addr,
        name,
        host,
        config: Arc::new(config),
    })
}

fn phase(target: &Target, scripts: Vec<Vec<Shot>>) -> Result<Vec<Sample>> {
    let start = Instant::now() + Duration::from_millis(200);
    let mut handles = Vec::new();
    for (k, shots) in scripts.into_iter().enumerate() {
        let target = target.clone();
        // Kiosks are not in step: each starts at its own offset within the first period.
        let offset = Duration::from_millis(100) * k as u32 / KIOSKS as u32;
        handles.push(std::thread::spawn(move || {
            run_kiosk(&target, &shots, start + offset)
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("a kiosk thread panicked"))?,
        );
    }
    Ok(all)
}

/// What one transport's two phases measured.
struct Run {
    name: String,
    single: Vec<Sample>,
    load: Vec<Sample>,
    wall: f64,
}

fn main() -> Result<()> {
    for name in ["edge-node", "sync-hub"] {
        if !bin(name).exists() {
            bail!(
                "{} is missing: run `cargo build --release -p edge-node -p sync-hub` first",
                bin(name).display()
            );
        }
    }
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("bench-gate")?;
    let _hub_run = hub.start()?;

    let blank = Arc::new(encode_jpeg(
        &image::GrayImage::from_pixel(640, 480, image::Luma([170])),
        85,
    )?);
    let per_visitor = SHOWING + AWAY;
    let frames_per_kiosk = (FPS * SECONDS) as usize;
    let visitors = frames_per_kiosk.div_ceil(per_visitor);
    let baseline_visitors = ((FPS * BASELINE_SECONDS) as usize).div_ceil(per_visitor);

    // Each transport's kiosks show visitors of their own (fresh codes, one visit each).
    let generated = Instant::now();
    let mut scripts_by_transport = Vec::new();
    for t in 0..2u64 {
        let baseline = kiosk_script(baseline_visitors, 99 + 100 * t, &blank)?;
        let load: Vec<Vec<Shot>> = (0..KIOSKS)
            .map(|k| kiosk_script(visitors, 100 * t + k as u64 + 1, &blank))
            .collect::<Result<_>>()?;
        scripts_by_transport.push((baseline, load));
    }
    eprintln!(
        "generated {} frames in {:.1} s",
        scripts_by_transport
            .iter()
            .map(|(b, l)| b.len() + l.iter().map(Vec::len).sum::<usize>())
            .sum::<usize>(),
        generated.elapsed().as_secs_f64()
    );

    // Baseline 1: the decode of the same frames in this process, no HTTP, no store, with
    // the device's two efforts, one frame at a time.
    use edge_node::kiosk::{Ladder, decode};
    let sample_script = &scripts_by_transport[0].1[0];
    let mut in_process = Vec::new();
    for (ladder, name) in [(Ladder::Live, "live pass"), (Ladder::Full, "full ladder")] {
        for code in [true, false] {
            let mut ms = Vec::new();
            for shot in sample_script
                .iter()
                .filter(|s| s.visitor.is_some() == code)
                .take(100)
            {
                let t = Instant::now();
                let _ = decode(&shot.jpeg, ladder);
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let what = if code {
                "code in view"
            } else {
                "nobody in view"
            };
            in_process.push((format!("in-process {name}, {what}"), summarize(ms)));
        }
    }

    // What the JPEG decode alone costs of that (the rest is finding and reading the code).
    let mut jpeg_ms = Vec::new();
    for shot in sample_script.iter().take(100) {
        let t = Instant::now();
        let _ = edge_node::frame::load_luma(&shot.jpeg);
        jpeg_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    in_process.push((
        "in-process JPEG to luma only".to_owned(),
        summarize(jpeg_ms),
    ));

    let mut runs = Vec::new();
    let lan = lan_address();
    for (t, (baseline, load)) in scripts_by_transport.into_iter().enumerate() {
        // Plain HTTP on loopback first (the earlier runs' figures), then HTTPS on the LAN
        // address, the device restarted to listen there.
        let (device, target, name) = if t == 0 {
            let (device, addr) = start_device(&dev, IpAddr::from([127, 0, 0, 1]))?;
            let target = Target::Http {
                base: format!("http://{addr}"),
            };
            (device, target, "HTTP loopback".to_owned())
        } else {
            let (device, addr) = start_device(&dev, lan)?;
            let target = https_target(&dev, addr)?;
            let name = if lan.is_loopback() {
                "HTTPS loopback".to_owned()
            } else {
                "HTTPS LAN".to_owned()
            };
            (device, target, name)
        };
        wait_healthy(&target)?;
        eprintln!("{name}: {}", target.describe());
        // Baseline 2: one kiosk alone; then the load, four kiosks at once.
        let single = phase(&target, vec![baseline])?;
        let started = Instant::now();
        let load = phase(&target, load)?;
        let wall = started.elapsed().as_secs_f64();
        drop(device);
        runs.push(Run {
            name,
            single,
            load,
            wall,
        });
    }

    let status = fixture::device_status(&dev)?;
    let expected_visits = 2 * (baseline_visitors + KIOSKS * visitors) as u64;

    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "kiosk frame endpoint: {KIOSKS} kiosks x {FPS} fps x {SECONDS} s, 640x480 JPEG q85, hub running; \
         load average after the run: {}",
        load_avg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:<58} {:>6} {:>8} {:>8} {:>8} {:>8}",
        "ms", "n", "p50", "p95", "p99", "max"
    );
    for (name, summary) in &in_process {
        row(name, summary);
    }
    let mut failures = Vec::new();
    for run in &runs {
        let name = &run.name;
        row(
            &format!("{name}: 1 kiosk: verdict latency"),
            &summarize(run.single.iter().map(|s| s.latency_ms).collect()),
        );
        let load_summary = summarize(run.load.iter().map(|s| s.latency_ms).collect());
        row(&format!("{name}: 4 kiosks: verdict latency"), &load_summary);
        row(
            &format!("{name}: 4 kiosks: server time (decode + check-in)"),
            &summarize(
                run.load
                    .iter()
                    .map(|s| s.server_ms)
                    .filter(|m| m.is_finite())
                    .collect(),
            ),
        );
        let wrong = run.single.iter().chain(&run.load).filter(|s| !s.ok).count();
        let missed = run
            .single
            .iter()
            .chain(&run.load)
            .filter(|s| s.missed)
            .count();
        let shown = run.single.len() + run.load.len();
        println!(
            "  {name}: {:.1} frames/s over {:.1} s; wrong or failed verdicts: {wrong}; \
             code frames not read by their pass: {missed} of {shown} frames",
            run.load.len() as f64 / run.wall,
            run.wall
        );
        if wrong > 0 {
            failures.push(format!(
                "{name}: {wrong} frames did not get their expected verdict"
            ));
        }
        if load_summary.p99 >= P99_LIMIT_MS {
            failures.push(format!(
                "{name}: four-kiosk verdict latency p99 {:.1} ms >= {P99_LIMIT_MS} ms",
                load_summary.p99
            ));
        }
    }
    println!(
        "visits stored {} (expected {expected_visits}, one per code)",
        status["records"]
    );
    if status["records"].as_u64() != Some(expected_visits) {
        failures.push(format!(
            "the device stored {} visits, expected {expected_visits} (one per code)",
            status["records"]
        ));
    }
    if !failures.is_empty() {
        bail!("FAILED: {}", failures.join("; "));
    }
    println!("ok: four-kiosk p99 < {P99_LIMIT_MS} ms over both transports");
    Ok(())
}
