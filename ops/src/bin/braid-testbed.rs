//! `braid-testbed`: a whole Braid network on one machine, in one command.
//!
//! Starts set reflectors, edges in both port-parity sets, entry points, a capture and
//! clients as child processes on 127.0.0.1 with free ports (or, with `--hosts`, each on a
//! host of its own: a network namespace with its own address), shows a live table of
//! every node, and stops cleanly on Ctrl-C or SIGTERM (or after `--duration`, with a
//! summary), leaving no child and no namespace behind. Writes `testbed.json` in its
//! directory: every node's role, host, addresses and pid, for scripts and tests. Exits 0
//! when every client got the stream without a gap.

use std::io::IsTerminal;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_ops::harness::{Proc, metrics};
use braid_ops::hosts::Hosts;
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
    /// Put every node on a host of its own: a network namespace with its own address
    /// (10.77.0.0/24), joined by veth links through a bridge, so that links can be cut
    /// (`ip link set ... down`) or capped (`tc ... tbf`) as between machines. Needs root.
    /// Every namespace and link is removed at exit, and within a second if this process
    /// is killed.
    #[arg(long)]
    hosts: bool,
    /// Restart any daemon that exits, as systemd's `Restart=always` does for the packaged
    /// units (`braid-ctl rolling-restart --exec` can then stop an edge by its pid file,
    /// `run/<node id>.pid`).
    #[arg(long)]
    supervise: bool,
    /// Keep what the capture sends in `capture.ts`, to compare viewers' outputs with.
    #[arg(long)]
    tee: bool,
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
    /// Every node on a host of its own (as `--hosts`).
    #[serde(default)]
    hosts: bool,
    /// The control servers' operator token (`braid-ctl` drain, undrain, rolling restart).
    #[serde(default = "default_operator_token")]
    operator_token: String,
}

fn default_operator_token() -> String {
    "braid testbed operator token".into()
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
    /// A ladder of renditions (kbit/s, lowest first): streams `stream`, `stream + 1`,
    /// ..., one synthetic capture each, keyframes aligned on the wall clock; edges serve
    /// each viewer the rendition its speed fits.
    #[serde(default)]
    ladder: Vec<u64>,
}

fn default_bitrate() -> u64 {
    4_000_000
}

fn default_controls() -> usize {
    1
}

/// A free UDP port of the given parity, or of either (TCP on the same number is checked
/// too).
fn port(even: Option<bool>) -> anyhow::Result<u16> {
    for _ in 0..1000 {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        let p = s.local_addr()?.port();
        if even.is_none_or(|e| (p % 2 == 0) == e)
            && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        {
            return Ok(p);
        }
    }
    anyhow::bail!("no free port of the right parity")
}

/// How to start one process, again when it exits (`--supervise`).
#[derive(Clone)]
struct Launch {
    name: String,
    bin: &'static str,
    args: Vec<String>,
    /// Its host's network namespace (`--hosts`).
    netns: Option<String>,
    log: PathBuf,
}

impl Launch {
    /// Starts a daemon and waits for its ready line.
    fn start(&self) -> Proc {
        match &self.netns {
            Some(ns) => Proc::start_in(ns, &self.name, self.bin, &self.args, &self.log),
            None => Proc::start(&self.name, self.bin, &self.args, &self.log),
        }
    }
    /// Starts a process that prints no ready line.
    fn spawn(&self) -> Proc {
        match &self.netns {
            Some(ns) => Proc::spawn_in(ns, &self.name, self.bin, &self.args, &self.log),
            None => Proc::spawn(&self.name, self.bin, &self.args, &self.log),
        }
    }
}

struct Node {
    proc: Proc,
    role: &'static str,
    set: &'static str,
    /// How it was started (`None`: not restarted when it exits).
    launch: Option<Launch>,
    /// Its node id, for the pid files hooks read.
    node_id: Option<usize>,
    restarts: u32,
}

/// Where each node runs: its host's address and namespace with `--hosts`, 127.0.0.1 and
/// free ports without.
struct Placement {
    hosts: Option<Hosts>,
}

