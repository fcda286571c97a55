//! Support for the tests of the hub's people (health authority, local government, operators):
//! a hub whose registry and ledger are filled in-process (hundreds of facilities and a day of
//! sealed visits without hundreds of processes), then served by the real `sync-hub run`, and a
//! small HTTP client for its API.

use crate::fixture::{Proc, bin, wait_until};
use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use shared::envelope::{Record, RecordBody, SessionKey};
use shared::facility::{BusinessNumber, Registration};
use shared::paper::PaperEntry;
use shared::partition::{Partition, session_actor};
use shared::time::{Day, UnixSeconds};
use shared::{DeviceId, FacilityId, PartitionId, RecordId};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use sync_hub::Hub;
use sync_hub::ledger::Ledger;

/// Unix seconds now (the hub's clock: the tests run without a clock offset).
pub fn now() -> UnixSeconds {
    sync_hub::clock::now()
}

/// One visit of the ground truth a test builds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Visit {
    /// Where.
    pub facility: FacilityId,
    /// Which device recorded it.
    pub device: DeviceId,
    /// When.
    pub at: UnixSeconds,
    /// The QR token, or `None` for a paper entry.
    pub token: Option<[u8; 16]>,
    /// A paper entry's visitor name (`None` for QR).
    pub paper_name: Option<String>,
    /// A paper entry's remarks.
    pub paper_remarks: String,
}

/// A hub data folder filled in-process, with its health authority's identity.
pub struct PeopleHub {
    /// Keeps the folder alive.
    pub tmp: tempfile::TempDir,
    /// The hub's data folder.
    pub data: PathBuf,
    /// The health authority's identity file (`AGE-SECRET-KEY-1...`).
    pub authority_identity: PathBuf,
    /// The authority's recipient (`age1...`).
    pub authority_recipient: String,
}

/// A registration in `region`; `business` is `None` for a facility without a number.
pub fn registration(
    name: &str,
    category: &str,
    region: &str,
    address: &str,
    business: Option<&str>,
) -> Registration {
    Registration {
        name: name.to_owned(),
        business_number: business.and_then(|b| BusinessNumber::parse(b).ok()),
        representative: "Kim".into(),
        phone: "02-123-4567".into(),
        category: category.to_owned(),
        region: region.to_owned(),
        address: address.to_owned(),
    }
}

impl PeopleHub {
    /// `sync-hub init --region <region>` in a new temporary folder (through the binary, so the
    /// authority's identity file is written as an operator would get it).
    pub fn new(region: &str) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let data = tmp.path().join("hub");
        let port = crate::fixture::free_udp_port()?;
        let out = crate::fixture::run_ok(
            "sync-hub",
            &[
                "--data",
                data.to_str().unwrap_or_default(),
                "init",
                "--region",
                region,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--json",
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        let authority_identity = PathBuf::from(
            v["authority_identity_file"]
                .as_str()
                .context("init wrote no authority identity")?,
        );
        let text = std::fs::read_to_string(&authority_identity)?;
        let id = sync_hub::trace::read_identity(&text).map_err(anyhow::Error::msg)?;
        Ok(PeopleHub {
            tmp,
            data,
            authority_identity,
            authority_recipient: id.to_public().to_string(),
        })
    }

    /// The data folder as text.
    pub fn data_str(&self) -> String {
        self.data.display().to_string()
    }

    /// Opens the hub in-process (it must not be running).
    pub fn open(&self) -> Result<Hub> {
        Ok(Hub::open(&self.data)?)
    }

    /// `sync-hub credential add`; returns the secret.
    pub fn credential(&self, role: &str, region: Option<&str>, name: &str) -> Result<String> {
        let d = self.data_str();
        let mut args = vec![
            "--data",
            &d,
            "credential",
            "add",
            "--role",
            role,
            "--name",
            name,
            "--json",
        ];
        if let Some(r) = region {
            args.extend(["--region", r]);
        }
        let out = crate::fixture::run_ok("sync-hub", &args)?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        Ok(v["secret"].as_str().context("no secret")?.to_owned())
    }

    /// `sync-hub credential add --json`'s whole answer.
    pub fn credential_json(
        &self,
        role: &str,
        region: Option<&str>,
        name: &str,
    ) -> Result<serde_json::Value> {
        let d = self.data_str();
        let mut args = vec![
            "--data",
            &d,
            "credential",
            "add",
            "--role",
            role,
            "--name",
            name,
            "--json",
        ];
        if let Some(r) = region {
            args.extend(["--region", r]);
        }
        Ok(serde_json::from_str(
            crate::fixture::run_ok("sync-hub", &args)?.trim(),
        )?)
    }

    /// Starts `sync-hub run`; returns the process and the HTTP base URL.
    pub fn start(&self) -> Result<(Proc, String)> {
        let run = self.data.join("run.json");
        let _ = std::fs::remove_file(&run);
        let child = Command::new(bin("sync-hub"))
            .args(["--data", &self.data_str(), "run", "--http", "127.0.0.1:0"])
            .env_remove("SYNC_HUB_DATA")
            .env_remove("KIPASS_CLOCK_OFFSET")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let proc = Proc(child);
        if !wait_until(Duration::from_secs(30), || run.exists()) {
            bail!("the hub did not start within 30 s");
        }
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&run)?)?;
        let http = v["http"].as_str().context("run.json has no http")?;
        Ok((proc, format!("http://{http}")))
    }

    /// The local operator's token.
    pub fn operator_token(&self) -> Result<String> {
        sync_hub::control::operator_token(&self.data)
    }
}

