//! The control server's state: nodes, their load, the two edge sets, assignment and
//! switching. Sans-IO: time is an argument; the HTTP layer owns the clock.
//!
//! Edges fall in two disjoint sets by a function of their port (seed 002): parity by
//! default, or port ranges. A viewer gets a primary edge in one set and the other set as
//! its secondary, so the edge it moves to is always a different machine. State is soft:
//! it is rebuilt from the nodes' reports (every second) within seconds, so several
//! control servers can run side by side with no shared database.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_core::playout::Prefer;
use serde::{Deserialize, Serialize};

/// Which of the two disjoint edge sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Set {
    /// Even ports (or the first range).
    Even,
    /// Odd ports (or the rest).
    Odd,
}

impl Set {
    /// The other set.
    pub fn other(self) -> Set {
        match self {
            Set::Even => Set::Odd,
            Set::Odd => Set::Even,
        }
    }
}

/// How an edge's port decides its set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetRule {
    /// Even ports in one set, odd in the other.
    Parity,
    /// Ports in these inclusive ranges are the "even" set, all others the "odd" one.
    Ranges(Vec<(u16, u16)>),
}

impl SetRule {
    /// The set of an edge listening on `port`.
    pub fn set_of(&self, port: u16) -> Set {
        match self {
            SetRule::Parity if port % 2 == 0 => Set::Even,
            SetRule::Parity => Set::Odd,
            SetRule::Ranges(r) if r.iter().any(|(a, b)| (*a..=*b).contains(&port)) => Set::Even,
            SetRule::Ranges(_) => Set::Odd,
        }
    }
}

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Entry point.
    Entrypoint,
    /// Set reflector.
    Set,
    /// Edge.
    Edge,
}

/// What a node says about itself, every second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Its id.
    pub node: u64,
    /// Its role.
    pub role: Role,
    /// Where viewers (or edges) reach it over UDP (and TCP, for edges).
    pub addr: SocketAddr,
    /// Its QUIC address, when it accepts QUIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic: Option<SocketAddr>,
    /// Its region, for preferring nearby edges.
    #[serde(default)]
    pub region: String,
    /// Most viewers it takes.
    #[serde(default = "default_capacity")]
    pub capacity: u64,
    /// Cost tier (0 cheapest), for later use by assignment.
    #[serde(default)]
    pub cost_tier: u8,
    /// Viewers now.
    #[serde(default)]
    pub viewers: u64,
    /// Egress, bits per second.
    #[serde(default)]
    pub egress_bps: u64,
    /// CPU use, 0 to 1 per core.
    #[serde(default)]
    pub cpu: f64,
    /// Its streams' figures (set reflectors and edges), for the console.
    #[serde(default)]
    pub streams: Vec<StreamFigures>,
    /// Where it serves HLS (edges started with `--hls-listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hls: Option<SocketAddr>,
    /// Viewers whose link holds them back (edges): placed on low-cost edges from their
    /// next request on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slow: Vec<SlowViewer>,
    /// Its ladders of renditions (edges started with `--ladder`), each lowest rate first:
    /// a stream's HLS variants are its ladder's renditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ladders: Vec<Vec<Rung>>,
}

/// One rendition of a ladder, as an edge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rung {
    /// Its stream.
    pub stream: u32,
    /// Its nominal rate, kbit/s.
    pub kbps: u32,
}

/// Most ladders a report names, and most renditions in each.
pub const MAX_LADDERS: usize = 16;
/// Most renditions in a ladder.
pub const MAX_RUNGS: usize = 8;

/// A viewer an edge found slow: its link cannot take what it is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowViewer {
    /// Its id, as its watches name it.
    pub client: u64,
    /// Its address, when the edge knows it: its network is remembered too.
    #[serde(default)]
    pub ip: Option<std::net::IpAddr>,
    /// The stream it watches.
    #[serde(default)]
    pub stream: u32,
    /// The rate its link took, bit/s.
    #[serde(default)]
    pub bps: u64,
}

/// A stream's figures at one node, as it reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamFigures {
    /// The stream.
    pub id: u32,
    /// Its viewers here (edges).
    #[serde(default)]
    pub viewers: u64,
    /// Its subscribed edges here (set reflectors).
    #[serde(default)]
    pub subscribers: u64,
    /// Packets its merge released.
    #[serde(default)]
    pub released: u64,
    /// Packets its merge gave up.
    #[serde(default)]
    pub gaps: u64,
    /// Per path: packets received, and first copies.
    #[serde(default)]
    pub paths: Vec<PathFigures>,
    /// Where the stream comes from (entry points: the sources publishing it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SocketAddr>,
    /// Its rate over the last second, bit/s, as released here (an estimate from packet
    /// counts: 1316 bytes of TS each).
    #[serde(default)]
    pub bps: u64,
}

/// A path's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathFigures {
    /// The path (the node's number for the peer it comes from).
    pub path: u8,
    /// Packets received on it, copies included.
    pub received: u64,
    /// First copies it brought.
    pub first: u64,
}

/// Most streams a report may carry (what a node sends: its 64 busiest). With
/// [`MAX_NODES`] nodes this bounds what the registry keeps of streams.
pub const MAX_REPORT_STREAMS: usize = 64;
/// Most paths per stream a report may carry (what a node sends).
pub const MAX_REPORT_PATHS: usize = 16;
/// Most slow viewers a report names (what an edge sends).
pub const MAX_REPORT_SLOW: usize = 256;
/// Most sources a stream's figures name.
pub const MAX_REPORT_SOURCES: usize = 8;

fn default_capacity() -> u64 {
    1000
}

