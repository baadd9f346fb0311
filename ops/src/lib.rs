//! braid-ops: runs whole Braid networks on one machine.
//!
//! # Layout
//!
//! - [`harness`]: the daemons as child processes (killed when dropped), a test network
//!   builder, and a Prometheus scraper; used by `tests/`, the benchmarks and the testbed.
//! - `src/bin/`: the benchmark drivers (`braid-bench-latency`, `braid-bench-fanout`,
//!   `braid-impair-proxy`).

pub mod harness;
