//! The control server's API without HTTP: every request's decision, sans-IO, so that the
//! HTTP layer (axum, in [`crate::run`]) and the simulator answer the same way.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use braid_core::StreamId;
use braid_core::token::Signer;

use crate::registry::{self, Registry, Report, SetRule};
use crate::{Feedback, SwitchRequest};

/// A refusal: an HTTP status and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for people.
    pub text: String,
}

impl ApiError {
    /// An error answer with `status` and a sentence.
    pub fn new(status: u16, text: impl Into<String>) -> ApiError {
        ApiError {
            status,
            text: text.into(),
        }
    }
}

/// The control server's state and its answers.
#[derive(Debug)]
pub struct Api {
    registry: Registry,
    signer: Option<Signer>,
    /// When a refused report was last logged (each is counted).
    warned_bad_report: Option<Instant>,
    /// The operator's token (operator actions are refused without one).
    operator_token: Option<String>,
    /// When a refused operator action was last logged.
    warned_operator: Option<Instant>,
    /// Checks node requests (reports, the set reflectors' list) against the network key.
    node_auth: Option<braid_core::nodeauth::NodeAuth>,
    /// When a refused node request was last logged.
    warned_node: Option<Instant>,
    /// How long a renewed token is good for, seconds (0: no renewal).
    renew_secs: u64,
    /// What the player pages last said, by session, and when.
    playback: std::collections::HashMap<String, (Instant, Playback)>,
}

/// What a player page (`/watch/{stream}`) says every second: how playback goes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Playback {
    /// The page's session (random, chosen by the page).
    pub session: String,
    /// The stream.
    pub stream: u32,
    /// The video's position, s.
    pub current_time: f64,
    /// How far behind live the frame shown is, ms (now less its program date time).
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// How far behind the playlist's live edge the player thinks it is, ms (hls.js's own
    /// measure: the edge's age counted, the path from the capture not).
    #[serde(default)]
    pub player_latency_ms: Option<f64>,
    /// The latency the player aims at, ms (the playlist's hold-back, plus its stalls').
    #[serde(default)]
    pub target_latency_ms: Option<f64>,
    /// From the page's load to the first frame played, ms.
    #[serde(default)]
    pub started_ms: Option<f64>,
    /// Times playback stalled after it started.
    pub stalls: u64,
    /// Time spent stalled, ms.
    pub stall_ms: f64,
    /// The edge the last segment or part came from (host:port).
    #[serde(default)]
    pub edge: String,
    /// Player errors (fatal or not) seen.
    #[serde(default)]
    pub errors: u64,
    /// Fatal ones among them (the player had to recover or reload).
    #[serde(default)]
    pub fatal_errors: u64,
    /// The last of them, as the player names it.
    #[serde(default)]
    pub last_error: String,
}

impl Playback {
    fn validate(&self) -> Result<(), String> {
        let finite = |v: f64| v.is_finite() && (0.0..=1e10).contains(&v);
        if self.session.is_empty()
            || self.session.len() > 64
            || self.edge.len() > 256
            || self.last_error.len() > 256
            || !finite(self.current_time)
            || !finite(self.stall_ms)
            || [
                self.latency_ms,
                self.player_latency_ms,
                self.target_latency_ms,
            ]
            .iter()
            .flatten()
            .any(|v| !v.is_finite() || v.abs() > 1e10)
            || self.started_ms.is_some_and(|v| !finite(v))
        {
            return Err("a playback report holds a session of 1 to 64 bytes, an edge of at most 256, and finite figures".into());
        }
        Ok(())
    }
}

/// A viewer asking for its edges (`GET /v1/assign`).
#[derive(Debug, Clone, Copy)]
pub struct AssignRequest<'a> {
    /// The stream.
    pub stream: u32,
    /// Its token (empty: none).
    pub token: &'a str,
    /// Its region (empty: any).
    pub region: &'a str,
    /// Where it asks from: its network is its `prefix`.
    pub peer: IpAddr,
    /// Its id (0: not said).
    pub client: u64,
}

