//! The simulator is worth what it agrees with: one topology and one impairment, run as
//! real processes on 127.0.0.1 and as machines in virtual time, deliver the same stream
//! and repair about as much (the two runs draw their losses independently, so repair
//! counts agree within the noise of a 20-second sample, stated below).

use braid_core::impair;
use braid_sim::schedule::{LinkRule, Schedule, Stream, Topology, Tuning, Viewer};
use braid_sim::world::{Kind, World};
use braid_tests::{Net, Spec, metrics};

/// Loss on every link out of an entry point and out of a set reflector.
const LOSS: f64 = 0.2;
const SECONDS: f64 = 20.0;
/// How far apart the repairs per packet may be, as a share of the larger: a binomial
/// count of about 130 repairs per run has a standard deviation near 9%, so 30% is over
/// three of them on the difference.
const TOLERANCE: f64 = 0.30;

fn simulated() -> World {
    let rule = |from: &str| LinkRule {
        from: from.into(),
        to: "*".into(),
        impair: impair::Config {
            loss: LOSS,
            seed: 7,
            ..impair::Config::default()
        },
    };
    let schedule = Schedule {
        seed: 7,
        duration_ms: ((SECONDS + 1.0) * 1000.0) as u64,
        topology: Topology {
            entries: 2,
            sets: 3,
            edges: 1,
            controls: 0,
            base_delay_ms: 1,
        },
        stream: Stream::default(),
        tuning: Tuning::default(),
        links: vec![rule("entry*"), rule("set*")],
        faults: Vec::new(),
        // The viewers are there before the stream, as the processes' viewers are
        // (started before the capture): a join mid-stream would have the set reflectors
        // preburst the group of pictures to the edge, whose asks racing the slower
        // prebursts count as repairs the processes never make.
        viewers: (0..3)
            .map(|_| Viewer {
                join_ms: 0,
                leave_ms: None,
                pause_at_ms: None,
                pause_ms: 0,
            })
            .collect(),
    };
    let mut w = World::new(schedule);
    w.run();
    w
}

fn ratio(repaired: f64, released: f64) -> f64 {
    repaired / released.max(1.0)
}

#[test]
fn a_simulated_run_and_real_processes_agree_on_delivery_gaps_and_repairs() {
    let sim = simulated();
    let outcome = braid_sim::check::check(&sim);
    assert!(outcome.passed(), "{:?}", outcome.violations);
    let sim_sets = sim.merge_totals(Kind::Set);
    let sim_edge = sim.merge_totals(Kind::Edge);

    // The same network as processes: the simulator's stream (25 frames a second of 4 TS
    // packets, a keyframe a second, 2 TS packets per RTP packet).
    let s = Stream::default();
    let bitrate = u64::from(s.ts_per_frame) * 188 * 8 * u64::from(s.fps);
    let mut net = Net::start(Spec {
        sets: 3,
        entries: 2,
        viewers: 3,
        seconds: SECONDS,
        bitrate,
        entry_impair: format!("loss = {LOSS}\nseed = 7"),
        set_impair: vec![format!("loss = {LOSS}\nseed = 7"); 3],
        capture_args: vec![
            "--fps".into(),
            s.fps.to_string(),
            "--ts-per-rtp".into(),
            s.ts_per_rtp.to_string(),
        ],
        ..Spec::default()
    });
    net.wait_viewers();
    let set_counter = |name: &str| -> f64 {
        net.sets
            .iter()
            .map(|p| metrics::sum(p.metrics(), name, &["role=\"set\""]))
            .sum()
    };
    let real_sets = (
        set_counter("braid_merge_repaired_total"),
        set_counter("braid_merge_released_total"),
    );
    let edge = net.edge.metrics();
    let real_edge = (
        metrics::sum(edge, "braid_merge_repaired_total", &["role=\"edge\""]),
        metrics::sum(edge, "braid_merge_released_total", &["role=\"edge\""]),
        metrics::sum(edge, "braid_merge_gap_packets_total", &["role=\"edge\""]),
    );
    let mut real_viewer_gaps = 0;
    for i in 0..3 {
        let st = net.viewer_stats(i);
        real_viewer_gaps += st["gaps"].as_u64().unwrap_or(u64::MAX);
        let packets = st["packets"].as_u64().unwrap_or(0) as f64;
        // The stream ran for the viewer's whole life, minus its start (a keyframe).
        let expected = (SECONDS - 2.0) * f64::from(s.fps) * 2.0;
        assert!(
            packets >= expected,
            "real viewer {i} wrote {packets} packets, fewer than {expected}"
        );
    }
    let sim_viewer_gaps = outcome.gaps;
    println!(
        "set repairs per packet: real {:.4} ({} of {}), simulated {:.4} ({} of {})",
        ratio(real_sets.0, real_sets.1),
        real_sets.0,
        real_sets.1,
        ratio(sim_sets.repaired as f64, sim_sets.released as f64),
        sim_sets.repaired,
        sim_sets.released
    );
    println!(
        "edge repairs per packet: real {:.4} ({} of {}), simulated {:.4} ({} of {}); edge gaps real {}, simulated {}; viewer gaps real {real_viewer_gaps}, simulated {sim_viewer_gaps}",
        ratio(real_edge.0, real_edge.1),
        real_edge.0,
        real_edge.1,
        ratio(sim_edge.repaired as f64, sim_edge.released as f64),
        sim_edge.repaired,
        sim_edge.released,
        real_edge.2,
        sim_edge.gaps
    );
    // Delivery: both give up at most 0.5% of the packets at the edge (at 20% loss a
    // packet missing on all three paths whose four asks all fail happens in either),
    // and the viewers lose nothing more than what their edge gave up.
    for (what, gaps, released, viewer_gaps) in [
        ("real", real_edge.2, real_edge.1, real_viewer_gaps as f64),
        (
            "simulated",
            sim_edge.gaps as f64,
            sim_edge.released as f64,
            sim_viewer_gaps as f64,
        ),
    ] {
        assert!(
            gaps <= 0.005 * released,
            "{what}: the edge gave up {gaps} of {released}"
        );
        assert!(
            viewer_gaps <= 3.0 * gaps,
            "{what}: viewers lost {viewer_gaps}, the edge {gaps}"
        );
    }
    let (r, m) = (
        ratio(real_sets.0, real_sets.1),
        ratio(sim_sets.repaired as f64, sim_sets.released as f64),
    );
    assert!(r > 0.0 && m > 0.0, "repairs happened in both: {r} {m}");
    assert!(
        (r - m).abs() <= TOLERANCE * r.max(m),
        "set reflectors' repairs per packet disagree: real {r:.4}, simulated {m:.4}"
    );
    // The edge repairs far fewer (a packet must be missing on all three paths): within
    // a looser bound, stated as an absolute share of the packets.
    let (r, m) = (
        ratio(real_edge.0, real_edge.1),
        ratio(sim_edge.repaired as f64, sim_edge.released as f64),
    );
    assert!(
        (r - m).abs() <= 0.01,
        "the edge's repairs per packet disagree: real {r:.4}, simulated {m:.4}"
    );
}
