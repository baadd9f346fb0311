//! The edge's decisions, sans-IO.
//!
//! When the first viewer of a stream arrives the edge subscribes to `subscribe_k`
//! distinct set reflectors, merges their copies, asks them for what every path lost, keeps
//! the last seconds of the stream in a ring and serves every viewer from its own cursor,
//! starting at the latest keyframe. After the last viewer leaves it lingers, then
//! unsubscribes.
//!
//! Viewers speak the watch protocol (`docs/PROTOCOL.md`): a watch message starts, renews
//! and acknowledges; the edge serves each viewer from its own cursor and, over UDP and
//! QUIC, keeps at most `viewer_window` packets beyond what the viewer acknowledged in
//! flight, so a viewer that stops reading stops its cursor instead of losing packets in
//! its socket buffer; over TCP its queue plays that part. The ring then overtakes it, and
//! the skip is counted and told to it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_core::cookie::{self, Cookies, Subject};
use braid_core::merge;
use braid_core::node::{self, Outbox, Output, Peer, TailProbe, WallClock};
use braid_core::ring::{self, Cursor, Read, Ring, Start};
use braid_core::speed;
use braid_core::token::Signer;
use braid_core::wire::{
    Body, Class, Codec, Cookie, ErrorCode, Flags, Keepalive, NoticeKind, RenditionNotice, SeqRange,
    SwitchReason, Watch, WatchStart,
};
use braid_core::{NodeId, PathId, SeqNo, StreamId};
use bytes::Bytes;

use crate::common::{self, Counters, HOUSEKEEPING, MAX_LEASE, MAX_NACK_ANSWER, Packet, Settings};

/// How often an edge refreshes its subscriptions, and the lease it asks for.
const REFRESH: Duration = Duration::from_secs(1);
const LEASE_MS: u32 = 3000;
/// An edge replaces a subscribed set reflector that delivered no data for this long.
const PATH_DEAD: Duration = Duration::from_millis(1500);
/// How often a drained edge tells its viewers to move.
const DRAIN_SIGNAL: Duration = Duration::from_secs(1);
/// A packet sent to a viewer and not acknowledged within this long stops counting
/// against its window. Viewers acknowledge every 250 ms; one silent for its lease (3 s)
/// is forgotten anyway, so this only frees a window that acknowledgements can no longer
/// reach (packets the viewer will never have), never a merely paused viewer's.
const IN_FLIGHT_TTL: Duration = Duration::from_secs(3);
/// A stream opened for a viewer that resumes releases nothing for this long, so that
/// its other viewers coming back (a client repeats its watch every 250 ms while its
/// edge is silent) are each started at their own point.
const RESUME_GATHER: Duration = Duration::from_millis(300);
/// Most packets of a stream's past asked for at once for viewers resuming from before
/// its ring's start (a [`Backfill`]): four NACK answers' worth, 2.6 s at 4 Mbit/s.
const BACKFILL_MAX: u64 = 4 * MAX_NACK_ANSWER;
/// What a backfill still lacks is asked for again this often, each time of the next set
/// reflector subscribed…
const BACKFILL_ASK_EVERY: Duration = Duration::from_millis(200);
/// … this many times in all; then what came is put in the ring and the viewers waiting
/// for it start. A backfill extended by later viewers (each extension asked at once,
/// then again) still ends within two more of these periods.
const BACKFILL_ASKS: u8 = 3;
/// A viewer's window grows to cover this many of its acknowledgement delays of the
/// stream (its round trip plus the time between its acknowledgements)…
const WINDOW_DELAYS: f64 = 2.0;
/// … up to this many times `viewer_window`.
const WINDOW_GROWTH: u64 = 8;
/// How often a stream's packet rate is measured.
const PPS_EVERY: Duration = Duration::from_millis(200);
/// A ladder stream's rate on the wire is measured over this long (a few groups of
/// pictures: a keyframe's burst is not its rate), from at least half of it.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Marks kept for it at most (a tick's each: 20 s of ticks).
const RATE_MARKS: usize = 200;

/// A viewer that got nothing for this long is sent a heartbeat (checked every 100 ms).
const HEARTBEAT: Duration = Duration::from_millis(60);
/// How many of a viewer's refreshes repeat a *joined* or *session* notice.
const NOTICE_REPEATS: u8 = 3;
/// Media datagrams queued per TCP viewer before it counts as slow.
pub const TCP_QUEUE: usize = 256;

/// What the edge decides with.
#[derive(Debug, Clone)]
pub struct Config {
    /// What both roles share.
    pub settings: Settings,
    /// The set reflectors to subscribe to; learned ones are added by
    /// [`Input::Reflectors`]. Paths are numbered by position.
    pub reflectors: Vec<SocketAddr>,
    /// How many distinct set reflectors to subscribe to.
    pub subscribe_k: usize,
    /// The ring's bounds.
    pub ring: ring::Config,
    /// How long to stay subscribed after the last viewer left.
    pub linger: Duration,
    /// Most viewers on this node.
    pub max_viewers: usize,
    /// Most packets in flight to a UDP or QUIC viewer beyond what it acknowledged.
    pub viewer_window: u64,
    /// Viewers must present a token signed with this secret.
    pub tokens: Option<Signer>,
    /// Cut every stream into HLS segments and parts as this says (`--hls-listen`).
    pub hls: Option<braid_core::hls::Config>,
    /// How each viewer's delivery speed is judged, and when it is slow.
    pub speed: speed::Config,
    /// Ladders: each a list of renditions (stream, nominal bit/s), lowest rate first. A
    /// viewer of any of a ladder's streams gets the rendition that fits its speed.
    pub ladders: Vec<Vec<(StreamId, u64)>>,
    /// How renditions follow speed.
    pub adapt: speed::AdaptConfig,
}

/// A viewer's place in a ladder.
#[derive(Debug)]
struct Adapt {
    /// Which ladder.
    ladder: usize,
    chooser: speed::Chooser,
    /// A move decided, to make at the viewer's next keyframe: to which rendition, why.
    pending: Option<(usize, speed::Reason)>,
    /// Since when the viewer waits at a keyframe for the other rendition's to arrive.
    waiting: Option<Instant>,
    /// A keyframe position at which a move was found impossible (no aligned keyframe):
    /// the viewer goes on past it.
    passed: Option<u64>,
    /// Keyframes with no aligned one in the target rendition, in a row.
    unaligned: u32,
    /// Whether the rest of a group of pictures was passed over for the move pending (at
    /// most once each).
    abandoned: bool,
    /// About its link's rate, bit/s, from what its client said an edge last moved it
    /// down to (over the climbing share): what it goes by until this edge measures it.
    fitting_link: Option<u64>,
    /// Since when a probe is under way, as of the last look.
    probe_started: Option<Instant>,
    /// During a probe: packets of the stream sent, and packets the viewer asked for.
    probe_sent: u64,
    probe_nacked: u64,
}

/// A viewer joining (or resuming after a switch) whose link's rate the edge knows (its
/// client's or network's speed was measured limited here, or its client says what fits)
/// gets its catch-up paced at this much of that rate, until it is caught up: what would
/// go at once waits at the edge, where it is safe, not in the link's queue, which
/// overflows. (Only the catch-up: a viewer paced all along reads as never held back by
/// its link, and one paced at a rate measured low reads as limited there.)
const PACE_GAIN: f64 = 0.95;
/// A paced viewer is never paced under its stream's rate times this.
const PACE_STREAM_MARGIN: f64 = 1.05;
/// A paced viewer may get this much of its rate at once (and two packets at least).
const PACE_BURST: Duration = Duration::from_millis(20);
/// A viewer whose link is measured limited is sent repairs at most at this share of
/// its link's rate: on a link whose queue overflowed, every hole asked for again and
/// answered at once goes into the same full queue, loses the stream's next packets and
/// the notices with them, and those are asked for in turn.
const REPAIR_SHARE: f64 = 0.3;
/// … and at most what the link has beside the stream's own rate on the wire, when that
/// is known (a ladder's rendition): a link carrying a rendition at 92% of its rate has
/// 8% for repairs, and 30% of it would overflow the queue the move down left full, for
/// as long as the holes that overflow opened are asked for again. At least this share
/// of the link, though: a link the stream fills still gets its holes filled, slowly.
const REPAIR_FLOOR: f64 = 0.02;
/// … and at most this much of that at once (and a large packet's bytes at least).
const REPAIR_BURST: Duration = Duration::from_millis(200);
/// A ladder's viewer that receives less than this share of all it is sent, repairs included,
/// over the meter's window, is on a link that drops what it is offered (its queue
/// overflows with repairs as much as with the stream), however much of the stream
/// arrives: its repairs are held to what the link has room for, at the rate it received.
const OVERLOADED: f64 = 0.75;
/// … while it is sent at least this much in repairs of what it is sent of the stream:
/// repairs flooding its link (a join's catch-up that overflows it drops first copies,
/// whose holes need their repairs at once).
const FLOODED: f64 = 0.5;
/// A link read as dropping what it was offered is read so until the viewer receives this
/// share of all it is sent again.
const OVERLOAD_CLEARS: f64 = 0.9;
/// … or receives this much more than it did then.
const OVERLOAD_FASTER: f64 = 1.25;
/// A packet asked for again is sent again no sooner than the viewer's round trip after
/// the last copy (its least, or its recent one when more: a queue standing on its link
/// holds the first copy, and an ask every 80-100 ms would send each hole three or four
/// times into it), or this, if less: a round trip measured long (a viewer that joined
/// behind a queue, or whose losses skew the reading) must not leave a lossy link's holes
/// unrepaired.
const REASK_HOLD_MAX: Duration = Duration::from_millis(200);
/// A probe ends once the viewer's packets are acknowledged this much later than the
/// path's least delay: they queue on its link, which is about to overflow.
pub const PROBE_QUEUE: Duration = Duration::from_millis(100);
/// A probe's copies grow over this share of it, from none (see `Chooser::probing`).
const GROW_SHARE: f64 = 0.5;
/// How long a viewer waits at its keyframe for the other rendition's aligned keyframe
/// (just subscribed, it may be a moment behind).
const ALIGN_WAIT: Duration = Duration::from_millis(300);
/// After this many keyframes without an aligned one, a move goes to the next keyframe
/// of the target rendition after the viewer's (a jump in media time, counted).
const UNALIGNED_GIVE_UP: u32 = 3;
/// A move down waits for the viewer's next keyframe unless its link, at the rate just
/// measured, would take longer than this to carry the rest of the group of pictures: then
/// the rest is passed over (told as skipped, counted), as a player abandons a segment too
/// slow to finish, instead of the viewer freezing until it arrives.
const ABANDON_AFTER: Duration = Duration::from_secs(1);
/// How many packets from a keyframe's first are read for its media time.
const KEYFRAME_TIME_SCAN: u64 = 8;
/// Media time within which two renditions' keyframes are aligned (90 kHz: 20 ms).
const ALIGN_TICKS: u64 = 1800;
/// The repair bytes viewer `v` may be sent now: unbounded unless its link is measured
/// limited (or known from what its client said fits), then [`REPAIR_SHARE`] of that
/// rate, or what the link has beside `stream_bps` (its stream's rate on the wire, when
/// known) if that is less, [`REPAIR_FLOOR`] of it at least; at most [`REPAIR_BURST`] of
/// it at once.
fn repair_budget(now: Instant, v: &mut Viewer, stream_bps: Option<u64>) -> u64 {
    // A ladder's viewer whose link drops most of what it is offered while it is sent
    // heavy repairs: they flood the link that lost what they repair. (Random loss, even
    // heavy, drops far less. A viewer of one rate is left to its estimate: its stream's
    // rate is no measure of its link, and what it receives reads low at a stall or a
    // switch, which would starve the holes they leave.)
    let share = v.speed.received_share(now).filter(|_| stream_bps.is_some());
    let overloaded = share
        .filter(|s| s.received < OVERLOADED && s.repairs >= FLOODED)
        .map(|s| s.bps);
    // Read so, until it receives nearly all it is sent again, or at a rate well above
    // what it received then (a sample with a keyframe in it reads above the link's).
    let estimate = v.speed.estimate(now);
    let recovered = v.overloaded
        && (share.is_some_and(|s| s.received >= OVERLOAD_CLEARS)
            || estimate
                .zip(v.limited_bps)
                .is_some_and(|(e, l)| !e.limited && e.bps as f64 > l as f64 * OVERLOAD_FASTER));
    match estimate {
        Some(e) if e.limited => {
            v.limited_bps = Some(e.bps);
            v.overloaded = false;
        }
        // Its link drops what it is offered (its queue overflows, with repairs as much
        // as with the stream), though what arrives makes up for the stream.
        _ if overloaded.is_some() => {
            v.limited_bps = overloaded;
            v.overloaded = true;
        }
        _ if recovered => {
            v.limited_bps = None;
            v.overloaded = false;
        }
        // Not held back, at more than it was limited to: the link is faster now. (Less,
        // after a move down to what fits, says nothing of the link.)
        Some(e) if !v.overloaded && v.limited_bps.is_some_and(|l| e.bps > l) => {
            v.limited_bps = None;
        }
        _ => {}
    }
    let rate = v
        .limited_bps
        .or(v.adapt.as_ref().and_then(|a| a.fitting_link));
    let Some(bps) = rate else {
        v.repair_tokens = f64::INFINITY;
        v.repair_at = now;
        return u64::MAX;
    };
    let link = bps as f64;
    let rate = match stream_bps {
        // A rendition the link carries: what it leaves. (One over the link is about to
        // be moved down; its share as before, so its meter measures the link it has.)
        Some(stream) if (stream as f64) < link => (link * REPAIR_SHARE)
            .min(link - stream as f64)
            .max(link * REPAIR_FLOOR),
        Some(_) => link * REPAIR_SHARE,
        // A stream of one rate: the share of what it is sent, if that is more (a link
        // measured limited as the stream paused upstream, or as a lossy link lost what
        // was then not repaired, must not starve its holes of repairs).
        None => {
            let sent = v.speed.sent_rate(now).unwrap_or(0) as f64;
            link.max(sent) * REPAIR_SHARE
        }
    } / 8.0;
    let burst = (rate * REPAIR_BURST.as_secs_f64()).max(1500.0);
    let dt = now.saturating_duration_since(v.repair_at).as_secs_f64();
    v.repair_tokens = (v.repair_tokens + dt * rate).min(burst);
    v.repair_at = now;
    v.repair_tokens.max(0.0) as u64
}

/// A datagram viewer's flow window, packets: `base` (`viewer_window`), or, for a viewer
/// whose acknowledgements come later than `base` packets of the stream (`pps` a second)
/// take, enough for [`WINDOW_DELAYS`] of its least acknowledgement delay, at most
/// [`WINDOW_GROWTH`] times `base`: a viewer 300 ms away is not held to 64 packets per
/// 600 ms round trip (about 1.1 Mbit/s), nor measured slow for it.
fn viewer_window(base: u64, pps: f64, ack_delay: Option<Duration>) -> u64 {
    let Some(delay) = ack_delay else {
        return base;
    };
    let need = (pps * delay.as_secs_f64() * WINDOW_DELAYS).ceil() as u64;
    need.clamp(base, base * WINDOW_GROWTH)
}

/// Speeds remembered per client and per network.
const MAX_KNOWN: usize = 10_000;
/// How long a speed is remembered.
const KNOWN_TTL: Duration = Duration::from_secs(600);

/// Closed streams' last figures kept until the owner takes them.
pub const MAX_CLOSED_REPORTS: usize = 64;

/// An HLS request keeps its stream open (subscribed upstream) this long after it.
pub const HLS_LINGER: Duration = Duration::from_secs(10);

/// What the owner feeds in.
#[derive(Debug, Clone)]
pub enum Input {
    /// A message from `from`; `node` when the transport authenticated the peer as a node
    /// (a QUIC peer with a trusted certificate; every UDP peer). TCP viewers are
    /// [`Peer::Conn`] and never nodes.
    Received {
        /// Who sent it.
        from: Peer,
        /// The message as received.
        datagram: Bytes,
        /// Whether the peer proved itself a node.
        node: bool,
    },
    /// A QUIC connection went down: a viewer on it is gone, and a set reflector on it is
    /// replaced at once.
    PeerDown(SocketAddr),
    /// A QUIC connection came up.
    PeerUp(SocketAddr),
    /// A TCP viewer's connection closed (`reason`: why it was broken, counted as a drop).
    ConnGone {
        /// The connection.
        conn: u64,
        /// A framing error that closed it, if that is why.
        reason: Option<&'static str>,
    },
    /// A TCP viewer's connection wrote `count` media datagrams from its queue.
    ConnDrained {
        /// The connection.
        conn: u64,
        /// How many.
        count: usize,
    },
    /// A control server said whether this edge is drained.
    Drain(bool),
    /// Set reflectors a control server lists: unknown ones are added (the list only
    /// grows, so path numbers stay stable).
    Reflectors(Vec<SocketAddr>),
}

#[derive(Debug)]
struct Viewer {
    /// Placed once the ring can serve the requested start.
    cursor: Option<Cursor>,
    /// While it catches up after joining, its link's rate as known, bit/s (see
    /// [`PACE_GAIN`]), and the bytes it may be sent now, as of when.
    link_bps: Option<u64>,
    pace_tokens: f64,
    pace_at: Instant,
    /// Repair bytes it may be sent now, as of when (see [`REPAIR_SHARE`]), and its link's
    /// rate as last measured limited (a meter restarted at a move has no estimate yet).
    repair_tokens: f64,
    limited_bps: Option<u64>,
    /// Whether `limited_bps` was read as the link dropped what it was offered
    /// ([`OVERLOADED`]), not from the meter's estimate.
    overloaded: bool,
    repair_at: Instant,
    /// What it was sent again lately: a packet asked for again within its round trip
    /// (see [`REASK_HOLD_MAX`]) since the last copy went is not sent again.
    repaired: node::Repaired,
    start: WatchStart,
    start_seq: SeqNo,
    expires: Instant,
    /// Highest sequence number the viewer said it has.
    acked: SeqNo,
    /// Media sent and not yet acknowledged, oldest first, with when it was sent: the flow
    /// window counts these, not sequence distance, so a skip, a new source session or a
    /// restarted edge never strands a viewer behind an old acknowledgement. With each,
    /// its size (what is acknowledged is credited to its speed), and the bytes sent to it
    /// up to and with it (a viewer that counts what it received says which it has).
    in_flight: VecDeque<(SeqNo, Instant, u32, u64)>,
    /// The least delay ever seen from sending a packet to the watch that has it: a far
    /// viewer's window covers its round trip.
    ack_delay: Option<Duration>,
    /// The same delay lately (smoothed): its round trip with what queues on its link.
    /// Read with the bytes of repairs it was sent added to what it says it received:
    /// each repair stands for a copy lost (see the watch's handling).
    recent_delay: Option<Duration>,
    /// Bytes of repairs sent to it.
    repairs_sent: u64,
    /// The viewer's id, as its watches name it.
    client: NodeId,
    /// Its delivery speed.
    speed: speed::Meter,
    /// Its rendition, when its stream is one of a ladder's.
    adapt: Option<Adapt>,
    /// The last *rendition* notice, and how many more refreshes repeat it.
    rendition: Option<(u64, u8)>,
    /// While a probe runs, the bytes of copies to send per byte of the stream, and the
    /// bytes owed.
    pad_ratio: f64,
    pad_owed: f64,
    /// Media bytes it said it received from this edge in its last watch, if it counts
    /// them; bytes sent to it since it joined, and bytes credited to its speed so far.
    reported: Option<u64>,
    sent_bytes: u64,
    credited: u64,
    /// The first sequence number sent to it.
    first_sent: SeqNo,
    /// Where its cursor was placed (the *joined* notice), and how many more of its
    /// refreshes repeat the notice: the start packet and the notice can both be lost,
    /// and a viewer that misses them starts after its keyframe.
    joined: Option<(SeqNo, u8)>,
    /// A new source session's start, and how many more refreshes repeat its notice.
    session: Option<(SeqNo, u8)>,
    /// Where the session before it ended (the last packet sent to it of that session),
    /// and how many more refreshes repeat the *ended* notice.
    ended: Option<(SeqNo, u8)>,
    /// The last packet sent to it.
    last_seq: Option<SeqNo>,
    /// The source session (SSRC) of the last packet sent to it: its cursor entering
    /// another one is told where (the *session* notice), so a viewer that loses the
    /// session's first packet asks for it instead of starting after it.
    sent_ssrc: Option<u32>,
    /// The last packet sent to it, sent again once its stream goes quiet (UDP, QUIC).
    tail: TailProbe,
    /// When anything was last sent to it (media or a heartbeat).
    last_sent: Instant,
    /// When its token expires (Unix seconds), when the edge checks tokens: its watches
    /// carry the token, renewed or not, and it is served no longer than that.
    token_expires: Option<u64>,
}

