//! `edge-node`'s command line: its arguments ([`Cli`]) and [`run`], which runs a command on
//! the device's store, or through the running device's API ([`control::Client`]) while `run`
//! holds the store, and prints its typed answer once: as JSON with `--json`, as text
//! otherwise ([`Answer`]). The running device's JSON answers are read into the same types, so
//! a renamed field fails to parse instead of printing blank. `main.rs` only parses the
//! arguments, sets up logging and calls [`run`].

use crate::device::{Device, DeviceError, PurgeReport, StaffPin, Status};
use crate::net::{SyncFailure, SyncReport};
use crate::store::StoreError;
use crate::{clock, control, daemon, frame, net};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use host::secret_input::{Echo, SecretInput};
use serde::{Deserialize, Serialize};
use shared::paper::PaperEntry;
use shared::token::{Keyring, Verdict, verify};
use std::path::{Path, PathBuf};

/// The command line's arguments.
#[derive(Parser)]
#[command(
    name = "edge-node",
    version,
    about = "An entrance device of the offline-first visitor log"
)]
pub struct Cli {
    /// The device's state folder.
    #[arg(
        long,
        env = "EDGE_NODE_DATA",
        global = true,
        default_value = "./edge-data"
    )]
    pub data: PathBuf,
    /// Logs on stderr: `text`, or `json` (one JSON object per line).
    #[arg(
        long,
        env = "EDGE_NODE_LOG_FORMAT",
        global = true,
        default_value = "text"
    )]
    pub log_format: host::logging::LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        #[arg(long, default_value_t = crate::device::DEFAULT_SKEW)]
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
    /// Pair a tablet with the running device: a one-time HTTPS pairing URL (the QR code the
    /// sheet at http://127.0.0.1:7451/pair shows) and the fingerprints of the device's
    /// certificate authority.
    Pair {
        /// The private IP address tablets reach this device on (default: the one `run`
        /// listens on, or the one this machine reaches other networks from).
        #[arg(long)]
        host: Option<std::net::IpAddr>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
pub enum PinCommand {
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
pub enum PaperCommand {
    /// Record a paper-log visitor (sealed: only the health authority can read it).
    Add {
        /// Visitor's name. Give `--name` alone to read it from stdin (typed, or piped one line
        /// per such flag: name, then phone): a value on the command line stays in shell
        /// history and /proc.
        #[arg(long, num_args = 0..=1, required = true, value_name = "NAME")]
        name: Option<Option<String>>,
        /// Visitor's phone number; `--phone` alone reads it from stdin, after the name.
        /// Not needed when `--safe-number` is given.
        #[arg(
            long,
            num_args = 0..=1,
            required_unless_present = "safe_number",
            value_name = "PHONE"
        )]
        phone: Option<Option<String>>,
        /// Visitor's personal safe number (개인안심번호: 4 digits and 2 Hangul syllables, e.g.
        /// 12가34나), instead of or beside the phone; `--safe-number` alone reads it from
        /// stdin, after the name and phone.
        #[arg(long, num_args = 0..=1, value_name = "NUMBER")]
        safe_number: Option<Option<String>>,
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

/// How a command ended, beyond "it failed" (an `Err` of [`run`], exit status 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command did its job (a rejected code is a result, not a failure): status 0.
    Done,
    /// `scan`: some frames could not be read (each named on stderr): status 2.
    FramesUnreadable,
    /// `sync --once`: the hub's session did not complete: status 3.
    NotSynced,
}

impl Exit {
    /// The process's exit status.
    pub fn code(self) -> i32 {
        match self {
            Exit::Done => 0,
            Exit::FramesUnreadable => 2,
            Exit::NotSynced => 3,
        }
    }
}

/// A command's answer, printed once: [`Answer::json`] with `--json`, [`Answer::text`]
/// otherwise.
pub trait Answer: Serialize {
    /// The human-readable lines.
    fn text(&self) -> String;

    /// The JSON line: keys sorted at every level, the order the command line has always
    /// printed (through `serde_json`'s map, which sorts; `spec/cli.md` documents the shapes).
    fn json(&self) -> Result<String> {
        Ok(serde_json::to_value(self)?.to_string())
    }
}

fn print(json: bool, answer: &impl Answer) -> Result<()> {
    if json {
        println!("{}", answer.json()?);
    } else {
        println!("{}", answer.text());
    }
    Ok(())
}

/// `init`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct Enrolled {
    /// This device's id at the hub.
    pub device_id: shared::DeviceId,
    /// Where it stands.
    pub device_name: String,
    /// Its facility.
    pub facility_id: shared::FacilityId,
    /// The facility's name (text only).
    #[serde(skip)]
    pub facility_name: String,
    /// The hub's endpoint id.
    pub hub_id: String,
}