impl Placement {
    fn ip(&self, name: &str) -> String {
        match &self.hosts {
            Some(h) => h.get(name).addr.to_string(),
            None => "127.0.0.1".into(),
        }
    }
    fn netns(&self, name: &str) -> Option<String> {
        self.hosts.as_ref().map(|h| h.get(name).netns.clone())
    }
    /// An address for `name` to listen on: `fixed` on its own host, a free port of the
    /// given parity (or any) on 127.0.0.1. Explicit either way, so a daemon restarted by
    /// `--supervise` comes back where its peers look for it.
    fn listen(&self, name: &str, fixed: u16, even: Option<bool>) -> anyhow::Result<String> {
        Ok(match &self.hosts {
            Some(_) => format!("{}:{fixed}", self.ip(name)),
            None => format!("127.0.0.1:{}", port(even)?),
        })
    }
    /// The metrics of node `n`.
    fn scrape(&self, n: &Proc) -> Vec<(String, f64)> {
        let Some(addr) = n.ready.get("metrics").and_then(|a| a.parse().ok()) else {
            return Vec::new();
        };
        match &self.hosts {
            Some(h) => h.scrape(&n.name, addr),
            None => metrics::try_scrape(addr),
        }
    }
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
    std::fs::create_dir_all(p("run"))?;
    let impair = match &topo.impair {
        Some(t) => format!("[impair.default]\n{}", toml::to_string(t)?),
        None => String::new(),
    };
    // Every host, named as its node: made first, removed last (and by its guard if this
    // process is killed).
    let mut names: Vec<String> = (0..topo.control_servers)
        .map(|i| format!("control{i}"))
        .collect();
    names.extend((0..topo.set_reflectors).map(|i| format!("set{i}")));
    names.extend((0..topo.edges_even).map(|i| format!("edge-even{i}")));
    names.extend((0..topo.edges_odd).map(|i| format!("edge-odd{i}")));
    names.extend((0..topo.entry_points).map(|i| format!("entry{i}")));
    names.push("capture".into());
    names.extend((0..topo.clients).map(|i| format!("client{i}")));
    let place = Placement {
        hosts: if args.hosts || topo.hosts {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let h = Hosts::new(&refs)
                .map_err(|e| anyhow::anyhow!("--hosts: {e} (run as root, or without --hosts)"))?;
            eprintln!(
                "braid-testbed: {} hosts, each a network namespace, on 10.77.0.0/24",
                h.hosts.len()
            );
            Some(h)
        } else {
            None
        },
    };
    let env_key = topo.network_key.clone();
    // Every node (viewers hold no network key): the network key, and with --hosts its
    // metrics on its host's address.
    let launch = |name: &str, bin: &'static str, mut args: Vec<String>| -> Launch {
        if bin != "braid-client" {
            args.extend(["--network-key".into(), env_key.clone()]);
            if place.hosts.is_some() {
                args.extend(["--metrics".into(), format!("{}:9600", place.ip(name))]);
            }
        }
        Launch {
            name: name.to_owned(),
            bin,
            args,
            netns: place.netns(name),
            log: p(&format!("{name}.log")),
        }
    };
    let cfg = |name: &str, body: &str| -> anyhow::Result<String> {
        let f = p(&format!("{name}.toml"));
        std::fs::write(&f, body)?;
        Ok(f.display().to_string())
    };
    let s = |v: &dyn ToString| v.to_string();
    eprintln!("braid-testbed: starting in {}", dir.display());
    // Development certificates: a CA and one certificate per node (mutual TLS on QUIC),
    // valid for every host's address.
    let certs = p("certs");
    let q = &topo.quic;
    if q.any() {
        let sans: Vec<String> = place
            .hosts
            .iter()
            .flat_map(|h| h.hosts.iter().map(|h| h.addr.to_string()))
            .collect();
        braid_net::tls::make_dev_certs(&certs, &names, &sans)?;
        eprintln!(
            "braid-testbed: development certificates in {}",
            certs.display()
        );
    }
    let tls = |name: &str| braid_ops::harness::tls_args(&certs, name);
    let quic_listen = |name: &str, fixed: u16| -> anyhow::Result<Vec<String>> {
        let mut a = vec![
            "--quic-listen".to_string(),
            place.listen(name, fixed, None)?,
        ];
        a.extend(tls(name));
        Ok(a)
    };
    let mut nodes: Vec<Node> = Vec::new();
    let daemon = |l: Launch, role: &'static str, set: &'static str, id: Option<usize>| Node {
        proc: l.start(),
        role,
        set,
        launch: Some(l),
        node_id: id,
        restarts: 0,
    };
    let stream = topo.stream.to_string();
    if !topo.capture.ladder.is_empty() && topo.capture.source != "synth" {
        anyhow::bail!("[capture] ladder takes the synthetic source (source = \"synth\")");
    }
    // Every stream the nodes carry: the stream, or each rendition of its ladder.
    let streams: Vec<u32> = if topo.capture.ladder.is_empty() {
        vec![topo.stream]
    } else {
        (0..topo.capture.ladder.len() as u32)
            .map(|i| topo.stream + i)
            .collect()
    };
    let stream_args: Vec<String> = streams
        .iter()
        .flat_map(|s| ["--stream".to_string(), s.to_string()])
        .collect();
    let ladder_arg = streams
        .iter()
        .zip(&topo.capture.ladder)
        .map(|(s, k)| format!("{s}:{k}"))
        .collect::<Vec<_>>()
        .join(",");

    // The player page's hls.js, when `npm ci --prefix player` installed it.
    let hls_js = std::fs::canonicalize("player/node_modules/hls.js/dist/hls.min.js").ok();
    let mut control_urls = Vec::new();
    for i in 0..topo.control_servers {
        let name = format!("control{i}");
        let mut a = vec![
            "--listen".into(),
            place.listen(&name, 8000, None)?,
            "--operator-token".into(),
            topo.operator_token.clone(),
        ];
        if let Some(js) = &hls_js {
            a.extend(["--hls-js".into(), js.display().to_string()]);
        }
        let l = launch(&name, "braid-control", a);
        let node = daemon(l, "control", "", None);
        control_urls.push(format!("http://{}", node.proc.ready["http"]));
        nodes.push(node);
    }
    let mut set_addrs = Vec::new();
    for i in 0..topo.set_reflectors {
        let name = format!("set{i}");
        let c = cfg(&name, &format!("role = \"set\"\n{impair}\n"))?;
        let mut a = vec![
            "--config".into(),
            c,
            "--listen".into(),
            place.listen(&name, 9100, None)?,
            "--node-id".into(),
            s(&(100 + i)),
        ];
        a.extend(stream_args.iter().cloned());
        for u in &control_urls {
            a.extend(["--control".into(), u.clone()]);
        }
        if q.set(i) {
            a.extend(quic_listen(&name, 9101)?);
        }
        let node = daemon(
            launch(&name, "braid-reflector", a),
            "set reflector",
            "",
            Some(100 + i),
        );
        set_addrs.push(if q.set(i) {
            format!("quic://{}", node.proc.quic())
        } else {
            node.proc.udp().to_string()
        });
        nodes.push(node);
    }
    let mut edge_addrs = Vec::new();
    for (i, even) in (0..topo.edges_even)
        .map(|i| (i, true))
        .chain((0..topo.edges_odd).map(|i| (i, false)))
    {
        let name = format!("edge-{}{i}", if even { "even" } else { "odd" });
        let id = 200 + edge_addrs.len();
        let mut a = vec![
            "--role".into(),
            "edge".into(),
            "--listen".into(),
            place.listen(&name, if even { 9200 } else { 9201 }, Some(even))?,
            "--node-id".into(),
            s(&id),
            // Low-latency HLS for browsers and players.
            "--hls-listen".into(),
            place.listen(&name, 8080, None)?,
        ];
        a.extend(stream_args.iter().cloned());
        if !ladder_arg.is_empty() {
            a.extend(["--ladder".into(), ladder_arg.clone()]);
        }
        for r in &set_addrs {
            a.extend(["--reflector".into(), r.to_string()]);
        }
        for u in &control_urls {
            a.extend(["--control".into(), u.clone()]);
        }
        if q.viewers {
            a.extend(quic_listen(&name, 9202)?);
        } else if q.any() {
            a.extend(tls(&name));
        }
        let c = cfg(&name, &format!("role = \"edge\"\n{impair}\n"))?;
        a.extend(["--config".into(), c]);
        let node = daemon(
            launch(&name, "braid-reflector", a),
            "edge",
            if even { "even" } else { "odd" },
            Some(id),
        );
        edge_addrs.push(node.proc.udp());
        nodes.push(node);
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
            place.listen(&name, 9001, None)?,
            "--node-id".into(),
            s(&(10 + i)),
        ];
        for st in &streams {
            a.extend([
                "--stream".into(),
                format!("{st}:{}:{refl}", topo.stream_key),
            ]);
        }
        for u in &control_urls {
            a.extend(["--control".into(), u.clone()]);
        }
        if q.capture {
            a.extend(quic_listen(&name, 9003)?);
        } else if q.any() {
            a.extend(tls(&name));
        }
        let node = daemon(
            launch(&name, "braid-entrypoint", a),
            "entry point",
            "",
            Some(10 + i),
        );
        entry_addrs.push(if q.capture {
            format!("quic://{}", node.proc.quic())
        } else {
            node.proc.udp().to_string()
        });
        nodes.push(node);
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
        clients.push((name.clone(), edge, launch(&name, "braid-client", a).spawn()));
    }
    let first_rate = topo
        .capture
        .ladder
        .first()
        .map_or(topo.capture.bitrate, |k| k * 1000);
    let mut cap = vec![
        "--stream".into(),
        stream.clone(),
        "--stream-key".into(),
        topo.stream_key.clone(),
        "--bitrate".into(),
        s(&first_rate),
        "--bind".into(),
        format!("{}:0", place.ip("capture")),
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
    if args.tee {
        cap.extend(["--tee".into(), p("capture.ts").display().to_string()]);
    }
    if !topo.capture.ladder.is_empty() {
        cap.push("--align".into());
    }
    if duration > 0.0 {
        cap.extend(["--duration".into(), s(&(duration + 2.0))]);
    }
    let mut extra: Vec<Proc> = Vec::new();
    let cap_netns = place.netns("capture");
    let start_capture = |cap: &[String], stdin: Stdio| match &cap_netns {
        Some(ns) => Proc::start_in_with_stdin(
            ns,
            "capture",
            "braid-capture",
            cap,
            &p("capture.log"),
            stdin,
        ),
        None => Proc::start_with_stdin("capture", "braid-capture", cap, &p("capture.log"), stdin),
    };
    let capture = match topo.capture.source.as_str() {
        "synth" => start_capture(&cap, Stdio::null()),
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
            start_capture(&cap, Stdio::from(out))
        }
        file => {
            cap.extend(["--source".into(), file.into(), "--loop".into()]);
            start_capture(&cap, Stdio::null())
        }
    };
    nodes.push(Node {
        proc: capture,
        role: "capture",
        set: "",
        launch: None,
        node_id: None,
        restarts: 0,
    });
    // The ladder's other renditions: a capture each, aligned with the first.
    for (i, kbps) in topo.capture.ladder.iter().enumerate().skip(1) {
        let mut c = cap.clone();
        let at = |c: &[String], flag: &str| c.iter().position(|a| a == flag).map(|i| i + 1);
        if let Some(j) = at(&c, "--stream") {
            c[j] = streams[i].to_string();
        }
        if let Some(j) = at(&c, "--bitrate") {
            c[j] = s(&(kbps * 1000));
        }
        if let Some(j) = at(&c, "--tee") {
            c[j] = p(&format!("capture{}.ts", streams[i]))
                .display()
                .to_string();
        }
        let name = format!("capture{}", streams[i]);
        let proc = match &cap_netns {
            Some(ns) => Proc::start_in(ns, &name, "braid-capture", &c, &p(&format!("{name}.log"))),
            None => Proc::start(&name, "braid-capture", &c, &p(&format!("{name}.log"))),
        };
        nodes.push(Node {
            proc,
            role: "capture",
            set: "",
            launch: None,
            node_id: None,
            restarts: 0,
        });
    }
    write_manifest(&dir, &place, &nodes, &clients, &control_urls, &topo)?;

    // Ctrl-C or SIGTERM ends the loop; children are killed when `nodes`, `clients` and
    // `extra` drop, and the hosts are removed after them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                let terminated = async {
                    match term.as_mut() {
                        Some(t) => {
                            t.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    () = terminated => {}
                }
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut rates = Rates::default();
    if let Some(u) = control_urls.first() {
        eprintln!("braid-testbed: control server status page: {u}/");
        eprintln!(
            "braid-testbed: player page (HLS from the edges, hls.js{}): {u}/watch/{}",
            if hls_js.is_some() {
                ""
            } else {
                " missing: npm ci --prefix player"
            },
            topo.stream
        );
    }
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let done = stop.load(std::sync::atomic::Ordering::Relaxed)
            || (duration > 0.0 && started.elapsed() > Duration::from_secs_f64(duration + 3.0))
            || (duration > 0.0 && clients.iter_mut().all(|(_, _, c)| !c.alive()));
        if args.supervise && !done && supervise(&mut nodes) {
            write_manifest(&dir, &place, &nodes, &clients, &control_urls, &topo)?;
        }
        let tick = started.elapsed().as_millis() % 1000 < 250;
        if tick || done {
            let table = render(
                &place,
                &nodes,
                &clients,
                &dir,
                started.elapsed(),
                &mut rates,
            );
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
        if n.restarts > 0 {
            println!("  {} restarted {} times", n.proc.name, n.restarts);
        }
        let drops: Vec<String> = place
            .scrape(&n.proc)
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
    drop(place);
    std::process::exit(if ok { 0 } else { 1 });
}

/// Restarts every supervised daemon that has exited, as systemd's `Restart=always` does
/// for the packaged units; whether any was.
fn supervise(nodes: &mut [Node]) -> bool {
    let mut any = false;
    for n in nodes.iter_mut() {
        let Some(l) = &n.launch else { continue };
        if let Some(status) = n.proc.exited() {
            eprintln!("braid-testbed: {} exited ({status}): restarting", l.name);
            let l = l.clone();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.start())) {
                Ok(p) => {
                    n.proc = p;
                    n.restarts += 1;
                    any = true;
                }
                Err(_) => eprintln!("braid-testbed: {} did not come back; trying again", l.name),
            }
        }
    }
    any
}

