//! What the set reflector and the edge share: a merged packet, the merge of a stream's
//! copies with its repairs, and the counters both export.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_core::merge::{self, Output as MergeOutput};
use braid_core::node::{Drops, Kept, Outbox, Peer};
use braid_core::ring::Ring;
use braid_core::wire::{Body, Flags, Header, Media};
use braid_core::{NodeId, PathId, SeqNo, StreamId};
use bytes::Bytes;

/// Longest lease a subscriber or viewer may ask for.
pub(crate) const MAX_LEASE: Duration = Duration::from_secs(10);
/// Most sequence numbers answered per NACK message.
pub(crate) const MAX_NACK_ANSWER: u64 = 256;
/// How often the machines expire leases, age rings and refresh subscriptions.
pub(crate) const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// What both roles decide with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node.
    pub node: NodeId,
    /// Streams carried; empty means any.
    pub streams: Vec<StreamId>,
    /// The merge of a stream's copies.
    pub merge: merge::Config,
    /// Most subscribers (set reflector) or viewers (edge) per stream.
    pub max_per_stream: usize,
    /// Most streams open at once.
    pub max_streams: usize,
}

impl Settings {
    pub(crate) fn carries(&self, id: StreamId) -> bool {
        self.streams.is_empty() || self.streams.contains(&id)
    }
}

/// A merged packet: the datagram as it arrived, and what a retransmission needs.
#[derive(Debug, Clone)]
pub(crate) struct Packet {
    pub(crate) datagram: Bytes,
    pub(crate) header: Header,
    pub(crate) media: Media,
}

impl Kept for Packet {
    fn header(&self) -> Header {
        self.header
    }
    fn media(&self) -> &Media {
        &self.media
    }
}

/// What happened, for the metrics; a field a role never uses stays 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages not taken, by reason (`braid_dropped_total`).
    pub drops: Drops,
    /// Packets sent again in answer to NACKs.
    pub retransmit_sent: u64,
    /// Packets asked for that were no longer kept.
    pub retransmit_missing: u64,
    /// Packets asked for and kept, not sent again: over the viewer's repair budget, its
    /// link measured full (edge).
    pub repairs_over_budget: u64,
    /// Packets asked for again before the copy last sent could have reached the viewer
    /// (within its round trip now), not sent again (edge).
    pub repairs_too_soon: u64,
    /// Times a ladder's viewer was read as flooded by its repairs (it received under
    /// 75% of all it was sent, repairs half as much again as its stream) and had them
    /// held to what it receives (edge).
    pub repair_floods: u64,
    /// NACKs sent upstream.
    pub nack_sent: u64,
    /// Packets given up by the merge (every path lost them, repairs failed).
    pub gap_packets: u64,
    /// Viewers that joined (edge).
    pub viewer_joins: u64,
    /// Viewers that left with an unsubscribe or a closed connection (edge).
    pub viewer_leaves: u64,
    /// Viewers moved to the latest keyframe because the ring overtook them (edge).
    pub viewer_skips: u64,
    /// Packets those viewers never got (edge).
    pub viewer_skipped_packets: u64,
    /// Packets a resuming viewer asked for that the ring no longer held (edge).
    pub resume_missed_packets: u64,
    /// Packets of a stream's past asked of the set reflectors for viewers resuming from
    /// before the ring's start, and put before it (edge).
    pub backfill_packets: u64,
    /// Packets of that past asked for and not put there: they did not come (or came
    /// after a hole) before the last ask ended (edge).
    pub backfill_missing: u64,
    /// Subscriptions moved off a set reflector that delivered nothing (edge).
    pub path_replaced: u64,
    /// Switch messages sent to viewers of a drained edge (edge).
    pub drain_signals: u64,
    /// New source sessions started (a capture started again).
    pub sessions: u64,
    /// Last packets sent again to a receiver once its stream went quiet (tail-loss
    /// probes).
    pub tail_probes: u64,
    /// Set reflectors subscribed beyond `subscribe_k` because repairs kept failing
    /// (edge).
    pub extra_subscriptions: u64,
    /// Streams closed for having no subscriber and no media (set reflector).
    pub streams_closed: u64,
    /// New subscribers sent the latest group of pictures at once (set reflector).
    pub prebursts: u64,
    /// Packets those prebursts carried (set reflector).
    pub preburst_packets: u64,
    /// Refusals received from peers (a set reflector that does not trust this edge's
    /// certificate, a stream it does not carry, a full node).
    pub refusals: u64,
    /// Viewers that turned slow: limited by their link for long (edge).
    pub viewers_turned_slow: u64,
    /// Viewers moved to another rendition of their ladder, by reason (edge).
    pub rendition_changes: std::collections::BTreeMap<&'static str, u64>,
    /// Keyframes at which a move found no aligned keyframe in the target rendition.
    pub rendition_unaligned: u64,
    /// Moves that went to the target's next keyframe after the viewer's (a jump).
    pub rendition_jumps: u64,
    /// Moves down made at the next keyframe, the rest of the group of pictures passed
    /// over (the link would have taken too long to carry it).
    pub rendition_abandons: u64,
    /// Keyframes at which a move waited in vain for the target rendition to catch up.
    pub rendition_late: u64,
    /// Probes started (a viewer sent more than its rendition, to see if it can climb).
    pub probes: u64,
    /// Bytes those probes sent.
    pub probe_bytes: u64,
    /// Probes ended early because the viewer lost packets (the link had no room).
    pub probe_loss_ends: u64,
    /// Probes ended because the viewer's packets queued on its link (acknowledged later
    /// than the path's least delay by [`crate::edge::PROBE_QUEUE`]), before any loss.
    pub probe_delay_ends: u64,
}

