//! braid-capture: reads a live source, packetizes it as RTP (MPEG-TS payload, RFC 2250)
//! and pushes every packet to all the entry points it is given.
//!
//! # Layout
//!
//! - [`ts`]: what the capture reads of MPEG-TS, and the synthetic test stream.
//! - [`packetize`]: TS packets into RTP payloads, keyframes flagged (sans-IO).
//! - [`source`]: synthetic, file (paced by PCR), stdin and UDP sources.
//! - [`run`]: the daemon: publish with the stream key, number and send, report.

pub mod packetize;
pub mod source;
pub mod ts;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use braid_core::wire::rtp::{CLOCK_RATE_MP2T, Fields, PAYLOAD_TYPE_MP2T};
use braid_core::wire::{Body, Codec, Flags, Header, Message, Rtp};
use braid_core::{PathId, SeqNo, StreamId};
use braid_net::addr::PeerAddr;
use braid_net::daemon::DaemonConfig;
use braid_net::udp::{Impairments, Socket};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::packetize::Packetizer;
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
    /// The network key (a passphrase, or @file).
    #[arg(long, env = "BRAID_NETWORK_KEY", default_value = "")]
    #[serde(default)]
    pub network_key: String,
    /// Source: `synth`, a file path, `-` for stdin, or `udp://ADDR` (MPEG-TS or RTP).
    #[arg(long, default_value = "synth")]
    #[serde(default = "default_source")]
    pub source: String,
    /// Loop a file source.
    #[arg(long = "loop")]
    #[serde(default)]
    pub looped: bool,
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
fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

impl braid_net::daemon::DaemonConfig for Config {
    const NAME: &'static str = "braid-capture";

    fn file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn check(&self) -> bool {
        self.check
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
        braid_net::daemon::network_key(&self.network_key).context("--network-key")?;
        self.source.parse::<Spec>().map_err(anyhow::Error::msg)?;
        if !(1..=7).contains(&self.ts_per_rtp) {
            anyhow::bail!("--ts-per-rtp must be between 1 and 7");
        }
        if self.bitrate < 10_000 || self.fps == 0 || self.gop == 0 {
            anyhow::bail!(
                "the synthetic source needs --bitrate >= 10000, --fps and --gop above zero"
            );
        }
        self.impair.validate().map_err(anyhow::Error::msg)?;
        self.quic.validate().map_err(anyhow::Error::msg)?;
        self.tls.validate().map_err(anyhow::Error::msg)?;
        Ok(())
    }
}

/// Counters reported on the terminal and in JSON.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct Progress {
    packets: u64,
    bytes: u64,
    keyframes: u64,
    skipped_bytes: u64,
    entries_reachable: usize,
    entries: usize,
    bitrate_bps: u64,
}

