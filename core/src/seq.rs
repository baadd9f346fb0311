//! Sequence numbers: RTP's 16-bit counter extended to 64 bits.
//!
//! The capture numbers every packet once; no hop renumbers. On the wire Braid carries the
//! rollover count next to RTP's 16-bit number (see `docs/PROTOCOL.md`), so a receiver of a
//! Braid packet never guesses. [`Extender`] is for the places that only see RTP's 16 bits
//! (RTP from ffmpeg or GStreamer at the capture): it picks the 64-bit value nearest to the
//! highest one seen so far, which is right as long as reordering stays under 32,768 packets.

use std::fmt;

/// A packet's position in its stream: RTP's sequence number extended to 64 bits.
///
/// The low 16 bits are the RTP sequence number; the rest count its wrap-arounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SeqNo(pub u64);

const CYCLE: u64 = 1 << 16;
const HALF: u64 = 1 << 15;

impl SeqNo {
    /// The largest value; used as "never" in comparisons.
    pub const MAX: SeqNo = SeqNo(u64::MAX);

    /// Builds a sequence number from a rollover count and RTP's 16-bit number.
    pub fn from_parts(rollovers: u64, low: u16) -> SeqNo {
        SeqNo(rollovers.wrapping_shl(16) | u64::from(low))
    }

    /// The RTP sequence number (the low 16 bits).
    pub fn low(self) -> u16 {
        self.0 as u16
    }

    /// The number of times the 16-bit counter has wrapped before this value.
    pub fn rollovers(self) -> u64 {
        self.0 >> 16
    }

    /// The 64-bit value whose low 16 bits are `low` and which lies nearest to `reference`.
    ///
    /// Ties (exactly half a cycle away) resolve forward. Near zero the result never goes
    /// below zero and near `u64::MAX` it never wraps.
    pub fn extend(reference: SeqNo, low: u16) -> SeqNo {
        let candidate = (reference.0 & !(CYCLE - 1)) | u64::from(low);
        if candidate > reference.0 {
            // `low` is ahead of the reference's low bits; it may instead belong to the
            // previous cycle if it is more than half a cycle ahead.
            if candidate - reference.0 > HALF && candidate >= CYCLE {
                return SeqNo(candidate - CYCLE);
            }
            SeqNo(candidate)
        } else {
            if reference.0 - candidate >= HALF && candidate <= u64::MAX - CYCLE {
                return SeqNo(candidate + CYCLE);
            }
            SeqNo(candidate)
        }
    }

    /// The value `n` packets later, saturating at [`SeqNo::MAX`].
    pub fn plus(self, n: u64) -> SeqNo {
        SeqNo(self.0.saturating_add(n))
    }

    /// The next sequence number.
    pub fn next(self) -> SeqNo {
        self.plus(1)
    }

    /// How many packets `self` is ahead of `earlier` (zero if it is not ahead).
    pub fn distance_from(self, earlier: SeqNo) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for SeqNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for SeqNo {
    fn from(v: u64) -> Self {
        SeqNo(v)
    }
}

/// Extends a stream of 16-bit sequence numbers to 64 bits, wrap-around and reordering
/// across the wrap included.
///
/// The first value is placed in cycle 1, not 0, so packets that arrive reordered just
/// before it still extend to smaller values instead of saturating at zero.
#[derive(Debug, Clone, Default)]
pub struct Extender {
    max: Option<SeqNo>,
}

impl Extender {
    /// A new extender that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends `low` against the highest value seen so far and remembers the result if it
    /// is the new highest.
    pub fn extend(&mut self, low: u16) -> SeqNo {
        let ext = match self.max {
            None => SeqNo::from_parts(1, low),
            Some(max) => SeqNo::extend(max, low),
        };
        if self.max.is_none_or(|max| ext > max) {
            self.max = Some(ext);
        }
        ext
    }

    /// The highest extended value seen so far.
    pub fn max(&self) -> Option<SeqNo> {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn extend_table() {
        // (reference, low, expected)
        let cases: &[(u64, u16, u64)] = &[
            (0, 0, 0),
            (0, 5, 5),
            (0, 65535, 65535), // cannot go below zero: stays in cycle 0
            (10, 3, 3),
            (65535, 0, 65536),           // wrap forward
            (65536, 65535, 65535),       // one back across the wrap
            (65536 + 100, 65000, 65000), // reordered across the wrap
            (3 * 65536 + 10, 40000, 2 * 65536 + 40000),
            (3 * 65536 + 40000, 10, 4 * 65536 + 10),
            (1000, 1000 + 32768, 1000 + 32768), // exactly half ahead resolves forward
            (u64::MAX, 0, u64::MAX - 65535),    // never wraps past u64::MAX
        ];
        for &(reference, low, expected) in cases {
            assert_eq!(
                SeqNo::extend(SeqNo(reference), low),
                SeqNo(expected),
                "extend({reference}, {low})"
            );
        }
    }

    #[test]
    fn extender_wraps_forward_and_back() {
        let mut e = Extender::new();
        let a = e.extend(65534);
        let b = e.extend(65535);
        let c = e.extend(1);
        let d = e.extend(0); // reordered across the wrap
        assert_eq!(b.0, a.0 + 1);
        assert_eq!(c.0, a.0 + 3);
        assert_eq!(d.0, a.0 + 2);
        assert_eq!(e.max(), Some(c));
    }

    #[test]
    fn extender_first_value_leaves_room_behind() {
        let mut e = Extender::new();
        let first = e.extend(3);
        let before = e.extend(65530);
        assert!(before < first);
        assert_eq!(first.0 - before.0, 9);
    }

    proptest! {
        /// Any stream that moves forward, with values trailing the highest seen by less
        /// than half a cycle, extends back to the original values (shifted so the first
        /// lands in cycle 1).
        #[test]
        fn extender_recovers_original(
            start in 0u64..(1 << 40),
            steps in prop::collection::vec((0u64..3000, 0u64..30000), 1..500),
        ) {
            let mut truth = vec![start];
            let mut max = start;
            for (jump, back) in steps {
                max += jump;
                truth.push(max.saturating_sub(back).max(start.saturating_sub(30000)));
            }
            let offset = i128::from(start) - i128::from((1u64 << 16) | (start & 0xffff));
            let mut e = Extender::new();
            for &t in &truth {
                let got = e.extend(t as u16);
                prop_assert_eq!(i128::from(got.0), i128::from(t) - offset);
            }
        }

        #[test]
        fn extend_is_nearest(reference in 1u64 << 17..1u64 << 50, delta in -32767i64..32768) {
            let target = (reference as i64 + delta) as u64;
            prop_assert_eq!(SeqNo::extend(SeqNo(reference), target as u16), SeqNo(target));
        }
    }
}
