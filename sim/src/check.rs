//! The invariants every run must hold, checked against what the capture really sent.
//!
//! For each viewer:
//! - **bytes**: everything it wrote is a packet of the source, byte for byte;
//! - **order**: sequence numbers only go up (no duplicate, no reordering), and the
//!   viewer's first packet is a keyframe (or the first the network had after one);
//! - **no unjustified gap**: every packet of the source it skipped over, within a
//!   session or across a change of session (the old one's tail, the new one's head), was
//!   lost for a
//!   reason the simulator can justify: it never reached an entry point (nothing keeps
//!   copies upstream of them), the links dropped every copy and every request on its way
//!   to the viewer or to its edge (at least [`crate::ledger::TRIES`] of them), or the
//!   viewer was paused. The schedules CI runs keep a path open to every edge at all
//!   times, so nothing else justifies a gap;
//! - **counted**: the viewer counted every packet missing from its output, as a gap or as
//!   skipped (what the edge told it it would not get);
//! - **liveness**: it starts within a bound of joining, never goes longer than a bound
//!   without writing while the network can deliver, and is still writing at the end;
//!   it never gives up.
//!
//! For each node: its state stays within its caps (streams, viewers, held packets).

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::schedule::{FaultKind, Schedule};
use crate::world::World;

/// A viewer may take this long from joining to its first packet written: an assignment,
/// a first edge that may be dead (left after 3 s), a keyframe every second at most, a
/// 300 ms buffer.
const START_BOUND: Duration = Duration::from_secs(5);
/// Longest a viewer may go without writing while the network can deliver.
const SILENCE_BOUND: Duration = Duration::from_secs(3);
/// A paused viewer's losses are justified from this long before the pause…
const PAUSE_BEFORE: Duration = Duration::from_secs(1);
/// … to this long after it ends (the edge moves it to the next keyframe).
const PAUSE_AFTER: Duration = Duration::from_secs(3);

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which invariant.
    pub kind: &'static str,
    /// Which viewer or node.
    pub who: String,
    /// When, ms from the start.
    pub at_ms: u64,
    /// What exactly.
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at {} ms: {}: {}",
            self.who, self.at_ms, self.kind, self.detail
        )
    }
}

/// What a run came to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// The seed of the schedule run.
    pub seed: u64,
    /// Every invariant broken (empty: the run passed): the first 200, and the first of
    /// each kind past them.
    pub violations: Vec<Violation>,
    /// How many times each invariant was broken, all of them counted.
    pub broken: std::collections::BTreeMap<&'static str, u64>,
    /// Events processed.
    pub events: u64,
    /// Packets the capture sent.
    pub sent: u64,
    /// Packets written by all viewers.
    pub written: u64,
    /// Gaps the viewers counted.
    pub gaps: u64,
    /// Switches the viewers made.
    pub switches: u64,
    /// Packets the viewers' edges repaired for them, and the viewers' own repairs.
    pub repaired: u64,
    /// Per viewer: a line on what it saw.
    #[serde(skip)]
    pub viewers: Vec<String>,
}

