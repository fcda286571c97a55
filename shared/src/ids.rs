//! Identifiers of facilities, devices, partitions and records, parsed from outside input.

use crate::time::Day;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An identifier from outside input was not of the allowed form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} id {value:?}: use 1 to 40 characters of a-z, 0-9, '_' or '-'")]
pub struct IdError {
    /// What kind of id was expected.
    pub kind: &'static str,
    /// The rejected text, cut to 60 characters.
    pub value: String,
}

fn check(kind: &'static str, s: &str) -> Result<(), IdError> {
    let ok = !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(IdError {
            kind,
            value: s.chars().take(60).collect(),
        })
    }
}

macro_rules! string_id {
    ($name:ident, $kind:literal, $prefix:literal) => {
        #[doc = concat!("A ", $kind, " id: 1 to 40 characters of `a-z0-9_-`.")]
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and checks an id from outside input.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check($kind, s)?;
                Ok(Self(s.to_owned()))
            }

            /// A fresh id from 8 random bytes, with a readable prefix.
            pub fn random(rng: &mut impl rand_core::RngCore) -> Self {
                let mut b = [0u8; 8];
                rng.fill_bytes(&mut b);
                Self(format!("{}{}", $prefix, hex::encode(b)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                check($kind, &s)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

string_id!(FacilityId, "facility", "fac_");
string_id!(DeviceId, "device", "dev_");

/// One partition of the visit log: one facility's visits of one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PartitionId {
    /// Whose visits.
    pub facility: FacilityId,
    /// Which UTC day.
    pub day: Day,
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.facility, self.day)
    }
}

/// A record's key in its partition: 16 random bytes, shown as 32 hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RecordId(pub [u8; 16]);

impl RecordId {
    /// A fresh random record id.
    pub fn random(rng: &mut impl rand_core::RngCore) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        RecordId(b)
    }

    /// Parses the 32-hex-character form.
    pub fn parse_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; 16];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(RecordId(b))
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_bad_text() {
        assert!(FacilityId::parse("fac_01ab").is_ok());
        assert!(FacilityId::parse("").is_err());
        assert!(FacilityId::parse("Fac").is_err());
        assert!(FacilityId::parse("a/b").is_err());
        assert!(FacilityId::parse(&"a".repeat(41)).is_err());
        assert!(serde_json::from_str::<DeviceId>("\"../etc\"").is_err());
    }

    #[test]
    fn record_id_round_trips() {
        let id = RecordId([7; 16]);
        assert_eq!(RecordId::parse_hex(&id.to_string()), Some(id));
        assert_eq!(RecordId::parse_hex("zz"), None);
    }
}
