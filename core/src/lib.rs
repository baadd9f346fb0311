//! braid-core: everything a Braid node decides, with no sockets, no tasks and no clock.
//!
//! Every state machine here takes time as an argument and has the same shape: feed it with
//! `handle_input(now, ..)` or `handle_timeout(now)`, then call `poll_output()` until it
//! returns a timeout. The daemons own the sockets and the clock; this crate is what they
//! agree on, and what the tests drive in virtual time.
//!
//! # Layout
//!
//! - [`wire`]: the Braid wire protocol (envelope, media and control messages,
//!   authentication tag) and the adapter around the RTP crate.
//! - [`seq`]: [`SeqNo`], RTP's sequence number extended to 64 bits.
//! - [`merge`]: the multi-path merge buffer with its loss register (NACK).
//! - [`ring`]: the edge's ring of recent packets and the per-viewer cursors into it.
//! - [`speed`]: a viewer's delivery speed as its edge measures it, and whether it is slow.
//! - [`detect`]: windowed reception measures and the switch detector.
//! - [`token`]: signed viewer tokens.
//! - [`cookie`]: address-validation cookies.
//! - [`nodeauth`]: node requests to control servers, signed with the network key.
//! - [`impair`]: the seeded impairment model the daemons and the simulator put on links.
//! - [`node`]: what every role's state machine says to its daemon: transmits, events,
//!   timeouts, and the counters of what it dropped.
//! - [`id`]: identifiers and units.

pub mod cookie;
pub mod detect;
pub mod error;
pub mod hls;
pub mod id;
pub mod impair;
pub mod merge;
pub mod node;
pub mod nodeauth;
pub mod playout;
pub mod queueing;
pub mod ring;
pub mod seq;
pub mod speed;
pub mod token;
pub mod wire;

pub use error::Error;
pub use id::{Bitrate, ClientId, DataSize, NodeId, PathId, StreamId};
pub use seq::SeqNo;
