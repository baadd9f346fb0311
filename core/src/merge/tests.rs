use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

#[allow(clippy::disallowed_methods)] // Tests need one real instant to count from.
fn t0() -> Instant {
    Instant::now()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config() -> Config {
    Config {
        reorder_window: ms(100),
        max_held: 64,
        nack: true,
        nack_delay: ms(20),
        nack_attempts: 1,
        nack_retry: ms(30),
        adaptive_window: false,
        path_timeout: ms(500),
        hold_in_silence: None,
    }
}

/// Everything the buffer says until it waits.
fn drain(b: &mut Buffer<u64>) -> Vec<Output<u64>> {
    let mut out = Vec::new();
    loop {
        match b.poll_output() {
            Output::Timeout(_) => return out,
            o => out.push(o),
        }
    }
}

fn released(outputs: &[Output<u64>]) -> Vec<u64> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Packet { seq, item } => {
                assert_eq!(seq.0, *item, "item released under its own sequence number");
                Some(seq.0)
            }
            _ => None,
        })
        .collect()
}

/// The ranges the buffer asks for until it waits.
fn nacks(b: &mut Buffer<u64>) -> Vec<SeqRange> {
    drain(b)
        .into_iter()
        .filter_map(|o| match o {
            Output::Nack { range, .. } => Some(range),
            _ => None,
        })
        .collect()
}

fn packet(path: u8, seq: u64) -> Input<u64> {
    Input::Packet {
        path: PathId(path),
        seq: SeqNo(seq),
        item: seq,
    }
}

#[test]
fn a_flush_releases_what_is_held_and_starts_the_next_session_afresh() {
    let t = t0();
    let mut b = Buffer::new(config()).unwrap();
    for s in [10, 11, 13] {
        b.handle_input(t + ms(s), packet(0, s));
    }
    // The first packet waits one window (until 110 ms); the hole at 12 waits until 113.
    b.handle_timeout(t + ms(111));
    assert_eq!(released(&drain(&mut b)), [10, 11]);
    // 12 is missing, 13 held; the source restarts 50,000 numbers higher.
    b.flush();
    b.handle_input(t + ms(112), packet(0, 50_013));
    b.handle_input(t + ms(113), packet(0, 50_014));
    b.handle_timeout(t + ms(400));
    let out = drain(&mut b);
    assert_eq!(released(&out), [13, 50_013, 50_014]);
    assert_eq!(
        b.stats().gaps,
        1,
        "only the real hole, 12, is a gap: {out:?}"
    );
}

#[test]
fn a_start_told_before_any_packet_is_believed_only_near_the_first_packet() {
    let t = t0();
    // Near: the numbers between become holes to ask for.
    let mut b = Buffer::new(config()).unwrap();
    b.expect_from(t, SeqNo(100));
    b.handle_input(t + ms(1), packet(0, 103));
    let out = drain(&mut b);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Nack { range, .. } if range.first == SeqNo(100) && range.count == 3)),
        "{out:?}"
    );
    // Far (the stream moved on, to another session): ignored.
    let mut b = Buffer::new(config()).unwrap();
    b.expect_from(t, SeqNo(100));
    b.handle_input(t + ms(1), packet(0, 90_000));
    b.handle_timeout(t + ms(200));
    assert_eq!(released(&drain(&mut b)), [90_000]);
    assert_eq!(b.stats().gaps, 0);
}

#[test]
fn a_new_sessions_lost_start_is_asked_of_every_path_and_starts_it() {
    let t = t0();
    let mut b = Buffer::new(config()).unwrap();
    for (path, s) in [(0, 10), (1, 10), (0, 11), (1, 11)] {
        b.handle_input(t + ms(s), packet(path, s));
    }
    b.handle_timeout(t + ms(200));
    assert_eq!(released(&drain(&mut b)), [10, 11]);
    // The new session's first packet, 50_000, was lost on both paths.
    b.start_next_session(t + ms(201), false);
    b.handle_next_session(t + ms(201), PathId(0), SeqNo(50_002), 50_002);
    b.seek_before(t + ms(201), SeqNo(50_002), 8);
    let asked: Vec<(PathId, SeqRange)> = drain(&mut b)
        .into_iter()
        .filter_map(|o| match o {
            Output::Nack { range, path } => Some((path, range)),
            _ => None,
        })
        .collect();
    let range = SeqRange {
        first: SeqNo(49_994),
        count: 8,
    };
    assert_eq!(asked, [(PathId(0), range), (PathId(1), range)]);
    assert_eq!(b.stats().seeks, 1);
    // The answers come within the window: the session starts where it started.
    b.handle_input(t + ms(230), packet(1, 50_001));
    b.handle_input(t + ms(231), packet(0, 50_000));
    b.handle_timeout(t + ms(500));
    assert_eq!(released(&drain(&mut b)), [50_000, 50_001, 50_002]);
    assert_eq!(b.stats().gaps, 0, "numbers before the start are no gap");
    // Without repairs nothing is asked for.
    let mut b = Buffer::new(Config {
        nack: false,
        ..config()
    })
    .unwrap();
    b.handle_input(t, packet(0, 5));
    b.seek_before(t, SeqNo(5), 8);
    assert!(
        drain(&mut b)
            .iter()
            .all(|o| !matches!(o, Output::Nack { .. }))
    );
}

