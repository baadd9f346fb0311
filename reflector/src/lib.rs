//! braid-reflector: one binary, two roles.
//!
//! - **set** (`--role set`): receives every copy the entry points send, merges them by
//!   sequence number (duplicates stop here), asks the entry points for what both lost,
//!   and forwards the merged stream to every edge subscribed to it. Subscriptions are
//!   soft state: an edge refreshes about every second and is forgotten after its lease.
//! - **edge** (`--role edge`): when the first viewer of a stream arrives it subscribes to
//!   `subscribe_k` distinct set reflectors, merges their copies, asks them for what every
//!   path lost, keeps the last seconds of the stream in a ring and serves every viewer from
//!   its own cursor, starting at the latest keyframe. After the last viewer leaves it
//!   lingers, then unsubscribes.
//!
//! # Layout
//!
//! - [`Config`]: flags and TOML for both roles.
//! - [`run`]: the daemon's one task, which owns the socket and every stream's state.
//! - `tcp`: TCP viewers' connection tasks.
//!
//! Viewers (edge role) speak the watch protocol (`docs/PROTOCOL.md`): a watch message
//! starts, renews and acknowledges; the edge serves each viewer from its own cursor and,
//! over UDP, keeps at most `viewer_window` packets beyond what the viewer acknowledged in
//! flight, so a viewer that stops reading stops its cursor instead of losing packets in its
//! socket buffer; the ring then overtakes it, and the skip is counted and told to it.
//!
//! Paths are told apart by where a copy comes from: the edge numbers its configured set
//! reflectors, the set reflector its upstream entry points. Every packet not forwarded is
//! counted by reason in `braid_dropped_total`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::merge::{self, Output};
use braid_core::ring::{self, Cursor, Read, Ring, Start};
use braid_core::wire::{
    Body, Codec, ErrorCode, Flags, Header, Media, Message, NoticeKind, SeqRange, Subscription,
    Watch, WatchStart,
};
use braid_core::{Bitrate, DataSize, NodeId, PathId, SeqNo, StreamId};
use braid_net::addr::PeerAddr;
use braid_net::daemon::DaemonConfig;
use braid_net::udp::{Impairments, Socket};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod report;
mod tcp;

/// Which role the reflector plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Set reflector: merges the entry points' copies, forwards to subscribed edges.
    Set,
    /// Edge: subscribes to set reflectors, merges, keeps the ring, serves viewers.
    Edge,
}

/// The reflector's configuration.
#[derive(Debug, Clone, Parser, Deserialize, Serialize)]
#[command(
    name = "braid-reflector",
    version,
    about = "Braid set reflector or edge"
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
    /// Role: set or edge.
    #[arg(long, value_enum, default_value = "edge")]
    #[serde(default = "default_role")]
    pub role: Role,
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:8000")]
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Prometheus metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:0")]
    #[serde(default = "default_metrics")]
    pub metrics: SocketAddr,
    /// The network key (a passphrase, or @file).
    #[arg(long, env = "BRAID_NETWORK_KEY", default_value = "")]
    #[serde(default)]
    pub network_key: String,
    /// This node's id.
    #[arg(long, default_value_t = 1)]
    #[serde(default)]
    pub node_id: u64,
    /// Streams carried (repeatable); none means any stream.
    #[arg(long = "stream")]
    #[serde(default)]
    pub streams: Vec<u32>,
    /// Set role: the entry points allowed to send (repeatable); none means any node with
    /// the network key.
    #[arg(long = "upstream")]
    #[serde(default)]
    pub upstreams: Vec<PeerAddr>,
    /// Edge role: the set reflectors to subscribe to (repeatable), `ADDR` or
    /// `udp://ADDR` for UDP, `quic://ADDR` for QUIC (their QUIC address).
    #[arg(long = "reflector")]
    #[serde(default)]
    pub reflectors: Vec<PeerAddr>,
    /// Edge role: how many distinct set reflectors to subscribe to (at least 2).
    #[arg(long, default_value_t = 3)]
    #[serde(default = "default_k")]
    pub subscribe_k: usize,
    /// How long a missing packet is waited for, in milliseconds (size it to the delay
    /// difference between paths plus a repair round trip).
    #[arg(long, default_value_t = 200)]
    #[serde(default = "default_window")]
    pub reorder_window_ms: u64,
    /// Ask upstream for packets every path lost.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    #[serde(default = "default_true")]
    pub repair: bool,
    /// How long packets are kept to answer NACKs (set role), in milliseconds.
    #[arg(long, default_value_t = 2000)]
    #[serde(default = "default_retransmit_ms")]
    pub retransmit_ms: u64,
    /// Edge role: seconds of stream kept in the ring.
    #[arg(long, default_value_t = 4.0)]
    #[serde(default = "default_ring_seconds")]
    pub ring_seconds: f64,
    /// Edge role: how long to stay subscribed after the last viewer left, ms.
    #[arg(long, default_value_t = 5000)]
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Most subscribers (set role) or viewers (edge role) per stream.
    #[arg(long, default_value_t = 1000)]
    #[serde(default = "default_max_per_stream")]
    pub max_per_stream: usize,
    /// Most viewers on this node (edge role).
    #[arg(long, default_value_t = 5000)]
    #[serde(default = "default_max_viewers")]
    pub max_viewers: usize,
    /// Edge role: most packets in flight to a UDP viewer beyond what it acknowledged
    /// (default 64: a default Linux socket receive buffer, 208 kB, holds about 90
    /// datagrams of 1356 bytes once the kernel's per-packet overhead is counted).
    #[arg(long, default_value_t = 64)]
    #[serde(default = "default_viewer_window")]
    pub viewer_window: u64,
    /// Control servers to report to (repeatable), as `http://host:port`.
    #[arg(long = "control")]
    #[serde(default)]
    pub controls: Vec<String>,
    /// This node's region, for the control server's assignment.
    #[arg(long, default_value = "")]
    #[serde(default)]
    pub region: String,
    /// This node's cost tier (0 cheapest).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub cost_tier: u8,
    /// Edge role: viewers must present a token signed with this secret (empty: no check).
    #[arg(long, env = "BRAID_TOKEN_SECRET", default_value = "")]
    #[serde(default)]
    pub token_secret: String,
    /// New subscriptions accepted per second from one IP address (set role); more are
    /// refused and counted.
    #[arg(long, default_value_t = 50)]
    #[serde(default = "default_subscribe_rate")]
    pub subscribe_rate: u32,
    /// QUIC: where to listen, initial MTU, connection limits.
    #[command(flatten)]
    #[serde(default)]
    pub quic: braid_net::quic::Options,
    /// TLS for QUIC: this node's certificate, and whom to trust.
    #[command(flatten)]
    #[serde(default)]
    pub tls: braid_net::tls::Tls,
    /// Impairment of the outgoing links (TOML only).
    #[arg(skip)]
    #[serde(default)]
    pub impair: Impairments,
}

