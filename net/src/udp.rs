//! A UDP socket for a daemon's task: batched receive and send, with the impairment layer
//! on every outgoing link.
//!
//! The owning task calls [`Socket::send`] for each datagram, then [`Socket::flush`] once
//! per wake-up so everything queued goes out in `sendmmsg` batches. Delayed datagrams
//! (impairment delay, jitter, reordering, rate cap) wait in a timer queue; the task wakes
//! at [`Socket::next_timeout`] and calls [`Socket::handle_timeout`]. Every datagram not sent
//! is counted by reason.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::Interest;

use crate::impair::{self, Impairer, Verdict};
use crate::quic::Quic;
use crate::sys::{self, Received};
use crate::workers::Workers;

/// Largest datagram received; anything longer is truncated and then refused by the codec.
pub const MAX_DATAGRAM: usize = 9216;

/// Socket buffer size asked for (the kernel may cap it): about 100 ms at 300 Mbps.
const SOCKET_BUFFER: usize = 4 << 20;

/// Impairments of a daemon's outgoing links.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Impairments {
    /// Applied to every link not listed in `links`.
    pub default: impair::Config,
    /// Per-destination impairments.
    pub links: Vec<Link>,
}

/// The impairment of the link to one destination.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// The destination.
    pub to: SocketAddr,
    /// What happens to packets sent there.
    #[serde(flatten)]
    pub impair: impair::Config,
}

impl Impairments {
    /// The impairment of the link to `to`.
    pub fn for_link(&self, to: SocketAddr) -> impair::Config {
        self.links
            .iter()
            .find(|l| l.to == to)
            .map(|l| l.impair.clone())
            .unwrap_or_else(|| self.default.clone())
    }

    /// Checks every link's settings.
    pub fn validate(&self) -> Result<(), String> {
        self.default.validate()?;
        for l in &self.links {
            l.impair
                .validate()
                .map_err(|e| format!("link to {}: {e}", l.to))?;
        }
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Delayed {
    at: Instant,
    order: u64,
    to: SocketAddr,
    bytes: Bytes,
    is_data: bool,
}

/// Counters of one socket, also exported as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// Datagrams the kernel would not take (send buffer full) or refused.
    pub send_failed: u64,
    /// Datagrams the impairment layer dropped.
    pub impaired: u64,
    /// Bytes handed to the kernel, and to QUIC when it is attached.
    pub sent_bytes: u64,
}

/// A daemon's UDP socket. Owned by one task.
#[derive(Debug)]
pub struct Socket {
    inner: tokio::net::UdpSocket,
    start: Instant,
    impairments: Impairments,
    /// No link is impaired: datagrams skip the per-destination lookup.
    unimpaired: bool,
    links: HashMap<SocketAddr, Impairer>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    order: u64,
    outbox: Vec<(SocketAddr, Bytes)>,
    rx_bufs: Vec<[u8; MAX_DATAGRAM]>,
    rx_meta: Vec<Received>,
    stats: Stats,
    role: &'static str,
    quic: Option<Box<Quic>>,
    quic_rx: Vec<(SocketAddr, Bytes)>,
    workers: Option<Workers>,
    /// See [`Socket::set_upstream`].
    upstream: Vec<SocketAddr>,
}

impl Socket {
    /// Binds `addr` with large socket buffers. `role` labels the metrics.
    pub fn bind(
        addr: SocketAddr,
        impairments: Impairments,
        role: &'static str,
    ) -> io::Result<Socket> {
        Self::bind_with_workers(addr, impairments, role, 1)
    }

    /// Like [`Socket::bind`], with the send system calls spread over `workers` threads
    /// (see [`crate::workers`]); 1 makes them on the owning task. Each worker sends on a
    /// socket of its own bound to the same address (`SO_REUSEPORT`), and every datagram
    /// that comes in goes to this one: viewers and peers see one address.
    pub fn bind_with_workers(
        addr: SocketAddr,
        impairments: Impairments,
        role: &'static str,
        workers: usize,
    ) -> io::Result<Socket> {
        let (std, workers) = if workers > 1 {
            let (main, senders) = bind_group(addr, workers)?;
            (main, Some(Workers::start(senders, role)?))
        } else {
            (bind_std(addr)?, None)
        };
        let inner = tokio::net::UdpSocket::from_std(std)?;
        Ok(Socket {
            inner,
            start: Instant::now(),
            unimpaired: impairments.default.is_noop() && impairments.links.is_empty(),
            impairments,
            links: HashMap::new(),
            delayed: BinaryHeap::new(),
            order: 0,
            outbox: Vec::with_capacity(sys::BATCH),
            rx_bufs: vec![[0; MAX_DATAGRAM]; sys::BATCH],
            rx_meta: Vec::with_capacity(sys::BATCH),
            stats: Stats::default(),
            role,
            quic: None,
            quic_rx: Vec::new(),
            workers,
            upstream: Vec::new(),
        })
    }

