//! braid-client: the viewer.
//!
//! It watches a stream on an edge, over QUIC, UDP or TCP, and writes the stream's bytes
//! (MPEG-TS) to stdout or a file, so `braid-client ... | ffplay -` plays it.
//!
//! # Layout
//!
//! - [`Config`]: flags and TOML.
//! - [`session`]: every decision, sans-IO ([`Session`]): the watch protocol, the
//!   playout buffer with its repairs, the detectors, switching without loss.
//! - [`continuity`]: one valid MPEG-TS across changes of rendition.
//! - [`control`]: assignment, switch requests and feedback to the control servers.
//! - [`run`]: the daemon: owns the sockets (UDP with QUIC attached, or a TCP connection),
//!   the clock, the output and the HTTP to the control servers, and feeds the session.
//!
//! With `--control`, the client asks a control server for a primary edge and a secondary
//! set, watches the primary with the core's detectors (rate drop, stall, gaps, disorder),
//! and on trouble, or when the edge signals a drain, asks for an edge of the other set
//! and resumes there at the first sequence number it does not have: the buffer drops what
//! it already holds and fills what it lacks, so the output goes on with no gap and no
//! duplicate. With no control server answering it goes straight to a candidate of the
//! secondary set. It asks again every `--reask-secs` and moves when a candidate is
//! better by `--better-margin`.

pub mod continuity;
pub mod control;
mod daemon;
pub mod session;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use braid_core::detect::Config as DetectConfig;
use braid_core::{Bitrate, NodeId, SeqNo, StreamId};
use braid_net::addr::PeerAddr;
use braid_net::daemon::DaemonConfig;
use bytes::Bytes;
use clap::Parser;
use serde::{Deserialize, Serialize};

pub use daemon::run;
pub use session::{Session, Stats, SwitchStat};

/// How the client reaches its edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC when the edge offers it, else UDP; the default.
    Auto,
    /// QUIC only: encrypted, the edge authenticated, NAT-friendly; media as datagrams.
    /// Refuses to start on an edge that offers no QUIC address.
    Quic,
    /// UDP: plain Braid datagrams.
    Udp,
    /// TCP: for networks that pass no UDP.
    Tcp,
}

impl Transport {
    /// Whether media comes as datagrams (UDP or QUIC): repairs by NACK, make before break.
    fn datagrams(self) -> bool {
        self != Transport::Tcp
    }

