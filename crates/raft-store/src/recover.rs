//! Disaster recovery: making the one surviving manager of a cluster that lost its majority
//! for good the single voter of the same cluster (etcd's and Docker swarm's
//! `--force-new-cluster`).
//!
//! Done offline, on the manager's data directory, before its store opens: every entry in
//! its log is applied (an entry the lost majority acknowledged may have been committed there
//! without this manager learning it: the log is all it has, as with etcd), the state is
//! saved as a snapshot whose membership is this manager alone, and the log is purged up to
//! it. The vote is kept, so the next election runs in a later term than any entry's, and
//! this manager wins it alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder};

use crate::log_store::LogStore;
use crate::sm_store::StateMachine;
use crate::store::StoreError;
use crate::types::{ManagerNode, StoredMembership};

/// What [`force_new_cluster`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The index of the last entry now in the state (its revision).
    pub last_index: u64,
    /// Entries in the log past the last applied one, applied now.
    pub replayed: u64,
    /// The voters of the last membership in the log, this manager included: the others are
    /// out of the group from now on.
    pub former_voters: BTreeMap<u64, ManagerNode>,
}

/// Rewrites the store in `data_dir` (a manager's `raft` directory) so that it opens as the
/// single voter `raft_id` (`node`) of the same cluster, with every entry of its log applied.
/// Nothing else may have the directory open.
pub async fn force_new_cluster(
    data_dir: &Path,
    raft_id: u64,
    node: ManagerNode,
) -> Result<Recovered, StoreError> {
    let mut log = LogStore::open(&data_dir.join("log"))?;
    let mut sm = StateMachine::open(&data_dir.join("state"))?;
    let state = log.get_log_state().await?;
    let (applied, mut membership) = sm.applied_state().await?;
    let Some(last) = state.last_log_id.max(applied) else {
        return Err(StoreError::Config(format!(
            "{}: no log and no snapshot: nothing to recover",
            data_dir.display()
        )));
    };
    let from = applied.map_or(0, |l| l.index + 1);
    let entries = log.try_get_log_entries(from..=last.index).await?;
    let replayed = entries.len() as u64;
    for e in &entries {
        if let EntryPayload::Membership(m) = &e.payload {
            membership = StoredMembership::new(Some(e.log_id), m.clone());
        }
    }
    sm.apply(futures::stream::iter(
        entries.into_iter().map(|e| Ok((e, None))),
    ))
    .await?;
    let former_voters: BTreeMap<u64, ManagerNode> = membership
        .membership()
        .nodes()
        .filter(|(id, _)| membership.membership().voter_ids().any(|v| v == **id))
        .map(|(id, n)| (*id, n.clone()))
        .collect();
    if !former_voters.contains_key(&raft_id) {
        return Err(StoreError::Config(format!(
            "raft id {raft_id} is not a voter of the last membership in this log ({:?}): \
             recover from a manager that was",
            former_voters.keys().collect::<Vec<_>>()
        )));
    }
    let alone = Membership::new(
        vec![BTreeSet::from([raft_id])],
        BTreeMap::from([(raft_id, node)]),
    )
    .map_err(|e| StoreError::Config(e.to_string()))?;
    sm.shared.write().membership = StoredMembership::new(Some(last), alone);
    sm.build_snapshot().await?;
    log.purge_durably(last).await?;
    Ok(Recovered {
        last_index: last.index,
        replayed,
        former_voters,
    })
}
