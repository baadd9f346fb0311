//! Packets per second one set reflector forwards to N edges, against a raw `sendmmsg` loop
//! of the same packets to the same N loopback sockets measured in the same run (this
//! machine's physical limit).
//!
//! `cargo build --release --bins && target/release/braid-bench-fanout --edges 1,10,50`
//!
//! For each N, one set of N receiving sockets (a thread each, counting datagrams) takes
//! first the baseline (this process sends each packet to all N in one `sendmmsg` call,
//! as the set reflector does for each packet it forwards), then Braid (the N sockets
//! subscribe; this process sends each packet once to the set reflector). Both run for
//! `--seconds`, and both rates are what the sockets received from the first send until
//! 300 ms after the last, over that same span.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use braid_core::wire::rtp::{Fields, PAYLOAD_TYPE_MP2T};
use braid_core::wire::{Body, Codec, Flags, Header, Key, Rtp};
use braid_core::{NodeId, PathId, SeqNo, StreamId};
use braid_ops::harness::{NETWORK_KEY, Proc};
use bytes::{Bytes, BytesMut};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Numbers of edges to try, comma-separated.
    #[arg(long, default_value = "1,10,50", value_delimiter = ',')]
    edges: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

struct Sinks {
    addrs: Vec<SocketAddr>,
    sockets: Vec<UdpSocket>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// A subscription to stream 1 with `cookie`.
fn subscribe(codec: &Codec, cookie: braid_core::wire::Cookie) -> Bytes {
    braid_ops::harness::subscribe(codec, 1, 10_000, cookie)
}

/// `n` sockets counting what they receive; each answers the set reflector's cookie
/// (at `set`) with a subscription carrying it, as an edge does.
fn sinks(n: usize, codec: &Codec, set: SocketAddr) -> anyhow::Result<Sinks> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut addrs = Vec::new();
    let mut sockets = Vec::new();
    let mut threads = Vec::new();
    for _ in 0..n {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        addrs.push(s.local_addr()?);
        sockets.push(s.try_clone()?);
        let (count, stop, codec) = (count.clone(), stop.clone(), codec.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                match s.recv(&mut buf) {
                    Ok(n) if n < 100 => {
                        if let Some(c) = braid_ops::harness::cookie_in(&buf[..n]) {
                            let _ = s.send_to(&subscribe(&codec, c), set);
                        }
                    }
                    Ok(_) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        }));
    }
    Ok(Sinks {
        addrs,
        sockets,
        count,
        stop,
        threads,
    })
}

impl Sinks {
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn media(codec: &Codec, i: u64) -> Bytes {
    let seq = SeqNo((1 << 20) + i);
    let rtp = Rtp::build(
        Fields {
            marker: false,
            payload_type: PAYLOAD_TYPE_MP2T,
            seq: seq.low(),
            timestamp: 0,
            ssrc: 1,
        },
        &[0x47; 1316],
    );
    let mut out = BytesMut::new();
    codec
        .encode_media(
            Header {
                stream: StreamId(1),
                path: PathId(0),
                flags: Flags::empty(),
            },
            seq,
            &rtp,
            &mut out,
        )
        .expect("valid media");
    out.freeze()
}

/// Sends packet `next(i)` for i = 0, 1, ... in sendmmsg batches to each of `to` for
/// `secs`; returns datagrams sent.
fn blast(src: &UdpSocket, to: &[SocketAddr], mut next: impl FnMut(u64) -> Bytes, secs: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut sent = 0u64;
    let mut i = 0;
    while Instant::now() < end {
        let p = next(i);
        i += 1;
        let msgs: Vec<(SocketAddr, &[u8])> = to.iter().map(|a| (*a, &p[..])).collect();
        sent += braid_net::sys::send_batch(src.as_raw_fd(), &msgs).unwrap_or(0) as u64;
    }
    sent
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let codec = Codec::new(Key::derive(NETWORK_KEY));
    let dir = tempfile::tempdir()?;
    let set = Proc::start(
        "set",
        "braid-reflector",
        &[
            "--role".into(),
            "set".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--stream".into(),
            "1".into(),
            "--max-per-stream".into(),
            "10000".into(),
        ],
        &dir.path().join("set.log"),
    );
    let set_addr = set.udp();
    let mut seq_base = 0u64;
    for &n in &args.edges {
        let edges = sinks(n, &codec, set_addr)?;
        let src = UdpSocket::bind("127.0.0.1:0")?;
        // What the sockets received from the start of `send` until 300 ms after it ends,
        // per second of that span; and what `send` returned.
        let measure = |send: &mut dyn FnMut() -> u64| -> (f64, u64) {
            let before = edges.count.load(Ordering::Relaxed);
            let t = Instant::now();
            let sent = send();
            std::thread::sleep(Duration::from_millis(300));
            let got = edges.count.load(Ordering::Relaxed) - before;
            (got as f64 / t.elapsed().as_secs_f64(), sent)
        };

        // Baseline: this process sends every packet to the N sockets with sendmmsg.
        let one = media(&codec, 0);
        let (base_rx, sent) =
            measure(&mut || blast(&src, &edges.addrs, |_| one.clone(), args.seconds));

        // Braid: the N sockets subscribe (and renew, as edges do: each renewal without a
        // cookie gets one, and the sink subscribes with it); the source sends each packet
        // once to the set reflector, which forwards it to all N.
        let subscribe = subscribe(&codec, [0; 16]);
        let renew = Arc::new(AtomicBool::new(false));
        let renewer = {
            let socks: Vec<UdpSocket> = edges
                .sockets
                .iter()
                .map(UdpSocket::try_clone)
                .collect::<Result<_, _>>()?;
            let (renew, subscribe) = (renew.clone(), subscribe.clone());
            std::thread::spawn(move || {
                while !renew.load(Ordering::Relaxed) {
                    for s in &socks {
                        let _ = s.send_to(&subscribe, set_addr);
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        // Every run continues the sequence, so no packet is a repeat of an earlier run's.
        let (braid_rx, offered) = measure(&mut || {
            blast(
                &src,
                &[set_addr],
                |i| media(&codec, seq_base + i),
                args.seconds,
            )
        });
        seq_base += offered + 1;
        renew.store(true, Ordering::Relaxed);
        let _ = renewer.join();
        let out = braid_ops::harness::message(&codec, Body::Unsubscribe { node: NodeId(1) });
        for s in &edges.sockets {
            s.send_to(&out, set_addr)?;
        }
        edges.finish();
        println!(
            "edges {n:>3}: braid forwards {:>9.0} packets/s ({:.0} in/s offered) | raw sendmmsg to the same sockets {:>9.0} packets/s ({} sent) | ratio {:.2}",
            braid_rx,
            offered as f64 / args.seconds as f64,
            base_rx,
            sent,
            braid_rx / base_rx
        );
    }
    drop(set);
    Ok(())
}
