//! What a gossip peer can send: foca packets (with the catalog's version notices) and
//! requests (pulls, digests, pushed records, memberships, fingerprints) into a running
//! `GossipCore`. Anything gets an answer, a refusal or nothing; never a panic.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use starling_gossip::{GossipConfig, GossipCore, GossipId, GossipSettings};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut core = GossipCore::new(
        GossipSettings {
            id: GossipId::new("n1", "10.0.0.1:7946".parse().unwrap(), 1),
            seeds: vec![("n0".into(), "10.0.0.2:7946".parse().unwrap())],
            config: GossipConfig::default(),
            rng_seed: 1,
        },
        now,
    );
    let (first, rest) = data.split_at(data.len().min(1));
    if first.first().is_some_and(|b| b & 1 == 0) {
        core.handle_datagram(now, rest);
    } else {
        let _ = core.handle_request(now, rest);
    }
    core.handle_timeout(now + std::time::Duration::from_secs(5));
    while core.poll_transmit().is_some() {}
    while core.poll_event().is_some() {}
});
