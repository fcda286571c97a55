//! The people's reads, off the hub's actor.
//!
//! The actor thread ([`crate::daemon`]) runs every device's sync session; a job on it holds
//! every session for as long as it runs. Reports read a lot (the shared-code report scans every
//! live visit: 0.7 s at 840,000 visits, about a minute at a region's size), so the people's
//! reads run here instead, on tokio's blocking threads, each over a [`Ledger::reader`] of the
//! actor's ledger: every ledger read is a redb read transaction, an MVCC snapshot that neither
//! waits for the actor's writes nor holds them up. What stays on the actor is short: the day
//! keys a reader needs ([`Ledger::read_keys`], copied per read), and the writes, among them
//! the audit entry of a trace or report, appended after its read and before its answer is
//! returned ([`audited`]: no entry, no answer).
//!
//! Concurrency is bounded ([`Pool`]): at most [`HEAVY_READS`] reports (shared codes,
//! compliance, dashboard, the audit log and its verification), [`TRACE_READS`] traces and
//! [`LIGHT_READS`] other reads (lists, stats, metrics, whoami) at once; one more is refused at
//! once with [`Busy`] (HTTP 503 with `Retry-After`), so a flood of requests cannot take every
//! core or pile up threads. Traces have permits of their own: neither a long report nor a
//! flood of light reads by any credential holder keeps the authority's trace waiting.
//!
//! Each read runs on a thread of its own at a lower CPU priority ([`READ_NICE`]) than the
//! actor and the network: on a hub of two cores, reports and traces running back to back took
//! the core a device's sync round waited for (round p99 2.2-4x the quiet hub's at a day of 3
//! million visits, `tests/benches/stall.rs`); at nice 10 the scheduler gives the actor about
//! nine tenths of a shared core, and a read only what sync leaves.

use crate::audit::Event;
use crate::auth::Principal;
use crate::daemon::{HubHandle, Metrics};
use crate::ledger::Ledger;
use crate::people::{Desk, OpError};
use shared::UnixSeconds;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Reports that may run at once (shared codes, compliance, dashboard, audit verification):
/// each may read the whole live index, and the hub has a few cores for its sessions too.
pub const HEAVY_READS: usize = 2;
/// Other reads that may run at once (lists, stats, metrics, whoami): short, and never queued
/// behind a report.
pub const LIGHT_READS: usize = 4;
/// Traces that may run at once (the health authority's and officers'), counted apart from
/// every other read.
pub const TRACE_READS: usize = 4;
/// Of each bound, one principal (one credential, or the local operator) may hold all permits
/// but this many: one credential holder, honest but scripted or compromised, cannot take a
/// whole bound and keep everyone else's traces or reports waiting (a bound of one is the
/// exception: its one permit is anyone's).
pub const KEPT_FOR_OTHERS: usize = 1;
/// What a refused read is told to wait before asking again, seconds (`Retry-After`).
pub const RETRY_AFTER_SECONDS: u64 = 5;

/// Which bound a read counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Weight {
    /// A report that may scan the whole live index ([`HEAVY_READS`] at once).
    Heavy,
    /// Any other read ([`LIGHT_READS`] at once).
    Light,
    /// A trace ([`TRACE_READS`] at once).
    Trace,
}

/// The bounds of the reads running off the actor: one per [`Weight`].
#[derive(Debug, Clone)]
pub struct Pool {
    heavy: Arc<Semaphore>,
    light: Arc<Semaphore>,
    trace: Arc<Semaphore>,
    heavy_max: usize,
    light_max: usize,
    trace_max: usize,
    running: Arc<std::sync::Mutex<std::collections::HashMap<(String, Weight), usize>>>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new(HEAVY_READS, LIGHT_READS)
    }
}

impl Pool {
    /// At most `heavy` reports, [`TRACE_READS`] traces and `light` other reads at once.
    pub fn new(heavy: usize, light: usize) -> Self {
        Pool::with_traces(heavy, light, TRACE_READS)
    }

