//! The impairment layer under QUIC: a wrapper of quinn's UDP socket that loses, delays,
//! reorders, duplicates and rate-limits QUIC's own packets, so QUIC's loss recovery,
//! congestion control and idle timeout meet the impaired link as they would a real one
//! (a lost packet may carry media datagrams, control stream data or acknowledgements).
//!
//! `data_only` impairments cannot be told apart in encrypted packets; they are applied
//! to media datagrams above QUIC instead (see [`crate::udp::Socket`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::impair::{Impairer, Verdict};
use crate::udp::Impairments;

/// quinn's socket with the impairments of this node's outgoing links on every packet.
#[derive(Debug)]
pub(crate) struct ImpairedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    impairments: Impairments,
    links: Mutex<HashMap<SocketAddr, Impairer>>,
    start: Instant,
    role: &'static str,
}

impl ImpairedSocket {
    /// Wraps `inner` when some link's impairment acts on whole packets; else returns it.
    pub(crate) fn wrap(
        inner: Arc<dyn AsyncUdpSocket>,
        impairments: &Impairments,
        start: Instant,
        role: &'static str,
    ) -> Arc<dyn AsyncUdpSocket> {
        let packet_level = |c: &crate::impair::Config| !c.is_noop() && !c.data_only;
        if !packet_level(&impairments.default)
            && !impairments.links.iter().any(|l| packet_level(&l.impair))
        {
            return inner;
        }
        Arc::new(ImpairedSocket {
            inner,
            impairments: impairments.clone(),
            links: Mutex::new(HashMap::new()),
            start,
            role,
        })
    }

    fn decide(&self, to: SocketAddr, len: usize) -> Option<Verdict> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let impairer = links.entry(to).or_insert_with(|| {
            let config = self.impairments.for_link(to);
            let salt = crate::udp::salt(self.inner.local_addr().ok(), to);
            Impairer::new(config, self.start, salt)
        });
        if impairer.is_noop() || impairer.data_only() {
            return None;
        }
        Some(impairer.decide(Instant::now(), len, true))
    }
}

impl AsyncUdpSocket for ImpairedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let now = Instant::now();
        match self.decide(transmit.destination, transmit.contents.len()) {
            None => self.inner.try_send(transmit),
            Some(Verdict::Drop(reason)) => {
                metrics::counter!("braid_udp_impaired_total", "role" => self.role, "reason" => reason.name())
                    .increment(1);
                Ok(())
            }
            Some(Verdict::Send { at, copies }) if at <= now => {
                for _ in 0..copies {
                    self.inner.try_send(transmit)?;
                }
                Ok(())
            }
            Some(Verdict::Send { at, copies }) => {
                // Held back: sent later from a timer; the packet is copied out.
                let inner = self.inner.clone();
                let role = self.role;
                let (destination, ecn, src_ip) =
                    (transmit.destination, transmit.ecn, transmit.src_ip);
                let contents = transmit.contents.to_vec();
                let segment_size = transmit.segment_size;
                tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    let t = Transmit {
                        destination,
                        ecn,
                        contents: &contents,
                        segment_size,
                        src_ip,
                    };
                    for _ in 0..copies {
                        // quinn is not there to see this one fail: count it as the UDP
                        // socket counts its own.
                        if inner.try_send(&t).is_err() {
                            metrics::counter!("braid_udp_send_failed_total", "role" => role)
                                .increment(1);
                        }
                    }
                });
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// One packet per send, so that each packet meets the impairment on its own.
    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
