//! Viewers: real media end to end, many viewers, slow viewers, joining mid-stream.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use braid_core::wire::{Body, Codec, Header, Message, Watch, WatchStart};
use braid_core::{NodeId, SeqNo, StreamId};
use braid_tests::{Net, Proc, Spec, bin, compare, crowd, metrics, wait_all};
use bytes::{Bytes, BytesMut};

fn need(tool: &str) {
    let ok = Command::new(tool)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{tool} is not installed: ops/test.sh installs it (apt-get install ffmpeg, as root)"
    );
}

fn client(net: &Net, name: &str, extra: &[&str]) -> Proc {
    let mut args = Vec::new();
    if !extra.contains(&"--edge") {
        args.extend(["--edge".to_string(), net.edge.udp().to_string()]);
    }
    args.extend([
        "--out".into(),
        net.path(&format!("{name}.ts")).display().to_string(),
        "--stats-json".into(),
        net.path(&format!("{name}.json")).display().to_string(),
        "--start-timeout".into(),
        "15".into(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(
        name,
        "braid-client",
        &args,
        &net.path(&format!("{name}.log")),
    )
}

fn last_stats(net: &Net, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(net.path(&format!("{name}.json"))).expect("stats");
    serde_json::from_str(text.lines().last().expect("a line")).expect("json")
}

/// Acceptance 1: ffmpeg makes 20 s of H.264/AAC MPEG-TS in real time into the capture;
/// the client's output is byte-identical to what ffmpeg made and decodes cleanly.
#[test]
fn real_media_from_ffmpeg_is_byte_identical_and_decodes_cleanly() {
    real_media_round_trip(false);
}

/// Acceptance 4 of the QUIC issue: the same round trip with every hop on QUIC (capture →
/// entry points → set reflectors → edge → client) stays byte-identical.
#[test]
fn real_media_over_quic_on_every_hop_is_byte_identical() {
    real_media_round_trip(true);
}

fn real_media_round_trip(quic: bool) {
    need("ffmpeg");
    let net = Net::start(Spec {
        viewers: 0,
        capture: false,
        quic_sets: vec![quic; 3],
        quic_viewers: quic,
        quic_capture: quic,
        ..Spec::default()
    });
    let ca = net.path("certs/ca.pem").display().to_string();
    let mut viewer = if quic {
        let edge = format!("quic://{}", net.edge.quic());
        client(
            &net,
            "view",
            &["--duration", "26", "--edge", &edge, "--tls-ca", &ca],
        )
    } else {
        client(&net, "view", &["--duration", "26"])
    };
    // The output must be all of ffmpeg's: the viewer is at the edge before the first byte.
    let joined = metrics::sum_when(
        net.edge.metrics(),
        "braid_edge_viewer_joins_total",
        &[],
        Duration::from_secs(10),
        |v| v >= 1.0,
    );
    assert_eq!(joined, 1.0, "the viewer reached the edge");
    let mut cap_args = vec![
        "--stream-key".to_string(),
        braid_tests::STREAM_KEY.into(),
        "--source".into(),
        "-".into(),
        "--bind".into(),
        "127.0.0.1:0".into(),
    ];
    for e in &net.entries {
        let to = if quic {
            format!("quic://{}", e.quic())
        } else {
            e.udp().to_string()
        };
        cap_args.extend(["--entry".to_string(), to]);
    }
    if quic {
        cap_args.extend(["--tls-ca".to_string(), ca.clone()]);
    }
    let mut capture = Command::new(bin("braid-capture"))
        .args(&cap_args)
        .env("BRAID_NETWORK_KEY", braid_tests::NETWORK_KEY)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(net.path("capture.log")).expect("log"))
        .spawn()
        .expect("capture");
    let mut ffmpeg = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args([
            "-t",
            "20",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-tune",
            "zerolatency",
            "-g",
            "50",
            "-b:v",
            "2M",
        ])
        .args(["-c:a", "aac", "-b:a", "128k", "-f", "mpegts", "pipe:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(net.path("ffmpeg.log")).expect("log"))
        .spawn()
        .expect("ffmpeg");
    // Tee ffmpeg's output: one copy is the reference, the other goes to the capture.
    let mut from_ffmpeg = ffmpeg.stdout.take().expect("piped");
    let mut to_capture = capture.stdin.take().expect("piped");
    let mut reference = std::fs::File::create(net.path("ffmpeg.ts")).expect("reference");
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from_ffmpeg.read(&mut buf).expect("reading ffmpeg");
        if n == 0 {
            break;
        }
        reference
            .write_all(&buf[..n])
            .expect("writing the reference");
        to_capture
            .write_all(&buf[..n])
            .expect("feeding the capture");
    }
    drop(to_capture);
    assert!(
        ffmpeg.wait().expect("ffmpeg").success(),
        "ffmpeg failed; see {}",
        net.path("ffmpeg.log").display()
    );
    assert!(capture.wait().expect("capture").success(), "capture failed");
    let status = viewer
        .wait(Duration::from_secs(20))
        .expect("the viewer ends");
    assert!(status.success());

    let made = std::fs::read(net.path("ffmpeg.ts")).expect("reference");
    let got = std::fs::read(net.path("view.ts")).expect("output");
    assert!(made.len() > 2_000_000, "ffmpeg made {} bytes", made.len());
    assert!(
        got == made,
        "the client's output ({} bytes) is not what ffmpeg made ({} bytes)",
        got.len(),
        made.len()
    );

    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "debug", "-i"])
        .arg(net.path("view.ts"))
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg decode");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    assert!(
        !log.contains("Continuity check failed"),
        "continuity errors"
    );
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[error]") || l.contains("Error while decoding"))
        .collect();
    assert!(errors.is_empty(), "decode errors: {errors:?}");
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name",
            "-of",
            "csv=p=0",
        ])
        .arg(net.path("view.ts"))
        .output()
        .expect("ffprobe");
    let codecs = String::from_utf8_lossy(&probe.stdout);
    assert!(
        codecs.contains("h264") && codecs.contains("aac"),
        "{codecs}"
    );
    assert!(
        probe.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    if quic {
        for p in net.sets.iter().chain(&net.entries).chain([&net.edge]) {
            let m = p.metrics();
            assert!(
                metrics::sum(m, "braid_quic_datagrams_sent_total", &[]) > 500.0,
                "{} carried the media over QUIC",
                p.name
            );
            assert_eq!(
                metrics::sum(m, "braid_quic_dropped_total", &[]),
                0.0,
                "{}: no datagram dropped",
                p.name
            );
        }
    }
}

