//! Logs never carry a token, a name, a phone number or a PIN, even at debug level: a hub and
//! two devices run as real processes with `--log-format json` (or its variables) and
//! `*_LOG=debug`, through set-up, QR check-ins (the command line and the kiosk's camera
//! route), paper entries (the command line and the kiosk's staff mode after a wrong and a
//! right PIN), syncs (a running device and `sync --once`) and a trace; then every line any of
//! them wrote on stderr must parse as a JSON object (other than the binaries' own one-line
//! messages, `sync-hub: ...` / `edge-node: ...`), and none may contain any secret used.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tests::fixture::{self, Proc, bin, wait_until};

const VISITOR_NAME: &str = "Hong Gildong";
const VISITOR_PHONE: &str = "010-3141-5926";
const KIOSK_NAME: &str = "Seo Yeonhee";
const KIOSK_PHONE: &str = "010-2718-2818";
const REMARKS: &str = "came with a guide dog";
const REPRESENTATIVE: &str = "Yoon Jaesuk";
const REPRESENTATIVE_PHONE: &str = "02-6543-2109";
const PIN: &str = "583104";
const WRONG_PIN: &str = "905217";

/// Everything the processes of one run wrote on stderr, by name.
struct Logs {
    dir: PathBuf,
    short: Vec<(String, String)>,
}

