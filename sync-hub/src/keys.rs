//! The hub's key material, kept apart from its database in `keys/`.
//!
//! - `keys/endpoint.key`: the 32-byte iroh secret key (the hub's identity on the wire).
//! - `keys/day-ratchet.key`: 36 bytes, the oldest live day (u32 big-endian) and the ratchet
//!   seed for it. Advancing the ratchet overwrites this file in place and syncs it, so the
//!   seeds of expired days are gone from the file (on a copy-on-write or journaling
//!   filesystem an old block may survive; put `keys/` on a plain filesystem or tmpfs-backed
//!   secure storage in production).
//!
//! Without these files, `hub.redb` reveals nothing: every envelope and index entry in it is
//! sealed under keys derived from the day secrets.

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

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
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
        Ok(secret)
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
