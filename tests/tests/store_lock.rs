//! `run` started while a short command holds the store (redb lets one process open the file)
//! waits for it, up to a bound, instead of exiting; past the bound it exits with a message
//! that says the store is held. The test process plays the short command by opening the
//! redb file itself. The bound is shortened with `EDGE_NODE_LOCK_WAIT_MS` /
//! `SYNC_HUB_LOCK_WAIT_MS` for the give-up case only.

use anyhow::{Result, bail};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::fixture::{HubFixture, Proc, bin, wait_until};

/// How long the test holds the store before letting go.
const HOLD: Duration = Duration::from_millis(1000);

/// Starts `name --data data run ...args` with stderr to `log`, `env` set if given.
fn start(
    name: &str,
    data: &Path,
    args: &[&str],
    env: Option<(&str, &str)>,
    log: &Path,
) -> Result<Proc> {
    let mut cmd = Command::new(bin(name));
    cmd.arg("--data")
        .arg(data)
        .arg("run")
        .args(args)
        .env_remove("EDGE_NODE_DATA")
        .env_remove("SYNC_HUB_DATA")
        .env_remove("EDGE_NODE_LOCK_WAIT_MS")
        .env_remove("SYNC_HUB_LOCK_WAIT_MS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    Ok(Proc(cmd.spawn()?))
}

/// Holds `store` for [`HOLD`] while `run` starts; `run` must neither exit nor come up
/// meanwhile, and must come up (write `run.json`) once the store is free.
fn waits_for_the_store(name: &str, data: &Path, store: &Path, args: &[&str]) -> Result<()> {
    let run_file = data.join("run.json");
    let _ = std::fs::remove_file(&run_file);
    let log = data.with_extension("run.log");
    let held = redb::Database::open(store)?;
    let mut run = start(name, data, args, None, &log)?;
    let released_at = Instant::now() + HOLD;
    while Instant::now() < released_at {
        if let Some(status) = run.0.try_wait()? {
            let why = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("{name} run exited while the store was held ({status}): {why}");
        }
        assert!(!run_file.exists(), "{name} run came up without the store");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
    let up = wait_until(Duration::from_secs(20), || run_file.exists());
    if !up {
        let why = std::fs::read_to_string(&log).unwrap_or_default();
        bail!("{name} run did not come up after the store was released: {why}");
    }
    assert!(run.0.try_wait()?.is_none(), "{name} run is still running");
    run.kill();
    let _ = std::fs::remove_file(&run_file);
    Ok(())
}

/// Holds `store` past a 300 ms bound: `run` exits non-zero, saying the store is held.
fn gives_up_clearly(name: &str, data: &Path, store: &Path, args: &[&str], env: &str) -> Result<()> {
    let log = data.with_extension("giveup.log");
    let _held = redb::Database::open(store)?;
    let started = Instant::now();
    let mut run = start(name, data, args, Some((env, "300")), &log)?;
    let mut status = None;
    let exited = wait_until(Duration::from_secs(20), || {
        status = run.0.try_wait().ok().flatten();
        status.is_some()
    });
    assert!(exited, "{name} run kept waiting past its bound");
    let status = status.expect("exited");
    assert!(!status.success(), "{name} run failed");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it waited first"
    );
    let err = std::fs::read_to_string(&log)?;
    assert!(
        err.contains("in use by another process") && err.contains("still held after waiting 0.3 s"),
        "{name}: {err}"
    );
    Ok(())
}

#[test]
fn edge_run_waits_for_a_short_command_then_gives_up_clearly() -> Result<()> {
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("door")?;
    let store = dev.join("edge.redb");
    let args = ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"];
    waits_for_the_store("edge-node", &dev, &store, &args)?;
    gives_up_clearly("edge-node", &dev, &store, &args, "EDGE_NODE_LOCK_WAIT_MS")
}

#[test]
fn hub_run_waits_for_a_short_command_then_gives_up_clearly() -> Result<()> {
    let hub = HubFixture::new()?;
    let store = hub.data.join("hub.redb");
    let args = ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"];
    waits_for_the_store("sync-hub", &hub.data, &store, &args)?;
    gives_up_clearly(
        "sync-hub",
        &hub.data,
        &store,
        &args,
        "SYNC_HUB_LOCK_WAIT_MS",
    )
}