fn default_subscribe_rate() -> u32 {
    50
}

fn default_role() -> Role {
    Role::Edge
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8000))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_k() -> usize {
    3
}
fn default_window() -> u64 {
    200
}
fn default_true() -> bool {
    true
}
fn default_retransmit_ms() -> u64 {
    2000
}
fn default_ring_seconds() -> f64 {
    4.0
}
fn default_linger_ms() -> u64 {
    5000
}
fn default_max_per_stream() -> usize {
    1000
}
fn default_max_viewers() -> usize {
    5000
}
fn default_viewer_window() -> u64 {
    64
}

/// How often an edge refreshes its subscriptions, and the lease it asks for.
const REFRESH: Duration = Duration::from_secs(1);
const LEASE_MS: u32 = 3000;
/// Longest lease a subscriber may ask for.
const MAX_LEASE: Duration = Duration::from_secs(10);
/// Most sequence numbers answered per NACK message.
const MAX_NACK_ANSWER: u64 = 256;
/// An edge replaces a subscribed set reflector that delivered no data for this long.
const PATH_DEAD: Duration = Duration::from_millis(1500);

impl DaemonConfig for Config {
    const NAME: &'static str = "braid-reflector";

    fn file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn check(&self) -> bool {
        self.check
    }

    fn validate(&self) -> anyhow::Result<()> {
        braid_net::daemon::network_key(&self.network_key).context("--network-key")?;
        self.merge_config().validate()?;
        self.ring_config()?.validate()?;
        if self.role == Role::Edge {
            if self.reflectors.is_empty() && self.controls.is_empty() {
                anyhow::bail!(
                    "an edge needs set reflectors: give --reflector ADDR (two or more), or --control URL to learn them"
                );
            }
            if self.subscribe_k < 2 && self.reflectors.len() >= 2 {
                anyhow::bail!("subscribe_k must be at least 2: one path is no redundancy");
            }
        }
        if self.reflectors.len() > 64 || self.upstreams.len() > 64 {
            anyhow::bail!("at most 64 reflectors or upstreams");
        }
        if self.max_per_stream == 0 || self.max_viewers == 0 || self.viewer_window == 0 {
            anyhow::bail!("max_per_stream, max_viewers and viewer_window must be above zero");
        }
        if self.subscribe_rate == 0 {
            anyhow::bail!("subscribe_rate must be above zero");
        }
        self.impair.validate().map_err(anyhow::Error::msg)?;
        self.quic.validate().map_err(anyhow::Error::msg)?;
        self.tls.validate().map_err(anyhow::Error::msg)?;
        if self.quic.listen.is_some() && !self.tls.has_identity() {
            anyhow::bail!(
                "quic.listen needs a certificate: give tls.cert and tls.key (`braid-ctl dev-certs` makes development ones)"
            );
        }
        Ok(())
    }
}

impl Config {
    fn merge_config(&self) -> merge::Config {
        let window = Duration::from_millis(self.reorder_window_ms);
        let default = merge::Config::default();
        merge::Config {
            reorder_window: window,
            nack: self.repair,
            nack_delay: default.nack_delay.min(window / 4),
            nack_retry: default.nack_retry.min(window / 4),
            ..default
        }
    }

    fn ring_config(&self) -> anyhow::Result<ring::Config> {
        if !(self.ring_seconds > 0.0 && self.ring_seconds <= 60.0) {
            anyhow::bail!("ring_seconds must be above 0 and at most 60");
        }
        Ok(ring::Config {
            max_age: Duration::from_secs_f64(self.ring_seconds),
            ..ring::Config::default()
        })
    }
}

fn dropped(role: Role, reason: &'static str) {
    let role = match role {
        Role::Set => "set",
        Role::Edge => "edge",
    };
    metrics::counter!("braid_dropped_total", "role" => role, "reason" => reason).increment(1);
}

/// A merged packet: the datagram as it arrived, and what a retransmission needs.
#[derive(Debug, Clone)]
struct Packet {
    datagram: Bytes,
    header: Header,
    media: Media,
}

/// Who a viewer is: its UDP address, or its TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ViewerKey {
    Udp(SocketAddr),
    Tcp(u64),
}

enum Transport {
    Udp(SocketAddr),
    Tcp(mpsc::Sender<Bytes>),
}

struct Viewer {
    transport: Transport,
    /// Placed once the ring can serve the requested start.
    cursor: Option<Cursor>,
    start: WatchStart,
    start_seq: SeqNo,
    expires: Instant,
    /// Highest sequence number the viewer said it has (UDP flow window).
    acked: SeqNo,
    /// The first sequence number sent to it.
    first_sent: SeqNo,
}

struct Stream {
    id: StreamId,
    merge: merge::Buffer<Packet>,
    kept: Ring<Packet>,
    /// Set role: subscribed edges and when their lease ends.
    subscribers: HashMap<SocketAddr, Instant>,
    /// Set role without configured upstreams: paths numbered as senders appear.
    dynamic_paths: Vec<SocketAddr>,
    /// Edge role: viewers.
    viewers: HashMap<ViewerKey, Viewer>,
    /// Edge role: indexes into `reflectors` currently subscribed to, and when.
    upstream: Vec<(usize, Instant)>,
    last_refresh: Option<Instant>,
    empty_since: Option<Instant>,
}

struct Node {
    config: Config,
    codec: Codec,
    socket: Socket,
    streams: HashMap<StreamId, Stream>,
    out: BytesMut,
    node: NodeId,
    viewers: usize,
    shared: std::sync::Arc<report::Shared>,
    signer: Option<braid_core::token::Signer>,
    /// (when, bytes sent then), for the egress rate.
    egress_mark: (Instant, u64),
    last_drain_signal: Option<Instant>,
    /// QUIC peers whose connection is down (an edge moves its subscriptions off them).
    quic_down: std::collections::HashSet<SocketAddr>,
    /// Set role: new subscriptions left this second, per IP address.
    subscribe_budget: HashMap<std::net::IpAddr, (Instant, u32)>,
    /// Peers already logged as refused (one line each, the counter counts them all).
    warned: std::collections::HashSet<SocketAddr>,
}

