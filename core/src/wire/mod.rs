//! The Braid wire protocol, version 2 (`docs/PROTOCOL.md` is the reference).
//!
//! Every datagram is one message: an 8-byte header, a body that depends on the message
//! kind, and a 16-byte authentication tag (keyed BLAKE3 over header and body, truncated).
//! On stream transports each message is framed by a 16-bit length.
//!
//! Three kinds of party sign messages, each with its own credential, named by the
//! message's [`Class`]: nodes with the network key, a source with its stream's publish
//! key, a viewer with a public key (a viewer holds no secret but its token, so its
//! messages carry a checksum, not a proof). [`Codec::decode`] takes only what a node
//! signed; [`Codec::decode_any`] says who signed, for the two receivers that take
//! messages from others (an entry point from sources, an edge from viewers).
//!
//! Decoding never panics and never trusts a length field: every read is checked against
//! what is left, every count is bounded by a protocol constant, and the tag is checked
//! before the body is looked at. [`DecodeError::UnexpectedEnd`] tells input that ended
//! early from input that is malformed.

pub mod rtp;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use subtle::ConstantTimeEq;

use crate::id::{NodeId, PathId, StreamId};
use crate::seq::SeqNo;

pub use self::rtp::Rtp;

/// The protocol version this code speaks.
pub const VERSION: u8 = 2;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 8;
/// Length of the authentication tag that ends every message.
pub const TAG_LEN: usize = 16;
/// Largest message accepted or produced (a jumbo frame's payload).
pub const MAX_MESSAGE: usize = 9000;
/// Most ranges in one NACK.
pub const MAX_NACK_RANGES: usize = 64;
/// Longest stream key a configuration takes (the key itself never travels).
pub const MAX_STREAM_KEY: usize = 64;
/// Longest text in an error message.
pub const MAX_ERROR_TEXT: usize = 255;
/// Longest viewer token in a watch message.
pub const MAX_TOKEN: usize = 64;
/// Bytes the envelope adds around an RTP packet in a media message.
pub const MEDIA_OVERHEAD: usize = HEADER_LEN + 4 + TAG_LEN;
/// Length of an address-validation cookie.
pub const COOKIE_LEN: usize = 16;

/// An address-validation cookie: what a receiver gave a sender's address, echoed back in
/// every message that grants something (`crate::cookie`). All zeros: none yet.
pub type Cookie = [u8; COOKIE_LEN];

/// Who signed a message, bits 3 and 4 of the flags byte; each class has its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Class {
    /// A node of the network (capture excepted): tagged with the network key.
    Node = 0,
    /// A source (a capture): tagged with the publish key of the message's stream.
    Source = 1,
    /// A viewer: tagged with the public viewer key, so the tag is a checksum only.
    Viewer = 2,
}

const CLASS_SHIFT: u8 = 3;
const CLASS_MASK: u8 = 0x18;

/// Why a message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the message did (on a stream: wait for more bytes).
    #[error("input ended early")]
    UnexpectedEnd,
    /// The message speaks another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The message kind is not one this version knows.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The authentication tag does not match: wrong network key, or forged or damaged.
    #[error("bad authentication tag")]
    BadTag,
    /// The message is larger than [`MAX_MESSAGE`].
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// The message is long enough but its content breaks the protocol.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// Signed by a source or a viewer where only a node's message is taken.
    #[error("signed by a {0:?}, not a node")]
    NotANode(Class),
}

