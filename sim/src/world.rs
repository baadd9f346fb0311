//! The engine: every role's machine on virtual links, in virtual time.
//!
//! One priority queue of events (deliveries, machines' timeouts, faults, source frames,
//! reports and control-server calls) ordered by time and then by the order they were
//! made, so a run is a function of its [`Schedule`]. Links impair what crosses them
//! with the impairment model the daemons use. A node is alive, hung (its input queues up
//! and is taken when it resumes) or dead; a restarted node is a fresh machine on the same
//! address. Control servers answer over the links with a round trip, and never when hung
//! or dead; a viewer's request fails at a server after the client's HTTP timeout.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use rustc_hash::FxHashMap as HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use braid_capture::machine::{self as capture, Capture};
use braid_capture::ts::{Synth, SynthConfig};
use braid_client::control::{Assignment, Candidate};
use braid_client::session::{self, Refusal, Request, Session};
use braid_control::api::{Api, ApiError};
use braid_control::registry::{self, Report, Role, SetRule};
use braid_core::impair::{DropReason, Impairer, Verdict};
use braid_core::node::{Output, Peer, WallClock};
use braid_core::wire::{Codec, Key};
use braid_core::{SeqNo, StreamId};
use braid_entrypoint::EntryPoint;
use braid_reflector::edge::{self, Edge};
use braid_reflector::set::{self, SetReflector};
use bytes::Bytes;
use clap::Parser;

use crate::schedule::{FaultKind, Schedule, matches};

/// Wall time at the start of every run (2027-01-15), so runs replay exactly.
pub const EPOCH_UNIX_MS: u64 = 1_800_000_000_000;
/// The stream simulated.
pub const STREAM: StreamId = StreamId(1);
const STREAM_KEY: &str = "sim stream key";
const NETWORK_KEY: &str = "braid simulator network key";
/// A viewer's HTTP request to one control server fails after this long.
const HTTP_TIMEOUT: Duration = braid_client::control::TIMEOUT;
/// Nodes report to control servers this often.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The capture.
    Capture,
    /// An entry point.
    Entry,
    /// A set reflector.
    Set,
    /// An edge.
    Edge,
    /// A control server.
    Control,
    /// A viewer.
    Viewer,
}

enum Machine {
    Capture(Box<Capture>, Synth),
    Entry(Box<EntryPoint>),
    Set(Box<SetReflector>),
    Edge(Box<Edge>),
    Control(Box<Api>),
    Viewer(Box<Session>),
}

/// One node of the simulated network.
pub struct Node {
    /// Its name in the schedule.
    pub name: String,
    /// Its role.
    pub kind: Kind,
    /// Its address.
    pub addr: SocketAddr,
    machine: Option<Machine>,
    /// Stopped until then: input waits in `queued`.
    hung_until: Option<Instant>,
    queued: Vec<(SocketAddr, Bytes)>,
    /// When its machine asked to be woken.
    wake: Option<Instant>,
    /// Times it was (re)started.
    pub incarnation: u32,
    /// When its caps were last checked.
    checked: Option<Instant>,
}

impl Node {
    /// Whether it runs (not dead, not hung).
    pub fn running(&self) -> bool {
        self.machine.is_some() && self.hung_until.is_none()
    }
}

enum Ev {
    Deliver {
        to: u32,
        from: u32,
        data: Bytes,
    },
    Wake {
        node: usize,
    },
    Fault(usize),
    FaultEnd(usize),
    Frame,
    Report {
        node: usize,
    },
    ReportReply {
        node: usize,
        drain: bool,
    },
    Call {
        control: usize,
        call: usize,
    },
    Reply {
        call: usize,
        control: usize,
        result: Option<Result<registry::Assignment, ApiError>>,
    },
    CallTimeout {
        call: usize,
        control: usize,
    },
    Join(usize),
    Leave(usize),
    Pause(usize),
}

/// A viewer's request in flight to every control server.
struct Call {
    viewer: usize,
    id: u64,
    request: Request,
    /// Controls not yet answered or failed.
    pending: Vec<usize>,
    errors: Vec<String>,
    done: bool,
}

/// One packet the capture sent.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Its payload.
    pub payload: Bytes,
    /// When.
    pub at: Instant,
    /// Which capture session (1, 2, … as the capture restarts).
    pub session: u32,
    /// Whether a decoder can start there.
    pub keyframe: bool,
    /// Whether an entry point took it into the network (else it was lost on every first
    /// hop or refused by entry points that did not know the publisher yet, which nothing
    /// repairs: the capture keeps no copies).
    pub entered: bool,
}

/// What the run observed, for the invariants.
#[derive(Debug, Default)]
pub struct Record {
    /// Every packet the capture sent: sequence number → what it was.
    pub truth: BTreeMap<u64, Sent>,
    /// Capture sessions: (first sequence number, start time).
    pub sessions: Vec<(u64, Instant)>,
    /// Per viewer: what it wrote, in order (when, sequence number, the node index of
    /// the edge it watched then).
    pub writes: Vec<Vec<(Instant, SeqNo, usize)>>,
    /// Per viewer: payloads that did not match the source.
    pub corrupt: Vec<Vec<SeqNo>>,
    /// Per viewer: how its session ended, when it did before the run.
    pub ended: Vec<Option<Result<(), String>>>,
    /// Per viewer: the stats at the end.
    pub stats: Vec<Option<braid_client::Stats>>,
    /// Per viewer: when it was paused, and for how long.
    pub paused: Vec<Option<(Instant, Duration)>>,
    /// Nodes whose state went past a cap: (node, what).
    pub over_caps: Vec<(String, String)>,
    /// Per viewer: its link's rate caps from the edges, kbit/s (0: none), and since when.
    pub link_caps: Vec<Vec<(Instant, u64)>>,
    /// Events processed.
    pub events: u64,
    /// What the links did to each packet on its way to each node.
    pub ledger: crate::ledger::Ledger,
}

