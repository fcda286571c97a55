//! Wrong-PIN bookkeeping for the kiosk's staff login.
//!
//! The kiosk is served on the facility's LAN, where anyone on the same Wi-Fi can post PINs.
//! One counter for the whole device would let a stranger keep the staff locked out for good
//! with five wrong PINs a minute. So:
//!
//! - **per client address**: [`MAX_PIN_FAILURES`] wrong PINs in a row lock that address for
//!   [`PIN_LOCKOUT`], doubling with each further lockout up to [`MAX_LOCKOUT`]; the right PIN
//!   clears its record. A stranger locks out only themselves.
//! - **a device-wide brake** against guessing from many addresses: after
//!   [`BRAKE_FAILURES`] wrong PINs within [`BRAKE_WINDOW`] from all addresses together, only
//!   addresses that have logged in with the right PIN since the process started (the
//!   staff's tablet) may try; the others are told to wait until the window has room again.
//!
//! A 4-digit PIN (the shortest allowed) then takes months of guessing from a whole subnet
//! rather than minutes. The state lives in memory and dies with the process, like the staff
//! sessions; time is passed in, so the rules are tested without waiting.
//!
//! **An attempt is counted before its PIN is hashed.** Checking the allowance, hashing the PIN
//! (argon2id, tens of milliseconds) and only then recording the failure let 300 wrong PINs sent
//! at once from one address have 128 evaluated: all of them passed the check before the first
//! failure was written. So [`PinGuard::reserve`] admits an attempt and records it as a wrong
//! PIN in the same step, under the caller's lock; only [`PinGuard::succeeded`], for the right
//! PIN, takes it back. Attempts in flight therefore use up the allowance like failures do, at
//! most [`MAX_PIN_FAILURES`] PINs are ever evaluated per address per lockout, however they are
//! timed and however slow the hash, and an attempt whose request is dropped halfway (the
//! client hung up) stays counted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Wrong PINs in a row from one address before that address is locked.
pub const MAX_PIN_FAILURES: u32 = 5;
/// How long an address is locked the first time; each further lockout doubles it.
pub const PIN_LOCKOUT: Duration = Duration::from_secs(60);
/// The longest lockout of one address.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(3600);
/// Wrong PINs from all addresses together within [`BRAKE_WINDOW`] before only trusted
/// addresses may try.
pub const BRAKE_FAILURES: usize = 50;
/// The window of the device-wide brake.
pub const BRAKE_WINDOW: Duration = Duration::from_secs(3600);
/// Addresses remembered as trusted (logged in with the right PIN) at most.
const MAX_TRUSTED: usize = 64;

/// Why a login attempt may not be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This address is locked for this long.
    Locked(Duration),
    /// Too many wrong PINs from everywhere; this untrusted address may try again in this long.
    Brake(Duration),
}

impl Refusal {
    /// How long to wait, rounded up to whole seconds.
    pub fn retry_after_secs(self) -> u64 {
        let d = match self {
            Refusal::Locked(d) | Refusal::Brake(d) => d,
        };
        d.as_secs() + u64::from(d.subsec_nanos() > 0)
    }
}

/// The outcome of a wrong PIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// This many attempts are left before the address locks.
    AttemptsLeft(u32),
    /// The address is now locked for this long.
    Locked(Duration),
}

#[derive(Debug, Default)]
struct AddrRecord {
    failures: u32,
    lockouts: u32,
    locked_until: Option<Instant>,
    last: Option<Instant>,
}

/// Wrong-PIN state of one device's kiosk.
#[derive(Debug, Default)]
pub struct PinGuard {
    by_addr: HashMap<IpAddr, AddrRecord>,
    recent: VecDeque<Instant>,
    trusted: HashSet<IpAddr>,
}

