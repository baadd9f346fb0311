//! Two paths with loss, through rist-tools (ristsender/ristreceiver, two paths with
//! weight=0, i.e. every packet on both) and through Braid (1 entry point → 2 set
//! reflectors → edge), in one invocation, with the same impairment on both sides.
//!
//! `cargo build --release --bins && target/release/braid-bench-rist --seconds 20 --loss 0.1`
//!
//! RIST: a 4 Mbps stream of numbered 1316-byte datagrams goes into ristsender as UDP;
//! each of its two paths runs through `braid-impair-proxy`, which drops `--loss` of the
//! datagrams each way (media and retransmissions one way, RTCP and NACKs the other);
//! ristreceiver's UDP output is timed against the send times. Retransmissions are read
//! from ristsender's stats. Braid: the same stream into the entry point; each set
//! reflector's link to the edge loses `--loss` (media and retransmissions), and so does
//! each of the edge's links to the set reflectors (its NACKs and subscriptions); the
//! entry point's links are clean, as RIST has no such hop. Each side's source also sends
//! every packet over one loopback hop, stamped the same way: its baseline.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use braid_ops::bench::{Latency, latency, one_way_ms, pace, percentile, receive};
use braid_ops::harness::bin;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Loss each way on each path.
    #[arg(long, default_value_t = 0.1)]
    loss: f64,
    /// Packets per second.
    #[arg(long, default_value_t = 380)]
    rate: u64,
    /// RIST recovery buffer, and Braid's reorder window, ms.
    #[arg(long, default_value_t = 200)]
    buffer_ms: u64,
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    // An even port, with the next one free too (RIST's simple profile uses a pair).
    loop {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let p = s.local_addr().expect("addr").port();
        if p % 2 == 0 && UdpSocket::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

/// What one side measured.
struct Side {
    /// One-way times, ms, sorted.
    lat: Vec<f64>,
    /// The loopback baseline's, ms, sorted.
    base: Vec<f64>,
    /// Packets counted (after the first second).
    counted: usize,
    /// Retransmissions sent.
    retransmitted: f64,
}

impl Side {
    fn print(&self, name: &str, extra: &str) {
        let lost = self.counted - self.lat.len();
        println!(
            "{name:>5}: delivered {:.4}% ({lost} of {} lost) | retransmitted {:.0}{extra} | p50 {:.3} ms p99 {:.3} ms | loopback baseline p50 {:.3} ms p99 {:.3} ms | p50 / baseline p50 {:.1}",
            self.lat.len() as f64 / self.counted as f64 * 100.0,
            self.counted,
            self.retransmitted,
            percentile(&self.lat, 0.5),
            percentile(&self.lat, 0.99),
            percentile(&self.base, 0.5),
            percentile(&self.base, 0.99),
            percentile(&self.lat, 0.5) / percentile(&self.base, 0.5),
        );
    }
}

fn rist(args: &Args) -> anyhow::Result<Side> {
    let out_sock = UdpSocket::bind("127.0.0.1:0")?;
    let out_port = out_sock.local_addr()?.port();
    let in_port = free_port();
    let (r1, r2) = (free_port(), free_port());
    let (p1, p2) = (free_port(), free_port());
    let proxy = |listen: u16, to: u16, seed: u64| -> anyhow::Result<Kill> {
        Ok(Kill(
            Command::new(bin("braid-impair-proxy"))
                .args([
                    "--listen",
                    &format!("127.0.0.1:{listen}"),
                    "--to",
                    &format!("127.0.0.1:{to}"),
                ])
                .args([
                    "--loss",
                    &args.loss.to_string(),
                    "--seed",
                    &seed.to_string(),
                ])
                .spawn()?,
        ))
    };
    let _proxies = [proxy(p1, r1, 1)?, proxy(p2, r2, 2)?];
    let buffer = args.buffer_ms.to_string();
    let _receiver = Kill(
        Command::new("ristreceiver")
            .args([
                "-i",
                &format!("rist://@127.0.0.1:{r1},rist://@127.0.0.1:{r2}"),
            ])
            .args([
                "-o",
                &format!("udp://127.0.0.1:{out_port}"),
                "-b",
                &buffer,
                "-S",
                "0",
                "-v",
                "3",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut sender = Kill(
        Command::new("ristsender")
            .args(["-i", &format!("udp://127.0.0.1:{in_port}")])
            .args([
                "-o",
                &format!("rist://127.0.0.1:{p1}?weight=0,rist://127.0.0.1:{p2}?weight=0"),
                "-b",
                &buffer,
                "-S",
                "1000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let stats = sender.0.stderr.take().expect("piped");
    let retransmitted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let r2c = retransmitted.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stats).lines().map_while(Result::ok) {
            if line.contains("retransmitted") {
                r2c.lock().expect("not poisoned").push(line);
            }
        }
    });
    std::thread::sleep(Duration::from_secs(2));

    let n = (args.seconds * args.rate) as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let base_rx = UdpSocket::bind("127.0.0.1:0")?;
    let base_addr = base_rx.local_addr()?;
    let (s1, s2) = (stop.clone(), stop.clone());
    let rx = std::thread::spawn(move || receive(out_sock, None, None, n, 0, s1));
    let brx = std::thread::spawn(move || receive(base_rx, None, None, n, 0, s2));
    let src = UdpSocket::bind("127.0.0.1:0")?;
    let (sent, base_sent) = pace(
        n,
        args.rate,
        &src,
        base_addr,
        |_, payload| {
            src.send_to(payload, ("127.0.0.1", in_port))?;
            Ok(())
        },
        || Ok(()),
    )?;
    std::thread::sleep(Duration::from_millis(args.buffer_ms + 1000));
    stop.store(true, Ordering::Relaxed);
    let got = rx.join().expect("receiver");
    let base_got = brx.join().expect("baseline receiver");
    let skip = args.rate as usize;
    // librist prints one stats line per peer per interval, counting that interval.
    let retrans: u64 = retransmitted
        .lock()
        .expect("not poisoned")
        .iter()
        .flat_map(|line| line.split("\"retransmitted\":").skip(1))
        .filter_map(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    Ok(Side {
        lat: one_way_ms(&sent, &got, skip),
        base: one_way_ms(&base_sent, &base_got, skip),
        counted: n - skip,
        retransmitted: retrans as f64,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "two paths, {:.0}% loss each way on each, {} packets/s of 1316 bytes for {} s, {} ms buffer",
        args.loss * 100.0,
        args.rate,
        args.seconds,
        args.buffer_ms
    );
    let r = rist(&args)?;
    let m = latency(&Latency {
        seconds: args.seconds,
        rate: args.rate,
        sets: 2,
        entries: 1,
        window_ms: args.buffer_ms,
        loss: args.loss,
        entry_loss: 0.0,
        edge_loss: args.loss,
        quic: false,
        quic_congestion: "cubic".into(),
        set_impair: Vec::new(),
    })?;
    let b = Side {
        lat: m.braid.clone(),
        base: m.baseline.clone(),
        counted: m.counted,
        retransmitted: m.sets_retransmitted + m.entries_retransmitted,
    };
    r.print("RIST", " (sum of ristsender's per-interval stats)");
    b.print(
        "Braid",
        &format!(
            " (asked {:.0}; {:.0} of the edge's datagrams to the set reflectors dropped by the impairment)",
            m.asked, m.edge_impaired
        ),
    );
    let lost = |s: &Side| (s.counted - s.lat.len()) as f64;
    println!(
        "Braid / RIST: delivered {:.4} | lost {:.0} vs {:.0} | retransmissions {:.2} | p50 {:.4} | p99 {:.4}",
        b.lat.len() as f64 / r.lat.len() as f64,
        lost(&b),
        lost(&r),
        b.retransmitted / r.retransmitted,
        percentile(&b.lat, 0.5) / percentile(&r.lat, 0.5),
        percentile(&b.lat, 0.99) / percentile(&r.lat, 0.99),
    );
    Ok(())
}
