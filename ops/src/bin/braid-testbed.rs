//! `braid-testbed`: a whole Braid network on one machine, in one command.
//!
//! Starts set reflectors, edges in both port-parity sets, entry points, a capture and
//! clients as child processes on 127.0.0.1 with free ports, shows a live table of every
//! node, and stops cleanly on Ctrl-C (or after `--duration`, with a summary), leaving no
//! child behind. Exits 0 when every client got the stream without a gap.

use std::io::IsTerminal;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_ops::harness::{Proc, metrics};
use clap::Parser;
use serde::Deserialize;

#[derive(Parser)]
#[command(
    name = "braid-testbed",
    about = "Start a whole Braid network on this machine"
)]
struct Args {
    /// Topology file.
    #[arg(long, default_value = "ops/testbed.toml")]
    config: PathBuf,
    /// Seconds to run, then print a summary and exit (overrides the file; 0: until Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
    /// Where logs and client outputs go (default: a new temporary directory, kept).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Topology {
    stream: u32,
    stream_key: String,
    network_key: String,
    set_reflectors: usize,
    entry_points: usize,
    edges_even: usize,
    edges_odd: usize,
    clients: usize,
    #[serde(default = "default_controls")]
    control_servers: usize,
    #[serde(default)]
    duration: f64,
    capture: CaptureSpec,
    #[serde(default)]
    impair: Option<toml::Table>,
    #[serde(default)]
    quic: QuicSpec,
}

/// Which hops go over QUIC (the rest over UDP).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct QuicSpec {
    /// By set reflector: the path entry points → it → edges on QUIC.
    #[serde(default)]
    set_reflectors: Vec<bool>,
    /// Clients watch over QUIC.
    #[serde(default)]
    viewers: bool,
    /// The capture pushes to the entry points over QUIC.
    #[serde(default)]
    capture: bool,
}

