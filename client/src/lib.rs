//! braid-client: the viewer.
//!
//! It watches a stream on an edge, over UDP (default) or TCP, and writes the stream's
//! bytes (MPEG-TS) to stdout or a file, so `braid-client ... | ffplay -` plays it.
//!
//! - **Watch protocol**: a watch message starts the stream (at the latest keyframe, or at
//!   a sequence number to resume), and is repeated every 250 ms or 32 packets as the
//!   lease refresh and acknowledgement that opens the edge's flow window.
//! - **Buffer**: packets pass through a [`braid_core::merge::Buffer`] on one path: it puts
//!   reordered packets back in order, asks the edge again for a missing one (UDP), and
//!   gives up a packet as a gap after `--buffer-ms`. The first packet is held that long
//!   too, which fills the buffer before anything is written.
//! - **Reporting**: a status line on a terminal, JSON stats lines on request, a clear
//!   message and a non-zero exit when it cannot get the stream or the edge refuses.
//!
//! # Layout
//!
//! - [`Config`]: flags and TOML.
//! - [`run`]: the viewer's one task.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::merge::{self, Output};
use braid_core::wire::{Body, Codec, Header, Message, NoticeKind, SeqRange, Watch, WatchStart};
use braid_core::{Bitrate, DataSize, NodeId, PathId, SeqNo, StreamId};
use braid_net::daemon::DaemonConfig;
use braid_net::udp::{Impairments, Socket};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How the client reaches its edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP: lowest latency; the default.
    Udp,
    /// TCP: for networks that pass no UDP.
    Tcp,
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
    /// The edge to watch from.
    #[arg(long)]
    #[serde(default)]
    pub edge: Option<SocketAddr>,
    /// UDP or TCP.
    #[arg(long, value_enum, default_value = "udp")]
    #[serde(default = "default_transport")]
    pub transport: Transport,
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
    /// How long a missing packet is waited for (and asked again for) before it is given
    /// up, ms; the first packet waits this long too, filling the buffer.
    #[arg(long, default_value_t = 300)]
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
    /// Give up with an error if no packet arrives within this many seconds.
    #[arg(long, default_value_t = 5.0)]
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
    /// Viewer id.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub id: u64,
    /// Stop reading the network for this many seconds after this many seconds (testing a
    /// stalled viewer): `AT:FOR`.
    #[arg(long, hide = true)]
    #[serde(default)]
    pub stall: Option<String>,
}

fn default_transport() -> Transport {
    Transport::Udp
}
fn default_stream() -> u32 {
    1
}
fn default_out() -> PathBuf {
    PathBuf::from("-")
}
fn default_buffer_ms() -> u64 {
    300
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
        if !(20..=10_000).contains(&self.buffer_ms) {
            anyhow::bail!("--buffer-ms must be between 20 and 10000");
        }
        self.stall_at()?;
        Ok(())
    }
}

impl Config {
    fn stall_at(&self) -> anyhow::Result<Option<(f64, f64)>> {
        let Some(s) = &self.stall else {
            return Ok(None);
        };
        let (a, b) = s.split_once(':').context("--stall takes AT:FOR seconds")?;
        Ok(Some((a.parse()?, b.parse()?)))
    }
}

/// What the viewer received; written as JSON.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    /// The edge.
    pub edge: String,
    /// UDP or TCP.
    pub transport: String,
    /// Packets written out.
    pub packets: u64,
    /// Payload bytes written out.
    pub bytes: u64,
    /// First sequence number written.
    pub first_seq: Option<u64>,
    /// Last sequence number written.
    pub last_seq: Option<u64>,
    /// Sequence numbers given up after the buffer (gaps in the output).
    pub gaps: u64,
    /// Of those, packets the edge said it skipped (this viewer fell behind).
    pub skipped: u64,
    /// Skip events.
    pub skips: u64,
    /// Copies dropped as duplicates or too late.
    pub late_or_duplicate: u64,
    /// Asks for a missing packet sent to the edge.
    pub nacks: u64,
    /// Missing packets that the edge sent again in time.
    pub repaired: u64,
    /// Packets that failed to decode.
    pub malformed: u64,
    /// Milliseconds from the first watch message to the first packet received.
    pub join_ms: Option<u64>,
    /// Milliseconds from the first watch message to the first packet written.
    pub first_output_ms: Option<u64>,
    /// Bit rate written out over the last second.
    pub bitrate_bps: u64,
    /// Packets held in the buffer.
    pub buffered: usize,
    /// Whether this is the last line.
    pub done: bool,
}

enum Link {
    Udp {
        socket: Box<Socket>,
        edge: SocketAddr,
    },
    Tcp {
        writer: tokio::net::tcp::OwnedWriteHalf,
        rx: mpsc::Receiver<Bytes>,
    },
}

