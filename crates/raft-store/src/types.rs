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
    /// Starling's Raft types: commands (shared, so the log's entries are cloned for
    /// replication and apply without copying keys and values; encoded as the command
    /// itself) and results of the cluster state, u64 Raft ids
    /// (assigned once, never reused), managers reached through the transport.
    pub TypeConfig:
        D = std::sync::Arc<Command>,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use starling_state::{Command, Compare, TxnOp};

    use super::{decode, encode};

    /// Logs and snapshots written by earlier versions must still decode: a value is a
    /// varint length and its bytes, whether serde sees it as bytes or as a sequence of u8.
    #[test]
    fn values_keep_their_encoding() {
        let put = Command::Put {
            key: "k".into(),
            value: vec![1, 2, 3],
        };
        // Variant 1 (Put), key "k", value [1, 2, 3].
        let bytes = encode(&put).unwrap();
        assert_eq!(bytes, [1, 1, b'k', 3, 1, 2, 3]);
        assert_eq!(decode::<Command>(&bytes).unwrap(), put);
        let txn = Command::Txn {
            compares: vec![
                Compare::Value {
                    key: "a".into(),
                    value: Some(vec![9; 200]),
                },
                Compare::Value {
                    key: "b".into(),
                    value: None,
                },
            ],
            success: vec![TxnOp::Put {
                key: "c".into(),
                value: vec![7],
            }],
            failure: vec![],
        };
        let bytes = encode(&txn).unwrap();
        // The 200-byte value: Some (1), then 200 as a varint (0xc8 0x01), then the bytes.
        let at = bytes.windows(3).position(|w| w == [1, 0xc8, 0x01]).unwrap();
        assert_eq!(&bytes[at + 3..at + 203], &[9; 200][..]);
        assert_eq!(decode::<Command>(&bytes).unwrap(), txn);
    }
}
