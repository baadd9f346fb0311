//! The edge's ring: the last few seconds of a stream, shared by every viewer.
//!
//! One [`Ring`] per stream holds the merged packets; each viewer owns a [`Cursor`], its
//! position in the ring — seed 002's per-viewer circular buffer, without a copy per
//! viewer. A cursor is two integers; payloads are reference-counted and handed out by
//! reference.
//!
//! The ring is bounded three ways: by age, by packet count and by bytes, whichever bites
//! first. It keeps an index of keyframe positions so that a joining viewer, or one that
//! fell behind, starts where a decoder can.
//!
//! Positions are absolute (they count every packet ever pushed), so a cursor whose
//! position was evicted knows exactly how many packets it lost. They start high enough
//! that a young ring can take packets before its first ([`Ring::prepend`]): the past a
//! viewer resuming from before the ring's start lacks, asked for upstream.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::seq::SeqNo;

/// Ring bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How much of the stream's recent past is kept (default 4 s: two GOPs of a typical
    /// 2 s live encode, so a keyframe is always in the ring).
    pub max_age: Duration,
    /// Most packets kept (default 16384: 4 s at about 40 Mbps of 1316-byte payloads).
    pub max_packets: usize,
    /// Most payload bytes kept (default 32 MiB).
    pub max_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_age: Duration::from_secs(4),
            max_packets: 16_384,
            max_bytes: 32 << 20,
        }
    }
}

impl Config {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_age.is_zero() || self.max_packets == 0 || self.max_bytes == 0 {
            return Err(Error::InvalidConfig(
                "ring max_age, max_packets and max_bytes must all be above zero".into(),
            ));
        }
        Ok(())
    }
}

/// One packet in the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    /// Its sequence number.
    pub seq: SeqNo,
    /// Whether a decoder can start here.
    pub keyframe: bool,
    /// When it entered the ring.
    pub at: Instant,
    /// Its size in bytes, as counted against [`Config::max_bytes`].
    pub size: usize,
    /// The packet.
    pub item: T,
}

/// A viewer's position in a ring: O(1) memory whatever the ring holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Absolute position of the next entry to read.
    pos: u64,
    /// Entries below this sequence number are passed over without being returned (the
    /// viewer already has them from another edge).
    min_seq: SeqNo,
}

impl Cursor {
    /// The absolute position of the next entry this cursor reads.
    pub fn position(&self) -> u64 {
        self.pos
    }
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read<'a, T> {
    /// The next packet for this viewer.
    Packet(&'a Entry<T>),
    /// The writer overtook the cursor: `lost` packets were never read and the cursor
    /// moved to the latest keyframe (or the oldest packet, if the ring holds no keyframe).
    Skipped {
        /// Packets the viewer will never get.
        lost: u64,
    },
    /// Nothing new yet.
    Pending,
}

/// Where a new cursor should start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the latest keyframe (a new viewer).
    Keyframe,
    /// At this sequence number (a viewer resuming after a switch).
    Seq(SeqNo),
    /// At the next packet pushed.
    Live,
}

/// Why a cursor could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The ring holds no keyframe yet.
    #[error("no keyframe in the ring yet")]
    NoKeyframe,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets pushed.
    pub pushed: u64,
    /// Packets evicted for age.
    pub evicted_age: u64,
    /// Packets evicted for the packet bound.
    pub evicted_packets: u64,
    /// Packets evicted for the byte bound.
    pub evicted_bytes: u64,
    /// Pushes refused because the sequence number did not increase.
    pub out_of_order: u64,
    /// Packets put before the oldest ([`Ring::prepend`]).
    pub prepended: u64,
}

/// The last few seconds of one stream. Sans-IO: time is passed to [`Ring::push`].
#[derive(Debug)]
pub struct Ring<T> {
    config: Config,
    entries: VecDeque<Entry<T>>,
    /// Absolute position of `entries[0]`.
    first_pos: u64,
    /// Absolute positions of keyframes still in the ring, ascending.
    keyframes: VecDeque<u64>,
    bytes: usize,
    /// Whether anything ever left the front (evicted, or dropped by a restart): a cursor
    /// may then point before it, so nothing is put there any more.
    trimmed: bool,
    stats: Stats,
}

