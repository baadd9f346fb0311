//! What every role's state machine says to its daemon, and what the roles share.
//!
//! Each role (capture, entry point, set reflector, edge, the client's session) is a
//! sans-IO machine of one shape: the owner feeds it with `handle_input(now, input)` or
//! `handle_timeout(now)`, then calls `poll_output()` until it returns
//! [`Output::Timeout`], and calls `handle_timeout` again at that instant at the latest.
//! Between two calls the machine changes only through its own methods: no clock, no
//! socket, no task, no lock. The owner is a daemon (real sockets, real time) or the
//! simulator (virtual links, virtual time); both run the same decisions.
//!
//! - [`Peer`]: where a message comes from or goes to.
//! - [`Transmit`], [`Output`]: what a machine asks of its owner.
//! - [`Outbox`]: a machine's queue of outputs, with the codec that signs what it builds.
//! - [`Drops`]: every message not taken, counted by reason.
//! - [`answer_nack`]: repairs answered from a ring of kept packets (entry point, set
//!   reflector, edge).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::ring::Ring;
use crate::wire::{Body, Codec, Flags, Header, Media, Message, SeqRange};
use crate::{SeqNo, StreamId};

/// Where a message comes from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A datagram peer, UDP or QUIC: the owner's socket picks the transport by address.
    Addr(SocketAddr),
    /// A stream connection (a TCP viewer), numbered by the owner.
    Conn(u64),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Addr(a) => write!(f, "{a}"),
            Peer::Conn(c) => write!(f, "tcp#{c}"),
        }
    }
}

/// One message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub to: Peer,
    /// The whole message, tag included.
    pub datagram: Bytes,
    /// Media rather than control: a QUIC datagram rather than the control stream, and
    /// what a `data_only` impairment acts on.
    pub data: bool,
}

/// What a machine asks of its owner.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<E> {
    /// Send a message.
    Transmit(Transmit),
    /// Something for the owner to act on (a request to a control server, bytes to write).
    Event(E),
    /// Nothing more for now: call `handle_timeout` at this instant at the latest (never,
    /// when `None`, unless new input comes).
    Timeout(Option<Instant>),
}

/// Messages not taken, counted by reason (the `reason` label of `braid_dropped_total`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drops(BTreeMap<&'static str, u64>);

impl Drops {
    /// Counts one message dropped for `reason`.
    pub fn add(&mut self, reason: &'static str) {
        *self.0.entry(reason).or_insert(0) += 1;
    }

    /// Counts `n` messages dropped for `reason`.
    pub fn add_n(&mut self, reason: &'static str, n: u64) {
        if n > 0 {
            *self.0.entry(reason).or_insert(0) += n;
        }
    }

    /// How many were dropped for `reason`.
    pub fn get(&self, reason: &str) -> u64 {
        self.0.get(reason).copied().unwrap_or(0)
    }

    /// Every reason with its count.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.0.iter().map(|(r, n)| (*r, *n))
    }

    /// All drops, whatever the reason.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// Outputs' room an empty [`Outbox`] keeps: a busy edge's outputs between two drains
/// in steady state (a few hundred viewers' packets of one input batch).
pub const OUTBOX_KEEP: usize = 4096;

/// A machine's queue of outputs, with the codec that signs the messages it builds.
#[derive(Debug)]
pub struct Outbox<E> {
    codec: Codec,
    buf: BytesMut,
    queue: VecDeque<Output<E>>,
}

impl<E> Outbox<E> {
    /// An empty queue signing with `codec`.
    pub fn new(codec: Codec) -> Outbox<E> {
        Outbox {
            codec,
            buf: BytesMut::with_capacity(2048),
            queue: VecDeque::new(),
        }
    }

    /// The codec messages are read and signed with.
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// Queues a message that is already encoded (a datagram forwarded unchanged).
    pub fn send(&mut self, to: Peer, datagram: Bytes, data: bool) {
        self.queue
            .push_back(Output::Transmit(Transmit { to, datagram, data }));
    }

    /// Encodes a control message about `stream`.
    pub fn encode(&mut self, stream: StreamId, body: Body) -> Option<Bytes> {
        self.encode_flagged(stream, Flags::empty(), body)
    }

