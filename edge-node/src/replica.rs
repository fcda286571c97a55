//! The device's partitions as the sync session sees them: a [`PartitionStore`] over the
//! device's store, limited to its own facility and the live days.

use crate::device::{Device, DeviceError};
use shared::partition::Partition;
use shared::sync::{PartitionStore, StoreError};
use shared::sync::{PartitionSummary, Peer};
use shared::time::{UnixSeconds, horizon};
use shared::{FacilityId, PartitionId};

/// A borrowed device, for the length of one step of a session.
pub struct Replica<'a> {
    /// The device.
    pub device: &'a mut Device,
    /// Now, for the horizon.
    pub now: UnixSeconds,
    /// The endpoint id of the hub at the other end, when it is a hub: each of the region's
    /// hubs has its own sync states.
    pub hub: Option<&'a str>,
}

/// The key under which sync states for `peer` are stored: a sibling's by its device id, a
/// hub's by its region and endpoint id (`hub`), so the region's two hubs never share one
/// (each holds what it holds). A hub without an endpoint id (never, in a session this device
/// runs) keeps the region's key.
pub fn peer_key(peer: &Peer, hub: Option<&str>) -> String {
    match (peer, hub) {
        (Peer::Device { device, .. }, _) => format!("dev:{device}"),
        (Peer::Hub { region }, Some(id)) => format!("hub:{region}:{}", id.to_ascii_lowercase()),
        (Peer::Hub { region }, None) => format!("hub:{region}"),
        // Never a device's peer (hubs only); keyed apart all the same.
        (Peer::HubLink { region, facility }, _) => format!("hublink:{region}:{facility}"),
    }
}

fn failed(e: DeviceError) -> StoreError {
    StoreError::Failed(e.to_string())
}

impl Replica<'_> {
    fn own(&self, id: &PartitionId) -> bool {
        id.facility == self.device.enrollment().facility.id
    }
}

impl PartitionStore for Replica<'_> {
    fn live_partitions(
        &self,
        facility: Option<&FacilityId>,
    ) -> Result<Vec<PartitionSummary>, StoreError> {
        if facility.is_some_and(|f| *f != self.device.enrollment().facility.id) {
            return Ok(Vec::new());
        }
        // Summaries need the documents; `&self` cannot load them, so the shell preloads
        // every live partition (`Device::preload`) before a session starts.
        self.device
            .loaded_partitions(self.now)
            .map_err(failed)
            .map(|ps| ps.iter().map(|p| PartitionSummary::of(p)).collect())
    }

    fn partition_mut(&mut self, id: &PartitionId) -> Result<Option<&mut Partition>, StoreError> {
        if !self.own(id) || id.day < horizon(self.now) {
            return Ok(None);
        }
        if !self.device.has_partition(id.day).map_err(failed)? {
            return Ok(None);
        }
        self.device.partition(id.day).map(Some).map_err(failed)
    }

    fn create_partition(&mut self, id: &PartitionId) -> Result<&mut Partition, StoreError> {
        if !self.own(id) {
            return Err(StoreError::NotAllowed {
                id: id.clone(),
                why: "a device holds only its own facility's partitions".into(),
            });
        }
        if id.day < horizon(self.now) {
            return Err(StoreError::NotAllowed {
                id: id.clone(),
                why: "the partition is past the retention horizon".into(),
            });
        }
        self.device.partition(id.day).map_err(failed)
    }

    fn sync_state(&self, peer: &Peer, id: &PartitionId) -> Result<Option<Vec<u8>>, StoreError> {
        self.device
            .store()
            .sync_state(&peer_key(peer, self.hub), id.day)
            .map_err(|e| StoreError::Failed(e.to_string()))
    }

    fn put_sync_state(
        &mut self,
        peer: &Peer,
        id: &PartitionId,
        state: &[u8],
    ) -> Result<(), StoreError> {
        self.device
            .store()
            .put_sync_state(&peer_key(peer, self.hub), id.day, state)
            .map_err(|e| StoreError::Failed(e.to_string()))
    }

    fn discard_partition(
        &mut self,
        id: &PartitionId,
        _good_heads: &[automerge::ChangeHash],
    ) -> Result<(), StoreError> {
        // The store holds what the last `PartitionUpdated` persisted: reload from there.
        if self.own(id) {
            self.device.forget_partition(id.day);
        }
        Ok(())
    }
}
