//! Starling node: the `starling` daemon and CLI — a node's life (init, run), its control API
//! on a Unix socket, and the client commands that call it.
//!
//! ```text
//!   starling init ──▶ cluster id, CA, tokens, single-voter Raft group, gossip, control.sock
//!   starling run  ──▶ the same node again from its data directory
//!   starling node ls / kv / members / join-token ──HTTP/JSON over DIR/control.sock──▶ node
//!   starling --context prod node ls ──HTTP/1.1 over QUIC (starling/api/1)──▶ a manager
//! ```

pub mod api;
pub mod busy_poll;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod join;
pub mod liveness;
pub mod metrics;
pub mod renewal;
pub mod rotation;
