//! KP1, the one-time check-in QR token (`spec/qr-token-v1.md`): parsing the scanned text,
//! the trusted issuer keyring, verification in the spec's order, and a test issuer.
//!
//! The edge node decides offline whether a scanned code is genuine and fresh. Everything
//! here is pure: the caller passes the scanned text, the keyring and its clock reading.
//! Only [`verify`] (through [`Payload::verify`]) makes a [`VerifiedToken`], so holding one
//! is proof that checks 2 to 9 of the spec passed. Check 1 (is there a QR code at all)
//! belongs to the frame decoder and check 10 (duplicate) to the edge node's store; both
//! report their outcome with the same [`Verdict`].
//!
//! Text accepted beyond the letter of the spec: one trailing line ending (`"\n"` or
//! `"\r\n"`) is ignored, because some issuers' QR encoders append one in byte mode and the
//! spec asks the edge to accept every issuer's code whichever encoder drew it. Nothing else
//! is trimmed: the space is a base45 character, so trimming spaces could change a payload,
//! and `KP1:` must be upper case (the alphanumeric QR mode has no lower case).

use crate::base45::{self, Base45Error};
use crate::time::UnixSeconds;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use thiserror::Error;

/// The literal text every KP1 code starts with.
pub const PREFIX: &str = "KP1:";
/// The only body version this code understands.
pub const VERSION: u8 = 1;
/// Bytes in the signed body.
pub const BODY_LEN: usize = 29;
/// Bytes in an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Bytes the base45 part decodes to: body then signature.
pub const PAYLOAD_LEN: usize = BODY_LEN + SIGNATURE_LEN;
/// Characters in a well-formed code's text (144: QR version 6-M in alphanumeric mode).
pub const TEXT_LEN: usize = PREFIX.len() + base45::encoded_len(PAYLOAD_LEN);
/// Signed before the body, so a KP1 signature can never be replayed as another protocol's.
pub const DOMAIN_TAG: &[u8; 7] = b"KP1-QR\0";
/// Shortest validity an issuer may give a code, in seconds.
pub const MIN_TTL: u8 = 1;
/// Longest validity an issuer may give a code, in seconds.
pub const MAX_TTL: u8 = 60;
/// The edge node's default clock tolerance, in seconds.
pub const DEFAULT_SKEW: u64 = 10;

/// The 16 random bytes that identify one code, and through the issuer, one person.
///
/// Personal data: `Debug` prints `Token(..)`, never the bytes. Use [`Token::to_hex`] where
/// the bytes are really needed (the sealed record, a trace query).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token([u8; 16]);

/// A text that is not a token's 32 hex characters.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("not a token: expected 32 hex characters ({0})")]
pub struct TokenHexError(hex::FromHexError);

impl Token {
    /// Bytes in a token.
    pub const LEN: usize = 16;

    /// Wraps raw token bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Token {
        Token(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Lower-case hex, 32 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 32 hex characters (either case).
    pub fn from_hex(text: &str) -> Result<Token, TokenHexError> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(text, &mut bytes).map_err(TokenHexError)?;
        Ok(Token(bytes))
    }
}

impl From<[u8; 16]> for Token {
    fn from(bytes: [u8; 16]) -> Token {
        Token(bytes)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// The outcome of a scan, as shown to the visitor and recorded in metrics.
///
/// Serialized as the spec's snake_case names (`"no_code"`, `"bad_signature"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// All checks passed; the visit is stored before this is shown.
    Accepted,
    /// Check 1: the frame holds no QR code.
    NoCode,
    /// Checks 2 and 4: not a KP1 code, damaged, or a ttl outside 1..=60.
    Malformed,
    /// Check 3: a body version other than 1.
    UnsupportedVersion,
    /// Check 5: the issuer's key is not in the keyring (unknown or revoked).
    UnknownKey,
    /// Check 6: the code was issued outside the key's validity window.
    KeyNotValid,
    /// Check 7: the signature does not verify.
    BadSignature,
    /// Check 8: issued more than `skew` seconds in this device's future.
    NotYetValid,
    /// Check 9: older than its ttl plus `skew`.
    Expired,
    /// Check 10: this token is already recorded at this facility.
    Duplicate,
}

/// A verdict name that is not one of the spec's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{0:?} is not a KP1 verdict; expected one of accepted, no_code, malformed, unsupported_version, unknown_key, key_not_valid, bad_signature, not_yet_valid, expired, duplicate"
)]
pub struct UnknownVerdict(String);

impl Verdict {
    /// Every verdict, in the spec's order.
    pub const ALL: [Verdict; 10] = [
        Verdict::Accepted,
        Verdict::NoCode,
        Verdict::Malformed,
        Verdict::UnsupportedVersion,
        Verdict::UnknownKey,
        Verdict::KeyNotValid,
        Verdict::BadSignature,
        Verdict::NotYetValid,
        Verdict::Expired,
        Verdict::Duplicate,
    ];

