//! braid-capture: reads a live source, packetizes it as RTP (MPEG-TS payload, RFC 2250)
//! and pushes every packet to all the entry points it is given.
//!
//! # Layout
//!
//! - [`ts`]: what the capture reads of MPEG-TS, and the synthetic test stream.
//! - [`packetize`]: TS packets into RTP payloads, keyframes flagged (sans-IO).
//! - [`source`]: synthetic, file (paced by PCR), stdin and UDP sources.
//! - [`machine`]: the decisions, sans-IO ([`Capture`]): publish with the stream key,
//!   when media may flow, numbering, the same datagram to every entry point.
//! - [`run`]: the daemon: owns the source, the socket, the clock and the tee.

pub mod machine;
pub mod packetize;
pub mod source;
pub mod ts;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::StreamId;
use braid_core::node::{Output, Peer, WallClock};
use braid_net::addr::PeerAddr;
use braid_net::daemon::DaemonConfig;
use braid_net::udp::{Impairments, Socket};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use crate::machine::{Capture, Event, Input, Progress};
use crate::source::{Source, Spec};
use crate::ts::SynthConfig;

/// The capture's configuration: flags, or a TOML file (`--config`) with flags on top.
#[derive(Debug, Clone, Parser, Deserialize, Serialize)]
#[command(
    name = "braid-capture",
    version,
    about = "Push a live MPEG-TS source into a Braid network"
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
    /// Entry points to push to (give two, for redundancy): `ADDR` or `udp://ADDR` over
    /// UDP, `quic://ADDR` over QUIC.
    #[arg(long = "entry", required = false)]
    #[serde(default)]
    pub entries: Vec<PeerAddr>,
    /// Stream id.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "default_stream")]
    pub stream: u32,
    /// The stream key the entry points expect.
    #[arg(long, env = "BRAID_STREAM_KEY", default_value = "")]
    #[serde(default)]
    pub stream_key: String,
    /// Source: `synth`, a file path, `-` for stdin, or `udp://ADDR` (MPEG-TS or RTP).
    #[arg(long, default_value = "synth")]
    #[serde(default = "default_source")]
    pub source: String,
    /// Loop a file source.
    #[arg(long = "loop")]
    #[serde(default)]
    pub looped: bool,
    /// Synthetic source: number frames from the wall clock and put keyframes on its
    /// multiples of the group of pictures, so captures of a ladder's renditions (one per
    /// rendition, on synchronised clocks) make aligned keyframes with equal time stamps.
    #[arg(long)]
    #[serde(default)]
    pub align: bool,
    /// Synthetic source bit rate, bits per second.
    #[arg(long, default_value_t = 4_000_000)]
    #[serde(default = "default_bitrate")]
    pub bitrate: u64,
    /// Synthetic source frames per second.
    #[arg(long, default_value_t = 25)]
    #[serde(default = "default_fps")]
    pub fps: u32,
    /// Synthetic source frames per keyframe.
    #[arg(long, default_value_t = 50)]
    #[serde(default = "default_gop")]
    pub gop: u32,
    /// TS packets per RTP packet (1 to 7).
    #[arg(long, default_value_t = 7)]
    #[serde(default = "default_ts_per_rtp")]
    pub ts_per_rtp: usize,
    /// HLS segments span at least this much, ms: the capture numbers the keyframe that
    /// starts each, so that every edge cuts and numbers them alike (100 to 60000).
    #[arg(long, default_value_t = 1000)]
    #[serde(default = "default_segment_ms")]
    pub segment_ms: u64,
    /// Stop after this many seconds (0: run until the source ends or a signal).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub duration: f64,
    /// Write every TS byte sent to this file too (to compare with what viewers get).
    #[arg(long)]
    #[serde(default)]
    pub tee: Option<PathBuf>,
    /// Write a JSON stats line every second to this file (`-` for stdout).
    #[arg(long)]
    #[serde(default)]
    pub stats_json: Option<PathBuf>,
    /// Prometheus metrics endpoint (what the source lost before the capture, refusals).
    #[arg(long, default_value = "127.0.0.1:0")]
    #[serde(default = "default_metrics")]
    pub metrics: SocketAddr,
    /// Local address to send from.
    #[arg(long, default_value = "0.0.0.0:0")]
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Impairment of the links to the entry points (TOML only).
    #[arg(skip)]
    #[serde(default)]
    pub impair: Impairments,
    /// QUIC options (for entry points reached over QUIC).
    #[command(flatten)]
    #[serde(default)]
    pub quic: braid_net::quic::Options,
    /// TLS for QUIC: whom to trust (and a certificate, if entry points ask for one).
    #[command(flatten)]
    #[serde(default)]
    pub tls: braid_net::tls::Tls,
}