struct Stream {
    merge: merge::Buffer<Packet>,
    ring: Ring<Packet>,
    viewers: BTreeMap<Peer, Viewer>,
    /// Indexes into `reflectors` subscribed to, and since when.
    upstream: Vec<(usize, Instant)>,
    /// Which source session it is in.
    session: common::Session,
    last_refresh: Option<Instant>,
    empty_since: Option<Instant>,
    /// Input arrived since the merge was last drained.
    dirty: bool,
    /// When a paced viewer of it may be sent its next packet (the earliest).
    pace_due: Option<Instant>,
    /// The set reflector subscribed beyond `subscribe_k` while repairs fail, if any.
    extra: Option<usize>,
    /// Repairs judged each [`TROUBLE_PERIOD`].
    trouble: Trouble,
    /// Its HLS segments, once an HLS player asked for it.
    hls: Option<braid_core::hls::Segmenter>,
    /// Kept open for HLS players until then.
    hls_until: Option<Instant>,
    /// The set reflectors (by index) that said they do not carry it.
    unknown_at: HashSet<usize>,
    /// Packets a second the stream brings (from what the merge released, smoothed), and
    /// the count and time it was last measured from.
    pps: f64,
    pps_mark: Option<(Instant, u64)>,
    /// Datagram bytes the merge released, all told, the newest one's RTP time stamp
    /// (its capture's send time), and marks of both over the last [`RATE_WINDOW`] of
    /// stamps: the stream's rate on the wire (see [`Edge::rates`]), by when its packets
    /// were sent, not when they came (a new subscription's first seconds come at once).
    bytes_in: u64,
    newest_stamp: Option<u32>,
    rate_marks: VecDeque<(u32, u64)>,
    /// The past before the ring's first packet, asked for viewers resuming from there.
    backfill: Option<Backfill>,
}

/// The stream's past before its ring's first packet, asked of the set reflectors (which
/// keep the last seconds) for viewers resuming from there: a restarted edge's viewers
/// come back one by one, and one whose watch comes after the stream started, at an
/// earlier point than the first viewer's, would otherwise be started at a later
/// keyframe. Its viewers wait for it; once it is whole, or after its last ask, what
/// came is put before the ring's first packet ([`Ring::prepend`]).
struct Backfill {
    /// The earliest number asked for.
    first: SeqNo,
    /// The ring's first packet when asked (not asked for).
    end: SeqNo,
    /// The source session the ring's first packet is of (an answer of another is not
    /// this stream's past).
    ssrc: u32,
    /// What came, by number from `first`, and how many of them have not.
    got: Vec<Option<Packet>>,
    lacking: usize,
    /// When it ends at the latest, however often it is extended (its viewers wait).
    until: Instant,
    /// Asks made, and when the next is due.
    asks: u8,
    next_ask: Instant,
}

impl Backfill {
    fn covers(&self, seq: SeqNo) -> bool {
        self.first <= seq && seq < self.end
    }

    /// The runs still lacking, at most `MAX_NACK_ANSWER` numbers each.
    fn lacking(&self) -> Vec<SeqRange> {
        let mut runs: Vec<SeqRange> = Vec::new();
        for (i, p) in self.got.iter().enumerate() {
            if p.is_some() {
                continue;
            }
            let seq = SeqNo(self.first.0 + i as u64);
            match runs.last_mut() {
                Some(r) if r.end() == seq && u64::from(r.count) < MAX_NACK_ANSWER => r.count += 1,
                _ => runs.push(SeqRange {
                    first: seq,
                    count: 1,
                }),
            }
        }
        runs
    }
}

/// How the repairs of a stream went over the last period: an edge whose paths keep
/// losing what it cannot repair subscribes to one more set reflector.
#[derive(Debug, Clone, Copy, Default)]
struct Trouble {
    since: Option<Instant>,
    /// The merge's counts at `since`: gaps, asks, repeated asks, released.
    at: (u64, u64, u64, u64),
    /// Calm periods in a row.
    calm: u32,
}

/// Repairs are judged this often.
const TROUBLE_PERIOD: Duration = Duration::from_secs(1);
/// An extra subscription is dropped after this many calm periods in a row.
const CALM_PERIODS: u32 = 30;

/// Whether `st`'s repairs were in trouble over the period that ended, once a period: a
/// packet given up, more than 0.5% of packets asked for more than once, or more than 2%
/// missing on every path. `None` between judgements; counts calm periods in a row.
fn judge(st: &mut Stream, now: Instant) -> Option<bool> {
    let m = st.merge.stats();
    let counts = (m.gaps, m.nacked, m.nack_retries, m.released);
    let t = &mut st.trouble;
    let Some(since) = t.since else {
        t.since = Some(now);
        t.at = counts;
        return None;
    };
    if now.duration_since(since) < TROUBLE_PERIOD {
        return None;
    }
    let d = |a: u64, b: u64| a.saturating_sub(b);
    let (gaps, asked, repeats, released) = (
        d(counts.0, t.at.0),
        d(counts.1, t.at.1),
        d(counts.2, t.at.2),
        d(counts.3, t.at.3),
    );
    t.since = Some(now);
    t.at = counts;
    let troubled = gaps > 0 || repeats * 200 > released || asked * 50 > released;
    t.calm = if troubled { 0 } else { t.calm + 1 };
    Some(troubled)
}

/// A viewer's network (/24, or /48 over IPv6), as a number; none for a TCP viewer, whose
/// address the machine does not see.
fn network(from: Peer) -> Option<u64> {
    match from {
        Peer::Addr(a) => Some(match a.ip() {
            std::net::IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8),
            std::net::IpAddr::V6(v6) => {
                let s = v6.segments();
                1 << 63 | u64::from(s[0]) << 32 | u64::from(s[1]) << 16 | u64::from(s[2])
            }
        }),
        Peer::Conn(_) => None,
    }
}

/// A viewer's delivery speed, as [`Edge::speeds`] says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewerSpeed {
    /// Its stream.
    pub stream: StreamId,
    /// Where it is served.
    pub peer: Peer,
    /// Its id.
    pub client: NodeId,
    /// Its rate, bit/s (0 before the first sample).
    pub bps: u64,
    /// Whether its link set that rate (otherwise it took all it was sent).
    pub limited: bool,
    /// Whether it has been limited for long (see [`speed::Config::slow_after`]).
    pub slow: bool,
}

/// The edge's state machine.
pub struct Edge {
    config: Config,
    clock: WallClock,
    streams: BTreeMap<StreamId, Stream>,
    out: Outbox<std::convert::Infallible>,
    counters: Counters,
    viewers: usize,
    now: Option<Instant>,
    next_housekeeping: Option<Instant>,
    /// Housekeeping rounds so far.
    ticks: u64,
    draining: bool,
    last_drain_signal: Option<Instant>,
    /// QUIC peers whose connection is down (subscriptions move off them).
    quic_down: HashSet<SocketAddr>,
    /// Media datagrams queued per TCP connection, not yet written: their sizes, oldest
    /// first (what the socket drains is credited to the viewer's speed).
    tcp_queued: HashMap<u64, VecDeque<u32>>,
    /// Viewers now slow (by stream and peer), and how many turned slow so far.
    slow: HashSet<(StreamId, Peer)>,
    /// Each ladder stream's ladder and rendition index.
    ladder_of: HashMap<StreamId, (usize, usize)>,
    /// Each ladder's rates: each rendition's nominal rate, or what its stream measures
    /// (or last measured, while this edge does not take it) on the wire over the last
    /// [`RATE_WINDOW`] where that is more (its headers, tables
    /// and audio on top of a label that counts the video): a rendition fits a link by
    /// what it takes of it. (A playlist's BANDWIDTH is the same: the peak it takes.)
    rates: Vec<Vec<u64>>,
    /// Each ladder's renditions' rates on the wire as last measured here (what a
    /// rendition leaves of a link for its repairs: a label above what it carries must
    /// not starve them).
    wire: Vec<Vec<Option<u64>>>,
    /// Target renditions already warned of unaligned keyframes.
    warned_unaligned: HashSet<StreamId>,
    /// Speeds last measured, per client id and per network (/24, /48), with when.
    known_clients: HashMap<u64, (speed::Estimate, Instant)>,
    known_networks: HashMap<u64, (speed::Estimate, Instant)>,
    /// Peers already logged as refused (one line each; the counter counts them all).
    warned: HashSet<Peer>,
    /// Viewers' addresses are validated before they are sent anything.
    cookies: Cookies,
    /// Each set reflector's cookie for this edge's address.
    upstream_cookies: HashMap<SocketAddr, Cookie>,
    /// Streams closed since the owner last took their final figures.
    closed: Vec<common::StreamReport>,
}

impl Edge {
    /// An edge reading and signing with `codec`; `clock` gives wall time for tokens.
    pub fn new(config: Config, codec: Codec, clock: WallClock) -> Result<Edge, braid_core::Error> {
        config.settings.merge.validate()?;
        config.ring.validate()?;
        config.adapt.validate()?;
        let mut ladder_of = HashMap::new();
        for (l, ladder) in config.ladders.iter().enumerate() {
            let ascending = ladder.windows(2).all(|w| w[0].1 < w[1].1);
            if ladder.is_empty() || ladder.len() > 15 || !ascending {
                return Err(braid_core::Error::InvalidConfig(
                    "a ladder has 1 to 15 renditions, rates ascending".into(),
                ));
            }
            for (r, (id, _)) in ladder.iter().enumerate() {
                if ladder_of.insert(*id, (l, r)).is_some() {
                    return Err(braid_core::Error::InvalidConfig(format!(
                        "stream {id} is in two ladders, or twice in one"
                    )));
                }
            }
        }
        let rates = config
            .ladders
            .iter()
            .map(|l| l.iter().map(|r| r.1).collect())
            .collect();
        let wire = config.ladders.iter().map(|l| vec![None; l.len()]).collect();
        Ok(Edge {
            config,
            clock,
            streams: BTreeMap::new(),
            out: Outbox::new(codec),
            counters: Counters::default(),
            viewers: 0,
            now: None,
            next_housekeeping: None,
            ticks: 0,
            draining: false,
            last_drain_signal: None,
            quic_down: HashSet::new(),
            tcp_queued: HashMap::new(),
            slow: HashSet::new(),
            ladder_of,
            rates,
            wire,
            warned_unaligned: HashSet::new(),
            known_clients: HashMap::new(),
            known_networks: HashMap::new(),
            warned: HashSet::new(),
            cookies: Cookies::random(),
            upstream_cookies: HashMap::new(),
            closed: Vec::new(),
        })
    }

    /// This edge, making its address-validation cookies under `secret` (the simulator's,
    /// drawn from its seed) rather than a random one.
    #[must_use]
    pub fn with_cookie_secret(mut self, secret: [u8; 32]) -> Edge {
        self.cookies = Cookies::new(secret);
        self
    }

    /// What happened so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Viewers now, over every stream.
    pub fn viewers(&self) -> usize {
        self.viewers
    }

    /// Whether a control server drained this edge.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Every stream's figures.
    pub fn reports(&self) -> Vec<common::StreamReport> {
        self.streams
            .iter()
            .map(|(id, st)| common::report(*id, &st.merge, st.viewers.len(), 0))
            .collect()
    }

    /// The last figures of the streams closed since the last call (at most
    /// [`MAX_CLOSED_REPORTS`]): what the merge released and held until it closed.
    pub fn take_closed(&mut self) -> Vec<common::StreamReport> {
        std::mem::take(&mut self.closed)
    }

    /// Streams open, viewers, and packets held (merge and ring), for the simulator's
    /// bounds.
    pub fn footprint(&self) -> (usize, usize, usize) {
        let held = self
            .streams
            .values()
            .map(|s| s.merge.held() + s.ring.len())
            .sum();
        (self.streams.len(), self.viewers, held)
    }

    /// Every viewer's delivery speed as measured so far (see [`speed`]).
    pub fn speeds(&self, now: Instant) -> Vec<ViewerSpeed> {
        self.streams
            .iter()
            .flat_map(|(id, st)| {
                st.viewers.iter().map(move |(key, v)| {
                    let e = v.speed.estimate(now);
                    ViewerSpeed {
                        stream: *id,
                        peer: *key,
                        client: v.client,
                        bps: e.map_or(0, |e| e.bps),
                        limited: e.is_some_and(|e| e.limited),
                        slow: v.speed.slow(now),
                    }
                })
            })
            .collect()
    }

    /// Viewers slow now.
    pub fn slow_viewers(&self) -> usize {
        self.slow.len()
    }

    /// The set reflectors known, by path number.
    pub fn reflectors(&self) -> &[SocketAddr] {
        &self.config.reflectors
    }