/// Most viewers a node may say it takes or has (a 100 Gbps edge at 1 Mbps a viewer).
pub const MAX_VIEWERS: u64 = 100_000;
/// Most bytes of a region's name.
pub const MAX_REGION: usize = 64;
/// Most cost tiers.
pub const MAX_COST_TIER: u8 = 15;
/// Most egress a node may report, bits per second (10 Tbps).
pub const MAX_EGRESS_BPS: u64 = 10_000_000_000_000;
/// Most CPU a node may report, cores.
pub const MAX_CPU: f64 = 4096.0;

impl Report {
    /// Refuses, with a sentence, a report no real node sends: an address no one can
    /// reach (port 0, an unspecified or multicast IP), a region that is not a short
    /// printable name, or figures out of any real range (viewers, capacity, CPU, egress,
    /// cost tier). Such a report would otherwise steer viewers.
    pub fn validate(&self) -> Result<(), String> {
        let reachable =
            |a: &SocketAddr| a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast();
        if !reachable(&self.addr) {
            return Err(format!("address {} cannot be reached", self.addr));
        }
        if let Some(q) = &self.quic {
            if !reachable(q) {
                return Err(format!("QUIC address {q} cannot be reached"));
            }
        }
        if let Some(h) = &self.hls {
            if !reachable(h) {
                return Err(format!("HLS address {h} cannot be reached"));
            }
        }
        if self.region.len() > MAX_REGION
            || !self
                .region
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "region must be at most {MAX_REGION} letters, digits, '-', '_' or '.'"
            ));
        }
        if self.capacity == 0 || self.capacity > MAX_VIEWERS || self.viewers > MAX_VIEWERS {
            return Err(format!(
                "capacity and viewers must be within 1..={MAX_VIEWERS} and 0..={MAX_VIEWERS}"
            ));
        }
        if !(self.cpu.is_finite() && (0.0..=MAX_CPU).contains(&self.cpu)) {
            return Err(format!("cpu must be within 0..={MAX_CPU} cores"));
        }
        if self.egress_bps > MAX_EGRESS_BPS {
            return Err(format!("egress must be at most {MAX_EGRESS_BPS} bit/s"));
        }
        if self.slow.len() > MAX_REPORT_SLOW {
            return Err(format!("at most {MAX_REPORT_SLOW} slow viewers"));
        }
        if self.role != Role::Edge && !self.slow.is_empty() {
            return Err("only edges serve viewers, so only edges name slow ones".into());
        }
        if self.cost_tier > MAX_COST_TIER {
            return Err(format!("cost tier must be at most {MAX_COST_TIER}"));
        }
        if self.ladders.len() > MAX_LADDERS
            || self
                .ladders
                .iter()
                .any(|l| l.is_empty() || l.len() > MAX_RUNGS)
            || (self.role != Role::Edge && !self.ladders.is_empty())
        {
            return Err(format!(
                "only edges have ladders: at most {MAX_LADDERS}, of 1 to {MAX_RUNGS} renditions"
            ));
        }
        if self.streams.len() > MAX_REPORT_STREAMS
            || self.streams.iter().any(|s| {
                s.paths.len() > MAX_REPORT_PATHS
                    || s.viewers > MAX_VIEWERS
                    || s.sources.len() > MAX_REPORT_SOURCES
            })
        {
            return Err(format!(
                "at most {MAX_REPORT_STREAMS} streams of {MAX_REPORT_PATHS} paths and {MAX_REPORT_SOURCES} sources, each with at most {MAX_VIEWERS} viewers"
            ));
        }
        Ok(())
    }
}

/// What the control server tells a reporting node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportReply {
    /// The node should move its viewers away and take no new ones.
    pub drain: bool,
}

#[derive(Debug, Clone)]
struct Node {
    report: Report,
    last: Instant,
    /// Viewers assigned here since its last report (it has not counted them yet).
    pending: u64,
    drained: bool,
}

/// One edge offered to a viewer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Where to watch over UDP or TCP.
    pub addr: SocketAddr,
    /// Where to watch over QUIC, when the edge accepts QUIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic: Option<SocketAddr>,
    /// Where it serves HLS, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hls: Option<SocketAddr>,
    /// Its set.
    pub set: Set,
    /// Lower is better (like DNS SRV).
    pub priority: u32,
    /// Among equal priorities, share of viewers (like DNS SRV).
    pub weight: u32,
    /// Its region.
    pub region: String,
}

/// A viewer's assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The edge to watch.
    pub primary: SocketAddr,
    /// The primary's set.
    pub primary_set: Set,
    /// The set to switch to.
    pub secondary_set: Set,
    /// Every live edge, ranked: the primary first, then its set, then the other set.
    pub candidates: Vec<Candidate>,
}

/// Why no edge could be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[non_exhaustive]
pub enum AssignError {
    /// No live edge that takes viewers.
    #[error("no live edge with room")]
    NoEdge,
    /// Every live edge other than the failed one is in the failed one's set, or down.
    #[error("no live edge in the other set")]
    NoOtherSet,
    /// A viewer asked for a cheaper (or faster) edge than its own, and the other set has
    /// none.
    #[error("no live edge of a {0} cost tier in the other set")]
    NoTier(&'static str),
}

/// Probe timings a viewer reported, kept per client network prefix.
#[derive(Debug, Clone, Default)]
struct Feedback {
    /// Round trip to each edge, ms, smoothed.
    rtt_ms: HashMap<SocketAddr, f64>,
}

/// Switch counters by reason.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Switches(pub HashMap<String, u64>);

/// A node silent this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Most nodes a registry knows at once.
pub const MAX_NODES: usize = 10_000;

/// How long a slow viewer is remembered, by default.
pub const SLOW_MEMORY: Duration = Duration::from_secs(600);
/// Most slow clients, and most slow networks, remembered at once.
pub const MAX_SLOW: usize = 10_000;

/// Viewers the edges reported slow, by client id and by network (/24, /48), each until
/// its expiry: a returning viewer, or a new one from the same network, is placed on a
/// low-cost edge at once (seed 001).
#[derive(Debug)]
struct SlowMemory {
    ttl: Duration,
    clients: HashMap<u64, Instant>,
    networks: HashMap<String, Instant>,
    /// Entries not remembered for want of room.
    refused: u64,
}

impl SlowMemory {
    fn remember<K: std::hash::Hash + Eq>(
        map: &mut HashMap<K, Instant>,
        refused: &mut u64,
        now: Instant,
        key: K,
        until: Instant,
    ) {
        if map.len() >= MAX_SLOW && !map.contains_key(&key) {
            map.retain(|_, t| *t > now);
            if map.len() >= MAX_SLOW {
                *refused += 1;
                return;
            }
        }
        map.insert(key, until);
    }