/// Player sessions remembered at once.
const MAX_PLAYBACK: usize = 1000;
/// A player silent this long is forgotten.
const PLAYBACK_TTL: Duration = Duration::from_secs(60);
/// `BANDWIDTH` of a multivariant playlist's variants when no edge has measured the
/// stream yet, bit/s.
const DEFAULT_BPS: u64 = 5_000_000;

/// A hostile request's warning is logged at most this often (each is counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The network a viewer's address belongs to (/24, or /48 over IPv6): probe timings are
/// kept per network.
pub fn prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}", s[0], s[1], s[2])
        }
    }
}

impl Api {
    /// An API over an empty registry; viewers need tokens signed by `signer`, if given.
    pub fn new(rule: SetRule, down_after: Duration, signer: Option<Signer>) -> Api {
        Api {
            registry: Registry::new(rule, down_after),
            signer,
            warned_bad_report: None,
            operator_token: None,
            node_auth: None,
            warned_node: None,
            renew_secs: 0,
            warned_operator: None,
            playback: std::collections::HashMap::new(),
        }
    }

    /// `GET /hls/{stream}.m3u8`: a multivariant playlist whose every variant appears
    /// twice with the same attributes, first on an edge of one set, then on an edge of
    /// the other, chosen as an assignment is (load, region, probes): the HLS
    /// specification's redundant variant streams, so a player that loses the first moves
    /// to the second. The variants are the stream's ladder of renditions when an edge
    /// reports one (the player then picks by its own measure of speed), else the stream.
    pub fn hls_multivariant(
        &mut self,
        now: Instant,
        unix_secs: u64,
        stream: u32,
        token: &str,
        region: &str,
        peer: IpAddr,
    ) -> Result<String, ApiError> {
        let v = AssignRequest {
            stream,
            token,
            region,
            peer,
            client: 0,
        };
        let a = self.assign(now, unix_secs, &v)?;
        let pick = |set| {
            a.candidates
                .iter()
                .find(|c| c.set == set)
                .and_then(|c| c.hls)
        };
        let edges: Vec<SocketAddr> = [pick(a.primary_set), pick(a.secondary_set)]
            .into_iter()
            .flatten()
            .collect();
        if edges.is_empty() {
            return Err(ApiError::new(503, "no live edge serves HLS"));
        }
        let query = if token.is_empty() {
            String::new()
        } else {
            format!("?token={token}")
        };
        // The variants: the stream's ladder of renditions (each at the higher of its
        // nominal rate and what edges measure), or the stream alone.
        let variants: Vec<(u32, u64)> = match self.registry.ladder(now, stream) {
            Some(ladder) => ladder
                .iter()
                .map(|r| {
                    let measured = self.registry.stream_bps(now, r.stream).unwrap_or(0);
                    (r.stream, measured.max(u64::from(r.kbps) * 1000))
                })
                .collect(),
            None => vec![(
                stream,
                self.registry.stream_bps(now, stream).unwrap_or(DEFAULT_BPS),
            )],
        };
        let mut out = String::from("#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n");
        for (id, bps) in variants {
            for e in &edges {
                out.push_str(&format!(
                    "#EXT-X-STREAM-INF:BANDWIDTH={bps}\nhttp://{e}/hls/{id}/playlist.m3u8{query}\n"
                ));
            }
        }
        metrics::counter!("braid_control_hls_assignments_total").increment(1);
        Ok(out)
    }

    /// `POST /v1/playback`: a player page's figures.
    pub fn playback(&mut self, now: Instant, p: Playback) -> Result<(), ApiError> {
        p.validate().map_err(|e| {
            metrics::counter!("braid_control_refused_total", "reason" => "bad_playback")
                .increment(1);
            ApiError::new(400, e)
        })?;
        if !self.playback.contains_key(&p.session) && self.playback.len() >= MAX_PLAYBACK {
            self.playback
                .retain(|_, (t, _)| now.duration_since(*t) < PLAYBACK_TTL);
            if self.playback.len() >= MAX_PLAYBACK {
                return Err(ApiError::new(503, "too many player sessions"));
            }
        }
        metrics::counter!("braid_control_playback_reports_total").increment(1);
        self.playback.insert(p.session.clone(), (now, p));
        Ok(())
    }

