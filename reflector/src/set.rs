//! The set reflector's decisions, sans-IO: it merges every copy the entry points send,
//! asks them for what every path lost, and forwards the merged stream to each edge
//! subscribed to it. Subscriptions are soft state: an edge refreshes about every second
//! and is forgotten after its lease.
//!
//! Paths are told apart by where a copy comes from: the configured upstream entry points
//! by position, or, with none configured, senders numbered as they appear.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use braid_core::cookie::{self, Cookies, Subject};
use braid_core::merge;
use braid_core::node::{self, Held, Outbox, Output, Peer, TAIL_QUIET, TailProbe};
use braid_core::ring::{self, Ring};
use braid_core::wire::{Body, Codec, ErrorCode, Flags, Subscription};
use braid_core::{PathId, StreamId};
use bytes::Bytes;

use crate::common::{self, Counters, HOUSEKEEPING, MAX_LEASE, MAX_NACK_ANSWER, Packet, Settings};

/// A new subscriber that asked for the latest group of pictures gets at most this many
/// packets of it (2 s at about 8 Mbps)…
const PREBURST_MAX: u64 = 1536;
/// … this many at a time…
const PREBURST_STEP: usize = 32;
/// … this often: a 2 s group at 4 Mbps arrives in about 50 ms, without a burst that
/// overflows a receive buffer or a QUIC connection's send buffer.
const PREBURST_EVERY: Duration = Duration::from_millis(2);

/// A new subscriber being sent the latest group of pictures.
struct Preburst {
    to: SocketAddr,
    cursor: ring::Cursor,
    /// The newest packet when it subscribed: later ones reach it as live.
    until: braid_core::SeqNo,
}

/// What the set reflector decides with.
#[derive(Debug, Clone)]
pub struct Config {
    /// What both roles share.
    pub settings: Settings,
    /// The entry points allowed to send; empty means any node.
    pub upstreams: Vec<SocketAddr>,
    /// How long packets are kept to answer edges' NACKs.
    pub retransmit: Duration,
    /// New subscriptions accepted per second from one IP address.
    pub subscribe_rate: u32,
}

/// What the owner feeds in.
#[derive(Debug, Clone)]
pub enum Input {
    /// A message from `from`; `node` when the transport authenticated the peer as a node
    /// (a QUIC peer with a trusted certificate; every UDP peer).
    Received {
        /// Who sent it.
        from: SocketAddr,
        /// The message as received.
        datagram: Bytes,
        /// Whether the peer proved itself a node.
        node: bool,
    },
    /// The QUIC connection to `peer` went down: forget it as a subscriber at once.
    PeerDown(SocketAddr),
}

struct Stream {
    merge: merge::Buffer<Packet>,
    kept: Ring<Packet>,
    /// Subscribed edges and when their lease ends.
    subscribers: BTreeMap<SocketAddr, Instant>,
    /// Without configured upstreams: paths numbered as senders appear.
    dynamic_paths: Vec<SocketAddr>,
    /// Which source session it is in.
    session: common::Session,
    /// Input arrived since the merge was last drained.
    dirty: bool,
    /// The last packet sent to the subscribers, sent again once the stream goes quiet.
    tail: TailProbe,
    /// New subscribers still being sent the latest group of pictures.
    prebursts: Vec<Preburst>,
    /// When media last came in.
    last_media: Option<Instant>,
    /// When it opened.
    opened: Instant,
}

/// A stream with no subscriber and no media for this long is closed.
const IDLE_CLOSE: Duration = Duration::from_secs(30);

/// The set reflector's state machine.
pub struct SetReflector {
    config: Config,
    streams: BTreeMap<StreamId, Stream>,
    out: Outbox<std::convert::Infallible>,
    counters: Counters,
    now: Option<Instant>,
    next_housekeeping: Option<Instant>,
    /// New subscriptions left this second, per IP address.
    subscribe_budget: HashMap<IpAddr, (Instant, u32)>,
    /// Peers already logged as refused (one line each; the counter counts them all).
    warned: HashSet<SocketAddr>,
    /// When the prebursts under way send their next packets.
    next_preburst: Option<Instant>,
    /// Subscribers' addresses are validated before they are sent anything.
    cookies: Cookies,
}

impl SetReflector {
    /// A set reflector reading and signing with `codec`.
    pub fn new(config: Config, codec: Codec) -> Result<SetReflector, braid_core::Error> {
        config.settings.merge.validate()?;
        Ok(SetReflector {
            config,
            streams: BTreeMap::new(),
            out: Outbox::new(codec),
            counters: Counters::default(),
            now: None,
            next_housekeeping: None,
            subscribe_budget: HashMap::new(),
            warned: HashSet::new(),
            next_preburst: None,
            cookies: Cookies::random(),
        })
    }

