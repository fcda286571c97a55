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

impl PinGuard {
    /// Whether `addr` may try a PIN at `now`.
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

    /// Records a wrong PIN from `addr` at `now`.
    pub fn failure(&mut self, addr: IpAddr, now: Instant) -> Failure {
        let addr = addr.to_canonical();
        self.recent.push_back(now);
        let record = self.by_addr.entry(addr).or_default();
        record.last = Some(now);
        record.failures += 1;
        if record.failures < MAX_PIN_FAILURES {
            return Failure::AttemptsLeft(MAX_PIN_FAILURES - record.failures);
        }
        record.failures = 0;
        record.lockouts = record.lockouts.saturating_add(1);
        let doublings = record.lockouts.saturating_sub(1).min(16);
        let lockout = PIN_LOCKOUT.saturating_mul(1 << doublings).min(MAX_LOCKOUT);
        record.locked_until = Some(now + lockout);
        Failure::Locked(lockout)
    }

    /// Records the right PIN from `addr`: its record is cleared and it is trusted from now on.
    pub fn success(&mut self, addr: IpAddr) {
        let addr = addr.to_canonical();
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

    /// Drops failures older than the brake's window, and address records that are neither
    /// locked nor used within it (so memory stays bounded: the brake caps new failures).
    fn prune(&mut self, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= BRAKE_WINDOW)
        {
            self.recent.pop_front();
        }
        self.by_addr.retain(|_, r| {
            r.locked_until.is_some_and(|u| u > now)
                || r.last
                    .is_some_and(|t| now.saturating_duration_since(t) < BRAKE_WINDOW)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_stranger_locks_out_only_themselves_and_longer_each_time() {
        let mut g = PinGuard::default();
        let t0 = Instant::now();
        let (tablet, stranger) = (ip("192.168.0.10"), ip("192.168.0.66"));
        for left in (1..MAX_PIN_FAILURES).rev() {
            assert_eq!(g.check(stranger, t0), Ok(()));
            assert_eq!(g.failure(stranger, t0), Failure::AttemptsLeft(left));
        }
        assert_eq!(g.failure(stranger, t0), Failure::Locked(PIN_LOCKOUT));
        assert_eq!(g.check(stranger, t0), Err(Refusal::Locked(PIN_LOCKOUT)));
        assert_eq!(g.check(tablet, t0), Ok(()), "the tablet is not locked out");
        // After the lockout, five more wrong PINs lock for twice as long.
        let t1 = t0 + PIN_LOCKOUT;
        assert_eq!(g.check(stranger, t1), Ok(()));
        for _ in 1..MAX_PIN_FAILURES {
            g.failure(stranger, t1);
        }
        assert_eq!(g.failure(stranger, t1), Failure::Locked(PIN_LOCKOUT * 2));
        // The doubling stops at the cap.
        let mut t = t1;
        for _ in 0..20 {
            t += MAX_LOCKOUT;
            for _ in 1..MAX_PIN_FAILURES {
                g.failure(stranger, t);
            }
            assert!(matches!(g.failure(stranger, t), Failure::Locked(d) if d <= MAX_LOCKOUT));
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
            g.failure(v4, t);
        }
        assert_eq!(g.failure(mapped, t), Failure::Locked(PIN_LOCKOUT));
        assert!(g.check(v4, t).is_err());
        let later = t + PIN_LOCKOUT;
        g.success(v4);
        assert_eq!(
            g.failure(v4, later),
            Failure::AttemptsLeft(MAX_PIN_FAILURES - 1)
        );
    }

    #[test]
    fn guessing_from_many_addresses_brakes_all_but_trusted_ones() {
        let mut g = PinGuard::default();
        let t0 = Instant::now();
        let tablet = ip("192.168.0.10");
        g.success(tablet);
        let mut n = 0;
        let mut host = 100u8;
        while n < BRAKE_FAILURES {
            let a = IpAddr::from([192, 168, 1, host]);
            assert_eq!(g.check(a, t0), Ok(()));
            g.failure(a, t0);
            n += 1;
            if n % 4 == 0 {
                host += 1; // four tries an address, never locking one
            }
        }
        let fresh = ip("192.168.2.1");
        assert_eq!(g.check(fresh, t0), Err(Refusal::Brake(BRAKE_WINDOW)));
        assert_eq!(
            g.check(tablet, t0),
            Ok(()),
            "the staff tablet still logs in"
        );
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
            g.failure(a, t);
        }
        assert!(g.check(a, t).is_err());
        g.reset();
        assert_eq!(g.check(a, t), Ok(()));
    }
}
