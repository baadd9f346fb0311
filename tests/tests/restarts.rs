//! Ordinary events of a live event, with real processes on 127.0.0.1: an encoder
//! restarted mid-stream, an edge restarted on its address, a viewer paused for seconds.
//! Each viewer's output is cut into the runs it is made of ([`compare::pieces`]) and
//! every run is checked against what the capture sent.

use std::path::Path;
use std::time::{Duration, Instant};

use braid_tests::compare::{self, Piece};
use braid_tests::{Exit, Net, Proc, Spec, wait_all};

/// One TS packet per 188 bytes; the tests' captures put 7 in each RTP packet.
const RTP_BYTES: usize = 7 * 188;

fn bytes_per_sec(net: &Net) -> f64 {
    net.spec.bitrate as f64 / 8.0
}

/// A viewer of the test's edge over `transport` (udp, tcp or quic) for `seconds`.
fn viewer(net: &Net, name: &str, transport: &str, seconds: f64) -> Proc {
    let edge = match transport {
        "quic" => format!("quic://{}", net.edge.quic()),
        _ => net.edge.udp().to_string(),
    };
    let mut args: Vec<String> = [
        "--edge",
        &edge,
        "--transport",
        transport,
        "--duration",
        &seconds.to_string(),
        "--start-timeout",
        "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, file) in [("--out", "ts"), ("--stats-json", "json")] {
        args.push(flag.into());
        args.push(net.path(&format!("{name}.{file}")).display().to_string());
    }
    if transport == "quic" {
        args.push("--tls-ca".into());
        args.push(net.path("certs/ca.pem").display().to_string());
    }
    Proc::spawn(
        name,
        "braid-client",
        &args,
        &net.path(&format!("{name}.log")),
    )
}

fn last_stats(net: &Net, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(net.path(&format!("{name}.json"))).expect("stats");
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    serde_json::from_str(last.expect("a stats line")).expect("stats are JSON")
}

fn file_len(p: &Path) -> usize {
    std::fs::metadata(p).map_or(0, |m| m.len() as usize)
}

/// Asserts the viewer's last run reaches to within a second of stream of where the
/// capture was when it exited: it kept up with live to its end.
fn assert_reaches_live(net: &Net, name: &str, last: &Piece, exit: &Exit) {
    let short = exit.tee_len as f64 - (last.at + last.len) as f64;
    assert!(
        short <= bytes_per_sec(net) * compare::END_ALLOWANCE_S,
        "{name}: ends {:.2} s of stream before the capture at its exit",
        short / bytes_per_sec(net)
    );
}

/// Acceptance 1: a capture killed and started again mid-stream goes on about a
/// hundred thousand sequence numbers higher, in a new session. Every running viewer,
/// over UDP, TCP and QUIC, writes the old session to where it ended and then the new one
/// from its first keyframe, keeping up with live; a viewer joining after the restart
/// starts; every output is whole TS packets of what the captures sent.
#[test]
fn a_restarted_capture_reaches_every_viewer_over_every_transport() {
    let mut net = Net::start(Spec {
        seconds: 20.0,
        viewers: 0,
        quic_viewers: true,
        ..Spec::default()
    });
    let names = ["udp", "tcp", "quic"];
    let mut viewers: Vec<Proc> = names.iter().map(|t| viewer(&net, t, t, 14.0)).collect();
    std::thread::sleep(Duration::from_secs(5));
    let restarted = Instant::now();
    net.restart_capture("tee2.ts");
    let restart_took = restarted.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    viewers.push(viewer(&net, "late", "udp", 5.0));
    let tee2 = net.path("tee2.ts");
    let mut exits = wait_all(viewers.iter_mut(), &tee2, Duration::from_secs(30));
    let late_exit = exits.split_off(names.len());
    let tees = [net.path("tee.ts"), net.path("tee2.ts")];
    let tees = [tees[0].as_path(), tees[1].as_path()];
    for (name, exit) in names.iter().zip(&exits) {
        assert!(exit.status.success(), "{name} failed: see its log");
        let p = compare::pieces(&tees, &net.path(&format!("{name}.ts")));
        eprintln!("{name}: {p:?} (the capture took {restart_took:?} to start again)");
        assert_eq!(
            p.iter().map(|p| p.source).collect::<Vec<_>>(),
            [0, 1],
            "{name}: the old session unbroken, then the new one unbroken: {p:?}"
        );
        // The new session is written from its start: its first packet is a keyframe.
        assert!(
            (p[1].at as f64) <= bytes_per_sec(&net),
            "{name}: the new session is written from {:.2} s into it, not its first keyframe",
            p[1].at as f64 / bytes_per_sec(&net)
        );
        assert_reaches_live(&net, name, &p[1], exit);
        let stats = last_stats(&net, name);
        assert_eq!(stats["gaps"], 0, "{name}: {stats}");
        assert!(stats["sessions"].as_u64() >= Some(1), "{name}: {stats}");
    }
    assert!(late_exit[0].status.success(), "the late joiner failed");
    let p = compare::pieces(&tees, &net.path("late.ts"));
    assert_eq!(p.len(), 1, "the late joiner's output is one run: {p:?}");
    assert_eq!(p[0].source, 1, "of the new session");
    assert!(
        p[0].len as f64 >= bytes_per_sec(&net) * (5.0 - compare::START_ALLOWANCE_S),
        "the late joiner wrote {:.2} s of stream in a 5 s run",
        p[0].len as f64 / bytes_per_sec(&net)
    );
    assert_reaches_live(&net, "late", &p[0], &late_exit[0]);
}

