//! QUIC links (quinn-proto through [`crate::quic_core`]), driven from a daemon's one task
//! like its UDP socket: no connection has a task, a channel or a transmit buffer of its own.
//!
//! - **One connection per node pair** carries every stream, both ways: whichever side dials
//!   first, the other sends on the same connection. Peers are known by the address of
//!   their QUIC endpoint, which is a different port from their UDP socket, so one
//!   `SocketAddr` still says both who and over what.
//! - **Media as DATAGRAMs** (RFC 9221): no copy ever waits behind another; the merge and
//!   its repairs recover what is lost, as over UDP. **Control** (subscriptions, NACKs,
//!   watch messages, notices, errors) goes on one unidirectional stream per direction,
//!   each message framed by a 2-byte length, so it is delivered reliably and in order.
//! - **Dead peers** are noticed in about a second: keep-alives every 200 ms and a 1 s
//!   idle timeout instead of quinn's 30 s. A dialed peer is redialed on the next send,
//!   with a backoff from 100 ms doubling to 5 s while dials fail.
//! - **Nothing is lost silently**: a datagram larger than the connection can carry (path
//!   MTU), one that does not fit the send buffer, one for a peer not connected, and a
//!   control message over the queue limit are each counted in `braid_quic_dropped_total`
//!   by reason.
//! - **Limits**: at most `max_conns_per_ip` connections from one IP address; more are
//!   refused and counted. Handshakes that fail (an untrusted certificate on either side)
//!   are logged and counted in `braid_quic_handshake_failed_total` (by `side` and `reason`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{ConnectionHandle, SendDatagramError, Transmit};
use serde::{Deserialize, Serialize};

use crate::quic_core::{ControlError, Core, CoreEvent};

use crate::tls::Tls;
use crate::udp::Impairments;

/// The idle timeout: a peer silent this long is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Keep-alive interval: several fit in the idle timeout, so one lost packet is no outage.
pub const KEEP_ALIVE: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Control messages kept for a peer while it is being dialed.
const PENDING_MAX: usize = 64;
/// Bytes of datagrams quinn keeps for one connection before the daemon's task reads them
/// (the core drains them as each packet is handled).
const DATAGRAM_RECEIVE_BUFFER: usize = 1 << 20;
/// Bytes of one stream's data a peer may send beyond what was read: what the endpoint holds
/// for it while a lost packet delays the rest. A control message is at most 9,002 bytes
/// framed, read as it comes; quinn's default (1.25 MB) would let a peer park that much
/// per stream.
pub(crate) const STREAM_RECEIVE_WINDOW: u32 = 64 * 1024;
/// The same for all of a connection's streams together (quinn's default has no bound):
/// the four streams a peer may open.
pub(crate) const RECEIVE_WINDOW: u32 = 4 * STREAM_RECEIVE_WINDOW;
/// Bytes of datagrams waiting for a connection's congestion window.
const DATAGRAM_SEND_BUFFER: usize = 256 << 10;
/// The round trip assumed before one is measured (quinn's default is RFC 9002's 333 ms).
const INITIAL_RTT: Duration = Duration::from_millis(100);
/// A connection gone and not dialed by us is forgotten after this long.
const FORGET_AFTER: Duration = Duration::from_secs(10);
/// At most one warning per connection this often about datagrams dropped for a full send
/// buffer (each is counted).
const FULL_WARN_EVERY: Duration = Duration::from_secs(5);

/// QUIC settings of a daemon (`[quic]` in TOML, `--quic-*` flags).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Address of this node's QUIC endpoint (a UDP port of its own); needs a TLS
    /// certificate to accept connections.
    #[arg(long = "quic-listen", id = "quic_listen")]
    pub listen: Option<SocketAddr>,
    /// UDP payload size of QUIC packets, in bytes: the path MTU Braid relies on (no
    /// discovery, no fallback). 1452 fits any path with a 1500-byte MTU over IPv4 or
    /// IPv6 and carries a 7-TS-packet RTP packet with its envelope (1356 bytes, 1372
    /// with an HLS segment number) as one datagram; at 1200 only 5 TS packets per RTP
    /// packet fit.
    #[arg(
        long = "quic-initial-mtu",
        id = "quic_initial_mtu",
        default_value_t = 1452
    )]
    pub initial_mtu: u16,
    /// Most QUIC connections accepted from one IP address.
    #[arg(
        long = "quic-max-conns-per-ip",
        id = "quic_max_conns_per_ip",
        default_value_t = 64
    )]
    pub max_conns_per_ip: usize,
    /// Congestion controller of QUIC links: `cubic` (quinn's default) or `bbr` (quinn marks
    /// it experimental; it kept the latency tail far lower under heavy random loss, see
    /// BENCHMARKS.md).
    #[arg(
        long = "quic-congestion",
        id = "quic_congestion",
        value_enum,
        default_value = "cubic"
    )]
    pub congestion: Congestion,
}