impl DecodeError {
    /// A short, stable name for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::UnexpectedEnd => "truncated",
            DecodeError::Version(_) => "version",
            DecodeError::UnknownKind(_) => "unknown_kind",
            DecodeError::BadTag => "bad_tag",
            DecodeError::TooLarge(_) => "too_large",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::NotANode(_) => "not_a_node",
        }
    }
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded message would exceed [`MAX_MESSAGE`].
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// A field is outside what the protocol allows.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// The network key that authenticates every message between Braid nodes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl Key {
    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// A key derived from a passphrase shared by every node of the network.
    pub fn derive(passphrase: &str) -> Key {
        Key(blake3::derive_key(
            "braid 2026-11 network key v1",
            passphrase.as_bytes(),
        ))
    }

    /// The publish key of a stream, derived from its stream key (what its source and its
    /// entry points are given). It signs what a source sends; the stream key itself never
    /// travels.
    pub fn publish(stream_key: &str) -> Key {
        Key(blake3::derive_key(
            "braid 2026-11 publish key v2",
            stream_key.as_bytes(),
        ))
    }

    /// The viewer key: public, the same everywhere. Viewers tag their messages with it;
    /// it proves nothing about the sender, which is what the viewer token is for.
    pub fn viewer() -> Key {
        Key(blake3::derive_key(
            "braid 2026-11 viewer messages v2",
            b"public",
        ))
    }

    /// The raw key, for deriving keys of other uses from it.
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn tag(&self, bytes: &[u8]) -> [u8; TAG_LEN] {
        let full = blake3::keyed_hash(&self.0, bytes);
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&full.as_bytes()[..TAG_LEN]);
        tag
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Message kinds, as numbered on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// An RTP packet of a stream.
    Media = 1,
    /// A publisher announces a stream, with its key.
    Publish = 2,
    /// A node asks for a stream (soft state, held for the lease).
    Subscribe = 3,
    /// A node renews its subscription.
    Refresh = 4,
    /// A node drops its subscription.
    Unsubscribe = 5,
    /// A receiver asks for missing sequence numbers.
    Nack = 6,
    /// Liveness and round-trip measurement between two nodes.
    Keepalive = 7,
    /// The receiver should move to another source.
    Switch = 8,
    /// A request was refused.
    Error = 9,
    /// A viewer asks an edge for a stream, renews, and acknowledges what it received.
    Watch = 10,
    /// An edge tells a viewer something about its stream (joined, skipped).
    Notice = 11,
    /// A receiver gives a sender's address its address-validation cookie.
    Cookie = 12,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Media,
            2 => Kind::Publish,
            3 => Kind::Subscribe,
            4 => Kind::Refresh,
            5 => Kind::Unsubscribe,
            6 => Kind::Nack,
            7 => Kind::Keepalive,
            8 => Kind::Switch,
            9 => Kind::Error,
            10 => Kind::Watch,
            11 => Kind::Notice,
            12 => Kind::Cookie,
            _ => return None,
        })
    }
}

/// Header flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Flags(u8);

impl Flags {
    /// The packet starts a random-access point (a keyframe).
    pub const KEYFRAME: Flags = Flags(0x01);
    /// The stream restarted: sequence numbers and timestamps do not continue.
    pub const DISCONTINUITY: Flags = Flags(0x02);
    /// The packet is a retransmission answering a NACK.
    pub const RETRANSMIT: Flags = Flags(0x04);
    const KNOWN: u8 = 0x07;

    /// No flags.
    pub const fn empty() -> Flags {
        Flags(0)
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with the flags of `other` set or cleared.
    #[must_use]
    pub fn with(self, other: Flags, on: bool) -> Flags {
        if on {
            Flags(self.0 | other.0)
        } else {
            Flags(self.0 & !other.0)
        }
    }

    /// The bits as sent.
    pub fn bits(self) -> u8 {
        self.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// The fields every message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// The stream the message is about (0 for messages about no stream).
    pub stream: StreamId,
    /// The path the sender put the message on.
    pub path: PathId,
    /// Flags.
    pub flags: Flags,
}

/// A media packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// The packet's 64-bit sequence number; its low 16 bits are the RTP sequence number.
    pub seq: SeqNo,
    /// The RTP packet, carried unchanged.
    pub rtp: Rtp,
}

/// A soft-state subscription (subscribe and refresh carry the same fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// The subscribing node.
    pub node: NodeId,
    /// How long the subscription holds without a refresh, in milliseconds.
    pub lease_ms: u32,
    /// The set reflector's cookie for the subscriber's address.
    pub cookie: Cookie,
}

/// A range of missing sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    /// The first missing sequence number.
    pub first: SeqNo,
    /// How many follow it, itself included (at least 1).
    pub count: u16,
}

impl SeqRange {
    /// The sequence number after the range.
    pub fn end(&self) -> SeqNo {
        self.first.plus(u64::from(self.count))
    }

    /// Whether `seq` is in the range.
    pub fn contains(&self, seq: SeqNo) -> bool {
        seq >= self.first && seq < self.end()
    }
}

/// Liveness and round-trip measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// The sending node.
    pub node: NodeId,
    /// The sender's clock when it sent this, in microseconds since an epoch of its own.
    pub sent_us: u64,
    /// The `sent_us` of the last keepalive received from the peer, echoed (0 if none).
    pub echo_us: u64,
}

