//! Issue 13: delivery matched to each viewer. A viewer's link is capped for real (its own
//! network namespace, `tc ... tbf` on its veth); the edge measures what the viewer
//! takes, and the control server places viewers it reported slow on low-cost edges.
//! Without root it says so loudly and does nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use braid_ops::hosts::Hosts;
use braid_tests::Proc;

/// The ladder: stream ids and nominal rates, kbit/s.
const LADDER: [(u32, u64); 3] = [(11, 1000), (12, 2500), (13, 5000)];

/// `seconds` of one H.264/AAC source (ffmpeg's test card and a tone) encoded three
/// times, for the ladder's 1, 2.5 and 5 Mbit/s: video at a constant 0.7, 2.0 and 4.2
/// Mbit/s, a keyframe every second at the same time stamps in all three.
fn ladder_media(dir: &Path, seconds: u32) -> Vec<PathBuf> {
    let d = seconds.to_string();
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size=640x360:rate=25:duration={d}"))
        .args(["-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=440:duration={d}"));
    let mut out = Vec::new();
    for (i, kbps) in ["700", "2000", "4200"].iter().enumerate() {
        let path = dir.join(format!("rendition{i}.ts"));
        cmd.args([
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ])
        .args(["-g", "25", "-keyint_min", "25", "-sc_threshold", "0"])
        .args(["-b:v", &format!("{kbps}k"), "-maxrate", &format!("{kbps}k")])
        .args([
            "-bufsize",
            &format!("{kbps}k"),
            "-c:a",
            "aac",
            "-b:a",
            "64k",
        ])
        .args(["-f", "mpegts"])
        .arg(&path);
        out.push(path);
    }
    let ok = cmd.status().is_ok_and(|s| s.success());
    assert!(ok, "ffmpeg made the ladder (ops/test.sh installs ffmpeg)");
    out
}

/// `path`'s TS packets, continuity counters masked (the client shifts them across a
/// change of rendition; nothing else of a packet may differ).
fn masked_packets(path: &Path) -> Vec<[u8; 188]> {
    let data = std::fs::read(path).expect("a TS file");
    data.chunks_exact(188)
        .map(|c| {
            let mut p = [0u8; 188];
            p.copy_from_slice(c);
            p[3] &= 0xf0;
            p
        })
        .collect()
}

