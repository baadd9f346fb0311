//! The impairment layer: what a real network does to packets, made on purpose.
//!
//! Kernel netem is not available where Braid is tested, so every outgoing link of every
//! daemon can impair its own traffic: random loss, burst loss (a Gilbert-Elliott chain),
//! delay, jitter, reordering, duplication, a rate cap with a bounded queue, and scheduled
//! outages. Everything is seeded, so a run is reproducible. `data_only` impairs media and
//! lets control messages through (a path whose data dies while its control still passes).
//!
//! The [`Impairer`] only decides; the socket layer carries the decision out (drops,
//! delays with a timer queue, sends twice).

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// What a link does to the packets sent on it. The default does nothing.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Probability that a packet is lost, independently of the others.
    pub loss: f64,
    /// Burst loss on top of `loss`.
    pub burst: Option<Burst>,
    /// Fixed one-way delay, in milliseconds.
    pub delay_ms: u64,
    /// Uniform extra delay between 0 and this, in milliseconds (reorders when larger than
    /// the packet spacing).
    pub jitter_ms: u64,
    /// Probability that a packet is held back `reorder_ms` more than the others.
    pub reorder: f64,
    /// Extra delay of a reordered packet, in milliseconds.
    pub reorder_ms: u64,
    /// Probability that a packet is sent twice.
    pub duplicate: f64,
    /// Rate cap in bits per second; packets beyond it queue, up to `queue_ms`.
    pub rate_bps: Option<u64>,
    /// Longest a packet may wait in the rate cap's queue before being dropped (default 0
    /// means 100 ms).
    pub queue_ms: u64,
    /// Periods when the link carries nothing, from the daemon's start.
    pub outages: Vec<Outage>,
    /// Impair only media; control messages pass untouched.
    pub data_only: bool,
    /// Seed of the random choices; each link mixes in its own address.
    pub seed: u64,
}

/// Gilbert-Elliott burst loss: a good and a bad state.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    /// Probability, per packet, of going from good to bad.
    pub p_enter: f64,
    /// Probability, per packet, of going from bad to good.
    pub p_leave: f64,
    /// Loss probability while bad.
    pub loss_in_burst: f64,
}

/// A period with no delivery.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// When it starts, in milliseconds after the daemon started.
    pub start_ms: u64,
    /// How long it lasts, in milliseconds.
    pub duration_ms: u64,
}

impl Config {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        let p = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!(
                    "impairment {name} must be a probability between 0 and 1, not {v}"
                ))
            }
        };
        p("loss", self.loss)?;
        p("reorder", self.reorder)?;
        p("duplicate", self.duplicate)?;
        if let Some(b) = &self.burst {
            p("burst.p_enter", b.p_enter)?;
            p("burst.p_leave", b.p_leave)?;
            p("burst.loss_in_burst", b.loss_in_burst)?;
        }
        if self.rate_bps == Some(0) {
            return Err("impairment rate_bps must be above zero (leave it out for no cap)".into());
        }
        Ok(())
    }

    /// Whether this config changes anything.
    pub fn is_noop(&self) -> bool {
        *self
            == Config {
                seed: self.seed,
                ..Config::default()
            }
    }
}

/// Why the impairment layer dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Independent random loss.
    Loss,
    /// Loss in a burst.
    Burst,
    /// A scheduled outage.
    Outage,
    /// The rate cap's queue was full.
    RateCap,
}

impl DropReason {
    /// A stable name for counters.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Loss => "impair_loss",
            DropReason::Burst => "impair_burst",
            DropReason::Outage => "impair_outage",
            DropReason::RateCap => "impair_rate_cap",
        }
    }
}

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Do not send it.
    Drop(DropReason),
    /// Send it at `at` (now, or later), `copies` times.
    Send {
        /// When.
        at: Instant,
        /// 1, or 2 when duplicated.
        copies: u8,
    },
}

/// The impairment of one link. Time is passed in.
#[derive(Debug)]
pub struct Impairer {
    config: Config,
    rng: SmallRng,
    start: Instant,
    in_burst: bool,
    /// When the rate cap's link is next free.
    link_free_at: Instant,
}