    fn name(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Quic => "quic",
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// The client's configuration.
#[derive(Debug, Clone, Parser, Deserialize, Serialize)]
#[command(
    name = "braid-client",
    version,
    about = "Watch a Braid stream: writes MPEG-TS to stdout or a file"
)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TOML config file; flags given as well override it.
    #[arg(long)]
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    #[serde(default)]
    pub check: bool,
    /// Log JSON lines (one object per event, for log collectors) instead of text.
    #[arg(long)]
    #[serde(default)]
    pub log_json: bool,
    /// The edge to watch from: `ADDR` (UDP or TCP) or `quic://ADDR` (its QUIC address).
    #[arg(long)]
    #[serde(default)]
    pub edge: Option<PeerAddr>,
    /// auto (QUIC when the edge offers it, else UDP), quic, udp or tcp.
    #[arg(long, value_enum, default_value = "auto")]
    #[serde(default = "default_transport")]
    pub transport: Transport,
    /// Stream id.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "default_stream")]
    pub stream: u32,
    /// Where the stream goes: `-` for stdout, or a file.
    #[arg(long, short, default_value = "-")]
    #[serde(default = "default_out")]
    pub out: PathBuf,
    /// How long a missing packet is waited for (and asked again for) before it is given
    /// up, ms; the first packet waits this long too, filling the buffer. The default
    /// holds a switch away from a failing edge: a stall is noticed after 150 ms (12
    /// packet gaps on a sparse stream, 500 ms at most), the viewer moves at once to a
    /// candidate it knows, and a warm edge answers within a round trip or two.
    #[arg(long, default_value_t = 500)]
    #[serde(default = "default_buffer_ms")]
    pub buffer_ms: u64,
    /// Start at this sequence number instead of the latest keyframe.
    #[arg(long)]
    #[serde(default)]
    pub resume_seq: Option<u64>,
    /// Stop after this many seconds (0: until Ctrl-C).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub duration: f64,
    /// Give up with an error if no packet arrives within this many seconds (default 8: a
    /// first edge that says nothing is left after 3 s, and the next one may have to wait
    /// for a keyframe).
    #[arg(long, default_value_t = 8.0)]
    #[serde(default = "default_start_timeout")]
    pub start_timeout: f64,
    /// Write stats as JSON lines to this file (`-` for stderr): one a second and a final one.
    #[arg(long)]
    #[serde(default)]
    pub stats_json: Option<PathBuf>,
    /// Local address to receive on (UDP).
    #[arg(long, default_value = "0.0.0.0:0")]
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// On a ladder of renditions: never above this nominal rate, kbit/s (0: no ceiling).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub max_kbps: u64,
    /// On a ladder of renditions: always the highest under `--max-kbps`, whatever the
    /// measured speed.
    #[arg(long)]
    #[serde(default)]
    pub pin: bool,
    /// Viewer id.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub id: u64,
    /// Control servers (repeatable), `http://host:port`; tried in order.
    #[arg(long = "control")]
    #[serde(default)]
    pub controls: Vec<String>,
    /// The viewer's token.
    #[arg(long, env = "BRAID_TOKEN", default_value = "")]
    #[serde(default)]
    pub token: String,
    /// The viewer's region, for the assignment.
    #[arg(long, default_value = "")]
    #[serde(default)]
    pub region: String,
    /// Time a small request to each candidate edge and watch the fastest of the primary's
    /// set; the timings go back to the control server.
    #[arg(long)]
    #[serde(default)]
    pub probe: bool,
    /// Ask the control server again this often, seconds (0: never).
    #[arg(long, default_value_t = 30.0)]
    #[serde(default = "default_reask")]
    pub reask_secs: f64,
    /// Move on a re-ask when a candidate's weight beats the current edge's by this share.
    #[arg(long, default_value_t = 0.5)]
    #[serde(default = "default_margin")]
    pub better_margin: f64,
    /// The stream's nominal bit rate, for the rate-drop detector (0: learned).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub nominal_bps: u64,
    /// Buffer-aware moves (with a control server): once the player's buffer (media
    /// written less time played) held at least this much for `--cheap-after-secs`, ask
    /// for an edge of a lower cost tier, ms (0: never). A viewer that starts further from
    /// live (`--buffer-ms`) has more to spare.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub cheap_above_ms: u64,
    /// ... and under this much (for 0.5 s), back to a fast edge, ms.
    #[arg(long, default_value_t = 1000)]
    #[serde(default = "default_fast_below_ms")]
    pub fast_below_ms: u64,
    /// How long the buffer must stay above `--cheap-above-ms` before a move, s.
    #[arg(long, default_value_t = 10.0)]
    #[serde(default = "default_cheap_after_secs")]
    pub cheap_after_secs: f64,
    /// Silence that counts as a stall, ms.
    #[arg(long, default_value_t = 500)]
    #[serde(default = "default_stall_ms")]
    pub stall_ms: u64,
    /// Stop reading the network for this many seconds after this many seconds (testing a
    /// stalled viewer): `AT:FOR`.
    #[arg(long, hide = true)]
    #[serde(default)]
    pub stall: Option<String>,
    /// QUIC options.
    #[command(flatten)]
    #[serde(default)]
    pub quic: braid_net::quic::Options,
    /// TLS for QUIC: whom to trust (a CA or a pinned edge certificate; the system's roots
    /// when neither is given).
    #[command(flatten)]
    #[serde(default)]
    pub tls: braid_net::tls::Tls,
}

fn default_fast_below_ms() -> u64 {
    1000
}
fn default_cheap_after_secs() -> f64 {
    10.0
}
fn default_transport() -> Transport {
    Transport::Auto
}
fn default_stream() -> u32 {
    1
}
fn default_out() -> PathBuf {
    PathBuf::from("-")
}
fn default_buffer_ms() -> u64 {
    500
}
fn default_start_timeout() -> f64 {
    8.0
}
fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn default_reask() -> f64 {
    30.0
}
fn default_margin() -> f64 {
    0.5
}
fn default_stall_ms() -> u64 {
    500
}