/// Registers a facility (approved when it has a business number); returns its id.
pub fn add_facility(hub: &Hub, reg: Registration, at: UnixSeconds) -> Result<FacilityId> {
    Ok(hub.add_facility(reg, at)?.id)
}

/// Enrolls a device for an approved facility; returns its id.
pub fn add_device(hub: &Hub, facility: &FacilityId, at: UnixSeconds) -> Result<DeviceId> {
    Ok(hub.enroll(facility.as_str(), "gate", at)?.device_id)
}

/// Records that `device` last synced at `at` (as a completed session would).
pub fn set_last_sync(hub: &Hub, device: &DeviceId, at: Option<UnixSeconds>) -> Result<()> {
    let mut d = hub.store().device(device)?.context("no such device")?;
    d.last_sync = at;
    hub.store().put_device(&d)?;
    Ok(())
}

/// Stores `visits` in the hub's ledger as devices would have sealed and synced them: one
/// partition per facility and day, each visit under its device's session key wrapped to the
/// day's public key, paper entries sealed to the authority. `now` is the hub's clock.
pub fn store_visits(
    hub: &Hub,
    authority_recipient: &str,
    visits: &[Visit],
    seed: u64,
    now: UnixSeconds,
) -> Result<u64> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let ratchet = hub.keys().ratchet()?;
    let ledger = Ledger::open(hub.store(), hub.keys())?;
    let mut by_partition: BTreeMap<PartitionId, Vec<&Visit>> = BTreeMap::new();
    for v in visits {
        by_partition
            .entry(PartitionId {
                facility: v.facility.clone(),
                day: Day::of(v.at),
            })
            .or_default()
            .push(v);
    }
    let mut indexed = 0;
    for (id, vs) in by_partition {
        let public = ratchet
            .public(id.day)
            .with_context(|| format!("day {} has no public key", id.day))?;
        let mut keys: BTreeMap<DeviceId, SessionKey> = BTreeMap::new();
        let mut device_part = Partition::new(id.clone(), &session_actor(&vs[0].device, &mut rng));
        for v in vs {
            if !keys.contains_key(&v.device) {
                let key = SessionKey::generate(&mut rng, id.day);
                device_part.insert_wrapped_key(&key.wrap(&public)?)?;
                keys.insert(v.device.clone(), key);
            }
            let body = match (&v.token, &v.paper_name) {
                (Some(token), _) => RecordBody::Qr {
                    issuer_id: 1,
                    key_id: 1,
                    issued_at: v.at.saturating_sub(3),
                    token: *token,
                },
                (None, name) => {
                    let entry = PaperEntry {
                        name: name.clone().unwrap_or_else(|| "홍길동".into()),
                        phone: format!(
                            "010-{:04}-{:04}",
                            rng.gen_range(0..10_000),
                            rng.gen_range(0..10_000)
                        ),
                        safe_number: None,
                        visited_at: v.at,
                        consent_collect: true,
                        consent_share: true,
                        guardian_consent: false,
                        remarks: v.paper_remarks.clone(),
                    };
                    RecordBody::Paper {
                        sealed_for_authority: entry.seal_for_authority(authority_recipient)?,
                    }
                }
            };
            let record = Record {
                facility: id.facility.clone(),
                device: v.device.clone(),
                scanned_at: v.at,
                body,
            };
            let rid = RecordId::random(&mut rng);
            let key = keys.get(&v.device).context("key")?;
            device_part.insert_record(rid, &key.seal(&mut rng, &id, rid, &record)?)?;
        }
        let mut hub_copy = Partition::new(id.clone(), &ledger.actor());
        hub_copy.merge(&device_part)?;
        indexed += ledger.persist(&mut hub_copy, now)?;
    }
    Ok(indexed)
}