impl Outcome {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs `schedule` and checks it.
pub fn run(schedule: Schedule) -> Outcome {
    run_traced(schedule, None)
}

/// Runs `schedule`, printing every move of media packet `trace` (its sequence number,
/// or its last six digits), and checks it.
pub fn run_traced(schedule: Schedule, trace: Option<u64>) -> Outcome {
    let mut w = World::new(schedule);
    w.trace = trace;
    w.run();
    check(&w)
}

/// Periods in which a viewer may lose packets or go silent, for reasons outside the
/// network: the source itself was down (capture restarted or killed).
fn source_outages(s: &Schedule, start: Instant) -> Vec<(Instant, Instant)> {
    let end = start + Duration::from_millis(s.duration_ms);
    s.faults
        .iter()
        .filter_map(|f| {
            let at = start + Duration::from_millis(f.at_ms);
            match &f.what {
                FaultKind::Restart { node, down_ms } if node == "capture" => {
                    // Down, then a GOP before the new session's first keyframe arrives.
                    Some((
                        at,
                        at + Duration::from_millis(*down_ms) + Duration::from_secs(2),
                    ))
                }
                FaultKind::Kill { node } if node == "capture" => Some((at, end)),
                FaultKind::Hang { node, for_ms } if node == "capture" => Some((
                    at,
                    at + Duration::from_millis(*for_ms) + Duration::from_secs(2),
                )),
                _ => None,
            }
        })
        .collect()
}

/// Periods in which every control server was down (dead or hung): a viewer joining then
/// cannot get an edge.
fn control_outages(s: &Schedule, start: Instant) -> Vec<(Instant, Instant)> {
    let end = start + Duration::from_millis(s.duration_ms);
    let down = |name: &str| -> Vec<(Instant, Instant)> {
        s.faults
            .iter()
            .filter_map(|f| {
                let at = start + Duration::from_millis(f.at_ms);
                match &f.what {
                    FaultKind::Restart { node, down_ms } if node == name => {
                        Some((at, at + Duration::from_millis(*down_ms)))
                    }
                    FaultKind::Hang { node, for_ms } if node == name => {
                        Some((at, at + Duration::from_millis(*for_ms)))
                    }
                    FaultKind::Kill { node } if node == name => Some((at, end)),
                    _ => None,
                }
            })
            .collect()
    };
    if s.topology.controls == 0 {
        return Vec::new();
    }
    // Intersect each control's down periods with the others'.
    let mut all = down("control0");
    for c in 1..s.topology.controls {
        let other = down(&format!("control{c}"));
        all = all
            .iter()
            .flat_map(|a| {
                other.iter().filter_map(move |b| {
                    let (from, to) = (a.0.max(b.0), a.1.min(b.1));
                    (from < to).then_some((from, to))
                })
            })
            .collect();
    }
    all
}

/// Whether a viewer may start at `seq`: a keyframe, or the first packet the network had
/// after one: the keyframe and everything after it up to `seq` never got past the entry
/// points (or `seq` is the first its session got in).
fn start_ok(rec: &crate::world::Record, seq: u64) -> bool {
    let Some(t) = rec.truth.get(&seq) else {
        return true;
    };
    if t.keyframe {
        return true;
    }
    for (_, before) in rec.truth.range(..seq).rev() {
        if before.session != t.session {
            return true;
        }
        if before.entered {
            return false;
        }
        if before.keyframe {
            return true;
        }
    }
    true
}

/// The longest stretch of `from..to` outside every window.
fn longest_uncovered(from: Instant, to: Instant, windows: &[(Instant, Instant)]) -> Duration {
    let mut ws: Vec<(Instant, Instant)> = windows
        .iter()
        .filter(|w| w.1 > from && w.0 < to)
        .map(|w| (w.0.max(from), w.1.min(to)))
        .collect();
    ws.sort();
    let mut longest = Duration::ZERO;
    let mut at = from;
    for (a, b) in ws {
        if a > at {
            longest = longest.max(a - at);
        }
        at = at.max(b);
    }
    if to > at {
        longest = longest.max(to - at);
    }
    longest
}

fn overlaps(a: (Instant, Instant), windows: &[(Instant, Instant)]) -> bool {
    windows.iter().any(|w| a.0 < w.1 && a.1 > w.0)
}

/// Checks the invariants of a run that ended.
pub fn check(w: &World) -> Outcome {
    let s = w.schedule();
    let start = w.start();
    let end = start + Duration::from_millis(s.duration_ms);
    let at_ms = |t: Instant| t.saturating_duration_since(start).as_millis() as u64;
    let rec = &w.record;
    let mut out = Outcome {
        seed: s.seed,
        events: rec.events,
        sent: rec.truth.len() as u64,
        ..Outcome::default()
    };
    let mut violate = |kind: &'static str, who: &str, at: Instant, detail: String| {
        let seen = out.broken.entry(kind).or_default();
        *seen += 1;
        if out.violations.len() < 200 || *seen == 1 {
            out.violations.push(Violation {
                kind,
                who: who.to_owned(),
                at_ms: at_ms(at),
                detail,
            });
        }
    };
    let outages = source_outages(s, start);
    let no_control = control_outages(s, start);
    for (v, plan) in s.viewers.iter().enumerate() {
        let who = format!("viewer{v}");
        let joined = start + Duration::from_millis(plan.join_ms);
        if joined + START_BOUND >= end {
            continue;
        }
        let left = plan
            .leave_ms
            .map_or(end, |l| start + Duration::from_millis(l));
        let writes = &rec.writes[v];
        for seq in &rec.corrupt[v] {
            violate(
                "bytes",
                &who,
                joined,
                format!("packet {} is not the source's", seq.0),
            );
        }
        // A viewer that joined while every control server was down may give up: no
        // one could tell it where to watch.
        let unassignable = overlaps((joined, joined + START_BOUND), &no_control);
        if let Some(Some(Err(e))) = rec.ended.get(v) {
            if !unassignable {
                violate("gave_up", &who, joined, e.clone());
            }
        }
        let paused: Vec<(Instant, Instant)> = rec.paused[v]
            .map(|(p, d)| (p - PAUSE_BEFORE, p + d + PAUSE_AFTER))
            .into_iter()
            .collect();
        // A ladder's viewer served a rendition above its link's cap loses what the link
        // cannot carry until it steps down (acceptance 5 bounds how long): packets sent
        // from just before (the link's 300 ms queue) until its buffer and a repair round
        // after the step-down are excused. Everything lost is still counted.
        let overflow: Vec<(Instant, Instant)> = match &rec.stats[v] {
            Some(stats) if !s.stream.ladder.is_empty() => {
                over_cap(stats, None, joined, &rec.link_caps[v], left.min(end))
                    .into_iter()
                    .map(|(a, b)| (a - OVERFLOW_BEFORE, b + OVERFLOW_AFTER))
                    .collect()
            }
            _ => Vec::new(),
        };
        let excused = |t: Instant| {
            paused.iter().any(|(a, b)| t >= *a && t < *b)
                || overflow.iter().any(|(a, b)| t >= *a && t < *b)
        };
        // Silence is excused while the source was down or the viewer paused; at the
        // start, also while no control server could assign it.
        let mut quiet: Vec<(Instant, Instant)> = outages.clone();
        quiet.extend(paused.iter().copied());
        let mut starting = quiet.clone();
        starting.extend(no_control.iter().copied());
        // Start.
        match writes.first() {
            None => {
                if longest_uncovered(joined, left, &starting) > START_BOUND && !unassignable {
                    violate("liveness", &who, joined, "never wrote a packet".into());
                }
                continue;
            }
            Some((t, seq, _)) => {
                if longest_uncovered(joined, *t, &starting) > START_BOUND {
                    violate(
                        "liveness",
                        &who,
                        joined,
                        format!(
                            "first packet written {} ms after joining",
                            (*t - joined).as_millis()
                        ),
                    );
                }
                if !start_ok(rec, seq.0) {
                    violate(
                        "start",
                        &who,
                        *t,
                        format!("started at {}, not a keyframe", seq.0),
                    );
                }
            }
        }
        let mut missing_total = 0u64;
        for pair in writes.windows(2) {
            let ((t0, a, e0), (t1, b, e1)) = (pair[0], pair[1]);
            let viewer = w.viewers[v];
            // A move between renditions of a ladder (each numbered in its own space, bits
            // 45 to 47): the viewer goes on in another stream, as at a new session; only
            // its liveness is judged across it.
            let same_space = a.0 >> 45 == b.0 >> 45;
            if same_space && b <= a {
                violate("order", &who, t1, format!("wrote {} after {}", b.0, a.0));
                continue;
            }
            let (sa, sb) = (
                rec.truth.get(&a.0).map(|t| t.session),
                rec.truth.get(&b.0).map(|t| t.session),
            );
            if same_space && b.0 > a.0 + 1 {
                // Packets of the source between the two, lost to this viewer.
                // Packets that never reached an entry point are lost to the whole
                // network (nothing upstream of the entry points keeps copies).
                let lost: Vec<(u64, Instant, u32)> = rec
                    .truth
                    .range(a.0 + 1..b.0)
                    .filter(|(_, t)| t.entered)
                    .map(|(k, t)| (*k, t.at, t.session))
                    .collect();
                // Within a session, every missing packet must be counted; across a
                // change of session the viewer cannot know what the old one had left.
                if sa == sb {
                    missing_total += lost.len() as u64;
                }
                // Across a change of session too: the old session's tail and the new
                // one's head are packets like any other.
                let unjustified: Vec<&(u64, Instant, u32)> = lost
                    .iter()
                    .filter(|(seq, sent, _)| {
                        !(excused(*sent)
                            || rec.ledger.network_lost(*seq, viewer)
                            || rec.ledger.network_lost(*seq, e0)
                            || rec.ledger.network_lost(*seq, e1))
                    })
                    .collect();
                if let Some(first) = unjustified.first() {
                    let ladder = match &rec.stats[v] {
                        Some(stats) if !s.stream.ladder.is_empty() => {
                            ladder_context(stats, joined, &rec.link_caps[v], first.1)
                        }
                        _ => String::new(),
                    };
                    violate(
                        "gap",
                        &who,
                        t1,
                        format!(
                            "{} packets lost from {} (sent at {} ms), between {} and {}{ladder}",
                            unjustified.len(),
                            first.0,
                            at_ms(first.1),
                            a.0,
                            b.0
                        ),
                    );
                }
            }
            if longest_uncovered(t0, t1, &quiet) > SILENCE_BOUND {
                violate(
                    "liveness",
                    &who,
                    t0,
                    format!("wrote nothing for {} ms", (t1 - t0).as_millis()),
                );
            }
        }
        let last = writes.last().map_or(joined, |w| w.0);
        let until = left.min(end);
        if longest_uncovered(last, until, &quiet) > SILENCE_BOUND && rec.ended[v].is_none() {
            violate(
                "liveness",
                &who,
                last,
                format!(
                    "wrote nothing for the last {} ms",
                    (until - last).as_millis()
                ),
            );
        }
        if let Some(stats) = &rec.stats[v] {
            let switches: Vec<String> = stats
                .switches
                .iter()
                .map(|s| {
                    format!(
                        "{}@{}ms:{}->{}",
                        s.reason,
                        s.detected_unix_ms
                            .saturating_sub(crate::world::EPOCH_UNIX_MS),
                        s.from,
                        s.to
                    )
                })
                .collect();
            out.viewers.push(format!(
                "{who}: joined {} ms, wrote {}, gaps {}, skipped {}, repaired {}, edge {}, switches [{}]",
                plan.join_ms,
                writes.len(),
                stats.gaps,
                stats.skipped,
                stats.repaired,
                stats.edge,
                switches.join(", ")
            ));
            if !s.stream.ladder.is_empty() {
                let lowest = s.stream.rendition_kbps(0);
                renditions_within_caps(
                    stats,
                    lowest,
                    joined,
                    &rec.link_caps[v],
                    left.min(end),
                    |at, detail| violate("rendition", &who, at, detail),
                );
            }
            out.gaps += stats.gaps;
            out.switches += stats.switches.len() as u64;
            out.repaired += stats.repaired;
            // Lost (gaps) or passed over as the edge or the client said (skipped).
            if missing_total > stats.gaps + stats.skipped {
                violate(
                    "counted",
                    &who,
                    last,
                    format!(
                        "{missing_total} packets missing from its output, {} counted \
                         ({} gaps, {} skipped)",
                        stats.gaps + stats.skipped,
                        stats.gaps,
                        stats.skipped
                    ),
                );
            }
        }
        out.written += writes.len() as u64;
    }
    for (node, what) in &rec.over_caps {
        violate("caps", node, end, what.clone());
    }
    out
}

