//! The entry point's decisions, sans-IO: who may publish, where each packet goes, which
//! repairs are answered.
//!
//! [`EntryPoint`] has the shape of every Braid machine (`braid_core::node`): feed it
//! [`Input`]s and timeouts, then drain [`EntryPoint::poll_output`] until it returns a
//! timeout. The daemon (`crate::run`) and the simulator own the sockets and the clock.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_core::cookie::{self, Cookies, Subject};
use braid_core::node::{
    self, Drops, Held, Kept, Outbox, Output, Peer, RepairStore, TAIL_QUIET, TailProbe,
};
use braid_core::wire::{
    Body, Class, Codec, DecodeError, ErrorCode, Header, Keepalive, Key, Kind, Media,
};
use braid_core::{NodeId, StreamId};
use bytes::Bytes;

/// How long a publisher stays authorized after its last publish message.
pub const PUBLISHER_TIMEOUT: Duration = Duration::from_secs(5);

/// Most sequence numbers answered per NACK message (bounds the work one message causes).
const MAX_NACK_ANSWER: u64 = 256;
/// A sender of unpublished media is told to publish at most this often.
const NOT_PUBLISHED_EVERY: Duration = Duration::from_millis(100);
/// Most senders remembered for that.
const MAX_TOLD: usize = 1024;
/// Most packets kept for repairs per stream (2 s at about 80 Mbps of full packets).
const MAX_KEPT: usize = 16_384;

/// What the machine decides with.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node.
    pub node: NodeId,
    /// The streams accepted.
    pub streams: Vec<StreamConfig>,
    /// How long packets are kept to answer NACKs.
    pub retransmit: Duration,
}

/// One stream accepted.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Its id.
    pub id: StreamId,
    /// The stream key: its source signs with the publish key derived from it.
    pub key: String,
    /// The set reflectors every packet goes to.
    pub reflectors: Vec<SocketAddr>,
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
}

/// What happened, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages not taken, by reason.
    pub drops: Drops,
    /// Media packets sent on to the set reflectors.
    pub forwarded: u64,
    /// Media forwarded but not kept for repairs (the publisher repeated a number).
    pub not_kept: u64,
    /// Publish messages accepted.
    pub publish_accepted: u64,
    /// Publish messages refused (wrong key).
    pub publish_refused: u64,
    /// Packets sent again in answer to NACKs.
    pub retransmit_sent: u64,
    /// Packets asked for that were no longer kept.
    pub retransmit_missing: u64,
    /// Last packets sent again to the set reflectors once the stream went quiet
    /// (tail-loss probes).
    pub tail_probes: u64,
}

/// A packet kept for retransmission: its header and media, re-encoded on request.
#[derive(Debug)]
struct KeptPacket {
    header: Header,
    media: Media,
}

impl Kept for KeptPacket {
    fn header(&self) -> Header {
        self.header
    }
    fn media(&self) -> &Media {
        &self.media
    }
}

#[derive(Debug)]
struct Stream {
    config: StreamConfig,
    publishers: HashMap<SocketAddr, Instant>,
    /// Packets kept for repairs, whatever order they came in.
    kept: RepairStore<KeptPacket>,
    /// The last packet forwarded, sent again once the stream goes quiet.
    tail: TailProbe,
    /// Media packets of this stream forwarded.
    forwarded: u64,
}

/// A stream as the control servers' console shows it: where it comes from and how much
/// of it went on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// The stream.
    pub id: StreamId,
    /// Its sources: addresses that published it within [`PUBLISHER_TIMEOUT`] (most
    /// recent first, at most [`MAX_SUMMARY_SOURCES`]).
    pub sources: Vec<SocketAddr>,
    /// Media packets forwarded to the set reflectors.
    pub forwarded: u64,
}

/// Most sources a [`StreamSummary`] names.
pub const MAX_SUMMARY_SOURCES: usize = 8;

/// The entry point's state machine.
#[derive(Debug)]
pub struct EntryPoint {
    node: NodeId,
    /// Senders of unpublished media told to publish, and when.
    told: HashMap<SocketAddr, Instant>,
    streams: BTreeMap<StreamId, Stream>,
    out: Outbox<Infallible>,
    counters: Counters,
    /// Wrong stream keys are logged at most every [`WARN_EVERY`].
    wrong_key_log: node::LogLimit,
    /// Sources' addresses are validated before they are answered more than a cookie.
    cookies: Cookies,
}

/// A warning anyone can provoke is logged at most this often (each is counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