impl QuicSpec {
    fn any(&self) -> bool {
        self.set_reflectors.iter().any(|q| *q) || self.viewers || self.capture
    }
    fn set(&self, i: usize) -> bool {
        self.set_reflectors.get(i).copied().unwrap_or(false)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureSpec {
    source: String,
    #[serde(default = "default_bitrate")]
    bitrate: u64,
}

fn default_bitrate() -> u64 {
    4_000_000
}

fn default_controls() -> usize {
    1
}

/// A free UDP port of the given parity (TCP on the same number is checked too).
fn port(even: bool) -> anyhow::Result<u16> {
    for _ in 0..1000 {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        let p = s.local_addr()?.port();
        if (p % 2 == 0) == even && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    anyhow::bail!("no free port of the right parity")
}

struct Node {
    proc: Proc,
    role: &'static str,
    set: &'static str,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let topo: Topology =
        toml::from_str(&text).with_context(|| format!("in {}", args.config.display()))?;
    if topo.set_reflectors < 2 || topo.entry_points < 1 || topo.edges_even + topo.edges_odd == 0 {
        anyhow::bail!("a testbed needs at least 2 set reflectors, 1 entry point and 1 edge");
    }
    let duration = args.duration.unwrap_or(topo.duration);
    let dir = match args.dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => tempfile::Builder::new()
            .prefix("braid-testbed-")
            .tempdir()?
            .keep(),
    };
    let p = |f: &str| dir.join(f);
    let impair = match &topo.impair {
        Some(t) => format!("[impair.default]\n{}", toml::to_string(t)?),
        None => String::new(),
    };
    let env_key = topo.network_key.clone();
    let start = |name: &str, bin: &str, args: Vec<String>| -> Proc {
        let mut args = args;
        args.extend(["--network-key".into(), env_key.clone()]);
        Proc::start(name, bin, &args, &p(&format!("{name}.log")))
    };
    let cfg = |name: &str, body: &str| -> anyhow::Result<String> {
        let f = p(&format!("{name}.toml"));
        std::fs::write(&f, body)?;
        Ok(f.display().to_string())
    };
    let s = |v: &dyn ToString| v.to_string();
    eprintln!("braid-testbed: starting in {}", dir.display());
    // Development certificates: a CA and one certificate per node (mutual TLS on QUIC).
    let certs = p("certs");
    let q = &topo.quic;
    if q.any() {
        let mut names: Vec<String> = (0..topo.set_reflectors)
            .map(|i| format!("set{i}"))
            .collect();
        names.extend((0..topo.entry_points).map(|i| format!("entry{i}")));
        names.extend((0..topo.edges_even).map(|i| format!("edge-even{i}")));
        names.extend((0..topo.edges_odd).map(|i| format!("edge-odd{i}")));
        braid_net::tls::make_dev_certs(&certs, &names, &[])?;
        eprintln!(
            "braid-testbed: development certificates in {}",
            certs.display()
        );
    }
    let tls = |name: &str| braid_ops::harness::tls_args(&certs, name);
    let quic_listen = |name: &str| {
        let mut a = vec!["--quic-listen".to_string(), "127.0.0.1:0".into()];
        a.extend(tls(name));
        a
    };
    let mut nodes: Vec<Node> = Vec::new();
    let stream = topo.stream.to_string();

    let mut control_urls = Vec::new();
    for i in 0..topo.control_servers {
        let name = format!("control{i}");
        let proc = start(
            &name,
            "braid-control",
            vec!["--listen".into(), "127.0.0.1:0".into()],
        );
        control_urls.push(format!("http://{}", proc.ready["http"]));
        nodes.push(Node {
            proc,
            role: "control",
            set: "",
        });
    }
    let mut set_addrs = Vec::new();
    for i in 0..topo.set_reflectors {
        let name = format!("set{i}");
        let c = cfg(&name, &format!("role = \"set\"\n{impair}\n"))?;
        let mut a = vec![
            "--config".into(),
            c,
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--stream".into(),
            stream.clone(),
            "--node-id".into(),
            s(&(100 + i)),
        ];
        if q.set(i) {
            a.extend(quic_listen(&name));
        }
        let proc = start(&name, "braid-reflector", a);
        set_addrs.push(if q.set(i) {
            format!("quic://{}", proc.quic())
        } else {
            proc.udp().to_string()
        });
        nodes.push(Node {
            proc,
            role: "set reflector",
            set: "",
        });
    }
    let mut edge_addrs = Vec::new();
    for (i, even) in (0..topo.edges_even)
        .map(|i| (i, true))
        .chain((0..topo.edges_odd).map(|i| (i, false)))
    {
        let name = format!("edge-{}{i}", if even { "even" } else { "odd" });
        let mut a = vec![
            "--role".into(),
            "edge".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", port(even)?),
            "--stream".into(),
            stream.clone(),
            "--node-id".into(),
            s(&(200 + edge_addrs.len())),
        ];
        for r in &set_addrs {
            a.extend(["--reflector".into(), r.to_string()]);
        }
        for u in &control_urls {
            a.extend(["--control".into(), u.clone()]);
        }
        if q.viewers {
            a.extend(quic_listen(&name));
        } else if q.any() {
            a.extend(tls(&name));
        }
        let c = cfg(&name, &format!("role = \"edge\"\n{impair}\n"))?;
        a.extend(["--config".into(), c]);
        let proc = start(&name, "braid-reflector", a);
        edge_addrs.push(proc.udp());
        nodes.push(Node {
            proc,
            role: "edge",
            set: if even { "even" } else { "odd" },
        });
    }
    let refl = set_addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut entry_addrs = Vec::new();
    for i in 0..topo.entry_points {
        let name = format!("entry{i}");
        let c = cfg(&name, &format!("{impair}\n"))?;
        let mut a = vec![
            "--config".into(),
            c,
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--stream".into(),
            format!("{}:{}:{refl}", topo.stream, topo.stream_key),
            "--node-id".into(),
            s(&(10 + i)),
        ];
        if q.capture {
            a.extend(quic_listen(&name));
        } else if q.any() {
            a.extend(tls(&name));
        }
        let proc = start(&name, "braid-entrypoint", a);
        entry_addrs.push(if q.capture {
            format!("quic://{}", proc.quic())
        } else {
            proc.udp().to_string()
        });
        nodes.push(Node {
            proc,
            role: "entry point",
            set: "",
        });
    }
    // Edges report once a second; give them that second before clients ask.
    if !control_urls.is_empty() {
        std::thread::sleep(Duration::from_millis(1500));
    }
    let mut clients = Vec::new();
    for i in 0..topo.clients {
        let edge = edge_addrs[i % edge_addrs.len()];
        let name = format!("client{i}");
        let mut a = vec![
            "--stream".into(),
            stream.clone(),
            "--out".into(),
            p(&format!("{name}.ts")).display().to_string(),
            "--stats-json".into(),
            p(&format!("{name}.json")).display().to_string(),
            "--start-timeout".into(),
            "20".into(),
            "--id".into(),
            s(&i),
        ];
        if duration > 0.0 {
            a.extend(["--duration".into(), s(&duration)]);
        }
        if control_urls.is_empty() {
            a.extend(["--edge".into(), edge.to_string()]);
        }
        if q.viewers {
            a.extend([
                "--tls-ca".into(),
                certs.join("ca.pem").display().to_string(),
            ]);
        } else {
            a.extend(["--transport".into(), "udp".into()]);
        }
        for u in &control_urls {
            a.extend(["--control".into(), u.clone()]);
        }
        clients.push((
            name.clone(),
            edge,
            Proc::spawn(&name, "braid-client", &a, &p(&format!("{name}.log"))),
        ));
    }
    let mut cap = vec![
        "--stream".into(),
        stream.clone(),
        "--stream-key".into(),
        topo.stream_key.clone(),
        "--bitrate".into(),
        s(&topo.capture.bitrate),
        "--bind".into(),
        "127.0.0.1:0".into(),
    ];
    for e in &entry_addrs {
        cap.extend(["--entry".into(), e.to_string()]);
    }
    if q.capture {
        cap.extend([
            "--tls-ca".into(),
            certs.join("ca.pem").display().to_string(),
        ]);
    }
    if duration > 0.0 {
        cap.extend(["--duration".into(), s(&(duration + 2.0))]);
    }
    let mut extra: Vec<Proc> = Vec::new();
    let capture = match topo.capture.source.as_str() {
        "synth" => Proc::start("capture", "braid-capture", &cap, &p("capture.log")),
        "ffmpeg" => {
            let mut ff = braid_ops::harness::die_with_parent(Command::new("ffmpeg"))
                .args([
                    "-hide_banner",
                    "-loglevel",
                    "error",
                    "-re",
                    "-f",
                    "lavfi",
                    "-i",
                    "testsrc2=size=1280x720:rate=25",
                    "-f",
                    "lavfi",
                    "-i",
                    "sine=frequency=440",
                ])
                .args([
                    "-c:v",
                    "libx264",
                    "-preset",
                    "veryfast",
                    "-tune",
                    "zerolatency",
                    "-g",
                    "50",
                    "-b:v",
                    &s(&(topo.capture.bitrate * 8 / 10)),
                    "-c:a",
                    "aac",
                    "-f",
                    "mpegts",
                    "pipe:1",
                ])
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(p("ffmpeg.log"))?)
                .spawn()
                .context("starting ffmpeg (is it installed?)")?;
            let out = ff.stdout.take().context("ffmpeg's stdout")?;
            extra.push(Proc::adopt("ffmpeg", ff));
            cap.extend(["--source".into(), "-".into()]);
            Proc::start_with_stdin(
                "capture",
                "braid-capture",
                &cap,
                &p("capture.log"),
                Stdio::from(out),
            )
        }
        file => {
            cap.extend(["--source".into(), file.into(), "--loop".into()]);
            Proc::start("capture", "braid-capture", &cap, &p("capture.log"))
        }
    };
    nodes.push(Node {
        proc: capture,
        role: "capture",
        set: "",
    });

    // Ctrl-C ends the loop; children are killed when `nodes`, `clients` and `extra` drop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            rt.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut rates = Rates::default();
    if let Some(u) = control_urls.first() {
        eprintln!("braid-testbed: control server status page: {u}/");
    }
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let done = stop.load(std::sync::atomic::Ordering::Relaxed)
            || (duration > 0.0 && started.elapsed() > Duration::from_secs_f64(duration + 3.0))
            || (duration > 0.0 && clients.iter_mut().all(|(_, _, c)| !c.alive()));
        let tick = started.elapsed().as_millis() % 1000 < 250;
        if tick || done {
            let table = render(&nodes, &clients, &dir, started.elapsed(), &mut rates);
            if tty {
                eprint!("\x1b[2J\x1b[H{table}");
            } else if done || started.elapsed().as_secs() % 5 == 0 {
                eprint!("{table}");
            }
        }
        if done {
            break;
        }
    }
    // Summary.
    let mut ok = true;
    println!(
        "braid-testbed summary after {:.1} s (logs in {}):",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    for (name, _, _) in &clients {
        let st = client_stats(&dir, name);
        let edge = st["edge"].as_str().unwrap_or("-").to_owned();
        let packets = st["packets"].as_u64().unwrap_or(0);
        let gaps = st["gaps"].as_u64().unwrap_or(0);
        let delivered = if packets + gaps > 0 {
            packets as f64 / (packets + gaps) as f64 * 100.0
        } else {
            0.0
        };
        ok &= packets > 0 && gaps == 0;
        println!(
            "  {name} via {edge}: {packets} packets, {} bytes, {gaps} gaps, delivered {delivered:.3}%",
            st["bytes"].as_u64().unwrap_or(0)
        );
    }
    for n in &nodes {
        let Some(m) = n.proc.ready.get("metrics").and_then(|a| a.parse().ok()) else {
            continue;
        };
        let drops: Vec<String> = metrics::try_scrape(m)
            .into_iter()
            .filter(|(k, v)| k.starts_with("braid_dropped_total{") && *v > 0.0)
            .filter_map(|(k, v)| {
                Some(format!(
                    "{} {v}",
                    k.split("reason=\"").nth(1)?.split('"').next()?
                ))
            })
            .collect();
        if !drops.is_empty() {
            println!("  {} dropped: {}", n.proc.name, drops.join(", "));
        }
    }
    println!(
        "{}",
        if ok {
            "every client got the stream with no gap"
        } else {
            "some client missed data: see the logs"
        }
    );
    drop(clients);
    drop(nodes);
    drop(extra);
    std::process::exit(if ok { 0 } else { 1 });
}

fn client_stats(dir: &std::path::Path, name: &str) -> serde_json::Value {
    std::fs::read_to_string(dir.join(format!("{name}.json")))
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| serde_json::from_str(l).ok()))
        .unwrap_or(serde_json::Value::Null)
}

