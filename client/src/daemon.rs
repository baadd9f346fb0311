//! The client daemon: one task that owns the sockets (UDP with QUIC attached, and a TCP
//! connection to the edge over TCP), the clock, the output and the HTTP to the control
//! servers, feeds the [`Session`] and does what it says. It decides nothing.
#![allow(clippy::disallowed_methods)] // The daemon owns the clock.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::node::{Output, Peer, WallClock};
use braid_core::wire::Codec;
use braid_net::udp::{Impairments, Socket};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::{self, Assignment};
use crate::session::{Event, Input, Refusal, Request, Session, Stats};
use crate::{Config, Transport};

/// How the client reaches its edges: a UDP socket (with QUIC attached unless the
/// transport is UDP), which also carries probes; over TCP, a connection to the edge
/// watched, made when the session first sends to it.
struct Link {
    transport: Transport,
    socket: Socket,
    /// Edges (by the UDP address the control server names them by) to their QUIC address.
    quic: HashMap<SocketAddr, SocketAddr>,
    tcp: Option<(SocketAddr, tokio::net::tcp::OwnedWriteHalf)>,
    tcp_rx: Option<mpsc::Receiver<Bytes>>,
}

impl Link {
    fn new(config: &Config) -> anyhow::Result<Link> {
        let mut socket =
            Socket::bind(config.bind, Impairments::default(), "client").context("binding")?;
        let mut quic = HashMap::new();
        if matches!(config.transport, Transport::Auto | Transport::Quic) {
            let bind = SocketAddr::new(config.bind.ip(), 0);
            let q = braid_net::quic::Quic::bind(&config.quic, bind, &config.tls, "client")
                .context("starting QUIC")?;
            socket.attach_quic(q);
            if let (Some(q), Some(e)) = (socket.quic_mut(), config.edge.filter(|e| e.is_quic())) {
                q.add_dial(e.addr);
                quic.insert(e.addr, e.addr);
            }
        }
        Ok(Link {
            transport: config.transport,
            socket,
            quic,
            tcp: None,
            tcp_rx: None,
        })
    }

    /// Takes note of the candidates' QUIC addresses (QUIC links only).
    fn learn(&mut self, a: &Assignment) {
        let Some(q) = self.socket.quic_mut() else {
            return;
        };
        for c in &a.candidates {
            if let Some(addr) = c.quic {
                q.add_dial(addr);
                self.quic.insert(c.addr, addr);
            }
        }
    }

    async fn send(&mut self, edge: SocketAddr, datagram: Bytes) -> anyhow::Result<()> {
        match self.transport {
            Transport::Tcp => {
                if self.tcp.as_ref().is_none_or(|(e, _)| *e != edge) {
                    self.connect_tcp(edge).await?;
                }
                let mut framed = BytesMut::with_capacity(datagram.len() + 2);
                framed.put_u16(datagram.len() as u16);
                framed.put_slice(&datagram);
                if let Some((_, w)) = self.tcp.as_mut() {
                    // A dead edge's connection fails here; the stall detector moves us on.
                    if let Err(e) = w.write_all(&framed).await {
                        tracing::debug!("writing to edge {edge}: {e}");
                    }
                }
            }
            t => {
                if t == Transport::Quic && !self.quic.contains_key(&edge) {
                    anyhow::bail!(
                        "edge {edge} offers no QUIC address: give --edge quic://ADDR, or --transport auto or udp"
                    );
                }
                let to = self.quic.get(&edge).copied().unwrap_or(edge);
                self.socket.send(Instant::now(), to, datagram, false);
            }
        }
        Ok(())
    }