/// What a viewer asked for, from whichever transport.
struct WatchRequest {
    key: ViewerKey,
    transport: Transport,
    stream: StreamId,
    watch: Watch,
}

/// Binds the UDP socket and, for an edge, the TCP listener for viewers on the same
/// address and port number. With port 0 the kernel picks the UDP port, which TCP may
/// already use: then another UDP port is tried (at most 20).
async fn bind(
    config: &Config,
    role_name: &'static str,
) -> anyhow::Result<(Socket, Option<tokio::net::TcpListener>)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let socket = Socket::bind(config.listen, config.impair.clone(), role_name)
            .with_context(|| format!("binding {}", config.listen))?;
        if config.role != Role::Edge {
            return Ok((socket, None));
        }
        let udp_addr = socket.local_addr()?;
        match tokio::net::TcpListener::bind(udp_addr).await {
            Ok(l) => return Ok((socket, Some(l))),
            Err(e) if config.listen.port() == 0 && attempt < 20 => {
                tracing::debug!("TCP port {udp_addr} taken ({e}); trying another");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("binding TCP {udp_addr} for viewers"));
            }
        }
    }
}

/// Runs the reflector until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let codec = Codec::new(braid_net::daemon::network_key(&config.network_key)?);
    let role_name = match config.role {
        Role::Set => "set",
        Role::Edge => "edge",
    };
    let (mut socket, tcp_listener) = bind(&config, role_name).await?;
    // An edge with a certificate serves viewers over QUIC whether or not a QUIC port is
    // given: on an ephemeral port of its UDP address's IP, reported to the control server.
    let mut quic_options = config.quic.clone();
    if config.role == Role::Edge && config.tls.has_identity() && quic_options.listen.is_none() {
        quic_options.listen = Some(SocketAddr::new(config.listen.ip(), 0));
    }
    let quic_addr = braid_net::daemon::start_quic(
        &mut socket,
        &quic_options,
        &config.tls,
        role_name,
        &config.reflectors,
    )?;
    // Entry points dial their set reflectors; a set reflector only knows them as QUIC
    // peers, so the two never dial each other at once.
    if let Some(q) = socket.quic_mut() {
        for u in config.upstreams.iter().filter(|u| u.is_quic()) {
            q.add_known(u.addr);
        }
    }
    let metrics_addr = braid_net::daemon::serve_metrics(config.metrics, shutdown.clone()).await?;
    let udp_addr = socket.local_addr()?;
    let mut ready = vec![
        ("udp", udp_addr.to_string()),
        ("metrics", metrics_addr.to_string()),
    ];
    if let Some(q) = quic_addr {
        ready.push(("quic", q.to_string()));
    }
    let (tcp_tx, mut tcp_rx) = mpsc::channel::<tcp::Event>(1024);
    if config.role == Role::Edge {
        let listener = tcp_listener.context("an edge has a TCP listener")?;
        ready.push(("tcp", listener.local_addr()?.to_string()));
        tokio::spawn(tcp::accept(
            listener,
            codec.clone(),
            tcp_tx,
            shutdown.clone(),
        ));
    } else {
        drop(tcp_tx);
    }
    braid_net::daemon::print_ready(role_name, &ready);
    let shared = std::sync::Arc::new(report::Shared::default());
    report::spawn(
        config.controls.clone(),
        report::Identity {
            node: config.node_id,
            role: role_name,
            addr: udp_addr,
            quic: quic_addr,
            learn_quic: config.tls.has_identity(),
            region: config.region.clone(),
            capacity: config.max_viewers as u64,
            cost_tier: config.cost_tier,
        },
        shared.clone(),
        shutdown.clone(),
    );
    let signer = (!config.token_secret.is_empty())
        .then(|| braid_core::token::Signer::new(&config.token_secret));
    let mut node = Node {
        node: NodeId(config.node_id),
        config,
        codec,
        socket,
        streams: HashMap::new(),
        out: BytesMut::with_capacity(2048),
        viewers: 0,
        shared,
        signer,
        egress_mark: (Instant::now(), 0),
        last_drain_signal: None,
        quic_down: std::collections::HashSet::new(),
        subscribe_budget: HashMap::new(),
        warned: std::collections::HashSet::new(),
    };
    let mut rx = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let deadline = node.next_deadline();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            res = node.socket.recv(&mut rx) => {
                res.context("receiving")?;
                let now = Instant::now();
                for (from, bytes) in rx.drain(..) {
                    node.handle_datagram(now, from, bytes);
                }
                node.handle_changes(now);
                node.poll(now);
            }
            _ = braid_net::daemon::sleep_until(deadline) => {
                let now = Instant::now();
                node.socket.handle_timeout(now);
                node.poll(now);
            }
            Some(ev) = tcp_rx.recv() => {
                let now = Instant::now();
                node.handle_tcp(now, ev);
                while let Ok(ev) = tcp_rx.try_recv() {
                    node.handle_tcp(now, ev);
                }
                node.socket.flush();
            }
            _ = tick.tick() => {
                let now = Instant::now();
                node.housekeeping(now);
                node.poll(now);
            }
        }
    }
    node.leave();
    if let Some(q) = node.socket.quic() {
        q.close();
    }
    tracing::info!("reflector stopped");
    Ok(())
}

impl Node {
    fn next_deadline(&self) -> Option<Instant> {
        let mut d = self.socket.next_timeout();
        for s in self.streams.values() {
            if let Some(t) = s.merge.next_timeout() {
                d = Some(d.map_or(t, |d| d.min(t)));
            }
        }
        d
    }

    fn stream_allowed(&self, id: StreamId) -> bool {
        self.config.streams.is_empty() || self.config.streams.contains(&id.0)
    }