    /// The spec's name for this verdict.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::NoCode => "no_code",
            Verdict::Malformed => "malformed",
            Verdict::UnsupportedVersion => "unsupported_version",
            Verdict::UnknownKey => "unknown_key",
            Verdict::KeyNotValid => "key_not_valid",
            Verdict::BadSignature => "bad_signature",
            Verdict::NotYetValid => "not_yet_valid",
            Verdict::Expired => "expired",
            Verdict::Duplicate => "duplicate",
        }
    }

    /// Whether the visitor's visit is on record after this verdict (a duplicate is: the
    /// first scan stored it).
    pub const fn is_checked_in(self) -> bool {
        matches!(self, Verdict::Accepted | Verdict::Duplicate)
    }

    /// What the visitor is told, in Korean. For [`Verdict::Malformed`],
    /// [`Malformed::message_ko`] says more when the reason is known.
    pub const fn message_ko(self) -> &'static str {
        match self {
            Verdict::Accepted => "인증되었습니다",
            Verdict::NoCode => "QR 코드를 카메라 앞에 흔들리지 않게 대 주세요",
            Verdict::Malformed => {
                "체크인 코드가 아니거나 손상된 코드입니다. 앱의 체크인 QR 코드를 새로고침해 다시 대 주세요"
            }
            Verdict::UnsupportedVersion => {
                "이 코드 형식은 이곳에서 지원하지 않습니다. 다른 앱의 QR 코드를 사용하거나 수기 명부를 작성해 주세요"
            }
            Verdict::UnknownKey | Verdict::KeyNotValid => {
                "이 앱의 코드는 이곳에서 사용할 수 없습니다. 다른 앱의 QR 코드를 사용하거나 수기 명부를 작성해 주세요"
            }
            Verdict::BadSignature => {
                "유효하지 않은 코드입니다. 앱에서 코드를 새로고침해 다시 대 주세요"
            }
            Verdict::NotYetValid => {
                "코드의 시간이 이 기기와 맞지 않습니다. 앱에서 코드를 새로고침해 주세요. 계속되면 직원에게 알려 주세요"
            }
            Verdict::Expired => {
                "유효 시간이 지난 코드입니다. 앱에서 코드를 새로고침해 다시 대 주세요"
            }
            Verdict::Duplicate => "이미 체크인되었습니다",
        }
    }

    /// What the visitor is told, in English. For [`Verdict::Malformed`],
    /// [`Malformed::message_en`] says more when the reason is known.
    pub const fn message_en(self) -> &'static str {
        match self {
            Verdict::Accepted => "Verified",
            Verdict::NoCode => "Hold the code steady in front of the camera",
            Verdict::Malformed => {
                "This is not a check-in code, or the code is damaged. Refresh the check-in code in your app and show it again"
            }
            Verdict::UnsupportedVersion => {
                "This code format is not supported here. Use another check-in app or the paper log"
            }
            Verdict::UnknownKey | Verdict::KeyNotValid => {
                "This app's code is not accepted here. Use another check-in app or the paper log"
            }
            Verdict::BadSignature => "Invalid code. Refresh the code in your app and show it again",
            Verdict::NotYetValid => {
                "The code's time does not match this device. Refresh the code in your app; if this repeats, tell the staff"
            }
            Verdict::Expired => {
                "This code has expired. Refresh the code in your app and show it again"
            }
            Verdict::Duplicate => "You are already checked in",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Verdict {
    type Err = UnknownVerdict;

    fn from_str(s: &str) -> Result<Verdict, UnknownVerdict> {
        Verdict::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownVerdict(s.to_owned()))
    }
}

// `verify` returns a refusal as `Err(Verdict)`; being an error lets shells use `?`.
impl std::error::Error for Verdict {}

/// Why a scanned text gave [`Verdict::Malformed`]: so the visitor can be told whether
/// they showed the wrong code or a damaged one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformed {
    /// The text does not start with `KP1:`: a URL, a payment code, another app's QR.
    #[error("not a check-in code: the text does not start with \"KP1:\"")]
    NotCheckInCode,
    /// `KP1:` followed by text that is not base45.
    #[error("damaged check-in code: {0}")]
    Base45(Base45Error),
    /// Valid base45 of the wrong length.
    #[error(
        "damaged check-in code: it decodes to {len} bytes, a KP1 payload is exactly {PAYLOAD_LEN}"
    )]
    WrongLength {
        /// The decoded length.
        len: usize,
    },
    /// A ttl outside 1..=60: the issuer app is faulty.
    #[error(
        "check-in code with a ttl of {ttl} s, outside {MIN_TTL}..={MAX_TTL}: the issuer app is faulty"
    )]
    TtlOutOfRange {
        /// The ttl the code claims.
        ttl: u8,
    },
}

impl Malformed {
    /// Whether the text at least claimed to be a check-in code (it had the `KP1:` prefix).
    pub const fn is_check_in_code(&self) -> bool {
        !matches!(self, Malformed::NotCheckInCode)
    }

    /// What the visitor is told, in Korean.
    pub const fn message_ko(&self) -> &'static str {
        match self {
            Malformed::NotCheckInCode => {
                "체크인 코드가 아닙니다. 앱에서 QR 체크인 코드를 열어 보여 주세요"
            }
            Malformed::Base45(_) | Malformed::WrongLength { .. } => {
                "코드를 제대로 읽지 못했습니다. 앱에서 코드를 새로고침해 다시 대 주세요"
            }
            Malformed::TtlOutOfRange { .. } => {
                "올바르지 않은 체크인 코드입니다. 앱에서 코드를 새로고침하거나 수기 명부를 작성해 주세요"
            }
        }
    }

    /// What the visitor is told, in English.
    pub const fn message_en(&self) -> &'static str {
        match self {
            Malformed::NotCheckInCode => {
                "This is not a check-in code. Open the QR check-in code in your app and show it"
            }
            Malformed::Base45(_) | Malformed::WrongLength { .. } => {
                "The check-in code could not be read. Refresh the code in your app and show it again"
            }
            Malformed::TtlOutOfRange { .. } => {
                "This check-in code is not valid. Refresh the code in your app, or use the paper log"
            }
        }
    }
}

/// Why parsing stopped: the two verdicts checks 2 to 4 can give, with detail.
enum ParseError {
    Malformed(Malformed),
    UnsupportedVersion,
}

impl ParseError {
    fn verdict(&self) -> Verdict {
        match self {
            ParseError::Malformed(_) => Verdict::Malformed,
            ParseError::UnsupportedVersion => Verdict::UnsupportedVersion,
        }
    }
}

impl From<Malformed> for ParseError {
    fn from(m: Malformed) -> ParseError {
        ParseError::Malformed(m)
    }
}

/// Why `text` is [`Verdict::Malformed`], or `None` if it passes checks 2 and 4 (or fails
/// check 3 first, which is [`Verdict::UnsupportedVersion`]).
pub fn malformed_reason(text: &str) -> Option<Malformed> {
    match Payload::decode(text) {
        Err(ParseError::Malformed(m)) => Some(m),
        Ok(_) | Err(ParseError::UnsupportedVersion) => None,
    }
}

/// A well-formed KP1 code, not yet verified: checks 2 to 4 passed, the signature is unchecked.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    body: [u8; BODY_LEN],
    signature: [u8; SIGNATURE_LEN],
    issuer_id: u16,
    key_id: u8,
    issued_at: UnixSeconds,
    ttl: u8,
    token: Token,
}

// The body holds the token: print the fields, not the bytes.
impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload")
            .field("issuer_id", &self.issuer_id)
            .field("key_id", &self.key_id)
            .field("issued_at", &self.issued_at)
            .field("ttl", &self.ttl)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// Drops the one line ending some QR encoders append in byte mode (see the module docs).
fn strip_line_ending(text: &str) -> &str {
    text.strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text)
}

impl Payload {
    /// Checks 2 to 4 of the spec: the `KP1:` prefix, base45, exactly 93 bytes, version 1,
    /// ttl in 1..=60. Fails with [`Verdict::Malformed`] or [`Verdict::UnsupportedVersion`];
    /// [`malformed_reason`] tells why a text is malformed.
    pub fn parse(text: &str) -> Result<Payload, Verdict> {
        Payload::decode(text).map_err(|e| e.verdict())
    }