/// Writes `testbed.json` (every node: role, set, host, address, pid, ready line; every
/// client; the control servers) and `run/<node id>.pid`, for scripts and tests to find
/// the nodes (a restart hook for `braid-ctl rolling-restart`, say).
fn write_manifest(
    dir: &std::path::Path,
    place: &Placement,
    nodes: &[Node],
    clients: &[(String, std::net::SocketAddr, Proc)],
    control_urls: &[String],
    topo: &Topology,
) -> anyhow::Result<()> {
    let host = |name: &str| {
        serde_json::json!({
            "netns": place.netns(name),
            "ip": place.ip(name),
        })
    };
    let nodes_json: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "name": n.proc.name,
                "role": n.role,
                "set": n.set,
                "node": n.node_id,
                "pid": n.proc.pid(),
                "host": host(&n.proc.name),
                "ready": n.proc.ready,
                "restarts": n.restarts,
            })
        })
        .collect();
    let clients_json: Vec<serde_json::Value> = clients
        .iter()
        .map(|(name, _, c)| {
            serde_json::json!({
                "name": name,
                "pid": c.pid(),
                "host": host(name),
                "out": dir.join(format!("{name}.ts")),
                "stats": dir.join(format!("{name}.json")),
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "hosts": place.hosts.is_some(),
        "control": control_urls,
        "operator_token": topo.operator_token,
        "stream": topo.stream,
        "nodes": nodes_json,
        "clients": clients_json,
    });
    for n in nodes {
        if let Some(id) = n.node_id {
            std::fs::write(
                dir.join(format!("run/{id}.pid")),
                format!("{}\n", n.proc.pid()),
            )?;
        }
    }
    let tmp = dir.join("testbed.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&manifest)?)?;
    std::fs::rename(&tmp, dir.join("testbed.json"))?;
    Ok(())
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
    place: &Placement,
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
        let scraped = place.scrape(&n.proc);
        if !scraped.is_empty() {
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
        "{:<12} {:<21} {:>10} {:>10} {:>6} {:>6} {:>8} {:>8} {:>16}",
        "client",
        "edge",
        "Mbps",
        "packets",
        "gaps",
        "skips",
        "join ms",
        "switches",
        "rendition (moves)"
    );
    for (name, _, _) in clients {
        let st = client_stats(dir, name);
        let _ = writeln!(
            s,
            "{:<12} {:<21} {:>10.2} {:>10} {:>6} {:>6} {:>8} {:>8} {:>16}",
            name,
            st["edge"].as_str().unwrap_or("-"),
            st["bitrate_bps"].as_f64().unwrap_or(0.0) / 1e6,
            st["packets"].as_u64().unwrap_or(0),
            st["gaps"].as_u64().unwrap_or(0),
            st["skips"].as_u64().unwrap_or(0),
            st["join_ms"]
                .as_u64()
                .map_or("-".to_string(), |v| v.to_string()),
            st["switches"].as_array().map_or(0, Vec::len),
            st["rendition"]["kbps"]
                .as_u64()
                .map_or("-".to_string(), |k| format!(
                    "{k} kbps ({})",
                    st["renditions"]
                        .as_array()
                        .map_or(0, |r| r.len().saturating_sub(1))
                ))
        );
    }
    s
}
