//! From a TS byte stream to RTP packets (RFC 2250): sans-IO.
//!
//! TS packets are gathered up to seven per RTP packet. A new RTP packet is started at the
//! first table packet (PAT, PMT, or another PSI/SI table such as the SDT) after media, so
//! the tables a decoder needs lead the packet, and at a keyframe unless only tables
//! precede it; the packet holding the keyframe is flagged, so an edge can start a viewer
//! there with the tables and the keyframe in hand. Bytes that are not TS packets are
//! skipped until the next sync byte, and counted.

use bytes::{Bytes, BytesMut};

use crate::ts::{self, PACKET, SYNC};

/// Most TS packets in one RTP packet (7 × 188 = 1316 bytes fits a 1500-byte MTU).
pub const MAX_TS_PER_RTP: usize = 7;

/// One RTP payload's worth of TS packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Whole TS packets, unchanged.
    pub payload: Bytes,
    /// A decoder can start here.
    pub keyframe: bool,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// TS packets taken.
    pub ts_packets: u64,
    /// Bytes skipped while looking for a sync byte.
    pub skipped_bytes: u64,
    /// Keyframes seen.
    pub keyframes: u64,
    /// TS continuity errors in the input (see [`ts::Continuity`]).
    pub continuity_errors: u64,
    /// TS packets those errors say went missing before the capture.
    pub continuity_missing: u64,
}

/// Gathers TS packets into RTP payloads.
#[derive(Debug)]
pub struct Packetizer {
    per_packet: usize,
    partial: BytesMut,
    pending: BytesMut,
    pending_keyframe: bool,
    /// The pending packet holds only PAT/PMT so far.
    pending_only_psi: bool,
    program: ts::Program,
    out: Vec<Chunk>,
    /// Chunks handed out so far (`out[0]` is chunk number `polled`).
    polled: usize,
    /// The first of the run of table-only chunks just emitted, by number: a keyframe
    /// right after them is flagged there, so a decoder starting at the flag gets the
    /// tables (with fewer than three TS packets per RTP packet they do not share one).
    psi_run: Option<usize>,
    continuity: ts::Continuity,
    stats: Stats,
}

impl Packetizer {
    /// A packetizer putting at most `per_packet` TS packets (1 to 7) in an RTP packet.
    pub fn new(per_packet: usize) -> Packetizer {
        Packetizer {
            per_packet: per_packet.clamp(1, MAX_TS_PER_RTP),
            partial: BytesMut::new(),
            pending: BytesMut::with_capacity(MAX_TS_PER_RTP * PACKET),
            pending_keyframe: false,
            pending_only_psi: true,
            program: ts::Program::default(),
            out: Vec::new(),
            polled: 0,
            psi_run: None,
            continuity: ts::Continuity::default(),
            stats: Stats::default(),
        }
    }

