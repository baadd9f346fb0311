//! Core benchmarks; figures go to BENCHMARKS.md with this command:
//! `cargo bench -p braid-core --bench core`
//!
//! Each measured case runs beside a baseline in the same run, so the ratio holds on a
//! noisy shared machine even when absolute times drift.

#![allow(missing_docs)] // criterion_group! generates undocumented items.
#![allow(clippy::disallowed_methods)] // A benchmark needs one real instant to count from.

use std::hint::black_box;
use std::time::{Duration, Instant};

use braid_core::merge::{self, Buffer, Input, Output};
use braid_core::ring::{Read, Ring, Start};
use braid_core::wire::rtp::{Fields, PAYLOAD_TYPE_MP2T};
use braid_core::wire::{Body, Codec, Flags, Header, Key, Media, Message, Rtp};
use braid_core::{PathId, SeqNo, StreamId};
use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const PACKETS: u64 = 20_000;
const PAYLOAD: usize = 1316;

/// A small seeded generator, so every run sees the same losses.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// (arrival offset, path, seq, payload)
type Arrival = (Duration, PathId, SeqNo, Bytes);

/// `paths` copies of PACKETS packets, each copy lost with `loss_pct` % probability, with
/// paths 0-2 ms apart; sorted by arrival.
fn arrivals(paths: u8, loss_pct: u64) -> Vec<Arrival> {
    let payload = Bytes::from(vec![0x47u8; PAYLOAD]);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::new();
    for seq in 0..PACKETS {
        // 4 Mbps of 1316-byte payloads is about 380 packets/s: one every 2.6 ms.
        let sent = Duration::from_micros(seq * 2630);
        for p in 0..paths {
            if rng.next() % 100 < loss_pct {
                continue;
            }
            let skew = Duration::from_micros(u64::from(p) * 1000 + rng.next() % 500);
            out.push((sent + skew, PathId(p), SeqNo(seq), payload.clone()));
        }
    }
    out.sort_by_key(|a| a.0);
    out
}

fn run_merge(t: Instant, input: Vec<Arrival>) -> u64 {
    let config = merge::Config::default();
    let mut b = Buffer::starting_at(config, SeqNo(0)).expect("default config is valid");
    let mut released = 0;
    for (at, path, seq, item) in input {
        b.handle_input(t + at, Input::Packet { path, seq, item });
        loop {
            match b.poll_output() {
                Output::Packet { item, .. } => {
                    black_box(item);
                    released += 1;
                }
                Output::Timeout(_) => break,
                other => {
                    black_box(other);
                }
            }
        }
    }
    released
}

fn bench_merge(c: &mut Criterion) {
    let t = Instant::now();
    let mut g = c.benchmark_group("merge");
    let baseline = arrivals(1, 0);
    g.throughput(Throughput::Elements(baseline.len() as u64));
    g.bench_function("baseline_in_order_1_path", |b| {
        b.iter_batched(
            || baseline.clone(),
            |i| run_merge(t, i),
            BatchSize::LargeInput,
        )
    });
    let lossy = arrivals(3, 5);
    g.throughput(Throughput::Elements(lossy.len() as u64));
    g.bench_function("3_paths_5pct_loss", |b| {
        b.iter_batched(|| lossy.clone(), |i| run_merge(t, i), BatchSize::LargeInput)
    });
    g.finish();
}

fn bench_ring(c: &mut Criterion) {
    const VIEWERS: usize = 10_000;
    let t = Instant::now();
    let payload = Bytes::from(vec![0x47u8; PAYLOAD]);
    let mut ring = Ring::new(braid_core::ring::Config::default()).expect("default config is valid");
    for s in 0..1000u64 {
        ring.push(t, SeqNo(s), s % 100 == 0, PAYLOAD, payload.clone());
    }
    let (cursor, _) = ring.cursor(Start::Keyframe).expect("keyframes were pushed");
    let mut g = c.benchmark_group("ring_fanout");
    g.throughput(Throughput::Elements(VIEWERS as u64));
    // Baseline: the least any fan-out can do, one reference-count clone per viewer from a
    // slice.
    let flat: Vec<Bytes> = vec![payload.clone(); 1];
    g.bench_function("baseline_clone_per_viewer", |b| {
        b.iter(|| {
            for _ in 0..VIEWERS {
                black_box(flat[black_box(0)].clone());
            }
        })
    });
    g.bench_function("cursor_read_10k_viewers", |b| {
        b.iter_batched_ref(
            || vec![cursor; VIEWERS],
            |cursors| {
                for c in cursors.iter_mut() {
                    if let Read::Packet(e) = ring.read(c) {
                        black_box(e.item.clone());
                    }
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
    println!(
        "ring_fanout: bytes of memory per cursor = {}",
        std::mem::size_of::<braid_core::ring::Cursor>()
    );
}

fn bench_codec(c: &mut Criterion) {
    let codec = Codec::new(Key::derive("bench"));
    let rtp = Rtp::build(
        Fields {
            marker: false,
            payload_type: PAYLOAD_TYPE_MP2T,
            seq: 7,
            timestamp: 90_000,
            ssrc: 1,
        },
        &[0x47; PAYLOAD],
    );
    let header = Header {
        stream: StreamId(1),
        path: PathId(0),
        flags: Flags::KEYFRAME,
    };
    let msg = Message {
        header,
        body: Body::Media(Media {
            seq: SeqNo(7),
            rtp: rtp.clone(),
        }),
    };
    let mut out = BytesMut::new();
    codec.encode(&msg, &mut out).expect("valid message");
    let datagram = out.freeze();

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("baseline_copy_datagram", |b| {
        b.iter(|| black_box(Bytes::copy_from_slice(black_box(&datagram[..]))))
    });
    g.bench_function("encode_media", |b| {
        let mut out = BytesMut::with_capacity(2048);
        b.iter(|| {
            out.clear();
            codec
                .encode_media(header, SeqNo(7), &rtp, &mut out)
                .expect("valid message");
            black_box(&out);
        })
    });
    g.bench_function("decode_media", |b| {
        b.iter(|| black_box(codec.decode(black_box(datagram.clone())).expect("valid")))
    });
    // What the trust model added per packet, at the entry point only: a source's media
    // checked with its stream's publish key, then re-signed as a node's.
    let source = Codec::source("bench stream key");
    let entry = codec
        .clone()
        .with_sources([(StreamId(1), Key::publish("bench stream key"))]);
    let mut out = BytesMut::new();
    source.encode(&msg, &mut out).expect("valid message");
    let from_source = out.freeze();
    g.bench_function("entry_decode_source_media", |b| {
        b.iter(|| {
            black_box(
                entry
                    .decode_any(black_box(from_source.clone()))
                    .expect("valid"),
            )
        })
    });
    g.bench_function("entry_resign_media", |b| {
        b.iter(|| black_box(entry.resign(black_box(&from_source)).expect("valid")))
    });
    g.finish();

    // Per viewer, per watch (4 a second): the edge's address-validation cookie.
    let mut g = c.benchmark_group("cookie");
    g.throughput(Throughput::Elements(1));
    let mut jar = braid_core::cookie::Cookies::new([1; 32]);
    let t = std::time::Instant::now();
    let who = braid_core::cookie::Subject::Addr("192.0.2.1:5000".parse().expect("an address"));
    let cookie = jar.issue(t, who);
    g.bench_function("check_fresh", |b| {
        b.iter(|| black_box(jar.check(t, black_box(who), black_box(&cookie))))
    });
    g.finish();
}

criterion_group!(benches, bench_merge, bench_ring, bench_codec);
criterion_main!(benches);
