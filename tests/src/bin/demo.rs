//! The end-to-end demo: a hub and three devices at two facilities as real processes on
//! loopback, visitors checking in with QR frames from a test issuer while the hub is down,
//! the backlog arriving when it returns (one device through its sibling), a health-authority
//! trace with contacts, and retention fast-forwarded until nothing is left.
//!
//! Run it with `./demo.sh` (which builds the binaries first). It cleans up after itself.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::fixture::{
    self, HubFixture, Proc, bin, device_status, run, run_ok, sync_once, wait_until,
};
use tests::frames::{Damage, encode_png, frame};

fn say(step: &str) {
    println!("\n== {step}");
}

fn main() {
    if let Err(e) = demo() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn scan(dev: &Path, images: &[std::path::PathBuf]) -> Result<Vec<String>> {
    let mut args = vec![
        "--data".to_owned(),
        dev.display().to_string(),
        "scan".into(),
        "--json".into(),
    ];
    args.extend(images.iter().map(|p| p.display().to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok("edge-node", &refs)?;
    let mut verdicts = Vec::new();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let name = Path::new(v["image"].as_str().unwrap_or_default())
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        println!(
            "   {name:<12} {:<10} {}",
            v["verdict"].as_str().unwrap_or("?"),
            v["message"].as_str().unwrap_or("")
        );
        verdicts.push(v["verdict"].as_str().unwrap_or("?").to_owned());
    }
    Ok(verdicts)
}

fn demo() -> Result<()> {
    for b in ["edge-node", "sync-hub"] {
        if !bin(b).exists() {
            bail!(
                "{} is not built: run ./demo.sh (it builds the binaries first)",
                bin(b).display()
            );
        }
    }
    println!(
        "KI-Pass offline-first visitor log: end-to-end demo (everything on this machine, loopback only)"
    );

    say("1. A regional hub is set up; it trusts one issuer app and registers two facilities");
    let hub = HubFixture::new()?;
    let h = hub.data_str();
    let star = hub.facility.clone();
    println!(
        "   hub {} for region mapo; facility 'Star Karaoke' {star} approved (business number check digit holds)",
        hub.data.display()
    );
    let out = run_ok(
        "sync-hub",
        &[
            "--data",
            &h,
            "facility",
            "add",
            "--name",
            "Han River Night Market",
            "--no-business-number",
            "--representative",
            "Park",
            "--phone",
            "02-555-0000",
            "--category",
            "other:pop-up market",
            "--region",
            "mapo",
            "--address",
            "Yeouido Park gate 3",
            "--json",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    let market = v["facility_id"].as_str().unwrap_or_default().to_owned();
    println!(
        "   facility 'Han River Night Market' {market}: {} (no business number)",
        v["status"].as_str().unwrap_or("?")
    );
    run_ok("sync-hub", &["--data", &h, "facility", "approve", &market])?;
    println!("   a local-government officer approves it");

    say("2. Three entrance devices are enrolled from tickets (offline)");
    let gate1 = hub.enroll_device_for(&star, "gate-1")?;
    let gate2 = hub.enroll_device_for(&star, "gate-2")?;
    let stall = hub.enroll_device_for(&market, "outdoor-stall")?;
    println!("   Star Karaoke: gate-1, gate-2; Night Market: outdoor-stall (on a phone hotspot)");

    say(
        "3. The hub is DOWN. Visitors check in anyway: the issuer app shows one-time QR codes, devices scan camera frames",
    );
    let frames = hub.tmp.path().join("frames");
    std::fs::create_dir_all(&frames)?;
    let issuer = fixture::issuer();
    let now = fixture::now();
    let write = |name: &str, payload: &str, damage: Damage| -> Result<std::path::PathBuf> {
        let p = frames.join(format!("{name}.png"));
        std::fs::write(&p, encode_png(&frame(payload, damage, 7)?)?)?;
        Ok(p)
    };
    let case_token: [u8; 16] = rand::random();
    let case = write(
        "case-visitor",
        &issuer.issue(now, 15, case_token),
        Damage::Clean,
    )?;
    let mut gate1_frames = vec![case.clone()];
    for i in 0..4 {
        gate1_frames.push(write(
            &format!("visitor-{i}"),
            &issuer.issue(now, 15, rand::random()),
            if i % 2 == 0 {
                Damage::Blur { sigma: 1.5 }
            } else {
                Damage::Noise { sigma: 25.0 }
            },
        )?);
    }
    gate1_frames.push(case.clone());
    gate1_frames.push(write(
        "old-code",
        &issuer.issue(now - 600, 15, rand::random()),
        Damage::Clean,
    )?);
    gate1_frames.push(write("menu-qr", "HTTPS://EXAMPLE.COM/MENU", Damage::Clean)?);
    println!(
        "   gate-1 (the case visitor, four others, the case visitor again, a stale screenshot, a menu QR):"
    );
    let gate1_verdicts = scan(&gate1, &gate1_frames)?;
    let mut gate2_frames = Vec::new();
    for i in 0..3 {
        gate2_frames.push(write(
            &format!("late-{i}"),
            &issuer.issue(now, 15, rand::random()),
            Damage::Dim { low: 20, high: 70 },
        )?);
    }
    println!("   gate-2 (three visitors in dim light):");
    let gate2_verdicts = scan(&gate2, &gate2_frames)?;
    let mut stall_frames = Vec::new();
    for i in 0..3 {
        stall_frames.push(write(
            &format!("market-{i}"),
            &issuer.issue(now, 15, rand::random()),
            Damage::Rotate { max_degrees: 15.0 },
        )?);
    }
    println!("   outdoor-stall (three visitors, codes held at an angle):");
    scan(&stall, &stall_frames)?;
    run_ok(
        "edge-node",
        &[
            "--data",
            gate1.to_str().unwrap_or_default(),
            "paper",
            "add",
            "--name",
            "Kim Minsu",
            "--phone",
            "010-1234-5678",
            "--consent-collect",
            "--consent-share",
            "--remarks",
            "no smartphone",
        ],
    )?;
    println!(
        "   gate-1 also takes one paper-log entry (sealed to the health authority: the hub cannot read it)"
    );
    for (n, d) in [
        ("gate-1", &gate1),
        ("gate-2", &gate2),
        ("outdoor-stall", &stall),
    ] {
        let s = device_status(d)?;
        println!(
            "   {n:<14} records {}  unsynced {}  day keys left {}",
            s["records"], s["unsynced"], s["day_keys_left"]
        );
    }

    say(
        "4. gate-2 has no route to the hub, only to gate-1 in the same building: it hands its log over",
    );
    let port = fixture::free_udp_port()?;
    let g1_id = device_status(&gate1)?["endpoint_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let g2_id = device_status(&gate2)?["endpoint_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Before their first hub sync the devices have no roster: the operator names the sibling.
    let gate1_run = Proc(
        Command::new(bin("edge-node"))
            .args([
                "--data",
                gate1.to_str().unwrap_or_default(),
                "run",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--peer",
                &format!("{g2_id}@127.0.0.1:9"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start gate-1")?,
    );
    let peer = format!("{g1_id}@127.0.0.1:{port}");
    let handed = wait_until(Duration::from_secs(30), || {
        sync_once(&gate2, std::slice::from_ref(&peer))
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.contains("\"ok\":true") && !l.contains("\"peer\":\"hub\""))
            })
            .unwrap_or(false)
    });
    if !handed {
        bail!("gate-2 could not reach gate-1");
    }
    println!("   gate-2 -> gate-1: done (the hub attempt timed out, as expected while it is down)");

    say("5. The hub comes back; the backlog arrives");
    // What the scans accepted (a damaged frame the camera could not read is asked again at a
    // real door; here it is simply not a visit), and the paper entry.
    let accepted = |v: &[String]| v.iter().filter(|v| v.as_str() == "accepted").count() as u64;
    let (gate1_accepted, gate2_accepted) = (accepted(&gate1_verdicts), accepted(&gate2_verdicts));
    let star_expected = gate1_accepted + gate2_accepted + 1;
    let _hub_run = hub.start()?;
    let out = sync_once(&stall, &[])?;
    println!(
        "   outdoor-stall syncs: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    if !wait_until(Duration::from_secs(90), || {
        hub.records_of(&star).unwrap_or(0) >= star_expected
    }) {
        bail!("Star Karaoke's backlog did not arrive: {}", hub.stats()?);
    }
    drop(gate1_run);
    let stats = hub.stats()?;
    println!("   hub stats: {stats}");
    println!(
        "   (Star Karaoke: {gate1_accepted} QR visits from gate-1, 1 paper entry, {gate2_accepted} visits from gate-2 relayed by gate-1)"
    );

    say("6. A visitor tests positive; the health authority traces their token");
    let out = run_ok(
        "sync-hub",
        &[
            "--data",
            &h,
            "trace",
            "--token",
            &hex::encode(case_token),
            "--case",
            "case-2026-001",
            "--purpose",
            "contact tracing",
            "--json",
        ],
    )?;
    let trace: serde_json::Value = serde_json::from_str(out.trim())?;
    println!("   visits: {}", trace["visits"]);
    println!(
        "   contacts: {} (the other visitors at Star Karaoke within 30 minutes, the paper entry among them)",
        trace["contacts"].as_array().map(Vec::len).unwrap_or(0)
    );
    println!(
        "   facilities whose devices have not synced since: {}",
        trace["unsynced_facilities"]
    );

    say(
        "7. A second hub joins the region; the first hub's machine dies; the outdoor stall carries on with the second",
    );
    let hub_b = fixture::pair_second_hub(&hub)?;
    let _hub_b_run = hub_b.start_with(&[], &[fixture::FAST_LINK])?;
    println!(
        "   hub B {} paired with hub A (`init --peer`, `peer add`): no secret moved between them",
        hub_b.data.display()
    );
    let knows_b = || {
        run_ok("sync-hub", &["--data", &h, "peer", "status", "--json"])
            .ok()
            .and_then(|o| serde_json::from_str::<serde_json::Value>(o.trim()).ok())
            .is_some_and(|p| !p["day_keys_until"].is_null())
    };
    if !wait_until(Duration::from_secs(60), knows_b) {
        bail!("hub A never learned hub B's day keys");
    }
    let out = sync_once(&stall, &[])?;
    if !out.status.success() {
        bail!("outdoor-stall could not sync with hub A");
    }
    println!("   outdoor-stall syncs with hub A and learns hub B and its day keys");
    let late_token: [u8; 16] = rand::random();
    let late = write(
        "market-late",
        &issuer.issue(fixture::now(), 15, late_token),
        Damage::Clean,
    )?;
    println!("   a late visitor at the stall (sealed to both hubs):");
    scan(&stall, std::slice::from_ref(&late))?;
    drop(_hub_run);
    println!("   hub A's machine dies");
    let started = std::time::Instant::now();
    let out = sync_once(&stall, &[])?;
    if !out.status.success() {
        bail!(
            "outdoor-stall did not fail over to hub B: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "   outdoor-stall syncs with hub B after one dial timeout ({:.1} s for the round)",
        started.elapsed().as_secs_f64()
    );
    let out = run_ok(
        "sync-hub",
        &[
            "--data",
            &hub_b.data_str(),
            "trace",
            "--token",
            &hex::encode(late_token),
            "--json",
        ],
    )?;
    let trace: serde_json::Value = serde_json::from_str(out.trim())?;
    println!(
        "   a trace at hub B finds the late visit: {} visit(s); hub B says hub A did not answer: {}",
        trace["visits"].as_array().map(Vec::len).unwrap_or(0),
        trace["answered_by"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["answered"] == false))
    );
    drop(_hub_b_run);

    say("8. Thirty days pass: retention destroys everything, at both hubs and at every device");
    let later = (now + 30 * 86_400).to_string();
    let p = run_ok(
        "sync-hub",
        &["--data", &h, "purge", "--as-of", &later, "--json"],
    )?;
    println!("   hub purge: {}", p.trim());
    let p = run_ok(
        "sync-hub",
        &[
            "--data",
            &hub_b.data_str(),
            "purge",
            "--as-of",
            &later,
            "--json",
        ],
    )?;
    println!("   hub B purge: {}", p.trim());
    for d in [&gate1, &gate2, &stall] {
        let out = run(
            "edge-node",
            &[
                "--data",
                d.to_str().unwrap_or_default(),
                "purge",
                "--as-of",
                &later,
                "--json",
            ],
        )?;
        println!(
            "   device purge: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let out = run_ok(
        "sync-hub",
        &[
            "--data",
            &h,
            "trace",
            "--token",
            &hex::encode(case_token),
            "--json",
        ],
    )?;
    let trace: serde_json::Value = serde_json::from_str(out.trim())?;
    println!(
        "   the same trace now finds {} visits; hub stats: {}",
        trace["visits"].as_array().map(Vec::len).unwrap_or(0),
        hub.stats()?
    );

    say("Summary");
    println!(
        "   {} visits checked in offline at 3 devices, delivered once each when the hub came back",
        stats["records"]
    );
    println!(
        "   one device reached the hub only through its sibling; a trace found the case and its contacts;"
    );
    println!(
        "   a second hub took over the region when the first died, and read the visits sealed to both;"
    );
    println!(
        "   28 days and a partition later nothing readable is left anywhere. Temporary folders are removed now."
    );
    Ok(())
}