    fn stream(&mut self, id: StreamId, now: Instant) -> anyhow::Result<&mut Stream> {
        if !self.streams.contains_key(&id) {
            let kept_config = match self.config.role {
                Role::Set => ring::Config {
                    max_age: Duration::from_millis(self.config.retransmit_ms),
                    ..ring::Config::default()
                },
                Role::Edge => self.config.ring_config()?,
            };
            tracing::info!(stream = id.0, "stream opened");
            self.streams.insert(
                id,
                Stream {
                    id,
                    merge: merge::Buffer::new(self.config.merge_config())?,
                    kept: Ring::new(kept_config)?,
                    subscribers: HashMap::new(),
                    dynamic_paths: Vec::new(),
                    viewers: HashMap::new(),
                    upstream: Vec::new(),
                    last_refresh: None,
                    empty_since: Some(now),
                },
            );
        }
        Ok(self.streams.get_mut(&id).expect("inserted above"))
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: Bytes) {
        let role = self.config.role;
        let msg = match self.codec.decode(bytes.clone()) {
            Ok(m) => m,
            Err(e) => {
                dropped(role, e.reason());
                return;
            }
        };
        let id = msg.header.stream;
        if !self.stream_allowed(id) {
            dropped(role, "unknown_stream");
            self.reply_error(
                now,
                from,
                id,
                ErrorCode::UNKNOWN_STREAM,
                "stream not carried here",
            );
            return;
        }
        // Node-only requests: media into a reflector, subscriptions to a set reflector,
        // repairs asked of it. Over QUIC the peer must have shown a trusted certificate.
        let node_only = matches!(
            (role, &msg.body),
            (_, Body::Media(_))
                | (
                    Role::Set,
                    Body::Subscribe(_) | Body::Refresh(_) | Body::Nack(_)
                )
        );
        if node_only && !self.socket.is_node(from) {
            dropped(role, "not_a_node");
            if self.warned.len() < 1024 && self.warned.insert(from) {
                tracing::warn!(peer = %from, "refused: node-only request from a QUIC peer without a trusted certificate");
            }
            if matches!(msg.body, Body::Subscribe(_) | Body::Refresh(_)) {
                self.reply_error(
                    now,
                    from,
                    id,
                    ErrorCode::UNAUTHORIZED,
                    "subscribing needs a node certificate",
                );
            }
            return;
        }
        match (role, msg.body) {
            (_, Body::Media(media)) => self.handle_media(now, from, id, bytes, msg.header, media),
            (Role::Set, Body::Subscribe(s) | Body::Refresh(s)) => {
                self.handle_subscriber(now, from, id, s)
            }
            (Role::Edge, Body::Watch(watch)) => self.handle_watch(
                now,
                WatchRequest {
                    key: ViewerKey::Udp(from),
                    transport: Transport::Udp(from),
                    stream: id,
                    watch,
                },
            ),
            (Role::Set, Body::Unsubscribe { .. }) => {
                if let Some(st) = self.streams.get_mut(&id) {
                    st.subscribers.remove(&from);
                }
            }
            (Role::Edge, Body::Unsubscribe { .. }) => self.remove_viewer(id, ViewerKey::Udp(from)),
            (_, Body::Nack(ranges)) => self.handle_nack(now, from, id, ranges),
            (Role::Edge, Body::Keepalive(k)) => {
                // A viewer probing this edge: echo its time so it can measure the round trip.
                let reply = Body::Keepalive(braid_core::wire::Keepalive {
                    node: self.node,
                    sent_us: 0,
                    echo_us: k.sent_us,
                });
                let d = self.control_datagram(id, reply);
                self.socket.send(now, from, d, false);
            }
            (_, Body::Keepalive(_)) => {}
            _ => dropped(role, "unexpected_kind"),
        }
    }

    fn path_of(&mut self, id: StreamId, from: SocketAddr) -> Option<PathId> {
        match self.config.role {
            Role::Edge => self
                .config
                .reflectors
                .iter()
                .position(|r| r.addr == from)
                .map(|i| PathId(i as u8)),
            Role::Set if !self.config.upstreams.is_empty() => self
                .config
                .upstreams
                .iter()
                .position(|r| r.addr == from)
                .map(|i| PathId(i as u8)),
            Role::Set => {
                let st = self.streams.get_mut(&id)?;
                if let Some(i) = st.dynamic_paths.iter().position(|a| *a == from) {
                    return Some(PathId(i as u8));
                }
                if st.dynamic_paths.len() >= 64 {
                    return None;
                }
                st.dynamic_paths.push(from);
                Some(PathId((st.dynamic_paths.len() - 1) as u8))
            }
        }
    }

    fn path_addr(&self, st: &Stream, path: PathId) -> Option<SocketAddr> {
        let i = usize::from(path.0);
        match self.config.role {
            Role::Edge => self.config.reflectors.get(i).map(|p| p.addr),
            Role::Set if !self.config.upstreams.is_empty() => {
                self.config.upstreams.get(i).map(|p| p.addr)
            }
            Role::Set => st.dynamic_paths.get(i).copied(),
        }
    }

    fn handle_media(
        &mut self,
        now: Instant,
        from: SocketAddr,
        id: StreamId,
        datagram: Bytes,
        header: Header,
        media: Media,
    ) {
        let role = self.config.role;
        if role == Role::Edge && !self.streams.contains_key(&id) {
            // Nobody watches it here (any more): the subscription will lapse.
            dropped(role, "not_subscribed");
            return;
        }
        if let Err(e) = self.stream(id, now) {
            tracing::error!("cannot open stream {id}: {e:#}");
            return;
        }
        let Some(path) = self.path_of(id, from) else {
            dropped(role, "unknown_peer");
            return;
        };
        if header.flags.contains(Flags::DISCONTINUITY) {
            if let Some(st) = self.streams.get_mut(&id) {
                if st
                    .merge
                    .next_seq()
                    .is_some_and(|n| media.seq.0.abs_diff(n.0) > 1 << 16)
                {
                    st.merge.reset();
                }
            }
        }
        let seq = media.seq;
        let st = self.streams.get_mut(&id).expect("opened above");
        st.merge.handle_input(
            now,
            merge::Input::Packet {
                path,
                seq,
                item: Packet {
                    datagram,
                    header,
                    media,
                },
            },
        );
    }

    fn handle_subscriber(&mut self, now: Instant, from: SocketAddr, id: StreamId, s: Subscription) {
        let max = self.config.max_per_stream;
        let Ok(st) = self.stream(id, now) else {
            return;
        };
        let new = !st.subscribers.contains_key(&from);
        if new && !self.subscribe_allowed(now, from) {
            dropped(Role::Set, "subscribe_rate");
            self.reply_error(
                now,
                from,
                id,
                ErrorCode::CAPACITY,
                "too many new subscriptions from this address: slow down",
            );
            return;
        }
        let Ok(st) = self.stream(id, now) else {
            return;
        };
        if new && st.subscribers.len() >= max {
            dropped(Role::Set, "subscriber_cap");
            self.reply_error(
                now,
                from,
                id,
                ErrorCode::CAPACITY,
                "too many subscribers for this stream",
            );
            return;
        }
        let lease = Duration::from_millis(u64::from(s.lease_ms)).min(MAX_LEASE);
        if st.subscribers.insert(from, now + lease).is_none() {
            tracing::info!(stream = id.0, subscriber = %from, "subscribed");
        }
    }

