//! A viewer's playout buffer, and the edge it is served from because of it (seed 001,
//! opportunistic pipe switching, in its live form).
//!
//! [`Playout`] estimates how much of the stream a viewer's player holds that it has not
//! played yet: the media time written (from the stream's own timestamps) less the wall
//! time elapsed since the player started, the estimate the seed gives a server ("media
//! time sent minus wall time elapsed"), kept by the viewer, which knows what arrived and
//! when. A player that ran dry would have stalled: that is counted and the estimate starts
//! again from empty.
//!
//! [`Placement`] decides from it: a viewer whose buffer stays above a high-water mark can
//! take a slower, cheaper edge without noticing (the data arrives later, the buffer
//! absorbs it); one whose buffer falls under a low-water mark goes back to a fast edge.
//! Moves to a cheap edge wait out a hold, and after each return a backoff that doubles,
//! so a viewer never flaps between the two.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::hls::media_time;

/// 90 kHz media clock ticks per millisecond.
const TICKS_PER_MS: u64 = 90;
/// PES timestamps are 33 bits.
const WRAP: u64 = 1 << 33;

/// The kind of edge a viewer asks the control server for when it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    /// Any: the control server's usual choice (the costliest tier, the fast edges, for a
    /// viewer not known to be slow).
    #[default]
    Any,
    /// An edge of a lower cost tier than the one left (the buffer can absorb a slower
    /// one).
    Cheap,
    /// An edge of a higher cost tier than the one left (the buffer runs low).
    Fast,
}

impl Prefer {
    /// As the control server's API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Prefer::Any => "any",
            Prefer::Cheap => "cheap",
            Prefer::Fast => "fast",
        }
    }
}

/// The estimate of a viewer's playout buffer.
#[derive(Debug, Clone, Default)]
pub struct Playout {
    /// The newest media time written, 90 kHz, continuous across source sessions.
    media: Option<u64>,
    /// This session's first timestamp, and the media time it maps to.
    session: Option<(u64, u64)>,
    ssrc: Option<u32>,
    /// The player's position runs in real time from this media time at this instant.
    anchor: Option<(u64, Instant)>,
    underruns: u64,
    /// It ran dry and nothing came since: the player waits, its position with it.
    dry: bool,
}

impl Playout {
    /// An empty buffer, nothing written yet.
    pub fn new() -> Playout {
        Playout::default()
    }

    /// A packet of source session `ssrc` was written to the player at `now`.
    pub fn written(&mut self, now: Instant, ssrc: u32, payload: &[u8]) {
        if self.ssrc != Some(ssrc) {
            // A new session's timestamps start anywhere: its first one continues the
            // media time from where the last session left it.
            self.ssrc = Some(ssrc);
            self.session = None;
        }
        let Some(raw) = media_time(payload) else {
            return;
        };
        let media = self.media.unwrap_or(0);
        let (first, base) = *self.session.get_or_insert((raw, media));
        // Relative to the session's first stamp, within half the 33-bit range either way;
        // the newest written is the furthest (audio and video stamps interleave).
        let rel = raw.wrapping_sub(first) & (WRAP - 1);
        if self.dry {
            // The player, stalled, starts again from what it had when this came.
            self.dry = false;
            self.anchor = Some((media, now));
        }
        if rel < WRAP / 2 {
            self.media = Some(media.max(base + rel));
        }
        self.anchor.get_or_insert((self.media.unwrap_or(0), now));
    }

    /// How much the player holds that it has not played, at `now` (`None` before the
    /// first timestamp). A buffer that ran dry is counted as an underrun, and the player,
    /// which stalled, starts again from empty.
    pub fn level(&mut self, now: Instant) -> Option<Duration> {
        let media = self.media?;
        let (at, since) = self.anchor?;
        let played = now.saturating_duration_since(since).as_millis() as u64;
        let held = media.saturating_sub(at) / TICKS_PER_MS;
        if self.dry || held < played {
            // Counted once a dry spell; the position waits with the player.
            if !self.dry {
                self.underruns += 1;
                self.dry = true;
            }
            self.anchor = Some((media, now));
            return Some(Duration::ZERO);
        }
        Some(Duration::from_millis(held - played))
    }

