//! `sync-hub`: the regional hub's command line. Parses arguments, calls the library, maps
//! errors to a one-line reason on stderr and a non-zero exit status.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use shared::facility::{BusinessNumber, Registration};
use std::net::SocketAddr;
use std::path::PathBuf;
use sync_hub::admin::AdminCommand;
use sync_hub::ledger::Ledger;
use sync_hub::{Hub, HubError, clock, control};

#[derive(Parser)]
#[command(
    name = "sync-hub",
    version,
    about = "The regional hub of the offline-first visitor log"
)]
struct Cli {
    /// The hub's state folder.
    #[arg(
        long,
        env = "SYNC_HUB_DATA",
        global = true,
        default_value = "./hub-data"
    )]
    data: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the hub's identity and keys; prints the hub id.
    Init {
        /// The region (jurisdiction) this hub serves.
        #[arg(long)]
        region: String,
        /// Where `run` listens for sync (UDP). Default: all interfaces, port 7447.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// An address to put in enrollment tickets (repeatable). Default: the listen address.
        #[arg(long)]
        advertise: Vec<SocketAddr>,
        /// The health authority's age public key (age1...). Default: generate a key pair and
        /// write its identity to DATA/authority-identity.txt for hand-over.
        #[arg(long)]
        authority_recipient: Option<String>,
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
    /// Enrolled devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
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
}

