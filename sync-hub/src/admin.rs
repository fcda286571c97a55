//! The registry's former module path. The registry (hub settings, facilities, devices) is
//! [`crate::registry`] and the administrative commands are [`crate::commands`]; these names
//! stay for code written against the old path. It is in the registry's layer
//! (`tests/layers.rs`).

pub use crate::registry::{DAY_KEYS_AHEAD, DEFAULT_PORT, Hub, HubConfig, HubError};
