//! The capture's decisions, sans-IO: publishing with the stream key, when media may
//! flow, numbering, and the same datagram to every entry point.
//!
//! [`Capture`] has the shape of every Braid machine (`braid_core::node`): feed it
//! [`Input`]s (what the entry points said, pieces of the source) and timeouts, then drain
//! [`Capture::poll_output`] until it returns a timeout. The daemon reads the source only
//! while [`Capture::wants_media`] says so.
//!
//! Sequence numbers start from the wall clock (10,000 per second), so a capture started
//! again goes on above where it stopped instead of going back; its first packet is
//! flagged as a discontinuity.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_core::node::{Outbox, Output, Peer, WallClock};
use braid_core::wire::rtp::{CLOCK_RATE_MP2T, Fields, PAYLOAD_TYPE_MP2T};
use braid_core::wire::{Body, COOKIE_LEN, Codec, Cookie, ErrorCode, Flags, Header, Message, Rtp};
use braid_core::{PathId, SeqNo, StreamId};
use bytes::Bytes;
use serde::Serialize;

use crate::packetize::Packetizer;

/// How often the publish message is repeated to every entry point.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// How often it is repeated to an entry point that has not accepted it lately.
const PUBLISH_RETRY: Duration = Duration::from_millis(250);
/// An entry point whose last acceptance is older than this is asked again every
/// [`PUBLISH_RETRY`] (its acknowledgement of a publish comes within a round trip).
const ACCEPT_STALE: Duration = Duration::from_millis(1500);
/// How long media waits for every entry point to accept the publish…
const ACCEPT_WAIT: Duration = Duration::from_secs(3);
/// … or, once one has, for the others (a lost publish is repeated within this).
const ACCEPT_OTHERS: Duration = Duration::from_millis(600);
/// An entry point that acknowledged within this long counts as reachable.
const REACHABLE: Duration = Duration::from_secs(3);

/// What the capture decides with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The stream.
    pub stream: StreamId,
    /// The stream key the entry points expect: the capture signs everything it sends
    /// with the publish key derived from it, and holds no network key.
    pub key: String,
    /// The entry points, each sent every packet.
    pub entries: Vec<SocketAddr>,
    /// TS packets per RTP packet (1 to 7).
    pub ts_per_rtp: usize,
    /// HLS segments span at least this much: the first keyframe this long (less a tenth,
    /// for the source's jitter) after the last segment's starts the next, and carries its
    /// number.
    pub segment: Duration,
}

/// What the owner feeds in.
#[derive(Debug, Clone)]
pub enum Input {
    /// A message from an entry point.
    Received {
        /// Who sent it.
        from: SocketAddr,
        /// The message.
        datagram: Bytes,
    },
    /// Bytes of the source's MPEG-TS, in any chunking.
    Source {
        /// The bytes.
        bytes: Bytes,
        /// The source does not continue from the previous piece (a looped file).
        discontinuity: bool,
        /// RTP datagrams of the source found missing before these bytes (their
        /// sequence numbers skipped): lost before the capture, beyond repair.
        rtp_lost: u64,
    },
}

/// What the capture asks of its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// This packet went to every entry point (its payload, for the tee).
    Sent {
        /// Its sequence number.
        seq: SeqNo,
        /// The TS bytes it carries.
        payload: Bytes,
        /// Whether a decoder can start there.
        keyframe: bool,
    },
    /// An entry point refused the stream.
    Refused {
        /// Which.
        from: SocketAddr,
        /// Why, in its words.
        text: String,
    },
    /// A second passed: the progress is fresh.
    Progress,
}

/// Counters reported on the terminal and in JSON.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Progress {
    /// Packets sent.
    pub packets: u64,
    /// TS bytes sent.
    pub bytes: u64,
    /// Keyframes seen.
    pub keyframes: u64,
    /// HLS segments started: keyframes numbered for the edges to cut at.
    pub segments: u64,
    /// Source bytes that were not TS packets.
    pub skipped_bytes: u64,
    /// Entry points that acknowledged within the last 3 s.
    pub entries_reachable: usize,
    /// Entry points configured.
    pub entries: usize,
    /// Bit rate sent over the last second.
    pub bitrate_bps: u64,
    /// Entry points' refusals.
    pub refused: u64,
    /// Messages from entry points that did not decode.
    pub malformed: u64,
    /// The source's RTP datagrams that never arrived (sequence numbers skipped).
    pub input_rtp_lost: u64,
    /// TS continuity errors in the source: TS packets lost (or reordered) before the
    /// capture.
    pub input_continuity_errors: u64,
    /// TS packets those continuity errors say are missing.
    pub input_ts_missing: u64,
    /// Bytes of a live source dropped because they came before the stream could flow
    /// (before the entry points accepted it, at most 3 s).
    pub input_before_start: u64,
}