/// A QUIC congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC, quinn's default.
    #[default]
    Cubic,
    /// BBR (experimental in quinn).
    Bbr,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: None,
            initial_mtu: 1452,
            max_conns_per_ip: 64,
            congestion: Congestion::Cubic,
        }
    }
}

impl Options {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        if !(1200..=9000).contains(&self.initial_mtu) {
            return Err(format!(
                "quic initial_mtu must be between 1200 and 9000 bytes, not {}",
                self.initial_mtu
            ));
        }
        if self.max_conns_per_ip == 0 {
            return Err("quic max_conns_per_ip must be at least 1".into());
        }
        Ok(())
    }
}

/// A change in a peer's connection, for the daemon to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A connection is up; `node` says whether the peer proved itself a node.
    Up {
        /// The peer's QUIC address.
        peer: SocketAddr,
        /// Authenticated by a trusted certificate.
        node: bool,
    },
    /// The connection closed or timed out.
    Down {
        /// The peer's QUIC address.
        peer: SocketAddr,
        /// Why, as quinn says it.
        reason: String,
    },
}

/// Counters of a QUIC endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to quinn.
    pub datagrams_sent: u64,
    /// Control messages queued on a stream.
    pub messages_sent: u64,
    /// Bytes of both.
    pub sent_bytes: u64,
    /// Messages received (datagrams and stream messages).
    pub received: u64,
    /// Messages not sent, every reason.
    pub dropped: u64,
}

struct Conn {
    ch: ConnectionHandle,
    node: bool,
    warned_size: bool,
    /// Datagrams dropped for a full send buffer since the last warning about it.
    full_since_warned: u64,
    /// When that warning was.
    warned_full: Option<Instant>,
}

#[derive(Default)]
struct Peer {
    dial: bool,
    conn: Option<Conn>,
    /// The connection being dialed, until it is up or fails.
    connecting: Option<ConnectionHandle>,
    pending: Vec<Bytes>,
    retry_at: Option<Instant>,
    backoff: Duration,
    down_since: Option<Instant>,
    /// When its connection came up: one that dies within [`STABLE`] does not reset the
    /// backoff (a peer refusing this node's certificate after the handshake would
    /// otherwise be redialed at once, over and over).
    up_since: Option<Instant>,
    /// What this node dials it with (see [`Quic::peer_client`]).
    client: Option<quinn::ClientConfig>,
}

/// A connection up this long counts as working: losing it then redials at once.
const STABLE: Duration = Duration::from_secs(2);

/// A daemon's QUIC endpoint and its connections. Owned by the daemon's task, inside its
/// [`crate::udp::Socket`], and driven from it: no connection has a task, a channel or a
/// transmit buffer of its own ([`crate::quic_core`]).
pub struct Quic {
    core: Core,
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    /// One receive buffer for the endpoint, in `BATCH_SIZE` slots.
    recv_buf: Box<[u8]>,
    client: quinn::ClientConfig,
    /// The TLS side of `client`, and its transport, for each dialed peer's own.
    client_tls: rustls::ClientConfig,
    transport: Arc<quinn::TransportConfig>,
    server_name: Option<String>,
    peers: HashMap<SocketAddr, Peer>,
    changes: Vec<Change>,
    /// A change was made that the owner has not been woken for.
    changed: bool,
    /// What the core said happened, kept for its room between calls.
    events: Vec<CoreEvent>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    stats: Stats,
    /// Per-packet counters, looked up once (on first use: after the daemon installed
    /// its metrics recorder) instead of by name for every datagram.
    counters: Option<Counters>,
    role: &'static str,
    accepting: bool,
    closing: bool,
}

struct Counters {
    datagrams: metrics::Counter,
    bytes: metrics::Counter,
}

impl Counters {
    fn new(role: &'static str) -> Counters {
        Counters {
            datagrams: metrics::counter!("braid_quic_datagrams_sent_total", "role" => role),
            bytes: metrics::counter!("braid_quic_sent_bytes_total", "role" => role),
        }
    }
}

