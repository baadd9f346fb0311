//! A schedule: everything one simulated run does, as data. Drawn from a seed by
//! [`Schedule::random`], printed as TOML when it fails, and pasted back into a
//! regression file to replay it exactly.

use braid_core::impair;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One run: the network, its links, its faults and its viewers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Seeds every random choice the run makes (links' impairments among them).
    pub seed: u64,
    /// Simulated time, milliseconds.
    pub duration_ms: u64,
    /// The nodes.
    pub topology: Topology,
    /// The source.
    #[serde(default)]
    pub stream: Stream,
    /// Settings that differ from the daemons' defaults.
    #[serde(default)]
    pub tuning: Tuning,
    /// Link impairments; the first rule matching a link applies.
    #[serde(default)]
    pub links: Vec<LinkRule>,
    /// Faults, in any order.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// The viewers.
    #[serde(default)]
    pub viewers: Vec<Viewer>,
}

/// How many nodes of each role. Nodes are named `capture`, `entry0`…, `set0`…, `edge0`…
/// (even-numbered edges in the even-port set, odd-numbered in the odd one), `control0`….
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Entry points (every packet goes to each).
    pub entries: usize,
    /// Set reflectors.
    pub sets: usize,
    /// Edges, alternately in the even and the odd set.
    pub edges: usize,
    /// Control servers (0: viewers watch `edge0` directly).
    pub controls: usize,
    /// One-way delay of every link, milliseconds.
    #[serde(default = "default_base_delay")]
    pub base_delay_ms: u64,
}

fn default_base_delay() -> u64 {
    5
}

/// The synthetic source: valid MPEG-TS whose every packet is unique.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stream {
    /// Frames per second.
    pub fps: u32,
    /// TS packets per frame (tables come on top, every fifth frame and on keyframes).
    pub ts_per_frame: u32,
    /// Frames per group of pictures.
    pub gop: u32,
    /// TS packets per RTP packet.
    pub ts_per_rtp: usize,
    /// A ladder of renditions: TS packets per frame of each, lowest first (streams 1,
    /// 2, …, a capture each, keyframes aligned); empty: one stream of `ts_per_frame`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ladder: Vec<u32>,
}

impl Stream {
    /// The nominal rate of rendition `r` of the ladder, kbit/s (its TS packets a second).
    pub fn rendition_kbps(&self, r: usize) -> u64 {
        let ts = self.ladder.get(r).copied().unwrap_or(self.ts_per_frame);
        u64::from(ts) * 188 * 8 * u64::from(self.fps) / 1000
    }
}

impl Default for Stream {
    /// About 60 packets a second (150 kbit/s of TS): enough packets per detector window
    /// to judge, few enough that thousands of 30 s runs fit in CI.
    fn default() -> Self {
        Stream {
            fps: 25,
            ts_per_frame: 4,
            gop: 25,
            ts_per_rtp: 2,
            ladder: Vec::new(),
        }
    }
}

/// Settings that differ from the daemons' defaults (none by default).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    /// Reflectors' reorder window, ms.
    pub reorder_window_ms: Option<u64>,
    /// Viewers' playout buffer, ms.
    pub buffer_ms: Option<u64>,
    /// Edges' subscriptions.
    pub subscribe_k: Option<usize>,
    /// Reflectors ask for what every path lost.
    pub repair: Option<bool>,
}

/// Which links an impairment applies to: `from` and `to` are node names or patterns
/// (`*`, `set*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkRule {
    /// Sender pattern.
    pub from: String,
    /// Receiver pattern.
    pub to: String,
    /// What the links do (outages are counted from the run's start).
    #[serde(flatten)]
    pub impair: impair::Config,
}

/// A fault at a moment of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// When, ms from the start.
    pub at_ms: u64,
    /// What.
    #[serde(flatten)]
    pub what: FaultKind,
}

