//! The state machine: [`ClusterState::apply`], a pure function of the state, the command and
//! its revision (the Raft log index that carries it), and the watch history.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResult, Compare, KvEvent, Outcome, TxnOp};
use crate::objects::{ClientRecord, ClusterInfo, KvEntry, NodeRecord, NodeRole, SystemRecords};
use crate::service::Service;
use crate::task::TaskRefusal;
use crate::task::{NodeDescription, Task};

/// Revisions kept for `watch` to resume from; older ones are compacted.
pub const WATCH_HISTORY: usize = 100_000;

wire_type!(
    /// Everything a snapshot holds.
    #[derive(Default)]
    pub struct StateImage {
        /// Revision (log index) this image reflects.
        pub revision: u64,
        /// Nodes by id.
        pub nodes: BTreeMap<String, NodeRecord>,
        /// Key-value store. Keys of up to 24 bytes are held inside the map's nodes, so a
        /// search compares them where it reads them; the archived and serialised forms are
        /// those of `String` keys.
        pub kv: BTreeMap<CompactString, KvEntry>,
        /// Cluster identity and settings.
        pub cluster: ClusterInfo,
        /// Revocations, Raft ids and API clients: not reachable through the key-value API.
        pub system: SystemRecords,
        /// Services by id.
        pub services: BTreeMap<String, Service>,
        /// Tasks by id.
        pub tasks: BTreeMap<String, Task>,
        /// What each node's agent reported of its machine, by node id.
        pub node_descriptions: BTreeMap<String, NodeDescription>,
    }
);

/// The state machine's data and the recent history for `watch`.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub(crate) image: StateImage,
    /// Derived from `image` (rebuilt from a snapshot, never stored): task ids by service
    /// and by node.
    pub(crate) index: crate::workload::TaskIndex,
    /// Shared with the watchers each event was sent to: one copy of a value per event.
    history: VecDeque<Arc<KvEvent>>,
    /// Events with a revision below this are no longer in `history`.
    compacted_before: u64,
}

impl ClusterState {
    /// An empty state at revision 0.
    pub fn new() -> Self {
        ClusterState::default()
    }

    /// A state from a snapshot image. Its history starts empty: a watch that wants older
    /// revisions is told they are compacted.
    pub fn from_image(image: StateImage) -> Self {
        let compacted_before = image.revision + 1;
        ClusterState {
            index: crate::workload::TaskIndex::of(&image),
            image,
            history: VecDeque::new(),
            compacted_before,
        }
    }

    /// The data, for a snapshot.
    pub fn image(&self) -> &StateImage {
        &self.image
    }

    /// The revision (last applied log index) the state reflects.
    pub fn revision(&self) -> u64 {
        self.image.revision
    }

    /// Notes that log entry `revision` carried no command (a blank or membership entry).
    pub fn advance(&mut self, revision: u64) {
        self.image.revision = self.image.revision.max(revision);
    }

