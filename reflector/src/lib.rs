//! braid-reflector: one binary, two roles.
//!
//! - **set** (`--role set`): receives every copy the entry points send, merges them by
//!   sequence number (duplicates stop here), asks the entry points for what both lost,
//!   and forwards the merged stream to every edge subscribed to it.
//! - **edge** (`--role edge`): subscribes to set reflectors on a stream's first viewer,
//!   merges their copies, keeps the last seconds in a ring and serves every viewer from
//!   its own cursor.
//!
//! # Layout
//!
//! - [`Config`]: flags and TOML for both roles.
//! - [`set`]: the set reflector's machine, [`SetReflector`] (sans-IO).
//! - [`edge`]: the edge's machine, [`Edge`] (sans-IO), viewers included.
//! - `common`: what the two share: merged packets, the merge with its repairs, counters.
//! - [`run`] (`daemon`): the daemon's one task, which owns the socket, the TCP viewers'
//!   queues and the clock, and feeds the role's machine.
//! - `tcp`: TCP viewers' connection tasks; `report`: reporting to control servers.
//!
//! Every packet not forwarded is counted by reason in `braid_dropped_total`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use braid_core::merge;
use braid_core::ring;
use braid_core::{NodeId, StreamId};
use braid_net::addr::PeerAddr;
use braid_net::daemon::DaemonConfig;
use braid_net::udp::Impairments;
use clap::Parser;
use serde::{Deserialize, Serialize};

mod common;
mod daemon;
pub mod edge;
mod hls;
pub mod set;
mod tcp;

pub use common::{Counters, Settings, StreamReport};
pub use daemon::run;
pub use edge::Edge;
pub use set::SetReflector;

/// Which role the reflector plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Set reflector: merges the entry points' copies, forwards to subscribed edges.
    Set,
    /// Edge: subscribes to set reflectors, merges, keeps the ring, serves viewers.
    Edge,
}

impl Role {
    /// The role's name in metrics and the ready line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Set => "set",
            Role::Edge => "edge",
        }
    }
}

