//! braid-net: the tokio glue Braid's daemons share.
//!
//! # Layout
//!
//! - [`udp`]: a daemon's UDP socket: batched receive (`recvmmsg`) and send (`sendmmsg`),
//!   with the impairment layer on every outgoing link.
//! - [`impair`]: the seeded impairment model (loss, bursts, delay, jitter, reordering,
//!   duplication, rate cap, outages), from braid-core, where the simulator shares it.
//! - [`sys`]: the `sendmmsg`/`recvmmsg` system calls (the one `unsafe` module).
//! - [`daemon`]: what every daemon does the same way: config file plus flags, logging,
//!   the metrics endpoint, the ready line, shutdown on SIGTERM or Ctrl-C.
//!
//! - [`quic`]: QUIC links through quinn: media as datagrams, control on streams, one
//!   connection per node pair, attached to a daemon's [`udp::Socket`] so that the
//!   daemons send to a peer address and the socket picks the transport.
//! - `impaired_socket`: the impairment layer under QUIC, on QUIC's own packets.
//! - [`tls`]: certificates, trust by CA or pinned fingerprint, development certificates.
//! - [`addr`]: peer addresses with their transport (`quic://…`, `udp://…`).
//! - [`report`]: a node's reports to the control servers, from a thread of its own.

pub mod addr;
pub use braid_core::impair;
pub mod daemon;
mod impaired_socket;
pub mod limit;
pub mod quic;
pub mod quic_core;
pub mod report;
pub mod sys;
pub mod tls;
pub mod udp;
pub mod workers;
