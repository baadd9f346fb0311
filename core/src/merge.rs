//! The multi-path merge: many copies in, one ordered stream out.
//!
//! Every node that receives a stream over several paths runs one [`Buffer`] per stream.
//! The first copy of each sequence number wins and later copies are dropped as
//! duplicates. A packet that arrives ahead of a missing one waits, for at most the reorder
//! window, for the missing one to arrive on some path; then the missing one is given up
//! as a gap and counted. Nothing is ever released out of order.
//!
//! The buffer also keeps the loss register used for repair: a sequence number that every
//! responsive path has gone past without delivering (or that stays missing for
//! [`Config::nack_delay`]) is asked for on the path expected to answer soonest, and again,
//! at that path's measured round trip, while an answer can still come in time. Per path
//! it measures the usual longest gap between arrivals, the lag behind the first copy and
//! the repair round trip; a path silent beyond its usual gaps, or behind the others
//! beyond its usual lag, is asked for nothing until it delivers again.
//!
//! # Contract
//!
//! A sans-IO state machine: feed it with [`Buffer::handle_input`] or
//! [`Buffer::handle_timeout`], then call [`Buffer::poll_output`] until it returns
//! [`Output::Timeout`], and call `handle_timeout` again at that instant at the latest.
//! Time only moves when passed in. Memory is bounded by [`Config::max_held`] whatever
//! arrives: a sender that jumps far ahead flushes the buffer instead of growing it, and old
//! or repeated sequence numbers cost a counter increment.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::id::PathId;
use crate::seq::SeqNo;
use crate::wire::SeqRange;

/// Sequence numbers from here on are refused (the wire carries 48 bits; this leaves
/// room for every sequence number the buffer computes past one it accepts).
pub const MAX_SEQ: u64 = 1 << 62;

/// Merge settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How long a missing packet is waited for once a later one has arrived. Size it to
    /// the delay difference between the slowest and fastest path plus one repair round
    /// trip. The default, 200 ms, assumes paths within about 120 ms of each other and an
    /// upstream under 80 ms away.
    pub reorder_window: Duration,
    /// Most packets held at once (bounds memory). The default, 4096, covers the window at
    /// up to about 20 Mbps of 1316-byte payloads with room to spare.
    pub max_held: usize,
    /// Whether to ask upstream for missing packets.
    pub nack: bool,
    /// How long a missing packet waits for a path that has not yet gone past it before it
    /// is asked for anyway. The default, 30 ms, spends a retransmission rather than wait
    /// for a slow path.
    pub nack_delay: Duration,
    /// How many times a missing packet is asked for at least, each time on the path
    /// expected to answer soonest other than the last asked (default 4: with 10% loss
    /// on the answer's path, a packet is lost only if four answers in a row are). Once
    /// a path's repair round trip is measured, asks go on, at most 12, while one more
    /// answer can still come within the window.
    pub nack_attempts: u8,
    /// How long after an ask, still unanswered, the next one goes out before the path's
    /// round trip is measured, and at most after (default 40 ms, so four asks, the last
    /// at most 150 ms after the hole, fit in the default window); then the round trip
    /// plus four times its variation, 10 ms at least.
    pub nack_retry: Duration,
    /// Whether a hole waits only as long as the measured paths need, within
    /// `reorder_window` (the default): the lag of the slowest healthy path behind the
    /// first copy, the NACK delay and 12 asks at the quickest measured repair round trip.
    /// Off, every hole waits the whole window. Until a round trip is measured, the whole
    /// window.
    pub adaptive_window: bool,
    /// A path is healthy while data arrived on it within this long (default 500 ms).
    /// A path silent for twice its usual longest gap between arrivals (20 ms at least)
    /// is asked for nothing in the meantime, and does not hold back the asks of holes
    /// every other path went past.
    pub path_timeout: Duration,
    /// With `Some(quiet)`: once nothing has come for `quiet`, no packet on any path and
    /// no word from the sender ([`Buffer::heard`]), holes are not given up while the
    /// silence lasts (for [`SILENCE_HOLD_MAX`] at most), and when the sender is heard
    /// again each hole waits what it had left and is asked for afresh. A sender silent
    /// that long is gone (a viewer's edge restarting, or dead until the viewer moves):
    /// the repairs the holes wait for can only come after it, and waiting costs the
    /// player nothing, as nothing newer comes meanwhile. Size `quiet` above the
    /// sender's longest silence while it lives (an edge's keepalives: 160 ms). Off by
    /// default (`None`).
    pub hold_in_silence: Option<Duration>,
}

/// Holes are held through a silence ([`Config::hold_in_silence`]) this long at most: a
/// set reflector keeps the last 4 s, so what a restarted sender can still give back.
pub const SILENCE_HOLD_MAX: Duration = Duration::from_secs(4);

impl Default for Config {
    fn default() -> Self {
        Config {
            reorder_window: Duration::from_millis(200),
            max_held: 4096,
            nack: true,
            nack_delay: Duration::from_millis(30),
            nack_attempts: 4,
            nack_retry: Duration::from_millis(40),
            adaptive_window: true,
            path_timeout: Duration::from_millis(500),
            hold_in_silence: None,
        }
    }
}

impl Config {
    /// Checks that the settings make sense together.
    pub fn validate(&self) -> Result<(), Error> {
        if self.reorder_window.is_zero() {
            return Err(Error::InvalidConfig(
                "merge reorder window must be above zero".into(),
            ));
        }
        if !(16..=1 << 20).contains(&self.max_held) {
            return Err(Error::InvalidConfig(
                "merge max_held must be between 16 and 1048576 packets".into(),
            ));
        }
        if self.nack && self.nack_delay >= self.reorder_window {
            return Err(Error::InvalidConfig(
                "merge nack delay must be shorter than the reorder window, or the answer comes too late".into(),
            ));
        }
        if self.nack && (self.nack_attempts == 0 || self.nack_retry.is_zero()) {
            return Err(Error::InvalidConfig(
                "merge nack attempts and nack retry interval must be above zero".into(),
            ));
        }
        Ok(())
    }
}

/// What the buffer is told.
#[derive(Debug)]
pub enum Input<T> {
    /// A copy of packet `seq` arrived on `path`.
    Packet {
        /// The path it came on.
        path: PathId,
        /// Its sequence number.
        seq: SeqNo,
        /// The packet itself, released unchanged.
        item: T,
    },
    /// Something that could not be decoded arrived on `path` (counted only).
    Malformed {
        /// The path it came on.
        path: PathId,
    },
}

