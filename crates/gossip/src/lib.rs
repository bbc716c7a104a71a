//! Starling gossip: SWIM membership (foca 2.0) for every node, and the service catalog it
//! carries.
//!
//! ```text
//!   node record changes ─▶ VersionNotice {node, generation, version}
//!        rides foca's custom broadcasts (3 random members / 200 ms, retransmitted log n times)
//!   peer sees a newer stamp ─▶ pulls the full NodeRecord from the relay (or the origin)
//!   every 2 s: digest {node → stamp} to one random member ─▶ it sends back what we lack
//!        (late joiners converge without any new change)
//! ```
//!
//! The catalog merge and digest logic ([`Catalog`]) is pure, and the [`sim::Simulator`]
//! runs many foca instances with their catalogs in one thread on virtual time over a lossy,
//! partitionable network, for the tests and the benchmark.

mod catalog;
mod config;
mod driver;
mod identity;
pub mod sim;

pub use catalog::{
    Catalog, Digest, Health, NodeRecord, NoticeHandler, NoticeKey, ServiceEndpoint, SharedCatalog,
    VersionNotice, Want, encode_notice,
};
pub use config::GossipConfig;
pub use driver::{
    GOSSIP_ALPN, GossipError, GossipEvent, GossipNode, GossipSettings, MemberView, gossip_protocol,
};
pub use identity::{FileGeneration, GenerationStore, GossipId};
