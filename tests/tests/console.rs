//! Issue 14, acceptance 5: the control server's console, loaded in headless Chromium
//! (Debian's) during a run, shows every node, stream and viewer count the JSON API
//! reports. A screenshot is kept beside the test's logs (`BRAID_TEST_KEEP=1`). Without
//! chromium it says so loudly and does nothing.

use std::process::Command;
use std::time::Duration;

use braid_tests::{ControlNet, Proc};

const SECRET: &str = "console test token secret";

/// Runs headless Chromium on `url` with `args` (its DOM or a screenshot).
fn chromium(dir: &std::path::Path, url: &str, args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--virtual-time-budget=8000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium-profile").display()
        ))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The opening tag of the first element whose attributes hold `needle`.
fn tag_with<'a>(dom: &'a str, needle: &str) -> Option<&'a str> {
    let i = dom.find(needle)?;
    let start = dom[..i].rfind('<')?;
    let end = i + dom[i..].find('>')?;
    Some(&dom[start..=end])
}

#[test]
fn the_console_shows_every_node_stream_and_viewer_count_the_api_reports() {
    if Command::new("chromium").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED the_console_shows_every_node_stream_and_viewer_count_the_api_reports: \
             no chromium (the README's test command installs Debian's)"
        );
        return;
    }
    let net = ControlNet::start(1, 1, 30.0, SECRET, |_| vec![]);
    let token = |c: u64| {
        braid_core::token::Signer::new(SECRET).sign(&braid_core::token::Claims {
            stream: braid_core::StreamId(1),
            client: braid_core::ClientId(c),
            expires: u64::MAX,
        })
    };
    let _viewers: Vec<Proc> = (0..3)
        .map(|i| {
            net.viewer(
                &format!("v{i}"),
                70 + i,
                20.0,
                &["--token".into(), token(70 + i)],
            )
        })
        .collect();
    // Every node reports each second, and the console's history samples every 5 s.
    std::thread::sleep(Duration::from_secs(8));
    let url = format!("{}/", net.urls()[0]);
    let dom = chromium(net.path("").as_path(), &url, &["--dump-dom"]);
    let status: serde_json::Value = {
        let mut r = ureq::get(&format!("{}/v1/status", net.urls()[0]))
            .call()
            .expect("status");
        serde_json::from_str(&r.body_mut().read_to_string().expect("a body")).expect("JSON")
    };
    std::fs::write(net.path("console.html"), &dom).expect("write");
    assert!(
        dom.contains("data-loaded=\"1\""),
        "the page drew the API's answer: {dom}"
    );
    let nodes = status["nodes"].as_array().expect("nodes");
    assert!(
        nodes.len() >= 5,
        "three set reflectors and two edges: {status}"
    );
    let mut streams = 0;
    for n in nodes {
        let addr = n["addr"].as_str().expect("addr");
        let row = tag_with(&dom, &format!("data-addr=\"{addr}\""))
            .unwrap_or_else(|| panic!("node {addr} is on the console"));
        assert!(row.contains(&format!(
            "data-role=\"{}\"",
            n["role"].as_str().expect("role")
        )));
        assert!(row.contains("data-state=\"live\""), "{row}");
        if n["role"] == "edge" {
            assert!(
                row.contains(&format!("data-viewers=\"{}\"", n["viewers"])),
                "edge {addr}: the console shows the viewers the API reports ({row}; {n})"
            );
        }
        for st in n["streams"].as_array().expect("streams") {
            streams += 1;
            let needle = format!("data-stream=\"{}\" data-node=\"{}\"", st["id"], n["node"]);
            let row = tag_with(&dom, &needle).unwrap_or_else(|| {
                panic!(
                    "stream {} at node {} is on the console",
                    st["id"], n["node"]
                )
            });
            assert!(
                row.contains(&format!("data-viewers=\"{}\"", st["viewers"])),
                "{row}"
            );
        }
    }
    assert!(
        streams >= 5,
        "every set reflector and edge reported stream 1 ({streams}): {status}"
    );
    let total: u64 = nodes
        .iter()
        .filter(|n| n["role"] == "edge")
        .map(|n| n["viewers"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 3, "three viewers watch: {status}");
    for set in ["even", "odd"] {
        let v: u64 = nodes
            .iter()
            .filter(|n| n["set"] == set)
            .map(|n| n["viewers"].as_u64().unwrap_or(0))
            .sum();
        let row = tag_with(&dom, &format!("data-set=\"{set}\""))
            .unwrap_or_else(|| panic!("the {set} set is on the console"));
        assert!(row.contains(&format!("data-viewers=\"{v}\"")), "{row}");
    }
    assert!(dom.contains("id=\"chart-viewers\"") && dom.contains("data-points="));
    // A screenshot, kept with the logs.
    let shot = net.path("console.png");
    chromium(
        net.path("").as_path(),
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1100",
        ],
    );
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "a screenshot"
    );
}