    /// Carries messages for QUIC peers over `quic` from now on; everything else still
    /// goes over UDP.
    pub fn attach_quic(&mut self, quic: Quic) {
        self.quic = Some(Box::new(quic));
    }

    /// The impairments of this socket's links, and the instant their outages count from
    /// (for a QUIC endpoint attached to it).
    pub fn impairments(&self) -> (&Impairments, Instant) {
        (&self.impairments, self.start)
    }

    /// The QUIC endpoint, if one is attached.
    pub fn quic(&self) -> Option<&Quic> {
        self.quic.as_deref()
    }

    /// The QUIC endpoint, if one is attached.
    pub fn quic_mut(&mut self) -> Option<&mut Quic> {
        self.quic.as_deref_mut()
    }

    /// Whether `peer` may act as a node: a QUIC peer must have proved it with a trusted
    /// certificate; over UDP the network key (checked by the codec) is the credential.
    pub fn is_node(&self, peer: SocketAddr) -> bool {
        self.quic
            .as_ref()
            .and_then(|q| q.is_node(peer))
            .unwrap_or(true)
    }

    /// QUIC connections that came up or went down since the last call.
    pub fn take_changes(&mut self) -> Vec<crate::quic::Change> {
        self.quic
            .as_mut()
            .map(|q| q.take_changes())
            .unwrap_or_default()
    }

    /// Hands a datagram whose impairment is done to QUIC or to the UDP outbox.
    fn release(&mut self, now: Instant, to: SocketAddr, bytes: Bytes, is_data: bool) {
        if let Some(q) = self.quic.as_mut().filter(|q| q.owns(to)) {
            q.send(now, to, bytes, is_data);
            return;
        }
        // With workers, each wake-up's datagrams go over in one batch per worker at
        // [`Socket::flush`]: handing over every 32 would wake a worker each time. What
        // goes upstream (subscriptions, NACKs: a few a second per peer, never media)
        // leaves on the task's own socket, so that a worker whose socket is full
        // (datagrams to slow viewers held in the host's own queue) cannot starve the
        // subscriptions and repairs that every viewer, on every worker, depends on.
        // Downstream, a destination's control stays in its worker's order with its
        // media (a skip notice comes between the packets it separates).
        // (Media never goes upstream: the bulk of the datagrams skips the lookup.)
        let upstream = !is_data && self.upstream.contains(&to);
        if let Some(w) = self.workers.as_mut().filter(|_| !upstream) {
            w.push(to, bytes);
            return;
        }
        self.outbox.push((to, bytes));
        if self.outbox.len() >= sys::BATCH {
            self.send_outbox();
        }
    }

    /// The node's upstream peers (an edge's set reflectors, a set reflector's entry
    /// points): with workers, what goes to them leaves on this task's socket.
    pub fn set_upstream(&mut self, peers: impl IntoIterator<Item = SocketAddr>) {
        self.upstream = peers.into_iter().collect();
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Counters (with the bytes sent over QUIC, when attached).
    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        if let Some(w) = &self.workers {
            let (sent, failed, bytes) = w.counts();
            s.sent += sent;
            s.send_failed += failed;
            s.sent_bytes += bytes;
        }
        if let Some(q) = &self.quic {
            s.sent_bytes += q.stats().sent_bytes;
        }
        s
    }

