//! TCP viewers, for viewers behind firewalls that pass no UDP (seed 002).
//!
//! Each connection gets a reader task, which splits the viewer's framed messages and
//! hands them to the edge's main task, and a writer task, which writes the datagrams the
//! main task queues for it, framed, and says how many it wrote. The edge machine counts
//! the media queued per connection (`edge::TCP_QUEUE` at most): when a viewer reads too
//! slowly its queue fills, the machine stops advancing that viewer's cursor, and the ring
//! eventually overtakes it (counted, and the viewer moved to the latest keyframe). One
//! slow viewer never holds up another. Notices are not counted against the queue; the
//! channel has room for them beyond the media.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_core::node::LogLimit;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Room in a connection's channel: the media the machine allows, and notices beyond it.
const QUEUE: usize = crate::edge::TCP_QUEUE + 64;

/// Kernel send buffer per TCP viewer: about half a second of a 4 Mbps stream.
const SEND_BUFFER: usize = 256 * 1024;

/// What the connection tasks tell the main task.
pub(crate) enum Event {
    /// A new connection, with the queue that reaches it.
    Open {
        conn: u64,
        peer: SocketAddr,
        writer: mpsc::Sender<Bytes>,
    },
    /// A viewer's message, as framed.
    Message { conn: u64, message: Bytes },
    /// The writer wrote `count` media datagrams.
    Drained { conn: u64, count: usize },
    /// The connection closed; `reason` when it was broken by a bad frame.
    Gone {
        conn: u64,
        reason: Option<&'static str>,
    },
}

/// Most TCP viewer connections open at once, and from one IP address.
const MAX_CONNS: usize = 4096;
const MAX_PER_IP: usize = 32;
/// A connection that sends nothing this long is closed (a viewer refreshes its watch at
/// least every second).
const IDLE: Duration = Duration::from_secs(10);
/// A connection whose writes make no progress this long is not reading: closed.
const STUCK: Duration = Duration::from_secs(5);

/// Accepts viewers until shutdown, at most [`MAX_CONNS`] at once and [`MAX_PER_IP`]
/// from one address; accept errors (out of file descriptors, say) back off.
pub(crate) async fn accept(
    listener: TcpListener,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let mut next_conn = 0u64;
    let slots = braid_net::limit::Slots::new(MAX_CONNS, MAX_PER_IP);
    let (mut refused_log, mut error_log) = (LogLimit::default(), LogLimit::default());
    let mut backoff = Duration::ZERO;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    metrics::counter!("braid_tcp_accept_errors_total").increment(1);
                    if let Some(n) = error_log.allow(Instant::now(), LOG_EVERY) {
                        tracing::warn!("accepting a TCP viewer: {e} ({n} accept errors since the last such line; backing off)");
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    continue;
                }
            },
        };
        backoff = Duration::ZERO;
        let slot = match slots.take(peer.ip()) {
            Ok(s) => s,
            Err(reason) => {
                metrics::counter!("braid_tcp_refused_total", "reason" => reason).increment(1);
                if let Some(n) = refused_log.allow(Instant::now(), LOG_EVERY) {
                    tracing::warn!(%peer, "TCP viewer refused: too many connections ({reason}; {n} refused since the last such line)");
                }
                drop(stream);
                continue;
            }
        };
        next_conn += 1;
        let _ = stream.set_nodelay(true);
        // Cap what the kernel queues for one viewer, so a viewer that stops reading is
        // noticed within about a second instead of after megabytes of autotuned buffer.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let (events, shutdown) = (events.clone(), shutdown.clone());
        tokio::spawn(async move {
            connection(stream, peer, next_conn, events, shutdown).await;
            drop(slot);
        });
    }
}

/// How often a warning anyone can provoke is logged (each is counted).
const LOG_EVERY: Duration = Duration::from_secs(10);

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    conn: u64,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let (mut rd, wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    if events
        .send(Event::Open {
            conn,
            peer,
            writer: tx,
        })
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(%peer, conn, "TCP viewer connected");
    let writer_shutdown = shutdown.clone();
    let drained = events.clone();
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::new(wr);
        loop {
            let first = tokio::select! {
                _ = writer_shutdown.cancelled() => return,
                d = rx.recv() => match d { Some(d) => d, None => return },
            };
            let mut next = Some(first);
            let mut written = 0;
            while let Some(d) = next {
                let len = u16::try_from(d.len()).unwrap_or(u16::MAX);
                let write = async {
                    w.write_all(&len.to_be_bytes()).await?;
                    w.write_all(&d[..usize::from(len)]).await
                };
                // A viewer that stops reading for good is closed, not held.
                match tokio::time::timeout(STUCK, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        metrics::counter!("braid_tcp_closed_total", "reason" => "not_reading")
                            .increment(1);
                        return;
                    }
                }
                // Media is what the machine counts against the queue.
                if d.get(1) == Some(&(braid_core::wire::Kind::Media as u8)) {
                    written += 1;
                }
                next = rx.try_recv().ok();
            }
            if !matches!(tokio::time::timeout(STUCK, w.flush()).await, Ok(Ok(()))) {
                return;
            }
            if written > 0
                && drained
                    .send(Event::Drained {
                        conn,
                        count: written,
                    })
                    .await
                    .is_err()
            {
                return;
            }
        }
    });
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => break,
            // The writer gave up on a viewer that does not read: the connection ends.
            _ = async { while !writer.is_finished() { tokio::time::sleep(Duration::from_millis(250)).await } } => break,
            r = tokio::time::timeout(IDLE, rd.read_buf(&mut buf)) => match r {
                Ok(r) => r,
                Err(_) => {
                    metrics::counter!("braid_tcp_closed_total", "reason" => "idle").increment(1);
                    break;
                }
            },
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        loop {
            match braid_core::wire::split_frame(&mut buf) {
                Ok(Some(message)) => {
                    if events.send(Event::Message { conn, message }).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    writer.abort();
                    let reason = Some(e.reason());
                    let _ = events.send(Event::Gone { conn, reason }).await;
                    return;
                }
            }
        }
        // A viewer sends small control messages; a frame never needs more than this.
        if buf.len() > 2 * braid_core::wire::MAX_MESSAGE {
            break;
        }
    }
    writer.abort();
    let _ = events.send(Event::Gone { conn, reason: None }).await;
}
