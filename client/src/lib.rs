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
//! - [`control`]: assignment, switch requests and feedback to the control servers.
//!
//! With `--control`, the client asks a control server for a primary edge and a secondary
//! set, watches the primary with the core's detectors (rate drop, stall, gaps, disorder),
//! and on trouble, or when the edge signals a drain, asks for an edge of the other set
//! and resumes there at the first sequence number it does not have: the buffer drops what
//! it already holds and fills what it lacks, so the output goes on with no gap and no
//! duplicate. With no control server answering it goes straight to a candidate of the
//! secondary set. It asks again every `--reask-secs` and moves when a candidate is
//! better by `--better-margin`.

pub mod control;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::detect::{Config as DetectConfig, Detector, Observation, Output as DetectOutput};
use braid_core::merge::{self, Output};
use braid_core::wire::{Body, Codec, Header, Message, NoticeKind, SeqRange, Watch, WatchStart};
use braid_core::{Bitrate, DataSize, NodeId, PathId, SeqNo, StreamId};
use std::collections::HashMap;

use braid_net::addr::PeerAddr;
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
    300
}
fn default_start_timeout() -> f64 {
    5.0
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

    fn validate(&self) -> anyhow::Result<()> {
        if self.edge.is_none() && self.controls.is_empty() {
            anyhow::bail!("no edge to watch from: give --control URL (or --edge ADDR)");
        }
        if self.stall_ms < 100 || self.reask_secs < 0.0 || self.better_margin < 0.0 {
            anyhow::bail!(
                "--stall-ms must be at least 100, --reask-secs and --better-margin not negative"
            );
        }
        braid_net::daemon::network_key(&self.network_key).context("--network-key")?;
        if self.start_timeout <= 0.0 || self.start_timeout.is_nan() || self.duration < 0.0 {
            anyhow::bail!("--start-timeout must be above zero and --duration not negative");
        }
        if !(20..=10_000).contains(&self.buffer_ms) {
            anyhow::bail!("--buffer-ms must be between 20 and 10000");
        }
        self.stall_at()?;
        self.quic.validate().map_err(anyhow::Error::msg)?;
        self.tls.validate().map_err(anyhow::Error::msg)?;
        if self.edge.is_some_and(|e| e.is_quic())
            && !matches!(self.transport, Transport::Auto | Transport::Quic)
        {
            anyhow::bail!("--edge quic://… wants --transport quic (or auto)");
        }
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

/// One switch, as the JSON stats record it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SwitchStat {
    /// Why: a detector's reason, `drain`, `refused`, or `better`.
    pub reason: String,
    /// The edge left.
    pub from: String,
    /// The edge taken.
    pub to: String,
    /// Whether a control server chose it (else the client took a secondary candidate).
    pub via_control: bool,
    /// Milliseconds from detection to the first packet from the new edge.
    pub detect_to_first_packet_ms: Option<u64>,
    /// Sequence number resumed at.
    pub resumed_at: u64,
    /// Packets given up between detection and two seconds after the switch.
    pub lost: Option<u64>,
    /// Wall clock at detection, ms since the Unix epoch (to line up with other logs).
    pub detected_unix_ms: u64,
    /// Wall clock at the first packet from the new edge, ms since the Unix epoch.
    pub first_packet_unix_ms: Option<u64>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the viewer received; written as JSON.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    /// The edge now.
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
    /// Media from an edge this viewer no longer watches (dropped).
    pub stray: u64,
    /// Milliseconds from the first watch message to the first packet received.
    pub join_ms: Option<u64>,
    /// Milliseconds from the first watch message to the first packet written.
    pub first_output_ms: Option<u64>,
    /// Bit rate written out over the last second.
    pub bitrate_bps: u64,
    /// Packets held in the buffer.
    pub buffered: usize,
    /// Every switch.
    pub switches: Vec<SwitchStat>,
    /// Whether this is the last line.
    pub done: bool,
}

enum Link {
    /// UDP, and QUIC to edges that offer it: `quic` maps an edge (as the control server
    /// names it, by its UDP address) to its QUIC address.
    Udp {
        socket: Box<Socket>,
        quic: HashMap<SocketAddr, SocketAddr>,
    },
    Tcp {
        writer: tokio::net::tcp::OwnedWriteHalf,
        rx: mpsc::Receiver<Bytes>,
    },
}

async fn connect(config: &Config, edge: SocketAddr) -> anyhow::Result<Link> {
    Ok(match config.transport {
        Transport::Udp | Transport::Quic | Transport::Auto => {
            let mut socket =
                Socket::bind(config.bind, Impairments::default(), "client").context("binding")?;
            let mut quic = HashMap::new();
            if config.transport != Transport::Udp {
                let bind = SocketAddr::new(config.bind.ip(), 0);
                let q = braid_net::quic::Quic::bind(&config.quic, bind, &config.tls, "client")
                    .context("starting QUIC")?;
                socket.attach_quic(q);
                if let (Some(q), Some(e)) = (socket.quic_mut(), config.edge.filter(|e| e.is_quic()))
                {
                    q.add_dial(e.addr);
                    quic.insert(e.addr, e.addr);
                }
            }
            Link::Udp {
                socket: Box::new(socket),
                quic,
            }
        }
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
                    loop {
                        match braid_core::wire::split_frame(&mut buf) {
                            Ok(Some(m)) => {
                                if tx.send(m).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!("the edge's TCP stream is broken ({e}): closing");
                                return;
                            }
                        }
                    }
                }
            });
            Link::Tcp { writer, rx }
        }
    })
}

