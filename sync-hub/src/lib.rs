//! The regional hub: enrolls facilities and devices, merges their logs, answers traces,
//! serves the local government's administration, and enforces retention.
//!
//! This crate is the shell around `shared`: it owns the redb store, the key files, the iroh
//! endpoint and HTTP, and reads the clock in one place ([`clock`]). Rules live in `shared`.
//!
//! Its modules form layers, each importing only the ones below it (checked by
//! `tests/layers.rs`), each owning its tables:
//!
//! 1. base: [`clock`], [`keys`], [`store`] (the database handle and the settings table),
//!    [`health`] (the latency histogram and the health decision);
//! 2. registry: [`registry`] (hub settings, issuer keys, facilities, devices);
//! 3. ledger: [`ledger`] (visits, sync states, retention);
//! 4. people: [`auth`], [`audit`], [`gov`], [`trace`], [`nation`] (the national trace's
//!    merge of every regional hub's answer, pure), [`people`] (the one table of who may do
//!    what, [`people::PERMISSIONS`]), [`commands`] (administrative commands, typed answers);
//! 5. opening: [`schema`] (opens the store, creates every owner's tables, runs upgrades;
//!    `Hub::init`, `Hub::open`);
//! 6. shells: [`daemon`] (the actor and sync endpoint), [`http`], [`control`], [`cli`].

pub mod ahead;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod control;
pub mod daemon;
pub mod gov;
pub mod health;
pub mod http;
pub mod keys;
pub mod ledger;
pub mod link;
pub mod nation;
pub mod people;
pub mod reads;
pub mod registry;
pub mod replica;
pub mod schema;
pub mod store;
pub mod trace;

pub use registry::{Hub, HubConfig, HubError};
