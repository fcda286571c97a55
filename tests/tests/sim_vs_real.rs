//! The simulation's figures are the product's: one small scenario
//! (`simulations::lockstep::small_plan`) runs in the simulation (a library call) and through
//! the real binaries on loopback (camera frames through `edge-node scan`, `edge-node sync
//! --once`, a sibling running `edge-node run` for the device without a route), and both show
//! the same visits at the hub, no duplicate, and the same protocol frame bytes within 10 %,
//! device to hub, hub to device and through the sibling.
//!
//! What may differ, and why it stays small: random session keys, record ids and automerge
//! actors are other bytes of the same sizes; the binaries' device folds its pending visits
//! into one automerge change per sync while the simulated one writes a change per visit; the
//! real hub's welcome carries a refresh (roster, day keys) the simulated one leaves out. The
//! QUIC bytes the binaries' sockets moved are printed beside the simulation's modelled cost,
//! not asserted.

use anyhow::{Context, Result, bail};
use simulations::lockstep::{self, Figures, Plan, SessionFigures, Step};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::fixture::{self, HubFixture, Proc, bin, device_status, run, run_ok, wait_until};
use tests::frames::{Damage, encode_png, frame};

/// The plan's seed (tokens) and the simulated world's.
const SEED: u64 = 13;
/// The most protocol bytes may differ between simulation and binaries, as a share.
const TOLERANCE: f64 = 0.10;

/// One session as the binaries' `sync --once --json` reported it.
#[derive(Debug, Clone)]
struct RealSession {
    step: usize,
    frame_up: u64,
    frame_down: u64,
    socket_bytes: u64,
}

/// What the binaries did with the plan.
struct Real {
    sessions: Vec<RealSession>,
    delivered: u64,
    /// Tokens the hub's trace finds more than once.
    duplicates: u64,
    /// Tokens the hub's trace does not find.
    missing: u64,
}

/// The report line of `sync --once --json` for `peer` (`hub` or not), completed.
fn completed_report(stdout: &str, hub: bool) -> Option<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| (v["peer"] == "hub") == hub && v["ok"] == true)
}

fn real_session(step: usize, v: &serde_json::Value) -> RealSession {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    RealSession {
        step,
        frame_up: n("frame_bytes_sent"),
        frame_down: n("frame_bytes_received"),
        socket_bytes: n("socket_bytes_sent") + n("socket_bytes_received"),
    }
}

/// `edge-node sync --once --json` listening on `port`: each device keeps one port, as a
/// running device does, so the roster the hub hands siblings does not change with every
/// command's fresh port.
fn sync_once(dev: &Path, port: u16, peers: &[String]) -> Result<std::process::Output> {
    let data = dev.display().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--data", &data, "sync", "--once", "--json", "--listen", &listen,
    ];
    for p in peers {
        args.extend(["--peer", p.as_str()]);
    }
    run("edge-node", &args)
}

fn endpoint_of(dev: &Path) -> Result<String> {
    Ok(device_status(dev)?["endpoint_id"]
        .as_str()
        .context("status has no endpoint_id")?
        .to_owned())
}

/// Shows camera frames of fresh codes of `batch`'s tokens (step, token) to device `dev` in
/// one `scan` process; fails unless every one is accepted.
fn scan(dev: &Path, dir: &Path, batch: &[(usize, [u8; 16])]) -> Result<()> {
    let mut paths = Vec::new();
    for (i, token) in batch {
        let payload = fixture::issuer().issue(fixture::now(), lockstep::CODE_TTL, *token);
        let img = frame(&payload, Damage::Clean, *i as u64)?;
        let path = dir.join(format!("scan-{i}.png"));
        std::fs::write(&path, encode_png(&img)?)?;
        paths.push(path.display().to_string());
    }
    let data = dev.display().to_string();
    let mut args = vec!["--data", &data, "scan", "--json"];
    args.extend(paths.iter().map(String::as_str));
    let out = run_ok("edge-node", &args)?;
    let accepted = out.matches("\"accepted\"").count();
    if accepted != batch.len() {
        bail!("{} of {} codes accepted: {out}", accepted, batch.len());
    }
    Ok(())
}