    /// Spends one of `from`'s IP address's new subscriptions for this second.
    fn subscribe_allowed(&mut self, now: Instant, from: SocketAddr) -> bool {
        let rate = self.config.subscribe_rate;
        if self.subscribe_budget.len() > 4096 {
            self.subscribe_budget
                .retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(1));
        }
        let (since, left) = self
            .subscribe_budget
            .entry(from.ip())
            .or_insert((now, rate));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            *since = now;
            *left = rate;
        }
        if *left == 0 {
            return false;
        }
        *left -= 1;
        true
    }

    /// Acts on QUIC connections that went down: a set reflector forgets the subscriber
    /// at once, an edge its viewer, and moves its subscriptions off a set reflector.
    fn handle_changes(&mut self, now: Instant) {
        for c in self.socket.take_changes() {
            match c {
                braid_net::quic::Change::Up { peer, .. } => {
                    self.quic_down.remove(&peer);
                }
                braid_net::quic::Change::Down { peer, .. } => {
                    let ids: Vec<StreamId> = self.streams.keys().copied().collect();
                    for id in ids {
                        if let Some(st) = self.streams.get_mut(&id) {
                            st.subscribers.remove(&peer);
                        }
                        self.remove_viewer(id, ViewerKey::Udp(peer));
                    }
                    if self.config.reflectors.iter().any(|r| r.addr == peer) {
                        self.quic_down.insert(peer);
                        self.housekeeping(now);
                    }
                }
            }
        }
    }

    fn handle_tcp(&mut self, now: Instant, ev: tcp::Event) {
        match ev {
            tcp::Event::Message {
                conn,
                peer,
                msg,
                writer,
            } => {
                let id = msg.header.stream;
                let key = ViewerKey::Tcp(conn);
                match msg.body {
                    Body::Watch(watch) if self.stream_allowed(id) => self.handle_watch(
                        now,
                        WatchRequest {
                            key,
                            transport: Transport::Tcp(writer),
                            stream: id,
                            watch,
                        },
                    ),
                    Body::Watch(_) => {
                        dropped(Role::Edge, "unknown_stream");
                        let d = self.error_datagram(
                            id,
                            ErrorCode::UNKNOWN_STREAM,
                            "stream not carried here",
                        );
                        deliver(&mut self.socket, now, &Transport::Tcp(writer), d, false);
                    }
                    Body::Unsubscribe { .. } => self.remove_viewer(id, key),
                    _ => {
                        tracing::debug!("unexpected message from TCP viewer {peer}");
                        dropped(Role::Edge, "unexpected_kind");
                    }
                }
            }
            tcp::Event::Gone { conn } => {
                let ids: Vec<StreamId> = self.streams.keys().copied().collect();
                for id in ids {
                    self.remove_viewer(id, ViewerKey::Tcp(conn));
                }
            }
            tcp::Event::Malformed { reason } => dropped(Role::Edge, reason),
        }
    }

    fn remove_viewer(&mut self, id: StreamId, key: ViewerKey) {
        if let Some(st) = self.streams.get_mut(&id) {
            if st.viewers.remove(&key).is_some() {
                self.viewers -= 1;
                metrics::counter!("braid_edge_viewer_leaves_total").increment(1);
            }
        }
    }

    fn handle_watch(&mut self, now: Instant, req: WatchRequest) {
        let (max_stream, max_node) = (self.config.max_per_stream, self.config.max_viewers);
        let node_full = self.viewers >= max_node;
        let id = req.stream;
        let Ok(st) = self.stream(id, now) else {
            return;
        };
        let lease = Duration::from_millis(u64::from(req.watch.lease_ms)).min(MAX_LEASE);
        if let Some(v) = st.viewers.get_mut(&req.key) {
            v.expires = now + lease;
            if req.watch.acked > v.acked {
                v.acked = req.watch.acked;
            }
            // The window may have opened: serve this viewer now.
            self.serve_one(now, id, req.key);
            return;
        }
        let draining = self.shared.drain.load(std::sync::atomic::Ordering::Relaxed);
        if draining {
            dropped(Role::Edge, "draining");
            self.refuse(
                now,
                &req.transport,
                id,
                ErrorCode::DRAINING,
                "this edge is draining: ask the control server for another",
            );
            return;
        }
        if let Some(signer) = &self.signer {
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let token = std::str::from_utf8(&req.watch.token).unwrap_or("");
            if let Err(e) = signer.verify_for(id, token, unix) {
                dropped(Role::Edge, "bad_token");
                let text = format!("viewer token refused: {e}");
                self.refuse(now, &req.transport, id, ErrorCode::UNAUTHORIZED, &text);
                return;
            }
        }
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        if st.viewers.len() >= max_stream || node_full {
            dropped(Role::Edge, "viewer_cap");
            let text = if node_full {
                "this edge is full: too many viewers on this node"
            } else {
                "too many viewers for this stream on this edge"
            };
            self.refuse(now, &req.transport, id, ErrorCode::CAPACITY, text);
            return;
        }
        st.viewers.insert(
            req.key,
            Viewer {
                transport: req.transport,
                cursor: None,
                start: req.watch.start,
                start_seq: req.watch.seq,
                expires: now + lease,
                acked: req.watch.acked,
                first_sent: SeqNo(0),
            },
        );
        st.empty_since = None;
        let needs_upstream = st.upstream.is_empty();
        self.viewers += 1;
        metrics::counter!("braid_edge_viewer_joins_total").increment(1);
        tracing::info!(stream = id.0, viewer = ?req.key, "viewer joined");
        if needs_upstream {
            self.subscribe_upstream(now, id);
        }
        self.serve_one(now, id, req.key);
    }

    fn serve_one(&mut self, now: Instant, id: StreamId, key: ViewerKey) {
        if let Some(mut st) = self.streams.remove(&id) {
            self.serve(now, &mut st, Some(key));
            self.streams.insert(id, st);
        }
    }

    fn error_datagram(&mut self, stream: StreamId, code: ErrorCode, text: &str) -> Bytes {
        self.control_datagram(
            stream,
            Body::Error {
                code,
                text: text.into(),
            },
        )
    }

    fn control_datagram(&mut self, stream: StreamId, body: Body) -> Bytes {
        self.out.clear();
        let msg = Message {
            header: Header {
                stream,
                ..Header::default()
            },
            body,
        };
        // Control bodies built here are always within the protocol's bounds.
        let _ = self.codec.encode(&msg, &mut self.out);
        self.out.split().freeze()
    }

    fn refuse(
        &mut self,
        now: Instant,
        to: &Transport,
        stream: StreamId,
        code: ErrorCode,
        text: &str,
    ) {
        let d = self.error_datagram(stream, code, text);
        deliver(&mut self.socket, now, to, d, false);
    }

    /// Answers a NACK from a subscribed edge (set role) or a viewer (edge role) from the
    /// packets kept, re-encoded with the retransmission flag; at most
    /// `MAX_NACK_ANSWER` numbers per NACK, and only to nodes served here.
    fn handle_nack(&mut self, now: Instant, from: SocketAddr, id: StreamId, ranges: Vec<SeqRange>) {
        let role = self.config.role;
        let Some(st) = self.streams.get(&id) else {
            dropped(role, "nack_unknown_stream");
            return;
        };
        let served = match role {
            Role::Set => st.subscribers.contains_key(&from),
            Role::Edge => st.viewers.contains_key(&ViewerKey::Udp(from)),
        };
        if !served {
            dropped(role, "nack_from_stranger");
            return;
        }
        let asked = ranges
            .iter()
            .flat_map(|r| (0..u64::from(r.count)).map(move |i| r.first.plus(i)));
        for (n, seq) in asked.enumerate() {
            if n as u64 >= MAX_NACK_ANSWER {
                dropped(role, "nack_over_limit");
                return;
            }
            let Some(e) = st.kept.get(seq) else {
                metrics::counter!("braid_retransmit_missing_total", "role" => role_name(role))
                    .increment(1);
                continue;
            };
            self.out.clear();
            let header = Header {
                flags: e.item.header.flags | Flags::RETRANSMIT,
                ..e.item.header
            };
            if self
                .codec
                .encode_media(header, seq, &e.item.media.rtp, &mut self.out)
                .is_ok()
            {
                self.socket.send(now, from, self.out.split().freeze(), true);
                metrics::counter!("braid_retransmit_sent_total", "role" => role_name(role))
                    .increment(1);
            }
        }
    }

    /// Drains every merge buffer: forwards (set) or rings and serves (edge), asks for
    /// what is missing, counts gaps; then sends.
    fn poll(&mut self, now: Instant) {
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            self.poll_stream(now, id);
        }
        self.socket.flush();
    }

    fn poll_stream(&mut self, now: Instant, id: StreamId) {
        let role = self.config.role;
        let Some(mut st) = self.streams.remove(&id) else {
            return;
        };
        st.merge.handle_timeout(now);
        let mut pushed = false;
        loop {
            match st.merge.poll_output() {
                Output::Packet { seq, item } => {
                    let keyframe = item.header.flags.contains(Flags::KEYFRAME);
                    if role == Role::Set {
                        for (&to, &expires) in &st.subscribers {
                            if expires > now {
                                self.socket.send(now, to, item.datagram.clone(), true);
                            }
                        }
                    }
                    let size = item.datagram.len();
                    st.kept.push(now, seq, keyframe, size, item);
                    pushed = true;
                }
                Output::Gap { count, .. } => {
                    metrics::counter!("braid_merge_gap_packets_total", "role" => role_name(role))
                        .increment(count);
                }
                Output::Nack { range, path } => {
                    if let Some(to) = self.path_addr(&st, path) {
                        self.out.clear();
                        let msg = Message {
                            header: Header {
                                stream: id,
                                ..Header::default()
                            },
                            body: Body::Nack(vec![range]),
                        };
                        if self.codec.encode(&msg, &mut self.out).is_ok() {
                            self.socket.send(now, to, self.out.split().freeze(), false);
                            metrics::counter!("braid_nack_sent_total", "role" => role_name(role))
                                .increment(1);
                        }
                    }
                }
                Output::Timeout(_) => break,
            }
        }
        if role == Role::Edge && pushed {
            self.serve(now, &mut st, None);
        }
        self.streams.insert(id, st);
    }

    /// Sends each viewer (or only `only`) what its cursor has to read, within its flow
    /// window (UDP) or queue (TCP), and places the cursors of viewers still waiting for
    /// their start.
    fn serve(&mut self, now: Instant, st: &mut Stream, only: Option<ViewerKey>) {
        let window = self.config.viewer_window;
        let mut notices: Vec<(ViewerKey, NoticeKind, u64)> = Vec::new();
        for (&key, v) in st.viewers.iter_mut() {
            if only.is_some_and(|k| k != key) {
                continue;
            }
            if v.cursor.is_none() {
                let start = match v.start {
                    WatchStart::Keyframe => Start::Keyframe,
                    WatchStart::Seq => Start::Seq(v.start_seq),
                    WatchStart::Live => Start::Live,
                };
                // A resume waits for packets to arrive; a keyframe start for a keyframe.
                if v.start != WatchStart::Keyframe && st.kept.is_empty() {
                    continue;
                }
                if let Ok((c, missed)) = st.kept.cursor(start) {
                    v.cursor = Some(c);
                    let first = st.kept.peek(&c).map_or(SeqNo(0), |e| e.seq);
                    notices.push((key, NoticeKind::Joined, first.0));
                    if missed > 0 {
                        metrics::counter!("braid_edge_resume_missed_packets_total")
                            .increment(missed);
                        notices.push((key, NoticeKind::Missed, missed));
                    }
                }
            }
            let Some(cursor) = v.cursor.as_mut() else {
                continue;
            };
            loop {
                // An overtaken cursor is moved on (and counted) whatever its window says.
                let overtaken = st.kept.overtaken(cursor);
                match &v.transport {
                    _ if overtaken => {}
                    Transport::Udp(_) => {
                        // Until the viewer acknowledges anything, the window counts from
                        // the first packet sent to it.
                        if let Some(e) = st.kept.peek(cursor) {
                            let base = if v.acked.0 > 0 {
                                v.acked.0
                            } else if v.first_sent.0 > 0 {
                                v.first_sent.0
                            } else {
                                e.seq.0
                            };
                            if e.seq.0 >= base + window {
                                break;
                            }
                        }
                    }
                    Transport::Tcp(w) => {
                        if w.capacity() == 0 {
                            break;
                        }
                    }
                }
                match st.kept.read(cursor) {
                    Read::Packet(e) => {
                        if v.first_sent.0 == 0 {
                            v.first_sent = e.seq;
                        }
                        deliver(
                            &mut self.socket,
                            now,
                            &v.transport,
                            e.item.datagram.clone(),
                            true,
                        );
                    }
                    Read::Skipped { lost } => {
                        metrics::counter!("braid_edge_viewer_skipped_packets_total")
                            .increment(lost);
                        metrics::counter!("braid_edge_viewer_skips_total").increment(1);
                        notices.push((key, NoticeKind::Skipped, lost));
                    }
                    Read::Pending => break,
                }
            }
        }
        for (key, kind, value) in notices {
            let d = self.control_datagram(st.id, Body::Notice { kind, value });
            if let Some(v) = st.viewers.get(&key) {
                deliver(&mut self.socket, now, &v.transport, d, false);
            }
        }
    }

    fn subscribe_upstream(&mut self, now: Instant, id: StreamId) {
        let k = self
            .config
            .subscribe_k
            .max(2)
            .min(self.config.reflectors.len());
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        // Keep the reflectors already subscribed; add unused ones up to k (an edge that
        // learns its reflectors from the control server tops up as it learns them).
        let before = st.upstream.len();
        let mut next = 0;
        while st.upstream.len() < k && next < self.config.reflectors.len() {
            if !st.upstream.iter().any(|(i, _)| *i == next) {
                st.upstream.push((next, now));
            }
            next += 1;
        }
        if st.upstream.len() > before {
            self.refresh_upstream(now, id, true);
        }
    }

    fn refresh_upstream(&mut self, now: Instant, id: StreamId, first: bool) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        st.last_refresh = Some(now);
        let targets: Vec<SocketAddr> = st
            .upstream
            .iter()
            .map(|(i, _)| self.config.reflectors[*i].addr)
            .collect();
        let s = Subscription {
            node: self.node,
            lease_ms: LEASE_MS,
        };
        let body = if first {
            Body::Subscribe(s)
        } else {
            Body::Refresh(s)
        };
        for to in targets {
            self.send_control(now, to, id, body.clone());
        }
    }

    fn send_control(&mut self, now: Instant, to: SocketAddr, stream: StreamId, body: Body) {
        self.out.clear();
        let msg = Message {
            header: Header {
                stream,
                ..Header::default()
            },
            body,
        };
        if self.codec.encode(&msg, &mut self.out).is_ok() {
            self.socket.send(now, to, self.out.split().freeze(), false);
        }
    }

    fn reply_error(
        &mut self,
        now: Instant,
        to: SocketAddr,
        stream: StreamId,
        code: ErrorCode,
        text: &str,
    ) {
        self.send_control(
            now,
            to,
            stream,
            Body::Error {
                code,
                text: text.into(),
            },
        );
    }

    /// Expiries, refreshes, path replacement, linger, metrics export.
    fn housekeeping(&mut self, now: Instant) {
        let role = self.config.role;
        // Due delayed datagrams, and QUIC peers gone long enough to forget.
        self.socket.handle_timeout(now);
        self.report_load(now);
        self.learn_reflectors();
        self.signal_drain(now);
        let mut close = Vec::new();
        let mut refresh = Vec::new();
        let mut gone_viewers = 0;
        let mut overtaken = Vec::new();
        let k = self
            .config
            .subscribe_k
            .max(2)
            .min(self.config.reflectors.len());
        let top_up: Vec<StreamId> = self
            .streams
            .values()
            .filter(|st| role == Role::Edge && !st.viewers.is_empty() && st.upstream.len() < k)
            .map(|st| st.id)
            .collect();
        for id in top_up {
            self.subscribe_upstream(now, id);
        }
        for st in self.streams.values_mut() {
            // Pushes evict by age; a stream gone silent is aged here.
            st.kept.handle_timeout(now);
            st.subscribers.retain(|_, exp| *exp > now);
            // A viewer that stopped reading stops its cursor; count its skip when the ring
            // overtakes it, not only when it comes back.
            if st
                .viewers
                .values()
                .any(|v| v.cursor.is_some_and(|c| st.kept.overtaken(&c)))
            {
                overtaken.push(st.id);
            }
            let before = st.viewers.len();
            st.viewers.retain(|_, v| v.expires > now);
            gone_viewers += before - st.viewers.len();
            if role == Role::Edge {
                if st.viewers.is_empty() {
                    let since = *st.empty_since.get_or_insert(now);
                    if now.duration_since(since) >= Duration::from_millis(self.config.linger_ms) {
                        close.push(st.id);
                        continue;
                    }
                }
                // Replace a subscribed set reflector that stopped delivering data.
                let n = self.config.reflectors.len();
                for j in 0..st.upstream.len() {
                    let (i, since) = st.upstream[j];
                    let dead = (now.duration_since(since) > PATH_DEAD
                        && !st.merge.is_healthy(PathId(i as u8)))
                        || self.quic_down.contains(&self.config.reflectors[i].addr);
                    if dead && n > st.upstream.len() {
                        let used: Vec<usize> = st.upstream.iter().map(|(i, _)| *i).collect();
                        let down =
                            |c: &usize| self.quic_down.contains(&self.config.reflectors[*c].addr);
                        if let Some(next) = (1..n)
                            .map(|d| (i + d) % n)
                            .find(|c| !used.contains(c) && !down(c))
                        {
                            tracing::warn!(stream = st.id.0, from = %self.config.reflectors[i], to = %self.config.reflectors[next], "set reflector delivers no data: moving the subscription");
                            metrics::counter!("braid_edge_path_replaced_total").increment(1);
                            st.upstream[j] = (next, now);
                            st.last_refresh = None;
                        }
                    }
                }
                if !st.upstream.is_empty()
                    && st
                        .last_refresh
                        .is_none_or(|t| now.duration_since(t) >= REFRESH)
                {
                    refresh.push((st.id, st.last_refresh.is_none()));
                }
            }
            export(role, st);
        }
        self.viewers -= gone_viewers;
        for id in overtaken {
            if let Some(mut st) = self.streams.remove(&id) {
                self.serve(now, &mut st, None);
                self.streams.insert(id, st);
            }
        }
        for (id, first) in refresh {
            self.refresh_upstream(now, id, first);
        }
        for id in close {
            if let Some(st) = self.streams.remove(&id) {
                tracing::info!(stream = id.0, "last viewer gone: unsubscribing");
                for (i, _) in st.upstream {
                    let to = self.config.reflectors[i].addr;
                    self.send_control(now, to, id, Body::Unsubscribe { node: self.node });
                }
            }
        }
        metrics::gauge!("braid_viewers").set(self.viewers as f64);
        self.socket.flush();
    }

    /// Adds set reflectors a control server lists that this edge does not know yet. The
    /// list only grows (paths are numbered by position); one that dies delivers nothing
    /// and is replaced by the dead-path rule.
    fn learn_reflectors(&mut self) {
        if self.config.role != Role::Edge || self.config.controls.is_empty() {
            return;
        }
        let listed = match self.shared.reflectors.lock() {
            Ok(r) => r.clone(),
            Err(_) => return,
        };
        for r in listed {
            if !self.config.reflectors.iter().any(|p| p.addr == r.addr)
                && self.config.reflectors.len() < 64
            {
                tracing::info!(reflector = %r, "learned a set reflector from the control server");
                if r.is_quic() {
                    if let Some(q) = self.socket.quic_mut() {
                        q.add_dial(r.addr);
                    }
                }
                self.config.reflectors.push(r);
            }
        }
    }

    /// Shares viewers and egress with the reporter thread.
    fn report_load(&mut self, now: Instant) {
        use std::sync::atomic::Ordering;
        self.shared
            .viewers
            .store(self.viewers as u64, Ordering::Relaxed);
        let (t0, b0) = self.egress_mark;
        let elapsed = now.saturating_duration_since(t0);
        if elapsed >= Duration::from_secs(1) {
            let bytes = self.socket.stats().sent_bytes;
            let bps = Bitrate::from_size_over(DataSize(bytes.saturating_sub(b0)), elapsed);
            self.shared.egress_bps.store(bps.0, Ordering::Relaxed);
            self.egress_mark = (now, bytes);
        }
    }

    /// A drained edge tells its viewers to switch, every second while any remain.
    fn signal_drain(&mut self, now: Instant) {
        if self.config.role != Role::Edge
            || !self.shared.drain.load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if self
            .last_drain_signal
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_drain_signal = Some(now);
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            let d = self.control_datagram(
                id,
                Body::Switch {
                    reason: braid_core::wire::SwitchReason::Drain,
                },
            );
            let Some(st) = self.streams.get(&id) else {
                continue;
            };
            for v in st.viewers.values() {
                deliver(&mut self.socket, now, &v.transport, d.clone(), false);
            }
            metrics::counter!("braid_edge_drain_signals_total").increment(st.viewers.len() as u64);
        }
    }

    /// On shutdown: an edge unsubscribes so the set reflectors stop at once.
    fn leave(&mut self) {
        let now = Instant::now();
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            let upstream: Vec<usize> = self.streams[&id].upstream.iter().map(|(i, _)| *i).collect();
            for i in upstream {
                let to = self.config.reflectors[i].addr;
                self.send_control(now, to, id, Body::Unsubscribe { node: self.node });
            }
        }
        self.socket.flush();
    }
}

