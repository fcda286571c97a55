//! The edge node's library: everything the `edge-node` binary runs, testable in-process.
//!
//! It is the shell around `shared` at one entrance device: camera frames ([`frame`]), the
//! redb store ([`store`]), the check-in path ([`device`]) and the clock ([`clock`]).
//! The command line ([`cli`]) lives here too: `main.rs` only parses arguments and calls
//! [`cli::run`].

pub mod cli;
pub mod clock;
pub mod control;
pub mod daemon;
pub mod device;
pub mod frame;
pub mod hub_addrs;
pub mod kiosk;
pub mod lan;
pub mod metrics;
pub mod net;
pub mod pairing;
pub mod pin_guard;
pub mod replica;
pub mod store;
pub mod tls;
