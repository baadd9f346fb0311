//! Each daemon as a user meets it: sources the capture takes, `--check`, SIGTERM, the
//! edge leaving a stream after its last viewer.

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use braid_capture::ts::{Synth, SynthConfig};
use braid_tests::{Net, Proc, Spec, assert_viewers_exact, bin, compare, metrics, wait_all};

/// The bit rate of the test files.
const FILE_BITRATE: u64 = 2_000_000;

/// `seconds` of the synthetic stream as a TS file.
fn ts_file(path: &Path, seconds: u32) {
    let mut s = Synth::new(SynthConfig {
        bitrate: FILE_BITRATE,
        fps: 25,
        gop: 25,
        run: 0,
        align: false,
    });
    let bytes: Vec<u8> = (0..seconds * 25)
        .flat_map(|_| s.next_frame().to_vec())
        .collect();
    std::fs::write(path, bytes).expect("writing the TS file");
}

#[test]
fn capture_paces_a_file_by_pcr_and_viewers_get_it_exactly() {
    let dir = tempfile_dir();
    let file = dir.join("in.ts");
    ts_file(&file, 14);
    let mut net = Net::start(Spec {
        seconds: 10.0,
        viewers: 1,
        bitrate: FILE_BITRATE,
        source: Some(file.display().to_string()),
        ..Spec::default()
    });
    net.wait_viewers();
    // What the capture sent (its tee) is the file from its start, unchanged, as much as
    // its 13 s run paced by PCR allows; the viewer got that from its start to its end.
    let status = net
        .capture
        .as_mut()
        .expect("a capture")
        .wait(Duration::from_secs(15))
        .expect("the capture ends after its --duration");
    assert!(status.success(), "the capture failed");
    let tee = std::fs::read(net.path("tee.ts")).expect("tee");
    let src = std::fs::read(&file).expect("file");
    assert!(
        src.starts_with(&tee),
        "the capture sent the file's bytes unchanged"
    );
    let sent_s = tee.len() as f64 / (FILE_BITRATE as f64 / 8.0);
    assert!(
        sent_s >= 12.0,
        "the capture sent {sent_s:.2} s of the file in its 13 s run"
    );
    assert_viewers_exact(&net);
    compare::assert_contiguous(&file, &net.path("view0.ts"));
}

#[test]
fn capture_reads_standard_input() {
    let dir = tempfile_dir();
    let file = dir.join("in.ts");
    ts_file(&file, 30);
    // stdin is not paced: the capture forwards what the pipe gives, as it comes. What
    // matters is that the bytes arrive unchanged.
    let net = Net::start(Spec {
        seconds: 6.0,
        viewers: 0,
        capture: false,
        ..Spec::default()
    });
    let mut viewer = Proc::spawn(
        "viewer",
        "braid-client",
        &[
            "--edge".into(),
            net.edge.udp().to_string(),
            "--out".into(),
            net.path("view.ts").display().to_string(),
            "--stats-json".into(),
            net.path("view.json").display().to_string(),
            "--duration".into(),
            "6".into(),
        ],
        &net.path("viewer.log"),
    );
    // The stream starts once the edge has its viewer.
    let joined = metrics::sum_when(
        net.edge.metrics(),
        "braid_edge_viewer_joins_total",
        &[],
        Duration::from_secs(10),
        |v| v >= 1.0,
    );
    assert!(joined >= 1.0, "the viewer reached the edge");
    let mut args = vec![
        "--stream-key".to_string(),
        braid_tests::STREAM_KEY.into(),
        "--source".into(),
        "-".into(),
    ];
    args.extend(["--tee".into(), net.path("tee.ts").display().to_string()]);
    for e in &net.entries {
        args.extend(["--entry".to_string(), e.udp().to_string()]);
    }
    let mut child = Command::new(bin("braid-capture"))
        .args(&args)
        .env("BRAID_NETWORK_KEY", braid_tests::NETWORK_KEY)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(net.path("capture.log")).expect("log"))
        .spawn()
        .expect("capture");
    let mut stdin = child.stdin.take().expect("piped");
    let data = std::fs::read(&file).expect("file");
    // Feed at about the stream's rate (so nothing overflows a socket buffer), in tenths
    // of a second, for 8 s, from a thread of its own, while this one sees the viewer end.
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        let start = Instant::now();
        let mut written = 0;
        for (i, chunk) in data.chunks(25_000).enumerate() {
            let due = start + Duration::from_millis(100 * i as u64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if start.elapsed() > Duration::from_secs(8) || stdin.write_all(chunk).is_err() {
                break;
            }
            written += chunk.len();
        }
        written
    });
    let exit = wait_all([&mut viewer], &net.path("tee.ts"), Duration::from_secs(20))[0];
    let written = feeder.join().expect("feeder");
    let status = child.wait().expect("capture exits at end of input");
    assert!(status.success(), "capture ends cleanly when stdin closes");
    assert!(exit.status.success(), "the viewer failed; see viewer.log");
    // Everything it read, but for the last TS packet, which the input cut short.
    let whole = written - written % 188;
    let tee = std::fs::read(net.path("tee.ts")).expect("tee");
    let data = std::fs::read(&file).expect("file");
    assert!(
        tee == data[..whole],
        "the capture sent {} bytes of the {whole} whole TS packets it read, or other bytes",
        tee.len()
    );
    compare::assert_whole(
        &net.path("tee.ts"),
        &net.path("view.ts"),
        &compare::Whole {
            bytes_per_sec: FILE_BITRATE as f64 / 8.0,
            seconds: 6.0,
            tee_at_exit: exit.tee_len,
        },
    );
    let stats = std::fs::read_to_string(net.path("view.json")).expect("stats");
    let last: serde_json::Value =
        serde_json::from_str(stats.lines().last().expect("a line")).expect("json");
    assert_eq!(last["gaps"], 0, "{last}");
    drop(net);
}