impl<T> Ring<T> {
    /// An empty ring.
    pub fn new(config: Config) -> Result<Self, Error> {
        config.validate()?;
        Ok(Ring {
            // Room below the first packet for as many as the ring can hold, put there
            // later (`prepend`).
            first_pos: config.max_packets as u64,
            config,
            entries: VecDeque::new(),
            keyframes: VecDeque::new(),
            bytes: 0,
            trimmed: false,
            stats: Stats::default(),
        })
    }

    /// Appends a packet (sequence numbers must increase; the merge guarantees it) and
    /// evicts what falls out of the bounds. Returns `false`, and counts it, if the packet
    /// was refused for not increasing.
    pub fn push(&mut self, now: Instant, seq: SeqNo, keyframe: bool, size: usize, item: T) -> bool {
        if self.entries.back().is_some_and(|e| e.seq >= seq) {
            self.stats.out_of_order += 1;
            return false;
        }
        let pos = self.end();
        if keyframe {
            self.keyframes.push_back(pos);
        }
        self.bytes += size;
        self.entries.push_back(Entry {
            seq,
            keyframe,
            at: now,
            size,
            item,
        });
        self.stats.pushed += 1;
        self.evict(now);
        true
    }

    fn evict(&mut self, now: Instant) {
        // The newest packet always stays.
        while self.entries.len() > 1 {
            let front = &self.entries[0];
            if self.entries.len() > self.config.max_packets {
                self.stats.evicted_packets += 1;
            } else if self.bytes > self.config.max_bytes {
                self.stats.evicted_bytes += 1;
            } else if now.saturating_duration_since(front.at) > self.config.max_age {
                self.stats.evicted_age += 1;
            } else {
                break;
            }
            self.pop_front();
        }
    }

    /// Puts a packet before the oldest held (one that came after it: a repair of the
    /// stream's past, asked for a viewer resuming from before the ring's start). It
    /// enters as old as the oldest. Refused (`false`) unless `seq` is below the oldest
    /// and it fits the packet and byte bounds, or once anything left the front (a
    /// cursor may point there).
    pub fn prepend(&mut self, seq: SeqNo, keyframe: bool, size: usize, item: T) -> bool {
        let Some(front) = self.entries.front() else {
            return false;
        };
        if self.trimmed
            || seq >= front.seq
            || self.first_pos == 0
            || self.entries.len() >= self.config.max_packets
            || self.bytes + size > self.config.max_bytes
        {
            return false;
        }
        let at = front.at;
        self.first_pos -= 1;
        if keyframe {
            self.keyframes.push_front(self.first_pos);
        }
        self.bytes += size;
        self.entries.push_front(Entry {
            seq,
            keyframe,
            at,
            size,
            item,
        });
        self.stats.prepended += 1;
        true
    }

    /// Whether [`Ring::prepend`] may still put packets before the oldest (nothing left
    /// the front yet, and the ring holds something to put them before).
    pub fn may_prepend(&self) -> bool {
        !self.trimmed && !self.entries.is_empty()
    }

