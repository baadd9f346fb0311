//! braid-control: the control server (seed 002's heart, seed 000's mapping server).
//!
//! Nodes report to it every second; it groups edges into two disjoint sets by port,
//! assigns each viewer a primary edge and a secondary set, answers switch requests with an
//! edge of the other set, keeps viewers' probe timings per network prefix to rank
//! candidates, and shows it all on a status page. It keeps no database: everything is
//! rebuilt from reports within seconds, so several run side by side.
//!
//! # Layout
//!
//! - [`registry`]: the state and every decision (sans-IO).
//! - [`api`]: each request's answer without HTTP (sans-IO), shared with the simulator.
//! - [`Config`], [`run`]: the HTTP API (axum) around it.
//!
//! | method | path | body / query | answer |
//! |---|---|---|---|
//! | POST | `/v1/report` | [`registry::Report`], signed by a node ([`braid_core::nodeauth`]) | [`registry::ReportReply`] |
//! | GET | `/v1/assign` | `stream`, `client`, `token`, `region` | [`registry::Assignment`] |
//! | POST | `/v1/switch` | [`SwitchRequest`] | [`registry::Assignment`] |
//! | POST, DELETE | `/v1/drain/{node}` | | drain on, off |
//! | POST | `/v1/feedback` | [`Feedback`] | |
//! | GET | `/v1/reflectors` | signed by a node | live set reflectors (UDP addresses, and a map to their QUIC addresses), for edges without a static list |
//! | POST | `/v1/renew` | `{"token"}` | `{"token", "expires"}`: the same viewer's token, good for `--token-renew-secs` more |
//! | GET | `/v1/status`, `/` | | JSON, HTML |
//! | GET | `/metrics` (on `--metrics`) | | Prometheus |

pub mod api;
pub mod http_guard;
pub mod registry;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use braid_core::token::Signer;
use braid_net::daemon::DaemonConfig;
use clap::Parser;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::api::{Api, ApiError};
use crate::registry::{Report, SetRule};

/// The control server's configuration.
#[derive(Debug, Clone, Parser, Deserialize, Serialize)]
#[command(name = "braid-control", version, about = "Braid control server")]
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
    /// HTTP address of the API and status page.
    #[arg(long, default_value = "127.0.0.1:7100")]
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Prometheus metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:0")]
    #[serde(default = "default_metrics")]
    pub metrics: SocketAddr,
    /// Viewer tokens are required and checked with this secret (empty: not required).
    #[arg(long, env = "BRAID_TOKEN_SECRET", default_value = "")]
    #[serde(default)]
    pub token_secret: String,
    /// How edges fall in the two sets: `parity`, or port ranges of the even set such as
    /// `9000-9099,9200-9299`.
    #[arg(long, default_value = "parity")]
    #[serde(default = "default_sets")]
    pub sets: String,
    /// A node silent this long is down, ms (default 3000: three missed reports).
    #[arg(long, default_value_t = 3000)]
    #[serde(default = "default_down_ms")]
    pub down_ms: u64,
    /// Viewers the edges report slow are placed on low-cost edges (the lowest
    /// `--cost-tier`) for this long, s, by client id and by network (default 600).
    #[arg(long, default_value_t = 600)]
    #[serde(default = "default_slow_memory_secs")]
    pub slow_memory_secs: u64,
    /// Operator actions (drain, undrain) need `Authorization: Bearer` this token
    /// (`braid-ctl --operator-token`). Empty: operator actions are refused.
    #[arg(
        long,
        env = "BRAID_OPERATOR_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    #[serde(default)]
    pub operator_token: String,
    /// A viewer may renew a token still good (`POST /v1/renew`) for this many seconds from
    /// the renewal (0: no renewal), so long sessions run on short-lived tokens.
    #[arg(long, default_value_t = 300)]
    #[serde(default = "default_renew_secs")]
    pub token_renew_secs: u64,
    /// hls.js for the player page (`/watch/{stream}`), served at `/assets/hls.js` (no
    /// CDN): the file `npm ci --prefix player` installs, or the package's copy.
    #[arg(long, default_value = "/usr/share/braid/hls.min.js")]
    #[serde(default = "default_hls_js")]
    pub hls_js: PathBuf,
    /// The network key (a passphrase, or @file): node reports and the set reflectors'
    /// list are signed with it, and refused without it.
    #[arg(
        long,
        env = "BRAID_NETWORK_KEY",
        default_value = "",
        hide_env_values = true
    )]
    #[serde(default)]
    pub network_key: String,
}