    fn decode(text: &str) -> Result<Payload, ParseError> {
        let encoded = strip_line_ending(text)
            .strip_prefix(PREFIX)
            .ok_or(Malformed::NotCheckInCode)?;
        let bytes = base45::decode(encoded).map_err(Malformed::Base45)?;
        if bytes.len() != PAYLOAD_LEN {
            return Err(Malformed::WrongLength { len: bytes.len() }.into());
        }
        let (body_bytes, signature_bytes) = bytes.split_at(BODY_LEN);
        let mut body = [0u8; BODY_LEN];
        body.copy_from_slice(body_bytes);
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(signature_bytes);

        // Check 3 before check 4: a future version may give ttl another meaning.
        if body[0] != VERSION {
            return Err(ParseError::UnsupportedVersion);
        }
        let ttl = body[12];
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(Malformed::TtlOutOfRange { ttl }.into());
        }
        let mut issued_at = [0u8; 8];
        issued_at.copy_from_slice(&body[4..12]);
        let mut token = [0u8; 16];
        token.copy_from_slice(&body[13..29]);
        Ok(Payload {
            body,
            signature,
            issuer_id: u16::from_be_bytes([body[1], body[2]]),
            key_id: body[3],
            issued_at: u64::from_be_bytes(issued_at),
            ttl,
            token: Token(token),
        })
    }

    /// Checks 5 to 9 of the spec against the keyring and this device's clock, in order.
    pub fn verify(
        &self,
        keyring: &Keyring,
        now: UnixSeconds,
        skew: u64,
    ) -> Result<VerifiedToken, Verdict> {
        let key = keyring
            .get(self.issuer_id, self.key_id)
            .ok_or(Verdict::UnknownKey)?;
        if !key.covers(self.issued_at) {
            return Err(Verdict::KeyNotValid);
        }
        // Strict: refuses a non-canonical S and small-order R, so a signature has one form.
        key.public_key
            .verify_strict(
                &self.signed_message(),
                &Signature::from_bytes(&self.signature),
            )
            .map_err(|_| Verdict::BadSignature)?;
        // `now >= issued_at - skew`, rearranged so that nothing can underflow; saturation
        // is exact here because the true sum exceeding u64::MAX also satisfies the check.
        if now.saturating_add(skew) < self.issued_at {
            return Err(Verdict::NotYetValid);
        }
        let token = VerifiedToken {
            issuer_id: self.issuer_id,
            key_id: self.key_id,
            issued_at: self.issued_at,
            ttl: self.ttl,
            token: self.token,
        };
        if now > token.valid_until(skew) {
            return Err(Verdict::Expired);
        }
        Ok(token)
    }

    /// The issuer's number in the hub operator's registry.
    pub fn issuer_id(&self) -> u16 {
        self.issuer_id
    }

    /// Which of the issuer's keys signed (or claims to have signed) the code.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// When the issuer made the code, by the issuer's clock.
    pub fn issued_at(&self) -> UnixSeconds {
        self.issued_at
    }

    /// Seconds the code is valid, 1..=60.
    pub fn ttl(&self) -> u8 {
        self.ttl
    }

    /// The code's one-time token.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The 29-byte body as it was scanned.
    pub fn body(&self) -> &[u8; BODY_LEN] {
        &self.body
    }

    /// The signature as it was scanned.
    pub fn signature(&self) -> &[u8; SIGNATURE_LEN] {
        &self.signature
    }

    /// What the issuer signs: the domain tag, then the body.
    pub fn signed_message(&self) -> [u8; DOMAIN_TAG.len() + BODY_LEN] {
        signed_message(&self.body)
    }

    /// The code's text form; parsing it gives this payload back.
    pub fn to_text(&self) -> String {
        encode_text(&self.body, &self.signature)
    }
}

/// A scanned code that passed checks 2 to 9. Only [`verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    issuer_id: u16,
    key_id: u8,
    issued_at: UnixSeconds,
    ttl: u8,
    token: Token,
}

impl VerifiedToken {
    /// The issuer's number in the hub operator's registry.
    pub fn issuer_id(&self) -> u16 {
        self.issuer_id
    }

    /// Which of the issuer's keys signed the code.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// When the issuer made the code, by the issuer's clock.
    pub fn issued_at(&self) -> UnixSeconds {
        self.issued_at
    }

    /// Seconds the code is valid, 1..=60.
    pub fn ttl(&self) -> u8 {
        self.ttl
    }

    /// The code's one-time token.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The last second at which the code is still accepted with clock tolerance `skew`:
    /// `issued_at + ttl + skew`, saturating at `u64::MAX`.
    pub fn valid_until(&self, skew: u64) -> UnixSeconds {
        self.issued_at
            .saturating_add(u64::from(self.ttl))
            .saturating_add(skew)
    }
}

/// Checks 2 to 9 of the spec, in the spec's order: the scanned `text` is a well-formed KP1
/// code, signed by a key in `keyring` that was valid when the code was issued, and fresh at
/// `now` with clock tolerance `skew` seconds. Never panics, whatever the input.
pub fn verify(
    text: &str,
    keyring: &Keyring,
    now: UnixSeconds,
    skew: u64,
) -> Result<VerifiedToken, Verdict> {
    Payload::parse(text)?.verify(keyring, now, skew)
}

fn signed_message(body: &[u8; BODY_LEN]) -> [u8; DOMAIN_TAG.len() + BODY_LEN] {
    let mut message = [0u8; DOMAIN_TAG.len() + BODY_LEN];
    message[..DOMAIN_TAG.len()].copy_from_slice(DOMAIN_TAG);
    message[DOMAIN_TAG.len()..].copy_from_slice(body);
    message
}

/// Lays out a body. Takes any `version` and `ttl`, so tests can build codes the edge refuses.
pub fn encode_body(
    version: u8,
    issuer_id: u16,
    key_id: u8,
    issued_at: UnixSeconds,
    ttl: u8,
    token: &Token,
) -> [u8; BODY_LEN] {
    let mut body = [0u8; BODY_LEN];
    body[0] = version;
    body[1..3].copy_from_slice(&issuer_id.to_be_bytes());
    body[3] = key_id;
    body[4..12].copy_from_slice(&issued_at.to_be_bytes());
    body[12] = ttl;
    body[13..29].copy_from_slice(&token.0);
    body
}

