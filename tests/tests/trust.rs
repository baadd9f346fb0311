//! Issue 12: the trust model, tried with real processes as the party who would try each
//! attack (an outsider with nothing, a viewer with a token, a source with its stream
//! key): nothing gets in, and the legitimate viewers' output stays byte-identical.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use braid_core::token::{Claims, Signer};
use braid_core::wire::rtp::{Fields, PAYLOAD_TYPE_MP2T};
use braid_core::wire::{
    Body, Codec, Cookie, Flags, Header, Key, Message, Rtp, SeqRange, Watch, WatchStart,
};
use braid_core::{ClientId, NodeId, PathId, SeqNo, StreamId};
use braid_tests::{Net, Proc, Spec, assert_viewers_exact, crowd, metrics};
use bytes::{Bytes, BytesMut};

/// A media message of stream 1 numbered `seq`, signed by `codec`'s party: what a forger
/// would send (a payload of TS null-looking bytes that is not the source's).
fn forged_media(codec: &Codec, seq: u64) -> Bytes {
    forged_media_of(codec, seq, 0xbad)
}

/// The same, in source session `ssrc`.
fn forged_media_of(codec: &Codec, seq: u64, ssrc: u32) -> Bytes {
    let seq = SeqNo(seq);
    let rtp = Rtp::build(
        Fields {
            marker: false,
            payload_type: PAYLOAD_TYPE_MP2T,
            seq: seq.low(),
            timestamp: 0,
            ssrc,
        },
        &[0x47; 188 * 7],
    );
    let mut out = BytesMut::new();
    codec
        .encode_media(
            Header {
                stream: StreamId(1),
                path: PathId(0),
                flags: Flags::KEYFRAME,
            },
            seq,
            &rtp,
            &mut out,
        )
        .expect("encodes");
    out.freeze()
}

fn subscribe(codec: &Codec, cookie: Cookie) -> Bytes {
    braid_tests::subscribe(codec, 66, 10_000, cookie)
}

fn watch(id: u64, cookie: Cookie, token: &str) -> Message {
    Message {
        header: Header {
            stream: StreamId(1),
            ..Header::default()
        },
        body: Body::Watch(Watch {
            node: NodeId(id),
            lease_ms: 10_000,
            start: WatchStart::Keyframe,
            seq: SeqNo(0),
            acked: SeqNo(0),
            cookie,
            token: Bytes::copy_from_slice(token.as_bytes()),
            received: None,
            policy: None,
            fits_kbps: None,
            rendition: None,
        }),
    }
}

fn encode(codec: &Codec, m: &Message) -> Bytes {
    let mut out = BytesMut::new();
    codec.encode(m, &mut out).expect("encodes");
    out.freeze()
}

/// What arrives on `sock` for `d`: datagrams, bytes, and media messages among them.
fn listen(sock: &UdpSocket, d: Duration) -> (usize, usize, usize) {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("a timeout");
    let end = Instant::now() + d;
    let (mut n, mut bytes, mut media) = (0, 0, 0);
    let mut buf = [0u8; 9000];
    while Instant::now() < end {
        if let Ok(len) = sock.recv(&mut buf) {
            n += 1;
            bytes += len;
            if buf[1] == 1 {
                media += 1;
            }
        }
    }
    (n, bytes, media)
}

/// The newest sequence number the edge serves now (a viewer of one second).
fn current_seq(edge: SocketAddr) -> u64 {
    current(edge).0
}

/// The newest sequence number the edge serves now, and its source session.
fn current(edge: SocketAddr) -> (u64, u32) {
    let c = crowd::Crowd::start(edge, 1);
    std::thread::sleep(Duration::from_secs(1));
    let seen = c.finish();
    let seq = *seen[0]
        .seqs
        .iter()
        .max()
        .expect("the edge serves the stream");
    (seq, seen[0].ssrc.expect("a session"))
}

fn dropped(p: &Proc, reason: &str) -> f64 {
    metrics::sum(
        p.metrics(),
        "braid_dropped_total",
        &[&format!("reason=\"{reason}\"")],
    )
}