impl Answer for Enrolled {
    fn text(&self) -> String {
        format!(
            "enrolled device {} ({}) of facility {} ({}); delete the ticket file now",
            self.device_id, self.device_name, self.facility_id, self.facility_name
        )
    }
}

/// `check-code`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct CodeCheck {
    /// What the visitor is told.
    pub message: String,
    /// The verdict (`qr-token-v1.md`'s names).
    pub verdict: &'static str,
}

impl CodeCheck {
    fn new(verdict: Verdict, text: Option<&str>) -> CodeCheck {
        CodeCheck {
            message: message(verdict, text),
            verdict: verdict.as_str(),
        }
    }
}

impl Answer for CodeCheck {
    fn text(&self) -> String {
        format!("{}: {}", self.verdict, self.message)
    }
}

/// One line of `scan`'s answer: one frame's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Scanned {
    /// The frame's file.
    pub image: String,
    /// What the visitor is told.
    pub message: String,
    /// The verdict.
    pub verdict: &'static str,
}

impl Answer for Scanned {
    fn text(&self) -> String {
        format!("{}: {} {}", self.image, self.verdict, self.message)
    }
}

/// `paper add`'s answer (also the running device's answer to `/api/paper`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaperStored {
    /// The sealed entry's record id.
    pub record_id: String,
    /// Always true: an entry that was not stored is an error.
    pub stored: bool,
}

impl Answer for PaperStored {
    fn text(&self) -> String {
        "paper-log entry stored, sealed for the health authority".into()
    }
}

/// `pin set`'s answer (also the running device's answer to `/api/pin`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinSet {
    /// Always true: a PIN that was not set is an error.
    pub staff_pin_set: bool,
}

impl Answer for PinSet {
    fn text(&self) -> String {
        "staff PIN set; open staff mode on the kiosk page with it".into()
    }
}

impl Answer for crate::pairing::PairingOffer {
    fn text(&self) -> String {
        let mut t = format!(
            "open on the tablet (once, within 10 minutes): {}\ncertificate fingerprint (SHA-256): {}\npublic key pin (SPKI SHA-256, base64): {}",
            self.url, self.ca_sha256, self.spki_sha256
        );
        if !self.reachable_from_network {
            t.push_str("\nthe kiosk listens on this machine only: run with --http 0.0.0.0:7451 so tablets can reach it");
        }
        t
    }
}

/// `status`'s answer (also the running device's answer to `/api/status`): the device's
/// figures and its last sync failure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The figures.
    #[serde(flatten)]
    pub status: Status,
    /// The last sync session that did not complete, or null.
    pub last_sync_failure: Option<SyncFailure>,
}

impl Answer for DeviceStatus {
    fn text(&self) -> String {
        let s = &self.status;
        let mut out = format!(
            "device {} ({}) of {} ({})\nrecords {}  unsynced {}  partitions {}  day keys left {}  last sync {}",
            s.device_id,
            s.device_name,
            s.facility_id,
            s.facility_name,
            s.records,
            s.unsynced,
            s.partitions.len(),
            s.day_keys_left,
            s.last_sync.map_or("never".to_owned(), |t| t.to_string())
        );
        if s.hubs.len() > 1 {
            for h in &s.hubs {
                out.push_str(&format!(
                    "\n{} hub {}: last sync {}  day keys until {}",
                    h.role,
                    h.endpoint_id,
                    h.last_sync.map_or("never".to_owned(), |t| t.to_string()),
                    h.day_keys_until
                        .map_or("none".to_owned(), |d| d.to_string())
                ));
            }
            out.push_str(&format!(
                "\nsession keys wrapped to one hub only: {}",
                s.single_hub_wraps
            ));
        }
        for b in &s.siblings {
            out.push_str(&format!(
                "\nsibling {} ({}): on the network {}  roster {}  last reached {}",
                b.device_id,
                b.name,
                b.lan_addrs.first().map_or("not seen", String::as_str),
                b.roster_addrs.first().map_or("-", String::as_str),
                b.last_reached.map_or("never".to_owned(), |t| t.to_string())
            ));
        }
        for w in &s.warnings {
            out.push_str(&format!("\nwarning: {w}"));
        }
        if let Some(f) = &self.last_sync_failure {
            out.push_str(&format!(
                "\nlast sync failure at {} with {}: {}{}",
                f.at,
                f.peer,
                match (&f.refused_by, &f.reason) {
                    (Some(by), Some(reason)) => format!("refused by {by} ({reason}): "),
                    _ => String::new(),
                },
                f.detail
            ));
        }
        out
    }
}

