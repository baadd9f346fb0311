//! Issue 14: the Debian package installs, its systemd units pass `systemd-analyze
//! verify`, and every example config it installs passes `--check` with the secrets the
//! install made. Needs root (it installs into the system and removes it after); without
//! root or the tools, it says so loudly and does nothing.

use std::path::Path;
use std::process::Command;

/// Purges the package when dropped, also when the test fails.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "braid"]).output();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

#[test]
fn the_debian_package_installs_units_and_configs_that_check() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = ["dpkg-deb", "dpkg", "systemd-analyze", "strip"]
        .iter()
        .all(|t| {
            Command::new("which")
                .arg(t)
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if !root || !tools {
        eprintln!(
            "SKIPPED the_debian_package_installs_units_and_configs_that_check: needs root and \
             dpkg-deb, dpkg, systemd-analyze, strip (root {root}, tools {tools})"
        );
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = braid_tests::test_dir();
    let deb = run(Command::new(repo.join("ops/package/build-deb.sh")).args([
        "--profile",
        "debug",
        "--out",
        dir.path().to_str().expect("utf-8"),
    ]));
    let deb = deb
        .trim()
        .lines()
        .last()
        .expect("the package's path")
        .to_owned();
    let _installed = Installed;
    run(Command::new("dpkg").args(["-i", &deb]));
    // The units, one instance of each template per shipped config.
    let units = [
        "braid-reflector@set",
        "braid-reflector@edge",
        "braid-entrypoint@main",
        "braid-control@main",
        "braid-capture@main",
    ];
    for u in units {
        let text = run(Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("/lib/systemd/system/{u}.service")));
        assert!(!text.contains("ignoring"), "{u}: {text}");
    }
    // The secrets the install made: readable by root and the braid group only.
    let env = std::fs::read_to_string("/etc/braid/braid.env").expect("braid.env");
    let meta = std::fs::metadata("/etc/braid/braid.env").expect("braid.env");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o640
    );
    let vars: Vec<(String, String)> = env
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert_eq!(vars.len(), 4, "{env}");
    for (k, v) in &vars {
        assert!(
            v.len() >= 16 && !v.contains('@'),
            "{k} was made at install: {v}"
        );
    }
    for (bin, config) in [
        ("braid-reflector", "reflector-set"),
        ("braid-reflector", "reflector-edge"),
        ("braid-entrypoint", "entrypoint-main"),
        ("braid-control", "control-main"),
        ("braid-capture", "capture-main"),
    ] {
        let text = run(Command::new(format!("/usr/bin/{bin}"))
            .args(["--config", &format!("/etc/braid/{config}.toml"), "--check"])
            .env_clear()
            .envs(vars.iter().cloned()));
        assert!(text.contains("configuration ok"), "{config}: {text}");
    }
    // The user the units run as.
    run(Command::new("getent").args(["passwd", "braid"]));
}
