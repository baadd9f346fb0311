//! One valid MPEG-TS across a change of rendition: each rendition numbers its packets'
//! continuity counters on its own, so where the output passes from one to the other the
//! counters of every PID would jump, which a demuxer reports as loss. After a change
//! ([`Continuity::resync`]), each PID's counters are shifted to follow on from the last
//! one written for it; nothing else of the stream changes. A viewer that never changes
//! rendition is written byte for byte.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

const PACKET: usize = 188;
const NULL_PID: u16 = 0x1fff;

/// The continuity counters written, per PID, and the shift applied to each.
#[derive(Debug, Default)]
pub struct Continuity {
    /// Tracking starts with the first rendition notice (viewers of a single stream never
    /// pay for it).
    on: bool,
    last: HashMap<u16, u8>,
    shift: HashMap<u16, u8>,
    /// PIDs whose shift is worked out again at their next packet.
    pending: Vec<u16>,
    /// Counters rewritten so far (TS packets).
    pub rewritten: u64,
}

impl Continuity {
    /// Starts following counters (the viewer watches a ladder).
    pub fn start(&mut self) {
        self.on = true;
    }

    /// The output passes to another rendition at the next packet.
    pub fn resync(&mut self) {
        if self.on {
            self.pending = self.last.keys().copied().collect();
        }
    }

    /// `payload` (whole TS packets) as written: counters shifted where a change of
    /// rendition asks for it. Copies only when a counter changes; anything that is not a
    /// TS packet passes untouched.
    pub fn fix(&mut self, payload: Bytes) -> Bytes {
        if !self.on {
            return payload;
        }
        let mut out: Option<BytesMut> = None;
        for (i, pkt) in payload.chunks_exact(PACKET).enumerate() {
            if pkt[0] != 0x47 {
                continue;
            }
            let pid = u16::from(pkt[1] & 0x1f) << 8 | u16::from(pkt[2]);
            if pid == NULL_PID {
                continue;
            }
            let has_payload = pkt[3] & 0x10 != 0;
            let cc = pkt[3] & 0x0f;
            if let Some(at) = self.pending.iter().position(|p| *p == pid) {
                self.pending.swap_remove(at);
                let shift = match self.last.get(&pid) {
                    // A packet with payload follows on; one without repeats the counter.
                    Some(&last) if has_payload => (last + 1).wrapping_sub(cc) & 0x0f,
                    Some(&last) => last.wrapping_sub(cc) & 0x0f,
                    None => 0,
                };
                self.shift.insert(pid, shift);
            }
            let shift = self.shift.get(&pid).copied().unwrap_or(0);
            let new = (cc + shift) & 0x0f;
            self.last.insert(pid, new);
            if new != cc {
                let buf = out.get_or_insert_with(|| BytesMut::from(&payload[..]));
                buf[i * PACKET + 3] = (pkt[3] & 0xf0) | new;
                self.rewritten += 1;
            }
        }
        match out {
            Some(b) => b.freeze(),
            None => payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pkt(pid: u16, cc: u8, payload: bool) -> Vec<u8> {
        let mut p = vec![0xffu8; PACKET];
        p[0] = 0x47;
        p[1] = (pid >> 8) as u8;
        p[2] = pid as u8;
        p[3] = if payload { 0x10 } else { 0x20 } | cc;
        p
    }

    fn ccs(b: &[u8]) -> Vec<(u16, u8)> {
        b.chunks_exact(PACKET)
            .map(|p| (u16::from(p[1] & 0x1f) << 8 | u16::from(p[2]), p[3] & 0x0f))
            .collect()
    }

    #[test]
    fn counters_follow_on_across_a_change_and_nothing_else_moves() {
        let mut c = Continuity::default();
        c.start();
        let a: Vec<u8> = [
            pkt(0x100, 4, true),
            pkt(0x101, 9, true),
            pkt(0x100, 5, true),
        ]
        .concat();
        assert_eq!(
            c.fix(Bytes::from(a.clone())),
            a,
            "nothing changes before a change"
        );
        c.resync();
        let b: Vec<u8> = [
            pkt(0x100, 11, true),
            pkt(0x101, 2, true),
            pkt(0x100, 12, true),
        ]
        .concat();
        let fixed = c.fix(Bytes::from(b.clone()));
        assert_eq!(ccs(&fixed), vec![(0x100, 6), (0x101, 10), (0x100, 7)]);
        // Only the counter nibble changed.
        for (x, y) in fixed.iter().zip(&b) {
            assert_eq!(x & 0xf0, y & 0xf0);
        }
        assert_eq!(c.rewritten, 3);
    }

    #[test]
    fn off_until_started() {
        let mut c = Continuity::default();
        c.resync();
        let a = Bytes::from(pkt(0x100, 4, true));
        assert_eq!(c.fix(a.clone()), a);
    }

    proptest! {
        /// Any bytes: no panic, the same length, only counter nibbles changed.
        #[test]
        fn any_input_is_safe(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 1..6),
            resync_at in 0usize..6,
        ) {
            let mut c = Continuity::default();
            c.start();
            for (i, chunk) in chunks.iter().enumerate() {
                if i == resync_at {
                    c.resync();
                }
                let out = c.fix(Bytes::from(chunk.clone()));
                prop_assert_eq!(out.len(), chunk.len());
                for (j, (x, y)) in out.iter().zip(chunk).enumerate() {
                    if j % PACKET != 3 {
                        prop_assert_eq!(x, y);
                    }
                }
            }
        }
    }
}