/// What the buffer says.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<T> {
    /// The next packet of the stream, in order.
    Packet {
        /// Its sequence number.
        seq: SeqNo,
        /// The packet.
        item: T,
    },
    /// `count` sequence numbers starting at `first` are given up: they will never be
    /// released.
    Gap {
        /// The first one given up.
        first: SeqNo,
        /// How many.
        count: u64,
    },
    /// Ask upstream for these sequence numbers, over `path`.
    Nack {
        /// What is missing.
        range: SeqRange,
        /// A healthy path to ask on.
        path: PathId,
    },
    /// Nothing more until this instant (or until the next input, if `None`).
    Timeout(Option<Instant>),
}

/// Counters for one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathStats {
    /// Packets received on this path.
    pub received: u64,
    /// Packets this path was first to deliver.
    pub first: u64,
    /// Copies of packets already held or released.
    pub duplicates: u64,
    /// Packets that arrived after their sequence number was given up.
    pub late: u64,
    /// Undecodable packets reported for this path.
    pub malformed: u64,
}

/// Counters for the whole buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets released in order.
    pub released: u64,
    /// Sequence numbers given up (released as gaps).
    pub gaps: u64,
    /// Gap events (runs of consecutive sequence numbers given up).
    pub gap_events: u64,
    /// Duplicate copies dropped, over all paths.
    pub duplicates: u64,
    /// Late packets dropped, over all paths.
    pub late: u64,
    /// Asks for sequence numbers, first asks and repeats.
    pub nacked: u64,
    /// Of those, repeated asks (the first went unanswered).
    pub nack_retries: u64,
    /// Silences of the whole stream its holes were held through
    /// ([`Config::hold_in_silence`]).
    pub silences_held: u64,
    /// Asked-for sequence numbers that then arrived in time.
    pub repaired: u64,
    /// Times the sender jumped more than `max_held` ahead and the buffer was flushed.
    pub jumps: u64,
    /// Packets numbered more than `max_held` past the newest held and not (yet) believed: no other path
    /// agreed, and with other paths delivering one path's word is not enough (see
    /// [`Buffer`]'s far jumps). Dropped; what lies behind an agreed jump is asked for.
    pub unconfirmed_jumps: u64,
    /// Times a new session's start was sought before its first packet to arrive (see
    /// [`Buffer::seek_before`]).
    pub seeks: u64,
    /// Numbers at the end of a session found missing by the sender's word of where it
    /// ended (see [`Buffer::expect_through`]), to be asked for.
    pub tail_holes: u64,
}

enum Slot<T> {
    /// `asks`: how many times it was asked for; `asked`: on which path and when, last.
    Hole {
        since: Instant,
        asks: u8,
        asked: Option<(PathId, Instant)>,
    },
    Full(T),
}

impl<T> Slot<T> {
    fn hole(since: Instant) -> Slot<T> {
        Slot::Hole {
            since,
            asks: 0,
            asked: None,
        }
    }
}

/// Consecutive holes due to be asked for (again) at `due`, having been asked `asks` times.
struct NackRun {
    first: SeqNo,
    count: u64,
    due: Instant,
    asks: u8,
    /// The path the last ask went to: a repeat goes to the next one, so every path that
    /// may hold the packet is asked in turn.
    last_path: Option<PathId>,
}

#[derive(Default)]
struct PathState {
    stats: PathStats,
    last_data: Option<Instant>,
    highest: Option<SeqNo>,
    /// Its usual longest gap between arrivals (a maximum that decays with each arrival:
    /// a stream comes in bursts, a frame at a time, and the pause between frames is
    /// what silence is measured against).
    gap: Option<Duration>,
    /// How far behind the first copy its copies usually arrive (a moving average; zero
    /// for a path that is first).
    lag: Option<Duration>,
    /// Its repair round trip, smoothed, and how much that varies (as TCP's RTO).
    srtt: Option<Duration>,
    rttvar: Duration,
    /// How long its packets wait in a queue on the way now, as its owner measures it
    /// ([`Buffer::set_queue`]): an answer waits as long.
    queue: Duration,
}

/// A path silent for this many of its usual longest gaps between arrivals is suspect:
/// asks go elsewhere at once, not after [`Config::path_timeout`].
const SUSPECT_GAPS: u32 = 2;
/// ... but never before this much silence (a stream's own pauses, timer jitter).
const SUSPECT_FLOOR: Duration = Duration::from_millis(20);
/// Retries never go faster than this, whatever the round trip.
const RETRY_FLOOR: Duration = Duration::from_millis(10);
/// At most this many asks per hole, however short the round trip.
const MAX_ASKS: u8 = 12;
/// The adaptive window is sized again at most this often.
const WINDOW_EVERY: Duration = Duration::from_millis(10);

impl PathState {
    /// Takes an arrival at `now`, `lag` behind the first copy of its number.
    fn arrived(&mut self, now: Instant, lag: Duration) {
        if let Some(last) = self.last_data {
            // An outage is not a gap between packets.
            let d = now
                .saturating_duration_since(last)
                .min(Duration::from_secs(1));
            self.gap = Some(self.gap.map_or(d, |g| (g * 63 / 64).max(d)));
        }
        self.lag = Some(self.lag.map_or(lag, |l| (l * 15 + lag) / 16));
    }

    /// A repair asked on this path came back after `rtt`.
    fn answered(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(s) => {
                let dev = rtt.abs_diff(s);
                self.rttvar = (self.rttvar * 3 + dev) / 4;
                self.srtt = Some((s * 7 + rtt) / 8);
            }
        }
    }

    /// How long an answer from this path is expected to take: its round trip (or
    /// `default` before one was measured), and never less than its lag behind the first
    /// copy (it may not hold the packet yet).
    fn expected_answer(&self, default: Duration) -> Duration {
        self.srtt
            .unwrap_or(default)
            .max(self.lag.unwrap_or_default())
    }

    /// How long to wait for its answer before asking again.
    fn retry_after(&self, default: Duration) -> Duration {
        match self.srtt {
            Some(s) => (s + self.rttvar * 4).clamp(RETRY_FLOOR, default),
            None => default,
        }
    }

    /// Silent for longer than a few of its usual longest gaps.
    fn suspect(&self, now: Instant) -> bool {
        match (self.last_data, self.gap) {
            (Some(last), Some(gap)) => {
                now.saturating_duration_since(last) > (gap * SUSPECT_GAPS).max(SUSPECT_FLOOR)
            }
            _ => false,
        }
    }
}

/// For recently released sequence numbers, whether each was delivered or given up; tells
/// a duplicate from a late packet without unbounded memory.
struct History {
    bits: Vec<u64>,
    mask: u64,
}

impl History {
    fn new(min_len: usize) -> History {
        let len = min_len.next_power_of_two().max(64) as u64;
        History {
            bits: vec![0; (len / 64) as usize],
            mask: len - 1,
        }
    }

    fn len(&self) -> u64 {
        self.mask + 1
    }

    fn set(&mut self, seq: SeqNo, delivered: bool) {
        let i = seq.0 & self.mask;
        let (word, bit) = ((i / 64) as usize, i % 64);
        if delivered {
            self.bits[word] |= 1 << bit;
        } else {
            self.bits[word] &= !(1 << bit);
        }
    }