/// A whole network in virtual time.
pub struct World {
    schedule: Schedule,
    start: Instant,
    now: Instant,
    queue: BinaryHeap<Reverse<Queued>>,
    order: u64,
    codec: Codec,
    /// Every node: the capture, entry points, set reflectors, edges, controls, viewers.
    pub nodes: Vec<Node>,
    by_addr: HashMap<SocketAddr, usize>,
    links: HashMap<(usize, usize), Option<Impairer>>,
    /// Partitions: (a, b, until).
    partitions: Vec<(usize, usize, Instant)>,
    calls: Vec<Call>,
    /// The viewers' node indexes, in schedule order.
    pub viewers: Vec<usize>,
    /// What was observed.
    pub record: Record,
    session: u32,
    /// Print every move of media with this sequence number (debugging a run).
    pub trace: Option<u64>,
}

/// An event in the queue, ordered by time and then by the order it was made.
struct Queued(Instant, u64, Ev);

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

fn addr(kind: Kind, i: usize) -> SocketAddr {
    let (net, port) = match kind {
        Kind::Capture => (1, 4000),
        Kind::Entry => (2, 7000),
        Kind::Set => (3, 8000),
        // Edges alternate parity: edge0 even, edge1 odd, ...
        Kind::Edge => (4, 9000 + i as u16),
        Kind::Control => (5, 7100),
        Kind::Viewer => (6, 5000),
    };
    let i = i as u16;
    let ip = Ipv4Addr::new(10, net, (i >> 8) as u8, (i & 0xff) as u8 + 1);
    SocketAddr::new(IpAddr::V4(ip), port)
}

impl World {
    /// A network built from `schedule`, with nothing run yet.
    #[allow(clippy::disallowed_methods)] // One real instant to count virtual time from.
    pub fn new(schedule: Schedule) -> World {
        let start = Instant::now();
        let t = &schedule.topology;
        let mut nodes = Vec::new();
        let mut push = |kind: Kind, name: String, i: usize| {
            nodes.push(Node {
                name,
                kind,
                addr: addr(kind, i),
                machine: None,
                hung_until: None,
                queued: Vec::new(),
                wake: None,
                incarnation: 0,
                checked: None,
            });
        };
        // One capture per rendition of a ladder: `capture`, `capture1`, ….
        let captures = schedule.stream.ladder.len().max(1);
        push(Kind::Capture, "capture".into(), 0);
        for i in 1..captures {
            push(Kind::Capture, format!("capture{i}"), i);
        }
        for i in 0..t.entries {
            push(Kind::Entry, format!("entry{i}"), i);
        }
        for i in 0..t.sets {
            push(Kind::Set, format!("set{i}"), i);
        }
        for i in 0..t.edges {
            push(Kind::Edge, format!("edge{i}"), i);
        }
        for i in 0..t.controls {
            push(Kind::Control, format!("control{i}"), i);
        }
        let first_viewer = captures + t.entries + t.sets + t.edges + t.controls;
        for i in 0..schedule.viewers.len() {
            push(Kind::Viewer, format!("viewer{i}"), i);
        }
        let viewers: Vec<usize> = (first_viewer..first_viewer + schedule.viewers.len()).collect();
        let by_addr = nodes.iter().enumerate().map(|(i, n)| (n.addr, i)).collect();
        let n_viewers = viewers.len();
        let mut w = World {
            start,
            now: start,
            queue: BinaryHeap::new(),
            order: 0,
            codec: Codec::new(Key::derive(NETWORK_KEY)),
            nodes,
            by_addr,
            links: HashMap::default(),
            partitions: Vec::new(),
            calls: Vec::new(),
            viewers,
            record: Record {
                writes: vec![Vec::new(); n_viewers],
                corrupt: vec![Vec::new(); n_viewers],
                ended: vec![None; n_viewers],
                stats: vec![None; n_viewers],
                paused: vec![None; n_viewers],
                link_caps: vec![Vec::new(); n_viewers],
                ..Record::default()
            },
            session: 0,
            trace: None,
            schedule,
        };
        for i in 0..w.nodes.len() {
            if w.nodes[i].kind != Kind::Viewer {
                w.start_node(i);
            }
        }
        for (f, fault) in w.schedule.faults.clone().iter().enumerate() {
            w.push(w.start + ms(fault.at_ms), Ev::Fault(f));
        }
        for (v, plan) in w.schedule.viewers.clone().iter().enumerate() {
            w.push(w.start + ms(plan.join_ms), Ev::Join(v));
            if let Some(l) = plan.leave_ms {
                w.push(w.start + ms(l), Ev::Leave(v));
            }
            if let Some(p) = plan.pause_at_ms {
                w.push(w.start + ms(p), Ev::Pause(v));
            }
        }
        w.push(w.start, Ev::Frame);
        w
    }

