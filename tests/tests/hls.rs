//! HLS from the edges (issue 15): an edge started with `--hls-listen` serves a
//! low-latency media playlist of each stream, its segments cut at keyframes from the
//! packets it releases into its ring. What a player downloads is the source's bytes;
//! ffmpeg reads the playlist and decodes it; bad requests get the right status at once,
//! and a blocking reload waits no longer than the specification allows.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use braid_tests::{Net, Spec, compare};

/// The bit rate of the test media (x264 at 1.5 Mbit/s, AAC, in TS).
const BITRATE: u64 = 2_000_000;

/// `seconds` of real H.264/AAC in MPEG-TS from ffmpeg (a keyframe every 2 s).
fn media(path: &Path, seconds: u32) {
    let ok = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440"])
        .args(["-t", &seconds.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "50",
            "-b:v",
            "1500k",
        ])
        .args(["-c:a", "aac", "-f", "mpegts"])
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "ffmpeg made the test media (ops/test.sh installs ffmpeg)"
    );
}

/// `GET url`: status, body, and how long it took.
fn get(url: &str) -> (u16, Vec<u8>, Duration) {
    let t = Instant::now();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut r = agent.get(url).call().expect("the edge answers");
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .expect("a body");
    (status, body, t.elapsed())
}

/// The playlist's segment URIs with their media sequence numbers, and the first number.
fn segments(playlist: &str) -> (u64, Vec<(u64, String)>) {
    let first = playlist
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MEDIA-SEQUENCE:"))
        .and_then(|v| v.parse().ok())
        .expect("a media sequence");
    let segs = playlist
        .lines()
        .filter(|l| l.starts_with("seg/"))
        .map(|l| {
            let msn = l
                .trim_start_matches("seg/")
                .split(['-', '.'])
                .nth(1)
                .and_then(|v| v.parse().ok())
                .expect("a segment number");
            (msn, l.to_owned())
        })
        .collect();
    (first, segs)
}

