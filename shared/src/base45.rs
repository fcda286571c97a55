//! Base45 (RFC 9285), the text encoding of KP1 check-in codes.
//!
//! Base45 exists so that binary data fits the QR *alphanumeric* mode, whose 45-character
//! alphabet is exactly the one used here. Two bytes become three characters, a trailing
//! single byte becomes two. Decoding is strict: every input has at most one decoding and
//! every malformed input is refused with a typed error, because the decoder sits directly
//! behind the camera and reads whatever a visitor holds up.

use thiserror::Error;

/// The RFC 9285 alphabet, in value order: the character at index `v` encodes `v`.
pub const ALPHABET: &[u8; 45] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";

/// Why a text is not valid base45.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Base45Error {
    /// A character outside the alphabet (lower case letters included: base45 is upper case).
    #[error(
        "character {found:?} at byte {position} is not in the base45 alphabet \
         (0-9, A-Z, space and $%*+-./:); the text is not base45 or was damaged in transit"
    )]
    InvalidChar {
        /// Byte offset of the character in the input.
        position: usize,
        /// The offending character.
        found: char,
    },
    /// `len % 3 == 1`: a single character left over cannot encode anything.
    #[error(
        "base45 text of {len} characters leaves one dangling character; \
         valid lengths are multiples of 3, or 2 more than one: the text was truncated or padded"
    )]
    BadLength {
        /// Length of the input in characters.
        len: usize,
    },
    /// A three-character group whose value does not fit two bytes.
    #[error(
        "base45 group at character {position} has value {value}, above 65535; \
         the text is not a base45 encoding of any bytes"
    )]
    TripletOverflow {
        /// Character offset of the group's first character.
        position: usize,
        /// The decoded value of the group.
        value: u32,
    },
    /// A final two-character group whose value does not fit one byte.
    #[error(
        "final base45 pair at character {position} has value {value}, above 255; \
         the text is not a base45 encoding of any bytes"
    )]
    PairOverflow {
        /// Character offset of the pair's first character.
        position: usize,
        /// The decoded value of the pair.
        value: u32,
    },
}

/// Maps an ASCII byte to its base45 value; `None` for anything outside the alphabet.
fn value_of(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'A'..=b'Z' => Some(byte - b'A' + 10),
        b' ' => Some(36),
        b'$' => Some(37),
        b'%' => Some(38),
        b'*' => Some(39),
        b'+' => Some(40),
        b'-' => Some(41),
        b'.' => Some(42),
        b'/' => Some(43),
        b':' => Some(44),
        _ => None,
    }
}

/// The number of characters `encode` produces for `byte_len` bytes.
pub const fn encoded_len(byte_len: usize) -> usize {
    byte_len / 2 * 3 + byte_len % 2 * 2
}

/// Encodes bytes as base45 text.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(encoded_len(bytes.len()));
    let mut push = |v: u32| out.push(char::from(ALPHABET[(v % 45) as usize]));
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        let n = u32::from(pair[0]) * 256 + u32::from(pair[1]);
        push(n);
        push(n / 45);
        push(n / (45 * 45));
    }
    if let [last] = chunks.remainder() {
        let n = u32::from(*last);
        push(n);
        push(n / 45);
    }
    out
}

