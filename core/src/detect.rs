//! Reception detectors: is this source still good enough to watch?
//!
//! A client (or an edge watching its upstream) feeds every packet it receives into a
//! [`Detector`]. The detector measures, over fixed windows, the received bit rate, packet
//! rate, frame rate and the share of out-of-order and missing packets, and watches for
//! silence. When a measure stays past its threshold for enough consecutive windows (or
//! silence lasts long enough) it says [`Output::Switch`] with the reason, once; it then
//! stays quiet until it is [`Detector::reset`] (after a switch) or the source has been
//! good again for [`Config::rearm_windows`] windows. That is the hysteresis: one bad
//! window is not a reason to move, and a source that flaps does not cause a switch storm.
//!
//! # Contract
//!
//! Sans-IO: [`Detector::handle_input`] or [`Detector::handle_timeout`], then
//! [`Detector::poll_output`] until [`Output::Timeout`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::id::{Bitrate, DataSize};
use crate::seq::SeqNo;

/// Windows after a (re)start that are not learned from (a catch-up burst).
const LEARN_AFTER: u64 = 4;

/// Sequence numbers further apart than this are of different numbering spaces.
const SPACE: u64 = 1 << 32;

/// Thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Measurement window (default 250 ms: long enough to hold tens of packets of a
    /// 1 Mbps stream, short enough to react within a second).
    pub window: Duration,
    /// The stream's nominal bit rate; when unknown it is learned from the windows the
    /// detector finds good.
    pub nominal_bitrate: Option<Bitrate>,
    /// A window under this share of nominal is low (default 0.7).
    pub min_bitrate_ratio: f64,
    /// A window whose frame rate is under this is low (default: not checked).
    pub min_frame_rate: Option<f64>,
    /// A window with more than this share of packets missing is bad (default 0.05).
    pub max_gap_ratio: f64,
    /// A window with more than this share of packets out of order is bad (default 0.10).
    pub max_out_of_order_ratio: f64,
    /// Consecutive bad windows before a switch (default 3).
    pub bad_windows: u32,
    /// Silence that causes a switch by itself, at most (default 500 ms); less on a stream
    /// whose packets come often: twelve of its usual gaps between packets, never under
    /// [`Config::min_stall`].
    pub stall: Duration,
    /// The shortest silence that counts as a stall (default 250 ms: an edge sends a
    /// heartbeat after 60 ms without media, checked every 100 ms, so silence that long
    /// means the edge, or the way to it, is gone).
    pub min_stall: Duration,
    /// Consecutive good windows after which the detector speaks again (default 8).
    pub rearm_windows: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window: Duration::from_millis(250),
            nominal_bitrate: None,
            min_bitrate_ratio: 0.7,
            min_frame_rate: None,
            max_gap_ratio: 0.05,
            max_out_of_order_ratio: 0.10,
            bad_windows: 3,
            stall: Duration::from_millis(500),
            min_stall: Duration::from_millis(250),
            rearm_windows: 8,
        }
    }
}

