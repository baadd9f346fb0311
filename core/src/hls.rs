//! Low-latency HLS from an edge's released packets, sans-IO.
//!
//! A [`Segmenter`] takes a stream's packets in the order the merge releases them (the
//! order they enter the ring) and cuts them into media segments that start at keyframes
//! (the capture starts a keyframe's packet with the PAT and PMT, so every segment
//! decodes on its own) and into partial segments of about [`Config::part_target`]. A
//! segment's bytes are its packets' TS payloads back to back: the same buffers the ring
//! holds (reference-counted, never copied), so a segment is a byte-exact cut of the
//! stream. Durations come from the packets' RTP timestamps (90 kHz).
//!
//! [`Segmenter::playlist`] renders the media playlist (RFC 8216bis: LL-HLS with
//! `EXT-X-PART`, `EXT-X-PRELOAD-HINT`, `EXT-X-SERVER-CONTROL` and
//! `EXT-X-PROGRAM-DATE-TIME`); [`Segmenter::check_block`] says whether a blocking reload
//! (`_HLS_msn`, `_HLS_part`) can be answered now, must wait, or is out of range.

use std::collections::VecDeque;
use std::fmt::Write;
use std::time::Duration;

use bytes::Bytes;

use crate::seq::SeqNo;

/// The RTP clock of MPEG-TS (RFC 3551): 90 kHz.
const CLOCK: u64 = 90_000;

/// How the stream is cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// A partial segment is closed once it spans this much (default 500 ms).
    pub part_target: Duration,
    /// A segment is closed at the first keyframe after it spans this much (default 1 s:
    /// with keyframes every 2 s, segments of one group of pictures). Unused where the
    /// capture numbers segments: they start at its numbered keyframes.
    pub min_segment: Duration,
    /// A segment without a keyframe is closed anyway once it spans this much (default
    /// 6 s; four times that where the capture numbers segments); the next one is then
    /// not marked independent.
    pub max_segment: Duration,
    /// Complete segments kept and listed (default 6).
    pub window: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            part_target: Duration::from_millis(500),
            min_segment: Duration::from_secs(1),
            max_segment: Duration::from_secs(6),
            window: 6,
        }
    }
}

impl Config {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), crate::Error> {
        if self.part_target < Duration::from_millis(100)
            || self.min_segment < self.part_target
            || self.max_segment < self.min_segment
            || self.window < 2
        {
            return Err(crate::Error::InvalidConfig(
                "HLS: part target at least 100 ms, min segment at least the part target, max segment at least the min, window at least 2".into(),
            ));
        }
        Ok(())
    }
}

/// One packet as the segmenter keeps it.
#[derive(Debug, Clone)]
struct Piece {
    /// Its time on the segmenter's clock (90 kHz): the video's decoding time at the last
    /// frame that started at or before it, or (a stream without video timestamps) its
    /// RTP timestamp.
    clock: u64,
    payload: Bytes,
}

/// A partial segment: a run of its segment's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Index of its first packet in the segment.
    start: usize,
    /// One past its last packet.
    end: usize,
    /// Its duration, 90 kHz ticks.
    ticks: u64,
    /// It starts at a keyframe.
    pub independent: bool,
}

/// A media segment, complete or still growing.
#[derive(Debug, Clone)]
struct Segment {
    msn: u64,
    pieces: Vec<Piece>,
    parts: Vec<Part>,
    /// Its first packet's capture time on the capture's clock (its RTP timestamp,
    /// unwrapped), ms.
    rtp_ms: u64,
    /// Its program date time, once fixed (when its session ended); until then the
    /// session's clock offset gives it.
    pdt_ms: Option<u64>,
    /// Its duration, 90 kHz ticks (complete segments).
    ticks: u64,
    /// Starts at a keyframe.
    independent: bool,
    /// A new source session starts here (`EXT-X-DISCONTINUITY`).
    discontinuity: bool,
    complete: bool,
}

impl Segment {
    fn open_part_start(&self) -> usize {
        self.parts.last().map_or(0, |p| p.end)
    }
    fn bytes(&self, range: std::ops::Range<usize>) -> Vec<Bytes> {
        self.pieces[range]
            .iter()
            .map(|p| p.payload.clone())
            .collect()
    }
}

/// What a blocking reload asks for, and whether it can be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// The playlist holds it: answer now.
    Ready,
    /// Not yet: wait (at most three target durations).
    Wait,
    /// Further ahead than the specification lets a client ask (more than two segments
    /// past the last, or parts past the advance limit): 400 at once.
    TooFar,
}

/// Figures, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Segments completed.
    pub segments: u64,
    /// Partial segments completed.
    pub parts: u64,
    /// Segments closed without a keyframe in sight (at `max_segment`).
    pub forced_cuts: u64,
    /// Packets missing between two released packets (gaps the merge gave up).
    pub missing_packets: u64,
    /// New source sessions (discontinuities).
    pub discontinuities: u64,
    /// Segments whose number from the capture disagreed with the one this segmenter
    /// went on with, within a session (a numbered keyframe lost for good): players that
    /// move between edges may then misplace a segment.
    pub misnumbered: u64,
}

