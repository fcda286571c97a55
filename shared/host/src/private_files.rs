//! Owner-only files: everything a binary creates, and the data folder it opens, is readable
//! by its owner alone.
//!
//! A device's data folder holds the endpoint key, an unused ticket credential and the staff
//! PIN's hash; a hub's holds `hub.redb`, the key files of `keys/` and the authority's identity
//! until it is moved. Under an ordinary umask (022) redb and `std::fs` create files 0644,
//! readable by every local user. The process's umask is set to 077 before anything is created, and a folder
//! written by an earlier release (or copied in with loose modes) is tightened when opened.
//!
//! The data folder, or `keys/` inside it, may be a symbolic link (to another disk, to
//! tmpfs-backed secure storage): a link to a folder or file owned by the user running the
//! binary is followed and its target tightened; a link to someone else's folder, to something
//! that is neither folder nor file, or to nothing is left alone and reported. A file that was
//! readable by other users before it was tightened may have been copied: the warning names
//! it, the secret it holds and says to rotate it.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What [`tighten_data_folder`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tightened {
    /// Files that were readable by the group or by every user before they were made
    /// owner-only (the path as found under the data folder).
    pub exposed: Vec<PathBuf>,
    /// What could not be made owner-only, and why, one sentence each.
    pub problems: Vec<String>,
}

impl Tightened {
    /// The advice for [`Tightened::exposed`]: which secrets may have leaked and to rotate
    /// them; `None` if no file was exposed.
    pub fn advice(&self) -> Option<String> {
        if self.exposed.is_empty() {
            return None;
        }
        let list: Vec<String> = self
            .exposed
            .iter()
            .map(|p| format!("{} ({})", p.display(), secret_of(p)))
            .collect();
        Some(format!(
            "these files were readable by other users of this machine until now: {}. They are \
             owner-only now, but assume they were copied: rotate the secrets they hold",
            list.join("; ")
        ))
    }
}

/// What a file of ours holds, and how to rotate it, by its name.
fn secret_of(path: &Path) -> &'static str {
    match path.file_name().and_then(|n| n.to_str()).unwrap_or("") {
        "day-ratchet.key" => {
            "the hub's day secrets: every visit not yet expired can be opened; move the region \
             to a freshly initialised hub"
        }
        "endpoint.key" => "the hub's network identity: a copy can impersonate the hub",
        "audit.key" => "the audit chain key: a copy can forge audit entries",
        "credential.key" => "the key of the people's credentials: reissue every credential",
        "operator.token" => {
            "the local operator token: delete it, `sync-hub run` writes a new one at start"
        }
        "control.token" => "the device's command token: restart `edge-node run` for a new one",
        "authority-identity.txt" => {
            "the health authority's identity: paper entries sealed to it can be opened; make a \
             new one and re-initialise"
        }
        "edge.redb" => {
            "the device's store: its endpoint key, an unused enrollment ticket and the staff \
             PIN's hash; change the staff PIN, revoke the device and enroll it again"
        }
        "hub.redb" => {
            "the hub's store: the registry and credential digests; reissue the people's \
             credentials and revoke unused enrollment tickets"
        }
        _ => "whatever secret it holds",
    }
}

/// Sets the umask to 077 and tightens `data`, if it exists ([`tighten_data_folder`]): the
/// folder and every folder under it 0700, every file 0600. What cannot be tightened is
/// reported, not fatal (the command may still be a read-only one, and the warning says what to
/// fix); files that were readable by others before get the advice to rotate their secrets.
pub fn restrict(data: &Path) -> Tightened {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let found = tighten_data_folder(data);
    for problem in &found.problems {
        tracing::warn!("{problem}");
    }
    if let Some(advice) = found.advice() {
        tracing::warn!("{advice}");
    }
    found
}

/// How deep the walk goes: the data folder and `keys/` are all there is.
const MAX_DEPTH: usize = 3;

/// Tightens `data` and what is under it (symbolic links to what the user owns followed), and
/// says what was exposed and what could not be tightened. Does not touch the umask.
pub fn tighten_data_folder(data: &Path) -> Tightened {
    let mut found = Tightened::default();
    tighten(data, 0, &mut found);
    found
}

/// The metadata of what a symbolic link at `path` leads to, or why it is not followed.
fn follow(path: &Path) -> Result<(PathBuf, fs::Metadata), String> {
    let target = fs::canonicalize(path).map_err(|e| {
        format!(
            "{} is a symbolic link that leads nowhere ({e}): not tightened; point it at a \
             folder of your own",
            path.display()
        )
    })?;
    let meta = fs::metadata(&target).map_err(|e| {
        format!(
            "{} is a symbolic link to {} which cannot be read ({e}): not tightened",
            path.display(),
            target.display()
        )
    })?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "{} is a symbolic link to {}, which belongs to another user (uid {}, not {me}): \
             not tightened, and other users may read what is stored there; point it at a \
             folder of your own",
            path.display(),
            target.display(),
            meta.uid()
        ));
    }
    if !meta.is_dir() && !meta.is_file() {
        return Err(format!(
            "{} is a symbolic link to {}, which is neither a folder nor a file: not tightened",
            path.display(),
            target.display()
        ));
    }
    Ok((target, meta))
}

