//! QUIC links between two sockets on loopback: datagrams and control messages both ways
//! on one connection, node authentication by certificate, refusal of an untrusted one, a
//! dead peer noticed by its idle timeout, and oversize datagrams counted.
//!
//! A refusal is checked by the counter the refusing side exports once the handshake has
//! failed, not by the absence of a connection after some time: a handshake that has not
//! finished yet looks the same.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use braid_net::quic::{Change, Options, Quic};
use braid_net::tls::{Tls, make_dev_certs};
use braid_net::udp::{Impairments, Socket};
use bytes::Bytes;

/// The metrics recorder of this test process, installed on first use (every test that
/// reads a counter calls this before it starts a socket). Each test names its sockets'
/// roles apart, so tests in one process do not count into each other's counters.
fn recorder() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("the only metrics recorder of this process")
    })
}

/// The sum of counter `name` over samples whose labels contain all of `labels`, once it
/// satisfies `ok` or as it is after 10 s, while `pump` sockets run their loops (a QUIC
/// endpoint is driven by its owner's calls, as a daemon's loop drives it).
async fn counter_when(
    name: &str,
    labels: &[&str],
    ok: impl Fn(f64) -> bool,
    pump: &mut [&mut Socket],
) -> f64 {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let v: f64 = recorder()
            .render()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
            .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum();
        if ok(v) || Instant::now() >= end {
            return v;
        }
        for p in pump.iter_mut() {
            gather(p, usize::MAX, Duration::from_millis(5)).await;
        }
    }
}

fn tls(dir: &Path, name: &str, ca: &Path) -> Tls {
    Tls {
        cert: Some(dir.join(format!("{name}.pem"))),
        key: Some(dir.join(format!("{name}.key"))),
        ca: Some(ca.to_path_buf()),
        ..Tls::default()
    }
}

fn socket(tls: &Tls, role: &'static str) -> (Socket, SocketAddr) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut s = Socket::bind(any, Impairments::default(), role).unwrap();
    let q = Quic::bind(&Options::default(), any, tls, role).unwrap();
    let addr = q.local_addr().unwrap();
    s.attach_quic(q);
    (s, addr)
}

/// Receives until `want` messages arrived or `limit` passed; returns them and the changes.
async fn gather(
    s: &mut Socket,
    want: usize,
    limit: Duration,
) -> (Vec<(SocketAddr, Bytes)>, Vec<Change>) {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut changes = Vec::new();
    while got.len() < want && Instant::now() < end {
        let mut v = Vec::new();
        if tokio::time::timeout_at(end.into(), s.recv(&mut v))
            .await
            .is_err()
        {
            break;
        }
        got.extend(v);
        changes.extend(s.take_changes());
    }
    (got, changes)
}

/// Receives on `s` until `want` messages arrived or `limit` passed, while `pump` sockets
/// handle their own events (a dialer sends what waited for its connection only when it
/// handles the connection coming up).
async fn gather_pumping(
    s: &mut Socket,
    want: usize,
    pump: &mut [&mut Socket],
    limit: Duration,
) -> (Vec<(SocketAddr, Bytes)>, Vec<Change>) {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut changes = Vec::new();
    while got.len() < want && Instant::now() < end {
        let (g, c) = gather(s, want - got.len(), Duration::from_millis(20)).await;
        got.extend(g);
        changes.extend(c);
        for p in pump.iter_mut() {
            gather(p, usize::MAX, Duration::from_millis(5)).await;
        }
    }
    (got, changes)
}