/// Acceptance 2: an edge SIGKILLed and started again on its address, twice: down 1.5 s,
/// then down 5 s. Its viewers, over UDP and QUIC, come back by themselves (no control
/// server here). After the short outage the new edge asks the set reflectors, which keep
/// the last seconds, for what its viewers lack, and nothing is lost; after the long one
/// it starts them at a keyframe and what is missing is the outage and at most a group of
/// pictures, every packet not written counted by the viewer.
#[test]
fn viewers_of_a_restarted_edge_resume_losing_at_most_the_outage() {
    let mut net = Net::start(Spec {
        seconds: 24.0,
        viewers: 0,
        quic_viewers: true,
        ..Spec::default()
    });
    let names = ["udp", "quic"];
    let mut viewers: Vec<Proc> = names.iter().map(|t| viewer(&net, t, t, 19.0)).collect();
    std::thread::sleep(Duration::from_secs(4));
    let t = Instant::now();
    net.restart_edge(Duration::from_millis(1500));
    let short = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    net.restart_edge(Duration::from_secs(5));
    let long = t.elapsed().as_secs_f64();
    let tee = net.path("tee.ts");
    let exits = wait_all(viewers.iter_mut(), &tee, Duration::from_secs(30));
    let ts = std::fs::read(&tee).expect("tee");
    // A group of pictures is a second in these tests.
    let allowed = long + 1.0 + 0.5;
    for (name, exit) in names.iter().zip(&exits) {
        assert!(exit.status.success(), "{name} failed: see its log");
        let p = compare::pieces(&[tee.as_path()], &net.path(&format!("{name}.ts")));
        eprintln!("{name}: {p:?} (the edge was down {short:.2} s, then {long:.2} s)");
        assert!(
            p.len() <= 2,
            "{name}: one break at most, at the long outage: {p:?}"
        );
        let last = p.last().expect("a piece");
        assert_reaches_live(&net, name, last, exit);
        let stats = last_stats(&net, name);
        let counted = stats["gaps"].as_u64().unwrap_or(0) + stats["skipped"].as_u64().unwrap_or(0);
        let Some(after) = p.get(1) else {
            continue;
        };
        let missing = after.at - (p[0].at + p[0].len);
        let missing_s = missing as f64 / bytes_per_sec(&net);
        assert!(
            missing_s <= allowed,
            "{name}: {missing_s:.2} s of stream missing for an outage of {long:.2} s"
        );
        assert!(
            compare::starts_at_keyframe(&ts, after.at),
            "{name}: resumes at a keyframe"
        );
        assert!(
            counted as usize >= missing / RTP_BYTES,
            "{name}: {} packets not written, {counted} counted: {stats}",
            missing / RTP_BYTES
        );
    }
}

/// Acceptance 3: a UDP viewer stopped for 6 s (SIGSTOP: a busy player, a laptop lid)
/// writes again once it runs, from a keyframe near live rather than from where it
/// stopped, and counts the skip.
#[test]
fn a_viewer_paused_six_seconds_writes_again_from_a_keyframe() {
    let net = Net::start(Spec {
        seconds: 20.0,
        viewers: 0,
        ..Spec::default()
    });
    let mut v = viewer(&net, "paused", "udp", 15.0);
    std::thread::sleep(Duration::from_secs(4));
    let tee = net.path("tee.ts");
    let out = net.path("paused.ts");
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &v.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let stopped_at = file_len(&tee);
    std::thread::sleep(Duration::from_secs(6));
    signal("-CONT");
    let resumed_at = file_len(&tee);
    // It writes again within a second of running.
    let before = file_len(&out);
    let t = Instant::now();
    while file_len(&out) <= before && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let wrote_after = t.elapsed();
    let exit = wait_all([&mut v], &tee, Duration::from_secs(20));
    assert!(exit[0].status.success(), "the viewer failed: see its log");
    assert!(
        wrote_after <= Duration::from_secs(1),
        "wrote again {wrote_after:?} after it resumed"
    );
    let ts = std::fs::read(&tee).expect("tee");
    let p = compare::pieces(&[tee.as_path()], &out);
    eprintln!(
        "{p:?}; stopped at {stopped_at}, resumed at {resumed_at}, wrote after {wrote_after:?}"
    );
    assert_eq!(p.len(), 2, "one break, at the pause: {p:?}");
    assert!(p[0].at + p[0].len <= resumed_at, "{p:?}");
    assert!(
        compare::starts_at_keyframe(&ts, p[1].at),
        "resumes at a keyframe"
    );
    // From near live at its resumption, not from where it stopped.
    assert!(
        p[1].at >= stopped_at && (p[1].at as f64) <= resumed_at as f64 + bytes_per_sec(&net),
        "resumes at {:.2} s of stream; stopped at {:.2} s, ran again at {:.2} s",
        p[1].at as f64 / bytes_per_sec(&net),
        stopped_at as f64 / bytes_per_sec(&net),
        resumed_at as f64 / bytes_per_sec(&net)
    );
    assert_reaches_live(&net, "paused", &p[1], &exit[0]);
    let stats = last_stats(&net, "paused");
    assert!(
        stats["skips"].as_u64() >= Some(1),
        "the skip is counted: {stats}"
    );
    assert_eq!(stats["gaps"], 0, "{stats}");
}
