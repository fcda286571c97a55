//! Wrong-PIN bookkeeping for the kiosk's staff login.
//!
//! The kiosk is served on the facility's LAN, where anyone on the same Wi-Fi can post PINs.
//! One counter for the whole device would let a stranger keep the staff locked out for good
//! with five wrong PINs a minute. So:
//!
//! - **per client**: [`MAX_PIN_FAILURES`] wrong PINs in a row lock that client for
//!   [`PIN_LOCKOUT`], doubling with each further lockout up to [`MAX_LOCKOUT`]; the right PIN
//!   clears its record. A client is an IPv4 address, or a whole IPv6 /64 (one host can use
//!   any number of addresses in its /64, so a single IPv6 address means little), except that
//!   a trusted address (below) is counted on its own. A stranger locks out only themselves.
//! - **a device-wide brake** against guessing from many addresses: after [`BRAKE_FAILURES`]
//!   wrong PINs within [`BRAKE_WINDOW`] from all clients together, only trusted addresses may
//!   try; everyone else is told to wait until the window has room again.
//!
//! **Trusted** means: this exact address logged in with the device's *current* PIN (the staff
//! tablet). Trust is per address, never per /64 (a facility's Wi-Fi is often one /64 shared
//! with every visitor), at most [`MAX_TRUSTED`] addresses are remembered, and all of it, with
//! every count, is forgotten when the PIN changes (the state carries a digest of the stored
//! PIN hash, [`PinGuard::for_pin`]).
//!
//! **What survives a restart.** The whole state (the brake's window, every client's record,
//! the trusted addresses and the PIN digest) is kept in the device's store (setting
//! [`STORE_KEY`] of `device-1`, `docs/storage.md`) and written before an admitted PIN is
//! hashed, so restarting the device (or making it restart) never hands out a fresh
//! allowance. Times are wall-clock milliseconds; a failure dated more than a minute in the
//! future (the clock was set back) is dropped.
//!
//! **The numbers.** At most [`BRAKE_FAILURES`] = 10 wrong PINs an hour reach the hash from
//! untrusted clients, however many addresses they use: 240 a day, 87,600 a year. New PINs
//! have at least [`crate::device::STAFF_PIN_MIN_NEW_DIGITS`] = 6 digits, 10^6 values, so the
//! expected time to guess one (half the values) is 500,000 / 240 = 2,083 days, 5.7 years, and
//! trying them all 11.4 years. A 4-digit PIN set by an earlier release falls in 5,000 / 240 =
//! 21 days on average, which is why `status` and the kiosk's login say to change it. The cost:
//! while strangers keep the brake full, a tablet that has never logged in with the current PIN
//! cannot log in either (trusted tablets can); a wrong PIN from a trusted tablet counts in the
//! window too, but never blocks it.
//!
//! **An attempt is counted before its PIN is hashed.** Checking the allowance, hashing the PIN
//! (argon2id, tens of milliseconds) and only then recording the failure let 300 wrong PINs sent
//! at once from one address have 128 evaluated: all of them passed the check before the first
//! failure was written. So [`PinGuard::reserve`] admits an attempt and records it as a wrong
//! PIN in the same step, under the caller's lock; only [`PinGuard::succeeded`], for the right
//! PIN, takes it back. Attempts in flight therefore use up the allowance like failures do, at
//! most [`MAX_PIN_FAILURES`] PINs are ever evaluated per client per lockout, however they are
//! timed and however slow the hash, and an attempt whose request is dropped halfway (the
//! client hung up) stays counted. Time is passed in, so the rules are tested without waiting.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wrong PINs in a row from one client before that client is locked.
pub const MAX_PIN_FAILURES: u32 = 5;
/// How long a client is locked the first time; each further lockout doubles it.
pub const PIN_LOCKOUT: Duration = Duration::from_secs(60);
/// The longest lockout of one client.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(3600);
/// Wrong PINs from all clients together within [`BRAKE_WINDOW`] before only trusted
/// addresses may try.
pub const BRAKE_FAILURES: usize = 10;
/// The window of the device-wide brake.
pub const BRAKE_WINDOW: Duration = Duration::from_secs(3600);
/// Addresses remembered as trusted (logged in with the current PIN) at most.
pub const MAX_TRUSTED: usize = 16;
/// The `device-1` setting the state is kept under.
pub const STORE_KEY: &str = "kiosk_pin_guard";
/// The stored form's version.
const FORM: u32 = 1;
/// A failure dated further in the future than this is dropped (the clock was set back).
const CLOCK_SLACK: Duration = Duration::from_secs(60);

