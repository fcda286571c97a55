//! Owner-only files: everything a binary creates, and the data folder it opens, is readable
//! by its owner alone.
//!
//! A device's data folder holds the endpoint key, an unused ticket credential and the staff
//! PIN's hash; a hub's holds `hub.redb`, the key files of `keys/` and the authority's identity
//! until it is moved. Under an ordinary umask (022) redb and `std::fs` create files 0644,
//! readable by every local user. The process's umask is set to 077 before anything is created, and a folder
//! written by an earlier release (or copied in with loose modes) is tightened when opened.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Sets the umask to 077 and tightens `data`, if it exists: the folder and every folder under
/// it 0700, every file 0600. A file that cannot be tightened is reported, not fatal: the
/// command may still be a read-only one, and the warning says what to fix.
pub fn restrict(data: &Path) {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    tighten(data, 0);
}

/// How deep the walk goes: the data folder and `keys/` are all there is.
const MAX_DEPTH: usize = 3;

fn tighten(path: &Path, depth: usize) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    let want = if meta.is_dir() {
        0o700
    } else if meta.is_file() {
        0o600
    } else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0
        && let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(mode & want))
    {
        tracing::warn!(path = %path.display(), error = %e,
            "cannot make this owner-only; run `chmod go-rwx` on it");
    }
    if meta.is_dir()
        && depth < MAX_DEPTH
        && let Ok(entries) = fs::read_dir(path)
    {
        for entry in entries.flatten() {
            tighten(&entry.path(), depth + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_folders_and_files_become_owner_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        fs::create_dir_all(data.join("keys")).expect("mkdir");
        fs::write(data.join("store.redb"), b"x").expect("write");
        fs::write(data.join("keys/secret"), b"x").expect("write");
        for p in [&data, &data.join("keys")] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        for p in [data.join("store.redb"), data.join("keys/secret")] {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        tighten(&data, 0);
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("keys")), 0o700);
        assert_eq!(mode(&data.join("store.redb")), 0o600);
        assert_eq!(mode(&data.join("keys/secret")), 0o600);
    }
}
