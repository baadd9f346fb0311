//! Reporting to the control servers: every second, to each of them, the node's role,
//! address, capacity and load; the answer says whether an operator drained this node.
//!
//! A blocking thread does the HTTP, so a slow or dead control server never delays the
//! packet path; the main task shares three numbers with it through atomics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// What the main task and the reporter share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) viewers: AtomicU64,
    pub(crate) egress_bps: AtomicU64,
    /// Set when a control server says this node is drained.
    pub(crate) drain: AtomicBool,
}

/// The fixed part of a report.
pub(crate) struct Identity {
    pub(crate) node: u64,
    pub(crate) role: &'static str,
    pub(crate) addr: SocketAddr,
    pub(crate) region: String,
    pub(crate) capacity: u64,
    pub(crate) cost_tier: u8,
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
        while !shutdown.is_cancelled() {
            let body = serde_json::json!({
                "node": id.node,
                "role": id.role,
                "addr": id.addr,
                "region": id.region,
                "capacity": id.capacity,
                "cost_tier": id.cost_tier,
                "viewers": shared.viewers.load(Ordering::Relaxed),
                "egress_bps": shared.egress_bps.load(Ordering::Relaxed),
                "cpu": 0.0,
            })
            .to_string();
            let mut answered = 0;
            let mut drain = false;
            for url in &controls {
                let res = agent
                    .post(&format!("{}/v1/report", url.trim_end_matches('/')))
                    .header("content-type", "application/json")
                    .send(&body)
                    .and_then(|mut r| r.body_mut().read_to_string());
                match res {
                    Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                        Ok(v) => {
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
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}