/// Acceptance 2: 200 viewers of one 4 Mbps stream on one edge each receive every packet,
/// from the keyframe they start on to the moment they leave.
#[test]
fn two_hundred_viewers_each_receive_every_packet() {
    // Packets per second of the 4 Mbps stream (1316-byte RTP payloads), at least.
    const PACKETS_PER_SEC: f64 = 370.0;
    const WATCH: Duration = Duration::from_secs(10);
    // A viewer's first packet comes within this of its watch request (the edge starts it
    // at the latest keyframe, up to a second of stream back, and bursts it)...
    const START_ALLOWANCE_S: f64 = 1.5;
    // ...and its last within this of when it leaves.
    const END_ALLOWANCE: Duration = Duration::from_secs(1);
    let net = Net::start(Spec {
        viewers: 0,
        seconds: 14.0,
        ..Spec::default()
    });
    // The viewers join a stream that is already flowing.
    std::thread::sleep(Duration::from_secs(2));
    let crowd = crowd::Crowd::start(net.edge.udp(), 200);
    std::thread::sleep(WATCH);
    let seen = crowd.finish();
    assert_eq!(seen.len(), 200);
    let floor = PACKETS_PER_SEC * (WATCH.as_secs_f64() - START_ALLOWANCE_S);
    for (i, s) in seen.iter().enumerate() {
        assert!(s.errors.is_empty(), "viewer {i} refused: {:?}", s.errors);
        assert!(
            s.starts_on_keyframe,
            "viewer {i} did not start on a keyframe: it missed the start of its stream"
        );
        assert_eq!(s.missing(), 0, "viewer {i} missed packets");
        assert!(
            s.seqs.len() as f64 >= floor,
            "viewer {i} got only {} packets in {WATCH:?} (at least {floor:.0} expected)",
            s.seqs.len()
        );
        let (Some(last), Some(stopped)) = (s.last_at, s.stopped) else {
            panic!("viewer {i} got nothing");
        };
        assert!(
            stopped.duration_since(last) <= END_ALLOWANCE,
            "viewer {i}'s stream stopped {:?} before it left: it missed the end",
            stopped.duration_since(last)
        );
    }
    let edge = net.edge.metrics();
    assert_eq!(
        metrics::sum(edge, "braid_edge_viewer_skips_total", &[]),
        0.0
    );
    assert_eq!(metrics::sum(edge, "braid_udp_send_failed_total", &[]), 0.0);
}