impl Config {
    /// Checks the thresholds.
    pub fn validate(&self) -> Result<(), Error> {
        let ratio = |v: f64| (0.0..=1.0).contains(&v);
        if self.window.is_zero() || self.stall.is_zero() {
            return Err(Error::InvalidConfig(
                "detector window and stall must be above zero".into(),
            ));
        }
        if !ratio(self.min_bitrate_ratio)
            || !ratio(self.max_gap_ratio)
            || !ratio(self.max_out_of_order_ratio)
        {
            return Err(Error::InvalidConfig(
                "detector ratios must be between 0 and 1".into(),
            ));
        }
        if self.bad_windows == 0 {
            return Err(Error::InvalidConfig(
                "detector bad_windows must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// What was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Its sequence number.
    pub seq: SeqNo,
    /// Its size in bytes.
    pub size: usize,
    /// Whether it starts a video frame.
    pub frame_start: bool,
    /// Whether it answers a repair request: it fills a gap that was counted, and says
    /// nothing about the path reordering (a repair always arrives late).
    pub repair: bool,
}

/// Why the source should be left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// The bit rate stayed under the threshold.
    LowBitrate {
        /// The last window's rate.
        measured: Bitrate,
        /// What the stream should carry.
        nominal: Bitrate,
    },
    /// The frame rate stayed under the threshold.
    LowFrameRate {
        /// The last window's frame rate.
        measured: f64,
    },
    /// Too many packets missing.
    Gaps {
        /// The last window's share of missing packets.
        ratio: f64,
    },
    /// Too many packets out of order.
    OutOfOrder {
        /// The last window's share of out-of-order packets.
        ratio: f64,
    },
    /// Nothing arrived for this long.
    Stall {
        /// How long.
        silent_for: Duration,
    },
}

impl Reason {
    /// A short, stable name for counters and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Reason::LowBitrate { .. } => "bitrate",
            Reason::LowFrameRate { .. } => "framerate",
            Reason::Gaps { .. } => "gaps",
            Reason::OutOfOrder { .. } => "out_of_order",
            Reason::Stall { .. } => "stall",
        }
    }
}

/// What the detector says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Output {
    /// Leave this source.
    Switch(Reason),
    /// Nothing more until then (or until the next input, if `None`).
    Timeout(Option<Instant>),
}

/// Measures of one closed window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowStats {
    /// Received bit rate.
    pub bitrate: Bitrate,
    /// Packets per second.
    pub packet_rate: f64,
    /// Frames per second.
    pub frame_rate: f64,
    /// Share of expected packets that were missing (net of those that arrived late).
    pub gap_ratio: f64,
    /// Share of received packets that came after a higher sequence number.
    pub out_of_order_ratio: f64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    bytes: u64,
    packets: u64,
    frames: u64,
    gaps: u64,
    out_of_order: u64,
}

/// The detector for one source. See the module documentation.
#[derive(Debug)]
pub struct Detector {
    config: Config,
    now: Option<Instant>,
    window_start: Option<Instant>,
    current: Counts,
    last: Option<WindowStats>,
    highest: Option<SeqNo>,
    last_packet: Option<Instant>,
    /// The usual gap between two packets, smoothed.
    usual_gap: Option<Duration>,
    learned_nominal: Option<f64>,
    bad_streak: u32,
    good_streak: u32,
    armed: bool,
    stall_reported: bool,
    pending: VecDeque<Output>,
    windows: u64,
    /// Windows closed since the last reset; the first second after a (re)start is a
    /// catch-up burst and teaches nothing about the stream's rate.
    since_reset: u64,
}

impl Detector {
    /// A detector with these thresholds.
    pub fn new(config: Config) -> Result<Detector, Error> {
        config.validate()?;
        Ok(Detector {
            config,
            now: None,
            window_start: None,
            current: Counts::default(),
            last: None,
            highest: None,
            last_packet: None,
            usual_gap: None,
            learned_nominal: None,
            bad_streak: 0,
            good_streak: 0,
            armed: true,
            stall_reported: false,
            pending: VecDeque::new(),
            windows: 0,
            since_reset: 0,
        })
    }

    /// Starts over (a new source): windows, streaks and silence are cleared; a learned
    /// nominal rate is kept, since it is the stream's, not the source's.
    pub fn reset(&mut self, now: Instant) {
        self.window_start = Some(now);
        self.current = Counts::default();
        self.last = None;
        self.last_packet = Some(now);
        self.bad_streak = 0;
        self.good_streak = 0;
        self.armed = true;
        self.stall_reported = false;
        self.pending.clear();
        self.since_reset = 0;
        // The sequence position carries over: the new source resumes where the old left.
    }

