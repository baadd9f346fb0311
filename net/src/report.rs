//! Reporting to the control servers: every second, to each of them, the node's role,
//! address, capacity and load; the answer says whether an operator drained this node.
//!
//! A blocking thread does the HTTP, so a slow or dead control server never delays the
//! packet path; the main task shares three numbers with it through atomics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use braid_net::addr::PeerAddr;
use tokio_util::sync::CancellationToken;

/// What the main task and the reporter share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) viewers: AtomicU64,
    pub(crate) egress_bps: AtomicU64,
    /// Set when a control server says this node is drained.
    pub(crate) drain: AtomicBool,
    /// Live set reflectors, as a control server last listed them (edges only).
    pub(crate) reflectors: std::sync::Mutex<Vec<PeerAddr>>,
    /// Every stream's figures, for the control server's console (refreshed each second).
    pub(crate) streams: std::sync::Mutex<Vec<serde_json::Value>>,
}

/// Most streams a report carries (the busiest, by packets released).
pub(crate) const REPORT_STREAMS: usize = 64;
/// Most paths per stream a report carries.
pub(crate) const REPORT_PATHS: usize = 16;

/// A stream's figures as a report carries them.
pub(crate) fn stream_summary(st: &crate::common::StreamReport) -> serde_json::Value {
    serde_json::json!({
        "id": st.id.0,
        "viewers": st.viewers,
        "subscribers": st.subscribers,
        "released": st.merge.released,
        "gaps": st.merge.gaps,
        "paths": st.paths.iter().take(REPORT_PATHS).map(|(p, s)| serde_json::json!({
            "path": p.0,
            "received": s.received,
            "first": s.first,
        })).collect::<Vec<_>>(),
    })
}

/// This process's CPU use since the last sample, in cores (from `/proc`).
#[derive(Default)]
struct CpuMeter {
    last: Option<(std::time::Instant, f64)>,
}

impl CpuMeter {
    fn sample(&mut self) -> f64 {
        let secs = braid_net::daemon::cpu_seconds(std::process::id());
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
pub(crate) struct Identity {
    pub(crate) node: u64,
    pub(crate) role: &'static str,
    pub(crate) addr: SocketAddr,
    /// Where it accepts QUIC, if it does.
    pub(crate) quic: Option<SocketAddr>,
    /// Edges: reach learned set reflectors over QUIC when they offer it.
    pub(crate) learn_quic: bool,
    pub(crate) region: String,
    pub(crate) capacity: u64,
    pub(crate) cost_tier: u8,
    /// Signs its requests with the network key: control servers take reports and give
    /// the set reflectors' list only to nodes.
    pub(crate) auth: braid_core::nodeauth::NodeAuth,
}

/// Starts the reporter thread; it stops at shutdown.
pub(crate) fn spawn(
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
        while !shutdown.is_cancelled() {
            let body = serde_json::json!({
                "node": id.node,
                "role": id.role,
                "addr": id.addr,
                "quic": id.quic,
                "region": id.region,
                "capacity": id.capacity,
                "cost_tier": id.cost_tier,
                "viewers": shared.viewers.load(Ordering::Relaxed),
                "egress_bps": shared.egress_bps.load(Ordering::Relaxed),
                "cpu": cpu.sample(),
                "streams": shared.streams.lock().map(|s| s.clone()).unwrap_or_default(),
            })
            .to_string();
            let mut answered = 0;
            let mut drain = false;
            for url in &controls {
                let sig = id.auth.sign(
                    "POST",
                    "/v1/report",
                    braid_net::daemon::unix_ms(),
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
                    let sig =
                        id.auth
                            .sign("GET", "/v1/reflectors", braid_net::daemon::unix_ms(), b"");
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