impl EntryPoint {
    /// An entry point for `config`'s streams, reading and signing with `codec`.
    pub fn new(config: Config, codec: Codec) -> Result<EntryPoint, braid_core::Error> {
        let codec = codec.with_sources(config.streams.iter().map(|s| (s.id, Key::publish(&s.key))));
        if config.retransmit.is_zero() {
            return Err(braid_core::Error::InvalidConfig(
                "the retransmit buffer must keep packets for some time".into(),
            ));
        }
        let mut streams = BTreeMap::new();
        for s in config.streams {
            streams.insert(
                s.id,
                Stream {
                    config: s,
                    publishers: HashMap::new(),
                    kept: RepairStore::new(config.retransmit, MAX_KEPT),
                    tail: TailProbe::default(),
                    forwarded: 0,
                },
            );
        }
        Ok(EntryPoint {
            node: config.node,
            told: HashMap::new(),
            streams,
            out: Outbox::new(codec),
            counters: Counters::default(),
            wrong_key_log: node::LogLimit::default(),
            cookies: Cookies::random(),
        })
    }

    /// This entry point, making its address-validation cookies under `secret` (the
    /// simulator's, drawn from its seed) rather than a random one.
    #[must_use]
    pub fn with_cookie_secret(mut self, secret: [u8; 32]) -> EntryPoint {
        self.cookies = Cookies::new(secret);
        self
    }

    /// What happened so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Publishers authorized now, over every stream (for the simulator's bounds).
    pub fn publishers(&self) -> usize {
        self.streams.values().map(|s| s.publishers.len()).sum()
    }

    /// Every stream's sources and packets forwarded, as of `now`.
    pub fn summaries(&self, now: Instant) -> Vec<StreamSummary> {
        self.streams
            .iter()
            .map(|(id, st)| {
                let mut live: Vec<(&SocketAddr, &Instant)> = st
                    .publishers
                    .iter()
                    .filter(|(_, t)| now.saturating_duration_since(**t) < PUBLISHER_TIMEOUT)
                    .collect();
                live.sort_by_key(|(a, t)| (std::cmp::Reverse(**t), **a));
                StreamSummary {
                    id: *id,
                    sources: live
                        .into_iter()
                        .take(MAX_SUMMARY_SOURCES)
                        .map(|(a, _)| *a)
                        .collect(),
                    forwarded: st.forwarded,
                }
            })
            .collect()
    }