/// The capture's state machine.
pub struct Capture {
    config: Config,
    out: Outbox<Event>,
    packetizer: Packetizer,
    /// Each entry point's cookie for this address (zeros until it gives one).
    cookies: Vec<Cookie>,
    started: Instant,
    seq: SeqNo,
    ssrc: u32,
    discontinuity: bool,
    /// The next HLS segment's number, and when the last segment started.
    segment: (u64, Option<Instant>),
    /// Last acknowledgement from each entry point.
    last_ack: Vec<Option<Instant>>,
    next_publish: Instant,
    /// When the publish next goes to every entry point (else only to those that have
    /// not accepted it lately).
    next_full_publish: Instant,
    accept_until: Instant,
    /// When the first entry point accepted.
    first_accept: Option<Instant>,
    progress: Progress,
    last_report: (Instant, u64),
    now: Instant,
}

impl Capture {
    /// A capture starting at `now`, numbering from the wall time `clock` gives; it sends
    /// its publish message at once.
    pub fn new(
        config: Config,
        clock: WallClock,
        now: Instant,
    ) -> Result<Capture, braid_core::wire::EncodeError> {
        // The publish carries no key: the codec signs it with the stream's publish key.
        // Numbers from the wall clock (a capture started again numbers above where it
        // left off), in one of eight spaces by stream id (bits 45 to 47): the renditions
        // of a ladder (consecutive ids) never share a number, so a repair asked of the
        // wrong one is never answered with another's packet.
        let start_seq =
            ((clock.unix_ms(now) * 10) & ((1 << 45) - 1)) | u64::from(config.stream.0 % 8) << 45;
        let mut c = Capture {
            packetizer: Packetizer::new(config.ts_per_rtp),
            cookies: vec![[0; COOKIE_LEN]; config.entries.len()],
            started: now,
            seq: SeqNo(start_seq),
            // Segments are numbered from the wall clock too (ten per second: more than
            // segments of at least 100 ms can use), so a capture started again numbers
            // its segments above the last one's.
            segment: (clock.unix_ms(now) / 100, None),
            ssrc: config.stream.0.wrapping_mul(0x9e37_79b9) ^ (start_seq as u32),
            discontinuity: true,
            last_ack: vec![None; config.entries.len()],
            next_publish: now + PUBLISH_RETRY,
            next_full_publish: now + PUBLISH_EVERY,
            accept_until: now + ACCEPT_WAIT,
            first_accept: None,
            progress: Progress {
                entries: config.entries.len(),
                ..Progress::default()
            },
            last_report: (now, 0),
            now,
            out: Outbox::new(Codec::source(&config.key)),
            config,
        };
        c.send_publish(|_| true)?;
        Ok(c)
    }

    /// Whether media may flow: every entry point accepted the publish, or one did a
    /// moment ago and the others' repeated publish had its chance, or the wait is over.
    /// Media an entry point gets before it accepted the publish is refused, so starting
    /// early would start with one path where there are two (and over QUIC the publish
    /// travels on a stream, media as datagrams, which could overtake it).
    pub fn wants_media(&self) -> bool {
        self.last_ack.iter().all(Option::is_some)
            || self
                .first_accept
                .is_some_and(|t| self.now >= t + ACCEPT_OTHERS)
            || self.now >= self.accept_until
    }

    /// What was sent so far.
    pub fn progress(&self) -> Progress {
        let mut p = self.progress;
        let s = self.packetizer.stats();
        p.keyframes = s.keyframes;
        p.skipped_bytes = s.skipped_bytes;
        p.input_continuity_errors = s.continuity_errors;
        p.input_ts_missing = s.continuity_missing;
        p
    }

    /// The next sequence number to be sent.
    pub fn next_seq(&self) -> SeqNo {
        self.seq
    }

    /// Whether an entry point accepted the publish.
    pub fn accepted(&self) -> bool {
        self.last_ack.iter().any(Option::is_some)
    }