/// Why a receiver is told to switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SwitchReason {
    /// The node is being drained by an operator.
    Drain = 1,
    /// The node is overloaded.
    Overload = 2,
    /// The node is shutting down.
    Shutdown = 3,
}

/// Where a viewer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum WatchStart {
    /// At the latest keyframe (a new viewer).
    Keyframe = 0,
    /// At a sequence number (a viewer resuming after a switch).
    Seq = 1,
    /// At the next packet.
    Live = 2,
}

/// `received` in a watch that carries a policy but no count.
const NOT_COUNTED: u64 = u64::MAX;
/// `policy` in a watch that carries a fitting rate but no policy.
const NO_POLICY: u32 = u32::MAX;

/// A viewer's request to an edge, repeated as its refresh and acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// The viewer's id.
    pub node: NodeId,
    /// How long the edge keeps serving without another watch message, ms.
    pub lease_ms: u32,
    /// Where to start (used when the edge does not know the viewer yet).
    pub start: WatchStart,
    /// The sequence number to start at, for [`WatchStart::Seq`].
    pub seq: SeqNo,
    /// The highest sequence number received so far (0: none yet).
    pub acked: SeqNo,
    /// The edge's cookie for the viewer's address.
    pub cookie: Cookie,
    /// The viewer's token (at most [`MAX_TOKEN`] bytes; may be empty).
    pub token: Bytes,
    /// Media bytes received from this edge so far (RTP packets, repairs included), when
    /// the viewer counts them: the edge measures the viewer's delivery speed from it.
    pub received: Option<u64>,
    /// What the viewer asks of a ladder's renditions (a ceiling, or a pin), if anything.
    pub policy: Option<crate::speed::Policy>,
    /// The nominal rate, kbit/s, of the rendition an edge last moved the viewer down to
    /// for its link's speed (recently, and no edge moved it up since): an edge that does
    /// not know the viewer starts or resumes it on no higher a rendition.
    pub fits_kbps: Option<u32>,
    /// The last *rendition* notice the viewer took (its value's lower 32 bits: reason,
    /// index, rate; never 0): its edge repeats a newer one until the viewer has it.
    pub rendition: Option<u32>,
}

/// What an edge tells a viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NoticeKind {
    /// The viewer is served; the value is the first sequence number it gets.
    Joined = 1,
    /// The viewer fell behind the ring and was moved to the latest keyframe; the value is
    /// how many packets it will never get.
    Skipped = 2,
    /// A resumed viewer asked for packets the edge no longer has; the value is how many.
    Missed = 3,
    /// The source started a new session (a capture started again); the value is its
    /// first sequence number as the edge knows it. Everything held of the old session is
    /// done with; a viewer that lost the new session's first packets asks for them.
    Session = 4,
    /// The edge gave up packets every path lost; the value is the first sequence number
    /// in its upper 48 bits (numbers stay below 2^48) and how many in its lower 16. A
    /// viewer stops waiting for those it lacks.
    Gap = 5,
    /// The source's previous session ended; the value is its last sequence number as
    /// the edge knows it. Sent just before a *session* notice: a viewer that lacks
    /// packets up to it (the old session's tail, which nothing after it would reveal as
    /// lost) asks for them before moving on.
    Ended = 6,
    /// The viewer moves to another rendition of its ladder at the next packet: a new
    /// source session for it (an *ended* and a *session* notice follow). The value is
    /// [`RenditionNotice`] packed: the rendition's SSRC in the upper 32 bits, then the
    /// reason (4 bits), its index in the ladder (4 bits) and its nominal rate in kbit/s
    /// (24 bits).
    Rendition = 7,
}

/// What a *rendition* notice says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenditionNotice {
    /// The SSRC of the rendition's source session (a viewer may have left it before).
    pub ssrc: u32,
    /// Why ([`crate::speed::Reason`] as a number).
    pub reason: u8,
    /// Its index in the ladder, lowest rate first.
    pub index: u8,
    /// Its nominal rate, kbit/s (at most 2^24 - 1).
    pub kbps: u32,
}

impl RenditionNotice {
    /// The notice's value.
    pub fn pack(self) -> u64 {
        u64::from(self.ssrc) << 32
            | u64::from(self.reason & 0xf) << 28
            | u64::from(self.index & 0xf) << 24
            | u64::from(self.kbps.min(0xff_ffff))
    }