/// At the stream's first start the packets wait a window (the player's buffer fills,
/// unless its owner ends the wait). At a later session's start the sender told (an
/// edge's *session* notice), nothing waits: the first packet and each after it in order
/// are released as they come. Untold, the new start settles over a window.
#[test]
fn a_later_sessions_told_start_is_released_at_once() {
    let t = t0();
    let change = |told: bool| {
        let mut b = Buffer::new(config()).unwrap();
        b.expect_from(t, SeqNo(10));
        b.handle_input(t + ms(1), packet(0, 10));
        b.handle_input(t + ms(2), packet(0, 11));
        assert!(released(&drain(&mut b)).is_empty(), "the first start waits");
        b.handle_timeout(t + ms(101));
        assert_eq!(released(&drain(&mut b)), [10, 11]);
        b.start_next_session(t + ms(110), false);
        if told {
            b.expect_session_from(t + ms(110), SeqNo(500));
        }
        b.handle_next_session(t + ms(111), PathId(0), SeqNo(500), 500);
        b.handle_input(t + ms(112), packet(0, 501));
        let at_once = released(&drain(&mut b));
        b.handle_timeout(t + ms(212));
        (at_once, released(&drain(&mut b)), b.stats().gaps)
    };
    assert_eq!(change(true), (vec![500, 501], vec![], 0));
    assert_eq!(change(false), (vec![], vec![500, 501], 0));

    // A change during the first start's wait releases the old session at once; the new
    // one's told start is not waited for either.
    let mut b = Buffer::new(config()).unwrap();
    b.expect_from(t, SeqNo(10));
    b.handle_input(t + ms(1), packet(0, 10));
    b.start_next_session(t + ms(5), false);
    b.expect_session_from(t + ms(5), SeqNo(500));
    b.handle_next_session(t + ms(6), PathId(0), SeqNo(500), 500);
    assert_eq!(released(&drain(&mut b)), [10, 500]);
}

#[test]
fn the_new_sessions_holes_are_asked_for_while_the_change_waits() {
    let t = t0();
    let mut b = Buffer::new(config()).unwrap();
    for s in [10, 11] {
        b.handle_input(t + ms(s), packet(0, s));
    }
    b.handle_timeout(t + ms(200));
    drain(&mut b);
    // The old session's tail is still awaited (12 lost), so the new one waits aside.
    b.expect_through(t + ms(201), SeqNo(12));
    b.start_next_session(t + ms(202), false);
    b.expect_session_from(t + ms(202), SeqNo(500));
    for s in [500, 501, 504, 505] {
        b.handle_next_session(t + ms(203), PathId(0), SeqNo(s), s);
    }
    // 502 and 503 are asked for at once, while the change waits for 12.
    assert!(nacks(&mut b).contains(&SeqRange {
        first: SeqNo(502),
        count: 2
    }));
    // Their repairs, then 12's, and everything is released in order.
    for s in [503, 502] {
        b.handle_next_session(t + ms(230), PathId(0), SeqNo(s), s);
    }
    b.handle_input(t + ms(240), packet(0, 12));
    let mut got = Vec::new();
    for at in [300, 400, 500, 600] {
        b.handle_timeout(t + ms(at));
        got.extend(released(&drain(&mut b)));
    }
    assert_eq!(got, [12, 500, 501, 502, 503, 504, 505]);
    assert_eq!(b.stats().gaps, 0);
}

#[test]
fn an_old_sessions_lost_tail_is_asked_for_and_waited_for_by_the_change() {
    let t = t0();
    let mut b = Buffer::new(config()).unwrap();
    for s in [10, 11] {
        b.handle_input(t + ms(s), packet(0, s));
    }
    b.handle_timeout(t + ms(200));
    assert_eq!(released(&drain(&mut b)), [10, 11]);
    // 12 and 13 ended the session and were lost: nothing after them in this session
    // says so, but the sender's word of where it ended does.
    b.expect_through(t + ms(201), SeqNo(13));
    assert_eq!(b.stats().tail_holes, 2);
    b.start_next_session(t + ms(202), false);
    b.handle_next_session(t + ms(202), PathId(0), SeqNo(90_000), 90_000);
    let asked: Vec<SeqRange> = nacks(&mut b);
    assert!(
        asked.is_empty(),
        "asked only after the repair delay: {asked:?}"
    );
    b.handle_timeout(t + ms(222));
    let asked: Vec<SeqRange> = nacks(&mut b);
    assert_eq!(
        asked,
        [SeqRange {
            first: SeqNo(12),
            count: 2
        }]
    );
    // The repairs come within the window: the old session ends whole, then the new one.
    b.handle_input(t + ms(240), packet(0, 13));
    b.handle_input(t + ms(241), packet(0, 12));
    b.handle_timeout(t + ms(242));
    assert_eq!(released(&drain(&mut b)), [12, 13]);
    b.handle_timeout(t + ms(400));
    assert_eq!(released(&drain(&mut b)), [90_000]);
    assert_eq!(b.stats().gaps, 0);
    // What is held or released already, or far beyond what is held, changes nothing.
    b.expect_through(t + ms(401), SeqNo(13));
    b.expect_through(t + ms(401), SeqNo(90_000));
    b.expect_through(t + ms(401), SeqNo(190_000));
    assert!(released(&drain(&mut b)).is_empty());
    assert_eq!(b.stats().tail_holes, 2);
}

#[test]
fn a_new_session_waits_for_the_old_ones_reordered_packets_at_most_a_window() {
    let t = t0();
    let mut b = Buffer::new(config()).unwrap();
    b.handle_input(t + ms(10), packet(0, 10));
    b.handle_input(t + ms(11), packet(0, 11));
    // 12 is missing from 60 ms on: waited for until 160 ms.
    b.handle_input(t + ms(60), packet(0, 13));
    b.handle_timeout(t + ms(111));
    assert_eq!(released(&drain(&mut b)), [10, 11]);
    // The new session's first packet arrives before the old one's 12.
    b.start_next_session(t + ms(112), false);
    b.handle_next_session(t + ms(112), PathId(0), SeqNo(50_000), 50_000);
    assert!(b.changing_session());
    b.handle_timeout(t + ms(113));
    assert!(
        released(&drain(&mut b)).is_empty(),
        "the old hole is still waited for"
    );
    b.handle_input(t + ms(114), packet(0, 12));
    assert_eq!(released(&drain(&mut b)), [12, 13]);
    assert!(!b.changing_session(), "no hole left: the new session began");
    b.handle_next_session(t + ms(115), PathId(0), SeqNo(50_001), 50_001);
    b.handle_timeout(t + ms(400));
    assert_eq!(released(&drain(&mut b)), [50_000, 50_001]);
    assert_eq!(b.stats().gaps, 0);
    // A hole that never fills is given up when its window ends (never later than a
    // window after the change began), then the new session follows.
    let mut b = Buffer::new(config()).unwrap();
    b.handle_input(t + ms(10), packet(0, 10));
    b.handle_input(t + ms(50), packet(0, 12));
    b.start_next_session(t + ms(60), false);
    b.handle_next_session(t + ms(60), PathId(0), SeqNo(50_000), 50_000);
    b.handle_timeout(t + ms(149));
    assert_eq!(
        released(&drain(&mut b)),
        [10],
        "11 is waited for until 150 ms"
    );
    assert!(b.changing_session());
    b.handle_timeout(t + ms(151));
    let out = drain(&mut b);
    assert_eq!(released(&out), [12], "{out:?}");
    b.handle_timeout(t + ms(400));
    assert_eq!(released(&drain(&mut b)), [50_000]);
    assert_eq!(b.stats().gaps, 1);
}

