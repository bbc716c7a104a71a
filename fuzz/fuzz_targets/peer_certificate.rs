//! A peer's certificate bytes: identity parsing must return an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_transport::PeerIdentity;

fuzz_target!(|data: &[u8]| {
    let _ = PeerIdentity::from_certificate(data);
});
