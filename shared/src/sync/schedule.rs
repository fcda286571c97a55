//! When a device syncs: one policy, run by `edge-node run` and by the simulation alike.
//!
//! A session costs kilobytes of QUIC handshake and summaries however little it carries, and a
//! hotspot is metered, so a device syncs with its hub only when it has something to send
//! (records the hub has not taken) or once a day for the hub's refresh (day keys, issuer
//! keyring, roster). Records that arrive close together travel together: a round starts
//! [`COALESCE_MS`] after the first of them and at least [`MIN_GAP_MS`] after the previous
//! round. While the hub cannot be reached the device backs off exponentially (with the
//! caller's jitter) up to [`BACKOFF_MAX_MS`], and hands records the hub has not taken to a
//! sibling once per change (relay), not once per attempt.
//!
//! The schedule is pure: time comes in as milliseconds of a clock the caller picks (a
//! monotonic one in the daemon, simulated time in the simulation). A change that arrives
//! while a round runs is never lost: each round is started with [`Schedule::begin`] and
//! clears only what was there when it began.

/// After the first new record, how long to wait for the rest of a queue at the door.
pub const COALESCE_MS: u64 = 1_500;
/// The shortest time between two rounds that carry new records: a busy door sends a session
/// every 30 s at most, not one per visitor. The first round after a quiet spell (or after the
/// start, or the daily refresh) is not held back.
pub const MIN_GAP_MS: u64 = 30_000;
/// How often a device with nothing to send syncs anyway, for the hub's refresh.
pub const REFRESH_EVERY_MS: u64 = 24 * 3_600 * 1_000;
/// The first wait after a failed round.
pub const BACKOFF_FIRST_MS: u64 = 1_000;
/// The longest wait between attempts while the hub cannot be reached: every attempt sends a
/// padded QUIC Initial (1,200 B) and its retransmissions, which a metered link pays for.
pub const BACKOFF_MAX_MS: u64 = 300_000;

/// What the device should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing before this time (unless a change arrives).
    Wait {
        /// The clock's time of the next step.
        until_ms: u64,
    },
    /// Run a session with the hub.
    SyncHub,
}

/// A round in progress: what it may clear when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "pass the ticket to hub_done or relay_done"]
pub struct Ticket {
    generation: u64,
    /// Whether the round carries records that arrived while this schedule ran.
    carries: bool,
}

/// One device's sync schedule. See the module docs.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Holds records the hub has not taken.
    unsent: bool,
    /// Holds records that neither the hub nor a sibling took since they arrived.
    unrelayed: bool,
    /// Failed hub rounds in a row.
    failures: u32,
    /// Bumped by every change, so a round clears only what it carried.
    generation: u64,
    last_round_ms: Option<u64>,
    due_ms: u64,
}

impl Schedule {
    /// A device starting at `now_ms`: its first round is due at once (it may hold records
    /// from before a restart, and its refresh may be old).
    pub fn new(now_ms: u64) -> Schedule {
        Schedule {
            unsent: true,
            unrelayed: true,
            failures: 0,
            generation: 0,
            last_round_ms: None,
            due_ms: now_ms,
        }
    }

    /// The device gained records the hub has not taken: a scan, or a sibling's hand-over.
    pub fn changed(&mut self, now_ms: u64) {
        self.generation = self.generation.wrapping_add(1);
        self.unsent = true;
        self.unrelayed = true;
        if self.failures > 0 {
            // The hub did not answer: the backoff's time stands, so a busy door on a dead
            // link does not turn every scan into a connection attempt.
            return;
        }
        let after_gap = self
            .last_round_ms
            .map_or(0, |t| t.saturating_add(MIN_GAP_MS));
        let soon = now_ms.saturating_add(COALESCE_MS).max(after_gap);
        self.due_ms = self.due_ms.min(soon);
    }

    /// Asks for a round now, whatever is due (the `sync` command, a hub address that changed).
    pub fn poke(&mut self, now_ms: u64) {
        self.due_ms = self.due_ms.min(now_ms);
    }

    /// What to do at `now_ms`.
    pub fn next(&self, now_ms: u64) -> Step {
        if now_ms >= self.due_ms {
            Step::SyncHub
        } else {
            Step::Wait {
                until_ms: self.due_ms,
            }
        }
    }

    /// A round starts: the ticket remembers which changes it can carry.
    pub fn begin(&self) -> Ticket {
        Ticket {
            generation: self.generation,
            carries: self.unsent && self.generation > 0,
        }
    }

