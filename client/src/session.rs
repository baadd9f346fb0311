//! The viewer's session, sans-IO: which edge to watch, the watch protocol, the playout
//! buffer with its repairs, the detectors, and switching without loss.
//!
//! [`Session`] has the shape of every Braid machine (`braid_core::node`): feed it
//! [`Input`]s and timeouts, then drain [`Session::poll_output`] until it returns a
//! timeout. It asks its owner to talk to the control servers ([`Request`], answered
//! with [`Input::Answer`]), to write the stream ([`Event::Write`]) and to send to edges;
//! the owner (the `braid-client` daemon, or the simulator) never decides anything.
//!
//! - **Watch**: a watch message starts the stream (at the latest keyframe, or at a
//!   sequence number to resume) and is repeated every 250 ms or 32 packets as the lease
//!   refresh and the acknowledgement that opens the edge's flow window.
//! - **Buffer**: packets pass through a single-path [`merge::Buffer`]: reordered packets
//!   are put back in order, a missing one is asked for again (over datagrams), and given
//!   up as a gap after the buffer's length. Writing starts once the buffer holds its
//!   length of stream (by RTP timestamp): at once when the edge's burst from its latest
//!   keyframe spans it, else when the first packet has waited that long.
//! - **Switching**: the detectors' verdict (after the new edge's catch-up), a drain
//!   signal or a refusal asks a control server for an edge of the other set (or, with
//!   none answering in time, takes the best candidate of the other set from the last
//!   assignment); the new edge is watched from the first sequence number not yet written,
//!   and over datagrams the old edge is kept until the new one delivers (make before
//!   break). The output goes on byte for byte, and the buffer keeps writing while the
//!   control server thinks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_core::detect::{self, Detector, Observation, Output as DetectOutput};
use braid_core::merge::{self, Output as MergeOutput};
use braid_core::node::{Outbox, Output, Peer, WallClock};
use braid_core::wire::{
    Body, Codec, Cookie, Flags, Keepalive, Media, Message, NoticeKind, SeqRange, Watch, WatchStart,
};
use braid_core::{Bitrate, DataSize, NodeId, PathId, SeqNo, StreamId};
use bytes::Bytes;
use serde::Serialize;

use braid_core::playout::{Placement, PlacementConfig, Playout, Prefer, Tier};
use braid_core::queueing::QueueDelay;

use crate::control::Assignment;

/// Why a buffer-aware move is made: the buffer is full enough for a cheap edge, or too
/// low for one.
const BUFFER_HIGH: &str = "buffer_high";
const BUFFER_LOW: &str = "buffer_low";

/// Acknowledge at least this often.
const ACK_EVERY: Duration = Duration::from_millis(250);
/// ... or after this many packets.
const ACK_PACKETS: u32 = 32;
/// Stats once a second.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Measures are judged from this long after a start or switch (the catch-up burst).
const SETTLE: Duration = Duration::from_secs(1);
/// How long probes wait for their answers.
const PROBE_WAIT: Duration = Duration::from_millis(300);
/// After a switch for the quality of reception (rate, gaps, disorder), the next one waits
/// at least this long, doubled for each such switch in the last [`DAMPING_MEMORY`]: when
/// every edge looks the same, the trouble is the viewer's own network and moving again
/// does not help.
const QUALITY_DWELL: Duration = Duration::from_secs(2);
/// How long quality switches are remembered for damping.
const DAMPING_MEMORY: Duration = Duration::from_secs(60);
/// Longest wait between two quality switches.
const MAX_DWELL: Duration = Duration::from_secs(60);
/// Make before break lasts at most this long after the new edge's first packet.
const LEAVE_AT_MOST: Duration = Duration::from_secs(2);
/// Watches go at most this often while the *joined* notice is awaited.
const EARLY_WATCH: Duration = Duration::from_millis(50);
/// Packets from an edge just left are taken this long after (they were in flight).
const LEFT_GRACE: Duration = Duration::from_secs(1);
/// An edge silent this long is gone (a live one sends media, or a keepalive within
/// 160 ms): the holes it was repairing are held for the edge that resumes the stream.
const EDGE_GONE: Duration = Duration::from_millis(300);
/// A viewer on a rendition above its ladder's lowest that receives too little, or with
/// holes, gives its edge this long to move it down before it leaves for another edge:
/// a link too slow for the rendition is the edge's to answer (its meter, then the next
/// keyframe), and a new edge would start measuring afresh, at the same rendition.
const STEP_DOWN_GRACE: Duration = Duration::from_millis(4_500);
/// A verdict of a kind not said for this long (its trouble went away; one that lasts is
/// said again within a second or so) starts a new grace: a passing one must not use up
/// the edge's time to answer a later one.
const GRACE_LAPSE: Duration = Duration::from_secs(2);
/// A cold output whose first packet is no keyframe, with none seen yet (the one the edge
/// started it at lost for good, and its word of where that was too), skips to the next
/// keyframe for this long at most: a stream may flag none.
const COLD_KEYFRAME_WAIT: Duration = Duration::from_secs(3);
/// How long a move down for the link's speed is told to the edges it switches to (a
/// link's rate changes; an edge that finds room moves it up and ends it sooner).
const FITS_FOR: Duration = Duration::from_secs(60);
/// How long after a failed assignment it is asked for again.
const RETRY_ASSIGN: Duration = Duration::from_millis(250);
/// The lease asked for in every watch.
const LEASE_MS: u32 = 3000;

/// What the session decides with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The stream watched.
    pub stream: StreamId,
    /// What it asks of a ladder's renditions (a ceiling, a pin), if anything.
    pub policy: Option<braid_core::speed::Policy>,
    /// This viewer's id.
    pub id: NodeId,
    /// The viewer's token, as given.
    pub token: Bytes,
    /// Media comes as datagrams (UDP, QUIC: repairs by NACK, make before break) rather
    /// than over a TCP stream.
    pub datagrams: bool,
    /// The playout buffer: how long a missing packet is waited for.
    pub buffer: Duration,
    /// Start at this sequence number instead of the latest keyframe.
    pub resume_seq: Option<SeqNo>,
    /// End after this long (`None`: never).
    pub duration: Option<Duration>,
    /// Give up if no packet arrived within this long.
    pub start_timeout: Duration,
    /// Whether control servers are configured (else `edge` is watched).
    pub control: bool,
    /// The edge given on the command line.
    pub edge: Option<SocketAddr>,
    /// Time the candidates and watch the fastest of the primary's set.
    pub probe: bool,
    /// Ask again this often.
    pub reask: Option<Duration>,
    /// Move on a re-ask when a candidate's weight beats the current edge's by this share.
    pub better_margin: f64,
    /// The detectors' thresholds.
    pub detect: detect::Config,
    /// How long an answer from the control servers is waited for.
    pub control_timeout: Duration,
    /// Buffer-aware moves between fast and cheap edges (`None`: never; they need a
    /// control server).
    pub placement: Option<PlacementConfig>,
}

/// A request for the control servers.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// An assignment (at start, and every re-ask).
    Assign,
    /// An edge of the other set.
    Switch {
        /// The edge left.
        failed: SocketAddr,
        /// Why.
        reason: String,
        /// The last sequence number the viewer has.
        last_seq: u64,
        /// The kind of edge wanted (a buffer-aware move wants a cheap or a fast one).
        prefer: Prefer,
    },
    /// Probe timings (no answer expected).
    Feedback {
        /// Round trips measured, in milliseconds.
        probes: Vec<(SocketAddr, f64)>,
    },
}

/// Why a request got no assignment.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// A control server refused the viewer (its token): no point asking again.
    Refused(String),
    /// No control server answered, or none had an edge.
    Failed(String),
}

/// What the owner feeds in.
#[derive(Debug, Clone)]
pub enum Input {
    /// A message from an edge: `from` names it by its UDP address (`None` over TCP: the
    /// edge watched).
    Received {
        /// Which edge.
        from: Option<SocketAddr>,
        /// The message.
        datagram: Bytes,
    },
    /// A renewed token: the watches carry it from now on.
    Token(Bytes),
    /// The control servers' answer to request `id`.
    Answer {
        /// The request answered.
        id: u64,
        /// The assignment, or why there is none.
        result: Result<Assignment, Refusal>,
    },
}

