//! A hub, facilities and devices in temporary folders, driven through the real binaries.

use anyhow::{Context, Result, bail};
use shared::token::TestIssuer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The path of a workspace binary (`edge-node`, `sync-hub`), built by `cargo test`
/// alongside this test (both packages have integration tests, so cargo builds their bins).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // Tests live in target/<profile>/deps/, the demo in target/<profile>/.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// Runs a binary to completion with the given arguments.
pub fn run(name: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(bin(name))
        .args(args)
        .env_remove("EDGE_NODE_DATA")
        .env_remove("SYNC_HUB_DATA")
        .output()
        .with_context(|| format!("cannot start {name}: run `cargo build --workspace` first"))?;
    Ok(out)
}

/// Runs a binary and fails unless it exits 0; returns its stdout.
pub fn run_ok(name: &str, args: &[&str]) -> Result<String> {
    let out = run(name, args)?;
    if !out.status.success() {
        bail!(
            "{name} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The issuer used throughout the tests (seed and ids of the spec's first vector issuer).
pub fn issuer() -> TestIssuer {
    TestIssuer::new([0x11; 32], 1, 1)
}

/// A keyring file trusting [`issuer`], valid from 2020 to 2100.
pub fn keyring_json() -> String {
    let mut ring = shared::token::Keyring::new();
    // A fresh keyring accepts one key; insertion only fails on duplicates.
    let _ = ring.insert(issuer().keyring_entry("test-issuer", 1_577_836_800, 4_102_444_800));
    ring.to_json()
}

/// A valid business registration number (check digit holds).
pub const BUSINESS_NUMBER: &str = "123-45-67891";

/// A hub with one approved facility, in a temporary folder.
pub struct HubFixture {
    /// Keeps the folder alive.
    pub tmp: tempfile::TempDir,
    /// The hub's data folder.
    pub data: PathBuf,
    /// The facility's id.
    pub facility: String,
    /// The UDP port `run` listens on for sync (written into tickets).
    pub sync_port: u16,
}

impl HubFixture {
    /// Creates the hub, trusts [`issuer`], registers one approved facility.
    pub fn new() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let data = tmp.path().join("hub");
        let d = data.to_str().unwrap_or_default().to_owned();
        let sync_port = free_udp_port()?;
        let listen = format!("127.0.0.1:{sync_port}");
        run_ok(
            "sync-hub",
            &[
                "--data", &d, "init", "--region", "mapo", "--listen", &listen,
            ],
        )?;
        let ring = tmp.path().join("keyring.json");
        std::fs::write(&ring, keyring_json())?;
        run_ok(
            "sync-hub",
            &[
                "--data",
                &d,
                "issuers",
                "import",
                ring.to_str().unwrap_or_default(),
            ],
        )?;
        let facility = Self::add_facility_at(&d, "Star Karaoke")?;
        Ok(HubFixture {
            tmp,
            data,
            facility,
            sync_port,
        })
    }

    /// Registers another approved facility; returns its id.
    pub fn add_facility(&self, name: &str) -> Result<String> {
        Self::add_facility_at(&self.data_str(), name)
    }

    /// Starts `sync-hub run` and waits until it answers.
    pub fn start(&self) -> Result<Proc> {
        self.start_with(&[], &[])
    }

    /// Starts `sync-hub run` with more arguments (limits) and environment, and waits until it
    /// answers.
    pub fn start_with(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let _ = std::fs::remove_file(self.data.join("run.json"));
        let mut cmd = Command::new(bin("sync-hub"));
        cmd.args(["--data", &self.data_str(), "run", "--http", "127.0.0.1:0"])
            .args(args)
            .env_remove("SYNC_HUB_DATA")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc(cmd.spawn()?);
        let run = self.data.join("run.json");
        if !wait_until(Duration::from_secs(30), || run.exists()) {
            bail!("the hub did not start within 30 s");
        }
        Ok(proc)
    }

    /// `sync-hub stats --json`.
    pub fn stats(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            run_ok("sync-hub", &["--data", &self.data_str(), "stats", "--json"])?.trim(),
        )?)
    }

    /// Records the hub holds for `facility`.
    pub fn records_of(&self, facility: &str) -> Result<u64> {
        Ok(self.stats()?["per_facility"][facility]
            .as_u64()
            .unwrap_or(0))
    }

    /// `sync-hub trace --json` for one token.
    pub fn trace(&self, token: &[u8; 16]) -> Result<serde_json::Value> {
        let t = hex::encode(token);
        Ok(serde_json::from_str(
            run_ok(
                "sync-hub",
                &["--data", &self.data_str(), "trace", "--token", &t, "--json"],
            )?
            .trim(),
        )?)
    }

    /// Writes a ticket for `facility` and enrolls a device in a new folder; returns it.
    pub fn enroll_device_for(&self, facility: &str, name: &str) -> Result<PathBuf> {
        let ticket = self.write_ticket(facility, name)?;
        let dev = self.tmp.path().join(format!("dev-{name}"));
        run_ok(
            "edge-node",
            &[
                "--data",
                dev.to_str().unwrap_or_default(),
                "init",
                "--ticket",
                ticket.to_str().unwrap_or_default(),
            ],
        )?;
        Ok(dev)
    }

    /// Writes a ticket for a new device of `facility`; returns the file.
    pub fn write_ticket(&self, facility: &str, name: &str) -> Result<PathBuf> {
        let ticket = self.tmp.path().join(format!("{name}.ticket"));
        run_ok(
            "sync-hub",
            &[
                "--data",
                &self.data_str(),
                "enroll",
                facility,
                "--device-name",
                name,
                "--out",
                ticket.to_str().unwrap_or_default(),
            ],
        )?;
        Ok(ticket)
    }

    fn add_facility_at(d: &str, name: &str) -> Result<String> {
        let out = run_ok(
            "sync-hub",
            &[
                "--data",
                d,
                "facility",
                "add",
                "--name",
                name,
                "--business-number",
                BUSINESS_NUMBER,
                "--representative",
                "Kim",
                "--phone",
                "02-123-4567",
                "--category",
                "karaoke",
                "--region",
                "mapo",
                "--address",
                "1 Wausan-ro",
                "--json",
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        Ok(v["facility_id"].as_str().unwrap_or_default().to_owned())
    }

    /// The hub's data folder as text.
    pub fn data_str(&self) -> String {
        self.data.display().to_string()
    }

    /// Writes a ticket and enrolls a device in a new folder; returns that folder.
    pub fn enroll_device(&self, name: &str) -> Result<PathBuf> {
        let ticket = self.tmp.path().join(format!("{name}.ticket"));
        let t = ticket.display().to_string();
        run_ok(
            "sync-hub",
            &[
                "--data",
                &self.data_str(),
                "enroll",
                &self.facility,
                "--device-name",
                name,
                "--out",
                &t,
            ],
        )?;
        let dev = self.tmp.path().join(format!("dev-{name}"));
        run_ok(
            "edge-node",
            &[
                "--data",
                dev.to_str().unwrap_or_default(),
                "init",
                "--ticket",
                &t,
            ],
        )?;
        std::fs::remove_file(&ticket)?;
        Ok(dev)
    }
}

/// A child process killed and reaped when dropped.
pub struct Proc(pub std::process::Child);

impl Proc {
    /// Kills (SIGKILL) and reaps now.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `sync-hub run` on `hub_dir` with its sync endpoint on `127.0.0.1:sync_port` and
/// HTTP on a free loopback port, stderr to `log`; waits until it wrote `run.json`, failing
/// with the log if it exits first or takes longer than `limit`. Killed and reaped on drop.
pub fn start_hub_run(hub_dir: &Path, sync_port: u16, log: &Path, limit: Duration) -> Result<Proc> {
    let run_file = hub_dir.join("run.json");
    let _ = std::fs::remove_file(&run_file);
    let child = Command::new(bin("sync-hub"))
        .arg("--data")
        .arg(hub_dir)
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{sync_port}"),
            "--http",
            "127.0.0.1:0",
        ])
        .env_remove("SYNC_HUB_DATA")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("cannot start sync-hub run")?;
    let mut hub = Proc(child);
    let deadline = std::time::Instant::now() + limit;
    while !run_file.exists() {
        if let Some(status) = hub.0.try_wait()? {
            let why = std::fs::read_to_string(log).unwrap_or_default();
            bail!("sync-hub run exited early ({status}): {why}");
        }
        if std::time::Instant::now() > deadline {
            bail!("sync-hub run did not write run.json within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(hub)
}

/// Polls `f` every 50 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A UDP port free on loopback right now.
pub fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Checks in `n` fresh codes at a device directly (no camera), returning their tokens.
/// The device must not be running.
pub fn check_in_codes(dev: &Path, n: usize) -> Result<Vec<[u8; 16]>> {
    let mut device = edge_node::device::Device::open(dev)?;
    let issuer = issuer();
    (0..n)
        .map(|_| check_in_fresh(&mut device, &issuer, now()))
        .collect()
}

/// Checks in one code issued by `issuer` at `at` for a fresh token, through the device's
/// durable path; fails unless it is accepted. Returns the token.
pub fn check_in_fresh(
    device: &mut edge_node::device::Device,
    issuer: &TestIssuer,
    at: u64,
) -> Result<[u8; 16]> {
    let token = random_token();
    let r = device.check_in(at, &issuer.issue(at, 60, token))?;
    if r.verdict != shared::token::Verdict::Accepted {
        bail!(
            "a fresh code was {} instead of accepted",
            r.verdict.as_str()
        );
    }
    Ok(token)
}

/// `edge-node status --json` of a device folder.
pub fn device_status(dev: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(
        run_ok(
            "edge-node",
            &[
                "--data",
                dev.to_str().unwrap_or_default(),
                "status",
                "--json",
            ],
        )?
        .trim(),
    )?)
}

/// `edge-node sync --once --json`; returns the process output (it may fail).
pub fn sync_once(dev: &Path, peers: &[String]) -> Result<Output> {
    let mut args = vec![
        "--data".to_owned(),
        dev.display().to_string(),
        "sync".into(),
        "--once".into(),
        "--json".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    for p in peers {
        args.push("--peer".into());
        args.push(p.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("edge-node", &refs)
}

/// `edge-node sync --once --json` with no route to the hub (its address points at a port
/// nobody answers) and `peer` (`ENDPOINT_ID@IP:PORT`) as the only sibling: the device hands
/// its records to that sibling. Returns the process output (it fails: the hub was not reached).
pub fn sync_via_sibling_only(dev: &Path, peer: &str) -> Result<Output> {
    let dead_hub = format!("127.0.0.1:{}", free_udp_port()?);
    run(
        "edge-node",
        &[
            "--data",
            &dev.display().to_string(),
            "sync",
            "--once",
            "--json",
            "--listen",
            "127.0.0.1:0",
            "--hub-addr",
            &dead_hub,
            "--peer",
            peer,
        ],
    )
}

/// A fresh random 16-byte token.
pub fn random_token() -> [u8; 16] {
    rand::random()
}

/// Writes a PNG camera frame showing a freshly issued code; returns (path, payload, token).
pub fn code_frame(dir: &Path, name: &str, issued_at: u64) -> Result<(PathBuf, String, [u8; 16])> {
    let token = random_token();
    let payload = issuer().issue(issued_at, 60, token);
    let img = crate::frames::frame(&payload, crate::frames::Damage::Clean, u64::from(token[0]))?;
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, crate::frames::encode_png(&img)?)?;
    Ok((path, payload, token))
}

/// Every record stored in an edge device's folder, opened with the hub's day secrets
/// (the device itself cannot read them). The device must not be running.
pub fn stored_records(edge_dir: &Path, hub_dir: &Path) -> Result<Vec<shared::envelope::Record>> {
    let store = edge_node::store::Store::open(&edge_dir.join("edge.redb"))?;
    let ratchet = sync_hub::keys::KeyDir::new(hub_dir).ratchet()?;
    let enrollment: edge_node::device::Enrollment = serde_json::from_slice(
        &store
            .get("enrollment")?
            .context("the device folder holds no enrollment")?,
    )?;
    let mut out = Vec::new();
    for (day, _, _) in store.days()? {
        let (bytes, _) = store.partition_bytes(day)?;
        let id = shared::PartitionId {
            facility: enrollment.facility.id.clone(),
            day,
        };
        let mut p = if bytes.is_empty() {
            shared::partition::Partition::new(id, b"test-reader")
        } else {
            shared::partition::Partition::load(id, &bytes, b"test-reader")?
        };
        // Check-ins not yet folded into the partition (they fold when a sync starts).
        let mut keys = Vec::new();
        let mut records = Vec::new();
        for (seq, row) in store.pending(day)? {
            match row {
                Some(edge_node::store::Pending::Key(k)) => keys.push(k),
                Some(edge_node::store::Pending::Record(id, e)) => records.push((id, e)),
                None => bail!("pending row {seq} of day {day} is damaged"),
            }
        }
        p.insert_batch(&keys, &records)?;
        let u = shared::unseal::unseal_partition(&p, |d| ratchet.secret(d));
        if let Some((id, why)) = u.failures.first() {
            bail!("record {id} of day {day} does not open: {why}");
        }
        out.extend(u.records.into_values());
    }
    Ok(out)
}

/// The tokens of the QR visits among `records`.
pub fn qr_tokens(records: &[shared::envelope::Record]) -> Vec<[u8; 16]> {
    records
        .iter()
        .filter_map(|r| match &r.body {
            shared::envelope::RecordBody::Qr { token, .. } => Some(*token),
            shared::envelope::RecordBody::Paper { .. } => None,
        })
        .collect()
}

/// Every byte of every file below `dir`.
pub fn all_bytes_below(dir: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.extend(std::fs::read(&p)?);
            }
        }
    }
    Ok(out)
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Starts `edge-node run` on `dir` with the kiosk on a loopback port (`--listen` and `--http`
/// both `127.0.0.1:0`, no LAN beacons), waits up to 30 s for its `run.json` to name the HTTP
/// address, and returns the process with that address. A stale `run.json` is removed first,
/// so the address read is the new run's. `extra` arguments follow `run`'s own.
pub fn run_with_http(dir: &Path, extra: &[&str]) -> Result<(Proc, std::net::SocketAddr)> {
    let run_json = dir.join("run.json");
    let _ = std::fs::remove_file(&run_json);
    let child = Command::new(bin("edge-node"))
        .arg("--data")
        .arg(dir)
        .args(["run", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--no-lan"])
        .args(extra)
        .env_remove("EDGE_NODE_DATA")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start edge-node run")?;
    let proc = Proc(child);
    let mut http = None;
    wait_until(Duration::from_secs(30), || {
        http = std::fs::read_to_string(&run_json)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["http"].as_str().and_then(|h| h.parse().ok()));
        http.is_some()
    });
    let addr = http.context("the device did not write run.json within 30 s")?;
    Ok((proc, addr))
}

/// Sets the staff PIN of the device in `dir` as a person would: `edge-node pin set` with the
/// PIN on stdin, never in argv.
pub fn set_pin_from_stdin(dir: &Path, pin: &str) -> Result<()> {
    let mut set = Command::new(bin("edge-node"))
        .arg("--data")
        .arg(dir)
        .args(["pin", "set"])
        .env_remove("EDGE_NODE_DATA")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = set.stdin.take() {
        std::io::Write::write_all(&mut stdin, format!("{pin}\n").as_bytes())?;
    }
    let out = set.wait_with_output()?;
    if !out.status.success() {
        bail!("pin set: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The second hub of `a`'s region, in a folder of its own: `sync-hub init --peer` with `a`'s
/// pairing file, and `peer add` of its own file at `a`, so the two are paired both ways. Its
/// `facility` is `a`'s (the hub link brings it once both run).
pub fn pair_second_hub(a: &HubFixture) -> Result<HubFixture> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("hub");
    let d = data.display().to_string();
    let sync_port = free_udp_port()?;
    let a_pair = tmp.path().join("a.pair");
    let b_pair = tmp.path().join("b.pair");
    run_ok(
        "sync-hub",
        &[
            "--data",
            &a.data_str(),
            "peer",
            "show",
            "--out",
            a_pair.to_str().unwrap_or_default(),
        ],
    )?;
    run_ok(
        "sync-hub",
        &[
            "--data",
            &d,
            "init",
            "--region",
            "mapo",
            "--listen",
            &format!("127.0.0.1:{sync_port}"),
            "--peer",
            a_pair.to_str().unwrap_or_default(),
        ],
    )?;
    run_ok(
        "sync-hub",
        &[
            "--data",
            &d,
            "peer",
            "show",
            "--out",
            b_pair.to_str().unwrap_or_default(),
        ],
    )?;
    run_ok(
        "sync-hub",
        &[
            "--data",
            &a.data_str(),
            "peer",
            "add",
            b_pair.to_str().unwrap_or_default(),
        ],
    )?;
    Ok(HubFixture {
        tmp,
        data,
        facility: a.facility.clone(),
        sync_port,
    })
}

/// The environment that makes paired hubs exchange every 300 ms instead of every 10 s.
pub const FAST_LINK: (&str, &str) = ("KIPASS_HUB_LINK_INTERVAL_MS", "300");