/// An admitted PIN attempt, already counted as a wrong PIN (see the module doc): hand it to
/// [`PinGuard::succeeded`] if the PIN was right, or to [`Attempt::wrong`] for what to tell
/// the client if it was not. Dropping it leaves the failure counted.
#[must_use = "an attempt counts as a wrong PIN unless PinGuard::succeeded takes it back"]
#[derive(Debug, PartialEq, Eq)]
pub struct Attempt {
    addr: IpAddr,
    at: Instant,
    if_wrong: Failure,
}

impl Attempt {
    /// The PIN was wrong: what that did to the address (already recorded at reservation).
    pub fn wrong(self) -> Failure {
        self.if_wrong
    }
}

impl PinGuard {
    /// Whether `addr` may try a PIN at `now`, without reserving anything: a cheap early
    /// refusal. Only [`PinGuard::reserve`] admits an attempt.
    pub fn check(&mut self, addr: IpAddr, now: Instant) -> Result<(), Refusal> {
        let addr = addr.to_canonical();
        self.prune(now);
        if let Some(until) = self.by_addr.get(&addr).and_then(|r| r.locked_until)
            && until > now
        {
            return Err(Refusal::Locked(until - now));
        }
        if self.recent.len() >= BRAKE_FAILURES && !self.trusted.contains(&addr) {
            // The oldest failure in the window leaves it first.
            let oldest = self.recent.front().copied().unwrap_or(now);
            return Err(Refusal::Brake(
                (oldest + BRAKE_WINDOW).saturating_duration_since(now),
            ));
        }
        Ok(())
    }

    /// Admits one PIN attempt from `addr` at `now` and counts it as a wrong PIN at once, so
    /// that attempts still being checked use up the allowance; or says why it may not be
    /// made. The `MAX_PIN_FAILURES`-th attempt in a row locks the address straight away.
    pub fn reserve(&mut self, addr: IpAddr, now: Instant) -> Result<Attempt, Refusal> {
        self.check(addr, now)?;
        let addr = addr.to_canonical();
        self.recent.push_back(now);
        let record = self.by_addr.entry(addr).or_default();
        record.last = Some(now);
        record.failures += 1;
        let if_wrong = if record.failures < MAX_PIN_FAILURES {
            Failure::AttemptsLeft(MAX_PIN_FAILURES - record.failures)
        } else {
            record.failures = 0;
            record.lockouts = record.lockouts.saturating_add(1);
            let doublings = record.lockouts.saturating_sub(1).min(16);
            let lockout = PIN_LOCKOUT.saturating_mul(1 << doublings).min(MAX_LOCKOUT);
            record.locked_until = Some(now + lockout);
            Failure::Locked(lockout)
        };
        Ok(Attempt {
            addr,
            at: now,
            if_wrong,
        })
    }

    /// The attempt's PIN was right: its address's record is cleared (with any lockout that
    /// attempts still in flight caused), its failure leaves the device-wide window, and the
    /// address is trusted from now on.
    pub fn succeeded(&mut self, attempt: Attempt) {
        let addr = attempt.addr;
        if let Some(i) = self.recent.iter().rposition(|t| *t == attempt.at) {
            self.recent.remove(i);
        }
        self.by_addr.remove(&addr);
        if self.trusted.len() >= MAX_TRUSTED && !self.trusted.contains(&addr) {
            // Forget an arbitrary one: a kiosk has a handful of staff tablets.
            if let Some(old) = self.trusted.iter().next().copied() {
                self.trusted.remove(&old);
            }
        }
        self.trusted.insert(addr);
    }

    /// Forgets everything (the PIN changed).
    pub fn reset(&mut self) {
        *self = PinGuard::default();
    }

