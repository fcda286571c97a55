//! Paper-log entries: the fallback for visitors without a QR code, who write their name and
//! phone number, or their personal safe number (개인안심번호), instead.
//!
//! An entry is checked ([`PaperEntry::validate`]), then sealed with age to the health
//! authority's key ([`PaperEntry::seal_for_authority`]); the sealed bytes go into an ordinary
//! record envelope (`RecordBody::Paper`). So the hub can see that a paper entry exists and when,
//! never whose it is: only the authority's identity opens it.
//!
//! The sealed plaintext is postcard: the first version's seven fields (name, phone,
//! visited_at, consent_collect, consent_share, guardian_consent, remarks), then, only when the
//! visitor gave a personal safe number, an extension holding it. An entry without a safe number
//! seals to exactly the first version's bytes, so older entries open unchanged and older
//! openers still open phone-only entries.

use crate::time::UnixSeconds;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use zeroize::Zeroizing;

/// Longest name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Shortest and longest phone number, in characters.
pub const PHONE_CHARS: std::ops::RangeInclusive<usize> = 4..=20;
/// Fewest digits in a phone number.
pub const MIN_PHONE_DIGITS: usize = 4;
/// Characters of a personal safe number (개인안심번호): four ASCII digits and two Hangul
/// syllables, in any order (`12가34나`, `1가23나4`), as the issuer apps showed it from 2021.
pub const SAFE_NUMBER_CHARS: usize = 6;
/// Longest remarks, in characters.
pub const MAX_REMARKS_CHARS: usize = 500;
/// Largest sealed entry accepted for opening. The largest valid entry (all text at four bytes
/// a character) seals to under 3 KiB.
pub const MAX_SEALED_PAPER_BYTES: usize = 4096;

/// A paper entry was refused, or could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaperError {
    /// A required consent was not given.
    #[error(
        "the visitor did not consent to {which}; an entry without both consents cannot be \
         kept: ask the visitor, or do not record the entry"
    )]
    ConsentMissing {
        /// Which consent is missing.
        which: &'static str,
    },
    /// The name is empty, too long or has control characters. (The name itself is not
    /// repeated here: error messages end up in logs.)
    #[error(
        "name must be 1 to {MAX_NAME_CHARS} characters, not all blank, with no control \
         characters (got {chars} characters, control characters: {control})"
    )]
    BadName {
        /// Characters in the name.
        chars: usize,
        /// Whether it had control characters.
        control: bool,
    },
    /// The phone number is not of the allowed form.
    #[error(
        "phone number must be 4 to 20 characters of digits, '+', '-' and spaces, with at \
         least {MIN_PHONE_DIGITS} digits (got {chars} characters)"
    )]
    BadPhone {
        /// Characters in the phone number.
        chars: usize,
    },
    /// Neither a phone number nor a personal safe number was given.
    #[error(
        "give the visitor's phone number or their personal safe number (개인안심번호, shown \
         under the QR code in the issuer app); nothing was recorded"
    )]
    ContactMissing,
    /// The personal safe number is not of its form. (The value is not repeated: it identifies
    /// a person.)
    #[error(
        "personal safe number (개인안심번호) must be {SAFE_NUMBER_CHARS} characters: 4 digits \
         and 2 Hangul syllables in any order, as the issuer app shows it (e.g. 12가34나), \
         with no spaces (got {chars} characters, {digits} digits, {hangul} Hangul syllables)"
    )]
    BadSafeNumber {
        /// Characters given.
        chars: usize,
        /// Digits among them.
        digits: usize,
        /// Hangul syllables among them.
        hangul: usize,
    },
    /// The remarks are too long or have control characters.
    #[error(
        "remarks must be at most {MAX_REMARKS_CHARS} characters with no control characters \
         other than line breaks and tabs (got {chars} characters)"
    )]
    BadRemarks {
        /// Characters in the remarks.
        chars: usize,
    },
    /// The authority key is not an age recipient.
    #[error(
        "health authority key is not an age X25519 recipient (\"age1...\"): {0}; check the \
         enrollment ticket"
    )]
    BadAuthorityKey(&'static str),
    /// age failed to encrypt.
    #[error("sealing the paper entry with age failed: {0}")]
    Seal(String),
    /// The sealed entry is implausibly large.
    #[error(
        "sealed paper entry of {len} bytes exceeds the {MAX_SEALED_PAPER_BYTES}-byte limit: \
         it is damaged or not a paper entry"
    )]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// age could not decrypt.
    #[error(
        "cannot open the sealed paper entry: {0}; it was sealed to another authority key or \
         is damaged"
    )]
    Open(String),
    /// It decrypted but is not a valid entry.
    #[error("the sealed paper entry decrypted to something that is not a valid entry: {0}")]
    Malformed(String),
}