#[test]
fn holes_the_sender_gave_up_are_released_at_once_and_no_others() {
    let t = t0();
    let mut b = Buffer::new(config()).unwrap();
    for s in [10, 11, 14, 15, 17] {
        b.handle_input(t + ms(s), packet(0, s));
    }
    b.handle_timeout(t + ms(111));
    assert_eq!(released(&drain(&mut b)), [10, 11]);
    // 12, 13 and 16 missing; the sender gave up 12 and 13 only.
    b.give_up(t + ms(112), SeqNo(12), 2);
    b.handle_timeout(t + ms(113));
    let out = drain(&mut b);
    assert_eq!(
        released(&out),
        [14, 15],
        "released without waiting the window"
    );
    assert_eq!(b.stats().gaps, 2, "16 still waits: {out:?}");
    b.handle_input(t + ms(120), packet(0, 16));
    b.handle_timeout(t + ms(121));
    assert_eq!(released(&drain(&mut b)), [16, 17]);
}

#[test]
fn a_repeated_ask_goes_to_the_next_path_whatever_else_is_asked_between() {
    let t = t0();
    let mut b = Buffer::new(Config {
        nack_attempts: 4,
        reorder_window: ms(400),
        ..config()
    })
    .unwrap();
    // Two paths, both delivering; 10 lost on both.
    for s in 0..10 {
        b.handle_input(t + ms(s), packet(0, s));
        b.handle_input(t + ms(s), packet(1, s));
    }
    b.handle_input(t + ms(11), packet(0, 11));
    b.handle_input(t + ms(11), packet(1, 11));
    let mut paths = Vec::new();
    let mut other = 20;
    for step in 0..12 {
        let now = t + ms(12 + 10 * step);
        // Other holes keep appearing, so the global turn keeps moving.
        other += 2;
        b.handle_input(now, packet(0, other));
        b.handle_input(now, packet(1, other));
        b.handle_timeout(now);
        for o in drain(&mut b) {
            if let Output::Nack { range, path } = o {
                if range.first == SeqNo(10) {
                    paths.push(path.0);
                }
            }
        }
    }
    assert!(paths.len() >= 3, "{paths:?}");
    assert!(
        paths.windows(2).all(|w| w[0] != w[1]),
        "each repeat on the other path: {paths:?}"
    );
}

#[test]
fn a_start_told_before_the_first_release_makes_the_lost_first_packets_holes() {
    let t = t0();
    let mut b = Buffer::new(config()).unwrap();
    // The first two packets (the keyframe the sender started at) are lost.
    b.handle_input(t, packet(0, 12));
    b.handle_input(t + ms(1), packet(0, 13));
    b.expect_from(t + ms(2), SeqNo(10));
    let out = drain(&mut b);
    assert!(
        out.iter().any(|o| matches!(o, Output::Nack { range, .. } if range.first == SeqNo(10) && range.count == 2)),
        "{out:?}"
    );
    b.handle_input(t + ms(30), packet(0, 10));
    b.handle_input(t + ms(31), packet(0, 11));
    b.handle_timeout(t + ms(200));
    assert_eq!(released(&drain(&mut b)), [10, 11, 12, 13]);
    // Once released, a later start changes nothing.
    b.expect_from(t + ms(300), SeqNo(5));
    b.handle_input(t + ms(301), packet(0, 14));
    b.handle_timeout(t + ms(500));
    assert_eq!(released(&drain(&mut b)), [14]);
    assert_eq!(b.stats().gaps, 0);
}

#[test]
fn in_order_passes_through_at_once() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(10)).unwrap();
    for s in 10..20 {
        b.handle_input(t, packet(0, s));
        assert_eq!(released(&drain(&mut b)), vec![s]);
    }
    assert_eq!(b.stats().released, 10);
    assert_eq!(b.stats().gaps, 0);
    assert_eq!(b.held(), 0);
}

#[test]
fn first_copy_wins_and_duplicates_are_dropped() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(0)).unwrap();
    b.handle_input(t, packet(1, 0));
    b.handle_input(t, packet(0, 0)); // held copy exists: duplicate
    assert_eq!(released(&drain(&mut b)), vec![0]);
    b.handle_input(t, packet(2, 0)); // already released: duplicate
    assert!(drain(&mut b).is_empty());
    assert_eq!(b.path_stats(PathId(1)).first, 1);
    assert_eq!(b.path_stats(PathId(0)).duplicates, 1);
    assert_eq!(b.path_stats(PathId(2)).duplicates, 1);
    assert_eq!(b.stats().duplicates, 2);
    assert_eq!(b.stats().late, 0);
}

#[test]
fn packets_out_of_order_are_released_in_order() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(0)).unwrap();
    b.handle_input(t, packet(0, 2));
    b.handle_input(t, packet(0, 1));
    assert!(released(&drain(&mut b)).is_empty(), "0 is still awaited");
    b.handle_input(t + ms(10), packet(1, 0));
    assert_eq!(released(&drain(&mut b)), vec![0, 1, 2]);
    assert_eq!(b.stats().gaps, 0);
}

