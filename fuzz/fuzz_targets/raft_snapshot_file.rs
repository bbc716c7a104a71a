//! A snapshot file from disk: a damaged one must be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = starling_raft_store::fuzzing::parse_snapshot(data);
});
