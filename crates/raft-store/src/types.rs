//! The openraft type configuration. Every openraft type stays inside this crate; the rest of
//! Starling sees [`Command`], [`CommandResult`] and [`ManagerNode`].

use std::fmt;

use serde::{Deserialize, Serialize};

use starling_state::{Command, CommandResult};

/// Where a manager is reached: its transport node id (the certificate's CN) and address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ManagerNode {
    /// The node id in its certificate.
    pub name: String,
    /// Its QUIC address, `ip:port`.
    pub addr: String,
}

impl fmt::Display for ManagerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

openraft::declare_raft_types!(
    /// Starling's Raft types: commands and results of the cluster state, u64 Raft ids
    /// (assigned once, never reused), managers reached through the transport.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = ManagerNode,
);

pub(crate) type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;
pub(crate) type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub(crate) type Vote = openraft::alias::VoteOf<TypeConfig>;
pub(crate) type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub(crate) type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

/// Encodes an openraft value for disk or wire (postcard over openraft's serde derives;
/// openraft is pinned exactly, and the WAL header and ALPN carry a format version).
///
/// The buffer is sized first (one pass that only counts), so the bytes are written once into
/// one allocation rather than into a vector that doubles its way up from empty.
pub(crate) fn encode<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    let invalid = |e| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let size = postcard::experimental::serialized_size(v).map_err(invalid)?;
    postcard::to_extend(v, Vec::with_capacity(size)).map_err(invalid)
}

/// Decodes what [`encode`] wrote; bad bytes are an `InvalidData` error, never a panic.
pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> std::io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
