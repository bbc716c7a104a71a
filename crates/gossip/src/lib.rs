//! Starling gossip: SWIM membership for every node ([`swim`]: its member table indexed by
//! address, so a packet costs the same at 10 000 members as at 10), and the service
//! catalog it carries.
//!
//! ```text
//!   node record changes ─▶ VersionNotice {node, generation, version}
//!        piggybacks on SWIM packets (3 random members / 100 ms, sent 4 log10 n times, ≥ 6)
//!   peer sees a newer stamp ─▶ pulls the full NodeRecord from the relay (or the origin)
//!   every 2 s: digest {node → stamp} to one random member ─▶ it sends back what we lack
//!        (late joiners converge without any new change)
//! ```
//!
//! The protocol is one sans-IO state machine, [`GossipCore`] (SWIM, its timers as data, the
//! catalog, the sync and pull decisions), driven by both the tokio driver ([`GossipNode`]:
//! QUIC datagrams and requests) and the [`sim::Simulator`] (many cores in one thread on
//! virtual time over a lossy, partitionable network, for the tests and the benchmark): the
//! simulated protocol is the shipped one. The catalog merge and digest logic ([`Catalog`])
//! is pure too.

mod catalog;
mod config;
pub mod core;
pub mod dns;
mod driver;
mod identity;
pub mod sim;
pub mod swim;
mod timers;

pub use crate::core::{
    DetectorStats, GossipCore, GossipEvent, GossipSettings, MemberView, RpcKind, Transmit,
};
pub use catalog::{
    Catalog, Digest, Health, NodeRecord, NoticeHandler, NoticeKey, SeenStamps, ServiceEndpoint,
    SharedCatalog, VersionNotice, Want, encode_notice,
};
pub use config::GossipConfig;
pub use driver::{GOSSIP_ALPN, GossipError, GossipNode, gossip_protocol};
pub use identity::{FileGeneration, GenerationStore, GossipId};
