//! What a node says to a peer of an older protocol version before it closes.
//!
//! A node accepts [`ALPN_V1`](super::ALPN_V1) connections only to answer them with one v1
//! `Refused` frame telling the operator which side to upgrade; it never runs a v1 session.
//! The frame is written out here byte by byte in the v1 layout instead of through
//! [`Frame::encode`](super::Frame::encode), so a later change of the current frames cannot
//! silently change what a v1 peer reads (`docs/protocol.md`, "A v1 peer's refusal").

use super::frame::{LENGTH_PREFIX_BYTES, MAX_DETAIL_CHARS};

/// v1's variant index of `Frame::Refused`.
pub const V1_REFUSED_TAG: u8 = 2;

/// v1's index of `RefuseReason::Protocol`, the reason sent to a v1 peer. v1 knows the reasons
/// up to `Internal` (9); `Protocol` is shown by a v1 device as "Protocol" followed by the
/// detail, which is what the operator needs to read.
pub const V1_REASON_PROTOCOL: u8 = 7;

/// The whole v1 `Refused` frame (length prefix and body) with reason `Protocol` and `detail`,
/// cut to [`MAX_DETAIL_CHARS`] characters as a v1 peer would cut it.
pub fn v1_refusal(detail: &str) -> Vec<u8> {
    let detail: String = detail.chars().take(MAX_DETAIL_CHARS).collect();
    let mut body = vec![V1_REFUSED_TAG, V1_REASON_PROTOCOL];
    // postcard string: LEB128 byte length, then the UTF-8 bytes.
    let mut n = detail.len();
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            body.push(low);
            break;
        }
        body.push(low | 0x80);
    }
    body.extend_from_slice(detail.as_bytes());
    // At most 2 + 2 + 4 * 256 bytes: always fits the 4-byte prefix.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(LENGTH_PREFIX_BYTES + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The detail a hub sends a v1 device, naming the release to upgrade to.
pub fn hub_upgrade_detail(release: &str) -> String {
    format!(
        "this hub speaks sync protocol v2 (kipass/sync/2) only; upgrade edge-node to {release} or later"
    )
}

/// The detail a device sends a v1 sibling.
pub fn sibling_upgrade_detail(release: &str) -> String {
    format!(
        "this device speaks sync protocol v2 (kipass/sync/2) only; upgrade the sibling's edge-node to {release} or later"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{Frame, FrameDecoder, Refusal, RefuseReason};

    /// A v1 decoder of a `Refused` frame, written from the v1 layout in `docs/protocol.md`
    /// (not from the current code): prefix, tag 2, reason index, varint length, UTF-8.
    fn decode_v1_refused(wire: &[u8]) -> Option<(u8, String)> {
        let (prefix, body) = wire.split_at_checked(4)?;
        let len = u32::from_be_bytes(prefix.try_into().ok()?) as usize;
        if body.len() != len || body.first() != Some(&2) {
            return None;
        }
        let reason = *body.get(1)?;
        let (mut n, mut shift, mut i) = (0usize, 0, 2);
        loop {
            let b = *body.get(i)?;
            n |= usize::from(b & 0x7f) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let text = body.get(i..)?;
        if text.len() != n {
            return None;
        }
        Some((reason, String::from_utf8(text.to_vec()).ok()?))
    }

    #[test]
    fn the_v1_refusal_has_the_v1_layout() {
        assert_eq!(v1_refusal("x"), vec![0, 0, 0, 4, 2, 7, 1, b'x']);
        let detail = hub_upgrade_detail("0.1.0");
        let wire = v1_refusal(&detail);
        // A detail cut to 256 characters of two bytes each: a two-byte varint length (512).
        let wire_long = v1_refusal(&"é".repeat(300));
        assert_eq!(&wire_long[4..8], &[2, 7, 0x80, 0x04]);
        for (wire, want) in [(wire, detail), (wire_long, "é".repeat(256))] {
            let (reason, text) = decode_v1_refused(&wire).expect("decodes as v1 Refused");
            assert_eq!(reason, 7, "v1's Protocol");
            assert_eq!(text, want);
            // v1's Refused encoding is unchanged in v2: the current decoder reads it too.
            let mut d = FrameDecoder::new();
            d.push(&wire).expect("push");
            assert_eq!(
                d.pop().expect("decodes"),
                Some(Frame::Refused(Refusal::new(RefuseReason::Protocol, &want)))
            );
        }
        assert!(hub_upgrade_detail("0.1.0").contains("upgrade edge-node to 0.1.0"));
    }

    #[test]
    fn the_alpn_names_the_protocol_version() {
        assert_eq!(crate::sync::ALPN, b"kipass/sync/2");
        assert_eq!(crate::sync::PROTOCOL_VERSION, 2);
        assert_eq!(
            crate::sync::ALPN.last().map(|d| u16::from(d - b'0')),
            Some(crate::sync::PROTOCOL_VERSION)
        );
        assert_ne!(crate::sync::ALPN, crate::sync::ALPN_V1);
    }
}