/// The reflector's configuration.
#[derive(Debug, Clone, Parser, Deserialize, Serialize)]
#[command(
    name = "braid-reflector",
    version,
    about = "Braid set reflector or edge"
)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TOML config file; flags given as well override it.
    #[arg(long)]
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    #[serde(default)]
    pub check: bool,
    /// Log JSON lines (one object per event, for log collectors) instead of text.
    #[arg(long)]
    #[serde(default)]
    pub log_json: bool,
    /// Role: set or edge.
    #[arg(long, value_enum, default_value = "edge")]
    #[serde(default = "default_role")]
    pub role: Role,
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:8000")]
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Prometheus metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:0")]
    #[serde(default = "default_metrics")]
    pub metrics: SocketAddr,
    /// The network key (a passphrase, or @file).
    #[arg(long, env = "BRAID_NETWORK_KEY", default_value = "")]
    #[serde(default)]
    pub network_key: String,
    /// This node's id.
    #[arg(long, default_value_t = 1)]
    #[serde(default)]
    pub node_id: u64,
    /// Streams carried (repeatable); none means any stream.
    #[arg(long = "stream")]
    #[serde(default)]
    pub streams: Vec<u32>,
    /// Set role: the entry points allowed to send (repeatable); none means any node with
    /// the network key.
    #[arg(long = "upstream")]
    #[serde(default)]
    pub upstreams: Vec<PeerAddr>,
    /// Edge role: the set reflectors to subscribe to (repeatable), `ADDR` or
    /// `udp://ADDR` for UDP, `quic://ADDR` for QUIC (their QUIC address).
    #[arg(long = "reflector")]
    #[serde(default)]
    pub reflectors: Vec<PeerAddr>,
    /// Edge role: how many distinct set reflectors to subscribe to (at least 2).
    #[arg(long, default_value_t = 3)]
    #[serde(default = "default_k")]
    pub subscribe_k: usize,
    /// How long a missing packet is waited for, in milliseconds (size it to the delay
    /// difference between paths plus a repair round trip).
    #[arg(long, default_value_t = 200)]
    #[serde(default = "default_window")]
    pub reorder_window_ms: u64,
    /// Every missing packet waits the whole reorder window. By default the window is a
    /// cap: a hole waits what the measured paths need (the slowest healthy path's lag
    /// behind the first copy, the NACK delay, and twelve asks at the quickest repair
    /// round trip), at most the window.
    #[arg(long)]
    #[serde(default)]
    pub fixed_window: bool,
    /// Ask upstream for packets every path lost.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    #[serde(default = "default_true")]
    pub repair: bool,
    /// How long packets are kept to answer NACKs (set role), in milliseconds. The default,
    /// 4 s, lets a restarted edge give its viewers back what they lacked at the restart
    /// after an outage of about 2 s (a viewer's point is up to its playout buffer behind
    /// the outage's start; the new edge asks within a few hundred ms of starting).
    #[arg(long, default_value_t = 4000)]
    #[serde(default = "default_retransmit_ms")]
    pub retransmit_ms: u64,
    /// Edge role: seconds of stream kept in the ring.
    #[arg(long, default_value_t = 4.0)]
    #[serde(default = "default_ring_seconds")]
    pub ring_seconds: f64,
    /// Edge role: how long to stay subscribed after the last viewer left, ms.
    #[arg(long, default_value_t = 5000)]
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Most subscribers (set role) or viewers (edge role) per stream.
    #[arg(long, default_value_t = 1000)]
    #[serde(default = "default_max_per_stream")]
    pub max_per_stream: usize,
    /// Most streams open at once: a set reflector opens one for an authenticated
    /// subscriber or upstream, an edge for a viewer it lets in; an idle one closes.
    #[arg(long, default_value_t = 256)]
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Threads that make the send system calls, each for a fixed share of the
    /// destinations (viewers, subscribers); 0, the default, is one per core; 1 sends from
    /// the packet task itself, as before workers.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub workers: usize,
    /// Threads for the daemon's other tasks (TCP viewers), beside the packet task's own
    /// thread; 0, the default, runs them all on the packet task's thread. QUIC
    /// connections are driven from the packet task itself, with no task of their own.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub task_threads: usize,
    /// Most viewers on this node (edge role).
    #[arg(long, default_value_t = 5000)]
    #[serde(default = "default_max_viewers")]
    pub max_viewers: usize,
    /// Edge role: most packets in flight to a UDP viewer beyond what it acknowledged
    /// (default 64: a default Linux socket receive buffer, 208 kB, holds about 90
    /// datagrams of 1356 bytes once the kernel's per-packet overhead is counted).
    #[arg(long, default_value_t = 64)]
    #[serde(default = "default_viewer_window")]
    pub viewer_window: u64,
    /// Edge role: serve HLS (low-latency, from the ring) on this HTTP address:
    /// `/hls/{stream}/playlist.m3u8`.
    #[arg(long)]
    #[serde(default)]
    pub hls_listen: Option<SocketAddr>,
    /// HLS partial segments, ms (default 500; at least 100).
    #[arg(long, default_value_t = 500)]
    #[serde(default = "default_hls_part_ms")]
    pub hls_part_ms: u64,
    /// HLS segments listed in a playlist (default 6; at least 2).
    #[arg(long, default_value_t = 6)]
    #[serde(default = "default_hls_window")]
    pub hls_window: usize,
    /// Edge role: a viewer whose link held it back for this long, ms, is slow: reported
    /// to the control servers, which place it on a low-cost edge (the lowest
    /// `cost_tier`) from its next request on (default 5000; at least 1000).
    #[arg(long, default_value_t = 5000)]
    #[serde(default = "default_slow_after_ms")]
    pub slow_after_ms: u64,
    /// Edge role: a ladder of renditions, `STREAM:KBPS,STREAM:KBPS,...` lowest rate first
    /// (repeatable): a viewer of any of its streams is served the rendition its measured
    /// speed fits, moved at aligned keyframes.
    #[arg(long = "ladder")]
    #[serde(default)]
    pub ladders: Vec<String>,
    /// Edge role: only a viewer held back under this rate, kbit/s, is slow (default 0:
    /// any viewer whose link cannot take what it is sent).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub slow_below_kbps: u64,
    /// Control servers to report to (repeatable), as `http://host:port`.
    #[arg(long = "control")]
    #[serde(default)]
    pub controls: Vec<String>,
    /// This node's region, for the control server's assignment.
    #[arg(long, default_value = "")]
    #[serde(default)]
    pub region: String,
    /// This node's cost tier (0 cheapest).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub cost_tier: u8,
    /// Edge role: viewers must present a token signed with this secret (empty: no check).
    #[arg(long, env = "BRAID_TOKEN_SECRET", default_value = "")]
    #[serde(default)]
    pub token_secret: String,
    /// New subscriptions accepted per second from one IP address (set role); more are
    /// refused and counted.
    #[arg(long, default_value_t = 50)]
    #[serde(default = "default_subscribe_rate")]
    pub subscribe_rate: u32,
    /// QUIC: where to listen, initial MTU, connection limits.
    #[command(flatten)]
    #[serde(default)]
    pub quic: braid_net::quic::Options,
    /// TLS for QUIC: this node's certificate, and whom to trust.
    #[command(flatten)]
    #[serde(default)]
    pub tls: braid_net::tls::Tls,
    /// Impairment of the outgoing links (TOML only).
    #[arg(skip)]
    #[serde(default)]
    pub impair: Impairments,
}

