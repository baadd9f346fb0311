//! The data path over UDP, end to end with real processes on 127.0.0.1: capture → two
//! entry points → three set reflectors → edge → viewers.

use std::time::Duration;

use braid_tests::{
    Net, Spec, assert_viewers_exact, compare, kill_a_set_reflector_then_an_entry_point, metrics,
};

const LOSS_10: &str = "loss = 0.1\nseed = 7";

/// Acceptance 1, repair on: 10% independent loss on every link, and every viewer still
/// gets the source byte for byte.
#[test]
fn ten_percent_loss_everywhere_with_repair_is_byte_exact() {
    let mut net = Net::start(Spec {
        seconds: 30.0,
        entry_impair: LOSS_10.into(),
        set_impair: vec![LOSS_10.into(); 3],
        ..Spec::default()
    });
    net.wait_viewers();
    assert_viewers_exact(&net);
    // The repair really worked: the edge asked for packets and got them back.
    let edge = net.edge.metrics();
    assert!(metrics::sum(edge, "braid_merge_repaired_total", &[]) > 0.0);
    assert!(metrics::sum(edge, "braid_merge_duplicates_total", &[]) > 0.0);
}

/// Acceptance 1, repair off: the viewer loses about p³ of the packets (every path must lose
/// the same packet), everything it does get is genuine and in order, and every loss was
/// counted as a gap at the edge.
#[test]
fn ten_percent_loss_everywhere_without_repair_loses_about_p_cubed() {
    let mut net = Net::start(Spec {
        seconds: 30.0,
        repair: false,
        viewers: 1,
        entry_impair: LOSS_10.into(),
        set_impair: vec![LOSS_10.into(); 3],
        ..Spec::default()
    });
    net.wait_viewers();
    let (missing_ts, got_ts) =
        compare::missing_ts_packets(&net.path("tee.ts"), &net.path("view0.ts"));
    let stats = net.viewer_stats(0);
    let gaps = stats["gaps"].as_u64().expect("gaps") as f64;
    let packets = stats["packets"].as_u64().expect("packets") as f64;
    let loss = gaps / (gaps + packets);
    // Each set reflector path loses 10% on its own link plus what both entry links lost
    // (1%): p = 0.109, p³ = 0.13%. Allow for chance: under 0.5%.
    assert!(loss < 0.005, "lost {loss:.4} of packets: {stats}");
    assert!(
        missing_ts > 0 && gaps > 0.0,
        "with 10% loss on every link some packet is lost everywhere in 30 s"
    );
    assert!(missing_ts as f64 / (missing_ts + got_ts) as f64 <= 0.005);
    let edge_gaps = metrics::sum(net.edge.metrics(), "braid_merge_gaps_total", &[]);
    assert!(
        edge_gaps >= gaps,
        "the edge counted {edge_gaps} gaps, the viewer saw {gaps}"
    );
}

/// Acceptance 2: SIGKILL a set reflector, later an entry point, mid-stream; nothing is lost.
#[test]
fn killing_a_set_reflector_then_an_entry_point_loses_nothing() {
    let mut net = Net::start(Spec {
        seconds: 20.0,
        ..Spec::default()
    });
    kill_a_set_reflector_then_an_entry_point(&mut net, 0, Duration::from_secs(5));
}

/// Acceptance 3: a path whose media is all dropped while its control messages still pass
/// causes no loss (health is judged by data, not by control).
#[test]
fn data_dead_path_with_live_control_loses_nothing() {
    let mut net = Net::start(Spec {
        seconds: 15.0,
        set_impair: vec!["loss = 1.0\ndata_only = true".into()],
        ..Spec::default()
    });
    net.wait_viewers();
    assert_viewers_exact(&net);
    let set0 = net.sets[0].metrics();
    assert!(
        metrics::sum(set0, "braid_udp_impaired_total", &[]) > 0.0,
        "set reflector 0 really dropped its media"
    );
}