fn default_hls_js() -> PathBuf {
    PathBuf::from("/usr/share/braid/hls.min.js")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7100))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_sets() -> String {
    "parity".into()
}
fn default_slow_memory_secs() -> u64 {
    600
}
fn default_down_ms() -> u64 {
    3000
}
fn default_renew_secs() -> u64 {
    300
}

impl Config {
    fn set_rule(&self) -> anyhow::Result<SetRule> {
        if self.sets == "parity" {
            return Ok(SetRule::Parity);
        }
        let ranges = self
            .sets
            .split(',')
            .map(|r| {
                let (a, b) = r
                    .split_once('-')
                    .with_context(|| format!("set range {r:?} is not LOW-HIGH"))?;
                let (a, b): (u16, u16) = (a.trim().parse()?, b.trim().parse()?);
                anyhow::ensure!(a <= b, "set range {r:?} is empty");
                Ok((a, b))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .context("--sets takes `parity` or port ranges like 9000-9099,9200-9299")?;
        Ok(SetRule::Ranges(ranges))
    }
}

impl DaemonConfig for Config {
    const NAME: &'static str = "braid-control";

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
        self.set_rule()?;
        if self.down_ms < 500 {
            anyhow::bail!("--down-ms below 500 would call nodes down between two reports");
        }
        braid_net::daemon::network_key(&self.network_key).context("--network-key")?;
        Ok(())
    }
}

/// A switch request from a viewer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    /// The viewer.
    pub client: u64,
    /// The stream.
    pub stream: u32,
    /// The primary that failed.
    pub failed: SocketAddr,
    /// Why (bitrate, stall, gaps, out_of_order, drain, ...).
    pub reason: String,
    /// The last sequence number the viewer has.
    #[serde(default)]
    pub last_seq: u64,
    /// The viewer's token.
    #[serde(default)]
    pub token: String,
    /// The viewer's region.
    #[serde(default)]
    pub region: String,
    /// The kind of edge wanted: `any` (a failed edge's replacement), `cheap` or `fast`
    /// (a buffer-aware move: a lower or higher cost tier than `failed`'s, else 409).
    #[serde(default)]
    pub prefer: braid_core::playout::Prefer,
}

/// Probe timings and throughput a viewer measured.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    /// The viewer.
    pub client: u64,
    /// Round trips to candidate edges.
    pub probes: Vec<Probe>,
    /// Throughput it measured, bits per second.
    #[serde(default)]
    pub throughput_bps: u64,
}

/// One probe.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// The edge probed.
    pub edge: SocketAddr,
    /// Its round trip, ms.
    pub rtt_ms: f64,
}

#[derive(Deserialize)]
struct AssignQuery {
    stream: u32,
    #[serde(default)]
    client: u64,
    #[serde(default)]
    token: String,
    #[serde(default)]
    region: String,
}

type Shared = Arc<Mutex<Api>>;

/// An error answer: status and a sentence.
struct HttpError(ApiError);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(serde_json::json!({ "error": self.0.text }))).into_response()
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> HttpError {
        HttpError(e)
    }
}

fn lock(app: &Shared) -> std::sync::MutexGuard<'_, Api> {
    // A panic while holding the lock would be a bug in the registry; keep serving.
    app.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether a node request was signed with the network key (401 otherwise).
fn check_node(
    app: &Shared,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), HttpError> {
    let header = headers
        .get(braid_core::nodeauth::HEADER)
        .and_then(|v| v.to_str().ok());
    lock(app).check_node(Instant::now(), unix_ms(), method, path, header, body)?;
    Ok(())
}

