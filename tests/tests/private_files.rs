//! Every file the binaries write is owner-only, whatever the umask of whoever runs them
//! (security review: `edge.redb`, `hub.redb`, `authority-identity.txt`, `keys/audit.head` and
//! `--out` exports were created 0644 under an ordinary umask).

use anyhow::Result;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tests::fixture::{HubFixture, check_in_codes, run_ok};

/// Every file and folder under `root` (bounded depth) with its mode.
fn modes(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((p, depth)) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        out.push((p.clone(), meta.permissions().mode() & 0o777));
        if meta.is_dir() && depth < 4 {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    out
}

fn loose(paths: &[(PathBuf, u32)]) -> Vec<String> {
    paths
        .iter()
        .filter(|(_, m)| m & 0o077 != 0)
        .map(|(p, m)| format!("{} {m:o}", p.display()))
        .collect()
}

#[test]
fn every_file_the_binaries_write_is_owner_only_under_a_loose_umask() -> Result<()> {
    // The umask an ordinary shell has: files 0644, folders 0755 unless the binaries fix it.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("north")?;
    let ticket = hub.write_ticket(&hub.facility, "south")?;
    check_in_codes(&dev, 2)?;
    let export = hub.tmp.path().join("exports").join("trace.csv");
    std::fs::create_dir_all(export.parent().unwrap_or(hub.tmp.path()))?;
    run_ok(
        "sync-hub",
        &[
            "--data",
            &hub.data_str(),
            "trace",
            "--token",
            &"00".repeat(16),
            "--case",
            "case-1",
            "--purpose",
            "test",
            "--format",
            "csv",
            "--out",
            export.to_str().unwrap_or_default(),
        ],
    )?;
    let mut all = modes(&hub.data);
    all.extend(modes(&dev));
    all.extend(modes(&ticket));
    all.extend(modes(&export));
    for must in [
        "hub.redb",
        "authority-identity.txt",
        "audit.head",
        "edge.redb",
    ] {
        assert!(
            all.iter().any(|(p, _)| p.ends_with(must)),
            "{must} was not written: {all:?}"
        );
    }
    assert_eq!(loose(&all), Vec::<String>::new(), "readable by others");
    Ok(())
}

#[test]
fn a_folder_written_with_loose_modes_is_tightened_when_opened() -> Result<()> {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    let hub = HubFixture::new()?;
    let dev = hub.enroll_device("north")?;
    // As an earlier release left them.
    for (p, _) in modes(&hub.data).into_iter().chain(modes(&dev)) {
        let m = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m))?;
    }
    run_ok("sync-hub", &["--data", &hub.data_str(), "stats", "--json"])?;
    run_ok(
        "edge-node",
        &[
            "--data",
            dev.to_str().unwrap_or_default(),
            "status",
            "--json",
        ],
    )?;
    let mut all = modes(&hub.data);
    all.extend(modes(&dev));
    assert_eq!(
        loose(&all),
        Vec::<String>::new(),
        "still readable by others"
    );
    Ok(())
}
