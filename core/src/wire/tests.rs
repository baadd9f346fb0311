use proptest::prelude::*;

use super::*;
use crate::wire::rtp::{Fields, PAYLOAD_TYPE_MP2T};

fn codec() -> Codec {
    Codec::new(Key::derive("test network"))
}

fn media(seq: u64, payload: &[u8]) -> Message {
    let seq = SeqNo(seq);
    Message {
        header: Header {
            stream: StreamId(42),
            path: PathId(3),
            flags: Flags::KEYFRAME,
        },
        body: Body::Media(Media {
            seq,
            rtp: Rtp::build(
                Fields {
                    marker: false,
                    payload_type: PAYLOAD_TYPE_MP2T,
                    seq: seq.low(),
                    timestamp: 90_000,
                    ssrc: 0x1234,
                },
                payload,
            ),
        }),
    }
}

fn samples() -> Vec<Message> {
    let h = Header {
        stream: StreamId(7),
        path: PathId(1),
        flags: Flags::empty(),
    };
    let sub = Subscription {
        node: NodeId(99),
        lease_ms: 3000,
        cookie: [9; COOKIE_LEN],
    };
    vec![
        media(5 * 65536 + 17, &[0x47; 1316]),
        media(0, &[]),
        Message {
            header: h,
            body: Body::Publish {
                cookie: [1; COOKIE_LEN],
            },
        },
        Message {
            header: h,
            body: Body::Cookie {
                cookie: [0xc0; COOKIE_LEN],
            },
        },
        Message {
            header: h,
            body: Body::Subscribe(sub),
        },
        Message {
            header: h,
            body: Body::Refresh(sub),
        },
        Message {
            header: h,
            body: Body::Unsubscribe { node: NodeId(99) },
        },
        Message {
            header: h,
            body: Body::Nack(vec![
                SeqRange {
                    first: SeqNo(10),
                    count: 1,
                },
                SeqRange {
                    first: SeqNo(u64::MAX - 5),
                    count: 5,
                },
            ]),
        },
        Message {
            header: h,
            body: Body::Keepalive(Keepalive {
                node: NodeId(1),
                sent_us: 123,
                echo_us: 45,
            }),
        },
        Message {
            header: h,
            body: Body::Switch {
                reason: SwitchReason::Drain,
            },
        },
        Message {
            header: h,
            body: Body::Error {
                code: ErrorCode::UNAUTHORIZED,
                text: "wrong stream key ✗".into(),
            },
        },
        Message {
            header: h,
            body: Body::Watch(Watch {
                node: NodeId(5),
                lease_ms: 3000,
                start: WatchStart::Seq,
                seq: SeqNo(1 << 40),
                acked: SeqNo(17),
                cookie: [3; COOKIE_LEN],
                token: Bytes::from_static(b"token"),
                received: Some(1 << 33),
                policy: Some(crate::speed::Policy {
                    ceiling: Some(3_000_000),
                    pinned: true,
                }),
                fits_kbps: Some(2_500),
                rendition: Some(0x2100_09c4),
            }),
        },
        Message {
            header: h,
            body: Body::Notice {
                kind: NoticeKind::Skipped,
                value: 120,
            },
        },
    ]
}