/// What the session asks of its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Ask the control servers; answer with [`Input::Answer`] and this `id` (none is
    /// expected for feedback).
    Request {
        /// Names the answer.
        id: u64,
        /// What to ask.
        request: Request,
    },
    /// Send a probe to a candidate edge, as plain UDP to its UDP address.
    Probe {
        /// The candidate.
        to: SocketAddr,
        /// The probe.
        datagram: Bytes,
    },
    /// Write these bytes of the stream (sequence number `seq`).
    Write {
        /// The packet's sequence number.
        seq: SeqNo,
        /// Its payload (MPEG-TS).
        payload: Bytes,
    },
    /// A second passed: the stats are fresh.
    Stats,
    /// The session is over: `Ok` at the end of its duration, `Err` with a sentence.
    Done(Result<(), String>),
}

/// One switch, as the JSON stats record it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SwitchStat {
    /// Why: a detector's reason, `drain`, `refused`, or `better`.
    pub reason: String,
    /// The edge left.
    pub from: String,
    /// The edge taken.
    pub to: String,
    /// Whether a control server chose it (else the client took a secondary candidate).
    pub via_control: bool,
    /// Milliseconds from detection to the first packet from the new edge.
    pub detect_to_first_packet_ms: Option<u64>,
    /// Sequence number resumed at.
    pub resumed_at: u64,
    /// Packets given up between detection and two seconds after the switch.
    pub lost: Option<u64>,
    /// Wall clock at detection, ms since the Unix epoch (to line up with other logs).
    pub detected_unix_ms: u64,
    /// Wall clock at the first packet from the new edge, ms since the Unix epoch.
    pub first_packet_unix_ms: Option<u64>,
}

/// What the viewer received; written as JSON.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    /// The edge now.
    pub edge: String,
    /// UDP or TCP.
    pub transport: String,
    /// Packets written out.
    pub packets: u64,
    /// Payload bytes written out.
    pub bytes: u64,
    /// First sequence number written.
    pub first_seq: Option<u64>,
    /// Last sequence number written.
    pub last_seq: Option<u64>,
    /// Sequence numbers given up after the buffer that no edge said it would skip:
    /// losses.
    pub gaps: u64,
    /// Packets not written because the edge said this viewer will not get them (it fell
    /// behind the ring, or resumed past what the edge held, or the start was lost), not
    /// counted in `gaps`. Every packet not written is in one or the other.
    pub skipped: u64,
    /// Skip events.
    pub skips: u64,
    /// Copies dropped as duplicates or too late.
    pub late_or_duplicate: u64,
    /// Copies of a source session left behind (dropped).
    pub stale: u64,
    /// Sessions left behind taken up again without the edge's word: it moved the viewer
    /// back to a rendition it was on before, and the notice saying so was lost.
    pub revived: u64,
    /// New source sessions followed (the capture started again).
    pub sessions: u64,
    /// Asks for a missing packet sent to the edge.
    pub nacks: u64,
    /// Missing packets that the edge sent again in time.
    pub repaired: u64,
    /// Packets that failed to decode.
    pub malformed: u64,
    /// Media from an edge this viewer no longer watches, or of a rendition the edge it
    /// is leaving moved it to after it left (dropped).
    pub stray: u64,
    /// Milliseconds from the first watch message to the first packet received.
    pub join_ms: Option<u64>,
    /// Milliseconds from the first watch message to the first packet written.
    pub first_output_ms: Option<u64>,
    /// The longest time between two writes once output started, ms: what a player's own
    /// buffer must cover not to stall (a switch, a repair, a pause of the stream).
    pub max_output_gap_ms: u64,
    /// Bit rate written out over the last second.
    pub bitrate_bps: u64,
    /// Packets held in the buffer.
    pub buffered: usize,
    /// Every switch.
    pub switches: Vec<SwitchStat>,
    /// The rendition now, when the stream is one of a ladder's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rendition: Option<RenditionStat>,
    /// Every change of rendition (the first 256), the first one where it started.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub renditions: Vec<RenditionStat>,
    /// TS continuity counters shifted to follow on across changes of rendition.
    #[serde(skip_serializing_if = "is_zero")]
    pub continuity_rewritten: u64,
    /// The player's buffer as estimated (media written less time played), ms.
    pub playout_ms: Option<u64>,
    /// Times that buffer would have run dry (the player stalled).
    pub underruns: u64,
    /// Where buffer-aware moves have placed the viewer: `fast` or `cheap` (absent when
    /// they are off).
    pub placement: Option<Tier>,
    /// Whether this is the last line.
    pub done: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A rendition, as its edge told it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RenditionStat {
    /// Its index in the ladder, lowest rate first.
    pub index: u8,
    /// Its nominal rate, kbit/s.
    pub kbps: u32,
    /// Why the edge chose it: join, down, up, policy.
    pub reason: String,
    /// Milliseconds since the session started: when its packets began to come, or when
    /// the edge's notice of it came if that was first.
    pub at_ms: u64,
}

/// A switch decided and not yet carried out: waiting for the control servers.
#[derive(Debug, Clone)]
struct PendingSwitch {
    reason: String,
    detected: Instant,
    /// The request asked, and until when its answer is waited for.
    asked: Option<(u64, Instant)>,
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first assignment (request id, until when).
    Assigning(u64, Instant),
    /// No control server answered: asking again then.
    Retrying(Instant),
    /// Probing the candidates until then.
    Probing(Instant),
    /// Watching an edge.
    Watching,
    /// Over.
    Done,
}

/// A packet in the playout buffer, with what starting the output needs to know.
#[derive(Debug, Clone)]
struct Held {
    payload: Bytes,
    /// It starts a keyframe.
    keyframe: bool,
    /// Its source session.
    ssrc: u32,
}

/// The last few ranges of packets the edge said a viewer will not get.
#[derive(Debug, Default)]
struct ToldSkipped(Vec<(SeqNo, u64)>);

impl ToldSkipped {
    fn add(&mut self, first: SeqNo, count: u64) {
        if self.0.len() >= 8 {
            self.0.remove(0);
        }
        self.0.push((first, count));
    }

    /// How many of `count` numbers from `first` lie in the ranges told.
    fn overlap(&self, first: SeqNo, count: u64) -> u64 {
        let end = first.0.saturating_add(count);
        let n: u64 = self
            .0
            .iter()
            .map(|(f, c)| {
                end.min(f.0.saturating_add(*c))
                    .saturating_sub(first.0.max(f.0))
            })
            .sum();
        n.min(count)
    }
}

