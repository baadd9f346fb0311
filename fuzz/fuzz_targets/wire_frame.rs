//! Any byte stream: frames are taken off one by one until more bytes are needed or the
//! stream is declared broken; never a panic, never a loop that does not advance.
#![no_main]

use braid_core::wire::{Codec, Key};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let codec = Codec::new(Key::from_bytes([7; 32]));
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match codec.decode_frame(&mut buf) {
            Ok(Some(_)) => assert!(buf.len() < before),
            Ok(None) | Err(_) => break,
        }
    }
});