    /// Takes one input.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.now = Some(now);
        // Housekeeping starts with the first input.
        self.next_housekeeping.get_or_insert(now + HOUSEKEEPING);
        match input {
            Input::Received {
                from,
                datagram,
                node,
            } => self.handle_message(now, from, datagram, node),
            Input::PeerDown(peer) => {
                let ids: Vec<StreamId> = self.streams.keys().copied().collect();
                for id in ids {
                    self.remove_viewer(id, Peer::Addr(peer));
                }
                if self.config.reflectors.contains(&peer) {
                    self.quic_down.insert(peer);
                    self.housekeeping(now);
                }
            }
            Input::PeerUp(peer) => {
                self.quic_down.remove(&peer);
            }
            Input::ConnGone { conn, reason } => {
                if let Some(r) = reason {
                    self.counters.drops.add(r);
                }
                let ids: Vec<StreamId> = self.streams.keys().copied().collect();
                for id in ids {
                    self.remove_viewer(id, Peer::Conn(conn));
                }
                self.tcp_queued.remove(&conn);
            }
            Input::ConnDrained { conn, count } => {
                if let Some(q) = self.tcp_queued.get_mut(&conn) {
                    let n = count.min(q.len());
                    let bytes: u64 = q.drain(..n).map(u64::from).sum();
                    // The socket took them: the viewer's speed, as TCP measures it.
                    for st in self.streams.values_mut() {
                        if let Some(v) = st.viewers.get_mut(&Peer::Conn(conn)) {
                            v.speed.delivered(now, bytes);
                        }
                    }
                }
                // The queue has room again: serve whoever was waiting for it.
                self.serve_all(now, Some(Peer::Conn(conn)));
            }
            Input::Drain(on) => self.draining = on,
            Input::Reflectors(list) => self.learn_reflectors(list),
        }
    }

    /// Runs what is due at `now`: merge deadlines and, every 100 ms, lease expiry,
    /// refreshes, path replacement, linger and drain signals.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        for st in self.streams.values_mut() {
            st.dirty = true;
        }
        if self.next_housekeeping.is_none_or(|t| now >= t) {
            self.housekeeping(now);
        }
    }

    /// The next thing to do; [`Output::Timeout`] when there is nothing.
    pub fn poll_output(&mut self) -> Output<std::convert::Infallible> {
        if let Some(now) = self.now {
            self.drain_dirty(now);
        }
        if let Some(o) = self.out.pop() {
            return o;
        }
        let mut deadline = self.next_housekeeping;
        for st in self.streams.values() {
            deadline = common::earliest(deadline, st.merge.next_timeout());
            deadline = common::earliest(deadline, st.pace_due);
        }
        Output::Timeout(deadline)
    }

    /// On shutdown: unsubscribe from every set reflector, so they stop at once.
    pub fn leave(&mut self) {
        let node = self.config.settings.node;
        for (id, st) in &self.streams {
            for (i, _) in &st.upstream {
                let to = Peer::Addr(self.config.reflectors[*i]);
                self.out.control(to, *id, Body::Unsubscribe { node });
            }
        }
    }

    fn drain_dirty(&mut self, now: Instant) {
        let ids: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(st) = self.streams.get_mut(&id) else {
                continue;
            };
            st.dirty = false;
            let reflectors = &self.config.reflectors;
            let mut gaps = Vec::new();
            let wall_ms = self.clock.unix_ms(now);
            let hls = &mut st.hls;
            let (mut released_bytes, mut newest_stamp) = (0u64, None);
            let pushed = common::drain_merge(
                now,
                id,
                &mut st.merge,
                &mut st.ring,
                &mut self.out,
                &mut self.counters,
                |path| reflectors.get(usize::from(path.0)).copied(),
                |_, p| {
                    released_bytes += p.datagram.len() as u64;
                    let f = p.media.rtp.fields();
                    newest_stamp = Some(f.timestamp);
                    if let Some(h) = hls.as_mut() {
                        h.push(
                            p.media.seq,
                            f.timestamp,
                            f.ssrc,
                            p.header.flags.contains(Flags::KEYFRAME),
                            p.media.rtp.segment(),
                            p.media.rtp.payload(),
                            wall_ms,
                        );
                    }
                },
                // Every path lost it and the repairs failed: the viewers stop waiting
                // for it now rather than for the whole of their buffer.
                |_, first, count| gaps.push((first, count)),
            );
            st.bytes_in += released_bytes;
            st.newest_stamp = newest_stamp.or(st.newest_stamp);
            // Every path lost these and the repairs failed: the viewers stop waiting for
            // them now rather than for the whole of their buffer.
            for (first, count) in gaps {
                // The first number in the upper 48 bits (numbers stay below 2^48), how
                // many in the lower 16.
                let value = first.0 << 16 | count.min(u64::from(u16::MAX));
                let notice = Body::Notice {
                    kind: NoticeKind::Gap,
                    value,
                };
                if let Some(d) = self.out.encode(id, notice) {
                    for key in st.viewers.keys() {
                        self.out.send(*key, d.clone(), false);
                    }
                }
            }
            // New packets, or a paced viewer's turn.
            if pushed || st.pace_due.is_some_and(|t| now >= t) {
                self.serve(now, id, None);
            }
        }
    }

    fn handle_message(&mut self, now: Instant, from: Peer, bytes: Bytes, node: bool) {
        let (class, msg) = match self.out.codec().decode_any(bytes.clone()) {
            Ok(m) => m,
            Err(e) => {
                self.counters.drops.add(e.reason());
                return;
            }
        };
        // A viewer signs only what a viewer says; a source says nothing to an edge.
        let viewer_kind = matches!(
            msg.body,
            Body::Watch(_) | Body::Nack(_) | Body::Unsubscribe { .. } | Body::Keepalive(_)
        );
        if class == Class::Source || (class == Class::Viewer && !viewer_kind) {
            self.counters.drops.add("not_a_node");
            return;
        }
        let id = msg.header.stream;
        if !self.config.settings.carries(id) {
            self.counters.drops.add("unknown_stream");
            // Never an error for an error: two nodes that both do not carry a stream
            // would trade them forever.
            if !matches!(msg.body, Body::Error { .. }) {
                self.reply_error(
                    from,
                    id,
                    ErrorCode::UNKNOWN_STREAM,
                    "stream not carried here",
                );
            }
            return;
        }
        if matches!(msg.body, Body::Media(_)) && !node {
            self.counters.drops.add("not_a_node");
            if self.warned.len() < 1024 && self.warned.insert(from) {
                tracing::warn!(peer = %from, "refused: media from a peer without a trusted certificate");
            }
            return;
        }
        match (from, msg.body) {
            (Peer::Addr(from), Body::Media(media)) => {
                let Some(st) = self.streams.get_mut(&id) else {
                    // Nobody watches it here (any more): the subscription will lapse.
                    self.counters.drops.add("not_subscribed");
                    return;
                };
                let Some(i) = self.config.reflectors.iter().position(|r| *r == from) else {
                    self.counters.drops.add("unknown_peer");
                    return;
                };
                let (seq, keyframe) = (media.seq, msg.header.flags.contains(Flags::KEYFRAME));
                // The stream's past asked for viewers resuming from before the ring's
                // start: kept aside (for the merge, it is long released).
                if let Some(b) = st.backfill.as_mut().filter(|b| b.covers(seq)) {
                    let slot = &mut b.got[(seq.0 - b.first.0) as usize];
                    if media.rtp.fields().ssrc != b.ssrc {
                        self.counters.drops.add("backfill_other_session");
                    } else if slot.is_some() {
                        self.counters.drops.add("backfill_duplicate");
                    } else {
                        *slot = Some(Packet {
                            datagram: bytes,
                            header: msg.header,
                            media,
                        });
                        b.lacking -= 1;
                        if b.lacking == 0 {
                            self.finish_backfill(now, id);
                        }
                    }
                    return;
                }
                common::accept_media(
                    now,
                    &mut st.merge,
                    &mut st.session,
                    &mut self.counters,
                    PathId(i as u8),
                    bytes,
                    msg.header,
                    media,
                );
                // A cold stream whose first packet is a keyframe (a set reflector's
                // preburst of its latest group of pictures starts with one) starts there
                // at once: new viewers start at a keyframe anyway, and the packets
                // before it are of no use to them.
                if keyframe && st.ring.is_empty() && st.merge.next_seq() == Some(seq) {
                    st.merge.start_now();
                }
                st.dirty = true;
            }
            (_, Body::Watch(watch)) => self.handle_watch(now, from, id, watch),
            (_, Body::Unsubscribe { .. }) => {
                let id = self.viewer_stream(id, from).unwrap_or(id);
                self.remove_viewer(id, from)
            }
            (Peer::Addr(_), Body::Nack(ranges)) => {
                // A viewer of a ladder asks for what it lacks of the rendition it left
                // naming that rendition's stream.
                let Some(holder) = self.viewer_stream(id, from).or_else(|| {
                    self.streams
                        .get(&id)
                        .filter(|st| st.viewers.contains_key(&from))
                        .map(|_| id)
                }) else {
                    let reason = if self.streams.contains_key(&id) {
                        "nack_from_stranger"
                    } else {
                        "nack_unknown_stream"
                    };
                    self.counters.drops.add(reason);
                    return;
                };
                // What its link has room for, when the link is measured limited: beside
                // the rendition it is served now, when it is a ladder's.
                let stream_bps = self.ladder_of.get(&holder).and_then(|&(l, i)| {
                    let wire = self.wire.get(l)?.get(i).copied().flatten();
                    wire.or_else(|| self.rates.get(l)?.get(i).copied())
                });
                let mut flooded = false;
                let (budget, mut repaired, round_trip) = self
                    .streams
                    .get_mut(&holder)
                    .and_then(|st| st.viewers.get_mut(&from))
                    .map_or((u64::MAX, node::Repaired::default(), None), |v| {
                        let was = v.overloaded;
                        let budget = repair_budget(now, v, stream_bps);
                        flooded = v.overloaded && !was;
                        (
                            budget,
                            std::mem::take(&mut v.repaired),
                            // (A ladder's viewer: one of one rate, on a lossy link, asks
                            // again at its own pace; its holes have nowhere else to go.)
                            v.ack_delay
                                .max(v.recent_delay)
                                .filter(|_| v.adapt.is_some()),
                        )
                    });
                if flooded {
                    self.counters.repair_floods += 1;
                    tracing::debug!(viewer = %from, "repairs flood its link: held to what it receives");
                }
                let round_trip = round_trip.unwrap_or_default().min(REASK_HOLD_MAX);
                let mut fresh = |seq| repaired.fresh(now, round_trip, seq);
                let Some(st) = self.streams.get(&id) else {
                    self.counters.drops.add("nack_unknown_stream");
                    return;
                };
                let mut a = node::answer_nack_within(
                    &mut self.out,
                    &st.ring,
                    from,
                    &ranges,
                    MAX_NACK_ANSWER,
                    budget,
                    &mut fresh,
                );
                // What that rendition does not hold, another of the ladder may: every
                // rendition numbers its packets apart (see PROTOCOL.md).
                if a.missing > 0 {
                    if let Some(&(l, _)) = self.ladder_of.get(&id) {
                        for (other, _) in &self.config.ladders[l] {
                            let Some(ost) = self.streams.get(other).filter(|_| *other != id) else {
                                continue;
                            };
                            let b = node::answer_nack_within(
                                &mut self.out,
                                &ost.ring,
                                from,
                                &ranges,
                                MAX_NACK_ANSWER,
                                budget.saturating_sub(a.bytes),
                                &mut fresh,
                            );
                            a.sent += b.sent;
                            a.bytes += b.bytes;
                            a.over_budget += b.over_budget;
                            a.too_soon += b.too_soon;
                            a.missing = a.missing.saturating_sub(b.sent);
                        }
                    }
                }
                // Repairs count to what it can be credited with, once it says it has them.
                if let Some(v) = self
                    .streams
                    .get_mut(&holder)
                    .and_then(|st| st.viewers.get_mut(&from))
                {
                    v.repaired = repaired;
                    v.sent_bytes += a.bytes;
                    v.speed.repaired(now, a.bytes);
                    v.repairs_sent += a.bytes;
                    if budget != u64::MAX {
                        v.repair_tokens -= a.bytes as f64;
                    }
                    // A probe that makes it lose packets (more than one in twenty of
                    // those sent meanwhile: a lossy link loses some anyway) ends now.
                    if let Some(ad) = v.adapt.as_mut().filter(|ad| ad.probe_started.is_some()) {
                        ad.probe_nacked += ranges.iter().map(|r| u64::from(r.count)).sum::<u64>();
                        if ad.probe_nacked * 20 > ad.probe_sent.max(40)
                            && ad.chooser.probe_lost(now)
                        {
                            // Its copies stop now, not at the next look: each one more
                            // overflows the link further.
                            v.pad_ratio = 0.0;
                            self.counters.probe_loss_ends += 1;
                        }
                    }
                }
                self.counters.retransmit_sent += a.sent;
                self.counters.retransmit_missing += a.missing;
                self.counters.repairs_over_budget += a.over_budget;
                self.counters.repairs_too_soon += a.too_soon;
                if a.over_limit {
                    self.counters.drops.add("nack_over_limit");
                }
            }
            (Peer::Addr(_), Body::Keepalive(k)) => {
                // A viewer probing this edge: echo its time so it can measure the round trip.
                let reply = Body::Keepalive(Keepalive {
                    node: self.config.settings.node,
                    sent_us: 0,
                    echo_us: k.sent_us,
                });
                self.out.control(from, id, reply);
            }
            (Peer::Addr(a), Body::Cookie { cookie }) => {
                // A set reflector validating this edge's address: subscribe again with
                // the cookie to every stream that uses it.
                if !self.config.reflectors.contains(&a) {
                    self.counters.drops.add("unknown_peer");
                    return;
                }
                let fresh = self.upstream_cookies.insert(a, cookie) != Some(cookie);
                if fresh {
                    let ids: Vec<StreamId> = self
                        .streams
                        .iter()
                        .filter(|(_, st)| {
                            st.upstream
                                .iter()
                                .any(|(i, _)| self.config.reflectors[*i] == a)
                        })
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ids {
                        self.subscribe_one(id, a);
                    }
                }
            }
            (Peer::Addr(a), Body::Error { code, text }) => {
                // A set reflector refusing this edge: counted, and said once per peer
                // with its reason (an operator's configuration error, as a rule).
                self.counters.refusals += 1;
                // A stream none of its set reflectors carries is unknown here: HLS
                // requests for it are answered at once.
                if code == ErrorCode::UNKNOWN_STREAM {
                    let index = self.config.reflectors.iter().position(|r| *r == a);
                    if let (Some(i), Some(st)) = (index, self.streams.get_mut(&id)) {
                        st.unknown_at.insert(i);
                    }
                }
                if self.warned.len() < 1024 && self.warned.insert(from) {
                    tracing::warn!(peer = %a, code = code.0, "refused by a set reflector: {text}");
                }
            }
            _ => self.counters.drops.add("unexpected_kind"),
        }
    }

    /// An HLS player asked for stream `id` (its token, if any, already checked): the
    /// stream opens (subscribed upstream) and is cut into segments, and stays open
    /// [`HLS_LINGER`] after the last such request. False when the edge takes no more
    /// streams, or serves no HLS.
    pub fn hls_interest(&mut self, now: Instant, id: StreamId) -> bool {
        let Some(config) = self.config.hls.clone() else {
            return false;
        };
        if !self.config.settings.carries(id) {
            // Not opened: [`Edge::stream_unknown`] says why.
            return true;
        }
        if !self.streams.contains_key(&id) && self.streams.len() >= self.config.settings.max_streams
        {
            self.counters.drops.add("stream_cap");
            return false;
        }
        let generation = self.clock.unix_ms(now);
        let Ok(st) = self.stream(id, now) else {
            return false;
        };
        if st.hls.is_none() {
            match braid_core::hls::Segmenter::new(config, generation) {
                Ok(s) => st.hls = Some(s),
                Err(_) => return false,
            }
        }
        st.hls_until = Some(now + HLS_LINGER);
        st.empty_since = None;
        if st.upstream.is_empty() {
            self.subscribe_upstream(now, id);
        }
        true
    }

    /// Whether this edge is configured without stream `id` (`--stream`), or every set
    /// reflector it is subscribed to for it said it does not carry it.
    pub fn stream_unknown(&self, id: StreamId) -> bool {
        !self.config.settings.carries(id)
            || self.streams.get(&id).is_some_and(|st| {
                !st.upstream.is_empty()
                    && st.upstream.iter().all(|(i, _)| st.unknown_at.contains(i))
            })
    }

    /// Stream `id`'s HLS segmenter, once an HLS player asked for it.
    pub fn hls(&self, id: StreamId) -> Option<&braid_core::hls::Segmenter> {
        self.streams.get(&id)?.hls.as_ref()
    }

    /// Every HLS segmenter's figures, by stream.
    pub fn hls_stats(&self) -> Vec<(StreamId, braid_core::hls::Stats)> {
        self.streams
            .iter()
            .filter_map(|(id, s)| Some((*id, s.hls.as_ref()?.stats())))
            .collect()
    }

    /// A number that grows whenever any stream's HLS segmenter completes a part, or a
    /// set reflector says it does not carry a stream.
    pub fn hls_progress(&self) -> u64 {
        self.streams
            .values()
            .map(|s| s.hls.as_ref().map_or(0, |h| h.stats().parts) + s.unknown_at.len() as u64)
            .sum()
    }

    fn stream(&mut self, id: StreamId, now: Instant) -> Result<&mut Stream, braid_core::Error> {
        if !self.streams.contains_key(&id) {
            tracing::info!(stream = id.0, "stream opened");
            self.streams.insert(
                id,
                Stream {
                    merge: merge::Buffer::new(self.config.settings.merge.clone())?,
                    ring: Ring::new(self.config.ring.clone())?,
                    viewers: BTreeMap::new(),
                    upstream: Vec::new(),
                    session: common::Session::default(),
                    last_refresh: None,
                    empty_since: Some(now),
                    dirty: false,
                    pace_due: None,
                    extra: None,
                    trouble: Trouble::default(),
                    hls: None,
                    hls_until: None,
                    unknown_at: HashSet::new(),
                    pps: 0.0,
                    pps_mark: None,
                    bytes_in: 0,
                    newest_stamp: None,
                    rate_marks: VecDeque::new(),
                    backfill: None,
                },
            );
        }
        Ok(self.streams.get_mut(&id).expect("inserted above"))
    }

    fn remove_viewer(&mut self, id: StreamId, key: Peer) {
        if let Some(st) = self.streams.get_mut(&id) {
            if st.viewers.remove(&key).is_some() {
                self.viewers -= 1;
                self.counters.viewer_leaves += 1;
            }
        }
    }

    fn handle_watch(&mut self, now: Instant, from: Peer, id: StreamId, watch: Watch) {
        // Nothing is sent to an address before it shows it receives there (a watch gets
        // a cookie, smaller than itself, until it echoes one), and a recorded watch is
        // worth nothing from another address or connection, or a minute later.
        let subject = match from {
            Peer::Addr(a) => Subject::Addr(a),
            Peer::Conn(c) => Subject::Conn(c),
        };
        match self.cookies.check(now, subject, &watch.cookie) {
            cookie::Check::Fresh => {}
            check => {
                if check == cookie::Check::Bad {
                    self.counters.drops.add("cookie_missing");
                }
                let cookie = self.cookies.issue(now, subject);
                self.out.control(from, id, Body::Cookie { cookie });
                if !check.ok() {
                    return;
                }
            }
        }
        let unix = self.clock.unix_secs(now);
        let (max_stream, max_node) = (self.config.settings.max_per_stream, self.config.max_viewers);
        let node_full = self.viewers >= max_node;
        let lease = Duration::from_millis(u64::from(watch.lease_ms)).min(MAX_LEASE);
        // A viewer of a ladder may name the rendition it was on before a move.
        let id = self.viewer_stream(id, from).unwrap_or(id);
        let pps = self.streams.get(&id).map_or(0.0, |st| st.pps);
        if let Some(v) = self
            .streams
            .get_mut(&id)
            .and_then(|st| st.viewers.get_mut(&from))
        {
            if let (Some(a), Some(p)) = (v.adapt.as_mut(), watch.policy) {
                a.chooser.set_policy(p);
            }
            // The token is checked again once the one it was let in with expires: a
            // renewed token in its watches keeps it served, an expired one ends it.
            if let (Some(exp), Some(signer)) = (v.token_expires, &self.config.tokens) {
                if unix >= exp {
                    let token = std::str::from_utf8(&watch.token).unwrap_or("");
                    match signer.verify_for(id, token, unix) {
                        Ok(c) if c.client.0 == watch.node.0 => v.token_expires = Some(c.expires),
                        res => {
                            self.counters.drops.add("token_expired");
                            let text = match res {
                                Err(e) => format!("viewer token refused: {e}: renew it"),
                                Ok(_) => "viewer token is for another viewer".to_owned(),
                            };
                            self.remove_viewer(id, from);
                            self.reply_error(from, id, ErrorCode::UNAUTHORIZED, &text);
                            return;
                        }
                    }
                }
            }
            v.expires = now + lease;
            if watch.acked > v.acked {
                v.acked = watch.acked;
            }
            // What it has is no longer in flight, and counts to its speed: what it says
            // it received, when it counts (never more than was sent to it); otherwise
            // what it acknowledged (holes below the highest number included).
            // How long its packets take to be acknowledged: the newest of this edge's it
            // has, by the bytes it counts from this edge. Its highest number says nothing
            // here (it may come from an edge it is leaving, 20 ms after this one sent
            // what is 300 ms away), so a viewer that does not count keeps the base window.
            // When the newest packet within `bytes` sent to it went.
            let sent_within = |bytes: u64| {
                v.in_flight
                    .iter()
                    .take_while(|(.., cum)| *cum <= bytes)
                    .last()
                    .map(|(_, sent, ..)| *sent)
            };
            let newest = watch.received.and_then(sent_within);
            // Lately, by the same bytes with those of every repair sent added: every
            // copy lost (a first one, or a repair) that is repaired is one repair more,
            // so what the viewer counts and what was sent to it no longer drift apart
            // with each loss, as they do above until no packet maps at all (a viewer
            // whose link overflows stops being measured just as its queue stands).
            // Repairs still on their way, and repairs not needed (sent again while the
            // first copy waited in a queue, both arrive and both are counted), read it
            // early: on a link that is sent several copies of each hole, far early.
            let newest_lately = watch
                .received
                .and_then(|r| sent_within(r.saturating_add(v.repairs_sent)));
            if let Some(sent) = newest_lately {
                let d = now.saturating_duration_since(sent);
                v.recent_delay = Some(v.recent_delay.map_or(d, |r| (r * 3 + d) / 4));
            }
            let mut bytes = 0;
            while let Some(&(_, _, size, _)) =
                v.in_flight.front().filter(|(s, ..)| *s <= watch.acked)
            {
                bytes += u64::from(size);
                v.in_flight.pop_front();
            }
            if let Some(sent) = newest {
                let d = now.saturating_duration_since(sent);
                // The least ever seen: queueing on a congested link (its own packets
                // waiting in a bottleneck) never grows the window, only the path's delay.
                if v.ack_delay.is_none_or(|least| d < least) {
                    tracing::debug!(viewer = %from, ms = d.as_millis() as u64, "least acknowledgement delay");
                    v.ack_delay = Some(d);
                }
                // A probe whose packets queue on the link ends before the queue
                // overflows: a link without room shows it by delay first, and every
                // loss then costs the stream's own packets, whose repairs wait behind
                // the full queue. (A watch goes up to a packet's interval after the
                // newest packet it acknowledges: that much delay is no queue.)
                let queued = v.ack_delay.map(|least| d.saturating_sub(least));
                let interval = if pps > 0.0 {
                    Duration::from_secs_f64((1.0 / pps).min(0.25))
                } else {
                    Duration::from_millis(250)
                };
                if let Some(ad) = v.adapt.as_mut().filter(|ad| ad.probe_started.is_some()) {
                    if queued.is_some_and(|q| q > PROBE_QUEUE + interval)
                        && ad.chooser.probe_lost(now)
                    {
                        tracing::debug!(viewer = %from, ms = queued.unwrap_or_default().as_millis() as u64, "probe ended: its packets queue");
                        v.pad_ratio = 0.0;
                        self.counters.probe_delay_ends += 1;
                    }
                }
            }
            match (watch.received, v.reported) {
                (Some(r), Some(before)) if matches!(from, Peer::Addr(_)) => {
                    let told = r.saturating_sub(before);
                    let room = v.sent_bytes.saturating_sub(v.credited);
                    let credit = told.min(room);
                    v.credited += credit;
                    v.speed.delivered(now, credit);
                }
                (Some(_), None) => {}
                _ => v.speed.delivered(now, bytes),
            }
            if watch.received.is_some() {
                v.reported = watch.received;
            }
            let mut repeat = Vec::new();
            // A viewer that says which *rendition* notice it took is told the last one
            // until it took it (on a link overflowing before a move down, every copy
            // of a few may be lost, and its stats would show the wrong rendition); one
            // that does not say, on its next few refreshes.
            if let Some((value, left)) = v.rendition {
                let lacks = match watch.rendition {
                    Some(took) => took != value as u32,
                    None => left > 0,
                };
                if lacks {
                    v.rendition = Some((value, left.saturating_sub(1)));
                    repeat.push(Body::Notice {
                        kind: NoticeKind::Rendition,
                        value,
                    });
                }
            }
            for (slot, kind) in [
                (&mut v.joined, NoticeKind::Joined),
                (&mut v.ended, NoticeKind::Ended),
                (&mut v.session, NoticeKind::Session),
            ] {
                if let Some((first, left @ 1..)) = *slot {
                    *slot = Some((first, left - 1));
                    repeat.push(Body::Notice {
                        kind,
                        value: first.0,
                    });
                }
            }
            for notice in repeat {
                self.out.control(from, id, notice);
            }
            // The window may have opened: serve this viewer now.
            self.serve(now, id, Some(from));
            return;
        }
        if self.draining {
            self.counters.drops.add("draining");
            self.reply_error(
                from,
                id,
                ErrorCode::DRAINING,
                "this edge is draining: ask the control server for another",
            );
            return;
        }
        let mut token_expires = None;
        if let Some(signer) = &self.config.tokens {
            let token = std::str::from_utf8(&watch.token).unwrap_or("");
            // A token is good for the viewer it was issued to: the watch's viewer id.
            let checked = signer
                .verify_for(id, token, unix)
                .map_err(|e| format!("viewer token refused: {e}"))
                .and_then(|c| {
                    if c.client.0 == watch.node.0 {
                        Ok(c)
                    } else {
                        Err("viewer token refused: it was issued to another viewer".to_owned())
                    }
                });
            match checked {
                Ok(c) => token_expires = Some(c.expires),
                Err(text) => {
                    self.counters.drops.add("bad_token");
                    self.reply_error(from, id, ErrorCode::UNAUTHORIZED, &text);
                    return;
                }
            }
        }
        // A new viewer of a ladder gets the rendition its client's or network's last
        // measured speed fits (the lowest, if none); one resuming stays where it was
        // until its next keyframe.
        let mut id = id;
        let mut adapt = None;
        // Its link's rate, when known here or from its client: it is paced from the start
        // (a viewer switching edges on a capped link gets its catch-up at that rate).
        let mut link_bps = None;
        if let Some(&(l, r)) = self.ladder_of.get(&id) {
            let rates = self.rates[l].clone();
            let known = self.known(now, watch.node, from);
            let policy = watch.policy.unwrap_or_default();
            // What its client says an edge last moved it down to bounds where it starts,
            // and moves a resuming viewer down at its first keyframe here: a viewer
            // switching edges on a capped link would otherwise overflow it for the
            // whole meter's window again.
            let fitting = watch.fits_kbps.map(|k| u64::from(k) * 1000);
            let fitting_link = fitting.map(|f| (f as f64 / self.config.adapt.share) as u64);
            link_bps = known.filter(|k| k.limited).map(|k| k.bps).or(fitting_link);
            let mut chooser = speed::Chooser::join(
                self.config.adapt.clone(),
                policy,
                &rates,
                known,
                fitting,
                now,
            );
            let mut pending = None;
            if watch.start == WatchStart::Seq {
                pending = chooser.resume(now, &rates, r, fitting);
            } else {
                id = self.config.ladders[l][chooser.current()].0;
            }
            adapt = Some(Adapt {
                ladder: l,
                chooser,
                pending,
                waiting: None,
                passed: None,
                unaligned: 0,
                abandoned: false,
                fitting_link,
                probe_started: None,
                probe_sent: 0,
                probe_nacked: 0,
            });
        }
        // A stream is opened (and subscribed upstream) only for a viewer let in, and
        // only so many at once.
        if !self.streams.contains_key(&id) && self.streams.len() >= self.config.settings.max_streams
        {
            self.counters.drops.add("stream_cap");
            self.reply_error(
                from,
                id,
                ErrorCode::CAPACITY,
                "too many streams on this edge",
            );
            return;
        }
        if self.stream(id, now).is_err() {
            return;
        }
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        if st.viewers.len() >= max_stream || node_full {
            self.counters.drops.add("viewer_cap");
            let text = if node_full {
                "this edge is full: too many viewers on this node"
            } else {
                "too many viewers for this stream on this edge"
            };
            self.reply_error(from, id, ErrorCode::CAPACITY, text);
            return;
        }
        st.viewers.insert(
            from,
            Viewer {
                cursor: None,
                link_bps,
                // A whole burst to start with (cut down to it at the first look).
                pace_tokens: f64::INFINITY,
                pace_at: now,
                repair_tokens: f64::INFINITY,
                limited_bps: None,
                overloaded: false,
                repair_at: now,
                repaired: node::Repaired::default(),
                start: watch.start,
                start_seq: watch.seq,
                expires: now + lease,
                acked: watch.acked,
                in_flight: VecDeque::new(),
                ack_delay: None,
                recent_delay: None,
                repairs_sent: 0,
                client: watch.node,
                speed: speed::Meter::new(self.config.speed.clone()),
                reported: watch.received,
                sent_bytes: 0,
                credited: 0,
                adapt,
                rendition: None,
                pad_ratio: 0.0,
                pad_owed: 0.0,
                first_sent: SeqNo(0),
                joined: None,
                session: None,
                sent_ssrc: None,
                ended: None,
                last_seq: None,
                tail: TailProbe::default(),
                last_sent: now,
                token_expires,
            },
        );
        st.empty_since = None;
        let needs_upstream = st.upstream.is_empty();
        if watch.start == WatchStart::Seq && st.ring.is_empty() {
            // A cold stream for a viewer resuming (a switch, or its edge restarted): the
            // merge starts where the viewer is, so what it lacks is asked of the set
            // reflectors, which keep the last seconds. Its other viewers come back one
            // by one (a client repeats its watch every 250 ms while its edge is
            // silent), each at its own point: the merge releases nothing for
            // `RESUME_GATHER`, and starts at the earliest point told meanwhile (a viewer
            // a few packets behind the first was started at a later keyframe).
            if needs_upstream {
                st.merge.gather_until(now + RESUME_GATHER);
            }
            st.merge.expect_from(now, watch.seq);
        }
        // A warm stream whose ring starts after the viewer's point, when the stream
        // opened for it and its first viewers moments ago (a restarted edge's viewers
        // come back one by one): its past is asked for.
        let backfill = (watch.start == WatchStart::Seq && !st.ring.is_empty()).then_some(watch.seq);
        self.viewers += 1;
        self.counters.viewer_joins += 1;
        if let Peer::Conn(c) = from {
            self.tcp_queued.entry(c).or_default();
        }
        tracing::info!(stream = id.0, viewer = %from, fits_kbps = ?watch.fits_kbps, "viewer joined");
        if needs_upstream {
            self.subscribe_upstream(now, id);
        }
        if let Some(from) = backfill {
            self.ask_backfill(now, id, from);
        }
        if let Some(&(l, r)) = self.ladder_of.get(&id) {
            // Which rendition it starts on (its SSRC comes with the first packet).
            let notice = RenditionNotice {
                ssrc: 0,
                reason: speed::Reason::Join as u8,
                index: r as u8,
                kbps: (self.config.ladders[l][r].1 / 1000) as u32,
            };
            let body = Body::Notice {
                kind: NoticeKind::Rendition,
                value: notice.pack(),
            };
            self.out.control(from, id, body);
        }
        self.serve(now, id, Some(from));
    }

    /// The stream viewer `from` is now served on, when `id` is one of a ladder's and the
    /// viewer is on one of its renditions.
    fn viewer_stream(&self, id: StreamId, from: Peer) -> Option<StreamId> {
        let &(l, _) = self.ladder_of.get(&id)?;
        self.config.ladders[l].iter().map(|(s, _)| *s).find(|s| {
            self.streams
                .get(s)
                .is_some_and(|st| st.viewers.contains_key(&from))
        })
    }

    /// The speed last measured for client `client`, or else for `from`'s network.
    fn known(&self, now: Instant, client: NodeId, from: Peer) -> Option<speed::Estimate> {
        let fresh =
            |e: &&(speed::Estimate, Instant)| now.saturating_duration_since(e.1) < KNOWN_TTL;
        self.known_clients
            .get(&client.0)
            .filter(fresh)
            .or_else(|| {
                let net = network(from)?;
                self.known_networks.get(&net).filter(fresh)
            })
            .map(|e| e.0)
    }

    /// Remembers a viewer's speed, by client and by network (bounded: entries past their
    /// time make room; with none, it is not remembered).
    fn remember(&mut self, now: Instant, client: NodeId, from: Peer, e: speed::Estimate) {
        fn put<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, (speed::Estimate, Instant)>,
            now: Instant,
            key: K,
            e: speed::Estimate,
        ) {
            if map.len() >= MAX_KNOWN && !map.contains_key(&key) {
                map.retain(|_, v| now.saturating_duration_since(v.1) < KNOWN_TTL);
                if map.len() >= MAX_KNOWN {
                    return;
                }
            }
            // A link's rate (limited) replaces what is known; a rate taken in full is
            // only a floor, and replaces a lower one (a viewer of a low rendition says
            // nothing against a faster one from the same network).
            let keep = map.get(&key).is_some_and(|(old, t)| {
                !e.limited && now.saturating_duration_since(*t) < KNOWN_TTL && old.bps >= e.bps
            });
            if let Some(entry) = map.get_mut(&key).filter(|_| keep) {
                entry.1 = now;
            } else {
                map.insert(key, (e, now));
            }
        }
        if client.0 != 0 {
            put(&mut self.known_clients, now, client.0, e);
        }
        if let Some(net) = network(from) {
            put(&mut self.known_networks, now, net, e);
        }
    }

    /// Serves `only` (or every viewer) on every stream.
    fn serve_all(&mut self, now: Instant, only: Option<Peer>) {
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            self.serve(now, id, only);
        }
    }

    /// Sends each viewer of `id` (or only `only`) what its cursor has to read, within its
    /// flow window (UDP, QUIC) or queue (TCP), and places the cursors of viewers still
    /// waiting for their start.
    fn serve(&mut self, now: Instant, id: StreamId, only: Option<Peer>) {
        let window = self.config.viewer_window;
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        // Viewers of a ladder at the keyframe where a move decided for them can be made.
        let mut at_keyframe = Vec::new();
        // When the first paced viewer held back may be sent its next packet.
        let mut pace_due: Option<Instant> = None;
        // The numbers whose viewers wait for the stream's past.
        let backfilling = st.backfill.as_ref().map(|b| b.first..b.end);
        let mut serve_one = |key: Peer, v: &mut Viewer| {
            if v.cursor.is_none() {
                let start = match v.start {
                    WatchStart::Keyframe => Start::Keyframe,
                    WatchStart::Seq => Start::Seq(v.start_seq),
                    WatchStart::Live => Start::Live,
                };
                // A resume waits for packets to arrive (or for the stream's past asked
                // for it); a keyframe start for a keyframe.
                if v.start != WatchStart::Keyframe && st.ring.is_empty() {
                    return;
                }
                if v.start == WatchStart::Seq
                    && backfilling
                        .as_ref()
                        .is_some_and(|r| r.contains(&v.start_seq))
                {
                    return;
                }
                if let Ok((c, missed)) = st.ring.cursor(start) {
                    v.cursor = Some(c);
                    let first = st.ring.peek(&c).map_or(SeqNo(0), |e| e.seq);
                    v.joined = Some((first, NOTICE_REPEATS));
                    // Told before the first packet: a viewer resuming past what this
                    // edge holds stops waiting for the packets missed before they
                    // arrive as a hole wider than its buffer.
                    let notice = Body::Notice {
                        kind: NoticeKind::Joined,
                        value: first.0,
                    };
                    self.out.control(key, id, notice);
                    if missed > 0 {
                        self.counters.resume_missed_packets += missed;
                        let notice = Body::Notice {
                            kind: NoticeKind::Missed,
                            value: missed,
                        };
                        self.out.control(key, id, notice);
                    }
                }
            }
            let flow_window = viewer_window(window, st.pps, v.ack_delay);
            let Some(cursor) = v.cursor.as_mut() else {
                return;
            };
            loop {
                // An overtaken cursor is moved on (and counted) whatever its window says.
                if !st.ring.overtaken(cursor) {
                    match key {
                        Peer::Addr(_) => {
                            // Packets unacknowledged for long were lost or the viewer
                            // stalled: they stop counting, so the window reopens.
                            while v.in_flight.front().is_some_and(|(_, t, ..)| {
                                now.saturating_duration_since(*t) > IN_FLIGHT_TTL
                            }) {
                                v.in_flight.pop_front();
                            }
                            if v.in_flight.len() as u64 >= flow_window {
                                // Held back with packets ready: its link sets its rate.
                                if st.ring.peek(cursor).is_some() {
                                    v.speed.blocked(now);
                                }
                                break;
                            }
                        }
                        Peer::Conn(c) => {
                            if self
                                .tcp_queued
                                .get(&c)
                                .is_some_and(|q| q.len() >= TCP_QUEUE)
                            {
                                if st.ring.peek(cursor).is_some() {
                                    v.speed.blocked(now);
                                }
                                break;
                            }
                        }
                    }
                }
                if let Some(a) = v
                    .adapt
                    .as_ref()
                    .filter(|a| a.pending.is_some() && a.chooser.may_move(now))
                {
                    if st
                        .ring
                        .peek(cursor)
                        .is_some_and(|e| e.keyframe && a.passed != Some(cursor.position()))
                    {
                        at_keyframe.push(key);
                        break;
                    }
                }
                // Its catch-up paced at its link's rate, when known: what would go at
                // once waits here, not in its link's queue.
                if let (Peer::Addr(_), Some(bps)) = (key, v.link_bps) {
                    if let Some(next) = st.ring.peek(cursor) {
                        // Never under the stream's own rate and a margin (a link's rate
                        // known only roughly, say from what its client said fits, must
                        // not leave it behind a stream its link carries).
                        let size = next.item.datagram.len() as f64;
                        let stream = st.pps * size * PACE_STREAM_MARGIN;
                        let rate = (bps as f64 * PACE_GAIN / 8.0).max(stream).max(1.0);
                        let burst = (rate * PACE_BURST.as_secs_f64()).max(3000.0);
                        let dt = now.saturating_duration_since(v.pace_at).as_secs_f64();
                        v.pace_tokens = (v.pace_tokens + dt * rate).min(burst);
                        v.pace_at = now;
                        // (a byte's leeway: what the clock's steps round off)
                        if v.pace_tokens + 1.0 < size {
                            let wait = Duration::from_secs_f64((size - v.pace_tokens) / rate)
                                .max(Duration::from_micros(100));
                            pace_due = common::earliest(pace_due, Some(now + wait));
                            break;
                        }
                        v.pace_tokens -= size;
                    }
                }
                match st.ring.read(cursor) {
                    Read::Packet(e) => {
                        if v.first_sent.0 == 0 {
                            v.first_sent = e.seq;
                        }
                        let ssrc = e.item.media.rtp.fields().ssrc;
                        if v.sent_ssrc.replace(ssrc).is_some_and(|s| s != ssrc) {
                            // Where the old session ended, then where the new one
                            // starts: a lost tail is otherwise never missed.
                            if let Some(last) = v.last_seq {
                                v.ended = Some((last, NOTICE_REPEATS));
                                let notice = Body::Notice {
                                    kind: NoticeKind::Ended,
                                    value: last.0,
                                };
                                self.out.control(key, id, notice);
                            }
                            v.session = Some((e.seq, NOTICE_REPEATS));
                            let notice = Body::Notice {
                                kind: NoticeKind::Session,
                                value: e.seq.0,
                            };
                            self.out.control(key, id, notice);
                        }
                        v.last_seq = Some(e.seq);
                        match key {
                            Peer::Conn(c) => {
                                let size = e.item.datagram.len();
                                self.tcp_queued.entry(c).or_default().push_back(size as u32);
                                v.speed.sent(now, size as u64);
                            }
                            Peer::Addr(_) => {
                                let size = e.item.media.rtp.len() as u64;
                                v.sent_bytes += size;
                                v.speed.sent(now, size);

                                let len = e.item.datagram.len() as u32;
                                v.in_flight.push_back((e.seq, now, len, v.sent_bytes));
                                v.tail.sent(now, e.seq);
                            }
                        }
                        v.last_sent = now;
                        self.out.send(key, e.item.datagram.clone(), true);
                        // A probe: copies of this packet after it, paced by the stream.
                        if v.pad_ratio > 0.0 && matches!(key, Peer::Addr(_)) {
                            if let Some(a) = v.adapt.as_mut() {
                                a.probe_sent += 1;
                            }
                            let size = e.item.media.rtp.len() as u64;
                            v.pad_owed += size as f64 * v.pad_ratio;
                            while v.pad_owed >= size as f64 {
                                if !self.out.retransmit(key, e.item.header, &e.item.media) {
                                    break;
                                }
                                v.pad_owed -= size as f64;
                                v.sent_bytes += size;
                                self.counters.probe_bytes += size;
                            }
                        } else {
                            v.pad_owed = 0.0;
                        }
                    }
                    Read::Skipped { lost } => {
                        // Told between the last packet before the skip and the first
                        // after it: the viewer knows which packets it will not get.
                        tell_skipped(&mut self.counters, &mut self.out, key, id, lost);
                    }
                    Read::Pending => {
                        // Caught up: pacing was for the catch-up only.
                        v.link_bps = None;
                        break;
                    }
                }
            }
        };
        match only {
            Some(key) => {
                if let Some(v) = st.viewers.get_mut(&key) {
                    serve_one(key, v);
                }
                st.pace_due = common::earliest(st.pace_due, pace_due);
            }
            None => {
                for (key, v) in st.viewers.iter_mut() {
                    serve_one(*key, v);
                }
                st.pace_due = pace_due;
            }
        }
        for key in at_keyframe {
            self.move_rendition(now, id, key);
        }
    }

    /// Moves viewer `key` of stream `id`, its cursor at a keyframe, to the rendition
    /// decided for it, at the keyframe of the same media time there: the viewer is told
    /// (a *rendition* notice, then where this session ends and the other starts) and
    /// served from there. With that keyframe not there yet, it waits at most
    /// [`ALIGN_WAIT`], then goes on to its next keyframe; with no aligned keyframe at
    /// all, after [`UNALIGNED_GIVE_UP`] keyframes it moves to the next one after its own
    /// (a jump, counted).
    fn move_rendition(&mut self, now: Instant, id: StreamId, key: Peer) {
        let Some(&(l, _)) = self.ladder_of.get(&id) else {
            return;
        };
        let Some(st) = self.streams.get(&id) else {
            return;
        };
        let Some(v) = st.viewers.get(&key) else {
            return;
        };
        let (Some(a), Some(cursor)) = (v.adapt.as_ref(), v.cursor) else {
            return;
        };
        let Some((to, reason)) = a.pending else {
            return;
        };
        let Some(here) = st.ring.peek(&cursor).filter(|e| e.keyframe) else {
            return;
        };
        let pos = cursor.position();
        // A keyframe's media time: its first time stamp, in its own packet or, when that
        // one carries only the tables (small packets), in one of the next few.
        let time_in = |ring: &Ring<Packet>, e: &ring::Entry<Packet>| {
            (0..KEYFRAME_TIME_SCAN).find_map(|k| {
                let p = if k == 0 {
                    Some(e)
                } else {
                    ring.get(e.seq.plus(k))
                }?;
                braid_core::hls::media_time(&p.item.media.rtp.payload())
            })
        };
        let time = time_in(&st.ring, here);
        // Its time stamp not arrived yet (the viewer is at the live edge): wait for it.
        if time.is_none()
            && st
                .ring
                .newest()
                .is_some_and(|n| n.seq < here.seq.plus(KEYFRAME_TIME_SCAN - 1))
        {
            return;
        }
        let to_id = self.config.ladders[l][to].0;
        const WRAP: u64 = 1 << 33;
        // (the target's keyframe, whether it is aligned or only the next after ours)
        let mut target = None;
        let mut behind = true;
        // Whether the target holds keyframes from before ours: if it starts after (just
        // subscribed, while this viewer's cursor lags), its aligned keyframe is not
        // missing, only gone by; the viewer goes on to a keyframe it holds.
        let mut covers = false;
        // The target's keyframe times, for the one warning of unaligned renditions.
        let warn = !self.warned_unaligned.contains(&to_id);
        let mut theirs: Vec<u64> = Vec::new();
        if let (Some(t), Some(tst)) = (time, self.streams.get(&to_id)) {
            let time_of = |e: &ring::Entry<Packet>| time_in(&tst.ring, e);
            let d = |u: u64| u.wrapping_sub(t) & (WRAP - 1);
            behind = tst
                .ring
                .newest_keyframe()
                .and_then(&time_of)
                .is_none_or(|u| d(u) >= WRAP / 2 && d(u) < WRAP - ALIGN_TICKS);
            let aligned = |e: &ring::Entry<Packet>| {
                time_of(e).is_some_and(|u| d(u) <= ALIGN_TICKS || d(u) >= WRAP - ALIGN_TICKS)
            };
            let mut oldest = None;
            let _ = tst.ring.keyframe_cursor(|e| {
                let u = time_of(e);
                if warn {
                    theirs.extend(u);
                }
                oldest = u.or(oldest);
                false
            });
            covers = oldest.is_some_and(|u| {
                let du = d(u);
                du >= WRAP / 2 || du <= ALIGN_TICKS
            });
            if let Some(c) = tst.ring.keyframe_cursor(aligned) {
                target = Some((c, true));
            } else if covers && !behind && a.unaligned + 1 >= UNALIGNED_GIVE_UP {
                // The oldest keyframe after ours: the newest first, so keep the last.
                let mut after = None;
                let _ = tst.ring.keyframe_cursor(|e| {
                    if time_of(e).is_some_and(|u| d(u) < WRAP / 2) {
                        after = Some(e.seq);
                    }
                    false
                });
                target = after
                    .and_then(|s| tst.ring.keyframe_cursor(|e| e.seq == s))
                    .map(|c| (c, false));
            }
        }
        let Some((c, aligned)) = target else {
            // Not possible at this keyframe: wait for the target to catch up, or go on.
            let Some(a) = self
                .streams
                .get_mut(&id)
                .and_then(|st| st.viewers.get_mut(&key))
                .and_then(|v| v.adapt.as_mut())
            else {
                return;
            };
            if behind && time.is_some() {
                let since = *a.waiting.get_or_insert(now);
                if now.saturating_duration_since(since) < ALIGN_WAIT {
                    return;
                }
                self.counters.rendition_late += 1;
            } else if !covers && time.is_some() {
                // Its keyframes all lie ahead of this viewer: it gets there.
                self.counters.rendition_late += 1;
            } else {
                a.unaligned += 1;
                self.counters.rendition_unaligned += 1;
                if self.warned_unaligned.insert(to_id) {
                    tracing::warn!(
                        from = id.0,
                        to = to_id.0,
                        ours = ?time,
                        ?theirs,
                        "renditions' keyframes are not aligned: moves wait, then jump (counted)"
                    );
                }
            }
            a.waiting = None;
            a.passed = Some(pos);
            self.serve(now, id, Some(key));
            return;
        };
        // Where it enters the target, read before the viewer leaves its stream (the
        // target held it a moment ago; nothing in between removes it).
        let Some((first_seq, ssrc)) = self
            .streams
            .get(&to_id)
            .and_then(|tst| tst.ring.peek(&c))
            .map(|e| (e.seq, e.item.media.rtp.fields().ssrc))
        else {
            return;
        };
        let Some(mut v) = self
            .streams
            .get_mut(&id)
            .and_then(|st| st.viewers.remove(&key))
        else {
            return;
        };
        if !aligned {
            self.counters.rendition_jumps += 1;
        }
        let notice = RenditionNotice {
            ssrc,
            reason: reason as u8,
            index: to as u8,
            kbps: (self.config.ladders[l][to].1 / 1000) as u32,
        }
        .pack();
        let mut notices = vec![(NoticeKind::Rendition, notice)];
        v.rendition = Some((notice, NOTICE_REPEATS));
        if let Some(last) = v.last_seq {
            v.ended = Some((last, NOTICE_REPEATS));
            notices.push((NoticeKind::Ended, last.0));
        }
        v.session = Some((first_seq, NOTICE_REPEATS));
        notices.push((NoticeKind::Session, first_seq.0));
        v.sent_ssrc = Some(ssrc);
        v.cursor = Some(c);
        // What is in flight is of the other session: acknowledgements now name this one.
        v.in_flight.clear();
        // What was measured on the other rendition says nothing of this one's delivery;
        // after a move down, a link still too slow for this one is told sooner.
        if reason == speed::Reason::Down {
            v.speed.restart_stepped_down(now);
        } else {
            v.speed.restart(now);
        }
        v.tail = TailProbe::default();
        if let Some(a) = v.adapt.as_mut() {
            a.pending = None;
            a.waiting = None;
            a.passed = None;
            a.unaligned = 0;
            a.chooser.moved(now, to);
        }
        *self
            .counters
            .rendition_changes
            .entry(reason.as_str())
            .or_default() += 1;
        tracing::debug!(viewer = %key, from = id.0, to = to_id.0, reason = reason.as_str(), "rendition changed");
        let tst = self
            .streams
            .get_mut(&to_id)
            .expect("the target stream was read above");
        tst.viewers.insert(key, v);
        tst.empty_since = None;
        self.slow.remove(&(id, key));
        for (kind, value) in notices {
            self.out.control(key, to_id, Body::Notice { kind, value });
        }
        self.serve(now, to_id, Some(key));
    }

    fn subscribe_upstream(&mut self, now: Instant, id: StreamId) {
        let k = self.subscribe_k();
        let n = self.config.reflectors.len();
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        // Keep the reflectors already subscribed; add unused ones up to k (an edge that
        // learns its reflectors from the control server tops up as it learns them).
        let before = st.upstream.len();
        let mut next = 0;
        while st.upstream.len() < k && next < n {
            if !st.upstream.iter().any(|(i, _)| *i == next) {
                st.upstream.push((next, now));
            }
            next += 1;
        }
        if st.upstream.len() > before {
            self.refresh_upstream(now, id, true);
        }
    }

    /// Asks the set reflectors for stream `id`'s past from `from` up to its ring's first
    /// packet, for a viewer resuming there ([`Backfill`]): only while the ring can still
    /// take packets before its first (nothing left it yet) and within
    /// [`BACKFILL_MAX`] of it. A backfill under way is extended.
    fn ask_backfill(&mut self, now: Instant, id: StreamId, from: SeqNo) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(oldest) = st.ring.oldest().filter(|_| st.ring.may_prepend()) else {
            return;
        };
        let (end, ssrc) = (oldest.seq, oldest.item.media.rtp.fields().ssrc);
        let b = st.backfill.get_or_insert_with(|| Backfill {
            first: end,
            end,
            ssrc,
            got: Vec::new(),
            lacking: 0,
            until: now + BACKFILL_ASK_EVERY * u32::from(BACKFILL_ASKS + 2),
            asks: 0,
            next_ask: now,
        });
        if from >= b.first || b.end.0 - from.0 > BACKFILL_MAX {
            if b.got.is_empty() {
                st.backfill = None;
            }
            return;
        }
        let more = (b.first.0 - from.0) as usize;
        b.got
            .splice(0..0, std::iter::repeat_with(|| None).take(more));
        b.lacking += more;
        let asked = b.first;
        b.first = from;
        tracing::debug!(
            stream = id.0,
            from = from.0,
            to = b.end.0,
            "stream's past asked for a resuming viewer"
        );
        // The new numbers now; all that lacks again at each ask.
        let runs: Vec<SeqRange> = b
            .lacking()
            .into_iter()
            .filter(|r| r.first < asked)
            .collect();
        b.asks = 1;
        b.next_ask = now + BACKFILL_ASK_EVERY;
        self.send_backfill_asks(id, 0, &runs);
    }

    /// Sends `runs` of stream `id`'s past to the set reflector subscribed `turn`-th
    /// (round the subscriptions).
    fn send_backfill_asks(&mut self, id: StreamId, turn: usize, runs: &[SeqRange]) {
        let Some(st) = self.streams.get(&id) else {
            return;
        };
        let Some(&(i, _)) = st.upstream.get(turn % st.upstream.len().max(1)) else {
            return;
        };
        let to = Peer::Addr(self.config.reflectors[i]);
        for r in runs {
            self.out.control(to, id, Body::Nack(vec![*r]));
            self.counters.nack_sent += 1;
        }
    }

    /// Asks again for what stream `id`'s backfill lacks, when due; after the last ask,
    /// ends it.
    fn backfill_due(&mut self, now: Instant, id: StreamId) {
        let Some(b) = self
            .streams
            .get_mut(&id)
            .and_then(|st| st.backfill.as_mut())
            .filter(|b| now >= b.next_ask || now >= b.until)
        else {
            return;
        };
        if b.asks >= BACKFILL_ASKS || now >= b.until {
            self.finish_backfill(now, id);
            return;
        }
        let (turn, runs) = (usize::from(b.asks), b.lacking());
        b.asks += 1;
        b.next_ask = now + BACKFILL_ASK_EVERY;
        self.send_backfill_asks(id, turn, &runs);
    }

    /// Puts what stream `id`'s backfill got before its ring's first packet, newest
    /// first, as far as it follows on without a hole, and serves the viewers that
    /// waited for it. What did not come (or follows a hole) is counted; a viewer whose
    /// point it was starts at the first keyframe held and is told what it missed.
    fn finish_backfill(&mut self, now: Instant, id: StreamId) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        let Some(b) = st.backfill.take() else {
            return;
        };
        let asked = b.got.len() as u64;
        let mut put = 0;
        for p in b.got.into_iter().rev() {
            let Some(p) = p else {
                break;
            };
            let keyframe = p.header.flags.contains(Flags::KEYFRAME);
            let (seq, size) = (p.media.seq, p.datagram.len());
            if !st.ring.prepend(seq, keyframe, size, p) {
                break;
            }
            put += 1;
        }
        self.counters.backfill_packets += put;
        self.counters.backfill_missing += asked - put;
        tracing::info!(
            stream = id.0,
            put,
            missing = asked - put,
            "stream's past put before the ring for resuming viewers"
        );
        self.serve(now, id, None);
    }

    fn subscribe_k(&self) -> usize {
        self.config
            .subscribe_k
            .max(2)
            .min(self.config.reflectors.len())
    }

    fn refresh_upstream(&mut self, now: Instant, id: StreamId, first: bool) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        st.last_refresh = Some(now);
        // With nothing of the stream yet, a subscription asks for the latest group of
        // pictures at once (the keyframe flag): viewers start without waiting for the
        // next keyframe to come through the tree.
        let flags = Flags::empty().with(Flags::KEYFRAME, first && st.ring.is_empty());
        for (i, _) in &st.upstream {
            let to = self.config.reflectors[*i];
            let s = braid_core::wire::Subscription {
                node: self.config.settings.node,
                lease_ms: LEASE_MS,
                cookie: self.upstream_cookies.get(&to).copied().unwrap_or_default(),
            };
            let body = if first {
                Body::Subscribe(s)
            } else {
                Body::Refresh(s)
            };
            self.out.control_flagged(Peer::Addr(to), id, flags, body);
        }
    }

    /// Subscribes to stream `id` at set reflector `to` now (its cookie just came): the
    /// keyframe flag asks for the latest group of pictures while the edge has nothing.
    fn subscribe_one(&mut self, id: StreamId, to: SocketAddr) {
        let Some(st) = self.streams.get(&id) else {
            return;
        };
        let flags = Flags::empty().with(Flags::KEYFRAME, st.ring.is_empty());
        let s = braid_core::wire::Subscription {
            node: self.config.settings.node,
            lease_ms: LEASE_MS,
            cookie: self.upstream_cookies.get(&to).copied().unwrap_or_default(),
        };
        self.out
            .control_flagged(Peer::Addr(to), id, flags, Body::Subscribe(s));
    }

    fn reply_error(&mut self, to: Peer, stream: StreamId, code: ErrorCode, text: &str) {
        self.out.control(
            to,
            stream,
            Body::Error {
                code,
                text: text.into(),
            },
        );
    }

    /// Expiries, refreshes, path replacement, linger, drain signals.
    fn housekeeping(&mut self, now: Instant) {
        self.next_housekeeping = Some(now + HOUSEKEEPING);
        let unix = self.clock.unix_secs(now);
        self.signal_drain(now);
        self.heartbeat(now);
        let k = self.subscribe_k();
        let top_up: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, st)| !st.viewers.is_empty() && st.upstream.len() < k)
            .map(|(id, _)| *id)
            .collect();
        for id in top_up {
            self.subscribe_upstream(now, id);
        }
        let backfilling: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, st)| st.backfill.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in backfilling {
            self.backfill_due(now, id);
        }
        let mut close = Vec::new();
        let mut refresh = Vec::new();
        let mut overtaken = Vec::new();
        let mut gone_viewers = 0;
        let mut dropped = Vec::new();
        let n = self.config.reflectors.len();
        for (&id, st) in self.streams.iter_mut() {
            // Pushes evict by age; a stream gone silent is aged here.
            st.ring.handle_timeout(now);
            // A viewer that stopped reading stops its cursor; count its skip when the ring
            // overtakes it, not only when it comes back.
            if st
                .viewers
                .values()
                .any(|v| v.cursor.is_some_and(|c| st.ring.overtaken(&c)))
            {
                overtaken.push(id);
            }
            let before = st.viewers.len();
            // A viewer is forgotten at the end of its lease, or when its token expired
            // and no watch since renewed it (2 s for the renewed token to arrive).
            st.viewers.retain(|_, v| {
                v.expires > now && v.token_expires.is_none_or(|e| unix < e.saturating_add(2))
            });
            gone_viewers += before - st.viewers.len();
            // Each viewer's speed: a viewer limited by its link for long is slow (the
            // control server places it on a low-cost edge at its next request).
            for (key, v) in st.viewers.iter_mut() {
                v.speed.tick(now);
                if v.speed.slow(now) {
                    if self.slow.insert((id, *key)) {
                        self.counters.viewers_turned_slow += 1;
                        let bps = v.speed.estimate(now).map_or(0, |e| e.bps);
                        tracing::info!(stream = id.0, viewer = %key, bps, "viewer is slow: its link cannot take the stream");
                    }
                } else {
                    self.slow.remove(&(id, *key));
                }
            }
            if st.viewers.is_empty() && st.hls_until.is_none_or(|t| now >= t) {
                let since = *st.empty_since.get_or_insert(now);
                if now.duration_since(since) >= self.config.linger {
                    close.push(id);
                    continue;
                }
            }
            // Replace a subscribed set reflector that stopped delivering data.
            for j in 0..st.upstream.len() {
                let (i, since) = st.upstream[j];
                let down = |c: usize| self.quic_down.contains(&self.config.reflectors[c]);
                let dead = (now.duration_since(since) > PATH_DEAD
                    && !st.merge.is_healthy(PathId(i as u8)))
                    || down(i);
                if dead && n > st.upstream.len() {
                    let used: Vec<usize> = st.upstream.iter().map(|(i, _)| *i).collect();
                    if let Some(next) = (1..n)
                        .map(|d| (i + d) % n)
                        .find(|c| !used.contains(c) && !down(*c))
                    {
                        tracing::warn!(stream = id.0, from = %self.config.reflectors[i], to = %self.config.reflectors[next], "set reflector delivers no data: moving the subscription");
                        self.counters.path_replaced += 1;
                        st.upstream[j] = (next, now);
                        st.last_refresh = None;
                    }
                } else if dead && st.extra.is_some_and(|e| e != i) {
                    // Every set reflector is in use, one of them as the extra taken on
                    // for the trouble this dead one made: the extra takes its place.
                    let to = st.extra.take().map(|e| self.config.reflectors[e]);
                    tracing::warn!(stream = id.0, from = %self.config.reflectors[i], to = ?to, "set reflector delivers no data: the extra one takes its place");
                    self.counters.path_replaced += 1;
                    dropped.push(i);
                }
            }
            for i in dropped.drain(..) {
                st.upstream.retain(|(u, _)| *u != i);
                let node = self.config.settings.node;
                let to = Peer::Addr(self.config.reflectors[i]);
                self.out.control(to, id, Body::Unsubscribe { node });
            }
            match judge(st, now) {
                Some(true) if st.extra.is_none() && n > st.upstream.len() => {
                    let used: Vec<usize> = st.upstream.iter().map(|(i, _)| *i).collect();
                    let down = |c: usize| self.quic_down.contains(&self.config.reflectors[c]);
                    if let Some(c) = (0..n).find(|c| !used.contains(c) && !down(*c)) {
                        tracing::info!(stream = id.0, to = %self.config.reflectors[c], "repairs keep failing: subscribing to one more set reflector");
                        self.counters.extra_subscriptions += 1;
                        st.upstream.push((c, now));
                        st.extra = Some(c);
                        st.last_refresh = None;
                    }
                }
                Some(false) if st.trouble.calm >= CALM_PERIODS => {
                    if let Some(c) = st.extra.take() {
                        tracing::info!(stream = id.0, from = %self.config.reflectors[c], "calm again: dropping the extra set reflector");
                        st.upstream.retain(|(i, _)| *i != c);
                        let node = self.config.settings.node;
                        let to = Peer::Addr(self.config.reflectors[c]);
                        self.out.control(to, id, Body::Unsubscribe { node });
                    }
                }
                _ => {}
            }
            if !st.upstream.is_empty()
                && st
                    .last_refresh
                    .is_none_or(|t| now.duration_since(t) >= REFRESH)
            {
                refresh.push((id, st.last_refresh.is_none()));
            }
        }
        self.viewers -= gone_viewers;
        self.adapt(now);
        let streams = &self.streams;
        self.slow.retain(|(id, key)| {
            streams
                .get(id)
                .is_some_and(|st| st.viewers.contains_key(key))
        });
        for id in overtaken {
            self.serve(now, id, None);
        }
        for (id, first) in refresh {
            self.refresh_upstream(now, id, first);
        }
        let node = self.config.settings.node;
        for id in close {
            if let Some(st) = self.streams.remove(&id) {
                tracing::info!(stream = id.0, "last viewer gone: unsubscribing");
                // What the merge still held goes with the stream: counted, and the
                // stream's last figures kept for the owner to export.
                self.counters
                    .drops
                    .add_n("stream_closed", st.merge.packets_held() as u64);
                self.counters.streams_closed += 1;
                if self.closed.len() < MAX_CLOSED_REPORTS {
                    self.closed.push(common::report(id, &st.merge, 0, 0));
                }
                for (i, _) in st.upstream {
                    let to = Peer::Addr(self.config.reflectors[i]);
                    self.out.control(to, id, Body::Unsubscribe { node });
                }
            }
        }
    }

    /// Each ladder stream's rate on the wire over the last [`RATE_WINDOW`], and the
    /// ladders' rates from it (see [`Edge::rates`]).
    fn measure_rates(&mut self) {
        for (l, ladder) in self.config.ladders.iter().enumerate() {
            for (i, (id, nominal)) in ladder.iter().enumerate() {
                let measured = self.streams.get_mut(id).and_then(|st| {
                    let stamp = st.newest_stamp?;
                    let hz = braid_core::wire::rtp::CLOCK_RATE_MP2T;
                    let window = (RATE_WINDOW.as_millis() as u32).saturating_mul(hz / 1000);
                    // Stamps that go back, or leap (another capture's clock): anew.
                    if st.rate_marks.back().is_some_and(|(t, _)| {
                        let d = stamp.wrapping_sub(*t);
                        d > u32::MAX / 2 || d > window.saturating_mul(12)
                    }) {
                        st.rate_marks.clear();
                    }
                    if st.rate_marks.back().is_none_or(|(t, _)| *t != stamp) {
                        st.rate_marks.push_back((stamp, st.bytes_in));
                    }
                    // (one mark a tick at most: stamps that crawl keep no more)
                    while st
                        .rate_marks
                        .front()
                        .is_some_and(|(t, _)| stamp.wrapping_sub(*t) > window)
                        || st.rate_marks.len() > RATE_MARKS
                    {
                        st.rate_marks.pop_front();
                    }
                    let &(from, bytes) = st.rate_marks.front()?;
                    let span = stamp.wrapping_sub(from);
                    (span >= window / 2).then(|| {
                        (st.bytes_in.saturating_sub(bytes) as f64 * 8.0 * f64::from(hz)
                            / f64::from(span)) as u64
                    })
                });
                // Not measured now (no viewer here takes it): what it took when it was,
                // or its label (a move down by label alone may land on a rendition
                // whose headers and tables fill the link).
                let known = self.rates[l][i];
                self.rates[l][i] = measured.map_or(known, |m| m.max(*nominal));
                if measured.is_some() {
                    self.wire[l][i] = measured;
                }
            }
        }
    }

    /// Renditions follow speed: each ladder viewer's chooser decides (a move is made at
    /// its next keyframe; its target is opened and subscribed now, so it is there by
    /// then), a probe pads what it sends, and every second each viewer's speed is
    /// remembered for its client and network.
    fn adapt(&mut self, now: Instant) {
        self.ticks = self.ticks.wrapping_add(1);
        let remember = self.ticks % 10 == 0;
        let mut targets = Vec::new();
        let mut moves = Vec::new();
        let mut known = Vec::new();
        let mut abandons = Vec::new();
        self.measure_rates();
        for (&id, st) in self.streams.iter_mut() {
            // The stream's packet rate, smoothed over about a second (a new stream's
            // within a few ticks, so a far viewer's window opens as it starts).
            let released = st.merge.stats().released;
            match st.pps_mark {
                Some((at, before)) if now.saturating_duration_since(at) >= PPS_EVERY => {
                    let secs = now.saturating_duration_since(at).as_secs_f64();
                    let sample = released.saturating_sub(before) as f64 / secs;
                    st.pps = if st.pps > 0.0 {
                        0.7 * st.pps + 0.3 * sample
                    } else {
                        sample
                    };
                    st.pps_mark = Some((now, released));
                }
                Some(_) => {}
                None => st.pps_mark = Some((now, released)),
            }
            for (key, v) in st.viewers.iter_mut() {
                // Each second, what each viewer's speed says is remembered (the chooser
                // reads the meter itself; nothing else needs the estimate here).
                if remember {
                    if let Some(e) = v.speed.estimate(now) {
                        known.push((v.client, *key, e));
                    }
                }
                let Some(a) = v.adapt.as_mut() else {
                    continue;
                };
                let rates = &self.rates[a.ladder];
                if let Some((to, reason)) = a.chooser.decide(now, rates, &v.speed) {
                    if a.pending.map(|p| p.0) != Some(to) {
                        tracing::debug!(viewer = %key, to, reason = reason.as_str(), estimate = ?v.speed.estimate(now), meter = ?v.speed, "rendition move decided");
                        a.pending = Some((to, reason));
                        a.passed = None;
                        a.abandoned = false;
                    }
                }
                if let Some((to, reason)) = a.pending {
                    targets.push(self.config.ladders[a.ladder][to].0);
                    // Down, on a link that would take too long to carry the rest of the
                    // group of pictures: on to the next keyframe (held, so the viewer
                    // lags by at least the rest), where the move is made.
                    if reason == speed::Reason::Down && !a.abandoned && a.chooser.may_move(now) {
                        // The link's rate as measured, or else (a viewer just resumed
                        // here) about what its client said fits.
                        let rate = v
                            .speed
                            .estimate(now)
                            .filter(|e| e.limited)
                            .map(|e| e.bps)
                            .or(a.fitting_link);
                        if let (Some(bps), Some(c)) = (rate, v.cursor.as_mut()) {
                            let at_key = st.ring.peek(c).is_some_and(|e| e.keyframe);
                            let rest = st.ring.next_keyframe(c).filter(|_| !at_key);
                            if let Some((k, bytes)) = rest.filter(|(_, b)| {
                                *b as f64 * 8.0 > bps as f64 * ABANDON_AFTER.as_secs_f64()
                            }) {
                                let lost = st.ring.skip_to(c, k);
                                a.abandoned = true;
                                tracing::debug!(viewer = %key, lost, bytes, bps, "rest of the group passed over for a move down");
                                abandons.push((id, *key, lost));
                            }
                        }
                    }
                    let at_key = a.chooser.may_move(now)
                        && v.cursor.is_some_and(|c| {
                            st.ring
                                .peek(&c)
                                .is_some_and(|e| e.keyframe && a.passed != Some(c.position()))
                        });
                    if at_key {
                        moves.push((id, *key));
                    }
                }
                // A probe (datagram viewers only: over TCP it would queue ahead of
                // the stream) sends a copy of each packet's worth in proportion.
                let probe = match key {
                    Peer::Addr(_) => a.chooser.probing(now, rates),
                    Peer::Conn(_) => None,
                };
                if probe.is_some() && a.probe_started.is_none() {
                    self.counters.probes += 1;
                    a.probe_sent = 0;
                    a.probe_nacked = 0;
                    a.probe_started = Some(now);
                }
                if probe.is_none() && a.probe_started.take().is_some() {
                    tracing::debug!(viewer = %key, outcome = ?a.chooser.last_probe(), meter = ?v.speed, "probe ended");
                    // A probe that showed room measured the link at least that fast:
                    // remembered now, not only at the next second's look (by then the
                    // meter holds only what came after the probe), so a viewer from the
                    // same network joining meanwhile starts as high.
                    if let Some(o) = a.chooser.last_probe().filter(|o| o.ok && o.at == now) {
                        let e = speed::Estimate {
                            bps: o.rate,
                            limited: false,
                        };
                        known.push((v.client, *key, e));
                    }
                    // What the probe sent, and the repairs of what it made the viewer
                    // lose, say nothing of the stream's own delivery; but a link that
                    // fell meanwhile (a probe ends early on the losses it brings) is
                    // told after half a window, as after a move down.
                    v.speed.restart_stepped_down(now);
                }
                // Copies in proportion to what the stream really sends it (a rendition
                // may run under its nominal rate).
                let stream = v
                    .speed
                    .sent_rate(now)
                    .filter(|r| *r > 0)
                    .unwrap_or(rates[a.chooser.current()])
                    .max(1);
                // Its copies grow over the probe's first half (the second is measured):
                // on a link without room the queue fills slowly, and the first losses
                // end the probe before it overflows by the whole step to the next
                // rendition.
                let ramp = a.probe_started.map_or(1.0, |t| {
                    let grow = self.config.adapt.probe_for.as_secs_f64() * GROW_SHARE;
                    (now.saturating_duration_since(t).as_secs_f64() / grow).clamp(0.0, 1.0)
                });
                v.pad_ratio = probe.map_or(0.0, |r| {
                    ramp * r.saturating_sub(stream) as f64 / stream as f64
                });
            }
        }
        for (client, key, e) in known {
            self.remember(now, client, key, e);
        }
        for to in targets {
            if let Ok(st) = self.stream(to, now) {
                st.empty_since = None;
                if st.upstream.is_empty() {
                    self.subscribe_upstream(now, to);
                }
            }
        }
        // Told between the last packet sent and the move's notices: the viewer stops
        // waiting for what was passed over.
        for (id, key, lost) in abandons {
            self.counters.rendition_abandons += 1;
            tell_skipped(&mut self.counters, &mut self.out, key, id, lost);
        }
        for (id, key) in moves {
            self.move_rendition(now, id, key);
        }
    }

    /// Tells every viewer that got nothing for [`HEARTBEAT`] that this edge is alive: the
    /// stream pauses while a hole upstream is waited for, and a viewer must not take that
    /// for a dead edge, nor a dead edge for a pause. The first time, over datagrams, with
    /// the last packet sent to it again (a tail-loss probe: the stream may have stopped
    /// with its last packets lost); then with keepalives.
    fn heartbeat(&mut self, now: Instant) {
        let node = self.config.settings.node;
        for (id, st) in self.streams.iter_mut() {
            let mut body = None;
            for (key, v) in st.viewers.iter_mut() {
                if v.cursor.is_none() || now.saturating_duration_since(v.last_sent) < HEARTBEAT {
                    continue;
                }
                // A TCP viewer with media still queued to it is not reading: what is
                // queued will reach it first, and keepalives would only fill its queue's
                // room for notices.
                if let Peer::Conn(c) = key {
                    if self.tcp_queued.get(c).is_some_and(|q| !q.is_empty()) {
                        continue;
                    }
                }
                v.last_sent = now;
                if let Some(e) = v.tail.due(now, HEARTBEAT).and_then(|s| st.ring.get(s)) {
                    if self.out.retransmit(*key, e.item.header, &e.item.media) {
                        self.counters.tail_probes += 1;
                        // The viewer counts it among what it received from here.
                        v.sent_bytes += e.item.media.rtp.len() as u64;
                        continue;
                    }
                }
                let d = body.get_or_insert_with(|| {
                    self.out.encode(
                        *id,
                        Body::Keepalive(Keepalive {
                            node,
                            sent_us: 0,
                            echo_us: 0,
                        }),
                    )
                });
                if let Some(d) = d {
                    self.out.send(*key, d.clone(), false);
                }
            }
        }
    }

    /// Adds set reflectors a control server lists that this edge does not know yet. The
    /// list only grows (paths are numbered by position); one that dies delivers nothing
    /// and is replaced by the dead-path rule.
    fn learn_reflectors(&mut self, listed: Vec<SocketAddr>) {
        for r in listed {
            if !self.config.reflectors.contains(&r) && self.config.reflectors.len() < 64 {
                tracing::info!(reflector = %r, "learned a set reflector from the control server");
                self.config.reflectors.push(r);
            }
        }
    }

    /// A drained edge tells its viewers to switch, every second while any remain.
    fn signal_drain(&mut self, now: Instant) {
        if !self.draining
            || self
                .last_drain_signal
                .is_some_and(|t| now.duration_since(t) < DRAIN_SIGNAL)
        {
            return;
        }
        self.last_drain_signal = Some(now);
        let reason = SwitchReason::Drain;
        for (id, st) in &self.streams {
            let Some(d) = self.out.encode(*id, Body::Switch { reason }) else {
                continue;
            };
            for key in st.viewers.keys() {
                self.out.send(*key, d.clone(), false);
            }
            self.counters.drain_signals += st.viewers.len() as u64;
        }
    }
}