#[test]
fn gap_after_window() {
    let t = t0();
    let mut b = Buffer::starting_at(
        Config {
            nack: false,
            ..config()
        },
        SeqNo(0),
    )
    .unwrap();
    b.handle_input(t, packet(0, 0));
    b.handle_input(t + ms(5), packet(0, 3));
    assert_eq!(released(&drain(&mut b)), vec![0]);
    assert_eq!(b.poll_output(), Output::Timeout(Some(t + ms(105))));
    b.handle_timeout(t + ms(104));
    assert!(drain(&mut b).is_empty());
    b.handle_timeout(t + ms(105));
    assert_eq!(
        drain(&mut b),
        vec![
            Output::Gap {
                first: SeqNo(1),
                count: 2
            },
            Output::Packet {
                seq: SeqNo(3),
                item: 3
            }
        ]
    );
    assert_eq!(b.stats().gaps, 2);
    assert_eq!(b.stats().gap_events, 1);

    // The given-up packet turns up: late, not released, not a duplicate.
    b.handle_input(t + ms(200), packet(1, 2));
    assert!(drain(&mut b).is_empty());
    assert_eq!(b.path_stats(PathId(1)).late, 1);
    assert_eq!(b.stats().late, 1);
}

#[test]
fn start_waits_one_window_for_reordered_first_packets() {
    let t = t0();
    let mut b = Buffer::new(config()).unwrap();
    b.handle_input(t, packet(0, 5));
    assert!(drain(&mut b).is_empty(), "held while settling");
    b.handle_input(t + ms(30), packet(1, 3));
    b.handle_input(t + ms(40), packet(1, 4));
    b.handle_timeout(t + ms(100));
    assert_eq!(released(&drain(&mut b)), vec![3, 4, 5]);
    // After the start, anything older is late.
    b.handle_input(t + ms(110), packet(1, 2));
    assert!(drain(&mut b).is_empty());
    assert_eq!(b.stats().late, 1);
}

#[test]
fn jump_far_ahead_flushes_without_growing() {
    let t = t0();
    let mut b = Buffer::starting_at(
        Config {
            nack: false,
            ..config()
        },
        SeqNo(0),
    )
    .unwrap();
    b.handle_input(t, packet(0, 0));
    b.handle_input(t, packet(0, 2));
    // Two paths say the stream is far ahead: believed.
    b.handle_input(t, packet(0, 1 << 40));
    b.handle_input(t, packet(1, (1 << 40) + 1));
    let mut out = drain(&mut b);
    // The window behind the jump stays open for reordered copies...
    b.handle_input(t + ms(10), packet(1, (1 << 40) - 1));
    out.extend(drain(&mut b));
    assert_eq!(b.held(), 64);
    // ...and what never came is given up after the window.
    b.handle_timeout(t + ms(100));
    out.extend(drain(&mut b));
    assert_eq!(
        out,
        vec![
            Output::Packet {
                seq: SeqNo(0),
                item: 0
            },
            Output::Gap {
                first: SeqNo(1),
                count: 1
            },
            Output::Packet {
                seq: SeqNo(2),
                item: 2
            },
            Output::Gap {
                first: SeqNo(3),
                count: (1 << 40) - 65
            },
            Output::Gap {
                first: SeqNo((1 << 40) - 62),
                count: 61
            },
            Output::Packet {
                seq: SeqNo((1 << 40) - 1),
                item: (1 << 40) - 1
            },
            Output::Gap {
                first: SeqNo(1 << 40),
                count: 1
            },
            Output::Packet {
                seq: SeqNo((1 << 40) + 1),
                item: (1 << 40) + 1
            },
        ]
    );
    assert_eq!(b.stats().jumps, 1);
    assert_eq!(b.stats().unconfirmed_jumps, 1);
    assert_eq!(b.held(), 0);
}

/// A number far ahead is not believed on one path's word while other paths deliver:
/// a forged packet (or a run of them) a billion ahead moves nothing; the other path's
/// agreement does.
#[test]
fn a_far_jump_on_one_paths_word_is_not_believed() {
    let t = t0();
    let mut b = Buffer::starting_at(
        Config {
            nack: false,
            ..config()
        },
        SeqNo(0),
    )
    .unwrap();
    b.handle_input(t, packet(0, 0));
    b.handle_input(t, packet(1, 1));
    for i in 0..20 {
        b.handle_input(t + ms(10), packet(0, (1 << 40) + i));
    }
    b.handle_input(t + ms(20), packet(1, 2));
    b.handle_timeout(t + ms(300));
    let out = drain(&mut b);
    assert_eq!(
        out.iter()
            .filter_map(|o| match o {
                Output::Packet { seq, .. } => Some(seq.0),
                _ => None,
            })
            .collect::<Vec<_>>(),
        [0, 1, 2],
        "the stream went on where it was"
    );
    assert_eq!((b.stats().jumps, b.stats().unconfirmed_jumps), (0, 20));
    // The other path goes there too: now it is believed.
    b.handle_input(t + ms(400), packet(1, (1 << 40) + 21));
    b.handle_timeout(t + ms(700));
    let out = drain(&mut b);
    assert!(out.contains(&Output::Packet {
        seq: SeqNo((1 << 40) + 21),
        item: (1 << 40) + 21
    }));
    assert_eq!(b.stats().jumps, 1);
}

/// With no other path delivering (a lone path, or the others dead), a run of numbers in
/// a row past the jump is believed.
#[test]
fn a_lone_path_is_believed_after_a_run() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(0)).unwrap();
    b.handle_input(t, packet(0, 0));
    let later = t + ms(1000);
    for i in 0..8 {
        b.handle_input(later, packet(0, (1 << 40) + i));
    }
    assert_eq!(b.stats().jumps, 1);
    assert_eq!(b.stats().unconfirmed_jumps, 7);
}

/// Found by the fuzzer: the same number at the very end of the space was released twice,
/// because the next number saturated.
#[test]
fn sequence_numbers_at_the_end_of_the_space_are_refused() {
    let t = t0();
    let mut b = Buffer::new(config()).unwrap();
    for i in 0..3 {
        b.handle_input(t + ms(255 * i), packet(7, u64::MAX));
        b.handle_input(t + ms(255 * i), packet(7, MAX_SEQ));
        assert!(drain(&mut b).is_empty());
    }
    assert_eq!(b.path_stats(PathId(7)).malformed, 6);
    assert_eq!(b.stats().released, 0);
}