    /// Times the player would have run dry.
    pub fn underruns(&self) -> u64 {
        self.underruns
    }
}

/// When buffer-aware moves happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementConfig {
    /// Move to a cheap edge once the buffer held at least this much for `hold`.
    pub high: Duration,
    /// Move back to a fast edge once it held less than this for [`LOW_HOLD`].
    pub low: Duration,
    /// How long the buffer must stay high before a move to a cheap edge.
    pub hold: Duration,
    /// After a return to a fast edge (or a refusal), the next move to a cheap one waits
    /// this long, doubled at each return that came soon after the move.
    pub backoff: Duration,
    /// The longest that wait gets.
    pub max_backoff: Duration,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            high: Duration::from_secs(3),
            low: Duration::from_secs(1),
            hold: Duration::from_secs(10),
            backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(600),
        }
    }
}

impl PlacementConfig {
    /// Checks the settings: the marks apart, the waits sensible.
    pub fn validate(&self) -> Result<(), String> {
        if self.low.is_zero() || self.high < self.low * 2 {
            return Err(
                "buffer-aware moves: the low-water mark above zero and the high-water mark at least twice it".into(),
            );
        }
        if self.hold < Duration::from_secs(1) || self.backoff.is_zero() {
            return Err("buffer-aware moves: a hold of at least 1 s and a backoff".into());
        }
        Ok(())
    }
}

/// A buffer under the low-water mark this long sends the viewer back to a fast edge.
pub const LOW_HOLD: Duration = Duration::from_millis(500);
/// A stay on a cheap edge this long counts as a success: the backoff starts over.
pub const GOOD_STAY: Duration = Duration::from_secs(300);

/// Where the viewer is served from, as far as its buffer is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// A fast edge (the control server's usual choice).
    Fast,
    /// A cheap edge, taken because the buffer could afford it.
    Cheap,
}

/// Decides buffer-aware moves.
#[derive(Debug, Clone)]
pub struct Placement {
    config: PlacementConfig,
    on: Tier,
    /// Since when the buffer is above the high-water mark (on a fast edge) or under the
    /// low-water mark (on a cheap one).
    since: Option<Instant>,
    /// A move was asked for and is not settled yet.
    asked: bool,
    /// No move to a cheap edge before this.
    not_before: Instant,
    backoff: Duration,
    cheap_since: Option<Instant>,
}

impl Placement {
    /// A viewer starting at `now` on a fast edge.
    pub fn new(config: PlacementConfig, now: Instant) -> Placement {
        Placement {
            config,
            on: Tier::Fast,
            since: None,
            asked: false,
            not_before: now,
            backoff: config.backoff,
            cheap_since: None,
        }
    }

    /// Where the viewer is.
    pub fn tier(&self) -> Tier {
        self.on
    }

    /// The buffer holds `level` at `now`: the move to ask for, if any (once, until
    /// [`Placement::moved`] or [`Placement::refused`] settles it).
    pub fn observe(&mut self, now: Instant, level: Option<Duration>) -> Option<Tier> {
        if self.asked {
            return None;
        }
        let Some(level) = level else {
            self.since = None;
            return None;
        };
        let (beyond, wait, to) = match self.on {
            Tier::Fast => (level >= self.config.high, self.config.hold, Tier::Cheap),
            Tier::Cheap => (level < self.config.low, LOW_HOLD, Tier::Fast),
        };
        if !beyond {
            self.since = None;
            return None;
        }
        let since = *self.since.get_or_insert(now);
        if now.saturating_duration_since(since) < wait
            || (to == Tier::Cheap && now < self.not_before)
        {
            return None;
        }
        self.asked = true;
        Some(to)
    }

    /// The viewer moved to an edge of tier `to` at `now`: the move asked for, or (to
    /// [`Tier::Fast`]) any other move, which the control server makes to a fast edge.
    pub fn moved(&mut self, now: Instant, to: Tier) {
        self.asked = false;
        self.since = None;
        if to == Tier::Fast && self.on == Tier::Cheap {
            // Back from a cheap edge: the next try waits, longer when this one was short.
            let stayed = self
                .cheap_since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            self.backoff = if stayed >= GOOD_STAY {
                self.config.backoff
            } else {
                (self.backoff * 2).min(self.config.max_backoff)
            };
            self.not_before = now + self.backoff;
        }
        if to == Tier::Cheap {
            self.cheap_since = Some(now);
        }
        self.on = to;
    }

