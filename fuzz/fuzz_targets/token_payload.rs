//! Fuzzes KP1 verification with whatever a camera could read: arbitrary bytes as
//! (lossily decoded) text, checked against the test vectors' keyring.
//!
//! Two properties: `verify` never panics, and it never accepts a code that is not really
//! signed by a keyring key. The second is checked by an independent re-implementation of
//! the acceptance rule below (its own base45 decoder, the keyring read from the JSON with
//! `serde_json::Value`, Ed25519 `verify_strict`, 128-bit time arithmetic), so a bug in the
//! crate's own parser cannot hide itself.
//!
//! Each input runs three ways, so the fuzzer reaches deep states without a seed corpus:
//! - as the scanned text, at the vectors' clock;
//! - after its first 16 bytes, as the scanned text at an input-chosen `now` and `skew`
//!   (reaching the arithmetic edges near 0 and `u64::MAX`);
//! - as edits (set a base45 character, flip a bit, insert, delete) applied to one of the
//!   vectors' payloads, at that vector's clock: the near-valid codes an attacker would try.
//!
//! Run: `cargo +nightly fuzz run token_payload` from the repository root.

#![no_main]

use ed25519_dalek::{Signature, VerifyingKey};
use libfuzzer_sys::fuzz_target;
use shared::token::{Keyring, VerifiedToken, verify};
use std::sync::OnceLock;

const VECTORS: &str = include_str!("../../testdata/qr-token-v1-vectors.json");
const ALPHABET: &[u8; 45] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";

/// One keyring entry as the independent checker sees it.
struct TrustedKey {
    issuer_id: u64,
    key_id: u64,
    key: VerifyingKey,
    not_before: u64,
    not_after: u64,
}

struct Fixture {
    keyring: Keyring,
    trusted: Vec<TrustedKey>,
    skew: u64,
    /// Every vector's payload with the `now` it is meant to be checked at.
    payloads: Vec<(String, u64)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let json: serde_json::Value = serde_json::from_str(VECTORS).expect("vectors are JSON");
        let keyring =
            Keyring::from_json(&json["keyring"].to_string()).expect("the vectors' keyring");
        let trusted = json["keyring"]["issuers"]
            .as_array()
            .expect("issuers array")
            .iter()
            .map(|entry| {
                let mut bytes = [0u8; 32];
                let hex = entry["public_key"].as_str().expect("public_key");
                for (i, byte) in bytes.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
                }
                TrustedKey {
                    issuer_id: entry["issuer_id"].as_u64().expect("issuer_id"),
                    key_id: entry["key_id"].as_u64().expect("key_id"),
                    key: VerifyingKey::from_bytes(&bytes).expect("a valid key"),
                    not_before: entry["not_before"].as_u64().expect("not_before"),
                    not_after: entry["not_after"].as_u64().expect("not_after"),
                }
            })
            .collect();
        let payloads = json["vectors"]
            .as_array()
            .expect("vectors array")
            .iter()
            .map(|v| {
                (
                    v["payload"].as_str().expect("payload").to_owned(),
                    v["now"].as_u64().expect("now"),
                )
            })
            .collect();
        Fixture {
            keyring,
            trusted,
            skew: json["skew"].as_u64().expect("skew"),
            payloads,
        }
    })
}

