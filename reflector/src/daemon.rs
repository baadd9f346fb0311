//! The reflector daemon: one task that owns the UDP socket (with QUIC attached), the TCP
//! viewers' queues and the clock, feeds the role's machine ([`SetReflector`] or
//! [`Edge`]) and sends what it says. It decides nothing about the stream.
#![allow(clippy::disallowed_methods)] // The daemon owns the clock.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use braid_core::node::{Output, Peer, WallClock};
use braid_core::wire::Codec;
use braid_core::{Bitrate, DataSize};
use braid_net::addr::PeerAddr;
use braid_net::udp::Socket;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::common::{Counters, StreamReport};
use crate::edge::{self, Edge};
use crate::set::{self, SetReflector};
use crate::{Config, Role, tcp};
use braid_net::report;

enum Machine {
    Set(Box<SetReflector>),
    Edge(Box<Edge>),
}

impl Machine {
    fn received(&mut self, now: Instant, from: Peer, datagram: Bytes, node: bool) {
        match (self, from) {
            (Machine::Set(m), Peer::Addr(from)) => m.handle_input(
                now,
                set::Input::Received {
                    from,
                    datagram,
                    node,
                },
            ),
            (Machine::Set(_), Peer::Conn(_)) => {}
            (Machine::Edge(m), from) => m.handle_input(
                now,
                edge::Input::Received {
                    from,
                    datagram,
                    node,
                },
            ),
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Machine::Set(m) => m.handle_timeout(now),
            Machine::Edge(m) => m.handle_timeout(now),
        }
    }

    fn poll_output(&mut self) -> Output<Infallible> {
        match self {
            Machine::Set(m) => m.poll_output(),
            Machine::Edge(m) => m.poll_output(),
        }
    }

    fn counters(&self) -> &Counters {
        match self {
            Machine::Set(m) => m.counters(),
            Machine::Edge(m) => m.counters(),
        }
    }

    fn reports(&self) -> Vec<StreamReport> {
        match self {
            Machine::Set(m) => m.reports(),
            Machine::Edge(m) => m.reports(),
        }
    }

    /// Closed streams' last figures, once (edges: a stream closes while media flows).
    fn take_closed(&mut self) -> Vec<StreamReport> {
        match self {
            Machine::Set(_) => Vec::new(),
            Machine::Edge(m) => m.take_closed(),
        }
    }
}

/// Binds the UDP socket and, for an edge, the TCP listener for viewers on the same
/// address and port number. With port 0 the kernel picks the UDP port, which TCP may
/// already use: then another UDP port is tried (at most 20).
async fn bind(
    config: &Config,
    role_name: &'static str,
) -> anyhow::Result<(Socket, Option<tokio::net::TcpListener>)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let socket = Socket::bind_with_workers(
            config.listen,
            config.impair.clone(),
            role_name,
            config.send_workers(),
        )
        .with_context(|| format!("binding {}", config.listen))?;
        if config.role != Role::Edge {
            return Ok((socket, None));
        }
        let udp_addr = socket.local_addr()?;
        match tokio::net::TcpListener::bind(udp_addr).await {
            Ok(l) => return Ok((socket, Some(l))),
            Err(e) if config.listen.port() == 0 && attempt < 20 => {
                tracing::debug!("TCP port {udp_addr} taken ({e}); trying another");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("binding TCP {udp_addr} for viewers"));
            }
        }
    }
}

