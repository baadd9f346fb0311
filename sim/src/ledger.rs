//! What the links did to each packet on its way to each node, so that a gap can be
//! justified: a packet is lost to a node for a reason the network owns when random loss
//! dropped every copy sent to it and every request it made for it, at least [`TRIES`]
//! of them, and delivered none. Drops on a silent path (an outage, a partition, a full
//! rate cap) are not tries: a path that stopped delivering can be seen, and asking it
//! again is the protocol's doing.
//!
//! Messages are read without checking their tag (the simulator made them): the media
//! sequence number and NACK ranges sit at fixed places (`docs/PROTOCOL.md`).

use rustc_hash::FxHashMap as HashMap;

/// Copies and requests the links must have dropped for a loss to be the network's.
pub const TRIES: u32 = 4;

/// Per (sequence number, node): copies delivered to it, and tries dropped.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: HashMap<(u64, u32), (u32, u32)>,
}

/// The 64-bit sequence number of a media message, if it is one.
pub fn media_seq(d: &[u8]) -> Option<u64> {
    if d.len() < 8 + 4 + 12 || d[1] != 1 {
        return None;
    }
    let rollovers = u32::from_be_bytes(d[8..12].try_into().ok()?);
    let low = u16::from_be_bytes(d[14..16].try_into().ok()?);
    Some(u64::from(rollovers) << 16 | u64::from(low))
}

/// The sequence numbers a NACK asks for, if it is one (at most 64 ranges, checked).
pub fn nack_seqs(d: &[u8]) -> Vec<u64> {
    if d.len() < 9 || d[1] != 6 {
        return Vec::new();
    }
    let n = usize::from(d[8]).min(64);
    let mut out = Vec::new();
    for k in 0..n {
        let at = 9 + k * 10;
        let (Some(first), Some(len)) = (d.get(at..at + 8), d.get(at + 8..at + 10)) else {
            break;
        };
        let first = u64::from_be_bytes(first.try_into().unwrap_or([0; 8]));
        let len = u16::from_be_bytes(len.try_into().unwrap_or([0; 2]));
        out.extend((0..u64::from(len).min(256)).map(|i| first + i));
    }
    out
}

impl Ledger {
    /// A message from node `from` to node `to`: delivered, dropped at random (`lost`),
    /// or neither (dropped on a silent path).
    pub fn note(&mut self, from: usize, to: usize, data: &[u8], delivered: bool, lost: bool) {
        if !delivered && !lost {
            return;
        }
        if let Some(seq) = media_seq(data) {
            let e = self.entries.entry((seq, to as u32)).or_default();
            if delivered {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        } else if lost {
            // A request lost on the way counts as a try of the asker's.
            for seq in nack_seqs(data) {
                self.entries.entry((seq, from as u32)).or_default().1 += 1;
            }
        }
    }

    /// Whether the links kept `seq` from `node`: every try dropped, at least [`TRIES`].
    pub fn network_lost(&self, seq: u64, node: usize) -> bool {
        self.entries
            .get(&(seq, node as u32))
            .is_some_and(|(delivered, dropped)| *delivered == 0 && *dropped >= TRIES)
    }
}
