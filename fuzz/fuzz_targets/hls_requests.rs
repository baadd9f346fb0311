//! Any packets (numbered by a capture or not) into an HLS segmenter, then any request names and numbers against it:
//! answered or refused, never a panic.
#![no_main]

use braid_core::SeqNo;
use braid_core::hls::{Config, Segmenter, parse_name};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(rest.len());
    let (packets, request) = rest.split_at(split);
    let mut s = Segmenter::new(Config::default(), 1).expect("default settings");
    let mut ts = 0u32;
    for (i, chunk) in packets.chunks(3).enumerate() {
        let dt = u32::from(chunk[0]) * 1000;
        ts = ts.wrapping_add(dt);
        let keyframe = chunk.get(1).is_some_and(|b| b & 1 == 1);
        let ssrc = u32::from(chunk.get(2).copied().unwrap_or(0) >> 6);
        // Segment numbers of any size, now and then.
        let segment = chunk
            .get(1)
            .filter(|b| *b & 2 == 2)
            .map(|b| u64::from(*b).rotate_right(u32::from(chunk[0] & 63)));
        let payload = Bytes::from_static(&[0x47]);
        s.push(SeqNo(i as u64), ts, ssrc, keyframe, segment, payload, 0);
    }
    let text = String::from_utf8_lossy(request);
    for with_part in [false, true] {
        if let Some((_, msn, part)) = parse_name(&text, with_part) {
            let _ = s.segment(msn);
            let _ = s.part(msn, part);
            let _ = s.check_block(msn, Some(part as u64));
            let _ = s.upcoming(msn, Some(part));
        }
    }
    let _ = s.playlist(&text);
});