/// One handwritten visit, as typed in at the facility.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaperEntry {
    /// The visitor's name.
    pub name: String,
    /// The visitor's phone number; empty when they gave a personal safe number instead.
    pub phone: String,
    /// The visitor's personal safe number (개인안심번호), written instead of (or beside) the
    /// phone number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_number: Option<String>,
    /// When the visit happened.
    pub visited_at: UnixSeconds,
    /// Consent to collecting these details.
    pub consent_collect: bool,
    /// Consent to handing them to the health authority for contact tracing.
    pub consent_share: bool,
    /// A guardian consented for a minor visitor. Recorded as given; the form decides when it
    /// is needed.
    pub guardian_consent: bool,
    /// Free text from staff.
    pub remarks: String,
}

// Name, phone and remarks identify a person; logs must never show them.
impl fmt::Debug for PaperEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PaperEntry")
            .field("name", &"<hidden>")
            .field("phone", &"<hidden>")
            .field(
                "safe_number",
                &self.safe_number.as_ref().map(|_| "<hidden>"),
            )
            .field("visited_at", &self.visited_at)
            .field("consent_collect", &self.consent_collect)
            .field("consent_share", &self.consent_share)
            .field("guardian_consent", &self.guardian_consent)
            .field(
                "remarks",
                &format_args!("<{} chars>", self.remarks.chars().count()),
            )
            .finish()
    }
}

impl PaperEntry {
    /// Checks the entry may be kept: both consents given, name, phone and remarks of the
    /// allowed form, and a way to reach the visitor: a phone number, a personal safe number,
    /// or both.
    pub fn validate(&self) -> Result<(), PaperError> {
        if !self.consent_collect {
            return Err(PaperError::ConsentMissing {
                which: "collection of their details",
            });
        }
        if !self.consent_share {
            return Err(PaperError::ConsentMissing {
                which: "sharing their details with the health authority",
            });
        }
        let name_chars = self.name.chars().count();
        let control = self.name.chars().any(char::is_control);
        if self.name.trim().is_empty() || name_chars > MAX_NAME_CHARS || control {
            return Err(PaperError::BadName {
                chars: name_chars,
                control,
            });
        }
        if self.phone.is_empty() && self.safe_number.is_none() {
            return Err(PaperError::ContactMissing);
        }
        if let Some(n) = &self.safe_number {
            check_safe_number(n)?;
        }
        let phone_chars = self.phone.chars().count();
        let phone_ok = (self.phone.is_empty() && self.safe_number.is_some())
            || (PHONE_CHARS.contains(&phone_chars)
                && self
                    .phone
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '+' || c == '-' || c == ' ')
                && self.phone.chars().filter(char::is_ascii_digit).count() >= MIN_PHONE_DIGITS);
        if !phone_ok {
            return Err(PaperError::BadPhone { chars: phone_chars });
        }
        let remarks_chars = self.remarks.chars().count();
        if remarks_chars > MAX_REMARKS_CHARS
            || self
                .remarks
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err(PaperError::BadRemarks {
                chars: remarks_chars,
            });
        }
        Ok(())
    }

    /// Validates the entry and seals it with age to the health authority's recipient
    /// (`age1...`, from the enrollment ticket).
    pub fn seal_for_authority(&self, authority_recipient: &str) -> Result<Vec<u8>, PaperError> {
        self.validate()?;
        let recipient = age::x25519::Recipient::from_str(authority_recipient)
            .map_err(PaperError::BadAuthorityKey)?;
        let plaintext = Zeroizing::new(self.to_plaintext()?);
        age::encrypt(&recipient, &plaintext).map_err(|e| PaperError::Seal(e.to_string()))
    }

    /// Opens a sealed entry with the health authority's identity. Only valid entries come
    /// out: whatever is sealed to the authority's public key is checked like a new entry.
    pub fn open_as_authority(
        sealed: &[u8],
        identity: &age::x25519::Identity,
    ) -> Result<PaperEntry, PaperError> {
        if sealed.len() > MAX_SEALED_PAPER_BYTES {
            return Err(PaperError::TooLarge { len: sealed.len() });
        }
        let plaintext = Zeroizing::new(
            age::decrypt(identity, sealed).map_err(|e| PaperError::Open(e.to_string()))?,
        );
        let entry = PaperEntry::from_plaintext(&plaintext)?;
        entry
            .validate()
            .map_err(|e| PaperError::Malformed(e.to_string()))?;
        Ok(entry)
    }
}