impl Link {
    /// Whether `edge` is reached over QUIC.
    fn reaches_over_quic(&self, edge: SocketAddr) -> bool {
        matches!(self, Link::Udp { quic, .. } if quic.contains_key(&edge))
    }

    /// Takes note of the candidates' QUIC addresses (QUIC links only).
    fn learn(&mut self, transport: Transport, a: &control::Assignment) {
        let Link::Udp { socket, quic } = self else {
            return;
        };
        let Some(q) = socket.quic_mut() else {
            return;
        };
        if transport == Transport::Udp {
            return;
        }
        for c in &a.candidates {
            if let Some(addr) = c.quic {
                q.add_dial(addr);
                quic.insert(c.addr, addr);
            }
        }
    }
}

/// Times a keepalive to each candidate (300 ms at most) and returns the round trips.
fn probe(codec: &Codec, stream: StreamId, candidates: &[SocketAddr]) -> Vec<(SocketAddr, f64)> {
    let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return Vec::new();
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(50)));
    let start = Instant::now();
    for (i, c) in candidates.iter().enumerate() {
        let mut out = BytesMut::new();
        let msg = Message {
            header: Header {
                stream,
                ..Header::default()
            },
            body: Body::Keepalive(braid_core::wire::Keepalive {
                node: NodeId(0),
                sent_us: (i as u64 + 1) << 32 | start.elapsed().as_micros() as u64 & 0xffff_ffff,
                echo_us: 0,
            }),
        };
        if codec.encode(&msg, &mut out).is_ok() {
            let _ = sock.send_to(&out, c);
        }
    }
    let mut rtts = Vec::new();
    let mut buf = [0u8; 512];
    while start.elapsed() < Duration::from_millis(300) && rtts.len() < candidates.len() {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Ok(Message {
            body: Body::Keepalive(k),
            ..
        }) = codec.decode(Bytes::copy_from_slice(&buf[..n]))
        {
            let sent = Duration::from_micros(k.echo_us & 0xffff_ffff);
            if candidates.contains(&from) {
                rtts.push((
                    from,
                    start.elapsed().saturating_sub(sent).as_secs_f64() * 1000.0,
                ));
            }
        }
    }
    rtts
}

