//! Reporting to the control servers: every second, to each of them, the node's role,
//! address, capacity, load and streams; the answer says whether an operator drained this
//! node. Set reflectors, edges and entry points report.
//!
//! A blocking thread does the HTTP, so a slow or dead control server never delays the
//! packet path; the main task shares three numbers with it through atomics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::addr::PeerAddr;
use tokio_util::sync::CancellationToken;

/// What the main task and the reporter share.
#[derive(Debug, Default)]
pub struct Shared {
    /// Viewers now (edges).
    pub viewers: AtomicU64,
    /// What the node sent over the last second, bit/s.
    pub egress_bps: AtomicU64,
    /// Set when a control server says this node is drained.
    pub drain: AtomicBool,
    /// Live set reflectors, as a control server last listed them (edges only).
    pub reflectors: std::sync::Mutex<Vec<PeerAddr>>,
    /// Every stream's figures, for the control server's console (refreshed each second).
    pub streams: std::sync::Mutex<Vec<serde_json::Value>>,
    /// Viewers slow now (edges): client id, IP address, stream and rate.
    pub slow: std::sync::Mutex<Vec<serde_json::Value>>,
}

/// Most streams a report carries (the busiest, by packets released).
pub const REPORT_STREAMS: usize = 64;
/// Most slow viewers a report names.
pub const REPORT_SLOW: usize = 256;
/// Most paths per stream a report carries.
pub const REPORT_PATHS: usize = 16;

/// This process's CPU use since the last sample, in cores (from `/proc`).
#[derive(Default)]
struct CpuMeter {
    last: Option<(std::time::Instant, f64)>,
}

impl CpuMeter {
    fn sample(&mut self) -> f64 {
        let secs = crate::daemon::cpu_seconds(std::process::id());
        let now = std::time::Instant::now();
        let used = match self.last {
            Some((t, s)) if now > t => (secs - s) / now.duration_since(t).as_secs_f64(),
            _ => 0.0,
        };
        self.last = Some((now, secs));
        used.max(0.0)
    }
}

/// The fixed part of a report.
pub struct Identity {
    /// Its node id.
    pub node: u64,
    /// `entrypoint`, `set` or `edge`.
    pub role: &'static str,
    /// Where it takes UDP (and, for edges, TCP).
    pub addr: SocketAddr,
    /// Where it accepts QUIC, if it does.
    pub quic: Option<SocketAddr>,
    /// Where it serves HLS, if it does (edges).
    pub hls: Option<SocketAddr>,
    /// Edges: reach learned set reflectors over QUIC when they offer it.
    pub learn_quic: bool,
    /// Its region.
    pub region: String,
    /// Most viewers it takes (edges).
    pub capacity: u64,
    /// Its cost tier (0 cheapest).
    pub cost_tier: u8,
    /// Its ladders of renditions (edges), each `(stream, kbit/s)` lowest rate first.
    pub ladders: Vec<Vec<(u32, u64)>>,
    /// Signs its requests with the network key: control servers take reports and give
    /// the set reflectors' list only to nodes.
    pub auth: braid_core::nodeauth::NodeAuth,
}

/// Starts the reporter thread; it stops at shutdown.
pub fn spawn(
    controls: Vec<String>,
    id: Identity,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    if controls.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(500)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut cpu = CpuMeter::default();
        // Control servers that refused the last report (logged once, until they accept).
        let mut refused = std::collections::HashSet::new();
        let ladders: Vec<Vec<serde_json::Value>> = id
            .ladders
            .iter()
            .map(|l| {
                l.iter()
                    .map(|(stream, kbps)| serde_json::json!({"stream": stream, "kbps": kbps}))
                    .collect()
            })
            .collect();
        while !shutdown.is_cancelled() {
            let mut body = serde_json::json!({
                "node": id.node,
                "role": id.role,
                "addr": id.addr,
                "quic": id.quic,
                "hls": id.hls,
                "region": id.region,
                "capacity": id.capacity,
                "cost_tier": id.cost_tier,
                "viewers": shared.viewers.load(Ordering::Relaxed),
                "egress_bps": shared.egress_bps.load(Ordering::Relaxed),
                "cpu": cpu.sample(),
                "streams": shared.streams.lock().map(|s| s.clone()).unwrap_or_default(),
                "slow": shared.slow.lock().map(|s| s.clone()).unwrap_or_default(),
            });
            if !ladders.is_empty() {
                body["ladders"] = serde_json::json!(ladders);
            }
            let body = body.to_string();
            let mut answered = 0;
            let mut drain = false;
            for url in &controls {
                let sig = id.auth.sign(
                    "POST",
                    "/v1/report",
                    crate::daemon::unix_ms(),
                    body.as_bytes(),
                );
                let res = agent
                    .post(&format!("{}/v1/report", url.trim_end_matches('/')))
                    .header("content-type", "application/json")
                    .header(braid_core::nodeauth::HEADER, &sig)
                    .send(&body)
                    .and_then(|mut r| r.body_mut().read_to_string());
                match res {
                    Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                        Ok(v) => {
                            if let Some(err) = v["error"].as_str() {
                                metrics::counter!("braid_control_report_failed_total").increment(1);
                                if refused.insert(url.clone()) {
                                    tracing::error!(
                                        "control server {url} refused this node's report: {err}"
                                    );
                                }
                                continue;
                            }
                            refused.remove(url);
                            answered += 1;
                            drain |= v["drain"].as_bool().unwrap_or(false);
                        }
                        Err(_) => {
                            tracing::warn!("control server {url} answered a report with {text:?}")
                        }
                    },
                    Err(e) => {
                        metrics::counter!("braid_control_report_failed_total").increment(1);
                        tracing::debug!("reporting to {url}: {e}");
                    }
                }
            }
            // With no control server answering, keep the last word rather than guess.
            if answered > 0 {
                shared.drain.store(drain, Ordering::Relaxed);
            }
            if id.role == "edge" {
                for url in &controls {
                    let sig = id
                        .auth
                        .sign("GET", "/v1/reflectors", crate::daemon::unix_ms(), b"");
                    let res = agent
                        .get(&format!("{}/v1/reflectors", url.trim_end_matches('/')))
                        .header(braid_core::nodeauth::HEADER, &sig)
                        .call()
                        .and_then(|mut r| r.body_mut().read_to_string());
                    let Ok(text) = res else { continue };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                        continue;
                    };
                    let udp: Vec<SocketAddr> = v["reflectors"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|x| x.as_str()?.parse().ok()).collect())
                        .unwrap_or_default();
                    let list: Vec<PeerAddr> = udp
                        .into_iter()
                        .map(|u| {
                            let quic = v["quic"][u.to_string()]
                                .as_str()
                                .and_then(|q| q.parse().ok())
                                .filter(|_| id.learn_quic);
                            quic.map_or(PeerAddr::udp(u), PeerAddr::quic)
                        })
                        .collect();
                    if let Ok(mut r) = shared.reflectors.lock() {
                        *r = list;
                    }
                    break;
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}
