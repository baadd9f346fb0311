//! Any bytes as RTP: parsed or refused, never a panic; a parsed payload lies inside the
//! packet.
#![no_main]

use braid_core::wire::Rtp;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rtp) = Rtp::parse(Bytes::copy_from_slice(data)) {
        assert!(rtp.payload().len() <= data.len());
        assert_eq!(rtp.len(), data.len());
    }
});