/// Viewer `key` of stream `id` is passed over `lost` packets: counted, and told (between
/// the last packet sent before them and the first after).
fn tell_skipped(
    counters: &mut Counters,
    out: &mut Outbox<std::convert::Infallible>,
    key: Peer,
    id: StreamId,
    lost: u64,
) {
    counters.viewer_skipped_packets += lost;
    counters.viewer_skips += 1;
    let notice = Body::Notice {
        kind: NoticeKind::Skipped,
        value: lost,
    };
    out.control(key, id, notice);
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_core::NodeId;
    use braid_core::wire::rtp::Fields;
    use braid_core::wire::{Flags, Header, Key, Message, Rtp, SeqRange};
    use bytes::BytesMut;

    const STREAM: StreamId = StreamId(1);

    fn set() -> SocketAddr {
        "127.0.0.1:9100".parse().unwrap()
    }

    fn viewer(port: u16) -> Peer {
        Peer::Addr(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn codec() -> Codec {
        Codec::new(Key::derive("edge tests"))
    }

    fn edge(now: Instant) -> Edge {
        let config = Config {
            settings: Settings {
                node: NodeId(7),
                streams: Vec::new(),
                merge: merge::Config::default(),
                max_per_stream: 100,
                max_streams: 16,
            },
            reflectors: vec![set()],
            subscribe_k: 2,
            ring: ring::Config::default(),
            linger: Duration::from_secs(5),
            max_viewers: 100,
            viewer_window: 1000,
            tokens: None,
            hls: None,
            speed: speed::Config::default(),
            ladders: Vec::new(),
            adapt: speed::AdaptConfig::default(),
        };
        edge_of(config, now)
    }

    /// An edge with a ladder of two renditions, stream 11 at 10 kbit/s and 12 at
    /// `top_bps`, stream 12 held by a viewer pinned to it.
    fn two_renditions(now: Instant, top_bps: u64) -> Edge {
        let config = Config {
            ladders: vec![vec![(StreamId(11), 10_000), (StreamId(12), top_bps)]],
            ..edge(now).config
        };
        let mut e = edge_of(config, now);
        e.handle_input(now, pinned(12, now, viewer(6001), None));
        e
    }

    /// An edge of `config`, with the tests' codec, clock and cookie secret.
    fn edge_of(config: Config, now: Instant) -> Edge {
        Edge::new(config, codec(), WallClock::new(now, 1_800_000_000_000))
            .unwrap()
            .with_cookie_secret(COOKIE_SECRET)
    }

    /// A watch of `stream` from `from` (its start `start` at `seq`, counting nothing),
    /// changed by `edit`.
    fn watch_on(
        stream: u32,
        now: Instant,
        from: Peer,
        start: WatchStart,
        seq: u64,
        edit: impl FnOnce(&mut Watch),
    ) -> Input {
        let Input::Received { datagram, .. } = watch(now, from, start, seq) else {
            unreachable!()
        };
        let (_, mut m) = codec().decode_any(datagram).unwrap();
        m.header.stream = StreamId(stream);
        if let Body::Watch(w) = &mut m.body {
            edit(w);
        }
        from_viewer_msg(from, &m)
    }

    /// A watch pinning `from` to the highest rendition of `stream`'s ladder under
    /// `ceiling`.
    fn pinned(stream: u32, now: Instant, from: Peer, ceiling: Option<u64>) -> Input {
        watch_on(stream, now, from, WatchStart::Keyframe, 0, |w| {
            w.policy = Some(speed::Policy {
                ceiling,
                pinned: true,
            });
        })
    }

    const COOKIE_SECRET: [u8; 32] = [5; 32];

    /// A media message of source session `ssrc`, as a set reflector forwards it.
    fn media(ssrc: u32, seq: u64, flags: Flags) -> Input {
        let rtp = Rtp::build(
            Fields {
                marker: false,
                payload_type: 33,
                seq: SeqNo(seq).low(),
                timestamp: 0,
                ssrc,
            },
            &[0x47; 188],
        );
        let mut b = BytesMut::new();
        let header = Header {
            stream: STREAM,
            flags,
            ..Header::default()
        };
        codec()
            .encode_media(header, SeqNo(seq), &rtp, &mut b)
            .unwrap();
        Input::Received {
            from: Peer::Addr(set()),
            datagram: b.freeze(),
            node: true,
        }
    }

    /// A viewer's watch, with the edge's cookie for `from` (the edge's cookie epoch
    /// starts at its first watch, as this one's does at `now`: tests stay within it).
    fn watch(now: Instant, from: Peer, start: WatchStart, seq: u64) -> Input {
        watch_acked(now, from, start, seq, 0)
    }

    fn watch_acked(now: Instant, from: Peer, start: WatchStart, seq: u64, acked: u64) -> Input {
        let subject = match from {
            Peer::Addr(a) => Subject::Addr(a),
            Peer::Conn(c) => Subject::Conn(c),
        };
        let cookie = Cookies::new(COOKIE_SECRET).issue(now, subject);
        let m = Message {
            header: Header {
                stream: STREAM,
                ..Header::default()
            },
            body: Body::Watch(Watch {
                node: NodeId(100),
                lease_ms: 3000,
                start,
                seq: SeqNo(seq),
                acked: SeqNo(acked),
                cookie,
                token: Bytes::new(),
                received: None,
                policy: None,
                fits_kbps: None,
                rendition: None,
            }),
        };
        let mut b = BytesMut::new();
        Codec::viewer().encode(&m, &mut b).unwrap();
        Input::Received {
            from,
            datagram: b.freeze(),
            node: false,
        }
    }

    /// Everything the edge sends, decoded, in order.
    fn sent(e: &mut Edge) -> Vec<(Peer, Body)> {
        let mut out = Vec::new();
        while let Output::Transmit(t) = e.poll_output() {
            let m = codec().decode(t.datagram).unwrap();
            out.push((t.to, m.body));
        }
        out
    }

    /// A session of `n` packets from `first`, its first flagged as the session's start
    /// and a keyframe, all released into the ring by `now` + 1 s; what was sent.
    fn session(
        e: &mut Edge,
        now: &mut Instant,
        ssrc: u32,
        first: u64,
        n: u64,
    ) -> Vec<(Peer, Body)> {
        let mut out = Vec::new();
        for seq in first..first + n {
            let flags = if seq == first {
                Flags::KEYFRAME | Flags::DISCONTINUITY
            } else {
                Flags::empty()
            };
            e.handle_input(*now, media(ssrc, seq, flags));
            out.extend(sent(e));
        }
        for _ in 0..10 {
            *now += Duration::from_millis(100);
            e.handle_timeout(*now);
            out.extend(sent(e));
        }
        out
    }

    /// What `to` was sent: notices as (kind, value), media as (None, seq).
    fn seen(out: &[(Peer, Body)], to: Peer) -> Vec<(Option<NoticeKind>, u64)> {
        out.iter()
            .filter(|(p, _)| *p == to)
            .filter_map(|(_, b)| match b {
                Body::Notice { kind, value } => Some((Some(*kind), *value)),
                Body::Media(m) => Some((None, m.seq.0)),
                _ => None,
            })
            .collect()
    }

    /// A watch from `from` saying it has everything up to `acked`.
    fn ack(now: Instant, from: Peer, acked: u64) -> Input {
        watch_acked(now, from, WatchStart::Keyframe, 0, acked)
    }

    #[test]
    fn a_viewer_whose_link_holds_it_back_is_measured_and_slow() {
        let mut now = Instant::now();
        let mut e = edge(now);
        e.config.viewer_window = 64;
        let (fast, slow) = (viewer(5000), viewer(5001));
        e.handle_input(now, media(1, 1000, Flags::KEYFRAME | Flags::DISCONTINUITY));
        e.handle_input(now, watch(now, fast, WatchStart::Keyframe, 0));
        e.handle_input(now, watch(now, slow, WatchStart::Keyframe, 0));
        let mut next = 1001;
        // Highest sequence number each has received, and its RTP bytes; the slow one's
        // link carries 10 packets per 100 ms while the stream brings 40, and queues 64
        // (more are dropped), as a token bucket does.
        let (mut got_fast, mut fast_bytes) = (0, 0);
        let (mut got_slow, mut slow_bytes) = (0, 0);
        let mut queue = std::collections::VecDeque::new();
        for step in 0..80 {
            for (to, body) in steady(&mut e, &mut now, &mut next) {
                if let Body::Media(m) = body {
                    if to == fast {
                        got_fast = got_fast.max(m.seq.0);
                        fast_bytes += m.rtp.len() as u64;
                    } else if to == slow && queue.len() < 64 {
                        queue.push_back((m.seq.0, m.rtp.len() as u64));
                    }
                }
            }
            for (seq, len) in queue.drain(..queue.len().min(10)) {
                got_slow = got_slow.max(seq);
                slow_bytes += len;
            }
            e.handle_input(now, ack_received(now, fast, got_fast, fast_bytes));
            e.handle_input(now, ack_received(now, slow, got_slow, slow_bytes));
            if step == 20 {
                assert!(e.speeds(now).iter().all(|v| !v.slow), "not within 5 s");
            }
        }
        let speeds = e.speeds(now);
        let of = |p: Peer| *speeds.iter().find(|v| v.peer == p).unwrap();
        assert!(!of(fast).slow && !of(fast).limited, "{:?}", of(fast));
        assert!(of(slow).slow && of(slow).limited, "{:?}", of(slow));
        // 10 packets of 230 bytes or so per 100 ms, against 40.
        assert!(of(slow).bps * 3 < of(fast).bps, "{speeds:?}");
        assert_eq!(of(slow).client, NodeId(100));
        assert_eq!(e.slow_viewers(), 1);
        assert_eq!(e.counters().viewers_turned_slow, 1);
    }

    #[test]
    fn a_far_viewers_window_covers_its_round_trip() {
        let mut now = Instant::now();
        let mut e = edge(now);
        e.config.viewer_window = 64;
        let (near, far) = (viewer(5000), viewer(5001));
        e.handle_input(now, media(1, 1000, Flags::KEYFRAME | Flags::DISCONTINUITY));
        e.handle_input(now, watch(now, near, WatchStart::Keyframe, 0));
        e.handle_input(now, watch(now, far, WatchStart::Keyframe, 0));
        let mut next = 1001;
        // The stream brings 400 packets a second. The far viewer's watches say what it
        // had 600 ms earlier (a 600 ms round trip): 64 packets in flight would carry 107
        // a second. Both count what they received.
        let (mut got_near, mut near_bytes, mut got_far, mut far_bytes) = (0, 0, 0, 0);
        let mut far_acks = std::collections::VecDeque::new();
        let mut far_late = 0;
        for step in 0..100 {
            for (to, body) in steady(&mut e, &mut now, &mut next) {
                if let Body::Media(m) = body {
                    if to == near {
                        got_near = got_near.max(m.seq.0);
                        near_bytes += m.rtp.len() as u64;
                    } else if to == far {
                        got_far = got_far.max(m.seq.0);
                        far_bytes += m.rtp.len() as u64;
                    }
                }
            }
            e.handle_input(now, ack_received(now, near, got_near, near_bytes));
            far_acks.push_back((got_far, far_bytes));
            if far_acks.len() > 6 {
                let (acked, bytes) = far_acks.pop_front().unwrap_or((0, 0));
                e.handle_input(now, ack_received(now, far, acked, bytes));
            }
            if step == 50 {
                far_late = next - 1 - got_far;
            }
        }
        // It is sent the stream as it comes, halfway and at the end (held to 64 packets
        // in flight, it was 1,400 packets behind, skipped along the ring).
        let behind = next - 1 - got_far;
        assert!(
            behind <= 40 && far_late <= 40,
            "{behind} packets behind at the end, {far_late} halfway"
        );
        let speeds = e.speeds(now);
        let of = |p: Peer| *speeds.iter().find(|v| v.peer == p).unwrap();
        assert!(!of(far).slow, "{:?}", of(far));
        assert!(next - 1 - got_near <= 40, "the near one too");
    }

    /// 100 ms of a steady stream: 40 packets from `next` (a keyframe every 200), then
    /// the edge's timeouts; what it sent.
    fn steady(e: &mut Edge, now: &mut Instant, next: &mut u64) -> Vec<(Peer, Body)> {
        for _ in 0..40 {
            let flags = if *next % 200 == 0 {
                Flags::KEYFRAME
            } else {
                Flags::empty()
            };
            e.handle_input(*now, media(1, *next, flags));
            *next += 1;
        }
        *now += Duration::from_millis(100);
        e.handle_timeout(*now);
        sent(e)
    }

    /// A watch acknowledging `acked` and saying it received `received` bytes.
    fn ack_received(now: Instant, from: Peer, acked: u64, received: u64) -> Input {
        let Input::Received { datagram, .. } = ack(now, from, acked) else {
            unreachable!()
        };
        let (_, mut m) = codec().decode_any(datagram).unwrap();
        if let Body::Watch(w) = &mut m.body {
            w.received = Some(received);
        }
        from_viewer_msg(from, &m)
    }

    #[test]
    fn a_viewer_that_counts_is_credited_with_what_it_received_never_more_than_sent() {
        let mut now = Instant::now();
        let mut e = edge(now);
        let (honest, boaster) = (viewer(5000), viewer(5001));
        e.handle_input(now, media(1, 1000, Flags::KEYFRAME | Flags::DISCONTINUITY));
        e.handle_input(now, ack_received(now, honest, 0, 0));
        e.handle_input(now, ack_received(now, boaster, 0, 0));
        let mut next = 1001;
        let (mut got, mut bytes) = (0, 0u64);
        for _ in 0..40 {
            for (to, body) in steady(&mut e, &mut now, &mut next) {
                if let (true, Body::Media(m)) = (to == honest, body) {
                    got = got.max(m.seq.0);
                    bytes += m.rtp.len() as u64;
                }
            }
            // Everything acknowledged; a quarter said received (its link lost the rest).
            e.handle_input(now, ack_received(now, honest, got, bytes / 4));
            // A viewer claiming ten times what it was sent.
            e.handle_input(now, ack_received(now, boaster, got, bytes * 10));
        }
        let speeds = e.speeds(now);
        let of = |p: Peer| *speeds.iter().find(|v| v.peer == p).unwrap();
        // 400 packets a second of 200 RTP bytes: 640 kbit/s sent.
        let sent_bps = 400 * 200 * 8;
        let (h, b) = (of(honest).bps, of(boaster).bps);
        assert!(
            h * 4 > sent_bps * 9 / 10 && h * 4 < sent_bps * 11 / 10,
            "{h}"
        );
        assert!(
            b < sent_bps * 12 / 10,
            "never credited beyond what was sent: {b}"
        );
    }

    /// A media message of `stream`: one TS packet, starting a PES with time `pts` when
    /// `pts` is given, flagged as a keyframe or not, as a set reflector forwards it.
    fn ts_media_flagged(
        stream: u32,
        ssrc: u32,
        seq: u64,
        pts: Option<u64>,
        keyframe: bool,
    ) -> Input {
        ts_media_stamped(stream, ssrc, seq, pts, keyframe, 0)
    }

    /// [`ts_media_flagged`], its RTP time stamp `stamp`.
    fn ts_media_stamped(
        stream: u32,
        ssrc: u32,
        seq: u64,
        pts: Option<u64>,
        keyframe: bool,
        stamp: u32,
    ) -> Input {
        let mut ts = vec![0x47, 0x01, 0x00, 0x10];
        if let Some(v) = pts {
            ts[1] = 0x41;
            ts.extend([0, 0, 1, 0xE0, 0, 0, 0x80, 0x80, 5]);
            ts.extend([
                0x21 | ((v >> 29) as u8 & 0x0E),
                (v >> 22) as u8,
                ((v >> 14) as u8 & 0xFE) | 1,
                (v >> 7) as u8,
                ((v << 1) as u8) | 1,
            ]);
        }
        ts.resize(188, (seq % 251) as u8);
        let rtp = Rtp::build(
            Fields {
                marker: false,
                payload_type: 33,
                seq: SeqNo(seq).low(),
                timestamp: stamp,
                ssrc,
            },
            &ts,
        );
        let mut b = BytesMut::new();
        let flags = if keyframe {
            Flags::KEYFRAME
        } else {
            Flags::empty()
        };
        let header = Header {
            stream: StreamId(stream),
            flags,
            ..Header::default()
        };
        codec()
            .encode_media(header, SeqNo(seq), &rtp, &mut b)
            .unwrap();
        Input::Received {
            from: Peer::Addr(set()),
            datagram: b.freeze(),
            node: true,
        }
    }

    #[test]
    fn a_ladder_viewer_moves_at_the_aligned_keyframe_and_is_told() {
        ladder_move(false);
    }

    /// Small packets: a keyframe's first carries only the tables, its time stamp comes in
    /// the next. The move still finds the aligned keyframe (it jumped after three before).
    #[test]
    fn a_keyframe_whose_time_stamp_is_in_its_next_packet_is_aligned_too() {
        ladder_move(true);
    }

    /// A probe's copies grow from none over its first half (a link without room fills
    /// slowly and shows losses before the whole step overflows it), and stop at once
    /// when the viewer's asks show it losing packets.
    #[test]
    fn a_probes_copies_grow_and_stop_at_the_first_losses() {
        let mut now = Instant::now();
        let mut e = ladder_edge(now);
        let v = viewer(5000);
        let watch_11 = |now, acked, bytes| watch_of(11, now, v, acked, bytes);
        let (mut highest, mut bytes) = (0u64, 0u64);
        e.handle_input(now, watch_11(now, 0, 0));
        // Copies sent to the viewer per 20 ms step once a probe starts, and the step the
        // viewer asks for many packets at once.
        let mut copies = Vec::new();
        for i in 0..400u64 {
            let dup = probe_step(&mut e, &mut now, i, v, &mut highest, &mut bytes);
            if dup > 0 || !copies.is_empty() {
                copies.push(dup);
            }
            // Its asks show it losing packets, 15 steps into the probe.
            if copies.len() == 15 {
                let m = Message {
                    header: Header {
                        stream: StreamId(11),
                        ..Header::default()
                    },
                    body: Body::Nack(vec![SeqRange {
                        first: SeqNo(highest.saturating_sub(60)),
                        count: 50,
                    }]),
                };
                e.handle_input(now, from_viewer_msg(v, &m));
            }
            e.handle_input(now, watch_11(now, highest, bytes));
        }
        assert!(copies.len() > 15, "a probe ran: {copies:?}");
        // Growing: its first 100 ms send under half the copies of its third.
        let first: usize = copies[..5].iter().sum();
        let third: usize = copies[10..15].iter().sum();
        assert!(first * 2 <= third, "{copies:?}");
        // Stopped at once: no copy after the asks.
        assert!(copies[15..].iter().all(|&c| c == 0), "{copies:?}");
        assert_eq!(e.counters().probe_loss_ends, 1);
        // Acknowledged at once, the probe's packets never read as queued.
        assert_eq!(e.counters().probe_delay_ends, 0);
    }

    /// A probe ends, before any loss, once the viewer's acknowledgements come later
    /// than the path's least delay by more than [`PROBE_QUEUE`] (and a packet's
    /// interval): its packets queue on its link.
    #[test]
    fn a_probe_ends_when_its_packets_queue() {
        let mut now = Instant::now();
        let mut e = ladder_edge(now);
        let v = viewer(5000);
        let watch_11 = |now, acked, bytes| watch_of(11, now, v, acked, bytes);
        e.handle_input(now, watch_11(now, 0, 0));
        // What reached the viewer, by when: (arrival, highest number, bytes so far).
        let mut arrived: Vec<(Instant, u64, u64)> = Vec::new();
        let (mut highest, mut bytes) = (0u64, 0u64);
        let mut probe_from = None;
        let mut copies_after = 0;
        for i in 0..400u64 {
            let copies = probe_step(&mut e, &mut now, i, v, &mut highest, &mut bytes);
            if copies > 0 && probe_from.is_none() {
                probe_from = Some(now);
            }
            if e.counters().probe_delay_ends > 0 {
                copies_after += copies;
            }
            // 10 ms on the path; once the probe runs, a queue grows 15 ms a step.
            let queue = probe_from.map_or(Duration::ZERO, |t| (now - t).mul_f64(0.75));
            arrived.push((now + Duration::from_millis(10) + queue, highest, bytes));
            // What it has now, acknowledged at once.
            if let Some(&(_, h, b)) = arrived.iter().rev().find(|(at, ..)| *at <= now) {
                e.handle_input(now, watch_11(now, h, b));
            }
        }
        assert!(probe_from.is_some(), "a probe ran");
        assert_eq!(e.counters().probe_delay_ends, 1);
        assert_eq!(e.counters().probe_loss_ends, 0);
        assert_eq!(copies_after, 0, "no copies once it ended");
    }

    /// A watch of `stream` from viewer `v`, acknowledging `acked`, having received
    /// `bytes`.
    fn watch_of(stream: u32, now: Instant, v: Peer, acked: u64, bytes: u64) -> Input {
        let Input::Received { datagram, .. } = ack_received(now, v, acked, bytes) else {
            unreachable!()
        };
        let (_, mut m) = codec().decode_any(datagram).unwrap();
        m.header.stream = StreamId(stream);
        from_viewer_msg(v, &m)
    }

    /// One 20 ms step of a ladder edge's two renditions (11 and 12, a keyframe every 10
    /// packets): what viewer `v` got counted into `highest` and `bytes`; returns the
    /// copies (a probe's) among it.
    fn probe_step(
        e: &mut Edge,
        now: &mut Instant,
        i: u64,
        v: Peer,
        highest: &mut u64,
        bytes: &mut u64,
    ) -> usize {
        let key = i % 10 == 0;
        let pts = key.then_some(90_000 * (i / 10));
        e.handle_input(*now, ts_media_flagged(11, 0x11, 1000 + i, pts, key));
        e.handle_input(*now, ts_media_flagged(12, 0x12, 7000 + i, pts, key));
        *now += Duration::from_millis(20);
        e.handle_timeout(*now);
        let mut seen = std::collections::HashSet::new();
        let mut copies = 0;
        for (to, body) in sent(e) {
            if let (true, Body::Media(m)) = (to == v, body) {
                *bytes += m.rtp.len() as u64;
                *highest = (*highest).max(m.seq.0);
                if !seen.insert(m.seq.0) {
                    copies += 1;
                }
            }
        }
        copies
    }

    /// Message `m` as viewer `from` sends it.
    fn from_viewer_msg(from: Peer, m: &Message) -> Input {
        let mut b = BytesMut::new();
        Codec::viewer().encode(m, &mut b).unwrap();
        Input::Received {
            from,
            datagram: b.freeze(),
            node: false,
        }
    }

    /// An edge serving a ladder of two renditions, streams 11 (1 Mbit/s) and 12.
    fn ladder_edge(now: Instant) -> Edge {
        let config = Config {
            ladders: vec![vec![(StreamId(11), 1_000_000), (StreamId(12), 2_500_000)]],
            ..edge(now).config
        };
        edge_of(config, now)
    }

    fn ladder_move(split: bool) {
        let mut now = Instant::now();
        let mut e = ladder_edge(now);
        let v = viewer(5000);
        // A new viewer of the ladder, with nothing known of its speed: the lowest.
        let Input::Received { datagram, .. } = watch(now, v, WatchStart::Keyframe, 0) else {
            unreachable!()
        };
        let (_, mut m) = codec().decode_any(datagram).unwrap();
        m.header.stream = StreamId(12);
        let mut b = BytesMut::new();
        Codec::viewer().encode(&m, &mut b).unwrap();
        let join = |b: Bytes| Input::Received {
            from: v,
            datagram: b,
            node: false,
        };
        e.handle_input(now, join(b.clone().freeze()));
        let mut out = sent(&mut e);
        // Both renditions flow, keyframes every 10 packets at the same media times; the
        // second joins once the edge subscribes to it.
        let mut got = Vec::new();
        for i in 0..120u64 {
            let key = i % 10 == 0;
            let pts = (i % 10 == u64::from(split)).then_some(90_000 * (i / 10));
            e.handle_input(now, ts_media_flagged(11, 0x11, 1000 + i, pts, key));
            e.handle_input(now, ts_media_flagged(12, 0x12, 7000 + i, pts, key));
            if i == 35 {
                // It pins the top rendition.
                m.body = match m.body {
                    Body::Watch(mut w) => {
                        w.policy = Some(speed::Policy {
                            ceiling: None,
                            pinned: true,
                        });
                        Body::Watch(w)
                    }
                    b => b,
                };
                let mut b = BytesMut::new();
                Codec::viewer().encode(&m, &mut b).unwrap();
                e.handle_input(now, join(b.freeze()));
            }
            now += Duration::from_millis(20);
            e.handle_timeout(now);
            out.extend(sent(&mut e));
        }
        for (to, body) in &out {
            if *to != v {
                continue;
            }
            match body {
                Body::Media(m) => got.push(format!("{}", m.seq.0)),
                Body::Notice { kind, value } => got.push(format!("{kind:?}:{value}")),
                _ => {}
            }
        }
        let text = got.join(" ");
        let joined = RenditionNotice {
            ssrc: 0,
            reason: speed::Reason::Join as u8,
            index: 0,
            kbps: 1000,
        };
        assert!(
            text.starts_with(&format!("Rendition:{}", joined.pack())),
            "{text}"
        );
        // It moves at a keyframe of 11 to the keyframe of 12 with the same media time:
        // told which, where 11 ended and where 12 starts, then 12's packets from there.
        let moved = RenditionNotice {
            ssrc: 0x12,
            reason: speed::Reason::Policy as u8,
            index: 1,
            kbps: 2500,
        };
        let at = got
            .iter()
            .position(|g| *g == format!("Rendition:{}", moved.pack()))
            .unwrap_or_else(|| panic!("moved: {text}"));
        let last: u64 = got[at - 1].parse().unwrap();
        assert_eq!(last % 10, 9, "11 left just before a keyframe: {text}");
        let k = last + 1 - 1000;
        assert_eq!(got[at + 1], format!("Ended:{last}"), "{text}");
        assert_eq!(got[at + 2], format!("Session:{}", 7000 + k), "{text}");
        assert_eq!(got[at + 3], format!("{}", 7000 + k), "{text}");
        assert_eq!(e.counters().rendition_changes.get("policy"), Some(&1));
        assert_eq!(e.counters().rendition_unaligned, 0);
    }

    /// A viewer resuming here on a rendition its client says no longer fits, its
    /// window full mid-group: the rest of the group would take seconds on its link, so
    /// it is passed over (told as skipped, counted) and the move down is made at the
    /// next keyframe, not after the link carried the rest.
    #[test]
    fn a_move_down_passes_over_a_group_the_link_would_take_too_long_to_carry() {
        let mut now = Instant::now();
        let config = Config {
            ladders: vec![vec![(StreamId(11), 10_000), (StreamId(12), 100_000)]],
            viewer_window: 4,
            ..edge(now).config
        };
        let mut e = edge_of(config, now);
        let v = viewer(5000);
        // Both renditions held (two other viewers pinned to each), a keyframe every 30
        // packets at the same media times.
        for (port, stream, ceiling) in [(6000, 11, Some(10_000)), (6001, 12, None)] {
            e.handle_input(now, pinned(stream, now, viewer(port), ceiling));
        }
        let feed = |e: &mut Edge, now: Instant, i: u64| {
            let key = i % 30 == 0;
            let pts = key.then_some(90_000 * (i / 30));
            e.handle_input(now, ts_media_flagged(11, 0x11, 1000 + i, pts, key));
            e.handle_input(now, ts_media_flagged(12, 0x12, 7000 + i, pts, key));
        };
        for i in 0..62 {
            feed(&mut e, now, i);
        }
        sent(&mut e);
        // It resumes on 12 at 7031, its client saying 10 kbit/s fits.
        let resume = watch_on(12, now, v, WatchStart::Seq, 7031, |w| {
            w.fits_kbps = Some(10)
        });
        e.handle_input(now, resume);
        let mut out = sent(&mut e);
        for i in 62..70 {
            now += Duration::from_millis(20);
            feed(&mut e, now, i);
            e.handle_timeout(now);
            out.extend(sent(&mut e));
        }
        let mut got: Vec<String> = out
            .iter()
            .filter(|(to, _)| *to == v)
            .filter_map(|(_, body)| match body {
                Body::Media(m) => Some(format!("{}", m.seq.0)),
                Body::Notice { kind, value } if *kind != NoticeKind::Joined => {
                    Some(format!("{kind:?}:{value}"))
                }
                _ => None,
            })
            .collect();
        // (a tail probe may send its last packet again)
        got.dedup();
        let text = got.join(" ");
        let down = RenditionNotice {
            ssrc: 0x11,
            reason: speed::Reason::Down as u8,
            index: 0,
            kbps: 10,
        };
        let resumed = RenditionNotice {
            ssrc: 0,
            reason: speed::Reason::Join as u8,
            index: 1,
            kbps: 100,
        };
        // Where it resumed, its window's four, then the 25 before the keyframe at 7060
        // passed over, then 11 from its keyframe of the same time.
        let want = format!(
            "Rendition:{} 7031 7032 7033 7034 Skipped:25 Rendition:{} Ended:7034 Session:1060 1060",
            resumed.pack(),
            down.pack()
        );
        assert!(text.starts_with(&want), "{text}");
        assert_eq!(e.counters().rendition_abandons, 1);
        assert_eq!(e.counters().viewer_skipped_packets, 25);
        assert_eq!(e.counters().rendition_changes.get("down"), Some(&1));
    }

    /// A rendition whose stream takes more of a link than its nominal rate says (its
    /// headers and tables on top of a label) is fitted by what it takes: a viewer whose
    /// client says 60 kbit/s fits starts on the lowest, not on a rendition labelled 50
    /// kbit/s that carries 91 on the wire. A stream under its label keeps the label.
    #[test]
    fn renditions_are_fitted_by_their_rate_on_the_wire_when_it_is_more() {
        let mut now = Instant::now();
        let mut e = two_renditions(now, 50_000);
        // Stream 12: a 228-byte datagram every 20 ms by its time stamps, 91 kbit/s, for
        // 4 s; its first second comes at once (a new subscription's burst), which is not
        // its rate.
        for i in 0..200u64 {
            let key = i % 10 == 0;
            let pts = key.then_some(90_000 * (i / 10));
            let stamp = (i * 20 * 90) as u32;
            e.handle_input(now, ts_media_stamped(12, 0x12, 7000 + i, pts, key, stamp));
            if i < 50 {
                continue;
            }
            now += Duration::from_millis(20);
            e.handle_timeout(now);
            sent(&mut e);
        }
        let measured = e.rates[0][1];
        assert!((80_000..=100_000).contains(&measured), "{measured}");
        assert_eq!(e.rates[0][0], 10_000, "no stream measured: its label");
        let v = viewer(5000);
        e.handle_input(
            now,
            watch_on(12, now, v, WatchStart::Keyframe, 0, |w| {
                w.fits_kbps = Some(60)
            }),
        );
        let joined = sent(&mut e).into_iter().find_map(|(to, b)| match b {
            Body::Notice {
                kind: NoticeKind::Rendition,
                value,
            } if to == v => Some(RenditionNotice::unpack(value).index),
            _ => None,
        });
        assert_eq!(joined, Some(0));
        // Its stream gone from this edge (no viewer here takes it any more): what it
        // took on the wire is kept, not its label, for the next move that reads it.
        e.streams.remove(&StreamId(12));
        now += Duration::from_secs(1);
        e.handle_timeout(now);
        assert_eq!(e.rates[0][1], measured);
    }

    /// The two-rendition edge with 80 packets of stream 12 (a keyframe every ten, one
    /// every 20 ms) held and sent to its pinned viewer; and the time after.
    fn ladder_with_80_packets() -> (Edge, Instant) {
        let mut now = Instant::now();
        let mut e = two_renditions(now, 100_000);
        for i in 0..80u64 {
            let key = i % 10 == 0;
            let pts = key.then_some(90_000 * (i / 10));
            e.handle_input(now, ts_media_flagged(12, 0x12, 7000 + i, pts, key));
            now += Duration::from_millis(20);
            e.handle_timeout(now);
            sent(&mut e);
        }
        (e, now)
    }

    /// The bytes of RTP packets in `out` sent to `to`.
    fn media_bytes(out: &[(Peer, Body)], to: Peer) -> u64 {
        out.iter()
            .filter_map(|(p, b)| match b {
                Body::Media(m) if *p == to => Some(m.rtp.len() as u64),
                _ => None,
            })
            .sum()
    }

    /// A NACK from `to` for `count` packets of stream 12 from `first`.
    fn nack_12(to: Peer, first: u64, count: u16) -> Input {
        let m = Message {
            header: Header {
                stream: StreamId(12),
                ..Header::default()
            },
            body: Body::Nack(vec![SeqRange {
                first: SeqNo(first),
                count,
            }]),
        };
        from_viewer_msg(to, &m)
    }

    /// A viewer whose link is known to be slow (here from what its client says fits) is
    /// sent repairs at most at [`REPAIR_SHARE`] of its rate, however many it asks for:
    /// answered all at once, they would overflow the link that lost them. One whose link
    /// is not known to be limited gets every packet it asks for.
    #[test]
    fn repairs_to_a_viewer_with_a_slow_link_stay_within_its_share() {
        let (mut e, mut now) = ladder_with_80_packets();
        let fast = viewer(6001);
        // Its client says 100 kbit/s fits: a link of 125 kbit/s, 1.5 kB of repairs at once
        // (a large packet's worth), 4.7 kB/s after.
        let slow = viewer(5000);
        e.handle_input(
            now,
            watch_on(12, now, slow, WatchStart::Seq, 7070, |w| {
                w.fits_kbps = Some(100)
            }),
        );
        sent(&mut e);
        let nack = |to: Peer| nack_12(to, 7020, 40);
        let repairs = |out: Vec<(Peer, Body)>, to: Peer| media_bytes(&out, to);
        e.handle_input(now, nack(slow));
        let first = repairs(sent(&mut e), slow);
        assert!((1..=1500).contains(&first), "{first} bytes at once");
        let over = e.counters().repairs_over_budget;
        assert!(over >= 30, "{over} not sent again");
        // Asked again at once: nothing more; a second later, what refilled (4.7 kB/s),
        // no more than a burst's 1.5 kB at once.
        e.handle_input(now, nack(slow));
        assert_eq!(repairs(sent(&mut e), slow), 0);
        now += Duration::from_secs(1);
        e.handle_input(now, nack(slow));
        let later = repairs(sent(&mut e), slow);
        assert!(
            (1..=1500).contains(&later),
            "{later} bytes a second later (burst-capped)"
        );
        // The viewer nothing is known of gets all forty.
        e.handle_input(now, nack(fast));
        let all = repairs(sent(&mut e), fast);
        assert!(
            all >= 40 * 200,
            "{all} bytes to the viewer of unknown speed"
        );
    }

    /// A viewer whose rendition takes most of its link gets repairs only within what the
    /// link has beside the rendition, not [`REPAIR_SHARE`] of the link: more would fill
    /// the queue its losses came from. (Its client says 100 kbit/s fits: a link of 125;
    /// the rendition takes 100 or more of it.)
    #[test]
    fn repairs_to_a_rendition_that_fills_its_link_keep_to_what_is_left() {
        let (mut e, mut now) = ladder_with_80_packets();
        let v = viewer(5000);
        e.handle_input(
            now,
            watch_on(12, now, v, WatchStart::Seq, 7070, |w| {
                w.fits_kbps = Some(100)
            }),
        );
        sent(&mut e);
        let link = 125_000.0;
        // What the edge reads the rendition to take: its rate on the wire, or its label.
        let left = link - e.wire[0][1].unwrap_or(e.rates[0][1]) as f64;
        assert!(
            left < link * REPAIR_SHARE,
            "the rendition leaves {left} bit/s"
        );
        let nack = nack_12(v, 7020, 40);
        // Asked every 100 ms for 2 s: what it is sent after the first burst.
        e.handle_input(now, nack.clone());
        sent(&mut e);
        let mut bytes = 0.0;
        for _ in 0..20 {
            now += Duration::from_millis(100);
            e.handle_input(now, nack.clone());
            bytes += media_bytes(&sent(&mut e), v) as f64;
        }
        let rate = bytes * 8.0 / 2.0;
        let budget = left.max(link * REPAIR_FLOOR);
        assert!(
            rate <= budget * 1.1 && rate >= budget * 0.6,
            "{rate} bit/s of repairs, {budget} left beside the rendition"
        );
    }

    /// A viewer whose link drops most of what it is offered gets its repairs held to its
    /// share of what it receives, though what does arrive keeps up with the stream (its
    /// meter never reads it limited): answered in full, every ask goes into the queue
    /// that overflowed, and its holes never fill.
    #[test]
    fn repairs_to_a_viewer_whose_link_drops_most_of_them_are_held_to_its_share() {
        let (mut e, mut now) = ladder_with_80_packets();
        let v = viewer(5000);
        e.handle_input(now, watch_on(12, now, v, WatchStart::Seq, 7070, |_| {}));
        sent(&mut e);
        // Every 100 ms it asks for 40 packets and says it received 1,250 bytes more
        // (100 kbit/s): far less than it is sent.
        let mut received = 0u64;
        let mut late = 0u64;
        for i in 0..40 {
            now += Duration::from_millis(100);
            received += 1_250;
            e.handle_input(
                now,
                watch_on(12, now, v, WatchStart::Seq, 7070, |w| {
                    w.acked = SeqNo(7079);
                    w.received = Some(received);
                }),
            );
            e.handle_timeout(now);
            sent(&mut e);
            e.handle_input(now, nack_12(v, 7020, 40));
            let bytes = media_bytes(&sent(&mut e), v);
            if i >= 30 {
                late += bytes;
            }
        }
        // Over its last second: 30% of the 100 kbit/s it receives, and a burst.
        let rate = late * 8;
        assert!(
            rate <= (100_000.0 * REPAIR_SHARE * 1.2) as u64 + 12_000,
            "{rate} bit/s of repairs to a viewer receiving 100 kbit/s"
        );
        assert!(rate > 0, "no repairs at all");
        assert_eq!(e.counters().repair_floods, 1);
    }

    /// A viewer whose link loses copies, each repaired, is still measured: its recent
    /// acknowledgement delay shows the queue that builds on its link. (The bytes it
    /// says it received fall behind what was sent to it by every copy lost; read
    /// against them alone, no packet maps once the first few are lost, and a link
    /// whose queue stands full looks as empty as when the viewer joined.)
    #[test]
    fn a_lossy_viewers_recent_delay_shows_the_queue_on_its_link() {
        let (mut e, mut now) = ladder_with_80_packets();
        let v = viewer(5000);
        e.handle_input(now, watch_on(12, now, v, WatchStart::Seq, 7070, |_| {}));
        // What is on its way to the viewer (when it arrives, its sequence number, bytes).
        let mut link: Vec<(Instant, u64, u64)> = Vec::new();
        let (mut received, mut highest, mut firsts) = (0u64, 0u64, 0u64);
        let mut lost: Vec<u64> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut next = 7080u64;
        for step in 0..250u64 {
            // 10 ms on its link for 2 s, then 300 ms: a queue stands on it.
            let delay = Duration::from_millis(if step < 100 { 10 } else { 300 });
            for (to, body) in sent(&mut e) {
                if let (true, Body::Media(m)) = (to == v, body) {
                    let seq = m.seq.0;
                    if seen.insert(seq) {
                        firsts += 1;
                        // One first copy in five is lost; repairs arrive.
                        if firsts % 5 == 0 {
                            lost.push(seq);
                            continue;
                        }
                    }
                    link.push((now + delay, seq, m.rtp.len() as u64));
                }
            }
            link.retain(|&(at, seq, bytes)| {
                let arrived = at <= now;
                if arrived {
                    received += bytes;
                    highest = highest.max(seq);
                }
                !arrived
            });
            if step % 5 == 0 {
                e.handle_input(
                    now,
                    watch_on(12, now, v, WatchStart::Seq, 7070, |w| {
                        w.acked = SeqNo(highest);
                        w.received = Some(received);
                    }),
                );
                for seq in lost.drain(..) {
                    e.handle_input(now, nack_12(v, seq, 1));
                }
            }
            // The stream: a packet every 20 ms, a keyframe every tenth.
            let key = next % 10 == 0;
            let pts = key.then_some(90_000 * (next - 7000) / 10);
            e.handle_input(now, ts_media_flagged(12, 0x12, next, pts, key));
            next += 1;
            now += Duration::from_millis(20);
            e.handle_timeout(now);
        }
        let st = &e.streams[&StreamId(12)];
        let viewer = &st.viewers[&v];
        let recent = viewer.recent_delay.expect("a recent delay");
        assert!(
            recent >= Duration::from_millis(200),
            "recent delay {recent:?}, least {:?}",
            viewer.ack_delay
        );
        assert!(
            viewer
                .ack_delay
                .is_some_and(|d| d < Duration::from_millis(100))
        );
    }

    /// A packet asked for again before the copy just sent could have reached the viewer
    /// (within its round trip) is not sent again, and is counted: on a link whose
    /// queue holds the first answer, each ask answered again only fills the queue more.
    /// Asked again after a round trip (the copy was lost), it goes.
    #[test]
    fn a_packet_asked_for_again_within_the_viewers_round_trip_goes_once() {
        let (mut e, mut now) = ladder_with_80_packets();
        let v = viewer(5000);
        e.handle_input(now, watch_on(12, now, v, WatchStart::Seq, 7070, |_| {}));
        sent(&mut e);
        // Its watch 60 ms later says it has all it was sent: a round trip of 60 ms.
        now += Duration::from_millis(60);
        e.handle_input(
            now,
            watch_on(12, now, v, WatchStart::Seq, 7070, |w| {
                w.acked = SeqNo(7079);
                w.received = Some(1 << 40);
            }),
        );
        sent(&mut e);
        let nack = nack_12(v, 7072, 3);
        let repairs = |out: Vec<(Peer, Body)>| {
            out.iter()
                .filter(|(p, b)| *p == v && matches!(b, Body::Media(_)))
                .count()
        };
        e.handle_input(now, nack.clone());
        assert_eq!(repairs(sent(&mut e)), 3);
        now += Duration::from_millis(20);
        e.handle_input(now, nack.clone());
        assert_eq!(repairs(sent(&mut e)), 0, "asked again 20 ms later");
        assert_eq!(e.counters().repairs_too_soon, 3);
        now += Duration::from_millis(40);
        e.handle_input(now, nack);
        assert_eq!(repairs(sent(&mut e)), 3, "asked again a round trip later");
    }

    /// A viewer whose link's rate is known (here from what its client says fits) gets its
    /// catch-up paced at that rate: the packets waiting for it leave over time, not at
    /// once into its link's queue. Caught up, it is paced no more.
    #[test]
    fn a_viewer_with_a_known_link_rate_gets_its_catch_up_paced() {
        let mut now = Instant::now();
        // Stream 12 held and measured: a packet every 20 ms.
        let mut e = two_renditions(now, 100_000);
        let feed = |e: &mut Edge, now: Instant, i: u64| {
            let key = i % 10 == 0;
            let pts = key.then_some(90_000 * (i / 10));
            e.handle_input(now, ts_media_flagged(12, 0x12, 7000 + i, pts, key));
        };
        for i in 0..80u64 {
            feed(&mut e, now, i);
            now += Duration::from_millis(20);
            e.handle_timeout(now);
            sent(&mut e);
        }
        // It resumes 60 packets back, its client saying the top rendition fits: its link
        // carries about 125 kbit/s.
        let v = viewer(5000);
        let resume = watch_on(12, now, v, WatchStart::Seq, 7020, |w| {
            w.fits_kbps = Some(100)
        });
        e.handle_input(now, resume);
        let media = |out: Vec<(Peer, Body)>| {
            out.iter()
                .filter(|(to, b)| *to == v && matches!(b, Body::Media(_)))
                .count()
        };
        let at_once = media(sent(&mut e));
        // 20 ms of its rate (3,000 bytes at least): a dozen of these 228-byte packets,
        // not the 60 waiting.
        assert!((1..=15).contains(&at_once), "{at_once} at once");
        // Then at about its rate while the stream goes on (a packet every 20 ms): 15.6
        // kB/s, 68 packets a second, where the stream brings 50.
        let mut steps = Vec::new();
        for i in 80..130u64 {
            feed(&mut e, now, i);
            now += Duration::from_millis(20);
            e.handle_timeout(now);
            steps.push(media(sent(&mut e)));
        }
        let second: usize = steps.iter().sum();
        assert!(
            (55..=80).contains(&second),
            "{second} in the next second at 125 kbit/s, then: {steps:?}"
        );
        // Caught up within a few seconds more (it gains 15 packets a second), saying
        // what it received ...
        let (mut highest, mut got) = (0u64, 0u64);
        let mut i = 130u64;
        while e.streams[&StreamId(12)].viewers[&v].link_bps.is_some() && i < 500 {
            feed(&mut e, now, i);
            now += Duration::from_millis(20);
            e.handle_timeout(now);
            for (to, body) in sent(&mut e) {
                if let (true, Body::Media(m)) = (to == v, body) {
                    got += m.rtp.len() as u64;
                    highest = highest.max(m.seq.0);
                }
            }
            if i % 10 == 0 {
                e.handle_input(now, watch_of(12, now, v, highest, got));
                // (the pinned viewer's lease renewed)
                e.handle_input(now, pinned(12, now, viewer(6001), None));
            }
            i += 1;
        }
        assert!(i < 500, "caught up");
        // ... a burst (a repair upstream releasing what waited for it) goes to it as to
        // the viewer that was never paced.
        for k in 0..20 {
            feed(&mut e, now, i + k);
        }
        now += Duration::from_millis(20);
        e.handle_timeout(now);
        let out = sent(&mut e);
        let to = |p: Peer| {
            out.iter()
                .filter(|(to, b)| *to == p && matches!(b, Body::Media(_)))
                .count()
        };
        assert!(to(viewer(6001)) >= 10, "{}", to(viewer(6001)));
        assert_eq!(to(v), to(viewer(6001)));
    }

    /// Viewers of a restarted edge come back one by one (a client repeats its watch
    /// every 250 ms while its edge is silent), each at its own point. The stream opens
    /// for the first; one 200 ms later, ten packets behind it, is served from its own
    /// point, what lies between asked of the set reflectors. (It was started at a later
    /// keyframe, told it missed 395 packets, in 2 runs of 11 of the real restarted
    /// edge.)
    #[test]
    fn viewers_resuming_a_cold_stream_one_by_one_are_each_served_from_their_point() {
        let (out, e) = resume_late(Duration::from_millis(200), 1010, 0);
        // Within the gather: the merge starts at the second's point, nothing backfilled.
        assert_eq!(e.counters().backfill_packets, 0);
        let (first, second) = (viewer(5000), viewer(5001));
        let late = media_to(&out, second);
        assert_eq!(late.first(), Some(&1010), "{:?}", seen(&out, second));
        assert_eq!(late, (1010..1200).collect::<Vec<_>>());
        assert!(!told_missed(&out, second), "{:?}", seen(&out, second));
        // The first is served from its own point, not the second's.
        assert_eq!(media_to(&out, first), (1020..1200).collect::<Vec<_>>());
    }

    /// A restarted edge's viewers resuming one by one, the second `late` after the first
    /// and from `second_from`, while its set reflector keeps the stream from `kept_from`
    /// (answering asks for it at once) and the stream has a keyframe every 10 packets.
    /// What was sent to each viewer, and the edge.
    fn resume_late(late: Duration, second_from: u64, kept_from: u64) -> (Vec<(Peer, Body)>, Edge) {
        let mut now = Instant::now();
        let mut e = edge(now);
        let (first, second) = (viewer(5000), viewer(5001));
        let mut out = Vec::new();
        let flags = |seq: u64| Flags::empty().with(Flags::KEYFRAME, seq % 10 == 0);
        let step = |e: &mut Edge, now: Instant, out: &mut Vec<(Peer, Body)>| {
            let got = sent(e);
            for (p, b) in &got {
                if let (true, Body::Nack(ranges)) = (*p == Peer::Addr(set()), b) {
                    for r in ranges {
                        for seq in r.first.0.max(kept_from)..r.end().0 {
                            let f = flags(seq).with(Flags::RETRANSMIT, true);
                            e.handle_input(now, media(1, seq, f));
                        }
                    }
                }
            }
            out.extend(got);
            out.extend(sent(e));
        };
        let start = now;
        e.handle_input(now, watch(now, first, WatchStart::Seq, 1020));
        for seq in 1030..1200 {
            now += Duration::from_millis(10);
            e.handle_input(now, media(1, seq, flags(seq)));
            e.handle_timeout(now);
            step(&mut e, now, &mut out);
            if now.duration_since(start) >= late && !out.iter().any(|(p, _)| *p == second) {
                e.handle_input(now, watch(now, second, WatchStart::Seq, second_from));
                step(&mut e, now, &mut out);
            }
        }
        (out, e)
    }

    /// Whether `v` was told it missed packets.
    fn told_missed(out: &[(Peer, Body)], v: Peer) -> bool {
        seen(out, v)
            .iter()
            .any(|(k, _)| *k == Some(NoticeKind::Missed))
    }

    /// Media numbers sent to `v` in order (the last may go twice: a probe for a lost
    /// tail).
    fn media_to(out: &[(Peer, Body)], v: Peer) -> Vec<u64> {
        let mut got: Vec<u64> = seen(out, v)
            .into_iter()
            .filter_map(|(k, s)| k.is_none().then_some(s))
            .collect();
        got.dedup();
        got
    }

    #[test]
    fn a_viewer_resuming_after_the_stream_started_gets_its_past_from_the_set_reflectors() {
        // 600 ms after the first (a client under load, its watch late): the stream
        // released long before, its ring starts at 1020.
        let (out, e) = resume_late(Duration::from_millis(600), 1005, 0);
        let (first, second) = (viewer(5000), viewer(5001));
        assert_eq!(media_to(&out, second), (1005..1200).collect::<Vec<_>>());
        assert!(!told_missed(&out, second), "{:?}", seen(&out, second));
        assert_eq!(media_to(&out, first), (1020..1200).collect::<Vec<_>>());
        let c = e.counters();
        assert_eq!((c.backfill_packets, c.backfill_missing), (15, 0));
        assert_eq!(c.resume_missed_packets, 0);
    }

    #[test]
    fn a_past_the_set_reflectors_no_longer_keep_is_counted_and_the_viewer_starts_at_a_keyframe() {
        // They keep from 1012: 1012-1019 come, a keyframe (1010) does not; the viewer
        // starts at the first keyframe held after its last ask, told what it missed.
        let (out, e) = resume_late(Duration::from_millis(600), 995, 1012);
        let second = viewer(5001);
        let got = media_to(&out, second);
        assert_eq!(got, (1020..1200).collect::<Vec<_>>());
        assert!(
            seen(&out, second).contains(&(Some(NoticeKind::Missed), 25)),
            "{:?}",
            seen(&out, second)
        );
        let c = e.counters();
        assert_eq!((c.backfill_packets, c.backfill_missing), (8, 17));
        // Within its asks: 3 of them, 200 ms apart (and a housekeeping tick).
        let at = out
            .iter()
            .position(|(p, b)| *p == second && matches!(b, Body::Media(_)));
        let asks = out[..at.expect("served")]
            .iter()
            .filter(|(p, b)| *p == Peer::Addr(set()) && matches!(b, Body::Nack(_)))
            .count();
        assert!(asks >= 3, "asked {asks} times before giving up");
    }

    #[test]
    fn a_backfill_extended_by_viewer_after_viewer_still_ends_in_time() {
        // The set reflector never answers; a viewer every 150 ms names a point one
        // earlier than the last. The first to wait is served within the bound.
        let mut now = Instant::now();
        let mut e = edge(now);
        let mut out = Vec::new();
        e.handle_input(now, watch(now, viewer(5000), WatchStart::Seq, 1020));
        let mut asked_at = None;
        let mut next_viewer = 0;
        for seq in 1030..1400 {
            now += Duration::from_millis(10);
            let flags = Flags::empty().with(Flags::KEYFRAME, seq % 10 == 0);
            e.handle_input(now, media(1, seq, flags));
            e.handle_timeout(now);
            out.extend(sent(&mut e).into_iter().map(|o| (now, o)));
            if seq >= 1090 && (seq - 1090) % 15 == 0 && next_viewer < 20 {
                let v = viewer(5001 + next_viewer);
                e.handle_input(
                    now,
                    watch(now, v, WatchStart::Seq, 1015 - u64::from(next_viewer)),
                );
                asked_at.get_or_insert(now);
                next_viewer += 1;
                out.extend(sent(&mut e).into_iter().map(|o| (now, o)));
            }
        }
        let first_media = out
            .iter()
            .find(|(_, (p, b))| *p == viewer(5001) && matches!(b, Body::Media(_)))
            .map(|(t, _)| *t)
            .expect("served");
        let waited = first_media - asked_at.expect("asked");
        assert!(
            waited <= BACKFILL_ASK_EVERY * u32::from(BACKFILL_ASKS + 2) + HOUSEKEEPING,
            "waited {waited:?}"
        );
        assert!(e.counters().backfill_missing > 0);
    }

    #[test]
    fn a_viewer_entering_a_new_session_later_is_told_where_it_starts() {
        let mut now = Instant::now();
        let mut e = edge(now);
        let early = viewer(5000);
        e.handle_input(now, watch(now, early, WatchStart::Keyframe, 0));
        session(&mut e, &mut now, 1, 1000, 10);
        let out = session(&mut e, &mut now, 2, 5000, 10);
        assert!(
            seen(&out, early).contains(&(None, 5009)),
            "{:?}",
            seen(&out, early)
        );
        // Resumes in the old session after the new one was released to the others: its
        // cursor crosses into the new session, and it must learn where that starts.
        let late = viewer(5001);
        e.handle_input(now, watch(now, late, WatchStart::Seq, 1005));
        let got = seen(&sent(&mut e), late);
        let told = got
            .iter()
            .position(|s| *s == (Some(NoticeKind::Session), 5000))
            .unwrap_or_else(|| panic!("a session notice naming 5000: {got:?}"));
        let first_new = got.iter().position(|s| *s == (None, 5000)).unwrap();
        assert!(told < first_new, "told before the packet: {got:?}");
        // And where the old session ended, first: a lost tail is asked for.
        let ended = got
            .iter()
            .position(|s| *s == (Some(NoticeKind::Ended), 1009))
            .unwrap_or_else(|| panic!("an ended notice naming 1009: {got:?}"));
        assert!(ended < told, "{got:?}");
        assert!(got.contains(&(None, 1009)), "{got:?}");
    }

    #[test]
    fn a_new_session_whose_first_packet_was_lost_is_sought_and_starts_with_it() {
        let mut now = Instant::now();
        let mut e = edge(now);
        let v = viewer(5000);
        e.handle_input(now, watch(now, v, WatchStart::Keyframe, 0));
        session(&mut e, &mut now, 1, 1000, 10);
        // The new session's flagged first packet lost on every path.
        for seq in 5001..5010 {
            e.handle_input(now, media(2, seq, Flags::empty()));
        }
        let out = sent(&mut e);
        let asked: Vec<SeqRange> = out
            .iter()
            .filter(|(p, _)| *p == Peer::Addr(set()))
            .filter_map(|(_, b)| match b {
                Body::Nack(r) => Some(r.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(
            asked
                .iter()
                .any(|r| r.first.0 <= 5000 && r.first.0 + u64::from(r.count) > 5000),
            "the numbers before 5001 asked for: {asked:?}"
        );
        // The answer comes within the window.
        now += Duration::from_millis(20);
        e.handle_input(
            now,
            media(
                2,
                5000,
                Flags::KEYFRAME | Flags::DISCONTINUITY | Flags::RETRANSMIT,
            ),
        );
        let mut out = sent(&mut e);
        for _ in 0..10 {
            now += Duration::from_millis(100);
            e.handle_timeout(now);
            out.extend(sent(&mut e));
        }
        let got = seen(&out, v);
        assert!(
            got.contains(&(Some(NoticeKind::Session), 5000)),
            "the session starts at its first packet: {got:?}"
        );
        let media: Vec<u64> = got.iter().filter(|s| s.0.is_none()).map(|s| s.1).collect();
        assert_eq!(media.first(), Some(&5000), "{media:?}");
        // In order; the newest may come twice (the tail-loss probe once the stream
        // went quiet), nothing else does.
        let mut once = media.clone();
        once.dedup();
        assert!(once.windows(2).all(|w| w[1] > w[0]), "{media:?}");
        assert!(media.len() - once.len() <= 1, "{media:?}");
    }

    /// A stream closed (its viewer gone, the linger over) while packets wait behind holes
    /// counts them as dropped, and its last figures are kept: first copies less released
    /// is exactly what it dropped.
    #[test]
    fn a_stream_closed_while_packets_wait_counts_them_and_keeps_its_last_figures() {
        let mut now = Instant::now();
        let mut e = edge(now);
        e.handle_input(now, watch(now, viewer(5000), WatchStart::Keyframe, 0));
        let mut seq = 1000;
        e.handle_input(now, media(1, seq, Flags::KEYFRAME | Flags::DISCONTINUITY));
        // Every 100 ms one packet lost on every path, four arriving: the merge always
        // holds some behind a hole it is repairing.
        for _ in 0..200 {
            seq += 2;
            for _ in 0..4 {
                e.handle_input(now, media(1, seq, Flags::empty()));
                seq += 1;
            }
            now += Duration::from_millis(100);
            e.handle_timeout(now);
            sent(&mut e);
            if e.reports().is_empty() {
                break;
            }
        }
        assert!(e.reports().is_empty(), "the stream closed");
        let closed = e.take_closed();
        assert_eq!(closed.len(), 1);
        let r = &closed[0];
        let first: u64 = r.paths.iter().map(|(_, p)| p.first).sum();
        let dropped = e.counters().drops.get("stream_closed");
        assert!(dropped > 0, "packets were waiting at the close");
        assert_eq!(first - r.merge.released, dropped);
        assert_eq!(e.counters().streams_closed, 1);
        assert!(e.take_closed().is_empty(), "taken once");
    }

    /// An edge that does not carry a stream answers a message for it with an error, but
    /// never an error with one: two such nodes would trade errors forever.
    #[test]
    fn an_error_for_a_stream_not_carried_is_not_answered() {
        let now = Instant::now();
        let mut e = edge(now);
        e.config.settings.streams = vec![StreamId(1)];
        let msg = |body: Body| {
            let mut b = bytes::BytesMut::new();
            let m = Message {
                header: Header {
                    stream: StreamId(99),
                    ..Header::default()
                },
                body,
            };
            codec().encode(&m, &mut b).unwrap();
            Input::Received {
                from: Peer::Addr(set()),
                datagram: b.freeze(),
                node: true,
            }
        };
        e.handle_input(now, msg(Body::Unsubscribe { node: NodeId(3) }));
        assert_eq!(sent(&mut e).len(), 1, "a message for it gets an error");
        e.handle_input(
            now,
            msg(Body::Error {
                code: ErrorCode::UNKNOWN_STREAM,
                text: "stream not carried here".into(),
            }),
        );
        assert!(sent(&mut e).is_empty(), "an error gets nothing");
        assert_eq!(e.counters().drops.get("unknown_stream"), 2);
        assert!(e.stream_unknown(StreamId(99)));
    }

    #[test]
    fn a_set_reflectors_refusal_is_counted_and_not_answered() {
        let now = Instant::now();
        let mut e = edge(now);
        let m = Message {
            header: Header {
                stream: STREAM,
                ..Header::default()
            },
            body: Body::Error {
                code: ErrorCode::UNAUTHORIZED,
                text: "no trusted certificate".into(),
            },
        };
        let mut b = BytesMut::new();
        codec().encode(&m, &mut b).unwrap();
        for _ in 0..3 {
            e.handle_input(
                now,
                Input::Received {
                    from: Peer::Addr(set()),
                    datagram: b.clone().freeze(),
                    node: true,
                },
            );
        }
        assert_eq!(e.counters().refusals, 3);
        assert_eq!(
            e.counters().drops.total(),
            0,
            "a refusal is not a bad message"
        );
        assert!(
            sent(&mut e).iter().all(|(to, _)| *to != Peer::Addr(set())),
            "an error is never answered"
        );
    }
}