    /// Encodes a control message about `stream` with header `flags`.
    fn encode_flagged(&mut self, stream: StreamId, flags: Flags, body: Body) -> Option<Bytes> {
        self.buf.clear();
        let msg = Message {
            header: Header {
                stream,
                flags,
                ..Header::default()
            },
            body,
        };
        // Bodies built by the machines are within the protocol's bounds; one that is not
        // is a bug, and is not sent.
        self.codec.encode(&msg, &mut self.buf).ok()?;
        Some(self.buf.split().freeze())
    }

    /// Encodes and queues a control message about `stream` to `to`.
    pub fn control(&mut self, to: Peer, stream: StreamId, body: Body) {
        self.control_flagged(to, stream, Flags::empty(), body);
    }

    /// Like [`Outbox::control`], with header `flags` (a subscription asking for the
    /// latest group of pictures, say).
    pub fn control_flagged(&mut self, to: Peer, stream: StreamId, flags: Flags, body: Body) {
        if let Some(d) = self.encode_flagged(stream, flags, body) {
            self.send(to, d, false);
        }
    }

    /// Re-encodes a kept media message with the retransmission flag and queues it.
    pub fn retransmit(&mut self, to: Peer, header: Header, media: &Media) -> bool {
        self.buf.clear();
        let header = Header {
            flags: header.flags | Flags::RETRANSMIT,
            ..header
        };
        if self
            .codec
            .encode_media(header, media.seq, &media.rtp, &mut self.buf)
            .is_err()
        {
            return false;
        }
        let d = self.buf.split().freeze();
        self.send(to, d, true);
        true
    }

    /// Queues an event for the owner.
    pub fn event(&mut self, e: E) {
        self.queue.push_back(Output::Event(e));
    }

    /// The next output queued, if any. A queue drained after a burst (many viewers
    /// joining at once, each sent its catch-up) gives back what it grew beyond
    /// [`OUTBOX_KEEP`] outputs, rather than hold the burst's memory for good.
    pub fn pop(&mut self) -> Option<Output<E>> {
        let o = self.queue.pop_front();
        if o.is_none() && self.queue.capacity() > OUTBOX_KEEP {
            self.queue.shrink_to(OUTBOX_KEEP);
        }
        o
    }

    /// Outputs queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// A packet kept to answer repairs.
pub trait Kept {
    /// The header it came with.
    fn header(&self) -> Header;
    /// Its sequence number and RTP packet.
    fn media(&self) -> &Media;
}

/// Where repairs are looked up: a ring of merged packets, or a [`RepairStore`].
pub trait Held<T> {
    /// The packet with sequence number `seq`, if held.
    fn held(&self, seq: SeqNo) -> Option<&T>;
}

impl<T> Held<T> for Ring<T> {
    fn held(&self, seq: SeqNo) -> Option<&T> {
        self.get(seq).map(|e| &e.item)
    }
}

/// How long a stream to a receiver may be quiet before its newest packet is sent again
/// ([`TailProbe`]): longer than the gaps of a steady stream, short against a viewer's
/// buffer.
pub const TAIL_QUIET: Duration = Duration::from_millis(60);

/// A tail-loss probe. A receiver learns a packet is missing from the packets after it,
/// so the last ones before a stream goes quiet (a capture that stops or restarts) can be
/// lost without anyone knowing. Once a stream to a receiver has been quiet for a while,
/// the sender sends its newest packet again, once: a receiver that lost it gets it back,
/// and one that lost some before it now sees the hole and asks for them.
#[derive(Debug, Clone, Copy, Default)]
pub struct TailProbe {
    newest: Option<SeqNo>,
    last_sent: Option<Instant>,
    probed: bool,
}

impl TailProbe {
    /// Packet `seq` was sent at `now`.
    pub fn sent(&mut self, now: Instant, seq: SeqNo) {
        // The highest number since the last probe (a sender that forwards in arrival
        // order may send an older one last); after a probe, whatever comes next (a new
        // session may be numbered lower).
        self.newest = match self.newest {
            Some(n) if !self.probed && n > seq => Some(n),
            _ => Some(seq),
        };
        self.last_sent = Some(now);
        self.probed = false;
    }

