//! Running the real daemons as child processes on 127.0.0.1: for the whole-network tests,
//! the benchmarks and the testbed.
//!
//! - [`Proc`]: a child process that is killed when dropped, so a failing test leaves
//!   nothing behind; its ready line (JSON on stdout) says where it listens.
//! - [`Net`]: starts set reflectors, edges, entry points, a capture and viewers with the
//!   settings a test asks for, each on a free port.
//! - [`wait_all`]: waits for viewers to exit, noting how much the capture had sent at
//!   each exit (so a test can check a viewer's output reached the end of the stream).
//! - [`metrics`]: scrapes a daemon's Prometheus endpoint.
//! - [`crowd`]: many viewers in one process, speaking the watch protocol.
//!
//! The daemons are found next to the test binary (`target/<profile>/`); if they are not
//! built yet, the first test builds them with `cargo build --bins`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The network key every test network uses.
pub const NETWORK_KEY: &str = "braid test network key";
/// The stream key every test stream uses.
pub const STREAM_KEY: &str = "test-stream-key";

/// The path of a daemon binary, building the workspace's binaries once if needed.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("a process knows its own path");
    // A binary in target/<profile>/ has the daemons beside it; a test in
    // target/<profile>/deps/ has them one level up.
    let dir = exe.parent().expect("an executable lives in a directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent")
    } else {
        dir
    };
    let path = dir.join(name);
    if !path.exists() {
        BUILD.call_once(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--bins", "--quiet"])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .args(if dir.ends_with("release") {
                    &["--release"][..]
                } else {
                    &[][..]
                })
                .status()
                .expect("running cargo build");
            assert!(status.success(), "cargo build --bins failed");
        });
    }
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --bins`",
        path.display()
    );
    path
}

/// A command running `bin_name` in network namespace `netns` (`ip netns exec` execs it:
/// the child is the daemon itself).
fn in_netns(netns: &str, bin_name: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).arg(bin(bin_name));
    c
}

/// `cmd`, set up so the child is killed if the thread that started it dies, even by
/// SIGKILL: a crashed test or testbed never leaves daemons behind.
pub fn die_with_parent(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A running daemon. Dropping it kills it (SIGKILL) and reaps it.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    /// The fields of its ready line.
    pub ready: HashMap<String, String>,
}

impl Proc {
    /// Starts `bin` with `args`, stderr into `log`, and waits up to 10 s for its ready line.
    pub fn start(name: &str, bin_name: &str, args: &[String], log: &Path) -> Proc {
        Self::start_with_stdin(name, bin_name, args, log, Stdio::null())
    }

    /// Like [`Proc::start`], with standard input from `stdin`.
    pub fn start_with_stdin(
        name: &str,
        bin_name: &str,
        args: &[String],
        log: &Path,
        stdin: Stdio,
    ) -> Proc {
        Self::start_cmd(name, Command::new(bin(bin_name)), args, log, stdin)
    }

    /// Like [`Proc::start`], in network namespace `netns` (a host of [`crate::hosts::Hosts`]).
    pub fn start_in(netns: &str, name: &str, bin_name: &str, args: &[String], log: &Path) -> Proc {
        Self::start_cmd(name, in_netns(netns, bin_name), args, log, Stdio::null())
    }

    /// Like [`Proc::start_with_stdin`], in network namespace `netns`.
    pub fn start_in_with_stdin(
        netns: &str,
        name: &str,
        bin_name: &str,
        args: &[String],
        log: &Path,
        stdin: Stdio,
    ) -> Proc {
        Self::start_cmd(name, in_netns(netns, bin_name), args, log, stdin)
    }

    /// Like [`Proc::spawn`], in network namespace `netns`.
    pub fn spawn_in(netns: &str, name: &str, bin_name: &str, args: &[String], log: &Path) -> Proc {
        Self::spawn_cmd(name, in_netns(netns, bin_name), args, log)
    }

    fn start_cmd(name: &str, cmd: Command, args: &[String], log: &Path, stdin: Stdio) -> Proc {
        let stderr = std::fs::File::create(log).expect("creating a log file");
        let mut child = die_with_parent(cmd)
            .args(args)
            .env("BRAID_NETWORK_KEY", NETWORK_KEY)
            .env("RUST_LOG", log_filter())
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let mut proc = Proc {
            name: name.to_owned(),
            child,
            ready: HashMap::new(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                let status = proc.child.try_wait().ok().flatten();
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(12).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "{name} did not say it was ready (exit status {status:?}); {}:\n{}",
                    log.display(),
                    tail.join("\n")
                )
            });
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{name}: ready line {line:?}: {e}"));
        for (k, v) in v.as_object().expect("the ready line is an object") {
            proc.ready
                .insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
        }
        proc
    }

    /// Starts a process that prints no ready line (a viewer).
    pub fn spawn(name: &str, bin_name: &str, args: &[String], log: &Path) -> Proc {
        Self::spawn_cmd(name, Command::new(bin(bin_name)), args, log)
    }

    fn spawn_cmd(name: &str, cmd: Command, args: &[String], log: &Path) -> Proc {
        let stderr = std::fs::File::create(log).expect("creating a log file");
        let child = die_with_parent(cmd)
            .args(args)
            .env("BRAID_NETWORK_KEY", NETWORK_KEY)
            .env("RUST_LOG", log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            ready: HashMap::new(),
        }
    }

    /// Adopts a child started elsewhere (ffmpeg, for one), to be killed when dropped.
    pub fn adopt(name: &str, child: Child) -> Proc {
        Proc {
            name: name.to_owned(),
            child,
            ready: HashMap::new(),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The UDP address from the ready line.
    pub fn udp(&self) -> SocketAddr {
        self.ready["udp"]
            .parse()
            .expect("ready line has a udp address")
    }

    /// The QUIC address from the ready line.
    pub fn quic(&self) -> SocketAddr {
        self.ready["quic"]
            .parse()
            .expect("ready line has a quic address")
    }

    /// The metrics address from the ready line.
    pub fn metrics(&self) -> SocketAddr {
        self.ready["metrics"]
            .parse()
            .expect("ready line has a metrics address")
    }

    /// SIGKILL, now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for it to exit by itself; its exit status, or `None`.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends SIGTERM.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a process ended, and how long the capture's tee was when it did.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// Its exit status.
    pub status: std::process::ExitStatus,
    /// The length of the tee (every byte the capture had sent) when the exit was seen,
    /// at most 20 ms after it: a viewer's output that continues the stream to its exit
    /// ends within the viewer's playout buffer of this.
    pub tee_len: u64,
}

/// Waits up to `within` for every one of `procs` to exit, watching them all at once, and
/// notes `tee`'s length (what the capture had sent) at each exit; panics naming the first
/// still running at the deadline. The exits are in the order of `procs`.
pub fn wait_all<'a>(
    procs: impl IntoIterator<Item = &'a mut Proc>,
    tee: &Path,
    within: Duration,
) -> Vec<Exit> {
    let mut procs: Vec<&mut Proc> = procs.into_iter().collect();
    let mut exits: Vec<Option<Exit>> = vec![None; procs.len()];
    let until = Instant::now() + within;
    loop {
        let tee_len = std::fs::metadata(tee).map_or(0, |m| m.len());
        for (p, e) in procs.iter_mut().zip(exits.iter_mut()) {
            if e.is_none() {
                *e = p.exited().map(|status| Exit { status, tee_len });
            }
        }
        if exits.iter().all(Option::is_some) {
            return exits.into_iter().flatten().collect();
        }
        if Instant::now() >= until {
            let late = procs
                .iter()
                .zip(&exits)
                .find(|(_, e)| e.is_none())
                .map(|(p, _)| p.name.clone())
                .unwrap_or_default();
            panic!("{late} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resident memory of process `pid`, KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0)
}

/// The daemons' log filter: `info`, or `BRAID_TEST_LOG` when set (for a closer look at a
/// failing test).
fn log_filter() -> String {
    std::env::var("BRAID_TEST_LOG").unwrap_or_else(|_| "info".into())
}

/// Scrapes a Prometheus endpoint.
pub mod metrics {
    use std::net::SocketAddr;

    /// Every sample, or nothing if the endpoint does not answer.
    pub fn try_scrape(addr: SocketAddr) -> Vec<(String, f64)> {
        let Ok(body) = ureq::get(&format!("http://{addr}/metrics"))
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
        else {
            return Vec::new();
        };
        parse(&body)
    }

    /// The samples of a Prometheus text body.
    pub fn parse(body: &str) -> Vec<(String, f64)> {
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }

    /// Every sample as (name with labels, value).
    pub fn scrape(addr: SocketAddr) -> Vec<(String, f64)> {
        let body = ureq::get(&format!("http://{addr}/metrics"))
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
            .unwrap_or_else(|e| panic!("scraping {addr}: {e}"));
        parse(&body)
    }

    /// The sum of [`sum`] once it satisfies `ok`, or as it is after `within` (counters
    /// are exported within a tenth of a second of the event; a test waits for the event,
    /// not a fixed time).
    pub fn sum_when(
        addr: SocketAddr,
        name: &str,
        labels: &[&str],
        within: std::time::Duration,
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let until = std::time::Instant::now() + within;
        loop {
            let v = sum(addr, name, labels);
            if ok(v) || std::time::Instant::now() >= until {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The sum of samples of metric `name` whose labels contain every `label="value"`
    /// in `labels`.
    pub fn sum(addr: SocketAddr, name: &str, labels: &[&str]) -> f64 {
        sum_of(&scrape(addr), name, labels)
    }

    /// [`sum`] over samples already scraped.
    pub fn sum_of(samples: &[(String, f64)], name: &str, labels: &[&str]) -> f64 {
        samples
            .iter()
            .filter(|(k, _)| k == name || k.starts_with(&format!("{name}{{")))
            .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
            .map(|(_, v)| v)
            .sum::<f64>()
            // An empty float sum is -0.0, which prints as "-0".
            + 0.0
    }
}

/// Settings of a test network.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Set reflectors.
    pub sets: usize,
    /// Entry points.
    pub entries: usize,
    /// Viewers on the (one) edge.
    pub viewers: usize,
    /// Seconds the viewers watch.
    pub seconds: f64,
    /// Synthetic source bit rate.
    pub bitrate: u64,
    /// Repair on sets and edge.
    pub repair: bool,
    /// Reorder window, ms, on sets and edge.
    pub window_ms: u64,
    /// TOML impairment (the `[impair]` table body, default links) per entry point.
    pub entry_impair: String,
    /// TOML impairment per set reflector, by index (empty: none).
    pub set_impair: Vec<String>,
    /// Start the capture.
    pub capture: bool,
    /// The capture's `--source` (default: its synthetic stream).
    pub source: Option<String>,
    /// A file the capture reads as standard input (with `source` "-").
    pub capture_stdin: Option<PathBuf>,
    /// More capture flags.
    pub capture_args: Vec<String>,
    /// The edge's linger after its last viewer, ms.
    pub linger_ms: u64,
    /// The synthetic source's frames per group of pictures (25 frames a second).
    pub gop: u32,
    /// Paths over QUIC, by set reflector index (entry → set → edge); the rest UDP.
    pub quic_sets: Vec<bool>,
    /// Viewers watch over QUIC.
    pub quic_viewers: bool,
    /// The capture pushes to the entry points over QUIC.
    pub quic_capture: bool,
    /// TOML impairment of the edge's links to the set reflectors (its subscriptions and
    /// NACKs; empty: none), one `[[impair.links]]` per set reflector.
    pub edge_to_sets_impair: String,
    /// More flags for the edge.
    pub edge_args: Vec<String>,
    /// More flags for every entry point, set reflector and edge.
    pub node_args: Vec<String>,
}

impl Spec {
    fn any_quic(&self) -> bool {
        self.quic_sets.iter().any(|q| *q) || self.quic_viewers || self.quic_capture
    }

    fn quic_set(&self, i: usize) -> bool {
        self.quic_sets.get(i).copied().unwrap_or(false)
    }
}

/// What [`test_dir`] gives.
pub type TestDir = tempfile::TempDir;

/// A directory for a test's logs, configs and outputs, removed when dropped unless
/// `BRAID_TEST_KEEP=1` asks to keep it for a look afterwards.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("braid-test-")
        .disable_cleanup(std::env::var_os("BRAID_TEST_KEEP").is_some())
        .tempdir()
        .expect("a temporary directory")
}

/// A control message for stream 1, encoded with `codec` (tests and benchmarks that
/// speak to daemons directly).
pub fn message(codec: &braid_core::wire::Codec, body: braid_core::wire::Body) -> bytes::Bytes {
    let mut out = bytes::BytesMut::new();
    let msg = braid_core::wire::Message {
        header: braid_core::wire::Header {
            stream: braid_core::StreamId(1),
            ..braid_core::wire::Header::default()
        },
        body,
    };
    codec
        .encode(&msg, &mut out)
        .expect("a control message encodes");
    out.freeze()
}

/// A subscription of node `node` to stream 1 for `lease_ms`, with the set reflector's
/// `cookie` for the sender's address, signed by `codec`.
pub fn subscribe(
    codec: &braid_core::wire::Codec,
    node: u64,
    lease_ms: u32,
    cookie: braid_core::wire::Cookie,
) -> bytes::Bytes {
    message(
        codec,
        braid_core::wire::Body::Subscribe(braid_core::wire::Subscription {
            node: braid_core::NodeId(node),
            lease_ms,
            cookie,
        }),
    )
}

/// The header a node's request to a control server carries: `method` `path` with
/// `body`, signed now with the test network's key.
pub fn node_signature(method: &str, path: &str, body: &[u8]) -> (&'static str, String) {
    let auth = braid_core::nodeauth::NodeAuth::new(&braid_core::wire::Key::derive(NETWORK_KEY));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (
        braid_core::nodeauth::HEADER,
        auth.sign(method, path, now, body),
    )
}

/// The cookie in `bytes`, if it is a cookie message (from a node: read unchecked).
pub fn cookie_in(bytes: &[u8]) -> Option<braid_core::wire::Cookie> {
    match braid_core::wire::Codec::viewer().decode(bytes::Bytes::copy_from_slice(bytes)) {
        Ok(braid_core::wire::Message {
            body: braid_core::wire::Body::Cookie { cookie },
            ..
        }) => Some(cookie),
        _ => None,
    }
}

/// Sends `make(cookie)` from `sock` to `to` the way every sender of a granting message
/// does: first with no cookie, then, once `to` answered with its cookie for this address,
/// with that (within 2 s). Returns the cookie; the answers `to` sent besides are dropped.
pub fn handshake(
    sock: &std::net::UdpSocket,
    to: std::net::SocketAddr,
    make: impl Fn(braid_core::wire::Cookie) -> bytes::Bytes,
) -> anyhow::Result<braid_core::wire::Cookie> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let old = sock.read_timeout()?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = [0u8; 9000];
    let mut next_send = Instant::now();
    let cookie = loop {
        if Instant::now() >= next_send {
            sock.send_to(&make([0; 16]), to)?;
            next_send = Instant::now() + Duration::from_millis(300);
        }
        if Instant::now() > deadline {
            sock.set_read_timeout(old)?;
            anyhow::bail!("{to} sent no cookie within 2 s");
        }
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let (true, Some(c)) = (from == to, cookie_in(&buf[..n])) {
                break c;
            }
        }
    };
    sock.set_read_timeout(old)?;
    sock.send_to(&make(cookie), to)?;
    Ok(cookie)
}

/// A source publishing stream 1 the way a capture does: signed with the publish key of
/// `stream_key`, with each entry point's cookie.
pub struct Publisher {
    sock: std::net::UdpSocket,
    codec: braid_core::wire::Codec,
    entries: Vec<(std::net::SocketAddr, braid_core::wire::Cookie)>,
}

impl Publisher {
    /// Publishes from `sock` to every entry point of `entries` (the cookie handshake
    /// with each); `sock` is left non-blocking.
    pub fn start(
        sock: &std::net::UdpSocket,
        entries: &[std::net::SocketAddr],
        stream_key: &str,
    ) -> anyhow::Result<Publisher> {
        let codec = braid_core::wire::Codec::source(stream_key);
        let mut with = Vec::new();
        for e in entries {
            let c = handshake(sock, *e, |cookie| {
                message(&codec, braid_core::wire::Body::Publish { cookie })
            })?;
            with.push((*e, c));
        }
        let sock = sock.try_clone()?;
        sock.set_nonblocking(true)?;
        Ok(Publisher {
            sock,
            codec,
            entries: with,
        })
    }

    /// The codec a source signs its media with.
    pub fn codec(&self) -> &braid_core::wire::Codec {
        &self.codec
    }

    /// Publishes again (every second, as a capture does), after taking any fresh cookie
    /// the entry points sent.
    pub fn renew(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 9000];
        while let Ok((n, from)) = self.sock.recv_from(&mut buf) {
            if let Some(c) = cookie_in(&buf[..n]) {
                if let Some(e) = self.entries.iter_mut().find(|(a, _)| *a == from) {
                    e.1 = c;
                }
            }
        }
        for (to, cookie) in &self.entries {
            let msg = message(
                &self.codec,
                braid_core::wire::Body::Publish { cookie: *cookie },
            );
            self.sock.send_to(&msg, to)?;
        }
        Ok(())
    }
}

/// TLS flags for a node with the development certificate `name` from `dir`.
pub fn tls_args(dir: &Path, name: &str) -> Vec<String> {
    let f = |x: &str| dir.join(x).display().to_string();
    vec![
        s("--tls-cert"),
        f(&format!("{name}.pem")),
        s("--tls-key"),
        f(&format!("{name}.key")),
        s("--tls-ca"),
        f("ca.pem"),
    ]
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            sets: 3,
            entries: 2,
            viewers: 2,
            seconds: 15.0,
            bitrate: 4_000_000,
            repair: true,
            window_ms: 200,
            entry_impair: String::new(),
            set_impair: Vec::new(),
            capture: true,
            source: None,
            capture_stdin: None,
            capture_args: Vec::new(),
            linger_ms: 5000,
            gop: 25,
            quic_sets: Vec::new(),
            quic_viewers: false,
            quic_capture: false,
            edge_to_sets_impair: String::new(),
            edge_args: Vec::new(),
            node_args: Vec::new(),
        }
    }
}

/// A running test network: set reflectors, one edge, entry points, a capture, viewers.
pub struct Net {
    /// Where logs, configs and outputs go.
    pub dir: tempfile::TempDir,
    /// Set reflectors.
    pub sets: Vec<Proc>,
    /// The edge.
    pub edge: Proc,
    /// Entry points.
    pub entries: Vec<Proc>,
    /// The capture, if started.
    pub capture: Option<Proc>,
    /// Viewers.
    pub viewers: Vec<Proc>,
    /// How each viewer ended, once [`Net::wait_viewers`] saw it.
    pub exits: Vec<Exit>,
    /// The spec it was started with.
    pub spec: Spec,
    /// The edge's arguments, to start it again.
    edge_args: Vec<String>,
    /// The capture's arguments, to start it again.
    cap_args: Vec<String>,
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

impl Net {
    /// Starts everything and the viewers; returns once the viewers are started.
    pub fn start(spec: Spec) -> Net {
        // BRAID_TEST_KEEP=1 keeps logs, configs and outputs for a look after the test.
        let dir = test_dir();
        let p = |f: &str| dir.path().join(f);
        let write = |f: &str, text: &str| {
            std::fs::write(p(f), text).expect("writing a config");
            p(f).display().to_string()
        };
        let certs = p("certs");
        if spec.any_quic() {
            let names: Vec<String> = ["set", "edge", "entry", "capture"]
                .iter()
                .map(|n| n.to_string())
                .collect();
            braid_net::tls::make_dev_certs(&certs, &names, &[]).expect("development certificates");
        }
        let quic_node = |name: &str| {
            let mut a = vec![s("--quic-listen"), s("127.0.0.1:0")];
            a.extend(tls_args(&certs, name));
            a
        };
        let mut sets = Vec::new();
        for i in 0..spec.sets {
            let impair = spec.set_impair.get(i).cloned().unwrap_or_default();
            let cfg = write(
                &format!("set{i}.toml"),
                &format!("role = \"set\"\n[impair.default]\n{impair}\n"),
            );
            sets.push(Proc::start(
                &format!("set{i}"),
                "braid-reflector",
                &[
                    s("--config"),
                    cfg,
                    s("--listen"),
                    s("127.0.0.1:0"),
                    s("--node-id"),
                    s(100 + i),
                    s("--stream"),
                    s(1),
                    s("--repair"),
                    s(spec.repair),
                    s("--reorder-window-ms"),
                    s(spec.window_ms),
                ]
                .into_iter()
                .chain(if spec.quic_set(i) {
                    quic_node("set")
                } else {
                    Vec::new()
                })
                .chain(spec.node_args.iter().cloned())
                .collect::<Vec<_>>(),
                &p(&format!("set{i}.log")),
            ));
        }
        let mut edge_args = vec![
            s("--role"),
            s("edge"),
            s("--listen"),
            s("127.0.0.1:0"),
            s("--node-id"),
            s(200),
            s("--linger-ms"),
            s(spec.linger_ms),
            s("--stream"),
            s(1),
            s("--repair"),
            s(spec.repair),
            s("--reorder-window-ms"),
            s(spec.window_ms),
        ];
        let reflectors: Vec<String> = sets
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if spec.quic_set(i) {
                    format!("quic://{}", x.quic())
                } else {
                    s(x.udp())
                }
            })
            .collect();
        for r in &reflectors {
            edge_args.push(s("--reflector"));
            edge_args.push(r.clone());
        }
        if !spec.edge_to_sets_impair.is_empty() {
            let links: String = reflectors
                .iter()
                .map(|r| {
                    let to = r.trim_start_matches("quic://");
                    format!(
                        "[[impair.links]]\nto = \"{to}\"\n{}\n",
                        spec.edge_to_sets_impair
                    )
                })
                .collect();
            edge_args.push(s("--config"));
            edge_args.push(write("edge.toml", &links));
        }
        if spec.quic_viewers {
            edge_args.extend(quic_node("edge"));
        } else if spec.quic_sets.iter().any(|q| *q) {
            edge_args.extend(tls_args(&certs, "edge"));
        }
        edge_args.extend(spec.edge_args.iter().cloned());
        edge_args.extend(spec.node_args.iter().cloned());
        let edge = Proc::start("edge", "braid-reflector", &edge_args, &p("edge.log"));
        let mut entries = Vec::new();
        for i in 0..spec.entries {
            let cfg = write(
                &format!("entry{i}.toml"),
                &format!("[impair.default]\n{}\n", spec.entry_impair),
            );
            entries.push(Proc::start(
                &format!("entry{i}"),
                "braid-entrypoint",
                &[
                    s("--config"),
                    cfg,
                    s("--listen"),
                    s("127.0.0.1:0"),
                    s("--stream"),
                    format!("1:{STREAM_KEY}:{}", reflectors.join(",")),
                ]
                .into_iter()
                .chain(if spec.quic_capture {
                    quic_node("entry")
                } else if spec.quic_sets.iter().any(|q| *q) {
                    tls_args(&certs, "entry")
                } else {
                    Vec::new()
                })
                .chain(spec.node_args.iter().cloned())
                .collect::<Vec<_>>(),
                &p(&format!("entry{i}.log")),
            ));
        }
        let mut viewers = Vec::new();
        for i in 0..spec.viewers {
            viewers.push(Proc::spawn(
                &format!("viewer{i}"),
                "braid-client",
                &[
                    s("--edge"),
                    if spec.quic_viewers {
                        format!("quic://{}", edge.quic())
                    } else {
                        s(edge.udp())
                    },
                    s("--transport"),
                    s(if spec.quic_viewers { "quic" } else { "udp" }),
                    s("--stream"),
                    s(1),
                    s("--out"),
                    p(&format!("view{i}.ts")).display().to_string(),
                    s("--duration"),
                    s(spec.seconds),
                    s("--stats-json"),
                    p(&format!("view{i}.json")).display().to_string(),
                    s("--start-timeout"),
                    s(10),
                ]
                .into_iter()
                .chain(if spec.quic_viewers {
                    vec![s("--tls-ca"), certs.join("ca.pem").display().to_string()]
                } else {
                    Vec::new()
                })
                .collect::<Vec<_>>(),
                &p(&format!("view{i}.log")),
            ));
        }
        let mut cap_args = vec![
            s("--stream"),
            s(1),
            s("--stream-key"),
            s(STREAM_KEY),
            s("--bitrate"),
            s(spec.bitrate),
            s("--gop"),
            s(spec.gop),
            s("--tee"),
            p("tee.ts").display().to_string(),
            s("--duration"),
            s(spec.seconds + 3.0),
            s("--bind"),
            s("127.0.0.1:0"),
        ];
        for e in &entries {
            cap_args.push(s("--entry"));
            cap_args.push(if spec.quic_capture {
                format!("quic://{}", e.quic())
            } else {
                s(e.udp())
            });
        }
        if spec.quic_capture {
            cap_args.push(s("--tls-ca"));
            cap_args.push(certs.join("ca.pem").display().to_string());
        }
        if let Some(source) = &spec.source {
            cap_args.push(s("--source"));
            cap_args.push(source.clone());
        }
        cap_args.extend(spec.capture_args.iter().cloned());
        let capture = spec.capture.then(|| {
            let stdin = match &spec.capture_stdin {
                Some(f) => {
                    Stdio::from(std::fs::File::open(f).expect("opening the capture's input"))
                }
                None => Stdio::null(),
            };
            Proc::start_with_stdin(
                "capture",
                "braid-capture",
                &cap_args,
                &p("capture.log"),
                stdin,
            )
        });
        Net {
            dir,
            sets,
            edge,
            entries,
            capture,
            viewers,
            exits: Vec::new(),
            spec,
            edge_args,
            cap_args,
        }
    }

    /// SIGKILLs the edge and, `down` later, starts it again on the same UDP, TCP and
    /// QUIC addresses, as a supervisor restarts a crashed daemon. Returns once the new
    /// one is ready.
    pub fn restart_edge(&mut self, down: Duration) {
        let udp = self.edge.udp().to_string();
        let quic = self.edge.ready.get("quic").cloned().unwrap_or_default();
        self.edge.kill();
        std::thread::sleep(down);
        let mut args = self.edge_args.clone();
        for (i, a) in args.clone().iter().enumerate() {
            match a.as_str() {
                "--listen" => args[i + 1] = udp.clone(),
                "--quic-listen" if !quic.is_empty() => args[i + 1] = quic.clone(),
                _ => {}
            }
        }
        // The kernel may hold the old sockets for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        // Each restart's log of its own (a later one does not overwrite an earlier's).
        let log = (1..)
            .map(|n| self.path(&format!("edge-restarted-{n}.log")))
            .find(|p| !p.exists())
            .expect("a free name");
        loop {
            let p =
                std::panic::catch_unwind(|| Proc::start("edge", "braid-reflector", &args, &log));
            match p {
                Ok(p) => {
                    self.edge = p;
                    return;
                }
                Err(e) if Instant::now() >= deadline => std::panic::resume_unwind(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// SIGKILLs the capture and starts it again with its tee in `tee` (a file in the
    /// test's directory), as an encoder restarted mid-event: it numbers from the wall
    /// clock, so its stream continues far above where the old one stopped. Returns once
    /// the new one is ready.
    pub fn restart_capture(&mut self, tee: &str) {
        if let Some(c) = self.capture.as_mut() {
            c.kill();
        }
        let mut args = self.cap_args.clone();
        if let Some(i) = args.iter().position(|a| a == "--tee") {
            args[i + 1] = self.path(tee).display().to_string();
        }
        self.capture = Some(Proc::start(
            "capture",
            "braid-capture",
            &args,
            &self.path(&format!("capture-{tee}.log")),
        ));
    }

    /// A file in the test's directory.
    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// Waits for every viewer to finish, asserts each exited cleanly, and keeps how
    /// each ended in [`Net::exits`].
    pub fn wait_viewers(&mut self) {
        let limit = Duration::from_secs_f64(self.spec.seconds + 20.0);
        let tee = self.path("tee.ts");
        self.exits = wait_all(&mut self.viewers, &tee, limit);
        self.save_metrics();
        for (v, e) in self.viewers.iter().zip(&self.exits) {
            assert!(
                e.status.success(),
                "{} failed: see {}",
                v.name,
                self.dir.path().display()
            );
        }
    }

    /// Writes every running node's metrics beside its log (`<name>.prom`), for a look at
    /// a failed run kept with `BRAID_TEST_KEEP=1`.
    pub fn save_metrics(&self) {
        let nodes = self.sets.iter().chain(&self.entries).chain([&self.edge]);
        for p in nodes.chain(self.capture.as_ref()) {
            let Some(addr) = p.ready.get("metrics").and_then(|a| a.parse().ok()) else {
                continue;
            };
            let text: String = metrics::try_scrape(addr)
                .into_iter()
                .map(|(k, v)| format!("{k} {v}\n"))
                .collect();
            let _ = std::fs::write(self.path(&format!("{}.prom", p.name)), text);
        }
    }

    /// A viewer's final stats.
    pub fn viewer_stats(&self, i: usize) -> serde_json::Value {
        let text =
            std::fs::read_to_string(self.path(&format!("view{i}.json"))).expect("viewer stats");
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .expect("a stats line");
        serde_json::from_str(last).expect("viewer stats are JSON lines")
    }
}

/// Many viewers in one process, one thread each, speaking the watch protocol directly;
/// each records every sequence number it gets.
pub mod crowd {
    use std::net::{SocketAddr, UdpSocket};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use braid_core::wire::{Body, Codec, Cookie, Flags, Header, Message, Watch, WatchStart};
    use braid_core::{NodeId, SeqNo, StreamId};
    use bytes::{Bytes, BytesMut};

    /// What one viewer got.
    #[derive(Debug, Default, Clone)]
    pub struct Seen {
        /// Every media sequence number, in arrival order.
        pub seqs: Vec<u64>,
        /// Errors the edge sent.
        pub errors: Vec<String>,
        /// From the first watch message to the first media packet.
        pub join: Option<Duration>,
        /// Whether the first media packet was flagged as a keyframe (a new viewer starts
        /// at the latest keyframe; one that starts anywhere else missed its beginning).
        pub starts_on_keyframe: bool,
        /// When the last media packet arrived.
        pub last_at: Option<Instant>,
        /// The source session (RTP SSRC) of the last media packet.
        pub ssrc: Option<u32>,
        /// When the viewer stopped watching.
        pub stopped: Option<Instant>,
        /// The edge's cookie for this viewer's address.
        pub cookie: Cookie,
        /// Highest sequence number received, packets since the last acknowledgement,
        /// and when that was.
        acked: u64,
        since: u32,
        last_ack: Option<Instant>,
    }

    impl Seen {
        /// Takes in one message from the edge; returns the media sequence number, if
        /// it was media (and counts it towards the next acknowledgement).
        pub fn take(&mut self, codec: &Codec, bytes: Bytes, asked: Instant) -> Option<u64> {
            match codec.decode(bytes) {
                Ok(Message {
                    header,
                    body: Body::Media(m),
                }) => {
                    if self.join.is_none() {
                        self.join = Some(asked.elapsed());
                        self.starts_on_keyframe = header.flags.contains(Flags::KEYFRAME);
                    }
                    self.last_at = Some(Instant::now());
                    self.ssrc = Some(m.rtp.fields().ssrc);
                    self.seqs.push(m.seq.0);
                    self.acked = self.acked.max(m.seq.0);
                    self.since = self.since.saturating_add(1);
                    Some(m.seq.0)
                }
                Ok(Message {
                    body: Body::Error { text, .. },
                    ..
                }) => {
                    self.errors.push(text);
                    None
                }
                Ok(Message {
                    body: Body::Cookie { cookie },
                    ..
                }) => {
                    // Watch again at once, with the cookie.
                    self.cookie = cookie;
                    self.since = u32::MAX;
                    None
                }
                _ => None,
            }
        }

        /// The sequence number to acknowledge, when an acknowledgement is due (every 32
        /// packets or 250 ms, like the client).
        pub fn ack_due(&mut self) -> Option<u64> {
            let now = Instant::now();
            let last = *self.last_ack.get_or_insert(now);
            if self.since < 32 && now.duration_since(last) <= Duration::from_millis(250) {
                return None;
            }
            self.since = 0;
            self.last_ack = Some(now);
            Some(self.acked)
        }

        /// Sequence numbers missing between the first and the last received (a viewer
        /// that started late or stopped early misses more: see
        /// [`Seen::starts_on_keyframe`], [`Seen::last_at`]).
        pub fn missing(&self) -> u64 {
            let mut s = self.seqs.clone();
            s.sort_unstable();
            s.dedup();
            match (s.first(), s.last()) {
                (Some(a), Some(b)) => b - a + 1 - s.len() as u64,
                _ => 0,
            }
        }
    }

    /// A crowd of viewers watching stream 1 on `edge`.
    pub struct Crowd {
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<Vec<Seen>>>,
        tally: Arc<Tally>,
    }

    /// Media every viewer of a crowd received so far, counted as it arrives.
    #[derive(Debug, Default)]
    struct Tally {
        packets: AtomicU64,
        bytes: AtomicU64,
    }

    impl Tally {
        fn add(&self, bytes: usize) {
            self.packets.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// One viewer over QUIC: its own endpoint (the edge tells viewers apart by address),
    /// the watch protocol on the control stream, media as datagrams.
    async fn quic_viewer(
        i: usize,
        edge: SocketAddr,
        tls: braid_net::tls::Tls,
        stop: Arc<AtomicBool>,
        tally: Arc<Tally>,
    ) -> Seen {
        use braid_net::quic::{Options, Quic};
        use braid_net::udp::{Impairments, Socket};

        let codec = Codec::viewer();
        let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let mut sock = Socket::bind(any, Impairments::default(), "crowd").expect("a socket");
        let q = Quic::bind(&Options::default(), any, &tls, "crowd").expect("a QUIC endpoint");
        sock.attach_quic(q);
        if let Some(q) = sock.quic_mut() {
            q.connect_now(edge);
        }
        let mut seen = Seen::default();
        let asked = Instant::now();
        sock.send(
            Instant::now(),
            edge,
            watch(&codec, i as u64, 0, WatchStart::Keyframe, [0; 16]),
            false,
        );
        let mut got = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            got.clear();
            let _ = tokio::time::timeout(Duration::from_millis(50), sock.recv(&mut got)).await;
            for (_, b) in got.drain(..) {
                let len = b.len();
                if seen.take(&codec, b, asked).is_some() {
                    tally.add(len);
                }
            }
            if let Some(acked) = seen.ack_due() {
                sock.send(
                    Instant::now(),
                    edge,
                    watch(&codec, i as u64, acked, WatchStart::Keyframe, seen.cookie),
                    false,
                );
            }
        }
        seen.stopped = Some(Instant::now());
        if let Some(q) = sock.quic_mut() {
            // Closing the connection is the viewer leaving: the edge drops it at once.
            q.close();
        }
        seen
    }

    /// Reads one datagram from `sock`, if one comes, into `seen` (media counted in
    /// `tally`); whether one came.
    fn take_one(
        codec: &Codec,
        sock: &UdpSocket,
        buf: &mut [u8],
        seen: &mut Seen,
        asked: Instant,
        tally: &Tally,
    ) -> bool {
        let Ok(n) = sock.recv(buf) else {
            return false;
        };
        if seen
            .take(codec, Bytes::copy_from_slice(&buf[..n]), asked)
            .is_some()
        {
            tally.add(n);
        }
        true
    }

    /// Viewer `i` acknowledges what it has when an acknowledgement is due.
    fn ack_if_due(codec: &Codec, i: usize, sock: &UdpSocket, seen: &mut Seen, edge: SocketAddr) {
        if let Some(acked) = seen.ack_due() {
            let w = watch(codec, i as u64, acked, WatchStart::Keyframe, seen.cookie);
            let _ = sock.send_to(&w, edge);
        }
    }

    /// Viewer `i` leaves at once, so the edge stops sending to its port.
    fn leave(codec: &Codec, i: usize, sock: &UdpSocket, edge: SocketAddr) {
        let mut out = BytesMut::new();
        let bye = Message {
            header: Header {
                stream: StreamId(1),
                ..Header::default()
            },
            body: Body::Unsubscribe {
                node: NodeId(i as u64),
            },
        };
        if codec.encode(&bye, &mut out).is_ok() {
            let _ = sock.send_to(&out, edge);
        }
    }

    /// A watch message from viewer `id` starting at `start`, acknowledging `acked`, with
    /// the edge's `cookie` for its address (zeros for none yet).
    pub fn watch(codec: &Codec, id: u64, acked: u64, start: WatchStart, cookie: Cookie) -> Bytes {
        let mut out = BytesMut::new();
        let msg = Message {
            header: Header {
                stream: StreamId(1),
                ..Header::default()
            },
            body: Body::Watch(Watch {
                node: NodeId(id),
                lease_ms: 3000,
                start,
                seq: SeqNo(0),
                acked: SeqNo(acked),
                cookie,
                token: Bytes::new(),
                received: None,
                policy: None,
                fits_kbps: None,
                rendition: None,
            }),
        };
        codec
            .encode(&msg, &mut out)
            .expect("a watch message encodes");
        out.freeze()
    }

    impl Crowd {
        /// Starts `n` viewers.
        pub fn start(edge: SocketAddr, n: usize) -> Crowd {
            let stop = Arc::new(AtomicBool::new(false));
            let tally = Arc::new(Tally::default());
            let threads = (0..n)
                .map(|i| {
                    let stop = stop.clone();
                    let tally = tally.clone();
                    std::thread::spawn(move || {
                        let codec = Codec::viewer();
                        let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
                        sock.set_read_timeout(Some(Duration::from_millis(50)))
                            .expect("timeout");
                        let mut seen = Seen::default();
                        let mut buf = [0u8; 2048];
                        let asked = Instant::now();
                        let _ = sock.send_to(
                            &watch(&codec, i as u64, 0, WatchStart::Keyframe, [0; 16]),
                            edge,
                        );
                        while !stop.load(Ordering::Relaxed) {
                            take_one(&codec, &sock, &mut buf, &mut seen, asked, &tally);
                            ack_if_due(&codec, i, &sock, &mut seen, edge);
                        }
                        seen.stopped = Some(Instant::now());
                        leave(&codec, i, &sock, edge);
                        vec![seen]
                    })
                })
                .collect();
            Crowd {
                stop,
                threads,
                tally,
            }
        }

        /// Starts `n` viewers on `threads` threads that look at their (non-blocking)
        /// sockets every millisecond instead of sleeping in `recv`. On loopback the
        /// sender of a datagram pays for waking the thread that waits for it, which no
        /// real network makes it pay: more than half of a bare `sendmmsg` loop's CPU
        /// went there with a sleeping thread per viewer (perf). Viewers that poll are
        /// never woken, so what the sender spends is what sending costs. Join times are
        /// then counted to the millisecond.
        pub fn start_polling(edge: SocketAddr, n: usize, threads: usize) -> Crowd {
            let stop = Arc::new(AtomicBool::new(false));
            let tally = Arc::new(Tally::default());
            let per = n.div_ceil(threads.max(1)).max(1);
            let threads = (0..n)
                .step_by(per)
                .map(|first| {
                    let (stop, tally) = (stop.clone(), tally.clone());
                    let ids = first..(first + per).min(n);
                    std::thread::spawn(move || {
                        let codec = Codec::viewer();
                        let mut viewers: Vec<(usize, UdpSocket, Seen, Instant)> = ids
                            .map(|i| {
                                let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
                                sock.set_nonblocking(true).expect("non-blocking");
                                let asked = Instant::now();
                                let first =
                                    watch(&codec, i as u64, 0, WatchStart::Keyframe, [0; 16]);
                                let _ = sock.send_to(&first, edge);
                                (i, sock, Seen::default(), asked)
                            })
                            .collect();
                        let mut buf = [0u8; 2048];
                        while !stop.load(Ordering::Relaxed) {
                            for (i, sock, seen, asked) in viewers.iter_mut() {
                                while take_one(&codec, sock, &mut buf, seen, *asked, &tally) {}
                                ack_if_due(&codec, *i, sock, seen, edge);
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        viewers
                            .into_iter()
                            .map(|(i, sock, mut seen, _)| {
                                seen.stopped = Some(Instant::now());
                                leave(&codec, i, &sock, edge);
                                seen
                            })
                            .collect()
                    })
                })
                .collect();
            Crowd {
                stop,
                threads,
                tally,
            }
        }

        /// Starts `n` viewers over QUIC to the edge's QUIC address, trusting `ca`; they
        /// run as tasks on a two-thread runtime of their own.
        pub fn start_quic(edge: SocketAddr, n: usize, ca: std::path::PathBuf) -> Crowd {
            let stop = Arc::new(AtomicBool::new(false));
            let tally = Arc::new(Tally::default());
            let (s, t) = (stop.clone(), tally.clone());
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async move {
                    let tls = braid_net::tls::Tls {
                        ca: Some(ca),
                        ..braid_net::tls::Tls::default()
                    };
                    let tasks: Vec<_> = (0..n)
                        .map(|i| {
                            tokio::spawn(quic_viewer(i, edge, tls.clone(), s.clone(), t.clone()))
                        })
                        .collect();
                    let mut seen = Vec::new();
                    for t in tasks {
                        seen.push(t.await.unwrap_or_default());
                    }
                    seen
                })
            });
            Crowd {
                stop,
                threads: vec![thread],
                tally,
            }
        }

        /// Media packets and bytes (Braid messages as they came off the wire) every
        /// viewer received so far, all together.
        pub fn received(&self) -> (u64, u64) {
            (
                self.tally.packets.load(Ordering::Relaxed),
                self.tally.bytes.load(Ordering::Relaxed),
            )
        }

        /// Stops every viewer and returns what each got.
        pub fn finish(self) -> Vec<Seen> {
            self.stop.store(true, Ordering::Relaxed);
            self.threads
                .into_iter()
                .flat_map(|t| t.join().expect("viewer thread"))
                .collect()
        }
    }
}

/// A network with control servers and edges in both port-parity sets, for the control
/// and switching tests.
pub struct ControlNet {
    /// Where logs and outputs go.
    pub dir: tempfile::TempDir,
    /// Control servers.
    pub controls: Vec<Proc>,
    /// Set reflectors.
    pub sets: Vec<Proc>,
    /// Edges: even-port ones first.
    pub edges: Vec<Proc>,
    /// Entry points.
    pub entries: Vec<Proc>,
    /// The capture.
    pub capture: Proc,
    /// Each edge's command line, to restart it.
    pub edge_args: Vec<Vec<String>>,
}

/// More flags for [`ControlNet::start_with`].
#[derive(Debug, Clone, Default)]
pub struct ControlOptions {
    /// For every control server.
    pub control_args: Vec<String>,
    /// For the capture (a `--source`, say).
    pub capture_args: Vec<String>,
}

/// The operator token of [`ControlNet`]'s control servers (drain, undrain).
pub const OPERATOR_TOKEN: &str = "test operator token";

/// A free port of the given parity (UDP and TCP).
pub fn port_of_parity(even: bool) -> u16 {
    for _ in 0..1000 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let p = s.local_addr().expect("addr").port();
        if (p % 2 == 0) == even && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port of the right parity")
}

impl ControlNet {
    /// Starts `controls` control servers, 3 set reflectors, `per_set` edges per set,
    /// 2 entry points and a synthetic capture running `seconds`; `edge_args(i)` adds flags
    /// to edge `i`, `token_secret` (if any) is required by control servers and edges.
    pub fn start(
        controls: usize,
        per_set: usize,
        seconds: f64,
        token_secret: &str,
        edge_args: impl Fn(usize) -> Vec<String>,
    ) -> ControlNet {
        Self::start_with(
            controls,
            per_set,
            seconds,
            token_secret,
            edge_args,
            &ControlOptions::default(),
        )
    }

    /// Like [`ControlNet::start`], with more flags for the control servers and the
    /// capture.
    pub fn start_with(
        controls: usize,
        per_set: usize,
        seconds: f64,
        token_secret: &str,
        edge_args: impl Fn(usize) -> Vec<String>,
        options: &ControlOptions,
    ) -> ControlNet {
        let dir = test_dir();
        let p = |f: &str| dir.path().join(f);
        let s = |v: &dyn ToString| v.to_string();
        let mut ctl = Vec::new();
        for i in 0..controls {
            let mut a = vec![
                s(&"--listen"),
                s(&"127.0.0.1:0"),
                s(&"--token-secret"),
                token_secret.to_owned(),
                s(&"--operator-token"),
                s(&OPERATOR_TOKEN),
            ];
            a.extend(options.control_args.iter().cloned());
            ctl.push(Proc::start(
                &format!("control{i}"),
                "braid-control",
                &a,
                &p(&format!("control{i}.log")),
            ));
        }
        let urls: Vec<String> = ctl
            .iter()
            .map(|c| format!("http://{}", c.ready["http"]))
            .collect();
        let mut sets = Vec::new();
        for i in 0..3 {
            let mut a = vec![
                s(&"--role"),
                s(&"set"),
                s(&"--listen"),
                s(&"127.0.0.1:0"),
                s(&"--stream"),
                s(&1),
                s(&"--node-id"),
                s(&(100 + i)),
            ];
            // Set reflectors report too, so edges without a list can learn them.
            for u in &urls {
                a.extend([s(&"--control"), u.clone()]);
            }
            sets.push(Proc::start(
                &format!("set{i}"),
                "braid-reflector",
                &a,
                &p(&format!("set{i}.log")),
            ));
        }
        let mut edges = Vec::new();
        let mut all_edge_args = Vec::new();
        for i in 0..2 * per_set {
            let even = i < per_set;
            let mut a = vec![
                s(&"--role"),
                s(&"edge"),
                s(&"--listen"),
                format!("127.0.0.1:{}", port_of_parity(even)),
                s(&"--stream"),
                s(&1),
                s(&"--node-id"),
                s(&(200 + i)),
                s(&"--token-secret"),
                token_secret.to_owned(),
                s(&"--linger-ms"),
                s(&60000),
            ];
            for set in &sets {
                a.extend([s(&"--reflector"), s(&set.udp())]);
            }
            for u in &urls {
                a.extend([s(&"--control"), u.clone()]);
            }
            a.extend(edge_args(i));
            edges.push(Proc::start(
                &format!("edge{i}"),
                "braid-reflector",
                &a,
                &p(&format!("edge{i}.log")),
            ));
            all_edge_args.push(a);
        }
        let refl: Vec<String> = sets.iter().map(|x| x.udp().to_string()).collect();
        let mut entries = Vec::new();
        for i in 0..2 {
            let mut a = vec![
                s(&"--listen"),
                s(&"127.0.0.1:0"),
                s(&"--stream"),
                format!("1:{STREAM_KEY}:{}", refl.join(",")),
                s(&"--node-id"),
                s(&(10 + i)),
            ];
            for u in &urls {
                a.extend([s(&"--control"), u.clone()]);
            }
            entries.push(Proc::start(
                &format!("entry{i}"),
                "braid-entrypoint",
                &a,
                &p(&format!("entry{i}.log")),
            ));
        }
        let mut cap = vec![
            s(&"--stream-key"),
            s(&STREAM_KEY),
            s(&"--gop"),
            s(&25),
            s(&"--tee"),
            p("tee.ts").display().to_string(),
            s(&"--duration"),
            s(&seconds),
            s(&"--bind"),
            s(&"127.0.0.1:0"),
        ];
        for e in &entries {
            cap.extend([s(&"--entry"), s(&e.udp())]);
        }
        cap.extend(options.capture_args.iter().cloned());
        let capture = Proc::start("capture", "braid-capture", &cap, &p("capture.log"));
        ControlNet {
            dir,
            controls: ctl,
            sets,
            edges,
            entries,
            capture,
            edge_args: all_edge_args,
        }
    }

    /// Starts edge `i` again with its original command line (after a kill).
    pub fn restart_edge(&mut self, i: usize) {
        // As systemd's restart does: the old process is gone (a SIGTERM sent to it has
        // done its work) before the new one binds the same address.
        self.edges[i].wait(Duration::from_secs(5));
        let log = self.path(&format!("edge{i}-again.log"));
        self.edges[i] = Proc::start(
            &format!("edge{i}"),
            "braid-reflector",
            &self.edge_args[i],
            &log,
        );
    }

    /// A file in the test's directory.
    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// The control servers' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.controls
            .iter()
            .map(|c| format!("http://{}", c.ready["http"]))
            .collect()
    }

    /// Starts a viewer that asks the control servers; `extra` adds flags.
    pub fn viewer(&self, name: &str, id: u64, seconds: f64, extra: &[String]) -> Proc {
        let mut a = vec![
            "--id".to_string(),
            id.to_string(),
            "--out".into(),
            self.path(&format!("{name}.ts")).display().to_string(),
            "--stats-json".into(),
            self.path(&format!("{name}.json")).display().to_string(),
            "--duration".into(),
            seconds.to_string(),
            "--start-timeout".into(),
            "10".into(),
        ];
        for u in self.urls() {
            a.extend(["--control".into(), u]);
        }
        a.extend(extra.iter().cloned());
        Proc::spawn(name, "braid-client", &a, &self.path(&format!("{name}.log")))
    }

    /// A viewer's last stats line.
    pub fn stats(&self, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path(&format!("{name}.json"))).unwrap_or_default();
        text.lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}