/// Runs the reflector until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    use crate::DaemonConfig;
    config.validate()?;
    let codec = Codec::new(braid_net::daemon::network_key(&config.network_key)?);
    let role_name = config.role.name();
    let (mut socket, tcp_listener) = bind(&config, role_name).await?;
    // An edge with a certificate serves viewers over QUIC whether or not a QUIC port is
    // given: on an ephemeral port of its UDP address's IP, reported to the control server.
    let mut quic_options = config.quic.clone();
    if config.role == Role::Edge && config.tls.has_identity() && quic_options.listen.is_none() {
        quic_options.listen = Some(SocketAddr::new(config.listen.ip(), 0));
    }
    let quic_addr = braid_net::daemon::start_quic(
        &mut socket,
        &quic_options,
        &config.tls,
        role_name,
        &config.reflectors,
    )?;
    // Entry points dial their set reflectors; a set reflector only knows them as QUIC
    // peers, so the two never dial each other at once.
    if let Some(q) = socket.quic_mut() {
        for u in config.upstreams.iter().filter(|u| u.is_quic()) {
            q.add_known(u.addr);
        }
    }
    let metrics_addr = braid_net::daemon::serve_metrics(config.metrics, shutdown.clone()).await?;
    let udp_addr = socket.local_addr()?;
    let mut ready = vec![
        ("udp", udp_addr.to_string()),
        ("metrics", metrics_addr.to_string()),
        ("workers", socket.workers().to_string()),
        ("task_threads", config.task_threads.to_string()),
    ];
    if let Some(q) = quic_addr {
        ready.push(("quic", q.to_string()));
    }
    let (tcp_tx, mut tcp_rx) = mpsc::channel::<tcp::Event>(1024);
    if config.role == Role::Edge {
        let listener = tcp_listener.context("an edge has a TCP listener")?;
        ready.push(("tcp", listener.local_addr()?.to_string()));
        tokio::spawn(tcp::accept(listener, tcp_tx, shutdown.clone()));
    } else {
        drop(tcp_tx);
    }
    // HLS (edges with --hls-listen): the handlers ask this task, which owns the machine;
    // `progress` tells waiting ones that a part was completed.
    let (hls_tx, mut hls_rx) = mpsc::channel::<crate::hls::Ask>(256);
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(0u64);
    let mut hls_addr = None;
    if let (Role::Edge, Some(addr)) = (config.role, config.hls_listen) {
        let tokens = (!config.token_secret.is_empty())
            .then(|| braid_core::token::Signer::new(&config.token_secret));
        let ladders = config
            .ladders()?
            .iter()
            .map(|l| l.iter().map(|(s, _)| *s).collect())
            .collect();
        let bound = crate::hls::serve(
            addr,
            hls_tx.clone(),
            progress_rx,
            (tokens, ladders),
            shutdown.clone(),
        )
        .await?;
        ready.push(("hls", bound.to_string()));
        hls_addr = Some(bound);
    }
    braid_net::daemon::print_ready(role_name, &ready);
    let shared = Arc::new(report::Shared::default());
    report::spawn(
        config.controls.clone(),
        report::Identity {
            node: config.node_id,
            role: role_name,
            addr: udp_addr,
            quic: quic_addr,
            hls: hls_addr,
            learn_quic: config.tls.has_identity(),
            region: config.region.clone(),
            capacity: config.max_viewers as u64,
            cost_tier: config.cost_tier,
            ladders: config
                .ladders()?
                .iter()
                .map(|l| l.iter().map(|(s, bps)| (s.0, bps / 1000)).collect())
                .collect(),
            auth: braid_core::nodeauth::NodeAuth::new(&braid_net::daemon::network_key(
                &config.network_key,
            )?),
        },
        shared.clone(),
        shutdown.clone(),
    );
    let now = Instant::now();
    let mut machine = match config.role {
        Role::Set => Machine::Set(Box::new(SetReflector::new(config.set_config()?, codec)?)),
        Role::Edge => {
            let clock = WallClock::new(now, braid_net::daemon::unix_ms());
            Machine::Edge(Box::new(Edge::new(config.edge_config()?, codec, clock)?))
        }
    };
    let upstream: Vec<SocketAddr> = (config.reflectors.iter())
        .chain(&config.upstreams)
        .map(|p| p.addr)
        .collect();
    socket.set_upstream(upstream.iter().copied());
    let mut d = Daemon {
        socket,
        writers: HashMap::new(),
        tcp_peers: HashMap::new(),
        shared,
        egress_mark: (now, 0),
        upstream_configured: upstream,
        learned: Vec::new(),
        role: role_name,
        exported_drops: 0,
        released: HashMap::new(),
    };
    let mut rx = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut deadline = None;
    loop {
        let wake = earliest(deadline, d.socket.next_timeout());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            res = d.socket.recv(&mut rx) => {
                res.context("receiving")?;
                let now = Instant::now();
                for (from, datagram) in rx.drain(..) {
                    let node = d.socket.is_node(from);
                    machine.received(now, Peer::Addr(from), datagram, node);
                }
                d.handle_changes(now, &mut machine);
            }
            _ = braid_net::daemon::sleep_until(wake) => {
                let now = Instant::now();
                d.socket.handle_timeout(now);
                machine.handle_timeout(now);
            }
            Some(ev) = tcp_rx.recv() => {
                let now = Instant::now();
                d.handle_tcp(now, &mut machine, ev);
                while let Ok(ev) = tcp_rx.try_recv() {
                    d.handle_tcp(now, &mut machine, ev);
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                d.socket.handle_timeout(now);
                d.control_plane(now, &mut machine);
                export(d.role, &mut machine);
            }
            Some(ask) = hls_rx.recv() => {
                if let Machine::Edge(m) = &mut machine {
                    let answer = if m.hls_interest(Instant::now(), ask.stream) {
                        crate::hls::answer(
                            m.hls(ask.stream),
                            m.stream_unknown(ask.stream),
                            &ask.what,
                        )
                    } else {
                        crate::hls::Answer::Refused
                    };
                    let _ = ask.reply.send(answer);
                }
            }
        }
        deadline = d.drive(&mut machine);
        if let (Some(_), Machine::Edge(m)) = (config.hls_listen, &machine) {
            let p = m.hls_progress();
            if p != *progress_tx.borrow() {
                progress_tx.send_replace(p);
            }
        }
    }
    if let Machine::Edge(m) = &mut machine {
        m.leave();
    }
    d.drive(&mut machine);
    export(d.role, &mut machine);
    if let Some(q) = d.socket.quic_mut() {
        q.close();
    }
    tracing::info!("reflector stopped");
    Ok(())
}