/// Device `from` hands its log to `via`, which runs its daemon (the hub is down) on a fixed
/// loopback port; retried until `via` listens. The sibling session's report.
fn relay(
    (from, from_port, from_id): (&Path, u16, &str),
    (via, port): (&Path, u16),
    step: usize,
) -> Result<RealSession> {
    let _sibling = Proc(
        Command::new(bin("edge-node"))
            .args([
                "--data",
                &via.display().to_string(),
                "run",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--http",
                "127.0.0.1:0",
                // Admits `from`, which the sibling's roster does not list yet; nothing listens
                // at this address, so the daemon's own relay attempts fail.
                "--peer",
                &format!("{from_id}@127.0.0.1:9"),
            ])
            .env_remove("EDGE_NODE_DATA")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let peer = format!("{}@127.0.0.1:{port}", endpoint_of_running(via)?);
    let mut report = None;
    wait_until(Duration::from_secs(40), || {
        let Ok(out) = sync_once(from, from_port, std::slice::from_ref(&peer)) else {
            return false;
        };
        report = completed_report(&String::from_utf8_lossy(&out.stdout), false);
        report.is_some()
    });
    let report = report.context("the relay to the sibling never completed")?;
    Ok(real_session(step, &report))
}

/// The endpoint id of a device that may be running: `status` goes through its control API.
fn endpoint_of_running(dev: &Path) -> Result<String> {
    let mut id = None;
    wait_until(Duration::from_secs(20), || {
        id = endpoint_of(dev).ok();
        id.is_some()
    });
    id.context("the device's status never answered")
}

fn run_real(plan: &Plan) -> Result<Real> {
    let hub = HubFixture::new()?;
    let devices: Vec<PathBuf> = (0..plan.devices)
        .map(|d| hub.enroll_device_for(&hub.facility, &format!("d{d}")))
        .collect::<Result<_>>()?;
    let ids: Vec<String> = devices
        .iter()
        .map(|d| endpoint_of(d))
        .collect::<Result<_>>()?;
    let ports: Vec<u16> = (0..plan.devices)
        .map(|_| fixture::free_udp_port())
        .collect::<Result<_>>()?;
    let frames = hub.tmp.path().join("frames");
    std::fs::create_dir_all(&frames)?;
    let mut hub_run: Option<Proc> = None;
    let mut sessions = Vec::new();
    for (i, step) in plan.steps.iter().enumerate() {
        match *step {
            Step::Scan { device, .. } => {
                // A run of scans of one device is one `scan` process, as the plan says.
                let first = i == 0
                    || !matches!(plan.steps[i - 1], Step::Scan { device: d, .. } if d == device);
                if first {
                    let batch: Vec<(usize, [u8; 16])> = plan.steps[i..]
                        .iter()
                        .enumerate()
                        .map_while(|(j, s)| match s {
                            Step::Scan { device: d, token } if *d == device => {
                                Some((i + j, *token))
                            }
                            _ => None,
                        })
                        .collect();
                    scan(&devices[device], &frames, &batch)?;
                }
            }
            Step::HubUp => hub_run = Some(hub.start()?),
            Step::Relay { from, via } => {
                if hub_run.is_some() {
                    bail!("step {i}: a relay while the hub runs would race the sibling's daemon");
                }
                sessions.push(relay(
                    (&devices[from], ports[from], &ids[from]),
                    (&devices[via], ports[via]),
                    i,
                )?);
            }
            Step::SyncHub { device } => {
                let out = sync_once(&devices[device], ports[device], &[])?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                let report = completed_report(&stdout, true)
                    .with_context(|| format!("step {i}: the hub session failed: {stdout}"))?;
                if completed_report(&stdout, false).is_some() {
                    bail!("step {i}: a sibling session ran beside the hub's: {stdout}");
                }
                sessions.push(real_session(i, &report));
            }
        }
    }
    let facility = hub.facility.clone();
    let delivered = hub.records_of(&facility)?;
    let (mut duplicates, mut missing) = (0, 0);
    for token in plan.tokens() {
        let trace = hub.trace(&token)?;
        match trace["visits"].as_array().map_or(0, Vec::len) {
            0 => missing += 1,
            1 => {}
            n => duplicates += n as u64 - 1,
        }
    }
    drop(hub_run);
    Ok(Real {
        sessions,
        delivered,
        duplicates,
        missing,
    })
}

fn describe(step: &Step) -> String {
    match step {
        Step::SyncHub { device } => format!("d{device} -> hub"),
        Step::Relay { from, via } => format!("d{from} -> d{via}"),
        other => format!("{other:?}"),
    }
}

/// `a` and `b` differ by at most [`TOLERANCE`] of the larger.
fn close(a: u64, b: u64) -> bool {
    a.abs_diff(b) as f64 <= TOLERANCE * a.max(b) as f64
}

#[test]
fn the_simulation_shows_the_binaries_deliveries_and_wire_bytes() -> Result<()> {
    let plan = lockstep::small_plan(SEED);
    // The simulation's bytes vary a little from run to run (age draws its keys from the
    // operating system, and now and then an automerge bloom filter's false positive costs a
    // round): its figure is the run of median frame bytes of five (deliveries never vary).
    let mut runs: Vec<Figures> = (0..5)
        .map(|_| lockstep::run(&plan, &fixture::issuer(), SEED))
        .collect();
    for r in &runs {
        assert!(r.violations.is_empty(), "{:?}", r.violations);
    }
    runs.sort_by_key(Figures::frame_bytes);
    println!(
        "simulation frame bytes of five runs: {:?}",
        runs.iter().map(Figures::frame_bytes).collect::<Vec<_>>()
    );
    // Each run's totals (device -> hub, hub -> device, relays): the real run varies as much
    // (its own keys, its own bloom filters), so it is compared with every simulation run, and
    // must come within the tolerance of at least one.
    let totals: Vec<[u64; 3]> = runs
        .iter()
        .map(|run| {
            let hub = run
                .sessions
                .iter()
                .filter(|s| matches!(s.what, Step::SyncHub { .. }));
            [
                hub.clone().map(|s| s.bytes_up).sum(),
                hub.map(|s| s.bytes_down).sum(),
                run.sessions
                    .iter()
                    .filter(|s| matches!(s.what, Step::Relay { .. }))
                    .map(|s| s.bytes())
                    .sum(),
            ]
        })
        .collect();
    let near_a_run = |i: usize, real: u64| totals.iter().any(|t| close(t[i], real));
    let spread = |i: usize| totals.iter().map(|t| t[i]).collect::<Vec<_>>();
    let sim: Figures = runs.swap_remove(2);
    let real = run_real(&plan)?;

    println!("session            sim up/down (B)    real up/down (B)   real QUIC socket (B)");
    let mut pairs: Vec<(&SessionFigures, &RealSession)> = Vec::new();
    for s in &sim.sessions {
        let r = real
            .sessions
            .iter()
            .find(|r| r.step == s.step)
            .with_context(|| format!("no real session for step {}", s.step))?;
        println!(
            "{:<18} {:>7} / {:<7}    {:>7} / {:<7}   {:>8}",
            describe(&s.what),
            s.bytes_up,
            s.bytes_down,
            r.frame_up,
            r.frame_down,
            r.socket_bytes
        );
        pairs.push((s, r));
    }
    let hub_sessions = || {
        pairs
            .iter()
            .filter(|(s, _)| matches!(s.what, Step::SyncHub { .. }))
    };
    let sim_up: u64 = hub_sessions().map(|(s, _)| s.bytes_up).sum();
    let sim_down: u64 = hub_sessions().map(|(s, _)| s.bytes_down).sum();
    let real_up: u64 = hub_sessions().map(|(_, r)| r.frame_up).sum();
    let real_down: u64 = hub_sessions().map(|(_, r)| r.frame_down).sum();
    let relays = || {
        pairs
            .iter()
            .filter(|(s, _)| matches!(s.what, Step::Relay { .. }))
    };
    let sim_relay: u64 = relays().map(|(s, _)| s.bytes()).sum();
    let real_relay: u64 = relays().map(|(_, r)| r.frame_up + r.frame_down).sum();
    let real_socket: u64 = real.sessions.iter().map(|r| r.socket_bytes).sum();
    println!(
        "totals: devices -> hub sim {sim_up} real {real_up}; hub -> devices sim {sim_down} \
         real {real_down}; relays sim {sim_relay} real {real_relay}; the five runs: up {:?}, \
         down {:?}, relays {:?}",
        spread(0),
        spread(1),
        spread(2)
    );
    println!(
        "QUIC: the binaries' sockets moved {real_socket} B in {} sessions; the simulation \
         models {} B of protocol frames plus {} B of QUIC ({} B all in)",
        real.sessions.len(),
        sim.frame_bytes(),
        sim.modelled_quic_bytes,
        sim.frame_bytes() + sim.modelled_quic_bytes
    );
    println!(
        "visits at the hub: sim {} real {}; duplicates sim {} real {}",
        sim.delivered, real.delivered, sim.duplicates, real.duplicates
    );

    let tokens = plan.tokens().len() as u64;
    assert_eq!(sim.delivered, tokens);
    assert_eq!(real.delivered, sim.delivered, "visits at the hub");
    assert_eq!(real.missing, 0, "visits the hub's trace does not find");
    assert_eq!((sim.duplicates, real.duplicates), (0, 0), "duplicates");
    assert_eq!(real.sessions.len(), sim.sessions.len(), "sessions");
    assert!(
        near_a_run(0, real_up),
        "device -> hub frame bytes: sim {sim_up} (runs {:?}), real {real_up}",
        spread(0)
    );
    assert!(
        near_a_run(1, real_down),
        "hub -> device frame bytes: sim {sim_down} (runs {:?}), real {real_down}",
        spread(1)
    );
    assert!(
        near_a_run(2, real_relay),
        "relay frame bytes: sim {sim_relay} (runs {:?}), real {real_relay}",
        spread(2)
    );
    Ok(())
}
