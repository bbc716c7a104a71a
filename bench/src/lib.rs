//! Starling against etcd, side by side in one run: the same closed-loop workloads against a
//! 3-manager Starling cluster (the real `starling` binary) and a 3-member etcd 3.4 cluster,
//! both on loopback with their data on the same disk, reported as markdown tables with the
//! ratio Starling/etcd.
//!
//! ```text
//!   starling-bench ──ControlClient (keep-alive, control.sock)──▶ starling m0 m1 m2 ─QUIC/Raft─┐
//!        │                                                                                      │
//!        └──────────etcd-client (gRPC, one connection per client)──▶ etcd e0 e1 e2 ─HTTP/Raft──┘
//! ```
//!
//! `cargo run --release -p starling-bench -- writes|reads|failover|join|gossip|all [--quick]`

pub mod certs;
pub mod cluster;
pub mod gossip;
pub mod load;
pub mod machine;
pub mod measures;
pub mod memory;
pub mod scheduler;
pub mod tasks;