/// What the loop owns besides the machine.
struct Daemon {
    socket: Socket,
    /// TCP viewers' queues, by connection.
    writers: HashMap<u64, mpsc::Sender<Bytes>>,
    /// TCP viewers' addresses, by connection.
    tcp_peers: HashMap<u64, SocketAddr>,
    shared: Arc<report::Shared>,
    /// (when, bytes sent then), for the egress rate.
    egress_mark: (Instant, u64),
    /// The upstream peers configured (`--reflector`, `--upstream`).
    upstream_configured: Vec<SocketAddr>,
    /// The set reflectors last given to the machine from the control server.
    learned: Vec<PeerAddr>,
    role: &'static str,
    exported_drops: u64,
    /// Packets each stream had released at the last report, for its rate.
    released: HashMap<u32, u64>,
}

impl Daemon {
    /// Sends everything the machine queued; returns when to wake it next.
    fn drive(&mut self, machine: &mut Machine) -> Option<Instant> {
        let now = Instant::now();
        let deadline = loop {
            match machine.poll_output() {
                Output::Transmit(t) => match t.to {
                    Peer::Addr(to) => self.socket.send(now, to, t.datagram, t.data),
                    Peer::Conn(c) => {
                        let sent = self
                            .writers
                            .get(&c)
                            .is_some_and(|w| w.try_send(t.datagram).is_ok());
                        if !sent {
                            metrics::counter!("braid_dropped_total", "role" => self.role, "reason" => "tcp_queue_full").increment(1);
                        }
                    }
                },
                Output::Event(e) => match e {},
                Output::Timeout(t) => break t,
            }
        };
        self.socket.flush();
        // Drops are told at once (hostile input shows in the metrics as it happens); the
        // rest every tick.
        let drops = machine.counters().drops.total();
        if drops != self.exported_drops {
            self.exported_drops = drops;
            braid_net::daemon::export_drops(self.role, &machine.counters().drops);
        }
        deadline
    }

