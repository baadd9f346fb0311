//! What a QUIC peer's TLS handshake costs the listener (an edge, for a viewer), full
//! against resumed with a session ticket, with Braid's own TLS configurations: N clients
//! each connect once (full), then each again (resumed), in memory; only the server's
//! side is timed. QUIC's framing and packet protection come on top of both alike.
//!
//! `cargo run --release -p braid-net --example tls-handshakes -- 2000`

use std::sync::Arc;
use std::time::Duration;

use braid_net::tls::{Tls, handshake_in_memory, make_dev_certs};
use rustls::HandshakeKind;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(2000), |a| a.parse())?;
    let dir = std::env::temp_dir().join(format!("braid-tls-bench-{}", std::process::id()));
    make_dev_certs(&dir, &["edge".into()], &[])?;
    let server = Tls {
        cert: Some(dir.join("edge.pem")),
        key: Some(dir.join("edge.key")),
        ..Tls::default()
    };
    let server = Arc::new(server.server_config()?.expect("a server configuration"));
    let viewer = Tls {
        ca: Some(dir.join("ca.pem")),
        ..Tls::default()
    };
    // In rounds of 50 clients, each connecting then coming back, so that the machine's
    // load drifting affects both kinds alike.
    let mut spent = [Duration::ZERO; 2];
    for _ in 0..n.div_ceil(50) {
        let clients = (0..50)
            .map(|_| viewer.client_config().map(Arc::new))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (i, want) in [HandshakeKind::Full, HandshakeKind::Resumed]
            .iter()
            .enumerate()
        {
            for c in &clients {
                let (kind, t) = handshake_in_memory(c, &server);
                anyhow::ensure!(
                    kind == *want,
                    "a {kind:?} handshake where {want:?} was expected"
                );
                spent[i] += t;
            }
        }
    }
    let each = |d: Duration| d.as_secs_f64() * 1e6 / (n.div_ceil(50) * 50) as f64;
    println!(
        "server side per handshake: full {:.1} µs, resumed {:.1} µs, resumed / full {:.2}",
        each(spent[0]),
        each(spent[1]),
        each(spent[1]) / each(spent[0])
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