/// One stream's figures, for the metrics.
#[derive(Debug, Clone)]
pub struct StreamReport {
    /// The stream.
    pub id: StreamId,
    /// Its merge's counters.
    pub merge: merge::Stats,
    /// Per path: its counters.
    pub paths: Vec<(PathId, merge::PathStats)>,
    /// Viewers (edge).
    pub viewers: usize,
    /// Subscribed edges (set reflector).
    pub subscribers: usize,
}

/// Which source session a stream is in: the RTP SSRC of the capture that sends it (a
/// capture started again has another), the one it is leaving, and those it left.
#[derive(Debug, Default)]
pub(crate) struct Session {
    current: Option<u32>,
    /// The session being left while the merge waits for its last reordered packets.
    leaving: Option<u32>,
    /// Sessions left behind, newest last (late copies of theirs are dropped).
    retired: Vec<u32>,
}

/// Sessions remembered as left behind.
const RETIRED: usize = 4;
/// How many numbers before a new session's first packet to arrive are asked for when it
/// is not the session's flagged start: the start is lost on every path only with the few
/// packets around it, and every number asked for that never existed costs the upstream a
/// look.
const SEEK_BACK: u16 = 8;

/// Takes a copy into a stream's merge. A copy of another source session than the
/// stream's (another SSRC; its first packet is also flagged as a discontinuity, but that
/// one may be lost) starts that session: its packets wait aside while the merge takes
/// the old session's last reordered packets (a window at most), then the old session is
/// released and the new one starts. Late copies of a session left behind are dropped.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accept_media(
    now: Instant,
    merge: &mut merge::Buffer<Packet>,
    session: &mut Session,
    counters: &mut Counters,
    path: PathId,
    datagram: Bytes,
    header: Header,
    media: Media,
) {
    let ssrc = media.rtp.fields().ssrc;
    if let Some(old) = session.leaving.filter(|_| !merge.changing_session()) {
        // The change is over: the old session's copies are late from now on.
        session.leaving = None;
        session.retired.push(old);
        if session.retired.len() > RETIRED {
            session.retired.remove(0);
        }
    }
    let seq = media.seq;
    let item = Packet {
        datagram,
        header,
        media,
    };
    match session.current {
        None => session.current = Some(ssrc),
        Some(cur) if cur == ssrc => {
            if merge.changing_session() {
                merge.handle_next_session(now, path, seq, item);
                return;
            }
        }
        Some(_) if session.leaving == Some(ssrc) => {}
        Some(_) if session.retired.contains(&ssrc) => {
            counters.drops.add("old_session");
            return;
        }
        Some(cur) => {
            tracing::info!(old = cur, new = ssrc, seq = seq.0, "a new source session");
            counters.sessions += 1;
            if let Some(older) = session.leaving.replace(cur) {
                session.retired.push(older);
            }
            session.current = Some(ssrc);
            let head = item.header.flags.contains(Flags::DISCONTINUITY);
            merge.start_next_session(now, false);
            merge.handle_next_session(now, path, seq, item);
            if !head {
                // The packet that starts the session (flagged) was lost on every path:
                // ask for the numbers before this one, so the session starts with it.
                merge.seek_before(now, seq, SEEK_BACK);
            }
            return;
        }
    }
    merge.handle_input(now, merge::Input::Packet { path, seq, item });
}

/// Drains a stream's merge: each packet released is handed to `release` then kept in
/// `kept` (for repairs and viewers), each hole is asked for on the path the merge chose
/// (`path_addr` names it), each gap is counted and handed to `gap` (its first number
/// and count). Returns whether anything was kept.
#[allow(clippy::too_many_arguments)]
pub(crate) fn drain_merge<E>(
    now: Instant,
    stream: StreamId,
    merge: &mut merge::Buffer<Packet>,
    kept: &mut Ring<Packet>,
    out: &mut Outbox<E>,
    counters: &mut Counters,
    path_addr: impl Fn(PathId) -> Option<SocketAddr>,
    mut release: impl FnMut(&mut Outbox<E>, &Packet),
    mut gap: impl FnMut(&mut Outbox<E>, SeqNo, u64),
) -> bool {
    merge.handle_timeout(now);
    let mut pushed = false;
    loop {
        match merge.poll_output() {
            MergeOutput::Packet { seq, item } => {
                release(out, &item);
                let keyframe = item.header.flags.contains(Flags::KEYFRAME);
                let size = item.datagram.len();
                if kept.behind(seq) {
                    // A new session numbered below the old one (another clock): the ring
                    // starts over; cursors in it move to the new session's keyframe.
                    kept.restart();
                }
                kept.push(now, seq, keyframe, size, item);
                pushed = true;
            }
            MergeOutput::Gap { first, count } => {
                counters.gap_packets += count;
                gap(out, first, count);
            }
            MergeOutput::Nack { range, path } => {
                if let Some(to) = path_addr(path) {
                    out.control(Peer::Addr(to), stream, Body::Nack(vec![range]));
                    counters.nack_sent += 1;
                }
            }
            MergeOutput::Timeout(_) => break,
        }
    }
    pushed
}

/// The merge's figures for a [`StreamReport`].
pub(crate) fn report(
    id: StreamId,
    merge: &merge::Buffer<Packet>,
    viewers: usize,
    subscribers: usize,
) -> StreamReport {
    StreamReport {
        id,
        merge: merge.stats(),
        paths: merge.paths().collect(),
        viewers,
        subscribers,
    }
}

/// The earliest of two optional deadlines.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}
