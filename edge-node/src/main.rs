//! `edge-node`: one entrance device's command line. Parses arguments, calls the library,
//! maps errors to a one-line reason on stderr and a non-zero exit status.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edge_node::device::DeviceError;
use edge_node::device::{Device, StaffPin};
use edge_node::store::StoreError;
use edge_node::{clock, control, daemon, frame, net};
use host::secret_input::{Echo, SecretInput};
use serde_json::json;
use shared::paper::PaperEntry;
use shared::token::{Keyring, Verdict, verify};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "edge-node",
    version,
    about = "An entrance device of the offline-first visitor log"
)]
struct Cli {
    /// The device's state folder.
    #[arg(
        long,
        env = "EDGE_NODE_DATA",
        global = true,
        default_value = "./edge-data"
    )]
    data: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this device from a hub's enrollment ticket (works offline).
    Init {
        /// The ticket file from `sync-hub enroll`. Delete it afterwards: it is a credential.
        #[arg(long)]
        ticket: PathBuf,
        /// The staff PIN (6 to 12 digits) that opens the kiosk's staff mode; `pin set` sets
        /// or changes it later. Give `--staff-pin` alone to type it (not echoed) or pipe it on
        /// stdin: a value on the command line stays in shell history and /proc.
        #[arg(long, num_args = 0..=1, value_name = "PIN")]
        staff_pin: Option<Option<String>>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Decode, verify and record the codes in camera frames (PNG or JPEG), one line each.
    Scan {
        /// Print JSON, one object per image.
        #[arg(long)]
        json: bool,
        /// The frames.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Diagnose a code without recording anything.
    CheckCode {
        /// The issuer keyring file (qr-token-v1.md format).
        #[arg(long)]
        keyring: PathBuf,
        /// Check as if the clock read this (Unix seconds).
        #[arg(long)]
        now: Option<u64>,
        /// Clock tolerance in seconds.
        #[arg(long, default_value_t = edge_node::device::DEFAULT_SKEW)]
        skew: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// A frame holding the code.
        #[arg(long, conflicts_with = "payload")]
        image: Option<PathBuf>,
        /// The code's text (KP1:...).
        #[arg(required_unless_present = "image")]
        payload: Option<String>,
    },
    /// The paper log, for visitors who do not use a QR code.
    Paper {
        #[command(subcommand)]
        command: PaperCommand,
    },
    /// The device's figures.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One sync with the hub and any reachable sibling devices, then exit.
    Sync {
        /// Required: run one round and exit (`run` keeps syncing in the background).
        #[arg(long, required = true)]
        once: bool,
        /// A sibling device to try too: ENDPOINT_ID@IP:PORT (repeatable).
        #[arg(long)]
        peer: Vec<String>,
        /// The local UDP address to sync from.
        #[arg(long, default_value = "0.0.0.0:0")]
        listen: std::net::SocketAddr,
        /// Reach the hub at this address instead of the ticket's (a moved hub, a tunnel).
        #[arg(long)]
        hub_addr: Option<std::net::SocketAddr>,
        /// Print JSON, one object per session.
        #[arg(long)]
        json: bool,
    },
    /// Run the device: background sync with the hub and siblings, retention.
    Run {
        /// The UDP address siblings reach this device on.
        #[arg(long, default_value = "0.0.0.0:7450")]
        listen: std::net::SocketAddr,
        /// The local HTTP address of the device's API (commands use it while `run` is active).
        #[arg(long, default_value = "127.0.0.1:7451")]
        http: std::net::SocketAddr,
        /// A sibling device to sync with: ENDPOINT_ID@IP:PORT (repeatable).
        #[arg(long)]
        peer: Vec<String>,
        /// Neither send nor heed sibling beacons on the local network (docs/lan.md).
        #[arg(long)]
        no_lan: bool,
    },
    /// The staff PIN that opens the kiosk's staff mode (the paper log).
    Pin {
        #[command(subcommand)]
        command: PinCommand,
    },
    /// Enforce retention now, or as if the clock read UNIX (only ever later than now).
    Purge {
        /// Unix seconds; earlier than now is ignored.
        #[arg(long)]
        as_of: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PinCommand {
    /// Set or change the staff PIN (6 to 12 digits), read from stdin (typed without echo on a
    /// terminal) unless --pin is given a value.
    Set {
        /// The PIN. Prefer stdin (`--pin` alone, or no flag): a value on the command line stays
        /// in shell history and /proc.
        #[arg(long, num_args = 0..=1, value_name = "PIN")]
        pin: Option<Option<String>>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PaperCommand {
    /// Record a paper-log visitor (sealed: only the health authority can read it).
    Add {
        /// Visitor's name. Give `--name` alone to read it from stdin (typed, or piped one line
        /// per such flag: name, then phone): a value on the command line stays in shell
        /// history and /proc.
        #[arg(long, num_args = 0..=1, required = true, value_name = "NAME")]
        name: Option<Option<String>>,
        /// Visitor's phone number; `--phone` alone reads it from stdin, after the name.
        #[arg(long, num_args = 0..=1, required = true, value_name = "PHONE")]
        phone: Option<Option<String>>,
        /// When they visited (Unix seconds). Default: now.
        #[arg(long)]
        visited_at: Option<u64>,
        /// The visitor consented to collection.
        #[arg(long)]
        consent_collect: bool,
        /// The visitor consented to provision to the health authority.
        #[arg(long)]
        consent_share: bool,
        /// The visitor is under 14 (then a guardian's consent is required).
        #[arg(long)]
        minor: bool,
        /// A guardian consented (for visitors under 14).
        #[arg(long)]
        guardian_consent: bool,
        /// Remarks.
        #[arg(long, default_value = "")]
        remarks: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGE_NODE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("edge-node: {}", one_line(&e));
            std::process::exit(1);
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

/// What the visitor is told, Korean first; for a malformed code, why (not a check-in code
/// at all, or a damaged one).
fn message(v: Verdict, text: Option<&str>) -> String {
    if v == Verdict::Malformed
        && let Some(m) = text.and_then(shared::token::malformed_reason)
    {
        return format!("{} / {}", m.message_ko(), m.message_en());
    }
    format!("{} / {}", v.message_ko(), v.message_en())
}

fn run(cli: Cli) -> Result<i32> {
    let data = cli.data;
    // Before anything is created: every file of ours is owner-only (keys, stores, exports).
    host::private_files::restrict(&data);
    let now = clock::now();
    match cli.command {
        Command::Init {
            ticket,
            staff_pin,
            json,
        } => {
            let input = SecretInput::new("edge-node", PROMPT_ORDER);
            let pin = staff_pin
                .map(|v| input.value("--staff-pin", "staff PIN", v, Echo::Off))
                .transpose()?;
            // Checked before enrolling, so a bad PIN leaves the folder untouched.
            let pin = pin.as_deref().map(StaffPin::new).transpose()?;
            let mut dev = Device::init(&data, &ticket, now)?;
            if let Some(pin) = &pin {
                dev.set_staff_pin(pin)?;
            }
            let e = dev.enrollment();
            if json {
                println!(
                    "{}",
                    json!({"facility_id": e.facility.id, "device_id": e.device_id, "device_name": e.device_name,
                           "hub_id": e.hub.endpoint_id})
                );
            } else {
                println!(
                    "enrolled device {} ({}) of facility {} ({}); delete the ticket file now",
                    e.device_id, e.device_name, e.facility.id, e.facility.registration.name
                );
            }
            Ok(0)
        }
        Command::Scan { json, images } => scan(&data, json, &images),
        Command::CheckCode {
            keyring,
            now: at,
            skew,
            json,
            image,
            payload,
        } => {
            let text = std::fs::read_to_string(&keyring)
                .with_context(|| format!("cannot read keyring {}", keyring.display()))?;
            let ring = Keyring::from_json(&text)
                .with_context(|| format!("keyring {}", keyring.display()))?;
            let text = match (image, payload) {
                (Some(img), _) => {
                    let bytes = frame::read_frame_file(&img)?;
                    frame::decode_frame(&bytes).with_context(|| img.display().to_string())?
                }
                (None, Some(p)) => Some(p),
                (None, None) => bail!("give a PAYLOAD or --image FILE"),
            };
            let verdict = match &text {
                None => Verdict::NoCode,
                Some(t) => match verify(t, &ring, at.unwrap_or(now), skew) {
                    Ok(_) => Verdict::Accepted,
                    Err(v) => v,
                },
            };
            let text = text.as_deref();
            if json {
                println!(
                    "{}",
                    json!({"verdict": verdict.as_str(), "message": message(verdict, text)})
                );
            } else {
                println!("{}: {}", verdict.as_str(), message(verdict, text));
            }
            Ok(0)
        }
        Command::Paper {
            command:
                PaperCommand::Add {
                    name,
                    phone,
                    visited_at,
                    consent_collect,
                    consent_share,
                    minor,
                    guardian_consent,
                    remarks,
                    json,
                },
        } => {
            if shared::device::check_guardian(minor, guardian_consent).is_err() {
                bail!(
                    "a visitor under 14 needs a guardian's consent (--guardian-consent); nothing was recorded"
                );
            }
            let input = SecretInput::new("edge-node", PROMPT_ORDER);
            let name = input.value("--name", "visitor's name", name.flatten(), Echo::On)?;
            let phone = input.value("--phone", "visitor's phone", phone.flatten(), Echo::On)?;
            let entry = PaperEntry {
                name,
                phone,
                visited_at: visited_at.unwrap_or(now),
                consent_collect,
                consent_share,
                guardian_consent,
                remarks,
            };
            // Refuse before opening the store, so a refused entry touches nothing.
            shared::device::check_paper_form(&entry, minor)?;
            let id = match Device::open(&data) {
                Ok(mut dev) => dev.add_paper(now, &entry, minor)?.to_string(),
                Err(e) if is_busy(&e) => control::Client::find(&data)?
                    .post_json("/api/paper", &paper_request(&entry, minor)?)?["record_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", json!({"record_id": id, "stored": true}));
            } else {
                println!("paper-log entry stored, sealed for the health authority");
            }
            Ok(0)
        }
        Command::Status { json } => {
            let s: serde_json::Value = match Device::open(&data) {
                Ok(dev) => {
                    let mut v = serde_json::to_value(dev.status(now)?)?;
                    v["last_sync_failure"] =
                        serde_json::to_value(edge_node::net::last_sync_failure(&dev))?;
                    v
                }
                Err(e) if is_busy(&e) => control::Client::find(&data)?.get("/api/status")?,
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{s}");
            } else {
                let failure: Option<edge_node::net::SyncFailure> =
                    serde_json::from_value(s["last_sync_failure"].clone()).unwrap_or(None);
                let s: edge_node::device::Status = serde_json::from_value(s)?;
                println!(
                    "device {} ({}) of {} ({})",
                    s.device_id, s.device_name, s.facility_id, s.facility_name
                );
                println!(
                    "records {}  unsynced {}  partitions {}  day keys left {}  last sync {}",
                    s.records,
                    s.unsynced,
                    s.partitions.len(),
                    s.day_keys_left,
                    s.last_sync.map_or("never".to_owned(), |t| t.to_string())
                );
                for b in &s.siblings {
                    println!(
                        "sibling {} ({}): on the network {}  roster {}  last reached {}",
                        b.device_id,
                        b.name,
                        b.lan_addrs.first().map_or("not seen", String::as_str),
                        b.roster_addrs.first().map_or("-", String::as_str),
                        b.last_reached.map_or("never".to_owned(), |t| t.to_string())
                    );
                }
                for w in &s.warnings {
                    println!("warning: {w}");
                }
                if let Some(f) = failure {
                    println!(
                        "last sync failure at {} with {}: {}{}",
                        f.at,
                        f.peer,
                        match (&f.refused_by, &f.reason) {
                            (Some(by), Some(reason)) => format!("refused by {by} ({reason}): "),
                            _ => String::new(),
                        },
                        f.detail
                    );
                }
            }
            Ok(0)
        }
        Command::Sync {
            once: _,
            peer,
            listen,
            hub_addr,
            json,
        } => {
            let peers = peer
                .iter()
                .map(|p| net::parse_peer(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let device = match Device::open(&data) {
                Ok(d) => d,
                Err(e) if is_busy(&e) => {
                    // `run` is active: ask it to sync now and report the outcome.
                    let v = control::Client::find(&data)?.post_json("/api/sync", &json!({}))?;
                    println!("{v}");
                    return Ok(if v["ok"].as_bool() == Some(true) {
                        0
                    } else {
                        3
                    });
                }
                Err(e) => return Err(e.into()),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let reports = rt.block_on(async {
                let device = std::sync::Arc::new(std::sync::Mutex::new(device));
                let endpoint = net::bind(&device, listen).await?;
                let reports = daemon::sync_round(&endpoint, &device, &peers, hub_addr).await;
                endpoint.close().await;
                reports
            })?;
            for r in &reports {
                if json {
                    println!("{}", serde_json::to_string(r)?);
                } else {
                    match &r.error {
                        None => println!(
                            "{}: ok, {} records in, {} bytes sent, {} bytes received",
                            r.peer,
                            r.records_received,
                            r.socket_bytes_sent,
                            r.socket_bytes_received
                        ),
                        Some(e) => println!("{}: not synced: {e}", r.peer),
                    }
                }
            }
            if reports.first().is_some_and(|r| r.ok) {
                Ok(0)
            } else {
                let why = reports
                    .first()
                    .and_then(|r| r.error.clone())
                    .unwrap_or_else(|| "no session".into());
                eprintln!(
                    "edge-node: the hub was not reached: {}",
                    why.replace('\n', " ")
                );
                Ok(3)
            }
        }
        Command::Run {
            listen,
            http,
            peer,
            no_lan,
        } => {
            let peers = peer
                .iter()
                .map(|p| net::parse_peer(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let device = open_for_run(&data)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let token = control::control_token(&data)?;
            rt.block_on(async {
                let device = std::sync::Arc::new(std::sync::Mutex::new(device));
                let wake = std::sync::Arc::new(tokio::sync::Notify::new());
                let listener = tokio::net::TcpListener::bind(http)
                    .await
                    .with_context(|| format!("cannot listen for HTTP on {http}"))?;
                let addr = listener.local_addr()?;
                control::write_run_file(&data, addr)?;
                let app = control::router(control::ControlState {
                    device: device.clone(),
                    wake: wake.clone(),
                    token: std::sync::Arc::new(token),
                });
                if !addr.ip().is_loopback() {
                    tracing::warn!(
                        "the kiosk page is reachable from the network at http://{addr}/ (the control API still answers only on loopback)"
                    );
                }
                let server = axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                );
                let result = tokio::select! {
                    r = daemon::run(device, listen, peers, wake, !no_lan, shutdown_signal()) => r.map_err(anyhow::Error::from),
                    r = server => r.map_err(anyhow::Error::from),
                };
                control::remove_run_file(&data);
                result
            })?;
            Ok(0)
        }
        Command::Pin {
            command: PinCommand::Set { pin, json },
        } => {
            let pin = SecretInput::new("edge-node", PROMPT_ORDER).value(
                "--pin",
                "staff PIN",
                pin.flatten(),
                Echo::Off,
            )?;
            let hashed = StaffPin::new(&pin)?;
            match Device::open(&data) {
                Ok(mut dev) => dev.set_staff_pin(&hashed)?,
                Err(e) if is_busy(&e) => {
                    control::Client::find(&data)?.post_json("/api/pin", &json!({ "pin": pin }))?;
                }
                Err(e) => return Err(e.into()),
            }
            if json {
                println!("{}", json!({ "staff_pin_set": true }));
            } else {
                println!("staff PIN set; open staff mode on the kiosk page with it");
            }
            Ok(0)
        }
        Command::Purge { as_of, json } => {
            let r: serde_json::Value = match Device::open(&data) {
                Ok(mut dev) => serde_json::to_value(dev.purge(now, as_of)?)?,
                Err(e) if is_busy(&e) => control::Client::find(&data)?
                    .post_json("/api/purge", &json!({ "as_of": as_of }))?,
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{r}");
            } else {
                let r: edge_node::device::PurgeReport = serde_json::from_value(r)?;
                println!(
                    "retention as of {}: horizon day {}, dropped {} partitions, kept {} unsynced for one more day",
                    r.as_of,
                    r.horizon,
                    r.dropped.len(),
                    r.kept_unsynced.len()
                );
            }
            Ok(0)
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The order `edge-node` reads bare flags from stdin in.
const PROMPT_ORDER: &str = "name, then phone, then PIN";

/// `/api/paper`'s body: the entry and the under-14 flag.
fn paper_request(entry: &PaperEntry, minor: bool) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(entry)?;
    v["minor"] = serde_json::Value::Bool(minor);
    Ok(v)
}

fn is_busy(e: &DeviceError) -> bool {
    matches!(e, DeviceError::Store(StoreError::Busy(_)))
}

/// Opens the device for `run`, waiting up to [`edge_node::store::RUN_LOCK_WAIT`] (or
/// `EDGE_NODE_LOCK_WAIT_MS` milliseconds) while a short command holds the store, so a `run`
/// started next to one does not exit. Only `run` waits: other commands use the running
/// device's API when the store is busy.
fn open_for_run(data: &Path) -> Result<Device> {
    let wait = std::env::var("EDGE_NODE_LOCK_WAIT_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(
            edge_node::store::RUN_LOCK_WAIT,
            std::time::Duration::from_millis,
        );
    match host::store_lock::wait_while_busy(wait, || Device::open(data), is_busy) {
        Ok(dev) => Ok(dev),
        Err(e) if is_busy(&e) => bail!(
            "{e}; still held after waiting {:.1} s{}",
            wait.as_secs_f64(),
            holder(data)
        ),
        Err(e) => Err(e.into()),
    }
}

/// Who holds the store, if `run.json` says: a running device records its process id there.
fn holder(data: &Path) -> String {
    std::fs::read_to_string(data.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["pid"].as_u64())
        .map(|pid| format!(" (run.json names process {pid}, a running `edge-node run`)"))
        .unwrap_or_default()
}

/// Where scans go: the store itself, or the running device.
enum Scanner {
    Local(Box<Device>),
    Running(control::Client),
}

fn scan(data: &Path, json: bool, images: &[PathBuf]) -> Result<i32> {
    let mut scanner = match Device::open(data) {
        Ok(d) => Scanner::Local(Box::new(d)),
        Err(e) if is_busy(&e) => Scanner::Running(control::Client::find(data)?),
        Err(e) => return Err(e.into()),
    };
    let mut failed = 0;
    for img in images {
        let bytes = match frame::read_frame_file(img) {
            Ok(b) => b,
            Err(e) => {
                eprintln!(
                    "edge-node: {}: {}",
                    img.display(),
                    e.to_string().replace(['\n', '\r'], " ")
                );
                failed += 1;
                continue;
            }
        };
        let (verdict, text) = match &mut scanner {
            Scanner::Local(dev) => {
                let text = match frame::decode_frame(&bytes) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!(
                            "edge-node: {}: {}",
                            img.display(),
                            e.to_string().replace(['\n', '\r'], " ")
                        );
                        failed += 1;
                        continue;
                    }
                };
                let verdict = match &text {
                    None => Verdict::NoCode,
                    Some(t) => dev.check_in(clock::now(), t)?.verdict,
                };
                (verdict, text)
            }
            Scanner::Running(client) => match client.post_bytes("/api/scan", &bytes) {
                Ok(v) => {
                    let verdict: Verdict = v["verdict"].as_str().unwrap_or("no_code").parse()?;
                    (verdict, v["text"].as_str().map(str::to_owned))
                }
                Err(e) => {
                    eprintln!(
                        "edge-node: {}: {}",
                        img.display(),
                        e.to_string().replace(['\n', '\r'], " ")
                    );
                    failed += 1;
                    continue;
                }
            },
        };
        let text = text.as_deref();
        // Printed only now: for `accepted` the visit is already durable.
        if json {
            println!(
                "{}",
                json!({"image": img.display().to_string(), "verdict": verdict.as_str(), "message": message(verdict, text)})
            );
        } else {
            println!(
                "{}: {} {}",
                img.display(),
                verdict.as_str(),
                message(verdict, text)
            );
        }
    }
    Ok(if failed > 0 { 2 } else { 0 })
}