/// The text form of a body and signature: `KP1:` then base45 of both. No checks.
pub fn encode_text(body: &[u8; BODY_LEN], signature: &[u8; SIGNATURE_LEN]) -> String {
    let mut bytes = [0u8; PAYLOAD_LEN];
    bytes[..BODY_LEN].copy_from_slice(body);
    bytes[BODY_LEN..].copy_from_slice(signature);
    let mut text = String::with_capacity(TEXT_LEN);
    text.push_str(PREFIX);
    text.push_str(&base45::encode(&bytes));
    text
}

/// Why a keyring, or one key of it, was refused.
#[derive(Debug, Error)]
pub enum KeyringError {
    /// Not JSON of the keyring file form.
    #[error(
        "the keyring is not in the KP1 keyring file form ({0}); expected \
         {{\"issuers\": [{{\"issuer_id\", \"key_id\", \"name\", \"public_key\", \"not_before\", \"not_after\"}}]}}"
    )]
    Format(serde_json::Error),
    /// `public_key` is not 64 hex characters.
    #[error(
        "issuer {issuer_id} key {key_id}: public_key must be 64 hex characters ({reason}); \
         correct the entry or get a fresh keyring from the hub"
    )]
    PublicKeyHex {
        /// The entry's issuer.
        issuer_id: u16,
        /// The entry's key.
        key_id: u8,
        /// What is wrong with the hex.
        reason: hex::FromHexError,
    },
    /// 32 bytes that are not an Ed25519 point.
    #[error(
        "issuer {issuer_id} key {key_id}: public_key is not a valid Ed25519 public key; \
         correct the entry or get a fresh keyring from the hub"
    )]
    PublicKeyInvalid {
        /// The entry's issuer.
        issuer_id: u16,
        /// The entry's key.
        key_id: u8,
    },
    /// A small-order point, for which signatures can be forged without any secret.
    #[error(
        "issuer {issuer_id} key {key_id}: public_key is a weak (small-order) key that anyone \
         could sign for; it is refused, remove the entry and ask the issuer for its real key"
    )]
    WeakKey {
        /// The entry's issuer.
        issuer_id: u16,
        /// The entry's key.
        key_id: u8,
    },
    /// Two entries for one `(issuer_id, key_id)`.
    #[error(
        "issuer {issuer_id} key {key_id} appears more than once; keep a single entry per \
         (issuer_id, key_id)"
    )]
    Duplicate {
        /// The repeated issuer.
        issuer_id: u16,
        /// The repeated key.
        key_id: u8,
    },
}

/// One trusted issuer key, its public key parsed once and kept for every scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerKey {
    issuer_id: u16,
    key_id: u8,
    name: String,
    public_key: VerifyingKey,
    not_before: UnixSeconds,
    not_after: UnixSeconds,
}

impl IssuerKey {
    /// Checks and wraps one keyring entry. Refuses bytes that are not an Ed25519 point and
    /// small-order (weak) keys.
    pub fn new(
        issuer_id: u16,
        key_id: u8,
        name: impl Into<String>,
        public_key: &[u8; 32],
        not_before: UnixSeconds,
        not_after: UnixSeconds,
    ) -> Result<IssuerKey, KeyringError> {
        let public_key = VerifyingKey::from_bytes(public_key)
            .map_err(|_| KeyringError::PublicKeyInvalid { issuer_id, key_id })?;
        if public_key.is_weak() {
            return Err(KeyringError::WeakKey { issuer_id, key_id });
        }
        Ok(IssuerKey {
            issuer_id,
            key_id,
            name: name.into(),
            public_key,
            not_before,
            not_after,
        })
    }

    /// The issuer's number in the hub operator's registry.
    pub fn issuer_id(&self) -> u16 {
        self.issuer_id
    }

    /// Which of the issuer's keys this is.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// The issuer's name, for people ("naver").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The parsed public key.
    pub fn public_key(&self) -> &VerifyingKey {
        &self.public_key
    }

    /// The public key as 64 lower-case hex characters, as in the keyring file.
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.public_key.as_bytes())
    }

    /// First second of issue this key is valid for.
    pub fn not_before(&self) -> UnixSeconds {
        self.not_before
    }

    /// First second of issue this key is no longer valid for.
    pub fn not_after(&self) -> UnixSeconds {
        self.not_after
    }

    /// Whether a code issued at `issued_at` may be signed by this key:
    /// `not_before <= issued_at < not_after`.
    pub fn covers(&self, issued_at: UnixSeconds) -> bool {
        self.not_before <= issued_at && issued_at < self.not_after
    }
}

/// The keyring file form (`spec/qr-token-v1.md`), one entry.
#[derive(Serialize, Deserialize)]
struct IssuerKeyFile {
    issuer_id: u16,
    key_id: u8,
    name: String,
    public_key: String,
    not_before: UnixSeconds,
    not_after: UnixSeconds,
}

/// The keyring file form (`spec/qr-token-v1.md`).
#[derive(Serialize, Deserialize)]
struct KeyringFile {
    issuers: Vec<IssuerKeyFile>,
}

/// The issuer keys this edge node trusts, from the hub (at enrollment and on every sync).
///
/// Serializes to the spec's file form with entries sorted by `(issuer_id, key_id)`;
/// deserializing checks every key as [`Keyring::from_json`] does, so a `Keyring` inside an
/// enrollment ticket is as trustworthy as one read from a file. Removing a key is how a
/// compromised key is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "KeyringFile", into = "KeyringFile")]
pub struct Keyring {
    keys: BTreeMap<(u16, u8), IssuerKey>,
}

impl Keyring {
    /// An empty keyring: every code is `unknown_key`.
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Parses and checks the keyring file form.
    pub fn from_json(json: &str) -> Result<Keyring, KeyringError> {
        let file: KeyringFile = serde_json::from_str(json).map_err(KeyringError::Format)?;
        Keyring::try_from(file)
    }

    /// The keyring file form, entries sorted by `(issuer_id, key_id)`.
    pub fn to_json(&self) -> String {
        // Serializing strings and integers into a String cannot fail.
        serde_json::to_string(&KeyringFile::from(self.clone()))
            .unwrap_or_else(|e| unreachable!("serializing a keyring failed: {e}"))
    }

    /// Adds a key; refuses a second key with the same `(issuer_id, key_id)`.
    pub fn insert(&mut self, key: IssuerKey) -> Result<(), KeyringError> {
        let id = (key.issuer_id, key.key_id);
        if self.keys.contains_key(&id) {
            return Err(KeyringError::Duplicate {
                issuer_id: id.0,
                key_id: id.1,
            });
        }
        self.keys.insert(id, key);
        Ok(())
    }