    fn note(&mut self, now: Instant, v: &SlowViewer) {
        let until = now + self.ttl;
        if v.client != 0 {
            Self::remember(&mut self.clients, &mut self.refused, now, v.client, until);
        }
        if let Some(ip) = v.ip {
            let net = crate::api::prefix(ip);
            Self::remember(&mut self.networks, &mut self.refused, now, net, until);
        }
    }

    fn is_slow(&self, now: Instant, client: u64, prefix: &str) -> bool {
        (client != 0 && self.clients.get(&client).is_some_and(|t| *t > now))
            || self.networks.get(prefix).is_some_and(|t| *t > now)
    }
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    slow: SlowMemory,
    /// Assignments of viewers known to be slow.
    slow_assignments: u64,
    rule: SetRule,
    down_after: Duration,
    /// Ordered, so that ties in assignment break the same way in every run.
    nodes: BTreeMap<u64, Node>,
    feedback: HashMap<String, Feedback>,
    switches: Switches,
    assignments: u64,
    feedback_reports: u64,
    history: std::collections::VecDeque<Sample>,
    started: Option<Instant>,
}

impl Registry {
    /// Notes the totals now, for the console's charts (called every few seconds).
    pub fn sample(&mut self, now: Instant) {
        let started = *self.started.get_or_insert(now);
        let edges = self.nodes.values().filter(|n| n.report.role == Role::Edge);
        let (gaps, viewers) = edges.fold((0, 0), |(g, v), n| {
            let g = g + n.report.streams.iter().map(|s| s.gaps).sum::<u64>();
            (g, v + n.report.viewers)
        });
        if self.history.len() >= HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Sample {
            at_s: now.saturating_duration_since(started).as_secs(),
            switches: self.switches.0.values().sum(),
            gaps,
            viewers,
        });
    }

    /// A registry; a node silent for `down_after` is down (default 3 s).
    pub fn new(rule: SetRule, down_after: Duration) -> Registry {
        Registry {
            slow: SlowMemory {
                ttl: SLOW_MEMORY,
                clients: HashMap::new(),
                networks: HashMap::new(),
                refused: 0,
            },
            slow_assignments: 0,
            rule,
            down_after,
            nodes: BTreeMap::new(),
            feedback: HashMap::new(),
            switches: Switches::default(),
            assignments: 0,
            feedback_reports: 0,
            history: std::collections::VecDeque::new(),
            started: None,
        }
    }

    /// Forgets nodes silent for [`FORGET_AFTER`] (a node that comes back reports again,
    /// drained or not as it was told).
    pub fn forget_silent(&mut self, now: Instant) -> usize {
        let before = self.nodes.len();
        self.nodes
            .retain(|_, n| now.saturating_duration_since(n.last) < FORGET_AFTER);
        before - self.nodes.len()
    }

    /// Nodes known (live or not yet forgotten).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A node's report. A node id that another live node (another address or role)
    /// already reports under is refused with a sentence saying so: otherwise the two
    /// would overwrite each other, one second each. A new node is refused while
    /// [`MAX_NODES`] are known.
    pub fn handle_report(&mut self, now: Instant, report: Report) -> Result<ReportReply, String> {
        if !self.nodes.contains_key(&report.node) && self.nodes.len() >= MAX_NODES {
            self.forget_silent(now);
            if self.nodes.len() >= MAX_NODES {
                return Err(format!(
                    "this control server knows {MAX_NODES} nodes already: no room for another"
                ));
            }
        }
        if let Some(n) = self.nodes.get(&report.node) {
            if self.live(now, n) && (n.report.addr != report.addr || n.report.role != report.role) {
                return Err(format!(
                    "node id {} is already reported by the {:?} node at {}; give each node its own --node-id",
                    report.node, n.report.role, n.report.addr
                ));
            }
        }
        for v in &report.slow {
            self.slow.note(now, v);
        }
        let node = self.nodes.entry(report.node).or_insert(Node {
            report: report.clone(),
            last: now,
            pending: 0,
            drained: false,
        });
        node.report = report;
        node.last = now;
        node.pending = 0;
        Ok(ReportReply {
            drain: node.drained,
        })
    }

    /// Marks an edge drained (or not); returns whether it is known.
    pub fn drain(&mut self, node: u64, on: bool) -> bool {
        match self.nodes.get_mut(&node) {
            Some(n) => {
                n.drained = on;
                true
            }
            None => false,
        }
    }

    fn live(&self, now: Instant, n: &Node) -> bool {
        now.saturating_duration_since(n.last) < self.down_after
    }

    /// Live, undrained edges with room, with their set and load (0 empty, 1 full).
    fn edges(&self, now: Instant) -> Vec<(&Node, Set, f64)> {
        self.nodes
            .values()
            .filter(|n| n.report.role == Role::Edge && self.live(now, n) && !n.drained)
            .map(|n| {
                let load = (n.report.viewers + n.pending) as f64 / n.report.capacity.max(1) as f64;
                (n, self.rule.set_of(n.report.addr.port()), load)
            })
            .filter(|(_, _, load)| *load < 1.0)
            .collect()
    }

