//! How long a path's packets now wait in a queue on the way, from their senders' time
//! stamps: each packet's delay (its arrival less its RTP time stamp, both from an origin
//! of the session) is compared with the least delay of the last [`LONG`], the path's
//! delay with its queues empty. The least of the last [`SHORT`] (jitter only ever adds)
//! less that least is the queue.
//!
//! A receiver's repair round trip, timed from its last ask, cannot see a queue: on a link
//! whose queue is full, the answer to an earlier ask comes just after the last one and
//! reads as a short round trip. Its asks repeated at that pace go into the same full
//! queue (see `merge::Buffer::set_queue`).
//!
//! The delays are relative to one session's first packet. A new session (another SSRC,
//! another capture's clock: a ladder's other rendition, a restarted capture) comes from
//! the same sender through the same queues, so the queue read just before it is carried
//! over: its first packet is taken to wait as long (otherwise a viewer moved to another
//! rendition behind a full queue would read that queue as empty, and repeat its asks into
//! it). [`QueueDelay::reset`] (another sender) starts over.
//! Stamps wrap (32 bits); an origin older than [`REANCHOR`] is taken again, well before a
//! wrap could be misread. Any input is taken: a stamp far off reads as a delay far off,
//! never a panic, and what is kept is bounded ([`MAX_KEPT`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window whose least delay is the path's with empty queues.
pub const LONG: Duration = Duration::from_secs(10);
/// The window whose least delay is the path's now.
pub const SHORT: Duration = Duration::from_millis(100);
/// An origin this old is taken again (a 90 kHz stamp wraps after 13 h, and reads as
/// signed for half that).
const REANCHOR: Duration = Duration::from_secs(3600);
/// Samples kept per window at most (a sliding minimum keeps only ascending ones).
const MAX_KEPT: usize = 4096;

/// A sliding window's minimum: ascending delays, with their arrivals.
#[derive(Debug, Default, Clone)]
struct Window {
    kept: VecDeque<(Instant, i64)>,
}

impl Window {
    fn push(&mut self, now: Instant, delay: i64, span: Duration) {
        while self.kept.back().is_some_and(|(_, d)| *d >= delay) {
            self.kept.pop_back();
        }
        self.kept.push_back((now, delay));
        while self
            .kept
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > span)
            || self.kept.len() > MAX_KEPT
        {
            self.kept.pop_front();
        }
    }

    fn min(&self) -> Option<i64> {
        self.kept.front().map(|(_, d)| *d)
    }
}

/// One path's queueing delay estimate (see the module's text).
#[derive(Debug, Clone)]
pub struct QueueDelay {
    clock_hz: u32,
    /// The session, and its first packet's arrival and stamp.
    origin: Option<(u32, Instant, u32)>,
    long: Window,
    short: Window,
}

impl QueueDelay {
    /// An estimate of stamps counting at `clock_hz` (90,000 for MPEG-TS over RTP).
    pub fn new(clock_hz: u32) -> QueueDelay {
        QueueDelay {
            clock_hz: clock_hz.max(1),
            origin: None,
            long: Window::default(),
            short: Window::default(),
        }
    }

    /// Forgets every sample: the packets come from another sender now.
    pub fn reset(&mut self) {
        self.origin = None;
        self.long = Window::default();
        self.short = Window::default();
    }

    /// A packet of session `ssrc` stamped `stamp` arrived at `now` (not a repair: it
    /// left when it was asked for, not when it was stamped).
    pub fn sample(&mut self, now: Instant, ssrc: u32, stamp: u32) {
        let stale = self
            .origin
            .is_some_and(|(s, at, _)| s != ssrc || now.saturating_duration_since(at) > REANCHOR);
        // A new session from the same sender (another rendition, a restarted capture)
        // comes through the same queues: its first packet waits as long as the last
        // one of the old. Its stamps cannot be compared with the old ones, so the wait
        // is carried over as its least delay's offset.
        let carried = if stale {
            let q = self.queue(now);
            self.reset();
            q.as_micros() as i64
        } else {
            0
        };
        let (_, at, first) = *self.origin.get_or_insert((ssrc, now, stamp));
        let since = now.saturating_duration_since(at).as_micros() as i64;
        let stamped =
            i64::from(stamp.wrapping_sub(first) as i32) * 1_000_000 / i64::from(self.clock_hz);
        let delay = since - stamped;
        if carried > 0 {
            self.long.push(now, delay - carried, LONG);
        }
        self.long.push(now, delay, LONG);
        self.short.push(now, delay, SHORT);
    }