fn dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("braid-quic-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test]
async fn one_connection_carries_datagrams_and_control_both_ways() {
    let d = dir("both");
    make_dev_certs(&d, &["a".into(), "b".into()], &[]).unwrap();
    let ca = d.join("ca.pem");
    let (mut a, a_addr) = socket(&tls(&d, "a", &ca), "a");
    let (mut b, b_addr) = socket(&tls(&d, "b", &ca), "b");
    a.quic_mut().unwrap().add_dial(b_addr);
    let now = Instant::now();
    // Control sent before the connection is up waits for it; media is dropped and counted.
    a.send(now, b_addr, Bytes::from_static(b"hello"), false);
    a.send(now, b_addr, Bytes::from_static(b"early media"), true);
    // The dialer's own task takes the connection up (and sends what waited for it).
    let (got, changes) = gather_pumping(&mut b, 1, &mut [&mut a], Duration::from_secs(10)).await;
    assert_eq!(got, vec![(a_addr, Bytes::from_static(b"hello"))]);
    assert!(
        changes.contains(&Change::Up {
            peer: a_addr,
            node: true
        }),
        "{changes:?}"
    );
    assert!(b.is_node(a_addr), "a presented a certificate the CA signed");
    assert_eq!(a.quic().unwrap().stats().dropped, 1);
    // Media both ways as datagrams on the same connection.
    for i in 0..50u8 {
        b.send(Instant::now(), a_addr, Bytes::from(vec![i; 1300]), true);
    }
    // Sent as the owner's loop sends: what is queued leaves at a flush, and the rest as
    // acknowledgements open the congestion window.
    b.flush();
    let (got, _) = gather_pumping(&mut a, 51, &mut [&mut b], Duration::from_secs(5)).await;
    let media: Vec<_> = got.iter().filter(|(_, m)| m.len() == 1300).collect();
    assert_eq!(media.len(), 50, "every datagram arrives on loopback");
    assert!(got.iter().all(|(from, _)| *from == b_addr));
    assert_eq!(b.quic().unwrap().stats().datagrams_sent, 50);
    let _ = std::fs::remove_dir_all(d);
}

#[tokio::test]
async fn untrusted_certificate_is_refused_and_anonymous_peer_is_not_a_node() {
    recorder();
    let d = dir("trust");
    make_dev_certs(&d, &["a".into(), "b".into()], &[]).unwrap();
    let other = d.join("other");
    make_dev_certs(&other, &["mallory".into()], &[]).unwrap();
    let ca = d.join("ca.pem");
    let (mut server, server_addr) = socket(&tls(&d, "b", &ca), "trust-server");
    // A dialer whose certificate another CA signed: the server refuses the handshake.
    let (mut mallory, mallory_addr) = socket(&tls(&other, "mallory", &ca), "mallory");
    mallory.quic_mut().unwrap().add_dial(server_addr);
    mallory.send(
        Instant::now(),
        server_addr,
        Bytes::from_static(b"let me in"),
        false,
    );
    let failed = counter_when(
        "braid_quic_handshake_failed_total",
        &["role=\"trust-server\"", "side=\"accept\"", "reason=\"tls\""],
        |v| v >= 1.0,
        &mut [&mut server, &mut mallory],
    )
    .await;
    assert_eq!(failed, 1.0, "the server refused the handshake");
    let ((got, _), _) = tokio::join!(
        gather(&mut server, 1, Duration::from_millis(200)),
        gather(&mut mallory, 1, Duration::from_millis(200))
    );
    assert!(got.is_empty(), "nothing from an untrusted peer: {got:?}");
    assert!(!server.quic().unwrap().is_connected(mallory_addr));
    // A viewer with no certificate connects, but is no node.
    let viewer_tls = Tls {
        ca: Some(ca.clone()),
        ..Tls::default()
    };
    let (mut viewer, viewer_addr) = socket(&viewer_tls, "trust-viewer");
    viewer.quic_mut().unwrap().add_dial(server_addr);
    viewer.send(
        Instant::now(),
        server_addr,
        Bytes::from_static(b"watch"),
        false,
    );
    let (got, _) =
        gather_pumping(&mut server, 1, &mut [&mut viewer], Duration::from_secs(10)).await;
    assert_eq!(got, vec![(viewer_addr, Bytes::from_static(b"watch"))]);
    assert!(!server.is_node(viewer_addr));
    // A dialer that does not trust the server's CA gives up on it.
    let (mut wary, _) = socket(&tls(&other, "mallory", &other.join("ca.pem")), "wary");
    wary.quic_mut().unwrap().add_dial(server_addr);
    wary.send(
        Instant::now(),
        server_addr,
        Bytes::from_static(b"hi"),
        false,
    );
    let failed = counter_when(
        "braid_quic_handshake_failed_total",
        &["role=\"wary\"", "side=\"dial\"", "reason=\"tls\""],
        |v| v >= 1.0,
        &mut [&mut server, &mut wary],
    )
    .await;
    assert_eq!(failed, 1.0, "the dialer refused the server's certificate");
    let (got, _) = gather(&mut wary, 1, Duration::from_millis(200)).await;
    assert!(got.is_empty());
    assert!(!wary.quic().unwrap().is_connected(server_addr));
    let _ = std::fs::remove_dir_all(d);
}

#[tokio::test]
async fn a_vanished_peer_is_noticed_by_its_idle_timeout() {
    let d = dir("dead");
    make_dev_certs(&d, &["a".into(), "b".into()], &[]).unwrap();
    let ca = d.join("ca.pem");
    let (mut a, _) = socket(&tls(&d, "a", &ca), "a");
    // b lives in a runtime of its own, so that it can vanish without a word (as if
    // SIGKILLed: no connection close is sent).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let guard = rt.enter();
    let (mut b, b_addr) = socket(&tls(&d, "b", &ca), "b");
    drop(guard);
    // b's own loop, as its daemon's: it answers until its runtime goes.
    rt.spawn(async move {
        loop {
            let mut v = Vec::new();
            let _ = b.recv(&mut v).await;
            b.take_changes();
        }
    });
    a.quic_mut().unwrap().add_dial(b_addr);
    a.send(Instant::now(), b_addr, Bytes::from_static(b"hello"), false);
    let mut up = false;
    let start = Instant::now();
    while !up && start.elapsed() < Duration::from_secs(5) {
        let (_, changes) = gather(&mut a, 1, Duration::from_millis(100)).await;
        up = changes.iter().any(|c| matches!(c, Change::Up { .. }));
    }
    assert!(up, "connected");
    rt.shutdown_background();
    // How soon (the 1 s idle timeout) is a timing, not checked here; 10 s is generous.
    let gone = Instant::now();
    let mut reason = None;
    while reason.is_none() && gone.elapsed() < Duration::from_secs(10) {
        let (_, changes) = gather(&mut a, 1, Duration::from_millis(100)).await;
        reason = changes.into_iter().find_map(|c| match c {
            Change::Down { reason, .. } => Some(reason),
            Change::Up { .. } => None,
        });
    }
    let reason = reason.expect("the dead peer is noticed");
    assert!(
        reason.contains("timed out"),
        "noticed by the idle timeout, not a close: {reason}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[tokio::test]
async fn pinned_fingerprint_is_trusted_without_a_ca_and_a_wrong_pin_is_not() {
    recorder();
    let d = dir("pin");
    make_dev_certs(&d, &["server".into()], &[]).unwrap();
    let server_tls = Tls {
        cert: Some(d.join("server.pem")),
        key: Some(d.join("server.key")),
        ..Tls::default()
    };
    let (mut server, server_addr) = socket(&server_tls, "pin-server");
    let pin = braid_net::tls::fingerprint_file(&d.join("server.pem")).unwrap();
    let pinned = Tls {
        pin: vec![pin],
        ..Tls::default()
    };
    let (mut viewer, viewer_addr) = socket(&pinned, "pinned");
    viewer.quic_mut().unwrap().add_dial(server_addr);
    viewer.send(
        Instant::now(),
        server_addr,
        Bytes::from_static(b"pinned"),
        false,
    );
    let (got, _) =
        gather_pumping(&mut server, 1, &mut [&mut viewer], Duration::from_secs(10)).await;
    assert_eq!(got, vec![(viewer_addr, Bytes::from_static(b"pinned"))]);
    let wrong = Tls {
        pin: vec!["00".repeat(32)],
        ..Tls::default()
    };
    let (mut stranger, _) = socket(&wrong, "stranger");
    stranger.quic_mut().unwrap().add_dial(server_addr);
    stranger.send(Instant::now(), server_addr, Bytes::from_static(b"x"), false);
    let failed = counter_when(
        "braid_quic_handshake_failed_total",
        &["role=\"stranger\"", "side=\"dial\"", "reason=\"tls\""],
        |v| v >= 1.0,
        &mut [&mut server, &mut stranger],
    )
    .await;
    assert_eq!(
        failed, 1.0,
        "a wrong pin trusts nothing: the dialer gave up"
    );
    let ((got, _), _) = tokio::join!(
        gather(&mut server, 1, Duration::from_millis(200)),
        gather(&mut stranger, 1, Duration::from_millis(200))
    );
    assert!(got.is_empty(), "a wrong pin trusts nothing");
    assert!(!stranger.quic().unwrap().is_connected(server_addr));
    let _ = std::fs::remove_dir_all(d);
}

#[tokio::test]
async fn oversize_datagrams_and_connections_over_the_limit_are_counted() {
    recorder();
    let d = dir("limits");
    make_dev_certs(&d, &["server".into()], &[]).unwrap();
    let ca = d.join("ca.pem");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut server = Socket::bind(any, Impairments::default(), "limit-server").unwrap();
    let options = Options {
        max_conns_per_ip: 2,
        ..Options::default()
    };
    let server_tls = Tls {
        cert: Some(d.join("server.pem")),
        key: Some(d.join("server.key")),
        ..Tls::default()
    };
    let q = Quic::bind(&options, any, &server_tls, "limit-server").unwrap();
    let server_addr = q.local_addr().unwrap();
    server.attach_quic(q);
    let viewer_tls = Tls {
        ca: Some(ca),
        ..Tls::default()
    };
    let mut viewers: Vec<(Socket, SocketAddr)> = (0..3)
        .map(|_| socket(&viewer_tls, "limit-viewer"))
        .collect();
    for (v, _) in &mut viewers {
        v.quic_mut().unwrap().add_dial(server_addr);
        v.send(
            Instant::now(),
            server_addr,
            Bytes::from_static(b"hi"),
            false,
        );
    }
    // The third handshake is refused (counted on both sides); the two taken deliver.
    let [(a, _), (b, _), (c, _)] = &mut viewers[..] else {
        unreachable!()
    };
    let refused = counter_when(
        "braid_quic_refused_total",
        &["role=\"limit-server\""],
        |v| v >= 1.0,
        &mut [&mut server, &mut *a, &mut *b, &mut *c],
    )
    .await;
    assert_eq!(refused, 1.0, "the third connection from 127.0.0.1 refused");
    let gave_up = counter_when(
        "braid_quic_handshake_failed_total",
        &[
            "role=\"limit-viewer\"",
            "side=\"dial\"",
            "reason=\"refused\"",
        ],
        |v| v >= 1.0,
        &mut [&mut server, &mut *a, &mut *b, &mut *c],
    )
    .await;
    assert_eq!(gave_up, 1.0, "the refused viewer's dial failed");
    let (got, _) = gather_pumping(&mut server, 2, &mut [a, b, c], Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2, "two connections from 127.0.0.1 taken");
    let connected = viewers
        .iter()
        .filter(|(v, _)| v.quic().unwrap().is_connected(server_addr))
        .count();
    assert_eq!(connected, 2);
    // A datagram larger than any path carries is dropped and counted, never sent.
    let (v, _) = viewers
        .iter_mut()
        .find(|(v, _)| v.quic().unwrap().is_connected(server_addr))
        .unwrap();
    let before = v.quic().unwrap().stats();
    v.send(
        Instant::now(),
        server_addr,
        Bytes::from(vec![0u8; 2000]),
        true,
    );
    let after = v.quic().unwrap().stats();
    assert_eq!(after.dropped, before.dropped + 1);
    assert_eq!(after.datagrams_sent, before.datagrams_sent);
    let _ = std::fs::remove_dir_all(d);
}
