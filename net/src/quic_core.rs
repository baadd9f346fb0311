//! QUIC connections without I/O: one `quinn_proto::Endpoint` and its connections, driven
//! by whoever owns the socket (the daemon's task), so that no connection needs a task,
//! a channel or a transmit buffer of its own (issue 16: memory per QUIC viewer).
//!
//! The owner feeds it what the socket received ([`Core::handle`]), what to send
//! ([`Core::send_datagram`], [`Core::send_control`]), and the time ([`Core::handle_timeout`]
//! when [`Core::poll_timeout`] falls due); it takes back what to put on the wire
//! ([`Core::flush`], one transmit buffer for every connection) and what happened
//! ([`Core::take_events`]).
//!
//! - **Media as DATAGRAMs**; **control** on one unidirectional stream per direction,
//!   each message framed by a 2-byte length (`braid_core::wire::split_frame`).
//! - **Accepting**: an address that has not proved it receives our packets is sent a
//!   Retry first, so spoofed Initials cannot take a victim's slots; then at most
//!   `max_per_ip` connections from one IP address; more are refused.
//! - **Timers**: one heap for every connection, entries invalidated lazily (a connection's
//!   deadline moves on every packet; a stale entry costs one no-op `handle_timeout`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ClientConfig, ConnectError, Connection, ConnectionError, ConnectionHandle, DatagramEvent, Dir,
    Endpoint, EndpointConfig, Event, SendDatagramError, ServerConfig, StreamEvent, StreamId,
    Transmit, VarInt, WriteError,
};

/// Datagrams one transmit may carry (segmentation offload), as quinn's driver allows.
pub const MAX_SEGMENTS: usize = 10;
/// Datagrams one connection may put out per [`Core::flush`] before others get their turn.
const MAX_TRANSMITS_PER_FLUSH: usize = 20;
/// Control messages waiting for a connection's stream to take them.
pub const CONTROL_QUEUE: usize = 1024;
/// Bytes read from a control stream at a time.
const READ_CHUNK: usize = 16 * 1024;

/// What happened on the endpoint, in order. `ch` names the connection, `peer` its
/// address, `dialed` whether this endpoint dialed it.
#[allow(missing_docs)] // The fields are named as above.
#[derive(Debug)]
pub enum CoreEvent {
    /// A connection finished its handshake. `node`: we dialed it (it passed our trust
    /// check as a server), or it proved itself with a client certificate.
    Up {
        ch: ConnectionHandle,
        peer: SocketAddr,
        dialed: bool,
        node: bool,
    },
    /// A datagram or a control message.
    Message(ConnectionHandle, SocketAddr, Bytes),
    /// A connection ended: `up` says whether it had finished its handshake.
    Down {
        ch: ConnectionHandle,
        peer: SocketAddr,
        dialed: bool,
        up: bool,
        reason: ConnectionError,
    },
    /// An incoming connection was refused for its address's limit.
    Refused { peer: SocketAddr },
    /// An incoming connection failed before it was a connection (`accept` refused it).
    AcceptFailed {
        peer: SocketAddr,
        reason: ConnectionError,
    },
    /// A control stream sent a frame that does not parse: the connection is closed.
    BadFrame { peer: SocketAddr },
    /// `count` control messages that will never be sent (the stream or connection failed).
    ControlLost { peer: SocketAddr, count: u64 },
}

/// Why a control message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlError {
    /// No such connection.
    Closed,
    /// [`CONTROL_QUEUE`] messages are already waiting.
    Full,
    /// Over 65,535 bytes: it cannot be framed.
    TooLarge,
}