async fn report(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<registry::ReportReply>, HttpError> {
    check_node(&app, "POST", "/v1/report", &headers, &body)?;
    let r: Report = serde_json::from_slice(&body)
        .map_err(|e| HttpError(ApiError::new(400, format!("not a report: {e}"))))?;
    Ok(Json(lock(&app).report(Instant::now(), r)?))
}

async fn assign(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<AssignQuery>,
) -> Result<Json<registry::Assignment>, HttpError> {
    let v = api::AssignRequest {
        stream: q.stream,
        token: &q.token,
        region: &q.region,
        peer: peer.ip(),
        client: q.client,
    };
    let a = lock(&app).assign(Instant::now(), unix_secs(), &v)?;
    Ok(Json(a))
}

async fn switch(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(s): Json<SwitchRequest>,
) -> Result<Json<registry::Assignment>, HttpError> {
    Ok(Json(lock(&app).switch(
        Instant::now(),
        unix_secs(),
        &s,
        peer.ip(),
    )?))
}

async fn drain(
    State(app): State<Shared>,
    headers: HeaderMap,
    UrlPath(node): UrlPath<u64>,
) -> Result<&'static str, HttpError> {
    let mut api = lock(&app);
    api.check_operator(bearer(&headers))?;
    api.drain(node, true)?;
    Ok("draining\n")
}

async fn undrain(
    State(app): State<Shared>,
    headers: HeaderMap,
    UrlPath(node): UrlPath<u64>,
) -> Result<&'static str, HttpError> {
    let mut api = lock(&app);
    api.check_operator(bearer(&headers))?;
    api.drain(node, false)?;
    Ok("serving\n")
}

/// The bearer token of a request's `Authorization` header, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn feedback(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(f): Json<Feedback>,
) -> StatusCode {
    lock(&app).feedback(&f, peer.ip());
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewRequest {
    token: String,
}

async fn renew(
    State(app): State<Shared>,
    Json(r): Json<RenewRequest>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let (token, expires) = lock(&app).renew(&r.token, unix_secs())?;
    Ok(Json(
        serde_json::json!({ "token": token, "expires": expires }),
    ))
}

async fn reflectors(
    State(app): State<Shared>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, HttpError> {
    check_node(&app, "GET", "/v1/reflectors", &headers, b"")?;
    let list = lock(&app).reflectors(Instant::now());
    let udp: Vec<SocketAddr> = list.iter().map(|(u, _)| *u).collect();
    let quic: serde_json::Map<String, serde_json::Value> = list
        .iter()
        .filter_map(|(u, q)| Some((u.to_string(), q.as_ref()?.to_string().into())))
        .collect();
    Ok(Json(serde_json::json!({ "reflectors": udp, "quic": quic })))
}

async fn status_json(State(app): State<Shared>) -> impl IntoResponse {
    Json(lock(&app).registry().status(Instant::now()))
}

/// The operator's console: a page that reads `/v1/status` every 2 s and draws every
/// node, stream, set and switch, with charts of the last minutes.
async fn console() -> impl IntoResponse {
    (
        [(axum::http::header::CACHE_CONTROL, "no-cache")],
        Html(include_str!("console.html")),
    )
}

/// The API router, for tests and for [`run`].
pub fn router(config: &Config) -> anyhow::Result<Router> {
    Ok(routes(shared(config)?, hls_js(config)))
}

/// hls.js, when the configured file is there (the player page says so when it is not).
fn hls_js(config: &Config) -> Option<axum::body::Bytes> {
    match std::fs::read(&config.hls_js) {
        Ok(b) => Some(b.into()),
        Err(e) => {
            tracing::warn!(
                "no hls.js at {} ({e}): the player page cannot play (npm ci --prefix player, then --hls-js player/node_modules/hls.js/dist/hls.min.js)",
                config.hls_js.display()
            );
            None
        }
    }
}

#[derive(Deserialize)]
struct HlsQuery {
    #[serde(default)]
    token: String,
    #[serde(default)]
    region: String,
}

/// `GET /hls/{stream}.m3u8`: the multivariant playlist, its variant on an edge of each set.
async fn hls_multivariant(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<HlsQuery>,
) -> Result<Response, HttpError> {
    let Some(stream) = name
        .strip_suffix(".m3u8")
        .and_then(|s| s.parse::<u32>().ok())
    else {
        return Err(ApiError::new(404, "no such playlist: ask for /hls/{stream}.m3u8").into());
    };
    let text = lock(&app).hls_multivariant(
        Instant::now(),
        unix_secs(),
        stream,
        &q.token,
        &q.region,
        peer.ip(),
    )?;
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/vnd.apple.mpegurl",
            ),
            (axum::http::header::CACHE_CONTROL, "no-store"),
            (axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        text,
    )
        .into_response())
}