/// How long a viewer may be served a rendition above its link's rate before it steps
/// down: the meter's 2 s window, the next keyframe (1 s here), a sample, and the link's
/// 300 ms queue.
const STEP_DOWN_BOUND: Duration = Duration::from_millis(4_500);
/// Packets lost to a link's overflow are excused from this long before it (the link's
/// queue) …
const OVERFLOW_BEFORE: Duration = Duration::from_millis(500);
/// … to this long after the step-down (the viewer's 500 ms buffer and a repair round).
const OVERFLOW_AFTER: Duration = Duration::from_millis(1_000);

/// Where a ladder's viewer stood at `t`, to say with a gap: its link's cap and since when,
/// the rendition it was served and since when (from its stats' changes).
fn ladder_context(
    stats: &braid_client::Stats,
    joined: Instant,
    caps: &[(Instant, u64)],
    t: Instant,
) -> String {
    let cap = caps.iter().take_while(|(at, _)| *at <= t).last();
    let served = stats
        .renditions
        .iter()
        .map(|r| (joined + Duration::from_millis(r.at_ms), r.kbps))
        .take_while(|(at, _)| *at <= t)
        .last();
    let since = |at: Instant| t.saturating_duration_since(at).as_millis();
    let cap = match cap {
        Some((at, 0)) => format!("uncapped for {} ms", since(*at)),
        Some((at, kbps)) => format!("capped at {kbps} kbit/s for {} ms", since(*at)),
        None => "never capped".to_string(),
    };
    let served = match served {
        Some((at, kbps)) => format!("{kbps} kbit/s for {} ms", since(at)),
        None => "no rendition yet".to_string(),
    };
    format!("; link {cap}, rendition {served}")
}

