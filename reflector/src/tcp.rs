//! TCP viewers, for viewers behind firewalls that pass no UDP (seed 002).
//!
//! Each connection gets a reader task, which decodes the viewer's framed messages and
//! hands them to the edge's main task, and a writer task, which writes the media datagrams
//! the main task queues for it, framed. The queue is bounded: when a viewer reads too
//! slowly it fills, the main task stops advancing that viewer's cursor, and the ring
//! eventually overtakes it (counted, and the viewer moved to the latest keyframe). One
//! slow viewer never holds up another.

use std::net::SocketAddr;

use braid_core::wire::{Codec, Message};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Datagrams queued per TCP viewer before it counts as slow.
pub(crate) const QUEUE: usize = 256;

/// Kernel send buffer per TCP viewer: about half a second of a 4 Mbps stream.
const SEND_BUFFER: usize = 256 * 1024;

/// What the connection tasks tell the main task.
pub(crate) enum Event {
    /// A viewer's message, with the queue that reaches it.
    Message {
        conn: u64,
        peer: SocketAddr,
        msg: Message,
        writer: mpsc::Sender<Bytes>,
    },
    /// The connection closed.
    Gone { conn: u64 },
    /// Something undecodable arrived; the connection was closed.
    Malformed { reason: &'static str },
}

/// Accepts viewers until shutdown.
pub(crate) async fn accept(
    listener: TcpListener,
    codec: Codec,
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
            codec.clone(),
            events.clone(),
            shutdown.clone(),
        ));
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    conn: u64,
    codec: Codec,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let (mut rd, wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let writer_shutdown = shutdown.clone();
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::new(wr);
        loop {
            let first = tokio::select! {
                _ = writer_shutdown.cancelled() => return,
                d = rx.recv() => match d { Some(d) => d, None => return },
            };
            let mut next = Some(first);
            while let Some(d) = next {
                let len = u16::try_from(d.len()).unwrap_or(u16::MAX);
                if w.write_all(&len.to_be_bytes()).await.is_err()
                    || w.write_all(&d[..usize::from(len)]).await.is_err()
                {
                    return;
                }
                next = rx.try_recv().ok();
            }
            if w.flush().await.is_err() {
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
            match codec.decode_frame(&mut buf) {
                Ok(Some(msg)) => {
                    let ev = Event::Message {
                        conn,
                        peer,
                        msg,
                        writer: tx.clone(),
                    };
                    if events.send(ev).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = events.send(Event::Malformed { reason: e.reason() }).await;
                    writer.abort();
                    let _ = events.send(Event::Gone { conn }).await;
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
    let _ = events.send(Event::Gone { conn }).await;
}
