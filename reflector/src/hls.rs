//! HLS over HTTP at the edge (`--hls-listen`): media playlists, segments and partial
//! segments of every stream, cut by the edge's [`braid_core::hls::Segmenter`]s from the
//! packets it releases into its ring, served from memory.
//!
//! The handlers ask the daemon's task, which owns the edge's machine, over a channel; a
//! request that must wait (a blocking playlist reload, a part not yet complete) waits
//! for the machine's HLS progress to change, at most three target durations. An HLS
//! request keeps its stream open at the edge (subscribed upstream) as a viewer's watch
//! does, for [`crate::edge::HLS_LINGER`] after the last one.
//!
//! | path | answer |
//! |---|---|
//! | `/hls/{stream}/playlist.m3u8[?_HLS_msn=N[&_HLS_part=M]]` | the media playlist (LL-HLS), at once or once it holds segment N (part M) |
//! | `/hls/{stream}/seg/{gen}-{msn}.ts` | a complete segment |
//! | `/hls/{stream}/part/{gen}-{msn}.{part}.ts` | a partial segment (held until complete when it is the next) |
//!
//! `gen` names the segmenter (when it started, ms): a restarted edge's segments never
//! take the URLs of its earlier ones, so segments are cached as immutable. With
//! `--token-secret`, every request carries `token=` (a viewer token for the stream,
//! whichever client it names), and the playlist's URIs carry it on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use braid_core::StreamId;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// What a request asks of the machine.
#[derive(Debug, Clone)]
pub(crate) enum What {
    /// The playlist, once it holds segment `msn` (part `part`) if given; `query` goes on
    /// every URI in it.
    Playlist {
        msn: Option<u64>,
        part: Option<u64>,
        query: String,
    },
    /// A complete segment.
    Segment { generation: u64, msn: u64 },
    /// A partial segment.
    Part {
        generation: u64,
        msn: u64,
        part: usize,
    },
}

/// A request to the daemon's task.
#[derive(Debug)]
pub(crate) struct Ask {
    pub(crate) stream: StreamId,
    pub(crate) what: What,
    pub(crate) reply: oneshot::Sender<Answer>,
}

/// The machine's answer.
#[derive(Debug)]
pub(crate) enum Answer {
    /// The stream holds no segment yet (just opened, or nothing comes for it).
    Empty,
    /// No set reflector carries the stream.
    Unknown,
    /// The edge takes no more streams.
    Refused,
    /// A playlist.
    Playlist(String),
    /// Not yet there; may come (a blocking reload's segment, the next part).
    Wait {
        /// The playlist's target duration: how long it may be waited for is three times
        /// this.
        target: Duration,
    },
    /// Asked further ahead than the specification allows.
    TooFar,
    /// Gone from the window, or never to be (another generation, a part number past).
    Gone,
    /// The bytes.
    Bytes(Vec<Bytes>),
}

/// What the handlers share.
#[derive(Clone)]
struct App {
    asks: mpsc::Sender<Ask>,
    progress: watch::Receiver<u64>,
    tokens: Option<braid_core::token::Signer>,
    /// The edge's ladders: a token for one rendition is good for its ladder's others (a
    /// player moves between them).
    ladders: std::sync::Arc<Vec<Vec<StreamId>>>,
}

/// Longest a request for a stream with no segment yet waits for its first (a cold
/// stream: subscribe upstream, the first keyframe, the first part).
const FIRST_SEGMENT_WAIT: Duration = Duration::from_secs(6);

