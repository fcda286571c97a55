//! The simulation's hub sessions are admitted by the hub's own rule (`shared::hub::admit`)
//! over the simulation's registry: the devices it creates, each for its own facility.

use shared::sync::{Decision, Peer, PeerHello, RefuseReason};
use simulations::world::{admit_claimed, device_id, facility_id};

fn hello(peer: Peer) -> PeerHello {
    PeerHello {
        peer,
        credential: None,
        now: 1_728_000_000,
        refresh_have: None,
        push_only: true,
    }
}

fn device(f: usize, d: usize, claimed: usize) -> PeerHello {
    hello(Peer::Device {
        device: device_id(f, d),
        facility: facility_id(claimed),
    })
}

fn reason(d: Decision) -> Option<RefuseReason> {
    match d {
        Decision::Refuse { reason, .. } => Some(reason),
        Decision::Admit { .. } => None,
    }
}

#[test]
fn created_devices_are_admitted_for_their_facility_only() {
    assert_eq!(
        admit_claimed(&device(3, 1, 3)),
        Decision::Admit {
            facility: facility_id(3),
            refresh: None
        }
    );
    assert_eq!(
        reason(admit_claimed(&device(3, 1, 4))),
        Some(RefuseReason::WrongFacility)
    );
    // A device the simulation never created is not enrolled.
    let stranger = hello(Peer::Device {
        device: shared::DeviceId::parse("rogue-1").unwrap_or_else(|e| panic!("{e}")),
        facility: facility_id(3),
    });
    assert_eq!(
        reason(admit_claimed(&stranger)),
        Some(RefuseReason::UnknownDevice)
    );
    assert_eq!(
        reason(admit_claimed(&hello(Peer::Hub { region: "x".into() }))),
        Some(RefuseReason::Protocol)
    );
}