fn default_subscribe_rate() -> u32 {
    50
}

fn default_slow_after_ms() -> u64 {
    5000
}
fn default_hls_part_ms() -> u64 {
    500
}
fn default_hls_window() -> usize {
    6
}
fn default_role() -> Role {
    Role::Edge
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8000))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_k() -> usize {
    3
}
fn default_window() -> u64 {
    200
}
fn default_true() -> bool {
    true
}
fn default_retransmit_ms() -> u64 {
    4000
}
fn default_ring_seconds() -> f64 {
    4.0
}
fn default_linger_ms() -> u64 {
    5000
}
fn default_max_per_stream() -> usize {
    1000
}
fn default_max_streams() -> usize {
    256
}
fn default_max_viewers() -> usize {
    5000
}
fn default_viewer_window() -> u64 {
    64
}

impl DaemonConfig for Config {
    const NAME: &'static str = "braid-reflector";

    fn file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn check(&self) -> bool {
        self.check
    }

    fn log_json(&self) -> bool {
        self.log_json
    }

    fn task_threads(&self) -> usize {
        self.task_threads
    }

    fn validate(&self) -> anyhow::Result<()> {
        braid_net::daemon::network_key(&self.network_key).context("--network-key")?;
        self.merge_config().validate()?;
        self.ring_config()?.validate()?;
        if self.role == Role::Edge {
            if self.reflectors.is_empty() && self.controls.is_empty() {
                anyhow::bail!(
                    "an edge needs set reflectors: give --reflector ADDR (two or more), or --control URL to learn them"
                );
            }
            if self.subscribe_k < 2 && self.reflectors.len() >= 2 {
                anyhow::bail!("subscribe_k must be at least 2: one path is no redundancy");
            }
            if self.reflectors.iter().any(|r| r.is_quic()) && !self.tls.has_identity() {
                anyhow::bail!(
                    "set reflectors over QUIC (quic://…) take subscriptions only from a certificate they trust: give this edge tls.cert and tls.key (--tls-cert, --tls-key)"
                );
            }
            if !self.upstreams.is_empty() {
                anyhow::bail!(
                    "--upstream is for set reflectors: an edge takes media from its --reflector list"
                );
            }
        } else if !self.reflectors.is_empty() {
            anyhow::bail!(
                "--reflector is for edges: a set reflector takes media from entry points (--upstream)"
            );
        } else if self.hls_listen.is_some() {
            anyhow::bail!("--hls-listen is for edges: they hold the ring HLS is cut from");
        }
        if let Some(h) = self.edge_config()?.hls {
            h.validate()?;
        }
        if self.reflectors.len() > 64 || self.upstreams.len() > 64 {
            anyhow::bail!("at most 64 reflectors or upstreams");
        }
        if self.max_per_stream == 0
            || self.max_viewers == 0
            || self.viewer_window == 0
            || self.max_streams == 0
        {
            anyhow::bail!(
                "max_per_stream, max_streams, max_viewers and viewer_window must be above zero"
            );
        }
        if self.task_threads > braid_net::workers::MAX {
            anyhow::bail!(
                "task-threads must be at most {} (0: none beside the packet task's)",
                braid_net::workers::MAX
            );
        }
        if self.workers > braid_net::workers::MAX {
            anyhow::bail!(
                "workers must be at most {} (0: one per core)",
                braid_net::workers::MAX
            );
        }
        if self.slow_after_ms < 1000 {
            anyhow::bail!(
                "slow_after_ms must be at least 1000: a viewer's speed is judged over seconds"
            );
        }
        if self.subscribe_rate == 0 {
            anyhow::bail!("subscribe_rate must be above zero");
        }
        self.impair.validate().map_err(anyhow::Error::msg)?;
        self.quic.validate().map_err(anyhow::Error::msg)?;
        self.tls.validate().map_err(anyhow::Error::msg)?;
        if self.quic.listen.is_some() && !self.tls.has_identity() {
            anyhow::bail!(
                "quic.listen needs a certificate: give tls.cert and tls.key (`braid-ctl dev-certs` makes development ones)"
            );
        }
        Ok(())
    }
}

impl Config {
    /// Send workers to start: `workers`, or one per core.
    pub fn send_workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    fn merge_config(&self) -> merge::Config {
        let window = Duration::from_millis(self.reorder_window_ms);
        let default = merge::Config::default();
        merge::Config {
            reorder_window: window,
            nack: self.repair,
            nack_delay: default.nack_delay.min(window / 4),
            nack_retry: default.nack_retry.min(window / 4),
            adaptive_window: !self.fixed_window,
            ..default
        }
    }

