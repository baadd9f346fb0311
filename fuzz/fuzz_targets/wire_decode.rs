//! Any datagram: decoding returns a message or an error, never panics. The input is tried
//! as it is (almost always a bad tag) and again with a valid tag appended, so the body
//! parsers are reached too; by a node (which checks every class), by an entry point
//! (which also checks a source's publish key) and by a viewer (which reads node messages
//! unchecked).
#![no_main]

use braid_core::StreamId;
use braid_core::wire::{Codec, Key, TAG_LEN};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    let codec = Codec::new(Key::from_bytes(KEY));
    let entry = codec
        .clone()
        .with_sources([(StreamId(1), Key::publish("fuzz stream key"))]);
    let viewer = Codec::viewer();
    for c in [&codec, &entry, &viewer] {
        let _ = c.decode_any(Bytes::copy_from_slice(data));
    }

    let mut tagged = data.to_vec();
    let tag = blake3::keyed_hash(&KEY, data);
    tagged.extend_from_slice(&tag.as_bytes()[..TAG_LEN]);
    let _ = viewer.decode(Bytes::from(tagged.clone()));
    if let Ok(msg) = codec.decode(Bytes::from(tagged.clone())) {
        // Whatever decodes re-encodes to the same bytes.
        let mut out = BytesMut::new();
        codec.encode(&msg, &mut out).expect("a decoded message encodes");
        assert_eq!(&out[..], &tagged[..]);
    }
});