impl DaemonConfig for Config {
    const NAME: &'static str = "braid-client";

    fn file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn check(&self) -> bool {
        self.check
    }

    fn log_json(&self) -> bool {
        self.log_json
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.edge.is_none() && self.controls.is_empty() {
            anyhow::bail!("no edge to watch from: give --control URL (or --edge ADDR)");
        }
        if self.stall_ms < 100 || self.reask_secs < 0.0 || self.better_margin < 0.0 {
            anyhow::bail!(
                "--stall-ms must be at least 100, --reask-secs and --better-margin not negative"
            );
        }
        if self.start_timeout <= 0.0 || self.start_timeout.is_nan() || self.duration < 0.0 {
            anyhow::bail!("--start-timeout must be above zero and --duration not negative");
        }
        if !(20..=10_000).contains(&self.buffer_ms) {
            anyhow::bail!("--buffer-ms must be between 20 and 10000");
        }
        if let Some(p) = self.placement() {
            p.validate().map_err(|e| {
                anyhow::anyhow!("{e} (--cheap-above-ms, --fast-below-ms, --cheap-after-secs)")
            })?;
            if self.controls.is_empty() {
                anyhow::bail!(
                    "--cheap-above-ms needs a control server (--control): it picks the cheap edge"
                );
            }
        }
        self.stall_at()?;
        self.quic.validate().map_err(anyhow::Error::msg)?;
        self.tls.validate().map_err(anyhow::Error::msg)?;
        if self.quic.listen.is_some() {
            anyhow::bail!(
                "--quic-listen is for daemons that take connections: a client dials its edge"
            );
        }
        if self.edge.is_some_and(|e| e.is_quic())
            && !matches!(self.transport, Transport::Auto | Transport::Quic)
        {
            anyhow::bail!("--edge quic://… wants --transport quic (or auto)");
        }
        Ok(())
    }
}

impl Config {
    /// What the session decides with.
    pub fn session(&self) -> session::Config {
        session::Config {
            stream: StreamId(self.stream),
            policy: (self.max_kbps > 0 || self.pin).then_some(braid_core::speed::Policy {
                ceiling: (self.max_kbps > 0).then_some(self.max_kbps.saturating_mul(1000)),
                pinned: self.pin,
            }),
            id: NodeId(self.id),
            token: Bytes::from(self.token.clone()),
            datagrams: self.transport.datagrams(),
            buffer: Duration::from_millis(self.buffer_ms),
            resume_seq: self.resume_seq.map(SeqNo),
            duration: (self.duration > 0.0).then(|| Duration::from_secs_f64(self.duration)),
            start_timeout: Duration::from_secs_f64(self.start_timeout),
            control: !self.controls.is_empty(),
            edge: self.edge.map(|e| e.addr),
            probe: self.probe,
            reask: (self.reask_secs > 0.0).then(|| Duration::from_secs_f64(self.reask_secs)),
            better_margin: self.better_margin,
            detect: DetectConfig {
                nominal_bitrate: (self.nominal_bps > 0).then_some(Bitrate(self.nominal_bps)),
                stall: Duration::from_millis(self.stall_ms),
                ..DetectConfig::default()
            },
            control_timeout: control::TIMEOUT,
            placement: self.placement(),
        }
    }

    /// Buffer-aware moves, when asked for.
    fn placement(&self) -> Option<braid_core::playout::PlacementConfig> {
        let hold = self.cheap_after_secs;
        (self.cheap_above_ms > 0).then(|| braid_core::playout::PlacementConfig {
            high: Duration::from_millis(self.cheap_above_ms),
            low: Duration::from_millis(self.fast_below_ms),
            hold: Duration::try_from_secs_f64(hold).unwrap_or(Duration::ZERO),
            ..braid_core::playout::PlacementConfig::default()
        })
    }

    fn stall_at(&self) -> anyhow::Result<Option<(f64, f64)>> {
        let Some(s) = &self.stall else {
            return Ok(None);
        };
        let (a, b) = s.split_once(':').context("--stall takes AT:FOR seconds")?;
        Ok(Some((a.parse()?, b.parse()?)))
    }
}