    /// From a notice's value (any value reads as some notice).
    pub fn unpack(v: u64) -> RenditionNotice {
        RenditionNotice {
            ssrc: (v >> 32) as u32,
            reason: ((v >> 28) & 0xf) as u8,
            index: ((v >> 24) & 0xf) as u8,
            kbps: (v & 0xff_ffff) as u32,
        }
    }
}

/// Error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The stream key or token was not accepted.
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(1);
    /// The stream is not known here.
    pub const UNKNOWN_STREAM: ErrorCode = ErrorCode(2);
    /// A cap on streams, subscribers or viewers was reached.
    pub const CAPACITY: ErrorCode = ErrorCode(3);
    /// The request was malformed.
    pub const BAD_REQUEST: ErrorCode = ErrorCode(4);
    /// The node is draining and takes nothing new.
    pub const DRAINING: ErrorCode = ErrorCode(5);
    /// Media from a sender this node does not know as a publisher (it restarted, or the
    /// publish was lost): publish again.
    pub const NOT_PUBLISHED: ErrorCode = ErrorCode(6);
}

/// A message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// An RTP packet of the stream.
    Media(Media),
    /// A source announces the stream; signed with the stream's publish key
    /// ([`Class::Source`]), which proves it may.
    Publish {
        /// The entry point's cookie for the source's address.
        cookie: Cookie,
    },
    /// A node subscribes to the stream.
    Subscribe(Subscription),
    /// A node renews its subscription.
    Refresh(Subscription),
    /// A node leaves the stream.
    Unsubscribe {
        /// The node that leaves.
        node: NodeId,
    },
    /// Ranges of sequence numbers the sender is missing (1 to [`MAX_NACK_RANGES`]).
    Nack(Vec<SeqRange>),
    /// Liveness and round trip.
    Keepalive(Keepalive),
    /// Move to another source.
    Switch {
        /// Why.
        reason: SwitchReason,
    },
    /// A refusal.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// A human-readable explanation (at most [`MAX_ERROR_TEXT`] bytes of UTF-8).
        text: String,
    },
    /// A viewer watches the stream.
    Watch(Watch),
    /// An edge informs a viewer.
    Notice {
        /// What happened.
        kind: NoticeKind,
        /// A count or a sequence number, depending on the kind.
        value: u64,
    },
    /// The receiver's cookie for the sender's address: echo it to be served.
    Cookie {
        /// The cookie.
        cookie: Cookie,
    },
}

impl Body {
    /// The kind of this body on the wire.
    pub fn kind(&self) -> Kind {
        match self {
            Body::Media(_) => Kind::Media,
            Body::Publish { .. } => Kind::Publish,
            Body::Subscribe(_) => Kind::Subscribe,
            Body::Refresh(_) => Kind::Refresh,
            Body::Unsubscribe { .. } => Kind::Unsubscribe,
            Body::Nack(_) => Kind::Nack,
            Body::Keepalive(_) => Kind::Keepalive,
            Body::Switch { .. } => Kind::Switch,
            Body::Error { .. } => Kind::Error,
            Body::Watch(_) => Kind::Watch,
            Body::Notice { .. } => Kind::Notice,
            Body::Cookie { .. } => Kind::Cookie,
        }
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Stream, path and flags.
    pub header: Header,
    /// What the message says.
    pub body: Body,
}

/// Encodes messages as one party and decodes what others signed.
///
/// A node's codec ([`Codec::new`]) signs with the network key and checks node messages
/// with it, viewer messages with the viewer key, and source messages with the publish
/// keys it was given ([`Codec::with_sources`]). A source's codec ([`Codec::source`]) and
/// a viewer's ([`Codec::viewer`]) hold no network key: they read node messages without
/// checking their tag (`docs/SECURITY.md` argues why) and trust them by where they came
/// from.
#[derive(Debug, Clone)]
pub struct Codec {
    class: Class,
    key: Key,
    network: Option<Key>,
    viewer: Key,
    sources: std::sync::Arc<std::collections::HashMap<StreamId, Key>>,
}

impl Codec {
    /// A node's codec, for the network whose key is `key`.
    pub fn new(key: Key) -> Codec {
        Codec {
            class: Class::Node,
            key: key.clone(),
            network: Some(key),
            viewer: Key::viewer(),
            sources: Default::default(),
        }
    }

