//! braid-entrypoint: takes a published stream from a capture and sends every packet to
//! each set reflector configured for the stream.
//!
//! # Layout
//!
//! - [`Config`]: flags and TOML.
//! - [`machine`]: every decision, sans-IO: [`EntryPoint`].
//! - [`run`]: the daemon's one task: owns the socket, feeds the machine, sends what it
//!   says.
//!
//! A publisher proves it may publish a stream with the stream's key in a publish message
//! (repeated every second); media for a stream is accepted only from a source address
//! that published it within the last [`PUBLISHER_TIMEOUT`]. Every accepted packet is sent,
//! unchanged, to every set reflector of the stream in one `sendmmsg` batch, and kept for
//! `retransmit_ms` to answer NACKs. Every packet not forwarded is counted by reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::node::{Output, Peer};
use braid_core::wire::Codec;
use braid_core::{Bitrate, DataSize, NodeId, StreamId};
use braid_net::addr::PeerAddr;
use braid_net::daemon::DaemonConfig;
use braid_net::report;
use braid_net::udp::{Impairments, Socket};
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub mod machine;

pub use machine::{EntryPoint, Input, PUBLISHER_TIMEOUT, StreamSummary};

/// The entry point's configuration.
#[derive(Debug, Clone, Parser, Deserialize, Serialize)]
#[command(name = "braid-entrypoint", version, about = "Braid entry point")]
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
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7000")]
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
    /// A stream, as `ID:KEY:REFLECTOR[,REFLECTOR...]` (repeatable; or `[[streams]]` in TOML).
    #[arg(long = "stream", value_parser = parse_stream)]
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
    /// How long packets are kept to answer NACKs, in milliseconds (default 2000: several
    /// round trips to the farthest set reflector).
    #[arg(long, default_value_t = 2000)]
    #[serde(default = "default_retransmit_ms")]
    pub retransmit_ms: u64,
    /// QUIC: where to listen (publishers may connect over QUIC), initial MTU, limits.
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
    /// Control servers to report to (repeatable), as `http://host:port`: the entry point
    /// and its streams' sources then appear on their consoles. Optional: nothing an entry
    /// point does depends on them.
    #[arg(long = "control")]
    #[serde(default)]
    pub controls: Vec<String>,
    /// This node's region, shown on the console.
    #[arg(long, default_value = "")]
    #[serde(default)]
    pub region: String,
}

/// One stream an entry point accepts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream id.
    pub id: u32,
    /// The key a publisher must present.
    pub key: String,
    /// The set reflectors every packet goes to: `ADDR` or `udp://ADDR` over UDP,
    /// `quic://ADDR` over QUIC (their QUIC address).
    pub reflectors: Vec<PeerAddr>,
}

fn parse_stream(s: &str) -> Result<StreamConfig, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(id), Some(key), Some(refl)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected ID:KEY:REFLECTOR[,REFLECTOR...]".into());
    };
    let id = id.parse().map_err(|e| format!("stream id {id:?}: {e}"))?;
    let reflectors = refl
        .split(',')
        .map(|r| {
            r.parse()
                .map_err(|e| format!("reflector address {r:?}: {e}"))
        })
        .collect::<Result<_, String>>()?;
    Ok(StreamConfig {
        id,
        key: key.to_owned(),
        reflectors,
    })
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7000))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_retransmit_ms() -> u64 {
    2000
}

impl braid_net::daemon::DaemonConfig for Config {
    const NAME: &'static str = "braid-entrypoint";

    fn file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn check(&self) -> bool {
        self.check
    }

    fn log_json(&self) -> bool {
        self.log_json
    }