struct Conn {
    q: Connection,
    peer: SocketAddr,
    generation: u64,
    dialed: bool,
    up: bool,
    /// The per-IP slot an accepted connection holds, given back when it is drained.
    slot: Option<IpAddr>,
    /// Our control stream, opened once the connection is up.
    out: Option<StreamId>,
    /// Framed control messages the stream has not taken yet (empty: no allocation).
    backlog: VecDeque<Bytes>,
    /// An unfinished frame per peer stream (a control message split across reads).
    partial: Vec<(StreamId, BytesMut)>,
    /// The deadline of this connection's live entry in the timer heap.
    armed: Option<Instant>,
    touched: bool,
}

/// One QUIC endpoint's connections, without I/O.
pub struct Core {
    endpoint: Endpoint,
    server: Option<Arc<ServerConfig>>,
    /// Boxed: a connection's state is several KiB, and a table of them inline would keep
    /// a slack of empty slots as large (and move every one as it grows).
    conns: HashMap<ConnectionHandle, Box<Conn>>,
    generation: u64,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    touched: Vec<ConnectionHandle>,
    events: Vec<CoreEvent>,
    per_ip: HashMap<IpAddr, usize>,
    max_per_ip: usize,
    /// The one transmit buffer, and one for the endpoint's own responses.
    tx: Vec<u8>,
    resp: Vec<u8>,
    segments: usize,
    last_now: Option<Instant>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("connections", &self.conns.len())
            .field("timers", &self.timers.len())
            .finish()
    }
}

impl Core {
    /// An endpoint that accepts connections when `server` is given (at most `max_per_ip`
    /// from one IP address) and can always dial; transmits carry up to `segments`
    /// datagrams (1 when the socket cannot offload segmentation).
    pub fn new(server: Option<ServerConfig>, max_per_ip: usize, segments: usize) -> Core {
        let server = server.map(Arc::new);
        Core {
            endpoint: Endpoint::new(
                Arc::new(EndpointConfig::default()),
                server.clone(),
                false,
                None,
            ),
            server,
            conns: HashMap::new(),
            generation: 0,
            timers: BinaryHeap::new(),
            touched: Vec::new(),
            events: Vec::new(),
            per_ip: HashMap::new(),
            max_per_ip,
            tx: Vec::new(),
            resp: Vec::new(),
            segments: segments.clamp(1, MAX_SEGMENTS),
            last_now: None,
        }
    }

    /// Connections open (handshaking, up or closing).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// quinn-proto needs time that never goes backwards.
    fn clock(&mut self, now: Instant) -> Instant {
        let now = self.last_now.map_or(now, |l| l.max(now));
        self.last_now = Some(now);
        now
    }

    fn insert(&mut self, ch: ConnectionHandle, q: Connection, dialed: bool, slot: Option<IpAddr>) {
        self.generation += 1;
        let peer = q.remote_address();
        self.conns.insert(
            ch,
            Box::new(Conn {
                q,
                peer,
                generation: self.generation,
                dialed,
                up: false,
                slot,
                out: None,
                backlog: VecDeque::new(),
                partial: Vec::new(),
                armed: None,
                touched: false,
            }),
        );
        self.touch(ch);
    }

    fn touch(&mut self, ch: ConnectionHandle) {
        if let Some(c) = self.conns.get_mut(&ch) {
            mark(ch, c, &mut self.touched);
        }
    }

    /// Dials `peer`; its first packets leave at the next [`Core::flush`].
    pub fn connect(
        &mut self,
        now: Instant,
        config: ClientConfig,
        peer: SocketAddr,
        server_name: &str,
    ) -> Result<ConnectionHandle, ConnectError> {
        let now = self.clock(now);
        let (ch, q) = self.endpoint.connect(now, config, peer, server_name)?;
        self.insert(ch, q, true, None);
        Ok(ch)
    }