    /// `GET /v1/playback`: every player session heard from within a minute.
    pub fn playbacks(&self, now: Instant) -> Vec<Playback> {
        let mut v: Vec<Playback> = self
            .playback
            .values()
            .filter(|(t, _)| now.duration_since(*t) < PLAYBACK_TTL)
            .map(|(_, p)| p.clone())
            .collect();
        v.sort_by(|a, b| a.session.cmp(&b.session));
        v
    }

    /// The registry, for the status page.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// How long viewers reported slow are remembered.
    #[must_use]
    pub fn with_slow_memory(mut self, ttl: std::time::Duration) -> Api {
        self.registry = self.registry.with_slow_memory(ttl);
        self
    }

    fn check_token(&self, stream: u32, token: &str, unix_secs: u64) -> Result<(), ApiError> {
        let Some(signer) = &self.signer else {
            return Ok(());
        };
        signer
            .verify_for(StreamId(stream), token, unix_secs)
            .map(|_| ())
            .map_err(|e| {
                metrics::counter!("braid_control_refused_total", "reason" => "token").increment(1);
                ApiError::new(403, format!("viewer token refused: {e}"))
            })
    }

    /// Renewed tokens are good for `secs` from their renewal (0: no renewal).
    pub fn with_token_renewal(mut self, secs: u64) -> Api {
        self.renew_secs = secs;
        self
    }

    /// `POST /v1/renew`: a token still good, for the same stream and viewer, good for the
    /// renewal time from now (403 for a token this server does not take, expired or not
    /// its own; 404 when tokens or renewal are off here).
    pub fn renew(&self, token: &str, unix_secs: u64) -> Result<(String, u64), ApiError> {
        let Some(signer) = self.signer.as_ref().filter(|_| self.renew_secs > 0) else {
            return Err(ApiError::new(
                404,
                "token renewal is off here (no --token-secret, or --token-renew-secs 0)",
            ));
        };
        let claims = signer.verify(token, unix_secs).map_err(|e| {
            metrics::counter!("braid_control_refused_total", "reason" => "renew").increment(1);
            ApiError::new(403, format!("viewer token refused: {e}"))
        })?;
        let renewed = braid_core::token::Claims {
            expires: unix_secs + self.renew_secs,
            ..claims
        };
        metrics::counter!("braid_control_token_renewals_total").increment(1);
        Ok((signer.sign(&renewed), renewed.expires))
    }

    /// Node requests must be signed with this network's key.
    pub fn with_node_auth(mut self, auth: braid_core::nodeauth::NodeAuth) -> Api {
        self.node_auth = Some(auth);
        self
    }