/// How `view` is made of the sources: runs of packets each a contiguous cut of one
/// source, as (source, first packet, length), found greedily (the longest run that
/// starts with the next packet). Panics at a packet found in no source.
fn cuts(view: &[[u8; 188]], sources: &[Vec<[u8; 188]>]) -> Vec<(usize, usize, usize)> {
    let mut index: HashMap<&[u8; 188], Vec<(usize, usize)>> = HashMap::new();
    for (s, packets) in sources.iter().enumerate() {
        for (i, p) in packets.iter().enumerate() {
            index.entry(p).or_default().push((s, i));
        }
    }
    let run = |at: usize, s: usize, from: usize, most: usize| {
        (0..most)
            .take_while(|k| {
                sources[s]
                    .get(from + k)
                    .is_some_and(|p| Some(p) == view.get(at + k))
            })
            .count()
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < view.len() {
        let best = index
            .get(&view[at])
            .unwrap_or_else(|| panic!("packet {at} of the output is in no rendition's source"))
            .iter()
            .map(|&(s, i)| (s, i, run(at, s, i, 256)))
            .max_by_key(|c| c.2)
            .expect("a candidate");
        let len = run(at, best.0, best.1, usize::MAX);
        out.push((best.0, best.1, len));
        at += len;
    }
    out
}

/// `path` up to its last keyframe (a recording stopped mid-frame ends with half a
/// frame), decoded by ffmpeg: its error lines.
fn decode_errors(path: &Path) -> Vec<String> {
    let data = std::fs::read(path).expect("the output");
    let last_key = data
        .chunks_exact(188)
        .rposition(|p| p[3] & 0x20 != 0 && p[4] > 0 && p[5] & 0x40 != 0)
        .unwrap_or(0);
    let trimmed = path.with_extension("trimmed.ts");
    std::fs::write(&trimmed, &data[..last_key * 188]).expect("write");
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(&trimmed)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The viewer's last stats line.
fn last_stats(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(text.lines().last()?).ok()
}

/// Waits up to `limit` for the viewer's rendition to be `index`; how long it took.
fn until_rendition(stats: &Path, index: u64, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        let now = last_stats(stats).and_then(|s| s["rendition"]["index"].as_u64());
        if now == Some(index) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Acceptance 1: three renditions of real H.264/AAC; a viewer whose link (its own
/// namespace, `tc ... tbf`) is capped at 3 Mbit/s settles on 2.5 Mbps within about 5 s
/// and stays there, climbs back to 5 Mbps within about 10 s of the cap's lift, loses
/// nothing, and writes one TS that ffmpeg decodes with no error across every change,
/// each stretch of it a byte-exact cut of that rendition's source (continuity counters
/// aside, which the client shifts).
#[test]
fn a_capped_viewer_settles_under_the_cap_climbs_when_lifted_and_decodes_throughout() {
    const TEST: &str =
        "a_capped_viewer_settles_under_the_cap_climbs_when_lifted_and_decodes_throughout";
    let names = ["capture", "entry", "set0", "set1", "edge", "viewer"];
    let hosts = match Hosts::new(&names) {
        Ok(h) => h,
        Err(why) => {
            eprintln!("SKIPPED {TEST}: {why}");
            return;
        }
    };
    let dir = braid_tests::test_dir();
    let p = |f: &str| dir.path().join(f);
    let media = ladder_media(dir.path(), 75);
    let at = |h: &str, port: u16| format!("{}:{port}", hosts.get(h).addr);
    let s = |v: &str| v.to_string();
    let start = |h: &str, bin: &str, mut args: Vec<String>| {
        args.extend([s("--metrics"), at(h, 9600)]);
        Proc::start_in(&hosts.get(h).netns, h, bin, &args, &p(&format!("{h}.log")))
    };
    let sets = [at("set0", 9100), at("set1", 9100)];
    let mut procs = Vec::new();
    for h in ["set0", "set1"] {
        let a = vec![
            s("--role"),
            s("set"),
            s("--listen"),
            at(h, 9100),
            s("--upstream"),
            at("entry", 9001),
        ];
        procs.push(start(h, "braid-reflector", a));
    }
    let mut a = vec![s("--listen"), at("entry", 9001)];
    for (id, _) in LADDER {
        let stream = format!("{id}:{}:{}", braid_tests::STREAM_KEY, sets.join(","));
        a.extend([s("--stream"), stream]);
    }
    procs.push(start("entry", "braid-entrypoint", a));
    let ladder: Vec<String> = LADDER.iter().map(|(id, k)| format!("{id}:{k}")).collect();
    let mut a = vec![s("--role"), s("edge"), s("--listen"), at("edge", 9200)];
    a.extend([s("--ladder"), ladder.join(",")]);
    // The ring holds as much as the viewer's buffer, and a rendition left keeps it as
    // long, so every repair the viewer asks for within its buffer is there to answer
    // (with the defaults, 4 s and 5 s, two full-suite runs lost 23 and 59 packets the
    // link dropped before the move down, waited for all 10 s; alone it lost none).
    a.extend([s("--ring-seconds"), s("12"), s("--linger-ms"), s("12000")]);
    for set in &sets {
        a.extend([s("--reflector"), set.clone()]);
    }
    procs.push(start("edge", "braid-reflector", a));
    let mut captures = Vec::new();
    for (i, (id, _)) in LADDER.iter().enumerate() {
        let name = format!("capture{id}");
        captures.push(Proc::spawn_in(
            &hosts.get("capture").netns,
            &name,
            "braid-capture",
            &[
                s("--stream"),
                id.to_string(),
                s("--stream-key"),
                s(braid_tests::STREAM_KEY),
                s("--source"),
                media[i].display().to_string(),
                s("--entry"),
                at("entry", 9001),
                s("--tee"),
                p(&format!("tee{id}.ts")).display().to_string(),
            ],
            &p(&format!("{name}.log")),
        ));
    }
    let stats = p("view.json");
    let mut viewer = Proc::spawn_in(
        &hosts.get("viewer").netns,
        "viewer",
        "braid-client",
        &[
            s("--edge"),
            at("edge", 9200),
            s("--stream"),
            s("11"),
            // Until it moves down (2 to 4 s), the top rendition overflows the cap and
            // the link drops the excess (1.4 Mbit/s); the spare 0.8 Mbit/s after the
            // move repairs it only within a long buffer: with 3 s one run in three lost
            // packets, with 5 s one full-suite run of two did. 10 s, the client's most.
            s("--buffer-ms"),
            s("10000"),
            s("--out"),
            p("view.ts").display().to_string(),
            s("--stats-json"),
            stats.display().to_string(),
            s("--duration"),
            s("60"),
            s("--start-timeout"),
            s("10"),
        ],
        &p("viewer.log"),
    );
    // Uncapped, it climbs to the top: a probe at each step.
    let top = until_rendition(&stats, 2, Duration::from_secs(30));
    assert!(top.is_some(), "climbed to 5 Mbps: {:?}", last_stats(&stats));
    std::thread::sleep(Duration::from_secs(2));
    hosts.limit("viewer", "3mbit");
    let settled = until_rendition(&stats, 1, Duration::from_secs(15))
        .unwrap_or_else(|| panic!("down to 2.5 Mbps under the cap: {:?}", last_stats(&stats)));
    let changes = |s: &serde_json::Value| s["renditions"].as_array().map_or(0, Vec::len);
    let at_settle = last_stats(&stats).map_or(0, |s| changes(&s));
    std::thread::sleep(Duration::from_secs(14));
    let capped = last_stats(&stats).expect("stats");
    assert_eq!(
        capped["rendition"]["index"], 1,
        "stayed on 2.5 Mbps under the cap: {capped}"
    );
    assert_eq!(
        changes(&capped),
        at_settle,
        "no change once settled: {capped}"
    );
    hosts.unlimit("viewer");
    let climbed = until_rendition(&stats, 2, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("back to 5 Mbps once lifted: {:?}", last_stats(&stats)));
    eprintln!(
        "{TEST}: settled {:.1} s after the cap, climbed {:.1} s after the lift",
        settled.as_secs_f64(),
        climbed.as_secs_f64()
    );
    assert!(
        viewer
            .wait(Duration::from_secs(60))
            .is_some_and(|s| s.success()),
        "the viewer ran to its end"
    );
    let last = last_stats(&stats).expect("stats");
    assert_eq!(last["gaps"], 0, "{last}");
    assert_eq!(last["skipped"], 0, "{last}");
    assert!(settled <= Duration::from_secs(7), "settled in {settled:?}");
    assert!(climbed <= Duration::from_secs(13), "climbed in {climbed:?}");

    let errors = decode_errors(&p("view.ts"));
    assert!(
        errors.is_empty(),
        "ffmpeg decodes the output with no error: {errors:?}"
    );
    let sources: Vec<Vec<[u8; 188]>> = LADDER
        .iter()
        .map(|(id, _)| masked_packets(&p(&format!("tee{id}.ts"))))
        .collect();
    let view = masked_packets(&p("view.ts"));
    let runs = cuts(&view, &sources);
    // One run per rendition the viewer was on, in order: a change is a cut from one
    // rendition's source to the next, nothing lost or added within a run.
    let served: Vec<u64> = last["renditions"]
        .as_array()
        .expect("renditions")
        .iter()
        .map(|r| r["index"].as_u64().expect("an index"))
        .collect();
    let from: Vec<u64> = runs.iter().map(|r| r.0 as u64).collect();
    assert_eq!(from, served, "runs of the output by source: {runs:?}");
}

/// Acceptance 3: a viewer whose link (capped at 2 Mbit/s with `tbf`) cannot take the
/// 4 Mbps stream is found slow by the fast edge serving it, which reports it; from then
/// on the control server places it, and any new viewer from its network, on the
/// low-cost edge, where before they got a fast one. (All hosts share one /24 here; a
/// viewer from elsewhere keeping its fast edge is in the registry's unit tests.)
#[test]
fn a_viewer_known_to_be_slow_is_placed_on_a_low_cost_edge_at_its_next_request() {
    const TEST: &str = "a_viewer_known_to_be_slow_is_placed_on_a_low_cost_edge_at_its_next_request";
    let names = [
        "control", "capture", "entry", "set0", "set1", "fast0", "fast1", "cheap", "viewer",
    ];
    let hosts = match Hosts::new(&names) {
        Ok(h) => h,
        Err(why) => {
            eprintln!("SKIPPED {TEST}: {why}");
            return;
        }
    };
    let dir = braid_tests::test_dir();
    let p = |f: &str| dir.path().join(f);
    let at = |h: &str, port: u16| format!("{}:{port}", hosts.get(h).addr);
    let s = |v: &str| v.to_string();
    let start = |h: &str, bin: &str, mut args: Vec<String>| {
        args.extend([s("--metrics"), at(h, 9600)]);
        Proc::start_in(&hosts.get(h).netns, h, bin, &args, &p(&format!("{h}.log")))
    };
    let control_url = format!("http://{}", at("control", 8080));
    let _control = start(
        "control",
        "braid-control",
        vec![s("--listen"), at("control", 8080)],
    );
    let sets = [at("set0", 9100), at("set1", 9100)];
    let mut procs = Vec::new();
    for h in ["set0", "set1"] {
        let a = vec![
            s("--role"),
            s("set"),
            s("--listen"),
            at(h, 9100),
            s("--stream"),
            s("1"),
            s("--upstream"),
            at("entry", 9001),
        ];
        procs.push(start(h, "braid-reflector", a));
    }
    let stream = format!("1:{}:{}", braid_tests::STREAM_KEY, sets.join(","));
    procs.push(start(
        "entry",
        "braid-entrypoint",
        vec![s("--listen"), at("entry", 9001), s("--stream"), stream],
    ));
    // The even set: a fast edge (tier 2) and a cheap one (tier 0); the odd set: a fast
    // edge only.
    let mut edges = Vec::new();
    for (i, (h, port, tier)) in [("fast0", 9200, 2), ("fast1", 9201, 2), ("cheap", 9202, 0)]
        .into_iter()
        .enumerate()
    {
        let mut a = vec![s("--role"), s("edge"), s("--listen"), at(h, port)];
        a.extend([s("--node-id"), (10 + i).to_string()]);
        a.extend([s("--stream"), s("1"), s("--cost-tier"), tier.to_string()]);
        a.extend([s("--control"), control_url.clone()]);
        for set in &sets {
            a.extend([s("--reflector"), set.clone()]);
        }
        edges.push(start(h, "braid-reflector", a));
    }
    let _capture = Proc::spawn_in(
        &hosts.get("capture").netns,
        "capture",
        "braid-capture",
        &[
            s("--stream-key"),
            s(braid_tests::STREAM_KEY),
            s("--bitrate"),
            s("4000000"),
            s("--entry"),
            at("entry", 9001),
            s("--duration"),
            s("40"),
        ],
        &p("capture.log"),
    );
    let http: SocketAddr = at("control", 8080).parse().expect("an address");
    let assign = |client: u64| -> u16 {
        let body = hosts.http_get(
            "viewer",
            http,
            &format!("/v1/assign?stream=1&client={client}"),
        );
        let a: serde_json::Value = serde_json::from_str(&body).expect(&body);
        let primary: SocketAddr = a["primary"]
            .as_str()
            .expect(&body)
            .parse()
            .expect("address");
        primary.port()
    };
    // Every edge reporting.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&hosts.http_get("viewer", http, "/v1/status")).expect("status");
        let live = status["live_edges_even"].as_u64().unwrap_or(0)
            + status["live_edges_odd"].as_u64().unwrap_or(0);
        if live == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "three live edges: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Before: viewers get fast edges.
    for client in [42, 43] {
        let port = assign(client);
        assert!([9200, 9201].contains(&port), "client {client} got {port}");
    }

    // Viewer 42 on the fast even edge, its link capped under the stream's rate.
    hosts.limit("viewer", "2mbit");
    let viewer = Proc::spawn_in(
        &hosts.get("viewer").netns,
        "viewer",
        "braid-client",
        &[
            s("--edge"),
            at("fast0", 9200),
            s("--id"),
            s("42"),
            s("--out"),
            p("view.ts").display().to_string(),
            s("--duration"),
            s("25"),
            s("--start-timeout"),
            s("10"),
        ],
        &p("viewer.log"),
    );
    // The edge judges it slow after 5 s of being held back, and reports it within a
    // second; allow for the start.
    let fast0: SocketAddr = at("fast0", 9600).parse().expect("an address");
    let deadline = Instant::now() + Duration::from_secs(20);
    let turned = loop {
        let m = hosts.scrape("fast0", fast0);
        let turned = braid_tests::metrics::sum_of(&m, "braid_edge_viewers_turned_slow_total", &[]);
        if turned >= 1.0 || Instant::now() > deadline {
            break turned;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(turned >= 1.0, "the fast edge found its capped viewer slow");
    std::thread::sleep(Duration::from_millis(2500));
    let status: serde_json::Value =
        serde_json::from_str(&hosts.http_get("viewer", http, "/v1/status")).expect("status");
    assert!(status["slow_clients"].as_u64() >= Some(1), "{status}");
    assert!(status["slow_networks"].as_u64() >= Some(1), "{status}");

    // Its next request, and a new viewer's from the same network: the cheap edge.
    assert_eq!(assign(42), 9202, "the slow viewer's next request");
    assert_eq!(assign(77), 9202, "a new viewer from its network");
    drop(viewer);
}

/// Acceptance 2: on a steady link (loopback), 20 viewers at once watch a ladder for 60 s
/// and none changes rendition: they join where a first viewer from their network was
/// measured (the edge remembers speeds per client and per /24), and nothing makes them
/// flap. Three synthetic renditions (0.5, 1 and 2 Mbit/s, keyframes aligned on the wall
/// clock).
#[test]
fn twenty_viewers_on_a_steady_link_never_change_rendition_in_a_minute() {
    const VIEWERS: usize = 20;
    const SECONDS: u64 = 60;
    let dir = braid_tests::test_dir();
    let p = |f: &str| dir.path().join(f);
    let s = |v: &str| v.to_string();
    let ladder = [(21u32, 500u64), (22, 1000), (23, 2000)];
    let _sets: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::start(
                &format!("set{i}"),
                "braid-reflector",
                &[s("--role"), s("set"), s("--listen"), s("127.0.0.1:0")],
                &p(&format!("set{i}.log")),
            )
        })
        .collect();
    let set_addrs: Vec<String> = _sets.iter().map(|p| p.ready["udp"].clone()).collect();
    let mut a = vec![s("--listen"), s("127.0.0.1:0")];
    for (id, _) in ladder {
        let stream = format!("{id}:{}:{}", braid_tests::STREAM_KEY, set_addrs.join(","));
        a.extend([s("--stream"), stream]);
    }
    let entry = Proc::start("entry", "braid-entrypoint", &a, &p("entry.log"));
    let entry_addr = entry.ready["udp"].clone();
    let rungs: Vec<String> = ladder.iter().map(|(id, k)| format!("{id}:{k}")).collect();
    let mut a = vec![s("--role"), s("edge"), s("--listen"), s("127.0.0.1:0")];
    a.extend([s("--ladder"), rungs.join(",")]);
    for set in &set_addrs {
        a.extend([s("--reflector"), set.clone()]);
    }
    let edge = Proc::start("edge", "braid-reflector", &a, &p("edge.log"));
    let edge_addr = edge.ready["udp"].clone();
    let _captures: Vec<Proc> = ladder
        .iter()
        .map(|(id, kbps)| {
            Proc::spawn(
                &format!("capture{id}"),
                "braid-capture",
                &[
                    s("--stream"),
                    id.to_string(),
                    s("--stream-key"),
                    s(braid_tests::STREAM_KEY),
                    s("--bitrate"),
                    (kbps * 1000).to_string(),
                    s("--gop"),
                    s("25"),
                    s("--align"),
                    s("--entry"),
                    entry_addr.clone(),
                    s("--duration"),
                    (SECONDS + 40).to_string(),
                ],
                &p(&format!("capture{id}.log")),
            )
        })
        .collect();
    let viewer = |id: usize, seconds: u64| {
        Proc::spawn(
            &format!("viewer{id}"),
            "braid-client",
            &[
                s("--edge"),
                edge_addr.clone(),
                s("--stream"),
                s("21"),
                s("--id"),
                (1000 + id).to_string(),
                s("--out"),
                s("/dev/null"),
                s("--stats-json"),
                p(&format!("viewer{id}.json")).display().to_string(),
                s("--duration"),
                seconds.to_string(),
                s("--start-timeout"),
                s("10"),
            ],
            &p(&format!("viewer{id}.log")),
        )
    };
    // A first viewer from this network climbs to the top; the edge remembers its speed.
    let mut first = viewer(0, 60);
    let top = until_rendition(&p("viewer0.json"), 2, Duration::from_secs(45));
    assert!(
        top.is_some(),
        "the first viewer climbed: {:?}",
        last_stats(&p("viewer0.json"))
    );
    first.terminate();
    let mut viewers: Vec<Proc> = (1..=VIEWERS).map(|i| viewer(i, SECONDS)).collect();
    for v in &mut viewers {
        assert!(
            v.wait(Duration::from_secs(SECONDS + 30))
                .is_some_and(|s| s.success()),
            "every viewer ran to its end"
        );
    }
    let mut changes = 0;
    for i in 1..=VIEWERS {
        let st = last_stats(&p(&format!("viewer{i}.json"))).expect("stats");
        let renditions = st["renditions"].as_array().expect("renditions");
        assert_eq!(
            renditions[0]["index"], 2,
            "viewer {i} joined at the top: {st}"
        );
        changes += renditions.len() - 1;
        assert_eq!(st["gaps"], 0, "viewer {i}: {st}");
        assert!(
            st["packets"].as_u64().unwrap_or(0) > (SECONDS - 5) * 190,
            "viewer {i} got the top rendition's packets for the run: {st}"
        );
    }
    assert_eq!(changes, 0, "no viewer changed rendition in {SECONDS} s");
}