    /// A source's codec: signs with the publish key of its stream key.
    pub fn source(stream_key: &str) -> Codec {
        Codec {
            class: Class::Source,
            key: Key::publish(stream_key),
            network: None,
            viewer: Key::viewer(),
            sources: Default::default(),
        }
    }

    /// A viewer's codec: signs with the public viewer key.
    pub fn viewer() -> Codec {
        Codec {
            class: Class::Viewer,
            key: Key::viewer(),
            network: None,
            viewer: Key::viewer(),
            sources: Default::default(),
        }
    }

    /// This codec, also checking source messages of each stream with its publish key.
    #[must_use]
    pub fn with_sources(mut self, keys: impl IntoIterator<Item = (StreamId, Key)>) -> Codec {
        self.sources = std::sync::Arc::new(keys.into_iter().collect());
        self
    }

    /// Who this codec signs as.
    pub fn class(&self) -> Class {
        self.class
    }

    fn header_byte(&self, flags: Flags) -> u8 {
        flags.0 | (self.class as u8) << CLASS_SHIFT
    }

    /// Appends `msg`, tag included, to `out`.
    pub fn encode(&self, msg: &Message, out: &mut BytesMut) -> Result<(), EncodeError> {
        let start = out.len();
        out.put_u8(VERSION);
        out.put_u8(msg.body.kind() as u8);
        out.put_u8(self.header_byte(msg.header.flags));
        out.put_u8(msg.header.path.0);
        out.put_u32(msg.header.stream.0);
        let res = encode_body(&msg.body, out);
        if let Err(e) = res {
            out.truncate(start);
            return Err(e);
        }
        let len = out.len() - start + TAG_LEN;
        if len > MAX_MESSAGE {
            out.truncate(start);
            return Err(EncodeError::TooLarge(len));
        }
        let tag = self.key.tag(&out[start..]);
        out.put_slice(&tag);
        Ok(())
    }

    /// Appends a media message for an RTP packet already in wire form: the hot path of
    /// every forwarding node. `seq` must agree with the RTP sequence number.
    pub fn encode_media(
        &self,
        header: Header,
        seq: SeqNo,
        rtp: &Rtp,
        out: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        if seq.low() != rtp.seq() {
            return Err(EncodeError::Invalid(
                "seq disagrees with the rtp sequence number",
            ));
        }
        let len = MEDIA_OVERHEAD + rtp.len();
        if len > MAX_MESSAGE {
            return Err(EncodeError::TooLarge(len));
        }
        let start = out.len();
        out.reserve(len);
        out.put_u8(VERSION);
        out.put_u8(Kind::Media as u8);
        out.put_u8(self.header_byte(header.flags));
        out.put_u8(header.path.0);
        out.put_u32(header.stream.0);
        out.put_u32(rollovers_u32(seq)?);
        out.put_slice(rtp.raw());
        let tag = self.key.tag(&out[start..]);
        out.put_slice(&tag);
        Ok(())
    }

    /// The same message as `datagram` (already decoded and checked), signed by this
    /// codec's party: how an entry point passes a source's media into the network. The
    /// datagram is copied once.
    pub fn resign(&self, datagram: &[u8]) -> Result<Bytes, EncodeError> {
        if datagram.len() < HEADER_LEN + TAG_LEN || datagram.len() > MAX_MESSAGE {
            return Err(EncodeError::Invalid("not a message"));
        }
        let split = datagram.len() - TAG_LEN;
        let mut out = BytesMut::with_capacity(datagram.len());
        out.put_slice(&datagram[..split]);
        out[2] = self.header_byte(Flags(out[2] & Flags::KNOWN));
        let tag = self.key.tag(&out);
        out.put_slice(&tag);
        Ok(out.freeze())
    }

    /// Decodes one datagram signed by a node (what nearly every receiver wants): a
    /// source's or viewer's message is [`DecodeError::NotANode`]. The payload of a media
    /// message is a slice of `datagram`.
    pub fn decode(&self, datagram: Bytes) -> Result<Message, DecodeError> {
        match self.decode_any(datagram)? {
            (Class::Node, msg) => Ok(msg),
            (class, _) => Err(DecodeError::NotANode(class)),
        }
    }

