//! Issue 14: Debian's Prometheus, with the shipped scrape config, scrapes every node of a
//! network; PromQL finds the counters adding up along the tree; and every metric the
//! shipped Grafana dashboard queries is one the nodes export. Without `prometheus`
//! installed (the README's test command installs it), it says so loudly and does nothing.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use braid_tests::{Net, Proc, Spec};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Each instant-vector sample of `query`: its labels and value.
fn query(base: &str, q: &str) -> Vec<(serde_json::Value, f64)> {
    try_query(base, q).unwrap_or_else(|e| panic!("{q}: {e}"))
}

/// [`query`], or the error of a server not answering (yet).
fn try_query(base: &str, q: &str) -> Result<Vec<(serde_json::Value, f64)>, ureq::Error> {
    let mut r = ureq::get(&format!("{base}/api/v1/query"))
        .query("query", q)
        .call()?;
    let v: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().expect("a body")).expect("JSON");
    assert_eq!(v["status"], "success", "{q}: {v}");
    Ok(v["data"]["result"]
        .as_array()
        .expect("a vector")
        .iter()
        .map(|s| {
            let value = s["value"][1]
                .as_str()
                .expect("a value")
                .parse()
                .expect("a number");
            (s["metric"].clone(), value)
        })
        .collect())
}

/// The metric names the dashboard's queries use: Braid's own (`braid_`) and the
/// process's (`process_`, CPU and memory).
fn dashboard_metrics() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("ops/grafana/braid.json")).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut names = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("an expression");
            for prefix in ["braid_", "process_"] {
                let mut rest = expr;
                while let Some(i) = rest.find(prefix) {
                    let name: String = rest[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    rest = &rest[i + name.len()..];
                    names.push(name);
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn prometheus_scrapes_every_node_and_the_counters_add_up_along_the_tree() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED prometheus_scrapes_every_node_and_the_counters_add_up_along_the_tree: \
             no prometheus binary (the README's test command installs Debian's)"
        );
        return;
    }
    // Every metric the dashboard queries is exported by the code.
    let mut sources = String::new();
    for dir in [
        "reflector/src",
        "entrypoint/src",
        "capture/src",
        "control/src",
        "net/src",
    ] {
        for f in std::fs::read_dir(repo().join(dir)).expect("sources") {
            sources += &std::fs::read_to_string(f.expect("a file").path()).unwrap_or_default();
        }
    }
    let wanted = dashboard_metrics();
    assert!(wanted.len() >= 15, "{wanted:?}");
    for m in wanted.iter().filter(|m| m.starts_with("braid_")) {
        assert!(
            sources.contains(&format!("\"{m}\"")),
            "the dashboard queries {m}, which no node exports"
        );
    }

    let stats_dir = braid_tests::test_dir();
    let capture_stats = stats_dir.path().join("capture.json");
    let mut net = Net::start(Spec {
        seconds: 8.0,
        viewers: 1,
        capture_args: vec!["--stats-json".into(), capture_stats.display().to_string()],
        ..Spec::default()
    });
    // The shipped scrape config, every node listed as an operator would, scraped each
    // second instead of each 5 (the test is short).
    let dir = net.path("prometheus");
    std::fs::create_dir_all(dir.join("targets")).expect("a directory");
    let config = std::fs::read_to_string(repo().join("ops/prometheus/prometheus.yml"))
        .expect("the scrape config")
        .replace("scrape_interval: 5s", "scrape_interval: 1s");
    std::fs::write(dir.join("prometheus.yml"), config).expect("write");
    let group = |role: &str, procs: &[&Proc]| {
        serde_json::json!({
            "targets": procs.iter().map(|p| p.metrics().to_string()).collect::<Vec<_>>(),
            "labels": {"role": role},
        })
    };
    let targets = serde_json::json!([
        group("entrypoint", &net.entries.iter().collect::<Vec<_>>()),
        group("set", &net.sets.iter().collect::<Vec<_>>()),
        group("edge", &[&net.edge]),
    ]);
    std::fs::write(dir.join("targets/nodes.json"), targets.to_string()).expect("write");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = braid_tests::die_with_parent({
        let mut c = Command::new("prometheus");
        c.arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(net.path("prometheus.log")).expect("a log file"));
        c
    })
    .spawn()
    .expect("prometheus starts");
    let _prometheus = Proc::adopt("prometheus", child);
    let base = format!("http://127.0.0.1:{port}");

    // Every node is up.
    let nodes = net.entries.len() + net.sets.len() + 1;
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let up = try_query(&base, "up{job=\"braid\"} == 1").map_or(0, |v| v.len());
        if up == nodes {
            break;
        }
        assert!(
            Instant::now() < end,
            "{up} of {nodes} nodes up in Prometheus"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The stream ends (the capture stops); every node settles, then is scraped again.
    net.wait_viewers();
    if let Some(c) = net.capture.as_mut() {
        c.wait(Duration::from_secs(15)).expect("the capture stops");
    }
    std::thread::sleep(Duration::from_secs(3));
    let stats = std::fs::read_to_string(&capture_stats).expect("capture stats");
    let sent = serde_json::from_str::<serde_json::Value>(stats.lines().last().expect("a line"))
        .expect("JSON")["packets"]
        .as_f64()
        .expect("packets");
    assert!(sent > 1000.0, "{sent}");
    // Each entry point forwarded every packet the capture sent; each set reflector
    // released every one of them, in order, with no gap.
    let forwarded = query(&base, "braid_entrypoint_forwarded_total");
    assert_eq!(forwarded.len(), net.entries.len());
    for (labels, v) in forwarded {
        assert_eq!(v, sent, "{labels}");
    }
    let released = query(
        &base,
        "sum by (instance) (braid_merge_released_total{role=\"set\"})",
    );
    assert_eq!(released.len(), net.sets.len());
    for (labels, v) in released {
        assert_eq!(v, sent, "set {labels}");
    }
    let gaps = query(&base, "sum(braid_merge_gaps_total)");
    assert_eq!(gaps[0].1, 0.0);
    // At every set reflector and the edge, the first copies that came on each path add
    // up to the packets released (and those dropped with a stream closed mid-flight).
    let firsts = query(&base, FIRSTS_LESS_RELEASED);
    assert_eq!(firsts.len(), net.sets.len() + 1);
    for (labels, v) in firsts {
        assert_eq!(v, 0.0, "first arrivals against released at {labels}");
    }
    // The data-path metrics the dashboard queries exist in the scrape.
    let mut names = ureq::get(&format!("{base}/api/v1/label/__name__/values"))
        .call()
        .expect("names");
    let names = names.body_mut().read_to_string().expect("a body");
    for m in [
        "braid_path_first_total",
        "braid_path_received_total",
        "braid_merge_gaps_total",
        "braid_merge_nacked_total",
        "braid_merge_repaired_total",
        "braid_viewers",
        "braid_streams_open",
        "braid_stream_subscribers",
        "braid_udp_sent_bytes_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(wanted.iter().any(|w| w == m), "{m} is on the dashboard");
        assert!(names.contains(&format!("\"{m}\"")), "{m} scraped");
    }
}

/// Per node: first copies less packets released less packets dropped with a stream the
/// node closed while they waited (0 where none was): zero when nothing went missing.
const FIRSTS_LESS_RELEASED: &str = "sum by (instance) (braid_path_first_total) \
     - sum by (instance) (braid_merge_released_total) \
     - (sum by (instance) (braid_dropped_total{reason=\"stream_closed\"}) \
        or sum by (instance) (braid_merge_released_total) * 0)";
