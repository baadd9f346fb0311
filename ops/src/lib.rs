//! braid-ops: runs whole Braid networks on one machine.
//!
//! # Layout
//!
//! - [`harness`]: the daemons as child processes (killed when dropped), a test network
//!   builder, and a Prometheus scraper; used by `tests/`, the benchmarks and the testbed.
//! - [`hosts`]: hosts for multi-host tests, each a network namespace joined through a
//!   bridge, whose links a test can cut.
//! - [`bench`]: what the benchmark drivers share (a paced source with its loopback
//!   baseline, the latency measurement through a whole network).
//! - `src/bin/`: the benchmark drivers (`braid-bench-*`), the impairment proxy
//!   (`braid-impair-proxy`) and the testbed (`braid-testbed`).

pub mod bench;
pub mod harness;
pub mod hosts;
