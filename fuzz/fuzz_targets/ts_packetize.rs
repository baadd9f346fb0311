//! Any bytes as a capture's MPEG-TS input (the UDP source takes datagrams from anyone):
//! never a panic, every byte accounted for (sent, skipped and counted, or waiting for the
//! rest of a packet), whole TS packets only, at most seven per RTP payload.
#![no_main]

use braid_capture::packetize::Packetizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut p = Packetizer::new(7);
    // Feed in two uneven pieces, as a pipe would.
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    p.handle_input(&data[..cut]);
    p.handle_input(&data[cut..]);
    p.flush();
    let mut out = 0usize;
    while let Some(c) = p.poll_output() {
        assert_eq!(c.payload.len() % 188, 0);
        assert!(c.payload.len() <= 7 * 188);
        out += c.payload.len();
    }
    assert_eq!(out as u64 + p.stats().skipped_bytes + p.buffered() as u64, data.len() as u64);
});