/// The viewer's state machine.
pub struct Session {
    config: Config,
    clock: WallClock,
    out: Outbox<Event>,
    phase: Phase,
    now: Instant,
    started: Instant,
    next_id: u64,
    assignment: Option<Assignment>,
    /// The edge watched (its UDP address).
    edge: Option<SocketAddr>,
    /// During a switch over datagrams, the edge being left (until the new one delivers).
    leaving: Option<SocketAddr>,
    /// Each edge's address-validation cookie for this viewer.
    cookies: HashMap<SocketAddr, Cookie>,
    /// The new edge's first packet during make before break, and when it came.
    new_edge_from: Option<(SeqNo, Instant)>,
    /// The edge just left, and when: its packets in flight are still taken.
    left: Option<(SocketAddr, Instant)>,
    start: (WatchStart, SeqNo),
    buffer: merge::Buffer<Held>,
    /// How long the edge's packets wait in a queue on the way (its asks are repeated no
    /// sooner than that after their round trip).
    queue: QueueDelay,
    detector: Detector,
    stats: Stats,
    got_from_edge: bool,
    acked: SeqNo,
    since_ack: u32,
    /// Media bytes received from each edge watched (the current one and the one being
    /// left), told back to it in watches.
    received_from: HashMap<SocketAddr, u64>,
    /// The stream (rendition) its edge serves it now, and the one before (holes of the
    /// session being left are asked for under it).
    stream_now: StreamId,
    stream_before: StreamId,
    /// Sessions that are renditions of its ladder (it may come back to one).
    rendition_ssrcs: Vec<u32>,
    /// The session of the rendition its edge last moved it to.
    moved_to: Option<u32>,
    continuity: crate::continuity::Continuity,
    next_ack: Instant,
    next_report: Instant,
    last_report: (Instant, u64),
    grace_until: Instant,
    judge_from: Instant,
    next_reask: Option<Instant>,
    reask_id: Option<(u64, Instant)>,
    pending: Option<PendingSwitch>,
    /// (switch index, detected at, gaps then), to fill in `lost` later.
    switch_marks: Vec<(usize, Instant, u64)>,
    /// The source session (RTP SSRC) being played, the one being left, and sessions left
    /// behind.
    ssrc: Option<u32>,
    leaving_session: Option<u32>,
    retired: Vec<u32>,
    /// When the buffer last moved to a new session.
    ssrc_changed_at: Option<Instant>,
    /// Where the edge said a new session starts.
    session_start: Option<SeqNo>,
    /// The source session of the last packet written.
    written_ssrc: Option<u32>,
    /// Starting past the first keyframe, packets are skipped up to the next one.
    to_keyframe: bool,
    /// Since when, with no keyframe seen yet (see [`COLD_KEYFRAME_WAIT`]).
    to_keyframe_since: Option<Instant>,
    /// Whether the stream flags keyframes at all (without, a cold start skips for one
    /// [`COLD_KEYFRAME_WAIT`] at most).
    keyframes_seen: bool,
    /// Switch requests whose answer is not waited for (the viewer already moved).
    told: Vec<u64>,
    /// Whether the edge said where it started this viewer (its *joined* notice).
    joined_told: bool,
    /// Before the first write: the RTP timestamp of the first packet received and the
    /// most stream time received after it (90 kHz). Writing starts once the buffer holds
    /// the configured duration of stream, not after waiting that long.
    prefill: Option<(u32, u32)>,
    /// When the last packet was written.
    last_write: Option<Instant>,
    /// Where the edge said the source's last session ended (the *ended* notice).
    ended_at: Option<SeqNo>,
    /// Packets the edge said this viewer will not get (skipped, missed).
    told_skipped: ToldSkipped,
    /// Where the edge watched said it started this viewer.
    joined_at: Option<SeqNo>,
    /// When a watch last went early to ask for the *joined* notice again.
    early_watch: Option<Instant>,
    /// Recent switches for the quality of reception, for damping.
    quality_switches: Vec<Instant>,
    /// Until when a quality verdict of each kind waits for the edge to move this viewer
    /// down a rendition ([`STEP_DOWN_GRACE`]): each kind has its own, so a link capped
    /// while the viewer sees, say, disorder its edge cannot mend still gives the edge its
    /// whole time to answer the cap; and when that kind was last said
    /// ([`GRACE_LAPSE`]).
    step_down_grace: Vec<(&'static str, Instant, Instant)>,
    /// The nominal rate, kbit/s, of the rendition an edge last moved it down to for its
    /// link's speed, and when ([`FITS_FOR`]): its watches say it, so an edge it switches
    /// to starts it no higher.
    fits_kbps: Option<(u32, Instant)>,
    /// The last *rendition* notice taken (its value's lower 32 bits): its watches say
    /// it, so its edge repeats a newer one it lost.
    rendition_took: Option<u32>,
    /// Probes sent: candidate and when.
    probes: Vec<(SocketAddr, Option<f64>)>,
    probe_started: Instant,
    /// The player's buffer, estimated.
    playout: Playout,
    /// Buffer-aware moves, when on.
    placement: Option<Placement>,
}

impl Session {
    /// A session starting at `now`: it asks for an assignment, or watches the configured
    /// edge at once.
    pub fn new(
        config: Config,
        codec: Codec,
        clock: WallClock,
        transport: &str,
        now: Instant,
    ) -> Result<Session, braid_core::Error> {
        let window = config.buffer;
        let stream = config.stream;
        let buffer = merge::Buffer::new(merge::Config {
            reorder_window: window,
            nack: config.datagrams,
            nack_delay: (window / 10).max(Duration::from_millis(5)),
            nack_retry: (window / 5).max(Duration::from_millis(10)),
            // The playout buffer is the viewer's to size: a hole waits all of it.
            adaptive_window: false,
            // Its edge gone (restarting, or dead until the viewer moves), the holes it
            // was repairing wait for the edge that resumes the stream. A live edge
            // says something every 160 ms at most (media, or keepalives while the
            // stream pauses).
            hold_in_silence: Some(EDGE_GONE),
            ..merge::Config::default()
        })?;
        let mut detector = Detector::new(config.detect.clone())?;
        detector.reset(now);
        let grace = config.start_timeout.min(Duration::from_secs(3));
        let start = match config.resume_seq {
            Some(s) => (WatchStart::Seq, s),
            None => (WatchStart::Keyframe, SeqNo(0)),
        };
        let mut s = Session {
            clock,
            out: Outbox::new(codec),
            phase: Phase::Done,
            now,
            started: now,
            next_id: 1,
            assignment: None,
            edge: None,
            leaving: None,
            cookies: HashMap::new(),
            new_edge_from: None,
            left: None,
            start,
            buffer,
            queue: QueueDelay::new(braid_core::wire::rtp::CLOCK_RATE_MP2T),
            detector,
            stats: Stats {
                transport: transport.to_owned(),
                ..Stats::default()
            },
            got_from_edge: false,
            acked: SeqNo(0),
            since_ack: 0,
            received_from: HashMap::new(),
            stream_now: stream,
            stream_before: stream,
            rendition_ssrcs: Vec::new(),
            moved_to: None,
            continuity: crate::continuity::Continuity::default(),
            next_ack: now + ACK_EVERY,
            next_report: now + REPORT_EVERY,
            last_report: (now, 0),
            grace_until: now + grace,
            judge_from: now + SETTLE,
            next_reask: None,
            reask_id: None,
            pending: None,
            switch_marks: Vec::new(),
            quality_switches: Vec::new(),
            step_down_grace: Vec::new(),
            fits_kbps: None,
            rendition_took: None,
            told: Vec::new(),
            joined_told: false,
            prefill: None,
            last_write: None,
            ended_at: None,
            told_skipped: ToldSkipped::default(),
            joined_at: None,
            early_watch: None,
            ssrc: None,
            leaving_session: None,
            retired: Vec::new(),
            ssrc_changed_at: None,
            session_start: None,
            written_ssrc: None,
            to_keyframe: false,
            to_keyframe_since: None,
            keyframes_seen: false,
            probes: Vec::new(),
            probe_started: now,
            playout: Playout::new(),
            placement: config
                .placement
                .filter(|_| config.control)
                .map(|c| Placement::new(c, now)),
            config,
        };
        s.stats.placement = s.placement.as_ref().map(Placement::tier);
        if s.config.control {
            let id = s.request(Request::Assign);
            s.phase = Phase::Assigning(id, now + s.config.control_timeout);
        } else if let Some(e) = s.config.edge {
            s.watch_first(e);
        } else {
            s.finish(Err("no edge to watch".into()));
        }
        Ok(s)
    }

    /// What the viewer received so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The edge watched, if any yet.
    pub fn edge(&self) -> Option<SocketAddr> {
        self.edge
    }

    /// The last assignment from a control server.
    pub fn assignment(&self) -> Option<&Assignment> {
        self.assignment.as_ref()
    }

    /// Ends the session: leaves the edge at once rather than let its lease lapse, and
    /// marks the stats final.
    pub fn close(&mut self) {
        if let Some(e) = self.edge {
            self.send(
                e,
                Body::Unsubscribe {
                    node: self.config.id,
                },
            );
        }
        self.stats.buffered = self.buffer.held();
        self.stats.done = true;
        self.phase = Phase::Done;
    }

    /// Takes one input.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.now = now;
        if self.phase == Phase::Done {
            return;
        }
        match input {
            Input::Received { from, datagram } => self.handle_message(now, from, datagram),
            Input::Answer { id, result } => self.handle_answer(now, id, result),
            Input::Token(t) => self.config.token = t,
        }
        self.step(now);
    }

