//! A viewer's delivery speed, measured where it is served (seed 003: bytes over duration),
//! and whether it keeps up with what it is sent.
//!
//! The edge credits a [`Meter`] with what the viewer acknowledged (UDP, QUIC) or what its
//! socket drained (TCP), and tells it when the viewer's flow window or queue held back
//! packets the ring had ready. Every [`SAMPLE`] the bytes credited become a sample, marked
//! *limited* when the viewer was held back during it: the viewer's link, not the stream,
//! set its rate.
//!
//! The [`Estimate`] is, when most of the last [`Config::down_window`] was limited, the
//! mean of those limited samples (what the link carries now: a drop shows within that
//! window); otherwise the highest sample held (what the link carried at least: a viewer
//! that keeps up shows only the stream's own rate). A viewer is [slow](Meter::slow) once
//! it has been limited for all of [`Config::slow_after`], and under
//! [`Config::slow_below`] when that is set.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::Bitrate;

/// How long each sample covers.
pub const SAMPLE: Duration = Duration::from_millis(250);
/// Samples held: the last 10 s.
const HELD: usize = 40;

/// What a meter judges with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// A drop of the link's rate shows in the estimate within this long.
    pub down_window: Duration,
    /// A viewer limited for this long is slow.
    pub slow_after: Duration,
    /// When set, only a viewer limited under this rate is slow (otherwise any viewer
    /// that cannot take what it is sent).
    pub slow_below: Option<Bitrate>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            down_window: Duration::from_secs(2),
            slow_after: Duration::from_secs(5),
            slow_below: None,
        }
    }
}

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    at: Instant,
    bps: u64,
    limited: bool,
}

/// What a meter says of a viewer's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Its rate, bit/s.
    pub bps: u64,
    /// Whether the link set it (the viewer could not take more); otherwise it is a lower
    /// bound (the viewer took all it was sent).
    pub limited: bool,
}

/// One viewer's delivery speed.
#[derive(Debug, Clone)]
pub struct Meter {
    config: Config,
    samples: VecDeque<Sample>,
    /// The open interval: since when, bytes credited, whether held back.
    since: Option<Instant>,
    bytes: u64,
    blocked: bool,
    /// Since when every sample was limited (under `slow_below`, when set).
    limited_since: Option<Instant>,
}

impl Meter {
    /// A meter with nothing measured.
    pub fn new(config: Config) -> Meter {
        Meter {
            config,
            samples: VecDeque::with_capacity(HELD),
            since: None,
            bytes: 0,
            blocked: false,
            limited_since: None,
        }
    }

