//! Any sequence of (time step, path, sequence number) into the merge: no panic, memory
//! stays within max_held, and what comes out is strictly increasing.
#![no_main]

use std::time::{Duration, Instant};

use braid_core::merge::{Buffer, Config, Input, Output};
use braid_core::{PathId, SeqNo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let t = Instant::now();
    let config = Config {
        max_held: 64,
        ..Config::default()
    };
    let mut b = Buffer::new(config).expect("valid config");
    let mut now = t;
    let mut last: Option<SeqNo> = None;
    for chunk in data.chunks_exact(11) {
        now += Duration::from_millis(u64::from(chunk[0]));
        let path = PathId(chunk[1] % 8);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&chunk[2..10]);
        // Mostly small numbers, so that reordering and holes are explored, sometimes huge.
        let seq = if chunk[10] & 1 == 0 {
            SeqNo(u64::from_be_bytes(seq) % 512)
        } else {
            SeqNo(u64::from_be_bytes(seq))
        };
        b.handle_input(now, Input::Packet { path, seq, item: () });
        assert!(b.held() <= 64);
        loop {
            match b.poll_output() {
                Output::Packet { seq, .. } => {
                    assert!(last.is_none_or(|l| seq > l));
                    last = Some(seq);
                }
                Output::Gap { first, count } => {
                    assert!(last.is_none_or(|l| first > l));
                    last = Some(SeqNo(first.0 + count - 1));
                }
                Output::Nack { .. } => {}
                Output::Timeout(_) => break,
            }
        }
    }
});
