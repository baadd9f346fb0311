//! What the benchmark drivers share: a timed source of numbered packets with a loopback
//! baseline stamped the same way, and the added-latency measurement through a whole
//! network (`braid-bench-latency`, and Braid's side of `braid-bench-rist`).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use braid_core::wire::rtp::{Fields, PAYLOAD_TYPE_MP2T};
use braid_core::wire::{Body, Codec, Flags, Header, Message, Rtp, WatchStart};
use braid_core::{PathId, SeqNo, StreamId};
use bytes::{Bytes, BytesMut};

use crate::harness::crowd::watch;
use crate::harness::{Net, STREAM_KEY, Spec, metrics};

/// The value at `p` (0 to 1) of `sorted`, or NaN when it is empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One-way times in ms of the packets after the first `skip`, from `sent` to `got`
/// (packets not received are left out), sorted.
pub fn one_way_ms(sent: &[Option<Instant>], got: &[Option<Instant>], skip: usize) -> Vec<f64> {
    let mut v: Vec<f64> = sent
        .iter()
        .zip(got)
        .skip(skip)
        .filter_map(|(s, r)| Some(r.as_ref()?.duration_since(*s.as_ref()?).as_secs_f64() * 1e3))
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// When each of a run's numbered packets left or arrived (`None`: it did not arrive).
pub type Stamps = Vec<Option<Instant>>;

/// Sends `n` numbered packets at `rate` per second: packet `i` is `packet(i)`, handed to
/// `send`, and its 1316-byte payload (the number in its first 8 bytes) also goes from
/// `src` straight to `baseline`. Each of the two is stamped just before its own send, so
/// the baseline's time covers the same thing as the measured path's: one loopback hop
/// and this process's scheduling. `tick` runs about once a second. Returns the stamps
/// (measured path, baseline).
pub fn pace(
    n: usize,
    rate: u64,
    src: &UdpSocket,
    baseline: SocketAddr,
    mut send: impl FnMut(usize, &[u8]) -> anyhow::Result<()>,
    mut tick: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Stamps, Stamps)> {
    let mut sent = vec![None; n];
    let mut base = vec![None; n];
    let start = Instant::now();
    let gap = Duration::from_nanos(1_000_000_000 / rate);
    let mut last_tick = start;
    let mut payload = vec![0x47u8; 1316];
    for i in 0..n {
        let due = start + gap * i as u32;
        while Instant::now() < due {
            std::thread::sleep(
                due.saturating_duration_since(Instant::now())
                    .min(Duration::from_micros(500)),
            );
        }
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        sent[i] = Some(Instant::now());
        send(i, &payload)?;
        base[i] = Some(Instant::now());
        src.send_to(&payload, baseline)?;
        if last_tick.elapsed() > Duration::from_secs(1) {
            last_tick = Instant::now();
            tick()?;
        }
    }
    Ok((sent, base))
}

/// Records when each numbered packet arrived on `sock` until `stop`: the number is the
/// first 8 bytes of the datagram (a raw packet) or, with `codec`, the media sequence
/// number less `first` (a viewer of `edge`: it watches, and acknowledges every 16
/// packets or 250 ms, with the edge's cookie).
pub fn receive(
    sock: UdpSocket,
    codec: Option<Codec>,
    edge: Option<SocketAddr>,
    n: usize,
    first: u64,
    stop: Arc<AtomicBool>,
) -> Stamps {
    let mut acked = 0u64;
    let mut since = 0;
    let mut cookie = [0; 16];
    let mut last_watch: Option<Instant> = None;
    let mut got = vec![None; n];
    let mut buf = [0u8; 2048];
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("a read timeout");
    while !stop.load(Ordering::Relaxed) {
        if let (Some(c), Some(edge)) = (&codec, edge) {
            if since >= 16 || last_watch.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
                since = 0;
                last_watch = Some(Instant::now());
                let _ = sock.send_to(&watch(c, 9, acked, WatchStart::Live, cookie), edge);
            }
        }
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
                    m.seq.0
                }
                Ok(Message {
                    body: Body::Cookie { cookie: c },
                    ..
                }) => {
                    cookie = c;
                    since = 16;
                    continue;
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

/// A whole network to time: the benchmark is its source (publishing to every entry
/// point) and the edge's viewer.
#[derive(Debug, Clone)]
pub struct Latency {
    /// Seconds of stream.
    pub seconds: u64,
    /// Packets per second.
    pub rate: u64,
    /// Set reflectors (paths to the edge).
    pub sets: usize,
    /// Entry points.
    pub entries: usize,
    /// Reorder window on sets and edge, ms.
    pub window_ms: u64,
    /// Loss on every set reflector's links (to the edge).
    pub loss: f64,
    /// Loss on every entry point's links (to the set reflectors).
    pub entry_loss: f64,
    /// Loss on the edge's links to the set reflectors (its NACKs and subscriptions).
    pub edge_loss: f64,
    /// Both inner hops of every path on QUIC.
    pub quic: bool,
    /// QUIC congestion controller of the nodes (`cubic` or `bbr`).
    pub quic_congestion: String,
    /// Each set reflector's impairment (TOML lines) instead of `loss`, when not empty.
    pub set_impair: Vec<String>,
}

/// What [`latency`] measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// One-way times through Braid, ms, sorted; packets after the first second.
    pub braid: Vec<f64>,
    /// One-way times of the loopback baseline, ms, sorted; the same packets.
    pub baseline: Vec<f64>,
    /// The baseline as it was measured before its own stamp: from the measured packet's
    /// stamp, so including the sends to the entry points (to show what that changed).
    pub baseline_shared_stamp: Vec<f64>,
    /// Packets after the first second.
    pub counted: usize,
    /// Packets the edge asked for again.
    pub asked: f64,
    /// Retransmissions the set reflectors sent.
    pub sets_retransmitted: f64,
    /// Retransmissions the entry points sent.
    pub entries_retransmitted: f64,
    /// Datagrams the edge's impairment dropped (its NACKs and subscriptions).
    pub edge_impaired: f64,
}

impl Measured {
    /// The share of the counted packets the viewer got.
    pub fn delivered(&self) -> f64 {
        self.braid.len() as f64 / self.counted.max(1) as f64
    }
}

/// Starts the network of `c`, streams through it and times every packet.
pub fn latency(c: &Latency) -> anyhow::Result<Measured> {
    let net = Net::start(Spec {
        viewers: 0,
        capture: false,
        sets: c.sets,
        entries: c.entries,
        window_ms: c.window_ms,
        entry_impair: format!("loss = {}\nseed = 12", c.entry_loss),
        set_impair: if c.set_impair.is_empty() {
            vec![format!("loss = {}\nseed = 11", c.loss); c.sets]
        } else {
            c.set_impair.clone()
        },
        edge_to_sets_impair: if c.edge_loss > 0.0 {
            format!("loss = {}\nseed = 13", c.edge_loss)
        } else {
            String::new()
        },
        quic_sets: vec![c.quic; c.sets],
        node_args: vec!["--quic-congestion".into(), c.quic_congestion.clone()],
        ..Spec::default()
    });
    let codec = Codec::viewer();
    let entries: Vec<SocketAddr> = net.entries.iter().map(|e| e.udp()).collect();
    let edge = net.edge.udp();
    let n = (c.seconds * c.rate) as usize;
    let first = 1u64 << 20;
    let stop = Arc::new(AtomicBool::new(false));

    let viewer = UdpSocket::bind("127.0.0.1:0")?;
    let base_rx = UdpSocket::bind("127.0.0.1:0")?;
    let base_addr = base_rx.local_addr()?;
    let (s1, s2) = (stop.clone(), stop.clone());
    let c2 = codec.clone();
    let v = std::thread::spawn(move || receive(viewer, Some(c2), Some(edge), n, first, s1));
    let b = std::thread::spawn(move || receive(base_rx, None, None, n, 0, s2));

    let src = UdpSocket::bind("127.0.0.1:0")?;
    let mut publisher = crate::harness::Publisher::start(&src, &entries, STREAM_KEY)?;
    let source = publisher.codec().clone();
    std::thread::sleep(Duration::from_millis(500));

    let mut out = BytesMut::new();
    let (sent, base_sent) = pace(
        n,
        c.rate,
        &src,
        base_addr,
        |i, payload| {
            let seq = SeqNo(first + i as u64);
            let rtp = Rtp::build(
                Fields {
                    marker: false,
                    payload_type: PAYLOAD_TYPE_MP2T,
                    seq: seq.low(),
                    timestamp: i as u32,
                    ssrc: 1,
                },
                payload,
            );
            out.clear();
            let flags = Flags::empty().with(Flags::KEYFRAME, i % 50 == 0);
            source.encode_media(
                Header {
                    stream: StreamId(1),
                    path: PathId(0),
                    flags,
                },
                seq,
                &rtp,
                &mut out,
            )?;
            for e in &entries {
                src.send_to(&out, e)?;
            }
            Ok(())
        },
        || Ok(publisher.renew()?),
    )?;
    std::thread::sleep(Duration::from_millis(c.window_ms + 500));
    stop.store(true, Ordering::Relaxed);
    let got = v.join().expect("viewer thread");
    let base_got = b.join().expect("baseline thread");

    // Skip the first second: the edge's merge holds its first packet one window.
    let skip = c.rate as usize;
    let sum = |procs: &[crate::harness::Proc], name: &str| -> f64 {
        procs
            .iter()
            .map(|p| metrics::sum(p.metrics(), name, &[]))
            .sum()
    };
    let edge_m = net.edge.metrics();
    Ok(Measured {
        braid: one_way_ms(&sent, &got, skip),
        baseline: one_way_ms(&base_sent, &base_got, skip),
        baseline_shared_stamp: one_way_ms(&sent, &base_got, skip),
        counted: n - skip,
        asked: metrics::sum(edge_m, "braid_merge_nacked_total", &[]),
        sets_retransmitted: sum(&net.sets, "braid_retransmit_sent_total"),
        entries_retransmitted: sum(&net.entries, "braid_retransmit_sent_total"),
        edge_impaired: metrics::sum(edge_m, "braid_udp_impaired_total", &[]),
    })
}
