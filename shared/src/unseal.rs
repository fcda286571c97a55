//! Opening a partition with the hub's day secrets: the hub's read path, and the tests'.
//!
//! There is one opener, [`PartitionOpener`]: the hub's ledger opens the records it indexes
//! with it (`shared::hub::plan_index`), and [`unseal_partition`], which the simulation and the
//! tests use to check what the hub holds, is a loop over it. What one opens the other opens.
//!
//! Devices never hold a day secret, so on a device this module has nothing to work with.

use crate::daykey::DaySecret;
use crate::envelope::{Envelope, EnvelopeError, SessionId};
use crate::envelope::{Record, SessionKey, WrappedKey};
use crate::ids::{PartitionId, RecordId};
use crate::partition::Partition;
use crate::time::Day;
use std::collections::BTreeMap;
use std::fmt;

/// What could and could not be opened in one partition.
#[derive(Debug, Default)]
pub struct Unsealed {
    /// Records that opened, by id.
    pub records: BTreeMap<RecordId, Record>,
    /// Records that did not open, with the reason (no key for their session, wrong key,
    /// tampered ciphertext, a record claiming another facility).
    pub failures: Vec<(RecordId, String)>,
}

/// Opens every record of `partition`, unwrapping each session key once with the day secret
/// `secret_for(day)` returns for the day the key was wrapped to.
pub fn unseal_partition(
    partition: &Partition,
    secret_for: impl FnMut(Day) -> Option<DaySecret>,
) -> Unsealed {
    let mut opener = PartitionOpener::new(partition, secret_for);
    let mut out = Unsealed::default();
    for (id, envelope) in partition.records() {
        match opener.open_entry(id, envelope) {
            Ok(opened) => {
                out.records.insert(id, opened.record);
            }
            Err(e) => out.failures.push((id, e.to_string())),
        }
    }
    out
}

/// Why one record did not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenFailure {
    /// The stored bytes are not an envelope.
    Damaged(String),
    /// The partition holds no wrapped key for the record's session (yet: a wrapped key and
    /// its records may arrive in different sessions).
    NoWrappedKey,
    /// The day key the session key was wrapped to is destroyed (expired) or unknown here.
    DayKeyUnknown(Day),
    /// The wrapped key does not unwrap with its day's secret (damaged, or another hub's).
    Unwrap(String),
    /// The envelope does not open with its session's key (tampered, moved or forged).
    Open(String),
    /// The record opened but names another facility than its partition's.
    OtherFacility,
}

impl OpenFailure {
    /// The record's session key is not available (yet): no wrapped key, or no secret for its
    /// day. Anything else is damage the record will carry for ever.
    pub fn key_missing(&self) -> bool {
        matches!(
            self,
            OpenFailure::NoWrappedKey | OpenFailure::DayKeyUnknown(_)
        )
    }
}

impl fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenFailure::Damaged(e) | OpenFailure::Unwrap(e) | OpenFailure::Open(e) => {
                f.write_str(e)
            }
            OpenFailure::NoWrappedKey => f.write_str("no wrapped key for the record's session"),
            OpenFailure::DayKeyUnknown(day) => {
                write!(f, "the day key of day {day} is destroyed or unknown")
            }
            OpenFailure::OtherFacility => f.write_str("record claims another facility"),
        }
    }
}

/// One record that opened.
#[derive(Debug)]
pub struct Opened {
    /// The record.
    pub record: Record,
    /// The day of the hub key its session key was wrapped to: the partition's day, or an
    /// earlier one when the device fell back to an older day key.
    pub key_day: Day,
}

/// Opens the records of one partition, unwrapping each session key once (and asking for each
/// day secret once) however many records it sealed. Holds the partition's wrapped keys, not
/// the partition, so it can work while the partition is being encoded elsewhere.
pub struct PartitionOpener<F> {
    id: PartitionId,
    wrapped: BTreeMap<SessionId, WrappedKey>,
    secret_for: F,
    secrets: BTreeMap<Day, Option<DaySecret>>,
    keys: BTreeMap<SessionId, Result<SessionKey, OpenFailure>>,
}

