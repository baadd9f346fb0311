//! Any bytes as the TS a viewer writes across changes of rendition, and as a keyframe's
//! payload at an edge looking for its media time: never a panic; the rewrite keeps the
//! length and changes nothing but continuity counters.
#![no_main]

use braid_client::continuity::Continuity;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = braid_core::hls::media_time(data);
    let _ = braid_core::hls::video_dts(data);
    let mut c = Continuity::default();
    c.start();
    // Pieces cut where the first byte says, a change of rendition between each.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1) * 8;
    for piece in data.chunks(step) {
        let out = c.fix(Bytes::copy_from_slice(piece));
        assert_eq!(out.len(), piece.len());
        for (i, (a, b)) in out.iter().zip(piece).enumerate() {
            if i % 188 != 3 {
                assert_eq!(a, b);
            } else {
                assert_eq!(a & 0xf0, b & 0xf0);
            }
        }
        c.resync();
    }
});