    /// Whether a node request (`method` `path` with `body`, signed in `header`) comes
    /// from a node of this network now: 401 otherwise, counted, logged at most every
    /// 10 s. Without a network key (tests of the registry alone) every request passes.
    pub fn check_node(
        &mut self,
        now: Instant,
        now_ms: u64,
        method: &str,
        path: &str,
        header: Option<&str>,
        body: &[u8],
    ) -> Result<(), ApiError> {
        let Some(auth) = &self.node_auth else {
            return Ok(());
        };
        let Err(e) = auth.verify(method, path, header, body, now_ms) else {
            return Ok(());
        };
        metrics::counter!("braid_control_refused_total", "reason" => "node_auth").increment(1);
        if self
            .warned_node
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            self.warned_node = Some(now);
            tracing::warn!(
                "refused a node request {method} {path}: {e} (each counted in braid_control_refused_total{{reason=\"node_auth\"}}; logged at most every 10 s)"
            );
        }
        Err(ApiError::new(401, format!("node request refused: {e}")))
    }

    /// Operator actions need `token` (empty: none is allowed).
    pub fn with_operator_token(mut self, token: &str) -> Api {
        self.operator_token = (!token.is_empty()).then(|| token.to_owned());
        self
    }

    /// Whether `given` is the operator's token (compared in constant time): 401 when
    /// it is missing or wrong, 403 when this server takes no operator actions.
    pub fn check_operator(&mut self, given: Option<&str>) -> Result<(), ApiError> {
        let Some(want) = &self.operator_token else {
            metrics::counter!("braid_control_refused_total", "reason" => "operator").increment(1);
            return Err(ApiError::new(
                403,
                "operator actions are off: start the control server with --operator-token",
            ));
        };
        let given = given.unwrap_or("").as_bytes();
        let same = given.len() == want.len()
            && given
                .iter()
                .zip(want.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            return Ok(());
        }
        metrics::counter!("braid_control_refused_total", "reason" => "operator").increment(1);
        let now = Instant::now();
        if self
            .warned_operator
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            self.warned_operator = Some(now);
            tracing::warn!(
                "operator action refused: missing or wrong operator token (counted in braid_control_refused_total{{reason=\"operator\"}}; logged at most every 10 s)"
            );
        }
        Err(ApiError::new(401, "operator token missing or wrong"))
    }

    /// Forgets nodes silent for a minute (call now and then).
    pub fn housekeeping(&mut self, now: Instant) {
        self.registry.sample(now);
        let n = self.registry.forget_silent(now);
        if n > 0 {
            metrics::counter!("braid_control_nodes_forgotten_total").increment(n as u64);
        }
        metrics::gauge!("braid_control_nodes").set(self.registry.len() as f64);
    }

    /// `POST /v1/report`.
    pub fn report(&mut self, now: Instant, r: Report) -> Result<registry::ReportReply, ApiError> {
        if let Err(text) = r.validate() {
            metrics::counter!("braid_control_refused_total", "reason" => "bad_report").increment(1);
            if self
                .warned_bad_report
                .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
            {
                self.warned_bad_report = Some(now);
                tracing::warn!(
                    node = r.node,
                    "report refused: {text} (counted in braid_control_refused_total{{reason=\"bad_report\"}}; logged at most every 10 s)"
                );
            }
            return Err(ApiError::new(400, format!("report refused: {text}")));
        }
        let full = self.registry.len() >= registry::MAX_NODES;
        self.registry.handle_report(now, r).map_err(|text| {
            // A full registry is a condition of this server, not a clash of ids.
            let status = if full { 503 } else { 409 };
            metrics::counter!("braid_control_refused_total", "reason" => if full { "full" } else { "node_id_taken" })
                .increment(1);
            if self.warned_bad_report.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                self.warned_bad_report = Some(now);
                tracing::warn!("report refused: {text} (logged at most every 10 s)");
            }
            ApiError::new(status, text)
        })
    }

    /// `GET /v1/assign`, from viewer `v`.
    pub fn assign(
        &mut self,
        now: Instant,
        unix_secs: u64,
        v: &AssignRequest<'_>,
    ) -> Result<registry::Assignment, ApiError> {
        let AssignRequest {
            stream,
            token,
            region,
            peer,
            client,
        } = *v;
        self.check_token(stream, token, unix_secs)?;
        let a = self
            .registry
            .assign(now, region, &prefix(peer), client)
            .map_err(|e| ApiError::new(503, e.to_string()))?;
        metrics::counter!("braid_control_assignments_total").increment(1);
        if self.registry.is_slow(now, client, &prefix(peer)) {
            metrics::counter!("braid_control_slow_assignments_total").increment(1);
        }
        Ok(a)
    }

    /// `POST /v1/switch`, from a viewer at `peer`.
    pub fn switch(
        &mut self,
        now: Instant,
        unix_secs: u64,
        s: &SwitchRequest,
        peer: IpAddr,
    ) -> Result<registry::Assignment, ApiError> {
        self.check_token(s.stream, &s.token, unix_secs)?;
        let v = (s.region.as_str(), prefix(peer), s.client);
        let a = self
            .registry
            .switch_preferring(now, s.failed, &s.reason, (v.0, &v.1, v.2), s.prefer)
            .map_err(|e| match e {
                registry::AssignError::NoTier(_) => ApiError::new(409, e.to_string()),
                e => ApiError::new(503, e.to_string()),
            })?;
        metrics::counter!("braid_control_switches_total", "reason" => s.reason.clone())
            .increment(1);
        tracing::info!(client = s.client, failed = %s.failed, to = %a.primary, reason = %s.reason, "switch");
        Ok(a)
    }

    /// `POST` (on) or `DELETE` (off) `/v1/drain/{node}`.
    pub fn drain(&mut self, node: u64, on: bool) -> Result<(), ApiError> {
        if self.registry.drain(node, on) {
            if on {
                tracing::warn!(node, "draining");
            }
            Ok(())
        } else {
            Err(ApiError::new(404, format!("no node {node} has reported")))
        }
    }

    /// `POST /v1/feedback`, from a viewer at `peer`: at most 64 finite, non-negative
    /// timings are kept.
    pub fn feedback(&mut self, f: &Feedback, peer: IpAddr) {
        let probes: Vec<(SocketAddr, f64)> = f
            .probes
            .iter()
            .filter(|p| p.rtt_ms.is_finite() && p.rtt_ms >= 0.0)
            .take(64)
            .map(|p| (p.edge, p.rtt_ms))
            .collect();
        self.registry.handle_feedback(&prefix(peer), &probes);
    }

    /// `GET /v1/reflectors`: live set reflectors, UDP address and QUIC address if any.
    pub fn reflectors(&self, now: Instant) -> Vec<(SocketAddr, Option<SocketAddr>)> {
        self.registry.reflectors(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Role, Rung};

    #[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
    fn t0() -> Instant {
        Instant::now()
    }

    fn edge(node: u64, port: u16, ladders: Vec<Vec<Rung>>) -> Report {
        let json = serde_json::json!({
            "node": node, "role": "edge", "addr": format!("127.0.0.1:{port}"),
            "hls": format!("127.0.0.1:{}", port + 1000),
        });
        let mut r: Report = serde_json::from_value(json).expect("a report");
        r.ladders = ladders;
        r
    }

    #[test]
    fn a_ladder_is_the_multivariant_playlists_variants_each_on_both_sets() {
        let t = t0();
        let mut api = Api::new(SetRule::Parity, Duration::from_secs(3), None);
        let ladder = vec![
            Rung {
                stream: 13,
                kbps: 5000,
            },
            Rung {
                stream: 11,
                kbps: 1000,
            },
            Rung {
                stream: 12,
                kbps: 2500,
            },
        ];
        api.report(t, edge(1, 9000, vec![ladder.clone()])).unwrap();
        api.report(t, edge(2, 9001, vec![ladder])).unwrap();
        let peer = IpAddr::from([10, 0, 0, 1]);
        // Asked for any stream of the ladder: its three renditions, lowest first, each on
        // an edge of either set with the same attributes (redundant variants).
        for stream in [11, 13] {
            let text = api.hls_multivariant(t, 0, stream, "", "", peer).unwrap();
            let uris: Vec<&str> = text.lines().filter(|l| l.starts_with("http")).collect();
            let infs: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("#EXT-X-STREAM"))
                .collect();
            assert_eq!(uris.len(), 6, "{text}");
            for (i, id) in [11, 11, 12, 12, 13, 13].into_iter().enumerate() {
                assert!(
                    uris[i].ends_with(&format!("/hls/{id}/playlist.m3u8")),
                    "{text}"
                );
            }
            assert_ne!(uris[0], uris[1], "two edges: {text}");
            assert_eq!(infs[0], "#EXT-X-STREAM-INF:BANDWIDTH=1000000", "{text}");
            assert_eq!(infs[4], infs[5], "{text}");
            assert_eq!(infs[5], "#EXT-X-STREAM-INF:BANDWIDTH=5000000", "{text}");
        }
        // A stream in no ladder: itself, twice.
        let text = api.hls_multivariant(t, 0, 7, "", "", peer).unwrap();
        assert_eq!(text.matches("/hls/7/playlist.m3u8").count(), 2, "{text}");
        // Only edges have ladders, and not too many or too long.
        let mut r = edge(3, 9002, vec![vec![Rung { stream: 1, kbps: 1 }; 9]]);
        assert!(api.report(t, r.clone()).is_err());
        r.ladders = vec![vec![Rung { stream: 1, kbps: 1 }]];
        r.role = Role::Set;
        assert!(api.report(t, r).is_err());
    }
}