    /// Headroom (free viewer slots) of a set.
    fn headroom(edges: &[(&Node, Set, f64)], set: Set) -> u64 {
        edges
            .iter()
            .filter(|(_, s, _)| *s == set)
            .map(|(n, _, _)| {
                n.report
                    .capacity
                    .saturating_sub(n.report.viewers + n.pending)
            })
            .sum()
    }

    /// How long slow viewers are remembered (default [`SLOW_MEMORY`]).
    #[must_use]
    pub fn with_slow_memory(mut self, ttl: Duration) -> Registry {
        self.slow.ttl = ttl;
        self
    }

    /// Whether viewer `client` (0: unknown) on network `prefix` was reported slow and
    /// is still remembered.
    pub fn is_slow(&self, now: Instant, client: u64, prefix: &str) -> bool {
        self.slow.is_slow(now, client, prefix)
    }

    /// Assigns viewer `client` (0: unknown): the least loaded live edge of the set with
    /// more headroom, preferring `region`, and the other set as secondary. Within a set,
    /// a viewer remembered slow gets the cheapest edges (the lowest cost tier) and any
    /// other the costliest (the fast ones, seed 001); a slow viewer's set is one that
    /// has an edge of the cheapest tier.
    pub fn assign(
        &mut self,
        now: Instant,
        region: &str,
        prefix: &str,
        client: u64,
    ) -> Result<Assignment, AssignError> {
        let edges = self.edges(now);
        if edges.is_empty() {
            return Err(AssignError::NoEdge);
        }
        let slow = self.is_slow(now, client, prefix);
        let cheapest = edges.iter().map(|(n, _, _)| n.report.cost_tier).min();
        let has_cheapest = |set: Set| {
            edges
                .iter()
                .any(|(n, s, _)| *s == set && Some(n.report.cost_tier) == cheapest)
        };
        let by_headroom = if Self::headroom(&edges, Set::Even) >= Self::headroom(&edges, Set::Odd) {
            Set::Even
        } else {
            Set::Odd
        };
        let set = if slow && !has_cheapest(by_headroom) {
            by_headroom.other()
        } else {
            by_headroom
        };
        let a = self.pick(now, set, None, region, prefix, slow)?;
        self.assignments += 1;
        if slow {
            self.slow_assignments += 1;
        }
        Ok(a)
    }

    /// The ladder of renditions stream `id` belongs to, as a live edge reports it (lowest
    /// rate first), if any edge has one.
    pub fn ladder(&self, now: Instant, id: u32) -> Option<Vec<Rung>> {
        let mut l = self
            .nodes
            .values()
            .filter(|n| n.report.role == Role::Edge && self.live(now, n))
            .flat_map(|n| n.report.ladders.iter())
            .find(|l| l.iter().any(|r| r.stream == id))?
            .clone();
        l.sort_by_key(|r| r.kbps);
        Some(l)
    }

    /// Stream `id`'s rate as the live edges report it (the highest), bit/s, if any does.
    pub fn stream_bps(&self, now: Instant, id: u32) -> Option<u64> {
        self.nodes
            .values()
            .filter(|n| n.report.role == Role::Edge && self.live(now, n))
            .flat_map(|n| n.report.streams.iter().filter(|s| s.id == id))
            .map(|s| s.bps)
            .filter(|b| *b > 0)
            .max()
    }

    /// A viewer's primary failed: the least loaded live edge of the other set, never the
    /// failed one; the roles swap.
    pub fn switch(
        &mut self,
        now: Instant,
        failed: SocketAddr,
        reason: &str,
        region: &str,
        prefix: &str,
        client: u64,
    ) -> Result<Assignment, AssignError> {
        let v = (region, prefix, client);
        self.switch_preferring(now, failed, reason, v, Prefer::Any)
    }

    /// A viewer leaves its primary `failed` (`region`, `prefix` and `client` name it):
    /// an edge of the other set, as [`Registry::switch`] picks it, or with `prefer`, one
    /// of a lower (cheap) or higher (fast) cost tier than `failed`'s, the cheapest or the
    /// costliest first: a viewer whose playout buffer can absorb a slower edge moves to a
    /// cheap one, and back when it runs low (seed 001).
    pub fn switch_preferring(
        &mut self,
        now: Instant,
        failed: SocketAddr,
        reason: &str,
        (region, prefix, client): (&str, &str, u64),
        prefer: Prefer,
    ) -> Result<Assignment, AssignError> {
        // A failed edge's switch counts whatever comes of it; a move by preference only
        // when it happens.
        if prefer == Prefer::Any {
            *self.switches.0.entry(reason.to_owned()).or_default() += 1;
        }
        let set = self.rule.set_of(failed.port()).other();
        let slow = self.is_slow(now, client, prefix);
        let cheap_first = match prefer {
            Prefer::Any => slow,
            Prefer::Cheap => true,
            Prefer::Fast => false,
        };
        let a = self
            .pick(now, set, Some(failed), region, prefix, cheap_first)
            .map_err(|e| match e {
                AssignError::NoEdge => AssignError::NoOtherSet,
                e => e,
            })?;
        if prefer != Prefer::Any {
            let tier = |addr: SocketAddr| {
                self.nodes
                    .values()
                    .find(|n| n.report.addr == addr)
                    .map(|n| n.report.cost_tier)
            };
            let (from, to) = (tier(failed), tier(a.primary));
            let better = match prefer {
                Prefer::Cheap => to < from,
                _ => to > from || from.is_none(),
            };
            if !better {
                if let Some(n) = self.nodes.values_mut().find(|n| n.report.addr == a.primary) {
                    n.pending = n.pending.saturating_sub(1);
                }
                let which = if prefer == Prefer::Cheap {
                    "lower"
                } else {
                    "higher"
                };
                return Err(AssignError::NoTier(which));
            }
            *self.switches.0.entry(reason.to_owned()).or_default() += 1;
        }
        if slow {
            self.slow_assignments += 1;
        }
        Ok(a)
    }