    /// The viewer has `bytes` more: acknowledged, or drained from its socket.
    pub fn delivered(&mut self, now: Instant, bytes: u64) {
        self.tick(now);
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// The viewer's window or queue held back packets ready for it.
    pub fn blocked(&mut self, now: Instant) {
        self.tick(now);
        self.blocked = true;
    }

    /// Closes the open interval into a sample once it covers [`SAMPLE`].
    pub fn tick(&mut self, now: Instant) {
        let Some(since) = self.since else {
            self.since = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed < SAMPLE {
            return;
        }
        let bps = Bitrate::from_size_over(crate::DataSize(self.bytes), elapsed).as_u64();
        let sample = Sample {
            at: now,
            bps,
            limited: self.blocked,
        };
        if self.samples.len() == HELD {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        let under = self.config.slow_below.is_none_or(|b| bps < b.as_u64());
        if sample.limited && under {
            self.limited_since.get_or_insert(since);
        } else {
            self.limited_since = None;
        }
        self.since = Some(now);
        self.bytes = 0;
        self.blocked = false;
    }

    /// What the meter says now, once it holds a sample.
    pub fn estimate(&self, now: Instant) -> Option<Estimate> {
        let recent: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| now.saturating_duration_since(s.at) <= self.config.down_window)
            .collect();
        let limited: Vec<u64> = recent.iter().filter(|s| s.limited).map(|s| s.bps).collect();
        if !limited.is_empty() && limited.len() * 2 >= recent.len() {
            let mean = limited.iter().sum::<u64>() / limited.len() as u64;
            return Some(Estimate {
                bps: mean,
                limited: true,
            });
        }
        let max = self.samples.iter().map(|s| s.bps).max()?;
        Some(Estimate {
            bps: max,
            limited: false,
        })
    }

    /// Whether the viewer has been limited (under `slow_below`, when set) for all of
    /// `slow_after`.
    pub fn slow(&self, now: Instant) -> bool {
        self.limited_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.config.slow_after)
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

    /// A viewer behind a link of `link` bit/s, sent a stream of `stream` bit/s within a
    /// window of `window` bytes, for `secs`, in 10 ms steps: the link drains what is in
    /// flight, the edge sends what the window allows and says when it held back. Returns
    /// the meter and the time at the end.
    struct Fluid {
        t: Instant,
        meter: Meter,
        in_flight: f64,
        backlog: f64,
    }

    impl Fluid {
        fn new(config: Config) -> Fluid {
            Fluid {
                t: t0(),
                meter: Meter::new(config),
                in_flight: 0.0,
                backlog: 0.0,
            }
        }

        fn run(&mut self, link: u64, stream: u64, window: f64, secs: f64) {
            let dt = 0.01;
            for _ in 0..(secs / dt) as usize {
                self.t += Duration::from_millis(10);
                let carried = (link as f64 / 8.0 * dt).min(self.in_flight);
                self.in_flight -= carried;
                if carried > 0.0 {
                    self.meter.delivered(self.t, carried as u64);
                }
                self.backlog += stream as f64 / 8.0 * dt;
                let room = (window - self.in_flight).max(0.0);
                let sent = room.min(self.backlog);
                self.in_flight += sent;
                self.backlog -= sent;
                if self.backlog > 1.0 {
                    self.meter.blocked(self.t);
                    // The ring is bounded: what the viewer cannot take is skipped.
                    self.backlog = self.backlog.min(window * 4.0);
                }
                self.meter.tick(self.t);
            }
        }
    }

    const WINDOW: f64 = 64.0 * 1400.0;

    #[test]
    fn a_link_slower_than_the_stream_is_measured_and_slow() {
        let mut f = Fluid::new(Config::default());
        f.run(3_000_000, 4_000_000, WINDOW, 6.0);
        let e = f.meter.estimate(f.t).unwrap();
        assert!(e.limited);
        assert!((2_800_000..=3_200_000).contains(&e.bps), "{e:?}");
        assert!(f.meter.slow(f.t));
    }

    #[test]
    fn a_fast_link_shows_the_stream_rate_and_is_never_slow() {
        let mut f = Fluid::new(Config::default());
        f.run(50_000_000, 4_000_000, WINDOW, 10.0);
        let e = f.meter.estimate(f.t).unwrap();
        assert!(!e.limited);
        assert!((3_800_000..=4_400_000).contains(&e.bps), "{e:?}");
        assert!(!f.meter.slow(f.t));
    }

    #[test]
    fn slow_below_a_threshold_only() {
        let config = Config {
            slow_below: Some(Bitrate::mbps(2)),
            ..Config::default()
        };
        let mut f = Fluid::new(config);
        f.run(3_000_000, 4_000_000, WINDOW, 8.0);
        assert!(!f.meter.slow(f.t), "limited at 3 Mbps is not under 2 Mbps");
        f.run(1_000_000, 4_000_000, WINDOW, 8.0);
        assert!(f.meter.slow(f.t));
    }

    #[test]
    fn a_recovered_link_is_no_longer_slow() {
        let mut f = Fluid::new(Config::default());
        f.run(2_000_000, 4_000_000, WINDOW, 6.0);
        assert!(f.meter.slow(f.t));
        f.run(50_000_000, 4_000_000, WINDOW, 1.0);
        assert!(!f.meter.slow(f.t));
    }

    #[test]
    fn nothing_measured_says_nothing() {
        let m = Meter::new(Config::default());
        assert_eq!(m.estimate(t0()), None);
        assert!(!m.slow(t0()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the link did before, within the down window (plus a sample) of a
        /// drop under the stream's rate the estimate is limited and within 15% of the
        /// new rate: it is never left above the link for longer than that.
        #[test]
        fn a_drop_shows_within_the_down_window(
            before in prop::collection::vec((500_000u64..40_000_000, 1u32..20), 1..6),
            after in 500_000u64..3_500_000,
        ) {
            let mut f = Fluid::new(Config::default());
            for (link, tenths) in before {
                f.run(link, 4_000_000, WINDOW, f64::from(tenths) / 10.0);
            }
            f.run(after, 4_000_000, WINDOW, 2.25);
            let e = f.meter.estimate(f.t).unwrap();
            prop_assert!(e.limited, "{e:?}");
            let err = (e.bps as f64 - after as f64).abs() / after as f64;
            prop_assert!(err < 0.15, "{e:?} against {after}");
        }

        /// A link that carries the stream with room to spare never makes a viewer slow,
        /// whatever it did earlier (once it had 2 s to recover).
        #[test]
        fn keeping_up_is_never_slow(
            before in prop::collection::vec((500_000u64..40_000_000, 1u32..40), 0..6),
            spare in 1.3f64..20.0,
        ) {
            let mut f = Fluid::new(Config::default());
            for (link, tenths) in before {
                f.run(link, 4_000_000, WINDOW, f64::from(tenths) / 10.0);
            }
            f.run((4_000_000.0 * spare) as u64, 4_000_000, WINDOW, 2.0);
            for _ in 0..20 {
                f.run((4_000_000.0 * spare) as u64, 4_000_000, WINDOW, 0.25);
                prop_assert!(!f.meter.slow(f.t));
            }
        }
    }
}
