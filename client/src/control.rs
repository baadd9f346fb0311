//! Talking to the control servers: assignment, switch requests, feedback. Each call asks
//! every server at once and takes the first good answer, so any one of them is enough
//! and a hung one costs nothing; the HTTP runs on blocking threads so the viewer's task
//! never waits on it.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::session::Refusal;

/// How long one server is waited for.
pub const TIMEOUT: Duration = Duration::from_millis(700);

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
        .timeout_global(Some(TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Asks every control server at once; the first answer with status 200 wins, a 403
/// (the viewer refused) ends the call, and with neither every server's error is said.
fn first_answer(
    v: &Viewer,
    call: impl Fn(&ureq::Agent, &str) -> Result<(u16, String), ureq::Error> + Send + Sync + 'static,
) -> Result<String, Refusal> {
    let call = std::sync::Arc::new(call);
    let (tx, rx) = std::sync::mpsc::channel();
    for url in &v.controls {
        let base = url.trim_end_matches('/').to_owned();
        let (tx, call) = (tx.clone(), call.clone());
        std::thread::spawn(move || {
            let r = call(&agent(), &base);
            let _ = tx.send((base, r));
        });
    }
    drop(tx);
    let mut errors = Vec::new();
    for (base, r) in rx {
        match r {
            Ok((200, body)) => return Ok(body),
            Ok((403, body)) => {
                return Err(Refusal::Refused(format!(
                    "control server {base} refused: {body}"
                )));
            }
            Ok((status, body)) => errors.push(format!("{base}: {status} {body}")),
            Err(e) => errors.push(format!("{base}: {e}")),
        }
    }
    Err(Refusal::Failed(format!(
        "no control server answered: {}",
        errors.join("; ")
    )))
}

fn parse(body: &str) -> Result<Assignment, Refusal> {
    serde_json::from_str(body).map_err(|e| {
        Refusal::Failed(format!(
            "a control server's answer is not an assignment: {e}"
        ))
    })
}

/// Asks for an assignment.
pub fn assign(v: &Viewer) -> Result<Assignment, Refusal> {
    let q = v.clone();
    let body = first_answer(v, move |agent, base| {
        let mut r = agent
            .get(&format!("{base}/v1/assign"))
            .query("stream", q.stream.to_string())
            .query("client", q.client.to_string())
            .query("token", &q.token)
            .query("region", &q.region)
            .call()?;
        Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
    })?;
    parse(&body)
}

/// Reports a failed primary (or one left for a cheap or fast edge, `prefer`) and asks
/// for an edge of the other set.
pub fn switch(
    v: &Viewer,
    failed: SocketAddr,
    reason: &str,
    last_seq: u64,
    prefer: braid_core::playout::Prefer,
) -> Result<Assignment, Refusal> {
    let req = serde_json::json!({
        "client": v.client, "stream": v.stream, "failed": failed, "reason": reason,
        "last_seq": last_seq, "token": v.token, "region": v.region, "prefer": prefer,
    })
    .to_string();
    let body = first_answer(v, move |agent, base| {
        let mut r = agent
            .post(&format!("{base}/v1/switch"))
            .header("content-type", "application/json")
            .send(&req)?;
        Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
    })?;
    parse(&body)
}

/// Renews the viewer's token while it is still good: the new token and its expiry.
pub fn renew(v: &Viewer) -> Result<(String, u64), Refusal> {
    let req = serde_json::json!({ "token": v.token }).to_string();
    let body = first_answer(v, move |agent, base| {
        let mut r = agent
            .post(&format!("{base}/v1/renew"))
            .header("content-type", "application/json")
            .send(&req)?;
        Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
    })?;
    let v: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| Refusal::Failed(format!("a renewal answer is not JSON: {e}")))?;
    match (v["token"].as_str(), v["expires"].as_u64()) {
        (Some(t), Some(e)) => Ok((t.to_owned(), e)),
        _ => Err(Refusal::Failed(format!(
            "a renewal answer without a token: {body}"
        ))),
    }
}

/// When to renew a token that expires at `expires` (Unix seconds), seen at `now_unix`:
/// halfway to its expiry, and a minute before it at the latest.
pub fn renew_at(now_unix: u64, expires: u64) -> u64 {
    let left = expires.saturating_sub(now_unix);
    expires.saturating_sub((left / 2).min(60))
}

/// Reports probe timings (best effort).
pub fn feedback(v: &Viewer, probes: &[(SocketAddr, f64)], throughput_bps: u64) {
    let req = serde_json::json!({
        "client": v.client,
        "probes": probes.iter().map(|(a, r)| serde_json::json!({"edge": a, "rtt_ms": r})).collect::<Vec<_>>(),
        "throughput_bps": throughput_bps,
    })
    .to_string();
    let _ = first_answer(v, move |agent, base| {
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

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_renewed_halfway_and_a_minute_ahead_at_the_latest() {
        assert_eq!(super::renew_at(1000, 1004), 1002);
        assert_eq!(super::renew_at(1000, 1000 + 3600), 1000 + 3540);
        assert_eq!(super::renew_at(1000, 990), 990, "already expired: at once");
    }
}
