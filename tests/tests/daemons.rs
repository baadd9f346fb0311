//! Each daemon as a user meets it: sources the capture takes, `--check`, SIGTERM, the
//! edge leaving a stream after its last viewer.

use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use braid_capture::ts::{Synth, SynthConfig};
use braid_tests::{Net, Proc, Spec, bin, compare, metrics};

/// `seconds` of the synthetic stream as a TS file.
fn ts_file(path: &Path, seconds: u32) {
    let mut s = Synth::new(SynthConfig {
        bitrate: 2_000_000,
        fps: 25,
        gop: 25,
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
        source: Some(file.display().to_string()),
        ..Spec::default()
    });
    net.wait_viewers();
    // The file itself is the reference; the tee must equal it too.
    compare::assert_contiguous(&file, &net.path("view0.ts"));
    let tee = std::fs::read(net.path("tee.ts")).expect("tee");
    let src = std::fs::read(&file).expect("file");
    assert!(
        src.starts_with(&tee),
        "the capture sent the file's bytes unchanged"
    );
}

#[test]
fn capture_reads_standard_input() {
    let dir = tempfile_dir();
    let file = dir.join("in.ts");
    ts_file(&file, 30);
    // stdin is not paced: the capture forwards what the pipe gives; the edge's ring and
    // the viewer see a burst. What matters is that the bytes arrive unchanged.
    let net = Net::start(Spec {
        seconds: 6.0,
        viewers: 0,
        capture: false,
        ..Spec::default()
    });
    let viewer = Proc::spawn(
        "viewer",
        "braid-client",
        &[
            "--edge".into(),
            net.edge.udp().to_string(),
            "--out".into(),
            net.path("view.ts").display().to_string(),
            "--duration".into(),
            "6".into(),
        ],
        &net.path("viewer.log"),
    );
    std::thread::sleep(Duration::from_millis(1500));
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
    // Feed at about the stream's rate so nothing overflows a socket buffer.
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
    let start = Instant::now();
    for (i, chunk) in data.chunks(250_000).enumerate() {
        use std::io::Write;
        let due = start + Duration::from_millis(1000 * i as u64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if stdin.write_all(chunk).is_err() || start.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    drop(stdin);
    let status = child.wait().expect("capture exits at end of input");
    assert!(status.success(), "capture ends cleanly when stdin closes");
    let mut viewer = viewer;
    viewer.wait(Duration::from_secs(10));
    compare::assert_contiguous(&file, &net.path("view.ts"));
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
            source: Some(format!("udp://127.0.0.1:{port}")),
            ..Spec::default()
        });
        std::thread::sleep(Duration::from_millis(500));
        let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
        let data = std::fs::read(&file).expect("file");
        // 2 Mbps: 1316 bytes every 5.3 ms.
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
        net.wait_viewers();
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
            "braid-capture",
            &[
                "--check",
                "--network-key",
                "a network key",
                "--stream-key",
                "k",
            ],
            "no entry point",
        ),
        (
            "braid-client",
            &["--check", "--network-key", "a network key"],
            "no edge",
        ),
        (
            "braid-reflector",
            &["--config", "/nonexistent/braid.toml"],
            "nonexistent",
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
    let mut net = Net::start(Spec {
        seconds: 3.0,
        viewers: 1,
        linger_ms: 1000,
        ..Spec::default()
    });
    std::thread::sleep(Duration::from_secs(2));
    let subscribed = |net: &Net| -> f64 {
        net.sets
            .iter()
            .map(|s| metrics::sum(s.metrics(), "braid_stream_subscribers", &[]))
            .sum()
    };
    assert_eq!(
        subscribed(&net),
        3.0,
        "the edge subscribed to all three set reflectors"
    );
    net.wait_viewers();
    // The viewer unsubscribed on exit; the edge lingers 1 s, then leaves.
    let end = Instant::now() + Duration::from_secs(5);
    while subscribed(&net) > 0.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(subscribed(&net), 0.0, "the set reflectors forgot the edge");
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