/// A random one-time token.
pub fn token(rng: &mut impl Rng) -> [u8; 16] {
    rng.r#gen()
}

/// A minimal HTTP client for the hub's API.
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

/// An answer: status and body text.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body text.
    pub text: String,
    /// Content type.
    pub content_type: String,
}

impl Answer {
    /// The body as JSON (null if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_default()
    }
}

impl Api {
    /// A client for the hub at `base` (`http://127.0.0.1:port`).
    pub fn new(base: &str) -> Self {
        Api {
            base: base.to_owned(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .into(),
        }
    }

    /// Sends a request: `GET` without a body, `POST` with an optional raw body.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&str>,
    ) -> Result<Answer> {
        let url = format!("{}{path}", self.base);
        let auth = bearer.map(|b| format!("Bearer {b}"));
        let mut resp = match method {
            "GET" => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                r.call()?
            }
            _ => {
                let mut r = self.agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("authorization", a);
                }
                match body {
                    Some(b) => r.header("content-type", "application/json").send(b)?,
                    None => r.send_empty()?,
                }
            }
        };
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 28)
            .read_to_string()?;
        Ok(Answer {
            status,
            text,
            content_type,
        })
    }
}

/// Parses RFC 4180 CSV (quoted cells may hold commas, doubled quotes and line breaks), written
/// here apart from the hub's writer so the test checks it independently.
pub fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                '"' => quoted = false,
                _ => cell.push(c),
            }
            continue;
        }
        match c {
            '"' if at_start => {
                quoted = true;
                at_start = false;
            }
            '"' => bail!("a quote inside an unquoted cell: {cell:?}"),
            ',' => {
                row.push(std::mem::take(&mut cell));
                at_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
                at_start = true;
            }
            _ => {
                cell.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        bail!("unterminated quoted cell");
    }
    if !cell.is_empty() || !row.is_empty() {
        row.push(cell);
        rows.push(row);
    }
    Ok(rows)
}

/// Whether a spreadsheet would take `cell` for a formula.
pub fn formula_start(cell: &str) -> bool {
    cell.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// The path of the hub database of a data folder.
pub fn db_path(data: &Path) -> PathBuf {
    data.join("hub.redb")
}

/// The clock of the region bench's hub (`tests/benches/region.rs`): 13:00 UTC of day 20,400.
/// Fixed, so a folder it built stays live when reused, and the stall bench
/// (`tests/benches/stall.rs`) runs the hub over that folder at the same time.
pub const REGION_BENCH_NOW: u64 = 20_400 * shared::time::DAY_SECONDS + 13 * 3_600;
