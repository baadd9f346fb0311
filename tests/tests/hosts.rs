//! Issue 14: a network across hosts (a network namespace each, joined by veth links
//! through a bridge), where a test cuts or caps links as on separate machines. Without
//! root it says so loudly and does nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use braid_ops::hosts::Hosts;
use braid_tests::{Proc, compare, wait_all};

const BITRATE: u64 = 4_000_000;

/// A capture, two entry points, three set reflectors, an edge and a viewer, each on a
/// host of its own.
struct HostNet {
    hosts: Hosts,
    dir: braid_tests::TestDir,
    /// Set reflectors, entry points, the edge, in that order.
    procs: Vec<Proc>,
    viewer: Proc,
    _capture: Proc,
    seconds: f64,
}

impl HostNet {
    /// Starts it, or says why it cannot (not root).
    fn start(test: &str, seconds: f64) -> Option<HostNet> {
        let names = [
            "capture", "entry0", "entry1", "set0", "set1", "set2", "edge", "viewer",
        ];
        let hosts = match Hosts::new(&names) {
            Ok(h) => h,
            Err(why) => {
                eprintln!("SKIPPED {test}: {why}");
                return None;
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
        let viewer = Proc::spawn_in(
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
        let capture = Proc::spawn_in(
            &hosts.get("capture").netns,
            "capture",
            "braid-capture",
            &cap,
            &p("capture.log"),
        );
        Some(HostNet {
            hosts,
            dir,
            procs,
            viewer,
            _capture: capture,
            seconds,
        })
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// The edge's samples of `name` on path `path` (set reflector `path`).
    fn edge_path(&self, name: &str, path: u8) -> f64 {
        let addr: SocketAddr = self.procs[5].ready["metrics"].parse().expect("an address");
        let m = self.hosts.scrape("edge", addr);
        braid_tests::metrics::sum_of(&m, name, &[&format!("path=\"{path}\"")])
    }

    /// Waits for the viewer and asserts it got the source byte for byte, with no gap.
    fn assert_viewer_whole(&mut self) {
        let tee = self.path("tee.ts");
        let exits = wait_all([&mut self.viewer], &tee, Duration::from_secs(30));
        assert!(exits[0].status.success(), "the viewer failed");
        compare::assert_whole(
            &tee,
            &self.path("view.ts"),
            &compare::Whole {
                bytes_per_sec: BITRATE as f64 / 8.0,
                seconds: self.seconds,
                tee_at_exit: exits[0].tee_len,
            },
        );
        let stats = std::fs::read_to_string(self.path("view.json")).expect("stats");
        let last: serde_json::Value =
            serde_json::from_str(stats.lines().last().expect("a line")).expect("JSON");
        assert_eq!(last["gaps"], 0, "{last}");
    }
}

/// Acceptance 1: cutting the link of one set reflector, then of one entry point, loses
/// no viewer packet: the viewer's output is the source byte for byte.
#[test]
fn cutting_a_set_reflectors_link_then_an_entry_points_loses_no_viewer_packet() {
    let Some(mut net) = HostNet::start(
        "cutting_a_set_reflectors_link_then_an_entry_points_loses_no_viewer_packet",
        16.0,
    ) else {
        return;
    };
    std::thread::sleep(Duration::from_secs(5));
    net.hosts.cut("set1");
    std::thread::sleep(Duration::from_secs(1));
    let at_cut = net.edge_path("braid_path_received_total", 1);
    assert!(
        at_cut > 1000.0,
        "set1 was a path of the edge ({at_cut} packets)"
    );
    std::thread::sleep(Duration::from_secs(3));
    net.hosts.cut("entry0");
    net.assert_viewer_whole();
    assert_eq!(
        net.edge_path("braid_path_received_total", 1),
        at_cut,
        "nothing came through set1 after its link was cut"
    );
}

/// Acceptance 2: one set reflector's link capped with `tc ... tbf` at a quarter of the
/// stream's rate: the edge's merge takes the other paths and the viewer loses nothing.
#[test]
fn a_path_capped_below_the_streams_rate_loses_the_viewer_nothing() {
    let Some(mut net) = HostNet::start(
        "a_path_capped_below_the_streams_rate_loses_the_viewer_nothing",
        16.0,
    ) else {
        return;
    };
    std::thread::sleep(Duration::from_secs(4));
    net.hosts.limit("set1", "1mbit");
    let before = (
        net.edge_path("braid_path_received_total", 0),
        net.edge_path("braid_path_received_total", 1),
    );
    net.assert_viewer_whole();
    let after = (
        net.edge_path("braid_path_received_total", 0),
        net.edge_path("braid_path_received_total", 1),
    );
    let (full, capped) = (after.0 - before.0, after.1 - before.1);
    assert!(
        capped < full * 0.5,
        "the capped path really carried less: {capped} packets against {full}"
    );
}