    /// This set reflector, making its address-validation cookies under `secret` (the
    /// simulator's, drawn from its seed) rather than a random one.
    #[must_use]
    pub fn with_cookie_secret(mut self, secret: [u8; 32]) -> SetReflector {
        self.cookies = Cookies::new(secret);
        self
    }

    /// What happened so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Every stream's figures.
    pub fn reports(&self) -> Vec<common::StreamReport> {
        self.streams
            .iter()
            .map(|(id, st)| common::report(*id, &st.merge, 0, st.subscribers.len()))
            .collect()
    }

    /// Streams open, subscribers, and packets held (merge and repair buffer), for the
    /// simulator's bounds.
    pub fn footprint(&self) -> (usize, usize, usize) {
        let subs = self.streams.values().map(|s| s.subscribers.len()).sum();
        let held = self
            .streams
            .values()
            .map(|s| s.merge.held() + s.kept.len())
            .sum();
        (self.streams.len(), subs, held)
    }

    /// Takes one input.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.now = Some(now);
        // Housekeeping starts with the first input.
        self.next_housekeeping.get_or_insert(now + HOUSEKEEPING);
        match input {
            Input::Received {
                from,
                datagram,
                node,
            } => self.handle_message(now, from, datagram, node),
            Input::PeerDown(peer) => {
                for st in self.streams.values_mut() {
                    st.subscribers.remove(&peer);
                    st.prebursts.retain(|p| p.to != peer);
                }
            }
        }
    }

    /// Runs what is due at `now`: merge deadlines, lease expiry, ring aging.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        for st in self.streams.values_mut() {
            st.dirty = true;
        }
        if self.next_preburst.is_some_and(|t| now >= t) {
            self.preburst(now);
        }
        if self.next_housekeeping.is_none_or(|t| now >= t) {
            self.next_housekeeping = Some(now + HOUSEKEEPING);
            // A stream nobody subscribes to and nothing feeds is closed: state does not
            // grow with every stream id ever named.
            let before = self.streams.len();
            self.streams.retain(|id, st| {
                let idle = st.subscribers.is_empty()
                    && now.saturating_duration_since(st.last_media.unwrap_or(st.opened))
                        >= IDLE_CLOSE;
                if idle {
                    tracing::info!(stream = id.0, "stream idle: closed");
                }
                !idle
            });
            self.counters.streams_closed += (before - self.streams.len()) as u64;
            for st in self.streams.values_mut() {
                st.kept.handle_timeout(now);
                st.subscribers.retain(|_, exp| *exp > now);
                // The stream went quiet: its last packets may be lost with nothing
                // after them to show it.
                if let Some(p) = st.tail.due(now, TAIL_QUIET).and_then(|s| st.kept.held(s)) {
                    for &to in st.subscribers.keys() {
                        self.out.retransmit(Peer::Addr(to), p.header, &p.media);
                        self.counters.tail_probes += 1;
                    }
                }
            }
        }
    }

    /// The next thing to do; [`Output::Timeout`] when there is nothing.
    pub fn poll_output(&mut self) -> Output<std::convert::Infallible> {
        if let Some(now) = self.now {
            self.drain_dirty(now);
        }
        if let Some(o) = self.out.pop() {
            return o;
        }
        let mut deadline = common::earliest(self.next_housekeeping, self.next_preburst);
        for st in self.streams.values() {
            deadline = common::earliest(deadline, st.merge.next_timeout());
        }
        Output::Timeout(deadline)
    }

    fn drain_dirty(&mut self, now: Instant) {
        let upstreams = &self.config.upstreams;
        for (id, st) in self.streams.iter_mut().filter(|(_, s)| s.dirty) {
            st.dirty = false;
            let dynamic = &st.dynamic_paths;
            let subscribers = &st.subscribers;
            let tail = &mut st.tail;
            common::drain_merge(
                now,
                *id,
                &mut st.merge,
                &mut st.kept,
                &mut self.out,
                &mut self.counters,
                |path| {
                    let i = usize::from(path.0);
                    if upstreams.is_empty() {
                        dynamic.get(i).copied()
                    } else {
                        upstreams.get(i).copied()
                    }
                },
                |out, p| {
                    tail.sent(now, p.media.seq);
                    for (&to, &expires) in subscribers {
                        if expires > now {
                            out.send(Peer::Addr(to), p.datagram.clone(), true);
                        }
                    }
                },
                // Edges merge several set reflectors: one that gave up a packet says
                // nothing, another may still have it.
                |_, _, _| {},
            );
        }
    }

    fn stream(&mut self, id: StreamId) -> Result<&mut Stream, braid_core::Error> {
        if !self.streams.contains_key(&id) {
            let kept = ring::Config {
                max_age: self.config.retransmit,
                ..ring::Config::default()
            };
            tracing::info!(stream = id.0, "stream opened");
            self.streams.insert(
                id,
                Stream {
                    merge: merge::Buffer::new(self.config.settings.merge.clone())?,
                    kept: Ring::new(kept)?,
                    subscribers: BTreeMap::new(),
                    dynamic_paths: Vec::new(),
                    session: common::Session::default(),
                    dirty: false,
                    tail: TailProbe::default(),
                    prebursts: Vec::new(),
                    last_media: None,
                    opened: self.now.unwrap_or_else(Instant::now),
                },
            );
        }
        Ok(self.streams.get_mut(&id).expect("inserted above"))
    }

    fn handle_message(&mut self, now: Instant, from: SocketAddr, bytes: Bytes, node: bool) {
        let msg = match self.out.codec().decode(bytes.clone()) {
            Ok(m) => m,
            Err(e) => {
                self.counters.drops.add(e.reason());
                return;
            }
        };
        let id = msg.header.stream;
        let to = Peer::Addr(from);
        if !self.config.settings.carries(id) {
            self.counters.drops.add("unknown_stream");
            // Never an error for an error: two nodes that both do not carry a stream
            // would trade them forever.
            if !matches!(msg.body, Body::Error { .. }) {
                self.reply_error(to, id, ErrorCode::UNKNOWN_STREAM, "stream not carried here");
            }
            return;
        }
        // Media, subscriptions and repairs are for nodes only: over QUIC the peer must
        // have shown a trusted certificate.
        let node_only = matches!(
            msg.body,
            Body::Media(_) | Body::Subscribe(_) | Body::Refresh(_) | Body::Nack(_)
        );
        if node_only && !node {
            self.counters.drops.add("not_a_node");
            if self.warned.len() < 1024 && self.warned.insert(from) {
                tracing::warn!(peer = %from, "refused: node-only request from a QUIC peer without a trusted certificate");
            }
            if matches!(msg.body, Body::Subscribe(_) | Body::Refresh(_)) {
                self.reply_error(
                    to,
                    id,
                    ErrorCode::UNAUTHORIZED,
                    "subscribing needs a node certificate",
                );
            }
            return;
        }
        match msg.body {
            Body::Media(media) => {
                if !self.has_room_for(id) {
                    return;
                }
                let Some(path) = self.path_of(id, from) else {
                    self.counters.drops.add("unknown_peer");
                    return;
                };
                if self.stream(id).is_err() {
                    return;
                }
                let counters = &mut self.counters;
                let Some(st) = self.streams.get_mut(&id) else {
                    return;
                };
                common::accept_media(
                    now,
                    &mut st.merge,
                    &mut st.session,
                    counters,
                    path,
                    bytes,
                    msg.header,
                    media,
                );
                st.dirty = true;
                st.last_media = Some(now);
            }
            Body::Subscribe(s) | Body::Refresh(s) => {
                // Nothing is sent to an address before it shows it receives there: a
                // subscription without this address's cookie gets the cookie only.
                match self.cookies.check(now, Subject::Addr(from), &s.cookie) {
                    cookie::Check::Fresh => {}
                    check => {
                        if check == cookie::Check::Bad {
                            self.counters.drops.add("cookie_missing");
                        }
                        let cookie = self.cookies.issue(now, Subject::Addr(from));
                        self.out.control(to, id, Body::Cookie { cookie });
                        if !check.ok() {
                            return;
                        }
                    }
                }
                let wants_gop = msg.header.flags.contains(Flags::KEYFRAME);
                self.handle_subscriber(now, from, id, s, wants_gop)
            }
            Body::Unsubscribe { .. } => {
                if let Some(st) = self.streams.get_mut(&id) {
                    st.subscribers.remove(&from);
                }
            }
            Body::Nack(ranges) => {
                let Some(st) = self.streams.get(&id) else {
                    self.counters.drops.add("nack_unknown_stream");
                    return;
                };
                if !st.subscribers.contains_key(&from) {
                    self.counters.drops.add("nack_from_stranger");
                    return;
                }
                let a = node::answer_nack(&mut self.out, &st.kept, to, &ranges, MAX_NACK_ANSWER);
                self.counters.retransmit_sent += a.sent;
                self.counters.retransmit_missing += a.missing;
                if a.over_limit {
                    self.counters.drops.add("nack_over_limit");
                }
            }
            Body::Keepalive(_) => {}
            _ => self.counters.drops.add("unexpected_kind"),
        }
    }

    /// The path a copy from `from` travels: its position among the configured upstreams,
    /// or among the senders seen so far (at most 64).
    fn path_of(&mut self, id: StreamId, from: SocketAddr) -> Option<PathId> {
        if !self.config.upstreams.is_empty() {
            let i = self.config.upstreams.iter().position(|a| *a == from)?;
            return Some(PathId(i as u8));
        }
        let st = self.stream(id).ok()?;
        if let Some(i) = st.dynamic_paths.iter().position(|a| *a == from) {
            return Some(PathId(i as u8));
        }
        if st.dynamic_paths.len() >= 64 {
            return None;
        }
        st.dynamic_paths.push(from);
        Some(PathId((st.dynamic_paths.len() - 1) as u8))
    }

    /// Takes a subscription or its refresh. A new subscriber that asks for it
    /// (`wants_gop`, the keyframe flag on its subscribe) is sent the latest group of
    /// pictures held, so that an edge with no stream yet can start its viewers at once
    /// rather than at the next keyframe.
    fn handle_subscriber(
        &mut self,
        now: Instant,
        from: SocketAddr,
        id: StreamId,
        s: Subscription,
        wants_gop: bool,
    ) {
        let max = self.config.settings.max_per_stream;
        let new = self
            .streams
            .get(&id)
            .is_none_or(|st| !st.subscribers.contains_key(&from));
        if new && !self.subscribe_allowed(now, from) {
            self.counters.drops.add("subscribe_rate");
            self.reply_error(
                Peer::Addr(from),
                id,
                ErrorCode::CAPACITY,
                "too many new subscriptions from this address: slow down",
            );
            return;
        }
        // A stream is opened for a subscriber only within the rate above and the cap.
        if !self.has_room_for(id) {
            self.reply_error(
                Peer::Addr(from),
                id,
                ErrorCode::CAPACITY,
                "too many streams on this set reflector",
            );
            return;
        }
        let Ok(st) = self.stream(id) else {
            return;
        };
        if new && st.subscribers.len() >= max {
            self.counters.drops.add("subscriber_cap");
            self.reply_error(
                Peer::Addr(from),
                id,
                ErrorCode::CAPACITY,
                "too many subscribers for this stream",
            );
            return;
        }
        let lease = Duration::from_millis(u64::from(s.lease_ms)).min(MAX_LEASE);
        if st.subscribers.insert(from, now + lease).is_none() {
            tracing::info!(stream = id.0, subscriber = %from, "subscribed");
            if wants_gop {
                self.start_preburst(now, id, from);
            }
        }
    }

    fn start_preburst(&mut self, now: Instant, id: StreamId, to: SocketAddr) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        let (Ok((cursor, _)), Some(newest)) =
            (st.kept.cursor(ring::Start::Keyframe), st.kept.newest())
        else {
            return;
        };
        let until = newest.seq;
        let first = st.kept.peek(&cursor).map_or(until, |e| e.seq);
        if until.0 - first.0 >= PREBURST_MAX {
            return;
        }
        st.prebursts.retain(|p| p.to != to);
        st.prebursts.push(Preburst { to, cursor, until });
        self.counters.prebursts += 1;
        self.preburst(now);
    }

    /// Sends the next packets of every preburst under way.
    fn preburst(&mut self, now: Instant) {
        let mut more = false;
        for st in self.streams.values_mut() {
            let (kept, out, counters) = (&st.kept, &mut self.out, &mut self.counters);
            st.prebursts.retain_mut(|p| {
                for _ in 0..PREBURST_STEP {
                    match kept.read(&mut p.cursor) {
                        ring::Read::Packet(e) if e.seq <= p.until => {
                            out.send(Peer::Addr(p.to), e.item.datagram.clone(), true);
                            counters.preburst_packets += 1;
                        }
                        _ => return false,
                    }
                }
                true
            });
            more |= !st.prebursts.is_empty();
        }
        self.next_preburst = more.then_some(now + PREBURST_EVERY);
    }

    /// Whether stream `id` is open or may be opened (fewer than `max_streams` are);
    /// counts a refusal.
    fn has_room_for(&mut self, id: StreamId) -> bool {
        if self.streams.contains_key(&id) || self.streams.len() < self.config.settings.max_streams {
            return true;
        }
        self.counters.drops.add("stream_cap");
        false
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

    fn reply_error(&mut self, to: Peer, stream: StreamId, code: ErrorCode, text: &str) {
        self.out.control(
            to,
            stream,
            Body::Error {
                code,
                text: text.into(),
            },
        );
    }
}
