//! Paper-log entries: the fallback for visitors without a QR code, who write their name and
//! phone number instead.
//!
//! An entry is checked ([`PaperEntry::validate`]), then sealed with age to the health
//! authority's key ([`PaperEntry::seal_for_authority`]); the sealed bytes go into an ordinary
//! record envelope (`RecordBody::Paper`). So the hub can see that a paper entry exists and when,
//! never whose it is: only the authority's identity opens it.

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
    /// The visitor's phone number.
    pub phone: String,
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
    /// allowed form.
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
        let phone_chars = self.phone.chars().count();
        let phone_ok = PHONE_CHARS.contains(&phone_chars)
            && self
                .phone
                .chars()
                .all(|c| c.is_ascii_digit() || c == '+' || c == '-' || c == ' ')
            && self.phone.chars().filter(char::is_ascii_digit).count() >= MIN_PHONE_DIGITS;
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
        let plaintext =
            Zeroizing::new(postcard::to_stdvec(self).map_err(|e| PaperError::Seal(e.to_string()))?);
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
        let (entry, rest): (PaperEntry, _) = postcard::take_from_bytes(&plaintext)
            .map_err(|e| PaperError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PaperError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        entry
            .validate()
            .map_err(|e| PaperError::Malformed(e.to_string()))?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> PaperEntry {
        PaperEntry {
            name: "김민준".into(),
            phone: "010-1234-5678".into(),
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
}
