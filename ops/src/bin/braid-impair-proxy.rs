//! A UDP relay that applies Braid's impairment model to traffic it did not make, so other
//! software (rist-tools, srt-tools) can be run through the very same loss as Braid.
//!
//! `braid-impair-proxy --listen 127.0.0.1:6000 --to 127.0.0.1:7000 --loss 0.1 --seed 1`
//!
//! Datagrams arriving on `--listen` go to `--to`; answers from `--to` go back to whoever
//! last sent on `--listen`. Both directions are impaired, each with its own seed. A delay
//! is applied by holding the direction's thread, so it never reorders.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use braid_net::impair::{self, Impairer, Verdict};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Where clients send.
    #[arg(long)]
    listen: SocketAddr,
    /// Where their datagrams go.
    #[arg(long)]
    to: SocketAddr,
    /// Loss probability, each direction.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// One-way delay, ms.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn relay(
    from: &UdpSocket,
    to: &UdpSocket,
    dest: impl Fn(SocketAddr) -> Option<SocketAddr>,
    mut imp: Impairer,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, src)) = from.recv_from(&mut buf) else {
            continue;
        };
        let Some(d) = dest(src) else { continue };
        let now = Instant::now();
        match imp.decide(now, n, true) {
            Verdict::Drop(_) => {}
            Verdict::Send { at, copies } => {
                if at > now {
                    std::thread::sleep(at - now);
                }
                for _ in 0..copies {
                    let _ = to.send_to(&buf[..n], d);
                }
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = impair::Config {
        loss: args.loss,
        delay_ms: args.delay_ms,
        seed: args.seed,
        ..impair::Config::default()
    };
    config.validate().map_err(anyhow::Error::msg)?;
    let front = UdpSocket::bind(args.listen)?;
    let back = UdpSocket::bind(SocketAddr::new(args.listen.ip(), 0))?;
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let start = Instant::now();
    let (f2, b2, c2) = (front.try_clone()?, back.try_clone()?, client.clone());
    let upstream = Impairer::new(config.clone(), start, 1);
    let downstream = Impairer::new(config, start, 2);
    let to = args.to;
    std::thread::spawn(move || {
        relay(
            &f2,
            &b2,
            |src| {
                *c2.lock().expect("not poisoned") = Some(src);
                Some(to)
            },
            upstream,
        );
    });
    relay(
        &back,
        &front,
        |_| *client.lock().expect("not poisoned"),
        downstream,
    );
    Ok(())
}