/// Serves HLS on `addr`; returns the bound address. Requests reach the daemon's task
/// through `asks`; `progress` changes whenever a segmenter completes a part. Tokens are
/// checked when a signer is given, a token for a rendition good for its whole ladder.
pub(crate) async fn serve(
    addr: SocketAddr,
    asks: mpsc::Sender<Ask>,
    progress: watch::Receiver<u64>,
    (tokens, ladders): (Option<braid_core::token::Signer>, Vec<Vec<StreamId>>),
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding HLS {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/hls/{stream}/playlist.m3u8", axum::routing::get(playlist))
        .route("/hls/{stream}/seg/{name}", axum::routing::get(segment))
        .route("/hls/{stream}/part/{name}", axum::routing::get(part))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "not_found", "no such resource") })
        .with_state(App {
            asks,
            progress,
            tokens,
            ladders: std::sync::Arc::new(ladders),
        });
    tokio::spawn(async move {
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = serve.await {
            tracing::warn!("HLS endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

/// An error response, counted by reason.
fn refuse(status: StatusCode, reason: &'static str, text: &str) -> Response {
    metrics::counter!("braid_hls_refused_total", "reason" => reason).increment(1);
    let mut r = (status, format!("{text}\n")).into_response();
    cors(&mut r);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn cors(r: &mut Response) {
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
}

/// A refusal not yet made a response (small, for `Result`s).
struct Refusal(StatusCode, &'static str, String);

impl Refusal {
    fn respond(self) -> Response {
        refuse(self.0, self.1, &self.2)
    }
}

/// The stream id of a path, or a 404.
fn stream_id(raw: &str) -> Result<StreamId, Refusal> {
    raw.parse::<u32>()
        .map(StreamId)
        .map_err(|_| Refusal(StatusCode::NOT_FOUND, "bad_stream", "no such stream".into()))
}

/// Checks the token, when the edge wants one; the query to carry on in the playlist.
fn check_token(
    app: &App,
    stream: StreamId,
    q: &HashMap<String, String>,
) -> Result<String, Refusal> {
    let Some(signer) = &app.tokens else {
        return Ok(String::new());
    };
    let Some(token) = q.get("token") else {
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "token_missing",
            "a viewer token is required (token=)".into(),
        ));
    };
    let now = braid_net::daemon::unix_ms() / 1000;
    let refused = |e: String| {
        Refusal(
            StatusCode::FORBIDDEN,
            "token_refused",
            format!("token: {e}"),
        )
    };
    let claims = signer
        .verify(token, now)
        .map_err(|e| refused(e.to_string()))?;
    if !token_covers(&app.ladders, claims.stream, stream) {
        let e = braid_core::token::TokenError::WrongStream(claims.stream);
        return Err(refused(e.to_string()));
    }
    // Tokens are URL-safe (base64url).
    Ok(format!("?token={token}"))
}

/// Whether a token for stream `claimed` is good for stream `asked`: the same stream, or
/// two renditions of one ladder.
fn token_covers(ladders: &[Vec<StreamId>], claimed: StreamId, asked: StreamId) -> bool {
    claimed == asked
        || ladders
            .iter()
            .any(|l| l.contains(&claimed) && l.contains(&asked))
}

/// Asks the machine until it answers with something other than "wait", or `until`.
async fn ask_until(app: &App, stream: StreamId, what: What, until: Instant) -> Option<Answer> {
    let mut progress = app.progress.clone();
    let started = Instant::now();
    let mut waited = false;
    loop {
        progress.borrow_and_update();
        let (tx, rx) = oneshot::channel();
        let ask = Ask {
            stream,
            what: what.clone(),
            reply: tx,
        };
        app.asks.send(ask).await.ok()?;
        let answer = rx.await.ok()?;
        let limit = match &answer {
            Answer::Wait { target } => (started + *target * 3).min(until),
            Answer::Empty => (started + FIRST_SEGMENT_WAIT).min(until),
            _ => {
                if waited {
                    metrics::counter!("braid_hls_blocked_total").increment(1);
                }
                return Some(answer);
            }
        };
        let now = Instant::now();
        if now >= limit {
            return Some(answer);
        }
        waited = true;
        if tokio::time::timeout(limit - now, progress.changed())
            .await
            .is_err()
        {
            // One last look at the deadline.
            let (tx, rx) = oneshot::channel();
            app.asks
                .send(Ask {
                    stream,
                    what,
                    reply: tx,
                })
                .await
                .ok()?;
            return rx.await.ok();
        }
    }
}

fn number(q: &HashMap<String, String>, key: &str) -> Result<Option<u64>, Refusal> {
    match q.get(key) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            Refusal(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("{key} must be a number"),
            )
        }),
    }
}

async fn playlist(
    State(app): State<App>,
    Path(stream): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    metrics::counter!("braid_hls_requests_total", "kind" => "playlist").increment(1);
    let stream = match stream_id(&stream) {
        Ok(s) => s,
        Err(r) => return r.respond(),
    };
    let query = match check_token(&app, stream, &q) {
        Ok(q) => q,
        Err(r) => return r.respond(),
    };
    let (msn, part) = match (number(&q, "_HLS_msn"), number(&q, "_HLS_part")) {
        (Ok(m), Ok(p)) => (m, p),
        (Err(r), _) | (_, Err(r)) => return r.respond(),
    };
    if part.is_some() && msn.is_none() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "_HLS_part needs _HLS_msn",
        );
    }
    let what = What::Playlist { msn, part, query };
    let until = Instant::now() + Duration::from_secs(30);
    let answer = ask_until(&app, stream, what, until).await;
    if let Some(r) = stream_refusal(answer.as_ref()) {
        return r;
    }
    match answer {
        Some(Answer::Playlist(text)) => {
            let mut r = text.into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/vnd.apple.mpegurl"),
            );
            // A blocking reload's answer stands for that segment; a plain one changes
            // with every part.
            let age = if msn.is_some() {
                "max-age=6"
            } else {
                "max-age=1"
            };
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static(age));
            cors(&mut r);
            r
        }
        Some(Answer::TooFar) => refuse(
            StatusCode::BAD_REQUEST,
            "too_far",
            "_HLS_msn or _HLS_part is further ahead than a client may ask",
        ),
        _ => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "block_timeout",
            "the segment asked for did not come within three target durations",
        ),
    }
}

