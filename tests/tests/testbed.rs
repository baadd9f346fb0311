//! Acceptance 5 of the viewers issue: the README's first command, with a short
//! `--duration`, ends by itself with a summary showing the stream delivered to its clients
//! (a ladder of three renditions, each client's shown in the table).

use std::process::Command;

use braid_tests::bin;

#[test]
fn testbed_runs_a_whole_network_and_ends_with_a_summary() {
    let out = Command::new(bin("braid-testbed"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/testbed.toml"),
            "--duration",
            "6",
        ])
        .output()
        .expect("running the testbed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "testbed failed:\n{stdout}\n{stderr}");
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