    fn pick(
        &mut self,
        now: Instant,
        set: Set,
        avoid: Option<SocketAddr>,
        region: &str,
        prefix: &str,
        slow: bool,
    ) -> Result<Assignment, AssignError> {
        let fb = self.feedback.get(prefix);
        // (address, set, load, region, node, QUIC address, HLS address, cost tier)
        #[allow(clippy::type_complexity)]
        let mut ranked: Vec<(
            SocketAddr,
            Set,
            f64,
            String,
            u64,
            Option<SocketAddr>,
            Option<SocketAddr>,
            u8,
        )> = self
            .edges(now)
            .into_iter()
            .filter(|(n, _, _)| Some(n.report.addr) != avoid)
            .map(|(n, s, load)| {
                (
                    n.report.addr,
                    s,
                    load,
                    n.report.region.clone(),
                    n.report.node,
                    n.report.quic,
                    n.report.hls,
                    n.report.cost_tier,
                )
            })
            .collect();
        // Order: the chosen set first; within it, the viewer's region first; then the
        // cheapest tier for a slow viewer, the costliest (fastest) for any other; then
        // the least loaded; then the fastest as the viewer's network measured it.
        let tier = |t: u8| if slow { i16::from(t) } else { -i16::from(t) };
        let rtt = |a: &SocketAddr| {
            fb.and_then(|f| f.rtt_ms.get(a).copied())
                .unwrap_or(f64::MAX)
        };
        ranked.sort_by(|x, y| {
            (x.1 != set)
                .cmp(&(y.1 != set))
                .then((x.3 != region).cmp(&(y.3 != region)))
                .then(tier(x.7).cmp(&tier(y.7)))
                .then(x.2.total_cmp(&y.2))
                .then(rtt(&x.0).total_cmp(&rtt(&y.0)))
        });
        let Some(first) = ranked.first().filter(|c| c.1 == set) else {
            return Err(AssignError::NoEdge);
        };
        let primary = first.0;
        if let Some(n) = self.nodes.get_mut(&first.4) {
            n.pending += 1;
        }
        let candidates = ranked
            .iter()
            .enumerate()
            .map(|(i, (addr, s, load, region, _, quic, hls, _))| Candidate {
                addr: *addr,
                quic: *quic,
                hls: *hls,
                set: *s,
                priority: if i == 0 {
                    0
                } else if *s == set {
                    1
                } else {
                    2
                },
                weight: ((1.0 - load) * 100.0).round().max(1.0) as u32,
                region: region.clone(),
            })
            .collect();
        Ok(Assignment {
            primary,
            primary_set: set,
            secondary_set: set.other(),
            candidates,
        })
    }

    /// Probe timings from a viewer on network `prefix`.
    pub fn handle_feedback(&mut self, prefix: &str, probes: &[(SocketAddr, f64)]) {
        self.feedback_reports += 1;
        let f = self.feedback.entry(prefix.to_owned()).or_default();
        for (addr, rtt) in probes {
            let v = f.rtt_ms.entry(*addr).or_insert(*rtt);
            *v += (rtt - *v) * 0.3;
        }
    }

    /// Live set reflectors, for edges that learn them from the control server: UDP
    /// address and QUIC address, if any.
    pub fn reflectors(&self, now: Instant) -> Vec<(SocketAddr, Option<SocketAddr>)> {
        let mut v: Vec<(SocketAddr, Option<SocketAddr>)> = self
            .nodes
            .values()
            .filter(|n| n.report.role == Role::Set && self.live(now, n))
            .map(|n| (n.report.addr, n.report.quic))
            .collect();
        v.sort();
        v
    }

    /// A snapshot for the status page.
    pub fn status(&self, now: Instant) -> Status {
        let mut nodes: Vec<NodeStatus> = self
            .nodes
            .values()
            .map(|n| NodeStatus {
                node: n.report.node,
                role: n.report.role,
                addr: n.report.addr,
                region: n.report.region.clone(),
                set: (n.report.role == Role::Edge).then(|| self.rule.set_of(n.report.addr.port())),
                live: self.live(now, n),
                drained: n.drained,
                viewers: n.report.viewers,
                capacity: n.report.capacity,
                egress_bps: n.report.egress_bps,
                cpu: n.report.cpu,
                silent_ms: now.saturating_duration_since(n.last).as_millis() as u64,
                streams: n.report.streams.clone(),
            })
            .collect();
        nodes.sort_by_key(|n| (n.role as u8, n.addr));
        let live_in = |set: Set| {
            nodes
                .iter()
                .filter(|n| n.set == Some(set) && n.live && !n.drained)
                .count()
        };
        let (even, odd) = (live_in(Set::Even), live_in(Set::Odd));
        let mut warnings = Vec::new();
        for (name, count) in [("even", even), ("odd", odd)] {
            if count == 0 {
                warnings.push(format!(
                    "the {name} edge set is empty: its viewers have nowhere to switch"
                ));
            }
        }
        Status {
            nodes,
            live_edges_even: even,
            live_edges_odd: odd,
            assignments: self.assignments,
            feedback_reports: self.feedback_reports,
            history: self.history.iter().copied().collect(),
            switches: self.switches.clone(),
            warnings,
            slow_clients: self.slow.clients.values().filter(|t| **t > now).count(),
            slow_networks: self.slow.networks.values().filter(|t| **t > now).count(),
            slow_assignments: self.slow_assignments,
        }
    }
}