/// The playlist, once the stream has a segment (a cold stream takes a subscription, a
/// keyframe and a part).
fn first_playlist(base: &str) -> String {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body, _) = get(&format!("{base}/playlist.m3u8"));
        let text = String::from_utf8_lossy(&body).into_owned();
        if status == 200 && text.contains("seg/") {
            return text;
        }
        assert!(
            Instant::now() < end,
            "no playlist with a segment: {status} {text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Fifteen segments (30 s) fetched in order, as a player does, through blocking reloads,
/// are the source's bytes back to back, with no segment missing; ffmpeg reads the same
/// playlist for 30 s (`-c copy`: a remux, so its bytes are its own) and what it wrote
/// decodes without an error.
#[test]
fn hls_segments_are_the_source_byte_for_byte_and_ffmpeg_plays_the_playlist() {
    let dir = braid_tests::test_dir();
    let file = dir.path().join("in.ts");
    media(&file, 60);
    let net = Net::start(Spec {
        seconds: 50.0,
        viewers: 0,
        bitrate: BITRATE,
        source: Some(file.display().to_string()),
        edge_args: vec!["--hls-listen".into(), "127.0.0.1:0".into()],
        ..Spec::default()
    });
    let base = format!("http://{}/hls/1", net.edge.ready["hls"]);
    let playlist = first_playlist(&base);
    assert!(
        playlist.contains("#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES"),
        "{playlist}"
    );
    assert!(
        playlist.contains("#EXT-X-PART-INF:PART-TARGET="),
        "{playlist}"
    );
    assert!(playlist.contains("#EXT-X-PROGRAM-DATE-TIME:"), "{playlist}");
    assert!(
        playlist.contains("#EXT-X-PRELOAD-HINT:TYPE=PART"),
        "{playlist}"
    );
    assert!(playlist.contains(",INDEPENDENT=YES"), "{playlist}");

    // ffmpeg, as any player, reads the playlist while the test fetches too.
    let ff_out = dir.path().join("ffmpeg.ts");
    let ff_log = dir.path().join("ffmpeg.log");
    let child = braid_tests::die_with_parent({
        let mut c = Command::new("ffmpeg");
        c.args(["-hide_banner", "-loglevel", "error", "-y", "-i"])
            .arg(format!("{base}/playlist.m3u8"))
            .args(["-t", "30", "-c", "copy", "-f", "mpegts"])
            .arg(&ff_out)
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(&ff_log).expect("a log"));
        c
    })
    .spawn()
    .expect("ffmpeg");
    // Killed if the test fails first.
    let mut ff = braid_tests::Proc::adopt("ffmpeg", child);

    let (_, segs) = segments(&playlist);
    let mut next = segs.last().expect("a segment").0;
    let mut got = Vec::new();
    let mut fetched = 0;
    let started = Instant::now();
    while fetched < 15 {
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "segments keep coming"
        );
        // A blocking reload: answered once segment `next` is complete.
        let (status, body, took) = get(&format!("{base}/playlist.m3u8?_HLS_msn={next}"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert!(
            took < Duration::from_secs(7),
            "a blocking reload waits at most 3 target durations: {took:?}"
        );
        let text = String::from_utf8_lossy(&body).into_owned();
        let (_, segs) = segments(&text);
        let (msn, uri) = segs
            .iter()
            .find(|(m, _)| *m == next)
            .unwrap_or_else(|| panic!("segment {next} in the playlist answering for it: {text}"))
            .clone();
        let (status, bytes, _) = get(&format!("{base}/{uri}"));
        assert_eq!(status, 200, "{uri}");
        assert_eq!(bytes.len() % 188, 0, "whole TS packets");
        assert_eq!(bytes[0], 0x47);
        got.extend_from_slice(&bytes);
        fetched += 1;
        next = msn + 1;
    }
    let cut = dir.path().join("hls.ts");
    std::fs::write(&cut, &got).expect("write");
    let len = compare::assert_contiguous(&net.path("tee.ts"), &cut);
    assert!(
        len as f64 >= 14.0 * 2.0 * 0.9 * 1_500_000.0 / 8.0,
        "fifteen segments of about 2 s each: {len} bytes"
    );

    // The edge counted what it cut, and no packet was missing from it (its counters are
    // exported every 100 ms).
    std::thread::sleep(Duration::from_millis(300));
    let m = braid_tests::metrics::scrape(net.edge.metrics());
    let sum = |name: &str| braid_tests::metrics::sum_of(&m, name, &[]);
    let hls: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("braid_hls"))
        .collect();
    assert!(
        sum("braid_hls_segments_total") >= 15.0,
        "segments counted: {hls:?}"
    );
    assert!(sum("braid_hls_parts_total") >= 45.0, "parts counted");
    assert_eq!(sum("braid_hls_missing_packets_total"), 0.0);
    assert!(sum("braid_hls_sent_bytes_total") >= got.len() as f64);

    let status = ff.wait(Duration::from_secs(40)).expect("ffmpeg ends");
    let errors = std::fs::read_to_string(&ff_log).unwrap_or_default();
    assert!(status.success(), "ffmpeg read the playlist: {errors}");
    let decode = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-i"])
        .arg(&ff_out)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg decodes");
    let decode_errors = String::from_utf8_lossy(&decode.stderr);
    assert!(
        decode.status.success() && decode_errors.trim().is_empty(),
        "what ffmpeg got from the playlist decodes with no error: {decode_errors}"
    );
    let size = std::fs::metadata(&ff_out).map_or(0, |m| m.len());
    assert!(
        size > 3_500_000,
        "ffmpeg wrote 30 s of the stream ({size} bytes)"
    );
}