    /// Tells the machine about QUIC connections that went up or down.
    fn handle_changes(&mut self, now: Instant, machine: &mut Machine) {
        for c in self.socket.take_changes() {
            match (c, &mut *machine) {
                (braid_net::quic::Change::Up { peer, .. }, Machine::Edge(m)) => {
                    m.handle_input(now, edge::Input::PeerUp(peer));
                }
                (braid_net::quic::Change::Down { peer, .. }, Machine::Edge(m)) => {
                    m.handle_input(now, edge::Input::PeerDown(peer));
                }
                (braid_net::quic::Change::Down { peer, .. }, Machine::Set(m)) => {
                    m.handle_input(now, set::Input::PeerDown(peer));
                }
                (braid_net::quic::Change::Up { .. }, Machine::Set(_)) => {}
            }
        }
    }

    fn handle_tcp(&mut self, now: Instant, machine: &mut Machine, ev: tcp::Event) {
        let Machine::Edge(m) = machine else {
            return;
        };
        match ev {
            tcp::Event::Open { conn, peer, writer } => {
                self.writers.insert(conn, writer);
                self.tcp_peers.insert(conn, peer);
            }
            tcp::Event::Message { conn, message } => m.handle_input(
                now,
                edge::Input::Received {
                    from: Peer::Conn(conn),
                    datagram: message,
                    node: false,
                },
            ),
            tcp::Event::Drained { conn, count } => {
                m.handle_input(now, edge::Input::ConnDrained { conn, count });
            }
            tcp::Event::Gone { conn, reason } => {
                self.writers.remove(&conn);
                self.tcp_peers.remove(&conn);
                m.handle_input(now, edge::Input::ConnGone { conn, reason });
            }
        }
    }

