//! Waiting for a store another process holds. redb lets one process open a file at a time;
//! `run` rides out a short command that holds the store at its start instead of exiting.

use std::time::{Duration, Instant};

/// How often a waiting `run` tries the store again.
pub const LOCK_POLL: Duration = Duration::from_millis(100);

/// Calls `open` until it returns anything but an error `busy` accepts, trying every
/// [`LOCK_POLL`] for at most `bound`; then returns the last busy error.
pub fn wait_while_busy<T, E>(
    bound: Duration,
    mut open: impl FnMut() -> Result<T, E>,
    busy: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = Instant::now() + bound;
    loop {
        match open() {
            Err(e) if busy(&e) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(e);
                }
                std::thread::sleep(LOCK_POLL.min(left));
            }
            r => return r,
        }
    }
}