    /// Queues `bytes` for `to` through that link's impairment. `is_data` says whether it is
    /// media (for `data_only` impairments). Call [`Socket::flush`] to send.
    pub fn send(&mut self, now: Instant, to: SocketAddr, bytes: Bytes, is_data: bool) {
        if self.unimpaired {
            // The common case, and the fan-out's: no lookup per datagram.
            self.release(now, to, bytes, is_data);
            return;
        }
        let impairer = match self.links.get_mut(&to) {
            Some(i) => i,
            None => {
                let config = self.impairments.for_link(to);
                // Salted with both ends: two senders with one config to one receiver must
                // not lose the same packets.
                let salt = salt(self.inner.local_addr().ok(), to);
                self.links
                    .entry(to)
                    .or_insert(Impairer::new(config, self.start, salt))
            }
        };
        // QUIC links are impaired packet by packet under QUIC (`impaired_socket`), except
        // `data_only`, which only the sender can tell and is applied here.
        if impairer.is_noop()
            || (!impairer.data_only() && self.quic.as_ref().is_some_and(|q| q.owns(to)))
        {
            self.release(now, to, bytes, is_data);
            return;
        }
        match impairer.decide(now, bytes.len(), is_data) {
            Verdict::Drop(reason) => {
                self.stats.impaired += 1;
                metrics::counter!("braid_udp_impaired_total", "role" => self.role, "reason" => reason.name())
                    .increment(1);
            }
            Verdict::Send { at, copies } => {
                for _ in 0..copies {
                    if at <= now {
                        self.release(now, to, bytes.clone(), is_data);
                    } else {
                        self.order += 1;
                        self.delayed.push(Reverse(Delayed {
                            at,
                            order: self.order,
                            to,
                            bytes: bytes.clone(),
                            is_data,
                        }));
                    }
                }
            }
        }
    }

    /// Moves delayed datagrams that are due into the outbox and sends.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse(d)) = self.delayed.peek() {
            if d.at > now {
                break;
            }
            let Some(Reverse(d)) = self.delayed.pop() else {
                break;
            };
            self.release(now, d.to, d.bytes, d.is_data);
        }
        if let Some(q) = self.quic.as_mut() {
            q.handle_timeout(now);
        }
        self.flush();
    }

    /// When the next delayed datagram is due.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.delayed.peek().map(|Reverse(d)| d.at)
    }

    /// Sends everything queued, in `sendmmsg` batches (with workers, hands the media to
    /// them).
    /// A datagram the kernel will not take right now (send buffer full) is dropped and
    /// counted: a live stream does not wait.
    pub fn flush(&mut self) {
        if !self.outbox.is_empty() {
            self.send_outbox();
        }
        if let Some(q) = self.quic.as_mut() {
            q.flush(Instant::now());
        }
        if let Some(w) = self.workers.as_mut() {
            self.stats.send_failed += w.hand_over(self.role);
        }
    }

    /// Sends what is queued for the task's own socket.
    fn send_outbox(&mut self) {
        // Straight to the non-blocking socket, not through tokio's readiness: a socket
        // that has never been polled counts as not writable there, which would drop the
        // first datagrams a daemon sends (its first publish or subscribe).
        let (sent, failed, bytes) = send_counted(self.inner.as_raw_fd(), &self.outbox, self.role);
        self.stats.sent += sent;
        self.stats.send_failed += failed;
        self.stats.sent_bytes += bytes;
        self.outbox.clear();
    }

    /// How many threads make the send system calls (1: the owning task).
    pub fn workers(&self) -> usize {
        self.workers.as_ref().map_or(1, Workers::len)
    }

    /// Waits for datagrams and appends them to `out` (at most a batch). Each is copied
    /// into its own right-sized buffer so that a packet kept in a ring does not pin a
    /// whole receive batch.
    /// With QUIC attached, messages from QUIC peers come the same way; a call may also
    /// return with nothing when only a connection changed (see [`Socket::take_changes`]).
    pub async fn recv(&mut self, out: &mut Vec<(SocketAddr, Bytes)>) -> io::Result<()> {
        let Some(quic) = self.quic.as_mut() else {
            return recv_udp(
                &self.inner,
                &mut self.rx_bufs,
                &mut self.rx_meta,
                &mut self.stats,
                out,
            )
            .await;
        };
        let quic_rx = &mut self.quic_rx;
        let r = tokio::select! {
            r = recv_udp(&self.inner, &mut self.rx_bufs, &mut self.rx_meta, &mut self.stats, out) => r,
            () = quic.recv(quic_rx) => Ok(()),
        };
        out.append(&mut self.quic_rx);
        r
    }
}

