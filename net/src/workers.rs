//! Send workers: threads that make a socket's send system calls, each for a fixed share
//! of the destinations.
//!
//! A daemon's task decides what goes where (the sans-IO machine, the impairment layer);
//! the `sendmmsg` calls that put each datagram on the wire, most of an edge's or a set
//! reflector's CPU at fan-out, are spread over `n` threads. Every destination belongs to
//! one worker for the socket's life ([`pick`], a fixed hash of its address), so
//! its datagrams leave in the order they were queued, and a viewer never moves between
//! workers. Each worker sends on a socket of its own bound to the daemon's address
//! (`SO_REUSEPORT`, with a program that gives every datagram that comes in to the task's
//! socket): viewers and peers see one source address, what they send back arrives at the
//! task, and the workers share no socket state (sharing one socket, two workers spent
//! 40% more CPU per Gbps than one, contending for its locks as each packet was freed).
//!
//! A worker that falls behind does not hold up the task or the other workers: its queue
//! is bounded ([`QUEUE`] batches), and a batch that finds it full is dropped and counted
//! (`braid_udp_send_failed_total`, like a datagram the kernel would not take: a live
//! stream does not wait).

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};

/// Batches queued per worker before the next is dropped (a batch is what one wake-up of
/// the task had for that worker's destinations).
pub const QUEUE: usize = 256;

/// Emptied batches kept per worker for reuse.
const SPARE: usize = 4;

/// Room an emptied batch keeps for reuse: a wake-up's datagrams for one worker in steady
/// state. A burst's batch (many viewers joining at once, each sent its catch-up) gives
/// back the rest, rather than hold the burst's memory in every spare for good.
const BATCH_KEEP: usize = 4096;

/// Most workers a socket may have.
pub const MAX: usize = 64;

/// One batch of datagrams for one worker.
type Batch = Vec<(SocketAddr, Bytes)>;

/// What the workers did, summed over all of them.
#[derive(Debug, Default)]
struct Counts {
    sent: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

/// A socket's send workers.
#[derive(Debug)]
pub(crate) struct Workers {
    queues: Vec<Sender<Batch>>,
    /// Emptied batches come back here to be filled again.
    spare: Receiver<Batch>,
    /// This wake-up's datagrams, per worker, until [`Workers::hand_over`].
    parts: Vec<Batch>,
    counts: Arc<Counts>,
    threads: Vec<JoinHandle<()>>,
}

/// Which of `n` workers sends to `to`: always the same one, in every run and every
/// process (a test places viewers on the workers it wants with it).
pub fn pick(to: SocketAddr, n: usize) -> usize {
    // SipHash with fixed keys: the same in every run and every process.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0x0062_7261_6964, 0x776f_726b);
    to.hash(&mut h);
    (h.finish() % n.max(1) as u64) as usize
}

impl Workers {
    /// Starts a worker for each socket of `sockets` (at most [`MAX`]), which it sends on.
    pub(crate) fn start(
        sockets: Vec<std::net::UdpSocket>,
        role: &'static str,
    ) -> std::io::Result<Workers> {
        let n = sockets.len().clamp(1, MAX);
        let counts = Arc::new(Counts::default());
        let (spare_tx, spare) = crossbeam_channel::bounded(n * SPARE);
        let mut queues = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for (i, socket) in sockets.into_iter().take(n).enumerate() {
            let (tx, rx) = crossbeam_channel::bounded::<Batch>(QUEUE);
            let (counts, spare_tx) = (counts.clone(), spare_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("{role}-send-{i}"))
                .spawn(move || {
                    // Until the socket is dropped and this worker's queue is empty.
                    while let Ok(mut batch) = rx.recv() {
                        let (sent, failed, bytes) =
                            crate::udp::send_counted(socket.as_raw_fd(), &batch, role);
                        counts.sent.fetch_add(sent, Ordering::Relaxed);
                        counts.failed.fetch_add(failed, Ordering::Relaxed);
                        counts.bytes.fetch_add(bytes, Ordering::Relaxed);
                        batch.clear();
                        if batch.capacity() > BATCH_KEEP {
                            batch.shrink_to(BATCH_KEEP);
                        }
                        let _ = spare_tx.try_send(batch);
                    }
                })?;
            queues.push(tx);
            threads.push(thread);
        }
        Ok(Workers {
            queues,
            spare,
            parts: vec![Vec::new(); n],
            counts,
            threads,
        })
    }

    /// How many workers there are.
    pub(crate) fn len(&self) -> usize {
        self.queues.len()
    }

    /// Queues a datagram for its worker (sent at [`Workers::hand_over`]).
    pub(crate) fn push(&mut self, to: SocketAddr, bytes: Bytes) {
        let i = pick(to, self.parts.len());
        self.parts[i].push((to, bytes));
    }

    /// Hands each worker what was queued for it since the last call. Returns the
    /// datagrams dropped because a worker's queue was full.
    pub(crate) fn hand_over(&mut self, role: &'static str) -> u64 {
        let mut dropped = 0;
        for (part, queue) in self.parts.iter_mut().zip(&self.queues) {
            if part.is_empty() {
                continue;
            }
            let fresh = self
                .spare
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(part.len()));
            let batch = std::mem::replace(part, fresh);
            match queue.try_send(batch) {
                Ok(()) => {}
                Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => {
                    dropped += b.len() as u64;
                }
            }
        }
        if dropped > 0 {
            metrics::counter!("braid_udp_send_failed_total", "role" => role).increment(dropped);
        }
        dropped
    }