/// Acceptance 4: two paths 150 ms apart, with loss on each, and a reorder window sized
/// to the skew: nothing lost.
#[test]
fn paths_150_ms_apart_lose_nothing() {
    let mut net = Net::start(Spec {
        seconds: 15.0,
        window_ms: 400,
        sets: 2,
        set_impair: vec![
            "delay_ms = 150\nloss = 0.05\nseed = 3".into(),
            "loss = 0.05\nseed = 4".into(),
        ],
        ..Spec::default()
    });
    net.wait_viewers();
    assert_viewers_exact(&net);
    let edge = net.edge.metrics();
    assert_eq!(
        metrics::sum(edge, "braid_merge_late_total", &[]),
        0.0,
        "nothing arrived after its window"
    );
}

/// Acceptance 5: garbage, forged and unknown-stream packets sent to every daemon are
/// counted and dropped; the stream goes on; nothing crashes.
#[test]
fn hostile_packets_are_counted_and_dropped() {
    use braid_core::wire::{Body, Codec, Header, Key, Message, Subscription};
    use braid_core::{NodeId, StreamId};

    let mut net = Net::start(Spec {
        seconds: 15.0,
        viewers: 1,
        ..Spec::default()
    });
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let good = Codec::new(Key::derive(braid_tests::NETWORK_KEY));
    let forged = Codec::new(Key::derive("not the network key"));
    let unknown_stream = {
        let mut out = bytes::BytesMut::new();
        let msg = Message {
            header: Header {
                stream: StreamId(999),
                ..Header::default()
            },
            body: Body::Subscribe(Subscription {
                node: NodeId(1),
                lease_ms: 1000,
            }),
        };
        good.encode(&msg, &mut out).expect("encodes");
        out.freeze()
    };
    let bad_tag = {
        let mut out = bytes::BytesMut::new();
        let msg = Message {
            header: Header {
                stream: StreamId(1),
                ..Header::default()
            },
            body: Body::Nack(vec![braid_core::wire::SeqRange {
                first: braid_core::SeqNo(0),
                count: 100,
            }]),
        };
        forged.encode(&msg, &mut out).expect("encodes");
        out.freeze()
    };
    let targets: Vec<std::net::SocketAddr> = net
        .sets
        .iter()
        .chain(net.entries.iter())
        .chain(std::iter::once(&net.edge))
        .map(|p| p.udp())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let mut rng = 0x1234_5678_u64;
    for round in 0..200 {
        for &to in &targets {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let len = (rng % 1400) as usize;
            let garbage: Vec<u8> = (0..len).map(|i| (rng >> (i % 56)) as u8).collect();
            sock.send_to(&garbage, to).expect("send");
            sock.send_to(&bad_tag, to).expect("send");
            if round % 10 == 0 {
                sock.send_to(&unknown_stream, to).expect("send");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    net.wait_viewers();
    assert_viewers_exact(&net);
    for p in net
        .sets
        .iter_mut()
        .chain(net.entries.iter_mut())
        .chain(std::iter::once(&mut net.edge))
    {
        assert!(p.alive(), "{} died", p.name);
        let m = p.metrics();
        assert!(
            metrics::sum(m, "braid_dropped_total", &["reason=\"bad_tag\""]) >= 200.0,
            "{}: forged packets counted",
            p.name
        );
        let junk: f64 = [
            "truncated",
            "version",
            "too_large",
            "malformed",
            "unknown_kind",
        ]
        .iter()
        .map(|r| metrics::sum(m, "braid_dropped_total", &[&format!("reason=\"{r}\"")]))
        .sum();
        assert!(junk >= 150.0, "{}: garbage counted ({junk})", p.name);
        assert!(
            metrics::sum(m, "braid_dropped_total", &["reason=\"unknown_stream\""]) >= 20.0,
            "{}: unknown stream counted",
            p.name
        );
    }
}
