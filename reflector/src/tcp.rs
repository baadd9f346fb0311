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

/// Accepts viewers until shutdown.
pub(crate) async fn accept(
    listener: TcpListener,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let mut next_conn = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accepting a TCP viewer: {e}");
                    continue;
                }
            },
        };
        next_conn += 1;
        let _ = stream.set_nodelay(true);
        // Cap what the kernel queues for one viewer, so a viewer that stops reading is
        // noticed within about a second instead of after megabytes of autotuned buffer.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        tokio::spawn(connection(
            stream,
            peer,
            next_conn,
            events.clone(),
            shutdown.clone(),
        ));
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    conn: u64,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let (mut rd, wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    if events.send(Event::Open { conn, writer: tx }).await.is_err() {
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
                if w.write_all(&len.to_be_bytes()).await.is_err()
                    || w.write_all(&d[..usize::from(len)]).await.is_err()
                {
                    return;
                }
                // Media is what the machine counts against the queue.
                if d.get(1) == Some(&(braid_core::wire::Kind::Media as u8)) {
                    written += 1;
                }
                next = rx.try_recv().ok();
            }
            if w.flush().await.is_err() {
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
            r = rd.read_buf(&mut buf) => r,
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