/// Cuts one stream into LL-HLS segments and parts.
#[derive(Debug)]
pub struct Segmenter {
    config: Config,
    /// Names this segmenter in URIs (when it started, ms since the epoch), so that a
    /// restarted edge's segments never take its earlier ones' URIs.
    generation: u64,
    segments: VecDeque<Segment>,
    next_msn: u64,
    last_seq: Option<SeqNo>,
    ssrc: Option<u32>,
    stats: Stats,
    /// This session's clock follows the video's decoding timestamps (else RTP's).
    video: bool,
    /// The clock now, unwrapped, and the raw timestamp it was last set from.
    clock: u64,
    last_raw: Option<u64>,
    /// The capture's clock (RTP timestamps, unwrapped), 90 kHz ticks, and the raw one
    /// last seen.
    rtp_ticks: u64,
    rtp_raw: Option<u32>,
    /// Wall clock less the capture's, the least seen this session, ms: packets released
    /// live show the least; a cold edge's burst of the last seconds shows more. Program
    /// date times are the capture's times plus it, so every edge dates a segment alike
    /// whatever it released late.
    offset_ms: Option<i64>,
    /// The stream's capture numbers its segments (a numbered keyframe was seen): segments
    /// then start only at numbered keyframes, numbered as the capture says.
    numbered: bool,
    /// Discontinuities gone from the window (`EXT-X-DISCONTINUITY-SEQUENCE`).
    discontinuity_seq: u64,
    /// This session's capture number less ours (zero unless a number was lost, or the
    /// session started after others this segmenter had numbered).
    number_offset: Option<u64>,
}

/// The decoding time stamp (or the presentation one, when no DTS is given) of the first
/// video PES packet (stream ids 0xE0 to 0xEF) that starts in `payload`, whole TS packets
/// as the capture sends them; `None` when none starts there. Never panics.
pub fn video_dts(payload: &[u8]) -> Option<u64> {
    pes_stamp(payload, |id| (0xE0..=0xEF).contains(&id))
}

/// When a keyframe is: the decoding time stamp of the first video PES packet that
/// starts in `payload` ([`video_dts`]), or else the first PES packet's of any stream
/// (a stream with no video, such as the capture's synthetic one). Renditions of one
/// source, encoded together, give their aligned keyframes the same one. Never panics.
pub fn media_time(payload: &[u8]) -> Option<u64> {
    video_dts(payload).or_else(|| pes_stamp(payload, |_| true))
}

fn pes_stamp(payload: &[u8], wanted: impl Fn(u8) -> bool) -> Option<u64> {
    let stamp = |p: &[u8]| -> u64 {
        (u64::from(p[0] >> 1) & 7) << 30
            | u64::from(p[1]) << 22
            | u64::from(p[2] >> 1) << 15
            | u64::from(p[3]) << 7
            | u64::from(p[4] >> 1)
    };
    for pkt in payload.chunks_exact(188) {
        if pkt[0] != 0x47 || pkt[1] & 0x40 == 0 {
            continue;
        }
        let control = (pkt[3] >> 4) & 3;
        if control & 1 == 0 {
            continue;
        }
        let start = if control & 2 != 0 {
            5 + usize::from(pkt[4])
        } else {
            4
        };
        let Some(pes) = pkt.get(start..) else {
            continue;
        };
        if pes.len() < 14 || pes[..3] != [0, 0, 1] || !wanted(pes[3]) {
            continue;
        }
        let flags = pes[7] >> 6;
        if flags & 2 == 0 {
            continue;
        }
        if flags == 3 && pes.len() >= 19 {
            return Some(stamp(&pes[14..19]));
        }
        return Some(stamp(&pes[9..14]));
    }
    None
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() as u64).saturating_mul(CLOCK) / 1_000_000
}

impl Segmenter {
    /// A segmenter cutting as `config` says, its URIs named by `generation`.
    pub fn new(config: Config, generation: u64) -> Result<Segmenter, crate::Error> {
        config.validate()?;
        Ok(Segmenter {
            config,
            generation,
            segments: VecDeque::new(),
            next_msn: 0,
            last_seq: None,
            ssrc: None,
            stats: Stats::default(),
            video: false,
            clock: 0,
            last_raw: None,
            rtp_ticks: 0,
            rtp_raw: None,
            offset_ms: None,
            numbered: false,
            discontinuity_seq: 0,
            number_offset: None,
        })
    }