/// Why a login attempt may not be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This client is locked for this long.
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
    /// This many attempts are left before the client locks.
    AttemptsLeft(u32),
    /// The client is now locked for this long.
    Locked(Duration),
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AddrRecord {
    failures: u32,
    lockouts: u32,
    /// Wall-clock milliseconds.
    locked_until: Option<u64>,
    last: Option<u64>,
}

/// Wrong-PIN state of one device's kiosk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PinGuard {
    /// BLAKE3 of the stored PIN the state is about (`None`: not yet known).
    pin: Option<[u8; 32]>,
    by_client: HashMap<IpAddr, AddrRecord>,
    /// Wall-clock milliseconds of the failures in the brake's window, oldest first.
    recent: VecDeque<u64>,
    trusted: HashSet<IpAddr>,
}

/// The stored form.
#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    pin: Option<String>,
    recent: Vec<u64>,
    clients: Vec<(IpAddr, AddrRecord)>,
    trusted: Vec<IpAddr>,
}

/// An admitted PIN attempt, already counted as a wrong PIN (see the module doc): hand it to
/// [`PinGuard::succeeded`] if the PIN was right, or to [`Attempt::wrong`] for what to tell
/// the client if it was not. Dropping it leaves the failure counted.
#[must_use = "an attempt counts as a wrong PIN unless PinGuard::succeeded takes it back"]
#[derive(Debug, PartialEq, Eq)]
pub struct Attempt {
    addr: IpAddr,
    client: IpAddr,
    at: u64,
    if_wrong: Failure,
}

impl Attempt {
    /// The PIN was wrong: what that did to the client (already recorded at reservation).
    pub fn wrong(self) -> Failure {
        self.if_wrong
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// An IPv6 address's /64.
fn slash64(ip: Ipv6Addr) -> IpAddr {
    let bits = u128::from(ip) & !((1u128 << 64) - 1);
    IpAddr::V6(Ipv6Addr::from(bits))
}

impl PinGuard {
    /// The state a store's bytes hold; `None` if they are damaged or of another version (the
    /// caller starts afresh and says so).
    pub fn from_bytes(bytes: &[u8]) -> Option<PinGuard> {
        let s: Stored = serde_json::from_slice(bytes).ok()?;
        if s.version != FORM {
            return None;
        }
        let pin = match s.pin {
            None => None,
            Some(h) => Some(<[u8; 32]>::try_from(hex::decode(h).ok()?).ok()?),
        };
        let mut recent: Vec<u64> = s.recent;
        recent.sort_unstable();
        // Bounded whatever the bytes say: the brake never needs more than its size.
        let skip = recent.len().saturating_sub(BRAKE_FAILURES * 4);
        Some(PinGuard {
            pin,
            by_client: s.clients.into_iter().take(4096).collect(),
            recent: recent.into_iter().skip(skip).collect(),
            trusted: s.trusted.into_iter().take(MAX_TRUSTED).collect(),
        })
    }

    /// The state's stored form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut clients: Vec<(IpAddr, AddrRecord)> = self
            .by_client
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        clients.sort_by_key(|(k, _)| *k);
        let mut trusted: Vec<IpAddr> = self.trusted.iter().copied().collect();
        trusted.sort();
        serde_json::to_vec(&Stored {
            version: FORM,
            pin: self.pin.map(hex::encode),
            recent: self.recent.iter().copied().collect(),
            clients,
            trusted,
        })
        .unwrap_or_default()
    }

    /// Binds the state to the stored PIN whose digest is `pin` (BLAKE3 of its stored form):
    /// if it was about another PIN (changed while the device was off, or through the control
    /// API), everything is forgotten first. Returns whether it was.
    pub fn for_pin(&mut self, pin: [u8; 32]) -> bool {
        if self.pin == Some(pin) {
            return false;
        }
        let was_known = self.pin.is_some();
        *self = PinGuard {
            pin: Some(pin),
            ..PinGuard::default()
        };
        was_known
    }

    /// The key `addr` is counted under: itself if trusted or IPv4, else its /64.
    fn client(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V6(v6) if !self.trusted.contains(&addr) => slash64(v6),
            _ => addr,
        }
    }