/// Watches the stream until `--duration` passes, the edge refuses, or `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let edge = config.edge.context("no --edge")?;
    let codec = Codec::new(braid_net::daemon::network_key(&config.network_key)?);
    let mut link = match config.transport {
        Transport::Udp => Link::Udp {
            socket: Box::new(
                Socket::bind(config.bind, Impairments::default(), "client").context("binding")?,
            ),
            edge,
        },
        Transport::Tcp => {
            let stream = tokio::net::TcpStream::connect(edge)
                .await
                .with_context(|| format!("connecting to edge {edge} over TCP"))?;
            let _ = stream.set_nodelay(true);
            let (mut rd, writer) = stream.into_split();
            let (tx, rx) = mpsc::channel(1024);
            tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(64 * 1024);
                loop {
                    match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    while buf.len() >= 2 {
                        let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                        if buf.len() < 2 + len {
                            break;
                        }
                        let _ = buf.split_to(2);
                        if tx.send(buf.split_to(len).freeze()).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Link::Tcp { writer, rx }
        }
    };
    let mut out: Box<dyn Write> = if config.out.as_os_str() == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&config.out)
                .with_context(|| format!("creating {}", config.out.display()))?,
        ))
    };
    let mut stats_out: Option<Box<dyn Write>> = match &config.stats_json {
        Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stderr())),
        Some(p) => Some(Box::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let window = Duration::from_millis(config.buffer_ms);
    let mut buffer: merge::Buffer<Bytes> = merge::Buffer::new(merge::Config {
        reorder_window: window,
        nack: config.transport == Transport::Udp,
        nack_delay: (window / 10).max(Duration::from_millis(5)),
        nack_retry: (window / 5).max(Duration::from_millis(10)),
        ..merge::Config::default()
    })?;
    let stream = StreamId(config.stream);
    let started = Instant::now();
    let deadline =
        (config.duration > 0.0).then(|| started + Duration::from_secs_f64(config.duration));
    let start_deadline = started + Duration::from_secs_f64(config.start_timeout);
    let stall = config.stall_at()?.map(|(at, len)| {
        (
            started + Duration::from_secs_f64(at),
            started + Duration::from_secs_f64(at + len),
        )
    });
    let mut stats = Stats {
        edge: edge.to_string(),
        transport: format!("{:?}", config.transport).to_lowercase(),
        ..Stats::default()
    };
    let (start, start_seq) = match config.resume_seq {
        Some(s) => (WatchStart::Seq, SeqNo(s)),
        None => (WatchStart::Keyframe, SeqNo(0)),
    };
    let mut acked = SeqNo(0);
    let mut since_ack = 0u32;
    let mut ack_tick = tokio::time::interval(Duration::from_millis(250));
    let mut report_tick = tokio::time::interval(Duration::from_secs(1));
    report_tick.tick().await;
    let mut last_report = (Instant::now(), 0u64);
    let tty = std::io::stderr().is_terminal();
    let mut rx = Vec::new();
    let mut buf = BytesMut::new();
    let node = NodeId(config.id);
    let mut result = Ok(());
    let watch = |acked: SeqNo| {
        Body::Watch(Watch {
            node,
            lease_ms: 3000,
            start,
            seq: start_seq,
            acked,
            token: Bytes::new(),
        })
    };
    loop {
        let merge_deadline = buffer.next_timeout();
        let stalled = stall.is_some_and(|(a, b)| {
            let now = Instant::now();
            now >= a && now < b
        });
        let mut send_ack = false;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d.into()).await, None => std::future::pending().await } } => break,
            _ = tokio::time::sleep_until(start_deadline.into()), if stats.join_ms.is_none() => {
                result = Err(anyhow::anyhow!("no stream from edge {edge} within {} s (is stream {} published, and the edge reachable over {:?}?)", config.start_timeout, config.stream, config.transport));
                break;
            }
            _ = ack_tick.tick() => send_ack = true,
            _ = async { match merge_deadline { Some(t) => tokio::time::sleep_until(t.into()).await, None => std::future::pending().await } } => {
                buffer.handle_timeout(Instant::now());
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if stalled => {}
            res = recv(&mut link, &mut rx), if !stalled => {
                res?;
                let now = Instant::now();
                for datagram in rx.drain(..) {
                    match codec.decode(datagram) {
                        Ok(Message { body: Body::Media(m), .. }) => {
                            stats.join_ms.get_or_insert(now.duration_since(started).as_millis() as u64);
                            if m.seq > acked {
                                acked = m.seq;
                            }
                            since_ack += 1;
                            buffer.handle_input(now, merge::Input::Packet { path: PathId(0), seq: m.seq, item: m.rtp.payload() });
                        }
                        Ok(Message { body: Body::Notice { kind, value }, .. }) => match kind {
                            NoticeKind::Skipped => {
                                stats.skipped += value;
                                stats.skips += 1;
                                tracing::warn!("this viewer fell behind: the edge skipped {value} packets to the latest keyframe");
                            }
                            NoticeKind::Missed => tracing::warn!("the edge no longer had {value} of the packets asked for"),
                            NoticeKind::Joined => tracing::debug!("joined at {value}"),
                        },
                        Ok(Message { body: Body::Error { text, .. }, .. }) => {
                            result = Err(anyhow::anyhow!("edge {edge} refused: {text}"));
                        }
                        Ok(_) => {}
                        Err(_) => stats.malformed += 1,
                    }
                }
                if since_ack >= 32 {
                    send_ack = true;
                }
            }
            _ = report_tick.tick() => {
                let now = Instant::now();
                let (t0, b0) = last_report;
                stats.bitrate_bps = Bitrate::from_size_over(DataSize(stats.bytes - b0), now.duration_since(t0)).0;
                last_report = (now, stats.bytes);
                stats.buffered = buffer.held();
                report(&stats, tty, stats_out.as_mut())?;
            }
        }
        if result.is_err() {
            break;
        }
        // Drain the buffer: write in-order packets, count gaps, ask for what is missing.
        let mut nacks: Vec<SeqRange> = Vec::new();
        loop {
            match buffer.poll_output() {
                Output::Packet { seq, item } => {
                    stats.first_seq.get_or_insert(seq.0);
                    stats
                        .first_output_ms
                        .get_or_insert(started.elapsed().as_millis() as u64);
                    stats.last_seq = Some(seq.0);
                    stats.packets += 1;
                    stats.bytes += item.len() as u64;
                    out.write_all(&item).context("writing the stream")?;
                }
                Output::Gap { count, .. } => stats.gaps += count,
                Output::Nack { range, .. } => nacks.push(range),
                Output::Timeout(_) => break,
            }
        }
        let s = buffer.stats();
        stats.late_or_duplicate = s.duplicates + s.late;
        stats.repaired = s.repaired;
        if !nacks.is_empty() {
            stats.nacks += nacks.len() as u64;
            for chunk in nacks.chunks(braid_core::wire::MAX_NACK_RANGES) {
                send(
                    &codec,
                    &mut link,
                    &mut buf,
                    stream,
                    Body::Nack(chunk.to_vec()),
                )
                .await?;
            }
        }
        if send_ack && !stalled {
            since_ack = 0;
            send(&codec, &mut link, &mut buf, stream, watch(acked)).await?;
        }
    }
    out.flush().context("writing the stream")?;
    // Leave at once rather than let the lease lapse.
    let _ = send(
        &codec,
        &mut link,
        &mut buf,
        stream,
        Body::Unsubscribe { node },
    )
    .await;
    stats.buffered = buffer.held();
    stats.done = true;
    if tty {
        eprintln!();
    }
    report(&stats, false, stats_out.as_mut())?;
    result
}

