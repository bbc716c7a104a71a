//! The DNS query path: any bytes a client sends get an answer or are dropped, never a panic,
//! over UDP (size-limited, truncated) and TCP.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_gossip::dns::{DEFAULT_TTL, DnsView, answer};
use starling_gossip::{Health, ServiceEndpoint};

fuzz_target!(|data: &[u8]| {
    let endpoint = ServiceEndpoint {
        service: "web".into(),
        task: "t1".into(),
        slot: "1".into(),
        addr: "10.0.0.1".into(),
        port: 8080,
        ports: [("http".to_owned(), 8080)].into_iter().collect(),
        health: Health::Healthy,
        ttl: None,
    };
    let view = DnsView {
        services: [("web".to_owned(), vec![("n1".to_owned(), endpoint)])]
            .into_iter()
            .collect(),
        nodes: [("n1".to_owned(), "10.0.0.1".parse().unwrap())]
            .into_iter()
            .collect(),
        ttl: DEFAULT_TTL,
        syncing: data.first().is_some_and(|b| b & 1 == 1),
    };
    let _ = answer(&view, data, true);
    let _ = answer(&view, data, false);
});