    /// Takes one input.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        match input {
            Input::Received {
                from,
                datagram,
                node,
            } => self.handle_message(now, from, datagram, node),
        }
    }

    /// Sends a quiet stream's last packet again to its set reflectors (a tail-loss
    /// probe: the source may have stopped with its last packets lost on the way).
    /// Publishers expire when their media is checked, kept packets when new ones are
    /// pushed.
    pub fn handle_timeout(&mut self, now: Instant) {
        for stream in self.streams.values_mut() {
            let Some(p) = stream
                .tail
                .due(now, TAIL_QUIET)
                .and_then(|s| stream.kept.held(s))
            else {
                continue;
            };
            for to in &stream.config.reflectors {
                if self.out.retransmit(Peer::Addr(*to), p.header, &p.media) {
                    self.counters.tail_probes += 1;
                }
            }
        }
    }

    /// The next thing to do; [`Output::Timeout`] when there is nothing.
    pub fn poll_output(&mut self) -> Output<Infallible> {
        self.out.pop().unwrap_or_else(|| {
            let next = self
                .streams
                .values()
                .filter_map(|s| s.tail.deadline(TAIL_QUIET))
                .min();
            Output::Timeout(next)
        })
    }

    fn handle_message(&mut self, now: Instant, from: SocketAddr, bytes: Bytes, node: bool) {
        let (class, msg) = match self.out.codec().decode_any(bytes.clone()) {
            Ok(m) => m,
            Err(e) => {
                self.counters.drops.add(e.reason());
                if e == DecodeError::BadTag && is_source_publish(&bytes) {
                    self.refuse_publish(now, from, &bytes);
                }
                tracing::debug!("dropping a datagram from {from}: {e}");
                return;
            }
        };
        let id = msg.header.stream;
        let Some(stream) = self.streams.get_mut(&id) else {
            self.counters.drops.add("unknown_stream");
            return;
        };
        // Sources publish and send media, nodes ask for repairs; viewers say nothing here.
        let allowed = match (&msg.body, class) {
            (Body::Publish { .. } | Body::Media(_), c) => c == Class::Source,
            (Body::Nack(_) | Body::Keepalive(_), c) => c == Class::Node,
            _ => true,
        };
        if !allowed {
            self.counters.drops.add("not_a_node");
            return;
        }
        match msg.body {
            Body::Publish { cookie } => {
                // The tag proved the stream's key; the cookie proves the address receives
                // (a recorded publish is worth nothing from elsewhere or a minute later).
                let check = self.cookies.check(now, Subject::Addr(from), &cookie);
                if check != cookie::Check::Fresh {
                    let cookie = self.cookies.issue(now, Subject::Addr(from));
                    self.out
                        .control(Peer::Addr(from), id, Body::Cookie { cookie });
                }
                if !check.ok() {
                    self.counters.drops.add("cookie_missing");
                    return;
                }
                stream.publishers.insert(from, now);
                // Forget publishers long gone, so the map stays as small as the set
                // of live sources.
                if stream.publishers.len() > 16 {
                    stream
                        .publishers
                        .retain(|_, t| now.duration_since(*t) < PUBLISHER_TIMEOUT);
                }
                self.counters.publish_accepted += 1;
                let reply = Body::Keepalive(Keepalive {
                    node: self.node,
                    sent_us: 0,
                    echo_us: 0,
                });
                self.out.control(Peer::Addr(from), id, reply);
            }
            Body::Media(media) => {
                let authorized = stream
                    .publishers
                    .get(&from)
                    .is_some_and(|t| now.duration_since(*t) < PUBLISHER_TIMEOUT);
                if !authorized {
                    self.counters.drops.add("unpublished");
                    tracing::debug!(%from, "media from a source that has not published");
                    // A publisher this node forgot (it restarted) or whose publish was
                    // lost publishes again at once when told; told rarely, since anyone
                    // can send media.
                    let due = self
                        .told
                        .get(&from)
                        .is_none_or(|t| now.duration_since(*t) >= NOT_PUBLISHED_EVERY);
                    if due {
                        if self.told.len() >= MAX_TOLD {
                            self.told.clear();
                        }
                        self.told.insert(from, now);
                        let body = Body::Error {
                            code: ErrorCode::NOT_PUBLISHED,
                            text: "publish first".into(),
                        };
                        self.out.control(Peer::Addr(from), id, body);
                    }
                    return;
                }
                // Into the network it goes signed by this node: the source holds no
                // network key, and nobody past this point takes a source's signature.
                let Ok(signed) = self.out.codec().resign(&bytes) else {
                    self.counters.drops.add("malformed");
                    return;
                };
                for to in &stream.config.reflectors {
                    self.out.send(Peer::Addr(*to), signed.clone(), true);
                }
                self.counters.forwarded += 1;
                stream.forwarded += 1;
                let seq = media.seq;
                stream.tail.sent(now, seq);
                let kept = KeptPacket {
                    header: msg.header,
                    media,
                };
                if !stream.kept.insert(now, seq, kept) {
                    // The publisher sent this number twice: forwarded, not kept again.
                    self.counters.not_kept += 1;
                }
            }
            Body::Nack(ranges) => {
                if !stream.config.reflectors.contains(&from) {
                    self.counters.drops.add("nack_from_stranger");
                    return;
                }
                if !node {
                    self.counters.drops.add("not_a_node");
                    return;
                }
                let a = node::answer_nack(
                    &mut self.out,
                    &stream.kept,
                    Peer::Addr(from),
                    &ranges,
                    MAX_NACK_ANSWER,
                );
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

    /// Tells a source its publish was signed with a wrong stream key (an answer no
    /// larger than the publish, at most every 100 ms per address).
    fn refuse_publish(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.counters.publish_refused += 1;
        let id = StreamId(u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]));
        if let Some(n) = self.wrong_key_log.allow(now, WARN_EVERY) {
            tracing::warn!(
                "{from} tried to publish stream {id} with a wrong key ({n} wrong \
                 keys since the last such line; all counted in \
                 braid_entrypoint_publish_total{{result=\"refused\"}})"
            );
        }
        let due = self
            .told
            .get(&from)
            .is_none_or(|t| now.duration_since(*t) >= NOT_PUBLISHED_EVERY);
        if !due || !self.streams.contains_key(&id) {
            return;
        }
        if self.told.len() >= MAX_TOLD {
            self.told.clear();
        }
        self.told.insert(from, now);
        let body = Body::Error {
            code: ErrorCode::UNAUTHORIZED,
            text: "wrong stream key".into(),
        };
        self.out.control(Peer::Addr(from), id, body);
    }
}