async fn watch_page() -> impl IntoResponse {
    (
        [(axum::http::header::CACHE_CONTROL, "no-cache")],
        Html(include_str!("watch.html")),
    )
}

async fn playback(
    State(app): State<Shared>,
    Json(p): Json<api::Playback>,
) -> Result<&'static str, HttpError> {
    lock(&app).playback(Instant::now(), p)?;
    Ok("ok\n")
}

async fn playbacks(State(app): State<Shared>) -> Json<Vec<api::Playback>> {
    Json(lock(&app).playbacks(Instant::now()))
}

fn shared(config: &Config) -> anyhow::Result<Shared> {
    Ok(Arc::new(Mutex::new(
        Api::new(
            config.set_rule()?,
            Duration::from_millis(config.down_ms),
            (!config.token_secret.is_empty()).then(|| Signer::new(&config.token_secret)),
        )
        .with_slow_memory(Duration::from_secs(config.slow_memory_secs))
        .with_operator_token(&config.operator_token)
        .with_token_renewal(config.token_renew_secs)
        .with_node_auth(braid_core::nodeauth::NodeAuth::new(
            &braid_net::daemon::network_key(&config.network_key).context("--network-key")?,
        )),
    )))
}

fn routes(app: Shared, hls_js: Option<axum::body::Bytes>) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/hls/{name}", get(hls_multivariant))
        .route("/watch/{stream}", get(watch_page))
        .route(
            "/assets/hls.js",
            get(move || {
                let js = hls_js.clone();
                async move {
                    match js {
                        Some(b) => (
                            [
                                (axum::http::header::CONTENT_TYPE, "application/javascript"),
                                (axum::http::header::CACHE_CONTROL, "max-age=3600"),
                            ],
                            b,
                        )
                            .into_response(),
                        None => (StatusCode::NOT_FOUND, "hls.js is not installed here\n")
                            .into_response(),
                    }
                }
            }),
        )
        .route("/v1/playback", post(playback).get(playbacks))
        .route("/v1/status", get(status_json))
        .route("/v1/report", post(report))
        .route("/v1/assign", get(assign))
        .route("/v1/switch", post(switch))
        .route("/v1/drain/{node}", post(drain).delete(undrain))
        .route("/v1/feedback", post(feedback))
        .route("/v1/reflectors", get(reflectors))
        .route("/v1/renew", post(renew))
        // No request a viewer, node or operator makes comes near this.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(app)
}

/// Runs the control server until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let app_state = shared(&config)?;
    let app = routes(app_state.clone(), hls_js(&config));
    let metrics_addr = braid_net::daemon::serve_metrics(config.metrics, shutdown.clone()).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let http = listener.local_addr()?;
    braid_net::daemon::print_ready(
        "control",
        &[
            ("http", http.to_string()),
            ("metrics", metrics_addr.to_string()),
        ],
    );
    // Silent nodes are forgotten: the registry does not grow with every id ever seen.
    let keeper = app_state.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => lock(&keeper).housekeeping(Instant::now()),
            }
        }
    });
    // (`tap_io` only so that axum's connect info applies to this listener.)
    axum::serve(
        axum::serve::ListenerExt::tap_io(http_guard::Bounded::new(listener), |_| {}),
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
    .context("serving HTTP")?;
    Ok(())
}