    /// At most `heavy` reports, `traces` traces and `light` other reads at once.
    pub fn with_traces(heavy: usize, light: usize, traces: usize) -> Self {
        Pool {
            heavy: Arc::new(Semaphore::new(heavy)),
            light: Arc::new(Semaphore::new(light)),
            trace: Arc::new(Semaphore::new(traces)),
            heavy_max: heavy,
            light_max: light,
            trace_max: traces,
            running: Arc::default(),
        }
    }

    /// Counts a read of `who` of `weight` unless `who` holds all but [`KEPT_FOR_OTHERS`] of
    /// that bound's permits already.
    fn enter(&self, who: &str, weight: Weight) -> Result<PrincipalSlot, Busy> {
        let (bound, what) = match weight {
            Weight::Heavy => (self.heavy_max, "reports of this credential"),
            Weight::Light => (self.light_max, "reads of this credential"),
            Weight::Trace => (self.trace_max, "traces of this credential"),
        };
        let cap = bound.saturating_sub(KEPT_FOR_OTHERS).max(1);
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (who.to_owned(), weight);
        let n = running.entry(key.clone()).or_insert(0);
        if *n >= cap {
            return Err(Busy {
                running: cap,
                what,
                retry_after: RETRY_AFTER_SECONDS,
            });
        }
        *n += 1;
        Ok(PrincipalSlot {
            key,
            running: self.running.clone(),
        })
    }
}

/// One principal's running read, counted until dropped.
struct PrincipalSlot {
    key: (String, Weight),
    running: Arc<std::sync::Mutex<std::collections::HashMap<(String, Weight), usize>>>,
}

impl Drop for PrincipalSlot {
    fn drop(&mut self) {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = running.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.key);
            }
        }
    }
}

/// A read was refused: as many as its bound allows are running.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the hub is answering {running} {what} already (at most {running} at once, so that sync \
     sessions keep their share of the machine); try again in {retry_after} s"
)]
pub struct Busy {
    /// The bound that was full.
    pub running: usize,
    /// What it bounds.
    pub what: &'static str,
    /// Seconds to wait ([`RETRY_AFTER_SECONDS`]).
    pub retry_after: u64,
}

/// Why a read gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Too many reads of its weight are running.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The hub's actor has stopped, or the read's thread failed.
    #[error("{0}")]
    Stopped(String),
    /// The operation refused or failed.
    #[error(transparent)]
    Op(#[from] OpError),
}

