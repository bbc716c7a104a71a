//! A Raft RPC from another manager: decoding must fail cleanly, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = starling_raft_store::fuzzing::decode_raft_rpc(data);
});
