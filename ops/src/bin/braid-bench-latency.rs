//! Added latency from source to viewer through a whole Braid network, against a direct
//! loopback hop measured in the same run.
//!
//! `cargo build --release --bins && target/release/braid-bench-latency --seconds 20 --loss 0.1`
//!
//! The benchmark is its own source: it publishes to both entry points and sends numbered
//! packets at the rate of a 4 Mbps stream, noting when each left; it is also a viewer of
//! the edge, noting when each arrived. Each packet is also sent straight to a local socket,
//! which gives the baseline (the cost of one loopback hop and this process's scheduling).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use braid_core::wire::rtp::{Fields, PAYLOAD_TYPE_MP2T};
use braid_core::wire::{Body, Codec, Flags, Header, Key, Message, Rtp, WatchStart};
use braid_core::{PathId, SeqNo, StreamId};
use braid_ops::harness::crowd::watch;
use braid_ops::harness::{NETWORK_KEY, Net, STREAM_KEY, Spec};
use bytes::{Bytes, BytesMut};
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
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Records when each numbered packet arrived; as the edge's viewer (`codec` and `edge`
/// given) it acknowledges every 16 packets.
fn receiver(
    sock: UdpSocket,
    codec: Option<Codec>,
    edge: Option<SocketAddr>,
    n: usize,
    first: u64,
    stop: Arc<AtomicBool>,
) -> Vec<Option<Instant>> {
    let mut acked = 0u64;
    let mut since = 0;
    let mut got = vec![None; n];
    let mut buf = [0u8; 2048];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    while !stop.load(Ordering::Relaxed) {
        let Ok(len) = sock.recv(&mut buf) else {
            continue;
        };
        let now = Instant::now();
        let seq = match &codec {
            Some(c) => match c.decode(Bytes::copy_from_slice(&buf[..len])) {
                Ok(Message {
                    body: Body::Media(m),
                    ..
                }) => {
                    acked = acked.max(m.seq.0);
                    since += 1;
                    if let (Some(edge), true) = (edge, since >= 16) {
                        since = 0;
                        let _ = sock.send_to(&watch(c, 9, acked, WatchStart::Live), edge);
                    }
                    m.seq.0
                }
                _ => continue,
            },
            None if len >= 8 => u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")),
            None => continue,
        };
        if let Some(slot) = seq.checked_sub(first).and_then(|i| got.get_mut(i as usize)) {
            slot.get_or_insert(now);
        }
    }
    got
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for t in &args.transports {
        match t.as_str() {
            "udp" => run(&args, false)?,
            "quic" => run(&args, true)?,
            other => anyhow::bail!("unknown transport {other:?}: udp or quic"),
        }
    }
    Ok(())
}