/// Runs `job` off the actor as of `now`, on a [`Desk`] over a reader of the actor's ledger,
/// counted against `weight`'s bound (refused with [`Busy`] when it is full). Not counted
/// against any principal: the people's API uses [`read_as`].
pub async fn read<T, F>(
    hub: &HubHandle,
    pool: &Pool,
    weight: Weight,
    now: UnixSeconds,
    job: F,
) -> Result<T, ReadError>
where
    T: Send + 'static,
    F: FnOnce(&Desk<'_>, &Metrics) -> Result<T, OpError> + Send + 'static,
{
    run(hub, pool, weight, now, None, job).await
}

/// [`read`] for principal `who` (its id): also refused with [`Busy`] while `who` holds all
/// but [`KEPT_FOR_OTHERS`] of `weight`'s permits (except the local operator).
pub async fn read_as<T, F>(
    hub: &HubHandle,
    pool: &Pool,
    weight: Weight,
    who: &str,
    now: UnixSeconds,
    job: F,
) -> Result<T, ReadError>
where
    T: Send + 'static,
    F: FnOnce(&Desk<'_>, &Metrics) -> Result<T, OpError> + Send + 'static,
{
    // The hub's own operator (the holder of `keys/operator.token`, on the hub's machine) is
    // not held to it: the commands and the operator's scripts are its reads.
    let slot = if who == crate::auth::LOCAL_OPERATOR {
        None
    } else {
        Some(pool.enter(who, weight)?)
    };
    run(hub, pool, weight, now, slot, job).await
}

async fn run<T, F>(
    hub: &HubHandle,
    pool: &Pool,
    weight: Weight,
    now: UnixSeconds,
    slot: Option<PrincipalSlot>,
    job: F,
) -> Result<T, ReadError>
where
    T: Send + 'static,
    F: FnOnce(&Desk<'_>, &Metrics) -> Result<T, OpError> + Send + 'static,
{
    let (sem, running, what) = match weight {
        Weight::Heavy => (&pool.heavy, pool.heavy_max, "reports"),
        Weight::Light => (&pool.light, pool.light_max, "reads"),
        Weight::Trace => (&pool.trace, pool.trace_max, "traces"),
    };
    let permit = sem.clone().try_acquire_owned().map_err(|_| Busy {
        running,
        what,
        retry_after: RETRY_AFTER_SECONDS,
    })?;
    // The one thing the read needs of the actor: its day keys as they are now (a purge moves
    // them). A copy, taken in a job of microseconds.
    let keys = hub
        .query(|_, ledger, _| ledger.read_keys())
        .await
        .map_err(ReadError::Stopped)?
        .map_err(OpError::from)?;
    let shared = hub.hub.clone();
    let metrics = hub.metrics.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // The read's thread runs inside this runtime, as tokio's blocking threads did: a trace asks
    // the region's other hub from it (`Handle::try_current`, `crate::http`).
    let runtime = tokio::runtime::Handle::try_current().ok();
    std::thread::Builder::new()
        .name("hub-read".to_owned())
        .spawn(move || {
            let _runtime = runtime.as_ref().map(tokio::runtime::Handle::enter);
            lower_priority();
            let result = {
                let ledger = Ledger::reader(shared.store(), shared.keys(), keys);
                let desk = Desk::new(&shared, &ledger, now);
                job(&desk, &metrics)
            };
            // The read's permits go before its answer, so that a caller asking again at once
            // is not refused by its own finished read. A panic drops `tx` (and the permits):
            // the caller is told the read failed.
            drop(slot);
            drop(permit);
            let _ = tx.send(result);
        })
        .map_err(|e| ReadError::Stopped(format!("cannot start the read's thread: {e}")))?;
    rx.await
        .map_err(|_| ReadError::Stopped("the read failed (its thread panicked)".to_owned()))?
        .map_err(ReadError::Op)
}

/// The nice value of a read's thread (the actor's and the network's: 0). 10 weighs a thread
/// at about a tenth of a nice-0 one in Linux's scheduler.
pub const READ_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`READ_NICE`] (on Linux, `setpriority` of
/// `PRIO_PROCESS` 0 is the calling thread's). A failure leaves the read at the normal
/// priority: it is logged, the read goes on.
fn lower_priority() {
    if let Err(e) = rustix::process::setpriority_process(None, READ_NICE) {
        tracing::debug!("cannot lower a read's CPU priority: {e}");
    }
}

/// [`read`] for a trace or report that is audited: `job` answers with the report and its
/// audit event; the event is appended on the actor (a short write job) and the report
/// returned only once it is stored. An audit that fails fails the read.
pub async fn audited<T, F>(
    hub: &HubHandle,
    pool: &Pool,
    weight: Weight,
    who: Principal,
    job: F,
) -> Result<T, ReadError>
where
    T: Send + 'static,
    F: FnOnce(&Desk<'_>, &Principal, &Metrics) -> Result<(T, Event), OpError> + Send + 'static,
{
    let now = crate::clock::now();
    let reader = who.clone();
    let (answer, event) = read_as(hub, pool, weight, &who.id, now, move |desk, m| {
        job(desk, &reader, m)
    })
    .await?;
    hub.query(move |hub, ledger, _| Desk::new(hub, ledger, now).audit_read(&who, event))
        .await
        .map_err(ReadError::Stopped)??;
    Ok(answer)
}
