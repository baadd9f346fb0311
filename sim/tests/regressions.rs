//! Every schedule in `sim/regressions/` replays to what it expects: `pass`, or (a defect
//! reproduced and not fixed yet) a violation of the kind named. A fixed defect's file
//! changes to `expect = "pass"` and stays, so it never comes back.

use std::path::PathBuf;

#[test]
fn every_regression_replays_as_expected() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("sim/regressions exists")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no regression in {}", dir.display());
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("readable");
        let r = braid_sim::check::parse_regression(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        match r.check() {
            Ok(o) => println!(
                "{}: {} as expected ({} violations)",
                f.display(),
                r.expect,
                o.violations.len()
            ),
            Err(e) => failures.push(format!("{}: {e}", f.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_run_replays_exactly() {
    let s = braid_sim::Schedule::random(3, 10_000, braid_sim::Classes::all());
    let a = braid_sim::run(s.clone());
    let b = braid_sim::run(s);
    assert_eq!(
        (a.events, a.written, a.gaps, a.switches, &a.violations),
        (b.events, b.written, b.gaps, b.switches, &b.violations)
    );
}

/// A few random schedules of the kinds CI runs by thousands (`braid-sim --seeds 2000`
/// in `ops/test.sh`); `BRAID_SIM_SEEDS` asks for more.
#[test]
fn random_schedules_hold_every_invariant() {
    let n: u64 = std::env::var("BRAID_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut failed = Vec::new();
    for seed in 0..n {
        let s = braid_sim::Schedule::random(seed, 30_000, braid_sim::Classes::passing());
        let o = braid_sim::run(s.clone());
        if !o.passed() {
            failed.push(format!("seed {seed}: {}\n{}", o.violations[0], s.to_toml()));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