    /// The packet to send again if the stream has been quiet for `quiet` at `now`; once
    /// per quiet spell.
    pub fn due(&mut self, now: Instant, quiet: Duration) -> Option<SeqNo> {
        let at = self.last_sent?;
        if self.probed || now < at + quiet {
            return None;
        }
        self.probed = true;
        self.newest
    }

    /// When the next probe is due, if one is.
    pub fn deadline(&self, quiet: Duration) -> Option<Instant> {
        self.last_sent.filter(|_| !self.probed).map(|t| t + quiet)
    }
}

/// Packets kept to answer repairs when they may arrive in any order (an entry point
/// takes the source's packets as the network delivers them): bounded by age and count,
/// and a packet that arrives behind newer ones is kept all the same.
#[derive(Debug)]
pub struct RepairStore<T> {
    max_age: std::time::Duration,
    max_packets: usize,
    packets: BTreeMap<SeqNo, (Instant, T)>,
}

impl<T> RepairStore<T> {
    /// Keeps packets for `max_age`, at most `max_packets` of them.
    pub fn new(max_age: std::time::Duration, max_packets: usize) -> RepairStore<T> {
        RepairStore {
            max_age,
            max_packets: max_packets.max(1),
            packets: BTreeMap::new(),
        }
    }

    /// Keeps `item` as `seq`; returns `false` if that number is already held (a
    /// duplicate: the first copy stays). The oldest packets go when the store is full or
    /// older than its age.
    pub fn insert(&mut self, now: Instant, seq: SeqNo, item: T) -> bool {
        if self.packets.contains_key(&seq) {
            return false;
        }
        self.packets.insert(seq, (now, item));
        while self.packets.len() > self.max_packets {
            self.packets.pop_first();
        }
        // Age by the oldest number: numbers and arrival times both grow with the stream.
        while let Some((_, (t, _))) = self.packets.first_key_value() {
            if now.saturating_duration_since(*t) <= self.max_age {
                break;
            }
            self.packets.pop_first();
        }
        true
    }

    /// Packets held.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
}

impl<T> Held<T> for RepairStore<T> {
    fn held(&self, seq: SeqNo) -> Option<&T> {
        self.packets.get(&seq).map(|(_, t)| t)
    }
}

/// What answering one NACK did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NackAnswer {
    /// Packets sent again.
    pub sent: u64,
    /// Their RTP bytes.
    pub bytes: u64,
    /// Numbers asked for that were no longer (or never) held.
    pub missing: u64,
    /// The NACK asked for more than the limit; the rest was ignored.
    pub over_limit: bool,
    /// Held, but not sent again: over the byte budget (see [`answer_nack_within`]).
    pub over_budget: u64,
    /// Held, but not sent again: asked for again before the last copy sent could have
    /// arrived (see [`Repaired`]).
    pub too_soon: u64,
}

/// Answers a NACK for `ranges` from `kept`: every packet held goes to `to` again with the
/// retransmission flag. At most `limit` numbers are looked at, which bounds the work and
/// the bytes one message can cause.
pub fn answer_nack<T: Kept, E>(
    out: &mut Outbox<E>,
    kept: &impl Held<T>,
    to: Peer,
    ranges: &[SeqRange],
    limit: u64,
) -> NackAnswer {
    answer_nack_within(out, kept, to, ranges, limit, u64::MAX, |_| true)
}

/// [`answer_nack`], sending at most `budget` RTP bytes again: the packets asked for
/// first go first; the rest held are counted in [`NackAnswer::over_budget`] (a peer whose
/// link is full gets no more repairs than its link has room for: more would only
/// overflow it again). A packet goes only if `fresh` says it may (and that it went, see
/// [`Repaired::fresh`]); the rest are counted in [`NackAnswer::too_soon`].
pub fn answer_nack_within<T: Kept, E>(
    out: &mut Outbox<E>,
    kept: &impl Held<T>,
    to: Peer,
    ranges: &[SeqRange],
    limit: u64,
    budget: u64,
    mut fresh: impl FnMut(SeqNo) -> bool,
) -> NackAnswer {
    let mut answer = NackAnswer::default();
    let mut looked = 0u64;
    for r in ranges {
        for i in 0..u64::from(r.count) {
            if looked >= limit {
                answer.over_limit = true;
                return answer;
            }
            looked += 1;
            let seq = r.first.plus(i);
            match kept.held(seq) {
                Some(p) if answer.bytes + p.media().rtp.len() as u64 > budget => {
                    answer.over_budget += 1;
                }
                Some(_) if !fresh(seq) => answer.too_soon += 1,
                Some(p) if out.retransmit(to, p.header(), p.media()) => {
                    answer.sent += 1;
                    answer.bytes += p.media().rtp.len() as u64;
                }
                Some(_) => {}
                None => answer.missing += 1,
            }
        }
    }
    answer
}