/// Acceptance 3: a viewer that stops reading (TCP, and UDP with a full socket buffer) is
/// skipped forward and counted; the other viewers lose nothing.
#[test]
fn a_viewer_that_stops_reading_is_skipped_and_the_others_lose_nothing() {
    let mut net = Net::start(Spec {
        viewers: 0,
        seconds: 22.0,
        ..Spec::default()
    });
    let mut good_udp = client(&net, "good-udp", &["--duration", "18"]);
    let tcp_addr = net.edge.ready["tcp"].clone();
    // The edge serves TCP on the same port number as UDP.
    assert_eq!(tcp_addr, net.edge.udp().to_string());
    let mut good_tcp = client(
        &net,
        "good-tcp",
        &["--duration", "18", "--transport", "tcp"],
    );
    // A UDP viewer that stops reading from 3 s to 12 s, and a TCP one.
    let mut stalled_udp = client(&net, "stalled-udp", &["--duration", "18", "--stall", "3:9"]);
    let mut stalled_tcp_client = client(
        &net,
        "stalled-tcp",
        &["--duration", "18", "--stall", "3:9", "--transport", "tcp"],
    );
    // A TCP viewer that asks for the stream and never reads, with a small receive buffer.
    let stalled_tcp = {
        let mut s = socket2_connect(&tcp_addr);
        let codec = Codec::viewer();
        let watch = |cookie| {
            let mut out = BytesMut::new();
            codec
                .encode_frame(
                    &Message {
                        header: Header {
                            stream: StreamId(1),
                            ..Header::default()
                        },
                        body: Body::Watch(Watch {
                            node: NodeId(77),
                            lease_ms: 10_000,
                            start: WatchStart::Keyframe,
                            seq: SeqNo(0),
                            acked: SeqNo(0),
                            cookie,
                            token: Bytes::new(),
                            received: None,
                            policy: None,
                            fits_kbps: None,
                            rendition: None,
                        }),
                    },
                    &mut out,
                )
                .expect("encodes");
            out
        };
        // The cookie handshake a viewer does on any transport, then it never reads.
        s.write_all(&watch([0; 16])).expect("send watch");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("a read timeout");
        let mut buf = BytesMut::new();
        let cookie = loop {
            let mut chunk = [0u8; 512];
            let n = std::io::Read::read(&mut s, &mut chunk).expect("the edge answers");
            assert!(n > 0, "the edge closed the connection");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(Message {
                body: Body::Cookie { cookie },
                ..
            }) = codec.decode_frame(&mut buf).expect("a frame")
            {
                break cookie;
            }
        };
        s.write_all(&watch(cookie)).expect("send watch");
        s
    };
    let exits = wait_all(
        [
            &mut good_udp,
            &mut good_tcp,
            &mut stalled_udp,
            &mut stalled_tcp_client,
        ],
        &net.path("tee.ts"),
        Duration::from_secs(30),
    );
    for (v, exit) in [&good_udp, &good_tcp, &stalled_udp, &stalled_tcp_client]
        .iter()
        .zip(&exits)
    {
        assert!(exit.status.success(), "{} failed", v.name);
    }
    let edge = net.edge.metrics();
    // The TCP viewer's queue filled and the ring overtook it; the UDP one went silent
    // longer than its lease, was forgotten, and resumed past what the edge still held.
    let skips = metrics::sum(edge, "braid_edge_viewer_skips_total", &[]);
    assert!(
        skips >= 1.0,
        "the stalled TCP viewer was skipped forward ({skips} skips)"
    );
    assert!(metrics::sum(edge, "braid_edge_viewer_skipped_packets_total", &[]) > 0.0);
    assert!(
        metrics::sum(edge, "braid_edge_resume_missed_packets_total", &[]) > 0.0,
        "the stalled UDP viewer resumed past the ring, counted"
    );
    let stalled = last_stats(&net, "stalled-udp");
    assert!(
        stalled["skips"].as_u64() >= Some(1),
        "the stalled UDP viewer was told: {stalled}"
    );
    // Over TCP every packet it missed was a skip it was told of, none a gap, and its
    // output is whole on both sides of each skip.
    let stalled = last_stats(&net, "stalled-tcp");
    assert!(
        stalled["skips"].as_u64() >= Some(1),
        "the stalled TCP viewer was told: {stalled}"
    );
    assert_eq!(stalled["gaps"], 0, "{stalled}");
    let (missing, spanned) =
        compare::missing_ts_packets(&net.path("tee.ts"), &net.path("stalled-tcp.ts"));
    let skipped_ts = stalled["skipped"].as_u64().expect("skipped") as usize;
    assert!(
        missing <= skipped_ts * 7 && missing > 0,
        "{missing} TS packets of {spanned} missing; {skipped_ts} RTP packets skipped"
    );
    for (name, exit) in ["good-udp", "good-tcp"].iter().zip(&exits) {
        let st = last_stats(&net, name);
        assert_eq!(st["gaps"], 0, "{name}: {st}");
        assert_eq!(st["skips"], 0, "{name}: {st}");
        compare::assert_whole(
            &net.path("tee.ts"),
            &net.path(&format!("{name}.ts")),
            &compare::Whole {
                bytes_per_sec: net.spec.bitrate as f64 / 8.0,
                seconds: 18.0,
                tee_at_exit: exit.tee_len,
            },
        );
    }
    drop(stalled_tcp);
    net.viewers.clear();
}

