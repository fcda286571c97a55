//! What both binaries need of the machine they run on, and nothing else: owner-only files
//! ([`private_files`]), personal data and PINs read from stdin rather than the command line
//! ([`secret_input`]), waiting for a store another process holds ([`store_lock`]) and logs on
//! stderr as text or JSON lines ([`logging`]).
//!
//! It lives apart from `shared`, which never does IO, so that `edge-node` and `sync-hub` call
//! one copy of these rules instead of each keeping its own.

pub mod logging;
pub mod private_files;
pub mod secret_input;
pub mod store_lock;
pub mod watchdog;