impl<F> fmt::Debug for PartitionOpener<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionOpener")
            .field("id", &self.id)
            .field("wrapped", &self.wrapped.len())
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl<F: FnMut(Day) -> Option<DaySecret>> PartitionOpener<F> {
    /// An opener for `partition`'s records, with `secret_for(day)` giving the hub's day secret
    /// of a day (`None`: destroyed or unknown).
    pub fn new(partition: &Partition, secret_for: F) -> Self {
        PartitionOpener {
            id: partition.id().clone(),
            wrapped: partition
                .wrapped_keys()
                .into_iter()
                .map(|w| (w.session, w))
                .collect(),
            secret_for,
            secrets: BTreeMap::new(),
            keys: BTreeMap::new(),
        }
    }

    /// The partition this opener opens.
    pub fn partition(&self) -> &PartitionId {
        &self.id
    }

    /// Opens a record as [`Partition::records`] lists it (a stored value that did not parse
    /// is [`OpenFailure::Damaged`]).
    pub fn open_entry(
        &mut self,
        record: RecordId,
        envelope: Result<Envelope, EnvelopeError>,
    ) -> Result<Opened, OpenFailure> {
        let envelope = envelope.map_err(|e| OpenFailure::Damaged(e.to_string()))?;
        self.open(record, &envelope)
    }

    /// Opens the envelope stored as `record` in this opener's partition; the record must
    /// name the partition's facility.
    pub fn open(&mut self, record: RecordId, envelope: &Envelope) -> Result<Opened, OpenFailure> {
        let session = envelope.session();
        if !self.keys.contains_key(&session) {
            let key = self.session_key(session);
            self.keys.insert(session, key);
        }
        let key = match self.keys.get(&session) {
            Some(Ok(key)) => key,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err(OpenFailure::NoWrappedKey),
        };
        let key_day = self
            .wrapped
            .get(&session)
            .map_or(self.id.day, |w| w.key_day);
        let record = envelope
            .open(key, &self.id, record)
            .map_err(|e| OpenFailure::Open(e.to_string()))?;
        if record.facility != self.id.facility {
            return Err(OpenFailure::OtherFacility);
        }
        Ok(Opened { record, key_day })
    }

    /// Unwraps now the key of each of `sessions` not met yet (each once), as [`Self::open`]
    /// would on meeting the session's first record.
    pub fn unwrap_sessions(&mut self, sessions: impl IntoIterator<Item = SessionId>) {
        for session in sessions {
            if !self.keys.contains_key(&session) {
                let key = self.session_key(session);
                self.keys.insert(session, key);
            }
        }
    }

    /// The wrapped key of `session` this opener's partition holds, if any.
    pub fn wrapped_key(&self, session: SessionId) -> Option<&WrappedKey> {
        self.wrapped.get(&session)
    }

    /// Takes `key`, unwrapped elsewhere from `wrapped` (ahead of this persist, say), as its
    /// session's key, if this opener has not met the session yet and its partition holds
    /// exactly `wrapped` as the session's wrapped key: the unwrapping is a function of the
    /// wrapped key's bytes and the day secret, so the key is then the one [`Self::open`] would
    /// unwrap. Returns whether it was taken. A key unwrapped from another wrapped key of the
    /// same session (a peer's put that lost the merge, or a forgery) is refused.
    pub fn offer_unwrapped(&mut self, wrapped: &WrappedKey, key: SessionKey) -> bool {
        let session = wrapped.session;
        if key.id() != session
            || self.keys.contains_key(&session)
            || self.wrapped.get(&session) != Some(wrapped)
        {
            return false;
        }
        self.keys.insert(session, Ok(key));
        true
    }

    /// An opener of the same partition holding the session keys this one unwrapped (and the
    /// failures it met), asking `secret_for` only for sessions this one has not met: records
    /// open on a second thread without their keys being unwrapped again. Both openers give
    /// the same result for any record.
    pub fn share_keys<G>(&self, secret_for: G) -> PartitionOpener<G> {
        PartitionOpener {
            id: self.id.clone(),
            wrapped: self.wrapped.clone(),
            secret_for,
            secrets: BTreeMap::new(),
            keys: self.keys.clone(),
        }
    }

    /// Sessions seen so far whose key could not be had (no wrapped key or no day secret).
    pub fn sessions_without_key(&self) -> usize {
        self.keys
            .values()
            .filter(|k| k.as_ref().is_err_and(OpenFailure::key_missing))
            .count()
    }

    fn session_key(&mut self, session: SessionId) -> Result<SessionKey, OpenFailure> {
        let w = self
            .wrapped
            .get(&session)
            .ok_or(OpenFailure::NoWrappedKey)?;
        let secret_for = &mut self.secret_for;
        let secret = self
            .secrets
            .entry(w.key_day)
            .or_insert_with(|| secret_for(w.key_day))
            .as_ref()
            .ok_or(OpenFailure::DayKeyUnknown(w.key_day))?;
        w.unwrap(secret)
            .map_err(|e| OpenFailure::Unwrap(e.to_string()))
    }
}