    /// Runs what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.phase == Phase::Done {
            return;
        }
        if let Some(d) = self.config.duration {
            if now >= self.started + d {
                // A run that ends before any stream came did not do its job, whichever
                // of its limits came first.
                let r = match self.stats.join_ms {
                    Some(_) => Ok(()),
                    None => Err(format!(
                        "no stream came within the {:.1} s run (from edge {}): is stream {} published?",
                        d.as_secs_f64(),
                        self.edge.map_or("none".into(), |e| e.to_string()),
                        self.config.stream.0
                    )),
                };
                self.finish(r);
                return;
            }
        }
        match self.phase {
            Phase::Assigning(_, until) if now >= until => {
                self.assigned(
                    now,
                    Err(Refusal::Failed("no control server answered in time".into())),
                );
            }
            Phase::Probing(until) if now >= until => self.probed(now),
            Phase::Retrying(at) if now >= at => {
                let id = self.request(Request::Assign);
                self.phase = Phase::Assigning(id, now + self.config.control_timeout);
            }
            _ => {}
        }
        if self.stats.join_ms.is_none() && now >= self.started + self.config.start_timeout {
            let edge = self.edge.map_or("none".into(), |e| e.to_string());
            self.finish(Err(format!(
                "no stream from edge {edge} within {:.1} s (is stream {} published, and the edge reachable over {}?)",
                self.config.start_timeout.as_secs_f64(),
                self.config.stream.0,
                self.stats.transport
            )));
            return;
        }
        if now >= self.next_ack {
            self.next_ack = now + ACK_EVERY;
            self.send_ack();
        }
        if now >= self.next_report {
            self.next_report = now + REPORT_EVERY;
            self.report(now);
        }
        if self.reask_id.is_some_and(|(_, until)| now >= until) {
            self.reask_id = None;
        }
        if let Some(p) = &self.pending {
            if p.asked.is_some_and(|(_, until)| now >= until) {
                if matches!(p.reason.as_str(), BUFFER_HIGH | BUFFER_LOW) {
                    self.placement_refused(now, "no control server answered in time");
                } else {
                    tracing::warn!(
                        "no control server answered the switch in time: going to the secondary set directly"
                    );
                    self.carry_out_switch(now, None);
                }
            }
        }
        self.detector.handle_timeout(now);
        self.buffer.handle_timeout(now);
        self.step(now);
    }

    /// The next thing to do; [`Output::Timeout`] when there is nothing.
    pub fn poll_output(&mut self) -> Output<Event> {
        if let Some(o) = self.out.pop() {
            return o;
        }
        if self.phase == Phase::Done {
            return Output::Timeout(None);
        }
        let mut t = self.next_ack.min(self.next_report);
        let mut at = |d: Option<Instant>| {
            if let Some(d) = d {
                t = t.min(d);
            }
        };
        at(self.config.duration.map(|d| self.started + d));
        at(self
            .stats
            .join_ms
            .is_none()
            .then(|| self.started + self.config.start_timeout));
        at(self.buffer.next_timeout());
        at(self.next_reask);
        at(self.reask_id.map(|(_, u)| u));
        at(self.pending.as_ref().and_then(|p| p.asked.map(|(_, u)| u)));
        match self.phase {
            Phase::Assigning(_, u) | Phase::Probing(u) | Phase::Retrying(u) => at(Some(u)),
            _ => {}
        }
        if let DetectOutput::Timeout(d) = self.detector.poll_output() {
            at(d);
        }
        Output::Timeout(Some(t))
    }

    fn request(&mut self, request: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.out.event(Event::Request { id, request });
        id
    }

    fn finish(&mut self, result: Result<(), String>) {
        if self.phase == Phase::Done {
            return;
        }
        self.stats.buffered = self.buffer.held();
        self.out.event(Event::Done(result));
        self.phase = Phase::Done;
    }

    /// Its edge moves it to another rendition of its ladder (or says which it starts
    /// on): that rendition's session is one it may come back to, not a stale one, and
    /// the output's continuity counters follow on across the change.
    fn rendition(&mut self, now: Instant, value: u64) {
        let n = braid_core::wire::RenditionNotice::unpack(value);
        self.rendition_took = Some(value as u32);
        self.continuity.start();
        if n.ssrc != 0 {
            self.moved_to = Some(n.ssrc);
            self.retired.retain(|s| *s != n.ssrc);
            if !self.rendition_ssrcs.contains(&n.ssrc) {
                if self.rendition_ssrcs.len() >= 16 {
                    self.rendition_ssrcs.remove(0);
                }
                self.rendition_ssrcs.push(n.ssrc);
            }
        }
        let reason = braid_core::speed::Reason::from_u8(n.reason)
            .map_or("unknown", |r| r.as_str())
            .to_owned();
        // Dated from when its packets began to come, if they came first (the notice and
        // its repeats may be lost on the very link too slow for the rendition left).
        let last_at = self.stats.renditions.last().map(|r| r.at_ms);
        let began = self
            .ssrc_changed_at
            .filter(|_| n.ssrc != 0 && self.ssrc == Some(n.ssrc))
            .map(|t| t.duration_since(self.started).as_millis() as u64)
            .filter(|t| last_at.is_some_and(|last| *t > last));
        let stat = RenditionStat {
            index: n.index,
            kbps: n.kbps,
            reason,
            at_ms: began.unwrap_or(now.duration_since(self.started).as_millis() as u64),
        };
        // The edge repeats its notices: one change is one entry.
        let same = |a: &RenditionStat| a.index == stat.index && a.reason == stat.reason;
        if self.stats.rendition.as_ref().is_some_and(same) {
            return;
        }
        match braid_core::speed::Reason::from_u8(n.reason) {
            Some(braid_core::speed::Reason::Down) => self.fits_kbps = Some((n.kbps, now)),
            Some(braid_core::speed::Reason::Up) => self.fits_kbps = None,
            _ => {}
        }
        tracing::info!(kbps = n.kbps, reason = %stat.reason, "rendition {}", n.index);
        if !self.stats.renditions.is_empty() {
            self.detector.rate_changed(now);
        }
        self.step_down_grace.clear();
        if self.stats.renditions.len() < 256 {
            self.stats.renditions.push(stat.clone());
        }
        self.stats.rendition = Some(stat);
    }

    fn send(&mut self, to: SocketAddr, body: Body) {
        // Watches name the rendition it is on (an edge it moves to resumes it there);
        // asks for holes name the session they are in.
        let stream = match body {
            Body::Nack(_) if self.buffer.changing_session() => self.stream_before,
            _ => self.stream_now,
        };
        self.out.control(Peer::Addr(to), stream, body);
    }

    fn watch(&self, to: SocketAddr) -> Body {
        // Once the stream flows, an edge that does not know this viewer (it restarted, or
        // it is new after a switch) resumes it where the output stands.
        let start = match self.buffer.next_seq() {
            Some(next) if self.stats.first_seq.is_some() => (WatchStart::Seq, next),
            _ => self.start,
        };
        Body::Watch(Watch {
            node: self.config.id,
            lease_ms: LEASE_MS,
            start: start.0,
            seq: start.1,
            acked: self.acked,
            cookie: self.cookies.get(&to).copied().unwrap_or_default(),
            token: self.config.token.clone(),
            received: self.received_from.get(&to).copied(),
            policy: self.config.policy,
            fits_kbps: self
                .fits_kbps
                .filter(|(_, at)| self.now.saturating_duration_since(*at) < FITS_FOR)
                .map(|(kbps, _)| kbps),
            rendition: self.rendition_took,
        })
    }

    /// Takes a media packet (with its header's `flags`) into the buffer on `path`,
    /// following the source's sessions (a capture started again has another SSRC; its
    /// first packet is also flagged, but may be lost): a new session's packets wait
    /// aside while the old session's last reordered packets come (a window at most),
    /// then the new one starts; late copies of a session left behind are dropped.
    /// Returns whether it was taken.
    fn take_media(&mut self, now: Instant, path: PathId, flags: Flags, m: Media) -> bool {
        let ssrc = m.rtp.fields().ssrc;
        let keyframe = flags.contains(Flags::KEYFRAME);
        self.keyframes_seen |= keyframe;
        let item = Held {
            payload: m.rtp.payload(),
            keyframe,
            ssrc,
        };
        if let Some(old) = self
            .leaving_session
            .filter(|_| !self.buffer.changing_session())
        {
            self.leaving_session = None;
            self.retired.push(old);
            if self.retired.len() > 4 {
                self.retired.remove(0);
            }
        }
        let next_session = match self.ssrc {
            None => {
                self.ssrc = Some(ssrc);
                false
            }
            Some(cur) if cur == ssrc => self.buffer.changing_session(),
            Some(_) if self.leaving_session == Some(ssrc) => false,
            Some(_) if self.retired.contains(&ssrc) => {
                self.stats.stale += 1;
                return false;
            }
            Some(cur) => {
                tracing::info!("the source started a new session at {}", m.seq.0);
                if let Some(older) = self.leaving_session.replace(cur) {
                    self.retired.push(older);
                }
                self.ssrc = Some(ssrc);
                self.stats.sessions += 1;
                // Unless the edge already said where the old session ended, that word
                // is waited for: it may come just behind this packet.
                let told = self
                    .ended_at
                    .is_some_and(|e| self.buffer.next_seq().is_none_or(|n| e.0 + 1 >= n.0));
                self.buffer.start_next_session(now, !told);
                self.detector.new_session(now);
                self.acked = m.seq;
                self.ssrc_changed_at = Some(now);
                if let Some(first) = self.session_start.take() {
                    self.buffer.expect_session_from(now, first);
                }
                true
            }
        };
        if next_session {
            self.buffer.handle_next_session(now, path, m.seq, item);
        } else {
            self.buffer.handle_input(
                now,
                merge::Input::Packet {
                    path,
                    seq: m.seq,
                    item,
                },
            );
        }
        if self.stats.first_seq.is_none() {
            self.fast_start(m.rtp.fields().timestamp);
        }
        true
    }

    /// At a join the edge sends from the latest keyframe at once: once the buffer holds
    /// the configured duration of stream from where the edge said it started us, writing
    /// starts, rather than after waiting that long.
    fn fast_start(&mut self, ts: u32) {
        let (first, span) = self.prefill.get_or_insert((ts, 0));
        let d = ts.wrapping_sub(*first);
        if d < u32::MAX / 2 {
            *span = (*span).max(d);
        }
        let want = (self.config.buffer.as_micros() as u64 * 90 / 1000) as u32;
        let settled = self.joined_at.is_some() && self.buffer.next_seq() == self.joined_at;
        if *span >= want && settled {
            self.buffer.start_now();
        }
    }

    /// Starts watching the first edge.
    fn watch_first(&mut self, edge: SocketAddr) {
        self.edge = Some(edge);
        self.stats.edge = edge.to_string();
        self.phase = Phase::Watching;
        self.next_reask = self
            .config
            .reask
            .filter(|_| self.config.control)
            .map(|d| self.started + d);
        self.send(edge, self.watch(edge));
    }

    /// The edge said this viewer will not get `count` packets from `first`: the buffer
    /// stops waiting for them, and they are counted as skipped, not as gaps.
    fn skip_told(&mut self, now: Instant, first: SeqNo, count: u64) {
        self.told_skipped.add(first, count);
        self.buffer.give_up(now, first, count);
    }

    fn send_ack(&mut self) {
        self.since_ack = 0;
        if let Some(old) = self.leaving {
            self.send(old, self.watch(old));
        }
        if let Some(e) = self.edge {
            self.send(e, self.watch(e));
        }
    }

    fn handle_answer(&mut self, now: Instant, id: u64, result: Result<Assignment, Refusal>) {
        match self.phase {
            Phase::Assigning(asked, _) if asked == id => {
                self.assigned(now, result);
                return;
            }
            _ => {}
        }
        if self.reask_id.is_some_and(|(r, _)| r == id) {
            self.reask_id = None;
            if let Ok(a) = result {
                let edge = self.edge;
                let current = a
                    .candidates
                    .iter()
                    .find(|c| Some(c.addr) == edge)
                    .map(|c| f64::from(c.weight));
                let best = a.candidates.first().map(|c| (c.addr, f64::from(c.weight)));
                let better = match (current, best) {
                    (None, Some(_)) => true,
                    (Some(cur), Some((addr, w))) => {
                        Some(addr) != edge && w > cur * (1.0 + self.config.better_margin)
                    }
                    _ => false,
                };
                self.assignment = Some(a);
                // A viewer placed on a cheap edge by its buffer stays there: the
                // assignment ranks fast edges first.
                let cheap = self
                    .placement
                    .as_ref()
                    .is_some_and(|p| p.tier() == Tier::Cheap);
                if better && !cheap && self.pending.is_none() {
                    self.decide_switch(now, "better".into());
                }
            }
            return;
        }
        if let Some(i) = self.told.iter().position(|t| *t == id) {
            // A switch the viewer already made: the answer only refreshes the candidates.
            self.told.swap_remove(i);
            if let Ok(a) = result {
                self.assignment = Some(a);
            }
            return;
        }
        let answers_switch = self
            .pending
            .as_ref()
            .is_some_and(|p| p.asked.is_some_and(|(r, _)| r == id));
        let by_buffer = self
            .pending
            .as_ref()
            .is_some_and(|p| matches!(p.reason.as_str(), BUFFER_HIGH | BUFFER_LOW));
        if answers_switch {
            match result {
                Err(Refusal::Refused(t) | Refusal::Failed(t)) if by_buffer => {
                    self.placement_refused(now, &t);
                }
                Ok(a) => {
                    let to = a.primary;
                    self.assignment = Some(a);
                    self.carry_out_switch(now, Some(to));
                }
                Err(e) => {
                    let e = match e {
                        Refusal::Refused(t) | Refusal::Failed(t) => t,
                    };
                    tracing::warn!("{e}: going to the secondary set directly");
                    self.carry_out_switch(now, None);
                }
            }
        }
    }

    /// The first assignment came (or none will).
    fn assigned(&mut self, now: Instant, result: Result<Assignment, Refusal>) {
        match result {
            Ok(a) => {
                let primary = a.primary;
                let probe = self.config.probe;
                self.assignment = Some(a);
                if probe {
                    self.start_probes(now);
                } else {
                    self.watch_first(primary);
                }
            }
            Err(Refusal::Refused(t)) => self.finish(Err(t)),
            Err(Refusal::Failed(t)) => match self.config.edge {
                Some(e) => {
                    tracing::warn!("{t}; watching --edge instead");
                    self.watch_first(e);
                }
                // Ask again while the start timeout allows: a control server restarting
                // or a hung one behind a live one should not turn a viewer away.
                None if now + RETRY_ASSIGN + self.config.control_timeout
                    < self.started + self.config.start_timeout =>
                {
                    tracing::warn!("{t}; asking again");
                    self.phase = Phase::Retrying(now + RETRY_ASSIGN);
                }
                None => self.finish(Err(t)),
            },
        }
    }

    /// Times a keepalive to each candidate ([`PROBE_WAIT`] at most).
    fn start_probes(&mut self, now: Instant) {
        let Some(a) = &self.assignment else {
            return;
        };
        let candidates: Vec<SocketAddr> = a.candidates.iter().map(|c| c.addr).collect();
        self.probe_started = now;
        self.probes = candidates.iter().map(|c| (*c, None)).collect();
        for (i, c) in candidates.iter().enumerate() {
            let body = Body::Keepalive(Keepalive {
                node: NodeId(0),
                sent_us: (i as u64 + 1) << 32,
                echo_us: 0,
            });
            if let Some(d) = self.out.encode(self.config.stream, body) {
                self.out.event(Event::Probe {
                    to: *c,
                    datagram: d,
                });
            }
        }
        self.phase = Phase::Probing(now + PROBE_WAIT);
    }

    /// The probes are in (or their time is up): watch the fastest of the primary's set.
    fn probed(&mut self, _now: Instant) {
        let Some(a) = self.assignment.clone() else {
            return;
        };
        let rtts: Vec<(SocketAddr, f64)> = self
            .probes
            .iter()
            .filter_map(|(a, r)| r.map(|r| (*a, r)))
            .collect();
        self.request(Request::Feedback {
            probes: rtts.clone(),
        });
        let fastest = rtts
            .iter()
            .filter(|(addr, _)| {
                a.candidates
                    .iter()
                    .any(|c| c.addr == *addr && c.set == a.primary_set)
            })
            .min_by(|x, y| x.1.total_cmp(&y.1));
        let edge = match fastest {
            Some((f, rtt)) => {
                tracing::info!(
                    "probed {} edges; fastest of the {} set: {f} ({rtt:.2} ms)",
                    rtts.len(),
                    a.primary_set
                );
                *f
            }
            None => a.primary,
        };
        self.watch_first(edge);
    }

    fn handle_message(&mut self, now: Instant, from: Option<SocketAddr>, datagram: Bytes) {
        let Ok(msg) = self.out.codec().decode(datagram) else {
            self.stats.malformed += 1;
            return;
        };
        if let Phase::Probing(_) = self.phase {
            if let (Body::Keepalive(k), Some(f)) = (&msg.body, from) {
                let i = (k.echo_us >> 32) as usize;
                if let Some((addr, rtt)) = self.probes.get_mut(i.wrapping_sub(1)) {
                    if *addr == f && rtt.is_none() {
                        *rtt = Some(now.duration_since(self.probe_started).as_secs_f64() * 1000.0);
                    }
                }
                if self.probes.iter().all(|(_, r)| r.is_some()) {
                    self.probed(now);
                }
            }
            return;
        }
        let from_edge = from.is_none() || from == self.edge;
        // The edge being left, or just left: its last packets are still on their way.
        let from_leaving = (self.leaving.is_some() && from == self.leaving)
            || self
                .left
                .is_some_and(|(e, t)| from == Some(e) && now < t + LEFT_GRACE);
        if from_edge || from_leaving {
            // Whatever it says, the edge lives: holes still wait only their window.
            self.buffer.heard(now);
        }
        match msg {
            Message {
                header,
                body: Body::Media(m),
            } => {
                // What each edge delivered, told back to it in watches: its measure of
                // this viewer's speed.
                if let Some(f) = from.filter(|_| from_edge || from_leaving) {
                    let n = self.received_from.entry(f).or_insert(0);
                    *n = n.wrapping_add(m.rtp.len() as u64);
                }
                if self.received_from.len() > 8 {
                    let keep = [self.edge, self.leaving, self.left.map(|(e, _)| e)];
                    self.received_from.retain(|e, _| keep.contains(&Some(*e)));
                }
                if from_leaving && !from_edge {
                    // The edge being left moved this viewer to another rendition after
                    // it left (its link still carries the first packets): the edge it
                    // watches now resumes it on the rendition its watches name, and that
                    // one's packets would take its output into a session no edge serves
                    // it any more. Repairs of the rendition it left are still holes of
                    // its own.
                    let repair = header.flags.contains(Flags::RETRANSMIT);
                    let ours = header.stream == self.stream_now
                        || (repair && header.stream == self.stream_before);
                    if !ours {
                        self.stats.stray += 1;
                        return;
                    }
                    // The edge being left, until the new one delivers.
                    if m.seq > self.acked {
                        self.acked = m.seq;
                    }
                    // Acknowledged like the edge's: its flow window must stay open.
                    self.since_ack += 1;
                    self.take_media(now, PathId(1), header.flags, m);
                    return;
                }
                if !from_edge {
                    self.stats.stray += 1;
                    return;
                }
                self.stats
                    .join_ms
                    .get_or_insert(now.duration_since(self.started).as_millis() as u64);
                if !self.joined_told
                    && self.stats.first_seq.is_none()
                    && self.early_watch.is_none_or(|t| now >= t + EARLY_WATCH)
                {
                    // Media, but no word yet of where the edge started us (the notice
                    // may be lost with the first packet): a watch now brings it again,
                    // well within the buffer.
                    self.early_watch = Some(now);
                    self.send_ack();
                }
                // The rendition it is served (its edge may move it): what it names.
                if !header.flags.contains(Flags::RETRANSMIT) && header.stream != self.stream_now {
                    self.stream_before = self.stream_now;
                    self.stream_now = header.stream;
                    // Its edge moved it to another rendition, whose notice may be lost
                    // on a link too slow for the one it left: a session it was on
                    // before is not stale now (its packets would all be dropped).
                    let ssrc = m.rtp.fields().ssrc;
                    if self.retired.contains(&ssrc) {
                        self.retired.retain(|s| *s != ssrc);
                        self.stats.revived += 1;
                    }
                }
                // A repair says nothing of where the new edge streams from (a cold edge
                // may answer one for a packet it holds before it can serve the resume
                // point): the first packet it streams does.
                if !self.got_from_edge && !header.flags.contains(Flags::RETRANSMIT) {
                    self.got_from_edge = true;
                    // The edge being left is kept until the output reaches what the new
                    // one sends (it may start later than the resume point).
                    if self.leaving.is_some() {
                        self.new_edge_from = Some((m.seq, now));
                    }
                    if let Some((i, t, _)) = self.switch_marks.last() {
                        let unix = self.clock.unix_ms(now);
                        if let Some(s) = self.stats.switches.get_mut(*i) {
                            s.detect_to_first_packet_ms
                                .get_or_insert(now.duration_since(*t).as_millis() as u64);
                            s.first_packet_unix_ms.get_or_insert(unix);
                        }
                    }
                }
                if m.seq > self.acked {
                    self.acked = m.seq;
                }
                self.since_ack += 1;
                self.detector.handle_input(
                    now,
                    Observation {
                        seq: m.seq,
                        size: m.rtp.len(),
                        frame_start: header.flags.contains(Flags::KEYFRAME),
                        repair: header.flags.contains(Flags::RETRANSMIT),
                    },
                );
                if !header.flags.contains(Flags::RETRANSMIT) {
                    let f = m.rtp.fields();
                    self.queue.sample(now, f.ssrc, f.timestamp);
                    self.buffer.set_queue(PathId(0), self.queue.queue(now));
                }
                self.take_media(now, PathId(0), header.flags, m);
            }
            // Where a session ends and the next starts holds for every edge: the edge
            // being left may be the only one to have seen them.
            Message {
                header,
                body: Body::Notice { kind, value },
            } if from_edge
                || (from_leaving
                    && header.stream == self.stream_now
                    && matches!(kind, NoticeKind::Session | NoticeKind::Ended)) =>
            {
                match kind {
                    NoticeKind::Skipped => {
                        self.stats.skipped += value;
                        self.stats.skips += 1;
                        // The edge moved this viewer on from right after the last packet
                        // it sent (the notice comes between the two): stop waiting for what
                        // it passed over, counted as skipped, not as gaps.
                        if let Some(next) = self.buffer.next_seq() {
                            self.skip_told(now, next, value);
                        }
                        tracing::warn!(
                            "this viewer fell behind: the edge skipped {value} packets to the latest keyframe"
                        );
                    }
                    NoticeKind::Missed => {
                        // Resumed past what the edge still held (a pause longer than the
                        // lease, a restarted edge): moved forward, like a skip. What is
                        // missed runs from the first packet this viewer lacks (it may have
                        // asked from further back: packets in flight reached it since) to
                        // where the edge started it (its joined notice, just before; the
                        // count may span a change of source session): stop waiting for
                        // those, unless the edge being left may still send them.
                        self.stats.skips += 1;
                        match (self.buffer.next_seq(), self.joined_at, self.leaving) {
                            (Some(next), Some(joined), None) if joined > next => {
                                self.stats.skipped += joined.0 - next.0;
                                self.skip_told(now, next, joined.0 - next.0);
                            }
                            (Some(next), Some(joined), None) if joined <= next => {}
                            _ => self.stats.skipped += value,
                        }
                        tracing::warn!("the edge no longer had {value} of the packets asked for")
                    }
                    NoticeKind::Session => {
                        // Where the new session starts: applied when the buffer moves to it
                        // (now, if it already has).
                        self.session_start = Some(SeqNo(value));
                        if self.ssrc_changed_at.is_some() {
                            self.buffer.expect_session_from(now, SeqNo(value));
                        }
                    }
                    NoticeKind::Gap => {
                        self.buffer
                            .give_up(now, SeqNo(value >> 16), value & u64::from(u16::MAX))
                    }
                    NoticeKind::Joined => {
                        // Where the edge started us: a lost first packet (the keyframe) is
                        // then asked for, not silently started after.
                        self.joined_told = true;
                        self.joined_at = Some(SeqNo(value));
                        self.buffer.expect_from(now, SeqNo(value));
                        tracing::debug!("joined at {value}");
                    }
                    NoticeKind::Rendition => self.rendition(now, value),
                    // A repeat of where the rendition it left ended, once it is in the one
                    // it moved to: that number may lie ahead in this one's numbering.
                    NoticeKind::Ended
                        if self.moved_to.is_some()
                            && self.ssrc == self.moved_to
                            && !self.buffer.changing_session() => {}
                    NoticeKind::Ended => {
                        // Where the old session ended: a lost tail is asked for, and the
                        // change of session waits for it (the buffer ignores a number it
                        // holds or released already: a repeat, or one from the new session).
                        self.ended_at = Some(SeqNo(value));
                        self.buffer.expect_through(now, SeqNo(value));
                    }
                }
            }
            Message {
                body: Body::Keepalive(_),
                ..
            } if from_edge && self.got_from_edge => {
                // The edge is alive; the stream pauses upstream.
                self.detector.handle_alive(now);
            }
            Message {
                body: Body::Cookie { cookie },
                ..
            } => {
                // An edge validating this address: watch again with its cookie at once.
                // (`from` is none over TCP, where only the edge speaks.)
                let f = from.or(self.edge);
                match f.filter(|f| Some(*f) == self.edge || Some(*f) == self.leaving) {
                    Some(f) => {
                        if self.cookies.insert(f, cookie) != Some(cookie) {
                            self.send(f, self.watch(f));
                        }
                    }
                    // From an edge this viewer does not watch: counted like its media.
                    None => self.stats.stray += 1,
                }
            }
            Message {
                body: Body::Switch { reason },
                ..
            } if from_edge => {
                tracing::warn!("edge {:?} asks its viewers to move ({reason:?})", self.edge);
                if self.pending.is_none() {
                    self.decide_switch(now, "drain".into());
                }
            }
            Message {
                body: Body::Error { text, .. },
                ..
            } if from_edge => {
                if self.config.control || self.assignment.is_some() {
                    tracing::warn!("edge {:?} refused: {text}", self.edge);
                    if self.pending.is_none() {
                        self.decide_switch(now, "refused".into());
                    }
                } else {
                    let edge = self.edge.map_or("?".into(), |e| e.to_string());
                    self.finish(Err(format!("edge {edge} refused: {text}")));
                }
            }
            _ => {}
        }
    }

    /// After every input: the detectors' verdict, re-asks, the buffer's output and
    /// repairs, acknowledgements.
    fn step(&mut self, now: Instant) {
        if self.phase != Phase::Watching {
            return;
        }
        if let (Some(old), Some((first, since))) = (self.leaving, self.new_edge_from) {
            // Make before break ends once the output has caught up with the new edge's
            // first packet, or after a while in any case.
            let caught_up = self.buffer.next_seq().is_none_or(|n| n >= first);
            if caught_up || now >= since + LEAVE_AT_MOST {
                self.leaving = None;
                self.new_edge_from = None;
                self.left = Some((old, now));
                self.send(
                    old,
                    Body::Unsubscribe {
                        node: self.config.id,
                    },
                );
            }
        }
        // The detectors' verdict, once the edge had its chance.
        while let DetectOutput::Switch(reason) = self.detector.poll_output() {
            // Judge an edge's reception only once it delivered and its catch-up is over;
            // an edge that delivered and went silent at once; one that delivers nothing
            // after the grace.
            let quality = !matches!(reason, detect::Reason::Stall { .. });
            let judged = if self.got_from_edge {
                !quality || now >= self.judge_from
            } else {
                now >= self.grace_until
            };
            // Above the ladder's lowest rendition, the edge moves the viewer down first.
            let above_lowest = self.stats.rendition.as_ref().is_some_and(|r| r.index > 0);
            let waits_for_edge = judged && quality && above_lowest && {
                let kind = reason.name();
                let grace = self.step_down_grace.iter_mut().find(|g| g.0 == kind);
                match grace {
                    // The same trouble as before it lapsed: a new one, a new grace.
                    Some((_, t, last)) if now.saturating_duration_since(*last) > GRACE_LAPSE => {
                        (*t, *last) = (now + STEP_DOWN_GRACE, now);
                        true
                    }
                    Some((_, t, last)) if now < *t => {
                        *last = now;
                        true
                    }
                    Some((_, t, last)) if now < *t + STEP_DOWN_GRACE => {
                        *last = now;
                        false
                    }
                    Some((_, t, last)) => {
                        (*t, *last) = (now + STEP_DOWN_GRACE, now);
                        true
                    }
                    None => {
                        self.step_down_grace
                            .push((kind, now + STEP_DOWN_GRACE, now));
                        true
                    }
                }
            };
            if waits_for_edge {
                tracing::debug!("{reason:?}: waiting for the edge to move down a rendition");
                self.detector.reset(now);
            } else if judged && quality && !self.quality_switch_allowed(now) {
                // Damped: say it again later if it lasts.
                self.detector.reset(now);
            } else if judged && self.pending.is_none() {
                // A first edge that sent nothing at all within the grace is left too:
                // it is dead or cannot serve, and another may.
                tracing::warn!("leaving {:?}: {reason:?}", self.edge);
                if quality {
                    self.quality_switches.push(now);
                }
                // The next edge gets its own time to move the viewer down.
                self.step_down_grace.clear();
                self.decide_switch(now, reason.name().to_owned());
            } else if !judged {
                // Too early to judge: re-arm, so a problem that lasts is said again.
                self.detector.reset(now);
            }
        }
        self.place_by_buffer(now);
        if self.reask_id.is_none() && self.next_reask.is_some_and(|t| now >= t) {
            self.next_reask = self.config.reask.map(|d| now + d);
            let id = self.request(Request::Assign);
            self.reask_id = Some((id, now + self.config.control_timeout));
        }
        // Drain the buffer: write in-order packets, count gaps, ask for what is missing.
        let mut nacks: Vec<SeqRange> = Vec::new();
        loop {
            match self.buffer.poll_output() {
                MergeOutput::Packet { seq, item } => {
                    if self.written_ssrc != Some(item.ssrc) {
                        // Starting cold, a decoder can begin only at a keyframe (the edge
                        // starts a viewer at one): if that packet was lost for good, what
                        // comes before the next keyframe is skipped, counted. Entering the
                        // source's next session everything is written: the player is
                        // running, and its audio plays on.
                        let cold = self.written_ssrc.is_none();
                        self.written_ssrc = Some(item.ssrc);
                        if !cold && self.rendition_ssrcs.contains(&item.ssrc) {
                            self.continuity.resync();
                        }
                        self.to_keyframe = cold && !item.keyframe;
                        if self.to_keyframe {
                            self.to_keyframe_since = Some(now);
                            self.stats.skips += 1;
                            tracing::warn!("the first keyframe was lost: starting at the next one");
                        }
                    }
                    if self.to_keyframe {
                        // (a stream that flags no keyframe at all is written after a
                        // while, from where it stands)
                        let waited = self
                            .to_keyframe_since
                            .is_some_and(|t| now.saturating_duration_since(t) > COLD_KEYFRAME_WAIT);
                        if !item.keyframe && (self.keyframes_seen || !waited) {
                            self.stats.skipped += 1;
                            continue;
                        }
                        self.to_keyframe = false;
                    }
                    let ssrc = item.ssrc;
                    let item = self.continuity.fix(item.payload);
                    self.playout.written(now, ssrc, &item);
                    self.stats.continuity_rewritten = self.continuity.rewritten;
                    self.stats.first_seq.get_or_insert(seq.0);
                    self.stats
                        .first_output_ms
                        .get_or_insert(now.duration_since(self.started).as_millis() as u64);
                    self.stats.last_seq = Some(seq.0);
                    self.stats.packets += 1;
                    self.stats.bytes += item.len() as u64;
                    if let Some(last) = self.last_write {
                        let gap = now.duration_since(last).as_millis() as u64;
                        self.stats.max_output_gap_ms = self.stats.max_output_gap_ms.max(gap);
                    }
                    self.last_write = Some(now);
                    self.out.event(Event::Write { seq, payload: item });
                }
                MergeOutput::Gap { first, count } => {
                    // What the edge said this viewer would not get was counted as
                    // skipped when it said so.
                    let told = self.told_skipped.overlap(first, count);
                    self.stats.gaps += count - told;
                    if count > told {
                        tracing::debug!("lost {} packets from {}", count - told, first.0);
                    }
                }
                MergeOutput::Nack { range, .. } => {
                    tracing::trace!("asking for {} packets from {}", range.count, range.first.0);
                    nacks.push(range)
                }
                MergeOutput::Timeout(_) => break,
            }
        }
        let s = self.buffer.stats();
        self.stats.late_or_duplicate = s.duplicates + s.late;
        self.stats.repaired = s.repaired;
        if let (false, Some(edge)) = (nacks.is_empty(), self.edge) {
            self.stats.nacks += nacks.len() as u64;
            for chunk in nacks.chunks(braid_core::wire::MAX_NACK_RANGES) {
                self.send(edge, Body::Nack(chunk.to_vec()));
                // During a switch the edge being left still holds what it sent, while a
                // cold new edge may not have it yet: ask both.
                if let Some(old) = self.leaving {
                    self.send(old, Body::Nack(chunk.to_vec()));
                }
            }
        }
        if self.since_ack >= ACK_PACKETS {
            self.next_ack = now + ACK_EVERY;
            self.send_ack();
        }
    }

    /// Buffer-aware moves (seed 001): a full buffer takes a cheap edge, a low one goes
    /// back to a fast edge, through the same switch as any other (no gap, no duplicate).
    fn place_by_buffer(&mut self, now: Instant) {
        if self.placement.is_none() || self.pending.is_some() || self.leaving.is_some() {
            return;
        }
        let level = self.playout.level(now);
        let Some(to) = self.placement.as_mut().and_then(|p| p.observe(now, level)) else {
            return;
        };
        let reason = match to {
            Tier::Cheap => BUFFER_HIGH,
            Tier::Fast => BUFFER_LOW,
        };
        tracing::info!(
            "playout buffer {} ms: asking for a {} edge",
            level.unwrap_or_default().as_millis(),
            if to == Tier::Cheap { "cheap" } else { "fast" }
        );
        self.decide_switch(now, reason.to_owned());
    }

    /// A buffer-aware move that did not happen (no such edge, no answer): the viewer
    /// stays, and tries again after a backoff.
    fn placement_refused(&mut self, now: Instant, why: &str) {
        tracing::info!("no buffer-aware move: {why}");
        self.pending = None;
        if let Some(p) = self.placement.as_mut() {
            p.refused(now);
        }
    }

    /// Whether a switch for the quality of reception may happen now (see
    /// [`QUALITY_DWELL`]).
    fn quality_switch_allowed(&mut self, now: Instant) -> bool {
        self.quality_switches
            .retain(|t| now.saturating_duration_since(*t) < DAMPING_MEMORY);
        let Some(last) = self.quality_switches.last() else {
            return true;
        };
        let n = self.quality_switches.len().min(6) as u32;
        let dwell = (QUALITY_DWELL * 2u32.pow(n - 1)).min(MAX_DWELL);
        now >= *last + dwell
    }

    /// A reason to leave the edge: ask the control servers for another (the output goes
    /// on meanwhile), or go to the secondary set at once without them.
    fn decide_switch(&mut self, now: Instant, reason: String) {
        let Some(failed) = self.edge else {
            return;
        };
        let mut p = PendingSwitch {
            reason: reason.clone(),
            detected: now,
            asked: None,
        };
        // An edge that fails now (silence, poor reception) is left at once for the best
        // candidate of the other set from the last assignment: the detection already
        // took part of the buffer, a control server's round trip must not take the rest.
        // The control server is told all the same (it counts the switch, and its answer
        // refreshes the candidates); planned moves (drain, refusal, a better edge) and a
        // viewer with no candidate wait for its choice.
        let urgent = !matches!(
            reason.as_str(),
            "drain" | "refused" | "better" | BUFFER_HIGH | BUFFER_LOW
        );
        let prefer = match reason.as_str() {
            BUFFER_HIGH => Prefer::Cheap,
            BUFFER_LOW => Prefer::Fast,
            _ => Prefer::Any,
        };
        let candidate = urgent && self.secondary_candidate(failed).is_some();
        if self.config.control {
            let last_seq = self.buffer.next_seq().unwrap_or(self.acked.next()).0;
            let id = self.request(Request::Switch {
                failed,
                reason,
                last_seq,
                prefer,
            });
            if candidate {
                self.told.push(id);
            } else {
                p.asked = Some((id, now + self.config.control_timeout));
                self.pending = Some(p);
                return;
            }
        }
        self.pending = Some(p);
        self.carry_out_switch(now, None);
    }

    /// The best candidate of the other set than `failed`'s, from the last assignment.
    fn secondary_candidate(&self, failed: SocketAddr) -> Option<SocketAddr> {
        let a = self.assignment.as_ref()?;
        let current_set = a
            .candidates
            .iter()
            .find(|c| c.addr == failed)
            .map(|c| c.set.clone());
        a.candidates
            .iter()
            .filter(|c| c.addr != failed)
            .min_by_key(|c| (Some(&c.set) == current_set.as_ref(), c.priority))
            .map(|c| c.addr)
    }

    /// Moves to `target` (a control server's choice), or to the best candidate of the
    /// other set from the last assignment.
    fn carry_out_switch(&mut self, now: Instant, target: Option<SocketAddr>) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let Some(edge) = self.edge else {
            return;
        };
        let via_control = target.is_some();
        let target = target.or_else(|| self.secondary_candidate(edge));
        let Some(to) = target.filter(|t| *t != edge) else {
            tracing::warn!("nowhere to switch to ({}); staying on {edge}", p.reason);
            self.detector.reset(now);
            if let Some(pl) = self.placement.as_mut() {
                pl.refused(now);
            }
            return;
        };
        // Any move but a buffer-aware one to a cheap edge lands on a fast edge (the
        // control server's choice for a viewer not known to be slow).
        if let Some(pl) = self.placement.as_mut() {
            let tier = if p.reason == BUFFER_HIGH {
                Tier::Cheap
            } else {
                Tier::Fast
            };
            pl.moved(now, tier);
            self.stats.placement = Some(tier);
        }
        // The first sequence number not yet written: the new edge starts there; what the
        // buffer already holds is dropped as duplicate, what it lacks is filled.
        let resume = self.buffer.next_seq().unwrap_or(self.acked.next());
        // Make before break (datagrams): keep taking the old edge's packets, and keep its
        // lease and window open, until the new edge delivers; a cold new edge then costs
        // nothing. The buffer drops the overlap. A dead old edge simply sends nothing.
        self.new_edge_from = None;
        if let Some(old) = self.leaving.take() {
            self.send(
                old,
                Body::Unsubscribe {
                    node: self.config.id,
                },
            );
        }
        if self.config.datagrams {
            self.leaving = Some(edge);
        } else {
            self.send(
                edge,
                Body::Unsubscribe {
                    node: self.config.id,
                },
            );
        }
        tracing::info!(
            "switching {edge} -> {to} ({}), resuming at {}",
            p.reason,
            resume.0
        );
        let detected_unix_ms = self
            .clock
            .unix_ms(now)
            .saturating_sub(now.duration_since(p.detected).as_millis() as u64);
        self.stats.switches.push(SwitchStat {
            reason: p.reason,
            from: edge.to_string(),
            to: to.to_string(),
            via_control,
            detect_to_first_packet_ms: None,
            resumed_at: resume.0,
            lost: None,
            detected_unix_ms,
            first_packet_unix_ms: None,
        });
        self.switch_marks
            .push((self.stats.switches.len() - 1, p.detected, self.stats.gaps));
        self.edge = Some(to);
        self.stats.edge = to.to_string();
        // Another edge, another path: its queue is measured afresh.
        self.queue.reset();
        self.buffer.set_queue(PathId(0), Duration::ZERO);
        // Resume where the output stands; a viewer that got nothing yet starts afresh
        // (at the latest keyframe, or where it was told to).
        if self.buffer.next_seq().is_some() || self.acked.0 > 0 {
            self.start = (WatchStart::Seq, resume);
        }
        self.got_from_edge = false;
        self.joined_at = None;
        if self.stats.first_seq.is_none() {
            // Nothing written yet: the new edge's burst is measured afresh.
            self.prefill = None;
        }
        self.grace_until = now + self.config.start_timeout.min(Duration::from_secs(3));
        self.judge_from = now + SETTLE;
        self.detector.reset(now);
        self.next_ack = now + ACK_EVERY;
        self.send_ack();
    }

    /// The stats line: bit rate over the last second, switches' losses once known.
    fn report(&mut self, now: Instant) {
        let (t0, b0) = self.last_report;
        self.stats.bitrate_bps =
            Bitrate::from_size_over(DataSize(self.stats.bytes - b0), now.duration_since(t0)).0;
        self.last_report = (now, self.stats.bytes);
        self.stats.buffered = self.buffer.held();
        self.stats.playout_ms = self.playout.level(now).map(|d| d.as_millis() as u64);
        self.stats.underruns = self.playout.underruns();
        for (i, t, gaps) in &self.switch_marks {
            if now.duration_since(*t) > Duration::from_secs(2) + self.config.buffer {
                if let Some(s) = self.stats.switches.get_mut(*i) {
                    s.lost.get_or_insert(self.stats.gaps - gaps);
                }
            }
        }
        self.out.event(Event::Stats);
    }
}