    /// The source started a new session, numbered afresh: like [`Detector::reset`], and
    /// the sequence position is forgotten, so the jump is not counted as missing packets.
    pub fn new_session(&mut self, now: Instant) {
        self.reset(now);
        self.highest = None;
    }

    /// The stream changes rate on purpose (its edge moves the viewer to another
    /// rendition): the rate learned is forgotten and learned again, so the change is not
    /// taken for a drop.
    pub fn rate_changed(&mut self, now: Instant) {
        self.learned_nominal = None;
        self.windows = 0;
        self.reset(now);
    }

    /// The source said it is alive without sending media (a heartbeat while the stream
    /// pauses upstream): no stall is counted from before `now`; the windows see nothing.
    pub fn handle_alive(&mut self, now: Instant) {
        self.handle_timeout(now);
        self.window_start.get_or_insert(now);
        self.last_packet = Some(now);
        self.stall_reported = false;
    }

    /// One packet received at `now`.
    pub fn handle_input(&mut self, now: Instant, obs: Observation) {
        self.handle_timeout(now);
        self.window_start.get_or_insert(now);
        if let Some(last) = self.last_packet {
            let gap = now.saturating_duration_since(last);
            self.usual_gap = Some(match self.usual_gap {
                None => gap,
                Some(g) => (g * 7 + gap) / 8,
            });
        }
        self.last_packet = Some(now);
        self.stall_reported = false;
        let c = &mut self.current;
        // A repair's bytes are no measure of the stream's rate: an edge probing a
        // viewer's link sends it copies of what it already has, flagged as repairs.
        if !obs.repair {
            c.bytes += obs.size as u64;
        }
        c.packets += 1;
        if obs.frame_start {
            c.frames += 1;
        }
        match self.highest {
            None => self.highest = Some(obs.seq),
            // Another numbering space (each rendition of a ladder has its own, 2^45
            // apart): a packet of the one just left, or the first of the next, says
            // nothing of loss or order here. The count goes on from it (a single stray
            // of the old space, taken as the highest, made every later packet look late).
            Some(h) if obs.seq.0.abs_diff(h.0) > SPACE => self.highest = Some(obs.seq),
            Some(h) if obs.seq > h => {
                c.gaps += obs.seq.0 - h.0 - 1;
                self.highest = Some(obs.seq);
            }
            Some(_) => {
                // Most likely fills a gap counted when a higher number arrived.
                if !obs.repair {
                    c.out_of_order += 1;
                }
                c.gaps = c.gaps.saturating_sub(1);
            }
        }
    }

