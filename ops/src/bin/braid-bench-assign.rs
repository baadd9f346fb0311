//! Assignment requests per second and latency at many concurrent viewers, against the same
//! server answering a request it routes nowhere (a 404) in the same run.
//!
//! `cargo build --release --bins && target/release/braid-bench-assign --concurrency 1000 --seconds 5`
//!
//! Only answers with the expected status count (200 for an assignment, 404 for the
//! baseline): their rate and latency are the figures; every other answer is reported by
//! its status, and requests that got no answer as errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use braid_ops::harness::Proc;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

/// What a load run measured.
struct Load {
    /// Answers with the expected status per second.
    rps: f64,
    /// Their latency, ms.
    p50: f64,
    p99: f64,
    /// Every other answer, by status; requests with no answer under "error".
    other: BTreeMap<String, usize>,
}

impl Load {
    fn others(&self) -> String {
        if self.other.is_empty() {
            return "none".into();
        }
        self.other
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn load(url: String, expect: u16, concurrency: usize, seconds: u64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..concurrency)
        .map(|i| {
            let (url, stop) = (url.clone(), stop.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(10)))
                        .build()
                        .into();
                    let mut lat = Vec::new();
                    let mut other: BTreeMap<String, usize> = BTreeMap::new();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        match agent.get(&url.replace("CLIENT", &i.to_string())).call() {
                            Ok(mut r) => {
                                let _ = r.body_mut().read_to_string();
                                let status = r.status().as_u16();
                                if status == expect {
                                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                                } else {
                                    *other.entry(format!("HTTP {status}")).or_default() += 1;
                                }
                            }
                            Err(_) => *other.entry("error".into()).or_default() += 1,
                        }
                    }
                    (lat, other)
                })
                .expect("thread")
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut other: BTreeMap<String, usize> = BTreeMap::new();
    for t in threads {
        let (l, o) = t.join().expect("thread");
        all.extend(l);
        for (k, v) in o {
            *other.entry(k).or_default() += v;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Load {
        rps: all.len() as f64 / elapsed,
        p50: pct(0.5),
        p99: pct(0.99),
        other,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let control = Proc::start(
        "control",
        "braid-control",
        &["--listen".into(), "127.0.0.1:0".into()],
        &dir.path().join("control.log"),
    );
    let base = format!("http://{}", control.ready["http"]);
    // Four edges that keep reporting.
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = {
        let (base, stop) = (base.clone(), stop.clone());
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            while !stop.load(Ordering::Relaxed) {
                for (i, port) in [9000u16, 9002, 9001, 9003].into_iter().enumerate() {
                    let body = format!(
                        "{{\"node\":{i},\"role\":\"edge\",\"addr\":\"127.0.0.1:{port}\",\"capacity\":100000}}"
                    );
                    let (h, sig) =
                        braid_ops::harness::node_signature("POST", "/v1/report", body.as_bytes());
                    let _ = agent
                        .post(&format!("{base}/v1/report"))
                        .header("content-type", "application/json")
                        .header(h, &sig)
                        .send(&body);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let a = load(
        format!("{base}/v1/assign?stream=1&client=CLIENT"),
        200,
        args.concurrency,
        args.seconds,
    );
    let b = load(
        format!("{base}/v1/nowhere"),
        404,
        args.concurrency,
        args.seconds,
    );
    stop.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    println!(
        "{} concurrent: assign {:.0} answers 200/s p50 {:.2} ms p99 {:.2} ms (other answers: {}) | baseline {:.0} answers 404/s p50 {:.2} ms p99 {:.2} ms (other answers: {}) | ratio {:.2}",
        args.concurrency,
        a.rps,
        a.p50,
        a.p99,
        a.others(),
        b.rps,
        b.p50,
        b.p99,
        b.others(),
        a.rps / b.rps
    );
    Ok(())
}