    /// Applies `cmd`, committed at log index `revision`, and returns what it did together
    /// with the key-value events it produced (for watchers; the history holds the same ones).
    pub fn apply(&mut self, revision: u64, cmd: &Command) -> (CommandResult, Vec<Arc<KvEvent>>) {
        self.advance(revision);
        let mut events = Vec::new();
        let outcome = match cmd {
            Command::Noop => Outcome::Done,
            Command::Put { key, value } => Outcome::Put {
                prev: self.put(revision, key, value, &mut events),
            },
            Command::Delete { key } => Outcome::Deleted {
                prev: self.delete(revision, key, &mut events),
            },
            Command::Txn {
                compares,
                success,
                failure,
            } => {
                let succeeded = compares.iter().all(|c| self.holds(c));
                let ops = if succeeded { success } else { failure };
                for op in ops {
                    match op {
                        TxnOp::Put { key, value } => {
                            self.put(revision, key, value, &mut events);
                        }
                        TxnOp::Delete { key } => {
                            self.delete(revision, key, &mut events);
                        }
                    }
                }
                Outcome::Txn { succeeded }
            }
            Command::UpsertNode { node } if self.image.system.revoked.contains(&node.id) => {
                Outcome::Revoked {
                    id: node.id.clone(),
                }
            }
            Command::UpsertNode { node } => {
                let record = match self.image.nodes.get(&node.id) {
                    Some(old) => NodeRecord {
                        status: old.status.clone(),
                        availability: old.availability.clone(),
                        // Labels belong to the operator (`node update --label-add`).
                        labels: old.labels.clone(),
                        version: old.version + 1,
                        created_revision: old.created_revision,
                        updated_revision: revision,
                        ..node.clone()
                    },
                    None => NodeRecord {
                        version: 1,
                        created_revision: revision,
                        updated_revision: revision,
                        ..node.clone()
                    },
                };
                self.image.nodes.insert(node.id.clone(), record.clone());
                Outcome::Node { node: record }
            }
            Command::SetNodeStatus { id, status } => {
                self.change_node(revision, id, |n| n.status = status.clone())
            }
            Command::SetNodeAvailability { id, availability } => {
                self.change_node(revision, id, |n| n.availability = availability.clone())
            }
            Command::SetNodeRole {
                id,
                role,
                desired_role,
            } => self.change_node(revision, id, |n| {
                n.role = role.clone();
                n.desired_role = desired_role.clone();
            }),
            Command::RemoveNode { id }
                if self.image.system.raft_ids.contains_key(id)
                    || self.image.nodes.get(id).is_some_and(|n| {
                        n.role == NodeRole::Manager || n.desired_role == NodeRole::Manager
                    }) =>
            {
                Outcome::NodeIsManager { id: id.clone() }
            }
            Command::RemoveNode { id } => match self.image.nodes.remove(id) {
                Some(node) => {
                    self.image.system.revoked.insert(id.clone());
                    self.image.node_descriptions.remove(id);
                    Outcome::Node { node }
                }
                None => Outcome::NoSuchNode { id: id.clone() },
            },
            Command::SetNodeCert {
                id,
                serial,
                not_after,
                ca,
                key,
            } => self.change_node(revision, id, |n| {
                n.cert_serial = serial.clone();
                n.cert_not_after = *not_after;
                n.cert_ca = ca.clone();
                n.cert_key = key.clone();
            }),
            Command::StartCaRotation { rotation } => {
                let cluster = &mut self.image.cluster;
                if let Some(r) = &cluster.rotation {
                    Outcome::CaRotation {
                        why: format!(
                            "a rotation to root {} is under way",
                            r.new_digest.get(..16).unwrap_or(&r.new_digest)
                        ),
                    }
                } else {
                    cluster.rotation = Some(rotation.clone());
                    Outcome::Done
                }
            }
            Command::FinishCaRotation {
                new_digest,
                join_secrets,
            } => {
                let cluster = &mut self.image.cluster;
                match cluster.rotation.take() {
                    Some(r) if r.new_digest == *new_digest => {
                        cluster.previous_ca_cert_pem =
                            std::mem::replace(&mut cluster.ca_cert_pem, r.new_cert_pem);
                        cluster.previous_cross_signed_pem = r.cross_signed_pem;
                        cluster.ca_key_pem = r.new_key_pem;
                        cluster.join_secrets = join_secrets.clone();
                        Outcome::Done
                    }
                    other => {
                        cluster.rotation = other;
                        Outcome::CaRotation {
                            why: "no rotation to that root is under way".into(),
                        }
                    }
                }
            }
            Command::UpdateSettings { change } => {
                change.apply_to(&mut self.image.cluster.settings);
                Outcome::Done
            }
            Command::SetCluster { info } => {
                self.image.cluster = info.clone();
                Outcome::Done
            }
            Command::AssignRaftId { node } if self.image.system.revoked.contains(node) => {
                Outcome::Revoked { id: node.clone() }
            }
            Command::AssignRaftId { node } => {
                let system = &mut self.image.system;
                let id = match system.raft_ids.get(node) {
                    Some(id) => *id,
                    None => {
                        let id = system
                            .next_raft_id
                            .max(SystemRecords::FIRST_ALLOCATED_RAFT_ID);
                        system.next_raft_id = id + 1;
                        system.raft_ids.insert(node.clone(), id);
                        id
                    }
                };
                Outcome::RaftId { id }
            }
            Command::RetireManager { node } => {
                self.image.system.raft_ids.remove(node);
                self.change_node(revision, node, |n| {
                    n.role = NodeRole::Worker;
                    n.desired_role = NodeRole::Worker;
                })
            }
            Command::AddClient { client } => {
                let clients = &mut self.image.system.clients;
                match clients.get(&client.name) {
                    Some(old) if !old.revoked => Outcome::ClientExists {
                        name: client.name.clone(),
                    },
                    _ => {
                        let record = ClientRecord {
                            created_revision: revision,
                            ..client.clone()
                        };
                        clients.insert(client.name.clone(), record.clone());
                        Outcome::Client { client: record }
                    }
                }
            }
            Command::SetJoinSecret { role, secret } => {
                self.image
                    .cluster
                    .join_secrets
                    .insert(role.clone(), secret.clone());
                Outcome::Done
            }
            Command::CreateService { spec, at } => self.create_service(revision, spec, *at),
            Command::UpdateService {
                id,
                spec,
                expected_version,
                at,
            } => self.update_service(revision, id, spec, *expected_version, *at),
            Command::RollbackService { id, at } => {
                match self.rollback_service(revision, id, 0, "rollback asked", *at) {
                    Ok(service) => Outcome::Service {
                        service: Box::new(service),
                    },
                    Err(TaskRefusal::NoSuchService) => Outcome::NoSuchService { id: id.clone() },
                    Err(TaskRefusal::NoPreviousSpec) => Outcome::InvalidSpec {
                        why: "the service has no previous spec to roll back to".to_owned(),
                    },
                    Err(e) => Outcome::InvalidSpec { why: e.to_string() },
                }
            }
            Command::RemoveService { id } => self.remove_service(revision, id),
            Command::WriteTasks { at, ops } => self.write_tasks(revision, *at, ops),
            Command::ReportTasks { node, reports } => self.report_tasks(revision, node, reports),
            Command::SetNodeLabels { id, add, remove } => self.change_node(revision, id, |n| {
                for k in remove {
                    n.labels.remove(k);
                }
                n.labels
                    .extend(add.iter().map(|(k, v)| (k.clone(), v.clone())));
            }),
            Command::SetNodeDescription { id, description } => {
                if self.image.nodes.contains_key(id) {
                    self.image
                        .node_descriptions
                        .insert(id.clone(), description.clone());
                    Outcome::Done
                } else {
                    Outcome::NoSuchNode { id: id.clone() }
                }
            }
            Command::RevokeClient { name } => {
                let system = &mut self.image.system;
                match system.clients.get_mut(name) {
                    Some(client) => {
                        client.revoked = true;
                        system.revoked.insert(client.id.clone());
                        Outcome::Client {
                            client: client.clone(),
                        }
                    }
                    None => Outcome::NoSuchClient { name: name.clone() },
                }
            }
        };
        for e in &events {
            self.history.push_back(Arc::clone(e));
        }
        while self.history.len() > WATCH_HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted_before = old.revision + 1;
            }
        }
        (CommandResult { revision, outcome }, events)
    }

    pub(crate) fn change_node(
        &mut self,
        revision: u64,
        id: &str,
        f: impl FnOnce(&mut NodeRecord),
    ) -> Outcome {
        match self.image.nodes.get_mut(id) {
            Some(n) => {
                f(n);
                n.version += 1;
                n.updated_revision = revision;
                Outcome::Node { node: n.clone() }
            }
            None => Outcome::NoSuchNode { id: id.to_owned() },
        }
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRevision { key, revision } => {
                self.image
                    .kv
                    .get(key.as_str())
                    .map_or(0, |e| e.mod_revision)
                    == *revision
            }
            Compare::Value { key, value } => {
                self.image.kv.get(key.as_str()).map(|e| &e.value) == value.as_ref()
            }
        }
    }

    /// Writes `value` under `key` and returns the entry it replaced. The value is copied
    /// once into the map and once into the event; an existing key is updated in place (no
    /// new key string, no copy of the old entry: it is moved out).
    fn put(
        &mut self,
        revision: u64,
        key: &str,
        value: &[u8],
        events: &mut Vec<Arc<KvEvent>>,
    ) -> Option<KvEntry> {
        let slot = self.image.kv.get_mut(key);
        let (create_revision, version) = slot
            .as_ref()
            .map_or((revision, 1), |p| (p.create_revision, p.version + 1));
        let entry = KvEntry {
            value: value.to_vec(),
            create_revision,
            mod_revision: revision,
            version,
        };
        let prev = match slot {
            Some(slot) => Some(std::mem::replace(slot, entry.clone())),
            None => {
                self.image
                    .kv
                    .insert(CompactString::from(key), entry.clone());
                None
            }
        };
        events.push(Arc::new(KvEvent {
            revision,
            key: key.to_owned(),
            entry: Some(entry),
        }));
        prev
    }

    fn delete(
        &mut self,
        revision: u64,
        key: &str,
        events: &mut Vec<Arc<KvEvent>>,
    ) -> Option<KvEntry> {
        let prev = self.image.kv.remove(key);
        if prev.is_some() {
            events.push(Arc::new(KvEvent {
                revision,
                key: key.to_owned(),
                entry: None,
            }));
        }
        prev
    }

    /// A key's entry.
    pub fn get(&self, key: &str) -> Option<&KvEntry> {
        self.image.kv.get(key)
    }

    /// Keys starting with `prefix`, in order.
    pub fn range(&self, prefix: &str) -> Vec<(String, KvEntry)> {
        self.image
            .kv
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// A node record.
    pub fn node(&self, id: &str) -> Option<&NodeRecord> {
        self.image.nodes.get(id)
    }

    /// All node records, by id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.image.nodes.values()
    }

    /// The cluster's identity and settings.
    pub fn cluster(&self) -> &ClusterInfo {
        &self.image.cluster
    }

    /// Revocations, Raft ids and API clients.
    pub fn system(&self) -> &SystemRecords {
        &self.image.system
    }

    /// The Raft id allocated to `node`, if any.
    pub fn raft_id(&self, node: &str) -> Option<u64> {
        self.image.system.raft_ids.get(node).copied()
    }

    /// Whether certificates with this CN (a node or API client id) are refused.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.image.system.revoked.contains(id)
    }

    /// Events for keys under `prefix` with a revision ≥ `from`, or `Err(first)` with the
    /// oldest revision still available if `from` is older than that.
    pub fn history_since(&self, prefix: &str, from: u64) -> Result<Vec<Arc<KvEvent>>, u64> {
        if from < self.compacted_before {
            return Err(self.compacted_before);
        }
        let start = self.history.partition_point(|e| e.revision < from);
        Ok(self
            .history
            .range(start..)
            .filter(|e| e.key.starts_with(prefix))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::objects::SettingsChange;
    use crate::{Availability, CaRotation, ClientRole, NodeStatus};
    use proptest::prelude::*;

    fn put(k: &str, v: &str) -> Command {
        Command::Put {
            key: k.into(),
            value: v.as_bytes().to_vec(),
        }
    }

    #[test]
    fn revisions_and_versions_follow_etcd() {
        let mut s = ClusterState::new();
        s.apply(3, &put("a", "1"));
        s.apply(5, &put("a", "2"));
        let e = s.get("a").unwrap();
        assert_eq!((e.create_revision, e.mod_revision, e.version), (3, 5, 2));
        s.apply(6, &Command::Delete { key: "a".into() });
        assert!(s.get("a").is_none());
        s.apply(8, &put("a", "3"));
        let e = s.get("a").unwrap();
        assert_eq!((e.create_revision, e.mod_revision, e.version), (8, 8, 1));
        assert_eq!(s.revision(), 8);
    }

    #[test]
    fn cas_on_revision_and_value() {
        let mut s = ClusterState::new();
        let (r, _) = s.apply(1, &Command::cas_revision("k", 0, b"x".to_vec()));
        assert_eq!(r.outcome, Outcome::Txn { succeeded: true });
        let (r, _) = s.apply(2, &Command::cas_revision("k", 0, b"y".to_vec()));
        assert_eq!(r.outcome, Outcome::Txn { succeeded: false });
        assert_eq!(s.get("k").unwrap().value, b"x");
        let (r, _) = s.apply(3, &Command::cas_revision("k", 1, b"y".to_vec()));
        assert_eq!(r.outcome, Outcome::Txn { succeeded: true });
        let (r, _) = s.apply(
            4,
            &Command::cas_value("k", Some(b"x".to_vec()), b"z".to_vec()),
        );
        assert_eq!(r.outcome, Outcome::Txn { succeeded: false });
        let (r, _) = s.apply(
            5,
            &Command::cas_value("k", Some(b"y".to_vec()), b"z".to_vec()),
        );
        assert_eq!(r.outcome, Outcome::Txn { succeeded: true });
        assert_eq!(s.get("k").unwrap().value, b"z");
    }

    #[test]
    fn txn_is_all_or_nothing() {
        let mut s = ClusterState::new();
        s.apply(1, &put("a", "1"));
        let txn = Command::Txn {
            compares: vec![
                Compare::Value {
                    key: "a".into(),
                    value: Some(b"1".to_vec()),
                },
                Compare::ModRevision {
                    key: "b".into(),
                    revision: 7,
                },
            ],
            success: vec![
                TxnOp::Put {
                    key: "b".into(),
                    value: b"2".to_vec(),
                },
                TxnOp::Delete { key: "a".into() },
            ],
            failure: vec![TxnOp::Put {
                key: "c".into(),
                value: b"failed".to_vec(),
            }],
        };
        let (r, events) = s.apply(2, &txn);
        assert_eq!(r.outcome, Outcome::Txn { succeeded: false });
        assert!(s.get("b").is_none());
        assert_eq!(s.get("a").unwrap().value, b"1");
        assert_eq!(s.get("c").unwrap().value, b"failed");
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn range_is_by_prefix_in_order() {
        let mut s = ClusterState::new();
        for (i, k) in ["b/2", "a/1", "b/1", "b", "c"].iter().enumerate() {
            s.apply(i as u64 + 1, &put(k, "v"));
        }
        let keys: Vec<String> = s.range("b/").into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["b/1", "b/2"]);
        assert_eq!(s.range("").len(), 5);
        assert!(s.range("z").is_empty());
    }

    /// Keys short enough to be held inline and keys that are not: the map archives (the
    /// snapshot format) and serialises exactly as a map with `String` keys, reads back from
    /// such bytes, and ranges over both kinds in byte order.
    #[test]
    fn inline_and_long_keys_keep_the_string_formats() {
        let keys = [
            "",
            "a",
            "b/1",
            "exactly-24-bytes-long-ok",
            "twenty-five-bytes-long-ok",
            "b/a-key-far-longer-than-any-inline-one/0001",
            "ключ/🌍",
        ];
        let mut s = ClusterState::new();
        for (i, k) in keys.iter().enumerate() {
            s.apply(i as u64 + 1, &put(k, k));
        }
        let strings: BTreeMap<String, KvEntry> = s
            .image()
            .kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        assert_eq!(strings.len(), keys.len());
        let ours = rkyv::to_bytes::<rkyv::rancor::Error>(&s.image().kv).unwrap();
        let theirs = rkyv::to_bytes::<rkyv::rancor::Error>(&strings).unwrap();
        assert_eq!(&ours[..], &theirs[..]);
        let back =
            rkyv::from_bytes::<BTreeMap<CompactString, KvEntry>, rkyv::rancor::Error>(&theirs)
                .unwrap();
        assert_eq!(back, s.image().kv);
        assert_eq!(
            postcard::to_allocvec(&s.image().kv).unwrap(),
            postcard::to_allocvec(&strings).unwrap()
        );
        let in_order: Vec<String> = s.range("").into_iter().map(|(k, _)| k).collect();
        assert_eq!(in_order, strings.keys().cloned().collect::<Vec<_>>());
        let under_b: Vec<String> = s.range("b/").into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            under_b,
            vec!["b/1", "b/a-key-far-longer-than-any-inline-one/0001"]
        );
        for k in keys {
            assert_eq!(s.get(k).unwrap().value, k.as_bytes());
        }
    }

    #[test]
    fn nodes_keep_liveness_across_upserts() {
        let mut s = ClusterState::new();
        let node = NodeRecord {
            id: "n1".into(),
            hostname: "h".into(),
            addr: "127.0.0.1:1".into(),
            role: NodeRole::Worker,
            desired_role: NodeRole::Worker,
            availability: Availability::Active,
            status: NodeStatus::Unknown,
            labels: BTreeMap::new(),
            cert_serial: "01".into(),
            cert_not_after: 0,
            cert_ca: String::new(),
            cert_key: String::new(),
            version: 0,
            created_revision: 0,
            updated_revision: 0,
        };
        s.apply(1, &Command::UpsertNode { node: node.clone() });
        s.apply(
            2,
            &Command::SetNodeStatus {
                id: "n1".into(),
                status: NodeStatus::Ready,
            },
        );
        let (r, _) = s.apply(
            3,
            &Command::UpsertNode {
                node: NodeRecord {
                    hostname: "h2".into(),
                    ..node
                },
            },
        );
        let Outcome::Node { node } = r.outcome else {
            panic!("{r:?}")
        };
        assert_eq!(node.status, NodeStatus::Ready);
        assert_eq!(node.hostname, "h2");
        assert_eq!(
            (node.version, node.created_revision, node.updated_revision),
            (3, 1, 3)
        );
        let (r, _) = s.apply(4, &Command::RemoveNode { id: "zz".into() });
        assert_eq!(r.outcome, Outcome::NoSuchNode { id: "zz".into() });
    }

    #[test]
    fn watch_history_resumes_without_gap_and_reports_compaction() {
        let mut s = ClusterState::new();
        for i in 1..=10u64 {
            s.apply(i, &put(if i % 2 == 0 { "w/even" } else { "w/odd" }, "v"));
        }
        let evs = s.history_since("w/even", 5).unwrap();
        assert_eq!(
            evs.iter().map(|e| e.revision).collect::<Vec<_>>(),
            vec![6, 8, 10]
        );
        let restored = ClusterState::from_image(s.image().clone());
        assert_eq!(restored.history_since("w/", 3), Err(11));
        assert!(restored.history_since("w/", 11).unwrap().is_empty());
    }

    fn worker(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            hostname: "h".into(),
            addr: "127.0.0.1:1".into(),
            role: NodeRole::Worker,
            desired_role: NodeRole::Worker,
            availability: Availability::Active,
            status: NodeStatus::Unknown,
            labels: BTreeMap::new(),
            cert_serial: "01".into(),
            cert_not_after: 0,
            cert_ca: String::new(),
            cert_key: String::new(),
            version: 0,
            created_revision: 0,
            updated_revision: 0,
        }
    }

    #[test]
    fn raft_ids_are_allocated_once_and_never_reused() {
        let mut s = ClusterState::new();
        let assign = |s: &mut ClusterState, rev, node: &str| match s
            .apply(rev, &Command::AssignRaftId { node: node.into() })
            .0
            .outcome
        {
            Outcome::RaftId { id } => id,
            other => panic!("{other:?}"),
        };
        assert_eq!(assign(&mut s, 1, "a"), 2);
        assert_eq!(assign(&mut s, 2, "a"), 2, "the same node keeps its id");
        assert_eq!(assign(&mut s, 3, "b"), 3);
        s.apply(4, &Command::UpsertNode { node: worker("a") });
        let (r, _) = s.apply(5, &Command::RetireManager { node: "a".into() });
        assert!(matches!(r.outcome, Outcome::Node { ref node } if node.role == NodeRole::Worker));
        assert_eq!(s.raft_id("a"), None);
        assert_eq!(
            assign(&mut s, 6, "a"),
            4,
            "a promotion after a demotion gets a new id"
        );
        // Keys that used to hold these records are plain user data now.
        s.apply(7, &put("_starling/next-raft-id", "2"));
        s.apply(
            8,
            &Command::Delete {
                key: "_starling/raft-id/a".into(),
            },
        );
        assert_eq!(s.raft_id("a"), Some(4));
        assert_eq!(assign(&mut s, 9, "c"), 5);
    }

    #[test]
    fn removing_a_node_revokes_it_and_no_key_changes_that() {
        let mut s = ClusterState::new();
        s.apply(1, &Command::UpsertNode { node: worker("w") });
        s.apply(2, &Command::AssignRaftId { node: "m".into() });
        s.apply(3, &Command::RemoveNode { id: "w".into() });
        assert!(s.is_revoked("w"));
        assert_eq!(
            s.raft_id("m"),
            Some(2),
            "another node's raft id is untouched"
        );
        s.apply(
            4,
            &Command::Delete {
                key: "_starling/removed/w".into(),
            },
        );
        s.apply(5, &put("_starling/removed/w", ""));
        assert!(s.is_revoked("w"));
        assert!(
            s.range("")
                .iter()
                .all(|(k, _)| k.starts_with("_starling/removed/"))
        );
        let (r, _) = s.apply(6, &Command::RemoveNode { id: "w".into() });
        assert_eq!(r.outcome, Outcome::NoSuchNode { id: "w".into() });
        // A removed id never comes back: no record, no Raft id.
        let (r, _) = s.apply(7, &Command::UpsertNode { node: worker("w") });
        assert_eq!(r.outcome, Outcome::Revoked { id: "w".into() });
        let (r, _) = s.apply(8, &Command::AssignRaftId { node: "w".into() });
        assert_eq!(r.outcome, Outcome::Revoked { id: "w".into() });
        assert!(s.node("w").is_none() && s.raft_id("w").is_none());
    }

    #[test]
    fn a_manager_or_a_node_being_promoted_is_not_removed() {
        let mut s = ClusterState::new();
        s.apply(1, &Command::UpsertNode { node: worker("p") });
        s.apply(
            2,
            &Command::SetNodeRole {
                id: "p".into(),
                role: NodeRole::Worker,
                desired_role: NodeRole::Manager,
            },
        );
        let (r, _) = s.apply(3, &Command::RemoveNode { id: "p".into() });
        assert_eq!(r.outcome, Outcome::NodeIsManager { id: "p".into() });
        s.apply(4, &Command::UpsertNode { node: worker("q") });
        s.apply(5, &Command::AssignRaftId { node: "q".into() });
        let (r, _) = s.apply(6, &Command::RemoveNode { id: "q".into() });
        assert_eq!(r.outcome, Outcome::NodeIsManager { id: "q".into() });
        assert!(s.node("p").is_some() && s.node("q").is_some());
        assert!(!s.is_revoked("p") && !s.is_revoked("q"));
    }

    #[test]
    fn a_root_rotation_starts_once_and_finishes_only_for_its_root() {
        let mut s = ClusterState::new();
        let mut info = ClusterInfo {
            cluster_id: "c".into(),
            ca_cert_pem: "old".into(),
            ca_key_pem: "old key".into(),
            ..ClusterInfo::default()
        };
        info.join_secrets.insert("worker".into(), vec![1; 16]);
        s.apply(1, &Command::SetCluster { info });
        assert_eq!(s.cluster().trusted_roots_pem(), vec!["old"]);
        assert!(s.cluster().chain_pem().is_empty());
        let rotation = CaRotation {
            new_cert_pem: "new".into(),
            new_key_pem: "new key".into(),
            cross_signed_pem: "cross".into(),
            new_digest: "d1".into(),
            started_at: 7,
        };
        let (r, _) = s.apply(
            2,
            &Command::StartCaRotation {
                rotation: rotation.clone(),
            },
        );
        assert_eq!(r.outcome, Outcome::Done);
        assert_eq!(s.cluster().signing_ca_pem(), ("new", "new key"));
        assert_eq!(s.cluster().trusted_roots_pem(), vec!["new", "old"]);
        assert_eq!(s.cluster().chain_pem(), vec!["cross"]);
        // A second rotation while one runs, or finishing another root: refused, unchanged.
        let (r, _) = s.apply(3, &Command::StartCaRotation { rotation });
        assert!(matches!(r.outcome, Outcome::CaRotation { .. }));
        let secrets: BTreeMap<String, Vec<u8>> = [("worker".to_owned(), vec![2; 16])].into();
        let (r, _) = s.apply(
            4,
            &Command::FinishCaRotation {
                new_digest: "other".into(),
                join_secrets: secrets.clone(),
            },
        );
        assert!(matches!(r.outcome, Outcome::CaRotation { .. }));
        assert!(s.cluster().rotation.is_some());
        assert_eq!(s.cluster().join_secrets["worker"], vec![1; 16]);
        let (r, _) = s.apply(
            5,
            &Command::FinishCaRotation {
                new_digest: "d1".into(),
                join_secrets: secrets,
            },
        );
        assert_eq!(r.outcome, Outcome::Done);
        let c = s.cluster();
        assert!(c.rotation.is_none());
        assert_eq!(
            (c.ca_cert_pem.as_str(), c.ca_key_pem.as_str()),
            ("new", "new key")
        );
        assert_eq!(c.trusted_roots_pem(), vec!["new"]);
        assert_eq!(c.chain_pem(), vec!["cross", "old"]);
        assert_eq!(c.join_secrets["worker"], vec![2; 16]);
    }

    #[test]
    fn a_renewal_is_recorded_and_settings_change_one_field_at_a_time() {
        let mut s = ClusterState::new();
        s.apply(1, &Command::UpsertNode { node: worker("w") });
        let (r, _) = s.apply(
            2,
            &Command::SetNodeCert {
                id: "w".into(),
                serial: "beef".into(),
                not_after: 1234,
                ca: "c0ffee".into(),
                key: "k3y".into(),
            },
        );
        let Outcome::Node { node } = r.outcome else {
            panic!("{:?}", r.outcome)
        };
        assert_eq!(
            (
                node.cert_serial.as_str(),
                node.cert_not_after,
                node.cert_ca.as_str(),
                node.cert_key.as_str()
            ),
            ("beef", 1234, "c0ffee", "k3y")
        );
        assert_eq!((node.version, node.updated_revision), (2, 2));
        let (r, _) = s.apply(
            3,
            &Command::SetNodeCert {
                id: "nobody".into(),
                serial: "x".into(),
                not_after: 1,
                ca: String::new(),
                key: String::new(),
            },
        );
        assert_eq!(
            r.outcome,
            Outcome::NoSuchNode {
                id: "nobody".into()
            }
        );

        let default = s.cluster().settings.clone();
        s.apply(
            4,
            &Command::UpdateSettings {
                change: SettingsChange {
                    cert_lifetime_secs: Some(3600),
                    ..SettingsChange::default()
                },
            },
        );
        assert_eq!(s.cluster().settings.cert_lifetime_secs, 3600);
        assert_eq!(
            s.cluster().settings.cert_grace_secs,
            default.cert_grace_secs
        );
        s.apply(
            5,
            &Command::UpdateSettings {
                change: SettingsChange {
                    cert_grace_secs: Some(0),
                    autopilot_min_managers: Some(5),
                    ..SettingsChange::default()
                },
            },
        );
        assert_eq!(
            (
                s.cluster().settings.cert_lifetime_secs,
                s.cluster().settings.cert_grace_secs
            ),
            (3600, 0)
        );
    }

    #[test]
    fn join_secrets_rotate_one_role_at_a_time() {
        let mut s = ClusterState::new();
        for (rev, (role, secret)) in [("manager", 1u8), ("worker", 2), ("manager", 3)]
            .into_iter()
            .enumerate()
        {
            s.apply(
                rev as u64 + 1,
                &Command::SetJoinSecret {
                    role: role.into(),
                    secret: vec![secret; 16],
                },
            );
        }
        let secrets = &s.cluster().join_secrets;
        assert_eq!(secrets.get("manager"), Some(&vec![3u8; 16]));
        assert_eq!(secrets.get("worker"), Some(&vec![2u8; 16]));
    }

    #[test]
    fn clients_are_unique_by_name_until_revoked() {
        let mut s = ClusterState::new();
        let client = |id: &str| ClientRecord {
            name: "ops".into(),
            id: id.into(),
            role: ClientRole::Admin,
            cert_serial: "0a".into(),
            not_after: 100,
            revoked: false,
            created_revision: 0,
        };
        let (r, _) = s.apply(
            1,
            &Command::AddClient {
                client: client("c1"),
            },
        );
        assert!(
            matches!(r.outcome, Outcome::Client { ref client } if client.created_revision == 1)
        );
        let (r, _) = s.apply(
            2,
            &Command::AddClient {
                client: client("c2"),
            },
        );
        assert_eq!(r.outcome, Outcome::ClientExists { name: "ops".into() });
        let (r, _) = s.apply(
            3,
            &Command::RevokeClient {
                name: "nobody".into(),
            },
        );
        assert_eq!(
            r.outcome,
            Outcome::NoSuchClient {
                name: "nobody".into()
            }
        );
        s.apply(4, &Command::RevokeClient { name: "ops".into() });
        assert!(s.is_revoked("c1"));
        let (r, _) = s.apply(
            5,
            &Command::AddClient {
                client: client("c2"),
            },
        );
        assert!(matches!(r.outcome, Outcome::Client { .. }));
        assert!(s.is_revoked("c1") && !s.is_revoked("c2"));
    }

    fn arb_kv_command() -> impl Strategy<Value = Command> {
        let key = prop::sample::select(vec![
            "_starling/removed/w",
            "_starling/next-raft-id",
            "_starling/raft-id/m",
            "w",
        ])
        .prop_map(String::from);
        let val = prop::collection::vec(b'0'..=b'9', 0..3);
        prop_oneof![
            (key.clone(), val.clone()).prop_map(|(key, value)| Command::Put { key, value }),
            key.clone().prop_map(|key| Command::Delete { key }),
            (key, 0u64..20, val).prop_map(|(k, r, v)| Command::cas_revision(k, r, v)),
        ]
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let key = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
        let val = prop::collection::vec(0u8..3, 0..3);
        prop_oneof![
            (key.clone(), val.clone()).prop_map(|(key, value)| Command::Put { key, value }),
            key.clone().prop_map(|key| Command::Delete { key }),
            (key.clone(), 0u64..20, val.clone())
                .prop_map(|(k, r, v)| Command::cas_revision(k, r, v)),
            (key, prop::option::of(val.clone()), val)
                .prop_map(|(k, e, v)| Command::cas_value(k, e, v)),
        ]
    }

    proptest! {
        /// No key-value command, on any key (the old `_starling/` ones included), changes a
        /// system record.
        #[test]
        fn kv_commands_never_touch_system_records(
            cmds in prop::collection::vec(arb_kv_command(), 0..40),
        ) {
            let mut s = ClusterState::new();
            s.apply(1, &Command::UpsertNode { node: worker("w") });
            s.apply(2, &Command::AssignRaftId { node: "m".into() });
            s.apply(3, &Command::RemoveNode { id: "w".into() });
            let before = s.system().clone();
            for (i, c) in cmds.iter().enumerate() {
                s.apply(i as u64 + 4, c);
            }
            prop_assert_eq!(s.system(), &before);
        }

        /// Replaying the same log gives the same state (determinism), and revisions only grow.
        #[test]
        fn apply_is_deterministic(cmds in prop::collection::vec(arb_command(), 0..60)) {
            let mut a = ClusterState::new();
            let mut b = ClusterState::new();
            for (i, c) in cmds.iter().enumerate() {
                let (ra, _) = a.apply(i as u64 + 1, c);
                let (rb, _) = b.apply(i as u64 + 1, c);
                prop_assert_eq!(ra, rb);
            }
            prop_assert_eq!(a.image(), b.image());
            for (_, e) in a.range("") {
                prop_assert!(e.create_revision <= e.mod_revision);
                prop_assert!(e.mod_revision <= a.revision());
            }
        }

        /// Of N racing CAS writes on the same expected revision, exactly one wins.
        #[test]
        fn racing_cas_one_winner(n in 1usize..10, start in 0u64..3) {
            let mut s = ClusterState::new();
            let mut rev = 1;
            if start > 0 {
                s.apply(rev, &put("k", "seed"));
                rev += 1;
            }
            let expected = s.get("k").map_or(0, |e| e.mod_revision);
            let mut wins = 0;
            for i in 0..n {
                let (r, _) = s.apply(rev, &Command::cas_revision("k", expected, vec![i as u8]));
                rev += 1;
                if r.outcome == (Outcome::Txn { succeeded: true }) {
                    wins += 1;
                }
            }
            prop_assert_eq!(wins, 1);
        }

        /// The watch history for a prefix is exactly the events the applies returned.
        #[test]
        fn history_matches_events(cmds in prop::collection::vec(arb_command(), 0..60)) {
            let mut s = ClusterState::new();
            let mut all = Vec::new();
            for (i, c) in cmds.iter().enumerate() {
                let (_, evs) = s.apply(i as u64 + 1, c);
                all.extend(evs);
            }
            prop_assert_eq!(s.history_since("", 0).unwrap(), all);
        }
    }
}