    /// Drops failures older than the brake's window, and address records neither used nor
    /// locked within it (so memory stays bounded: the brake caps new failures). A lockout
    /// counts until a window after it ends: a record forgotten as its hour-long lockout ran
    /// out would start the next one at a minute again.
    fn prune(&mut self, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= BRAKE_WINDOW)
        {
            self.recent.pop_front();
        }
        self.by_addr.retain(|_, r| {
            r.locked_until
                .is_some_and(|u| now.saturating_duration_since(u) < BRAKE_WINDOW)
                || r.last
                    .is_some_and(|t| now.saturating_duration_since(t) < BRAKE_WINDOW)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier, Mutex};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// One wrong PIN from `addr` at `t`, admitted.
    fn wrong(g: &mut PinGuard, addr: IpAddr, t: Instant) -> Failure {
        g.reserve(addr, t).expect("the attempt is admitted").wrong()
    }

    #[test]
    fn a_stranger_locks_out_only_themselves_and_longer_each_time() {
        let mut g = PinGuard::default();
        let t0 = Instant::now();
        let (tablet, stranger) = (ip("192.168.0.10"), ip("192.168.0.66"));
        for left in (1..MAX_PIN_FAILURES).rev() {
            assert_eq!(g.check(stranger, t0), Ok(()));
            assert_eq!(wrong(&mut g, stranger, t0), Failure::AttemptsLeft(left));
        }
        assert_eq!(wrong(&mut g, stranger, t0), Failure::Locked(PIN_LOCKOUT));
        assert_eq!(g.check(stranger, t0), Err(Refusal::Locked(PIN_LOCKOUT)));
        assert_eq!(g.check(tablet, t0), Ok(()), "the tablet is not locked out");
        // After the lockout, five more wrong PINs lock for twice as long.
        let t1 = t0 + PIN_LOCKOUT;
        assert_eq!(g.check(stranger, t1), Ok(()));
        for _ in 1..MAX_PIN_FAILURES {
            wrong(&mut g, stranger, t1);
        }
        assert_eq!(
            wrong(&mut g, stranger, t1),
            Failure::Locked(PIN_LOCKOUT * 2)
        );
        // The doubling stops at the cap.
        let mut t = t1;
        for _ in 0..20 {
            t += MAX_LOCKOUT;
            for _ in 1..MAX_PIN_FAILURES {
                wrong(&mut g, stranger, t);
            }
            assert!(matches!(wrong(&mut g, stranger, t), Failure::Locked(d) if d <= MAX_LOCKOUT));
        }
        assert_eq!(g.check(stranger, t), Err(Refusal::Locked(MAX_LOCKOUT)));
    }

    #[test]
    fn the_right_pin_clears_an_address_and_ipv4_mapped_addresses_are_one() {
        let mut g = PinGuard::default();
        let t = Instant::now();
        let v4 = ip("10.0.0.5");
        let mapped = ip("::ffff:10.0.0.5");
        for _ in 0..MAX_PIN_FAILURES - 1 {
            wrong(&mut g, v4, t);
        }
        assert_eq!(wrong(&mut g, mapped, t), Failure::Locked(PIN_LOCKOUT));
        assert!(g.check(v4, t).is_err());
        assert!(matches!(g.reserve(mapped, t), Err(Refusal::Locked(_))));
        let later = t + PIN_LOCKOUT;
        let right = g.reserve(mapped, later).expect("the lockout is over");
        g.succeeded(right);
        assert_eq!(
            wrong(&mut g, v4, later),
            Failure::AttemptsLeft(MAX_PIN_FAILURES - 1)
        );
    }

    #[test]
    fn attempts_in_flight_use_up_the_allowance() {
        let mut g = PinGuard::default();
        let t = Instant::now();
        let a = ip("192.168.0.66");
        // Five attempts admitted and none resolved yet (their PINs still being hashed).
        let in_flight: Vec<Attempt> = (0..MAX_PIN_FAILURES)
            .map(|_| g.reserve(a, t).expect("within the allowance"))
            .collect();
        assert_eq!(
            g.reserve(a, t),
            Err(Refusal::Locked(PIN_LOCKOUT)),
            "a sixth attempt while five are in flight"
        );
        // A dropped attempt (the client hung up) stays counted.
        drop(in_flight);
        assert!(g.reserve(a, t + PIN_LOCKOUT / 2).is_err());
        let t1 = t + PIN_LOCKOUT;
        let mut again: Vec<Attempt> = (0..MAX_PIN_FAILURES)
            .map(|_| g.reserve(a, t1).expect("the lockout is over"))
            .collect();
        assert!(g.reserve(a, t1).is_err());
        // One of them was the right PIN: the address is clear again, lockout and all.
        let right = again.remove(1);
        g.succeeded(right);
        assert_eq!(g.check(a, t1), Ok(()));
        assert_eq!(
            again.pop().map(Attempt::wrong),
            Some(Failure::Locked(PIN_LOCKOUT * 2))
        );
    }

    #[test]
    fn concurrent_reservations_beyond_the_allowance_are_refused() {
        const THREADS: usize = 100;
        let guard = Arc::new(Mutex::new(PinGuard::default()));
        let start = Arc::new(Barrier::new(THREADS));
        let checked = Arc::new(Barrier::new(THREADS));
        let t = Instant::now();
        let a = ip("192.168.0.66");
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let (guard, start, checked) = (guard.clone(), start.clone(), checked.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let attempt = guard.lock().unwrap().reserve(a, t);
                    // Every thread has asked before any admitted attempt is resolved: all
                    // the admitted ones are in flight at once, as with a slow hash.
                    checked.wait();
                    attempt.map(Attempt::wrong)
                })
            })
            .collect();
        let outcomes: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        let admitted = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(admitted, MAX_PIN_FAILURES as usize, "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .filter(|o| o.is_err())
                .all(|o| *o == Err(Refusal::Locked(PIN_LOCKOUT)))
        );
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| matches!(o, Ok(Failure::Locked(_))))
                .count(),
            1,
            "exactly one admitted attempt locks the address"
        );
    }

    #[test]
    fn guessing_from_many_addresses_brakes_all_but_trusted_ones() {
        let mut g = PinGuard::default();
        let t0 = Instant::now();
        let tablet = ip("192.168.0.10");
        let login = g.reserve(tablet, t0).expect("admitted");
        g.succeeded(login);
        let mut n = 0;
        let mut host = 100u8;
        // Held, not resolved: attempts in flight count against the brake too.
        let mut in_flight = Vec::new();
        while n < BRAKE_FAILURES {
            let a = IpAddr::from([192, 168, 1, host]);
            in_flight.push(g.reserve(a, t0).expect("admitted"));
            n += 1;
            if n % 4 == 0 {
                host += 1; // four tries an address, never locking one
            }
        }
        let fresh = ip("192.168.2.1");
        assert_eq!(g.reserve(fresh, t0), Err(Refusal::Brake(BRAKE_WINDOW)));
        assert_eq!(g.check(fresh, t0), Err(Refusal::Brake(BRAKE_WINDOW)));
        let login = g
            .reserve(tablet, t0)
            .expect("the staff tablet still logs in");
        g.succeeded(login);
        assert_eq!(
            g.recent.len(),
            BRAKE_FAILURES,
            "a right PIN is not a failure"
        );
        drop(in_flight);
        // Once the window has passed, strangers may try again.
        assert_eq!(g.check(fresh, t0 + BRAKE_WINDOW), Ok(()));
        assert!(g.by_addr.is_empty(), "idle records were pruned");
        assert_eq!(
            Refusal::Brake(Duration::from_millis(1500)).retry_after_secs(),
            2
        );
    }

    #[test]
    fn reset_forgets_everything() {
        let mut g = PinGuard::default();
        let t = Instant::now();
        let a = ip("127.0.0.1");
        for _ in 0..MAX_PIN_FAILURES {
            wrong(&mut g, a, t);
        }
        assert!(g.check(a, t).is_err());
        g.reset();
        assert_eq!(g.check(a, t), Ok(()));
    }
}
