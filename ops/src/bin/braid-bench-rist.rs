//! The two-path loss case through rist-tools (ristsender/ristreceiver, two paths with
//! weight=0, i.e. every packet on both) and the very same impairment (braid-impair-proxy),
//! for comparison with `braid-bench-latency --sets 2 --entries 1`.
//!
//! `cargo build --release --bins && target/release/braid-bench-rist --seconds 20 --loss 0.1`
//!
//! A 4 Mbps stream of numbered 1316-byte datagrams goes in as UDP; the receiver's UDP
//! output is timed against the send times. Retransmissions are read from ristsender's
//! stats.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    /// RIST recovery buffer, ms (the counterpart of Braid's reorder window).
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
    let s2 = stop.clone();
    out_sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let rx = std::thread::spawn(move || {
        let mut got = vec![None; n];
        let mut buf = [0u8; 2048];
        while !s2.load(Ordering::Relaxed) {
            if let Ok(len) = out_sock.recv(&mut buf) {
                let now = Instant::now();
                if len >= 8 {
                    let i = u64::from_be_bytes(buf[..8].try_into().expect("8")) as usize;
                    if let Some(slot) = got.get_mut(i) {
                        slot.get_or_insert(now);
                    }
                }
            }
        }
        got
    });
    let src = UdpSocket::bind("127.0.0.1:0")?;
    let mut sent = vec![None; n];
    let start = Instant::now();
    let gap = Duration::from_nanos(1_000_000_000 / args.rate);
    for (i, slot) in sent.iter_mut().enumerate() {
        let due = start + gap * i as u32;
        while Instant::now() < due {
            std::thread::sleep(
                due.saturating_duration_since(Instant::now())
                    .min(Duration::from_micros(500)),
            );
        }
        let mut p = vec![0x47u8; 1316];
        p[..8].copy_from_slice(&(i as u64).to_be_bytes());
        *slot = Some(Instant::now());
        src.send_to(&p, ("127.0.0.1", in_port))?;
    }
    std::thread::sleep(Duration::from_millis(args.buffer_ms + 1000));
    stop.store(true, Ordering::Relaxed);
    let got = rx.join().expect("receiver");
    let skip = args.rate as usize;
    let mut lat: Vec<f64> = sent[skip..]
        .iter()
        .zip(&got[skip..])
        .filter_map(|(s, r)| Some(r.as_ref()?.duration_since(*s.as_ref()?).as_secs_f64() * 1000.0))
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let delivered = lat.len() as f64 / (n - skip) as f64 * 100.0;
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
    println!(
        "rist two paths, loss {:.0}% each way: p50 {:.3} ms p99 {:.3} ms | delivered {:.4}% | retransmitted (sum of ristsender's per-interval stats) {}",
        args.loss * 100.0,
        pct(0.5),
        pct(0.99),
        delivered,
        retrans
    );
    Ok(())
}