impl Answer for PurgeReport {
    fn text(&self) -> String {
        format!(
            "retention as of {}: horizon day {}, dropped {} partitions, kept {} unsynced for one more day",
            self.as_of,
            self.horizon,
            self.dropped.len(),
            self.kept_unsynced.len()
        )
    }
}

/// One line of `sync --once`'s answer: one session.
impl Answer for SyncReport {
    fn text(&self) -> String {
        match &self.error {
            None => format!(
                "{}: ok, {} records in, {} bytes sent, {} bytes received",
                self.peer,
                self.records_received,
                self.socket_bytes_sent,
                self.socket_bytes_received
            ),
            Some(e) => format!("{}: not synced: {e}", self.peer),
        }
    }

    /// In the report's own field order, as `sync --once --json` has always printed it.
    fn json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }
}

/// `sync --once`'s answer while `run` is active: the running device's answer to
/// `/api/sync`, which asks it to sync with the hub now and waits for the outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncNow {
    /// Why the hub was not reached, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The completed sync's time, when it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<u64>,
    /// Whether the hub's session completed.
    pub ok: bool,
    /// Always `hub`.
    pub peer: String,
}

impl Answer for SyncNow {
    fn text(&self) -> String {
        match &self.error {
            None => format!("{}: ok", self.peer),
            Some(e) => format!("{}: not synced: {e}", self.peer),
        }
    }
}

/// The running device's answer to `/api/scan`.
#[derive(Debug, Deserialize)]
struct ScanReply {
    verdict: String,
    text: Option<String>,
}

/// The empty body of `/api/sync`.
#[derive(Serialize)]
struct Empty {}

