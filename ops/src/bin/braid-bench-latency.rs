//! Added latency from source to viewer through a whole Braid network, against a direct
//! loopback hop measured in the same run.
//!
//! `cargo build --release --bins && target/release/braid-bench-latency --seconds 20 --loss 0.1`
//!
//! The benchmark is its own source: it publishes to both entry points and sends numbered
//! packets at the rate of a 4 Mbps stream, noting when each left; it is also a viewer of
//! the edge, noting when each arrived. Each packet is also sent straight to a local socket,
//! stamped just before that send as the measured packet is just before its own: the
//! baseline (the cost of one loopback hop and this process's scheduling).

use braid_ops::bench::{Latency, latency, percentile};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Seconds of stream.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Loss on every link (entry -> set, set -> edge).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Loss on entry -> set links only, overriding --loss there.
    #[arg(long)]
    entry_loss: Option<f64>,
    /// Loss on the edge's links to the set reflectors (its NACKs and subscriptions).
    #[arg(long, default_value_t = 0.0)]
    edge_loss: f64,
    /// Set reflectors (paths to the edge).
    #[arg(long, default_value_t = 3)]
    sets: usize,
    /// Entry points.
    #[arg(long, default_value_t = 2)]
    entries: usize,
    /// Packets per second (380: 4 Mbps of 1316-byte payloads).
    #[arg(long, default_value_t = 380)]
    rate: u64,
    /// Reorder window on sets and edge, ms.
    #[arg(long, default_value_t = 200)]
    window_ms: u64,
    /// Transports of the entry → set → edge hops to measure, one network each, in turn:
    /// `udp`, `quic` (both hops of every path on QUIC).
    #[arg(long, default_value = "udp,quic", value_delimiter = ',')]
    transports: Vec<String>,
    /// QUIC congestion controller of the nodes (`cubic` or `bbr`).
    #[arg(long, default_value = "cubic")]
    quic_congestion: String,
    /// A case of the robustness issue's acceptance 4 instead of `--loss` on the set
    /// reflectors' paths (three of them): `skew` (one 300 ms behind, no loss; the others
    /// 15% loss), `skew-lossy` (the late one 15% loss too), `outages` (300 ms outages
    /// every 2 s on two paths at the same moments, 10% loss on the third).
    #[arg(long)]
    case: Option<String>,
}

/// The set reflectors' impairments of an acceptance case.
fn case(name: &str, seconds: u64) -> anyhow::Result<Vec<String>> {
    let lossy = |p: f64, seed: u64| format!("loss = {p}\nseed = {seed}");
    Ok(match name {
        "skew" => vec!["delay_ms = 300".into(), lossy(0.15, 11), lossy(0.15, 12)],
        "skew-lossy" => vec![
            format!("delay_ms = 300\n{}", lossy(0.15, 10)),
            lossy(0.15, 11),
            lossy(0.15, 12),
        ],
        "outages" => {
            let outages: Vec<String> = (0..seconds / 2 + 2)
                .map(|k| format!("{{ start_ms = {}, duration_ms = 300 }}", 3000 + 2000 * k))
                .collect();
            let outage = format!("outages = [{}]", outages.join(", "));
            vec![outage.clone(), outage, lossy(0.10, 13)]
        }
        other => anyhow::bail!("unknown case {other:?}: skew, skew-lossy or outages"),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for t in &args.transports {
        let quic = match t.as_str() {
            "udp" => false,
            "quic" => true,
            other => anyhow::bail!("unknown transport {other:?}: udp or quic"),
        };
        let m = latency(&Latency {
            seconds: args.seconds,
            rate: args.rate,
            sets: args.sets,
            entries: args.entries,
            window_ms: args.window_ms,
            loss: args.loss,
            entry_loss: args.entry_loss.unwrap_or(args.loss),
            edge_loss: args.edge_loss,
            quic,
            quic_congestion: args.quic_congestion.clone(),
            set_impair: match &args.case {
                Some(c) => case(c, args.seconds)?,
                None => Vec::new(),
            },
        })?;
        let (b50, b99) = (percentile(&m.braid, 0.5), percentile(&m.braid, 0.99));
        let (l50, l99) = (percentile(&m.baseline, 0.5), percentile(&m.baseline, 0.99));
        if let Some(c) = &args.case {
            println!("case {c}: {:?}", case(c, args.seconds)?);
        }
        println!(
            "{}: {} sets, {} entries, loss per link {:.0}%: braid p50 {b50:.3} ms p99 {b99:.3} ms | baseline loopback p50 {l50:.3} ms p99 {l99:.3} ms | added p50 {:.3} ms p99 {:.3} ms | braid/baseline p50 {:.1} | delivered {:.4}%",
            if quic {
                format!("QUIC hops ({})", args.quic_congestion)
            } else {
                "UDP hops".to_string()
            },
            args.sets,
            args.entries,
            args.loss * 100.0,
            b50 - l50,
            b99 - l99,
            b50 / l50,
            m.delivered() * 100.0
        );
        println!(
            "baseline stamped with the measured packet, before its sends to the entry points (as before): p50 {:.3} ms p99 {:.3} ms",
            percentile(&m.baseline_shared_stamp, 0.5),
            percentile(&m.baseline_shared_stamp, 0.99)
        );
        println!(
            "edge asked for {:.0} packets; set reflectors retransmitted {:.0}, entry points {:.0}; the edge's impairment dropped {:.0} of its datagrams to the set reflectors",
            m.asked, m.sets_retransmitted, m.entries_retransmitted, m.edge_impaired
        );
    }
    Ok(())
}