/// The packets lately sent again to one peer, and when: a peer that asks for a packet
/// again before the copy last sent could have reached it (within its round trip) is not
/// sent another. A peer whose link queues asks again while the first answer waits in
/// the queue; each answer more fills the queue further and loses the stream's next
/// packets, which are asked for in turn, until repairs crowd out the stream.
#[derive(Debug, Clone, Default)]
pub struct Repaired {
    order: VecDeque<(SeqNo, Instant)>,
    at: std::collections::HashMap<SeqNo, Instant>,
}

impl Repaired {
    /// Packets remembered at most (a peer asking for more at once forgets the oldest).
    pub const HELD: usize = 1024;
    /// Remembered this long at most.
    pub const FOR: Duration = Duration::from_secs(2);

    /// Whether `seq` may be sent again now, to a peer `round_trip` away; if so it is
    /// remembered as sent now.
    pub fn fresh(&mut self, now: Instant, round_trip: Duration, seq: SeqNo) -> bool {
        while let Some(&(old, at)) = self.order.front() {
            if self.order.len() < Self::HELD && now.saturating_duration_since(at) < Self::FOR {
                break;
            }
            self.order.pop_front();
            if self.at.get(&old) == Some(&at) {
                self.at.remove(&old);
            }
        }
        if self
            .at
            .get(&seq)
            .is_some_and(|at| now.saturating_duration_since(*at) < round_trip)
        {
            return false;
        }
        self.order.push_back((seq, now));
        self.at.insert(seq, now);
        true
    }
}

/// At most one log line per period for a warning anyone can provoke (a wrong key, a bad
/// request): each occurrence is counted elsewhere; the line says how many it stands for.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogLimit {
    last: Option<Instant>,
    since: u64,
}

impl LogLimit {
    /// One more occurrence at `now`: `Some(n)` when a line may be written now, standing
    /// for `n` occurrences (this one and those not logged since the last line).
    pub fn allow(&mut self, now: Instant, every: Duration) -> Option<u64> {
        self.since += 1;
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// A node's clock for things that need wall time (token expiry): the wall time that
/// went with one instant, given by the owner, so the machine never reads a clock.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    unix_ms: u64,
}

impl WallClock {
    /// `unix_ms` (milliseconds since the Unix epoch) was the wall time at `at`.
    pub fn new(at: Instant, unix_ms: u64) -> WallClock {
        WallClock { at, unix_ms }
    }