    /// Shares load with the reporter thread, and passes on what the control servers
    /// said: drained or not, the live set reflectors.
    fn control_plane(&mut self, now: Instant, machine: &mut Machine) {
        let viewers = match machine {
            Machine::Edge(m) => m.viewers(),
            Machine::Set(_) => 0,
        };
        self.shared.viewers.store(viewers as u64, Ordering::Relaxed);
        let (t0, b0) = self.egress_mark;
        let elapsed = now.saturating_duration_since(t0);
        if elapsed >= Duration::from_secs(1) {
            let bytes = self.socket.stats().sent_bytes;
            let bps = Bitrate::from_size_over(DataSize(bytes.saturating_sub(b0)), elapsed);
            self.shared.egress_bps.store(bps.0, Ordering::Relaxed);
            self.egress_mark = (now, bytes);
            let mut reports = machine.reports();
            reports.sort_by_key(|r| std::cmp::Reverse(r.merge.released));
            let secs = elapsed.as_secs_f64();
            let released: HashMap<u32, u64> =
                reports.iter().map(|r| (r.id.0, r.merge.released)).collect();
            let summary: Vec<serde_json::Value> = reports
                .iter()
                .take(report::REPORT_STREAMS)
                .map(|st| {
                    let before = self
                        .released
                        .get(&st.id.0)
                        .copied()
                        .unwrap_or(st.merge.released);
                    let bps = (st.merge.released.saturating_sub(before) as f64 * 1316.0 * 8.0
                        / secs) as u64;
                    stream_summary(st, bps)
                })
                .collect();
            self.released = released;
            if let Ok(mut s) = self.shared.streams.lock() {
                *s = summary;
            }
        }
        let Machine::Edge(m) = machine else {
            return;
        };
        if elapsed >= Duration::from_secs(1) {
            // Slow viewers, for the control servers to place on low-cost edges.
            let slow: Vec<serde_json::Value> = m
                .speeds(now)
                .into_iter()
                .filter(|v| v.slow)
                .take(report::REPORT_SLOW)
                .map(|v| {
                    let ip = match v.peer {
                        Peer::Addr(a) => Some(a.ip()),
                        Peer::Conn(c) => self.tcp_peers.get(&c).map(|a| a.ip()),
                    };
                    serde_json::json!({
                        "client": v.client.0,
                        "ip": ip,
                        "stream": v.stream.0,
                        "bps": v.bps,
                    })
                })
                .collect();
            if let Ok(mut s) = self.shared.slow.lock() {
                *s = slow;
            }
        }
        let drain = self.shared.drain.load(Ordering::Relaxed);
        if drain != m.draining() {
            m.handle_input(now, edge::Input::Drain(drain));
        }
        let listed = match self.shared.reflectors.lock() {
            Ok(r) if *r != self.learned => r.clone(),
            _ => return,
        };
        if let Some(q) = self.socket.quic_mut() {
            for r in listed.iter().filter(|r| r.is_quic()) {
                if !m.reflectors().contains(&r.addr) {
                    q.add_dial(r.addr);
                }
            }
        }
        m.handle_input(
            now,
            edge::Input::Reflectors(listed.iter().map(|r| r.addr).collect()),
        );
        let configured = self.upstream_configured.iter().copied();
        self.socket
            .set_upstream(configured.chain(listed.iter().map(|r| r.addr)));
        self.learned = listed;
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    crate::common::earliest(a, b)
}

/// Exports the machine's counters and every stream's merge and path counters.
fn export(role: &'static str, machine: &mut Machine) {
    // A stream closed since the last export gets its last figures, so what it released
    // and what it dropped at the close (`braid_dropped_total{reason="stream_closed"}`)
    // add up to what arrived.
    let closed = machine.take_closed();
    let machine = &*machine;
    let c = machine.counters();
    braid_net::daemon::export_drops(role, &c.drops);
    let by_role = |name: &'static str, v: u64| {
        metrics::counter!(name, "role" => role).absolute(v);
    };
    by_role("braid_retransmit_sent_total", c.retransmit_sent);
    by_role("braid_retransmit_missing_total", c.retransmit_missing);
    by_role("braid_repairs_over_budget_total", c.repairs_over_budget);
    by_role("braid_repairs_too_soon_total", c.repairs_too_soon);
    by_role("braid_repair_floods_total", c.repair_floods);
    by_role("braid_nack_sent_total", c.nack_sent);
    by_role("braid_merge_gap_packets_total", c.gap_packets);
    by_role("braid_tail_probes_total", c.tail_probes);
    by_role("braid_prebursts_total", c.prebursts);
    by_role("braid_streams_closed_total", c.streams_closed);
    by_role("braid_extra_subscriptions_total", c.extra_subscriptions);
    by_role("braid_preburst_packets_total", c.preburst_packets);
    by_role("braid_refusals_received_total", c.refusals);
    if let Machine::Edge(m) = machine {
        metrics::counter!("braid_edge_viewer_joins_total").absolute(c.viewer_joins);
        metrics::counter!("braid_edge_viewer_leaves_total").absolute(c.viewer_leaves);
        metrics::counter!("braid_edge_viewer_skips_total").absolute(c.viewer_skips);
        metrics::counter!("braid_edge_viewer_skipped_packets_total")
            .absolute(c.viewer_skipped_packets);
        metrics::counter!("braid_edge_resume_missed_packets_total")
            .absolute(c.resume_missed_packets);
        metrics::counter!("braid_edge_backfill_packets_total").absolute(c.backfill_packets);
        metrics::counter!("braid_edge_backfill_missing_total").absolute(c.backfill_missing);
        metrics::counter!("braid_edge_path_replaced_total").absolute(c.path_replaced);
        metrics::counter!("braid_edge_drain_signals_total").absolute(c.drain_signals);
        metrics::gauge!("braid_viewers").set(m.viewers() as f64);
        metrics::gauge!("braid_edge_viewers_slow").set(m.slow_viewers() as f64);
        metrics::counter!("braid_edge_viewers_turned_slow_total").absolute(c.viewers_turned_slow);
        for (reason, n) in &c.rendition_changes {
            metrics::counter!("braid_edge_rendition_changes_total", "reason" => *reason)
                .absolute(*n);
        }
        metrics::counter!("braid_edge_rendition_unaligned_total").absolute(c.rendition_unaligned);
        metrics::counter!("braid_edge_rendition_jumps_total").absolute(c.rendition_jumps);
        metrics::counter!("braid_edge_rendition_abandons_total").absolute(c.rendition_abandons);
        metrics::counter!("braid_edge_rendition_late_total").absolute(c.rendition_late);
        metrics::counter!("braid_edge_probes_total").absolute(c.probes);
        metrics::counter!("braid_edge_probe_loss_ends_total").absolute(c.probe_loss_ends);
        metrics::counter!("braid_edge_probe_delay_ends_total").absolute(c.probe_delay_ends);
        metrics::counter!("braid_edge_probe_bytes_total").absolute(c.probe_bytes);
        for (id, h) in m.hls_stats() {
            let stream = id.0.to_string();
            for (name, v) in [
                ("braid_hls_segments_total", h.segments),
                ("braid_hls_parts_total", h.parts),
                ("braid_hls_forced_cuts_total", h.forced_cuts),
                ("braid_hls_missing_packets_total", h.missing_packets),
                ("braid_hls_discontinuities_total", h.discontinuities),
                ("braid_hls_misnumbered_total", h.misnumbered),
            ] {
                metrics::counter!(name, "stream" => stream.clone()).absolute(v);
            }
        }
    }
    let open = machine.reports();
    metrics::gauge!("braid_streams_open", "role" => role).set(open.len() as f64);
    let mut reports = open;
    reports.extend(closed);
    for st in reports {
        let stream = st.id.0.to_string();
        let set = |name: &'static str, v: u64| {
            metrics::counter!(name, "role" => role, "stream" => stream.clone()).absolute(v);
        };
        let s = st.merge;
        set("braid_merge_released_total", s.released);
        set("braid_merge_gaps_total", s.gaps);
        set("braid_merge_duplicates_total", s.duplicates);
        set("braid_merge_late_total", s.late);
        set("braid_merge_nacked_total", s.nacked);
        set("braid_merge_repaired_total", s.repaired);
        set("braid_merge_jumps_total", s.jumps);
        set("braid_merge_unconfirmed_jumps_total", s.unconfirmed_jumps);
        set("braid_merge_seeks_total", s.seeks);
        for (path, p) in &st.paths {
            let path = path.0.to_string();
            let set = |name: &'static str, v: u64| {
                metrics::counter!(name, "role" => role, "stream" => stream.clone(), "path" => path.clone())
                    .absolute(v);
            };
            set("braid_path_received_total", p.received);
            set("braid_path_first_total", p.first);
            set("braid_path_duplicates_total", p.duplicates);
            set("braid_path_late_total", p.late);
        }
        metrics::gauge!("braid_stream_viewers", "stream" => stream.clone()).set(st.viewers as f64);
        metrics::gauge!("braid_stream_subscribers", "stream" => stream).set(st.subscribers as f64);
    }
}

/// A stream's figures as a report carries them.
pub(crate) fn stream_summary(st: &crate::common::StreamReport, bps: u64) -> serde_json::Value {
    serde_json::json!({
        "id": st.id.0,
        "bps": bps,
        "viewers": st.viewers,
        "subscribers": st.subscribers,
        "released": st.merge.released,
        "gaps": st.merge.gaps,
        "paths": st.paths.iter().take(braid_net::report::REPORT_PATHS).map(|(p, s)| serde_json::json!({
            "path": p.0,
            "received": s.received,
            "first": s.first,
        })).collect::<Vec<_>>(),
    })
}