/// RFC 9285 base45, written out again on purpose rather than calling `shared::base45`.
fn independent_base45(text: &str) -> Option<Vec<u8>> {
    let values: Vec<u32> = text
        .bytes()
        .map(|b| ALPHABET.iter().position(|&a| a == b).map(|v| v as u32))
        .collect::<Option<_>>()?;
    let mut out = Vec::new();
    for group in values.chunks(3) {
        match *group {
            [c, d, e] => {
                let n = c + d * 45 + e * 45 * 45;
                if n > 0xffff {
                    return None;
                }
                out.extend_from_slice(&[(n >> 8) as u8, n as u8]);
            }
            [c, d] => {
                let n = c + d * 45;
                if n > 0xff {
                    return None;
                }
                out.push(n as u8);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Panics unless `text` really is a fresh KP1 code signed by a trusted key, matching
/// what `verify` returned.
fn assert_genuine(text: &str, verified: &VerifiedToken, fx: &Fixture, now: u64, skew: u64) {
    // The one line ending the crate documents as tolerated.
    let text = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    let encoded = text
        .strip_prefix("KP1:")
        .unwrap_or_else(|| panic!("accepted text without the KP1: prefix: {text:?}"));
    let bytes = independent_base45(encoded)
        .unwrap_or_else(|| panic!("accepted text that is not base45: {text:?}"));
    assert_eq!(bytes.len(), 93, "accepted a payload of the wrong length");
    let (body, signature) = bytes.split_at(29);
    assert_eq!(body[0], 1, "accepted version {}", body[0]);
    let issuer_id = u16::from_be_bytes([body[1], body[2]]);
    let key_id = body[3];
    let issued_at = u64::from_be_bytes(body[4..12].try_into().expect("8 bytes"));
    let ttl = body[12];
    assert!((1..=60).contains(&ttl), "accepted ttl {ttl}");
    assert_eq!(verified.issuer_id(), issuer_id);
    assert_eq!(verified.key_id(), key_id);
    assert_eq!(verified.issued_at(), issued_at);
    assert_eq!(verified.ttl(), ttl);
    assert_eq!(verified.token().as_bytes()[..], body[13..29]);

    let key = fx
        .trusted
        .iter()
        .find(|k| k.issuer_id == u64::from(issuer_id) && k.key_id == u64::from(key_id))
        .unwrap_or_else(|| panic!("accepted a code of untrusted key {issuer_id}/{key_id}"));
    assert!(
        key.not_before <= issued_at && issued_at < key.not_after,
        "accepted a code issued outside its key's window"
    );
    let mut message = b"KP1-QR\0".to_vec();
    message.extend_from_slice(body);
    let signature = Signature::from_slice(signature).expect("64 bytes");
    key.key
        .verify_strict(&message, &signature)
        .unwrap_or_else(|e| panic!("accepted a code whose signature fails: {e}"));

    let (now, skew) = (u128::from(now), u128::from(skew));
    let (issued_at, ttl) = (u128::from(issued_at), u128::from(ttl));
    assert!(now + skew >= issued_at, "accepted a code from the future");
    assert!(now <= issued_at + ttl + skew, "accepted an expired code");
}

fn check(text: &str, fx: &Fixture, now: u64, skew: u64) {
    if let Ok(verified) = verify(text, &fx.keyring, now, skew) {
        assert_genuine(text, &verified, fx, now, skew);
    }
}

/// Applies `edits` (3 bytes each: operation, position, value) to a vector's payload.
fn edited(base: &str, edits: &[u8]) -> Vec<u8> {
    let mut bytes = base.as_bytes().to_vec();
    for edit in edits.chunks_exact(3) {
        let (op, value) = (edit[0], edit[2]);
        let pos = usize::from(edit[1]) % (bytes.len() + 1);
        match op % 4 {
            0 if pos < bytes.len() => bytes[pos] = ALPHABET[usize::from(value) % 45],
            1 if pos < bytes.len() => bytes[pos] ^= 1 << (value % 8),
            2 => bytes.insert(pos, value),
            3 if pos < bytes.len() => {
                bytes.remove(pos);
            }
            _ => {}
        }
    }
    bytes
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let now = 1_790_000_000;

    check(&String::from_utf8_lossy(data), fx, now, fx.skew);

    if let (Some(now), Some(skew), Some(rest)) = (data.get(..8), data.get(8..16), data.get(16..)) {
        let now = u64::from_le_bytes(now.try_into().expect("8 bytes"));
        let skew = u64::from_le_bytes(skew.try_into().expect("8 bytes"));
        check(&String::from_utf8_lossy(rest), fx, now, skew);
    }

    if let Some((&pick, edits)) = data.split_first() {
        let (base, now) = &fx.payloads[usize::from(pick) % fx.payloads.len()];
        let bytes = edited(base, edits);
        check(&String::from_utf8_lossy(&bytes), fx, *now, fx.skew);
    }
});
