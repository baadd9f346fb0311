//! The edge's own work per packet it delivers, for callgrind (issue 16): the sans-IO edge
//! fed by a set reflector with a 5 Mbit/s stream (1,316-byte payloads, a keyframe every
//! 250 packets), serving `viewers` datagram viewers that acknowledge as the client does
//! (a watch every 16 packets, saying what they received), for `packets` packets, its time
//! stepped by hand. Nothing but the edge's `handle_input`, `handle_timeout` and
//! `poll_output` is meant to be counted: `ops/callgrind.sh` runs it under callgrind with
//! collection toggled on those, at two lengths, and divides the difference in
//! instructions by the difference in packets delivered (so joining costs nothing).
//!
//! ```sh
//! cargo build --release -p braid-reflector --example edge-instructions
//! target/release/examples/edge-instructions 100 2000   # viewers, packets
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_core::cookie::{Cookies, Subject};
use braid_core::node::{Output, Peer, WallClock};
use braid_core::wire::rtp::Fields;
use braid_core::wire::{Body, Codec, Flags, Header, Key, Message, Rtp, Watch, WatchStart};
use braid_core::{NodeId, SeqNo, StreamId, merge, ring, speed};
use braid_reflector::Settings;
use braid_reflector::edge::{Config, Edge, Input};
use bytes::{Bytes, BytesMut};

const SECRET: [u8; 32] = [5; 32];
const STREAM: StreamId = StreamId(1);

fn main() {
    let mut args = std::env::args().skip(1);
    let viewers: u16 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let packets: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    #[allow(clippy::disallowed_methods)] // one real instant to count from; then stepped
    let mut now = Instant::now();
    let set: SocketAddr = "127.0.0.1:9100".parse().expect("an address");
    let codec = Codec::new(Key::derive("edge instructions"));
    let config = Config {
        settings: Settings {
            node: NodeId(7),
            streams: Vec::new(),
            merge: merge::Config::default(),
            max_per_stream: usize::from(viewers) + 1,
            max_streams: 4,
        },
        reflectors: vec![set],
        subscribe_k: 2,
        ring: ring::Config::default(),
        linger: Duration::from_secs(5),
        max_viewers: usize::from(viewers) + 1,
        viewer_window: 64,
        tokens: None,
        hls: None,
        speed: speed::Config::default(),
        ladders: Vec::new(),
        adapt: speed::AdaptConfig::default(),
    };
    let mut edge = Edge::new(
        config,
        codec.clone(),
        WallClock::new(now, 1_800_000_000_000),
    )
    .expect("a valid configuration")
    .with_cookie_secret(SECRET);
    let mut cookies = Cookies::new(SECRET);
    let addrs: Vec<SocketAddr> = (0..viewers)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 20_000 + i)))
        .collect();
    let watch = |cookies: &mut Cookies, now: Instant, to: SocketAddr, acked: u64, got: u64| {
        let m = Message {
            header: Header {
                stream: STREAM,
                ..Header::default()
            },
            body: Body::Watch(Watch {
                node: NodeId(1000 + u64::from(to.port())),
                lease_ms: 5000,
                start: WatchStart::Live,
                seq: SeqNo(0),
                acked: SeqNo(acked),
                cookie: cookies.issue(now, Subject::Addr(to)),
                token: Bytes::new(),
                received: Some(got),
                policy: None,
                fits_kbps: None,
                rendition: None,
            }),
        };
        let mut b = BytesMut::new();
        Codec::viewer().encode(&m, &mut b).expect("a watch encodes");
        Input::Received {
            from: Peer::Addr(to),
            datagram: b.freeze(),
            node: false,
        }
    };
    let payload = vec![0x47u8; 1316];
    let mut delivered = 0u64;
    let drain = |edge: &mut Edge, delivered: &mut u64| {
        while let Output::Transmit(t) = edge.poll_output() {
            if t.to != Peer::Addr(set) {
                *delivered += 1;
            }
        }
    };
    // Every viewer joins; the stream starts.
    for a in &addrs {
        edge.handle_input(now, watch(&mut cookies, now, *a, 0, 0));
    }
    drain(&mut edge, &mut delivered);
    let first = 1u64 << 40;
    for i in 0..packets {
        let seq = first + i;
        let rtp = Rtp::build(
            Fields {
                marker: false,
                payload_type: 33,
                seq: SeqNo(seq).low(),
                timestamp: (i * 180) as u32,
                ssrc: 0x5eed,
            },
            &payload,
        );
        let header = Header {
            stream: STREAM,
            flags: if i % 250 == 0 {
                Flags::KEYFRAME
            } else {
                Flags::empty()
            },
            ..Header::default()
        };
        let mut b = BytesMut::new();
        codec
            .encode_media(header, SeqNo(seq), &rtp, &mut b)
            .expect("media encodes");
        edge.handle_input(
            now,
            Input::Received {
                from: Peer::Addr(set),
                datagram: b.freeze(),
                node: true,
            },
        );
        now += Duration::from_millis(2);
        edge.handle_timeout(now);
        drain(&mut edge, &mut delivered);
        // Each viewer has what was sent to it so far, and says so every 16 packets.
        if i % 16 == 15 {
            let got = (i + 1) * rtp.len() as u64;
            for a in &addrs {
                edge.handle_input(now, watch(&mut cookies, now, *a, seq, got));
            }
            drain(&mut edge, &mut delivered);
        }
    }
    let c = edge.counters();
    println!(
        "viewers {viewers} packets {packets} delivered {delivered} viewer_joins {}",
        c.viewer_joins
    );
}
