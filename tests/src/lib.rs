//! braid-tests: whole-network tests that run the real daemons as processes on 127.0.0.1
//! (`tests/`), with what they share.
//!
//! # Layout
//!
//! - [`compare`]: checks a viewer's output against what the capture sent.
//! - The process harness lives in `braid_ops::harness` (re-exported here).

pub use braid_ops::harness::crowd;
pub use braid_ops::harness::*;

/// SIGKILLs set reflector `set` 6 s into the stream and entry point 0 `then` later,
/// waits for the viewers, and asserts each got the source byte for byte.
pub fn kill_a_set_reflector_then_an_entry_point(
    net: &mut Net,
    set: usize,
    then: std::time::Duration,
) {
    std::thread::sleep(std::time::Duration::from_secs(6));
    net.sets[set].kill();
    std::thread::sleep(then);
    net.entries[0].kill();
    net.wait_viewers();
    assert_viewers_exact(net);
}

/// Asserts every viewer of `net` got the source byte for byte from where it joined, with
/// no gap, and most of the stream's bytes.
pub fn assert_viewers_exact(net: &Net) {
    for i in 0..net.spec.viewers {
        let bytes =
            compare::assert_contiguous(&net.path("tee.ts"), &net.path(&format!("view{i}.ts")));
        let stats = net.viewer_stats(i);
        assert_eq!(stats["gaps"], 0, "viewer {i}: {stats}");
        // At 4 Mbps a viewer that watched most of its time got megabytes.
        let expected = net.spec.bitrate as f64 / 8.0 * (net.spec.seconds - 4.0);
        assert!(
            bytes as f64 > expected,
            "viewer {i} got only {bytes} bytes; {stats}"
        );
    }
}

/// Checks viewers' output against the capture's tee.
pub mod compare {
    use std::path::Path;

    /// Where `view` starts in `tee` and whether it continues byte for byte to its end.
    /// Panics with a useful message when it does not.
    pub fn assert_contiguous(tee: &Path, view: &Path) -> usize {
        let t = std::fs::read(tee).expect("reading the tee");
        let v = std::fs::read(view).expect("reading the viewer's output");
        assert!(
            v.len() >= 188 * 100,
            "{} holds only {} bytes",
            view.display(),
            v.len()
        );
        let head = &v[..1316.min(v.len())];
        let start = t
            .windows(head.len())
            .position(|w| w == head)
            .unwrap_or_else(|| panic!("{}: the first bytes were never sent", view.display()));
        let end = start + v.len();
        assert!(
            end <= t.len(),
            "{}: longer than what was sent after its start",
            view.display()
        );
        if t[start..end] != v[..] {
            let first_diff = t[start..end]
                .iter()
                .zip(&v)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{}: differs from what was sent at byte {first_diff} of {} (TS packet {})",
                view.display(),
                v.len(),
                first_diff / 188
            );
        }
        v.len()
    }

    /// How many TS packets of the part of `tee` that `view` spans are missing from
    /// `view`, checking that everything `view` holds was sent, in order.
    pub fn missing_ts_packets(tee: &Path, view: &Path) -> (usize, usize) {
        let t = std::fs::read(tee).expect("reading the tee");
        let v = std::fs::read(view).expect("reading the viewer's output");
        assert_eq!(v.len() % 188, 0, "whole TS packets only");
        let tp: Vec<&[u8]> = t.chunks(188).collect();
        let vp: Vec<&[u8]> = v.chunks(188).collect();
        let mut i = tp
            .iter()
            .position(|p| *p == vp[0])
            .expect("the first packet was sent");
        let mut missing = 0;
        for p in &vp {
            let j = tp[i..].iter().position(|q| q == p).unwrap_or_else(|| {
                panic!("a received TS packet was never sent (or came out of order)")
            });
            missing += j;
            i += j + 1;
        }
        (missing, vp.len())
    }
}