/// Whether `bytes` claims to be a source's publish (its tag unchecked).
fn is_source_publish(bytes: &[u8]) -> bool {
    bytes.len() >= 8
        && bytes[1] == Kind::Publish as u8
        && (bytes[2] >> 3) & 3 == Class::Source as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_core::SeqNo;
    use braid_core::wire::rtp::Fields;
    use braid_core::wire::{Key, Message, Rtp, SeqRange};
    use bytes::BytesMut;

    #[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
    fn t0() -> Instant {
        Instant::now()
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], p))
    }

    fn setup() -> (EntryPoint, Codec) {
        let codec = Codec::new(Key::derive("a network key"));
        let e = EntryPoint::new(
            Config {
                node: NodeId(1),
                streams: vec![StreamConfig {
                    id: StreamId(1),
                    key: "k".into(),
                    reflectors: vec![addr(1), addr(2)],
                }],
                retransmit: Duration::from_secs(2),
            },
            codec.clone(),
        )
        .unwrap()
        .with_cookie_secret([3; 32]);
        (e, codec)
    }

    /// The source's codec for stream 1 (key "k").
    fn source() -> Codec {
        Codec::source("k")
    }

    /// Publishes from `src` as a capture does: without a cookie, then with the one the
    /// entry point answered. Returns what the second publish brought back.
    fn publish(e: &mut EntryPoint, now: Instant, src: SocketAddr) -> Vec<node::Transmit> {
        let s = source();
        e.handle_input(now, input(src, msg(&s, Body::Publish { cookie: [0; 16] })));
        let out = drain(e);
        let cookie = out
            .iter()
            .find_map(|t| match s.decode(t.datagram.clone()) {
                Ok(Message {
                    body: Body::Cookie { cookie },
                    ..
                }) => Some(cookie),
                _ => None,
            })
            .expect("a cookie comes back");
        e.handle_input(now, input(src, msg(&s, Body::Publish { cookie })));
        drain(e)
    }

    fn msg(codec: &Codec, body: Body) -> Bytes {
        let mut b = BytesMut::new();
        let m = Message {
            header: Header {
                stream: StreamId(1),
                ..Header::default()
            },
            body,
        };
        codec.encode(&m, &mut b).unwrap();
        b.freeze()
    }

    fn media(codec: &Codec, seq: u64) -> Bytes {
        let rtp = Rtp::build(
            Fields {
                marker: false,
                payload_type: 33,
                seq: SeqNo(seq).low(),
                timestamp: 0,
                ssrc: 1,
            },
            &[0x47; 188],
        );
        let mut b = BytesMut::new();
        codec
            .encode_media(
                Header {
                    stream: StreamId(1),
                    ..Header::default()
                },
                SeqNo(seq),
                &rtp,
                &mut b,
            )
            .unwrap();
        b.freeze()
    }

    fn drain(e: &mut EntryPoint) -> Vec<node::Transmit> {
        let mut v = Vec::new();
        while let Output::Transmit(t) = e.poll_output() {
            v.push(t);
        }
        v
    }

    fn input(from: SocketAddr, datagram: Bytes) -> Input {
        Input::Received {
            from,
            datagram,
            node: true,
        }
    }

    #[test]
    fn media_flows_only_after_a_publish_with_the_right_key() {
        let (mut e, codec) = setup();
        let now = t0();
        let src = addr(100);
        e.handle_input(now, input(src, media(&source(), 5)));
        let told = drain(&mut e);
        assert_eq!(told.len(), 1, "only the sender is told");
        assert_eq!(told[0].to, Peer::Addr(src));
        assert!(matches!(
            codec.decode(told[0].datagram.clone()).unwrap().body,
            Body::Error { code, .. } if code == ErrorCode::NOT_PUBLISHED
        ));
        assert_eq!(e.counters().drops.get("unpublished"), 1);
        // A publish signed with a wrong key is refused (told, at most every 100 ms).
        let later = now + NOT_PUBLISHED_EVERY;
        let wrong = Codec::source("bad");
        e.handle_input(
            later,
            input(src, msg(&wrong, Body::Publish { cookie: [0; 16] })),
        );
        let out = drain(&mut e);
        assert_eq!(out.len(), 1, "an error goes back");
        assert!(out[0].datagram.len() <= 48, "no larger than a publish");
        assert_eq!(e.counters().publish_refused, 1);
        // Media is still refused, and the sender told at most every 100 ms.
        e.handle_input(later, input(src, media(&source(), 5)));
        assert!(drain(&mut e).is_empty());
        // Media signed with a wrong key, or by a viewer, never counts as the source's.
        e.handle_input(later, input(src, media(&wrong, 5)));
        e.handle_input(later, input(src, media(&Codec::viewer(), 5)));
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.counters().drops.get("not_a_node"), 1);
        let back = publish(&mut e, later, src);
        assert_eq!(back.len(), 1, "a keepalive goes back");
        let m = media(&source(), 6);
        e.handle_input(later, input(src, m.clone()));
        let out = drain(&mut e);
        let to: Vec<Peer> = out.iter().map(|t| t.to).collect();
        assert_eq!(to, [Peer::Addr(addr(1)), Peer::Addr(addr(2))]);
        // Forwarded signed by the entry point, as a node: the same message otherwise.
        let (_, sent) = e.out.codec().decode_any(m).unwrap();
        for t in &out {
            assert!(t.data);
            assert_eq!(codec.decode(t.datagram.clone()).unwrap(), sent);
        }
        // The authorization lapses: nothing is forwarded, the sender is told.
        e.handle_input(later + PUBLISHER_TIMEOUT, input(src, media(&source(), 7)));
        let out = drain(&mut e);
        assert_eq!(
            out.iter().map(|t| t.to).collect::<Vec<_>>(),
            [Peer::Addr(src)]
        );
    }

    #[test]
    fn the_summary_names_the_live_sources_and_counts_what_went_on() {
        let (mut e, _) = setup();
        let t = t0();
        publish(&mut e, t, addr(7));
        for seq in 0..5 {
            e.handle_input(t, input(addr(7), media(&source(), seq)));
        }
        drain(&mut e);
        let s = e.summaries(t);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].sources, [addr(7)]);
        assert_eq!(s[0].forwarded, 5);
        // A source silent past the timeout is no longer named; the count stays.
        let s = e.summaries(t + PUBLISHER_TIMEOUT);
        assert!(s[0].sources.is_empty());
        assert_eq!(s[0].forwarded, 5);
    }

    #[test]
    fn a_recorded_publish_is_worth_nothing_from_another_address_or_later() {
        let (mut e, _) = setup();
        let now = t0();
        let (src, thief) = (addr(100), addr(200));
        publish(&mut e, now, src);
        // What the source sent, replayed by someone else: a cookie, nothing more.
        let cookie = Cookies::new([3; 32]).issue(now, Subject::Addr(src));
        let recorded = msg(&source(), Body::Publish { cookie });
        e.handle_input(now, input(thief, recorded.clone()));
        let out = drain(&mut e);
        assert_eq!(out.len(), 1);
        assert!(matches!(
            source().decode(out[0].datagram.clone()).unwrap().body,
            Body::Cookie { .. }
        ));
        e.handle_input(now, input(thief, media(&source(), 9)));
        assert!(
            drain(&mut e).iter().all(|t| t.to == Peer::Addr(thief)),
            "nothing forwarded"
        );
        // From the source's own address two cookie epochs later: refused too.
        let late = now + cookie::EPOCH * 2;
        e.handle_input(late, input(src, recorded));
        assert_eq!(e.counters().drops.get("cookie_missing"), 3);
    }

    #[test]
    fn a_packet_the_source_delivered_late_is_still_repaired() {
        let (mut e, codec) = setup();
        let now = t0();
        let src = addr(100);
        publish(&mut e, now, src);
        for s in [10, 12, 11] {
            e.handle_input(now, input(src, media(&source(), s)));
        }
        drain(&mut e);
        let nack = msg(
            &codec,
            Body::Nack(vec![SeqRange {
                first: SeqNo(11),
                count: 1,
            }]),
        );
        e.handle_input(now, input(addr(1), nack));
        assert_eq!(drain(&mut e).len(), 1, "the late packet is answered");
    }

    #[test]
    fn nacks_are_answered_only_for_set_reflectors_that_are_nodes() {
        let (mut e, codec) = setup();
        let now = t0();
        let src = addr(100);
        publish(&mut e, now, src);
        for s in 10..15 {
            e.handle_input(now, input(src, media(&source(), s)));
        }
        drain(&mut e);
        let nack = msg(
            &codec,
            Body::Nack(vec![SeqRange {
                first: SeqNo(11),
                count: 2,
            }]),
        );
        e.handle_input(now, input(addr(9), nack.clone()));
        assert!(drain(&mut e).is_empty());
        e.handle_input(
            now,
            Input::Received {
                from: addr(1),
                datagram: nack.clone(),
                node: false,
            },
        );
        assert!(drain(&mut e).is_empty());
        e.handle_input(now, input(addr(1), nack));
        assert_eq!(drain(&mut e).len(), 2);
        let c = e.counters();
        assert_eq!(
            (
                c.drops.get("nack_from_stranger"),
                c.drops.get("not_a_node"),
                c.retransmit_sent
            ),
            (1, 1, 2)
        );
    }
}
