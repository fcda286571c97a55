//! The pure core of the offline-first visitor log.
//!
//! Everything here is deterministic: time comes in as a parameter, randomness as an
//! `RngCore`. No module does IO, spawns tasks or reads a clock; `edge-node` and `sync-hub`
//! are the shells that do, and `simulations` drives this same code at regional scale.

pub mod base45;
pub mod daykey;
pub mod device;
pub mod envelope;
pub mod facility;
pub mod hub;
pub mod hub_addr;
pub mod ids;
pub mod lan;
pub mod paper;
pub mod partition;
pub mod revocation;
pub mod sync;
pub mod ticket;
pub mod time;
pub mod token;
pub mod unseal;

pub use ids::{DeviceId, FacilityId, PartitionId, RecordId};
pub use time::{Day, UnixSeconds};
