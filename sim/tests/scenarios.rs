//! Decisions about paths, faults and switching, proven in virtual time: each scenario
//! runs a schedule, holds every invariant of `braid_sim::check`, and asserts what the
//! scenario is about. (They were real-process tests; what only real processes show,
//! sockets, QUIC, TCP, media and signals, stays in `tests/`.)

use braid_core::impair;
use braid_sim::schedule::{Fault, FaultKind, LinkRule, Schedule, Stream, Topology, Tuning, Viewer};
use braid_sim::world::{Kind, World};

fn link(from: &str, to: &str, impair: impair::Config) -> LinkRule {
    LinkRule {
        from: from.into(),
        to: to.into(),
        impair,
    }
}

fn loss(p: f64, seed: u64) -> impair::Config {
    impair::Config {
        loss: p,
        seed,
        ..impair::Config::default()
    }
}

fn viewers(n: usize) -> Vec<Viewer> {
    (0..n)
        .map(|i| Viewer {
            join_ms: 500 + 100 * i as u64,
            leave_ms: None,
            pause_at_ms: None,
            pause_ms: 0,
        })
        .collect()
}

fn schedule(topology: Topology, links: Vec<LinkRule>, faults: Vec<Fault>) -> Schedule {
    Schedule {
        seed: 1,
        duration_ms: 30_000,
        topology,
        stream: Stream::default(),
        tuning: Tuning::default(),
        links,
        faults,
        viewers: viewers(6),
    }
}

fn topology(sets: usize, edges: usize, controls: usize) -> Topology {
    Topology {
        entries: 2,
        sets,
        edges,
        controls,
        base_delay_ms: 5,
    }
}

/// Runs a schedule; panics with the violations if an invariant broke.
fn run(s: Schedule) -> World {
    let mut w = World::new(s);
    w.run();
    let o = braid_sim::check::check(&w);
    assert!(
        o.passed(),
        "{}\n{}",
        o.violations
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        o.viewers.join("\n")
    );
    w
}

fn fault(at_ms: u64, what: FaultKind) -> Fault {
    Fault { at_ms, what }
}

/// Health is judged by data, not control: a path whose media all dies while its
/// control passes gets no repair asks that cannot be answered, and the edge moves its
/// subscription off it; the two other paths lose 15% and nothing reaches a viewer.
#[test]
fn a_path_whose_data_dies_while_its_control_passes_costs_nothing() {
    let dead = impair::Config {
        loss: 1.0,
        data_only: true,
        ..impair::Config::default()
    };
    let w = run(schedule(
        topology(4, 1, 0),
        vec![link("set0", "*", dead), link("set*", "*", loss(0.15, 3))],
        vec![],
    ));
    let edge = &w
        .reflector_counters()
        .into_iter()
        .find(|(n, _)| n == "edge0")
        .expect("edge0")
        .1;
    assert!(
        edge.path_replaced >= 1,
        "the edge moved off the dead path: {edge:?}"
    );
    assert_eq!(w.merge_totals(Kind::Edge).gaps, 0);
}

/// A set reflector killed, later an entry point: the other paths carry the stream (the
/// source's own links stay clean: once one entry point is gone, a packet the source's
/// last link loses is lost to everyone).
#[test]
fn killing_a_set_reflector_then_an_entry_point_loses_nothing() {
    let w = run(schedule(
        topology(3, 2, 1),
        vec![
            link("entry*", "*", loss(0.05, 5)),
            link("set*", "*", loss(0.05, 5)),
        ],
        vec![
            fault(
                8_000,
                FaultKind::Kill {
                    node: "set1".into(),
                },
            ),
            fault(
                16_000,
                FaultKind::Kill {
                    node: "entry0".into(),
                },
            ),
        ],
    ));
    assert_eq!(w.merge_totals(Kind::Edge).gaps, 0);
}

/// Two paths 150 ms apart, 5% loss on each, a reorder window sized to the skew: the late
/// path's copies and the repairs fill every hole in time.
#[test]
fn paths_150_ms_apart_lose_nothing() {
    let mut s = schedule(
        topology(2, 1, 0),
        vec![
            link(
                "set0",
                "*",
                impair::Config {
                    delay_ms: 40,
                    loss: 0.05,
                    seed: 3,
                    ..impair::Config::default()
                },
            ),
            link("set1", "*", loss(0.05, 4)),
        ],
        vec![],
    );
    s.tuning.reorder_window_ms = Some(400);
    let w = run(s);
    let t = w.merge_totals(Kind::Edge);
    assert_eq!(
        (t.gaps, t.late),
        (0, 0),
        "nothing given up, nothing after its window"
    );
}

