//! The hub's command line: its arguments ([`Cli`]) and [`run`], which runs a command on the
//! open hub, or through the running one's API while `run` holds the store, and prints its
//! typed answer ([`crate::commands::AdminReply`]). `--json` prints each answer's JSON with its
//! keys in order, as `serde_json::Value` prints them (the shape `spec/cli.md` documents).
//! `main.rs` only parses the arguments and calls [`run`].

use crate::auth::{Principal, Role};
use crate::commands::{AdminCommand, AdminReply};
use crate::gov::Target;
use crate::ledger::Ledger;
use crate::people::Desk;
use crate::trace::TraceRequest;
use crate::{Hub, HubError, clock, control};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use host::secret_input::{Echo, SecretInput};
use serde::Serialize;
use serde_json::json;
use shared::facility::{BusinessNumber, Registration};
use shared::hub_addr::HubAddr;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The command line's arguments.
#[derive(Parser)]
#[command(
    name = "sync-hub",
    version,
    about = "The regional hub of the offline-first visitor log"
)]
pub struct Cli {
    /// The hub's state folder.
    #[arg(
        long,
        env = "SYNC_HUB_DATA",
        global = true,
        default_value = "./hub-data"
    )]
    pub data: PathBuf,
    /// Logs on stderr: `text`, or `json` (one JSON object per line).
    #[arg(
        long,
        env = "SYNC_HUB_LOG_FORMAT",
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
    /// Create the hub's identity and keys; prints the hub id.
    Init {
        /// The region (jurisdiction) this hub serves.
        #[arg(long)]
        region: String,
        /// Where `run` listens for sync (UDP). Default: all interfaces, port 7447.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// An address to put in enrollment tickets (repeatable, at most 8): IP:PORT or a DNS
        /// name with a port (hub.example.org:7447), which devices resolve at each dial.
        /// Default: the listen address.
        #[arg(long)]
        advertise: Vec<HubAddr>,
        /// The health authority's age public key (age1...). Default: the `--peer` file's,
        /// else generate a key pair and write its identity to DATA/authority-identity.txt for
        /// hand-over.
        #[arg(long)]
        authority_recipient: Option<String>,
        /// Join a region that has a hub already: that hub's pairing file (`sync-hub peer show
        /// --out FILE` there). Then run `sync-hub peer add` there with this hub's file.
        #[arg(long, value_name = "FILE")]
        peer: Option<std::path::PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Issuer keys.
    Issuers {
        #[command(subcommand)]
        command: IssuersCommand,
    },
    /// Facility administration (local government).
    Facility {
        #[command(subcommand)]
        command: FacilityCommand,
    },
    /// Run the hub: sync endpoint (iroh) and HTTP API.
    Run {
        /// UDP address for sync. Default: the one recorded at init.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// HTTP address (API, metrics).
        #[arg(long, default_value = "127.0.0.1:7448")]
        http: SocketAddr,
        /// Concurrent sync connections; the excess are closed at once (QUIC close code 2).
        #[arg(long, default_value_t = crate::daemon::MAX_CONNECTIONS)]
        max_connections: usize,
        /// Bytes one sync session may send after admission; over it the session is refused
        /// (`QuotaExceeded`).
        #[arg(long, default_value_t = crate::daemon::MAX_SESSION_BYTES)]
        max_session_bytes: u64,
        /// New records one device may deliver per UTC day; a session that would go over is
        /// refused (`QuotaExceeded`).
        #[arg(long, default_value_t = crate::daemon::MAX_DEVICE_RECORDS_PER_DAY)]
        max_device_records_per_day: u64,
        /// New wrapped keys (`k/` entries) one device may deliver per UTC day; a session that
        /// would go over is refused (`QuotaExceeded`).
        #[arg(long, default_value_t = crate::daemon::MAX_DEVICE_KEYS_PER_DAY)]
        max_device_keys_per_day: u64,
        /// Connections that may wait for admission (handshake done, no admitted Hello yet);
        /// at the cap the oldest waiting one is closed for the new one.
        #[arg(long, default_value_t = crate::daemon::MAX_UNADMITTED)]
        max_unadmitted: usize,
    },
    /// Facilities and records the hub holds.
    Stats {
        /// Print JSON (the only format).
        #[arg(long)]
        json: bool,
    },
    /// A health-authority trace of a case's tokens.
    Trace {
        /// A token, 32 hex characters (repeatable).
        #[arg(long = "token", required = true)]
        tokens: Vec<String>,
        /// Contacts within this many minutes of a visit.
        #[arg(long, default_value_t = 30)]
        window_minutes: u64,
        /// The case id (audited).
        #[arg(long)]
        case: Option<String>,
        /// The purpose (audited).
        #[arg(long)]
        purpose: Option<String>,
        /// Start of the period searched, Unix seconds (default: the retention period before --to).
        #[arg(long)]
        from: Option<u64>,
        /// End of the period searched, Unix seconds (default: now).
        #[arg(long)]
        to: Option<u64>,
        /// Output format: json or csv (spreadsheet-safe).
        #[arg(long, default_value = "json")]
        format: String,
        /// Write the export to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// People's credentials for the HTTP API (operators, officers, the health authority).
    Credential {
        #[command(subcommand)]
        command: CredentialCommand,
    },
    /// The audit log: list it, verify its hash chain.
    Audit {
        /// Verify the chain; exits non-zero naming the first broken entry.
        #[arg(long)]
        verify: bool,
        /// Only the last N entries.
        #[arg(long)]
        limit: Option<usize>,
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
    },
    /// Designations of facilities that must keep a log (local government).
    Designation {
        #[command(subcommand)]
        command: DesignationCommand,
    },
    /// Mandatory facilities with no visits or no sync in the last N hours.
    Compliance {
        /// The period, hours.
        #[arg(long, default_value_t = 24)]
        hours: u64,
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
    },
    /// Reports.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// The health authority's side: paper entries of a trace export.
    Paper {
        #[command(subcommand)]
        command: PaperCommand,
    },
    /// The health authority's machine: one trace across every regional hub.
    Nation {
        #[command(subcommand)]
        command: NationCommand,
    },
    /// Enforce retention now, or as if the clock read UNIX (only ever later than now).
    Purge {
        /// Unix seconds; earlier than now is ignored, more than 400 days ahead refused.
        #[arg(long)]
        as_of: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Enrolled devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// The region's other hub: pairing two hubs of one region (see the README's operator
    /// section).
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// Write an enrollment ticket for one new device of a facility.
    Enroll {
        /// The facility's id.
        facility_id: String,
        /// Where the device stands ("north gate").
        #[arg(long)]
        device_name: String,
        /// The ticket file to write (a credential: hand it over like a key).
        #[arg(long)]
        out: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The addresses devices dial (`init --advertise`): show or change them. Run on the
    /// hub's machine while `sync-hub run` is stopped.
    Advertise {
        #[command(subcommand)]
        command: AdvertiseCommand,
    },
}

#[derive(Subcommand)]
pub enum AdvertiseCommand {
    /// Print the advertised addresses.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace the advertised addresses: new tickets carry them, and every device takes them
    /// from its next sync's refresh. To move a hub, list the old and the new address until
    /// the devices have synced, then only the new one.
    Set {
        /// IP:PORT or NAME:PORT (1 to 8).
        #[arg(required = true)]
        addrs: Vec<HubAddr>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum CredentialCommand {
    /// Make a credential; prints its secret once.
    Add {
        /// operator, officer or authority.
        #[arg(long)]
        role: String,
        /// The region an officer administers (officers only).
        #[arg(long)]
        region: Option<String>,
        /// Whose it is (kept in the audit log).
        #[arg(long)]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List credentials (never their secrets).
    List {
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a credential: it is refused from then on.
    Revoke {
        /// The credential id (cred_...).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum DesignationCommand {
    /// Designate a category, a facility, or a facility for a dated one-off event.
    Add {
        /// A whole category (in the region).
        #[arg(long, conflicts_with_all = ["facility", "event"])]
        category: Option<String>,
        /// One facility (with --event: for the event only).
        #[arg(long)]
        facility: Option<String>,
        /// A one-off event's name (needs --facility, --from and --to).
        #[arg(long, requires_all = ["facility", "from", "to"])]
        event: Option<String>,
        /// The event's start, Unix seconds.
        #[arg(long)]
        from: Option<u64>,
        /// The event's end, Unix seconds.
        #[arg(long)]
        to: Option<u64>,
        /// The region a category designation applies in (default: the hub's).
        #[arg(long)]
        region: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List designations.
    List {
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove a designation.
    Remove {
        /// The designation id (des_...).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ReportCommand {
    /// Tokens seen at two facilities within one code's validity (shared screenshots).
    SharedCodes {
        /// Start, Unix seconds (default: the retention period before --to).
        #[arg(long)]
        from: Option<u64>,
        /// End, Unix seconds (default: now).
        #[arg(long)]
        to: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum PaperCommand {
    /// Open the sealed paper entries of a trace export (`trace --json`) with the health
    /// authority's age identity file. Runs on the authority's machine; needs no hub.
    Open {
        /// The authority's identity file (AGE-SECRET-KEY-1...).
        #[arg(long)]
        identity: PathBuf,
        /// The trace export (JSON).
        export: PathBuf,
        /// Output format: json (one object per line) or csv (spreadsheet-safe).
        #[arg(long, default_value = "json")]
        format: String,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum NationCommand {
    /// Trace a case at every regional hub of a hubs file at once (each hub's `POST
    /// /api/trace`, in parallel, each bounded by --timeout) and print one merged report:
    /// per region whether its hub answered (ok, error, timeout) and which facilities may hold
    /// unsynced visits; visits, contacts and shared codes with their regions; paper entries
    /// still sealed (`paper open` opens them). Exits non-zero, after the report, when a hub
    /// did not answer. Runs on the authority's machine; needs no hub folder.
    Trace {
        /// The hubs file: JSON `{"hubs": [{"region", "url": "http://HOST:PORT",
        /// "credential"}]}`, the authority's credential for each hub. It must be readable by
        /// its owner only (chmod 600); `-` reads it from stdin.
        #[arg(long)]
        hubs: PathBuf,
        /// A token, 32 hex characters (repeatable).
        #[arg(long = "token", required = true)]
        tokens: Vec<String>,
        /// Contacts within this many minutes of a visit.
        #[arg(long, default_value_t = 30)]
        window_minutes: u64,
        /// The case id (audited at every hub).
        #[arg(long)]
        case: String,
        /// The purpose (audited at every hub).
        #[arg(long)]
        purpose: String,
        /// Start of the period searched, Unix seconds (default: the retention period before --to).
        #[arg(long)]
        from: Option<u64>,
        /// End of the period searched, Unix seconds (default: now). Every hub searches the
        /// same period.
        #[arg(long)]
        to: Option<u64>,
        /// How long each hub has to answer: seconds, `10` or `10s`.
        #[arg(long, default_value = "10s", value_parser = parse_timeout)]
        timeout: std::time::Duration,
        /// Output format: json or csv (spreadsheet-safe).
        #[arg(long, default_value = "json")]
        format: String,
        /// Write the report to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `--timeout`: whole seconds, with an optional `s`, 1 to [`crate::nation::MAX_TIMEOUT_SECONDS`].
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let n: u64 = s
        .strip_suffix('s')
        .unwrap_or(s)
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 10 or 10s)"))?;
    if !(1..=crate::nation::MAX_TIMEOUT_SECONDS).contains(&n) {
        return Err(format!(
            "the timeout must be 1 to {} seconds",
            crate::nation::MAX_TIMEOUT_SECONDS
        ));
    }
    Ok(std::time::Duration::from_secs(n))
}

#[derive(Subcommand)]
pub enum PeerCommand {
    /// Print (or write) this hub's pairing file, for `peer add` or `init --peer` at the other
    /// hub of the region. It holds no secret.
    Show {
        /// Write it to this file instead of stdout.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Pair with the other hub of this region (its pairing file); replaces an earlier
    /// pairing (a rebuilt hub has a new endpoint id).
    Add {
        /// The other hub's pairing file.
        file: std::path::PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The paired hub: where, when the link last completed, its day keys.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// List devices.
    List {
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device: every later sync from it is refused.
    Revoke {
        /// The device's id.
        id: String,
    },
}

#[derive(Subcommand)]
pub enum IssuersCommand {
    /// Trust the issuer keys in a keyring file (qr-token-v1.md format).
    Import {
        /// The keyring file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct BusinessNumberArg {
    /// The business registration number (10 digits, dashes allowed).
    #[arg(long)]
    pub business_number: Option<String>,
    /// The facility has no business number: it stays pending until approved.
    #[arg(long)]
    pub no_business_number: bool,
}

#[derive(Subcommand)]
pub enum FacilityCommand {
    /// Register a facility.
    Add {
        /// Business name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        business: BusinessNumberArg,
        /// Representative's name. A sole proprietor's name is a person's: give
        /// `--representative` alone to read it from stdin (one line per such flag:
        /// representative, then phone), since a command line stays in shell history and /proc.
        #[arg(long, num_args = 0..=1, required = true, value_name = "NAME")]
        representative: Option<Option<String>>,
        /// Business phone (often the owner's mobile); `--phone` alone reads it from stdin.
        #[arg(long, num_args = 0..=1, required = true, value_name = "PHONE")]
        phone: Option<Option<String>>,
        /// Category slug (e.g. karaoke, pc_room) or other:<sub-category>.
        #[arg(long)]
        category: String,
        /// Jurisdiction.
        #[arg(long)]
        region: String,
        /// Street address, with enough detail to tell branches apart.
        #[arg(long)]
        address: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending facility.
    Approve {
        /// The facility's id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a facility (e.g. a duplicate registration); its devices are revoked.
    Remove {
        /// The facility's id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List facilities.
    List {
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
    },
    /// Facilities waiting for approval.
    Pending {
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
    },
    /// Duplicate registrations (same business number, same detailed address).
    Duplicates {
        /// Remove all but the earliest registration of each group (audited).
        #[arg(long)]
        remove: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The answer of the variant `$variant` of [`AdminReply`], or an error if the hub answered
/// with another.
macro_rules! answer {
    ($reply:expr, $variant:path) => {
        match $reply {
            $variant(v) => v,
            _ => anyhow::bail!("the hub answered with the answer of another command"),
        }
    };
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let data = cli.data;
    // Before anything is created: every file of ours is owner-only (keys, stores, exports).
    host::private_files::restrict(&data);
    let now = clock::now();
    match cli.command {
        Command::Init {
            region,
            listen,
            advertise,
            authority_recipient,
            peer,
            json,
        } => {
            let pairing = match &peer {
                Some(path) => Some(read_pairing(path)?),
                None => None,
            };
            let authority_recipient = match (&pairing, authority_recipient) {
                (Some(p), Some(a)) if p.authority_recipient != a => anyhow::bail!(
                    "--authority-recipient differs from the other hub's: both hubs of a region \
                     seal paper entries to one health authority"
                ),
                (_, Some(a)) => Some(a),
                (Some(p), None) => Some(p.authority_recipient.clone()),
                (None, None) => None,
            };
            if let Some(p) = &pairing
                && !crate::auth::same_region(&p.region, &region)
            {
                anyhow::bail!(
                    "the --peer hub serves region {:?}, not {region:?}: only two hubs of one region pair",
                    p.region
                );
            }
            let made = Hub::init(&data, &region, listen, advertise, authority_recipient, now)?;
            if let Some(p) = pairing {
                let ledger = Ledger::open(made.hub.store(), made.hub.keys())?;
                let desk = Desk::new(&made.hub, &ledger, now);
                desk.pair(&Principal::local_operator(), &p)?;
            }
            let c = made.hub.config();
            if json {
                println!(
                    "{}",
                    json!({"hub_id": c.endpoint_id, "region": c.region, "listen": c.listen.to_string(),
                           "advertise": c.advertise.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                           "authority_identity_file": made.authority_identity_file.as_ref().map(|p| p.display().to_string())})
                );
            } else {
                println!("{}", c.endpoint_id);
            }
            if let Some(p) = made.authority_identity_file {
                eprintln!(
                    "sync-hub: generated the health authority's key; its identity is in {}: hand it to the health authority and delete it here",
                    p.display()
                );
            }
        }
        Command::Issuers {
            command: IssuersCommand::Import { file, json },
        } => {
            let keyring = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read keyring {}", file.display()))?;
            let v = answer!(
                admin(&data, AdminCommand::IssuersImport { keyring }, now)?,
                AdminReply::TrustedKeys
            );
            show(json, &v, |v| {
                format!("the hub now trusts {} issuer keys", v.trusted_keys)
            })?;
        }
        Command::Facility { command } => facility(&data, command, now)?,
        Command::Run {
            listen,
            http,
            max_connections,
            max_session_bytes,
            max_device_records_per_day,
            max_device_keys_per_day,
            max_unadmitted,
        } => {
            let quotas = crate::daemon::Quotas {
                session_bytes: max_session_bytes,
                device_records_per_day: max_device_records_per_day,
                device_keys_per_day: max_device_keys_per_day,
            };
            run_hub(
                &data,
                listen,
                http,
                (max_connections, max_unadmitted),
                quotas,
            )?
        }
        Command::Device {
            command: DeviceCommand::List { json },
        } => {
            let list = answer!(
                admin(&data, AdminCommand::DeviceList, now)?,
                AdminReply::Devices
            );
            for d in &list {
                show(json, d, |d| {
                    format!(
                        "{}\t{}\t{}\t{}\tlast sync {}",
                        d.device_id,
                        d.facility_id,
                        d.name,
                        if d.revoked { "revoked" } else { "active" },
                        d.last_sync.map_or("null".to_owned(), |t| t.to_string())
                    )
                })?;
            }
        }
        Command::Peer {
            command: PeerCommand::Show { out },
        } => {
            let file = answer!(
                admin(&data, AdminCommand::PeerShow, now)?,
                AdminReply::Pairing
            );
            let text = serde_json::to_string_pretty(&file)? + "\n";
            emit(&text, out.as_deref())?;
        }
        Command::Peer {
            command: PeerCommand::Add { file, json },
        } => {
            let pairing = read_pairing(&file)?;
            let v = answer!(
                admin(&data, AdminCommand::PeerAdd { pairing }, now)?,
                AdminReply::Peer
            );
            show(json, &v, |v| match v {
                Some(p) => format!(
                    "paired with hub {} of region {:?} at {}; run `sync-hub peer add` with this hub's file there too",
                    p.endpoint_id,
                    p.region,
                    p.addrs.join(", ")
                ),
                None => "not paired".to_owned(),
            })?;
        }
        Command::Peer {
            command: PeerCommand::Status { json },
        } => {
            let v = answer!(
                admin(&data, AdminCommand::PeerStatus, now)?,
                AdminReply::Peer
            );
            show(json, &v, |v| match v {
                Some(p) => format!(
                    "paired with {} ({}), last link {}, its day keys until {}{}",
                    p.endpoint_id,
                    p.addrs.join(", "),
                    p.last_link.map_or("never".to_owned(), |t| t.to_string()),
                    p.day_keys_until
                        .map_or("none yet".to_owned(), |d| d.to_string()),
                    p.rebuilt_at.map_or(String::new(), |t| format!(
                        ", rebuilt at {t}: it cannot read the days before"
                    ))
                ),
                None => "not paired: this hub is its region's only hub".to_owned(),
            })?;
        }
        Command::Device {
            command: DeviceCommand::Revoke { id },
        } => {
            let v = answer!(
                admin(&data, AdminCommand::DeviceRevoke { id }, now)?,
                AdminReply::DeviceRevoked
            );
            println!("{} revoked", v.device_id);
        }
        Command::Stats { json: _ } => {
            let v = match Hub::open(&data) {
                Ok(hub) => {
                    crate::people::permit(&Principal::local_operator(), crate::people::Op::Stats)?;
                    let ledger = Ledger::open(hub.store(), hub.keys())?;
                    serde_json::to_value(ledger.stats(now)?)?
                }
                Err(e) if is_busy(&e) => control::call(&data, "GET", "/api/stats", None)?,
                Err(e) => return Err(e.into()),
            };
            println!("{v}");
        }
        Command::Trace {
            tokens,
            window_minutes,
            case,
            purpose,
            from,
            to,
            format,
            out,
            json: _,
        } => {
            let csv = match format.as_str() {
                "json" => false,
                "csv" => true,
                other => anyhow::bail!("--format {other:?}: use json or csv"),
            };
            let request = TraceRequest {
                tokens,
                window_minutes: Some(window_minutes),
                case,
                purpose,
                from,
                to,
            };
            // Check before touching the store, so bad input fails the same either way.
            request
                .clone()
                .check(now, false)
                .map_err(anyhow::Error::msg)?;
            let text = match Hub::open(&data) {
                Ok(hub) => {
                    let ledger = Ledger::open(hub.store(), hub.keys())?;
                    let desk = Desk::new(&hub, &ledger, now);
                    let q = request.check(now, false).map_err(anyhow::Error::msg)?;
                    let report = desk.trace(&Principal::local_operator(), &q)?;
                    if csv {
                        crate::trace::to_csv(&report)
                    } else {
                        serde_json::to_string(&report)?
                    }
                }
                Err(e) if is_busy(&e) => {
                    let path = if csv {
                        "/api/trace?format=csv"
                    } else {
                        "/api/trace"
                    };
                    control::call_text(&data, "POST", path, Some(serde_json::to_value(&request)?))?
                }
                Err(e) => return Err(e.into()),
            };
            emit(&text, out.as_deref())?;
        }
        Command::Credential { command } => credential(&data, command, now)?,
        Command::Audit {
            verify,
            limit,
            json,
        } => {
            let v = answer!(
                admin(&data, AdminCommand::Audit { limit, verify }, now)?,
                AdminReply::Audit
            );
            for e in &v.entries {
                if json {
                    print_json(e)?;
                } else {
                    let no_case = if e.details_expired {
                        crate::audit::EXPIRED
                    } else {
                        "-"
                    };
                    println!(
                        "{}\t{}\t{} ({})\t{}\t{}\t{}",
                        e.seq,
                        crate::trace::utc(e.at),
                        e.actor.name,
                        e.actor.role,
                        e.event.action,
                        e.event.case_id.as_deref().unwrap_or(no_case),
                        e.event.facilities.join(",")
                    );
                }
            }
            if verify {
                if json {
                    print_json(&json!({ "verification": v.verification }))?;
                }
                let ver = v
                    .verification
                    .context("the hub answered without verifying the audit log")?;
                if !ver.ok {
                    anyhow::bail!("the audit log does not verify: {}", ver.problems.join("; "));
                }
                if !json {
                    println!("audit log verified: {} entries, chain intact", ver.entries);
                }
            }
        }
        Command::Designation { command } => designation(&data, command, now)?,
        Command::Compliance { hours, json } => {
            let rows = answer!(
                admin(&data, AdminCommand::Compliance { hours }, now)?,
                AdminReply::Compliance
            );
            for r in &rows {
                show(json, r, |r| {
                    format!(
                        "{}\t{}\t{}\tlast sync {}\tlast visit {}\t{}",
                        r.facility_id,
                        if r.compliant { "ok" } else { "FLAGGED" },
                        r.name,
                        r.last_sync
                            .map(crate::trace::utc)
                            .unwrap_or_else(|| "never".into()),
                        r.last_visit
                            .map(crate::trace::utc)
                            .unwrap_or_else(|| "none".into()),
                        r.mandatory_because
                    )
                })?;
            }
        }
        Command::Report {
            command: ReportCommand::SharedCodes { from, to, json },
        } => {
            let v = answer!(
                admin(&data, AdminCommand::SharedCodes { from, to }, now)?,
                AdminReply::SharedCodes
            );
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::to_value(&v)?)?
                );
            }
        }
        Command::Paper {
            command:
                PaperCommand::Open {
                    identity,
                    export,
                    format,
                    out,
                },
        } => {
            let id_text = std::fs::read_to_string(&identity)
                .with_context(|| format!("cannot read identity {}", identity.display()))?;
            let id = crate::trace::read_identity(&id_text).map_err(anyhow::Error::msg)?;
            let export_text = std::fs::read_to_string(&export)
                .with_context(|| format!("cannot read trace export {}", export.display()))?;
            let (opened, failed) =
                crate::trace::open_paper(&export_text, &id).map_err(anyhow::Error::msg)?;
            let text = match format.as_str() {
                "csv" => crate::trace::paper_csv(&opened),
                "json" => opened
                    .iter()
                    .map(|e| serde_json::to_string(e).map(|l| l + "\n"))
                    .collect::<Result<String, _>>()?,
                other => anyhow::bail!("--format {other:?}: use json or csv"),
            };
            emit(&text, out.as_deref())?;
            for f in &failed {
                eprintln!("sync-hub: paper entry {f}");
            }
            if !failed.is_empty() {
                anyhow::bail!("{} paper entries did not open", failed.len());
            }
        }
        Command::Nation {
            command:
                NationCommand::Trace {
                    hubs,
                    tokens,
                    window_minutes,
                    case,
                    purpose,
                    from,
                    to,
                    timeout,
                    format,
                    out,
                },
        } => {
            let csv = match format.as_str() {
                "json" => false,
                "csv" => true,
                other => anyhow::bail!("--format {other:?}: use json or csv"),
            };
            // Every hub searches the same period, fixed here.
            let to = to.unwrap_or(now);
            let from = from.unwrap_or_else(|| to.saturating_sub(crate::trace::MAX_PERIOD_SECONDS));
            let request = TraceRequest {
                tokens,
                window_minutes: Some(window_minutes),
                case: Some(case),
                purpose: Some(purpose),
                from: Some(from),
                to: Some(to),
            };
            // The hubs' own rules, checked before anything is sent.
            let q = request
                .clone()
                .check(now, true)
                .map_err(anyhow::Error::msg)?;
            let hub_list = crate::nation::parse_hubs(&read_hubs_file(&hubs)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", hubs.display()))?;
            let outcomes = ask_hubs(&hub_list, &request, timeout)?;
            let asked = crate::nation::Asked {
                case_id: q.case.unwrap_or_default(),
                purpose: q.purpose.unwrap_or_default(),
                from: q.from,
                to: q.to,
                window_minutes: q.window_minutes,
                tokens: q.tokens.iter().map(hex::encode).collect(),
            };
            let report = crate::nation::merge(&asked, outcomes, clock::now());
            let text = if csv {
                crate::nation::to_csv(&report)
            } else {
                serde_json::to_string(&report)? + "\n"
            };
            emit(&text, out.as_deref())?;
            let silent: Vec<String> = report
                .regions
                .iter()
                .filter(|r| r.status != crate::nation::RegionStatus::Ok)
                .map(|r| format!("{} ({:?})", r.region, r.status).to_lowercase())
                .collect();
            if !silent.is_empty() {
                anyhow::bail!(
                    "{} of {} hubs did not answer: {}; the report leaves their regions out",
                    silent.len(),
                    report.regions.len(),
                    silent.join(", ")
                );
            }
        }
        Command::Purge { as_of, json } => {
            // Refused here before anything opens; checked again (and audited) where it runs.
            crate::people::purge_as_of(&Principal::local_operator(), as_of, now)?;
            let v = match Hub::open(&data) {
                Ok(hub) => {
                    let mut ledger = Ledger::open(hub.store(), hub.keys())?;
                    let r = crate::people::purge(
                        &hub,
                        &mut ledger,
                        &Principal::local_operator(),
                        as_of,
                        now,
                    )?;
                    drop(ledger);
                    hub.compact();
                    serde_json::to_value(r)?
                }
                Err(e) if is_busy(&e) => {
                    control::call(&data, "POST", "/api/purge", Some(json!({"as_of": as_of})))?
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{v}");
            } else {
                println!("retention enforced: {v}");
            }
        }
        Command::Advertise { command } => advertise(&data, command)?,
        Command::Enroll {
            facility_id,
            device_name,
            out,
            json,
        } => {
            let ticket = answer!(
                admin(
                    &data,
                    AdminCommand::Enroll {
                        facility_id,
                        device_name,
                    },
                    now,
                )?,
                AdminReply::Ticket
            );
            Hub::write_ticket(&ticket, &out)?;
            if json {
                println!(
                    "{}",
                    json!({"device_id": ticket.device_id, "facility_id": ticket.facility.id, "ticket": out.display().to_string()})
                );
            } else {
                println!(
                    "wrote ticket for device {} ({}) to {}: it is a credential, hand it over like a key",
                    ticket.device_id,
                    ticket.device_name,
                    out.display()
                );
            }
        }
    }
    Ok(())
}

/// `advertise show|set`: on the store itself (the running hub reads its settings once, at
/// start, so a change takes effect when it starts again).
fn advertise(data: &std::path::Path, command: AdvertiseCommand) -> Result<()> {
    let open = || -> Result<Hub> {
        match Hub::open(data) {
            Ok(hub) => Ok(hub),
            Err(e) if is_busy(&e) => anyhow::bail!(
                "the hub's store is in use{}: stop `sync-hub run`, change the advertised addresses, start it again",
                run_holder(data)
            ),
            Err(e) => Err(e.into()),
        }
    };
    let (json, set) = match command {
        AdvertiseCommand::Show { json } => (json, None),
        AdvertiseCommand::Set { addrs, json } => (json, Some(addrs)),
    };
    let mut hub = open()?;
    if let Some(addrs) = set {
        hub.set_advertise(addrs)?;
    }
    let addrs = hub.advertised();
    if json {
        println!("{}", json!({ "advertise": addrs }));
    } else {
        println!("{}", addrs.join(" "));
    }
    Ok(())
}

fn is_busy(e: &HubError) -> bool {
    matches!(e, HubError::Store(crate::store::StoreError::Busy(_)))
}

/// Opens the hub for `run`, waiting up to [`crate::store::RUN_LOCK_WAIT`] (or
/// `SYNC_HUB_LOCK_WAIT_MS` milliseconds) while a short command holds the store, so a `run`
/// started next to one does not exit. Only `run` waits: other commands use the running hub's
/// API when the store is busy.
fn open_for_run(data: &std::path::Path) -> Result<Hub> {
    let wait = std::env::var("SYNC_HUB_LOCK_WAIT_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(
            crate::store::RUN_LOCK_WAIT,
            std::time::Duration::from_millis,
        );
    match host::store_lock::wait_while_busy(wait, || Hub::open(data), is_busy) {
        Ok(hub) => Ok(hub),
        Err(e) if is_busy(&e) => anyhow::bail!(
            "{e}; still held after waiting {:.1} s{}",
            wait.as_secs_f64(),
            run_holder(data)
        ),
        Err(e) => Err(e.into()),
    }
}

/// Who holds the store, if `run.json` says: a running hub records its process id there.
fn run_holder(data: &std::path::Path) -> String {
    std::fs::read_to_string(data.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["pid"].as_u64())
        .map(|pid| format!(" (run.json names process {pid}, a running `sync-hub run`)"))
        .unwrap_or_default()
}

fn run_hub(
    data: &std::path::Path,
    listen: Option<SocketAddr>,
    http: SocketAddr,
    (max_connections, max_unadmitted): (usize, usize),
    quotas: crate::daemon::Quotas,
) -> Result<()> {
    let hub = open_for_run(data)?;
    let listen = listen.unwrap_or(hub.config().listen);
    let secret = hub.keys().endpoint_secret()?;
    let token = control::operator_token(data)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let endpoint = crate::daemon::bind(secret, listen).await?;
        let _ = crate::link::ENDPOINT.set(endpoint.clone());
        let (handle, actor) = crate::daemon::start(hub, quotas)?;
        let listener = tokio::net::TcpListener::bind(http)
            .await
            .with_context(|| format!("cannot listen for HTTP on {http}"))?;
        let http_addr = listener.local_addr()?;
        let sync_addrs = endpoint.bound_sockets();
        control::write_run_file(data, http_addr, &sync_addrs)?;
        eprintln!(
            "sync-hub: serving sync on {:?} and HTTP on http://{http_addr}",
            sync_addrs
        );
        let app = crate::http::router(handle.clone(), token);
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal());
        // Under systemd (`Type=notify`, `WatchdogSec=`): ready now, and pinged while the
        // hub's health check passes on its actor within the time limit.
        let watched = handle.clone();
        let runtime = tokio::runtime::Handle::current();
        let probe = crate::http::Probe::default();
        host::watchdog::serve(move || {
            runtime.block_on(async {
                let check = crate::http::check_health(&watched, &probe);
                matches!(
                    tokio::time::timeout(std::time::Duration::from_secs(10), check).await,
                    Ok(Ok(h)) if h.status != crate::health::Overall::Unhealthy
                )
            })
        });
        // The hub link to the region's other hub (when paired): its connections arrive
        // through `serve`, which hands them over here.
        let (link_tx, link_rx) = tokio::sync::mpsc::channel(4);
        let link = tokio::spawn(crate::link::run(endpoint.clone(), handle.clone(), link_rx));
        let sync = crate::daemon::serve(
            endpoint.clone(),
            handle.clone(),
            max_connections,
            max_unadmitted,
            Some(link_tx),
        );
        // The actor ends by itself only when the database refused a durable commit: the hub
        // then exits with an error, for its supervisor to restart it on its last durable state.
        let mut actor = tokio::task::spawn_blocking(move || actor.join());
        let mut actor_ended = false;
        tokio::select! {
            r = server => { r?; }
            _ = sync => {}
            _ = &mut actor => { actor_ended = true; }
        }
        link.abort();
        endpoint.close().await;
        crate::daemon::stop(&handle);
        if !actor_ended {
            let _ = actor.await;
        }
        control::remove_run_file(data);
        if handle
            .metrics
            .actor_failed
            .load(std::sync::atomic::Ordering::Acquire)
        {
            anyhow::bail!(
                "the hub stopped: its database refused a durable commit (see the log); \
                 start it again to reopen the database at its last durable state"
            );
        }
        if actor_ended {
            anyhow::bail!("the hub's actor stopped unexpectedly (see the log)");
        }
        anyhow::Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs an administrative command on the store as the local operator, or through the running
/// hub with the operator token.
/// Reads a hub pairing file.
fn read_pairing(path: &std::path::Path) -> Result<crate::replica::PairingFile> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the pairing file {}", path.display()))?;
    Ok(crate::replica::PairingFile::parse(&bytes)?)
}

fn admin(data: &std::path::Path, cmd: AdminCommand, now: u64) -> Result<AdminReply> {
    match Hub::open(data) {
        Ok(hub) => {
            let ledger = Ledger::open(hub.store(), hub.keys())?;
            let desk = Desk::new(&hub, &ledger, now);
            Ok(cmd.execute(&desk, &Principal::local_operator())?)
        }
        Err(e) if is_busy(&e) => {
            let text = control::call_text(
                data,
                "POST",
                "/api/admin",
                Some(serde_json::to_value(&cmd)?),
            )?;
            cmd.read_reply(&text)
                .map_err(|e| anyhow::anyhow!("the running hub's answer is unreadable: {e}"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Prints a command's answer as JSON on one line, its keys in order (through
/// `serde_json::Value`, whose maps are sorted: the shape the command line has always
/// printed).
fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_value(v)?);
    Ok(())
}

/// The largest hubs file read.
const MAX_HUBS_FILE_BYTES: u64 = 1024 * 1024;

/// Reads the hubs file (or stdin for `-`). It holds credentials: a file other users could
/// read is refused, like ssh refuses such a key.
fn read_hubs_file(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_HUBS_FILE_BYTES)
            .read_to_string(&mut text)
            .context("cannot read the hubs file from stdin")?;
        return Ok(text);
    }
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read the hubs file {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata()?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "the hubs file {} holds credentials but other users may read it (mode {mode:o}): \
                 chmod 600 {0}, and replace the credentials if others could have read them",
                path.display()
            );
        }
    }
    file.take(MAX_HUBS_FILE_BYTES)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read the hubs file {}", path.display()))?;
    Ok(text)
}

/// Sends `request` to every hub's `POST /api/trace` at once, each with `timeout` for the whole
/// exchange and at most [`crate::nation::MAX_HUB_ANSWER_BYTES`] read, and all together at most
/// [`crate::nation::MAX_TOTAL_ANSWER_BYTES`]; a hub that has not answered when the time is up
/// counts as timed out. Outcomes in the hubs' order.
fn ask_hubs(
    hubs: &[crate::nation::HubEntry],
    request: &TraceRequest,
    timeout: std::time::Duration,
) -> Result<Vec<crate::nation::HubOutcome>> {
    use crate::nation::{HubOutcome, Outcome};
    let body = serde_json::to_string(request)?;
    let started = std::time::Instant::now();
    let budget = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
        crate::nation::MAX_TOTAL_ANSWER_BYTES,
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, hub) in hubs.iter().enumerate() {
        let (tx, hub, body, budget) = (tx.clone(), hub.clone(), body.clone(), budget.clone());
        std::thread::Builder::new()
            .name(format!("nation-{i}"))
            .spawn(move || {
                let outcome = ask_hub(&hub, &body, timeout, &budget);
                let _ = tx.send((i, outcome, started.elapsed()));
            })
            .context("cannot start a thread for a hub")?;
    }
    drop(tx);
    let mut outcomes: Vec<Option<(Outcome, std::time::Duration)>> = vec![None; hubs.len()];
    // Each request has its own timeout; this bounds the wait should one overrun it.
    let deadline = started + timeout + std::time::Duration::from_secs(1);
    while outcomes.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, o, took)) => outcomes[i] = Some((o, took)),
            Err(_) => break,
        }
    }
    Ok(hubs
        .iter()
        .zip(outcomes)
        .map(|(hub, o)| {
            let (outcome, took) = o.unwrap_or((Outcome::TimedOut, started.elapsed()));
            HubOutcome {
                region: hub.region.clone(),
                url: hub.url.clone(),
                outcome,
                millis: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            }
        })
        .collect())
}

/// Reads at most `limit` bytes of `reader`, each chunk taken from the shared `budget` of all
/// hubs' answers before it is read: `Err` once the answer exceeds `limit` or the budget is
/// spent.
fn read_bounded(
    mut reader: impl std::io::Read,
    limit: u64,
    budget: &std::sync::atomic::AtomicU64,
) -> std::result::Result<String, String> {
    use std::sync::atomic::Ordering;
    const CHUNK: u64 = 64 * 1024;
    let mut out = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        let took = budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(CHUNK)
            })
            .is_ok();
        if !took {
            return Err(format!(
                "the hubs' answers together exceed {} bytes (the limit for one national \
                 trace): this answer was not read; trace fewer hubs at once",
                crate::nation::MAX_TOTAL_ANSWER_BYTES
            ));
        }
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        // What the chunk did not use goes back to the budget.
        budget.fetch_add(CHUNK - n as u64, Ordering::SeqCst);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() as u64 > limit {
            return Err(format!(
                "the answer exceeds {limit} bytes (the limit for one hub's trace)"
            ));
        }
    }
    String::from_utf8(out).map_err(|_| "the answer is not UTF-8 text".to_owned())
}

/// One hub's trace: its report, or why not.
fn ask_hub(
    hub: &crate::nation::HubEntry,
    body: &str,
    timeout: std::time::Duration,
    budget: &std::sync::atomic::AtomicU64,
) -> crate::nation::Outcome {
    use crate::nation::{MAX_HUB_ANSWER_BYTES, Outcome};
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .max_redirects(0)
        .build()
        .into();
    let failed = |e: ureq::Error| match e {
        ureq::Error::Timeout(_) => Outcome::TimedOut,
        ureq::Error::BodyExceedsLimit(n) => Outcome::Failed(format!(
            "the answer exceeds {n} bytes (the limit for one hub's trace)"
        )),
        other => Outcome::Failed(other.to_string()),
    };
    let sent = agent
        .post(&format!("{}/api/trace", hub.url))
        .header("authorization", &format!("Bearer {}", hub.credential))
        .header("content-type", "application/json")
        .send(body);
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let status = resp.status().as_u16();
    let reader = resp
        .body_mut()
        .with_config()
        .limit(MAX_HUB_ANSWER_BYTES + 1)
        .reader();
    let text = match read_bounded(reader, MAX_HUB_ANSWER_BYTES, budget) {
        Ok(t) => t,
        Err(e) if e.contains("timed out") || e.to_lowercase().contains("timeout") => {
            return Outcome::TimedOut;
        }
        Err(e) => return Outcome::Failed(e),
    };
    if status != 200 {
        #[derive(serde::Deserialize)]
        struct Refusal {
            error: String,
        }
        let why = serde_json::from_str::<Refusal>(&text)
            .map(|r| r.error)
            .unwrap_or_else(|_| text.chars().take(200).collect());
        return Outcome::Failed(format!("HTTP {status}: {why}"));
    }
    match serde_json::from_str::<crate::trace::TraceReport>(&text) {
        Ok(r) => Outcome::Answered(Box::new(r)),
        Err(e) => Outcome::Failed(format!("the answer is not a trace report: {e}")),
    }
}

/// Prints a typed answer: its JSON line with `--json`, else the line `text` makes of it.
fn show<T: Serialize>(json: bool, v: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        print_json(v)
    } else {
        println!("{}", text(v));
        Ok(())
    }
}

/// Writes `text` to `out`, or stdout.
fn emit(text: &str, out: Option<&std::path::Path>) -> Result<()> {
    match out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
        }
        None => {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            Ok(())
        }
    }
}

fn credential(data: &std::path::Path, command: CredentialCommand, now: u64) -> Result<()> {
    match command {
        CredentialCommand::Add {
            role,
            region,
            name,
            json,
        } => {
            let role: Role = role.parse()?;
            let v = answer!(
                admin(
                    data,
                    AdminCommand::CredentialAdd { role, region, name },
                    now,
                )?,
                AdminReply::NewCredential
            );
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "credential {} ({}): {}\nthe secret is shown only now; hand it over securely",
                    v.credential_id,
                    v.role.as_str(),
                    v.secret
                );
            }
        }
        CredentialCommand::List { json } => {
            let list = answer!(
                admin(data, AdminCommand::CredentialList, now)?,
                AdminReply::Credentials
            );
            for c in &list {
                show(json, c, |c| {
                    format!(
                        "{}\t{}\t{}\t{}\t{}",
                        c.credential_id,
                        c.role.as_str(),
                        c.region.as_deref().unwrap_or("-"),
                        c.name,
                        if c.revoked_at.is_none() {
                            "active"
                        } else {
                            "revoked"
                        }
                    )
                })?;
            }
        }
        CredentialCommand::Revoke { id, json } => {
            let v = answer!(
                admin(data, AdminCommand::CredentialRevoke { id }, now)?,
                AdminReply::CredentialRevoked
            );
            show(json, &v, |v| format!("{} revoked", v.credential_id))?;
        }
    }
    Ok(())
}

fn designation(data: &std::path::Path, command: DesignationCommand, now: u64) -> Result<()> {
    match command {
        DesignationCommand::Add {
            category,
            facility,
            event,
            from,
            to,
            region,
            json,
        } => {
            let target = match (category, facility, event) {
                (Some(category), None, None) => Target::Category { category },
                (None, Some(facility_id), None) => Target::Facility { facility_id },
                (None, Some(facility_id), Some(name)) => Target::Event {
                    facility_id,
                    name,
                    from: from.context("--event needs --from")?,
                    to: to.context("--event needs --to")?,
                },
                _ => anyhow::bail!(
                    "give --category C, or --facility ID, or --event NAME --facility ID --from UNIX --to UNIX"
                ),
            };
            let v = answer!(
                admin(data, AdminCommand::DesignationAdd { target, region }, now)?,
                AdminReply::Designation
            );
            show(json, &v, |v| format!("{} designated", v.id))?;
        }
        DesignationCommand::List { json } => {
            let list = answer!(
                admin(data, AdminCommand::DesignationList, now)?,
                AdminReply::Designations
            );
            for d in &list {
                if json {
                    print_json(d)?;
                } else {
                    println!(
                        "{}\t{}\t{}",
                        d.id,
                        d.region,
                        serde_json::to_value(&d.target)?
                    );
                }
            }
        }
        DesignationCommand::Remove { id, json } => {
            let v = answer!(
                admin(
                    data,
                    AdminCommand::DesignationRemove { id: id.clone() },
                    now
                )?,
                AdminReply::Designation
            );
            show(json, &v, |_| format!("{id} removed"))?;
        }
    }
    Ok(())
}

fn facility(data: &std::path::Path, command: FacilityCommand, now: u64) -> Result<()> {
    match command {
        FacilityCommand::Add {
            name,
            business,
            representative,
            phone,
            category,
            region,
            address,
            json,
        } => {
            let business_number = match business.business_number {
                Some(b) => Some(BusinessNumber::parse(&b)?),
                None => None,
            };
            // The representative's name and phone are often a sole proprietor's own.
            let input = SecretInput::new("sync-hub", "representative, then phone");
            let representative = input.value(
                "--representative",
                "representative",
                representative.flatten(),
                Echo::On,
            )?;
            let phone = input.value("--phone", "phone", phone.flatten(), Echo::On)?;
            let registration = Registration {
                name,
                business_number,
                representative,
                phone,
                category,
                region,
                address,
            };
            registration.validate()?;
            let v = answer!(
                admin(data, AdminCommand::FacilityAdd { registration }, now)?,
                AdminReply::Facility
            );
            show(json, &v, |v| format!("{} {}", v.facility_id, v.status))?;
        }
        FacilityCommand::Approve { id, json } => {
            let v = answer!(
                admin(data, AdminCommand::FacilityApprove { id }, now)?,
                AdminReply::Facility
            );
            show(json, &v, |v| format!("{} approved", v.facility_id))?;
        }
        FacilityCommand::Remove { id, json } => {
            let v = answer!(
                admin(data, AdminCommand::FacilityRemove { id }, now)?,
                AdminReply::FacilityRemoved
            );
            if json {
                print_json(&v)?;
            } else {
                println!("{} removed; its devices are revoked", v.facility_id);
            }
        }
        FacilityCommand::Pending { json } => {
            let list = answer!(
                admin(data, AdminCommand::FacilityPending, now)?,
                AdminReply::Facilities
            );
            for f in &list {
                show(json, f, |f| {
                    format!(
                        "{}\t{}\t{}\t{}\t{}",
                        f.facility_id, f.region, f.category, f.name, f.address
                    )
                })?;
            }
        }
        FacilityCommand::Duplicates { remove, json } => {
            let v = answer!(
                admin(data, AdminCommand::FacilityDuplicates { remove }, now)?,
                AdminReply::Duplicates
            );
            if json {
                print_json(&v)?;
            } else {
                for g in &v.groups {
                    let ids: Vec<&str> = g.iter().map(|f| f.facility_id.as_str()).collect();
                    println!("duplicates (earliest first): {}", ids.join(" "));
                }
                for r in &v.removed {
                    println!("{r} removed");
                }
            }
        }
        FacilityCommand::List { json } => {
            let list = answer!(
                admin(data, AdminCommand::FacilityList, now)?,
                AdminReply::Facilities
            );
            for f in &list {
                show(json, f, |f| {
                    format!(
                        "{}\t{}\t{}\t{}\t{}",
                        f.facility_id, f.status, f.category, f.name, f.address
                    )
                })?;
            }
        }
    }
    Ok(())
}