/// What can go wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// The node dies for good.
    Kill {
        /// Which.
        node: String,
    },
    /// The node stops (SIGSTOP) and resumes with its queued input.
    Hang {
        /// Which.
        node: String,
        /// For how long, ms.
        for_ms: u64,
    },
    /// The node dies and starts again with fresh state on the same address.
    Restart {
        /// Which.
        node: String,
        /// How long it is down, ms.
        down_ms: u64,
    },
    /// Nothing passes between two nodes, either way.
    Partition {
        /// One end.
        a: String,
        /// The other.
        b: String,
        /// For how long, ms.
        for_ms: u64,
    },
    /// An operator drains an edge (its viewers move) and later undrains it.
    Drain {
        /// Which edge.
        node: String,
        /// For how long, ms.
        for_ms: u64,
    },
    /// A viewer's link from the edges is capped at this rate from now on (a token
    /// bucket with 300 ms of queue), or uncapped (0).
    LinkRate {
        /// Which viewer.
        node: String,
        /// The cap, kbit/s (0: none).
        kbps: u64,
    },
}

/// One viewer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Viewer {
    /// When it starts, ms.
    pub join_ms: u64,
    /// When it leaves, ms (never, when absent).
    #[serde(default)]
    pub leave_ms: Option<u64>,
    /// Stopped (a busy player, a laptop lid) at this moment, ms…
    #[serde(default)]
    pub pause_at_ms: Option<u64>,
    /// … for this long, ms.
    #[serde(default)]
    pub pause_ms: u64,
}

/// Which kinds of fault [`Schedule::random`] may draw. Kinds the network does not yet
/// survive are off in [`Classes::passing`], the set CI runs by thousands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classes {
    /// Kill, hang and restart set reflectors.
    pub sets: bool,
    /// Kill and restart entry points.
    pub entries: bool,
    /// Kill, hang, restart and drain edges.
    pub edges: bool,
    /// Kill and hang control servers.
    pub controls: bool,
    /// Partitions between a set reflector and an edge.
    pub partitions: bool,
    /// The capture restarted as a new session.
    pub capture_restart: bool,
    /// Viewers paused for seconds.
    pub pauses: bool,
    /// A set reflector's links to the edges much later than the others'.
    pub skew: bool,
    /// Outages on two paths at the same moments.
    pub aligned_outages: bool,
    /// A ladder of three renditions, and viewers' links capped and uncapped at random.
    pub ladder: bool,
}

impl Classes {
    /// Every kind.
    pub fn all() -> Classes {
        Classes {
            sets: true,
            entries: true,
            edges: true,
            controls: true,
            partitions: true,
            capture_restart: true,
            pauses: true,
            skew: true,
            aligned_outages: true,
            ladder: true,
        }
    }

    /// The kinds the network survives today.
    pub fn passing() -> Classes {
        Classes {
            edges: false,
            skew: false,
            aligned_outages: false,
            // Renditions under caps: viewers are served above their link for longer
            // than the step-down bound, and lose packets before they step down (issue 13).
            ladder: false,
            ..Classes::all()
        }
    }

    /// From a comma-separated list of names (`all`, `passing`, or kinds).
    pub fn parse(s: &str) -> Result<Classes, String> {
        let mut c = Classes {
            sets: false,
            entries: false,
            edges: false,
            controls: false,
            partitions: false,
            capture_restart: false,
            pauses: false,
            skew: false,
            aligned_outages: false,
            ladder: false,
        };
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "all" => c = Classes::all(),
                "passing" => c = Classes::passing(),
                "sets" => c.sets = true,
                "entries" => c.entries = true,
                "edges" => c.edges = true,
                "controls" => c.controls = true,
                "partitions" => c.partitions = true,
                "capture_restart" => c.capture_restart = true,
                "pauses" => c.pauses = true,
                "skew" => c.skew = true,
                "aligned_outages" => c.aligned_outages = true,
                "ladder" => c.ladder = true,
                other => return Err(format!("unknown fault class {other:?}")),
            }
        }
        Ok(c)
    }
}

/// When a fault of one kind keeps a node busy, so the next of that kind waits.
#[derive(Default)]
struct Busy(Vec<(u64, u64)>);

impl Busy {
    fn free(&self, from: u64, until: u64) -> bool {
        self.0.iter().all(|(a, b)| until <= *a || from >= *b)
    }
    fn take(&mut self, from: u64, until: u64) {
        self.0.push((from, until));
    }
}