#[test]
fn holes_never_exceed_max_held() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(0)).unwrap();
    // Every other packet: holes everywhere, a hostile pattern.
    for i in 0..10_000u64 {
        b.handle_input(t + ms(i / 100), packet(0, 1 + 2 * i));
        drain(&mut b);
        assert!(b.held() <= 64);
    }
}

#[test]
fn flood_of_old_numbers_is_counted_and_ignored() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(1_000_000)).unwrap();
    b.handle_input(t, packet(0, 1_000_000));
    drain(&mut b);
    for s in 0..100_000u64 {
        b.handle_input(t, packet(1, s));
        assert!(drain(&mut b).is_empty());
    }
    assert_eq!(b.path_stats(PathId(1)).late, 100_000);
    assert_eq!(b.held(), 0);
}

#[test]
fn nack_when_every_healthy_path_went_past() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(0)).unwrap();
    for p in 0..3 {
        b.handle_input(t, packet(p, 0));
    }
    drain(&mut b);
    b.handle_input(t + ms(1), packet(0, 2));
    assert!(
        !drain(&mut b)
            .iter()
            .any(|o| matches!(o, Output::Nack { .. })),
        "paths 1 and 2 may still deliver 1"
    );
    b.handle_input(t + ms(2), packet(1, 2));
    b.handle_input(t + ms(3), packet(2, 3));
    let nacks: Vec<_> = nacks(&mut b);
    assert_eq!(
        nacks,
        vec![SeqRange {
            first: SeqNo(1),
            count: 1
        }]
    );
    // Asked once only.
    b.handle_timeout(t + ms(50));
    assert!(
        !drain(&mut b)
            .iter()
            .any(|o| matches!(o, Output::Nack { .. }))
    );
    // The repair arrives in time.
    b.handle_input(t + ms(60), packet(0, 1));
    assert_eq!(released(&drain(&mut b)), vec![1, 2, 3]);
    assert_eq!(b.stats().nacked, 1);
    assert_eq!(b.stats().repaired, 1);
    assert_eq!(b.stats().gaps, 0);
}

#[test]
fn nack_after_delay_when_a_path_lags() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(0)).unwrap();
    b.handle_input(t, packet(0, 0));
    b.handle_input(t, packet(1, 0));
    drain(&mut b);
    b.handle_input(t + ms(1), packet(0, 3));
    assert_eq!(b.poll_output(), Output::Timeout(Some(t + ms(21))));
    b.handle_timeout(t + ms(21));
    let out = drain(&mut b);
    assert_eq!(
        out,
        vec![Output::Nack {
            range: SeqRange {
                first: SeqNo(1),
                count: 2
            },
            path: PathId(0)
        }]
    );
}

#[test]
fn nacks_go_round_robin_over_healthy_paths_only() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(0)).unwrap();
    // Path 2 delivered once, long ago: unhealthy.
    b.handle_input(t, packet(2, 0));
    drain(&mut b);
    let mut seq = 1;
    let mut paths = Vec::new();
    for i in 0..6u64 {
        let now = t + ms(1000 + i * 200);
        b.handle_input(now, packet(0, seq));
        b.handle_input(now, packet(1, seq));
        // Leave a hole at seq+1, then go past it on both live paths.
        b.handle_input(now, packet(0, seq + 2));
        b.handle_input(now, packet(1, seq + 2));
        for o in drain(&mut b) {
            if let Output::Nack { range, path } = o {
                assert_eq!(range.first, SeqNo(seq + 1));
                paths.push(path.0);
            }
        }
        b.handle_timeout(now + ms(150));
        drain(&mut b);
        seq += 3;
    }
    assert_eq!(paths, vec![0, 1, 0, 1, 0, 1]);
    assert!(!b.is_healthy(PathId(2)));
}

#[test]
fn unanswered_nack_is_repeated_on_the_next_path() {
    let t = t0();
    let mut b = Buffer::starting_at(
        Config {
            nack_attempts: 3,
            ..config()
        },
        SeqNo(0),
    )
    .unwrap();
    for p in 0..3 {
        b.handle_input(t, packet(p, 0));
        b.handle_input(t, packet(p, 2));
    }
    let mut asks = Vec::new();
    let mut collect = |b: &mut Buffer<u64>| {
        for o in drain(b) {
            if let Output::Nack { range, path } = o {
                assert_eq!(
                    range,
                    SeqRange {
                        first: SeqNo(1),
                        count: 1
                    }
                );
                asks.push(path.0);
            }
        }
    };
    collect(&mut b);
    b.handle_timeout(t + ms(29));
    collect(&mut b);
    b.handle_timeout(t + ms(30));
    collect(&mut b);
    b.handle_timeout(t + ms(60));
    collect(&mut b);
    b.handle_timeout(t + ms(95));
    collect(&mut b);
    assert_eq!(
        asks,
        vec![0, 1, 2],
        "three asks, 30 ms apart, each on the next path"
    );
    assert_eq!(b.stats().nacked, 3);
    assert_eq!(b.stats().nack_retries, 2);
}

#[test]
fn answered_nack_is_not_repeated() {
    let t = t0();
    let mut b = Buffer::starting_at(
        Config {
            nack_attempts: 3,
            ..config()
        },
        SeqNo(0),
    )
    .unwrap();
    b.handle_input(t, packet(0, 0));
    b.handle_input(t, packet(0, 2));
    assert!(
        drain(&mut b)
            .iter()
            .any(|o| matches!(o, Output::Nack { .. }))
    );
    b.handle_input(t + ms(5), packet(0, 1));
    assert_eq!(released(&drain(&mut b)), vec![1, 2]);
    b.handle_timeout(t + ms(99));
    assert!(drain(&mut b).is_empty());
    assert_eq!(b.stats().nack_retries, 0);
    assert_eq!(b.stats().repaired, 1);
}