/// Binds a non-blocking UDP socket to receive a source's bursts (a live encoder sends a
/// keyframe's datagrams at line rate): asks for a receive buffer of `want` bytes, beyond
/// `net.core.rmem_max` if the process may. Returns the socket and the buffer the kernel
/// granted.
pub fn bind_source(addr: SocketAddr, want: usize) -> io::Result<(std::net::UdpSocket, usize)> {
    // Linux reports twice what was set (the rest is its bookkeeping).
    let granted = |s: &socket2::Socket| s.recv_buffer_size().map(|n| n / 2);
    let s = new_udp(addr)?;
    let _ = s.set_recv_buffer_size(want);
    if granted(&s).unwrap_or(0) < want {
        use std::os::fd::AsRawFd;
        let _ = crate::sys::force_recv_buffer(s.as_raw_fd(), want);
    }
    let got = granted(&s)?;
    Ok((bind_nonblocking(s, addr)?, got))
}

/// Binds a non-blocking UDP socket with large buffers.
pub(crate) fn bind_std(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = new_udp(addr)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    bind_nonblocking(s, addr)
}

/// Sends `datagrams` on `fd` in `sendmmsg` batches, skipping (and counting in
/// `braid_udp_send_failed_total`) any the kernel will not take; adds the bytes to
/// `braid_udp_sent_bytes_total`. Returns the datagrams sent, those skipped, and the bytes.
pub(crate) fn send_counted(
    fd: std::os::fd::RawFd,
    datagrams: &[(SocketAddr, Bytes)],
    role: &'static str,
) -> (u64, u64, u64) {
    let msgs: Vec<(SocketAddr, &[u8])> = datagrams.iter().map(|(a, b)| (*a, &b[..])).collect();
    let failed = sys::send_all(fd, &msgs);
    if failed > 0 {
        metrics::counter!("braid_udp_send_failed_total", "role" => role).increment(failed);
    }
    let bytes: u64 = msgs.iter().map(|(_, b)| b.len() as u64).sum();
    metrics::counter!("braid_udp_sent_bytes_total", "role" => role).increment(bytes);
    (msgs.len() as u64 - failed, failed, bytes)
}

/// A group of `1 + senders` sockets bound to `addr` with `SO_REUSEPORT`: the first
/// receives everything that comes to the address, the others only send. An address
/// already bound by anyone is refused, as without the group (a second daemon started on
/// the same port must fail, not join the group unseen).
pub(crate) fn bind_group(
    addr: SocketAddr,
    senders: usize,
) -> io::Result<(std::net::UdpSocket, Vec<std::net::UdpSocket>)> {
    if addr.port() != 0 {
        // Bound and closed at once: fails if the address is taken.
        drop(bind_std(addr)?);
    }
    let grouped = |addr: SocketAddr| -> io::Result<std::net::UdpSocket> {
        let s = new_udp(addr)?;
        sys::reuse_port(s.as_raw_fd())?;
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        bind_nonblocking(s, addr)
    };
    let main = grouped(addr)?;
    sys::steer_to_first(main.as_raw_fd())?;
    let bound = main.local_addr()?;
    let others = (0..senders)
        .map(|_| grouped(bound))
        .collect::<io::Result<Vec<_>>>()?;
    Ok((main, others))
}

/// An unbound UDP socket of `addr`'s family, for its options to be set before binding.
fn new_udp(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
}

fn bind_nonblocking(s: socket2::Socket, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// One batch from the UDP socket (cancel-safe: nothing is read until it returns).
async fn recv_udp(
    inner: &tokio::net::UdpSocket,
    bufs: &mut [[u8; MAX_DATAGRAM]],
    meta: &mut Vec<Received>,
    stats: &mut Stats,
    out: &mut Vec<(SocketAddr, Bytes)>,
) -> io::Result<()> {
    loop {
        inner.readable().await?;
        let fd = inner.as_raw_fd();
        match inner.try_io(Interest::READABLE, || sys::recv_batch(fd, bufs, meta)) {
            Ok(_) => {
                for (i, r) in meta.iter().enumerate() {
                    out.push((r.from, Bytes::copy_from_slice(&bufs[i][..r.len])));
                }
                stats.received += meta.len() as u64;
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // ICMP port unreachable from an earlier send surfaces here on Linux; it
            // says nothing about this socket.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn salt(local: Option<SocketAddr>, to: SocketAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHasher with fixed keys is deterministic across runs.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(0, 0);
    local.hash(&mut h);
    to.hash(&mut h);
    h.finish()
}