#[test]
fn capture_takes_mpegts_and_rtp_over_udp() {
    for rtp in [false, true] {
        let dir = tempfile_dir();
        let file = dir.join("in.ts");
        ts_file(&file, 10);
        let port = UdpSocket::bind("127.0.0.1:0")
            .expect("a port")
            .local_addr()
            .expect("addr")
            .port();
        let mut net = Net::start(Spec {
            seconds: 6.0,
            viewers: 1,
            bitrate: FILE_BITRATE,
            source: Some(format!("udp://127.0.0.1:{port}")),
            ..Spec::default()
        });
        // The capture's ready line says its UDP input is open: send from a thread of
        // its own, at 2 Mbps (1316 bytes every 5.3 ms), while this one sees the viewer end.
        let data = std::fs::read(&file).expect("file");
        let sender = std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
            let start = Instant::now();
            for (i, chunk) in data.chunks(1316).enumerate() {
                let due = start + Duration::from_micros(5264 * i as u64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if rtp {
                    let mut p = vec![0x80, 33, (i >> 8) as u8, i as u8, 0, 0, 0, 0, 0, 0, 0, 1];
                    p.extend_from_slice(chunk);
                    sock.send_to(&p, ("127.0.0.1", port)).expect("send");
                } else {
                    sock.send_to(chunk, ("127.0.0.1", port)).expect("send");
                }
                if start.elapsed() > Duration::from_secs(9) {
                    break;
                }
            }
        });
        net.wait_viewers();
        sender.join().expect("sender");
        assert_viewers_exact(&net);
        // And what the capture sent is the file's bytes, unchanged.
        compare::assert_contiguous(&file, &net.path("view0.ts"));
    }
}

