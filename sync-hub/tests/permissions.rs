//! One table of who may do what ([`sync_hub::people::PERMISSIONS`]), used by every entry
//! point: every operation has exactly one row, every HTTP route and every administrative
//! command is an operation of it, and every command a principal may not do is refused by the
//! table itself (its refusal names the operation), before it reaches the hub.

use sync_hub::Hub;
use sync_hub::auth::{Principal, Role};
use sync_hub::commands::AdminCommand;
use sync_hub::gov::Target;
use sync_hub::http::ROUTES;
use sync_hub::ledger::Ledger;
use sync_hub::people::{Desk, Op, PERMISSIONS, permit};

const NOW: u64 = 1_750_000_000;

#[test]
fn every_operation_has_exactly_one_row() {
    for op in Op::ALL {
        let rows = PERMISSIONS.iter().filter(|(o, _)| o == op).count();
        assert_eq!(rows, 1, "{op:?} has {rows} rows in PERMISSIONS");
    }
    for (op, _) in PERMISSIONS {
        assert!(
            Op::ALL.contains(op),
            "{op:?} is in the table but not in Op::ALL"
        );
    }
}

#[test]
fn every_route_is_an_operation_of_the_table_or_one_of_the_two_open_ones() {
    let mut open = Vec::new();
    for r in ROUTES {
        match r.op {
            Some(op) => assert!(op.allowed().is_some(), "{} {}: {op:?}", r.method, r.path),
            None => open.push(r.path),
        }
    }
    assert_eq!(open, ["/", "/healthz"]);
}

/// One command of every kind (the match makes a new kind a compile error here).
fn every_command() -> Vec<AdminCommand> {
    let all = vec![
        AdminCommand::IssuersImport {
            keyring: "{}".into(),
        },
        AdminCommand::FacilityAdd {
            registration: serde_json::from_value(serde_json::json!({
                "name": "Star Karaoke", "business_number": null, "representative": "Kim",
                "phone": "010-1234-5678", "category": "karaoke", "region": "mapo",
                "address": "1 Main St"
            }))
            .unwrap_or_else(|e| panic!("registration: {e}")),
        },
        AdminCommand::FacilityApprove { id: "fac_x".into() },
        AdminCommand::FacilityRemove { id: "fac_x".into() },
        AdminCommand::FacilityList,
        AdminCommand::FacilityPending,
        AdminCommand::FacilityDuplicates { remove: false },
        AdminCommand::FacilityDuplicates { remove: true },
        AdminCommand::Enroll {
            facility_id: "fac_x".into(),
            device_name: "door".into(),
        },
        AdminCommand::DeviceList,
        AdminCommand::DeviceRevoke { id: "dev_x".into() },
        AdminCommand::CredentialAdd {
            role: Role::Officer,
            region: Some("mapo".into()),
            name: "Lee".into(),
        },
        AdminCommand::CredentialList,
        AdminCommand::CredentialRevoke {
            id: "cred_x".into(),
        },
        AdminCommand::DesignationAdd {
            target: Target::Category {
                category: "karaoke".into(),
            },
            region: None,
        },
        AdminCommand::DesignationList,
        AdminCommand::DesignationRemove { id: "des_x".into() },
        AdminCommand::Compliance { hours: 24 },
        AdminCommand::SharedCodes {
            from: None,
            to: None,
        },
        AdminCommand::Audit {
            limit: None,
            verify: false,
        },
        AdminCommand::Audit {
            limit: None,
            verify: true,
        },
        AdminCommand::PeerAdd {
            pairing: sync_hub::replica::PairingFile {
                kind: sync_hub::replica::PAIRING_KIND.into(),
                endpoint_id: "ab".repeat(32),
                addrs: vec!["127.0.0.1:7447".into()],
                region: "mapo".into(),
                authority_recipient: String::new(),
            },
        },
        AdminCommand::PeerStatus,
        AdminCommand::PeerShow,
    ];
    for c in &all {
        match c {
            AdminCommand::IssuersImport { .. }
            | AdminCommand::FacilityAdd { .. }
            | AdminCommand::FacilityApprove { .. }
            | AdminCommand::FacilityRemove { .. }
            | AdminCommand::FacilityList
            | AdminCommand::FacilityPending
            | AdminCommand::FacilityDuplicates { .. }
            | AdminCommand::Enroll { .. }
            | AdminCommand::DeviceList
            | AdminCommand::DeviceRevoke { .. }
            | AdminCommand::CredentialAdd { .. }
            | AdminCommand::CredentialList
            | AdminCommand::CredentialRevoke { .. }
            | AdminCommand::DesignationAdd { .. }
            | AdminCommand::DesignationList
            | AdminCommand::DesignationRemove { .. }
            | AdminCommand::Compliance { .. }
            | AdminCommand::SharedCodes { .. }
            | AdminCommand::Audit { .. }
            | AdminCommand::PeerAdd { .. }
            | AdminCommand::PeerStatus
            | AdminCommand::PeerShow => {}
        }
    }
    all
}

fn person(role: Role) -> Principal {
    Principal {
        id: "cred_0011223344556677".into(),
        name: "someone".into(),
        role,
        region: (role == Role::Officer).then(|| "mapo".to_owned()),
        local: false,
    }
}

#[test]
fn every_command_a_person_may_not_do_is_refused_by_the_table() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let hub = Hub::init(tmp.path(), "mapo", None, vec![], None, NOW)
        .unwrap_or_else(|e| panic!("init: {e}"))
        .hub;
    let ledger = Ledger::open(hub.store(), hub.keys()).unwrap_or_else(|e| panic!("{e}"));
    let desk = Desk::new(&hub, &ledger, NOW);
    let mut refused = 0;
    for role in [Role::Operator, Role::Officer, Role::Authority] {
        let who = person(role);
        for cmd in every_command() {
            let op = cmd.op();
            let table_says = permit(&who, op);
            let what = format!("{cmd:?} as a remote {role:?}");
            let result = cmd.execute(&desk, &who);
            let by_table = format!("forbidden: {op:?}: ");
            match (table_says, result) {
                (Err(_), Ok(_)) => panic!("{what}: done although the table refuses it"),
                (Err(_), Err(e)) => {
                    refused += 1;
                    assert_eq!(e.status(), 403, "{what}: {e}");
                    assert!(
                        e.to_string().starts_with(&by_table),
                        "{what} was refused, but not by the table: {e}"
                    );
                }
                (Ok(()), Err(e)) => assert!(
                    !e.to_string().starts_with(&by_table),
                    "{what}: the table allows it, yet it was refused as {e}"
                ),
                (Ok(()), Ok(_)) => {}
            }
        }
    }
    // The four commands once checked on their own are among those refused.
    assert!(refused >= 3 * 4, "only {refused} refusals");
    // The local operator (a command on the hub's machine) is refused nothing by the table.
    let local = Principal::local_operator();
    for cmd in every_command() {
        assert!(permit(&local, cmd.op()).is_ok(), "{cmd:?}");
    }
}