/// The stretches a viewer of a ladder was served a rendition whose nominal rate is above
/// its link's cap (from its stats' changes, `at_ms` since it `joined`; `caps` are the
/// link's caps, 0 for none, from when they applied), until `until`; with `lowest`, only
/// under caps at or above that rate (under it nothing fits).
fn over_cap(
    stats: &braid_client::Stats,
    lowest: Option<u64>,
    joined: Instant,
    caps: &[(Instant, u64)],
    until: Instant,
) -> Vec<(Instant, Instant)> {
    let served: Vec<(Instant, u64)> = stats
        .renditions
        .iter()
        .map(|r| (joined + Duration::from_millis(r.at_ms), u64::from(r.kbps)))
        .collect();
    // Walk the moments anything changes.
    let mut moments: Vec<Instant> = served
        .iter()
        .map(|s| s.0)
        .chain(caps.iter().map(|c| c.0))
        .collect();
    // Nothing after `until` counts (the viewer left, or the run ended).
    moments.retain(|t| *t < until);
    moments.push(until);
    moments.sort();
    let at = |list: &[(Instant, u64)], t: Instant| {
        list.iter()
            .take_while(|(s, _)| *s <= t)
            .last()
            .map(|(_, k)| *k)
    };
    let mut stretches: Vec<(Instant, Instant)> = Vec::new();
    let mut over_since: Option<Instant> = None;
    for pair in moments.windows(2) {
        let (t, next) = (pair[0], pair[1]);
        let (Some(kbps), cap) = (at(&served, t), at(caps, t).unwrap_or(0)) else {
            continue;
        };
        if cap > 0 && lowest.is_none_or(|l| cap >= l) && kbps > cap {
            let since = *over_since.get_or_insert(t);
            match stretches.last_mut() {
                Some(last) if last.0 == since => last.1 = next,
                _ => stretches.push((since, next)),
            }
        } else {
            over_since = None;
        }
    }
    stretches
}