#[test]
fn check_accepts_good_config_and_refuses_bad_with_a_message() {
    let dir = tempfile_dir();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:0\"\nnetwork_key = \"a network key\"\n[[streams]]\nid = 1\nkey = \"k\"\nreflectors = [\"127.0.0.1:9\"]\n",
    )
    .expect("write");
    let out = Command::new(bin("braid-entrypoint"))
        .args(["--config", good.to_str().expect("utf-8"), "--check"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let cases: &[(&str, &[&str], &str)] = &[
        (
            "braid-entrypoint",
            &["--check", "--network-key", "a network key"],
            "no stream configured",
        ),
        (
            "braid-entrypoint",
            &["--check", "--network-key", "short"],
            "at least 8",
        ),
        (
            "braid-reflector",
            &[
                "--check",
                "--role",
                "edge",
                "--network-key",
                "a network key",
            ],
            "set reflectors",
        ),
        (
            "braid-reflector",
            &["--check", "--role", "middle"],
            "middle",
        ),
        (
            "braid-reflector",
            &[
                "--check",
                "--role",
                "set",
                "--network-key",
                "a network key",
                "--task-threads",
                "65",
            ],
            "task-threads must be at most 64",
        ),
        (
            "braid-capture",
            &["--check", "--stream-key", "k"],
            "no entry point",
        ),
        ("braid-client", &["--check"], "no edge"),
        // A client or a capture never holds the network key.
        (
            "braid-client",
            &["--check", "--network-key", "a network key"],
            "unexpected argument '--network-key'",
        ),
        // A control server takes node reports only with it.
        ("braid-control", &["--check"], "--network-key"),
        (
            "braid-reflector",
            &["--config", "/nonexistent/braid.toml"],
            "nonexistent",
        ),
        // Configurations that would start and then never work.
        (
            "braid-reflector",
            &[
                "--check",
                "--role",
                "edge",
                "--network-key",
                "a network key",
                "--reflector",
                "quic://127.0.0.1:9441",
                "--reflector",
                "127.0.0.1:9102",
            ],
            "take subscriptions only from a certificate they trust",
        ),
        (
            "braid-reflector",
            &[
                "--check",
                "--role",
                "set",
                "--network-key",
                "a network key",
                "--reflector",
                "127.0.0.1:9102",
            ],
            "--reflector is for edges",
        ),
        (
            "braid-capture",
            &[
                "--check",
                "--stream-key",
                "k",
                "--entry",
                "127.0.0.1:9001",
                "--quic-listen",
                "127.0.0.1:0",
            ],
            "needs a certificate",
        ),
        (
            "braid-client",
            &[
                "--check",
                "--edge",
                "127.0.0.1:9200",
                "--quic-listen",
                "127.0.0.1:0",
            ],
            "a client dials its edge",
        ),
    ];
    for (binary, args, expected) in cases {
        let out = Command::new(bin(binary))
            .args(*args)
            .env_remove("BRAID_NETWORK_KEY")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{binary} {args:?} should fail");
        assert!(stderr.contains(expected), "{binary} {args:?}: {stderr}");
    }
    let bad_toml = dir.join("bad.toml");
    std::fs::write(&bad_toml, "role = \"set\"\nwindwo = 3\n").expect("write");
    let out = Command::new(bin("braid-reflector"))
        .args(["--config", bad_toml.to_str().expect("utf-8"), "--check"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("windwo"));
}

/// `--log-json` makes every log line a JSON object a collector can read, with its level,
/// time and message; text stays the default.
#[test]
fn log_json_writes_one_object_per_line() {
    let dir = braid_tests::test_dir();
    let log = dir.path().join("set.log");
    let mut set = Proc::start(
        "set",
        "braid-reflector",
        &[
            "--role".into(),
            "set".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--log-json".into(),
        ],
        &log,
    );
    // A subscription makes it log (at info) that it took a subscriber.
    let codec =
        braid_core::wire::Codec::new(braid_core::wire::Key::derive(braid_tests::NETWORK_KEY));
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket");
    braid_tests::handshake(&sock, set.udp(), |cookie| {
        braid_tests::subscribe(&codec, 5, 3000, cookie)
    })
    .expect("a cookie");
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&log).unwrap_or_default().is_empty()
        && std::time::Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    set.terminate();
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the set reflector logged something");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
        assert!(v["fields"]["message"].is_string(), "{l}");
    }
}

#[test]
fn sigterm_stops_every_daemon_cleanly() {
    let mut net = Net::start(Spec {
        seconds: 3.0,
        viewers: 1,
        ..Spec::default()
    });
    std::thread::sleep(Duration::from_secs(2));
    let procs: Vec<&mut Proc> = net
        .sets
        .iter_mut()
        .chain(net.entries.iter_mut())
        .chain(std::iter::once(&mut net.edge))
        .chain(net.capture.iter_mut())
        .collect();
    for p in procs {
        p.terminate();
        let status = p
            .wait(Duration::from_secs(3))
            .unwrap_or_else(|| panic!("{} ignored SIGTERM", p.name));
        assert!(status.success(), "{} exited with {status}", p.name);
    }
}