    /// Removes (revokes) a key, returning it if it was there.
    pub fn remove(&mut self, issuer_id: u16, key_id: u8) -> Option<IssuerKey> {
        self.keys.remove(&(issuer_id, key_id))
    }

    /// The key `(issuer_id, key_id)`, if trusted.
    pub fn get(&self, issuer_id: u16, key_id: u8) -> Option<&IssuerKey> {
        self.keys.get(&(issuer_id, key_id))
    }

    /// All keys, sorted by `(issuer_id, key_id)`.
    pub fn iter(&self) -> impl Iterator<Item = &IssuerKey> {
        self.keys.values()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl TryFrom<KeyringFile> for Keyring {
    type Error = KeyringError;

    fn try_from(file: KeyringFile) -> Result<Keyring, KeyringError> {
        let mut keyring = Keyring::new();
        for entry in file.issuers {
            let (issuer_id, key_id) = (entry.issuer_id, entry.key_id);
            let mut public_key = [0u8; 32];
            hex::decode_to_slice(&entry.public_key, &mut public_key).map_err(|reason| {
                KeyringError::PublicKeyHex {
                    issuer_id,
                    key_id,
                    reason,
                }
            })?;
            keyring.insert(IssuerKey::new(
                issuer_id,
                key_id,
                entry.name,
                &public_key,
                entry.not_before,
                entry.not_after,
            )?)?;
        }
        Ok(keyring)
    }
}

impl From<Keyring> for KeyringFile {
    fn from(keyring: Keyring) -> KeyringFile {
        KeyringFile {
            issuers: keyring
                .keys
                .into_values()
                .map(|key| IssuerKeyFile {
                    public_key: key.public_key_hex(),
                    issuer_id: key.issuer_id,
                    key_id: key.key_id,
                    name: key.name,
                    not_before: key.not_before,
                    not_after: key.not_after,
                })
                .collect(),
        }
    }
}

/// An issuer for tests, the demo and the simulation: makes KP1 codes from a known seed.
///
/// Real issuers are third-party apps; this one exists so that everything downstream of the
/// scanner can be exercised with genuine codes. Its seed is a secret only by convention.
pub struct TestIssuer {
    signing_key: SigningKey,
    issuer_id: u16,
    key_id: u8,
}

impl fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestIssuer")
            .field("issuer_id", &self.issuer_id)
            .field("key_id", &self.key_id)
            .field(
                "public_key",
                &hex::encode(self.signing_key.verifying_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

impl TestIssuer {
    /// The issuer key `(issuer_id, key_id)` whose Ed25519 secret is `seed`.
    pub fn new(seed: [u8; 32], issuer_id: u16, key_id: u8) -> TestIssuer {
        TestIssuer {
            signing_key: SigningKey::from_bytes(&seed),
            issuer_id,
            key_id,
        }
    }

    /// The issuer's number.
    pub fn issuer_id(&self) -> u16 {
        self.issuer_id
    }

    /// The signing key's number.
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// The public key.
    pub fn public_key(&self) -> VerifyingKey {
        self.signing_key.verifying_key()
    }

    /// A genuine code: version 1, signed over the domain tag and body.
    pub fn issue(&self, issued_at: UnixSeconds, ttl: u8, token: [u8; 16]) -> String {
        self.issue_raw(VERSION, issued_at, ttl, token)
    }

    /// A genuine code with a fresh random token, and that token.
    pub fn issue_random(
        &self,
        rng: &mut impl rand_core::RngCore,
        issued_at: UnixSeconds,
        ttl: u8,
    ) -> (String, Token) {
        let mut token = [0u8; 16];
        rng.fill_bytes(&mut token);
        (self.issue(issued_at, ttl, token), Token(token))
    }

    /// A correctly signed code with any `version` and `ttl`, including ones the edge refuses.
    pub fn issue_raw(
        &self,
        version: u8,
        issued_at: UnixSeconds,
        ttl: u8,
        token: [u8; 16],
    ) -> String {
        let body = encode_body(
            version,
            self.issuer_id,
            self.key_id,
            issued_at,
            ttl,
            &Token(token),
        );
        encode_text(&body, &self.sign(&signed_message(&body)))
    }

    /// Signs arbitrary bytes with the issuer key, for codes signed the wrong way.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.signing_key.sign(message).to_bytes()
    }

    /// This key as a keyring entry valid for codes issued in `[not_before, not_after)`.
    pub fn keyring_entry(
        &self,
        name: impl Into<String>,
        not_before: UnixSeconds,
        not_after: UnixSeconds,
    ) -> IssuerKey {
        IssuerKey {
            issuer_id: self.issuer_id,
            key_id: self.key_id,
            name: name.into(),
            // A key derived from a secret scalar is never small-order: no check needed.
            public_key: self.signing_key.verifying_key(),
            not_before,
            not_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: UnixSeconds = 1_790_000_000;
    const TOKEN: [u8; 16] = [0xa5; 16];

    fn issuer() -> TestIssuer {
        TestIssuer::new([0x11; 32], 1, 1)
    }

    fn keyring() -> Keyring {
        let mut keyring = Keyring::new();
        keyring
            .insert(issuer().keyring_entry("one", T0 - 1_000, T0 + 1_000))
            .unwrap();
        keyring
    }

    fn verdict(text: &str, keyring: &Keyring, now: UnixSeconds, skew: u64) -> Verdict {
        match verify(text, keyring, now, skew) {
            Ok(_) => Verdict::Accepted,
            Err(v) => v,
        }
    }

    #[test]
    fn issued_code_has_the_spec_layout_and_verifies() {
        let text = issuer().issue(T0, 15, TOKEN);
        assert_eq!(text.len(), TEXT_LEN);
        assert_eq!(TEXT_LEN, 144);
        let payload = Payload::parse(&text).unwrap();
        assert_eq!(payload.issuer_id(), 1);
        assert_eq!(payload.key_id(), 1);
        assert_eq!(payload.issued_at(), T0);
        assert_eq!(payload.ttl(), 15);
        assert_eq!(payload.token(), Token(TOKEN));
        assert_eq!(payload.to_text(), text);
        assert_eq!(&payload.signed_message()[..7], b"KP1-QR\0");

        let verified = verify(&text, &keyring(), T0, DEFAULT_SKEW).unwrap();
        assert_eq!(
            (
                verified.issuer_id(),
                verified.key_id(),
                verified.issued_at()
            ),
            (1, 1, T0)
        );
        assert_eq!(verified.ttl(), 15);
        assert_eq!(verified.token(), Token(TOKEN));
        assert_eq!(verified.valid_until(10), T0 + 25);
    }

    #[test]
    fn one_trailing_line_ending_is_ignored_and_nothing_else() {
        let text = issuer().issue(T0, 15, TOKEN);
        let ring = keyring();
        for ok in [format!("{text}\n"), format!("{text}\r\n")] {
            assert_eq!(verdict(&ok, &ring, T0, 10), Verdict::Accepted, "{ok:?}");
        }
        for bad in [
            format!("{text}\n\n"),
            format!("{text}\r"),
            format!("{text} "),
            format!(" {text}"),
            format!("\n{text}"),
            text.replacen("KP1:", "kp1:", 1),
        ] {
            assert_eq!(verdict(&bad, &ring, T0, 10), Verdict::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn malformed_reasons_tell_wrong_code_from_damaged_code() {
        let text = issuer().issue(T0, 15, TOKEN);
        assert_eq!(
            malformed_reason("https://example.com/"),
            Some(Malformed::NotCheckInCode)
        );
        assert_eq!(malformed_reason(""), Some(Malformed::NotCheckInCode));
        assert!(!Malformed::NotCheckInCode.is_check_in_code());
        assert!(matches!(
            malformed_reason(&text[..text.len() - 2]),
            Some(Malformed::WrongLength { len: 92 })
        ));
        assert!(matches!(
            malformed_reason(&text[..text.len() - 1]),
            Some(Malformed::Base45(Base45Error::BadLength { .. }))
        ));
        assert!(matches!(
            malformed_reason(&format!("{text}{}", "0".repeat(10_000))),
            Some(Malformed::WrongLength { .. })
        ));
        assert_eq!(
            malformed_reason(&issuer().issue_raw(1, T0, 61, TOKEN)),
            Some(Malformed::TtlOutOfRange { ttl: 61 })
        );
        assert_eq!(malformed_reason(&text), None);
        // Version is check 3: not malformed, even with a bad ttl too.
        assert_eq!(malformed_reason(&issuer().issue_raw(2, T0, 0, TOKEN)), None);
        let reason = malformed_reason("KP1:abc").unwrap();
        assert!(reason.is_check_in_code());
        assert_ne!(reason.message_en(), Malformed::NotCheckInCode.message_en());
        assert!(
            Malformed::NotCheckInCode
                .message_en()
                .contains("not a check-in code")
        );
        assert!(
            Malformed::NotCheckInCode
                .message_ko()
                .contains("체크인 코드가 아닙니다")
        );
    }

    #[test]
    fn ttl_bounds() {
        let ring = keyring();
        for (ttl, expected) in [
            (0, Verdict::Malformed),
            (1, Verdict::Accepted),
            (60, Verdict::Accepted),
            (61, Verdict::Malformed),
            (255, Verdict::Malformed),
        ] {
            let text = issuer().issue(T0, ttl, TOKEN);
            assert_eq!(verdict(&text, &ring, T0, 10), expected, "ttl {ttl}");
        }
    }

    #[test]
    fn checks_run_in_the_spec_order() {
        let ring = keyring();
        let me = issuer();
        let stranger = TestIssuer::new([0x22; 32], 1, 1);
        let unknown = TestIssuer::new([0x11; 32], 1, 2);
        // Each case fails two checks; the earlier one must win.
        let cases = [
            (
                "version 2 and ttl 0",
                me.issue_raw(2, T0, 0, TOKEN),
                T0,
                Verdict::UnsupportedVersion,
            ),
            (
                "ttl 0 and unknown key",
                unknown.issue_raw(1, T0, 0, TOKEN),
                T0,
                Verdict::Malformed,
            ),
            (
                "unknown key and expired",
                unknown.issue(T0, 15, TOKEN),
                T0 + 999,
                Verdict::UnknownKey,
            ),
            (
                "key window and bad signature",
                stranger.issue(T0 + 1_000, 15, TOKEN),
                T0 + 1_000,
                Verdict::KeyNotValid,
            ),
            (
                "bad signature and expired",
                stranger.issue(T0, 15, TOKEN),
                T0 + 999,
                Verdict::BadSignature,
            ),
            (
                "bad signature and not yet valid",
                stranger.issue(T0, 15, TOKEN),
                0,
                Verdict::BadSignature,
            ),
        ];
        for (name, text, now, expected) in cases {
            assert_eq!(verdict(&text, &ring, now, 10), expected, "{name}");
        }
    }

    #[test]
    fn key_window_is_half_open() {
        let ring = keyring();
        for (issued_at, expected) in [
            (T0 - 1_001, Verdict::KeyNotValid),
            (T0 - 1_000, Verdict::Accepted),
            (T0 + 999, Verdict::Accepted),
            (T0 + 1_000, Verdict::KeyNotValid),
        ] {
            let text = issuer().issue(issued_at, 15, TOKEN);
            assert_eq!(
                verdict(&text, &ring, issued_at, 10),
                expected,
                "issued at {issued_at}"
            );
        }
    }

    #[test]
    fn time_window_edges() {
        let ring = keyring();
        let text = issuer().issue(T0, 15, TOKEN);
        for (now, expected) in [
            (T0 - 11, Verdict::NotYetValid),
            (T0 - 10, Verdict::Accepted),
            (T0 + 25, Verdict::Accepted),
            (T0 + 26, Verdict::Expired),
            (0, Verdict::NotYetValid),
            (u64::MAX, Verdict::Expired),
        ] {
            assert_eq!(verdict(&text, &ring, now, 10), expected, "now {now}");
        }
        // A zero skew is exact.
        assert_eq!(verdict(&text, &ring, T0 - 1, 0), Verdict::NotYetValid);
        assert_eq!(verdict(&text, &ring, T0 + 15, 0), Verdict::Accepted);
        assert_eq!(verdict(&text, &ring, T0 + 16, 0), Verdict::Expired);
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let mut ring = Keyring::new();
        ring.insert(issuer().keyring_entry("all time", 0, u64::MAX))
            .unwrap();
        let late = issuer().issue(u64::MAX - 1, 60, TOKEN);
        assert_eq!(verdict(&late, &ring, u64::MAX, 10), Verdict::Accepted);
        assert_eq!(verdict(&late, &ring, u64::MAX, u64::MAX), Verdict::Accepted);
        assert_eq!(verdict(&late, &ring, 0, u64::MAX), Verdict::Accepted);
        assert_eq!(verdict(&late, &ring, 0, 10), Verdict::NotYetValid);
        let verified = verify(&late, &ring, u64::MAX, 10).unwrap();
        assert_eq!(verified.valid_until(u64::MAX), u64::MAX);

        let early = issuer().issue(0, 60, TOKEN);
        assert_eq!(verdict(&early, &ring, 0, 10), Verdict::Accepted);
        assert_eq!(verdict(&early, &ring, 70, 10), Verdict::Accepted);
        assert_eq!(verdict(&early, &ring, 71, 10), Verdict::Expired);
        assert_eq!(verdict(&early, &ring, 5, u64::MAX), Verdict::Accepted);

        // issued_at = u64::MAX can never lie in [not_before, not_after).
        let last = issuer().issue(u64::MAX, 60, TOKEN);
        assert_eq!(verdict(&last, &ring, u64::MAX, 10), Verdict::KeyNotValid);
    }

    #[test]
    fn signature_must_cover_the_domain_tag() {
        let me = issuer();
        let body = encode_body(1, 1, 1, T0, 15, &Token(TOKEN));
        let untagged = encode_text(&body, &me.sign(&body));
        assert_eq!(
            verdict(&untagged, &keyring(), T0, 10),
            Verdict::BadSignature
        );
        let tagged = encode_text(&body, &me.sign(&signed_message(&body)));
        assert_eq!(tagged, me.issue(T0, 15, TOKEN));
    }

    #[test]
    fn non_canonical_signature_scalar_is_refused() {
        // S + l verifies under the lax equation but must fail `verify_strict`.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let me = issuer();
        let payload = Payload::parse(&me.issue(T0, 15, TOKEN)).unwrap();
        let mut signature = *payload.signature();
        // S < l < 2^253, so S + l fits 256 bits without wrapping.
        let mut carry = 0u16;
        for (s, l) in signature[32..].iter_mut().zip(L) {
            let sum = u16::from(*s) + u16::from(l) + carry;
            *s = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(carry, 0);
        let text = encode_text(payload.body(), &signature);
        assert_eq!(verdict(&text, &keyring(), T0, 10), Verdict::BadSignature);
    }

    #[test]
    fn revoking_a_key_refuses_its_codes() {
        let mut ring = keyring();
        let text = issuer().issue(T0, 15, TOKEN);
        assert!(ring.remove(1, 1).is_some());
        assert!(ring.is_empty());
        assert_eq!(verdict(&text, &ring, T0, 10), Verdict::UnknownKey);
    }

    #[test]
    fn token_debug_never_shows_the_bytes() {
        let token = Token::from_bytes(TOKEN);
        let hex = token.to_hex();
        assert_eq!(hex, "a5".repeat(16));
        assert_eq!(format!("{token:?}"), "Token(..)");
        let text = issuer().issue(T0, 15, TOKEN);
        let payload = Payload::parse(&text).unwrap();
        let verified = verify(&text, &keyring(), T0, 10).unwrap();
        for debug in [format!("{payload:?}"), format!("{verified:?}")] {
            assert!(!debug.contains(&hex), "{debug}");
            assert!(!debug.contains("165"), "{debug}"); // 0xa5 in decimal
            assert!(debug.contains("Token(..)"), "{debug}");
        }
        assert!(!format!("{:?}", issuer()).contains(&"11".repeat(32)));
    }

    #[test]
    fn token_hex_round_trip_and_errors() {
        let token = Token::from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 255]);
        assert_eq!(Token::from_hex(&token.to_hex()), Ok(token));
        assert_eq!(Token::from_hex(&token.to_hex().to_uppercase()), Ok(token));
        assert_eq!(token.as_bytes()[15], 255);
        for bad in ["", "00", &"0".repeat(31), &"0".repeat(34), &"g".repeat(32)] {
            assert!(Token::from_hex(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn verdict_names_messages_and_serde() {
        let names = [
            "accepted",
            "no_code",
            "malformed",
            "unsupported_version",
            "unknown_key",
            "key_not_valid",
            "bad_signature",
            "not_yet_valid",
            "expired",
            "duplicate",
        ];
        for (verdict, name) in Verdict::ALL.into_iter().zip(names) {
            assert_eq!(verdict.as_str(), name);
            assert_eq!(verdict.to_string(), name);
            assert_eq!(name.parse::<Verdict>(), Ok(verdict));
            assert_eq!(
                serde_json::to_string(&verdict).unwrap(),
                format!("\"{name}\"")
            );
            assert_eq!(
                serde_json::from_str::<Verdict>(&format!("\"{name}\"")).unwrap(),
                verdict
            );
            assert!(!verdict.message_ko().is_empty() && !verdict.message_en().is_empty());
        }
        assert!("Accepted".parse::<Verdict>().is_err());
        assert_eq!(Verdict::Accepted.message_ko(), "인증되었습니다");
        assert_eq!(Verdict::Accepted.message_en(), "Verified");
        assert!(
            Verdict::Duplicate
                .message_en()
                .contains("already checked in")
        );
        assert!(Verdict::Expired.message_en().contains("Refresh"));
        assert!(Verdict::NotYetValid.message_en().contains("Refresh"));
        assert!(Verdict::UnknownKey.message_en().contains("paper log"));
        assert!(Verdict::NoCode.message_en().contains("camera"));
        assert!(Verdict::Duplicate.is_checked_in() && Verdict::Accepted.is_checked_in());
        assert!(!Verdict::Expired.is_checked_in());
    }

    fn entry_json(issuer_id: u16, key_id: u8, public_key: &str) -> String {
        format!(
            r#"{{"issuer_id":{issuer_id},"key_id":{key_id},"name":"x","public_key":"{public_key}","not_before":0,"not_after":10}}"#
        )
    }

    fn keyring_json(entries: &[String]) -> String {
        format!(r#"{{"issuers":[{}]}}"#, entries.join(","))
    }

    #[test]
    fn keyring_round_trips_sorted_and_caches_keys() {
        let a = TestIssuer::new([0x11; 32], 2, 7);
        let b = TestIssuer::new([0x12; 32], 1, 1);
        let a_hex = hex::encode(a.public_key().as_bytes());
        let b_hex = hex::encode(b.public_key().as_bytes());
        let json = keyring_json(&[entry_json(2, 7, &a_hex), entry_json(1, 1, &b_hex)]);
        let ring = Keyring::from_json(&json).unwrap();
        assert_eq!(ring.len(), 2);
        let key = ring.get(2, 7).unwrap();
        assert_eq!(key.public_key(), &a.public_key());
        assert_eq!(
            (key.name(), key.not_before(), key.not_after()),
            ("x", 0, 10)
        );
        assert!(ring.get(7, 2).is_none());
        let ids: Vec<_> = ring.iter().map(|k| (k.issuer_id(), k.key_id())).collect();
        assert_eq!(ids, [(1, 1), (2, 7)]);

        let out = ring.to_json();
        assert_eq!(
            out,
            keyring_json(&[entry_json(1, 1, &b_hex), entry_json(2, 7, &a_hex)])
        );
        assert_eq!(Keyring::from_json(&out).unwrap(), ring);
        // Through serde, as inside an enrollment ticket.
        let via_serde: Keyring =
            serde_json::from_str(&serde_json::to_string(&ring).unwrap()).unwrap();
        assert_eq!(via_serde, ring);
        assert_eq!(
            Keyring::from_json(r#"{"issuers":[]}"#).unwrap(),
            Keyring::new()
        );
    }

    #[test]
    fn keyring_refuses_bad_entries() {
        let good = hex::encode(issuer().public_key().as_bytes());
        // The identity point: a valid encoding of a small-order point.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        // y = 2 is not the y-coordinate of any curve point.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert!(VerifyingKey::from_bytes(&off_curve).is_err());

        type IsExpected = fn(&KeyringError) -> bool;
        let cases: [(String, IsExpected); 7] = [
            ("not json".to_owned(), |e| {
                matches!(e, KeyringError::Format(_))
            }),
            (r#"{"keys":[]}"#.to_owned(), |e| {
                matches!(e, KeyringError::Format(_))
            }),
            (keyring_json(&[entry_json(1, 1, &good[..62])]), |e| {
                matches!(e, KeyringError::PublicKeyHex { .. })
            }),
            (
                keyring_json(&[entry_json(1, 1, &good.replace(&good[..2], "zz"))]),
                |e| matches!(e, KeyringError::PublicKeyHex { .. }),
            ),
            (
                keyring_json(&[entry_json(1, 1, &hex::encode(off_curve))]),
                |e| {
                    matches!(
                        e,
                        KeyringError::PublicKeyInvalid {
                            issuer_id: 1,
                            key_id: 1
                        }
                    )
                },
            ),
            (
                keyring_json(&[entry_json(3, 4, &hex::encode(identity))]),
                |e| {
                    matches!(
                        e,
                        KeyringError::WeakKey {
                            issuer_id: 3,
                            key_id: 4
                        }
                    )
                },
            ),
            (
                keyring_json(&[entry_json(1, 1, &good), entry_json(1, 1, &good)]),
                |e| {
                    matches!(
                        e,
                        KeyringError::Duplicate {
                            issuer_id: 1,
                            key_id: 1
                        }
                    )
                },
            ),
        ];
        for (json, expected) in cases {
            let err = Keyring::from_json(&json).unwrap_err();
            assert!(expected(&err), "{json}: {err}");
            // Deserializing through serde refuses the same input.
            assert!(serde_json::from_str::<Keyring>(&json).is_err(), "{json}");
        }
        // issuer_id is a u16.
        let too_big = keyring_json(&[entry_json(1, 1, &good)]).replace(":1,", ":70000,");
        assert!(matches!(
            Keyring::from_json(&too_big),
            Err(KeyringError::Format(_))
        ));
    }

    proptest! {
        #[test]
        fn issued_codes_verify_throughout_their_window(
            issued_at in 1_000u64..u64::MAX / 2,
            ttl in MIN_TTL..=MAX_TTL,
            skew in 0u64..120,
            offset in 0u64..1_000,
            token in any::<[u8; 16]>(),
        ) {
            let mut ring = Keyring::new();
            ring.insert(issuer().keyring_entry("one", 0, u64::MAX)).unwrap();
            let text = issuer().issue(issued_at, ttl, token);
            let first = issued_at - skew.min(issued_at);
            let last = issued_at + u64::from(ttl) + skew;
            let now = first + offset % (last - first + 1);
            let verified = verify(&text, &ring, now, skew);
            prop_assert!(verified.is_ok(), "now {now}: {verified:?}");
            let verified = verified.unwrap();
            prop_assert_eq!(verified.token(), Token(token));
            prop_assert_eq!(verified.valid_until(skew), last);
            prop_assert_eq!(verdict(&text, &ring, last + 1, skew), Verdict::Expired);
            if first > 0 {
                prop_assert_eq!(verdict(&text, &ring, first - 1, skew), Verdict::NotYetValid);
            }
        }

        #[test]
        fn changing_one_character_never_forges_a_code(
            token in any::<[u8; 16]>(),
            index in 0usize..TEXT_LEN,
            replacement in any::<char>(),
        ) {
            let text = issuer().issue(T0, 15, token);
            let original = Payload::parse(&text).unwrap();
            let mut chars: Vec<char> = text.chars().collect();
            prop_assume!(chars[index] != replacement);
            chars[index] = replacement;
            let mutated: String = chars.into_iter().collect();
            if verify(&mutated, &keyring(), T0, 10).is_ok() {
                let parsed = Payload::parse(&mutated).unwrap();
                prop_assert_eq!(parsed.body(), original.body());
                prop_assert_eq!(parsed.signature(), original.signature());
            }
        }

        #[test]
        fn changing_one_alphabet_character_never_forges_a_code(
            token in any::<[u8; 16]>(),
            index in PREFIX.len()..TEXT_LEN,
            replacement in 0usize..45,
        ) {
            // Replacements from the base45 alphabet get past the decoder far more often
            // than arbitrary characters, so they exercise the signature check.
            let text = issuer().issue(T0, 15, token);
            let original = Payload::parse(&text).unwrap();
            let mut bytes = text.into_bytes();
            prop_assume!(bytes[index] != base45::ALPHABET[replacement]);
            bytes[index] = base45::ALPHABET[replacement];
            let mutated = String::from_utf8(bytes).unwrap();
            if verify(&mutated, &keyring(), T0, 10).is_ok() {
                let parsed = Payload::parse(&mutated).unwrap();
                prop_assert_eq!(parsed.body(), original.body());
                prop_assert_eq!(parsed.signature(), original.signature());
            }
        }

        #[test]
        fn verify_never_panics(text in any::<String>(), now in any::<u64>(), skew in any::<u64>()) {
            let _ = verify(&text, &keyring(), now, skew);
            let _ = malformed_reason(&text);
        }

        #[test]
        fn verify_never_panics_on_kp1_shaped_text(
            body in "[0-9A-Z $%*+\\-./:]{0,150}",
            now in any::<u64>(),
            skew in any::<u64>(),
        ) {
            let _ = verify(&format!("{PREFIX}{body}"), &keyring(), now, skew);
        }
    }
}