/// One node on the status page.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Id.
    pub node: u64,
    /// Role.
    pub role: Role,
    /// Address.
    pub addr: SocketAddr,
    /// Region.
    pub region: String,
    /// Set, for edges.
    pub set: Option<Set>,
    /// Reported within the down time.
    pub live: bool,
    /// Drained by an operator.
    pub drained: bool,
    /// Viewers.
    pub viewers: u64,
    /// Capacity.
    pub capacity: u64,
    /// Egress.
    pub egress_bps: u64,
    /// CPU.
    pub cpu: f64,
    /// Since the last report.
    pub silent_ms: u64,
    /// Its streams' figures.
    pub streams: Vec<StreamFigures>,
}

/// The status page's data.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Every node known.
    pub nodes: Vec<NodeStatus>,
    /// Live, undrained edges in the even set.
    pub live_edges_even: usize,
    /// Same, odd set.
    pub live_edges_odd: usize,
    /// Assignments made.
    pub assignments: u64,
    /// Probe reports received from viewers.
    pub feedback_reports: u64,
    /// Switches by reason.
    pub switches: Switches,
    /// Problems an operator should see (an empty set).
    pub warnings: Vec<String>,
    /// Switches and gaps over the last minutes, oldest first.
    pub history: Vec<Sample>,
    /// Viewers remembered slow, by client id.
    pub slow_clients: usize,
    /// Networks remembered slow.
    pub slow_networks: usize,
    /// Assignments and switches of viewers remembered slow.
    pub slow_assignments: u64,
}

/// Totals at one moment, for the console's charts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the registry started.
    pub at_s: u64,
    /// Switches so far, every reason.
    pub switches: u64,
    /// Packets the edges' merges gave up so far, as they last reported.
    pub gaps: u64,
    /// Viewers the edges last reported.
    pub viewers: u64,
}