    fn get(&self, seq: SeqNo) -> bool {
        let i = seq.0 & self.mask;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set_gap_range(&mut self, first: SeqNo, count: u64) {
        // Only the last `len` entries can ever be looked at again.
        let skip = count.saturating_sub(self.len());
        for i in skip..count {
            self.set(first.plus(i), false);
        }
    }
}

/// A change of session waiting for the old one's holes.
struct NextSession<T> {
    /// When it happens at the latest.
    deadline: Instant,
    /// The new session's packets held aside meanwhile: path, number, item.
    waiting: Vec<(PathId, SeqNo, T)>,
    /// Where the new session starts, if the sender said.
    start: Option<SeqNo>,
    /// Whether the sender's word of where the old session ended is awaited (see
    /// [`Buffer::start_next_session`]).
    awaiting_end: bool,
    /// The highest number held aside: a packet beyond the next asks for those between
    /// at once (a change of session may wait its whole window, and by then they would
    /// be too old to repair).
    highest: Option<SeqNo>,
}

/// The merge buffer for one stream. See the module documentation for the contract.
pub struct Buffer<T> {
    config: Config,
    /// How long a hole waits now (the configured window, or less: see
    /// [`Config::adaptive_window`]), and when it was sized.
    window: Duration,
    window_at: Option<Instant>,
    now: Option<Instant>,
    /// The next sequence number to release; `None` until the first packet.
    next: Option<SeqNo>,
    /// `slots[i]` holds sequence number `next + i`. The last slot is always full.
    slots: VecDeque<Slot<T>>,
    released_any: bool,
    /// Whether anything was ever released (a change of session does not forget it).
    played: bool,
    /// Before the first release, packets wait one window so that copies reordered ahead
    /// of the first arrival still make it.
    hold_until: Option<Instant>,
    /// Before the first release, packets wait at least until then too
    /// ([`Buffer::gather_until`]).
    gather_until: Option<Instant>,
    ready: VecDeque<Output<T>>,
    /// First asks, in the order the holes appeared.
    nack_queue: VecDeque<NackRun>,
    /// Repeated asks, in order of `due`.
    retry_queue: VecDeque<NackRun>,
    history: History,
    /// When the first copy of each recent number arrived (indexed like `history`): a
    /// later copy's delay behind it is its path's lag.
    first_seen: Vec<Option<(SeqNo, Instant)>>,
    paths: Vec<PathState>,
    stats: Stats,
    nack_turn: usize,
    /// Where the sender said the stream starts, before the first packet came.
    expected: Option<SeqNo>,
    /// A change of source session waiting for the old one's holes: until when, and the
    /// new session's packets held aside meanwhile.
    next_session: Option<NextSession<T>>,
    /// Far jumps claimed and not yet believed, by path.
    jump_claims: Vec<JumpClaim>,
    /// When the sender was last heard, on any path ([`Config::hold_in_silence`]).
    last_arrival: Option<Instant>,
}

/// A path's word that the stream is far ahead of the buffer.
#[derive(Debug, Clone, Copy)]
struct JumpClaim {
    path: PathId,
    /// The newest number it claimed, and how many it claimed in a row.
    last: SeqNo,
    run: u32,
    at: Instant,
}

/// A far jump's claims are forgotten after this long.
const JUMP_CLAIM_TTL: Duration = Duration::from_secs(2);
/// With no other path delivering, this many numbers in a row from one path are believed.
const JUMP_RUN: u32 = 8;
/// Most claims remembered.
const MAX_JUMP_CLAIMS: usize = 8;

impl<T> Buffer<T> {
    /// A buffer that starts at the first packet it receives (after holding it one window,
    /// in case earlier packets arrive reordered behind it).
    pub fn new(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let history = History::new(config.max_held);
        Ok(Buffer {
            first_seen: vec![None; history.len() as usize],
            history,
            window: config.reorder_window,
            window_at: None,
            config,
            now: None,
            next: None,
            slots: VecDeque::new(),
            released_any: false,
            played: false,
            hold_until: None,
            gather_until: None,
            ready: VecDeque::new(),
            nack_queue: VecDeque::new(),
            retry_queue: VecDeque::new(),
            paths: Vec::new(),
            stats: Stats::default(),
            nack_turn: 0,
            expected: None,
            next_session: None,
            jump_claims: Vec::new(),
            last_arrival: None,
        })
    }

    /// A buffer that knows the stream starts at `first`: anything missing from there on is
    /// a gap, and nothing is held back at start.
    pub fn starting_at(config: Config, first: SeqNo) -> Result<Self, Error> {
        let mut b = Self::new(config)?;
        b.next = Some(first);
        b.released_any = true;
        Ok(b)
    }

    /// Takes one input at time `now`.
    pub fn handle_input(&mut self, now: Instant, input: Input<T>) {
        self.advance(now);
        match input {
            Input::Packet { path, seq, item } => self.handle_packet(now, path, seq, item),
            Input::Malformed { path } => self.path_mut(path).stats.malformed += 1,
        }
    }

    /// Moves time forward to `now` (time never goes back).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
    }

    /// The next output; call until it returns [`Output::Timeout`].
    pub fn poll_output(&mut self) -> Output<T> {
        if let Some(out) = self.ready.pop_front() {
            return out;
        }
        let Some(now) = self.now else {
            return Output::Timeout(None);
        };
        if self.finish_session_change(now) {
            if let Some(out) = self.ready.pop_front() {
                return out;
            }
        }
        if let Some(out) = self.poll_nack(now) {
            return out;
        }
        if let Some(out) = self.poll_release(now) {
            return out;
        }
        Output::Timeout(self.next_deadline())
    }

    /// When [`Buffer::handle_timeout`] should next be called, without taking any output:
    /// `Some(now)` if output is waiting.
    pub fn next_timeout(&self) -> Option<Instant> {
        if !self.ready.is_empty() {
            return self.now;
        }
        self.next_deadline()
    }

    /// The source started a new session: its packets go to
    /// [`Buffer::handle_next_session`] and wait aside while the old session's holes are
    /// filled (its packets still come, reordered) or given up, at most one window; then
    /// the old session is released ([`Buffer::flush`]) and the new one starts with what
    /// waited. With nothing held, the change is immediate, unless `awaiting_end`: then
    /// it also waits (at most its window) for the sender's word of where the old session
    /// ended ([`Buffer::expect_through`]), which the new session's first packet may
    /// overtake; without it a lost tail is never missed.
    pub fn start_next_session(&mut self, now: Instant, awaiting_end: bool) {
        self.advance(now);
        if self.next.is_none() || (self.slots.is_empty() && !awaiting_end) {
            self.flush();
            return;
        }
        let deadline = now + self.config.reorder_window;
        let n = self.next_session.get_or_insert(NextSession {
            deadline,
            waiting: Vec::new(),
            start: None,
            awaiting_end: false,
            highest: None,
        });
        n.awaiting_end |= awaiting_end;
    }