    /// One datagram the socket received from `from`. Whatever the endpoint answers by
    /// itself (a Retry, a refusal, a stateless reset) goes to `send` at once.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local_ip: Option<IpAddr>,
        data: BytesMut,
        send: &mut dyn FnMut(&Transmit, &[u8]),
    ) {
        let now = self.clock(now);
        self.resp.clear();
        match self
            .endpoint
            .handle(now, from, local_ip, None, data, &mut self.resp)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(c) = self.conns.get_mut(&ch) {
                    c.q.handle_event(ev);
                    self.touch(ch);
                }
            }
            Some(DatagramEvent::Response(t)) => send(&t, &self.resp[..t.size]),
            Some(DatagramEvent::NewConnection(incoming)) => {
                let ip = from.ip();
                self.resp.clear();
                if !incoming.remote_address_validated() && incoming.may_retry() {
                    if let Ok(t) = self.endpoint.retry(incoming, &mut self.resp) {
                        send(&t, &self.resp[..t.size]);
                    }
                    return;
                }
                let n = self.per_ip.get(&ip).copied().unwrap_or(0);
                if n >= self.max_per_ip {
                    let t = self.endpoint.refuse(incoming, &mut self.resp);
                    send(&t, &self.resp[..t.size]);
                    self.events.push(CoreEvent::Refused { peer: from });
                    return;
                }
                match self
                    .endpoint
                    .accept(incoming, now, &mut self.resp, self.server.clone())
                {
                    Ok((ch, q)) => {
                        *self.per_ip.entry(ip).or_insert(0) += 1;
                        self.insert(ch, q, false, Some(ip));
                    }
                    Err(e) => {
                        if let Some(t) = e.response {
                            send(&t, &self.resp[..t.size]);
                        }
                        self.events.push(CoreEvent::AcceptFailed {
                            peer: from,
                            reason: e.cause,
                        });
                    }
                }
            }
            None => {}
        }
    }

    /// Queues a media datagram on connection `ch`; `None` when there is no such
    /// connection. A full send buffer refuses it (`Blocked`): live media does not push
    /// out what is already queued.
    pub fn send_datagram(
        &mut self,
        ch: ConnectionHandle,
        bytes: Bytes,
    ) -> Option<Result<(), SendDatagramError>> {
        let c = self.conns.get_mut(&ch)?;
        let r = c.q.datagrams().send(bytes, false);
        if r.is_ok() {
            mark(ch, c, &mut self.touched);
        }
        Some(r)
    }

    /// The largest datagram connection `ch` carries now, if any.
    pub fn max_datagram(&mut self, ch: ConnectionHandle) -> Option<usize> {
        self.conns.get_mut(&ch)?.q.datagrams().max_size()
    }

    /// Queues a control message on connection `ch`'s stream, framed by its length.
    pub fn send_control(&mut self, ch: ConnectionHandle, msg: &[u8]) -> Result<(), ControlError> {
        let len = u16::try_from(msg.len()).map_err(|_| ControlError::TooLarge)?;
        let c = self.conns.get_mut(&ch).ok_or(ControlError::Closed)?;
        if c.backlog.len() >= CONTROL_QUEUE {
            return Err(ControlError::Full);
        }
        let mut framed = BytesMut::with_capacity(2 + msg.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(msg);
        c.backlog.push_back(framed.freeze());
        write_backlog(c, &mut self.events);
        mark(ch, c, &mut self.touched);
        Ok(())
    }

    /// Closes connection `ch` (its peer is told; it is gone once drained).
    pub fn close(&mut self, now: Instant, ch: ConnectionHandle, code: u32, reason: &'static [u8]) {
        let now = self.clock(now);
        if let Some(c) = self.conns.get_mut(&ch) {
            c.q.close(now, VarInt::from_u32(code), Bytes::from_static(reason));
            self.touch(ch);
        }
    }

    /// Closes every connection.
    pub fn close_all(&mut self, now: Instant, code: u32, reason: &'static [u8]) {
        let chs: Vec<ConnectionHandle> = self.conns.keys().copied().collect();
        for ch in chs {
            self.close(now, ch, code, reason);
        }
    }

    /// The round trip and congestion window of connection `ch`, if it exists.
    pub fn path(&self, ch: ConnectionHandle) -> Option<(std::time::Duration, u64)> {
        let s = self.conns.get(&ch)?.q.stats();
        Some((s.path.rtt, s.path.cwnd))
    }

    /// The earliest time a connection's timer falls due.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, ch, generation))) = self.timers.peek().copied() {
            let live = self
                .conns
                .get(&ConnectionHandle(ch))
                .is_some_and(|c| c.generation == generation && c.armed == Some(at));
            if live {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    /// Runs the timers due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.clock(now);
        while let Some(Reverse((at, ch, generation))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let ch = ConnectionHandle(ch);
            let Some(c) = self.conns.get_mut(&ch) else {
                continue;
            };
            if c.generation != generation || c.armed != Some(at) {
                continue;
            }
            c.armed = None;
            c.q.handle_timeout(now);
            self.touch(ch);
        }
    }

    /// Drives every connection something happened to: its events, what it tells the
    /// endpoint, and its packets, each transmit handed to `send` (`Transmit::size` bytes,
    /// in datagrams of `segment_size` when set).
    pub fn flush(&mut self, now: Instant, send: &mut dyn FnMut(&Transmit, &[u8])) {
        let now = self.clock(now);
        let mut rounds = 0;
        while !self.touched.is_empty() && rounds < 4 {
            rounds += 1;
            let touched = std::mem::take(&mut self.touched);
            for ch in touched {
                self.drive(now, ch, send);
            }
        }
    }

    fn drive(
        &mut self,
        now: Instant,
        ch: ConnectionHandle,
        send: &mut dyn FnMut(&Transmit, &[u8]),
    ) {
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        c.touched = false;
        // What the connection tells the endpoint (identifiers to issue or retire).
        endpoint_events(&mut self.endpoint, ch, c);
        while let Some(ev) = c.q.poll() {
            app_event(now, ch, c, ev, &mut self.events);
        }
        let mut sent = 0;
        loop {
            self.tx.clear();
            let Some(t) = c.q.poll_transmit(now, self.segments, &mut self.tx) else {
                break;
            };
            send(&t, &self.tx[..t.size]);
            sent += t.size.div_ceil(t.segment_size.unwrap_or(t.size).max(1));
            if sent >= MAX_TRANSMITS_PER_FLUSH {
                // Others get their turn; this one is driven again.
                mark(ch, c, &mut self.touched);
                break;
            }
        }
        // Events the transmit raised (a close sent, endpoint events).
        endpoint_events(&mut self.endpoint, ch, c);
        if c.q.is_drained() {
            if let Some(ip) = c.slot {
                if let Some(n) = self.per_ip.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_ip.remove(&ip);
                    }
                }
            }
            self.conns.remove(&ch);
            return;
        }
        if let Some(at) = c.q.poll_timeout() {
            if c.armed.is_none_or(|a| at < a) {
                c.armed = Some(at);
                self.timers.push(Reverse((at, ch.0, c.generation)));
            }
        }
        if self.timers.len() > 2 * self.conns.len() + 1024 {
            self.timers = self
                .conns
                .iter()
                .filter_map(|(ch, c)| c.armed.map(|a| Reverse((a, ch.0, c.generation))))
                .collect();
        }
    }

    /// Moves what happened since the last call to the end of `into`.
    pub fn take_events(&mut self, into: &mut Vec<CoreEvent>) {
        into.append(&mut self.events);
    }
}