fn tighten(path: &Path, depth: usize, found: &mut Tightened) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    let (real, meta) = if meta.file_type().is_symlink() {
        match follow(path) {
            Ok(m) => m,
            Err(why) => {
                found.problems.push(why);
                return;
            }
        }
    } else {
        (path.to_owned(), meta)
    };
    let want = if meta.is_dir() {
        0o700
    } else if meta.is_file() {
        0o600
    } else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_file() && mode & 0o044 != 0 {
        found.exposed.push(path.to_owned());
    }
    if mode & 0o077 != 0
        && let Err(e) = fs::set_permissions(&real, fs::Permissions::from_mode(mode & want))
    {
        found.problems.push(format!(
            "cannot make {} owner-only ({e}); run `chmod go-rwx` on it",
            real.display()
        ));
    }
    if meta.is_dir()
        && depth < MAX_DEPTH
        && let Ok(entries) = fs::read_dir(&real)
    {
        // Listed under the name it was found by, so the advice names the data folder's path.
        for entry in entries.flatten() {
            tighten(&path.join(entry.file_name()), depth + 1, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    fn chmod(p: &Path, m: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).expect("chmod");
    }

    /// A loose data folder at `data`: 0755 folders, 0644 files.
    fn loose_folder(data: &Path) {
        fs::create_dir_all(data.join("keys")).expect("mkdir");
        fs::write(data.join("store.redb"), b"x").expect("write");
        fs::write(data.join("keys/day-ratchet.key"), b"x").expect("write");
        for p in [data, &data.join("keys")] {
            chmod(p, 0o755);
        }
        for p in [data.join("store.redb"), data.join("keys/day-ratchet.key")] {
            chmod(&p, 0o644);
        }
    }

    #[test]
    fn loose_folders_and_files_become_owner_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        loose_folder(&data);
        let found = tighten_data_folder(&data);
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("keys")), 0o700);
        assert_eq!(mode(&data.join("store.redb")), 0o600);
        assert_eq!(mode(&data.join("keys/day-ratchet.key")), 0o600);
        assert!(found.problems.is_empty(), "{found:?}");
        // Both files were readable by everyone: the advice names them and says to rotate.
        let advice = found.advice().expect("advice");
        assert!(advice.contains("keys/day-ratchet.key"), "{advice}");
        assert!(advice.contains("day secrets"), "{advice}");
        assert!(advice.contains("store.redb"), "{advice}");
        assert!(advice.contains("rotate"), "{advice}");
        // A second open finds nothing exposed.
        assert_eq!(tighten_data_folder(&data), Tightened::default());
    }

    #[test]
    fn a_symlinked_data_folder_and_keys_folder_are_followed_and_tightened() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = tmp.path().join("disk2/hub");
        loose_folder(&real);
        // `keys/` elsewhere too, linked from the real folder.
        let real_keys = tmp.path().join("secure/keys");
        fs::create_dir_all(&real_keys).expect("mkdir");
        fs::write(real_keys.join("audit.key"), b"k").expect("write");
        chmod(&real_keys, 0o755);
        chmod(&real_keys.join("audit.key"), 0o640);
        fs::remove_dir_all(real.join("keys")).expect("rm");
        std::os::unix::fs::symlink(&real_keys, real.join("keys")).expect("symlink");
        let data = tmp.path().join("data");
        std::os::unix::fs::symlink(&real, &data).expect("symlink");

        let found = tighten_data_folder(&data);
        assert!(found.problems.is_empty(), "{found:?}");
        assert_eq!(mode(&real), 0o700);
        assert_eq!(mode(&real.join("store.redb")), 0o600);
        assert_eq!(mode(&real_keys), 0o700);
        assert_eq!(mode(&real_keys.join("audit.key")), 0o600);
        // The links themselves are still links.
        assert!(
            fs::symlink_metadata(&data)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        let advice = found.advice().expect("advice");
        assert!(advice.contains("data/keys/audit.key"), "{advice}");
        assert!(advice.contains("forge audit entries"), "{advice}");
    }

    #[test]
    fn a_link_to_nothing_or_to_a_device_is_reported_not_followed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        std::os::unix::fs::symlink(tmp.path().join("gone"), &data).expect("symlink");
        let found = tighten_data_folder(&data);
        assert!(found.problems[0].contains("leads nowhere"), "{found:?}");

        let other = tmp.path().join("other");
        std::os::unix::fs::symlink("/dev/null", &other).expect("symlink");
        let before = mode(Path::new("/dev/null"));
        let found = tighten_data_folder(&other);
        assert!(
            found.problems[0].contains("neither a folder nor a file"),
            "{found:?}"
        );
        assert_eq!(mode(Path::new("/dev/null")), before);
    }

    #[test]
    fn a_link_to_another_users_folder_is_left_alone_and_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let theirs = tmp.path().join("theirs");
        fs::create_dir(&theirs).expect("mkdir");
        chmod(&theirs, 0o755);
        let me = rustix::process::geteuid().as_raw();
        let stranger = me.wrapping_add(4242);
        // Only a privileged user can give a folder away; elsewhere this case cannot be built.
        if std::os::unix::fs::chown(&theirs, Some(stranger), None).is_err() {
            return;
        }
        let data = tmp.path().join("data");
        std::os::unix::fs::symlink(&theirs, &data).expect("symlink");
        let found = tighten_data_folder(&data);
        assert!(
            found.problems[0].contains("belongs to another user"),
            "{found:?}"
        );
        assert_eq!(mode(&theirs), 0o755, "someone else's folder was changed");
    }
}
