//! `braid-sim`: runs whole Braid networks in virtual time.
//!
//! - `braid-sim --seeds 2000`: random schedules of seeds 0..2000 (or `--first S`), on
//!   every core, with the fault classes CI runs (`--faults passing`, or `all`, or a list).
//! - `braid-sim --seed 42`: replays one seed and prints its schedule and verdict.
//! - `braid-sim --schedule FILE.toml`: replays a saved schedule.
//!
//! A failing schedule is printed as TOML, ready for `sim/regressions/`. Exits 1 when any
//! run broke an invariant.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use braid_sim::{Classes, Outcome, Schedule};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "braid-sim",
    version,
    about = "Whole Braid networks in virtual time"
)]
struct Args {
    /// Run this many random schedules.
    #[arg(long)]
    seeds: Option<u64>,
    /// The first seed of `--seeds`.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Replay this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Replay this schedule (TOML).
    #[arg(long)]
    schedule: Option<PathBuf>,
    /// Run the benchmark network (20 nodes, 50 viewers, 4 Mbit/s) for `--seconds` and
    /// print simulated seconds per wall-clock second.
    #[arg(long)]
    bench: bool,
    /// Simulated seconds per run.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Fault classes: `passing` (what CI runs), `all`, or a comma-separated list.
    #[arg(long, default_value = "passing")]
    faults: String,
    /// Worker threads (default: the number of cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// Print every run's outcome as a JSON line.
    #[arg(long)]
    json: bool,
    /// With `--seed`: write the schedule to this file as a regression, expecting the
    /// outcome it had (`pass`, or its first violation's kind).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print every move of the media packet with this sequence number (or its last six
    /// digits), for replaying one run.
    #[arg(long)]
    trace: Option<u64>,
    /// Print what this viewer wrote (time, sequence number, session, keyframe) where its
    /// output jumps, for replaying one run.
    #[arg(long)]
    dump_viewer: Option<usize>,
    /// Log what the machines say (RUST_LOG syntax), for replaying one run.
    #[arg(long)]
    log: Option<String>,
}