    /// Its figures.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// What names its URIs.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The settings it cuts with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Takes the next released packet: `seq`, its RTP `ts` and `ssrc`, whether it starts a
    /// keyframe, the segment number its capture gave it (it starts that segment), its TS
    /// payload, and the wall-clock time it arrived (ms since the epoch).
    ///
    /// Segments of a stream whose capture numbers them start where it says, with its
    /// numbers, so every edge lists the same segment under the same number and a player
    /// moving between edges (redundant variants) finds its place. Numbers stay
    /// consecutive: a number that disagrees (its keyframe lost for good, or a new session)
    /// is counted and this segmenter goes on with its own.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        seq: SeqNo,
        ts: u32,
        ssrc: u32,
        keyframe: bool,
        segment: Option<u64>,
        payload: Bytes,
        wall_ms: u64,
    ) {
        // Numbers far past any a capture gives (ten a second from the epoch) are none:
        // counting on from them could overflow.
        let segment = segment.filter(|n| *n < 1 << 62);
        let new_session = self.ssrc.is_some_and(|s| s != ssrc);
        if let Some(last) = self.last_seq {
            if !new_session && seq.0 > last.0 + 1 {
                self.stats.missing_packets += seq.0 - last.0 - 1;
            }
        }
        self.last_seq = Some(seq);
        self.ssrc = Some(ssrc);
        if new_session {
            self.stats.discontinuities += 1;
            self.close_segment(None);
            self.last_raw = None;
            // The old session's segments keep the dates they have; the new session's
            // clock starts afresh.
            let offset = self.offset_ms.unwrap_or(0);
            for seg in self.segments.iter_mut().filter(|s| s.pdt_ms.is_none()) {
                seg.pdt_ms = Some(seg.rtp_ms.saturating_add_signed(offset));
            }
            self.rtp_raw = None;
            self.offset_ms = None;
            self.number_offset = None;
        }
        // The capture's clock, and how far behind the wall clock it runs here.
        if let Some(last) = self.rtp_raw {
            let delta = ts.wrapping_sub(last);
            if delta < 1 << 31 {
                self.rtp_ticks += u64::from(delta);
            }
        } else {
            // Starts at the wall clock, so that an offset near zero is the usual case.
            self.rtp_ticks = wall_ms.saturating_mul(90);
        }
        self.rtp_raw = Some(ts);
        let rtp_ms = self.rtp_ticks / 90;
        let offset = wall_ms as i64 - rtp_ms as i64;
        self.offset_ms = Some(self.offset_ms.map_or(offset, |o| o.min(offset)));
        let dts = video_dts(&payload);
        let open = self.segments.back().is_some_and(|s| !s.complete);
        if !open && self.last_raw.is_none() {
            // A session's clock is chosen where its first segment starts: the video's
            // when that packet carries a video timestamp.
            self.video = dts.is_some();
        }
        let frame = self.advance_clock(if self.video { dts } else { Some(u64::from(ts)) });
        let clock = self.clock;
        // Where the capture numbers segments, a segment starts at its numbered keyframes
        // only; else at the first keyframe past the least length.
        let starts = if self.numbered || segment.is_some() {
            segment.is_some()
        } else {
            keyframe
        };
        // A segment with no place to end is closed anyway at the longest; where the
        // capture numbers segments, only at four times that, as a cut of our own makes our
        // numbers part from the other edges'.
        let longest = ticks(self.longest_segment());
        let cut = match self.segments.back() {
            Some(s) if !s.complete => {
                let span = clock.saturating_sub(s.pieces[0].clock);
                frame
                    && ((starts && (segment.is_some() || span >= ticks(self.config.min_segment)))
                        || span >= longest)
            }
            // Nothing open: a segment starts where one may (or, after a forced cut or a
            // new session, at once).
            _ => frame && (starts || !self.segments.is_empty()),
        };
        if cut {
            let forced = !starts && open;
            if forced {
                self.stats.forced_cuts += 1;
            }
            self.close_segment(Some(clock));
            if let Some(n) = segment.filter(|_| frame) {
                self.follow_number(n);
            }
            self.segments.push_back(Segment {
                msn: self.next_msn,
                pieces: Vec::new(),
                parts: Vec::new(),
                rtp_ms: self.rtp_ticks / 90,
                pdt_ms: None,
                ticks: 0,
                independent: keyframe,
                discontinuity: new_session,
                complete: false,
            });
            self.next_msn += 1;
        }
        let part_target = ticks(self.config.part_target);
        let Some(seg) = self.segments.back_mut().filter(|s| !s.complete) else {
            // Before the first keyframe: nothing to start a segment with.
            return;
        };
        // Close the open part at a frame once it spans the target.
        let start = seg.open_part_start();
        if frame && start < seg.pieces.len() {
            let span = clock.saturating_sub(seg.pieces[start].clock);
            if span * 10 >= part_target * 9 {
                let independent = start == 0 && seg.independent;
                seg.parts.push(Part {
                    start,
                    end: seg.pieces.len(),
                    ticks: span,
                    independent,
                });
                self.stats.parts += 1;
            }
        }
        // Parts and segments are cut only where a frame starts, so they hold whole
        // frames and their durations are the media's own.
        seg.pieces.push(Piece { clock, payload });
    }

    /// A segment numbered `n` by the capture starts: number it so, when that keeps the
    /// numbers consecutive.
    fn follow_number(&mut self, n: u64) {
        if !self.numbered {
            self.numbered = true;
            if self.stats.discontinuities == 0 {
                // The first number, in the first session seen: what was cut before it (a
                // segment or two as this segmenter started) started where the capture's
                // segments do not, so it goes, and numbering starts here.
                self.segments.clear();
                self.next_msn = n;
            }
        }
        // A new session starts with no offset (reset where it is seen), so only a number
        // lost within a session counts.
        let offset = n.wrapping_sub(self.next_msn);
        if self.number_offset.is_some_and(|o| o != offset) {
            self.stats.misnumbered += 1;
        }
        self.number_offset = Some(offset);
    }

    /// Moves the clock to `raw` (a 33-bit video timestamp, or a 32-bit RTP one), when
    /// given: forward by its distance from the last, never back (a jump back is a
    /// discontinuity the next session marks). Whether it was given.
    fn advance_clock(&mut self, raw: Option<u64>) -> bool {
        let Some(raw) = raw else {
            return false;
        };
        let modulus: u64 = if self.video { 1 << 33 } else { 1 << 32 };
        if let Some(last) = self.last_raw {
            let delta = raw.wrapping_sub(last) & (modulus - 1);
            if delta < modulus / 2 {
                self.clock += delta;
            }
        }
        self.last_raw = Some(raw);
        true
    }

    /// Closes the open segment (its last part ends at `next`, the clock of the frame that
    /// follows, when known) and drops segments past the window.
    fn close_segment(&mut self, next: Option<u64>) {
        if let Some(seg) = self.segments.back_mut().filter(|s| !s.complete) {
            let start = seg.open_part_start();
            let last = seg.pieces.last().map_or(0, |p| p.clock);
            let end = next.unwrap_or(last);
            if start < seg.pieces.len() {
                let independent = start == 0 && seg.independent;
                seg.parts.push(Part {
                    start,
                    end: seg.pieces.len(),
                    ticks: end.saturating_sub(seg.pieces[start].clock),
                    independent,
                });
                self.stats.parts += 1;
            }
            seg.ticks = seg.parts.iter().map(|p| p.ticks).sum();
            seg.complete = true;
            self.stats.segments += 1;
        }
        while self.segments.iter().filter(|s| s.complete).count() > self.config.window {
            if self.segments.pop_front().is_some_and(|s| s.discontinuity) {
                self.discontinuity_seq += 1;
            }
        }
    }

    /// The longest a segment runs before it is closed without a place to end.
    fn longest_segment(&self) -> Duration {
        self.config.max_segment * if self.numbered { 4 } else { 1 }
    }

    /// The media sequence number of the first segment listed.
    pub fn first_msn(&self) -> Option<u64> {
        self.segments.front().map(|s| s.msn)
    }

    /// Whether a blocking reload for segment `msn` (and part `part` of it) can be
    /// answered now: the playlist holds that segment complete (or that part), or it is
    /// older than the window.
    pub fn check_block(&self, msn: u64, part: Option<u64>) -> Block {
        let Some(last) = self.segments.back() else {
            return if msn <= 2 { Block::Wait } else { Block::TooFar };
        };
        // Parts are asked for at most a few past the last: a segment's parts fit in
        // `max_segment` / `part_target`.
        let most_parts = (self.longest_segment().as_millis()
            / self.config.part_target.as_millis().max(1)) as u64
            + 2;
        if msn > last.msn + 2 || part.is_some_and(|p| p > most_parts) {
            return Block::TooFar;
        }
        if self.first_msn().is_some_and(|f| msn < f) {
            return Block::Ready;
        }
        let Some(seg) = self.segments.iter().find(|s| s.msn == msn) else {
            return Block::Wait;
        };
        match part {
            None if seg.complete => Block::Ready,
            None => Block::Wait,
            Some(p) if (p as usize) < seg.parts.len() => Block::Ready,
            // A part number past a complete segment's last asks for the next segment's
            // first part.
            Some(_) if seg.complete => self.check_block(msn + 1, Some(0)),
            Some(_) => Block::Wait,
        }
    }

    /// The longest segment listed, rounded up to whole seconds (`EXT-X-TARGETDURATION`).
    pub fn target_duration(&self) -> u64 {
        let longest = self
            .segments
            .iter()
            .filter(|s| s.complete)
            .map(|s| s.ticks)
            .max()
            .unwrap_or(0);
        longest
            .div_ceil(CLOCK)
            .max(self.config.min_segment.as_secs().max(1))
    }

    /// The media playlist. `query` is appended to every URI (a token, for one), already
    /// URL-encoded and starting with `?`, or empty. `None` until the first segment opens.
    pub fn playlist(&self, query: &str) -> Option<String> {
        let first = self.segments.front()?;
        let g = self.generation;
        let part_target = self.config.part_target.as_secs_f64();
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "#EXTM3U");
        let _ = writeln!(out, "#EXT-X-VERSION:9");
        let _ = writeln!(out, "#EXT-X-TARGETDURATION:{}", self.target_duration());
        let _ = writeln!(
            out,
            "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={:.3}",
            part_target * 3.0
        );
        let _ = writeln!(out, "#EXT-X-PART-INF:PART-TARGET={part_target:.3}");
        let _ = writeln!(out, "#EXT-X-MEDIA-SEQUENCE:{}", first.msn);
        if self.discontinuity_seq > 0 {
            let _ = writeln!(
                out,
                "#EXT-X-DISCONTINUITY-SEQUENCE:{}",
                self.discontinuity_seq
            );
        }
        // Parts are listed for the last segments only (the specification asks for those
        // within three target durations of the end).
        let with_parts = self.segments.len().saturating_sub(3);
        for (i, s) in self.segments.iter().enumerate() {
            if s.discontinuity {
                let _ = writeln!(out, "#EXT-X-DISCONTINUITY");
            }
            let pdt = s
                .pdt_ms
                .unwrap_or_else(|| s.rtp_ms.saturating_add_signed(self.offset_ms.unwrap_or(0)));
            let _ = writeln!(out, "#EXT-X-PROGRAM-DATE-TIME:{}", iso8601(pdt));
            if i >= with_parts {
                for (j, p) in s.parts.iter().enumerate() {
                    let _ = write!(
                        out,
                        "#EXT-X-PART:DURATION={:.5},URI=\"part/{g}-{}.{j}.ts{query}\"",
                        p.ticks as f64 / CLOCK as f64,
                        s.msn
                    );
                    if p.independent {
                        out.push_str(",INDEPENDENT=YES");
                    }
                    out.push('\n');
                }
            }
            if s.complete {
                let _ = writeln!(out, "#EXTINF:{:.5},", s.ticks as f64 / CLOCK as f64);
                let _ = writeln!(out, "seg/{g}-{}.ts{query}", s.msn);
            }
        }
        // The part being filled, for the player to ask for before it is done.
        let (msn, part) = match self.segments.back() {
            Some(s) if !s.complete => (s.msn, s.parts.len()),
            Some(s) => (s.msn + 1, 0),
            None => (0, 0),
        };
        let _ = writeln!(
            out,
            "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part/{g}-{msn}.{part}.ts{query}\""
        );
        Some(out)
    }

    /// Segment `msn`'s bytes, when it is complete and still listed.
    pub fn segment(&self, msn: u64) -> Option<Vec<Bytes>> {
        let s = self.segments.iter().find(|s| s.msn == msn && s.complete)?;
        Some(s.bytes(0..s.pieces.len()))
    }

    /// Part `part` of segment `msn`'s bytes, when it is complete and still listed.
    pub fn part(&self, msn: u64, part: usize) -> Option<Vec<Bytes>> {
        let s = self.segments.iter().find(|s| s.msn == msn)?;
        let p = s.parts.get(part)?;
        Some(s.bytes(p.start..p.end))
    }

    /// Whether segment `msn` (or its part `part`) may still come: it is the one being
    /// filled or the next (a request for it waits), rather than gone or never to be.
    pub fn upcoming(&self, msn: u64, part: Option<usize>) -> bool {
        match self.segments.back() {
            Some(s) if !s.complete => {
                (s.msn == msn && part.is_none_or(|p| p >= s.parts.len()))
                    || (msn == s.msn + 1 && part.is_none_or(|p| p == 0))
            }
            Some(s) => msn == s.msn + 1 && part.is_none_or(|p| p == 0),
            None => msn == 0,
        }
    }

    /// Bytes held for the listed segments (shared with the ring: not extra memory).
    pub fn bytes_held(&self) -> usize {
        self.segments
            .iter()
            .flat_map(|s| &s.pieces)
            .map(|p| p.payload.len())
            .sum()
    }
}