/// What `run.json` says of the running device that we read here.
#[derive(Deserialize)]
struct RunFile {
    pid: Option<u64>,
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

/// Runs a command and prints its answer. `Ok` carries how it ended ([`Exit::code`] is the
/// process's status); an `Err` is a command that could not do its job (status 1).
pub fn run(cli: Cli) -> Result<Exit> {
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
            print(
                json,
                &Enrolled {
                    device_id: e.device_id.clone(),
                    device_name: e.device_name.clone(),
                    facility_id: e.facility.id.clone(),
                    facility_name: e.facility.registration.name.clone(),
                    hub_id: e.hub.endpoint_id.clone(),
                },
            )?;
            Ok(Exit::Done)
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
            print(json, &CodeCheck::new(verdict, text.as_deref()))?;
            Ok(Exit::Done)
        }
        Command::Paper {
            command:
                PaperCommand::Add {
                    name,
                    phone,
                    safe_number,
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
            let phone = match phone {
                Some(given) => input.value("--phone", "visitor's phone", given, Echo::On)?,
                None => String::new(),
            };
            let safe_number = match safe_number {
                Some(given) => Some(
                    input
                        .value(
                            "--safe-number",
                            "visitor's personal safe number",
                            given,
                            Echo::On,
                        )?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            let entry = PaperEntry {
                name,
                phone,
                safe_number,
                visited_at: visited_at.unwrap_or(now),
                consent_collect,
                consent_share,
                guardian_consent,
                remarks,
            };
            // Refuse before opening the store, so a refused entry touches nothing.
            shared::device::check_paper_form(&entry, minor)?;
            let stored = match Device::open(&data) {
                Ok(mut dev) => PaperStored {
                    record_id: dev.add_paper(now, &entry, minor)?.to_string(),
                    stored: true,
                },
                Err(e) if is_busy(&e) => control::Client::find(&data)?
                    .post_json("/api/paper", &control::PaperRequest { entry, minor })?,
                Err(e) => return Err(e.into()),
            };
            print(json, &stored)?;
            Ok(Exit::Done)
        }
        Command::Status { json } => {
            let status = match Device::open(&data) {
                Ok(dev) => DeviceStatus {
                    status: dev.status(now)?,
                    last_sync_failure: net::last_sync_failure(&dev),
                },
                Err(e) if is_busy(&e) => control::Client::find(&data)?.get("/api/status")?,
                Err(e) => return Err(e.into()),
            };
            print(json, &status)?;
            Ok(Exit::Done)
        }
        Command::Sync {
            once: _,
            peer,
            listen,
            hub_addr,
            json,
        } => {
            let peers = parse_peers(&peer)?;
            let device = match Device::open(&data) {
                Ok(d) => d,
                Err(e) if is_busy(&e) => {
                    // `run` is active: ask it to sync now and report the outcome, as JSON
                    // with or without `--json` (as it always has).
                    let answer: SyncNow =
                        control::Client::find(&data)?.post_json("/api/sync", &Empty {})?;
                    print(true, &answer)?;
                    return Ok(if answer.ok {
                        Exit::Done
                    } else {
                        Exit::NotSynced
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
                print(json, r)?;
            }
            // Any of the region's hubs completing is the hub reached.
            let hubs: Vec<&net::SyncReport> = reports.iter().filter(|r| r.is_hub).collect();
            if hubs.iter().any(|r| r.ok) {
                Ok(Exit::Done)
            } else {
                let why = hubs
                    .iter()
                    .filter_map(|r| r.error.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                let why = if why.is_empty() {
                    "no session".into()
                } else {
                    why
                };
                eprintln!(
                    "edge-node: the hub was not reached: {}",
                    why.replace('\n', " ")
                );
                Ok(Exit::NotSynced)
            }
        }
        Command::Run {
            listen,
            http,
            peer,
            no_lan,
        } => {
            let peers = parse_peers(&peer)?;
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
                // The kiosk's certificate authority (made on first use): tablets on the
                // network get the kiosk over HTTPS on the same port (`tls`, `pairing`).
                // A CA that cannot be loaded costs the network kiosk, not the device: it
                // serves this machine over plain HTTP and keeps syncing.
                let tls = match crate::tls::DeviceTls::load_or_create(&data, clock::now()) {
                    Ok(t) => Some(std::sync::Arc::new(t)),
                    Err(e) => {
                        let why = format!("{e:#}");
                        tracing::warn!(
                            "the kiosk's HTTPS is unavailable, serving this machine only over plain HTTP: {why}"
                        );
                        crate::tls::set_unavailable(why);
                        None
                    }
                };
                let pairing = tls.as_ref().map(|t| {
                    std::sync::Arc::new(crate::pairing::Pairing::new(t.clone(), addr))
                });
                control::write_run_file(&data, addr)?;
                let app = control::router_with(
                    control::ControlState {
                        device: device.clone(),
                        wake: wake.clone(),
                        token: std::sync::Arc::new(token),
                    },
                    pairing,
                );
                if !addr.ip().is_loopback() && tls.is_some() {
                    tracing::warn!(
                        "the kiosk page is reachable from the network at https://{addr}/ (pair tablets at http://127.0.0.1:{}/pair; plain HTTP and the control API answer only on loopback)",
                        addr.port()
                    );
                }
                let server = crate::tls::serve(listener, app, tls, clock::now);
                // Under systemd (`Type=notify`, `WatchdogSec=`): ready now, and pinged while
                // the device's own health check passes (the store takes a write).
                let watched = device.clone();
                let probe = crate::metrics::ProbeCache::default();
                host::watchdog::serve(move || {
                    let dev = watched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    crate::metrics::health(&dev, &probe, clock::now())
                        .is_ok_and(|h| h.status != crate::metrics::Overall::Unhealthy)
                });
                let result = tokio::select! {
                    r = daemon::run(device, listen, peers, wake, !no_lan, shutdown_signal()) => r.map_err(anyhow::Error::from),
                    r = server => r.map_err(anyhow::Error::from),
                };
                control::remove_run_file(&data);
                result
            })?;
            Ok(Exit::Done)
        }
        Command::Pair { host, json } => {
            if !data.join("run.json").exists() {
                bail!(
                    "pairing needs the running device: start `edge-node run --http 0.0.0.0:7451`, then pair (or open http://127.0.0.1:7451/pair on the device)"
                );
            }
            let offer: crate::pairing::PairingOffer = control::Client::find(&data)?
                .post_json("/api/pair", &control::PairRequest { host })?;
            print(json, &offer)?;
            Ok(Exit::Done)
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
            let set = match Device::open(&data) {
                Ok(mut dev) => {
                    dev.set_staff_pin(&hashed)?;
                    PinSet {
                        staff_pin_set: true,
                    }
                }
                Err(e) if is_busy(&e) => control::Client::find(&data)?
                    .post_json("/api/pin", &control::PinRequest { pin })?,
                Err(e) => return Err(e.into()),
            };
            print(json, &set)?;
            Ok(Exit::Done)
        }
        Command::Purge { as_of, json } => {
            let report: PurgeReport = match Device::open(&data) {
                Ok(mut dev) => dev.purge(now, as_of)?,
                Err(e) if is_busy(&e) => control::Client::find(&data)?
                    .post_json("/api/purge", &control::PurgeRequest { as_of })?,
                Err(e) => return Err(e.into()),
            };
            print(json, &report)?;
            Ok(Exit::Done)
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
const PROMPT_ORDER: &str = "name, then phone, then safe number, then PIN";

fn is_busy(e: &DeviceError) -> bool {
    matches!(e, DeviceError::Store(StoreError::Busy(_)))
}

/// Opens the device for `run`, waiting up to [`crate::store::RUN_LOCK_WAIT`] (or
/// `EDGE_NODE_LOCK_WAIT_MS` milliseconds) while a short command holds the store, so a `run`
/// started next to one does not exit. Only `run` waits: other commands use the running
/// device's API when the store is busy.
fn open_for_run(data: &Path) -> Result<Device> {
    let wait = std::env::var("EDGE_NODE_LOCK_WAIT_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(
            crate::store::RUN_LOCK_WAIT,
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
        .and_then(|t| serde_json::from_str::<RunFile>(&t).ok())
        .and_then(|r| r.pid)
        .map(|pid| format!(" (run.json names process {pid}, a running `edge-node run`)"))
        .unwrap_or_default()
}

/// Where scans go: the store itself, or the running device.
enum Scanner {
    Local(Box<Device>),
    Running(control::Client),
}

/// Reports a frame that could not be read, on stderr.
fn unreadable(img: &Path, e: impl std::fmt::Display) {
    eprintln!(
        "edge-node: {}: {}",
        img.display(),
        e.to_string().replace(['\n', '\r'], " ")
    );
}

fn scan(data: &Path, json: bool, images: &[PathBuf]) -> Result<Exit> {
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
                unreadable(img, e);
                failed += 1;
                continue;
            }
        };
        let (verdict, text) = match &mut scanner {
            Scanner::Local(dev) => {
                let text = match frame::decode_frame(&bytes) {
                    Ok(t) => t,
                    Err(e) => {
                        unreadable(img, e);
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
            Scanner::Running(client) => match client.post_bytes::<ScanReply>("/api/scan", &bytes) {
                Ok(r) => (r.verdict.parse::<Verdict>()?, r.text),
                Err(e) => {
                    unreadable(img, e);
                    failed += 1;
                    continue;
                }
            },
        };
        // Printed only now: for `accepted` the visit is already durable.
        let check = CodeCheck::new(verdict, text.as_deref());
        print(
            json,
            &Scanned {
                image: img.display().to_string(),
                message: check.message,
                verdict: check.verdict,
            },
        )?;
    }
    Ok(if failed > 0 {
        Exit::FramesUnreadable
    } else {
        Exit::Done
    })
}

/// The `--peer ENDPOINT_ID@IP:PORT` arguments of `sync` and `run`, each checked.
fn parse_peers(peer: &[String]) -> Result<Vec<net::Target>> {
    peer.iter()
        .map(|p| net::parse_peer(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)
}
