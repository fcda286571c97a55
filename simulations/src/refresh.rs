//! The refresh the simulated hub hands a device in its welcome, as `sync-hub` builds it
//! (`refresh_for` in its daemon): the day public keys the device lacks and the facility's
//! other devices when they differ from the roster the device holds. The simulated devices do
//! not act on it (their siblings are admitted from the world's own roster); it is modelled
//! for its bytes, which `tests/tests/sim_vs_real.rs` found to be half of what a hub sends a
//! device in a small scenario.
//!
//! A device enters its siblings' roster at its first completed hub session (the hub binds its
//! endpoint then), with the address the hub saw it at.

use shared::DeviceId;
use shared::daykey::DayKeyRatchet;
use shared::ticket::{Refresh, Sibling, digest};
use shared::time::Day;
use std::collections::BTreeMap;

/// What the simulated hub knows for building refreshes.
#[derive(Debug, Default)]
pub(crate) struct HubRefresh {
    /// Devices bound at the hub (a hub session completed), as their siblings' rosters list
    /// them, by facility index.
    bound: BTreeMap<usize, Vec<Sibling>>,
    /// The digest of the roster each device holds (an empty one until a refresh brings one,
    /// as its enrollment ticket listed nobody bound).
    held: BTreeMap<DeviceId, [u8; 8]>,
}

/// The roster entry of a device: an iroh endpoint id is 64 hex digits and the hub records one
/// address, so the stand-ins are of those sizes.
fn sibling(id: &DeviceId, endpoint: &str, index: usize) -> Sibling {
    Sibling {
        device_id: id.clone(),
        name: id.to_string(),
        endpoint_id: format!("{endpoint:0>64}"),
        addrs: vec![format!("10.0.{}.{}:41641", index / 250, index % 250 + 1)],
    }
}

impl HubRefresh {
    /// The facility's other bound devices, in binding order.
    fn roster(&self, facility: usize, device: &DeviceId) -> Vec<Sibling> {
        self.bound
            .get(&facility)
            .map(|all| {
                all.iter()
                    .filter(|s| &s.device_id != device)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The refresh bytes of a session of `device` at hub day `today`: day keys after
    /// `publics_until` (the newest the device holds) up to `days_ahead` from today, and the
    /// roster when it changed. `None` when it would carry nothing (the hub then sends none).
    pub(crate) fn for_session(
        &self,
        ratchet: &DayKeyRatchet,
        facility: usize,
        device: &DeviceId,
        today: Day,
        publics_until: Day,
        days_ahead: u32,
    ) -> Option<Vec<u8>> {
        let roster = self.roster(facility, device);
        let held = self
            .held
            .get(device)
            .copied()
            .unwrap_or_else(|| digest(&Vec::<Sibling>::new()));
        let refresh = Refresh {
            day_keys: ratchet
                .publics(today, days_ahead)
                .into_iter()
                .filter(|k| k.day > publics_until)
                .collect(),
            keyring: None,
            roster: (digest(&roster) != held).then_some(roster),
            // The simulated hub never moves: a device's ticket addresses stay its hub's.
            hub_addrs: None,
            // The simulation revokes no device: a hub sends no list (`revocation::hub_sends`).
            revocations: None,
            ..Default::default()
        };
        (!refresh.is_empty()).then(|| refresh.to_bytes())
    }

    /// A hub session of `device` (the `index`-th device of the world, with stand-in endpoint
    /// `endpoint`) completed: it is bound, and holds the roster it was sent.
    pub(crate) fn completed(
        &mut self,
        facility: usize,
        device: &DeviceId,
        endpoint: &str,
        index: usize,
    ) {
        let roster = self.roster(facility, device);
        self.held.insert(device.clone(), digest(&roster));
        let bound = self.bound.entry(facility).or_default();
        if !bound.iter().any(|s| &s.device_id == device) {
            bound.push(sibling(device, endpoint, index));
        }
    }
}
