//! Fuzzes the sync session state machine: the input is a script of frames (of every kind,
//! with fields from a small dictionary), raw bytes, admission decisions and stream ends fed
//! to a hub responder or a device initiator holding one small partition.
//!
//! Run: `cargo +nightly fuzz run sync_session`. The same driver runs 100,000 seeded inputs
//! in `shared/tests/sync_fuzz_smoke.rs` on every `cargo test`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::sync::harness::{FuzzFixture, fuzz_session};
use std::sync::OnceLock;

static FIXTURE: OnceLock<FuzzFixture> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    // Building the fixture seals records and runs a sync: do it once per process.
    let fixture = FIXTURE.get_or_init(|| match FuzzFixture::new() {
        Ok(f) => f,
        Err(e) => panic!("the fuzz fixture could not be built: {e}"),
    });
    fuzz_session(fixture, data);
});
