//! The systemd units in `deploy/systemd/` pass `systemd-analyze verify`: every key known, every
//! value parsed, the binaries they start present and executable (in a temporary copy whose
//! `ExecStart` names the debug binaries this workspace built). Skipped, saying so, only on a
//! machine without `systemd-analyze` (`.ci/run` installs it).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use tests::fixture::bin;

const UNITS: [(&str, &str); 2] = [
    ("kipass-sync-hub.service", "sync-hub"),
    ("kipass-edge-node.service", "edge-node"),
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn systemd_analyze() -> Option<PathBuf> {
    ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Copies the units into `dir` with `/usr/local/bin/<binary>` replaced by the built binary.
fn copy_units(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (unit, binary) in UNITS {
        let text = std::fs::read_to_string(deploy_dir().join("systemd").join(unit))
            .with_context(|| format!("cannot read deploy/systemd/{unit}"))?;
        let installed = format!("/usr/local/bin/{binary}");
        if !text.contains(&format!("ExecStart={installed} ")) {
            bail!("{unit} does not start {installed}");
        }
        let built = bin(binary);
        if !built.exists() {
            bail!(
                "{} is missing: run `cargo build -p edge-node -p sync-hub --bins` first",
                built.display()
            );
        }
        let path = dir.join(unit);
        std::fs::write(
            &path,
            text.replace(&installed, &built.display().to_string()),
        )?;
        out.push(path);
    }
    Ok(out)
}

/// Runs `systemd-analyze verify` on `units`; returns its exit success and everything it said.
fn verify(analyze: &Path, units: &[PathBuf]) -> Result<(bool, String)> {
    let out = Command::new(analyze)
        .arg("verify")
        .args(units)
        // Offline: a container without systemd as PID 1 verifies files just the same.
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .context("cannot run systemd-analyze")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), said))
}

/// Lines of `said` about one of `units` (warnings such as "Unknown key ..., ignoring" name the
/// file and still exit 0).
fn complaints(said: &str, units: &[PathBuf]) -> Vec<String> {
    said.lines()
        .filter(|l| {
            UNITS.iter().any(|(u, _)| l.contains(u))
                || units.iter().any(|p| l.contains(&p.display().to_string()))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn units_pass_systemd_analyze_verify() -> Result<()> {
    let Some(analyze) = systemd_analyze() else {
        println!(
            "SKIPPED: systemd-analyze is not installed (Debian package `systemd`), so the units in deploy/systemd are not verified"
        );
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let units = copy_units(tmp.path())?;
    let (ok, said) = verify(&analyze, &units)?;
    let bad = complaints(&said, &units);
    assert!(ok && bad.is_empty(), "systemd-analyze verify: {said}");

    // The check sees a mistake: an unknown key, a value that does not parse, a binary that is
    // not there.
    for (from, to) in [
        ("ProtectHome=yes", "ProtectHom=yes"),
        ("RestrictRealtime=yes", "RestrictRealtime=maybe"),
        (
            &format!("ExecStart={}", bin("sync-hub").display()) as &str,
            "ExecStart=/nonexistent/sync-hub",
        ),
    ] {
        let broken = tmp.path().join("broken");
        std::fs::create_dir_all(&broken)?;
        let unit = broken.join(UNITS[0].0);
        let text = std::fs::read_to_string(&units[0])?;
        assert!(text.contains(from), "{from} is not in the hub's unit");
        std::fs::write(&unit, text.replacen(from, to, 1))?;
        let (ok, said) = verify(&analyze, std::slice::from_ref(&unit))?;
        assert!(
            !ok || !complaints(&said, &[unit]).is_empty(),
            "{to} passed: {said}"
        );
    }
    Ok(())
}

#[test]
fn units_run_owner_only_hardened_services_with_the_data_folder_from_the_environment() -> Result<()>
{
    let sysusers = std::fs::read_to_string(deploy_dir().join("sysusers.d/kipass.conf"))?;
    for (unit, binary) in UNITS {
        let text = std::fs::read_to_string(deploy_dir().join("systemd").join(unit))?;
        let keys: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::trim)
            .collect();
        let has = |line: &str| keys.contains(&line);
        let state = unit.trim_end_matches(".service");
        let data_env = if binary == "sync-hub" {
            "SYNC_HUB_DATA"
        } else {
            "EDGE_NODE_DATA"
        };
        for line in [
            "Restart=on-failure",
            &format!("StateDirectory={state}") as &str,
            "StateDirectoryMode=0700",
            "UMask=0077",
            &format!("Environment={data_env}=%S/{state}"),
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes",
            "SystemCallFilter=@system-service",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        ] {
            assert!(has(line), "{unit} lacks {line}");
        }
        assert!(
            keys.iter()
                .any(|l| l.starts_with(&format!("ExecStart=/usr/local/bin/{binary} run "))),
            "{unit} does not start `{binary} run`"
        );
        let user = keys
            .iter()
            .find_map(|l| l.strip_prefix("User="))
            .with_context(|| format!("{unit} names no user"))?;
        assert!(user != "root", "{unit} runs as root");
        assert!(
            sysusers
                .lines()
                .any(|l| l.split_whitespace().take(2).eq(["u", user])),
            "deploy/sysusers.d/kipass.conf does not create {user}"
        );
    }
    Ok(())
}
