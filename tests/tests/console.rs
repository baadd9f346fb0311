//! Issue 14, acceptance 5: the control server's console, loaded in headless Chromium
//! (Debian's) during a run, shows every node, stream and viewer count the JSON API
//! reports. A screenshot is kept in `target/artifacts/console.png`. Without
//! chromium it says so loudly and does nothing.

use std::time::Duration;

use braid_tests::{ControlNet, Proc, console};

const SECRET: &str = "console test token secret";

#[test]
fn the_console_shows_every_node_stream_and_viewer_count_the_api_reports() {
    if let Some(why) = console::unavailable() {
        eprintln!(
            "SKIPPED the_console_shows_every_node_stream_and_viewer_count_the_api_reports: {why}"
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
    let dom = console::chromium(net.path("").as_path(), None, &url, &["--dump-dom"]);
    let status: serde_json::Value = {
        let mut r = ureq::get(&format!("{}/v1/status", net.urls()[0]))
            .call()
            .expect("status");
        serde_json::from_str(&r.body_mut().read_to_string().expect("a body")).expect("JSON")
    };
    std::fs::write(net.path("console.html"), &dom).expect("write");
    console::assert_shows(
        &dom,
        &status,
        &[("entrypoint", 2), ("set", 3), ("edge", 2)],
        3,
    );
    // A screenshot, kept with the logs.
    let shot = net.path("console.png");
    console::chromium(
        net.path("").as_path(),
        None,
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
    // Kept as CI's artefact, where a run's test directories are removed.
    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/artifacts");
    std::fs::create_dir_all(&artifacts).expect("a directory");
    std::fs::copy(&shot, artifacts.join("console.png")).expect("copy the screenshot");
}