    fn validate(&self) -> anyhow::Result<()> {
        braid_net::daemon::network_key(&self.network_key).context("--network-key")?;
        if self.streams.is_empty() {
            anyhow::bail!(
                "no stream configured: give --stream ID:KEY:REFLECTOR[,...] or [[streams]]"
            );
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.streams {
            if !seen.insert(s.id) {
                anyhow::bail!("stream {} is configured twice", s.id);
            }
            if s.key.is_empty() || s.key.len() > braid_core::wire::MAX_STREAM_KEY {
                anyhow::bail!("stream {}: the key must be 1 to 64 bytes", s.id);
            }
            if s.reflectors.is_empty() {
                anyhow::bail!("stream {}: no set reflector to send to", s.id);
            }
        }
        if self.retransmit_ms == 0 {
            anyhow::bail!("retransmit_ms must be above zero");
        }
        self.impair.validate().map_err(anyhow::Error::msg)?;
        self.quic.validate().map_err(anyhow::Error::msg)?;
        self.tls.validate().map_err(anyhow::Error::msg)?;
        let quic_peers = self
            .streams
            .iter()
            .flat_map(|s| &s.reflectors)
            .any(|r| r.is_quic());
        if quic_peers && !self.tls.has_identity() {
            anyhow::bail!(
                "QUIC set reflectors want this entry point's certificate: give tls.cert and tls.key"
            );
        }
        if self.quic.listen.is_some() && !self.tls.has_identity() {
            anyhow::bail!("quic.listen needs a certificate: give tls.cert and tls.key");
        }
        Ok(())
    }
}

impl Config {
    /// What the state machine decides with.
    pub fn machine(&self) -> machine::Config {
        machine::Config {
            node: NodeId(self.node_id),
            streams: self
                .streams
                .iter()
                .map(|s| machine::StreamConfig {
                    id: StreamId(s.id),
                    key: s.key.clone(),
                    reflectors: s.reflectors.iter().map(|r| r.addr).collect(),
                })
                .collect(),
            retransmit: Duration::from_millis(self.retransmit_ms),
        }
    }
}

/// Runs the entry point until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    let codec = Codec::new(braid_net::daemon::network_key(&config.network_key)?);
    let mut socket = Socket::bind(config.listen, config.impair.clone(), "entrypoint")
        .with_context(|| format!("binding {}", config.listen))?;
    let quic_addr = braid_net::daemon::start_quic(
        &mut socket,
        &config.quic,
        &config.tls,
        "entrypoint",
        config.streams.iter().flat_map(|s| &s.reflectors),
    )?;
    let metrics_addr = braid_net::daemon::serve_metrics(config.metrics, shutdown.clone()).await?;
    let mut machine = EntryPoint::new(config.machine(), codec)?;
    let mut ready = vec![
        ("udp", socket.local_addr()?.to_string()),
        ("metrics", metrics_addr.to_string()),
    ];
    if let Some(q) = quic_addr {
        ready.push(("quic", q.to_string()));
    }
    braid_net::daemon::print_ready("entrypoint", &ready);
    let shared = Arc::new(report::Shared::default());
    report::spawn(
        config.controls.clone(),
        report::Identity {
            node: config.node_id,
            role: "entrypoint",
            addr: socket.local_addr()?,
            quic: quic_addr,
            hls: None,
            learn_quic: false,
            region: config.region.clone(),
            capacity: 1,
            cost_tier: 0,
            ladders: Vec::new(),
            auth: braid_core::nodeauth::NodeAuth::new(&braid_net::daemon::network_key(
                &config.network_key,
            )?),
        },
        shared.clone(),
        shutdown.clone(),
    );
    let mut egress_mark = (Instant::now(), 0);
    let mut rx = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut exported_drops = 0;
    let mut machine_timeout = None;
    loop {
        let next_timeout = socket.next_timeout();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Forgets QUIC peers (publishers) gone long enough; exports the counters.
            _ = tick.tick() => {
                let now = Instant::now();
                socket.handle_timeout(now);
                export(machine.counters());
                if now.saturating_duration_since(egress_mark.0) >= Duration::from_secs(1) {
                    let bytes = socket.stats().sent_bytes;
                    let bps = Bitrate::from_size_over(
                        DataSize(bytes.saturating_sub(egress_mark.1)),
                        now.saturating_duration_since(egress_mark.0),
                    );
                    shared.egress_bps.store(bps.0, Ordering::Relaxed);
                    egress_mark = (now, bytes);
                    let summaries: Vec<serde_json::Value> = machine
                        .summaries(now)
                        .iter()
                        .take(report::REPORT_STREAMS)
                        .map(|s| serde_json::json!({
                            "id": s.id.0,
                            "released": s.forwarded,
                            "sources": s.sources,
                        }))
                        .collect();
                    if let Ok(mut st) = shared.streams.lock() {
                        *st = summaries;
                    }
                }
            }
            res = socket.recv(&mut rx) => {
                res.context("receiving")?;
                let now = Instant::now();
                for (from, datagram) in rx.drain(..) {
                    let node = socket.is_node(from);
                    machine.handle_input(now, Input::Received { from, datagram, node });
                }
                // Connections that went up or down need nothing here: a dead set
                // reflector's copies are simply not received; the next send redials.
                let _ = socket.take_changes();
                machine_timeout = drive(&mut machine, &mut socket, now);
                // Drops are told at once; the rest every tick.
                if machine.counters().drops.total() != exported_drops {
                    exported_drops = machine.counters().drops.total();
                    braid_net::daemon::export_drops("entrypoint", &machine.counters().drops);
                }
            }
            _ = braid_net::daemon::sleep_until(next_timeout) => socket.handle_timeout(Instant::now()),
            // Tail-loss probes.
            _ = braid_net::daemon::sleep_until(machine_timeout) => {
                let now = Instant::now();
                machine.handle_timeout(now);
                machine_timeout = drive(&mut machine, &mut socket, now);
            }
        }
    }
    export(machine.counters());
    if let Some(q) = socket.quic_mut() {
        q.close();
    }
    tracing::info!("entry point stopped");
    Ok(())
}