    /// The run's start.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// The schedule run.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn push(&mut self, at: Instant, ev: Ev) {
        self.order += 1;
        self.queue.push(Reverse(Queued(at, self.order, ev)));
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = usize> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(_, n)| n.kind == kind)
            .map(|(i, _)| i)
    }

    fn addrs(&self, kind: Kind) -> Vec<SocketAddr> {
        self.of_kind(kind).map(|i| self.nodes[i].addr).collect()
    }

    /// A fresh machine for node `i`, as its daemon would build it from the defaults.
    fn start_node(&mut self, i: usize) {
        let now = self.now;
        let clock = WallClock::new(self.start, EPOCH_UNIX_MS);
        let codec = self.codec.clone();
        let node = &self.nodes[i];
        let n = node.incarnation;
        let tuning = self.schedule.tuning.clone();
        // Each incarnation's cookie secret, from the seed, so a run replays exactly.
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&self.schedule.seed.to_be_bytes());
        secret[8..16].copy_from_slice(&(i as u64).to_be_bytes());
        secret[16..24].copy_from_slice(&u64::from(n).to_be_bytes());
        let machine = match node.kind {
            Kind::Capture => {
                let s = &self.schedule.stream;
                // Captures come first: the node's index is its rendition's.
                let ts_per_frame = s.ladder.get(i).copied().unwrap_or(s.ts_per_frame);
                let config = capture::Config {
                    stream: StreamId(STREAM.0 + i as u32),
                    key: STREAM_KEY.into(),
                    entries: self.addrs(Kind::Entry),
                    ts_per_rtp: s.ts_per_rtp,
                    segment: std::time::Duration::from_secs(1),
                };
                // A ladder's renditions are aligned as `--align` makes them: frames
                // numbered from the clock (here the run's frame ticks), so every capture,
                // whenever it starts, puts keyframes at the same times.
                let aligned = !s.ladder.is_empty();
                let tick = Duration::from_micros(1_000_000 / u64::from(s.fps.max(1)));
                let frame =
                    now.saturating_duration_since(self.start).as_micros() / tick.as_micros().max(1);
                let synth = Synth::new(SynthConfig {
                    bitrate: u64::from(ts_per_frame) * 188 * 8 * u64::from(s.fps),
                    fps: s.fps,
                    gop: s.gop,
                    run: 0,
                    align: aligned,
                });
                let synth = if aligned {
                    synth.starting_at(frame as u64)
                } else {
                    synth
                };
                let c = Capture::new(config, clock, now).expect("the publish encodes");
                Machine::Capture(Box::new(c), synth)
            }
            Kind::Entry => {
                let sets: Vec<String> = self
                    .addrs(Kind::Set)
                    .iter()
                    .map(|a| a.to_string())
                    .collect();
                let mut args: Vec<String> = [
                    "braid-entrypoint",
                    "--network-key",
                    NETWORK_KEY,
                    "--node-id",
                    &(100 + i).to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                for r in 0..self.schedule.stream.ladder.len().max(1) {
                    let id = STREAM.0 + r as u32;
                    args.extend([
                        "--stream".into(),
                        format!("{id}:{STREAM_KEY}:{}", sets.join(",")),
                    ]);
                }
                let c = braid_entrypoint::Config::try_parse_from(args).expect("entry point flags");
                Machine::Entry(Box::new(
                    EntryPoint::new(c.machine(), codec)
                        .expect("entry point config")
                        .with_cookie_secret(secret),
                ))
            }
            Kind::Set | Kind::Edge => {
                let mut args: Vec<String> = [
                    "braid-reflector",
                    "--network-key",
                    NETWORK_KEY,
                    "--node-id",
                    &(100 + i).to_string(),
                    "--role",
                    if node.kind == Kind::Set {
                        "set"
                    } else {
                        "edge"
                    },
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                if let Some(w) = tuning.reorder_window_ms {
                    args.extend(["--reorder-window-ms".into(), w.to_string()]);
                }
                if let Some(k) = tuning.subscribe_k {
                    args.extend(["--subscribe-k".into(), k.to_string()]);
                }
                if let Some(r) = tuning.repair {
                    args.extend(["--repair".into(), r.to_string()]);
                }
                if node.kind == Kind::Set {
                    for e in self.addrs(Kind::Entry) {
                        args.extend(["--upstream".into(), e.to_string()]);
                    }
                } else {
                    for s in self.addrs(Kind::Set) {
                        args.extend(["--reflector".into(), s.to_string()]);
                    }
                    let s = &self.schedule.stream;
                    if !s.ladder.is_empty() {
                        let rungs: Vec<String> = (0..s.ladder.len())
                            .map(|r| format!("{}:{}", STREAM.0 + r as u32, s.rendition_kbps(r)))
                            .collect();
                        args.extend(["--ladder".into(), rungs.join(",")]);
                    }
                }
                let c = braid_reflector::Config::try_parse_from(args).expect("reflector flags");
                if node.kind == Kind::Set {
                    let m = SetReflector::new(c.set_config().expect("set config"), codec)
                        .expect("set config")
                        .with_cookie_secret(secret);
                    Machine::Set(Box::new(m))
                } else {
                    let m = Edge::new(c.edge_config().expect("edge config"), codec, clock)
                        .expect("edge config")
                        .with_cookie_secret(secret);
                    Machine::Edge(Box::new(m))
                }
            }
            Kind::Control => Machine::Control(Box::new(Api::new(
                SetRule::Parity,
                Duration::from_secs(3),
                None,
            ))),
            Kind::Viewer => {
                let v = self.viewers.iter().position(|x| *x == i).unwrap_or(0);
                let mut args: Vec<String> = [
                    "braid-client",
                    "--id",
                    &(1000 + v).to_string(),
                    "--stream",
                    &STREAM.0.to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                if self.schedule.topology.controls == 0 {
                    args.extend(["--edge".into(), addr(Kind::Edge, 0).to_string()]);
                } else {
                    args.extend(["--control".into(), "http://sim".into()]);
                }
                if let Some(b) = tuning.buffer_ms {
                    args.extend(["--buffer-ms".into(), b.to_string()]);
                }
                let c = braid_client::Config::try_parse_from(args).expect("client flags");
                let s = Session::new(c.session(), Codec::viewer(), clock, "udp", now)
                    .expect("session config");
                Machine::Viewer(Box::new(s))
            }
        };
        let node = &mut self.nodes[i];
        node.machine = Some(machine);
        node.hung_until = None;
        node.queued.clear();
        node.incarnation = n + 1;
        if node.kind == Kind::Capture {
            self.session += 1;
        }
        if matches!(node.kind, Kind::Edge | Kind::Set) {
            // Reports start a little after the start, staggered.
            let at = now + Duration::from_millis(10 + i as u64);
            self.push(at, Ev::Report { node: i });
        }
        self.drive(i);
    }

    /// Runs the schedule to its end.
    pub fn run(&mut self) {
        let end = self.start + ms(self.schedule.duration_ms);
        while let Some(Reverse(Queued(at, _, ev))) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now = at;
            self.record.events += 1;
            self.handle(ev);
        }
        self.now = end;
        for v in 0..self.viewers.len() {
            let i = self.viewers[v];
            if let Some(Machine::Viewer(s)) = &self.nodes[i].machine {
                self.record.stats[v] = Some(s.stats().clone());
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        // Logs say which node spoke, and when (for replaying one run with `--log`).
        let node = match &ev {
            Ev::Deliver { to, .. } => Some(*to as usize),
            Ev::Wake { node } => Some(*node),
            _ => None,
        };
        let _span = node.map(|i| {
            let at = self.now.saturating_duration_since(self.start).as_millis() as u64;
            tracing::error_span!("sim", node = %self.nodes[i].name, ms = at).entered()
        });
        match ev {
            Ev::Deliver { to, from, data } => {
                let from = self.nodes[from as usize].addr;
                self.deliver(to as usize, from, data);
            }
            Ev::Wake { node } => {
                let n = &self.nodes[node];
                if n.machine.is_none() {
                    return;
                }
                if let Some(until) = n.hung_until {
                    if self.now >= until {
                        self.resume(node);
                    }
                    return;
                }
                if n.wake != Some(self.now) {
                    return;
                }
                self.nodes[node].wake = None;
                let now = self.now;
                match self.nodes[node].machine.as_mut() {
                    Some(Machine::Capture(c, _)) => c.handle_timeout(now),
                    Some(Machine::Entry(m)) => m.handle_timeout(now),
                    Some(Machine::Set(m)) => m.handle_timeout(now),
                    Some(Machine::Edge(m)) => m.handle_timeout(now),
                    Some(Machine::Viewer(m)) => m.handle_timeout(now),
                    Some(Machine::Control(_)) | None => {}
                }
                self.drive(node);
            }
            Ev::Frame => {
                let fps = self.schedule.stream.fps.max(1);
                self.push(
                    self.now + Duration::from_micros(1_000_000 / u64::from(fps)),
                    Ev::Frame,
                );
                let now = self.now;
                for i in self.of_kind(Kind::Capture).collect::<Vec<_>>() {
                    self.frame(now, i);
                }
            }
            Ev::Fault(f) => self.fault(f),
            Ev::FaultEnd(f) => self.fault_end(f),
            Ev::Report { node } => self.report(node),
            Ev::ReportReply { node, drain } => {
                if !self.nodes[node].running() {
                    return;
                }
                let now = self.now;
                if let Some(Machine::Edge(m)) = self.nodes[node].machine.as_mut() {
                    if m.draining() != drain {
                        m.handle_input(now, edge::Input::Drain(drain));
                        self.drive(node);
                    }
                }
            }
            Ev::Call { control, call } => self.answer_call(control, call),
            Ev::Reply {
                call,
                control,
                result,
            } => self.take_reply(call, control, result),
            Ev::CallTimeout { call, control } => {
                if self.calls[call].pending.contains(&control) {
                    let name = self.nodes[control].name.clone();
                    self.take_reply_from(call, control, Err(format!("{name}: timed out")));
                }
            }
            Ev::Join(v) => {
                let i = self.viewers[v];
                self.start_node(i);
            }
            Ev::Leave(v) => {
                let i = self.viewers[v];
                if let Some(Machine::Viewer(s)) = self.nodes[i].machine.as_mut() {
                    s.close();
                    self.record.stats[v] = Some(s.stats().clone());
                }
                self.drive(i);
                self.nodes[i].machine = None;
            }
            Ev::Pause(v) => {
                let i = self.viewers[v];
                let d = ms(self.schedule.viewers[v].pause_ms);
                if self.nodes[i].running() {
                    self.record.paused[v] = Some((self.now, d));
                    self.hang(i, d);
                }
            }
        }
    }

    /// The counters of every live set reflector or edge, by name.
    pub fn reflector_counters(&self) -> Vec<(String, braid_reflector::Counters)> {
        self.nodes
            .iter()
            .filter_map(|n| match &n.machine {
                Some(Machine::Set(m)) => Some((n.name.clone(), m.counters().clone())),
                Some(Machine::Edge(m)) => Some((n.name.clone(), m.counters().clone())),
                _ => None,
            })
            .collect()
    }

    /// The merge counters of every live node of `kind` (set reflectors or edges), summed.
    pub fn merge_totals(&self, kind: Kind) -> braid_core::merge::Stats {
        let mut t = braid_core::merge::Stats::default();
        for n in self.nodes.iter().filter(|n| n.kind == kind) {
            let reports = match &n.machine {
                Some(Machine::Set(m)) => m.reports(),
                Some(Machine::Edge(m)) => m.reports(),
                _ => continue,
            };
            for r in reports {
                t.released += r.merge.released;
                t.gaps += r.merge.gaps;
                t.nacked += r.merge.nacked;
                t.repaired += r.merge.repaired;
                t.duplicates += r.merge.duplicates;
                t.late += r.merge.late;
            }
        }
        t
    }

    fn hang(&mut self, i: usize, d: Duration) {
        let until = self.now + d;
        self.nodes[i].hung_until = Some(until);
        // The wake at `until` resumes it.
        self.nodes[i].wake = None;
        self.push(until, Ev::Wake { node: i });
    }

    /// A hung node resumes: it takes everything that queued up, then its timeouts.
    fn resume(&mut self, i: usize) {
        self.nodes[i].hung_until = None;
        let queued = std::mem::take(&mut self.nodes[i].queued);
        for (from, data) in queued {
            self.input(i, from, data);
        }
        let now = self.now;
        match self.nodes[i].machine.as_mut() {
            Some(Machine::Capture(c, _)) => c.handle_timeout(now),
            Some(Machine::Entry(m)) => m.handle_timeout(now),
            Some(Machine::Set(m)) => m.handle_timeout(now),
            Some(Machine::Edge(m)) => m.handle_timeout(now),
            Some(Machine::Viewer(m)) => m.handle_timeout(now),
            _ => {}
        }
        self.drive(i);
    }

    fn deliver(&mut self, to: usize, from: SocketAddr, data: Bytes) {
        let n = &mut self.nodes[to];
        if n.machine.is_none() {
            return;
        }
        if let Some(until) = n.hung_until {
            if self.now < until {
                // A stopped process's socket buffer: bounded, the rest is lost.
                if n.queued.len() < 4096 {
                    n.queued.push((from, data));
                }
                return;
            }
            self.resume(to);
        }
        if let Some(seq) = self.trace {
            if let Ok(braid_core::wire::Message {
                body: braid_core::wire::Body::Media(m),
                ..
            }) = self.codec.decode(data.clone())
            {
                if m.seq.0 % 1_000_000 == seq % 1_000_000 {
                    eprintln!(
                        "{:>6} ms   delivered to {}",
                        self.now.duration_since(self.start).as_millis(),
                        self.nodes[to].name,
                    );
                }
            }
        }
        self.input(to, from, data);
        self.drive(to);
    }

    fn input(&mut self, to: usize, from: SocketAddr, data: Bytes) {
        let now = self.now;
        let Some(m) = self.nodes[to].machine.as_mut() else {
            return;
        };
        match m {
            Machine::Capture(c, _) => c.handle_input(
                now,
                capture::Input::Received {
                    from,
                    datagram: data,
                },
            ),
            Machine::Entry(m) => m.handle_input(
                now,
                braid_entrypoint::Input::Received {
                    from,
                    datagram: data,
                    node: true,
                },
            ),
            Machine::Set(m) => m.handle_input(
                now,
                set::Input::Received {
                    from,
                    datagram: data,
                    node: true,
                },
            ),
            Machine::Edge(m) => m.handle_input(
                now,
                edge::Input::Received {
                    from: Peer::Addr(from),
                    datagram: data,
                    node: true,
                },
            ),
            Machine::Viewer(s) => s.handle_input(
                now,
                session::Input::Received {
                    from: Some(from),
                    datagram: data,
                },
            ),
            Machine::Control(_) => {}
        }
    }

    /// Carries out everything node `i`'s machine asked for.
    fn drive(&mut self, i: usize) {
        let now = self.now;
        loop {
            let out = match self.nodes[i].machine.as_mut() {
                Some(Machine::Capture(c, _)) => match c.poll_output() {
                    Output::Event(capture::Event::Sent {
                        seq,
                        payload,
                        keyframe,
                    }) => {
                        let sent = Sent {
                            payload,
                            at: now,
                            session: self.session,
                            keyframe,
                            entered: false,
                        };
                        self.record.truth.insert(seq.0, sent);
                        if self.record.sessions.len() < self.session as usize {
                            self.record.sessions.push((seq.0, now));
                        }
                        continue;
                    }
                    Output::Event(_) => continue,
                    o => o.map_event(),
                },
                Some(Machine::Entry(m)) => m.poll_output().map_event(),
                Some(Machine::Set(m)) => m.poll_output().map_event(),
                Some(Machine::Edge(m)) => m.poll_output().map_event(),
                Some(Machine::Viewer(s)) => match s.poll_output() {
                    Output::Event(e) => {
                        self.viewer_event(i, e);
                        continue;
                    }
                    o => o.map_event(),
                },
                Some(Machine::Control(_)) | None => return,
            };
            match out {
                Output::Transmit(t) => {
                    if let Peer::Addr(to) = t.to {
                        self.send(i, to, t.datagram, t.data);
                    }
                }
                Output::Event(()) => {}
                Output::Timeout(t) => {
                    let n = &mut self.nodes[i];
                    if let Some(t) = t {
                        let t = t.max(now);
                        if n.wake.is_none_or(|w| t < w || w < now) {
                            n.wake = Some(t);
                            self.push(t, Ev::Wake { node: i });
                        }
                    }
                    break;
                }
            }
        }
        self.check_caps(i);
    }

    fn viewer_event(&mut self, i: usize, e: session::Event) {
        let v = self.viewers.iter().position(|x| *x == i).unwrap_or(0);
        let now = self.now;
        match e {
            session::Event::Write { seq, payload } => {
                let edge = match &self.nodes[i].machine {
                    Some(Machine::Viewer(s)) => {
                        s.edge().and_then(|e| self.by_addr.get(&e).copied())
                    }
                    _ => None,
                };
                self.record.writes[v].push((now, seq, edge.unwrap_or(usize::MAX)));
                // A viewer of a ladder has its continuity counters shifted to follow on
                // across changes of rendition (the client's one valid TS): only they may
                // differ.
                let ladder = !self.schedule.stream.ladder.is_empty();
                let ok = self.record.truth.get(&seq.0).is_some_and(|t| {
                    t.payload == payload || (ladder && same_but_continuity(&t.payload, &payload))
                });
                if !ok {
                    self.record.corrupt[v].push(seq);
                }
            }
            session::Event::Request { id, request } => self.call(i, id, request),
            session::Event::Probe { to, datagram } => {
                self.send(i, to, datagram, false);
            }
            session::Event::Stats => {}
            session::Event::Done(r) => {
                self.record.ended[v] = Some(r);
                if let Some(Machine::Viewer(s)) = &self.nodes[i].machine {
                    self.record.stats[v] = Some(s.stats().clone());
                }
            }
        }
    }

    /// A message leaves `from` for `to`: impaired, delayed, perhaps doubled.
    fn send(&mut self, i: usize, to: SocketAddr, data: Bytes, is_data: bool) {
        let Some(&j) = self.by_addr.get(&to) else {
            return;
        };
        if self.nodes[i].kind == Kind::Entry {
            // An entry point took it into the network.
            if let Some(t) =
                crate::ledger::media_seq(&data).and_then(|s| self.record.truth.get_mut(&s))
            {
                t.entered = true;
            }
        }
        if self.cut(i, j) {
            return;
        }
        let base = ms(self.schedule.topology.base_delay_ms);
        let now = self.now;
        let verdict = match self.link(i, j) {
            Some(imp) => imp.decide(now, data.len(), is_data),
            None => Verdict::Send {
                at: self.now,
                copies: 1,
            },
        };
        if let Some(seq) = self.trace {
            if let Ok(braid_core::wire::Message {
                body: braid_core::wire::Body::Nack(ranges),
                ..
            }) = self.codec.decode(data.clone())
            {
                if ranges.iter().any(|r| {
                    (0..u64::from(r.count))
                        .any(|k| r.first.plus(k).0 % 1_000_000 == seq % 1_000_000)
                }) {
                    eprintln!(
                        "{:>6} ms {} -> {}: NACK {:?}",
                        self.now.duration_since(self.start).as_millis(),
                        self.nodes[i].name,
                        self.nodes[j].name,
                        verdict,
                    );
                }
            }
            if let Ok(braid_core::wire::Message {
                body: braid_core::wire::Body::Notice { kind, value },
                ..
            }) = self.codec.decode(data.clone())
            {
                if value % 1_000_000 == seq % 1_000_000 {
                    eprintln!(
                        "{:>6} ms {} -> {}: notice {kind:?} {:?}",
                        self.now.duration_since(self.start).as_millis(),
                        self.nodes[i].name,
                        self.nodes[j].name,
                        verdict,
                    );
                }
            }
            if let Ok(braid_core::wire::Message {
                header,
                body: braid_core::wire::Body::Media(m),
            }) = self.codec.decode(data.clone())
            {
                if m.seq.0 % 1_000_000 == seq % 1_000_000 {
                    eprintln!(
                        "{:>6} ms {} -> {}: {:?}{}",
                        self.now.duration_since(self.start).as_millis(),
                        self.nodes[i].name,
                        self.nodes[j].name,
                        verdict,
                        if header.flags.contains(braid_core::wire::Flags::RETRANSMIT) {
                            " (repair)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        let random = matches!(verdict, Verdict::Drop(DropReason::Loss | DropReason::Burst));
        // A copy that arrives a second or more after the source sent it (a hung node
        // that resumed) cannot help anyone's buffer: it does not count as delivered.
        let fresh = crate::ledger::media_seq(&data)
            .and_then(|q| self.record.truth.get(&q))
            .is_none_or(|t| now.saturating_duration_since(t.at) < Duration::from_secs(1));
        let delivered = matches!(verdict, Verdict::Send { .. }) && fresh;
        self.record.ledger.note(i, j, &data, delivered, random);
        if let Verdict::Send { at, copies } = verdict {
            if copies > 1 {
                let copy = data.clone();
                self.push(
                    at + base,
                    Ev::Deliver {
                        to: j as u32,
                        from: i as u32,
                        data: copy,
                    },
                );
            }
            self.push(
                at + base,
                Ev::Deliver {
                    to: j as u32,
                    from: i as u32,
                    data,
                },
            );
        }
    }

    fn cut(&mut self, i: usize, j: usize) -> bool {
        if self.partitions.is_empty() {
            return false;
        }
        let now = self.now;
        self.partitions.retain(|p| p.2 > now);
        self.partitions
            .iter()
            .any(|&(a, b, _)| (a == i && b == j) || (a == j && b == i))
    }

    fn link(&mut self, i: usize, j: usize) -> Option<&mut Impairer> {
        if !self.links.contains_key(&(i, j)) {
            let (a, b) = (&self.nodes[i].name, &self.nodes[j].name);
            let rule = self
                .schedule
                .links
                .iter()
                .find(|r| matches(&r.from, a) && matches(&r.to, b));
            // A viewer's link from an edge under a rate cap: a token bucket with 300 ms of
            // queue on top of what the rule says.
            let cap = self
                .viewers
                .iter()
                .position(|v| *v == j)
                .filter(|_| self.nodes[i].kind == Kind::Edge)
                .and_then(|v| self.record.link_caps[v].last())
                .map(|(_, kbps)| *kbps)
                .filter(|k| *k > 0);
            let config = match (rule, cap) {
                (r, Some(kbps)) => Some(braid_core::impair::Config {
                    rate_bps: Some(kbps * 1000),
                    queue_ms: 300,
                    ..r.map(|r| r.impair.clone()).unwrap_or_default()
                }),
                (Some(r), None) => Some(r.impair.clone()),
                (None, None) => None,
            };
            let imp = config.map(|c| {
                Impairer::new(
                    c,
                    self.start,
                    (i as u64) << 20 | j as u64 ^ self.schedule.seed,
                )
            });
            self.links.insert((i, j), imp);
        }
        self.links.get_mut(&(i, j)).and_then(Option::as_mut)
    }

    fn fault(&mut self, f: usize) {
        let fault = self.schedule.faults[f].clone();
        let node = |w: &World, name: &str| w.find(name);
        match &fault.what {
            FaultKind::Kill { node: n } => {
                if let Some(i) = node(self, n) {
                    self.nodes[i].machine = None;
                }
            }
            FaultKind::Hang { node: n, for_ms } => {
                if let Some(i) = node(self, n) {
                    if self.nodes[i].running() {
                        self.hang(i, ms(*for_ms));
                    }
                }
            }
            FaultKind::Restart { node: n, down_ms } => {
                if let Some(i) = node(self, n) {
                    self.nodes[i].machine = None;
                    self.push(self.now + ms(*down_ms), Ev::FaultEnd(f));
                }
            }
            FaultKind::Partition { a, b, for_ms } => {
                if let (Some(a), Some(b)) = (node(self, a), node(self, b)) {
                    self.partitions.push((a, b, self.now + ms(*for_ms)));
                }
            }
            FaultKind::LinkRate { node: n, kbps } => {
                if let Some(v) = self.viewers.iter().position(|x| Some(*x) == node(self, n)) {
                    let i = self.viewers[v];
                    self.record.link_caps[v].push((self.now, *kbps));
                    // Its links from the edges take the new cap from their next packet.
                    for e in self.of_kind(Kind::Edge).collect::<Vec<_>>() {
                        self.links.remove(&(e, i));
                    }
                }
            }
            FaultKind::Drain { node: n, for_ms } => {
                if let Some(i) = node(self, n) {
                    for c in self.of_kind(Kind::Control).collect::<Vec<_>>() {
                        if let Some(Machine::Control(api)) = self.nodes[c].machine.as_mut() {
                            let _ = api.drain(100 + i as u64, true);
                        }
                    }
                    self.push(self.now + ms(*for_ms), Ev::FaultEnd(f));
                }
            }
        }
    }

    /// A frame of the source into capture `i` (a rendition of a ladder, or the one).
    fn frame(&mut self, now: Instant, i: usize) {
        let n = &mut self.nodes[i];
        if n.hung_until.is_some() {
            return;
        }
        let aligned = !self.schedule.stream.ladder.is_empty();
        if let Some(Machine::Capture(c, synth)) = n.machine.as_mut() {
            let wanted = c.wants_media();
            // An aligned source goes on with the clock: a frame not wanted is dropped.
            if wanted || aligned {
                let bytes = synth.next_frame();
                if !wanted {
                    return;
                }
                c.handle_input(
                    now,
                    capture::Input::Source {
                        bytes,
                        discontinuity: false,
                        rtp_lost: 0,
                    },
                );
                self.drive(i);
            }
        }
    }

    fn fault_end(&mut self, f: usize) {
        let fault = self.schedule.faults[f].clone();
        match &fault.what {
            FaultKind::Restart { node, .. } => {
                if let Some(i) = self.find(node) {
                    self.start_node(i);
                }
            }
            FaultKind::Drain { node, .. } => {
                if let Some(i) = self.find(node) {
                    for c in self.of_kind(Kind::Control).collect::<Vec<_>>() {
                        if let Some(Machine::Control(api)) = self.nodes[c].machine.as_mut() {
                            let _ = api.drain(100 + i as u64, false);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// A node reports its load to every control server, as its daemon's reporter does.
    fn report(&mut self, i: usize) {
        if self.nodes[i].machine.is_none() {
            return;
        }
        self.push(self.now + REPORT_EVERY, Ev::Report { node: i });
        if !self.nodes[i].running() {
            return;
        }
        let n = &self.nodes[i];
        let now = self.now;
        let (role, viewers, slow) = match &n.machine {
            Some(Machine::Edge(m)) => {
                let slow = m
                    .speeds(now)
                    .into_iter()
                    .filter(|v| v.slow)
                    .map(|v| braid_control::registry::SlowViewer {
                        client: v.client.0,
                        ip: match v.peer {
                            Peer::Addr(a) => Some(a.ip()),
                            Peer::Conn(_) => None,
                        },
                        stream: v.stream.0,
                        bps: v.bps,
                    })
                    .collect();
                (Role::Edge, m.viewers() as u64, slow)
            }
            Some(Machine::Set(_)) => (Role::Set, 0, Vec::new()),
            _ => return,
        };
        let report = Report {
            node: 100 + i as u64,
            role,
            addr: n.addr,
            quic: None,
            region: String::new(),
            capacity: 5000,
            cost_tier: 0,
            viewers,
            egress_bps: 0,
            cpu: 0.0,
            streams: Vec::new(),
            hls: None,
            slow,
            ladders: Vec::new(),
        };
        let delay = self.round_trip() / 2;
        let controls: Vec<usize> = self.of_kind(Kind::Control).collect();
        let mut drain = None;
        for c in controls {
            if self.cut(i, c) {
                continue;
            }
            // Reports are small and frequent: their delivery is not impaired, only
            // delayed; a hung or dead control server takes none.
            let now = self.now + delay;
            if !self.nodes[c].running() {
                continue;
            }
            if let Some(Machine::Control(api)) = self.nodes[c].machine.as_mut() {
                if let Ok(r) = api.report(now, report.clone()) {
                    drain = Some(drain.unwrap_or(false) | r.drain);
                }
            }
        }
        if let Some(drain) = drain {
            self.push(self.now + 2 * delay, Ev::ReportReply { node: i, drain });
        }
    }

    fn round_trip(&self) -> Duration {
        2 * ms(self.schedule.topology.base_delay_ms)
    }

    /// A viewer asks every control server at once.
    fn call(&mut self, viewer: usize, id: u64, request: Request) {
        let controls: Vec<usize> = self.of_kind(Kind::Control).collect();
        let c = self.calls.len();
        self.calls.push(Call {
            viewer,
            id,
            request,
            pending: controls.clone(),
            errors: Vec::new(),
            done: false,
        });
        if controls.is_empty() {
            self.finish_call(c);
            return;
        }
        let half = self.round_trip() / 2;
        for control in controls {
            self.push(self.now + half, Ev::Call { control, call: c });
            self.push(
                self.now + HTTP_TIMEOUT,
                Ev::CallTimeout { call: c, control },
            );
        }
    }

    fn answer_call(&mut self, control: usize, call: usize) {
        let viewer = self.calls[call].viewer;
        if self.cut(viewer, control) {
            return;
        }
        let now = self.now;
        let unix = EPOCH_UNIX_MS / 1000 + now.duration_since(self.start).as_secs();
        let peer = self.nodes[viewer].addr.ip();
        let n = &mut self.nodes[control];
        if n.machine.is_none() {
            // Connection refused: the answer is an error, at once.
            let name = n.name.clone();
            self.take_reply_from(call, control, Err(format!("{name}: connection refused")));
            return;
        }
        if n.hung_until.is_some() {
            // A hung server never answers; the client's timeout fails the call.
            return;
        }
        let Some(Machine::Control(api)) = n.machine.as_mut() else {
            return;
        };
        let request = self.calls[call].request.clone();
        let result = match request {
            Request::Assign => Some(api.assign(
                now,
                unix,
                &braid_control::api::AssignRequest {
                    stream: STREAM.0,
                    token: "",
                    region: "",
                    peer,
                    client: 0,
                },
            )),
            Request::Switch {
                failed,
                reason,
                last_seq,
                prefer,
            } => {
                let req = braid_control::SwitchRequest {
                    client: viewer as u64,
                    stream: STREAM.0,
                    failed,
                    reason,
                    last_seq,
                    token: String::new(),
                    region: String::new(),
                    prefer,
                };
                Some(api.switch(now, unix, &req, peer))
            }
            Request::Feedback { .. } => None,
        };
        let half = self.round_trip() / 2;
        self.push(
            self.now + half,
            Ev::Reply {
                call,
                control,
                result,
            },
        );
    }

    fn take_reply(
        &mut self,
        call: usize,
        control: usize,
        result: Option<Result<registry::Assignment, ApiError>>,
    ) {
        if !self.calls[call].pending.contains(&control) {
            // Timed out already.
            return;
        }
        self.calls[call].pending.retain(|c| *c != control);
        let done = self.calls[call].done;
        match result {
            None => {}
            Some(Ok(a)) if !done => {
                self.calls[call].done = true;
                self.answer(call, Ok(convert(a)));
            }
            Some(Err(e)) if e.status == 403 && !done => {
                self.calls[call].done = true;
                self.answer(call, Err(Refusal::Refused(e.text)));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => self.calls[call].errors.push(e.text),
        }
        if self.calls[call].pending.is_empty() {
            self.finish_call(call);
        }
    }

    fn take_reply_from(&mut self, call: usize, control: usize, result: Result<(), String>) {
        self.calls[call].pending.retain(|c| *c != control);
        if let Err(e) = result {
            self.calls[call].errors.push(e);
        }
        if self.calls[call].pending.is_empty() {
            self.finish_call(call);
        }
    }

    /// Every control server failed: the viewer hears so.
    fn finish_call(&mut self, call: usize) {
        if self.calls[call].done {
            return;
        }
        self.calls[call].done = true;
        let text = format!(
            "no control server answered: {}",
            self.calls[call].errors.join("; ")
        );
        if matches!(self.calls[call].request, Request::Feedback { .. }) {
            return;
        }
        self.answer(call, Err(Refusal::Failed(text)));
    }

    fn answer(&mut self, call: usize, result: Result<Assignment, Refusal>) {
        let (viewer, id) = (self.calls[call].viewer, self.calls[call].id);
        if !self.nodes[viewer].running() {
            return;
        }
        let now = self.now;
        if let Some(Machine::Viewer(s)) = self.nodes[viewer].machine.as_mut() {
            s.handle_input(now, session::Input::Answer { id, result });
        }
        self.drive(viewer);
    }

    /// Checks a node's state against its caps (every 100 ms of its activity).
    fn check_caps(&mut self, i: usize) {
        let now = self.now;
        let n = &mut self.nodes[i];
        if n.checked
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        n.checked = Some(now);
        let n = &self.nodes[i];
        // One stream, or a ladder's renditions.
        let most = self.schedule.stream.ladder.len().max(1);
        let over = match &n.machine {
            Some(Machine::Edge(m)) => {
                let (streams, viewers, held) = m.footprint();
                (streams > most || viewers > 5000 || held > 20_000)
                    .then(|| format!("streams {streams}, viewers {viewers}, held {held}"))
            }
            Some(Machine::Set(m)) => {
                let (streams, subs, held) = m.footprint();
                (streams > most || subs > 1000 || held > 20_000)
                    .then(|| format!("streams {streams}, subscribers {subs}, held {held}"))
            }
            Some(Machine::Entry(m)) => {
                (m.publishers() > 16).then(|| format!("publishers {}", m.publishers()))
            }
            _ => None,
        };
        if let Some(what) = over {
            if self.record.over_caps.len() < 100 {
                self.record.over_caps.push((n.name.clone(), what));
            }
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// A control server's answer as the client reads it.
fn convert(a: registry::Assignment) -> Assignment {
    let set = |s: registry::Set| match s {
        registry::Set::Even => "even".to_string(),
        registry::Set::Odd => "odd".to_string(),
    };
    Assignment {
        primary: a.primary,
        primary_set: set(a.primary_set),
        secondary_set: set(a.secondary_set),
        candidates: a
            .candidates
            .into_iter()
            .map(|c| Candidate {
                addr: c.addr,
                quic: c.quic,
                set: set(c.set),
                priority: c.priority,
                weight: c.weight,
            })
            .collect(),
    }
}

trait MapEvent {
    fn map_event(self) -> Output<()>;
}

impl<E> MapEvent for Output<E> {
    fn map_event(self) -> Output<()> {
        match self {
            Output::Transmit(t) => Output::Transmit(t),
            Output::Event(_) => Output::Event(()),
            Output::Timeout(t) => Output::Timeout(t),
        }
    }
}

/// Whether two TS payloads are the same but for their packets' continuity counters.
fn same_but_continuity(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.len() % 188 == 0
        && a.chunks_exact(188)
            .zip(b.chunks_exact(188))
            .all(|(x, y)| x[..3] == y[..3] && x[3] & 0xf0 == y[3] & 0xf0 && x[4..] == y[4..])
}