    /// Takes one input.
    pub fn handle_input(&mut self, now: Instant, input: Input) {
        self.now = now;
        match input {
            Input::Received { from, datagram } => match self.out.codec().decode(datagram) {
                Ok(Message {
                    body: Body::Keepalive(_),
                    ..
                }) => {
                    if let Some(i) = self.config.entries.iter().position(|e| *e == from) {
                        self.last_ack[i] = Some(now);
                        self.first_accept.get_or_insert(now);
                    }
                }
                Ok(Message {
                    body: Body::Cookie { cookie },
                    ..
                }) => {
                    // The entry point validates this address: publish again with its
                    // cookie at once.
                    if let Some(i) = self.config.entries.iter().position(|e| *e == from) {
                        let fresh = self.cookies[i] != cookie;
                        self.cookies[i] = cookie;
                        if fresh {
                            let _ = self.send_publish(|j| j == i);
                        }
                    }
                }
                Ok(Message {
                    body: Body::Error { code, .. },
                    ..
                }) if code == ErrorCode::NOT_PUBLISHED => {
                    // The entry point forgot this publisher (it restarted): publish to it
                    // again at once, not at the next round.
                    if let Some(i) = self.config.entries.iter().position(|e| *e == from) {
                        self.last_ack[i] = None;
                        let _ = self.send_publish(|j| j == i);
                    }
                }
                Ok(Message {
                    body: Body::Error { text, .. },
                    ..
                }) => {
                    self.progress.refused += 1;
                    self.out.event(Event::Refused { from, text });
                }
                Ok(_) => {}
                Err(_) => self.progress.malformed += 1,
            },
            Input::Source {
                bytes,
                discontinuity,
                rtp_lost,
            } => {
                self.progress.input_rtp_lost += rtp_lost;
                if !self.wants_media() {
                    // A live source's output from before the stream may flow is not sent
                    // later in a burst (it would arrive seconds old, all at once, more than
                    // a fresh QUIC connection's window takes): counted and dropped.
                    self.progress.input_before_start += bytes.len() as u64;
                    self.packetizer.restart_input();
                    return;
                }
                self.discontinuity |= discontinuity;
                if discontinuity {
                    self.packetizer.restart_input();
                }
                self.packetizer.handle_input(&bytes);
                self.packetizer.flush();
                self.send_media(now);
            }
        }
    }