    /// Decodes one datagram whoever signed it, and says who: a node (checked with the
    /// network key; unchecked by a codec without one), a source (checked with its
    /// stream's publish key: [`DecodeError::BadTag`] for a stream with none) or a viewer.
    pub fn decode_any(&self, datagram: Bytes) -> Result<(Class, Message), DecodeError> {
        if datagram.len() > MAX_MESSAGE {
            return Err(DecodeError::TooLarge(datagram.len()));
        }
        if datagram.len() < HEADER_LEN + TAG_LEN {
            return Err(DecodeError::UnexpectedEnd);
        }
        if datagram[0] != VERSION {
            return Err(DecodeError::Version(datagram[0]));
        }
        let class = match (datagram[2] & CLASS_MASK) >> CLASS_SHIFT {
            0 => Class::Node,
            1 => Class::Source,
            2 => Class::Viewer,
            _ => return Err(DecodeError::Malformed("reserved class")),
        };
        let stream = StreamId(u32::from_be_bytes([
            datagram[4],
            datagram[5],
            datagram[6],
            datagram[7],
        ]));
        let key = match class {
            Class::Node => self.network.as_ref(),
            Class::Viewer => Some(&self.viewer),
            Class::Source if self.class == Class::Source => Some(&self.key),
            Class::Source => Some(self.sources.get(&stream).ok_or(DecodeError::BadTag)?),
        };
        let split = datagram.len() - TAG_LEN;
        if let Some(key) = key {
            let expected = key.tag(&datagram[..split]);
            if !bool::from(expected.ct_eq(&datagram[split..])) {
                return Err(DecodeError::BadTag);
            }
        }
        let mut buf = datagram.slice(1..split);
        let kind = buf.get_u8();
        let kind = Kind::from_u8(kind).ok_or(DecodeError::UnknownKind(kind))?;
        let flags = buf.get_u8() & !CLASS_MASK;
        if flags & !Flags::KNOWN != 0 {
            return Err(DecodeError::Malformed("reserved flag bits set"));
        }
        let header = Header {
            flags: Flags(flags),
            path: PathId(buf.get_u8()),
            stream: StreamId(buf.get_u32()),
        };
        let body = decode_body(kind, &mut buf)?;
        if buf.has_remaining() {
            return Err(DecodeError::Malformed("trailing bytes"));
        }
        Ok((class, Message { header, body }))
    }

    /// Appends `msg` framed for a stream transport (16-bit big-endian length first).
    pub fn encode_frame(&self, msg: &Message, out: &mut BytesMut) -> Result<(), EncodeError> {
        let start = out.len();
        out.put_u16(0);
        self.encode(msg, out).inspect_err(|_| out.truncate(start))?;
        let len = out.len() - start - 2;
        // Invariant: `encode` bounds a message by MAX_MESSAGE, which fits in 16 bits.
        out[start..start + 2].copy_from_slice(&(len as u16).to_be_bytes());
        Ok(())
    }

    /// Takes one framed message off the front of `buf`. `Ok(None)` means more bytes are
    /// needed; an error means the stream is broken and should be closed.
    pub fn decode_frame(&self, buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        match split_frame(buf)? {
            Some(frame) => self.decode(frame).map(Some),
            None => Ok(None),
        }
    }
}

/// Takes one frame (16-bit big-endian length, then that many bytes) off the front of
/// `buf`, undecoded: how stream transports (TCP viewers, QUIC control streams) carry
/// messages. `Ok(None)` means more bytes are needed; an error (a length of zero or above
/// [`MAX_MESSAGE`]) means the stream is broken and should be closed.
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    if len > MAX_MESSAGE {
        return Err(DecodeError::TooLarge(len));
    }
    if len == 0 {
        return Err(DecodeError::Malformed("empty frame"));
    }
    if buf.len() < 2 + len {
        return Ok(None);
    }
    buf.advance(2);
    Ok(Some(buf.split_to(len).freeze()))
}

fn rollovers_u32(seq: SeqNo) -> Result<u32, EncodeError> {
    u32::try_from(seq.rollovers()).map_err(|_| EncodeError::Invalid("seq beyond 48 bits"))
}

