//! braid-entrypoint: takes a published stream from a capture and sends every packet to
//! each set reflector configured for the stream.
//!
//! # Layout
//!
//! - [`Config`]: flags and TOML.
//! - [`run`]: the daemon's one task: receive, check, fan out, answer NACKs.
//!
//! A publisher proves it may publish a stream with the stream's key in a publish message
//! (repeated every second); media for a stream is accepted only from a source address
//! that published it within the last [`PUBLISHER_TIMEOUT`]. Every accepted packet is sent,
//! unchanged, to every set reflector of the stream in one `sendmmsg` batch, and kept for
//! `retransmit_ms` to answer NACKs. Every packet not forwarded is counted by reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::ring::{self, Ring};
use braid_core::wire::{Body, Codec, ErrorCode, Flags, Header, Keepalive, Media, Message};
use braid_core::{NodeId, StreamId};
use braid_net::addr::PeerAddr;
use braid_net::daemon::DaemonConfig;
use braid_net::udp::{Impairments, Socket};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// How long a publisher stays authorized after its last publish message.
pub const PUBLISHER_TIMEOUT: Duration = Duration::from_secs(5);

/// Most sequence numbers answered per NACK message (bounds the work one message causes).
const MAX_NACK_ANSWER: u64 = 256;

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

/// A packet kept for retransmission: its header and media, re-encoded on request.
struct Kept {
    header: Header,
    media: Media,
}

struct Stream {
    config: StreamConfig,
    publishers: HashMap<SocketAddr, Instant>,
    kept: Ring<Kept>,
}

fn drop_count(reason: &'static str) {
    metrics::counter!("braid_dropped_total", "role" => "entrypoint", "reason" => reason)
        .increment(1);
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
    let ring_config = ring::Config {
        max_age: Duration::from_millis(config.retransmit_ms),
        ..ring::Config::default()
    };
    let mut streams: HashMap<StreamId, Stream> = HashMap::new();
    for s in &config.streams {
        streams.insert(
            StreamId(s.id),
            Stream {
                config: s.clone(),
                publishers: HashMap::new(),
                kept: Ring::new(ring_config.clone())?,
            },
        );
    }
    let node = NodeId(config.node_id);
    let mut ready = vec![
        ("udp", socket.local_addr()?.to_string()),
        ("metrics", metrics_addr.to_string()),
    ];
    if let Some(q) = quic_addr {
        ready.push(("quic", q.to_string()));
    }
    braid_net::daemon::print_ready("entrypoint", &ready);
    let mut rx = Vec::new();
    let mut out = BytesMut::with_capacity(2048);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let next_timeout = socket.next_timeout();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Forgets QUIC peers (publishers) gone long enough.
            _ = tick.tick() => socket.handle_timeout(Instant::now()),
            res = socket.recv(&mut rx) => {
                res.context("receiving")?;
                let now = Instant::now();
                for (from, bytes) in rx.drain(..) {
                    handle(&codec, &mut socket, &mut streams, node, now, from, bytes, &mut out);
                }
                // Connections that went up or down need nothing here: a dead set
                // reflector's copies are simply not received; the next send redials.
                let _ = socket.take_changes();
                socket.flush();
            }
            _ = braid_net::daemon::sleep_until(next_timeout) => socket.handle_timeout(Instant::now()),
        }
    }
    if let Some(q) = socket.quic() {
        q.close();
    }
    tracing::info!("entry point stopped");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn handle(
    codec: &Codec,
    socket: &mut Socket,
    streams: &mut HashMap<StreamId, Stream>,
    node: NodeId,
    now: Instant,
    from: SocketAddr,
    bytes: Bytes,
    out: &mut BytesMut,
) {
    let msg = match codec.decode(bytes.clone()) {
        Ok(m) => m,
        Err(e) => {
            drop_count(e.reason());
            tracing::debug!("dropping a datagram from {from}: {e}");
            return;
        }
    };
    let Some(stream) = streams.get_mut(&msg.header.stream) else {
        drop_count("unknown_stream");
        return;
    };
    match msg.body {
        Body::Publish { key } => {
            let ok: bool = key.as_ref().ct_eq(stream.config.key.as_bytes()).into();
            let reply = if ok {
                stream.publishers.insert(from, now);

                metrics::counter!("braid_entrypoint_publish_total", "result" => "accepted")
                    .increment(1);
                Body::Keepalive(Keepalive {
                    node,
                    sent_us: 0,
                    echo_us: 0,
                })
            } else {
                metrics::counter!("braid_entrypoint_publish_total", "result" => "refused")
                    .increment(1);
                tracing::warn!(
                    "{from} tried to publish stream {} with a wrong key",
                    msg.header.stream
                );
                Body::Error {
                    code: ErrorCode::UNAUTHORIZED,
                    text: "wrong stream key".into(),
                }
            };
            send(codec, socket, now, from, msg.header.stream, reply, out);
        }
        Body::Media(media) => {
            let authorized = stream
                .publishers
                .get(&from)
                .is_some_and(|t| now.duration_since(*t) < PUBLISHER_TIMEOUT);
            if !authorized {
                drop_count("unpublished");
                tracing::debug!(%from, publishers = ?stream.publishers.keys().collect::<Vec<_>>(), "media from a source that has not published");
                return;
            }
            for to in &stream.config.reflectors {
                socket.send(now, to.addr, bytes.clone(), true);
            }
            metrics::counter!("braid_entrypoint_forwarded_total").increment(1);
            let size = media.rtp.len();
            let seq = media.seq;
            if !stream.kept.push(
                now,
                seq,
                msg.header.flags.contains(Flags::KEYFRAME),
                size,
                Kept {
                    header: msg.header,
                    media,
                },
            ) {
                // The publisher repeated or went back: it was forwarded, not kept.
                metrics::counter!("braid_entrypoint_not_kept_total").increment(1);
            }
        }
        Body::Nack(ranges) => {
            if !stream.config.reflectors.iter().any(|r| r.addr == from) {
                drop_count("nack_from_stranger");
                return;
            }
            if !socket.is_node(from) {
                drop_count("not_a_node");
                return;
            }
            let mut answered = 0;
            for r in ranges {
                for i in 0..u64::from(r.count) {
                    if answered >= MAX_NACK_ANSWER {
                        drop_count("nack_over_limit");
                        return;
                    }
                    answered += 1;
                    let seq = r.first.plus(i);
                    let Some(entry) = stream.kept.get(seq) else {
                        metrics::counter!("braid_retransmit_missing_total", "role" => "entrypoint")
                            .increment(1);
                        continue;
                    };
                    out.clear();
                    let header = Header {
                        flags: entry.item.header.flags | Flags::RETRANSMIT,
                        ..entry.item.header
                    };
                    if codec
                        .encode_media(header, seq, &entry.item.media.rtp, out)
                        .is_ok()
                    {
                        socket.send(now, from, out.split().freeze(), true);
                        metrics::counter!("braid_retransmit_sent_total", "role" => "entrypoint")
                            .increment(1);
                    }
                }
            }
        }
        Body::Keepalive(_) => {}
        _ => drop_count("unexpected_kind"),
    }
}

fn send(
    codec: &Codec,
    socket: &mut Socket,
    now: Instant,
    to: SocketAddr,
    stream: StreamId,
    body: Body,
    out: &mut BytesMut,
) {
    out.clear();
    let msg = Message {
        header: Header {
            stream,
            ..Header::default()
        },
        body,
    };
    if codec.encode(&msg, out).is_ok() {
        socket.send(now, to, out.split().freeze(), false);
    }
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