/// Each party's codec signs as its class; a node's codec takes each class only with
/// that class's key, and `decode` only what a node signed.
#[test]
fn classes_keep_parties_apart() {
    let node = codec();
    let stranger = Codec::new(Key::derive("another network"));
    let viewer = Codec::viewer();
    let source = Codec::source("stream key");
    let with_source = codec().with_sources([(StreamId(7), Key::publish("stream key"))]);
    let msg = &samples()[3];
    let enc = |c: &Codec| {
        let mut out = BytesMut::new();
        c.encode(msg, &mut out).unwrap();
        out.freeze()
    };
    // A viewer's message: any node reads it as a viewer's, never as a node's.
    let v = enc(&viewer);
    assert_eq!(
        node.decode_any(v.clone()).unwrap(),
        (Class::Viewer, msg.clone())
    );
    assert_eq!(
        node.decode(v.clone()),
        Err(DecodeError::NotANode(Class::Viewer))
    );
    // The viewer's byte set to the node class does not verify: it needs the network key.
    let mut forged = v.to_vec();
    forged[2] &= !0x18;
    assert_eq!(node.decode(Bytes::from(forged)), Err(DecodeError::BadTag));
    // A source's message: only a codec with its publish key takes it.
    let s = enc(&source);
    assert_eq!(node.decode_any(s.clone()), Err(DecodeError::BadTag));
    assert_eq!(
        with_source.decode_any(s.clone()).unwrap(),
        (Class::Source, msg.clone())
    );
    assert_eq!(
        with_source.decode(s.clone()),
        Err(DecodeError::NotANode(Class::Source))
    );
    let wrong = Codec::source("wrong key");
    assert_eq!(
        with_source.decode_any(enc(&wrong)),
        Err(DecodeError::BadTag)
    );
    // Re-signed by a node, the source's message is a node's.
    let resigned = node.resign(&s).unwrap();
    assert_eq!(node.decode(resigned).unwrap(), *msg);
    // A node of another network is nobody.
    assert_eq!(node.decode(enc(&stranger)), Err(DecodeError::BadTag));
    // Leaves hold no network key: they read node messages unchecked, and never take a
    // viewer's as a node's.
    assert_eq!(viewer.decode(enc(&node)).unwrap(), *msg);
    assert_eq!(viewer.decode(enc(&stranger)).unwrap(), *msg);
    assert_eq!(viewer.decode(v), Err(DecodeError::NotANode(Class::Viewer)));
}

#[test]
fn every_kind_round_trips() {
    let c = codec();
    for msg in samples() {
        let mut out = BytesMut::new();
        c.encode(&msg, &mut out).unwrap();
        let back = c.decode(out.freeze()).unwrap();
        assert_eq!(back, msg);
    }
}

#[test]
fn encode_media_matches_encode() {
    let c = codec();
    let msg = media(70_000, &[1, 2, 3]);
    let Body::Media(m) = &msg.body else {
        unreachable!()
    };
    let mut a = BytesMut::new();
    let mut b = BytesMut::new();
    c.encode(&msg, &mut a).unwrap();
    c.encode_media(msg.header, m.seq, &m.rtp, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), MEDIA_OVERHEAD + m.rtp.len());
}

#[test]
fn media_payload_is_not_copied() {
    let c = codec();
    let mut out = BytesMut::new();
    c.encode(&media(1, &[9; 100]), &mut out).unwrap();
    let datagram = out.freeze();
    let range = datagram.as_ptr() as usize..datagram.as_ptr() as usize + datagram.len();
    let Body::Media(m) = c.decode(datagram.clone()).unwrap().body else {
        unreachable!()
    };
    assert!(range.contains(&(m.rtp.payload().as_ptr() as usize)));
}