/// Bad requests get the right status at once: an unknown stream, a malformed or absurd
/// `_HLS_msn`, a segment of another edge or out of the window, a missing or wrong token;
/// a blocking
/// reload for a segment two ahead waits at most three target durations.
#[test]
fn bad_hls_requests_get_the_right_status_at_once() {
    const SECRET: &str = "hls test token secret";
    let net = Net::start(Spec {
        seconds: 20.0,
        viewers: 0,
        edge_args: vec![
            "--hls-listen".into(),
            "127.0.0.1:0".into(),
            "--hls-window".into(),
            "2".into(),
            "--token-secret".into(),
            SECRET.into(),
        ],
        ..Spec::default()
    });
    let token = braid_core::token::Signer::new(SECRET).sign(&braid_core::token::Claims {
        stream: braid_core::StreamId(1),
        client: braid_core::ClientId(5),
        expires: u64::MAX,
    });
    let other = braid_core::token::Signer::new(SECRET).sign(&braid_core::token::Claims {
        stream: braid_core::StreamId(2),
        client: braid_core::ClientId(5),
        expires: u64::MAX,
    });
    let base = format!("http://{}/hls/1", net.edge.ready["hls"]);
    let quick = |path: &str, want: u16| {
        let (status, body, took) = get(&format!("{base}/{path}"));
        assert_eq!(status, want, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(
            took < Duration::from_millis(500),
            "{path} answered at once ({took:?})"
        );
    };
    quick("playlist.m3u8", 401);
    // A stream no set reflector carries: they say so to the edge at its first subscribe.
    let unknown = braid_core::token::Signer::new(SECRET).sign(&braid_core::token::Claims {
        stream: braid_core::StreamId(99),
        client: braid_core::ClientId(5),
        expires: u64::MAX,
    });
    let (status, body, took) = get(&format!(
        "http://{}/hls/99/playlist.m3u8?token={unknown}",
        net.edge.ready["hls"]
    ));
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(
        took < Duration::from_millis(500),
        "an unknown stream is refused at once ({took:?})"
    );
    quick("playlist.m3u8?token=bogus", 403);
    quick(&format!("playlist.m3u8?token={other}"), 403);
    // The stream warms up with a good token.
    let end = Instant::now() + Duration::from_secs(15);
    let playlist = loop {
        let (status, body, _) = get(&format!("{base}/playlist.m3u8?token={token}"));
        let text = String::from_utf8_lossy(&body).into_owned();
        if status == 200 && text.matches("seg/").count() >= 2 {
            break text;
        }
        assert!(Instant::now() < end, "a playlist: {status} {text}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        playlist.contains(&format!(".ts?token={token}")),
        "URIs carry the token: {playlist}"
    );
    let (first, segs) = segments(&playlist);
    let last = segs.last().expect("a segment").0;
    let (_, uri) = &segs[0];
    let generation = uri
        .trim_start_matches("seg/")
        .split('-')
        .next()
        .expect("generation");
    // Segments are numbered from the wall clock (ten a second since the epoch): an absurd
    // number is one far past the last.
    assert!(last > 10_000_000_000, "numbered by the capture: {last}");
    quick(
        &format!("playlist.m3u8?token={token}&_HLS_msn={}", last + 1_000_000),
        400,
    );
    quick(&format!("playlist.m3u8?token={token}&_HLS_msn=x"), 400);
    quick(&format!("playlist.m3u8?token={token}&_HLS_part=1"), 400);
    quick(&format!("seg/1-{first}.ts?token={token}"), 404);
    quick(&format!("seg/{generation}-{last}.ts"), 401);
    quick(&format!("seg/{generation}-{last}.ts?token={token}"), 200);
    quick(&format!("seg/nonsense?token={token}"), 404);
    quick(&format!("nothing?token={token}"), 404);
    // Out of the window (two segments kept): what was first is gone in a few seconds.
    std::thread::sleep(Duration::from_secs(6));
    quick(&format!("seg/{generation}-{first}.ts?token={token}"), 404);
    // Two segments ahead: answered once it is there, or 503, within 3 target durations.
    let (_, body, _) = get(&format!("{base}/playlist.m3u8?token={token}"));
    let (_, segs) = segments(&String::from_utf8_lossy(&body));
    let ahead = segs.last().expect("a segment").0 + 2;
    let (status, _, took) = get(&format!(
        "{base}/playlist.m3u8?token={token}&_HLS_msn={ahead}"
    ));
    assert!(status == 200 || status == 503, "{status}");
    assert!(
        took <= Duration::from_secs(7),
        "waited {took:?}, at most 3 target durations of 2 s"
    );
    // Every refusal is counted by reason.
    let m = braid_tests::metrics::scrape(net.edge.metrics());
    for reason in [
        "token_missing",
        "token_refused",
        "too_far",
        "bad_query",
        "out_of_window",
    ] {
        assert!(
            braid_tests::metrics::sum_of(
                &m,
                "braid_hls_refused_total",
                &[&format!("reason=\"{reason}\"")]
            ) >= 1.0,
            "{reason} counted"
        );
    }
}

/// Where `npm ci --prefix player` puts hls.js (ops/test.sh runs it).
fn hls_js() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../player/node_modules/hls.js/dist/hls.min.js")
}

/// The player pages' reports at the control server `url`.
fn playbacks(url: &str) -> Vec<serde_json::Value> {
    let (status, body, _) = get(&format!("{url}/v1/playback"));
    assert_eq!(status, 200);
    serde_json::from_slice(&body).expect("JSON")
}

/// Acceptances 1 and 2: headless Chromium (Debian's) opens the control server's player
/// page, which plays the multivariant playlist (the stream on an edge of each set) with
/// hls.js: playback starts within 3 s, runs 60 s with the position advancing, no stall,
/// and at most 2.5 s behind live (from the program date time); then the edge it plays from is
/// killed, and playback goes on from the other set's edge without a reload of the page,
/// its stall (if any) measured.
#[test]
fn a_browser_plays_near_live_and_goes_on_when_its_edge_dies() {
    const TEST: &str = "a_browser_plays_near_live_and_goes_on_when_its_edge_dies";
    if let Some(why) = braid_tests::console::unavailable() {
        eprintln!("SKIPPED {TEST}: {why}");
        return;
    }
    if !hls_js().exists() {
        eprintln!("SKIPPED {TEST}: no hls.js (npm ci --prefix player; ops/test.sh runs it)");
        return;
    }
    let dir = braid_tests::test_dir();
    let file = dir.path().join("in.ts");
    media(&file, 120);
    let mut net = braid_tests::ControlNet::start_with(
        1,
        1,
        110.0,
        "",
        |_| vec!["--hls-listen".into(), "127.0.0.1:0".into()],
        &braid_tests::ControlOptions {
            control_args: vec!["--hls-js".into(), hls_js().display().to_string()],
            capture_args: vec!["--source".into(), file.display().to_string()],
        },
    );
    let url = net.urls()[0].clone();
    // Both edges warm, with a few segments listed (a viewer joins a running stream), and
    // known to the control server.
    for e in &net.edges {
        first_playlist(&format!("http://{}/hls/1", e.ready["hls"]));
    }
    let end = Instant::now() + Duration::from_secs(20);
    for e in &net.edges {
        loop {
            let (_, body, _) = get(&format!("http://{}/hls/1/playlist.m3u8", e.ready["hls"]));
            if String::from_utf8_lossy(&body).matches("#EXTINF").count() >= 3 {
                break;
            }
            assert!(Instant::now() < end, "segments come");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // The two edges (one per set, the page's redundant variants) list the same segment
    // under the same number, as the capture numbered it: a player that moves from one to
    // the other finds its place (numbered on their own, they once differed by one, and
    // the player stalled 8 s after its edge died).
    let lists: Vec<(u64, Vec<(u64, String)>)> = net
        .edges
        .iter()
        .map(|e| {
            let base = format!("http://{}/hls/1", e.ready["hls"]);
            segments(&String::from_utf8_lossy(
                &get(&format!("{base}/playlist.m3u8")).1,
            ))
        })
        .collect();
    let mut same = 0;
    for (msn, uri) in &lists[0].1 {
        let Some((_, other)) = lists[1].1.iter().find(|(m, _)| m == msn) else {
            continue;
        };
        let fetch = |e: &braid_tests::Proc, uri: &str| {
            let (status, body, _) = get(&format!("http://{}/hls/1/{uri}", e.ready["hls"]));
            assert_eq!(status, 200, "{uri}");
            body
        };
        let (a, b) = (fetch(&net.edges[0], uri), fetch(&net.edges[1], other));
        assert!(
            a == b,
            "segment {msn}: {} bytes on one edge, {} on the other, not the same",
            a.len(),
            b.len()
        );
        same += 1;
    }
    assert!(same >= 2, "both edges list segments alike: {lists:?}");
    eprintln!("{same} segments listed alike by both edges");
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body, _) = get(&format!("{url}/hls/1.m3u8"));
        let text = String::from_utf8_lossy(&body).into_owned();
        if status == 200 && text.matches("#EXT-X-STREAM-INF").count() == 2 {
            assert!(text.contains("BANDWIDTH="), "{text}");
            break;
        }
        assert!(
            Instant::now() < end,
            "a multivariant playlist with both sets: {status} {text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let child = braid_tests::die_with_parent({
        let mut c = Command::new("chromium");
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--autoplay-policy=no-user-gesture-required",
            "--remote-debugging-port=0",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("{url}/watch/1"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("chromium.log")).expect("a log"));
        c
    })
    .spawn()
    .expect("chromium starts");
    let _chromium = braid_tests::Proc::adopt("chromium", child);

    // Playback starts, and runs near live without a stall.
    let end = Instant::now() + Duration::from_secs(20);
    let first = loop {
        let p = playbacks(&url);
        if let Some(p) = p.iter().find(|p| p["started_ms"].is_number()) {
            break p.clone();
        }
        assert!(Instant::now() < end, "playback started: {p:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let session = first["session"].clone();
    let started = first["started_ms"].as_f64().expect("started");
    eprintln!("playback started {started:.0} ms after the page loaded");
    assert!(started <= 3000.0, "playback starts within 3 s: {first}");
    // Sixty seconds, the latency sampled every 5 s.
    let mut latencies = Vec::new();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_secs(5));
        let p = playbacks(&url);
        if let Some(l) = p.first().and_then(|p| p["latency_ms"].as_f64()) {
            latencies.push(l);
        }
        if let Some(p) = p.first() {
            eprintln!(
                "t={} latency {} player's {} target {}",
                p["current_time"], p["latency_ms"], p["player_latency_ms"], p["target_latency_ms"]
            );
        }
    }
    latencies.sort_by(f64::total_cmp);
    eprintln!("latency to live over 60 s, sampled every 5 s: {latencies:?}");
    assert!(
        latencies.len() >= 11 && latencies.iter().all(|l| *l <= 2500.0),
        "at most 2.5 s behind live all along: {latencies:?}"
    );
    let before = playbacks(&url);
    assert_eq!(before.len(), 1, "one page, never reloaded: {before:?}");
    let p = &before[0];
    assert_eq!(p["session"], session, "{p}");
    let t1 = p["current_time"].as_f64().expect("time");
    assert!(t1 >= 55.0, "the position advanced with the clock: {p}");
    assert_eq!(p["stalls"], 0, "no stall: {p}");
    assert_eq!(p["fatal_errors"], 0, "no fatal player error: {p}");
    let latency = p["latency_ms"].as_f64().expect("a latency");
    eprintln!("latency to live {latency:.0} ms");
    assert!(latency <= 2500.0, "at most 2.5 s behind live: {p}");
    // The edge it plays from dies.
    let edge = p["edge"].as_str().expect("an edge").to_owned();
    let i = net
        .edges
        .iter()
        .position(|e| e.ready["hls"] == edge)
        .unwrap_or_else(|| panic!("{edge} is one of the edges"));
    net.edges[i].kill();
    std::thread::sleep(Duration::from_secs(15));
    let after = playbacks(&url);
    assert_eq!(after.len(), 1, "the same page, never reloaded: {after:?}");
    let p = &after[0];
    assert_eq!(p["session"], session, "{p}");
    let other = &net.edges[1 - i].ready["hls"];
    assert_eq!(
        p["edge"].as_str(),
        Some(other.as_str()),
        "playing from the other set's edge: {p}"
    );
    let t2 = p["current_time"].as_f64().expect("time");
    eprintln!(
        "after the edge died: {:.1} s more played, stall {} ms in {} stalls",
        t2 - t1,
        p["stall_ms"],
        p["stalls"]
    );
    assert!(t2 - t1 >= 10.0, "playback went on: {t1} then {t2}: {p}");
}