    fn pop_front(&mut self) {
        self.trimmed = true;
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.size;
            self.first_pos += 1;
            while self.keyframes.front().is_some_and(|&k| k < self.first_pos) {
                self.keyframes.pop_front();
            }
        }
    }

    /// The source started a new session whose numbers do not follow the ring's: every
    /// packet held is dropped (cursors in it are overtaken, counted as skipped, and move
    /// to the new session's first keyframe). Positions go on counting.
    pub fn restart(&mut self) {
        self.trimmed = true;
        self.first_pos = self.end();
        self.entries.clear();
        self.keyframes.clear();
        self.bytes = 0;
    }

    /// Whether `seq` would be refused by [`Ring::push`] (it does not follow the newest).
    pub fn behind(&self, seq: SeqNo) -> bool {
        self.entries.back().is_some_and(|e| e.seq >= seq)
    }

    /// Evicts by age without pushing (call when the stream is silent).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.evict(now);
    }

    /// Absolute position one past the newest entry.
    fn end(&self) -> u64 {
        self.first_pos + self.entries.len() as u64
    }

    /// A new cursor. [`Start::Seq`] returns how many of the asked-for packets are no longer
    /// in the ring: the cursor then starts at the first keyframe held (a decoder can
    /// start nowhere else after a gap), or fails with [`StartError::NoKeyframe`] until one
    /// is; a sequence number newer than the ring waits for it.
    pub fn cursor(&self, start: Start) -> Result<(Cursor, u64), StartError> {
        match start {
            Start::Live => Ok((
                Cursor {
                    pos: self.end(),
                    min_seq: SeqNo(0),
                },
                0,
            )),
            Start::Keyframe => {
                let pos = *self.keyframes.back().ok_or(StartError::NoKeyframe)?;
                Ok((
                    Cursor {
                        pos,
                        min_seq: SeqNo(0),
                    },
                    0,
                ))
            }
            Start::Seq(seq) => {
                let i = self.entries.partition_point(|e| e.seq < seq);
                match self.entries.front() {
                    Some(front) if i == 0 && front.seq > seq => {
                        let pos = *self.keyframes.front().ok_or(StartError::NoKeyframe)?;
                        let at = self.entries[(pos - self.first_pos) as usize].seq;
                        Ok((Cursor { pos, min_seq: seq }, at.distance_from(seq)))
                    }
                    _ => Ok((
                        Cursor {
                            pos: self.first_pos + i as u64,
                            min_seq: seq,
                        },
                        0,
                    )),
                }
            }
        }
    }

    /// The entry `cursor` would read next, without moving it (`None` if there is none yet
    /// or the cursor was overtaken; [`Ring::read`] tells which). The cursor's start filter
    /// is not applied.
    pub fn peek(&self, cursor: &Cursor) -> Option<&Entry<T>> {
        let i = cursor.pos.checked_sub(self.first_pos)?;
        self.entries.get(usize::try_from(i).ok()?)
    }

    /// A cursor at the newest keyframe held that `wanted` accepts (another rendition's
    /// keyframe at the same media time, say), if any.
    pub fn keyframe_cursor(&self, mut wanted: impl FnMut(&Entry<T>) -> bool) -> Option<Cursor> {
        self.keyframes.iter().rev().find_map(|&pos| {
            let e = self
                .entries
                .get(usize::try_from(pos - self.first_pos).ok()?)?;
            wanted(e).then_some(Cursor {
                pos,
                min_seq: SeqNo(0),
            })
        })
    }

    /// The newest keyframe held.
    pub fn newest_keyframe(&self) -> Option<&Entry<T>> {
        let pos = *self.keyframes.back()?;
        self.entries
            .get(usize::try_from(pos - self.first_pos).ok()?)
    }

    /// Whether the writer has overtaken `cursor` (its next entry was evicted unread).
    pub fn overtaken(&self, cursor: &Cursor) -> bool {
        cursor.pos < self.first_pos
    }

    /// The entry for `seq`, if the ring holds it (for answering NACKs).
    pub fn get(&self, seq: SeqNo) -> Option<&Entry<T>> {
        let i = self.entries.partition_point(|e| e.seq < seq);
        self.entries.get(i).filter(|e| e.seq == seq)
    }

    /// The next entry for `cursor`, moving it on.
    pub fn read(&self, cursor: &mut Cursor) -> Read<'_, T> {
        if cursor.pos < self.first_pos {
            let from = cursor.pos;
            cursor.pos = self.keyframes.back().copied().unwrap_or(self.first_pos);
            return Read::Skipped {
                lost: cursor.pos - from,
            };
        }
        loop {
            let Some(entry) = usize::try_from(cursor.pos - self.first_pos)
                .ok()
                .and_then(|i| self.entries.get(i))
            else {
                return Read::Pending;
            };
            cursor.pos += 1;
            if entry.seq >= cursor.min_seq {
                return Read::Packet(entry);
            }
        }
    }

    /// Moves `cursor` to the latest keyframe (a viewer too slow to keep up) and returns
    /// how many packets it passed over. A cursor already at or past it is not moved.
    pub fn skip_to_keyframe(&self, cursor: &mut Cursor) -> u64 {
        match self.keyframes.back() {
            Some(&k) if k > cursor.pos => {
                let lost = k - cursor.pos;
                cursor.pos = k;
                lost
            }
            _ => 0,
        }
    }

    /// The first keyframe after `cursor`'s next entry, if the ring holds one: its
    /// position, and the bytes from the cursor up to it (what the viewer has left of the
    /// group of pictures it is in).
    pub fn next_keyframe(&self, cursor: &Cursor) -> Option<(u64, usize)> {
        let i = self.keyframes.partition_point(|&k| k <= cursor.pos);
        let k = *self.keyframes.get(i)?;
        let from = usize::try_from(cursor.pos.checked_sub(self.first_pos)?).ok()?;
        let to = usize::try_from(k - self.first_pos).ok()?;
        let bytes = self.entries.range(from..to).map(|e| e.size).sum();
        Some((k, bytes))
    }

    /// Moves `cursor` on to position `pos` (one ahead of it, such as a keyframe
    /// [`Ring::next_keyframe`] named) and returns how many packets it passed over.
    pub fn skip_to(&self, cursor: &mut Cursor, pos: u64) -> u64 {
        let lost = pos.saturating_sub(cursor.pos);
        cursor.pos = cursor.pos.max(pos);
        lost
    }

    /// How many packets `cursor` is behind the newest.
    pub fn lag(&self, cursor: &Cursor) -> u64 {
        self.end().saturating_sub(cursor.pos)
    }

    /// Packets held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The newest entry.
    pub fn newest(&self) -> Option<&Entry<T>> {
        self.entries.back()
    }

    /// The oldest entry.
    pub fn oldest(&self) -> Option<&Entry<T>> {
        self.entries.front()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
    fn t0() -> Instant {
        Instant::now()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn small() -> Config {
        Config {
            max_age: ms(1000),
            max_packets: 10,
            max_bytes: 10_000,
        }
    }

    /// Pushes seqs `range`, a keyframe every `gop`, 100 bytes each, 10 ms apart from `t`.
    fn fill(r: &mut Ring<u64>, t: Instant, range: std::ops::Range<u64>, gop: u64) {
        for s in range {
            r.push(t + ms(s * 10), SeqNo(s), s % gop == 0, 100, s);
        }
    }

    fn read_all(r: &Ring<u64>, c: &mut Cursor) -> Vec<u64> {
        let mut out = Vec::new();
        while let Read::Packet(e) = r.read(c) {
            out.push(e.item);
        }
        out
    }

    #[test]
    fn new_viewer_starts_at_latest_keyframe() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..8, 3);
        let (mut c, _) = r.cursor(Start::Keyframe).unwrap();
        assert_eq!(read_all(&r, &mut c), vec![6, 7]);
        fill(&mut r, t, 8..9, 3);
        assert_eq!(read_all(&r, &mut c), vec![8]);
    }

    #[test]
    fn no_keyframe_yet() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        assert_eq!(r.cursor(Start::Keyframe), Err(StartError::NoKeyframe));
        fill(&mut r, t, 1..3, 100);
        assert_eq!(r.cursor(Start::Keyframe), Err(StartError::NoKeyframe));
    }

    #[test]
    fn resume_at_sequence() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 10..18, 4);
        // In the ring.
        let (mut c, missed) = r.cursor(Start::Seq(SeqNo(13))).unwrap();
        assert_eq!(missed, 0);
        assert_eq!(read_all(&r, &mut c), (13..18).collect::<Vec<_>>());
        // Older than the ring: starts at the first keyframe held (12), says what is
        // missing up to it.
        let (mut c, missed) = r.cursor(Start::Seq(SeqNo(7))).unwrap();
        assert_eq!(missed, 5);
        assert_eq!(read_all(&r, &mut c)[0], 12);
        // With no keyframe held, it waits for one.
        let mut r2 = Ring::new(small()).unwrap();
        fill(&mut r2, t, 10..12, 100);
        assert_eq!(r2.cursor(Start::Seq(SeqNo(7))), Err(StartError::NoKeyframe));
        // Newer than the ring (this edge is behind the old one): waits for it, and passes
        // over what the viewer already has.
        let (mut c, missed) = r.cursor(Start::Seq(SeqNo(20))).unwrap();
        assert_eq!(missed, 0);
        assert!(read_all(&r, &mut c).is_empty());
        fill(&mut r, t, 18..23, 4);
        assert_eq!(read_all(&r, &mut c), vec![20, 21, 22]);
    }

    #[test]
    fn get_finds_held_sequence_numbers_only() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..15, 5);
        assert_eq!(r.get(SeqNo(4)), None, "evicted");
        assert_eq!(r.get(SeqNo(9)).map(|e| e.item), Some(9));
        assert_eq!(r.get(SeqNo(15)), None, "not yet");
    }

    #[test]
    fn resume_across_a_gap() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        r.push(t, SeqNo(1), true, 1, 1);
        r.push(t, SeqNo(2), false, 1, 2);
        r.push(t, SeqNo(5), false, 1, 5); // 3 and 4 were given up by the merge
        let (mut c, missed) = r.cursor(Start::Seq(SeqNo(3))).unwrap();
        assert_eq!(missed, 0);
        assert_eq!(read_all(&r, &mut c), vec![5]);
    }

    #[test]
    fn overtaken_cursor_skips_to_keyframe_and_counts() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..5, 5);
        let (mut c, _) = r.cursor(Start::Keyframe).unwrap();
        assert_eq!(read_all(&r, &mut c), vec![0, 1, 2, 3, 4]);
        fill(&mut r, t, 5..30, 5); // ring keeps 20..30, keyframes at 20, 25
        assert_eq!(r.read(&mut c), Read::Skipped { lost: 20 });
        assert_eq!(read_all(&r, &mut c), vec![25, 26, 27, 28, 29]);
    }

    #[test]
    fn a_restart_for_a_new_session_overtakes_every_cursor_to_its_first_keyframe() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 100..105, 5);
        let (mut c, _) = r.cursor(Start::Keyframe).unwrap();
        assert_eq!(read_all(&r, &mut c), vec![100, 101, 102, 103, 104]);
        fill(&mut r, t, 105..107, 5);
        // The new session numbers lower (another clock): it cannot follow.
        assert!(r.behind(SeqNo(50)));
        r.restart();
        assert!(r.is_empty() && !r.behind(SeqNo(50)));
        fill(&mut r, t, 50..53, 50);
        assert_eq!(r.read(&mut c), Read::Skipped { lost: 2 });
        assert_eq!(read_all(&r, &mut c), vec![50, 51, 52]);
    }

    #[test]
    fn a_cursor_at_a_chosen_keyframe() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..9, 3);
        let mut c = r.keyframe_cursor(|e| e.item == 3).unwrap();
        assert_eq!(read_all(&r, &mut c), vec![3, 4, 5, 6, 7, 8]);
        assert_eq!(r.keyframe_cursor(|e| e.item == 4), None, "not a keyframe");
        assert_eq!(r.newest_keyframe().map(|e| e.item), Some(6));
    }

    #[test]
    fn peek_does_not_move() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..3, 1);
        let (mut c, _) = r.cursor(Start::Seq(SeqNo(1))).unwrap();
        assert_eq!(r.peek(&c).map(|e| e.item), Some(1));
        assert_eq!(r.peek(&c).map(|e| e.item), Some(1));
        assert_eq!(read_all(&r, &mut c), vec![1, 2]);
        assert_eq!(r.peek(&c), None);
        fill(&mut r, t, 3..30, 1);
        assert!(r.overtaken(&c));
        assert_eq!(r.peek(&c), None);
    }

    #[test]
    fn slow_viewer_skips_forward() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..9, 4);
        let (mut c, _) = r.cursor(Start::Seq(SeqNo(0))).unwrap();
        assert_eq!(r.lag(&c), 9);
        assert_eq!(r.skip_to_keyframe(&mut c), 8);
        assert_eq!(read_all(&r, &mut c), vec![8]);
        assert_eq!(r.skip_to_keyframe(&mut c), 0);
    }

    #[test]
    fn the_rest_of_a_group_is_measured_and_passed_over() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..7, 4);
        let (mut c, _) = r.cursor(Start::Seq(SeqNo(1))).unwrap();
        // From 1 to the keyframe at 4: three packets of 100 bytes.
        let at = c.position();
        assert_eq!(r.next_keyframe(&c), Some((at + 3, 300)));
        assert_eq!(r.skip_to(&mut c, at + 3), 3);
        // At a keyframe, the next one is not held yet.
        assert_eq!(r.next_keyframe(&c), None);
        assert_eq!(read_all(&r, &mut c), vec![4, 5, 6]);
        // Never backwards.
        assert_eq!(r.skip_to(&mut c, at + 1), 0);
        assert_eq!(read_all(&r, &mut c), Vec::<u64>::new());
    }

    #[test]
    fn bounds_by_age_packets_and_bytes() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..15, 5);
        assert_eq!(r.len(), 10);
        assert_eq!(r.stats().evicted_packets, 5);

        let mut r = Ring::new(Config {
            max_bytes: 350,
            ..small()
        })
        .unwrap();
        fill(&mut r, t, 0..5, 5);
        assert_eq!(r.len(), 3);
        assert_eq!(r.bytes(), 300);

        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..3, 5);
        r.handle_timeout(t + ms(1015));
        assert_eq!(r.oldest().unwrap().seq, SeqNo(2), "older than 1 s evicted");
        r.handle_timeout(t + ms(10_000));
        assert_eq!(r.len(), 1, "the newest always stays");
    }

    #[test]
    fn refuses_non_increasing_seq() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        assert!(r.push(t, SeqNo(5), true, 1, 5));
        assert!(!r.push(t, SeqNo(5), true, 1, 5));
        assert!(!r.push(t, SeqNo(4), true, 1, 4));
        assert_eq!(r.stats().out_of_order, 2);
    }

    #[test]
    fn live_cursor_sees_only_new_packets() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 0..4, 2);
        let (mut c, _) = r.cursor(Start::Live).unwrap();
        assert_eq!(r.read(&mut c), Read::Pending);
        fill(&mut r, t, 4..6, 2);
        assert_eq!(read_all(&r, &mut c), vec![4, 5]);
    }

    #[test]
    fn packets_put_before_the_oldest_are_read_by_a_cursor_started_there() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 5..8, 3);
        let (mut early, _) = r.cursor(Start::Seq(SeqNo(5))).unwrap();
        assert_eq!(read_all(&r, &mut early), vec![5, 6, 7]);
        // Before them, newest first: 4, 3 (a keyframe), then 1 with 2 still missing.
        assert!(r.prepend(SeqNo(4), false, 100, 4));
        assert!(r.prepend(SeqNo(3), true, 100, 3));
        assert!(!r.prepend(SeqNo(3), true, 100, 3), "not below the oldest");
        let (mut c, missed) = r.cursor(Start::Seq(SeqNo(3))).unwrap();
        assert_eq!(missed, 0);
        assert_eq!(read_all(&r, &mut c), vec![3, 4, 5, 6, 7]);
        // From before them: the keyframe put there.
        let (mut c, missed) = r.cursor(Start::Seq(SeqNo(1))).unwrap();
        assert_eq!(missed, 2);
        assert_eq!(read_all(&r, &mut c), vec![3, 4, 5, 6, 7]);
        // A cursor placed before stays where it was.
        fill(&mut r, t, 8..9, 3);
        assert_eq!(read_all(&r, &mut early), vec![8]);
        assert_eq!((r.len(), r.bytes(), r.stats().prepended), (6, 600, 2));
    }

    #[test]
    fn nothing_is_put_before_the_oldest_beyond_the_bounds_or_once_the_front_moved() {
        let t = t0();
        let mut r = Ring::new(small()).unwrap();
        assert!(!r.prepend(SeqNo(1), false, 100, 1), "an empty ring");
        fill(&mut r, t, 20..29, 100);
        assert!(r.prepend(SeqNo(19), false, 100, 19));
        assert!(!r.prepend(SeqNo(18), false, 100, 18), "ten packets held");
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 20..21, 100);
        assert!(!r.prepend(SeqNo(19), false, 9_901, 19), "over the bytes");
        // An eviction: a cursor may point before the front.
        fill(&mut r, t, 21..32, 100);
        assert!(!r.may_prepend());
        assert!(!r.prepend(SeqNo(10), false, 1, 10));
        let mut r = Ring::new(small()).unwrap();
        fill(&mut r, t, 20..22, 100);
        r.restart();
        fill(&mut r, t, 1..2, 100);
        assert!(!r.prepend(SeqNo(0), false, 1, 0), "after a restart");
    }

    #[test]
    fn cursor_is_small() {
        assert!(std::mem::size_of::<Cursor>() <= 16);
    }
}