fn socket2_connect(addr: &str) -> std::net::TcpStream {
    // A small receive buffer, so the edge's queue for it fills within seconds.
    let addr: std::net::SocketAddr = addr.parse().expect("tcp address");
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
    s.connect(&addr.into()).expect("connect");
    s.into()
}

/// Acceptance 4: a viewer joining mid-stream starts on a keyframe, with the tables first.
#[test]
fn a_viewer_joining_mid_stream_starts_on_a_keyframe() {
    let net = Net::start(Spec {
        viewers: 0,
        seconds: 12.0,
        ..Spec::default()
    });
    // The edge serves someone already; the late viewer joins 5 s in.
    let early = client(&net, "early", &["--duration", "10"]);
    std::thread::sleep(Duration::from_secs(5));
    let mut late = client(&net, "late", &["--duration", "4"]);
    assert!(late.wait(Duration::from_secs(20)).expect("ends").success());
    let out = std::fs::read(net.path("late.ts")).expect("output");
    assert!(out.len() > 188 * 100);
    let pid = |p: &[u8]| (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2]);
    assert_eq!(pid(&out[..188]), 0, "the first packet is the PAT");
    // The first packet of the data PID carries the random access indicator.
    let first_data = out
        .chunks(188)
        .find(|p| pid(p) == 0x100)
        .expect("data packets");
    assert!(
        first_data[3] & 0x20 != 0 && first_data[5] & 0x40 != 0,
        "starts on a random access point"
    );
    let st = last_stats(&net, "late");
    assert!(st["join_ms"].as_u64().is_some(), "{st}");
    drop(early);
}