    async fn connect_tcp(&mut self, edge: SocketAddr) -> anyhow::Result<()> {
        self.tcp = None;
        let stream = tokio::net::TcpStream::connect(edge)
            .await
            .with_context(|| format!("connecting to edge {edge} over TCP"))?;
        let _ = stream.set_nodelay(true);
        let (mut rd, writer) = stream.into_split();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                loop {
                    match braid_core::wire::split_frame(&mut buf) {
                        Ok(Some(m)) => {
                            if tx.send(m).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("the edge's TCP stream is broken ({e}): closing");
                            return;
                        }
                    }
                }
            }
        });
        self.tcp = Some((edge, writer));
        self.tcp_rx = Some(rx);
        Ok(())
    }

    /// Receives what came, naming QUIC edges by the address the control server knows
    /// them by (TCP: `None`, the edge watched).
    async fn recv(&mut self, out: &mut Vec<(Option<SocketAddr>, Bytes)>) -> anyhow::Result<()> {
        let mut v = Vec::new();
        tokio::select! {
            res = self.socket.recv(&mut v) => {
                res.context("receiving")?;
                let quic = &self.quic;
                out.extend(v.into_iter().map(|(a, b)| {
                    let edge = quic.iter().find(|(_, q)| **q == a).map_or(a, |(e, _)| *e);
                    (Some(edge), b)
                }));
            }
            m = async { self.tcp_rx.as_mut().expect("guarded").recv().await }, if self.tcp_rx.is_some() => match m {
                Some(b) => {
                    out.push((None, b));
                    while let Some(Ok(b)) = self.tcp_rx.as_mut().map(mpsc::Receiver::try_recv) {
                        out.push((None, b));
                    }
                }
                // The edge went away: let the stall detector move us.
                None => self.tcp_rx = None,
            },
        }
        Ok(())
    }
}

