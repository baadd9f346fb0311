//! Edge fan-out to viewers: how many 4 Mbps viewers one edge serves with zero loss, the
//! packets per second that is, CPU per Gbps delivered, memory per viewer, and join time;
//! against a raw `sendmmsg` loop of the same packet rate to as many sockets, measured in
//! the same run: what it delivered, and its CPU per Gbps, of which the edge's is printed
//! as a ratio (the figure that matters on a shared, noisy machine). Each `--workers` count
//! is a fresh edge measured at every viewer count.
//!
//! `cargo build --release --bins && target/release/braid-bench-viewers --viewers 100,200,400`
//!
//! Viewers are in this process, speaking the watch protocol (they compete with the edge
//! for the machine's two cores, as the baseline's receivers do). By default both rigs'
//! receivers poll non-blocking sockets from a few threads (`--receiver-threads`): on
//! loopback a sender pays for waking a receiver asleep in `recv`, which no real network
//! makes it pay, and which was more than half of the bare loop's CPU with a thread per
//! socket (`--receiver-threads 0`, the old rig). What is delivered
//! is what they counted: the media datagrams (Braid messages, as they came off the
//! wire) all viewers received over the measured interval; CPU per Gbps divides the edge's
//! CPU by that.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use braid_ops::harness::{Net, Spec, crowd, rss_kib};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Viewer counts to try, comma-separated.
    #[arg(long, default_value = "100,200,400", value_delimiter = ',')]
    viewers: Vec<usize>,
    /// Seconds measured per count.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Viewer transports measured at each count, in turn: `udp`, `quic`.
    #[arg(long, default_value = "udp,quic", value_delimiter = ',')]
    transports: Vec<String>,
    /// The raw baseline sends this many packets to each socket per `sendmmsg` call, at
    /// the same rate (every this many packet intervals): with more than one, a receiving
    /// thread drains several per wakeup.
    #[arg(long, default_value_t = 1)]
    raw_batch: usize,
    /// The edge's send workers (`--workers`), comma-separated: each is a fresh edge
    /// measured at every count, in turn.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    workers: Vec<usize>,
    /// The edge's threads for its other tasks (`--task-threads`: TCP viewers), comma-separated:
    /// each is a fresh edge for every `--workers` count.
    #[arg(long, default_value = "0", value_delimiter = ',')]
    task_threads: Vec<usize>,
    /// Threads the rig's receivers poll on (the edge's viewers, and the raw loop's
    /// sockets); 0: a thread per receiver sleeping in `recv`, which on loopback each
    /// send pays to wake.
    #[arg(long, default_value_t = 4)]
    receiver_threads: usize,
}

/// How the rig's receivers (the edge's viewers and the raw loop's sockets) wait.
#[derive(Debug, Clone, Copy)]
enum Receivers {
    /// This many threads poll non-blocking sockets every millisecond: no send wakes a
    /// receiver, so each sender's CPU is its sending.
    Polling(usize),
    /// A thread per socket sleeps in `recv`: on loopback each send pays for waking it.
    Blocking,
}

/// What the raw baseline did.
struct Raw {
    /// The share of packets the receivers got.
    delivered: f64,
    /// Its sending thread's CPU, in cores.
    cpu: f64,
    /// What the receivers got, Gbit/s.
    gbps: f64,
}

