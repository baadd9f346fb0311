//! Acceptance 5 of the viewers issue: the README's first command, with a short
//! `--duration`, ends by itself with a summary showing the stream delivered to its clients
//! (a ladder of three renditions, each client's shown in the table). While it runs, its
//! control server lists the ladder's renditions as the HLS variants, each on an edge of
//! either set, and an edge serves each rendition's playlist.

use std::process::Command;
use std::time::{Duration, Instant};

use braid_tests::{Proc, bin};

fn get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    match agent.get(url).call() {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

#[test]
fn testbed_runs_a_whole_network_and_ends_with_a_summary() {
    let dir = braid_tests::test_dir();
    let run = dir.path().join("run");
    let child = braid_tests::die_with_parent({
        let mut c = Command::new(bin("braid-testbed"));
        c.args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/testbed.toml"),
            "--duration",
            "12",
            "--dir",
        ])
        .arg(&run)
        .stdout(std::fs::File::create(dir.path().join("stdout")).expect("a file"))
        .stderr(std::fs::File::create(dir.path().join("stderr")).expect("a file"));
        c
    })
    .spawn()
    .expect("running the testbed");
    let mut testbed = Proc::adopt("testbed", child);
    // While it runs: the multivariant playlist holds the ladder, each rendition twice
    // (redundant variants on the two sets), and an edge serves the top rendition.
    let end = Instant::now() + Duration::from_secs(10);
    let (control, variants) = loop {
        let manifest = std::fs::read_to_string(run.join("testbed.json")).unwrap_or_default();
        let control = serde_json::from_str::<serde_json::Value>(&manifest)
            .ok()
            .and_then(|m| m["control"][0].as_str().map(str::to_owned));
        if let Some(control) = control {
            let (status, text) = get(&format!("{control}/hls/1.m3u8"));
            let uris: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("http"))
                .map(str::to_owned)
                .collect();
            if status == 200 && uris.len() == 6 {
                break (control, uris);
            }
        }
        assert!(
            Instant::now() < end,
            "a multivariant playlist with the ladder"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for (i, id) in [1, 1, 2, 2, 3, 3].into_iter().enumerate() {
        assert!(
            variants[i].contains(&format!("/hls/{id}/playlist.m3u8")),
            "{control}: {variants:?}"
        );
    }
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = get(&variants[5]);
        if status == 200 && text.contains("#EXTINF") {
            break;
        }
        assert!(Instant::now() < end, "{}: {status} {text}", variants[5]);
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = testbed
        .wait(Duration::from_secs(60))
        .expect("the testbed ends");
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    let (stdout, stderr) = (read("stdout"), read("stderr"));
    assert!(status.success(), "testbed failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("every client got the stream with no gap"),
        "{stdout}"
    );
    let clients: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("client"))
        .collect();
    assert_eq!(clients.len(), 4, "{stdout}");
    for line in clients {
        let packets: u64 = line
            .split(": ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        // A ladder's lowest rendition (1 Mbit/s) is about 95 packets a second.
        assert!(packets > 300, "{line}");
    }
    // Clients get renditions of the ladder, shown per client.
    assert!(stderr.contains("kbps ("), "{stderr}");
    // The live table shows both port-parity sets.
    assert!(
        stderr.contains("even") && stderr.contains("odd"),
        "{stderr}"
    );
}