/// Decodes base45 text, refusing anything that is not the encoding of some bytes.
pub fn decode(text: &str) -> Result<Vec<u8>, Base45Error> {
    // Map every character first, so that the error names the first bad character even when
    // the length is also wrong: "a lower-case letter at 5" says more than "bad length".
    let mut values = Vec::with_capacity(text.len());
    for (position, found) in text.char_indices() {
        let value = u8::try_from(found)
            .ok()
            .and_then(value_of)
            .ok_or(Base45Error::InvalidChar { position, found })?;
        values.push(value);
    }
    if values.len() % 3 == 1 {
        return Err(Base45Error::BadLength { len: values.len() });
    }
    let mut out = Vec::with_capacity(values.len() / 3 * 2 + 1);
    for (group, chunk) in values.chunks(3).enumerate() {
        let position = group * 3;
        match *chunk {
            [c, d, e] => {
                let value = u32::from(c) + u32::from(d) * 45 + u32::from(e) * 45 * 45;
                let n = u16::try_from(value)
                    .map_err(|_| Base45Error::TripletOverflow { position, value })?;
                out.extend_from_slice(&n.to_be_bytes());
            }
            [c, d] => {
                let value = u32::from(c) + u32::from(d) * 45;
                let n = u8::try_from(value)
                    .map_err(|_| Base45Error::PairOverflow { position, value })?;
                out.push(n);
            }
            // `chunks(3)` yields 1..=3 items and a single one was refused above.
            _ => return Err(Base45Error::BadLength { len: values.len() }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_9285_examples() {
        let examples: [(&[u8], &str); 5] = [
            (b"AB", "BB8"),
            (b"Hello!!", "%69 VD92EX0"),
            (b"base-45", "UJCLQE7W581"),
            (b"ietf!", "QED8WEX0"),
            (b"", ""),
        ];
        for (bytes, text) in examples {
            assert_eq!(encode(bytes), text, "encoding {bytes:?}");
            assert_eq!(decode(text).as_deref(), Ok(bytes), "decoding {text:?}");
        }
    }

    #[test]
    fn alphabet_and_value_table_agree() {
        for (v, &c) in ALPHABET.iter().enumerate() {
            assert_eq!(value_of(c), Some(v as u8), "char {:?}", char::from(c));
        }
        let outside = (0u8..=255).filter(|b| !ALPHABET.contains(b));
        for b in outside {
            assert_eq!(value_of(b), None, "byte {b}");
        }
    }

    #[test]
    fn invalid_characters_are_named() {
        assert_eq!(
            decode("BBa"),
            Err(Base45Error::InvalidChar {
                position: 2,
                found: 'a'
            })
        );
        // Non-ASCII: position is a byte offset, the char is reported whole.
        assert_eq!(
            decode("B한"),
            Err(Base45Error::InvalidChar {
                position: 1,
                found: '한'
            })
        );
        assert!(matches!(
            decode("BB\n"),
            Err(Base45Error::InvalidChar { position: 2, .. })
        ));
    }

    #[test]
    fn dangling_single_character_is_refused() {
        assert_eq!(decode("A"), Err(Base45Error::BadLength { len: 1 }));
        assert_eq!(decode("BB8A"), Err(Base45Error::BadLength { len: 4 }));
    }

    #[test]
    fn overflowing_groups_are_refused() {
        // ":::" = 44 + 44*45 + 44*2025 = 91124 > 65535.
        assert_eq!(
            decode("BB8:::"),
            Err(Base45Error::TripletOverflow {
                position: 3,
                value: 91_124
            })
        );
        // "GGW" = 16 + 16*45 + 32*2025 = 65536, the smallest overflow; "FGW" = 65535 fits.
        assert!(matches!(
            decode("GGW"),
            Err(Base45Error::TripletOverflow { value: 65_536, .. })
        ));
        assert_eq!(decode("FGW"), Ok(vec![0xff, 0xff]));
        // "U5" = 30 + 5*45 = 255 fits; "V5" = 256 does not.
        assert_eq!(decode("U5"), Ok(vec![0xff]));
        assert_eq!(
            decode("V5"),
            Err(Base45Error::PairOverflow {
                position: 0,
                value: 256
            })
        );
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let text = encode(&bytes);
            prop_assert_eq!(text.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(&text), Ok(bytes));
        }

        // Strictness: whatever decodes, re-encodes to the same text, so a code has one
        // spelling and a changed character always changes the bytes.
        #[test]
        fn decoding_is_canonical(text in "[0-9A-Z $%*+\\-./:]{0,30}") {
            if let Ok(bytes) = decode(&text) {
                prop_assert_eq!(encode(&bytes), text);
            }
        }

        #[test]
        fn never_panics(text in any::<String>()) {
            let _ = decode(&text);
        }
    }
}