fn run(args: &Args, quic: bool) -> anyhow::Result<()> {
    let impair = format!("loss = {}\nseed = 11", args.loss);
    let entry_impair = format!("loss = {}\nseed = 12", args.entry_loss.unwrap_or(args.loss));
    let net = Net::start(Spec {
        viewers: 0,
        capture: false,
        sets: args.sets,
        entries: args.entries,
        window_ms: args.window_ms,
        entry_impair,
        set_impair: vec![impair; args.sets],
        quic_sets: vec![quic; args.sets],
        node_args: vec!["--quic-congestion".into(), args.quic_congestion.clone()],
        ..Spec::default()
    });
    let codec = Codec::new(Key::derive(NETWORK_KEY));
    let entries: Vec<SocketAddr> = net.entries.iter().map(|e| e.udp()).collect();
    let edge = net.edge.udp();
    let n = (args.seconds * args.rate) as usize;
    let first = 1u64 << 20;
    let stop = Arc::new(AtomicBool::new(false));

    let viewer = UdpSocket::bind("127.0.0.1:0")?;
    let base_rx = UdpSocket::bind("127.0.0.1:0")?;
    let base_addr = base_rx.local_addr()?;
    let viewer_tx = viewer.try_clone()?;
    let (s1, s2) = (stop.clone(), stop.clone());
    let c2 = codec.clone();
    let v = std::thread::spawn(move || receiver(viewer, Some(c2), Some(edge), n, first, s1));
    let b = std::thread::spawn(move || receiver(base_rx, None, None, n, first, s2));

    let src = UdpSocket::bind("127.0.0.1:0")?;
    let publish = {
        let mut out = BytesMut::new();
        codec.encode(
            &Message {
                header: Header {
                    stream: StreamId(1),
                    ..Header::default()
                },
                body: Body::Publish {
                    key: Bytes::from_static(STREAM_KEY.as_bytes()),
                },
            },
            &mut out,
        )?;
        out.freeze()
    };
    for e in &entries {
        src.send_to(&publish, e)?;
    }
    viewer_tx.send_to(&watch(&codec, 9, 0, WatchStart::Live), edge)?;
    std::thread::sleep(Duration::from_millis(500));

    let mut sent = vec![None; n];
    let start = Instant::now();
    let gap = Duration::from_nanos(1_000_000_000 / args.rate);
    let mut last_ctrl = start;
    let mut out = BytesMut::new();
    for (i, slot) in sent.iter_mut().enumerate() {
        let due = start + gap * i as u32;
        while Instant::now() < due {
            std::thread::sleep(
                due.saturating_duration_since(Instant::now())
                    .min(Duration::from_micros(500)),
            );
        }
        let seq = SeqNo(first + i as u64);
        let mut payload = vec![0x47u8; 1316];
        payload[..8].copy_from_slice(&seq.0.to_be_bytes());
        let rtp = Rtp::build(
            Fields {
                marker: false,
                payload_type: PAYLOAD_TYPE_MP2T,
                seq: seq.low(),
                timestamp: i as u32,
                ssrc: 1,
            },
            &payload,
        );
        out.clear();
        let flags = Flags::empty().with(Flags::KEYFRAME, i % 50 == 0);
        codec.encode_media(
            Header {
                stream: StreamId(1),
                path: PathId(0),
                flags,
            },
            seq,
            &rtp,
            &mut out,
        )?;
        let now = Instant::now();
        *slot = Some(now);
        for e in &entries {
            src.send_to(&out, e)?;
        }
        src.send_to(&payload, base_addr)?;
        if now.duration_since(last_ctrl) > Duration::from_secs(1) {
            last_ctrl = now;
            for e in &entries {
                src.send_to(&publish, e)?;
            }
            // Renews the lease (acknowledging nothing new).
            viewer_tx.send_to(&watch(&codec, 9, 0, WatchStart::Live), edge)?;
        }
    }
    std::thread::sleep(Duration::from_millis(args.window_ms + 500));
    stop.store(true, Ordering::Relaxed);
    let got = v.join().expect("viewer thread");
    let base = b.join().expect("baseline thread");

    // Skip the first second: the edge's merge holds its first packet one window.
    let skip = args.rate as usize;
    let lat = |rx: &[Option<Instant>]| {
        let mut v: Vec<f64> = sent[skip..]
            .iter()
            .zip(&rx[skip..])
            .filter_map(|(s, r)| {
                Some((r.as_ref()?.duration_since(*s.as_ref()?)).as_secs_f64() * 1000.0)
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let braid = lat(&got);
    let baseline = lat(&base);
    let delivered = got[skip..].iter().filter(|r| r.is_some()).count() as f64 / (n - skip) as f64;
    println!(
        "{}: {} sets, {} entries, loss per link {:.0}%: braid p50 {:.3} ms p99 {:.3} ms | baseline loopback p50 {:.3} ms p99 {:.3} ms | added p50 {:.3} ms p99 {:.3} ms | delivered {:.4}%",
        if quic {
            format!("QUIC hops ({})", args.quic_congestion)
        } else {
            "UDP hops".to_string()
        },
        args.sets,
        args.entries,
        args.loss * 100.0,
        percentile(&braid, 0.5),
        percentile(&braid, 0.99),
        percentile(&baseline, 0.5),
        percentile(&baseline, 0.99),
        percentile(&braid, 0.5) - percentile(&baseline, 0.5),
        percentile(&braid, 0.99) - percentile(&baseline, 0.99),
        delivered * 100.0
    );
    let edge = net.edge.metrics();
    let asked = braid_ops::harness::metrics::sum(edge, "braid_merge_nacked_total", &[]);
    let sets_retrans = net
        .sets
        .iter()
        .map(|s| braid_ops::harness::metrics::sum(s.metrics(), "braid_retransmit_sent_total", &[]))
        .sum::<f64>();
    let entry_retrans = net
        .entries
        .iter()
        .map(|s| braid_ops::harness::metrics::sum(s.metrics(), "braid_retransmit_sent_total", &[]))
        .sum::<f64>();
    println!(
        "edge asked for {:.0} packets; set reflectors retransmitted {:.0}, entry points {:.0}",
        asked + 0.0,
        sets_retrans + 0.0,
        entry_retrans + 0.0
    );
    drop(net);
    Ok(())
}