    /// Whether `addr` may try a PIN at `now`, without reserving anything: a cheap early
    /// refusal. Only [`PinGuard::reserve`] admits an attempt.
    pub fn check(&mut self, addr: IpAddr, now: SystemTime) -> Result<(), Refusal> {
        let addr = addr.to_canonical();
        let now = millis(now);
        self.prune(now);
        let client = self.client(addr);
        if let Some(until) = self.by_client.get(&client).and_then(|r| r.locked_until)
            && until > now
        {
            return Err(Refusal::Locked(Duration::from_millis(until - now)));
        }
        if self.recent.len() >= BRAKE_FAILURES && !self.trusted.contains(&addr) {
            // The oldest failure in the window leaves it first.
            let oldest = self.recent.front().copied().unwrap_or(now);
            return Err(Refusal::Brake(Duration::from_millis(
                (oldest.saturating_add(ms(BRAKE_WINDOW))).saturating_sub(now),
            )));
        }
        Ok(())
    }

    /// Admits one PIN attempt from `addr` at `now` and counts it as a wrong PIN at once, so
    /// that attempts still being checked use up the allowance; or says why it may not be
    /// made. The `MAX_PIN_FAILURES`-th attempt in a row locks the client straight away.
    pub fn reserve(&mut self, addr: IpAddr, now: SystemTime) -> Result<Attempt, Refusal> {
        self.check(addr, now)?;
        let addr = addr.to_canonical();
        let client = self.client(addr);
        let now = millis(now);
        // Kept in order even if the clock stepped back a little.
        let at = now.max(self.recent.back().copied().unwrap_or(0));
        self.recent.push_back(at);
        let record = self.by_client.entry(client).or_default();
        record.last = Some(now);
        record.failures += 1;
        let if_wrong = if record.failures < MAX_PIN_FAILURES {
            Failure::AttemptsLeft(MAX_PIN_FAILURES - record.failures)
        } else {
            record.failures = 0;
            record.lockouts = record.lockouts.saturating_add(1);
            let doublings = record.lockouts.saturating_sub(1).min(16);
            let lockout = PIN_LOCKOUT.saturating_mul(1 << doublings).min(MAX_LOCKOUT);
            record.locked_until = Some(now.saturating_add(ms(lockout)));
            Failure::Locked(lockout)
        };
        Ok(Attempt {
            addr,
            client,
            at,
            if_wrong,
        })
    }

    /// The attempt's PIN was right: its client's record is cleared (with any lockout that
    /// attempts still in flight caused), its failure leaves the device-wide window, and the
    /// address is trusted from now on (until the PIN changes).
    pub fn succeeded(&mut self, attempt: Attempt) {
        if let Some(i) = self.recent.iter().rposition(|t| *t == attempt.at) {
            self.recent.remove(i);
        }
        if attempt.client == attempt.addr {
            self.by_client.remove(&attempt.client);
        } else if let Some(r) = self.by_client.get_mut(&attempt.client) {
            // The rest of its /64 keeps what it earned; this one wrong PIN is taken back.
            r.failures = r.failures.saturating_sub(1);
        }
        if self.trusted.len() >= MAX_TRUSTED && !self.trusted.contains(&attempt.addr) {
            // Forget an arbitrary one: a kiosk has a handful of staff tablets.
            if let Some(old) = self.trusted.iter().next().copied() {
                self.trusted.remove(&old);
                self.by_client.remove(&old);
            }
        }
        self.trusted.insert(attempt.addr);
    }

    /// Forgets everything but the PIN it is about (the PIN changed: [`PinGuard::for_pin`]
    /// is told the new one at the next attempt).
    pub fn reset(&mut self) {
        *self = PinGuard::default();
    }

