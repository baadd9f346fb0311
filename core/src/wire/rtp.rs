//! The one place Braid touches the RTP crate (`rtc-rtp`, webrtc-rs's sans-IO RTP).
//!
//! Forwarding nodes never re-encode RTP: [`Rtp`] keeps the packet's bytes as received and
//! the few header fields Braid looks at, so a hop that forwards a packet copies a reference
//! count, not the payload.

use bytes::{Bytes, BytesMut};
use rtc_shared::marshal::{Marshal, MarshalSize, Unmarshal};

use rtc_rtp::header::EXTENSION_PROFILE_ONE_BYTE;

use super::DecodeError;

/// RTP payload type for MPEG-2 transport streams (RFC 3551, RFC 2250).
pub const PAYLOAD_TYPE_MP2T: u8 = 33;

/// RTP clock rate for MPEG-2 transport streams (RFC 2250): 90 kHz.
pub const CLOCK_RATE_MP2T: u32 = 90_000;

/// The one-byte header extension (RFC 8285) id of the HLS segment number: a capture puts
/// it on the first packet of a keyframe that starts a segment, 8 bytes, big-endian, so that
/// every edge cuts and numbers the stream's HLS segments alike.
pub const SEGMENT_EXTENSION_ID: u8 = 1;

/// The RTP header fields a sender sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fields {
    /// The marker bit.
    pub marker: bool,
    /// The payload type (33 for MPEG-TS).
    pub payload_type: u8,
    /// RTP's 16-bit sequence number.
    pub seq: u16,
    /// Media timestamp in the payload type's clock.
    pub timestamp: u32,
    /// Synchronization source.
    pub ssrc: u32,
}

/// A parsed RTP packet that keeps its original bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rtp {
    raw: Bytes,
    fields: Fields,
    segment: Option<u64>,
    payload_start: usize,
    payload_end: usize,
}

impl Rtp {
    /// Parses an RTP packet. Never panics; any malformed input is an error.
    pub fn parse(raw: Bytes) -> Result<Rtp, DecodeError> {
        if raw.len() < 12 {
            return Err(DecodeError::UnexpectedEnd);
        }
        if raw[0] >> 6 != 2 {
            return Err(DecodeError::Malformed("rtp version is not 2"));
        }
        let mut cursor = raw.clone();
        let packet = rtc_rtp::Packet::unmarshal(&mut cursor)
            .map_err(|_| DecodeError::Malformed("rtp header"))?;
        // Where the payload sits in `raw`, so `payload()` slices without reparsing. The
        // layout is fixed by RFC 3550 once `unmarshal` has checked the lengths; a packet
        // whose layout disagrees with what the RTP crate parsed is refused.
        let csrc_count = usize::from(raw[0] & 0x0f);
        let mut payload_start = 12 + 4 * csrc_count;
        if raw[0] & 0x10 != 0 {
            let words = raw
                .get(payload_start + 2..payload_start + 4)
                .ok_or(DecodeError::Malformed("rtp extension"))?;
            payload_start += 4 + 4 * usize::from(u16::from_be_bytes([words[0], words[1]]));
        }
        let padding = if raw[0] & 0x20 != 0 {
            usize::from(raw[raw.len() - 1])
        } else {
            0
        };
        let payload_end = raw.len().saturating_sub(padding);
        if payload_start > payload_end || payload_end - payload_start != packet.payload.len() {
            return Err(DecodeError::Malformed("rtp length"));
        }
        let h = packet.header;
        // The segment number, when the one-byte extension carries it at its length; any
        // other extension is carried along untouched and ignored.
        let segment = (h.extension && h.extension_profile == EXTENSION_PROFILE_ONE_BYTE)
            .then(|| h.get_extension(SEGMENT_EXTENSION_ID))
            .flatten()
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map(u64::from_be_bytes);
        Ok(Rtp {
            raw,
            segment,
            fields: Fields {
                marker: h.marker,
                payload_type: h.payload_type,
                seq: h.sequence_number,
                timestamp: h.timestamp,
                ssrc: h.ssrc,
            },
            payload_start,
            payload_end,
        })
    }

    /// Builds a plain RTP packet (no CSRC, extension or padding) around `payload`.
    pub fn build(fields: Fields, payload: &[u8]) -> Rtp {
        Rtp::build_with_segment(fields, None, payload)
    }

