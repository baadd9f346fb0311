//! braid-net: the tokio glue Braid's daemons share.
//!
//! # Layout
//!
//! Planned (the data-path issue): batched UDP, QUIC through quinn, the seeded impairment
//! layer (loss, bursts, delay, jitter, reordering, duplication, rate caps, outages),
//! shutdown, shared config pieces and the metrics endpoint. Nothing is here yet.