/// Last byte counts, to show rates.
#[derive(Default)]
struct Rates(std::collections::HashMap<String, (Instant, f64)>);

impl Rates {
    fn mbps(&mut self, name: &str, bytes: f64) -> f64 {
        let now = Instant::now();
        let rate = match self.0.get(name) {
            Some((t, b)) if now > *t => {
                (bytes - b) * 8.0 / now.duration_since(*t).as_secs_f64() / 1e6
            }
            _ => 0.0,
        };
        self.0.insert(name.to_owned(), (now, bytes));
        rate.max(0.0)
    }
}

fn render(
    nodes: &[Node],
    clients: &[(String, std::net::SocketAddr, Proc)],
    dir: &std::path::Path,
    t: Duration,
    rates: &mut Rates,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "braid testbed  {:>6.1} s   (Ctrl-C stops)",
        t.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "{:<12} {:<14} {:<5} {:>21} {:>8} {:>8} {:>9} {:>6} {:>8} {:>8}",
        "node",
        "role",
        "set",
        "udp",
        "out Mbps",
        "viewers",
        "link loss",
        "gaps",
        "repairs",
        "dropped"
    );
    for n in nodes {
        let (mut out, mut viewers, mut impaired, mut gaps, mut repaired, mut dropped) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        if let Some(m) = n.proc.ready.get("metrics").and_then(|a| a.parse().ok()) {
            let scraped = metrics::try_scrape(m);
            let sum = |name: &str| {
                scraped
                    .iter()
                    .filter(|(k, _)| k == name || k.starts_with(&format!("{name}{{")))
                    .map(|(_, v)| v)
                    .sum::<f64>()
                    + 0.0
            };
            out = rates.mbps(
                &n.proc.name,
                sum("braid_udp_sent_bytes_total") + sum("braid_quic_sent_bytes_total"),
            );
            viewers = sum("braid_viewers");
            impaired = sum("braid_udp_impaired_total");
            gaps = sum("braid_merge_gaps_total");
            repaired = sum("braid_merge_repaired_total");
            dropped = sum("braid_dropped_total");
        }
        let _ = writeln!(
            s,
            "{:<12} {:<14} {:<5} {:>21} {:>8.2} {:>8} {:>9} {:>6} {:>8} {:>8}",
            n.proc.name,
            n.role,
            n.set,
            n.proc.ready.get("udp").map_or("", |v| v),
            out,
            viewers,
            impaired,
            gaps,
            repaired,
            dropped
        );
    }
    let _ = writeln!(
        s,
        "{:<12} {:<21} {:>10} {:>10} {:>6} {:>6} {:>8} {:>8}",
        "client", "edge", "Mbps", "packets", "gaps", "skips", "join ms", "switches"
    );
    for (name, _, _) in clients {
        let st = client_stats(dir, name);
        let _ = writeln!(
            s,
            "{:<12} {:<21} {:>10.2} {:>10} {:>6} {:>6} {:>8} {:>8}",
            name,
            st["edge"].as_str().unwrap_or("-"),
            st["bitrate_bps"].as_f64().unwrap_or(0.0) / 1e6,
            st["packets"].as_u64().unwrap_or(0),
            st["gaps"].as_u64().unwrap_or(0),
            st["skips"].as_u64().unwrap_or(0),
            st["join_ms"]
                .as_u64()
                .map_or("-".to_string(), |v| v.to_string()),
            st["switches"].as_array().map_or(0, Vec::len)
        );
    }
    s
}
