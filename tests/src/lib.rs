//! braid-tests: whole-network tests that run the real daemons as processes on 127.0.0.1
//! (`tests/`), with what they share.
//!
//! # Layout
//!
//! - [`compare`]: checks a viewer's output against what the capture sent: byte for byte,
//!   and from near its start to near its end.
//! - The process harness lives in `braid_ops::harness` (re-exported here).

pub use braid_ops::harness::crowd;
pub use braid_ops::harness::*;

/// SIGKILLs set reflector `set` 6 s into the stream and entry point 0 `then` later,
/// waits for the viewers, and asserts each got the source byte for byte.
pub fn kill_a_set_reflector_then_an_entry_point(
    net: &mut Net,
    set: usize,
    then: std::time::Duration,
) {
    std::thread::sleep(std::time::Duration::from_secs(6));
    net.sets[set].kill();
    std::thread::sleep(then);
    net.entries[0].kill();
    net.wait_viewers();
    assert_viewers_exact(net);
}

/// Asserts every viewer of `net` got the source byte for byte from where it joined to
/// where it exited, with no gap ([`compare::assert_whole`]). Call after
/// [`Net::wait_viewers`], which notes how far the capture had got at each exit.
pub fn assert_viewers_exact(net: &Net) {
    assert_eq!(
        net.exits.len(),
        net.spec.viewers,
        "wait_viewers first: it notes where the stream was when each viewer exited"
    );
    for (i, exit) in net.exits.iter().enumerate() {
        compare::assert_whole(
            &net.path("tee.ts"),
            &net.path(&format!("view{i}.ts")),
            &compare::Whole {
                bytes_per_sec: net.spec.bitrate as f64 / 8.0,
                seconds: net.spec.seconds,
                tee_at_exit: exit.tee_len,
            },
        );
        let stats = net.viewer_stats(i);
        assert_eq!(stats["gaps"], 0, "viewer {i}: {stats}");
    }
}

/// Checks viewers' output against the capture's tee.
pub mod compare {
    use std::path::Path;

    /// Seconds of its run a viewer may spend without output: asking for the stream, the
    /// first keyframe and the playout buffer's first 300 ms. (A viewer that joins a
    /// running stream starts at the latest keyframe, up to a second of stream back: the
    /// viewers of the tests hold from 0.8 s less to 0.3 s more than their run.)
    pub const START_ALLOWANCE_S: f64 = 2.0;

    /// Seconds of stream a viewer's output may end short of what the capture had sent
    /// when the viewer exited: a frame on its way (40 ms at 25 fps), a packet held
    /// for a repair, the 20 ms within which its exit is seen, and a loaded machine (the
    /// viewers of the tests end within 0.05 s of it).
    pub const END_ALLOWANCE_S: f64 = 1.0;

    /// What a viewer's output must hold to be the whole stream over its run.
    #[derive(Debug, Clone, Copy)]
    pub struct Whole {
        /// The stream's rate, bytes of TS per second.
        pub bytes_per_sec: f64,
        /// Seconds the viewer ran (its `--duration`).
        pub seconds: f64,
        /// The tee's length when the viewer exited ([`crate::Exit::tee_len`]).
        pub tee_at_exit: u64,
    }

    /// Asserts `view` is `tee` byte for byte from where it starts ([`assert_contiguous`]),
    /// holds at least `seconds` minus [`START_ALLOWANCE_S`] of stream, and ends at most
    /// [`END_ALLOWANCE_S`] of stream before where the capture was when the viewer exited:
    /// a viewer that got a little and then stalled, or started late, fails. Returns the
    /// bytes it holds.
    pub fn assert_whole(tee: &Path, view: &Path, whole: &Whole) -> usize {
        let (start, len) = locate(tee, view);
        let floor = whole.bytes_per_sec * (whole.seconds - START_ALLOWANCE_S);
        let end = (start + len) as f64;
        let short = whole.tee_at_exit as f64 - end;
        eprintln!(
            "{}: {len} bytes ({:.2} s of stream, floor {:.2} s); ends {:.3} s of stream before the capture at its exit (at most {END_ALLOWANCE_S} s)",
            view.display(),
            len as f64 / whole.bytes_per_sec,
            whole.seconds - START_ALLOWANCE_S,
            short / whole.bytes_per_sec,
        );
        assert!(
            len as f64 >= floor,
            "{}: {len} bytes, {:.2} s of stream in a {} s run (at least {:.2} s expected)",
            view.display(),
            len as f64 / whole.bytes_per_sec,
            whole.seconds,
            whole.seconds - START_ALLOWANCE_S
        );
        assert!(
            short <= whole.bytes_per_sec * END_ALLOWANCE_S,
            "{}: ends {:.2} s of stream before what the capture had sent when the viewer exited (at most {END_ALLOWANCE_S} s): the stream stopped reaching it",
            view.display(),
            short / whole.bytes_per_sec
        );
        len
    }