    /// Repeats the publish: every second to every entry point, and every 250 ms to an
    /// entry point that has not accepted it lately; reports every second.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if now < self.next_publish {
            return;
        }
        self.next_publish = now + PUBLISH_RETRY;
        if now >= self.next_full_publish {
            self.next_full_publish = now + PUBLISH_EVERY;
            let _ = self.send_publish(|_| true);
            if self.accepted() || now >= self.accept_until {
                self.report(now);
            }
        } else {
            let last_ack = self.last_ack.clone();
            let _ = self
                .send_publish(|i| last_ack[i].is_none_or(|t| now.duration_since(t) > ACCEPT_STALE));
        }
    }

    /// The next thing to do; [`Output::Timeout`] when there is nothing.
    pub fn poll_output(&mut self) -> Output<Event> {
        match self.out.pop() {
            Some(o) => o,
            None => Output::Timeout(Some(self.next_publish)),
        }
    }

    /// Sends the publish, with each entry point's cookie for this address, to the entry
    /// points `to_entry` picks.
    fn send_publish(
        &mut self,
        to_entry: impl Fn(usize) -> bool,
    ) -> Result<(), braid_core::wire::EncodeError> {
        for (i, to) in self.config.entries.iter().enumerate() {
            if to_entry(i) {
                let msg = Message {
                    header: Header {
                        stream: self.config.stream,
                        path: PathId(0),
                        flags: Flags::empty(),
                    },
                    body: Body::Publish {
                        cookie: self.cookies[i],
                    },
                };
                let mut buf = bytes::BytesMut::new();
                self.out.codec().encode(&msg, &mut buf)?;
                self.out.send(Peer::Addr(*to), buf.freeze(), false);
            }
        }
        Ok(())
    }

    fn send_media(&mut self, now: Instant) {
        let stream = self.config.stream;
        while let Some(chunk) = self.packetizer.poll_output() {
            let ts = (now.duration_since(self.started).as_micros() as u64
                * u64::from(CLOCK_RATE_MP2T)
                / 1_000_000) as u32;
            let segment = chunk.keyframe.then(|| self.start_segment(now)).flatten();
            let rtp = Rtp::build_with_segment(
                Fields {
                    marker: chunk.keyframe,
                    payload_type: PAYLOAD_TYPE_MP2T,
                    seq: self.seq.low(),
                    timestamp: ts,
                    ssrc: self.ssrc,
                },
                segment,
                &chunk.payload,
            );
            let flags = Flags::empty()
                .with(Flags::KEYFRAME, chunk.keyframe)
                .with(Flags::DISCONTINUITY, self.discontinuity);
            self.discontinuity = false;
            let header = Header {
                stream,
                path: PathId(0),
                flags,
            };
            let mut buf = bytes::BytesMut::with_capacity(chunk.payload.len() + 64);
            if self
                .out
                .codec()
                .encode_media(header, self.seq, &rtp, &mut buf)
                .is_err()
            {
                continue;
            }
            let datagram = buf.freeze();
            for to in &self.config.entries {
                self.out.send(Peer::Addr(*to), datagram.clone(), true);
            }
            self.progress.packets += 1;
            self.progress.bytes += chunk.payload.len() as u64;
            self.out.event(Event::Sent {
                seq: self.seq,
                payload: chunk.payload,
                keyframe: chunk.keyframe,
            });
            self.seq = self.seq.next();
        }
    }

    /// A keyframe goes out at `now`: the number of the HLS segment it starts, if it starts
    /// one.
    fn start_segment(&mut self, now: Instant) -> Option<u64> {
        let (next, last) = self.segment;
        if last.is_some_and(|t| now.duration_since(t) < self.config.segment * 9 / 10) {
            return None;
        }
        self.segment = (next + 1, Some(now));
        self.progress.segments += 1;
        Some(next)
    }

    fn report(&mut self, now: Instant) {
        self.progress.entries_reachable = self
            .last_ack
            .iter()
            .filter(|a| a.is_some_and(|t| now.duration_since(t) < REACHABLE))
            .count();
        let (t0, b0) = self.last_report;
        self.progress.bitrate_bps = ((self.progress.bytes - b0) as f64 * 8.0
            / now.duration_since(t0).as_secs_f64().max(1e-3))
            as u64;
        self.last_report = (now, self.progress.bytes);
        self.out.event(Event::Progress);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ts::{Synth, SynthConfig};
    use braid_core::NodeId;
    use braid_core::wire::{Keepalive, Key};

    fn codec() -> Codec {
        Codec::new(Key::derive("test network"))
    }

    fn entry() -> SocketAddr {
        "127.0.0.1:7000".parse().unwrap()
    }

    fn capture(now: Instant) -> Capture {
        let config = Config {
            stream: StreamId(1),
            key: "k".into(),
            entries: vec![entry()],
            ts_per_rtp: 7,
            segment: Duration::from_secs(1),
        };
        Capture::new(config, WallClock::new(now, 1_000_000), now).unwrap()
    }

    fn accept(c: &mut Capture, now: Instant) {
        let mut buf = bytes::BytesMut::new();
        let ack = Message {
            header: Header {
                stream: StreamId(1),
                path: PathId(0),
                flags: Flags::empty(),
            },
            body: Body::Keepalive(Keepalive {
                node: NodeId(2),
                sent_us: 1,
                echo_us: 0,
            }),
        };
        codec().encode(&ack, &mut buf).unwrap();
        c.handle_input(
            now,
            Input::Received {
                from: entry(),
                datagram: buf.freeze(),
            },
        );
    }

    /// Packets sent so far (publish messages aside).
    fn sent(c: &mut Capture) -> usize {
        let mut n = 0;
        loop {
            match c.poll_output() {
                Output::Event(Event::Sent { .. }) => n += 1,
                Output::Timeout(_) => return n,
                _ => {}
            }
        }
    }

    #[test]
    fn a_live_source_before_the_stream_may_flow_is_counted_and_not_sent_later() {
        let t0 = Instant::now();
        let mut c = capture(t0);
        let mut synth = Synth::new(SynthConfig {
            bitrate: 4_000_000,
            fps: 25,
            gop: 25,
            run: 0,
            align: false,
        });
        let frame = |s: &mut Synth| Input::Source {
            bytes: s.next_frame(),
            discontinuity: false,
            rtp_lost: 0,
        };
        // Half a second of frames while no entry point has accepted the stream.
        let mut before = 0;
        for i in 0..12 {
            let f = frame(&mut synth);
            if let Input::Source { bytes, .. } = &f {
                before += bytes.len() as u64;
            }
            c.handle_input(t0 + Duration::from_millis(40 * i), f);
        }
        assert_eq!(
            sent(&mut c),
            0,
            "nothing goes before an entry point accepted"
        );
        assert_eq!(c.progress().input_before_start, before);
        let t1 = t0 + Duration::from_millis(500);
        accept(&mut c, t1);
        assert!(c.wants_media());
        c.handle_input(t1, frame(&mut synth));
        let one_frame = sent(&mut c);
        assert!(
            (1..=20).contains(&one_frame),
            "one frame's packets go, not the half second before it: {one_frame}"
        );
        assert_eq!(c.progress().input_before_start, before);
    }
}