    /// Milliseconds since the Unix epoch at `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        match now.checked_duration_since(self.at) {
            Some(d) => self.unix_ms + d.as_millis() as u64,
            None => self
                .unix_ms
                .saturating_sub(self.at.duration_since(now).as_millis() as u64),
        }
    }

    /// Seconds since the Unix epoch at `now`.
    pub fn unix_secs(&self, now: Instant) -> u64 {
        self.unix_ms(now) / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // One real instant to count from.
    fn a_tail_probe_sends_the_newest_packet_again_once_per_quiet_spell() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut p = TailProbe::default();
        assert_eq!(p.due(t + ms(500), TAIL_QUIET), None, "nothing sent yet");
        p.sent(t, SeqNo(10));
        p.sent(t + ms(5), SeqNo(12));
        p.sent(t + ms(6), SeqNo(11));
        assert_eq!(p.deadline(TAIL_QUIET), Some(t + ms(6) + TAIL_QUIET));
        assert_eq!(p.due(t + ms(30), TAIL_QUIET), None, "not quiet long enough");
        assert_eq!(
            p.due(t + ms(70), TAIL_QUIET),
            Some(SeqNo(12)),
            "the highest"
        );
        assert_eq!(p.due(t + ms(200), TAIL_QUIET), None, "once");
        assert_eq!(p.deadline(TAIL_QUIET), None);
        // A new session numbered lower: its packets are the newest.
        p.sent(t + ms(300), SeqNo(3));
        assert_eq!(p.due(t + ms(400), TAIL_QUIET), Some(SeqNo(3)));
    }
    use crate::SeqNo;
    use crate::ring;
    use crate::wire::{Key, Rtp};
    use std::time::Duration;

    #[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
    fn t0() -> Instant {
        Instant::now()
    }

    struct K(Header, Media);
    impl Kept for K {
        fn header(&self) -> Header {
            self.0
        }
        fn media(&self) -> &Media {
            &self.1
        }
    }

    fn media(seq: u64) -> Media {
        let rtp = Rtp::build(
            crate::wire::rtp::Fields {
                marker: false,
                payload_type: 33,
                seq: SeqNo(seq).low(),
                timestamp: 0,
                ssrc: 1,
            },
            &[0x47; 188],
        );
        Media {
            seq: SeqNo(seq),
            rtp,
        }
    }

    #[test]
    fn a_drained_outbox_gives_back_a_bursts_room() {
        let mut out: Outbox<()> = Outbox::new(Codec::new(Key::derive("k")));
        let d = Bytes::from_static(b"x");
        for _ in 0..3 {
            for _ in 0..20_000 {
                out.send(Peer::Conn(1), d.clone(), true);
            }
            let mut popped = 0;
            while out.pop().is_some() {
                popped += 1;
            }
            assert_eq!(popped, 20_000);
            assert!(
                out.queue.capacity() <= OUTBOX_KEEP,
                "{}",
                out.queue.capacity()
            );
        }
        // A steady queue keeps its room: no allocation per drain.
        for _ in 0..100 {
            out.send(Peer::Conn(1), d.clone(), true);
        }
        let room = out.queue.capacity();
        while out.pop().is_some() {}
        assert_eq!(out.queue.capacity(), room);
    }

    #[test]
    fn nack_answers_what_is_held_with_the_retransmit_flag_and_stops_at_the_limit() {
        let codec = Codec::new(Key::derive("a network key"));
        let mut out: Outbox<()> = Outbox::new(codec.clone());
        let now = t0();
        let mut kept = Ring::new(ring::Config::default()).unwrap();
        for s in 10..20 {
            kept.push(now, SeqNo(s), false, 200, K(Header::default(), media(s)));
        }
        let to = Peer::Conn(1);
        let ranges = [SeqRange {
            first: SeqNo(8),
            count: 5,
        }];
        let a = answer_nack(&mut out, &kept, to, &ranges, 256);
        assert_eq!((a.sent, a.missing, a.over_limit), (3, 2, false));
        let mut seqs = Vec::new();
        while let Some(Output::Transmit(t)) = out.pop() {
            let m = codec.decode(t.datagram).unwrap();
            assert!(m.header.flags.contains(Flags::RETRANSMIT));
            match m.body {
                Body::Media(m) => seqs.push(m.seq.0),
                b => panic!("not media: {b:?}"),
            }
        }
        assert_eq!(seqs, [10, 11, 12]);
        let a = answer_nack(&mut out, &kept, to, &ranges, 2);
        assert_eq!((a.sent, a.missing, a.over_limit), (0, 2, true));
        // Within a budget of two packets' bytes: the first two asked for, the third
        // counted, not sent.
        while out.pop().is_some() {}
        let size = kept.held(SeqNo(10)).unwrap().media().rtp.len() as u64;
        let a = answer_nack_within(&mut out, &kept, to, &ranges, 256, size * 2 + 1, |_| true);
        assert_eq!((a.sent, a.bytes, a.over_budget), (2, size * 2, 1));
        let mut sent = 0;
        while let Some(Output::Transmit(_)) = out.pop() {
            sent += 1;
        }
        assert_eq!(sent, 2);
        // Packets its peer may not be sent again yet: counted, not sent.
        let a = answer_nack_within(&mut out, &kept, to, &ranges, 256, u64::MAX, |s| {
            s != SeqNo(11)
        });
        assert_eq!((a.sent, a.too_soon, a.missing), (2, 1, 2));
    }

    #[test]
    fn a_packet_asked_for_again_within_the_round_trip_is_not_sent_again() {
        let now = t0();
        let rtt = Duration::from_millis(300);
        let mut r = Repaired::default();
        assert!(r.fresh(now, rtt, SeqNo(7)));
        assert!(r.fresh(now, rtt, SeqNo(8)), "another packet goes");
        // Asked again while the first copy is on its way: not sent.
        assert!(!r.fresh(now + Duration::from_millis(100), rtt, SeqNo(7)));
        assert!(!r.fresh(now + Duration::from_millis(299), rtt, SeqNo(7)));
        // Asked again after a round trip: the copy was lost, another goes.
        assert!(r.fresh(now + rtt, rtt, SeqNo(7)));
        assert!(!r.fresh(now + rtt, rtt, SeqNo(7)));
        // A peer with no round trip known is answered every time.
        assert!(r.fresh(now + rtt, Duration::ZERO, SeqNo(7)));
        // Memory stays bounded however many packets are asked for, the oldest forgotten.
        let later = now + Duration::from_secs(1);
        for s in 0..(Repaired::HELD as u64 * 3) {
            assert!(r.fresh(later, rtt, SeqNo(1000 + s)));
        }
        assert!(r.order.len() <= Repaired::HELD && r.at.len() <= Repaired::HELD);
        assert!(r.fresh(later, rtt, SeqNo(1000)), "forgotten");
        // And by age.
        let much_later = later + Repaired::FOR;
        assert!(r.fresh(much_later, Duration::from_secs(10), SeqNo(1000)));
        assert!(r.order.len() <= 1 && r.at.len() <= 1, "{:?}", r.order.len());
    }

    #[test]
    fn the_repair_store_keeps_late_arrivals_and_forgets_by_age_and_count() {
        let now = t0();
        let mut s = RepairStore::new(Duration::from_millis(100), 4);
        assert!(s.insert(now, SeqNo(10), 10));
        assert!(s.insert(now, SeqNo(12), 12));
        assert!(s.insert(now, SeqNo(11), 11), "a late arrival is kept");
        assert!(!s.insert(now, SeqNo(11), 99), "a duplicate is not");
        assert_eq!(s.held(SeqNo(11)), Some(&11));
        assert!(s.insert(now, SeqNo(13), 13));
        assert!(s.insert(now, SeqNo(14), 14));
        assert_eq!((s.len(), s.held(SeqNo(10))), (4, None), "the oldest went");
        assert!(s.insert(now + Duration::from_millis(150), SeqNo(15), 15));
        assert_eq!(s.len(), 1, "the rest aged out");
    }

    #[test]
    fn wall_clock_follows_the_instant_both_ways() {
        let t = t0() + Duration::from_secs(10);
        let c = WallClock::new(t, 1_000_000);
        assert_eq!(c.unix_ms(t + Duration::from_millis(1500)), 1_001_500);
        assert_eq!(c.unix_ms(t - Duration::from_millis(500)), 999_500);
        assert_eq!(c.unix_secs(t + Duration::from_millis(1500)), 1001);
    }

    #[test]
    fn drops_count_by_reason() {
        let mut d = Drops::default();
        d.add("a");
        d.add("a");
        d.add("b");
        assert_eq!(
            (d.get("a"), d.get("b"), d.get("c"), d.total()),
            (2, 1, 0, 3)
        );
    }

    #[test]
    fn a_provoked_warning_is_written_once_a_period_and_says_how_many_it_stands_for() {
        let t = t0();
        let every = Duration::from_secs(10);
        let mut l = LogLimit::default();
        assert_eq!(l.allow(t, every), Some(1));
        for k in 1..20_000u64 {
            assert_eq!(l.allow(t + Duration::from_micros(k), every), None);
        }
        assert_eq!(l.allow(t + every, every), Some(20_000));
        assert_eq!(l.allow(t + every * 3, every), Some(1));
    }
}
