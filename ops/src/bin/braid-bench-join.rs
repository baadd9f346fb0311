//! Join time: from a client's start to its first byte written, on a cold edge (no stream
//! yet: it subscribes upstream) and on a warm one (already serving the stream), with
//! 2 s groups of pictures. Real processes on 127.0.0.1, the client's own figures
//! (`first_output_ms` of its stats: from its first watch to its first write).
//!
//! `cargo build --release --bins && target/release/braid-bench-join --joins 20`
//!
//! A cold join is a viewer alone on the edge: the next starts once the edge has left the
//! stream (its linger, 300 ms here, and a margin). A warm join is a viewer arriving while
//! another watches.

use std::time::Duration;

use braid_ops::harness::{Net, Proc, Spec, metrics, wait_all};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Joins of each kind.
    #[arg(long, default_value_t = 20)]
    joins: usize,
    /// Frames per group of pictures (25 frames a second).
    #[arg(long, default_value_t = 50)]
    gop: u32,
}

fn viewer(net: &Net, name: &str, seconds: f64) -> Proc {
    let args: Vec<String> = [
        "--edge".to_string(),
        net.edge.udp().to_string(),
        "--duration".into(),
        seconds.to_string(),
        "--out".into(),
        "/dev/null".into(),
        "--stats-json".into(),
        net.path(&format!("{name}.json")).display().to_string(),
    ]
    .into();
    Proc::spawn(
        name,
        "braid-client",
        &args,
        &net.path(&format!("{name}.log")),
    )
}

fn first_output_ms(net: &Net, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(net.path(&format!("{name}.json"))).ok()?;
    let last: serde_json::Value = serde_json::from_str(text.lines().last()?).ok()?;
    last["first_output_ms"].as_u64()
}

/// Pause number `i` beyond the base, ms: spread evenly over a group of pictures (in an
/// order that does not follow it).
fn spread(i: usize, gop: u32) -> u64 {
    let gop_ms = u64::from(gop) * 40;
    (i as u64 * 733) % gop_ms
}

fn summary(what: &str, mut v: Vec<u64>) {
    v.sort_unstable();
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "{what}: {} joins, first byte written p50 {} ms, p90 {} ms, max {} ms",
        v.len(),
        q(0.5),
        q(0.9),
        v[v.len() - 1]
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seconds = args.joins as f64 * (4.5 + f64::from(args.gop) * 0.08) + 15.0;
    let net = Net::start(Spec {
        seconds,
        viewers: 0,
        gop: args.gop,
        linger_ms: 300,
        ..Spec::default()
    });
    std::thread::sleep(Duration::from_secs(3));
    let tee = net.path("tee.ts");
    let mut cold = Vec::new();
    for i in 0..args.joins {
        let name = format!("cold{i}");
        let mut v = viewer(&net, &name, 1.0);
        wait_all([&mut v], &tee, Duration::from_secs(10));
        cold.extend(first_output_ms(&net, &name));
        // The edge leaves the stream after its linger; the next join finds it cold.
        // A varying pause lands joins all over the group of pictures.
        std::thread::sleep(Duration::from_millis(700 + spread(i, args.gop)));
    }
    let mut anchor = viewer(&net, "anchor", args.joins as f64 * 3.5 + 5.0);
    std::thread::sleep(Duration::from_secs(2));
    let mut warm = Vec::new();
    for i in 0..args.joins {
        let name = format!("warm{i}");
        let mut v = viewer(&net, &name, 1.0);
        wait_all([&mut v], &tee, Duration::from_secs(10));
        warm.extend(first_output_ms(&net, &name));
        std::thread::sleep(Duration::from_millis(100 + spread(i, args.gop)));
    }
    anchor.kill();
    let prebursts: f64 = net
        .sets
        .iter()
        .map(|s| metrics::sum(s.metrics(), "braid_prebursts_total", &[]))
        .sum();
    summary("cold edge", cold);
    summary("warm edge", warm);
    println!("set reflectors' prebursts: {prebursts} (one per cold join and set reflector)");
    Ok(())
}