#[derive(Subcommand)]
enum DeviceCommand {
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
enum IssuersCommand {
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
struct BusinessNumberArg {
    /// The business registration number (10 digits, dashes allowed).
    #[arg(long)]
    business_number: Option<String>,
    /// The facility has no business number: it stays pending until approved.
    #[arg(long)]
    no_business_number: bool,
}

#[derive(Subcommand)]
enum FacilityCommand {
    /// Register a facility.
    Add {
        /// Business name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        business: BusinessNumberArg,
        /// Representative's name.
        #[arg(long)]
        representative: String,
        /// Business phone.
        #[arg(long)]
        phone: String,
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
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SYNC_HUB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Err(e) = run(cli) {
        eprintln!("sync-hub: {}", one_line(&e));
        std::process::exit(1);
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

fn run(cli: Cli) -> Result<()> {
    let data = cli.data;
    let now = clock::now();
    match cli.command {
        Command::Init {
            region,
            listen,
            advertise,
            authority_recipient,
            json,
        } => {
            let made = Hub::init(&data, &region, listen, advertise, authority_recipient, now)?;
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
            let v = admin(&data, AdminCommand::IssuersImport { keyring }, now)?;
            if json {
                println!("{v}");
            } else {
                println!("the hub now trusts {} issuer keys", v["trusted_keys"]);
            }
        }
        Command::Facility { command } => facility(&data, command, now)?,
        Command::Run { listen, http } => run_hub(&data, listen, http)?,
        Command::Device {
            command: DeviceCommand::List { json },
        } => {
            let v = admin(&data, AdminCommand::DeviceList, now)?;
            for d in v.as_array().into_iter().flatten() {
                if json {
                    println!("{d}");
                } else {
                    println!(
                        "{}\t{}\t{}\t{}\tlast sync {}",
                        d["device_id"].as_str().unwrap_or_default(),
                        d["facility_id"].as_str().unwrap_or_default(),
                        d["name"].as_str().unwrap_or_default(),
                        if d["revoked"].as_bool().unwrap_or(false) {
                            "revoked"
                        } else {
                            "active"
                        },
                        d["last_sync"]
                    );
                }
            }
        }
        Command::Device {
            command: DeviceCommand::Revoke { id },
        } => {
            admin(&data, AdminCommand::DeviceRevoke { id: id.clone() }, now)?;
            println!("{id} revoked");
        }
        Command::Stats { json: _ } => {
            let v = match Hub::open(&data) {
                Ok(hub) => {
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
            json,
        } => {
            let parsed = sync_hub::http::parse_tokens(&tokens).map_err(anyhow::Error::msg)?;
            if window_minutes > sync_hub::http::MAX_WINDOW_MINUTES {
                anyhow::bail!("--window-minutes may not exceed the retention period (40320)");
            }
            let v = match Hub::open(&data) {
                Ok(hub) => {
                    tracing::info!(
                        case = case.as_deref().unwrap_or("-"),
                        purpose = purpose.as_deref().unwrap_or("-"),
                        "trace"
                    );
                    let ledger = Ledger::open(hub.store(), hub.keys())?;
                    serde_json::to_value(ledger.trace(&parsed, window_minutes, now)?)?
                }
                Err(e) if is_busy(&e) => control::call(
                    &data,
                    "POST",
                    "/api/trace",
                    Some(
                        json!({"tokens": tokens, "window_minutes": window_minutes, "case": case, "purpose": purpose}),
                    ),
                )?,
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        Command::Purge { as_of, json } => {
            let v = match Hub::open(&data) {
                Ok(hub) => {
                    let mut ledger = Ledger::open(hub.store(), hub.keys())?;
                    let r = ledger.purge(as_of.unwrap_or(now).max(now))?;
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
        Command::Enroll {
            facility_id,
            device_name,
            out,
            json,
        } => {
            let v = admin(
                &data,
                AdminCommand::Enroll {
                    facility_id,
                    device_name,
                },
                now,
            )?;
            let ticket = shared::ticket::EnrollmentTicket::parse(v.to_string().as_bytes())
                .context("the hub answered with an unusable ticket")?;
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

fn is_busy(e: &HubError) -> bool {
    matches!(e, HubError::Store(sync_hub::store::StoreError::Busy(_)))
}

fn run_hub(data: &std::path::Path, listen: Option<SocketAddr>, http: SocketAddr) -> Result<()> {
    let hub = Hub::open(data)?;
    let listen = listen.unwrap_or(hub.config().listen);
    let secret = hub.keys().endpoint_secret()?;
    let token = control::operator_token(data)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let endpoint = sync_hub::daemon::bind(secret, listen).await?;
        let (handle, actor) = sync_hub::daemon::start(hub)?;
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
        let app = sync_hub::http::router(handle.clone(), token);
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal());
        let sync = sync_hub::daemon::serve(endpoint.clone(), handle.clone());
        tokio::select! {
            r = server => { r?; }
            _ = sync => {}
        }
        endpoint.close().await;
        sync_hub::daemon::stop(&handle);
        let _ = actor.join();
        control::remove_run_file(data);
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

/// Runs an administrative command on the store, or through the running hub.
fn admin(data: &std::path::Path, cmd: AdminCommand, now: u64) -> Result<serde_json::Value> {
    match Hub::open(data) {
        Ok(hub) => Ok(cmd.execute(&hub, now)?),
        Err(e) if is_busy(&e) => control::call(
            data,
            "POST",
            "/api/admin",
            Some(serde_json::to_value(&cmd)?),
        ),
        Err(e) => Err(e.into()),
    }
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
            let v = admin(data, AdminCommand::FacilityAdd { registration }, now)?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "{} {}",
                    v["facility_id"].as_str().unwrap_or_default(),
                    v["status"].as_str().unwrap_or_default()
                );
            }
        }
        FacilityCommand::Approve { id, json } => {
            let v = admin(data, AdminCommand::FacilityApprove { id }, now)?;
            if json {
                println!("{v}");
            } else {
                println!("{} approved", v["facility_id"].as_str().unwrap_or_default());
            }
        }
        FacilityCommand::Remove { id, json } => {
            let v = admin(data, AdminCommand::FacilityRemove { id: id.clone() }, now)?;
            if json {
                println!("{v}");
            } else {
                println!("{id} removed; its devices are revoked");
            }
        }
        FacilityCommand::List { json } => {
            let v = admin(data, AdminCommand::FacilityList, now)?;
            for f in v.as_array().into_iter().flatten() {
                if json {
                    println!("{f}");
                } else {
                    let field = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        field("facility_id"),
                        field("status"),
                        field("category"),
                        field("name"),
                        field("address")
                    );
                }
            }
        }
    }
    Ok(())
}
