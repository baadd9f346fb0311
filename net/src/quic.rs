//! QUIC links (quinn), driven from a daemon's one task like its UDP socket.
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, SendDatagramError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

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
/// Control messages queued per connection.
const CONTROL_QUEUE: usize = 1024;
/// Bytes of datagrams quinn keeps for one connection before the daemon's task reads them;
/// the connection's reader drains it at once into the daemon's queue.
const DATAGRAM_RECEIVE_BUFFER: usize = 1 << 20;
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

enum Event {
    Message(SocketAddr, Bytes),
    Up {
        peer: SocketAddr,
        conn: Connection,
        control: mpsc::Sender<Bytes>,
        node: bool,
    },
    Down {
        peer: SocketAddr,
        id: usize,
        reason: String,
    },
    DialFailed {
        peer: SocketAddr,
        reason: String,
    },
}

struct Conn {
    conn: Connection,
    control: mpsc::Sender<Bytes>,
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
    connecting: bool,
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
/// [`crate::udp::Socket`].
pub struct Quic {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// The TLS side of `client`, and its transport, for each dialed peer's own.
    client_tls: rustls::ClientConfig,
    transport: Arc<quinn::TransportConfig>,
    server_name: Option<String>,
    peers: HashMap<SocketAddr, Peer>,
    events: mpsc::Receiver<Event>,
    events_tx: mpsc::Sender<Event>,
    changes: Vec<Change>,
    stats: Stats,
    /// Per-packet counters, looked up once (on first use: after the daemon installed
    /// its metrics recorder) instead of by name for every datagram.
    counters: Option<Counters>,
    role: &'static str,
    accepting: bool,
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
            .field("local", &self.endpoint.local_addr().ok())
            .field("peers", &self.peers.len())
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
    t.max_concurrent_uni_streams(4u32.into());
    t.max_concurrent_bidi_streams(0u32.into());
    Arc::new(t)
}

fn dropped(role: &'static str, reason: &'static str) {
    metrics::counter!("braid_quic_dropped_total", "role" => role, "reason" => reason).increment(1);
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
        let runtime = Arc::new(quinn::TokioRuntime);
        let socket = quinn::Runtime::wrap_udp_socket(&*runtime, socket)
            .with_context(|| format!("starting QUIC on {bind}"))?;
        let socket = crate::impaired_socket::ImpairedSocket::wrap(socket, impairments, start, role);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            server,
            socket,
            runtime,
        )
        .with_context(|| format!("starting QUIC on {bind}"))?;
        let (events_tx, events) = mpsc::channel(16 * 1024);
        if accepting {
            tokio::spawn(accept(
                endpoint.clone(),
                events_tx.clone(),
                options.max_conns_per_ip,
                role,
            ));
        }
        Ok(Quic {
            endpoint,
            client,
            client_tls,
            transport,
            server_name: tls.server_name.clone(),
            peers: HashMap::new(),
            events,
            events_tx,
            changes: Vec::new(),
            stats: Stats::default(),
            counters: None,
            role,
            accepting,
        })
    }

    /// The endpoint's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Whether this endpoint accepts connections (it has a certificate).
    pub fn accepting(&self) -> bool {
        self.accepting
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
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
        if p.conn.is_none() && !p.connecting {
            self.dial(peer);
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
            if p.dial && !p.connecting && p.retry_at.is_none_or(|t| t <= now) {
                self.dial(peer);
            }
            return;
        };
        let len = bytes.len() as u64;
        if is_data {
            if c.conn.datagram_send_buffer_space() < bytes.len() {
                dropped(role, "send_buffer_full");
                self.stats.dropped += 1;
                c.full_since_warned += 1;
                if c.warned_full
                    .is_none_or(|t| now.duration_since(t) >= FULL_WARN_EVERY)
                {
                    let path = c.conn.stats().path;
                    tracing::warn!(%peer, dropped = c.full_since_warned,
                        rtt_ms = path.rtt.as_secs_f64() * 1e3, cwnd = path.cwnd,
                        "QUIC datagrams dropped: the connection's send buffer is full \
                         (counted in braid_quic_dropped_total{{reason=\"send_buffer_full\"}})");
                    c.warned_full = Some(now);
                    c.full_since_warned = 0;
                }
                return;
            }
            match c.conn.send_datagram(bytes) {
                Ok(()) => {
                    self.stats.datagrams_sent += 1;
                    self.stats.sent_bytes += len;
                    let m = self.counters.get_or_insert_with(|| Counters::new(role));
                    m.datagrams.increment(1);
                    m.bytes.increment(len);
                }
                Err(e) => {
                    let reason = match e {
                        SendDatagramError::TooLarge => {
                            if !c.warned_size {
                                c.warned_size = true;
                                tracing::warn!(
                                    %peer,
                                    size = len,
                                    max = ?c.conn.max_datagram_size(),
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
                        SendDatagramError::ConnectionLost(_) => "connection_lost",
                    };
                    dropped(role, reason);
                    self.stats.dropped += 1;
                }
            }
        } else {
            match c.control.try_send(bytes) {
                Ok(()) => {
                    self.stats.messages_sent += 1;
                    self.stats.sent_bytes += len;
                    let m = self.counters.get_or_insert_with(|| Counters::new(role));
                    m.bytes.increment(len);
                }
                Err(_) => {
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

    fn dial(&mut self, peer: SocketAddr) {
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
        let connecting = match self.endpoint.connect_with(client, peer, &name) {
            Ok(c) => c,
            Err(e) => {
                p.backoff = (p.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                p.retry_at = Some(Instant::now() + p.backoff);
                if p.backoff == BACKOFF_MIN {
                    tracing::warn!(%peer, "cannot dial over QUIC: {e}");
                }
                return;
            }
        };
        p.connecting = true;
        let tx = self.events_tx.clone();
        let role = self.role;
        tokio::spawn(async move {
            match connecting.await {
                Ok(conn) => established(conn, true, tx, role, None).await,
                Err(e) => {
                    metrics::counter!("braid_quic_handshake_failed_total", "role" => role, "side" => "dial", "reason" => handshake_failure(&e))
                        .increment(1);
                    let _ = tx
                        .send(Event::DialFailed {
                            peer,
                            reason: e.to_string(),
                        })
                        .await;
                }
            }
        });
    }

    /// Waits for the next thing from the connections, handles it, and appends a received
    /// message, if it was one, to `out` (with any others already waiting).
    pub async fn recv(&mut self, out: &mut Vec<(SocketAddr, Bytes)>) {
        let Some(ev) = self.events.recv().await else {
            // The sender half lives in `self`: the channel never closes.
            return std::future::pending().await;
        };
        self.handle(ev, out);
        let mut n = 0;
        while n < 256 {
            match self.events.try_recv() {
                Ok(ev) => self.handle(ev, out),
                Err(_) => break,
            }
            n += 1;
        }
    }

    fn handle(&mut self, ev: Event, out: &mut Vec<(SocketAddr, Bytes)>) {
        let now = Instant::now();
        match ev {
            Event::Message(peer, bytes) => {
                self.stats.received += 1;
                out.push((peer, bytes));
            }
            Event::Up {
                peer,
                conn,
                control,
                node,
            } => {
                let p = self.peers.entry(peer).or_default();
                p.connecting = false;
                p.retry_at = None;
                p.down_since = None;
                p.up_since = Some(now);
                for m in p.pending.drain(..) {
                    if control.try_send(m).is_err() {
                        dropped(self.role, "control_queue_full");
                        self.stats.dropped += 1;
                    }
                }
                tracing::info!(%peer, node, rtt_ms = conn.rtt().as_secs_f64() * 1e3,
                    max_datagram = ?conn.max_datagram_size(), "QUIC connection up");
                if let Some(old) = p.conn.replace(Conn {
                    conn,
                    control,
                    node,
                    warned_size: false,
                    full_since_warned: 0,
                    warned_full: None,
                }) {
                    // Both sides dialed at once: the newer connection carries on.
                    old.conn.close(0u32.into(), b"replaced");
                }
                self.push_change(Change::Up { peer, node });
            }
            Event::Down { peer, id, reason } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                if p.conn.as_ref().is_none_or(|c| c.conn.stable_id() != id) {
                    return;
                }
                p.conn = None;
                p.down_since = Some(now);
                match p.up_since.take() {
                    Some(t) if now.duration_since(t) >= STABLE => p.backoff = Duration::ZERO,
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
                    metrics::counter!("braid_quic_dropped_total", "role" => self.role, "reason" => "connection_lost")
                        .increment(n);
                    self.stats.dropped += n;
                }
                metrics::counter!("braid_quic_connections_lost_total", "role" => self.role)
                    .increment(1);
                tracing::info!(%peer, %reason, "QUIC connection down");
                self.push_change(Change::Down { peer, reason });
            }
            Event::DialFailed { peer, reason } => {
                let p = self.peers.entry(peer).or_default();
                p.connecting = false;
                p.backoff = (p.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                p.retry_at = Some(now + p.backoff);
                tracing::warn!(%peer, retry_ms = p.backoff.as_millis() as u64, "QUIC dial failed: {reason}");
            }
        }
    }

    fn push_change(&mut self, c: Change) {
        // An owner that never looks at changes must not grow this without bound.
        if self.changes.len() >= 1024 {
            self.changes.remove(0);
        }
        self.changes.push(c);
    }

    /// Forgets peers that are gone and that this node does not dial.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut lost = 0;
        self.peers.retain(|_, p| {
            let keep = p.dial
                || p.conn.is_some()
                || p.connecting
                || p.down_since
                    .is_none_or(|t| now.duration_since(t) < FORGET_AFTER);
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
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// Accepts connections, at most `max_per_ip` at a time from one IP address.
async fn accept(
    endpoint: quinn::Endpoint,
    tx: mpsc::Sender<Event>,
    max_per_ip: usize,
    role: &'static str,
) {
    let per_ip: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        let peer = incoming.remote_address();
        // A slot is only taken by an address that proved it receives our packets: a
        // Retry first, so spoofed Initials cannot hold a victim's slots.
        if !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let slot = {
            let mut m = per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(peer.ip()).or_insert(0);
            if *n >= max_per_ip {
                drop(m);
                metrics::counter!("braid_quic_refused_total", "role" => role, "reason" => "per_ip_limit")
                    .increment(1);
                tracing::warn!(%peer, max_per_ip, "QUIC connection refused: too many from this address");
                incoming.refuse();
                continue;
            }
            *n += 1;
            IpSlot {
                map: per_ip.clone(),
                ip: peer.ip(),
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let conn = match incoming.accept() {
                Ok(connecting) => connecting.await,
                Err(e) => Err(e),
            };
            match conn {
                Ok(conn) => established(conn, false, tx, role, Some(slot)).await,
                Err(e) => {
                    metrics::counter!("braid_quic_handshake_failed_total", "role" => role, "side" => "accept", "reason" => handshake_failure(&e))
                        .increment(1);
                    tracing::warn!(%peer, "QUIC handshake refused: {e}");
                }
            }
        });
    }
}

/// Why a handshake failed, for the `reason` label: `tls` (a certificate one side does not
/// trust, or another TLS failure, on either side), `refused` (the peer takes no more
/// connections), `timed_out` (too little came back in time), or `other`.
fn handshake_failure(e: &quinn::ConnectionError) -> &'static str {
    use quinn::ConnectionError as E;
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

/// Holds one of an IP address's connection slots until dropped.
struct IpSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Runs an established connection until it closes: tells the daemon, writes its control
/// stream, reads datagrams and the peer's control streams.
async fn established(
    conn: Connection,
    dialed: bool,
    tx: mpsc::Sender<Event>,
    role: &'static str,
    _slot: Option<IpSlot>,
) {
    let peer = conn.remote_address();
    // A dialed peer passed our trust check as a server; an accepting side learns whether
    // the dialer proved itself with a client certificate the trust settings accepted.
    let node = dialed
        || conn
            .peer_identity()
            .and_then(|i| {
                i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .is_some_and(|c| !c.is_empty());
    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    tokio::spawn(write_control(conn.clone(), control_rx, role));
    if tx
        .send(Event::Up {
            peer,
            conn: conn.clone(),
            control,
            node,
        })
        .await
        .is_err()
    {
        return;
    }
    let reason = loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                // Media never waits here: quinn would drop the oldest datagrams of a
                // full receive buffer without a word; a full queue to the daemon's task
                // drops this one, counted.
                Ok(d) => match tx.try_send(Event::Message(peer, d)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => dropped(role, "receive_queue_full"),
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                },
                Err(e) => break e.to_string(),
            },
            s = conn.accept_uni() => match s {
                Ok(s) => {
                    tokio::spawn(read_control(conn.clone(), s, tx.clone(), role));
                }
                Err(e) => break e.to_string(),
            },
        }
    };
    let _ = tx
        .send(Event::Down {
            peer,
            id: conn.stable_id(),
            reason,
        })
        .await;
}

async fn write_control(conn: Connection, mut rx: mpsc::Receiver<Bytes>, role: &'static str) {
    let lost = |n: u64| {
        metrics::counter!("braid_quic_dropped_total", "role" => role, "reason" => "connection_lost")
            .increment(n);
    };
    let Ok(mut stream) = conn.open_uni().await else {
        rx.close();
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        lost(n);
        return;
    };
    // Grown as needed: a viewer's connection carries a few small messages a second,
    // and thousands of them hold these buffers (issue 16: memory per QUIC viewer).
    let mut buf = BytesMut::new();
    while let Some(m) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&(m.len() as u16).to_be_bytes());
        buf.extend_from_slice(&m);
        let mut batch = 1;
        // Batch whatever else is queued into one write.
        while let Ok(m) = rx.try_recv() {
            buf.extend_from_slice(&(m.len() as u16).to_be_bytes());
            buf.extend_from_slice(&m);
            batch += 1;
        }
        if stream.write_all(&buf).await.is_err() {
            // This batch, and whatever is queued behind it, never reaches the peer.
            rx.close();
            while rx.try_recv().is_ok() {
                batch += 1;
            }
            lost(batch);
            return;
        }
    }
}

async fn read_control(
    conn: Connection,
    mut stream: quinn::RecvStream,
    tx: mpsc::Sender<Event>,
    role: &'static str,
) {
    let peer = conn.remote_address();
    // Grown as needed (see `write_control`).
    let mut buf = BytesMut::new();
    loop {
        loop {
            match braid_core::wire::split_frame(&mut buf) {
                Ok(Some(m)) => {
                    if tx.send(Event::Message(peer, m)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    metrics::counter!("braid_dropped_total", "role" => role, "reason" => "quic_bad_frame")
                        .increment(1);
                    tracing::warn!(%peer, "QUIC control stream broken ({e}): closing");
                    conn.close(1u32.into(), b"bad frame");
                    return;
                }
            }
        }
        match stream.read_chunk(16 * 1024, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) | Err(_) => return,
        }
    }
}