/// Sends what the machine queued, in one batch; returns when the machine next wants
/// its timeout.
fn drive(machine: &mut EntryPoint, socket: &mut Socket, now: Instant) -> Option<Instant> {
    let next = loop {
        match machine.poll_output() {
            Output::Transmit(t) => match t.to {
                Peer::Addr(to) => socket.send(now, to, t.datagram, t.data),
                Peer::Conn(_) => {}
            },
            Output::Event(e) => match e {},
            Output::Timeout(t) => break t,
        }
    };
    socket.flush();
    next
}

fn export(c: &machine::Counters) {
    braid_net::daemon::export_drops("entrypoint", &c.drops);
    metrics::counter!("braid_entrypoint_forwarded_total").absolute(c.forwarded);
    metrics::counter!("braid_entrypoint_not_kept_total").absolute(c.not_kept);
    metrics::counter!("braid_entrypoint_publish_total", "result" => "accepted")
        .absolute(c.publish_accepted);
    metrics::counter!("braid_entrypoint_publish_total", "result" => "refused")
        .absolute(c.publish_refused);
    metrics::counter!("braid_retransmit_sent_total", "role" => "entrypoint")
        .absolute(c.retransmit_sent);
    metrics::counter!("braid_retransmit_missing_total", "role" => "entrypoint")
        .absolute(c.retransmit_missing);
    metrics::counter!("braid_tail_probes_total", "role" => "entrypoint").absolute(c.tail_probes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_flag_parses() {
        let s = parse_stream("7:secret:127.0.0.1:9000,127.0.0.1:9001").unwrap();
        assert_eq!(s.id, 7);
        assert_eq!(s.key, "secret");
        assert_eq!(s.reflectors.len(), 2);
        assert!(parse_stream("7:secret").is_err());
        assert!(parse_stream("x:k:127.0.0.1:1").is_err());
        assert!(parse_stream("1:k:nowhere").is_err());
    }

    #[test]
    fn config_from_toml_and_validation() {
        let c: Config = toml::from_str(
            r#"
            listen = "127.0.0.1:7000"
            network_key = "a network key"
            [[streams]]
            id = 1
            key = "k"
            reflectors = ["127.0.0.1:8000"]
            [impair.default]
            loss = 0.1
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert!(toml::from_str::<Config>("listen = \"127.0.0.1:1\"\nbogus = 1").is_err());
        let mut bad = c.clone();
        bad.streams[0].reflectors.clear();
        assert!(bad.validate().is_err());
    }
}