    /// Where `view` starts in `tee` and whether it continues byte for byte to its end.
    /// Panics with a useful message when it does not. This checks the bytes only; a
    /// test of delivery checks how much came and until when with [`assert_whole`].
    pub fn assert_contiguous(tee: &Path, view: &Path) -> usize {
        locate(tee, view).1
    }

    /// Where `view` starts in `tee`, and its length, having checked it continues `tee`
    /// byte for byte.
    fn locate(tee: &Path, view: &Path) -> (usize, usize) {
        let t = std::fs::read(tee).expect("reading the tee");
        let v = std::fs::read(view).expect("reading the viewer's output");
        assert!(
            v.len() >= 188 * 100,
            "{} holds only {} bytes",
            view.display(),
            v.len()
        );
        let head = &v[..1316.min(v.len())];
        let start = t
            .windows(head.len())
            .position(|w| w == head)
            .unwrap_or_else(|| panic!("{}: the first bytes were never sent", view.display()));
        let end = start + v.len();
        assert!(
            end <= t.len(),
            "{}: longer than what was sent after its start",
            view.display()
        );
        if t[start..end] != v[..] {
            let first_diff = t[start..end]
                .iter()
                .zip(&v)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{}: differs from what was sent at byte {first_diff} of {} (TS packet {})",
                view.display(),
                v.len(),
                first_diff / 188
            );
        }
        (start, v.len())
    }

    /// A run of a viewer's output that is one source's bytes, unbroken.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Piece {
        /// Which of the sources it comes from.
        pub source: usize,
        /// Where in that source it starts, bytes.
        pub at: usize,
        /// Its length, bytes.
        pub len: usize,
    }

    /// Cuts `view` into the runs it is made of, each found byte for byte in one of
    /// `sources` (the tees of successive captures, say), in order. Panics with a useful
    /// message where a run is in none of them, or where the output goes backwards.
    pub fn pieces(sources: &[&Path], view: &Path) -> Vec<Piece> {
        let srcs: Vec<Vec<u8>> = sources
            .iter()
            .map(|p| std::fs::read(p).expect("reading a source"))
            .collect();
        let v = std::fs::read(view).expect("reading the viewer's output");
        assert!(
            !v.is_empty() && v.len() % 188 == 0,
            "{}: {} bytes, not whole TS packets",
            view.display(),
            v.len()
        );
        let mut out: Vec<Piece> = Vec::new();
        let mut pos = 0;
        while pos < v.len() {
            let head = &v[pos..pos + 188];
            // The next run starts where the previous one left off or later, in the same
            // source or a later one; tees hold whole TS packets.
            // Of the places it could continue (tables repeat), the longest run wins.
            let from = out.last().map_or((0, 0), |p| (p.source, p.at + p.len));
            let run = |i: usize, at: usize| {
                srcs[i][at..]
                    .iter()
                    .zip(&v[pos..])
                    .take_while(|(a, b)| a == b)
                    .count()
                    / 188
                    * 188
            };
            let srcs = &srcs;
            let found = (from.0..srcs.len())
                .flat_map(|i| {
                    let start = if i == from.0 { from.1 } else { 0 };
                    (start..srcs[i].len().saturating_sub(187))
                        .step_by(188)
                        .filter(move |&at| &srcs[i][at..at + 188] == head)
                        .map(move |at| (i, at))
                })
                .map(|(i, at)| (run(i, at), i, at))
                .max_by_key(|&(len, i, at)| (len, std::cmp::Reverse((i, at))));
            let Some((len, source, at)) = found else {
                panic!(
                    "{}: TS packet {} (byte {pos}) is in no source after the previous run {:?}",
                    view.display(),
                    pos / 188,
                    out.last()
                );
            };
            out.push(Piece { source, at, len });
            pos += len;
        }
        out
    }

    /// Whether a viewer can start decoding at `at` in `ts`: a random-access point (the
    /// adaptation field's flag) within the first few TS packets, after the tables a
    /// keyframe's packet carries first.
    pub fn starts_at_keyframe(ts: &[u8], at: usize) -> bool {
        ts[at..]
            .chunks(188)
            .take(4)
            .any(|p| p.len() > 5 && p[3] & 0x20 != 0 && p[4] > 0 && p[5] & 0x40 != 0)
    }

    /// How many TS packets of the part of `tee` that `view` spans are missing from
    /// `view`, checking that everything `view` holds was sent, in order.
    pub fn missing_ts_packets(tee: &Path, view: &Path) -> (usize, usize) {
        let t = std::fs::read(tee).expect("reading the tee");
        let v = std::fs::read(view).expect("reading the viewer's output");
        assert_eq!(v.len() % 188, 0, "whole TS packets only");
        let tp: Vec<&[u8]> = t.chunks(188).collect();
        let vp: Vec<&[u8]> = v.chunks(188).collect();
        let mut i = tp
            .iter()
            .position(|p| *p == vp[0])
            .expect("the first packet was sent");
        let mut missing = 0;
        for p in &vp {
            let j = tp[i..].iter().position(|q| q == p).unwrap_or_else(|| {
                panic!("a received TS packet was never sent (or came out of order)")
            });
            missing += j;
            i += j + 1;
        }
        (missing, vp.len())
    }
}

