//! Opening a partition with the hub's day secrets: the hub's read path, and the tests'.
//!
//! Devices never hold a day secret, so on a device this module has nothing to work with.

use crate::daykey::DaySecret;
use crate::envelope::SessionId;
use crate::envelope::{Record, SessionKey};
use crate::ids::RecordId;
use crate::partition::Partition;
use crate::time::Day;
use std::collections::BTreeMap;

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
    secret_for: impl Fn(Day) -> Option<DaySecret>,
) -> Unsealed {
    let mut keys: BTreeMap<SessionId, Result<SessionKey, String>> = BTreeMap::new();
    for w in partition.wrapped_keys() {
        let key = match secret_for(w.key_day) {
            Some(secret) => w.unwrap(&secret).map_err(|e| e.to_string()),
            None => Err(format!(
                "the day key of day {} is destroyed or unknown",
                w.key_day
            )),
        };
        keys.insert(w.session, key);
    }
    let mut out = Unsealed::default();
    for (id, envelope) in partition.records() {
        let opened =
            envelope
                .map_err(|e| e.to_string())
                .and_then(|env| match keys.get(&env.session()) {
                    Some(Ok(key)) => env.open(key, partition.id(), id).map_err(|e| e.to_string()),
                    Some(Err(e)) => Err(e.clone()),
                    None => Err("no wrapped key for the record's session".to_owned()),
                });
        match opened {
            Ok(r) if r.facility == partition.id().facility => {
                out.records.insert(id, r);
            }
            Ok(_) => out
                .failures
                .push((id, "record claims another facility".to_owned())),
            Err(e) => out.failures.push((id, e)),
        }
    }
    out
}