    /// How long packets wait now beyond the least delay of the last [`LONG`]: zero
    /// before any sample, or once [`SHORT`] passed without one.
    pub fn queue(&self, now: Instant) -> Duration {
        let fresh = self
            .short
            .kept
            .back()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) <= SHORT);
        match (self.short.min(), self.long.min()) {
            (Some(s), Some(l)) if fresh && s > l => Duration::from_micros((s - l) as u64),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HZ: u32 = 90_000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A packet every 20 ms for `secs`, each delayed by `delay(i)` past its stamp.
    fn run(q: &mut QueueDelay, t0: Instant, from: u64, n: u64, delay: impl Fn(u64) -> u64) {
        run_session(q, t0, (7, 0), from, n, delay);
    }

    /// [`run`] for session `ssrc`, its stamps counted from `base`.
    fn run_session(
        q: &mut QueueDelay,
        t0: Instant,
        (ssrc, base): (u32, u32),
        from: u64,
        n: u64,
        delay: impl Fn(u64) -> u64,
    ) {
        for i in from..from + n {
            let stamp = base.wrapping_add((i * 20 * 90) as u32);
            q.sample(t0 + ms(i * 20 + delay(i)), ssrc, stamp);
        }
    }

    #[test]
    fn a_steady_path_has_no_queue_and_jitter_reads_as_none() {
        let t0 = Instant::now();
        let mut q = QueueDelay::new(HZ);
        assert_eq!(q.queue(t0), Duration::ZERO);
        // 30 ms of path delay, up to 9 ms of jitter.
        run(&mut q, t0, 0, 500, |i| 30 + (i * 7) % 10);
        let now = t0 + ms(500 * 20 + 30);
        assert!(q.queue(now) < ms(10), "{:?}", q.queue(now));
    }

    #[test]
    fn a_filling_queue_reads_as_its_wait_and_draining_as_none() {
        let t0 = Instant::now();
        let mut q = QueueDelay::new(HZ);
        run(&mut q, t0, 0, 200, |_| 30);
        // The link's queue fills to 300 ms over a second, then stays full.
        run(&mut q, t0, 200, 150, |i| 30 + ((i - 200) * 6).min(300));
        let now = t0 + ms(350 * 20 + 330);
        let wait = q.queue(now);
        assert!(wait >= ms(290) && wait <= ms(310), "{wait:?}");
        // Drained: the wait is gone within the short window.
        run(&mut q, t0, 350, 20, |_| 30);
        assert!(q.queue(t0 + ms(370 * 20 + 30)) < ms(5));
        // Silent beyond the short window: nothing is known of now.
        assert_eq!(q.queue(t0 + ms(370 * 20 + 500)), Duration::ZERO);
    }

    /// Another rendition (a capture of its own: another session, other stamps) reaches
    /// a viewer through the link whose queue stood full before: its first packet waits
    /// as long, and the wait reads on, not as the new session's empty queue; once the
    /// queue drains, it reads as none again.
    #[test]
    fn a_new_session_behind_a_full_queue_reads_that_queue() {
        let t0 = Instant::now();
        let mut q = QueueDelay::new(HZ);
        run(&mut q, t0, 0, 200, |_| 30);
        run(&mut q, t0, 200, 100, |i| 30 + ((i - 200) * 6).min(300));
        // Session 9 from packet 300 on, its stamps from an origin of its own.
        let other = (9, 77_000_000);
        run_session(&mut q, t0, other, 300, 150, |_| 330);
        let wait = q.queue(t0 + ms(450 * 20 + 330));
        assert!(wait >= ms(290) && wait <= ms(310), "{wait:?}");
        run_session(&mut q, t0, other, 450, 20, |_| 30);
        assert!(q.queue(t0 + ms(470 * 20 + 30)) < ms(5));
    }

    #[test]
    fn a_new_session_or_sender_starts_over() {
        let t0 = Instant::now();
        let mut q = QueueDelay::new(HZ);
        run(&mut q, t0, 0, 100, |_| 30);
        // Another capture's clock: stamps from elsewhere, an hour off.
        let at = t0 + ms(100 * 20 + 30);
        q.sample(at, 8, 123_456_789);
        assert_eq!(q.queue(at), Duration::ZERO);
        q.reset();
        assert_eq!(q.queue(at), Duration::ZERO);
    }

    #[test]
    fn stamps_that_wrap_read_as_time_going_on() {
        let t0 = Instant::now();
        let mut q = QueueDelay::new(HZ);
        let base = u32::MAX - 90 * 500;
        for i in 0..100u64 {
            let stamp = base.wrapping_add((i * 20 * 90) as u32);
            q.sample(t0 + ms(i * 20 + 30), 7, stamp);
        }
        assert!(q.queue(t0 + ms(100 * 20 + 30)) < ms(1));
    }

    proptest! {
        /// Any stamps, any arrivals, any sessions: no panic, and what is kept bounded.
        #[test]
        fn any_input_is_taken(samples in proptest::collection::vec((0u64..20_000_000, any::<u32>(), 0u32..3), 1..300)) {
            let t0 = Instant::now();
            let mut q = QueueDelay::new(HZ);
            let mut at = t0;
            for (step_us, stamp, ssrc) in samples {
                at += Duration::from_micros(step_us % 50_000);
                q.sample(at, ssrc, stamp);
                let _ = q.queue(at);
                prop_assert!(q.long.kept.len() <= MAX_KEPT && q.short.kept.len() <= MAX_KEPT);
            }
        }
    }
}