#[test]
fn edge_unsubscribes_after_its_last_viewer_and_the_linger() {
    const LINGER: Duration = Duration::from_millis(4000);
    let mut net = Net::start(Spec {
        seconds: 3.0,
        viewers: 1,
        linger_ms: LINGER.as_millis() as u64,
        ..Spec::default()
    });
    let subscribed = |net: &Net| -> f64 {
        net.sets
            .iter()
            .map(|s| metrics::sum(s.metrics(), "braid_stream_subscribers", &[]))
            .sum()
    };
    let end = Instant::now() + Duration::from_secs(10);
    while subscribed(&net) < 3.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        subscribed(&net),
        3.0,
        "the edge subscribed to all three set reflectors"
    );
    net.wait_viewers();
    // The viewer unsubscribed on exit (seen within 20 ms); the edge stays for its linger,
    // then leaves.
    let left = Instant::now();
    let end = left + LINGER + Duration::from_secs(5);
    while subscribed(&net) > 0.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = left.elapsed();
    assert_eq!(subscribed(&net), 0.0, "the set reflectors forgot the edge");
    // A lower bound only: a slow machine makes the edge leave later, never sooner.
    assert!(
        gone + Duration::from_millis(500) >= LINGER,
        "the edge left {gone:?} after its last viewer, before its {LINGER:?} linger"
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "braid-daemons-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A live encoder sends a keyframe's datagrams in a burst: the capture's UDP source takes
/// a burst of 400 whole (its receive buffer), and what its source lost before it (an RTP
/// number skipped) it counts, in RTP datagrams and in TS packets (continuity counters).
#[test]
fn a_bursty_udp_source_is_taken_whole_and_its_losses_counted() {
    let dir = tempfile_dir();
    let file = dir.join("in.ts");
    ts_file(&file, 4);
    let data = std::fs::read(&file).expect("file");
    let port = UdpSocket::bind("127.0.0.1:0")
        .expect("a port")
        .local_addr()
        .expect("addr")
        .port();
    // Nobody listens at the entry point: the capture sends anyway after 3 s, and tees.
    let dead = UdpSocket::bind("127.0.0.1:0").expect("a port");
    let (tee, stats) = (dir.join("tee.ts"), dir.join("stats.json"));
    let args: Vec<String> = [
        "--entry",
        &dead.local_addr().expect("addr").to_string(),
        "--source",
        &format!("udp://127.0.0.1:{port}"),
        "--tee",
        tee.to_str().expect("utf-8"),
        "--stats-json",
        stats.to_str().expect("utf-8"),
        "--stream-key",
        "a stream key",
        "--duration",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut capture = Proc::start("capture", "braid-capture", &args, &dir.join("capture.log"));
    let chunks: Vec<&[u8]> = data.chunks(1316).take(400).collect();
    assert_eq!(chunks.len(), 400, "the file holds 400 datagrams");
    const SKIPPED: usize = 200;
    let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    for (i, chunk) in chunks.iter().enumerate() {
        if i == SKIPPED {
            continue;
        }
        let mut p = vec![0x80, 33, (i >> 8) as u8, i as u8, 0, 0, 0, 0, 0, 0, 0, 1];
        p.extend_from_slice(chunk);
        sock.send_to(&p, ("127.0.0.1", port)).expect("send");
    }
    // Counted where an operator looks, while it runs.
    let lost = metrics::sum_when(
        capture.metrics(),
        "braid_capture_input_lost_total",
        &["kind=\"rtp_datagrams\""],
        Duration::from_secs(5),
        |v| v >= 1.0,
    );
    assert_eq!(lost, 1.0);
    let status = capture
        .wait(Duration::from_secs(20))
        .expect("the capture ends");
    assert!(status.success(), "{status:?}");
    let sent: Vec<u8> = chunks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != SKIPPED)
        .flat_map(|(_, c)| c.to_vec())
        .collect();
    let got = std::fs::read(&tee).expect("tee");
    assert!(
        got == sent,
        "the tee is not what was sent: {} bytes of {}",
        got.len(),
        sent.len()
    );
    // What the skipped datagram held: TS packets with a payload count in continuity.
    let with_payload = chunks[SKIPPED]
        .chunks(188)
        .filter(|p| {
            let pid = (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2]);
            pid != 0x1fff && p[3] & 0x10 != 0
        })
        .count() as u64;
    let text = std::fs::read_to_string(&stats).expect("stats");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a stats line")).expect("JSON");
    assert_eq!(last["input_rtp_lost"], 1, "{last}");
    assert_eq!(last["input_ts_missing"], with_payload, "{last}");
    assert!(
        last["input_continuity_errors"].as_u64() >= Some(1),
        "{last}"
    );
}