    /// Where the new session starts (see [`Buffer::expect_from`]): kept for when the
    /// change of session happens, or applied now if it already did.
    pub fn expect_session_from(&mut self, now: Instant, first: SeqNo) {
        match &mut self.next_session {
            Some(n) => n.start = Some(first),
            None => self.expect_from(now, first),
        }
    }

    /// The first packet of a new session to arrive is not the one the sender flagged as
    /// its start: those before it were lost on every path, and nothing says how many.
    /// Asks every healthy path for the `count` numbers before `seen` (a path that never
    /// held a number does not answer it); what comes while the new session's start is
    /// still settling (the change of session, then one window) is taken, so the session
    /// starts where the sender started it.
    pub fn seek_before(&mut self, now: Instant, seen: SeqNo, count: u16) {
        self.advance(now);
        let count = u64::from(count).min(seen.0);
        if !self.config.nack || count == 0 {
            return;
        }
        let range = SeqRange {
            first: SeqNo(seen.0 - count),
            count: count as u16,
        };
        let healthy: Vec<PathId> = (0..self.paths.len())
            .filter(|&i| self.healthy(&self.paths[i], now))
            .map(|i| PathId(i as u8))
            .collect();
        if healthy.is_empty() {
            return;
        }
        self.stats.seeks += 1;
        for path in healthy {
            self.stats.nacked += count;
            self.ready.push_back(Output::Nack { range, path });
        }
    }

    /// Whether a change of session is waiting for the old session's holes.
    pub fn changing_session(&self) -> bool {
        self.next_session.is_some()
    }

    /// A packet of the new session (see [`Buffer::start_next_session`]): held aside while
    /// the change waits (at most `max_held` of them; more are counted as late), taken at
    /// once otherwise.
    pub fn handle_next_session(&mut self, now: Instant, path: PathId, seq: SeqNo, item: T) {
        self.advance(now);
        self.heard(now);
        match &mut self.next_session {
            Some(n) if n.waiting.len() < self.config.max_held => {
                // Numbers skipped since the last one held aside (or the start the
                // sender gave) are asked for now.
                let before = n.highest.or(n.start.map(|s| SeqNo(s.0.saturating_sub(1))));
                if let Some(h) = before.filter(|h| seq.0 > h.0 + 1 && self.config.nack) {
                    let count = (seq.0 - h.0 - 1).min(u64::from(u16::MAX));
                    let range = SeqRange {
                        first: SeqNo(h.0 + 1),
                        count: count as u16,
                    };
                    self.stats.nacked += count;
                    self.ready.push_back(Output::Nack { range, path });
                }
                if n.highest.is_none_or(|h| seq > h) {
                    n.highest = Some(seq);
                }
                n.waiting.push((path, seq, item));
            }
            Some(_) => {
                self.stats.late += 1;
                self.path_mut(path).stats.late += 1;
            }
            None => self.handle_packet(now, path, seq, item),
        }
    }

    /// Ends a change of session once the old session has no hole left or its time is up.
    fn finish_session_change(&mut self, now: Instant) -> bool {
        let Some(n) = &self.next_session else {
            return false;
        };
        let holes = self.slots.iter().any(|s| matches!(s, Slot::Hole { .. }));
        if (holes || n.awaiting_end) && now < n.deadline {
            return false;
        }
        let Some(n) = self.next_session.take() else {
            return false;
        };
        self.flush();
        self.expected = n.start;
        for (path, seq, item) in n.waiting {
            self.handle_packet(now, path, seq, item);
        }
        true
    }

    /// The source started a new session: releases at once everything held of the old
    /// one, in order (packets as packets, holes as gaps), without waiting for anything,
    /// and starts over at the next packet. Numbers between the two sessions never
    /// existed and are not counted.
    pub fn flush(&mut self) {
        if let Some(next) = self.next {
            let end = next.plus(self.slots.len() as u64);
            if end > next {
                self.jump(next, end);
            }
        }
        self.slots.clear();
        self.nack_queue.clear();
        self.retry_queue.clear();
        self.next = None;
        self.released_any = false;
        self.hold_until = None;
        self.gather_until = None;
        self.expected = None;
    }

    /// Drops everything held and starts over at the next packet (the stream restarted).
    /// Held packets are given up and counted as gaps.
    pub fn reset(&mut self) {
        if let Some(next) = self.next {
            let held = self.slots.len() as u64;
            if held > 0 {
                self.stats.gaps += held;
                self.stats.gap_events += 1;
                self.ready.push_back(Output::Gap {
                    first: next,
                    count: held,
                });
            }
        }
        self.slots.clear();
        self.nack_queue.clear();
        self.retry_queue.clear();
        self.next = None;
        self.released_any = false;
        self.hold_until = None;
        self.gather_until = None;
    }

    /// The sender says the stream starts at `first` (an edge's *joined* notice): before
    /// anything was released, whatever is missing between `first` and the first packet
    /// held becomes holes to ask for, instead of a start after them. Does nothing once
    /// packets were released, or when `first` is too far behind to hold.
    pub fn expect_from(&mut self, now: Instant, first: SeqNo) {
        self.advance(now);
        if self.released_any {
            return;
        }
        let Some(next) = self.next else {
            // Nothing yet: the first packet decides whether `first` is near enough to
            // believe (a stream may have moved on, to another session, meanwhile). Told
            // twice, the earlier start.
            self.expected = Some(self.expected.map_or(first, |e| e.min(first)));
            return;
        };
        if first >= next || (next.0 - first.0) as usize >= self.config.max_held - self.slots.len() {
            return;
        }
        let holes = next.0 - first.0;
        for _ in 0..holes {
            self.slots.push_front(Slot::hole(now));
        }
        if self.config.nack {
            self.nack_queue.push_back(NackRun {
                first,
                count: holes,
                due: now + self.config.nack_delay,
                asks: 0,
                last_path: None,
            });
        }
        self.next = Some(first);
    }

    /// Ends the first packet's wait now: the owner knows the buffer already holds as much
    /// of the stream as the wait would gather (a burst of the stream's last moments, at
    /// a join). Holes still wait their window. Does nothing once packets were released.
    pub fn start_now(&mut self) {
        if !self.released_any {
            self.hold_until = self.gather_until;
        }
    }

    /// Nothing is released before `until` (unless something already was): the owner
    /// gathers where its readers start (an edge opening a stream for viewers that
    /// resume, each at its own point, as they come back one by one) and may move the
    /// start earlier meanwhile ([`Buffer::expect_from`]).
    pub fn gather_until(&mut self, until: Instant) {
        if self.released_any {
            return;
        }
        self.gather_until = Some(until);
        if let Some(h) = self.hold_until.as_mut() {
            *h = (*h).max(until);
        }
    }