fn encode_body(body: &Body, out: &mut BytesMut) -> Result<(), EncodeError> {
    match body {
        Body::Media(m) => {
            if m.seq.low() != m.rtp.seq() {
                return Err(EncodeError::Invalid(
                    "seq disagrees with the rtp sequence number",
                ));
            }
            out.put_u32(rollovers_u32(m.seq)?);
            out.put_slice(m.rtp.raw());
        }
        Body::Publish { cookie } | Body::Cookie { cookie } => out.put_slice(cookie),
        Body::Subscribe(s) | Body::Refresh(s) => {
            out.put_u64(s.node.0);
            out.put_u32(s.lease_ms);
            out.put_slice(&s.cookie);
        }
        Body::Unsubscribe { node } => out.put_u64(node.0),
        Body::Nack(ranges) => {
            if ranges.is_empty() || ranges.len() > MAX_NACK_RANGES {
                return Err(EncodeError::Invalid("nack needs 1 to 64 ranges"));
            }
            out.put_u8(ranges.len() as u8);
            for r in ranges {
                if r.count == 0 {
                    return Err(EncodeError::Invalid("empty nack range"));
                }
                out.put_u64(r.first.0);
                out.put_u16(r.count);
            }
        }
        Body::Keepalive(k) => {
            out.put_u64(k.node.0);
            out.put_u64(k.sent_us);
            out.put_u64(k.echo_us);
        }
        Body::Switch { reason } => out.put_u8(*reason as u8),
        Body::Error { code, text } => {
            if text.len() > MAX_ERROR_TEXT {
                return Err(EncodeError::Invalid("error text too long"));
            }
            out.put_u16(code.0);
            out.put_u8(text.len() as u8);
            out.put_slice(text.as_bytes());
        }
        Body::Watch(w) => {
            if w.token.len() > MAX_TOKEN {
                return Err(EncodeError::Invalid("token too long"));
            }
            out.put_u64(w.node.0);
            out.put_u32(w.lease_ms);
            out.put_u8(w.start as u8);
            out.put_u64(w.seq.0);
            out.put_u64(w.acked.0);
            out.put_slice(&w.cookie);
            out.put_u8(w.token.len() as u8);
            out.put_slice(&w.token);
            // Optional fields, last: each one present needs those before it (absent
            // ones as their "none").
            let present = [
                w.received.is_some(),
                w.policy.is_some(),
                w.fits_kbps.is_some(),
                w.rendition.is_some(),
            ];
            let n = present.iter().rposition(|p| *p).map_or(0, |i| i + 1);
            if n > 0 {
                out.put_u64(w.received.unwrap_or(NOT_COUNTED));
            }
            if n > 1 {
                out.put_u32(w.policy.map_or(NO_POLICY, |p| {
                    let kbps = p.ceiling.map_or(0, |c| (c / 1000).clamp(1, 0x7fff_fffe)) as u32;
                    kbps | if p.pinned { 1 << 31 } else { 0 }
                }));
            }
            if n > 2 {
                out.put_u32(w.fits_kbps.unwrap_or(0));
            }
            if n > 3 {
                out.put_u32(w.rendition.unwrap_or(0));
            }
        }
        Body::Notice { kind, value } => {
            out.put_u8(*kind as u8);
            out.put_u64(*value);
        }
    }
    Ok(())
}

fn need(buf: &impl Buf, n: usize) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        Err(DecodeError::UnexpectedEnd)
    } else {
        Ok(())
    }
}

fn get_u8(buf: &mut impl Buf) -> Result<u8, DecodeError> {
    need(buf, 1)?;
    Ok(buf.get_u8())
}

fn get_u16(buf: &mut impl Buf) -> Result<u16, DecodeError> {
    need(buf, 2)?;
    Ok(buf.get_u16())
}

fn get_u32(buf: &mut impl Buf) -> Result<u32, DecodeError> {
    need(buf, 4)?;
    Ok(buf.get_u32())
}

fn get_u64(buf: &mut impl Buf) -> Result<u64, DecodeError> {
    need(buf, 8)?;
    Ok(buf.get_u64())
}

fn get_bytes(buf: &mut impl Buf, n: usize) -> Result<Bytes, DecodeError> {
    need(buf, n)?;
    Ok(buf.copy_to_bytes(n))
}

fn get_cookie(buf: &mut impl Buf) -> Result<Cookie, DecodeError> {
    need(buf, COOKIE_LEN)?;
    let mut c = [0; COOKIE_LEN];
    buf.copy_to_slice(&mut c);
    Ok(c)
}