    /// The move asked for did not happen (no such edge, no answer): try again after the
    /// backoff, which doubles.
    pub fn refused(&mut self, now: Instant) {
        self.asked = false;
        self.since = None;
        if self.on == Tier::Fast {
            self.not_before = now + self.backoff;
            self.backoff = (self.backoff * 2).min(self.config.max_backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
    fn t0() -> Instant {
        Instant::now()
    }

    /// One TS packet starting a video PES with decoding time `dts`.
    fn video(dts: u64) -> Vec<u8> {
        let stamp = |v: u64, tag: u8| {
            [
                tag << 4 | ((v >> 29) as u8 & 0x0e) | 1,
                (v >> 22) as u8,
                ((v >> 14) as u8 & 0xfe) | 1,
                (v >> 7) as u8,
                ((v << 1) as u8 & 0xfe) | 1,
            ]
        };
        let mut p = vec![0x47, 0x41, 0x00, 0x10, 0, 0, 1, 0xe0, 0, 0, 0x80, 0xc0, 10];
        p.extend_from_slice(&stamp((dts + 3600) & (WRAP - 1), 3));
        p.extend_from_slice(&stamp(dts & (WRAP - 1), 1));
        p.resize(188, 0xff);
        p
    }

    #[test]
    fn the_buffer_is_media_written_less_time_played() {
        let t0 = t0();
        let mut p = Playout::new();
        assert_eq!(p.level(t0), None);
        // A burst of 2 s at once, then real time.
        for i in 0..=50u64 {
            p.written(t0, 1, &video(1000 + i * 3600));
        }
        assert_eq!(p.level(t0), Some(Duration::from_secs(2)));
        for i in 51..=100u64 {
            p.written(
                t0 + Duration::from_millis((i - 50) * 40),
                1,
                &video(1000 + i * 3600),
            );
        }
        assert_eq!(
            p.level(t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(2))
        );
        // Nothing for 1.5 s: the player eats into its buffer.
        assert_eq!(
            p.level(t0 + Duration::from_millis(3500)),
            Some(Duration::from_millis(500))
        );
        // Nothing for 3 s: it ran dry (counted once however often it is asked), and
        // starts again from empty when the stream comes back.
        assert_eq!(p.level(t0 + Duration::from_secs(5)), Some(Duration::ZERO));
        assert_eq!(p.underruns(), 1);
        assert_eq!(p.level(t0 + Duration::from_secs(6)), Some(Duration::ZERO));
        assert_eq!(p.level(t0 + Duration::from_secs(7)), Some(Duration::ZERO));
        assert_eq!(p.underruns(), 1);
        let back = t0 + Duration::from_secs(7);
        for i in 101..=125u64 {
            p.written(back, 1, &video(1000 + i * 3600));
        }
        assert_eq!(p.level(back), Some(Duration::from_secs(1)));
        assert_eq!(
            p.level(back + Duration::from_millis(400)),
            Some(Duration::from_millis(600))
        );
        assert_eq!(p.underruns(), 1);
    }

    #[test]
    fn a_new_session_continues_the_media_time() {
        let t0 = t0();
        let mut p = Playout::new();
        for i in 0..=25u64 {
            p.written(t0, 1, &video(i * 3600));
        }
        // The next session's clock starts elsewhere (and wraps); the buffer goes on.
        for i in 0..=25u64 {
            p.written(t0, 2, &video((WRAP - 10 * 3600 + i * 3600) & (WRAP - 1)));
        }
        assert_eq!(p.level(t0), Some(Duration::from_secs(2)));
        // A packet with no timestamp changes nothing; nor does one from the past.
        p.written(t0, 2, &[0x47; 188]);
        p.written(t0, 2, &video(WRAP - 20 * 3600));
        assert_eq!(p.level(t0), Some(Duration::from_secs(2)));
    }

    fn config() -> PlacementConfig {
        PlacementConfig::default()
    }

    #[test]
    fn a_full_buffer_moves_to_a_cheap_edge_once_and_a_low_one_back() {
        let t0 = t0();
        let s = Duration::from_secs;
        let mut pl = Placement::new(config(), t0);
        // Above the mark, but not for the whole hold.
        assert_eq!(pl.observe(t0, Some(s(5))), None);
        assert_eq!(pl.observe(t0 + s(5), Some(s(2))), None);
        assert_eq!(pl.observe(t0 + s(12), Some(s(5))), None);
        assert_eq!(pl.observe(t0 + s(22), Some(s(5))), Some(Tier::Cheap));
        // Asked once only.
        assert_eq!(pl.observe(t0 + s(23), Some(s(5))), None);
        pl.moved(t0 + s(23), Tier::Cheap);
        assert_eq!(pl.tier(), Tier::Cheap);
        // Steady: no move.
        for i in 24..200 {
            assert_eq!(pl.observe(t0 + s(i), Some(s(5))), None);
        }
        // The cheap edge falls behind: back after the low hold.
        assert_eq!(
            pl.observe(t0 + s(200), Some(Duration::from_millis(900))),
            None
        );
        let back = t0 + s(200) + LOW_HOLD;
        assert_eq!(
            pl.observe(back, Some(Duration::from_millis(800))),
            Some(Tier::Fast)
        );
        pl.moved(back, Tier::Fast);
        // The buffer refills; the next try waits the doubled backoff (the stay was short).
        let mut next = None;
        for i in 0..200 {
            let t = back + s(i);
            if let Some(to) = pl.observe(t, Some(s(5))) {
                next = Some((t, to));
                break;
            }
        }
        assert_eq!(next, Some((back + s(60), Tier::Cheap)));
    }

    #[test]
    fn a_refusal_backs_off() {
        let t0 = t0();
        let mut pl = Placement::new(config(), t0);
        // Observed every second at a full buffer, every ask refused.
        let mut asks = Vec::new();
        for i in 0..200 {
            let t = t0 + Duration::from_secs(i);
            if pl.observe(t, Some(Duration::from_secs(5))).is_some() {
                asks.push(i);
                pl.refused(t);
            }
        }
        assert_eq!(asks, [10, 40, 100]);
    }

    #[test]
    fn settings_are_checked() {
        assert!(config().validate().is_ok());
        let bad = PlacementConfig {
            high: Duration::from_millis(1500),
            ..config()
        };
        assert!(bad.validate().is_err());
    }

    proptest! {
        /// Whatever the buffer does, moves to a cheap edge are at least the hold apart,
        /// and a return is followed by at least the backoff; a steady buffer moves at most
        /// once.
        #[test]
        fn it_never_flaps(
            levels in proptest::collection::vec(0u64..8000, 1..400),
            steady in 0u64..8000,
        ) {
            let t0 = t0();
            let mut pl = Placement::new(config(), t0);
            let mut moves: Vec<(Instant, Tier)> = Vec::new();
            for (i, ms) in levels.iter().enumerate() {
                let t = t0 + Duration::from_millis(500 * i as u64);
                if let Some(to) = pl.observe(t, Some(Duration::from_millis(*ms))) {
                    pl.moved(t, to);
                    moves.push((t, to));
                }
            }
            for w in moves.windows(2) {
                if w[0].1 == Tier::Fast && w[1].1 == Tier::Cheap {
                    prop_assert!(w[1].0 - w[0].0 >= config().backoff * 2);
                }
            }
            for w in moves.windows(3) {
                if w[0].1 == Tier::Cheap {
                    prop_assert!(w[2].0 - w[0].0 >= config().backoff);
                }
            }
            let mut pl = Placement::new(config(), t0);
            let mut n = 0;
            for i in 0..2000u64 {
                let t = t0 + Duration::from_millis(500 * i);
                if let Some(to) = pl.observe(t, Some(Duration::from_millis(steady))) {
                    pl.moved(t, to);
                    n += 1;
                }
            }
            prop_assert!(n <= 1, "{} moves on a steady buffer of {} ms", n, steady);
        }
    }
}