#[test]
fn decode_rejects() {
    let c = codec();
    let mut good = BytesMut::new();
    c.encode(&samples()[3], &mut good).unwrap();
    let good = good.freeze();

    let retag = |mut bytes: Vec<u8>| -> Bytes {
        let split = bytes.len() - TAG_LEN;
        let tag = Key::derive("test network").tag(&bytes[..split]);
        bytes[split..].copy_from_slice(&tag);
        Bytes::from(bytes)
    };
    let with = |i: usize, v: u8| {
        let mut b = good.to_vec();
        b[i] = v;
        b
    };
    let mut trailing = good[..good.len() - TAG_LEN].to_vec();
    trailing.push(0);
    trailing.extend_from_slice(&[0; TAG_LEN]);
    let mut truncated = good[..good.len() - TAG_LEN - 1].to_vec();
    truncated.extend_from_slice(&[0; TAG_LEN]);

    let cases: Vec<(&str, Bytes, DecodeError)> = vec![
        ("empty", Bytes::new(), DecodeError::UnexpectedEnd),
        ("short", good.slice(..10), DecodeError::UnexpectedEnd),
        ("version", Bytes::from(with(0, 1)), DecodeError::Version(1)),
        (
            "tampered body",
            Bytes::from(with(9, 0xff)),
            DecodeError::BadTag,
        ),
        (
            "wrong key",
            {
                let mut out = BytesMut::new();
                Codec::new(Key::derive("other network"))
                    .encode(&samples()[3], &mut out)
                    .unwrap();
                out.freeze()
            },
            DecodeError::BadTag,
        ),
        (
            "unknown kind",
            retag(with(1, 200)),
            DecodeError::UnknownKind(200),
        ),
        (
            "reserved flags",
            retag(with(2, 0x80)),
            DecodeError::Malformed("reserved flag bits set"),
        ),
        (
            "reserved class",
            retag(with(2, 0x18)),
            DecodeError::Malformed("reserved class"),
        ),
        (
            "trailing",
            retag(trailing),
            DecodeError::Malformed("trailing bytes"),
        ),
        (
            "truncated body",
            retag(truncated),
            DecodeError::UnexpectedEnd,
        ),
        (
            "too large",
            Bytes::from(vec![1; MAX_MESSAGE + 1]),
            DecodeError::TooLarge(MAX_MESSAGE + 1),
        ),
    ];
    for (why, bytes, expected) in cases {
        assert_eq!(c.decode(bytes), Err(expected), "{why}");
    }
}