/// The control server's console in headless Chromium (Debian's), checked against the
/// JSON API it draws from.
pub mod console {
    use std::process::Command;

    /// Why Chromium cannot run here, if it cannot.
    pub fn unavailable() -> Option<&'static str> {
        Command::new("chromium")
            .arg("--version")
            .output()
            .is_err()
            .then_some("no chromium (the README's test command installs Debian's)")
    }

    /// Runs headless Chromium on `url` with `args` (`--dump-dom`, or a screenshot), in
    /// network namespace `netns` when given (a host of `braid_ops::hosts::Hosts`), with
    /// its profile in `dir`; what it printed.
    pub fn chromium(
        dir: &std::path::Path,
        netns: Option<&str>,
        url: &str,
        args: &[&str],
    ) -> String {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "chromium"]);
                c
            }
            None => Command::new("chromium"),
        };
        let out = cmd
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
    pub fn tag_with<'a>(dom: &'a str, needle: &str) -> Option<&'a str> {
        let i = dom.find(needle)?;
        let start = dom[..i].rfind('<')?;
        let end = i + dom[i..].find('>')?;
        Some(&dom[start..=end])
    }

    /// Asserts the console's DOM shows what `status` (`/v1/status`) reports: every node
    /// with its role and state (live), each edge's viewers, every stream at every node
    /// with its viewers and its source (what the entry points report), each set's
    /// viewers, and the charts; and that the API itself reports `roles` (how many nodes
    /// of each role: `entrypoint`, `set`, `edge`), each carrying the stream (edges while
    /// they have viewers), and `viewers` viewers in all.
    pub fn assert_shows(
        dom: &str,
        status: &serde_json::Value,
        roles: &[(&str, usize)],
        viewers: u64,
    ) {
        assert!(
            dom.contains("data-loaded=\"1\""),
            "the page drew the API's answer: {dom}"
        );
        let listed = status["nodes"].as_array().expect("nodes");
        for (role, count) in roles {
            assert_eq!(
                listed.iter().filter(|n| n["role"] == *role).count(),
                *count,
                "{role} nodes: {status}"
            );
        }
        let nodes: usize = roles.iter().map(|(_, c)| c).sum();
        assert_eq!(listed.len(), nodes, "{status}");
        // The stream's sources, as the entry points report them.
        let mut sources: Vec<String> = listed
            .iter()
            .filter(|n| n["role"] == "entrypoint")
            .flat_map(|n| n["streams"].as_array().cloned().unwrap_or_default())
            .flat_map(|st| st["sources"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        sources.sort();
        sources.dedup();
        assert!(
            !sources.is_empty(),
            "the entry points name the source: {status}"
        );
        let sources = sources.join(" ");
        let mut streams = 0;
        for n in listed {
            let addr = n["addr"].as_str().expect("addr");
            let row = tag_with(dom, &format!("data-addr=\"{addr}\""))
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
                let row = tag_with(dom, &needle).unwrap_or_else(|| {
                    panic!(
                        "stream {} at node {} is on the console",
                        st["id"], n["node"]
                    )
                });
                assert!(
                    row.contains(&format!("data-viewers=\"{}\"", st["viewers"])),
                    "{row}"
                );
                assert!(
                    row.contains(&format!("data-sources=\"{sources}\"")),
                    "every stream row names its source ({sources}): {row}"
                );
            }
        }
        // Entry points and set reflectors carry the stream whoever watches; an edge
        // subscribes to it while it has viewers.
        let carrying = listed
            .iter()
            .filter(|n| n["role"] != "edge" || n["viewers"].as_u64() > Some(0))
            .count();
        assert!(
            streams >= carrying,
            "every node carrying the stream reported it: {status}"
        );
        let total: u64 = listed
            .iter()
            .filter(|n| n["role"] == "edge")
            .map(|n| n["viewers"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(total, viewers, "every viewer watches: {status}");
        for set in ["even", "odd"] {
            let v: u64 = listed
                .iter()
                .filter(|n| n["set"] == set)
                .map(|n| n["viewers"].as_u64().unwrap_or(0))
                .sum();
            let row = tag_with(dom, &format!("data-set=\"{set}\""))
                .unwrap_or_else(|| panic!("the {set} set is on the console"));
            assert!(row.contains(&format!("data-viewers=\"{v}\"")), "{row}");
        }
        assert!(dom.contains("id=\"chart-viewers\"") && dom.contains("data-points="));
    }
}