impl std::fmt::Debug for Quic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quic")
            .field("local", &self.socket.local_addr().ok())
            .field("peers", &self.peers.len())
            .field("connections", &self.core.connections())
            .field("stats", &self.stats)
            .finish()
    }
}

pub(crate) fn transport(initial_mtu: u16, congestion: Congestion) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("1 s is a valid idle timeout"),
    ));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // A lost handshake packet is sent again after three of these: a node whose first
    // Initial was lost joins the stream 0.3 s late rather than a second.
    t.initial_rtt(INITIAL_RTT);
    // The configured MTU is the one Braid relies on: a 1372-byte media datagram (seven
    // TS packets and a segment number) must fit.
    // quinn would fall back to 1200 bytes when it takes random loss for a black hole
    // (it does at 10% loss), and every media datagram would be too large from then on;
    // there is nothing to gain above it either.
    t.initial_mtu(initial_mtu);
    t.min_mtu(initial_mtu);
    t.mtu_discovery_config(None);
    match congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
    };
    t.datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER));
    // Live media is worthless once late: a connection whose congestion window holds its
    // datagrams back queues at most this much (about half a second at 4 Mbps), and
    // beyond it new datagrams are dropped and counted, for the merge to repair.
    t.datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t.receive_window(RECEIVE_WINDOW.into());
    t.max_concurrent_uni_streams(4u32.into());
    t.max_concurrent_bidi_streams(0u32.into());
    Arc::new(t)
}

fn dropped(role: &'static str, reason: &'static str) {
    metrics::counter!("braid_quic_dropped_total", "role" => role, "reason" => reason).increment(1);
}

/// Puts one transmit on the wire; a datagram the socket will not take now is dropped and
/// counted (QUIC takes it as lost).
fn transmit(socket: &dyn quinn::AsyncUdpSocket, role: &'static str, t: &Transmit, b: &[u8]) {
    let t = quinn::udp::Transmit {
        destination: t.destination,
        ecn: None,
        contents: b,
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    };
    if socket.try_send(&t).is_err() {
        metrics::counter!("braid_udp_send_failed_total", "role" => role).increment(1);
    }
}

impl Quic {
    /// Binds the endpoint. It accepts connections when `tls` has a certificate and
    /// `options.listen` is set; it can always dial. Call inside a tokio runtime.
    pub fn bind(
        options: &Options,
        bind: SocketAddr,
        tls: &Tls,
        role: &'static str,
    ) -> anyhow::Result<Quic> {
        Self::bind_impaired(
            options,
            bind,
            tls,
            role,
            &Impairments::default(),
            Instant::now(),
        )
    }