/// Queues connection `ch` to be driven at the next flush, once.
fn mark(ch: ConnectionHandle, c: &mut Conn, touched: &mut Vec<ConnectionHandle>) {
    if !c.touched {
        c.touched = true;
        touched.push(ch);
    }
}

/// Hands the endpoint what connection `ch` tells it (identifiers to issue or retire, its
/// end), and the connection what the endpoint answers.
fn endpoint_events(endpoint: &mut Endpoint, ch: ConnectionHandle, c: &mut Conn) {
    while let Some(ev) = c.q.poll_endpoint_events() {
        if let Some(ce) = endpoint.handle_event(ch, ev) {
            c.q.handle_event(ce);
        }
    }
}

/// Writes what the control stream takes of the backlog.
fn write_backlog(c: &mut Conn, events: &mut Vec<CoreEvent>) {
    let Some(id) = c.out else {
        return;
    };
    while let Some(front) = c.backlog.front_mut() {
        match c.q.send_stream(id).write(front) {
            Ok(n) if n == front.len() => {
                c.backlog.pop_front();
            }
            Ok(n) => {
                let _ = front.split_to(n);
                return;
            }
            Err(WriteError::Blocked) => return,
            Err(_) => {
                let count = c.backlog.len() as u64;
                c.backlog.clear();
                events.push(CoreEvent::ControlLost {
                    peer: c.peer,
                    count,
                });
                return;
            }
        }
    }
}

