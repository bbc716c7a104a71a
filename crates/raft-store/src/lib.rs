//! The managers' replicated cluster state: [openraft] over the Starling transport, with a
//! durable log of our own and an in-memory state machine snapshotted to disk.
//!
//! ```text
//!   Store::write(cmd) ──(follower: forward over starling/raft/1)──▶ leader
//!        leader: Raft log ── group-committed WAL (fsync, then ack) ── replicate to a quorum
//!        every manager: apply committed entries in log order ─▶ ClusterState (pure)
//!   Store::read(Linearizable) ── read index from the leader, wait until applied ─▶ local state
//!   Store::read(Stale) ───────── local state now, with the revision it reflects
//!   Store::watch(prefix, from) ─ kept history, then live events: no gap, no duplicate
//! ```
//!
//! Every committed change has a **revision**, the index of the Raft log entry that carried
//! it: one global order for nodes, keys and settings, used for compare-and-swap and for
//! resuming watches. The state machine ([`ClusterState`]) is a pure function of the log, so
//! it is tested without Raft; the storage suite of openraft runs against the log store; and
//! the in-process cluster tests run three managers over real mutually authenticated QUIC.
//!
//! Openraft types stay inside this crate. Its messages and log records are encoded with
//! postcard through openraft's serde derives (openraft is pinned exactly; the ALPN and the
//! WAL header carry a format version); our own state and snapshots use rkyv.

mod forward;
mod log_store;
mod network;
mod poll;
mod recover;
mod sm_store;
mod store;
mod types;
mod wal;

pub use forward::ForwardStats;
pub use network::{RAFT_ALPN, raft_protocol};
pub use poll::{PollBeforeSleep, Sleeps};
pub use recover::{Recovered, force_new_cluster};
/// The object model and its pure state machine, re-exported from [`starling_state`].
pub use starling_state::{
    Autopilot, Availability, CaRotation, ClientRecord, ClientRole, ClusterInfo, ClusterState,
    Command, CommandResult, Compare, KvEntry, KvEvent, NodeRecord, NodeRole, NodeStatus, Outcome,
    Settings, SettingsChange, StateImage, SystemRecords, TxnOp, WATCH_HISTORY,
};
pub use store::{
    Consistency, MAX_COMMAND_BYTES, RaftStatus, Store, StoreConfig, StoreError, WATCH_BUFFER, Watch,
};
pub use types::ManagerNode;
pub use wal::{AppendCallback, Wal, WalError, WalOptions, WalStats};

/// Entry points for the fuzz targets in `fuzz/`: every decoder of bytes that come from a peer
/// or from disk. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes a Raft RPC as a manager receives it.
    pub fn decode_raft_rpc(bytes: &[u8]) -> bool {
        crate::types::decode::<crate::network::RaftRpc>(bytes).is_ok()
    }

    /// Decodes a WAL record of the log store.
    pub fn decode_log_record(bytes: &[u8]) -> bool {
        crate::log_store::decode_record(bytes)
    }

    /// Parses a snapshot file and decodes its state image.
    pub fn parse_snapshot(bytes: &[u8]) -> bool {
        crate::sm_store::parse_snapshot(bytes)
    }
}

#[cfg(test)]
mod storage_suite {
    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};

    use crate::log_store::LogStore;
    use crate::sm_store::StateMachine;
    use crate::types::TypeConfig;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
            use openraft::errors::ErrorSource;
            let io = |e: std::io::Error| StorageError::read(ErrorSource::from_error(&e));
            let dir = tempfile::tempdir().map_err(io)?;
            let log = LogStore::open(&dir.path().join("log")).map_err(io)?;
            let sm = StateMachine::open(&dir.path().join("state")).map_err(io)?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's conformance suite for log stores (and the state machine's membership).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() -> Result<(), StorageError<TypeConfig>> {
        Suite::test_all(Builder).await
    }
}

#[cfg(test)]
mod decoder_tests {
    use proptest::prelude::*;

    proptest! {
        /// Bytes from peers and from disk never panic a decoder.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::fuzzing::decode_raft_rpc(&bytes);
            let _ = crate::fuzzing::decode_log_record(&bytes);
            let _ = crate::fuzzing::parse_snapshot(&bytes);
            let mut with_magic = b"STRLSNP6".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = crate::fuzzing::parse_snapshot(&with_magic);
        }
    }
}