/// Samples kept (every 5 s: ten minutes).
pub const HISTORY: usize = 120;

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(node: u64, port: u16, viewers: u64) -> Report {
        Report {
            node,
            role: Role::Edge,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            quic: None,
            region: String::new(),
            capacity: 100,
            cost_tier: 0,
            viewers,
            egress_bps: 0,
            cpu: 0.0,
            streams: Vec::new(),
            hls: None,
            slow: Vec::new(),
            ladders: Vec::new(),
        }
    }

    fn four_edges(r: &mut Registry, t: Instant) {
        for (i, port) in [9000u16, 9002, 9001, 9003].into_iter().enumerate() {
            r.handle_report(t, edge(i as u64, port, 0)).unwrap();
        }
    }

    #[test]
    fn a_node_id_taken_by_another_live_node_is_refused() {
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        let t = Instant::now();
        r.handle_report(t, edge(1, 9000, 0)).unwrap();
        let e = r.handle_report(t, edge(1, 9002, 0)).unwrap_err();
        assert!(e.contains("node id 1") && e.contains("--node-id"), "{e}");
        // The same node reporting again is fine; after it died, the id is free.
        r.handle_report(t, edge(1, 9000, 0)).unwrap();
        r.handle_report(t + Duration::from_secs(60), edge(1, 9002, 0))
            .unwrap();
    }

    #[test]
    fn sets_by_parity_and_ranges() {
        assert_eq!(SetRule::Parity.set_of(8000), Set::Even);
        assert_eq!(SetRule::Parity.set_of(8001), Set::Odd);
        let r = SetRule::Ranges(vec![(9000, 9099)]);
        assert_eq!(r.set_of(9050), Set::Even);
        assert_eq!(r.set_of(9100), Set::Odd);
    }

    #[test]
    fn forty_viewers_spread_evenly_with_secondary_in_the_other_set() {
        let t = Instant::now();
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        four_edges(&mut r, t);
        let mut per: HashMap<SocketAddr, u32> = HashMap::new();
        for _ in 0..40 {
            let a = r.assign(t, "", "", 0).unwrap();
            assert_ne!(a.primary_set, a.secondary_set);
            assert_eq!(SetRule::Parity.set_of(a.primary.port()), a.primary_set);
            *per.entry(a.primary).or_default() += 1;
        }
        assert_eq!(per.len(), 4);
        assert!(per.values().all(|&n| (8..=12).contains(&n)), "{per:?}");
    }

    #[test]
    fn switch_goes_to_the_other_set_never_the_failed_edge() {
        let t = Instant::now();
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        four_edges(&mut r, t);
        let failed = SocketAddr::from(([127, 0, 0, 1], 9000));
        for _ in 0..10 {
            let a = r.switch(t, failed, "stall", "", "", 0).unwrap();
            assert_ne!(a.primary, failed);
            assert_eq!(a.primary_set, Set::Odd);
        }
        assert_eq!(r.status(t).switches.0["stall"], 10);
    }

    #[test]
    fn silent_and_drained_edges_get_no_viewers() {
        let t = Instant::now();
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        four_edges(&mut r, t);
        // Only node 0 (9000) and 2 (9001) keep reporting.
        let later = t + Duration::from_secs(4);
        r.handle_report(later, edge(0, 9000, 0)).unwrap();
        r.handle_report(later, edge(2, 9001, 0)).unwrap();
        assert!(r.drain(0, true));
        for _ in 0..10 {
            assert_eq!(r.assign(later, "", "", 0).unwrap().primary.port(), 9001);
        }
        let s = r.status(later);
        assert_eq!((s.live_edges_even, s.live_edges_odd), (0, 1));
        assert!(s.warnings.iter().any(|w| w.contains("even")));
        assert_eq!(
            r.switch(
                later,
                SocketAddr::from(([127, 0, 0, 1], 9001)),
                "kill",
                "",
                "",
                0
            ),
            Err(AssignError::NoOtherSet)
        );
    }

    #[test]
    fn region_and_probe_feedback_rank_candidates() {
        let t = Instant::now();
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        let mut a = edge(0, 9000, 0);
        a.region = "eu".into();
        r.handle_report(t, a).unwrap();
        r.handle_report(t, edge(1, 9002, 0)).unwrap();
        assert_eq!(r.assign(t, "eu", "", 0).unwrap().primary.port(), 9000);
        // Without a region, the viewer's network measured 9002 faster.
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        r.handle_report(t, edge(0, 9000, 0)).unwrap();
        r.handle_report(t, edge(1, 9002, 0)).unwrap();
        r.handle_feedback(
            "10.1.2",
            &[
                (SocketAddr::from(([127, 0, 0, 1], 9000)), 40.0),
                (SocketAddr::from(([127, 0, 0, 1], 9002)), 5.0),
            ],
        );
        assert_eq!(r.assign(t, "", "10.1.2", 0).unwrap().primary.port(), 9002);
    }

    fn slow(client: u64, ip: [u8; 4]) -> SlowViewer {
        SlowViewer {
            client,
            ip: Some(std::net::IpAddr::from(ip)),
            stream: 1,
            bps: 1_000_000,
        }
    }

    /// Two edges per set, one cheap (tier 0) and one fast (tier 2) in each.
    fn tiered(r: &mut Registry, t: Instant, reporter_slow: Vec<SlowViewer>) {
        for (node, port, tier) in [(0, 9000, 0), (1, 9002, 2), (2, 9001, 0), (3, 9003, 2)] {
            let mut e = edge(node, port, 0);
            e.cost_tier = tier;
            if node == 1 {
                e.slow = reporter_slow.clone();
            }
            r.handle_report(t, e).unwrap();
        }
    }

    #[test]
    fn slow_viewers_get_cheap_edges_and_others_fast_ones() {
        let t = Instant::now();
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3))
            .with_slow_memory(Duration::from_secs(60));
        tiered(&mut r, t, Vec::new());
        // Nobody is slow yet: every viewer gets a fast edge, whichever set.
        for client in [7, 8] {
            let a = r.assign(t, "", "10.0.0", client).unwrap();
            assert!([9002, 9003].contains(&a.primary.port()), "{a:?}");
        }
        // An edge reports client 7 slow, from 10.0.0.5.
        tiered(&mut r, t, vec![slow(7, [10, 0, 0, 5])]);
        let a = r.assign(t, "", "10.9.9", 7).unwrap();
        assert!([9000, 9001].contains(&a.primary.port()), "by client: {a:?}");
        // A new viewer from the same network is placed alike; one from elsewhere not.
        let a = r.assign(t, "", "10.0.0", 99).unwrap();
        assert!(
            [9000, 9001].contains(&a.primary.port()),
            "by network: {a:?}"
        );
        let a = r.assign(t, "", "10.9.9", 99).unwrap();
        assert!([9002, 9003].contains(&a.primary.port()), "{a:?}");
        // A switch of a slow viewer stays on the cheap tier of the other set.
        let a = r
            .switch(
                t,
                SocketAddr::from(([127, 0, 0, 1], 9000)),
                "stall",
                "",
                "",
                7,
            )
            .unwrap();
        assert_eq!(a.primary.port(), 9001);
        assert_eq!(r.status(t).slow_clients, 1);
        assert_eq!(r.status(t).slow_networks, 1);
        assert_eq!(r.status(t).slow_assignments, 3);
        // Forgotten after the memory runs out (the edges reporting on).
        let later = t + Duration::from_secs(61);
        tiered(&mut r, later, Vec::new());
        let a = r.assign(later, "", "10.0.0", 7).unwrap();
        assert!([9002, 9003].contains(&a.primary.port()), "{a:?}");
    }

    #[test]
    fn buffer_aware_moves_go_to_a_cheaper_or_faster_tier_or_nowhere() {
        let t = Instant::now();
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        tiered(&mut r, t, Vec::new());
        let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let v = ("", "10.0.0", 7);
        // From the even set's fast edge, a cheap one of the odd set; and back, a fast one.
        let a = r.switch_preferring(t, at(9002), "buffer_high", v, Prefer::Cheap);
        assert_eq!(a.unwrap().primary.port(), 9001);
        let a = r.switch_preferring(t, at(9001), "buffer_low", v, Prefer::Fast);
        assert_eq!(a.unwrap().primary.port(), 9002);
        // None cheaper than a cheap edge, none faster than a fast one: refused, not
        // counted as switches.
        let a = r.switch_preferring(t, at(9000), "buffer_high", v, Prefer::Cheap);
        assert_eq!(a, Err(AssignError::NoTier("lower")));
        let a = r.switch_preferring(t, at(9003), "buffer_low", v, Prefer::Fast);
        assert_eq!(a, Err(AssignError::NoTier("higher")));
        let counted: u64 = r.status(t).switches.0.values().sum();
        assert_eq!(counted, 2);
        // Every edge of one tier: a buffer-aware move has nowhere to go.
        let mut flat = Registry::new(SetRule::Parity, Duration::from_secs(3));
        four_edges(&mut flat, t);
        let a = flat.switch_preferring(t, at(9000), "buffer_high", v, Prefer::Cheap);
        assert!(a.is_err());
    }

    #[test]
    fn a_slow_viewer_goes_to_the_set_that_has_a_cheap_edge() {
        let t = Instant::now();
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        // The even set has more room, but only the odd set has a cheap edge.
        for (node, port, tier, viewers) in [(0, 9000, 3, 0), (1, 9001, 1, 50), (2, 9003, 3, 50)] {
            let mut e = edge(node, port, viewers);
            e.cost_tier = tier;
            if node == 0 {
                e.slow = vec![slow(5, [10, 0, 0, 1])];
            }
            r.handle_report(t, e).unwrap();
        }
        assert_eq!(r.assign(t, "", "10.7.7", 6).unwrap().primary.port(), 9000);
        let a = r.assign(t, "", "10.7.7", 5).unwrap();
        assert_eq!(a.primary.port(), 9001);
        assert_eq!(a.secondary_set, Set::Even);
    }

    #[test]
    fn only_edges_name_a_bounded_number_of_slow_viewers() {
        let mut e = edge(0, 9000, 0);
        e.slow = vec![slow(1, [10, 0, 0, 1]); MAX_REPORT_SLOW + 1];
        assert!(e.validate().is_err());
        e.slow.truncate(MAX_REPORT_SLOW);
        assert!(e.validate().is_ok());
        e.role = Role::Set;
        assert!(e.validate().unwrap_err().contains("only edges"));
    }

    #[test]
    fn slow_memory_is_bounded() {
        let t = Instant::now();
        let mut m = SlowMemory {
            ttl: Duration::from_secs(10),
            clients: HashMap::new(),
            networks: HashMap::new(),
            refused: 0,
        };
        for c in 1..=(MAX_SLOW as u64 + 5) {
            m.note(
                t,
                &SlowViewer {
                    client: c,
                    ip: None,
                    stream: 1,
                    bps: 0,
                },
            );
        }
        assert_eq!(m.clients.len(), MAX_SLOW);
        assert_eq!(m.refused, 5);
        // Expired entries make room.
        let later = t + Duration::from_secs(11);
        m.note(
            later,
            &SlowViewer {
                client: 1_000_000,
                ip: None,
                stream: 1,
                bps: 0,
            },
        );
        assert_eq!(m.clients.len(), 1);
        assert!(m.is_slow(later, 1_000_000, ""));
    }

    #[test]
    fn no_edge_is_an_error() {
        let t = Instant::now();
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        assert_eq!(r.assign(t, "", "", 0), Err(AssignError::NoEdge));
        let mut full = edge(0, 9000, 100);
        full.capacity = 100;
        r.handle_report(t, full).unwrap();
        assert_eq!(r.assign(t, "", "", 0), Err(AssignError::NoEdge));
    }

    #[test]
    fn reports_no_real_node_sends_are_refused_with_a_reason() {
        let good = edge(1, 9000, 10);
        assert!(good.validate().is_ok());
        let bad: Vec<(&str, Report)> = vec![
            (
                "too many streams",
                Report {
                    streams: vec![
                        StreamFigures {
                            id: 1,
                            viewers: 0,
                            subscribers: 0,
                            released: 0,
                            gaps: 0,
                            paths: Vec::new(),
                            sources: Vec::new(),
                            bps: 0,
                        };
                        MAX_REPORT_STREAMS + 1
                    ],
                    ..good.clone()
                },
            ),
            (
                "too many sources",
                Report {
                    streams: vec![StreamFigures {
                        id: 1,
                        viewers: 0,
                        subscribers: 0,
                        released: 0,
                        gaps: 0,
                        paths: Vec::new(),
                        sources: vec![
                            SocketAddr::from(([10, 0, 0, 1], 5000));
                            MAX_REPORT_SOURCES + 1
                        ],
                        bps: 0,
                    }],
                    ..good.clone()
                },
            ),
            (
                "port 0",
                Report {
                    addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    ..good.clone()
                },
            ),
            (
                "unspecified",
                Report {
                    addr: SocketAddr::from(([0, 0, 0, 0], 9000)),
                    ..good.clone()
                },
            ),
            (
                "quic port 0",
                Report {
                    quic: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                    ..good.clone()
                },
            ),
            (
                "viewers",
                Report {
                    viewers: u64::MAX,
                    ..good.clone()
                },
            ),
            (
                "capacity 0",
                Report {
                    capacity: 0,
                    ..good.clone()
                },
            ),
            (
                "cpu",
                Report {
                    cpu: 1e308,
                    ..good.clone()
                },
            ),
            (
                "cpu nan",
                Report {
                    cpu: f64::NAN,
                    ..good.clone()
                },
            ),
            (
                "region",
                Report {
                    region: "x".repeat(1 << 20),
                    ..good.clone()
                },
            ),
            (
                "region chars",
                Report {
                    region: "<script>".into(),
                    ..good.clone()
                },
            ),
            (
                "egress",
                Report {
                    egress_bps: u64::MAX,
                    ..good.clone()
                },
            ),
            (
                "tier",
                Report {
                    cost_tier: 200,
                    ..good.clone()
                },
            ),
        ];
        for (what, r) in bad {
            assert!(r.validate().is_err(), "{what} accepted");
        }
    }

    #[test]
    fn silent_nodes_are_forgotten_and_the_registry_is_bounded() {
        let mut r = Registry::new(SetRule::Parity, Duration::from_secs(3));
        let t = Instant::now();
        for i in 0..MAX_NODES as u64 {
            r.handle_report(t, edge(i, 9000 + (i % 1000) as u16, 0))
                .unwrap();
        }
        assert_eq!(r.len(), MAX_NODES);
        // Full: a new id is refused while every known node is recent…
        assert!(
            r.handle_report(t + Duration::from_secs(1), edge(u64::MAX, 9000, 0))
                .is_err()
        );
        // …and a known one still reports.
        assert!(
            r.handle_report(t + Duration::from_secs(1), edge(5, 9005, 0))
                .is_ok()
        );
        // A minute later the silent ones are forgotten and there is room again.
        let later = t + FORGET_AFTER + Duration::from_secs(1);
        assert!(r.handle_report(later, edge(u64::MAX, 9000, 0)).is_ok());
        assert_eq!(r.len(), 1, "only the node that just reported is known");
        assert_eq!(r.forget_silent(later + FORGET_AFTER), 1);
        assert!(r.is_empty());
    }
}