impl Logs {
    /// A command of `binary` at debug level; the format as a flag (the daemons get it from
    /// their variables instead, see [`Logs::daemon`]).
    fn command(binary: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin(binary));
        c.arg("--log-format")
            .arg("json")
            .args(args)
            .env_remove("EDGE_NODE_DATA")
            .env_remove("SYNC_HUB_DATA")
            .env_remove("EDGE_NODE_LOG_FORMAT")
            .env_remove("SYNC_HUB_LOG_FORMAT")
            .env("EDGE_NODE_LOG", "debug")
            .env("SYNC_HUB_LOG", "debug");
        c
    }

    /// Runs a command to completion with `input` on stdin; keeps its stderr; fails unless it
    /// exits 0. Returns its stdout.
    fn run(&mut self, binary: &str, args: &[&str], input: &str) -> Result<String> {
        let mut child = Self::command(binary, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        let written = child
            .stdin
            .take()
            .context("no stdin")
            .and_then(|mut s| Ok(s.write_all(input.as_bytes())?));
        let out: Output = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        self.short
            .push((format!("{binary} {}", args.join(" ")), stderr.clone()));
        written?;
        if !out.status.success() {
            bail!("{binary} {args:?} failed ({}): {stderr}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `binary ... run` with the format from its variable, stderr to a file; waits
    /// until it wrote `run.json`, and returns it with the HTTP address it wrote there.
    fn daemon(&mut self, binary: &str, data: &Path, args: &[&str]) -> Result<(Proc, String)> {
        let run_json = data.join("run.json");
        let _ = std::fs::remove_file(&run_json);
        let log = self.dir.join(format!("{binary}-{}.log", self.short.len()));
        let format_var = if binary == "sync-hub" {
            "SYNC_HUB_LOG_FORMAT"
        } else {
            "EDGE_NODE_LOG_FORMAT"
        };
        let mut c = Command::new(bin(binary));
        c.arg("--data")
            .arg(data)
            .arg("run")
            .args(args)
            .env_remove("EDGE_NODE_DATA")
            .env_remove("SYNC_HUB_DATA")
            .env("EDGE_NODE_LOG", "debug")
            .env("SYNC_HUB_LOG", "debug")
            .env(format_var, "json")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut proc = Proc(
            c.spawn()
                .with_context(|| format!("cannot start {binary}"))?,
        );
        let mut http = None;
        let started = wait_until(Duration::from_secs(30), || {
            http = std::fs::read_to_string(&run_json)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["http"].as_str().map(str::to_owned));
            http.is_some() || proc.0.try_wait().ok().flatten().is_some()
        });
        match http {
            Some(h) if started => Ok((proc, h)),
            _ => bail!(
                "{binary} run did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }

    /// Every log: (name, text).
    fn all(&self) -> Result<Vec<(String, String)>> {
        let mut out = self.short.clone();
        for e in std::fs::read_dir(&self.dir)? {
            let p = e?.path();
            out.push((p.display().to_string(), std::fs::read_to_string(&p)?));
        }
        Ok(out)
    }
}

/// Stops a daemon with SIGTERM (so its shutdown is logged too), then reaps it; SIGKILL if it
/// has not exited within 10 s.
fn stop(mut p: Proc) {
    if let Ok(pid) = i32::try_from(p.0.id())
        && let Some(pid) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        wait_until(Duration::from_secs(10), || {
            p.0.try_wait().ok().flatten().is_some()
        });
    }
    p.kill();
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Sends JSON to the kiosk; returns the status, the body and the `Set-Cookie` header.
fn kiosk_post(
    base: &str,
    path: &str,
    cookie: Option<&str>,
    body: &Value,
) -> Result<(u16, Value, Option<String>)> {
    let mut req = agent().post(&format!("{base}{path}"));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let mut resp = req.send_json(body).context("the kiosk did not answer")?;
    let status = resp.status().as_u16();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        cookie,
    ))
}

/// The forms a 16-byte token could take in a log line: hex (both cases), its bytes as Rust's
/// `Debug` prints an array, and the code's text it travelled in.
fn token_forms(token: &[u8; 16], payload: &str) -> Vec<String> {
    let dec = token
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        hex::encode(token),
        hex::encode_upper(token),
        format!("[{dec}]"),
        payload.to_owned(),
    ]
}

#[test]
fn json_logs_at_debug_of_a_full_run_hold_no_token_name_phone_or_pin() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let log_dir = tmp.path().join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let mut logs = Logs {
        dir: log_dir,
        short: Vec::new(),
    };
    let hub = tmp.path().join("hub");
    let h = hub.display().to_string();
    let port = fixture::free_udp_port()?;

    // The region is set up: a hub, an issuer, a facility (its representative's name and
    // phone on stdin), two devices (one with a staff PIN on stdin).
    let listen = format!("127.0.0.1:{port}");
    logs.run(
        "sync-hub",
        &[
            "--data", &h, "init", "--region", "mapo", "--listen", &listen,
        ],
        "",
    )?;
    let ring = tmp.path().join("keyring.json");
    std::fs::write(&ring, fixture::keyring_json())?;
    let r = ring.display().to_string();
    logs.run("sync-hub", &["--data", &h, "issuers", "import", &r], "")?;
    let out = logs.run(
        "sync-hub",
        &[
            "--data",
            &h,
            "facility",
            "add",
            "--name",
            "Star Karaoke",
            "--business-number",
            fixture::BUSINESS_NUMBER,
            "--representative",
            "--phone",
            "--category",
            "karaoke",
            "--region",
            "mapo",
            "--address",
            "1 Wausan-ro",
            "--json",
        ],
        &format!("{REPRESENTATIVE}\n{REPRESENTATIVE_PHONE}\n"),
    )?;
    let facility = serde_json::from_str::<Value>(out.trim())?["facility_id"]
        .as_str()
        .context("no facility id")?
        .to_owned();
    let mut devices = Vec::new();
    for (name, pin) in [("gate-1", Some(PIN)), ("gate-2", None)] {
        let ticket = tmp.path().join(format!("{name}.ticket"));
        let t = ticket.display().to_string();
        logs.run(
            "sync-hub",
            &[
                "--data",
                &h,
                "enroll",
                &facility,
                "--device-name",
                name,
                "--out",
                &t,
            ],
            "",
        )?;
        let dev = tmp.path().join(name);
        let d = dev.display().to_string();
        let mut args = vec!["--data", &d, "init", "--ticket", &t];
        if pin.is_some() {
            args.push("--staff-pin");
        }
        logs.run(
            "edge-node",
            &args,
            &pin.map(|p| format!("{p}\n")).unwrap_or_default(),
        )?;
        devices.push(dev);
    }
    let (gate1, gate2) = (&devices[0], &devices[1]);
    let (g1, g2) = (gate1.display().to_string(), gate2.display().to_string());

    // gate-2 is offline: a visitor checks in, then it syncs once the hub runs.
    let mut secrets = vec![
        VISITOR_NAME,
        VISITOR_PHONE,
        KIOSK_NAME,
        KIOSK_PHONE,
        REMARKS,
        REPRESENTATIVE,
        REPRESENTATIVE_PHONE,
        PIN,
        WRONG_PIN,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    // Phone numbers without their dashes too.
    for p in [VISITOR_PHONE, KIOSK_PHONE, REPRESENTATIVE_PHONE] {
        secrets.push(p.replace('-', ""));
    }
    let mut tokens = Vec::new();
    let (frame, payload, token) = fixture::code_frame(tmp.path(), "offline", fixture::now())?;
    let f = frame.display().to_string();
    let out = logs.run("edge-node", &["--data", &g2, "scan", "--json", &f], "")?;
    assert!(out.contains("\"accepted\""), "{out}");
    secrets.extend(token_forms(&token, &payload));
    tokens.push(token);

    let (hub_run, _) = logs.daemon("sync-hub", &hub, &["--http", "127.0.0.1:0"])?;
    let (gate1_run, kiosk) = logs.daemon(
        "edge-node",
        gate1,
        &["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
    )?;
    let kiosk = format!("http://{kiosk}");

    // Check-ins at the running gate-1: frames through `scan` (its control API) and through
    // the kiosk's camera route.
    let mut frames = Vec::new();
    for i in 0..3 {
        let (frame, payload, token) =
            fixture::code_frame(tmp.path(), &format!("visitor-{i}"), fixture::now())?;
        frames.push(frame.display().to_string());
        secrets.extend(token_forms(&token, &payload));
        tokens.push(token);
    }
    let mut args = vec!["--data", &g1, "scan", "--json"];
    args.extend(frames.iter().map(String::as_str));
    let out = logs.run("edge-node", &args, "")?;
    assert_eq!(out.matches("\"accepted\"").count(), 3, "{out}");
    let (frame, payload, token) = fixture::code_frame(tmp.path(), "kiosk", fixture::now())?;
    secrets.extend(token_forms(&token, &payload));
    tokens.push(token);
    let mut resp = agent()
        .post(&format!("{kiosk}/kiosk/frame"))
        .header("content-type", "image/png")
        .send(&std::fs::read(&frame)?)
        .context("the kiosk did not answer")?;
    let verdict: Value = serde_json::from_str(&resp.body_mut().read_to_string()?)?;
    assert_eq!(verdict["verdict"], "accepted", "{verdict}");

    // Paper entries: one from the command line (name and phone on stdin), one in the kiosk's
    // staff mode after a wrong PIN and the right one.
    logs.run(
        "edge-node",
        &[
            "--data",
            &g1,
            "paper",
            "add",
            "--name",
            "--phone",
            "--consent-collect",
            "--consent-share",
            "--remarks",
            REMARKS,
        ],
        &format!("{VISITOR_NAME}\n{VISITOR_PHONE}\n"),
    )?;
    let (code, v, _) = kiosk_post(
        &kiosk,
        "/kiosk/staff/login",
        None,
        &json!({ "pin": WRONG_PIN }),
    )?;
    assert_eq!(code, 401, "{v}");
    let (code, v, cookie) = kiosk_post(&kiosk, "/kiosk/staff/login", None, &json!({ "pin": PIN }))?;
    assert_eq!(code, 200, "{v}");
    let cookie = cookie
        .and_then(|c| c.split(';').next().map(str::to_owned))
        .context("no staff session cookie")?;
    let session = cookie.split('=').nth(1).unwrap_or_default().to_owned();
    assert!(session.len() >= 16, "{cookie}");
    secrets.push(session);
    let (code, v, _) = kiosk_post(
        &kiosk,
        "/kiosk/paper",
        Some(&cookie),
        &json!({"name": KIOSK_NAME, "phone": KIOSK_PHONE, "consent_collect": true,
                "consent_share": true}),
    )?;
    assert_eq!(code, 200, "{v}");

    // Credentials kept in the data folders are secrets too.
    for f in [gate1.join("control.token"), hub.join("keys/operator.token")] {
        let t =
            std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
        secrets.push(t.trim().to_owned());
    }

    // Everything reaches the hub: gate-1 by itself, gate-2 with `sync --once`.
    logs.run(
        "edge-node",
        &[
            "--data",
            &g2,
            "sync",
            "--once",
            "--json",
            "--listen",
            "127.0.0.1:0",
        ],
        "",
    )?;
    let mut records = 0;
    let arrived = wait_until(Duration::from_secs(60), || {
        records = logs
            .run("sync-hub", &["--data", &h, "stats", "--json"], "")
            .ok()
            .and_then(|o| serde_json::from_str::<Value>(o.trim()).ok())
            .and_then(|v| v["per_facility"][&facility].as_u64())
            .unwrap_or(0);
        // 5 QR visits and 2 paper entries.
        records >= 7
    });
    assert!(arrived, "the hub holds {records} of 7 records");

    // The health authority traces the first visitor of gate-1.
    let out = logs.run(
        "sync-hub",
        &[
            "--data",
            &h,
            "trace",
            "--token",
            &hex::encode(tokens[1]),
            "--case",
            "case-17",
            "--purpose",
            "contact tracing",
            "--json",
        ],
        "",
    )?;
    let trace: Value = serde_json::from_str(out.trim())?;
    assert_eq!(trace["visits"].as_array().map(Vec::len), Some(1), "{trace}");
    assert!(
        trace["contacts"].as_array().map_or(0, Vec::len) >= 4,
        "{trace}"
    );

    stop(gate1_run);
    stop(hub_run);

    // Every line is a JSON object (or one of the binaries' own messages); the daemons logged
    // at debug level; no secret anywhere.
    let all = logs.all()?;
    let mut json_lines = 0;
    let mut debug_lines = 0;
    for (name, text) in &all {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if line.starts_with("sync-hub: ") || line.starts_with("edge-node: ") {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("a line of {name} is not JSON: {line}"))?;
            assert!(
                v.is_object() && v["level"].is_string() && v["timestamp"].is_string(),
                "{name}: {line}"
            );
            json_lines += 1;
            if v["level"] == "DEBUG" {
                debug_lines += 1;
            }
        }
        for s in &secrets {
            if let Some(line) = text.lines().find(|l| l.contains(s.as_str())) {
                bail!("{name} logged a secret ({s:?}): {line}");
            }
        }
    }
    for daemon in ["sync-hub-", "edge-node-"] {
        let (name, text) = all
            .iter()
            .find(|(n, _)| n.contains(&format!("/{daemon}")))
            .with_context(|| format!("no {daemon} log"))?;
        assert!(
            text.contains("\"level\":\"DEBUG\""),
            "{name} has no debug line: {text}"
        );
    }
    assert!(
        json_lines > 100 && debug_lines > 50,
        "{json_lines} JSON lines, {debug_lines} at debug"
    );
    Ok(())
}

#[test]
fn an_unknown_log_format_is_refused_with_the_formats_there_are() -> Result<()> {
    for (binary, command) in [("sync-hub", "stats"), ("edge-node", "status")] {
        let out = Command::new(bin(binary))
            .args(["--log-format", "xml", "--data", "/nonexistent", command])
            .output()?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("xml") && err.contains("text or json"),
            "{binary}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    Ok(())
}
