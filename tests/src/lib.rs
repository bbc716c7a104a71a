//! Starling's multi-host tests: real `starling` processes, one per Linux network namespace on
//! a shared bridge, with faults injected the way Jepsen and etcd's robustness suite do
//! (kill -9 and restart, SIGSTOP/SIGCONT, nftables partitions and loss), and recorded client
//! histories checked for linearizability.
//!
//! ```text
//!   test process ──control.sock (HTTP/JSON)──▶ starling in netns h1 (198.18.0.11)
//!        │                                     starling in netns h2 (198.18.0.12) …
//!        └── nft rules in each receiver's netns: partitions, one-way drops, loss
//! ```
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); without them every test fails and says
//! what is missing. Tests in one binary run one at a time (a process-wide lock).

pub mod cluster;
pub mod dig;
pub mod linearizability;
pub mod net;
pub mod probe;
