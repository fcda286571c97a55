//! The regional hub: enrolls facilities and devices, merges their logs, answers traces,
//! serves the local government's administration, and enforces retention.
//!
//! This crate is the shell around `shared`: it owns the redb store, the key files, the iroh
//! endpoint and HTTP, and reads the clock in one place ([`clock`]). Rules live in `shared`.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod control;
pub mod daemon;
pub mod gov;
pub mod http;
pub mod keys;
pub mod ledger;
pub mod people;
pub mod store;
pub mod trace;

pub use admin::{Hub, HubConfig, HubError};