#[test]
fn malformed_is_counted_per_path() {
    let t = t0();
    let mut b: Buffer<u64> = Buffer::new(config()).unwrap();
    b.handle_input(t, Input::Malformed { path: PathId(4) });
    assert_eq!(b.path_stats(PathId(4)).malformed, 1);
    assert_eq!(b.paths().count(), 1);
}

#[test]
fn reset_gives_up_what_is_held() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(0)).unwrap();
    b.handle_input(t, packet(0, 2));
    b.reset();
    assert_eq!(
        drain(&mut b),
        vec![Output::Gap {
            first: SeqNo(0),
            count: 3
        }]
    );
    b.handle_input(t, packet(0, 500));
    b.handle_timeout(t + ms(100));
    assert_eq!(released(&drain(&mut b)), vec![500]);
}

#[test]
fn config_validation() {
    let bad = [
        Config {
            reorder_window: Duration::ZERO,
            ..config()
        },
        Config {
            max_held: 8,
            ..config()
        },
        Config {
            nack_delay: ms(100),
            ..config()
        },
        Config {
            nack_attempts: 0,
            ..config()
        },
    ];
    for c in bad {
        assert!(Buffer::<u64>::new(c.clone()).is_err(), "{c:?}");
    }
    assert!(Config::default().validate().is_ok());
}

/// One copy of one packet on one path, arriving at `at` ms.
#[derive(Debug, Clone)]
struct Arrival {
    at: u64,
    path: u8,
    seq: u64,
}

/// K paths; each loses packets with its own probability and may duplicate them; each copy
/// arrives at its send time plus a path delay plus jitter, all under the reorder window.
fn scenario() -> impl Strategy<Value = (u64, Vec<Arrival>)> {
    (1usize..=4, 2u64..400)
        .prop_flat_map(|(k, n)| {
            let per_path = (
                0u64..30, // base delay, ms
                // loss roll, jitter (ms), duplicate roll; delay + jitter * 1.5 stays under the window
                prop::collection::vec((0u32..100, 0u64..40, 0u32..100), n as usize),
                0u32..60, // loss %
            );
            (Just(n), prop::collection::vec(per_path, k))
        })
        .prop_map(|(n, paths)| {
            let mut arrivals = Vec::new();
            for (p, (delay, rolls, loss)) in paths.into_iter().enumerate() {
                for (seq, (roll, jitter, dup)) in rolls.into_iter().enumerate() {
                    let seq = seq as u64;
                    // The last packet always arrives on path 0 so the tail is known.
                    let lost = roll < loss && !(p == 0 && seq == n - 1);
                    if lost {
                        continue;
                    }
                    let at = seq * 2 + delay + jitter;
                    arrivals.push(Arrival {
                        at,
                        path: p as u8,
                        seq,
                    });
                    if dup < 10 {
                        arrivals.push(Arrival {
                            at: at + jitter / 2,
                            path: p as u8,
                            seq,
                        });
                    }
                }
            }
            arrivals.sort_by_key(|a| a.at);
            (n, arrivals)
        })
}

fn run(b: &mut Buffer<u64>, t: Instant, arrivals: &[Arrival]) -> (Vec<u64>, u64) {
    let mut out = Vec::new();
    for a in arrivals {
        b.handle_timeout(t + ms(a.at));
        out.extend(drain(b));
        b.handle_input(t + ms(a.at), packet(a.path, a.seq));
        out.extend(drain(b));
    }
    let end = arrivals.last().map_or(0, |a| a.at) + 1000;
    b.handle_timeout(t + ms(end));
    out.extend(drain(b));
    let gaps: u64 = out
        .iter()
        .map(|o| match o {
            Output::Gap { count, .. } => *count,
            _ => 0,
        })
        .sum();
    (released(&out), gaps)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever the interleaving, loss and duplication (reordering within the window), the
    /// output is the original sequence minus what every path lost, in order, and each
    /// packet lost everywhere is counted as a gap exactly once.
    #[test]
    fn merge_output_is_the_union_in_order((n, arrivals) in scenario(), nack in any::<bool>()) {
        let t = t0();
        let config = Config { nack, ..config() };
        let mut expected: Vec<u64> = arrivals.iter().map(|a| a.seq).collect();
        expected.sort_unstable();
        expected.dedup();
        let lost_everywhere = n - expected.len() as u64;

        let mut b = Buffer::starting_at(config.clone(), SeqNo(0)).unwrap();
        let (got, gaps) = run(&mut b, t, &arrivals);
        prop_assert_eq!(&got, &expected);
        prop_assert_eq!(gaps, lost_everywhere);
        prop_assert_eq!(b.stats().gaps, lost_everywhere);
        prop_assert_eq!(b.stats().late, 0);
        let firsts: u64 = b.paths().map(|(_, s)| s.first).sum();
        prop_assert_eq!(firsts, expected.len() as u64);
        let received: u64 = b.paths().map(|(_, s)| s.received).sum();
        prop_assert_eq!(received, arrivals.len() as u64);
        prop_assert_eq!(b.stats().duplicates, arrivals.len() as u64 - expected.len() as u64);
    }

    /// Without being told where the stream starts, the same holds once packet 0 arrives
    /// somewhere: the start is held one window for reordered copies.
    #[test]
    fn merge_finds_the_start_itself((n, mut arrivals) in scenario()) {
        if !arrivals.iter().any(|a| a.seq == 0) {
            arrivals.insert(0, Arrival { at: 0, path: 0, seq: 0 });
        }
        let t = t0();
        let mut expected: Vec<u64> = arrivals.iter().map(|a| a.seq).collect();
        expected.sort_unstable();
        expected.dedup();
        let mut b = Buffer::new(config()).unwrap();
        let (got, gaps) = run(&mut b, t, &arrivals);
        prop_assert_eq!(&got, &expected);
        prop_assert_eq!(gaps, n - expected.len() as u64);
    }
}