    /// Takes bytes of the TS stream, in any chunking.
    pub fn handle_input(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.partial.is_empty() {
                // Look for sync at a packet boundary.
                match data.iter().position(|&b| b == SYNC) {
                    Some(0) => {}
                    Some(n) => {
                        self.stats.skipped_bytes += n as u64;
                        data = &data[n..];
                    }
                    None => {
                        self.stats.skipped_bytes += data.len() as u64;
                        return;
                    }
                }
            }
            let need = PACKET - self.partial.len();
            let take = need.min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == PACKET {
                let packet = self.partial.split().freeze();
                self.handle_packet(&packet);
            }
        }
    }

    fn handle_packet(&mut self, p: &[u8]) {
        let Some(h) = ts::parse(p) else {
            // Sync byte but not a packet (a bad adaptation field): skip it.
            self.stats.skipped_bytes += PACKET as u64;
            return;
        };
        self.stats.ts_packets += 1;
        self.continuity.observe(p);
        let key = self.program.observe(p, &h);
        // PIDs below 0x20 carry PSI and SI tables (PAT, CAT, NIT, SDT, EIT, ...).
        let psi = h.pid < 0x20 || self.program.is_psi(h.pid);
        if key {
            self.stats.keyframes += 1;
        }
        let starts_new =
            (psi && h.pusi && !self.pending_only_psi) || (key && !self.pending_only_psi);
        if starts_new {
            self.flush();
        }
        self.pending.extend_from_slice(p);
        self.pending_keyframe |= key;
        self.pending_only_psi &= psi;
        if self.pending.len() >= self.per_packet * PACKET {
            self.flush();
        }
    }

    /// The input starts over (a looped file): its continuity counters may jump once.
    pub fn restart_input(&mut self) {
        self.continuity.reset();
    }

    /// Ends the current RTP packet even if not full (end of an input burst).
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut keyframe = self.pending_keyframe;
        let only_psi = self.pending_only_psi;
        if keyframe {
            // Flag the tables leading the keyframe instead, if they are still here.
            let run = self
                .psi_run
                .and_then(|n| n.checked_sub(self.polled))
                .filter(|i| *i < self.out.len());
            if let Some(i) = run {
                self.out[i].keyframe = true;
                keyframe = false;
            }
        }
        self.out.push(Chunk {
            payload: self.pending.split().freeze(),
            keyframe,
        });
        let number = self.polled + self.out.len() - 1;
        self.psi_run = if only_psi {
            Some(self.psi_run.unwrap_or(number))
        } else {
            None
        };
        self.pending_keyframe = false;
        self.pending_only_psi = true;
    }

    /// The next finished RTP payload.
    pub fn poll_output(&mut self) -> Option<Chunk> {
        if self.out.is_empty() {
            None
        } else {
            self.polled += 1;
            Some(self.out.remove(0))
        }
    }

    /// Bytes taken but not yet in an output (an incomplete TS packet, an unflushed one).
    pub fn buffered(&self) -> usize {
        self.partial.len() + self.pending.len()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            continuity_errors: self.continuity.errors,
            continuity_missing: self.continuity.missing,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::ts::{Synth, SynthConfig};

    fn synth_bytes(frames: usize) -> Vec<u8> {
        let mut s = Synth::new(SynthConfig {
            bitrate: 2_000_000,
            fps: 25,
            gop: 5,
            run: 0,
            align: false,
        });
        (0..frames).flat_map(|_| s.next_frame().to_vec()).collect()
    }

    fn drain(p: &mut Packetizer) -> Vec<Chunk> {
        std::iter::from_fn(|| p.poll_output()).collect()
    }

    #[test]
    fn payloads_concatenate_to_the_input_and_keyframes_lead() {
        let input = synth_bytes(12);
        let mut p = Packetizer::new(7);
        p.handle_input(&input);
        p.flush();
        let chunks = drain(&mut p);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.payload.to_vec()).collect();
        assert_eq!(joined, input);
        assert!(
            chunks
                .iter()
                .all(|c| c.payload.len() % PACKET == 0 && c.payload.len() <= 7 * PACKET)
        );
        let keys: Vec<&Chunk> = chunks.iter().filter(|c| c.keyframe).collect();
        assert_eq!(keys.len(), 3, "frames 0, 5, 10");
        for k in keys {
            // PAT, PMT, then the keyframe's first packet.
            assert_eq!(ts::parse(&k.payload[..PACKET]).unwrap().pid, 0);
            assert!(
                ts::parse(&k.payload[2 * PACKET..3 * PACKET])
                    .unwrap()
                    .random_access
            );
        }
    }

    #[test]
    fn with_few_packets_per_rtp_packet_the_flag_is_on_the_tables_leading_the_keyframe() {
        for per in [1, 2] {
            let input = synth_bytes(12);
            let mut p = Packetizer::new(per);
            p.handle_input(&input);
            p.flush();
            let chunks = drain(&mut p);
            let keys: Vec<usize> = (0..chunks.len()).filter(|i| chunks[*i].keyframe).collect();
            assert_eq!(keys.len(), 3, "{per} per packet: frames 0, 5, 10");
            for k in keys {
                // A decoder starting at the flag reads PAT, PMT, then the keyframe.
                let from: Vec<u8> = chunks[k..]
                    .iter()
                    .flat_map(|c| c.payload.to_vec())
                    .collect();
                assert_eq!(
                    ts::parse(&from[..PACKET]).unwrap().pid,
                    0,
                    "{per}: PAT first"
                );
                assert!(
                    ts::parse(&from[2 * PACKET..3 * PACKET])
                        .unwrap()
                        .random_access,
                    "{per}: the keyframe after PAT and PMT"
                );
            }
        }
    }

    #[test]
    fn garbage_before_sync_is_skipped_and_counted() {
        let mut input = vec![1, 2, 3];
        input.extend(synth_bytes(1));
        let mut p = Packetizer::new(7);
        p.handle_input(&input);
        p.flush();
        assert_eq!(p.stats().skipped_bytes, 3);
        let joined: Vec<u8> = drain(&mut p)
            .iter()
            .flat_map(|c| c.payload.to_vec())
            .collect();
        assert_eq!(joined, input[3..]);
    }

    proptest! {
        /// Any chunking of the input gives the same RTP payloads.
        #[test]
        fn chunking_does_not_matter(cuts in prop::collection::vec(1usize..700, 1..60)) {
            let input = synth_bytes(6);
            let mut whole = Packetizer::new(7);
            whole.handle_input(&input);
            whole.flush();
            let expected = drain(&mut whole);

            let mut p = Packetizer::new(7);
            let mut rest = &input[..];
            for c in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let n = (*c).min(rest.len());
                p.handle_input(&rest[..n]);
                rest = &rest[n..];
            }
            p.flush();
            prop_assert_eq!(drain(&mut p), expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut p = Packetizer::new(7);
            p.handle_input(&data);
            p.flush();
            let out: usize = drain(&mut p).iter().map(|c| c.payload.len()).sum();
            // Every byte is sent, skipped (and counted) or waiting for the rest of a packet.
            prop_assert_eq!(out as u64 + p.stats().skipped_bytes + p.buffered() as u64, data.len() as u64);
            prop_assert!(p.buffered() < PACKET);
        }
    }
}