/// The first version's fields, in their sealed order.
#[derive(Serialize, Deserialize)]
struct SealedV1 {
    name: String,
    phone: String,
    visited_at: UnixSeconds,
    consent_collect: bool,
    consent_share: bool,
    guardian_consent: bool,
    remarks: String,
}

/// What follows the first version's fields when the visitor gave a personal safe number.
#[derive(Serialize, Deserialize)]
struct SealedExtension {
    safe_number: Option<String>,
}

impl PaperEntry {
    /// The sealed plaintext: the first version's bytes, then the extension if there is a safe
    /// number.
    fn to_plaintext(&self) -> Result<Vec<u8>, PaperError> {
        let v1 = SealedV1 {
            name: self.name.clone(),
            phone: self.phone.clone(),
            visited_at: self.visited_at,
            consent_collect: self.consent_collect,
            consent_share: self.consent_share,
            guardian_consent: self.guardian_consent,
            remarks: self.remarks.clone(),
        };
        let seal = |e: postcard::Error| PaperError::Seal(e.to_string());
        let mut out = postcard::to_stdvec(&v1).map_err(seal)?;
        if self.safe_number.is_some() {
            let ext = SealedExtension {
                safe_number: self.safe_number.clone(),
            };
            out.extend(postcard::to_stdvec(&ext).map_err(seal)?);
        }
        Ok(out)
    }

    /// Reads a sealed plaintext of either version.
    fn from_plaintext(bytes: &[u8]) -> Result<PaperEntry, PaperError> {
        let malformed = |e: postcard::Error| PaperError::Malformed(e.to_string());
        let (v1, rest): (SealedV1, _) = postcard::take_from_bytes(bytes).map_err(malformed)?;
        let safe_number = if rest.is_empty() {
            None
        } else {
            let (ext, rest): (SealedExtension, _) =
                postcard::take_from_bytes(rest).map_err(malformed)?;
            if !rest.is_empty() {
                return Err(PaperError::Malformed(format!(
                    "{} trailing bytes",
                    rest.len()
                )));
            }
            ext.safe_number
        };
        Ok(PaperEntry {
            name: v1.name,
            phone: v1.phone,
            safe_number,
            visited_at: v1.visited_at,
            consent_collect: v1.consent_collect,
            consent_share: v1.consent_share,
            guardian_consent: v1.guardian_consent,
            remarks: v1.remarks,
        })
    }
}