fn app_event(
    now: Instant,
    ch: ConnectionHandle,
    c: &mut Conn,
    ev: Event,
    events: &mut Vec<CoreEvent>,
) {
    match ev {
        Event::Connected => {
            c.up = true;
            let node = c.dialed
                || c.q
                    .crypto_session()
                    .peer_identity()
                    .and_then(|i| {
                        i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                            .ok()
                    })
                    .is_some_and(|certs| !certs.is_empty());
            c.out = c.q.streams().open(Dir::Uni);
            events.push(CoreEvent::Up {
                ch,
                peer: c.peer,
                dialed: c.dialed,
                node,
            });
            write_backlog(c, events);
        }
        Event::ConnectionLost { reason } => {
            if !c.backlog.is_empty() {
                events.push(CoreEvent::ControlLost {
                    peer: c.peer,
                    count: c.backlog.len() as u64,
                });
                c.backlog.clear();
            }
            events.push(CoreEvent::Down {
                ch,
                peer: c.peer,
                dialed: c.dialed,
                up: c.up,
                reason,
            });
        }
        Event::DatagramReceived => {
            while let Some(d) = c.q.datagrams().recv() {
                events.push(CoreEvent::Message(ch, c.peer, d));
            }
        }
        Event::Stream(StreamEvent::Available { dir: Dir::Uni }) if c.out.is_none() && c.up => {
            c.out = c.q.streams().open(Dir::Uni);
            write_backlog(c, events);
        }
        Event::Stream(StreamEvent::Writable { id }) if Some(id) == c.out => {
            write_backlog(c, events);
        }
        Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
            while let Some(id) = c.q.streams().accept(Dir::Uni) {
                read_stream(now, ch, c, id, events);
            }
        }
        Event::Stream(StreamEvent::Readable { id }) => read_stream(now, ch, c, id, events),
        _ => {}
    }
}

