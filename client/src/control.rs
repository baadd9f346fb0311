//! Talking to the control servers: assignment, switch requests, feedback. Each call tries
//! the servers in order and takes the first answer, so any one of them is enough; the
//! HTTP runs on a blocking thread so the viewer's task never waits on it.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// One edge the control server offers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Candidate {
    /// Where, over UDP or TCP.
    pub addr: SocketAddr,
    /// Where over QUIC, if the edge offers it.
    #[serde(default)]
    pub quic: Option<SocketAddr>,
    /// `even` or `odd`.
    pub set: String,
    /// Lower is better.
    pub priority: u32,
    /// Share among equals.
    pub weight: u32,
}

/// An assignment.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Assignment {
    /// The edge to watch.
    pub primary: SocketAddr,
    /// Its set.
    pub primary_set: String,
    /// The set to switch to.
    pub secondary_set: String,
    /// Every live edge, ranked.
    pub candidates: Vec<Candidate>,
}

/// Who the viewer is, for every request.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// Control servers, `http://host:port`.
    pub controls: Vec<String>,
    /// Viewer id.
    pub client: u64,
    /// Stream.
    pub stream: u32,
    /// Token.
    pub token: String,
    /// Region.
    pub region: String,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(700)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// The first answer from any control server, or every server's error.
fn first_answer(
    v: &Viewer,
    call: impl Fn(&ureq::Agent, &str) -> Result<(u16, String), ureq::Error>,
) -> anyhow::Result<String> {
    let agent = agent();
    let mut errors = Vec::new();
    for url in &v.controls {
        let base = url.trim_end_matches('/');
        match call(&agent, base) {
            Ok((200, body)) => return Ok(body),
            Ok((403, body)) => anyhow::bail!("control server {base} refused: {body}"),
            Ok((status, body)) => errors.push(format!("{base}: {status} {body}")),
            Err(e) => errors.push(format!("{base}: {e}")),
        }
    }
    anyhow::bail!("no control server answered: {}", errors.join("; "))
}

/// Asks for an assignment.
pub fn assign(v: &Viewer) -> anyhow::Result<Assignment> {
    let body = first_answer(v, |agent, base| {
        let mut r = agent
            .get(&format!("{base}/v1/assign"))
            .query("stream", v.stream.to_string())
            .query("client", v.client.to_string())
            .query("token", &v.token)
            .query("region", &v.region)
            .call()?;
        Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
    })?;
    Ok(serde_json::from_str(&body)?)
}

/// Reports a failed primary and asks for an edge of the other set.
pub fn switch(
    v: &Viewer,
    failed: SocketAddr,
    reason: &str,
    last_seq: u64,
) -> anyhow::Result<Assignment> {
    let req = serde_json::json!({
        "client": v.client, "stream": v.stream, "failed": failed, "reason": reason,
        "last_seq": last_seq, "token": v.token, "region": v.region,
    })
    .to_string();
    let body = first_answer(v, |agent, base| {
        let mut r = agent
            .post(&format!("{base}/v1/switch"))
            .header("content-type", "application/json")
            .send(&req)?;
        Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
    })?;
    Ok(serde_json::from_str(&body)?)
}

/// Reports probe timings (best effort).
pub fn feedback(v: &Viewer, probes: &[(SocketAddr, f64)], throughput_bps: u64) {
    let req = serde_json::json!({
        "client": v.client,
        "probes": probes.iter().map(|(a, r)| serde_json::json!({"edge": a, "rtt_ms": r})).collect::<Vec<_>>(),
        "throughput_bps": throughput_bps,
    })
    .to_string();
    let _ = first_answer(v, |agent, base| {
        let mut r = agent
            .post(&format!("{base}/v1/feedback"))
            .header("content-type", "application/json")
            .send(&req)?;
        let status = r.status().as_u16();
        Ok((
            if status == 204 { 200 } else { status },
            r.body_mut().read_to_string()?,
        ))
    });
}