fn default_stream() -> u32 {
    1
}
fn default_source() -> String {
    "synth".into()
}
fn default_bitrate() -> u64 {
    4_000_000
}
fn default_fps() -> u32 {
    25
}
fn default_gop() -> u32 {
    50
}
fn default_ts_per_rtp() -> usize {
    7
}
fn default_segment_ms() -> u64 {
    1000
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

impl Config {
    /// What the capture's machine decides with.
    pub fn machine(&self) -> machine::Config {
        machine::Config {
            stream: StreamId(self.stream),
            key: self.stream_key.clone(),
            entries: self.entries.iter().map(|e| e.addr).collect(),
            ts_per_rtp: self.ts_per_rtp,
            segment: Duration::from_millis(self.segment_ms),
        }
    }
}

impl braid_net::daemon::DaemonConfig for Config {
    const NAME: &'static str = "braid-capture";

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
        if self.entries.is_empty() {
            anyhow::bail!("no entry point: give at least one --entry ADDR (two for redundancy)");
        }
        if self.stream_key.is_empty() {
            anyhow::bail!("no stream key: give --stream-key or set BRAID_STREAM_KEY");
        }
        if self.stream_key.len() > braid_core::wire::MAX_STREAM_KEY {
            anyhow::bail!(
                "the stream key is longer than {} bytes",
                braid_core::wire::MAX_STREAM_KEY
            );
        }
        self.source.parse::<Spec>().map_err(anyhow::Error::msg)?;
        if !(1..=7).contains(&self.ts_per_rtp) {
            anyhow::bail!("--ts-per-rtp must be between 1 and 7");
        }
        if !(100..=60_000).contains(&self.segment_ms) {
            anyhow::bail!("--segment-ms must be between 100 and 60000");
        }
        if self.bitrate < 10_000 || self.fps == 0 || self.gop == 0 {
            anyhow::bail!(
                "the synthetic source needs --bitrate >= 10000, --fps and --gop above zero"
            );
        }
        self.impair.validate().map_err(anyhow::Error::msg)?;
        self.quic.validate().map_err(anyhow::Error::msg)?;
        self.tls.validate().map_err(anyhow::Error::msg)?;
        if self.quic.listen.is_some() && !self.tls.has_identity() {
            anyhow::bail!(
                "quic.listen needs a certificate: give tls.cert and tls.key (--tls-cert, --tls-key)"
            );
        }
        Ok(())
    }
}