/// Every path delivers `seq` at its own delay after `t`: path 0 `lag0` late, the others
/// at once; `skip` is lost on paths 1 and 2.
fn feed(b: &mut Buffer<u64>, t: Instant, upto: u64, lag0: u64, skip: Option<u64>) {
    for s in 1..=upto {
        let at = t + ms(s * 2);
        for p in [1u8, 2] {
            if Some(s) != skip {
                b.handle_input(at, packet(p, s));
            }
        }
        b.handle_timeout(at);
        drain(b);
    }
    for s in 1..=upto {
        b.handle_input(t + ms(s * 2 + lag0), packet(0, s));
    }
}

#[test]
fn a_path_far_behind_the_others_is_not_asked_while_a_prompt_one_can_answer() {
    let t = t0();
    let mut b = Buffer::starting_at(
        Config {
            nack_attempts: 4,
            reorder_window: ms(200),
            ..config()
        },
        SeqNo(1),
    )
    .unwrap();
    // Path 0's copies come 150 ms behind the others'.
    feed(&mut b, t, 40, 150, None);
    b.handle_timeout(t + ms(300));
    drain(&mut b);
    // 41 is lost on the two prompt paths; every ask goes to one of them.
    let t1 = t + ms(300);
    for s in 41..=60 {
        let at = t1 + ms((s - 40) * 2);
        if s != 41 {
            b.handle_input(at, packet(1, s));
            b.handle_input(at, packet(2, s));
        }
        b.handle_timeout(at);
        for o in drain(&mut b) {
            if let Output::Nack { path, .. } = o {
                assert_ne!(path, PathId(0), "the late path was asked");
            }
        }
    }
    let mut asked = Vec::new();
    for k in 0..10 {
        b.handle_timeout(t1 + ms(40 + k * 20));
        for o in drain(&mut b) {
            if let Output::Nack { path, .. } = o {
                asked.push(path.0);
            }
        }
    }
    assert!(!asked.is_empty());
    assert!(
        asked.iter().all(|p| *p != 0),
        "the late path was asked: {asked:?}"
    );
}

#[test]
fn a_path_silent_beyond_its_usual_gaps_is_not_asked_and_does_not_hold_asks_back() {
    let t = t0();
    let mut b = Buffer::starting_at(config(), SeqNo(1)).unwrap();
    // Three paths deliver every 2 ms.
    for s in 1..=30 {
        for p in 0..3 {
            b.handle_input(t + ms(s * 2), packet(p, s));
        }
    }
    drain(&mut b);
    // Paths 0 and 1 go silent at 60 ms (an outage); path 2 goes on and loses 31.
    for s in 32..=50 {
        b.handle_input(t + ms(s * 2), packet(2, s));
    }
    // Silence on 0 and 1 is well beyond their usual gap: 31 is asked of path 2 at once,
    // without waiting out the repair delay for paths that may still deliver it.
    let out = drain(&mut b);
    let asks: Vec<(PathId, SeqRange)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Nack { range, path } => Some((*path, *range)),
            _ => None,
        })
        .collect();
    assert_eq!(
        asks,
        [(
            PathId(2),
            SeqRange {
                first: SeqNo(31),
                count: 1
            }
        )]
    );
}

/// With `config`, from sequence number 1: 12 is lost, asked for and answered 10 ms
/// later (the round trip is measured), then 15 is lost and never answered. The times
/// (ms) of the asks for it over the `for_ms` after it.
fn ask_times(config: Config, for_ms: u64) -> Vec<u64> {
    ask_times_queued(config, for_ms, Duration::ZERO)
}

/// [`ask_times`], its path's packets said to wait `queue` in a queue on the way.
fn ask_times_queued(config: Config, for_ms: u64, queue: Duration) -> Vec<u64> {
    let t = t0();
    let mut b = Buffer::starting_at(config, SeqNo(1)).unwrap();
    b.set_queue(PathId(0), queue);
    for s in 1..=11 {
        b.handle_input(t + ms(s), packet(0, s));
    }
    b.handle_input(t + ms(13), packet(0, 13));
    b.handle_timeout(t + ms(40));
    assert_eq!(nacks(&mut b).len(), 1);
    b.handle_input(t + ms(50), packet(0, 12));
    b.handle_input(t + ms(60), packet(0, 14));
    b.handle_input(t + ms(61), packet(0, 16));
    let mut times = Vec::new();
    for k in 0..for_ms {
        b.handle_timeout(t + ms(61 + k));
        for _ in nacks(&mut b) {
            times.push(k + 61);
        }
    }
    times
}

#[test]
fn with_a_measured_round_trip_asks_go_on_while_an_answer_can_come_in_time() {
    let times = ask_times(
        Config {
            reorder_window: ms(200),
            nack_attempts: 2,
            nack_retry: ms(40),
            ..config()
        },
        300,
    );
    // More than the two attempts configured, at the round trip's pace (10 ms plus its
    // variation, not 40 ms), and none whose answer could not come within the window.
    assert!(times.len() > 2, "{times:?}");
    assert!(times.windows(2).all(|w| w[1] - w[0] < 40), "{times:?}");
    assert!(times.iter().all(|t| *t < 61 + 200), "{times:?}");
}

/// A path whose packets wait 150 ms in a queue: its round trip timed from the last ask
/// is 10 ms, but an ask is repeated no sooner than the queue's wait, so its answer can
/// come first (asked at the 10 ms pace, every ask's answer would join the full queue).
#[test]
fn asks_on_a_path_with_a_queue_wait_for_it() {
    let config = Config {
        reorder_window: ms(500),
        nack_attempts: 4,
        nack_retry: ms(100),
        ..config()
    };
    let fast = ask_times(config.clone(), 500);
    assert!(fast.windows(2).any(|w| w[1] - w[0] < 40), "{fast:?}");
    let queued = ask_times_queued(config, 500, ms(150));
    assert!(!queued.is_empty(), "asked at all");
    assert!(queued.windows(2).all(|w| w[1] - w[0] >= 150), "{queued:?}");
    assert!(queued.len() < fast.len(), "{queued:?} against {fast:?}");
}