    /// Builds an RTP packet around `payload`, with the segment number in a one-byte header
    /// extension when given (no CSRC or padding).
    pub fn build_with_segment(fields: Fields, segment: Option<u64>, payload: &[u8]) -> Rtp {
        let mut header = rtc_rtp::Header {
            version: 2,
            marker: fields.marker,
            payload_type: fields.payload_type & 0x7f,
            sequence_number: fields.seq,
            timestamp: fields.timestamp,
            ssrc: fields.ssrc,
            ..Default::default()
        };
        if let Some(n) = segment {
            header.extension = true;
            header.extension_profile = EXTENSION_PROFILE_ONE_BYTE;
            header.extensions.push(rtc_rtp::header::Extension {
                id: SEGMENT_EXTENSION_ID,
                payload: Bytes::copy_from_slice(&n.to_be_bytes()),
            });
        }
        let packet = rtc_rtp::Packet {
            header,
            payload: Bytes::copy_from_slice(payload),
        };
        let size = packet.marshal_size();
        let mut buf = BytesMut::zeroed(size);
        // Invariant: the buffer was sized by `marshal_size` of this very packet, whose one
        // extension (if any) is valid in the one-byte form, so marshalling cannot fail.
        let n = packet
            .marshal_to(&mut buf)
            .expect("buffer sized by marshal_size");
        buf.truncate(n);
        Rtp {
            raw: buf.freeze(),
            segment,
            fields: Fields {
                payload_type: fields.payload_type & 0x7f,
                ..fields
            },
            payload_start: size - payload.len(),
            payload_end: size,
        }
    }

    /// The header fields.
    pub fn fields(&self) -> Fields {
        self.fields
    }

    /// The HLS segment this packet starts, when its capture numbered one here.
    pub fn segment(&self) -> Option<u64> {
        self.segment
    }

    /// RTP's 16-bit sequence number.
    pub fn seq(&self) -> u16 {
        self.fields.seq
    }

    /// The whole packet as received or built.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The media payload (a slice of the same buffer, no copy).
    pub fn payload(&self) -> Bytes {
        self.raw.slice(self.payload_start..self.payload_end)
    }

    /// Length of the whole packet in bytes.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether the packet has no bytes (never true for a parsed packet).
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_then_parse_round_trips() {
        let fields = Fields {
            marker: true,
            payload_type: PAYLOAD_TYPE_MP2T,
            seq: 65535,
            timestamp: 0xdead_beef,
            ssrc: 7,
        };
        let payload = [0x47u8; 188];
        let built = Rtp::build(fields, &payload);
        let parsed = Rtp::parse(built.raw().clone()).unwrap();
        assert_eq!(parsed.fields(), fields);
        assert_eq!(&parsed.payload()[..], &payload[..]);
        assert_eq!(parsed, built);
    }

    #[test]
    fn a_segment_number_rides_in_a_header_extension() {
        let fields = Fields {
            marker: true,
            payload_type: PAYLOAD_TYPE_MP2T,
            seq: 9,
            timestamp: 90_000,
            ssrc: 7,
        };
        let payload = [0x47u8; 188];
        let n = 0x0123_4567_89ab_cd00;
        let built = Rtp::build_with_segment(fields, Some(n), &payload);
        assert_eq!(built.segment(), Some(n));
        // 12 bytes of header, 4 of extension header, 1 + 8 of element, 3 of padding.
        assert_eq!(built.len(), 12 + 16 + 188);
        let parsed = Rtp::parse(built.raw().clone()).unwrap();
        assert_eq!(parsed.segment(), Some(n));
        assert_eq!(parsed.fields(), fields);
        assert_eq!(&parsed.payload()[..], &payload[..]);
        assert_eq!(parsed, built);
        assert_eq!(Rtp::build(fields, &payload).segment(), None);
        // Another id, or the right id at another length, is no segment number.
        let mut raw = built.raw().to_vec();
        raw[16] = 0x27; // id 2, 8 bytes
        assert_eq!(Rtp::parse(Bytes::from(raw)).unwrap().segment(), None);
        let mut raw = built.raw().to_vec();
        raw[16] = 0x16; // id 1, 7 bytes, then the last (0) read as padding
        assert_eq!(Rtp::parse(Bytes::from(raw)).unwrap().segment(), None);
    }

    #[test]
    fn parse_rejects_bad_input() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "empty"),
            (&[0x80, 33, 0, 1], "short header"),
            (&[0x40, 33, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0], "version 1"),
            (
                &[0x8f, 33, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                "15 csrcs, none present",
            ),
            (
                &[
                    0x90, 33, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xbe, 0xde, 0xff, 0xff,
                ],
                "extension longer than packet",
            ),
            (
                &[0xa0, 33, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 9],
                "padding longer than payload",
            ),
            (
                &[0xa0, 33, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                "padding flag, no payload",
            ),
        ];
        for (bytes, why) in cases {
            assert!(Rtp::parse(Bytes::copy_from_slice(bytes)).is_err(), "{why}");
        }
    }

    #[test]
    fn parse_strips_padding() {
        let mut raw = vec![0xa0, 33, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        raw.extend_from_slice(&[1, 2, 3, 0, 0, 3]);
        let rtp = Rtp::parse(Bytes::from(raw)).unwrap();
        assert_eq!(&rtp.payload()[..], &[1, 2, 3]);
    }
}