/// CPU time of the calling thread, seconds.
#[allow(unsafe_code)]
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The raw baseline: one packet every `gap` to each of `n` sockets with sendmmsg, for
/// `secs`, timed: the CPU of the one thread that sends (the edge's figure is its whole
/// process's; both share the machine with their receivers).
fn raw_baseline(
    n: usize,
    pps_per_viewer: u64,
    secs: u64,
    batch: usize,
    receivers: Receivers,
) -> Raw {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut threads = Vec::new();
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
            addrs.push(s.local_addr().expect("addr"));
            s
        })
        .collect();
    match receivers {
        // As the edge's viewers do (`Crowd::start_polling`): a few threads look at
        // non-blocking sockets every millisecond, and no send wakes anyone.
        Receivers::Polling(k) => {
            let per = n.div_ceil(k.max(1)).max(1);
            let mut sockets = sockets.into_iter().peekable();
            while sockets.peek().is_some() {
                let mine: Vec<UdpSocket> = sockets.by_ref().take(per).collect();
                let (count, stop) = (count.clone(), stop.clone());
                threads.push(std::thread::spawn(move || {
                    for s in &mine {
                        s.set_nonblocking(true).expect("non-blocking");
                    }
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        for s in &mine {
                            while s.recv(&mut buf).is_ok() {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }));
            }
        }
        Receivers::Blocking => {
            for s in sockets {
                s.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                let (count, stop) = (count.clone(), stop.clone());
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if s.recv(&mut buf).is_ok() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
    }
    let src = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let packet = vec![0x47u8; 1356];
    let gap = Duration::from_nanos(1_000_000_000 / pps_per_viewer);
    let batch = batch.max(1);
    let msgs: Vec<(SocketAddr, &[u8])> = (0..batch)
        .flat_map(|_| addrs.iter().map(|a| (*a, &packet[..])))
        .collect();
    let start = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let total = secs * pps_per_viewer / batch as u64 * batch as u64;
    for i in (0..total).step_by(batch) {
        let due = start + gap * (i + batch as u64 - 1) as u32;
        while Instant::now() < due {
            std::thread::sleep(
                due.saturating_duration_since(Instant::now())
                    .min(Duration::from_micros(500)),
            );
        }
        let _ = braid_net::sys::send_batch(src.as_raw_fd(), &msgs);
    }
    let cpu = thread_cpu_seconds() - cpu0;
    let wall = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let got = count.load(Ordering::Relaxed);
    Raw {
        delivered: got as f64 / (total * n as u64) as f64,
        cpu: cpu / wall,
        gbps: (got * packet.len() as u64) as f64 * 8.0 / wall / 1e9,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for &workers in &args.workers {
        for &threads in &args.task_threads {
            run(&args, workers, threads)?;
        }
    }
    Ok(())
}

/// Every measure of one edge with `workers` send workers and `threads` task threads.
fn run(args: &Args, workers: usize, threads: usize) -> anyhow::Result<()> {
    let receivers = match args.receiver_threads {
        0 => Receivers::Blocking,
        k => Receivers::Polling(k),
    };
    // The join phase takes about 21 s, then each count its warm-up, measurement and pause.
    let longest =
        (args.viewers.len() * args.transports.len()) as f64 * (args.seconds as f64 + 12.0) + 40.0;
    println!(
        "edge with {workers} send worker(s), {threads} task thread(s); receivers: {receivers:?}"
    );
    let net = Net::start(Spec {
        viewers: 0,
        seconds: longest,
        quic_viewers: true,
        // Every viewer of this rig comes from 127.0.0.1.
        edge_args: vec![
            "--quic-max-conns-per-ip".into(),
            "5000".into(),
            "--workers".into(),
            workers.to_string(),
            "--task-threads".into(),
            threads.to_string(),
        ],
        ..Spec::default()
    });
    let edge = net.edge.udp();
    let edge_quic = net.edge.quic();
    let ca = net.path("certs/ca.pem");
    let pid = net.edge.pid();
    std::thread::sleep(Duration::from_secs(3));
    let pps = 4_000_000 / (1316 * 8) as u64; // packets per second of one 4 Mbps viewer

    // Join time on a warm edge: one viewer at a time, 50 times.
    let warm = crowd::Crowd::start(edge, 1);
    std::thread::sleep(Duration::from_secs(2));
    let mut joins = Vec::new();
    for _ in 0..50 {
        let one = crowd::Crowd::start(edge, 1);
        std::thread::sleep(Duration::from_millis(300));
        if let Some(j) = one.finish().first().and_then(|s| s.join) {
            joins.push(j.as_secs_f64() * 1000.0);
        }
    }
    drop(warm.finish());
    joins.sort_by(f64::total_cmp);
    println!(
        "join on a warm edge, 50 viewers one at a time: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} joined)",
        joins.get(joins.len() / 2).copied().unwrap_or(f64::NAN),
        joins
            .get((joins.len().max(1) - 1) * 99 / 100)
            .copied()
            .unwrap_or(f64::NAN),
        joins.last().copied().unwrap_or(f64::NAN),
        joins.len()
    );
    std::thread::sleep(Duration::from_secs(4));
    for (&n, transport) in args
        .viewers
        .iter()
        .flat_map(|n| args.transports.iter().map(move |t| (n, t)))
    {
        let rss_before = rss_kib(pid);
        let c = match transport.as_str() {
            "udp" => match receivers {
                Receivers::Polling(k) => crowd::Crowd::start_polling(edge, n, k),
                Receivers::Blocking => crowd::Crowd::start(edge, n),
            },
            "quic" => crowd::Crowd::start_quic(edge_quic, n, ca.clone()),
            other => anyhow::bail!("unknown transport {other:?}: udp or quic"),
        };
        // Let everyone join and catch up, then measure.
        std::thread::sleep(Duration::from_secs(3));
        let cpu0 = braid_net::daemon::cpu_seconds(pid);
        let (p0, b0) = c.received();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(args.seconds));
        let (p1, b1) = c.received();
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = (braid_net::daemon::cpu_seconds(pid) - cpu0) / elapsed;
        let delivered_pps = (p1 - p0) as f64 / elapsed;
        let gbps = (b1 - b0) as f64 * 8.0 / elapsed / 1e9;
        let rss_with = rss_kib(pid);
        let seen = c.finish();
        // Lossless: nothing missing, and at least 95% of what the stream carried while it
        // watched (a viewer the machine starved of CPU lets its lease lapse).
        let expected = pps as f64 * (args.seconds as f64 + 3.0);
        let lossless = seen
            .iter()
            .filter(|s| s.missing() == 0 && s.seqs.len() as f64 >= 0.95 * expected)
            .count();
        let missing: u64 = seen.iter().map(|s| s.missing()).sum();
        let packets: usize = seen.iter().map(|s| s.seqs.len()).sum();
        let mut joins: Vec<f64> = seen
            .iter()
            .filter_map(|s| s.join)
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        joins.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            joins
                .get(((joins.len().max(1) - 1) as f64 * p) as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        let base = raw_baseline(n, pps, args.seconds.min(5), args.raw_batch, receivers);
        println!(
            "workers {workers} threads {threads} {transport:>4} viewers {n:>4}: lossless {lossless}/{n} (missing {missing} of {packets}) | edge CPU {:.1}% of a core, {:.1}% per Gbps delivered | delivered {delivered_pps:.0} packets/s, {gbps:.3} Gbps, measured ({:.0} packets/s nominal, {:.1}%) | RSS +{:.0} KiB ({:.1} MiB per 1000 viewers) | join when all join at once p50 {:.1} ms p99 {:.1} ms | raw sendmmsg at the same rate delivered {:.3}%, CPU {:.1}% of a core, {:.1}% per Gbps: edge/raw {:.2}x",
            cpu * 100.0,
            cpu * 100.0 / gbps,
            n as f64 * pps as f64,
            delivered_pps / (n as f64 * pps as f64) * 100.0,
            rss_with - rss_before,
            (rss_with - rss_before) / 1024.0 / n as f64 * 1000.0,
            pct(0.5),
            pct(0.99),
            base.delivered * 100.0,
            base.cpu * 100.0,
            base.cpu * 100.0 / base.gbps,
            (cpu / gbps) / (base.cpu / base.gbps)
        );
        std::thread::sleep(Duration::from_secs(4));
    }
    Ok(())
}
