//! The KP1 test vectors (`spec/qr-token-v1-vectors.json`, made by an independent
//! implementation of the spec): every vector must give its verdict, and our `TestIssuer`
//! must produce the very same codes from the same seeds.

use serde::Deserialize;
use shared::base45;
use shared::token::{Keyring, PAYLOAD_LEN, PREFIX, TestIssuer, Verdict, verify};
use std::collections::BTreeMap;

const VECTORS: &str = include_str!("../../testdata/qr-token-v1-vectors.json");

#[derive(Deserialize)]
struct Vectors {
    skew: u64,
    issuer_seeds_hex: BTreeMap<String, String>,
    keyring: serde_json::Value,
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    payload: String,
    now: u64,
    verdict: Verdict,
}

/// The body fields of a vector's payload, read straight from the bytes (no checks), so
/// that codes our parser refuses can be re-issued too.
struct RawBody {
    version: u8,
    issuer_id: u16,
    key_id: u8,
    issued_at: u64,
    ttl: u8,
    token: [u8; 16],
}

fn raw_body(payload: &str) -> Option<RawBody> {
    let bytes = base45::decode(payload.strip_prefix(PREFIX)?).ok()?;
    if bytes.len() != PAYLOAD_LEN {
        return None;
    }
    Some(RawBody {
        version: bytes[0],
        issuer_id: u16::from_be_bytes([bytes[1], bytes[2]]),
        key_id: bytes[3],
        issued_at: u64::from_be_bytes(bytes[4..12].try_into().ok()?),
        ttl: bytes[12],
        token: bytes[13..29].try_into().ok()?,
    })
}

fn load() -> (Vectors, Keyring) {
    let vectors: Vectors = serde_json::from_str(VECTORS).expect("the vectors file is valid JSON");
    let keyring = Keyring::from_json(&vectors.keyring.to_string())
        .expect("the vectors' keyring is a valid keyring");
    (vectors, keyring)
}

/// The seeds as issuers; keys are "issuer_id/key_id" with an optional note after a space.
fn issuers(vectors: &Vectors) -> Vec<TestIssuer> {
    vectors
        .issuer_seeds_hex
        .iter()
        .map(|(label, seed_hex)| {
            let ids = label.split(' ').next().unwrap_or(label);
            let (issuer_id, key_id) = ids
                .split_once('/')
                .unwrap_or_else(|| panic!("seed label {label:?} is not issuer/key"));
            let mut seed = [0u8; 32];
            hex::decode_to_slice(seed_hex, &mut seed)
                .unwrap_or_else(|e| panic!("seed {label:?}: {e}"));
            TestIssuer::new(
                seed,
                issuer_id.parse().expect("issuer id is a u16"),
                key_id.parse().expect("key id is a u8"),
            )
        })
        .collect()
}

#[test]
fn every_vector_gives_its_verdict() {
    let (vectors, keyring) = load();
    assert!(vectors.vectors.len() >= 28, "the vectors file lost vectors");
    let failures: Vec<String> = vectors
        .vectors
        .iter()
        .filter_map(|v| {
            let got = match verify(&v.payload, &keyring, v.now, vectors.skew) {
                Ok(_) => Verdict::Accepted,
                Err(verdict) => verdict,
            };
            (got != v.verdict).then(|| format!("{:?}: expected {}, got {got}", v.name, v.verdict))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "failing vectors:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_verdict_verify_can_give_is_covered() {
    let (vectors, _) = load();
    for verdict in Verdict::ALL {
        // no_code comes from the frame decoder and duplicate from the store, not from `verify`.
        if matches!(verdict, Verdict::NoCode | Verdict::Duplicate) {
            continue;
        }
        assert!(
            vectors.vectors.iter().any(|v| v.verdict == verdict),
            "no vector for {verdict}"
        );
    }
}

#[test]
fn seeds_reproduce_the_keyring() {
    let (vectors, keyring) = load();
    let issuers = issuers(&vectors);
    assert_eq!(issuers.len(), 3);
    let mut trusted = 0;
    for (label, issuer) in vectors.issuer_seeds_hex.keys().zip(&issuers) {
        match keyring.get(issuer.issuer_id(), issuer.key_id()) {
            Some(key) => {
                assert_eq!(key.public_key(), &issuer.public_key(), "seed {label:?}");
                trusted += 1;
            }
            None => assert!(
                label.contains("not trusted"),
                "seed {label:?} has no keyring entry"
            ),
        }
    }
    assert_eq!(trusted, keyring.len(), "a keyring key has no seed");
}

#[test]
fn test_issuer_reproduces_the_vectors_byte_for_byte() {
    let (vectors, _) = load();
    let issuers = issuers(&vectors);

    // The first vector, a genuine code, explicitly.
    let first = &vectors.vectors[0];
    assert_eq!(first.verdict, Verdict::Accepted);
    let body = raw_body(&first.payload).expect("the first vector decodes");
    let issuer = issuers
        .iter()
        .find(|i| (i.issuer_id(), i.key_id()) == (body.issuer_id, body.key_id))
        .expect("the first vector's issuer has a seed");
    assert_eq!(
        issuer.issue(body.issued_at, body.ttl, body.token),
        first.payload
    );

    // Every vector whose signer we hold: correctly signed ones (whatever else is wrong with
    // them) come out identical; bad-signature ones must not.
    let mut reproduced = Vec::new();
    for v in &vectors.vectors {
        let Some(body) = raw_body(&v.payload) else {
            continue;
        };
        let Some(issuer) = issuers
            .iter()
            .find(|i| (i.issuer_id(), i.key_id()) == (body.issuer_id, body.key_id))
        else {
            continue;
        };
        let again = issuer.issue_raw(body.version, body.issued_at, body.ttl, body.token);
        if v.verdict == Verdict::BadSignature {
            assert_ne!(
                again, v.payload,
                "{:?} re-issued with a valid signature",
                v.name
            );
        } else {
            assert_eq!(again, v.payload, "{:?} differs when re-issued", v.name);
            reproduced.push(v.name.as_str());
        }
    }
    // Genuine codes, ttl 0/61, version 2, key windows, the untrusted issuer.
    assert!(reproduced.len() >= 13, "only reproduced {reproduced:?}");
}

#[test]
fn keyring_of_the_vectors_round_trips() {
    let (_, keyring) = load();
    let again = Keyring::from_json(&keyring.to_json()).expect("our own keyring JSON parses");
    assert_eq!(again, keyring);
    let via_serde: Keyring =
        serde_json::from_str(&serde_json::to_string(&keyring).expect("serializes"))
            .expect("deserializes");
    assert_eq!(via_serde, keyring);
}