/// Caps: a viewer over an edge's per-stream cap is refused with a message that says why,
/// and the client exits non-zero with it; so does a client whose edge does not answer.
#[test]
fn refusals_are_clear() {
    let net = Net::start(Spec {
        viewers: 0,
        seconds: 10.0,
        sets: 2,
        ..Spec::default()
    });
    // A second edge with a cap of one viewer per stream.
    let mut args = vec![
        "--role".to_string(),
        "edge".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--max-per-stream".into(),
        "1".into(),
    ];
    for s in &net.sets {
        args.extend(["--reflector".to_string(), s.udp().to_string()]);
    }
    let capped = Proc::start("capped", "braid-reflector", &args, &net.path("capped.log"));
    let viewer = |name: &str, edge: String| {
        Command::new(bin("braid-client"))
            .args([
                "--edge",
                &edge,
                "--duration",
                "4",
                "--start-timeout",
                "3",
                "--out",
            ])
            .arg(net.path(&format!("{name}.ts")))
            .env("BRAID_NETWORK_KEY", braid_tests::NETWORK_KEY)
            .stderr(Stdio::piped())
            .spawn()
            .expect("client")
    };
    let first = viewer("first", capped.udp().to_string());
    let joined = metrics::sum_when(
        capped.metrics(),
        "braid_edge_viewer_joins_total",
        &[],
        Duration::from_secs(10),
        |v| v >= 1.0,
    );
    assert_eq!(joined, 1.0, "the first viewer was taken");
    let second = viewer("second", capped.udp().to_string())
        .wait_with_output()
        .expect("second");
    assert!(!second.status.success());
    let msg = String::from_utf8_lossy(&second.stderr);
    assert!(msg.contains("too many viewers for this stream"), "{msg}");
    assert!(
        first.wait_with_output().expect("first").status.success(),
        "the first viewer was served"
    );
    assert!(
        metrics::sum_when(
            capped.metrics(),
            "braid_dropped_total",
            &["reason=\"viewer_cap\""],
            Duration::from_secs(5),
            |v| v >= 1.0,
        ) >= 1.0
    );

    // Nobody listens on this port.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("a port")
        .local_addr()
        .expect("addr");
    let out = viewer("dead", dead.to_string())
        .wait_with_output()
        .expect("dead");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no stream from edge"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A run shorter than the start timeout that got nothing failed all the same.
    let out = Command::new(bin("braid-client"))
        .args([
            "--edge",
            &dead.to_string(),
            "--duration",
            "1",
            "--start-timeout",
            "5",
        ])
        .arg("--out")
        .arg(net.path("short.ts"))
        .env("BRAID_NETWORK_KEY", braid_tests::NETWORK_KEY)
        .output()
        .expect("short");
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{msg}");
    assert!(msg.contains("no stream came within the 1.0 s run"), "{msg}");
}

/// Trust issue: TCP connections to an edge are capped per address (32), and one that
/// says nothing is closed after 10 s: 40 idle connections from one address cannot hold
/// the edge's descriptors. Refusals and closes are counted.
#[test]
fn idle_tcp_connections_are_capped_per_address_and_closed() {
    let net = Net::start(Spec {
        seconds: 16.0,
        viewers: 0,
        ..Spec::default()
    });
    let conns: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(net.edge.udp()).expect("connects"))
        .collect();
    let refused = metrics::sum_when(
        net.edge.metrics(),
        "braid_tcp_refused_total",
        &["reason=\"per_ip\""],
        Duration::from_secs(5),
        |v| v >= 8.0,
    );
    assert_eq!(refused, 8.0, "32 taken from one address, 8 refused");
    let closed = metrics::sum_when(
        net.edge.metrics(),
        "braid_tcp_closed_total",
        &["reason=\"idle\""],
        Duration::from_secs(15),
        |v| v >= 32.0,
    );
    assert_eq!(closed, 32.0, "every idle connection closed after 10 s");
    drop(conns);
}
