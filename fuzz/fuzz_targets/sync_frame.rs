//! Fuzzes the sync protocol's frame decoder with arbitrary bytes in arbitrary chunks.
//!
//! Run: `cargo +nightly fuzz run sync_frame`. The same driver runs 100,000 seeded inputs in
//! `shared/tests/sync_fuzz_smoke.rs` on every `cargo test`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shared::sync::harness::fuzz_frame_decoder(data);
});