/// Without repair, a viewer loses about p³ of the packets (every path must lose the same
/// one), each loss counted at the edge and by the viewer.
#[test]
fn without_repair_a_viewer_loses_about_p_cubed_and_counts_it() {
    let mut s = schedule(
        topology(3, 1, 0),
        vec![
            link("entry*", "*", loss(0.1, 6)),
            link("set*", "*", loss(0.1, 7)),
        ],
        vec![],
    );
    s.tuning.repair = Some(false);
    s.duration_ms = 120_000;
    let mut w = World::new(s);
    w.run();
    let edge = w.merge_totals(Kind::Edge);
    let rate = edge.gaps as f64 / (edge.released + edge.gaps) as f64;
    // Each path loses 10% on its own link plus what both entry links lost (1%):
    // p = 0.109, p³ = 0.13%; chance allows 0.03% to 0.5% over 6,000 packets.
    assert!((0.0003..0.005).contains(&rate), "lost {rate:.5}: {edge:?}");
    for (v, st) in w.record.stats.iter().enumerate() {
        let st = st.as_ref().expect("stats");
        assert!(
            st.gaps >= 1 && st.gaps as f64 <= 0.005 * st.packets as f64,
            "viewer{v}: {st:?}"
        );
    }
}

/// Every control server dies, then a viewer's edge: viewers go straight to a candidate
/// of the other set from their last assignment, without loss.
#[test]
fn with_every_control_server_dead_viewers_still_reach_the_secondary_set() {
    let w = run(schedule(
        topology(3, 2, 2),
        vec![link("*", "*", loss(0.02, 8))],
        vec![
            fault(
                5_000,
                FaultKind::Kill {
                    node: "control0".into(),
                },
            ),
            fault(
                5_000,
                FaultKind::Kill {
                    node: "control1".into(),
                },
            ),
            fault(
                10_000,
                FaultKind::Kill {
                    node: "edge0".into(),
                },
            ),
            fault(
                10_000,
                FaultKind::Kill {
                    node: "edge0".into(),
                },
            ),
        ],
    ));
    let moved: Vec<_> = w
        .record
        .stats
        .iter()
        .flatten()
        .flat_map(|s| s.switches.iter())
        .filter(|s| s.from.ends_with(":9000"))
        .collect();
    assert!(!moved.is_empty(), "viewers of edge0 moved");
    assert!(
        moved
            .iter()
            .all(|s| !s.via_control && s.to.ends_with(":9001"))
    );
}

/// An operator drains an edge: its viewers move to the other set, told by the edge,
/// without loss, and the drained edge takes no new viewer.
#[test]
fn draining_an_edge_moves_its_viewers_without_loss() {
    let w = run(schedule(
        topology(3, 2, 1),
        vec![link("*", "*", loss(0.02, 9))],
        vec![fault(
            8_000,
            FaultKind::Drain {
                node: "edge0".into(),
                for_ms: 30_000,
            },
        )],
    ));
    for st in w.record.stats.iter().flatten() {
        assert_eq!(
            st.edge, "10.4.0.2:9001",
            "every viewer ends on the undrained edge: {st:?}"
        );
    }
    let drained = w
        .record
        .stats
        .iter()
        .flatten()
        .flat_map(|s| s.switches.iter())
        .filter(|s| s.reason == "drain")
        .count();
    assert!(drained >= 1, "someone was on edge0 and was told to move");
}

/// Fast start: an edge with no stream yet gets the latest group of pictures from its set
/// reflectors at once (a preburst), and a client writes as soon as its buffer holds its
/// configured duration of stream. With 2 s groups of pictures, a viewer's first byte
/// is written well under half a second after its first watch on a cold edge, and at
/// once on a warm one, where before both waited for the next keyframe or the buffer's
/// wall-clock wait.
#[test]
fn viewers_start_fast_on_cold_and_warm_edges() {
    let mut s = schedule(topology(3, 2, 1), vec![], vec![]);
    s.stream.gop = 50;
    s.viewers = (0..8)
        .map(|i| Viewer {
            join_ms: 3_000 + 1_300 * i as u64,
            leave_ms: None,
            pause_at_ms: None,
            pause_ms: 0,
        })
        .collect();
    let w = run(s);
    let mut outputs = Vec::new();
    for (i, st) in w.record.stats.iter().enumerate() {
        let st = st.as_ref().expect("stats");
        eprintln!(
            "viewer{i}: edge {} join {:?} first output {:?}",
            st.edge, st.join_ms, st.first_output_ms
        );
        let (join, first) = (
            st.join_ms.expect("joined"),
            st.first_output_ms.expect("wrote"),
        );
        // The first viewer of each edge finds it cold; its first packet still comes
        // within a few round trips (5 ms links), not at the next keyframe.
        assert!(
            join <= 60,
            "viewer{i} waited {join} ms for its first packet"
        );
        // Never more than the buffer's own wait, and at once when the burst from the
        // last keyframe already fills the buffer.
        assert!(
            first <= 500 + 60,
            "viewer{i} wrote its first byte after {first} ms"
        );
        outputs.push(first);
    }
    outputs.sort_unstable();
    assert!(
        outputs[outputs.len() / 2] <= 100,
        "median first write {} ms",
        outputs[outputs.len() / 2]
    );
}