impl Schedule {
    /// A network of at least 10 nodes and 20 viewers, with random link impairments and
    /// faults of the kinds `classes` allows, drawn from `seed`. Faults are drawn so the
    /// network can always deliver: at most one set reflector (or one of its links to an
    /// edge) and one entry point down at a time, and never both edges sets at once.
    pub fn random(seed: u64, duration_ms: u64, classes: Classes) -> Schedule {
        let mut rng = SmallRng::seed_from_u64(seed);
        let topology = Topology {
            entries: 2,
            sets: rng.random_range(3..=4),
            edges: 2 * rng.random_range(2..=3),
            controls: rng.random_range(1..=2),
            base_delay_ms: rng.random_range(1..=15),
        };
        let mut links = Vec::new();
        // Loss, bursts, jitter, reordering and duplication on each hop, drawn per hop.
        for (from, to) in [
            ("capture", "entry*"),
            ("entry*", "set*"),
            ("set*", "edge*"),
            ("edge*", "viewer*"),
        ] {
            let mut c = impair::Config {
                seed: rng.random(),
                ..impair::Config::default()
            };
            if rng.random_bool(0.7) {
                c.loss = rng.random_range(0.0..0.08);
            }
            if rng.random_bool(0.3) {
                c.burst = Some(impair::Burst {
                    p_enter: rng.random_range(0.001..0.02),
                    p_leave: rng.random_range(0.2..0.6),
                    loss_in_burst: rng.random_range(0.3..0.9),
                });
            }
            if rng.random_bool(0.4) {
                c.jitter_ms = rng.random_range(1..=20);
            }
            if rng.random_bool(0.3) {
                c.reorder = rng.random_range(0.0..0.05);
                c.reorder_ms = rng.random_range(5..=40);
            }
            if rng.random_bool(0.3) {
                c.duplicate = rng.random_range(0.0..0.03);
            }
            if from == "edge*" {
                // The last hop is a viewer's own network: lighter.
                c.loss /= 2.0;
                c.burst = None;
            }
            links.push(LinkRule {
                from: from.into(),
                to: to.into(),
                impair: c,
            });
        }
        let mut faults = Vec::new();
        let window = |rng: &mut SmallRng, min: u64, max: u64| {
            let len = rng.random_range(min..=max);
            let at = rng.random_range(2_000..duration_ms.saturating_sub(len + 3_000).max(2_001));
            (at, len)
        };
        let mut set_busy = Busy::default();
        if classes.skew && rng.random_bool(0.5) {
            // One set reflector's copies arrive far behind the others'.
            let s = rng.random_range(0..topology.sets);
            links.insert(
                0,
                LinkRule {
                    from: format!("set{s}"),
                    to: "edge*".into(),
                    impair: impair::Config {
                        delay_ms: rng.random_range(150..=400),
                        seed: rng.random(),
                        ..impair::Config::default()
                    },
                },
            );
        }
        if classes.aligned_outages && rng.random_bool(0.5) {
            // Two set reflectors' links go silent at the same moments.
            let period = rng.random_range(1_500..=3_000u64);
            let len = rng.random_range(150..=400u64);
            let outages: Vec<impair::Outage> = (1..duration_ms / period)
                .map(|i| impair::Outage {
                    start_ms: i * period,
                    duration_ms: len,
                })
                .collect();
            for s in 0..2 {
                links.insert(
                    0,
                    LinkRule {
                        from: format!("set{s}"),
                        to: "edge*".into(),
                        impair: impair::Config {
                            outages: outages.clone(),
                            seed: rng.random(),
                            ..impair::Config::default()
                        },
                    },
                );
            }
        }
        let draws = rng.random_range(3..=9);
        let mut entry_busy = Busy::default();
        let mut edge_busy = Busy::default();
        let mut capture_busy = Busy::default();
        for _ in 0..draws {
            let kind = rng.random_range(0..7);
            match kind {
                0 if classes.sets => {
                    let (at, len) = window(&mut rng, 300, 4_000);
                    let kind = rng.random_range(0..3);
                    // A kill is for good: the set stays busy to the end.
                    let until = if kind == 2 {
                        duration_ms
                    } else {
                        at + len + 2_000
                    };
                    if !set_busy.free(at, until) {
                        continue;
                    }
                    set_busy.take(at, until);
                    let node = format!("set{}", rng.random_range(0..topology.sets));
                    let what = match kind {
                        0 => FaultKind::Hang { node, for_ms: len },
                        1 => FaultKind::Restart { node, down_ms: len },
                        _ => FaultKind::Kill { node },
                    };
                    faults.push(Fault { at_ms: at, what });
                }
                1 if classes.partitions => {
                    let (at, len) = window(&mut rng, 300, 4_000);
                    if !set_busy.free(at, at + len + 2_000) {
                        continue;
                    }
                    set_busy.take(at, at + len + 2_000);
                    faults.push(Fault {
                        at_ms: at,
                        what: FaultKind::Partition {
                            a: format!("set{}", rng.random_range(0..topology.sets)),
                            b: format!("edge{}", rng.random_range(0..topology.edges)),
                            for_ms: len,
                        },
                    });
                }
                2 if classes.entries => {
                    let (at, len) = window(&mut rng, 300, 4_000);
                    let kill = rng.random_bool(0.5);
                    let until = if kill { duration_ms } else { at + len + 2_000 };
                    if !entry_busy.free(at, until) {
                        continue;
                    }
                    entry_busy.take(at, until);
                    let node = format!("entry{}", rng.random_range(0..topology.entries));
                    let what = if kill {
                        FaultKind::Kill { node }
                    } else {
                        FaultKind::Restart { node, down_ms: len }
                    };
                    faults.push(Fault { at_ms: at, what });
                }
                3 if classes.edges => {
                    let (at, len) = window(&mut rng, 500, 5_000);
                    let kind = rng.random_range(0..4);
                    let until = if kind == 3 {
                        duration_ms
                    } else {
                        at + len + 3_000
                    };
                    if !edge_busy.free(at, until) {
                        continue;
                    }
                    edge_busy.take(at, until);
                    let node = format!("edge{}", rng.random_range(0..topology.edges));
                    let what = match kind {
                        0 => FaultKind::Hang { node, for_ms: len },
                        1 => FaultKind::Restart { node, down_ms: len },
                        2 => FaultKind::Drain { node, for_ms: len },
                        _ => FaultKind::Kill { node },
                    };
                    faults.push(Fault { at_ms: at, what });
                }
                4 if classes.controls => {
                    let (at, len) = window(&mut rng, 500, 8_000);
                    let node = format!("control{}", rng.random_range(0..topology.controls));
                    let what = if rng.random_bool(0.5) {
                        FaultKind::Hang { node, for_ms: len }
                    } else {
                        FaultKind::Restart { node, down_ms: len }
                    };
                    faults.push(Fault { at_ms: at, what });
                }
                5 if classes.capture_restart => {
                    let (at, len) = window(&mut rng, 200, 3_000);
                    if !capture_busy.free(at, at + len + 3_000) {
                        continue;
                    }
                    capture_busy.take(at, at + len + 3_000);
                    faults.push(Fault {
                        at_ms: at,
                        what: FaultKind::Restart {
                            node: "capture".into(),
                            down_ms: len,
                        },
                    });
                }
                _ => {}
            }
        }
        faults.sort_by_key(|f| f.at_ms);
        let n_viewers = rng.random_range(20..=24);
        let viewers: Vec<Viewer> = (0..n_viewers)
            .map(|_| {
                let join_ms = if rng.random_bool(0.7) {
                    rng.random_range(500..3_000)
                } else {
                    rng.random_range(3_000..duration_ms * 2 / 3)
                };
                let leave_ms = rng
                    .random_bool(0.15)
                    .then(|| rng.random_range(join_ms + 3_000..duration_ms.max(join_ms + 3_001)));
                let pause = (classes.pauses && rng.random_bool(0.1)).then(|| {
                    (
                        rng.random_range(
                            join_ms + 2_000..duration_ms.max(join_ms + 10_001) - 8_000,
                        ),
                        rng.random_range(1_000..=6_000),
                    )
                });
                Viewer {
                    join_ms,
                    leave_ms,
                    pause_at_ms: pause.map(|p| p.0),
                    pause_ms: pause.map_or(0, |p| p.1),
                }
            })
            .collect();
        // Drawn last, so the draws above are what they were without it.
        let mut stream = Stream::default();
        if classes.ladder && rng.random_bool(0.3) {
            // Three renditions (about 75, 190 and 380 kbit/s of TS); the capture does not
            // restart (each rendition is a capture of its own).
            stream.ladder = vec![2, 5, 10];
            faults.retain(
                |f| !matches!(&f.what, FaultKind::Restart { node, .. } if node == "capture"),
            );
            let caps = [110, 260, 520, 0];
            for (i, v) in viewers.iter().enumerate() {
                if rng.random_bool(0.4) {
                    continue;
                }
                let mut at = v.join_ms + rng.random_range(2_000..6_000);
                while at + 4_000 < duration_ms {
                    faults.push(Fault {
                        at_ms: at,
                        what: FaultKind::LinkRate {
                            node: format!("viewer{i}"),
                            kbps: caps[rng.random_range(0..caps.len())],
                        },
                    });
                    at += rng.random_range(6_000..12_000);
                }
            }
            faults.sort_by_key(|f| f.at_ms);
        }
        Schedule {
            seed,
            duration_ms,
            topology,
            stream,
            tuning: Tuning::default(),
            links,
            faults,
            viewers,
        }
    }