async fn recv(link: &mut Link, out: &mut Vec<Bytes>) -> anyhow::Result<()> {
    match link {
        Link::Udp { socket, .. } => {
            let mut v = Vec::new();
            socket.recv(&mut v).await.context("receiving")?;
            out.extend(v.into_iter().map(|(_, b)| b));
        }
        Link::Tcp { rx, .. } => match rx.recv().await {
            Some(b) => {
                out.push(b);
                while let Ok(b) = rx.try_recv() {
                    out.push(b);
                }
            }
            None => anyhow::bail!("the edge closed the TCP connection"),
        },
    }
    Ok(())
}

async fn send(
    codec: &Codec,
    link: &mut Link,
    buf: &mut BytesMut,
    stream: StreamId,
    body: Body,
) -> anyhow::Result<()> {
    buf.clear();
    let msg = Message {
        header: Header {
            stream,
            ..Header::default()
        },
        body,
    };
    match link {
        Link::Udp { socket, edge } => {
            codec.encode(&msg, buf)?;
            socket.send(Instant::now(), *edge, buf.split().freeze(), false);
            socket.flush();
        }
        Link::Tcp { writer, .. } => {
            codec.encode_frame(&msg, buf)?;
            writer.write_all(buf).await.context("writing to the edge")?;
        }
    }
    Ok(())
}

fn report(s: &Stats, tty: bool, json: Option<&mut Box<dyn Write>>) -> anyhow::Result<()> {
    if tty {
        eprint!(
            "\r{:>8.2} Mbps  buffer {:>4} pkts  {:>9} packets  gaps {:>5}  skips {:>3}  from {} ({})   ",
            s.bitrate_bps as f64 / 1e6,
            s.buffered,
            s.packets,
            s.gaps,
            s.skips,
            s.edge,
            s.transport
        );
    }
    if let Some(out) = json {
        writeln!(out, "{}", serde_json::to_string(s)?)?;
        out.flush()?;
    }
    Ok(())
}
