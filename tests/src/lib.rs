//! braid-tests: whole-network tests that run the real daemons as processes on 127.0.0.1
//! (`tests/`), with what they share.
//!
//! # Layout
//!
//! - [`compare`]: checks a viewer's output against what the capture sent.
//! - The process harness lives in `braid_ops::harness` (re-exported here).

pub use braid_ops::harness::*;

/// Checks viewers' output against the capture's tee.
pub mod compare {
    use std::path::Path;

    /// Where `view` starts in `tee` and whether it continues byte for byte to its end.
    /// Panics with a useful message when it does not.
    pub fn assert_contiguous(tee: &Path, view: &Path) -> usize {
        let t = std::fs::read(tee).expect("reading the tee");
        let v = std::fs::read(view).expect("reading the viewer's output");
        assert!(
            v.len() >= 188 * 100,
            "{} holds only {} bytes",
            view.display(),
            v.len()
        );
        let head = &v[..1316.min(v.len())];
        let start = t
            .windows(head.len())
            .position(|w| w == head)
            .unwrap_or_else(|| panic!("{}: the first bytes were never sent", view.display()));
        let end = start + v.len();
        assert!(
            end <= t.len(),
            "{}: longer than what was sent after its start",
            view.display()
        );
        if t[start..end] != v[..] {
            let first_diff = t[start..end]
                .iter()
                .zip(&v)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{}: differs from what was sent at byte {first_diff} of {} (TS packet {})",
                view.display(),
                v.len(),
                first_diff / 188
            );
        }
        v.len()
    }

    /// How many TS packets of the part of `tee` that `view` spans are missing from
    /// `view`, checking that everything `view` holds was sent, in order.
    pub fn missing_ts_packets(tee: &Path, view: &Path) -> (usize, usize) {
        let t = std::fs::read(tee).expect("reading the tee");
        let v = std::fs::read(view).expect("reading the viewer's output");
        assert_eq!(v.len() % 188, 0, "whole TS packets only");
        let tp: Vec<&[u8]> = t.chunks(188).collect();
        let vp: Vec<&[u8]> = v.chunks(188).collect();
        let mut i = tp
            .iter()
            .position(|p| *p == vp[0])
            .expect("the first packet was sent");
        let mut missing = 0;
        for p in &vp {
            let j = tp[i..].iter().position(|q| q == p).unwrap_or_else(|| {
                panic!("a received TS packet was never sent (or came out of order)")
            });
            missing += j;
            i += j + 1;
        }
        (missing, vp.len())
    }
}

/// Many viewers in one process, one thread each, speaking the watch protocol directly;
/// each records every sequence number it gets.
pub mod crowd {
    use std::net::{SocketAddr, UdpSocket};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use braid_core::wire::{Body, Codec, Header, Key, Message, Watch, WatchStart};
    use braid_core::{NodeId, SeqNo, StreamId};
    use bytes::{Bytes, BytesMut};

    /// What one viewer got.
    #[derive(Debug, Default, Clone)]
    pub struct Seen {
        /// Every media sequence number, in arrival order.
        pub seqs: Vec<u64>,
        /// Errors the edge sent.
        pub errors: Vec<String>,
    }

    impl Seen {
        /// Sequence numbers missing between the first and the last received.
        pub fn missing(&self) -> u64 {
            let mut s = self.seqs.clone();
            s.sort_unstable();
            s.dedup();
            match (s.first(), s.last()) {
                (Some(a), Some(b)) => b - a + 1 - s.len() as u64,
                _ => 0,
            }
        }
    }

    /// A crowd of viewers watching stream 1 on `edge`.
    pub struct Crowd {
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<Seen>>,
    }

    fn watch(codec: &Codec, id: u64, acked: u64) -> Bytes {
        let mut out = BytesMut::new();
        let msg = Message {
            header: Header {
                stream: StreamId(1),
                ..Header::default()
            },
            body: Body::Watch(Watch {
                node: NodeId(id),
                lease_ms: 3000,
                start: WatchStart::Keyframe,
                seq: SeqNo(0),
                acked: SeqNo(acked),
                token: Bytes::new(),
            }),
        };
        codec
            .encode(&msg, &mut out)
            .expect("a watch message encodes");
        out.freeze()
    }

    impl Crowd {
        /// Starts `n` viewers.
        pub fn start(edge: SocketAddr, n: usize) -> Crowd {
            let stop = Arc::new(AtomicBool::new(false));
            let threads = (0..n)
                .map(|i| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let codec = Codec::new(Key::derive(crate::NETWORK_KEY));
                        let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
                        sock.set_read_timeout(Some(Duration::from_millis(50)))
                            .expect("timeout");
                        let mut seen = Seen::default();
                        let mut buf = [0u8; 2048];
                        let mut acked = 0u64;
                        let mut since = 0;
                        let mut last_ack = Instant::now();
                        let _ = sock.send_to(&watch(&codec, i as u64, 0), edge);
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok(n) = sock.recv(&mut buf) {
                                match codec.decode(Bytes::copy_from_slice(&buf[..n])) {
                                    Ok(Message {
                                        body: Body::Media(m),
                                        ..
                                    }) => {
                                        seen.seqs.push(m.seq.0);
                                        acked = acked.max(m.seq.0);
                                        since += 1;
                                    }
                                    Ok(Message {
                                        body: Body::Error { text, .. },
                                        ..
                                    }) => seen.errors.push(text),
                                    _ => {}
                                }
                            }
                            if since >= 32 || last_ack.elapsed() > Duration::from_millis(250) {
                                since = 0;
                                last_ack = Instant::now();
                                let _ = sock.send_to(&watch(&codec, i as u64, acked), edge);
                            }
                        }
                        seen
                    })
                })
                .collect();
            Crowd { stop, threads }
        }

        /// Stops every viewer and returns what each got.
        pub fn finish(self) -> Vec<Seen> {
            self.stop.store(true, Ordering::Relaxed);
            self.threads
                .into_iter()
                .map(|t| t.join().expect("viewer thread"))
                .collect()
        }
    }
}
