//! Siblings find each other on the facility's network with no configuration (issue #18,
//! `docs/lan.md`): two devices of one facility on a bridged virtual LAN made of network
//! namespaces, the hub reachable only from device A (it listens on A's loopback). Device B's
//! visits reach the hub through A with no `--peer`, before and after B's address changes,
//! and A reaches B at its new address within one round.
//!
//! Needs root (`ip netns`); skipped with a printed reason otherwise. The namespaces are
//! removed on every exit (a Drop guard).

use anyhow::{Result, bail};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tests::fixture::{HubFixture, Proc, bin, code_frame, now, wait_until};

/// The namespaces of one test run; removed on drop.
struct Netns {
    names: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A command of ours run inside namespace `ns`.
fn in_ns(ns: &str, name: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(bin(name))
        .args(args)
        .env_remove("EDGE_NODE_DATA")
        .env_remove("SYNC_HUB_DATA");
    cmd
}

fn output(ns: &str, name: &str, args: &[&str]) -> Result<Output> {
    Ok(in_ns(ns, name, args).stdin(Stdio::null()).output()?)
}

fn ok(ns: &str, name: &str, args: &[&str]) -> Result<String> {
    let out = output(ns, name, args)?;
    if !out.status.success() {
        bail!(
            "{name} {args:?} in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn(ns: &str, name: &str, args: &[&str], log: &Path) -> Result<Proc> {
    Ok(Proc(
        in_ns(ns, name, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .env("RUST_LOG", "info")
            .spawn()?,
    ))
}

fn status(ns: &str, dev: &Path) -> Result<serde_json::Value> {
    let d = dev.to_str().unwrap_or_default();
    Ok(serde_json::from_str(
        ok(ns, "edge-node", &["--data", d, "status", "--json"])?.trim(),
    )?)
}

/// The first LAN address at which device `dev` (in `ns`) sees its one sibling.
fn sees(ns: &str, dev: &Path) -> Option<String> {
    let s = status(ns, dev).ok()?;
    s["siblings"][0]["lan_addrs"][0].as_str().map(str::to_owned)
}

fn hub_records(ns: &str, hub: &HubFixture) -> u64 {
    ok(
        ns,
        "sync-hub",
        &["--data", &hub.data_str(), "stats", "--json"],
    )
    .ok()
    .and_then(|s| serde_json::from_str::<serde_json::Value>(s.trim()).ok())
    .and_then(|v| v["per_facility"][&hub.facility].as_u64())
    .unwrap_or(0)
}

fn scan(ns: &str, dev: &Path, tmp: &Path, n: usize) -> Result<()> {
    for i in 0..n {
        let (frame, _, _) = code_frame(tmp, &format!("{ns}-{}-{i}", now()), now())?;
        let out = ok(
            ns,
            "edge-node",
            &[
                "--data",
                dev.to_str().unwrap_or_default(),
                "scan",
                frame.to_str().unwrap_or_default(),
            ],
        )?;
        if !out.contains("accepted") {
            bail!("scan: {out}");
        }
    }
    Ok(())
}

fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root: network namespaces need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the `ip` command (iproute2) is missing".into()),
    }
}

#[test]
fn siblings_find_each_other_on_the_lan_and_relay_after_an_address_change() -> Result<()> {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return Ok(());
    }
    // The pid keeps the names apart from a parallel run's.
    let pid = std::process::id();
    let (h, a, b) = (
        format!("kpH{pid}"),
        format!("kpA{pid}"),
        format!("kpB{pid}"),
    );
    let _ns = Netns {
        names: vec![h.clone(), a.clone(), b.clone()],
    };
    for n in [&h, &a, &b] {
        ip(&["netns", "add", n])?;
    }
    ip(&[
        "-n",
        &h,
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ])?;
    ip(&["-n", &h, "link", "set", "br0", "up"])?;
    for (ns, port, addr) in [(&a, "pa", "10.77.0.1/24"), (&b, "pb", "10.77.0.2/24")] {
        ip(&[
            "-n", &h, "link", "add", port, "type", "veth", "peer", "name", "lan0", "netns", ns,
        ])?;
        ip(&["-n", &h, "link", "set", port, "master", "br0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", "lan0", "up"])?;
        ip(&["-n", ns, "addr", "add", addr, "dev", "lan0"])?;
        ip(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", "lan0"])?;
    }
    run(&a, &b)
}

fn run(a: &str, b: &str) -> Result<()> {
    let hub = HubFixture::new()?;
    let tmp = hub.tmp.path().to_owned();
    let dev_a = hub.enroll_device("door-a")?;
    let dev_b = hub.enroll_device("door-b")?;
    let (da, db) = (
        dev_a.to_str().unwrap_or_default(),
        dev_b.to_str().unwrap_or_default(),
    );
    let _hub_run = spawn(
        a,
        "sync-hub",
        &[
            "--data",
            &hub.data_str(),
            "run",
            "--listen",
            &format!("127.0.0.1:{}", hub.sync_port),
            "--http",
            "127.0.0.1:0",
        ],
        &tmp.join("hub.log"),
    )?;
    if !wait_until(Duration::from_secs(30), || {
        hub.data.join("run.json").exists()
    }) {
        bail!("the hub did not start");
    }
    // First contacts, at the hub's site (namespace A): A, then B (whose refresh lists A),
    // then A again (whose refresh lists B). The roster's addresses are A's loopback ones,
    // useless from B's network: only discovery can bring the siblings together.
    for d in [da, db, da] {
        ok(
            a,
            "edge-node",
            &["--data", d, "sync", "--once", "--listen", "127.0.0.1:0"],
        )?;
    }
    let mut run_a = spawn(
        a,
        "edge-node",
        &[
            "--data",
            da,
            "run",
            "--listen",
            "0.0.0.0:7450",
            "--http",
            "127.0.0.1:0",
        ],
        &tmp.join("a.log"),
    )?;
    let _run_b = spawn(
        b,
        "edge-node",
        &[
            "--data",
            db,
            "run",
            "--listen",
            "0.0.0.0:7450",
            "--http",
            "127.0.0.1:0",
        ],
        &tmp.join("b.log"),
    )?;
    let logs = || {
        format!(
            "a: {}\nb: {}",
            std::fs::read_to_string(tmp.join("a.log")).unwrap_or_default(),
            std::fs::read_to_string(tmp.join("b.log")).unwrap_or_default()
        )
    };
    // Each sees the other on the LAN.
    if !wait_until(Duration::from_secs(30), || {
        sees(b, &dev_b).as_deref() == Some("10.77.0.1:7450")
            && sees(a, &dev_a).as_deref() == Some("10.77.0.2:7450")
    }) {
        bail!(
            "the siblings did not see each other: a {:?} b {:?}\n{}",
            status(a, &dev_a).ok(),
            status(b, &dev_b).ok(),
            logs()
        );
    }

    // B's visits reach the hub through A; B has no route to the hub and no --peer.
    scan(b, &dev_b, &tmp, 3)?;
    if !wait_until(Duration::from_secs(90), || hub_records(a, &hub) >= 3) {
        bail!(
            "B's visits did not reach the hub: {}\n{}",
            hub_records(a, &hub),
            logs()
        );
    }
    let sb = status(b, &dev_b)?;
    assert!(
        sb["siblings"][0]["last_reached"].as_u64().is_some(),
        "B's status says when it reached A: {sb}"
    );

    // B's address changes.
    ip(&["-n", b, "addr", "del", "10.77.0.2/24", "dev", "lan0"])?;
    ip(&["-n", b, "addr", "add", "10.77.0.3/24", "dev", "lan0"])?;
    let _ = ip(&["-n", b, "route", "add", "224.0.0.0/4", "dev", "lan0"]);
    if !wait_until(Duration::from_secs(30), || {
        sees(a, &dev_a).as_deref() == Some("10.77.0.3:7450")
    }) {
        bail!(
            "A did not see B's new address: {:?}\n{}",
            status(a, &dev_a).ok(),
            logs()
        );
    }
    scan(b, &dev_b, &tmp, 2)?;
    if !wait_until(Duration::from_secs(90), || hub_records(a, &hub) >= 5) {
        bail!(
            "B's later visits did not reach the hub: {}\n{}",
            hub_records(a, &hub),
            logs()
        );
    }

    // One round of A (its run stopped) reaches B at the address discovery stored.
    run_a.kill();
    let out = output(a, "edge-node", &["--data", da, "sync", "--once", "--json"])?;
    let reports = String::from_utf8_lossy(&out.stdout).into_owned();
    let b_id = status(b, &dev_b)?["device_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let reached_b = reports
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|r| r["peer"] == b_id.as_str() && r["ok"] == true);
    if !reached_b {
        bail!(
            "A's round did not reach B at its new address: {reports}\n{}",
            logs()
        );
    }
    let sa = status(a, &dev_a)?;
    assert!(
        sa["siblings"][0]["last_reached"].as_u64().is_some(),
        "A's status says when it reached B: {sa}"
    );
    assert_eq!(sa["siblings"][0]["lan_addrs"][0], "10.77.0.3:7450", "{sa}");
    Ok(())
}