/// Watches the stream until `--duration` passes, the edge refuses with nowhere else to
/// go, or `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let codec = Codec::new(braid_net::daemon::network_key(&config.network_key)?);
    let stream = StreamId(config.stream);
    let viewer = (!config.controls.is_empty()).then(|| control::Viewer {
        controls: config.controls.clone(),
        client: config.id,
        stream: config.stream,
        token: config.token.clone(),
        region: config.region.clone(),
    });
    let mut assignment: Option<control::Assignment> = None;
    if let Some(v) = viewer.clone() {
        match tokio::task::spawn_blocking(move || control::assign(&v)).await? {
            Ok(a) => assignment = Some(a),
            Err(e) if config.edge.is_some() => tracing::warn!("{e:#}; watching --edge instead"),
            Err(e) => return Err(e),
        }
    }
    let mut edge = match (&assignment, config.edge) {
        (Some(a), _) => a.primary,
        (None, Some(e)) => e.addr,
        (None, None) => anyhow::bail!("no edge to watch"),
    };
    if let (true, Some(a), Some(v)) = (config.probe, &assignment, viewer.clone()) {
        let cands: Vec<SocketAddr> = a.candidates.iter().map(|c| c.addr).collect();
        let c2 = codec.clone();
        let rtts = tokio::task::spawn_blocking(move || {
            let r = probe(&c2, stream, &cands);
            control::feedback(&v, &r, 0);
            r
        })
        .await?;
        let same_set: Vec<&(SocketAddr, f64)> = rtts
            .iter()
            .filter(|(addr, _)| {
                a.candidates
                    .iter()
                    .any(|c| c.addr == *addr && c.set == a.primary_set)
            })
            .collect();
        if let Some((fastest, rtt)) = same_set.into_iter().min_by(|x, y| x.1.total_cmp(&y.1)) {
            tracing::info!(
                "probed {} edges; fastest of the {} set: {fastest} ({rtt:.2} ms)",
                rtts.len(),
                a.primary_set
            );
            edge = *fastest;
        }
    }
    let mut link = connect(&config, edge).await?;
    if let Some(a) = &assignment {
        link.learn(config.transport, a);
    }
    if config.transport == Transport::Quic && !link.reaches_over_quic(edge) {
        anyhow::bail!(
            "edge {edge} offers no QUIC address: give --edge quic://ADDR, or --transport auto or udp"
        );
    }
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
        nack: config.transport.datagrams(),
        nack_delay: (window / 10).max(Duration::from_millis(5)),
        nack_retry: (window / 5).max(Duration::from_millis(10)),
        ..merge::Config::default()
    })?;
    let mut detector = Detector::new(DetectConfig {
        nominal_bitrate: (config.nominal_bps > 0).then_some(Bitrate(config.nominal_bps)),
        stall: Duration::from_millis(config.stall_ms),
        ..DetectConfig::default()
    })?;
    let started = Instant::now();
    detector.reset(started);
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
    let mut start = match config.resume_seq {
        Some(s) => (WatchStart::Seq, SeqNo(s)),
        None => (WatchStart::Keyframe, SeqNo(0)),
    };
    // Detectors are ignored until the first packet from an edge, or this long.
    let grace = Duration::from_secs_f64(config.start_timeout.min(3.0));
    let mut grace_until = started + grace;
    // Measures are judged from one second after a start or switch (the catch-up burst).
    let settle = Duration::from_secs(1);
    let mut judge_from = started + settle;
    let mut got_from_edge = false;
    let mut acked = SeqNo(0);
    let mut since_ack = 0u32;
    let mut ack_tick = tokio::time::interval(Duration::from_millis(250));
    let mut report_tick = tokio::time::interval(Duration::from_secs(1));
    report_tick.tick().await;
    let reask_every = (config.reask_secs > 0.0 && viewer.is_some())
        .then(|| Duration::from_secs_f64(config.reask_secs));
    let mut next_reask = reask_every.map(|d| started + d);
    let mut reask: Option<tokio::task::JoinHandle<anyhow::Result<control::Assignment>>> = None;
    let mut last_report = (Instant::now(), 0u64);
    let tty = std::io::stderr().is_terminal();
    let mut rx: Vec<(Option<SocketAddr>, Bytes)> = Vec::new();
    let mut buf = BytesMut::new();
    let node = NodeId(config.id);
    let mut result = Ok(());
    let token = Bytes::from(config.token.clone());
    let mut pending_switch: Option<(String, Instant)> = None;
    let mut switch_marks: Vec<(usize, Instant, u64)> = Vec::new();
    let watch = |acked: SeqNo, start: (WatchStart, SeqNo)| {
        Body::Watch(Watch {
            node,
            lease_ms: 3000,
            start: start.0,
            seq: start.1,
            acked,
            token: token.clone(),
        })
    };
    send(
        &codec,
        &mut link,
        edge,
        &mut buf,
        stream,
        watch(acked, start),
    )
    .await?;
    let mut detector_deadline: Option<Instant> = None;
    // During a switch, the edge being left (until the new one delivers).
    let mut leaving: Option<SocketAddr> = None;
    let mut leave_now: Option<SocketAddr> = None;
    loop {
        let merge_deadline = buffer.next_timeout();
        let now = Instant::now();
        let stalled = stall.is_some_and(|(a, b)| now >= a && now < b);
        let mut send_ack = false;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = braid_net::daemon::sleep_until(deadline) => break,
            _ = tokio::time::sleep_until(start_deadline.into()), if stats.join_ms.is_none() => {
                result = Err(anyhow::anyhow!("no stream from edge {edge} within {} s (is stream {} published, and the edge reachable over {:?}?)", config.start_timeout, config.stream, config.transport));
                break;
            }
            _ = ack_tick.tick() => {
                send_ack = true;
                detector.handle_timeout(Instant::now());
            }
            _ = braid_net::daemon::sleep_until(detector_deadline) => {
                // Wake exactly when a window closes or a stall would begin.
                detector.handle_timeout(Instant::now());
            }
            _ = braid_net::daemon::sleep_until(merge_deadline) => {
                buffer.handle_timeout(Instant::now());
            }
            _ = tokio::time::sleep(Duration::from_millis(50)), if stalled => {}
            res = async { reask.as_mut().expect("guarded").await }, if reask.is_some() => {
                reask = None;
                if let Ok(Ok(a)) = res {
                    let current = a.candidates.iter().find(|c| c.addr == edge).map(|c| f64::from(c.weight));
                    let best = a.candidates.first().map(|c| (c.addr, f64::from(c.weight)));
                    let better = match (current, best) {
                        (None, Some(_)) => true,
                        (Some(cur), Some((addr, w))) => addr != edge && w > cur * (1.0 + config.better_margin),
                        _ => false,
                    };
                    link.learn(config.transport, &a);
                    assignment = Some(a);
                    if better && pending_switch.is_none() {
                        pending_switch = Some(("better".into(), Instant::now()));
                    }
                }
            }
            res = recv(&mut link, &mut rx), if !stalled => {
                res?;
                let now = Instant::now();
                for (from, datagram) in rx.drain(..) {
                    let from_edge = from.is_none_or(|f| f == edge);
                    let from_leaving = leaving.is_some_and(|o| from == Some(o));
                    match codec.decode(datagram) {
                        Ok(Message { header, body: Body::Media(m) }) => {
                            if from_leaving && !from_edge {
                                // The edge being left, until the new one delivers.
                                if m.seq > acked {
                                    acked = m.seq;
                                }
                                buffer.handle_input(now, merge::Input::Packet { path: PathId(1), seq: m.seq, item: m.rtp.payload() });
                                continue;
                            }
                            if !from_edge {
                                stats.stray += 1;
                                continue;
                            }
                            stats.join_ms.get_or_insert(now.duration_since(started).as_millis() as u64);
                            if !got_from_edge {
                                got_from_edge = true;
                                if let Some(old) = leaving.take() {
                                    leave_now = Some(old);
                                }
                                if let Some((i, t, _)) = switch_marks.last() {
                                    if let Some(s) = stats.switches.get_mut(*i) {
                                        s.detect_to_first_packet_ms.get_or_insert(now.duration_since(*t).as_millis() as u64);
                                        s.first_packet_unix_ms.get_or_insert_with(unix_ms);
                                    }
                                }
                            }
                            if m.seq > acked {
                                acked = m.seq;
                            }
                            since_ack += 1;
                            detector.handle_input(now, Observation { seq: m.seq, size: m.rtp.len(), frame_start: header.flags.contains(braid_core::wire::Flags::KEYFRAME) });
                            buffer.handle_input(now, merge::Input::Packet { path: PathId(0), seq: m.seq, item: m.rtp.payload() });
                        }
                        Ok(Message { body: Body::Notice { kind, value }, .. }) if from_edge => match kind {
                            NoticeKind::Skipped => {
                                stats.skipped += value;
                                stats.skips += 1;
                                tracing::warn!("this viewer fell behind: the edge skipped {value} packets to the latest keyframe");
                            }
                            NoticeKind::Missed => tracing::warn!("the edge no longer had {value} of the packets asked for"),
                            NoticeKind::Joined => tracing::debug!("joined at {value}"),
                        },
                        Ok(Message { body: Body::Switch { reason }, .. }) if from_edge => {
                            tracing::warn!("edge {edge} asks its viewers to move ({reason:?})");
                            if pending_switch.is_none() {
                                pending_switch = Some(("drain".into(), now));
                            }
                        }
                        Ok(Message { body: Body::Error { text, .. }, .. }) if from_edge => {
                            if viewer.is_some() || assignment.is_some() {
                                tracing::warn!("edge {edge} refused: {text}");
                                if pending_switch.is_none() {
                                    pending_switch = Some(("refused".into(), now));
                                }
                            } else {
                                result = Err(anyhow::anyhow!("edge {edge} refused: {text}"));
                            }
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
                for (i, t, gaps) in &switch_marks {
                    if now.duration_since(*t) > Duration::from_secs(2) + window {
                        if let Some(s) = stats.switches.get_mut(*i) {
                            s.lost.get_or_insert(stats.gaps - gaps);
                        }
                    }
                }
                report(&stats, tty, stats_out.as_mut())?;
            }
        }
        if result.is_err() {
            break;
        }
        // The detectors' verdict, once the edge had its chance.
        let now = Instant::now();
        while let DetectOutput::Switch(reason) = detector.poll_output() {
            // Judge an edge only once it delivered and its catch-up is over, or, if it
            // delivers nothing, after the grace.
            let judged = if got_from_edge {
                now >= judge_from
            } else {
                now >= grace_until
            };
            if judged && pending_switch.is_none() && stats.join_ms.is_some() {
                tracing::warn!("leaving {edge}: {reason:?}");
                pending_switch = Some((reason.name().to_owned(), now));
            } else if !judged {
                // Too early to judge: re-arm, so a problem that lasts is said again.
                detector.reset(now);
            }
        }
        // `poll_output` said Timeout to end the loop above; ask again for its deadline.
        detector_deadline = match detector.poll_output() {
            DetectOutput::Timeout(t) => t,
            DetectOutput::Switch(_) => Some(now),
        };
        if reask.is_none() && next_reask.is_some_and(|t| now >= t) {
            next_reask = reask_every.map(|d| now + d);
            let v = viewer.clone().expect("re-ask only with control servers");
            reask = Some(tokio::task::spawn_blocking(move || control::assign(&v)));
        }
        if let Some((reason, detected)) = pending_switch.take() {
            // The first sequence number not yet written: the new edge starts there; what the
            // buffer already holds is dropped as duplicate, what it lacks is filled.
            let resume = buffer.next_seq().unwrap_or(acked.next());
            let mut via_control = false;
            let mut target = None;
            if let Some(v) = viewer.clone() {
                let failed = edge;
                let r = reason.clone();
                match tokio::task::spawn_blocking(move || control::switch(&v, failed, &r, resume.0))
                    .await?
                {
                    Ok(a) => {
                        target = Some(a.primary);
                        via_control = true;
                        link.learn(config.transport, &a);
                        assignment = Some(a);
                    }
                    Err(e) => tracing::warn!("{e:#}: going to the secondary set directly"),
                }
            }
            if target.is_none() {
                if let Some(a) = &assignment {
                    let current_set = a
                        .candidates
                        .iter()
                        .find(|c| c.addr == edge)
                        .map(|c| c.set.clone());
                    target = a
                        .candidates
                        .iter()
                        .filter(|c| c.addr != edge)
                        .min_by_key(|c| (Some(&c.set) == current_set.as_ref(), c.priority))
                        .map(|c| c.addr);
                }
            }
            match target {
                Some(to) if to != edge => {
                    // Make before break (UDP): keep taking the old edge's packets, and
                    // keep its lease and window open, until the new edge delivers; a
                    // cold new edge then costs nothing. The buffer drops the overlap.
                    // A dead old edge simply sends nothing.
                    if let Some(old) = leaving.take() {
                        let _ = send(
                            &codec,
                            &mut link,
                            old,
                            &mut buf,
                            stream,
                            Body::Unsubscribe { node },
                        )
                        .await;
                    }
                    if config.transport.datagrams() {
                        leaving = Some(edge);
                    } else {
                        let _ = send(
                            &codec,
                            &mut link,
                            edge,
                            &mut buf,
                            stream,
                            Body::Unsubscribe { node },
                        )
                        .await;
                    }
                    tracing::info!(
                        "switching {edge} -> {to} ({reason}), resuming at {}",
                        resume.0
                    );
                    if config.transport == Transport::Tcp {
                        link = connect(&config, to).await?;
                    }
                    stats.switches.push(SwitchStat {
                        reason,
                        from: edge.to_string(),
                        to: to.to_string(),
                        via_control,
                        detect_to_first_packet_ms: None,
                        resumed_at: resume.0,
                        lost: None,
                        detected_unix_ms: unix_ms()
                            .saturating_sub(detected.elapsed().as_millis() as u64),
                        first_packet_unix_ms: None,
                    });
                    switch_marks.push((stats.switches.len() - 1, detected, stats.gaps));
                    edge = to;
                    stats.edge = to.to_string();
                    start = (WatchStart::Seq, resume);
                    got_from_edge = false;
                    grace_until = Instant::now() + grace;
                    judge_from = Instant::now() + settle;
                    detector.reset(Instant::now());
                    send_ack = true;
                }
                _ => {
                    tracing::warn!("nowhere to switch to ({reason}); staying on {edge}");
                    detector.reset(Instant::now());
                }
            }
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
                    edge,
                    &mut buf,
                    stream,
                    Body::Nack(chunk.to_vec()),
                )
                .await?;
            }
        }
        if let Some(old) = leave_now.take() {
            send(
                &codec,
                &mut link,
                old,
                &mut buf,
                stream,
                Body::Unsubscribe { node },
            )
            .await?;
        }
        if send_ack && !stalled {
            since_ack = 0;
            if let Some(old) = leaving {
                send(
                    &codec,
                    &mut link,
                    old,
                    &mut buf,
                    stream,
                    watch(acked, start),
                )
                .await?;
            }
            send(
                &codec,
                &mut link,
                edge,
                &mut buf,
                stream,
                watch(acked, start),
            )
            .await?;
        }
    }
    out.flush().context("writing the stream")?;
    // Leave at once rather than let the lease lapse.
    let _ = send(
        &codec,
        &mut link,
        edge,
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

async fn recv(link: &mut Link, out: &mut Vec<(Option<SocketAddr>, Bytes)>) -> anyhow::Result<()> {
    match link {
        Link::Udp { socket, quic } => {
            let mut v = Vec::new();
            socket.recv(&mut v).await.context("receiving")?;
            // Name QUIC edges by the address the control server knows them by.
            out.extend(v.into_iter().map(|(a, b)| {
                let edge = quic.iter().find(|(_, q)| **q == a).map_or(a, |(e, _)| *e);
                (Some(edge), b)
            }));
        }
        Link::Tcp { rx, .. } => match rx.recv().await {
            Some(b) => {
                out.push((None, b));
                while let Ok(b) = rx.try_recv() {
                    out.push((None, b));
                }
            }
            None => {
                // The edge went away: wait, and let the stall detector move us.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    }
    Ok(())
}

async fn send(
    codec: &Codec,
    link: &mut Link,
    edge: SocketAddr,
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
        Link::Udp { socket, quic } => {
            codec.encode(&msg, buf)?;
            let to = quic.get(&edge).copied().unwrap_or(edge);
            socket.send(Instant::now(), to, buf.split().freeze(), false);
            socket.flush();
        }
        Link::Tcp { writer, .. } => {
            codec.encode_frame(&msg, buf)?;
            // A dead edge's connection fails here; the stall detector moves us on.
            if let Err(e) = writer.write_all(buf).await {
                tracing::debug!("writing to edge {edge}: {e}");
            }
        }
    }
    Ok(())
}

fn report(s: &Stats, tty: bool, json: Option<&mut Box<dyn Write>>) -> anyhow::Result<()> {
    if tty {
        eprint!(
            "\r{:>8.2} Mbps  buffer {:>4} pkts  {:>9} packets  gaps {:>5}  skips {:>3}  switches {:>2}  from {} ({})   ",
            s.bitrate_bps as f64 / 1e6,
            s.buffered,
            s.packets,
            s.gaps,
            s.skips,
            s.switches.len(),
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