/// Checks a personal safe number's form: [`SAFE_NUMBER_CHARS`] characters, four ASCII digits
/// and two precomposed Hangul syllables (가..힣) in any order.
pub fn check_safe_number(n: &str) -> Result<(), PaperError> {
    let chars = n.chars().count();
    let digits = n.chars().filter(char::is_ascii_digit).count();
    let hangul = n.chars().filter(|c| ('가'..='힣').contains(c)).count();
    if chars == SAFE_NUMBER_CHARS && digits == 4 && hangul == 2 {
        Ok(())
    } else {
        Err(PaperError::BadSafeNumber {
            chars,
            digits,
            hangul,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> PaperEntry {
        PaperEntry {
            name: "김민준".into(),
            phone: "010-1234-5678".into(),
            safe_number: None,
            visited_at: 1_700_000_000,
            consent_collect: true,
            consent_share: true,
            guardian_consent: false,
            remarks: String::new(),
        }
    }

    #[test]
    fn valid_entry_passes() {
        assert_eq!(entry().validate(), Ok(()));
        let mut e = entry();
        e.phone = "+82 10 1234 5678".into();
        e.name = "A".repeat(MAX_NAME_CHARS);
        e.remarks = "line one\nline two\twith tab".into();
        assert_eq!(e.validate(), Ok(()));
    }

    #[test]
    fn debug_hides_identity() {
        let text = format!("{:?}", entry());
        assert!(!text.contains("김민준"));
        assert!(!text.contains("1234"));
        assert!(text.contains("<hidden>"));
    }

    #[test]
    fn largest_valid_entry_fits_the_sealed_limit() {
        let e = PaperEntry {
            name: "𝄞".repeat(MAX_NAME_CHARS),
            phone: "1".repeat(20),
            safe_number: Some("힣힣1234".into()),
            visited_at: u64::MAX,
            remarks: "𝄞".repeat(MAX_REMARKS_CHARS),
            ..entry()
        };
        let id = age::x25519::Identity::generate();
        let sealed = e
            .seal_for_authority(&id.to_public().to_string())
            .expect("valid entry seals");
        assert!(sealed.len() <= MAX_SEALED_PAPER_BYTES, "{}", sealed.len());
        assert_eq!(PaperEntry::open_as_authority(&sealed, &id), Ok(e));
    }

    /// A phone-only entry as the first version sealed it (postcard bytes made by the code
    /// before safe numbers existed): it still opens, with no safe number.
    #[test]
    fn first_version_plaintext_still_opens() {
        let old = hex::decode(
            "09eab980ebafbceca4800d3031302d313233342d3536373880e2cfaa0601010006ecb0bdeab080",
        )
        .expect("hex");
        let id = age::x25519::Identity::generate();
        let sealed = age::encrypt(&id.to_public(), &old).expect("seal");
        let opened = PaperEntry::open_as_authority(&sealed, &id).expect("old entry opens");
        assert_eq!(
            opened,
            PaperEntry {
                remarks: "창가".into(),
                ..entry()
            }
        );
        // And a phone-only entry still seals to exactly those bytes.
        assert_eq!(opened.to_plaintext().expect("plaintext"), old);
    }

    #[test]
    fn safe_number_entries_seal_and_open() {
        let id = age::x25519::Identity::generate();
        for (phone, safe) in [("", "12가34나"), ("010-1234-5678", "1가23나4")] {
            let e = PaperEntry {
                phone: phone.into(),
                safe_number: Some(safe.into()),
                ..entry()
            };
            let sealed = e
                .seal_for_authority(&id.to_public().to_string())
                .expect("seals");
            assert_eq!(PaperEntry::open_as_authority(&sealed, &id), Ok(e));
        }
    }

    #[test]
    fn safe_number_form_is_checked() {
        for good in ["12가34나", "가나1234", "1가23나4", "123가4나", "9999힣힣"] {
            assert_eq!(check_safe_number(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "12가34",
            "12가34나5",
            "12가 34나",
            "12ㄱ34나",
            "12ga34na",
            "１２가３４나",
            "1가2나3다",
            "12가34나\n",
        ] {
            let e = PaperEntry {
                phone: String::new(),
                safe_number: Some(bad.into()),
                ..entry()
            };
            assert!(
                matches!(e.validate(), Err(PaperError::BadSafeNumber { .. })),
                "{bad:?}: {:?}",
                e.validate()
            );
        }
    }

    #[test]
    fn a_phone_or_a_safe_number_is_required() {
        let none = PaperEntry {
            phone: String::new(),
            ..entry()
        };
        assert_eq!(none.validate(), Err(PaperError::ContactMissing));
        let message = PaperError::ContactMissing.to_string();
        assert!(message.contains("개인안심번호"), "{message}");
        // A bad phone is refused even beside a good safe number.
        let bad_phone = PaperEntry {
            phone: "abc".into(),
            safe_number: Some("12가34나".into()),
            ..entry()
        };
        assert!(matches!(
            bad_phone.validate(),
            Err(PaperError::BadPhone { .. })
        ));
        // The error never repeats the number.
        let e = PaperEntry {
            phone: String::new(),
            safe_number: Some("12가34다라".into()),
            ..entry()
        };
        let text = e.validate().expect_err("refused").to_string();
        assert!(!text.contains("12가34다라"), "{text}");
        assert!(!format!("{e:?}").contains("12가"));
    }
}
