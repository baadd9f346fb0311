//! braid-client: the viewer.
//!
//! Today a minimal viewer: it subscribes to one edge over UDP, refreshes every second,
//! writes the stream's bytes (MPEG-TS) to stdout or a file as they arrive, and reports what
//! it received. The viewers issue adds the playout buffer, TCP, the status line and the
//! control server.
//!
//! # Layout
//!
//! - [`Config`]: flags and TOML.
//! - [`run`]: subscribe, receive, write, report.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::wire::{Body, Codec, Header, Message, Subscription};
use braid_core::{NodeId, SeqNo, StreamId};
use braid_net::daemon::DaemonConfig;
use braid_net::udp::{Impairments, Socket};
use bytes::BytesMut;
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

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
    /// The edge to watch from.
    #[arg(long)]
    #[serde(default)]
    pub edge: Option<SocketAddr>,
    /// Stream id.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "default_stream")]
    pub stream: u32,
    /// The network key (a passphrase, or @file).
    #[arg(long, env = "BRAID_NETWORK_KEY", default_value = "")]
    #[serde(default)]
    pub network_key: String,
    /// Where the stream goes: `-` for stdout, or a file.
    #[arg(long, short, default_value = "-")]
    #[serde(default = "default_out")]
    pub out: PathBuf,
    /// Stop after this many seconds (0: until Ctrl-C).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub duration: f64,
    /// Give up with an error if no packet arrives within this many seconds.
    #[arg(long, default_value_t = 5.0)]
    #[serde(default = "default_start_timeout")]
    pub start_timeout: f64,
    /// Write the final stats as JSON to this file (`-` for stderr).
    #[arg(long)]
    #[serde(default)]
    pub stats_json: Option<PathBuf>,
    /// Local address to receive on.
    #[arg(long, default_value = "0.0.0.0:0")]
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Viewer id.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub id: u64,
}

fn default_stream() -> u32 {
    1
}
fn default_out() -> PathBuf {
    PathBuf::from("-")
}
fn default_start_timeout() -> f64 {
    5.0
}
fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

impl DaemonConfig for Config {
    const NAME: &'static str = "braid-client";

    fn file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn check(&self) -> bool {
        self.check
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.edge.is_none() {
            anyhow::bail!("no edge to watch from: give --edge ADDR");
        }
        braid_net::daemon::network_key(&self.network_key).context("--network-key")?;
        if self.start_timeout <= 0.0 || self.start_timeout.is_nan() || self.duration < 0.0 {
            anyhow::bail!("--start-timeout must be above zero and --duration not negative");
        }
        Ok(())
    }
}

/// What the viewer received.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Packets written out.
    pub packets: u64,
    /// Payload bytes written out.
    pub bytes: u64,
    /// First sequence number received.
    pub first_seq: Option<u64>,
    /// Last sequence number written.
    pub last_seq: Option<u64>,
    /// Sequence numbers missing between the first and the last.
    pub gaps: u64,
    /// Packets that arrived at or below the last written (dropped: already past).
    pub late_or_duplicate: u64,
    /// Packets that failed to decode.
    pub malformed: u64,
    /// Milliseconds from the subscription to the first packet.
    pub join_ms: Option<u64>,
}

/// Watches the stream until `--duration` passes, the edge refuses, or `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let edge = config.edge.context("no --edge")?;
    let codec = Codec::new(braid_net::daemon::network_key(&config.network_key)?);
    let mut socket =
        Socket::bind(config.bind, Impairments::default(), "client").context("binding")?;
    let mut out: Box<dyn Write> = if config.out.as_os_str() == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&config.out)
                .with_context(|| format!("creating {}", config.out.display()))?,
        ))
    };
    let stream = StreamId(config.stream);
    let started = Instant::now();
    let deadline =
        (config.duration > 0.0).then(|| started + Duration::from_secs_f64(config.duration));
    let start_deadline = started + Duration::from_secs_f64(config.start_timeout);
    let mut stats = Stats::default();
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    let mut rx = Vec::new();
    let mut buf = BytesMut::new();
    let node = NodeId(config.id);
    let mut result = Ok(());
    loop {
        let stop_at = deadline;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = async { match stop_at { Some(d) => tokio::time::sleep_until(d.into()).await, None => std::future::pending().await } } => break,
            _ = tokio::time::sleep_until(start_deadline.into()), if stats.packets == 0 => {
                result = Err(anyhow::anyhow!("no stream from edge {edge} within {} s (is stream {} published?)", config.start_timeout, config.stream));
                break;
            }
            _ = refresh.tick() => {
                let body = Body::Subscribe(Subscription { node, lease_ms: 3000 });
                buf.clear();
                codec.encode(&Message { header: Header { stream, ..Header::default() }, body }, &mut buf)?;
                socket.send(Instant::now(), edge, buf.split().freeze(), false);
                socket.flush();
            }
            res = socket.recv(&mut rx) => {
                res.context("receiving")?;
                for (_, bytes) in rx.drain(..) {
                    match codec.decode(bytes) {
                        Ok(Message { body: Body::Media(m), .. }) => {
                            let seq = m.seq;
                            if stats.last_seq.is_some_and(|l| seq <= SeqNo(l)) {
                                stats.late_or_duplicate += 1;
                                continue;
                            }
                            if let Some(l) = stats.last_seq {
                                stats.gaps += seq.0 - l - 1;
                            } else {
                                stats.first_seq = Some(seq.0);
                                stats.join_ms = Some(started.elapsed().as_millis() as u64);
                            }
                            stats.last_seq = Some(seq.0);
                            let payload = m.rtp.payload();
                            stats.packets += 1;
                            stats.bytes += payload.len() as u64;
                            out.write_all(&payload).context("writing the stream")?;
                        }
                        Ok(Message { body: Body::Error { text, .. }, .. }) => {
                            result = Err(anyhow::anyhow!("edge {edge} refused: {text}"));
                        }
                        Ok(_) => {}
                        Err(_) => stats.malformed += 1,
                    }
                }
                if result.is_err() {
                    break;
                }
            }
        }
    }
    out.flush().context("writing the stream")?;
    // Leave at once rather than let the lease lapse.
    buf.clear();
    let bye = Message {
        header: Header {
            stream,
            ..Header::default()
        },
        body: Body::Unsubscribe { node },
    };
    if codec.encode(&bye, &mut buf).is_ok() {
        socket.send(Instant::now(), edge, buf.split().freeze(), false);
        socket.flush();
    }
    if let Some(path) = &config.stats_json {
        let line = serde_json::to_string(&stats)?;
        if path.as_os_str() == "-" {
            eprintln!("{line}");
        } else {
            std::fs::write(path, line + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    result
}