    /// The benchmark network: 20 nodes (a capture, 2 entry points, 6 set reflectors, 10
    /// edges, a control server) and 50 viewers, a 4 Mbit/s stream of full packets (7 TS
    /// packets each, a keyframe every 2 s), 2% loss on every link, no fault.
    pub fn bench(duration_ms: u64) -> Schedule {
        let mut rng = SmallRng::seed_from_u64(20);
        Schedule {
            seed: 20,
            duration_ms,
            topology: Topology {
                entries: 2,
                sets: 6,
                edges: 10,
                controls: 1,
                base_delay_ms: 5,
            },
            stream: Stream {
                fps: 25,
                // 4,000,000 / 8 / 25 / 188
                ts_per_frame: 106,
                gop: 50,
                ts_per_rtp: 7,
                ladder: Vec::new(),
            },
            tuning: Tuning::default(),
            links: vec![LinkRule {
                from: "*".into(),
                to: "*".into(),
                impair: impair::Config {
                    loss: 0.02,
                    seed: 20,
                    ..impair::Config::default()
                },
            }],
            faults: Vec::new(),
            viewers: (0..50)
                .map(|_| Viewer {
                    join_ms: rng.random_range(200..2_000),
                    leave_ms: None,
                    pause_at_ms: None,
                    pause_ms: 0,
                })
                .collect(),
        }
    }

