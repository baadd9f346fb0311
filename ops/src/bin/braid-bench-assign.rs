//! Assignment requests per second and latency at many concurrent viewers, against the same
//! server answering a request it routes nowhere (a 404) in the same run.
//!
//! `cargo build --release --bins && target/release/braid-bench-assign --concurrency 1000 --seconds 5`

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

fn load(url: String, concurrency: usize, seconds: u64) -> (f64, f64, f64, usize) {
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
                    let mut errors = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        match agent.get(&url.replace("CLIENT", &i.to_string())).call() {
                            Ok(mut r) => {
                                let _ = r.body_mut().read_to_string();
                                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                            }
                            Err(_) => errors += 1,
                        }
                    }
                    (lat, errors)
                })
                .expect("thread")
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().expect("thread");
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (all.len() as f64 / elapsed, pct(0.5), pct(0.99), errors)
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
                        "{{\"node\":{i},\"role\":\"edge\",\"addr\":\"127.0.0.1:{port}\",\"capacity\":1000000}}"
                    );
                    let _ = agent
                        .post(&format!("{base}/v1/report"))
                        .header("content-type", "application/json")
                        .send(&body);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let (rps, p50, p99, errors) = load(
        format!("{base}/v1/assign?stream=1&client=CLIENT"),
        args.concurrency,
        args.seconds,
    );
    let (brps, bp50, bp99, berrors) =
        load(format!("{base}/v1/nowhere"), args.concurrency, args.seconds);
    stop.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    println!(
        "{} concurrent: assign {rps:.0} req/s p50 {p50:.2} ms p99 {p99:.2} ms ({errors} errors) | baseline 404 {brps:.0} req/s p50 {bp50:.2} ms p99 {bp99:.2} ms ({berrors} errors) | ratio {:.2}",
        args.concurrency,
        rps / brps
    );
    Ok(())
}