fn decode_body(kind: Kind, buf: &mut impl Buf) -> Result<Body, DecodeError> {
    Ok(match kind {
        Kind::Media => {
            let rollovers = get_u32(buf)?;
            let rtp = Rtp::parse(buf.copy_to_bytes(buf.remaining()))?;
            let seq = SeqNo::from_parts(u64::from(rollovers), rtp.seq());
            Body::Media(Media { seq, rtp })
        }
        Kind::Publish => Body::Publish {
            cookie: get_cookie(buf)?,
        },
        Kind::Cookie => Body::Cookie {
            cookie: get_cookie(buf)?,
        },
        Kind::Subscribe | Kind::Refresh => {
            let s = Subscription {
                node: NodeId(get_u64(buf)?),
                lease_ms: get_u32(buf)?,
                cookie: get_cookie(buf)?,
            };
            if kind == Kind::Subscribe {
                Body::Subscribe(s)
            } else {
                Body::Refresh(s)
            }
        }
        Kind::Unsubscribe => Body::Unsubscribe {
            node: NodeId(get_u64(buf)?),
        },
        Kind::Nack => {
            let n = usize::from(get_u8(buf)?);
            if n == 0 || n > MAX_NACK_RANGES {
                return Err(DecodeError::Malformed("nack range count"));
            }
            // Checked before allocating: the count is bounded and the bytes are present.
            need(buf, n * 10)?;
            let mut ranges = Vec::with_capacity(n);
            for _ in 0..n {
                let first = SeqNo(buf.get_u64());
                let count = buf.get_u16();
                if count == 0 {
                    return Err(DecodeError::Malformed("empty nack range"));
                }
                ranges.push(SeqRange { first, count });
            }
            Body::Nack(ranges)
        }
        Kind::Keepalive => Body::Keepalive(Keepalive {
            node: NodeId(get_u64(buf)?),
            sent_us: get_u64(buf)?,
            echo_us: get_u64(buf)?,
        }),
        Kind::Switch => Body::Switch {
            reason: match get_u8(buf)? {
                1 => SwitchReason::Drain,
                2 => SwitchReason::Overload,
                3 => SwitchReason::Shutdown,
                _ => return Err(DecodeError::Malformed("switch reason")),
            },
        },
        Kind::Error => {
            let code = ErrorCode(get_u16(buf)?);
            let len = usize::from(get_u8(buf)?);
            let text = get_bytes(buf, len)?;
            let text = String::from_utf8(text.to_vec())
                .map_err(|_| DecodeError::Malformed("error text is not utf-8"))?;
            Body::Error { code, text }
        }
        Kind::Watch => {
            let node = NodeId(get_u64(buf)?);
            let lease_ms = get_u32(buf)?;
            let start = match get_u8(buf)? {
                0 => WatchStart::Keyframe,
                1 => WatchStart::Seq,
                2 => WatchStart::Live,
                _ => return Err(DecodeError::Malformed("watch start")),
            };
            let seq = SeqNo(get_u64(buf)?);
            let acked = SeqNo(get_u64(buf)?);
            let cookie = get_cookie(buf)?;
            let len = usize::from(get_u8(buf)?);
            if len > MAX_TOKEN {
                return Err(DecodeError::Malformed("token too long"));
            }
            Body::Watch(Watch {
                node,
                lease_ms,
                start,
                seq,
                acked,
                cookie,
                token: get_bytes(buf, len)?,
                // Optional, last: absent from viewers that do not count.
                received: if buf.has_remaining() {
                    Some(get_u64(buf)?).filter(|r| *r != NOT_COUNTED)
                } else {
                    None
                },
                policy: if buf.has_remaining() {
                    let raw = get_u32(buf)?;
                    let kbps = u64::from(raw & 0x7fff_ffff);
                    (raw != NO_POLICY).then_some(crate::speed::Policy {
                        ceiling: (kbps > 0).then_some(kbps * 1000),
                        pinned: raw >> 31 == 1,
                    })
                } else {
                    None
                },
                fits_kbps: if buf.has_remaining() {
                    Some(get_u32(buf)?).filter(|k| *k != 0)
                } else {
                    None
                },
                rendition: if buf.has_remaining() {
                    Some(get_u32(buf)?).filter(|r| *r != 0)
                } else {
                    None
                },
            })
        }
        Kind::Notice => Body::Notice {
            kind: match get_u8(buf)? {
                1 => NoticeKind::Joined,
                2 => NoticeKind::Skipped,
                3 => NoticeKind::Missed,
                4 => NoticeKind::Session,
                5 => NoticeKind::Gap,
                6 => NoticeKind::Ended,
                7 => NoticeKind::Rendition,
                _ => return Err(DecodeError::Malformed("notice kind")),
            },
            value: get_u64(buf)?,
        },
    })
}

#[cfg(test)]
mod tests;