impl Impairer {
    /// An impairer for a link, started at `start`, seeded with the config's seed mixed
    /// with `link_salt` (so two links with one config lose different packets).
    pub fn new(config: Config, start: Instant, link_salt: u64) -> Impairer {
        let seed = config.seed ^ link_salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Impairer {
            rng: SmallRng::seed_from_u64(seed),
            config,
            start,
            in_burst: false,
            link_free_at: start,
        }
    }

    /// Whether it impairs media only.
    pub fn data_only(&self) -> bool {
        self.config.data_only
    }

    /// Whether the impairer changes anything at all (the socket layer skips it if not).
    pub fn is_noop(&self) -> bool {
        self.config.is_noop()
    }

    /// Decides the fate of a packet of `len` bytes sent at `now`.
    pub fn decide(&mut self, now: Instant, len: usize, is_data: bool) -> Verdict {
        let c = &self.config;
        if c.data_only && !is_data {
            return Verdict::Send { at: now, copies: 1 };
        }
        let since_start = now.saturating_duration_since(self.start);
        let ms = since_start.as_millis() as u64;
        if c.outages
            .iter()
            .any(|o| ms >= o.start_ms && ms < o.start_ms + o.duration_ms)
        {
            return Verdict::Drop(DropReason::Outage);
        }
        if let Some(b) = c.burst {
            let flip = if self.in_burst { b.p_leave } else { b.p_enter };
            if self.rng.random_bool(flip) {
                self.in_burst = !self.in_burst;
            }
            if self.in_burst && self.rng.random_bool(b.loss_in_burst) {
                return Verdict::Drop(DropReason::Burst);
            }
        }
        if c.loss > 0.0 && self.rng.random_bool(c.loss) {
            return Verdict::Drop(DropReason::Loss);
        }
        let mut at = now;
        if let Some(rate) = c.rate_bps {
            let queue = Duration::from_millis(if c.queue_ms == 0 { 100 } else { c.queue_ms });
            let start = self.link_free_at.max(now);
            if start.saturating_duration_since(now) > queue {
                return Verdict::Drop(DropReason::RateCap);
            }
            let serialize =
                Duration::from_nanos((len as u64 * 8).saturating_mul(1_000_000_000) / rate);
            self.link_free_at = start + serialize;
            at = self.link_free_at;
        }
        at += Duration::from_millis(c.delay_ms);
        if c.jitter_ms > 0 {
            at += Duration::from_micros(self.rng.random_range(0..=c.jitter_ms * 1000));
        }
        if c.reorder > 0.0 && self.rng.random_bool(c.reorder) {
            at += Duration::from_millis(c.reorder_ms);
        }
        let copies = if c.duplicate > 0.0 && self.rng.random_bool(c.duplicate) {
            2
        } else {
            1
        };
        Verdict::Send { at, copies }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
    fn t0() -> Instant {
        Instant::now()
    }

    fn run(config: Config, n: usize) -> Vec<Verdict> {
        let t = t0();
        let mut imp = Impairer::new(config, t, 1);
        (0..n)
            .map(|i| imp.decide(t + Duration::from_micros(i as u64 * 2600), 1356, true))
            .collect()
    }

    fn lost(v: &[Verdict]) -> usize {
        v.iter().filter(|v| matches!(v, Verdict::Drop(_))).count()
    }

    #[test]
    fn noop_sends_everything_now() {
        let v = run(Config::default(), 1000);
        assert_eq!(lost(&v), 0);
        assert!(
            v.iter()
                .all(|v| matches!(v, Verdict::Send { copies: 1, .. }))
        );
        assert!(Config::default().is_noop());
    }

    #[test]
    fn loss_rate_is_close_to_setting_and_reproducible() {
        let c = Config {
            loss: 0.1,
            seed: 42,
            ..Config::default()
        };
        let a = run(c.clone(), 20_000);
        let b = run(c, 20_000);
        let pattern = |v: &[Verdict]| {
            v.iter()
                .map(|v| matches!(v, Verdict::Drop(_)))
                .collect::<Vec<_>>()
        };
        assert!(pattern(&a) == pattern(&b), "same seed, same losses");
        let rate = lost(&a) as f64 / 20_000.0;
        assert!((0.09..0.11).contains(&rate), "{rate}");
    }

    #[test]
    fn links_with_one_config_lose_different_packets() {
        let t = t0();
        let c = Config {
            loss: 0.5,
            ..Config::default()
        };
        let mut a = Impairer::new(c.clone(), t, 1);
        let mut b = Impairer::new(c, t, 2);
        let same = (0..1000)
            .filter(|_| a.decide(t, 100, true) == b.decide(t, 100, true))
            .count();
        assert!(same < 700, "{same} of 1000 identical");
    }

    #[test]
    fn bursts_cluster_losses() {
        let v = run(
            Config {
                burst: Some(Burst {
                    p_enter: 0.01,
                    p_leave: 0.2,
                    loss_in_burst: 1.0,
                }),
                ..Config::default()
            },
            50_000,
        );
        let losses = lost(&v);
        let runs = v
            .windows(2)
            .filter(|w| !matches!(w[0], Verdict::Drop(_)) && matches!(w[1], Verdict::Drop(_)))
            .count();
        assert!(losses > 0 && runs > 0);
        let mean_run = losses as f64 / runs as f64;
        assert!(mean_run > 3.0, "bursts average {mean_run} packets");
    }

    #[test]
    fn outage_drops_only_inside_its_period() {
        let t = t0();
        let mut imp = Impairer::new(
            Config {
                outages: vec![Outage {
                    start_ms: 100,
                    duration_ms: 50,
                }],
                ..Config::default()
            },
            t,
            0,
        );
        let at = |ms| t + Duration::from_millis(ms);
        assert!(matches!(imp.decide(at(99), 1, true), Verdict::Send { .. }));
        assert_eq!(
            imp.decide(at(100), 1, true),
            Verdict::Drop(DropReason::Outage)
        );
        assert_eq!(
            imp.decide(at(149), 1, true),
            Verdict::Drop(DropReason::Outage)
        );
        assert!(matches!(imp.decide(at(150), 1, true), Verdict::Send { .. }));
    }

    #[test]
    fn data_only_spares_control() {
        let t = t0();
        let mut imp = Impairer::new(
            Config {
                loss: 1.0,
                data_only: true,
                ..Config::default()
            },
            t,
            0,
        );
        assert_eq!(imp.decide(t, 1, true), Verdict::Drop(DropReason::Loss));
        assert_eq!(imp.decide(t, 1, false), Verdict::Send { at: t, copies: 1 });
    }

    #[test]
    fn rate_cap_paces_then_drops() {
        let t = t0();
        // 1 Mbps: a 1250-byte packet takes 10 ms; the queue holds 100 ms.
        let mut imp = Impairer::new(
            Config {
                rate_bps: Some(1_000_000),
                ..Config::default()
            },
            t,
            0,
        );
        let mut sent = Vec::new();
        let mut dropped = 0;
        for _ in 0..20 {
            match imp.decide(t, 1250, true) {
                Verdict::Send { at, .. } => sent.push(at),
                Verdict::Drop(DropReason::RateCap) => dropped += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(sent.len(), 11);
        assert_eq!(dropped, 9);
        assert_eq!(sent[1] - sent[0], Duration::from_millis(10));
    }

    #[test]
    fn delay_and_jitter_bound_the_send_time() {
        let t = t0();
        let mut imp = Impairer::new(
            Config {
                delay_ms: 150,
                jitter_ms: 10,
                ..Config::default()
            },
            t,
            0,
        );
        for _ in 0..100 {
            let Verdict::Send { at, .. } = imp.decide(t, 1, true) else {
                panic!("nothing is lost")
            };
            let d = at - t;
            assert!(d >= Duration::from_millis(150) && d <= Duration::from_millis(160));
        }
    }

    #[test]
    fn validation() {
        assert!(
            Config {
                loss: 1.5,
                ..Config::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            Config {
                rate_bps: Some(0),
                ..Config::default()
            }
            .validate()
            .is_err()
        );
        let parsed: Config = toml::from_str("loss = 0.1\njitter_ms = 5\n").unwrap();
        assert_eq!(parsed.loss, 0.1);
        assert!(
            toml::from_str::<Config>("lose = 0.1").is_err(),
            "unknown fields are refused"
        );
    }
}