    /// Moves time to `now`, closing windows that ended and checking for silence.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.now.is_some_and(|t| now < t) {
            return;
        }
        self.now = Some(now);
        let Some(mut start) = self.window_start else {
            return;
        };
        // Close every window that ended; after a long silence, at most a few empty ones
        // matter, so jump ahead instead of looping over each.
        let window = self.config.window;
        let mut closed = 0u32;
        while now >= start + window {
            if closed >= self.config.bad_windows + self.config.rearm_windows {
                let behind = now.saturating_duration_since(start).as_nanos() / window.as_nanos();
                start += window * u32::try_from(behind).unwrap_or(u32::MAX);
                self.current = Counts::default();
                break;
            }
            let counts = std::mem::take(&mut self.current);
            self.close_window(counts);
            start += window;
            closed += 1;
        }
        self.window_start = Some(start);

        if let Some(last) = self.last_packet {
            let silent_for = now.saturating_duration_since(last);
            if silent_for >= self.stall() && !self.stall_reported {
                self.stall_reported = true;
                if self.armed {
                    self.armed = false;
                    self.good_streak = 0;
                    self.pending
                        .push_back(Output::Switch(Reason::Stall { silent_for }));
                }
            }
        }
    }

    fn close_window(&mut self, c: Counts) {
        self.windows += 1;
        self.since_reset += 1;
        let secs = self.config.window.as_secs_f64();
        let expected = c.packets + c.gaps;
        let stats = WindowStats {
            bitrate: Bitrate::from_size_over(DataSize(c.bytes), self.config.window),
            packet_rate: c.packets as f64 / secs,
            frame_rate: c.frames as f64 / secs,
            gap_ratio: if expected == 0 {
                0.0
            } else {
                c.gaps as f64 / expected as f64
            },
            out_of_order_ratio: if c.packets == 0 {
                0.0
            } else {
                c.out_of_order as f64 / c.packets as f64
            },
        };
        self.last = Some(stats);

        let reason = self.judge(&stats);
        match reason {
            Some(reason) => {
                self.good_streak = 0;
                self.bad_streak += 1;
                if self.armed && self.bad_streak >= self.config.bad_windows {
                    self.armed = false;
                    self.pending.push_back(Output::Switch(reason));
                }
            }
            None => {
                self.bad_streak = 0;
                self.good_streak += 1;
                if !self.armed && self.good_streak >= self.config.rearm_windows {
                    self.armed = true;
                }
                // Learn the nominal rate from good windows only, and not from the burst
                // that follows a (re)start.
                if self.config.nominal_bitrate.is_none()
                    && c.packets > 0
                    && self.since_reset > LEARN_AFTER
                {
                    let v = stats.bitrate.0 as f64;
                    self.learned_nominal = Some(match self.learned_nominal {
                        None => v,
                        Some(n) => n + (v - n) * 0.1,
                    });
                }
            }
        }
    }

    fn judge(&self, s: &WindowStats) -> Option<Reason> {
        if let Some(nominal) = self.nominal() {
            if (s.bitrate.0 as f64) < nominal.0 as f64 * self.config.min_bitrate_ratio {
                return Some(Reason::LowBitrate {
                    measured: s.bitrate,
                    nominal,
                });
            }
        }
        if let Some(min) = self.config.min_frame_rate {
            if s.frame_rate < min {
                return Some(Reason::LowFrameRate {
                    measured: s.frame_rate,
                });
            }
        }
        if s.gap_ratio > self.config.max_gap_ratio {
            return Some(Reason::Gaps { ratio: s.gap_ratio });
        }
        if s.out_of_order_ratio > self.config.max_out_of_order_ratio {
            return Some(Reason::OutOfOrder {
                ratio: s.out_of_order_ratio,
            });
        }
        None
    }

    /// The silence that counts as a stall now: twelve usual gaps between packets, between
    /// [`Config::min_stall`] and [`Config::stall`].
    pub fn stall(&self) -> Duration {
        let adaptive = self.usual_gap.map_or(self.config.stall, |g| g * 12);
        adaptive.clamp(
            self.config.min_stall.min(self.config.stall),
            self.config.stall,
        )
    }

    /// The nominal bit rate in use: configured, or learned once four good windows were
    /// seen after the first second.
    pub fn nominal(&self) -> Option<Bitrate> {
        self.config.nominal_bitrate.or_else(|| {
            if self.windows >= LEARN_AFTER + 4 {
                self.learned_nominal.map(|v| Bitrate(v as u64))
            } else {
                None
            }
        })
    }

    /// The last closed window's measures.
    pub fn last_window(&self) -> Option<WindowStats> {
        self.last
    }

    /// The next output; call until [`Output::Timeout`].
    pub fn poll_output(&mut self) -> Output {
        if let Some(o) = self.pending.pop_front() {
            return o;
        }
        let Some(start) = self.window_start else {
            return Output::Timeout(None);
        };
        let mut t = start + self.config.window;
        if let (Some(last), false) = (self.last_packet, self.stall_reported) {
            t = t.min(last + self.stall());
        }
        Output::Timeout(Some(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
    fn t0() -> Instant {
        Instant::now()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn switches(d: &mut Detector) -> Vec<Reason> {
        let mut out = Vec::new();
        while let Output::Switch(r) = d.poll_output() {
            out.push(r);
        }
        out
    }

    /// Feeds `secs` seconds of a stream at `bps`, 1000-byte packets, from `*seq`, every
    /// `skip`-th packet lost (0: none); returns the switches said along the way.
    fn feed(
        d: &mut Detector,
        t: Instant,
        from_ms: u64,
        secs: u64,
        bps: u64,
        seq: &mut u64,
        skip: u64,
    ) -> Vec<Reason> {
        let per_sec = bps / 8000;
        let gap_us = 1_000_000 / per_sec;
        let mut out = Vec::new();
        for i in 0..per_sec * secs {
            let now = t + ms(from_ms) + Duration::from_micros(i * gap_us);
            *seq += 1;
            if skip != 0 && *seq % skip == 0 {
                continue;
            }
            d.handle_input(
                now,
                Observation {
                    seq: SeqNo(*seq),
                    size: 1000,
                    frame_start: i % 10 == 0,
                    repair: false,
                },
            );
            out.extend(switches(d));
        }
        out
    }

    #[test]
    fn copies_flagged_as_repairs_do_not_raise_the_rate() {
        let t = t0();
        let mut d = Detector::new(Config::default()).unwrap();
        d.reset(t);
        // 1 Mbit/s for 2 s, each packet followed by two copies flagged as repairs (an
        // edge probing the link).
        for i in 0..250u64 {
            let now = t + Duration::from_millis(i * 8);
            for repair in [false, true, true] {
                d.handle_input(
                    now,
                    Observation {
                        seq: SeqNo(i + 1),
                        size: 1000,
                        frame_start: false,
                        repair,
                    },
                );
            }
        }
        d.handle_timeout(t + ms(2100));
        let w = d.last_window().expect("a window");
        assert!(
            (900_000..1_100_000).contains(&w.bitrate.0),
            "the stream's rate, not the copies': {:?}",
            w.bitrate
        );
    }

    fn nominal_4m() -> Config {
        Config {
            nominal_bitrate: Some(Bitrate::mbps(4)),
            ..Config::default()
        }
    }

    #[test]
    fn healthy_stream_says_nothing() {
        let t = t0();
        let mut d = Detector::new(nominal_4m()).unwrap();
        let mut seq = 0;
        assert!(feed(&mut d, t, 0, 5, 4_000_000, &mut seq, 0).is_empty());
        let w = d.last_window().unwrap();
        assert!((w.bitrate.0 as f64 - 4e6).abs() < 0.05 * 4e6, "{w:?}");
        assert!((w.packet_rate - 500.0).abs() < 10.0);
        assert!((w.frame_rate - 50.0).abs() < 5.0);
    }

    #[test]
    fn rate_drop_switches_after_three_windows_once() {
        let t = t0();
        let mut d = Detector::new(nominal_4m()).unwrap();
        let mut seq = 0;
        feed(&mut d, t, 0, 2, 4_000_000, &mut seq, 0);
        let said = feed(&mut d, t, 2000, 3, 2_000_000, &mut seq, 0);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(matches!(said[0], Reason::LowBitrate { .. }));
    }

    #[test]
    fn one_bad_window_is_not_enough() {
        let t = t0();
        let mut d = Detector::new(nominal_4m()).unwrap();
        let mut seq = 0;
        feed(&mut d, t, 0, 2, 4_000_000, &mut seq, 0);
        // 250 ms at half rate, then healthy again.
        for i in 0..62 {
            seq += 1;
            d.handle_input(
                t + ms(2000) + ms(4 * i),
                Observation {
                    seq: SeqNo(seq),
                    size: 1000,
                    frame_start: false,
                    repair: false,
                },
            );
        }
        assert!(switches(&mut d).is_empty());
        assert!(feed(&mut d, t, 2250, 2, 4_000_000, &mut seq, 0).is_empty());
    }

    #[test]
    fn silence_is_a_stall() {
        let t = t0();
        let mut d = Detector::new(nominal_4m()).unwrap();
        let mut seq = 0;
        feed(&mut d, t, 0, 1, 4_000_000, &mut seq, 0);
        let last = t + ms(998);
        let Output::Timeout(Some(deadline)) = d.poll_output() else {
            panic!("expected a deadline")
        };
        // 500 packets a second: twelve usual gaps is under the floor of 250 ms.
        assert!(deadline <= last + ms(250));
        d.handle_timeout(last + ms(249));
        assert!(switches(&mut d).is_empty());
        d.handle_timeout(last + ms(251));
        let said = switches(&mut d);
        assert!(
            matches!(said.as_slice(), [Reason::Stall { .. }]),
            "{said:?}"
        );
        // A long silence says it once, not once per window.
        d.handle_timeout(last + ms(60_000));
        assert!(switches(&mut d).is_empty());
    }

    #[test]
    fn a_sparse_stream_waits_longer_for_a_stall_up_to_the_limit() {
        let t = t0();
        let mut d = Detector::new(Config::default()).unwrap();
        // 30 packets a second (33 ms apart): twelve gaps is about 400 ms.
        for i in 0..60u64 {
            d.handle_input(
                t + ms(i * 33),
                Observation {
                    seq: SeqNo(i),
                    size: 500,
                    frame_start: false,
                    repair: false,
                },
            );
        }
        let last = t + ms(59 * 33);
        assert_eq!(d.stall(), ms(396));
        d.handle_timeout(last + ms(390));
        assert!(switches(&mut d).is_empty());
        d.handle_timeout(last + ms(400));
        assert!(matches!(
            switches(&mut d).as_slice(),
            [Reason::Stall { .. }]
        ));
        // 5 a second: capped at the configured 500 ms.
        let mut d = Detector::new(Config::default()).unwrap();
        for i in 0..20u64 {
            d.handle_input(
                t + ms(i * 200),
                Observation {
                    seq: SeqNo(i),
                    size: 500,
                    frame_start: false,
                    repair: false,
                },
            );
        }
        assert_eq!(d.stall(), ms(500));
    }

    #[test]
    fn gaps_switch() {
        let t = t0();
        let mut d = Detector::new(Config::default()).unwrap();
        let mut seq = 0;
        let said = feed(&mut d, t, 0, 2, 4_000_000, &mut seq, 10); // 10% missing
        assert!(matches!(said.as_slice(), [Reason::Gaps { .. }]), "{said:?}");
    }

    #[test]
    fn out_of_order_switch() {
        let t = t0();
        let mut d = Detector::new(Config::default()).unwrap();
        // Pairs swapped: half the packets arrive after a higher one.
        for i in 0..1000u64 {
            let seq = if i % 2 == 0 { i + 1 } else { i - 1 };
            d.handle_input(
                t + ms(2 * i),
                Observation {
                    seq: SeqNo(seq),
                    size: 1000,
                    frame_start: false,
                    repair: false,
                },
            );
        }
        let said = switches(&mut d);
        assert!(
            matches!(said.as_slice(), [Reason::OutOfOrder { .. }]),
            "{said:?}"
        );
    }

    /// One packet of 1000 bytes, no frame start.
    fn observe(d: &mut Detector, now: Instant, seq: u64, repair: bool) {
        d.handle_input(
            now,
            Observation {
                seq: SeqNo(seq),
                size: 1000,
                frame_start: false,
                repair,
            },
        );
    }

    /// A viewer moved between renditions gets, now and then, a packet of the space it
    /// left (1 << 45 apart): neither a gap of 2^45 nor every later packet out of order.
    #[test]
    fn a_packet_of_another_numbering_space_is_neither_gap_nor_disorder() {
        let t = t0();
        let mut d = Detector::new(Config::default()).unwrap();
        let (old, new) = (2u64 << 45, 1u64 << 45);
        let mut seqs: Vec<u64> = (0..500).map(|i| old + i).collect();
        let change = seqs.len();
        for i in 0..1000 {
            seqs.push(new + i);
            if i % 100 == 50 {
                // A late packet of the rendition left, not flagged as a repair.
                seqs.push(old + 500 + i / 100);
            }
        }
        for (k, seq) in seqs.into_iter().enumerate() {
            let now = t + ms(2 * k as u64);
            if k == change {
                d.new_session(now);
            }
            observe(&mut d, now, seq, false);
        }
        let said = switches(&mut d);
        assert!(said.is_empty(), "{said:?}");
    }

    #[test]
    fn repairs_arriving_late_are_not_disorder() {
        let t = t0();
        let mut d = Detector::new(Config::default()).unwrap();
        // One packet in five lost and repaired two packets later: 20% late arrivals,
        // every one a repair.
        let mut order = Vec::new();
        for i in 0..1000u64 {
            if i % 5 != 0 {
                order.push((i, false));
            }
            if i % 5 == 2 {
                order.push((i - 2, true));
            }
        }
        for (k, (seq, repair)) in order.into_iter().enumerate() {
            observe(&mut d, t + ms(2 * k as u64), seq, repair);
        }
        let said = switches(&mut d);
        assert!(said.is_empty(), "{said:?}");
    }

    #[test]
    fn learns_nominal_and_rearms_after_good_windows() {
        let t = t0();
        let mut d = Detector::new(Config::default()).unwrap();
        let mut seq = 0;
        assert!(feed(&mut d, t, 0, 3, 4_000_000, &mut seq, 0).is_empty());
        let n = d.nominal().unwrap().0 as f64;
        assert!((n - 4e6).abs() < 0.05 * 4e6, "learned {n}");
        assert_eq!(feed(&mut d, t, 3000, 2, 1_000_000, &mut seq, 0).len(), 1);
        // Still bad: no second switch.
        assert!(feed(&mut d, t, 5000, 2, 1_000_000, &mut seq, 0).is_empty());
        // Good for 8 windows re-arms; the learned nominal did not sink with the bad rate.
        assert!(feed(&mut d, t, 7000, 3, 4_000_000, &mut seq, 0).is_empty());
        assert_eq!(feed(&mut d, t, 10_000, 2, 1_000_000, &mut seq, 0).len(), 1);
    }

    #[test]
    fn a_catch_up_burst_after_a_start_is_not_learned_as_the_nominal_rate() {
        let t = t0();
        let mut d = Detector::new(Config::default()).unwrap();
        let mut seq = 0;
        // Half a second at four times the rate (a ring's catch-up), then the real rate.
        assert!(feed(&mut d, t, 0, 1, 8_000_000, &mut seq, 0).is_empty());
        assert!(feed(&mut d, t, 1000, 4, 4_000_000, &mut seq, 0).is_empty());
        let n = d.nominal().unwrap().0 as f64;
        assert!((n - 4e6).abs() < 0.1 * 4e6, "learned {n}");
    }

    #[test]
    fn reset_rearms_at_once() {
        let t = t0();
        let mut d = Detector::new(nominal_4m()).unwrap();
        let mut seq = 0;
        feed(&mut d, t, 0, 1, 4_000_000, &mut seq, 0);
        assert_eq!(feed(&mut d, t, 1000, 1, 1_000_000, &mut seq, 0).len(), 1);
        d.reset(t + ms(2000));
        assert!(feed(&mut d, t, 2000, 1, 4_000_000, &mut seq, 0).is_empty());
    }

    #[test]
    fn config_validation() {
        for bad in [
            Config {
                window: Duration::ZERO,
                ..Config::default()
            },
            Config {
                min_bitrate_ratio: 1.5,
                ..Config::default()
            },
            Config {
                bad_windows: 0,
                ..Config::default()
            },
        ] {
            assert!(Detector::new(bad).is_err());
        }
    }
}
