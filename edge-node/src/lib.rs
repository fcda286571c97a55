//! The edge node's library: everything the `edge-node` binary runs, testable in-process.
//!
//! It is the shell around `shared` at one entrance device: camera frames ([`frame`]), the
//! redb store ([`store`]), the check-in path ([`device`]) and the clock ([`clock`]).

pub mod clock;
pub mod control;
pub mod daemon;
pub mod device;
pub mod frame;
pub mod kiosk;
pub mod lan;
pub mod net;
pub mod pin_guard;
pub mod replica;
pub mod store;
