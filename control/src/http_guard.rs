//! The control server's HTTP connections, bounded: at most [`MAX_CONNS`] open and
//! [`MAX_PER_IP`] from one address (more are closed at once and counted), each closed
//! after [`IDLE`] without a byte from the client, so idle connections cannot hold every
//! descriptor and starve the API.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use braid_core::node::LogLimit;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Most HTTP connections open at once (well under a default 1,024 descriptors)…
pub const MAX_CONNS: usize = 512;
/// … and from one IP address.
pub const MAX_PER_IP: usize = 64;
/// A connection that sends nothing this long is closed (a request's headers, or the
/// next request on a kept-alive connection).
pub const IDLE: Duration = Duration::from_secs(10);

/// A listener that keeps to [`MAX_CONNS`] and backs off on accept errors.
pub struct Bounded {
    listener: TcpListener,
    slots: braid_net::limit::Slots,
    refused_log: LogLimit,
    error_log: LogLimit,
}

impl Bounded {
    /// Wraps `listener`.
    pub fn new(listener: TcpListener) -> Bounded {
        Bounded {
            listener,
            slots: braid_net::limit::Slots::new(MAX_CONNS, MAX_PER_IP),
            refused_log: LogLimit::default(),
            error_log: LogLimit::default(),
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        let mut backoff = Duration::ZERO;
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    let permit = match self.slots.take(peer.ip()) {
                        Ok(slot) => slot,
                        Err(reason) => {
                            metrics::counter!("braid_control_http_refused_total", "reason" => reason)
                                .increment(1);
                            if let Some(n) = self.refused_log.allow(Instant::now(), LOG_EVERY) {
                                tracing::warn!(%peer, "HTTP connection refused: too many open ({reason}; {n} refused since the last such line)");
                            }
                            continue;
                        }
                    };
                    return (Guarded::new(stream, permit), peer);
                }
                Err(e) => {
                    metrics::counter!("braid_control_http_accept_errors_total").increment(1);
                    if let Some(n) = self.error_log.allow(Instant::now(), LOG_EVERY) {
                        tracing::warn!(
                            "accepting an HTTP connection: {e} ({n} since the last such line; backing off)"
                        );
                    }
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

const LOG_EVERY: Duration = Duration::from_secs(10);

/// A connection holding its slot, closed when the client is silent for [`IDLE`].
pub struct Guarded {
    stream: TcpStream,
    _slot: braid_net::limit::Slot,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl Guarded {
    fn new(stream: TcpStream, slot: braid_net::limit::Slot) -> Guarded {
        Guarded {
            stream,
            _slot: slot,
            idle: Box::pin(tokio::time::sleep(IDLE)),
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + IDLE;
                    self.idle.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    metrics::counter!("braid_control_http_idle_closed_total").increment(1);
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing for 10 s",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