    /// The sender says the session held now ends at `last` (an edge's *ended* notice):
    /// whatever is missing up to it becomes holes to ask for, so the old session's tail
    /// is repaired like any hole and a change of session waits for it. Does nothing when
    /// `last` is held or released already, or too far ahead to belong to what is held.
    pub fn expect_through(&mut self, now: Instant, last: SeqNo) {
        if let Some(n) = &mut self.next_session {
            n.awaiting_end = false;
        }
        self.advance(now);
        let Some(next) = self.next else {
            return;
        };
        let end = next.0 + self.slots.len() as u64;
        if last.0 < end {
            return;
        }
        let holes = last.0 - end + 1;
        if holes as usize > (self.config.max_held / 2).saturating_sub(self.slots.len()) {
            return;
        }
        for _ in 0..holes {
            self.slots.push_back(Slot::hole(now));
        }
        self.stats.tail_holes += holes;
        if self.config.nack {
            self.nack_queue.push_back(NackRun {
                first: SeqNo(end),
                count: holes,
                due: now + self.config.nack_delay,
                asks: 0,
                last_path: None,
            });
        }
    }

    /// Counters for the whole buffer.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Says how long `path`'s packets now wait in a queue on the way (measured from
    /// their senders' time stamps, `queueing::QueueDelay`): an ask on it is repeated no
    /// sooner than that, and its answer is not expected before. The round trip timed
    /// from the last ask cannot show it: on a full queue the answer to an earlier ask
    /// comes just after the last, and asks repeated at that pace fill the queue further.
    pub fn set_queue(&mut self, path: PathId, queue: Duration) {
        self.path_mut(path).queue = queue;
    }

    /// Counters for one path (zero for a path never seen).
    pub fn path_stats(&self, path: PathId) -> PathStats {
        self.paths
            .get(usize::from(path.0))
            .map(|p| p.stats)
            .unwrap_or_default()
    }