    /// The schedule as TOML, to paste into a regression file.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the schedule: {e}"))
    }
}

/// Whether `name` matches `pattern` (`*`, a prefix ending in `*`, or the exact name).
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_schedule_and_it_round_trips_through_toml() {
        let a = Schedule::random(7, 30_000, Classes::all());
        assert_eq!(a, Schedule::random(7, 30_000, Classes::all()));
        assert_ne!(a, Schedule::random(8, 30_000, Classes::all()));
        let text = a.to_toml();
        let back: Schedule = toml::from_str(&text).unwrap();
        assert_eq!(a, back, "{text}");
    }

    #[test]
    fn random_networks_are_big_enough() {
        for seed in 0..50 {
            let s = Schedule::random(seed, 30_000, Classes::passing());
            let t = &s.topology;
            assert!(1 + t.entries + t.sets + t.edges + t.controls >= 10, "{t:?}");
            assert!(s.viewers.len() >= 20);
            assert!(s.faults.iter().all(|f| f.at_ms < 30_000));
        }
    }

    #[test]
    fn patterns() {
        assert!(matches("*", "edge3"));
        assert!(matches("edge*", "edge3"));
        assert!(matches("edge3", "edge3"));
        assert!(!matches("edge3", "edge31"));
        assert!(!matches("set*", "edge3"));
    }
}
