//! Support for the multi-process tests: locating the built binaries, a throw-away hub with
//! enrolled devices, a test issuer, and generated camera frames.
//!
//! Everything runs on loopback in temporary folders; every child process is reaped.

pub mod baseline;
pub mod browser;
pub mod fixture;
pub mod frames;
pub mod measure;
pub mod people;
pub mod photos;
pub mod rogue;