/// Four set reflectors, edges subscribed to three (`subscribe_k`): the three paths lose
/// 35% each, so about 4% of packets are missing on all of them and asked for. Each edge
/// sees its repairs in trouble, subscribes to the fourth set reflector, and nothing is
/// lost; with the fourth path the asks fall to next to nothing. Without the extra path
/// (three set reflectors only) the same loss needs many times the asks.
#[test]
fn an_edge_whose_repairs_keep_failing_subscribes_to_one_more_set_reflector() {
    let lossy = |set: &str| link(set, "edge*", loss(0.35, 40 + set.len() as u64));
    let build = |sets: usize| {
        let mut s = schedule(
            topology(sets, 2, 1),
            vec![lossy("set0"), lossy("set1"), lossy("set2")],
            vec![],
        );
        s.tuning.subscribe_k = Some(3);
        s
    };
    let w = run(build(4));
    let extra: u64 = w
        .reflector_counters()
        .iter()
        .filter(|(name, _)| name.starts_with("edge"))
        .map(|(_, c)| c.extra_subscriptions)
        .sum();
    assert!(extra >= 2, "each edge subscribed to one more: {extra}");
    let asked_with = w.merge_totals(Kind::Edge).nacked;
    let asked_without = run(build(3)).merge_totals(Kind::Edge).nacked;
    eprintln!("edges' asks: {asked_with} with a fourth path, {asked_without} without");
    assert!(
        asked_with * 3 < asked_without,
        "the extra path took most of the asks away: {asked_with} against {asked_without}"
    );
}

