//! braid-sim: whole Braid networks in virtual time.
//!
//! Every role runs as the same sans-IO machine its daemon runs (capture, entry points,
//! set reflectors, edges, control servers, viewers), on virtual links with the
//! impairment model the daemons use, in virtual time, driven by one seed. A run checks
//! invariants against the ground truth only the simulator knows (what the capture sent),
//! so thousands of random fault schedules test the real decision code the way
//! FoundationDB's simulation and TigerBeetle's VOPR test theirs.
//!
//! # Layout
//!
//! - [`schedule`]: a run as data: topology, links, faults, viewers; drawn from a seed,
//!   printed as TOML, replayed from TOML.
//! - [`world`]: the engine: nodes, links, the event queue, faults, control calls.
//! - [`check`]: the invariants every run must hold, and a run's verdict.
//! - [`ledger`]: what the links did to each packet on its way to each node, to justify
//!   a gap.
//! - `braid-sim` (binary): `--seeds N` random schedules, `--seed S` replays one,
//!   `--schedule FILE` replays a saved one.

pub mod check;
pub mod ledger;
pub mod schedule;
pub mod world;

pub use check::{Outcome, Violation, run};
pub use schedule::{Classes, Schedule};
pub use world::World;
