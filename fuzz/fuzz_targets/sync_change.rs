//! Fuzzes the validator of peers' automerge sync messages (`shared::sync::validate`): it must
//! never panic, and whatever it accepts automerge must decode and apply as checked.
//!
//! Run: `cargo +nightly fuzz run sync_change`. The same driver runs over seeded random and
//! mutated messages in `shared/tests/validate.rs` on every `cargo test`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shared::sync::validate::fuzz_sync_change(data);
});