    fn settings(&self) -> common::Settings {
        common::Settings {
            node: NodeId(self.node_id),
            streams: self.streams.iter().map(|s| StreamId(*s)).collect(),
            merge: self.merge_config(),
            max_per_stream: self.max_per_stream,
            max_streams: self.max_streams,
        }
    }

    /// What a set reflector's machine decides with.
    pub fn set_config(&self) -> anyhow::Result<set::Config> {
        Ok(set::Config {
            settings: self.settings(),
            upstreams: self.upstreams.iter().map(|u| u.addr).collect(),
            retransmit: Duration::from_millis(self.retransmit_ms),
            subscribe_rate: self.subscribe_rate,
        })
    }

    /// What an edge's machine decides with.
    pub fn edge_config(&self) -> anyhow::Result<edge::Config> {
        Ok(edge::Config {
            settings: self.settings(),
            reflectors: self.reflectors.iter().map(|r| r.addr).collect(),
            subscribe_k: self.subscribe_k,
            ring: self.ring_config()?,
            linger: Duration::from_millis(self.linger_ms),
            max_viewers: self.max_viewers,
            viewer_window: self.viewer_window,
            tokens: (!self.token_secret.is_empty())
                .then(|| braid_core::token::Signer::new(&self.token_secret)),
            hls: self.hls_listen.map(|_| braid_core::hls::Config {
                part_target: Duration::from_millis(self.hls_part_ms),
                window: self.hls_window,
                ..braid_core::hls::Config::default()
            }),
            ladders: self.ladders()?,
            adapt: braid_core::speed::AdaptConfig::default(),
            speed: braid_core::speed::Config {
                slow_after: Duration::from_millis(self.slow_after_ms),
                slow_below: (self.slow_below_kbps > 0)
                    .then(|| braid_core::Bitrate::kbps(self.slow_below_kbps)),
                ..braid_core::speed::Config::default()
            },
        })
    }

    /// The `--ladder` lists, parsed.
    pub(crate) fn ladders(&self) -> anyhow::Result<Vec<Vec<(StreamId, u64)>>> {
        self.ladders
            .iter()
            .map(|l| {
                l.split(',')
                    .map(|r| {
                        let (id, kbps) = r.trim().split_once(':').ok_or_else(|| {
                            anyhow::anyhow!("--ladder {l}: each rendition is STREAM:KBPS")
                        })?;
                        let id: u32 = id.parse().map_err(|_| {
                            anyhow::anyhow!("--ladder {l}: {id} is not a stream id")
                        })?;
                        let kbps: u64 = kbps
                            .parse()
                            .ok()
                            .filter(|k| (1..=10_000_000).contains(k))
                            .ok_or_else(|| {
                                anyhow::anyhow!(
                                    "--ladder {l}: {kbps} is not a rate in kbit/s (1 to 10,000,000)"
                                )
                            })?;
                        Ok((StreamId(id), kbps * 1000))
                    })
                    .collect()
            })
            .collect()
    }

    fn ring_config(&self) -> anyhow::Result<ring::Config> {
        if !(self.ring_seconds > 0.0 && self.ring_seconds <= 60.0) {
            anyhow::bail!("ring_seconds must be above 0 and at most 60");
        }
        Ok(ring::Config {
            max_age: Duration::from_secs_f64(self.ring_seconds),
            ..ring::Config::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_config_needs_reflectors() {
        let c = Config::try_parse_from([
            "braid-reflector",
            "--role",
            "edge",
            "--network-key",
            "a network key",
        ])
        .unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("set reflectors")
        );
        let c = Config::try_parse_from([
            "braid-reflector",
            "--role",
            "edge",
            "--network-key",
            "a network key",
            "--reflector",
            "127.0.0.1:1",
            "--reflector",
            "127.0.0.1:2",
        ])
        .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn toml_config_refuses_unknown_fields() {
        assert!(
            toml::from_str::<Config>("role = \"set\"\nnetwork_key = \"a network key\"").is_ok()
        );
        assert!(toml::from_str::<Config>("role = \"set\"\nwindow = 3").is_err());
        assert!(toml::from_str::<Config>("role = \"middle\"").is_err());
    }

    #[test]
    fn window_too_small_for_repair_is_refused() {
        let c = Config::try_parse_from([
            "braid-reflector",
            "--role",
            "set",
            "--network-key",
            "a network key",
            "--reorder-window-ms",
            "0",
        ])
        .unwrap();
        assert!(c.validate().is_err());
    }
}