/// Acceptance 3 of the robustness issue: ffmpeg encoding 720p with x264 sends its
/// MPEG-TS to the capture over UDP, keyframe bursts and all, and writes its own copy of
/// the same stream (the tee muxer: one encode, two identical outputs). The capture's tee
/// is that copy TS packet for TS packet, and the capture counted no input lost.
#[test]
fn ffmpeg_x264_720p_over_udp_reaches_the_capture_whole() {
    let ok = Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "ffmpeg is not installed: ops/test.sh installs it");
    let dir = tempfile_dir();
    let port = UdpSocket::bind("127.0.0.1:0")
        .expect("a port")
        .local_addr()
        .expect("addr")
        .port();
    // Nobody listens at the entry point: the capture sends anyway after 3 s, and tees.
    let dead = UdpSocket::bind("127.0.0.1:0").expect("a port");
    let (tee, stats, own) = (
        dir.join("tee.ts"),
        dir.join("stats.json"),
        dir.join("ffmpeg.ts"),
    );
    let path = |p: &Path| p.to_str().expect("utf-8").to_string();
    let args: Vec<String> = vec![
        "--entry".into(),
        dead.local_addr().expect("addr").to_string(),
        "--source".into(),
        format!("udp://127.0.0.1:{port}"),
        "--tee".into(),
        path(&tee),
        "--stats-json".into(),
        path(&stats),
        "--stream-key".into(),
        "a stream key".into(),
        "--duration".into(),
        "14".into(),
    ];
    let mut capture = Proc::start("capture", "braid-capture", &args, &dir.join("capture.log"));
    // The capture is ready (its source open and media flowing): the encoder starts.
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25"])
        .args(["-t", "6", "-c:v", "libx264", "-preset", "veryfast"])
        .args(["-b:v", "4M", "-g", "50", "-pix_fmt", "yuv420p"])
        .args(["-map", "0:v", "-f", "tee"])
        .arg(format!(
            "[f=mpegts]{}|[f=mpegts]udp://127.0.0.1:{port}?pkt_size=1316",
            path(&own)
        ))
        .status()
        .expect("running ffmpeg");
    assert!(status.success(), "ffmpeg failed");
    // What is in flight arrives; then the capture stops.
    std::thread::sleep(Duration::from_millis(500));
    capture.terminate();
    assert!(
        capture
            .wait(Duration::from_secs(5))
            .is_some_and(|s| s.success()),
        "the capture stops cleanly on SIGTERM"
    );
    let sent = std::fs::read(&own).expect("ffmpeg's copy");
    let got = std::fs::read(&tee).expect("the capture's tee");
    assert!(sent.len() > 1_000_000, "ffmpeg made {} bytes", sent.len());
    let first_diff = sent
        .chunks(188)
        .zip(got.chunks(188))
        .position(|(a, b)| a != b);
    assert_eq!(
        (first_diff, got.len()),
        (None, sent.len()),
        "the tee is ffmpeg's stream TS packet for TS packet ({} and {} TS packets)",
        got.len() / 188,
        sent.len() / 188
    );
    let text = std::fs::read_to_string(&stats).expect("stats");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a line")).expect("json");
    assert_eq!(last["input_ts_missing"], 0, "{last}");
    assert_eq!(last["input_continuity_errors"], 0, "{last}");
}