    /// [`Quic::bind`], with `impairments` on QUIC's packets (outages counted from `start`).
    pub fn bind_impaired(
        options: &Options,
        bind: SocketAddr,
        tls: &Tls,
        role: &'static str,
        impairments: &Impairments,
        start: Instant,
    ) -> anyhow::Result<Quic> {
        options.validate().map_err(anyhow::Error::msg)?;
        tls.validate().map_err(anyhow::Error::msg)?;
        let transport = transport(options.initial_mtu, options.congestion);
        let server = match tls.server_config()? {
            Some(rustls) => {
                let crypto =
                    QuicServerConfig::try_from(rustls).context("TLS config unusable for QUIC")?;
                let mut s = quinn::ServerConfig::with_crypto(Arc::new(crypto));
                s.transport_config(transport.clone());
                // Peers are known by address: a connection stays on its path.
                s.migration(false);
                Some(s)
            }
            None => None,
        };
        let client_tls = tls.client_config()?;
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls.clone())
                .context("TLS config unusable for QUIC")?,
        ));
        client.transport_config(transport.clone());
        let socket = crate::udp::bind_std(bind).with_context(|| format!("binding QUIC {bind}"))?;
        let accepting = server.is_some();
        let runtime = quinn::TokioRuntime;
        let socket = quinn::Runtime::wrap_udp_socket(&runtime, socket)
            .with_context(|| format!("starting QUIC on {bind}"))?;
        let socket = crate::impaired_socket::ImpairedSocket::wrap(socket, impairments, start, role);
        let slot = usize::from(options.initial_mtu.max(1500)) * socket.max_receive_segments();
        let core = Core::new(
            server,
            options.max_conns_per_ip,
            socket.max_transmit_segments(),
        );
        Ok(Quic {
            core,
            recv_buf: vec![0; slot * quinn::udp::BATCH_SIZE].into(),
            socket,
            client,
            client_tls,
            transport,
            server_name: tls.server_name.clone(),
            peers: HashMap::new(),
            changes: Vec::new(),
            changed: false,
            events: Vec::new(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            stats: Stats::default(),
            counters: None,
            role,
            accepting,
            closing: false,
        })
    }

    /// The endpoint's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Whether this endpoint accepts connections (it has a certificate).
    pub fn accepting(&self) -> bool {
        self.accepting
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Connections open (handshaking, up or closing).
    pub fn connections(&self) -> usize {
        self.core.connections()
    }

    /// Marks `peer` as a QUIC peer to dial when something is sent to it.
    pub fn add_dial(&mut self, peer: SocketAddr) {
        self.peers.entry(peer).or_default().dial = true;
    }

    /// Marks `peer` as a QUIC peer that dials this node (messages to it go over QUIC once
    /// it has connected); it is not dialed from here, so two nodes never dial each other.
    pub fn add_known(&mut self, peer: SocketAddr) {
        self.peers.entry(peer).or_default();
    }

    /// Dials `peer` now (marking it for dialing), unless it is connected or being dialed:
    /// a node connects to its configured peers at start, before media flows.
    pub fn connect_now(&mut self, peer: SocketAddr) {
        let p = self.peers.entry(peer).or_default();
        p.dial = true;
        if p.conn.is_none() && p.connecting.is_none() {
            self.dial(Instant::now(), peer);
        }
    }

    /// Whether messages to `peer` go over QUIC.
    pub fn owns(&self, peer: SocketAddr) -> bool {
        self.peers.contains_key(&peer)
    }

    /// Whether `peer` is connected over QUIC and proved itself a node; `None` when it is
    /// not a QUIC peer.
    pub fn is_node(&self, peer: SocketAddr) -> Option<bool> {
        self.peers
            .get(&peer)
            .map(|p| p.conn.as_ref().is_some_and(|c| c.node))
    }

    /// Whether `peer` has a connection up.
    pub fn is_connected(&self, peer: SocketAddr) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.conn.is_some())
    }

    /// Connections that came up or went down since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Sends `bytes` to `peer`: media as a datagram, anything else on the control stream.
    /// It leaves at the next [`Quic::flush`] (or [`Quic::recv`]).
    pub fn send(&mut self, now: Instant, peer: SocketAddr, bytes: Bytes, is_data: bool) {
        let role = self.role;
        let p = self.peers.entry(peer).or_default();
        let Some(c) = p.conn.as_mut() else {
            if !is_data {
                if p.pending.len() >= PENDING_MAX {
                    p.pending.remove(0);
                    dropped(role, "not_connected");
                    self.stats.dropped += 1;
                }
                p.pending.push(bytes);
            } else {
                dropped(role, "not_connected");
                self.stats.dropped += 1;
            }
            if p.dial && p.connecting.is_none() && p.retry_at.is_none_or(|t| t <= now) {
                self.dial(now, peer);
            }
            return;
        };
        let len = bytes.len() as u64;
        if is_data {
            match self.core.send_datagram(c.ch, bytes) {
                Some(Ok(())) => {
                    self.stats.datagrams_sent += 1;
                    self.stats.sent_bytes += len;
                    let m = self.counters.get_or_insert_with(|| Counters::new(role));
                    m.datagrams.increment(1);
                    m.bytes.increment(len);
                }
                None => {
                    dropped(role, "connection_lost");
                    self.stats.dropped += 1;
                }
                Some(Err(e)) => {
                    let reason = match e {
                        SendDatagramError::TooLarge => {
                            if !c.warned_size {
                                c.warned_size = true;
                                tracing::warn!(
                                    %peer,
                                    size = len,
                                    max = ?self.core.max_datagram(c.ch),
                                    "datagram larger than the QUIC path carries: dropped \
                                     (counted in braid_quic_dropped_total{{reason=\"too_large\"}}); \
                                     the path carries less than Braid's 1372-byte packets: capture with --ts-per-rtp 5"
                                );
                            }
                            "too_large"
                        }
                        SendDatagramError::UnsupportedByPeer | SendDatagramError::Disabled => {
                            "datagrams_unsupported"
                        }
                        SendDatagramError::Blocked(_) => {
                            c.full_since_warned += 1;
                            if c.warned_full
                                .is_none_or(|t| now.saturating_duration_since(t) >= FULL_WARN_EVERY)
                            {
                                let (rtt, cwnd) = self.core.path(c.ch).unwrap_or_default();
                                tracing::warn!(%peer, dropped = c.full_since_warned,
                                    rtt_ms = rtt.as_secs_f64() * 1e3, cwnd,
                                    "QUIC datagrams dropped: the connection's send buffer is full \
                                     (counted in braid_quic_dropped_total{{reason=\"send_buffer_full\"}})");
                                c.warned_full = Some(now);
                                c.full_since_warned = 0;
                            }
                            "send_buffer_full"
                        }
                    };
                    dropped(role, reason);
                    self.stats.dropped += 1;
                }
            }
        } else {
            match self.core.send_control(c.ch, &bytes) {
                Ok(()) => {
                    self.stats.messages_sent += 1;
                    self.stats.sent_bytes += len;
                    let m = self.counters.get_or_insert_with(|| Counters::new(role));
                    m.bytes.increment(len);
                }
                Err(ControlError::Closed) => {
                    dropped(role, "connection_lost");
                    self.stats.dropped += 1;
                }
                Err(ControlError::Full | ControlError::TooLarge) => {
                    dropped(role, "control_queue_full");
                    self.stats.dropped += 1;
                }
            }
        }
    }

    /// A client configuration of one peer's own, so that the sessions it resumes are
    /// that peer's: rustls keeps them by server name, and peers that share one (daemons
    /// on one host, told apart by port, or every peer under `--tls-server-name`) would
    /// be offered each other's tickets, which they cannot open.
    fn peer_client(&self) -> quinn::ClientConfig {
        let mut tls = self.client_tls.clone();
        tls.resumption = rustls::client::Resumption::in_memory_sessions(4);
        match QuicClientConfig::try_from(tls) {
            Ok(c) => {
                let mut c = quinn::ClientConfig::new(Arc::new(c));
                c.transport_config(self.transport.clone());
                c
            }
            Err(_) => self.client.clone(),
        }
    }

    fn dial(&mut self, now: Instant, peer: SocketAddr) {
        if self.closing {
            return;
        }
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| peer.ip().to_string());
        let client = match self.peers.get(&peer).and_then(|p| p.client.clone()) {
            Some(c) => c,
            None => self.peer_client(),
        };
        let p = self.peers.entry(peer).or_default();
        p.client = Some(client.clone());
        match self.core.connect(now, client, peer, &name) {
            Ok(ch) => p.connecting = Some(ch),
            Err(e) => {
                p.backoff = (p.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                p.retry_at = Some(now + p.backoff);
                if p.backoff == BACKOFF_MIN {
                    tracing::warn!(%peer, "cannot dial over QUIC: {e}");
                }
            }
        }
    }

    /// Puts what the connections have to send on the wire.
    pub fn flush(&mut self, now: Instant) {
        let Quic {
            core, socket, role, ..
        } = self;
        core.flush(now, &mut |t, b| transmit(&**socket, role, t, b));
    }

    /// Drives the connections: what they send, and what happened to them (messages to
    /// `out`).
    fn drive(&mut self, now: Instant, out: &mut Vec<(SocketAddr, Bytes)>) {
        for _ in 0..4 {
            self.flush(now);
            let mut events = std::mem::take(&mut self.events);
            self.core.take_events(&mut events);
            let any = !events.is_empty();
            for ev in events.drain(..) {
                self.handle(now, ev, out);
            }
            self.events = events;
            if !any {
                break;
            }
        }
    }

    /// Waits for the next thing from the network or a connection's timer, handles it,
    /// and appends received messages to `out`. Returns once a message came or a
    /// connection changed. Cancel-safe: nothing is lost when it is dropped while waiting.
    pub async fn recv(&mut self, out: &mut Vec<(SocketAddr, Bytes)>) {
        loop {
            self.drive(Instant::now(), out);
            if !out.is_empty() || std::mem::take(&mut self.changed) {
                return;
            }
            let deadline = self.core.poll_timeout();
            if let Some(d) = deadline {
                self.sleep.as_mut().reset(d.into());
            }
            let Quic {
                socket,
                recv_buf,
                sleep,
                ..
            } = self;
            let socket = &**socket;
            let got = tokio::select! {
                biased;
                r = std::future::poll_fn(|cx| poll_datagrams(socket, recv_buf, cx)) => Some(r),
                () = sleep.as_mut(), if deadline.is_some() => None,
            };
            let now = Instant::now();
            match got {
                Some(Ok(datagrams)) => {
                    let Quic {
                        core, socket, role, ..
                    } = self;
                    for (from, local_ip, data) in datagrams {
                        core.handle(now, from, local_ip, data, &mut |t, b| {
                            transmit(&**socket, role, t, b)
                        });
                    }
                }
                // Errors from ICMP (a peer's port closed) are the peer's idle timeout's
                // to judge.
                Some(Err(_)) => {}
                None => self.core.handle_timeout(now),
            }
        }
    }

    fn handle(&mut self, now: Instant, ev: CoreEvent, out: &mut Vec<(SocketAddr, Bytes)>) {
        let role = self.role;
        match ev {
            CoreEvent::Message(_, peer, bytes) => {
                self.stats.received += 1;
                out.push((peer, bytes));
            }
            CoreEvent::Up { ch, peer, node, .. } => {
                let p = self.peers.entry(peer).or_default();
                if p.connecting == Some(ch) {
                    p.connecting = None;
                }
                p.retry_at = None;
                p.down_since = None;
                p.up_since = Some(now);
                for m in p.pending.drain(..) {
                    if self.core.send_control(ch, &m).is_err() {
                        dropped(role, "control_queue_full");
                        self.stats.dropped += 1;
                    }
                }
                let (rtt, _) = self.core.path(ch).unwrap_or_default();
                tracing::info!(%peer, node, rtt_ms = rtt.as_secs_f64() * 1e3,
                    max_datagram = ?self.core.max_datagram(ch), "QUIC connection up");
                if let Some(old) = p.conn.replace(Conn {
                    ch,
                    node,
                    warned_size: false,
                    full_since_warned: 0,
                    warned_full: None,
                }) {
                    // Both sides dialed at once: the newer connection carries on.
                    self.core.close(now, old.ch, 0, b"replaced");
                }
                self.push_change(Change::Up { peer, node });
            }
            CoreEvent::Down {
                ch,
                peer,
                dialed,
                up,
                reason,
            } => {
                if !up {
                    let side = if dialed { "dial" } else { "accept" };
                    metrics::counter!("braid_quic_handshake_failed_total", "role" => role, "side" => side, "reason" => handshake_failure(&reason))
                        .increment(1);
                }
                let Some(p) = self.peers.get_mut(&peer) else {
                    if !up && !dialed {
                        tracing::warn!(%peer, "QUIC handshake refused: {reason}");
                    }
                    return;
                };
                if p.connecting == Some(ch) {
                    // A dial that failed.
                    p.connecting = None;
                    p.backoff = (p.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                    p.retry_at = Some(now + p.backoff);
                    tracing::warn!(%peer, retry_ms = p.backoff.as_millis() as u64, "QUIC dial failed: {reason}");
                    return;
                }
                if p.conn.as_ref().is_none_or(|c| c.ch != ch) {
                    if !up && !dialed {
                        tracing::warn!(%peer, "QUIC handshake refused: {reason}");
                    }
                    return;
                }
                p.conn = None;
                p.down_since = Some(now);
                match p.up_since.take() {
                    Some(t) if now.saturating_duration_since(t) >= STABLE => {
                        p.backoff = Duration::ZERO
                    }
                    _ => {
                        // Died young: the next dial waits, longer each time.
                        p.backoff = (p.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                        p.retry_at = Some(now + p.backoff);
                    }
                }
                if !p.dial && !p.pending.is_empty() {
                    // Meant for that connection, not for whoever connects from the same
                    // address next.
                    let n = p.pending.len() as u64;
                    p.pending.clear();
                    metrics::counter!("braid_quic_dropped_total", "role" => role, "reason" => "connection_lost")
                        .increment(n);
                    self.stats.dropped += n;
                }
                metrics::counter!("braid_quic_connections_lost_total", "role" => role).increment(1);
                let reason = reason.to_string();
                tracing::info!(%peer, %reason, "QUIC connection down");
                self.push_change(Change::Down { peer, reason });
            }
            CoreEvent::Refused { peer } => {
                metrics::counter!("braid_quic_refused_total", "role" => role, "reason" => "per_ip_limit")
                    .increment(1);
                tracing::warn!(%peer, "QUIC connection refused: too many from this address");
            }
            CoreEvent::AcceptFailed { peer, reason } => {
                metrics::counter!("braid_quic_handshake_failed_total", "role" => role, "side" => "accept", "reason" => handshake_failure(&reason))
                    .increment(1);
                tracing::warn!(%peer, "QUIC handshake refused: {reason}");
            }
            CoreEvent::BadFrame { peer } => {
                metrics::counter!("braid_dropped_total", "role" => role, "reason" => "quic_bad_frame")
                    .increment(1);
                tracing::warn!(%peer, "QUIC control stream broken: closing");
            }
            CoreEvent::ControlLost { count, .. } => {
                metrics::counter!("braid_quic_dropped_total", "role" => role, "reason" => "connection_lost")
                    .increment(count);
                self.stats.dropped += count;
            }
        }
    }

    fn push_change(&mut self, c: Change) {
        // An owner that never looks at changes must not grow this without bound.
        if self.changes.len() >= 1024 {
            self.changes.remove(0);
        }
        self.changes.push(c);
        self.changed = true;
    }

    /// Runs the connections' timers that are due, and forgets peers that are gone and
    /// that this node does not dial.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
        let mut lost = 0;
        self.peers.retain(|_, p| {
            let keep = p.dial
                || p.conn.is_some()
                || p.connecting.is_some()
                || p.down_since
                    .is_none_or(|t| now.saturating_duration_since(t) < FORGET_AFTER);
            if !keep {
                lost += p.pending.len() as u64;
            }
            keep
        });
        if lost > 0 {
            metrics::counter!("braid_quic_dropped_total", "role" => self.role, "reason" => "not_connected")
                .increment(lost);
            self.stats.dropped += lost;
        }
    }

    /// Closes every connection at once, so peers notice now rather than at their idle
    /// timeout.
    pub fn close(&mut self) {
        let now = Instant::now();
        self.closing = true;
        self.core.close_all(now, 0, b"shutting down");
        self.flush(now);
    }
}