/// A long fixed window (a viewer's 10 s buffer): beyond the attempts configured, the
/// asks left spread over the window, so a hole whose answers a congested link drops for
/// its first seconds is still asked for once it drains (at the round trip's pace, all 12
/// asks were spent in its first quarter of a second).
#[test]
fn a_long_window_spreads_its_last_asks_over_the_whole_window() {
    let times = ask_times(
        Config {
            reorder_window: ms(10_000),
            nack_attempts: 4,
            nack_retry: ms(2000),
            nack_delay: ms(20),
            adaptive_window: false,
            ..config()
        },
        10_000,
    );
    assert!(times.len() <= usize::from(MAX_ASKS), "{times:?}");
    assert!(times.len() >= 8, "{times:?}");
    assert!(
        times.iter().any(|t| (6_000..10_060).contains(t)),
        "an ask after the link drained: {times:?}"
    );
    assert!(times.iter().all(|t| *t < 10_060), "{times:?}");
}

/// The window as a cap: with a repair round trip of 10 ms measured on a path, a hole
/// nobody answers is given up once the asks it can have are spent (the NACK delay and
/// 12 asks at that pace), not after the whole second configured; a fixed window waits
/// all of it.
#[test]
fn an_adaptive_window_gives_up_when_the_measured_paths_can_no_longer_answer() {
    let give_up_at = |adaptive: bool| {
        let t = t0();
        let mut b = Buffer::starting_at(
            Config {
                reorder_window: ms(1000),
                nack_attempts: 2,
                nack_retry: ms(40),
                adaptive_window: adaptive,
                ..config()
            },
            SeqNo(1),
        )
        .unwrap();
        for s in 1..=11 {
            b.handle_input(t + ms(s), packet(0, s));
        }
        // 12 is lost, asked, and answered 10 ms later: the round trip is measured.
        b.handle_input(t + ms(13), packet(0, 13));
        b.handle_timeout(t + ms(40));
        assert_eq!(nacks(&mut b).len(), 1);
        b.handle_input(t + ms(50), packet(0, 12));
        // 15 is lost and never answered; the stream goes on.
        b.handle_input(t + ms(60), packet(0, 14));
        for k in 0..1500u64 {
            let now = t + ms(61 + k);
            // One packet every 20 ms: the 64 held stay under the buffer's bound.
            if k % 20 == 0 {
                b.handle_input(now, packet(0, 16 + k / 20));
            }
            b.handle_timeout(now);
            for o in drain(&mut b) {
                if let Output::Gap { first, .. } = o {
                    assert_eq!(first, SeqNo(15));
                    return (k + 61, b.window());
                }
            }
        }
        panic!("15 was never given up");
    };
    let (fixed, w) = give_up_at(false);
    assert!(
        (1000..1100).contains(&fixed),
        "fixed: given up at {fixed} ms"
    );
    assert_eq!(w, ms(1000));
    let (adaptive, w) = give_up_at(true);
    assert!(
        adaptive < 500 && w < ms(500),
        "adaptive: given up at {adaptive} ms with a {w:?} window"
    );
}

/// Packets 10-13 with 12 lost, then no packet on any path until `back_ms`, when 14
/// comes, then 12 (a repair from a restarted sender) 40 ms later. With `alive`, the
/// sender's keepalives are heard every 100 ms meanwhile. What was released, and the
/// stats.
fn silence(hold: Option<Duration>, back_ms: u64, alive: bool) -> (Vec<Output<u64>>, Stats) {
    let t = t0();
    let mut b = Buffer::new(Config {
        hold_in_silence: hold,
        ..config()
    })
    .unwrap();
    let mut out = Vec::new();
    for s in [10, 11, 13] {
        b.handle_input(t + ms(s), packet(0, s));
    }
    // The silence, in 10 ms steps, as a caller woken by its timers would see it.
    let mut now = ms(14);
    while now < ms(back_ms) {
        if alive && now.as_millis() % 100 == 4 {
            b.heard(t + now);
        }
        b.handle_timeout(t + now);
        out.extend(drain(&mut b));
        now += ms(10);
    }
    b.handle_input(t + ms(back_ms), packet(0, 14));
    for step in 1..=4 {
        b.handle_timeout(t + ms(back_ms + 10 * step));
        out.extend(drain(&mut b));
    }
    b.handle_input(t + ms(back_ms + 40), packet(0, 12));
    b.handle_timeout(t + ms(back_ms + 500));
    out.extend(drain(&mut b));
    (out, b.stats())
}

#[test]
fn a_hole_is_held_through_a_silence_of_the_whole_stream_and_filled_after_it() {
    // The sender is gone 1.5 s: the hole's window (100 ms) passes in the silence.
    let (out, stats) = silence(Some(ms(50)), 1_500, false);
    assert_eq!(released(&out), [10, 11, 12, 13, 14], "{out:?}");
    assert_eq!((stats.gaps, stats.silences_held), (0, 1));
    // Asked for again once the stream came back (the first asks went to nobody).
    let asks: Vec<_> = out
        .iter()
        .filter(|o| matches!(o, Output::Nack { range, .. } if range.first == SeqNo(12)))
        .collect();
    assert_eq!(asks.len(), 2, "{out:?}");
    // Without it, the hole is a gap within its window, and 12 comes late.
    let (out, stats) = silence(None, 1_500, false);
    assert_eq!(released(&out), [10, 11, 13, 14], "{out:?}");
    assert_eq!((stats.gaps, stats.late), (1, 1));
}

#[test]
fn a_hole_is_held_through_a_silence_only_so_long() {
    let back = 50 + SILENCE_HOLD_MAX.as_millis() as u64 + 500;
    let (out, stats) = silence(Some(ms(50)), back, false);
    assert_eq!(released(&out), [10, 11, 13, 14], "{out:?}");
    assert_eq!((stats.gaps, stats.late, stats.silences_held), (1, 1, 0));
}

#[test]
fn a_hole_waits_only_its_window_while_the_sender_is_heard() {
    // Keepalives every 100 ms: the stream pauses upstream, its sender lives, and the
    // hole is given up after its window as always.
    let (out, stats) = silence(Some(ms(150)), 1_500, true);
    assert_eq!(released(&out), [10, 11, 13, 14], "{out:?}");
    assert_eq!((stats.gaps, stats.silences_held), (1, 0));
}