/// The world of regression `name` (in `sim/regressions/`), run to its end.
fn replayed(name: &str) -> World {
    let file = format!("{}/regressions/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(file).expect("the regression's schedule");
    let r = braid_sim::check::parse_regression(&text).expect("a regression");
    let mut w = World::new(r.schedule);
    w.run();
    w
}

/// A ladder's viewer on a link its lowest rendition nearly fills (issue 13: 110 kbit/s,
/// 97% of it on the wire), from `sim/regressions/`. Every hole the full link opened,
/// asked for again and again while its first answer waited in the queue, used to be
/// answered each time: the repairs crowded out the stream (250-300 kbit/s of them
/// offered to a link of 110), and the viewer lost 108 packets of 870.
#[test]
fn repairs_do_not_crowd_out_a_rendition_that_nearly_fills_its_link() {
    let w = replayed("ladder-repairs-crowd-out-a-nearly-full-link.toml");
    let st = w.record.stats[10].as_ref().expect("viewer10's stats");
    assert!(
        st.packets > 700 && st.gaps * 100 <= st.packets,
        "viewer10 lost {} of {} packets: {st:?}",
        st.gaps,
        st.packets
    );
}

/// Issue 13: repairs that flood a ladder viewer's link (its meter reading it as keeping
/// up, since the repairs that arrive make up for the stream's packets the overflow drops)
/// are held to what the link delivers, and a hole goes again no sooner than the viewer's
/// recent round trip. viewer13 lost 273 packets before; 86 since (111 with the hold
/// alone, 90 with the budget alone).
#[test]
fn repairs_that_flood_a_link_are_held_to_what_it_receives() {
    let w = replayed("ladder-repairs-flood-a-link-they-fill.toml");
    let st = w.record.stats[13].as_ref().expect("viewer13's stats");
    assert!(
        st.packets > 2000 && st.gaps < 150,
        "viewer13 lost {} of {} packets: {st:?}",
        st.gaps,
        st.packets
    );
}

/// Issue 13: a ladder's viewer moved to another rendition (a session of its own) while
/// its link's queue stood full reads that queue on, and asks no sooner than it drains.
/// It read the new session's queue as empty (its least delay taken behind the full
/// queue), asked for its holes every 80-100 ms into 300 ms of queue, and the answers
/// arrived as duplicates that crowded the link: 760 asks, 460 duplicates and 185
/// packets lost (most while it was served above its link's cap, which the check
/// excuses). Since: 293, 353 and 146.
#[test]
fn a_new_rendition_behind_a_full_queue_is_not_asked_into_it() {
    let w = replayed("ladder-new-rendition-behind-a-full-queue.toml");
    let st = w.record.stats[11].as_ref().expect("viewer11's stats");
    assert!(
        st.packets > 1500 && st.nacks < 450 && st.gaps < 170,
        "viewer11 asked {} times and lost {} of {} packets: {st:?}",
        st.nacks,
        st.gaps,
        st.packets
    );
}

/// Issue 13, and CI's failing capped viewer: a link capped at 2.8-3.2 Mbit/s, over the
/// keeping line of the middle rendition (about 2.5 Mbit/s of TS and 2.56 on the wire,
/// a 95% share of the cap must cover it), moves a viewer from the top to the middle and
/// never past it to the lowest, from which no probe climbs back under that cap. Its
/// credits come in steps (the client acknowledges every 32 packets or 250 ms): read
/// over each sample's duration, the viewer under 2.9 Mbit/s moved on to the lowest
/// 2.7 s after reaching the middle; read between credits it stays.
///
/// Gaps are not asserted: on links a rendition fills to 92-97% they are the ladder
/// class's known defect (see the README); what is asserted is where each viewer goes.
#[test]
fn a_cap_at_the_middle_renditions_keeping_line_moves_a_viewer_to_it_not_past_it() {
    let caps = [2800, 2850, 2900, 3000, 3100, 3200];
    let mut s = schedule(topology(2, 2, 1), Vec::new(), Vec::new());
    s.duration_ms = 50_000;
    // About 1, 2.5 and 5 Mbit/s of TS, 7 TS packets to a datagram: the real test's.
    s.stream.ladder = vec![27, 66, 133];
    s.stream.ts_per_rtp = 7;
    s.faults = caps
        .iter()
        .enumerate()
        .map(|(i, &kbps)| {
            let node = format!("viewer{i}");
            fault(25_000, FaultKind::LinkRate { node, kbps })
        })
        .collect();
    let mut w = World::new(s);
    w.run();
    for (i, cap) in caps.iter().enumerate() {
        let st = w.record.stats[i].as_ref().expect("stats");
        let moves: Vec<(u64, u8)> = st.renditions.iter().map(|r| (r.at_ms, r.index)).collect();
        let at_cap = st
            .renditions
            .iter()
            .rfind(|r| r.at_ms < 25_000)
            .map(|r| r.index);
        assert_eq!(
            at_cap,
            Some(2),
            "viewer{i} climbed to the top first: {moves:?}"
        );
        assert!(
            st.renditions
                .iter()
                .all(|r| r.index > 0 || r.at_ms < 25_000),
            "viewer{i} under a {cap} kbit/s cap went past the middle: {moves:?}"
        );
        let last = st.renditions.last().map(|r| r.index);
        assert_eq!(last, Some(1), "viewer{i} settled on the middle: {moves:?}");
    }
}

/// A restarted edge's viewers (no control server: they come back to it by themselves)
/// return one by one, each at its own point: those on far (150 ms), lossy (5%) links,
/// with a 1.5 s buffer, ask later and from further back (holes were being repaired
/// when the edge died). Each resumes from its own point and loses nothing to the 1.5 s
/// outages. It takes all three: the viewers hold their holes through the silence
/// (without, they give them up while the edge is down), the restarted edge asks the
/// set reflectors for the stream's past a latecomer lacks (without, it is started at a
/// later keyframe), and the set reflectors keep 4 s (2 s was too little: a viewer's
/// point is more than 2 s old by the time its restarted edge asks).
#[test]
fn a_restarted_edges_viewers_each_resume_from_their_own_point() {
    let far = impair::Config {
        delay_ms: 150,
        ..loss(0.05, 21)
    };
    let mut links = Vec::new();
    for v in 3..6 {
        let node = format!("viewer{v}");
        links.push(link("edge0", &node, far.clone()));
        links.push(link(&node, "edge0", far.clone()));
    }
    let restart = |at_ms| {
        fault(
            at_ms,
            FaultKind::Restart {
                node: "edge0".into(),
                down_ms: 1500,
            },
        )
    };
    let mut s = schedule(
        topology(2, 1, 0),
        links,
        vec![restart(8_000), restart(16_000), restart(24_000)],
    );
    s.tuning.buffer_ms = Some(1500);
    run(s);
}
