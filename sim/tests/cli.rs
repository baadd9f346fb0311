//! The command line: bad arguments get a clear message and a non-zero exit.

use std::process::Command;

/// A random schedule shorter than its viewers' joins and start bound is refused, not
/// drawn (drawing one panicked).
#[test]
fn a_random_schedule_too_short_to_draw_is_refused_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_braid-sim"))
        .args(["--seeds", "2", "--seconds", "3"])
        .output()
        .expect("braid-sim runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too short for random schedules"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_braid-sim"))
        .args(["--seeds", "2", "--seconds", "5"])
        .output()
        .expect("braid-sim runs");
    assert!(out.status.success(), "{out:?}");
}
