//! Any header value and body as a node request's signature: verified or refused, never a
//! panic.
#![no_main]

use braid_core::nodeauth::NodeAuth;
use braid_core::wire::Key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let auth = NodeAuth::new(&Key::derive("fuzz network"));
    let split = data.first().map_or(0, |n| usize::from(*n)).min(data.len());
    let (header, body) = data.split_at(split);
    if let Ok(text) = std::str::from_utf8(header) {
        let _ = auth.verify("POST", "/v1/report", Some(text), body, 1_800_000_000_000);
    }
});
