//! Issue 14: a network across hosts (a network namespace each, joined by veth links
//! through a bridge), where a test cuts links as on separate machines. Without root it
//! says so loudly and does nothing.

use std::time::Duration;

use braid_ops::hosts::Hosts;
use braid_tests::{Proc, compare, wait_all};

const BITRATE: u64 = 4_000_000;

/// Acceptance 1: cutting the link of one set reflector, then of one entry point, loses
/// no viewer packet: the viewer's output is the source byte for byte.
#[test]
fn cutting_a_set_reflectors_link_then_an_entry_points_loses_no_viewer_packet() {
    let names = [
        "capture", "entry0", "entry1", "set0", "set1", "set2", "edge", "viewer",
    ];
    let hosts = match Hosts::new(&names) {
        Ok(h) => h,
        Err(why) => {
            eprintln!(
                "SKIPPED cutting_a_set_reflectors_link_then_an_entry_points_loses_no_viewer_packet: {why}"
            );
            return;
        }
    };
    let dir = braid_tests::test_dir();
    let p = |f: &str| dir.path().join(f);
    let at = |h: &str, port: u16| format!("{}:{port}", hosts.get(h).addr);
    let s = |v: &str| v.to_string();
    let start = |h: &str, bin: &str, args: Vec<String>| {
        Proc::start_in(&hosts.get(h).netns, h, bin, &args, &p(&format!("{h}.log")))
    };
    let sets: Vec<String> = ["set0", "set1", "set2"]
        .iter()
        .map(|h| at(h, 9100))
        .collect();
    let entries: Vec<String> = ["entry0", "entry1"].iter().map(|h| at(h, 9001)).collect();
    let mut procs = Vec::new();
    for h in ["set0", "set1", "set2"] {
        let mut a = vec![s("--role"), s("set"), s("--listen"), at(h, 9100)];
        a.extend([s("--stream"), s("1")]);
        for e in &entries {
            a.extend([s("--upstream"), e.clone()]);
        }
        procs.push(start(h, "braid-reflector", a));
    }
    for h in ["entry0", "entry1"] {
        let stream = format!("1:{}:{}", braid_tests::STREAM_KEY, sets.join(","));
        procs.push(start(
            h,
            "braid-entrypoint",
            vec![s("--listen"), at(h, 9001), s("--stream"), stream],
        ));
    }
    let mut a = vec![s("--role"), s("edge"), s("--listen"), at("edge", 9200)];
    a.extend([s("--stream"), s("1")]);
    for set in &sets {
        a.extend([s("--reflector"), set.clone()]);
    }
    procs.push(start("edge", "braid-reflector", a));
    let seconds = 16.0;
    let mut viewer = Proc::spawn_in(
        &hosts.get("viewer").netns,
        "viewer",
        "braid-client",
        &[
            s("--edge"),
            at("edge", 9200),
            s("--out"),
            p("view.ts").display().to_string(),
            s("--stats-json"),
            p("view.json").display().to_string(),
            s("--duration"),
            seconds.to_string(),
            s("--start-timeout"),
            s("10"),
        ],
        &p("viewer.log"),
    );
    let mut cap = vec![
        s("--stream-key"),
        s(braid_tests::STREAM_KEY),
        s("--bitrate"),
        BITRATE.to_string(),
        s("--tee"),
        p("tee.ts").display().to_string(),
        s("--duration"),
        (seconds + 6.0).to_string(),
    ];
    for e in &entries {
        cap.extend([s("--entry"), e.clone()]);
    }
    let _capture = Proc::spawn_in(
        &hosts.get("capture").netns,
        "capture",
        "braid-capture",
        &cap,
        &p("capture.log"),
    );
    let edge: std::net::SocketAddr = procs[5].ready["metrics"].parse().expect("an address");
    let from_set1 = || {
        let m = hosts.scrape("edge", edge);
        braid_tests::metrics::sum_of(&m, "braid_path_received_total", &["path=\"1\""])
    };
    std::thread::sleep(Duration::from_secs(5));
    hosts.cut("set1");
    std::thread::sleep(Duration::from_secs(1));
    let at_cut = from_set1();
    assert!(
        at_cut > 1000.0,
        "set1 was a path of the edge ({at_cut} packets)"
    );
    std::thread::sleep(Duration::from_secs(3));
    hosts.cut("entry0");
    let exits = wait_all([&mut viewer], &p("tee.ts"), Duration::from_secs(30));
    assert!(exits[0].status.success(), "the viewer failed");
    compare::assert_whole(
        &p("tee.ts"),
        &p("view.ts"),
        &compare::Whole {
            bytes_per_sec: BITRATE as f64 / 8.0,
            seconds,
            tee_at_exit: exits[0].tee_len,
        },
    );
    let stats = std::fs::read_to_string(p("view.json")).expect("stats");
    let last: serde_json::Value =
        serde_json::from_str(stats.lines().last().expect("a line")).expect("JSON");
    assert_eq!(last["gaps"], 0, "{last}");
    assert_eq!(
        from_set1(),
        at_cut,
        "nothing came through set1 after its link was cut"
    );
    drop(procs);
}