/// The numbers in a segment's or part's URI name, as a request gives it:
/// `{generation}-{msn}.ts`, or `{generation}-{msn}.{part}.ts` when `with_part`. `None` for
/// anything else (never a panic: the name comes from anyone).
pub fn parse_name(name: &str, with_part: bool) -> Option<(u64, u64, usize)> {
    let stem = name.strip_suffix(".ts")?;
    let (generation, rest) = stem.split_once('-')?;
    let (msn, part) = if with_part {
        let (m, p) = rest.split_once('.')?;
        (m, p.parse().ok()?)
    } else {
        (rest, 0)
    };
    Some((generation.parse().ok()?, msn.parse().ok()?, part))
}

/// `ms` since the Unix epoch as ISO 8601 UTC with milliseconds.
fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 25 packets a second of 90 kHz time, a keyframe every `gop` packets.
    fn feed(s: &mut Segmenter, n: u64, gop: u64) {
        for i in 0..n {
            let ts = (i * 3600) as u32;
            let payload = Bytes::from(vec![(i % 251) as u8; 188]);
            s.push(
                SeqNo(i),
                ts,
                1,
                i % gop == 0,
                None,
                payload,
                1_700_000_000_000 + i * 40,
            );
        }
    }

    #[test]
    fn segments_start_at_keyframes_and_parts_span_the_target() {
        let mut s = Segmenter::new(Config::default(), 7).unwrap();
        feed(&mut s, 25 * 10, 50);
        let pl = s.playlist("").unwrap();
        assert!(pl.starts_with("#EXTM3U\n"), "{pl}");
        assert!(pl.contains("#EXT-X-TARGETDURATION:2\n"), "{pl}");
        assert!(pl.contains("#EXTINF:2.00000,\nseg/7-0.ts\n"), "{pl}");
        assert!(
            pl.contains("#EXT-X-PART:DURATION=0.48000,URI=\"part/7-4.0.ts\",INDEPENDENT=YES"),
            "{pl}"
        );
        assert!(
            pl.contains("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part/7-4."),
            "{pl}"
        );
        assert!(
            pl.contains("#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.000Z"),
            "{pl}"
        );
        // Segment 0 is packets 0..50, back to back.
        let seg: Vec<u8> = s.segment(0).unwrap().concat();
        assert_eq!(seg.len(), 50 * 188);
        assert_eq!(seg[0], 0);
        assert_eq!(seg[49 * 188], 49);
        assert_eq!(s.stats().forced_cuts, 0);
    }

    /// A cold edge is sent the last seconds at once, then the stream live: the burst's
    /// segment is dated when it was captured, not when it arrived, as every edge dates it.
    #[test]
    fn a_burst_of_the_past_is_dated_by_the_capture_clock() {
        let mut s = Segmenter::new(Config::default(), 1).unwrap();
        let base = 1_700_000_000_000u64;
        for i in 0..250u64 {
            // The first 100 packets (4 s) arrive together at base + 4 s.
            let wall = if i < 100 { base + 4_000 } else { base + i * 40 };
            let payload = Bytes::from(vec![0u8; 188]);
            s.push(
                SeqNo(i),
                (i * 3600) as u32,
                1,
                i % 50 == 0,
                None,
                payload,
                wall,
            );
        }
        let pl = s.playlist("").unwrap();
        assert!(
            pl.contains("#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.000Z\n"),
            "{pl}"
        );
        assert!(
            pl.contains("#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:22.000Z\n"),
            "{pl}"
        );
    }

    #[test]
    fn blocking_reloads_wait_for_what_comes_and_refuse_what_is_too_far() {
        let mut s = Segmenter::new(Config::default(), 7).unwrap();
        feed(&mut s, 25 * 5, 50);
        // Segments 0 and 1 complete; 2 open with parts.
        assert_eq!(s.check_block(1, None), Block::Ready);
        assert_eq!(s.check_block(2, Some(0)), Block::Ready);
        assert_eq!(s.check_block(2, Some(3)), Block::Wait);
        assert_eq!(s.check_block(3, None), Block::Wait);
        assert_eq!(s.check_block(5, None), Block::TooFar);
        assert_eq!(s.check_block(2, Some(1000)), Block::TooFar);
        assert!(s.upcoming(2, Some(3)));
        assert!(!s.upcoming(0, Some(0)));
    }

    #[test]
    fn a_new_session_is_a_discontinuity() {
        let mut s = Segmenter::new(Config::default(), 7).unwrap();
        feed(&mut s, 100, 50);
        for i in 0..100u64 {
            s.push(
                SeqNo(1000 + i),
                (i * 3600) as u32,
                2,
                i % 50 == 0,
                None,
                Bytes::from_static(&[0x47]),
                0,
            );
        }
        let pl = s.playlist("").unwrap();
        assert!(pl.contains("#EXT-X-DISCONTINUITY\n"), "{pl}");
        assert!(!pl.contains("#EXT-X-DISCONTINUITY-SEQUENCE"), "{pl}");
        assert_eq!(s.stats().discontinuities, 1);
        // Once the discontinuity leaves the window, the playlist counts it, so players
        // keep numbering the sessions alike.
        for i in 100..500u64 {
            let payload = Bytes::from_static(&[0x47]);
            s.push(
                SeqNo(1000 + i),
                (i * 3600) as u32,
                2,
                i % 50 == 0,
                None,
                payload,
                0,
            );
        }
        let pl = s.playlist("").unwrap();
        assert!(!pl.contains("#EXT-X-DISCONTINUITY\n"), "{pl}");
        assert!(pl.contains("#EXT-X-DISCONTINUITY-SEQUENCE:1\n"), "{pl}");
    }

    /// One TS packet starting a video PES with decoding time `dts` (and a later PTS).
    fn video_packet(dts: u64) -> Vec<u8> {
        let stamp = |v: u64, tag: u8| {
            vec![
                tag << 4 | ((v >> 29) as u8 & 0x0E) | 1,
                (v >> 22) as u8,
                ((v >> 14) as u8 & 0xFE) | 1,
                (v >> 7) as u8,
                ((v << 1) as u8) | 1,
            ]
        };
        let mut p = vec![0x47, 0x41, 0x00, 0x10, 0, 0, 1, 0xE0, 0, 0, 0x80, 0xC0, 10];
        p.extend(stamp(dts + 3600, 3));
        p.extend(stamp(dts, 1));
        p.resize(188, 0xFF);
        p
    }

    #[test]
    fn media_time_prefers_video_and_falls_back_to_any_stream() {
        let mut data = video_packet(5000);
        data[7] = 0xBD; // private stream 1, as the synthetic source's
        assert_eq!(video_dts(&data), None);
        assert_eq!(media_time(&data), Some(5000));
        let mut both = data.clone();
        both.extend(video_packet(9000));
        assert_eq!(media_time(&both), Some(9000), "video first");
        assert_eq!(media_time(&[0x47; 188]), None);
    }

    #[test]
    fn video_timestamps_are_read_and_set_the_clock() {
        assert_eq!(video_dts(&video_packet(123_456)), Some(123_456));
        assert_eq!(video_dts(&video_packet((1 << 33) - 1)), Some((1 << 33) - 1));
        assert_eq!(video_dts(&[0x47; 188]), None);
        assert_eq!(video_dts(&[0x47, 0x41]), None);
        // 25 frames a second by DTS, sent at a jittery RTP pace: parts and segments are
        // cut at frames and last what the frames do.
        let mut s = Segmenter::new(Config::default(), 1).unwrap();
        for i in 0..200u64 {
            let dts = (1 << 33) - 50 * 3600 + i * 3600; // wraps past 2^33
            let ts = (i * 3600 + (i % 3) * 900) as u32;
            s.push(
                SeqNo(i),
                ts,
                1,
                i % 50 == 0,
                None,
                Bytes::from(video_packet(dts & ((1 << 33) - 1))),
                0,
            );
        }
        let pl = s.playlist("").unwrap();
        assert!(pl.contains("#EXTINF:2.00000,\nseg/1-0.ts"), "{pl}");
        assert!(pl.contains("#EXTINF:2.00000,\nseg/1-1.ts"), "{pl}");
        assert!(pl.contains("#EXT-X-PART:DURATION=0.48000,"), "{pl}");
    }

    /// Packets `range` of a stream of 25 packets a second, a keyframe every `gop`, its
    /// capture numbering every `every`-th packet's keyframe from `base`, packets in `lost`
    /// never released.
    fn feed_numbered(
        s: &mut Segmenter,
        range: std::ops::Range<u64>,
        (gop, every, base): (u64, u64, u64),
        lost: &[u64],
    ) {
        for i in range.filter(|i| !lost.contains(i)) {
            let payload = Bytes::from(vec![(i % 251) as u8; 188]);
            let number = (i % every == 0).then_some(base + i / every);
            s.push(
                SeqNo(i),
                (i * 3600) as u32,
                1,
                i % gop == 0,
                number,
                payload,
                0,
            );
        }
    }

    /// The segments `s` lists, by number, with their packets (each packet's first byte,
    /// which `feed_numbered` sets to its number mod 251).
    fn listed(s: &Segmenter) -> Vec<(u64, Vec<u8>)> {
        let first = s.first_msn().unwrap();
        (first..first + 20)
            .filter_map(|n| s.segment(n).map(|b| (n, b.iter().map(|p| p[0]).collect())))
            .collect()
    }

    #[test]
    fn edges_number_segments_as_the_capture_does() {
        // Keyframes every second, a segment every two (the capture's choice); edge b
        // starts late, at a keyframe the capture did not number, and a second before one
        // it did.
        let shape = (25, 50, 1_000);
        let mut a = Segmenter::new(Config::default(), 1).unwrap();
        let mut b = Segmenter::new(Config::default(), 2).unwrap();
        feed_numbered(&mut a, 0..400, shape, &[]);
        feed_numbered(&mut b, 125..400, shape, &[]);
        let (la, lb) = (listed(&a), listed(&b));
        assert_eq!(la.len(), 6);
        assert_eq!(la.last().unwrap().0, 1_006, "the capture's numbers");
        // The same number holds the same packets on both edges.
        for (n, bytes) in &lb {
            if let Some((_, other)) = la.iter().find(|(m, _)| m == n) {
                assert_eq!(bytes, other, "segment {n}");
            }
        }
        assert!(
            lb.iter()
                .filter(|(n, _)| la.iter().any(|(m, _)| m == n))
                .count()
                >= 4
        );
        // What b cut before the first number it saw (from packet 125) is dropped: it
        // starts at the capture's next segment.
        assert_eq!(b.first_msn(), Some(1_003));
        assert_eq!(listed(&b)[0].1[0], 150);
        assert_eq!(a.stats().misnumbered + b.stats().misnumbered, 0);
        assert_eq!(a.stats().forced_cuts, 0);
    }

    #[test]
    fn a_lost_number_is_counted_and_numbers_stay_consecutive() {
        let shape = (25, 50, 1_000);
        let mut s = Segmenter::new(Config::default(), 1).unwrap();
        // Packet 200 (segment 1004's numbered keyframe) never comes.
        feed_numbered(&mut s, 0..400, shape, &[200]);
        assert_eq!(s.stats().misnumbered, 1);
        let l = listed(&s);
        assert!(l.windows(2).all(|w| w[1].0 == w[0].0 + 1), "consecutive");
        assert_eq!(
            l.last().unwrap().0,
            1_005,
            "one segment fewer than the capture's"
        );
        // Without numbers, segments start at the first keyframe past the least length.
        let mut plain = Segmenter::new(Config::default(), 1).unwrap();
        feed_numbered(&mut plain, 0..400, (25, 50, 0), &[]);
        let mut unnumbered = Segmenter::new(Config::default(), 1).unwrap();
        feed(&mut unnumbered, 400, 25);
        assert_eq!(unnumbered.first_msn(), Some(9), "segments of one second");
        assert_eq!(plain.first_msn(), Some(1), "segments of two");
    }

    #[test]
    fn names_parse_or_are_refused() {
        assert_eq!(parse_name("7-12.ts", false), Some((7, 12, 0)));
        assert_eq!(parse_name("7-12.3.ts", true), Some((7, 12, 3)));
        assert_eq!(parse_name("7-12.3.ts", false), None);
        assert_eq!(parse_name("7-12.ts", true), None);
        assert_eq!(parse_name("-1-2.ts", false), None);
        assert_eq!(parse_name("99999999999999999999999-1.ts", false), None);
    }

    #[test]
    fn dates_are_iso8601() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
    }

    proptest! {
        /// Two edges that join a numbered stream anywhere list the same packets under the
        /// same number.
        #[test]
        fn edges_joining_anywhere_agree(
            start_a in 0u64..300,
            start_b in 0u64..300,
            gop in 5u64..60,
            groups in 1u64..4,
        ) {
            let shape = (gop, gop * groups, 77);
            let mut a = Segmenter::new(Config::default(), 1).unwrap();
            let mut b = Segmenter::new(Config::default(), 2).unwrap();
            feed_numbered(&mut a, start_a..600, shape, &[]);
            feed_numbered(&mut b, start_b..600, shape, &[]);
            let (la, lb) = (listed(&a), listed(&b));
            for (n, bytes) in &lb {
                if let Some((_, other)) = la.iter().find(|(m, _)| m == n) {
                    prop_assert_eq!(bytes, other, "segment {}", n);
                }
            }
            prop_assert_eq!(a.first_msn().map(|_| la.last().unwrap().0),
                b.first_msn().map(|_| lb.last().unwrap().0));
        }

        /// Any name: parsed or refused, never a panic; what parses prints back the same.
        #[test]
        fn any_name_parses_or_is_refused(name in ".{0,40}", with_part in any::<bool>()) {
            if let Some((g, m, p)) = parse_name(&name, with_part) {
                let back = if with_part { format!("{g}-{m}.{p}.ts") } else { format!("{g}-{m}.ts") };
                prop_assert_eq!(parse_name(&back, with_part), Some((g, m, p)));
            }
        }

        /// Any request against any stream: answered, never a panic.
        #[test]
        fn any_request_is_answered(
            steps in proptest::collection::vec((0u32..200_000, any::<bool>()), 0..300),
            msn in any::<u64>(), part in any::<u64>(),
        ) {
            let mut s = Segmenter::new(Config::default(), 1).unwrap();
            let mut ts = 0u32;
            for (i, (dt, key)) in steps.iter().enumerate() {
                ts = ts.wrapping_add(*dt);
                s.push(SeqNo(i as u64), ts, 1, *key, None, Bytes::from_static(&[0x47]), 0);
            }
            let _ = s.check_block(msn, Some(part));
            let _ = s.check_block(msn, None);
            let _ = s.segment(msn);
            let _ = s.part(msn, part as usize);
            let _ = s.upcoming(msn, Some(part as usize));
            let _ = s.playlist("");
        }

        /// Whatever the packets, the segments listed are the packets released, in order,
        /// with none lost or repeated inside the window, and the parts of each segment
        /// tile it.
        #[test]
        fn segments_and_parts_tile_the_stream(
            steps in proptest::collection::vec((0u32..20_000, any::<bool>(), 0u8..3), 1..600),
        ) {
            let mut s = Segmenter::new(Config::default(), 7).unwrap();
            let mut ts = 0u32;
            let mut ssrc = 1;
            for (i, (dt, key, change)) in steps.iter().enumerate() {
                ts = ts.wrapping_add(*dt);
                if *change == 0 && i % 97 == 0 {
                    ssrc += 1;
                }
                s.push(SeqNo(i as u64), ts, ssrc, *key, None, Bytes::from(vec![i as u8]), i as u64);
            }
            let first = s.first_msn();
            if let Some(first) = first {
                let mut last: Option<u8> = None;
                for seg in &s.segments {
                    prop_assert!(seg.msn >= first);
                    let parts_len: usize = seg.parts.iter().map(|p| p.end - p.start).sum();
                    if seg.complete {
                        prop_assert_eq!(parts_len, seg.pieces.len());
                    }
                    for w in seg.parts.windows(2) {
                        prop_assert_eq!(w[0].end, w[1].start);
                    }
                    for p in &seg.pieces {
                        let b = p.payload[0];
                        if let Some(l) = last {
                            prop_assert_eq!(b, l.wrapping_add(1));
                        }
                        last = Some(b);
                    }
                }
                prop_assert!(s.playlist("?t=1").is_some());
            }
        }
    }
}
