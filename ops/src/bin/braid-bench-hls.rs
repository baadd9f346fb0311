//! HLS from an edge against nginx: segments served per second and Gbps by one edge to
//! many HTTP clients (wrk), beside Debian's nginx serving the same segment's bytes from
//! tmpfs (as many workers as cores, sendfile), in the same run and in turns; and the
//! edge's memory per HLS client.
//!
//! `cargo build --release --bins && target/release/braid-bench-hls`
//!
//! Needs `wrk` and `nginx` (Debian's packages). wrk and the server under test share the
//! machine's two cores, for the edge and nginx alike.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_ops::harness::{Net, Proc, Spec, rss_kib};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Concurrent HTTP connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Measurements of each server, taken in turns.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Requests per second and bytes per second wrk saw against `url`.
fn wrk(url: &str, connections: usize, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t", "2", "-c", &connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--latency", url])
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let v = line.split_whitespace().nth(1)?;
        let (num, mult) = match v {
            v if v.ends_with("GB") => (&v[..v.len() - 2], 1e9),
            v if v.ends_with("MB") => (&v[..v.len() - 2], 1e6),
            v if v.ends_with("KB") => (&v[..v.len() - 2], 1e3),
            v if v.ends_with('B') => (&v[..v.len() - 1], 1.0),
            v => (v, 1.0),
        };
        Some(num.parse::<f64>().ok()? * mult)
    };
    let errors = text.lines().any(|l| l.contains("Non-2xx"));
    anyhow::ensure!(!errors, "wrk saw errors against {url}:\n{text}");
    Ok((
        field("Requests/sec:").context(format!("wrk's output: {text}"))?,
        field("Transfer/sec:").context(format!("wrk's output: {text}"))?,
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let net = Net::start(Spec {
        seconds: 600.0,
        viewers: 0,
        edge_args: vec![
            "--hls-listen".into(),
            "127.0.0.1:0".into(),
            // Segments stay listed for the whole run.
            "--hls-window".into(),
            "60".into(),
        ],
        ..Spec::default()
    });
    let base = format!("http://{}/hls/1", net.edge.ready["hls"]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let get = |url: &str| -> Option<Vec<u8>> {
        let mut r = agent.get(url).call().ok()?;
        if r.status() != 200 {
            return None;
        }
        r.body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .ok()
    };
    // A complete segment, listed for the run.
    let end = Instant::now() + Duration::from_secs(20);
    let (uri, bytes) = loop {
        if let Some(pl) = get(&format!("{base}/playlist.m3u8")) {
            let pl = String::from_utf8_lossy(&pl).into_owned();
            if let Some(uri) = pl.lines().find(|l| l.starts_with("seg/")) {
                let uri = uri.to_owned();
                let bytes = get(&format!("{base}/{uri}")).context("the segment")?;
                break (uri, bytes);
            }
        }
        anyhow::ensure!(Instant::now() < end, "no segment from the edge");
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!("segment {uri}: {} bytes", bytes.len());

    // nginx serving the same bytes from tmpfs.
    let root = tempfile::Builder::new()
        .prefix("braid-bench-hls-")
        .tempdir_in("/dev/shm")?;
    std::fs::write(root.path().join("seg.ts"), &bytes)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = root.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; worker_processes auto; pid {dir}/nginx.pid; error_log {dir}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;\n\
               client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};\n\
               uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
               server {{ listen 127.0.0.1:{port}; root {dir}; }} }}\n",
            dir = root.path().display()
        ),
    )?;
    let child = braid_ops::harness::die_with_parent({
        let mut c = Command::new("nginx");
        c.args([
            "-c",
            &conf.display().to_string(),
            "-p",
            &root.path().display().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    })
    .spawn()
    .context("starting nginx (apt-get install nginx)")?;
    let _nginx = Proc::adopt("nginx", child);
    std::thread::sleep(Duration::from_millis(500));
    let nginx_url = format!("http://127.0.0.1:{port}/seg.ts");
    anyhow::ensure!(
        get(&nginx_url).is_some_and(|b| b == bytes),
        "nginx serves the segment's bytes"
    );

    let edge_url = format!("{base}/{uri}");
    let mut edge = Vec::new();
    let mut nginx = Vec::new();
    let idle_kib = rss_kib(net.edge.pid());
    let mut busy_kib: f64 = 0.0;
    for round in 0..args.rounds {
        let e = wrk(&edge_url, args.connections, args.seconds)?;
        busy_kib = busy_kib.max(rss_kib(net.edge.pid()));
        let n = wrk(&nginx_url, args.connections, args.seconds)?;
        eprintln!(
            "round {}: edge {:.0} segments/s ({:.2} Gbit/s), nginx {:.0} segments/s ({:.2} Gbit/s)",
            round + 1,
            e.0,
            e.1 * 8.0 / 1e9,
            n.0,
            n.1 * 8.0 / 1e9
        );
        edge.push(e);
        nginx.push(n);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let e_rps = median(&mut edge.iter().map(|x| x.0).collect());
    let n_rps = median(&mut nginx.iter().map(|x| x.0).collect());
    let e_bps = median(&mut edge.iter().map(|x| x.1 * 8.0).collect());
    let n_bps = median(&mut nginx.iter().map(|x| x.1 * 8.0).collect());
    println!(
        "segment of {} bytes, {} connections, {} s x {} rounds (medians):",
        bytes.len(),
        args.connections,
        args.seconds,
        args.rounds
    );
    println!("  edge : {e_rps:.0} segments/s, {:.2} Gbit/s", e_bps / 1e9);
    println!("  nginx: {n_rps:.0} segments/s, {:.2} Gbit/s", n_bps / 1e9);
    println!("  edge / nginx: {:.2}", e_rps / n_rps);
    println!(
        "  edge memory: {:.1} MiB idle, {:.1} MiB with {} HLS clients: {:.0} KiB per client",
        idle_kib / 1024.0,
        busy_kib / 1024.0,
        args.connections,
        (busy_kib - idle_kib).max(0.0) / args.connections as f64
    );
    Ok(())
}