/// Watches the stream until `--duration` passes, the edge refuses with nowhere else to
/// go, or `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A viewer holds no network key: it signs with the public viewer key.
    let codec = Codec::viewer();
    let mut viewer = (!config.controls.is_empty()).then(|| control::Viewer {
        controls: config.controls.clone(),
        client: config.id,
        stream: config.stream,
        token: config.token.clone(),
        region: config.region.clone(),
    });
    let mut link = Link::new(&config)?;
    let mut out: Box<dyn Write> = if config.out.as_os_str() == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&config.out)
                .with_context(|| format!("creating {}", config.out.display()))?,
        ))
    };
    let mut stats_out: Option<Box<dyn Write>> = match &config.stats_json {
        Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stderr())),
        Some(p) => Some(Box::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let stall = config.stall_at()?.map(|(at, len)| {
        (
            started + Duration::from_secs_f64(at),
            started + Duration::from_secs_f64(at + len),
        )
    });
    let clock = WallClock::new(started, braid_net::daemon::unix_ms());
    let mut session = Session::new(
        config.session(),
        codec,
        clock,
        config.transport.name(),
        started,
    )?;
    let (answers_tx, mut answers_rx) = mpsc::channel::<(u64, Result<Assignment, Refusal>)>(16);
    // A token that expires is renewed at a control server halfway to its expiry (a
    // minute before at the latest), and again every 5 s until one answers.
    let (renew_tx, mut renew_rx) = mpsc::channel::<Result<(String, u64), Refusal>>(1);
    let unix_now = || braid_net::daemon::unix_ms() / 1000;
    // (A token good for longer than an Instant can count is never renewed.)
    let renew_deadline = |expires: u64| {
        let at = control::renew_at(unix_now(), expires);
        Instant::now().checked_add(Duration::from_secs(at.saturating_sub(unix_now())))
    };
    let mut next_renew: Option<Instant> = viewer
        .as_ref()
        .and_then(|v| braid_core::token::peek(&v.token).ok())
        .and_then(|c| renew_deadline(c.expires));
    let mut rx: Vec<(Option<SocketAddr>, Bytes)> = Vec::new();
    let mut result = Ok(());
    'run: loop {
        // Do everything the session asked for, then wait for what comes next.
        let deadline = loop {
            match session.poll_output() {
                Output::Transmit(t) => {
                    if let Peer::Addr(edge) = t.to {
                        if let Err(e) = link.send(edge, t.datagram).await {
                            result = Err(e);
                            break 'run;
                        }
                    }
                }
                Output::Event(Event::Write { payload, .. }) => {
                    out.write_all(&payload).context("writing the stream")?;
                }
                Output::Event(Event::Request { id, request }) => {
                    let Some(v) = viewer.clone() else { continue };
                    let tx = answers_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let r = match request {
                            Request::Assign => control::assign(&v),
                            Request::Switch {
                                failed,
                                reason,
                                last_seq,
                                prefer,
                            } => control::switch(&v, failed, &reason, last_seq, prefer),
                            Request::Feedback { probes } => {
                                control::feedback(&v, &probes, 0);
                                return;
                            }
                        };
                        let _ = tx.blocking_send((id, r));
                    });
                }
                Output::Event(Event::Probe { to, datagram }) => {
                    link.socket.send(Instant::now(), to, datagram, false);
                }
                Output::Event(Event::Stats) => report(session.stats(), tty, stats_out.as_mut())?,
                Output::Event(Event::Done(r)) => {
                    result = r.map_err(anyhow::Error::msg);
                    break 'run;
                }
                Output::Timeout(t) => break t,
            }
        };
        link.socket.flush();
        // Packets leave as they are released, not when a buffer fills.
        out.flush().context("writing the stream")?;
        if let Some((from, until)) = stall {
            let now = Instant::now();
            if now >= from && now < until {
                // A frozen viewer (testing): it reads nothing and says nothing.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
                continue;
            }
        }
        let wake = match (deadline, link.socket.next_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = braid_net::daemon::sleep_until(next_renew), if next_renew.is_some() => {
                next_renew = Some(Instant::now() + Duration::from_secs(5));
                if let Some(v) = viewer.clone() {
                    let tx = renew_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.blocking_send(control::renew(&v));
                    });
                }
            }
            Some(renewed) = renew_rx.recv() => match renewed {
                Ok((token, expires)) => {
                    tracing::info!("token renewed until {expires} (Unix time)");
                    session.handle_input(Instant::now(), Input::Token(Bytes::from(token.clone())));
                    if let Some(v) = viewer.as_mut() {
                        v.token = token;
                    }
                    next_renew = renew_deadline(expires);
                }
                Err(e) => tracing::warn!("renewing the token: {e:?} (trying again in 5 s)"),
            },
            _ = braid_net::daemon::sleep_until(wake) => {
                let now = Instant::now();
                link.socket.handle_timeout(now);
                session.handle_timeout(now);
            }
            Some((id, result)) = answers_rx.recv() => {
                if let Ok(a) = &result {
                    link.learn(a);
                }
                session.handle_input(Instant::now(), Input::Answer { id, result });
            }
            res = link.recv(&mut rx) => {
                res?;
                let now = Instant::now();
                for (from, datagram) in rx.drain(..) {
                    session.handle_input(now, Input::Received { from, datagram });
                }
            }
        }
    }
    out.flush().context("writing the stream")?;
    // Leave at once rather than let the lease lapse.
    session.close();
    loop {
        match session.poll_output() {
            Output::Transmit(t) => {
                if let Peer::Addr(edge) = t.to {
                    let _ = link.send(edge, t.datagram).await;
                }
            }
            Output::Event(_) => {}
            Output::Timeout(_) => break,
        }
    }
    link.socket.flush();
    if tty {
        eprintln!();
    }
    report(session.stats(), false, stats_out.as_mut())?;
    result
}

fn report(s: &Stats, tty: bool, json: Option<&mut Box<dyn Write>>) -> anyhow::Result<()> {
    if tty {
        let rendition = s.rendition.as_ref().map_or(String::new(), |r| {
            format!(
                "  rendition {} ({} kbps, {} changes)",
                r.index,
                r.kbps,
                s.renditions.len().saturating_sub(1)
            )
        });
        eprint!(
            "\r{:>8.2} Mbps  buffer {:>4} pkts  {:>9} packets  gaps {:>5}  skips {:>3}  switches {:>2}  from {} ({}){rendition}   ",
            s.bitrate_bps as f64 / 1e6,
            s.buffered,
            s.packets,
            s.gaps,
            s.skips,
            s.switches.len(),
            s.edge,
            s.transport
        );
    }
    if let Some(out) = json {
        writeln!(out, "{}", serde_json::to_string(s)?)?;
        out.flush()?;
    }
    Ok(())
}