/// Runs the capture until the source ends, `--duration` passes or `shutdown` fires.
#[allow(clippy::disallowed_methods)] // The daemon owns the clock.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let spec: Spec = config.source.parse().map_err(anyhow::Error::msg)?;
    let mut source = Source::open(
        &spec,
        SynthConfig {
            bitrate: config.bitrate,
            fps: config.fps,
            gop: config.gop,
            // Milliseconds of the wall clock: another run makes other bytes.
            run: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u32),
            align: config.align,
        },
        config.looped,
    )
    .await?;
    let mut socket = Socket::bind(config.bind, config.impair.clone(), "capture")
        .with_context(|| format!("binding {}", config.bind))?;
    let mut tee = match &config.tee {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => None,
    };
    let mut stats_out: Option<Box<dyn Write + Send>> = match &config.stats_json {
        Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout())),
        Some(p) => Some(Box::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    braid_net::daemon::start_quic(
        &mut socket,
        &config.quic,
        &config.tls,
        "capture",
        &config.entries,
    )?;
    let metrics_addr = braid_net::daemon::serve_metrics(config.metrics, shutdown.clone()).await?;
    let started = Instant::now();
    let deadline =
        (config.duration > 0.0).then(|| started + Duration::from_secs_f64(config.duration));
    let clock = WallClock::new(started, braid_net::daemon::unix_ms());
    let mut capture = Capture::new(config.machine(), clock, started)?;
    let tty = std::io::stderr().is_terminal();
    let mut ready = false;
    let mut rx = Vec::new();
    // What the source had lost at the last report.
    let mut input_lost = (0, 0);
    loop {
        // Send what the capture queued; announce readiness once media may flow.
        let wake = loop {
            match capture.poll_output() {
                Output::Transmit(t) => {
                    if let Peer::Addr(to) = t.to {
                        socket.send(Instant::now(), to, t.datagram, t.data);
                    }
                }
                Output::Event(Event::Sent { payload, .. }) => {
                    if let Some(f) = tee.as_mut() {
                        f.write_all(&payload).context("writing the tee file")?;
                    }
                }
                Output::Event(Event::Refused { from, text }) => {
                    tracing::error!("entry point {from} refused the stream: {text}");
                    metrics::counter!("braid_capture_refused_total").increment(1);
                }
                Output::Event(Event::Progress) => {
                    let p = capture.progress();
                    let lost = (p.input_rtp_lost, p.input_ts_missing);
                    if lost.0 > input_lost.0 || lost.1 > input_lost.1 {
                        tracing::warn!(
                            "the source lost {} RTP datagrams and {} TS packets before reaching \
                             the capture in the last second (its link, or the capture's receive \
                             buffer): viewers get the stream as damaged",
                            lost.0.saturating_sub(input_lost.0),
                            lost.1.saturating_sub(input_lost.1)
                        );
                    }
                    input_lost = lost;
                    report(&p, tty, stats_out.as_mut())?
                }
                Output::Timeout(t) => break t,
            }
        };
        socket.flush();
        if !ready && capture.wants_media() {
            ready = true;
            if !capture.accepted() {
                tracing::warn!("no entry point accepted the stream within 3 s: sending anyway");
            }
            braid_net::daemon::print_ready(
                "capture",
                &[
                    ("udp", socket.local_addr()?.to_string()),
                    ("metrics", metrics_addr.to_string()),
                ],
            );
        }
        let wake = match (wake, socket.next_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let wants_media = capture.wants_media();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // The run ends at its deadline once it is under way (at most 3 s of waiting
            // for the entry points come first, as a supervisor waits for the ready line).
            _ = braid_net::daemon::sleep_until(deadline), if ready => break,
            piece = source.next(), if wants_media || source.is_live() => {
                let Some(piece) = piece? else {
                    tracing::info!("source ended");
                    break;
                };
                capture.handle_input(Instant::now(), Input::Source { bytes: piece.bytes, discontinuity: piece.discontinuity, rtp_lost: piece.rtp_lost });
            }
            _ = braid_net::daemon::sleep_until(wake) => {
                let now = Instant::now();
                socket.handle_timeout(now);
                capture.handle_timeout(now);
            }
            res = socket.recv(&mut rx) => {
                res.context("receiving")?;
                let now = Instant::now();
                for (from, datagram) in rx.drain(..) {
                    capture.handle_input(now, Input::Received { from, datagram });
                }
            }
        }
    }
    socket.flush();
    if tty {
        eprintln!();
    }
    let progress = capture.progress();
    report(&progress, false, stats_out.as_mut())?;
    tracing::info!(
        packets = progress.packets,
        bytes = progress.bytes,
        "capture stopped"
    );
    Ok(())
}

fn report(p: &Progress, tty: bool, json: Option<&mut Box<dyn Write + Send>>) -> anyhow::Result<()> {
    // What the source lost before the capture, counted where an operator looks.
    metrics::counter!("braid_capture_input_lost_total", "kind" => "rtp_datagrams")
        .absolute(p.input_rtp_lost);
    metrics::counter!("braid_capture_input_lost_total", "kind" => "ts_packets")
        .absolute(p.input_ts_missing);
    metrics::counter!("braid_capture_input_dropped_bytes_total", "reason" => "before_start")
        .absolute(p.input_before_start);
    metrics::counter!("braid_capture_input_continuity_errors_total")
        .absolute(p.input_continuity_errors);
    metrics::counter!("braid_capture_segments_total").absolute(p.segments);
    if tty {
        eprint!(
            "\rcapture: {:>8.2} Mbps  {:>9} packets  {:>5} keyframes  entry points reachable {}/{}   ",
            p.bitrate_bps as f64 / 1e6,
            p.packets,
            p.keyframes,
            p.entries_reachable,
            p.entries
        );
    }
    if let Some(out) = json {
        writeln!(out, "{}", serde_json::to_string(p)?)?;
        out.flush()?;
    }
    Ok(())
}