    /// The hub round of `ticket` ended at `now_ms`. `jitter` in `0.5..=1.0` (the caller's
    /// randomness) spreads the retries of devices that lost their hub together.
    pub fn hub_done(&mut self, ticket: Ticket, now_ms: u64, ok: bool, jitter: f64) {
        if ticket.carries {
            self.last_round_ms = Some(now_ms);
        }
        if ok {
            self.failures = 0;
            if ticket.generation == self.generation {
                self.unsent = false;
                self.unrelayed = false;
                self.due_ms = now_ms.saturating_add(REFRESH_EVERY_MS);
            } else {
                // Records arrived during the round: they go in the next one.
                self.due_ms = now_ms.saturating_add(MIN_GAP_MS);
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.due_ms = now_ms.saturating_add(backoff_ms(self.failures, jitter));
        }
    }

    /// Whether the device should hand its records to a sibling: the hub did not answer and
    /// records arrived since the last hand-over.
    pub fn wants_relay(&self) -> bool {
        self.failures > 0 && self.unrelayed
    }

    /// A sibling took this device's records (`ok`), in the round of `ticket`.
    pub fn relay_done(&mut self, ticket: Ticket, ok: bool) {
        if ok && ticket.generation == self.generation {
            self.unrelayed = false;
        }
    }

    /// Whether the device holds records the hub has not taken, as far as it knows.
    pub fn has_unsent(&self) -> bool {
        self.unsent
    }

    /// Failed hub rounds in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The wait after the `failures`-th failed round in a row: [`BACKOFF_FIRST_MS`] doubling, at
/// most [`BACKOFF_MAX_MS`], times `jitter` (clamped to `0.5..=1.0`).
pub fn backoff_ms(failures: u32, jitter: f64) -> u64 {
    let doublings = failures.saturating_sub(1).min(20);
    let base = BACKOFF_FIRST_MS
        .saturating_mul(1u64 << doublings)
        .min(BACKOFF_MAX_MS);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.5, 1.0)
    } else {
        1.0
    };
    // base <= BACKOFF_MAX_MS, far inside f64's exact integers.
    (base as f64 * jitter) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_device_syncs_once_a_day() {
        let mut s = Schedule::new(0);
        assert_eq!(s.next(0), Step::SyncHub);
        let t = s.begin();
        s.hub_done(t, 100, true, 1.0);
        assert!(!s.has_unsent());
        assert_eq!(
            s.next(101),
            Step::Wait {
                until_ms: 100 + REFRESH_EVERY_MS
            }
        );
        assert_eq!(s.next(100 + REFRESH_EVERY_MS), Step::SyncHub);
    }

    #[test]
    fn a_scan_is_sent_after_the_coalescing_wait_and_the_gap() {
        let mut s = Schedule::new(0);
        let t = s.begin();
        s.hub_done(t, 1_000, true, 1.0);
        // The start's round carried no scan: the first scan only waits for the queue.
        s.changed(2_000);
        assert_eq!(
            s.next(2_000),
            Step::Wait {
                until_ms: 2_000 + COALESCE_MS
            }
        );
        let t = s.begin();
        s.hub_done(t, 4_000, true, 1.0);
        // That round carried a scan: the next one waits for the gap.
        s.changed(5_000);
        assert_eq!(
            s.next(5_000),
            Step::Wait {
                until_ms: 4_000 + MIN_GAP_MS
            }
        );
        s.changed(100_000);
        assert_eq!(s.next(4_000 + MIN_GAP_MS), Step::SyncHub);
    }

    #[test]
    fn a_change_during_a_round_is_not_cleared_by_it() {
        let mut s = Schedule::new(0);
        s.changed(10);
        let t = s.begin();
        s.changed(50);
        s.hub_done(t, 100, true, 1.0);
        assert!(s.has_unsent());
        assert_eq!(
            s.next(100),
            Step::Wait {
                until_ms: 100 + MIN_GAP_MS
            }
        );
    }

    #[test]
    fn failures_back_off_and_relay_once_per_change() {
        let mut s = Schedule::new(0);
        s.changed(0);
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let t = s.begin();
            s.hub_done(t, now, false, 1.0);
            let Step::Wait { until_ms } = s.next(now) else {
                panic!("a failed round must wait");
            };
            waits.push(until_ms - now);
            now = until_ms;
        }
        assert_eq!(waits[0], BACKOFF_FIRST_MS);
        assert_eq!(waits[1], 2 * BACKOFF_FIRST_MS);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap_or(&0), BACKOFF_MAX_MS);
        assert!(s.wants_relay());
        let t = s.begin();
        s.relay_done(t, true);
        assert!(!s.wants_relay(), "handed over: no relay until a new change");
        assert!(s.has_unsent(), "the hub still has not taken them");
        // A scan during the backoff does not shorten it, but asks for a relay again.
        let before = s.next(now);
        s.changed(now);
        assert_eq!(s.next(now), before);
        assert!(s.wants_relay());
    }

    #[test]
    fn backoff_is_bounded_for_any_input() {
        for f in [0, 1, 2, 5, 30, u32::MAX] {
            for j in [f64::NAN, -1.0, 0.0, 0.5, 0.75, 1.0, 7.0, f64::INFINITY] {
                let b = backoff_ms(f, j);
                assert!(b <= BACKOFF_MAX_MS, "{f} {j}: {b}");
                assert!(b >= BACKOFF_FIRST_MS / 2, "{f} {j}: {b}");
            }
        }
    }
}
