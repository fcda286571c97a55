//! The hub's key material, kept apart from its database in `keys/`.
//!
//! - `keys/endpoint.key`: the 32-byte iroh secret key (the hub's identity on the wire).
//! - `keys/day-ratchet.key`: 36 bytes, the oldest live day (u32 big-endian) and the ratchet
//!   seed for it. Advancing the ratchet overwrites this file in place and syncs it, so the
//!   seeds of expired days are gone from the file (on a copy-on-write or journaling
//!   filesystem an old block may survive; put `keys/` on a plain filesystem or tmpfs-backed
//!   secure storage in production).
//! - `keys/audit.key`: 32 random bytes, the key of the audit chain, its details' commitments
//!   and its head file (`crate::audit`). Without it nobody can forge a link of the chain.
//! - `keys/credential.key`: 32 random bytes, the key of the people's credential digests
//!   (`crate::auth`). Without it a row written into `hub.redb` authenticates nobody.
//!
//! Without these files, `hub.redb` reveals nothing: every envelope and index entry in it is
//! sealed under keys derived from the day secrets.
//!
//! The two 32-byte keys are made at `init`. A data folder made before they existed gets them
//! when its store is first opened: the key is written as `NAME.new` first, the store's rows are
//! moved to the keyed layout with it, and only then is it renamed to `NAME`, so a crash in
//! between resumes with the same key (see [`KeyDir::stage`]).

use rand_core::{OsRng, RngCore};
use shared::Day;
use shared::daykey::DayKeyRatchet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Key files could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// IO on a key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key that keyed stored data is gone.
    #[error(
        "key file {0} is missing although data in hub.redb was keyed with it; restore it from the operator's backup"
    )]
    Missing(String),
    /// A key file has the wrong size or content.
    #[error(
        "key file {0} is damaged (wrong length or content); restore it from the operator's backup"
    )]
    Damaged(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The folder of key files inside a hub data folder.
pub struct KeyDir {
    dir: PathBuf,
}

/// One of the 32-byte secrets in `keys/` that key data inside `hub.redb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacKeyFile {
    /// `keys/audit.key`.
    Audit,
    /// `keys/credential.key`.
    Credential,
}

impl MacKeyFile {
    fn name(self) -> &'static str {
        match self {
            MacKeyFile::Audit => "audit.key",
            MacKeyFile::Credential => "credential.key",
        }
    }
}

/// 32 secret bytes from `keys/`; every use derives its own key from them by context.
#[derive(Clone)]
pub struct MacKey([u8; 32]);

impl MacKey {
    /// The key for one purpose (`blake3::derive_key(context, secret)`).
    pub fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0)
    }

    /// A key from bytes (tests).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MacKey(bytes)
    }
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(<hidden>)")
    }
}

impl Drop for MacKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    write_file(path, bytes, true)
}

/// Writes a file owner-only (0600) and syncs it; `new` refuses to replace an existing one.
fn write_file(path: &Path, bytes: &[u8], new: bool) -> Result<(), KeyError> {
    let mut opts = OpenOptions::new();
    if new {
        opts.write(true).create_new(true);
    } else {
        opts.write(true).create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn read_exact<const N: usize>(path: &Path) -> Result<[u8; N], KeyError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(io(path))?;
    buf.try_into()
        .map_err(|_| KeyError::Damaged(path.display().to_string()))
}

impl KeyDir {
    /// The key folder of hub data folder `data`.
    pub fn new(data: &Path) -> Self {
        KeyDir {
            dir: data.join("keys"),
        }
    }

    fn endpoint_path(&self) -> PathBuf {
        self.dir.join("endpoint.key")
    }

    fn ratchet_path(&self) -> PathBuf {
        self.dir.join("day-ratchet.key")
    }

    /// Creates fresh key material; refuses to overwrite existing keys.
    pub fn create(&self, oldest: Day) -> Result<iroh::SecretKey, KeyError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let secret = iroh::SecretKey::from_bytes(&seed);
        write_new(&self.endpoint_path(), &secret.to_bytes())?;
        let ratchet = DayKeyRatchet::generate(&mut OsRng, oldest);
        write_new(&self.ratchet_path(), ratchet.to_bytes().as_slice())?;
        for which in [MacKeyFile::Audit, MacKeyFile::Credential] {
            let mut key = [0u8; 32];
            OsRng.fill_bytes(&mut key);
            write_new(&self.dir.join(which.name()), &key)?;
            zeroize::Zeroize::zeroize(&mut key);
        }
        Ok(secret)
    }

    /// The folder itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A 32-byte key, if its file exists.
    pub fn mac_key(&self, which: MacKeyFile) -> Result<Option<MacKey>, KeyError> {
        let path = self.dir.join(which.name());
        match read_exact::<32>(&path) {
            Ok(b) => Ok(Some(MacKey(b))),
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The key to move a store without it to the keyed layout: `NAME.new` if an interrupted
    /// upgrade left one, else a fresh one written there (owner-only, synced, renamed into
    /// place whole). [`KeyDir::commit_staged`] makes it `NAME` once the store uses it.
    pub fn stage(&self, which: MacKeyFile) -> Result<MacKey, KeyError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let staged = self.dir.join(format!("{}.new", which.name()));
        match read_exact::<32>(&staged) {
            Ok(b) => return Ok(MacKey(b)),
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        let tmp = self.dir.join(format!("{}.new.tmp", which.name()));
        write_file(&tmp, &key, false)?;
        fs::rename(&tmp, &staged).map_err(io(&staged))?;
        self.sync_dir()?;
        Ok(MacKey(key))
    }

    /// Whether an interrupted upgrade left a staged key (`NAME.new`).
    pub fn has_staged(&self, which: MacKeyFile) -> bool {
        self.dir.join(format!("{}.new", which.name())).exists()
    }

    /// Puts a staged key in place (after the store was moved to the layout it keys).
    pub fn commit_staged(&self, which: MacKeyFile) -> Result<(), KeyError> {
        let path = self.dir.join(which.name());
        let staged = self.dir.join(format!("{}.new", which.name()));
        fs::rename(&staged, &path).map_err(io(&path))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), KeyError> {
        // A rename is durable once its folder is synced; not every platform can open one.
        #[cfg(unix)]
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    /// The hub's iroh secret key.
    pub fn endpoint_secret(&self) -> Result<iroh::SecretKey, KeyError> {
        let b: [u8; 32] = read_exact(&self.endpoint_path())?;
        Ok(iroh::SecretKey::from_bytes(&b))
    }

    /// The day-key ratchet as stored.
    pub fn ratchet(&self) -> Result<DayKeyRatchet, KeyError> {
        let path = self.ratchet_path();
        let b: [u8; 36] = read_exact(&path)?;
        DayKeyRatchet::from_bytes(&b).map_err(|_| KeyError::Damaged(path.display().to_string()))
    }

    /// Stores an advanced ratchet by overwriting the file in place, then syncing it.
    pub fn store_ratchet(&self, ratchet: &DayKeyRatchet) -> Result<(), KeyError> {
        let path = self.ratchet_path();
        let mut f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        f.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        f.write_all(ratchet.to_bytes().as_slice())
            .map_err(io(&path))?;
        f.sync_all().map_err(io(&path))
    }
}