    /// The paths seen so far, with their counters.
    pub fn paths(&self) -> impl Iterator<Item = (PathId, PathStats)> + '_ {
        self.paths
            .iter()
            .enumerate()
            .filter(|(_, p)| p.last_data.is_some() || p.stats.malformed > 0)
            .map(|(i, p)| (PathId(i as u8), p.stats))
    }

    /// Whether data arrived on `path` within the path timeout.
    pub fn is_healthy(&self, path: PathId) -> bool {
        let Some(now) = self.now else { return false };
        self.paths
            .get(usize::from(path.0))
            .is_some_and(|p| self.healthy(p, now))
    }

    /// Packets and holes currently held.
    pub fn held(&self) -> usize {
        self.slots.len()
    }

    /// Packets held (holes aside): what is lost if the buffer is dropped now.
    pub fn packets_held(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Full(_)))
            .count()
    }

    /// The next sequence number to be released, once known.
    pub fn next_seq(&self) -> Option<SeqNo> {
        self.next
    }

    fn advance(&mut self, now: Instant) {
        if self.now.is_none_or(|t| now > t) {
            self.now = Some(now);
        }
        // The paths' figures move slowly: the window is sized again every few
        // milliseconds, not for every packet.
        if self.window_at.is_none_or(|t| now >= t + WINDOW_EVERY) {
            self.window_at = Some(now);
            self.window = self.measured_window(now);
        }
    }

    /// How long a hole waits now: the configured window, or with
    /// [`Config::adaptive_window`] what the measured paths need within it.
    fn measured_window(&self, now: Instant) -> Duration {
        let cap = self.config.reorder_window;
        if !self.config.adaptive_window || !self.config.nack {
            return cap;
        }
        let mut skew = Duration::ZERO;
        let mut retry: Option<Duration> = None;
        for p in self.paths.iter().filter(|p| self.healthy(p, now)) {
            skew = skew.max(p.lag.unwrap_or_default());
            if p.srtt.is_some() {
                let r = p.retry_after(self.config.nack_retry);
                retry = Some(retry.map_or(r, |x| x.min(r)));
            }
        }
        let Some(retry) = retry else {
            return cap;
        };
        let need = skew + self.config.nack_delay + retry * u32::from(MAX_ASKS);
        need.clamp((self.config.nack_delay * 2).min(cap), cap)
    }

    /// The window a hole waits now ([`Config::adaptive_window`]).
    pub fn window(&self) -> Duration {
        self.window
    }

    fn path_mut(&mut self, path: PathId) -> &mut PathState {
        let i = usize::from(path.0);
        if self.paths.len() <= i {
            // At most 256 entries: PathId is a u8.
            self.paths.resize_with(i + 1, PathState::default);
        }
        &mut self.paths[i]
    }

    fn healthy(&self, p: &PathState, now: Instant) -> bool {
        p.last_data
            .is_some_and(|t| now.saturating_duration_since(t) <= self.config.path_timeout)
    }

    /// The sender spoke at `now` (a packet, or any word of its: a keepalive). After a
    /// silence holes were held through ([`Config::hold_in_silence`]), each waits what it
    /// had left, and is asked for afresh (its asks went to a sender that was not there).
    pub fn heard(&mut self, now: Instant) {
        self.advance(now);
        let last = self.last_arrival.replace(now);
        let Some(quiet) = last.map(|t| now.saturating_duration_since(t)) else {
            return;
        };
        if self.config.hold_in_silence.is_none_or(|q| quiet < q) {
            return;
        }
        let mut runs: Vec<(SeqNo, u64)> = Vec::new();
        let next = self.next.unwrap_or(SeqNo(0));
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Slot::Hole { since, asks, .. } = slot else {
                continue;
            };
            *since += quiet;
            *asks = 0;
            let seq = next.plus(i as u64);
            match runs.last_mut() {
                Some((first, count)) if first.plus(*count) == seq => *count += 1,
                _ => runs.push((seq, 1)),
            }
        }
        if runs.is_empty() {
            return;
        }
        self.stats.silences_held += 1;
        if self.config.nack {
            for (first, count) in runs {
                self.nack_queue.push_back(NackRun {
                    first,
                    count,
                    due: now + self.config.nack_delay,
                    asks: 0,
                    last_path: None,
                });
            }
        }
    }

    /// Whether holes are held now, the whole stream silent ([`Config::hold_in_silence`]),
    /// and until when at most.
    fn silent_until(&self, now: Instant) -> Option<Instant> {
        let (quiet, last) = (self.config.hold_in_silence?, self.last_arrival?);
        let (from, until) = (last + quiet, last + quiet + SILENCE_HOLD_MAX);
        (from <= now && now < until).then_some(until)
    }

    fn handle_packet(&mut self, now: Instant, path: PathId, seq: SeqNo, item: T) {
        self.heard(now);
        let p = self.path_mut(path);
        p.stats.received += 1;
        if seq.0 >= MAX_SEQ {
            // No packet after it could be numbered: refuse it rather than stall the stream
            // at the end of the number space (the wire carries 48 bits).
            p.stats.malformed += 1;
            return;
        }
        if p.highest.is_none_or(|h| seq > h) {
            p.highest = Some(seq);
        }
        // How far behind the first copy this one comes (zero if it is the first).
        let i = (seq.0 & self.history.mask) as usize;
        let lag = match self.first_seen[i] {
            Some((s, t)) if s == seq => now.saturating_duration_since(t),
            _ => {
                self.first_seen[i] = Some((seq, now));
                Duration::ZERO
            }
        };
        let p = self.path_mut(path);
        p.arrived(now, lag);
        p.last_data = Some(now);

        let Some(next) = self.next else {
            // A start told before the first packet, and near it: what lies between is
            // holes to ask for. At the stream's first start the packets wait a window
            // anyway (the player's buffer fills). At a later session's, with its start
            // told, nothing before it belongs to it, and the player runs on what it holds:
            // nothing waits (it did, a whole window: a 10 s buffer wrote nothing for 5 to
            // 10 s after every change of rendition). Untold, the start settles a window.
            let told = self
                .expected
                .take()
                .filter(|e| *e <= seq && seq.0 - e.0 < self.config.max_held as u64 / 2);
            if told.is_none() || !self.played {
                let window = now + self.config.reorder_window;
                self.hold_until = Some(self.gather_until.map_or(window, |g| g.max(window)));
            }
            let behind = told.filter(|e| *e < seq);
            let holes = behind.map_or(0, |e| seq.0 - e.0);
            for _ in 0..holes {
                self.slots.push_back(Slot::hole(now));
            }
            if let (Some(e), true) = (behind, self.config.nack) {
                self.nack_queue.push_back(NackRun {
                    first: e,
                    count: holes,
                    due: now + self.config.nack_delay,
                    asks: 0,
                    last_path: None,
                });
            }
            self.next = Some(behind.unwrap_or(seq));
            self.slots.push_back(Slot::Full(item));
            self.path_mut(path).stats.first += 1;
            return;
        };

        if seq < next {
            if !self.released_any
                && ((next.0 - seq.0) as usize) < self.config.max_held - self.slots.len()
            {
                // Still settling at start: grow the front.
                let holes = next.0 - seq.0 - 1;
                for _ in 0..holes {
                    self.slots.push_front(Slot::hole(now));
                }
                self.slots.push_front(Slot::Full(item));
                if holes > 0 && self.config.nack {
                    self.nack_queue.push_back(NackRun {
                        first: seq.next(),
                        count: holes,
                        due: now + self.config.nack_delay,
                        asks: 0,
                        last_path: None,
                    });
                }
                self.next = Some(seq);
                self.path_mut(path).stats.first += 1;
                return;
            }
            let recent = next.0 - seq.0 <= self.history.len();
            if self.released_any && recent && self.history.get(seq) {
                self.stats.duplicates += 1;
                self.path_mut(path).stats.duplicates += 1;
            } else {
                self.stats.late += 1;
                self.path_mut(path).stats.late += 1;
            }
            return;
        }

        let idx = seq.0 - next.0;
        if let Some(slot) = usize::try_from(idx)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        {
            match slot {
                Slot::Full(_) => {
                    self.stats.duplicates += 1;
                    self.path_mut(path).stats.duplicates += 1;
                }
                Slot::Hole { asks, asked, .. } => {
                    if *asks > 0 {
                        self.stats.repaired += 1;
                    }
                    // An answer from the path asked last: its round trip.
                    let rtt = asked
                        .filter(|(p, _)| *p == path)
                        .map(|(_, at)| now.saturating_duration_since(at));
                    *slot = Slot::Full(item);
                    let p = self.path_mut(path);
                    p.stats.first += 1;
                    if let Some(rtt) = rtt {
                        p.answered(rtt);
                    }
                }
            }
            return;
        }

        let next = if idx >= self.config.max_held as u64 {
            // Far past everything held (not a buffer that filled up behind an old hole,
            // which moves on as it always did): not on one path's word.
            let newest = next.plus(self.slots.len() as u64);
            let far = seq.0 - newest.0 >= self.config.max_held as u64;
            if far && !self.jump_believed(now, path, seq) {
                self.stats.unconfirmed_jumps += 1;
                return;
            }
            // Invariant: idx >= max_held >= 16, so this does not underflow.
            let base = SeqNo(seq.0 + 1 - self.config.max_held as u64);
            self.jump(next, base);
            base
        } else {
            next
        };

        let end = next.plus(self.slots.len() as u64);
        let holes = seq.0 - end.0;
        for _ in 0..holes {
            self.slots.push_back(Slot::hole(now));
        }
        if holes > 0 && self.config.nack {
            self.nack_queue.push_back(NackRun {
                first: end,
                count: holes,
                due: now + self.config.nack_delay,
                asks: 0,
                last_path: None,
            });
        }
        self.slots.push_back(Slot::Full(item));
        self.path_mut(path).stats.first += 1;
    }

    /// The sender gave up `count` packets from `first` (every path of an edge lost them
    /// and its repairs failed): the holes among them are given up now, not after the
    /// window, and asked for no more. Packets held there are kept.
    pub fn give_up(&mut self, now: Instant, first: SeqNo, count: u64) {
        self.advance(now);
        let Some(next) = self.next else {
            return;
        };
        // Due at once: counted from a window ago (or from whenever time began).
        let expired = now.checked_sub(self.config.reorder_window).unwrap_or(now);
        let from = first.0.max(next.0) - next.0;
        let to = (first.0 + count)
            .saturating_sub(next.0)
            .min(self.slots.len() as u64);
        for i in from..to {
            if let Some(Slot::Hole { since, asks, .. }) = self.slots.get_mut(i as usize) {
                *since = expired;
                *asks = u8::MAX;
            }
        }
    }

    /// Whether a number more than `max_held` past the newest held is believed: a stream does not leap
    /// on one path's word. Another path claiming a number near it (both went past an
    /// outage together) makes it so; with no other path delivering, a run of
    /// [`JUMP_RUN`] numbers in a row from the one path does. Claims last
    /// [`JUMP_CLAIM_TTL`]. A new source session does not come this way: it starts the
    /// buffer over.
    fn jump_believed(&mut self, now: Instant, path: PathId, seq: SeqNo) -> bool {
        let span = self.config.max_held as u64;
        self.jump_claims
            .retain(|c| now.saturating_duration_since(c.at) <= JUMP_CLAIM_TTL);
        if self
            .jump_claims
            .iter()
            .any(|c| c.path != path && c.last.0.abs_diff(seq.0) < span)
        {
            self.jump_claims.clear();
            return true;
        }
        let others = self
            .paths
            .iter()
            .enumerate()
            .any(|(i, p)| i != usize::from(path.0) && self.healthy(p, now));
        let claim = self
            .jump_claims
            .iter_mut()
            .find(|c| c.path == path && seq > c.last && seq.0 - c.last.0 <= 64);
        match claim {
            Some(c) => {
                c.last = seq;
                c.run += 1;
                c.at = now;
                if !others && c.run >= JUMP_RUN {
                    self.jump_claims.clear();
                    return true;
                }
            }
            None => {
                if self.jump_claims.len() >= MAX_JUMP_CLAIMS {
                    self.jump_claims.remove(0);
                }
                self.jump_claims.push(JumpClaim {
                    path,
                    last: seq,
                    run: 1,
                    at: now,
                });
            }
        }
        false
    }

    /// The sender jumped too far ahead to hold: release everything below `base` now, in
    /// order, packets as packets and holes as gaps, so that the packet that jumped fits
    /// with the window behind it still open for copies reordered around the jump.
    fn jump(&mut self, next: SeqNo, base: SeqNo) {
        self.stats.jumps += 1;
        self.release_before(next, base);
    }

    /// Releases everything below `base` now, in order, packets as packets and holes (and
    /// numbers past the last slot) as gaps.
    fn release_before(&mut self, next: SeqNo, base: SeqNo) {
        let mut cursor = next;
        let mut gap: Option<(SeqNo, u64)> = None;
        while cursor < base {
            match self.slots.pop_front() {
                Some(Slot::Full(item)) => {
                    if let Some((first, count)) = gap.take() {
                        self.push_gap(first, count);
                    }
                    self.history.set(cursor, true);
                    self.stats.released += 1;
                    self.played = true;
                    self.ready.push_back(Output::Packet { seq: cursor, item });
                    cursor = cursor.next();
                }
                Some(Slot::Hole { .. }) => {
                    match &mut gap {
                        Some((_, count)) => *count += 1,
                        None => gap = Some((cursor, 1)),
                    }
                    cursor = cursor.next();
                }
                None => {
                    let skipped = base.0 - cursor.0;
                    match &mut gap {
                        Some((_, count)) => *count += skipped,
                        None => gap = Some((cursor, skipped)),
                    }
                    cursor = base;
                }
            }
        }
        if let Some((first, count)) = gap {
            self.push_gap(first, count);
        }
        self.next = Some(base);
        self.released_any = true;
        self.hold_until = None;
    }

    fn push_gap(&mut self, first: SeqNo, count: u64) {
        self.stats.gaps += count;
        self.stats.gap_events += 1;
        self.history.set_gap_range(first, count);
        self.ready.push_back(Output::Gap { first, count });
    }

    fn poll_release(&mut self, now: Instant) -> Option<Output<T>> {
        if let Some(until) = self.hold_until {
            if now < until {
                return None;
            }
            self.hold_until = None;
        }
        let next = self.next?;
        let window = self.window;
        match self.slots.front()? {
            Slot::Full(_) => {
                let Some(Slot::Full(item)) = self.slots.pop_front() else {
                    unreachable!("front was just seen full")
                };
                self.next = Some(next.next());
                self.history.set(next, true);
                self.stats.released += 1;
                self.released_any = true;
                self.played = true;
                Some(Output::Packet { seq: next, item })
            }
            Slot::Hole { since, .. } => {
                if now < *since + window || self.silent_until(now).is_some() {
                    return None;
                }
                let mut count = 0;
                while let Some(Slot::Hole { since, .. }) = self.slots.front() {
                    if now < *since + window {
                        break;
                    }
                    self.slots.pop_front();
                    count += 1;
                }
                self.next = Some(next.plus(count));
                self.stats.gaps += count;
                self.stats.gap_events += 1;
                self.history.set_gap_range(next, count);
                self.released_any = true;
                Some(Output::Gap { first: next, count })
            }
        }
    }

    /// The lowest sequence number that every healthy path has gone past, if any path is
    /// healthy.
    /// The lowest number every responsive path has gone past: below it, a hole is lost
    /// on every path that delivers, and asked for at once.
    fn healthy_floor(&self, now: Instant) -> Option<SeqNo> {
        self.paths
            .iter()
            .filter(|p| self.responsive(p, now))
            .filter_map(|p| p.highest)
            .min()
    }

    /// Healthy and not suspect: neither silent beyond its usual gaps, nor behind the
    /// others by more than its usual lag (what another path delivered, it has not,
    /// for longer than it usually takes).
    fn responsive(&self, p: &PathState, now: Instant) -> bool {
        self.healthy(p, now) && !p.suspect(now) && !self.behind(p, now)
    }

    fn behind(&self, p: &PathState, now: Instant) -> bool {
        let Some(highest) = p.highest else {
            return false;
        };
        // The first of the next few numbers that another path delivered (the very next
        // one may be lost everywhere else too).
        let first = (1..=16).find_map(|k| {
            let n = highest.plus(k);
            match self.first_seen[(n.0 & self.history.mask) as usize] {
                Some((s, t)) if s == n => Some(t),
                _ => None,
            }
        });
        first.is_some_and(|t| {
            now.saturating_duration_since(t) > p.lag.unwrap_or_default() + SUSPECT_FLOOR
        })
    }

    fn poll_nack(&mut self, now: Instant) -> Option<Output<T>> {
        if !self.config.nack {
            return None;
        }
        let next = self.next?;
        // Repeats first: their holes are older.
        while let Some(mut run) = self.retry_queue.pop_front() {
            if now < run.due {
                self.retry_queue.push_front(run);
                break;
            }
            let range = self.take_range(next, &mut run, |_| true);
            let (asks, last_path) = (run.asks, run.last_path);
            if run.count > 0 {
                self.retry_queue.push_front(run);
            }
            if let Some(range) = range {
                return Some(self.ask(now, range, asks, last_path));
            }
        }
        if self.nack_queue.is_empty() {
            return None;
        }
        let floor = self.healthy_floor(now);
        while let Some(mut run) = self.nack_queue.pop_front() {
            let due = now >= run.due;
            let passed = |s: SeqNo| due || floor.is_some_and(|f| f > s);
            if !passed(run.first) {
                self.nack_queue.push_front(run);
                return None;
            }
            let range = self.take_range(next, &mut run, passed);
            let asks = run.asks;
            if run.count > 0 {
                self.nack_queue.push_front(run);
            }
            if let Some(range) = range {
                return Some(self.ask(now, range, asks, None));
            }
        }
        None
    }

    /// Takes from the front of `run` the first range of holes still missing and asked
    /// exactly `run.asks` times, up to the first number `passed` refuses. Numbers filled,
    /// released or asked for meanwhile are dropped from the run.
    fn take_range(
        &mut self,
        next: SeqNo,
        run: &mut NackRun,
        passed: impl Fn(SeqNo) -> bool,
    ) -> Option<SeqRange> {
        let mut first: Option<SeqNo> = None;
        let mut count: u16 = 0;
        while run.count > 0 && count < u16::MAX && passed(run.first) {
            let s = run.first;
            let slot =
                s.0.checked_sub(next.0)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| self.slots.get_mut(i));
            match slot {
                Some(Slot::Hole { asks, .. }) if *asks == run.asks => {
                    *asks += 1;
                    first.get_or_insert(s);
                    count += 1;
                }
                // Filled, released, or asked for by another run: ends a range.
                _ if first.is_some() => break,
                _ => {}
            }
            run.first = s.next();
            run.count -= 1;
        }
        first.map(|first| SeqRange { first, count })
    }

    /// Says `Output::Nack` for `range`, asked `asks` times before, and schedules the
    /// next ask if attempts remain.
    fn ask(
        &mut self,
        now: Instant,
        range: SeqRange,
        asks: u8,
        last_path: Option<PathId>,
    ) -> Output<T> {
        self.stats.nacked += u64::from(range.count);
        if asks > 0 {
            self.stats.nack_retries += u64::from(range.count);
        }
        // The oldest hole says until when an answer is of use.
        let slot_at = |next: SeqNo, k: u64| {
            range
                .first
                .plus(k)
                .0
                .checked_sub(next.0)
                .and_then(|i| usize::try_from(i).ok())
        };
        let mut since: Option<Instant> = None;
        if let Some(next) = self.next {
            for k in 0..u64::from(range.count) {
                if let Some(Slot::Hole { since: t, .. }) =
                    slot_at(next, k).and_then(|i| self.slots.get(i))
                {
                    since = Some(since.map_or(*t, |s| s.min(*t)));
                }
            }
        }
        let deadline = since.map(|t| t + self.window);
        let path = self.nack_path(now, last_path, deadline);
        // Asked on `path` now: an answer from it gives its round trip.
        if let Some(next) = self.next {
            for k in 0..u64::from(range.count) {
                if let Some(Slot::Hole { asked, .. }) =
                    slot_at(next, k).and_then(|i| self.slots.get_mut(i))
                {
                    *asked = Some((path, now));
                }
            }
        }
        let (retry, expected, measured) = self.paths.get(usize::from(path.0)).map_or(
            (self.config.nack_retry, self.config.nack_retry, false),
            |p| {
                (
                    // (a round trip measured long already holds the queue)
                    p.retry_after(self.config.nack_retry)
                        .max(p.queue + RETRY_FLOOR),
                    p.expected_answer(self.config.nack_retry).max(p.queue),
                    p.srtt.is_some(),
                )
            },
        );
        // Beyond the attempts configured, the asks left spread over what remains of the
        // window: an answer lost on a congested link needs it to drain first, and asking
        // at the round trip's pace spent all twelve in the first 2.5 s of a 10 s buffer,
        // then waited for the deadline. Never faster than the round trip's pace, so a
        // short window keeps every ask it had.
        let retry = match since {
            Some(t) if measured && asks + 1 >= self.config.nack_attempts => {
                let left = (t + self.window).saturating_duration_since(now + expected);
                let asks_left = u32::from(MAX_ASKS.saturating_sub(asks + 1)).max(1);
                retry.max(left / asks_left)
            }
            _ => retry,
        };
        let due = now + retry;
        // Ask again while attempts remain, and beyond them, on a path whose round trip
        // was measured, while the answer to one more ask can still come within the
        // window (a short round trip allows more).
        let in_time = measured && since.is_some_and(|t| due + expected < t + self.window);
        if asks + 1 < self.config.nack_attempts || (asks + 1 < MAX_ASKS && in_time) {
            let run = NackRun {
                first: range.first,
                count: u64::from(range.count),
                due,
                asks: asks + 1,
                last_path: Some(path),
            };
            let at = self.retry_queue.partition_point(|r| r.due <= due);
            self.retry_queue.insert(at, run);
        }
        Output::Nack { range, path }
    }

    /// The path to ask: of the paths that deliver (healthy, and not silent beyond their
    /// usual gaps), the one whose answer is expected soonest (its repair round trip, and
    /// never less than its lag behind the first copy), in turn among equals; a repeat
    /// avoids the path asked last when another can answer. Then any healthy path; the
    /// most recently heard one when none is. A path whose answer would come after
    /// `deadline` is asked only when no other can answer sooner.
    fn nack_path(
        &mut self,
        now: Instant,
        after: Option<PathId>,
        deadline: Option<Instant>,
    ) -> PathId {
        let n = self.paths.len();
        let default = self.config.nack_retry;
        let turn = self.nack_turn;
        let timely = |p: &PathState| deadline.is_none_or(|d| now + p.expected_answer(default) < d);
        let best = |ok: &dyn Fn(usize, &PathState) -> bool| -> Option<usize> {
            self.paths
                .iter()
                .enumerate()
                .filter(|(i, p)| ok(*i, p))
                .min_by_key(|(i, p)| (p.expected_answer(default), (i + n - turn % n) % n))
                .map(|(i, _)| i)
        };
        let other = |i: usize| after != Some(PathId(i as u8));
        let pick = best(&|i, p| other(i) && timely(p) && self.responsive(p, now))
            .or_else(|| best(&|_, p| timely(p) && self.responsive(p, now)))
            .or_else(|| best(&|i, p| other(i) && self.responsive(p, now)))
            .or_else(|| best(&|_, p| self.responsive(p, now)))
            .or_else(|| best(&|i, p| other(i) && self.healthy(p, now)))
            .or_else(|| best(&|_, p| self.healthy(p, now)));
        if let Some(i) = pick {
            self.nack_turn = i + 1;
            return PathId(i as u8);
        }
        self.paths
            .iter()
            .enumerate()
            .max_by_key(|(_, p)| p.last_data)
            .map(|(i, _)| PathId(i as u8))
            .unwrap_or_default()
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut deadline: Option<Instant> = None;
        let mut consider = |t: Instant| {
            deadline = Some(deadline.map_or(t, |d| d.min(t)));
        };
        if let Some(n) = &self.next_session {
            consider(n.deadline);
        }
        if let Some(until) = self.hold_until {
            consider(until);
        } else if let Some(Slot::Hole { since, .. }) = self.slots.front() {
            let due = *since + self.window;
            match self.now.and_then(|now| self.silent_until(now)) {
                Some(until) if due <= until => consider(until),
                _ => consider(due),
            }
        }
        if self.config.nack {
            if let Some(run) = self.nack_queue.front() {
                consider(run.due);
            }
            if let Some(run) = self.retry_queue.front() {
                consider(run.due);
            }
        }
        deadline
    }
}

#[cfg(test)]
mod tests;
