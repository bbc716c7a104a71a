//! Message bodies from a peer: validation must reject bad bytes with an error, never panic
//! or read out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_transport::rkyv::{Archive, Deserialize, Serialize};
use starling_transport::{Frame, decode};

#[derive(Archive, Serialize, Deserialize)]
#[rkyv(crate = starling_transport::rkyv)]
struct Sample {
    id: u64,
    name: String,
    tags: Vec<String>,
    payload: Option<Vec<u8>>,
}

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Sample>(data);
    let _ = decode::<(String, Vec<u8>)>(data);
    let frame = Frame::copy_from(data);
    let _ = frame.access::<Sample>();
});