/// A viewer holds no network key and a source only its stream's key: media and
/// subscriptions they sign are never taken as a node's, by any set reflector or the
/// edge, even numbered just ahead of the stream or a billion ahead of it.
#[test]
fn a_viewer_or_a_source_cannot_speak_as_a_node() {
    let mut net = Net::start(Spec {
        seconds: 16.0,
        viewers: 2,
        ..Spec::default()
    });
    std::thread::sleep(Duration::from_secs(3));
    let rss = |net: &Net| -> Vec<f64> {
        net.sets
            .iter()
            .chain([&net.edge])
            .map(|p| braid_tests::rss_kib(p.pid()))
            .collect()
    };
    let before = rss(&net);
    let (now, ssrc) = current(net.edge.udp());
    let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let viewer = Codec::viewer();
    let source = Codec::source(braid_tests::STREAM_KEY);
    let targets: Vec<SocketAddr> = net
        .sets
        .iter()
        .map(Proc::udp)
        .chain([net.edge.udp()])
        .collect();
    let mut sent = 0;
    for k in 0..400u64 {
        for to in &targets {
            // Numbers the stream is about to reach (a forged packet taken first would
            // take the real one's place), and one a billion ahead.
            for seq in [now + 40 + k, now + 1_000_000_000 + k] {
                sock.send_to(&forged_media(&viewer, seq), to).expect("send");
                sock.send_to(&forged_media(&source, seq), to).expect("send");
                sent += 2;
            }
        }
        if k % 50 == 0 {
            for to in &targets {
                sock.send_to(&subscribe(&viewer, [0; 16]), to)
                    .expect("send");
                sock.send_to(&subscribe(&source, [0; 16]), to)
                    .expect("send");
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, _, media) = listen(&sock, Duration::from_millis(500));
    assert_eq!(media, 0, "no media reached the forger");
    // Even a node's word (the network key: a compromised node, or a bug) that the
    // stream's session is a billion packets ahead is not believed while the other paths
    // say otherwise.
    let node = Codec::new(Key::derive(braid_tests::NETWORK_KEY));
    for k in 0..200u64 {
        for set in &net.sets {
            let m = forged_media_of(&node, now + 1_000_000_000 + k, ssrc);
            sock.send_to(&m, set.udp()).expect("send");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Memory stays where it was: nothing forged is held anywhere.
    for (b, a) in before.iter().zip(rss(&net)) {
        assert!(a < b + 20_000.0, "memory bounded: {b} kB -> {a} kB");
    }
    net.wait_viewers();
    assert_viewers_exact(&net);
    for set in &net.sets {
        let held = metrics::sum(set.metrics(), "braid_merge_unconfirmed_jumps_total", &[]);
        assert!(
            held >= 200.0,
            "{}: the far jump was not believed ({held})",
            set.name
        );
        assert_eq!(
            metrics::sum(set.metrics(), "braid_merge_jumps_total", &[]),
            0.0
        );
    }
    for p in net.sets.iter().chain([&net.edge]) {
        let refused = dropped(p, "not_a_node") + dropped(p, "bad_tag");
        assert!(
            refused >= f64::from(sent / 4 / targets.len() as u32),
            "{}: forgeries counted ({refused})",
            p.name
        );
    }
}

/// A message recorded on the way (a subscription's refresh, a watch over UDP or TCP, a
/// publish) and sent again from another address or connection gets a cookie and
/// nothing more: no stream, no publisher's rights.
#[test]
fn recorded_messages_are_worth_nothing_from_elsewhere() {
    let mut net = Net::start(Spec {
        seconds: 14.0,
        viewers: 1,
        ..Spec::default()
    });
    std::thread::sleep(Duration::from_secs(2));
    let node = Codec::new(Key::derive(braid_tests::NETWORK_KEY));
    let viewer = Codec::viewer();
    let (a, b) = (
        UdpSocket::bind("127.0.0.1:0").expect("a socket"),
        UdpSocket::bind("127.0.0.1:0").expect("a socket"),
    );
    // A subscription made by `a` (as an edge would), replayed from `b`.
    let set = net.sets[0].udp();
    let cookie = braid_tests::handshake(&a, set, |c| subscribe(&node, c)).expect("a cookie");
    let replayed = subscribe(&node, cookie);
    for _ in 0..5 {
        b.send_to(&replayed, set).expect("send");
    }
    let (n, _, media) = listen(&b, Duration::from_secs(2));
    assert_eq!(media, 0, "the replayed subscription got no stream");
    assert!(n <= 5, "a cookie per replay at most ({n})");
    // `a`, whose address it is, gets the stream.
    let (_, _, media) = listen(&a, Duration::from_secs(1));
    assert!(media > 0, "the subscriber itself is served");
    a.send_to(
        &braid_tests::message(&node, Body::Unsubscribe { node: NodeId(66) }),
        set,
    )
    .expect("send");

    // A viewer's watch over UDP, replayed from another address.
    let edge = net.edge.udp();
    let c = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let w = |cookie| encode(&viewer, &watch(5, cookie, ""));
    let cookie = braid_tests::handshake(&c, edge, w).expect("a cookie");
    let d = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    for _ in 0..5 {
        d.send_to(&w(cookie), edge).expect("send");
    }
    let (n, _, media) = listen(&d, Duration::from_secs(2));
    assert_eq!(media, 0, "the replayed watch got no stream");
    assert!(n <= 5, "a cookie per replay at most ({n})");

    // A watch over TCP, replayed on another connection.
    let tcp: SocketAddr = net.edge.ready["tcp"]
        .parse()
        .expect("the edge's TCP address");
    let frame = |cookie| {
        let mut out = BytesMut::new();
        viewer
            .encode_frame(&watch(6, cookie, ""), &mut out)
            .expect("encodes");
        out
    };
    let read_frames = |s: &mut std::net::TcpStream, d: Duration| -> Vec<Message> {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a timeout");
        let end = Instant::now() + d;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n @ 1..) = s.read(&mut chunk) {
                buf.extend_from_slice(&chunk[..n]);
            }
            while let Ok(Some(m)) = viewer.decode_frame(&mut buf) {
                out.push(m);
            }
        }
        out
    };
    let mut first = std::net::TcpStream::connect(tcp).expect("connect");
    std::io::Write::write_all(&mut first, &frame([0; 16])).expect("send");
    let got = read_frames(&mut first, Duration::from_millis(500));
    let cookie = got
        .iter()
        .find_map(|m| match m.body {
            Body::Cookie { cookie } => Some(cookie),
            _ => None,
        })
        .expect("the edge sends its cookie first");
    let mut second = std::net::TcpStream::connect(tcp).expect("connect");
    std::io::Write::write_all(&mut second, &frame(cookie)).expect("send");
    let got = read_frames(&mut second, Duration::from_secs(2));
    assert!(
        got.iter().all(|m| matches!(m.body, Body::Cookie { .. })),
        "a watch replayed on another connection gets a cookie only: {got:?}"
    );
    // On its own connection the cookie works.
    std::io::Write::write_all(&mut first, &frame(cookie)).expect("send");
    let got = read_frames(&mut first, Duration::from_secs(1));
    assert!(got.iter().any(|m| matches!(m.body, Body::Media(_))));
    drop((first, second));

    // A publish recorded from the source's address, replayed from another, with media
    // signed by the stream's key (a source's credential, stolen): nothing forwarded.
    let entry = net.entries[0].udp();
    let src = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let publisher =
        braid_tests::Publisher::start(&src, &[entry], braid_tests::STREAM_KEY).expect("publishes");
    let cookie = braid_tests::handshake(&src, entry, |c| {
        braid_tests::message(publisher.codec(), Body::Publish { cookie: c })
    })
    .expect("a cookie");
    let thief = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let recorded = braid_tests::message(publisher.codec(), Body::Publish { cookie });
    let now = current_seq(net.edge.udp());
    for k in 0..200 {
        thief.send_to(&recorded, entry).expect("send");
        thief
            .send_to(&forged_media(publisher.codec(), now + 40 + k), entry)
            .expect("send");
        std::thread::sleep(Duration::from_millis(5));
    }
    net.wait_viewers();
    assert_viewers_exact(&net);
    assert!(dropped(&net.entries[0], "cookie_missing") >= 200.0);
    assert!(dropped(&net.entries[0], "unpublished") >= 200.0);
}

/// Until an address shows it receives, a node sends it at most about three times the
/// bytes it got from it: a watch, a NACK and a subscription from an address nobody
/// validated (a spoofed victim's) get a cookie, or nothing.
#[test]
fn unvalidated_addresses_get_no_amplification() {
    let net = Net::start(Spec {
        seconds: 10.0,
        viewers: 1,
        ..Spec::default()
    });
    std::thread::sleep(Duration::from_secs(2));
    let node = Codec::new(Key::derive(braid_tests::NETWORK_KEY));
    let viewer = Codec::viewer();
    let nack = braid_tests::message(
        &viewer,
        Body::Nack(vec![SeqRange {
            first: SeqNo(current_seq(net.edge.udp()) - 300),
            count: 256,
        }]),
    );
    let cases: Vec<(&str, Bytes, SocketAddr)> = vec![
        (
            "watch",
            encode(&viewer, &watch(9, [0; 16], "")),
            net.edge.udp(),
        ),
        ("nack", nack, net.edge.udp()),
        ("subscribe", subscribe(&node, [0; 16]), net.sets[0].udp()),
    ];
    for (what, msg, to) in cases {
        let victim = UdpSocket::bind("127.0.0.1:0").expect("a socket");
        let mut sent = 0;
        for _ in 0..20 {
            victim.send_to(&msg, to).expect("send");
            sent += msg.len();
            std::thread::sleep(Duration::from_millis(50));
        }
        let (_, got, media) = listen(&victim, Duration::from_secs(2));
        eprintln!("{what}: {sent} bytes sent, {got} received");
        assert_eq!(media, 0, "{what}: no media to an unvalidated address");
        assert!(got <= 3 * sent, "{what}: {got} bytes back for {sent}");
    }
}

/// A token is checked again when it expires: a viewer whose token lapses is cut off
/// within about two seconds, one whose token is good watches on, and a token issued to
/// another viewer is refused.
#[test]
fn an_expired_token_ends_the_session() {
    const SECRET: &str = "trust test token secret";
    let mut net = Net::start(Spec {
        seconds: 14.0,
        viewers: 0,
        edge_args: vec!["--token-secret".into(), SECRET.into()],
        ..Spec::default()
    });
    let signer = Signer::new(SECRET);
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token = |client: u64, secs: u64| {
        signer.sign(&Claims {
            stream: StreamId(1),
            client: ClientId(client),
            expires: unix + secs,
        })
    };
    let viewer = |name: &str, id: u64, token: String| {
        Proc::spawn(
            name,
            "braid-client",
            &[
                "--edge".into(),
                net.edge.udp().to_string(),
                "--id".into(),
                id.to_string(),
                "--token".into(),
                token,
                "--out".into(),
                net.path(&format!("{name}.ts")).display().to_string(),
                "--duration".into(),
                "10".into(),
                "--start-timeout".into(),
                "10".into(),
            ],
            &net.path(&format!("{name}.log")),
        )
    };
    let started = Instant::now();
    let mut short = viewer("short", 1, token(1, 4));
    let mut long = viewer("long", 2, token(2, 3600));
    let mut other = viewer("other", 3, token(4, 3600));
    let st = short.wait(Duration::from_secs(15)).expect("exits");
    let cut_after = started.elapsed();
    assert!(!st.success(), "the viewer whose token expired was refused");
    assert!(
        cut_after < Duration::from_secs(9),
        "cut off soon after its token expired, not at the end ({cut_after:?})"
    );
    assert!(
        !other
            .wait(Duration::from_secs(15))
            .expect("exits")
            .success()
    );
    assert_eq!(
        std::fs::metadata(net.path("other.ts")).map_or(0, |m| m.len()),
        0,
        "a token issued to another viewer gets nothing"
    );
    assert!(long.wait(Duration::from_secs(20)).expect("exits").success());
    let edge = &net.edge;
    assert!(dropped(edge, "token_expired") >= 1.0);
    assert!(dropped(edge, "bad_token") >= 1.0);
    net.edge.terminate();
}

/// Watches for thousands of stream ids open streams at an edge only for viewers let in
/// (none without a token, when the edge checks tokens) and only up to `--max-streams`.
#[test]
fn an_edge_opens_streams_only_for_viewers_let_in_and_within_its_cap() {
    let net = Net::start(Spec {
        seconds: 8.0,
        viewers: 0,
        ..Spec::default()
    });
    const SECRET: &str = "trust test token secret";
    // Edges that carry any stream id (the testbed's carries stream 1 only).
    let edge = |name: &str, extra: &[&str]| {
        let args: Vec<String> = [
            "--role",
            "edge",
            "--listen",
            "127.0.0.1:0",
            "--reflector",
            &net.sets[0].udp().to_string(),
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        Proc::start(
            name,
            "braid-reflector",
            &args,
            &net.path(&format!("{name}.log")),
        )
    };
    let capped = edge("capped", &["--max-streams", "16"]);
    let checked = edge("checked", &["--token-secret", SECRET]);
    let viewer = Codec::viewer();
    for to in [capped.udp(), checked.udp()] {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
        let cookie = braid_tests::handshake(&sock, to, |c| encode(&viewer, &watch(1, c, "")))
            .expect("a cookie");
        for id in 2..3000u32 {
            let mut m = watch(1, cookie, "");
            m.header.stream = StreamId(id);
            sock.send_to(&encode(&viewer, &m), to).expect("send");
            if id % 200 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let open = |p: &Proc| metrics::sum(p.metrics(), "braid_streams_open", &[]);
    let refused = metrics::sum_when(
        capped.metrics(),
        "braid_dropped_total",
        &["reason=\"stream_cap\""],
        Duration::from_secs(5),
        |v| v >= 2900.0,
    );
    assert!(open(&capped) <= 16.0, "at most --max-streams open");
    assert!(refused >= 2900.0, "the rest refused and counted: {refused}");
    let bad = metrics::sum_when(
        checked.metrics(),
        "braid_dropped_total",
        &["reason=\"bad_token\""],
        Duration::from_secs(5),
        |v| v >= 2900.0,
    );
    assert!(bad >= 2900.0, "every watch without a token refused: {bad}");
    assert_eq!(open(&checked), 0.0, "no stream opened without a token");
}