/// Receives what the socket holds (a batch, datagrams split where the kernel coalesced
/// them), or registers the task to be woken.
#[allow(clippy::type_complexity)]
fn poll_datagrams(
    socket: &dyn quinn::AsyncUdpSocket,
    buf: &mut [u8],
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<Vec<(SocketAddr, Option<IpAddr>, BytesMut)>>> {
    use quinn::udp::{BATCH_SIZE, RecvMeta};
    let slot = buf.len() / BATCH_SIZE;
    let mut metas = [RecvMeta::default(); BATCH_SIZE];
    let mut iovs: [std::io::IoSliceMut<'_>; BATCH_SIZE] = {
        let mut bufs = buf.chunks_mut(slot).map(std::io::IoSliceMut::new);
        std::array::from_fn(|_| bufs.next().expect("BATCH_SIZE slots"))
    };
    loop {
        match socket.poll_recv(cx, &mut iovs, &mut metas) {
            std::task::Poll::Ready(Ok(n)) => {
                let mut out = Vec::new();
                for (meta, b) in metas.iter().zip(iovs.iter()).take(n) {
                    let mut data = BytesMut::from(&b[..meta.len]);
                    while !data.is_empty() {
                        let d = data.split_to(meta.stride.min(data.len()));
                        out.push((meta.addr, meta.dst_ip, d));
                    }
                }
                return std::task::Poll::Ready(Ok(out));
            }
            // A reset is undefined in QUIC and may be injected by anyone.
            std::task::Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                continue;
            }
            other => return other.map(|r| r.map(|_| Vec::new())),
        }
    }
}

/// Why a handshake failed, for the `reason` label: `tls` (a certificate one side does not
/// trust, or another TLS failure, on either side), `refused` (the peer takes no more
/// connections), `timed_out` (too little came back in time), or `other`.
fn handshake_failure(e: &quinn_proto::ConnectionError) -> &'static str {
    use quinn_proto::ConnectionError as E;
    let code = match e {
        E::TransportError(t) => u64::from(t.code),
        E::ConnectionClosed(c) => u64::from(c.error_code),
        E::TimedOut => return "timed_out",
        _ => return "other",
    };
    // RFC 9000 section 20.1: 0x02 is CONNECTION_REFUSED, 0x0100-0x01ff carry TLS alerts.
    match code {
        0x02 => "refused",
        0x100..=0x1ff => "tls",
        _ => "other",
    }
}