/// The refusals a playlist and a segment share: no room for the stream here, nothing
/// arriving for it, no set reflector carrying it, the edge stopping.
fn stream_refusal(answer: Option<&Answer>) -> Option<Response> {
    Some(match answer {
        Some(Answer::Refused) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "stream_cap",
            "this edge takes no more streams",
        ),
        Some(Answer::Empty) => refuse(
            StatusCode::NOT_FOUND,
            "no_stream",
            "nothing arrives for this stream",
        ),
        Some(Answer::Unknown) => refuse(
            StatusCode::NOT_FOUND,
            "unknown_stream",
            "no set reflector carries this stream",
        ),
        None => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the edge is stopping",
        ),
        Some(_) => return None,
    })
}

async fn media(
    app: App,
    stream: String,
    q: HashMap<String, String>,
    name: String,
    is_part: bool,
) -> Response {
    let kind = if is_part { "part" } else { "segment" };
    metrics::counter!("braid_hls_requests_total", "kind" => kind).increment(1);
    let stream = match stream_id(&stream) {
        Ok(s) => s,
        Err(r) => return r.respond(),
    };
    if let Err(r) = check_token(&app, stream, &q) {
        return r.respond();
    }
    let Some((generation, msn, part)) = braid_core::hls::parse_name(&name, is_part) else {
        return refuse(StatusCode::NOT_FOUND, "bad_name", "no such segment");
    };
    let what = if is_part {
        What::Part {
            generation,
            msn,
            part,
        }
    } else {
        What::Segment { generation, msn }
    };
    let until = Instant::now() + Duration::from_secs(30);
    let answer = ask_until(&app, stream, what, until).await;
    if let Some(r) = stream_refusal(answer.as_ref()) {
        return r;
    }
    match answer {
        Some(Answer::Bytes(chunks)) => {
            // One copy of the ring's buffers per request: measured faster than writing the
            // packets' buffers one by one (0.70 of nginx against 1.76, BENCHMARKS.md), for
            // the same memory per client.
            let body: Bytes = chunks.concat().into();
            metrics::counter!("braid_hls_sent_bytes_total").increment(body.len() as u64);
            let mut r = body.into_response();
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("video/mp2t"));
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=86400, immutable"),
            );
            cors(&mut r);
            r
        }
        Some(Answer::Wait { .. }) => refuse(
            StatusCode::NOT_FOUND,
            "not_yet",
            "not complete within three target durations",
        ),
        _ => refuse(
            StatusCode::NOT_FOUND,
            "out_of_window",
            "no such segment: out of the window, or another edge's",
        ),
    }
}

async fn segment(
    State(app): State<App>,
    Path((stream, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    media(app, stream, q, name, false).await
}

async fn part(
    State(app): State<App>,
    Path((stream, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    media(app, stream, q, name, true).await
}

/// Answers `what` from `seg` (the stream's segmenter, if it has one yet).
pub(crate) fn answer(
    seg: Option<&braid_core::hls::Segmenter>,
    unknown: bool,
    what: &What,
) -> Answer {
    let Some(seg) = seg.filter(|s| s.first_msn().is_some()) else {
        return if unknown {
            Answer::Unknown
        } else {
            Answer::Empty
        };
    };
    let generation = seg.generation();
    let target = Duration::from_secs(seg.target_duration());
    match what {
        What::Playlist { msn, part, query } => {
            if let Some(msn) = msn {
                match seg.check_block(*msn, *part) {
                    braid_core::hls::Block::TooFar => return Answer::TooFar,
                    braid_core::hls::Block::Wait => return Answer::Wait { target },
                    braid_core::hls::Block::Ready => {}
                }
            }
            match seg.playlist(query) {
                Some(t) => Answer::Playlist(t),
                None => Answer::Empty,
            }
        }
        What::Segment { generation: g, msn } => {
            if *g != generation {
                return Answer::Gone;
            }
            match seg.segment(*msn) {
                Some(b) => Answer::Bytes(b),
                None if seg.upcoming(*msn, None) => Answer::Wait { target },
                None => Answer::Gone,
            }
        }
        What::Part {
            generation: g,
            msn,
            part,
        } => {
            if *g != generation {
                return Answer::Gone;
            }
            match seg.part(*msn, *part) {
                Some(b) => Answer::Bytes(b),
                None if seg.upcoming(*msn, Some(*part)) => Answer::Wait { target },
                None => Answer::Gone,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_for_a_rendition_is_good_for_its_ladder_only() {
        let ladders = vec![
            vec![StreamId(11), StreamId(12), StreamId(13)],
            vec![StreamId(21), StreamId(22)],
        ];
        assert!(token_covers(&ladders, StreamId(11), StreamId(13)));
        assert!(token_covers(&ladders, StreamId(13), StreamId(11)));
        assert!(token_covers(&ladders, StreamId(5), StreamId(5)));
        assert!(!token_covers(&ladders, StreamId(11), StreamId(21)));
        assert!(!token_covers(&ladders, StreamId(5), StreamId(11)));
        assert!(!token_covers(&[], StreamId(11), StreamId(12)));
    }
}
