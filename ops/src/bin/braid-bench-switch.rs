//! Switch gap: from SIGKILL of a viewer's edge to the first packet from its new edge, over
//! many viewers, with the packets lost. One control server, one edge per set.
//!
//! `cargo build --release --bins && target/release/braid-bench-switch --rounds 10 --stall-ms 500`
//!
//! Each round starts 10 viewers, lets them settle, kills the even edge, waits for its
//! viewers to move, and starts the edge again. The gap has two parts, both reported: the
//! detection (the stall threshold: nothing for `--stall-ms`) and the resume (switch
//! request, new watch, first packet).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use braid_core::token::{Claims, Signer};
use braid_core::{ClientId, StreamId};
use braid_ops::harness::ControlNet;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    #[arg(long, default_value_t = 500)]
    stall_ms: u64,
}

const SECRET: &str = "bench token secret";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seconds = args.rounds as f64 * 12.0 + 20.0;
    let mut net = ControlNet::start(1, 1, seconds, SECRET, |_| vec![]);
    std::thread::sleep(Duration::from_secs(3));
    let signer = Signer::new(SECRET);
    let mut gaps = Vec::new();
    let mut resumes = Vec::new();
    let mut lost = 0u64;
    let mut moved = 0usize;
    let mut id = 0u64;
    for round in 0..args.rounds {
        let even = net.edges[0].udp().to_string();
        let viewers: Vec<_> = (0..10)
            .map(|_| {
                id += 1;
                let token = signer.sign(&Claims {
                    stream: StreamId(1),
                    client: ClientId(id),
                    expires: u64::MAX,
                });
                let name = format!("r{round}v{id}");
                let v = net.viewer(
                    &name,
                    id,
                    9.0,
                    &[
                        "--token".into(),
                        token,
                        "--stall-ms".into(),
                        args.stall_ms.to_string(),
                    ],
                );
                (name, v)
            })
            .collect();
        std::thread::sleep(Duration::from_secs(4));
        let killed_at = unix_ms();
        net.edges[0].kill();
        for (_, mut v) in viewers {
            v.wait(Duration::from_secs(15));
        }
        for j in (id - 9)..=id {
            let st = net.stats(&format!("r{round}v{j}"));
            let Some(sw) = st["switches"].as_array().and_then(|s| s.first()).cloned() else {
                continue;
            };
            if sw["from"] != even.as_str() {
                continue;
            }
            moved += 1;
            if let Some(first) = sw["first_packet_unix_ms"].as_u64() {
                gaps.push(first.saturating_sub(killed_at) as f64);
            }
            if let Some(r) = sw["detect_to_first_packet_ms"].as_u64() {
                resumes.push(r as f64);
            }
            lost += st["gaps"].as_u64().unwrap_or(0);
        }
        net.restart_edge(0);
        std::thread::sleep(Duration::from_secs(2));
    }
    gaps.sort_by(f64::total_cmp);
    resumes.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| {
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "stall {} ms: {} switches over {} rounds | kill to first packet from the new edge p50 {:.0} ms p99 {:.0} ms | of which resume (detection to first packet) p50 {:.0} ms p99 {:.0} ms | packets lost by the moved viewers: {lost}",
        args.stall_ms,
        moved,
        args.rounds,
        pct(&gaps, 0.5),
        pct(&gaps, 0.99),
        pct(&resumes, 0.5),
        pct(&resumes, 0.99)
    );
    Ok(())
}