/// Sends `d` to a viewer over its transport. A TCP viewer's queue that is full drops it,
/// counted (media never reaches here with a full queue: `serve` checks first).
fn deliver(socket: &mut Socket, now: Instant, to: &Transport, d: Bytes, is_data: bool) {
    match to {
        Transport::Udp(a) => socket.send(now, *a, d, is_data),
        Transport::Tcp(w) => {
            if w.try_send(d).is_err() {
                dropped(Role::Edge, "viewer_queue_full");
            }
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Set => "set",
        Role::Edge => "edge",
    }
}

/// Exports a stream's merge counters and per-path counters.
fn export(role: Role, st: &mut Stream) {
    let s = st.merge.stats();
    let stream = st.id.0.to_string();
    let r = role_name(role);
    let set = |name: &'static str, v: u64| {
        metrics::counter!(name, "role" => r, "stream" => stream.clone()).absolute(v);
    };
    set("braid_merge_released_total", s.released);
    set("braid_merge_gaps_total", s.gaps);
    set("braid_merge_duplicates_total", s.duplicates);
    set("braid_merge_late_total", s.late);
    set("braid_merge_nacked_total", s.nacked);
    set("braid_merge_repaired_total", s.repaired);
    set("braid_merge_jumps_total", s.jumps);
    for (path, p) in st.merge.paths() {
        let path = path.0.to_string();
        let set = |name: &'static str, v: u64| {
            metrics::counter!(name, "role" => r, "stream" => stream.clone(), "path" => path.clone()).absolute(v);
        };
        set("braid_path_received_total", p.received);
        set("braid_path_first_total", p.first);
        set("braid_path_duplicates_total", p.duplicates);
        set("braid_path_late_total", p.late);
    }
    metrics::gauge!("braid_stream_viewers", "stream" => stream.clone())
        .set(st.viewers.len() as f64);
    metrics::gauge!("braid_stream_subscribers", "stream" => stream)
        .set(st.subscribers.len() as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_config_needs_reflectors() {
        let c = Config::try_parse_from([
            "braid-reflector",
            "--role",
            "edge",
            "--network-key",
            "a network key",
        ])
        .unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("set reflectors")
        );
        let c = Config::try_parse_from([
            "braid-reflector",
            "--role",
            "edge",
            "--network-key",
            "a network key",
            "--reflector",
            "127.0.0.1:1",
            "--reflector",
            "127.0.0.1:2",
        ])
        .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn toml_config_refuses_unknown_fields() {
        assert!(
            toml::from_str::<Config>("role = \"set\"\nnetwork_key = \"a network key\"").is_ok()
        );
        assert!(toml::from_str::<Config>("role = \"set\"\nwindow = 3").is_err());
        assert!(toml::from_str::<Config>("role = \"middle\"").is_err());
    }

    #[test]
    fn window_too_small_for_repair_is_refused() {
        let c = Config::try_parse_from([
            "braid-reflector",
            "--role",
            "set",
            "--network-key",
            "a network key",
            "--reorder-window-ms",
            "0",
        ])
        .unwrap();
        assert!(c.validate().is_err());
    }
}