/// Runs the capture until the source ends, `--duration` passes or `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let codec = Codec::new(braid_net::daemon::network_key(&config.network_key)?);
    let spec: Spec = config.source.parse().map_err(anyhow::Error::msg)?;
    let mut source = Source::open(
        &spec,
        SynthConfig {
            bitrate: config.bitrate,
            fps: config.fps,
            gop: config.gop,
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
    let stream = StreamId(config.stream);
    let mut packetizer = Packetizer::new(config.ts_per_rtp);
    // Sequence numbers start from the wall clock (10,000 per second), so a restarted
    // capture continues above where it stopped instead of going back.
    let start_seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_micros() / 100) as u64)
        .unwrap_or(0)
        & ((1 << 47) - 1);
    let mut seq = SeqNo(start_seq);
    let ssrc = config.stream.wrapping_mul(0x9e37_79b9) ^ (start_seq as u32);
    let started = Instant::now();
    let deadline =
        (config.duration > 0.0).then(|| started + Duration::from_secs_f64(config.duration));
    let mut publish_tick = tokio::time::interval(Duration::from_secs(1));
    // The publish message never changes: encode it once. It goes out before the first
    // packet, so no entry point sees media it cannot accept yet, then every second.
    let publish = {
        let msg = Message {
            header: Header {
                stream,
                path: PathId(0),
                flags: Flags::empty(),
            },
            body: Body::Publish {
                key: Bytes::from(config.stream_key.clone()),
            },
        };
        let mut buf = BytesMut::new();
        codec.encode(&msg, &mut buf)?;
        buf.freeze()
    };
    braid_net::daemon::start_quic(
        &mut socket,
        &config.quic,
        &config.tls,
        "capture",
        &config.entries,
    )?;
    for to in &config.entries {
        socket.send(Instant::now(), to.addr, publish.clone(), false);
    }
    socket.flush();
    publish_tick.tick().await;
    let mut last_ack: Vec<Option<Instant>> = vec![None; config.entries.len()];
    // Media waits (at most 3 s) for an entry point to accept the publish: over QUIC the
    // publish goes on a stream and media as datagrams, which could overtake it and be
    // refused as unpublished; the stream's first keyframe would be lost.
    let wait_until = Instant::now() + Duration::from_secs(3);
    let mut resend = tokio::time::interval(Duration::from_millis(250));
    while last_ack.iter().all(Option::is_none) {
        let mut v = Vec::new();
        let next_timeout = socket.next_timeout();
        tokio::select! {
            r = socket.recv(&mut v) => r.context("receiving")?,
            _ = tokio::time::sleep_until(wait_until.into()) => {
                tracing::warn!("no entry point accepted the stream within 3 s: sending anyway");
                break;
            }
            // An entry point not up yet, or a lost publish: ask again.
            _ = resend.tick() => {
                for to in &config.entries {
                    socket.send(Instant::now(), to.addr, publish.clone(), false);
                }
                socket.flush();
            }
            _ = braid_net::daemon::sleep_until(next_timeout) => socket.handle_timeout(Instant::now()),
        }
        for (from, bytes) in v {
            if let Ok(Message {
                body: Body::Keepalive(_),
                ..
            }) = codec.decode(bytes)
            {
                if let Some(i) = config.entries.iter().position(|e| e.addr == from) {
                    last_ack[i] = Some(Instant::now());
                }
            }
        }
    }
    let mut progress = Progress {
        entries: config.entries.len(),
        ..Default::default()
    };
    let mut last_report = (Instant::now(), 0u64);
    let mut rx = Vec::new();
    let mut out = BytesMut::with_capacity(2048);
    let mut discontinuity = true;
    let tty = std::io::stderr().is_terminal();

    braid_net::daemon::print_ready("capture", &[("udp", socket.local_addr()?.to_string())]);
    loop {
        let until_deadline = braid_net::daemon::sleep_until(deadline);
        let next_timeout = socket.next_timeout();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = until_deadline => break,
            piece = source.next() => {
                let Some(piece) = piece? else {
                    tracing::info!("source ended");
                    break;
                };
                discontinuity |= piece.discontinuity;
                packetizer.handle_input(&piece.bytes);
                packetizer.flush();
                let now = Instant::now();
                while let Some(chunk) = packetizer.poll_output() {
                    let ts = (now.duration_since(started).as_micros() as u64 * u64::from(CLOCK_RATE_MP2T) / 1_000_000) as u32;
                    let rtp = Rtp::build(Fields { marker: chunk.keyframe, payload_type: PAYLOAD_TYPE_MP2T, seq: seq.low(), timestamp: ts, ssrc }, &chunk.payload);
                    let flags = Flags::empty().with(Flags::KEYFRAME, chunk.keyframe).with(Flags::DISCONTINUITY, discontinuity);
                    discontinuity = false;
                    out.clear();
                    codec.encode_media(Header { stream, path: PathId(0), flags }, seq, &rtp, &mut out)?;
                    let datagram: Bytes = out.split().freeze();
                    for to in &config.entries {
                        socket.send(now, to.addr, datagram.clone(), true);
                    }
                    if let Some(f) = tee.as_mut() {
                        f.write_all(&chunk.payload).context("writing the tee file")?;
                    }
                    progress.packets += 1;
                    progress.bytes += chunk.payload.len() as u64;
                    seq = seq.next();
                }
                socket.flush();
                let s = packetizer.stats();
                progress.keyframes = s.keyframes;
                progress.skipped_bytes = s.skipped_bytes;
            }
            _ = publish_tick.tick() => {
                let now = Instant::now();
                for to in &config.entries {
                    socket.send(now, to.addr, publish.clone(), false);
                }
                socket.flush();
                progress.entries_reachable = last_ack.iter().filter(|a| a.is_some_and(|t| now.duration_since(t) < Duration::from_secs(3))).count();
                let (t0, b0) = last_report;
                progress.bitrate_bps = ((progress.bytes - b0) as f64 * 8.0 / now.duration_since(t0).as_secs_f64().max(1e-3)) as u64;
                last_report = (now, progress.bytes);
                report(&progress, tty, stats_out.as_mut())?;
            }
            res = socket.recv(&mut rx) => {
                res.context("receiving")?;
                for (from, bytes) in rx.drain(..) {
                    match codec.decode(bytes) {
                        Ok(Message { body: Body::Keepalive(_), .. }) => {
                            if let Some(i) = config.entries.iter().position(|e| e.addr == from) {
                                last_ack[i] = Some(Instant::now());
                            }
                        }
                        Ok(Message { body: Body::Error { code, text }, .. }) => {
                            tracing::error!("entry point {from} refused the stream (code {}): {text}", code.0);
                            metrics::counter!("braid_capture_refused_total").increment(1);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            metrics::counter!("braid_dropped_total", "role" => "capture", "reason" => e.reason()).increment(1);
                        }
                    }
                }
            }
            _ = braid_net::daemon::sleep_until(next_timeout) => {
                socket.handle_timeout(Instant::now());
            }
        }
    }
    packetizer.flush();
    socket.flush();
    if tty {
        eprintln!();
    }
    report(&progress, false, stats_out.as_mut())?;
    tracing::info!(
        packets = progress.packets,
        bytes = progress.bytes,
        "capture stopped"
    );
    Ok(())
}

fn report(p: &Progress, tty: bool, json: Option<&mut Box<dyn Write + Send>>) -> anyhow::Result<()> {
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