/// Issue 13, acceptance 5: a viewer of a ladder is never served a rendition whose nominal
/// rate is above its link's cap for longer than [`STEP_DOWN_BOUND`] (a cap under the
/// `lowest` rendition's rate is not counted: nothing fits it).
fn renditions_within_caps(
    stats: &braid_client::Stats,
    lowest: u64,
    joined: Instant,
    caps: &[(Instant, u64)],
    until: Instant,
    mut violate: impl FnMut(Instant, String),
) {
    let over = over_cap(stats, Some(lowest), joined, caps, until);
    if let Some((since, to)) = over
        .into_iter()
        .find(|(a, b)| b.saturating_duration_since(*a) > STEP_DOWN_BOUND)
    {
        violate(
            since,
            format!(
                "served a rendition over its link's cap for {} ms, more than {} ms",
                to.saturating_duration_since(since).as_millis(),
                STEP_DOWN_BOUND.as_millis()
            ),
        );
    }
}

/// A saved schedule and what it must come to: `sim/regressions/*.toml`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Regression {
    /// What the schedule shows, in a sentence.
    #[serde(default)]
    pub about: String,
    /// `pass`, or the kind of violation the run must show (a defect reproduced, not
    /// fixed yet).
    #[serde(default = "pass")]
    pub expect: String,
    /// Kinds of violation the run must not show, whatever it expects: a defect fixed in
    /// a run that still shows another.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub never: Vec<String>,
    /// The run.
    pub schedule: Schedule,
}

fn pass() -> String {
    "pass".into()
}

impl Regression {
    /// The regression as a file of `sim/regressions/`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the regression: {e}"))
    }
}

impl Regression {
    /// Runs it; `Err` says how the outcome differs from what is expected.
    pub fn check(&self) -> Result<Outcome, String> {
        let o = run(self.schedule.clone());
        let kinds: Vec<&str> = o.violations.iter().map(|v| v.kind).collect();
        if let Some(k) = self
            .never
            .iter()
            .find(|k| o.broken.contains_key(k.as_str()))
        {
            return Err(format!(
                "broke {} {k} invariants, which it must never: {}",
                o.broken[k.as_str()],
                o.violations
                    .iter()
                    .filter(|v| v.kind == k.as_str())
                    .take(3)
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        match self.expect.as_str() {
            "pass" if o.passed() => Ok(o),
            "pass" => Err(format!(
                "expected to pass, broke {} invariants: {}",
                o.violations.len(),
                o.violations
                    .iter()
                    .take(5)
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
            kind if kinds.contains(&kind) => Ok(o),
            kind => Err(format!(
                "expected a {kind} violation (a known defect), got {kinds:?}: if the defect is fixed, set expect = \"pass\""
            )),
        }
    }
}

/// Reads a regression file, or a bare schedule as `braid-sim` prints it (expected to
/// pass).
pub fn parse_regression(text: &str) -> Result<Regression, String> {
    match toml::from_str::<Regression>(text) {
        Ok(r) => Ok(r),
        Err(e) => match toml::from_str::<Schedule>(text) {
            Ok(schedule) => Ok(Regression {
                about: String::new(),
                expect: pass(),
                never: Vec::new(),
                schedule,
            }),
            Err(_) => Err(e.to_string()),
        },
    }
}