    /// Datagrams the workers sent, those the kernel refused, and bytes sent.
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (
            self.counts.sent.load(Ordering::Relaxed),
            self.counts.failed.load(Ordering::Relaxed),
            self.counts.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Workers {
    /// Everything handed over is sent before the socket goes (a daemon's last notices).
    fn drop(&mut self) {
        self.queues.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    fn local() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// Everything sent to the group's address reaches the task's socket, none the
    /// workers'; and an address taken is refused, as without workers.
    #[test]
    fn the_group_receives_on_its_first_socket_and_takes_no_bound_address() {
        let (main, senders) = crate::udp::bind_group(local(), 3).unwrap();
        let addr = main.local_addr().unwrap();
        let peers: Vec<UdpSocket> = (0..20).map(|_| UdpSocket::bind(local()).unwrap()).collect();
        for p in &peers {
            p.send_to(b"hello", addr).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let drain = |s: &UdpSocket| {
            let mut buf = [0u8; 16];
            std::iter::from_fn(|| s.recv(&mut buf).ok()).count()
        };
        assert_eq!(drain(&main), 20);
        assert!(senders.iter().all(|s| drain(s) == 0));
        assert_eq!(
            crate::udp::bind_group(addr, 2).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
        let plain = UdpSocket::bind(local()).unwrap();
        assert!(crate::udp::bind_group(plain.local_addr().unwrap(), 2).is_err());
    }

    #[test]
    fn a_destination_always_has_the_same_worker_and_all_workers_get_some() {
        let mut per = [0usize; 4];
        for port in 1000..3000u16 {
            let to = SocketAddr::from(([127, 0, 0, 1], port));
            let w = pick(to, 4);
            assert_eq!(w, pick(to, 4));
            per[w] += 1;
        }
        // 2,000 ports over 4 workers: each within a fifth of its share.
        assert!(per.iter().all(|&n| (400..=600).contains(&n)), "{per:?}");
    }

    /// Every datagram reaches its destination, each destination's in the order queued,
    /// and the counts say so.
    #[test]
    fn workers_deliver_each_destinations_datagrams_in_order() {
        let (main, senders) = crate::udp::bind_group(local(), 3).unwrap();
        let receivers: Vec<UdpSocket> = (0..6)
            .map(|_| {
                let r = UdpSocket::bind("127.0.0.1:0").unwrap();
                r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                r
            })
            .collect();
        let mut w = Workers::start(senders, "test").unwrap();
        for round in 0..50u32 {
            for r in &receivers {
                let to = r.local_addr().unwrap();
                w.push(to, Bytes::from(round.to_be_bytes().to_vec()));
            }
            assert_eq!(w.hand_over("test"), 0);
        }
        for r in &receivers {
            let mut buf = [0u8; 16];
            for round in 0..50u32 {
                let (n, from) = r.recv_from(&mut buf).unwrap();
                assert_eq!(
                    from,
                    main.local_addr().unwrap(),
                    "sent from the socket's address"
                );
                assert_eq!(&buf[..n], &round.to_be_bytes());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while w.counts().0 < 300 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(w.counts(), (300, 0, 1200));
    }

    /// A burst's batch comes back to be reused without the burst's room.
    #[test]
    fn a_bursts_batch_is_reused_without_its_room() {
        let (_main, senders) = crate::udp::bind_group(local(), 1).unwrap();
        let r = UdpSocket::bind(local()).unwrap();
        let to = r.local_addr().unwrap();
        let mut w = Workers::start(senders, "test").unwrap();
        for _ in 0..20_000 {
            w.push(to, Bytes::from_static(b"x"));
        }
        assert_eq!(w.hand_over("test"), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let back = loop {
            if let Ok(b) = w.spare.try_recv() {
                break b;
            }
            assert!(Instant::now() < deadline, "the batch never came back");
            std::thread::sleep(Duration::from_millis(5));
        };
        let (sent, failed, _) = w.counts();
        assert_eq!(sent + failed, 20_000);
        assert!(back.is_empty());
        assert!(back.capacity() <= BATCH_KEEP, "{}", back.capacity());
    }

    /// What was handed over is sent even when the socket goes right after.
    #[test]
    fn dropping_the_workers_sends_what_they_were_given() {
        let (_main, senders) = crate::udp::bind_group(local(), 2).unwrap();
        let r = UdpSocket::bind("127.0.0.1:0").unwrap();
        r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut w = Workers::start(senders, "test").unwrap();
        for i in 0..100u32 {
            w.push(
                r.local_addr().unwrap(),
                Bytes::from(i.to_be_bytes().to_vec()),
            );
        }
        w.hand_over("test");
        drop(w);
        let mut buf = [0u8; 16];
        for i in 0..100u32 {
            let n = r.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &i.to_be_bytes());
        }
    }
}
