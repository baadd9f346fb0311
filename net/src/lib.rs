//! braid-net: the tokio glue Braid's daemons share.
//!
//! # Layout
//!
//! - [`udp`]: a daemon's UDP socket: batched receive (`recvmmsg`) and send (`sendmmsg`),
//!   with the impairment layer on every outgoing link.
//! - [`impair`]: the seeded impairment model (loss, bursts, delay, jitter, reordering,
//!   duplication, rate cap, outages).
//! - [`sys`]: the `sendmmsg`/`recvmmsg` system calls (the one `unsafe` module).
//! - [`daemon`]: what every daemon does the same way: config file plus flags, logging,
//!   the metrics endpoint, the ready line, shutdown on SIGTERM or Ctrl-C.
//!
//! Planned: QUIC through quinn (the QUIC issue).

pub mod daemon;
pub mod impair;
pub mod sys;
pub mod udp;
