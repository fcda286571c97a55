//! A QR reader's panic on a frame (rqrr's `Perspective::map` assertion, rqrr issue #54) is
//! caught, read as "no code", counted and logged at debug level: not printed with a backtrace
//! to the device's stderr, once a frame, for whoever holds a crafted picture to the camera.
//! Any other panic still reaches the process's panic hook.
//!
//! A test binary of its own: it replaces the process's panic hook.

use std::sync::atomic::{AtomicUsize, Ordering};

use edge_node::frame::{LadderStep, decode_step, load_luma, reader_panics};

static HOOK_CALLS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn a_readers_panic_on_a_frame_is_counted_not_printed() {
    std::panic::set_hook(Box::new(|_| {
        HOOK_CALLS.fetch_add(1, Ordering::SeqCst);
    }));
    // A real photo of the corpus on which rqrr's own scan panics.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/qr-photos/qrcode-6/7.png"
    );
    let bytes = std::fs::read(path).expect("the photo corpus is part of the repository");
    let luma = load_luma(&bytes).expect("a PNG");
    let before = reader_panics();
    assert_eq!(decode_step(&luma, LadderStep::Plain), None);
    assert!(
        reader_panics() > before,
        "rqrr no longer panics on this frame"
    );
    assert_eq!(
        HOOK_CALLS.load(Ordering::SeqCst),
        0,
        "the reader's panic reached the process's panic hook"
    );
    // A panic outside the readers still does.
    let _ = std::panic::catch_unwind(|| panic!("elsewhere"));
    assert_eq!(HOOK_CALLS.load(Ordering::SeqCst), 1);
}