    /// Drops failures older than the brake's window (or dated in the future beyond a small
    /// slack), and client records neither used nor locked within it (so memory stays
    /// bounded: the brake caps new failures). A lockout counts until a window after it ends:
    /// a record forgotten as its hour-long lockout ran out would start the next one at a
    /// minute again.
    fn prune(&mut self, now: u64) {
        let window = ms(BRAKE_WINDOW);
        let future = now.saturating_add(ms(CLOCK_SLACK));
        self.recent
            .retain(|t| now.saturating_sub(*t) < window && *t <= future);
        self.by_client.retain(|_, r| {
            r.locked_until
                .is_some_and(|u| now.saturating_sub(u) < window && u <= future + ms(MAX_LOCKOUT))
                || r.last
                    .is_some_and(|t| now.saturating_sub(t) < window && t <= future)
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
    fn wrong(g: &mut PinGuard, addr: IpAddr, t: SystemTime) -> Failure {
        g.reserve(addr, t).expect("the attempt is admitted").wrong()
    }

    #[test]
    fn a_stranger_locks_out_only_themselves_and_longer_each_time() {
        let mut g = PinGuard::default();
        let t0 = SystemTime::now();
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
        let t = SystemTime::now();
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
        let t = SystemTime::now();
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
        let t = SystemTime::now();
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
        let t0 = SystemTime::now();
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
        assert!(g.by_client.is_empty(), "idle records were pruned");
        assert_eq!(
            Refusal::Brake(Duration::from_millis(1500)).retry_after_secs(),
            2
        );
    }

    /// Finding 2 of the edge review: an attacker rotating IPv6 addresses got a fresh
    /// allowance with each. A whole /64 is one client; another /64 is another.
    #[test]
    fn ipv6_addresses_of_one_slash64_are_one_client() {
        let mut g = PinGuard::default();
        let t = SystemTime::now();
        for i in 0..MAX_PIN_FAILURES {
            let a = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, 1 + i as u16));
            let _ = g.reserve(a, t).expect("within the /64's allowance");
        }
        let again = ip("2001:db8:0:7:ffff:1:2:3");
        assert_eq!(g.reserve(again, t), Err(Refusal::Locked(PIN_LOCKOUT)));
        assert_eq!(g.check(ip("2001:db8:0:8::1"), t), Ok(()), "another /64");
        assert_eq!(g.by_client.len(), 1);
    }

    /// The brake holds strangers to [`BRAKE_FAILURES`] an hour from any number of
    /// addresses, and that makes a 6-digit PIN a matter of years (the module doc's numbers).
    #[test]
    fn the_brake_makes_guessing_a_six_digit_pin_take_years() {
        let mut g = PinGuard::default();
        let t0 = SystemTime::now();
        let mut admitted = 0;
        // One guess from each of 10,000 addresses within the hour.
        for i in 0..10_000u32 {
            let a = IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                (i >> 16) as u16,
                i as u16,
                0,
                0,
                0,
                1,
            ));
            if g.reserve(a, t0 + Duration::from_millis(u64::from(i)))
                .is_ok()
            {
                admitted += 1;
            }
        }
        assert_eq!(admitted, BRAKE_FAILURES);
        let per_year = BRAKE_FAILURES as f64 * (365.0 * 86_400.0 / BRAKE_WINDOW.as_secs_f64());
        let six = 10f64.powi(crate::device::STAFF_PIN_MIN_NEW_DIGITS as i32);
        let expected_years = six / 2.0 / per_year;
        assert!(expected_years > 5.0, "{expected_years:.1} years");
    }

    /// What must survive a restart does: the brake's window, the lockouts, the trusted
    /// addresses; and it is all forgotten for another PIN.
    #[test]
    fn the_state_survives_a_restart_and_ends_with_the_pin() {
        let mut g = PinGuard::default();
        let t = SystemTime::now();
        assert!(!g.for_pin([1; 32]), "a first PIN forgets nothing");
        let tablet = ip("192.168.0.10");
        let login = g.reserve(tablet, t).expect("admitted");
        g.succeeded(login);
        for i in 0..BRAKE_FAILURES {
            let _ = g.reserve(IpAddr::from([10, 0, 0, i as u8]), t);
        }
        let fresh = ip("10.9.9.9");
        assert!(matches!(g.check(fresh, t), Err(Refusal::Brake(_))));
        let mut restarted = PinGuard::from_bytes(&g.to_bytes()).expect("its own bytes");
        assert_eq!(restarted, g);
        assert!(!restarted.for_pin([1; 32]), "the same PIN keeps the state");
        let later = t + Duration::from_secs(600);
        assert!(matches!(
            restarted.check(fresh, later),
            Err(Refusal::Brake(_))
        ));
        assert_eq!(restarted.check(tablet, later), Ok(()), "still trusted");
        // The PIN was changed while the device was off: nothing of the old one counts.
        assert!(restarted.for_pin([2; 32]));
        assert_eq!(restarted.check(fresh, later), Ok(()));
        assert!(restarted.trusted.is_empty());
        // Damaged or foreign bytes are refused, not half-read.
        assert_eq!(PinGuard::from_bytes(b"{\"version\": 9}"), None);
        assert_eq!(PinGuard::from_bytes(b"\x00garbage"), None);
        // Failures dated in the future (the clock was set back) do not brake for ever.
        let back = t - Duration::from_secs(3 * 3600);
        assert_eq!(g.check(fresh, back), Ok(()));
    }

    #[test]
    fn reset_forgets_everything() {
        let mut g = PinGuard::default();
        let t = SystemTime::now();
        let a = ip("127.0.0.1");
        for _ in 0..MAX_PIN_FAILURES {
            wrong(&mut g, a, t);
        }
        assert!(g.check(a, t).is_err());
        g.reset();
        assert_eq!(g.check(a, t), Ok(()));
    }
}