#[test]
fn decode_rejects_bad_bodies() {
    // Bodies written by hand, then tagged, so only the body is wrong.
    let c = codec();
    let tagged = |kind: u8, body: &[u8]| {
        let mut b = vec![VERSION, kind, 0, 0, 0, 0, 0, 7];
        b.extend_from_slice(body);
        let tag = Key::derive("test network").tag(&b);
        b.extend_from_slice(&tag);
        Bytes::from(b)
    };
    let cases: Vec<(&str, Bytes, DecodeError)> = vec![
        (
            "nack count 0",
            tagged(6, &[0]),
            DecodeError::Malformed("nack range count"),
        ),
        (
            "nack count 65",
            tagged(6, &[65]),
            DecodeError::Malformed("nack range count"),
        ),
        (
            "nack count lies",
            tagged(6, &[3, 0, 0]),
            DecodeError::UnexpectedEnd,
        ),
        (
            "nack empty range",
            tagged(6, &[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            DecodeError::Malformed("empty nack range"),
        ),
        (
            "cookie cut short",
            tagged(2, &[1; COOKIE_LEN - 1]),
            DecodeError::UnexpectedEnd,
        ),
        (
            "key length lies",
            tagged(2, &[10, 1, 2]),
            DecodeError::UnexpectedEnd,
        ),
        (
            "switch reason",
            tagged(8, &[9]),
            DecodeError::Malformed("switch reason"),
        ),
        (
            "error text not utf-8",
            tagged(9, &[0, 1, 2, 0xff, 0xfe]),
            DecodeError::Malformed("error text is not utf-8"),
        ),
        (
            "media without rtp",
            tagged(1, &[0, 0, 0, 0]),
            DecodeError::UnexpectedEnd,
        ),
        (
            "media with rtp v1",
            tagged(1, &[0, 0, 0, 0, 0x40, 33, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
            DecodeError::Malformed("rtp version is not 2"),
        ),
        (
            "keepalive short",
            tagged(7, &[0; 23]),
            DecodeError::UnexpectedEnd,
        ),
    ];
    for (why, bytes, expected) in cases {
        assert_eq!(c.decode(bytes), Err(expected), "{why}");
    }
}

#[test]
fn encode_refuses_what_cannot_be_decoded() {
    let c = codec();
    let h = Header::default();
    let cases = vec![
        Body::Nack(vec![]),
        Body::Nack(vec![
            SeqRange {
                first: SeqNo(0),
                count: 1
            };
            MAX_NACK_RANGES + 1
        ]),
        Body::Nack(vec![SeqRange {
            first: SeqNo(0),
            count: 0,
        }]),
        Body::Error {
            code: ErrorCode(1),
            text: "x".repeat(MAX_ERROR_TEXT + 1),
        },
        media(1 << 48, &[]).body,
        media(1, &[0; MAX_MESSAGE]).body,
    ];
    for body in cases {
        let mut out = BytesMut::from(&b"prefix"[..]);
        assert!(
            c.encode(
                &Message {
                    header: h,
                    body: body.clone()
                },
                &mut out
            )
            .is_err(),
            "{:?}",
            body.kind()
        );
        assert_eq!(
            &out[..],
            b"prefix",
            "a failed encode leaves the buffer as it was"
        );
    }
}

#[test]
fn frames_split_and_join() {
    let c = codec();
    let mut stream = BytesMut::new();
    for msg in samples() {
        c.encode_frame(&msg, &mut stream).unwrap();
    }
    // Feed the stream one byte at a time: a frame is only decoded once whole.
    let mut pending = BytesMut::new();
    let mut got = Vec::new();
    for b in stream.iter() {
        pending.put_u8(*b);
        while let Some(msg) = c.decode_frame(&mut pending).unwrap() {
            got.push(msg);
        }
    }
    assert_eq!(got, samples());
    assert!(pending.is_empty());

    let mut huge = BytesMut::from(&[0xff, 0xff][..]);
    assert_eq!(
        c.decode_frame(&mut huge),
        Err(DecodeError::TooLarge(0xffff))
    );
}

fn arb_message() -> impl Strategy<Value = Message> {
    let header = (any::<u32>(), any::<u8>(), 0u8..8).prop_map(|(s, p, f)| Header {
        stream: StreamId(s),
        path: PathId(p),
        flags: Flags(f),
    });
    let body = prop_oneof![
        (
            0u64..1 << 48,
            any::<bool>(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..1400)
        )
            .prop_map(|(seq, marker, ts, payload)| {
                Body::Media(Media {
                    seq: SeqNo(seq),
                    rtp: Rtp::build(
                        Fields {
                            marker,
                            payload_type: PAYLOAD_TYPE_MP2T,
                            seq: seq as u16,
                            timestamp: ts,
                            ssrc: 1,
                        },
                        &payload,
                    ),
                })
            }),
        any::<[u8; COOKIE_LEN]>().prop_map(|cookie| Body::Publish { cookie }),
        any::<[u8; COOKIE_LEN]>().prop_map(|cookie| Body::Cookie { cookie }),
        (any::<u64>(), any::<u32>(), any::<[u8; COOKIE_LEN]>()).prop_map(|(n, l, cookie)| {
            Body::Subscribe(Subscription {
                node: NodeId(n),
                lease_ms: l,
                cookie,
            })
        }),
        (any::<u64>(), any::<u32>(), any::<[u8; COOKIE_LEN]>()).prop_map(|(n, l, cookie)| {
            Body::Refresh(Subscription {
                node: NodeId(n),
                lease_ms: l,
                cookie,
            })
        }),
        any::<u64>().prop_map(|n| Body::Unsubscribe { node: NodeId(n) }),
        prop::collection::vec((any::<u64>(), 1u16..), 1..=MAX_NACK_RANGES).prop_map(|r| {
            Body::Nack(
                r.into_iter()
                    .map(|(first, count)| SeqRange {
                        first: SeqNo(first),
                        count,
                    })
                    .collect(),
            )
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(n, s, e)| Body::Keepalive(
            Keepalive {
                node: NodeId(n),
                sent_us: s,
                echo_us: e
            }
        )),
        prop_oneof![
            Just(SwitchReason::Drain),
            Just(SwitchReason::Overload),
            Just(SwitchReason::Shutdown)
        ]
        .prop_map(|reason| Body::Switch { reason }),
        (any::<u16>(), "[a-zA-Z0-9 é✓]{0,60}").prop_map(|(c, t)| Body::Error {
            code: ErrorCode(c),
            text: t
        }),
        (
            any::<u64>(),
            any::<u32>(),
            0u8..3,
            any::<u64>(),
            any::<u64>(),
            any::<[u8; COOKIE_LEN]>(),
            prop::collection::vec(any::<u8>(), 0..=MAX_TOKEN),
            prop::option::of(0..u64::MAX),
            prop::option::of((prop::option::of(1u64..0x7fff_ffff), any::<bool>())),
            prop::option::of(1..=u32::MAX),
            prop::option::of(1..=u32::MAX),
        )
            .prop_map(
                |(n, l, st, s, a, cookie, t, received, policy, fits_kbps, rendition)| Body::Watch(
                    Watch {
                        node: NodeId(n),
                        lease_ms: l,
                        start: [WatchStart::Keyframe, WatchStart::Seq, WatchStart::Live]
                            [usize::from(st)],
                        seq: SeqNo(s),
                        acked: SeqNo(a),
                        cookie,
                        token: t.into(),
                        received,
                        policy: policy.map(|(kbps, pinned)| crate::speed::Policy {
                            ceiling: kbps.map(|k| k * 1000),
                            pinned,
                        }),
                        fits_kbps,
                        rendition,
                    }
                )
            ),
        (1u8..8, any::<u64>()).prop_map(|(k, value)| Body::Notice {
            kind: [
                NoticeKind::Joined,
                NoticeKind::Skipped,
                NoticeKind::Missed,
                NoticeKind::Session,
                NoticeKind::Gap,
                NoticeKind::Ended,
                NoticeKind::Rendition
            ][usize::from(k - 1)],
            value
        }),
    ];
    (header, body).prop_map(|(header, body)| Message { header, body })
}

proptest! {
    #[test]
    fn round_trip(msg in arb_message()) {
        let c = codec();
        let mut out = BytesMut::new();
        c.encode(&msg, &mut out).unwrap();
        prop_assert_eq!(c.decode(out.freeze()).unwrap(), msg);
    }

    #[test]
    fn any_single_bit_flip_is_rejected(msg in arb_message(), bit in any::<prop::sample::Index>()) {
        let c = codec();
        let mut out = BytesMut::new();
        c.encode(&msg, &mut out).unwrap();
        let i = bit.index(out.len() * 8);
        out[i / 8] ^= 1 << (i % 8);
        prop_assert!(c.decode(out.freeze()).is_err());
    }

    /// Arbitrary bytes, with a valid tag so the body parser is reached, never panic.
    #[test]
    fn arbitrary_tagged_bytes_never_panic(kind in 0u8..15, flags in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut b = vec![VERSION, kind, flags, 0, 0, 0, 0, 1];
        b.extend_from_slice(&body);
        let tag = Key::derive("test network").tag(&b);
        b.extend_from_slice(&tag);
        let _ = codec().decode(Bytes::from(b));
    }

    #[test]
    fn split_frame_returns_what_was_framed(
        msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..600), 0..8),
        cut in 0usize..5000,
    ) {
        let mut all = BytesMut::new();
        for m in &msgs {
            all.extend_from_slice(&(m.len() as u16).to_be_bytes());
            all.extend_from_slice(m);
        }
        // Bytes arrive in two pieces at any point: the frames come out the same.
        let cut = cut.min(all.len());
        let rest = all.split_off(cut);
        let mut buf = all;
        let mut out = Vec::new();
        while let Some(f) = split_frame(&mut buf).unwrap() {
            out.push(f.to_vec());
        }
        buf.extend_from_slice(&rest);
        while let Some(f) = split_frame(&mut buf).unwrap() {
            out.push(f.to_vec());
        }
        prop_assert_eq!(out, msgs);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_frames_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let c = codec();
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = c.decode_frame(&mut buf) {}
    }
}

#[test]
fn a_rendition_notice_packs_and_unpacks() {
    let n = RenditionNotice {
        ssrc: 0xdead_beef,
        reason: 3,
        index: 2,
        kbps: 5000,
    };
    assert_eq!(RenditionNotice::unpack(n.pack()), n);
}