/// Reads what a peer's control stream holds, into messages.
fn read_stream(
    now: Instant,
    ch: ConnectionHandle,
    c: &mut Conn,
    id: StreamId,
    events: &mut Vec<CoreEvent>,
) {
    let mut buf = match c.partial.iter().position(|(s, _)| *s == id) {
        Some(i) => c.partial.swap_remove(i).1,
        None => BytesMut::new(),
    };
    let mut stream = c.q.recv_stream(id);
    let Ok(mut chunks) = stream.read(true) else {
        return;
    };
    let mut finished = false;
    loop {
        match chunks.next(READ_CHUNK) {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                finished = true;
                break;
            }
            Err(_) => break,
        }
    }
    let _ = chunks.finalize();
    loop {
        match braid_core::wire::split_frame(&mut buf) {
            Ok(Some(m)) => events.push(CoreEvent::Message(ch, c.peer, m)),
            Ok(None) => break,
            Err(_) => {
                events.push(CoreEvent::BadFrame { peer: c.peer });
                c.q.close(now, VarInt::from_u32(1), Bytes::from_static(b"bad frame"));
                return;
            }
        }
    }
    if !finished && !buf.is_empty() {
        c.partial.push((id, buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic::{Congestion, RECEIVE_WINDOW, STREAM_RECEIVE_WINDOW, transport};
    use crate::tls::{Tls, make_dev_certs};
    use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    use std::time::Duration;

    /// Certificates for nodes `names`, signed by one CA, in a fresh directory.
    fn certs(tag: &str, names: &[&str]) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("braid-quic-core-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        make_dev_certs(&d, &names, &[]).unwrap();
        d
    }

    fn tls(d: &std::path::Path, name: &str) -> Tls {
        Tls {
            cert: Some(d.join(format!("{name}.pem"))),
            key: Some(d.join(format!("{name}.key"))),
            ca: Some(d.join("ca.pem")),
            ..Tls::default()
        }
    }

    fn server(t: &Tls) -> ServerConfig {
        let crypto = QuicServerConfig::try_from(t.server_config().unwrap().unwrap()).unwrap();
        let mut s = ServerConfig::with_crypto(Arc::new(crypto));
        s.transport_config(transport(1452, Congestion::Cubic));
        s.migration(false);
        s
    }

    fn client(t: &Tls) -> ClientConfig {
        let mut c = ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(t.client_config().unwrap()).unwrap(),
        ));
        c.transport_config(transport(1452, Congestion::Cubic));
        c
    }

    /// Endpoints joined by a wire that delivers at the next millisecond, in virtual time.
    struct Net {
        nodes: Vec<(SocketAddr, Core)>,
        now: Instant,
        wire: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
        /// Packets to and from these addresses are lost.
        cut: Vec<SocketAddr>,
        events: Vec<(SocketAddr, CoreEvent)>,
    }

    impl Net {
        fn new(nodes: Vec<(SocketAddr, Core)>) -> Net {
            Net {
                nodes,
                #[allow(clippy::disallowed_methods)] // One real instant to count from.
                now: Instant::now(),
                wire: Vec::new(),
                cut: Vec::new(),
                events: Vec::new(),
            }
        }

        fn core(&mut self, addr: SocketAddr) -> &mut Core {
            &mut self.nodes.iter_mut().find(|(a, _)| *a == addr).unwrap().1
        }

        /// Runs `d` of virtual time in 1 ms steps.
        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(1);
                let now = self.now;
                let wire = std::mem::take(&mut self.wire);
                for (to, from, bytes) in wire {
                    if self.cut.contains(&to) || self.cut.contains(&from) {
                        continue;
                    }
                    let Some((_, core)) = self.nodes.iter_mut().find(|(a, _)| *a == to) else {
                        continue;
                    };
                    core.handle(now, from, None, BytesMut::from(&bytes[..]), &mut |t, b| {
                        self.wire.push((t.destination, to, b.to_vec()));
                    });
                }
                for (addr, core) in self.nodes.iter_mut() {
                    if core.poll_timeout().is_some_and(|t| t <= now) {
                        core.handle_timeout(now);
                    }
                    let from = *addr;
                    let wire = &mut self.wire;
                    core.flush(now, &mut |t, b| {
                        let seg = t.segment_size.unwrap_or(t.size);
                        for d in b.chunks(seg) {
                            wire.push((t.destination, from, d.to_vec()));
                        }
                    });
                    let mut events = Vec::new();
                    core.take_events(&mut events);
                    self.events.extend(events.into_iter().map(|e| (from, e)));
                }
            }
        }

        fn messages(&mut self, at: SocketAddr) -> Vec<(SocketAddr, Bytes)> {
            let mut out = Vec::new();
            self.events.retain(|(a, e)| match e {
                CoreEvent::Message(_, from, m) if *a == at => {
                    out.push((*from, m.clone()));
                    false
                }
                _ => true,
            });
            out
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Node `a` dialed node `b` (a listener; `a` too when `a_listens`), 50 ms on: the
    /// certificates' directory, the network, both addresses and `a`'s connection.
    fn dialed(
        name: &str,
        a_listens: bool,
    ) -> (
        std::path::PathBuf,
        Net,
        SocketAddr,
        SocketAddr,
        ConnectionHandle,
    ) {
        let d = certs(name, &["a", "b"]);
        let (ta, tb) = (tls(&d, "a"), tls(&d, "b"));
        let (a, b) = (addr(1), addr(2));
        let mut net = Net::new(vec![
            (
                a,
                Core::new(a_listens.then(|| server(&ta)), 8, MAX_SEGMENTS),
            ),
            (b, Core::new(Some(server(&tb)), 8, MAX_SEGMENTS)),
        ]);
        let now = net.now;
        let ca = net
            .core(a)
            .connect(now, client(&ta), b, "127.0.0.1")
            .unwrap();
        net.run(Duration::from_millis(50));
        (d, net, a, b, ca)
    }

    fn up(events: &[(SocketAddr, CoreEvent)], at: SocketAddr) -> Option<(ConnectionHandle, bool)> {
        events.iter().find_map(|(a, e)| match e {
            CoreEvent::Up { ch, node, .. } if *a == at => Some((*ch, *node)),
            _ => None,
        })
    }

    #[test]
    fn one_connection_carries_datagrams_and_control_both_ways() {
        let (d, mut net, a, b, ca) = dialed("both", true);
        let (_, a_sees_b_node) = up(&net.events, a).expect("the dialer is up");
        let (cb, b_sees_a_node) = up(&net.events, b).expect("the listener is up");
        assert!(a_sees_b_node, "a dialed b and b passed its trust check");
        assert!(b_sees_a_node, "a presented a certificate the CA signed");
        net.core(a).send_control(ca, b"hello").unwrap();
        for i in 0..50u8 {
            net.core(b)
                .send_datagram(cb, Bytes::from(vec![i; 1300]))
                .expect("connected")
                .unwrap();
        }
        net.run(Duration::from_millis(50));
        assert_eq!(net.messages(b), vec![(a, Bytes::from_static(b"hello"))]);
        let got = net.messages(a);
        assert_eq!(got.len(), 50, "every datagram arrives");
        assert!(got.iter().all(|(from, m)| *from == b && m.len() == 1300));
        let _ = std::fs::remove_dir_all(d);
    }

    /// A connection whose peer acknowledges nothing holds at most its send buffer of
    /// media (256 KiB); what comes beyond is refused, for the caller to count, and what is
    /// queued is not pushed out by newer datagrams.
    #[test]
    fn a_full_send_buffer_refuses_media_beyond_it() {
        let (d, mut net, a, b, _) = dialed("full", false);
        let (cb, _) = up(&net.events, b).expect("up");
        net.cut.push(a);
        let (mut queued, mut refused) = (0, 0);
        for i in 0..400u32 {
            let m = Bytes::from(vec![i as u8; 1300]);
            match net.core(b).send_datagram(cb, m).expect("connected") {
                Ok(()) => queued += 1,
                Err(SendDatagramError::Blocked(_)) => refused += 1,
                Err(e) => panic!("{e}"),
            }
            net.run(Duration::from_millis(1));
        }
        // 256 KiB of 1,300-byte datagrams, and the few the congestion window let out.
        assert!((190..=220).contains(&queued), "{queued} queued");
        assert_eq!(queued + refused, 400);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_vanished_peer_is_noticed_by_its_idle_timeout() {
        let (d, mut net, a, b, _) = dialed("idle", false);
        assert!(up(&net.events, b).is_some());
        // Keep-alives hold an idle connection up.
        net.run(Duration::from_secs(3));
        assert!(
            !net.events
                .iter()
                .any(|(_, e)| matches!(e, CoreEvent::Down { .. }))
        );
        net.cut.push(a);
        let cut_at = net.now;
        net.run(Duration::from_millis(1500));
        let down = net.events.iter().find(|(at, e)| {
            *at == b
                && matches!(
                    e,
                    CoreEvent::Down {
                        up: true,
                        reason: ConnectionError::TimedOut,
                        ..
                    }
                )
        });
        assert!(down.is_some(), "{:?}", net.events);
        assert!(net.now - cut_at <= Duration::from_millis(1500));
        net.run(Duration::from_secs(5));
        assert_eq!(net.core(b).connections(), 0, "the connection is forgotten");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn connections_over_an_address_limit_are_refused_and_a_bad_frame_closes() {
        let d = certs("limit", &["a", "b"]);
        let (ta, tb) = (tls(&d, "a"), tls(&d, "b"));
        let (a1, a2, b) = (addr(1), addr(3), addr(2));
        let mut net = Net::new(vec![
            (a1, Core::new(None, 8, MAX_SEGMENTS)),
            (a2, Core::new(None, 8, MAX_SEGMENTS)),
            (b, Core::new(Some(server(&tb)), 1, MAX_SEGMENTS)),
        ]);
        let now = net.now;
        let c1 = net
            .core(a1)
            .connect(now, client(&ta), b, "127.0.0.1")
            .unwrap();
        net.run(Duration::from_millis(50));
        let now = net.now;
        net.core(a2)
            .connect(now, client(&ta), b, "127.0.0.1")
            .unwrap();
        net.run(Duration::from_millis(50));
        assert!(
            net.events
                .iter()
                .any(|(at, e)| *at == b && matches!(e, CoreEvent::Refused { peer } if *peer == a2))
        );
        assert!(
            net.events
                .iter()
                .any(|(at, e)| *at == a2 && matches!(e, CoreEvent::Down { up: false, .. }))
        );
        assert_eq!(net.core(b).connections(), 1);
        // An empty frame breaks the control stream: the listener closes the connection.
        net.core(a1).send_control(c1, b"").unwrap();
        net.run(Duration::from_millis(50));
        assert!(
            net.events
                .iter()
                .any(|(at, e)| *at == b && matches!(e, CoreEvent::BadFrame { .. }))
        );
        assert!(
            net.events
                .iter()
                .any(|(at, e)| *at == a1 && matches!(e, CoreEvent::Down { up: true, .. }))
        );
        // Its slot is given back once it is drained: the other address's dial now works.
        net.run(Duration::from_secs(2));
        let now = net.now;
        net.core(a2)
            .connect(now, client(&ta), b, "127.0.0.1")
            .unwrap();
        net.events.clear();
        net.run(Duration::from_millis(50));
        assert!(up(&net.events, b).is_some(), "{:?}", net.events);
        let _ = std::fs::remove_dir_all(d);
    }

    /// What a peer can make the listener hold for it in stream data (data it has not read:
    /// a stream's bytes that wait for a lost packet before them) is bounded by the
    /// windows it advertises. A hostile peer opens every stream it may and fills each
    /// with the wire to the listener cut, the most it could ever park there.
    #[test]
    fn a_peer_can_park_at_most_the_receive_window_in_stream_data() {
        let (d, mut net, a, b, ca) = dialed("window", false);
        assert!(up(&net.events, b).is_some());
        net.cut.push(b);
        let q = &mut net.core(a).conns.get_mut(&ca).unwrap().q;
        let chunk = vec![7u8; 16 * 1024];
        let mut accepted = 0usize;
        while let Some(id) = q.streams().open(Dir::Uni) {
            let mut s = q.send_stream(id);
            while let Ok(n) = s.write(&chunk) {
                accepted += n;
                if n == 0 || accepted > 64 << 20 {
                    break;
                }
            }
        }
        assert!(
            accepted <= RECEIVE_WINDOW as usize,
            "{accepted} bytes of stream data accepted for the listener to hold"
        );
        assert!(accepted >= STREAM_RECEIVE_WINDOW as usize, "{accepted}");
        let _ = std::fs::remove_dir_all(d);
    }
}