/// The shortest random schedule, ms.
const MIN_RANDOM_MS: u64 = 5_000;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(filter) = &args.log {
        let _ = tracing_subscriber::fmt()
            // The world's span names the node and the time of each line.
            .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
                "{filter},braid_sim=error"
            )))
            .with_writer(std::io::stderr)
            .without_time()
            .try_init();
    }
    let classes = match Classes::parse(&args.faults) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("braid-sim: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let duration_ms = (args.seconds * 1000.0) as u64;
    if args.bench {
        let t = Instant::now();
        let outcome = braid_sim::run(Schedule::bench(duration_ms));
        let wall = t.elapsed().as_secs_f64();
        println!(
            "bench: {} simulated s of 20 nodes and 50 viewers at 4 Mbit/s in {wall:.2} s wall: {:.1} simulated s per wall s ({:.2} M events, {:.2} M events/s); {}",
            args.seconds,
            args.seconds / wall,
            outcome.events as f64 / 1e6,
            outcome.events as f64 / 1e6 / wall,
            if outcome.passed() {
                "every invariant held"
            } else {
                "INVARIANTS BROKEN"
            }
        );
        return if outcome.passed() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        };
    }
    // A random schedule's viewers join from 0.5 s up to two thirds of the run, and one
    // has 5 s to start: shorter runs cannot be drawn, nor checked.
    if args.schedule.is_none() && duration_ms < MIN_RANDOM_MS {
        eprintln!(
            "braid-sim: --seconds {} is too short for random schedules: at least {} s",
            args.seconds,
            MIN_RANDOM_MS / 1000
        );
        return std::process::ExitCode::from(2);
    }
    let one = match (&args.schedule, args.seed) {
        (Some(path), _) => {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("braid-sim: reading {}: {e}", path.display());
                    return std::process::ExitCode::from(2);
                }
            };
            match braid_sim::check::parse_regression(&text) {
                Ok(r) => Some(r.schedule),
                Err(e) => {
                    eprintln!("braid-sim: {}: {e}", path.display());
                    return std::process::ExitCode::from(2);
                }
            }
        }
        (None, Some(seed)) => Some(Schedule::random(seed, duration_ms, classes)),
        (None, None) => None,
    };
    if let Some(schedule) = one {
        let t = Instant::now();
        let mut world = braid_sim::World::new(schedule.clone());
        world.trace = args.trace;
        world.run();
        if let Some(v) = args.dump_viewer {
            dump_viewer(&world, v);
        }
        let outcome = braid_sim::check::check(&world);
        print_outcome(&outcome, t.elapsed().as_secs_f64(), args.json);
        if let Some(path) = &args.save {
            let r = braid_sim::check::Regression {
                about: format!(
                    "braid-sim --seed {} --faults {}",
                    schedule.seed, args.faults
                ),
                expect: outcome
                    .violations
                    .first()
                    .map_or("pass", |v| v.kind)
                    .to_owned(),
                never: Vec::new(),
                schedule: schedule.clone(),
            };
            if let Err(e) = std::fs::write(path, r.to_toml()) {
                eprintln!("braid-sim: writing {}: {e}", path.display());
                return std::process::ExitCode::from(2);
            }
        }
        if !outcome.passed() {
            println!(
                "\n# the schedule (`--save FILE` writes it as a regression for sim/regressions/):\n{}",
                schedule.to_toml()
            );
            return std::process::ExitCode::FAILURE;
        }
        return std::process::ExitCode::SUCCESS;
    }
    let n = args.seeds.unwrap_or(100);
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = AtomicU64::new(args.first);
    let end = args.first + n;
    let failed = AtomicU64::new(0);
    let events = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let schedule = Schedule::random(seed, duration_ms, classes);
                let outcome = braid_sim::run(schedule.clone());
                events.fetch_add(outcome.events, Ordering::Relaxed);
                if args.json {
                    println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
                }
                if !outcome.passed() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "seed {seed} FAILED ({} violations); first: {}\n  replay: braid-sim --seed {seed} --seconds {} --faults {}",
                        outcome.violations.len(),
                        outcome.violations[0],
                        args.seconds,
                        args.faults
                    );
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "{n} schedules of {} s, {failed} failed, in {secs:.1} s wall ({:.0} schedules/min, {:.0} simulated s per wall s, {:.1} M events)",
        args.seconds,
        n as f64 / secs * 60.0,
        n as f64 * args.seconds / secs,
        events.load(Ordering::Relaxed) as f64 / 1e6
    );
    if failed > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// Prints where viewer `v`'s output jumps: each write whose number does not follow the
/// one before, with the two around it.
fn dump_viewer(world: &braid_sim::World, v: usize) {
    let rec = &world.record;
    let Some(writes) = rec.writes.get(v) else {
        return;
    };
    let at = |t: Instant| t.saturating_duration_since(world.start()).as_millis();
    let describe = |seq: u64| match rec.truth.get(&seq) {
        Some(t) => format!(
            "session {}{}{}",
            t.session,
            if t.keyframe { " keyframe" } else { "" },
            if t.entered { "" } else { " (never entered)" }
        ),
        None => "not the source's".into(),
    };
    for (i, w) in writes.iter().enumerate() {
        let jump = i == 0 || writes[i - 1].1.0 + 1 != w.1.0;
        if jump {
            if i > 0 {
                let p = writes[i - 1];
                println!(
                    "  {:>6} ms  {}  {}  edge {}",
                    at(p.0),
                    p.1.0,
                    describe(p.1.0),
                    p.2
                );
            }
            println!(
                "  {:>6} ms  {}  {}  edge {}",
                at(w.0),
                w.1.0,
                describe(w.1.0),
                w.2
            );
            println!("  ...");
        }
    }
}

fn print_outcome(o: &Outcome, secs: f64, json: bool) {
    if json {
        println!("{}", serde_json::to_string(o).unwrap_or_default());
        return;
    }
    println!(
        "seed {}: {} ({} events in {secs:.2} s; sent {}, written {}, gaps {}, switches {}, repaired {})",
        o.seed,
        if o.passed() { "passed" } else { "FAILED" },
        o.events,
        o.sent,
        o.written,
        o.gaps,
        o.switches,
        o.repaired
    );
    for v in &o.viewers {
        println!("  {v}");
    }
    for v in &o.violations {
        println!("  {v}");
    }
}
